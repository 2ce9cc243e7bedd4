//! xxh3 (64-bit, seeded) for the short values plugins hash per row: the same hashes as the
//! `xxhash-rust` crate's `xxh3_64_with_seed`, bit for bit (dedup's snapshots hold them), without a
//! 128-bit multiplication for inputs of 9 to 16 bytes.
//!
//! xxh3 folds a 64 × 64 → 128-bit product for those lengths. WebAssembly has no instruction for
//! it: Rust's `u128` product becomes a call to the `__multi3` library routine, which passes its
//! result through the stack in linear memory. A packed group key of a short symbol (9 to 16
//! bytes) and a microsecond time that is not a whole millisecond (9 bytes) take that path once
//! per row. Here, in WebAssembly, the product is four 32 × 32 → 64-bit multiplications, inline,
//! as xxHash's own portable C code does it. Every other length goes to `xxhash-rust`.

use xxhash_rust::xxh3::xxh3_64_with_seed as xxh3_any;

/// xxh3's default secret, the four 8-byte words (little-endian) at bytes 24..56 that inputs of
/// 9 to 16 bytes read.
const SECRET_24: u64 = 0x1f67_b3b7_a4a4_4072;
const SECRET_32: u64 = 0x78e5_c0cc_4ee6_79cb;
const SECRET_40: u64 = 0x2172_ffcc_7dd0_5a82;
const SECRET_48: u64 = 0x8e24_43f7_7446_08b8;

/// The 64-bit xxh3 of `bytes` with `seed`: equal to `xxhash_rust::xxh3::xxh3_64_with_seed`.
#[inline]
pub fn xxh3_64_with_seed(bytes: &[u8], seed: u64) -> u64 {
    let len = bytes.len();
    if !(9..=16).contains(&len) {
        return xxh3_any(bytes, seed);
    }
    let flip1 = (SECRET_24 ^ SECRET_32).wrapping_add(seed);
    let flip2 = (SECRET_40 ^ SECRET_48).wrapping_sub(seed);
    let lo = word(&bytes[..8]) ^ flip1;
    let hi = word(&bytes[len - 8..]) ^ flip2;
    let acc = (len as u64)
        .wrapping_add(lo.swap_bytes())
        .wrapping_add(hi)
        .wrapping_add(mul_fold(lo, hi));
    avalanche(acc)
}

/// 8 bytes as a little-endian word.
#[inline(always)]
fn word(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(bytes);
    u64::from_le_bytes(w)
}

/// The 128-bit product of `a` and `b`, its low and high halves XORed: in WebAssembly from four
/// 32-bit products ([`mul_fold_split`]); where the CPU has the instruction, as a `u128`.
#[inline(always)]
fn mul_fold(a: u64, b: u64) -> u64 {
    if cfg!(target_family = "wasm") {
        mul_fold_split(a, b)
    } else {
        let p = u128::from(a) * u128::from(b);
        (p as u64) ^ ((p >> 64) as u64)
    }
}

/// [`mul_fold`] from four 32 × 32 → 64-bit products, as xxHash's portable C code computes it.
#[inline(always)]
fn mul_fold_split(a: u64, b: u64) -> u64 {
    let (a_lo, a_hi) = (a & 0xffff_ffff, a >> 32);
    let (b_lo, b_hi) = (b & 0xffff_ffff, b >> 32);
    let lo_lo = a_lo * b_lo;
    let hi_lo = a_hi * b_lo;
    // Opaque to the optimizer: LLVM recognizes the whole pattern as a 128-bit product and puts
    // the `__multi3` call back.
    let lo_hi = std::hint::black_box(a_lo * b_hi);
    let hi_hi = a_hi * b_hi;
    // No overflow: each term is below 2^64 - 2^33 + 1 and the sum stays below 2^64.
    let cross = (lo_lo >> 32) + (hi_lo & 0xffff_ffff) + lo_hi;
    let upper = (hi_lo >> 32) + (cross >> 32) + hi_hi;
    let lower = (cross << 32) | (lo_lo & 0xffff_ffff);
    lower ^ upper
}

/// xxh3's final mix for short inputs.
#[inline(always)]
fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 37;
    h = h.wrapping_mul(0x1656_6791_9e37_79f9);
    h ^ (h >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator, so the test needs no crate.
    fn next(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn every_length_hashes_as_the_xxhash_crate_does() {
        let mut state = 7;
        let mut bytes = Vec::new();
        for len in 0..=300 {
            for round in 0..200 {
                bytes.clear();
                bytes.extend((0..len).map(|_| next(&mut state) as u8));
                // Seeds as dedup chains them (earlier hashes), and the extremes.
                let seed = match round {
                    0 => 0,
                    1 => u64::MAX,
                    2 => 1 << 63,
                    _ => next(&mut state),
                };
                assert_eq!(
                    xxh3_64_with_seed(&bytes, seed),
                    xxh3_any(&bytes, seed),
                    "{len} bytes, seed {seed:#x}"
                );
            }
        }
        // Words whose halves are all ones (the product's carries at their largest).
        for len in 9..=16 {
            for fill in [0x00, 0xff, 0x80, 0x7f] {
                let bytes = vec![fill; len];
                for seed in [0, u64::MAX, SECRET_24 ^ SECRET_32, (SECRET_40 ^ SECRET_48)] {
                    assert_eq!(
                        xxh3_64_with_seed(&bytes, seed),
                        xxh3_any(&bytes, seed),
                        "{len} bytes of {fill:#x}, seed {seed:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_product_is_folded_as_a_u128_would_be() {
        let mut state = 11;
        let cases = [
            (0, 0),
            (u64::MAX, u64::MAX),
            (u64::MAX, 1),
            (1 << 32, 1 << 32),
            (0xffff_ffff, 0xffff_ffff),
        ];
        let random = (0..10_000).map(|_| (next(&mut state), next(&mut state)));
        for (a, b) in cases.into_iter().chain(random) {
            let p = u128::from(a) * u128::from(b);
            let folded = (p as u64) ^ ((p >> 64) as u64);
            assert_eq!(mul_fold_split(a, b), folded, "{a:#x} × {b:#x}");
            assert_eq!(mul_fold(a, b), folded, "{a:#x} × {b:#x}");
        }
    }
}

//! The key table: each remembered key's 64-bit hash and expiry, in 12 bytes.
//!
//! A general hash map spends a lot on a table of millions of small entries: `HashMap<u64, i64>`
//! takes 17 bytes a slot, at a load between 44% and 87% (it doubles), and while it doubles the
//! old and the new table are both alive, which is the peak a WASM instance's linear memory keeps
//! for good (it never shrinks): 68 MiB per million keys, measured. This table keeps a key in 12
//! bytes (the hash, and the expiry as milliseconds after a base), in [`SEGMENTS`] small tables
//! chosen by the hash's top bits, each grown by a fifth when it is 90% full: the load stays
//! between 75% and 90% and a growth copies one small segment, not the whole table.
//!
//! Each segment is an ordered linear-probing table: a key's home slot is its hash scaled to the
//! segment's size (so homes follow the hashes' order), keys sit in hash order at or after their
//! home with no empty slot in between, and a lookup stops at the first larger hash or empty slot.
//! A sweep that forgets expired keys compacts a segment in one pass, in place.
//!
//! Expiries that do not fit 32 bits of milliseconds after the base (49 days; event times far
//! from the others) live in a plain map beside the segments. The base moves up at each sweep
//! (to the sweep's end, below which nothing is kept), so a stream that runs for months stays in
//! the segments.

use std::collections::HashMap;

/// Top bits of the hash that choose a segment.
const SEGMENT_BITS: u32 = 12;
/// Segments: a million keys make ~244 keys a segment, so a segment grows by copying ~4 KB.
pub const SEGMENTS: usize = 1 << SEGMENT_BITS;
/// A segment grows when a key would take it past 9 slots in 10...
const MAX_LOAD: (usize, usize) = (9, 10);
/// ...by at least a fifth of its slots.
const GROWTH: (usize, usize) = (6, 5);
/// Slots of a segment's first allocation.
const MIN_SLOTS: usize = 8;
/// An empty slot's `rel` (an expiry of `base + u32::MAX` goes to the outliers).
const EMPTY: u32 = u32::MAX;

/// One slot: a key's hash (in two halves, so the slot is 12 bytes, not 16) and its expiry in
/// milliseconds after the table's base.
#[derive(Clone, Copy, Debug)]
struct Slot {
    lo: u32,
    hi: u32,
    rel: u32,
}

impl Slot {
    const VACANT: Slot = Slot {
        lo: 0,
        hi: 0,
        rel: EMPTY,
    };

    fn new(hash: u64, rel: u32) -> Slot {
        Slot {
            lo: hash as u32,
            hi: (hash >> 32) as u32,
            rel,
        }
    }

    fn hash(self) -> u64 {
        u64::from(self.hi) << 32 | u64::from(self.lo)
    }

    fn is_empty(self) -> bool {
        self.rel == EMPTY
    }
}

/// One segment: slots `0..homes` are homes; the slots after them take what overflows the last.
#[derive(Default)]
struct Segment {
    slots: Vec<Slot>,
    homes: usize,
    len: usize,
}

/// Where a key is, or where it would go.
#[derive(Clone, Copy, Debug)]
pub enum Probe {
    /// In segment `segment` at `slot`, expiring at `expiry`.
    Found {
        segment: usize,
        slot: usize,
        expiry: i64,
    },
    /// In the outliers, expiring at `expiry`.
    Outlier { expiry: i64 },
    /// Not remembered; it would go to `slot` of `segment`.
    Absent { segment: usize, slot: usize },
}

impl Probe {
    /// The remembered key's expiry.
    pub fn expiry(self) -> Option<i64> {
        match self {
            Probe::Found { expiry, .. } | Probe::Outlier { expiry } => Some(expiry),
            Probe::Absent { .. } => None,
        }
    }
}

/// Key hash → expiry (ms), for millions of keys.
pub struct KeyTable {
    segments: Vec<Segment>,
    /// Keys in the segments.
    len: usize,
    /// A slot's expiry is `base + rel`.
    base: Option<i64>,
    /// Keys whose expiry is not within `base..base + u32::MAX`.
    outliers: HashMap<u64, i64>,
}

impl Default for KeyTable {
    fn default() -> Self {
        KeyTable {
            segments: std::iter::repeat_with(Segment::default)
                .take(SEGMENTS)
                .collect(),
            len: 0,
            base: None,
            outliers: HashMap::new(),
        }
    }
}

impl Segment {
    /// `hash`'s home slot: the bits below the segment's, scaled to `homes` (monotone in `hash`,
    /// so homes are in the order of the hashes).
    fn home(&self, hash: u64) -> usize {
        let fraction = (hash << SEGMENT_BITS) >> 32;
        ((fraction * self.homes as u64) >> 32) as usize
    }

    /// `Ok(slot)` where `hash` is, or `Err(slot)` where it would go.
    fn find(&self, hash: u64) -> Result<usize, usize> {
        let mut i = self.home(hash);
        while let Some(slot) = self.slots.get(i) {
            if slot.is_empty() || slot.hash() > hash {
                return Err(i);
            }
            if slot.hash() == hash {
                return Ok(i);
            }
            i += 1;
        }
        Err(i)
    }

    /// Puts `slot` at `at` (from [`Segment::find`]), shifting the keys after it up to the next
    /// empty slot. False when no empty slot follows (the caller grows the segment).
    fn insert_at(&mut self, at: usize, slot: Slot) -> bool {
        if self.len + 1 > self.slots.len() * MAX_LOAD.0 / MAX_LOAD.1 {
            return false;
        }
        let Some(free) = self.slots[at..].iter().position(|s| s.is_empty()) else {
            return false;
        };
        self.slots.copy_within(at..at + free, at + 1);
        self.slots[at] = slot;
        self.len += 1;
        true
    }

    /// Removes the key at `at`, moving the keys after it that sit past their home back by one.
    fn remove_at(&mut self, mut at: usize) {
        self.slots[at] = Slot::VACANT;
        self.len -= 1;
        while let Some(&next) = self.slots.get(at + 1) {
            if next.is_empty() || self.home(next.hash()) > at {
                break;
            }
            self.slots[at] = next;
            self.slots[at + 1] = Slot::VACANT;
            at += 1;
        }
    }

    /// Rebuilds the segment with room for `len + 1` keys (or `keys`, if more) under the load
    /// limit, and at least a fifth more slots than now.
    fn grow(&mut self, keys: usize) {
        let wanted = (self.len + 1).max(keys) * MAX_LOAD.1 / MAX_LOAD.0 + 1;
        let grown = self.slots.len() * GROWTH.0 / GROWTH.1;
        let size = wanted.max(grown).max(MIN_SLOTS);
        let mut slots = Vec::with_capacity(size);
        slots.resize(size, Slot::VACANT);
        let old = std::mem::replace(&mut self.slots, slots);
        // A few slots past the last home take the keys that overflow it.
        self.homes = size - size / 32 - 2;
        let mut next = 0;
        for slot in old.into_iter().filter(|s| !s.is_empty()) {
            let at = self.home(slot.hash()).max(next);
            if at >= self.slots.len() {
                self.slots.resize(at + 1, Slot::VACANT);
            }
            self.slots[at] = slot;
            next = at + 1;
        }
    }

    /// Keeps the keys for which `keep` gives a new `rel`, in one pass: each kept key moves to
    /// its home or the slot after the previous kept key, whichever is later (never later than
    /// where it was).
    fn retain(&mut self, mut keep: impl FnMut(Slot) -> Option<u32>) {
        let mut next = 0;
        let mut len = 0;
        for i in 0..self.slots.len() {
            let slot = self.slots[i];
            if slot.is_empty() {
                continue;
            }
            self.slots[i] = Slot::VACANT;
            if let Some(rel) = keep(slot) {
                let at = self.home(slot.hash()).max(next);
                self.slots[at] = Slot { rel, ..slot };
                next = at + 1;
                len += 1;
            }
        }
        self.len = len;
    }
}

impl KeyTable {
    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.len + self.outliers.len()
    }

    fn segment_of(hash: u64) -> usize {
        (hash >> (64 - SEGMENT_BITS)) as usize
    }

    /// Where `hash` is, or would go.
    pub fn probe(&self, hash: u64) -> Probe {
        let segment = Self::segment_of(hash);
        match self.segments[segment].find(hash) {
            Ok(slot) => Probe::Found {
                segment,
                slot,
                expiry: self.expiry_of(self.segments[segment].slots[slot]),
            },
            Err(slot) => match self.outliers.get(&hash) {
                Some(&expiry) => Probe::Outlier { expiry },
                None => Probe::Absent { segment, slot },
            },
        }
    }

    /// The expiry `hash` is remembered with.
    pub fn get(&self, hash: u64) -> Option<i64> {
        self.probe(hash).expiry()
    }

    fn expiry_of(&self, slot: Slot) -> i64 {
        self.base
            .unwrap_or_default()
            .saturating_add(i64::from(slot.rel))
    }

    /// `expiry` relative to the base, if it fits a slot.
    fn rel(&mut self, expiry: i64) -> Option<u32> {
        // The first key sets the base: half the 32-bit range either side of it.
        let base = *self.base.get_or_insert(expiry.saturating_sub(1 << 31));
        expiry
            .checked_sub(base)
            .and_then(|r| u32::try_from(r).ok())
            .filter(|&r| r != EMPTY)
    }

    /// Remembers `hash` with `expiry`, where `probe` (from [`KeyTable::probe`] for this hash,
    /// with no change to the table since) found it or its place.
    pub fn set(&mut self, probe: Probe, hash: u64, expiry: i64) {
        let rel = self.rel(expiry);
        match (probe, rel) {
            (Probe::Found { segment, slot, .. }, Some(rel)) => {
                self.segments[segment].slots[slot].rel = rel;
            }
            (Probe::Found { segment, slot, .. }, None) => {
                self.segments[segment].remove_at(slot);
                self.len -= 1;
                self.outliers.insert(hash, expiry);
            }
            (Probe::Outlier { .. }, Some(_)) => {
                self.outliers.remove(&hash);
                self.insert_new(hash, expiry);
            }
            (Probe::Outlier { .. } | Probe::Absent { .. }, None) => {
                self.outliers.insert(hash, expiry);
            }
            (Probe::Absent { segment, slot }, Some(rel)) => {
                if self.segments[segment].insert_at(slot, Slot::new(hash, rel)) {
                    self.len += 1;
                } else {
                    self.insert_new(hash, expiry);
                }
            }
        }
    }

    /// Remembers `hash` (not remembered yet) with `expiry`.
    fn insert_new(&mut self, hash: u64, expiry: i64) {
        let Some(rel) = self.rel(expiry) else {
            self.outliers.insert(hash, expiry);
            return;
        };
        let segment = &mut self.segments[Self::segment_of(hash)];
        loop {
            match segment.find(hash) {
                Ok(at) => {
                    segment.slots[at].rel = rel;
                    return;
                }
                Err(at) => {
                    if segment.insert_at(at, Slot::new(hash, rel)) {
                        self.len += 1;
                        return;
                    }
                    segment.grow(0);
                }
            }
        }
    }

    /// Remembers `hash` with `expiry` (replacing the one it had).
    pub fn insert(&mut self, hash: u64, expiry: i64) {
        let probe = self.probe(hash);
        self.set(probe, hash, expiry);
    }

    /// Forgets every key that expires before `end`, and moves the base up to `end` (if below).
    pub fn forget_before(&mut self, end: i64) {
        self.outliers.retain(|_, e| *e >= end);
        let Some(base) = self.base else {
            return;
        };
        // Every kept key expires at or after both: its `rel` after the new base is no larger.
        let new_base = base.max(end);
        let (cut, shift) = (end.saturating_sub(base), new_base - base);
        self.len = 0;
        for segment in &mut self.segments {
            segment.retain(|slot| {
                // `rel` is at most u32::MAX - 1: the key's expiry is before `end` when `rel` is.
                (i64::from(slot.rel) >= cut).then(|| (i64::from(slot.rel) - shift) as u32)
            });
            self.len += segment.len;
        }
        self.base = Some(new_base);
        // Outliers that fit now go back to the segments.
        let fit: Vec<(u64, i64)> = self
            .outliers
            .iter()
            .filter(|&(_, &e)| {
                e.checked_sub(new_base)
                    .is_some_and(|r| (0..i64::from(EMPTY)).contains(&r))
            })
            .map(|(&h, &e)| (h, e))
            .collect();
        for (hash, expiry) in fit {
            self.outliers.remove(&hash);
            self.insert_new(hash, expiry);
        }
    }

    /// Makes room for `additional` more keys (spread over the segments as hashes are).
    pub fn reserve(&mut self, additional: usize) {
        // A tenth over the average: segments get more or fewer keys than the average.
        let per_segment = ((self.len + additional) * 11 / 10).div_ceil(SEGMENTS);
        for segment in &mut self.segments {
            if segment.slots.len() * MAX_LOAD.0 / MAX_LOAD.1 < per_segment {
                segment.grow(per_segment);
            }
        }
    }

    /// Forgets every key and gives the memory back.
    pub fn clear(&mut self) {
        *self = KeyTable::default();
    }

    /// Every key with its expiry, segment keys in hash order, then the outliers.
    pub fn iter(&self) -> impl Iterator<Item = (u64, i64)> + '_ {
        self.segments
            .iter()
            .flat_map(|s| s.slots.iter())
            .filter(|s| !s.is_empty())
            .map(|&s| (s.hash(), self.expiry_of(s)))
            .chain(self.outliers.iter().map(|(&h, &e)| (h, e)))
    }

    /// Bytes held by the segments' slots (for tests of the memory bound).
    #[cfg(test)]
    pub fn slot_bytes(&self) -> usize {
        self.segments
            .iter()
            .map(|s| s.slots.capacity() * std::mem::size_of::<Slot>())
            .sum()
    }

    /// Checks every segment's order and gaps (tests).
    #[cfg(test)]
    pub fn check(&self) {
        let mut len = 0;
        for (n, segment) in self.segments.iter().enumerate() {
            let mut previous: Option<u64> = None;
            for (i, slot) in segment.slots.iter().enumerate() {
                if slot.is_empty() {
                    continue;
                }
                len += 1;
                let h = slot.hash();
                assert_eq!(Self::segment_of(h), n, "key in the wrong segment");
                assert!(previous.is_none_or(|p| p < h), "keys out of order");
                let home = segment.home(h);
                assert!(home <= i, "key before its home");
                assert!(
                    segment.slots[home..i].iter().all(|s| !s.is_empty()),
                    "gap between a key and its home"
                );
                previous = Some(h);
            }
            assert_eq!(
                segment.len,
                segment.slots.iter().filter(|s| !s.is_empty()).count()
            );
        }
        assert_eq!(len, self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: hashes for the tests, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn the_table_agrees_with_a_hash_map_through_inserts_updates_sweeps_and_outliers() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut table = KeyTable::default();
        let mut model: HashMap<u64, i64> = HashMap::new();
        let t0 = 1_762_956_000_000i64;
        let mut keys = Vec::new();
        for round in 0..40i64 {
            for _ in 0..5_000 {
                // Mostly new keys; some again (updates); a few with expiries far from the rest
                // (outliers), and some with small hashes clustering in segment 0.
                let r = rng.next();
                let hash = match r % 10 {
                    0 if !keys.is_empty() => keys[(rng.next() % keys.len() as u64) as usize],
                    1 => rng.next() >> 40,
                    _ => rng.next(),
                };
                let expiry = match r % 97 {
                    0 => t0 + 90 * 86_400_000 + (rng.next() % 1000) as i64,
                    1 => i64::MIN + (rng.next() % 1000) as i64,
                    _ => t0 + round * 60_000 + (rng.next() % 600_000) as i64,
                };
                let probe = table.probe(hash);
                assert_eq!(probe.expiry(), model.get(&hash).copied(), "round {round}");
                table.set(probe, hash, expiry);
                model.insert(hash, expiry);
                keys.push(hash);
            }
            if round % 3 == 2 {
                let end = t0 + (round - 1) * 60_000;
                table.forget_before(end);
                model.retain(|_, e| *e >= end);
            }
            table.check();
            assert_eq!(table.len(), model.len(), "round {round}");
            for (h, e) in &model {
                assert_eq!(table.get(*h), Some(*e));
            }
            let mut listed: Vec<(u64, i64)> = table.iter().collect();
            listed.sort_unstable();
            let mut expected: Vec<(u64, i64)> = model.iter().map(|(&h, &e)| (h, e)).collect();
            expected.sort_unstable();
            assert_eq!(listed, expected, "round {round}");
        }
        assert!(!table.outliers.is_empty(), "the test made no outliers");
    }

    #[test]
    fn a_million_keys_take_at_most_16_bytes_each() {
        let mut rng = Rng(7);
        let mut table = KeyTable::default();
        let t0 = 1_762_956_000_000i64;
        for i in 0..1_000_000i64 {
            table.insert(rng.next(), t0 + i);
            if i % 99_991 == 0 {
                let per_key = table.slot_bytes() as f64 / (i + 1) as f64;
                assert!(
                    i < 100_000 || per_key <= 16.0,
                    "{per_key:.1} bytes a key at {i}"
                );
            }
        }
        table.check();
        assert_eq!(table.len(), 1_000_000);
    }

    #[test]
    fn a_base_that_moves_keeps_every_expiry_exact() {
        let mut rng = Rng(99);
        let mut table = KeyTable::default();
        let mut model: HashMap<u64, i64> = HashMap::new();
        let day = 86_400_000i64;
        // Ninety days of keys, each kept two days: the base must move for them to fit 32 bits.
        for d in 0..90i64 {
            for _ in 0..100 {
                let (hash, expiry) = (rng.next(), d * day + 2 * day + (rng.next() % 1000) as i64);
                table.insert(hash, expiry);
                model.insert(hash, expiry);
            }
            table.forget_before(d * day);
            model.retain(|_, e| *e >= d * day);
            table.check();
        }
        assert!(table.outliers.is_empty(), "keys left in the outliers");
        let mut listed: Vec<(u64, i64)> = table.iter().collect();
        listed.sort_unstable();
        let mut expected: Vec<(u64, i64)> = model.into_iter().collect();
        expected.sort_unstable();
        assert_eq!(listed.len(), 300);
        assert_eq!(listed, expected);
    }
}

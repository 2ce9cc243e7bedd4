//! Decode speed: seconds per million ticks shaped as the generator writes them (RFC 3339 `ts`
//! with milliseconds, `ts_epoch_ms`), in 16,384-record batches, through the decoder the engine
//! uses and through arrow's JSON reader alone.
//!
//! `cargo run --release -p flowgate --example decode_bench [TICKS] [fast|arrow]` (default
//! 1,000,000 ticks, both decoders).

use std::time::Instant;

use flowgate::decode::{JsonDecoder, SchemaSpec, to_schema};

const BATCH: usize = 16_384;

fn main() -> anyhow::Result<()> {
    let ticks: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 1_000_000,
    };
    let spec: SchemaSpec = flowgate::yaml::from_str(
        "symbol: utf8\nprice: float64\nvolume: int64\nts: timestamp\nts_epoch_ms: int64\n",
        "decode_bench",
    )?;
    let schema = to_schema(&spec);
    let t0: i64 = 1_762_956_000_000;
    let records: Vec<String> = (0..ticks)
        .map(|i| {
            let ms = t0 + i as i64 * 3;
            let ts = chrono::DateTime::from_timestamp_millis(ms)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            format!(
                r#"{{"symbol":"S{:03}","price":{},"volume":{},"ts":"{ts}","ts_epoch_ms":{ms}}}"#,
                i % 500,
                (10_000 + (i * 7919) % 90_000) as f64 / 100.0,
                1 + (i * 31) % 999
            )
        })
        .collect();
    let slices: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
    let bytes: usize = records.iter().map(String::len).sum();
    println!(
        "{ticks} ticks, {:.1} bytes each, {BATCH}-record batches",
        bytes as f64 / ticks as f64
    );
    let only = std::env::args().nth(2);
    for (name, decoder) in [
        ("fast", JsonDecoder::new(schema.clone())),
        ("arrow", JsonDecoder::general_only(schema.clone())),
    ] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let mut best = f64::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            let mut rows = 0;
            for chunk in slices.chunks(BATCH) {
                let (batch, failures) = decoder.decode(chunk);
                anyhow::ensure!(failures.is_empty(), "{failures:?}");
                rows += batch.num_rows();
            }
            anyhow::ensure!(rows == ticks);
            best = best.min(started.elapsed().as_secs_f64());
        }
        println!(
            "{:>22}: {:.3} s per million ticks (best of 3)",
            if name == "fast" {
                "flowgate (fast path)"
            } else {
                "arrow-json alone"
            },
            best * 1e6 / ticks as f64
        );
    }
    Ok(())
}

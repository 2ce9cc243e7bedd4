//! What an epoch barrier costs per partition: the time to take `window`'s and `dedup`'s state
//! (a whole snapshot, and dedup's delta) at the size one partition of the latency benchmark holds
//! (`bench/run.py --only latency`: 10,000 symbols over 3 partitions at 200,000 ticks/s, a 5 s
//! checkpoint interval), through the WASM host and natively, and the time to restore it.
//!
//! `make plugins && cargo run -p flowgate --example snapshot_bench`
//! (`FLOWGATE_PLUGIN_DIR`: other builds of the plugins; `SYMBOLS=N`, `TICKS=N`: other sizes).
//! The whole dedup state is taken after the deltas' epochs: it holds all their keys.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use flowgate::plugin::{Compile, Grants, HostConfig, PluginHost, Step};

const ROWS: usize = 4096;
const T0: i64 = 1_762_956_000_000;
/// Takes of each state; the median is printed.
const TAKES: usize = 15;
/// Epochs of dedup deltas; the median is printed.
const DELTAS: usize = 5;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `n` batches of ticks over `symbols` symbols, event time advancing 1 ms per tick from `from`
/// within one minute (so `window` holds one open window per symbol).
fn ticks(schema: &SchemaRef, symbols: usize, from: i64, n: usize) -> Vec<RecordBatch> {
    let names: Vec<String> = (0..symbols).map(|i| format!("S{i:05}")).collect();
    (0..n)
        .map(|b| {
            let at = |i: usize| b * ROWS + i;
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from_iter_values(
                        (0..ROWS).map(|i| names[at(i) % symbols].as_str()),
                    )),
                    Arc::new(Float64Array::from_iter_values(
                        (0..ROWS).map(|i| 100.0 + (at(i) % 97) as f64 * 0.25),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        (0..ROWS).map(|i| (at(i) % 500) as i64 + 1),
                    )),
                    Arc::new(
                        TimestampMillisecondArray::from_iter_values(
                            (0..ROWS).map(|i| from + (at(i) as i64 % 50_000)),
                        )
                        .with_timezone("UTC"),
                    ),
                ],
            )
            .expect("ticks")
        })
        .collect()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:>8.2} ms", d.as_secs_f64() * 1e3)
}

/// Times `TAKES` whole snapshots of `step` and one restore of the last into `fresh`.
fn whole(step: &mut Step, fresh: &mut Step) -> (usize, Duration, Duration) {
    let mut times = Vec::new();
    let mut state = Vec::new();
    for _ in 0..TAKES {
        let start = Instant::now();
        state = step.snapshot().expect("snapshot");
        times.push(start.elapsed());
    }
    let start = Instant::now();
    fresh.restore(&state).expect("restore");
    (state.len(), median(times), start.elapsed())
}

fn main() {
    let symbols = env("SYMBOLS", 3_334);
    // One partition's ticks in one 5 s epoch at 200,000 ticks/s over 3 partitions.
    let epoch_ticks = env("TICKS", 333_333);
    let dir = std::env::var_os("FLOWGATE_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/wasm32-wasip2/plugin"));
    let cache = std::env::temp_dir().join("flowgate-snapshot-bench-cache");
    let config = || HostConfig {
        cache_dir: Some(cache.clone()),
        call_timeout: Duration::from_secs(60),
        memory_limit: 1 << 30,
        compile: Compile::Optimized,
    };
    let host = PluginHost::new(config()).expect("host");
    // The same plugins linked into the host (`link_native`), as the benchmark's `--native` runs.
    let mut native_host = PluginHost::new(config()).expect("host");
    native_host.link_native(
        "window",
        Arc::new(|c: &str, s: &SchemaRef| flowgate_sdk::create::<flowgate_window::Window>(c, s)),
    );
    native_host.link_native(
        "dedup",
        Arc::new(|c: &str, s: &SchemaRef| flowgate_sdk::create::<flowgate_dedup::Dedup>(c, s)),
    );
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("symbol", DataType::Utf8, false),
        Field::new("price", DataType::Float64, false),
        Field::new("volume", DataType::Int64, false),
        Field::new("ts", ts, false),
    ]));
    let yaml = |p: &str| {
        let text = std::fs::read_to_string(p).expect("step config");
        flowgate::yaml::to_json(&text, p).expect("yaml").to_string()
    };
    let batches = ticks(&schema, symbols, T0, epoch_ticks.div_ceil(ROWS));
    println!(
        "{symbols} symbols, {} ticks an epoch; median of {TAKES} takes",
        batches.len() * ROWS
    );
    println!(
        "{:<26} {:>12} {:>11} {:>11}",
        "state", "bytes", "take", "restore"
    );
    for name in ["window", "dedup"] {
        let cfg = yaml(&format!("pipelines/steps/{name}.yaml"));
        let path = dir.join(format!("flowgate_{name}.wasm"));
        for (kind, host) in [("wasm", &host), ("native", &native_host)] {
            let plugin = host.load(&path).expect("load");
            let step = || {
                plugin
                    .instantiate(name, &cfg, &schema, Grants::default())
                    .expect("create")
            };
            let (mut step, mut fresh) = (step(), step());
            // Deltas start from here.
            step.snapshot_delta().expect("delta");
            for b in &batches {
                step.process(b).expect("process");
            }
            if name == "dedup" {
                // Epoch after epoch of new keys (a minute of event time later each): the
                // median delta, in memory that earlier deltas used, as in a long run.
                let mut times = Vec::new();
                let mut bytes = 0;
                for epoch in 1..=DELTAS {
                    let start = Instant::now();
                    let delta = step.snapshot_delta().expect("delta");
                    times.push(start.elapsed());
                    bytes = delta.map_or(0, |d| d.len());
                    let from = T0 + epoch as i64 * 60_000;
                    for b in ticks(&schema, symbols, from, batches.len()) {
                        step.process(&b).expect("process");
                    }
                }
                println!(
                    "{:<26} {bytes:>12} {} {:>11}",
                    format!("{name} delta ({kind})"),
                    ms(median(times)),
                    "–"
                );
            }
            let (bytes, took, restore) = whole(&mut step, &mut fresh);
            println!(
                "{:<26} {bytes:>12} {} {}",
                format!("{name} whole ({kind})"),
                ms(took),
                ms(restore)
            );
        }
    }
}

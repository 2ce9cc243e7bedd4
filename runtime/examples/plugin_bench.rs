//! Quick plugin measurements: load time cold and cached, and rows/s of each stock plugin on
//! 8,192-row batches, through the WASM host and natively.
//!
//! `make plugins && cargo run -p flowgate --example plugin_bench` (`FLOWGATE_BENCH_ONLY=dedup`:
//! one plugin; `FLOWGATE_PLUGIN_DIR`: other builds of the plugins; `FLOWGATE_BENCH_ROUNDS=20`:
//! the batches 20 times over, so that a profile is mostly the calls, not the compile;
//! `FLOWGATE_WASM_PROFILER=perfmap` under `perf record`: the plugins' functions by name, with
//! plugins built unstripped, `--config profile.plugin.strip=false`)
//! (the full benchmark is a later issue; this is the plugin core's quick check).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    Float64Array, Int64Array, StringArray, TimestampMicrosecondArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use flowgate::plugin::{Compile, Grants, HostConfig, PluginHost};

const ROWS: usize = 8192;

/// Makes input batch `n` for a schema.
type MakeBatch = fn(&SchemaRef, i64) -> RecordBatch;
const BATCHES: i64 = 200;
const T0: i64 = 1_762_956_000_000;

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// Batch `n` of ticks as the decoder makes them (timestamps in microseconds): 100 symbols, event
/// time moving 8.192 s per batch, every row a new key.
fn ticks(schema: &SchemaRef, n: i64) -> RecordBatch {
    let symbols: Vec<String> = (0..ROWS).map(|i| format!("S{:03}", i % 100)).collect();
    let prices: Vec<f64> = (0..ROWS).map(|i| 100.0 + (i % 97) as f64 * 0.25).collect();
    let volumes: Vec<i64> = (0..ROWS).map(|i| (i % 500) as i64 + 1).collect();
    let ts: Vec<i64> = (0..ROWS)
        .map(|i| (T0 + n * ROWS as i64 + i as i64) * 1000 + (i as i64 * 7919) % 1000)
        .collect();
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(symbols)),
            Arc::new(Float64Array::from(prices)),
            Arc::new(Int64Array::from(volumes)),
            Arc::new(TimestampMicrosecondArray::from(ts).with_timezone("UTC")),
        ],
    )
    .expect("ticks")
}

/// Batch `n` of bars: 8,192 symbols, one bar each per batch.
fn bars(schema: &SchemaRef, n: i64) -> RecordBatch {
    let symbols: Vec<String> = (0..ROWS).map(|i| format!("S{i:04}")).collect();
    let starts: Vec<i64> = vec![T0 + n * 60_000; ROWS];
    let closes: Vec<f64> = (0..ROWS)
        .map(|i| 100.0 + ((i as i64 + n) % 13) as f64)
        .collect();
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(symbols)),
            Arc::new(TimestampMillisecondArray::from(starts).with_timezone("UTC")),
            Arc::new(Float64Array::from(closes)),
        ],
    )
    .expect("bars")
}

fn rate(rounds: usize, elapsed: Duration) -> String {
    format!(
        "{:>7.2} M rows/s",
        (rounds as f64 * BATCHES as f64 * ROWS as f64) / elapsed.as_secs_f64() / 1e6
    )
}

fn main() {
    let dir = std::env::var_os("FLOWGATE_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/wasm32-wasip2/plugin"));
    let cache = tempfile::tempdir().expect("tmp");
    let tick_schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("symbol", DataType::Utf8, false),
        Field::new("price", DataType::Float64, false),
        Field::new("volume", DataType::Int64, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]));
    let bar_schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("symbol", DataType::Utf8, false),
        Field::new("window_start", ts_type(), false),
        Field::new("close", DataType::Float64, false),
    ]));
    let read = |p: &str| std::fs::read_to_string(p).expect("step config");
    let yaml = |p: &str| {
        flowgate::yaml::to_json(&read(p), p)
            .expect("yaml")
            .to_string()
    };
    let cases: Vec<(&str, String, &SchemaRef, MakeBatch)> = vec![
        (
            "validate",
            yaml("pipelines/steps/validate.yaml"),
            &tick_schema,
            ticks,
        ),
        (
            "dedup",
            yaml("pipelines/steps/dedup.yaml"),
            &tick_schema,
            ticks,
        ),
        (
            "window",
            yaml("pipelines/steps/window.yaml"),
            &tick_schema,
            ticks,
        ),
        (
            "pct_change",
            yaml("pipelines/steps/pct_change.yaml"),
            &bar_schema,
            bars,
        ),
    ];
    let config = |cache_dir| HostConfig {
        cache_dir,
        call_timeout: Duration::from_secs(30),
        memory_limit: 1 << 30,
        compile: Compile::Optimized,
    };
    println!(
        "{:<11} {:>10} {:>10} {:>18} {:>18} {:>7}",
        "plugin", "load cold", "load cached", "wasm", "native", "ratio"
    );
    let only = std::env::var("FLOWGATE_BENCH_ONLY").ok();
    let profiling = std::env::var_os("FLOWGATE_WASM_PROFILER").is_some();
    let rounds = match std::env::var("FLOWGATE_BENCH_ROUNDS") {
        Ok(n) => n
            .parse::<usize>()
            .expect("FLOWGATE_BENCH_ROUNDS: a whole number"),
        Err(_) => 1,
    };
    for (name, cfg, schema, make) in cases {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let path = dir.join(format!("flowgate_{name}.wasm"));
        let cold = PluginHost::new(config(Some(cache.path().to_path_buf())))
            .expect("host")
            .load(&path)
            .expect("load")
            .load_stats();
        // Profiled (`FLOWGATE_WASM_PROFILER=perfmap`): compiled anew, since `perf` names the
        // functions of compiled code in anonymous memory only, not of a cached file mapped in.
        let cached = (!profiling).then(|| cache.path().to_path_buf());
        let host = PluginHost::new(config(cached)).expect("host");
        let plugin = host.load(&path).expect("load");
        assert!(plugin.load_stats().cache_hit || profiling);
        let inputs: Vec<RecordBatch> = (0..BATCHES).map(|n| make(schema, n)).collect();

        let mut step = plugin
            .instantiate(name, &cfg, schema, Grants::default())
            .expect("create");
        let start = Instant::now();
        for b in std::iter::repeat_n(&inputs, rounds).flatten() {
            step.process(b).expect("process");
        }
        let wasm = start.elapsed();

        let (mut native, _) = match name {
            "validate" => flowgate_sdk::create::<flowgate_validate::Validate>(&cfg, schema),
            "dedup" => flowgate_sdk::create::<flowgate_dedup::Dedup>(&cfg, schema),
            "window" => flowgate_sdk::create::<flowgate_window::Window>(&cfg, schema),
            _ => flowgate_sdk::create::<flowgate_pct_change::PctChange>(&cfg, schema),
        }
        .expect("native create");
        let start = Instant::now();
        for b in std::iter::repeat_n(&inputs, rounds).flatten() {
            native.process(b.clone()).expect("process");
        }
        let native_time = start.elapsed();
        println!(
            "{name:<11} {:>10.1?} {:>10.1?} {:>18} {:>18} {:>6.0}%",
            cold.elapsed,
            plugin.load_stats().elapsed,
            rate(rounds, wasm),
            rate(rounds, native_time),
            100.0 * native_time.as_secs_f64() / wasm.as_secs_f64()
        );
    }
}

//! Plugins in other languages, measured (issue 20): for each build of the price filter and of the
//! stateful `ema` plugin, the component's size, its first load (compiled with Cranelift, no
//! cache) and a cached load, and rows per second through the WASM host on 16,384-row batches of
//! ticks (symbol, price, µs timestamp; a tenth of the rows below the filter's minimum, 1 in 200
//! without a price).
//!
//! `make plugins test-plugins js-test-plugins py-test-plugins && cargo run --release -p flowgate --example
//! language_bench` prints one JSON object per build (bench/run.py's `languages` section reads
//! them); `FLOWGATE_PLUGIN_DIR` points at other builds, `BATCHES` sets the batches per build.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Float64Array, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use flowgate::plugin::{Compile, Grants, HostConfig, PluginHost};

const ROWS: usize = 16_384;
const T0_US: i64 = 1_762_956_000_000_000;

fn ticks(schema: &SchemaRef, n: usize) -> RecordBatch {
    let symbols: Vec<String> = (0..ROWS)
        .map(|i| format!("S{:03}", (i * 7 + n) % 500))
        .collect();
    let prices: Vec<Option<f64>> = (0..ROWS)
        .map(|i| match (i % 200, i % 10) {
            (7, _) => None,
            (_, 3) => Some(5.0),
            _ => Some(100.0 + (i % 97) as f64 * 0.25),
        })
        .collect();
    let ts: Vec<i64> = (0..ROWS)
        .map(|i| T0_US + ((n * ROWS + i) as i64) * 1_001)
        .collect();
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(symbols)),
            Arc::new(Float64Array::from(prices)),
            Arc::new(TimestampMicrosecondArray::from(ts).with_timezone("UTC")),
        ],
    )
    .expect("ticks")
}

fn main() {
    let dir = std::env::var_os("FLOWGATE_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/wasm32-wasip2/plugin"));
    let batches: usize = std::env::var("BATCHES")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(40);
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("symbol", DataType::Utf8, true),
        Field::new("price", DataType::Float64, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
    ]));
    let filter_rust = r#"{"rules":{"price":{"min":10}}}"#;
    let filter = r#"{"column":"price","min":10}"#;
    let ema = r#"{"key":"symbol","column":"price","alpha":0.3}"#;
    // (what, language, file, config)
    let cases = [
        ("filter", "rust", "flowgate_validate.wasm", filter_rust),
        ("filter", "js", "flowgate_test_filter_js.wasm", filter),
        ("ema", "rust", "flowgate_test_ema.wasm", ema),
        ("filter", "python", "flowgate_test_filter_py.wasm", filter),
        ("ema", "js", "flowgate_test_ema_js.wasm", ema),
        ("ema", "python", "flowgate_test_ema_py.wasm", ema),
    ];
    let inputs: Vec<RecordBatch> = (0..batches).map(|n| ticks(&schema, n)).collect();
    let host_config = |cache_dir| HostConfig {
        cache_dir,
        call_timeout: Duration::from_secs(60),
        memory_limit: 1 << 30,
        compile: Compile::Optimized,
    };
    for (what, language, file, config) in cases {
        let path = dir.join(file);
        if !path.is_file() {
            eprintln!("{}: missing, skipped", path.display());
            continue;
        }
        let cache = tempfile::tempdir().expect("tmp");
        let started = Instant::now();
        let cold = PluginHost::new(host_config(Some(cache.path().to_path_buf())))
            .expect("host")
            .load(&path)
            .expect("load");
        let first_load = started.elapsed();
        drop(cold);
        let host = PluginHost::new(host_config(Some(cache.path().to_path_buf()))).expect("host");
        let started = Instant::now();
        let plugin = host.load(&path).expect("load");
        let cached_load = started.elapsed();
        let started = Instant::now();
        let mut step = plugin
            .instantiate(what, config, &schema, Grants::default())
            .expect("create");
        let create = started.elapsed();
        // One batch to warm up (first calls fault in the instance's memory).
        step.process(&inputs[0]).expect("process");
        let started = Instant::now();
        let mut rows_out = 0;
        let mut rejected = 0;
        for batch in &inputs {
            let out = step.process(batch).expect("process");
            rows_out += out.batches.iter().map(RecordBatch::num_rows).sum::<usize>();
            rejected += out.rejected.len();
        }
        let elapsed = started.elapsed();
        let rows = batches * ROWS;
        println!(
            "{}",
            serde_json::json!({
                "plugin": what,
                "language": language,
                "file": file,
                "bytes": std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
                "first_load_s": first_load.as_secs_f64(),
                "cached_load_s": cached_load.as_secs_f64(),
                "create_s": create.as_secs_f64(),
                "batch_rows": ROWS,
                "rows": rows,
                "rows_out": rows_out,
                "rejected": rejected,
                "seconds": elapsed.as_secs_f64(),
                "rows_per_s": rows as f64 / elapsed.as_secs_f64(),
            })
        );
    }
}

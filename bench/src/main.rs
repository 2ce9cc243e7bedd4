//! `flowgate-bench`: the Rust half of the benchmark (`make bench` runs `bench/run.py`, which
//! drives this binary, the `flowgate` binary, the Tansu broker and PySpark).
//!
//! - `run`: `flowgate run`, with `--native` linking the four stock plugins into the process as
//!   native code instead of their `.wasm` (the WASM-overhead comparison; not a user option).
//! - `consume`: the consume-only ceiling: an rdkafka consumer with Flowgate's own settings reading
//!   a topic and doing nothing with the records.
//! - `state`: bytes of WASM linear memory held by `dedup` per million distinct keys, and by
//!   `window` for 10,000 symbols.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::{Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use clap::{Parser, Subcommand};
use flowgate::cli::{parse_duration, parse_var};
use flowgate::config::{Brokers, KafkaSpec, Pipeline, StartFrom};
use flowgate::plugin::{Grants, HostConfig, NativeFactory, PluginHost};
use flowgate::source::KafkaSource;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;

/// The benchmark's Rust side (see bench/README in BENCHMARKS.md).
#[derive(Debug, Parser)]
#[command(name = "flowgate-bench", about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline like `flowgate run`, optionally with the stock plugins linked natively.
    Run {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Run validate, dedup, window and pct_change as native code instead of WebAssembly.
        #[arg(long)]
        native: bool,
        /// Set a `${VAR}` used in the pipeline file.
        #[arg(long = "set", value_name = "VAR=VALUE", value_parser = parse_var)]
        vars: Vec<(String, String)>,
        /// Stop after this many input records.
        #[arg(long)]
        max_records: Option<u64>,
        /// Stop once no record arrived for this long (e.g. `10s`).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        until_idle: Option<Duration>,
        /// Write the run report (JSON) here.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Read `count` records of a topic from the earliest offset with Flowgate's consumer
    /// settings, doing nothing with them; print records/s as JSON.
    Consume {
        /// Bootstrap servers.
        #[arg(long)]
        brokers: String,
        /// The topic.
        #[arg(long)]
        topic: String,
        /// Stop after this many records.
        #[arg(long)]
        count: u64,
        /// Consumer group (a fresh one starts from the earliest offset).
        #[arg(long, default_value = "flowgate-bench-consume")]
        group: String,
        /// Extra librdkafka settings, `key=value`, as a pipeline's `options`.
        #[arg(long = "option", value_name = "KEY=VALUE", value_parser = parse_var)]
        options: Vec<(String, String)>,
    },
    /// Measure plugin state memory inside the WASM instances; print JSON.
    State {
        /// Folder holding flowgate_dedup.wasm and flowgate_window.wasm.
        #[arg(long)]
        plugin_dir: PathBuf,
        /// Distinct keys fed to dedup.
        #[arg(long, default_value_t = 1_000_000)]
        keys: usize,
        /// Symbols fed to window.
        #[arg(long, default_value_t = 10_000)]
        symbols: usize,
    },
}

fn main() -> ExitCode {
    flowgate::cli::init_logging(0);
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(flowgate::cli::exit_code(&e))
        }
    }
}

fn native<T: flowgate_sdk::Transform + 'static>() -> NativeFactory {
    Arc::new(|config: &str, input: &SchemaRef| flowgate_sdk::create::<T>(config, input))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            pipeline,
            native: linked,
            vars,
            max_records,
            until_idle,
            report,
        } => {
            let pipeline = Pipeline::load(&pipeline, &vars.into_iter().collect())?;
            let mut host = PluginHost::new(HostConfig::default())?;
            if linked {
                host.link_native("validate", native::<flowgate_validate::Validate>());
                host.link_native("dedup", native::<flowgate_dedup::Dedup>());
                host.link_native("window", native::<flowgate_window::Window>());
                host.link_native("pct_change", native::<flowgate_pct_change::PctChange>());
            }
            let options = flowgate::engine::RunOptions {
                max_records,
                until_idle,
                reset_state: false,
                reload: None,
            };
            flowgate::cli::run_pipeline(&pipeline, &host, &options, report.as_deref())
        }
        Command::Consume {
            brokers,
            topic,
            count,
            group,
            options,
        } => {
            let spec = KafkaSpec {
                brokers: Brokers::One(brokers.clone()),
                topic: Some(topic.clone()),
                topics: None,
                group,
                start: StartFrom::Earliest,
                options: options.into_iter().collect(),
                connect_timeout: flowgate_sdk::config::Duration::from_millis(30_000),
                keyless: Default::default(),
            };
            let consumer: BaseConsumer = KafkaSource::client_config(&spec, &brokers)
                .create()
                .context("creating the consumer")?;
            consumer.subscribe(&[&topic]).context("subscribing")?;
            let (mut records, mut bytes) = (0u64, 0u64);
            let mut first: Option<Instant> = None;
            let started = Instant::now();
            while records < count {
                if started.elapsed() > Duration::from_secs(600) {
                    anyhow::bail!("consumed only {records} of {count} records in 10 minutes");
                }
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        first.get_or_insert_with(Instant::now);
                        records += 1;
                        bytes += m.payload_len() as u64;
                    }
                    Some(Err(e)) => anyhow::bail!("consuming `{topic}`: {e}"),
                    None => {}
                }
            }
            let since_first = first.map_or(Duration::ZERO, |f| f.elapsed());
            println!(
                "{}",
                json!({
                    "records": records,
                    "bytes": bytes,
                    "wall_seconds": started.elapsed().as_secs_f64(),
                    "seconds_from_first_record": since_first.as_secs_f64(),
                    "records_per_second": records as f64 / since_first.as_secs_f64().max(1e-9),
                })
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::State {
            plugin_dir,
            keys,
            symbols,
        } => {
            let host = PluginHost::new(HostConfig {
                memory_limit: 4 << 30,
                ..HostConfig::default()
            })?;
            let spread = dedup_memory(&host, &plugin_dir, keys, true)?;
            let one_bucket = dedup_memory(&host, &plugin_dir, keys, false)?;
            let window = window_memory(&host, &plugin_dir, symbols)?;
            println!(
                "{}",
                json!({ "dedup": spread, "dedup_one_bucket": one_bucket, "window": window })
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

const ROWS: usize = 8192;
const T0: i64 = 1_762_956_000_000;

fn tick_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("symbol", DataType::Utf8, true),
        Field::new("price", DataType::Float64, true),
        Field::new("volume", DataType::Int64, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
        Field::new("ts_epoch_ms", DataType::Int64, true),
    ]))
}

/// Ticks `from..to` of a sequence in which tick `i` is symbol `i % symbols` at `T0 + i /
/// symbols` ms: every (symbol, ts) pair distinct.
fn ticks(
    schema: &SchemaRef,
    from: usize,
    to: usize,
    symbols: usize,
) -> anyhow::Result<RecordBatch> {
    let ts: Vec<i64> = (from..to).map(|i| T0 + (i / symbols) as i64).collect();
    Ok(RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(
                (from..to).map(|i| format!("S{:05}", i % symbols)),
            )),
            Arc::new(Float64Array::from_iter_values(
                (from..to).map(|i| 100.0 + (i % 97) as f64 * 0.25),
            )),
            Arc::new(Int64Array::from_iter_values(
                (from..to).map(|i| (i % 500) as i64 + 1),
            )),
            Arc::new(TimestampMillisecondArray::from(ts.clone()).with_timezone("UTC")),
            Arc::new(Int64Array::from(ts)),
        ],
    )?)
}

/// Feeds `keys` distinct (symbol, ts) keys to a dedup step configured as in
/// pipelines/stocks.yaml (10-minute retention) and reports the growth of its linear memory, and
/// its snapshot size. `spread`: the keys' event times spread evenly over the retention, as in a
/// steady stream (the keys fall into all of dedup's expiry buckets); otherwise all within one
/// second (one bucket: the worst case for the hash table's growth).
fn dedup_memory(
    host: &PluginHost,
    dir: &std::path::Path,
    keys: usize,
    spread: bool,
) -> anyhow::Result<serde_json::Value> {
    let schema = tick_schema();
    let plugin = host.load(&dir.join("flowgate_dedup.wasm"))?;
    let config = r#"{"key": ["symbol", "ts"], "event_time": "ts", "retention": "10m"}"#;
    let mut step = plugin.instantiate("dedup", config, &schema, Grants::default())?;
    // Symbols per millisecond of event time: 1000 (one second for all keys) or spread over 10 min.
    let per_ms = if spread {
        keys.div_ceil(600_000).max(1)
    } else {
        1000
    };
    // One small batch first, so the baseline includes the plugin's working buffers.
    step.process(&ticks(&schema, 0, 1000, per_ms)?)?;
    let before = step.memory_bytes().unwrap_or(0);
    let mut fed = 1000;
    while fed < keys {
        let to = (fed + ROWS).min(keys);
        let out = step.process(&ticks(&schema, fed, to, per_ms)?)?;
        anyhow::ensure!(
            out.batches.iter().map(RecordBatch::num_rows).sum::<usize>() == to - fed,
            "dedup dropped distinct keys"
        );
        fed = to;
    }
    let after = step.memory_bytes().unwrap_or(0);
    let snapshot = step.snapshot()?.len();
    Ok(json!({
        "keys": keys,
        "event_time_spread": if spread { "10 minutes (the retention)" } else { "1 second" },
        "memory_before_bytes": before,
        "memory_after_bytes": after,
        "bytes_per_million_keys": (after - before) as f64 * 1e6 / (keys - 1000) as f64,
        "snapshot_bytes_per_million_keys": snapshot as f64 * 1e6 / keys as f64,
    }))
}

/// Opens one 1-minute window for each of `symbols` symbols with the stock bar aggregates, and
/// reports the growth of the instance's linear memory.
fn window_memory(
    host: &PluginHost,
    dir: &std::path::Path,
    symbols: usize,
) -> anyhow::Result<serde_json::Value> {
    let schema = tick_schema();
    let plugin = host.load(&dir.join("flowgate_window.wasm"))?;
    let config = r#"{"event_time": "ts", "size": "1m", "group_by": ["symbol"],
        "aggregates": {"open": {"first": "price"}, "high": {"max": "price"},
        "low": {"min": "price"}, "close": {"last": "price"}, "avg_price": {"avg": "price"},
        "volume": {"sum": "volume"}, "trades": {"count": "*"}}}"#;
    let mut step = plugin.instantiate("bars", config, &schema, Grants::default())?;
    step.process(&ticks(&schema, 0, 10, 10)?)?;
    let before = step.memory_bytes().unwrap_or(0);
    // Ten ticks per symbol, all inside the first minute.
    let rows = symbols * 10;
    let mut fed = 0;
    while fed < rows {
        let to = (fed + ROWS).min(rows);
        step.process(&ticks(&schema, fed, to, symbols)?)?;
        fed = to;
    }
    let after = step.memory_bytes().unwrap_or(0);
    let bars = step.on_watermark(T0 + 120_000)?;
    anyhow::ensure!(
        bars.batches
            .iter()
            .map(RecordBatch::num_rows)
            .sum::<usize>()
            == symbols,
        "window did not emit one bar per symbol"
    );
    Ok(json!({
        "symbols": symbols,
        "memory_before_bytes": before,
        "memory_after_bytes": after,
        "bytes": after - before,
        "bytes_per_symbol": (after - before) as f64 / symbols as f64,
    }))
}

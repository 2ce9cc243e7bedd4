//! `flowgate produce`: the seed tick producer (random-walk prices per symbol), with optional
//! duplicates, malformed and late records for testing, or a replay of a JSON-lines/CSV file.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use super::UsageError;

/// Arguments of `flowgate produce`.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Bootstrap servers, e.g. `localhost:9092`.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "localhost:9092")]
    brokers: String,
    /// Topic to produce to.
    #[arg(long, default_value = "ticks")]
    topic: String,
    /// Symbols to tick (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "AAPL,MSFT,NVDA,AMZN,GOOG,META,TSLA,AMD"
    )]
    symbols: Vec<String>,
    /// Tick this many generated symbols instead (`S00000`, `S00001`, ...).
    #[arg(long, value_name = "N", conflicts_with = "symbols")]
    symbol_count: Option<usize>,
    /// Write the records to this JSON-lines file instead of Kafka (same records, same seed).
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Records per second; 0 produces as fast as possible, with event time moving 1 ms per
    /// record and ending about now (a backlog spanning 1,000 s per million records).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Stop after this many records.
    #[arg(long, conflicts_with = "duration")]
    count: Option<u64>,
    /// Stop after this long (e.g. `30s`).
    #[arg(long, value_parser = super::parse_duration)]
    duration: Option<Duration>,
    /// Send records without a Kafka key, as most producers do (the default keys by symbol):
    /// the partitioner spreads a symbol's ticks over every partition.
    #[arg(long)]
    keyless: bool,
    /// Share of records sent twice (0–1).
    #[arg(long, default_value_t = 0.0)]
    duplicates: f64,
    /// Share of records sent truncated, as malformed JSON (0–1).
    #[arg(long, default_value_t = 0.0)]
    malformed: f64,
    /// Share of records stamped 2–10 minutes in the past (0–1).
    #[arg(long, default_value_t = 0.0)]
    late: f64,
    /// Replay this file instead (`.jsonl`: one JSON object per line; `.csv`: a header row).
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,
    /// How long the producer waits to fill a batch (librdkafka `linger.ms`); 0 sends at once,
    /// so a record's Kafka timestamp is close to its append time (for latency measurements).
    #[arg(long, default_value_t = 5, value_name = "MS")]
    linger_ms: u32,
    /// Random seed, for repeatable runs.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// Where records go.
enum Out {
    Kafka(ThreadedProducer<DefaultProducerContext>),
    File(std::io::BufWriter<std::fs::File>),
}

/// A small xorshift generator: repeatable, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn csv_to_json(header: &[String], line: &str) -> String {
    let mut object = serde_json::Map::new();
    for (name, value) in header.iter().zip(line.split(',')) {
        let value = value.trim();
        let json = value
            .parse::<i64>()
            .map(serde_json::Value::from)
            .or_else(|_| value.parse::<f64>().map(serde_json::Value::from))
            .unwrap_or_else(|_| serde_json::Value::from(value));
        object.insert(name.clone(), json);
    }
    serde_json::Value::Object(object).to_string()
}

/// Runs the producer.
pub fn run(args: ProduceArgs) -> anyhow::Result<ExitCode> {
    for (name, p) in [
        ("--duplicates", args.duplicates),
        ("--malformed", args.malformed),
        ("--late", args.late),
    ] {
        if !(0.0..=1.0).contains(&p) {
            return Err(UsageError(format!("{name} is a share between 0 and 1, got {p}")).into());
        }
    }
    let mut args = args;
    if let Some(n) = args.symbol_count {
        if n == 0 {
            return Err(UsageError("--symbol-count must be at least 1".into()).into());
        }
        args.symbols = (0..n).map(|i| format!("S{i:05}")).collect();
    }
    if args.symbols.is_empty() || args.symbols.iter().any(String::is_empty) {
        return Err(UsageError("--symbols needs at least one non-empty symbol".into()).into());
    }
    let mut out = match &args.output {
        Some(path) => Out::File(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create `{}`", path.display()))?,
        )),
        None => Out::Kafka(
            ClientConfig::new()
                .set("bootstrap.servers", &args.brokers)
                .set("linger.ms", args.linger_ms.to_string())
                .set("compression.type", "lz4")
                .create()
                .with_context(|| {
                    format!("cannot create a Kafka producer for `{}`", args.brokers)
                })?,
        ),
    };
    let mut rng = Rng(args.seed.max(1));
    let mut replay: Option<(Vec<String>, Box<dyn Iterator<Item = String>>)> = None;
    if let Some(path) = &args.from {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read `{}`", path.display()))?;
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        let header = if path.extension().is_some_and(|e| e == "csv") && !lines.is_empty() {
            lines
                .remove(0)
                .split(',')
                .map(|h| h.trim().to_string())
                .collect()
        } else {
            Vec::new()
        };
        replay = Some((header, Box::new(lines.into_iter())));
    }
    let mut prices: Vec<f64> = args
        .symbols
        .iter()
        .enumerate()
        .map(|(i, _)| 100.0 + 37.0 * i as f64)
        .collect();
    let started = Instant::now();
    // A backlog (`--rate 0 --count N`) ends about now: it starts N ms in the past.
    let first_ts = chrono::Utc::now()
        - chrono::Duration::milliseconds(if args.rate > 0.0 {
            0
        } else {
            args.count.unwrap_or(0) as i64
        });
    let mut last_log = Instant::now();
    let mut sent: u64 = 0;
    loop {
        if args.count.is_some_and(|c| sent >= c)
            || args.duration.is_some_and(|d| started.elapsed() >= d)
        {
            break;
        }
        let (key, mut payload) = match &mut replay {
            Some((header, lines)) => {
                let Some(line) = lines.next() else { break };
                let json = if header.is_empty() {
                    line
                } else {
                    csv_to_json(header, &line)
                };
                let key = serde_json::from_str::<serde_json::Value>(&json)
                    .ok()
                    .and_then(|v| v.get("symbol").and_then(|s| s.as_str()).map(str::to_string))
                    .unwrap_or_default();
                (key, json)
            }
            None => {
                let i = rng.below(args.symbols.len() as u64) as usize;
                let step = (rng.unit() - 0.5) * 0.004;
                prices[i] = (prices[i] * (1.0 + step)).max(0.01);
                // Real time, or with `--rate 0` (a backlog) a clock moving 1 ms per record.
                let mut ts = if args.rate > 0.0 {
                    chrono::Utc::now()
                } else {
                    first_ts + chrono::Duration::milliseconds(sent as i64)
                };
                if rng.unit() < args.late {
                    ts -= chrono::Duration::milliseconds(120_000 + rng.below(480_000) as i64);
                }
                let tick = serde_json::json!({
                    "symbol": args.symbols[i],
                    "price": (prices[i] * 100.0).round() / 100.0,
                    "volume": 1 + rng.below(1000),
                    "ts": ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, false),
                    "ts_epoch_ms": ts.timestamp_millis(),
                });
                (args.symbols[i].clone(), tick.to_string())
            }
        };
        if rng.unit() < args.malformed {
            payload.truncate(payload.len() / 2);
        }
        let copies = if rng.unit() < args.duplicates { 2 } else { 1 };
        for _ in 0..copies {
            if args.count.is_some_and(|c| sent >= c) {
                break;
            }
            match &mut out {
                Out::File(file) => {
                    writeln!(file, "{payload}").context("writing the output file")?;
                }
                Out::Kafka(producer) => {
                    let mut record = BaseRecord::to(&args.topic).payload(&payload);
                    if !args.keyless {
                        record = record.key(&key);
                    }
                    loop {
                        match producer.send(record) {
                            Ok(()) => break,
                            Err((e, back))
                                if e.rdkafka_error_code()
                                    == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                            {
                                record = back;
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            Err((e, _)) => {
                                return Err(anyhow::anyhow!(
                                    "producing to `{}` failed: {e}",
                                    args.topic
                                ));
                            }
                        }
                    }
                }
            }
            sent += 1;
        }
        if args.rate > 0.0 {
            let due = Duration::from_secs_f64(sent as f64 / args.rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            tracing::info!(
                "{sent} records sent ({:.0}/s)",
                sent as f64 / started.elapsed().as_secs_f64()
            );
            last_log = Instant::now();
        }
    }
    let target = match out {
        Out::File(mut file) => {
            file.flush().context("writing the output file")?;
            format!("`{}`", args.output.unwrap_or_default().display())
        }
        Out::Kafka(producer) => {
            producer
                .flush(Duration::from_secs(30))
                .context("flushing the producer")?;
            format!("`{}`", args.topic)
        }
    };
    tracing::info!(
        "done: {sent} records sent to {target} in {:.1?}",
        started.elapsed()
    );
    Ok(ExitCode::SUCCESS)
}

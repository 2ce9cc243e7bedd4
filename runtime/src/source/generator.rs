//! The embedded broker (librdkafka's mock cluster) and the tick generator that feeds it: the
//! demo runs with no Kafka and no Docker. The mock cluster keeps only recent messages in memory
//! and nothing after the process exits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer};

use super::SourceError;
use crate::config::GeneratorSpec;
use crate::polled_producer::PolledProducer;

/// An in-process Kafka cluster, alive as long as this value.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedBroker {
    /// Starts a one-broker mock cluster with `topic` of `partitions` partitions.
    pub fn start(topic: &str, partitions: i32) -> Result<Self, SourceError> {
        let cluster = MockCluster::new(1)
            .map_err(|e| SourceError::Io(format!("cannot start the embedded broker: {e}")))?;
        cluster.create_topic(topic, partitions, 1).map_err(|e| {
            SourceError::Io(format!(
                "cannot create topic `{topic}` on the embedded broker: {e}"
            ))
        })?;
        tracing::info!(
            bootstrap = %cluster.bootstrap_servers(),
            "started the embedded Kafka broker (librdkafka's mock cluster): it keeps recent messages in memory only, and nothing after this process exits"
        );
        Ok(EmbeddedBroker { cluster })
    }

    /// Creates another topic (the repartition hop's).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), SourceError> {
        self.cluster
            .create_topic(topic, partitions, 1)
            .map_err(|e| {
                SourceError::Io(format!(
                    "cannot create topic `{topic}` on the embedded broker: {e}"
                ))
            })
    }

    /// Its bootstrap servers.
    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}

/// What the generator paces itself by, shared with the run loop.
#[derive(Debug, Default)]
pub struct Pace {
    /// Records the pipeline has read.
    pub consumed: AtomicU64,
    /// Set once the pipeline's consumer has its partitions.
    pub reading: AtomicBool,
}

/// How far the generator may run ahead of the pipeline, in records (all partitions together).
pub const HEADROOM: u64 = 120_000;

/// Produces random-walk ticks (`symbol, price, volume, ts, ts_epoch_ms`) until stopped, or until
/// `count` are sent.
pub struct Generator {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Generator {
    /// Starts producing `spec.rate` ticks per second to `topic` on `bootstrap`. Event time starts
    /// now and runs `spec.speedup` times faster than the wall clock.
    ///
    /// It starts once `pace.reading` is set (the pipeline has its partitions), and stays at most
    /// [`HEADROOM`] records ahead of `pace.consumed`, because the embedded broker keeps only the
    /// newest 100k records per partition and a consumer that falls further behind skips records.
    pub fn start(
        spec: &GeneratorSpec,
        bootstrap: &str,
        topic: &str,
        pace: Arc<Pace>,
    ) -> Result<Self, SourceError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            // A record's Kafka timestamp is taken when it is handed to the producer: a short linger
            // keeps it close to the append time without a request per record.
            .set("linger.ms", "1");
        let producer = PolledProducer::new(
            &config,
            DefaultProducerContext,
            // Linux keeps 15 bytes of a thread's name: `flowgate-gen-pr`, apart from the
            // generator's own `flowgate-genera`.
            "flowgate-gen-producer",
        )
        .map_err(|e| SourceError::Io(format!("cannot create the generator's producer: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, spec, topic) = (stop.clone(), spec.clone(), topic.to_string());
        let thread = std::thread::Builder::new()
            .name("flowgate-generator".into())
            .spawn(move || generate(&producer, &spec, &topic, &flag, &pace))
            .map_err(|e| SourceError::Io(format!("cannot start the generator: {e}")))?;
        Ok(Generator {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes a tick into `out` (cleared first) as
/// `{"symbol":…,"price":…,"volume":…,"ts":"…","ts_epoch_ms":…}`, the text `serde_json::json!`
/// gives for it, without building a map per tick (that was most of the generator's CPU).
/// `symbol` is already JSON.
fn write_tick(
    out: &mut String,
    symbol: &str,
    price: f64,
    volume: u64,
    ts: chrono::DateTime<chrono::Utc>,
    ts_ms: i64,
) {
    use std::fmt::Write as _;
    out.clear();
    out.push_str("{\"symbol\":");
    out.push_str(symbol);
    out.push_str(",\"price\":");
    match serde_json::Number::from_f64(price) {
        Some(n) => {
            let _ = write!(out, "{n}");
        }
        None => out.push_str("null"),
    }
    let _ = write!(
        out,
        ",\"volume\":{volume},\"ts\":\"{}\",\"ts_epoch_ms\":{}}}",
        ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ts_ms
    );
}

fn generate(
    producer: &PolledProducer<DefaultProducerContext>,
    spec: &GeneratorSpec,
    topic: &str,
    stop: &AtomicBool,
    pace: &Pace,
) {
    while !pace.reading.load(Ordering::Relaxed) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut prices: Vec<f64> = (0..spec.symbols.len())
        .map(|i| 100.0 + 37.0 * i as f64)
        .collect();
    let start_ms = chrono::Utc::now().timestamp_millis();
    let started = Instant::now();
    let mut last_ts = vec![i64::MIN; spec.symbols.len()];
    // Each symbol as a JSON string, once; a tick is written into one reused buffer.
    let symbols_json: Vec<String> = spec
        .symbols
        .iter()
        .map(|s| serde_json::Value::from(s.as_str()).to_string())
        .collect();
    let mut tick = String::new();
    let rate = spec.rate.max(1.0);
    let mut sent: u64 = 0;
    let limit = spec.count.unwrap_or(u64::MAX);
    while !stop.load(Ordering::Relaxed) && sent < limit {
        if sent.saturating_sub(pace.consumed.load(Ordering::Relaxed)) >= HEADROOM {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let i = ((next() * spec.symbols.len() as f64) as usize)
            .min(spec.symbols.len().saturating_sub(1));
        prices[i] = (prices[i] * (1.0 + (next() - 0.5) * 0.004)).max(0.01);
        // Event time moves `1 / rate` s (times `speedup`) per tick, never falls behind the wall
        // clock (times `speedup`) when the generator waits for the pipeline, and moves at least
        // 1 ms per tick of one symbol, so (symbol, ts) stays unique in a burst.
        let t = (sent as f64 / rate).max(started.elapsed().as_secs_f64());
        let ts_ms = (start_ms + (t * 1000.0 * spec.speedup) as i64).max(last_ts[i] + 1);
        last_ts[i] = ts_ms;
        // Faults draw from the random sequence only when asked for, so a generator without
        // them sends the same ticks as before they existed.
        let faults = &spec.faults;
        // A late tick goes 2–10 minutes of event time back; it does not move `last_ts`.
        let ts_ms = if faults.late > 0.0 && next() < faults.late {
            ts_ms - 120_000 - (next() * 480_000.0) as i64
        } else {
            ts_ms
        };
        let ts = chrono::DateTime::from_timestamp_millis(ts_ms).unwrap_or_default();
        let price = (prices[i] * 100.0).round() / 100.0;
        let price = if faults.negative_price > 0.0 && next() < faults.negative_price {
            -price
        } else {
            price
        };
        write_tick(
            &mut tick,
            &symbols_json[i],
            price,
            1 + (next() * 999.0) as u64,
            ts,
            ts_ms,
        );
        if faults.malformed > 0.0 && next() < faults.malformed {
            let mut cut = tick.len() / 2;
            while !tick.is_char_boundary(cut) {
                cut -= 1;
            }
            tick.truncate(cut);
        }
        let copies = if faults.duplicates > 0.0 && next() < faults.duplicates {
            2
        } else {
            1
        };
        let mut copy = 0;
        while copy < copies && sent < limit {
            let record = BaseRecord::to(topic).key(&spec.symbols[i]).payload(&tick);
            if producer.send(record).is_err() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            sent += 1;
            copy += 1;
        }
        // Sleep only when a millisecond or more ahead: sleeping per record overshoots.
        let due = Duration::from_secs_f64(sent as f64 / rate);
        if let Some(wait) = due.checked_sub(started.elapsed())
            && wait >= Duration::from_millis(1)
        {
            std::thread::sleep(wait);
        }
    }
    let _ = producer.flush(Duration::from_secs(5));
    if sent >= limit {
        tracing::info!("the generator sent its {sent} ticks (`count`)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_is_written_as_serde_json_writes_it() {
        for (symbol, price, volume, ts_ms) in [
            ("AAPL", 187.25, 1u64, 1_733_500_000_123i64),
            ("BRK.B", 100.0, 999, 0),
            ("Q\"U\\OTE\u{e9}\n", 0.01, 500, -1),
            ("S00001", -12345.678, 42, 253_402_300_799_999),
            ("X", 1e21, 7, 1),
            ("Y", f64::NAN, 7, 1),
        ] {
            let ts = chrono::DateTime::from_timestamp_millis(ts_ms).unwrap();
            let expected = serde_json::json!({
                "symbol": symbol,
                "price": price,
                "volume": volume,
                "ts": ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "ts_epoch_ms": ts_ms,
            })
            .to_string();
            let mut out = String::from("left over");
            let json = serde_json::Value::from(symbol).to_string();
            write_tick(&mut out, &json, price, volume, ts, ts_ms);
            assert_eq!(out, expected);
        }
    }
}

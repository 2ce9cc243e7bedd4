use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::{Record, RevokeHook, Source, SourceError};
use crate::config::{KafkaSpec, StartFrom};
use crate::sink::Offsets;

/// Remembers revoked partitions for the run loop (rebalance callbacks run inside `poll`).
#[derive(Default)]
struct Context {
    revoked: Mutex<Vec<(String, i32)>>,
    assigned: Mutex<HashMap<(String, i32), Instant>>,
    lag: Mutex<HashMap<(String, i32), i64>>,
    hook: OnceLock<RevokeHook>,
}

impl ClientContext for Context {
    /// librdkafka's statistics (every 5 s): keep each partition's consumer lag.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        for (topic, t) in statistics.topics {
            for (partition, p) in t.partitions {
                if partition >= 0 && p.consumer_lag >= 0 {
                    lag.insert((topic.clone(), partition), p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                // Flush and commit before the partitions move, so their new owner starts where
                // this process stopped instead of redoing its uncommitted work.
                let gone: Vec<(String, i32)> = list
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                if let Some(hook) = self.hook.get()
                    && let Some(offsets) = hook(&gone)
                    && !offsets.is_empty()
                {
                    let mut tpl = TopicPartitionList::new();
                    for ((topic, partition), offset) in &offsets {
                        let _ =
                            tpl.add_partition_offset(topic, *partition, Offset::Offset(offset + 1));
                    }
                    if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                        tracing::warn!(
                            "committing offsets to Kafka on revoke failed (the sinks already hold them): {e}"
                        );
                    }
                }
                let mut revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
                let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                for e in list.elements() {
                    tracing::info!(
                        topic = e.topic(),
                        partition = e.partition(),
                        "partition revoked"
                    );
                    revoked.push((e.topic().to_string(), e.partition()));
                    assigned.remove(&(e.topic().to_string(), e.partition()));
                }
            }
            Rebalance::Assign(list) => {
                let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                for e in list.elements() {
                    tracing::info!(
                        topic = e.topic(),
                        partition = e.partition(),
                        "partition assigned"
                    );
                    assigned.insert((e.topic().to_string(), e.partition()), Instant::now());
                }
            }
            Rebalance::Error(e) => tracing::warn!("rebalance error: {e}"),
        }
    }
}

/// A Kafka consumer-group member (rdkafka). Offsets are committed to Kafka only after the sinks
/// committed the rows they cover; `enable.auto.commit` is off.
pub struct KafkaSource {
    consumer: BaseConsumer<Context>,
    topics: Vec<String>,
    ephemeral: bool,
}

impl KafkaSource {
    /// The consumer settings Flowgate uses for `spec` (the benchmark's consume-only run uses the
    /// same): manual offsets, start per `spec.start`, then the pipeline's `options`.
    pub fn client_config(spec: &KafkaSpec, bootstrap: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("group.id", &spec.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                if spec.start == StartFrom::Latest {
                    "latest"
                } else {
                    "earliest"
                },
            )
            .set("fetch.min.bytes", "1")
            // librdkafka stops fetching a partition once 100k records wait locally and then backs
            // off for a full second: a pipeline catching up on a backlog spent most of its time
            // waiting (bench: 122k → 435k events/s from Tansu). Prefetch by size instead, and
            // retry soon.
            .set("queued.min.messages", "1000000")
            .set("queued.max.messages.kbytes", "65536")
            .set("fetch.queue.backoff.ms", "10")
            // A broker may hold a fetch this long waiting for more data (Tansu holds it even when
            // data is there): 10 ms instead of 500 keeps latency low and the pipe full (bench:
            // 470k → 650k events/s from Tansu), for ~100 empty fetches/s on an idle topic.
            .set("fetch.wait.max.ms", "10")
            .set("enable.partition.eof", "false")
            .set("statistics.interval.ms", "5000");
        for (k, v) in &spec.options {
            config.set(k, v);
        }
        config
    }

    /// Joins `spec.group` on `bootstrap` and subscribes to the topics.
    pub fn open(spec: &KafkaSpec, bootstrap: &str) -> Result<Self, SourceError> {
        let topics: Vec<String> = spec
            .topics
            .clone()
            .or_else(|| spec.topic.clone().map(|t| vec![t]))
            .unwrap_or_default();
        let config = Self::client_config(spec, bootstrap);
        let consumer: BaseConsumer<Context> = config
            .create_with_context(Context::default())
            .map_err(|e| {
                SourceError::Io(format!(
                    "cannot create the Kafka consumer for `{bootstrap}`: {e}"
                ))
            })?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|e| SourceError::Io(format!("cannot subscribe to {names:?}: {e}")))?;
        tracing::info!(brokers = bootstrap, group = %spec.group, topics = ?names, "joined the consumer group");
        Ok(KafkaSource {
            consumer,
            topics,
            ephemeral: false,
        })
    }

    /// Marks the source as reading the embedded broker, whose offsets restart every run.
    pub fn ephemeral(mut self) -> Self {
        self.ephemeral = true;
        self
    }

    /// The topics subscribed to.
    pub fn topics(&self) -> &[String] {
        &self.topics
    }
}

impl Source for KafkaSource {
    fn poll(
        &mut self,
        max: usize,
        timeout: Duration,
        out: &mut Vec<Record>,
    ) -> Result<(), SourceError> {
        let mut wait = timeout;
        let mut topic_cache: Option<Arc<str>> = None;
        for _ in 0..max {
            match self.consumer.poll(wait) {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!("Kafka: {e}");
                    break;
                }
                Some(Ok(m)) => {
                    let topic = match &topic_cache {
                        Some(t) if &**t == m.topic() => t.clone(),
                        _ => {
                            let t: Arc<str> = m.topic().into();
                            topic_cache = Some(t.clone());
                            t
                        }
                    };
                    out.push(Record {
                        topic,
                        partition: m.partition(),
                        offset: m.offset(),
                        payload: m.payload().unwrap_or_default().to_vec(),
                        timestamp_ms: m.timestamp().to_millis(),
                    });
                }
            }
            wait = Duration::ZERO;
        }
        Ok(())
    }

    fn commit(&mut self, offsets: &Offsets) -> Result<(), SourceError> {
        let mut list = TopicPartitionList::new();
        for ((topic, partition), offset) in offsets {
            list.add_partition_offset(topic, *partition, Offset::Offset(offset + 1))
                .map_err(|e| SourceError::Io(e.to_string()))?;
        }
        if list.count() > 0
            && let Err(e) = self.consumer.commit(&list, CommitMode::Async)
        {
            // The sinks hold the truth; a failed Kafka commit only delays what lag tools show.
            tracing::warn!("committing offsets to Kafka failed (the sinks already hold them): {e}");
        }
        Ok(())
    }

    fn seek(&mut self, topic: &str, partition: i32, offset: i64) -> Result<(), SourceError> {
        self.consumer
            .seek(
                topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            )
            .map_err(|e| {
                SourceError::Io(format!("cannot seek {topic}/{partition} to {offset}: {e}"))
            })
    }

    fn ephemeral(&self) -> bool {
        self.ephemeral
    }

    fn on_revoke(&mut self, hook: RevokeHook) {
        let _ = self.consumer.context().hook.set(hook);
    }

    fn revoked(&mut self) -> Vec<(String, i32)> {
        std::mem::take(
            &mut *self
                .consumer
                .context()
                .revoked
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    fn lag(&self) -> Vec<((String, i32), i64)> {
        let assigned = self
            .consumer
            .context()
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let lag = self
            .consumer
            .context()
            .lag
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = lag
            .iter()
            .filter(|(k, _)| assigned.contains_key(*k))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        out.sort();
        out
    }

    fn assigned(&self) -> Vec<((String, i32), Instant)> {
        self.consumer
            .context()
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

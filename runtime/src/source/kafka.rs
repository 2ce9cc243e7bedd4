use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::gapless::{GAP_LIMIT, Gapless, Verdict};
use super::{Arena, Rebalance, Record, Source, SourceError, StartAt};
use crate::config::{KafkaSpec, Keyless, StartFrom};
use crate::sink::Offsets;

/// The consumer's context: assignment goes through the engine's [`Rebalance`] handler, inside
/// librdkafka's rebalance callback (which runs in `poll`, on the source thread).
#[derive(Default)]
struct Context {
    assigned: Mutex<HashMap<(String, i32), Instant>>,
    lag: Mutex<HashMap<(String, i32), i64>>,
    /// Each partition's end (high watermark), from librdkafka's statistics.
    high: Mutex<HashMap<(String, i32), i64>>,
    handler: OnceLock<Arc<dyn Rebalance>>,
    /// The consumer reads the internal repartition topic: its offsets have no holes, and a
    /// record past one is not handed on (see [`Gapless`]).
    hop: AtomicBool,
    /// With no offset of the group's, a partition starts at its end (`start: latest`).
    latest: AtomicBool,
    gapless: Mutex<Gapless>,
}

/// Since when the brokers have been unreachable: one outage for the whole process (both halves
/// of a repartitioned pipeline have a consumer), logged once, not per consumer or retry.
static DOWN: Mutex<Option<Instant>> = Mutex::new(None);

/// The error that means "no broker can be reached right now" (one broker of several failing,
/// or a coordinator moving, is not an outage).
fn is_outage(e: &rdkafka::error::KafkaError) -> bool {
    e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
}

/// Notes an outage; logs it once, when it starts.
fn outage(what: &str) {
    let mut down = locked(&DOWN);
    if down.is_none() {
        *down = Some(Instant::now());
        tracing::warn!(
            "lost the Kafka brokers ({what}); waiting for them to come back (librdkafka retries; this is logged once per outage, `-vv` shows each retry)"
        );
    }
}

/// Records flow again: logs the end of an outage.
fn back() {
    if let Some(since) = locked(&DOWN).take() {
        tracing::info!(
            "the Kafka brokers are back after {:.1} s",
            since.elapsed().as_secs_f64()
        );
    }
}

/// librdkafka's log, through `tracing`, for every client of the process (the consumers and the
/// repartition producer); during an outage its per-retry complaints go to the debug log.
pub(crate) fn librdkafka_log(level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
    use rdkafka::config::RDKafkaLogLevel as L;
    // Flowgate sets the gapless guarantee on purpose (see the repartition hop).
    let known = fac == "CONFWARN" && message.contains("enable.gapless.guarantee");
    let complaint = matches!(
        level,
        L::Emerg | L::Alert | L::Critical | L::Error | L::Warning
    );
    if locked(&DOWN).is_some() || known || (complaint && !news(&format!("{fac}: {message}"))) {
        tracing::debug!(target: "librdkafka", "{fac}: {message}");
        return;
    }
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            tracing::error!(target: "librdkafka", "{fac}: {message}")
        }
        L::Warning => tracing::warn!(target: "librdkafka", "{fac}: {message}"),
        L::Notice | L::Info => tracing::info!(target: "librdkafka", "{fac}: {message}"),
        L::Debug => tracing::debug!(target: "librdkafka", "{fac}: {message}"),
    }
}

/// An error a librdkafka client reports: an outage is logged once, its retries at debug.
pub(crate) fn librdkafka_error(error: &rdkafka::error::KafkaError, reason: &str) {
    if is_outage(error) {
        outage(reason);
    } else if locked(&DOWN).is_some() || !news(&format!("{error}: {reason}")) {
        // Each retry during an outage says the same, as does each client that notices.
        tracing::debug!(target: "librdkafka", "{error}: {reason}");
    } else {
        tracing::error!(target: "librdkafka", "{error}: {reason}");
    }
}

/// When each complaint (a librdkafka warning or error, or a consumer error, by its text) was last
/// logged. Every client of the process (two consumers and a producer when the pipeline
/// repartitions) and every broker thread of each notices a broken connection on its own, in the
/// same words: the first says it, the repeats within [`REPEAT`] go to the debug log.
static SAID: Mutex<Option<HashMap<String, Instant>>> = Mutex::new(None);

/// How long a complaint, once logged, is not logged again.
const REPEAT: Duration = Duration::from_secs(10);

/// Whether `text` is news: not logged in the last [`REPEAT`] (and now noted as logged).
fn news(text: &str) -> bool {
    let now = Instant::now();
    let mut said = locked(&SAID);
    let said = said.get_or_insert_with(HashMap::new);
    if said.len() > 1024 {
        said.retain(|_, at| now.duration_since(*at) < REPEAT);
    }
    match said.get_mut(text) {
        Some(at) if now.duration_since(*at) < REPEAT => false,
        Some(at) => {
            *at = now;
            true
        }
        None => {
            said.insert(text.to_string(), now);
            true
        }
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ClientContext for Context {
    /// librdkafka's log, through `tracing`; during an outage its per-retry complaints go to the
    /// debug log.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        librdkafka_log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        librdkafka_error(&error, reason);
    }

    /// librdkafka's statistics: keep each partition's consumer lag and end; a broker `UP` again
    /// ends an outage (records may not flow yet on an idle topic).
    fn stats(&self, statistics: rdkafka::Statistics) {
        if statistics.brokers.values().any(|b| b.state == "UP") {
            back();
        }
        let (mut lag, mut high) = (locked(&self.lag), locked(&self.high));
        for (topic, t) in statistics.topics {
            for (partition, p) in t.partitions {
                if partition < 0 {
                    continue;
                }
                if p.consumer_lag >= 0 {
                    lag.insert((topic.clone(), partition), p.consumer_lag);
                }
                if p.hi_offset >= 0 {
                    high.insert((topic.clone(), partition), p.hi_offset);
                }
            }
        }
    }
}

/// How long the broker may take to say where a partition starts.
const ASK_LIMIT: Duration = Duration::from_secs(10);

impl Context {
    /// Where a hop reader's partition starts, as an offset (the group's committed one, else
    /// the partition's first or, with `start: latest`, none known), noted as the offset its
    /// first record must have.
    fn resolve(
        &self,
        consumer: &BaseConsumer<Self>,
        topic: &str,
        partition: i32,
        start: StartAt,
    ) -> StartAt {
        let first = || match consumer.fetch_watermarks(topic, partition, ASK_LIMIT) {
            Ok((low, _)) => Some(low),
            Err(e) => {
                tracing::debug!(
                    topic,
                    partition,
                    "cannot read where the partition starts: {e}"
                );
                None
            }
        };
        let stored = || {
            let mut list = TopicPartitionList::new();
            list.add_partition(topic, partition);
            match consumer.committed_offsets(list, ASK_LIMIT) {
                Ok(list) => match list.find_partition(topic, partition).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Some(Some(o)),
                    _ => Some(None),
                },
                Err(e) => {
                    tracing::debug!(topic, partition, "cannot read the group's offset: {e}");
                    None
                }
            }
        };
        let offset = match start {
            StartAt::Offset(o) => Some(o),
            StartAt::Beginning => first(),
            StartAt::Stored => match stored() {
                Some(Some(o)) => Some(o),
                Some(None) if !self.latest.load(Ordering::Relaxed) => first(),
                _ => None,
            },
        };
        let mut gapless = locked(&self.gapless);
        match offset {
            Some(o) => {
                gapless.expect(topic, partition, o);
                StartAt::Offset(o)
            }
            None => {
                gapless.forget(topic, partition);
                start
            }
        }
    }
}

impl ConsumerContext for Context {
    /// Assigns partitions at the offsets the engine asks for (where the sinks stand), so no
    /// record before them is ever fetched; on revoke, lets the engine finish and commit the
    /// partitions before they move.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let starts = match self.handler.get() {
                    Some(handler) => handler.assigned(&parts),
                    None => vec![StartAt::Stored; parts.len()],
                };
                let hop = self.hop.load(Ordering::Relaxed);
                for ((topic, partition), start) in parts.iter().zip(starts) {
                    // A hop reader starts at an offset it knows, so that it can tell a hole
                    // in what it reads from the first record on.
                    let start = if hop {
                        self.resolve(consumer, topic, *partition, start)
                    } else {
                        start
                    };
                    let offset = match start {
                        StartAt::Stored => continue,
                        StartAt::Beginning => Offset::Beginning,
                        StartAt::Offset(o) => Offset::Offset(o),
                    };
                    if let Err(e) = tpl.set_partition_offset(topic, *partition, offset) {
                        tracing::error!(topic, partition, "cannot set the start offset: {e}");
                    }
                }
                let mut assigned = locked(&self.assigned);
                for (topic, partition) in &parts {
                    tracing::info!(topic, partition, "partition assigned");
                    assigned.insert((topic.clone(), *partition), Instant::now());
                }
                drop(assigned);
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = result {
                    tracing::error!("assigning partitions failed: {e}");
                }
            }
            _ => {
                if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS
                    && consumer.assignment_lost()
                {
                    // The group moved these partitions on while this member was away: another
                    // member may be writing them already, so nothing of them is committed.
                    if let Some(handler) = self.handler.get() {
                        handler.lost(&parts);
                    }
                } else if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                    if let Some(handler) = self.handler.get() {
                        let offsets = handler.revoked(&parts);
                        if !offsets.is_empty() {
                            let mut list = TopicPartitionList::new();
                            for ((topic, partition), offset) in &offsets {
                                let _ = list.add_partition_offset(
                                    topic,
                                    *partition,
                                    Offset::Offset(offset + 1),
                                );
                            }
                            if let Err(e) = consumer.commit(&list, CommitMode::Sync) {
                                tracing::warn!(
                                    "committing offsets to Kafka on revoke failed (the sinks already hold them): {e}"
                                );
                            }
                        }
                    }
                } else {
                    tracing::warn!("rebalance error: {err:?}");
                }
                let mut assigned = locked(&self.assigned);
                let mut gapless = locked(&self.gapless);
                for (topic, partition) in &parts {
                    tracing::info!(topic, partition, "partition revoked");
                    assigned.remove(&(topic.clone(), *partition));
                    gapless.forget(topic, *partition);
                }
                drop(assigned);
                drop(gapless);
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::error!("unassigning partitions failed: {e}");
                }
            }
        }
    }
}

/// The longest a consumer's close may take before the process goes on without it.
const CLOSE_LIMIT: Duration = Duration::from_secs(10);

/// The consumer, closed within [`CLOSE_LIMIT`]. librdkafka's close (`BaseConsumer`'s drop) waits
/// with no limit for the group to finish leaving, and a consumer closed during its first
/// rebalance has been seen to wait forever: in the scale-out test a restarted member whose other
/// half had stopped hung there, and SIGTERM could no longer end it. So the consumer is dropped on
/// a thread of its own and, past the limit, left there: the group drops the member after
/// `session.timeout.ms`, and positions live in the sinks, not in the group.
struct Closing<T: Send + 'static> {
    inner: Option<T>,
    limit: Duration,
}

impl<T: Send + 'static> Closing<T> {
    fn new(inner: T, limit: Duration) -> Self {
        Closing {
            inner: Some(inner),
            limit,
        }
    }
}

impl<T: Send + 'static> std::ops::Deref for Closing<T> {
    type Target = T;

    fn deref(&self) -> &T {
        match &self.inner {
            Some(inner) => inner,
            None => unreachable!("the consumer is taken only when it is dropped"),
        }
    }
}

impl<T: Send + 'static> Drop for Closing<T> {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        let (done, closed) = std::sync::mpsc::channel::<()>();
        let closing = std::thread::Builder::new()
            .name("flowgate-kafka-close".into())
            .spawn(move || {
                drop(inner);
                let _ = done.send(());
            });
        // No thread: the closure, consumer and all, was dropped here already.
        if closing.is_ok() && closed.recv_timeout(self.limit).is_err() {
            tracing::warn!(
                "the Kafka consumer did not close within {} s (librdkafka is still leaving the group); going on without it: the group drops this member after `session.timeout.ms`",
                self.limit.as_secs_f64()
            );
        }
    }
}

/// A Kafka consumer-group member (rdkafka). Offsets are committed to Kafka only after the sinks
/// committed the rows they cover; `enable.auto.commit` is off.
pub struct KafkaSource {
    consumer: Closing<BaseConsumer<Context>>,
    topics: Vec<String>,
    ephemeral: bool,
    /// Read the repartition hop's headers into [`Record::origin`].
    hop: bool,
    /// Topics of several partitions whose records must carry a key (a pipeline with keyed
    /// steps and no `repartition`), with their partition counts.
    keyed: HashMap<String, usize>,
    /// Where each record's bytes are copied out of librdkafka's buffers.
    arena: Arena,
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
            // retry soon. 16 MiB per partition is ~0.1 s of a fast backlog: as fast as 64 MiB
            // from Tansu, for 150 MB less peak memory with 3 partitions (BENCHMARKS.md).
            .set("queued.min.messages", "1000000")
            .set("queued.max.messages.kbytes", "16384")
            .set("fetch.queue.backoff.ms", "10")
            // A broker may hold a fetch this long waiting for more data (Tansu holds it even when
            // data is there): 10 ms instead of 500 keeps latency low and the pipe full (bench:
            // 470k → 650k events/s from Tansu), for ~100 empty fetches/s on an idle topic.
            .set("fetch.wait.max.ms", "10")
            .set("enable.partition.eof", "false")
            // Incremental rebalancing: a member joining or leaving moves only the partitions
            // that change owner; the others keep running (their tasks, state and open windows
            // stay where they are). Listed alone: Tansu takes the first member's first protocol.
            .set("partition.assignment.strategy", "cooperative-sticky")
            // After an outage, find the broker again within a second of its return (librdkafka
            // backs off up to 10 s by default).
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "1000")
            .set("statistics.interval.ms", "1000");
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
        let context = Context::default();
        context
            .latest
            .store(spec.start == StartFrom::Latest, Ordering::Relaxed);
        let consumer: BaseConsumer<Context> = config.create_with_context(context).map_err(|e| {
            SourceError::Io(format!(
                "cannot create the Kafka consumer for `{bootstrap}`: {e}"
            ))
        })?;
        // A broker that never answers is an error the user sees, not a silent wait.
        let timeout = std::time::Duration::from_millis(
            u64::try_from(spec.connect_timeout.as_millis()).unwrap_or(0),
        );
        let metadata = consumer.fetch_metadata(None, timeout).map_err(|e| {
            SourceError::Io(format!(
                "cannot reach the Kafka brokers at `{bootstrap}` within {} (`source.kafka.connect_timeout`): {e}; check `source.kafka.brokers` and that the brokers are up",
                spec.connect_timeout
            ))
        })?;
        let mut keyed = HashMap::new();
        for topic in &topics {
            match metadata.topics().iter().find(|t| t.name() == topic) {
                None => {
                    tracing::warn!(topic = %topic, "the topic does not exist (yet): waiting for it")
                }
                Some(t) if t.partitions().len() > 1 && spec.keyless == Keyless::Refuse => {
                    keyed.insert(topic.clone(), t.partitions().len());
                }
                Some(_) => {}
            }
        }
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|e| SourceError::Io(format!("cannot subscribe to {names:?}: {e}")))?;
        tracing::info!(brokers = bootstrap, group = %spec.group, topics = ?names, "joined the consumer group");
        Ok(KafkaSource {
            consumer: Closing::new(consumer, CLOSE_LIMIT),
            topics,
            ephemeral: false,
            hop: false,
            keyed,
            arena: Arena::default(),
        })
    }

    /// Reads the internal repartition topic: each message's origin from its headers.
    pub fn reading_hop(mut self) -> Self {
        self.hop = true;
        self.consumer.context().hop.store(true, Ordering::Relaxed);
        self.keyed.clear();
        self
    }

    /// Takes records without a key (the pipeline repartitions, or says `keyless: allow`).
    pub fn keyless_ok(mut self) -> Self {
        self.keyed.clear();
        self
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

/// What a hop reader does with a record (see [`Gapless`]).
enum HopRead {
    Take,
    /// Read before: dropped.
    Drop,
    /// Past a hole: dropped, and the partition is read again from the hole.
    Again,
}

impl KafkaSource {
    /// Judges a record of the internal topic: the next one is taken; one past a hole makes the
    /// consumer read the partition again from the hole, and stops the run once the hole stayed
    /// open for [`GAP_LIMIT`].
    fn gapless(&self, topic: &str, partition: i32, offset: i64) -> Result<HopRead, SourceError> {
        let now = Instant::now();
        let (verdict, closed) =
            locked(&self.consumer.context().gapless).check(topic, partition, offset, now);
        if let Some((missing, open, reads)) = closed {
            tracing::debug!(
                topic,
                partition,
                missing,
                reads,
                "the message the hop reader waited for arrived after {:.1} ms",
                open.as_secs_f64() * 1e3
            );
        }
        match verdict {
            Verdict::Take => Ok(HopRead::Take),
            Verdict::Again => Ok(HopRead::Drop),
            Verdict::Gap {
                missing,
                first,
                open,
            } => {
                // Asked when the gap is new, and again before giving up (the first answer may
                // have failed).
                if (first || open > GAP_LIMIT)
                    && let Ok((low, _)) =
                        self.consumer
                            .fetch_watermarks(topic, partition, Duration::from_secs(5))
                    && low > missing
                {
                    // Not a hole: retention deleted what was not read (a keyed half stopped
                    // longer than `repartition.retention`), and the group went on from the
                    // first message left, as Kafka consumers do.
                    tracing::warn!(
                        topic,
                        partition,
                        "the internal topic's retention deleted offsets {missing} to {} before they were read: their rows are lost (the keyed half was stopped longer than `repartition.retention`)",
                        low - 1
                    );
                    let mut gapless = locked(&self.consumer.context().gapless);
                    gapless.expect(topic, partition, low);
                    return Ok(match gapless.check(topic, partition, offset, now).0 {
                        Verdict::Take => HopRead::Take,
                        _ => HopRead::Drop,
                    });
                }
                if open > GAP_LIMIT {
                    return Err(SourceError::Io(format!(
                        "partition `{topic}/{partition}`: the broker shows the message at offset {offset} but not the one at {missing}, for {} s: a message the repartition hop sent is missing from the internal topic (a broker that lost a write), and the steps behind the hop cannot compute without its rows; stopping rather than skipping it",
                        GAP_LIMIT.as_secs()
                    )));
                }
                if first {
                    // Tansu 0.6 under several producers: see `super::gapless`.
                    tracing::info!(
                        topic,
                        partition,
                        missing,
                        offset,
                        "hop: the broker shows a message before an earlier one is stored; reading the partition again from the earlier one"
                    );
                }
                if let Err(e) = self.consumer.seek(
                    topic,
                    partition,
                    Offset::Offset(missing),
                    Duration::from_secs(1),
                ) {
                    tracing::debug!(topic, partition, missing, "seeking back to the hole: {e}");
                }
                Ok(HopRead::Again)
            }
        }
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
                    if is_outage(&e) {
                        outage(&e.to_string());
                    } else if locked(&DOWN).is_some() || !news(&e.to_string()) {
                        tracing::debug!("Kafka: {e}");
                    } else {
                        tracing::warn!("Kafka: {e}");
                    }
                    break;
                }
                Some(Ok(m)) => {
                    back();
                    if self.hop {
                        match self.gapless(m.topic(), m.partition(), m.offset())? {
                            HopRead::Take => {}
                            HopRead::Drop => {
                                wait = Duration::ZERO;
                                continue;
                            }
                            HopRead::Again => break,
                        }
                    }
                    if m.key().is_none()
                        && let Some(n) = self.keyed.get(m.topic())
                    {
                        return Err(SourceError::Misfit(format!(
                            "topic `{}` has {n} partitions and its records come without a Kafka key (partition {}, offset {}): the steps would see each key's records split over partitions and compute partial results (one bar per partition and minute, duplicates across partitions missed). Add `repartition: {{by: [COLUMNS]}}` to the pipeline (the columns the steps group by, e.g. `[symbol]`), or `keyless: allow` under `source.kafka` if no step keeps state per key",
                            m.topic(),
                            m.partition(),
                            m.offset()
                        )));
                    }
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
                        payload: self.arena.copy(m.payload().unwrap_or_default()),
                        tombstone: m.payload().is_none(),
                        timestamp_ms: m.timestamp().to_millis(),
                        origin: if self.hop {
                            crate::engine::Origin::read(&m).map(Box::new)
                        } else {
                            None
                        },
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
            if is_outage(&e) {
                outage(&e.to_string());
            } else if locked(&DOWN).is_some() {
                tracing::debug!("committing offsets to Kafka failed during the outage: {e}");
            } else {
                tracing::warn!(
                    "committing offsets to Kafka failed (the sinks already hold them): {e}"
                );
            }
        }
        Ok(())
    }

    fn on_rebalance(&mut self, handler: Arc<dyn Rebalance>) {
        let _ = self.consumer.context().handler.set(handler);
    }

    fn behind(&self, topic: &str, partition: i32, next: i64) -> bool {
        locked(&self.consumer.context().high)
            .get(&(topic.to_string(), partition))
            .is_none_or(|&high| high > next)
    }

    fn ephemeral(&self) -> bool {
        self.ephemeral
    }

    fn lag(&self) -> Vec<((String, i32), i64)> {
        let assigned = locked(&self.consumer.context().assigned).clone();
        let lag = locked(&self.consumer.context().lag);
        let mut out: Vec<_> = lag
            .iter()
            .filter(|(k, _)| assigned.contains_key(*k))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complaint_is_news_once_until_its_repeat_window_passes() {
        let text = "FAIL: test-only broker: Connect failed: Connection refused";
        assert!(news(text), "the first time is news");
        assert!(!news(text), "the same words again are not");
        assert!(news("FAIL: another test-only broker: Connect failed"));
        // Once the window has passed, the same complaint is logged again.
        if let Some(at) = locked(&SAID).as_mut().and_then(|said| said.get_mut(text)) {
            *at -= REPEAT;
        }
        assert!(news(text));
    }

    /// Stands for a consumer whose close never ends; it ends the test's thread when dropped.
    struct NeverCloses(std::sync::mpsc::Receiver<()>);

    impl Drop for NeverCloses {
        fn drop(&mut self) {
            let _ = self.0.recv();
        }
    }

    #[test]
    fn a_close_that_never_ends_is_left_behind_after_the_limit() {
        let (_keep, never) = std::sync::mpsc::channel::<()>();
        let (dropped, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(Closing::new(NeverCloses(never), Duration::from_millis(200)));
            let _ = dropped.send(());
        });
        // Dropped inline, the close would block this wait until the test runner's own timeout.
        assert!(
            done.recv_timeout(Duration::from_secs(20)).is_ok(),
            "dropping the consumer waited for a close that never ends"
        );
        // A close that ends is waited for.
        let (release, closes) = std::sync::mpsc::channel::<()>();
        release.send(()).expect("send");
        drop(Closing::new(NeverCloses(closes), Duration::from_secs(20)));
    }
}

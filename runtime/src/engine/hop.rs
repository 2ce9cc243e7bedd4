//! The repartition hop: Kafka as the shuffle (Kafka Streams' repartition topic).
//!
//! A pipeline with `repartition: {by: [symbol]}` runs in two halves in every process, each a
//! consumer-group member of its own topic:
//!
//! ```text
//! upstream half   source topic (any partitioning) ▸ decode ▸ late? ▸ rows keyed by `by`
//!                 ──▶ internal topic `{name}-repartition` (one message per internal
//!                     partition and batch: Arrow IPC rows + their source offsets; headers:
//!                     source topic, partition, watermark)
//! keyed half      internal topic ▸ every step ▸ sinks
//! ```
//!
//! Exactly once across the hop, under SIGKILL of either side, without Kafka transactions (Tansu
//! has none): the upstream half is at least once (its hop "sink" commits by flushing the
//! producer, and records its position beside the checkpoints), and the keyed half is an
//! idempotent consumer. Each row carries its source offset; a keyed task keeps, per source
//! partition, the newest source offset it has taken, in its checkpointed state, and drops rows
//! at or below it (copies a restarted upstream sent again).
//!
//! Late data is judged the same in a replay as live: the upstream half judges each record
//! against its own source partition's watermark (its newest event time so far less
//! `watermark.delay`) and dead-letters the late ones with their source coordinates; every
//! message carries that watermark after its rows, and a keyed task closes windows at the
//! minimum over every source partition. A row that crossed is never behind that minimum, so no
//! window it belongs to has closed: lateness depends on the records alone, not on how the source
//! partitions interleave in the internal topic. An idle source partition (read to its end,
//! silent for `idle_timeout`) keeps its watermark and tells the keyed tasks it is idle: they
//! leave it out of the minimum until it sends again. So every attempt of the upstream half
//! sends the same rows, which the "newest offset taken" rule needs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, ArrayRef, Int64Array, RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Message};

use super::PartitionKey;
use super::plan::RunError;
use crate::checkpoint::StateStore;
use crate::config::Pipeline;
use crate::polled_producer::PolledProducer;
use crate::sink::{Position, Positions, Sink, SinkError};

/// The column each row's source offset travels in.
pub(crate) const OFFSET_COLUMN: &str = "_flowgate_source_offset";
/// The column each row's source append time (Kafka timestamp, ms) travels in, for latency.
pub(crate) const TIME_COLUMN: &str = "_flowgate_source_time";
/// Headers of a hop message.
const H_TOPIC: &str = "flowgate-source-topic";
const H_PARTITION: &str = "flowgate-source-partition";
const H_WATERMARK: &str = "flowgate-watermark";
/// Set on the message that says the source partition went idle (see [`Sources::watermark`]).
const H_IDLE: &str = "flowgate-idle";
/// The hop's name: its sink, its stage in the dead letter, its position files.
pub(crate) const HOP: &str = "repartition";

/// Where a hop message's rows came from, read from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The source topic.
    pub topic: Arc<str>,
    /// The source partition.
    pub partition: i32,
    /// The source partition's watermark after these rows (ms), if it has one yet.
    pub watermark: Option<i64>,
    /// The source partition is idle: read to its end and silent for `watermark.idle_timeout`.
    pub idle: bool,
}

impl Origin {
    /// Reads the hop headers of a message (`None`: not a hop message).
    pub fn read(message: &impl Message) -> Option<Origin> {
        let headers = message.headers()?;
        let (mut topic, mut partition, mut watermark, mut idle) = (None, None, None, false);
        for h in headers.iter() {
            let text = h.value.and_then(|v| std::str::from_utf8(v).ok());
            match h.key {
                H_TOPIC => topic = text.map(Arc::<str>::from),
                H_PARTITION => partition = text.and_then(|t| t.parse::<i32>().ok()),
                H_WATERMARK => watermark = text.and_then(|t| t.parse::<i64>().ok()),
                H_IDLE => idle = true,
                _ => {}
            }
        }
        Some(Origin {
            topic: topic?,
            partition: partition?,
            watermark,
            idle,
        })
    }
}

/// The messages sent and not yet written, by sequence number, and the first failure. A commit
/// waits for the messages sent before it, not for an empty queue: the tasks go on sending the
/// next epoch's rows meanwhile.
#[derive(Default)]
struct Deliveries {
    state: Mutex<Pending>,
    written: std::sync::Condvar,
}

#[derive(Default)]
struct Pending {
    next: u64,
    pending: std::collections::BTreeSet<u64>,
    failed: Option<String>,
}

impl Deliveries {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ClientContext for Deliveries {
    /// librdkafka's log of the producer, as the consumers' (during an outage, debug only: the
    /// consumers report the outage once).
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        crate::source::librdkafka_log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::source::librdkafka_error(&error, reason);
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<u64>;
    fn delivery(&self, result: &DeliveryResult<'_>, seq: Box<u64>) {
        let mut state = self.lock();
        state.pending.remove(&*seq);
        if let Err((e, m)) = result {
            state.failed.get_or_insert_with(|| {
                format!(
                    "writing to `{}` partition {} failed: {e}",
                    m.topic(),
                    m.partition()
                )
            });
        }
        drop(state);
        self.written.notify_all();
    }
}

/// The upstream half's writer: rows keyed by the `by` columns into the internal topic.
pub(crate) struct HopOut {
    producer: PolledProducer<Deliveries>,
    topic: String,
    partitions: i32,
    key_columns: Vec<usize>,
    /// The decoded stage's schema with [`OFFSET_COLUMN`] added: what a message holds.
    schema: SchemaRef,
}

/// The schema of a hop message's rows: the decoded stage's, then the source offset and append
/// time.
pub(crate) fn message_schema(decoded: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = decoded.fields().iter().map(|f| (**f).clone()).collect();
    fields.push(Field::new(OFFSET_COLUMN, DataType::Int64, false));
    fields.push(Field::new(TIME_COLUMN, DataType::Int64, true));
    Arc::new(Schema::new(fields))
}

/// A hop message's rows, and per row its source offset and append time.
pub(crate) struct HopMessage {
    pub rows: RecordBatch,
    pub offsets: Vec<i64>,
    pub times: Vec<Option<i64>>,
}

/// Rows per message at most, so a message stays under a broker's 1 MiB default (a single row
/// may be as big as `batch.max_record_bytes`; the internal topic is created to take 8 MiB).
fn rows_per_message(batch: &RecordBatch) -> usize {
    let bytes = batch.get_array_memory_size().max(1);
    let per_row = bytes.div_ceil(batch.num_rows().max(1)).max(1);
    ((512 << 10) / per_row).clamp(1, 16_384)
}

/// The largest message the hop sends, and the internal topic it creates takes.
const MAX_MESSAGE_BYTES: usize = 8 << 20;

impl HopOut {
    /// A writer into `topic` (`partitions` partitions) on `bootstrap`, keyed by `by` (columns of
    /// `decoded`, the stage the rows have).
    pub fn open(
        bootstrap: &str,
        topic: &str,
        partitions: i32,
        by: &[String],
        decoded: &Schema,
        options: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, RunError> {
        let key_columns = by
            .iter()
            .map(|c| {
                let i = decoded.index_of(c).map_err(|_| {
                    RunError::Config(format!("`repartition.by`: `{c}` is not a decoded column"))
                })?;
                match decoded.field(i).data_type() {
                    DataType::Utf8
                    | DataType::Int64
                    | DataType::Float64
                    | DataType::Boolean
                    | DataType::Timestamp(_, _) => Ok(i),
                    other => Err(RunError::Config(format!(
                        "`repartition.by`: cannot key by `{c}` ({other})"
                    ))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            // In order and at most once per send within a producer session; copies after a
            // restart are dropped by the keyed half.
            .set("enable.idempotence", "true")
            // A message that fails stops the producer rather than let later ones land past a
            // gap (the keyed half would take those, and drop the resent ones as copies).
            // librdkafka calls the setting experimental (a CONFWARN, logged at debug).
            .set("enable.gapless.guarantee", "true")
            // Never give up on a message: an outage is waited out (see `flush`).
            .set("message.timeout.ms", "0")
            .set("linger.ms", "2")
            // One message per produce batch: a message already holds thousands of rows, and a
            // consumer resuming inside a multi-message batch stalls on Tansu 0.6 (memory storage).
            .set("batch.num.messages", "1")
            .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string());
        // The source's librdkafka settings that reach the brokers (security, timeouts).
        for (k, v) in options {
            if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") {
                config.set(k, v);
            }
        }
        let producer = PolledProducer::new(&config, Deliveries::default(), "flowgate-hop-producer")
            .map_err(|e| {
                RunError::Config(format!("cannot create the repartition producer: {e}"))
            })?;
        Ok(HopOut {
            producer,
            topic: topic.to_string(),
            partitions: partitions.max(1),
            key_columns,
            schema: message_schema(decoded),
        })
    }

    /// The internal partition of each row of `batch`: a hash of its `by` values.
    fn partition_of_rows(&self, batch: &RecordBatch) -> Result<Vec<u32>, RunError> {
        let mut hashes = vec![0x9e37_79b9_7f4a_7c15u64; batch.num_rows()];
        for &c in &self.key_columns {
            hash_column(batch.column(c), &mut hashes)?;
        }
        let n = self.partitions as u64;
        Ok(hashes.into_iter().map(|h| (h % n) as u32).collect())
    }

    /// Sends the rows of `batch` (source offsets `offsets`) from source partition `source` to
    /// their internal partitions, each message with `watermark`, the source partition's watermark
    /// after them; internal partitions that get no row get the watermark alone if it moved
    /// since the last one sent there (`sent`, per internal partition).
    pub fn send(
        &self,
        source: &PartitionKey,
        batch: &RecordBatch,
        offsets: &[i64],
        times: &[Option<i64>],
        watermark: Option<i64>,
        sent: &mut Vec<Option<i64>>,
    ) -> Result<(), RunError> {
        sent.resize(self.partitions as usize, None);
        let mut rows_of: Vec<Vec<u32>> = vec![Vec::new(); self.partitions as usize];
        if batch.num_rows() > 0 {
            for (row, p) in self.partition_of_rows(batch)?.into_iter().enumerate() {
                rows_of[p as usize].push(row as u32);
            }
        }
        let offsets: ArrayRef = Arc::new(Int64Array::from(offsets.to_vec()));
        let times: ArrayRef = Arc::new(Int64Array::from(times.to_vec()));
        let mut columns = batch.columns().to_vec();
        columns.push(offsets);
        columns.push(times);
        let with_offsets = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| RunError::Internal(format!("repartition: {e}")))?;
        let per_message = rows_per_message(&with_offsets);
        for (partition, rows) in rows_of.into_iter().enumerate() {
            if rows.is_empty() {
                if watermark.is_some() && sent[partition] != watermark {
                    self.produce(partition as i32, source, watermark, false, Vec::new())?;
                    sent[partition] = watermark;
                }
                continue;
            }
            let taken = arrow::compute::take_record_batch(&with_offsets, &UInt32Array::from(rows))
                .map_err(|e| RunError::Internal(format!("repartition: {e}")))?;
            let mut start = 0;
            while start < taken.num_rows() {
                let len = per_message.min(taken.num_rows() - start);
                let chunk = taken.slice(start, len);
                let bytes = flowgate_sdk::ipc::encode_batches(&self.schema, &[chunk])
                    .map_err(|e| RunError::Internal(format!("repartition: encoding rows: {e}")))?;
                start += len;
                // The watermark after the batch goes with its last rows only: a keyed task may
                // close windows between two messages, before the rest of the batch is there.
                let last = start == taken.num_rows();
                self.produce(
                    partition as i32,
                    source,
                    watermark.filter(|_| last),
                    false,
                    bytes,
                )?;
            }
            sent[partition] = watermark;
        }
        Ok(())
    }

    /// Tells every internal partition that source partition `source` exists (its watermark
    /// `watermark`, or none yet): the keyed tasks hold their windows open for it.
    pub fn announce(&self, source: &PartitionKey, watermark: Option<i64>) -> Result<(), RunError> {
        for partition in 0..self.partitions {
            self.produce(partition, source, watermark, false, Vec::new())?;
        }
        Ok(())
    }

    /// Tells every internal partition that source partition `source` is idle (read to its end,
    /// silent for `idle_timeout`): keyed tasks leave it out of their windows' watermark until it
    /// sends rows again. The source partition's own watermark, and so what it finds late, is
    /// not touched: a replay judges its records the same whatever the timing was.
    pub fn idle(&self, source: &PartitionKey, watermark: Option<i64>) -> Result<(), RunError> {
        for partition in 0..self.partitions {
            self.produce(partition, source, watermark, true, Vec::new())?;
        }
        Ok(())
    }

    fn produce(
        &self,
        partition: i32,
        source: &PartitionKey,
        watermark: Option<i64>,
        idle: bool,
        payload: Vec<u8>,
    ) -> Result<(), RunError> {
        let source_partition = source.1.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: H_TOPIC,
                value: Some(source.0.as_bytes()),
            })
            .insert(Header {
                key: H_PARTITION,
                value: Some(source_partition.as_bytes()),
            });
        let watermark_text = watermark.map(|w| w.to_string());
        if let Some(w) = &watermark_text {
            headers = headers.insert(Header {
                key: H_WATERMARK,
                value: Some(w.as_bytes()),
            });
        }
        if idle {
            headers = headers.insert(Header {
                key: H_IDLE,
                value: Some(b"1".as_slice()),
            });
        }
        let seq = {
            let mut state = self.producer.context().lock();
            let seq = state.next;
            state.next += 1;
            state.pending.insert(seq);
            seq
        };
        let mut record: BaseRecord<'_, (), Vec<u8>, Box<u64>> =
            BaseRecord::with_opaque_to(&self.topic, Box::new(seq))
                .partition(partition)
                .payload(&payload)
                .headers(headers);
        // The local queue is full: wait for deliveries to make room.
        let mut waited = Duration::ZERO;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((e, back)) => {
                    let full =
                        e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull);
                    if !full {
                        self.producer.context().lock().pending.remove(&seq);
                        return Err(RunError::Internal(format!(
                            "repartition: cannot send a message of {} bytes to `{}`: {e}",
                            payload.len(),
                            self.topic
                        )));
                    }
                    if waited > Duration::from_secs(60) {
                        self.producer.context().lock().pending.remove(&seq);
                        return Err(RunError::Internal(format!(
                            "repartition: cannot queue a message for `{}`: {e}",
                            self.topic
                        )));
                    }
                    record = back;
                    std::thread::sleep(Duration::from_millis(10));
                    waited += Duration::from_millis(10);
                }
            }
        }
    }

    /// Waits until every message sent before this call is written (the first failure, if one
    /// failed). Messages sent meanwhile are not waited for. An outage is waited out (a commit
    /// cannot land meanwhile anyway), logged once.
    pub fn flush(&self) -> Result<(), String> {
        let deliveries = self.producer.context();
        let mut state = deliveries.lock();
        let mark = state.next;
        let started = std::time::Instant::now();
        let mut warned = false;
        loop {
            if let Some(why) = state.failed.take() {
                return Err(why);
            }
            if state.pending.first().is_none_or(|&first| first >= mark) {
                return Ok(());
            }
            if !warned && started.elapsed() > Duration::from_secs(5) {
                warned = true;
                tracing::warn!(topic = %self.topic, "rows for the repartition topic are not written yet (brokers away?): waiting");
            }
            if let Some(fatal) = self.producer.client().fatal_error() {
                return Err(format!("the repartition producer failed: {fatal:?}"));
            }
            state = deliveries
                .written
                .wait_timeout(state, Duration::from_millis(200))
                .map(|(s, _)| s)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// Hashes one column into `hashes`, row by row (nulls hash alike).
fn hash_column(column: &ArrayRef, hashes: &mut [u64]) -> Result<(), RunError> {
    use arrow::array::{AsArray, BooleanArray, StringArray};
    use arrow::datatypes::{Float64Type, Int64Type};
    use xxhash_rust::xxh3::xxh3_64_with_seed;
    let mix = |h: &mut u64, bytes: &[u8]| *h = xxh3_64_with_seed(bytes, *h);
    let null = |h: &mut u64| *h = xxh3_64_with_seed(&[0xff], h.rotate_left(7));
    match column.data_type() {
        DataType::Utf8 => {
            let a: &StringArray = column.as_string();
            for (i, h) in hashes.iter_mut().enumerate() {
                if a.is_null(i) {
                    null(h)
                } else {
                    mix(h, a.value(i).as_bytes())
                }
            }
        }
        DataType::Int64 => {
            let a = column.as_primitive::<Int64Type>();
            for (i, h) in hashes.iter_mut().enumerate() {
                if a.is_null(i) {
                    null(h)
                } else {
                    mix(h, &a.value(i).to_le_bytes())
                }
            }
        }
        DataType::Float64 => {
            let a = column.as_primitive::<Float64Type>();
            for (i, h) in hashes.iter_mut().enumerate() {
                if a.is_null(i) {
                    null(h)
                } else {
                    mix(h, &a.value(i).to_bits().to_le_bytes())
                }
            }
        }
        DataType::Boolean => {
            let a: &BooleanArray = column.as_boolean();
            for (i, h) in hashes.iter_mut().enumerate() {
                if a.is_null(i) {
                    null(h)
                } else {
                    mix(h, &[u8::from(a.value(i))])
                }
            }
        }
        DataType::Timestamp(_, _) => {
            let a = arrow::compute::cast(column, &DataType::Int64)
                .map_err(|e| RunError::Internal(format!("repartition: {e}")))?;
            return hash_column(&a, hashes);
        }
        other => {
            return Err(RunError::Internal(format!(
                "repartition: cannot key by a {other} column"
            )));
        }
    }
    Ok(())
}

/// A hop message's rows split from their source offsets and append times (`None`: a message
/// with the watermark alone).
pub(crate) fn read_message(payload: &[u8]) -> Result<Option<HopMessage>, String> {
    if payload.is_empty() {
        return Ok(None);
    }
    let mut rows = flowgate_sdk::ipc::decode_one(payload.to_vec()).map_err(|e| e.to_string())?;
    let mut column = |name: &str| -> Result<Int64Array, String> {
        let at = rows
            .schema()
            .index_of(name)
            .map_err(|_| format!("no `{name}` column: not a Flowgate repartition message"))?;
        let values = rows
            .column(at)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| format!("`{name}` is not int64"))?
            .clone();
        rows.remove_column(at);
        Ok(values)
    };
    let times = column(TIME_COLUMN)?;
    let offsets = column(OFFSET_COLUMN)?;
    Ok(Some(HopMessage {
        offsets: offsets.values().to_vec(),
        times: times.iter().collect(),
        rows,
    }))
}

/// The upstream half's sink for the hop: a commit waits until every row sent is written to the
/// internal topic, then records, per source partition, the position beside the checkpoints
/// (the internal topic cannot say how far a source partition got). A restart resumes from it;
/// rows sent again after a crash are dropped by the keyed half.
pub(crate) struct HopSink {
    out: Arc<HopOut>,
    store: Arc<dyn StateStore>,
    held: Positions,
}

impl HopSink {
    pub fn new(out: Arc<HopOut>, store: Arc<dyn StateStore>) -> Self {
        HopSink {
            out,
            store,
            held: Positions::new(),
        }
    }

    fn fail(&self, message: String) -> SinkError {
        SinkError::Table {
            sink: HOP.into(),
            table: self.out.topic.clone(),
            message,
        }
    }
}

impl Sink for HopSink {
    fn name(&self) -> &str {
        HOP
    }

    /// Rows go out from the partition tasks as they are processed; nothing is staged here.
    fn write(&mut self, _batch: RecordBatch) -> Result<(), SinkError> {
        Ok(())
    }

    fn commit(&mut self, positions: &Positions) -> Result<bool, SinkError> {
        self.out.flush().map_err(|e| self.fail(e))?;
        for ((topic, partition), position) in positions {
            let key = (topic.clone(), *partition);
            let held = self.held.get(&key).copied();
            let swapped = self
                .store
                .swap_position(HOP, topic, *partition, held, *position)
                .map_err(|e| self.fail(e.to_string()))?;
            // A record of exactly this position is this process's own write whose reply was lost.
            if let crate::checkpoint::Swap::Moved(recorded) = swapped
                && recorded != Some(*position)
            {
                return Err(SinkError::Overtaken {
                    sink: HOP.into(),
                    table: self.out.topic.clone(),
                    message: format!(
                        "the checkpoint store records partition `{topic}/{partition}` at {}, where this process holds {}: another process owns the partition now; not committing",
                        describe(recorded),
                        describe(held)
                    ),
                });
            }
            self.held.insert(key, *position);
        }
        Ok(!positions.is_empty())
    }

    fn committed(&mut self, topic: &str, partition: i32) -> Result<Option<Position>, SinkError> {
        let position = self
            .store
            .position(HOP, topic, partition)
            .map_err(|e| self.fail(e.to_string()))?;
        match position {
            Some(p) => self.held.insert((topic.to_string(), partition), p),
            None => self.held.remove(&(topic.to_string(), partition)),
        };
        Ok(position)
    }
}

fn describe(p: Option<Position>) -> String {
    p.map_or("nothing".into(), |p| {
        format!(
            "offset {} (epoch {})",
            p.offset,
            crate::checkpoint::epoch_label(p.epoch)
        )
    })
}

/// Per source partition, what a keyed task has taken through the hop.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sources {
    marks: HashMap<PartitionKey, Mark>,
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    /// The newest source offset taken.
    offset: i64,
    watermark: Option<i64>,
    idle: bool,
}

impl Default for Mark {
    fn default() -> Self {
        Mark {
            offset: -1,
            watermark: None,
            idle: false,
        }
    }
}

impl Sources {
    pub fn from_marks(marks: &[crate::checkpoint::SourceMark]) -> Self {
        Sources {
            marks: marks
                .iter()
                .map(|m| {
                    (
                        (Arc::from(m.topic.as_str()), m.partition),
                        Mark {
                            offset: m.offset,
                            watermark: m.watermark,
                            idle: m.idle,
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn marks(&self) -> Vec<crate::checkpoint::SourceMark> {
        let mut marks: Vec<_> = self
            .marks
            .iter()
            .map(|((t, p), m)| crate::checkpoint::SourceMark {
                topic: t.to_string(),
                partition: *p,
                offset: m.offset,
                watermark: m.watermark,
                idle: m.idle,
            })
            .collect();
        marks.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        marks
    }

    /// Source partitions every keyed task waits for before it closes a window (all of the
    /// source topics'), heard of or not.
    pub fn expect(&mut self, partitions: &[PartitionKey]) {
        for key in partitions {
            self.marks.entry(key.clone()).or_default();
        }
    }

    /// Keeps the rows of a message from `origin` (source offsets `offsets`) not taken before,
    /// and notes them taken: the indices kept.
    pub fn take(&mut self, origin: &Origin, offsets: &[i64]) -> Vec<u32> {
        let key = (origin.topic.clone(), origin.partition);
        let mark = self.marks.entry(key).or_default();
        let mut kept = Vec::with_capacity(offsets.len());
        for (i, &o) in offsets.iter().enumerate() {
            if o > mark.offset {
                kept.push(i as u32);
                mark.offset = o;
            }
        }
        kept
    }

    /// Notes a message of `origin`: its watermark (only ever forward), and whether it says the
    /// source partition is idle (any other message says it is not).
    pub fn heard(&mut self, origin: &Origin) {
        let key = (origin.topic.clone(), origin.partition);
        let mark = self.marks.entry(key).or_default();
        if origin.watermark > mark.watermark {
            mark.watermark = origin.watermark;
        }
        mark.idle = origin.idle;
    }

    /// The watermark windows close at: the lowest over the source partitions that are not idle
    /// (none while one of them has none yet). With every one idle, the newest of them: at the
    /// end of a stream every window closes up to the newest watermark, as without the hop.
    pub fn watermark(&self) -> Option<i64> {
        let active: Vec<&Mark> = self.marks.values().filter(|m| !m.idle).collect();
        if active.is_empty() {
            return self.marks.values().filter_map(|m| m.watermark).max();
        }
        let mut lowest: Option<i64> = None;
        for m in active {
            let w = m.watermark?;
            lowest = Some(lowest.map_or(w, |l| l.min(w)));
        }
        lowest
    }
}

/// The consumer group of the keyed half: the source group's, suffixed.
pub(crate) fn keyed_group(group: &str) -> String {
    format!("{group}-repartition")
}

/// The two halves of a repartitioned pipeline: the upstream one (the source, no steps, the
/// dead letter; the hop is added as its sink) and the keyed one (the internal topic on
/// `bootstrap` as its source, every step and sink). Both keep the pipeline's name: positions and
/// checkpoints are told apart by topic.
pub(crate) fn halves(pipeline: &Pipeline, bootstrap: &str) -> (Pipeline, Pipeline) {
    let mut upstream = pipeline.clone();
    upstream.spec.transforms = Vec::new();
    upstream.spec.sinks = Default::default();
    let mut keyed = pipeline.clone();
    if let (Some(hop), Some(kafka)) = (&pipeline.spec.repartition, &pipeline.spec.source.kafka) {
        keyed.spec.source = crate::config::SourceSpec {
            kafka: Some(crate::config::KafkaSpec {
                brokers: crate::config::Brokers::One(bootstrap.to_string()),
                topic: Some(hop.topic_of(&pipeline.spec.name)),
                topics: None,
                group: keyed_group(&kafka.group),
                start: crate::config::StartFrom::Earliest,
                options: kafka.options.clone(),
                connect_timeout: kafka.connect_timeout,
                keyless: crate::config::Keyless::Allow,
            }),
            file: None,
            generator: None,
        };
    }
    (upstream, keyed)
}

/// Every partition of the source topics, as the brokers list them now.
pub(crate) fn source_partitions(
    bootstrap: &str,
    kafka: &crate::config::KafkaSpec,
    timeout: Duration,
) -> Result<Vec<PartitionKey>, RunError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let topics = kafka
        .topics
        .clone()
        .or_else(|| kafka.topic.clone().map(|t| vec![t]))
        .unwrap_or_default();
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| RunError::Config(format!("repartition: {e}")))?;
    let metadata = probe.fetch_metadata(None, timeout).map_err(|e| {
        RunError::Source(crate::source::SourceError::Io(format!(
            "cannot reach the Kafka brokers at `{bootstrap}` within {} (`source.kafka.connect_timeout`): {e}; check `source.kafka.brokers` and that the brokers are up",
            kafka.connect_timeout
        )))
    })?;
    let mut all: Vec<PartitionKey> = Vec::new();
    for t in metadata.topics() {
        if topics.iter().any(|n| n == t.name()) {
            let name: Arc<str> = t.name().into();
            all.extend(t.partitions().iter().map(|p| (name.clone(), p.id())));
        }
    }
    if all.is_empty() {
        return Err(RunError::Config(format!(
            "repartition: the source topic {topics:?} does not exist yet: create it first (the keyed tasks wait for every source partition's watermark, and the internal topic takes its partition count)"
        )));
    }
    all.sort();
    Ok(all)
}

/// Makes sure the internal topic exists, created with `partitions` partitions when missing. An
/// existing one is used as it is (its partition count decides where keys go; a different
/// count than asked is logged): returns its partition count.
pub(crate) fn ensure_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    retention: Duration,
    timeout: Duration,
) -> Result<i32, RunError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let fail = |e: String| {
        RunError::Source(crate::source::SourceError::Io(format!(
            "repartition: cannot create the internal topic `{topic}`: {e}"
        )))
    };
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| fail(e.to_string()))?;
    let existing = |probe: &BaseConsumer| -> Result<Option<i32>, RunError> {
        let metadata = probe
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| fail(e.to_string()))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len() as i32))
    };
    if let Some(n) = existing(&probe)? {
        if n != partitions {
            tracing::info!(
                topic,
                partitions = n,
                "the repartition topic exists with {n} partitions (not {partitions}): keys go by its count"
            );
        }
        return Ok(n);
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| fail(e.to_string()))?;
    let retention_ms = retention.as_millis().to_string();
    let max_bytes = MAX_MESSAGE_BYTES.to_string();
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1))
        .set("retention.ms", &retention_ms)
        .set("cleanup.policy", "delete")
        .set("max.message.bytes", &max_bytes);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let created = rt.block_on(admin.create_topics(
        [&new],
        &AdminOptions::new().operation_timeout(Some(timeout)),
    ));
    match created {
        Ok(results) => {
            for r in results {
                if let Err((_, code)) = r
                    && code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
                {
                    return Err(fail(code.to_string()));
                }
            }
        }
        Err(e) => return Err(fail(e.to_string())),
    }
    tracing::info!(topic, partitions, "created the internal repartition topic");
    // Another process may have created it first, with its own count: use what is there.
    for _ in 0..50 {
        if let Some(n) = existing(&probe)? {
            return Ok(n);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(partitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(p: i32, w: Option<i64>) -> Origin {
        Origin {
            topic: "ticks".into(),
            partition: p,
            watermark: w,
            idle: false,
        }
    }

    #[test]
    fn rows_sent_again_are_dropped_and_windows_wait_for_every_source() {
        let mut s = Sources::default();
        assert_eq!(s.take(&origin(0, Some(10)), &[5, 6, 7]), vec![0, 1, 2]);
        s.heard(&origin(0, Some(10)));
        assert_eq!(s.watermark(), Some(10));
        // Partition 1 announces itself before it has a watermark: windows wait.
        s.heard(&origin(1, None));
        assert_eq!(s.watermark(), None);
        s.heard(&origin(1, Some(4)));
        assert_eq!(s.watermark(), Some(4));
        // A restarted upstream sends 6..9 again: 6 and 7 are copies.
        assert_eq!(s.take(&origin(0, Some(8)), &[6, 7, 8, 9]), vec![2, 3]);
        s.heard(&origin(0, Some(8)));
        assert_eq!(
            s.watermark(),
            Some(4),
            "a lower watermark never moves one back"
        );
        // Partition 1 goes idle: windows close at partition 0's watermark alone; when it
        // sends again it counts again.
        s.heard(&Origin {
            idle: true,
            ..origin(1, Some(4))
        });
        assert_eq!(s.watermark(), Some(10));
        let restored = Sources::from_marks(&s.marks());
        assert_eq!(restored.marks(), s.marks());
        s.heard(&origin(1, Some(6)));
        assert_eq!(s.watermark(), Some(6));
        // Every one idle (the end of the stream): the newest.
        s.heard(&Origin {
            idle: true,
            ..origin(0, Some(10))
        });
        s.heard(&Origin {
            idle: true,
            ..origin(1, Some(6))
        });
        assert_eq!(s.watermark(), Some(10));
    }

    #[test]
    fn a_source_partition_never_heard_of_holds_windows_open_until_it_is_idle() {
        let mut s = Sources::default();
        let never: PartitionKey = ("ticks".into(), 2);
        s.expect(std::slice::from_ref(&never));
        s.heard(&origin(0, Some(10)));
        assert_eq!(s.watermark(), None);
        s.heard(&Origin {
            idle: true,
            ..origin(2, None)
        });
        assert_eq!(s.watermark(), Some(10));
    }

    #[test]
    fn rows_of_one_key_go_to_one_partition() {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, true)]));
        let out = HopOut::open(
            "127.0.0.1:1",
            "t",
            4,
            &["k".into()],
            &schema,
            &Default::default(),
        )
        .unwrap();
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(arrow::array::StringArray::from(vec![
                Some("a"),
                Some("b"),
                Some("a"),
                None,
                None,
            ]))],
        )
        .unwrap();
        let p = out.partition_of_rows(&batch).unwrap();
        assert_eq!((p[0], p[3]), (p[2], p[4]));
        assert!(p.iter().all(|&x| x < 4));
    }
}

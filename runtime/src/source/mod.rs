//! Sources: where records come from. Each record carries its topic, partition and offset, which
//! travel with it to the sinks' commits and the dead letter.

mod file;
mod generator;
mod kafka;

use std::sync::Arc;
use std::time::Duration;

pub use file::FileSource;
pub use generator::{EmbeddedBroker, Generator, Pace};
pub use kafka::KafkaSource;
pub(crate) use kafka::{librdkafka_error, librdkafka_log};

use crate::sink::Offsets;

/// Where an assigned partition starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The group's committed offset (or the `start:` setting when it has none).
    Stored,
    /// The partition's first record.
    Beginning,
    /// This offset.
    Offset(i64),
}

/// The engine's side of partition assignment: called by the source (for Kafka, inside the
/// consumer's rebalance callback, before any record of the partition is fetched).
pub trait Rebalance: Send + Sync {
    /// Partitions just assigned: sets up their tasks; returns where each starts.
    fn assigned(&self, partitions: &[(String, i32)]) -> Vec<StartAt>;
    /// Partitions about to be taken away: finishes and commits them, then lets them go;
    /// returns the offsets committed, for the source to commit to the broker before they move.
    fn revoked(&self, partitions: &[(String, i32)]) -> Offsets;
    /// Partitions the group already gave to another member (this one missed its session
    /// timeout): nothing more of them may be committed.
    fn lost(&self, partitions: &[(String, i32)]);
}

/// One record as read.
#[derive(Debug, Clone)]
pub struct Record {
    /// Topic (for the file source: `file:<name>`).
    pub topic: Arc<str>,
    /// Partition.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
    /// The raw bytes.
    pub payload: Vec<u8>,
    /// The record's value is null (a Kafka tombstone): `payload` is empty.
    pub tombstone: bool,
    /// Broker append time (ms), if the source has one.
    pub timestamp_ms: Option<i64>,
    /// Where the rows came from, for a message of the internal repartition topic.
    pub origin: Option<Box<crate::engine::Origin>>,
}

/// Errors from sources.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The broker or file could not be reached or read.
    #[error("source: {0}")]
    Io(String),
    /// The records do not fit the pipeline (records without a key where keyed steps need
    /// one); the user must change the pipeline.
    #[error("source: {0}")]
    Misfit(String),
}

/// A source of records.
pub trait Source {
    /// Appends up to `max` records to `out`, waiting at most `timeout` for the first.
    fn poll(
        &mut self,
        max: usize,
        timeout: Duration,
        out: &mut Vec<Record>,
    ) -> Result<(), SourceError>;
    /// Records that everything up to and including `offsets` is safely committed by the sinks.
    fn commit(&mut self, offsets: &Offsets) -> Result<(), SourceError>;
    /// Registers the engine's partition handler; assignments from now on go through it.
    fn on_rebalance(&mut self, handler: std::sync::Arc<dyn Rebalance>);
    /// Records behind the end of each assigned partition, as last reported (Kafka only).
    fn lag(&self) -> Vec<((String, i32), i64)> {
        Vec::new()
    }
    /// True if records of `topic`/`partition` from `next` on are known to be waiting at the
    /// broker (or may be: a partition whose end is not known yet counts as behind). A partition
    /// that is behind never counts as idle.
    fn behind(&self, topic: &str, partition: i32, next: i64) -> bool {
        let _ = (topic, partition, next);
        false
    }
    /// True if the input has an end of its own (files): then only [`Source::exhausted`] ends
    /// it, never a `--max-records` or `--until-idle` that stops the run earlier.
    fn bounded(&self) -> bool {
        false
    }
    /// True if nothing more will come: a file source whose every file is read to its end.
    fn exhausted(&self) -> bool {
        false
    }
    /// True if offsets mean nothing across runs (the embedded broker starts empty each time):
    /// a partition then starts fresh instead of resuming from the sinks' offsets.
    fn ephemeral(&self) -> bool {
        false
    }
}

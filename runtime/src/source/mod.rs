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

use crate::sink::Offsets;

/// Flushes and commits partitions that are being revoked; returns the offsets committed.
pub type RevokeHook = Box<dyn Fn(&[(String, i32)]) -> Option<Offsets> + Send + Sync>;

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
    /// Broker append time (ms), if the source has one.
    pub timestamp_ms: Option<i64>,
}

/// Errors from sources.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The broker or file could not be reached or read.
    #[error("source: {0}")]
    Io(String),
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
    /// Continues `topic`/`partition` from `offset`.
    fn seek(&mut self, topic: &str, partition: i32, offset: i64) -> Result<(), SourceError>;
    /// Partitions taken away (by a rebalance) since the last call.
    fn revoked(&mut self) -> Vec<(String, i32)> {
        Vec::new()
    }
    /// Called when partitions are about to be taken away by a rebalance, before they move: the
    /// hook flushes and commits them and returns the offsets to commit to the broker.
    fn on_revoke(&mut self, hook: RevokeHook) {
        let _ = hook;
    }
    /// Records behind the end of each assigned partition, as last reported (Kafka only).
    fn lag(&self) -> Vec<((String, i32), i64)> {
        Vec::new()
    }
    /// True if offsets mean nothing across runs (the embedded broker starts empty each time):
    /// a partition then starts fresh instead of resuming from the sinks' offsets.
    fn ephemeral(&self) -> bool {
        false
    }
    /// Partitions currently assigned, with when they were assigned; the watermark waits for an
    /// assigned partition that has sent nothing yet (until it counts as idle).
    fn assigned(&self) -> Vec<((String, i32), std::time::Instant)> {
        Vec::new()
    }
}

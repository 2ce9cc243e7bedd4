//! Sources: where records come from. Each record carries its topic, partition and offset, which
//! travel with it to the sinks' commits and the dead letter.

mod file;
mod gapless;
mod generator;
mod kafka;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

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

/// Where a source keeps its records' bytes: blocks of [`Arena::BLOCK`] bytes, each record a
/// slice of one. A record read is then a copy into a block (or, for files, a read straight into
/// one) and a reference count, instead of an allocation of its own that the worker thread frees
/// (at ~100 bytes a tick, malloc and a free from another thread were ~7% of a file run's CPU).
/// A block is reused once its last record is dropped: the newest [`Arena::KEEP`] blocks handed
/// out are kept for that, so a steady run touches the same memory instead of faulting in fresh
/// pages. Records over [`Arena::OWN`] bytes (the repartition hop's messages) get an allocation
/// of their own, so they neither cost a block its unused tail nor pin one.
#[derive(Debug, Default)]
pub struct Arena {
    block: BytesMut,
    /// Blocks handed out, oldest first, each emptied: reusable once no record holds a part.
    retired: std::collections::VecDeque<BytesMut>,
}

impl Arena {
    /// Bytes a block holds.
    pub const BLOCK: usize = 1 << 20;
    /// Records longer than this are not put in a block.
    pub const OWN: usize = Self::BLOCK / 16;
    /// Blocks kept for reuse (in flight to the workers, at most; the rest are freed as usual).
    pub const KEEP: usize = 32;

    /// `bytes` as a slice of the current block, starting a new block when it has no room.
    pub fn copy(&mut self, bytes: &[u8]) -> Bytes {
        if bytes.len() > Self::OWN {
            return Bytes::copy_from_slice(bytes);
        }
        if self.block.capacity() - self.block.len() < bytes.len() {
            let fresh = self.block(Self::BLOCK);
            let old = std::mem::replace(&mut self.block, fresh);
            self.retire(old);
        }
        self.block.extend_from_slice(bytes);
        self.block.split().freeze()
    }

    /// An empty block with room for `size` bytes: a retired one no record holds any more, if
    /// there is one (the oldest first), else a new one.
    pub fn block(&mut self, size: usize) -> BytesMut {
        for i in 0..self.retired.len() {
            if self.retired[i].try_reclaim(size)
                && let Some(mut block) = self.retired.remove(i)
            {
                block.clear();
                return block;
            }
        }
        BytesMut::with_capacity(size)
    }

    /// Takes back what is left of a block whose records were handed out, for reuse once they
    /// are all dropped.
    pub fn retire(&mut self, mut block: BytesMut) {
        block.clear();
        if self.retired.len() == Self::KEEP {
            self.retired.pop_front();
        }
        self.retired.push_back(block);
    }
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
    /// The raw bytes: a slice of a block shared with the records read beside it (see
    /// [`Arena`]).
    pub payload: Bytes,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_copied_into_the_arena_share_blocks_and_keep_their_bytes() {
        let mut arena = Arena::default();
        let a = arena.copy(b"first");
        let b = arena.copy(b"second");
        assert_eq!((&a[..], &b[..]), (&b"first"[..], &b"second"[..]));
        // One block: the second record's bytes follow the first's.
        assert_eq!(b.as_ptr(), a[a.len()..].as_ptr());

        // Long records get memory of their own; the block goes on after them.
        for long in [vec![7u8; Arena::OWN + 1], vec![8u8; Arena::BLOCK + 1]] {
            let c = arena.copy(&long);
            assert_eq!(&c[..], &long[..]);
        }
        let d = arena.copy(b"after");
        assert_eq!(d.as_ptr(), b[b.len()..].as_ptr());
        assert_eq!(&d[..], b"after");

        // A full block gives way to a new one; what was read from it stays as it was.
        let mut arena = Arena::default();
        let line = [b'x'; 1000];
        assert!(line.len() <= Arena::OWN);
        let per_block = Arena::BLOCK / line.len();
        let records: Vec<Bytes> = (0..3 * per_block).map(|_| arena.copy(&line)).collect();
        drop(arena);
        assert!(records.iter().all(|r| r[..] == line[..]));
        let blocks = records
            .windows(2)
            .filter(|w| w[1].as_ptr() != w[0][w[0].len()..].as_ptr())
            .count();
        assert_eq!(
            blocks,
            2,
            "a new block every {} records",
            Arena::BLOCK / 1000
        );
        // An empty record is a record too.
        assert!(Arena::default().copy(b"").is_empty());
    }

    #[test]
    fn a_block_is_reused_once_no_record_holds_a_part_of_it() {
        let mut arena = Arena::default();
        let line = [b'x'; 1000];
        let per_block = Arena::BLOCK / line.len();
        let first: Vec<Bytes> = (0..per_block).map(|_| arena.copy(&line)).collect();
        let start = first[0].as_ptr();
        // The second block: the first is still held by its records, so it is not reused.
        let held = arena.copy(&line);
        assert!(held.as_ptr() != start);
        let second: Vec<Bytes> = (1..per_block).map(|_| arena.copy(&line)).collect();
        let mut third = arena.copy(b"third");
        assert!(
            third.as_ptr() != start,
            "the first block's records are alive"
        );
        drop((first, held, second));
        // The third block fills; the fourth is the first again, its old bytes overwritten.
        while third.as_ptr() != start {
            third = arena.copy(&line);
            assert!(arena.retired.len() <= Arena::KEEP);
        }
        assert_eq!(&third[..], &line[..]);
        let fresh = arena.block(100);
        assert!(fresh.is_empty() && fresh.capacity() >= 100);
    }
}

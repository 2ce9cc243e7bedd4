//! The plugin-state store: what each partition's steps held at each checkpoint epoch.
//!
//! A partition's checkpoints are numbered (its *epoch*, counted per partition across runs and
//! processes). The committer stores epoch `E`'s state before any sink commits `E`, and the sinks
//! record `E` with the offset they cover (see [`crate::sink::Position`]); so a restart that finds
//! a sink at epoch `E` finds the state that goes with it. A state is never overwritten by a
//! different one under a committed epoch, and only epochs older than every sink's are pruned.
//!
//! Layout: `{dir}/{pipeline}/{topic}-{partition}/{epoch:020}.state`; body: `FGC2` then the
//! postcard encoding of [`PartitionState`]. [`FileStateStore`] keeps it in a folder (written
//! atomically: temp + rename); [`ObjectStateStore`] in an object store (`s3://bucket/prefix`,
//! where a put is atomic), so processes on different hosts share it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The current encoding; [`V3_MAGIC`] states (no deltas) and [`OLD_MAGIC`] states (no
/// lineage, no source marks either) still read.
const MAGIC: &[u8; 4] = b"FGC4";
const V3_MAGIC: &[u8; 4] = b"FGC3";
const OLD_MAGIC: &[u8; 4] = b"FGC2";

/// The longest chain of deltas a restore follows: more means the links loop (a damaged store).
const MAX_DELTA_CHAIN: usize = 10_000;

/// How long a position swap waits for another process's lock on the same record.
const POSITION_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How many low bits of a checkpoint epoch name its writer (see [`next_epoch`]).
const WRITER_BITS: u32 = 24;

/// A random tag naming this process's checkpoints (never 0), so two processes that both number
/// a partition's next checkpoint "one past what the sinks hold" never store it under one name.
pub fn writer_tag() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    (h.finish() & ((1 << WRITER_BITS) - 1)).max(1)
}

/// The checkpoint epoch after `epoch` for the writer tagged `tag`: the count above
/// [`WRITER_BITS`] goes up by one, the writer's tag fills the bits below. So epochs still order
/// in time, and two writers going on from one position store their states under different
/// names: a process that lost its partition (frozen past its session) and wakes up can never
/// overwrite the new owner's state, though both take "the next epoch".
pub fn next_epoch(epoch: u64, tag: u64) -> u64 {
    (((epoch >> WRITER_BITS) + 1) << WRITER_BITS) | (tag & ((1 << WRITER_BITS) - 1))
}

/// An epoch for people: `count.tag` (`7.3fa2c1`); epochs from before tags are plain numbers.
pub fn epoch_label(epoch: u64) -> String {
    if epoch >> WRITER_BITS == 0 {
        return epoch.to_string();
    }
    format!(
        "{}.{:06x}",
        epoch >> WRITER_BITS,
        epoch & ((1 << WRITER_BITS) - 1)
    )
}

/// Errors reading or writing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The store could not be read or written.
    #[error("checkpoint store `{path}`: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The object store could not be read or written.
    #[error("checkpoint store `{location}`: {message}")]
    Store {
        /// The object's URL.
        location: String,
        /// Why.
        message: String,
    },
    /// A state stored as deltas goes back to a checkpoint that is gone (or does not hold the
    /// step).
    #[error(
        "checkpoint `{location}`: {message}; restore the checkpoint folder, or run with `--reset-state` to start this partition's steps empty"
    )]
    Broken {
        /// `topic-partition/epoch`.
        location: String,
        /// What is missing.
        message: String,
    },
    /// A state file is damaged.
    #[error("checkpoint `{path}` is damaged: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Snapshot bytes as one run of bytes (serde's default takes a `Vec<u8>` byte by byte: a
/// megabyte of state cost a million calls). postcard writes both as a length and the bytes, so
/// states written either way read alike.
mod bytes {
    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    /// As [`deserialize`], into shared bytes (no copy: the `Vec` becomes the buffer).
    pub fn deserialize_shared<'de, D: Deserializer<'de>>(d: D) -> Result<::bytes::Bytes, D::Error> {
        deserialize(d).map(::bytes::Bytes::from)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> de::Visitor<'de> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(Bytes)
    }
}

/// One step's snapshot, stored under the step's name (so adding, removing or reordering steps
/// restores each surviving step its own state). The plugin's state version is inside the bytes
/// (the SDK frames it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepState {
    /// The step's name in the pipeline.
    pub step: String,
    /// The snapshot bytes, as the plugin gave them: its whole state, or with `delta_of`, what
    /// changed since that checkpoint. Shared, not copied, with the state a rebuild of the step
    /// starts from (see [`crate::plugin::Chain::checkpoint`]).
    #[serde(
        serialize_with = "bytes::serialize",
        deserialize_with = "bytes::deserialize_shared"
    )]
    pub snapshot: ::bytes::Bytes,
    /// `Some(epoch)`: `snapshot` is a delta (the WIT's `incremental` interface) on top of this
    /// step's state at checkpoint `epoch` of the same partition.
    pub delta_of: Option<u64>,
}

/// A step's state as a restore needs it: the full snapshot it goes back to, then the deltas
/// after it, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepChain {
    /// The step's name in the pipeline.
    pub step: String,
    /// The full snapshot.
    pub full: ::bytes::Bytes,
    /// The deltas to apply on top of it, in order.
    pub deltas: Vec<::bytes::Bytes>,
    /// The checkpoint epoch that holds the full snapshot.
    pub root: u64,
}

/// What a checkpoint holds for one partition at one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    /// The last source offset the state covers (-1: none yet).
    pub offset: i64,
    /// The newest event time seen (ms), so the watermark resumes where it was.
    pub max_event: Option<i64>,
    /// The watermark handed to the chain last (ms): a replay of this epoch hands it again at
    /// `offset`, so windows close exactly where they closed the first time.
    pub watermark: Option<i64>,
    /// Each step's snapshot.
    pub steps: Vec<StepState>,
    /// The checkpoint this one goes on from (restored from, or reached as a replay's target):
    /// a replay walks these links back to hand every watermark the first run handed at the same
    /// offsets, the ones an idle partition followed from others included. `None` in states
    /// written before it was recorded.
    pub previous: Option<u64>,
    /// Behind a repartition hop: per source partition, the newest source offset taken and its
    /// watermark (records at or below the offset are copies a restarted upstream sent again).
    pub sources: Vec<SourceMark>,
    /// The oldest checkpoint the deltas among `steps` reach back to (where their full
    /// snapshots are): it must outlive this one. `None`: every step's state is whole here.
    pub root: Option<u64>,
}

impl PartitionState {
    /// The oldest checkpoint a restore of `epoch` (this state) reads.
    pub fn needs_from(&self, epoch: u64) -> u64 {
        self.root.map_or(epoch, |r| r.min(epoch))
    }
}

/// The steps' states of checkpoint `epoch` of `topic`/`partition` (taken from its
/// [`PartitionState`], so the bytes are moved, not copied) as a restore needs them: a step
/// stored as a delta is followed back through the checkpoints it goes on from to its full
/// snapshot.
pub fn resolve(
    store: &dyn StateStore,
    topic: &str,
    partition: i32,
    epoch: u64,
    steps: Vec<StepState>,
) -> Result<Vec<StepChain>, CheckpointError> {
    let mut loaded: std::collections::HashMap<u64, PartitionState> =
        std::collections::HashMap::new();
    let missing = |message: String| CheckpointError::Broken {
        location: format!("{}/{}", partition_key(topic, partition), epoch_label(epoch)),
        message,
    };
    // Of an earlier state only the steps stored as deltas here are read: the others' bytes
    // are dropped as soon as it is loaded.
    let wanted: Vec<String> = steps
        .iter()
        .filter(|s| s.delta_of.is_some())
        .map(|s| s.step.clone())
        .collect();
    let mut chains = Vec::with_capacity(steps.len());
    for step in steps {
        let mut deltas = Vec::new();
        let name = step.step.clone();
        let mut at = step;
        let mut root = epoch;
        while let Some(previous) = at.delta_of {
            if deltas.len() >= MAX_DELTA_CHAIN {
                return Err(missing(format!(
                    "step `{name}`: its state deltas go back more than {MAX_DELTA_CHAIN} checkpoints (do their links loop?)"
                )));
            }
            deltas.push(std::mem::take(&mut at.snapshot));
            if let std::collections::hash_map::Entry::Vacant(slot) = loaded.entry(previous) {
                let earlier = store.load(topic, partition, previous)?.ok_or_else(|| {
                    missing(format!(
                        "step `{name}`: its state is a delta on top of checkpoint {}, which is not in the store",
                        epoch_label(previous)
                    ))
                })?;
                let mut earlier = earlier;
                earlier.steps.retain(|s| wanted.contains(&s.step));
                slot.insert(earlier);
            }
            let earlier = &loaded[&previous];
            at = earlier
                .steps
                .iter()
                .find(|s| s.step == name)
                .cloned()
                .ok_or_else(|| {
                    missing(format!(
                        "step `{name}`: its state is a delta on top of checkpoint {}, which holds no state for it",
                        epoch_label(previous)
                    ))
                })?;
            root = previous;
        }
        deltas.reverse();
        chains.push(StepChain {
            step: name,
            full: at.snapshot,
            deltas,
            root,
        });
    }
    Ok(chains)
}

/// How far one source partition has come through a repartition hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceMark {
    /// The source topic.
    pub topic: String,
    /// The source partition.
    pub partition: i32,
    /// The newest source offset taken.
    pub offset: i64,
    /// Its watermark (ms), as the upstream task last sent it.
    pub watermark: Option<i64>,
    /// Whether it was idle at that point (left out of the windows' watermark).
    pub idle: bool,
}

/// [`StepState`] as `FGC3` and `FGC2` stored it.
#[derive(Deserialize)]
struct OldStep {
    step: String,
    #[serde(with = "bytes")]
    snapshot: Vec<u8>,
}

impl From<OldStep> for StepState {
    fn from(s: OldStep) -> Self {
        StepState {
            step: s.step,
            snapshot: s.snapshot.into(),
            delta_of: None,
        }
    }
}

/// [`PartitionState`] as `FGC3` stored it.
#[derive(Deserialize)]
struct V3State {
    offset: i64,
    max_event: Option<i64>,
    watermark: Option<i64>,
    steps: Vec<OldStep>,
    previous: Option<u64>,
    sources: Vec<SourceMark>,
}

/// [`PartitionState`] as `FGC2` stored it.
#[derive(Deserialize)]
struct OldState {
    offset: i64,
    max_event: Option<i64>,
    watermark: Option<i64>,
    steps: Vec<OldStep>,
}

/// Where checkpoints live. One per pipeline.
pub trait StateStore: Send + Sync {
    /// Stores `state` as `epoch` of `topic`/`partition`.
    fn save(
        &self,
        topic: &str,
        partition: i32,
        epoch: u64,
        state: &PartitionState,
    ) -> Result<(), CheckpointError>;
    /// The state stored as `epoch`, if any.
    fn load(
        &self,
        topic: &str,
        partition: i32,
        epoch: u64,
    ) -> Result<Option<PartitionState>, CheckpointError>;
    /// Deletes epochs older than `keep_from`.
    fn prune(&self, topic: &str, partition: i32, keep_from: u64) -> Result<(), CheckpointError>;
    /// Deletes every state of the pipeline (its tables start anew).
    fn clear(&self) -> Result<(), CheckpointError>;
    /// Records how far sink `sink` holds `topic`/`partition`, beside its states (for a sink
    /// whose target cannot record it: the repartition hop), if the record still reads
    /// `expected` (what this process read or wrote there last). The check and the write are one
    /// step (a lock on a folder, a conditional put on an object store), so of two processes that
    /// both believe they own the partition, one writes and the other gets
    /// [`Swap::Moved`] with what the first wrote: it must not commit.
    fn swap_position(
        &self,
        sink: &str,
        topic: &str,
        partition: i32,
        expected: Option<crate::sink::Position>,
        position: crate::sink::Position,
    ) -> Result<Swap, CheckpointError>;
    /// The position [`StateStore::swap_position`] recorded last.
    fn position(
        &self,
        sink: &str,
        topic: &str,
        partition: i32,
    ) -> Result<Option<crate::sink::Position>, CheckpointError>;
}

/// What [`StateStore::swap_position`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    /// The record read as expected and now holds the new position.
    Written,
    /// Another writer moved the record: it holds this (unchanged by the call).
    Moved(Option<crate::sink::Position>),
}

/// A position as stored: `{"offset":…,"epoch":…}`.
fn encode_position(p: crate::sink::Position) -> Vec<u8> {
    format!("{{\"offset\":{},\"epoch\":{}}}", p.offset, p.epoch).into_bytes()
}

fn decode_position(body: &[u8]) -> Result<crate::sink::Position, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    match (v["offset"].as_i64(), v["epoch"].as_u64()) {
        (Some(offset), Some(epoch)) => Ok(crate::sink::Position { offset, epoch }),
        _ => Err("not a position".into()),
    }
}

/// A partition's folder name: the topic with characters a path must not hold replaced.
fn partition_key(topic: &str, partition: i32) -> String {
    let topic: String = topic
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{topic}-{partition}")
}

/// A state as stored: the magic, then postcard, written once into a buffer sized for the
/// snapshots it holds (not grown by doubling and copied again: a dedup state is megabytes).
fn encode(state: &PartitionState) -> Result<Vec<u8>, String> {
    let snapshots: usize = state.steps.iter().map(|s| s.snapshot.len()).sum();
    let mut body = Vec::with_capacity(MAGIC.len() + snapshots + 1024);
    body.extend_from_slice(MAGIC.as_slice());
    postcard::to_extend(state, body).map_err(|e| format!("cannot encode: {e}"))
}

/// A stored state read back.
fn decode(body: &[u8]) -> Result<PartitionState, String> {
    if let Some(rest) = body.strip_prefix(MAGIC.as_slice()) {
        return postcard::from_bytes(rest).map_err(|e| e.to_string());
    }
    if let Some(rest) = body.strip_prefix(V3_MAGIC.as_slice()) {
        let v3: V3State = postcard::from_bytes(rest).map_err(|e| e.to_string())?;
        return Ok(PartitionState {
            offset: v3.offset,
            max_event: v3.max_event,
            watermark: v3.watermark,
            steps: v3.steps.into_iter().map(StepState::from).collect(),
            previous: v3.previous,
            sources: v3.sources,
            root: None,
        });
    }
    let rest = body
        .strip_prefix(OLD_MAGIC.as_slice())
        .ok_or_else(|| "bad header (written by an older Flowgate?)".to_string())?;
    let old: OldState = postcard::from_bytes(rest).map_err(|e| e.to_string())?;
    Ok(PartitionState {
        offset: old.offset,
        max_event: old.max_event,
        watermark: old.watermark,
        steps: old.steps.into_iter().map(StepState::from).collect(),
        previous: None,
        sources: Vec::new(),
        root: None,
    })
}

/// The file-system store: a local or shared folder.
#[derive(Debug, Clone)]
pub struct FileStateStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl FileStateStore {
    /// A store under `dir` for pipeline `pipeline`.
    pub fn new(dir: &Path, pipeline: &str) -> Self {
        FileStateStore {
            dir: dir.join(pipeline),
        }
    }

    fn partition_dir(&self, topic: &str, partition: i32) -> PathBuf {
        self.dir.join(partition_key(topic, partition))
    }

    fn epochs(&self, dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(dir)(e)),
        };
        Ok(entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "state"))
            .filter_map(|p| {
                let epoch = p.file_stem()?.to_str()?.parse::<u64>().ok()?;
                Some((epoch, p))
            })
            .collect())
    }
}

impl StateStore for FileStateStore {
    fn save(
        &self,
        topic: &str,
        partition: i32,
        epoch: u64,
        state: &PartitionState,
    ) -> Result<(), CheckpointError> {
        let dir = self.partition_dir(topic, partition);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let file = dir.join(format!("{epoch:020}.state"));
        let body = encode(state).map_err(|message| CheckpointError::Corrupt {
            path: file.clone(),
            message,
        })?;
        let tmp = dir.join(format!(".{epoch:020}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, &body).map_err(io(&tmp))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &file).map_err(io(&file))
    }

    fn load(
        &self,
        topic: &str,
        partition: i32,
        epoch: u64,
    ) -> Result<Option<PartitionState>, CheckpointError> {
        let file = self
            .partition_dir(topic, partition)
            .join(format!("{epoch:020}.state"));
        let body = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&file)(e)),
        };
        decode(&body)
            .map(Some)
            .map_err(|message| CheckpointError::Corrupt {
                path: file.clone(),
                message,
            })
    }

    fn prune(&self, topic: &str, partition: i32, keep_from: u64) -> Result<(), CheckpointError> {
        let dir = self.partition_dir(topic, partition);
        for (epoch, path) in self.epochs(&dir)? {
            if epoch < keep_from {
                match std::fs::remove_file(&path) {
                    // Another process pruned it first (a partition changing owners).
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    other => other.map_err(io(&path))?,
                }
            }
        }
        Ok(())
    }

    fn clear(&self) -> Result<(), CheckpointError> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&self.dir)(e)),
            _ => Ok(()),
        }
    }

    fn swap_position(
        &self,
        sink: &str,
        topic: &str,
        partition: i32,
        expected: Option<crate::sink::Position>,
        position: crate::sink::Position,
    ) -> Result<Swap, CheckpointError> {
        let dir = self.partition_dir(topic, partition);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        // Processes sharing the folder take turns: read, compare and replace under one lock
        // (released when the file closes, also when the process dies).
        let lock_path = dir.join(format!(".{sink}.position.lock"));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // Never wait forever: a holder that is frozen (stopped, or its VM paused) would stall
        // this committer, and with it the whole run, past its consumer-group session.
        let deadline = std::time::Instant::now() + POSITION_LOCK_WAIT;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(CheckpointError::Store {
                        location: lock_path.display().to_string(),
                        message: format!(
                            "another process has held this lock for {POSITION_LOCK_WAIT:?}: if no other Flowgate process shares this checkpoint folder, remove the file"
                        ),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
            }
        }
        let recorded = self.position(sink, topic, partition)?;
        if recorded != expected {
            return Ok(Swap::Moved(recorded));
        }
        let file = dir.join(format!("{sink}.position"));
        let tmp = dir.join(format!(".{sink}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, encode_position(position)).map_err(io(&tmp))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &file).map_err(io(&file))?;
        Ok(Swap::Written)
    }

    fn position(
        &self,
        sink: &str,
        topic: &str,
        partition: i32,
    ) -> Result<Option<crate::sink::Position>, CheckpointError> {
        let file = self
            .partition_dir(topic, partition)
            .join(format!("{sink}.position"));
        match std::fs::read(&file) {
            Ok(body) => {
                decode_position(&body)
                    .map(Some)
                    .map_err(|message| CheckpointError::Corrupt {
                        path: file,
                        message,
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&file)(e)),
        }
    }
}

/// The object-store store (`s3://bucket/prefix`): a put is atomic there, so no temp object.
pub struct ObjectStateStore {
    store: std::sync::Arc<dyn object_store::ObjectStore>,
    /// `{prefix}/{pipeline}`.
    root: object_store::path::Path,
    /// `scheme://bucket`, for messages (object paths follow it).
    url: String,
    rt: std::sync::Arc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for ObjectStateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStateStore")
            .field("url", &self.url)
            .finish()
    }
}

impl ObjectStateStore {
    /// A store at `url` (`s3://bucket/prefix`; settings from `AWS_*`, then `options`) for
    /// pipeline `pipeline`; `rt` runs its requests.
    pub fn open(
        url: &url::Url,
        options: &std::collections::HashMap<String, String>,
        pipeline: &str,
        rt: std::sync::Arc<tokio::runtime::Runtime>,
    ) -> Result<Self, CheckpointError> {
        let fail = |message: String| CheckpointError::Store {
            location: url.to_string(),
            message,
        };
        let (store, prefix) = crate::storage::s3_store(url, options, |_| false).map_err(fail)?;
        let bucket = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
        Ok(Self::new(
            std::sync::Arc::new(store),
            prefix,
            &bucket,
            pipeline,
            rt,
        ))
    }

    /// A store in `store` (at `url`, `scheme://bucket`) under `prefix`.
    pub fn new(
        store: std::sync::Arc<dyn object_store::ObjectStore>,
        prefix: object_store::path::Path,
        url: &str,
        pipeline: &str,
        rt: std::sync::Arc<tokio::runtime::Runtime>,
    ) -> Self {
        ObjectStateStore {
            store,
            root: prefix.join(pipeline),
            url: url.to_string(),
            rt,
        }
    }

    fn object(&self, topic: &str, partition: i32, epoch: u64) -> object_store::path::Path {
        self.root
            .clone()
            .join(partition_key(topic, partition))
            .join(format!("{epoch:020}.state"))
    }

    fn position_object(&self, sink: &str, topic: &str, partition: i32) -> object_store::path::Path {
        self.root
            .clone()
            .join(partition_key(topic, partition))
            .join(format!("{sink}.position"))
    }

    fn fail(&self, path: &object_store::path::Path, e: impl std::fmt::Display) -> CheckpointError {
        CheckpointError::Store {
            location: format!("{}/{path}", self.url),
            message: e.to_string(),
        }
    }

    /// The object at `path` decoded with `decode`, or `None` when there is none; a failed read
    /// or a body that does not decode names the object.
    fn read<T>(
        &self,
        path: &object_store::path::Path,
        decode: impl FnOnce(&[u8]) -> Result<T, String>,
    ) -> Result<Option<T>, CheckpointError> {
        use object_store::ObjectStoreExt;
        let body = self.rt.block_on(async {
            match self.store.get(path).await {
                Ok(got) => got.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        match body.map_err(|e| self.fail(path, e))? {
            None => Ok(None),
            Some(bytes) => decode(&bytes)
                .map(Some)
                .map_err(|message| CheckpointError::Corrupt {
                    path: PathBuf::from(format!("{}/{path}", self.url)),
                    message,
                }),
        }
    }
}

impl StateStore for ObjectStateStore {
    fn save(
        &self,
        topic: &str,
        partition: i32,
        epoch: u64,
        state: &PartitionState,
    ) -> Result<(), CheckpointError> {
        use object_store::ObjectStoreExt;
        let path = self.object(topic, partition, epoch);
        let body = encode(state).map_err(|e| self.fail(&path, e))?;
        self.rt
            .block_on(self.store.put(&path, body.into()))
            .map(|_| ())
            .map_err(|e| self.fail(&path, e))
    }

    fn load(
        &self,
        topic: &str,
        partition: i32,
        epoch: u64,
    ) -> Result<Option<PartitionState>, CheckpointError> {
        self.read(&self.object(topic, partition, epoch), decode)
    }

    fn prune(&self, topic: &str, partition: i32, keep_from: u64) -> Result<(), CheckpointError> {
        use futures::TryStreamExt;
        use object_store::ObjectStoreExt;
        let dir = self.root.clone().join(partition_key(topic, partition));
        let listed: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.store.list(Some(&dir)).try_collect())
            .map_err(|e| self.fail(&dir, e))?;
        for meta in listed {
            let epoch = meta
                .location
                .filename()
                .and_then(|n| n.strip_suffix(".state"))
                .and_then(|n| n.parse::<u64>().ok());
            if epoch.is_some_and(|e| e < keep_from) {
                self.rt
                    .block_on(self.store.delete(&meta.location))
                    .map_err(|e| self.fail(&meta.location, e))?;
            }
        }
        Ok(())
    }

    fn clear(&self) -> Result<(), CheckpointError> {
        crate::storage::remove_objects(self.store.as_ref(), &self.root, &self.rt)
            .map_err(|e| self.fail(&self.root, e))
    }

    fn swap_position(
        &self,
        sink: &str,
        topic: &str,
        partition: i32,
        expected: Option<crate::sink::Position>,
        position: crate::sink::Position,
    ) -> Result<Swap, CheckpointError> {
        // A put that failed on the way is tried again from the read: if it had landed, the
        // record now holds `position`, which the caller takes as its own write (`Moved` to
        // exactly the position it wrote).
        let mut retries = crate::storage::Retries::new();
        loop {
            match self.try_swap_position(sink, topic, partition, expected, position) {
                Err(Attempt::Transient(e)) if retries.wait("a position record", &e) => {}
                Err(Attempt::Transient(e) | Attempt::Failed(e)) => return Err(e),
                Ok(swap) => return Ok(swap),
            }
        }
    }

    fn position(
        &self,
        sink: &str,
        topic: &str,
        partition: i32,
    ) -> Result<Option<crate::sink::Position>, CheckpointError> {
        self.read(
            &self.position_object(sink, topic, partition),
            decode_position,
        )
    }
}

/// How one attempt at a conditional put ended, when not with an answer.
enum Attempt {
    /// The put's request failed on the way: it may or may not have landed.
    Transient(CheckpointError),
    Failed(CheckpointError),
}

impl From<CheckpointError> for Attempt {
    fn from(e: CheckpointError) -> Self {
        Attempt::Failed(e)
    }
}

impl ObjectStateStore {
    /// One attempt of [`StateStore::swap_position`].
    fn try_swap_position(
        &self,
        sink: &str,
        topic: &str,
        partition: i32,
        expected: Option<crate::sink::Position>,
        position: crate::sink::Position,
    ) -> Result<Swap, Attempt> {
        use object_store::{ObjectStoreExt, PutMode, PutOptions, UpdateVersion};
        let path = self.position_object(sink, topic, partition);
        // Read the record with its version, then put only over that version (`If-Match`), or
        // only where there is none (`If-None-Match: *`): a writer in between fails the put.
        let read = self.rt.block_on(async {
            match self.store.get(&path).await {
                Ok(got) => {
                    let version = UpdateVersion {
                        e_tag: got.meta.e_tag.clone(),
                        version: got.meta.version.clone(),
                    };
                    got.bytes().await.map(|body| Some((body, version)))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        let (recorded, mode) = match read.map_err(|e| self.fail(&path, e))? {
            None => (None, PutMode::Create),
            Some((body, version)) => {
                let recorded =
                    decode_position(&body).map_err(|message| CheckpointError::Corrupt {
                        path: PathBuf::from(format!("{}/{path}", self.url)),
                        message,
                    })?;
                (Some(recorded), PutMode::Update(version))
            }
        };
        if recorded != expected {
            return Ok(Swap::Moved(recorded));
        }
        let put = self.rt.block_on(self.store.put_opts(
            &path,
            encode_position(position).into(),
            PutOptions::from(mode),
        ));
        match put {
            Ok(_) => Ok(Swap::Written),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(Swap::Moved(self.position(sink, topic, partition)?)),
            Err(e) if crate::storage::is_transient(&e) => {
                Err(Attempt::Transient(self.fail(&path, e)))
            }
            Err(e) => Err(Attempt::Failed(self.fail(&path, e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(offset: i64) -> PartitionState {
        PartitionState {
            offset,
            max_event: Some(offset * 1000),
            watermark: Some(offset * 1000 - 5),
            steps: vec![
                StepState {
                    step: "dedup".into(),
                    snapshot: vec![1, 2, offset as u8].into(),
                    delta_of: (offset > 1).then(|| offset as u64 - 1),
                },
                StepState {
                    step: "bars".into(),
                    snapshot: ::bytes::Bytes::new(),
                    delta_of: None,
                },
            ],
            root: (offset > 1).then_some(1),
            previous: Some(offset as u64),
            sources: vec![SourceMark {
                topic: "ticks".into(),
                partition: 2,
                offset: offset * 7,
                watermark: Some(offset),
                idle: offset % 2 == 0,
            }],
        }
    }

    #[test]
    fn states_of_the_previous_formats_still_read() {
        let steps = vec![("dedup".to_string(), vec![7u8])];
        let expected = vec![StepState {
            step: "dedup".into(),
            snapshot: vec![7].into(),
            delta_of: None,
        }];
        #[derive(Serialize)]
        struct V2<'a>(i64, Option<i64>, Option<i64>, &'a [(String, Vec<u8>)]);
        let mut body = OLD_MAGIC.to_vec();
        body.extend(postcard::to_stdvec(&V2(41, Some(9), Some(4), &steps)).unwrap());
        let read = decode(&body).unwrap();
        assert_eq!(
            (read.offset, read.max_event, read.watermark),
            (41, Some(9), Some(4))
        );
        assert_eq!(read.steps, expected);
        assert_eq!(
            (read.previous, read.sources.len(), read.root),
            (None, 0, None)
        );

        #[derive(Serialize)]
        struct V3<'a>(
            i64,
            Option<i64>,
            Option<i64>,
            &'a [(String, Vec<u8>)],
            Option<u64>,
            &'a [SourceMark],
        );
        let marks = state(3).sources;
        let mut body = V3_MAGIC.to_vec();
        body.extend(
            postcard::to_stdvec(&V3(41, Some(9), Some(4), &steps, Some(17), &marks)).unwrap(),
        );
        let read = decode(&body).unwrap();
        assert_eq!(read.steps, expected);
        assert_eq!(
            (read.previous, read.sources, read.root),
            (Some(17), marks, None)
        );
    }

    #[test]
    fn a_step_stored_as_deltas_resolves_to_its_full_snapshot_and_the_deltas_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStateStore::new(dir.path(), "p");
        let step = |name: &str, bytes: &[u8], delta_of: Option<u64>| StepState {
            step: name.into(),
            snapshot: ::bytes::Bytes::copy_from_slice(bytes),
            delta_of,
        };
        let at = |offset: i64, steps: Vec<StepState>, root: Option<u64>| PartitionState {
            offset,
            steps,
            root,
            ..state(offset)
        };
        // `dedup`: full at 1, deltas at 2 and 4 (3 went on from another line); `bars`: whole
        // every time.
        store
            .save(
                "t",
                0,
                1,
                &at(
                    10,
                    vec![step("dedup", b"F1", None), step("bars", b"b1", None)],
                    None,
                ),
            )
            .unwrap();
        store
            .save(
                "t",
                0,
                2,
                &at(
                    20,
                    vec![step("dedup", b"d2", Some(1)), step("bars", b"b2", None)],
                    Some(1),
                ),
            )
            .unwrap();
        store
            .save(
                "t",
                0,
                3,
                &at(
                    30,
                    vec![step("dedup", b"x3", Some(1)), step("bars", b"b3", None)],
                    Some(1),
                ),
            )
            .unwrap();
        let four = at(
            40,
            vec![step("dedup", b"d4", Some(2)), step("bars", b"b4", None)],
            Some(1),
        );
        store.save("t", 0, 4, &four).unwrap();
        assert_eq!(four.needs_from(4), 1);
        let chains = resolve(&store, "t", 0, 4, four.steps.clone()).unwrap();
        assert_eq!(
            chains,
            vec![
                StepChain {
                    step: "dedup".into(),
                    full: ::bytes::Bytes::from_static(b"F1"),
                    deltas: vec![
                        ::bytes::Bytes::from_static(b"d2"),
                        ::bytes::Bytes::from_static(b"d4")
                    ],
                    root: 1,
                },
                StepChain {
                    step: "bars".into(),
                    full: ::bytes::Bytes::from_static(b"b4"),
                    deltas: vec![],
                    root: 4,
                },
            ]
        );
        // A link to a checkpoint that is gone is an error that names it, never a silent reset.
        store.prune("t", 0, 2).unwrap();
        let gone = resolve(&store, "t", 0, 4, four.steps.clone())
            .unwrap_err()
            .to_string();
        assert!(
            gone.contains("step `dedup`")
                && gone.contains("checkpoint 1")
                && gone.contains("not in the store"),
            "{gone}"
        );
    }

    #[test]
    fn two_writers_going_on_from_one_epoch_never_share_a_name() {
        let (a, b) = (0x00ab_cdefu64, 0x0012_3456u64);
        let legacy = 5;
        let (ea, eb) = (next_epoch(legacy, a), next_epoch(legacy, b));
        assert!(ea > legacy && eb > legacy && ea != eb);
        assert!(
            next_epoch(ea, b) > ea.max(eb),
            "the count goes on whoever wrote last"
        );
        assert_eq!(epoch_label(ea), "1.abcdef");
        assert_eq!(epoch_label(legacy), "5");
        assert!(writer_tag() > 0 && writer_tag() < 1 << WRITER_BITS);
    }

    #[test]
    fn the_object_store_keeps_states_the_same_way() {
        let rt = std::sync::Arc::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        );
        let memory = std::sync::Arc::new(object_store::memory::InMemory::new());
        let store = ObjectStateStore::new(
            memory.clone(),
            object_store::path::Path::from("run/_checkpoints"),
            "memory://test",
            "p",
            rt.clone(),
        );
        for epoch in 1..=10 {
            store.save("ticks", 3, epoch, &state(epoch as i64)).unwrap();
        }
        assert_eq!(store.load("ticks", 3, 9).unwrap(), Some(state(9)));
        store.prune("ticks", 3, 8).unwrap();
        assert_eq!(store.load("ticks", 3, 7).unwrap(), None, "older pruned");
        assert_eq!(store.load("ticks", 3, 8).unwrap(), Some(state(8)), "kept");
        assert_eq!(store.load("ticks", 4, 9).unwrap(), None);
        use object_store::ObjectStoreExt;
        let object =
            object_store::path::Path::from(format!("run/_checkpoints/p/ticks-3/{:020}.state", 9));
        rt.block_on(memory.put(&object, b"FGC2\xff\xff".to_vec().into()))
            .unwrap();
        let damaged = store
            .load("ticks", 3, 9)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            damaged.contains("memory://test/run/_checkpoints/p/ticks-3/00000000000000000009.state")
                && damaged.contains("is damaged"),
            "{damaged}"
        );
    }

    /// Two writers that read the same record race to replace it: one wins, the other learns
    /// what the winner wrote, whatever the interleaving.
    fn swaps_go_to_one_writer(store: &(dyn StateStore + 'static)) {
        use crate::sink::Position;
        let at = |offset, epoch| Position { offset, epoch };
        assert_eq!(store.position("hop", "ticks", 2).unwrap(), None);
        assert_eq!(
            store
                .swap_position("hop", "ticks", 2, None, at(10, 1))
                .unwrap(),
            Swap::Written
        );
        assert_eq!(
            store
                .swap_position("hop", "ticks", 2, None, at(11, 2))
                .unwrap(),
            Swap::Moved(Some(at(10, 1))),
            "a writer that read nothing cannot replace a record"
        );
        assert_eq!(
            store
                .swap_position("hop", "ticks", 2, Some(at(9, 1)), at(11, 2))
                .unwrap(),
            Swap::Moved(Some(at(10, 1))),
            "nor one that read another"
        );
        assert_eq!(store.position("hop", "ticks", 2).unwrap(), Some(at(10, 1)));
        for round in 0..20 {
            let from = store.position("hop", "ticks", 2).unwrap();
            let won: Vec<Swap> = std::thread::scope(|s| {
                let racers: Vec<_> = (0..2)
                    .map(|w| {
                        s.spawn(move || {
                            store
                                .swap_position("hop", "ticks", 2, from, at(100 + round, w))
                                .unwrap()
                        })
                    })
                    .collect();
                racers.into_iter().map(|r| r.join().unwrap()).collect()
            });
            let winners = won.iter().filter(|w| **w == Swap::Written).count();
            assert_eq!(winners, 1, "round {round}: {won:?}");
            let held = store.position("hop", "ticks", 2).unwrap();
            assert!(
                won.contains(&Swap::Moved(held)),
                "the loser learns the winner's record"
            );
        }
    }

    #[test]
    fn a_position_is_replaced_only_over_the_record_its_writer_read() {
        let dir = tempfile::tempdir().unwrap();
        swaps_go_to_one_writer(&FileStateStore::new(dir.path(), "p"));
        let rt = std::sync::Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
        );
        swaps_go_to_one_writer(&ObjectStateStore::new(
            std::sync::Arc::new(object_store::memory::InMemory::new()),
            object_store::path::Path::from("run/_checkpoints"),
            "memory://test",
            "p",
            rt,
        ));
    }

    #[test]
    fn a_position_put_that_fails_on_the_way_is_tried_again() {
        use crate::sink::Position;
        use crate::storage::flaky::{Flaky, Lose};
        let at = |offset, epoch| Position { offset, epoch };
        let rt = std::sync::Arc::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        );
        let flaky = std::sync::Arc::new(Flaky::new(vec![Lose::Request]));
        let store = ObjectStateStore::new(
            flaky.clone(),
            object_store::path::Path::from("run/_checkpoints"),
            "memory://test",
            "p",
            rt,
        );
        // Lost request: the retry writes it.
        assert_eq!(
            store
                .swap_position("hop", "ticks", 0, None, at(10, 1))
                .unwrap(),
            Swap::Written
        );
        assert!(flaky.fail.lock().unwrap().is_empty());
        // Lost reply: the retry finds this very position, which the hop sink takes as its own.
        *flaky.fail.lock().unwrap() = vec![Lose::Reply];
        assert_eq!(
            store
                .swap_position("hop", "ticks", 0, Some(at(10, 1)), at(20, 2))
                .unwrap(),
            Swap::Moved(Some(at(20, 2)))
        );
        assert_eq!(store.position("hop", "ticks", 0).unwrap(), Some(at(20, 2)));
        assert!(flaky.fail.lock().unwrap().is_empty());
        // A store that keeps failing: the error stands after the retries.
        *flaky.fail.lock().unwrap() = vec![Lose::Request; 4];
        let err = store
            .swap_position("hop", "ticks", 0, Some(at(20, 2)), at(30, 3))
            .unwrap_err();
        assert!(err.to_string().contains("connection reset"), "{err}");
        assert!(
            flaky.fail.lock().unwrap().is_empty(),
            "1 attempt + 3 retries"
        );
        assert_eq!(store.position("hop", "ticks", 0).unwrap(), Some(at(20, 2)));
    }

    #[test]
    fn a_state_is_stored_as_the_magic_then_postcard_and_reads_back() {
        let mut state = state(7);
        state.steps[1].snapshot = (0..=255u8).cycle().take(100_000).collect::<Vec<_>>().into();
        let body = encode(&state).unwrap();
        let mut expected = MAGIC.to_vec();
        expected.extend(postcard::to_stdvec(&state).unwrap());
        assert_eq!(body, expected);
        assert_eq!(decode(&body).unwrap(), state);
    }

    #[test]
    fn snapshot_bytes_are_stored_as_serde_s_default_stored_them() {
        #[derive(Serialize)]
        struct ByteByByte<'a> {
            step: &'a str,
            snapshot: Vec<u8>,
            delta_of: Option<u64>,
        }
        let snapshot: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let state = StepState {
            step: "dedup".into(),
            snapshot: snapshot.clone().into(),
            delta_of: Some(3),
        };
        let ours = postcard::to_stdvec(&state).unwrap();
        let before = postcard::to_stdvec(&ByteByByte {
            step: "dedup",
            snapshot,
            delta_of: Some(3),
        })
        .unwrap();
        assert_eq!(ours, before, "the same bytes on disk");
        assert_eq!(postcard::from_bytes::<StepState>(&before).unwrap(), state);
    }

    #[test]
    fn saves_loads_and_prunes_only_older_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStateStore::new(dir.path(), "p");
        for epoch in 1..=10 {
            store.save("ticks", 3, epoch, &state(epoch as i64)).unwrap();
        }
        assert_eq!(store.load("ticks", 3, 9).unwrap(), Some(state(9)));
        store.prune("ticks", 3, 8).unwrap();
        assert_eq!(store.load("ticks", 3, 7).unwrap(), None, "older pruned");
        assert_eq!(store.load("ticks", 3, 8).unwrap(), Some(state(8)), "kept");
        assert_eq!(store.load("ticks", 3, 10).unwrap(), Some(state(10)), "kept");
        assert_eq!(store.load("ticks", 4, 9).unwrap(), None);
        let file = dir
            .path()
            .join("p/ticks-3")
            .join(format!("{:020}.state", 9));
        std::fs::write(&file, b"FGC2\xff\xff").unwrap();
        assert!(matches!(
            store.load("ticks", 3, 9),
            Err(CheckpointError::Corrupt { .. })
        ));
    }
}

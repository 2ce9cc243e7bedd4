//! The plugin-state store: what each partition's steps held at each checkpoint epoch.
//!
//! A partition's checkpoints are numbered (its *epoch*, counted per partition across runs and
//! processes). The committer stores epoch `E`'s state before any sink commits `E`, and the sinks
//! record `E` with the offset they cover (see [`crate::sink::Position`]); so a restart that finds
//! a sink at epoch `E` finds the state that goes with it. A state is never overwritten by a
//! different one under a committed epoch, and only epochs older than every sink's are pruned.
//!
//! Layout of the file store: `{dir}/{pipeline}/{topic}-{partition}/{epoch:020}.state`, written
//! atomically (temp + rename); body: `FGC2` then the postcard encoding of [`PartitionState`].
//! [`StateStore`] is the trait, so an object-store implementation can sit beside this one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 4] = b"FGC2";

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
    /// A state file is damaged.
    #[error("checkpoint `{path}` is damaged: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// One step's snapshot, stored under the step's name (so adding, removing or reordering steps
/// restores each surviving step its own state). The plugin's state version is inside the bytes
/// (the SDK frames it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepState {
    /// The step's name in the pipeline.
    pub step: String,
    /// The snapshot bytes, as the plugin gave them.
    pub snapshot: Vec<u8>,
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
        self.dir.join(format!("{topic}-{partition}"))
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
        let mut body = MAGIC.to_vec();
        body.extend(
            postcard::to_stdvec(state).map_err(|e| CheckpointError::Corrupt {
                path: file.clone(),
                message: format!("cannot encode: {e}"),
            })?,
        );
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
        let corrupt = |message: String| CheckpointError::Corrupt {
            path: file.clone(),
            message,
        };
        let rest = body
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| corrupt("bad header (written by an older Flowgate?)".into()))?;
        postcard::from_bytes(rest)
            .map(Some)
            .map_err(|e| corrupt(e.to_string()))
    }

    fn prune(&self, topic: &str, partition: i32, keep_from: u64) -> Result<(), CheckpointError> {
        let dir = self.partition_dir(topic, partition);
        for (epoch, path) in self.epochs(&dir)? {
            if epoch < keep_from {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        Ok(())
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
                    snapshot: vec![1, 2, offset as u8],
                },
                StepState {
                    step: "bars".into(),
                    snapshot: vec![],
                },
            ],
        }
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

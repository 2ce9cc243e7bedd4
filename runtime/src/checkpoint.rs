//! The plugin-state store: one file per partition and checkpoint offset, holding every step's
//! snapshot. Written before the sinks commit that offset, so a restart that resumes after offset
//! `O` (the offset the sinks hold) finds the state as it was right after `O`.
//!
//! Layout: `{dir}/{pipeline}/{topic}-{partition}/{offset:020}.state`; body: `FGCK`, the
//! partition's newest event time (i64 LE, `i64::MIN` for none), step count (u32 LE), then per step
//! a length (u32 LE) and the snapshot bytes. Files appear atomically
//! (temp + rename); the newest few per partition are kept.

use std::path::{Path, PathBuf};

/// Snapshots kept per partition (older ones are deleted after a checkpoint).
const KEEP: usize = 4;
const MAGIC: &[u8; 4] = b"FGCK";

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

/// What a checkpoint holds for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    /// The newest event time seen (ms), so the watermark resumes where it was.
    pub max_event: Option<i64>,
    /// Each step's snapshot, in chain order.
    pub snapshots: Vec<Vec<u8>>,
}

/// The store for one pipeline.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl CheckpointStore {
    /// A store under `dir` for pipeline `pipeline`.
    pub fn new(dir: &Path, pipeline: &str) -> Self {
        CheckpointStore {
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

    /// Stores the step snapshots taken right after `offset`.
    pub fn save(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        state: &PartitionState,
    ) -> Result<(), CheckpointError> {
        let snapshots = &state.snapshots;
        let dir = self.partition_dir(topic, partition);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut body =
            Vec::with_capacity(16 + snapshots.iter().map(|s| s.len() + 4).sum::<usize>());
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&state.max_event.unwrap_or(i64::MIN).to_le_bytes());
        body.extend_from_slice(&(snapshots.len() as u32).to_le_bytes());
        for s in snapshots {
            body.extend_from_slice(&(s.len() as u32).to_le_bytes());
            body.extend_from_slice(s);
        }
        let file = dir.join(format!("{offset:020}.state"));
        let tmp = dir.join(format!(".{offset:020}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, &body).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &file).map_err(io(&file))?;
        self.prune(&dir)
    }

    fn prune(&self, dir: &Path) -> Result<(), CheckpointError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "state"))
            .collect();
        files.sort();
        let excess = files.len().saturating_sub(KEEP);
        for old in &files[..excess] {
            std::fs::remove_file(old).map_err(io(old))?;
        }
        Ok(())
    }

    /// The step snapshots stored right after `offset`, if any.
    pub fn load(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Option<PartitionState>, CheckpointError> {
        let file = self
            .partition_dir(topic, partition)
            .join(format!("{offset:020}.state"));
        let body = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&file)(e)),
        };
        let corrupt = |message: &str| CheckpointError::Corrupt {
            path: file.clone(),
            message: message.into(),
        };
        let rest = body
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| corrupt("bad header"))?;
        let (max_event, rest) = rest
            .split_at_checked(8)
            .ok_or_else(|| corrupt("truncated"))?;
        let max_event = i64::from_le_bytes(max_event.try_into().map_err(|_| corrupt("truncated"))?);
        let (count, mut rest) = rest
            .split_at_checked(4)
            .ok_or_else(|| corrupt("truncated"))?;
        let count = u32::from_le_bytes(count.try_into().map_err(|_| corrupt("truncated"))?);
        let mut snapshots = Vec::new();
        for _ in 0..count {
            let (len, tail) = rest
                .split_at_checked(4)
                .ok_or_else(|| corrupt("truncated"))?;
            let len =
                u32::from_le_bytes(len.try_into().map_err(|_| corrupt("truncated"))?) as usize;
            let (snapshot, tail) = tail
                .split_at_checked(len)
                .ok_or_else(|| corrupt("truncated"))?;
            snapshots.push(snapshot.to_vec());
            rest = tail;
        }
        Ok(Some(PartitionState {
            max_event: (max_event != i64::MIN).then_some(max_event),
            snapshots,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path(), "p");
        for offset in 0..10 {
            let state = PartitionState {
                max_event: Some(offset * 1000),
                snapshots: vec![vec![1, 2, offset as u8], vec![]],
            };
            store.save("ticks", 3, offset, &state).unwrap();
        }
        let want = PartitionState {
            max_event: Some(9000),
            snapshots: vec![vec![1, 2, 9], vec![]],
        };
        assert_eq!(store.load("ticks", 3, 9).unwrap(), Some(want));
        assert_eq!(store.load("ticks", 3, 2).unwrap(), None, "old ones pruned");
        assert_eq!(store.load("ticks", 4, 9).unwrap(), None);
        let file = dir
            .path()
            .join("p/ticks-3")
            .join(format!("{:020}.state", 9));
        std::fs::write(&file, b"FGCK\0\0\0\0\0\0\0\x80\x05\x00\x00\x00").unwrap();
        assert!(matches!(
            store.load("ticks", 3, 9),
            Err(CheckpointError::Corrupt { .. })
        ));
    }
}

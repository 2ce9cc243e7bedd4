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
    /// The object store could not be read or written.
    #[error("checkpoint store `{location}`: {message}")]
    Store {
        /// The object's URL.
        location: String,
        /// Why.
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

/// A state as stored: the magic, then postcard.
fn encode(state: &PartitionState) -> Result<Vec<u8>, String> {
    let mut body = MAGIC.to_vec();
    body.extend(postcard::to_stdvec(state).map_err(|e| format!("cannot encode: {e}"))?);
    Ok(body)
}

/// A stored state read back.
fn decode(body: &[u8]) -> Result<PartitionState, String> {
    let rest = body
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| "bad header (written by an older Flowgate?)".to_string())?;
    postcard::from_bytes(rest).map_err(|e| e.to_string())
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
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        Ok(())
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

    fn fail(&self, path: &object_store::path::Path, e: impl std::fmt::Display) -> CheckpointError {
        CheckpointError::Store {
            location: format!("{}/{path}", self.url),
            message: e.to_string(),
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
        use object_store::ObjectStoreExt;
        let path = self.object(topic, partition, epoch);
        let body = self.rt.block_on(async {
            match self.store.get(&path).await {
                Ok(got) => got.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        match body.map_err(|e| self.fail(&path, e))? {
            None => Ok(None),
            Some(bytes) => decode(&bytes)
                .map(Some)
                .map_err(|message| CheckpointError::Corrupt {
                    path: PathBuf::from(format!("{}/{path}", self.url)),
                    message,
                }),
        }
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

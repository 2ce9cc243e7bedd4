//! Where a Parquet or CSV table's files live: a local folder, or a prefix in an object store
//! (S3, MinIO). The file sink's commit protocol (stage, log entry, move into place, roll
//! forward) needs only the few operations here; a folder does them with `rename` and `fsync`,
//! a bucket with a server-side copy and delete, and writes each log entry with a conditional
//! put (`If-None-Match: *`), so an entry is never overwritten.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use object_store::WriteMultipart;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions};
use tokio::runtime::Runtime;

use crate::storage::TableLocation;

/// The commit log's folder inside a table.
pub(crate) const LOG: &str = "_flowgate_log";
/// Where files are written until a commit names them; readers never look here.
pub(crate) const STAGING: &str = "_flowgate_staging";

/// A staged file larger than this is uploaded in parts of this size as it is written, so a
/// commit's files never sit whole in memory.
const PART_SIZE: usize = 16 << 20;
/// Parts uploaded at once per file.
const PART_CONCURRENCY: usize = 2;

/// A file table's home.
pub(crate) enum Place {
    /// A local folder.
    Folder(PathBuf),
    /// A prefix in an object store.
    Bucket(Bucket),
}

/// A table in an object store.
pub(crate) struct Bucket {
    store: Arc<dyn ObjectStore>,
    root: ObjectPath,
    /// `s3://bucket/prefix`, for messages.
    url: String,
    rt: Arc<Runtime>,
    part_size: usize,
}

/// A staged file in the making.
pub(crate) enum Out {
    File(std::fs::File),
    Object(Box<ObjectOut>),
}

/// A staged object: bytes are buffered and, past [`PART_SIZE`], uploaded in parts.
pub(crate) struct ObjectOut {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    rt: Arc<Runtime>,
    buffer: Vec<u8>,
    upload: Option<WriteMultipart>,
    part_size: usize,
}

/// A file in the staging area: its path inside the table and how long ago it was written.
pub(crate) struct Staged {
    pub rel: String,
    pub age: Option<std::time::Duration>,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Folder(dir) => write!(f, "{}", dir.display()),
            Place::Bucket(b) => f.write_str(&b.url),
        }
    }
}

fn io_error(e: object_store::Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl Place {
    /// The home `location` names; `rt` runs an object store's requests.
    pub fn at(location: &TableLocation, rt: &Arc<Runtime>) -> Result<Self, String> {
        if let Some(dir) = &location.local {
            return Ok(Place::Folder(dir.clone()));
        }
        let (store, root) = crate::storage::s3_store(&location.url, &location.options, |_| false)?;
        Ok(Place::Bucket(Bucket::new(
            Arc::new(store),
            root,
            location.url.as_str().trim_end_matches('/'),
            rt.clone(),
        )))
    }

    /// Makes the table's folders exist (an object store has none to make).
    pub fn prepare(&self) -> Result<(), String> {
        match self {
            Place::Folder(dir) => std::fs::create_dir_all(dir.join(LOG))
                .and_then(|_| std::fs::create_dir_all(dir.join(STAGING)))
                .map_err(|e| format!("cannot create the folder: {e}")),
            Place::Bucket(_) => Ok(()),
        }
    }

    /// The commit-log entries' names (`*.json`), sorted; none when the table does not exist.
    pub fn log_names(&self) -> Result<Vec<String>, String> {
        let mut names = match self {
            Place::Folder(dir) => match std::fs::read_dir(dir.join(LOG)) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(format!("{}: {e}", dir.join(LOG).display())),
                Ok(entries) => entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect(),
            },
            Place::Bucket(b) => b
                .list(&b.key(LOG).map_err(|e| e.to_string())?)?
                .into_iter()
                .map(|(rel, _)| rel)
                .collect(),
        };
        names.retain(|n| n.ends_with(".json"));
        names.sort();
        Ok(names)
    }

    /// The text of log entry `name`.
    pub fn read_log(&self, name: &str) -> Result<String, String> {
        match self {
            Place::Folder(dir) => {
                let path = dir.join(LOG).join(name);
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
            }
            Place::Bucket(b) => {
                let path = b.key(&format!("{LOG}/{name}")).map_err(|e| e.to_string())?;
                let body =
                    b.rt.block_on(async { b.store.get(&path).await?.bytes().await })
                        .map_err(|e| format!("{}/{LOG}/{name}: {e}", b.url))?;
                String::from_utf8(body.to_vec()).map_err(|e| format!("{}/{LOG}/{name}: {e}", b.url))
            }
        }
    }

    /// Writes log entry `name`, whole or not at all, and durably: a folder writes a temporary
    /// file, syncs it and renames it; a bucket puts it only if no entry of that name exists.
    pub fn write_log(&self, name: &str, text: String) -> Result<(), String> {
        match self {
            Place::Folder(dir) => {
                let log = dir.join(LOG).join(name);
                let tmp = log.with_extension("json.tmp");
                std::fs::write(&tmp, text)
                    .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
                    .and_then(|_| std::fs::rename(&tmp, &log))
                    .map_err(|e| e.to_string())
            }
            Place::Bucket(b) => {
                let path = b.key(&format!("{LOG}/{name}")).map_err(|e| e.to_string())?;
                // A put that failed on the way is tried again; finding the entry then, with
                // this text, means the failed one had landed (only its reply was lost).
                let mut retries = crate::storage::Retries::new();
                let payload = object_store::PutPayload::from(text.clone());
                loop {
                    let options = PutOptions::from(PutMode::Create);
                    match b
                        .rt
                        .block_on(b.store.put_opts(&path, payload.clone(), options))
                    {
                        Ok(_) => return Ok(()),
                        Err(object_store::Error::AlreadyExists { .. })
                            if retries.retrying()
                                && self.read_log(name).is_ok_and(|t| t == text) =>
                        {
                            return Ok(());
                        }
                        Err(object_store::Error::AlreadyExists { .. }) => {
                            return Err(format!(
                                "{}/{LOG}/{name} exists already: another writer took this process's name",
                                b.url
                            ));
                        }
                        Err(e)
                            if crate::storage::is_transient(&e)
                                && retries.wait(&format!("{}/{LOG}/{name}", b.url), &e) => {}
                        Err(e) => return Err(e.to_string()),
                    }
                }
            }
        }
    }

    /// A new staged file at `rel` (inside the staging area).
    pub fn create_staged(&self, rel: &str) -> std::io::Result<Out> {
        match self {
            Place::Folder(dir) => {
                let tmp = dir.join(STAGING).join(rel);
                if let Some(parent) = tmp.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                Ok(Out::File(std::fs::File::create(&tmp)?))
            }
            Place::Bucket(b) => Ok(Out::Object(Box::new(ObjectOut {
                store: b.store.clone(),
                path: b.staged(rel)?,
                rt: b.rt.clone(),
                buffer: Vec::new(),
                upload: None,
                part_size: b.part_size,
            }))),
        }
    }

    /// Every file in the staging area.
    pub fn staged_files(&self) -> std::io::Result<Vec<Staged>> {
        match self {
            Place::Folder(dir) => {
                let staging = dir.join(STAGING);
                let mut out = Vec::new();
                let mut stack = vec![staging.clone()];
                while let Some(d) = stack.pop() {
                    let entries = match std::fs::read_dir(&d) {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        other => other?,
                    };
                    for entry in entries {
                        let path = entry?.path();
                        if path.is_dir() {
                            stack.push(path);
                            continue;
                        }
                        let Ok(rel) = path.strip_prefix(&staging) else {
                            continue;
                        };
                        let age = std::fs::metadata(&path)
                            .and_then(|m| m.modified())
                            .ok()
                            .and_then(|t| t.elapsed().ok());
                        out.push(Staged {
                            rel: rel.to_string_lossy().into_owned(),
                            age,
                        });
                    }
                }
                Ok(out)
            }
            Place::Bucket(b) => {
                let now = chrono::Utc::now();
                Ok(b.list(&b.key(STAGING)?)
                    .map_err(std::io::Error::other)?
                    .into_iter()
                    .map(|(rel, modified)| Staged {
                        rel,
                        age: (now - modified).to_std().ok(),
                    })
                    .collect())
            }
        }
    }

    /// Moves committed file `rel` from staging into place; already in place (another process
    /// finished the move) counts as done.
    pub fn move_into_place(&self, rel: &str) -> std::io::Result<()> {
        match self {
            Place::Folder(dir) => {
                let (staged, path) = (dir.join(STAGING).join(rel), dir.join(rel));
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                match std::fs::rename(&staged, &path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.exists() => Ok(()),
                    other => other,
                }
            }
            Place::Bucket(b) => {
                let (staged, path) = (b.staged(rel)?, b.key(rel)?);
                b.rt.block_on(async {
                    match b.store.copy(&staged, &path).await {
                        Err(object_store::Error::NotFound { .. }) => {
                            // Moved already, or never staged: only the first is fine.
                            b.store.head(&path).await.map(|_| ())
                        }
                        Err(e) => Err(e),
                        Ok(()) => match b.store.delete(&staged).await {
                            Err(object_store::Error::NotFound { .. }) | Ok(()) => Ok(()),
                            Err(e) => Err(e),
                        },
                    }
                })
                .map_err(io_error)
            }
        }
    }

    /// Deletes staged file `rel`.
    pub fn remove_staged(&self, rel: &str) -> std::io::Result<()> {
        match self {
            Place::Folder(dir) => std::fs::remove_file(dir.join(STAGING).join(rel)),
            Place::Bucket(b) => {
                b.rt.block_on(b.store.delete(&b.staged(rel)?))
                    .map_err(io_error)
            }
        }
    }
}

impl Bucket {
    /// A table under `root` in `store` (named `url` in messages).
    pub fn new(store: Arc<dyn ObjectStore>, root: ObjectPath, url: &str, rt: Arc<Runtime>) -> Self {
        Bucket {
            store,
            root,
            url: url.to_string(),
            rt,
            part_size: PART_SIZE,
        }
    }

    /// Uploads in parts of `bytes` from that size on (tests use small parts).
    #[cfg(test)]
    pub fn with_part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes;
        self
    }

    /// The object `rel` names under the table, taken as it is: partition folders are already
    /// escaped (`k=a%2Fb`), and `ObjectPath::join` would escape their `%` a second time, so
    /// keys and listings would disagree.
    fn key(&self, rel: &str) -> std::io::Result<ObjectPath> {
        let root = self.root.as_ref();
        let full = if root.is_empty() {
            rel.to_string()
        } else {
            format!("{root}/{rel}")
        };
        ObjectPath::parse(&full)
            .map_err(|e| std::io::Error::other(format!("`{full}` is no object key: {e}")))
    }

    fn staged(&self, rel: &str) -> std::io::Result<ObjectPath> {
        self.key(&format!("{STAGING}/{rel}"))
    }

    /// The objects under `prefix`, as paths relative to it, with their modification times.
    fn list(
        &self,
        prefix: &ObjectPath,
    ) -> Result<Vec<(String, chrono::DateTime<chrono::Utc>)>, String> {
        use futures::TryStreamExt;
        let objects: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.store.list(Some(prefix)).try_collect())
            .map_err(|e| format!("listing {}/{prefix}: {e}", self.url))?;
        let start = format!("{}/", prefix.as_ref());
        Ok(objects
            .into_iter()
            .filter_map(|meta| {
                let rel = meta.location.as_ref().strip_prefix(&start)?.to_string();
                Some((rel, meta.last_modified))
            })
            .collect())
    }
}

impl std::io::Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Out::File(file) => file.write(buf),
            Out::Object(object) => {
                object.buffer.extend_from_slice(buf);
                if object.buffer.len() >= object.part_size {
                    object.send_part()?;
                }
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Out::File(file) => file.flush(),
            Out::Object(_) => Ok(()),
        }
    }
}

impl ObjectOut {
    /// Starts the upload if need be and hands it the buffer as the next part.
    fn send_part(&mut self) -> std::io::Result<()> {
        let (store, path, rt) = (&self.store, &self.path, &self.rt);
        let upload = match &mut self.upload {
            Some(upload) => upload,
            None => {
                let started = rt.block_on(store.put_multipart(path)).map_err(io_error)?;
                self.upload
                    .insert(WriteMultipart::new_with_chunk_size(started, self.part_size))
            }
        };
        let part = Bytes::from(std::mem::take(&mut self.buffer));
        // `put` starts the part's upload as a task: it must run inside the runtime.
        rt.block_on(async {
            upload.wait_for_capacity(PART_CONCURRENCY).await?;
            upload.put(part);
            Ok(())
        })
        .map_err(io_error)
    }
}

impl Out {
    /// Finishes the file and makes it durable: synced to disk, or uploaded whole.
    pub fn finish(self) -> std::io::Result<()> {
        match self {
            Out::File(mut file) => {
                file.flush()?;
                file.sync_all()
            }
            Out::Object(object) => {
                let ObjectOut {
                    store,
                    path,
                    rt,
                    buffer,
                    upload,
                    ..
                } = *object;
                rt.block_on(async {
                    match upload {
                        None => store.put(&path, buffer.into()).await.map(|_| ()),
                        Some(mut upload) => {
                            upload.put(Bytes::from(buffer));
                            upload.finish().await.map(|_| ())
                        }
                    }
                })
                .map_err(io_error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_entry_put_that_fails_on_the_way_is_tried_again() {
        use crate::storage::flaky::{Flaky, Lose};
        let rt = Arc::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        );
        let flaky = Arc::new(Flaky::new(vec![Lose::Request]));
        let place = Place::Bucket(Bucket::new(
            flaky.clone(),
            ObjectPath::from("lake/raw"),
            "memory://test",
            rt,
        ));
        place
            .write_log("00000000000000000001-a.json", "one".into())
            .unwrap();
        assert!(flaky.fail.lock().unwrap().is_empty());
        // The reply lost, then (on the retry, which finds the entry) nothing: written once.
        *flaky.fail.lock().unwrap() = vec![Lose::Reply];
        place
            .write_log("00000000000000000002-a.json", "two".into())
            .unwrap();
        assert_eq!(
            place.read_log("00000000000000000001-a.json").unwrap(),
            "one"
        );
        assert_eq!(
            place.read_log("00000000000000000002-a.json").unwrap(),
            "two"
        );
        assert!(
            flaky.fail.lock().unwrap().is_empty(),
            "both failures were met"
        );
        // Another writer's entry under this name is still refused.
        let err = place
            .write_log("00000000000000000002-a.json", "mine".into())
            .unwrap_err();
        assert!(err.contains("exists already"), "{err}");
    }
}

//! Where a Delta table lives: a local folder, or an S3 bucket (AWS, MinIO, or any store with
//! S3's conditional put).
//!
//! Delta's commit protocol needs "create this log entry only if it does not exist" from the
//! store: two writers racing for one version must not both win. Local files have it; on S3 the
//! log entry is written with `If-None-Match: *` (conditional put, which AWS S3 and MinIO
//! support), so no lock table is needed. delta-rs's `s3` feature would bring the AWS SDK and a
//! DynamoDB locking client into the build; this registers `object_store`'s S3 client (already in
//! the build through delta-rs) with delta-rs's default log store instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use deltalake::logstore::{
    LogStore, LogStoreFactory, ObjectStoreFactory, ObjectStoreRef, StorageConfig, default_logstore,
    logstore_factories, object_store_factories,
};
use deltalake::{DeltaResult, DeltaTableError};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use url::Url;

pub use crate::config::SCHEMES;

/// A Delta table's location: its URL, the local folder when it is one, and the options for
/// its store (`storage_options:` in the sink; credentials otherwise come from `AWS_*`).
#[derive(Debug, Clone)]
pub struct TableLocation {
    /// `file:///abs/path` or `s3://bucket/prefix`.
    pub url: Url,
    /// The folder, for a local table.
    pub local: Option<PathBuf>,
    /// Store options (`aws_endpoint`, `aws_region`, …).
    pub options: HashMap<String, String>,
}

impl TableLocation {
    /// A location from what a pipeline or command line gives: a URL with a supported scheme,
    /// or a folder (made absolute against `base` when relative; it need not exist yet).
    pub fn parse(
        text: &str,
        base: &Path,
        options: HashMap<String, String>,
    ) -> Result<Self, String> {
        if let Some((scheme, _)) = text.split_once("://") {
            if !SCHEMES.contains(&scheme) {
                return Err(format!(
                    "`{text}`: `{scheme}://` is not a supported table location (local folders and `s3://bucket/prefix`)"
                ));
            }
            register();
            let url = Url::parse(text).map_err(|e| format!("`{text}`: {e}"))?;
            if url.host_str().is_none_or(str::is_empty) {
                return Err(format!("`{text}`: no bucket (`s3://bucket/prefix`)"));
            }
            return Ok(TableLocation {
                url,
                local: None,
                options,
            });
        }
        let path = Path::new(text);
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            base.join(path)
        };
        Ok(TableLocation {
            url: file_url(&path)?,
            local: Some(path),
            options,
        })
    }

    /// A local folder's location.
    pub fn folder(path: &Path) -> Result<Self, String> {
        Ok(TableLocation {
            url: file_url(path)?,
            local: Some(path.to_path_buf()),
            options: HashMap::new(),
        })
    }

    /// Makes a local folder exist and its URL canonical (symlinks resolved), as delta-rs wants.
    pub fn create_folder(&mut self) -> Result<(), String> {
        if let Some(path) = &self.local {
            std::fs::create_dir_all(path).map_err(|e| format!("cannot create the folder: {e}"))?;
            let absolute = std::fs::canonicalize(path).map_err(|e| e.to_string())?;
            self.url = deltalake::ensure_table_uri(absolute.display().to_string())
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl std::fmt::Display for TableLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.local {
            Some(path) => write!(f, "{}", path.display()),
            None => write!(f, "{}", self.url),
        }
    }
}

/// `file://` URL of a path that may not exist yet (absolute against the working directory).
fn file_url(path: &Path) -> Result<Url, String> {
    let absolute = std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Url::from_directory_path(&absolute)
        .map_err(|()| format!("{}: not a path a URL can name", absolute.display()))
}

/// S3 through `object_store`: settings from the `AWS_*` environment, then the sink's
/// `storage_options` (keys as `object_store` names them: `aws_endpoint`, `aws_region`,
/// `aws_allow_http`, `aws_access_key_id`, …, in any case).
struct S3Stores;

/// An S3 client for `url` (`s3://bucket/prefix`): settings from the `AWS_*` environment, then
/// `options` (keys as `object_store` names them, in any case), and the prefix inside the
/// bucket. A key that is no S3 setting is an error unless `foreign(key)` says another layer
/// takes it.
pub fn s3_store<'a>(
    url: &Url,
    options: impl IntoIterator<Item = (&'a String, &'a String)>,
    foreign: impl Fn(&str) -> bool,
) -> Result<(object_store::aws::AmazonS3, object_store::path::Path), String> {
    let mut builder = AmazonS3Builder::from_env().with_url(url.as_str());
    for (key, value) in options {
        match key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
            Ok(key) => builder = builder.with_config(key, value),
            Err(_) if foreign(&key.to_ascii_lowercase()) => {}
            Err(_) => {
                return Err(format!(
                    "`storage_options`: `{key}` is not an S3 setting (e.g. aws_endpoint, aws_region, aws_allow_http, aws_access_key_id, aws_secret_access_key)"
                ));
            }
        }
    }
    let store = builder.build().map_err(|e| e.to_string())?;
    let prefix =
        object_store::path::Path::from_url_path(url.path()).map_err(|e| format!("{url}: {e}"))?;
    Ok((store, prefix))
}

impl ObjectStoreFactory for S3Stores {
    fn parse_url_opts(
        &self,
        url: &Url,
        config: &StorageConfig,
    ) -> DeltaResult<(ObjectStoreRef, object_store::path::Path)> {
        // Other keys than `aws_…` are delta-rs's own (retries, limits).
        let (store, prefix) = s3_store(url, &config.raw, |key| !key.starts_with("aws_"))
            .map_err(DeltaTableError::Generic)?;
        Ok((Arc::new(store), prefix))
    }
}

/// delta-rs's default log store: commits written with `PutMode::Create`.
struct ConditionalPutLogs;

impl LogStoreFactory for ConditionalPutLogs {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

/// Registers the S3 store with delta-rs (once per process).
pub fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for scheme in SCHEMES {
            let Ok(url) = Url::parse(&format!("{scheme}://")) else {
                continue;
            };
            object_store_factories().insert(url.clone(), Arc::new(S3Stores));
            logstore_factories().insert(url, Arc::new(ConditionalPutLogs));
        }
    });
}

/// Deletes everything at `location`: a local folder and all it holds, or every object under an
/// `s3://` prefix (`rt` runs the requests). Nothing there is no error.
pub fn remove_tree(location: &TableLocation, rt: &tokio::runtime::Runtime) -> Result<(), String> {
    if let Some(dir) = &location.local {
        return match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(format!("cannot remove `{}`: {e}", dir.display()))
            }
            _ => Ok(()),
        };
    }
    let (store, prefix) = s3_store(&location.url, &location.options, |_| false)?;
    remove_objects(&store, &prefix, rt).map_err(|e| format!("removing {}: {e}", location.url))
}

/// Deletes every object under `prefix` in `store`.
pub fn remove_objects(
    store: &dyn object_store::ObjectStore,
    prefix: &object_store::path::Path,
    rt: &tokio::runtime::Runtime,
) -> Result<(), object_store::Error> {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    rt.block_on(async {
        let listed: Vec<object_store::ObjectMeta> = store.list(Some(prefix)).try_collect().await?;
        for meta in listed {
            match store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
}

/// Pauses before each new attempt of a conditional put whose request failed on the way.
///
/// `object_store` retries a failed request itself only when repeating it is harmless; a put
/// with `If-None-Match: *` or `If-Match` is not retried there, since the first attempt may have
/// landed and only its reply been lost. The callers retry such a put after reading what the
/// store holds, which tells a lost reply (their own write is there) from another writer's.
pub(crate) const CONDITIONAL_PUT_RETRIES: [std::time::Duration; 3] = [
    std::time::Duration::from_millis(100),
    std::time::Duration::from_millis(500),
    std::time::Duration::from_secs(2),
];

/// The retries left to one conditional put (see [`CONDITIONAL_PUT_RETRIES`]).
#[derive(Debug)]
pub(crate) struct Retries(std::slice::Iter<'static, std::time::Duration>);

impl Retries {
    pub(crate) fn new() -> Self {
        Retries(CONDITIONAL_PUT_RETRIES.iter())
    }

    /// Whether an earlier attempt failed on the way (its put may have landed).
    pub(crate) fn retrying(&self) -> bool {
        self.0.len() < CONDITIONAL_PUT_RETRIES.len()
    }

    /// After `what`'s put failed on the way with `e`: waits and returns `true` to try again,
    /// or `false` once the retries are spent.
    pub(crate) fn wait(&mut self, what: &str, e: &dyn std::fmt::Display) -> bool {
        let Some(pause) = self.0.next() else {
            return false;
        };
        tracing::warn!(%e, "{what}: the put failed on the way; trying again in {pause:?}");
        std::thread::sleep(*pause);
        true
    }
}

/// Whether `e` may be a request that failed on the way (a dropped connection, a timeout, a
/// server error that outlived `object_store`'s own retries) rather than an answer: worth
/// another attempt. Answers (not found, exists, precondition, permission) are not.
pub(crate) fn is_transient(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::Generic { .. })
}

/// A store for tests whose conditional puts (`Create`, `Update`) fail on the way a set number
/// of times: after taking effect (the reply lost) or before (the request lost).
#[cfg(test)]
pub(crate) mod flaky {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use futures::stream::BoxStream;
    use object_store::path::Path;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
        PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
    };

    /// How the next conditional puts fail.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Lose {
        /// The put takes effect; the caller gets an error.
        Reply,
        /// The put does not reach the store.
        Request,
    }

    #[derive(Debug)]
    pub struct Flaky {
        pub inner: object_store::memory::InMemory,
        pub fail: Mutex<Vec<Lose>>,
    }

    impl Flaky {
        pub fn new(fail: Vec<Lose>) -> Self {
            Flaky {
                inner: object_store::memory::InMemory::new(),
                fail: Mutex::new(fail),
            }
        }
    }

    impl std::fmt::Display for Flaky {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Flaky")
        }
    }

    fn dropped() -> object_store::Error {
        object_store::Error::Generic {
            store: "Flaky",
            source: "error sending request: connection reset by peer".into(),
        }
    }

    #[async_trait]
    impl ObjectStore for Flaky {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> Result<PutResult> {
            let lose = if matches!(opts.mode, PutMode::Overwrite) {
                None
            } else {
                self.fail.lock().unwrap().pop()
            };
            match lose {
                None => self.inner.put_opts(location, payload, opts).await,
                Some(Lose::Request) => Err(dropped()),
                Some(Lose::Reply) => {
                    self.inner.put_opts(location, payload, opts).await?;
                    Err(dropped())
                }
            }
        }
        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: BoxStream<'static, Result<Path>>,
        ) -> BoxStream<'static, Result<Path>> {
            self.inner.delete_stream(locations)
        }
        fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }
}

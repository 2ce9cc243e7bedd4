use std::collections::HashMap;
use std::future::IntoFuture;
use std::path::Path;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use deltalake::DeltaTable;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{
    CommitBuilder, CommitData, CommitProperties, PROTOCOL, TableReference,
};
use deltalake::kernel::{Action, Add, StructType, Transaction};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use tokio::runtime::Runtime;

use super::{
    Fence, Fit, Position, Positions, Sink, SinkError, TableShape, fence, fit_columns, maintenance,
    positions_moved,
};
use crate::config::SchemaMode;
use crate::storage::TableLocation;

/// A Delta Lake table. Rows are encoded into data files as they are staged; a commit adds those
/// files to the log in one version together with, per source partition, the last offset covered
/// and the partition's checkpoint epoch as Delta `txn` actions (app ids
/// `flowgate-{pipeline}-{topic}-{partition}` and `….epoch`), as kafka-delta-ingest does; a
/// restart resumes after those offsets. Files written but not yet committed stay staged until a
/// commit succeeds, so a failed commit attempt never records offsets without their rows.
pub struct DeltaSink {
    name: String,
    location: String,
    pipeline: String,
    target_file_size: u64,
    rt: Arc<Runtime>,
    table: DeltaTable,
    shape: TableShape,
    /// Encodes staged rows into data files.
    writer: Option<RecordBatchWriter>,
    /// Data files written for the next commit (a failed attempt keeps them for the next).
    staged: Vec<Add>,
    last: Positions,
    /// The log version read through: commits after it are read before the next commit.
    seen: u64,
    /// When the log was last read or written through `seen`.
    log_read: LogRead,
    /// Whether commits write the next log entry directly instead of going through delta-rs's
    /// snapshot of the table (see [`appends_blindly`]).
    blind: bool,
    /// Per offset app id (one per source partition), the newest position any commit since
    /// `seen` at open recorded: one past what this process holds means another process owns the
    /// partition now.
    latest: HashMap<String, Position>,
    /// Per offset app id, the commit that recorded its newest position (as far as read).
    recorded_by: HashMap<String, Recorded>,
    encode_time: std::time::Duration,
    /// Compaction, checkpoints and vacuum beside the commits.
    upkeep: Option<maintenance::Upkeep>,
    schema_mode: SchemaMode,
}

impl Drop for DeltaSink {
    fn drop(&mut self) {
        if let Some(upkeep) = self.upkeep.as_mut() {
            upkeep.finish(std::time::Duration::from_secs(10));
        }
    }
}

/// Why a commit attempt did not land.
enum Attempt {
    Delta(deltalake::DeltaTableError),
    /// Another process committed a partition this one is committing (it took the partition
    /// over after this process lost it): committing would write its rows twice.
    Overtaken(String),
}

impl From<deltalake::DeltaTableError> for Attempt {
    fn from(e: deltalake::DeltaTableError) -> Self {
        Attempt::Delta(e)
    }
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::Delta(e) => e.fmt(f),
            Attempt::Overtaken(m) => f.write_str(m),
        }
    }
}

/// A partition about to be committed, and its offset app id.
struct Claim {
    key: (String, i32),
    offset_id: String,
}

/// What [`scan`] found besides positions (kept by the caller, so a read failing half-way loses
/// none of it).
#[derive(Debug, Default)]
struct Scanned {
    /// An entry changed the table's protocol or metadata (its schema, partitioning or
    /// properties).
    changed: bool,
    /// The version of the entry this commit's own id is in (an attempt that landed though its
    /// reply was lost).
    own: Option<u64>,
}

/// The `commitInfo` key a commit's id is written under: a retried attempt knows its own entry.
const COMMIT_ID_KEY: &str = "flowgateCommit";

/// Reads the log entries after `seen` into `latest`: per offset app id, the newest position any
/// entry recorded (its `….epoch` app id gives the epoch). With `through`, every entry up to that
/// version, which must all be there; with `None`, up to the newest (the first missing entry).
/// Advances `seen` past what it read; notes in `scanned` protocol or metadata changes and the
/// entry carrying `commit_id`.
async fn scan(
    log_store: &dyn deltalake::logstore::LogStore,
    seen: &mut u64,
    through: Option<u64>,
    latest: &mut HashMap<String, Position>,
    recorded_by: &mut HashMap<String, Recorded>,
    commit_id: &str,
    scanned: &mut Scanned,
) -> Result<(), deltalake::DeltaTableError> {
    while through.is_none_or(|last| *seen < last) {
        let version = *seen + 1;
        let Some(bytes) = log_store.read_commit_entry(version).await? else {
            if through.is_none() {
                break;
            }
            // A version missing below the current one was cleaned up (the log retention passed
            // while this process looked away): what it recorded cannot be checked, so no commit.
            return Err(deltalake::DeltaTableError::Generic(format!(
                "log version {version} is gone (expired log entries were removed while this process was away): restart to read the table afresh"
            )));
        };
        let mut found: HashMap<String, i64> = HashMap::new();
        let mut committed_ms = None;
        for line in bytes.split(|&b| b == b'\n') {
            let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            let txn = &action["txn"];
            if let (Some(app), Some(v)) = (txn["appId"].as_str(), txn["version"].as_i64()) {
                found.insert(app.to_string(), v);
            }
            if let Some(t) = action["commitInfo"]["timestamp"].as_i64() {
                committed_ms = Some(t);
            }
            scanned.changed |= action.get("metaData").is_some() || action.get("protocol").is_some();
            if action["commitInfo"][COMMIT_ID_KEY].as_str() == Some(commit_id) {
                scanned.own = Some(version);
            }
        }
        for (app, &offset) in &found {
            if app.ends_with(".epoch") {
                continue;
            }
            let epoch = found.get(&format!("{app}.epoch")).copied().unwrap_or(0);
            let position = Position {
                offset,
                epoch: u64::try_from(epoch).unwrap_or(0),
            };
            if latest.get(app).is_none_or(|p| *p < position) {
                recorded_by.insert(
                    app.clone(),
                    Recorded {
                        version,
                        committed_ms,
                    },
                );
            }
            let slot = latest.entry(app.clone()).or_insert(position);
            *slot = (*slot).max(position);
        }
        *seen = version;
    }
    Ok(())
}

/// How long the log read through `seen` counts as current for an append that skips the table's
/// snapshot. Every entry after `seen` was written since that read, and a log entry is only ever
/// removed once older than the table's log retention (30 days unless the table says otherwise;
/// direct appends need at least [`MIN_LOG_RETENTION`]): so none of them can be gone, and a put
/// at a free version never fills a hole the log cleanup left. An append after a longer pause
/// reloads the table first, which notices such a hole.
const LOG_FRESH_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// The shortest log retention a table may have for direct appends.
const MIN_LOG_RETENTION: std::time::Duration = std::time::Duration::from_secs(3600);

/// When this process last read the log through `seen`, on both clocks: the monotonic one stops
/// while the machine sleeps, the wall clock may be set back; the longer of the two counts.
#[derive(Debug, Clone, Copy)]
struct LogRead {
    at: std::time::Instant,
    wall: std::time::SystemTime,
}

impl LogRead {
    fn now() -> Self {
        LogRead {
            at: std::time::Instant::now(),
            wall: std::time::SystemTime::now(),
        }
    }

    fn fresh(&self) -> bool {
        self.at.elapsed() < LOG_FRESH_FOR && self.wall.elapsed().is_ok_and(|d| d < LOG_FRESH_FOR)
    }
}

/// Whether appends to `table` may write the next log entry directly (see [`append_next`]): its
/// protocol asks nothing of an append beyond its data files (writer version 2 at most, or table
/// features among append-only, invariants and timestamps without time zone), its log is kept at
/// least [`MIN_LOG_RETENTION`], and its log store writes entries with a conditional put (local
/// folders, and S3 as [`crate::storage`] sets it up).
pub(super) fn appends_blindly(table: &DeltaTable) -> bool {
    use deltalake::table::config::TablePropertiesExt;
    let Ok(state) = table.snapshot() else {
        return false;
    };
    if state.table_config().log_retention_duration() < MIN_LOG_RETENTION {
        return false;
    }
    let protocol = state.protocol();
    let plain = protocol.min_writer_version() <= 2
        || protocol.writer_features().is_some_and(|features| {
            features.iter().all(|f| {
                matches!(
                    f.to_string().as_str(),
                    "appendOnly" | "invariants" | "timestampNtz"
                )
            })
        });
    plain && table.log_store().name() == "DefaultLogStore"
}

/// Appends `entry` (the commit's actions as log lines, `commit_id` in its `commitInfo`) as the
/// version after `seen`, without loading the table: a conditional put of the next log entry.
/// When another process wrote that version first, its entries are read (for the fence, as in the
/// full path) and the put is tried at the version after them. `None`: an entry read on the way
/// changed the table's protocol or metadata (noted in `scanned`), so the commit goes through
/// delta-rs's snapshot and checks instead.
///
/// Exactly-once holds as in the full path: a put that lands at `seen + 1` means no entry came
/// between the entries the fence read and this one; an attempt whose reply was lost finds its
/// own entry (by `commit_id`) on the next try and counts as landed.
#[allow(clippy::too_many_arguments)]
async fn append_next(
    log_store: &dyn deltalake::logstore::LogStore,
    seen: &mut u64,
    latest: &mut HashMap<String, Position>,
    recorded_by: &mut HashMap<String, Recorded>,
    claims: &[Claim],
    positions: &Positions,
    held: &Positions,
    entry: &bytes::Bytes,
    commit_id: &str,
    scanned: &mut Scanned,
) -> Result<Option<u64>, Attempt> {
    loop {
        if let Some(version) = scanned.own {
            return Ok(Some(version));
        }
        if scanned.changed {
            return Ok(None);
        }
        let recorded: Positions = claims
            .iter()
            .filter_map(|c| latest.get(&c.offset_id).map(|p| (c.key.clone(), *p)))
            .collect();
        match fence("the Delta log", positions, &recorded, held) {
            Fence::Clear => {}
            Fence::Landed => return Ok(Some(*seen)),
            Fence::Overtaken(why) => return Err(Attempt::Overtaken(why)),
        }
        let version = *seen + 1;
        if put_entry(log_store, version, entry).await? {
            *seen = version;
            return Ok(Some(version));
        }
        scan(
            log_store,
            seen,
            None,
            latest,
            recorded_by,
            commit_id,
            scanned,
        )
        .await?;
    }
}

/// Writes `entry` as log version `version` if no writer has taken it (a conditional put): `false`
/// when one has.
pub(super) async fn put_entry(
    log_store: &dyn deltalake::logstore::LogStore,
    version: u64,
    entry: &bytes::Bytes,
) -> Result<bool, deltalake::DeltaTableError> {
    use deltalake::kernel::transaction::TransactionError;
    match log_store
        .write_commit_entry(
            version,
            deltalake::logstore::CommitOrBytes::LogBytes(entry.clone()),
            uuid::Uuid::new_v4(),
        )
        .await
    {
        Ok(()) => Ok(true),
        Err(TransactionError::VersionAlreadyExists(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// What a Delta table's log says of its writers (see [`log_writers`]).
#[derive(Debug, Default)]
pub struct LogWriters {
    /// The `txn` app ids of every commit entry the log still holds.
    pub app_ids: std::collections::BTreeSet<String>,
    /// The newest version.
    pub version: u64,
    /// When the newest version was committed (ms since the Unix epoch), if it says.
    pub committed_ms: Option<i64>,
    /// Whether any commit entry added a data file.
    pub has_rows: bool,
    /// Per offset app id (`flowgate-{pipeline}-{topic}-{partition}`): the newest position the
    /// log records, the version that recorded it, and when (ms since the Unix epoch).
    pub positions: std::collections::BTreeMap<String, (Position, u64, Option<i64>)>,
}

/// Reads the writers of the table at `location` from its log (`None`: no table there).
pub fn log_writers(location: &TableLocation, rt: &Runtime) -> Result<Option<LogWriters>, String> {
    if location.local.as_deref().is_some_and(|p| !has_commit(p)) {
        return Ok(None);
    }
    let mut location = location.clone();
    if let Some(path) = &location.local {
        location.url = maintenance::table_url(path)?;
    }
    rt.block_on(async {
        let table = load(&location).await.map_err(|e| e.to_string())?;
        let Some(current) = table.version() else {
            return Ok(None);
        };
        let mut writers = LogWriters {
            version: current,
            ..Default::default()
        };
        let log_store = table.log_store();
        for version in 0..=current {
            let Some(bytes) = log_store
                .read_commit_entry(version)
                .await
                .map_err(|e| e.to_string())?
            else {
                continue;
            };
            let mut found: HashMap<String, i64> = HashMap::new();
            let mut committed_ms = None;
            for line in bytes.split(|&b| b == b'\n') {
                let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else {
                    continue;
                };
                if let Some(app) = action["txn"]["appId"].as_str() {
                    writers.app_ids.insert(app.to_string());
                    if let Some(v) = action["txn"]["version"].as_i64() {
                        found.insert(app.to_string(), v);
                    }
                }
                if let Some(t) = action["commitInfo"]["timestamp"].as_i64() {
                    committed_ms = Some(t);
                }
                if action.get("add").is_some() {
                    writers.has_rows = true;
                }
                if version == current
                    && let Some(t) = action["commitInfo"]["timestamp"].as_i64()
                {
                    writers.committed_ms = Some(t);
                }
            }
            for (app, &offset) in found.iter().filter(|(a, _)| !a.ends_with(".epoch")) {
                let epoch = found.get(&format!("{app}.epoch")).copied().unwrap_or(0);
                let position = Position {
                    offset,
                    epoch: u64::try_from(epoch).unwrap_or(0),
                };
                if writers
                    .positions
                    .get(app)
                    .is_none_or(|(held, _, _)| *held < position)
                {
                    writers
                        .positions
                        .insert(app.clone(), (position, version, committed_ms));
                }
            }
        }
        Ok(Some(writers))
    })
}

/// Which commit recorded a position, for messages.
#[derive(Debug, Clone, Copy)]
struct Recorded {
    version: u64,
    committed_ms: Option<i64>,
}

/// How a Delta sink writes its table.
#[derive(Debug, Clone)]
pub struct DeltaOptions {
    /// Partition columns.
    pub partition_by: Vec<String>,
    /// Data files are cut at about this size.
    pub target_file_size: u64,
    /// Whether new stage columns are added to an existing table.
    pub schema_mode: SchemaMode,
    /// Background upkeep (`None`: none).
    pub maintenance: Option<maintenance::Plan>,
}

/// Whether the folder holds a table: a commit in its log (a kill during the creation leaves
/// `_delta_log/` with no version in it, which is a table still to create).
fn has_commit(path: &Path) -> bool {
    std::fs::read_dir(path.join("_delta_log")).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(".json"))
    })
}

/// How `shape` fits the loaded `table`: its columns (see [`fit_columns`]) and partitioning.
fn fit_table(
    name: &str,
    location: &str,
    table: &DeltaTable,
    shape: &TableShape,
    options: &DeltaOptions,
) -> Result<Fit, SinkError> {
    let mismatch = |message: String| SinkError::SchemaMismatch {
        sink: name.into(),
        table: location.into(),
        message,
    };
    let state = table.snapshot().map_err(|e| SinkError::Table {
        sink: name.into(),
        table: location.into(),
        message: e.to_string(),
    })?;
    let existing = state.snapshot().arrow_schema();
    let fit = fit_columns(
        &existing,
        shape.schema(),
        options.schema_mode == SchemaMode::Merge,
    )
    .map_err(mismatch)?;
    let partitions = state.metadata().partition_columns().to_vec();
    if partitions != options.partition_by {
        return Err(mismatch(format!(
            "table is partitioned by {partitions:?}, config says {:?}",
            options.partition_by
        )));
    }
    Ok(fit)
}

/// Loads the table at `location`; version `None`: no table there yet (one to create).
async fn load(location: &TableLocation) -> Result<DeltaTable, deltalake::DeltaTableError> {
    let mut table = deltalake::DeltaTableBuilder::from_url(location.url.clone())?
        .with_storage_options(location.options.clone())
        .build()?;
    // A local folder without a commit in its log is a table to create (a kill during the
    // creation leaves `_delta_log/` with no version in it): don't ask the reader to load it.
    if location.local.as_deref().is_some_and(|p| !has_commit(p)) {
        return Ok(table);
    }
    match table.load().await {
        Ok(()) | Err(deltalake::DeltaTableError::NotATable(_)) => Ok(table),
        Err(e) => Err(e),
    }
}

impl DeltaSink {
    /// How the stage's output fits the table at `location`, without changing anything (for
    /// `flowgate validate`).
    pub fn check(
        name: &str,
        location: &TableLocation,
        shape: &TableShape,
        options: &DeltaOptions,
        rt: &Runtime,
    ) -> Result<Fit, SinkError> {
        let shown = location.to_string();
        if location.local.as_deref().is_some_and(|p| !has_commit(p)) {
            return Ok(Fit::New);
        }
        let mut location = location.clone();
        let fail = |message: String| SinkError::Table {
            sink: name.into(),
            table: shown.clone(),
            message,
        };
        if let Some(path) = &location.local {
            location.url = maintenance::table_url(path).map_err(fail)?;
        }
        let table = rt
            .block_on(load(&location))
            .map_err(|e| fail(e.to_string()))?;
        if table.version().is_none() {
            return Ok(Fit::New);
        }
        fit_table(name, &shown, &table, shape, options)
    }

    /// Opens the table at `location`, creating it from `shape` (partitioned by `partition_by`)
    /// if it does not exist; an existing table must have the same columns and types, or, with
    /// `schema_mode: merge`, gets the stage's new columns added.
    pub fn open(
        name: &str,
        mut place: TableLocation,
        pipeline: &str,
        mut shape: TableShape,
        options: DeltaOptions,
        rt: Arc<Runtime>,
    ) -> Result<Self, SinkError> {
        let location = place.to_string();
        let fail = |message: String| SinkError::Table {
            sink: name.into(),
            table: location.clone(),
            message,
        };
        place.create_folder().map_err(fail)?;
        let mut table = rt.block_on(load(&place)).map_err(|e| fail(e.to_string()))?;
        if table.version().is_none() {
            let schema: StructType = shape
                .schema()
                .as_ref()
                .try_into_kernel()
                .map_err(|e| fail(format!("schema: {e}")))?;
            let create = table
                .create()
                .with_columns(schema.fields().cloned())
                .with_partition_columns(options.partition_by.clone())
                .with_table_name(name);
            match rt.block_on(create.into_future()) {
                Ok(created) => {
                    table = created;
                    tracing::info!(sink = name, table = %location, "created Delta table");
                }
                Err(e) => {
                    // Another process of the group may have created it at the same moment:
                    // then it is there now, and is checked like any existing table.
                    table = rt.block_on(load(&place)).map_err(|e| fail(e.to_string()))?;
                    if table.version().is_none() {
                        return Err(fail(format!("cannot create the table: {e}")));
                    }
                    tracing::info!(sink = name, table = %location, "another process created the Delta table first");
                }
            }
        }
        if table.version().is_some() {
            // Another process may add the same columns at the same moment: then the second look
            // finds them there.
            let mut tries = 0;
            loop {
                let fit = fit_table(name, &location, &table, &shape, &options)?;
                let Fit::Merge { added, .. } = &fit else {
                    break;
                };
                if added.is_empty() {
                    let existing = table
                        .snapshot()
                        .map_err(|e| fail(e.to_string()))?
                        .snapshot()
                        .arrow_schema();
                    shape.fit_to(existing);
                    break;
                }
                let fields: Vec<arrow::datatypes::Field> = added
                    .iter()
                    .filter_map(|n| shape.schema().field_with_name(n).ok())
                    .map(|f| f.clone().with_nullable(true))
                    .collect();
                let kernel: StructType = (&arrow::datatypes::Schema::new(fields))
                    .try_into_kernel()
                    .map_err(|e| fail(format!("schema: {e}")))?;
                let added_text = added.join(", ");
                match rt.block_on(
                    table
                        .clone()
                        .add_columns()
                        .with_fields(kernel.fields().cloned().collect::<Vec<_>>())
                        .into_future(),
                ) {
                    Ok(merged) => {
                        tracing::info!(sink = name, table = %location, columns = %added_text, "schema merge: added columns to the Delta table");
                        table = merged;
                    }
                    Err(e) if tries == 0 => {
                        tracing::info!(
                            sink = name,
                            "adding columns failed ({e}); reading the table again"
                        );
                        rt.block_on(table.update_state())
                            .map_err(|e| fail(e.to_string()))?;
                    }
                    Err(e) => {
                        return Err(fail(format!("adding columns {added_text}: {e}")));
                    }
                }
                tries += 1;
            }
        }
        let seen = table.version().unwrap_or(0);
        let blind = appends_blindly(&table);
        let upkeep = options
            .maintenance
            .clone()
            .map(|plan| maintenance::Upkeep::new(name, place, plan));
        Ok(DeltaSink {
            name: name.into(),
            location,
            pipeline: pipeline.into(),
            target_file_size: options.target_file_size,
            rt,
            table,
            shape,
            writer: None,
            staged: Vec::new(),
            last: Positions::new(),
            seen,
            log_read: LogRead::now(),
            blind,
            latest: HashMap::new(),
            recorded_by: HashMap::new(),
            encode_time: std::time::Duration::ZERO,
            upkeep,
            schema_mode: options.schema_mode,
        })
    }

    fn app_id(&self, topic: &str, partition: i32) -> String {
        format!("flowgate-{}-{topic}-{partition}", self.pipeline)
    }

    fn epoch_app_id(&self, topic: &str, partition: i32) -> String {
        format!("flowgate-{}-{topic}-{partition}.epoch", self.pipeline)
    }

    /// Another process may have merged new columns into the table since this one opened it:
    /// with `schema_mode: merge` this process writes nulls into them; otherwise it stops,
    /// saying why (rows of the old shape would no longer fit the table).
    fn follow_table_schema(&mut self) -> Result<(), SinkError> {
        let table = self
            .table
            .snapshot()
            .map_err(|e| self.fail(e.to_string()))?
            .snapshot()
            .arrow_schema();
        let same = table.fields().len() == self.shape.schema().fields().len()
            && table
                .fields()
                .iter()
                .zip(self.shape.schema().fields())
                .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
        if same {
            return Ok(());
        }
        match fit_columns(
            &table,
            self.shape.stage_schema(),
            self.schema_mode == SchemaMode::Merge,
        ) {
            Ok(Fit::Merge { added, .. }) if added.is_empty() => {
                tracing::info!(sink = %self.name, "the table gained columns (another process merged them): writing nulls into them");
                self.shape.fit_to(table);
                Ok(())
            }
            Ok(_) | Err(_) => Err(SinkError::SchemaMismatch {
                sink: self.name.clone(),
                table: self.location.clone(),
                message: format!(
                    "the table's columns changed while this process wrote it (another process merged a schema): table has {}, stage gives {}; restart to check it again",
                    flowgate_sdk::columns::describe_schema(&table),
                    flowgate_sdk::columns::describe_schema(self.shape.stage_schema())
                ),
            }),
        }
    }

    fn fail(&self, message: String) -> SinkError {
        SinkError::Table {
            sink: self.name.clone(),
            table: self.location.clone(),
            message,
        }
    }
}

impl Sink for DeltaSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn write(&mut self, batch: RecordBatch) -> Result<(), SinkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.writer.is_none() {
            self.follow_table_schema()?;
            let writer = RecordBatchWriter::for_table(&self.table)
                .map_err(|e| self.fail(e.to_string()))?
                .with_target_file_size(self.target_file_size)
                .with_writer_properties(super::parquet_properties(
                    self.shape.schema(),
                    parquet::basic::Compression::SNAPPY,
                    Some(format!("delta-rs version {}", deltalake::crate_version())),
                ));
            self.writer = Some(writer);
        }
        let batch = self
            .shape
            .apply(&batch)
            .map_err(|e| self.fail(format!("converting a batch: {e}")))?;
        let encoding = std::time::Instant::now();
        if let Some(writer) = self.writer.as_mut() {
            self.rt
                .block_on(writer.write(batch))
                .map_err(|e| SinkError::Table {
                    sink: self.name.clone(),
                    table: self.location.clone(),
                    message: format!("staging rows: {e}"),
                })?;
        }
        self.encode_time += encoding.elapsed();
        Ok(())
    }

    fn commit(&mut self, positions: &Positions) -> Result<bool, SinkError> {
        if let Some(mut writer) = self.writer.take() {
            let encoding = std::time::Instant::now();
            let adds = self
                .rt
                .block_on(writer.flush())
                .map_err(|e| self.fail(format!("writing data files: {e}")))?;
            self.encode_time += encoding.elapsed();
            self.staged.extend(adds);
        }
        if self.staged.is_empty() && !positions_moved(positions, &self.last) {
            return Ok(false);
        }
        let mut txns = Vec::with_capacity(positions.len() * 2);
        for ((t, p), position) in positions {
            txns.push(Transaction::new(self.app_id(t, *p), position.offset));
            txns.push(Transaction::new(
                self.epoch_app_id(t, *p),
                position.epoch as i64,
            ));
        }
        let actions: Vec<Action> = self.staged.iter().cloned().map(Action::Add).collect();
        let files = self.staged.len();
        let claims: Vec<Claim> = positions
            .keys()
            .map(|(t, p)| Claim {
                key: (t.clone(), *p),
                offset_id: self.app_id(t, *p),
            })
            .collect();
        let held: Positions = positions
            .keys()
            .filter_map(|k| self.last.get(k).map(|p| (k.clone(), *p)))
            .collect();
        let (seen, latest, recorded_by) = (&mut self.seen, &mut self.latest, &mut self.recorded_by);
        let table = &mut self.table;
        let blind = &mut self.blind;
        let log_read = &mut self.log_read;
        let mut direct = false;
        // The commit's id, in its `commitInfo`: an attempt that landed though its reply was lost
        // is recognised by it, whether or not the commit moves any offset.
        let commit_id = uuid::Uuid::new_v4().to_string();
        let commit_info: HashMap<String, serde_json::Value> = [(
            COMMIT_ID_KEY.to_string(),
            serde_json::Value::from(commit_id.clone()),
        )]
        .into();
        let mut scanned = Scanned::default();
        let version = self
            .rt
            .block_on(async {
                // Another process (other partitions of the same group) may commit in between:
                // the commit builder retries over its versions; an I/O failure is tried again
                // with the same files after reloading the table.
                let mut attempt = 0;
                loop {
                    let result = async {
                        if *blind && log_read.fresh() {
                            // An append to a plain table: the next log entry, written directly;
                            // the table's snapshot (its file list) is neither read nor updated.
                            let snapshot = table.snapshot()?;
                            let partition_by = snapshot.metadata().partition_columns().to_vec();
                            let operation = DeltaOperation::Write {
                                mode: SaveMode::Append,
                                partition_by: (!partition_by.is_empty()).then_some(partition_by),
                                predicate: None,
                            };
                            PROTOCOL
                                .can_commit(snapshot as &dyn TableReference, &actions, &operation)
                                .map_err(deltalake::DeltaTableError::from)?;
                            let entry = CommitData::new(
                                actions.clone(),
                                operation,
                                commit_info.clone(),
                                txns.clone(),
                            )
                            .get_bytes()
                            .map_err(deltalake::DeltaTableError::from)?;
                            let appended = append_next(
                                table.log_store().as_ref(),
                                seen,
                                latest,
                                recorded_by,
                                &claims,
                                positions,
                                &held,
                                &entry,
                                &commit_id,
                                &mut scanned,
                            )
                            .await;
                            if scanned.changed {
                                // Another process changed the table's protocol or metadata
                                // (seen even if a read failed after): this commit, and the
                                // next, take the full path, which reloads the table.
                                *blind = false;
                            }
                            if let Some(version) = appended? {
                                *log_read = LogRead::now();
                                direct = true;
                                return Ok(version);
                            }
                        }
                        // Read what was committed since the last look (other processes, and
                        // this one's own attempt whose reply was lost).
                        table.update_state().await?;
                        let current = table.snapshot()?.version();
                        if current > *seen {
                            scan(
                                table.log_store().as_ref(),
                                seen,
                                Some(current),
                                latest,
                                recorded_by,
                                &commit_id,
                                &mut scanned,
                            )
                            .await?;
                        }
                        *log_read = LogRead::now();
                        // An earlier attempt landed and only its reply was lost: done.
                        if let Some(version) = scanned.own {
                            return Ok(version);
                        }
                        let recorded: Positions = claims
                            .iter()
                            .filter_map(|c| latest.get(&c.offset_id).map(|p| (c.key.clone(), *p)))
                            .collect();
                        match fence("the Delta log", positions, &recorded, &held) {
                            Fence::Clear => {}
                            // An earlier attempt landed and only its reply was lost: done.
                            Fence::Landed => return Ok(current),
                            Fence::Overtaken(why) => return Err(Attempt::Overtaken(why)),
                        }
                        let snapshot = table.snapshot()?;
                        let partition_by = snapshot.metadata().partition_columns().to_vec();
                        let operation = DeltaOperation::Write {
                            mode: SaveMode::Append,
                            partition_by: (!partition_by.is_empty()).then_some(partition_by),
                            predicate: None,
                        };
                        // Checkpoints are the upkeep task's: never on the commit path.
                        let properties = CommitProperties::default()
                            .with_metadata(commit_info.clone())
                            .with_application_transactions(txns.clone())
                            .with_create_checkpoint(false)
                            .with_cleanup_expired_logs(Some(false));
                        CommitBuilder::from(properties)
                            .with_actions(actions.clone())
                            .build(
                                Some(snapshot as &dyn TableReference),
                                table.log_store(),
                                operation,
                            )
                            .await
                            .map(|finalized| finalized.version())
                            .map_err(Attempt::from)
                    }
                    .await;
                    match result {
                        Ok(version) => break Ok(version),
                        Err(e @ Attempt::Overtaken(_)) => break Err(e),
                        Err(e) if attempt < 3 => {
                            attempt += 1;
                            // The next attempt rereads the log first: if this one landed (only
                            // what follows the commit failed), it is not made twice.
                            tracing::warn!(
                                "Delta commit attempt {attempt} failed ({e}); retrying with the same files"
                            );
                            tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
                        }
                        Err(e) => break Err(e),
                    }
                }
            })
            .map_err(|e| {
                let by = match &e {
                    Attempt::Overtaken(_) => {
                        let by: Vec<String> = positions
                            .keys()
                            .filter_map(|(t, p)| {
                                self.provenance(t, *p).map(|w| format!("`{t}/{p}`: {w}"))
                            })
                            .collect();
                        format!(" (recorded by {})", by.join("; "))
                    }
                    Attempt::Delta(_) => String::new(),
                };
                match e {
                    Attempt::Overtaken(_) => SinkError::Overtaken {
                        sink: self.name.clone(),
                        table: self.location.clone(),
                        message: format!("{e}{by}"),
                    },
                    Attempt::Delta(_) => SinkError::Table {
                        sink: self.name.clone(),
                        table: self.location.clone(),
                        message: format!("commit failed: {e}"),
                    },
                }
            })?;
        if !direct {
            // The log has the new version; read it so the next commit builds on it, and see
            // whether the table still takes direct appends.
            let _ = self.rt.block_on(self.table.update_state());
            self.blind = appends_blindly(&self.table);
        }
        self.staged.clear();
        tracing::debug!(sink = %self.name, version, files, "committed Delta version");
        let now = chrono::Utc::now().timestamp_millis();
        for (t, p) in positions.keys() {
            self.recorded_by.insert(
                self.app_id(t, *p),
                Recorded {
                    version,
                    committed_ms: Some(now),
                },
            );
        }
        self.last
            .extend(positions.iter().map(|(k, v)| (k.clone(), *v)));
        if let Some(upkeep) = self.upkeep.as_mut() {
            upkeep.after_commit();
        }
        Ok(true)
    }

    fn encode_time(&self) -> std::time::Duration {
        self.encode_time
    }

    fn provenance(&self, topic: &str, partition: i32) -> Option<String> {
        let r = self.recorded_by.get(&self.app_id(topic, partition))?;
        let when = r
            .committed_ms
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| format!(", committed {}", t.format("%Y-%m-%d %H:%M:%S UTC")))
            .unwrap_or_default();
        Some(format!(
            "Delta version {}{when}, pipeline `{}`",
            r.version, self.pipeline
        ))
    }

    fn committed(&mut self, topic: &str, partition: i32) -> Result<Option<Position>, SinkError> {
        // The partition may have been written by another process until a moment ago.
        self.rt
            .block_on(self.table.update_state())
            .map_err(|e| self.fail(format!("reloading the table: {e}")))?;
        let state = self
            .table
            .snapshot()
            .map_err(|e| self.fail(e.to_string()))?;
        let log_store = self.table.log_store();
        let (offset_id, epoch_id) = (
            self.app_id(topic, partition),
            self.epoch_app_id(topic, partition),
        );
        let (offset, epoch) = self
            .rt
            .block_on(async {
                let offset = state
                    .transaction_version(log_store.as_ref(), offset_id)
                    .await?;
                let epoch = state
                    .transaction_version(log_store.as_ref(), epoch_id)
                    .await?;
                Ok::<_, deltalake::DeltaTableError>((offset, epoch))
            })
            .map_err(|e| self.fail(e.to_string()))?;
        let position = offset.map(|offset| Position {
            offset,
            epoch: epoch.unwrap_or(0).max(0) as u64,
        });
        if let Some(p) = position {
            self.last.insert((topic.to_string(), partition), p);
        }
        Ok(position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn folder(path: &Path) -> TableLocation {
        TableLocation::folder(path).unwrap()
    }

    fn options() -> DeltaOptions {
        DeltaOptions {
            partition_by: Vec::new(),
            target_file_size: 1 << 20,
            schema_mode: SchemaMode::Strict,
            maintenance: None,
        }
    }

    #[test]
    fn processes_that_create_the_table_at_the_same_moment_all_open_it() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let shape = TableShape::new("t", &schema, &[], None, None).unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let opened: Vec<Result<(), String>> = (0..4)
            .map(|_| {
                let (barrier, shape, path) =
                    (barrier.clone(), shape.clone(), dir.path().to_path_buf());
                std::thread::spawn(move || {
                    let rt = Arc::new(
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap(),
                    );
                    barrier.wait();
                    DeltaSink::open("t", folder(&path), "p", shape, options(), rt)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert!(opened.iter().all(Result::is_ok), "{opened:?}");
    }

    #[test]
    fn a_failed_commit_keeps_its_files_for_the_next_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
        );
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let shape = TableShape::new("t", &schema, &[], None, None).unwrap();
        let mut sink = DeltaSink::open("t", folder(dir.path()), "p", shape, options(), rt).unwrap();
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2, 3]))]).unwrap();
        sink.write(batch).unwrap();
        let positions: Positions = [(
            ("t".to_string(), 0),
            Position {
                offset: 2,
                epoch: 1,
            },
        )]
        .into();
        // The log cannot be written: the commit fails.
        let log = dir.path().join("_delta_log");
        let aside = dir.path().join("log-aside");
        std::fs::rename(&log, &aside).unwrap();
        std::fs::write(&log, b"not a folder").unwrap();
        assert!(sink.commit(&positions).is_err());
        std::fs::remove_file(&log).unwrap();
        std::fs::rename(&aside, &log).unwrap();
        // The next commit records the offsets together with the rows of the failed one.
        assert!(sink.commit(&positions).unwrap());
        let table = sink.rt.block_on(DeltaTable::try_from_url(
            deltalake::ensure_table_uri(dir.path().display().to_string()).unwrap(),
        ));
        let table = table.unwrap();
        assert_eq!(table.get_file_uris().unwrap().count(), 1, "the staged file");
        assert_eq!(
            sink.committed("t", 0).unwrap(),
            Some(Position {
                offset: 2,
                epoch: 1
            })
        );
    }

    /// The table at `path`, as a reader opening it afresh sees it.
    fn reopen(path: &Path, rt: &Runtime) -> DeltaTable {
        rt.block_on(DeltaTable::try_from_url(
            deltalake::ensure_table_uri(path.display().to_string()).unwrap(),
        ))
        .unwrap()
    }

    fn runtime() -> Arc<Runtime> {
        Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
        )
    }

    #[test]
    fn appends_write_the_next_log_entry_without_reloading_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let shape = TableShape::new("t", &schema, &[], None, None).unwrap();
        let mut sink =
            DeltaSink::open("t", folder(dir.path()), "p", shape, options(), rt.clone()).unwrap();
        let opened_at = sink.table.version();
        assert!(sink.blind, "a table this sink created takes direct appends");
        for i in 0..5 {
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from(vec![i, i + 100]))],
            )
            .unwrap();
            sink.write(batch).unwrap();
            let positions: Positions = [(
                ("t".to_string(), 0),
                Position {
                    offset: i,
                    epoch: 1,
                },
            )]
            .into();
            assert!(sink.commit(&positions).unwrap());
        }
        // The sink's snapshot (the table's file list) was neither read again nor updated...
        assert_eq!(sink.table.version(), opened_at);
        assert_eq!(sink.seen, opened_at.unwrap() + 5);
        // ...yet a reader finds every commit: the files, the offsets, the operation.
        let table = reopen(dir.path(), &rt);
        assert_eq!(table.version(), Some(opened_at.unwrap() + 5));
        assert_eq!(table.get_file_uris().unwrap().count(), 5);
        let state = table.snapshot().unwrap();
        let offset = rt
            .block_on(state.transaction_version(table.log_store().as_ref(), "flowgate-p-t-0"))
            .unwrap();
        assert_eq!(offset, Some(4));
        let entry = rt
            .block_on(table.log_store().read_commit_entry(opened_at.unwrap() + 5))
            .unwrap()
            .unwrap();
        let first: serde_json::Value =
            serde_json::from_slice(entry.split(|&b| b == b'\n').next().unwrap()).unwrap();
        assert_eq!(first["commitInfo"]["operation"], "WRITE", "{first}");
    }

    #[test]
    fn an_append_whose_reply_was_lost_is_found_by_its_id_and_not_written_twice() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let shape = TableShape::new("t", &schema, &[], None, None).unwrap();
        let sink =
            DeltaSink::open("t", folder(dir.path()), "p", shape, options(), rt.clone()).unwrap();
        let log_store = sink.table.log_store();
        let opened = sink.seen;
        // The attempt's entry landed at the next version, but its reply was lost. Its offsets
        // did not move (only rows, as a window flush at the end gives), so the fence alone
        // could not tell it landed.
        let commit_info: HashMap<String, serde_json::Value> =
            [(COMMIT_ID_KEY.to_string(), "attempt-1".into())].into();
        let entry = CommitData::new(
            Vec::new(),
            DeltaOperation::Write {
                mode: SaveMode::Append,
                partition_by: None,
                predicate: None,
            },
            commit_info,
            Vec::new(),
        )
        .get_bytes()
        .unwrap();
        rt.block_on(log_store.write_commit_entry(
            opened + 1,
            deltalake::logstore::CommitOrBytes::LogBytes(entry.clone()),
            uuid::Uuid::new_v4(),
        ))
        .unwrap();
        let (mut seen, mut latest, mut recorded_by) = (opened, HashMap::new(), HashMap::new());
        let mut scanned = Scanned::default();
        let held: Positions = Positions::new();
        let appended = rt
            .block_on(append_next(
                log_store.as_ref(),
                &mut seen,
                &mut latest,
                &mut recorded_by,
                &[],
                &Positions::new(),
                &held,
                &entry,
                "attempt-1",
                &mut scanned,
            ))
            .ok()
            .flatten();
        assert_eq!(appended, Some(opened + 1), "{scanned:?}");
        assert!(
            rt.block_on(log_store.read_commit_entry(opened + 2))
                .unwrap()
                .is_none(),
            "written twice"
        );
        // Another commit's id finds the version taken and goes after it.
        let mut scanned = Scanned::default();
        let appended = rt
            .block_on(append_next(
                log_store.as_ref(),
                &mut seen,
                &mut latest,
                &mut recorded_by,
                &[],
                &Positions::new(),
                &held,
                &entry,
                "attempt-2",
                &mut scanned,
            ))
            .ok()
            .flatten();
        assert_eq!(appended, Some(opened + 2));
    }

    #[test]
    fn a_schema_change_by_another_process_sends_the_next_commit_through_delta_rs() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let narrow = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let wide = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Int64, false),
            Field::new("w", DataType::Int64, true),
        ]));
        let shape = TableShape::new("t", &narrow, &[], None, None).unwrap();
        let mut first =
            DeltaSink::open("t", folder(dir.path()), "p", shape, options(), rt.clone()).unwrap();
        let at = |offset: i64| -> Positions {
            [(("t".to_string(), 0), Position { offset, epoch: 1 })].into()
        };
        first
            .write(
                RecordBatch::try_new(narrow.clone(), vec![Arc::new(Int64Array::from(vec![1]))])
                    .unwrap(),
            )
            .unwrap();
        assert!(first.commit(&at(0)).unwrap());
        // Another process adds a column (a metadata entry in the log) while this one writes.
        first
            .write(
                RecordBatch::try_new(narrow.clone(), vec![Arc::new(Int64Array::from(vec![2]))])
                    .unwrap(),
            )
            .unwrap();
        let merging = DeltaOptions {
            schema_mode: SchemaMode::Merge,
            ..options()
        };
        let wide_shape = TableShape::new("t", &wide, &[], None, None).unwrap();
        let merged = DeltaSink::open(
            "t",
            folder(dir.path()),
            "p",
            wide_shape,
            merging,
            rt.clone(),
        )
        .unwrap();
        let merged_at = merged.table.version().unwrap();
        // The direct append finds the version taken, reads the metadata change, and hands the
        // commit to delta-rs's checks, which reload the table: the rows land.
        assert!(first.commit(&at(1)).unwrap());
        assert!(first.table.version().unwrap() > merged_at);
        let table = reopen(dir.path(), &rt);
        assert_eq!(table.get_file_uris().unwrap().count(), 2);
        assert_eq!(
            first.committed("t", 0).unwrap(),
            Some(Position {
                offset: 1,
                epoch: 1
            })
        );
    }

    #[test]
    fn a_partition_another_process_committed_since_is_not_committed_again() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
        );
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let shape = TableShape::new("t", &schema, &[], None, None).unwrap();
        let open = || {
            DeltaSink::open(
                "t",
                folder(dir.path()),
                "p",
                shape.clone(),
                options(),
                rt.clone(),
            )
            .unwrap()
        };
        let rows = |v: i64| {
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![v]))]).unwrap()
        };
        let at = |partition: i32, offset: i64, epoch: u64| -> Positions {
            [(("t".to_string(), partition), Position { offset, epoch })].into()
        };
        // This process holds partitions 0 and 1; then it stalls past its session.
        let mut stalled = open();
        stalled.write(rows(1)).unwrap();
        assert!(stalled.commit(&at(0, 10, 1)).unwrap());
        assert!(stalled.commit(&at(1, 10, 1)).unwrap());
        // The group moves partition 0 to another process, which goes on from there.
        let mut other = open();
        assert_eq!(
            other.committed("t", 0).unwrap(),
            Some(Position {
                offset: 10,
                epoch: 1
            })
        );
        other.write(rows(2)).unwrap();
        assert!(other.commit(&at(0, 20, 2)).unwrap());
        // The stalled process wakes up: partition 1 (still its own) commits; partition 0 is
        // refused, though the commit of partition 1 already read past the other's version.
        assert!(stalled.commit(&at(1, 15, 2)).unwrap());
        let refused = stalled
            .commit(&at(0, 15, 2))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            refused.contains("another process owns the partition"),
            "{refused}"
        );
        assert_eq!(
            other.committed("t", 0).unwrap(),
            Some(Position {
                offset: 20,
                epoch: 2
            })
        );
        assert_eq!(
            other.committed("t", 1).unwrap(),
            Some(Position {
                offset: 15,
                epoch: 2
            })
        );
    }
}

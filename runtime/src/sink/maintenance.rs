//! Upkeep of a Delta table: compaction of small files, log checkpoints, vacuum.
//!
//! A streaming writer adds a few small files per partition at every commit; left alone, a table
//! holds tens of thousands of them and every reader pays for opening each. Compaction rewrites
//! the small files of each table partition into files of about the target size and commits the
//! swap as one `OPTIMIZE` version whose actions say no data changed (`dataChange: false`). It
//! touches no `txn` action, so the offsets the pipeline records, and with them its exactly-once
//! resume, are the same before and after; and since the pipeline only appends, the two never
//! conflict (Delta's conflict check lets an append and a compaction of other files both land).
//!
//! delta-rs has an `optimize` operation, but only with its DataFusion feature, which would
//! double the host's build time; this module does the same bin-packing with the Parquet reader
//! and the Delta writer the sink already uses.
//!
//! The sink runs these as a background task ([`Upkeep`]) so a commit never waits for them;
//! `flowgate table optimize|vacuum|checkpoint` runs them by hand.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, RecordBatch, StringArray, new_null_array};
use arrow::compute::cast;
use deltalake::kernel::Action;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TableReference};
pub use deltalake::operations::vacuum::VacuumMode;
use deltalake::protocol::DeltaOperation;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::storage::TableLocation;

/// What a compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Data files in the table before.
    pub files_before: usize,
    /// Small files rewritten (removed from the table).
    pub files_removed: usize,
    /// Files written in their place.
    pub files_added: usize,
    /// Bytes of the files rewritten.
    pub bytes_rewritten: u64,
    /// The version the compaction committed, if it committed one.
    pub version: Option<u64>,
}

/// The table URL of a local folder (which must exist).
pub fn table_url(path: &std::path::Path) -> Result<url::Url, String> {
    let absolute = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    deltalake::ensure_table_uri(absolute.display().to_string()).map_err(|e| e.to_string())
}

/// Opens the Delta table at `location` for upkeep.
pub async fn open(location: &TableLocation) -> Result<DeltaTable, DeltaTableError> {
    let mut url = location.url.clone();
    if let Some(path) = &location.local {
        url = table_url(path).map_err(DeltaTableError::Generic)?;
    }
    let mut table = deltalake::DeltaTableBuilder::from_url(url)?
        .with_storage_options(location.options.clone())
        .build()?;
    table.load().await.map_err(|e| match e {
        DeltaTableError::NotATable(_) => DeltaTableError::NotATable(format!(
            "{location}: no Delta table here (no commit in `_delta_log/`)"
        )),
        e => e,
    })?;
    Ok(table)
}

/// Rewrites the table's files smaller than `target` bytes, per table partition, into files of
/// about `target` bytes, and commits the swap as one version that changes no data. A partition
/// with fewer than two small files is left alone.
pub async fn compact(
    table: &mut DeltaTable,
    target: u64,
) -> Result<CompactReport, DeltaTableError> {
    table.update_state().await?;
    let snapshot = table.snapshot()?.clone();
    let schema = snapshot.snapshot().arrow_schema();
    let partition_columns = snapshot.metadata().partition_columns().to_vec();
    let mut report = CompactReport::default();
    // Small files per table partition (partition values in a sorted map: a stable group key).
    let mut groups: BTreeMap<Vec<(String, Option<String>)>, Vec<SmallFile>> = BTreeMap::new();
    for view in snapshot.log_data().iter() {
        report.files_before += 1;
        let size = u64::try_from(view.size()).unwrap_or(u64::MAX);
        let remove = view.remove_action(false);
        if remove.deletion_vector.is_some() || size >= target {
            continue;
        }
        let partition_values = view.partition_values_map();
        let mut key: Vec<(String, Option<String>)> = partition_values.clone().into_iter().collect();
        key.sort();
        groups.entry(key).or_default().push(SmallFile {
            path: view.path().to_string(),
            size,
            modification_time: view.modification_time(),
            partition_values,
            remove,
        });
    }
    // Bins of small files, each up to about `target` bytes.
    let mut bins: Vec<Vec<SmallFile>> = Vec::new();
    for (_, mut files) in groups {
        if files.len() < 2 {
            continue;
        }
        files.sort_by(|a, b| (a.modification_time, &a.path).cmp(&(b.modification_time, &b.path)));
        let mut bin: Vec<SmallFile> = Vec::new();
        let mut size = 0u64;
        for file in files {
            if !bin.is_empty() && size + file.size > target {
                bins.push(std::mem::take(&mut bin));
                size = 0;
            }
            size += file.size;
            bin.push(file);
        }
        bins.push(bin);
    }
    bins.retain(|b| b.len() >= 2);
    if bins.is_empty() {
        return Ok(report);
    }
    let store = table.object_store();
    let mut actions: Vec<Action> = Vec::new();
    for bin in bins {
        let mut writer = RecordBatchWriter::for_table(table)?.with_target_file_size(target);
        for file in bin {
            let path = deltalake::Path::parse(&file.path)
                .map_err(|e| DeltaTableError::Generic(format!("{}: {e}", file.path)))?;
            let bytes = store.get(&path).await?.bytes().await?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .and_then(|b| b.build())
                .map_err(|e| DeltaTableError::Generic(format!("reading {}: {e}", file.path)))?;
            for batch in reader {
                let batch = batch
                    .map_err(|e| DeltaTableError::Generic(format!("reading {}: {e}", file.path)))?;
                let full = table_batch(&batch, &schema, &partition_columns, &file.partition_values)
                    .map_err(|e| DeltaTableError::Generic(format!("{}: {e}", file.path)))?;
                writer.write(full).await?;
            }
            report.files_removed += 1;
            report.bytes_rewritten += file.size;
            actions.push(Action::Remove(file.remove));
        }
        for mut add in writer.flush().await? {
            add.data_change = false;
            report.files_added += 1;
            actions.push(Action::Add(add));
        }
    }
    // delta-rs's conflict check lets a removal that changes no data pass, so two compactions
    // of the same files (two processes, or `flowgate table optimize` beside a pipeline) would
    // both land and every compacted row would be there twice. So each attempt commits exactly
    // at the version after the one it checked (no retries inside delta-rs: the log entry is a
    // create-if-absent), and before the next attempt every file it rewrote must still be in
    // the table; if one is gone another compaction got there first, and this one gives up.
    let removed: std::collections::HashSet<String> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Remove(r) => Some(r.path.clone()),
            _ => None,
        })
        .collect();
    if super::delta::appends_blindly(table) {
        let read = table.version().unwrap_or(0);
        let operation = DeltaOperation::Optimize {
            predicate: None,
            target_size: i64::try_from(target).unwrap_or(i64::MAX),
        };
        let version = commit_after(table, read, &actions, operation, &removed).await?;
        report.version = Some(version);
        table.update_state().await?;
        return Ok(report);
    }
    let mut attempt = 0;
    let version = loop {
        let snapshot = table.snapshot()?.clone();
        let operation = DeltaOperation::Optimize {
            predicate: None,
            target_size: i64::try_from(target).unwrap_or(i64::MAX),
        };
        let properties = CommitProperties::default()
            .with_create_checkpoint(false)
            .with_cleanup_expired_logs(Some(false));
        let committed = CommitBuilder::from(properties)
            .with_actions(actions.clone())
            .with_max_retries(0)
            .build(
                Some(&snapshot as &dyn TableReference),
                table.log_store(),
                operation,
            )
            .await;
        match committed {
            Ok(finalized) => break finalized.version(),
            Err(e) if attempt < 5 => {
                attempt += 1;
                tracing::debug!(
                    "compaction commit attempt {attempt} lost its version ({e}); checking its files"
                );
                table.update_state().await?;
                let active: std::collections::HashSet<String> = table
                    .snapshot()?
                    .log_data()
                    .iter()
                    .map(|v| v.path().to_string())
                    .collect();
                if let Some(gone) = removed.iter().find(|p| !active.contains(*p)) {
                    return Err(DeltaTableError::Generic(format!(
                        "another compaction rewrote `{gone}` first; this one is dropped (its files are left for vacuum)"
                    )));
                }
            }
            Err(e) => return Err(e),
        }
    };
    report.version = Some(version);
    table.update_state().await?;
    Ok(report)
}

/// Commits a compaction's `actions` at the version after `read`, or, when writers took it, at the
/// next free version once the entries they wrote are read: one of them removing a file this
/// compaction rewrote (another compaction got there first) or changing the table's protocol or
/// metadata drops it. Each attempt reads only those entries (not the table), so a compaction
/// wins its version beside commits milliseconds apart. For tables the sink appends to directly
/// (see `delta::appends_blindly`: their log is kept an hour at least, so an entry after `read`
/// cannot have been cleaned up, and a free version is never a hole).
async fn commit_after(
    table: &DeltaTable,
    read: u64,
    actions: &[Action],
    operation: DeltaOperation,
    removed: &std::collections::HashSet<String>,
) -> Result<u64, DeltaTableError> {
    use deltalake::kernel::transaction::{CommitData, PROTOCOL};
    PROTOCOL.can_commit(
        table.snapshot()? as &dyn TableReference,
        actions,
        &operation,
    )?;
    let entry =
        CommitData::new(actions.to_vec(), operation, Default::default(), Vec::new()).get_bytes()?;
    let log_store = table.log_store();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut version = read + 1;
    loop {
        if super::delta::put_entry(log_store.as_ref(), version, &entry).await? {
            return Ok(version);
        }
        while let Some(bytes) = log_store.read_commit_entry(version).await? {
            for line in bytes.split(|&b| b == b'\n') {
                let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else {
                    continue;
                };
                if let Some(gone) = action["remove"]["path"].as_str()
                    && removed.contains(gone)
                {
                    return Err(DeltaTableError::Generic(format!(
                        "another compaction rewrote `{gone}` first (version {version}); this one is dropped (its files are left for vacuum)"
                    )));
                }
                if action.get("metaData").is_some() || action.get("protocol").is_some() {
                    return Err(DeltaTableError::Generic(format!(
                        "the table's schema or protocol changed during the compaction (version {version}); it is tried again at its next turn"
                    )));
                }
            }
            version += 1;
        }
        if Instant::now() >= deadline {
            return Err(DeltaTableError::Generic(format!(
                "other commits kept taking the next version for a minute (up to {version}); the compaction is tried again at its next turn"
            )));
        }
    }
}

/// A data file small enough to compact.
struct SmallFile {
    path: String,
    size: u64,
    modification_time: i64,
    partition_values: std::collections::HashMap<String, Option<String>>,
    /// What takes it out of the table (without changing data) when it is rewritten.
    remove: deltalake::kernel::Remove,
}

/// A batch read from a data file, in the table's schema: partition columns (not stored in the
/// file) from the file's partition values, columns the file predates as nulls.
fn table_batch(
    batch: &RecordBatch,
    schema: &arrow::datatypes::SchemaRef,
    partition_columns: &[String],
    partition_values: &std::collections::HashMap<String, Option<String>>,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let rows = batch.num_rows();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let column = if partition_columns.contains(field.name()) {
            match partition_values.get(field.name()).cloned().flatten() {
                Some(value) => {
                    let text: ArrayRef = Arc::new(StringArray::from(vec![value; rows]));
                    // A value that does not parse is an error, never a quiet null.
                    let strict = arrow::compute::CastOptions {
                        safe: false,
                        ..Default::default()
                    };
                    arrow::compute::cast_with_options(&text, field.data_type(), &strict)?
                }
                None => new_null_array(field.data_type(), rows),
            }
        } else {
            match batch.column_by_name(field.name()) {
                Some(c) if c.data_type() == field.data_type() => c.clone(),
                Some(c) => cast(c, field.data_type())?,
                None => new_null_array(field.data_type(), rows),
            }
        };
        columns.push(column);
    }
    RecordBatch::try_new(schema.clone(), columns)
}

/// Writes a log checkpoint at the table's current version, then deletes log entries older than
/// the table's log retention (30 days unless the table says otherwise) that the checkpoint
/// covers. Returns the version checkpointed.
pub async fn checkpoint(table: &mut DeltaTable) -> Result<u64, DeltaTableError> {
    table.update_state().await?;
    deltalake::checkpoints::create_checkpoint(table, None).await?;
    let version = table.version().unwrap_or(0);
    let removed = deltalake::checkpoints::cleanup_metadata(table, None).await?;
    if removed > 0 {
        tracing::info!(removed, "deleted expired log entries");
    }
    Ok(version)
}

/// Deletes data files that left the table (compacted away) longer ago than `retention`; in
/// [`VacuumMode::Full`] also files no commit names (a writer killed before its commit) older
/// than that, which is only safe when no writer has files staged for a commit (a long epoch,
/// a frozen process), so the pipeline's upkeep uses [`VacuumMode::Lite`]. Returns the files
/// deleted (or, with `dry_run`, the files that would be).
pub async fn vacuum(
    table: DeltaTable,
    retention: Duration,
    dry_run: bool,
    mode: VacuumMode,
) -> Result<Vec<String>, DeltaTableError> {
    let retention = chrono::Duration::from_std(retention)
        .map_err(|e| DeltaTableError::Generic(format!("retention: {e}")))?;
    let (_, metrics) = table
        .vacuum()
        .with_retention_period(retention)
        .with_enforce_retention_duration(false)
        .with_mode(mode)
        .with_dry_run(dry_run)
        .with_commit_properties(
            CommitProperties::default()
                .with_create_checkpoint(false)
                .with_cleanup_expired_logs(Some(false)),
        )
        .await?;
    Ok(metrics.files_deleted)
}

/// A Delta sink's upkeep settings.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Compact at most this often (`None`: never).
    pub optimize_every: Option<Duration>,
    /// Size compaction packs files up to.
    pub target_file_size: u64,
    /// Vacuum after each compaction with this retention (`None`: never).
    pub vacuum_retention: Option<Duration>,
    /// Checkpoint every this many commits (0: never).
    pub checkpoint_every: u64,
}

/// The background upkeep of one sink's table: after each of the sink's commits it may start a
/// task (one at a time, on a thread of its own, so the Parquet work never holds up the
/// pipeline's runtime) that compacts, checkpoints and vacuums. A task's failure is logged and
/// tried again at its next turn; it never stops the pipeline.
pub struct Upkeep {
    sink: String,
    location: TableLocation,
    plan: Plan,
    running: Option<std::thread::JoinHandle<()>>,
    commits: u64,
    last_optimize: Instant,
}

impl Upkeep {
    /// Upkeep of the table at `url` for sink `sink`.
    pub fn new(sink: &str, location: TableLocation, plan: Plan) -> Self {
        Upkeep {
            sink: sink.into(),
            location,
            plan,
            running: None,
            commits: 0,
            last_optimize: Instant::now(),
        }
    }

    /// Called after each commit of the sink: starts a task if one is due and none is running.
    pub fn after_commit(&mut self) {
        self.commits += 1;
        if self.running.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let checkpoint =
            self.plan.checkpoint_every > 0 && self.commits >= self.plan.checkpoint_every;
        let optimize = self
            .plan
            .optimize_every
            .is_some_and(|every| self.last_optimize.elapsed() >= every);
        if !checkpoint && !optimize {
            return;
        }
        if checkpoint {
            self.commits = 0;
        }
        if optimize {
            self.last_optimize = Instant::now();
        }
        let (sink, location, plan) = (self.sink.clone(), self.location.clone(), self.plan.clone());
        let task = move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::warn!(sink, "table upkeep: cannot start: {e}");
                    return;
                }
            };
            rt.block_on(upkeep(&sink, &location, &plan, optimize, checkpoint));
        };
        match std::thread::Builder::new()
            .name("delta-upkeep".into())
            .spawn(task)
        {
            Ok(handle) => self.running = Some(handle),
            Err(e) => tracing::warn!(sink = %self.sink, "table upkeep: cannot start a thread: {e}"),
        }
    }

    /// Waits up to `limit` for a running task (at the end of a run: a compaction cut off is
    /// only wasted work, but finishing it is better).
    pub fn finish(&mut self, limit: Duration) {
        let Some(task) = self.running.take() else {
            return;
        };
        let started = Instant::now();
        while !task.is_finished() && started.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(20));
        }
        if task.is_finished() {
            let _ = task.join();
        } else {
            tracing::info!(sink = %self.sink, "table upkeep still running at exit: left unfinished (a later vacuum removes its files)");
        }
    }
}

/// One upkeep turn: compaction (then vacuum) if due, a checkpoint if due.
async fn upkeep(
    sink: &str,
    location: &TableLocation,
    plan: &Plan,
    optimize: bool,
    checkpoint_due: bool,
) {
    let started = Instant::now();
    let mut table = match open(location).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(sink, "table upkeep: cannot open the table: {e}");
            return;
        }
    };
    if optimize {
        match compact(&mut table, plan.target_file_size).await {
            Ok(r) if r.version.is_some() => tracing::info!(
                sink,
                files_removed = r.files_removed,
                files_added = r.files_added,
                bytes = r.bytes_rewritten,
                version = r.version,
                seconds = started.elapsed().as_secs_f64(),
                "compacted small files"
            ),
            Ok(_) => tracing::debug!(sink, "compaction: nothing to compact"),
            Err(e) => tracing::warn!(sink, "compaction failed (tried again later): {e}"),
        }
    }
    if checkpoint_due {
        match checkpoint(&mut table).await {
            Ok(version) => tracing::debug!(sink, version, "wrote a log checkpoint"),
            Err(e) => tracing::warn!(sink, "log checkpoint failed (tried again later): {e}"),
        }
    }
    if let (true, Some(retention)) = (optimize, plan.vacuum_retention) {
        // Lite: only files compacted away. Full would also take files a writer has staged for
        // a commit it has not made yet (an epoch longer than the retention, a frozen member).
        match vacuum(table, retention, false, VacuumMode::Lite).await {
            Ok(deleted) if !deleted.is_empty() => {
                tracing::info!(sink, files = deleted.len(), "vacuum deleted unused files")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(sink, "vacuum failed (tried again later): {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::runtime::Runtime;

    use crate::config::SchemaMode;
    use crate::sink::{DeltaOptions, DeltaSink, Position, Positions, Sink, TableShape};
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn runtime() -> Arc<Runtime> {
        Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime"),
        )
    }

    fn schema() -> Arc<Schema> {
        Arc::new(Schema::new(vec![
            Field::new("v", DataType::Int64, false),
            Field::new("k", DataType::Utf8, false),
        ]))
    }

    fn rows(values: std::ops::Range<i64>) -> RecordBatch {
        let keys: Vec<String> = values.clone().map(|v| format!("k{}", v % 2)).collect();
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from(values.collect::<Vec<_>>())),
                Arc::new(StringArray::from(keys)),
            ],
        )
        .expect("batch")
    }

    fn open_sink(dir: &std::path::Path, rt: &Arc<Runtime>, plan: Option<Plan>) -> DeltaSink {
        let shape = TableShape::new("t", &schema(), &["k".to_string()], None, None).expect("shape");
        let options = DeltaOptions {
            partition_by: vec!["k".into()],
            target_file_size: 1 << 20,
            schema_mode: SchemaMode::Strict,
            maintenance: plan,
        };
        DeltaSink::open("t", place(dir), "p", shape, options, rt.clone()).expect("open")
    }

    fn place(dir: &std::path::Path) -> TableLocation {
        TableLocation::folder(dir).expect("location")
    }

    fn at(offset: i64) -> Positions {
        [(("t".to_string(), 0), Position { offset, epoch: 1 })].into()
    }

    /// Every `v` in the table's active files, each paired with its partition value, sorted.
    fn read_all(dir: &std::path::Path, rt: &Runtime) -> Vec<(i64, String)> {
        let table = rt.block_on(open(&place(dir))).expect("table");
        let schema = table
            .snapshot()
            .expect("snapshot")
            .snapshot()
            .arrow_schema();
        let store = table.object_store();
        let mut out = Vec::new();
        for view in table.snapshot().expect("snapshot").log_data().iter() {
            let path = deltalake::Path::parse(view.path().as_ref()).expect("path");
            let bytes = rt
                .block_on(async { store.get(&path).await?.bytes().await })
                .expect("file");
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .and_then(|b| b.build())
                .expect("parquet");
            for batch in reader {
                let values = view.partition_values_map();
                let batch = table_batch(&batch.expect("batch"), &schema, &["k".into()], &values)
                    .expect("table batch");
                let v = batch
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("v");
                let k = batch
                    .column(1)
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .expect("k");
                out.extend((0..batch.num_rows()).map(|i| (v.value(i), k.value(i).to_string())));
            }
        }
        out.sort();
        out
    }

    fn expected(n: i64) -> Vec<(i64, String)> {
        (0..n).map(|v| (v, format!("k{}", v % 2))).collect()
    }

    fn data_files(dir: &std::path::Path, rt: &Runtime) -> usize {
        let table = rt.block_on(open(&place(dir))).expect("table");
        table.snapshot().expect("snapshot").log_data().num_files()
    }

    #[test]
    fn compaction_packs_small_files_per_partition_and_keeps_rows_and_offsets() {
        let dir = tempfile::tempdir().expect("dir");
        let rt = runtime();
        let mut sink = open_sink(dir.path(), &rt, None);
        for i in 0..30 {
            sink.write(rows(i * 3..i * 3 + 3)).expect("write");
            assert!(sink.commit(&at(i * 3 + 2)).expect("commit"));
        }
        assert_eq!(
            data_files(dir.path(), &rt),
            60,
            "two partition files per commit"
        );
        let mut table = rt.block_on(open(&place(dir.path()))).expect("table");
        let report = rt.block_on(compact(&mut table, 1 << 20)).expect("compact");
        assert_eq!(report.files_before, 60);
        assert_eq!(report.files_removed, 60);
        assert_eq!(report.files_added, 2, "one file per partition value");
        assert_eq!(data_files(dir.path(), &rt), 2);
        assert_eq!(read_all(dir.path(), &rt), expected(90));
        // The sink goes on committing on its older view of the log, and the offsets it recorded
        // survive the compaction.
        sink.write(rows(90..93)).expect("write");
        assert!(sink.commit(&at(92)).expect("commit after compaction"));
        assert_eq!(read_all(dir.path(), &rt), expected(93));
        let mut reopened = open_sink(dir.path(), &rt, None);
        assert_eq!(
            reopened.committed("t", 0).expect("committed"),
            Some(Position {
                offset: 92,
                epoch: 1
            })
        );
        // A second pass finds only the one new small file per partition beside a packed one.
        let report = rt.block_on(compact(&mut table, 1 << 20)).expect("compact");
        assert_eq!(report.files_added, 2);
        assert_eq!(read_all(dir.path(), &rt), expected(93));
    }

    #[test]
    fn upkeep_beside_the_commits_loses_and_repeats_no_row() {
        let dir = tempfile::tempdir().expect("dir");
        let rt = runtime();
        let plan = Plan {
            optimize_every: Some(Duration::ZERO),
            target_file_size: 1 << 20,
            vacuum_retention: None,
            checkpoint_every: 7,
        };
        // Compactions and log checkpoints, in the log so far.
        let upkept = |log: &std::path::Path| {
            let (mut optimizes, mut checkpoints) = (0, 0);
            for entry in std::fs::read_dir(log).expect("log").filter_map(Result::ok) {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".checkpoint.parquet") {
                    checkpoints += 1;
                } else if name.ends_with(".json")
                    && std::fs::read_to_string(entry.path())
                        .expect("entry")
                        .contains("\"OPTIMIZE\"")
                {
                    optimizes += 1;
                }
            }
            (optimizes, checkpoints)
        };
        let log = dir.path().join("_delta_log");
        let mut sink = open_sink(dir.path(), &rt, Some(plan));
        // At least 150 commits, and on until both kinds of upkeep have landed beside them: one
        // task runs at a time, and on a loaded machine the first compaction can outlast many
        // quick commits.
        let mut n = 0;
        loop {
            sink.write(rows(n * 4..n * 4 + 4)).expect("write");
            assert!(sink.commit(&at(n * 4 + 3)).expect("commit"));
            n += 1;
            if n >= 150 && n % 10 == 0 {
                let (optimizes, checkpoints) = upkept(&log);
                if optimizes > 0 && checkpoints > 0 {
                    break;
                }
                assert!(
                    n < 5_000,
                    "{n} commits: {optimizes} compactions and {checkpoints} log checkpoints ran beside them"
                );
            }
        }
        drop(sink); // waits for a running upkeep task
        assert_eq!(read_all(dir.path(), &rt), expected(n * 4));
        assert!(
            data_files(dir.path(), &rt) < 2 * n as usize,
            "compaction took no file away"
        );
        let mut reopened = open_sink(dir.path(), &rt, None);
        assert_eq!(
            reopened.committed("t", 0).expect("committed"),
            Some(Position {
                offset: n * 4 - 1,
                epoch: 1
            })
        );
    }

    #[test]
    fn two_compactions_of_the_same_files_never_both_land() {
        let dir = tempfile::tempdir().expect("dir");
        let rt = runtime();
        let mut sink = open_sink(dir.path(), &rt, None);
        let mut n = 0;
        for round in 0..4 {
            for _ in 0..20 {
                sink.write(rows(n..n + 3)).expect("write");
                assert!(sink.commit(&at(n + 2)).expect("commit"));
                n += 3;
            }
            // Two compactions start together on the same table (two processes of a group, or
            // `flowgate table optimize` beside a pipeline).
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let outcomes: Vec<Result<CompactReport, String>> = (0..2)
                .map(|_| {
                    let (barrier, location) = (barrier.clone(), place(dir.path()));
                    std::thread::spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("runtime");
                        rt.block_on(async {
                            let mut table = open(&location).await.map_err(|e| e.to_string())?;
                            barrier.wait();
                            compact(&mut table, 1 << 20)
                                .await
                                .map_err(|e| e.to_string())
                        })
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().expect("thread"))
                .collect();
            let landed = outcomes
                .iter()
                .filter(|o| o.as_ref().is_ok_and(|r| r.version.is_some()))
                .count();
            assert!(landed >= 1, "round {round}: {outcomes:?}");
            assert_eq!(
                read_all(dir.path(), &rt),
                expected(n),
                "round {round}: {outcomes:?}"
            );
        }
    }

    #[test]
    fn vacuum_deletes_only_files_that_left_the_table() {
        let dir = tempfile::tempdir().expect("dir");
        let rt = runtime();
        let mut sink = open_sink(dir.path(), &rt, None);
        for i in 0..5 {
            sink.write(rows(i * 2..i * 2 + 2)).expect("write");
            assert!(sink.commit(&at(i * 2 + 1)).expect("commit"));
        }
        let mut table = rt.block_on(open(&place(dir.path()))).expect("table");
        rt.block_on(compact(&mut table, 1 << 20)).expect("compact");
        let kept = rt.block_on(open(&place(dir.path()))).expect("table");
        let would = rt
            .block_on(vacuum(
                kept,
                Duration::from_secs(3600),
                true,
                VacuumMode::Full,
            ))
            .expect("dry run");
        assert!(
            would.is_empty(),
            "files younger than the retention stay: {would:?}"
        );
        let kept = rt.block_on(open(&place(dir.path()))).expect("table");
        let deleted = rt
            .block_on(vacuum(kept, Duration::ZERO, false, VacuumMode::Lite))
            .expect("vacuum");
        assert_eq!(deleted.len(), 10, "the ten compacted files: {deleted:?}");
        assert_eq!(read_all(dir.path(), &rt), expected(10));
    }

    #[test]
    fn a_merged_schema_adds_the_new_column_and_old_rows_read_as_null() {
        let dir = tempfile::tempdir().expect("dir");
        let rt = runtime();
        let mut sink = open_sink(dir.path(), &rt, None);
        sink.write(rows(0..4)).expect("write");
        assert!(sink.commit(&at(3)).expect("commit"));
        drop(sink);
        // The plugin now gives a third column.
        let wider = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Int64, false),
            Field::new("note", DataType::Utf8, true),
            Field::new("k", DataType::Utf8, false),
        ]));
        let shape = || TableShape::new("t", &wider, &["k".to_string()], None, None).expect("shape");
        let options = |schema_mode| DeltaOptions {
            partition_by: vec!["k".into()],
            target_file_size: 1 << 20,
            schema_mode,
            maintenance: None,
        };
        let strict = DeltaSink::open(
            "t",
            place(dir.path()),
            "p",
            shape(),
            options(SchemaMode::Strict),
            rt.clone(),
        );
        let refused = strict.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("schema_mode: merge"), "{refused}");
        assert_eq!(
            DeltaSink::check(
                "t",
                &place(dir.path()),
                &shape(),
                &options(SchemaMode::Merge),
                &rt
            )
            .expect("check"),
            crate::sink::Fit::Merge {
                added: vec!["note".into()],
                missing: vec![]
            }
        );
        let mut merged = DeltaSink::open(
            "t",
            place(dir.path()),
            "p",
            shape(),
            options(SchemaMode::Merge),
            rt.clone(),
        )
        .expect("merge");
        let batch = RecordBatch::try_new(
            wider.clone(),
            vec![
                Arc::new(Int64Array::from(vec![4, 5])),
                Arc::new(StringArray::from(vec![Some("n4"), None])),
                Arc::new(StringArray::from(vec!["k0", "k1"])),
            ],
        )
        .expect("batch");
        merged.write(batch).expect("write wider rows");
        assert!(merged.commit(&at(5)).expect("commit"));
        let table = rt.block_on(open(&place(dir.path()))).expect("table");
        let columns: Vec<String> = table
            .snapshot()
            .expect("snapshot")
            .snapshot()
            .arrow_schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(columns, ["v", "k", "note"], "the new column comes last");
        assert_eq!(read_all(dir.path(), &rt), expected(6));
        // Compaction reads the old files (without `note`) as nulls in the merged shape.
        let mut table = table;
        rt.block_on(compact(&mut table, 1 << 20)).expect("compact");
        assert_eq!(read_all(dir.path(), &rt), expected(6));
        // A type change is refused even when merging.
        let retyped = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Utf8, false),
            Field::new("k", DataType::Utf8, false),
        ]));
        let shape = TableShape::new("t", &retyped, &["k".to_string()], None, None).expect("shape");
        let refused = DeltaSink::check(
            "t",
            &place(dir.path()),
            &shape,
            &options(SchemaMode::Merge),
            &rt,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            refused.contains("column `v` is Int64 in the table and Utf8 in the stage"),
            "{refused}"
        );
    }
}

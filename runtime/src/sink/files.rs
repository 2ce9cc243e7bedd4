use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use super::{
    Fence, Fit, Position, Positions, Sink, SinkError, TableShape, fence, positions_moved, raise,
};

/// How a file table's files are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// Parquet, ZSTD-compressed.
    Parquet,
    /// CSV (RFC 4180 quoting; timestamps in RFC 3339), with a header line if `header`.
    Csv {
        /// A header line naming the columns in each file.
        header: bool,
        /// The field delimiter (one ASCII character).
        delimiter: u8,
    },
}

impl FileFormat {
    fn extension(self) -> &'static str {
        match self {
            FileFormat::Parquet => "parquet",
            FileFormat::Csv { .. } => "csv",
        }
    }
}

/// Files (Parquet or CSV) under `column=value/` folders (values escaped as Hive does, so a value
/// can never name a folder outside the table), with a commit log (`_flowgate_log/`), as Spark's
/// file sink keeps. Rows are encoded into files under `_flowgate_staging/` as they arrive, where
/// plain readers (`date=*/*.parquet`, Spark, polars' hive reader) never look. A commit first
/// writes the log entry naming the files, then moves them into place; a sink that opens after a
/// crash finishes the moves of every entry (roll forward), and deletes staged files no entry
/// names once they are ten minutes old. So a file is in place only if a commit names it, and each
/// is there once. Several processes may write one table: each names its files and log entries
/// with its own writer id. Each entry records the source positions it covers, so a restart does
/// not write rows twice.
pub struct FileTableSink {
    name: String,
    dir: PathBuf,
    partition_by: Vec<usize>,
    file_schema: SchemaRef,
    /// This process's id in file names: several processes (one consumer group) may write one
    /// table, each under its own names.
    writer: String,
    version: u64,
    /// Per partition, the position this process holds (as committed by it, or found when the
    /// partition was assigned to it).
    committed: Positions,
    /// Per partition, the newest position any log entry read so far records.
    latest: Positions,
    shape: TableShape,
    encode_time: std::time::Duration,
    /// Files being written for the next commit, by partition folder: rows are encoded as they
    /// arrive, so a commit only finishes the files (it used to encode everything at once and stall
    /// the run loop for it).
    open: BTreeMap<String, OpenFile>,
    /// Rows in `open`.
    rows: usize,
    /// Files started so far (numbers file names within a commit).
    files_started: u64,
    /// Commit-log entries read (or written) so far, by file name.
    logs_read: std::collections::HashSet<std::ffi::OsString>,
    format: FileFormat,
}

/// A file in the staging folder, taking rows until the next commit.
struct OpenFile {
    rel: String,
    writer: FileWriter,
}

/// The encoder of one staged file.
enum FileWriter {
    Parquet(Box<ArrowWriter<std::fs::File>>),
    Csv(Box<arrow::csv::Writer<std::io::BufWriter<std::fs::File>>>),
}

impl FileWriter {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), String> {
        match self {
            FileWriter::Parquet(w) => w.write(batch).map_err(|e| e.to_string()),
            FileWriter::Csv(w) => w.write(batch).map_err(|e| e.to_string()),
        }
    }

    /// Finishes the file and makes it durable.
    fn finish(self) -> Result<(), String> {
        let file = match self {
            FileWriter::Parquet(w) => w.into_inner().map_err(|e| e.to_string())?,
            FileWriter::Csv(w) => {
                let mut buffered = (*w).into_inner();
                buffered.flush().map_err(|e| e.to_string())?;
                buffered.into_inner().map_err(|e| e.to_string())?
            }
        };
        file.sync_all().map_err(|e| e.to_string())
    }
}

/// A file no commit names is removed at open once it is this old (younger ones may belong to
/// another process's commit in progress).
const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(600);

impl LogEntry {
    /// The position recorded for each partition.
    fn positions(&self) -> impl Iterator<Item = ((String, i32), Position)> + '_ {
        self.offsets.iter().filter_map(|(key, &offset)| {
            let epoch = self.epochs.get(key).copied().unwrap_or(0);
            key.rsplit_once('/')
                .and_then(|(t, p)| p.parse::<i32>().ok().map(|p| (t.to_string(), p)))
                .map(|k| (k, Position { offset, epoch }))
        })
    }
}

#[derive(Serialize, Deserialize)]
struct LogEntry {
    version: u64,
    files: Vec<String>,
    rows: usize,
    /// `topic/partition` → last offset covered.
    offsets: BTreeMap<String, i64>,
    /// `topic/partition` → the partition's checkpoint epoch at that offset.
    #[serde(default)]
    epochs: BTreeMap<String, u64>,
    /// The table's columns (partition columns included) as `[name, type]`: every file of the
    /// table has this shape, and a sink whose stage gives another refuses to write (entries
    /// written before this was recorded have none).
    #[serde(default)]
    columns: Vec<[String; 2]>,
}

/// A schema as a log entry records it: names and types in a spelling of Flowgate's own, so a
/// new Arrow version (whose type names change now and then) still reads old entries alike.
fn columns_of(schema: &Schema) -> Vec<[String; 2]> {
    schema
        .fields()
        .iter()
        .map(|f| [f.name().clone(), type_name(f.data_type())])
        .collect()
}

/// A column type as the commit log spells it.
fn type_name(data_type: &arrow::datatypes::DataType) -> String {
    use arrow::datatypes::{DataType as T, TimeUnit};
    match data_type {
        T::Utf8 | T::LargeUtf8 | T::Utf8View => "string".into(),
        T::Boolean => "bool".into(),
        T::Int8 => "int8".into(),
        T::Int16 => "int16".into(),
        T::Int32 => "int32".into(),
        T::Int64 => "int64".into(),
        T::UInt8 => "uint8".into(),
        T::UInt16 => "uint16".into(),
        T::UInt32 => "uint32".into(),
        T::UInt64 => "uint64".into(),
        T::Float32 => "float32".into(),
        T::Float64 => "float64".into(),
        T::Date32 => "date".into(),
        T::Timestamp(unit, tz) => {
            let unit = match unit {
                TimeUnit::Second => "s",
                TimeUnit::Millisecond => "ms",
                TimeUnit::Microsecond => "us",
                TimeUnit::Nanosecond => "ns",
            };
            match tz {
                Some(tz) => format!("timestamp[{unit}, {tz}]"),
                None => format!("timestamp[{unit}]"),
            }
        }
        other => format!("{other:?}"),
    }
}

/// The commit-log entries under `dir` in name order, except those `skip` names.
fn read_entries(
    dir: &Path,
    skip: impl Fn(&std::ffi::OsStr) -> bool,
) -> Result<Vec<(std::ffi::OsString, LogEntry)>, String> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir.join(LOG))
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter(|p| p.file_name().is_none_or(|n| !skip(n)))
        .collect();
    entries.sort();
    entries
        .into_iter()
        .map(|entry| {
            let text =
                std::fs::read_to_string(&entry).map_err(|e| format!("{}: {e}", entry.display()))?;
            let log: LogEntry = serde_json::from_str(&text)
                .map_err(|e| format!("commit log {} is damaged: {e}", entry.display()))?;
            Ok((entry.file_name().unwrap_or_default().to_os_string(), log))
        })
        .collect()
}

/// Whether the table whose newest log entry (with columns) is among `entries` takes `shape`'s
/// rows: Parquet and CSV tables keep one shape, so any difference is refused.
fn fit_entries(
    entries: &[(std::ffi::OsString, LogEntry)],
    shape: &TableShape,
) -> Result<Fit, String> {
    let Some((name, entry)) = entries.iter().rev().find(|(_, e)| !e.columns.is_empty()) else {
        return Ok(if entries.is_empty() {
            Fit::New
        } else {
            Fit::Same
        });
    };
    let ours = columns_of(shape.schema());
    if entry.columns == ours {
        return Ok(Fit::Same);
    }
    let describe = |c: &[[String; 2]]| {
        c.iter()
            .map(|[n, t]| format!("{n}: {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(format!(
        "the table's files have ({}) (commit log entry {}), the stage gives ({}); files of two shapes in one table would break its readers: write to a new path, or move the old files away",
        describe(&entry.columns),
        name.to_string_lossy(),
        describe(&ours)
    ))
}

const LOG: &str = "_flowgate_log";

/// Renames a committed file from staging into place; already in place (another process finished
/// the move) counts as done.
fn move_into_place(staged: &Path, path: &Path) -> std::io::Result<()> {
    match std::fs::rename(staged, path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.exists() => Ok(()),
        other => other,
    }
}
const STAGING: &str = "_flowgate_staging";

/// A partition value as a folder name: the characters Hive escapes (`/`, `=`, `%`, `:`, …,
/// control characters) become `%XX`, so every value stays one folder inside the table.
pub(crate) fn escape_partition_value(value: &str, out: &mut String) {
    for c in value.chars() {
        let escape = matches!(
            c,
            '"' | '#' | '%' | '\'' | '*' | '/' | ':' | '=' | '?' | '\\' | '{' | '[' | ']' | '^'
        ) || c.is_control();
        if escape {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
    // `.` and `..` alone are names of folders that already exist.
    if value == "." || value == ".." || value.is_empty() {
        out.truncate(out.len() - value.len());
        for b in value.bytes() {
            let _ = write!(out, "%{b:02X}");
        }
        if value.is_empty() {
            out.push_str("__empty__");
        }
    }
}

/// A short id unique to this process and moment.
fn writer_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:08x}{:04x}",
        (nanos % (1 << 32)) as u32,
        std::process::id() % (1 << 16)
    )
}

impl FileTableSink {
    /// Opens (or starts) the table folder at `dir`, cleaning up files no commit names.
    pub fn open(
        name: &str,
        dir: &Path,
        shape: TableShape,
        partition_by: &[String],
        format: FileFormat,
    ) -> Result<Self, SinkError> {
        let fail = |message: String| SinkError::Table {
            sink: name.into(),
            table: dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir.join(LOG))
            .and_then(|_| std::fs::create_dir_all(dir.join(STAGING)))
            .map_err(|e| fail(format!("cannot create the folder: {e}")))?;
        let schema = shape.schema().clone();
        let partition_by: Vec<usize> = partition_by
            .iter()
            .map(|p| {
                schema
                    .index_of(p)
                    .map_err(|_| fail(format!("no column `{p}`")))
            })
            .collect::<Result<_, _>>()?;
        let file_fields: Vec<_> = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(i, _)| !partition_by.contains(i))
            .map(|(_, f)| f.clone())
            .collect();
        let file_schema = Arc::new(Schema::new(file_fields));
        let mut sink = FileTableSink {
            name: name.into(),
            dir: dir.to_path_buf(),
            partition_by,
            file_schema,
            writer: writer_id(),
            version: 0,
            committed: Positions::new(),
            latest: Positions::new(),
            shape,
            encode_time: std::time::Duration::ZERO,
            open: BTreeMap::new(),
            rows: 0,
            files_started: 0,
            logs_read: Default::default(),
            format,
        };
        let entries = read_entries(dir, |_| false).map_err(fail)?;
        fit_entries(&entries, &sink.shape).map_err(|message| SinkError::SchemaMismatch {
            sink: name.into(),
            table: dir.display().to_string(),
            message,
        })?;
        let known = sink.read_log(entries);
        sink.roll_forward(&known)
            .map_err(|e| fail(format!("finishing an interrupted commit: {e}")))?;
        sink.remove_orphans(&dir.join(STAGING), &known)
            .map_err(|e| fail(format!("cleaning up uncommitted files: {e}")))?;
        Ok(sink)
    }

    /// How the stage's output fits the table at `dir`, without changing anything (for
    /// `flowgate validate`).
    pub fn check(name: &str, dir: &Path, shape: &TableShape) -> Result<Fit, SinkError> {
        if !dir.join(LOG).is_dir() {
            return Ok(Fit::New);
        }
        let table = dir.display().to_string();
        let entries = read_entries(dir, |_| false).map_err(|message| SinkError::Table {
            sink: name.into(),
            table: table.clone(),
            message,
        })?;
        fit_entries(&entries, shape).map_err(|message| SinkError::SchemaMismatch {
            sink: name.into(),
            table,
            message,
        })
    }

    /// Takes in every commit-log entry (all writers): the files committed, and the newest
    /// position per source partition (into `latest`).
    fn read_log(
        &mut self,
        entries: Vec<(std::ffi::OsString, LogEntry)>,
    ) -> std::collections::HashSet<String> {
        let mut known = std::collections::HashSet::new();
        for (name, log) in entries {
            for (key, position) in log.positions() {
                raise(&mut self.latest, key, position);
            }
            known.extend(log.files);
            self.logs_read.insert(name);
        }
        known
    }

    /// Fencing: an entry another process wrote since this one last read the log, recording a
    /// partition about to be committed further than this process holds it, means the group moved
    /// the partition to that process (this one lost it): committing would write rows twice.
    fn check_not_overtaken(&mut self, positions: &Positions) -> Result<(), SinkError> {
        let read = &self.logs_read;
        let entries = read_entries(&self.dir, |n| read.contains(n)).map_err(|e| self.fail(e))?;
        for (name, log) in entries {
            for (key, position) in log.positions() {
                raise(&mut self.latest, key, position);
            }
            self.logs_read.insert(name);
        }
        match fence("the commit log", positions, &self.latest, &self.committed) {
            Fence::Clear => Ok(()),
            Fence::Overtaken(why) => Err(self.fail(why)),
            // This process reads its own entries as it writes them: positions it is about to
            // commit, already in the log, were written by another process.
            Fence::Landed => Err(self.fail(
                "the commit log already records these positions, written by another process: another process owns the partition now; not committing"
                    .to_string(),
            )),
        }
    }

    /// Moves into place every staged file a log entry names (a crash between writing the entry
    /// and moving its files leaves some in staging).
    fn roll_forward(&self, known: &std::collections::HashSet<String>) -> std::io::Result<()> {
        for rel in known {
            let staged = self.dir.join(STAGING).join(rel);
            if staged.exists() {
                let path = self.dir.join(rel);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                tracing::info!(sink = %self.name, file = %rel, "moving a committed file into place (its commit was interrupted)");
                move_into_place(&staged, &path)?;
            }
        }
        Ok(())
    }

    fn remove_orphans(
        &self,
        dir: &Path,
        known: &std::collections::HashSet<String>,
    ) -> std::io::Result<()> {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d)? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path
                    .strip_prefix(dir)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let ours =
                    rel.ends_with(".parquet") || rel.ends_with(".csv") || rel.ends_with(".tmp");
                let old = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= ORPHAN_AGE);
                if ours && old && !known.contains(&rel) {
                    tracing::warn!(sink = %self.name, file = %path.display(), "removing a file no commit names (left by an interrupted write)");
                    std::fs::remove_file(&path)?;
                }
            }
        }
        Ok(())
    }

    /// A new file in `folder` for the next commit (version `self.version + 1`).
    fn start_file(&mut self, folder: &str) -> Result<OpenFile, SinkError> {
        self.files_started += 1;
        let rel = format!(
            "{folder}part-{}-{:06}-{:04}.{}",
            self.writer,
            self.version + 1,
            self.files_started,
            self.format.extension()
        );
        let tmp = self.dir.join(STAGING).join(&rel);
        let open = || -> Result<FileWriter, Box<dyn std::error::Error>> {
            if let Some(parent) = tmp.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let file = std::fs::File::create(&tmp)?;
            Ok(match self.format {
                FileFormat::Parquet => {
                    let props = WriterProperties::builder()
                        .set_compression(Compression::ZSTD(ZstdLevel::default()))
                        .build();
                    FileWriter::Parquet(Box::new(ArrowWriter::try_new(
                        file,
                        self.file_schema.clone(),
                        Some(props),
                    )?))
                }
                FileFormat::Csv { header, delimiter } => FileWriter::Csv(Box::new(
                    arrow::csv::WriterBuilder::new()
                        .with_header(header)
                        .with_delimiter(delimiter)
                        .build(std::io::BufWriter::with_capacity(1 << 20, file)),
                )),
            })
        };
        let writer = open().map_err(|e| self.fail(format!("creating {rel}: {e}")))?;
        Ok(OpenFile { rel, writer })
    }

    fn fail(&self, message: String) -> SinkError {
        SinkError::Table {
            sink: self.name.clone(),
            table: self.dir.display().to_string(),
            message,
        }
    }

    /// Splits `batch` by the partition columns: `col=value/…` folder → rows.
    fn split(
        &self,
        batch: &RecordBatch,
    ) -> Result<Vec<(String, RecordBatch)>, arrow::error::ArrowError> {
        let options = FormatOptions::default().with_null("__null__");
        let formatters = self
            .partition_by
            .iter()
            .map(|&i| ArrayFormatter::try_new(batch.column(i).as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()?;
        let schema = self.shape.schema();
        let names: Vec<&String> = self
            .partition_by
            .iter()
            .map(|&i| schema.field(i).name())
            .collect();
        let mut groups: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        // One key buffer for all rows; a new String only for a folder not seen yet.
        let mut key = String::new();
        let mut value = String::new();
        for row in 0..batch.num_rows() {
            key.clear();
            for (name, f) in names.iter().zip(&formatters) {
                value.clear();
                write!(value, "{}", f.value(row))
                    .map_err(|e| arrow::error::ArrowError::ExternalError(Box::new(e)))?;
                key.push_str(name);
                key.push('=');
                escape_partition_value(&value, &mut key);
                key.push('/');
            }
            match groups.get_mut(&key) {
                Some(rows) => rows.push(row as u32),
                None => {
                    groups.insert(key.clone(), vec![row as u32]);
                }
            }
        }
        let keep: Vec<usize> = (0..batch.num_columns())
            .filter(|i| !self.partition_by.contains(i))
            .collect();
        let data = batch.project(&keep)?;
        groups
            .into_iter()
            .map(|(key, rows)| {
                let part = if rows.len() == data.num_rows() {
                    data.clone()
                } else {
                    take_record_batch(&data, &UInt32Array::from(rows))?
                };
                Ok((key, part))
            })
            .collect()
    }
}

impl Sink for FileTableSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn write(&mut self, batch: RecordBatch) -> Result<(), SinkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = self
            .shape
            .apply(&batch)
            .map_err(|e| self.fail(format!("converting a batch: {e}")))?;
        let parts = self
            .split(&batch)
            .map_err(|e| self.fail(format!("partitioning: {e}")))?;
        for (folder, part) in parts {
            if !self.open.contains_key(&folder) {
                let file = self.start_file(&folder)?;
                self.open.insert(folder.clone(), file);
            }
            if let Some(file) = self.open.get_mut(&folder)
                && let Err(e) = file.writer.write(&part)
            {
                let rel = file.rel.clone();
                return Err(self.fail(format!("writing {rel}: {e}")));
            }
        }
        self.rows += batch.num_rows();
        Ok(())
    }

    fn commit(&mut self, positions: &Positions) -> Result<bool, SinkError> {
        if self.open.is_empty() && !positions_moved(positions, &self.committed) {
            return Ok(false);
        }
        self.check_not_overtaken(positions)?;
        let version = self.version + 1;
        let rows = std::mem::take(&mut self.rows);
        let mut files = Vec::new();
        for (_, file) in std::mem::take(&mut self.open) {
            let OpenFile { rel, writer } = file;
            let encoding = std::time::Instant::now();
            let finished = writer.finish();
            self.encode_time += encoding.elapsed();
            finished.map_err(|e| self.fail(format!("writing {rel}: {e}")))?;
            files.push(rel);
        }
        let key = |t: &str, p: i32| format!("{t}/{p}");
        let entry = LogEntry {
            version,
            files,
            rows,
            offsets: positions
                .iter()
                .map(|((t, p), pos)| (key(t, *p), pos.offset))
                .collect(),
            epochs: positions
                .iter()
                .map(|((t, p), pos)| (key(t, *p), pos.epoch))
                .collect(),
            columns: columns_of(self.shape.schema()),
        };
        let log = self
            .dir
            .join(LOG)
            .join(format!("{version:020}-{}.json", self.writer));
        let tmp = log.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(&entry).map_err(|e| self.fail(e.to_string()))?;
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &log))
            .map_err(|e| self.fail(format!("writing the commit log: {e}")))?;
        if let Some(name) = log.file_name() {
            self.logs_read.insert(name.to_os_string());
        }
        // Committed: now move the files into place (a crash here is finished at the next open).
        for rel in &entry.files {
            let (staged, path) = (self.dir.join(STAGING).join(rel), self.dir.join(rel));
            path.parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|_| move_into_place(&staged, &path))
                .map_err(|e| self.fail(format!("moving {rel} into place: {e}")))?;
        }
        self.version = version;
        self.committed
            .extend(positions.iter().map(|(k, v)| (k.clone(), *v)));
        self.latest
            .extend(positions.iter().map(|(k, v)| (k.clone(), *v)));
        tracing::debug!(sink = %self.name, version, rows, "committed Parquet files");
        Ok(true)
    }

    /// Only what finishing the files at a commit takes; rows are encoded in `write`.
    fn encode_time(&self) -> std::time::Duration {
        self.encode_time
    }

    fn committed(&mut self, topic: &str, partition: i32) -> Result<Option<Position>, SinkError> {
        // Another process of the group may have written this partition until a moment ago, and
        // may have died between its log entry and moving its files.
        let entries = read_entries(&self.dir, |_| false).map_err(|e| self.fail(e))?;
        let known = self.read_log(entries);
        self.roll_forward(&known)
            .map_err(|e| self.fail(format!("finishing an interrupted commit: {e}")))?;
        // This process holds the partition from here on, as far as the log records it.
        let key = (topic.to_string(), partition);
        let position = self.latest.get(&key).copied();
        match position {
            Some(p) => self.committed.insert(key, p),
            None => self.committed.remove(&key),
        };
        Ok(position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field};

    fn shape() -> TableShape {
        let schema = Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Int64, false),
        ]);
        TableShape::new("t", &schema, &["k".to_string()], None, None).unwrap()
    }

    fn batch(keys: &[&str]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let values: Vec<i64> = (0..keys.len() as i64).collect();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(Int64Array::from(values)),
            ],
        )
        .unwrap()
    }

    fn positions(offset: i64, epoch: u64) -> Positions {
        [(("t".to_string(), 0), Position { offset, epoch })].into()
    }

    /// Files a plain reader sees: `*.parquet` outside folders starting with `_`.
    fn visible(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                if p.is_dir() && !name.starts_with('_') {
                    stack.push(p);
                } else if name.ends_with(".parquet") {
                    out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn a_table_never_takes_files_of_a_second_shape() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink =
            FileTableSink::open("t", dir.path(), shape(), &["k".into()], FileFormat::Parquet)
                .unwrap();
        sink.write(batch(&["a", "b"])).unwrap();
        sink.commit(&positions(1, 1)).unwrap();
        drop(sink);
        assert_eq!(
            FileTableSink::check("t", dir.path(), &shape()).unwrap(),
            Fit::Same
        );
        // The stage gained a column: the table (and validate) refuse it, naming both shapes.
        let wider = Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Int64, false),
            Field::new("w", DataType::Float64, true),
        ]);
        let wider = TableShape::new("t", &wider, &["k".to_string()], None, None).unwrap();
        let checked = FileTableSink::check("t", dir.path(), &wider)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let opened =
            FileTableSink::open("t", dir.path(), wider, &["k".into()], FileFormat::Parquet)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
        for refused in [checked, opened] {
            assert!(
                refused.contains("does not fit")
                    && refused.contains("have (k: string, v: int64)")
                    && refused.contains("gives (k: string, v: int64, w: float64)"),
                "{refused}"
            );
        }
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            FileTableSink::check("t", &empty.path().join("new"), &shape()).unwrap(),
            Fit::New
        );
    }

    #[test]
    fn partition_values_are_escaped_and_stay_inside_the_table() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("table");
        let mut sink =
            FileTableSink::open("t", &dir, shape(), &["k".into()], FileFormat::Parquet).unwrap();
        sink.write(batch(&["a/b", "..", "x=y", "../../escape", ""]))
            .unwrap();
        sink.commit(&positions(4, 1)).unwrap();
        let folders: Vec<String> = visible(&dir)
            .iter()
            .map(|f| f.split('/').next().unwrap().to_string())
            .collect();
        assert_eq!(
            folders,
            vec![
                "k=%2E%2E",
                "k=..%2F..%2Fescape",
                "k=__empty__",
                "k=a%2Fb",
                "k=x%3Dy"
            ]
        );
        let outside: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(outside.len(), 1, "nothing written next to the table");
    }

    #[test]
    fn staged_rows_are_invisible_until_committed_and_an_interrupted_commit_rolls_forward() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink =
            FileTableSink::open("t", dir.path(), shape(), &["k".into()], FileFormat::Parquet)
                .unwrap();
        sink.write(batch(&["a", "b"])).unwrap();
        assert!(
            visible(dir.path()).is_empty(),
            "staged files are not visible"
        );
        sink.commit(&positions(1, 1)).unwrap();
        let committed = visible(dir.path());
        assert_eq!(committed.len(), 2);
        // A crash after the log entry, before the files moved: put one back in staging.
        let moved = &committed[0];
        let staged = dir.path().join(STAGING).join(moved);
        std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
        std::fs::rename(dir.path().join(moved), &staged).unwrap();
        // Rows staged but never committed (a crash before the log entry) stay invisible.
        sink.write(batch(&["c"])).unwrap();
        drop(sink);
        let mut reopened =
            FileTableSink::open("t", dir.path(), shape(), &["k".into()], FileFormat::Parquet)
                .unwrap();
        assert_eq!(visible(dir.path()), committed, "rolled forward, once");
        assert_eq!(
            reopened.committed("t", 0).unwrap(),
            Some(Position {
                offset: 1,
                epoch: 1
            })
        );
    }

    #[test]
    fn a_partition_another_process_committed_since_is_not_committed_again() {
        let dir = tempfile::tempdir().unwrap();
        let at = |partition: i32, offset: i64, epoch: u64| -> Positions {
            [(("t".to_string(), partition), Position { offset, epoch })].into()
        };
        // This process commits partitions 0 and 1, then stalls past its session.
        let mut stalled =
            FileTableSink::open("t", dir.path(), shape(), &["k".into()], FileFormat::Parquet)
                .unwrap();
        stalled.write(batch(&["a"])).unwrap();
        assert!(stalled.commit(&at(0, 10, 1)).unwrap());
        assert!(stalled.commit(&at(1, 10, 1)).unwrap());
        // The group moves partition 0 to another process, which goes on from there.
        let mut other =
            FileTableSink::open("t", dir.path(), shape(), &["k".into()], FileFormat::Parquet)
                .unwrap();
        assert_eq!(
            other.committed("t", 0).unwrap(),
            Some(Position {
                offset: 10,
                epoch: 1
            })
        );
        other.write(batch(&["b"])).unwrap();
        assert!(other.commit(&at(0, 20, 2)).unwrap());
        // The stalled process wakes up: partition 1 (still its own) commits; partition 0 is
        // refused, though the commit of partition 1 already read the other's entry.
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
        let mut reader =
            FileTableSink::open("t", dir.path(), shape(), &["k".into()], FileFormat::Parquet)
                .unwrap();
        assert_eq!(
            reader.committed("t", 0).unwrap(),
            Some(Position {
                offset: 20,
                epoch: 2
            })
        );
        assert_eq!(
            reader.committed("t", 1).unwrap(),
            Some(Position {
                offset: 15,
                epoch: 2
            })
        );
    }

    #[test]
    fn csv_files_take_the_same_layout_and_commit_log() {
        let dir = tempfile::tempdir().unwrap();
        let csv = FileFormat::Csv {
            header: true,
            delimiter: b';',
        };
        let mut sink = FileTableSink::open("t", dir.path(), shape(), &["k".into()], csv).unwrap();
        sink.write(batch(&["a", "b", "a"])).unwrap();
        sink.write(batch(&["a;b"])).unwrap();
        assert!(sink.commit(&positions(3, 1)).unwrap());
        let mut files: Vec<(String, String)> = Vec::new();
        for folder in ["k=a", "k=b", "k=a;b"] {
            for e in std::fs::read_dir(dir.path().join(folder)).unwrap() {
                let p = e.unwrap().path();
                assert_eq!(p.extension().unwrap(), "csv");
                files.push((folder.into(), std::fs::read_to_string(p).unwrap()));
            }
        }
        files.sort();
        assert_eq!(
            files,
            vec![
                ("k=a".into(), "v\n0\n2\n".into()),
                ("k=a;b".into(), "v\n0\n".into()),
                ("k=b".into(), "v\n1\n".into()),
            ]
        );
        let mut reopened =
            FileTableSink::open("t", dir.path(), shape(), &["k".into()], csv).unwrap();
        assert_eq!(
            reopened.committed("t", 0).unwrap(),
            Some(Position {
                offset: 3,
                epoch: 1
            })
        );
    }
}

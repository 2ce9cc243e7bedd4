use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::row::{Row, RowConverter, SortField};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use serde::{Deserialize, Serialize};

use super::place::{Out, Place};
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
/// file sink keeps, in a local folder or an object store (`s3://`, where "move" is a
/// server-side copy and delete, and log entries are conditional puts). Rows are encoded into files under `_flowgate_staging/` as they arrive, where
/// plain readers (`date=*/*.parquet`, Spark, polars' hive reader) never look. A commit first
/// writes the log entry naming the files, then moves them into place; a sink that opens after a
/// crash finishes the moves of every entry (roll forward), and deletes staged files no entry
/// names once they are an hour old. So a file is in place only if a commit names it, and each
/// is there once. Several processes may write one table: each names its files and log entries
/// with its own writer id. Each entry records the source positions it covers, so a restart does
/// not write rows twice.
pub struct FileTableSink {
    name: String,
    /// The pipeline writing: positions are its own (`pipeline`, topic, partition); another
    /// pipeline's entries in the same table record other positions.
    pipeline: String,
    place: Place,
    partition_by: Vec<usize>,
    file_schema: SchemaRef,
    /// This process's id in file names: several processes (one consumer group) may write one
    /// table, each under its own names.
    writer: String,
    version: u64,
    /// Per partition, the position this process holds (as committed by it, or found when the
    /// partition was assigned to it).
    committed: Positions,
    /// Per partition, the newest position any of this pipeline's log entries read so far
    /// records, and which entry recorded it (for messages).
    latest: Positions,
    recorded_by: HashMap<(String, i32), Provenance>,
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
    logs_read: HashSet<String>,
    /// Every file a log entry read so far names.
    known: HashSet<String>,
    format: FileFormat,
}

/// A file in the staging folder, taking rows until the next commit.
struct OpenFile {
    rel: String,
    writer: FileWriter,
}

/// The encoder of one staged file.
enum FileWriter {
    Parquet(Box<ArrowWriter<Out>>),
    Csv(Box<arrow::csv::Writer<std::io::BufWriter<Out>>>),
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
        let out = match self {
            FileWriter::Parquet(w) => w.into_inner().map_err(|e| e.to_string())?,
            FileWriter::Csv(w) => {
                let mut buffered = (*w).into_inner();
                buffered.flush().map_err(|e| e.to_string())?;
                buffered.into_inner().map_err(|e| e.to_string())?
            }
        };
        out.finish().map_err(|e| e.to_string())
    }
}

/// A staged file no commit names is removed at open once it is this old (younger ones may belong
/// to another process's commit in progress: an epoch, `checkpoint.interval`, must stay well
/// under this; a Parquet file's time is that of its last flushed row group).
const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

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
    /// The pipeline that wrote the entry: positions belong to (pipeline, topic, partition), so
    /// two pipelines may write one table. Entries written before Flowgate recorded it have none
    /// and count as the reading pipeline's.
    #[serde(default)]
    pipeline: String,
    /// When the entry was written (ms since the Unix epoch; 0 in older entries).
    #[serde(default)]
    written_ms: i64,
}

/// Which log entry recorded a position, for messages that must say who wrote what, and when.
#[derive(Debug, Clone)]
struct Provenance {
    entry: String,
    written_ms: i64,
}

impl std::fmt::Display for Provenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "commit log entry `{}`", self.entry)?;
        if self.written_ms > 0
            && let Some(t) = chrono::DateTime::from_timestamp_millis(self.written_ms)
        {
            write!(f, ", written {}", t.format("%Y-%m-%d %H:%M:%S UTC"))?;
        }
        Ok(())
    }
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

/// The commit-log entries of the table at `place` in name order, except those `skip` names.
fn read_entries(
    place: &Place,
    skip: impl Fn(&str) -> bool,
) -> Result<Vec<(String, LogEntry)>, String> {
    place
        .log_names()?
        .into_iter()
        .filter(|name| !skip(name))
        .map(|name| {
            let text = place.read_log(&name)?;
            let log: LogEntry = serde_json::from_str(&text)
                .map_err(|e| format!("commit log {place}/{LOG}/{name} is damaged: {e}"))?;
            Ok((name, log))
        })
        .collect()
}

/// What a Parquet/CSV table's commit log says of its writers.
#[derive(Debug, Default)]
pub struct FileWriters {
    /// Per entry: the pipeline that wrote it (empty in entries older than that record) and the
    /// topics of the positions it records.
    pub entries: Vec<(String, Vec<String>)>,
    /// When the newest entry was written (ms since the Unix epoch), if it says.
    pub written_ms: Option<i64>,
    /// Data files and rows the entries committed.
    pub files: usize,
    pub rows: u64,
    /// The columns of the newest entry that records them, as `[name, type]`.
    pub columns: Vec<[String; 2]>,
    /// Per (pipeline, `topic/partition`): the newest position recorded, by which entry, when.
    pub positions: BTreeMap<(String, String), (Position, String, i64)>,
}

/// Reads the writers of the table at `place` from its commit log (no entries: no table).
pub(crate) fn file_writers(place: &Place) -> Result<FileWriters, String> {
    let mut writers = FileWriters::default();
    for (name, entry) in read_entries(place, |_| false)? {
        let topics = entry
            .offsets
            .keys()
            .filter_map(|k| k.rsplit_once('/').map(|(t, _)| t.to_string()))
            .collect();
        if entry.written_ms > 0 {
            writers.written_ms = Some(entry.written_ms);
        }
        writers.files += entry.files.len();
        writers.rows += entry.rows as u64;
        if !entry.columns.is_empty() {
            writers.columns = entry.columns.clone();
        }
        for (partition, &offset) in &entry.offsets {
            let position = Position {
                offset,
                epoch: entry.epochs.get(partition).copied().unwrap_or(0),
            };
            let key = (entry.pipeline.clone(), partition.clone());
            if writers
                .positions
                .get(&key)
                .is_none_or(|(held, _, _)| *held < position)
            {
                writers
                    .positions
                    .insert(key, (position, name.clone(), entry.written_ms));
            }
        }
        writers.entries.push((entry.pipeline, topics));
    }
    Ok(writers)
}

/// Whether the table whose newest log entry (with columns) is among `entries` takes `shape`'s
/// rows: Parquet and CSV tables keep one shape, so any difference is refused.
fn fit_entries(entries: &[(String, LogEntry)], shape: &TableShape) -> Result<Fit, String> {
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
        name,
        describe(&ours)
    ))
}

use super::place::{LOG, STAGING};

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
    /// Opens (or starts) the table in local folder `dir`.
    pub fn open(
        name: &str,
        pipeline: &str,
        dir: &Path,
        shape: TableShape,
        partition_by: &[String],
        format: FileFormat,
    ) -> Result<Self, SinkError> {
        Self::open_at(
            name,
            pipeline,
            Place::Folder(dir.to_path_buf()),
            shape,
            partition_by,
            format,
        )
    }

    /// Opens (or starts) the table at `place`: finishes the moves of commits a crash
    /// interrupted, and cleans up staged files no commit names.
    pub(crate) fn open_at(
        name: &str,
        pipeline: &str,
        place: Place,
        shape: TableShape,
        partition_by: &[String],
        format: FileFormat,
    ) -> Result<Self, SinkError> {
        let fail = |message: String| SinkError::Table {
            sink: name.into(),
            table: place.to_string(),
            message,
        };
        place.prepare().map_err(fail)?;
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
        let entries = read_entries(&place, |_| false).map_err(fail)?;
        fit_entries(&entries, &shape).map_err(|message| SinkError::SchemaMismatch {
            sink: name.into(),
            table: place.to_string(),
            message,
        })?;
        let mut sink = FileTableSink {
            name: name.into(),
            pipeline: pipeline.into(),
            place,
            partition_by,
            file_schema,
            writer: writer_id(),
            version: 0,
            committed: Positions::new(),
            latest: Positions::new(),
            recorded_by: HashMap::new(),
            shape,
            encode_time: std::time::Duration::ZERO,
            open: BTreeMap::new(),
            rows: 0,
            files_started: 0,
            logs_read: HashSet::new(),
            known: HashSet::new(),
            format,
        };
        sink.take_in(entries);
        sink.roll_forward()
            .map_err(|e| sink.fail(format!("finishing an interrupted commit: {e}")))?;
        sink.remove_orphans()?;
        Ok(sink)
    }

    /// How the stage's output fits the table in local folder `dir`, without changing anything.
    pub fn check(name: &str, dir: &Path, shape: &TableShape) -> Result<Fit, SinkError> {
        Self::check_at(name, &Place::Folder(dir.to_path_buf()), shape)
    }

    /// How the stage's output fits the table at `place`, without changing anything (for
    /// `flowgate validate`).
    pub(crate) fn check_at(
        name: &str,
        place: &Place,
        shape: &TableShape,
    ) -> Result<Fit, SinkError> {
        let entries = read_entries(place, |_| false).map_err(|message| SinkError::Table {
            sink: name.into(),
            table: place.to_string(),
            message,
        })?;
        fit_entries(&entries, shape).map_err(|message| SinkError::SchemaMismatch {
            sink: name.into(),
            table: place.to_string(),
            message,
        })
    }

    /// Takes in commit-log entries (any writer's): the files committed (into `known`), and the
    /// newest position per source partition (into `latest`).
    fn take_in(&mut self, entries: Vec<(String, LogEntry)>) {
        for (name, log) in entries {
            if log.pipeline.is_empty() || log.pipeline == self.pipeline {
                for (key, position) in log.positions() {
                    if self.latest.get(&key).is_none_or(|p| *p < position) {
                        self.recorded_by.insert(
                            key.clone(),
                            Provenance {
                                entry: name.clone(),
                                written_ms: log.written_ms,
                            },
                        );
                    }
                    raise(&mut self.latest, key, position);
                }
            }
            self.known.extend(log.files);
            self.logs_read.insert(name);
        }
    }

    /// Reads the log entries written since this process last looked.
    fn read_new_entries(&mut self) -> Result<(), SinkError> {
        let read = &self.logs_read;
        let entries = read_entries(&self.place, |n| read.contains(n)).map_err(|e| self.fail(e))?;
        self.take_in(entries);
        Ok(())
    }

    /// Fencing: an entry another process wrote since this one last read the log, recording a
    /// partition about to be committed further than this process holds it, means the group moved
    /// the partition to that process (this one lost it): committing would write rows twice.
    fn check_not_overtaken(&mut self, positions: &Positions) -> Result<(), SinkError> {
        self.read_new_entries()?;
        match fence("the commit log", positions, &self.latest, &self.committed) {
            Fence::Clear => Ok(()),
            Fence::Overtaken(why) => {
                let by: Vec<String> = positions
                    .keys()
                    .filter_map(|(t, p)| self.provenance(t, *p).map(|w| format!("`{t}/{p}`: {w}")))
                    .collect();
                Err(self.overtaken(format!("{why} ({})", by.join("; "))))
            }
            // This process reads its own entries as it writes them: positions it is about to
            // commit, already in the log, were written by another process.
            Fence::Landed => Err(self.overtaken(
                "the commit log already records these positions, written by another process: another process owns the partition now; not committing"
                    .to_string(),
            )),
        }
    }

    /// Moves into place every staged file a log entry names (a crash between writing the entry
    /// and moving its files leaves some in staging).
    fn roll_forward(&self) -> std::io::Result<()> {
        for staged in self.place.staged_files()? {
            if self.known.contains(&staged.rel) {
                tracing::info!(sink = %self.name, file = %staged.rel, "moving a committed file into place (its commit was interrupted)");
                self.place.move_into_place(&staged.rel)?;
            }
        }
        Ok(())
    }

    /// Deletes staged files no commit names once they are [`ORPHAN_AGE`] old (younger ones
    /// may be another process's commit in progress).
    fn remove_orphans(&mut self) -> Result<(), SinkError> {
        let staged = self
            .place
            .staged_files()
            .map_err(|e| self.fail(format!("listing staged files: {e}")))?;
        let old: Vec<String> = staged
            .into_iter()
            .filter(|s| s.age.is_some_and(|age| age >= ORPHAN_AGE))
            .map(|s| s.rel)
            .filter(|rel| {
                rel.ends_with(".parquet") || rel.ends_with(".csv") || rel.ends_with(".tmp")
            })
            .filter(|rel| !self.known.contains(rel))
            .collect();
        if old.is_empty() {
            return Ok(());
        }
        // A commit that landed since the log was read may name them.
        self.read_new_entries()?;
        for rel in &old {
            if !self.known.contains(rel) {
                tracing::warn!(sink = %self.name, table = %self.place, file = %rel, "removing a file no commit names (left by an interrupted write)");
                self.place
                    .remove_staged(rel)
                    .map_err(|e| self.fail(format!("removing {rel}: {e}")))?;
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
        let open = || -> Result<FileWriter, Box<dyn std::error::Error>> {
            let out = self.place.create_staged(&rel)?;
            Ok(match self.format {
                FileFormat::Parquet => {
                    let props = super::parquet_properties(
                        &self.file_schema,
                        Compression::ZSTD(ZstdLevel::default()),
                        None,
                    );
                    FileWriter::Parquet(Box::new(ArrowWriter::try_new(
                        out,
                        self.file_schema.clone(),
                        Some(props),
                    )?))
                }
                FileFormat::Csv { header, delimiter } => FileWriter::Csv(Box::new(
                    arrow::csv::WriterBuilder::new()
                        .with_header(header)
                        .with_delimiter(delimiter)
                        .build(std::io::BufWriter::with_capacity(1 << 20, out)),
                )),
            })
        };
        let writer = open().map_err(|e| self.fail(format!("creating {rel}: {e}")))?;
        Ok(OpenFile { rel, writer })
    }

    fn overtaken(&self, message: String) -> SinkError {
        SinkError::Overtaken {
            sink: self.name.clone(),
            table: self.place.to_string(),
            message,
        }
    }

    fn fail(&self, message: String) -> SinkError {
        SinkError::Table {
            sink: self.name.clone(),
            table: self.place.to_string(),
            message,
        }
    }

    /// The batch's rows by partition folder (`date=2026-12-05/`), the partition columns dropped.
    /// Rows are grouped by their partition values' row encoding, one comparison per row in a run
    /// of equal values; each distinct value is formatted once, for its folder's name.
    fn split(
        &self,
        batch: &RecordBatch,
    ) -> Result<Vec<(String, RecordBatch)>, arrow::error::ArrowError> {
        if self.partition_by.is_empty() {
            return Ok(vec![(String::new(), batch.clone())]);
        }
        let keys: Vec<ArrayRef> = self
            .partition_by
            .iter()
            .map(|&i| batch.column(i).clone())
            .collect();
        let converter = RowConverter::new(
            keys.iter()
                .map(|c| SortField::new(c.data_type().clone()))
                .collect(),
        )?;
        let encoded = converter.convert_columns(&keys)?;
        // Each distinct value: its first row and all its rows, in first-seen order.
        let mut groups: Vec<(usize, Vec<u32>)> = Vec::new();
        let mut seen: HashMap<Row<'_>, usize> = HashMap::new();
        let mut run: Option<(Row<'_>, usize)> = None;
        for row in 0..batch.num_rows() {
            let value = encoded.row(row);
            let group = match run {
                Some((last, group)) if last == value => group,
                _ => *seen.entry(value).or_insert_with(|| {
                    groups.push((row, Vec::new()));
                    groups.len() - 1
                }),
            };
            groups[group].1.push(row as u32);
            run = Some((value, group));
        }
        let options = FormatOptions::default().with_null("__null__");
        let formatters = keys
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()?;
        let schema = self.shape.schema();
        // Two encodings may format alike (NaNs with different payloads): their rows share a
        // folder, in row order.
        let mut folders: BTreeMap<String, (Vec<u32>, bool)> = BTreeMap::new();
        let mut value = String::new();
        for (first, rows) in groups {
            let mut key = String::new();
            for (&i, f) in self.partition_by.iter().zip(&formatters) {
                value.clear();
                write!(value, "{}", f.value(first))
                    .map_err(|e| arrow::error::ArrowError::ExternalError(Box::new(e)))?;
                key.push_str(schema.field(i).name());
                key.push('=');
                escape_partition_value(&value, &mut key);
                key.push('/');
            }
            match folders.get_mut(&key) {
                Some((earlier, merged)) => {
                    earlier.extend(rows);
                    *merged = true;
                }
                None => {
                    folders.insert(key, (rows, false));
                }
            }
        }
        let keep: Vec<usize> = (0..batch.num_columns())
            .filter(|i| !self.partition_by.contains(i))
            .collect();
        let data = batch.project(&keep)?;
        folders
            .into_iter()
            .map(|(key, (mut rows, merged))| {
                if merged {
                    rows.sort_unstable();
                }
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
            pipeline: self.pipeline.clone(),
            written_ms: chrono::Utc::now().timestamp_millis(),
        };
        let log = format!("{version:020}-{}.json", self.writer);
        let text = serde_json::to_string_pretty(&entry).map_err(|e| self.fail(e.to_string()))?;
        self.place
            .write_log(&log, text)
            .map_err(|e| self.fail(format!("writing the commit log: {e}")))?;
        for key in positions.keys() {
            self.recorded_by.insert(
                key.clone(),
                Provenance {
                    entry: log.clone(),
                    written_ms: entry.written_ms,
                },
            );
        }
        self.logs_read.insert(log);
        // Committed: now move the files into place (a crash here is finished at the next open).
        for rel in &entry.files {
            self.place
                .move_into_place(rel)
                .map_err(|e| {
                    self.fail(format!(
                        "moving {rel} from `{STAGING}/` into place: {e} (the commit is recorded; the next start finishes the move if the staged file is there)"
                    ))
                })?;
        }
        self.known.extend(entry.files);
        self.version = version;
        self.committed
            .extend(positions.iter().map(|(k, v)| (k.clone(), *v)));
        self.latest
            .extend(positions.iter().map(|(k, v)| (k.clone(), *v)));
        tracing::debug!(sink = %self.name, version, rows, "committed files");
        Ok(true)
    }

    fn provenance(&self, topic: &str, partition: i32) -> Option<String> {
        self.recorded_by
            .get(&(topic.to_string(), partition))
            .map(|p| format!("{p}, pipeline `{}`", self.pipeline))
    }

    /// Only what finishing the files at a commit takes; rows are encoded in `write`.
    fn encode_time(&self) -> std::time::Duration {
        self.encode_time
    }

    fn committed(&mut self, topic: &str, partition: i32) -> Result<Option<Position>, SinkError> {
        // Another process of the group may have written this partition until a moment ago,
        // and may have died between its log entry and moving its files.
        self.read_new_entries()?;
        self.roll_forward()
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
    use super::super::place::Bucket;
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field};

    /// Table `t` of pipeline `p`: Parquet, partitioned by `k`.
    fn open_parquet(dir: &Path) -> Result<FileTableSink, SinkError> {
        FileTableSink::open("t", "p", dir, shape(), &["k".into()], FileFormat::Parquet)
    }

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
        let mut sink = open_parquet(dir.path()).unwrap();
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
        let opened = FileTableSink::open(
            "t",
            "p",
            dir.path(),
            wider,
            &["k".into()],
            FileFormat::Parquet,
        )
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
    fn a_table_without_partition_columns_takes_every_row_in_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink =
            FileTableSink::open("t", "p", dir.path(), shape(), &[], FileFormat::Parquet).unwrap();
        sink.write(batch(&["b", "a", "b"])).unwrap();
        sink.commit(&positions(2, 1)).unwrap();
        let files = visible(dir.path());
        assert_eq!(files.len(), 1, "{files:?}");
        let rows: usize = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(dir.path().join(&files[0])).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap().num_rows())
        .sum();
        assert_eq!(rows, 3);
    }

    #[test]
    fn interleaved_partition_values_each_get_their_rows_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open_parquet(dir.path()).unwrap();
        sink.write(batch(&["b", "a", "b", "b", "a", "c"])).unwrap();
        sink.commit(&positions(5, 1)).unwrap();
        let mut got = Vec::new();
        for file in visible(dir.path()) {
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                std::fs::File::open(dir.path().join(&file)).unwrap(),
            )
            .unwrap();
            let column = reader.metadata().row_group(0).column(0);
            let encodings: Vec<_> = column.encodings().collect();
            assert!(
                !encodings.contains(&parquet::basic::Encoding::RLE_DICTIONARY)
                    && encodings.contains(&parquet::basic::Encoding::DELTA_BINARY_PACKED),
                "an integer column is delta-packed, without a dictionary: {encodings:?}"
            );
            let values: Vec<i64> = reader
                .build()
                .unwrap()
                .flat_map(|b| {
                    let b = b.unwrap();
                    b.column(0)
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .unwrap()
                        .values()
                        .to_vec()
                })
                .collect();
            got.push((file.split('/').next().unwrap().to_string(), values));
        }
        assert_eq!(
            got,
            vec![
                ("k=a".to_string(), vec![1, 4]),
                ("k=b".to_string(), vec![0, 2, 3]),
                ("k=c".to_string(), vec![5]),
            ]
        );
    }

    #[test]
    fn partition_values_are_escaped_and_stay_inside_the_table() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("table");
        let mut sink =
            FileTableSink::open("t", "p", &dir, shape(), &["k".into()], FileFormat::Parquet)
                .unwrap();
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
        let mut sink = open_parquet(dir.path()).unwrap();
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
        let mut reopened = open_parquet(dir.path()).unwrap();
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
    fn positions_are_the_pipelines_own() {
        // Two pipelines tap the same topic into one table (the demo and the Kafka pipeline both
        // wrote `../data/raw` once): neither takes the other's positions as its own.
        let dir = tempfile::tempdir().unwrap();
        let open = |pipeline: &str| {
            FileTableSink::open(
                "raw",
                pipeline,
                dir.path(),
                shape(),
                &["k".into()],
                FileFormat::Parquet,
            )
            .unwrap()
        };
        let at: Positions = [(
            ("ticks".to_string(), 0),
            Position {
                offset: 125_377,
                epoch: 5,
            },
        )]
        .into();
        let mut demo = open("demo");
        demo.write(batch(&["a"])).unwrap();
        assert!(demo.commit(&at).unwrap());
        let mut stocks = open("stocks");
        assert_eq!(
            stocks.committed("ticks", 0).unwrap(),
            None,
            "not stocks' position"
        );
        stocks.write(batch(&["b"])).unwrap();
        let first: Positions = [(
            ("ticks".to_string(), 0),
            Position {
                offset: 9,
                epoch: 1,
            },
        )]
        .into();
        assert!(
            stocks.commit(&first).unwrap(),
            "no fence against another pipeline"
        );
        assert_eq!(
            open("demo").committed("ticks", 0).unwrap(),
            Some(Position {
                offset: 125_377,
                epoch: 5
            })
        );
        let written = file_writers(&Place::Folder(dir.path().to_path_buf())).unwrap();
        let mut pipelines: Vec<&str> = written.entries.iter().map(|(p, _)| p.as_str()).collect();
        pipelines.sort();
        assert_eq!(pipelines, ["demo", "stocks"]);
        assert!(written.written_ms.is_some_and(|t| t > 0));
    }

    #[test]
    fn a_partition_another_process_committed_since_is_not_committed_again() {
        let dir = tempfile::tempdir().unwrap();
        let at = |partition: i32, offset: i64, epoch: u64| -> Positions {
            [(("t".to_string(), partition), Position { offset, epoch })].into()
        };
        // This process commits partitions 0 and 1, then stalls past its session.
        let mut stalled = open_parquet(dir.path()).unwrap();
        stalled.write(batch(&["a"])).unwrap();
        assert!(stalled.commit(&at(0, 10, 1)).unwrap());
        assert!(stalled.commit(&at(1, 10, 1)).unwrap());
        // The group moves partition 0 to another process, which goes on from there.
        let mut other = open_parquet(dir.path()).unwrap();
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
        let mut reader = open_parquet(dir.path()).unwrap();
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
        let mut sink =
            FileTableSink::open("t", "p", dir.path(), shape(), &["k".into()], csv).unwrap();
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
            FileTableSink::open("t", "p", dir.path(), shape(), &["k".into()], csv).unwrap();
        assert_eq!(
            reopened.committed("t", 0).unwrap(),
            Some(Position {
                offset: 3,
                epoch: 1
            })
        );
    }

    /// Objects under `root` in `store`, relative to it, with their contents.
    fn objects(
        store: &object_store::memory::InMemory,
        rt: &tokio::runtime::Runtime,
    ) -> BTreeMap<String, String> {
        use futures::TryStreamExt;
        use object_store::{ObjectStore, ObjectStoreExt};
        let listed: Vec<object_store::ObjectMeta> =
            rt.block_on(store.list(None).try_collect()).unwrap();
        listed
            .into_iter()
            .map(|meta| {
                let body = rt
                    .block_on(async { store.get(&meta.location).await?.bytes().await })
                    .unwrap();
                (
                    meta.location.to_string(),
                    String::from_utf8_lossy(&body).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn a_table_in_an_object_store_commits_by_copy_and_rolls_forward() {
        use object_store::ObjectStoreExt;
        let rt = Arc::new(tokio::runtime::Runtime::new().unwrap());
        let store = Arc::new(object_store::memory::InMemory::new());
        let place = || {
            // Parts of 1 KiB: the bigger file goes up as a multipart upload.
            Place::Bucket(
                Bucket::new(store.clone(), "lake/t".into(), "s3://b/lake/t", rt.clone())
                    .with_part_size(1024),
            )
        };
        let csv = FileFormat::Csv {
            header: false,
            delimiter: b',',
        };
        let mut sink =
            FileTableSink::open_at("t", "p", place(), shape(), &["k".into()], csv).unwrap();
        let many: Vec<&str> = std::iter::repeat_n("a", 2000).collect();
        sink.write(batch(&many)).unwrap();
        // A value the sink escapes: its folder is escaped once, in keys and listings alike.
        sink.write(batch(&["b:c/d"])).unwrap();
        let staged_only = objects(&store, &rt);
        assert!(
            staged_only
                .keys()
                .all(|k| k.starts_with("lake/t/_flowgate_staging/")),
            "before the commit, only staged objects: {:?}",
            staged_only.keys()
        );
        assert!(sink.commit(&positions(2000, 1)).unwrap());
        let after = objects(&store, &rt);
        let data: Vec<&String> = after
            .keys()
            .filter(|k| !k.contains("/_flowgate_"))
            .collect();
        assert_eq!(data.len(), 2, "{:?}", after.keys());
        assert!(data[0].starts_with("lake/t/k=a/part-") && data[0].ends_with(".csv"));
        assert!(
            data[1].starts_with("lake/t/k=b%3Ac%2Fd/part-"),
            "{}",
            data[1]
        );
        let expected: String = (0..2000).map(|v| format!("{v}\n")).collect();
        assert_eq!(
            after[data[0]], expected,
            "the multipart upload holds every row"
        );
        assert_eq!(after[data[1]], "0\n");
        assert!(
            !after.keys().any(|k| k.contains(STAGING)),
            "staging emptied by the moves"
        );
        assert_eq!(
            after
                .keys()
                .filter(|k| k.contains("/_flowgate_log/"))
                .count(),
            1
        );
        // A crash after the log entry, before the moves: put both files back into staging.
        let key = |k: &str| object_store::path::Path::parse(k).unwrap();
        let staged_key = |k: &str| k.replace("lake/t/", "lake/t/_flowgate_staging/");
        for d in &data {
            rt.block_on(store.rename(&key(d), &key(&staged_key(d))))
                .unwrap();
        }
        let staged_path = key(&staged_key(data[0]));
        sink.write(batch(&["c"])).unwrap();
        drop(sink);
        let mut reopened =
            FileTableSink::open_at("t", "p", place(), shape(), &["k".into()], csv).unwrap();
        let rolled = objects(&store, &rt);
        assert_eq!(rolled[data[0]], expected, "rolled forward by copy");
        assert_eq!(rolled[data[1]], "0\n", "the escaped folder too");
        assert!(!rolled.contains_key(staged_path.as_ref()));
        assert!(
            !rolled.keys().any(|k| k.contains("k=c")),
            "uncommitted rows stay invisible"
        );
        assert_eq!(
            reopened.committed("t", 0).unwrap(),
            Some(Position {
                offset: 2000,
                epoch: 1
            })
        );
        // The table's shape is read from the bucket as from a folder.
        assert_eq!(
            FileTableSink::check_at("t", &place(), &shape()).unwrap(),
            Fit::Same
        );
        let elsewhere = Place::Bucket(Bucket::new(
            store.clone(),
            "lake/none".into(),
            "s3://b/lake/none",
            rt.clone(),
        ));
        assert_eq!(
            FileTableSink::check_at("t", &elsewhere, &shape()).unwrap(),
            Fit::New
        );
    }

    #[test]
    fn a_log_entry_in_an_object_store_is_never_overwritten() {
        let rt = Arc::new(tokio::runtime::Runtime::new().unwrap());
        let store = Arc::new(object_store::memory::InMemory::new());
        let place = Place::Bucket(Bucket::new(store, "t".into(), "s3://b/t", rt));
        place.write_log("00001-a.json", "{}".into()).unwrap();
        let again = place.write_log("00001-a.json", "{\"x\":1}".into());
        assert!(
            again.as_ref().is_err_and(|e| e.contains("exists already")),
            "{again:?}"
        );
        assert_eq!(place.read_log("00001-a.json").unwrap(), "{}");
    }
}

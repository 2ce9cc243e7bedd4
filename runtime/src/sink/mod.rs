//! Sinks: where a stage's batches go. A sink buffers what it is given and makes it visible
//! atomically on `commit`, together with the source offsets it covers; that commit is the record
//! of truth a restart resumes from.

mod console;
mod delta;
mod files;
pub mod maintenance;
mod place;
mod postgres;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, Date32Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

pub use console::ConsoleSink;
pub use delta::{DeltaOptions, DeltaSink, LogWriters, log_writers};
pub(crate) use files::file_writers;
pub use files::{FileFormat, FileTableSink, FileWriters};
pub(crate) use place::Place;
pub use postgres::PostgresSink;

/// Last source offset covered, per (topic, partition).
pub type Offsets = BTreeMap<(String, i32), i64>;

/// How far a sink holds one source partition: every row derived from records up to `offset`,
/// as of the partition's checkpoint `epoch` (whose stored plugin state goes with it). A restart
/// restores the state of `epoch` and resumes after `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// The last source offset covered.
    pub offset: i64,
    /// The partition's checkpoint number: state stored under it matches this position.
    pub epoch: u64,
}

/// What a commit records, per (topic, partition).
pub type Positions = BTreeMap<(String, i32), Position>;

/// Errors from sinks. Each names the sink and the table.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The table exists with a schema the stage's output does not fit.
    #[error("sink `{sink}`: the table at `{table}` does not fit the stage's output: {message}")]
    SchemaMismatch {
        /// Sink name.
        sink: String,
        /// Table location.
        table: String,
        /// The difference.
        message: String,
    },
    /// The table could not be read, created or written.
    #[error("sink `{sink}`: table `{table}`: {message}")]
    Table {
        /// Sink name.
        sink: String,
        /// Table location.
        table: String,
        /// What failed.
        message: String,
    },
    /// Another process committed a partition past what this one holds: the group moved the
    /// partition (this process lost it, or got it before its last owner's final commit landed).
    /// Nothing was committed; the rows belong to the partition's new owner.
    #[error("sink `{sink}`: table `{table}`: {message}")]
    Overtaken {
        /// Sink name.
        sink: String,
        /// Table location.
        table: String,
        /// Which partition, recorded where and by whom.
        message: String,
    },
    /// The sink's config does not fit the stage.
    #[error("sink `{sink}`: {message}")]
    Config {
        /// Sink name.
        sink: String,
        /// What is wrong.
        message: String,
    },
}

/// A sink.
pub trait Sink: Send {
    /// Its name.
    fn name(&self) -> &str;
    /// Stages a batch (with the stage's output schema) for the next commit: nothing a reader
    /// sees changes until then.
    fn write(&mut self, batch: RecordBatch) -> Result<(), SinkError>;
    /// Makes everything staged visible in one atomic step, recording `positions` with it.
    /// Returns whether it committed anything.
    fn commit(&mut self, positions: &Positions) -> Result<bool, SinkError>;
    /// How far this sink holds `topic`/`partition`, if it holds any of it.
    fn committed(&mut self, topic: &str, partition: i32) -> Result<Option<Position>, SinkError>;
    /// Where the position this sink holds for `topic`/`partition` was recorded, and when (for
    /// messages: "Delta version 12, committed 2026-12-02 01:23:45 UTC, pipeline `demo`").
    fn provenance(&self, topic: &str, partition: i32) -> Option<String> {
        let _ = (topic, partition);
        None
    }
    /// Whether the sink keeps what it commits (and so takes part in recovery). A console does not.
    fn durable(&self) -> bool {
        true
    }
    /// Time spent so far in `commit` turning rows into Parquet bytes, for the run report (a sink
    /// that encodes rows as they arrive counts that in `write`).
    fn encode_time(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// Turns a stage's batches into what a table stores: timestamps as UTC microseconds (Delta's
/// `timestamp`), and a derived `date` column when the table is partitioned by one.
#[derive(Debug, Clone)]
pub struct TableShape {
    /// The stage's columns in table types, then the derived `date`.
    shaped: SchemaRef,
    /// What the table stores: `shaped`, or an existing table's columns (see [`Self::fit_to`]).
    output: SchemaRef,
    /// Per table column, the `shaped` column it takes (`None`: nulls), when the table's columns
    /// differ from `shaped`.
    projection: Option<Vec<Option<usize>>>,
    date_from: Option<usize>,
}

/// How a stage's output meets a table that exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fit {
    /// No table yet: the sink creates it from the stage's output.
    New,
    /// The table has exactly the stage's columns.
    Same,
    /// The table takes the stage's output after the change a merge makes.
    Merge {
        /// Stage columns the table lacks, added to it (nullable).
        added: Vec<String>,
        /// Table columns the stage lacks, written as nulls.
        missing: Vec<String>,
    },
}

impl std::fmt::Display for Fit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fit::New => f.write_str("no table yet: created at the first run"),
            Fit::Same => f.write_str("the table fits"),
            Fit::Merge { added, missing } => {
                let mut parts = Vec::new();
                if !added.is_empty() {
                    parts.push(format!("adds column(s) {}", added.join(", ")));
                }
                if !missing.is_empty() {
                    parts.push(format!("writes nulls into {}", missing.join(", ")));
                }
                if parts.is_empty() {
                    parts.push("columns in the table's order".into());
                }
                write!(
                    f,
                    "the table fits after a schema merge: {}",
                    parts.join("; ")
                )
            }
        }
    }
}

/// How the columns of `ours` (a stage's output in table form) fit the table's `existing` ones:
/// exactly (strict), or, with `merge`, once the stage's new columns are added to the table.
/// Either way a column whose type differs does not fit. `Err` says what does not fit.
pub fn fit_columns(existing: &Schema, ours: &Schema, merge: bool) -> Result<Fit, String> {
    let describe = |s: &Schema| flowgate_sdk::columns::describe_schema(s);
    let same = existing.fields().len() == ours.fields().len()
        && existing
            .fields()
            .iter()
            .zip(ours.fields())
            .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
    if same {
        return Ok(Fit::Same);
    }
    if !merge {
        return Err(format!(
            "table has {}, stage gives {} (`schema_mode: merge` on a Delta sink adds new columns)",
            describe(existing),
            describe(ours)
        ));
    }
    let mut problems = Vec::new();
    let mut added = Vec::new();
    for field in ours.fields() {
        match existing.field_with_name(field.name()) {
            Ok(have) if have.data_type() != field.data_type() => problems.push(format!(
                "column `{}` is {} in the table and {} in the stage (a type change needs a new table)",
                field.name(),
                have.data_type(),
                field.data_type()
            )),
            Ok(_) => {}
            Err(_) => added.push(field.name().clone()),
        }
    }
    let mut missing = Vec::new();
    for field in existing.fields() {
        if ours.field_with_name(field.name()).is_err() {
            if field.is_nullable() {
                missing.push(field.name().clone());
            } else {
                problems.push(format!(
                    "the table's column `{}` is not nullable and the stage does not give it",
                    field.name()
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(Fit::Merge { added, missing })
    } else {
        Err(problems.join("; "))
    }
}

/// The table type of a stage type.
fn table_type(data_type: &DataType) -> DataType {
    match data_type {
        DataType::Timestamp(_, _) => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        other => other.clone(),
    }
}

impl TableShape {
    /// The shape for a stage with `input` schema; `date_from` is the column `date` derives from
    /// (`None`: no derived column).
    pub fn new(
        sink: &str,
        input: &Schema,
        partition_by: &[String],
        date_from: Option<&str>,
        event_time: Option<&str>,
    ) -> Result<Self, SinkError> {
        let mut fields: Vec<Field> = input
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), table_type(f.data_type()), f.is_nullable()))
            .collect();
        let needs_date =
            partition_by.iter().any(|p| p == "date") && input.index_of("date").is_err();
        let mut date_index = None;
        if needs_date {
            let is_time =
                |i: usize| matches!(input.field(i).data_type(), DataType::Timestamp(_, _));
            let index = match date_from {
                Some(col) => input.index_of(col).ok().filter(|&i| is_time(i)).ok_or_else(|| SinkError::Config { sink: sink.into(), message: format!("`date_from`: `{col}` is not a timestamp column of the stage") })?,
                None => event_time
                    .and_then(|c| input.index_of(c).ok())
                    .filter(|&i| is_time(i))
                    .or_else(|| (0..input.fields().len()).find(|&i| is_time(i)))
                    .ok_or_else(|| SinkError::Config { sink: sink.into(), message: "cannot derive `date`: the stage has no timestamp column (set `date_from`)".into() })?,
            };
            date_index = Some(index);
            fields.push(Field::new(
                "date",
                DataType::Date32,
                input.field(index).is_nullable(),
            ));
        }
        for p in partition_by {
            if !fields.iter().any(|f| f.name() == p) {
                return Err(SinkError::Config {
                    sink: sink.into(),
                    message: format!("`partition_by`: `{p}` is not a column of the stage"),
                });
            }
        }
        let shaped = Arc::new(Schema::new(fields));
        Ok(TableShape {
            output: shaped.clone(),
            shaped,
            projection: None,
            date_from: date_index,
        })
    }

    /// The table's schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.output
    }

    /// The stage's columns in table types (and the derived `date`), before any fit to an
    /// existing table's columns.
    pub fn stage_schema(&self) -> &SchemaRef {
        &self.shaped
    }

    /// Writes batches in `table`'s columns (after a schema merge): each table column takes the
    /// stage column of its name, or nulls if the stage has none.
    pub fn fit_to(&mut self, table: SchemaRef) {
        let projection = table
            .fields()
            .iter()
            .map(|f| self.shaped.index_of(f.name()).ok())
            .collect();
        self.projection = Some(projection);
        self.output = table;
    }

    /// A stage batch in table form.
    pub fn apply(&self, batch: &RecordBatch) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.shaped.fields().len());
        for (column, field) in batch.columns().iter().zip(self.shaped.fields()) {
            columns.push(if column.data_type() == field.data_type() {
                column.clone()
            } else {
                cast(column, field.data_type())?
            });
        }
        if let Some(index) = self.date_from {
            let millis = flowgate_sdk::columns::event_time_millis(batch, index)
                .map_err(|e| arrow::error::ArrowError::ComputeError(e.to_string()))?;
            let days: Date32Array = millis
                .iter()
                .map(|m| m.map(|m| m.div_euclid(86_400_000) as i32))
                .collect();
            columns.push(Arc::new(days));
        }
        if let Some(projection) = &self.projection {
            let rows = batch.num_rows();
            columns = projection
                .iter()
                .zip(self.output.fields())
                .map(|(from, field)| match from {
                    Some(i) => columns[*i].clone(),
                    None => arrow::array::new_null_array(field.data_type(), rows),
                })
                .collect();
        }
        RecordBatch::try_new(self.output.clone(), columns)
    }
}

/// Writer properties for a table's Parquet files: `compression`, `created_by` if given, and no
/// dictionary pages for top-level number and time columns (every other column keeps Parquet's
/// default, a dictionary). Numbers and timestamps seldom repeat enough to pay for one: on the
/// flagship's raw tap (prices, volumes, microsecond times) dictionaries on every column cost a
/// third of the sink's time and made the files 25% larger than plain pages compressed
/// (BENCHMARKS.md, "Per core: the threads beside the plugins").
pub(crate) fn parquet_properties(
    schema: &Schema,
    compression: parquet::basic::Compression,
    created_by: Option<String>,
) -> parquet::file::properties::WriterProperties {
    let mut props =
        parquet::file::properties::WriterProperties::builder().set_compression(compression);
    if let Some(created_by) = created_by {
        props = props.set_created_by(created_by);
    }
    for field in schema.fields() {
        let data_type = field.data_type();
        let column = || parquet::schema::types::ColumnPath::from(field.name().as_str());
        if data_type.is_numeric() || data_type.is_temporal() {
            props = props.set_column_dictionary_enabled(column(), false);
        }
        if stored_as_integers(data_type) {
            props =
                props.set_column_encoding(column(), parquet::basic::Encoding::DELTA_BINARY_PACKED);
        }
    }
    props.build()
}

/// Whether Parquet stores `data_type` as 32- or 64-bit integers, which `DELTA_BINARY_PACKED`
/// encodes: differences from one value to the next, bit-packed. Times that grow row by row and
/// small counts take a byte or two a value instead of eight, so the codec after it has far fewer
/// bytes to compress (BENCHMARKS.md, "The threads beside the plugins, again").
fn stored_as_integers(data_type: &DataType) -> bool {
    // Every temporal type but intervals (fixed-length bytes) is an integer in Parquet.
    data_type.is_integer()
        || (data_type.is_temporal() && !matches!(data_type, DataType::Interval(_)))
}

/// Whether any partition's position in `positions` differs from `last` (a commit would record
/// news).
pub(crate) fn positions_moved(positions: &Positions, last: &Positions) -> bool {
    positions.iter().any(|(k, v)| last.get(k) != Some(v))
}

/// What a durable sink's fencing check found before a commit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fence {
    /// Nothing stands in the way.
    Clear,
    /// The table already records exactly these positions: an earlier attempt landed and only
    /// its reply was lost. Not to be committed twice.
    Landed,
    /// A partition is recorded past what this process holds: the group moved it to another
    /// process (this one lost it to a rebalance), and committing would write rows twice. Why.
    Overtaken(String),
}

/// The fencing check the durable sinks share: `recorded` is what the table records now for the
/// partitions of `positions` (`record` names where: the Delta log, a commit log, a table),
/// `held` what this process holds.
pub(crate) fn fence(
    record: &str,
    positions: &Positions,
    recorded: &Positions,
    held: &Positions,
) -> Fence {
    if positions_moved(positions, held) && positions.iter().all(|(k, p)| recorded.get(k) == Some(p))
    {
        return Fence::Landed;
    }
    let describe = |p: Option<&Position>| {
        p.map_or("nothing".to_string(), |p| {
            format!("offset {} (epoch {})", p.offset, p.epoch)
        })
    };
    for key in positions.keys() {
        let (theirs, mine) = (recorded.get(key), held.get(key));
        if theirs > mine {
            return Fence::Overtaken(format!(
                "{record} records partition `{}/{}` at {}, past the {} this process holds: another process owns the partition now; not committing",
                key.0,
                key.1,
                describe(theirs),
                describe(mine),
            ));
        }
    }
    Fence::Clear
}

/// Raises `key`'s position in `positions` to `position` if that is newer.
pub(crate) fn raise(positions: &mut Positions, key: (String, i32), position: Position) {
    let slot = positions.entry(key).or_insert(position);
    *slot = (*slot).max(position);
}

/// The dead-letter table's schema.
pub fn dead_letter_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("pipeline", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("topic", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("payload", DataType::Utf8, false),
        Field::new("time", ts, false),
    ]))
}

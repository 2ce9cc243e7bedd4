//! The pipeline file: its YAML model, `${VAR}` interpolation, and the checks that run before
//! anything starts. Every error names the file and, where it can, the line, column and key.
//!
//! Closed sets of kinds are externally tagged (`source: {kafka: {…}}`, a sink's `delta: {…}`),
//! so the parser streams them and keeps line numbers and key paths in its errors.

mod interpolate;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::decode::SchemaSpec;

/// The URL schemes a table's or the checkpoint store's `path` may have (see `storage`).
pub const SCHEMES: &[&str] = &["s3"];
use flowgate_sdk::config::{Duration, OrderedMap};

pub use interpolate::{env_lookup, interpolate};

/// A pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Names the pipeline in Delta transaction ids, dead letters and logs.
    pub name: String,
    /// Where records come from.
    pub source: SourceSpec,
    /// Record format; only `json` for now.
    #[serde(default)]
    pub format: Format,
    /// Field name → type, in order (see [`crate::decode`]).
    pub schema: SchemaSpec,
    /// The event-time column: drives watermarks and the derived `date` column.
    pub event_time: Option<String>,
    /// Watermark settings.
    #[serde(default)]
    pub watermark: WatermarkSpec,
    /// Batch bounds.
    #[serde(default)]
    pub batch: BatchSpec,
    /// What happens to open windows when the input ends (see [`End`]); default `flush` for a
    /// file source, `keep` otherwise.
    pub end: Option<End>,
    /// Repartition through Kafka before the steps: every record of a key meets in one task,
    /// whatever the producer's partitioning (see [`RepartitionSpec`]).
    pub repartition: Option<RepartitionSpec>,
    /// Transform steps, in order.
    #[serde(default)]
    pub transforms: Vec<TransformSpec>,
    /// Sink name → sink.
    pub sinks: OrderedMap<SinkSpec>,
    /// Where rejected records go (a Delta table unless it says otherwise).
    pub dead_letter: Option<SinkSpec>,
    /// Checkpoint settings.
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    /// Worker threads that run the partition tasks (default: the machine's cores).
    #[serde(default)]
    pub workers: Option<usize>,
    /// The Prometheus endpoint, if any.
    pub metrics: Option<MetricsSpec>,
}

/// The repartition hop: records are decoded, judged late against their own source
/// partition's watermark, and written keyed by `by` to an internal topic, whose partitions the
/// steps run on (Kafka Streams' repartition topic: Kafka is the shuffle).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepartitionSpec {
    /// The columns whose rows must meet in one task (`[symbol]`).
    pub by: Vec<String>,
    /// The internal topic's partitions (default: the source topic's count).
    pub partitions: Option<i32>,
    /// The internal topic (default `{name}-repartition`).
    pub topic: Option<String>,
    /// How long the internal topic keeps records (default 7d): a keyed side stopped for longer
    /// than this loses what it had not read.
    #[serde(default = "seven_days")]
    pub retention: Duration,
}

fn seven_days() -> Duration {
    Duration::from_millis(7 * 24 * 3600 * 1000)
}

impl RepartitionSpec {
    /// The internal topic of pipeline `name`.
    pub fn topic_of(&self, name: &str) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("{name}-repartition"))
    }
}

/// Where live metrics are served.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSpec {
    /// `host:port` to serve `/metrics`, `/healthz` and `/readyz` on (`127.0.0.1:9464`); empty:
    /// no endpoint (so `listen: "${METRICS_LISTEN:-}"` turns it on from the environment).
    pub listen: String,
}

/// What a pipeline does with its open windows when its input ends: a file source read to its
/// end, or a run ended by `--max-records` or `--until-idle` (never by Ctrl+C on a live source).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// Advance every partition's watermark to the end of time: every open window closes and is
    /// written. The input is over: a record that comes later to the same partition is late.
    Flush,
    /// Keep open windows in the checkpoint, for the next run to continue.
    Keep,
}

impl PipelineSpec {
    /// The `end` in force: as written, else `flush` for a file source and `keep` for the rest.
    pub fn end(&self) -> End {
        self.end.unwrap_or(if self.source.file.is_some() {
            End::Flush
        } else {
            End::Keep
        })
    }
}

/// Record formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object per record.
    #[default]
    Json,
}

/// Sources: exactly one of `kafka`, `file`, `generator`. (A struct of options rather than an
/// enum: the YAML parser would want `!kafka` tags for an enum, and this keeps line numbers.)
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// A Kafka topic (or topics), consumed as a consumer group.
    pub kafka: Option<KafkaSpec>,
    /// A JSON-lines file, for replay and backfill (one partition; offset = line number − 1).
    pub file: Option<FileSpec>,
    /// Synthetic ticks into the embedded broker, for the demo.
    pub generator: Option<GeneratorSpec>,
}

/// The source kind a [`SourceSpec`] names.
#[derive(Debug, Clone, Copy)]
pub enum SourceKind<'a> {
    /// Kafka, with the generator feeding it when the broker is `embedded`.
    Kafka(&'a KafkaSpec, Option<&'a GeneratorSpec>),
    /// A file.
    File(&'a FileSpec),
    /// The generator.
    Generator(&'a GeneratorSpec),
}

impl SourceSpec {
    /// The one kind given (checked when the pipeline loads).
    pub fn kind(&self) -> Option<SourceKind<'_>> {
        match (&self.kafka, &self.file, &self.generator) {
            (Some(k), None, None) => Some(SourceKind::Kafka(k, None)),
            (Some(k), None, Some(g)) if k.brokers.is_embedded() => {
                Some(SourceKind::Kafka(k, Some(g)))
            }
            (None, Some(f), None) => Some(SourceKind::File(f)),
            (None, None, Some(g)) => Some(SourceKind::Generator(g)),
            _ => None,
        }
    }
}

/// Kafka source settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSpec {
    /// Bootstrap servers (a list, or `a:9092,b:9092`), or `embedded` for the in-process broker.
    pub brokers: Brokers,
    /// The topic.
    pub topic: Option<String>,
    /// Several topics.
    pub topics: Option<Vec<String>>,
    /// Consumer group id.
    pub group: String,
    /// Where a group with no committed position starts.
    #[serde(default)]
    pub start: StartFrom,
    /// librdkafka settings, e.g. `fetch.min.bytes: "1"`.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// How long a run waits at start for the brokers to answer before it gives up (exit 1).
    #[serde(default = "thirty_seconds")]
    pub connect_timeout: Duration,
    /// Records without a Kafka key on a topic of several partitions stop a pipeline with no
    /// `repartition` (its keyed steps would see a key's records split over partitions);
    /// `allow` says no step keeps state per key.
    #[serde(default)]
    pub keyless: Keyless,
}

/// What a pipeline without `repartition` does with records that have no Kafka key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keyless {
    /// Stop with an error that says to add `repartition`.
    #[default]
    Refuse,
    /// Take them (no step keeps state per key).
    Allow,
}

/// Bootstrap servers.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Brokers {
    /// `embedded`, or a comma-separated list.
    One(String),
    /// A list of `host:port`.
    Many(Vec<String>),
}

impl Brokers {
    /// The in-process mock broker?
    pub fn is_embedded(&self) -> bool {
        matches!(self, Brokers::One(s) if s == "embedded")
    }

    /// As librdkafka's `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        match self {
            Brokers::One(s) => s.clone(),
            Brokers::Many(v) => v.join(","),
        }
    }
}

/// Start position for a group without committed offsets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// The oldest retained record.
    #[default]
    Earliest,
    /// Only records produced from now on.
    Latest,
}

/// File source settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// The JSON-lines file (relative to the pipeline file).
    pub path: PathBuf,
}

/// Generator source settings: random-walk ticks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorSpec {
    /// Symbols to tick.
    #[serde(default = "default_symbols")]
    pub symbols: Vec<String>,
    /// Ticks per second (all symbols together).
    #[serde(default = "default_rate")]
    pub rate: f64,
    /// Topic in the embedded broker (when the source has no `kafka` block).
    #[serde(default = "default_topic")]
    pub topic: String,
    /// How much faster than the wall clock event time runs (60: a minute of ticks per second).
    #[serde(default = "one")]
    pub speedup: f64,
    /// Stop after this many ticks (absent: never); the pipeline then idles, waiting for more.
    #[serde(default)]
    pub count: Option<u64>,
    /// Bad ticks mixed in, as real feeds have them (none unless given).
    #[serde(default)]
    pub faults: Faults,
}

/// The bad ticks a generator mixes in, each a share of all ticks (0–1). They exercise every
/// refusal: dedup drops the duplicates, decode dead-letters the malformed, validate the negative
/// prices, and the watermark the late ones.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Ticks sent twice (the same record: `dedup` drops the copy).
    #[serde(default)]
    pub duplicates: f64,
    /// Ticks cut in half: JSON that does not parse.
    #[serde(default)]
    pub malformed: f64,
    /// Ticks with a price below zero.
    #[serde(default)]
    pub negative_price: f64,
    /// Ticks stamped 2–10 minutes (of event time) behind the others: behind the watermark.
    #[serde(default)]
    pub late: f64,
}

impl Faults {
    /// Each share with its key, for checks and messages.
    pub fn shares(&self) -> [(&'static str, f64); 4] {
        [
            ("duplicates", self.duplicates),
            ("malformed", self.malformed),
            ("negative_price", self.negative_price),
            ("late", self.late),
        ]
    }
}

fn one() -> f64 {
    1.0
}

fn default_symbols() -> Vec<String> {
    [
        "AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "AMD",
    ]
    .map(String::from)
    .to_vec()
}

fn default_rate() -> f64 {
    2000.0
}

fn default_topic() -> String {
    "ticks".into()
}

/// Watermark settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatermarkSpec {
    /// How late a record may be: watermark = max event time seen − delay.
    #[serde(default = "zero")]
    pub delay: Duration,
    /// A partition with no records for this long stops holding the pipeline watermark back.
    #[serde(default = "thirty_seconds")]
    pub idle_timeout: Duration,
    /// A record whose event time is further than this ahead of the wall clock goes to the dead
    /// letter at decode: it would move the watermark past every window still open.
    #[serde(default = "one_day")]
    pub max_future: Duration,
}

impl Default for WatermarkSpec {
    fn default() -> Self {
        WatermarkSpec {
            delay: zero(),
            idle_timeout: thirty_seconds(),
            max_future: one_day(),
        }
    }
}

fn one_day() -> Duration {
    Duration::from_millis(86_400_000)
}

fn zero() -> Duration {
    Duration::from_millis(0)
}

fn thirty_seconds() -> Duration {
    Duration::from_millis(30_000)
}

/// Batch bounds: a batch closes at `max_records`, after `max_wait`, or once nothing more of the
/// input is ready and its newest record has waited `linger`, whichever comes first. With the
/// default `linger: 0ms` the batch size follows the load: a slow input is processed record run
/// by record run as it arrives, and under load records pile up while the previous batch is
/// processed, so batches grow towards `max_records` on their own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSpec {
    /// Most records per batch.
    #[serde(default = "default_max_records")]
    pub max_records: usize,
    /// Longest a record waits for its batch to fill while more input keeps coming.
    #[serde(default = "default_max_wait")]
    pub max_wait: Duration,
    /// How long a batch still waits for more records once the input has nothing more ready
    /// (0: processed at once). `linger` ≥ `max_wait` gives fixed batches: full, or `max_wait`.
    #[serde(default = "zero")]
    pub linger: Duration,
    /// A record larger than this (bytes) goes to the dead letter undecoded (Kafka's default
    /// largest message, 1 MiB).
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
}

impl Default for BatchSpec {
    fn default() -> Self {
        BatchSpec {
            max_records: default_max_records(),
            max_wait: default_max_wait(),
            linger: zero(),
            max_record_bytes: default_max_record_bytes(),
        }
    }
}

fn default_max_record_bytes() -> usize {
    1 << 20
}

fn default_max_records() -> usize {
    16_384
}

fn default_max_wait() -> Duration {
    Duration::from_millis(500)
}

/// What a step does with a batch its plugin fails on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop the pipeline (nothing is committed past the failing batch).
    Fail,
    /// Drop the batch, count it, and go on.
    Skip,
    /// Send the batch's rows to the dead letter with the error, and go on.
    #[default]
    DeadLetter,
}

/// One transform step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformSpec {
    /// Step name (unique): names the step in logs, dead letters and `from:`.
    pub name: String,
    /// The `.wasm` file, relative to the pipeline file.
    pub plugin: PathBuf,
    /// Handed to the plugin as JSON.
    #[serde(default)]
    pub config: serde_json::Value,
    /// What to do when the plugin fails on a batch.
    #[serde(default)]
    pub on_error: OnError,
    /// Capabilities beyond the default sandbox (`clock`).
    #[serde(default)]
    pub grants: Vec<String>,
    /// What happens to the step's stored state when its plugin cannot restore it (a new state
    /// version, at a live swap or a restart): `keep` (the default) refuses, `reset` starts the
    /// step empty.
    #[serde(default)]
    pub state: StateMode,
}

/// A step's `state:` policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateMode {
    /// Carry the state over; refuse to go on if the plugin cannot restore it.
    #[default]
    Keep,
    /// Carry the state over if the plugin restores it, else start the step empty.
    Reset,
}

/// A sink: exactly one of `delta`, `parquet`, `csv`, `postgres`, `console`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSpec {
    /// The step whose output this sink reads (default: the last step, or the decoded records).
    pub from: Option<String>,
    /// A Delta Lake table.
    pub delta: Option<TableSpec>,
    /// Parquet files with a commit log.
    pub parquet: Option<TableSpec>,
    /// A readable table on stdout, for debugging.
    pub console: Option<ConsoleSpec>,
    /// A PostgreSQL table; each epoch's rows and offsets in one transaction.
    pub postgres: Option<PostgresSpec>,
    /// CSV files with a commit log (the Parquet sink's layout).
    pub csv: Option<CsvSpec>,
}

impl SinkSpec {
    /// The kind of table, for the status page and messages.
    pub fn format_name(&self) -> &'static str {
        match (&self.delta, &self.parquet, &self.csv, &self.postgres) {
            (Some(_), ..) => "Delta",
            (_, Some(_), ..) => "Parquet",
            (_, _, Some(_), _) => "CSV",
            (_, _, _, Some(_)) => "PostgreSQL",
            _ => "console",
        }
    }
}

/// Where and how CSV files are written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvSpec {
    /// The table folder (relative to the pipeline file) or `s3://bucket/prefix`.
    pub path: PathBuf,
    /// Partition columns (`col=value/` folders); `date` is derived as for Parquet.
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// The timestamp column `date` is derived from.
    pub date_from: Option<String>,
    /// A header line naming the columns in each file.
    #[serde(default = "default_true")]
    pub header: bool,
    /// The field delimiter: one ASCII character.
    #[serde(default = "default_delimiter")]
    pub delimiter: String,
    /// Settings of the object store a `s3://` path names, as for Parquet and Delta.
    #[serde(default)]
    pub storage_options: BTreeMap<String, String>,
}

fn default_true() -> bool {
    true
}

fn default_delimiter() -> String {
    ",".into()
}

/// Where and how rows go into PostgreSQL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSpec {
    /// Connection URL (`postgres://user:password@host:5432/db`); keep secrets in the environment
    /// with `${DATABASE_URL}`.
    pub url: String,
    /// The table (`name` or `schema.name`); created from the stage's schema when missing.
    pub table: String,
    /// `append` (every row inserted) or `upsert` (a row replaces the one with the same `key`).
    #[serde(default)]
    pub mode: PostgresMode,
    /// The columns that identify a row, for `upsert` (the table's primary key when created).
    #[serde(default)]
    pub key: Vec<String>,
}

/// How rows are written into a PostgreSQL table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostgresMode {
    /// Every row is inserted.
    #[default]
    Append,
    /// A row replaces the one with the same key.
    Upsert,
}

/// Where and how a table is written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// The table folder (relative to the pipeline file) or `s3://bucket/prefix`.
    pub path: PathBuf,
    /// Partition columns; `date` is derived from event time when the stage has no such column.
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// The timestamp column `date` is derived from (default: the pipeline's `event_time` if the
    /// stage has it, else its first timestamp column).
    pub date_from: Option<String>,
    /// Data files are cut at about this size.
    #[serde(default = "default_file_size")]
    pub target_file_size: u64,
    /// Settings of the object store a `s3://` path names (`aws_endpoint`, `aws_region`,
    /// `aws_allow_http`, …; `${VAR}` keeps secrets in the environment). The `AWS_*`
    /// environment variables apply first.
    #[serde(default)]
    pub storage_options: BTreeMap<String, String>,
    /// Delta only: what happens when the stage's output has columns the table lacks.
    #[serde(default)]
    pub schema_mode: SchemaMode,
    /// Delta only: compaction, log checkpoints and vacuum, run beside the pipeline.
    pub maintenance: Option<MaintenanceSpec>,
}

/// How a Delta sink meets a table whose columns differ from the stage's output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaMode {
    /// The table must have exactly the stage's columns and types (the run refuses otherwise).
    #[default]
    Strict,
    /// Columns the stage adds are added to the table (nullable); columns the table has and the
    /// stage lacks are written as nulls. A column whose type changed is still refused.
    Merge,
}

/// Upkeep of a Delta table, run as a background task beside the pipeline: it never holds up a
/// commit, and its own commits never change data (the pipeline's exactly-once holds across them).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceSpec {
    /// Compact small files at most this often (`0s`: never).
    #[serde(default = "default_optimize_every")]
    pub optimize_every: Duration,
    /// Size compaction packs files up to, in bytes (default: the sink's `target_file_size`).
    pub target_file_size: Option<u64>,
    /// After a compaction, delete files that left the table longer ago than this (at least
    /// `1h`: a younger file may be one a running writer staged). Absent: never delete.
    pub vacuum_retention: Option<Duration>,
    /// Write a log checkpoint every this many commits (`0`: never).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
}

impl Default for MaintenanceSpec {
    fn default() -> Self {
        MaintenanceSpec {
            optimize_every: default_optimize_every(),
            target_file_size: None,
            vacuum_retention: None,
            checkpoint_every: default_checkpoint_every(),
        }
    }
}

fn default_optimize_every() -> Duration {
    Duration::from_millis(10 * 60_000)
}

fn default_checkpoint_every() -> u64 {
    100
}

/// The shortest `vacuum_retention` a pipeline may set.
pub const MIN_VACUUM_RETENTION_MS: i64 = 3_600_000;

fn default_file_size() -> u64 {
    128 << 20
}

/// Console sink settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSpec {
    /// Most rows printed per commit.
    #[serde(default = "default_console_rows")]
    pub max_rows: usize,
}

fn default_console_rows() -> usize {
    20
}

/// Checkpoint settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Where plugin state snapshots are kept (relative to the pipeline file).
    #[serde(default = "default_checkpoint_path")]
    pub path: PathBuf,
    /// How often sinks commit (with offsets and state).
    #[serde(default = "default_commit_interval")]
    pub interval: Duration,
    /// Settings of the object store an `s3://` path names (as a Delta sink's).
    #[serde(default)]
    pub storage_options: BTreeMap<String, String>,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec {
            path: default_checkpoint_path(),
            interval: default_commit_interval(),
            storage_options: BTreeMap::new(),
        }
    }
}

fn default_checkpoint_path() -> PathBuf {
    PathBuf::from("data/_checkpoints")
}

fn default_commit_interval() -> Duration {
    Duration::from_millis(5_000)
}

/// A pipeline file that could not be used, with every problem found.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    /// One line per problem, each naming the file (and line, key) it is about.
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: String) -> Self {
        ConfigError {
            problems: vec![problem],
        }
    }
}

/// A parsed and checked pipeline, with paths resolved against the pipeline file's folder.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The file it came from.
    pub file: PathBuf,
    /// Its text after interpolation (for locating keys in later errors).
    pub text: String,
    /// The model.
    pub spec: PipelineSpec,
}

impl Pipeline {
    /// Reads, interpolates (`${VAR}`, with `overrides` first), parses and checks a pipeline file.
    pub fn load(file: &Path, overrides: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let label = file.display().to_string();
        let raw = std::fs::read_to_string(file).map_err(|e| {
            ConfigError::one(format!("{label}: cannot read the pipeline file: {e}"))
        })?;
        Self::parse(&raw, file, overrides)
    }

    /// [`Pipeline::load`] of text already read from `file`.
    pub fn parse(
        raw: &str,
        file: &Path,
        overrides: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let label = file.display().to_string();
        let lookup = env_lookup(overrides);
        let text =
            interpolate(raw, &lookup).map_err(|e| ConfigError::one(format!("{label}: {e}")))?;
        let spec: PipelineSpec =
            crate::yaml::from_str(&text, &label).map_err(|e| ConfigError::one(e.to_string()))?;
        let pipeline = Pipeline {
            file: file.to_path_buf(),
            text,
            spec,
        };
        pipeline.check()?;
        Ok(pipeline)
    }

    /// `path` resolved against the pipeline file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            return path.to_path_buf();
        }
        self.file.parent().unwrap_or(Path::new(".")).join(path)
    }

    /// `file:line:column` of the key (or sequence item) at `path` (`transforms[2].config.size`),
    /// or of the deepest part of it the file has.
    pub fn locate_key(&self, path: &str) -> String {
        match crate::yaml::locate(&self.text, &crate::yaml::parse_path(path)) {
            Some(at) => format!("{}:{}:{}", self.file.display(), at.line, at.column),
            None => self.file.display().to_string(),
        }
    }

    /// `file:line` of the first line containing `needle`, for errors about a value.
    pub fn locate(&self, needle: &str) -> String {
        let line = self
            .text
            .lines()
            .position(|l| l.contains(needle))
            .map(|n| format!(":{}", n + 1))
            .unwrap_or_default();
        format!("{}{line}", self.file.display())
    }

    /// Checks that need more than the parser: names, references, files. Collects every problem.
    fn check(&self) -> Result<(), ConfigError> {
        let s = &self.spec;
        let problems = std::cell::RefCell::new(Vec::new());
        // At the first line holding `needle`, or at the key `path`.
        let problem = |needle: &str, text: String| {
            problems
                .borrow_mut()
                .push(format!("{}: {text}", self.locate(needle)))
        };
        let problem_at = |path: &str, text: String| {
            problems
                .borrow_mut()
                .push(format!("{}: {text}", self.locate_key(path)))
        };
        if s.source.kind().is_none() {
            problem(
                "source:",
                "`source`: give exactly one of `kafka`, `file`, `generator`".into(),
            );
        }
        if let Some(SourceKind::Kafka(k, _)) = s.source.kind() {
            match (&k.topic, &k.topics) {
                (None, None) => {
                    problem("kafka:", "`source.kafka`: give `topic` or `topics`".into())
                }
                (Some(_), Some(_)) => problem(
                    "topics:",
                    "`source.kafka`: give `topic` or `topics`, not both".into(),
                ),
                (None, Some(t)) if t.is_empty() => {
                    problem("topics:", "`source.kafka.topics` is empty".into())
                }
                _ => {}
            }
        }
        if s.schema.is_empty() {
            problem("schema:", "`schema` declares no fields".into());
        }
        if let Some(r) = &s.repartition {
            if s.sinks.iter().any(|(n, _)| n == "repartition") {
                problem_at(
                    "sinks.repartition",
                    "`sinks.repartition`: the name is the repartition hop's own (its stage in the dead letter, its metrics): name the sink otherwise".into(),
                );
            }
            if r.by.is_empty() {
                problem_at(
                    "repartition.by",
                    "`repartition.by`: name at least one column".into(),
                );
            }
            for (i, col) in r.by.iter().enumerate() {
                if !s.schema.iter().any(|(n, _)| n == col) {
                    problem_at(
                        &format!("repartition.by[{i}]"),
                        format!("`repartition.by[{i}]`: `{col}` is not a field of `schema`"),
                    );
                }
            }
            if r.partitions.is_some_and(|p| p < 1) {
                problem_at(
                    "repartition.partitions",
                    "`repartition.partitions` must be at least 1".into(),
                );
            }
            if !matches!(s.source.kind(), Some(SourceKind::Kafka(..))) {
                problem(
                    "repartition:",
                    "`repartition` needs a `kafka` source: the hop goes through the same brokers"
                        .into(),
                );
            }
            if s.end == Some(End::Flush) {
                problem_at(
                    "end",
                    "`end: flush` is not supported with `repartition` yet (the keyed half would have to learn that every source partition ended): use `end: keep`".into(),
                );
            }
            if s.event_time.is_none() {
                problem(
                    "repartition:",
                    "`repartition` needs `event_time`: each source partition's watermark travels through the hop".into(),
                );
            }
        }
        if s.workers == Some(0) {
            problem("workers:", "`workers` must be at least 1".into());
        }
        if let Some(g) = &s.source.generator {
            for (key, share) in g.faults.shares() {
                if !(0.0..=1.0).contains(&share) {
                    problem_at(
                        &format!("source.generator.faults.{key}"),
                        format!(
                            "`source.generator.faults.{key}` is a share between 0 and 1, got {share}"
                        ),
                    );
                }
            }
        }
        if let Some(et) = &s.event_time {
            match s.schema.iter().find(|(n, _)| n == et) {
                None => problem(
                    "event_time:",
                    format!("`event_time`: `{et}` is not a field of `schema`"),
                ),
                Some((_, f))
                    if !matches!(
                        f.field_type(),
                        crate::decode::FieldType::Timestamp | crate::decode::FieldType::Int64
                    ) =>
                {
                    problem(
                        "event_time:",
                        format!(
                            "`event_time`: `{et}` must be a timestamp or int64 (epoch ms) field"
                        ),
                    )
                }
                _ => {}
            }
        }
        if s.batch.max_records == 0 {
            problem(
                "max_records:",
                "`batch.max_records` must be at least 1".into(),
            );
        }
        let mut names: Vec<&str> = Vec::new();
        for (i, t) in s.transforms.iter().enumerate() {
            if names.contains(&t.name.as_str()) {
                problem(
                    &format!("name: {}", t.name),
                    format!("`transforms[{i}].name`: `{}` is used twice", t.name),
                );
            }
            names.push(&t.name);
            let plugin = self.resolve(&t.plugin);
            if !plugin.is_file() {
                let stock = plugin
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| {
                        n.starts_with("flowgate_") && plugin.to_string_lossy().contains("/plugin/")
                    });
                let hint = if stock {
                    "a plugin of the Flowgate repository: run `make plugins` there".to_string()
                } else {
                    "build it in its crate with `cargo build --release --target wasm32-wasip2` (the file lands in `target/wasm32-wasip2/release/`), or fix the path: it is relative to the pipeline file".to_string()
                };
                problem_at(
                    &format!("transforms[{i}].plugin"),
                    format!(
                        "`transforms[{i}].plugin`: `{}` does not exist ({hint})",
                        plugin.display()
                    ),
                );
            }
            for g in &t.grants {
                if g != "clock" {
                    problem(
                        g,
                        format!("`transforms[{i}].grants`: unknown grant `{g}` (known: clock)"),
                    );
                }
            }
        }
        if s.sinks.is_empty() {
            problem("sinks:", "`sinks`: give at least one sink".into());
        }
        let sinks = s
            .sinks
            .iter()
            .map(|(n, spec)| (format!("sinks.{n}"), spec))
            .chain(s.dead_letter.iter().map(|d| ("dead_letter".to_string(), d)));
        for (key, sink) in sinks {
            let kinds = [
                sink.delta.is_some(),
                sink.parquet.is_some(),
                sink.console.is_some(),
                sink.postgres.is_some(),
                sink.csv.is_some(),
            ]
            .iter()
            .filter(|k| **k)
            .count();
            if kinds != 1 {
                problem(
                    &format!("{}:", key.rsplit('.').next().unwrap_or(&key)),
                    format!(
                        "`{key}`: give exactly one of `delta`, `parquet`, `csv`, `postgres`, `console`"
                    ),
                );
            }
            if let Some(t) = &sink.parquet {
                if t.maintenance.is_some() {
                    problem(
                        "maintenance:",
                        format!("`{key}.parquet.maintenance` applies to Delta sinks only"),
                    );
                }
                if t.schema_mode != SchemaMode::Strict {
                    problem(
                        "schema_mode:",
                        format!(
                            "`{key}.parquet.schema_mode`: Parquet tables keep one shape (only Delta sinks merge schemas)"
                        ),
                    );
                }
            }
            if let Some(m) = sink.delta.as_ref().and_then(|t| t.maintenance.as_ref()) {
                if m.optimize_every.as_millis() < 0 {
                    problem(
                        "optimize_every:",
                        format!("`{key}.delta.maintenance.optimize_every` is negative"),
                    );
                }
                if m.target_file_size == Some(0) {
                    problem(
                        "target_file_size:",
                        format!("`{key}.delta.maintenance.target_file_size` must be above 0"),
                    );
                }
                if let Some(r) = m.vacuum_retention
                    && r.as_millis() < MIN_VACUUM_RETENTION_MS
                {
                    problem(
                        "vacuum_retention:",
                        format!(
                            "`{key}.delta.maintenance.vacuum_retention`: `{r}` is under 1h; a running writer's staged files could be deleted before its commit (use `flowgate table vacuum --force` with no pipeline running instead)"
                        ),
                    );
                }
            }
            let tables = sink
                .delta
                .iter()
                .chain(&sink.parquet)
                .map(|t| &t.path)
                .chain(sink.csv.iter().map(|c| &c.path));
            for path in tables {
                if let Some(why) = unsupported_location(path, SCHEMES) {
                    problem(&path.display().to_string(), format!("`{key}.path`: {why}"));
                }
            }
            if let Some(csv) = &sink.csv
                && !(csv.delimiter.len() == 1 && csv.delimiter.is_ascii())
            {
                problem(
                    "delimiter:",
                    format!(
                        "`{key}.csv.delimiter`: `{}` is not one ASCII character",
                        csv.delimiter
                    ),
                );
            }
            if let Some(pg) = &sink.postgres {
                match pg.mode {
                    PostgresMode::Upsert if pg.key.is_empty() => problem(
                        "mode: upsert",
                        format!(
                            "`{key}.postgres`: `mode: upsert` needs `key` (the columns that identify a row)"
                        ),
                    ),
                    PostgresMode::Append if !pg.key.is_empty() => problem(
                        "key:",
                        format!("`{key}.postgres.key` is used only with `mode: upsert`"),
                    ),
                    _ => {}
                }
            }
            if let Some(from) = &sink.from
                && !names.contains(&from.as_str())
                && from != "source"
            {
                let known: Vec<&str> = std::iter::once("source")
                    .chain(names.iter().copied())
                    .collect();
                problem(
                    &format!("from: {from}"),
                    format!(
                        "`{key}.from`: no step named `{from}` (known: {})",
                        known.join(", ")
                    ),
                );
            }
        }
        if let Some(m) = &s.metrics
            && !m.listen.is_empty()
            && m.listen.parse::<std::net::SocketAddr>().is_err()
        {
            problem(
                "listen:",
                format!(
                    "`metrics.listen`: `{}` is not an address to listen on (`127.0.0.1:9464`, `0.0.0.0:9464`)",
                    m.listen
                ),
            );
        }
        if let Some(why) = unsupported_location(&s.checkpoint.path, SCHEMES) {
            problem(
                &s.checkpoint.path.display().to_string(),
                format!("`checkpoint.path`: {why}"),
            );
        }
        let problems = problems.into_inner();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// Why a table or checkpoint location cannot be used: a URL scheme other than those in
/// `schemes` names a store that is not supported, and must not quietly become a local folder
/// named `s3:`.
fn unsupported_location(path: &Path, schemes: &[&str]) -> Option<String> {
    let text = path.to_string_lossy();
    let (scheme, _) = text.split_once("://")?;
    let is_scheme = !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !is_scheme || schemes.contains(&scheme) {
        return None;
    }
    let supported: Vec<String> = schemes.iter().map(|s| format!("`{s}://`")).collect();
    Some(if supported.is_empty() {
        format!(
            "`{text}`: `{scheme}://` is not supported here; give a local folder (a path, relative to the pipeline file or absolute)"
        )
    } else {
        format!(
            "`{text}`: `{scheme}://` is not supported; give a local folder or {}",
            supported.join(", ")
        )
    })
}

impl crate::decode::FieldSpec {
    /// The declared type.
    pub fn field_type(&self) -> crate::decode::FieldType {
        match self {
            crate::decode::FieldSpec::Short(t) => *t,
            crate::decode::FieldSpec::Long { field_type, .. } => *field_type,
        }
    }
}

//! What a run is made of before any record flows: the plan (every plugin loaded and every step
//! created once, so schemas are checked stage by stage), the sinks opened on their stage schemas,
//! and the run's options, summary and errors.

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;

use crate::checkpoint::CheckpointError;
use crate::config::{OnError, Pipeline, SinkSpec, StateMode};
use crate::decode;
use crate::metrics::{Histogram, StageTime};
use crate::plugin::{Chain, ErrorKind, Grants, Plugin, PluginError, PluginHost};
use crate::sink::{
    ConsoleSink, DeltaSink, FileFormat, FileTableSink, Fit, Sink, SinkError, TableShape,
};
use crate::source::SourceError;

/// Why a run stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A plugin could not be loaded or created, or failed in a way its `on_error` does not cover.
    #[error("{location}: {source}")]
    Plugin {
        /// `file:line` of the step in the pipeline file.
        location: String,
        /// The plugin error.
        source: Box<PluginError>,
    },
    /// A sink failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The checkpoint store failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The pipeline does not fit together (checked before any record flows).
    #[error("{0}")]
    Config(String),
    /// A partition's sinks hold offsets whose plugin state is not in the checkpoint store.
    #[error(
        "partition `{topic}/{partition}`: the sinks hold it up to offset {offset} (checkpoint epoch {epoch}), but the checkpoint store has no plugin state for that epoch; restore the checkpoint folder, or run with `--reset-state` to start this partition's steps empty"
    )]
    StateMissing {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// The offset the sinks hold.
        offset: i64,
        /// The checkpoint epoch they name.
        epoch: u64,
    },
    /// The state stored under the epoch a sink names covers another offset than the sink
    /// holds: another process wrote it (states are named per writer, so only a store written
    /// by hand or by an older Flowgate can hold one).
    #[error(
        "partition `{topic}/{partition}`: the sinks hold it up to offset {offset} (checkpoint epoch {epoch}), but the plugin state stored for that epoch covers offset {stored}: it belongs to another process's run; restore the checkpoint folder, or run with `--reset-state` to start this partition's steps empty"
    )]
    StateMismatch {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// The offset the sinks hold.
        offset: i64,
        /// The checkpoint epoch they name.
        epoch: String,
        /// The offset the stored state covers.
        stored: i64,
    },
    /// A step's plugin refused the state stored for it (`bad-input` from `restore`: a state
    /// version it cannot read), and the step does not say `state: reset`.
    #[error(
        "partition `{partition}`: the plugin refuses the stored state of step `{step}`: {reason}; run a plugin that reads that state version, or add `state: reset` to the step to start it empty"
    )]
    StateRefused {
        /// The step's name.
        step: String,
        /// The plugin's name (its refusal names it too).
        plugin: String,
        /// `topic/partition`.
        partition: String,
        /// The plugin's refusal.
        reason: Box<PluginError>,
    },
    /// The consumer group gave this process's partitions to another member while it was away
    /// (it missed its session timeout): what it had not committed is left to the new owner.
    #[error(
        "the consumer group moved partitions {0} to another member while this process was unresponsive (longer than `session.timeout.ms`); stopping without committing them: restart to rejoin the group"
    )]
    PartitionsLost(String),
    /// A sink holds a partition further than this process does: another process wrote it
    /// since (the consumer group moved the partition), or the topic's offsets went back.
    #[error(
        "sink `{sink}`: the table holds partition `{partition}` up to offset {held} (checkpoint epoch {held_epoch}{recorded}), past this process's offset {offset} (epoch {epoch}); committing would write rows twice, so this process stops without committing. Either another process of the consumer group owns the partition now (it moved while this one was busy; a restart rejoins the group), or the topic's offsets went back (it was deleted and created again, or this is another cluster): then give the sinks new table paths, or remove the tables and the checkpoint folder to start over"
    )]
    Overtaken {
        /// The sink's name.
        sink: String,
        /// `topic/partition`.
        partition: String,
        /// The offset the table holds.
        held: i64,
        /// Its checkpoint epoch.
        held_epoch: u64,
        /// `, recorded by …` (which commit, when, which pipeline), when the sink knows.
        recorded: String,
        /// This process's offset.
        offset: i64,
        /// This process's checkpoint epoch.
        epoch: u64,
    },
    /// A thread of the engine stopped unexpectedly.
    #[error("internal: {0}")]
    Internal(String),
    /// A thread this one hands work to (`the committer`, `worker 1`) is gone. That thread
    /// reports why it stopped; this error stands only when no such report comes.
    #[error("internal: {0} stopped")]
    Stopped(String),
}

impl RunError {
    /// Who must act.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RunError::Plugin { source, .. } => source.kind(),
            RunError::Config(_)
            | RunError::StateMissing { .. }
            | RunError::StateMismatch { .. }
            | RunError::StateRefused { .. }
            | RunError::Source(SourceError::Misfit(_))
            | RunError::Sink(SinkError::Config { .. } | SinkError::SchemaMismatch { .. }) => {
                ErrorKind::Config
            }
            RunError::Sink(_)
            | RunError::Source(_)
            | RunError::Checkpoint(_)
            | RunError::PartitionsLost(_)
            | RunError::Overtaken { .. } => ErrorKind::External,
            RunError::Internal(_) | RunError::Stopped(_) => ErrorKind::Internal,
        }
    }
}

/// When to stop besides Ctrl+C / SIGTERM.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop after this many input records.
    pub max_records: Option<u64>,
    /// Stop once no record arrived for this long.
    pub until_idle: Option<Duration>,
    /// Start partitions whose stored plugin state is missing with empty state instead of
    /// refusing to run.
    pub reset_state: bool,
    /// Swap the steps live when the pipeline file or a plugin changes (see `engine::swap`).
    pub reload: Option<Reload>,
}

/// How a run reloads its pipeline file.
#[derive(Debug, Clone, Default)]
pub struct Reload {
    /// The `--set` values the file was loaded with.
    pub vars: std::collections::HashMap<String, String>,
    /// Watch the pipeline file and its plugin files (without: SIGHUP only).
    pub watch_files: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Records read (after skipping those the sinks already held).
    pub records: u64,
    /// Records that did not decode.
    pub undecodable: u64,
    /// Rows refused by plugins.
    pub rejected: u64,
    /// Rows written to sinks (dead letter excluded).
    pub rows_out: u64,
    /// Checkpoints committed.
    pub checkpoints: u64,
    /// Wall time of the run, from start (plugins loaded, sinks opened) to the final commit.
    pub wall: Duration,
    /// When the first record arrived, counted from the start (a group join takes seconds).
    pub first_record: Option<Duration>,
    /// Time per stage, summed over partitions.
    pub stages: Vec<StageTime>,
    /// Kafka append time → the batch holding the record came out of the last plugin.
    pub latency_to_output: Histogram,
    /// Kafka append time → the checkpoint covering the record committed (every sink's table
    /// version and the Kafka offsets).
    pub latency_to_commit: Histogram,
    /// Live swaps, applied or refused, in order.
    pub swaps: Vec<super::SwapRecord>,
    /// What each table committed.
    pub tables: Vec<super::tally::TableTally>,
}

impl RunSummary {
    /// The summary of a repartitioned run: records read by the upstream half, rows written by
    /// the keyed one, refusals and times of both.
    pub(crate) fn merge(up: RunSummary, down: RunSummary) -> RunSummary {
        let label = |half: &str, mut stages: Vec<StageTime>| {
            for s in &mut stages {
                s.stage = format!("{half}: {}", s.stage);
            }
            stages
        };
        let mut stages = label("upstream", up.stages);
        stages.extend(label("keyed", down.stages));
        RunSummary {
            records: up.records,
            undecodable: up.undecodable + down.undecodable,
            rejected: up.rejected + down.rejected,
            rows_out: down.rows_out,
            checkpoints: up.checkpoints + down.checkpoints,
            wall: up.wall.max(down.wall),
            first_record: up.first_record,
            stages,
            latency_to_output: down.latency_to_output,
            latency_to_commit: down.latency_to_commit,
            swaps: down.swaps,
            tables: {
                let mut tables = up.tables;
                super::tally::merge(&mut tables, down.tables);
                tables
            },
        }
    }
}

/// One step, ready to instantiate per partition.
pub(crate) struct StepPlan {
    name: String,
    plugin: Plugin,
    config: String,
    grants: Grants,
    on_error: OnError,
    state: StateMode,
    location: String,
}

/// The pipeline's steps with their schemas, checked end to end.
pub struct Plan {
    steps: Vec<StepPlan>,
    /// Stage schemas: `[0]` is the decoded records, `[i + 1]` what step `i` emits.
    pub stages: Vec<SchemaRef>,
    /// Step names, in order.
    pub names: Vec<String>,
    /// Per step: true if its plugin runs natively (see `PluginHost::link_native`).
    pub native: Vec<bool>,
}

impl Plan {
    /// Loads every plugin and creates the chain once, so schemas are checked stage by stage.
    pub fn build(pipeline: &Pipeline, host: &PluginHost) -> Result<Self, RunError> {
        let schema = decode::to_schema(&pipeline.spec.schema);
        let mut stages = vec![schema];
        let mut steps = Vec::new();
        let mut native = Vec::new();
        for (i, t) in pipeline.spec.transforms.iter().enumerate() {
            let location = pipeline.locate_key(&format!("transforms[{i}].plugin"));
            let plugin =
                host.load(&pipeline.resolve(&t.plugin))
                    .map_err(|source| RunError::Plugin {
                        location: location.clone(),
                        source: Box::new(source),
                    })?;
            let config = if t.config.is_null() {
                "{}".to_string()
            } else {
                t.config.to_string()
            };
            let grants = Grants {
                clock: t.grants.iter().any(|g| g == "clock"),
            };
            let input = stages
                .last()
                .cloned()
                .unwrap_or_else(|| Arc::new(arrow::datatypes::Schema::empty()));
            let step = plugin
                .instantiate(&t.name, &config, &input, grants)
                .map_err(|source| RunError::Plugin {
                    location: config_location(pipeline, i, &source)
                        .unwrap_or_else(|| location.clone()),
                    source: Box::new(source),
                })?;
            stages.push(step.output_schema().clone());
            native.push(step.is_native());
            steps.push(StepPlan {
                name: t.name.clone(),
                plugin,
                config,
                grants,
                on_error: t.on_error,
                state: t.state,
                location,
            });
        }
        let names = steps.iter().map(|s| s.name.clone()).collect();
        Ok(Plan {
            steps,
            stages,
            names,
            native,
        })
    }

    /// A fresh chain of every step, for one partition.
    pub fn chain(&self) -> Result<Chain, RunError> {
        let steps = (0..self.steps.len())
            .map(|i| self.instantiate(i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Chain::new(steps).with_policies(self.policies()))
    }

    /// A fresh instance of step `index`.
    pub fn instantiate(&self, index: usize) -> Result<crate::plugin::Step, RunError> {
        let s = &self.steps[index];
        s.plugin
            .instantiate(&s.name, &s.config, &self.stages[index], s.grants)
            .map_err(|source| RunError::Plugin {
                location: s.location.clone(),
                source: Box::new(source),
            })
    }

    /// Each step's `on_error`, in order.
    pub fn policies(&self) -> Vec<OnError> {
        self.steps.iter().map(|s| s.on_error).collect()
    }

    /// Step `index`'s `state:` policy.
    pub fn state_mode(&self, index: usize) -> StateMode {
        self.steps.get(index).map_or(StateMode::Keep, |s| s.state)
    }

    /// The stage index a sink reads: 0 = decoded records, i + 1 = step i.
    pub fn stage_of(&self, from: Option<&str>) -> usize {
        match from {
            None => self.steps.len(),
            Some("source") => 0,
            Some(name) => self
                .names
                .iter()
                .position(|n| n == name)
                .map_or(self.steps.len(), |i| i + 1),
        }
    }
}

/// Where in step `index`'s `config:` a plugin's config error points: the key its message names
/// (`` `rules.price`: … ``, or ``unknown field `x` ``), else the `config:` key itself.
fn config_location(pipeline: &Pipeline, index: usize, error: &PluginError) -> Option<String> {
    let PluginError::Plugin {
        fault: crate::plugin::PluginFault::InvalidConfig(message),
        ..
    } = error
    else {
        return None;
    };
    let mut path = format!("transforms[{index}].config");
    if let Some(key) = message
        .strip_prefix('`')
        .and_then(|rest| rest.split_once("`:"))
        .map(|(key, _)| key)
    {
        path = format!("{path}.{key}");
    }
    if let Some(field) = message
        .split_once("unknown field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(field, _)| field)
    {
        path = format!("{path}.{field}");
    }
    Some(pipeline.locate_key(&path))
}

/// Where a sink's table is: a folder (relative to the pipeline file) or an `s3://` URL.
pub(super) fn table_location(
    pipeline: &Pipeline,
    name: &str,
    path: &std::path::Path,
    storage_options: &std::collections::BTreeMap<String, String>,
) -> Result<crate::storage::TableLocation, SinkError> {
    let base = pipeline.file.parent().unwrap_or(std::path::Path::new("."));
    let options = storage_options
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    crate::storage::TableLocation::parse(&path.to_string_lossy(), base, options).map_err(
        |message| SinkError::Config {
            sink: name.into(),
            message,
        },
    )
}

pub(super) fn delta_location(
    pipeline: &Pipeline,
    name: &str,
    t: &crate::config::TableSpec,
) -> Result<crate::storage::TableLocation, SinkError> {
    table_location(pipeline, name, &t.path, &t.storage_options)
}

/// Where a Parquet or CSV sink's files go.
pub(super) fn file_place(
    pipeline: &Pipeline,
    name: &str,
    path: &std::path::Path,
    storage_options: &std::collections::BTreeMap<String, String>,
    rt: &Arc<tokio::runtime::Runtime>,
) -> Result<crate::sink::Place, SinkError> {
    let location = table_location(pipeline, name, path, storage_options)?;
    crate::sink::Place::at(&location, rt).map_err(|message| SinkError::Config {
        sink: name.into(),
        message,
    })
}

/// A Delta sink's options from its config (upkeep on by default: checkpoints every 100
/// commits, compaction every 10 minutes).
pub(crate) fn delta_options(t: &crate::config::TableSpec) -> crate::sink::DeltaOptions {
    let m = t.maintenance.clone().unwrap_or_default();
    let millis = |d: flowgate_sdk::config::Duration| {
        std::time::Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(0))
    };
    crate::sink::DeltaOptions {
        partition_by: t.partition_by.clone(),
        target_file_size: t.target_file_size,
        schema_mode: t.schema_mode,
        maintenance: Some(crate::sink::maintenance::Plan {
            optimize_every: (m.optimize_every.as_millis() > 0).then(|| millis(m.optimize_every)),
            target_file_size: m.target_file_size.unwrap_or(t.target_file_size),
            vacuum_retention: m.vacuum_retention.map(millis),
            checkpoint_every: m.checkpoint_every,
        }),
    }
}

/// How a sink's table fits its stage schema, changing nothing (`None`: the sink has no table).
/// What `flowgate validate` reports, so a misfit shows before anything runs.
pub(crate) fn check_sink(
    pipeline: &Pipeline,
    name: &str,
    spec: &SinkSpec,
    schema: &SchemaRef,
    rt: &Arc<tokio::runtime::Runtime>,
) -> Result<Option<Fit>, SinkError> {
    let event_time = pipeline.spec.event_time.as_deref();
    let shape = |partition_by: &[String], date_from: Option<&str>| {
        TableShape::new(name, schema, partition_by, date_from, event_time)
    };
    if let Some(t) = &spec.delta {
        let shape = shape(&t.partition_by, t.date_from.as_deref())?;
        let location = delta_location(pipeline, name, t)?;
        return DeltaSink::check(name, &location, &shape, &delta_options(t), rt).map(Some);
    }
    if let Some(t) = &spec.parquet {
        let shape = shape(&t.partition_by, t.date_from.as_deref())?;
        let place = file_place(pipeline, name, &t.path, &t.storage_options, rt)?;
        return FileTableSink::check_at(name, &place, &shape).map(Some);
    }
    if let Some(c) = &spec.csv {
        let shape = shape(&c.partition_by, c.date_from.as_deref())?;
        let place = file_place(pipeline, name, &c.path, &c.storage_options, rt)?;
        return FileTableSink::check_at(name, &place, &shape).map(Some);
    }
    if let Some(pg) = &spec.postgres {
        let shape = shape(&[], None)?;
        return crate::sink::PostgresSink::check(
            name,
            &pg.url,
            &pg.table,
            pg.mode,
            &pg.key,
            shape,
            rt.clone(),
        )
        .map(Some);
    }
    Ok(None)
}

/// Opens a sink for a stage schema.
pub(crate) fn open_sink(
    pipeline: &Pipeline,
    name: &str,
    spec: &SinkSpec,
    schema: &SchemaRef,
    rt: &Arc<tokio::runtime::Runtime>,
) -> Result<Box<dyn Sink>, SinkError> {
    let event_time = pipeline.spec.event_time.as_deref();
    if let Some(t) = &spec.delta {
        let shape = TableShape::new(
            name,
            schema,
            &t.partition_by,
            t.date_from.as_deref(),
            event_time,
        )?;
        return Ok(Box::new(DeltaSink::open(
            name,
            delta_location(pipeline, name, t)?,
            &pipeline.spec.name,
            shape,
            delta_options(t),
            rt.clone(),
        )?));
    }
    if let Some(c) = &spec.console {
        return Ok(Box::new(ConsoleSink::new(name, c.max_rows)));
    }
    if let Some(pg) = &spec.postgres {
        let shape = TableShape::new(name, schema, &[], None, None)?;
        return Ok(Box::new(crate::sink::PostgresSink::open(
            name,
            &pg.url,
            &pg.table,
            pg.mode,
            &pg.key,
            &pipeline.spec.name,
            shape,
            rt.clone(),
        )?));
    }
    if let Some(c) = &spec.csv {
        let shape = TableShape::new(
            name,
            schema,
            &c.partition_by,
            c.date_from.as_deref(),
            event_time,
        )?;
        return Ok(Box::new(FileTableSink::open_at(
            name,
            &pipeline.spec.name,
            file_place(pipeline, name, &c.path, &c.storage_options, rt)?,
            shape,
            &c.partition_by,
            FileFormat::Csv {
                header: c.header,
                delimiter: c.delimiter.bytes().next().unwrap_or(b','),
            },
        )?));
    }
    match &spec.parquet {
        Some(t) => {
            let shape = TableShape::new(
                name,
                schema,
                &t.partition_by,
                t.date_from.as_deref(),
                event_time,
            )?;
            Ok(Box::new(FileTableSink::open_at(
                name,
                &pipeline.spec.name,
                file_place(pipeline, name, &t.path, &t.storage_options, rt)?,
                shape,
                &t.partition_by,
                FileFormat::Parquet,
            )?))
        }
        None => Err(SinkError::Config {
            sink: name.into(),
            message: "give one of `delta`, `parquet`, `csv`, `postgres`, `console`".into(),
        }),
    }
}

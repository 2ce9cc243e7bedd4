//! The run loop: source → batches per partition → decode → plugin chain → sinks, with
//! watermarks, checkpoints and the dead letter.
//!
//! One thread does it all, in order: poll, process due batches, advance the watermark, commit
//! when the interval is up. WASM calls are CPU work and run here, off any async reactor; the
//! Delta writer's async calls run on a small tokio runtime that the sinks block on.
//!
//! Exactly once: at a checkpoint, every partition's plugin state is stored for its last offset,
//! then each sink commits its rows with those offsets (Delta `txn`), then Kafka gets the offsets.
//! On start a partition resumes after the lowest offset its sinks hold, with the state stored
//! for that offset; a sink that already holds more skips what it has.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Int32Array, Int64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use crate::checkpoint::{CheckpointError, CheckpointStore, PartitionState};
use crate::config::{OnError, Pipeline, SinkSpec, SourceKind};
use crate::decode::{self, JsonDecoder};
use crate::metrics::{Histogram, StageTime};
use crate::plugin::{
    Chain, ChainOutput, ErrorKind, Grants, Plugin, PluginError, PluginHost, StepTimings,
};
use crate::sink::{
    self, ConsoleSink, DeltaSink, Offsets, ParquetSink, Sink, SinkError, TableShape,
};
use crate::source::{
    EmbeddedBroker, FileSource, Generator, KafkaSource, Pace, Record, Source, SourceError,
};

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
}

impl RunError {
    /// Who must act.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RunError::Plugin { source, .. } => source.kind(),
            RunError::Config(_)
            | RunError::Sink(SinkError::Config { .. } | SinkError::SchemaMismatch { .. }) => {
                ErrorKind::Config
            }
            RunError::Sink(_) | RunError::Source(_) | RunError::Checkpoint(_) => {
                ErrorKind::External
            }
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
}

/// One step, ready to instantiate per partition.
struct StepPlan {
    name: String,
    plugin: Plugin,
    config: String,
    grants: Grants,
    on_error: OnError,
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
        for t in &pipeline.spec.transforms {
            let location = pipeline.locate(&t.plugin.display().to_string());
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
                    location: location.clone(),
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

    fn chain(&self) -> Result<Chain, RunError> {
        let mut steps = Vec::new();
        for (i, s) in self.steps.iter().enumerate() {
            let step = s
                .plugin
                .instantiate(&s.name, &s.config, &self.stages[i], s.grants)
                .map_err(|source| RunError::Plugin {
                    location: s.location.clone(),
                    source: Box::new(source),
                })?;
            steps.push(step);
        }
        Ok(Chain::new(steps))
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

struct SinkSlot {
    sink: Box<dyn Sink>,
    stage: usize,
}

/// Per-partition work and state.
struct Unit {
    topic: Arc<str>,
    partition: i32,
    chain: Chain,
    pending: Vec<Record>,
    oldest: Option<Instant>,
    last_seen: Instant,
    /// Next offset to process; lower ones are already in the sinks (or in this run).
    next: i64,
    /// The offset each sink already holds: a sink skips output of input up to there.
    floors: Vec<i64>,
    processed_any: bool,
    sought: bool,
    max_event: Option<i64>,
    dirty: bool,
}

/// Opens a sink for a stage schema.
fn open_sink(
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
            &pipeline.resolve(&t.path),
            &pipeline.spec.name,
            shape,
            &t.partition_by,
            t.target_file_size,
            rt.clone(),
        )?));
    }
    if let Some(c) = &spec.console {
        return Ok(Box::new(ConsoleSink::new(name, c.max_rows)));
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
            Ok(Box::new(ParquetSink::open(
                name,
                &pipeline.resolve(&t.path),
                shape,
                &t.partition_by,
            )?))
        }
        None => Err(SinkError::Config {
            sink: name.into(),
            message: "give one of `delta`, `parquet`, `console`".into(),
        }),
    }
}

/// Runs `pipeline` until `stop` is set or `options` say so; everything read is committed
/// before it returns.
pub fn run(
    pipeline: &Pipeline,
    host: &PluginHost,
    options: &RunOptions,
    stop: &AtomicBool,
) -> Result<RunSummary, RunError> {
    let spec = &pipeline.spec;
    let plan = Plan::build(pipeline, host)?;
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| RunError::Config(format!("cannot start the I/O runtime: {e}")))?,
    );
    let mut sinks = Vec::new();
    for (name, s) in spec.sinks.iter() {
        let stage = plan.stage_of(s.from.as_deref());
        sinks.push(SinkSlot {
            sink: open_sink(pipeline, name, s, &plan.stages[stage], &rt)?,
            stage,
        });
    }
    let dead_letter = match &spec.dead_letter {
        Some(d) => Some(open_sink(
            pipeline,
            "dead_letter",
            d,
            &sink::dead_letter_schema(),
            &rt,
        )?),
        None => None,
    };
    // Declared before the source, so they outlive its consumer.
    let mut _embedded: Option<EmbeddedBroker> = None;
    let mut _generator: Option<Generator> = None;
    // What the generator paces itself by: it starts once partitions are assigned, and stays
    // within the embedded broker's retention of what has been read.
    let pace = Arc::new(Pace::default());
    let mut source: Box<dyn Source> = match spec.source.kind() {
        None => {
            return Err(RunError::Config(
                "`source`: give one of `kafka`, `file`, `generator`".into(),
            ));
        }
        Some(SourceKind::File(f)) => Box::new(FileSource::open(&pipeline.resolve(&f.path))?),
        Some(SourceKind::Kafka(k, generator)) => {
            let bootstrap = if k.brokers.is_embedded() {
                let topics = k
                    .topics
                    .clone()
                    .or_else(|| k.topic.clone().map(|t| vec![t]))
                    .unwrap_or_default();
                let broker =
                    EmbeddedBroker::start(topics.first().map_or("ticks", String::as_str), 3)?;
                let bootstrap = broker.bootstrap();
                match generator {
                    Some(g) => {
                        _generator = Some(Generator::start(
                            g,
                            &bootstrap,
                            topics.first().map_or("ticks", String::as_str),
                            pace.clone(),
                        )?)
                    }
                    None => tracing::warn!(
                        "the embedded broker has no generator feeding it: add a `generator:` block to `source`"
                    ),
                }
                _embedded = Some(broker);
                bootstrap
            } else {
                k.brokers.bootstrap()
            };
            let source = KafkaSource::open(k, &bootstrap)?;
            Box::new(if k.brokers.is_embedded() {
                source.ephemeral()
            } else {
                source
            })
        }
        Some(SourceKind::Generator(g)) => {
            let broker = EmbeddedBroker::start(&g.topic, 3)?;
            let bootstrap = broker.bootstrap();
            _generator = Some(Generator::start(g, &bootstrap, &g.topic, pace.clone())?);
            _embedded = Some(broker);
            let kafka = crate::config::KafkaSpec {
                brokers: crate::config::Brokers::One(bootstrap.clone()),
                topic: Some(g.topic.clone()),
                topics: None,
                group: format!("flowgate-{}", spec.name),
                start: crate::config::StartFrom::Earliest,
                options: Default::default(),
            };
            Box::new(KafkaSource::open(&kafka, &bootstrap)?.ephemeral())
        }
    };
    let store = CheckpointStore::new(&pipeline.resolve(&spec.checkpoint.path), &spec.name);
    let decoder = JsonDecoder::new(plan.stages[0].clone());
    let event_time = spec
        .event_time
        .as_ref()
        .and_then(|c| plan.stages[0].index_of(c).ok());
    let delay = spec.watermark.delay.as_millis();
    let idle_after = Duration::from_millis(spec.watermark.idle_timeout.as_millis().max(0) as u64);
    let max_wait = Duration::from_millis(spec.batch.max_wait.as_millis().max(1) as u64);
    let interval = Duration::from_millis(spec.checkpoint.interval.as_millis().max(1) as u64);
    let max_records = spec.batch.max_records;

    // The sinks, then the dead letter (whether or not there is one), for the stage clocks.
    let sink_count = sinks.len() + 1;
    let ctx = Ctx {
        pipeline: pipeline.clone(),
        plan,
        sinks,
        dead_letter,
        summary: RunSummary::default(),
        last_commit: None,
        decoder,
        event_time,
        clock: Clock {
            sink_write: vec![Duration::ZERO; sink_count],
            sink_commit: vec![Duration::ZERO; sink_count],
            ..Clock::default()
        },
        retired: Vec::new(),
        uncommitted: HashMap::new(),
    };
    let engine = Arc::new(Mutex::new(Engine {
        ctx,
        units: HashMap::new(),
        store,
        watermark: None,
        failed: None,
    }));
    {
        // A rebalance runs inside `poll`, while the loop does not hold the lock.
        let engine = engine.clone();
        source.on_revoke(Box::new(move |revoked: &[(String, i32)]| {
            let mut guard = lock(&engine);
            match guard.revoke(revoked) {
                Ok(offsets) => Some(offsets),
                Err(e) => {
                    tracing::error!("flushing revoked partitions failed: {e}");
                    guard.failed = Some(e);
                    None
                }
            }
        }));
    }
    let mut next_commit = Instant::now() + interval;
    let mut last_record = Instant::now();
    let mut last_progress = Instant::now();
    let mut progress_mark = (0u64, 0u64);
    let live = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut polled = Vec::with_capacity(max_records);
    let started = Instant::now();
    loop {
        let records_so_far = lock(&engine).ctx.summary.records;
        if stop.load(Ordering::Relaxed) {
            tracing::info!("stopping: flushing and committing");
            break;
        }
        let budget = options
            .max_records
            .map(|m| m.saturating_sub(records_so_far) as usize)
            .unwrap_or(usize::MAX);
        if budget == 0 {
            break;
        }
        // Idle time counts once the source has partitions (a group join takes seconds).
        if records_so_far == 0
            && source.assigned().is_empty()
            && started.elapsed() < Duration::from_secs(60)
        {
            last_record = Instant::now();
        }
        if let Some(idle) = options.until_idle
            && last_record.elapsed() >= idle
        {
            tracing::info!("no input for {idle:?}: stopping");
            break;
        }
        polled.clear();
        let polling = Instant::now();
        source.poll(
            max_records.min(budget),
            max_wait.min(Duration::from_millis(100)),
            &mut polled,
        )?;
        let poll_time = polling.elapsed();
        pace.consumed
            .fetch_add(polled.len() as u64, Ordering::Relaxed);
        if !pace.reading.load(Ordering::Relaxed) && !source.assigned().is_empty() {
            pace.reading.store(true, Ordering::Relaxed);
        }
        if !polled.is_empty() {
            last_record = Instant::now();
        }
        let mut guard = lock_checked(&engine)?;
        guard.ctx.clock.poll += poll_time;
        if !polled.is_empty() && guard.ctx.summary.first_record.is_none() {
            guard.ctx.summary.first_record = Some(started.elapsed());
        }
        let Engine {
            ctx,
            units,
            store,
            watermark,
            ..
        } = &mut *guard;
        for (topic, partition) in source.revoked() {
            if let Some(unit) = units.remove(&(Arc::from(topic.as_str()), partition)) {
                ctx.retire(&unit);
                tracing::info!(
                    topic,
                    partition,
                    "dropped revoked partition's uncommitted work; its new owner resumes from the sinks' offsets"
                );
            }
        }
        // Every assigned partition gets its unit (and restored state) at once, so a partition
        // that has sent nothing yet holds the watermark back until it counts as idle.
        for ((topic, partition), _) in source.assigned() {
            let key: (Arc<str>, i32) = (topic.as_str().into(), partition);
            if let std::collections::hash_map::Entry::Vacant(slot) = units.entry(key) {
                let unit =
                    ctx.open_unit(store, slot.key().0.clone(), partition, source.ephemeral())?;
                slot.insert(unit);
            }
        }
        for record in polled.drain(..) {
            let key = (record.topic.clone(), record.partition);
            if !units.contains_key(&key) {
                let unit = ctx.open_unit(
                    store,
                    record.topic.clone(),
                    record.partition,
                    source.ephemeral(),
                )?;
                units.insert(key.clone(), unit);
            }
            let Some(unit) = units.get_mut(&key) else {
                continue;
            };
            if record.offset < unit.next {
                if !unit.sought && record.offset + 10_000 < unit.next {
                    source.seek(&record.topic, record.partition, unit.next)?;
                    unit.sought = true;
                }
                continue;
            }
            if record.offset > unit.next && !unit.processed_any && !unit.sought {
                tracing::info!(topic = %record.topic, partition = record.partition, from = unit.next, "seeking back to the sinks' offset");
                source.seek(&record.topic, record.partition, unit.next)?;
                unit.sought = true;
                continue;
            }
            unit.next = record.offset + 1;
            unit.last_seen = Instant::now();
            unit.oldest.get_or_insert_with(Instant::now);
            unit.pending.push(record);
            ctx.summary.records += 1;
            if unit.pending.len() >= max_records {
                ctx.process(unit)?;
            }
        }
        for unit in units.values_mut() {
            if unit.oldest.is_some_and(|t| t.elapsed() >= max_wait) {
                ctx.process(unit)?;
            }
        }
        ctx.advance_watermark(units, watermark, delay, idle_after)?;
        if Instant::now() >= next_commit {
            let offsets = ctx.checkpoint(store, units)?;
            let committing = Instant::now();
            source.commit(&offsets)?;
            ctx.clock.source_commit += committing.elapsed();
            next_commit = Instant::now() + interval;
        }
        // On a terminal a live line every second; otherwise a log line every 5 seconds.
        let every = if live {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        };
        if last_progress.elapsed() >= every {
            let secs = last_progress.elapsed().as_secs_f64();
            let s = &ctx.summary;
            let line = format!(
                "{} records ({:.0}/s in, {:.0}/s out), {} rejected, {} undecodable, {} partitions{}, watermark {}, last commit {}",
                s.records,
                (s.records - progress_mark.0) as f64 / secs,
                (s.rows_out - progress_mark.1) as f64 / secs,
                s.rejected,
                s.undecodable,
                units.len(),
                lag_text(&source.lag()),
                watermark.map_or("none".to_string(), flowgate_sdk::columns::format_millis),
                ctx.last_commit.map_or("none yet".to_string(), |t| format!(
                    "{:.0?} ago",
                    t.elapsed()
                )),
            );
            if live {
                eprint!("\r\x1b[2K{line}");
            } else {
                tracing::info!("{line}");
            }
            progress_mark = (s.records, s.rows_out);
            last_progress = Instant::now();
        }
    }
    if live {
        eprintln!();
    }
    let mut guard = lock_checked(&engine)?;
    let Engine {
        ctx,
        units,
        store,
        watermark,
        ..
    } = &mut *guard;
    for unit in units.values_mut() {
        if !unit.pending.is_empty() {
            ctx.process(unit)?;
        }
    }
    ctx.advance_watermark(units, watermark, delay, idle_after)?;
    let offsets = ctx.checkpoint(store, units)?;
    let committing = Instant::now();
    source.commit(&offsets)?;
    ctx.clock.source_commit += committing.elapsed();
    for unit in units.values() {
        ctx.retire(unit);
    }
    let mut summary = ctx.summary.clone();
    summary.wall = started.elapsed();
    summary.stages = ctx.stages();
    Ok(summary)
}

/// The engine's lock, failing with the error a rebalance callback left there, if any.
fn lock_checked(engine: &Mutex<Engine>) -> Result<std::sync::MutexGuard<'_, Engine>, RunError> {
    let mut guard = lock(engine);
    match guard.failed.take() {
        Some(e) => Err(e),
        None => Ok(guard),
    }
}

/// The engine's lock; a panic elsewhere does not make its state unusable for a final commit.
fn lock(engine: &Mutex<Engine>) -> std::sync::MutexGuard<'_, Engine> {
    engine.lock().unwrap_or_else(|p| p.into_inner())
}

/// ` (lag p0 12, p1 0)` for the progress line; empty when the source reports none.
fn lag_text(lag: &[((String, i32), i64)]) -> String {
    if lag.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = lag
        .iter()
        .map(|((t, p), l)| format!("{t}/{p} {l}"))
        .collect();
    format!(" (lag {})", parts.join(", "))
}

/// What the loop needs while it processes (owned, so a rebalance callback can use it too).
struct Ctx {
    pipeline: Pipeline,
    plan: Plan,
    sinks: Vec<SinkSlot>,
    dead_letter: Option<Box<dyn Sink>>,
    summary: RunSummary,
    last_commit: Option<Instant>,
    decoder: JsonDecoder,
    event_time: Option<usize>,
    clock: Clock,
    /// Step timings of partitions given up (a rebalance), per step.
    retired: Vec<StepTimings>,
    /// Kafka append times (ms) of records processed since the last checkpoint, with counts.
    uncommitted: HashMap<i64, u64>,
}

/// Time spent in the run loop's own stages.
#[derive(Debug, Default)]
struct Clock {
    poll: Duration,
    decode: Duration,
    /// Per sink (same order as `Ctx::sinks`), then the dead letter: sized once at the start.
    sink_write: Vec<Duration>,
    sink_commit: Vec<Duration>,
    snapshot: Duration,
    source_commit: Duration,
}

/// Everything the loop changes, behind one lock: the loop holds it except while it polls, and a
/// Kafka rebalance (which runs inside the poll) takes it to flush and commit revoked partitions.
struct Engine {
    ctx: Ctx,
    units: HashMap<(Arc<str>, i32), Unit>,
    store: CheckpointStore,
    watermark: Option<i64>,
    /// An error raised inside a rebalance callback, for the loop to return.
    failed: Option<RunError>,
}

impl Engine {
    /// Flushes and commits everything, then lets go of `revoked` partitions; returns the offsets
    /// committed, for the caller to commit to Kafka before the partitions move.
    fn revoke(&mut self, revoked: &[(String, i32)]) -> Result<Offsets, RunError> {
        for (topic, partition) in revoked {
            if let Some(unit) = self.units.get_mut(&(Arc::from(topic.as_str()), *partition)) {
                self.ctx.process(unit)?;
            }
        }
        let offsets = self.ctx.checkpoint(&self.store, &mut self.units)?;
        for (topic, partition) in revoked {
            if let Some(unit) = self.units.remove(&(Arc::from(topic.as_str()), *partition)) {
                self.ctx.retire(&unit);
                tracing::info!(
                    topic,
                    partition,
                    "flushed and committed the revoked partition before giving it up"
                );
            }
        }
        Ok(offsets)
    }
}

impl Ctx {
    /// Keeps the step timings of a partition that is going away.
    fn retire(&mut self, unit: &Unit) {
        let steps = unit.chain.steps();
        self.retired.resize(steps.len(), StepTimings::default());
        for (sum, step) in self.retired.iter_mut().zip(steps) {
            let t = step.timings();
            sum.calls += t.calls;
            sum.rows_in += t.rows_in;
            sum.total += t.total;
            sum.host_boundary += t.host_boundary;
        }
    }

    /// Time per stage so far (step times of retired partitions only).
    fn stages(&self) -> Vec<StageTime> {
        let stage = |name: String, time: Duration| StageTime {
            stage: name,
            time,
            ..Default::default()
        };
        let mut out = vec![
            stage("source poll".into(), self.clock.poll),
            stage("decode".into(), self.clock.decode),
        ];
        for (i, t) in self.retired.iter().enumerate() {
            out.push(StageTime {
                stage: format!("step {}", self.plan.names[i]),
                time: t.total,
                host_boundary: Some(t.host_boundary),
                native: self.plan.native.get(i).copied(),
            });
        }
        let names = self
            .sinks
            .iter()
            .map(|s| s.sink.name().to_string())
            .chain(self.dead_letter.as_ref().map(|d| d.name().to_string()));
        let encodes = self
            .sinks
            .iter()
            .map(|s| s.sink.encode_time())
            .chain(self.dead_letter.as_ref().map(|d| d.encode_time()));
        for (i, (name, encode)) in names.zip(encodes).enumerate() {
            let (write, commit) = (self.clock.sink_write[i], self.clock.sink_commit[i]);
            out.push(stage(format!("sink {name} write"), write));
            out.push(stage(format!("sink {name} encode"), encode));
            out.push(stage(
                format!("sink {name} commit"),
                commit.saturating_sub(encode),
            ));
        }
        out.push(stage("checkpoint state".into(), self.clock.snapshot));
        out.push(stage("source commit".into(), self.clock.source_commit));
        out
    }

    /// A new partition: find where its sinks stand, restore its state, build its chain.
    fn open_unit(
        &mut self,
        store: &CheckpointStore,
        topic_name: Arc<str>,
        partition: i32,
        ephemeral: bool,
    ) -> Result<Unit, RunError> {
        let topic = &*topic_name;
        let mut floors = Vec::new();
        for slot in self.sinks.iter_mut() {
            let held = if ephemeral {
                None
            } else {
                slot.sink.committed(topic, partition)?
            };
            floors.push(held.unwrap_or(-1));
        }
        if ephemeral {
            tracing::info!(
                topic,
                partition,
                "the embedded broker starts empty: this partition starts fresh, whatever offsets the tables hold"
            );
        }
        let low = floors.iter().copied().min().unwrap_or(-1);
        let mut chain = self.plan.chain()?;
        for stage in self.sinks.iter().map(|s| s.stage) {
            if stage > 0 && stage < self.plan.stages.len() - 1 {
                chain.tap(stage - 1);
            }
        }
        let mut max_event = None;
        if low >= 0 {
            match store.load(topic, partition, low)? {
                Some(saved) => {
                    max_event = saved.max_event;
                    for (step, state) in chain.steps_mut().iter_mut().zip(&saved.snapshots) {
                        step.restore(state).map_err(|source| RunError::Plugin {
                            location: self.pipeline.file.display().to_string(),
                            source: Box::new(source),
                        })?;
                    }
                    tracing::info!(topic, partition, offset = low, "restored plugin state");
                }
                None => tracing::warn!(
                    topic,
                    partition,
                    offset = low,
                    "no plugin state stored for this offset: stateful steps start empty"
                ),
            }
            tracing::info!(
                topic,
                partition,
                "resuming after offset {low}, as the sinks hold"
            );
        }
        Ok(Unit {
            topic: topic_name.clone(),
            partition,
            chain,
            pending: Vec::new(),
            oldest: None,
            last_seen: Instant::now(),
            next: low + 1,
            floors,
            processed_any: false,
            sought: false,
            max_event,
            dirty: false,
        })
    }

    fn dead_letters(
        &mut self,
        rows: Vec<(String, String, i64, String)>,
        unit: &Unit,
    ) -> Result<(), RunError> {
        if rows.is_empty() {
            return Ok(());
        }
        let Some(sink) = self.dead_letter.as_mut() else {
            tracing::warn!(topic = %unit.topic, partition = unit.partition, "{} rows rejected and no `dead_letter` sink configured: first reason: {}", rows.len(), rows[0].1);
            return Ok(());
        };
        let now = chrono::Utc::now().timestamp_millis();
        let n = rows.len();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![self.pipeline.spec.name.as_str(); n])),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.0.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.1.as_str()),
            )),
            Arc::new(StringArray::from(vec![&*unit.topic; n])),
            Arc::new(Int32Array::from(vec![unit.partition; n])),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.3.as_str()),
            )),
            Arc::new(TimestampMillisecondArray::from(vec![now; n]).with_timezone("UTC")),
        ];
        let batch = RecordBatch::try_new(sink::dead_letter_schema(), columns)
            .map_err(|e| RunError::Config(format!("dead letter batch: {e}")))?;
        let writing = Instant::now();
        sink.write(batch)?;
        self.clock.sink_write[self.sinks.len()] += writing.elapsed();
        Ok(())
    }

    /// Routes a chain's output to sinks (skipping sinks that already hold `offset`) and its
    /// rejected rows to the dead letter.
    fn deliver(
        &mut self,
        unit: &Unit,
        output: ChainOutput,
        offset: i64,
        decoded: Option<&RecordBatch>,
        offsets: &[i64],
    ) -> Result<(), RunError> {
        let last_stage = self.plan.stages.len() - 1;
        for (index, (slot, floor)) in self.sinks.iter_mut().zip(&unit.floors).enumerate() {
            if offset <= *floor {
                continue;
            }
            let writing = Instant::now();
            if slot.stage == last_stage {
                for b in &output.batches {
                    self.summary.rows_out += b.num_rows() as u64;
                    slot.sink.write(b.clone())?;
                }
            } else if slot.stage == 0 {
                if let Some(d) = decoded {
                    self.summary.rows_out += d.num_rows() as u64;
                    slot.sink.write(d.clone())?;
                }
            } else {
                for (i, b) in &output.taps {
                    if i + 1 == slot.stage {
                        self.summary.rows_out += b.num_rows() as u64;
                        slot.sink.write(b.clone())?;
                    }
                }
            }
            self.clock.sink_write[index] += writing.elapsed();
        }
        let mut rows = Vec::new();
        let first_step = self.plan.names.first();
        for rejected in output.rejected {
            self.summary.rejected += rejected.reasons.len() as u64;
            let json = row_json(&rejected.rows);
            // Rows refused by the first step map to their records; rows refused further on (or
            // on a watermark) carry the last offset of the batch that led to them.
            let exact = first_step == Some(&rejected.step) && decoded.is_some();
            for ((reason, row), index) in
                rejected.reasons.into_iter().zip(json).zip(rejected.indices)
            {
                let at = if exact {
                    offsets.get(index as usize).copied().unwrap_or(offset)
                } else {
                    offset
                };
                rows.push((rejected.step.clone(), reason, at, row));
            }
        }
        self.dead_letters(rows, unit)
    }

    fn process(&mut self, unit: &mut Unit) -> Result<(), RunError> {
        let records = std::mem::take(&mut unit.pending);
        unit.oldest = None;
        if records.is_empty() {
            return Ok(());
        }
        let last = records.last().map_or(-1, |r| r.offset);
        let decoding = Instant::now();
        let payloads: Vec<&[u8]> = records.iter().map(|r| r.payload.as_slice()).collect();
        let (batch, failures) = self.decoder.decode(&payloads);
        self.clock.decode += decoding.elapsed();
        let mut bad = Vec::new();
        let mut failed = vec![false; records.len()];
        for f in &failures {
            failed[f.index] = true;
            let r = &records[f.index];
            bad.push((
                "decode".to_string(),
                f.reason.clone(),
                r.offset,
                String::from_utf8_lossy(&r.payload).into_owned(),
            ));
        }
        self.summary.undecodable += failures.len() as u64;
        self.dead_letters(bad, unit)?;
        let offsets: Vec<i64> = records
            .iter()
            .zip(&failed)
            .filter(|(_, f)| !**f)
            .map(|(r, _)| r.offset)
            .collect();
        if let Some(et) = self.event_time
            && let Ok(ms) = flowgate_sdk::columns::event_time_millis(&batch, et)
            && let Some(max) = arrow::compute::max(&ms)
        {
            unit.max_event = Some(unit.max_event.map_or(max, |m| m.max(max)));
        }
        unit.processed_any = true;
        unit.dirty = true;
        let result = unit.chain.process(batch.clone());
        self.record_latency(&records);
        match result {
            Ok(output) => self.deliver(unit, output, last, Some(&batch), &offsets),
            Err(e) => self.on_plugin_error(unit, e, &batch, last),
        }
    }

    /// Records how long ago `records` were appended to Kafka (they just left the last plugin),
    /// and keeps their append times until the next checkpoint commits them.
    fn record_latency(&mut self, records: &[Record]) {
        let now_us = chrono::Utc::now().timestamp_micros();
        // Consecutive records mostly share a millisecond: count runs, not records.
        let mut run: Option<(i64, u64)> = None;
        for ts in records.iter().filter_map(|r| r.timestamp_ms) {
            match &mut run {
                Some((t, n)) if *t == ts => *n += 1,
                _ => {
                    if let Some((t, n)) = run.replace((ts, 1)) {
                        self.note_appended(now_us, t, n);
                    }
                }
            }
        }
        if let Some((t, n)) = run {
            self.note_appended(now_us, t, n);
        }
    }

    fn note_appended(&mut self, now_us: i64, ts_ms: i64, n: u64) {
        let age = now_us.saturating_sub(ts_ms.saturating_mul(1000)).max(0) as u64;
        self.summary.latency_to_output.record_n(age, n);
        *self.uncommitted.entry(ts_ms).or_default() += n;
    }

    fn on_plugin_error(
        &mut self,
        unit: &Unit,
        e: PluginError,
        batch: &RecordBatch,
        offset: i64,
    ) -> Result<(), RunError> {
        let step = match &e {
            PluginError::Plugin { step, .. }
            | PluginError::Trap { step, .. }
            | PluginError::Timeout { step, .. }
            | PluginError::MemoryLimit { step, .. }
            | PluginError::SchemaMismatch { step, .. }
            | PluginError::Protocol { step, .. }
            | PluginError::Discarded { step, .. } => step.clone(),
            _ => String::new(),
        };
        let plan = self.plan.steps.iter().find(|s| s.name == step);
        let location = plan.map_or_else(
            || self.pipeline.file.display().to_string(),
            |s| s.location.clone(),
        );
        let policy = plan.map_or(OnError::Fail, |s| s.on_error);
        // Only a refused batch is covered by `on_error`; a trap, timeout or bug stops the run,
        // and the restart resumes from the last checkpoint.
        if e.kind() != ErrorKind::Data || policy == OnError::Fail {
            return Err(RunError::Plugin {
                location,
                source: Box::new(e),
            });
        }
        tracing::warn!(topic = %unit.topic, partition = unit.partition, offset, "{e}; batch of {} rows {}", batch.num_rows(), if policy == OnError::Skip { "skipped" } else { "sent to the dead letter" });
        if policy == OnError::DeadLetter {
            let reason = e.to_string();
            let rows = row_json(batch)
                .into_iter()
                .map(|row| (step.clone(), reason.clone(), offset, row))
                .collect();
            self.summary.rejected += batch.num_rows() as u64;
            self.dead_letters(rows, unit)?;
        }
        Ok(())
    }

    /// The pipeline watermark is the minimum over partitions that are not idle (all idle: the
    /// maximum), less the allowed delay; when it moves, every partition's chain hears of it.
    fn advance_watermark(
        &mut self,
        units: &mut HashMap<(Arc<str>, i32), Unit>,
        watermark: &mut Option<i64>,
        delay: i64,
        idle_after: Duration,
    ) -> Result<(), RunError> {
        let active: Vec<Option<i64>> = units
            .values()
            .filter(|u| u.last_seen.elapsed() < idle_after)
            .map(|u| u.max_event)
            .collect();
        // A live partition that has sent nothing yet may hold older records than the others.
        if active.iter().any(Option::is_none) {
            return Ok(());
        }
        let active: Vec<i64> = active.into_iter().flatten().collect();
        let candidate = if active.is_empty() {
            units.values().filter_map(|u| u.max_event).max()
        } else {
            active.iter().copied().min()
        };
        if let Some(w) = candidate.map(|m| m.saturating_sub(delay))
            && watermark.is_none_or(|old| w > old)
        {
            *watermark = Some(w);
            for unit in units.values_mut() {
                self.watermark(unit, w)?;
            }
        }
        Ok(())
    }

    fn watermark(&mut self, unit: &mut Unit, ts: i64) -> Result<(), RunError> {
        if !unit.processed_any {
            return Ok(());
        }
        let offset = unit.next - 1;
        match unit.chain.watermark(ts) {
            Ok(output) => {
                unit.dirty = true;
                self.deliver(unit, output, offset, None, &[])
            }
            Err(e) => Err(RunError::Plugin {
                location: self.pipeline.file.display().to_string(),
                source: Box::new(e),
            }),
        }
    }

    fn checkpoint(
        &mut self,
        store: &CheckpointStore,
        units: &mut HashMap<(Arc<str>, i32), Unit>,
    ) -> Result<Offsets, RunError> {
        let mut offsets = Offsets::new();
        for unit in units.values_mut() {
            if !unit.processed_any {
                continue;
            }
            let last = unit.next - 1;
            if unit.dirty {
                let snapshotting = Instant::now();
                let mut snapshots = Vec::new();
                for step in unit.chain.steps_mut() {
                    snapshots.push(step.snapshot().map_err(|source| RunError::Plugin {
                        location: self.pipeline.file.display().to_string(),
                        source: Box::new(source),
                    })?);
                }
                let state = PartitionState {
                    max_event: unit.max_event,
                    snapshots,
                };
                store.save(&unit.topic, unit.partition, last, &state)?;
                unit.dirty = false;
                self.clock.snapshot += snapshotting.elapsed();
            }
            offsets.insert((unit.topic.to_string(), unit.partition), last);
        }
        if offsets.is_empty() {
            return Ok(offsets);
        }
        let mut committed = false;
        for (index, slot) in self.sinks.iter_mut().enumerate() {
            let committing = Instant::now();
            committed |= slot.sink.commit(&offsets)?;
            self.clock.sink_commit[index] += committing.elapsed();
        }
        if let Some(d) = self.dead_letter.as_mut() {
            let committing = Instant::now();
            committed |= d.commit(&offsets)?;
            let index = self.sinks.len();
            self.clock.sink_commit[index] += committing.elapsed();
        }
        let now_us = chrono::Utc::now().timestamp_micros();
        for (ts_ms, n) in self.uncommitted.drain() {
            let age = now_us.saturating_sub(ts_ms.saturating_mul(1000)).max(0) as u64;
            self.summary.latency_to_commit.record_n(age, n);
        }
        if committed {
            self.summary.checkpoints += 1;
            self.last_commit = Some(Instant::now());
            tracing::debug!(?offsets, "checkpoint committed");
        }
        Ok(offsets)
    }
}

/// Each row of `batch` as a JSON object.
/// (A row that cannot be written as JSON still gets an entry, `{}`, so no rejection is lost.)
fn row_json(batch: &RecordBatch) -> Vec<String> {
    let mut rows = decode::rows_to_json(batch).unwrap_or_default();
    rows.resize(batch.num_rows(), "{}".to_string());
    rows
}

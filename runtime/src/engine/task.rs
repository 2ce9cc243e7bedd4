//! A partition task: one source partition's batcher, decoder, plugin chain and watermark. It
//! lives on one worker thread, and stages what its chain emits for the sinks under the epoch it
//! belongs to. At an epoch barrier it finishes what it has taken and snapshots its steps.
//!
//! Three positions, three names: `taken` (the last offset handed to this task), `processed`
//! (the last offset whose records went through the chain) and — held by the sinks, not here —
//! committed. Only `processed` is ever checkpointed.
//!
//! Late data is judged the same in a replay as live: the chain gets its own partition's
//! watermark, and a batch is cut before any row older than the watermark the rows before it
//! imply, which is handed to the chain first. So lateness depends on the records alone, never on
//! how they were batched.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, Int32Array, Int64Array, StringArray};
use arrow::array::{RecordBatch, TimestampMicrosecondArray};

use super::committer::{CommitMsg, Staged};
use super::plan::{Plan, RunError};
use super::{Counters, PartitionKey};
use crate::checkpoint::{PartitionState, StepChain};
use crate::config::{OnError, StateMode};
use crate::decode::{self, JsonDecoder};
use crate::exporter::{
    InstanceLabels, Metrics, PartitionLabels, RejectLabels, SinkLabels, StageLabels,
};
use crate::plugin::{ChainOutput, PluginError, PluginFault, StepParts, StepTimings};
use crate::sink;
use crate::source::Record;

/// Where a sink reads: a stage of the chain, or the dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SinkInput {
    /// 0 = the decoded records, i + 1 = what step i emits.
    Stage(usize),
    /// Rows refused anywhere.
    DeadLetter,
    /// The repartition hop (the upstream half): the task sends the rows itself.
    Hop,
}

/// Which half of a pipeline with a repartition hop a task runs (see [`super::hop`]).
#[derive(Clone)]
pub(crate) enum Role {
    /// No hop: decode and every step.
    Whole,
    /// Decode, judge late rows, send the rest to the internal topic.
    Upstream(Arc<super::hop::HopOut>),
    /// Read the internal topic: every step, on rows of every source partition (the source
    /// partitions listed: windows wait for each one's watermark).
    Keyed(Arc<Vec<PartitionKey>>),
}

/// What every task of a run shares.
pub(crate) struct TaskContext {
    pub plan: Arc<Plan>,
    pub pipeline: String,
    pub decoder: JsonDecoder,
    pub event_time: Option<usize>,
    pub delay: i64,
    /// Event times further than this (ms) ahead of the record's Kafka timestamp (the clock for
    /// a source without one) are refused at decode.
    pub max_future: i64,
    pub max_records: usize,
    pub max_wait: Duration,
    /// How long a batch waits for more once the worker has nothing more queued.
    pub linger: Duration,
    /// Records larger than this go to the dead letter undecoded.
    pub max_record_bytes: usize,
    /// Per sink index (the dead letter last, if any): what it reads.
    pub inputs: Vec<SinkInput>,
    pub counters: Arc<Counters>,
    pub committer: std::sync::mpsc::SyncSender<CommitMsg>,
    /// Live metrics (served when the pipeline has `metrics:`).
    pub metrics: Arc<Metrics>,
    /// Per sink index: its name, for metrics.
    pub sink_names: Vec<String>,
    /// This process's tag in checkpoint epochs (see [`crate::checkpoint::next_epoch`]).
    pub writer: u64,
    /// Which half of a repartitioned pipeline the tasks run.
    pub role: Role,
    /// The state store the committer saves checkpoints in: a chain reads a step's saved state
    /// back from there to rebuild the step, rather than hold it.
    pub store: Arc<dyn crate::checkpoint::StateStore>,
}

impl TaskContext {
    /// The same context for another plan (a live swap): its steps, and where each sink reads.
    pub fn with_plan(&self, plan: Arc<Plan>, inputs: Vec<SinkInput>) -> TaskContext {
        TaskContext {
            plan,
            pipeline: self.pipeline.clone(),
            decoder: self.decoder.clone(),
            event_time: self.event_time,
            delay: self.delay,
            max_future: self.max_future,
            max_records: self.max_records,
            max_wait: self.max_wait,
            linger: self.linger,
            max_record_bytes: self.max_record_bytes,
            inputs,
            counters: self.counters.clone(),
            committer: self.committer.clone(),
            metrics: self.metrics.clone(),
            sink_names: self.sink_names.clone(),
            writer: self.writer,
            role: self.role.clone(),
            store: self.store.clone(),
        }
    }
}

/// A stop of a replay: a checkpoint the first run took between the start and a sink that
/// holds more. When `processed` reaches `offset`, the chain gets `watermark` (as it did when that
/// checkpoint was taken) and `sinks` (those that hold exactly this checkpoint, if any) join;
/// until then they are not written.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub offset: i64,
    /// The checkpoint's epoch: the task's lineage passes through it.
    pub epoch: u64,
    pub watermark: Option<i64>,
    pub sinks: Vec<usize>,
}

/// How a partition starts: decided from what its sinks hold (see the committer).
#[derive(Debug, Clone)]
pub(crate) struct Resume {
    /// The last offset every joined sink holds (-1: none).
    pub start: i64,
    /// The newest checkpoint epoch any sink holds (the next one is numbered after it).
    pub epoch: u64,
    /// The epoch of `state`.
    pub base: Option<u64>,
    /// The state stored for `start`, if any.
    pub state: Option<PartitionState>,
    /// Its steps' states as a restore needs them (deltas followed back to full snapshots).
    pub steps: Vec<StepChain>,
    /// Per sink: written from the start.
    pub joined: Vec<bool>,
    /// Sinks that hold more, in offset order.
    pub targets: Vec<Target>,
    /// Whether any sink holds anything of the partition (else the group's offset applies).
    pub held: bool,
}

/// A checkpoint of one partition at an epoch barrier.
#[derive(Debug)]
pub(crate) struct TaskCheckpoint {
    pub key: PartitionKey,
    /// The partition's checkpoint epoch.
    pub epoch: u64,
    pub state: PartitionState,
    /// Per sink: whether this checkpoint's position is recorded in it.
    pub joined: Vec<bool>,
    /// The task's newest checkpoint in the state store: the committer moves it to `epoch`
    /// once it saved this one.
    pub saved: Arc<AtomicU64>,
}

pub(crate) struct PartitionTask {
    pub key: PartitionKey,
    ctx: Arc<TaskContext>,
    chain: crate::plugin::Chain,
    pending: Vec<Record>,
    oldest: Option<Instant>,
    /// When the newest pending record arrived.
    newest: Option<Instant>,
    taken: i64,
    processed: i64,
    max_event: Option<i64>,
    watermark: Option<i64>,
    /// The watermark for the coordinator (`i64::MIN`: none yet).
    published: Arc<AtomicI64>,
    epoch: u64,
    /// The checkpoint this task's state goes on from (restored, or reached in a replay).
    lineage: Option<u64>,
    dirty: bool,
    joined: Vec<bool>,
    targets: VecDeque<Target>,
    /// Behind the hop: what each source partition has sent, and its watermark.
    sources: super::hop::Sources,
    /// Upstream of the hop: the watermark last sent to each internal partition.
    sent: Vec<Option<i64>>,
    /// Upstream of the hop: the keyed tasks were told this partition is idle (since its last
    /// records).
    idle_sent: bool,
    /// Kafka append times (ms) of records processed since the last barrier, with counts.
    pub appended: HashMap<i64, u64>,
    pub decode_time: Duration,
    /// Taking the steps' states at barriers.
    pub snapshot_time: Duration,
    /// Append → out of the last plugin, per record (µs).
    pub latency: crate::metrics::Histogram,
    /// The newest of this task's checkpoints in the state store (its own: an epoch number
    /// can come again when the partition comes back to this process).
    saved: Arc<AtomicU64>,
}

impl PartitionTask {
    /// Builds the chain and restores the state `resume` names, step by step name.
    pub fn open(
        ctx: Arc<TaskContext>,
        key: PartitionKey,
        resume: Resume,
        published: Arc<AtomicI64>,
        epoch: u64,
    ) -> Result<Self, RunError> {
        let mut chain = chain_for(&ctx)?;
        let saved = Arc::new(AtomicU64::new(0));
        chain.stagger(stagger_seed(&key));
        let (mut max_event, mut watermark) = (None, None);
        let mut sources = super::hop::Sources::default();
        if let (Some(state), Some(at)) = (&resume.state, resume.base) {
            max_event = state.max_event;
            watermark = state.watermark;
            sources = super::hop::Sources::from_marks(&state.sources);
            restore_chain(&ctx.plan, &mut chain, &resume.steps, at, &key)?;
            // What the steps were restored from is in the store.
            saved.store(at, Ordering::Release);
        }
        chain.keep_stored(stored_states(&ctx, &key, &saved));
        if watermark == Some(i64::MAX) {
            tracing::warn!(
                topic = %key.0,
                partition = key.1,
                "this partition's input ended in an earlier run (`end: flush` closed every window): a record that comes now is late; with a source that goes on, use `end: keep`, or write to new tables"
            );
        }
        if let Role::Keyed(expected) = &ctx.role {
            sources.expect(expected);
        }
        if let Role::Upstream(out) = &ctx.role {
            // The keyed tasks hold their windows open for every source partition they heard of.
            out.announce(&key, watermark)?;
        }
        published.store(watermark.unwrap_or(i64::MIN), Ordering::Relaxed);
        let mut task = PartitionTask {
            key,
            ctx,
            chain,
            pending: Vec::new(),
            oldest: None,
            newest: None,
            taken: resume.start,
            processed: resume.start,
            max_event,
            watermark,
            published,
            epoch: resume.epoch,
            lineage: resume.base,
            dirty: false,
            joined: resume.joined,
            targets: resume.targets.into(),
            sources,
            sent: Vec::new(),
            idle_sent: false,
            appended: HashMap::new(),
            saved,
            decode_time: Duration::ZERO,
            snapshot_time: Duration::ZERO,
            latency: Default::default(),
        };
        task.reach_targets(epoch)?;
        Ok(task)
    }

    /// The step timings so far, per step name.
    pub fn timings(&self) -> Vec<(String, StepTimings)> {
        self.chain
            .steps()
            .iter()
            .map(|s| (s.name().to_string(), s.timings()))
            .collect()
    }

    fn step_timings(&self) -> Vec<StepTimings> {
        self.chain.steps().iter().map(|s| s.timings()).collect()
    }

    /// The first half of a live swap, at an epoch barrier (after [`PartitionTask::barrier`]):
    /// fresh instances of the steps of `ctx`'s plan that `carry` does not carry over as they are
    /// (see [`swap`](super::swap)), each restored from the old step of its name. Nothing changes
    /// here; [`PartitionTask::switch`] puts the new chain together. The outer error is fatal (an
    /// old step failed to snapshot); a refusal leaves the old chain as it was.
    pub fn prepare_swap(
        &mut self,
        ctx: &TaskContext,
        carry: &[Option<usize>],
    ) -> Result<SwapReady, RunError> {
        // A partition still catching up with sinks that hold more (after a restart) swaps
        // later: those sinks' rows for the offsets ahead came from the old steps.
        if !self.targets.is_empty() {
            return Ok(SwapReady::NotYet);
        }
        let mut fresh = Vec::with_capacity(carry.len());
        for (index, carried) in carry.iter().enumerate() {
            if carried.is_some() {
                fresh.push(None);
                continue;
            }
            let mut step = match ctx.plan.instantiate(index) {
                Ok(step) => step,
                Err(e) => return Ok(SwapReady::Refused(e.to_string())),
            };
            let name = step.name().to_string();
            let old = self.chain.steps().iter().position(|s| s.name() == name);
            let Some(old) = old else {
                tracing::info!(topic = %self.key.0, partition = self.key.1, step = %name, "a new step: it starts empty");
                fresh.push(Some(StepParts::fresh(step, None)));
                continue;
            };
            let state =
                self.chain.steps_mut()[old]
                    .snapshot()
                    .map_err(|source| RunError::Plugin {
                        location: format!("partition `{}/{}`", self.key.0, self.key.1),
                        source: Box::new(source),
                    })?;
            match restore_step(&ctx.plan, index, &mut step, &state, &[], &self.key) {
                Ok(restored) => fresh.push(Some(StepParts::fresh(step, restored.then_some(state)))),
                Err(e) => return Ok(SwapReady::Refused(e.to_string())),
            }
        }
        Ok(SwapReady::Ready(fresh))
    }

    /// The second half of a live swap: the chain of `ctx`'s plan, of the steps `carry` carries
    /// over from the old chain (as they are, with what rebuilding them needs) and the `fresh`
    /// ones from [`PartitionTask::prepare_swap`], takes over. The next barrier checkpoints the
    /// new steps' state even if nothing arrives. Returns the timings of the old steps dropped.
    pub fn switch(
        &mut self,
        ctx: Arc<TaskContext>,
        mut fresh: Vec<Option<StepParts>>,
        carry: &[Option<usize>],
    ) -> Result<Vec<(String, StepTimings)>, RunError> {
        let old = std::mem::replace(&mut self.chain, crate::plugin::Chain::new(Vec::new()));
        let (old, journal_full) = old.into_parts();
        let mut old: Vec<Option<StepParts>> = old.into_iter().map(Some).collect();
        let mut parts = Vec::with_capacity(carry.len());
        for (index, carried) in carry.iter().enumerate() {
            let part = match carried {
                Some(from) => old.get_mut(*from).and_then(Option::take),
                None => fresh.get_mut(index).and_then(Option::take),
            };
            parts.push(part.ok_or_else(|| {
                RunError::Internal(format!("live swap: no step prepared for position {index}"))
            })?);
        }
        let mut chain = crate::plugin::Chain::from_parts(parts, journal_full)
            .with_policies(ctx.plan.policies());
        tap_stages(&ctx, &mut chain);
        chain.stagger(stagger_seed(&self.key));
        chain.keep_stored(stored_states(&ctx, &self.key, &self.saved));
        self.ctx = ctx;
        self.chain = chain;
        self.dirty = true;
        let dropped: Vec<StepParts> = old.into_iter().flatten().collect();
        // Memory series of steps no longer running go; the chain's are published now.
        for part in &dropped {
            let name = part.step().name();
            if !self.chain.steps().iter().any(|s| s.name() == name) {
                self.ctx
                    .metrics
                    .wasm_memory
                    .remove(&self.instance_labels(name));
            }
        }
        self.report_memory();
        Ok(dropped
            .iter()
            .map(|p| (p.step().name().to_string(), p.step().timings()))
            .collect())
    }

    fn partition_labels(&self) -> PartitionLabels {
        PartitionLabels {
            topic: self.key.0.to_string(),
            partition: self.key.1,
        }
    }

    fn count_rejected(&self, stage: &str, reason: &str, n: usize) {
        self.ctx
            .metrics
            .rejected
            .get_or_create(&RejectLabels {
                stage: stage.to_string(),
                reason: reason.to_string(),
            })
            .inc_by(n as u64);
    }

    /// Observes the plugin calls made since `before` (one chain call: at most one per step).
    fn observe_calls(&self, before: &[StepTimings]) {
        for (step, (was, now)) in self
            .chain
            .steps()
            .iter()
            .zip(before.iter().zip(self.step_timings()))
        {
            if now.calls > was.calls {
                let stage = StageLabels {
                    stage: step.name().to_string(),
                };
                let metrics = &self.ctx.metrics;
                metrics
                    .step_call
                    .get_or_create(&stage)
                    .observe(now.total.saturating_sub(was.total).as_secs_f64());
                metrics.step_boundary.get_or_create(&stage).observe(
                    now.host_boundary
                        .saturating_sub(was.host_boundary)
                        .as_secs_f64(),
                );
            }
        }
    }

    /// Publishes each step's WASM linear memory for this partition.
    pub fn report_memory(&self) {
        for step in self.chain.steps() {
            if let Some(bytes) = step.memory_bytes() {
                self.ctx
                    .metrics
                    .wasm_memory
                    .get_or_create(&self.instance_labels(step.name()))
                    .set(bytes as i64);
            }
        }
    }

    /// Drops this partition's per-instance series (it moved elsewhere).
    pub fn forget_metrics(&self) {
        for step in self.chain.steps() {
            self.ctx
                .metrics
                .wasm_memory
                .remove(&self.instance_labels(step.name()));
        }
    }

    fn instance_labels(&self, stage: &str) -> InstanceLabels {
        InstanceLabels {
            stage: stage.to_string(),
            topic: self.key.0.to_string(),
            partition: self.key.1,
        }
    }

    /// When the oldest record waiting will have waited `max_wait` (nothing waiting: `None`):
    /// the batch goes then even if more input keeps coming.
    pub fn due_at(&self) -> Option<Instant> {
        self.oldest.map(|t| t + self.ctx.max_wait)
    }

    /// When the batch goes if the worker has nothing more queued by then: the newest record
    /// waited `linger`, or the oldest `max_wait` (nothing waiting: `None`).
    pub fn quiet_at(&self) -> Option<Instant> {
        let lingered = self.newest.map(|t| t + self.ctx.linger)?;
        Some(self.due_at().map_or(lingered, |due| due.min(lingered)))
    }

    /// Takes records of this partition (in offset order); ones at or below `taken` (refetched
    /// after a seek) are dropped. Processes a batch when it is full, and never lets a batch
    /// straddle a sink's target offset.
    pub fn take(&mut self, records: Vec<Record>, epoch: u64) -> Result<(), RunError> {
        // The common case, a batch's worth of new records with nothing pending and no target:
        // they become the pending batch as they came (no record moved one by one).
        if self.pending.is_empty()
            && self.targets.is_empty()
            && !records.is_empty()
            && records.len() <= self.ctx.max_records
            && records[0].offset > self.taken
            && records.windows(2).all(|w| w[0].offset < w[1].offset)
        {
            let now = Instant::now();
            self.taken = records[records.len() - 1].offset;
            self.oldest = Some(now);
            self.newest = Some(now);
            self.pending = records;
            if self.pending.len() >= self.ctx.max_records {
                self.process(epoch)?;
            }
            return Ok(());
        }
        self.pending.reserve(records.len());
        let mut added = false;
        for record in records {
            if record.offset <= self.taken {
                continue;
            }
            // A batch never straddles a target: finish what is before it, and reach it even if
            // its own record is gone (compaction, an edited file).
            while let Some(target) = self.targets.front()
                && record.offset > target.offset
            {
                let target = target.offset;
                self.process(epoch)?;
                self.processed = self.processed.max(target);
                self.reach_targets(epoch)?;
            }
            self.taken = record.offset;
            self.oldest.get_or_insert_with(Instant::now);
            self.pending.push(record);
            added = true;
            if self.pending.len() >= self.ctx.max_records {
                self.process(epoch)?;
            }
        }
        // Records refetched after a seek (dropped above) do not hold the batch back.
        if added && !self.pending.is_empty() {
            self.newest = Some(Instant::now());
        }
        Ok(())
    }

    /// Runs what is pending through decode and the chain.
    pub fn process(&mut self, epoch: u64) -> Result<(), RunError> {
        let records = std::mem::take(&mut self.pending);
        self.oldest = None;
        self.newest = None;
        let Some(last) = records.last().map(|r| r.offset) else {
            return Ok(());
        };
        if matches!(self.ctx.role, Role::Keyed(_)) {
            return self.process_hop(records, last, epoch);
        }
        let decoding = Instant::now();
        // Records that cannot be JSON at all never reach the decoder.
        let mut failures: Vec<(usize, String)> = Vec::new();
        let mut decodable = Vec::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            match precheck(r, self.ctx.max_record_bytes) {
                Some(reason) => failures.push((i, reason)),
                None => decodable.push(i),
            }
        }
        let payloads: Vec<&[u8]> = decodable.iter().map(|&i| &records[i].payload[..]).collect();
        let (mut batch, decode_failures) = self.ctx.decoder.decode(&payloads);
        failures.extend(
            decode_failures
                .into_iter()
                .map(|f| (decodable[f.index], f.reason)),
        );
        failures.sort_by_key(|(i, _)| *i);
        self.decode_time += decoding.elapsed();
        let mut dead = Vec::new();
        let mut failed = vec![false; records.len()];
        for (index, reason) in &failures {
            failed[*index] = true;
            let r = &records[*index];
            dead.push(DeadRow {
                stage: "decode".into(),
                reason: reason.clone(),
                offset: r.offset,
                payload: dead_payload(&r.payload),
                source: None,
            });
        }
        self.ctx
            .counters
            .undecodable
            .fetch_add(failures.len() as u64, Ordering::Relaxed);
        if !failures.is_empty() {
            self.count_rejected("decode", "undecodable", failures.len());
        }
        // Batch row → record.
        let mut rows: Vec<usize> = (0..records.len()).filter(|&i| !failed[i]).collect();
        // An event time far ahead of its time would close every open window at once.
        if let Some(et) = self.ctx.event_time
            && batch.num_rows() > 0
            && let Ok(times) = flowgate_sdk::columns::event_time_millis(&batch, et)
        {
            // Judged against the record's own append time when the source has one (so a replay
            // judges it as the live run did, whenever it runs), else against the clock.
            let now = chrono::Utc::now().timestamp_millis();
            let limit = |row: usize| {
                records[rows[row]]
                    .timestamp_ms
                    .unwrap_or(now)
                    .saturating_add(self.ctx.max_future)
            };
            let ahead: Vec<usize> = (0..times.len())
                .filter(|&row| !times.is_null(row) && times.value(row) > limit(row))
                .collect();
            if !ahead.is_empty() {
                for &row in &ahead {
                    let r = &records[rows[row]];
                    dead.push(DeadRow {
                        stage: "decode".into(),
                        reason: format!(
                            "event time {} is more than `watermark.max_future` ({}) ahead of when the record was written (its Kafka timestamp; the clock for a file): it would move the watermark past every open window",
                            flowgate_sdk::columns::format_millis(times.value(row)),
                            flowgate_sdk::config::Duration::from_millis(self.ctx.max_future)
                        ),
                        offset: r.offset,
                        payload: dead_payload(&r.payload),
                        source: None,
                    });
                }
                self.count_rejected("decode", "future", ahead.len());
                self.ctx
                    .counters
                    .undecodable
                    .fetch_add(ahead.len() as u64, Ordering::Relaxed);
                let mut keep = vec![true; times.len()];
                for &row in &ahead {
                    keep[row] = false;
                }
                batch = arrow::compute::filter_record_batch(
                    &batch,
                    &arrow::array::BooleanArray::from(keep.clone()),
                )
                .map_err(|e| {
                    RunError::Internal(format!("dropping records from the future: {e}"))
                })?;
                let mut kept = keep.into_iter();
                rows.retain(|_| kept.next().unwrap_or(false));
            }
        }
        let offsets: Vec<i64> = rows.iter().map(|&i| records[i].offset).collect();
        self.dead_letter(dead, epoch)?;
        self.dirty = true;
        if let Role::Upstream(out) = &self.ctx.role {
            let out = out.clone();
            let times: Vec<Option<i64>> = rows.iter().map(|&i| records[i].timestamp_ms).collect();
            self.send_upstream(&out, batch, &offsets, &times, epoch)?;
            // Latency is recorded where the rows leave the last step, behind the hop.
            return self.finish(&records, Some(&[]), last, epoch);
        }
        // Cut before every row behind the watermark the rows before it imply.
        let times = match self.ctx.event_time {
            Some(et) if batch.num_rows() > 0 => {
                flowgate_sdk::columns::event_time_millis(&batch, et).ok()
            }
            _ => None,
        };
        let mut start = 0;
        if let Some(times) = &times {
            let delay = self.ctx.delay;
            for row in 0..times.len() {
                if times.is_null(row) {
                    continue;
                }
                let t = times.value(row);
                if let Some(max) = self.max_event {
                    let implied = max.saturating_sub(delay);
                    if t < implied && self.watermark.is_none_or(|w| w < implied) {
                        if row > start {
                            let slice = batch.slice(start, row - start);
                            self.run_chain(slice, &offsets[start..row], &[], epoch)?;
                        }
                        start = row;
                        self.hand_watermark(implied, epoch)?;
                    }
                }
                self.max_event = Some(self.max_event.map_or(t, |m| m.max(t)));
            }
        }
        if start < batch.num_rows() || batch.num_rows() == 0 {
            let slice = batch.slice(start, batch.num_rows() - start);
            self.run_chain(slice, &offsets[start..], &[], epoch)?;
        }
        self.finish(&records, None, last, epoch)
    }

    /// After a batch: the offset processed, counts, latency, the watermark the batch implies,
    /// and sinks whose target the batch reached.
    fn finish(
        &mut self,
        records: &[Record],
        source_times: Option<&[Option<i64>]>,
        last: i64,
        epoch: u64,
    ) -> Result<(), RunError> {
        self.processed = last;
        self.ctx
            .counters
            .records
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        let partition = self.partition_labels();
        let metrics = &self.ctx.metrics;
        metrics
            .records_in
            .get_or_create(&partition)
            .inc_by(records.len() as u64);
        metrics.batches.get_or_create(&partition).inc();
        match source_times {
            Some(times) => self.record_latency(times.iter().copied()),
            None => self.record_latency(records.iter().map(|r| r.timestamp_ms)),
        }
        match self.ctx.role {
            Role::Keyed(_) => {
                if let Some(w) = self.sources.watermark() {
                    self.hand_watermark(w, epoch)?;
                }
            }
            _ => {
                if let Some(max) = self.max_event {
                    self.hand_watermark(max.saturating_sub(self.ctx.delay), epoch)?;
                }
            }
        }
        self.reach_targets(epoch)
    }

    /// Upstream of the hop: judges each row against this partition's own watermark (the newest
    /// event time before it less the delay): late rows go to
    /// the dead letter with their offsets; the others go to the internal topic, keyed, with the
    /// watermark after them.
    fn send_upstream(
        &mut self,
        out: &super::hop::HopOut,
        batch: RecordBatch,
        offsets: &[i64],
        times: &[Option<i64>],
        epoch: u64,
    ) -> Result<(), RunError> {
        let delay = self.ctx.delay;
        let mut late = Vec::new();
        if let Some(et) = self.ctx.event_time
            && batch.num_rows() > 0
            && let Ok(times) = flowgate_sdk::columns::event_time_millis(&batch, et)
        {
            for row in 0..times.len() {
                if times.is_null(row) {
                    continue;
                }
                let t = times.value(row);
                let before = self
                    .max_event
                    .map(|m| m.saturating_sub(delay))
                    .max(self.watermark);
                if let Some(w) = before.filter(|&w| t < w) {
                    late.push((row, t, w));
                    continue;
                }
                self.max_event = Some(self.max_event.map_or(t, |m| m.max(t)));
            }
        }
        let mut batch = batch;
        let mut offsets = offsets.to_vec();
        let mut times = times.to_vec();
        if !late.is_empty() {
            let rows = row_json(&batch);
            let mut keep = vec![true; batch.num_rows()];
            let mut dead = Vec::with_capacity(late.len());
            for &(row, t, w) in &late {
                keep[row] = false;
                dead.push(DeadRow {
                    stage: super::hop::HOP.into(),
                    reason: format!(
                        "late: event time {} is behind the watermark {} of partition `{}/{}` (its newest event time before it less `watermark.delay`, {})",
                        flowgate_sdk::columns::format_millis(t),
                        flowgate_sdk::columns::format_millis(w),
                        self.key.0,
                        self.key.1,
                        flowgate_sdk::config::Duration::from_millis(delay)
                    ),
                    offset: offsets[row],
                    payload: rows.get(row).cloned().unwrap_or_default(),
                    source: None,
                });
            }
            self.count_rejected(super::hop::HOP, "late", late.len());
            self.ctx
                .counters
                .rejected
                .fetch_add(late.len() as u64, Ordering::Relaxed);
            self.dead_letter(dead, epoch)?;
            batch = arrow::compute::filter_record_batch(
                &batch,
                &arrow::array::BooleanArray::from(keep.clone()),
            )
            .map_err(|e| RunError::Internal(format!("dropping late rows: {e}")))?;
            let mut kept = keep.iter();
            offsets.retain(|_| kept.next().copied().unwrap_or(false));
            let mut kept = keep.iter();
            times.retain(|_| kept.next().copied().unwrap_or(false));
        }
        if let Some(max) = self.max_event {
            self.hand_watermark(max.saturating_sub(delay), epoch)?;
        }
        self.send_hop(out, &batch, &offsets, &times)
    }

    /// Whether the hop takes what this task sends (not while a replay catches up with it).
    fn hop_joined(&self) -> bool {
        self.ctx
            .inputs
            .iter()
            .position(|i| *i == SinkInput::Hop)
            .is_some_and(|index| self.joined[index])
    }

    /// Sends rows (or, with none, the watermark alone) to the internal topic, unless the hop
    /// already holds this stretch (a replay for other sinks).
    fn send_hop(
        &mut self,
        out: &super::hop::HopOut,
        batch: &RecordBatch,
        offsets: &[i64],
        times: &[Option<i64>],
    ) -> Result<(), RunError> {
        self.idle_sent = false;
        let Some(index) = self.ctx.inputs.iter().position(|i| *i == SinkInput::Hop) else {
            return Ok(());
        };
        if !self.joined[index] {
            return Ok(());
        }
        out.send(
            &self.key,
            batch,
            offsets,
            times,
            self.watermark,
            &mut self.sent,
        )?;
        if batch.num_rows() > 0 {
            self.count_sink_rows(index, batch.num_rows() as u64);
            self.ctx
                .counters
                .rows_out
                .fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Behind the hop: each message's rows not taken before (a restarted upstream sends copies),
    /// through every step; then the watermark of the slowest source partition heard of.
    fn process_hop(&mut self, records: Vec<Record>, last: i64, epoch: u64) -> Result<(), RunError> {
        let decoding = Instant::now();
        let schema = self.ctx.plan.stages[0].clone();
        let mut batches = Vec::new();
        let mut offsets = Vec::new();
        let mut origins: Vec<(Arc<str>, i32)> = Vec::new();
        let mut times: Vec<Option<i64>> = Vec::new();
        let mut dead = Vec::new();
        for r in &records {
            let refuse = |reason: String| DeadRow {
                stage: super::hop::HOP.into(),
                reason,
                offset: r.offset,
                payload: dead_payload(&r.payload),
                source: None,
            };
            let Some(origin) = r.origin.as_deref() else {
                dead.push(refuse(
                    "not a repartition message (no Flowgate headers): something else writes to the internal topic".into(),
                ));
                continue;
            };
            match super::hop::read_message(&r.payload) {
                Err(e) => dead.push(refuse(format!(
                    "a repartition message that does not decode: {e}"
                ))),
                Ok(None) => {}
                Ok(Some(message)) => {
                    let kept = self.sources.take(origin, &message.offsets);
                    if kept.len() < message.offsets.len() {
                        // Copies a restarted upstream sent again. A message partly copies is
                        // where a replay meets what was taken before: once per replay, so it
                        // is logged; rows lost upstream would also end up here (a later
                        // message taken first), with these offsets to find them by.
                        let first = message.offsets.first().copied().unwrap_or_default();
                        let last = message.offsets.last().copied().unwrap_or_default();
                        let dropped = message.offsets.len() - kept.len();
                        if kept.is_empty() {
                            tracing::debug!(topic = %self.key.0, partition = self.key.1, offset = r.offset, source = %format!("{}/{}", origin.topic, origin.partition), dropped, first, last, "hop: a message of copies dropped");
                        } else {
                            tracing::info!(topic = %self.key.0, partition = self.key.1, offset = r.offset, source = %format!("{}/{}", origin.topic, origin.partition), dropped, kept = kept.len(), first, last, "hop: rows at or below the newest source offset taken dropped as copies");
                        }
                    }
                    if !kept.is_empty() {
                        let rows =
                            RecordBatch::try_new(schema.clone(), message.rows.columns().to_vec())
                                .and_then(|rows| {
                                    if kept.len() == rows.num_rows() {
                                        Ok(rows)
                                    } else {
                                        arrow::compute::take_record_batch(
                                            &rows,
                                            &arrow::array::UInt32Array::from(kept.clone()),
                                        )
                                    }
                                });
                        match rows {
                            Ok(rows) => {
                                offsets.extend(kept.iter().map(|&i| message.offsets[i as usize]));
                                times.extend(kept.iter().map(|&i| message.times[i as usize]));
                                origins.extend(
                                    std::iter::repeat_n(
                                        (origin.topic.clone(), origin.partition),
                                        rows.num_rows(),
                                    ),
                                );
                                batches.push(rows);
                            }
                            Err(e) => dead.push(refuse(format!(
                                "a repartition message whose rows do not fit the pipeline's `schema` (written by another version of it?): {e}"
                            ))),
                        }
                    }
                }
            }
            self.sources.heard(origin);
        }
        self.decode_time += decoding.elapsed();
        if !dead.is_empty() {
            self.count_rejected(super::hop::HOP, "undecodable", dead.len());
            self.ctx
                .counters
                .undecodable
                .fetch_add(dead.len() as u64, Ordering::Relaxed);
        }
        self.dead_letter(dead, epoch)?;
        self.dirty = true;
        if !batches.is_empty() {
            let batch = arrow::compute::concat_batches(&schema, &batches)
                .map_err(|e| RunError::Internal(format!("repartition: {e}")))?;
            self.run_chain(batch, &offsets, &origins, epoch)?;
        }
        self.finish(&records, Some(&times), last, epoch)
    }

    /// Runs `batch` (its rows from `offsets`, of `origins` behind the hop, else of this
    /// partition) through the chain and delivers what comes out.
    fn run_chain(
        &mut self,
        batch: RecordBatch,
        offsets: &[i64],
        origins: &[(Arc<str>, i32)],
        epoch: u64,
    ) -> Result<(), RunError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let before = self.step_timings();
        let pressed = self.chain.journal_pressed();
        let output = self
            .chain
            .process(batch.clone())
            .map_err(|e| self.plugin_error(e, offsets, origins))?;
        // Asked once, when the journal crosses the mark (the checkpoint starts it over).
        if !pressed && self.chain.journal_pressed() {
            self.ctx
                .counters
                .checkpoint_now
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.observe_calls(&before);
        self.deliver(output, epoch, Some(&batch), offsets, origins)
    }

    /// The error of a plugin call on rows from `offsets` (of `origins` behind the hop), naming
    /// where those rows came from.
    fn plugin_error(
        &self,
        e: PluginError,
        offsets: &[i64],
        origins: &[(Arc<str>, i32)],
    ) -> RunError {
        let range = |offsets: &[i64]| match (offsets.iter().min(), offsets.iter().max()) {
            (Some(a), Some(b)) => format!(" (offsets {a}..={b})"),
            _ => String::new(),
        };
        let mut location = format!("partition `{}/{}`", self.key.0, self.key.1);
        if origins.is_empty() {
            location.push_str(&range(offsets));
        } else {
            let mut sources: Vec<&(Arc<str>, i32)> = origins.iter().collect();
            sources.sort();
            sources.dedup();
            for source in sources {
                let of: Vec<i64> = offsets
                    .iter()
                    .zip(origins)
                    .filter(|(_, o)| *o == source)
                    .map(|(&x, _)| x)
                    .collect();
                location.push_str(&format!(
                    ", source partition `{}/{}`{}",
                    source.0,
                    source.1,
                    range(&of)
                ));
            }
        }
        RunError::Plugin {
            location,
            source: Box::new(e),
        }
    }

    /// Hands the chain a new watermark (only ever forward) and delivers what it emits.
    pub fn hand_watermark(&mut self, ts: i64, epoch: u64) -> Result<(), RunError> {
        if self.watermark.is_some_and(|w| ts <= w) {
            return Ok(());
        }
        self.watermark = Some(ts);
        self.published.store(ts, Ordering::Relaxed);
        self.dirty = true;
        let before = self.step_timings();
        let output = self
            .chain
            .watermark(ts)
            .map_err(|e| self.plugin_error(e, &[], &[]))?;
        self.observe_calls(&before);
        self.deliver(output, epoch, None, &[], &[])
    }

    /// Sinks whose target offset is reached get the watermark they saw there, then join.
    fn reach_targets(&mut self, epoch: u64) -> Result<(), RunError> {
        while let Some(target) = self.targets.front().cloned() {
            if target.offset > self.processed {
                break;
            }
            if let Some(w) = target.watermark {
                self.hand_watermark(w, epoch)?;
            }
            self.lineage = Some(target.epoch);
            for s in &target.sinks {
                self.joined[*s] = true;
            }
            if !target.sinks.is_empty() {
                tracing::info!(topic = %self.key.0, partition = self.key.1, offset = target.offset, "replay caught up with a sink that held more; it is written again from here");
            }
            self.targets.pop_front();
        }
        Ok(())
    }

    fn stage(&self, epoch: u64, sink: usize, batch: RecordBatch) -> Result<(), RunError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.ctx
            .committer
            .send(CommitMsg::Stage(Staged { epoch, sink, batch }))
            .map_err(|_| RunError::Stopped("the committer".into()))
    }

    /// Routes a chain's output to the joined sinks and its refusals to the dead letter.
    fn deliver(
        &mut self,
        output: ChainOutput,
        epoch: u64,
        decoded: Option<&RecordBatch>,
        offsets: &[i64],
        origins: &[(Arc<str>, i32)],
    ) -> Result<(), RunError> {
        let last_stage = self.ctx.plan.stages.len() - 1;
        // Where a row that maps to no record of its own is put: the last record taken. Behind
        // the hop `offsets` are source offsets, so the internal topic's own is used.
        let at = if origins.is_empty() {
            self.processed.max(offsets.last().copied().unwrap_or(-1))
        } else {
            self.taken
        };
        let mut rows_out = 0u64;
        for (index, input) in self.ctx.inputs.iter().enumerate() {
            if !self.joined[index] {
                continue;
            }
            let SinkInput::Stage(stage) = *input else {
                continue;
            };
            let mut rows = 0u64;
            if stage == last_stage {
                for b in &output.batches {
                    rows += b.num_rows() as u64;
                    self.stage(epoch, index, b.clone())?;
                }
            } else if stage == 0 {
                if let Some(d) = decoded {
                    rows += d.num_rows() as u64;
                    self.stage(epoch, index, d.clone())?;
                }
            } else {
                for (i, b) in &output.taps {
                    if i + 1 == stage {
                        rows += b.num_rows() as u64;
                        self.stage(epoch, index, b.clone())?;
                    }
                }
            }
            if rows > 0 {
                self.count_sink_rows(index, rows);
            }
            rows_out += rows;
        }
        self.ctx
            .counters
            .rows_out
            .fetch_add(rows_out, Ordering::Relaxed);
        let first_step = self.ctx.plan.names.first();
        let mut dead = Vec::new();
        for rejected in output.rejected {
            let json = row_json(&rejected.rows);
            // Rows refused by the first step map to their records; rows refused further on (or
            // on a watermark) carry the last offset processed.
            let exact = first_step == Some(&rejected.step) && decoded.is_some();
            let late = rejected
                .reasons
                .iter()
                .filter(|r| r.starts_with("late"))
                .count();
            if late > 0 {
                self.count_rejected(&rejected.step, "late", late);
            }
            if rejected.reasons.len() > late {
                self.count_rejected(&rejected.step, "rejected", rejected.reasons.len() - late);
            }
            for ((reason, row), index) in
                rejected.reasons.into_iter().zip(json).zip(rejected.indices)
            {
                let offset = if exact {
                    offsets.get(index as usize).copied().unwrap_or(at)
                } else {
                    at
                };
                dead.push(DeadRow {
                    stage: rejected.step.clone(),
                    reason,
                    offset,
                    payload: row,
                    source: origins
                        .get(index as usize)
                        .filter(|_| exact && offsets.get(index as usize).is_some())
                        .cloned(),
                });
            }
        }
        for refused in output.refused {
            let exact = first_step == Some(&refused.step) && decoded.is_some();
            tracing::warn!(topic = %self.key.0, partition = self.key.1, step = %refused.step, "{}; batch of {} rows {}", refused.reason, refused.rows.num_rows(), if refused.policy == OnError::Skip { "skipped" } else { "sent to the dead letter" });
            if refused.policy == OnError::Skip {
                self.ctx
                    .counters
                    .rejected
                    .fetch_add(refused.rows.num_rows() as u64, Ordering::Relaxed);
                self.count_rejected(&refused.step, "skipped_batch", refused.rows.num_rows());
                continue;
            }
            self.count_rejected(&refused.step, "refused_batch", refused.rows.num_rows());
            for (i, row) in row_json(&refused.rows).into_iter().enumerate() {
                dead.push(DeadRow {
                    stage: refused.step.clone(),
                    reason: refused.reason.clone(),
                    offset: if exact {
                        offsets.get(i).copied().unwrap_or(at)
                    } else {
                        at
                    },
                    payload: row,
                    source: origins
                        .get(i)
                        .filter(|_| exact && offsets.get(i).is_some())
                        .cloned(),
                });
            }
        }
        self.ctx
            .counters
            .rejected
            .fetch_add(dead.len() as u64, Ordering::Relaxed);
        self.dead_letter(dead, epoch)
    }

    fn dead_letter(&mut self, rows: Vec<DeadRow>, epoch: u64) -> Result<(), RunError> {
        if rows.is_empty() {
            return Ok(());
        }
        let Some(index) = self
            .ctx
            .inputs
            .iter()
            .position(|i| *i == SinkInput::DeadLetter)
        else {
            tracing::warn!(topic = %self.key.0, partition = self.key.1, "{} rows refused and no `dead_letter` sink configured: first reason: {}", rows.len(), rows[0].reason);
            return Ok(());
        };
        if !self.joined[index] {
            return Ok(());
        }
        let now = chrono::Utc::now().timestamp_micros();
        let n = rows.len();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![self.ctx.pipeline.as_str(); n])),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.stage.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.reason.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter()
                    .map(|r| r.source.as_ref().map_or(&*self.key.0, |(t, _)| &**t)),
            )),
            Arc::new(Int32Array::from_iter_values(
                rows.iter()
                    .map(|r| r.source.as_ref().map_or(self.key.1, |(_, p)| *p)),
            )),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.offset))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.payload.as_str()),
            )),
            Arc::new(TimestampMicrosecondArray::from(vec![now; n]).with_timezone("UTC")),
        ];
        let batch = RecordBatch::try_new(sink::dead_letter_schema(), columns)
            .map_err(|e| RunError::Internal(format!("dead letter batch: {e}")))?;
        self.count_sink_rows(index, n as u64);
        self.stage(epoch, index, batch)
    }

    fn count_sink_rows(&self, index: usize, rows: u64) {
        if let Some(sink) = self.ctx.sink_names.get(index) {
            self.ctx
                .metrics
                .sink_rows
                .get_or_create(&SinkLabels { sink: sink.clone() })
                .inc_by(rows);
        }
    }

    /// At an epoch barrier: finish what was taken, let an idle partition's watermark follow the
    /// others', and snapshot the steps if anything changed (in a `hurry`, a full snapshot that
    /// is due waits for a later barrier, see [`crate::plugin::Chain::checkpoint`]).
    pub fn barrier(
        &mut self,
        epoch: u64,
        idle_watermark: Option<i64>,
        hurry: bool,
    ) -> Result<Option<TaskCheckpoint>, RunError> {
        self.process(epoch)?;
        match (&self.ctx.role, idle_watermark) {
            // The end of input (`end: flush`) while this partition still replays for sinks that
            // hold more: closing its windows now would give them only to the sinks that joined,
            // and the others would never get them. They stay open, as with `end: keep`.
            (Role::Whole, Some(i64::MAX)) if !self.targets.is_empty() => {
                tracing::warn!(
                    topic = %self.key.0,
                    partition = self.key.1,
                    "the input ended while this partition still replays for sinks that hold more: its windows stay open (not flushed) until a run reads it to the end"
                );
            }
            (Role::Whole, Some(w)) if w != i64::MIN => self.hand_watermark(w, epoch)?,
            // Upstream of the hop an idle partition keeps its own watermark (what it judges late
            // stays a matter of its records alone, in a replay too) and says it is idle: the
            // keyed tasks leave it out of their windows' watermark until it sends again.
            (Role::Upstream(out), Some(_)) if !self.idle_sent => {
                let out = out.clone();
                if self.hop_joined() {
                    out.idle(&self.key, self.watermark)?;
                }
                self.idle_sent = true;
            }
            // Behind the hop the watermark comes from the source partitions alone.
            _ => {}
        }
        if !self.dirty {
            // An idle partition lets go of the state saved since, too.
            self.chain.release();
            return Ok(None);
        }
        let next = crate::checkpoint::next_epoch(self.epoch, self.ctx.writer);
        let snapshotting = Instant::now();
        let snapshots = self
            .chain
            .checkpoint(next, hurry)
            .map_err(|source| RunError::Plugin {
                location: format!("partition `{}/{}`", self.key.0, self.key.1),
                source: Box::new(source),
            })?;
        self.snapshot_time += snapshotting.elapsed();
        tracing::debug!(
            topic = %self.key.0,
            partition = self.key.1,
            epoch = %crate::checkpoint::epoch_label(next),
            took_ms = snapshotting.elapsed().as_secs_f64() * 1e3,
            steps = ?snapshots.iter().map(|s| format!("{}: {} bytes{} in {:.1} ms", s.step, s.bytes.len(), if s.delta_of.is_some() { " (delta)" } else { "" }, s.took.as_secs_f64() * 1e3)).collect::<Vec<_>>(),
            "steps' state taken"
        );
        let (steps, root) = crate::plugin::StepSnapshot::stored(snapshots);
        let previous = self.lineage;
        self.epoch = next;
        self.lineage = Some(self.epoch);
        self.dirty = false;
        Ok(Some(TaskCheckpoint {
            key: self.key.clone(),
            epoch: self.epoch,
            state: PartitionState {
                offset: self.processed,
                max_event: self.max_event,
                watermark: self.watermark,
                steps,
                previous,
                sources: self.sources.marks(),
                root,
            },
            joined: self.joined.clone(),
            saved: self.saved.clone(),
        }))
    }

    /// Records how long ago `records` were appended to Kafka (they just left the last plugin),
    /// and keeps their append times until the barrier.
    fn record_latency(&mut self, times: impl Iterator<Item = Option<i64>>) {
        let now_us = chrono::Utc::now().timestamp_micros();
        let mut run: Option<(i64, u64)> = None;
        let note = |ts: i64, n: u64, this: &mut Self| {
            let age = now_us.saturating_sub(ts.saturating_mul(1000)).max(0) as u64;
            this.latency.record_n(age, n);
            *this.appended.entry(ts).or_default() += n;
        };
        for ts in times.flatten() {
            match &mut run {
                Some((t, n)) if *t == ts => *n += 1,
                _ => {
                    if let Some((t, n)) = run.replace((ts, 1)) {
                        note(t, n, self);
                    }
                }
            }
        }
        if let Some((t, n)) = run {
            note(t, n, self);
        }
    }
}

/// A partition task's answer to a swap offered at a barrier.
pub(crate) enum SwapReady {
    /// Per step of the new plan: its fresh instance, restored (`None`: carried over).
    Ready(Vec<Option<StepParts>>),
    /// Not at this barrier: the partition is still catching up with sinks that hold more.
    NotYet,
    /// The new plan cannot take this partition's state (or its steps cannot be created).
    Refused(String),
}

/// What spreads a partition's full snapshots apart from other partitions' (see
/// [`crate::plugin::Chain::stagger`]).
fn stagger_seed(key: &PartitionKey) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// Where partition `key`'s chain reads its steps' saved states back from; `saved`: the newest
/// of the task's checkpoints the committer has saved.
fn stored_states(
    ctx: &TaskContext,
    key: &PartitionKey,
    saved: &Arc<AtomicU64>,
) -> crate::plugin::StoredStates {
    crate::plugin::StoredStates {
        store: ctx.store.clone(),
        topic: key.0.to_string(),
        partition: key.1,
        saved: saved.clone(),
    }
}

/// A fresh chain of `ctx`'s plan, with the intermediate stages its sinks read tapped.
fn chain_for(ctx: &TaskContext) -> Result<crate::plugin::Chain, RunError> {
    let mut chain = ctx.plan.chain()?;
    tap_stages(ctx, &mut chain);
    Ok(chain)
}

/// Taps the intermediate stages `ctx`'s sinks read.
fn tap_stages(ctx: &TaskContext, chain: &mut crate::plugin::Chain) {
    let last_stage = ctx.plan.stages.len() - 1;
    for input in &ctx.inputs {
        if let SinkInput::Stage(s) = input
            && *s > 0
            && *s < last_stage
        {
            chain.tap(s - 1);
        }
    }
}

/// Restores `chain` from `saved` (the steps' states at checkpoint `epoch`), step by step name,
/// at a restart. A step with no saved entry (new in the pipeline) starts empty; see
/// [`restore_step`] for a plugin that refuses.
fn restore_chain(
    plan: &Plan,
    chain: &mut crate::plugin::Chain,
    saved: &[StepChain],
    epoch: u64,
    key: &PartitionKey,
) -> Result<(), RunError> {
    let names: Vec<String> = chain.steps().iter().map(|s| s.name().to_string()).collect();
    for (index, name) in names.iter().enumerate() {
        let Some(state) = saved.iter().find(|s| &s.step == name) else {
            tracing::info!(
                topic = %key.0, partition = key.1, step = %name,
                "no stored state for this step (new in the pipeline?): it starts empty"
            );
            continue;
        };
        let restored = restore_step(
            plan,
            index,
            &mut chain.steps_mut()[index],
            &state.full,
            &state.deltas,
            key,
        )?;
        if restored {
            chain.set_restored(index, state, epoch);
        }
    }
    for s in saved {
        if !names.contains(&s.step) {
            tracing::info!(topic = %key.0, partition = key.1, step = %s.step, "stored state of a step no longer in the pipeline is not used");
        }
    }
    Ok(())
}

/// Restores step `index` of `plan` (the instance `step`) from the full snapshot `full` and the
/// `deltas` after it: `true` if restored,
/// `false` if the plugin refused it and the step says `state: reset` (it starts empty, from a
/// fresh instance). A refusal otherwise is [`RunError::StateRefused`]; a trap, a timeout or the
/// memory cap while restoring is a failure, never a reason to drop state.
fn restore_step(
    plan: &Plan,
    index: usize,
    step: &mut crate::plugin::Step,
    full: &[u8],
    deltas: &[bytes::Bytes],
    key: &PartitionKey,
) -> Result<bool, RunError> {
    let restored = step.restore(full).and_then(|()| {
        deltas
            .iter()
            .try_for_each(|delta| step.restore_delta(delta))
    });
    let Err(refusal) = restored else {
        return Ok(true);
    };
    let name = step.name().to_string();
    let refused = matches!(
        &refusal,
        PluginError::Plugin {
            fault: PluginFault::BadInput(_),
            ..
        }
    );
    if !refused {
        return Err(RunError::Plugin {
            location: format!("step `{name}`, partition `{}/{}`", key.0, key.1),
            source: Box::new(refusal),
        });
    }
    if plan.state_mode(index) != StateMode::Reset {
        return Err(RunError::StateRefused {
            step: name,
            plugin: step.plugin().to_string(),
            partition: format!("{}/{}", key.0, key.1),
            reason: Box::new(refusal),
        });
    }
    tracing::warn!(
        topic = %key.0, partition = key.1, step = %name,
        "the plugin cannot restore the step's stored state ({refusal}); `state: reset`: the step starts empty"
    );
    // The refused restore may have left the instance half-changed: start from a fresh one.
    step.rebuild(None).map_err(|source| RunError::Plugin {
        location: format!("step `{name}`"),
        source: Box::new(source),
    })?;
    Ok(false)
}

/// Why `record` cannot be decoded at all, before any JSON parsing: a tombstone or a record over
/// the size limit.
fn precheck(record: &Record, max_bytes: usize) -> Option<String> {
    if record.tombstone {
        return Some(
            "a tombstone (the record's value is null): there is nothing to decode; deletes of a compacted topic do not belong in this pipeline".into(),
        );
    }
    if record.payload.len() > max_bytes {
        return Some(format!(
            "the record is {} bytes, over the limit of {max_bytes} (`batch.max_record_bytes`); the dead letter keeps its first {} bytes",
            record.payload.len(),
            DEAD_PAYLOAD_BYTES
        ));
    }
    // Bytes that are not UTF-8 are the decoder's to refuse: its fast path reads every byte of
    // the usual records anyway.
    None
}

/// The most of a refused record's bytes a dead-letter row keeps.
const DEAD_PAYLOAD_BYTES: usize = 64 << 10;

/// A refused record's bytes as dead-letter text: UTF-8 (invalid bytes as U+FFFD), cut at
/// [`DEAD_PAYLOAD_BYTES`].
fn dead_payload(payload: &[u8]) -> String {
    if payload.len() <= DEAD_PAYLOAD_BYTES {
        return String::from_utf8_lossy(payload).into_owned();
    }
    let mut text = String::from_utf8_lossy(&payload[..DEAD_PAYLOAD_BYTES]).into_owned();
    text.push_str(&format!("… [cut: {} bytes in all]", payload.len()));
    text
}

struct DeadRow {
    stage: String,
    reason: String,
    offset: i64,
    payload: String,
    /// The row's source topic and partition when not the task's own (behind the hop).
    source: Option<(Arc<str>, i32)>,
}

/// Each row of `batch` as a JSON object (a row that cannot be written still gets `{}`, so no
/// refusal is lost).
fn row_json(batch: &RecordBatch) -> Vec<String> {
    let mut rows = decode::rows_to_json(batch).unwrap_or_default();
    rows.resize(batch.num_rows(), "{}".to_string());
    rows
}

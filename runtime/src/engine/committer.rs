//! The committer thread: owns the sinks and the state store, and commits epochs in order.
//!
//! Staged batches of the epoch being assembled go straight into the sinks (which encode them
//! into files nobody reads yet); batches of later epochs wait in memory until their turn. When
//! every worker has handed in epoch `E`:
//!
//! 1. each changed partition's state is stored under its checkpoint epoch;
//! 2. every sink commits `E` atomically, recording per partition the position it now holds
//!    (offset + checkpoint epoch) — a position never moves backwards;
//! 3. the state older than every sink's position is pruned;
//! 4. the coordinator hears that `E` is committed, with the offsets to commit to Kafka.
//!
//! A crash anywhere leaves each sink at `E - 1` or `E`, with the state for both stored; the
//! restart ([`Committer::resume`]) starts from the lowest and replays for the others.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;

use super::plan::RunError;
use super::tally::{TableTally, TallyKind};
use super::task::{Resume, Target, TaskCheckpoint};
use super::{Event, PartitionKey};
use crate::checkpoint::StateStore;
use crate::exporter::{Metrics, SinkLabels};
use crate::metrics::Histogram;
use crate::sink::{Offsets, Position, Positions, Sink};

/// A batch for one sink, in one epoch.
pub(crate) struct Staged {
    pub epoch: u64,
    pub sink: usize,
    pub batch: RecordBatch,
}

/// One worker's part of an epoch.
pub(crate) struct EpochDone {
    pub epoch: u64,
    pub checkpoints: Vec<TaskCheckpoint>,
    /// Kafka append times (ms) of the records processed in the epoch, with counts.
    pub appended: HashMap<i64, u64>,
}

/// What workers and the coordinator tell the committer.
pub(crate) enum CommitMsg {
    Stage(Staged),
    EpochDone(EpochDone),
    /// Where newly assigned partitions start, from what the sinks hold.
    Resume {
        keys: Vec<PartitionKey>,
        ephemeral: bool,
        reply: Sender<Result<Vec<Resume>, RunError>>,
    },
}

/// What the committer measured, for the run report.
#[derive(Debug, Default)]
pub(crate) struct CommitterReport {
    pub sink_names: Vec<String>,
    pub sink_write: Vec<Duration>,
    pub sink_commit: Vec<Duration>,
    pub sink_encode: Vec<Duration>,
    pub state_save: Duration,
    pub checkpoints: u64,
    pub latency_to_commit: Histogram,
    /// What each sink committed.
    pub tables: Vec<TableTally>,
}

/// A test hook (`FLOWGATE_TEST_ABORT_AFTER_COMMIT=SINK:watermark|offset`): the process aborts
/// right after sink `SINK` commits an epoch in which a partition moved by its watermark alone
/// (same offset, newer checkpoint), or by its offset. The end-to-end tests use it to kill the
/// process between two sinks' commits at exactly the moment a crash test wants.
#[derive(Debug, Clone)]
struct AbortAfter {
    sink: String,
    by_offset: bool,
}

impl AbortAfter {
    fn from_env() -> Option<Self> {
        let text = std::env::var("FLOWGATE_TEST_ABORT_AFTER_COMMIT").ok()?;
        let (sink, when) = text.split_once(':')?;
        Some(AbortAfter {
            sink: sink.to_string(),
            by_offset: when == "offset",
        })
    }

    /// Aborts if `positions`, committed by `sink` over `held`, is the commit asked for.
    fn check(&self, sink: &str, positions: &Positions, held: &HashMap<PartitionKey, Position>) {
        let hit = sink == self.sink
            && positions.iter().any(|((t, p), at)| {
                held.get(&(Arc::from(t.as_str()), *p))
                    .is_some_and(|h| (h.offset != at.offset) == self.by_offset)
            });
        if hit {
            tracing::error!(
                "test hook: aborting right after sink `{sink}` committed (FLOWGATE_TEST_ABORT_AFTER_COMMIT)"
            );
            std::process::abort();
        }
    }
}

pub(crate) struct Committer {
    abort_after: Option<AbortAfter>,
    sinks: Vec<Box<dyn Sink>>,
    store: Arc<dyn StateStore>,
    workers: usize,
    reset_state: bool,
    /// Per sink: the position it holds per partition.
    held: Vec<HashMap<PartitionKey, Position>>,
    /// Per partition still replaying for sinks that hold more: the oldest epoch of its stops,
    /// kept from pruning until every sink holds the last stop's offset.
    stops: HashMap<PartitionKey, (u64, i64)>,
    /// Per partition: for the checkpoints this committer stored or read, the oldest checkpoint
    /// a restore of each reads (the full snapshots its deltas go back to): kept from pruning
    /// while a sink holds it.
    needs: HashMap<PartitionKey, BTreeMap<u64, u64>>,
    /// The lowest epoch not committed yet: its batches go into the sinks as they come.
    open: u64,
    later: BTreeMap<u64, Vec<(usize, RecordBatch)>>,
    parts: BTreeMap<u64, Vec<EpochDone>>,
    events: Sender<Event>,
    report: CommitterReport,
    metrics: Arc<Metrics>,
    /// Per sink: how its rows are counted, and the count of the open epoch's rows.
    kinds: Vec<TallyKind>,
    pending: Vec<TableTally>,
    /// Where this committer's tables show on the status page.
    board_slot: usize,
}

impl Committer {
    pub fn new(
        sinks: Vec<Box<dyn Sink>>,
        store: Arc<dyn StateStore>,
        workers: usize,
        reset_state: bool,
        events: Sender<Event>,
        metrics: Arc<Metrics>,
        kinds: Vec<TallyKind>,
    ) -> Self {
        let n = sinks.len();
        let tally = |i: usize, s: &dyn Sink| {
            TableTally::new(s.name(), kinds.get(i).copied().unwrap_or(TallyKind::Rows))
        };
        let report = CommitterReport {
            sink_names: sinks.iter().map(|s| s.name().to_string()).collect(),
            sink_write: vec![Duration::ZERO; n],
            sink_commit: vec![Duration::ZERO; n],
            sink_encode: vec![Duration::ZERO; n],
            tables: sinks
                .iter()
                .enumerate()
                .map(|(i, s)| tally(i, s.as_ref()))
                .collect(),
            ..Default::default()
        };
        let pending = sinks
            .iter()
            .enumerate()
            .map(|(i, s)| tally(i, s.as_ref()))
            .collect();
        let board_slot = metrics.board.slot();
        Committer {
            abort_after: AbortAfter::from_env(),
            held: vec![HashMap::new(); n],
            stops: HashMap::new(),
            needs: HashMap::new(),
            sinks,
            store,
            workers,
            reset_state,
            open: 1,
            later: BTreeMap::new(),
            parts: BTreeMap::new(),
            events,
            report,
            metrics,
            kinds,
            pending,
            board_slot,
        }
    }

    /// Runs until every sender is gone; errors go to the coordinator.
    pub fn run(mut self, inbox: Receiver<CommitMsg>) -> CommitterReport {
        while let Ok(msg) = inbox.recv() {
            if let Err(e) = self.handle(msg) {
                let _ = self.events.send(Event::Failed(e));
                break;
            }
        }
        for (i, sink) in self.sinks.iter().enumerate() {
            self.report.sink_encode[i] = sink.encode_time();
        }
        self.report
    }

    fn handle(&mut self, msg: CommitMsg) -> Result<(), RunError> {
        match msg {
            CommitMsg::Stage(s) if s.epoch == self.open => self.write(s.sink, s.batch),
            CommitMsg::Stage(s) => {
                self.later
                    .entry(s.epoch)
                    .or_default()
                    .push((s.sink, s.batch));
                Ok(())
            }
            CommitMsg::EpochDone(done) => {
                self.parts.entry(done.epoch).or_default().push(done);
                while self
                    .parts
                    .get(&self.open)
                    .is_some_and(|p| p.len() == self.workers)
                {
                    let parts = self.parts.remove(&self.open).unwrap_or_default();
                    self.commit(parts)?;
                    self.open += 1;
                    for (sink, batch) in self.later.remove(&self.open).unwrap_or_default() {
                        self.write(sink, batch)?;
                    }
                }
                Ok(())
            }
            CommitMsg::Resume {
                keys,
                ephemeral,
                reply,
            } => {
                let result = keys
                    .iter()
                    .map(|k| self.resume(k, ephemeral))
                    .collect::<Result<Vec<_>, _>>();
                let _ = reply.send(result);
                Ok(())
            }
        }
    }

    fn write(&mut self, sink: usize, batch: RecordBatch) -> Result<(), RunError> {
        let kind = self.kinds.get(sink).copied().unwrap_or(TallyKind::Rows);
        self.pending[sink].count(&batch, kind);
        let started = Instant::now();
        self.sinks[sink].write(batch)?;
        self.report.sink_write[sink] += started.elapsed();
        Ok(())
    }

    fn commit(&mut self, parts: Vec<EpochDone>) -> Result<(), RunError> {
        let epoch = parts.first().map_or(self.open, |p| p.epoch);
        let checkpoints: Vec<&TaskCheckpoint> =
            parts.iter().flat_map(|p| p.checkpoints.iter()).collect();
        let saving = Instant::now();
        for cp in &checkpoints {
            self.store.save(&cp.key.0, cp.key.1, cp.epoch, &cp.state)?;
            // Its chain need not hold this state any longer (it reads it back to rebuild).
            cp.saved
                .fetch_max(cp.epoch, std::sync::atomic::Ordering::Release);
            self.needs
                .entry(cp.key.clone())
                .or_default()
                .insert(cp.epoch, cp.state.needs_from(cp.epoch));
        }
        self.report.state_save += saving.elapsed();
        let mut committed_any = false;
        for (index, sink) in self.sinks.iter_mut().enumerate() {
            let mut positions = Positions::new();
            for cp in &checkpoints {
                if !cp.joined[index] {
                    continue;
                }
                let position = Position {
                    offset: cp.state.offset,
                    epoch: cp.epoch,
                };
                // A position never moves backwards: if it would, another writer owns the partition
                // now, and committing these rows would write them twice.
                if let Some(h) = self.held[index].get(&cp.key)
                    && (h.offset > position.offset || h.epoch >= position.epoch)
                {
                    return Err(RunError::Overtaken {
                        sink: sink.name().to_string(),
                        partition: format!("{}/{}", cp.key.0, cp.key.1),
                        held: h.offset,
                        held_epoch: h.epoch,
                        recorded: sink
                            .provenance(&cp.key.0, cp.key.1)
                            .map(|p| format!(", recorded by {p}"))
                            .unwrap_or_default(),
                        offset: position.offset,
                        epoch: position.epoch,
                    });
                }
                positions.insert((cp.key.0.to_string(), cp.key.1), position);
            }
            let committing = Instant::now();
            let wrote = sink.commit(&positions)?;
            let took = committing.elapsed();
            self.report.sink_commit[index] += took;
            if wrote {
                let labels = SinkLabels {
                    sink: sink.name().to_string(),
                };
                self.metrics
                    .commit
                    .get_or_create(&labels)
                    .observe(took.as_secs_f64());
                self.metrics.committed(sink.name());
            }
            committed_any |= wrote;
            if let Some(hook) = &self.abort_after
                && wrote
            {
                hook.check(sink.name(), &positions, &self.held[index]);
            }
            for ((topic, partition), position) in positions {
                self.held[index].insert((topic.as_str().into(), partition), position);
            }
        }
        // Prune state older than what every sink holds, and tell Kafka the lowest offset.
        let mut offsets = Offsets::new();
        for cp in &checkpoints {
            let held: Vec<Position> = self
                .sinks
                .iter()
                .enumerate()
                .filter(|(_, s)| s.durable())
                .filter_map(|(i, _)| self.held[i].get(&cp.key).copied())
                .collect();
            // Keep every epoch a sink still points at (during a replay the lowest offset may
            // carry the newest epoch), and the stops a replay still has to pass: a sink that
            // holds more went there through checkpoints older than the epochs the replay
            // commits meanwhile, and another crash would need them again.
            if let (Some(mut epoch), Some(offset)) = (
                held.iter().map(|p| p.epoch).min(),
                held.iter().map(|p| p.offset).min(),
            ) {
                if let Some(&(oldest, until)) = self.stops.get(&cp.key) {
                    if offset >= until {
                        self.stops.remove(&cp.key);
                    } else {
                        epoch = epoch.min(oldest);
                    }
                }
                // And the full snapshots the held checkpoints' deltas go back to.
                for p in &held {
                    epoch = epoch.min(self.needs_from(&cp.key, p.epoch)?);
                }
                self.store.prune(&cp.key.0, cp.key.1, epoch)?;
                if let Some(needs) = self.needs.get_mut(&cp.key) {
                    needs.retain(|&e, _| e >= epoch);
                }
                offsets.insert((cp.key.0.to_string(), cp.key.1), offset);
            }
        }
        let now_us = chrono::Utc::now().timestamp_micros();
        for part in &parts {
            for (ts_ms, n) in &part.appended {
                let age = now_us.saturating_sub(ts_ms.saturating_mul(1000)).max(0) as u64;
                self.report.latency_to_commit.record_n(age, *n);
            }
        }
        if committed_any {
            self.report.checkpoints += 1;
        }
        for (table, pending) in self.report.tables.iter_mut().zip(&mut self.pending) {
            let fresh = TableTally::new(&pending.name, TallyKind::Rows);
            table.add(std::mem::replace(pending, fresh));
        }
        if self.metrics.serving() {
            self.metrics
                .board
                .publish(self.board_slot, &self.report.tables);
        }
        self.metrics
            .epoch
            .set(i64::try_from(epoch).unwrap_or(i64::MAX));
        tracing::debug!(epoch, partitions = checkpoints.len(), "epoch committed");
        let _ = self.events.send(Event::Committed { epoch, offsets });
        Ok(())
    }

    /// Where partition `key` starts: from the lowest position any durable sink holds, with the
    /// state stored for it; sinks that hold more join when the replay reaches their position.
    ///
    /// The positions are read first and their state loaded after: another process committing
    /// the partition in between (its previous owner finishing, or the next one starting while
    /// this process still thinks it was given the partition) prunes the state the positions
    /// named. So a missing state counts only when the positions still read the same; when they
    /// moved, the resume starts over from the new ones.
    fn resume(&mut self, key: &PartitionKey, ephemeral: bool) -> Result<Resume, RunError> {
        let mut positions = self.positions(key)?;
        let mut attempts = 0;
        loop {
            match self.resume_from(key, ephemeral, positions.clone()) {
                Err(
                    missing @ (RunError::StateMissing { .. }
                    | RunError::Checkpoint(crate::checkpoint::CheckpointError::Broken {
                        ..
                    })),
                ) if attempts < 10 => {
                    let now = self.positions(key)?;
                    if now == positions {
                        return Err(missing);
                    }
                    tracing::info!(topic = %key.0, partition = key.1, "another process committed this partition while it was being resumed: reading its positions again");
                    positions = now;
                    attempts += 1;
                }
                other => return other,
            }
        }
    }

    /// The oldest checkpoint a restore of checkpoint `epoch` of `key` reads: the full
    /// snapshots its deltas go back to (read from the store if this committer has not seen it).
    fn needs_from(&mut self, key: &PartitionKey, epoch: u64) -> Result<u64, RunError> {
        if let Some(&n) = self.needs.get(key).and_then(|n| n.get(&epoch)) {
            return Ok(n);
        }
        let n = match self.store.load(&key.0, key.1, epoch)? {
            Some(state) => state.needs_from(epoch),
            None => epoch,
        };
        self.needs.entry(key.clone()).or_default().insert(epoch, n);
        Ok(n)
    }

    /// What each sink holds of partition `key` (`None` for sinks that are not durable).
    fn positions(&mut self, key: &PartitionKey) -> Result<Vec<Option<Position>>, RunError> {
        let mut positions: Vec<Option<Position>> = Vec::with_capacity(self.sinks.len());
        for (i, sink) in self.sinks.iter_mut().enumerate() {
            let p = if sink.durable() {
                sink.committed(&key.0, key.1)?
            } else {
                None
            };
            if let Some(p) = p {
                self.held[i].insert(key.clone(), p);
            }
            positions.push(p);
        }
        Ok(positions)
    }

    fn resume_from(
        &mut self,
        key: &PartitionKey,
        ephemeral: bool,
        positions: Vec<Option<Position>>,
    ) -> Result<Resume, RunError> {
        let n = self.sinks.len();
        let epoch = positions
            .iter()
            .flatten()
            .map(|p| p.epoch)
            .max()
            .unwrap_or(0);
        let durable: Vec<usize> = (0..n).filter(|&i| self.sinks[i].durable()).collect();
        if ephemeral || positions.iter().all(Option::is_none) {
            return Ok(Resume {
                start: -1,
                epoch,
                base: None,
                state: None,
                steps: Vec::new(),
                joined: vec![true; n],
                targets: Vec::new(),
                held: false,
            });
        }
        // The hop holds nothing of a partition other sinks hold: they were written without
        // `repartition` (or its position files are gone), and the steps' tables behind it would
        // get every record again.
        if let Some(hop) = (0..n).find(|&i| self.sinks[i].name() == super::hop::HOP)
            && positions[hop].is_none()
            && let Some((other, held)) =
                (0..n).find_map(|i| positions[i].map(|p| (self.sinks[i].name(), p)))
        {
            return Err(RunError::Config(format!(
                "partition `{}/{}`: sink `{other}` holds it up to offset {}, but the repartition hop holds nothing of it: the tables were written without `repartition` (or the hop's position files in the checkpoint store are gone), and the tables behind the hop would get every record again. Give the sinks new table paths (and a new checkpoint folder) to start them with the hop, or remove `repartition`",
                key.0, key.1, held.offset
            )));
        }
        // A durable sink that holds nothing starts the replay from the beginning.
        let lowest = durable.iter().map(|&i| positions[i]).min().flatten();
        let (start, mut state) = match lowest {
            Some(p) => (p.offset, self.load_for(key, p)?),
            None => (-1, None),
        };
        // Each step's state as a restore needs it: deltas followed back to full snapshots (the
        // bytes move out of `state`, whose other fields the task still reads).
        let mut steps = Vec::new();
        if let (Some(s), Some(p)) = (&mut state, lowest) {
            let saved = std::mem::take(&mut s.steps);
            match crate::checkpoint::resolve(self.store.as_ref(), &key.0, key.1, p.epoch, saved) {
                Ok(resolved) => steps = resolved,
                // The rest of the state (watermark, lineage, source marks) still holds.
                Err(e) if self.reset_state => {
                    tracing::warn!(topic = %key.0, partition = key.1, "{e}: steps start empty (--reset-state)");
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut joined = vec![false; n];
        let mut by_position: BTreeMap<Position, Vec<usize>> = BTreeMap::new();
        for i in 0..n {
            match positions[i] {
                Some(p) if Some(p) != lowest => by_position.entry(p).or_default().push(i),
                _ => joined[i] = true,
            }
        }
        // Every checkpoint between the start and a sink ahead is a stop of the replay: the
        // first run handed the chain that checkpoint's watermark at that offset (an idle
        // partition following the others', say), so the replay hands it there too, and late
        // records are judged as they were.
        let floor = lowest.map(|p| p.epoch);
        let mut stops: BTreeMap<Position, Target> = BTreeMap::new();
        for (p, sinks) in by_position {
            tracing::info!(topic = %key.0, partition = key.1, from = start, to = p.offset, sinks = ?sinks.iter().map(|&i| self.sinks[i].name().to_string()).collect::<Vec<_>>(), "some sinks hold more of this partition than others: replaying for the others");
            let saved = self.load_for(key, p)?;
            stops
                .entry(p)
                .or_insert_with(|| Target {
                    offset: p.offset,
                    epoch: p.epoch,
                    watermark: saved.as_ref().and_then(|s| s.watermark),
                    sinks: Vec::new(),
                })
                .sinks
                .extend(sinks);
            // The checkpoints that position went on from, back to where the replay starts.
            let mut at = saved.and_then(|s| s.previous);
            let mut steps = 0;
            while let Some(epoch) = at.filter(|&e| Some(e) != floor && steps < 10_000) {
                let Some(earlier) = self.store.load(&key.0, key.1, epoch)? else {
                    break;
                };
                if earlier.offset < start {
                    break;
                }
                stops
                    .entry(Position {
                        offset: earlier.offset,
                        epoch,
                    })
                    .or_insert_with(|| Target {
                        offset: earlier.offset,
                        epoch,
                        watermark: earlier.watermark,
                        sinks: Vec::new(),
                    });
                at = earlier.previous;
                steps += 1;
            }
        }
        let targets: Vec<Target> = stops.into_values().collect();
        match (
            targets.iter().map(|t| t.epoch).min(),
            targets.iter().map(|t| t.offset).max(),
        ) {
            (Some(oldest), Some(until)) => {
                self.stops.insert(key.clone(), (oldest, until));
            }
            _ => {
                self.stops.remove(key);
            }
        }
        if start >= 0 {
            tracing::info!(topic = %key.0, partition = key.1, "resuming after offset {start}, as the sinks hold (checkpoint epoch {})", crate::checkpoint::epoch_label(floor.unwrap_or(0)));
        }
        Ok(Resume {
            start,
            epoch,
            base: lowest.filter(|_| state.is_some()).map(|p| p.epoch),
            state,
            steps,
            joined,
            targets,
            held: true,
        })
    }

    /// The state stored for position `p` of partition `key`: it must be there (unless
    /// `--reset-state`), and cover exactly the offset the sink holds; a state of another offset
    /// under that name was written by another process.
    fn load_for(
        &mut self,
        key: &PartitionKey,
        p: Position,
    ) -> Result<Option<crate::checkpoint::PartitionState>, RunError> {
        let loaded = match self.store.load(&key.0, key.1, p.epoch) {
            Err(e) if self.reset_state => {
                tracing::warn!(topic = %key.0, partition = key.1, "{e}");
                None
            }
            other => other?,
        };
        match loaded {
            Some(s) if s.offset == p.offset => {
                self.needs
                    .entry(key.clone())
                    .or_default()
                    .insert(p.epoch, s.needs_from(p.epoch));
                Ok(Some(s))
            }
            Some(s) if self.reset_state => {
                tracing::warn!(topic = %key.0, partition = key.1, offset = p.offset, stored = s.offset, epoch = p.epoch, "the plugin state stored for this position covers another offset: steps start empty (--reset-state)");
                Ok(None)
            }
            Some(s) => Err(RunError::StateMismatch {
                topic: key.0.to_string(),
                partition: key.1,
                offset: p.offset,
                epoch: crate::checkpoint::epoch_label(p.epoch),
                stored: s.offset,
            }),
            None if self.reset_state => {
                tracing::warn!(topic = %key.0, partition = key.1, offset = p.offset, epoch = p.epoch, "no plugin state stored for this position: steps start empty (--reset-state)");
                Ok(None)
            }
            None => Err(RunError::StateMissing {
                topic: key.0.to_string(),
                partition: key.1,
                offset: p.offset,
                epoch: p.epoch,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, mpsc};

    use super::*;
    use crate::checkpoint::{FileStateStore, PartitionState, next_epoch};
    use crate::sink::SinkError;

    /// A sink that keeps its committed positions where the test can read them.
    struct Table {
        name: String,
        held: Arc<Mutex<Positions>>,
    }

    impl Sink for Table {
        fn name(&self) -> &str {
            &self.name
        }
        fn write(&mut self, _batch: RecordBatch) -> Result<(), SinkError> {
            Ok(())
        }
        fn commit(&mut self, positions: &Positions) -> Result<bool, SinkError> {
            let mut held = self.held.lock().unwrap();
            held.extend(positions.iter().map(|(k, p)| (k.clone(), *p)));
            Ok(!positions.is_empty())
        }
        fn committed(
            &mut self,
            topic: &str,
            partition: i32,
        ) -> Result<Option<Position>, SinkError> {
            Ok(self
                .held
                .lock()
                .unwrap()
                .get(&(topic.to_string(), partition))
                .copied())
        }
    }

    fn state(offset: i64) -> PartitionState {
        PartitionState {
            offset,
            max_event: None,
            watermark: None,
            steps: Vec::new(),
            previous: None,
            sources: Vec::new(),
            root: None,
        }
    }

    /// Two sinks holding partition `t/0` at the positions given, the state for both stored.
    fn committer(
        dir: &std::path::Path,
        at: [Position; 2],
    ) -> (Committer, [Arc<Mutex<Positions>>; 2], mpsc::Receiver<Event>) {
        let store = FileStateStore::new(dir, "p");
        let tables: [Arc<Mutex<Positions>>; 2] = Default::default();
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        for (i, p) in at.iter().enumerate() {
            store.save("t", 0, p.epoch, &state(p.offset)).unwrap();
            tables[i].lock().unwrap().insert(("t".into(), 0), *p);
            sinks.push(Box::new(Table {
                name: format!("s{i}"),
                held: tables[i].clone(),
            }));
        }
        let (events, inbox) = mpsc::channel();
        let metrics = Arc::new(Metrics::new("p"));
        let committer = Committer::new(
            sinks,
            Arc::new(store),
            1,
            false,
            events,
            metrics,
            Vec::new(),
        );
        (committer, tables, inbox)
    }

    fn epoch_done(epoch: u64, cp_epoch: u64, offset: i64, joined: Vec<bool>) -> CommitMsg {
        CommitMsg::EpochDone(EpochDone {
            epoch,
            checkpoints: vec![TaskCheckpoint {
                saved: Default::default(),
                key: ("t".into(), 0),
                epoch: cp_epoch,
                state: state(offset),
                joined,
            }],
            appended: HashMap::new(),
        })
    }

    fn held(table: &Arc<Mutex<Positions>>) -> Position {
        table.lock().unwrap()[&("t".to_string(), 0)]
    }

    /// A sink whose position moves between reads, as when another process commits the
    /// partition while this one resumes it: each `committed` answers the next position.
    struct Moving {
        answers: Mutex<std::collections::VecDeque<Position>>,
    }

    impl Sink for Moving {
        fn name(&self) -> &str {
            "moving"
        }
        fn write(&mut self, _batch: RecordBatch) -> Result<(), SinkError> {
            Ok(())
        }
        fn commit(&mut self, positions: &Positions) -> Result<bool, SinkError> {
            Ok(!positions.is_empty())
        }
        fn committed(
            &mut self,
            _topic: &str,
            _partition: i32,
        ) -> Result<Option<Position>, SinkError> {
            let mut answers = self.answers.lock().unwrap();
            let answer = answers.front().copied();
            if answers.len() > 1 {
                answers.pop_front();
            }
            Ok(answer)
        }
    }

    fn moving_committer(dir: &std::path::Path, answers: &[Position]) -> Committer {
        let (events, _inbox) = mpsc::channel();
        Committer::new(
            vec![Box::new(Moving {
                answers: Mutex::new(answers.iter().copied().collect()),
            })],
            Arc::new(FileStateStore::new(dir, "p")),
            1,
            false,
            events,
            Arc::new(Metrics::new("p")),
            Vec::new(),
        )
    }

    #[test]
    fn a_resume_that_races_another_processes_commit_reads_the_positions_again() {
        // The sink held epoch 4 of the other process when this one read it; that process then
        // committed epoch 5 and pruned 4's state before this one loaded it.
        let dir = tempfile::tempdir().unwrap();
        let (tag, other) = (0x0000_0a0a, 0x0035_3e07);
        let four = Position {
            offset: 2083,
            epoch: next_epoch(next_epoch(next_epoch(next_epoch(0, tag), tag), tag), other),
        };
        let five = Position {
            offset: 2200,
            epoch: next_epoch(four.epoch, tag),
        };
        let store = FileStateStore::new(dir.path(), "p");
        store.save("t", 0, five.epoch, &state(five.offset)).unwrap();
        let mut committer = moving_committer(dir.path(), &[four, five]);
        let resume = committer.resume(&("t".into(), 0), false).unwrap();
        assert_eq!(resume.start, 2200);
        assert_eq!(resume.state.map(|s| s.offset), Some(2200));

        // Positions that stay where they were with no state behind them: the state is gone.
        let mut committer = moving_committer(dir.path(), &[four]);
        let missing = committer.resume(&("t".into(), 0), false);
        assert!(
            matches!(missing, Err(RunError::StateMissing { offset: 2083, .. })),
            "{:?}",
            missing.err()
        );
    }

    #[test]
    fn a_sink_that_holds_more_is_never_moved_back_while_the_other_replays() {
        let dir = tempfile::tempdir().unwrap();
        let ahead = Position {
            offset: 239_046,
            epoch: 9,
        };
        let behind = Position {
            offset: 176_025,
            epoch: 7,
        };
        let (mut committer, tables, _events) = committer(dir.path(), [ahead, behind]);
        let resume = committer.resume(&("t".into(), 0), false).unwrap();
        assert_eq!(
            resume.start, 176_025,
            "the replay starts at the lowest position"
        );
        assert_eq!(resume.joined, vec![false, true]);
        assert_eq!(resume.targets.len(), 1);
        assert_eq!(
            (resume.targets[0].offset, &resume.targets[0].sinks),
            (239_046, &vec![0])
        );

        // An epoch of the replay below the target: only the sink behind records it.
        committer
            .handle(epoch_done(1, 10, 200_000, vec![false, true]))
            .unwrap();
        assert_eq!(held(&tables[0]), ahead);
        assert_eq!(
            held(&tables[1]),
            Position {
                offset: 200_000,
                epoch: 10
            }
        );
        // Past the target both do.
        committer
            .handle(epoch_done(2, 11, 250_000, vec![true, true]))
            .unwrap();
        assert_eq!(
            held(&tables[0]),
            Position {
                offset: 250_000,
                epoch: 11
            }
        );
        assert_eq!(
            held(&tables[1]),
            Position {
                offset: 250_000,
                epoch: 11
            }
        );
    }

    #[test]
    fn a_position_that_would_move_back_stops_the_run_without_committing() {
        let dir = tempfile::tempdir().unwrap();
        let at = Position {
            offset: 239_046,
            epoch: 9,
        };
        let (mut committer, tables, _events) = committer(dir.path(), [at, at]);
        committer.resume(&("t".into(), 0), false).unwrap();
        let refused = committer.handle(epoch_done(1, 10, 176_025, vec![true, true]));
        let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("another process of the consumer group owns the partition now"),
            "{message}"
        );
        assert_eq!(held(&tables[0]), at);
        assert_eq!(held(&tables[1]), at);
    }

    #[test]
    fn a_replay_hands_every_watermark_the_first_run_handed_on_the_way_to_a_sink_ahead() {
        // The first run: checkpoint A at offset 100; the partition then sat idle and followed the
        // others' watermark (checkpoint B, same offset, watermark 9000); records came, and
        // checkpoint C at offset 150. A kill after each `bars` commit left `raw` at A and `bars`
        // at C. Replaying from A, the chain must get B's watermark at offset 100, or the records
        // after it are judged against an older watermark than the first run judged them.
        let dir = tempfile::tempdir().unwrap();
        let tag = 0x00c0ffee;
        let a = next_epoch(0, tag);
        let b = next_epoch(a, tag);
        let c = next_epoch(b, tag);
        let (mut committer, _tables, _events) = committer(
            dir.path(),
            [
                Position {
                    offset: 150,
                    epoch: c,
                },
                Position {
                    offset: 100,
                    epoch: a,
                },
            ],
        );
        let saved = |offset, watermark, previous| PartitionState {
            watermark: Some(watermark),
            previous,
            ..state(offset)
        };
        committer
            .store
            .save("t", 0, a, &saved(100, 1000, None))
            .unwrap();
        committer
            .store
            .save("t", 0, b, &saved(100, 9000, Some(a)))
            .unwrap();
        committer
            .store
            .save("t", 0, c, &saved(150, 9100, Some(b)))
            .unwrap();
        // A state of another writer, never committed anywhere: not a stop.
        let stray = next_epoch(a, 0x0000_0001);
        committer
            .store
            .save("t", 0, stray, &saved(120, 99_999, Some(a)))
            .unwrap();
        let resume = committer.resume(&("t".into(), 0), false).unwrap();
        assert_eq!((resume.start, resume.base), (100, Some(a)));
        let stops: Vec<(i64, u64, Option<i64>, Vec<usize>)> = resume
            .targets
            .iter()
            .map(|t| (t.offset, t.epoch, t.watermark, t.sinks.clone()))
            .collect();
        assert_eq!(
            stops,
            vec![(100, b, Some(9000), vec![]), (150, c, Some(9100), vec![0])]
        );
    }

    #[test]
    fn a_member_that_lost_its_partition_never_overwrites_the_new_owners_state() {
        use crate::sink::{DeltaOptions, DeltaSink, TableShape};
        use arrow::datatypes::{DataType, Field, Schema};
        let dir = tempfile::tempdir().unwrap();
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
        );
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let table = dir.path().join("table");
        let store = Arc::new(FileStateStore::new(&dir.path().join("state"), "p"));
        let member = |rt: &Arc<tokio::runtime::Runtime>| {
            let shape = TableShape::new("t", &schema, &[], None, None).unwrap();
            let options = DeltaOptions {
                partition_by: Vec::new(),
                target_file_size: 1 << 20,
                schema_mode: crate::config::SchemaMode::Strict,
                maintenance: None,
            };
            let sink = DeltaSink::open(
                "t",
                crate::storage::TableLocation::folder(&table).unwrap(),
                "p",
                shape,
                options,
                rt.clone(),
            )
            .unwrap();
            let (events, inbox) = mpsc::channel();
            let committer = Committer::new(
                vec![Box::new(sink)],
                store.clone(),
                1,
                false,
                events,
                Arc::new(Metrics::new("p")),
                Vec::new(),
            );
            (committer, inbox)
        };
        let key: PartitionKey = ("t".into(), 0);
        let checkpoint = |epoch, cp_epoch, offset| {
            CommitMsg::EpochDone(EpochDone {
                epoch,
                checkpoints: vec![TaskCheckpoint {
                    saved: Default::default(),
                    key: key.clone(),
                    epoch: cp_epoch,
                    state: state(offset),
                    joined: vec![true],
                }],
                appended: HashMap::new(),
            })
        };
        // The partition's first owner commits offset 10.
        let (mut first, _e0) = member(&rt);
        first.resume(&key, false).unwrap();
        let e1 = next_epoch(0, 0x0000_0a0a);
        first.handle(checkpoint(1, e1, 10)).unwrap();
        // Two members resume it from there: B, then (after B froze past its session) A.
        let (mut b, _eb) = member(&rt);
        let (mut a, _ea) = member(&rt);
        assert_eq!(b.resume(&key, false).unwrap().epoch, e1);
        assert_eq!(a.resume(&key, false).unwrap().epoch, e1);
        // A commits its next checkpoint at offset 20; B thaws and tries its own at offset 30.
        let (tag_a, tag_b) = (0x0000_00aa, 0x0000_00bb);
        a.handle(checkpoint(1, next_epoch(e1, tag_a), 20)).unwrap();
        let refused = b.handle(checkpoint(1, next_epoch(e1, tag_b), 30));
        assert!(refused.is_err(), "the table refuses B's commit");
        // Whoever resumes next gets A's state for what the table holds.
        let (mut next, _en) = member(&rt);
        let resume = next.resume(&key, false).unwrap();
        assert_eq!(resume.start, 20);
        assert_eq!(
            resume.state.map(|s| s.offset),
            Some(20),
            "A's state, not B's"
        );
    }

    #[test]
    fn the_stops_a_replay_still_has_to_pass_are_not_pruned_under_it() {
        // Sink 0 went to offset 150 through checkpoints at 110..140 (one of them an idle
        // watermark); sink 1 is back at 100. The replay's first checkpoint (offset 110) is
        // numbered after all of them: pruning by "older than every sink's epoch" alone would
        // delete the stops at 120..140, which a second crash needs again.
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (0x0000_0aaa, 0x0000_0bbb);
        let mut lineage = vec![next_epoch(0, old)];
        for _ in 0..5 {
            let last = *lineage.last().unwrap();
            lineage.push(next_epoch(last, old));
        }
        let (start, ahead) = (lineage[0], lineage[5]);
        let (mut committer, _tables, _events) = committer(
            dir.path(),
            [
                Position {
                    offset: 150,
                    epoch: ahead,
                },
                Position {
                    offset: 100,
                    epoch: start,
                },
            ],
        );
        for (i, &epoch) in lineage.iter().enumerate() {
            let saved = PartitionState {
                watermark: Some(1000 * i as i64),
                previous: (i > 0).then(|| lineage[i - 1]),
                ..state(100 + 10 * i as i64)
            };
            committer.store.save("t", 0, epoch, &saved).unwrap();
        }
        let resume = committer.resume(&("t".into(), 0), false).unwrap();
        assert_eq!(resume.targets.len(), 5, "stops at 110..150");
        let replayed = next_epoch(ahead, new);
        committer
            .handle(epoch_done(1, replayed, 110, vec![false, true]))
            .unwrap();
        for &epoch in &lineage[1..] {
            assert!(
                committer.store.load("t", 0, epoch).unwrap().is_some(),
                "stop {} pruned",
                crate::checkpoint::epoch_label(epoch)
            );
        }
        // Once every sink holds the last stop, they go.
        let caught_up = next_epoch(replayed, new);
        committer
            .handle(epoch_done(2, caught_up, 160, vec![true, true]))
            .unwrap();
        committer
            .handle(epoch_done(
                3,
                next_epoch(caught_up, new),
                170,
                vec![true, true],
            ))
            .unwrap();
        assert!(committer.store.load("t", 0, lineage[2]).unwrap().is_none());
    }

    #[test]
    fn the_full_snapshot_held_deltas_go_back_to_is_not_pruned_and_a_resume_reads_it() {
        use crate::checkpoint::StepState;
        let dir = tempfile::tempdir().unwrap();
        let w = 0x0000_0ccc;
        let first = next_epoch(0, w);
        let (mut committer, tables, _events) = committer(
            dir.path(),
            [
                Position {
                    offset: 100,
                    epoch: first,
                },
                Position {
                    offset: 100,
                    epoch: first,
                },
            ],
        );
        let step = |state: &[u8], delta_of: Option<u64>| StepState {
            step: "dedup".into(),
            snapshot: bytes::Bytes::copy_from_slice(state),
            delta_of,
        };
        committer
            .store
            .save(
                "t",
                0,
                first,
                &PartitionState {
                    steps: vec![step(b"full", None)],
                    ..state(100)
                },
            )
            .unwrap();
        committer.resume(&("t".into(), 0), false).unwrap();
        // Three checkpoints of deltas, each on top of the one before, back to `first`.
        let mut epoch = first;
        for (i, offset) in [110, 120, 130].into_iter().enumerate() {
            let next = next_epoch(epoch, w);
            committer
                .handle(CommitMsg::EpochDone(EpochDone {
                    epoch: i as u64 + 1,
                    checkpoints: vec![TaskCheckpoint {
                        saved: Default::default(),
                        key: ("t".into(), 0),
                        epoch: next,
                        state: PartitionState {
                            steps: vec![step(format!("d{offset}").as_bytes(), Some(epoch))],
                            root: Some(first),
                            ..state(offset)
                        },
                        joined: vec![true, true],
                    }],
                    appended: HashMap::new(),
                }))
                .unwrap();
            epoch = next;
        }
        assert_eq!(held(&tables[0]).offset, 130);
        assert!(
            committer.store.load("t", 0, first).unwrap().is_some(),
            "the full snapshot the held deltas need was pruned"
        );
        // A restart now restores the full snapshot and every delta, in order.
        let resume = committer.resume(&("t".into(), 0), false).unwrap();
        assert_eq!(resume.start, 130);
        assert_eq!(resume.steps.len(), 1);
        assert_eq!(resume.steps[0].full, &b"full"[..]);
        assert_eq!(
            resume.steps[0].deltas,
            vec![&b"d110"[..], &b"d120"[..], &b"d130"[..]]
        );
    }
}

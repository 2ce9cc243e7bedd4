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
}

pub(crate) struct Committer {
    sinks: Vec<Box<dyn Sink>>,
    store: Arc<dyn StateStore>,
    workers: usize,
    reset_state: bool,
    /// Per sink: the position it holds per partition.
    held: Vec<HashMap<PartitionKey, Position>>,
    /// The lowest epoch not committed yet: its batches go into the sinks as they come.
    open: u64,
    later: BTreeMap<u64, Vec<(usize, RecordBatch)>>,
    parts: BTreeMap<u64, Vec<EpochDone>>,
    events: Sender<Event>,
    report: CommitterReport,
    metrics: Arc<Metrics>,
}

impl Committer {
    pub fn new(
        sinks: Vec<Box<dyn Sink>>,
        store: Arc<dyn StateStore>,
        workers: usize,
        reset_state: bool,
        events: Sender<Event>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let n = sinks.len();
        let report = CommitterReport {
            sink_names: sinks.iter().map(|s| s.name().to_string()).collect(),
            sink_write: vec![Duration::ZERO; n],
            sink_commit: vec![Duration::ZERO; n],
            sink_encode: vec![Duration::ZERO; n],
            ..Default::default()
        };
        Committer {
            held: vec![HashMap::new(); n],
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
                    return Err(RunError::Internal(format!(
                        "sink `{}`: partition `{}/{}` is held at offset {} (epoch {}), past this process's offset {} (epoch {}): another process owns it; stopping without committing",
                        sink.name(),
                        cp.key.0,
                        cp.key.1,
                        h.offset,
                        h.epoch,
                        position.offset,
                        position.epoch
                    )));
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
            // carry the newest epoch).
            if let (Some(epoch), Some(offset)) = (
                held.iter().map(|p| p.epoch).min(),
                held.iter().map(|p| p.offset).min(),
            ) {
                self.store.prune(&cp.key.0, cp.key.1, epoch)?;
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
        self.metrics
            .epoch
            .set(i64::try_from(epoch).unwrap_or(i64::MAX));
        tracing::debug!(epoch, partitions = checkpoints.len(), "epoch committed");
        let _ = self.events.send(Event::Committed { epoch, offsets });
        Ok(())
    }

    /// Where partition `key` starts: from the lowest position any durable sink holds, with the
    /// state stored for it; sinks that hold more join when the replay reaches their position.
    fn resume(&mut self, key: &PartitionKey, ephemeral: bool) -> Result<Resume, RunError> {
        let n = self.sinks.len();
        let mut positions: Vec<Option<Position>> = Vec::with_capacity(n);
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
        let epoch = positions
            .iter()
            .flatten()
            .map(|p| p.epoch)
            .max()
            .unwrap_or(0);
        let durable: Vec<usize> = (0..n).filter(|&i| self.sinks[i].durable()).collect();
        if ephemeral || positions.iter().all(Option::is_none) {
            if ephemeral {
                tracing::info!(topic = %key.0, partition = key.1, "the embedded broker starts empty: this partition starts fresh, whatever the tables hold");
            }
            return Ok(Resume {
                start: -1,
                epoch,
                state: None,
                joined: vec![true; n],
                targets: Vec::new(),
                held: false,
            });
        }
        // A durable sink that holds nothing starts the replay from the beginning.
        let lowest = durable.iter().map(|&i| positions[i]).min().flatten();
        let load = |p: Position,
                    this: &Self|
         -> Result<Option<crate::checkpoint::PartitionState>, RunError> {
            let loaded = match this.store.load(&key.0, key.1, p.epoch) {
                Err(e) if this.reset_state => {
                    tracing::warn!(topic = %key.0, partition = key.1, "{e}");
                    None
                }
                other => other?,
            };
            match loaded {
                Some(s) => Ok(Some(s)),
                None if this.reset_state => {
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
        };
        let (start, state) = match lowest {
            Some(p) => (p.offset, load(p, self)?),
            None => (-1, None),
        };
        let mut joined = vec![false; n];
        let mut by_position: BTreeMap<Position, Vec<usize>> = BTreeMap::new();
        for i in 0..n {
            match positions[i] {
                Some(p) if Some(p) != lowest => by_position.entry(p).or_default().push(i),
                _ => joined[i] = true,
            }
        }
        let mut targets = Vec::new();
        for (p, sinks) in by_position {
            let watermark = load(p, self)?.and_then(|s| s.watermark);
            tracing::info!(topic = %key.0, partition = key.1, from = start, to = p.offset, sinks = ?sinks.iter().map(|&i| self.sinks[i].name().to_string()).collect::<Vec<_>>(), "some sinks hold more of this partition than others: replaying for the others");
            targets.push(Target {
                offset: p.offset,
                watermark,
                sinks,
            });
        }
        if start >= 0 {
            tracing::info!(topic = %key.0, partition = key.1, "resuming after offset {start}, as the sinks hold (checkpoint epoch {epoch})");
        }
        Ok(Resume {
            start,
            epoch,
            state,
            joined,
            targets,
            held: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, mpsc};

    use super::*;
    use crate::checkpoint::{FileStateStore, PartitionState};
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
        let committer = Committer::new(sinks, Arc::new(store), 1, false, events, metrics);
        (committer, tables, inbox)
    }

    fn epoch_done(epoch: u64, cp_epoch: u64, offset: i64, joined: Vec<bool>) -> CommitMsg {
        CommitMsg::EpochDone(EpochDone {
            epoch,
            checkpoints: vec![TaskCheckpoint {
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
        assert!(message.contains("another process owns it"), "{message}");
        assert_eq!(held(&tables[0]), at);
        assert_eq!(held(&tables[1]), at);
    }
}

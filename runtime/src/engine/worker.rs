//! A worker thread: hosts some partition tasks and runs them. WASM calls are CPU work, so they
//! run here, never on an async reactor. A worker takes messages from the coordinator in order:
//! records, barriers, partitions opened and closed. At a barrier it finishes every task's batch,
//! snapshots them and hands the epoch to the committer, then goes on with the next epoch while
//! the committer commits this one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

use super::committer::{CommitMsg, EpochDone};
use super::plan::RunError;
use super::task::{PartitionTask, Resume, SwapReady, TaskContext};
use super::{Event, PartitionKey};
use crate::metrics::Histogram;
use crate::plugin::StepTimings;
use crate::source::Record;

/// What the coordinator tells a worker.
pub(crate) enum WorkerMsg {
    /// Start a task for a newly assigned partition.
    Open {
        key: PartitionKey,
        resume: Box<Resume>,
        watermark: Arc<AtomicI64>,
    },
    /// Records of one partition, in offset order.
    Records(PartitionKey, Vec<Record>),
    /// Close epoch `epoch`: finish, snapshot, hand it to the committer. `idle` partitions get
    /// the watermark given. With `swap`, then prepare every task's chain of the new plan and
    /// answer whether all could take their state; a [`WorkerMsg::Switch`] follows.
    Barrier {
        epoch: u64,
        idle: HashMap<PartitionKey, i64>,
        swap: Option<SwapOffer>,
    },
    /// The coordinator's decision on the swap offered at the last barrier: `true` puts the
    /// prepared chains in place, `false` drops them (the old plan runs on).
    Switch(bool),
    /// Drop a partition's task (its last epoch is committed; it moved elsewhere).
    Close(PartitionKey),
}

/// A new plan's task context, offered at a barrier (a live swap).
pub(crate) struct SwapOffer {
    pub ctx: Arc<TaskContext>,
    /// Per step of the new plan: the index of the old step carried over as it is (same plugin,
    /// config and input schema), or `None` for a fresh instance restored from the old state.
    pub carry: Arc<Vec<Option<usize>>>,
    /// The worker's answer, once every task has its new chain ready or one cannot.
    pub reply: Sender<SwapAnswer>,
}

/// A swap's new context, carry map and, per partition, its prepared steps, until the decision.
type Prepared = (
    Arc<TaskContext>,
    Arc<Vec<Option<usize>>>,
    HashMap<PartitionKey, Vec<Option<crate::plugin::StepParts>>>,
);

/// A worker's answer to a [`SwapOffer`].
#[derive(Debug)]
pub(crate) enum SwapAnswer {
    Ready,
    /// A partition is still catching up after a restart: offer it again at a later barrier.
    NotYet,
    Refused(String),
}

/// What a worker measured, for the run report.
#[derive(Debug, Default)]
pub(crate) struct WorkerReport {
    pub decode: Duration,
    /// Taking the steps' states at barriers (whole or deltas).
    pub snapshot: Duration,
    /// Per step name, in the order first seen (steps of swapped-out plans included).
    pub steps: Vec<(String, StepTimings)>,
    pub latency_to_output: Histogram,
}

impl WorkerReport {
    fn retire(&mut self, task: &PartitionTask) {
        self.decode += task.decode_time;
        self.snapshot += task.snapshot_time;
        self.latency_to_output.merge(&task.latency);
        self.add_steps(task.timings());
    }

    fn add_steps(&mut self, timings: Vec<(String, StepTimings)>) {
        for (name, t) in timings {
            let at = match self.steps.iter().position(|(n, _)| *n == name) {
                Some(at) => at,
                None => {
                    self.steps.push((name, StepTimings::default()));
                    self.steps.len() - 1
                }
            };
            let sum = &mut self.steps[at].1;
            sum.calls += t.calls;
            sum.rows_in += t.rows_in;
            sum.total += t.total;
            sum.host_boundary += t.host_boundary;
        }
    }
}

/// Runs worker `index` until its channel closes; errors go to the coordinator.
pub(crate) fn run_worker(
    index: usize,
    ctx: Arc<TaskContext>,
    inbox: Receiver<WorkerMsg>,
    events: Sender<Event>,
) -> WorkerReport {
    let mut report = WorkerReport::default();
    let mut tasks: HashMap<PartitionKey, PartitionTask> = HashMap::new();
    if let Err(e) = work(ctx, &inbox, &mut tasks, &mut report) {
        tracing::debug!(worker = index, "worker stopped: {e}");
        let _ = events.send(Event::Failed(e));
    }
    for task in tasks.values() {
        report.retire(task);
    }
    report
}

fn work(
    mut ctx: Arc<TaskContext>,
    inbox: &Receiver<WorkerMsg>,
    tasks: &mut HashMap<PartitionKey, PartitionTask>,
    report: &mut WorkerReport,
) -> Result<(), RunError> {
    // The epoch staged output belongs to until the next barrier.
    let mut epoch = 1u64;
    // A swap's new context and its chains, prepared at a barrier until the decision comes.
    let mut prepared: Option<Prepared> = None;
    loop {
        let msg = match inbox.try_recv() {
            Ok(msg) => Ok(msg),
            Err(TryRecvError::Disconnected) => return Ok(()),
            Err(TryRecvError::Empty) => {
                // Nothing more of the input is ready: batches whose linger is over go now
                // (with the default of 0, every pending batch). Under load records queue up
                // while a batch is processed, so batches grow with the load on their own.
                let now = Instant::now();
                for task in tasks.values_mut() {
                    if task.quiet_at().is_some_and(|t| t <= now) {
                        task.process(epoch)?;
                    }
                }
                let next = tasks.values().filter_map(PartitionTask::quiet_at).min();
                let wait = next.map_or(Duration::from_millis(100), |t| {
                    t.saturating_duration_since(Instant::now())
                });
                inbox.recv_timeout(wait)
            }
        };
        match msg {
            Ok(WorkerMsg::Open {
                key,
                resume,
                watermark,
            }) => {
                let task =
                    PartitionTask::open(ctx.clone(), key.clone(), *resume, watermark, epoch)?;
                tasks.insert(key, task);
            }
            Ok(WorkerMsg::Records(key, records)) => {
                if let Some(task) = tasks.get_mut(&key) {
                    task.take(records, epoch)?;
                }
            }
            Ok(WorkerMsg::Barrier {
                epoch: closing,
                idle,
                swap,
            }) => {
                let mut checkpoints = Vec::new();
                let mut appended = HashMap::new();
                for (key, task) in tasks.iter_mut() {
                    // A swap holds input back until this barrier is done: a full snapshot
                    // that is due waits for the next one.
                    let hurry = swap.is_some();
                    if let Some(cp) = task.barrier(closing, idle.get(key).copied(), hurry)? {
                        checkpoints.push(cp);
                    }
                    task.report_memory();
                    for (ts, n) in task.appended.drain() {
                        *appended.entry(ts).or_insert(0u64) += n;
                    }
                }
                ctx.committer
                    .send(CommitMsg::EpochDone(EpochDone {
                        epoch: closing,
                        checkpoints,
                        appended,
                    }))
                    .map_err(|_| RunError::Stopped("the committer".into()))?;
                epoch = closing + 1;
                if let Some(offer) = swap {
                    let mut chains = HashMap::new();
                    let mut answer = SwapAnswer::Ready;
                    for (key, task) in tasks.iter_mut() {
                        match task.prepare_swap(&offer.ctx, &offer.carry)? {
                            SwapReady::Ready(fresh) => {
                                chains.insert(key.clone(), fresh);
                            }
                            SwapReady::NotYet => answer = SwapAnswer::NotYet,
                            SwapReady::Refused(why) => {
                                answer = SwapAnswer::Refused(why);
                                break;
                            }
                        }
                    }
                    if matches!(answer, SwapAnswer::Ready) {
                        prepared = Some((offer.ctx.clone(), offer.carry.clone(), chains));
                    }
                    let _ = offer.reply.send(answer);
                }
            }
            Ok(WorkerMsg::Switch(commit)) => {
                if let Some((next, carry, mut chains)) = prepared.take()
                    && commit
                {
                    for (key, task) in tasks.iter_mut() {
                        if let Some(fresh) = chains.remove(key) {
                            report.add_steps(task.switch(next.clone(), fresh, &carry)?);
                        }
                    }
                    ctx = next;
                }
            }
            Ok(WorkerMsg::Close(key)) => {
                if let Some(task) = tasks.remove(&key) {
                    task.forget_metrics();
                    report.retire(&task);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
        // A batch whose oldest record waited `max_wait` goes even while more input keeps coming.
        let now = Instant::now();
        for task in tasks.values_mut() {
            if task.due_at().is_some_and(|t| t <= now) {
                task.process(epoch)?;
            }
        }
    }
}

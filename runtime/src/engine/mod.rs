//! The engine: how records move from the source to committed tables.
//!
//! ```text
//! source thread (coordinator) ── poll ──▶ records per partition ──▶ worker threads
//!    │  rebalance: assign at the sinks' offsets / finish and commit on revoke
//!    │  every `checkpoint.interval`: cut epoch E ── Barrier(E) ──▶ every worker
//! worker: partition tasks (batch ▸ decode ▸ plugin chain ▸ stage output for sinks, epoch E)
//!    │  at Barrier(E): finish, snapshot changed tasks ── EpochDone(E) ──▶ committer
//! committer thread: sinks stage E's rows as they come; when every worker handed in E:
//!    state → every sink commits E with its positions → Kafka offsets (back on the source thread)
//! ```
//!
//! Modules: [`plan`] (what runs: steps, schemas, sinks, options), [`task`] (one partition's
//! work), [`worker`] (a thread of tasks), [`committer`] (epochs into sinks, and where partitions
//! resume). This file is the coordinator: the source loop, routing, epochs and rebalances.

mod committer;
mod fresh;
mod hop;
pub mod plan;
mod swap;
pub mod tally;
mod task;
mod worker;

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use hop::Origin;
pub(crate) use plan::check_sink;
pub use plan::{Plan, Reload, RunError, RunOptions, RunSummary};
pub use swap::SwapRecord;

use crate::checkpoint::{FileStateStore, ObjectStateStore, StateStore};
use crate::config::{Pipeline, SourceKind};
use crate::decode::JsonDecoder;
use crate::exporter::{Metrics, PartitionLabels};
use crate::metrics::StageTime;
use crate::sink::{Offsets, SinkError};
use crate::source::{
    EmbeddedBroker, FileSource, Generator, KafkaSource, Pace, Rebalance, Record, Source, StartAt,
};
use committer::{CommitMsg, Committer, CommitterReport};
use swap::Candidate;
use task::{Resume, SinkInput, TaskContext};
use worker::{SwapAnswer, SwapOffer, WorkerMsg, WorkerReport};

/// How a swap offered at a barrier ended.
enum SwapOutcome {
    /// Every partition runs the new steps; `commit_wait` of the pause went to committing the
    /// epoch before the swap.
    Switched {
        epoch: u64,
        commit_wait: Duration,
    },
    /// A partition is still catching up after a restart: offered again at the next barrier.
    NotYet,
    Refused {
        epoch: u64,
        why: String,
    },
}

/// A source partition: topic and partition number.
pub(crate) type PartitionKey = (Arc<str>, i32);

/// Counts every thread adds to, read by the progress line and the summary.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub records: AtomicU64,
    pub undecodable: AtomicU64,
    pub rejected: AtomicU64,
    pub rows_out: AtomicU64,
    /// A worker's chain journals so much for poison isolation that the next checkpoint should
    /// come now rather than at the interval (see [`crate::plugin::JOURNAL_CHECKPOINT`]).
    pub checkpoint_now: AtomicBool,
}

/// What workers and the committer tell the coordinator.
pub(crate) enum Event {
    /// Epoch `epoch` is committed in every sink; `offsets` go to Kafka.
    Committed { epoch: u64, offsets: Offsets },
    /// A thread failed; the run stops with this error.
    Failed(RunError),
}

/// Runs a thread's body; a panic there becomes a failed run instead of a coordinator waiting
/// forever for an epoch the thread will never hand in.
fn guarded<T: Default>(thread: &str, events: &mpsc::Sender<Event>, body: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            let _ = events.send(Event::Failed(RunError::Internal(format!(
                "the {thread} thread panicked: {message} (a bug in Flowgate: please report it with the log; what no sink committed is read again on restart)"
            ))));
            T::default()
        }
    }
}

/// The coordinator's view of one assigned partition.
struct Slot {
    worker: usize,
    /// The task's watermark (`i64::MIN`: none yet), for idle partitions to follow.
    watermark: Arc<AtomicI64>,
    last_record: Instant,
    /// The next offset the source will hand out.
    next: i64,
}

/// Routing state, shared by the source loop and the rebalance callbacks (which run inside
/// `poll`, on the same thread, while the loop does not hold the lock).
struct Router {
    workers: Vec<SyncSender<WorkerMsg>>,
    slots: HashMap<PartitionKey, Slot>,
    committer: SyncSender<CommitMsg>,
    events: Receiver<Event>,
    /// The epoch being assembled: staged output belongs to it until its barrier.
    epoch: u64,
    /// Offsets committed to the sinks and not yet to Kafka.
    to_kafka: Offsets,
    committed: u64,
    failed: Option<RunError>,
    ephemeral: bool,
    /// Set once the run is over: a rebalance while the consumer closes does nothing.
    closed: bool,
    /// The tasks' context as of the last swap (`None` once the run is over: it holds a sender
    /// to the committer, which ends when every sender is gone).
    ctx: Option<Arc<TaskContext>>,
}

impl Router {
    fn send(&self, worker: usize, msg: WorkerMsg) -> Result<(), RunError> {
        self.workers[worker]
            .send(msg)
            .map_err(|_| RunError::Stopped(format!("worker {worker}")))
    }

    /// Cuts the current epoch: every worker gets the barrier; idle partitions follow the others'
    /// watermark. Returns the epoch cut.
    fn cut(&mut self, idle: HashMap<PartitionKey, i64>) -> Result<u64, RunError> {
        self.barrier(idle, |_| None)
    }

    /// Sends every worker the barrier of the current epoch (with `offer(worker)`'s swap, if any)
    /// and the idle watermarks of its partitions; the next epoch begins. Returns the epoch cut.
    fn barrier(
        &mut self,
        idle: HashMap<PartitionKey, i64>,
        offer: impl Fn(usize) -> Option<SwapOffer>,
    ) -> Result<u64, RunError> {
        let epoch = self.epoch;
        for w in 0..self.workers.len() {
            let idle = idle
                .iter()
                .filter(|(k, _)| self.slots.get(*k).is_some_and(|s| s.worker == w))
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            let swap = offer(w);
            self.send(w, WorkerMsg::Barrier { epoch, idle, swap })?;
        }
        self.epoch += 1;
        Ok(epoch)
    }

    /// Cuts the current epoch and swaps the plan there (see [`swap`]): every worker checkpoints
    /// the epoch with its old chains, then prepares new ones; they switch only if all could, and
    /// only once the epoch is committed in every sink, so a crash never replays a record from
    /// before the swap through the new steps.
    fn cut_and_swap(
        &mut self,
        idle: HashMap<PartitionKey, i64>,
        ctx: Arc<TaskContext>,
        carry: Arc<Vec<Option<usize>>>,
    ) -> Result<SwapOutcome, RunError> {
        let (reply, answers) = mpsc::channel();
        let epoch = self.barrier(idle, |_| {
            Some(SwapOffer {
                ctx: ctx.clone(),
                carry: carry.clone(),
                reply: reply.clone(),
            })
        })?;
        drop(reply);
        let (mut refused, mut later) = (None, false);
        for _ in 0..self.workers.len() {
            match answers.recv() {
                Ok(SwapAnswer::Ready) => {}
                Ok(SwapAnswer::NotYet) => later = true,
                Ok(SwapAnswer::Refused(why)) => {
                    refused.get_or_insert(why);
                }
                Err(_) => return Err(self.failure("a worker stopped during a live swap")),
            }
        }
        let go = refused.is_none() && !later;
        let committing = Instant::now();
        if go {
            self.drain(Some(epoch))?;
        }
        let commit_wait = committing.elapsed();
        for w in 0..self.workers.len() {
            self.send(w, WorkerMsg::Switch(go))?;
        }
        Ok(match refused {
            Some(why) => SwapOutcome::Refused { epoch, why },
            None if later => SwapOutcome::NotYet,
            None => {
                self.ctx = Some(ctx);
                SwapOutcome::Switched { epoch, commit_wait }
            }
        })
    }

    /// The error a failed thread reported (it may still be on its way), else `fallback`.
    fn failure(&mut self, fallback: &str) -> RunError {
        match self.explain(RunError::Stopped(String::new())) {
            RunError::Stopped(_) => RunError::Internal(fallback.into()),
            e => e,
        }
    }

    /// `error`, or when it only says that another thread is gone ([`RunError::Stopped`]), why
    /// that thread stopped: its report may still be on its way (a thread that panics reports
    /// after its channels closed). Waits for it at most 10 s; committed epochs seen meanwhile
    /// are kept.
    fn explain(&mut self, error: RunError) -> RunError {
        if !matches!(error, RunError::Stopped(_)) {
            return error;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::Failed(RunError::Stopped(_))) => {}
                Ok(Event::Failed(e)) => return e,
                Ok(Event::Committed { epoch, offsets }) => {
                    self.committed = self.committed.max(epoch);
                    self.to_kafka.extend(offsets);
                }
                Err(_) => return error,
            }
        }
    }

    /// Takes the events waiting; with `until`, blocks until that epoch is committed.
    fn drain(&mut self, until: Option<u64>) -> Result<(), RunError> {
        loop {
            let event = match until {
                Some(e) if self.committed < e => self.events.recv().map_err(|_| {
                    RunError::Internal("every worker and the committer stopped".into())
                })?,
                _ => match self.events.try_recv() {
                    Ok(ev) => ev,
                    Err(_) => return Ok(()),
                },
            };
            match event {
                Event::Committed { epoch, offsets } => {
                    self.committed = self.committed.max(epoch);
                    self.to_kafka.extend(offsets);
                }
                Event::Failed(e) => return Err(self.explain(e)),
            }
        }
    }

    fn assign(&mut self, parts: &[(String, i32)]) -> Result<Vec<StartAt>, RunError> {
        // A rebalance may give this member nothing new (cooperative assignment): no round trip.
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<PartitionKey> = parts
            .iter()
            .map(|(t, p)| (Arc::from(t.as_str()), *p))
            .collect();
        let (reply, answer) = mpsc::channel();
        self.committer
            .send(CommitMsg::Resume {
                keys: keys.clone(),
                ephemeral: self.ephemeral,
                reply,
            })
            .map_err(|_| RunError::Stopped("the committer".into()))?;
        let resumes: Vec<Resume> = answer
            .recv()
            .map_err(|_| RunError::Stopped("the committer".into()))??;
        let mut starts = Vec::new();
        for (key, resume) in keys.into_iter().zip(resumes) {
            // The least loaded worker takes it.
            let mut load = vec![0usize; self.workers.len()];
            for s in self.slots.values() {
                load[s.worker] += 1;
            }
            let worker = (0..load.len()).min_by_key(|&w| load[w]).unwrap_or(0);
            if resume.start >= 0 && !self.ephemeral {
                // The group learns where the sinks stand (lag tools read the group's offsets;
                // a new group that takes over has none of its own yet).
                self.to_kafka
                    .entry((key.0.to_string(), key.1))
                    .or_insert(resume.start);
            }
            starts.push(if resume.start >= 0 {
                StartAt::Offset(resume.start + 1)
            } else if resume.held {
                StartAt::Beginning
            } else {
                StartAt::Stored
            });
            let watermark = Arc::new(AtomicI64::new(i64::MIN));
            self.slots.insert(
                key.clone(),
                Slot {
                    worker,
                    watermark: watermark.clone(),
                    last_record: Instant::now(),
                    next: resume.start + 1,
                },
            );
            tracing::debug!(topic = %key.0, partition = key.1, worker, "partition opened");
            self.send(
                worker,
                WorkerMsg::Open {
                    key,
                    resume: Box::new(resume),
                    watermark,
                },
            )?;
        }
        Ok(starts)
    }

    /// Finishes and commits everything, then closes the `parts` tasks.
    fn revoke(&mut self, parts: &[(String, i32)]) -> Result<Offsets, RunError> {
        let epoch = self.cut(HashMap::new())?;
        self.drain(Some(epoch))?;
        let mut offsets = Offsets::new();
        for (topic, partition) in parts {
            let key: PartitionKey = (Arc::from(topic.as_str()), *partition);
            if let Some(slot) = self.slots.remove(&key) {
                self.send(slot.worker, WorkerMsg::Close(key))?;
                tracing::info!(
                    topic,
                    partition,
                    "flushed and committed the revoked partition before giving it up"
                );
            }
            // Committed to Kafka here, before the partition moves; never again from the loop,
            // where it could overwrite the new owner's offset.
            if let Some(o) = self.to_kafka.remove(&(topic.clone(), *partition)) {
                offsets.insert((topic.clone(), *partition), o);
            }
        }
        Ok(offsets)
    }
}

/// The rebalance handler the source calls; errors are kept for the loop to return.
struct Rebalancer(Arc<Mutex<Router>>);

fn lock(router: &Mutex<Router>) -> std::sync::MutexGuard<'_, Router> {
    router.lock().unwrap_or_else(|p| p.into_inner())
}

impl Rebalance for Rebalancer {
    fn assigned(&self, partitions: &[(String, i32)]) -> Vec<StartAt> {
        let mut router = lock(&self.0);
        if router.failed.is_some() || router.closed {
            return vec![StartAt::Stored; partitions.len()];
        }
        match router.assign(partitions) {
            Ok(starts) => starts,
            Err(e) => {
                let e = router.explain(e);
                tracing::debug!("opening assigned partitions failed: {e}");
                router.failed = Some(e);
                vec![StartAt::Stored; partitions.len()]
            }
        }
    }

    fn lost(&self, partitions: &[(String, i32)]) {
        self.lost_partitions(partitions);
    }

    fn revoked(&self, partitions: &[(String, i32)]) -> Offsets {
        let mut router = lock(&self.0);
        if router.failed.is_some() || router.closed {
            return Offsets::new();
        }
        match router.revoke(partitions) {
            Ok(offsets) => offsets,
            Err(e) => {
                let e = router.explain(e);
                tracing::debug!("finishing revoked partitions failed: {e}");
                router.failed = Some(e);
                Offsets::new()
            }
        }
    }
}

impl Rebalancer {
    fn lost_partitions(&self, partitions: &[(String, i32)]) {
        let mut router = lock(&self.0);
        if router.failed.is_some() || router.closed {
            return;
        }
        let names: Vec<String> = partitions.iter().map(|(t, p)| format!("{t}/{p}")).collect();
        router.failed = Some(RunError::PartitionsLost(names.join(", ")));
    }
}

/// The embedded broker and the generator feeding it, started once for a run (both halves of a
/// repartitioned pipeline use it).
struct Embedded {
    _generator: Option<Generator>,
    _broker: EmbeddedBroker,
    bootstrap: String,
}

/// Starts the embedded broker if the pipeline runs on it, with the internal repartition topic
/// beside the source topic.
fn start_embedded(pipeline: &Pipeline, pace: &Arc<Pace>) -> Result<Option<Embedded>, RunError> {
    let spec = &pipeline.spec;
    let (topic, generator) = match spec.source.kind() {
        Some(SourceKind::Kafka(k, g)) if k.brokers.is_embedded() => {
            let topics = k
                .topics
                .clone()
                .or_else(|| k.topic.clone().map(|t| vec![t]))
                .unwrap_or_default();
            (topics.first().cloned().unwrap_or_else(|| "ticks".into()), g)
        }
        Some(SourceKind::Generator(g)) => (g.topic.clone(), Some(g)),
        _ => return Ok(None),
    };
    let broker = EmbeddedBroker::start(&topic, 3)?;
    if let Some(hop) = &spec.repartition {
        broker.create_topic(&hop.topic_of(&spec.name), hop.partitions.unwrap_or(3))?;
    }
    let bootstrap = broker.bootstrap();
    let generator = match generator {
        Some(g) => Some(Generator::start(g, &bootstrap, &topic, pace.clone())?),
        None => {
            tracing::warn!(
                "the embedded broker has no generator feeding it: add a `generator:` block to `source`"
            );
            None
        }
    };
    Ok(Some(Embedded {
        _generator: generator,
        _broker: broker,
        bootstrap,
    }))
}

/// The source of one half of a run.
struct OpenSource {
    source: Box<dyn Source>,
    /// The generator's pacing, for the half that reads the topic it feeds.
    pace: Option<Arc<Pace>>,
}

fn open_source(
    pipeline: &Pipeline,
    shared: &Shared,
    role: &task::Role,
) -> Result<OpenSource, RunError> {
    let spec = &pipeline.spec;
    let keyed = matches!(role, task::Role::Keyed(_));
    let pace = (!keyed).then(|| shared.pace.clone());
    let source: Box<dyn Source> = match spec.source.kind() {
        None => {
            return Err(RunError::Config(
                "`source`: give one of `kafka`, `file`, `generator`".into(),
            ));
        }
        Some(SourceKind::File(f)) => Box::new(FileSource::open(&pipeline.resolve(&f.path))?),
        Some(SourceKind::Kafka(k, _)) => {
            let bootstrap = match (&shared.embedded, k.brokers.is_embedded()) {
                (Some(b), true) => b.clone(),
                _ => k.brokers.bootstrap(),
            };
            // The embedded broker keeps the 10 ms fetch wait too: like Tansu, librdkafka's mock
            // cluster holds a fetch for the whole wait even when data is there (100 ms put the
            // generator's append → last plugin p50 at 60-90 ms in the bench's latency part).
            let mut source = KafkaSource::open(k, &bootstrap)?;
            if shared.embedded.is_some() {
                source = source.ephemeral();
            }
            source = match role {
                task::Role::Keyed(_) => source.reading_hop(),
                task::Role::Upstream(_) => source.keyless_ok(),
                task::Role::Whole => source,
            };
            Box::new(source)
        }
        Some(SourceKind::Generator(g)) => {
            let bootstrap = shared.embedded.clone().unwrap_or_default();
            let kafka = crate::config::KafkaSpec {
                brokers: crate::config::Brokers::One(bootstrap.clone()),
                topic: Some(g.topic.clone()),
                topics: None,
                group: format!("flowgate-{}", spec.name),
                start: crate::config::StartFrom::Earliest,
                options: Default::default(),
                connect_timeout: flowgate_sdk::config::Duration::from_millis(30_000),
                keyless: crate::config::Keyless::Allow,
            };
            Box::new(KafkaSource::open(&kafka, &bootstrap)?.ephemeral())
        }
    };
    Ok(OpenSource { source, pace })
}

fn millis(d: flowgate_sdk::config::Duration) -> Duration {
    Duration::from_millis(d.as_millis().max(1) as u64)
}

/// What the halves of a run share: the I/O runtime, live metrics, the checkpoint store, the
/// stop signal, and the embedded broker.
struct Shared {
    rt: Arc<tokio::runtime::Runtime>,
    metrics: Arc<Metrics>,
    store: Arc<dyn StateStore>,
    /// Ctrl+C / SIGTERM (or the caller's shutdown).
    stop: Arc<AtomicBool>,
    /// This attempt ends (one half failed, so the other stops too).
    halt: AtomicBool,
    pace: Arc<Pace>,
    /// The embedded broker's address, when the pipeline runs on it.
    embedded: Option<String>,
}

/// Runs `pipeline` until `shutdown` resolves (or `options` say so); everything read is
/// committed before it returns. `main` passes Ctrl+C / SIGTERM; tests pass what they like.
///
/// A pipeline with `repartition` runs as two halves (see [`hop`]): the upstream half reads the
/// source topic and writes the internal one; the keyed half reads that and runs the steps. When
/// the upstream half stops (its `--max-records` or `--until-idle`), the keyed half reads what is
/// left in its partitions of the internal topic, then stops too.
pub fn run(
    pipeline: &Pipeline,
    host: &crate::plugin::PluginHost,
    options: &RunOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<RunSummary, RunError> {
    let spec = &pipeline.spec;
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| RunError::Config(format!("cannot start the I/O runtime: {e}")))?,
    );
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        rt.spawn(async move {
            shutdown.await;
            stop.store(true, Ordering::Relaxed);
        });
    }
    let metrics = Arc::new(Metrics::new(&spec.name));
    metrics.board.set_graph(crate::status::graph(spec));
    if let Some(m) = &spec.metrics
        && !m.listen.is_empty()
    {
        let listen = m.listen.parse().map_err(|_| {
            RunError::Config(format!(
                "`metrics.listen`: `{}` is not an address",
                m.listen
            ))
        })?;
        let bound = crate::exporter::serve(listen, metrics.clone(), &rt).map_err(|e| {
            RunError::Config(format!(
                "`metrics.listen`: cannot listen on {}: {e}",
                m.listen
            ))
        })?;
        tracing::info!(
            "status page at http://{bound}/ (metrics at /metrics, and /healthz, /readyz)"
        );
    }
    let store = state_store(pipeline, &rt)?;
    if fresh::ephemeral(pipeline) {
        fresh::start_anew(pipeline, store.as_ref(), &rt)?;
    }
    let pace = Arc::new(Pace::default());
    let embedded = start_embedded(pipeline, &pace)?;
    let shared = Shared {
        rt,
        metrics,
        store,
        stop,
        halt: AtomicBool::new(false),
        pace,
        embedded: embedded.as_ref().map(|e| e.bootstrap.clone()),
    };
    let Some(hop_spec) = &spec.repartition else {
        return rejoining(&shared, || {
            let half = Half {
                role: task::Role::Whole,
                drain: None,
            };
            run_half(pipeline, host, options, &shared, half)
        });
    };
    let bootstrap = match (&shared.embedded, spec.source.kind()) {
        (Some(b), _) => b.clone(),
        (None, Some(SourceKind::Kafka(k, _))) => k.brokers.bootstrap(),
        _ => {
            return Err(RunError::Config(
                "`repartition` needs a `kafka` source".into(),
            ));
        }
    };
    let Some(SourceKind::Kafka(kafka, _)) = spec.source.kind() else {
        return Err(RunError::Config(
            "`repartition` needs a `kafka` source".into(),
        ));
    };
    let connect = Duration::from_millis(kafka.connect_timeout.as_millis().max(1000) as u64);
    let topic = hop_spec.topic_of(&spec.name);
    // The keyed tasks close windows only once every source partition sent its watermark.
    let sources = if shared.embedded.is_some() {
        // The embedded broker has the first topic, with 3 partitions (`start_embedded`).
        let first = kafka
            .topics
            .as_ref()
            .and_then(|t| t.first().cloned())
            .or_else(|| kafka.topic.clone())
            .unwrap_or_else(|| "ticks".into());
        (0..3).map(|p| (Arc::from(first.as_str()), p)).collect()
    } else {
        hop::source_partitions(&bootstrap, kafka, connect)?
    };
    let wanted = hop_spec.partitions.unwrap_or_else(|| {
        let mut per_topic: HashMap<&str, i32> = HashMap::new();
        for (t, _) in &sources {
            *per_topic.entry(t).or_default() += 1;
        }
        per_topic.values().copied().max().unwrap_or(1)
    });
    let partitions = if shared.embedded.is_some() {
        hop_spec.partitions.unwrap_or(3)
    } else {
        let retention = Duration::from_millis(hop_spec.retention.as_millis().max(0) as u64);
        hop::ensure_topic(&bootstrap, &topic, wanted, retention, connect)?
    };
    let decoded = crate::decode::to_schema(&spec.schema);
    let (upstream, keyed) = hop::halves(pipeline, &bootstrap);
    tracing::info!(
        "repartition: records of `{}` are keyed by {:?} into `{topic}` ({partitions} partitions, consumer group `{}`), where the steps run",
        kafka.topic.clone().unwrap_or_default(),
        hop_spec.by,
        hop::keyed_group(&kafka.group)
    );
    let sources = Arc::new(sources);
    rejoining(&shared, || {
        // A producer of its own per attempt: one a failed attempt left failing stays behind.
        let out = Arc::new(hop::HopOut::open(
            &bootstrap,
            &topic,
            partitions,
            &hop_spec.by,
            &decoded,
            &kafka.options,
        )?);
        run_hop(&upstream, &keyed, &out, &sources, host, options, &shared)
    })
}

/// Runs `attempt` again while it ends with the group having moved this process's partitions to
/// another member (it was unresponsive past its session: a GC-like stall, a frozen VM, a broker
/// that lost track of it): what it had not committed of them is left behind, and a new attempt
/// rejoins the group and resumes every partition from what the sinks hold, as a restart would,
/// without leaving the process to an orchestrator. Any other end (and a stop) is returned.
fn rejoining(
    shared: &Shared,
    mut attempt: impl FnMut() -> Result<RunSummary, RunError>,
) -> Result<RunSummary, RunError> {
    // Attempts that end this way within a minute of their start, in a row: past the limit the
    // cause is not a passing one (two deployments sharing one table and group, say).
    let mut quick = 0;
    loop {
        shared.halt.store(false, Ordering::Relaxed);
        let started = Instant::now();
        let moved = |e: &RunError| {
            matches!(
                e,
                // The group moved the partitions on while this process was unresponsive, or
                // another process committed a partition past this one (the group moved it, or
                // handed it here before its last owner's final commit landed).
                RunError::PartitionsLost(_)
                    | RunError::Overtaken { .. }
                    | RunError::Sink(SinkError::Overtaken { .. })
            )
        };
        match attempt() {
            // Stopping anyway: what it read of the other partitions is committed; the moved
            // ones are their new owner's. Not a failure of this process.
            Err(e) if moved(&e) && shared.stop.load(Ordering::Relaxed) => {
                tracing::warn!(
                    "{e}; stopping as asked: the partitions it still held are committed, the moved ones are their new owner's"
                );
                return Ok(RunSummary::default());
            }
            Err(e) if moved(&e) => {
                quick = if started.elapsed() < Duration::from_secs(60) {
                    quick + 1
                } else {
                    0
                };
                if quick > REJOINS {
                    tracing::error!(
                        "rejoined the group {REJOINS} times in a row, each within a minute of the last: giving up"
                    );
                    return Err(e);
                }
                tracing::warn!(
                    "{e}; nothing of it was committed here (it is the partition's owner's to write): rejoining the group, every partition resumes from what the sinks hold"
                );
            }
            other => return other,
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// How many quick rejoins in a row [`rejoining`] makes before it gives up.
const REJOINS: u32 = 10;

/// How many messages (a partition's share of one poll, up to `batch.max_records` records, or a
/// barrier) wait for a worker before the source thread waits instead. A few keep the worker
/// busy; more only hold records in memory (64 held a million ticks, ~200 MB, in a file run).
const WORKER_QUEUE: usize = 4;

/// How many messages (a staged batch for one sink, an epoch handed in, a resume) wait for the
/// committer before the workers wait instead: enough for a few batches of every sink.
const COMMIT_QUEUE: usize = 64;

/// One attempt at both halves of a repartitioned pipeline, side by side.
fn run_hop(
    upstream: &Pipeline,
    keyed: &Pipeline,
    out: &Arc<hop::HopOut>,
    sources: &Arc<Vec<PartitionKey>>,
    host: &crate::plugin::PluginHost,
    options: &RunOptions,
    shared: &Shared,
) -> Result<RunSummary, RunError> {
    let drain = Arc::new(AtomicBool::new(false));
    std::thread::scope(|scope| {
        let keyed_options = RunOptions {
            max_records: None,
            until_idle: None,
            ..options.clone()
        };
        let drain_signal = drain.clone();
        let keyed_half = std::thread::Builder::new()
            .name("flowgate-keyed".into())
            .spawn_scoped(scope, move || {
                let half = Half {
                    role: task::Role::Keyed(sources.clone()),
                    drain: Some(drain_signal),
                };
                let result = run_half(keyed, host, &keyed_options, shared, half);
                if result.is_err() {
                    // The upstream half stops too (what it read is committed; a restart goes
                    // on from there).
                    shared.halt.store(true, Ordering::Relaxed);
                }
                result
            })
            .map_err(|e| RunError::Internal(format!("cannot start the keyed half: {e}")))?;
        let upstream_options = RunOptions {
            reload: None,
            ..options.clone()
        };
        let half = Half {
            role: task::Role::Upstream(out.clone()),
            drain: None,
        };
        let up = run_half(upstream, host, &upstream_options, shared, half);
        // Whatever the upstream half left in the internal topic is read before the keyed half
        // stops (or it stops at once on Ctrl+C, with the stop signal both share).
        drain.store(true, Ordering::Relaxed);
        if up.is_err() {
            shared.halt.store(true, Ordering::Relaxed);
        }
        let down = keyed_half
            .join()
            .map_err(|_| RunError::Internal("the keyed half panicked".into()))?;
        match (up, down) {
            (Ok(up), Ok(down)) => Ok(RunSummary::merge(up, down)),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    })
}

/// Which half of a run, and how the keyed half learns that the upstream half is done.
struct Half {
    role: task::Role,
    /// Set once nothing more will be written to the internal topic: stop when caught up.
    drain: Option<Arc<AtomicBool>>,
}

/// Runs one half of a pipeline (or all of one without a hop): plan, sinks, workers, committer
/// and the source loop, until the loop stops; everything read is committed before it returns.
fn run_half(
    pipeline: &Pipeline,
    host: &crate::plugin::PluginHost,
    options: &RunOptions,
    shared: &Shared,
    half: Half,
) -> Result<RunSummary, RunError> {
    let Half { role, drain } = half;
    let spec = &pipeline.spec;
    let baseline = options
        .reload
        .as_ref()
        .map(|_| swap::Baseline::of(pipeline));
    let plan = Arc::new(Plan::build(pipeline, host)?);
    let baseline = baseline.map(|b| b.settle(pipeline));
    let (rt, metrics, store, stop) = (&shared.rt, &shared.metrics, &shared.store, &shared.stop);
    let rt = rt.clone();
    // Every table is checked before any is opened: a sink that does not fit stops the run
    // before another (a Delta schema merge, a table created) has changed anything.
    let dead_letter_schema = crate::sink::dead_letter_schema();
    for (name, s) in spec.sinks.iter() {
        let stage = plan.stage_of(s.from.as_deref());
        plan::check_sink(pipeline, name, s, &plan.stages[stage], &rt)?;
    }
    if let Some(d) = &spec.dead_letter {
        plan::check_sink(pipeline, "dead_letter", d, &dead_letter_schema, &rt)?;
    }
    // Sinks in config order, then the dead letter.
    let mut sinks = Vec::new();
    for (name, s) in spec.sinks.iter() {
        let stage = plan.stage_of(s.from.as_deref());
        sinks.push(plan::open_sink(
            pipeline,
            name,
            s,
            &plan.stages[stage],
            &rt,
        )?);
    }
    let mut inputs = sink_inputs(pipeline, &plan);
    if let task::Role::Upstream(out) = &role {
        sinks.push(Box::new(hop::HopSink::new(out.clone(), store.clone())));
        inputs.insert(sinks.len() - 1, task::SinkInput::Hop);
    }
    if let Some(d) = &spec.dead_letter {
        sinks.push(plan::open_sink(
            pipeline,
            "dead_letter",
            d,
            &dead_letter_schema,
            &rt,
        )?);
    }
    let workers = spec.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let (events_tx, events) = mpsc::channel();
    let (commit_tx, commit_rx) = mpsc::sync_channel(COMMIT_QUEUE);
    let sink_names: Vec<String> = sinks.iter().map(|s| s.name().to_string()).collect();
    // The chain's output is counted per key for the summary; other tables by rows.
    let kinds = inputs
        .iter()
        .map(|input| match input {
            task::SinkInput::Stage(s) if *s == plan.stages.len() - 1 => tally::TallyKind::Keyed,
            task::SinkInput::Stage(_) => tally::TallyKind::Rows,
            task::SinkInput::DeadLetter => tally::TallyKind::DeadLetter,
            task::SinkInput::Hop => tally::TallyKind::Hidden,
        })
        .collect();
    let committer = Committer::new(
        sinks,
        store.clone(),
        workers,
        options.reset_state,
        events_tx.clone(),
        metrics.clone(),
        kinds,
    );
    let committer_events = events_tx.clone();
    let committer_thread = std::thread::Builder::new()
        .name("flowgate-committer".into())
        .spawn(move || guarded("committer", &committer_events, || committer.run(commit_rx)))
        .map_err(|e| RunError::Internal(format!("cannot start the committer: {e}")))?;
    let counters = Arc::new(Counters::default());
    let ctx = Arc::new(TaskContext {
        plan: plan.clone(),
        pipeline: spec.name.clone(),
        decoder: JsonDecoder::new(plan.stages[0].clone()),
        event_time: spec
            .event_time
            .as_ref()
            .and_then(|c| plan.stages[0].index_of(c).ok()),
        delay: spec.watermark.delay.as_millis(),
        max_future: spec.watermark.max_future.as_millis(),
        max_records: spec.batch.max_records.max(1),
        max_wait: millis(spec.batch.max_wait),
        linger: millis(spec.batch.linger),
        max_record_bytes: spec.batch.max_record_bytes,
        inputs,
        counters: counters.clone(),
        committer: commit_tx.clone(),
        metrics: metrics.clone(),
        sink_names,
        writer: crate::checkpoint::writer_tag(),
        role: role.clone(),
        store: store.clone(),
    });
    let mut worker_tx = Vec::new();
    let mut worker_threads = Vec::new();
    for w in 0..workers {
        let (tx, rx) = mpsc::sync_channel(WORKER_QUEUE);
        worker_tx.push(tx);
        let (ctx, events) = (ctx.clone(), events_tx.clone());
        worker_threads.push(
            std::thread::Builder::new()
                .name(format!("flowgate-worker-{w}"))
                .spawn(move || {
                    let guard = events.clone();
                    guarded(&format!("worker {w}"), &guard, || {
                        worker::run_worker(w, ctx, rx, events)
                    })
                })
                .map_err(|e| RunError::Internal(format!("cannot start a worker: {e}")))?,
        );
    }
    drop(events_tx);
    let mut opened = open_source(pipeline, shared, &role)?;
    let router = Arc::new(Mutex::new(Router {
        workers: worker_tx,
        slots: HashMap::new(),
        committer: commit_tx,
        events,
        epoch: 1,
        to_kafka: Offsets::new(),
        committed: 0,
        failed: None,
        ephemeral: opened.source.ephemeral(),
        closed: false,
        ctx: Some(ctx),
    }));
    opened
        .source
        .on_rebalance(Arc::new(Rebalancer(router.clone())));
    let started = Instant::now();
    let mut loop_state = Loop {
        options,
        interval: millis(spec.checkpoint.interval),
        idle_after: Duration::from_millis(spec.watermark.idle_timeout.as_millis().max(0) as u64),
        max_records: spec.batch.max_records.max(1),
        counters: counters.clone(),
        started,
        poll_time: Duration::ZERO,
        kafka_commit: Duration::ZERO,
        first_record: None,
        routed: 0,
        metrics: metrics.clone(),
        swaps_in: None,
        swaps: Vec::new(),
        drain,
        // The upstream half of a hop says nothing about readiness: the keyed half does.
        signals_ready: !matches!(role, task::Role::Upstream(_)),
    };
    // Changes the reloader refused before a barrier (the scope joins it before they are read).
    let refusals = Arc::new(Mutex::new(Vec::new()));
    let result = std::thread::scope(|scope| {
        let reloader_stop = Arc::new(AtomicBool::new(false));
        if let (Some(reload), Some(baseline)) = (&options.reload, baseline) {
            let (offers, swaps_in) = mpsc::sync_channel(1);
            loop_state.swaps_in = Some(swaps_in);
            let hangup = Arc::new(AtomicBool::new(false));
            #[cfg(unix)]
            {
                use tokio::signal::unix::{SignalKind, signal};
                let hangup = hangup.clone();
                let mut hup = rt
                    .block_on(async { signal(SignalKind::hangup()) })
                    .map_err(|e| RunError::Config(format!("cannot handle SIGHUP: {e}")))?;
                rt.spawn(async move {
                    while hup.recv().await.is_some() {
                        hangup.store(true, Ordering::Relaxed);
                    }
                });
            }
            let derive: Option<swap::Derive> = match (&role, &pipeline.spec.source.kind()) {
                (task::Role::Keyed(_), Some(SourceKind::Kafka(k, _))) => {
                    let bootstrap = k.brokers.bootstrap();
                    Some(Arc::new(move |p: Pipeline| hop::halves(&p, &bootstrap).1))
                }
                _ => None,
            };
            let watch = swap::Watch {
                vars: reload.vars.clone(),
                files: reload.watch_files,
                hangup,
                stop: reloader_stop.clone(),
                refusals: refusals.clone(),
                metrics: metrics.clone(),
                derive,
            };
            let (running, running_plan) = (pipeline.clone(), plan.clone());
            std::thread::Builder::new()
                .name("flowgate-reloader".into())
                .spawn_scoped(scope, move || {
                    swap::reloader(host, running, running_plan, baseline, watch, offers)
                })
                .map_err(|e| RunError::Internal(format!("cannot start the reloader: {e}")))?;
        }
        // However the loop ends (a panic included), the reloader stops: the scope joins it.
        struct StopOnDrop(Arc<AtomicBool>);
        impl Drop for StopOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop_reloader = StopOnDrop(reloader_stop.clone());
        let result = loop_state
            .run(pipeline, &mut opened, &router, stop, &shared.halt)
            .map_err(|e| lock(&router).explain(e));
        loop_state.swaps_in = None;
        result
    });
    loop_state
        .swaps
        .extend(refusals.lock().unwrap_or_else(|p| p.into_inner()).drain(..));
    loop_state.swaps.sort_by_key(|s| s.at);
    if loop_state.signals_ready {
        metrics.set_ready(false);
    }
    // Let the threads go: closing their channels ends them.
    {
        let mut r = lock(&router);
        r.closed = true;
        r.ctx = None;
        r.workers.clear();
        let (tx, _) = mpsc::sync_channel(1);
        r.committer = tx;
    }
    let reports: Vec<WorkerReport> = worker_threads
        .into_iter()
        .filter_map(|t| t.join().ok())
        .collect();
    drop(opened);
    let committed = committer_thread.join().ok();
    result?;
    let committed = committed.unwrap_or_default();
    Ok(loop_state.summary(&plan, reports, committed))
}

/// Every partition's watermark at the end of time (`end: flush`): each open window closes.
fn flush_all(r: &Router) -> HashMap<PartitionKey, i64> {
    r.slots.keys().map(|k| (k.clone(), i64::MAX)).collect()
}

/// The source loop's settings and measurements.
struct Loop<'a> {
    options: &'a RunOptions,
    interval: Duration,
    idle_after: Duration,
    max_records: usize,
    counters: Arc<Counters>,
    started: Instant,
    poll_time: Duration,
    kafka_commit: Duration,
    first_record: Option<Duration>,
    routed: u64,
    metrics: Arc<Metrics>,
    /// New plans from the reloader (when the run reloads), and the one waiting for a barrier.
    swaps_in: Option<Receiver<Candidate>>,
    swaps: Vec<SwapRecord>,
    /// The keyed half of a hop: set once the upstream half stopped; stop when caught up.
    drain: Option<Arc<AtomicBool>>,
    /// Whether this loop's partitions make the process ready (`/readyz`).
    signals_ready: bool,
}

impl Loop<'_> {
    fn run(
        &mut self,
        pipeline: &Pipeline,
        opened: &mut OpenSource,
        router: &Arc<Mutex<Router>>,
        stop: &AtomicBool,
        halt: &AtomicBool,
    ) -> Result<(), RunError> {
        let source = &mut opened.source;
        let mut waiting: Option<Candidate> = None;
        let mut next_cut = Instant::now() + self.interval;
        let mut last_record = Instant::now();
        let mut last_progress = Instant::now();
        let mut progress_mark = (0u64, 0u64);
        let live = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut polled: Vec<Record> = Vec::with_capacity(self.max_records);
        let flush_at_end = pipeline.spec.end() == crate::config::End::Flush;
        // Whether the input ended (not merely the run): then `end: flush` closes every window.
        // A file ends when read to its end; another source when `--max-records` are read, or
        // `--until-idle` passed with nothing waiting at the broker. Never on Ctrl+C.
        let bounded = source.bounded();
        let mut input_ended = false;
        let mut flushed = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                tracing::info!("stopping: finishing and committing what was read");
                break;
            }
            if halt.load(Ordering::Relaxed) {
                tracing::info!("the other half stopped: finishing and committing what was read");
                break;
            }
            let budget = self
                .options
                .max_records
                .map(|m| m.saturating_sub(self.routed) as usize)
                .unwrap_or(usize::MAX);
            if budget == 0 {
                input_ended = !bounded;
                break;
            }
            {
                let r = lock(router);
                // Idle time counts once the source has partitions (a group join takes seconds).
                if self.routed == 0
                    && r.slots.is_empty()
                    && self.started.elapsed() < Duration::from_secs(60)
                {
                    last_record = Instant::now();
                }
            }
            if let Some(idle) = self.options.until_idle
                && last_record.elapsed() >= idle
            {
                tracing::info!("no input for {idle:?}: stopping");
                let r = lock(router);
                input_ended = !bounded
                    && r.slots
                        .iter()
                        .all(|(k, slot)| !source.behind(&k.0, k.1, slot.next));
                break;
            }
            if self
                .drain
                .as_ref()
                .is_some_and(|d| d.load(Ordering::Relaxed))
                && last_record.elapsed() >= Duration::from_secs(2)
            {
                let r = lock(router);
                if r.slots
                    .iter()
                    .all(|(k, slot)| !source.behind(&k.0, k.1, slot.next))
                {
                    tracing::info!(
                        "the upstream half stopped and this process's partitions of the repartition topic are read: stopping"
                    );
                    break;
                }
            }
            polled.clear();
            let polling = Instant::now();
            // The loop's only wait: the source blocks until records come or the next epoch
            // barrier is due, at most 50 ms (the loop's heartbeat for Ctrl+C, commits to hand to
            // Kafka and swaps offered). A source with nothing to give must block here, never
            // return at once: the workers and the committer block on their channels, so an idle
            // run costs a few wake-ups a second.
            let wait = next_cut
                .saturating_duration_since(polling)
                .min(Duration::from_millis(50));
            source.poll(self.max_records.min(budget), wait, &mut polled)?;
            self.poll_time += polling.elapsed();
            let mut r = lock(router);
            if let Some(e) = r.failed.take() {
                return Err(e);
            }
            if let Some(pace) = &opened.pace {
                pace.consumed
                    .fetch_add(polled.len() as u64, Ordering::Relaxed);
                if !r.slots.is_empty() {
                    pace.reading.store(true, Ordering::Relaxed);
                }
            }
            if !polled.is_empty() {
                last_record = Instant::now();
                self.first_record.get_or_insert(self.started.elapsed());
            }
            self.route(&mut r, &mut polled)?;
            r.drain(None)?;
            if self.signals_ready {
                self.metrics.set_ready(!r.slots.is_empty());
            }
            if waiting.is_none()
                && let Some(offers) = &self.swaps_in
            {
                waiting = offers.try_recv().ok();
            }
            // An epoch ends at its interval, or sooner when a chain's poison journal (one
            // epoch's input, held for isolation) grows large under load, though never within
            // 250 ms (or a tenth of the interval) of the last cut: a chain may ask again while
            // the barrier reaches it, and under load cuts must not come back to back.
            let now = Instant::now();
            let floor = (self.interval / 10).min(Duration::from_millis(250));
            let pressed = now + self.interval >= next_cut + floor
                && self.counters.checkpoint_now.load(Ordering::Relaxed);
            if now >= next_cut || pressed {
                self.counters.checkpoint_now.store(false, Ordering::Relaxed);
                let mut idle = self.idle_watermarks(&r, source.as_ref());
                if flush_at_end && !flushed && source.exhausted() {
                    idle = flush_all(&r);
                    flushed = true;
                    tracing::info!(
                        "the input is read to its end: closing every open window (`end: flush`)"
                    );
                }
                match waiting.take() {
                    Some(candidate) => waiting = self.swap(pipeline, &mut r, idle, candidate)?,
                    None => {
                        r.cut(idle)?;
                    }
                }
                next_cut = Instant::now() + self.interval;
                self.publish_lag(source.as_ref());
            }
            if !r.to_kafka.is_empty() {
                let offsets = std::mem::take(&mut r.to_kafka);
                let committing = Instant::now();
                source.commit(&offsets)?;
                self.kafka_commit += committing.elapsed();
            }
            let every = if live {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(5)
            };
            if last_progress.elapsed() >= every {
                let secs = last_progress.elapsed().as_secs_f64();
                let c = &self.counters;
                let (records, rows_out) = (
                    c.records.load(Ordering::Relaxed),
                    c.rows_out.load(Ordering::Relaxed),
                );
                let line = format!(
                    "{records} records ({:.0}/s in, {:.0}/s out), {} rejected, {} undecodable, {} partitions{}, epoch {} committed",
                    (records - progress_mark.0.min(records)) as f64 / secs,
                    (rows_out - progress_mark.1.min(rows_out)) as f64 / secs,
                    c.rejected.load(Ordering::Relaxed),
                    c.undecodable.load(Ordering::Relaxed),
                    r.slots.len(),
                    lag_text(&source.lag()),
                    r.committed,
                );
                if live {
                    // Not eprint!: a terminal gone (SIGHUP no longer ends the run) must not
                    // panic the loop.
                    let _ = write!(std::io::stderr(), "\r\x1b[2K{line}");
                } else {
                    tracing::info!("{line}");
                }
                progress_mark = (records, rows_out);
                last_progress = Instant::now();
            }
        }
        if live {
            let _ = writeln!(std::io::stderr());
        }
        let mut r = lock(router);
        let idle = if flush_at_end && !flushed && (input_ended || source.exhausted()) {
            tracing::info!("the input ended: closing every open window (`end: flush`)");
            flush_all(&r)
        } else {
            self.idle_watermarks(&r, source.as_ref())
        };
        let epoch = r.cut(idle)?;
        r.drain(Some(epoch))?;
        let offsets = std::mem::take(&mut r.to_kafka);
        let committing = Instant::now();
        source.commit(&offsets)?;
        self.kafka_commit += committing.elapsed();
        Ok(())
    }

    /// Cuts an epoch and switches to `candidate`'s plan there, if every partition's steps can
    /// take their state; logs and records the outcome, and answers the reloader. Returns the
    /// candidate when it must wait for a later barrier.
    fn swap(
        &mut self,
        pipeline: &Pipeline,
        r: &mut Router,
        idle: HashMap<PartitionKey, i64>,
        candidate: Candidate,
    ) -> Result<Option<Candidate>, RunError> {
        let Some(base) = r.ctx.clone() else {
            return Err(RunError::Internal("no task context to swap".into()));
        };
        let ctx = Arc::new(base.with_plan(
            candidate.plan.clone(),
            sink_inputs(&candidate.pipeline, &candidate.plan),
        ));
        let pausing = Instant::now();
        let outcome = r.cut_and_swap(idle, ctx, Arc::new(candidate.carry.clone()))?;
        let pause = pausing.elapsed();
        let file = pipeline.file.display();
        let (epoch, refused, commit_wait) = match outcome {
            SwapOutcome::NotYet => {
                tracing::info!(
                    "live swap: a partition is still catching up with its sinks after the restart; trying again at the next epoch barrier"
                );
                return Ok(Some(candidate));
            }
            SwapOutcome::Switched { epoch, commit_wait } => {
                self.metrics.board.set_steps(
                    candidate
                        .pipeline
                        .spec
                        .transforms
                        .iter()
                        .map(|t| t.name.clone())
                        .collect(),
                );
                tracing::info!(
                    "live swap: switched to the new steps of {file} at epoch {epoch}, input paused {:.1} ms ({:.1} ms of it committing epoch {epoch}): {}",
                    pause.as_secs_f64() * 1e3,
                    commit_wait.as_secs_f64() * 1e3,
                    candidate.changes
                );
                (epoch, None, commit_wait)
            }
            SwapOutcome::Refused { epoch, why } => {
                tracing::error!(
                    "live swap refused at epoch {epoch}: {why}\nthe running plan goes on, its state as it was"
                );
                (epoch, Some(why), Duration::ZERO)
            }
        };
        let record = SwapRecord {
            epoch,
            changes: candidate.changes.clone(),
            pause,
            commit_wait,
            refused: refused.clone(),
            at: Instant::now(),
        };
        self.metrics.board.swap(crate::metrics::swap_json(&record));
        self.swaps.push(record);
        let _ = candidate.outcome.send(refused.map_or(Ok(()), Err));
        Ok(None)
    }

    /// Publishes each assigned partition's lag (series of partitions no longer assigned go).
    fn publish_lag(&self, source: &dyn Source) {
        let lag = &self.metrics.lag;
        lag.clear();
        for ((topic, partition), records) in source.lag() {
            lag.get_or_create(&PartitionLabels { topic, partition })
                .set(records);
        }
    }

    /// Hands polled records to their partitions' workers; records of partitions not assigned
    /// (any more) are dropped: they were fetched before a revoke.
    fn route(&mut self, r: &mut Router, polled: &mut Vec<Record>) -> Result<(), RunError> {
        // A poll hands over runs of one partition's records: one lookup per run, not per record.
        // Each group: its partition, and its records (`None`: the partition is not assigned).
        let mut groups: Vec<(PartitionKey, Option<Vec<Record>>)> = Vec::new();
        let mut index: HashMap<PartitionKey, usize> = HashMap::new();
        let mut current: Option<usize> = None;
        for record in polled.drain(..) {
            let same = current.filter(|&g| {
                let (topic, partition) = &groups[g].0;
                *partition == record.partition
                    && (Arc::ptr_eq(topic, &record.topic) || **topic == *record.topic)
            });
            let g = match same {
                Some(g) => g,
                None => {
                    let key = (record.topic.clone(), record.partition);
                    *index.entry(key.clone()).or_insert_with(|| {
                        let records = r.slots.contains_key(&key).then(Vec::new);
                        groups.push((key, records));
                        groups.len() - 1
                    })
                }
            };
            current = Some(g);
            if let Some(records) = &mut groups[g].1 {
                records.push(record);
            }
        }
        let now = Instant::now();
        for (key, records) in groups {
            let (Some(records), Some(slot)) = (records, r.slots.get_mut(&key)) else {
                continue;
            };
            if let Some(last) = records.iter().map(|r| r.offset).max() {
                slot.next = slot.next.max(last + 1);
            }
            slot.last_record = now;
            self.routed += records.len() as u64;
            let worker = slot.worker;
            r.send(worker, WorkerMsg::Records(key, records))?;
        }
        Ok(())
    }

    /// Partitions silent for `idle_timeout` with nothing waiting at the broker: their watermark
    /// follows the newest of any partition.
    fn idle_watermarks(&self, r: &Router, source: &dyn Source) -> HashMap<PartitionKey, i64> {
        let idle: Vec<&PartitionKey> = r
            .slots
            .iter()
            .filter(|(k, s)| {
                s.last_record.elapsed() >= self.idle_after && !source.behind(&k.0, k.1, s.next)
            })
            .map(|(k, _)| k)
            .collect();
        // The newest watermark of any partition (the others may be idle too: at the end of a
        // stream every partition closes its windows up to the newest one's). None yet: the
        // partitions are still told they are idle (`i64::MIN`, nothing to follow), which the
        // upstream half of a hop passes on.
        let lead = r
            .slots
            .values()
            .map(|s| s.watermark.load(Ordering::Relaxed))
            // A partition whose input ended (`end: flush`) is at the end of time: the others do
            // not follow it there.
            .filter(|&w| w != i64::MIN && w != i64::MAX)
            .max()
            .unwrap_or(i64::MIN);
        idle.into_iter().map(|k| (k.clone(), lead)).collect()
    }

    fn summary(
        &self,
        plan: &Plan,
        workers: Vec<WorkerReport>,
        committer: CommitterReport,
    ) -> RunSummary {
        let c = &self.counters;
        let stage = |name: String, time: Duration| StageTime {
            stage: name,
            time,
            ..Default::default()
        };
        let mut out = vec![
            stage("source poll".into(), self.poll_time),
            stage("decode".into(), workers.iter().map(|w| w.decode).sum()),
        ];
        let mut latency_to_output = crate::metrics::Histogram::default();
        // Per step name: a swap can add, remove and reorder steps.
        let mut steps: Vec<(String, crate::plugin::StepTimings)> = plan
            .names
            .iter()
            .map(|n| (n.clone(), Default::default()))
            .collect();
        for w in &workers {
            latency_to_output.merge(&w.latency_to_output);
            for (name, t) in &w.steps {
                let at = match steps.iter().position(|(n, _)| n == name) {
                    Some(at) => at,
                    None => {
                        steps.push((name.clone(), Default::default()));
                        steps.len() - 1
                    }
                };
                steps[at].1.total += t.total;
                steps[at].1.host_boundary += t.host_boundary;
            }
        }
        for (name, t) in &steps {
            out.push(StageTime {
                stage: format!("step {name}"),
                time: t.total,
                host_boundary: Some(t.host_boundary),
                native: plan
                    .names
                    .iter()
                    .position(|n| n == name)
                    .and_then(|i| plan.native.get(i).copied()),
            });
        }
        for (i, name) in committer.sink_names.iter().enumerate() {
            let encode = committer.sink_encode[i];
            out.push(stage(format!("sink {name} write"), committer.sink_write[i]));
            out.push(stage(format!("sink {name} encode"), encode));
            out.push(stage(
                format!("sink {name} commit"),
                committer.sink_commit[i].saturating_sub(encode),
            ));
        }
        out.push(stage(
            "checkpoint snapshot".into(),
            workers.iter().map(|w| w.snapshot).sum(),
        ));
        out.push(stage("checkpoint state".into(), committer.state_save));
        out.push(stage("source commit".into(), self.kafka_commit));
        RunSummary {
            records: c.records.load(Ordering::Relaxed),
            undecodable: c.undecodable.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            rows_out: c.rows_out.load(Ordering::Relaxed),
            checkpoints: committer.checkpoints,
            wall: self.started.elapsed(),
            first_record: self.first_record,
            stages: out,
            latency_to_output,
            latency_to_commit: committer.latency_to_commit,
            swaps: self.swaps.clone(),
            tables: committer.tables,
        }
    }
}

/// What each sink reads, in sink order (the dead letter last, if any).
fn sink_inputs(pipeline: &Pipeline, plan: &Plan) -> Vec<SinkInput> {
    let spec = &pipeline.spec;
    let mut inputs: Vec<SinkInput> = spec
        .sinks
        .iter()
        .map(|(_, s)| SinkInput::Stage(plan.stage_of(s.from.as_deref())))
        .collect();
    if spec.dead_letter.is_some() {
        inputs.push(SinkInput::DeadLetter);
    }
    inputs
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

/// The checkpoint store the pipeline names: a folder, or an object store (`s3://…`).
fn state_store(
    pipeline: &Pipeline,
    rt: &Arc<tokio::runtime::Runtime>,
) -> Result<Arc<dyn StateStore>, RunError> {
    let spec = &pipeline.spec.checkpoint;
    let text = spec.path.to_string_lossy();
    if text.contains("://") {
        crate::storage::register();
        let url = url::Url::parse(&text)
            .map_err(|e| RunError::Config(format!("`checkpoint.path`: `{text}`: {e}")))?;
        let options = spec
            .storage_options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let store = ObjectStateStore::open(&url, &options, &pipeline.spec.name, rt.clone())?;
        return Ok(Arc::new(store));
    }
    Ok(Arc::new(FileStateStore::new(
        &pipeline.resolve(&spec.path),
        &pipeline.spec.name,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_thread_fails_the_run_instead_of_hanging_it() {
        let (events, inbox) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            guarded("worker 1", &events, || -> u32 {
                panic!("index out of bounds")
            })
        });
        assert_eq!(thread.join().ok(), Some(0));
        match inbox.recv_timeout(Duration::from_secs(5)) {
            Ok(Event::Failed(RunError::Internal(message))) => {
                assert!(
                    message.contains("worker 1 thread panicked: index out of bounds"),
                    "{message}"
                )
            }
            _ => panic!("no failure reported"),
        }
    }

    #[test]
    fn a_thread_that_is_gone_is_reported_by_its_own_error_not_as_stopped() {
        let (events_tx, events) = mpsc::channel();
        let (committer, gone) = mpsc::sync_channel(1);
        drop(gone);
        let router = Arc::new(Mutex::new(Router {
            workers: Vec::new(),
            slots: HashMap::new(),
            committer,
            events,
            epoch: 1,
            to_kafka: Offsets::new(),
            committed: 0,
            failed: None,
            ephemeral: false,
            closed: false,
            ctx: None,
        }));
        // A worker finds the committer gone and says so first; the committer's own report
        // comes later (a thread that panics reports after its channels closed).
        let late = events_tx.clone();
        events_tx
            .send(Event::Failed(RunError::Stopped("the committer".into())))
            .unwrap();
        let reporter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            late.send(Event::Failed(RunError::Internal(
                "the committer thread panicked: boom".into(),
            )))
            .unwrap();
        });
        match lock(&router).drain(None) {
            Err(RunError::Internal(m)) => assert!(m.contains("boom"), "{m}"),
            other => panic!("expected the committer's own error, got {other:?}"),
        }
        reporter.join().unwrap();

        // The coordinator finds the committer gone itself, opening assigned partitions.
        events_tx
            .send(Event::Failed(RunError::Internal("disk full".into())))
            .unwrap();
        Rebalancer(router.clone()).assigned(&[("ticks".into(), 0)]);
        match lock(&router).failed.take() {
            Some(RunError::Internal(m)) => assert_eq!(m, "disk full"),
            other => panic!("expected the committer's own error, got {other:?}"),
        }

        // No report ever comes (every other thread is gone): the run still stops, saying which
        // thread is missing.
        drop(events_tx);
        Rebalancer(router.clone()).assigned(&[("ticks".into(), 1)]);
        match lock(&router).failed.take() {
            Some(e @ RunError::Stopped(_)) => {
                assert_eq!(e.to_string(), "internal: the committer stopped")
            }
            other => panic!("expected `the committer stopped`, got {other:?}"),
        }
    }
}

//! A chain of steps: each step's output feeds the next; watermarks flow down the chain, and what
//! a step emits on a watermark passes through the steps after it before they see that watermark.

use arrow::array::UInt32Array;
use arrow::compute::take_record_batch;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;

use super::{ErrorKind, PluginError, Step};
use crate::config::OnError;

/// Rows one step refused, with a reason each.
#[derive(Debug, Clone)]
pub struct RejectedRows {
    /// The step that refused them.
    pub step: String,
    /// The rows, with the step's input schema.
    pub rows: RecordBatch,
    /// One reason per row.
    pub reasons: Vec<String>,
    /// Each row's index in the batch the step was given.
    pub indices: Vec<u32>,
}

/// A batch a step refused as a whole (a `bad-input` error) under `on_error: skip | dead_letter`:
/// the steps before it keep what they did with it, the steps after it never see it.
#[derive(Debug, Clone)]
pub struct RefusedBatch {
    /// The step that refused it.
    pub step: String,
    /// The batch as the step was given it.
    pub rows: RecordBatch,
    /// The step's error, as a reason.
    pub reason: String,
    /// The step's policy (`Skip` or `DeadLetter`).
    pub policy: OnError,
}

/// What the chain produced for one input batch or watermark.
#[derive(Debug, Clone, Default)]
pub struct ChainOutput {
    /// Batches out of the last step.
    pub batches: Vec<RecordBatch>,
    /// Rows refused anywhere along the chain.
    pub rejected: Vec<RejectedRows>,
    /// Batches out of tapped steps before the last, with the step's index.
    pub taps: Vec<(usize, RecordBatch)>,
    /// Batches refused whole by a step whose `on_error` lets the run go on.
    pub refused: Vec<RefusedBatch>,
}

/// What a step was handed since its last snapshot: replayed into a rebuilt instance.
#[derive(Debug, Clone)]
enum Entry {
    Batch(RecordBatch),
    Watermark(i64),
}

/// The most a chain journals per epoch (all steps together) for poison-record isolation; past
/// it a trap stops the run as under `on_error: fail` (logged once).
const JOURNAL_LIMIT: usize = 256 << 20;

/// A chain journaling more than this asks for the next checkpoint now (see
/// [`Chain::journal_pressed`]): the snapshot starts the journals over, so under load an epoch
/// ends by size before its interval, and the journal neither holds hundreds of MB nor reaches
/// [`JOURNAL_LIMIT`] (where isolation stops).
pub const JOURNAL_CHECKPOINT: usize = 48 << 20;

/// At most this many checkpoints in a row store a step's state as deltas before a full snapshot
/// (fewer for some partitions, see [`Chain::stagger`], so they do not all take one together).
const FULL_EVERY: usize = 32;

/// A step's state at its last checkpoint, as a rebuild restores it: a full snapshot, then the
/// deltas after it in order. The bytes are shared with the checkpoint that stores them (not a
/// copy: a step's state is held once, not once more until the committer has written it), and
/// once the committer has saved that checkpoint they are let go: a rebuild (rare: a plugin
/// trapped) reads them back from the state store (see [`StoredStates`]).
#[derive(Debug, Clone)]
pub struct Base {
    start: Start,
    /// Deltas on top of `start`, oldest first.
    deltas: Vec<Bytes>,
    /// The checkpoint (epoch, and the step's name in it) whose stored state of this step is
    /// exactly this base; `None`: not stored as such (restored from a live swap's state, say),
    /// so it is always held.
    stored_at: Option<(u64, String)>,
}

/// Where a [`Base`] starts.
#[derive(Debug, Clone)]
enum Start {
    /// A full snapshot, held.
    Held(Bytes),
    /// The state stored at checkpoint `epoch` under the step name `step`, read back when needed.
    Stored { epoch: u64, step: String },
}

impl Base {
    /// A whole snapshot, no deltas, not stored (yet).
    pub fn whole(full: Bytes) -> Self {
        Base {
            start: Start::Held(full),
            deltas: Vec::new(),
            stored_at: None,
        }
    }

    /// The bytes held in memory.
    fn held_bytes(&self) -> usize {
        let start = match &self.start {
            Start::Held(full) => full.len(),
            Start::Stored { .. } => 0,
        };
        start + self.deltas.iter().map(Bytes::len).sum::<usize>()
    }

    /// Lets the bytes go if the committer has saved the checkpoint that stores them (every
    /// checkpoint of the partition up to `saved` is in the state store).
    fn release(&mut self, saved: u64) {
        if let Some((epoch, step)) = &self.stored_at
            && *epoch <= saved
            && (matches!(self.start, Start::Held(_)) || !self.deltas.is_empty())
        {
            self.start = Start::Stored {
                epoch: *epoch,
                step: step.clone(),
            };
            self.deltas = Vec::new();
        }
    }
}

/// A partition's state store, for a chain to read a step's state back from when it rebuilds the
/// step (see [`Base`]), and how far the committer has saved the partition's checkpoints.
#[derive(Clone)]
pub struct StoredStates {
    /// The store the committer saves this partition's checkpoints in.
    pub store: std::sync::Arc<dyn crate::checkpoint::StateStore>,
    /// The partition.
    pub topic: String,
    pub partition: i32,
    /// The newest checkpoint epoch of the partition the committer has saved (0: none yet).
    pub saved: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for StoredStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredStates")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("saved", &self.saved)
            .finish_non_exhaustive()
    }
}

impl StoredStates {
    /// Step `step`'s state stored at checkpoint `epoch`: its full snapshot and the deltas after.
    fn read(&self, epoch: u64, step: &str) -> Result<crate::checkpoint::StepChain, String> {
        let location = || {
            format!(
                "partition `{}/{}`, checkpoint {}",
                self.topic,
                self.partition,
                crate::checkpoint::epoch_label(epoch)
            )
        };
        let state = self
            .store
            .load(&self.topic, self.partition, epoch)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "{}: not in the state store (pruned: has another process taken this partition over?)",
                    location()
                )
            })?;
        let steps: Vec<_> = state.steps.into_iter().filter(|s| s.step == step).collect();
        if steps.is_empty() {
            return Err(format!("{}: holds no state for step `{step}`", location()));
        }
        crate::checkpoint::resolve(&*self.store, &self.topic, self.partition, epoch, steps)
            .map_err(|e| e.to_string())?
            .pop()
            .ok_or_else(|| format!("{}: holds no state for step `{step}`", location()))
    }
}

/// A plugin's state as bytes to share (see [`Base`]). A `Vec` much larger than its contents (a
/// native plugin's buffer reserved for more than it wrote; a WASM plugin's lifted state is
/// exactly its length) is trimmed first: the chain may hold it for up to 64 checkpoints.
fn shared(mut state: Vec<u8>) -> Bytes {
    if state.capacity() - state.len() > state.len() / 8 {
        state.shrink_to_fit();
    }
    Bytes::from(state)
}

/// How a step's checkpoints are stored (incremental checkpoints).
#[derive(Debug, Clone, Default)]
struct Track {
    /// The checkpoint whose stored state of this step the plugin's delta tracking starts from;
    /// `None`: the next checkpoint stores the whole state (a new or rebuilt-from-nothing
    /// instance, a step swapped in, a plugin without deltas).
    baseline: Option<u64>,
    /// The checkpoint holding the full snapshot the stored deltas go back to.
    root: u64,
    /// Deltas stored since that full snapshot, and their bytes.
    deltas: usize,
    delta_bytes: usize,
    /// The full snapshot's bytes.
    full_bytes: usize,
    /// How much of the deltas' bytes the whole state grew by, between the last two full
    /// snapshots (0 to 1; 0 until two were taken): a state that only grows (a run's first
    /// `retention` of dedup keys, a backfill) is about its last full snapshot plus its deltas,
    /// and does not need a full snapshot because the deltas outgrew the last one.
    growth: f64,
}

impl Track {
    /// Whether the next checkpoint stores the whole state, when deltas may run `limit`
    /// checkpoints in a row (the count rule), or until they add up to `limit / 16` times the
    /// whole state (the bytes rule; 1 to 2 times, twice that in a hurry). The bytes rule counts
    /// only the part of the deltas that did not grow the state (at least a quarter of them:
    /// `growth` is from the last interval, and a state that stopped growing since must still
    /// get a full snapshot within 4 times the plain rule's bytes).
    fn full_due(&self, limit: usize) -> bool {
        let replaced = 1.0 - self.growth.min(0.75);
        self.deltas + 1 >= limit
            || (self.delta_bytes * (FULL_EVERY / 2)) as f64 * replaced
                > (self.full_bytes * limit) as f64
    }
}

/// One step's part of a checkpoint (see [`Chain::checkpoint`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSnapshot {
    /// The step's name.
    pub step: String,
    /// The whole state, or with `delta_of` what changed since that checkpoint (shared with
    /// the state a rebuild of the step starts from).
    pub bytes: Bytes,
    /// The checkpoint a delta goes on from.
    pub delta_of: Option<u64>,
    /// The checkpoint holding the full snapshot this step's state goes back to.
    pub root: u64,
    /// How long taking it took (the plugin's calls and the copies).
    pub took: std::time::Duration,
}

impl StepSnapshot {
    /// A checkpoint's steps as the state store keeps them, and the oldest checkpoint their
    /// deltas reach back to (`None`: every state is whole).
    pub fn stored(
        snapshots: Vec<StepSnapshot>,
    ) -> (Vec<crate::checkpoint::StepState>, Option<u64>) {
        let root = snapshots
            .iter()
            .filter(|s| s.delta_of.is_some())
            .map(|s| s.root)
            .min();
        let steps = snapshots
            .into_iter()
            .map(|s| crate::checkpoint::StepState {
                step: s.step,
                snapshot: s.bytes,
                delta_of: s.delta_of,
            })
            .collect();
        (steps, root)
    }
}

/// Steps in order, for one partition.
///
/// **Poison records.** A step whose `on_error` is `dead_letter` keeps a journal of what it was
/// handed since its last snapshot. When its plugin traps, times out or runs out of memory on a
/// batch, the chain rebuilds the instance from that snapshot, replays the journal into it, and
/// bisects the batch: halves that go through flow on (in order), halves that fail are split
/// again after another rebuild, down to single rows, which go to the dead letter with the
/// failure. The step's state ends as if the poison rows had never been sent.
#[derive(Debug)]
pub struct Chain {
    steps: Vec<Step>,
    tapped: Vec<bool>,
    policies: Vec<OnError>,
    /// Per step: the state at the last snapshot (`None`: as created).
    base: Vec<Option<Base>>,
    /// Per step: how its checkpoints are stored.
    track: Vec<Track>,
    /// Checkpoints of deltas in a row before a full one (at most [`FULL_EVERY`]).
    full_every: usize,
    /// Per step: what it was handed since.
    journal: Vec<Vec<Entry>>,
    journal_bytes: usize,
    /// The journal outgrew [`JOURNAL_LIMIT`] this epoch: isolation is off until the snapshot.
    journal_full: bool,
    /// Where saved states are read back from, so a base the committer has saved is not held
    /// (`None`: every base is held).
    stored: Option<StoredStates>,
    /// The saved epoch the bases were last released against.
    released: u64,
}

/// A poison-record failure: a trap, a timeout or a memory error (the instance is gone).
fn is_poison(e: &PluginError) -> bool {
    matches!(
        e,
        PluginError::Trap { .. } | PluginError::Timeout { .. } | PluginError::MemoryLimit { .. }
    )
}

/// A dead-letter reason for a row a step failed on by itself.
fn poison_reason(e: &PluginError) -> String {
    match e {
        PluginError::Trap { message, .. } => format!("the plugin trapped on this row: {message}"),
        PluginError::Timeout { limit, .. } => {
            format!("the plugin ran past its time limit of {limit:?} on this row")
        }
        PluginError::MemoryLimit { limit_mib, .. } => {
            format!("the plugin needed more than its memory limit of {limit_mib} MiB on this row")
        }
        other => other.to_string(),
    }
}

/// What a step made of one batch, isolation included.
#[derive(Default)]
struct Handled {
    batches: Vec<RecordBatch>,
    /// (row in the batch, reason): the plugin's own rejections and poison rows.
    rejected: Vec<(u32, String)>,
}

/// One step of a chain with what rebuilding it needs: taken out of a chain by
/// [`Chain::into_parts`] (a live swap carries an unchanged step into the new chain as it is), or
/// fresh.
#[derive(Debug)]
pub struct StepParts {
    step: Step,
    base: Option<Base>,
    track: Track,
    journal: Vec<Entry>,
}

impl StepParts {
    /// A step just created, restored from `base` if given. Its next checkpoint stores its
    /// whole state.
    pub fn fresh(step: Step, base: Option<Vec<u8>>) -> Self {
        StepParts {
            step,
            base: base.map(|b| Base::whole(shared(b))),
            track: Track::default(),
            journal: Vec::new(),
        }
    }

    /// The step.
    pub fn step(&self) -> &Step {
        &self.step
    }
}

impl Chain {
    /// Takes the chain apart, step by step; `true` if the journals were cut short this epoch.
    pub fn into_parts(self) -> (Vec<StepParts>, bool) {
        let parts = self
            .steps
            .into_iter()
            .zip(self.base)
            .zip(self.track)
            .zip(self.journal)
            .map(|(((step, base), track), journal)| StepParts {
                step,
                base,
                track,
                journal,
            })
            .collect();
        (parts, self.journal_full)
    }

    /// A chain of `parts` (see [`Chain::into_parts`]); `journal_full` as the chain they came
    /// from said. Policies and taps as in [`Chain::new`].
    pub fn from_parts(parts: Vec<StepParts>, journal_full: bool) -> Self {
        let mut chain = Chain::new(Vec::new());
        for part in parts {
            for entry in &part.journal {
                if let Entry::Batch(b) = entry {
                    chain.journal_bytes += b
                        .columns()
                        .iter()
                        .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0))
                        .sum::<usize>();
                }
            }
            chain.steps.push(part.step);
            chain.base.push(part.base);
            chain.track.push(part.track);
            chain.journal.push(part.journal);
            chain.tapped.push(false);
            chain.policies.push(OnError::Fail);
        }
        chain.journal_full = journal_full;
        chain
    }

    /// A chain of `steps`; each step's input schema must be the previous step's output schema.
    /// Every step's `on_error` is `fail` until [`Chain::with_policies`] says otherwise.
    pub fn new(steps: Vec<Step>) -> Self {
        let tapped = vec![false; steps.len()];
        let policies = vec![OnError::Fail; steps.len()];
        let base = vec![None; steps.len()];
        let track = vec![Track::default(); steps.len()];
        let journal = vec![Vec::new(); steps.len()];
        Chain {
            steps,
            tapped,
            policies,
            base,
            track,
            full_every: FULL_EVERY,
            journal,
            journal_bytes: 0,
            journal_full: false,
            stored: None,
            released: 0,
        }
    }

    /// Reads the steps' saved states back from `stored` when rebuilding them, instead of
    /// holding each step's state at its last checkpoint once the committer has saved it.
    pub fn keep_stored(&mut self, stored: StoredStates) {
        self.stored = Some(stored);
        self.released = 0;
        self.release();
    }

    /// Lets go of the bases the committer has saved since the last look (one atomic load when
    /// nothing changed).
    pub fn release(&mut self) {
        let Some(stored) = &self.stored else { return };
        let saved = stored.saved.load(std::sync::atomic::Ordering::Acquire);
        if saved == self.released {
            return;
        }
        self.released = saved;
        for base in self.base.iter_mut().flatten() {
            base.release(saved);
        }
    }

    /// The bytes of the steps' states held to rebuild them from (not yet saved, or read back).
    pub fn held_state_bytes(&self) -> usize {
        self.base.iter().flatten().map(Base::held_bytes).sum()
    }

    /// Restores step `index` from `state` (kept as the state a rebuild starts from).
    pub fn restore(&mut self, index: usize, state: &[u8]) -> Result<(), PluginError> {
        self.steps[index].restore(state)?;
        self.base[index] = Some(Base::whole(Bytes::copy_from_slice(state)));
        self.track[index] = Track::default();
        Ok(())
    }

    /// Restores step `index` from the full snapshot and deltas of `stored`, the step's state
    /// at checkpoint `epoch` (kept as the state a rebuild starts from, and as where the next
    /// checkpoint's delta goes on from).
    pub fn restore_stored(
        &mut self,
        index: usize,
        stored: &crate::checkpoint::StepChain,
        epoch: u64,
    ) -> Result<(), PluginError> {
        let step = &mut self.steps[index];
        step.restore(&stored.full)?;
        for delta in &stored.deltas {
            step.restore_delta(delta)?;
        }
        self.set_restored(index, stored, epoch);
        Ok(())
    }

    /// Step `index` holds `stored` (restored by the caller), its state at checkpoint `epoch`;
    /// `None`: it starts empty.
    pub fn set_restored(
        &mut self,
        index: usize,
        stored: &crate::checkpoint::StepChain,
        epoch: u64,
    ) {
        self.base[index] = Some(Base {
            start: Start::Held(stored.full.clone()),
            deltas: stored.deltas.clone(),
            stored_at: Some((epoch, stored.step.clone())),
        });
        self.released = 0;
        self.track[index] = Track {
            baseline: Some(epoch),
            root: stored.root,
            deltas: stored.deltas.len(),
            delta_bytes: stored.deltas.iter().map(Bytes::len).sum(),
            full_bytes: stored.full.len(),
            growth: 0.0,
        };
    }

    /// Spreads the chain's full snapshots: with `seed` (say, a hash of the partition) each
    /// chain takes its full one after a different number of deltas (16 to 31), or of delta
    /// bytes (1 to 2 times the whole state's), so the partitions of a process do not all pay
    /// for a full snapshot at the same checkpoint.
    pub fn stagger(&mut self, seed: u64) {
        let half = FULL_EVERY / 2;
        self.full_every = half + (seed % half as u64) as usize;
    }

    /// Snapshots every step whole (name, bytes), in order; the journals start over from here,
    /// and the next [`Chain::checkpoint`] stores whole states too.
    pub fn snapshot(&mut self) -> Result<Vec<(String, Bytes)>, PluginError> {
        let mut states = Vec::with_capacity(self.steps.len());
        for (i, step) in self.steps.iter_mut().enumerate() {
            let state = shared(step.snapshot()?);
            self.base[i] = Some(Base::whole(state.clone()));
            self.track[i] = Track::default();
            self.journal[i].clear();
            states.push((step.name().to_string(), state));
        }
        self.journal_bytes = 0;
        self.journal_full = false;
        Ok(states)
    }

    /// Each step's state for checkpoint `epoch`, in order; the journals start over from here.
    /// A step whose plugin gives deltas stores what changed since the checkpoint before (on
    /// top of its stored state there), and its whole state every [`FULL_EVERY`] checkpoints
    /// or so, or once its deltas add up to more than the whole state would (judged by the last
    /// full snapshot and, for a state that grew by its deltas, those deltas): a checkpoint
    /// costs what changed, and a restore reads one full snapshot and a bounded run of deltas.
    /// In a `hurry` (input is held back for this checkpoint: a live swap) a full snapshot that
    /// is due waits, up to twice as many deltas.
    pub fn checkpoint(
        &mut self,
        epoch: u64,
        hurry: bool,
    ) -> Result<Vec<StepSnapshot>, PluginError> {
        self.release();
        let mut states = Vec::with_capacity(self.steps.len());
        for (i, step) in self.steps.iter_mut().enumerate() {
            let started = std::time::Instant::now();
            let track = &mut self.track[i];
            // Asked every time the plugin can answer, so its tracking starts over here
            // whether or not the delta is kept.
            let delta = if step.incremental() {
                step.snapshot_delta()?.map(shared)
            } else {
                None
            };
            // The bytes rule is staggered like the count (once the deltas pass 1 to 2 times
            // the whole state), or partitions that grow alike would all take a full one at
            // the same barrier.
            let slack = if hurry { 2 } else { 1 };
            let due_full = track.full_due(self.full_every * slack);
            let discarded = delta.as_ref().map_or(0, Bytes::len);
            let snapshot = match (track.baseline, delta) {
                (Some(previous), Some(delta)) if !due_full => {
                    track.deltas += 1;
                    track.delta_bytes += delta.len();
                    if let Some(base) = &mut self.base[i] {
                        base.deltas.push(delta.clone());
                        // Stored as this checkpoint only if the base was the one before.
                        base.stored_at = match base.stored_at.take() {
                            Some((at, _)) if at == previous => {
                                Some((epoch, step.name().to_string()))
                            }
                            _ => None,
                        };
                    }
                    StepSnapshot {
                        step: step.name().to_string(),
                        bytes: delta,
                        delta_of: Some(previous),
                        root: track.root,
                        took: started.elapsed(),
                    }
                }
                _ => {
                    let full = shared(step.snapshot()?);
                    // The state grew by the deltas since the last full snapshot, this
                    // checkpoint's (taken, then not stored) among them.
                    let growth = if track.delta_bytes > 0 {
                        ((full.len() as f64 - track.full_bytes as f64)
                            / (track.delta_bytes + discarded) as f64)
                            .clamp(0.0, 1.0)
                    } else {
                        track.growth
                    };
                    *track = Track {
                        baseline: None,
                        root: epoch,
                        deltas: 0,
                        delta_bytes: 0,
                        full_bytes: full.len(),
                        growth,
                    };
                    self.base[i] = Some(Base {
                        start: Start::Held(full.clone()),
                        deltas: Vec::new(),
                        stored_at: Some((epoch, step.name().to_string())),
                    });
                    StepSnapshot {
                        step: step.name().to_string(),
                        bytes: full,
                        delta_of: None,
                        root: epoch,
                        took: started.elapsed(),
                    }
                }
            };
            // Only a plugin that keeps deltas has a point to go on from.
            if step.incremental() {
                track.baseline = Some(epoch);
            }
            self.journal[i].clear();
            states.push(snapshot);
        }
        self.journal_bytes = 0;
        self.journal_full = false;
        Ok(states)
    }

    /// Whether the journal has grown past [`JOURNAL_CHECKPOINT`]: time for a checkpoint.
    pub fn journal_pressed(&self) -> bool {
        self.journal_bytes > JOURNAL_CHECKPOINT
    }

    /// Whether step `index` isolates poison records (and so journals its input).
    fn isolates(&self, index: usize) -> bool {
        self.policies[index] == OnError::DeadLetter && !self.journal_full
    }

    fn note(&mut self, index: usize, entry: Entry) {
        if !self.isolates(index) {
            return;
        }
        if let Entry::Batch(b) = &entry {
            // A slice's own bytes (its parent's buffers are shared, not held twice).
            self.journal_bytes += b
                .columns()
                .iter()
                .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0))
                .sum::<usize>();
        }
        if self.journal_bytes > JOURNAL_LIMIT {
            tracing::warn!(
                step = self.steps[index].name(),
                "this epoch's input is over {} MiB: poison records are not isolated until the next checkpoint (a trap stops the run); a shorter `checkpoint.interval` keeps epochs smaller",
                JOURNAL_LIMIT >> 20
            );
            self.journal_full = true;
            for j in &mut self.journal {
                j.clear();
            }
            return;
        }
        self.journal[index].push(entry);
    }

    /// A fresh instance of step `index` in the state it had after its journal.
    fn recover(&mut self, index: usize) -> Result<(), PluginError> {
        let base = self.held_base(index)?;
        let step = &mut self.steps[index];
        match base {
            Some((full, deltas)) => {
                step.rebuild(Some(&full))?;
                for delta in &deltas {
                    step.restore_delta(delta)?;
                }
            }
            None => step.rebuild(None)?,
        }
        for entry in &self.journal[index] {
            match entry {
                Entry::Batch(b) => step.process(b).map(|_| ())?,
                Entry::Watermark(ts) => step.on_watermark(*ts).map(|_| ())?,
            }
        }
        Ok(())
    }

    /// Step `index`'s state at its last checkpoint (`None`: as created), read back from the
    /// state store if the committer saved it and the chain let it go; held from then on (a
    /// bisection rebuilds the step again and again) until it is saved again.
    fn held_base(&mut self, index: usize) -> Result<Option<(Bytes, Vec<Bytes>)>, PluginError> {
        let Some(base) = &mut self.base[index] else {
            return Ok(None);
        };
        let full = match &base.start {
            Start::Held(full) => full.clone(),
            Start::Stored { epoch, step: name } => {
                let step = &self.steps[index];
                let failed = |message: String| PluginError::Protocol {
                    plugin: step.plugin().to_string(),
                    step: step.name().to_string(),
                    call: "rebuild",
                    message: format!(
                        "reading its state at checkpoint {} back from the state store: {message}",
                        crate::checkpoint::epoch_label(*epoch)
                    ),
                };
                let stored = self
                    .stored
                    .as_ref()
                    .ok_or_else(|| failed("no state store to read it from".into()))?;
                let mut read = stored.read(*epoch, name).map_err(failed)?;
                read.deltas.append(&mut base.deltas);
                base.deltas = read.deltas;
                // Held until the committer saves another checkpoint.
                base.start = Start::Held(read.full.clone());
                read.full
            }
        };
        Ok(Some((full, base.deltas.clone())))
    }

    /// Step `index` failed on `batch` (rows `start..start + len`, which failed as a whole):
    /// splits it, after rebuilding the instance, until the rows that fail alone are found.
    fn bisect(
        &mut self,
        index: usize,
        batch: &RecordBatch,
        start: usize,
        len: usize,
        error: &PluginError,
        out: &mut Handled,
    ) -> Result<(), PluginError> {
        if self.journal_full {
            // The journal stopped mid-epoch: a rebuild could not reach the state before `batch`.
            let step = &self.steps[index];
            return Err(PluginError::Protocol {
                plugin: step.plugin().to_string(),
                step: step.name().to_string(),
                call: "process",
                message: format!(
                    "{error}; the rows that cause it cannot be isolated: this epoch's input passed {} MiB (a shorter `checkpoint.interval` keeps epochs smaller)",
                    JOURNAL_LIMIT >> 20
                ),
            });
        }
        self.recover(index)?;
        if len == 1 {
            tracing::warn!(
                step = self.steps[index].name(),
                row = start,
                "a row made the plugin fail by itself: it goes to the dead letter ({error})"
            );
            out.rejected.push((start as u32, poison_reason(error)));
            return Ok(());
        }
        let half = len / 2;
        for (from, n) in [(start, half), (start + half, len - half)] {
            let part = batch.slice(from, n);
            match self.steps[index].process(&part) {
                Ok(output) => {
                    self.note(index, Entry::Batch(part));
                    out.batches.extend(output.batches);
                    out.rejected.extend(
                        output
                            .rejected
                            .into_iter()
                            .map(|r| ((from + r.row) as u32, r.reason)),
                    );
                }
                Err(e) if is_poison(&e) => self.bisect(index, batch, from, n, &e, out)?,
                // The plugin refused this part as bad input: its rows go to the dead letter
                // with that reason (the step's `on_error` is `dead_letter`); the rest go on.
                Err(e) if e.kind() == ErrorKind::Data => {
                    let reason = e.to_string();
                    out.rejected
                        .extend((from..from + n).map(|row| (row as u32, reason.clone())));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Step `index` on `batch`: its output, or, on a poison failure the step isolates, the rows
    /// that went through and those that failed alone.
    fn handle(&mut self, index: usize, batch: &RecordBatch) -> Result<Handled, PluginError> {
        match self.steps[index].process(batch) {
            Ok(output) => {
                self.note(index, Entry::Batch(batch.clone()));
                Ok(Handled {
                    batches: output.batches,
                    rejected: output
                        .rejected
                        .into_iter()
                        .map(|r| (r.row as u32, r.reason))
                        .collect(),
                })
            }
            Err(e) if is_poison(&e) && self.isolates(index) && batch.num_rows() > 0 => {
                // One WARN per row isolated (in `bisect`), not another for the search.
                tracing::debug!(
                    step = self.steps[index].name(),
                    rows = batch.num_rows(),
                    "{e}; rebuilding the instance from its last snapshot to find the rows that fail"
                );
                let mut out = Handled::default();
                self.bisect(index, batch, 0, batch.num_rows(), &e, &mut out)?;
                Ok(out)
            }
            Err(e) => Err(e),
        }
    }

    /// What each step does with a batch it refuses (`bad-input`), in step order.
    pub fn with_policies(mut self, policies: Vec<OnError>) -> Self {
        for (slot, p) in self.policies.iter_mut().zip(policies) {
            *slot = p;
        }
        self
    }

    /// Also hands out what step `index` emits (for sinks reading an earlier stage).
    pub fn tap(&mut self, index: usize) {
        if let Some(t) = self.tapped.get_mut(index) {
            *t = true;
        }
    }

    /// The steps.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The steps, mutably (to snapshot, restore or rebuild them).
    pub fn steps_mut(&mut self) -> &mut [Step] {
        &mut self.steps
    }

    /// Runs one batch through every step.
    pub fn process(&mut self, batch: RecordBatch) -> Result<ChainOutput, PluginError> {
        self.release();
        let mut out = ChainOutput::default();
        out.batches = self.run_from(0, vec![batch], &mut out)?;
        Ok(out)
    }

    /// Advances event time to `ts_ms` in every step, in order.
    pub fn watermark(&mut self, ts_ms: i64) -> Result<ChainOutput, PluginError> {
        self.release();
        let mut out = ChainOutput::default();
        for i in 0..self.steps.len() {
            let emitted = self.steps[i].on_watermark(ts_ms)?;
            self.note(i, Entry::Watermark(ts_ms));
            if self.tapped[i] && i + 1 < self.steps.len() {
                out.taps
                    .extend(emitted.batches.iter().map(|b| (i, b.clone())));
            }
            let batches = self.run_from(i + 1, emitted.batches, &mut out)?;
            out.batches.extend(batches);
        }
        Ok(out)
    }

    fn run_from(
        &mut self,
        first: usize,
        mut batches: Vec<RecordBatch>,
        out: &mut ChainOutput,
    ) -> Result<Vec<RecordBatch>, PluginError> {
        let last = self.steps.len().saturating_sub(1);
        for index in first..self.steps.len() {
            let mut next = Vec::with_capacity(batches.len());
            for batch in &batches {
                let output = match self.handle(index, batch) {
                    Ok(output) => output,
                    Err(e)
                        if e.kind() == ErrorKind::Data && self.policies[index] != OnError::Fail =>
                    {
                        out.refused.push(RefusedBatch {
                            step: self.steps[index].name().to_string(),
                            rows: batch.clone(),
                            reason: e.to_string(),
                            policy: self.policies[index],
                        });
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if !output.rejected.is_empty() {
                    let step = &self.steps[index];
                    let indices =
                        UInt32Array::from_iter_values(output.rejected.iter().map(|(row, _)| *row));
                    let rows =
                        take_record_batch(batch, &indices).map_err(|e| PluginError::Protocol {
                            plugin: step.plugin().to_string(),
                            step: step.name().to_string(),
                            call: "process",
                            message: format!("taking rejected rows: {e}"),
                        })?;
                    out.rejected.push(RejectedRows {
                        step: step.name().to_string(),
                        rows,
                        reasons: output.rejected.into_iter().map(|(_, r)| r).collect(),
                        indices: indices.values().to_vec(),
                    });
                }
                next.extend(output.batches);
            }
            if self.tapped[index] && index < last {
                out.taps.extend(next.iter().map(|b| (index, b.clone())));
            }
            batches = next;
        }
        Ok(batches)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
    use flowgate_sdk::DynTransform;
    use flowgate_sdk::Output;

    use super::*;
    use crate::plugin::NativeFactory;

    /// Passes batches through; or refuses every batch as bad input.
    struct Fixed {
        refuse: bool,
    }

    impl DynTransform for Fixed {
        fn process(&mut self, batch: RecordBatch) -> flowgate_sdk::Result<Output> {
            if self.refuse {
                return Err(flowgate_sdk::Error::bad_input("no thanks"));
            }
            Ok(Output::batch(batch))
        }
        fn on_watermark(&mut self, _ts_ms: i64) -> flowgate_sdk::Result<Output> {
            Ok(Output::empty())
        }
        fn snapshot(&self) -> flowgate_sdk::Result<Vec<u8>> {
            Ok(Vec::new())
        }
        fn restore(&mut self, _state: &[u8]) -> flowgate_sdk::Result<()> {
            Ok(())
        }
    }

    fn step(name: &str, refuse: bool, schema: &SchemaRef) -> Step {
        let factory: NativeFactory = Arc::new(move |_config: &str, input: &SchemaRef| {
            Ok((
                Box::new(Fixed { refuse }) as Box<dyn DynTransform>,
                input.clone(),
            ))
        });
        Step::native(factory, name, name, "{}", schema).unwrap()
    }

    /// Counts rows. Its whole state is the count and 1,000 bytes of padding, or, if it
    /// `grows` (remembers every row), a byte per row counted; a delta is the rows counted since
    /// the last one, and a byte per row.
    struct Counter {
        n: u64,
        since: u64,
        grows: bool,
    }

    impl DynTransform for Counter {
        fn process(&mut self, batch: RecordBatch) -> flowgate_sdk::Result<Output> {
            self.n += batch.num_rows() as u64;
            self.since += batch.num_rows() as u64;
            Ok(Output::batch(batch))
        }
        fn on_watermark(&mut self, _ts_ms: i64) -> flowgate_sdk::Result<Output> {
            Ok(Output::empty())
        }
        fn snapshot(&self) -> flowgate_sdk::Result<Vec<u8>> {
            let mut state = self.n.to_le_bytes().to_vec();
            state.resize(8 + if self.grows { self.n as usize } else { 1000 }, 0);
            Ok(state)
        }
        fn restore(&mut self, state: &[u8]) -> flowgate_sdk::Result<()> {
            self.n = u64::from_le_bytes(state[..8].try_into().expect("8 bytes"));
            self.since = 0;
            Ok(())
        }
        fn snapshot_delta(&mut self) -> flowgate_sdk::Result<Option<Vec<u8>>> {
            let since = std::mem::take(&mut self.since);
            let mut delta = since.to_le_bytes().to_vec();
            delta.resize(8 + since as usize, 0);
            Ok(Some(delta))
        }
        fn restore_delta(&mut self, delta: &[u8]) -> flowgate_sdk::Result<()> {
            self.n += u64::from_le_bytes(delta[..8].try_into().expect("8 bytes"));
            self.since = 0;
            Ok(())
        }
    }

    fn counter(schema: &SchemaRef) -> Step {
        counting(schema, false)
    }

    fn counting(schema: &SchemaRef, grows: bool) -> Step {
        let factory: NativeFactory = Arc::new(move |_config: &str, input: &SchemaRef| {
            Ok((
                Box::new(Counter {
                    n: 0,
                    since: 0,
                    grows,
                }) as Box<dyn DynTransform>,
                input.clone(),
            ))
        });
        Step::native(factory, "counter", "counter", "{}", schema).unwrap()
    }

    /// The counter tests' input: one int64 column `v`.
    fn counted() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]))
    }

    /// `n` rows of [`counted`].
    fn rows(schema: &SchemaRef, n: i64) -> RecordBatch {
        RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from_iter_values(0..n))],
        )
        .unwrap()
    }

    /// The base of step 0 as (full snapshot, deltas), `None` for the full one if let go.
    fn held(chain: &Chain) -> (Option<Bytes>, Vec<Bytes>) {
        let base = chain.base[0].clone().expect("a state to rebuild from");
        let full = match base.start {
            Start::Held(full) => Some(full),
            Start::Stored { .. } => None,
        };
        (full, base.deltas)
    }

    #[test]
    fn the_state_a_rebuild_starts_from_is_the_checkpoint_s_bytes_not_a_copy_of_them() {
        let schema = counted();
        let rows = |n: i64| rows(&schema, n);
        let mut chain = Chain::new(vec![counter(&schema)]);
        chain.process(rows(3)).unwrap();
        let full = chain.checkpoint(1, false).unwrap().remove(0);
        assert_eq!(full.delta_of, None);
        assert_eq!(held(&chain).0.unwrap().as_ptr(), full.bytes.as_ptr());
        chain.process(rows(2)).unwrap();
        let delta = chain.checkpoint(2, false).unwrap().remove(0);
        assert_eq!(delta.delta_of, Some(1));
        let (base_full, deltas) = held(&chain);
        assert_eq!(base_full.unwrap().as_ptr(), full.bytes.as_ptr());
        assert_eq!(deltas.len(), 1);
        assert_eq!(deltas[0].as_ptr(), delta.bytes.as_ptr());

        // A restore holds the stored bytes it was given, and rebuilds from them.
        let stored = crate::checkpoint::StepChain {
            step: "counter".into(),
            full: full.bytes.clone(),
            deltas: vec![delta.bytes.clone()],
            root: 1,
        };
        let mut restored = Chain::new(vec![counter(&schema)]);
        restored.restore_stored(0, &stored, 2).unwrap();
        let (base_full, deltas) = held(&restored);
        assert_eq!(base_full.unwrap().as_ptr(), stored.full.as_ptr());
        assert_eq!(deltas[0].as_ptr(), stored.deltas[0].as_ptr());
        restored.recover(0).unwrap();
        assert_eq!(restored.snapshot().unwrap()[0].1[..8], 5u64.to_le_bytes());
    }

    /// Saves `snapshots` (one partition's checkpoint `epoch`) in `store` as the committer does.
    fn save(store: &dyn crate::checkpoint::StateStore, epoch: u64, snapshots: &[StepSnapshot]) {
        let (steps, root) = StepSnapshot::stored(snapshots.to_vec());
        let state = crate::checkpoint::PartitionState {
            offset: epoch as i64,
            max_event: None,
            watermark: None,
            steps,
            previous: None,
            sources: Vec::new(),
            root,
        };
        store.save("t", 0, epoch, &state).unwrap();
    }

    #[test]
    fn a_saved_state_is_let_go_and_read_back_from_the_store_to_rebuild_the_step() {
        let schema = counted();
        let rows = |n: i64| rows(&schema, n);
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::checkpoint::StateStore> =
            Arc::new(crate::checkpoint::FileStateStore::new(dir.path(), "p"));
        let saved = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stored = || StoredStates {
            store: store.clone(),
            topic: "t".into(),
            partition: 0,
            saved: saved.clone(),
        };
        let isolating =
            || Chain::new(vec![counter(&schema)]).with_policies(vec![OnError::DeadLetter]);
        let mut chain = isolating();
        chain.keep_stored(stored());
        let count = |chain: &mut Chain| {
            u64::from_le_bytes(chain.snapshot().unwrap()[0].1[..8].try_into().unwrap())
        };

        // Checkpoint 1 (whole) is held until the committer says it is saved.
        chain.process(rows(3)).unwrap();
        let first = chain.checkpoint(1, false).unwrap();
        chain.process(rows(0)).unwrap();
        assert_eq!(chain.held_state_bytes(), first[0].bytes.len());
        save(&*store, 1, &first);
        saved.store(1, std::sync::atomic::Ordering::Release);
        chain.process(rows(2)).unwrap();
        assert_eq!(chain.held_state_bytes(), 0, "saved: let go");

        // Checkpoint 2 (a delta on 1) is held on top of the stored 1 until it is saved too.
        let second = chain.checkpoint(2, false).unwrap();
        assert_eq!(second[0].delta_of, Some(1));
        assert_eq!(chain.held_state_bytes(), second[0].bytes.len());
        // A rebuild now reads 1 back and applies the held delta: 3 + 2, then the journal's 4.
        chain.process(rows(4)).unwrap();
        chain.recover(0).unwrap();
        assert_eq!(
            chain.held_state_bytes(),
            first[0].bytes.len() + second[0].bytes.len()
        );
        let (_, deltas) = held(&chain);
        assert_eq!(deltas.len(), 1);
        assert_eq!(
            deltas[0].as_ptr(),
            second[0].bytes.as_ptr(),
            "the held delta, on 1 read back"
        );
        assert_eq!(count(&mut chain), 3 + 2 + 4);

        // Once 2 is saved, both go; a rebuild reads 1 and 2 back (the delta chain).
        let mut chain = isolating();
        chain.keep_stored(stored());
        chain
            .restore_stored(
                0,
                &crate::checkpoint::StepChain {
                    step: "counter".into(),
                    full: first[0].bytes.clone(),
                    deltas: vec![second[0].bytes.clone()],
                    root: 1,
                },
                2,
            )
            .unwrap();
        assert!(chain.held_state_bytes() > 0, "2 is not saved yet");
        save(&*store, 2, &second);
        saved.store(2, std::sync::atomic::Ordering::Release);
        chain.process(rows(7)).unwrap();
        assert_eq!(chain.held_state_bytes(), 0, "2 saved: let go");
        chain.recover(0).unwrap();
        assert_eq!(count(&mut chain), 3 + 2 + 7, "read back, then the journal");

        // A state the store lost is an error that says which step and checkpoint.
        let mut chain = isolating();
        chain.keep_stored(stored());
        chain.process(rows(1)).unwrap();
        let third = chain.checkpoint(3, false).unwrap();
        save(&*store, 3, &third);
        saved.store(3, std::sync::atomic::Ordering::Release);
        chain.process(rows(1)).unwrap();
        assert_eq!(chain.held_state_bytes(), 0);
        store.prune("t", 0, 4).unwrap();
        let err = chain.recover(0).unwrap_err().to_string();
        assert!(
            err.contains("step `counter`")
                && err.contains("reading its state at checkpoint 3 back from the state store")
                && err.contains("not in the state store"),
            "{err}"
        );
    }

    #[test]
    fn checkpoints_store_deltas_between_full_snapshots_and_a_hurry_puts_a_full_one_off() {
        let schema = counted();
        let rows = |n: i64| rows(&schema, n);
        let mut chain = Chain::new(vec![counter(&schema)]);
        chain.stagger(0); // a full snapshot after 15 deltas
        let mut stored: Vec<StepSnapshot> = Vec::new();
        for epoch in 1..=40u64 {
            chain.process(rows(1)).unwrap();
            // At 17, where a full one is due, the barrier is in a hurry: a delta still.
            let hurry = epoch == 17;
            stored.push(chain.checkpoint(epoch, hurry).unwrap().remove(0));
        }
        let full: Vec<u64> = (1..=40u64)
            .filter(|&e| stored[e as usize - 1].delta_of.is_none())
            .collect();
        assert_eq!(
            full,
            [1, 18, 34],
            "whole at the start, then after 15 deltas"
        );
        for (i, s) in stored.iter().enumerate() {
            let epoch = i as u64 + 1;
            if let Some(previous) = s.delta_of {
                assert_eq!(
                    previous,
                    epoch - 1,
                    "a delta goes on from the checkpoint before"
                );
                assert_eq!(s.root, *full.iter().rfind(|&&f| f < epoch).unwrap());
            }
        }
        // The state at 40 from the whole one at 34 and the deltas after it: 40 rows.
        let chain_at_40 = crate::checkpoint::StepChain {
            step: "counter".into(),
            full: stored[33].bytes.clone(),
            deltas: stored[34..].iter().map(|s| s.bytes.clone()).collect(),
            root: 34,
        };
        let mut restored = Chain::new(vec![counter(&schema)]);
        restored.restore_stored(0, &chain_at_40, 40).unwrap();
        assert_eq!(restored.snapshot().unwrap()[0].1[..8], 40u64.to_le_bytes());

        // Deltas that outgrow the whole state bring the next full snapshot forward.
        let mut chain = Chain::new(vec![counter(&schema)]);
        chain.stagger(0); // once they pass 1 time the whole state
        chain.process(rows(1)).unwrap();
        assert!(chain.checkpoint(1, false).unwrap()[0].delta_of.is_none());
        chain.process(rows(1)).unwrap();
        let small = chain.checkpoint(2, false).unwrap().remove(0);
        assert_eq!(small.delta_of, Some(1));
        let mut n = 2u64;
        for epoch in 3..6 {
            chain.process(rows(600)).unwrap();
            n += 600;
            let s = chain.checkpoint(epoch, false).unwrap().remove(0);
            // 1,008 bytes whole; deltas of 9, 608 and 608 bytes: past it after the third.
            assert_eq!(s.delta_of.is_none(), epoch == 5, "epoch {epoch}");
        }
        assert_eq!(chain.snapshot().unwrap()[0].1[..8], n.to_le_bytes());
    }

    #[test]
    fn a_state_that_grows_by_its_deltas_is_not_snapshotted_whole_for_outgrowing_the_last_one() {
        let schema = counted();
        let mut chain = Chain::new(vec![counting(&schema, true)]);
        chain.stagger(0); // a full snapshot after 15 deltas, or deltas past the whole state
        let rows = rows(&schema, 100);
        let mut stored: Vec<StepSnapshot> = Vec::new();
        for epoch in 1..=40u64 {
            chain.process(rows.clone()).unwrap();
            stored.push(chain.checkpoint(epoch, false).unwrap().remove(0));
        }
        let full: Vec<u64> = (1..=40u64)
            .filter(|&e| stored[e as usize - 1].delta_of.is_none())
            .collect();
        // Whole at the start (108 bytes); at 4 the deltas before it (2 × 108) have passed
        // that, and the whole state (408) shows they grew it (by 300 of their 324 bytes): from
        // then on the count brings the full ones (without the growth: at 1, 4, 9, 19, 35).
        assert_eq!(full, [1, 4, 20, 36]);
        // The state at 40 from the whole one at 36 and the deltas after it.
        let at_40 = crate::checkpoint::StepChain {
            step: "counter".into(),
            full: stored[35].bytes.clone(),
            deltas: stored[36..].iter().map(|s| s.bytes.clone()).collect(),
            root: 36,
        };
        let mut restored = Chain::new(vec![counting(&schema, true)]);
        restored.restore_stored(0, &at_40, 40).unwrap();
        assert_eq!(
            restored.snapshot().unwrap()[0].1[..8],
            4000u64.to_le_bytes()
        );
    }

    #[test]
    fn the_bytes_rule_counts_the_deltas_that_did_not_grow_the_state_and_never_switches_off() {
        let track = |growth: f64, delta_bytes: usize| Track {
            baseline: Some(1),
            root: 1,
            deltas: 3,
            delta_bytes,
            full_bytes: 1000,
            growth,
        };
        // Without growth, as before: deltas past the whole state (limit 16: once).
        assert!(!track(0.0, 1000).full_due(16) && track(0.0, 1001).full_due(16));
        // In a hurry (limit 32), twice that.
        assert!(!track(0.0, 2000).full_due(32) && track(0.0, 2001).full_due(32));
        // Half the deltas grew the state: twice the bytes.
        assert!(!track(0.5, 2000).full_due(16) && track(0.5, 2001).full_due(16));
        // A state that grew by all of its deltas (or did until now): four times, never more.
        assert!(!track(1.0, 4000).full_due(16) && track(1.0, 4001).full_due(16));
        assert!(track(1.0, 8001).full_due(32));
        // The count rule is unchanged.
        let mut many = track(1.0, 0);
        many.deltas = 15;
        assert!(many.full_due(16));
    }

    #[test]
    fn a_refused_batch_keeps_what_the_steps_before_it_emitted() {
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![1, 2]))])
                .unwrap();
        let mut chain = Chain::new(vec![
            step("first", false, &schema),
            step("second", true, &schema),
            step("third", false, &schema),
        ])
        .with_policies(vec![OnError::Fail, OnError::DeadLetter, OnError::Fail]);
        chain.tap(0);
        let out = chain.process(batch.clone()).unwrap();
        assert_eq!(out.taps.len(), 1, "the tap of the step before the refusal");
        assert_eq!(out.taps[0].1, batch);
        assert!(out.batches.is_empty());
        assert_eq!(out.refused.len(), 1);
        assert_eq!(out.refused[0].step, "second");
        assert_eq!(out.refused[0].rows, batch);
        assert_eq!(out.refused[0].policy, OnError::DeadLetter);

        // `fail` stops the chain with the error.
        let mut failing = Chain::new(vec![
            step("first", false, &schema),
            step("second", true, &schema),
        ]);
        assert!(failing.process(batch).is_err());
    }
}

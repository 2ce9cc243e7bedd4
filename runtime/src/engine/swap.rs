//! Live swap: `flowgate run` watches its pipeline file and every plugin file it loaded (and
//! reloads on SIGHUP). On a change the reloader thread builds the new plan beside the running
//! one: the file is parsed and checked, every plugin loaded and every step created, and each
//! sink's stage schema compared with the one its table was opened on. Anything wrong is logged
//! with its location, and the old plan runs on.
//!
//! A good plan goes to the source loop, which switches at its next epoch barrier: each worker
//! finishes and checkpoints the epoch with the old steps, then prepares a chain of the new plan
//! for each of its partitions, restoring every step whose name survives from the old step's
//! state. Only when every worker has every chain ready does the loop tell them to switch; a
//! plugin that cannot restore its step's state (and a step without `state: reset`) refuses the
//! whole swap, and the old chains, untouched, go on. Records after the barrier go to the new
//! chains, so nothing taken from the source is processed twice or skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::plan::Plan;
use crate::config::Pipeline;
use crate::plugin::{PluginHost, same_fields};

/// How often the watched files are looked at.
const POLL: Duration = Duration::from_millis(500);

/// A new plan, built and checked, for the source loop to switch to at its next barrier.
pub(crate) struct Candidate {
    pub pipeline: Pipeline,
    pub plan: Arc<Plan>,
    /// What changes, for the log and the run report (`validate (config) → dedup → …`).
    pub changes: String,
    /// Per step of the new plan: the index of the running step it is (same name, plugin,
    /// config and input schema), carried over as it is; `None`: a fresh instance, restored
    /// from the running step of its name if there is one.
    pub carry: Vec<Option<usize>>,
    /// The loop's answer: `Ok` once switched, else why not.
    pub outcome: Sender<Result<(), String>>,
}

/// One swap as the run report lists it.
#[derive(Debug, Clone)]
pub struct SwapRecord {
    /// The epoch barrier it happened at (0: refused before reaching one).
    pub epoch: u64,
    /// What changed.
    pub changes: String,
    /// How long the source loop held input back: from the barrier to every worker switched.
    pub pause: Duration,
    /// The part of `pause` spent waiting for the epoch before the swap to commit.
    pub commit_wait: Duration,
    /// `None` if applied, else why the old plan runs on.
    pub refused: Option<String>,
    /// When it was decided (records are listed in this order).
    pub at: std::time::Instant,
}

/// What the reloader watches and how it is told to stop.
pub(crate) struct Watch {
    /// The `--set` values the pipeline file was loaded with.
    pub vars: HashMap<String, String>,
    /// Look at the files every [`POLL`] (else only SIGHUP reloads).
    pub files: bool,
    /// Set by the SIGHUP handler.
    pub hangup: Arc<AtomicBool>,
    /// Changes refused before they reached a barrier (the file does not load, a step cannot
    /// be built): the run report lists them with the swaps.
    pub refusals: Arc<std::sync::Mutex<Vec<SwapRecord>>>,
    /// The status page lists them too.
    pub metrics: Arc<crate::exporter::Metrics>,
    pub stop: Arc<AtomicBool>,
    /// The running half of a repartitioned pipeline, from the whole file as loaded.
    pub derive: Option<Derive>,
}

/// Turns a loaded pipeline into the part of it a half runs.
pub(crate) type Derive = Arc<dyn Fn(Pipeline) -> Pipeline + Send + Sync>;

/// The running plan's files as they were when it was built: taken before the plan is built,
/// so a change during the build shows as a change (a swap to the same steps at worst), never
/// as nothing.
pub(crate) struct Baseline {
    prints: Vec<Fingerprint>,
    signatures: Vec<Option<Signature>>,
}

impl Baseline {
    /// The files of `pipeline` now.
    pub fn of(pipeline: &Pipeline) -> Self {
        Baseline {
            // Unreadable plugin files fail the plan's build; here they only make any reload
            // count as a change.
            prints: fingerprints(pipeline).unwrap_or_default(),
            signatures: signatures(&watched_files(pipeline)),
        }
    }

    /// After the plan is built: if a plugin file changed while it was loaded, which bytes run
    /// is unknown, so no step counts as unchanged at the next reload.
    pub fn settle(mut self, pipeline: &Pipeline) -> Self {
        if fingerprints(pipeline).ok().as_ref() != Some(&self.prints) {
            self.prints.clear();
        }
        self
    }
}

/// The reloader thread's body: runs until `watch.stop`, or until the loop stops listening.
pub(crate) fn reloader(
    host: &PluginHost,
    mut running: Pipeline,
    mut plan: Arc<Plan>,
    baseline: Baseline,
    watch: Watch,
    to_loop: SyncSender<Candidate>,
) {
    let mut prints = baseline.prints;
    let mut files = watched_files(&running);
    // The files as last looked at for a reload: only a further change triggers another.
    let mut seen = baseline.signatures;
    let mut last = seen.clone();
    loop {
        let mut slept = Duration::ZERO;
        while slept < POLL {
            if watch.stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
            slept += Duration::from_millis(50);
        }
        let hangup = watch.hangup.swap(false, Ordering::Relaxed);
        let now = signatures(&files);
        // A file still being written changes between two looks: wait until it holds still.
        let settled = now == last;
        last = now.clone();
        if !(hangup || (watch.files && settled && now != seen)) {
            continue;
        }
        seen = now;
        let file = running.file.clone();
        if hangup {
            tracing::info!("SIGHUP: reloading {}", file.display());
        } else {
            tracing::info!("{} or a plugin it loads changed: reloading", file.display());
        }
        let loaded = Pipeline::load(&file, &watch.vars).map(|p| match &watch.derive {
            Some(derive) => derive(p),
            None => p,
        });
        if let Ok(pipeline) = &loaded {
            // The plugin files the file names now are watched from here on, applied or not
            // (a plugin the new file names may not be built yet). The pipeline file keeps the
            // signature it had before it was read: a save since then is a change still to load.
            let pipeline_file = seen.first().cloned().flatten();
            files = watched_files(pipeline);
            seen = signatures(&files);
            if let Some(first) = seen.first_mut() {
                *first = pipeline_file;
            }
            last = seen.clone();
        }
        let next_prints = loaded.as_ref().ok().map(fingerprints);
        let built = loaded.map_err(|e| e.to_string()).and_then(|pipeline| {
            let next_prints = next_prints.unwrap_or(Ok(Vec::new()))?;
            candidate(host, &running, &plan, &prints, pipeline, next_prints)
        });
        match built {
            Err(problem) => {
                tracing::error!(
                    "the change to {} is not applied, the running plan goes on: {problem}",
                    file.display()
                );
                let record = SwapRecord {
                    epoch: 0,
                    changes: format!("the change to {}", file.display()),
                    pause: Duration::ZERO,
                    commit_wait: Duration::ZERO,
                    refused: Some(problem),
                    at: std::time::Instant::now(),
                };
                watch.metrics.board.swap(crate::metrics::swap_json(&record));
                if let Ok(mut refusals) = watch.refusals.lock() {
                    refusals.push(record);
                }
            }
            Ok(None) => {
                tracing::info!("reload: the steps, their plugins and configs are the same")
            }
            Ok(Some((pipeline, next, next_prints, changes, carry))) => {
                let (outcome, answer) = mpsc::channel();
                let offer = Candidate {
                    pipeline: pipeline.clone(),
                    plan: next.clone(),
                    changes,
                    carry,
                    outcome,
                };
                if to_loop.send(offer).is_err() {
                    return;
                }
                // The loop answers at its next barrier (or a later one).
                loop {
                    match answer.recv_timeout(Duration::from_millis(100)) {
                        Ok(Ok(())) => {
                            running = pipeline;
                            plan = next;
                            prints = next_prints;
                            break;
                        }
                        Ok(Err(_)) => break,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            if watch.stop.load(Ordering::Relaxed) {
                                return;
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            }
        }
    }
}

/// The pipeline file and every plugin file it names.
fn watched_files(pipeline: &Pipeline) -> Vec<PathBuf> {
    let mut files = vec![pipeline.file.clone()];
    files.extend(
        pipeline
            .spec
            .transforms
            .iter()
            .map(|t| pipeline.resolve(&t.plugin)),
    );
    files
}

/// What tells a file changed without reading it: length, modification time, and (on Unix) the
/// inode and change time, so a file replaced by a copy of the same size and mtime (`cp -p`,
/// `rsync -t`) still shows.
type Signature = (u64, SystemTime, u64, i64, i64);

/// Each file's [`Signature`] (`None`: missing).
fn signatures(files: &[PathBuf]) -> Vec<Option<Signature>> {
    files
        .iter()
        .map(|f| {
            let meta = std::fs::metadata(f).ok()?;
            #[cfg(unix)]
            let (ino, ctime, ctime_ns) = {
                use std::os::unix::fs::MetadataExt;
                (meta.ino(), meta.ctime(), meta.ctime_nsec())
            };
            #[cfg(not(unix))]
            let (ino, ctime, ctime_ns) = (0, 0, 0);
            Some((meta.len(), meta.modified().ok()?, ino, ctime, ctime_ns))
        })
        .collect()
}

/// A new plan for `pipeline` (the file as it is now; `next_prints` its steps, taken before the
/// build), checked against the running one. `None`: nothing a swap would change.
#[allow(clippy::type_complexity)]
fn candidate(
    host: &PluginHost,
    running: &Pipeline,
    plan: &Plan,
    prints: &[Fingerprint],
    pipeline: Pipeline,
    next_prints: Vec<Fingerprint>,
) -> Result<
    Option<(
        Pipeline,
        Arc<Plan>,
        Vec<Fingerprint>,
        String,
        Vec<Option<usize>>,
    )>,
    String,
> {
    let fixed = fixed_changes(&running.text, &pipeline.text, &running.file)?;
    if !fixed.is_empty() {
        return Err(format!(
            "{}: {} changed: a live swap changes `transforms` only (steps, their plugins and configs); restart the pipeline to apply a change to {}",
            running.file.display(),
            fixed
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", "),
            if fixed.len() == 1 { "it" } else { "them" }
        ));
    }
    if prints == next_prints.as_slice() {
        return Ok(None);
    }
    let next = Plan::build(&pipeline, host).map_err(|e| e.to_string())?;
    if fingerprints(&pipeline)? != next_prints {
        return Err(format!(
            "{}: a plugin file changed while it was loaded; the next look at the files tries again",
            pipeline.file.display()
        ));
    }
    // Each sink keeps the schema its table was opened on.
    for (name, sink) in pipeline.spec.sinks.iter() {
        let from = sink.from.as_deref();
        let (was, now) = (
            &plan.stages[plan.stage_of(from)],
            &next.stages[next.stage_of(from)],
        );
        if !same_fields(was, now) {
            return Err(format!(
                "{}: sink `{name}` would get rows of another schema: {} instead of {}; a live swap keeps every sink's schema: restart the pipeline to change a table's",
                pipeline.locate_key(&format!("sinks.{name}")),
                flowgate_sdk::columns::describe_schema(now),
                flowgate_sdk::columns::describe_schema(was),
            ));
        }
    }
    let mut changes = describe_changes(prints, &next_prints);
    // A step that is the same (plugin bytes, config, policies, input schema) keeps running as
    // it is: no snapshot, no restore, whatever its state's size.
    let carry = next_prints
        .iter()
        .enumerate()
        .map(|(i, print)| {
            let j = prints.iter().position(|p| p.name == print.name)?;
            // The input schema exactly (nullability and metadata too): a carried instance
            // keeps the schema it was created with for the batches it reads.
            (prints[j] == *print && plan.stages[j].fields() == next.stages[i].fields()).then_some(j)
        })
        .collect::<Vec<_>>();
    let carried: Vec<&str> = carry
        .iter()
        .zip(&next_prints)
        .filter(|(c, _)| c.is_some())
        .map(|(_, p)| p.name.as_str())
        .collect();
    if !carried.is_empty() {
        changes.push_str(&format!("; carried as they are: {}", carried.join(", ")));
    }
    Ok(Some((
        pipeline,
        Arc::new(next),
        next_prints,
        changes,
        carry,
    )))
}

/// Top-level keys other than `transforms` whose value differs between two pipeline texts.
fn fixed_changes(old: &str, new: &str, file: &Path) -> Result<Vec<String>, String> {
    let label = file.display().to_string();
    let parse = |text: &str| -> Result<serde_json::Map<String, serde_json::Value>, String> {
        crate::yaml::from_str(text, &label).map_err(|e| e.to_string())
    };
    let (old, new) = (parse(old)?, parse(new)?);
    let mut keys: Vec<String> = old
        .keys()
        .chain(new.keys())
        .filter(|k| *k != "transforms" && old.get(*k) != new.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// What makes a step what it is: its name, its plugin's content (not its path: the same
/// plugin named another way is no change), its config and policies.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint {
    name: String,
    digest: Vec<u8>,
    config: String,
}

fn fingerprints(pipeline: &Pipeline) -> Result<Vec<Fingerprint>, String> {
    pipeline
        .spec
        .transforms
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let plugin = pipeline.resolve(&t.plugin);
            let bytes = std::fs::read(&plugin).map_err(|e| {
                format!(
                    "{}: cannot read `{}`: {e}",
                    pipeline.locate_key(&format!("transforms[{i}].plugin")),
                    plugin.display()
                )
            })?;
            Ok(Fingerprint {
                name: t.name.clone(),
                digest: Sha256::digest(&bytes).to_vec(),
                config: format!("{} {:?} {:?} {:?}", t.config, t.on_error, t.state, t.grants),
            })
        })
        .collect()
}

/// `validate (config) → dedup → window (new plugin) → pct_change; removed: x`.
fn describe_changes(old: &[Fingerprint], new: &[Fingerprint]) -> String {
    let steps: Vec<String> = new
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let Some((j, was)) = old.iter().enumerate().find(|(_, o)| o.name == f.name) else {
                return format!("{} (added)", f.name);
            };
            let mut what = Vec::new();
            if was.digest != f.digest {
                what.push("new plugin");
            }
            if was.config != f.config {
                what.push("config");
            }
            if i != j && what.is_empty() {
                what.push("moved");
            }
            if what.is_empty() {
                f.name.clone()
            } else {
                format!("{} ({})", f.name, what.join(", "))
            }
        })
        .collect();
    let removed: Vec<&str> = old
        .iter()
        .filter(|o| !new.iter().any(|f| f.name == o.name))
        .map(|o| o.name.as_str())
        .collect();
    let mut text = steps.join(" → ");
    if !removed.is_empty() {
        text.push_str(&format!("; removed: {}", removed.join(", ")));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn print(name: &str, _plugin: &str, digest: u8, config: &str) -> Fingerprint {
        Fingerprint {
            name: name.into(),
            digest: vec![digest],
            config: config.into(),
        }
    }

    #[test]
    fn only_transforms_may_change_live() {
        let old = "name: p\nsource:\n  file:\n    path: a.jsonl\ntransforms:\n  - name: a\n";
        let new = "name: p\nsource:\n  file:\n    path: b.jsonl\ntransforms:\n  - name: b\n";
        let file = Path::new("p.yaml");
        assert_eq!(
            fixed_changes(old, new, file),
            Ok(vec!["source".to_string()])
        );
        let steps_only = old.replace("name: a", "name: c");
        assert_eq!(fixed_changes(old, &steps_only, file), Ok(vec![]));
        let added = format!("{old}metrics:\n  listen: 127.0.0.1:9\n");
        assert_eq!(
            fixed_changes(old, &added, file),
            Ok(vec!["metrics".to_string()])
        );
    }

    #[test]
    fn changes_name_each_step_that_differs() {
        let old = vec![
            print("validate", "v.wasm", 1, "{}"),
            print("dedup", "d.wasm", 2, "{}"),
            print("window", "w.wasm", 3, "{}"),
        ];
        let new = vec![
            print("validate", "v.wasm", 1, "{\"x\":1}"),
            print("window", "w.wasm", 4, "{}"),
            print("count", "c.wasm", 5, "{}"),
        ];
        assert_eq!(
            describe_changes(&old, &new),
            "validate (config) → window (new plugin) → count (added); removed: dedup"
        );
        let moved = vec![
            print("dedup", "d.wasm", 2, "{}"),
            print("validate", "v.wasm", 1, "{}"),
        ];
        assert_eq!(
            describe_changes(&old[..2], &moved),
            "dedup (moved) → validate (moved)"
        );
    }
}

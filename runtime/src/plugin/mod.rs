//! The WebAssembly plugin host: loads plugin components (through the compiled-plugin cache),
//! sandboxes them, and runs their calls with a time limit and a memory cap.
//!
//! One [`PluginHost`] per process owns the wasmtime engine and its epoch ticker. A [`Plugin`] is
//! one compiled `.wasm`; each pipeline step and partition gets its own [`Step`] (a store, an
//! instance and the plugin's `transformer` resource), reused across batches.

mod cache;
mod chain;
mod error;
mod printed;
mod step;
mod ticker;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Engine};

pub use cache::{COMPILATIONS, LoadStats, default_dir as default_cache_dir};
pub use chain::{
    Base, Chain, ChainOutput, JOURNAL_CHECKPOINT, RefusedBatch, RejectedRows, StepParts,
    StepSnapshot, StoredStates,
};
pub use error::{ErrorKind, PluginError, PluginFault};
pub use step::{Grants, NativeFactory, Rejection, Step, StepOutput, StepTimings, same_fields};

use step::HostState;
use ticker::Ticker;

/// Generated from `wit/flowgate.wit`.
pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../wit",
    });
}

/// The optional `incremental` export (incremental checkpoints), looked up apart from the
/// `plugin` world's exports, so plugins without it load as before.
pub(crate) mod incremental_bindings {
    wasmtime::component::bindgen!({
        world: "incremental-plugin",
        path: "../wit",
        with: {
            "flowgate:plugin/types": super::bindings::flowgate::plugin::types,
            "flowgate:plugin/log": super::bindings::flowgate::plugin::log,
        },
    });
}

/// Engine-wide limits for plugin calls.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Folder for compiled artifacts; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// Longest a single call may run before it is interrupted.
    pub call_timeout: Duration,
    /// Most linear memory one instance may hold, in bytes.
    pub memory_limit: usize,
    /// How plugins are compiled to machine code.
    pub compile: Compile,
}

/// How the host compiles a plugin's WebAssembly to machine code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compile {
    /// Optimized code: what a pipeline runs.
    #[default]
    Optimized,
    /// Winch, wasmtime's baseline compiler (Cranelift unoptimized where Winch has no backend):
    /// one pass, no optimizations, so a plugin is ready several times sooner and runs slower.
    /// For the plugin harness, where a rebuilt plugin is compiled anew and then runs a few rows.
    Quick,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            cache_dir: default_cache_dir(),
            call_timeout: Duration::from_secs(5),
            memory_limit: 256 << 20,
            compile: Compile::default(),
        }
    }
}

/// How often the epoch ticks: the granularity of call time limits.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The process-wide plugin host.
pub struct PluginHost {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    config: HostConfig,
    ticker: Arc<Ticker>,
    natives: std::collections::HashMap<String, NativeFactory>,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PluginHost {
    /// Builds the engine, the sandboxed linker and the epoch ticker.
    pub fn new(config: HostConfig) -> Result<Self, PluginError> {
        let mut wasm = Config::new();
        wasm.wasm_component_model(true);
        wasm.epoch_interruption(true);
        match config.compile {
            Compile::Optimized => {
                wasm.strategy(wasmtime::Strategy::Cranelift);
                wasm.cranelift_opt_level(wasmtime::OptLevel::Speed);
            }
            // Winch compiles for x86_64 and aarch64 only; elsewhere the quick compile is
            // Cranelift without its optimizations.
            Compile::Quick if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) => {
                wasm.strategy(wasmtime::Strategy::Winch);
            }
            Compile::Quick => {
                wasm.strategy(wasmtime::Strategy::Cranelift);
                wasm.cranelift_opt_level(wasmtime::OptLevel::None);
            }
        }
        // `FLOWGATE_WASM_PROFILER=perfmap` writes `/tmp/perf-<pid>.map`, so that `perf report`
        // names the plugins' functions (a plugin built without `strip` keeps their names).
        if std::env::var_os("FLOWGATE_WASM_PROFILER").is_some_and(|v| v == "perfmap") {
            wasm.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&wasm).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let linker = step::linker(&engine).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let ticker = Arc::new(Ticker::default());
        let (ticking, weak) = (ticker.clone(), engine.weak());
        std::thread::Builder::new()
            .name("flowgate-epoch".into())
            .spawn(move || {
                ticking.run(EPOCH_TICK, || match weak.upgrade() {
                    Some(engine) => {
                        engine.increment_epoch();
                        true
                    }
                    None => false,
                })
            })
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(PluginHost {
            engine,
            linker: Arc::new(linker),
            config,
            ticker,
            natives: Default::default(),
        })
    }

    /// Runs the plugin whose `info()` name is `name` as native code linked into this process
    /// instead of its `.wasm`, unsandboxed (no time limit, memory cap or grants). For the
    /// benchmark that measures what the sandbox costs, and for embedders; the `.wasm` is still
    /// loaded, so a pipeline means the same thing either way.
    pub fn link_native(&mut self, name: &str, factory: NativeFactory) {
        self.natives.insert(name.to_string(), factory);
    }

    /// The host's limits.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// Loads a plugin file, compiling it only if the cache has no artifact for it.
    pub fn load(&self, path: &Path) -> Result<Plugin, PluginError> {
        let wasm = std::fs::read(path).map_err(|source| PluginError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let (component, stats) =
            cache::load(&self.engine, self.config.cache_dir.as_deref(), path, &wasm)?;
        let invalid = |e: wasmtime::Error| PluginError::Invalid {
            path: path.to_path_buf(),
            message: format!("{e:#}"),
        };
        let pre = self.linker.instantiate_pre(&component).map_err(invalid)?;
        let incremental =
            incremental_bindings::exports::flowgate::plugin::incremental::GuestIndices::new(&pre)
                .ok();
        let pre = bindings::PluginPre::new(pre).map_err(invalid)?;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("plugin")
            .to_string();
        let mut plugin = Plugin {
            inner: Arc::new(step::Loaded {
                name,
                path: path.to_path_buf(),
                pre,
                incremental,
                engine: self.engine.clone(),
                ticker: self.ticker.clone(),
                config: self.config.clone(),
            }),
            stats,
            native: None,
        };
        if !self.natives.is_empty() {
            let info = plugin.info()?;
            plugin.native = self.natives.get(&info.name).cloned();
        }
        Ok(plugin)
    }
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

/// A compiled plugin, ready to instantiate.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<step::Loaded>,
    stats: LoadStats,
    native: Option<NativeFactory>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.inner.name)
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// What a plugin says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Version of its snapshot bytes.
    pub state_version: u32,
}

impl Plugin {
    /// The plugin's name (its file stem).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// How it was loaded (compiled or from the cache, and how long it took).
    pub fn load_stats(&self) -> LoadStats {
        self.stats
    }

    /// Asks the plugin for its name, version and state version.
    pub fn info(&self) -> Result<PluginInfo, PluginError> {
        self.inner.info()
    }

    /// Creates a step: a fresh sandboxed instance, configured with `config_json` (the YAML
    /// `config:` block as JSON) for batches of `input`.
    pub fn instantiate(
        &self,
        step: &str,
        config_json: &str,
        input: &arrow::datatypes::SchemaRef,
        grants: Grants,
    ) -> Result<Step, PluginError> {
        match &self.native {
            Some(factory) => {
                Step::native(factory.clone(), &self.inner.name, step, config_json, input)
            }
            None => Step::new(self.inner.clone(), step, config_json, input, grants),
        }
    }
}

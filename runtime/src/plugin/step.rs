//! One sandboxed plugin instance: a store, its limits, and the plugin's `transformer` resource.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use flowgate_sdk::ipc;
use wasmtime::component::{HasSelf, Linker, ResourceAny, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{
    HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};

use super::bindings::flowgate::plugin::{log, types};
use super::bindings::{self, PluginPre};
use super::{EPOCH_TICK, HostConfig, PluginError, PluginFault, PluginInfo};
use flowgate_sdk::columns::describe_schema;

/// Capabilities a pipeline grants a step beyond the default (a logger and nothing else).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grants {
    /// Real wall and monotonic clocks. Without it both read zero, which keeps replays
    /// deterministic.
    pub clock: bool,
}

/// A compiled plugin with everything needed to instantiate it.
pub(crate) struct Loaded {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) pre: PluginPre<HostState>,
    pub(crate) engine: Engine,
    pub(crate) config: HostConfig,
}

/// Caps linear memory, and remembers a refused growth so the trap that follows can be named.
struct MemoryCap {
    limit: usize,
    refused: Option<usize>,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.refused = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// What a store holds: the WASI context (granting nothing by default), the memory cap, and the
/// step's name for log lines.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    cap: MemoryCap,
    step: Arc<str>,
    plugin: Arc<str>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) {
        let (step, plugin) = (&*self.step, &*self.plugin);
        match level {
            log::Level::Trace => tracing::trace!(step, plugin, "{message}"),
            log::Level::Debug => tracing::debug!(step, plugin, "{message}"),
            log::Level::Info => tracing::info!(step, plugin, "{message}"),
            log::Level::Warn => tracing::warn!(step, plugin, "{message}"),
            log::Level::Error => tracing::error!(step, plugin, "{message}"),
        }
    }
}

/// A clock stuck at the epoch: what a plugin without the `clock` grant sees.
struct StoppedClock;

impl HostWallClock for StoppedClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for StoppedClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// The linker every plugin gets: the logger, and WASI with no files, no environment, no
/// sockets and no stdio (plugins built for `wasm32-wasip2` import these interfaces even when
/// unused; what a context grants is decided per store).
pub(crate) fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    bindings::Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
    Ok(linker)
}

impl Loaded {
    fn store(&self, step: &str, grants: Grants) -> Store<HostState> {
        let mut wasi = WasiCtxBuilder::new();
        if !grants.clock {
            wasi.wall_clock(StoppedClock).monotonic_clock(StoppedClock);
        }
        let state = HostState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            cap: MemoryCap {
                limit: self.config.memory_limit,
                refused: None,
            },
            step: step.into(),
            plugin: self.name.as_str().into(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.cap);
        store.epoch_deadline_trap();
        // Instantiation runs the component's start code: it gets the call time limit too.
        store.set_epoch_deadline(deadline_ticks(self.config.call_timeout));
        store
    }

    /// A fresh store and instance for `step`.
    fn instantiate(
        &self,
        step: &str,
        grants: Grants,
    ) -> Result<(Store<HostState>, bindings::Plugin), PluginError> {
        let mut store = self.store(step, grants);
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| PluginError::Invalid {
                path: self.path.clone(),
                message: format!("{e:#}"),
            })?;
        Ok((store, instance))
    }

    pub(crate) fn info(&self) -> Result<PluginInfo, PluginError> {
        let (mut store, instance) = self.instantiate("info", Grants::default())?;
        let info = instance
            .flowgate_plugin_transform()
            .call_info(&mut store)
            .map_err(|e| classify(e, &store, &self.name, "info", "info", &self.config))?;
        Ok(PluginInfo {
            name: info.name,
            version: info.version,
            state_version: info.state_version,
        })
    }
}

fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}

/// Turns a wasmtime error from a call into the error that says what happened.
fn classify(
    e: wasmtime::Error,
    store: &Store<HostState>,
    plugin: &str,
    step: &str,
    call: &'static str,
    config: &HostConfig,
) -> PluginError {
    let (plugin, step) = (plugin.to_string(), step.to_string());
    if let Some(requested) = store.data().cap.refused {
        return PluginError::MemoryLimit {
            plugin,
            step,
            call,
            limit_mib: config.memory_limit >> 20,
            requested_mib: requested >> 20,
        };
    }
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return PluginError::Timeout {
            plugin,
            step,
            call,
            limit: config.call_timeout,
        };
    }
    PluginError::Trap {
        plugin,
        step,
        call,
        message: format!("{e:?}"),
    }
}

fn fault(e: types::Error) -> PluginFault {
    match e {
        types::Error::InvalidConfig(m) => PluginFault::InvalidConfig(m),
        types::Error::BadInput(m) => PluginFault::BadInput(m),
        types::Error::Internal(m) => PluginFault::Internal(m),
    }
}

/// A row the plugin refused: its index in the input batch, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Row index in the input batch.
    pub row: usize,
    /// The plugin's reason.
    pub reason: String,
}

/// What one call produced.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    /// Result batches, with the step's output schema.
    pub batches: Vec<RecordBatch>,
    /// Input rows the plugin refused.
    pub rejected: Vec<Rejection>,
}

/// One pipeline step's plugin instance (per partition). Reused across batches.
pub struct Step {
    loaded: Arc<Loaded>,
    name: String,
    config_json: String,
    input: SchemaRef,
    output: SchemaRef,
    grants: Grants,
    store: Store<HostState>,
    instance: bindings::Plugin,
    transformer: ResourceAny,
    discarded: bool,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("plugin", &self.loaded.name)
            .finish_non_exhaustive()
    }
}

impl Step {
    pub(crate) fn new(
        loaded: Arc<Loaded>,
        name: &str,
        config_json: &str,
        input: &SchemaRef,
        grants: Grants,
    ) -> Result<Self, PluginError> {
        let (store, instance, transformer, output) =
            Self::build(&loaded, name, config_json, input, grants)?;
        Ok(Step {
            loaded,
            name: name.to_string(),
            config_json: config_json.to_string(),
            input: input.clone(),
            output,
            grants,
            store,
            instance,
            transformer,
            discarded: false,
        })
    }

    #[allow(clippy::type_complexity)]
    fn build(
        loaded: &Loaded,
        name: &str,
        config_json: &str,
        input: &SchemaRef,
        grants: Grants,
    ) -> Result<(Store<HostState>, bindings::Plugin, ResourceAny, SchemaRef), PluginError> {
        let (mut store, instance) = loaded.instantiate(name, grants)?;
        let protocol = |message: String| PluginError::Protocol {
            plugin: loaded.name.clone(),
            step: name.to_string(),
            call: "create",
            message,
        };
        let schema_bytes = ipc::encode_schema(input)
            .map_err(|e| protocol(format!("encoding the input schema: {e}")))?;
        store.set_epoch_deadline(deadline_ticks(loaded.config.call_timeout));
        let created = instance.flowgate_plugin_transform().call_create(
            &mut store,
            config_json,
            &schema_bytes,
        );
        let (transformer, output_bytes) = match created {
            Ok(Ok(created)) => created,
            Ok(Err(e)) => {
                return Err(PluginError::Plugin {
                    plugin: loaded.name.clone(),
                    step: name.to_string(),
                    call: "create",
                    fault: fault(e),
                });
            }
            Err(e) => {
                return Err(classify(
                    e,
                    &store,
                    &loaded.name,
                    name,
                    "create",
                    &loaded.config,
                ));
            }
        };
        let output = ipc::decode_schema(&output_bytes).map_err(|e| {
            protocol(format!(
                "the declared output schema is not valid Arrow IPC: {e}"
            ))
        })?;
        Ok((store, instance, transformer, output))
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's name.
    pub fn plugin(&self) -> &str {
        &self.loaded.name
    }

    /// The schema of the batches this step emits, as the plugin declared it.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output
    }

    /// The schema this step was created for.
    pub fn input_schema(&self) -> &SchemaRef {
        &self.input
    }

    /// Builds a fresh instance with the same config, restoring `state` if given: how a step comes
    /// back after a trap, a timeout or a memory error.
    pub fn rebuild(&mut self, state: Option<&[u8]>) -> Result<(), PluginError> {
        let (store, instance, transformer, output) = Self::build(
            &self.loaded,
            &self.name,
            &self.config_json,
            &self.input,
            self.grants,
        )?;
        (self.store, self.instance, self.transformer, self.output) =
            (store, instance, transformer, output);
        self.discarded = false;
        if let Some(state) = state {
            self.restore(state)?;
        }
        Ok(())
    }

    /// Runs one call with the deadline armed, turning traps into errors and discarding the
    /// instance after one.
    fn call<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(
            &mut Store<HostState>,
            &bindings::Plugin,
            ResourceAny,
        ) -> wasmtime::Result<Result<R, types::Error>>,
    ) -> Result<R, PluginError> {
        if self.discarded {
            return Err(PluginError::Discarded {
                plugin: self.loaded.name.clone(),
                step: self.name.clone(),
            });
        }
        self.store
            .set_epoch_deadline(deadline_ticks(self.loaded.config.call_timeout));
        match f(&mut self.store, &self.instance, self.transformer) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(PluginError::Plugin {
                plugin: self.loaded.name.clone(),
                step: self.name.clone(),
                call,
                fault: fault(e),
            }),
            Err(e) => {
                self.discarded = true;
                Err(classify(
                    e,
                    &self.store,
                    &self.loaded.name,
                    &self.name,
                    call,
                    &self.loaded.config,
                ))
            }
        }
    }

    fn protocol(&self, call: &'static str, message: String) -> PluginError {
        PluginError::Protocol {
            plugin: self.loaded.name.clone(),
            step: self.name.clone(),
            call,
            message,
        }
    }

    fn decode(
        &self,
        call: &'static str,
        output: types::Output,
        input_rows: usize,
    ) -> Result<StepOutput, PluginError> {
        let (schema, batches) = ipc::decode(output.batches)
            .map_err(|e| self.protocol(call, format!("output is not valid Arrow IPC: {e}")))?;
        if let Some(schema) = schema
            && !same_fields(&schema, &self.output)
        {
            return Err(PluginError::SchemaMismatch {
                plugin: self.loaded.name.clone(),
                step: self.name.clone(),
                expected: describe_schema(&self.output),
                got: describe_schema(&schema),
            });
        }
        // Keep the declared schema (and its metadata) on every batch.
        let batches = batches
            .into_iter()
            .map(|b| RecordBatch::try_new(self.output.clone(), b.columns().to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.protocol(call, format!("output batch: {e}")))?;
        let rejected = output
            .rejected
            .into_iter()
            .map(|r| {
                let row = r.row as usize;
                if row >= input_rows {
                    return Err(self.protocol(
                        call,
                        format!("rejected row {row}, but the batch had {input_rows} rows"),
                    ));
                }
                Ok(Rejection {
                    row,
                    reason: r.reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StepOutput { batches, rejected })
    }

    /// Runs `process` on one batch of the input schema.
    pub fn process(&mut self, batch: &RecordBatch) -> Result<StepOutput, PluginError> {
        let bytes = ipc::encode_batches(&self.input, std::slice::from_ref(batch))
            .map_err(|e| self.protocol("process", format!("encoding the input batch: {e}")))?;
        let output = self.call("process", |store, instance, t| {
            instance
                .flowgate_plugin_transform()
                .transformer()
                .call_process(store, t, &bytes)
        })?;
        self.decode("process", output, batch.num_rows())
    }

    /// Tells the step event time reached `ts_ms`; returns what it emits (closed windows).
    pub fn on_watermark(&mut self, ts_ms: i64) -> Result<StepOutput, PluginError> {
        let output = self.call("on-watermark", |store, instance, t| {
            instance
                .flowgate_plugin_transform()
                .transformer()
                .call_on_watermark(store, t, ts_ms)
        })?;
        if !output.rejected.is_empty() {
            return Err(self.protocol(
                "on-watermark",
                "rejected rows, but on-watermark has no input rows".into(),
            ));
        }
        self.decode("on-watermark", output, 0)
    }

    /// The plugin's state, to store with a checkpoint.
    pub fn snapshot(&mut self) -> Result<Vec<u8>, PluginError> {
        self.call("snapshot", |store, instance, t| {
            instance
                .flowgate_plugin_transform()
                .transformer()
                .call_snapshot(store, t)
        })
    }

    /// Replaces the plugin's state with an earlier snapshot.
    pub fn restore(&mut self, state: &[u8]) -> Result<(), PluginError> {
        self.call("restore", |store, instance, t| {
            instance
                .flowgate_plugin_transform()
                .transformer()
                .call_restore(store, t, state)
        })
    }
}

/// Same names, types and order (nullability and metadata aside).
fn same_fields(a: &arrow::datatypes::Schema, b: &arrow::datatypes::Schema) -> bool {
    a.fields().len() == b.fields().len()
        && a.fields()
            .iter()
            .zip(b.fields())
            .all(|(x, y)| x.name() == y.name() && x.data_type() == y.data_type())
}

impl Drop for Step {
    fn drop(&mut self) {
        if !self.discarded {
            let _ = self.transformer.resource_drop(&mut self.store);
        }
    }
}

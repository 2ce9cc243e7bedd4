//! One sandboxed plugin instance: a store, its limits, and the plugin's `transformer` resource.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use flowgate_sdk::DynTransform;
use flowgate_sdk::ipc;
use wasmtime::component::{HasSelf, Linker, ResourceAny, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{
    HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};

use super::bindings::flowgate::plugin::{log, types};
use super::bindings::{self, PluginPre};
use super::incremental_bindings::exports::flowgate::plugin::incremental;
use super::printed::Printed;
use super::ticker::Ticker;
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
    /// Where the optional `incremental` export is, if the plugin has it.
    pub(crate) incremental: Option<incremental::GuestIndices>,
    pub(crate) engine: Engine,
    /// Ticks the epoch while guest code runs: hold [`Ticker::running`] around every call.
    pub(crate) ticker: Arc<Ticker>,
    pub(crate) config: HostConfig,
}

/// Caps linear memory, and remembers a refused growth so the trap that follows can be named.
struct MemoryCap {
    limit: usize,
    refused: Option<usize>,
    /// Linear memory held, in bytes (all memories; a new memory grows from 0).
    size: usize,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.refused = Some(desired);
            return Ok(false);
        }
        self.size += desired.saturating_sub(current);
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
    /// What the plugin's panic hook reported (message and source line) in the current call.
    panic: Option<String>,
    /// What the plugin printed on stdout and stderr since the last call ended.
    printed: Printed,
}

/// How the SDK's panic hook starts the log line it hands the host before the trap.
const PANIC_PREFIX: &str = "panic: ";

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
        if level == log::Level::Error
            && let Some(panic) = message.strip_prefix(PANIC_PREFIX)
        {
            // Reported once, in the trap error that follows.
            self.panic = Some(panic.to_string());
            return;
        }
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
        let printed = Printed::default();
        wasi.stdout(printed.clone()).stderr(printed.clone());
        let state = HostState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            cap: MemoryCap {
                limit: self.config.memory_limit,
                refused: None,
                size: 0,
            },
            step: step.into(),
            plugin: self.name.as_str().into(),
            panic: None,
            printed,
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
    ) -> Result<(Store<HostState>, Exports), PluginError> {
        let mut store = self.store(step, grants);
        // The component's start code runs here.
        let _running = self.ticker.running();
        let invalid = |e: wasmtime::Error| PluginError::Invalid {
            path: self.path.clone(),
            message: format!("{e:#}"),
        };
        let instance = self
            .pre
            .instance_pre()
            .instantiate(&mut store)
            .map_err(|e| match store.data().printed.take() {
                // A trap in the start code: what the plugin printed says why.
                Some(printed) => invalid(e.context(format!("the plugin printed: {printed}"))),
                None => invalid(e),
            })?;
        let plugin = bindings::Plugin::new(&mut store, &instance).map_err(invalid)?;
        let incremental = match &self.incremental {
            Some(indices) => Some(indices.load(&mut store, &instance).map_err(invalid)?),
            None => None,
        };
        Ok((
            store,
            Exports {
                plugin,
                incremental,
            },
        ))
    }

    pub(crate) fn info(&self) -> Result<PluginInfo, PluginError> {
        let (mut store, instance) = self.instantiate("info", Grants::default())?;
        let _running = self.ticker.running();
        let info = instance
            .plugin
            .flowgate_plugin_transform()
            .call_info(&mut store)
            .map_err(|e| classify(e, &store, &self.name, "info", "info", &self.config))?;
        log_printed("info", &self.name, store.data().printed.take());
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
    let printed = store.data().printed.take();
    if let Some(requested) = store.data().cap.refused {
        log_printed(&step, &plugin, printed);
        return PluginError::MemoryLimit {
            plugin,
            step,
            call,
            limit_mib: config.memory_limit >> 20,
            requested_mib: requested >> 20,
        };
    }
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        log_printed(&step, &plugin, printed);
        return PluginError::Timeout {
            plugin,
            step,
            call,
            limit: config.call_timeout,
        };
    }
    // A panic names its message and source line (the SDK's hook told the host); any other trap
    // its cause, and what the plugin printed before it: a JavaScript exception or a Python
    // traceback is printed on stderr, and then the guest traps. The wasm backtrace, frames of
    // `<wasm function N>` in a release build, helps no one reading the error: it goes to the
    // debug log.
    tracing::debug!(step, plugin, "trap: {e:?}");
    let cause = match &store.data().panic {
        Some(panic) => format!("the plugin {panic}"),
        None => e
            .downcast_ref::<Trap>()
            .map_or_else(|| format!("{e}"), |trap| format!("{trap}")),
    };
    let message = match printed {
        Some(printed) => format!("{cause}, after the plugin printed: {printed}"),
        None => cause,
    };
    PluginError::Trap {
        plugin,
        step,
        call,
        message,
    }
}

/// Logs what a plugin printed during a call that did not trap, once, as a warning with the
/// step's name.
fn log_printed(step: &str, plugin: &str, printed: Option<String>) {
    if let Some(printed) = printed {
        tracing::warn!(step, plugin, "the plugin printed: {printed}");
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

/// Where a step's CPU time went, summed over its calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTimings {
    /// `process` and `on-watermark` calls made.
    pub calls: u64,
    /// Rows handed to `process`.
    pub rows_in: u64,
    /// Wall time in `process` and `on-watermark`, boundary included.
    pub total: Duration,
    /// Of `total`, the host's side of the WASM boundary: encoding input batches as Arrow IPC and
    /// decoding and checking the output. (The guest's side is inside the call.) Zero natively.
    pub host_boundary: Duration,
}

/// A plugin linked into the host as native code, standing in for its `.wasm` (see
/// [`super::PluginHost::link_native`]).
pub type NativeFactory = Arc<
    dyn Fn(&str, &SchemaRef) -> flowgate_sdk::Result<(Box<dyn DynTransform>, SchemaRef)>
        + Send
        + Sync,
>;

/// What an instance exports: the `plugin` world's `transform`, and `incremental` if it has it.
struct Exports {
    plugin: bindings::Plugin,
    incremental: Option<incremental::Guest>,
}

/// A sandboxed WebAssembly instance of the plugin.
struct Instance {
    loaded: Arc<Loaded>,
    grants: Grants,
    store: Store<HostState>,
    bindings: Exports,
    transformer: ResourceAny,
    discarded: bool,
}

enum Backend {
    Wasm(Box<Instance>),
    Native {
        factory: NativeFactory,
        transform: Box<dyn DynTransform>,
    },
}

/// One pipeline step's plugin instance (per partition). Reused across batches.
pub struct Step {
    name: String,
    plugin: String,
    config_json: String,
    input: SchemaRef,
    output: SchemaRef,
    backend: Backend,
    timings: StepTimings,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("plugin", &self.plugin)
            .field("native", &matches!(self.backend, Backend::Native { .. }))
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// A fresh instance with its `transformer` created; returns it with the declared output
    /// schema.
    fn create(
        loaded: &Arc<Loaded>,
        name: &str,
        config_json: &str,
        input: &SchemaRef,
        grants: Grants,
    ) -> Result<(Self, SchemaRef), PluginError> {
        let (mut store, instance) = loaded.instantiate(name, grants)?;
        let protocol = |message: String| PluginError::Protocol {
            plugin: loaded.name.clone(),
            step: name.to_string(),
            call: "create",
            message,
        };
        let schema_bytes = ipc::encode_schema(input)
            .map_err(|e| protocol(format!("encoding the input schema: {e}")))?;
        let running = loaded.ticker.running();
        store.set_epoch_deadline(deadline_ticks(loaded.config.call_timeout));
        let created = instance.plugin.flowgate_plugin_transform().call_create(
            &mut store,
            config_json,
            &schema_bytes,
        );
        drop(running);
        if created.is_ok() {
            log_printed(name, &loaded.name, store.data().printed.take());
        }
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
        let instance = Instance {
            loaded: loaded.clone(),
            grants,
            store,
            bindings: instance,
            transformer,
            discarded: false,
        };
        Ok((instance, output))
    }

    /// Runs one call with the deadline armed, turning traps into errors and discarding the
    /// instance after one.
    fn call<R>(
        &mut self,
        step: &str,
        call: &'static str,
        f: impl FnOnce(
            &mut Store<HostState>,
            &Exports,
            ResourceAny,
        ) -> wasmtime::Result<Result<R, types::Error>>,
    ) -> Result<R, PluginError> {
        if self.discarded {
            return Err(PluginError::Discarded {
                plugin: self.loaded.name.clone(),
                step: step.to_string(),
            });
        }
        let running = self.loaded.ticker.running();
        self.store
            .set_epoch_deadline(deadline_ticks(self.loaded.config.call_timeout));
        self.store.data_mut().panic = None;
        // A refused growth the guest survived is not the cause of a later trap.
        self.store.data_mut().cap.refused = None;
        let result = f(&mut self.store, &self.bindings, self.transformer);
        drop(running);
        if result.is_ok() {
            log_printed(step, &self.loaded.name, self.store.data().printed.take());
        }
        match result {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(PluginError::Plugin {
                plugin: self.loaded.name.clone(),
                step: step.to_string(),
                call,
                fault: fault(e),
            }),
            Err(e) => {
                self.discarded = true;
                Err(classify(
                    e,
                    &self.store,
                    &self.loaded.name,
                    step,
                    call,
                    &self.loaded.config,
                ))
            }
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if !self.discarded {
            let _running = self.loaded.ticker.running();
            self.store
                .set_epoch_deadline(deadline_ticks(self.loaded.config.call_timeout));
            let _ = self.transformer.resource_drop(&mut self.store);
        }
    }
}

fn native_fault(e: flowgate_sdk::Error) -> PluginFault {
    match e {
        flowgate_sdk::Error::InvalidConfig(m) => PluginFault::InvalidConfig(m),
        flowgate_sdk::Error::BadInput(m) => PluginFault::BadInput(m),
        flowgate_sdk::Error::Internal(m) => PluginFault::Internal(m),
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
        let (instance, output) = Instance::create(&loaded, name, config_json, input, grants)?;
        Ok(Step {
            name: name.to_string(),
            plugin: loaded.name.clone(),
            config_json: config_json.to_string(),
            input: input.clone(),
            output,
            backend: Backend::Wasm(Box::new(instance)),
            timings: StepTimings::default(),
        })
    }

    pub(crate) fn native(
        factory: NativeFactory,
        plugin: &str,
        name: &str,
        config_json: &str,
        input: &SchemaRef,
    ) -> Result<Self, PluginError> {
        let (transform, output) = factory(config_json, input).map_err(|e| PluginError::Plugin {
            plugin: plugin.to_string(),
            step: name.to_string(),
            call: "create",
            fault: native_fault(e),
        })?;
        Ok(Step {
            name: name.to_string(),
            plugin: plugin.to_string(),
            config_json: config_json.to_string(),
            input: input.clone(),
            output,
            backend: Backend::Native { factory, transform },
            timings: StepTimings::default(),
        })
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's name.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// The schema of the batches this step emits, as the plugin declared it.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output
    }

    /// The schema this step was created for.
    pub fn input_schema(&self) -> &SchemaRef {
        &self.input
    }

    /// True if the plugin runs as native code linked into the host instead of WebAssembly.
    pub fn is_native(&self) -> bool {
        matches!(self.backend, Backend::Native { .. })
    }

    /// Where this step's time went so far.
    pub fn timings(&self) -> StepTimings {
        self.timings
    }

    /// The instance's linear memory in bytes: everything the plugin holds, state included (WASM
    /// memory only grows). `None` for a native step.
    pub fn memory_bytes(&self) -> Option<usize> {
        match &self.backend {
            Backend::Wasm(instance) => Some(instance.store.data().cap.size),
            Backend::Native { .. } => None,
        }
    }

    /// Builds a fresh instance with the same config, restoring `state` if given: how a step comes
    /// back after a trap, a timeout or a memory error.
    pub fn rebuild(&mut self, state: Option<&[u8]>) -> Result<(), PluginError> {
        match &mut self.backend {
            Backend::Wasm(instance) => {
                let (fresh, output) = Instance::create(
                    &instance.loaded,
                    &self.name,
                    &self.config_json,
                    &self.input,
                    instance.grants,
                )?;
                **instance = fresh;
                self.output = output;
            }
            Backend::Native { factory, transform } => {
                let (fresh, output) =
                    factory(&self.config_json, &self.input).map_err(|e| PluginError::Plugin {
                        plugin: self.plugin.clone(),
                        step: self.name.clone(),
                        call: "create",
                        fault: native_fault(e),
                    })?;
                *transform = fresh;
                self.output = output;
            }
        }
        if let Some(state) = state {
            self.restore(state)?;
        }
        Ok(())
    }

    fn protocol(&self, call: &'static str, message: String) -> PluginError {
        PluginError::Protocol {
            plugin: self.plugin.clone(),
            step: self.name.clone(),
            call,
            message,
        }
    }

    fn native_error(&self, call: &'static str, e: flowgate_sdk::Error) -> PluginError {
        PluginError::Plugin {
            plugin: self.plugin.clone(),
            step: self.name.clone(),
            call,
            fault: native_fault(e),
        }
    }

    /// Checks a call's output against the declared schema and the input's row count.
    fn check(
        &self,
        call: &'static str,
        batches: Vec<RecordBatch>,
        rejected: Vec<(usize, String)>,
        input_rows: usize,
    ) -> Result<StepOutput, PluginError> {
        let mut checked = Vec::with_capacity(batches.len());
        for b in batches {
            if !same_fields(&b.schema(), &self.output) {
                return Err(PluginError::SchemaMismatch {
                    plugin: self.plugin.clone(),
                    step: self.name.clone(),
                    expected: describe_schema(&self.output),
                    got: describe_schema(&b.schema()),
                });
            }
            // Keep the declared schema (and its metadata) on every batch.
            checked.push(
                RecordBatch::try_new(self.output.clone(), b.columns().to_vec())
                    .map_err(|e| self.protocol(call, format!("output batch: {e}")))?,
            );
        }
        let rejected = rejected
            .into_iter()
            .map(|(row, reason)| {
                if row >= input_rows {
                    return Err(self.protocol(
                        call,
                        format!("rejected row {row}, but the batch had {input_rows} rows"),
                    ));
                }
                Ok(Rejection { row, reason })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StepOutput {
            batches: checked,
            rejected,
        })
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
                plugin: self.plugin.clone(),
                step: self.name.clone(),
                expected: describe_schema(&self.output),
                got: describe_schema(&schema),
            });
        }
        let rejected = output
            .rejected
            .into_iter()
            .map(|r| (r.row as usize, r.reason))
            .collect();
        self.check(call, batches, rejected, input_rows)
    }

    fn native_output(
        &self,
        call: &'static str,
        output: flowgate_sdk::Output,
        input_rows: usize,
    ) -> Result<StepOutput, PluginError> {
        let rejected = output
            .rejected
            .into_iter()
            .map(|r| (r.row as usize, r.reason))
            .collect();
        self.check(call, output.batches, rejected, input_rows)
    }

    /// Runs `process` on one batch of the input schema.
    pub fn process(&mut self, batch: &RecordBatch) -> Result<StepOutput, PluginError> {
        let started = Instant::now();
        let result = self.process_inner(batch);
        self.timings.calls += 1;
        self.timings.rows_in += batch.num_rows() as u64;
        self.timings.total += started.elapsed();
        result
    }

    fn process_inner(&mut self, batch: &RecordBatch) -> Result<StepOutput, PluginError> {
        if let Backend::Native { transform, .. } = &mut self.backend {
            let output = transform.process(batch.clone());
            let output = output.map_err(|e| self.native_error("process", e))?;
            return self.native_output("process", output, batch.num_rows());
        }
        let encoding = Instant::now();
        let bytes = ipc::encode_batches(&self.input, std::slice::from_ref(batch))
            .map_err(|e| self.protocol("process", format!("encoding the input batch: {e}")))?;
        let encoded = encoding.elapsed();
        let output = match &mut self.backend {
            Backend::Wasm(instance) => {
                instance.call(&self.name, "process", |store, exports, t| {
                    exports
                        .plugin
                        .flowgate_plugin_transform()
                        .transformer()
                        .call_process(store, t, &bytes)
                })?
            }
            Backend::Native { .. } => {
                return Err(self.protocol("process", "the step changed backend".into()));
            }
        };
        let decoding = Instant::now();
        // A step that hands its input back unchanged (a filter that kept every row) sends back
        // the very bytes it was given: keep the host's own batch rather than a decoded copy, so
        // the next step, and the poison journal, share the input's memory instead of holding
        // the rows twice.
        let output = if output.rejected.is_empty() && output.batches == bytes {
            self.check("process", vec![batch.clone()], Vec::new(), batch.num_rows())
        } else {
            self.decode("process", output, batch.num_rows())
        };
        self.timings.host_boundary += encoded + decoding.elapsed();
        output
    }

    /// Tells the step event time reached `ts_ms`; returns what it emits (closed windows).
    pub fn on_watermark(&mut self, ts_ms: i64) -> Result<StepOutput, PluginError> {
        let started = Instant::now();
        let result = self.on_watermark_inner(ts_ms);
        self.timings.calls += 1;
        self.timings.total += started.elapsed();
        result
    }

    fn on_watermark_inner(&mut self, ts_ms: i64) -> Result<StepOutput, PluginError> {
        let output = match &mut self.backend {
            Backend::Native { transform, .. } => {
                let output = transform
                    .on_watermark(ts_ms)
                    .map_err(|e| self.native_error("on-watermark", e))?;
                self.no_rejections_on_watermark(output.rejected.is_empty())?;
                return self.native_output("on-watermark", output, 0);
            }
            Backend::Wasm(instance) => {
                instance.call(&self.name, "on-watermark", |store, exports, t| {
                    exports
                        .plugin
                        .flowgate_plugin_transform()
                        .transformer()
                        .call_on_watermark(store, t, ts_ms)
                })?
            }
        };
        self.no_rejections_on_watermark(output.rejected.is_empty())?;
        let decoding = Instant::now();
        let output = self.decode("on-watermark", output, 0);
        self.timings.host_boundary += decoding.elapsed();
        output
    }

    /// `on-watermark` has no input rows, so it cannot reject any.
    fn no_rejections_on_watermark(&self, none: bool) -> Result<(), PluginError> {
        if none {
            return Ok(());
        }
        Err(self.protocol(
            "on-watermark",
            "rejected rows, but on-watermark has no input rows".into(),
        ))
    }

    /// The plugin's state, to store with a checkpoint.
    pub fn snapshot(&mut self) -> Result<Vec<u8>, PluginError> {
        match &mut self.backend {
            Backend::Native { transform, .. } => transform
                .snapshot()
                .map_err(|e| self.native_error("snapshot", e)),
            Backend::Wasm(instance) => {
                instance.call(&self.name, "snapshot", |store, exports, t| {
                    exports
                        .plugin
                        .flowgate_plugin_transform()
                        .transformer()
                        .call_snapshot(store, t)
                })
            }
        }
    }

    /// Whether the plugin can give state deltas (incremental checkpoints): a native step
    /// always may; a WASM one if it exports `incremental`.
    pub fn incremental(&self) -> bool {
        match &self.backend {
            Backend::Native { .. } => true,
            Backend::Wasm(instance) => instance.bindings.incremental.is_some(),
        }
    }

    /// What changed in the plugin's state since the last delta or restore (see the WIT's
    /// `incremental` interface); `None` when the plugin cannot tell or keeps no deltas.
    pub fn snapshot_delta(&mut self) -> Result<Option<Vec<u8>>, PluginError> {
        match &mut self.backend {
            Backend::Native { transform, .. } => transform
                .snapshot_delta()
                .map_err(|e| self.native_error("snapshot-delta", e)),
            Backend::Wasm(instance) => instance.call(
                &self.name,
                "snapshot-delta",
                |store, exports, t| match &exports.incremental {
                    Some(incremental) => incremental.call_snapshot_delta(store, t),
                    None => Ok(Ok(None)),
                },
            ),
        }
    }

    /// Applies a delta [`Step::snapshot_delta`] gave, on top of the state restored so far.
    pub fn restore_delta(&mut self, delta: &[u8]) -> Result<(), PluginError> {
        match &mut self.backend {
            Backend::Native { transform, .. } => transform
                .restore_delta(delta)
                .map_err(|e| self.native_error("restore-delta", e)),
            Backend::Wasm(instance) => instance.call(
                &self.name,
                "restore-delta",
                |store, exports, t| match &exports.incremental {
                    Some(incremental) => incremental.call_restore_delta(store, t, delta),
                    None => Ok(Err(types::Error::BadInput(
                        "the plugin takes no state deltas (it does not export `incremental`)"
                            .into(),
                    ))),
                },
            ),
        }
    }

    /// Replaces the plugin's state with an earlier snapshot.
    pub fn restore(&mut self, state: &[u8]) -> Result<(), PluginError> {
        match &mut self.backend {
            Backend::Native { transform, .. } => transform
                .restore(state)
                .map_err(|e| self.native_error("restore", e)),
            Backend::Wasm(instance) => instance.call(&self.name, "restore", |store, exports, t| {
                exports
                    .plugin
                    .flowgate_plugin_transform()
                    .transformer()
                    .call_restore(store, t, state)
            }),
        }
    }
}

/// Same names, types and order (nullability and metadata aside).
pub fn same_fields(a: &arrow::datatypes::Schema, b: &arrow::datatypes::Schema) -> bool {
    a.fields().len() == b.fields().len()
        && a.fields()
            .iter()
            .zip(b.fields())
            .all(|(x, y)| x.name() == y.name() && x.data_type() == y.data_type())
}

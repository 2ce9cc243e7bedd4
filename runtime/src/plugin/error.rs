use std::path::PathBuf;
use std::time::Duration;

/// Who must act on an error (Arroyo-style classification).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The pipeline or plugin config is wrong: fix it; retrying will not help (exit 2).
    Config,
    /// The data is bad: dead-letter it and keep going.
    Data,
    /// Something outside us failed: retry with backoff.
    External,
    /// A bug or a misbehaving plugin: stop the step.
    Internal,
}

/// The error variants a plugin returns through the WIT contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginFault {
    /// `invalid-config`
    InvalidConfig(String),
    /// `bad-input`
    BadInput(String),
    /// `internal`
    Internal(String),
}

impl std::fmt::Display for PluginFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginFault::InvalidConfig(m) => write!(f, "invalid config: {m}"),
            PluginFault::BadInput(m) => write!(f, "bad input: {m}"),
            PluginFault::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

/// Errors at the plugin boundary. Each names the plugin file and, once a step exists, the step
/// and the call that failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The `.wasm` file could not be read.
    #[error("cannot read plugin `{path}`: {source}")]
    Read {
        /// The plugin file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid component, or does not implement the Flowgate contract.
    #[error("plugin `{path}` is not a valid Flowgate plugin: {message}")]
    Invalid {
        /// The plugin file.
        path: PathBuf,
        /// What wasmtime said.
        message: String,
    },
    /// The engine could not be set up.
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
    /// The plugin's own error from `create`, `process`, `on-watermark`, `snapshot` or `restore`.
    #[error("step `{step}` (plugin `{plugin}`) {call} failed: {fault}")]
    Plugin {
        /// Plugin name.
        plugin: String,
        /// Step name.
        step: String,
        /// The call.
        call: &'static str,
        /// The plugin's error.
        fault: PluginFault,
    },
    /// The plugin trapped (a panic, an abort, an out-of-bounds access). The instance is discarded.
    #[error(
        "step `{step}` (plugin `{plugin}`) trapped in {call}: {message}; the instance was discarded"
    )]
    Trap {
        /// Plugin name.
        plugin: String,
        /// Step name.
        step: String,
        /// The call.
        call: &'static str,
        /// The trap and its wasm backtrace.
        message: String,
    },
    /// The call ran past its time limit and was interrupted. The instance is discarded.
    #[error(
        "step `{step}` (plugin `{plugin}`) {call} ran past its time limit of {limit:?} and was stopped; the instance was discarded"
    )]
    Timeout {
        /// Plugin name.
        plugin: String,
        /// Step name.
        step: String,
        /// The call.
        call: &'static str,
        /// The limit.
        limit: Duration,
    },
    /// The plugin tried to grow its memory past the cap. The instance is discarded.
    #[error(
        "step `{step}` (plugin `{plugin}`) {call} needed more than its memory limit of {limit_mib} MiB (asked for {requested_mib} MiB); the instance was discarded"
    )]
    MemoryLimit {
        /// Plugin name.
        plugin: String,
        /// Step name.
        step: String,
        /// The call.
        call: &'static str,
        /// The cap.
        limit_mib: usize,
        /// What the plugin asked for.
        requested_mib: usize,
    },
    /// A call on an instance that an earlier trap, timeout or memory error discarded.
    #[error(
        "step `{step}` (plugin `{plugin}`) was discarded after an earlier failure; rebuild it from a snapshot"
    )]
    Discarded {
        /// Plugin name.
        plugin: String,
        /// Step name.
        step: String,
    },
    /// The plugin emitted data that does not match the schema it declared.
    #[error(
        "step `{step}` (plugin `{plugin}`) returned batches that do not match its declared output schema: expected {expected}, got {got}"
    )]
    SchemaMismatch {
        /// Plugin name.
        plugin: String,
        /// Step name.
        step: String,
        /// Declared.
        expected: String,
        /// Returned.
        got: String,
    },
    /// Bytes crossing the boundary were not valid Arrow IPC, or rejected-row indexes were wrong.
    #[error("step `{step}` (plugin `{plugin}`) {call}: {message}")]
    Protocol {
        /// Plugin name.
        plugin: String,
        /// Step name.
        step: String,
        /// The call.
        call: &'static str,
        /// What was wrong.
        message: String,
    },
}

impl PluginError {
    /// Who must act.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PluginError::Read { .. } | PluginError::Invalid { .. } => ErrorKind::Config,
            PluginError::Engine(_) => ErrorKind::Internal,
            PluginError::Plugin { fault, .. } => match fault {
                PluginFault::InvalidConfig(_) => ErrorKind::Config,
                PluginFault::BadInput(_) => ErrorKind::Data,
                PluginFault::Internal(_) => ErrorKind::Internal,
            },
            PluginError::Trap { .. }
            | PluginError::Timeout { .. }
            | PluginError::MemoryLimit { .. }
            | PluginError::Discarded { .. }
            | PluginError::SchemaMismatch { .. }
            | PluginError::Protocol { .. } => ErrorKind::Internal,
        }
    }
}

//! Shared helpers for the host tests: where the compiled plugins are, and a host with a cache
//! shared by one test binary.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use flowgate::plugin::{Compile, HostConfig, PluginHost};

/// The folder `make plugins test-plugins` builds into.
pub fn plugin_dir() -> PathBuf {
    std::env::var_os("FLOWGATE_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/plugin")
        })
}

/// Path of a compiled plugin, e.g. `plugin("flowgate_validate")`.
pub fn plugin(name: &str) -> PathBuf {
    let path = plugin_dir().join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run `make plugins test-plugins` (or `make test`)",
        path.display()
    );
    path
}

fn shared_cache() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
        .path()
        .to_path_buf()
}

/// A host with default limits and a cache shared by this test binary.
pub fn host() -> PluginHost {
    host_with(Duration::from_secs(5), 256 << 20)
}

/// A host with the given call time limit and memory cap.
pub fn host_with(call_timeout: Duration, memory_limit: usize) -> PluginHost {
    host_compiling(Compile::Optimized, call_timeout, memory_limit)
}

/// A host compiling plugins with `compile` (the harness's quick compiler, or the pipeline's).
pub fn host_compiling(compile: Compile, call_timeout: Duration, memory_limit: usize) -> PluginHost {
    PluginHost::new(HostConfig {
        cache_dir: Some(shared_cache()),
        call_timeout,
        memory_limit,
        compile,
    })
    .expect("host")
}

/// Both ways the host compiles plugins: the sandbox must hold under each.
pub const COMPILERS: [Compile; 2] = [Compile::Optimized, Compile::Quick];

//! Compiled-plugin cache: wasmtime's serialized artifacts on disk, keyed by the `.wasm` file's
//! SHA-256 and the engine's compatibility hash, so a second start does not recompile and an
//! engine upgrade never loads a stale artifact.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::PluginError;

/// Number of components compiled by this process (cache misses), for tests and metrics.
pub static COMPILATIONS: AtomicU64 = AtomicU64::new(0);

/// How a plugin was loaded.
#[derive(Debug, Clone, Copy)]
pub struct LoadStats {
    /// True if the compiled artifact came from the cache.
    pub cache_hit: bool,
    /// Wall time to get a ready component (compile or deserialize).
    pub elapsed: Duration,
}

/// The default cache folder: `$FLOWGATE_CACHE_DIR`, else `$XDG_CACHE_HOME/flowgate/plugins`,
/// else `~/.cache/flowgate/plugins`.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FLOWGATE_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("flowgate").join("plugins"))
}

fn artifact_path(dir: &Path, engine: &Engine, wasm: &[u8]) -> PathBuf {
    let digest = Sha256::digest(wasm);
    let mut engine_hash = std::hash::DefaultHasher::new();
    engine
        .precompile_compatibility_hash()
        .hash(&mut engine_hash);
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    dir.join(format!("{hex}-{:016x}.cwasm", engine_hash.finish()))
}

/// Loads `wasm` (read from `path`) as a component, through the cache in `dir` if given.
pub fn load(
    engine: &Engine,
    dir: Option<&Path>,
    path: &Path,
    wasm: &[u8],
) -> Result<(Component, LoadStats), PluginError> {
    let start = Instant::now();
    let cached = dir.map(|d| artifact_path(d, engine, wasm));
    if let Some(artifact) = cached.as_deref().filter(|a| a.exists()) {
        // SAFETY: the artifact was written by `Component::serialize` of this same engine
        // configuration (its name carries the engine's compatibility hash) into a cache folder
        // that only Flowgate writes; wasmtime checks its header and version again on load.
        #[allow(unsafe_code)]
        match unsafe { Component::deserialize_file(engine, artifact) } {
            Ok(component) => {
                let stats = LoadStats {
                    cache_hit: true,
                    elapsed: start.elapsed(),
                };
                tracing::debug!(plugin = %path.display(), artifact = %artifact.display(), "loaded compiled plugin from the cache in {:?}", stats.elapsed);
                return Ok((component, stats));
            }
            Err(e) => {
                tracing::warn!(plugin = %path.display(), artifact = %artifact.display(), "ignoring unreadable cached artifact ({e}); recompiling")
            }
        }
    }
    let component = Component::new(engine, wasm).map_err(|e| PluginError::Invalid {
        path: path.to_path_buf(),
        message: format!("{e:#}"),
    })?;
    COMPILATIONS.fetch_add(1, Ordering::Relaxed);
    let stats = LoadStats {
        cache_hit: false,
        elapsed: start.elapsed(),
    };
    tracing::info!(plugin = %path.display(), "compiled plugin in {:?}", stats.elapsed);
    if let Some(artifact) = cached
        && let Err(e) = store(&component, &artifact)
    {
        tracing::warn!(plugin = %path.display(), artifact = %artifact.display(), "could not cache the compiled plugin: {e}");
    }
    Ok((component, stats))
}

/// Writes the artifact atomically (temp file + rename), so a concurrent start never reads half.
fn store(component: &Component, artifact: &Path) -> std::io::Result<()> {
    let bytes = component.serialize().map_err(std::io::Error::other)?;
    let dir = artifact.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        std::process::id(),
        artifact
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("artifact")
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, artifact)
}

//! The host's integration tests, as one test binary (one link of wasmtime, deltalake and
//! librdkafka instead of one per file): the host on the real `.wasm` plugins, pipeline files,
//! the sandbox, the compiled-plugin cache, fuzz regressions, and WASM against native.

#![allow(dead_code)]

mod cache;
mod common;
mod config;
mod fuzz_regressions;
mod harness;
mod incremental;
mod sandbox;
mod wasm_vs_native;

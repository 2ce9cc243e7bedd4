//! Flowgate: Kafka → Arrow → WebAssembly transform plugins → Delta Lake and Parquet.
//!
//! # Layout
//!
//! - [`plugin`]: the wasmtime host. Loads plugin components through a compiled-artifact cache,
//!   sandboxes them (call time limit, memory cap, no ambient I/O), and runs chains of steps.
//! - [`decode`]: JSON records → Arrow batches with a declared schema; bad records are reported
//!   one by one, never dropped silently.
//! - [`engine`]: the run: a source thread routes records to partition tasks on worker threads,
//!   cuts epochs, and a committer thread commits each epoch into every sink exactly once.
//! - [`source`], [`sink`], [`checkpoint`]: where records come from, where rows go, where plugin
//!   state is kept.
//! - [`storage`]: where a Delta table lives (a folder, or S3 with conditional put).
//! - [`metrics`]: time per stage and latency histograms for `flowgate run --report`.
//! - [`exporter`]: live metrics for Prometheus (`/metrics`, `/healthz`, `/readyz`).
//! - [`status`]: the live status page (`/`, `/status.json`) on the same listener.
//! - [`yaml`]: YAML parsing with file, key path, line and column in every error.
//! - [`cli`]: the `flowgate` command line; `main.rs` only parses arguments and calls it.
//!
//! The plugin contract lives in `wit/flowgate.wit`; plugins are written with the
//! `flowgate-sdk` crate.

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod decode;
pub mod engine;
pub mod exporter;
mod flat_json;
pub mod metrics;
pub mod plugin;
mod polled_producer;
pub mod sink;
pub mod source;
pub mod status;
pub mod storage;
pub mod yaml;

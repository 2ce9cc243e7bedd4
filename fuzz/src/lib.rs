//! The parts of the runtime the fuzz targets exercise, compiled from the runtime's own source
//! files: what is fuzzed is exactly what runs.
#![allow(dead_code, unused_imports)]

#[path = "../../runtime/src/decode.rs"]
pub mod decode;

#[path = "../../runtime/src/flat_json.rs"]
mod flat_json;

#[path = "../../runtime/src/yaml.rs"]
pub mod yaml;

#[path = "../../runtime/src/config/mod.rs"]
pub mod config;

//! The Flowgate plugin SDK.
//!
//! A plugin is a type that implements [`Transform`] over Arrow [`RecordBatch`]es, plus one
//! [`export_transform!`] call. The SDK owns everything else: the wit-bindgen glue, Arrow IPC
//! encoding at the boundary, config parsing with key paths in errors, and the framing of state
//! snapshots. The same crate compiles natively, so plugin logic is tested with plain
//! `cargo test`, and for `wasm32-wasip2`, where it becomes a component the host can load.
//!
//! ```ignore
//! use flowgate_sdk::prelude::*;
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config { column: String, min: f64 }
//!
//! struct AtLeast { column: usize, min: f64 }
//!
//! impl Transform for AtLeast {
//!     type Config = Config;
//!     const NAME: &'static str = "at_least";
//!
//!     fn create(config: Config, input: &SchemaRef) -> Result<(Self, SchemaRef)> {
//!         let column = column_index(input, &config.column, "column")?;
//!         Ok((AtLeast { column, min: config.min }, input.clone()))
//!     }
//!
//!     fn process(&mut self, batch: RecordBatch) -> Result<Output> {
//!         let values = float64_column(&batch, self.column)?;
//!         let keep = gt_eq(&values, &Float64Array::new_scalar(self.min))?;
//!         Ok(Output::batch(filter_record_batch(&batch, &keep)?))
//!     }
//! }
//!
//! export_transform!(AtLeast);
//! ```

pub mod columns;
pub mod config;
mod error;
pub mod hash;
pub mod ipc;
pub mod keys;
pub mod log;
mod native;
mod output;
#[cfg(feature = "testing")]
pub mod testing;
mod transform;

pub use arrow;
pub use error::{Error, Result};
pub use native::{DynTransform, PluginInfo, create, info};
pub use output::{Output, Rejected};
pub use transform::{STATE_HEADER, Transform};

/// What most plugins need, in one import.
pub mod prelude {
    pub use crate::columns::{column_index, event_time_millis, float64_column, format_millis};
    pub use crate::config::{Duration, OrderedMap};
    pub use crate::{Error, Output, Rejected, Result, Transform, export_transform};
    pub use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, StringArray};
    pub use arrow::compute::filter_record_batch;
    pub use arrow::compute::kernels::cmp::{eq, gt, gt_eq, lt, lt_eq};
    pub use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
    pub use arrow::record_batch::RecordBatch;
    pub use serde::Deserialize;
    pub use std::sync::Arc;
}

// The macro below names `::flowgate_sdk`; this makes that path work inside the SDK too.
extern crate self as flowgate_sdk;

/// Exports a [`Transform`] as the plugin's component interface.
///
/// Call it once, at the plugin crate's root. On `wasm32` it generates the component exports; on
/// other targets it expands to nothing, so the crate still builds and tests natively.
#[macro_export]
macro_rules! export_transform {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code)]
        const _: () = {
            use ::flowgate_sdk::__private::bindings::exports::flowgate::plugin::transform as __fg;
            struct __FlowgatePlugin;
            impl __fg::Guest for __FlowgatePlugin {
                type Transformer = ::flowgate_sdk::__private::Adapter;
                fn info() -> __fg::PluginInfo {
                    ::flowgate_sdk::__private::info::<$plugin>()
                }
                fn create(
                    config: ::std::string::String,
                    input_schema: ::std::vec::Vec<u8>,
                ) -> ::std::result::Result<
                    (__fg::Transformer, ::std::vec::Vec<u8>),
                    ::flowgate_sdk::__private::bindings::flowgate::plugin::types::Error,
                > {
                    ::flowgate_sdk::__private::create::<$plugin>(&config, &input_schema)
                }
            }
            impl ::flowgate_sdk::__private::bindings::exports::flowgate::plugin::incremental::Guest for __FlowgatePlugin {
                fn snapshot_delta(
                    t: __fg::TransformerBorrow<'_>,
                ) -> ::std::result::Result<
                    ::std::option::Option<::std::vec::Vec<u8>>,
                    ::flowgate_sdk::__private::bindings::flowgate::plugin::types::Error,
                > {
                    ::flowgate_sdk::__private::snapshot_delta(t)
                }
                fn restore_delta(
                    t: __fg::TransformerBorrow<'_>,
                    delta: ::std::vec::Vec<u8>,
                ) -> ::std::result::Result<
                    (),
                    ::flowgate_sdk::__private::bindings::flowgate::plugin::types::Error,
                > {
                    ::flowgate_sdk::__private::restore_delta(t, delta)
                }
            }
            ::flowgate_sdk::__private::bindings::__export_plugin!(__FlowgatePlugin with_types_in ::flowgate_sdk::__private::bindings);
        };
    };
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
#[allow(unsafe_code)]
pub mod __private;

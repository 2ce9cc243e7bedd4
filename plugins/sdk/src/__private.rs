//! The wasm side of the SDK: wit-bindgen bindings and the adapter between the generated
//! component interface and [`crate::DynTransform`]. Not part of the public API.

use std::cell::RefCell;

use crate::columns::describe_schema;
use crate::{DynTransform, Error, Output, Transform, ipc};

pub use wit_bindgen;

#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "incremental-plugin",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "::flowgate_sdk::__private::bindings",
        runtime_path: "::flowgate_sdk::__private::wit_bindgen::rt",
    });
}

use bindings::exports::flowgate::plugin::transform as exports;
use bindings::flowgate::plugin::types as wit;

impl From<Error> for wit::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidConfig(m) => wit::Error::InvalidConfig(m),
            Error::BadInput(m) => wit::Error::BadInput(m),
            Error::Internal(m) => wit::Error::Internal(m),
        }
    }
}

/// One transformer resource: the plugin behind a `RefCell` (resources get `&self`), with the
/// output schema it declared, for encoding.
pub struct Adapter {
    inner: RefCell<Box<dyn DynTransform>>,
    output_schema: arrow::datatypes::SchemaRef,
}

/// Installs, once per instance, a panic hook that hands the host the panic's message and source
/// line before the trap (`panic: panicked at src/lib.rs:12:5: …`, at error level): the host
/// puts them in the error it reports, where a release build's trap only has `<wasm function N>`
/// frames.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let message = info
                .payload_as_str()
                .unwrap_or("(a panic without a message)");
            let place = info
                .location()
                .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
                .unwrap_or_default();
            crate::log::log(
                crate::log::Level::Error,
                &format!("panic: panicked{place}: {message}"),
            );
        }));
    });
}

/// The exported `info`.
pub fn info<T: Transform>() -> exports::PluginInfo {
    install_panic_hook();
    let info = crate::info::<T>();
    exports::PluginInfo {
        name: info.name,
        version: info.version,
        state_version: info.state_version,
    }
}

/// The exported `create`.
pub fn create<T: Transform>(
    config: &str,
    input_schema: &[u8],
) -> Result<(exports::Transformer, Vec<u8>), wit::Error> {
    install_panic_hook();
    let input = ipc::decode_schema(input_schema)
        .map_err(|e| Error::bad_input(format!("input schema: {e}")))?;
    let (inner, output_schema) = crate::create::<T>(config, &input)?;
    let schema_bytes = ipc::encode_schema(&output_schema)
        .map_err(|e| Error::internal(format!("encoding output schema: {e}")))?;
    let adapter = Adapter {
        inner: RefCell::new(inner),
        output_schema,
    };
    Ok((exports::Transformer::new(adapter), schema_bytes))
}

impl Adapter {
    fn encode(&self, output: Output) -> Result<wit::Output, wit::Error> {
        // Batches must match the declared schema; re-labelling also carries its metadata.
        let batches = output
            .batches
            .iter()
            .map(|b| {
                arrow::record_batch::RecordBatch::try_new(
                    self.output_schema.clone(),
                    b.columns().to_vec(),
                )
                .map_err(|e| {
                    Error::internal(format!(
                        "output does not match the declared output schema {}: got {} ({e})",
                        describe_schema(&self.output_schema),
                        describe_schema(&b.schema())
                    ))
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let batches = ipc::encode_batches(&self.output_schema, &batches)
            .map_err(|e| Error::internal(format!("encoding output: {e}")))?;
        Ok(wit::Output {
            batches,
            rejected: output
                .rejected
                .into_iter()
                .map(|r| wit::RejectedRow {
                    row: r.row,
                    reason: r.reason,
                })
                .collect(),
        })
    }
}

impl exports::GuestTransformer for Adapter {
    fn process(&self, bytes: Vec<u8>) -> Result<wit::Output, wit::Error> {
        let bytes = arrow::buffer::Buffer::from_vec(bytes);
        let batch = ipc::decode_one_buffer(bytes.clone())
            .map_err(|e| Error::bad_input(format!("input batch: {e}")))?;
        let output = self.inner.borrow_mut().process(batch.clone())?;
        let output = output.settle(&batch)?;
        if !output.is_input(&batch, &self.output_schema) {
            return self.encode(output);
        }
        // The output is the input as it came (a filter that kept every row): hand back the
        // bytes the host sent instead of encoding the rows again. The host knows its own bytes
        // and keeps its own batch.
        drop((batch, output));
        Ok(wit::Output {
            batches: ipc::into_bytes(bytes),
            rejected: Vec::new(),
        })
    }

    fn on_watermark(&self, ts_ms: i64) -> Result<wit::Output, wit::Error> {
        let output = self.inner.borrow_mut().on_watermark(ts_ms)?;
        self.encode(output)
    }

    fn snapshot(&self) -> Result<Vec<u8>, wit::Error> {
        Ok(self.inner.borrow().snapshot()?)
    }

    fn restore(&self, state: Vec<u8>) -> Result<(), wit::Error> {
        Ok(self.inner.borrow_mut().restore(&state)?)
    }
}

/// The exported `snapshot-delta`.
pub fn snapshot_delta(t: exports::TransformerBorrow<'_>) -> Result<Option<Vec<u8>>, wit::Error> {
    Ok(t.get::<Adapter>().inner.borrow_mut().snapshot_delta()?)
}

/// The exported `restore-delta`.
pub fn restore_delta(t: exports::TransformerBorrow<'_>, delta: Vec<u8>) -> Result<(), wit::Error> {
    Ok(t.get::<Adapter>()
        .inner
        .borrow_mut()
        .restore_delta(&delta)?)
}

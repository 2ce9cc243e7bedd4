//! A plugin built straight from the WIT world `plugin` (no SDK), as every plugin built before
//! the optional `incremental` interface was, and as plugins in other languages may be: the host
//! must load it and checkpoint its state whole. It passes batches through and counts `process`
//! calls; its state is that count (8 bytes, little endian).
#![cfg(target_arch = "wasm32")]
#![allow(unsafe_code)]

use std::cell::Cell;

wit_bindgen::generate!({
    world: "plugin",
    path: "../../../wit",
});

use exports::flowgate::plugin::transform::{Guest, GuestTransformer, PluginInfo, Transformer};
use flowgate::plugin::types::{Error, Output};

struct Plain;

struct Counter(Cell<u64>);

impl Guest for Plain {
    type Transformer = Counter;

    fn info() -> PluginInfo {
        PluginInfo {
            name: "plain".into(),
            version: "0.1.0".into(),
            state_version: 1,
        }
    }

    fn create(_config: String, input_schema: Vec<u8>) -> Result<(Transformer, Vec<u8>), Error> {
        Ok((Transformer::new(Counter(Cell::new(0))), input_schema))
    }
}

impl GuestTransformer for Counter {
    fn process(&self, batch: Vec<u8>) -> Result<Output, Error> {
        self.0.set(self.0.get() + 1);
        // The input stream (its schema, then the batch) is a valid output: same schema.
        Ok(Output {
            batches: batch,
            rejected: Vec::new(),
        })
    }

    fn on_watermark(&self, _ts_ms: i64) -> Result<Output, Error> {
        Ok(Output {
            batches: Vec::new(),
            rejected: Vec::new(),
        })
    }

    fn snapshot(&self) -> Result<Vec<u8>, Error> {
        Ok(self.0.get().to_le_bytes().to_vec())
    }

    fn restore(&self, state: Vec<u8>) -> Result<(), Error> {
        let bytes: [u8; 8] = state
            .try_into()
            .map_err(|_| Error::BadInput("the state is a count of 8 bytes".into()))?;
        self.0.set(u64::from_le_bytes(bytes));
        Ok(())
    }
}

export!(Plain);

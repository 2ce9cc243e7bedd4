//! `pct_change`: per key, ordered by a column, `(x - previous) / previous` into a new column.
//!
//! ```yaml
//! config:
//!   key: [symbol]
//!   order_by: window_start
//!   column: close
//!   output: pct_change   # the default
//! ```
//!
//! The first row of a key gets null, as does a row whose value is null (which does not replace
//! the previous value). Within a batch rows are taken in `order_by` order (nulls first, ties in
//! arrival order); across batches, in arrival order. `order_by` is compared at its full
//! precision (microsecond timestamps order within a millisecond), and takes the types a key
//! can have (strings, booleans, integers, floats, dates, timestamps). The previous value per key
//! survives across batches and snapshots; one value is kept per distinct key.
//!
//! Snapshots (state version 2) store keys as [`flowgate_sdk::keys::KeyValue`]s, not as the
//! packed bytes kept in memory ([`KeyPacker`]).
#![deny(unsafe_code)]

use std::collections::HashMap;

use arrow::array::ArrayRef;
use flowgate_sdk::columns::{append_column, int64_column, is_numeric_type};
use flowgate_sdk::keys::{self, KeyPacker, KeyValue};
use flowgate_sdk::prelude::*;
use serde::{Deserialize, Serialize};

/// The step's config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Columns that identify a series (none: the whole stream is one series).
    #[serde(default)]
    pub key: Vec<String>,
    /// Orders rows within a batch.
    pub order_by: String,
    /// The numeric column to compare.
    pub column: String,
    /// Name of the new float64 column.
    #[serde(default = "default_output")]
    pub output: String,
}

fn default_output() -> String {
    "pct_change".into()
}

/// The `pct_change` transform.
pub struct PctChange {
    key_columns: Vec<usize>,
    /// Types of the key columns, to rebuild keys from a snapshot.
    key_types: Vec<DataType>,
    /// Packs the key columns (`None`: no key columns, one series).
    packer: Option<KeyPacker>,
    order_by: usize,
    /// Packs the `order_by` column, to sort by it.
    order_packer: KeyPacker,
    column: usize,
    output: SchemaRef,
    previous: HashMap<Box<[u8]>, f64>,
}

/// Snapshot body, state version 2 (postcard): each key (one value per key column) with its
/// previous value, in key order. Version 1 held `arrow::row` bytes as keys.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct State {
    previous: Vec<(Vec<KeyValue>, f64)>,
}

impl Transform for PctChange {
    type Config = Config;
    const NAME: &'static str = "pct_change";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    /// 2: keys as [`KeyValue`]s (1 held `arrow::row` bytes).
    const STATE_VERSION: u32 = 2;

    fn create(config: Config, input: &SchemaRef) -> Result<(Self, SchemaRef)> {
        let mut key_columns = Vec::new();
        let mut key_types = Vec::new();
        for (i, name) in config.key.iter().enumerate() {
            let index = column_index(input, name, &format!("key[{i}]"))?;
            let data_type = input.field(index).data_type().clone();
            if !keys::is_key_type(&data_type) {
                return Err(Error::config(
                    &format!("key[{i}]"),
                    format!("{data_type} columns cannot be keys"),
                ));
            }
            key_types.push(data_type);
            key_columns.push(index);
        }
        let order_by = column_index(input, &config.order_by, "order_by")?;
        let order_type = input.field(order_by).data_type();
        if !keys::is_key_type(order_type) {
            return Err(Error::config(
                "order_by",
                format!("cannot order by {order_type} columns"),
            ));
        }
        let order_packer = KeyPacker::new(std::slice::from_ref(order_type))?;
        let column = column_index(input, &config.column, "column")?;
        let data_type = input.field(column).data_type();
        if !is_numeric_type(data_type) {
            return Err(Error::config(
                "column",
                format!("column `{}` is {data_type}, not a number", config.column),
            ));
        }
        if input.index_of(&config.output).is_ok() {
            return Err(Error::config(
                "output",
                format!("column `{}` already exists in the input", config.output),
            ));
        }
        let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(&config.output, DataType::Float64, true));
        let output: SchemaRef =
            Arc::new(Schema::new_with_metadata(fields, input.metadata().clone()));
        let packer = if key_types.is_empty() {
            None
        } else {
            Some(KeyPacker::new(&key_types)?)
        };
        let step = PctChange {
            key_columns,
            key_types,
            packer,
            order_by,
            order_packer,
            column,
            output: output.clone(),
            previous: HashMap::new(),
        };
        Ok((step, output))
    }

    fn process(&mut self, batch: RecordBatch) -> Result<Output> {
        let n = batch.num_rows();
        let rows = match &self.packer {
            Some(p) => {
                let columns: Vec<ArrayRef> = self
                    .key_columns
                    .iter()
                    .map(|&i| batch.column(i).clone())
                    .collect();
                Some(p.pack(&columns)?)
            }
            None => None,
        };
        let key = |i: usize| -> &[u8] { rows.as_ref().map_or(&[][..], |r| r.row(i)) };
        let mut order: Vec<usize> = (0..n).collect();
        // By key (any order of keys), then by `order_by` (nulls first); rows equal in both keep
        // their arrival order.
        let column = batch.column(self.order_by);
        if reads_as_i64(column.data_type()) {
            // The usual case (a time or an integer): compare plain numbers, null first.
            let times = int64_column(&batch, self.order_by)?;
            let time = |i: usize| times.is_valid(i).then(|| times.value(i));
            order.sort_by(|&a, &b| key(a).cmp(key(b)).then(time(a).cmp(&time(b))));
        } else {
            let times = self.order_packer.pack(std::slice::from_ref(column))?;
            order.sort_by(|&a, &b| {
                key(a)
                    .cmp(key(b))
                    .then_with(|| self.order_packer.cmp(times.row(a), times.row(b)))
            });
        }
        let values = float64_column(&batch, self.column)?;
        let mut out: Vec<Option<f64>> = vec![None; n];
        for i in order {
            if values.is_null(i) {
                continue;
            }
            let x = values.value(i);
            let k = key(i);
            match self.previous.get_mut(k) {
                Some(prev) => {
                    out[i] = Some((x - *prev) / *prev);
                    *prev = x;
                }
                None => {
                    self.previous.insert(k.into(), x);
                }
            }
        }
        let column: ArrayRef = Arc::new(Float64Array::from(out));
        Ok(Output::batch(append_column(&batch, &self.output, column)?))
    }

    fn snapshot(&self) -> Result<Vec<u8>> {
        let mut previous: Vec<(&[u8], f64)> = self
            .previous
            .iter()
            .map(|(k, v)| (k.as_ref(), *v))
            .collect();
        let keys = match &self.packer {
            Some(packer) => {
                // Key order, so equal states give equal bytes.
                previous.sort_unstable_by(|a, b| packer.cmp(a.0, b.0));
                previous
                    .iter()
                    .map(|(k, _)| packer.values(k))
                    .collect::<Result<Vec<_>>>()?
            }
            None => vec![Vec::new(); previous.len()],
        };
        let state = State {
            previous: keys
                .into_iter()
                .zip(previous)
                .map(|(key, (_, v))| (key, v))
                .collect(),
        };
        postcard::to_allocvec(&state).map_err(|e| Error::internal(format!("encoding state: {e}")))
    }

    fn restore(&mut self, version: u32, state: &[u8]) -> Result<()> {
        if version != Self::STATE_VERSION {
            let by = if version < Self::STATE_VERSION {
                "an older"
            } else {
                "a newer"
            };
            return Err(Error::bad_input(format!(
                "pct_change state version {version} was written by {by} plugin version; this one \
                 reads state version {} (restart the step without its state)",
                Self::STATE_VERSION
            )));
        }
        let state: State = postcard::from_bytes(state)
            .map_err(|e| Error::bad_input(format!("pct_change state is corrupt: {e}")))?;
        let (keys, values): (Vec<Vec<KeyValue>>, Vec<f64>) = state.previous.into_iter().unzip();
        let columns = keys::decode_rows(&keys, &self.key_types)
            .map_err(|e| Error::bad_input(format!("pct_change state: {}", e.message())))?;
        let rows = match &self.packer {
            Some(packer) => Some(packer.pack(&columns)?),
            None => None,
        };
        let mut previous = HashMap::with_capacity(values.len());
        for (n, value) in values.into_iter().enumerate() {
            let key: Box<[u8]> = rows.as_ref().map_or(Box::default(), |r| r.row(n).into());
            if previous.insert(key, value).is_some() {
                return Err(Error::bad_input(
                    "pct_change state is corrupt: it holds a key twice",
                ));
            }
        }
        self.previous = previous;
        Ok(())
    }
}

/// Whether [`int64_column`] reads every value of `data_type` exactly (not `UInt64`, whose values
/// past `i64::MAX` it reads as null): signed integers, unsigned up to 32 bits, dates, timestamps.
fn reads_as_i64(data_type: &DataType) -> bool {
    (data_type.is_integer() && *data_type != DataType::UInt64)
        || matches!(
            data_type,
            DataType::Date32 | DataType::Date64 | DataType::Timestamp(_, _)
        )
}

export_transform!(PctChange);

/// Scripted runs shared with the host's WASM tests.
#[cfg(any(test, feature = "scenarios"))]
pub mod scenarios;

#[cfg(test)]
mod tests;

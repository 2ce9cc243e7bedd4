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
//! the previous value). Within a batch rows are taken in `order_by` order; across batches, in
//! arrival order. The previous value per key survives across batches and snapshots; one value is
//! kept per distinct key.
#![deny(unsafe_code)]

use std::collections::HashMap;

use arrow::array::ArrayRef;
use arrow::row::{RowConverter, SortField};
use flowgate_sdk::columns::{append_column, is_numeric_type};
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
    converter: Option<RowConverter>,
    order_by: usize,
    column: usize,
    output: SchemaRef,
    previous: HashMap<Box<[u8]>, f64>,
}

#[derive(Serialize, Deserialize)]
struct State {
    previous: Vec<(Vec<u8>, f64)>,
}

impl Transform for PctChange {
    type Config = Config;
    const NAME: &'static str = "pct_change";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const STATE_VERSION: u32 = 1;

    fn create(config: Config, input: &SchemaRef) -> Result<(Self, SchemaRef)> {
        let mut key_columns = Vec::new();
        let mut sort_fields = Vec::new();
        for (i, name) in config.key.iter().enumerate() {
            let index = column_index(input, name, &format!("key[{i}]"))?;
            let data_type = input.field(index).data_type().clone();
            if !RowConverter::supports_fields(&[SortField::new(data_type.clone())]) {
                return Err(Error::config(
                    &format!("key[{i}]"),
                    format!("{data_type} columns cannot be keys"),
                ));
            }
            sort_fields.push(SortField::new(data_type));
            key_columns.push(index);
        }
        let order_by = column_index(input, &config.order_by, "order_by")?;
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
        let converter = if sort_fields.is_empty() {
            None
        } else {
            Some(RowConverter::new(sort_fields)?)
        };
        let step = PctChange {
            key_columns,
            converter,
            order_by,
            column,
            output: output.clone(),
            previous: HashMap::new(),
        };
        Ok((step, output))
    }

    fn process(&mut self, batch: RecordBatch) -> Result<Output> {
        let n = batch.num_rows();
        let rows = match &self.converter {
            Some(c) => {
                let columns: Vec<ArrayRef> = self
                    .key_columns
                    .iter()
                    .map(|&i| batch.column(i).clone())
                    .collect();
                Some(c.convert_columns(&columns)?)
            }
            None => None,
        };
        let key = |i: usize| -> &[u8] { rows.as_ref().map_or(&[][..], |r| r.row(i).data()) };
        let order = arrow::compute::sort_to_indices(batch.column(self.order_by), None, None)?;
        let mut order: Vec<usize> = order.values().iter().map(|&i| i as usize).collect();
        // Stable by key, keeping order_by order within a key.
        order.sort_by(|a, b| key(*a).cmp(key(*b)));
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
        let state = State {
            previous: self
                .previous
                .iter()
                .map(|(k, v)| (k.to_vec(), *v))
                .collect(),
        };
        postcard::to_allocvec(&state).map_err(|e| Error::internal(format!("encoding state: {e}")))
    }

    fn restore(&mut self, version: u32, state: &[u8]) -> Result<()> {
        if version != Self::STATE_VERSION {
            return Err(Error::bad_input(format!(
                "pct_change reads state version {}, got {version}",
                Self::STATE_VERSION
            )));
        }
        let state: State = postcard::from_bytes(state)
            .map_err(|e| Error::bad_input(format!("pct_change state is corrupt: {e}")))?;
        self.previous = state
            .previous
            .into_iter()
            .map(|(k, v)| (k.into_boxed_slice(), v))
            .collect();
        Ok(())
    }
}

export_transform!(PctChange);

/// Scripted runs shared with the host's WASM tests.
#[cfg(any(test, feature = "scenarios"))]
pub mod scenarios;

#[cfg(test)]
mod tests;

//! `ema`: per key, an exponential moving average of a float64 column into a new `ema` column:
//! `ema = alpha * x + (1 - alpha) * previous`, the first value of a key being itself. A row with a
//! null key or value gets a null `ema` and changes nothing.
//!
//! The same plugin is written with the JavaScript SDK (`tests/plugins-js/ema`) and the Python
//! SDK: the three must give the same rows, and the same state bytes, so a live swap from one to
//! another keeps the averages. State version 1: the number of keys (u32 LE), then per key in the
//! order of its UTF-8 bytes: the key's length (u32 LE), its bytes, the average (f64 LE).
use std::collections::BTreeMap;

use arrow::array::{Array, AsArray, Float64Array, Float64Builder};
use flowgate_sdk::columns::{append_column, column_index};
use flowgate_sdk::prelude::*;

/// The step's config.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A utf8 column: one average per value.
    pub key: String,
    /// A float64 column.
    pub column: String,
    /// The weight of a new value, in (0, 1].
    pub alpha: f64,
}

pub struct Ema {
    key: usize,
    column: usize,
    alpha: f64,
    output: SchemaRef,
    averages: BTreeMap<Vec<u8>, f64>,
}

impl Transform for Ema {
    type Config = Config;
    const NAME: &'static str = "ema";
    const STATE_VERSION: u32 = 1;

    fn create(config: Config, input: &SchemaRef) -> Result<(Self, SchemaRef)> {
        let key = column_index(input, &config.key, "key")?;
        let column = column_index(input, &config.column, "column")?;
        if input.field(key).data_type() != &DataType::Utf8 {
            return Err(Error::config("key", "must name a utf8 column"));
        }
        if input.field(column).data_type() != &DataType::Float64 {
            return Err(Error::config("column", "must name a float64 column"));
        }
        if !(config.alpha > 0.0 && config.alpha <= 1.0) {
            return Err(Error::config("alpha", "must be in (0, 1]"));
        }
        let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("ema", DataType::Float64, true));
        let output = Arc::new(Schema::new(fields));
        Ok((
            Ema {
                key,
                column,
                alpha: config.alpha,
                output: output.clone(),
                averages: BTreeMap::new(),
            },
            output,
        ))
    }

    fn process(&mut self, batch: RecordBatch) -> Result<Output> {
        let keys = batch.column(self.key).as_string::<i32>();
        let values: &Float64Array = batch.column(self.column).as_primitive();
        let mut ema = Float64Builder::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            if keys.is_null(i) || values.is_null(i) {
                ema.append_null();
                continue;
            }
            let x = values.value(i);
            let average = match self.averages.get_mut(keys.value(i).as_bytes()) {
                Some(previous) => {
                    *previous = self.alpha * x + (1.0 - self.alpha) * *previous;
                    *previous
                }
                None => {
                    self.averages.insert(keys.value(i).as_bytes().to_vec(), x);
                    x
                }
            };
            ema.append_value(average);
        }
        let column = Arc::new(ema.finish());
        Ok(Output::batch(append_column(&batch, &self.output, column)?))
    }

    fn snapshot(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.averages.len() as u32).to_le_bytes());
        for (key, average) in &self.averages {
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(&average.to_le_bytes());
        }
        Ok(out)
    }

    fn restore(&mut self, version: u32, state: &[u8]) -> Result<()> {
        if version != Self::STATE_VERSION {
            return Err(Error::bad_input(format!(
                "`ema` reads state version 1, got {version}"
            )));
        }
        let truncated = || Error::bad_input("`ema`: the state is truncated");
        let mut rest = state;
        let mut take = |n: usize| -> Result<&[u8]> {
            let (head, tail) = rest.split_at_checked(n).ok_or_else(truncated)?;
            rest = tail;
            Ok(head)
        };
        let u32_at = |bytes: &[u8]| -> u32 {
            let mut b = [0u8; 4];
            b.copy_from_slice(bytes);
            u32::from_le_bytes(b)
        };
        let count = u32_at(take(4)?);
        let mut averages = BTreeMap::new();
        for _ in 0..count {
            let len = u32_at(take(4)?) as usize;
            let key = take(len)?.to_vec();
            let mut b = [0u8; 8];
            b.copy_from_slice(take(8)?);
            averages.insert(key, f64::from_le_bytes(b));
        }
        if !rest.is_empty() {
            return Err(Error::bad_input(format!(
                "`ema`: {} bytes after the last key",
                rest.len()
            )));
        }
        self.averages = averages;
        Ok(())
    }
}

export_transform!(Ema);

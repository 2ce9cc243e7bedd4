//! Test helpers for plugin authors: batches from JSON lines, rows back to JSON.

use std::io::Cursor;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow_json::{ArrayWriter, ReaderBuilder};

/// A batch of `schema` from JSON lines (timestamps as RFC 3339 strings or epoch milliseconds).
///
/// # Panics
/// If the lines do not fit the schema: this is for tests.
pub fn batch(schema: &SchemaRef, lines: &[&str]) -> RecordBatch {
    let text = lines.join("\n");
    let mut reader = ReaderBuilder::new(schema.clone())
        .with_batch_size(lines.len().max(1))
        .build(Cursor::new(text.into_bytes()))
        .expect("json reader");
    match reader.next() {
        Some(batch) => batch.expect("lines fit the schema"),
        None => RecordBatch::new_empty(schema.clone()),
    }
}

/// The rows of `batches` as JSON objects (nulls omitted), for readable assertions.
pub fn rows(batches: &[RecordBatch]) -> Vec<serde_json::Value> {
    let mut writer = ArrayWriter::new(Vec::new());
    for b in batches {
        writer.write(b).expect("json write");
    }
    writer.finish().expect("json finish");
    let bytes = writer.into_inner();
    if bytes.is_empty() {
        return Vec::new();
    }
    serde_json::from_slice(&bytes).expect("valid json")
}

use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use std::sync::Arc;

use crate::{DynTransform, Output, Result};

/// A schema from `(name, type, nullable)` triples, with `"timestamp"` meaning UTC milliseconds.
pub fn schema(fields: &[(&str, &str, bool)]) -> SchemaRef {
    let fields: Vec<Field> = fields
        .iter()
        .map(|(name, ty, nullable)| {
            let data_type = match *ty {
                "utf8" => DataType::Utf8,
                "int64" => DataType::Int64,
                "float64" => DataType::Float64,
                "bool" => DataType::Boolean,
                "timestamp" => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                other => panic!("unknown test type {other}"),
            };
            Field::new(*name, data_type, *nullable)
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// One step of a [`Scenario`].
#[derive(Debug, Clone)]
pub enum Step {
    /// `process` one batch made of these JSON lines.
    Process(Vec<&'static str>),
    /// `on_watermark` at this time (epoch ms).
    Watermark(i64),
    /// Snapshot, build a fresh instance, restore into it, and carry on with the fresh one.
    SnapshotRestore,
}

/// A scripted run of a plugin, shared by the native unit tests and the host's WASM tests, which
/// must produce identical transcripts.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Name, for failure messages.
    pub name: &'static str,
    /// The step config, as JSON.
    pub config: &'static str,
    /// The input schema.
    pub schema: SchemaRef,
    /// What to do, in order.
    pub steps: Vec<Step>,
}

/// A running plugin instance, native or in the WASM host.
pub trait Instance {
    /// See `Transform::process`.
    fn process(&mut self, batch: RecordBatch) -> Result<Output>;
    /// See `Transform::on_watermark`.
    fn on_watermark(&mut self, ts_ms: i64) -> Result<Output>;
    /// Framed snapshot bytes.
    fn snapshot(&mut self) -> Result<Vec<u8>>;
    /// Restore framed snapshot bytes.
    fn restore(&mut self, state: &[u8]) -> Result<()>;
}

impl Instance for Box<dyn DynTransform> {
    fn process(&mut self, batch: RecordBatch) -> Result<Output> {
        DynTransform::process(self.as_mut(), batch)
    }
    fn on_watermark(&mut self, ts_ms: i64) -> Result<Output> {
        DynTransform::on_watermark(self.as_mut(), ts_ms)
    }
    fn snapshot(&mut self) -> Result<Vec<u8>> {
        DynTransform::snapshot(self.as_ref())
    }
    fn restore(&mut self, state: &[u8]) -> Result<()> {
        DynTransform::restore(self.as_mut(), state)
    }
}

impl Scenario {
    /// Runs the scenario with instances from `create`, returning a transcript: one line per
    /// output row (`step N out {json}`), rejected row (`step N rejected R: reason`) or error.
    pub fn run<I: Instance>(&self, mut create: impl FnMut() -> Result<I>) -> Vec<String> {
        let mut transcript = Vec::new();
        let mut instance = match create() {
            Ok(i) => i,
            Err(e) => return vec![format!("create error: {e}")],
        };
        for (n, step) in self.steps.iter().enumerate() {
            let result = match step {
                Step::Process(lines) => instance.process(batch(&self.schema, lines)),
                Step::Watermark(ts) => instance.on_watermark(*ts),
                Step::SnapshotRestore => {
                    let restored = instance.snapshot().and_then(|state| {
                        let mut fresh = create()?;
                        fresh.restore(&state)?;
                        Ok(fresh)
                    });
                    match restored {
                        Ok(fresh) => {
                            instance = fresh;
                            Ok(Output::empty())
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            match result {
                Ok(output) => {
                    for row in rows(&output.batches) {
                        transcript.push(format!("step {n} out {row}"));
                    }
                    for r in output.rejected {
                        transcript.push(format!("step {n} rejected {}: {}", r.row, r.reason));
                    }
                }
                Err(e) => transcript.push(format!("step {n} error: {e}")),
            }
        }
        transcript
    }

    /// Runs the scenario natively with plugin `T`.
    pub fn run_native<T: crate::Transform>(&self) -> Vec<String> {
        self.run(|| crate::create::<T>(self.config, &self.schema).map(|(t, _)| t))
    }
}

/// Lines of `transcript` containing `needle`.
pub fn lines_with<'a>(transcript: &'a [String], needle: &str) -> Vec<&'a str> {
    transcript
        .iter()
        .filter(|l| l.contains(needle))
        .map(String::as_str)
        .collect()
}

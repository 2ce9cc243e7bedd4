//! Test helpers for plugin authors: batches from JSON lines, rows back to JSON.

use std::io::Cursor;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow_json::{ArrayWriter, ReaderBuilder};

/// A batch of `schema` from JSON lines (timestamps as RFC 3339 strings, which keep their
/// fraction up to the column's unit, or integers of epoch milliseconds, whatever the unit).
///
/// # Panics
/// If the lines do not fit the schema: this is for tests.
pub fn batch(schema: &SchemaRef, lines: &[&str]) -> RecordBatch {
    let text = lines
        .iter()
        .map(|line| epoch_millis_to_unit(schema, line))
        .collect::<Vec<_>>()
        .join("\n");
    let mut reader = ReaderBuilder::new(schema.clone())
        .with_batch_size(lines.len().max(1))
        .build(Cursor::new(text.into_bytes()))
        .expect("json reader");
    match reader.next() {
        Some(batch) => batch.expect("lines fit the schema"),
        None => RecordBatch::new_empty(schema.clone()),
    }
}

/// Rewrites integer values of timestamp fields of `line` from epoch ms to the field's unit (the
/// JSON reader takes integers in the column's own unit).
fn epoch_millis_to_unit(schema: &SchemaRef, line: &str) -> String {
    let scale = |unit: &TimeUnit, ms: i64| -> i64 {
        match unit {
            TimeUnit::Second => ms.div_euclid(1000),
            TimeUnit::Millisecond => ms,
            TimeUnit::Microsecond => ms.checked_mul(1_000).expect("epoch ms in range"),
            TimeUnit::Nanosecond => ms.checked_mul(1_000_000).expect("epoch ms in range"),
        }
    };
    let rescaled: Vec<(&str, &TimeUnit)> = schema
        .fields()
        .iter()
        .filter_map(|f| match f.data_type() {
            DataType::Timestamp(unit, _) if *unit != TimeUnit::Millisecond => {
                Some((f.name().as_str(), unit))
            }
            _ => None,
        })
        .collect();
    if rescaled.is_empty() || line.trim().is_empty() {
        return line.to_string();
    }
    let mut value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
    let Some(object) = value.as_object_mut() else {
        return line.to_string();
    };
    let mut changed = false;
    for (name, unit) in rescaled {
        if let Some(v) = object.get_mut(name)
            && let Some(ms) = v.as_i64()
        {
            *v = scale(unit, ms).into();
            changed = true;
        }
    }
    if changed {
        value.to_string()
    } else {
        line.to_string()
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

/// A schema from `(name, type, nullable)` triples: `utf8`, `int64`, `float64`, `bool`,
/// `timestamp` (UTC microseconds, as the host decodes it) and `timestamp_ms` (UTC milliseconds).
pub fn schema(fields: &[(&str, &str, bool)]) -> SchemaRef {
    let fields: Vec<Field> = fields
        .iter()
        .map(|(name, ty, nullable)| {
            let data_type = match *ty {
                "utf8" => DataType::Utf8,
                "int64" => DataType::Int64,
                "float64" => DataType::Float64,
                "bool" => DataType::Boolean,
                "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                "timestamp_ms" => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
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
    /// A checkpoint as the host takes one: a delta ([`Instance::snapshot_delta`]) on top of the
    /// checkpoints kept so far, or, when there are none or the plugin gives no delta, a full
    /// snapshot that starts them over.
    Checkpoint,
    /// Build a fresh instance, restore the kept checkpoints into it (the full snapshot, then
    /// every delta in order) and carry on with the fresh one.
    RestoreCheckpoints,
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
    /// Framed delta bytes, if the plugin keeps deltas.
    fn snapshot_delta(&mut self) -> Result<Option<Vec<u8>>>;
    /// Apply framed delta bytes.
    fn restore_delta(&mut self, delta: &[u8]) -> Result<()>;
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
    fn snapshot_delta(&mut self) -> Result<Option<Vec<u8>>> {
        DynTransform::snapshot_delta(self.as_mut())
    }
    fn restore_delta(&mut self, delta: &[u8]) -> Result<()> {
        DynTransform::restore_delta(self.as_mut(), delta)
    }
}

impl Scenario {
    /// Runs the scenario with instances from `create`, returning a transcript: one line per
    /// output row (`step N out {json}`), rejected row (`step N rejected R: reason`) or error.
    pub fn run<I: Instance>(&self, mut create: impl FnMut() -> Result<I>) -> Vec<String> {
        let mut transcript = Vec::new();
        // The checkpoints kept: a full snapshot, then deltas.
        let mut kept: Vec<Vec<u8>> = Vec::new();
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
                Step::Checkpoint => instance.snapshot_delta().and_then(|delta| {
                    match delta {
                        Some(delta) if !kept.is_empty() => kept.push(delta),
                        _ => kept = vec![instance.snapshot()?],
                    }
                    transcript.push(format!("step {n} checkpoints kept: {}", kept.len()));
                    Ok(Output::empty())
                }),
                Step::RestoreCheckpoints => {
                    let restored = create().and_then(|mut fresh| {
                        if let Some((full, deltas)) = kept.split_first() {
                            fresh.restore(full)?;
                            for delta in deltas {
                                fresh.restore_delta(delta)?;
                            }
                        }
                        Ok(fresh)
                    });
                    restored.map(|fresh| {
                        instance = fresh;
                        Output::empty()
                    })
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

/// Bytes as lowercase hex, for golden snapshots checked into tests.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex (as [`hex`] writes it) back to bytes.
pub fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Lines of `transcript` containing `needle`.
pub fn lines_with<'a>(transcript: &'a [String], needle: &str) -> Vec<&'a str> {
    transcript
        .iter()
        .filter(|l| l.contains(needle))
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{TimestampMicrosecondType, TimestampMillisecondType};

    #[test]
    fn timestamps_are_microseconds_and_integers_are_epoch_millis() {
        let s = schema(&[("ts", "timestamp", true), ("ms", "timestamp_ms", true)]);
        assert_eq!(
            s.field(0).data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        let b = batch(
            &s,
            &[
                r#"{"ts":"2025-11-12T14:38:30.294001Z","ms":"2025-11-12T14:38:30.294Z"}"#,
                r#"{"ts":1762958310294,"ms":1762958310294}"#,
                r#"{"ts":null}"#,
            ],
        );
        let us = b.column(0).as_primitive::<TimestampMicrosecondType>();
        assert_eq!(us.value(0), 1_762_958_310_294_001);
        assert_eq!(us.value(1), 1_762_958_310_294_000);
        assert!(us.is_null(2));
        let ms = b.column(1).as_primitive::<TimestampMillisecondType>();
        assert_eq!(ms.value(0), 1_762_958_310_294);
        assert_eq!(ms.value(1), 1_762_958_310_294);
        assert_eq!(
            rows(&[b.slice(0, 1)])[0]["ts"],
            serde_json::json!("2025-11-12T14:38:30.294001Z")
        );
    }
}

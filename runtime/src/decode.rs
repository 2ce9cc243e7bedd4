//! JSON → Arrow with a declared schema. The plugin harness and the pipeline decode with this one
//! module, so what a plugin author tests is what the pipeline feeds.
//!
//! Types: `utf8` (or `string`), `int64`, `float64`, `bool`, `timestamp` (UTC microseconds,
//! Delta's own precision: RFC 3339 strings keep their microseconds, integers are epoch
//! milliseconds and stay exact). A field is `name: type`, or
//! `name: {type: T, nullable: false}`; fields are nullable unless they say otherwise.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::json::ReaderBuilder;
use serde::Deserialize;

use crate::flat_json::{FlatBatch, FlatDecoder};

/// Why `record` is not UTF-8 text, if it is not.
fn not_utf8(record: &[u8]) -> Option<String> {
    let e = std::str::from_utf8(record).err()?;
    Some(format!(
        "not UTF-8 text (invalid byte at position {} of {}): records must be UTF-8 JSON; the dead letter shows the bytes with U+FFFD in place of invalid ones",
        e.valid_up_to(),
        record.len()
    ))
}

/// A field type as written in YAML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// UTF-8 text.
    #[serde(alias = "string")]
    Utf8,
    /// 64-bit signed integer.
    Int64,
    /// 64-bit float.
    Float64,
    /// true/false.
    #[serde(alias = "boolean")]
    Bool,
    /// UTC timestamp in microseconds.
    Timestamp,
}

impl FieldType {
    /// The Arrow type.
    pub fn data_type(self) -> DataType {
        match self {
            FieldType::Utf8 => DataType::Utf8,
            FieldType::Int64 => DataType::Int64,
            FieldType::Float64 => DataType::Float64,
            FieldType::Bool => DataType::Boolean,
            FieldType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        }
    }
}

/// One field as written in YAML.
#[derive(Debug, Clone)]
pub enum FieldSpec {
    /// `name: type`
    Short(FieldType),
    /// `name: {type: T, nullable: B}`
    Long {
        /// The type.
        field_type: FieldType,
        /// Whether nulls are allowed (default true).
        nullable: bool,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LongField {
    #[serde(rename = "type")]
    field_type: FieldType,
    #[serde(default = "yes")]
    nullable: bool,
}

impl<'de> Deserialize<'de> for FieldSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FieldSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a type (utf8, int64, float64, bool, timestamp) or {type: T, nullable: B}",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FieldSpec, E> {
                FieldType::deserialize(serde::de::value::StrDeserializer::<E>::new(v))
                    .map(FieldSpec::Short)
                    .map_err(|_| {
                        E::custom(format!(
                            "unknown type `{v}` (expected utf8, int64, float64, bool or timestamp)"
                        ))
                    })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<FieldSpec, A::Error> {
                let long =
                    LongField::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(FieldSpec::Long {
                    field_type: long.field_type,
                    nullable: long.nullable,
                })
            }
        }
        d.deserialize_any(V)
    }
}

fn yes() -> bool {
    true
}

/// A schema as written in YAML: field name → spec, in order.
pub type SchemaSpec = flowgate_sdk::config::OrderedMap<FieldSpec>;

/// The Arrow schema for `spec`.
pub fn to_schema(spec: &SchemaSpec) -> SchemaRef {
    let fields: Vec<Field> = spec
        .iter()
        .map(|(name, f)| match f {
            FieldSpec::Short(t) => Field::new(name, t.data_type(), true),
            FieldSpec::Long {
                field_type,
                nullable,
            } => Field::new(name, field_type.data_type(), *nullable),
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// A record that did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeFailure {
    /// Index of the record in the slice given to [`JsonDecoder::decode`].
    pub index: usize,
    /// Why.
    pub reason: String,
}

/// Decodes JSON records into batches of one schema.
#[derive(Debug, Clone)]
pub struct JsonDecoder {
    schema: SchemaRef,
    /// The fast path for records of the usual shape (`None`: a type it does not write).
    flat: Option<FlatDecoder>,
}

impl JsonDecoder {
    /// A decoder for `schema`.
    pub fn new(schema: SchemaRef) -> Self {
        let flat = FlatDecoder::new(&schema);
        JsonDecoder { schema, flat }
    }

    /// The decoder without its fast path: arrow's JSON reader alone, record for record the same
    /// result (the benchmark and the tests compare the two).
    pub fn general_only(schema: SchemaRef) -> Self {
        JsonDecoder { schema, flat: None }
    }

    /// The schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn decode_all(
        &self,
        records: &[&[u8]],
    ) -> Result<Option<RecordBatch>, arrow::error::ArrowError> {
        let mut decoder = ReaderBuilder::new(self.schema.clone())
            .with_batch_size(records.len().max(1))
            .build_decoder()?;
        for record in records {
            let mut rest: &[u8] = record;
            while !rest.is_empty() {
                let read = decoder.decode(rest)?;
                if read == 0 {
                    break;
                }
                rest = &rest[read..];
            }
            // A record must be exactly one JSON value: an incomplete one is an error.
            if decoder.has_partial_record() {
                return Err(arrow::error::ArrowError::JsonError(
                    "incomplete JSON value".into(),
                ));
            }
        }
        match decoder.flush()? {
            Some(batch) => self.fix_epoch_millis(records, batch).map(Some),
            None => Ok(None),
        }
    }

    /// Arrow's JSON reader takes a number for a microsecond timestamp as microseconds; ours are
    /// epoch milliseconds (up to 10^14 in magnitude, the year 5138; a larger number reads as
    /// microseconds). Which values were numbers is read again as text (a timestamp string is
    /// never a number; a string of digits is not a timestamp arrow takes), and their
    /// millisecond reading replaces the microsecond one. Only columns with values before
    /// 1973-03-03 as microseconds, where a number of milliseconds would land, pay for the two
    /// extra decodes. The fast path ([`crate::flat_json`]) reads integers the same way.
    fn fix_epoch_millis(
        &self,
        records: &[&[u8]],
        batch: RecordBatch,
    ) -> Result<RecordBatch, arrow::error::ArrowError> {
        use arrow::array::{Array, AsArray, TimestampMicrosecondArray};
        use arrow::datatypes::{TimestampMicrosecondType, TimestampMillisecondType};
        const SUSPECT_BELOW: i64 = crate::flat_json::MILLIS_BELOW;
        let suspects: Vec<usize> = (0..batch.num_columns())
            .filter(|&i| {
                matches!(
                    batch.column(i).data_type(),
                    DataType::Timestamp(TimeUnit::Microsecond, _)
                ) && batch
                    .column(i)
                    .as_primitive::<TimestampMicrosecondType>()
                    .iter()
                    .flatten()
                    .any(|v| v.unsigned_abs() < SUSPECT_BELOW.unsigned_abs())
            })
            .collect();
        if suspects.is_empty() {
            return Ok(batch);
        }
        let reread =
            |data_type: DataType| -> Result<Option<RecordBatch>, arrow::error::ArrowError> {
                let schema = Arc::new(Schema::new(
                    suspects
                        .iter()
                        .map(|&i| Field::new(self.schema.field(i).name(), data_type.clone(), true))
                        .collect::<Vec<_>>(),
                ));
                let mut decoder = ReaderBuilder::new(schema)
                    .with_batch_size(records.len().max(1))
                    .with_coerce_primitive(true)
                    .build_decoder()?;
                for record in records {
                    decoder.decode(record)?;
                }
                decoder.flush()
            };
        let (Some(millis), Some(texts)) = (
            reread(DataType::Timestamp(
                TimeUnit::Millisecond,
                Some("UTC".into()),
            ))?,
            reread(DataType::Utf8)?,
        ) else {
            return Ok(batch);
        };
        let mut columns = batch.columns().to_vec();
        for (j, &i) in suspects.iter().enumerate() {
            let micros = batch.column(i).as_primitive::<TimestampMicrosecondType>();
            let ms = millis.column(j).as_primitive::<TimestampMillisecondType>();
            let text = texts.column(j).as_string::<i32>();
            let fixed: TimestampMicrosecondArray = (0..micros.len())
                .map(|row| {
                    if micros.is_null(row) {
                        return None;
                    }
                    let number = text.is_valid(row) && text.value(row).parse::<f64>().is_ok();
                    let ms = ms.is_valid(row).then(|| ms.value(row));
                    match ms {
                        Some(ms) if number && ms.unsigned_abs() < SUSPECT_BELOW.unsigned_abs() => {
                            Some(ms * 1000)
                        }
                        _ => Some(micros.value(row)),
                    }
                })
                .collect();
            let tz = match micros.data_type() {
                DataType::Timestamp(_, tz) => tz.clone(),
                _ => None,
            };
            columns[i] = Arc::new(fixed.with_timezone_opt(tz));
            debug_assert_eq!(columns[i].len(), batch.num_rows());
        }
        RecordBatch::try_new(batch.schema(), columns)
    }

    /// Decodes `records` (one JSON object each). Records that do not parse or do not fit the
    /// schema are returned as failures with the reason; the rest form the batch, in order.
    ///
    /// Records of the usual shape go through the flat fast path ([`crate::flat_json`]); the rest
    /// (and every refusal) through [`JsonDecoder::decode_general`], and the two sets of rows are
    /// merged back into the records' order.
    pub fn decode(&self, records: &[&[u8]]) -> (RecordBatch, Vec<DecodeFailure>) {
        let Some(flat) = &self.flat else {
            return self.decode_general(records);
        };
        let FlatBatch { batch, left } = flat.decode(records);
        if left.is_empty() {
            return (batch, Vec::new());
        }
        let rest: Vec<&[u8]> = left.iter().map(|&i| records[i]).collect();
        let (rest_batch, mut failures) = self.decode_general(&rest);
        for f in &mut failures {
            f.index = left[f.index];
        }
        if batch.num_rows() == 0 {
            return (rest_batch, failures);
        }
        if rest_batch.num_rows() == 0 {
            return (batch, failures);
        }
        // Row sources in the records' order: (0, row) from the fast path, (1, row) from the rest.
        let mut order = Vec::with_capacity(batch.num_rows() + rest_batch.num_rows());
        let (mut fast_row, mut rest_row) = (0, 0);
        let (mut next_left, mut next_failure) =
            (left.iter().peekable(), failures.iter().peekable());
        for index in 0..records.len() {
            if next_left.peek() == Some(&&index) {
                next_left.next();
                if next_failure.peek().is_some_and(|f| f.index == index) {
                    next_failure.next();
                } else {
                    order.push((1, rest_row));
                    rest_row += 1;
                }
            } else {
                order.push((0, fast_row));
                fast_row += 1;
            }
        }
        match arrow::compute::interleave_record_batch(&[&batch, &rest_batch], &order) {
            Ok(merged) => (merged, failures),
            // Cannot happen (both batches have the schema); should it, the general way alone.
            Err(_) => self.decode_general(records),
        }
    }

    /// Decodes `records` with arrow's JSON reader, reporting each record that does not decode.
    ///
    /// Records that are not well-formed JSON objects are screened out first (a strict syntax
    /// check: arrow's reader alone takes `01` or `1.5.5` as numbers, so a record's fate would
    /// depend on its neighbours), then the rest are decoded at once; only if a record still does
    /// not fit the schema is the set split in halves until each bad record is alone. A malformed
    /// record in every batch thus costs about one extra decode, not one decoder per record.
    fn decode_general(&self, records: &[&[u8]]) -> (RecordBatch, Vec<DecodeFailure>) {
        let empty = || RecordBatch::new_empty(self.schema.clone());
        // Bytes that are not text, then JSON nested thousands deep (it would overflow the
        // decoder's stack: it recurses), are refused first. The fast path takes only records
        // that are UTF-8 throughout, so the check costs nothing on the usual records.
        let mut failures: Vec<DecodeFailure> = Vec::new();
        let mut refused = vec![false; records.len()];
        for (index, record) in records.iter().enumerate() {
            let reason = not_utf8(record).or_else(|| {
                nesting_over(record, MAX_DEPTH).map(|depth| format!(
                    "JSON nested more than {MAX_DEPTH} levels deep (at least {depth}): a record of the declared schema needs one level"
                ))
            });
            if let Some(reason) = reason {
                failures.push(DecodeFailure { index, reason });
                refused[index] = true;
            }
        }
        let mut candidates: Vec<usize> = Vec::with_capacity(records.len());
        for (index, record) in records.iter().enumerate() {
            if refused[index] {
                continue;
            }
            match syntax_error(record) {
                Some(reason) => failures.push(DecodeFailure { index, reason }),
                None => candidates.push(index),
            }
        }
        let mut good = Vec::new();
        self.split(records, &candidates, &mut good, &mut failures);
        failures.sort_by_key(|f| f.index);
        match arrow::compute::concat_batches(&self.schema, &good) {
            Ok(batch) => (batch, failures),
            // Only over 2 GiB of text in one column: every record that decoded is refused with
            // the reason rather than lost.
            Err(e) => {
                let failed: std::collections::HashSet<usize> =
                    failures.iter().map(|f| f.index).collect();
                failures.extend((0..records.len()).filter(|i| !failed.contains(i)).map(|index| {
                    DecodeFailure {
                        index,
                        reason: format!("the batch could not be assembled ({e}): make `batch.max_records` smaller"),
                    }
                }));
                failures.sort_by_key(|f| f.index);
                (empty(), failures)
            }
        }
    }

    /// Decodes the records at `indices` (ascending) into `good` batches in order, halving the set
    /// while a decode fails.
    fn split(
        &self,
        records: &[&[u8]],
        indices: &[usize],
        good: &mut Vec<RecordBatch>,
        failures: &mut Vec<DecodeFailure>,
    ) {
        if indices.is_empty() {
            return;
        }
        let subset: Vec<&[u8]> = indices.iter().map(|&i| records[i]).collect();
        match self.decode_all(&subset) {
            Ok(Some(batch)) if batch.num_rows() == indices.len() => good.push(batch),
            _ if indices.len() > 1 => {
                let (left, right) = indices.split_at(indices.len() / 2);
                self.split(records, left, good, failures);
                self.split(records, right, good, failures);
            }
            Ok(_) => failures.push(DecodeFailure {
                index: indices[0],
                reason: "not a JSON object".into(),
            }),
            Err(e) => failures.push(DecodeFailure {
                index: indices[0],
                reason: clean(&e),
            }),
        }
    }
}

/// Deepest `[`/`{` nesting a record may have: the schema's fields are flat, and arrow's JSON
/// decoder recurses once per level (50,000 levels overflowed a worker's stack).
const MAX_DEPTH: usize = 128;

/// The nesting depth of `record` (brackets outside strings) once it passes `limit`, else `None`.
fn nesting_over(record: &[u8], limit: usize) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in record {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Some(depth);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// Why `record` is not one well-formed JSON object, if it is not (the reason arrow's decoder
/// would give, so the dead letter reads the same either way).
fn syntax_error(record: &[u8]) -> Option<String> {
    let first = record.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Some(if first.is_none() {
            "empty record".into()
        } else {
            "not a JSON object".into()
        });
    }
    match serde_json::from_slice::<serde::de::IgnoredAny>(record) {
        Ok(_) => None,
        Err(e) if e.is_eof() => Some("incomplete JSON value".into()),
        Err(e) => {
            // JavaScript's non-finite numbers are the usual suspects.
            let text = String::from_utf8_lossy(record);
            let hint = ["NaN", "Infinity"]
                .iter()
                .find(|w| text.contains(*w))
                .map(|w| format!(" (`{w}` is not a JSON number: send null, or the value as a string in a utf8 column)"))
                .unwrap_or_default();
            Some(format!("invalid JSON: {e}{hint}"))
        }
    }
}

/// Each row of `batch` as one JSON object (nulls written out): how rows are shown in the
/// dead letter and by `flowgate plugin test`.
pub fn rows_to_json(batch: &RecordBatch) -> Result<Vec<String>, arrow::error::ArrowError> {
    let mut writer = arrow::json::writer::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, arrow::json::writer::LineDelimited>(Vec::new());
    writer.write(batch)?;
    writer.finish()?;
    let text = String::from_utf8(writer.into_inner())
        .map_err(|e| arrow::error::ArrowError::JsonError(e.to_string()))?;
    Ok(text.lines().map(str::to_string).collect())
}

fn clean(e: &arrow::error::ArrowError) -> String {
    let text = e.to_string();
    text.strip_prefix("Json error: ")
        .unwrap_or(&text)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, TimestampMicrosecondArray};

    fn spec(yaml: &str) -> SchemaSpec {
        crate::yaml::from_str(yaml, "test.yaml").expect("spec")
    }

    #[test]
    fn decodes_timestamps_from_rfc3339_and_epoch_millis() {
        let schema = to_schema(&spec(
            "symbol: {type: utf8, nullable: false}\nprice: float64\nts: timestamp\n",
        ));
        let d = JsonDecoder::new(schema);
        let records: Vec<&[u8]> = vec![
            br#"{"symbol":"A","price":1.5,"ts":"2025-11-12T14:38:30.294758+00:00"}"#,
            br#"{"symbol":"B","price":2,"ts":1762958310294}"#,
            br#"{"symbol":"C","price":2,"ts":"2025-11-12T14:38:30.294759Z"}"#,
            br#"{"symbol":"D","price":2,"ts":"1970-01-01T00:00:01.000001Z"}"#,
        ];
        let (batch, failures) = d.decode(&records);
        assert!(failures.is_empty(), "{failures:?}");
        let ts = batch
            .column(2)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .expect("ts");
        // Microseconds kept from RFC 3339, epoch milliseconds exact, early dates not mistaken
        // for integers.
        assert_eq!(
            ts.values().to_vec(),
            vec![
                1_762_958_310_294_758,
                1_762_958_310_294_000,
                1_762_958_310_294_759,
                1_000_001
            ]
        );
        assert_eq!(batch.column(0).as_string::<i32>().value(1), "B");
    }

    #[test]
    fn json_nested_too_deep_is_refused_before_it_reaches_the_decoder() {
        let decoder = JsonDecoder::new(to_schema(&spec("n: int64\ns: utf8")));
        let deep = format!("{{\"s\":{}{}}}", "[".repeat(50_000), "]".repeat(50_000));
        let brackets_in_a_string = format!("{{\"n\":1,\"s\":\"{}\"}}", "[".repeat(500));
        let records: Vec<&[u8]> = vec![
            br#"{"n":1}"#,
            deep.as_bytes(),
            brackets_in_a_string.as_bytes(),
        ];
        let (batch, failures) = decoder.decode(&records);
        assert_eq!(batch.num_rows(), 2, "{failures:?}");
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].index, 1);
        assert!(
            failures[0]
                .reason
                .starts_with("JSON nested more than 128 levels deep"),
            "{failures:?}"
        );
    }

    #[test]
    fn bad_records_are_reported_and_the_rest_kept() {
        let schema = to_schema(&spec(
            "symbol: {type: utf8, nullable: false}\nprice: float64\n",
        ));
        let d = JsonDecoder::new(schema);
        let records: Vec<&[u8]> = vec![
            br#"{"symbol":"A","price":1}"#,
            br#"{"symbol":"B","price":"lots"}"#,
            br#"not json"#,
            br#"{"price":3}"#,
            br#"{"symbol":"C","price":4"#,
            br#"{"symbol":"D","price":5}"#,
            b"{\"symbol\":\"E\xff\",\"price\":6}",
            b"{\"symbol\":\"F\",\"price\":7}\xc3",
        ];
        let (batch, failures) = d.decode(&records);
        assert_eq!(batch.num_rows(), 2);
        let bad: Vec<usize> = failures.iter().map(|f| f.index).collect();
        assert_eq!(bad, [1, 2, 3, 4, 6, 7], "{failures:?}");
        assert!(failures[0].reason.contains("price"), "{failures:?}");
        // Bytes that are not UTF-8, in a string or outside one, are named with their position.
        assert!(
            failures[4]
                .reason
                .starts_with("not UTF-8 text (invalid byte at position 12 of 25)"),
            "{failures:?}"
        );
        assert!(
            failures[5]
                .reason
                .starts_with("not UTF-8 text (invalid byte at position 24 of 25)"),
            "{failures:?}"
        );
    }
    #[test]
    fn a_few_bad_records_in_a_large_batch_keep_every_good_row_in_order() {
        let schema = to_schema(&spec("n: int64\n"));
        let d = JsonDecoder::new(schema);
        let texts: Vec<String> = (0..5000)
            .map(|i| match i {
                7 | 4095 => format!("{{\"n\":{i}"),     // truncated
                1234 => "{\"n\":\"many\"}".to_string(), // wrong type
                4999 => "[1]".to_string(),              // not an object
                _ => format!("{{\"n\":{i}}}"),
            })
            .collect();
        let records: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
        let (batch, failures) = d.decode(&records);
        let bad: Vec<usize> = failures.iter().map(|f| f.index).collect();
        assert_eq!(bad, [7, 1234, 4095, 4999], "{failures:?}");
        let n = batch
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>();
        let expected: Vec<i64> = (0..5000)
            .filter(|i| ![7, 1234, 4095, 4999].contains(i))
            .collect();
        assert_eq!(n.values().to_vec(), expected);
        assert!(failures[1].reason.contains('n'), "{failures:?}");
    }

    /// A small deterministic generator (xorshift64*), so the differential test needs no crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn one_in(&mut self, n: u64) -> bool {
            self.next().is_multiple_of(n)
        }
        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[(self.next() % items.len() as u64) as usize]
        }
    }

    /// Records of every shape, good and bad: each field's value from a pool of good values,
    /// nulls, wrong types, odd numbers, escapes and timestamps in many forms; fields missing,
    /// repeated, reordered; undeclared fields of every kind; broken syntax.
    fn varied_records(n: usize, seed: u64) -> Vec<Vec<u8>> {
        let mut rng = Rng(seed);
        let symbols = [
            r#""AAPL""#,
            r#""é€""#,
            r#""a\"b""#,
            r#""tab\there""#,
            r#""\u00e9""#,
            r#""x\/y\\""#,
            r#""""#,
            "null",
            "1",
            "true",
            r#""bad\q""#,
            "\"ctl\u{1}\"",
            "[1]",
        ];
        let floats = [
            "1.5",
            "2",
            "-0",
            "0.1",
            "1e5",
            "1E+2",
            "-3.25e-3",
            "01",
            "1.",
            ".5",
            "-",
            "1e400",
            "123456789012345678901234567890",
            r#""4.5""#,
            "null",
            "true",
            "NaN",
            "{}",
            "1.5.5",
            "-0.0",
            "-0.5",
            "0.1000000000000001",
            "123456.789012345",
            "1234567890123456.7",
            "9007199254740993",
            "-9007199254740992",
            "0.000001",
            "99.99",
            "98765432.10987654",
            "12345678.90123457",
        ];
        let ints = [
            "0",
            "7",
            "-12",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775809",
            "1.0",
            "2.5",
            "1e3",
            r#""42""#,
            "null",
            "false",
            "-",
            "00",
        ];
        let times = [
            r#""2025-11-12T14:38:30.294758+00:00""#,
            r#""2025-11-12T14:38:30Z""#,
            r#""2025-11-12T14:38:30.1Z""#,
            r#""2025-11-12T14:38:30.123456789Z""#,
            r#""2025-11-12T14:38:30.1234567891Z""#,
            r#""2025-11-12 14:38:30""#,
            r#""2025-11-12""#,
            r#""2025-11-12T16:38:30+02:00""#,
            r#""1969-12-31T23:59:59.999999Z""#,
            r#""2025-02-30T00:00:00Z""#,
            r#""bad""#,
            r#""2025-11-12t14:38:30z""#,
            "1762958310294",
            "-9223372036854775808",
            "9223372036854775807",
            "-1e19",
            "0",
            "-1",
            "-5",
            "99999999999999",
            "100000000000000",
            "-100000000000000",
            "1762958310294.5",
            "null",
            "true",
            "1e3",
        ];
        let bools = ["true", "false", "null", "1", r#""true""#, "tru"];
        let extras = [
            r#""x":1"#,
            r#""x":"é""#,
            r#""x":null"#,
            r#""x":[1,2]"#,
            r#""x":{"a":1}"#,
            r#""x":-1.5e3"#,
            r#""x":"\u0041""#,
            r#""sym\u0062ol":"B""#,
            r#""x":tru"#,
        ];
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut fields: Vec<String> = Vec::new();
            for (name, pool) in [
                ("symbol", &symbols[..]),
                ("price", &floats[..]),
                ("volume", &ints[..]),
                ("ts", &times[..]),
                ("ok", &bools[..]),
            ] {
                // Mostly a good value; sometimes anything from the pool; sometimes missing.
                let value = match rng.next() % 10 {
                    0..=5 => pool[0],
                    6 => continue,
                    _ => rng.pick(pool),
                };
                fields.push(format!("\"{name}\":{value}"));
            }
            if rng.one_in(4) {
                fields.push(rng.pick(&extras).to_string());
            }
            if rng.one_in(20) {
                fields.push(r#""volume":3"#.to_string()); // a repeated key
            }
            if rng.one_in(3) {
                let i = (rng.next() % fields.len().max(1) as u64) as usize;
                let j = (rng.next() % fields.len().max(1) as u64) as usize;
                if i < fields.len() && j < fields.len() {
                    fields.swap(i, j);
                }
            }
            let sep = if rng.one_in(5) { " , " } else { "," };
            let mut text = format!("{{{}}}", fields.join(sep));
            match rng.next() % 40 {
                0 => {
                    // Cut in half, at a character boundary.
                    let mut half = text.len() / 2;
                    while !text.is_char_boundary(half) {
                        half -= 1;
                    }
                    text.truncate(half);
                }
                1 => text.push_str(" {}"),
                2 => text = format!(" \n{text}\t\r\n"),
                3 => text = format!("[{text}]"),
                4 => text.clear(),
                5 => text.push('x'),
                _ => {}
            }
            let mut bytes = text.into_bytes();
            if rng.one_in(60) && bytes.len() > 12 {
                bytes[10] = 0xff; // not UTF-8
            }
            out.push(bytes);
        }
        out
    }

    fn tick_schema() -> SchemaRef {
        to_schema(&spec(
            "symbol: {type: utf8, nullable: false}\nprice: float64\nvolume: int64\nts: timestamp\nok: bool\n",
        ))
    }

    #[test]
    fn the_fast_path_decodes_each_record_as_the_general_decoder_does() {
        let decoder = JsonDecoder::new(tick_schema());
        let records = varied_records(20_000, 0x5eed);
        let mut fast = 0;
        for record in &records {
            let one = [record.as_slice()];
            let taken = decoder
                .flat
                .as_ref()
                .expect("flat schema")
                .decode(&one)
                .left
                .is_empty();
            fast += usize::from(taken);
            let (batch, failures) = decoder.decode(&one);
            let (expected, expected_failures) = decoder.decode_general(&one);
            let text = String::from_utf8_lossy(record);
            assert_eq!(batch, expected, "record {text}");
            assert_eq!(failures, expected_failures, "record {text}");
        }
        // The pools are mostly good values: most records take the fast path, and some do not.
        assert!(
            fast > records.len() / 4,
            "only {fast} records took the fast path"
        );
        assert!(fast < records.len(), "every record took the fast path");
    }

    /// `records` one at a time through the general decoder, the rows concatenated and each
    /// failure at its record's index.
    fn one_by_one_general(
        decoder: &JsonDecoder,
        records: &[&[u8]],
    ) -> (RecordBatch, Vec<DecodeFailure>) {
        let mut rows = Vec::new();
        let mut failures = Vec::new();
        for (index, record) in records.iter().enumerate() {
            let (one, failed) = decoder.decode_general(&[record]);
            rows.push(one);
            failures.extend(failed.into_iter().map(|f| DecodeFailure { index, ..f }));
        }
        let batch = arrow::compute::concat_batches(&decoder.schema, &rows).expect("concat");
        (batch, failures)
    }

    #[test]
    fn a_batch_of_mixed_records_keeps_each_row_in_its_record_s_place() {
        let decoder = JsonDecoder::new(tick_schema());
        let records = varied_records(5_000, 77);
        let slices: Vec<&[u8]> = records.iter().map(|r| r.as_slice()).collect();
        let (batch, failures) = decoder.decode(&slices);
        let (expected, expected_failures) = one_by_one_general(&decoder, &slices);
        if let Some((got, want)) = failures
            .iter()
            .zip(&expected_failures)
            .find(|(a, b)| a != b)
        {
            panic!(
                "first difference: {got:?} for {:?}, {want:?} for {:?}",
                String::from_utf8_lossy(slices[got.index]),
                String::from_utf8_lossy(slices[want.index])
            );
        }
        assert_eq!(failures.len(), expected_failures.len());
        assert_eq!(batch, expected);
        assert!(batch.num_rows() > 1000 && !failures.is_empty());
    }

    #[test]
    fn times_and_prices_that_share_their_leading_bytes_decode_as_each_does_alone() {
        // The fast path parses a time's date and hour once while records repeat them, and reads
        // a price's digits as it scans them: neighbours that differ in one digit of the date,
        // the hour, a fraction or an offset, or that break the date after a valid one, must
        // come out as each record does alone through the general decoder.
        let times = [
            "2025-11-12T14:38:30.294758+00:00",
            "2025-11-12T14:59:59.999999+00:00",
            "2025-11-12T15:00:00Z",
            "2025-11-12T15:00:00.5-01:30",
            "2025-11-13T15:00:00Z",
            "2025-12-13T15:00:00Z",
            "2024-12-13T15:00:00Z",
            "2024-02-29T10:00:00Z",
            "2025-02-29T10:00:00Z",
            "2025-02-28T10:00:00Z",
            "2025-02-28T24:00:00Z",
            "2025-02-28T10:60:00Z",
            "2025-02-28T10:00:60Z",
            "2025-02-28T10:00:00",
            "2025-02-28T10-00:00Z",
            "1969-12-31T23:59:59.999999Z",
            "1969-12-31T23:59:59.000001Z",
        ];
        let prices = [
            "413.28",
            "-0",
            "-0.0",
            "0.000000000000001",
            "0.0000000000000001",
            "9007199254740991",
            "9007199254740993",
            "900719925474099.3",
            "1234567890123456789.5",
            "12345678901234567.89",
            "1.5e3",
            "-77.125",
        ];
        let records: Vec<String> = times
            .iter()
            .zip(prices.iter().cycle())
            .map(|(ts, price)| format!(r#"{{"symbol":"S","price":{price},"ts":"{ts}"}}"#))
            .chain(
                prices
                    .iter()
                    .map(|price| format!(r#"{{"symbol":"S","price":{price},"ts":0}}"#)),
            )
            .collect();
        let slices: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
        let decoder = JsonDecoder::new(to_schema(&spec(
            "symbol: utf8\nprice: float64\nts: timestamp\n",
        )));
        let (batch, failures) = decoder.decode(&slices);
        let (expected, expected_failures) = one_by_one_general(&decoder, &slices);
        assert_eq!(failures, expected_failures);
        assert_eq!(batch, expected);
        // Both kinds happened: rows kept and records refused.
        assert!(
            batch.num_rows() > 20 && !failures.is_empty(),
            "{failures:?}"
        );
    }

    #[test]
    fn numbers_in_a_timestamp_are_epoch_milliseconds_below_ten_to_the_fourteen() {
        // Both decoders, each record alone and all together: -1 is a millisecond before the
        // epoch (not the string a microsecond before it), 10^14 and more are microseconds.
        let records: Vec<&[u8]> = vec![
            br#"{"ts":-1}"#,
            br#"{"ts":"1969-12-31T23:59:59.999999Z"}"#,
            br#"{"ts":1762958310294}"#,
            br#"{"ts":1762958310294.7}"#,
            br#"{"ts":1762958310294758}"#,
            br#"{"ts":0}"#,
        ];
        let expected = [
            -1000,
            -1,
            1_762_958_310_294_000,
            1_762_958_310_294_000,
            1_762_958_310_294_758,
            0,
        ];
        let schema = to_schema(&spec("ts: timestamp"));
        for decoder in [
            JsonDecoder::new(schema.clone()),
            JsonDecoder::general_only(schema.clone()),
        ] {
            let (batch, failures) = decoder.decode(&records);
            assert!(failures.is_empty(), "{failures:?}");
            let ts = batch
                .column(0)
                .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
            assert_eq!(ts.values().to_vec(), expected);
            for (record, want) in records.iter().zip(expected) {
                let (one, _) = decoder.decode(&[record]);
                let ts = one
                    .column(0)
                    .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
                assert_eq!(ts.value(0), want, "{}", String::from_utf8_lossy(record));
            }
        }
    }
}

//! `validate`: rules per column. Rows that break any rule are rejected with every rule they broke;
//! the rest pass through unchanged (same schema).
//!
//! ```yaml
//! config:
//!   rules:
//!     symbol: { not_null: true, pattern: "^[A-Z]{1,5}$" }
//!     price:  { not_null: true, min: 0, min_exclusive: true }
//!     volume: { min: 0 }
//!     side:   { one_of: [buy, sell] }
//!     ts:     { not_null: true, max_future: 5m, max_age: 7d, relative_to: watermark }
//! ```
#![deny(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use arrow::array::{ArrayAccessor, BooleanArray};
use flowgate_sdk::columns::{
    event_time_sub_millis_nanos, format_event_time, is_event_time_type, is_numeric_type,
};
use flowgate_sdk::hash::xxh3_64_with_seed;
use flowgate_sdk::prelude::*;
use regex::Regex;
use serde::Deserialize;

/// The step's config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Column name → its rules, checked in this order.
    pub rules: OrderedMap<Rule>,
}

/// The rules for one column. Null values only fail `not_null`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Nulls are refused.
    #[serde(default)]
    pub not_null: bool,
    /// Smallest value allowed (numbers; NaN always fails).
    pub min: Option<f64>,
    /// `min` itself is refused too.
    #[serde(default)]
    pub min_exclusive: bool,
    /// Largest value allowed (numbers; NaN always fails).
    pub max: Option<f64>,
    /// `max` itself is refused too.
    #[serde(default)]
    pub max_exclusive: bool,
    /// A regular expression the whole value must match (strings).
    pub pattern: Option<String>,
    /// The allowed values.
    pub one_of: Option<Vec<Scalar>>,
    /// Timestamps: refused if further than this ahead of the reference time.
    pub max_future: Option<Duration>,
    /// Timestamps: refused if older than this behind the reference time.
    pub max_age: Option<Duration>,
    /// Reference time for `max_future`/`max_age`: the watermark (default) or processing time,
    /// which needs the `clock` grant on the step.
    #[serde(default)]
    pub relative_to: RelativeTo,
}

/// A literal in `one_of`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    /// A boolean.
    Bool(bool),
    /// A number.
    Number(f64),
    /// A string.
    Text(String),
}

/// What `max_future` and `max_age` measure against.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelativeTo {
    /// The pipeline watermark; before the first watermark these checks pass.
    #[default]
    Watermark,
    /// The host's wall clock (requires the `clock` grant).
    ProcessingTime,
}

enum Check {
    NotNull,
    Min {
        bound: f64,
        exclusive: bool,
    },
    Max {
        bound: f64,
        exclusive: bool,
    },
    Pattern(Regex),
    OneOfText(HashSet<String>),
    OneOfNumber(Vec<f64>),
    OneOfBool(Vec<bool>),
    MaxFuture {
        millis: i64,
        relative_to: RelativeTo,
    },
    MaxAge {
        millis: i64,
        relative_to: RelativeTo,
    },
}

struct ColumnChecks {
    name: String,
    index: usize,
    checks: Vec<Check>,
}

/// The `validate` transform.
pub struct Validate {
    columns: Vec<ColumnChecks>,
    watermark: Option<i64>,
}

/// Earliest wall-clock reading taken as real: before it, the step has no clock grant.
const CLOCK_SANITY_MS: i64 = 978_307_200_000; // 2001-01-01

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Rule {
    fn build(self, key: &str, data_type: &DataType) -> Result<Vec<Check>> {
        let mut checks = Vec::new();
        let numeric = is_numeric_type(data_type);
        let text = matches!(
            data_type,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        );
        let need = |ok: bool, rule: &str, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::config(
                    &format!("{key}.{rule}"),
                    format!("applies to {what} columns, this column is {data_type}"),
                ))
            }
        };
        if self.not_null {
            checks.push(Check::NotNull);
        }
        if let (Some(lo), Some(hi)) = (self.min, self.max)
            && lo > hi
        {
            return Err(Error::config(
                key,
                format!("min {lo} is greater than max {hi}"),
            ));
        }
        if let Some(bound) = self.min {
            need(numeric, "min", "numeric")?;
            checks.push(Check::Min {
                bound,
                exclusive: self.min_exclusive,
            });
        } else if self.min_exclusive {
            return Err(Error::config(
                &format!("{key}.min_exclusive"),
                "needs `min`",
            ));
        }
        if let Some(bound) = self.max {
            need(numeric, "max", "numeric")?;
            checks.push(Check::Max {
                bound,
                exclusive: self.max_exclusive,
            });
        } else if self.max_exclusive {
            return Err(Error::config(
                &format!("{key}.max_exclusive"),
                "needs `max`",
            ));
        }
        if let Some(pattern) = self.pattern {
            need(text, "pattern", "string")?;
            let regex = Regex::new(&pattern).map_err(|e| {
                Error::config(&format!("{key}.pattern"), format!("not a valid regex: {e}"))
            })?;
            checks.push(Check::Pattern(regex));
        }
        if let Some(values) = self.one_of {
            let bad = || {
                Error::config(
                    &format!("{key}.one_of"),
                    format!("values must all be of the column's type ({data_type})"),
                )
            };
            if text {
                let set = values
                    .into_iter()
                    .map(|v| match v {
                        Scalar::Text(s) => Ok(s),
                        _ => Err(bad()),
                    })
                    .collect::<Result<_>>()?;
                checks.push(Check::OneOfText(set));
            } else if numeric {
                let nums = values
                    .into_iter()
                    .map(|v| match v {
                        Scalar::Number(n) => Ok(n),
                        _ => Err(bad()),
                    })
                    .collect::<Result<_>>()?;
                checks.push(Check::OneOfNumber(nums));
            } else if *data_type == DataType::Boolean {
                let bools = values
                    .into_iter()
                    .map(|v| match v {
                        Scalar::Bool(b) => Ok(b),
                        _ => Err(bad()),
                    })
                    .collect::<Result<_>>()?;
                checks.push(Check::OneOfBool(bools));
            } else {
                return Err(Error::config(
                    &format!("{key}.one_of"),
                    format!("not supported for {data_type} columns"),
                ));
            }
        }
        let relative_to = self.relative_to;
        if self.max_future.is_some() || self.max_age.is_some() {
            need(
                is_event_time_type(data_type),
                if self.max_future.is_some() {
                    "max_future"
                } else {
                    "max_age"
                },
                "timestamp",
            )?;
            if relative_to == RelativeTo::ProcessingTime && now_millis() < CLOCK_SANITY_MS {
                return Err(Error::config(
                    &format!("{key}.relative_to"),
                    "`processing_time` needs a clock: grant it to this step (`grants: [clock]`)",
                ));
            }
        }
        if let Some(d) = self.max_future {
            checks.push(Check::MaxFuture {
                millis: d.as_millis(),
                relative_to,
            });
        }
        if let Some(d) = self.max_age {
            checks.push(Check::MaxAge {
                millis: d.as_millis(),
                relative_to,
            });
        }
        if checks.is_empty() {
            return Err(Error::config(
                key,
                "no rule given (use not_null, min, max, pattern, one_of, max_future or max_age)",
            ));
        }
        Ok(checks)
    }
}

/// Per-row outcome of one check: `None` passes, `Some(reason)` fails.
///
/// The loops test a row's value first and its validity only when the value fails, and the
/// validity through the column's null buffer, not `Array::is_valid`: compiled to WebAssembly,
/// every call through `dyn Array` is an indirect call and an interruption check, per row. Range
/// and time checks look at the whole column first (a minimum or maximum, which vectorizes) and
/// go row by row only when some row may fail.
fn run_check(
    check: &Check,
    batch: &RecordBatch,
    index: usize,
    reference: impl Fn(RelativeTo) -> Option<i64>,
    fail: &mut dyn FnMut(usize, String),
) -> Result<()> {
    let column = batch.column(index);
    let nulls = column.nulls();
    let valid = |i: usize| nulls.is_none_or(|n| n.is_valid(i));
    match check {
        Check::NotNull => {
            if column.null_count() > 0 {
                for i in (0..batch.num_rows()).filter(|&i| !valid(i)) {
                    fail(i, "is null".into());
                }
            }
        }
        Check::Min { bound, exclusive } | Check::Max { bound, exclusive } => {
            let is_min = matches!(check, Check::Min { .. });
            let values = float64_column(batch, index)?;
            let values = values.values();
            // `ok` is false for NaN, as every comparison with it is.
            let (op, any_bad) = match (is_min, exclusive) {
                (true, false) => (">=", any_fails(values, |v| v >= *bound)),
                (true, true) => (">", any_fails(values, |v| v > *bound)),
                (false, false) => ("<=", any_fails(values, |v| v <= *bound)),
                (false, true) => ("<", any_fails(values, |v| v < *bound)),
            };
            if !any_bad {
                return Ok(());
            }
            let ok = |v: f64| match (is_min, exclusive) {
                (true, false) => v >= *bound,
                (true, true) => v > *bound,
                (false, false) => v <= *bound,
                (false, true) => v < *bound,
            };
            for (i, v) in values.iter().enumerate() {
                if !ok(*v) && valid(i) {
                    fail(i, format!("must be {op} {bound}, got {v}"));
                }
            }
        }
        Check::Pattern(regex) => {
            // The columns a pattern guards mostly repeat a few values (symbols, codes): each
            // distinct value of the batch is matched once (up to `PATTERN_MEMO` of them).
            // A value of up to 7 bytes is its own key, as one integer (bytes and length): no
            // hashing of text, no byte-by-byte comparison (a loop per value in WebAssembly).
            let mut short: HashMap<u64, bool, BuildHasherDefault<WordHasher>> = HashMap::default();
            let mut seen: HashMap<&str, bool, BuildHasherDefault<TextHasher>> = HashMap::default();
            for_each_text(batch, index, |i, s| {
                let key = short_key(s);
                let memo = match key {
                    Some(key) => short.get(&key).copied(),
                    None => seen.get(s).copied(),
                };
                let matches = match memo {
                    Some(m) => m,
                    None => {
                        let m = regex.is_match(s);
                        if short.len() + seen.len() < PATTERN_MEMO {
                            match key {
                                Some(key) => short.insert(key, m),
                                None => seen.insert(s, m),
                            };
                        }
                        m
                    }
                };
                if !matches {
                    fail(i, format!("{s:?} does not match `{}`", regex.as_str()));
                }
            })?;
        }
        Check::OneOfText(set) => {
            for_each_text(batch, index, |i, s| {
                if !set.contains(s) {
                    fail(i, format!("{s:?} is not one of the allowed values"));
                }
            })?;
        }
        Check::OneOfNumber(allowed) => {
            let values = float64_column(batch, index)?;
            for (i, v) in values.values().iter().enumerate() {
                if valid(i) && !allowed.contains(v) {
                    fail(i, format!("{v} is not one of the allowed values"));
                }
            }
        }
        Check::OneOfBool(allowed) => {
            let values = column.as_boolean();
            for (i, v) in values.iter().enumerate() {
                if let Some(v) = v
                    && !allowed.contains(&v)
                {
                    fail(i, format!("{v} is not one of the allowed values"));
                }
            }
        }
        Check::MaxFuture {
            millis,
            relative_to,
        }
        | Check::MaxAge {
            millis,
            relative_to,
        } => {
            let Some(reference) = reference(*relative_to) else {
                return Ok(());
            };
            let future = matches!(check, Check::MaxFuture { .. });
            let what = match relative_to {
                RelativeTo::Watermark => "the watermark",
                RelativeTo::ProcessingTime => "processing time",
            };
            let ts = event_time_millis(batch, index)?;
            let limit = if future {
                reference.saturating_add(*millis)
            } else {
                reference.saturating_sub(*millis)
            };
            // No row can fail when the latest time is before the limit's millisecond (the
            // earliest not before it): the common case, decided without looking at each row.
            let values = ts.values();
            if future && values.iter().copied().max().is_none_or(|t| t < limit)
                || !future && values.iter().copied().min().is_none_or(|t| t >= limit)
            {
                return Ok(());
            }
            // Below the millisecond (microsecond columns): `t` is floored, so only a time in the
            // limit's own millisecond needs its fraction to tell if it is past the limit.
            let sub = event_time_sub_millis_nanos(batch, index)?;
            let sub = |i: usize| sub.as_ref().map_or(0, |s| s[i]);
            for (i, t) in values.iter().enumerate() {
                if !valid(i) {
                    continue;
                }
                if future && (*t > limit || (*t == limit && sub(i) > 0)) {
                    fail(
                        i,
                        format!(
                            "{} is more than {} ahead of {what} ({})",
                            format_event_time(*t, sub(i)),
                            Duration::from_millis(*millis),
                            format_millis(reference)
                        ),
                    );
                } else if !future && *t < limit {
                    fail(
                        i,
                        format!(
                            "{} is more than {} behind {what} ({})",
                            format_event_time(*t, sub(i)),
                            Duration::from_millis(*millis),
                            format_millis(reference)
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}

/// Most distinct values of a batch a `pattern` check remembers its answer for.
const PATTERN_MEMO: usize = 4096;

/// Whether any of `values` fails `ok`, looked at 64 at a time without a branch per value (so
/// that the test vectorizes).
fn any_fails(values: &[f64], ok: impl Fn(f64) -> bool) -> bool {
    values
        .chunks(64)
        .any(|chunk| chunk.iter().fold(false, |bad, &v| bad | !ok(v)))
}

/// Hashes text with xxh3 (the standard library's SipHash costs several times more per value,
/// more so compiled to WebAssembly); the values come from the pipeline's own data.
#[derive(Default)]
struct TextHasher(u64);

impl Hasher for TextHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxh3_64_with_seed(bytes, self.0);
    }
    fn write_u8(&mut self, b: u8) {
        self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Text of up to 7 bytes as one integer: its bytes, little endian, and its length in the top
/// byte (so that `"A"` and `"A\0"` differ). `None` for longer text.
fn short_key(s: &str) -> Option<u64> {
    let bytes = s.as_bytes();
    (bytes.len() <= 7).then(|| {
        let mut word = [0u8; 8];
        word[..bytes.len()].copy_from_slice(bytes);
        word[7] = bytes.len() as u8;
        u64::from_le_bytes(word)
    })
}

/// Hashes a [`short_key`]: the 64-bit finalizer of MurmurHash3 (every bit of the key moves
/// every bit of the hash, so the table's low bits and tag bits both vary).
#[derive(Default)]
struct WordHasher(u64);

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        let mut h = n;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        self.0 = h ^ (h >> 33);
    }
}

/// Calls `f` with the row and value of each non-null value of string column `index` (`Utf8`,
/// `LargeUtf8` or `Utf8View`, the types `pattern` and `one_of` accept), in row order.
fn for_each_text<'a>(
    batch: &'a RecordBatch,
    index: usize,
    f: impl FnMut(usize, &'a str),
) -> Result<()> {
    fn walk<'a>(strings: impl ArrayAccessor<Item = &'a str>, mut f: impl FnMut(usize, &'a str)) {
        let nulls = strings.nulls();
        (0..strings.len())
            .filter(|&i| nulls.is_none_or(|n| n.is_valid(i)))
            .for_each(|i| f(i, strings.value(i)));
    }
    let column = batch.column(index);
    match column.data_type() {
        DataType::Utf8 => walk(column.as_string::<i32>(), f),
        DataType::LargeUtf8 => walk(column.as_string::<i64>(), f),
        DataType::Utf8View => walk(column.as_string_view(), f),
        other => {
            return Err(Error::bad_input(format!(
                "column {index} has type {other}, not a string"
            )));
        }
    }
    Ok(())
}

impl Transform for Validate {
    type Config = Config;
    const NAME: &'static str = "validate";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    /// 1: the watermark `relative_to: watermark` rules measure against.
    const STATE_VERSION: u32 = 1;

    fn create(config: Config, input: &SchemaRef) -> Result<(Self, SchemaRef)> {
        if config.rules.is_empty() {
            return Err(Error::config("rules", "no columns given"));
        }
        let mut columns = Vec::new();
        for (name, rule) in config.rules.0 {
            let key = format!("rules.{name}");
            let index = column_index(input, &name, &key)?;
            let checks = rule.build(&key, input.field(index).data_type())?;
            columns.push(ColumnChecks {
                name,
                index,
                checks,
            });
        }
        Ok((
            Validate {
                columns,
                watermark: None,
            },
            input.clone(),
        ))
    }

    fn process(&mut self, batch: RecordBatch) -> Result<Output> {
        let rows = batch.num_rows();
        let mut reasons: Vec<Option<String>> = Vec::new();
        let watermark = self.watermark;
        let now = std::cell::OnceCell::new();
        let reference = |r: RelativeTo| match r {
            RelativeTo::Watermark => watermark,
            RelativeTo::ProcessingTime => Some(*now.get_or_init(now_millis)),
        };
        for column in &self.columns {
            for check in &column.checks {
                let name = &column.name;
                run_check(check, &batch, column.index, reference, &mut |row, why| {
                    if reasons.is_empty() {
                        reasons.resize(rows, None);
                    }
                    match &mut reasons[row] {
                        Some(text) => {
                            text.push_str("; ");
                            text.push_str(name);
                            text.push_str(": ");
                            text.push_str(&why);
                        }
                        slot @ None => *slot = Some(format!("{name}: {why}")),
                    }
                })?;
            }
        }
        if reasons.is_empty() {
            return Ok(Output::batch(batch));
        }
        let keep: BooleanArray = reasons.iter().map(|r| Some(r.is_none())).collect();
        let mut output = Output::batch(filter_record_batch(&batch, &keep)?);
        for (row, reason) in reasons.into_iter().enumerate() {
            if let Some(reason) = reason {
                output.reject(row, reason);
            }
        }
        Ok(output)
    }

    fn on_watermark(&mut self, ts_ms: i64) -> Result<Output> {
        self.watermark = Some(self.watermark.map_or(ts_ms, |w| w.max(ts_ms)));
        Ok(Output::empty())
    }

    /// Version 1: the watermark, as one byte (0 none, 1 some) then, if some, its epoch ms as an
    /// i64, little endian.
    fn snapshot(&self) -> Result<Vec<u8>> {
        Ok(match self.watermark {
            None => vec![0],
            Some(w) => {
                let mut out = Vec::with_capacity(9);
                out.push(1);
                out.extend_from_slice(&w.to_le_bytes());
                out
            }
        })
    }

    fn restore(&mut self, version: u32, state: &[u8]) -> Result<()> {
        self.watermark = match (version, state) {
            // Version 0: validate kept no state before its watermark was saved.
            (0, []) => None,
            (1, [0]) => None,
            (1, [1, rest @ ..]) => {
                let bytes: [u8; 8] = rest.try_into().map_err(|_| {
                    Error::bad_input(format!(
                        "validate state is corrupt: watermark of {} bytes, expected 8",
                        rest.len()
                    ))
                })?;
                Some(i64::from_le_bytes(bytes))
            }
            (0 | 1, _) => {
                return Err(Error::bad_input(format!(
                    "validate state version {version} is corrupt ({} bytes)",
                    state.len()
                )));
            }
            _ => {
                return Err(Error::bad_input(format!(
                    "validate state version {version} was written by a newer plugin version; \
                     this one reads versions 0 and {}",
                    Self::STATE_VERSION
                )));
            }
        };
        Ok(())
    }
}

export_transform!(Validate);

/// Scripted runs shared with the host's WASM tests.
#[cfg(any(test, feature = "scenarios"))]
pub mod scenarios;

#[cfg(test)]
mod tests;

//! `window`: event-time windows per group, with named aggregates.
//!
//! ```yaml
//! config:
//!   event_time: ts
//!   size: 1m          # tumbling; add `slide: 30s` for hopping windows
//!   group_by: [symbol]
//!   aggregates:       # output columns, in this order
//!     open: { first: price }
//!     high: { max: price }
//!     low: { min: price }
//!     close: { last: price }
//!     volume: { sum: volume }
//!     trades: { count: "*" }
//!     avg_price: { avg: price }
//! ```
//!
//! Output rows: the `group_by` columns, `window_start`, `window_end`, then the aggregates. A
//! window is emitted once, when the watermark reaches its end; a row that only falls in windows
//! already emitted is rejected as `late`. `first`/`last` follow event time at the column's full
//! precision (a microsecond timestamp orders within a millisecond), not arrival order (ties keep
//! arrival order); windows and watermarks are in milliseconds. Aggregates skip nulls; `count: "*"`
//! counts rows. Inputs are integers, floats or timestamps (decimals are refused: convert them to
//! float64 upstream); a `UInt64` value past `i64::MAX` is skipped by all but `count`.
//!
//! Snapshots (state version 4) store the definition the windows were opened under (event time,
//! size, slide, groups, aggregates) and the group columns' types, then each open window's groups
//! as they are held: the key packed as [`KeyPacker`] packs it and the accumulators as fixed-size
//! little-endian fields, so taking the state at a checkpoint is a sort and a copy, not an
//! encoding per value. A step configured otherwise refuses that state, since its open windows
//! would come out wrong; one whose group columns have other types (µs timestamps become ms)
//! converts the keys through their values, or refuses those that do not fit.
//! Versions 2 and 3 (keys as [`flowgate_sdk::keys::KeyValue`]s, postcard) are still read.
#![deny(unsafe_code)]

use std::collections::BTreeMap;

use arrow::array::{
    Array, ArrayRef, Float64Array, Int64Array, PrimitiveArray, TimestampMillisecondArray,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{
    ArrowPrimitiveType, Float16Type, Float32Type, Int8Type, Int16Type, Int32Type, Int64Type,
    TimeUnit, TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use flowgate_sdk::columns::{
    event_time_sub_millis_nanos, float64_column, int64_column, is_event_time_type, is_numeric_type,
};
use flowgate_sdk::hash::xxh3_64_with_seed;
use flowgate_sdk::keys::{self, KeyPacker, KeyValue};
use flowgate_sdk::prelude::*;
use hashbrown::HashTable;
use serde::{Deserialize, Serialize};

/// The step's config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The event-time column.
    pub event_time: String,
    /// Window length.
    pub size: Duration,
    /// Distance between window starts (hopping windows); defaults to `size` (tumbling).
    pub slide: Option<Duration>,
    /// Columns to group by.
    #[serde(default)]
    pub group_by: Vec<String>,
    /// Output column → aggregate, e.g. `high: { max: price }`.
    pub aggregates: OrderedMap<Aggregate>,
}

/// One aggregate over one column.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Aggregate {
    /// Value at the earliest event time.
    First(String),
    /// Value at the latest event time.
    Last(String),
    /// Smallest value.
    Min(String),
    /// Largest value.
    Max(String),
    /// Mean, as float64.
    Avg(String),
    /// Sum (int64 for integer columns, float64 otherwise).
    Sum(String),
    /// Non-null values of a column, or rows with `"*"`.
    Count(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Func {
    First,
    Last,
    Min,
    Max,
    Avg,
    Sum,
    Count,
}

/// How an input column is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Int,
    Float,
}

struct Agg {
    func: Func,
    /// Input column, `None` for `count: "*"`.
    column: Option<usize>,
    num: Num,
}

/// Running value of one aggregate in one window and group. `value` holds i64 or f64 bits.
/// `(ts, ts_sub_ns)` is the event time of `first`/`last`'s value: epoch ms, then nanoseconds
/// within that millisecond. Part of the snapshot: field order is the layout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Acc {
    value: i64,
    ts: i64,
    ts_sub_ns: u32,
    count: i64,
}

/// Bytes of one [`Acc`] in a version-4 snapshot: its fields in order, little-endian.
const ACC_BYTES: usize = 8 + 8 + 4 + 8;

impl Acc {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.value.to_le_bytes());
        out.extend_from_slice(&self.ts.to_le_bytes());
        out.extend_from_slice(&self.ts_sub_ns.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
    }

    fn get(bytes: &[u8; ACC_BYTES]) -> Acc {
        let (value, rest) = bytes.split_at(8);
        let (ts, rest) = rest.split_at(8);
        let (ts_sub_ns, count) = rest.split_at(4);
        let i64_at = |b: &[u8]| i64::from_le_bytes(b.try_into().unwrap_or_default());
        Acc {
            value: i64_at(value),
            ts: i64_at(ts),
            ts_sub_ns: u32::from_le_bytes(ts_sub_ns.try_into().unwrap_or_default()),
            count: i64_at(count),
        }
    }
}

/// Event time at full precision: epoch ms, then nanoseconds within the millisecond.
type EventTime = (i64, u32);

/// One window's groups: each group's packed key and its accumulators, one per aggregate, in
/// an arena of flat chunks of [`CHUNK`] groups (slot `s` holds `accs[s % CHUNK * width..][..width]`
/// of chunk `s / CHUNK`). A batch's rows are first given their groups' slots, then each
/// aggregate runs over its column in one loop (rather than every aggregate once per row, through
/// a dispatch on its kind).
#[derive(Default)]
struct Groups {
    /// Per group: the hash of its key, the key, its slot.
    table: HashTable<(u64, Box<[u8]>, u32)>,
    /// The first chunk grows with its groups; the later ones are allocated whole. Chunks, not
    /// one vector: a vector that doubles holds twice the groups' bytes while it moves, and the
    /// WebAssembly memory it grew into is never given back.
    chunks: Vec<Vec<Acc>>,
}

/// Groups in one chunk of a window's arena.
const CHUNK: usize = 256;

/// The hash a group's packed key is found by (xxh3: the standard library's SipHash costs several
/// times more per key, more so compiled to WebAssembly). Hash order never shows: output sorts
/// groups by key, snapshots by the key's bytes.
fn key_hash(key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, 0)
}

/// Whether two packed keys are equal, compared 8 bytes at a time (a `memcmp` compiled to
/// WebAssembly compares one byte per loop turn).
#[inline(always)]
fn same_key(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if n < 8 {
        return a == b;
    }
    let word = |bytes: &[u8], at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let mut at = 0;
    while at + 8 < n {
        if word(a, at) != word(b, at) {
            return false;
        }
        at += 8;
    }
    // The last 8 bytes (overlapping the word before when `n` is not a multiple of 8).
    word(a, n - 8) == word(b, n - 8)
}

impl Groups {
    fn len(&self) -> usize {
        self.table.len()
    }

    /// The slot of group `key`, if the window holds it.
    fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        self.table
            .find(hash, |(h, k, _)| *h == hash && same_key(k, key))
            .map(|(_, _, slot)| *slot)
    }

    /// A new group `key` (not held yet) in the next slot; `accs` are its accumulators.
    fn add(&mut self, hash: u64, key: &[u8], accs: &[Acc]) -> u32 {
        let slot = self.table.len();
        // A new chunk for every `CHUNK`-th group (unless `reserve` made the first one).
        if self.chunks.len() == slot / CHUNK {
            self.chunks.push(match slot {
                0 => Vec::new(),
                _ => Vec::with_capacity(CHUNK * accs.len()),
            });
        }
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.extend_from_slice(accs);
        }
        let slot = slot as u32;
        self.table
            .insert_unique(hash, (hash, key.into(), slot), |(h, _, _)| *h);
        slot
    }

    /// The slot of the group `key`, opened empty if new; `fresh`: an empty group's accumulators.
    fn slot(&mut self, key: &[u8], fresh: &[Acc]) -> u32 {
        let hash = key_hash(key);
        match self.find(hash, key) {
            Some(slot) => slot,
            None => self.add(hash, key, fresh),
        }
    }

    /// Adds group `key` with `accs`; false if the window holds it already (nothing changes).
    fn insert(&mut self, key: &[u8], accs: &[Acc]) -> bool {
        let hash = key_hash(key);
        if self.find(hash, key).is_some() {
            return false;
        }
        self.add(hash, key, accs);
        true
    }

    /// Room for `groups` more groups of `width` accumulators.
    fn reserve(&mut self, groups: usize, width: usize) {
        self.table.reserve(groups, |(h, _, _)| *h);
        if self.chunks.is_empty() {
            self.chunks
                .push(Vec::with_capacity(groups.min(CHUNK).saturating_mul(width)));
        }
    }

    /// Each group's key and accumulators, in no particular order.
    fn iter(&self, width: usize) -> impl Iterator<Item = (&[u8], &[Acc])> {
        self.table.iter().map(move |(_, key, slot)| {
            let (chunk, at) = (*slot as usize / CHUNK, *slot as usize % CHUNK * width);
            (key.as_ref(), &self.chunks[chunk][at..at + width])
        })
    }
}

/// One aggregate's pass over a window's run of rows: the row of `run[i]` goes to the group in
/// slot `slots[i]`, whose accumulator for aggregate `n` is [`Column::acc`]. Each
/// accumulator sees its rows in the run's order, as it would row by row.
struct Column<'a> {
    run: &'a [(i64, u32)],
    slots: &'a [u32],
    width: usize,
    n: usize,
}

impl Column<'_> {
    /// The accumulator of aggregate `n` in slot `slot`.
    #[inline(always)]
    fn acc<'c>(&self, chunks: &'c mut [Vec<Acc>], slot: u32) -> &'c mut Acc {
        let slot = slot as usize;
        &mut chunks[slot / CHUNK][slot % CHUNK * self.width + self.n]
    }

    /// `count: "*"`: every row counts.
    fn count_rows(&self, chunks: &mut [Vec<Acc>]) {
        for &slot in self.slots {
            self.acc(chunks, slot).count += 1;
        }
    }

    /// `f(accumulator, row, value)` for each row whose value is not null, then counts the row.
    #[inline(always)]
    fn each(
        &self,
        chunks: &mut [Vec<Acc>],
        bits: &[i64],
        nulls: Option<&NullBuffer>,
        mut f: impl FnMut(&mut Acc, usize, i64),
    ) {
        for (&(_, row), &slot) in self.run.iter().zip(self.slots) {
            let row = row as usize;
            if nulls.is_none_or(|nb| nb.is_valid(row)) {
                let acc = self.acc(chunks, slot);
                f(acc, row, bits[row]);
                acc.count += 1;
            }
        }
    }

    /// Folds the column's values (`bits`: i64 values or f64 bits) into the accumulators; `at`
    /// gives a row's event time, for `first` and `last`. A NaN wins min and max over any number;
    /// sums and averages add in the run's order.
    fn fold(
        &self,
        accs: &mut [Vec<Acc>],
        agg: &Agg,
        bits: &[i64],
        nulls: Option<&NullBuffer>,
        at: impl Fn(usize) -> EventTime,
    ) {
        let float = |bits: i64| f64::from_bits(bits as u64);
        match (agg.func, agg.num) {
            (Func::First, _) => self.each(accs, bits, nulls, |acc, row, value| {
                let ts = at(row);
                if acc.count == 0 || ts < (acc.ts, acc.ts_sub_ns) {
                    acc.value = value;
                    (acc.ts, acc.ts_sub_ns) = ts;
                }
            }),
            (Func::Last, _) => self.each(accs, bits, nulls, |acc, row, value| {
                let ts = at(row);
                if acc.count == 0 || ts >= (acc.ts, acc.ts_sub_ns) {
                    acc.value = value;
                    (acc.ts, acc.ts_sub_ns) = ts;
                }
            }),
            (Func::Min, Num::Int) => self.each(accs, bits, nulls, |acc, _, value| {
                if acc.count == 0 || value < acc.value {
                    acc.value = value;
                }
            }),
            (Func::Min, Num::Float) => self.each(accs, bits, nulls, |acc, _, value| {
                let f = float(value);
                if acc.count == 0 || f < float(acc.value) || f.is_nan() {
                    acc.value = value;
                }
            }),
            (Func::Max, Num::Int) => self.each(accs, bits, nulls, |acc, _, value| {
                if acc.count == 0 || value > acc.value {
                    acc.value = value;
                }
            }),
            (Func::Max, Num::Float) => self.each(accs, bits, nulls, |acc, _, value| {
                let f = float(value);
                if acc.count == 0 || f > float(acc.value) || f.is_nan() {
                    acc.value = value;
                }
            }),
            (Func::Sum, Num::Int) => self.each(accs, bits, nulls, |acc, _, value| {
                acc.value = acc.value.wrapping_add(value);
            }),
            (Func::Avg, Num::Int) => self.each(accs, bits, nulls, |acc, _, value| {
                acc.value = (float(acc.value) + value as f64).to_bits() as i64;
            }),
            (Func::Sum | Func::Avg, Num::Float) => self.each(accs, bits, nulls, |acc, _, value| {
                acc.value = (float(acc.value) + float(value)).to_bits() as i64;
            }),
            (Func::Count, _) => self.each(accs, bits, nulls, |_, _, _| {}),
        }
    }
}

/// The `window` transform.
pub struct Window {
    event_time: usize,
    size: i64,
    slide: i64,
    group_columns: Vec<usize>,
    /// Types of the `group_by` columns: recorded in snapshots, and to rebuild keys from one
    /// packed for other types or stored as values.
    group_types: Vec<DataType>,
    /// Packs the `group_by` columns (`None`: no groups).
    packer: Option<KeyPacker>,
    aggs: Vec<Agg>,
    output: SchemaRef,
    /// Window start → group key (packed) → accumulators.
    windows: BTreeMap<i64, Groups>,
    watermark: Option<i64>,
    /// The config the windows are opened under, as snapshots record it.
    definition: String,
}

/// One window in a snapshot: its start, and each group's key (one value per `group_by` column)
/// with its accumulators, groups in key order.
type SavedWindow = (i64, Vec<(Vec<KeyValue>, Vec<Acc>)>);

/// Snapshot body, state version 4: this head (postcard), then each window in the order of its
/// start: the start (`i64`) and its number of groups (`u64`), then each group in the order of
/// its packed key's bytes: the key's length (`u32`), the key as [`KeyPacker`] packs it (for the
/// head's `key_types`), and one [`Acc`] per aggregate ([`ACC_BYTES`] each); starts, counts,
/// lengths and accumulators little-endian.
#[derive(Serialize, Deserialize)]
struct Head {
    definition: String,
    /// The `group_by` columns' types the keys were packed for (arrow's `DataType` as text).
    key_types: Vec<String>,
    watermark: Option<i64>,
    windows: u64,
}

/// Reads a version-4 snapshot's fixed-size fields in order; running out is an error.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.bytes.len() {
            return Err(Error::bad_input(format!(
                "window state is corrupt: it ends {} bytes early",
                n - self.bytes.len()
            )));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().unwrap_or([0; N]))
    }
}

/// Snapshot body, state version 3 (postcard; still read). Version 2 lacked `definition`;
/// version 1 held `arrow::row` bytes as keys.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct State {
    definition: String,
    watermark: Option<i64>,
    windows: Vec<SavedWindow>,
}

/// State version 2: no definition recorded.
#[derive(Deserialize)]
struct StateV2 {
    watermark: Option<i64>,
    windows: Vec<SavedWindow>,
}

/// The config windows are opened under, in one line (`event_time: ts, size: 1m, …`).
fn definition(config: &Config) -> String {
    let aggregates: Vec<String> = config
        .aggregates
        .iter()
        .map(|(name, a)| {
            let (func, column) = match a {
                Aggregate::First(c) => ("first", c),
                Aggregate::Last(c) => ("last", c),
                Aggregate::Min(c) => ("min", c),
                Aggregate::Max(c) => ("max", c),
                Aggregate::Avg(c) => ("avg", c),
                Aggregate::Sum(c) => ("sum", c),
                Aggregate::Count(c) => ("count", c),
            };
            format!("{name}: {{{func}: {column}}}")
        })
        .collect();
    format!(
        "event_time: {}, size: {}, slide: {}, group_by: [{}], aggregates: {{{}}}",
        config.event_time,
        config.size,
        config.slide.unwrap_or(config.size),
        config.group_by.join(", "),
        aggregates.join(", ")
    )
}

fn utc_millis() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

impl Window {
    fn closed(&self, start: i64) -> bool {
        self.watermark.is_some_and(|w| start + self.size <= w)
    }

    fn finish(&mut self, closed: BTreeMap<i64, Groups>) -> Result<Output> {
        let mut keys: Vec<Box<[u8]>> = Vec::new();
        let mut starts = Vec::new();
        let mut accs: Vec<Vec<Acc>> = Vec::new();
        let width = self.aggs.len();
        for (start, groups) in closed {
            let mut groups: Vec<_> = groups.iter(width).collect();
            if let Some(packer) = &self.packer {
                groups.sort_unstable_by(|a, b| packer.cmp(a.0, b.0));
            }
            for (key, acc) in groups {
                keys.push(key.into());
                starts.push(start);
                accs.push(acc.to_vec());
            }
        }
        if starts.is_empty() {
            return Ok(Output::empty());
        }
        let mut columns: Vec<ArrayRef> = Vec::new();
        if let Some(packer) = &self.packer {
            columns.extend(packer.unpack(keys.iter().map(|k| k.as_ref()))?);
        }
        let ends: Vec<i64> = starts.iter().map(|s| s + self.size).collect();
        columns.push(std::sync::Arc::new(
            TimestampMillisecondArray::from(starts).with_timezone("UTC"),
        ));
        columns.push(std::sync::Arc::new(
            TimestampMillisecondArray::from(ends).with_timezone("UTC"),
        ));
        let first_agg = self.group_columns.len() + 2;
        for (n, agg) in self.aggs.iter().enumerate() {
            let target = self.output.field(first_agg + n).data_type();
            let column: ArrayRef = match agg.func {
                Func::Count => std::sync::Arc::new(Int64Array::from_iter_values(
                    accs.iter().map(|a| a[n].count),
                )),
                Func::Avg => std::sync::Arc::new(
                    accs.iter()
                        .map(|a| {
                            let a = a[n];
                            (a.count > 0).then(|| f64::from_bits(a.value as u64) / a.count as f64)
                        })
                        .collect::<Float64Array>(),
                ),
                _ => {
                    let values = accs.iter().map(|a| (a[n].count > 0).then_some(a[n].value));
                    match agg.num {
                        Num::Int => from_i64(values, target)?,
                        Num::Float => {
                            from_f64(values.map(|v| v.map(|v| f64::from_bits(v as u64))), target)?
                        }
                    }
                }
            };
            columns.push(column);
        }
        Ok(Output::batch(RecordBatch::try_new(
            self.output.clone(),
            columns,
        )?))
    }
}

/// An aggregate's i64 results as a column of `target`, the input column's type (values that
/// came from that type, so they fit), or `Int64`.
fn from_i64(values: impl Iterator<Item = Option<i64>>, target: &DataType) -> Result<ArrayRef> {
    fn narrow<T: ArrowPrimitiveType>(values: impl Iterator<Item = Option<i64>>) -> ArrayRef
    where
        T::Native: TryFrom<i64>,
    {
        std::sync::Arc::new(
            values
                .map(|v| v.and_then(|v| T::Native::try_from(v).ok()))
                .collect::<PrimitiveArray<T>>(),
        )
    }
    fn time<T: arrow::datatypes::ArrowTimestampType>(
        values: impl Iterator<Item = Option<i64>>,
        zone: &Option<std::sync::Arc<str>>,
    ) -> ArrayRef {
        std::sync::Arc::new(
            values
                .collect::<PrimitiveArray<T>>()
                .with_timezone_opt(zone.clone()),
        )
    }
    Ok(match target {
        DataType::Int8 => narrow::<Int8Type>(values),
        DataType::Int16 => narrow::<Int16Type>(values),
        DataType::Int32 => narrow::<Int32Type>(values),
        DataType::Int64 => narrow::<Int64Type>(values),
        DataType::UInt8 => narrow::<UInt8Type>(values),
        DataType::UInt16 => narrow::<UInt16Type>(values),
        DataType::UInt32 => narrow::<UInt32Type>(values),
        DataType::UInt64 => narrow::<UInt64Type>(values),
        DataType::Timestamp(TimeUnit::Second, zone) => time::<TimestampSecondType>(values, zone),
        DataType::Timestamp(TimeUnit::Millisecond, zone) => {
            time::<TimestampMillisecondType>(values, zone)
        }
        DataType::Timestamp(TimeUnit::Microsecond, zone) => {
            time::<TimestampMicrosecondType>(values, zone)
        }
        DataType::Timestamp(TimeUnit::Nanosecond, zone) => {
            time::<TimestampNanosecondType>(values, zone)
        }
        other => {
            return Err(Error::bad_input(format!(
                "cannot write integer aggregates as {other}"
            )));
        }
    })
}

/// Arrow's half-precision float (the `half` crate's).
type F16 = <Float16Type as ArrowPrimitiveType>::Native;

/// An aggregate's f64 results as a column of `target` (the input's float type, or `Float64`).
fn from_f64(values: impl Iterator<Item = Option<f64>>, target: &DataType) -> Result<ArrayRef> {
    Ok(match target {
        DataType::Float64 => std::sync::Arc::new(values.collect::<Float64Array>()),
        DataType::Float32 => std::sync::Arc::new(
            values
                .map(|v| v.map(|v| v as f32))
                .collect::<PrimitiveArray<Float32Type>>(),
        ),
        DataType::Float16 => std::sync::Arc::new(
            values
                .map(|v| v.map(F16::from_f64))
                .collect::<PrimitiveArray<Float16Type>>(),
        ),
        other => {
            return Err(Error::bad_input(format!(
                "cannot write float aggregates as {other}"
            )));
        }
    })
}

impl Transform for Window {
    type Config = Config;
    const NAME: &'static str = "window";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    /// 4: packed keys and fixed-size accumulators (3: keys as [`KeyValue`]s with the definition;
    /// 2: without it; 1 held `arrow::row` bytes).
    const STATE_VERSION: u32 = 4;

    fn create(config: Config, input: &SchemaRef) -> Result<(Self, SchemaRef)> {
        let defined = definition(&config);
        let event_time = column_index(input, &config.event_time, "event_time")?;
        let et_type = input.field(event_time).data_type();
        if !is_event_time_type(et_type) {
            return Err(Error::config(
                "event_time",
                format!(
                    "column `{}` is {et_type}, not a timestamp",
                    config.event_time
                ),
            ));
        }
        let size = config.size.as_millis();
        if size <= 0 {
            return Err(Error::config("size", "must be greater than zero"));
        }
        let slide = config.slide.map_or(size, Duration::as_millis);
        if slide <= 0 || slide > size {
            return Err(Error::config(
                "slide",
                format!(
                    "must be greater than zero and at most `size` ({})",
                    config.size
                ),
            ));
        }
        if config.aggregates.is_empty() {
            return Err(Error::config("aggregates", "name at least one aggregate"));
        }
        let mut fields = Vec::new();
        let mut group_columns = Vec::new();
        let mut group_types = Vec::new();
        for (i, name) in config.group_by.iter().enumerate() {
            let index = column_index(input, name, &format!("group_by[{i}]"))?;
            let field = input.field(index);
            if !keys::is_key_type(field.data_type()) {
                return Err(Error::config(
                    &format!("group_by[{i}]"),
                    format!("cannot group by {} columns", field.data_type()),
                ));
            }
            group_types.push(field.data_type().clone());
            fields.push(field.clone());
            group_columns.push(index);
        }
        fields.push(Field::new("window_start", utc_millis(), false));
        fields.push(Field::new("window_end", utc_millis(), false));
        let mut aggs = Vec::new();
        for (name, aggregate) in config.aggregates.iter() {
            let key = format!("aggregates.{name}");
            if fields.iter().any(|f| f.name() == name) {
                return Err(Error::config(
                    &key,
                    format!("output column `{name}` is already taken"),
                ));
            }
            let (func, column) = match aggregate {
                Aggregate::First(c) => (Func::First, c),
                Aggregate::Last(c) => (Func::Last, c),
                Aggregate::Min(c) => (Func::Min, c),
                Aggregate::Max(c) => (Func::Max, c),
                Aggregate::Avg(c) => (Func::Avg, c),
                Aggregate::Sum(c) => (Func::Sum, c),
                Aggregate::Count(c) => (Func::Count, c),
            };
            if func == Func::Count && column == "*" {
                fields.push(Field::new(name, DataType::Int64, false));
                aggs.push(Agg {
                    func,
                    column: None,
                    num: Num::Int,
                });
                continue;
            }
            let index = column_index(input, column, &key)?;
            let data_type = input.field(index).data_type();
            if func != Func::Count && !is_numeric_type(data_type) {
                return Err(Error::config(
                    &key,
                    format!(
                        "column `{column}` is {data_type}; aggregates need numbers or timestamps"
                    ),
                ));
            }
            if func != Func::Count
                && matches!(
                    data_type,
                    DataType::Decimal32(..)
                        | DataType::Decimal64(..)
                        | DataType::Decimal128(..)
                        | DataType::Decimal256(..)
                )
            {
                return Err(Error::config(
                    &key,
                    format!(
                        "column `{column}` is {data_type}; aggregates take integers, floats or \
                         timestamps (convert decimals to float64 upstream)"
                    ),
                ));
            }
            let num = if data_type.is_floating() {
                Num::Float
            } else {
                Num::Int
            };
            let out_type = match func {
                Func::Count => DataType::Int64,
                Func::Avg => DataType::Float64,
                Func::Sum if num == Num::Float => DataType::Float64,
                Func::Sum => DataType::Int64,
                _ => data_type.clone(),
            };
            fields.push(Field::new(name, out_type, func != Func::Count));
            aggs.push(Agg {
                func,
                column: Some(index),
                num,
            });
        }
        let packer = if group_types.is_empty() {
            None
        } else {
            Some(KeyPacker::new(&group_types)?)
        };
        let output: SchemaRef = std::sync::Arc::new(Schema::new(fields));
        let window = Window {
            event_time,
            size,
            slide,
            group_types,
            group_columns,
            packer,
            aggs,
            output: output.clone(),
            windows: BTreeMap::new(),
            watermark: None,
            definition: defined,
        };
        Ok((window, output))
    }

    fn process(&mut self, batch: RecordBatch) -> Result<Output> {
        let mut output = Output::empty();
        let times = event_time_millis(&batch, self.event_time)?;
        let sub_millis = event_time_sub_millis_nanos(&batch, self.event_time)?;
        let rows = match &self.packer {
            Some(p) => {
                let columns: Vec<ArrayRef> = self
                    .group_columns
                    .iter()
                    .map(|&i| batch.column(i).clone())
                    .collect();
                Some(p.pack(&columns)?)
            }
            None => None,
        };
        // Each aggregate's input, as i64 or f64 bits.
        let inputs: Vec<Option<(Vec<i64>, Option<NullBuffer>)>> = self
            .aggs
            .iter()
            .map(|agg| {
                let Some(column) = agg.column else {
                    return Ok(None);
                };
                let array = batch.column(column);
                Ok(Some(match agg.num {
                    Num::Int if agg.func == Func::Count => {
                        (vec![0; batch.num_rows()], array.logical_nulls())
                    }
                    // A `UInt64` value past `i64::MAX` reads as null (skipped). (Through
                    // arrow's `cast`, before, it became 0 and was aggregated as 0.)
                    Num::Int => {
                        let ints = int64_column(&batch, column)?;
                        (ints.values().to_vec(), ints.logical_nulls())
                    }
                    Num::Float => {
                        let floats = float64_column(&batch, column)?;
                        let bits = floats.values().iter().map(|f| f.to_bits() as i64);
                        (bits.collect(), floats.logical_nulls())
                    }
                }))
            })
            .collect::<Result<_>>()?;
        // First each row's open windows, in row order (rejections keep that order); then the
        // rows window by window, so a window's groups are looked up once per run of rows, not
        // once per row. Within a window rows keep their order: `first`/`last` ties follow arrival.
        let mut placements: Vec<(i64, u32)> = Vec::with_capacity(batch.num_rows());
        for row in 0..batch.num_rows() {
            if times.is_null(row) {
                output.reject(row, "event time is null");
                continue;
            }
            let ts = times.value(row);
            let last_start = ts.div_euclid(self.slide) * self.slide;
            let mut start = last_start;
            let mut placed = false;
            while start + self.size > ts {
                if !self.closed(start) {
                    placed = true;
                    placements.push((start, row as u32));
                }
                start -= self.slide;
            }
            if !placed {
                let watermark = self.watermark.unwrap_or(i64::MIN);
                output.reject(
                    row,
                    format!(
                        "late: event time {} falls in windows already closed by the watermark {}",
                        format_millis(ts),
                        format_millis(watermark)
                    ),
                );
            }
        }
        // A stable sort: rows of one window stay in arrival order (and a stream already in
        // window order is one linear pass).
        placements.sort_by_key(|&(start, _)| start);
        let empty: &[u8] = &[];
        let width = self.aggs.len();
        let fresh = vec![Acc::default(); width];
        let mut slots: Vec<u32> = Vec::new();
        for run in placements.chunk_by(|a, b| a.0 == b.0) {
            let groups = self.windows.entry(run[0].0).or_default();
            slots.clear();
            slots.extend(run.iter().map(|&(_, row)| {
                groups.slot(rows.as_ref().map_or(empty, |r| r.row(row as usize)), &fresh)
            }));
            for (n, agg) in self.aggs.iter().enumerate() {
                let column = Column {
                    run,
                    slots: &slots,
                    width,
                    n,
                };
                let at = |row: usize| (times.value(row), sub_millis.as_ref().map_or(0, |s| s[row]));
                match &inputs[n] {
                    None => column.count_rows(&mut groups.chunks),
                    Some((bits, nulls)) => {
                        column.fold(&mut groups.chunks, agg, bits, nulls.as_ref(), at);
                    }
                }
            }
        }
        Ok(output)
    }

    fn on_watermark(&mut self, ts_ms: i64) -> Result<Output> {
        let watermark = self.watermark.map_or(ts_ms, |w| w.max(ts_ms));
        self.watermark = Some(watermark);
        // Windows with start + size <= watermark are complete.
        let open = self
            .windows
            .split_off(&(watermark.saturating_sub(self.size).saturating_add(1)));
        let closed = std::mem::replace(&mut self.windows, open);
        self.finish(closed)
    }

    fn snapshot(&self) -> Result<Vec<u8>> {
        let head = Head {
            definition: self.definition.clone(),
            key_types: self.group_types.iter().map(DataType::to_string).collect(),
            watermark: self.watermark,
            windows: self.windows.len() as u64,
        };
        let mut out = postcard::to_allocvec(&head)
            .map_err(|e| Error::internal(format!("encoding state: {e}")))?;
        let per_group = 4 + self.aggs.len() * ACC_BYTES;
        let size: usize = self
            .windows
            .values()
            .map(|g| 16 + g.len() * per_group + g.iter(0).map(|(k, _)| k.len()).sum::<usize>())
            .sum();
        // Room for the SDK's header too, so the state is framed in place.
        out.reserve_exact(size + flowgate_sdk::STATE_HEADER);
        let mut groups: Vec<(&[u8], &[Acc])> = Vec::new();
        let width = self.aggs.len();
        for (start, window) in &self.windows {
            out.extend_from_slice(&start.to_le_bytes());
            out.extend_from_slice(&(window.len() as u64).to_le_bytes());
            // In key order, so that equal states give equal bytes.
            groups.clear();
            groups.extend(window.iter(width));
            groups.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (key, accs) in &groups {
                let len = u32::try_from(key.len())
                    .map_err(|_| Error::internal("a group key is over 4 GiB"))?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(key);
                for acc in accs.iter() {
                    acc.put(&mut out);
                }
            }
        }
        Ok(out)
    }

    fn restore(&mut self, version: u32, state: &[u8]) -> Result<()> {
        let corrupt =
            |e: postcard::Error| Error::bad_input(format!("window state is corrupt: {e}"));
        let state = match version {
            4 => return self.restore_flat(state),
            3 => postcard::from_bytes::<State>(state).map_err(corrupt)?,
            // Written before the definition was recorded: read as this step's (the aggregates
            // are still checked against what the state holds).
            2 => {
                let old: StateV2 = postcard::from_bytes(state).map_err(corrupt)?;
                State {
                    definition: self.definition.clone(),
                    watermark: old.watermark,
                    windows: old.windows,
                }
            }
            _ => {
                let by = if version < Self::STATE_VERSION {
                    "an older"
                } else {
                    "a newer"
                };
                return Err(Error::bad_input(format!(
                    "window state version {version} was written by {by} plugin version; this one \
                     reads state versions 2 to 4 (add `state: reset` to start the step empty)"
                )));
            }
        };
        self.same_definition(&state.definition)?;
        self.set_state(state)
    }
}

impl Window {
    /// A state written for another definition is refused: its open windows would come out wrong.
    fn same_definition(&self, definition: &str) -> Result<()> {
        if definition == self.definition {
            return Ok(());
        }
        Err(Error::bad_input(format!(
            "window state was written for `{definition}`; this step is configured `{}`: its open windows cannot be carried over (add `state: reset` to start the step empty)",
            self.definition
        )))
    }

    /// Replaces the state with a version-4 snapshot's (see [`Head`]). Keys packed for the
    /// `group_by` types of this step are taken as they are; keys packed for other types (the
    /// input schema changed, say from µs to ms timestamps) go through their values, as a
    /// version-3 state's do, and are refused the same way if they do not fit.
    fn restore_flat(&mut self, state: &[u8]) -> Result<()> {
        let corrupt = |what: String| Error::bad_input(format!("window state is corrupt: {what}"));
        let (head, rest) =
            postcard::take_from_bytes::<Head>(state).map_err(|e| corrupt(e.to_string()))?;
        self.same_definition(&head.definition)?;
        let stored = head
            .key_types
            .iter()
            .map(|t| {
                t.parse::<DataType>()
                    .map_err(|e| corrupt(format!("key type `{t}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        if stored.len() != self.group_types.len() {
            return Err(corrupt(format!(
                "{} key types for {} `group_by` columns",
                stored.len(),
                self.group_types.len()
            )));
        }
        let convert = stored != self.group_types;
        let packer = match (convert, stored.is_empty()) {
            (_, true) => None,
            (false, false) => self.packer.clone(),
            (true, false) => {
                Some(KeyPacker::new(&stored).map_err(|e| corrupt(e.message().into()))?)
            }
        };
        let mut r = Reader { bytes: rest };
        let aggs = self.aggs.len();
        let mut restored: BTreeMap<i64, Groups> = BTreeMap::new();
        for _ in 0..head.windows {
            let start = i64::from_le_bytes(r.array()?);
            let count = u64::from_le_bytes(r.array()?);
            // Never more room than the bytes left could fill.
            let fits = r.bytes.len() / (4 + aggs * ACC_BYTES).max(1);
            let mut groups = Groups::default();
            groups.reserve(usize::try_from(count).unwrap_or(usize::MAX).min(fits), aggs);
            for _ in 0..count {
                let len = u32::from_le_bytes(r.array()?) as usize;
                let key = r.take(len)?;
                match &packer {
                    Some(packer) => packer.check(key).map_err(|e| {
                        corrupt(format!(
                            "a group key of window {}: {}",
                            format_millis(start),
                            e.message()
                        ))
                    })?,
                    None if !key.is_empty() => {
                        return Err(corrupt(format!(
                            "window {} has a group key, but this step has no `group_by`",
                            format_millis(start)
                        )));
                    }
                    None => {}
                }
                let accs = (0..aggs)
                    .map(|_| r.array::<ACC_BYTES>().map(|b| Acc::get(&b)))
                    .collect::<Result<Vec<_>>>()?;
                if !groups.insert(key, &accs) {
                    return Err(corrupt(format!(
                        "window {} holds a group twice",
                        format_millis(start)
                    )));
                }
            }
            if restored.insert(start, groups).is_some() {
                return Err(corrupt(format!(
                    "window {} is there twice",
                    format_millis(start)
                )));
            }
        }
        if !r.bytes.is_empty() {
            return Err(corrupt(format!(
                "{} bytes past its last window",
                r.bytes.len()
            )));
        }
        if let (true, Some(packer)) = (convert, &packer) {
            // Packed for other types: through the keys' values, as a version-3 state.
            let windows = restored
                .into_iter()
                .map(|(start, groups)| {
                    let groups = groups
                        .iter(aggs)
                        .map(|(key, accs)| Ok((packer.values(key)?, accs.to_vec())))
                        .collect::<Result<Vec<_>>>()?;
                    Ok((start, groups))
                })
                .collect::<Result<Vec<SavedWindow>>>()?;
            return self.set_state(State {
                definition: head.definition,
                watermark: head.watermark,
                windows,
            });
        }
        self.watermark = head.watermark;
        self.windows = restored;
        Ok(())
    }

    /// Replaces the state with a decoded snapshot.
    fn set_state(&mut self, state: State) -> Result<()> {
        let aggs = self.aggs.len();
        if state
            .windows
            .iter()
            .any(|(_, g)| g.iter().any(|(_, a)| a.len() != aggs))
        {
            return Err(Error::bad_input(format!(
                "window state was written for a different set of aggregates (expected {aggs})"
            )));
        }
        let mut windows: Vec<SavedWindow> = state.windows;
        let mut key_values: Vec<Vec<KeyValue>> = Vec::new();
        for (_, groups) in &mut windows {
            for (key, _) in groups.iter_mut() {
                key_values.push(std::mem::take(key));
            }
        }
        let columns = keys::decode_rows(&key_values, &self.group_types)
            .map_err(|e| Error::bad_input(format!("window state: {}", e.message())))?;
        let rows = match &self.packer {
            Some(packer) => Some(packer.pack(&columns)?),
            None => None,
        };
        let mut n = 0;
        let mut restored: BTreeMap<i64, Groups> = BTreeMap::new();
        for (start, groups) in windows {
            let window = restored.entry(start).or_default();
            for (_, accs) in groups {
                let key = rows.as_ref().map_or(&[][..], |r| r.row(n));
                n += 1;
                if !window.insert(key, &accs) {
                    return Err(Error::bad_input(format!(
                        "window state is corrupt: window {} holds a group twice",
                        format_millis(start)
                    )));
                }
            }
        }
        self.watermark = state.watermark;
        self.windows = restored;
        Ok(())
    }
}

export_transform!(Window);

/// Scripted runs shared with the host's WASM tests.
#[cfg(any(test, feature = "scenarios"))]
pub mod scenarios;

#[cfg(test)]
mod tests;

//! Group keys as typed scalar values, for snapshots.
//!
//! Plugins that group rows keep keys in memory in any form: [`KeyPacker`] packs key columns into
//! bytes that are cheap to hash and compare (and, unlike `arrow::row`, adds little to a plugin's
//! `.wasm`). Snapshots outlive a plugin build, so they store keys either as [`KeyValue`]s (one per
//! key column, in a layout Flowgate defines, serialised by the plugin, e.g. with postcard) or as
//! the packed bytes themselves, whose layout is pinned by a test (see [`KeyPacker`]; `window`
//! does, recording the key columns' types beside them). [`encode_rows`] turns key columns into
//! values, [`decode_rows`] turns values back into columns of the key types.
//!
//! Serialisers such as postcard write an enum's variant *index*: append new variants at the end,
//! never reorder or remove one. Plugins pin the layout with golden snapshot tests.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, ArrowPrimitiveType, AsArray, BooleanArray, LargeStringArray, PrimitiveArray,
    StringArray, StringViewArray,
};
use arrow::datatypes::{
    DataType, Date32Type, Date64Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type,
    Int64Type, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Unit of a [`KeyValue::Timestamp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyTimeUnit {
    /// Seconds.
    Second,
    /// Milliseconds.
    Millisecond,
    /// Microseconds.
    Microsecond,
    /// Nanoseconds.
    Nanosecond,
}

impl KeyTimeUnit {
    fn of(unit: TimeUnit) -> Self {
        match unit {
            TimeUnit::Second => KeyTimeUnit::Second,
            TimeUnit::Millisecond => KeyTimeUnit::Millisecond,
            TimeUnit::Microsecond => KeyTimeUnit::Microsecond,
            TimeUnit::Nanosecond => KeyTimeUnit::Nanosecond,
        }
    }

    /// Log10 of units per second.
    fn exponent(self) -> u32 {
        match self {
            KeyTimeUnit::Second => 0,
            KeyTimeUnit::Millisecond => 3,
            KeyTimeUnit::Microsecond => 6,
            KeyTimeUnit::Nanosecond => 9,
        }
    }
}

/// One key column's value in one row. Append new variants only (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum KeyValue {
    /// A null value, of any type.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer (`Int8`…`Int64`), or a date: `Date32` in days, `Date64` in ms.
    Int(i64),
    /// An unsigned integer (`UInt8`…`UInt64`).
    UInt(u64),
    /// A float (`Float32` or `Float64`), as the bits of the f64.
    Float(u64),
    /// A string (`Utf8`, `LargeUtf8` or `Utf8View`).
    Utf8(String),
    /// A timestamp: UTC epoch value in its unit (the time zone is the column's, not stored).
    Timestamp(i64, KeyTimeUnit),
}

/// Can a column of `data_type` be a key stored as [`KeyValue`]s?
pub fn is_key_type(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Boolean
            | DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64
            | DataType::Float32
            | DataType::Float64
            | DataType::Date32
            | DataType::Date64
            | DataType::Timestamp(_, _)
    )
}

fn values_of<T, F>(column: &dyn Array, f: F) -> Vec<KeyValue>
where
    T: ArrowPrimitiveType,
    F: Fn(T::Native) -> KeyValue,
{
    column
        .as_primitive::<T>()
        .iter()
        .map(|v| v.map_or(KeyValue::Null, &f))
        .collect()
}

/// One column's values, row by row.
fn encode_column(column: &dyn Array) -> Result<Vec<KeyValue>> {
    let text = |v: Option<&str>| v.map_or(KeyValue::Null, |s| KeyValue::Utf8(s.to_string()));
    Ok(match column.data_type() {
        DataType::Utf8 => column.as_string::<i32>().iter().map(text).collect(),
        DataType::LargeUtf8 => column.as_string::<i64>().iter().map(text).collect(),
        DataType::Utf8View => column.as_string_view().iter().map(text).collect(),
        DataType::Boolean => column
            .as_boolean()
            .iter()
            .map(|v| v.map_or(KeyValue::Null, KeyValue::Bool))
            .collect(),
        DataType::Int8 => values_of::<Int8Type, _>(column, |v| KeyValue::Int(v.into())),
        DataType::Int16 => values_of::<Int16Type, _>(column, |v| KeyValue::Int(v.into())),
        DataType::Int32 => values_of::<Int32Type, _>(column, |v| KeyValue::Int(v.into())),
        DataType::Int64 => values_of::<Int64Type, _>(column, KeyValue::Int),
        DataType::Date32 => values_of::<Date32Type, _>(column, |v| KeyValue::Int(v.into())),
        DataType::Date64 => values_of::<Date64Type, _>(column, KeyValue::Int),
        DataType::UInt8 => values_of::<UInt8Type, _>(column, |v| KeyValue::UInt(v.into())),
        DataType::UInt16 => values_of::<UInt16Type, _>(column, |v| KeyValue::UInt(v.into())),
        DataType::UInt32 => values_of::<UInt32Type, _>(column, |v| KeyValue::UInt(v.into())),
        DataType::UInt64 => values_of::<UInt64Type, _>(column, KeyValue::UInt),
        DataType::Float32 => {
            values_of::<Float32Type, _>(column, |v| KeyValue::Float(f64::from(v).to_bits()))
        }
        DataType::Float64 => values_of::<Float64Type, _>(column, |v| KeyValue::Float(v.to_bits())),
        DataType::Timestamp(unit, _) => {
            let unit = KeyTimeUnit::of(*unit);
            let ts = |v: i64| KeyValue::Timestamp(v, unit);
            match unit {
                KeyTimeUnit::Second => values_of::<TimestampSecondType, _>(column, ts),
                KeyTimeUnit::Millisecond => values_of::<TimestampMillisecondType, _>(column, ts),
                KeyTimeUnit::Microsecond => values_of::<TimestampMicrosecondType, _>(column, ts),
                KeyTimeUnit::Nanosecond => values_of::<TimestampNanosecondType, _>(column, ts),
            }
        }
        other => {
            return Err(Error::internal(format!(
                "{other} columns cannot be stored as keys"
            )));
        }
    })
}

/// The first `num_rows` rows of key `columns`, each as one [`KeyValue`] per column.
pub fn encode_rows(columns: &[ArrayRef], num_rows: usize) -> Result<Vec<Vec<KeyValue>>> {
    let mut rows: Vec<Vec<KeyValue>> = (0..num_rows)
        .map(|_| Vec::with_capacity(columns.len()))
        .collect();
    for column in columns {
        if column.len() < num_rows {
            return Err(Error::internal(format!(
                "key column has {} rows, expected {num_rows}",
                column.len()
            )));
        }
        for (row, value) in rows.iter_mut().zip(encode_column(column.as_ref())?) {
            row.push(value);
        }
    }
    Ok(rows)
}

fn mismatch(index: usize, data_type: &DataType, value: &KeyValue) -> Error {
    Error::bad_input(format!(
        "state holds {value:?} for key column {index}, which is {data_type}"
    ))
}

/// Builds a primitive column from each row's value, read by `f` (`None` for a null).
fn primitive<T: ArrowPrimitiveType>(
    rows: &[Vec<KeyValue>],
    index: usize,
    data_type: &DataType,
    f: impl Fn(&KeyValue) -> Option<T::Native>,
) -> Result<PrimitiveArray<T>> {
    rows.iter()
        .map(|row| match &row[index] {
            KeyValue::Null => Ok(None),
            v => f(v).map(Some).ok_or_else(|| mismatch(index, data_type, v)),
        })
        .collect()
}

fn int<N: TryFrom<i64>>(v: &KeyValue) -> Option<N> {
    match v {
        KeyValue::Int(i) => N::try_from(*i).ok(),
        _ => None,
    }
}

fn uint<N: TryFrom<u64>>(v: &KeyValue) -> Option<N> {
    match v {
        KeyValue::UInt(i) => N::try_from(*i).ok(),
        _ => None,
    }
}

/// A timestamp value in `unit`; converting to a coarser unit must be exact.
fn timestamp_in(v: &KeyValue, unit: KeyTimeUnit) -> Option<i64> {
    let KeyValue::Timestamp(value, from) = v else {
        return None;
    };
    let (to_exp, from_exp) = (unit.exponent(), from.exponent());
    if to_exp >= from_exp {
        value.checked_mul(10i64.pow(to_exp - from_exp))
    } else {
        let factor = 10i64.pow(from_exp - to_exp);
        (value % factor == 0).then(|| value / factor)
    }
}

/// Builds one column of `data_type` from value `index` of every row.
fn decode_column(rows: &[Vec<KeyValue>], index: usize, data_type: &DataType) -> Result<ArrayRef> {
    let text = || -> Result<Vec<Option<&str>>> {
        rows.iter()
            .map(|row| match &row[index] {
                KeyValue::Null => Ok(None),
                KeyValue::Utf8(s) => Ok(Some(s.as_str())),
                v => Err(mismatch(index, data_type, v)),
            })
            .collect()
    };
    let dt = data_type;
    Ok(match data_type {
        DataType::Utf8 => Arc::new(StringArray::from(text()?)),
        DataType::LargeUtf8 => Arc::new(LargeStringArray::from(text()?)),
        DataType::Utf8View => Arc::new(StringViewArray::from(text()?)),
        DataType::Boolean => Arc::new(
            rows.iter()
                .map(|row| match &row[index] {
                    KeyValue::Null => Ok(None),
                    KeyValue::Bool(b) => Ok(Some(*b)),
                    v => Err(mismatch(index, dt, v)),
                })
                .collect::<Result<BooleanArray>>()?,
        ),
        DataType::Int8 => Arc::new(primitive::<Int8Type>(rows, index, dt, int)?),
        DataType::Int16 => Arc::new(primitive::<Int16Type>(rows, index, dt, int)?),
        DataType::Int32 => Arc::new(primitive::<Int32Type>(rows, index, dt, int)?),
        DataType::Int64 => Arc::new(primitive::<Int64Type>(rows, index, dt, int)?),
        DataType::Date32 => Arc::new(primitive::<Date32Type>(rows, index, dt, int)?),
        DataType::Date64 => Arc::new(primitive::<Date64Type>(rows, index, dt, int)?),
        DataType::UInt8 => Arc::new(primitive::<UInt8Type>(rows, index, dt, uint)?),
        DataType::UInt16 => Arc::new(primitive::<UInt16Type>(rows, index, dt, uint)?),
        DataType::UInt32 => Arc::new(primitive::<UInt32Type>(rows, index, dt, uint)?),
        DataType::UInt64 => Arc::new(primitive::<UInt64Type>(rows, index, dt, uint)?),
        DataType::Float32 => Arc::new(primitive::<Float32Type>(rows, index, dt, |v| match v {
            // Stored from an f32, so the narrowing is exact.
            KeyValue::Float(bits) => Some(f64::from_bits(*bits) as f32),
            _ => None,
        })?),
        DataType::Float64 => Arc::new(primitive::<Float64Type>(rows, index, dt, |v| match v {
            KeyValue::Float(bits) => Some(f64::from_bits(*bits)),
            _ => None,
        })?),
        DataType::Timestamp(unit, tz) => {
            let to = KeyTimeUnit::of(*unit);
            let read = |v: &KeyValue| timestamp_in(v, to);
            match unit {
                TimeUnit::Second => Arc::new(
                    primitive::<TimestampSecondType>(rows, index, dt, read)?
                        .with_timezone_opt(tz.clone()),
                ),
                TimeUnit::Millisecond => Arc::new(
                    primitive::<TimestampMillisecondType>(rows, index, dt, read)?
                        .with_timezone_opt(tz.clone()),
                ),
                TimeUnit::Microsecond => Arc::new(
                    primitive::<TimestampMicrosecondType>(rows, index, dt, read)?
                        .with_timezone_opt(tz.clone()),
                ),
                TimeUnit::Nanosecond => Arc::new(
                    primitive::<TimestampNanosecondType>(rows, index, dt, read)?
                        .with_timezone_opt(tz.clone()),
                ),
            }
        }
        other => {
            return Err(Error::internal(format!(
                "{other} columns cannot be restored as keys"
            )));
        }
    })
}

/// Key columns of `types` from `rows` (as [`encode_rows`] gave them). A timestamp is converted to
/// its column's unit (to a coarser one only if exact); a value that does not fit its column's type
/// is a [`Error::BadInput`].
pub fn decode_rows(rows: &[Vec<KeyValue>], types: &[DataType]) -> Result<Vec<ArrayRef>> {
    if let Some(row) = rows.iter().find(|r| r.len() != types.len()) {
        return Err(Error::bad_input(format!(
            "state holds a key of {} values, but the step has {} key columns",
            row.len(),
            types.len()
        )));
    }
    (0..types.len())
        .map(|i| decode_column(rows, i, &types[i]))
        .collect()
}

/// Group keys packed into bytes, for use in memory (hash maps, sorting) in place of
/// `arrow::row`, whose code is a large part of a plugin's `.wasm`.
///
/// A packed key holds, per key column, a tag byte (0 null, 1 a value) and then the value: its
/// native bytes (booleans one byte, floats their bits), or for strings a 4-byte length and the
/// UTF-8 bytes. Equal keys pack to equal bytes (floats by bits: `-0.0` and `0.0` differ, as do
/// NaNs of different bits), and no key's bytes are a prefix of another's. [`KeyPacker::cmp`]
/// orders packed keys as `arrow::row` orders rows (column by column, nulls first, floats by their
/// total order).
///
/// The bytes are a stored format: `window`'s snapshots (state version 4) hold them as they are,
/// so a change to the layout needs a new state version there (the test
/// `packed_bytes_are_a_stored_format` pins them). Values are in native byte order, which is
/// little-endian in WebAssembly, where stored states are written; [`KeyPacker::check`] tells
/// whether bytes read back are a well-formed key.
#[derive(Debug, Clone)]
pub struct KeyPacker {
    types: Vec<DataType>,
}

/// One batch's keys, packed by [`KeyPacker::pack`].
#[derive(Debug, Clone, Default)]
pub struct PackedKeys {
    data: Vec<u8>,
    /// Row `i` is `data[ends[i - 1]..ends[i]]` (from 0 for the first).
    ends: Vec<usize>,
}

impl PackedKeys {
    /// Row `i`'s key.
    pub fn row(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.data[start..self.ends[i]]
    }

    /// How many rows.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// Bytes of a value of `data_type` after its tag (`None`: a string, 4 bytes of length first).
fn packed_width(data_type: &DataType) -> Option<usize> {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => None,
        DataType::Boolean | DataType::Int8 | DataType::UInt8 => Some(1),
        DataType::Int16 | DataType::UInt16 => Some(2),
        DataType::Int32 | DataType::UInt32 | DataType::Float32 | DataType::Date32 => Some(4),
        _ => Some(8),
    }
}

/// Appends each valid value's bytes of a primitive column at `cursor[row]`.
fn pack_primitive<T: ArrowPrimitiveType>(column: &dyn Array, data: &mut [u8], cursor: &mut [usize])
where
    T::Native: arrow::datatypes::ToByteSlice,
{
    use arrow::datatypes::ToByteSlice;
    let column = column.as_primitive::<T>();
    for (row, at) in cursor.iter_mut().enumerate() {
        if column.is_valid(row) {
            let bytes = column.values()[row].to_byte_slice();
            data[*at] = 1;
            data[*at + 1..*at + 1 + bytes.len()].copy_from_slice(bytes);
            *at += 1 + bytes.len();
        } else {
            data[*at] = 0;
            *at += 1;
        }
    }
}

/// Appends each string's length and bytes at `cursor[row]`.
fn pack_text<'a>(
    values: impl Iterator<Item = Option<&'a str>>,
    data: &mut [u8],
    cursor: &mut [usize],
) {
    for (at, value) in cursor.iter_mut().zip(values) {
        match value {
            Some(s) => {
                data[*at] = 1;
                data[*at + 1..*at + 5].copy_from_slice(&(s.len() as u32).to_le_bytes());
                data[*at + 5..*at + 5 + s.len()].copy_from_slice(s.as_bytes());
                *at += 5 + s.len();
            }
            None => {
                data[*at] = 0;
                *at += 1;
            }
        }
    }
}

/// The next `N` bytes of `key` at `at`, moving `at` past them.
fn take<const N: usize>(key: &[u8], at: &mut usize) -> Result<[u8; N]> {
    let bytes = key
        .get(*at..*at + N)
        .and_then(|b| <[u8; N]>::try_from(b).ok())
        .ok_or_else(|| Error::internal("a packed key ends early"))?;
    *at += N;
    Ok(bytes)
}

/// One value of a packed key, borrowed from it.
#[derive(Debug, PartialEq)]
enum Packed<'k> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    /// Kept as f32: widening would quiet a signalling NaN and merge it with a quiet one.
    Float32(f32),
    Text(&'k str),
    Time(i64, KeyTimeUnit),
}

/// The value of type `data_type` at `at` in a packed key, moving `at` past it.
fn read<'k>(data_type: &DataType, key: &'k [u8], at: &mut usize) -> Result<Packed<'k>> {
    match take::<1>(key, at)? {
        [0] => return Ok(Packed::Null),
        [1] => {}
        [tag] => {
            return Err(Error::internal(format!(
                "a packed key has a tag {tag} (0 is null, 1 a value)"
            )));
        }
    }
    Ok(match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let len = u32::from_le_bytes(take::<4>(key, at)?) as usize;
            let bytes = key
                .get(*at..*at + len)
                .ok_or_else(|| Error::internal("a packed key ends early"))?;
            *at += len;
            Packed::Text(
                std::str::from_utf8(bytes)
                    .map_err(|e| Error::internal(format!("a packed key is not UTF-8: {e}")))?,
            )
        }
        DataType::Boolean => match take::<1>(key, at)? {
            [0] => Packed::Bool(false),
            [1] => Packed::Bool(true),
            [other] => {
                return Err(Error::internal(format!(
                    "a packed key has a boolean byte {other} (0 or 1)"
                )));
            }
        },
        DataType::Int8 => Packed::Int(i8::from_ne_bytes(take(key, at)?).into()),
        DataType::Int16 => Packed::Int(i16::from_ne_bytes(take(key, at)?).into()),
        DataType::Int32 | DataType::Date32 => {
            Packed::Int(i32::from_ne_bytes(take(key, at)?).into())
        }
        DataType::Int64 | DataType::Date64 => Packed::Int(i64::from_ne_bytes(take(key, at)?)),
        DataType::UInt8 => Packed::UInt(u8::from_ne_bytes(take(key, at)?).into()),
        DataType::UInt16 => Packed::UInt(u16::from_ne_bytes(take(key, at)?).into()),
        DataType::UInt32 => Packed::UInt(u32::from_ne_bytes(take(key, at)?).into()),
        DataType::UInt64 => Packed::UInt(u64::from_ne_bytes(take(key, at)?)),
        DataType::Float32 => Packed::Float32(f32::from_ne_bytes(take(key, at)?)),
        DataType::Float64 => Packed::Float(f64::from_ne_bytes(take(key, at)?)),
        DataType::Timestamp(unit, _) => {
            Packed::Time(i64::from_ne_bytes(take(key, at)?), KeyTimeUnit::of(*unit))
        }
        other => {
            return Err(Error::internal(format!("{other} columns cannot be keys")));
        }
    })
}

impl Packed<'_> {
    fn value(self) -> KeyValue {
        match self {
            Packed::Null => KeyValue::Null,
            Packed::Bool(b) => KeyValue::Bool(b),
            Packed::Int(i) => KeyValue::Int(i),
            Packed::UInt(u) => KeyValue::UInt(u),
            Packed::Float(f) => KeyValue::Float(f.to_bits()),
            Packed::Float32(f) => KeyValue::Float(f64::from(f).to_bits()),
            Packed::Text(s) => KeyValue::Utf8(s.to_string()),
            Packed::Time(t, unit) => KeyValue::Timestamp(t, unit),
        }
    }
}

impl KeyPacker {
    /// A packer for key columns of `types`: at least one, each passing [`is_key_type`] (with no
    /// key columns there is nothing to pack: every row has the empty key).
    pub fn new(types: &[DataType]) -> Result<Self> {
        if types.is_empty() {
            return Err(Error::internal(
                "a key packer needs at least one key column",
            ));
        }
        if let Some(t) = types.iter().find(|t| !is_key_type(t)) {
            return Err(Error::internal(format!("{t} columns cannot be keys")));
        }
        Ok(KeyPacker {
            types: types.to_vec(),
        })
    }

    /// Each row's key, from `columns` (one per key type, of equal length).
    pub fn pack(&self, columns: &[ArrayRef]) -> Result<PackedKeys> {
        if columns.len() != self.types.len() {
            return Err(Error::internal(format!(
                "{} key columns given, {} expected",
                columns.len(),
                self.types.len()
            )));
        }
        let rows = columns.first().map_or(0, |c| c.len());
        // Each row's length first, then each column's values written at each row's cursor.
        let mut ends = vec![0usize; rows];
        for (column, data_type) in columns.iter().zip(&self.types) {
            if column.len() != rows || column.data_type() != data_type {
                return Err(Error::internal(format!(
                    "key column of {} rows of {} given, {rows} of {data_type} expected",
                    column.len(),
                    column.data_type()
                )));
            }
            match packed_width(data_type) {
                Some(width) => {
                    for (row, end) in ends.iter_mut().enumerate() {
                        *end += if column.is_valid(row) { 1 + width } else { 1 };
                    }
                }
                None => {
                    let lengths: Vec<Option<usize>> = match data_type {
                        DataType::Utf8 => column
                            .as_string::<i32>()
                            .iter()
                            .map(|v| v.map(str::len))
                            .collect(),
                        DataType::LargeUtf8 => column
                            .as_string::<i64>()
                            .iter()
                            .map(|v| v.map(str::len))
                            .collect(),
                        _ => column
                            .as_string_view()
                            .iter()
                            .map(|v| v.map(str::len))
                            .collect(),
                    };
                    for (end, len) in ends.iter_mut().zip(lengths) {
                        *end += len.map_or(1, |n| 5 + n);
                    }
                }
            }
        }
        let mut cursor = Vec::with_capacity(rows);
        let mut total = 0;
        for end in &mut ends {
            cursor.push(total);
            total += *end;
            *end = total;
        }
        let mut data = vec![0u8; total];
        for (column, data_type) in columns.iter().zip(&self.types) {
            let column = column.as_ref();
            let (data, cursor) = (&mut data[..], &mut cursor[..]);
            match data_type {
                DataType::Utf8 => pack_text(column.as_string::<i32>().iter(), data, cursor),
                DataType::LargeUtf8 => pack_text(column.as_string::<i64>().iter(), data, cursor),
                DataType::Utf8View => pack_text(column.as_string_view().iter(), data, cursor),
                DataType::Boolean => {
                    let column = column.as_boolean();
                    for (row, at) in cursor.iter_mut().enumerate() {
                        if column.is_valid(row) {
                            data[*at] = 1;
                            data[*at + 1] = u8::from(column.value(row));
                            *at += 2;
                        } else {
                            data[*at] = 0;
                            *at += 1;
                        }
                    }
                }
                DataType::Int8 => pack_primitive::<Int8Type>(column, data, cursor),
                DataType::Int16 => pack_primitive::<Int16Type>(column, data, cursor),
                DataType::Int32 => pack_primitive::<Int32Type>(column, data, cursor),
                DataType::Int64 => pack_primitive::<Int64Type>(column, data, cursor),
                DataType::Date32 => pack_primitive::<Date32Type>(column, data, cursor),
                DataType::Date64 => pack_primitive::<Date64Type>(column, data, cursor),
                DataType::UInt8 => pack_primitive::<UInt8Type>(column, data, cursor),
                DataType::UInt16 => pack_primitive::<UInt16Type>(column, data, cursor),
                DataType::UInt32 => pack_primitive::<UInt32Type>(column, data, cursor),
                DataType::UInt64 => pack_primitive::<UInt64Type>(column, data, cursor),
                DataType::Float32 => pack_primitive::<Float32Type>(column, data, cursor),
                DataType::Float64 => pack_primitive::<Float64Type>(column, data, cursor),
                DataType::Timestamp(TimeUnit::Second, _) => {
                    pack_primitive::<TimestampSecondType>(column, data, cursor)
                }
                DataType::Timestamp(TimeUnit::Millisecond, _) => {
                    pack_primitive::<TimestampMillisecondType>(column, data, cursor)
                }
                DataType::Timestamp(TimeUnit::Microsecond, _) => {
                    pack_primitive::<TimestampMicrosecondType>(column, data, cursor)
                }
                DataType::Timestamp(TimeUnit::Nanosecond, _) => {
                    pack_primitive::<TimestampNanosecondType>(column, data, cursor)
                }
                other => {
                    return Err(Error::internal(format!("{other} columns cannot be keys")));
                }
            }
        }
        Ok(PackedKeys { data, ends })
    }

    /// A packed key's values, one per key column.
    pub fn values(&self, key: &[u8]) -> Result<Vec<KeyValue>> {
        let mut at = 0;
        let values = self
            .types
            .iter()
            .map(|t| read(t, key, &mut at).map(Packed::value))
            .collect::<Result<Vec<_>>>()?;
        if at != key.len() {
            return Err(Error::internal(
                "a packed key has bytes past its last column",
            ));
        }
        Ok(values)
    }

    /// Whether `key` is a well-formed packed key of this packer's columns (bytes read back from
    /// a stored state): each column's tag and value in turn, and nothing after the last.
    pub fn check(&self, key: &[u8]) -> Result<()> {
        let mut at = 0;
        for data_type in &self.types {
            read(data_type, key, &mut at)?;
        }
        if at != key.len() {
            return Err(Error::internal(
                "a packed key has bytes past its last column",
            ));
        }
        Ok(())
    }

    /// The key columns of `keys`, in order.
    pub fn unpack<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<ArrayRef>> {
        let rows = keys
            .into_iter()
            .map(|k| self.values(k))
            .collect::<Result<Vec<_>>>()?;
        decode_rows(&rows, &self.types)
    }

    /// Orders two packed keys as `arrow::row` orders their rows: column by column, null first,
    /// then by value (strings by their bytes, floats by [`f64::total_cmp`]).
    pub fn cmp(&self, a: &[u8], b: &[u8]) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        let (mut i, mut j) = (0, 0);
        for data_type in &self.types {
            let (x, y) = match (read(data_type, a, &mut i), read(data_type, b, &mut j)) {
                (Ok(x), Ok(y)) => (x, y),
                // Not keys this packer made: fall back to the bytes.
                _ => return a.cmp(b),
            };
            let order = match (x, y) {
                (Packed::Null, Packed::Null) => Ordering::Equal,
                (Packed::Null, _) => Ordering::Less,
                (_, Packed::Null) => Ordering::Greater,
                (Packed::Bool(x), Packed::Bool(y)) => x.cmp(&y),
                (Packed::Int(x), Packed::Int(y)) => x.cmp(&y),
                (Packed::UInt(x), Packed::UInt(y)) => x.cmp(&y),
                (Packed::Float(x), Packed::Float(y)) => x.total_cmp(&y),
                (Packed::Float32(x), Packed::Float32(y)) => x.total_cmp(&y),
                (Packed::Text(x), Packed::Text(y)) => x.as_bytes().cmp(y.as_bytes()),
                (Packed::Time(x, _), Packed::Time(y, _)) => x.cmp(&y),
                _ => Ordering::Equal,
            };
            if order != Ordering::Equal {
                return order;
            }
        }
        Ordering::Equal
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        Date32Array, Float32Array, Float64Array, Int8Array, Int64Array, TimestampMicrosecondArray,
        TimestampMillisecondArray, UInt64Array,
    };

    #[test]
    fn every_key_type_round_trips() {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![Some("A"), None, Some("")])),
            Arc::new(LargeStringArray::from(vec![Some("x"), Some("y"), None])),
            Arc::new(StringViewArray::from(vec![
                None,
                Some("a long string value"),
                Some("v"),
            ])),
            Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)])),
            Arc::new(Int8Array::from(vec![Some(-128), Some(127), None])),
            Arc::new(Int64Array::from(vec![Some(i64::MIN), None, Some(i64::MAX)])),
            Arc::new(UInt64Array::from(vec![Some(u64::MAX), Some(0), None])),
            Arc::new(Float32Array::from(vec![Some(1.5), Some(f32::NAN), None])),
            Arc::new(Float64Array::from(vec![
                Some(-0.0),
                None,
                Some(f64::INFINITY),
            ])),
            Arc::new(Date32Array::from(vec![Some(20_000), None, Some(-1)])),
            Arc::new(
                TimestampMicrosecondArray::from(vec![Some(1_762_958_310_294_001), None, Some(-1)])
                    .with_timezone("UTC"),
            ),
            Arc::new(TimestampMillisecondArray::from(vec![
                Some(1),
                Some(2),
                None,
            ])),
        ];
        let types: Vec<DataType> = columns.iter().map(|c| c.data_type().clone()).collect();
        assert!(types.iter().all(is_key_type));
        let rows = encode_rows(&columns, 3).expect("encode");
        assert_eq!(rows[0][0], KeyValue::Utf8("A".into()));
        assert_eq!(rows[1][0], KeyValue::Null);
        assert_eq!(
            rows[0][10],
            KeyValue::Timestamp(1_762_958_310_294_001, KeyTimeUnit::Microsecond)
        );
        let back = decode_rows(&rows, &types).expect("decode");
        for (got, want) in back.iter().zip(&columns) {
            if want.data_type() == &DataType::Float32 {
                // NaN != NaN: compare bits.
                let bits = |a: &ArrayRef| -> Vec<Option<u32>> {
                    a.as_primitive::<Float32Type>()
                        .iter()
                        .map(|v| v.map(f32::to_bits))
                        .collect()
                };
                assert_eq!(bits(got), bits(want));
            } else if want.data_type() == &DataType::Float64 {
                let bits = |a: &ArrayRef| -> Vec<Option<u64>> {
                    a.as_primitive::<Float64Type>()
                        .iter()
                        .map(|v| v.map(f64::to_bits))
                        .collect()
                };
                assert_eq!(bits(got), bits(want));
            } else {
                assert_eq!(got.as_ref(), want.as_ref(), "{}", want.data_type());
            }
        }
    }

    #[test]
    fn timestamps_convert_to_the_column_unit_and_mismatches_are_errors() {
        let utc_us = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let utc_ms = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
        let rows = vec![vec![KeyValue::Timestamp(1_500, KeyTimeUnit::Millisecond)]];
        let us = decode_rows(&rows, std::slice::from_ref(&utc_us)).expect("ms to us");
        assert_eq!(us[0].data_type(), &utc_us);
        assert_eq!(
            us[0].as_primitive::<TimestampMicrosecondType>().value(0),
            1_500_000
        );
        let exact = vec![vec![KeyValue::Timestamp(2_000, KeyTimeUnit::Microsecond)]];
        let ms = decode_rows(&exact, std::slice::from_ref(&utc_ms)).expect("exact us to ms");
        assert_eq!(ms[0].as_primitive::<TimestampMillisecondType>().value(0), 2);
        let inexact = vec![vec![KeyValue::Timestamp(2_001, KeyTimeUnit::Microsecond)]];
        assert!(matches!(
            decode_rows(&inexact, std::slice::from_ref(&utc_ms)),
            Err(Error::BadInput(_))
        ));
        let text = vec![vec![KeyValue::Utf8("A".into())]];
        let err = decode_rows(&text, &[DataType::Int64]).expect_err("type mismatch");
        assert!(err.message().contains("Int64"), "{err}");
        let big = vec![vec![KeyValue::Int(300)]];
        assert!(decode_rows(&big, &[DataType::Int8]).is_err());
        assert!(decode_rows(&big, &[DataType::Int64, DataType::Utf8]).is_err());
        assert_eq!(
            decode_rows(&[], &[DataType::Utf8]).expect("no rows")[0].len(),
            0
        );
    }

    /// Key columns of every type, nulls and look-alikes among them (`-0.0`/`0.0`, `""`/null,
    /// strings that are prefixes of others).
    fn mixed() -> Vec<ArrayRef> {
        vec![
            Arc::new(StringArray::from(vec![
                Some("b"),
                Some("a"),
                None,
                Some(""),
                Some("ab"),
                Some("a"),
                Some("b"),
                None,
            ])),
            Arc::new(Int64Array::from(vec![
                Some(1),
                Some(-1),
                Some(0),
                None,
                Some(i64::MIN),
                Some(-1),
                Some(1),
                Some(0),
            ])),
            Arc::new(Float64Array::from(vec![
                Some(0.0),
                Some(-0.0),
                Some(f64::NAN),
                Some(-1.5),
                None,
                Some(-0.0),
                Some(0.0),
                Some(f64::NEG_INFINITY),
            ])),
            Arc::new(BooleanArray::from(vec![
                Some(true),
                None,
                Some(false),
                Some(true),
                Some(false),
                None,
                Some(true),
                None,
            ])),
            Arc::new(UInt64Array::from(vec![
                Some(u64::MAX),
                Some(0),
                None,
                Some(7),
                Some(7),
                Some(0),
                Some(u64::MAX),
                None,
            ])),
            Arc::new(Int8Array::from(vec![
                Some(-128),
                Some(3),
                None,
                Some(127),
                Some(0),
                Some(3),
                Some(-128),
                Some(1),
            ])),
            Arc::new(Float32Array::from(vec![
                Some(1.5),
                Some(-2.0),
                None,
                Some(f32::INFINITY),
                Some(0.0),
                Some(-2.0),
                Some(1.5),
                Some(-0.0),
            ])),
            Arc::new(Date32Array::from(vec![
                Some(1),
                Some(-1),
                None,
                Some(0),
                Some(5),
                Some(-1),
                Some(1),
                Some(2),
            ])),
            Arc::new(
                TimestampMicrosecondArray::from(vec![
                    Some(10),
                    Some(-10),
                    None,
                    Some(0),
                    Some(1),
                    Some(-10),
                    Some(10),
                    Some(3),
                ])
                .with_timezone("UTC"),
            ),
            Arc::new(LargeStringArray::from(vec![
                Some("x"),
                Some("x"),
                None,
                Some("xy"),
                Some(""),
                Some("x"),
                Some("x"),
                Some("z"),
            ])),
            Arc::new(StringViewArray::from(vec![
                Some("a long string value, past the view's inline twelve bytes"),
                Some("v"),
                None,
                Some(""),
                Some("v"),
                Some("v"),
                Some("a long string value, past the view's inline twelve bytes"),
                Some("w"),
            ])),
        ]
    }

    #[test]
    fn packed_keys_order_and_compare_as_arrow_row_does() {
        use arrow::row::{RowConverter, SortField};
        let columns = mixed();
        // Every prefix of the columns, and each column alone.
        let mut sets: Vec<Vec<ArrayRef>> =
            (1..=columns.len()).map(|n| columns[..n].to_vec()).collect();
        sets.extend(columns.iter().map(|c| vec![c.clone()]));
        for set in sets {
            let types: Vec<DataType> = set.iter().map(|c| c.data_type().clone()).collect();
            let packer = KeyPacker::new(&types).expect("packer");
            let packed = packer.pack(&set).expect("pack");
            let converter =
                RowConverter::new(types.iter().map(|t| SortField::new(t.clone())).collect())
                    .expect("converter");
            let rows = converter.convert_columns(&set).expect("rows");
            assert_eq!(packed.len(), rows.num_rows());
            for i in 0..rows.num_rows() {
                for j in 0..rows.num_rows() {
                    assert_eq!(
                        packer.cmp(packed.row(i), packed.row(j)),
                        rows.row(i).cmp(&rows.row(j)),
                        "rows {i} and {j} of {types:?}"
                    );
                    assert_eq!(
                        packed.row(i) == packed.row(j),
                        rows.row(i) == rows.row(j),
                        "equality of rows {i} and {j} of {types:?}"
                    );
                }
            }
            // Back to values and columns: the same as encoding the columns directly.
            let values: Vec<Vec<KeyValue>> = (0..packed.len())
                .map(|i| packer.values(packed.row(i)).expect("values"))
                .collect();
            let direct = encode_rows(&set, packed.len()).expect("encode");
            assert_eq!(format!("{values:?}"), format!("{direct:?}"), "{types:?}");
            let back = packer
                .unpack((0..packed.len()).map(|i| packed.row(i)))
                .expect("unpack");
            let again = packer.pack(&back).expect("pack again");
            assert_eq!(again.data, packed.data, "{types:?}");
        }
    }

    #[test]
    fn a_packer_refuses_what_it_cannot_key() {
        assert!(KeyPacker::new(&[DataType::Binary]).is_err());
        let packer = KeyPacker::new(&[DataType::Int64]).expect("packer");
        let wrong: Vec<ArrayRef> = vec![Arc::new(StringArray::from(vec!["a"]))];
        assert!(packer.pack(&wrong).is_err());
        assert!(packer.values(&[1, 2]).is_err(), "a key cut short");
        assert!(
            packer.values(&[0, 0]).is_err(),
            "bytes past the last column"
        );
        assert!(KeyPacker::new(&[]).is_err(), "no key columns");
        // Float32 NaNs of different bits are different keys, ordered by f32's total order
        // (widened to f64 a signalling NaN would be quieted and equal a quiet one).
        let packer = KeyPacker::new(&[DataType::Float32]).expect("packer");
        let nans: Vec<ArrayRef> = vec![Arc::new(Float32Array::from(vec![
            f32::from_bits(0x7fc0_0001),
            f32::from_bits(0x7f80_0001),
        ]))];
        let packed = packer.pack(&nans).expect("pack");
        assert_ne!(packed.row(0), packed.row(1));
        assert_eq!(
            packer.cmp(packed.row(0), packed.row(1)),
            std::cmp::Ordering::Greater
        );
    }

    /// `window` stores packed keys in its snapshots: the layout may not change under it.
    #[test]
    fn packed_bytes_are_a_stored_format() {
        use arrow::array::{Int32Array, UInt16Array};
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![Some("AB"), None])),
            Arc::new(BooleanArray::from(vec![Some(true), Some(false)])),
            Arc::new(Int32Array::from(vec![Some(-2), None])),
            Arc::new(Int64Array::from(vec![Some(7), Some(-1)])),
            Arc::new(UInt16Array::from(vec![Some(258), Some(0)])),
            Arc::new(Float64Array::from(vec![Some(1.5), Some(-0.0)])),
            Arc::new(
                TimestampMicrosecondArray::from(vec![Some(1_762_958_310_294_001), None])
                    .with_timezone("UTC"),
            ),
        ];
        let types: Vec<DataType> = columns.iter().map(|c| c.data_type().clone()).collect();
        let packer = KeyPacker::new(&types).expect("packer");
        let packed = packer.pack(&columns).expect("pack");
        let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(
            [hex(packed.row(0)), hex(packed.row(1))],
            [
                "01020000004142010101feffffff010700000000000000010201\
                 01000000000000f83f01f1c1d6b766430600",
                "0001000001ffffffffffffffff01000001000000000000008000",
            ],
            "the packed layout changed: `window` stores it (state version 4)"
        );
        for i in 0..packed.len() {
            let key = packed.row(i);
            packer.check(key).expect("a packed key checks");
            for cut in 0..key.len() {
                assert!(packer.check(&key[..cut]).is_err(), "row {i} cut at {cut}");
            }
            let mut longer = key.to_vec();
            longer.push(0);
            assert!(packer.check(&longer).is_err(), "row {i} with a byte more");
        }
        let flag = KeyPacker::new(&[DataType::Boolean]).expect("packer");
        assert!(flag.check(&[1, 2]).is_err(), "a boolean is 0 or 1");
        assert!(flag.check(&[1, 1]).is_ok() && flag.check(&[1, 0]).is_ok());
        let text = KeyPacker::new(&[DataType::Utf8]).expect("packer");
        assert!(
            text.check(&[1, 2, 0, 0, 0, 0xff, 0xfe]).is_err(),
            "not UTF-8"
        );
        assert!(text.check(&[1, 2, 0, 0, 0, b'o', b'k']).is_ok());
    }
}

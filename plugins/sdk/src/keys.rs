//! Group keys as typed scalar values, for snapshots.
//!
//! Plugins that group rows may keep keys in memory in any form (`arrow::row` bytes are fast to
//! build and compare), but those bytes are an arrow-rs internal whose encoding may change between
//! arrow versions. Snapshots outlive a plugin build, so they store keys as [`KeyValue`]s instead:
//! one per key column, in a layout Flowgate defines (serialised by the plugin, e.g. with
//! postcard). [`encode_rows`] turns key columns into values, [`decode_rows`] turns values back
//! into columns of the key types, ready for a `RowConverter`.
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
}

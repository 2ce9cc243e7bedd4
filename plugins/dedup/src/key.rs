//! Stable hashing of key columns, row by row. Stable across arrow versions and restarts, since
//! the hashes live in snapshots: each value is hashed from its plain bytes. Timestamps keep their
//! full precision: two times in the same millisecond are different keys.

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Int64Type, TimeUnit};
use flowgate_sdk::{Error, Result};

use crate::chain;

/// Null gets its own marker, distinct from every value's encoding.
const NULL_SEED_SALT: u64 = 0x9e37_79b9_7f4a_7c15;

/// Can this type be a key column?
pub fn check_type(data_type: &DataType) -> Result<(), String> {
    match data_type {
        DataType::Utf8
        | DataType::LargeUtf8
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
        | DataType::Timestamp(_, _) => Ok(()),
        other => Err(format!("{other} columns cannot be keys")),
    }
}

/// Chains each row's value of `column` onto `hashes[row]`.
pub fn hash_column(column: &ArrayRef, hashes: &mut [u64]) -> Result<()> {
    let nulls = column.logical_nulls();
    let is_null = |i: usize| nulls.as_ref().is_some_and(|n| n.is_null(i));
    match column.data_type() {
        DataType::Utf8 => {
            let a = column.as_string::<i32>();
            for (i, h) in hashes.iter_mut().enumerate() {
                *h = if is_null(i) {
                    *h ^ NULL_SEED_SALT
                } else {
                    chain(a.value(i).as_bytes(), *h)
                };
            }
        }
        DataType::LargeUtf8 => {
            let a = column.as_string::<i64>();
            for (i, h) in hashes.iter_mut().enumerate() {
                *h = if is_null(i) {
                    *h ^ NULL_SEED_SALT
                } else {
                    chain(a.value(i).as_bytes(), *h)
                };
            }
        }
        DataType::Boolean => {
            let a = column.as_boolean();
            for (i, h) in hashes.iter_mut().enumerate() {
                *h = if is_null(i) {
                    *h ^ NULL_SEED_SALT
                } else {
                    chain(&[u8::from(a.value(i))], *h)
                };
            }
        }
        DataType::Float32 | DataType::Float64 => {
            let a = arrow::compute::cast(column, &DataType::Float64)?;
            let a = a.as_primitive::<arrow::datatypes::Float64Type>();
            for (i, h) in hashes.iter_mut().enumerate() {
                // -0.0 and 0.0 are one key; every NaN is one key.
                let v = a.value(i);
                let v = if v == 0.0 {
                    0.0
                } else if v.is_nan() {
                    f64::NAN
                } else {
                    v
                };
                *h = if is_null(i) {
                    *h ^ NULL_SEED_SALT
                } else {
                    chain(&v.to_bits().to_le_bytes(), *h)
                };
            }
        }
        DataType::UInt64 => {
            let a = column.as_primitive::<arrow::datatypes::UInt64Type>();
            for (i, h) in hashes.iter_mut().enumerate() {
                *h = if is_null(i) {
                    *h ^ NULL_SEED_SALT
                } else {
                    chain(&a.value(i).to_le_bytes(), *h)
                };
            }
        }
        DataType::Timestamp(unit @ (TimeUnit::Microsecond | TimeUnit::Nanosecond), _) => {
            // A time on a whole millisecond hashes as its epoch ms, as in a millisecond column,
            // so keys hashed before the host decoded timestamps in µs still match. A finer time
            // hashes its full value after a unit tag: 9 bytes, never equal to an 8-byte ms hash.
            let (per_milli, tag) = match unit {
                TimeUnit::Microsecond => (1_000, 1u8),
                _ => (1_000_000, 2u8),
            };
            let a = arrow::compute::cast(column, &DataType::Int64)?;
            let a = a.as_primitive::<Int64Type>();
            let mut tagged = [tag; 9];
            for (i, h) in hashes.iter_mut().enumerate() {
                let v = a.value(i);
                *h = if is_null(i) {
                    *h ^ NULL_SEED_SALT
                } else if v % per_milli == 0 {
                    chain(&(v / per_milli).to_le_bytes(), *h)
                } else {
                    tagged[1..].copy_from_slice(&v.to_le_bytes());
                    chain(&tagged, *h)
                };
            }
        }
        t if check_type(t).is_ok() => {
            // Integers, dates and timestamps: hash their value as an i64.
            let a = match t {
                DataType::Int64 => column.clone(),
                _ => arrow::compute::cast(column, &DataType::Int64)?,
            };
            let a = a.as_primitive::<Int64Type>();
            for (i, h) in hashes.iter_mut().enumerate() {
                *h = if is_null(i) {
                    *h ^ NULL_SEED_SALT
                } else {
                    chain(&a.value(i).to_le_bytes(), *h)
                };
            }
        }
        other => return Err(Error::bad_input(format!("{other} columns cannot be keys"))),
    }
    Ok(())
}

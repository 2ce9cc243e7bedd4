//! Stable hashing of key columns, row by row. Stable across arrow versions and restarts, since
//! the hashes live in snapshots: each value is hashed from its plain bytes. Timestamps keep their
//! full precision: two times in the same millisecond are different keys.

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{
    ArrowPrimitiveType, DataType, Date32Type, Date64Type, Float32Type, Float64Type, Int8Type,
    Int16Type, Int32Type, Int64Type, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
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
    debug_assert_eq!(column.len(), hashes.len(), "one hash per row");
    let nulls = column.logical_nulls();
    let is_null = |i: usize| nulls.as_ref().is_some_and(|n| n.is_null(i));
    match column.data_type() {
        DataType::Utf8 => {
            let a = column.as_string::<i32>();
            chain_rows(hashes, is_null, |i, h| chain(a.value(i).as_bytes(), h));
        }
        DataType::LargeUtf8 => {
            let a = column.as_string::<i64>();
            chain_rows(hashes, is_null, |i, h| chain(a.value(i).as_bytes(), h));
        }
        DataType::Boolean => {
            let a = column.as_boolean();
            chain_rows(hashes, is_null, |i, h| chain(&[u8::from(a.value(i))], h));
        }
        DataType::Float32 => {
            let a = column.as_primitive::<Float32Type>();
            chain_rows(hashes, is_null, |i, h| {
                chain(&float_bytes(f64::from(a.value(i))), h)
            });
        }
        DataType::Float64 => {
            let a = column.as_primitive::<Float64Type>();
            chain_rows(hashes, is_null, |i, h| chain(&float_bytes(a.value(i)), h));
        }
        DataType::UInt64 => {
            let a = column.as_primitive::<UInt64Type>();
            chain_rows(hashes, is_null, |i, h| chain(&a.value(i).to_le_bytes(), h));
        }
        // A time on a whole millisecond hashes as its epoch ms, as in a millisecond column, so
        // keys hashed before the host decoded timestamps in µs still match. A finer time hashes
        // its full value after a unit tag: 9 bytes, never equal to an 8-byte ms hash.
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            let values = column.as_primitive::<TimestampMicrosecondType>().values();
            hash_fine_times::<1_000, 1>(values, is_null, hashes);
        }
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            let values = column.as_primitive::<TimestampNanosecondType>().values();
            hash_fine_times::<1_000_000, 2>(values, is_null, hashes);
        }
        // Integers, dates and timestamps: hash their value as an i64 (read in their own type:
        // no `cast` kernels, which are most of a plugin's code).
        DataType::Int8 => hash_ints::<Int8Type>(column, is_null, hashes),
        DataType::Int16 => hash_ints::<Int16Type>(column, is_null, hashes),
        DataType::Int32 => hash_ints::<Int32Type>(column, is_null, hashes),
        DataType::Int64 => hash_ints::<Int64Type>(column, is_null, hashes),
        DataType::UInt8 => hash_ints::<UInt8Type>(column, is_null, hashes),
        DataType::UInt16 => hash_ints::<UInt16Type>(column, is_null, hashes),
        DataType::UInt32 => hash_ints::<UInt32Type>(column, is_null, hashes),
        DataType::Date32 => hash_ints::<Date32Type>(column, is_null, hashes),
        DataType::Date64 => hash_ints::<Date64Type>(column, is_null, hashes),
        DataType::Timestamp(TimeUnit::Second, _) => {
            hash_ints::<TimestampSecondType>(column, is_null, hashes);
        }
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            hash_ints::<TimestampMillisecondType>(column, is_null, hashes);
        }
        other => return Err(Error::bad_input(format!("{other} columns cannot be keys"))),
    }
    Ok(())
}

/// Chains each row onto `hashes[row]`: a null as the null marker, a value as `value(row, hash)`.
fn chain_rows(
    hashes: &mut [u64],
    is_null: impl Fn(usize) -> bool,
    mut value: impl FnMut(usize, u64) -> u64,
) {
    for (i, h) in hashes.iter_mut().enumerate() {
        *h = if is_null(i) {
            *h ^ NULL_SEED_SALT
        } else {
            value(i, *h)
        };
    }
}

/// Chains each row's time of a column in units `PER_MILLI` to the millisecond, tagged `TAG`
/// (see [`hash_column`]). The unit is a constant so that its division is a multiplication.
fn hash_fine_times<const PER_MILLI: i64, const TAG: u8>(
    values: &[i64],
    is_null: impl Fn(usize) -> bool,
    hashes: &mut [u64],
) {
    let mut tagged = [TAG; 9];
    chain_rows(hashes, is_null, |i, h| {
        let v = values[i];
        if v % PER_MILLI == 0 {
            chain(&(v / PER_MILLI).to_le_bytes(), h)
        } else {
            tagged[1..].copy_from_slice(&v.to_le_bytes());
            chain(&tagged, h)
        }
    });
}

/// Chains each row's integer value (as an `i64`) of `column`, of primitive type `T`.
fn hash_ints<T: ArrowPrimitiveType>(
    column: &ArrayRef,
    is_null: impl Fn(usize) -> bool,
    hashes: &mut [u64],
) where
    T::Native: Into<i64>,
{
    let values = column.as_primitive::<T>().values();
    chain_rows(hashes, is_null, |i, h| {
        let v: i64 = values[i].into();
        chain(&v.to_le_bytes(), h)
    });
}

/// A float's bytes as a key: -0.0 and 0.0 are one key; every NaN is one key.
fn float_bytes(v: f64) -> [u8; 8] {
    let v = if v == 0.0 {
        0.0
    } else if v.is_nan() {
        f64::NAN
    } else {
        v
    };
    v.to_bits().to_le_bytes()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{
        BooleanArray, Date32Array, Date64Array, Float32Array, Float64Array, Int8Array, Int16Array,
        Int32Array, Int64Array, StringArray, TimestampMicrosecondArray, TimestampMillisecondArray,
        TimestampNanosecondArray, TimestampSecondArray, UInt8Array, UInt16Array, UInt32Array,
        UInt64Array,
    };
    use arrow::compute::cast;

    use super::*;

    /// The hashes as they were computed before (through arrow's `cast`), which snapshots hold.
    fn through_cast(column: &ArrayRef) -> Vec<u64> {
        let nulls = column.logical_nulls();
        let is_null = |i: usize| nulls.as_ref().is_some_and(|n| n.is_null(i));
        let mut hashes = vec![7u64; column.len()];
        if matches!(column.data_type(), DataType::Float32 | DataType::Float64) {
            let a = cast(column, &DataType::Float64).expect("cast");
            let a = a.as_primitive::<Float64Type>();
            chain_rows(&mut hashes, is_null, |i, h| {
                chain(&float_bytes(a.value(i)), h)
            });
        } else {
            let a = cast(column, &DataType::Int64).expect("cast");
            let a = a.as_primitive::<Int64Type>();
            chain_rows(&mut hashes, is_null, |i, h| {
                chain(&a.value(i).to_le_bytes(), h)
            });
        }
        hashes
    }

    #[test]
    fn every_numeric_type_hashes_as_it_did_through_cast() {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int8Array::from(vec![Some(-3), None, Some(0), Some(127)])),
            Arc::new(Int16Array::from(vec![
                Some(-300),
                None,
                Some(0),
                Some(32767),
            ])),
            Arc::new(Int32Array::from(vec![
                Some(-3),
                None,
                Some(0),
                Some(i32::MAX),
            ])),
            Arc::new(Int64Array::from(vec![
                Some(i64::MIN),
                None,
                Some(0),
                Some(5),
            ])),
            Arc::new(UInt8Array::from(vec![Some(3), None, Some(0), Some(255)])),
            Arc::new(UInt16Array::from(vec![Some(3), None, Some(0), Some(65535)])),
            Arc::new(UInt32Array::from(vec![
                Some(3),
                None,
                Some(0),
                Some(u32::MAX),
            ])),
            Arc::new(Date32Array::from(vec![
                Some(-1),
                None,
                Some(0),
                Some(20_000),
            ])),
            Arc::new(Date64Array::from(vec![
                Some(-1),
                None,
                Some(0),
                Some(1 << 40),
            ])),
            Arc::new(TimestampSecondArray::from(vec![
                Some(-1),
                None,
                Some(0),
                Some(1 << 31),
            ])),
            Arc::new(
                TimestampMillisecondArray::from(vec![Some(-1), None, Some(0), Some(1 << 41)])
                    .with_timezone("UTC"),
            ),
            Arc::new(Float32Array::from(vec![
                Some(-0.0),
                None,
                Some(f32::NAN),
                Some(1.5),
            ])),
            Arc::new(Float64Array::from(vec![
                Some(0.0),
                None,
                Some(-f64::NAN),
                Some(1e300),
            ])),
        ];
        for column in &columns {
            let mut hashes = vec![7u64; column.len()];
            hash_column(column, &mut hashes).expect("hash");
            assert_eq!(hashes, through_cast(column), "{}", column.data_type());
            // Sliced (an offset into the buffers) as well.
            let part = column.slice(1, 3);
            let mut hashes = vec![7u64; 3];
            hash_column(&part, &mut hashes).expect("hash");
            assert_eq!(hashes, through_cast(&part), "{} sliced", column.data_type());
        }
    }

    /// Hashes as the code before `cast` was dropped computed them (commit fcb33f4), pinned:
    /// snapshots hold them, so no type's hash may ever change.
    #[test]
    fn hashes_are_the_ones_snapshots_already_hold() {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(
                TimestampMicrosecondArray::from(vec![
                    Some(1_762_956_000_000_000),
                    Some(1_762_956_000_000_123),
                    Some(-1_500),
                    None,
                ])
                .with_timezone("UTC"),
            ),
            Arc::new(TimestampNanosecondArray::from(vec![
                Some(1_762_956_000_000_000_000),
                Some(1_762_956_000_000_000_007),
                Some(-7),
                None,
            ])),
            Arc::new(UInt64Array::from(vec![
                Some(u64::MAX),
                Some(0),
                Some(1 << 63),
                None,
            ])),
            Arc::new(Float64Array::from(vec![
                Some(-0.0),
                Some(f64::NAN),
                Some(1.5),
                None,
            ])),
            Arc::new(Float32Array::from(vec![
                Some(0.0),
                Some(-f32::NAN),
                Some(0.1),
                None,
            ])),
            Arc::new(StringArray::from(vec![
                Some("AAPL"),
                Some(""),
                Some("é"),
                None,
            ])),
            Arc::new(Int32Array::from(vec![
                Some(-1),
                Some(0),
                Some(i32::MIN),
                None,
            ])),
            Arc::new(Date32Array::from(vec![
                Some(20_000),
                Some(0),
                Some(-1),
                None,
            ])),
            Arc::new(TimestampSecondArray::from(vec![
                Some(1),
                Some(0),
                Some(-1),
                None,
            ])),
            Arc::new(BooleanArray::from(vec![
                Some(true),
                Some(false),
                Some(true),
                None,
            ])),
        ];
        let expected: [[u64; 4]; 10] = [
            [
                17779272626299038742,
                2205039897299993093,
                12897977448309323976,
                11400714819323198482,
            ],
            [
                17779272626299038742,
                4654230963194759883,
                11155427050121394571,
                11400714819323198482,
            ],
            [
                4515201275042620865,
                5133589608643455977,
                14453944126604773445,
                11400714819323198482,
            ],
            [
                5133589608643455977,
                8767126727617553244,
                13861034607965872419,
                11400714819323198482,
            ],
            [
                5133589608643455977,
                8767126727617553244,
                2948090053048082292,
                11400714819323198482,
            ],
            [
                12388281996363943968,
                10464923555624353464,
                152907669675412303,
                11400714819323198482,
            ],
            [
                4515201275042620865,
                5133589608643455977,
                14628638675693770341,
                11400714819323198482,
            ],
            [
                11968568500086329700,
                5133589608643455977,
                4515201275042620865,
                11400714819323198482,
            ],
            [
                12012694768356207812,
                5133589608643455977,
                4515201275042620865,
                11400714819323198482,
            ],
            [
                14781147738186699122,
                3190143244639781093,
                14781147738186699122,
                11400714819323198482,
            ],
        ];
        let mut chained = vec![7u64; 4];
        for (column, expected) in columns.iter().zip(expected) {
            let mut own = vec![7u64; 4];
            hash_column(column, &mut own).expect("hash");
            assert_eq!(own, expected, "{}", column.data_type());
            hash_column(column, &mut chained).expect("hash");
        }
        assert_eq!(
            chained,
            [
                17468566789335981207,
                17985385756884078767,
                7833094754089616082,
                7
            ]
        );
    }
}

//! Column lookups and conversions that plugins share.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array};
use arrow::datatypes::{
    DataType, Date32Type, Decimal32Type, Decimal64Type, Decimal128Type, Decimal256Type,
    Float16Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, Schema,
    TimeUnit, UInt8Type, UInt16Type, UInt32Type, UInt64Type, i256,
};
use arrow::record_batch::RecordBatch;

use crate::{Error, Result};

/// Index of column `name` in `schema`, or an invalid-config error naming the config `key`.
pub fn column_index(schema: &Schema, name: &str, key: &str) -> Result<usize> {
    schema.index_of(name).map_err(|_| {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        Error::config(
            key,
            format!(
                "column `{name}` is not in the input (columns: {})",
                names.join(", ")
            ),
        )
    })
}

/// True if values of `data_type` can serve as event time: a timestamp, a date, or an integer of
/// epoch milliseconds.
pub fn is_event_time_type(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 | DataType::Int64
    )
}

/// Column `index` as epoch milliseconds (timestamps of any unit, dates, or int64 taken as ms).
/// Finer timestamps are floored to their millisecond; see [`event_time_sub_millis_nanos`] for the
/// rest.
pub fn event_time_millis(batch: &RecordBatch, index: usize) -> Result<Int64Array> {
    let column = batch.column(index);
    // Finer units are floored to the millisecond (dividing would round towards zero before
    // 1970), each by its own constant: a division by a variable is a hardware division per row.
    Ok(match column.data_type() {
        DataType::Int64 | DataType::Date64 | DataType::Timestamp(TimeUnit::Millisecond, _) => {
            raw_i64(column)?
        }
        DataType::Date32 => {
            let days = column.as_primitive::<Date32Type>();
            days.unary(|d: i32| i64::from(d) * 86_400_000)
        }
        DataType::Timestamp(TimeUnit::Second, _) => {
            raw_i64(column)?.unary_opt(|s: i64| s.checked_mul(1_000))
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            raw_i64(column)?.unary(|v: i64| v.div_euclid(1_000))
        }
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            raw_i64(column)?.unary(|v: i64| v.div_euclid(1_000_000))
        }
        other => {
            return Err(Error::bad_input(format!(
                "column {index} has type {other}, not a timestamp"
            )));
        }
    })
}

/// The stored 64-bit integers of an int64, date64 or timestamp column, as they are (no unit or
/// time-zone conversion). Arrow's generic `cast` would do the same, but linking it adds about
/// 3 MB of conversion code for every type pair to each plugin.
fn raw_i64(column: &ArrayRef) -> Result<Int64Array> {
    let data = column
        .to_data()
        .into_builder()
        .data_type(DataType::Int64)
        .build()?;
    Ok(Int64Array::from(data))
}

/// Column `index` as i64 values: integers widened, dates and timestamps as their stored value
/// (days, milliseconds or the timestamp's unit: no conversion). A `UInt64` value past `i64::MAX`
/// is null. Other types are a [`Error::BadInput`].
pub fn int64_column(batch: &RecordBatch, index: usize) -> Result<Int64Array> {
    let column = batch.column(index);
    macro_rules! widen {
        ($type:ty) => {
            column.as_primitive::<$type>().unary(|v| i64::from(v))
        };
    }
    Ok(match column.data_type() {
        DataType::Int64 | DataType::Date64 | DataType::Timestamp(_, _) => raw_i64(column)?,
        DataType::Int8 => widen!(Int8Type),
        DataType::Int16 => widen!(Int16Type),
        DataType::Int32 => widen!(Int32Type),
        DataType::Date32 => widen!(Date32Type),
        DataType::UInt8 => widen!(UInt8Type),
        DataType::UInt16 => widen!(UInt16Type),
        DataType::UInt32 => widen!(UInt32Type),
        DataType::UInt64 => column
            .as_primitive::<UInt64Type>()
            .unary_opt(|v| i64::try_from(v).ok()),
        other => {
            return Err(Error::bad_input(format!(
                "column {index} has type {other}, not an integer"
            )));
        }
    })
}

/// Column `index`'s event time below the millisecond, in nanoseconds (`0..1_000_000`), so that
/// `(event_time_millis, this)` orders rows at the column's full precision. `None` if the column
/// cannot be finer than a millisecond (millisecond or second timestamps, dates, int64 epoch ms).
/// Values at null rows are meaningless.
pub fn event_time_sub_millis_nanos(batch: &RecordBatch, index: usize) -> Result<Option<Vec<u32>>> {
    let column = batch.column(index);
    let per_milli: i64 = match column.data_type() {
        DataType::Timestamp(TimeUnit::Microsecond, _) => 1_000,
        DataType::Timestamp(TimeUnit::Nanosecond, _) => 1_000_000,
        t if is_event_time_type(t) => return Ok(None),
        other => {
            return Err(Error::bad_input(format!(
                "column {index} has type {other}, not a timestamp"
            )));
        }
    };
    let ns_per_unit = 1_000_000 / per_milli;
    let raw = raw_i64(column)?;
    Ok(Some(
        raw.values()
            .iter()
            // In 0..1_000_000: fits a u32.
            .map(|v| (v.rem_euclid(per_milli) * ns_per_unit) as u32)
            .collect(),
    ))
}

/// True if values of `data_type` convert to f64 for comparisons and sums.
pub fn is_numeric_type(data_type: &DataType) -> bool {
    data_type.is_numeric() || matches!(data_type, DataType::Timestamp(_, _))
}

/// Column `index` as f64 values (numeric types, decimals scaled; timestamps as their raw value).
pub fn float64_column(batch: &RecordBatch, index: usize) -> Result<Float64Array> {
    let column = batch.column(index);
    macro_rules! widen {
        ($type:ty) => {
            column.as_primitive::<$type>().unary(|v| f64::from(v))
        };
    }
    macro_rules! decimal {
        ($type:ty, $scale:expr, $to_f64:expr) => {{
            let divisor = 10_f64.powi(i32::from(*$scale));
            column
                .as_primitive::<$type>()
                .unary(|v| $to_f64(v) / divisor)
        }};
    }
    Ok(match column.data_type() {
        DataType::Float64 => column.as_primitive::<Float64Type>().clone(),
        DataType::Float32 => widen!(Float32Type),
        DataType::Float16 => column.as_primitive::<Float16Type>().unary(|v| v.to_f64()),
        DataType::Int8 => widen!(Int8Type),
        DataType::Int16 => widen!(Int16Type),
        DataType::Int32 => widen!(Int32Type),
        DataType::UInt8 => widen!(UInt8Type),
        DataType::UInt16 => widen!(UInt16Type),
        DataType::UInt32 => widen!(UInt32Type),
        // Beyond 2^53 the nearest f64, as `as` rounds.
        DataType::Int64 => column.as_primitive::<Int64Type>().unary(|v| v as f64),
        DataType::UInt64 => column.as_primitive::<UInt64Type>().unary(|v| v as f64),
        DataType::Decimal32(_, scale) => decimal!(Decimal32Type, scale, f64::from),
        DataType::Decimal64(_, scale) => decimal!(Decimal64Type, scale, |v: i64| v as f64),
        DataType::Decimal128(_, scale) => decimal!(Decimal128Type, scale, |v: i128| v as f64),
        DataType::Decimal256(_, scale) => decimal!(Decimal256Type, scale, |v: i256| {
            match v.to_i128() {
                Some(small) => small as f64,
                // Past i128 the low half is below f64's precision anyway.
                None => {
                    let (low, high) = v.to_parts();
                    high as f64 * 2_f64.powi(128) + low as f64
                }
            }
        }),
        DataType::Timestamp(_, _) => raw_i64(column)?.unary(|v| v as f64),
        other => {
            return Err(Error::bad_input(format!(
                "column {index} has type {other}, not a number"
            )));
        }
    })
}

/// A batch of `schema` with one extra nullable column at the end.
pub fn append_column(
    batch: &RecordBatch,
    schema: &Arc<Schema>,
    column: ArrayRef,
) -> Result<RecordBatch> {
    let mut columns = batch.columns().to_vec();
    columns.push(column);
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// Renders a schema as `[name: Type, …]` for messages.
pub fn describe_schema(schema: &Schema) -> String {
    let fields: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| {
            format!(
                "{}: {}{}",
                f.name(),
                f.data_type(),
                if f.is_nullable() { "" } else { " not null" }
            )
        })
        .collect();
    format!("[{}]", fields.join(", "))
}

/// Formats epoch milliseconds as RFC 3339 UTC (`2025-11-12T14:38:30.294Z`), for messages.
pub fn format_millis(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

/// Formats an event time as [`format_millis`] does, with the digits below the millisecond when
/// `sub_millis_nanos` (as from [`event_time_sub_millis_nanos`]) is not zero:
/// `2025-11-12T14:38:30.294001Z`.
pub fn format_event_time(ms: i64, sub_millis_nanos: u32) -> String {
    let text = format_millis(ms);
    if sub_millis_nanos == 0 {
        return text;
    }
    let base = text.trim_end_matches('Z');
    if sub_millis_nanos.is_multiple_of(1000) {
        format!("{base}{:03}Z", sub_millis_nanos / 1000)
    } else {
        format!("{base}{sub_millis_nanos:06}Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        TimestampMicrosecondArray, TimestampMillisecondArray, TimestampNanosecondArray,
    };
    use arrow::datatypes::Field;

    fn one_column(array: ArrayRef) -> RecordBatch {
        let schema = Schema::new(vec![Field::new("ts", array.data_type().clone(), true)]);
        RecordBatch::try_new(Arc::new(schema), vec![array]).expect("batch")
    }

    #[test]
    fn event_time_of_every_unit_floors_to_millis_and_keeps_the_rest() {
        let us = one_column(Arc::new(
            TimestampMicrosecondArray::from(vec![Some(1_762_958_310_294_001), Some(-1), None])
                .with_timezone("UTC"),
        ));
        let ms = event_time_millis(&us, 0).expect("millis");
        assert_eq!(ms.value(0), 1_762_958_310_294);
        assert_eq!(ms.value(1), -1, "floored, not rounded towards zero");
        assert!(ms.is_null(2));
        let sub = event_time_sub_millis_nanos(&us, 0)
            .expect("sub")
            .expect("finer than ms");
        assert_eq!(&sub[..2], &[1_000, 999_000]);

        let ns = one_column(Arc::new(TimestampNanosecondArray::from(vec![
            1_762_958_310_294_000_007,
        ])));
        assert_eq!(
            event_time_millis(&ns, 0).expect("ms").value(0),
            1_762_958_310_294
        );
        assert_eq!(
            event_time_sub_millis_nanos(&ns, 0).expect("sub"),
            Some(vec![7])
        );

        let millis = one_column(Arc::new(
            TimestampMillisecondArray::from(vec![1_762_958_310_294]).with_timezone("UTC"),
        ));
        assert_eq!(
            event_time_millis(&millis, 0).expect("ms").value(0),
            1_762_958_310_294
        );
        assert_eq!(event_time_sub_millis_nanos(&millis, 0).expect("sub"), None);
        let epoch = one_column(Arc::new(Int64Array::from(vec![5])));
        assert_eq!(event_time_sub_millis_nanos(&epoch, 0).expect("sub"), None);
    }

    #[test]
    fn event_time_of_dates_and_seconds() {
        use arrow::array::{Date32Array, TimestampSecondArray};
        let days = one_column(Arc::new(Date32Array::from(vec![
            Some(20_404),
            Some(-1),
            None,
        ])));
        let ms = event_time_millis(&days, 0).expect("millis");
        assert_eq!(ms.value(0), 1_762_905_600_000);
        assert_eq!(ms.value(1), -86_400_000);
        assert!(ms.is_null(2));
        let seconds = one_column(Arc::new(TimestampSecondArray::from(vec![
            1_762_958_310,
            i64::MAX,
        ])));
        let ms = event_time_millis(&seconds, 0).expect("millis");
        assert_eq!(ms.value(0), 1_762_958_310_000);
        assert!(ms.is_null(1), "out of range is null, not a wrapped time");
        let text = one_column(Arc::new(arrow::array::StringArray::from(vec!["x"])));
        assert!(event_time_millis(&text, 0).is_err());
    }

    #[test]
    fn every_numeric_type_reads_as_f64() {
        use arrow::array::{
            Decimal128Array, Decimal256Array, Float32Array, Int8Array, UInt64Array,
        };
        let cases: Vec<(ArrayRef, Vec<Option<f64>>)> = vec![
            (
                Arc::new(Int8Array::from(vec![Some(-3), None])),
                vec![Some(-3.0), None],
            ),
            (Arc::new(UInt64Array::from(vec![Some(7)])), vec![Some(7.0)]),
            (
                Arc::new(Float32Array::from(vec![Some(1.5)])),
                vec![Some(1.5)],
            ),
            (
                Arc::new(
                    Decimal128Array::from(vec![Some(12_345), Some(-5)])
                        .with_precision_and_scale(10, 2)
                        .expect("decimal"),
                ),
                vec![Some(123.45), Some(-0.05)],
            ),
            (
                Arc::new(
                    Decimal256Array::from(vec![Some(i256::from_i128(-2_500))])
                        .with_precision_and_scale(40, 3)
                        .expect("decimal"),
                ),
                vec![Some(-2.5)],
            ),
            (
                Arc::new(TimestampMillisecondArray::from(vec![Some(1_000)])),
                vec![Some(1_000.0)],
            ),
        ];
        for (array, want) in cases {
            let data_type = array.data_type().clone();
            let got = float64_column(&one_column(array), 0).expect("f64");
            assert_eq!(got.iter().collect::<Vec<_>>(), want, "{data_type}");
        }
        let text = one_column(Arc::new(arrow::array::StringArray::from(vec!["1"])));
        assert!(float64_column(&text, 0).is_err());
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(format_millis(1_762_958_310_294), "2025-11-12T14:38:30.294Z");
        assert_eq!(format_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            format_event_time(1_762_958_310_294, 0),
            "2025-11-12T14:38:30.294Z"
        );
        assert_eq!(
            format_event_time(1_762_958_310_294, 1_000),
            "2025-11-12T14:38:30.294001Z"
        );
        assert_eq!(
            format_event_time(1_762_958_310_294, 7),
            "2025-11-12T14:38:30.294000007Z"
        );
    }
}

use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array, TimestampMicrosecondArray};
use flowgate_sdk::prelude::*;
use flowgate_sdk::testing::lines_with;

use crate::Validate;
use crate::scenarios::scenarios;

fn run(name: &str) -> Vec<String> {
    let scenario = scenarios()
        .into_iter()
        .find(|s| s.name == name)
        .expect("scenario");
    scenario.run_native::<Validate>()
}

#[test]
fn rows_breaking_rules_are_rejected_with_every_reason() {
    let t = run("rules");
    let out = lines_with(&t, "step 0 out");
    assert_eq!(out.len(), 2, "{t:#?}");
    assert!(out[0].contains("\"AAPL\""));
    assert!(
        out[1].contains("\"IBM\""),
        "null volume passes `min`: {t:#?}"
    );
    assert!(
        t.contains(
            &r#"step 0 rejected 1: symbol: "aapl" does not match `^[A-Z]{1,5}$`"#.to_string()
        ),
        "{t:#?}"
    );
    assert!(
        t.contains(&"step 0 rejected 2: price: must be > 0, got -1".to_string()),
        "{t:#?}"
    );
    assert!(
        t.contains(
            &"step 0 rejected 3: price: must be > 0, got 0; volume: must be >= 0, got -5"
                .to_string()
        ),
        "{t:#?}"
    );
    assert!(
        t.contains(&"step 0 rejected 4: symbol: is null; price: is null; ts: is null".to_string()),
        "{t:#?}"
    );
}

#[test]
fn empty_batch_passes() {
    let t = run("rules");
    assert!(lines_with(&t, "step 1 ").is_empty(), "{t:#?}");
}

#[test]
fn time_rules_follow_the_watermark() {
    let t = run("rules");
    // Watermark 14:40: 14:44 is within 5m, 14:46 is not; 2 days back is older than 1d.
    assert_eq!(lines_with(&t, "step 3 out").len(), 1, "{t:#?}");
    assert!(t.contains(&"step 3 rejected 1: ts: 2025-11-12T14:46:00.000Z is more than 5m ahead of the watermark (2025-11-12T14:40:00.000Z)".to_string()), "{t:#?}");
    assert!(
        lines_with(
            &t,
            "step 3 rejected 2: ts: 2025-11-10T14:40:00.000Z is more than 1d behind"
        )
        .len()
            == 1,
        "{t:#?}"
    );
    assert_eq!(lines_with(&t, "step 5 out").len(), 1, "{t:#?}");
    assert_eq!(
        lines_with(&t, "step 5 rejected"),
        [
            "step 5 rejected 1: ts: 2025-11-12T14:46:00.000Z is more than 5m ahead of the watermark (2025-11-12T14:40:00.000Z)"
        ],
        "the restored step still measures against the watermark: {t:#?}"
    );
}

#[test]
fn config_errors_name_the_key() {
    let expect = [
        (
            "unknown column",
            "`rules.prize`: column `prize` is not in the input (columns: symbol, price, volume, ts)",
        ),
        ("bad regex", "`rules.symbol.pattern`: not a valid regex"),
        (
            "min on text",
            "`rules.symbol.min`: applies to numeric columns, this column is Utf8",
        ),
        (
            "unknown rule",
            "`rules.price.minimum`: unknown field `minimum`",
        ),
        ("empty rule", "`rules.price`: no rule given"),
        (
            "one_of type",
            "`rules.symbol.one_of`: values must all be of the column's type",
        ),
    ];
    for (name, text) in expect {
        let t = run(name);
        assert_eq!(t.len(), 1, "{name}: {t:#?}");
        assert!(
            t[0].starts_with(&format!("create error: invalid config: {text}")),
            "{name}: {t:#?}"
        );
    }
}

#[test]
fn nan_and_negative_values_fail_ranges() {
    let schema =
        flowgate_sdk::testing::schema(&[("price", "float64", true), ("volume", "int64", true)]);
    let (mut v, _) = flowgate_sdk::create::<Validate>(
        r#"{"rules":{"price":{"min":0,"max":100},"volume":{"min":0}}}"#,
        &schema,
    )
    .expect("config");
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Float64Array::from(vec![
                f64::NAN,
                1.0,
                100.0,
                100.5,
                f64::INFINITY,
            ])),
            Arc::new(Int64Array::from(vec![
                Some(1),
                Some(-1),
                None,
                Some(0),
                Some(i64::MIN),
            ])),
        ],
    )
    .expect("batch");
    let out = v.process(batch).expect("process");
    assert_eq!(out.num_rows(), 1);
    let reasons: Vec<_> = out
        .rejected
        .iter()
        .map(|r| (r.row, r.reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [
            (
                0,
                "price: must be >= 0, got NaN; price: must be <= 100, got NaN"
            ),
            (1, "volume: must be >= 0, got -1"),
            (3, "price: must be <= 100, got 100.5"),
            (
                4,
                "price: must be <= 100, got inf; volume: must be >= 0, got -9223372036854776000"
            ),
        ]
    );
}

#[test]
fn processing_time_rules_use_the_clock() {
    let schema = flowgate_sdk::testing::schema(&[("ts", "timestamp", false)]);
    let (mut v, _) = flowgate_sdk::create::<Validate>(
        r#"{"rules":{"ts":{"max_future":"1h","relative_to":"processing_time"}}}"#,
        &schema,
    )
    .expect("native code has a clock");
    let far = 4_102_444_800_000_000; // 2100-01-01, in µs
    let batch = RecordBatch::try_new(
        schema,
        vec![Arc::new(
            TimestampMicrosecondArray::from(vec![0, far]).with_timezone("UTC"),
        )],
    )
    .expect("batch");
    let out = v.process(batch).expect("process");
    assert_eq!(out.num_rows(), 1);
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].row, 1);
}

/// 14:40:00 on 2025-11-12, epoch ms.
const T1440: i64 = 1_762_958_400_000;

fn ticks() -> SchemaRef {
    flowgate_sdk::testing::schema(&[("symbol", "utf8", true), ("ts", "timestamp", true)])
}

fn reasons(out: &Output) -> Vec<(u32, &str)> {
    out.rejected
        .iter()
        .map(|r| (r.row, r.reason.as_str()))
        .collect()
}

#[test]
fn watermark_survives_snapshot_and_restore() {
    let config = r#"{"rules":{"ts":{"max_future":"5m","max_age":"1d"}}}"#;
    let schema = ticks();
    let lines = [
        r#"{"symbol":"A","ts":"2025-11-12T14:44:00Z"}"#,
        r#"{"symbol":"B","ts":"2025-11-12T14:46:00Z"}"#,
        r#"{"symbol":"C","ts":"2025-11-10T14:40:00Z"}"#,
    ];
    let (mut before, _) = flowgate_sdk::create::<Validate>(config, &schema).expect("create");
    before.on_watermark(T1440).expect("watermark");
    let state = before.snapshot().expect("snapshot");
    // Golden layout: header, version 1, then "some" and the watermark.
    let mut golden = b"FGS1".to_vec();
    golden.extend_from_slice(&1u32.to_le_bytes());
    golden.push(1);
    golden.extend_from_slice(&T1440.to_le_bytes());
    assert_eq!(state, golden);

    let (mut after, _) = flowgate_sdk::create::<Validate>(config, &schema).expect("create");
    after.restore(&state).expect("restore");
    let want = before
        .process(flowgate_sdk::testing::batch(&schema, &lines))
        .expect("process");
    let got = after
        .process(flowgate_sdk::testing::batch(&schema, &lines))
        .expect("process");
    assert_eq!(reasons(&got), reasons(&want));
    assert_eq!(got.num_rows(), 1);
    assert_eq!(
        reasons(&got).iter().map(|r| r.0).collect::<Vec<_>>(),
        [1, 2]
    );

    // No watermark yet: saved as such, and nothing is measured against one.
    let (fresh, _) = flowgate_sdk::create::<Validate>(config, &schema).expect("create");
    let empty = fresh.snapshot().expect("snapshot");
    assert_eq!(&empty[8..], &[0]);
    after.restore(&empty).expect("restore none");
    let out = after
        .process(flowgate_sdk::testing::batch(&schema, &lines))
        .expect("process");
    assert_eq!(out.num_rows(), 3);

    // State from before the watermark was saved (version 0, empty) still restores.
    let mut v0 = b"FGS1".to_vec();
    v0.extend_from_slice(&0u32.to_le_bytes());
    after.restore(&v0).expect("version 0");
    let mut v2 = b"FGS1".to_vec();
    v2.extend_from_slice(&2u32.to_le_bytes());
    let err = after.restore(&v2).expect_err("newer version");
    assert!(err.message().contains("newer plugin version"), "{err}");
    let err = after.restore(&golden[..12]).expect_err("truncated");
    assert!(matches!(err, Error::BadInput(_)), "{err}");
}

#[test]
fn time_rules_keep_microseconds() {
    let schema = ticks();
    assert_eq!(
        schema.field(1).data_type(),
        &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into()))
    );
    let (mut v, _) = flowgate_sdk::create::<Validate>(
        r#"{"rules":{"ts":{"max_future":"5m","max_age":"1d"}}}"#,
        &schema,
    )
    .expect("create");
    v.on_watermark(T1440).expect("watermark");
    let out = v
        .process(flowgate_sdk::testing::batch(
            &schema,
            &[
                r#"{"symbol":"A","ts":"2025-11-12T14:45:00Z"}"#,
                r#"{"symbol":"B","ts":"2025-11-12T14:45:00.000001Z"}"#,
                r#"{"symbol":"C","ts":"2025-11-11T14:40:00Z"}"#,
                r#"{"symbol":"D","ts":"2025-11-11T14:39:59.999999Z"}"#,
                r#"{"symbol":"E","ts":1762958700000}"#,
            ],
        ))
        .expect("process");
    assert_eq!(
        reasons(&out),
        [
            (
                1,
                "ts: 2025-11-12T14:45:00.000001Z is more than 5m ahead of the watermark (2025-11-12T14:40:00.000Z)"
            ),
            (
                3,
                "ts: 2025-11-11T14:39:59.999999Z is more than 1d behind the watermark (2025-11-12T14:40:00.000Z)"
            ),
        ]
    );
    assert_eq!(out.num_rows(), 3);
}

#[test]
fn a_pattern_judges_every_row_when_values_repeat_and_when_they_do_not() {
    // Each distinct value is matched once per batch and its answer reused; past the memo's
    // size values are matched one by one. Either way every failing row is named.
    let schema = flowgate_sdk::testing::schema(&[("symbol", "utf8", true)]);
    let (mut v, _) = flowgate_sdk::create::<Validate>(
        r#"{"rules":{"symbol":{"pattern":"^[A-Z]{1,5}$"}}}"#,
        &schema,
    )
    .expect("config");
    let mut symbols: Vec<Option<String>> = ["AAPL", "bad!", "AAPL", "bad!", "MSFT"]
        .iter()
        .map(|s| Some(s.to_string()))
        .collect();
    symbols.push(None);
    // 5,000 distinct values more (over the memo), every 1,000th bad.
    for i in 0..5_000 {
        let s = if i % 1_000 == 999 {
            format!("x{i}")
        } else {
            let letters: String = format!("{i:04}")
                .bytes()
                .map(|b| char::from(b'A' + (b - b'0')))
                .collect();
            letters
        };
        symbols.push(Some(s));
    }
    let batch = RecordBatch::try_new(
        schema,
        vec![Arc::new(arrow::array::StringArray::from(symbols))],
    )
    .expect("batch");
    let out = v.process(batch).expect("process");
    let rows: Vec<u32> = out.rejected.iter().map(|r| r.row).collect();
    let late: Vec<u32> = (0..5).map(|k| 6 + 999 + 1_000 * k).collect();
    assert_eq!(rows, [&[1, 3][..], &late].concat(), "{:?}", reasons(&out));
    assert!(
        reasons(&out)[0].1.contains("\"bad!\" does not match"),
        "{:?}",
        reasons(&out)
    );
    assert_eq!(out.num_rows(), 5 + 1 + 5_000 - 2 - 5);
}

#[test]
fn a_null_is_not_judged_by_the_value_stored_under_it() {
    // Rows 0 and 2 are null over values that would break every rule: no rule may name them
    // (the checks test values first and validity only for a failing value).
    use arrow::array::{LargeStringArray, StringArray, StringViewArray, TimestampMicrosecondArray};
    use arrow::buffer::{NullBuffer, OffsetBuffer, ScalarBuffer};
    let schema = flowgate_sdk::testing::schema(&[
        ("price", "float64", true),
        ("ts", "timestamp", true),
        ("symbol", "utf8", true),
    ]);
    let nulls = NullBuffer::from(vec![false, true, false]);
    let price = Float64Array::new(
        ScalarBuffer::from(vec![-1.0, 5.0, f64::NAN]),
        Some(nulls.clone()),
    );
    let far = 4_000_000_000_000_000_i64; // µs: the year 2096
    let ts = TimestampMicrosecondArray::new(
        ScalarBuffer::from(vec![far, 1_762_958_400_000_000, i64::MIN]),
        Some(nulls.clone()),
    )
    .with_timezone("UTC");
    let symbol = StringArray::new(
        OffsetBuffer::from_lengths([4, 4, 4]),
        arrow::buffer::Buffer::from("bad!AAPLbad?".as_bytes()),
        Some(nulls.clone()),
    );
    let (mut v, _) = flowgate_sdk::create::<Validate>(
        r#"{"rules":{"price":{"min":0,"max":100},"ts":{"max_future":"5m","max_age":"1d"},"symbol":{"pattern":"^[A-Z]+$"}}}"#,
        &schema,
    )
    .expect("config");
    v.on_watermark(1_762_958_400_000).expect("watermark");
    let batch = RecordBatch::try_new(
        schema,
        vec![Arc::new(price), Arc::new(ts), Arc::new(symbol)],
    )
    .expect("batch");
    let out = v.process(batch).expect("process");
    assert_eq!(reasons(&out), []);
    assert_eq!(out.num_rows(), 3);

    // A pattern reads every string type it accepts, nulls left out.
    for column in [
        Arc::new(LargeStringArray::from(vec![
            Some("AAPL"),
            None,
            Some("bad!"),
        ])) as ArrayRef,
        Arc::new(StringViewArray::from(vec![
            Some("AAPL"),
            None,
            Some("bad!"),
        ])) as ArrayRef,
    ] {
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("symbol", column.data_type().clone(), true),
        ]));
        let (mut v, _) = flowgate_sdk::create::<Validate>(
            r#"{"rules":{"symbol":{"pattern":"^[A-Z]+$"}}}"#,
            &schema,
        )
        .expect("config");
        let out = v
            .process(RecordBatch::try_new(schema, vec![column]).expect("batch"))
            .expect("process");
        assert_eq!(
            reasons(&out),
            [(2, "symbol: \"bad!\" does not match `^[A-Z]+$`")]
        );
    }
}

#[test]
fn a_pattern_tells_short_values_apart_by_length_and_long_ones_by_text() {
    // Up to 7 bytes a value is remembered as one integer with its length: "A" and "A\0" must
    // not share an answer; 8 bytes and more are remembered as text.
    let schema = flowgate_sdk::testing::schema(&[("symbol", "utf8", false)]);
    let (mut v, _) =
        flowgate_sdk::create::<Validate>(r#"{"rules":{"symbol":{"pattern":"^[A-Z]+$"}}}"#, &schema)
            .expect("config");
    let values = [
        "A",
        "A\0",
        "ABCDEFGH",
        "ABCDEFG",
        "ABCDEFGH",
        "A\0",
        "abcdefghij",
        "A",
        "",
    ];
    let batch = RecordBatch::try_new(
        schema,
        vec![Arc::new(arrow::array::StringArray::from(values.to_vec()))],
    )
    .expect("batch");
    let out = v.process(batch).expect("process");
    let rows: Vec<u32> = out.rejected.iter().map(|r| r.row).collect();
    assert_eq!(rows, [1, 5, 6, 8], "{:?}", reasons(&out));
}

#[test]
fn one_of_text_names_each_value_outside_the_set_and_passes_nulls() {
    let schema = flowgate_sdk::testing::schema(&[("symbol", "utf8", true)]);
    let (mut v, _) = flowgate_sdk::create::<Validate>(
        r#"{"rules":{"symbol":{"one_of":["AAPL","MSFT"]}}}"#,
        &schema,
    )
    .expect("config");
    let batch = RecordBatch::try_new(
        schema,
        vec![Arc::new(arrow::array::StringArray::from(vec![
            Some("AAPL"),
            None,
            Some("XYZ"),
            Some("MSFT"),
        ]))],
    )
    .expect("batch");
    let out = v.process(batch).expect("process");
    assert_eq!(
        reasons(&out),
        [(2, "symbol: \"XYZ\" is not one of the allowed values")]
    );
    assert_eq!(out.num_rows(), 3);
}

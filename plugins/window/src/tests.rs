use flowgate_sdk::prelude::*;
use flowgate_sdk::testing::lines_with;
use serde_json::{Value, json};

use crate::Window;
use crate::scenarios::{BARS, scenarios};

fn run(name: &str) -> Vec<String> {
    let scenario = scenarios()
        .into_iter()
        .find(|s| s.name == name)
        .expect("scenario");
    scenario.run_native::<Window>()
}

fn rows(t: &[String], prefix: &str) -> Vec<Value> {
    lines_with(t, prefix)
        .iter()
        .map(|l| serde_json::from_str(l.split_once(" out ").expect("out").1).expect("json"))
        .collect()
}

#[test]
fn bars_are_emitted_once_when_the_watermark_passes_the_window() {
    let t = run("bars");
    assert!(
        lines_with(&t, "step 0 out").is_empty(),
        "nothing before the watermark: {t:#?}"
    );
    assert_eq!(
        lines_with(&t, "step 0 rejected"),
        ["step 0 rejected 5: event time is null"]
    );
    let bars = rows(&t, "step 3 out");
    assert_eq!(
        bars,
        [
            json!({"symbol":"A","window_start":"2025-11-12T14:00:00Z","window_end":"2025-11-12T14:01:00Z",
                   "open":9.0,"high":11.0,"low":9.0,"close":11.0,"volume":6,"trades":3,"avg_price":10.0}),
            json!({"symbol":"B","window_start":"2025-11-12T14:00:00Z","window_end":"2025-11-12T14:01:00Z",
                   "open":100.0,"high":100.0,"low":100.0,"close":100.0,"volume":6,"trades":2,"avg_price":100.0}),
        ],
        "{t:#?}"
    );
    assert!(
        lines_with(&t, "step 6 ").is_empty(),
        "a window is emitted once: {t:#?}"
    );
}

#[test]
fn late_rows_are_rejected_and_state_survives_restore() {
    let t = run("bars");
    let late = lines_with(&t, "step 4 rejected");
    assert_eq!(late.len(), 1, "{t:#?}");
    assert!(
        late[0].starts_with("step 4 rejected 0: late: event time 2025-11-12T14:00:59.000Z"),
        "{t:#?}"
    );
    let bars = rows(&t, "step 5 out");
    assert_eq!(bars.len(), 1, "{t:#?}");
    assert_eq!(
        bars[0]["open"],
        json!(12.0),
        "row from before the snapshot kept: {t:#?}"
    );
    assert_eq!(bars[0]["close"], json!(13.0));
    assert_eq!(bars[0]["trades"], json!(2));
}

#[test]
fn hopping_windows_hold_each_row_in_every_window_it_falls_in() {
    let t = run("hopping");
    let got: Vec<(String, i64, i64)> = rows(&t, "step 1 out")
        .iter()
        .map(|r| {
            (
                r["window_start"].as_str().unwrap_or("").to_string(),
                r["n"].as_i64().unwrap_or(-1),
                r["v"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("2025-11-12T13:59:30Z".to_string(), 1, 1),
            ("2025-11-12T14:00:00Z".to_string(), 2, 3),
            ("2025-11-12T14:00:30Z".to_string(), 1, 2),
        ],
        "{t:#?}"
    );
}

#[test]
fn config_errors_name_the_key() {
    let expect = [
        (
            "unknown function",
            "`aggregates.m`: unknown variant `median`",
        ),
        (
            "slide over size",
            "`slide`: must be greater than zero and at most `size` (1m)",
        ),
        (
            "text aggregate",
            "`aggregates.s`: column `symbol` is Utf8; aggregates need numbers",
        ),
        (
            "missing column",
            "`group_by[0]`: column `sym` is not in the input",
        ),
        (
            "name clash",
            "`aggregates.symbol`: output column `symbol` is already taken",
        ),
    ];
    for (name, text) in expect {
        let t = run(name);
        assert!(
            t[0].starts_with(&format!("create error: invalid config: {text}")),
            "{name}: {t:#?}"
        );
    }
}

#[test]
fn output_schema_follows_the_config_order() {
    let schema = flowgate_sdk::testing::schema(&[
        ("symbol", "utf8", false),
        ("price", "float64", true),
        ("volume", "int64", true),
        ("ts", "timestamp", false),
    ]);
    let (_, out) = flowgate_sdk::create::<Window>(BARS, &schema).expect("create");
    let names: Vec<_> = out.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        [
            "symbol",
            "window_start",
            "window_end",
            "open",
            "high",
            "low",
            "close",
            "volume",
            "trades",
            "avg_price"
        ]
    );
    assert_eq!(
        out.field_with_name("volume")
            .map(|f| f.data_type().clone())
            .ok(),
        Some(DataType::Int64)
    );
}

use crate::scenarios::T14;
use flowgate_sdk::testing::{batch, schema};

#[test]
fn first_and_last_follow_microseconds_within_a_millisecond() {
    let ticks = schema(&[
        ("symbol", "utf8", true),
        ("price", "float64", true),
        ("volume", "int64", true),
        ("ts", "timestamp", true),
    ]);
    let (mut w, _) = flowgate_sdk::create::<Window>(BARS, &ticks).expect("create");
    // The later tick (by µs, same ms) arrives first.
    w.process(batch(
        &ticks,
        &[
            r#"{"symbol":"A","price":2,"volume":1,"ts":"2025-11-12T14:00:30.294001Z"}"#,
            r#"{"symbol":"A","price":1,"volume":1,"ts":"2025-11-12T14:00:30.294000Z"}"#,
        ],
    ))
    .expect("process");
    let out = w.on_watermark(T14 + 60_000).expect("watermark");
    let bars = flowgate_sdk::testing::rows(&out.batches);
    assert_eq!(bars.len(), 1);
    assert_eq!(bars[0]["open"], json!(1.0), "{bars:#?}");
    assert_eq!(bars[0]["close"], json!(2.0), "{bars:#?}");
    assert_eq!(bars[0]["window_start"], json!("2025-11-12T14:00:00Z"));
}

/// Keys of several types, nulls among them.
fn keyed() -> SchemaRef {
    schema(&[
        ("symbol", "utf8", true),
        ("n", "int64", true),
        ("at", "timestamp", true),
        ("price", "float64", true),
        ("ts", "timestamp", true),
    ])
}

fn keyed_config(group_by: &str) -> String {
    format!(
        r#"{{"event_time":"ts","size":"1m","group_by":{group_by},"aggregates":{{"n_rows":{{"count":"*"}},"open":{{"first":"price"}},"close":{{"last":"price"}},"total":{{"sum":"price"}}}}}}"#
    )
}

const BEFORE: &[&str] = &[
    r#"{"symbol":"A","n":1,"at":"2025-11-12T10:00:00.000001Z","price":1,"ts":"2025-11-12T14:00:01.000002Z"}"#,
    r#"{"symbol":"B","n":2,"at":"2025-11-12T10:00:00Z","price":2,"ts":"2025-11-12T14:00:02Z"}"#,
    r#"{"symbol":null,"n":null,"at":null,"price":3,"ts":"2025-11-12T14:00:03Z"}"#,
    r#"{"symbol":"A","n":-7,"at":1762941600000,"price":4,"ts":"2025-11-12T14:01:04Z"}"#,
    r#"{"symbol":"A","n":1,"at":"2025-11-12T10:00:00.000001Z","price":5,"ts":"2025-11-12T14:00:01.000001Z"}"#,
];
const AFTER: &[&str] = &[
    r#"{"symbol":"A","n":1,"at":"2025-11-12T10:00:00.000001Z","price":6,"ts":"2025-11-12T14:00:01.000003Z"}"#,
    r#"{"symbol":null,"n":null,"at":null,"price":7,"ts":"2025-11-12T14:00:59Z"}"#,
    r#"{"symbol":"B","n":-7,"at":"2025-11-12T10:00:00Z","price":8,"ts":"2025-11-12T14:01:30Z"}"#,
];

/// Output after `BEFORE`, optionally snapshot → restore into a fresh instance, then `AFTER` and
/// watermarks past both windows.
fn run_keyed(config: &str, restore: bool) -> Vec<Value> {
    let schema = keyed();
    let (mut w, _) = flowgate_sdk::create::<Window>(config, &schema).expect("create");
    w.process(batch(&schema, BEFORE)).expect("process");
    if restore {
        let state = w.snapshot().expect("snapshot");
        let (mut fresh, _) = flowgate_sdk::create::<Window>(config, &schema).expect("create");
        fresh.restore(&state).expect("restore");
        assert_eq!(
            fresh.snapshot().expect("snapshot"),
            state,
            "snapshots are stable"
        );
        w = fresh;
    }
    w.process(batch(&schema, AFTER)).expect("process");
    let mut out = w.on_watermark(T14 + 60_000).expect("watermark").batches;
    out.extend(w.on_watermark(T14 + 120_000).expect("watermark").batches);
    flowgate_sdk::testing::rows(&out)
}

#[test]
fn snapshot_restore_gives_identical_output_for_every_key_type() {
    for group_by in [
        r#"["symbol"]"#,
        r#"["n"]"#,
        r#"["at"]"#,
        r#"["symbol","n","at"]"#,
        r#"[]"#,
    ] {
        let config = keyed_config(group_by);
        let straight = run_keyed(&config, false);
        assert!(straight.len() >= 2, "{group_by}: {straight:#?}");
        assert_eq!(run_keyed(&config, true), straight, "{group_by}");
    }
    // The null key is a group of its own, and µs keys stay distinct.
    let by_at = run_keyed(&keyed_config(r#"["at"]"#), true);
    let first_window: Vec<(Value, Value)> = by_at
        .iter()
        .filter(|r| r["window_start"] == json!("2025-11-12T14:00:00Z"))
        .map(|r| {
            (
                r.get("at").cloned().unwrap_or(Value::Null),
                r["n_rows"].clone(),
            )
        })
        .collect();
    assert_eq!(
        first_window,
        [
            (Value::Null, json!(2)),
            (json!("2025-11-12T10:00:00Z"), json!(1)),
            (json!("2025-11-12T10:00:00.000001Z"), json!(3)),
        ]
    );
}

/// A version-2 snapshot of `run_keyed`'s `BEFORE` with `group_by: [symbol, n, at]`: written by
/// this plugin and checked in, so a change to the snapshot layout fails here.
const GOLDEN_V2: &str = concat!(
    "4647533102000000000280eced85cf660303000000040000000280808080808080888001f09aee85",
    "cf66000280808080808080888001f09aee85cf660002808080808080808880010000020305014102",
    "020682a09fbddad8a10602040000000480808080808080948001d0fbed85cf66e807048080808080",
    "8080f07fd0fbed85cf66d00f04808080808080809880010000040305014202040680a09fbddad8a1",
    "0602040000000280808080808080808001a08bee85cf66000280808080808080808001a08bee85cf",
    "66000280808080808080808001000002c095f585cf660103050141020d0680a09fbddad8a1060204",
    "000000028080808080808090800180d4f585cf6600028080808080808090800180d4f585cf660002",
    "80808080808080908001000002",
);

/// The same state as version 3 (with the definition).
const GOLDEN_V3: &str = concat!(
    "4647533103000000a1016576656e745f74696d653a2074732c2073697a653a20316d2c20736c6964",
    "653a20316d2c2067726f75705f62793a205b73796d626f6c2c206e2c2061745d2c20616767726567",
    "617465733a207b6e5f726f77733a207b636f756e743a202a7d2c206f70656e3a207b66697273743a",
    "2070726963657d2c20636c6f73653a207b6c6173743a2070726963657d2c20746f74616c3a207b73",
    "756d3a2070726963657d7d000280eced85cf660303000000040000000280808080808080888001f0",
    "9aee85cf66000280808080808080888001f09aee85cf660002808080808080808880010000020305",
    "014102020682a09fbddad8a10602040000000480808080808080948001d0fbed85cf66e807048080",
    "8080808080f07fd0fbed85cf66d00f04808080808080809880010000040305014202040680a09fbd",
    "dad8a10602040000000280808080808080808001a08bee85cf66000280808080808080808001a08b",
    "ee85cf66000280808080808080808001000002c095f585cf660103050141020d0680a09fbddad8a1",
    "060204000000028080808080808090800180d4f585cf6600028080808080808090800180d4f585cf",
    "66000280808080808080908001000002",
);

/// The same state as version 4 (packed keys, fixed-size accumulators).
const GOLDEN_V4: &str = concat!(
    "4647533104000000a1016576656e745f74696d653a2074732c2073697a653a20316d2c20736c6964",
    "653a20316d2c2067726f75705f62793a205b73796d626f6c2c206e2c2061745d2c20616767726567",
    "617465733a207b6e5f726f77733a207b636f756e743a202a7d2c206f70656e3a207b66697273743a",
    "2070726963657d2c20636c6f73653a207b6c6173743a2070726963657d2c20746f74616c3a207b73",
    "756d3a2070726963657d7d03045574663805496e7436341554696d657374616d7028c2b5732c2022",
    "5554432229000200bb5d789a01000003000000000000000300000000000000000000000000000000",
    "0000000000000000000001000000000000000000000000000840b8c65d789a010000000000000100",
    "0000000000000000000000000840b8c65d789a010000000000000100000000000000000000000000",
    "08400000000000000000000000000100000000000000180000000101000000410101000000000000",
    "000101e8d3d362430600000000000000000000000000000000000000000002000000000000000000",
    "000000001440e8be5d789a010000e80300000200000000000000000000000000f03fe8be5d789a01",
    "0000d007000002000000000000000000000000001840000000000000000000000000020000000000",
    "0000180000000101000000420102000000000000000100e8d3d36243060000000000000000000000",
    "0000000000000000000001000000000000000000000000000040d0c25d789a010000000000000100",
    "0000000000000000000000000040d0c25d789a010000000000000100000000000000000000000000",
    "0040000000000000000000000000010000000000000060a55e789a01000001000000000000001800",
    "000001010000004101f9ffffffffffffff0100e8d3d3624306000000000000000000000000000000",
    "0000000000000100000000000000000000000000104000b55e789a01000000000000010000000000",
    "0000000000000000104000b55e789a01000000000000010000000000000000000000000010400000",
    "000000000000000000000100000000000000",
);

#[test]
fn state_opened_under_another_definition_is_refused() {
    let (mut w, _) = flowgate_sdk::create::<Window>(BARS, &keyed_ticks()).expect("create");
    w.process(batch(
        &keyed_ticks(),
        &[r#"{"symbol":"A","price":1.0,"volume":1,"ts":"2025-11-12T14:00:01Z"}"#],
    ))
    .expect("process");
    let state = w.snapshot().expect("snapshot");
    for (from, to) in [
        ("\"size\":\"1m\"", "\"size\":\"5m\""),
        ("\"max\":\"price\"", "\"max\":\"volume\""),
    ] {
        assert!(BARS.contains(from), "{from}");
        let changed = BARS.replace(from, to);
        let (mut other, _) =
            flowgate_sdk::create::<Window>(&changed, &keyed_ticks()).expect("create");
        let err = other.restore(&state).expect_err("refused");
        assert!(matches!(err, Error::BadInput(_)), "{err}");
        assert!(
            err.message()
                .contains("window state was written for `event_time: ts, size: 1m")
                && err.message().contains("state: reset"),
            "{err}"
        );
    }
    let (mut same, _) = flowgate_sdk::create::<Window>(BARS, &keyed_ticks()).expect("create");
    same.restore(&state).expect("the same definition restores");
}

/// The state of a step configured `config` after `BEFORE` (the `keyed` schema).
fn state_after_before(config: &str) -> Vec<u8> {
    let schema = keyed();
    let (mut w, _) = flowgate_sdk::create::<Window>(config, &schema).expect("create");
    w.process(batch(&schema, BEFORE)).expect("process");
    w.snapshot().expect("snapshot")
}

#[test]
fn golden_snapshot_still_decodes() {
    use flowgate_sdk::testing::{hex, unhex};
    let config = keyed_config(r#"["symbol","n","at"]"#);
    let schema = keyed();
    let state = state_after_before(&config);
    assert_eq!(hex(&state), GOLDEN_V4, "the snapshot layout changed");

    for (version, golden) in [(2, GOLDEN_V2), (3, GOLDEN_V3), (4, GOLDEN_V4)] {
        let (mut restored, _) = flowgate_sdk::create::<Window>(&config, &schema).expect("create");
        restored.restore(&unhex(golden)).expect("restore");
        // An older state, taken again, is the same state in today's layout.
        assert_eq!(
            hex(&restored.snapshot().expect("snapshot")),
            GOLDEN_V4,
            "version {version}"
        );
        restored.process(batch(&schema, AFTER)).expect("process");
        let mut out = restored
            .on_watermark(T14 + 60_000)
            .expect("watermark")
            .batches;
        out.extend(
            restored
                .on_watermark(T14 + 120_000)
                .expect("watermark")
                .batches,
        );
        assert_eq!(
            flowgate_sdk::testing::rows(&out),
            run_keyed(&config, false),
            "version {version}"
        );
    }
}

/// A state cut short, padded, or with a key that is not one is refused as bad input, saying
/// what is wrong, and never read as some other state or a panic.
#[test]
fn a_damaged_state_is_refused_as_bad_input() {
    let config = keyed_config(r#"["symbol","n","at"]"#);
    let schema = keyed();
    let state = state_after_before(&config);
    let fresh = || {
        flowgate_sdk::create::<Window>(&config, &schema)
            .expect("create")
            .0
    };
    let refused = |bytes: &[u8]| -> String {
        let err = fresh().restore(bytes).expect_err("refused");
        assert!(matches!(err, Error::BadInput(_)), "{err}");
        err.message().to_string()
    };
    // Past the SDK's header, every cut is refused.
    for cut in flowgate_sdk::STATE_HEADER..state.len() {
        let why = refused(&state[..cut]);
        assert!(
            why.contains("window state is corrupt"),
            "cut at {cut}: {why}"
        );
    }
    let mut padded = state.clone();
    padded.push(0);
    assert!(refused(&padded).contains("1 bytes past its last window"));
    // The first group's key (after the SDK's header, the head, the first window's start and
    // group count, and the key's length): its first column's tag made one no key has, then its
    // string's length made longer than the key.
    let (_, rest) = postcard::take_from_bytes::<crate::Head>(&state[flowgate_sdk::STATE_HEADER..])
        .expect("head");
    let key = state.len() - rest.len() + 16 + 4;
    for (offset, byte) in [(0, 7u8), (1, 0xff)] {
        let mut damaged = state.clone();
        damaged[key + offset] = byte;
        let why = refused(&damaged);
        assert!(
            why.contains("a group key of window 2025-11-12T14:00"),
            "{why}"
        );
    }
}

/// A state's keys were packed for its `group_by` columns' types then; a step whose input has
/// other types (µs timestamps become ms) gets them converted through their values, as a
/// version-3 state's are, or refused when they do not fit: never read as other keys.
#[test]
fn keys_packed_for_other_column_types_are_converted_or_refused_never_misread() {
    let config = keyed_config(r#"["at"]"#);
    let micros = keyed();
    let millis = schema(&[
        ("symbol", "utf8", true),
        ("n", "int64", true),
        ("at", "timestamp_ms", true),
        ("price", "float64", true),
        ("ts", "timestamp", true),
    ]);
    let first: &[&str] = &[
        r#"{"symbol":"A","n":1,"at":"2025-11-12T10:00:00Z","price":1,"ts":"2025-11-12T14:00:01Z"}"#,
        r#"{"symbol":"B","n":2,"at":"2025-11-12T10:00:01Z","price":2,"ts":"2025-11-12T14:00:02Z"}"#,
    ];
    let then: &[&str] = &[
        r#"{"symbol":"A","n":1,"at":"2025-11-12T10:00:00Z","price":3,"ts":"2025-11-12T14:00:03Z"}"#,
    ];
    let create = |schema: &SchemaRef| {
        flowgate_sdk::create::<Window>(&config, schema)
            .expect("create")
            .0
    };
    let mut taken = create(&micros);
    taken.process(batch(&micros, first)).expect("process");
    let state = taken.snapshot().expect("snapshot");

    let mut converted = create(&millis);
    converted.restore(&state).expect("converted to ms keys");
    let mut straight = create(&millis);
    straight.process(batch(&millis, first)).expect("process");
    let mut outputs = Vec::new();
    for w in [&mut converted, &mut straight] {
        w.process(batch(&millis, then)).expect("process");
        let out = w.on_watermark(T14 + 60_000).expect("watermark").batches;
        outputs.push(flowgate_sdk::testing::rows(&out));
    }
    assert_eq!(outputs[0].len(), 2, "{:#?}", outputs[0]);
    assert_eq!(outputs[0], outputs[1]);

    // A microsecond no millisecond timestamp holds.
    let mut fine = create(&micros);
    fine.process(batch(
        &micros,
        &[r#"{"symbol":"A","n":1,"at":"2025-11-12T10:00:00.000001Z","price":1,"ts":"2025-11-12T14:00:01Z"}"#],
    ))
    .expect("process");
    let err = create(&millis)
        .restore(&fine.snapshot().expect("snapshot"))
        .expect_err("refused");
    assert!(matches!(err, Error::BadInput(_)), "{err}");
}

#[test]
fn state_of_an_older_version_is_refused_by_name() {
    let (mut w, _) = flowgate_sdk::create::<Window>(BARS, &keyed_ticks()).expect("create");
    let mut v1 = b"FGS1".to_vec();
    v1.extend_from_slice(&1u32.to_le_bytes());
    v1.extend_from_slice(&[0, 0]);
    let err = w.restore(&v1).expect_err("version 1");
    assert!(matches!(err, Error::BadInput(_)), "{err}");
    assert!(
        err.message()
            .contains("version 1 was written by an older plugin version")
            && err.message().contains("reads state versions 2 to 4"),
        "{err}"
    );
}

fn keyed_ticks() -> SchemaRef {
    schema(&[
        ("symbol", "utf8", true),
        ("price", "float64", true),
        ("volume", "int64", true),
        ("ts", "timestamp", true),
    ])
}

/// Every aggregate over every integer, float and timestamp type, read without arrow's `cast`:
/// values [3, 1, null, 2] at rising times in one window. `first`/`last`/`min`/`max` keep the
/// column's type, `sum` is Int64 (Float64 for floats), `avg` Float64.
#[test]
fn every_numeric_input_type_aggregates_in_its_own_type() {
    use arrow::array::{
        ArrayRef, Float16Array, Float32Array, Float64Array, Int8Array, Int16Array, Int32Array,
        Int64Array, TimestampMicrosecondArray, TimestampNanosecondArray, TimestampSecondArray,
        UInt8Array, UInt16Array, UInt32Array, UInt64Array,
    };
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    const CONFIG: &str = r#"{"event_time":"ts","size":"1m","aggregates":{
        "first":{"first":"v"},"last":{"last":"v"},"min":{"min":"v"},"max":{"max":"v"},
        "sum":{"sum":"v"},"count":{"count":"v"},"avg":{"avg":"v"}}}"#;
    let v = [Some(3), Some(1), None, Some(2)];
    let f = |x: Option<i32>| x.map(f64::from);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int8Array::from_iter(v.map(|x| x.map(|x| x as i8)))),
        Arc::new(Int16Array::from_iter(v.map(|x| x.map(|x| x as i16)))),
        Arc::new(Int32Array::from_iter(v)),
        Arc::new(Int64Array::from_iter(v.map(|x| x.map(i64::from)))),
        Arc::new(UInt8Array::from_iter(v.map(|x| x.map(|x| x as u8)))),
        Arc::new(UInt16Array::from_iter(v.map(|x| x.map(|x| x as u16)))),
        Arc::new(UInt32Array::from_iter(v.map(|x| x.map(|x| x as u32)))),
        Arc::new(UInt64Array::from_iter(v.map(|x| x.map(|x| x as u64)))),
        Arc::new(TimestampSecondArray::from_iter(v.map(|x| x.map(i64::from)))),
        Arc::new(
            TimestampMicrosecondArray::from_iter(v.map(|x| x.map(i64::from))).with_timezone("UTC"),
        ),
        Arc::new(TimestampNanosecondArray::from_iter(
            v.map(|x| x.map(i64::from)),
        )),
        Arc::new(Float16Array::from_iter(v.map(|x| f(x).map(half_from_f64)))),
        Arc::new(Float32Array::from_iter(v.map(|x| f(x).map(|x| x as f32)))),
        Arc::new(Float64Array::from_iter(v.map(f))),
    ];
    let ts = Arc::new(
        TimestampMicrosecondArray::from_iter_values((0..4).map(|i| T14 * 1_000 + i * 1_000_000))
            .with_timezone("UTC"),
    ) as ArrayRef;
    for column in columns {
        let data_type = column.data_type().clone();
        let input = Arc::new(Schema::new(vec![
            Field::new("v", data_type.clone(), true),
            Field::new("ts", ts.data_type().clone(), false),
        ]));
        let (mut w, out) = flowgate_sdk::create::<Window>(CONFIG, &input).expect("create");
        let batch =
            RecordBatch::try_new(input.clone(), vec![column.clone(), ts.clone()]).expect("batch");
        assert!(w.process(batch).expect("process").batches.is_empty());
        let bars = w.on_watermark(T14 + 60_000).expect("watermark").batches;
        assert_eq!(bars.len(), 1, "{data_type}");
        let bar = &bars[0];
        assert_eq!(bar.schema(), out, "{data_type}");
        let float = data_type.is_floating();
        let sum_type = if float {
            DataType::Float64
        } else {
            DataType::Int64
        };
        for (name, want_type) in [
            ("first", &data_type),
            ("last", &data_type),
            ("min", &data_type),
            ("max", &data_type),
            ("sum", &sum_type),
        ] {
            assert_eq!(
                out.field_with_name(name).expect(name).data_type(),
                want_type
            );
        }
        // Compare through Float64 (every value here is a small integer).
        let value = |name: &str| -> f64 {
            let column = bar.column_by_name(name).expect(name);
            let column = flowgate_sdk::columns::float64_column(
                &RecordBatch::try_new(
                    Arc::new(Schema::new(vec![Field::new(
                        "x",
                        column.data_type().clone(),
                        true,
                    )])),
                    vec![column.clone()],
                )
                .expect("batch"),
                0,
            )
            .expect("float");
            column.value(0)
        };
        let got: Vec<f64> = ["first", "last", "min", "max", "sum", "count", "avg"]
            .iter()
            .map(|n| value(n))
            .collect();
        assert_eq!(got, [3.0, 2.0, 1.0, 3.0, 6.0, 3.0, 2.0], "{data_type}");
    }
}

fn half_from_f64(x: f64) -> crate::F16 {
    crate::F16::from_f64(x)
}

/// A `UInt64` value past `i64::MAX` is skipped by the value aggregates (`count` still counts
/// it; through arrow's `cast`, before, it was aggregated as 0), and a decimal column is refused:
/// its fraction would be cut off.
#[test]
fn oversized_unsigned_values_are_skipped_and_decimals_refused() {
    use arrow::array::{ArrayRef, TimestampMicrosecondArray, UInt64Array};
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    const CONFIG: &str = r#"{"event_time":"ts","size":"1m","aggregates":{
        "max":{"max":"v"},"min":{"min":"v"},"avg":{"avg":"v"},"n":{"count":"v"}}}"#;
    let ts = Arc::new(
        TimestampMicrosecondArray::from_iter_values([T14 * 1_000, T14 * 1_000 + 1])
            .with_timezone("UTC"),
    ) as ArrayRef;
    let input = Arc::new(Schema::new(vec![
        Field::new("v", DataType::UInt64, true),
        Field::new("ts", ts.data_type().clone(), false),
    ]));
    let (mut w, _) = flowgate_sdk::create::<Window>(CONFIG, &input).expect("create");
    let v = Arc::new(UInt64Array::from(vec![7, u64::MAX])) as ArrayRef;
    w.process(RecordBatch::try_new(input, vec![v, ts.clone()]).expect("batch"))
        .expect("process");
    let bars = flowgate_sdk::testing::rows(&w.on_watermark(T14 + 60_000).expect("wm").batches);
    assert_eq!(bars[0]["max"], json!(7), "{bars:#?}");
    assert_eq!(bars[0]["min"], json!(7), "{bars:#?}");
    assert_eq!(bars[0]["avg"], json!(7.0), "{bars:#?}");
    assert_eq!(bars[0]["n"], json!(2), "{bars:#?}");

    let decimals = Arc::new(Schema::new(vec![
        Field::new("v", DataType::Decimal128(10, 2), true),
        Field::new("ts", ts.data_type().clone(), false),
    ]));
    let err = flowgate_sdk::create::<Window>(CONFIG, &decimals)
        .err()
        .expect("decimals refused");
    assert!(
        err.to_string()
            .contains("`aggregates.max`: column `v` is Decimal128(10, 2); aggregates take"),
        "{err}"
    );
}

#[test]
fn rows_in_one_batch_make_the_bars_they_make_one_by_one() {
    // Event times jump back and forth across slides, on and next to their edges, before and
    // after 1970; five aggregates read one column. Whatever `process` shares between the rows
    // of a batch (runs of rows in one window, the columns it reads), the bars must equal those
    // of the same rows sent one per batch.
    let schema = flowgate_sdk::testing::schema(&[
        ("symbol", "utf8", false),
        ("v", "float64", true),
        ("ts", "int64", false),
    ]);
    let config = r#"{"event_time":"ts","size":"1m","slide":"20s","group_by":["symbol"],
        "aggregates":{"open":{"first":"v"},"close":{"last":"v"},"low":{"min":"v"},
        "high":{"max":"v"},"total":{"sum":"v"},"mean":{"avg":"v"},"n":{"count":"v"},
        "rows":{"count":"*"}}}"#;
    let edges = [
        -60_001_i64,
        -1,
        0,
        19_999,
        20_000,
        39_999,
        40_000,
        59_999,
        60_000,
        60_001,
    ];
    // First a climb over each slide's edge (the row before it, on it, after it).
    let mut lines: Vec<String> = [-20_000_i64, 0, 20_000, 40_000, 60_000]
        .iter()
        .flat_map(|e| [e - 1, *e, e + 1])
        .map(|ts| format!(r#"{{"symbol":"S0","v":1.5,"ts":{ts}}}"#))
        .collect();
    let mut x: i64 = 7;
    for i in 0..400_i64 {
        x = (x * 1_103_515_245 + 12_345) % 2_147_483_648;
        let ts = if i % 3 == 0 {
            edges[(x % edges.len() as i64) as usize] + 1_762_956_000_000 * (i % 2)
        } else {
            1_762_956_000_000 + x % 300_000 - 150_000
        };
        let v = if i % 17 == 0 {
            "null".to_string()
        } else {
            format!("{}", (x % 1000) as f64 / 4.0)
        };
        lines.push(format!(r#"{{"symbol":"S{}","v":{v},"ts":{ts}}}"#, x % 3));
    }
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let bars = |batches: Vec<RecordBatch>| {
        let (mut whole, _) = flowgate_sdk::create::<Window>(config, &schema).expect("config");
        for batch in batches {
            let out = whole.process(batch).expect("process");
            assert!(out.rejected.is_empty() && out.batches.is_empty());
        }
        whole.on_watermark(i64::MAX / 2).expect("watermark").batches
    };
    let together = bars(vec![flowgate_sdk::testing::batch(&schema, &lines)]);
    let apart = bars(
        lines
            .iter()
            .map(|l| flowgate_sdk::testing::batch(&schema, &[l]))
            .collect(),
    );
    assert_eq!(together.len(), 1);
    assert!(together[0].num_rows() > 50, "{}", together[0].num_rows());
    assert_eq!(together, apart);
}

#[test]
fn groups_past_one_chunk_of_the_arena_keep_their_own_bars_through_a_restore() {
    // 700 symbols in one window: the accumulators span three chunks of 256 groups. Each
    // symbol's bar must hold exactly its own rows, taken before and after a snapshot that is
    // restored into a fresh instance (which reserves its groups up front).
    let schema = flowgate_sdk::testing::schema(&[
        ("symbol", "utf8", false),
        ("v", "float64", false),
        ("ts", "int64", false),
    ]);
    let config = r#"{"event_time":"ts","size":"1m","group_by":["symbol"],
        "aggregates":{"open":{"first":"v"},"close":{"last":"v"},"low":{"min":"v"},
        "high":{"max":"v"},"total":{"sum":"v"},"rows":{"count":"*"}}}"#;
    const SYMBOLS: i64 = 700;
    const BASE: i64 = 1_762_956_000_000;
    // Row i: symbol (i * 7919) mod 700 (every symbol three times, in scattered order), value i,
    // event time BASE + i.
    let line = |i: i64| {
        format!(
            r#"{{"symbol":"S{}","v":{i},"ts":{}}}"#,
            (i * 7919) % SYMBOLS,
            BASE + i
        )
    };
    let lines: Vec<String> = (0..3 * SYMBOLS).map(line).collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let (first_half, second_half) = lines.split_at(lines.len() / 2);
    let (mut w, _) = flowgate_sdk::create::<Window>(config, &schema).expect("config");
    w.process(flowgate_sdk::testing::batch(&schema, first_half))
        .expect("process");
    let state = w.snapshot().expect("snapshot");
    let (mut w, _) = flowgate_sdk::create::<Window>(config, &schema).expect("config");
    w.restore(&state).expect("restore");
    w.process(flowgate_sdk::testing::batch(&schema, second_half))
        .expect("process");
    let out = w.on_watermark(BASE + 120_000).expect("watermark").batches;
    let bars = flowgate_sdk::testing::rows(&out);
    assert_eq!(bars.len(), SYMBOLS as usize);
    for bar in &bars {
        let symbol: i64 = bar["symbol"].as_str().expect("symbol")[1..]
            .parse()
            .expect("number");
        let mine: Vec<f64> = (0..3 * SYMBOLS)
            .filter(|i| (i * 7919) % SYMBOLS == symbol)
            .map(|i| i as f64)
            .collect();
        assert_eq!(mine.len(), 3);
        let expected = json!({
            "open": mine[0],
            "close": mine[2],
            "low": mine[0],
            "high": mine[2],
            "total": mine.iter().sum::<f64>(),
            "rows": 3,
        });
        for (name, value) in expected.as_object().expect("object") {
            assert_eq!(
                bar[name].as_f64(),
                value.as_f64(),
                "S{symbol} `{name}`: {bar}"
            );
        }
    }
}

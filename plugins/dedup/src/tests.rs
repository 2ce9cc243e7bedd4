use std::sync::Arc;

use arrow::array::{StringArray, TimestampMicrosecondArray};
use flowgate_sdk::prelude::*;
use flowgate_sdk::testing::lines_with;

use crate::Dedup;
use crate::scenarios::scenarios;

fn run(name: &str) -> Vec<String> {
    let scenario = scenarios()
        .into_iter()
        .find(|s| s.name == name)
        .expect("scenario");
    scenario.run_native::<Dedup>()
}

fn prices(lines: &[&str]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l.split_once(" out ").expect("out line").1).expect("json");
            v["price"].to_string()
        })
        .collect()
}

#[test]
fn duplicates_within_and_across_batches_are_dropped() {
    let t = run("dedup");
    assert_eq!(
        prices(&lines_with(&t, "step 0 out")),
        ["1.0", "3.0", "4.0"],
        "{t:#?}"
    );
    assert_eq!(
        lines_with(&t, "step 0 rejected"),
        ["step 0 rejected 4: event time is null"]
    );
    assert_eq!(prices(&lines_with(&t, "step 1 out")), ["7.0"], "{t:#?}");
    assert!(lines_with(&t, "step 2 ").is_empty());
}

#[test]
fn state_survives_snapshot_and_restore() {
    let t = run("dedup");
    assert_eq!(prices(&lines_with(&t, "step 4 out")), ["9.0"], "{t:#?}");
}

#[test]
fn keys_expire_with_the_watermark_and_null_is_a_key_value() {
    let t = run("dedup");
    assert_eq!(
        prices(&lines_with(&t, "step 6 out")),
        ["10.0", "11.0", "13.0"],
        "{t:#?}"
    );
}

#[test]
fn config_errors_name_the_key() {
    let expect = [
        ("no key", "`key`: name at least one column"),
        (
            "missing key column",
            "`key[1]`: column `tss` is not in the input",
        ),
        (
            "event time not a time",
            "`event_time`: column `symbol` is Utf8, not a timestamp",
        ),
        ("zero retention", "`retention`: must be greater than zero"),
        ("missing retention", "missing field `retention`"),
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
fn state_stays_bounded_as_the_watermark_advances() {
    let schema =
        flowgate_sdk::testing::schema(&[("symbol", "utf8", true), ("ts", "timestamp", false)]);
    let config = r#"{"key":["symbol","ts"],"event_time":"ts","retention":"10s"}"#;
    let (mut dedup, _) =
        <Dedup as Transform>::create(flowgate_sdk::config::parse(config).expect("cfg"), &schema)
            .expect("create");
    let start = 1_700_000_000_000i64;
    let mut max_live = 0;
    // 200 batches of 1,000 distinct keys, one second of event time each.
    for b in 0..200i64 {
        let ts: Vec<i64> = (0..1000)
            .map(|i| (start + b * 1000 + i % 1000) * 1000)
            .collect();
        let symbols: Vec<String> = (0..1000).map(|i| format!("S{i}")).collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(symbols)),
                Arc::new(TimestampMicrosecondArray::from(ts).with_timezone("UTC")),
            ],
        )
        .expect("batch");
        assert_eq!(dedup.process(batch).expect("process").num_rows(), 1000);
        dedup.on_watermark(start + b * 1000).expect("watermark");
        max_live = max_live.max(dedup.live_keys());
    }
    // Retention 10s at 1,000 keys/s: about 11k live keys, never the 200k seen.
    assert!(max_live <= 13_000, "live keys grew to {max_live}");
    assert!(dedup.live_keys() >= 10_000);
}

const KEY_TS: &str = r#"{"key":["symbol","ts"],"event_time":"ts","retention":"1m"}"#;

fn symbols_out(out: &Output) -> Vec<String> {
    flowgate_sdk::testing::rows(&out.batches)
        .iter()
        .map(|r| format!("{} {}", r["symbol"], r["ts"]))
        .collect()
}

#[test]
fn ticks_a_microsecond_apart_are_different_keys() {
    let schema =
        flowgate_sdk::testing::schema(&[("symbol", "utf8", true), ("ts", "timestamp", true)]);
    let (mut dedup, _) = flowgate_sdk::create::<Dedup>(KEY_TS, &schema).expect("create");
    let out = dedup
        .process(flowgate_sdk::testing::batch(
            &schema,
            &[
                r#"{"symbol":"A","ts":"2025-11-12T14:38:30.294000Z"}"#,
                r#"{"symbol":"A","ts":"2025-11-12T14:38:30.294001Z"}"#,
                r#"{"symbol":"A","ts":"2025-11-12T14:38:30.294001Z"}"#,
            ],
        ))
        .expect("process");
    assert_eq!(
        symbols_out(&out),
        [
            r#""A" "2025-11-12T14:38:30.294Z""#,
            r#""A" "2025-11-12T14:38:30.294001Z""#
        ]
    );
    let state = dedup.snapshot().expect("snapshot");
    let (mut restored, _) = flowgate_sdk::create::<Dedup>(KEY_TS, &schema).expect("create");
    restored.restore(&state).expect("restore");
    let again = flowgate_sdk::testing::batch(
        &schema,
        &[
            r#"{"symbol":"A","ts":"2025-11-12T14:38:30.294001Z"}"#,
            r#"{"symbol":"A","ts":"2025-11-12T14:38:30.294002Z"}"#,
        ],
    );
    assert_eq!(
        symbols_out(&restored.process(again).expect("process")),
        [r#""A" "2025-11-12T14:38:30.294002Z""#]
    );
}

#[test]
fn keys_saved_from_a_millisecond_column_match_a_microsecond_one() {
    // State written while the host decoded timestamps in ms still matches after it moved to µs.
    let ms =
        flowgate_sdk::testing::schema(&[("symbol", "utf8", true), ("ts", "timestamp_ms", true)]);
    let us = flowgate_sdk::testing::schema(&[("symbol", "utf8", true), ("ts", "timestamp", true)]);
    let tick = r#"{"symbol":"A","ts":"2025-11-12T14:38:30.294Z"}"#;
    let (mut old, _) = flowgate_sdk::create::<Dedup>(KEY_TS, &ms).expect("create");
    assert_eq!(
        old.process(flowgate_sdk::testing::batch(&ms, &[tick]))
            .expect("process")
            .num_rows(),
        1
    );
    let (mut new, _) = flowgate_sdk::create::<Dedup>(KEY_TS, &us).expect("create");
    new.restore(&old.snapshot().expect("snapshot"))
        .expect("restore");
    let out = new
        .process(flowgate_sdk::testing::batch(
            &us,
            &[tick, r#"{"symbol":"A","ts":"2025-11-12T14:38:30.294001Z"}"#],
        ))
        .expect("process");
    assert_eq!(symbols_out(&out), [r#""A" "2025-11-12T14:38:30.294001Z""#]);
}

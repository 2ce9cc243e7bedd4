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
fn a_restore_from_a_full_snapshot_and_its_deltas_remembers_what_the_instance_did() {
    let t = run("dedup, restored from checkpoint deltas");
    assert_eq!(
        lines_with(&t, "checkpoints kept"),
        [
            "step 1 checkpoints kept: 1",
            "step 3 checkpoints kept: 2",
            "step 6 checkpoints kept: 3"
        ],
        "{t:#?}"
    );
    // A and B at 14:00:00 are forgotten (the watermark in the second delta); C (first delta),
    // D and A at 14:01 (second delta) are remembered: only E and the forgotten ones pass.
    assert_eq!(
        prices(&lines_with(&t, "step 8 out")),
        ["7.0", "8.0", "12.0"],
        "{t:#?}"
    );
}

#[test]
fn a_delta_holds_only_the_keys_remembered_since_the_last_one() {
    let schema = ids();
    let (mut dedup, _) = flowgate_sdk::create::<Dedup>(
        r#"{"key":["id"],"event_time":"ts","retention":"10m"}"#,
        &schema,
    )
    .expect("create");
    let batch = |from: usize, n: usize| {
        let lines: Vec<String> = (from..from + n)
            .map(|i| tick(&format!("k{i}"), 0, 0))
            .collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        flowgate_sdk::testing::batch(&schema, &lines)
    };
    assert!(
        dedup.snapshot_delta().unwrap().is_none(),
        "the first time it cannot tell"
    );
    dedup.process(batch(0, 10_000)).unwrap();
    let first = dedup.snapshot_delta().unwrap().expect("a delta");
    dedup.process(batch(10_000, 100)).unwrap();
    let second = dedup.snapshot_delta().unwrap().expect("a delta");
    let full = dedup.snapshot().unwrap();
    assert!(
        first.len() > 10_000 * 9,
        "{} bytes for 10,000 keys",
        first.len()
    );
    assert!(
        second.len() < first.len() / 50,
        "100 new keys: {} bytes, against {} for 10,000 (full: {})",
        second.len(),
        first.len(),
        full.len()
    );
}

#[test]
fn a_host_that_restores_but_never_asks_for_deltas_does_not_grow_the_list_forever() {
    let schema = ids();
    let config = r#"{"key":["id"],"event_time":"ts","retention":"1m"}"#;
    let (mut dedup, _) = flowgate_sdk::create::<Dedup>(config, &schema).expect("create");
    let empty = dedup.snapshot().unwrap();
    dedup.restore(&empty).unwrap();
    for minute in 0..20 {
        let lines: Vec<String> = (0..10_000)
            .map(|i| tick(&format!("m{minute}k{i}"), minute, 0))
            .collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        dedup
            .process(flowgate_sdk::testing::batch(&schema, &lines))
            .unwrap();
        dedup
            .on_watermark(chrono_ms(&format!("2025-11-12T14:{minute:02}:00Z")))
            .unwrap();
    }
    // 200,000 keys went by with at most 30,000 live: the list was dropped on the way, and the
    // next checkpoint is a full one.
    assert!(dedup.snapshot_delta().unwrap().is_none());
    assert!(dedup.snapshot_delta().unwrap().is_some(), "tracking again");
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

fn ids() -> SchemaRef {
    flowgate_sdk::testing::schema(&[("id", "utf8", true), ("ts", "timestamp", true)])
}

fn tick(id: &str, minute: i64, second: i64) -> String {
    format!(r#"{{"id":"{id}","ts":"2025-11-12T14:{minute:02}:{second:02}Z"}}"#)
}

fn ids_out(out: &Output) -> Vec<String> {
    flowgate_sdk::testing::rows(&out.batches)
        .iter()
        .map(|r| format!("{} {}", r["id"].as_str().unwrap_or("?"), r["ts"]))
        .collect()
}

#[test]
fn what_passes_does_not_depend_on_how_rows_are_batched() {
    // Key [id], retention 10m, watermark delay 0: A at 00:00, B at 00:20, A again at 00:21,
    // 21 minutes after the first A: a new row, whether the three come in one batch or one by one
    // (the host hands the watermark after each batch).
    let config = r#"{"key":["id"],"event_time":"ts","retention":"10m"}"#;
    let rows = [tick("A", 0, 0), tick("B", 20, 0), tick("A", 21, 0)];
    let (mut together, _) = flowgate_sdk::create::<Dedup>(config, &ids()).expect("create");
    let one =
        flowgate_sdk::testing::batch(&ids(), &rows.iter().map(String::as_str).collect::<Vec<_>>());
    let all = ids_out(&together.process(one).expect("process"));
    let (mut apart, _) = flowgate_sdk::create::<Dedup>(config, &ids()).expect("create");
    let mut each = Vec::new();
    for row in &rows {
        let out = apart
            .process(flowgate_sdk::testing::batch(&ids(), &[row.as_str()]))
            .expect("process");
        each.extend(ids_out(&out));
        let t: serde_json::Value = serde_json::from_str(row).expect("json");
        let ms = chrono_ms(t["ts"].as_str().expect("ts"));
        apart.on_watermark(ms).expect("watermark");
    }
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(all, each);
}

/// Epoch ms of `2025-11-12THH:MM:SSZ`.
/// A step (the concrete type, to look at its keys) that processed `rows`.
fn probe(config: &str, rows: &[&str]) -> Dedup {
    let (mut step, _) =
        <Dedup as Transform>::create(flowgate_sdk::config::parse(config).expect("cfg"), &ids())
            .expect("create");
    step.process(flowgate_sdk::testing::batch(&ids(), rows))
        .expect("process");
    step
}

fn chrono_ms(text: &str) -> i64 {
    let part = |range: std::ops::Range<usize>| -> i64 { text[range].parse().expect("number") };
    1_762_905_600_000 + ((part(11..13) * 60 + part(14..16)) * 60 + part(17..19)) * 1000
}

/// A step with `retention`, restored from `state` (taken from another step), processing `rows`.
fn restored(config: &str, state: &[u8], rows: &[String]) -> Result<Vec<String>> {
    let (mut step, _) = flowgate_sdk::create::<Dedup>(config, &ids()).expect("create");
    step.restore(state)?;
    let out = step.process(flowgate_sdk::testing::batch(
        &ids(),
        &rows.iter().map(String::as_str).collect::<Vec<_>>(),
    ))?;
    Ok(ids_out(&out))
}

#[test]
fn a_changed_retention_restores_the_keys_with_their_own_event_times() {
    let ten = r#"{"key":["id"],"event_time":"ts","retention":"10m"}"#;
    let (mut first, _) = flowgate_sdk::create::<Dedup>(ten, &ids()).expect("create");
    first
        .process(flowgate_sdk::testing::batch(
            &ids(),
            &[&tick("A", 0, 0), &tick("B", 5, 0)],
        ))
        .expect("process");
    first
        .on_watermark(chrono_ms("2025-11-12T14:05:00Z"))
        .expect("watermark");
    let state = first.snapshot().expect("snapshot");
    // Shorter: 10m → 5m. A copy of B (first seen 14:05) at 14:09 is still within 5m: dropped;
    // A (first seen 14:00) at 14:06 is past 5m: a new row.
    let five = r#"{"key":["id"],"event_time":"ts","retention":"5m"}"#;
    let out = restored(five, &state, &[tick("B", 9, 0), tick("A", 6, 0)]).expect("restore");
    assert_eq!(out, [r#"A "2025-11-12T14:06:00Z""#]);
    // Longer: 10m → 11m. A copy of A at 14:10:30 is within 11m of 14:00: dropped.
    let eleven = r#"{"key":["id"],"event_time":"ts","retention":"11m"}"#;
    let out = restored(eleven, &state, &[tick("A", 10, 30)]).expect("restore");
    assert!(out.is_empty(), "{out:?}");
    // And the keys are forgotten when the watermark passes first + 11m, not kept forever.
    let (mut longer, _) =
        <Dedup as Transform>::create(flowgate_sdk::config::parse(eleven).expect("cfg"), &ids())
            .expect("create");
    // The framed snapshot: 8 header bytes (magic, state version), then the body.
    Transform::restore(&mut longer, Dedup::STATE_VERSION, &state[8..]).expect("restore");
    assert_eq!(longer.live_keys(), 2);
    Transform::on_watermark(&mut longer, chrono_ms("2025-11-12T14:30:00Z")).expect("watermark");
    assert_eq!(longer.live_keys(), 0);
}

#[test]
fn state_of_another_key_or_event_time_is_refused() {
    let (mut first, _) = flowgate_sdk::create::<Dedup>(
        r#"{"key":["id"],"event_time":"ts","retention":"10m"}"#,
        &ids(),
    )
    .expect("create");
    first
        .process(flowgate_sdk::testing::batch(&ids(), &[&tick("A", 0, 0)]))
        .expect("process");
    let state = first.snapshot().expect("snapshot");
    let other = r#"{"key":["id","ts"],"event_time":"ts","retention":"10m"}"#;
    let refused = restored(other, &state, &[])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        refused.contains("dedup state was written for key [\"id\"]"),
        "{refused}"
    );
    assert!(refused.contains("state: reset"), "{refused}");
}

#[test]
fn state_version_1_is_read_with_the_steps_retention() {
    // Version 1: watermark, then (bucket, hashes) with buckets of retention / 8.
    let config = r#"{"key":["id"],"event_time":"ts","retention":"8m"}"#;
    let probe = probe(config, &[&tick("A", 0, 0)]);
    let hash = probe.store.iter(480_000).next().expect("a key").0;
    let first = chrono_ms("2025-11-12T14:00:00Z");
    let bucket = (first + 480_000) / 60_000;
    let mut v1 = b"FGS1".to_vec();
    v1.extend(1u32.to_le_bytes());
    v1.extend(postcard::to_allocvec(&(i64::MIN, vec![(bucket, vec![hash])])).expect("encode"));
    let out = restored(config, &v1, &[tick("A", 7, 0), tick("A", 9, 30)]).expect("restore v1");
    assert_eq!(out, [r#"A "2025-11-12T14:09:30Z""#]);
}

#[test]
fn a_key_remembered_twice_in_one_delta_is_restored_with_its_later_expiry() {
    // Retention 1m: A at 14:00 passes and is remembered until 14:01; A at 14:02 passes again
    // (past the retention of the first) and is remembered until 14:03. Both are in one delta,
    // in the order remembered: applied in that order, a restored step drops A at 14:02:30,
    // which the first expiry alone would have let through.
    let config = r#"{"key":["id"],"event_time":"ts","retention":"1m"}"#;
    let (mut live, _) = flowgate_sdk::create::<Dedup>(config, &ids()).expect("create");
    let (mut restored, _) = flowgate_sdk::create::<Dedup>(config, &ids()).expect("create");
    let base = live.snapshot().unwrap();
    restored.restore(&base).unwrap();
    live.restore(&base).unwrap();
    let batch = |rows: &[String]| {
        flowgate_sdk::testing::batch(&ids(), &rows.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = live
        .process(batch(&[tick("A", 0, 0), tick("A", 2, 0)]))
        .unwrap();
    assert_eq!(ids_out(&out).len(), 2, "both pass: {:?}", ids_out(&out));
    let delta = live.snapshot_delta().unwrap().expect("a delta");
    restored.restore_delta(&delta).unwrap();
    for step in [&mut live, &mut restored] {
        let out = step.process(batch(&[tick("A", 2, 30)])).unwrap();
        assert!(ids_out(&out).is_empty(), "{:?}", ids_out(&out));
    }
}

#[test]
fn state_and_deltas_of_version_2_are_still_read() {
    // Version 2 was all postcard: (key, event_time, watermark, keys) and (watermark, keys).
    let config = r#"{"key":["id"],"event_time":"ts","retention":"10m"}"#;
    let probe = probe(config, &[&tick("A", 0, 0), &tick("B", 1, 0)]);
    let hash = |first: i64| {
        probe
            .store
            .iter(600_000)
            .find(|&(_, f)| f == first)
            .map(|(h, _)| h)
            .expect("a key")
    };
    let (a, b) = (
        chrono_ms("2025-11-12T14:00:00Z"),
        chrono_ms("2025-11-12T14:01:00Z"),
    );
    let frame = |magic: &[u8], body: Vec<u8>| {
        let mut out = magic.to_vec();
        out.extend(2u32.to_le_bytes());
        out.extend(body);
        out
    };
    let state = frame(
        b"FGS1",
        postcard::to_allocvec(&(vec!["id"], "ts", i64::MIN, vec![(hash(a), a)])).expect("encode"),
    );
    let delta = frame(
        b"FGD1",
        postcard::to_allocvec(&(i64::MIN, vec![(hash(b), b)])).expect("encode"),
    );
    let (mut step, _) = flowgate_sdk::create::<Dedup>(config, &ids()).expect("create");
    step.restore(&state).expect("restore v2");
    step.restore_delta(&delta).expect("restore v2 delta");
    let out = step
        .process(flowgate_sdk::testing::batch(
            &ids(),
            &[&tick("A", 0, 0), &tick("B", 1, 0), &tick("C", 1, 0)],
        ))
        .expect("process");
    assert_eq!(ids_out(&out), [r#"C "2025-11-12T14:01:00Z""#]);
}

#[test]
fn a_cut_or_padded_state_or_delta_is_refused_as_corrupt() {
    let config = r#"{"key":["id"],"event_time":"ts","retention":"10m"}"#;
    let (mut live, _) = flowgate_sdk::create::<Dedup>(config, &ids()).expect("create");
    live.restore(&live.snapshot().expect("snapshot"))
        .expect("restore");
    live.process(flowgate_sdk::testing::batch(&ids(), &[&tick("A", 0, 0)]))
        .expect("process");
    let state = live.snapshot().expect("snapshot");
    let delta = live.snapshot_delta().expect("delta").expect("a delta");
    let (mut step, _) = flowgate_sdk::create::<Dedup>(config, &ids()).expect("create");
    let err = step
        .restore(&state[..state.len() - 3])
        .expect_err("truncated");
    assert!(err.to_string().contains("dedup state is corrupt"), "{err}");
    let err = step
        .restore_delta(&delta[..delta.len() - 3])
        .expect_err("truncated");
    assert!(
        err.to_string().contains("dedup state delta is corrupt"),
        "{err}"
    );
    // Cut or padded by whole keys: the count in the head tells.
    let padded = |bytes: &[u8]| [bytes, &[0u8; 16]].concat();
    for state in [&state[..state.len() - 16], &padded(&state)] {
        let err = step.restore(state).expect_err("cut or padded");
        assert!(
            err.to_string().contains("keys of 16 bytes announced"),
            "{err}"
        );
    }
    for delta in [&delta[..delta.len() - 16], &padded(&delta)] {
        let err = step.restore_delta(delta).expect_err("cut or padded");
        assert!(
            err.to_string().contains("keys of 16 bytes announced"),
            "{err}"
        );
    }
    let err = step.restore_delta(&delta[..10]).expect_err("truncated");
    assert!(
        err.to_string().contains("dedup state delta is corrupt"),
        "{err}"
    );
}

#[test]
fn keys_in_shards_behave_as_one_map() {
    use std::collections::HashMap;
    let mut keys = crate::Keys::default();
    let mut model: HashMap<u64, i64> = HashMap::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..20_000i64 {
        // xorshift: hashes spread over every shard, some repeated.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let hash = if i % 7 == 0 { x % 500 } else { x };
        keys.insert(hash, i);
        model.insert(hash, i);
        if i % 5_000 == 4_999 {
            keys.retain(|e| *e >= i - 3_000);
            model.retain(|_, e| *e >= i - 3_000);
        }
    }
    assert_eq!(keys.len(), model.len());
    let mut listed: Vec<(u64, i64)> = keys.iter().map(|(&h, &e)| (h, e)).collect();
    listed.sort_unstable();
    let mut expected: Vec<(u64, i64)> = model.into_iter().collect();
    expected.sort_unstable();
    assert_eq!(listed, expected);
    assert!(
        keys.shards.iter().all(|s| !s.is_empty()),
        "some shard got no key"
    );
}

#[test]
fn a_delta_of_several_chunks_restores_every_key() {
    let schema = ids();
    let config = r#"{"key":["id"],"event_time":"ts","retention":"10m"}"#;
    let keys = |from: usize, to: usize| {
        let lines: Vec<String> = (from..to).map(|i| tick(&format!("k{i}"), 0, 0)).collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        flowgate_sdk::testing::batch(&schema, &lines)
    };
    let (mut live, _) = flowgate_sdk::create::<Dedup>(config, &schema).expect("create");
    let base = live.snapshot().expect("snapshot");
    assert!(
        live.snapshot_delta().expect("delta").is_none(),
        "not tracking yet"
    );
    // 20,000 keys: the touched list's chunks of 8,192 keys, filled twice and part of a third.
    live.process(keys(0, 20_000)).expect("process");
    let delta = live.snapshot_delta().expect("delta").expect("a delta");
    assert_eq!(delta.len(), 8 + 16 + 20_000 * 16, "header, head, keys");

    let (mut restored, _) = flowgate_sdk::create::<Dedup>(config, &schema).expect("create");
    restored.restore(&base).expect("restore");
    restored.restore_delta(&delta).expect("restore the delta");
    let again = restored.process(keys(0, 20_000)).expect("process");
    assert!(
        ids_out(&again).is_empty(),
        "{} keys forgotten",
        ids_out(&again).len()
    );
    let new = restored.process(keys(20_000, 20_001)).expect("process");
    assert_eq!(ids_out(&new).len(), 1);
}

#[test]
fn a_snapshot_leaves_room_for_the_sdk_header() {
    let schema = ids();
    let config = serde_json::from_str(r#"{"key":["id"],"event_time":"ts","retention":"10m"}"#)
        .expect("config");
    let (mut dedup, _) = <Dedup as Transform>::create(config, &schema).expect("create");
    let lines: Vec<String> = (0..5_000).map(|i| tick(&format!("k{i}"), 0, 0)).collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    Transform::process(&mut dedup, flowgate_sdk::testing::batch(&schema, &lines)).expect("process");
    // The SDK frames a state with this much spare capacity in place, without a second copy of
    // the keys in the instance's memory.
    let state = Transform::snapshot(&dedup).expect("snapshot");
    assert!(state.capacity() >= state.len() + flowgate_sdk::STATE_HEADER);
    assert!(
        Transform::snapshot_delta(&mut dedup)
            .expect("delta")
            .is_none()
    );
    let new: Vec<String> = (5_000..5_010)
        .map(|i| tick(&format!("k{i}"), 0, 0))
        .collect();
    let new: Vec<&str> = new.iter().map(String::as_str).collect();
    Transform::process(&mut dedup, flowgate_sdk::testing::batch(&schema, &new)).expect("process");
    let delta = Transform::snapshot_delta(&mut dedup)
        .expect("delta")
        .expect("a delta");
    assert_eq!(delta.len(), 16 + 10 * 16, "head and ten keys");
    assert!(delta.capacity() >= delta.len() + flowgate_sdk::STATE_HEADER);
}

/// One of the model test's two instances: its last full snapshot and the deltas since.
struct Checkpointed {
    dedup: Dedup,
    base: Vec<u8>,
    deltas: Vec<Vec<u8>>,
}

impl Checkpointed {
    fn new(config: &str, schema: &SchemaRef, one_table: bool) -> Self {
        let config = flowgate_sdk::config::parse(config).expect("config");
        let (mut dedup, _) = <Dedup as Transform>::create(config, schema).expect("create");
        if one_table {
            dedup.keep_keys_in_one_table();
        }
        let base = Transform::snapshot(&dedup).expect("snapshot");
        Checkpointed {
            dedup,
            base,
            deltas: vec![],
        }
    }

    fn checkpoint(&mut self) {
        match Transform::snapshot_delta(&mut self.dedup).expect("delta") {
            Some(delta) => self.deltas.push(delta),
            None => {
                self.base = Transform::snapshot(&self.dedup).expect("snapshot");
                self.deltas.clear();
            }
        }
    }

    /// A new instance restored from the last checkpoint, as after a crash.
    fn restart(&mut self, config: &str, schema: &SchemaRef, one_table: bool) {
        let mut fresh = Checkpointed::new(config, schema, one_table);
        Transform::restore(&mut fresh.dedup, 3, &self.base).expect("restore");
        for delta in &self.deltas {
            Transform::restore_delta(&mut fresh.dedup, 3, delta).expect("restore a delta");
        }
        fresh.base = std::mem::take(&mut self.base);
        fresh.deltas = std::mem::take(&mut self.deltas);
        *self = fresh;
    }
}

#[test]
fn keys_filed_by_generation_pass_and_drop_what_one_table_does() {
    // Keys (symbol, ts) with `event_time: ts` are filed by generation of event time; the same
    // rows through a step that keeps them in one table (as for a key without the event time)
    // must pass exactly the same rows: repeats near and far (some past the retention), late
    // rows into frozen generations, watermarks, checkpoints of both kinds and restarts.
    let schema =
        flowgate_sdk::testing::schema(&[("symbol", "utf8", true), ("ts", "timestamp", true)]);
    let config = r#"{"key":["symbol","ts"],"event_time":"ts","retention":"10s"}"#;
    let mut timed = Checkpointed::new(config, &schema, false);
    let mut table = Checkpointed::new(config, &schema, true);
    assert!(matches!(timed.dedup.store, crate::Store::Timed(_)));
    assert!(matches!(table.dedup.store, crate::Store::Any(_)));
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut random = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut now = 1_700_000_000_000i64;
    let mut seen: Vec<(u64, i64)> = vec![];
    let (mut passed, mut dropped) = (0, 0);
    for step in 0..400 {
        match random(20) {
            0 => {
                // Now and then exactly at a remembered key's expiry, or a millisecond past it.
                let watermark = match seen.len() {
                    n if n > 0 && random(2) == 0 => {
                        let (_, us) = seen[n - 1 - random(n.min(5_000) as u64) as usize];
                        us.div_euclid(1000) + 10_000 + random(2) as i64
                    }
                    _ => now - random(15_000) as i64,
                };
                Transform::on_watermark(&mut timed.dedup, watermark).expect("watermark");
                Transform::on_watermark(&mut table.dedup, watermark).expect("watermark");
            }
            1 | 2 => {
                timed.checkpoint();
                table.checkpoint();
            }
            3 => {
                timed.restart(config, &schema, false);
                table.restart(config, &schema, true);
            }
            _ => {
                now += random(400) as i64;
                let rows = random(3_000) as usize;
                let (mut symbols, mut times) = (vec![], vec![]);
                for _ in 0..rows {
                    let (symbol, us) = match random(10) {
                        // A key seen before, near or far back.
                        0 | 1 if !seen.is_empty() => {
                            seen[seen.len() - 1 - random(seen.len() as u64) as usize]
                        }
                        // Late: up to 30 s behind.
                        2 => (
                            random(50),
                            (now - random(30_000) as i64) * 1000 + random(3) as i64,
                        ),
                        _ => (
                            random(50),
                            (now - random(300) as i64) * 1000 + random(3) as i64,
                        ),
                    };
                    seen.push((symbol, us));
                    symbols.push(format!("S{symbol}"));
                    times.push(us);
                }
                let batch = RecordBatch::try_new(
                    schema.clone(),
                    vec![
                        Arc::new(StringArray::from(symbols)),
                        Arc::new(TimestampMicrosecondArray::from(times).with_timezone("UTC")),
                    ],
                )
                .expect("batch");
                let a = Transform::process(&mut timed.dedup, batch.clone()).expect("process");
                let b = Transform::process(&mut table.dedup, batch).expect("process");
                let (a, b) = (symbols_out(&a), symbols_out(&b));
                assert_eq!(a, b, "step {step}: the two differ");
                passed += a.len();
                dropped += rows - a.len();
            }
        }
    }
    let crate::Store::Timed(generations) = &timed.dedup.store else {
        panic!("the timed instance changed its store");
    };
    assert!(generations.frozen_len() > 0, "no generation was frozen");
    assert!(
        passed > 100_000 && dropped > 20_000,
        "{passed} passed, {dropped} dropped"
    );
}

#[test]
fn a_key_at_the_end_of_time_keeps_its_own_event_time_through_a_delta() {
    // ts = i64::MAX ms: its expiry saturates, but the delta carries the event time itself, so
    // the restored step files the key where a repeat of the row looks for it.
    let schema =
        flowgate_sdk::testing::schema(&[("symbol", "utf8", true), ("ts", "timestamp_ms", true)]);
    let batch = || {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["A"])),
                Arc::new(
                    arrow::array::TimestampMillisecondArray::from(vec![i64::MAX])
                        .with_timezone("UTC"),
                ),
            ],
        )
        .expect("batch")
    };
    let (mut live, _) = flowgate_sdk::create::<Dedup>(KEY_TS, &schema).expect("create");
    let base = live.snapshot().expect("snapshot");
    assert!(live.snapshot_delta().expect("delta").is_none());
    assert_eq!(live.process(batch()).expect("process").num_rows(), 1);
    let delta = live.snapshot_delta().expect("delta").expect("a delta");
    let (mut restored, _) = flowgate_sdk::create::<Dedup>(KEY_TS, &schema).expect("create");
    restored.restore(&base).expect("restore");
    restored.restore_delta(&delta).expect("restore the delta");
    assert_eq!(restored.process(batch()).expect("process").num_rows(), 0);
}

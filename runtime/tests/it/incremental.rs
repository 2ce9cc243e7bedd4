//! Incremental checkpoints through the real `dedup.wasm`: what a chain stores at each
//! checkpoint, and a fresh chain restored from a full snapshot and its deltas.

use std::sync::Arc;

use arrow::array::{StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use flowgate::checkpoint::StepChain;
use flowgate::plugin::{Chain, Grants, Step};

use crate::common;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]))
}

/// Rows with keys `k{from}`..`k{to}`, all at one event time.
fn keys(from: usize, to: usize) -> RecordBatch {
    let ids: Vec<String> = (from..to).map(|i| format!("k{i}")).collect();
    let ts = vec![1_762_956_000_000_000i64; ids.len()];
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(TimestampMicrosecondArray::from(ts).with_timezone("UTC")),
        ],
    )
    .expect("batch")
}

fn dedup() -> Step {
    let host = common::host();
    let plugin = host.load(&common::plugin("flowgate_dedup")).expect("load");
    plugin
        .instantiate(
            "dedup",
            r#"{"key":["id"],"event_time":"ts","retention":"10m"}"#,
            &schema(),
            Grants::default(),
        )
        .expect("create")
}

fn rows_out(chain: &mut Chain, batch: RecordBatch) -> usize {
    let out = chain.process(batch).expect("process");
    out.batches.iter().map(RecordBatch::num_rows).sum()
}

#[test]
fn dedup_checkpoints_store_what_changed_and_a_chain_restored_from_them_remembers_every_key() {
    let step = dedup();
    assert!(step.incremental(), "dedup.wasm exports `incremental`");
    let mut chain = Chain::new(vec![step]);
    assert_eq!(rows_out(&mut chain, keys(0, 20_000)), 20_000);
    let first = chain.checkpoint(1, false).expect("checkpoint").remove(0);
    assert_eq!(
        (first.delta_of, first.root),
        (None, 1),
        "the first one is whole"
    );

    assert_eq!(rows_out(&mut chain, keys(20_000, 20_100)), 100);
    let second = chain.checkpoint(2, false).expect("checkpoint").remove(0);
    assert_eq!((second.delta_of, second.root), (Some(1), 1));
    assert!(
        second.bytes.len() * 50 < first.bytes.len(),
        "100 new keys stored {} bytes; the whole state of 20,000 was {}",
        second.bytes.len(),
        first.bytes.len()
    );
    assert_eq!(rows_out(&mut chain, keys(20_100, 20_200)), 100);
    let third = chain.checkpoint(3, false).expect("checkpoint").remove(0);
    assert_eq!((third.delta_of, third.root), (Some(2), 1));

    // A fresh instance restored from the full snapshot and both deltas knows all 20,200 keys.
    let mut restored = Chain::new(vec![dedup()]);
    restored
        .restore_stored(
            0,
            &StepChain {
                step: "dedup".into(),
                full: first.bytes,
                deltas: vec![second.bytes, third.bytes],
                root: 1,
            },
            3,
        )
        .expect("restore");
    assert_eq!(
        rows_out(&mut restored, keys(0, 20_201)),
        1,
        "only k20200 is new"
    );
    // And its next checkpoint goes on from checkpoint 3.
    let fourth = restored.checkpoint(4, false).expect("checkpoint").remove(0);
    assert_eq!((fourth.delta_of, fourth.root), (Some(3), 1));
}

#[test]
fn a_plugin_built_without_the_incremental_export_loads_and_is_checkpointed_whole() {
    let host = common::host();
    let plugin = host
        .load(&common::plugin("flowgate_test_plain"))
        .expect("a plugin of the contract without `incremental` loads");
    let step = plugin
        .instantiate("plain", "{}", &schema(), Grants::default())
        .expect("create");
    assert!(!step.incremental());
    let mut chain = Chain::new(vec![step]);
    for epoch in 1..=3u64 {
        assert_eq!(rows_out(&mut chain, keys(0, 10)), 10);
        let state = chain
            .checkpoint(epoch, false)
            .expect("checkpoint")
            .remove(0);
        assert_eq!(
            (state.delta_of, state.root),
            (None, epoch),
            "whole every time"
        );
        assert_eq!(
            state.bytes,
            &epoch.to_le_bytes()[..],
            "its count of batches"
        );
    }
    // Asked to apply a delta all the same, the host refuses it as bad input, not a trap.
    let refused = chain.steps_mut()[0]
        .restore_delta(b"delta")
        .expect_err("no deltas")
        .to_string();
    assert!(
        refused.contains("does not export `incremental`"),
        "{refused}"
    );
}

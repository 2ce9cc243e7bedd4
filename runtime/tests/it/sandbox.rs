//! The sandbox: plugins that loop, hog memory, reach for ambient authority or lie about their
//! schema are stopped with an error that names them, and the host carries on.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use flowgate::plugin::{Compile, ErrorKind, Grants, PluginError};

fn input() -> (SchemaRef, RecordBatch) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("symbol", DataType::Utf8, false),
        Field::new("n", DataType::Int64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec!["A", "B"])),
            Arc::new(Int64Array::from(vec![1, 2])),
        ],
    )
    .expect("batch");
    (schema, batch)
}

#[test]
fn a_plugin_that_loops_forever_is_stopped_at_its_deadline() {
    for compile in common::COMPILERS {
        loops_forever_and_is_stopped(compile);
    }
}

fn loops_forever_and_is_stopped(compile: Compile) {
    let host = common::host_compiling(compile, Duration::from_millis(300), 256 << 20);
    let (schema, batch) = input();
    let plugin = host
        .load(&common::plugin("flowgate_test_spin"))
        .expect("load");
    let mut step = plugin
        .instantiate("spinner", "{}", &schema, Grants::default())
        .expect("create");
    let start = Instant::now();
    let err = step.process(&batch).expect_err("must not return normally");
    let took = start.elapsed();
    assert!(
        matches!(err, PluginError::Timeout { .. }),
        "{compile:?}: {err}"
    );
    assert_eq!(
        err.to_string(),
        "step `spinner` (plugin `flowgate_test_spin`) process ran past its time limit of 300ms and was stopped; the instance was discarded"
    );
    assert!(
        took < Duration::from_secs(10),
        "{compile:?}: stopped only after {took:?}"
    );
    assert!(matches!(
        step.process(&batch),
        Err(PluginError::Discarded { .. })
    ));
}

#[test]
fn a_panic_is_reported_with_its_message_and_source_line() {
    for compile in common::COMPILERS {
        panics_with_its_message(compile);
    }
}

fn panics_with_its_message(compile: Compile) {
    let host = common::host_compiling(compile, Duration::from_secs(5), 256 << 20);
    let (schema, _) = input();
    let plugin = host
        .load(&common::plugin("flowgate_test_panic"))
        .expect("load");
    let mut step = plugin
        .instantiate("prices", "{}", &schema, Grants::default())
        .expect("create");
    assert_eq!(
        step.process(&symbols(&["A"]))
            .expect("no panic")
            .batches
            .len(),
        1
    );
    let err = step
        .process(&symbols(&["A", "POISON"]))
        .expect_err("the plugin panics");
    assert!(
        matches!(err, PluginError::Trap { .. }),
        "{compile:?}: {err}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with("step `prices` (plugin `flowgate_test_panic`) trapped in process: the plugin panicked at tests/plugins/panic/src/lib.rs:"),
        "{compile:?}: {text}"
    );
    assert!(
        text.contains("called `Option::unwrap()` on a `None` value"),
        "{compile:?}: {text}"
    );
    assert!(!text.contains("wasm function"), "{compile:?}: {text}");
}

#[test]
fn what_a_plugin_printed_before_it_trapped_is_in_the_error_once() {
    // A JavaScript exception or a Python traceback is printed on stderr and then the guest
    // traps: the trap alone says only "unreachable". The test plugin does the same in Rust.
    let host = common::host();
    let (schema, _) = input();
    let plugin = host
        .load(&common::plugin("flowgate_test_panic"))
        .expect("load");
    let mut step = plugin
        .instantiate("prices", "{}", &schema, Grants::default())
        .expect("create");
    // Printed in a call that did not trap: logged, not kept for a later error.
    step.process(&symbols(&["CHATTY", "A"])).expect("no trap");
    let err = step
        .process(&symbols(&["A", "SHOUT"]))
        .expect_err("the plugin aborts");
    assert!(matches!(err, PluginError::Trap { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with("step `prices` (plugin `flowgate_test_panic`) trapped in process: wasm trap: wasm `unreachable` instruction executed, after the plugin printed: Traceback (most recent call last):\nValueError: row 1 is shouting;"),
        "{text}"
    );
    assert!(!text.contains("chatty"), "an earlier call's output: {text}");
    assert_eq!(text.matches("shouting").count(), 1, "once: {text}");

    // A Rust panic names its message and line, and keeps what was printed before it.
    let mut step = plugin
        .instantiate("prices", "{}", &schema, Grants::default())
        .expect("create");
    let text = step
        .process(&symbols(&["CHATTY", "POISON"]))
        .expect_err("the plugin panics")
        .to_string();
    assert!(
        text.contains("trapped in process: the plugin panicked at tests/plugins/panic/src/lib.rs:")
            && text.contains(", after the plugin printed: row 0 is chatty;"),
        "{text}"
    );
}

#[test]
fn a_poison_row_s_dead_letter_reason_carries_what_the_plugin_printed() {
    use flowgate::config::OnError;
    use flowgate::plugin::Chain;
    let host = common::host();
    let (schema, _) = input();
    let plugin = host
        .load(&common::plugin("flowgate_test_panic"))
        .expect("load");
    let step = plugin
        .instantiate("guard", "{}", &schema, Grants::default())
        .expect("create");
    let mut chain = Chain::new(vec![step]).with_policies(vec![OnError::DeadLetter]);
    let values = ["A", "B", "SHOUT", "C", "CHATTY", "D", "E", "F"];
    let out = chain
        .process(symbols(&values))
        .expect("isolated, not failed");
    let through: usize = out.batches.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(through, values.len() - 1);
    assert_eq!(out.rejected.len(), 1);
    let rejected = &out.rejected[0];
    assert_eq!(rejected.indices, vec![2], "exactly the row that shouted");
    // Bisection runs the row alone: its own index in that batch is 0.
    assert_eq!(
        rejected.reasons,
        vec![
            "the plugin trapped on this row: wasm trap: wasm `unreachable` instruction executed, after the plugin printed: Traceback (most recent call last):\nValueError: row 0 is shouting"
                .to_string()
        ]
    );
}

#[test]
fn a_plugin_past_its_memory_cap_fails_and_the_host_carries_on() {
    for compile in common::COMPILERS {
        hogs_memory_and_the_host_carries_on(compile);
    }
}

fn hogs_memory_and_the_host_carries_on(compile: Compile) {
    let host = common::host_compiling(compile, Duration::from_secs(5), 64 << 20);
    let (schema, batch) = input();
    let plugin = host
        .load(&common::plugin("flowgate_test_hog"))
        .expect("load");

    let mut small = plugin
        .instantiate("small", r#"{"mb": 8}"#, &schema, Grants::default())
        .expect("create");
    assert_eq!(
        small
            .process(&batch)
            .expect("8 MiB fits under 64 MiB")
            .batches
            .len(),
        1
    );

    let mut hog = plugin
        .instantiate("hog", r#"{"mb": 512}"#, &schema, Grants::default())
        .expect("create");
    let err = hog.process(&batch).expect_err("512 MiB is over the cap");
    match &err {
        PluginError::MemoryLimit {
            step,
            limit_mib,
            requested_mib,
            ..
        } => {
            assert_eq!(step, "hog");
            assert_eq!(*limit_mib, 64);
            assert!(*requested_mib > 64, "{compile:?}: {err}");
        }
        other => panic!("{compile:?}: expected a memory error, got {other}"),
    }
    assert_eq!(err.kind(), ErrorKind::Internal);
    // The instance is discarded; a rebuilt one works (an empty batch allocates nothing).
    let empty = batch.slice(0, 0);
    assert!(matches!(
        hog.process(&empty),
        Err(PluginError::Discarded { .. })
    ));
    hog.rebuild(None).expect("rebuild");
    hog.process(&empty).expect("rebuilt instance works");
    // Other instances were never harmed.
    assert_eq!(
        small.process(&batch).expect("still fine").batches[0].num_rows(),
        2
    );
}

#[test]
fn a_plugin_gets_no_files_no_environment_no_network_and_no_clock() {
    // SAFETY of the test: set before any thread reads the environment in this binary's test.
    // (Only this test touches FLOWGATE_SECRET.)
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("FLOWGATE_SECRET", "hunter2")
    };
    let host = common::host();
    let (schema, batch) = input();
    let plugin = host
        .load(&common::plugin("flowgate_test_escape"))
        .expect("load");
    let mut step = plugin
        .instantiate("escape", "{}", &schema, Grants::default())
        .expect("create");
    let out = step.process(&batch).expect("process");
    let probes = &out.batches[0];
    let names = probes.column(0).as_string::<i32>();
    let outcomes = probes.column(1).as_string::<i32>();
    let outcome = |probe: &str| -> String {
        (0..probes.num_rows())
            .find(|&i| names.value(i) == probe)
            .map(|i| outcomes.value(i).to_string())
            .unwrap_or_else(|| panic!("no probe {probe}"))
    };
    for probe in [
        "read /etc/hostname",
        "list /",
        "write /tmp",
        "env FLOWGATE_SECRET",
        "tcp connect",
    ] {
        assert!(
            outcome(probe).starts_with("denied"),
            "{probe}: {}",
            outcome(probe)
        );
    }
    assert_eq!(outcome("env vars"), "0 visible");
    assert_eq!(outcome("clock"), "0 s since epoch");
    assert!(!std::path::Path::new("/tmp/flowgate-escape").exists());

    // With the clock granted, the plugin sees real time.
    let mut granted = plugin
        .instantiate("escape", "{}", &schema, Grants { clock: true })
        .expect("create");
    let out = granted.process(&batch).expect("process");
    let clock = out.batches[0]
        .column(1)
        .as_string::<i32>()
        .value(5)
        .to_string();
    let secs: u64 = clock
        .split(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("seconds");
    assert!(secs > 1_700_000_000, "{clock}");
}

#[test]
fn a_batch_that_does_not_match_the_declared_schema_is_a_clear_error() {
    let host = common::host();
    let (schema, batch) = input();
    let plugin = host
        .load(&common::plugin("flowgate_test_badschema"))
        .expect("load");
    let mut step = plugin
        .instantiate("liar", "{}", &schema, Grants::default())
        .expect("create");
    assert_eq!(step.output_schema().field(0).name(), "count");
    let err = step.process(&batch).expect_err("must be refused");
    let text = err.to_string();
    assert!(text.starts_with("step `liar` (plugin `flowgate_test_badschema`) process failed: internal error: output does not match the declared output schema"), "{text}");
    assert!(text.contains("count: Int64"), "{text}");
    assert!(text.contains("symbol: Utf8"), "{text}");
}

#[test]
fn config_errors_name_the_plugin_step_and_key() {
    let host = common::host();
    let (schema, _) = input();
    let plugin = host
        .load(&common::plugin("flowgate_validate"))
        .expect("load");
    let err = plugin
        .instantiate(
            "check",
            r#"{"rules":{"prize":{"min":0}}}"#,
            &schema,
            Grants::default(),
        )
        .expect_err("bad column");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert_eq!(
        err.to_string(),
        "step `check` (plugin `flowgate_validate`) create failed: invalid config: `rules.prize`: column `prize` is not in the input (columns: symbol, n)"
    );
}

#[test]
fn a_file_that_is_not_a_plugin_is_a_clear_error() {
    let host = common::host();
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("junk.wasm");
    std::fs::write(&path, b"not wasm at all").expect("write");
    let err = host.load(&path).expect_err("junk");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.to_string().starts_with(&format!(
            "plugin `{}` is not a valid Flowgate plugin",
            path.display()
        )),
        "{err}"
    );
    let err = host
        .load(&dir.path().join("missing.wasm"))
        .expect_err("missing");
    assert!(err.to_string().starts_with("cannot read plugin"), "{err}");
}

#[test]
fn processing_time_rules_need_the_clock_grant() {
    let host = common::host();
    let schema = Arc::new(Schema::new(vec![Field::new(
        "ts",
        DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into())),
        false,
    )]));
    let plugin = host
        .load(&common::plugin("flowgate_validate"))
        .expect("load");
    let config = r#"{"rules":{"ts":{"max_future":"5m","relative_to":"processing_time"}}}"#;
    let err = plugin
        .instantiate("fresh", config, &schema, Grants::default())
        .expect_err("no clock");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().ends_with("invalid config: `rules.ts.relative_to`: `processing_time` needs a clock: grant it to this step (`grants: [clock]`)"), "{err}");
    plugin
        .instantiate("fresh", config, &schema, Grants { clock: true })
        .expect("with the clock granted");
}

/// Symbols in one batch, as the panic plugin reads them (column 0).
fn symbols(values: &[&str]) -> RecordBatch {
    let (schema, _) = input();
    let n: Vec<i64> = (0..values.len() as i64).collect();
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(values.to_vec())),
            Arc::new(Int64Array::from(n)),
        ],
    )
    .expect("batch")
}

/// The panic plugin's state: rows it passed on (the last 8 bytes of its framed snapshot).
fn passed(snapshot: &[u8]) -> u64 {
    let tail: [u8; 8] = snapshot[snapshot.len() - 8..].try_into().expect("8 bytes");
    u64::from_le_bytes(tail)
}

#[test]
fn poison_rows_are_isolated_and_the_step_state_ends_as_without_them() {
    use flowgate::config::OnError;
    use flowgate::plugin::Chain;
    let host = common::host();
    let (schema, _) = input();
    let plugin = host
        .load(&common::plugin("flowgate_test_panic"))
        .expect("load");
    let step = |name: &str| {
        plugin
            .instantiate(name, "{}", &schema, Grants::default())
            .expect("create")
    };
    let mut chain = Chain::new(vec![step("guard")]).with_policies(vec![OnError::DeadLetter]);
    // State before the epoch: restored, as after a restart.
    let first = chain.process(symbols(&["A", "B", "C"])).expect("fine");
    assert_eq!(first.batches[0].num_rows(), 3);
    let states = chain.snapshot().expect("snapshot");
    assert_eq!(passed(&states[0].1), 3);
    let mut chain = Chain::new(vec![step("guard")]).with_policies(vec![OnError::DeadLetter]);
    chain.restore(0, &states[0].1).expect("restore");
    // This epoch: a batch and a watermark go through, then a batch with two poison rows.
    chain.process(symbols(&["D", "E"])).expect("fine");
    chain.watermark(1_000).expect("watermark");
    let mut values: Vec<String> = (0..16).map(|i| format!("S{i}")).collect();
    values[3] = "POISON".into();
    values[11] = "POISON".into();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    let out = chain.process(symbols(&refs)).expect("isolated, not failed");
    let through: Vec<String> = out
        .batches
        .iter()
        .flat_map(|b| {
            b.column(0)
                .as_string::<i32>()
                .iter()
                .map(|s| s.unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let expected: Vec<String> = values.iter().filter(|v| *v != "POISON").cloned().collect();
    assert_eq!(through, expected, "every other row, in order");
    assert_eq!(out.rejected.len(), 1);
    let rejected = &out.rejected[0];
    assert_eq!(rejected.step, "guard");
    assert_eq!(rejected.indices, vec![3, 11], "exactly the poison rows");
    assert_eq!(rejected.rows.num_rows(), 2);
    for reason in &rejected.reasons {
        assert!(
            reason.starts_with("the plugin trapped on this row: the plugin panicked at tests/plugins/panic/src/lib.rs:")
                && reason.contains("called `Option::unwrap()` on a `None` value"),
            "{reason}"
        );
    }
    // The rebuilt instance counts each row it passed once: 3 restored + 2 + 14.
    chain.process(symbols(&["Z"])).expect("the step goes on");
    let states = chain.snapshot().expect("snapshot");
    assert_eq!(passed(&states[0].1), 3 + 2 + 14 + 1);

    // `on_error: fail` keeps the old behaviour: the run stops.
    let mut failing = Chain::new(vec![step("guard")]).with_policies(vec![OnError::Fail]);
    let err = failing
        .process(symbols(&["A", "POISON"]))
        .expect_err("fails");
    assert!(matches!(err, PluginError::Trap { .. }), "{err}");
}

#[test]
fn a_poison_row_is_isolated_from_a_state_read_back_from_the_store_once_it_was_saved() {
    use flowgate::checkpoint::{FileStateStore, PartitionState, StateStore};
    use flowgate::config::OnError;
    use flowgate::plugin::{Chain, StepSnapshot, StoredStates};
    let host = common::host();
    let (schema, _) = input();
    let plugin = host
        .load(&common::plugin("flowgate_test_panic"))
        .expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    let store: Arc<dyn StateStore> = Arc::new(FileStateStore::new(dir.path(), "p"));
    let saved = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut chain = Chain::new(vec![
        plugin
            .instantiate("guard", "{}", &schema, Grants::default())
            .expect("create"),
    ])
    .with_policies(vec![OnError::DeadLetter]);
    chain.keep_stored(StoredStates {
        store: store.clone(),
        topic: "ticks".into(),
        partition: 2,
        saved: saved.clone(),
    });
    chain.process(symbols(&["A", "B", "C"])).expect("fine");
    // Checkpoint 1, saved as the committer saves it; the chain then lets its copy go.
    let (steps, root) = StepSnapshot::stored(chain.checkpoint(1, false).expect("checkpoint"));
    let state = PartitionState {
        offset: 2,
        max_event: None,
        watermark: None,
        steps,
        previous: None,
        sources: Vec::new(),
        root,
    };
    assert!(chain.held_state_bytes() > 0);
    store.save("ticks", 2, 1, &state).expect("save");
    saved.store(1, std::sync::atomic::Ordering::Release);
    chain.process(symbols(&["D", "E"])).expect("fine");
    assert_eq!(chain.held_state_bytes(), 0, "saved, so not held");

    // A poison row: the step is rebuilt from the state read back, and the journal replayed.
    let out = chain
        .process(symbols(&["F", "POISON", "G", "H"]))
        .expect("isolated, not failed");
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].indices, vec![1], "exactly the poison row");
    let rows: usize = out.batches.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows, 3);
    assert!(
        chain.held_state_bytes() > 0,
        "read back, held for the next rebuild"
    );
    // 3 before the checkpoint, then 2, then 3: each row counted once.
    let states = chain.snapshot().expect("snapshot");
    assert_eq!(passed(&states[0].1), 3 + 2 + 3);
}

use flowgate_sdk::testing::lines_with;
use serde_json::{Value, json};

use crate::PctChange;
use crate::scenarios::scenarios;

fn run(name: &str) -> Vec<String> {
    let scenario = scenarios()
        .into_iter()
        .find(|s| s.name == name)
        .expect("scenario");
    scenario.run_native::<PctChange>()
}

fn pct(t: &[String], prefix: &str) -> Vec<(String, Value)> {
    lines_with(t, prefix)
        .iter()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l.split_once(" out ").expect("out").1).expect("json");
            (
                v["symbol"].as_str().unwrap_or("").to_string(),
                v.get("pct_change").cloned().unwrap_or(Value::Null),
            )
        })
        .collect()
}

#[test]
fn first_row_of_a_key_is_null_and_order_follows_order_by() {
    let t = run("pct");
    assert_eq!(
        pct(&t, "step 0 out"),
        [
            ("A".into(), json!(0.1)),
            ("B".into(), Value::Null),
            ("A".into(), Value::Null),
            ("C".into(), Value::Null)
        ],
        "{t:#?}"
    );
}

#[test]
fn previous_survives_batches_snapshots_and_nulls() {
    let t = run("pct");
    let got = pct(&t, "step 3 out");
    assert_eq!(got[0].0, "A");
    let a = got[0].1.as_f64().expect("number");
    assert!((a - (-0.2)).abs() < 1e-12, "{t:#?}");
    assert_eq!(got[1], ("B".into(), Value::Null));
    assert_eq!(
        got[2],
        ("C".into(), Value::Null),
        "first non-null value of C: {t:#?}"
    );
    assert_eq!(
        pct(&t, "step 4 out"),
        [("B".into(), json!(-0.5))],
        "null did not replace B's previous: {t:#?}"
    );
}

#[test]
fn config_errors_name_the_key() {
    let expect = [
        (
            "output exists",
            "`output`: column `close` already exists in the input",
        ),
        (
            "text column",
            "`column`: column `symbol` is Utf8, not a number",
        ),
        ("missing order_by", "missing field `order_by`"),
    ];
    for (name, text) in expect {
        let t = run(name);
        assert!(
            t[0].starts_with(&format!("create error: invalid config: {text}")),
            "{name}: {t:#?}"
        );
    }
}

use flowgate_sdk::prelude::{Error, SchemaRef};
use flowgate_sdk::testing::{batch, rows, schema};

/// The `pct_change` column of a step's output, row by row.
fn pct_changes(out: &flowgate_sdk::Output) -> Vec<Value> {
    rows(&out.batches)
        .iter()
        .map(|r| r.get("pct_change").cloned().unwrap_or(Value::Null))
        .collect()
}

/// The `pct_change` column a fresh step with `config` gives for one batch of `lines`.
fn changes_of(config: &str, schema: &SchemaRef, lines: &[&str]) -> Vec<Value> {
    let (mut p, _) = flowgate_sdk::create::<PctChange>(config, schema).expect("create");
    pct_changes(&p.process(batch(schema, lines)).expect("process"))
}

#[test]
fn order_by_keeps_microseconds() {
    let ticks = schema(&[
        ("symbol", "utf8", true),
        ("ts", "timestamp", false),
        ("price", "float64", true),
    ]);
    // Same millisecond; the later tick arrives first.
    let got = changes_of(
        r#"{"key":["symbol"],"order_by":"ts","column":"price"}"#,
        &ticks,
        &[
            r#"{"symbol":"A","ts":"2025-11-12T14:38:30.294001Z","price":11}"#,
            r#"{"symbol":"A","ts":"2025-11-12T14:38:30.294000Z","price":10}"#,
        ],
    );
    assert_eq!(got, [json!(0.1), Value::Null]);
}

fn keyed() -> SchemaRef {
    schema(&[
        ("symbol", "utf8", true),
        ("n", "int64", true),
        ("at", "timestamp", true),
        ("ts", "timestamp", false),
        ("close", "float64", true),
    ])
}

fn keyed_config(key: &str) -> String {
    format!(r#"{{"key":{key},"order_by":"ts","column":"close"}}"#)
}

const BEFORE: &[&str] = &[
    r#"{"symbol":"A","n":1,"at":"2025-11-12T10:00:00.000001Z","ts":"2025-11-12T14:00:00Z","close":10}"#,
    r#"{"symbol":"B","n":2,"at":"2025-11-12T10:00:00Z","ts":"2025-11-12T14:00:00Z","close":20}"#,
    r#"{"symbol":null,"n":null,"at":null,"ts":"2025-11-12T14:00:00Z","close":40}"#,
    r#"{"symbol":"A","n":-7,"at":1762941700000,"ts":"2025-11-12T14:00:00Z","close":80}"#,
];
const AFTER: &[&str] = &[
    r#"{"symbol":"A","n":1,"at":"2025-11-12T10:00:00.000001Z","ts":"2025-11-12T14:01:00Z","close":11}"#,
    r#"{"symbol":"B","n":2,"at":"2025-11-12T10:00:00Z","ts":"2025-11-12T14:01:00Z","close":22}"#,
    r#"{"symbol":null,"n":null,"at":null,"ts":"2025-11-12T14:01:00Z","close":44}"#,
    r#"{"symbol":"A","n":-7,"at":1762941700000,"ts":"2025-11-12T14:01:00Z","close":88}"#,
    r#"{"symbol":"C","n":3,"at":"2025-11-12T10:00:00.000002Z","ts":"2025-11-12T14:01:00Z","close":1}"#,
];

/// The `pct_change` column for `AFTER`, after `BEFORE` and optionally a snapshot → restore.
fn run_keyed(config: &str, restore: bool) -> Vec<Value> {
    let schema = keyed();
    let (mut p, _) = flowgate_sdk::create::<PctChange>(config, &schema).expect("create");
    p.process(batch(&schema, BEFORE)).expect("process");
    if restore {
        let state = p.snapshot().expect("snapshot");
        let (mut fresh, _) = flowgate_sdk::create::<PctChange>(config, &schema).expect("create");
        fresh.restore(&state).expect("restore");
        assert_eq!(
            fresh.snapshot().expect("snapshot"),
            state,
            "snapshots are stable"
        );
        p = fresh;
    }
    let out = p.process(batch(&schema, AFTER)).expect("process");
    pct_changes(&out)
}

#[test]
fn snapshot_restore_gives_identical_output_for_every_key_type() {
    for key in [
        r#"["symbol"]"#,
        r#"["n"]"#,
        r#"["at"]"#,
        r#"["symbol","n","at"]"#,
        r#"[]"#,
    ] {
        let config = keyed_config(key);
        assert_eq!(run_keyed(&config, true), run_keyed(&config, false), "{key}");
    }
    // Every key kept its own previous value, the null key included; C is new.
    assert_eq!(
        run_keyed(&keyed_config(r#"["symbol","n","at"]"#), true),
        [json!(0.1), json!(0.1), json!(0.1), json!(0.1), Value::Null]
    );
    // By `at` alone, A/1 and A/-7 differ by 1µs: still two keys.
    assert_eq!(
        run_keyed(&keyed_config(r#"["at"]"#), true),
        [json!(0.1), json!(0.1), json!(0.1), json!(0.1), Value::Null]
    );
}

/// A version-2 snapshot after `BEFORE` with `key: [symbol, n, at]`: written by this plugin and
/// checked in, so a change to the snapshot layout fails here.
const GOLDEN_V2: &str = concat!(
    "46475331020000000403000000000000000000444003050141020d0680a4ce9cdbd8a10602000000",
    "00000054400305014102020682a09fbddad8a1060200000000000024400305014202040680a09fbd",
    "dad8a106020000000000003440",
);

#[test]
fn golden_snapshot_still_decodes() {
    use flowgate_sdk::testing::{hex, unhex};
    let config = keyed_config(r#"["symbol","n","at"]"#);
    let schema = keyed();
    let (mut p, _) = flowgate_sdk::create::<PctChange>(&config, &schema).expect("create");
    p.process(batch(&schema, BEFORE)).expect("process");
    assert_eq!(
        hex(&p.snapshot().expect("snapshot")),
        GOLDEN_V2,
        "the snapshot layout changed"
    );
    let (mut restored, _) = flowgate_sdk::create::<PctChange>(&config, &schema).expect("create");
    restored.restore(&unhex(GOLDEN_V2)).expect("restore");
    let out = restored.process(batch(&schema, AFTER)).expect("process");
    let got = pct_changes(&out);
    assert_eq!(got, run_keyed(&config, false));
}

#[test]
fn state_of_an_older_version_is_refused_by_name() {
    let config = keyed_config(r#"["symbol"]"#);
    let (mut p, _) = flowgate_sdk::create::<PctChange>(&config, &keyed()).expect("create");
    let mut v1 = b"FGS1".to_vec();
    v1.extend_from_slice(&1u32.to_le_bytes());
    v1.push(0);
    let err = p.restore(&v1).expect_err("version 1");
    assert!(matches!(err, Error::BadInput(_)), "{err}");
    assert!(
        err.message()
            .contains("version 1 was written by an older plugin version")
            && err.message().contains("reads state version 2"),
        "{err}"
    );
    // A key that does not fit the key column is refused, not a panic.
    let mut bad = b"FGS1".to_vec();
    bad.extend_from_slice(&2u32.to_le_bytes());
    // One entry: a key of one `Int(-3)`, previous 0.0.
    bad.extend_from_slice(&[1, 1, 2, 5, 0, 0, 0, 0, 0, 0, 0, 0]);
    let err = p.restore(&bad).expect_err("int key for a utf8 column");
    assert!(matches!(err, Error::BadInput(_)), "{err}");
}

/// Rows are taken in `order_by` order within a key whatever order they arrive in, nulls first
/// and ties in arrival order; an `order_by` column of a type that cannot be ordered is refused.
#[test]
fn rows_follow_order_by_within_a_batch_and_ties_keep_arrival_order() {
    let schema = flowgate_sdk::testing::schema(&[
        ("symbol", "utf8", true),
        ("n", "int64", true),
        ("close", "float64", true),
    ]);
    let got = changes_of(
        r#"{"key":["symbol"],"order_by":"n","column":"close"}"#,
        &schema,
        &[
            r#"{"symbol":"A","n":3,"close":40}"#,
            r#"{"symbol":"B","n":1,"close":10}"#,
            r#"{"symbol":"A","n":1,"close":10}"#,
            r#"{"symbol":"A","n":2,"close":20}"#,
            r#"{"symbol":"A","n":2,"close":25}"#,
            r#"{"symbol":"A","n":null,"close":5}"#,
            r#"{"symbol":"B","n":0,"close":5}"#,
        ],
    );
    // A in order: null(5), 1(10), 2(20), 2(25), 3(40); B: 0(5), 1(10).
    assert_eq!(
        got,
        [
            json!((40.0 - 25.0) / 25.0),
            json!(1.0),
            json!(1.0),
            json!(1.0),
            json!(0.25),
            Value::Null,
            Value::Null,
        ]
    );
    // Ordered by a string (the packed comparison, not the integer one): one series, in symbol
    // order, ties in arrival order.
    let got = changes_of(
        r#"{"order_by":"symbol","column":"close"}"#,
        &schema,
        &[
            r#"{"symbol":"B","n":1,"close":30}"#,
            r#"{"symbol":"A","n":1,"close":10}"#,
            r#"{"symbol":null,"n":1,"close":5}"#,
            r#"{"symbol":"A","n":1,"close":20}"#,
        ],
    );
    // null(5), A(10), A(20), B(30).
    assert_eq!(got, [json!(0.5), json!(1.0), Value::Null, json!(1.0)]);
    let binary = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("b", arrow::datatypes::DataType::Binary, true),
        arrow::datatypes::Field::new("close", arrow::datatypes::DataType::Float64, true),
    ]));
    let err = flowgate_sdk::create::<PctChange>(r#"{"order_by":"b","column":"close"}"#, &binary)
        .err()
        .expect("binary order_by");
    assert!(
        err.to_string()
            .contains("`order_by`: cannot order by Binary columns"),
        "{err}"
    );
}

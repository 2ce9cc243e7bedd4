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

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

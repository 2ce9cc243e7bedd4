use flowgate_sdk::testing::{Scenario, Step, schema};

/// The scripted runs.
pub fn scenarios() -> Vec<Scenario> {
    let bars = schema(&[
        ("symbol", "utf8", true),
        ("window_start", "timestamp", false),
        ("close", "float64", true),
    ]);
    let config = r#"{"key":["symbol"],"order_by":"window_start","column":"close"}"#;
    let bad = |name, config| Scenario {
        name,
        config,
        schema: bars.clone(),
        steps: vec![],
    };
    vec![
        Scenario {
            name: "pct",
            config,
            schema: bars.clone(),
            steps: vec![
                Step::Process(vec![
                    r#"{"symbol":"A","window_start":"2025-11-12T14:01:00Z","close":11}"#,
                    r#"{"symbol":"B","window_start":"2025-11-12T14:00:00Z","close":50}"#,
                    r#"{"symbol":"A","window_start":"2025-11-12T14:00:00Z","close":10}"#,
                    r#"{"symbol":"C","window_start":"2025-11-12T14:00:00Z","close":null}"#,
                ]),
                Step::Process(vec![]),
                Step::SnapshotRestore,
                Step::Process(vec![
                    r#"{"symbol":"A","window_start":"2025-11-12T14:02:00Z","close":8.8}"#,
                    r#"{"symbol":"B","window_start":"2025-11-12T14:01:00Z","close":null}"#,
                    r#"{"symbol":"C","window_start":"2025-11-12T14:01:00Z","close":5}"#,
                ]),
                Step::Process(vec![
                    r#"{"symbol":"B","window_start":"2025-11-12T14:02:00Z","close":25}"#,
                ]),
            ],
        },
        bad(
            "output exists",
            r#"{"key":["symbol"],"order_by":"window_start","column":"close","output":"close"}"#,
        ),
        bad(
            "text column",
            r#"{"key":["symbol"],"order_by":"window_start","column":"symbol"}"#,
        ),
        bad("missing order_by", r#"{"key":["symbol"],"column":"close"}"#),
    ]
}

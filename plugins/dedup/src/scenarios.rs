use flowgate_sdk::testing::{Scenario, Step, schema};

/// The scripted runs.
pub fn scenarios() -> Vec<Scenario> {
    let ticks = schema(&[
        ("symbol", "utf8", true),
        ("price", "float64", true),
        ("ts", "timestamp", true),
    ]);
    let config = r#"{"key":["symbol","ts"],"event_time":"ts","retention":"1m"}"#;
    let bad = |name, config| Scenario {
        name,
        config,
        schema: ticks.clone(),
        steps: vec![],
    };
    vec![
        Scenario {
            name: "dedup",
            config,
            schema: ticks.clone(),
            steps: vec![
                Step::Process(vec![
                    r#"{"symbol":"A","price":1,"ts":"2025-11-12T14:00:00Z"}"#,
                    r#"{"symbol":"A","price":2,"ts":"2025-11-12T14:00:00Z"}"#,
                    r#"{"symbol":"B","price":3,"ts":"2025-11-12T14:00:00Z"}"#,
                    r#"{"symbol":"A","price":4,"ts":"2025-11-12T14:00:01Z"}"#,
                    r#"{"symbol":"A","price":5,"ts":null}"#,
                ]),
                Step::Process(vec![
                    r#"{"symbol":"A","price":6,"ts":"2025-11-12T14:00:00Z"}"#,
                    r#"{"symbol":"B","price":7,"ts":"2025-11-12T14:00:02Z"}"#,
                ]),
                Step::Process(vec![]),
                Step::SnapshotRestore,
                Step::Process(vec![
                    r#"{"symbol":"A","price":8,"ts":"2025-11-12T14:00:01Z"}"#,
                    r#"{"symbol":"C","price":9,"ts":"2025-11-12T14:00:01Z"}"#,
                ]),
                // 14:00:00 + 1m retention has passed: those keys are forgotten.
                Step::Watermark(1_762_956_000_000 + 120_000),
                Step::Process(vec![
                    r#"{"symbol":"A","price":10,"ts":"2025-11-12T14:00:00Z"}"#,
                    r#"{"symbol":null,"price":11,"ts":"2025-11-12T14:05:00Z"}"#,
                    r#"{"symbol":null,"price":12,"ts":"2025-11-12T14:05:00Z"}"#,
                    r#"{"symbol":"A","price":13,"ts":"2025-11-12T14:05:00Z"}"#,
                ]),
            ],
        },
        Scenario {
            name: "dedup, restored from checkpoint deltas",
            config,
            schema: ticks.clone(),
            steps: vec![
                Step::Process(vec![
                    r#"{"symbol":"A","price":1,"ts":"2025-11-12T14:00:00Z"}"#,
                    r#"{"symbol":"B","price":2,"ts":"2025-11-12T14:00:00Z"}"#,
                ]),
                // The first checkpoint is a full snapshot.
                Step::Checkpoint,
                Step::Process(vec![
                    r#"{"symbol":"C","price":3,"ts":"2025-11-12T14:00:30Z"}"#,
                    r#"{"symbol":"A","price":4,"ts":"2025-11-12T14:00:00Z"}"#,
                ]),
                // A delta: C.
                Step::Checkpoint,
                // 14:00:00 + 1m has passed: A and B are forgotten; C is not.
                Step::Watermark(1_762_956_000_000 + 65_000),
                Step::Process(vec![
                    r#"{"symbol":"D","price":5,"ts":"2025-11-12T14:01:00Z"}"#,
                    r#"{"symbol":"A","price":6,"ts":"2025-11-12T14:01:00Z"}"#,
                ]),
                // A delta: the watermark, D and A again.
                Step::Checkpoint,
                Step::RestoreCheckpoints,
                Step::Process(vec![
                    r#"{"symbol":"A","price":7,"ts":"2025-11-12T14:00:00Z"}"#,
                    r#"{"symbol":"B","price":8,"ts":"2025-11-12T14:00:00Z"}"#,
                    r#"{"symbol":"C","price":9,"ts":"2025-11-12T14:00:30Z"}"#,
                    r#"{"symbol":"D","price":10,"ts":"2025-11-12T14:01:00Z"}"#,
                    r#"{"symbol":"A","price":11,"ts":"2025-11-12T14:01:00Z"}"#,
                    r#"{"symbol":"E","price":12,"ts":"2025-11-12T14:01:00Z"}"#,
                ]),
            ],
        },
        bad("no key", r#"{"key":[],"event_time":"ts","retention":"1m"}"#),
        bad(
            "missing key column",
            r#"{"key":["symbol","tss"],"event_time":"ts","retention":"1m"}"#,
        ),
        bad(
            "event time not a time",
            r#"{"key":["symbol"],"event_time":"symbol","retention":"1m"}"#,
        ),
        bad(
            "zero retention",
            r#"{"key":["symbol"],"event_time":"ts","retention":"0s"}"#,
        ),
        bad(
            "missing retention",
            r#"{"key":["symbol"],"event_time":"ts"}"#,
        ),
    ]
}

use flowgate_sdk::testing::{Scenario, Step, schema};

const RULES: &str = r#"{"rules": {
    "symbol": {"not_null": true, "pattern": "^[A-Z]{1,5}$"},
    "price": {"not_null": true, "min": 0, "min_exclusive": true},
    "volume": {"min": 0},
    "ts": {"not_null": true, "max_future": "5m", "max_age": "1d"}
}}"#;

/// The scripted runs.
pub fn scenarios() -> Vec<Scenario> {
    let ticks = schema(&[
        ("symbol", "utf8", true),
        ("price", "float64", true),
        ("volume", "int64", true),
        ("ts", "timestamp", true),
    ]);
    let bad = |name, config| Scenario {
        name,
        config,
        schema: ticks.clone(),
        steps: vec![],
    };
    vec![
        Scenario {
            name: "rules",
            config: RULES,
            schema: ticks.clone(),
            steps: vec![
                Step::Process(vec![
                    r#"{"symbol":"AAPL","price":10.5,"volume":100,"ts":"2025-11-12T14:38:30.294Z"}"#,
                    r#"{"symbol":"aapl","price":10.5,"volume":100,"ts":"2025-11-12T14:38:31Z"}"#,
                    r#"{"symbol":"MSFT","price":-1,"volume":100,"ts":"2025-11-12T14:38:32Z"}"#,
                    r#"{"symbol":"MSFT","price":0,"volume":-5,"ts":"2025-11-12T14:38:33Z"}"#,
                    r#"{"symbol":null,"price":null,"volume":1,"ts":null}"#,
                    r#"{"symbol":"IBM","price":1,"volume":null,"ts":1762958313000}"#,
                ]),
                Step::Process(vec![]),
                Step::Watermark(1_762_958_400_000),
                Step::Process(vec![
                    r#"{"symbol":"AAPL","price":1,"volume":1,"ts":"2025-11-12T14:44:00Z"}"#,
                    r#"{"symbol":"AAPL","price":1,"volume":1,"ts":"2025-11-12T14:46:00Z"}"#,
                    r#"{"symbol":"AAPL","price":1,"volume":1,"ts":"2025-11-10T14:40:00Z"}"#,
                ]),
                Step::SnapshotRestore,
                // The watermark survived the restore: 14:46 is still too far ahead.
                Step::Process(vec![
                    r#"{"symbol":"ZZ","price":2,"volume":0,"ts":"2025-11-12T14:40:00Z"}"#,
                    r#"{"symbol":"ZZ","price":2,"volume":0,"ts":"2025-11-12T14:46:00Z"}"#,
                ]),
            ],
        },
        bad("unknown column", r#"{"rules":{"prize":{"min":0}}}"#),
        bad("bad regex", r#"{"rules":{"symbol":{"pattern":"([A-Z"}}}"#),
        bad("min on text", r#"{"rules":{"symbol":{"min":0}}}"#),
        bad("unknown rule", r#"{"rules":{"price":{"minimum":0}}}"#),
        bad("empty rule", r#"{"rules":{"price":{}}}"#),
        bad("one_of type", r#"{"rules":{"symbol":{"one_of":["A", 1]}}}"#),
    ]
}

use flowgate_sdk::testing::{Scenario, Step, schema};

/// The stock pipeline's 1-minute bars.
pub const BARS: &str = r#"{"event_time":"ts","size":"1m","group_by":["symbol"],"aggregates":{
    "open":{"first":"price"},"high":{"max":"price"},"low":{"min":"price"},"close":{"last":"price"},
    "volume":{"sum":"volume"},"trades":{"count":"*"},"avg_price":{"avg":"price"}}}"#;

/// 14:00:00 on 2025-11-12, epoch ms.
pub const T14: i64 = 1_762_956_000_000;

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
            name: "bars",
            config: BARS,
            schema: ticks.clone(),
            steps: vec![
                Step::Process(vec![
                    r#"{"symbol":"A","price":10,"volume":1,"ts":"2025-11-12T14:00:10Z"}"#,
                    r#"{"symbol":"A","price":9,"volume":2,"ts":"2025-11-12T14:00:05Z"}"#,
                    r#"{"symbol":"B","price":100,"volume":5,"ts":"2025-11-12T14:00:30Z"}"#,
                    r#"{"symbol":"A","price":11,"volume":3,"ts":"2025-11-12T14:00:50Z"}"#,
                    r#"{"symbol":"A","price":12,"volume":1,"ts":"2025-11-12T14:01:10Z"}"#,
                    r#"{"symbol":"A","price":12,"volume":1,"ts":null}"#,
                    r#"{"symbol":"B","price":null,"volume":1,"ts":"2025-11-12T14:00:40Z"}"#,
                ]),
                Step::Process(vec![]),
                Step::SnapshotRestore,
                Step::Watermark(T14 + 60_000),
                Step::Process(vec![
                    r#"{"symbol":"A","price":1,"volume":1,"ts":"2025-11-12T14:00:59Z"}"#,
                    r#"{"symbol":"A","price":13,"volume":1,"ts":"2025-11-12T14:01:20Z"}"#,
                ]),
                Step::Watermark(T14 + 120_000),
                Step::Watermark(T14 + 120_000),
            ],
        },
        Scenario {
            name: "hopping",
            config: r#"{"event_time":"ts","size":"1m","slide":"30s","aggregates":{"n":{"count":"*"},"v":{"sum":"volume"},"last_ts":{"last":"ts"}}}"#,
            schema: ticks.clone(),
            steps: vec![
                Step::Process(vec![
                    r#"{"symbol":"A","price":1,"volume":1,"ts":"2025-11-12T14:00:10Z"}"#,
                    r#"{"symbol":"A","price":1,"volume":2,"ts":"2025-11-12T14:00:40Z"}"#,
                ]),
                Step::Watermark(T14 + 120_000),
            ],
        },
        bad(
            "unknown function",
            r#"{"event_time":"ts","size":"1m","aggregates":{"m":{"median":"price"}}}"#,
        ),
        bad(
            "slide over size",
            r#"{"event_time":"ts","size":"1m","slide":"2m","aggregates":{"n":{"count":"*"}}}"#,
        ),
        bad(
            "text aggregate",
            r#"{"event_time":"ts","size":"1m","aggregates":{"s":{"max":"symbol"}}}"#,
        ),
        bad(
            "missing column",
            r#"{"event_time":"ts","size":"1m","group_by":["sym"],"aggregates":{"n":{"count":"*"}}}"#,
        ),
        bad(
            "name clash",
            r#"{"event_time":"ts","size":"1m","group_by":["symbol"],"aggregates":{"symbol":{"count":"*"}}}"#,
        ),
    ]
}

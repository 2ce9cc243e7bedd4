//! `flowgate plugin test` end to end: the shipped step configs run the sample ticks through the
//! four compiled plugins, and the bars must equal bars computed independently here.

use crate::common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn flowgate(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(args)
        .arg("--cache-dir")
        .arg(cache)
        .current_dir(repo())
        .output()
        .expect("run flowgate")
}

fn ms(text: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .timestamp_millis()
}

#[derive(Debug, Default)]
struct Bar {
    open: (i64, f64),
    close: (i64, f64),
    high: f64,
    low: f64,
    sum: f64,
    volume: i64,
    trades: i64,
}

/// Bars computed directly from the sample file, without Arrow or the plugins.
fn expected_bars(sample: &str) -> BTreeMap<(String, i64), Bar> {
    let mut seen = HashSet::new();
    let mut bars: BTreeMap<(String, i64), Bar> = BTreeMap::new();
    for line in sample.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (Some(symbol), Some(price), Some(volume), Some(ts)) = (
            v["symbol"].as_str(),
            v["price"].as_f64(),
            v["volume"].as_i64(),
            v["ts"].as_str(),
        ) else {
            continue;
        };
        let valid_symbol = symbol
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_uppercase())
            && symbol
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '.');
        if !valid_symbol || price <= 0.0 || volume < 0 {
            continue;
        }
        let ts = ms(ts);
        if !seen.insert((symbol.to_string(), ts)) {
            continue;
        }
        let bar = bars
            .entry((symbol.to_string(), ts - ts.rem_euclid(60_000)))
            .or_insert_with(|| Bar {
                open: (i64::MAX, 0.0),
                close: (i64::MIN, 0.0),
                high: f64::MIN,
                low: f64::MAX,
                ..Bar::default()
            });
        if ts < bar.open.0 {
            bar.open = (ts, price);
        }
        if ts >= bar.close.0 {
            bar.close = (ts, price);
        }
        bar.high = bar.high.max(price);
        bar.low = bar.low.min(price);
        bar.sum += price;
        bar.volume += volume;
        bar.trades += 1;
    }
    bars
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(1.0)
}

#[test]
fn the_stock_chain_makes_the_bars_computed_independently() {
    let cache = tempfile::tempdir().expect("tmp");
    let dir = common::plugin_dir();
    let p = |name: &str| dir.join(format!("{name}.wasm")).display().to_string();
    let (validate, dedup, window, pct) = (
        p("flowgate_validate"),
        p("flowgate_dedup"),
        p("flowgate_window"),
        p("flowgate_pct_change"),
    );
    let args = [
        "plugin",
        "test",
        validate.as_str(),
        "--config",
        "pipelines/steps/validate.yaml",
        "--plugin",
        &dedup,
        "--config",
        "pipelines/steps/dedup.yaml",
        "--plugin",
        &window,
        "--config",
        "pipelines/steps/window.yaml",
        "--plugin",
        &pct,
        "--config",
        "pipelines/steps/pct_change.yaml",
        "--schema",
        "pipelines/steps/ticks.schema.yaml",
        "--input",
        "pipelines/samples/ticks.jsonl",
        "--flush",
        "--format",
        "jsonl",
        "--batch-size",
        "64",
    ];
    // The harness compiles with Winch by default; `--optimize` with Cranelift, as a pipeline
    // does. Both must compute the same rows.
    let out = flowgate(&args, cache.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let optimized = flowgate(&[&args[..], &["--optimize"]].concat(), cache.path());
    assert!(
        optimized.status.success(),
        "{}",
        String::from_utf8_lossy(&optimized.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&optimized.stdout),
        String::from_utf8_lossy(&out.stdout),
        "the quick compile and the optimized one disagree"
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("stdout is JSON lines"))
        .collect();

    let rejected: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "rejected").collect();
    let reasons: Vec<(String, String)> = rejected
        .iter()
        .map(|r| {
            (
                r["step"].as_str().unwrap_or("").to_string(),
                r["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        reasons.iter().filter(|(s, _)| s == "decode").count(),
        2,
        "{reasons:#?}"
    );
    assert!(
        reasons.contains(&("validate".into(), "price: must be > 0, got -3.5".into())),
        "{reasons:#?}"
    );
    assert!(reasons.contains(&("validate".into(), r#"symbol: "msft" does not match `^[A-Z][A-Z0-9.]{0,9}$`; volume: must be >= 0, got -1"#.into())), "{reasons:#?}");
    assert_eq!(rejected.len(), 4, "{reasons:#?}");

    let sample =
        std::fs::read_to_string(repo().join("pipelines/samples/ticks.jsonl")).expect("sample");
    let expected = expected_bars(&sample);
    let bars: Vec<&Value> = lines
        .iter()
        .filter(|l| l["kind"] == "output")
        .map(|l| &l["row"])
        .collect();
    assert_eq!(bars.len(), expected.len(), "one bar per symbol and minute");
    let mut previous_close: BTreeMap<String, f64> = BTreeMap::new();
    let mut sorted: Vec<&Value> = bars.clone();
    sorted.sort_by_key(|b| {
        (
            b["symbol"].as_str().unwrap_or("").to_string(),
            ms(b["window_start"].as_str().unwrap_or("")),
        )
    });
    for bar in sorted {
        let symbol = bar["symbol"].as_str().expect("symbol").to_string();
        let start = ms(bar["window_start"].as_str().expect("window_start"));
        assert_eq!(
            ms(bar["window_end"].as_str().expect("window_end")) - start,
            60_000
        );
        let want = &expected[&(symbol.clone(), start)];
        let num = |k: &str| bar[k].as_f64().unwrap_or_else(|| panic!("{k} in {bar}"));
        assert!(close(num("open"), want.open.1), "open {bar}");
        assert!(close(num("close"), want.close.1), "close {bar}");
        assert!(close(num("high"), want.high), "high {bar}");
        assert!(close(num("low"), want.low), "low {bar}");
        assert!(
            close(num("avg_price"), want.sum / want.trades as f64),
            "avg {bar}"
        );
        assert_eq!(bar["volume"].as_i64(), Some(want.volume), "{bar}");
        assert_eq!(bar["trades"].as_i64(), Some(want.trades), "{bar}");
        match previous_close.insert(symbol, want.close.1) {
            None => assert!(bar["pct_change"].is_null(), "first bar of a symbol: {bar}"),
            Some(prev) => assert!(
                close(num("pct_change"), (want.close.1 - prev) / prev),
                "pct_change {bar}"
            ),
        }
    }
}

#[test]
fn a_bad_step_config_exits_2_and_names_the_key() {
    let cache = tempfile::tempdir().expect("tmp");
    let validate = common::plugin("flowgate_validate").display().to_string();
    let out = flowgate(
        &[
            "plugin",
            "test",
            &validate,
            "--config",
            "rules: {prize: {min: 0}}",
            "--schema",
            "pipelines/steps/ticks.schema.yaml",
            "--input",
            "pipelines/samples/ticks.jsonl",
        ],
        cache.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "create failed: invalid config: `rules.prize`: column `prize` is not in the input"
        ),
        "{stderr}"
    );

    let out = flowgate(
        &[
            "plugin",
            "test",
            &validate,
            "--config",
            "rules: {price: {min: zero}}",
            "--schema",
            "pipelines/steps/ticks.schema.yaml",
            "--input",
            "pipelines/samples/ticks.jsonl",
        ],
        cache.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`rules.price.min`: invalid type: string \"zero\", expected f64"),
        "{stderr}"
    );
}

#[test]
fn help_lists_the_harness() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["plugin", "test", "--help"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--input",
        "--schema",
        "--watermark",
        "--flush",
        "--format",
        "--plugin",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help:\n{text}");
    }
}

#[test]
fn a_perf_map_names_the_compiled_plugin_code_when_asked() {
    // `FLOWGATE_WASM_PROFILER=perfmap`: `/tmp/perf-<pid>.map` lists each function compiled in
    // the run, so `perf report` can name it; without it no map is written.
    let run = |profile: bool| {
        let cache = tempfile::tempdir().expect("tmp");
        let validate = common::plugin("flowgate_validate").display().to_string();
        let mut command = Command::new(env!("CARGO_BIN_EXE_flowgate"));
        command
            .args([
                "plugin",
                "test",
                &validate,
                "--config",
                "rules: {price: {min: 0}}",
            ])
            .args(["--schema", "pipelines/steps/ticks.schema.yaml"])
            .args(["--input", "pipelines/samples/ticks.jsonl", "--cache-dir"])
            .arg(cache.path())
            .current_dir(repo())
            .env_remove("FLOWGATE_WASM_PROFILER")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if profile {
            command.env("FLOWGATE_WASM_PROFILER", "perfmap");
        }
        let child = command.spawn().expect("run flowgate");
        let map = PathBuf::from(format!("/tmp/perf-{}.map", child.id()));
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&map).ok();
        let _ = std::fs::remove_file(&map);
        text
    };
    let text = run(true).expect("no perf map written");
    let functions = text.lines().filter(|l| l.contains("wasm")).count();
    assert!(
        functions > 100,
        "{functions} functions named:\n{text:.2000}"
    );
    assert_eq!(run(false), None, "a perf map written unasked");
}

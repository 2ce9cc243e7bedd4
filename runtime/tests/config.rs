//! Pipeline files: each kind of mistake gives an error naming the place (golden `.err` files
//! beside the fixtures; `FLOWGATE_BLESS=1` rewrites them), and every shipped pipeline is valid.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use flowgate::config::Pipeline;
use flowgate::engine::Plan;

fn check(path: &Path) -> Result<Plan, String> {
    let pipeline = Pipeline::load(path, &HashMap::new()).map_err(|e| e.to_string())?;
    Plan::build(&pipeline, &common::host()).map_err(|e| e.to_string())
}

#[test]
fn invalid_pipelines_fail_with_the_expected_errors() {
    common::plugin("flowgate_validate");
    let dir = Path::new("tests/pipelines/invalid");
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("fixtures")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    fixtures.sort();
    assert!(fixtures.len() >= 8, "fixtures missing");
    let bless = std::env::var_os("FLOWGATE_BLESS").is_some();
    let mut failures = Vec::new();
    for fixture in fixtures {
        let got = match check(&fixture) {
            Ok(_) => "(no error)".to_string(),
            Err(e) => e,
        };
        let golden = fixture.with_extension("err");
        if bless {
            std::fs::write(&golden, format!("{got}\n")).expect("bless");
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_else(|_| {
            format!(
                "{} is missing (run with FLOWGATE_BLESS=1)",
                golden.display()
            )
        });
        if got.trim_end() != want.trim_end() {
            failures.push(format!(
                "{}:\n  want: {}\n  got:  {}",
                fixture.display(),
                want.trim_end(),
                got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_shipped_pipeline_is_valid() {
    common::plugin("flowgate_validate");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("pipelines/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|x| x == "yaml") {
            let plan = check(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(plan.stages.len() >= 2, "{}", path.display());
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "expected the seed pipelines in {}",
        dir.display()
    );
}

#[test]
fn docker_compose_runs_the_seed_pipeline_against_kafka() {
    // No Docker engine here: check the file's structure and that it names what exists.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text =
        std::fs::read_to_string(root.join("docker-compose.yaml")).expect("docker-compose.yaml");
    let compose: serde_json::Value =
        flowgate::yaml::to_json(&text, "docker-compose.yaml").expect("valid YAML");
    let services = compose["services"].as_object().expect("services");
    for name in ["kafka", "producer", "flowgate"] {
        assert!(services.contains_key(name), "service `{name}` missing");
    }
    let command: Vec<&str> = services["flowgate"]["command"]
        .as_array()
        .expect("command")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(command[0], "run");
    assert!(
        root.join(command[1]).is_file(),
        "{} does not exist",
        command[1]
    );
    assert_eq!(
        services["flowgate"]["environment"]["KAFKA_BROKERS"],
        "kafka:9092"
    );
    assert_eq!(services["producer"]["command"][0], "produce");
    assert!(root.join("Dockerfile").is_file());
}

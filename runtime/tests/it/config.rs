//! Pipeline files: each kind of mistake gives an error naming the place (golden `.err` files
//! beside the fixtures; `FLOWGATE_BLESS=1` rewrites them), and every shipped pipeline is valid.

use crate::common;

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

/// `flowgate_…` metric names a PromQL expression uses, as registered (`_total`, `_bucket`,
/// `_count`, `_sum` are sample suffixes).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("flowgate_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_string();
        names.push(base);
    }
    names
}

#[test]
fn the_docker_compose_deployment_fits_together() {
    // No Docker engine here: check the files' structure, and that every name they use exists.
    common::plugin("flowgate_validate");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let read = |rel: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        if rel.ends_with(".json") {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
        } else {
            flowgate::yaml::to_json(&text, rel).unwrap_or_else(|e| panic!("{rel}: {e}"))
        }
    };
    let compose = read("docker-compose.yaml");
    let services = compose["services"].as_object().expect("services");
    for name in [
        "kafka",
        "postgres",
        "producer",
        "flowgate",
        "flowgate-postgres",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "service `{name}` missing");
    }
    assert_eq!(services["producer"]["command"][0], "produce");
    assert!(root.join("Dockerfile").is_file());

    // Each pipeline service runs a shipped pipeline that is valid, against the compose Kafka,
    // with its metrics endpoint on the port Prometheus scrapes.
    let prometheus = read("deploy/prometheus.yml");
    let targets: Vec<&str> = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    let mut plans = HashMap::new();
    for service in ["flowgate", "flowgate-postgres"] {
        let s = &services[service];
        assert_eq!(s["command"][0], "run", "{service}");
        let file = s["command"][1].as_str().expect("pipeline");
        let plan = check(&root.join(file)).unwrap_or_else(|e| panic!("{service}: {file}: {e}"));
        assert_eq!(s["environment"]["KAFKA_BROKERS"], "kafka:9092", "{service}");
        let listen = s["environment"]["METRICS_LISTEN"]
            .as_str()
            .expect("METRICS_LISTEN");
        let port = listen.rsplit(':').next().unwrap_or_default();
        assert!(
            targets.contains(&format!("{service}:{port}").as_str()),
            "Prometheus does not scrape {service}:{port}"
        );
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(
            text.contains("listen: \"${METRICS_LISTEN:-}\""),
            "{file} serves no metrics"
        );
        plans.insert(service, (file.to_string(), plan));
    }
    for target in &targets {
        let host = target.split(':').next().unwrap_or_default();
        assert!(
            services.contains_key(host),
            "Prometheus scrapes `{target}`, which is no service"
        );
    }
    assert!(
        services["flowgate-postgres"]["environment"]["DATABASE_URL"]
            .as_str()
            .is_some_and(|u| u.contains("@postgres:5432/"))
    );

    // The tables go to MinIO: the bucket the pipeline names is the one minio-init makes,
    // at the minio service's endpoint with its credentials, and the pipeline puts bars there.
    for name in ["minio", "minio-init"] {
        assert!(services.contains_key(name), "service `{name}` missing");
    }
    let env = &services["flowgate"]["environment"];
    let lake = env["LAKE"].as_str().expect("LAKE");
    let bucket = lake
        .strip_prefix("s3://")
        .and_then(|rest| rest.split('/').next())
        .expect("LAKE is an s3:// URL");
    let init = services["minio-init"]["entrypoint"].to_string();
    assert!(
        init.contains(&format!("mc mb --ignore-existing lake/{bucket}")),
        "{init}"
    );
    assert_eq!(env["AWS_ENDPOINT_URL"], "http://minio:9000");
    assert!(services["minio"]["ports"].to_string().contains("9000:9000"));
    assert_eq!(
        services["minio"]["environment"]["MINIO_ROOT_USER"],
        env["AWS_ACCESS_KEY_ID"]
    );
    assert_eq!(
        services["minio"]["environment"]["MINIO_ROOT_PASSWORD"],
        env["AWS_SECRET_ACCESS_KEY"]
    );
    let on_lake = flowgate::config::Pipeline::load(
        &root.join("pipelines/stocks.yaml"),
        &[("LAKE".to_string(), lake.to_string())].into(),
    )
    .expect("pipeline");
    let path_of = |name: &str| {
        on_lake
            .spec
            .sinks
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, s)| s.delta.as_ref().or(s.parquet.as_ref()))
            .map(|t| t.path.display().to_string())
    };
    assert_eq!(path_of("bars"), Some(format!("{lake}/bars")));
    assert_eq!(path_of("raw"), Some(format!("{lake}/raw")));

    // Mounted configuration exists.
    for service in ["prometheus", "grafana"] {
        for volume in services[service]["volumes"].as_array().expect("volumes") {
            let local = volume
                .as_str()
                .and_then(|v| v.split(':').next())
                .unwrap_or_default();
            assert!(
                root.join(local).exists(),
                "{service} mounts {local}, which does not exist"
            );
        }
    }

    // Dashboards: every datasource they name is provisioned; every Prometheus query names
    // metrics Flowgate registers; every PostgreSQL query reads columns the bars table has.
    let datasources = read("deploy/grafana/provisioning/datasources/datasources.yaml");
    let uids: Vec<&str> = datasources["datasources"]
        .as_array()
        .expect("datasources")
        .iter()
        .filter_map(|d| d["uid"].as_str())
        .collect();
    // A family shows in the text once it has a series: give each one.
    let metrics = flowgate::exporter::Metrics::new("x");
    {
        use flowgate::exporter::*;
        let partition = PartitionLabels {
            topic: "t".into(),
            partition: 0,
        };
        let stage = StageLabels { stage: "s".into() };
        let sink = SinkLabels { sink: "k".into() };
        metrics.records_in.get_or_create(&partition).inc();
        metrics.batches.get_or_create(&partition).inc();
        metrics.lag.get_or_create(&partition).set(1);
        metrics
            .rejected
            .get_or_create(&RejectLabels {
                stage: "s".into(),
                reason: "late".into(),
            })
            .inc();
        metrics.sink_rows.get_or_create(&sink).inc();
        metrics.step_call.get_or_create(&stage).observe(0.1);
        metrics.step_boundary.get_or_create(&stage).observe(0.1);
        metrics.commit.get_or_create(&sink).observe(0.1);
        metrics.committed("k");
        metrics
            .wasm_memory
            .get_or_create(&InstanceLabels {
                stage: "s".into(),
                topic: "t".into(),
                partition: 0,
            })
            .set(1);
    }
    let registered = metrics.render();
    let (pg_file, pg_plan) = &plans["flowgate-postgres"];
    let pg_pipeline =
        flowgate::config::Pipeline::load(&root.join(pg_file), &HashMap::new()).expect("pipeline");
    let bars_from = pg_pipeline
        .spec
        .sinks
        .iter()
        .find(|(n, _)| *n == "bars")
        .and_then(|(_, s)| s.from.clone());
    let bars = &pg_plan.stages[pg_plan.stage_of(bars_from.as_deref())];
    let mut queries = 0;
    for dashboard in [
        "deploy/grafana/dashboards/pipeline-health.json",
        "deploy/grafana/dashboards/bars.json",
    ] {
        let d = read(dashboard);
        assert!(
            d["uid"].is_string() && d["title"].is_string(),
            "{dashboard}"
        );
        for panel in d["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let uid = target["datasource"]["uid"]
                    .as_str()
                    .expect("datasource uid");
                assert!(
                    uids.contains(&uid),
                    "{dashboard}: datasource `{uid}` is not provisioned"
                );
                if let Some(expr) = target["expr"].as_str() {
                    let names = metric_names(expr);
                    assert!(
                        !names.is_empty(),
                        "{dashboard}: `{expr}` names no flowgate metric"
                    );
                    for name in names {
                        assert!(
                            registered.contains(&format!("# TYPE {name} ")),
                            "{dashboard}: `{name}` is not a metric Flowgate serves"
                        );
                    }
                    queries += 1;
                }
                if let Some(sql) = target["rawSql"].as_str() {
                    let select = sql
                        .split_once("SELECT ")
                        .and_then(|(_, r)| r.split_once(" FROM bars"))
                        .map(|(cols, _)| cols)
                        .unwrap_or_else(|| panic!("{dashboard}: `{sql}` does not read `bars`"));
                    for column in select.split(',') {
                        let column = column
                            .trim()
                            .trim_start_matches("DISTINCT ")
                            .split(' ')
                            .next()
                            .unwrap_or_default();
                        assert!(
                            bars.index_of(column).is_ok(),
                            "{dashboard}: the bars table has no column `{column}`"
                        );
                    }
                    queries += 1;
                }
            }
        }
    }
    assert!(queries >= 10, "{queries} queries checked");
}

#[test]
fn the_kubernetes_manifest_fits_together() {
    // No cluster here: check the manifest's structure, and that the pipeline it runs keeps
    // everything a moved partition needs (tables and plugin state) on S3, not on a replica.
    common::plugin("flowgate_validate");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rel = "deploy/k8s/flowgate.yaml";
    let text = std::fs::read_to_string(root.join(rel)).expect("manifest");
    let manifest = flowgate::yaml::to_json(&text, rel).expect("YAML");
    let items = manifest["items"].as_array().expect("a List");
    let of_kind = |kind: &str| {
        items
            .iter()
            .find(|i| i["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let deployment = of_kind("Deployment");
    let secret = of_kind("Secret");
    assert!(
        deployment["spec"]["replicas"]
            .as_i64()
            .is_some_and(|n| n >= 2)
    );
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"],
        deployment["spec"]["template"]["metadata"]["labels"]
    );
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"][0], "run");
    let file = container["args"][1].as_str().expect("pipeline");
    check(&root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let env: HashMap<String, String> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().expect("name").to_string(),
                e["value"].as_str().expect("value").to_string(),
            )
        })
        .collect();
    let port = env["METRICS_LISTEN"].rsplit(':').next().expect("port");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            container[probe]["httpGet"]["port"].to_string(),
            port,
            "{probe}"
        );
    }
    assert_eq!(
        container["envFrom"][0]["secretRef"]["name"],
        secret["metadata"]["name"]
    );
    for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert!(
            secret["stringData"][key].is_string(),
            "the Secret lacks {key}"
        );
    }
    // The pipeline as the pods load it: every table and the checkpoint store on S3, the hop on.
    let pipeline = Pipeline::load(&root.join(file), &env).expect("pipeline");
    let spec = &pipeline.spec;
    assert!(
        spec.repartition.is_some(),
        "replicas share keys only through the hop"
    );
    let on_s3 = |path: &Path| path.to_string_lossy().starts_with("s3://");
    assert!(
        on_s3(&spec.checkpoint.path),
        "{}",
        spec.checkpoint.path.display()
    );
    for (name, sink) in spec
        .sinks
        .iter()
        .chain(spec.dead_letter.iter().map(|d| ("dead_letter", d)))
    {
        let path = sink
            .delta
            .as_ref()
            .or(sink.parquet.as_ref())
            .map(|t| t.path.clone())
            .or(sink.csv.as_ref().map(|c| c.path.clone()));
        if let Some(path) = path {
            assert!(
                on_s3(&path),
                "sink `{name}` writes {} on the pod",
                path.display()
            );
        }
    }
    let kafka = spec.source.kafka.as_ref().expect("kafka");
    assert_eq!(kafka.brokers.bootstrap(), env["KAFKA_BROKERS"]);
    assert_eq!(kafka.group, env["GROUP"]);
}

//! Live metrics for Prometheus: `metrics: {listen: 127.0.0.1:9464}` in a pipeline serves them as
//! OpenMetrics text at `/metrics`, with `/healthz` (the process answers) and `/readyz` (it holds
//! partitions and has not failed) for orchestrators, and the status page at `/` (with its data
//! at `/status.json`, see [`crate::status`]). Names follow Prometheus conventions
//! (`flowgate_…_total`, `…_seconds`, `…_bytes`); every series carries `pipeline`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// A source partition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: i32,
}

/// A pipeline stage: `decode` or a step's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

/// Why records were refused, by stage: `undecodable` (decode), `rejected` (a plugin refused the
/// row), `late` (behind the watermark), `refused_batch` / `skipped_batch` (`on_error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub stage: String,
    pub reason: String,
}

/// A sink (the dead letter is `dead_letter`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    pub sink: String,
}

/// One step's WASM instance, for one partition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub stage: String,
    pub topic: String,
    pub partition: i32,
}

type Timings<L> = Family<L, Histogram, fn() -> Histogram>;

fn call_buckets() -> Histogram {
    // 10 µs … ~10 s.
    Histogram::new(exponential_buckets(1e-5, 2.0, 21))
}

/// Every metric a run keeps, whether or not an endpoint serves them (updating one is an atomic
/// add, per batch or per commit, never per record).
pub struct Metrics {
    registry: Registry,
    pub records_in: Family<PartitionLabels, Counter>,
    pub batches: Family<PartitionLabels, Counter>,
    pub rejected: Family<RejectLabels, Counter>,
    pub sink_rows: Family<SinkLabels, Counter>,
    pub step_call: Timings<StageLabels>,
    pub step_boundary: Timings<StageLabels>,
    pub commit: Timings<SinkLabels>,
    commit_age: Family<SinkLabels, Gauge<f64, AtomicU64>>,
    last_commit: Mutex<HashMap<String, Instant>>,
    pub epoch: Gauge,
    pub lag: Family<PartitionLabels, Gauge>,
    pub wasm_memory: Family<InstanceLabels, Gauge>,
    ready: AtomicBool,
    /// What the status page shows besides the metrics (kept up only while served).
    pub board: crate::status::Board,
    serving: AtomicBool,
    pipeline: String,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The metrics of pipeline `pipeline`, registered.
    pub fn new(pipeline: &str) -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix_and_labels(
                "flowgate",
                [(Cow::Borrowed("pipeline"), Cow::Owned(pipeline.to_string()))].into_iter(),
            ),
            records_in: Family::default(),
            batches: Family::default(),
            rejected: Family::default(),
            sink_rows: Family::default(),
            step_call: Family::new_with_constructor(call_buckets),
            step_boundary: Family::new_with_constructor(call_buckets),
            commit: Family::new_with_constructor(call_buckets),
            commit_age: Family::default(),
            last_commit: Mutex::new(HashMap::new()),
            epoch: Gauge::default(),
            lag: Family::default(),
            wasm_memory: Family::default(),
            ready: AtomicBool::new(false),
            board: Default::default(),
            serving: AtomicBool::new(false),
            pipeline: pipeline.to_string(),
        };
        let registry = &mut m.registry;
        registry.register(
            "records_in",
            "Records taken from the source and processed, per partition",
            m.records_in.clone(),
        );
        registry.register(
            "batches",
            "Batches run through decode and the plugin chain, per partition",
            m.batches.clone(),
        );
        registry.register(
            "rejected",
            "Records or rows refused, by stage and reason (undecodable, rejected, late, refused_batch, skipped_batch)",
            m.rejected.clone(),
        );
        registry.register(
            "sink_rows",
            "Rows handed to each sink (committed with the next epoch)",
            m.sink_rows.clone(),
        );
        registry.register_with_unit(
            "step_call",
            "Time of one plugin call (process or on-watermark), WASM boundary included, per step",
            Unit::Seconds,
            m.step_call.clone(),
        );
        registry.register_with_unit(
            "step_boundary",
            "Of each plugin call, the host's share of the WASM boundary (Arrow IPC in and out), per step",
            Unit::Seconds,
            m.step_boundary.clone(),
        );
        registry.register_with_unit(
            "sink_commit",
            "Time of one sink commit (rows and positions made visible)",
            Unit::Seconds,
            m.commit.clone(),
        );
        registry.register_with_unit(
            "sink_last_commit_age",
            "Time since the sink's last commit that wrote something",
            Unit::Seconds,
            m.commit_age.clone(),
        );
        registry.register(
            "epoch_committed",
            "The last epoch committed in every sink",
            m.epoch.clone(),
        );
        registry.register(
            "partition_lag",
            "Records waiting at the broker, per assigned partition (librdkafka statistics)",
            m.lag.clone(),
        );
        registry.register_with_unit(
            "wasm_memory",
            "Linear memory of each step's WASM instance, per partition (at the last epoch barrier)",
            Unit::Bytes,
            m.wasm_memory.clone(),
        );
        m
    }

    /// A sink committed something now.
    pub fn committed(&self, sink: &str) {
        if let Ok(mut last) = self.last_commit.lock() {
            last.insert(sink.to_string(), Instant::now());
        }
    }

    /// Whether an endpoint serves these metrics (and the status page).
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// Whether the run holds partitions and has not failed (`/readyz`).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The OpenMetrics text of every metric, as of now.
    pub fn render(&self) -> String {
        if let Ok(last) = self.last_commit.lock() {
            for (sink, at) in last.iter() {
                self.commit_age
                    .get_or_create(&SinkLabels { sink: sink.clone() })
                    .set(at.elapsed().as_secs_f64());
            }
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!("encoding metrics: {e}");
        }
        text
    }

    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, kind, body) = match path {
            "/" => (
                StatusCode::OK,
                "text/html; charset=utf-8",
                crate::status::PAGE.to_string(),
            ),
            "/status.json" => (
                StatusCode::OK,
                "application/json",
                self.board.json(&self.pipeline, &self.render()).to_string(),
            ),
            "/metrics" => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.render(),
            ),
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
            "/readyz" if self.ready.load(Ordering::Relaxed) => {
                (StatusCode::OK, "text/plain", "ready\n".to_string())
            }
            "/readyz" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready: no partitions assigned yet, or the run is stopping\n".to_string(),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: / (the status page), /status.json, /metrics, /healthz, /readyz\n"
                    .to_string(),
            ),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = hyper::header::HeaderValue::from_str(kind) {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    }
}

/// Serves `metrics` on `listen` from `rt` until the runtime stops. Binding happens here, so a
/// taken port is an error at start, not a silent gap in the graphs.
pub fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    rt: &tokio::runtime::Runtime,
) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    metrics.serving.store(true, Ordering::Relaxed);
    rt.spawn(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("metrics endpoint: {e}");
                return;
            }
        };
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("metrics endpoint: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let response = metrics.respond(request.uri().path());
                    async move { Ok::<_, Infallible>(response) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!("metrics endpoint: a connection ended: {e}");
                }
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions_and_carry_the_pipeline() {
        let m = Metrics::new("stocks");
        m.records_in
            .get_or_create(&PartitionLabels {
                topic: "ticks".into(),
                partition: 2,
            })
            .inc_by(7);
        m.step_call
            .get_or_create(&StageLabels {
                stage: "dedup".into(),
            })
            .observe(0.002);
        m.committed("bars");
        let text = m.render();
        assert!(
            text.contains(
                "flowgate_records_in_total{pipeline=\"stocks\",topic=\"ticks\",partition=\"2\"} 7"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "flowgate_step_call_seconds_count{pipeline=\"stocks\",stage=\"dedup\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "flowgate_sink_last_commit_age_seconds{pipeline=\"stocks\",sink=\"bars\"}"
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}

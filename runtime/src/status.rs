//! The live status page: `GET /` on the metrics listener is a page (embedded in the binary, no
//! network) that polls `GET /status.json` and draws the pipeline as a graph of its steps and
//! sinks with rows/s, refusals by reason, lag per partition, the epoch and last commit per sink,
//! swaps applied and refused, the newest dead-letter rows, and a candlestick chart of the newest
//! rows of the chain's output for a chosen key.
//!
//! Every number the page shows that `/metrics` also has is read from the same OpenMetrics text
//! (parsed here), so the two always agree; what the committer counted (rows per table, rows per
//! key, the newest rows) comes from the tallies it publishes after each commit.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::{Value, json};

use crate::engine::tally::{self, TableTally};

/// The page itself.
pub const PAGE: &str = include_str!("status.html");

/// What the page shows besides the metrics.
#[derive(Debug, Default)]
pub struct Board {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    graph: Value,
    /// Per committer (the two halves of a repartitioned run have one each): its tables.
    tables: Vec<Vec<TableTally>>,
    swaps: Vec<Value>,
    started_ms: i64,
}

impl Board {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The steps after a live swap.
    pub fn set_steps(&self, steps: Vec<String>) {
        let mut inner = self.inner();
        if let Some(graph) = inner.graph.as_object_mut() {
            graph.insert("steps".into(), json!(steps));
        }
    }

    /// Sets the pipeline's graph (at start).
    pub fn set_graph(&self, graph: Value) {
        let mut inner = self.inner();
        inner.graph = graph;
        if inner.started_ms == 0 {
            inner.started_ms = chrono::Utc::now().timestamp_millis();
        }
    }

    /// A slot for one committer's tables.
    pub fn slot(&self) -> usize {
        let mut inner = self.inner();
        inner.tables.push(Vec::new());
        inner.tables.len() - 1
    }

    /// The tables committer `slot` has committed so far.
    pub fn publish(&self, slot: usize, tables: &[TableTally]) {
        let mut inner = self.inner();
        if let Some(s) = inner.tables.get_mut(slot) {
            *s = tables.to_vec();
        }
    }

    /// A live swap, applied or refused.
    pub fn swap(&self, swap: Value) {
        self.inner().swaps.push(swap);
    }

    /// The page's data: the graph, the samples of `metrics` (OpenMetrics text), the tables.
    pub fn json(&self, pipeline: &str, metrics: &str) -> Value {
        let inner = self.inner();
        let mut tables: Vec<TableTally> = Vec::new();
        for t in &inner.tables {
            tally::merge(&mut tables, t.clone());
        }
        let tables: Vec<Value> = tables
            .iter()
            .filter(|t| !t.is_hidden())
            .map(|t| {
                json!({
                    "name": t.name,
                    "rows": t.rows,
                    "dead_letter": t.dead_letter,
                    "key": t.key,
                    "per_key": t.per_key,
                    "columns": t.columns,
                    "newest": t.newest_rows(),
                    "refused": t.refused.iter().map(|((stage, reason), n)| json!({"stage": stage, "reason": reason, "rows": n})).collect::<Vec<_>>(),
                    "dead_newest": t.dead_newest,
                })
            })
            .collect();
        json!({
            "pipeline": pipeline,
            "started_ms": inner.started_ms,
            "now_ms": chrono::Utc::now().timestamp_millis(),
            "graph": inner.graph,
            "metrics": samples(metrics),
            "tables": tables,
            "swaps": inner.swaps,
        })
    }
}

/// The samples of OpenMetrics text as `{name, labels, value}` (histogram buckets left out).
pub fn samples(text: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, labels_of(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        if name.ends_with("_bucket") {
            continue;
        }
        out.push(json!({"name": name, "labels": labels, "value": value}));
    }
    out
}

/// `a="x",b="y\"z"` as a map (OpenMetrics escapes `\\`, `\"` and `\n` in values).
fn labels_of(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if name.is_empty() || chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(name.trim_start_matches(',').to_string(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    labels
}

/// The pipeline as the page draws it: the source, the steps in order, each sink with the stage
/// it reads.
pub fn graph(pipeline: &crate::config::PipelineSpec) -> Value {
    let source = match pipeline.source.kind() {
        Some(crate::config::SourceKind::Kafka(k, g)) => {
            let topics = k
                .topic
                .clone()
                .map(|t| vec![t])
                .or_else(|| k.topics.clone())
                .unwrap_or_default();
            format!(
                "kafka {}{}",
                topics.join(", "),
                if g.is_some() {
                    " (embedded broker, generator)"
                } else {
                    ""
                }
            )
        }
        Some(crate::config::SourceKind::File(f)) => format!("file {}", f.path.display()),
        Some(crate::config::SourceKind::Generator(_)) => "generator".into(),
        None => "source".into(),
    };
    let steps: Vec<&str> = pipeline
        .transforms
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    let last = steps.last().copied().unwrap_or("source");
    let mut sinks: Vec<Value> = pipeline
        .sinks
        .iter()
        .map(|(name, s)| {
            json!({
                "name": name,
                "from": s.from.as_deref().unwrap_or(last),
                "format": s.format_name(),
            })
        })
        .collect();
    if let Some(d) = &pipeline.dead_letter {
        sinks.push(
            json!({"name": "dead_letter", "from": "refused rows", "format": d.format_name()}),
        );
    }
    json!({
        "source": source,
        "repartition": pipeline.repartition.as_ref().map(|r| r.by.clone()),
        // Its records count in `flowgate_records_in_total` too: the page leaves them out.
        "hop_topic": pipeline.repartition.as_ref().map(|r| r.topic_of(&pipeline.name)),
        "steps": steps,
        "sinks": sinks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_read_names_labels_and_values_and_skip_buckets() {
        let text = "# TYPE flowgate_records_in counter\n\
            flowgate_records_in_total{pipeline=\"demo\",topic=\"ticks\",partition=\"2\"} 7\n\
            flowgate_epoch_committed{pipeline=\"a \\\"q\\\" b\"} 12\n\
            flowgate_step_call_seconds_bucket{le=\"0.1\"} 3\n\
            # EOF\n";
        let got = samples(text);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0]["name"], "flowgate_records_in_total");
        assert_eq!(got[0]["labels"]["partition"], "2");
        assert_eq!(got[0]["labels"]["topic"], "ticks");
        assert_eq!(got[0]["value"], 7.0);
        assert_eq!(got[1]["labels"]["pipeline"], "a \"q\" b");
    }

    #[test]
    fn the_page_is_self_contained() {
        assert!(PAGE.contains("/status.json"));
        for external in [
            "src=\"http",
            "href=\"http",
            "<script src",
            "<link ",
            "@import",
            "url(http",
        ] {
            assert!(
                !PAGE.contains(external),
                "the page loads nothing from elsewhere: {external}"
            );
        }
    }
}

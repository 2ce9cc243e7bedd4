//! A pipeline on the embedded broker starts its tables anew each run.
//!
//! The embedded broker (librdkafka's mock cluster) keeps nothing after the process exits, so a
//! second run reads a new stream whose offsets start at 0 again, with event times that overlap
//! the first run's. The offsets its tables hold mean nothing for it, and continuing them would
//! put two runs' bars for one minute side by side. So, before any sink opens, the tables this
//! pipeline wrote and its stored plugin state are removed, and the run says so in one line. A
//! table that holds anything another writer committed is never touched: the run stops instead,
//! naming it.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::plan::{RunError, delta_location, file_place};
use crate::checkpoint::StateStore;
use crate::config::{Pipeline, SinkSpec, SourceKind};

/// Whether the pipeline's source starts empty every run (the embedded broker).
pub(crate) fn ephemeral(pipeline: &Pipeline) -> bool {
    match pipeline.spec.source.kind() {
        Some(SourceKind::Kafka(k, _)) => k.brokers.is_embedded(),
        Some(SourceKind::Generator(_)) => true,
        _ => false,
    }
}

/// The topics the pipeline reads (its repartition topic included).
fn topics(pipeline: &Pipeline) -> Vec<String> {
    let mut topics = source_topics(pipeline);
    if let Some(hop) = &pipeline.spec.repartition {
        topics.push(hop.topic_of(&pipeline.spec.name));
    }
    topics
}

fn source_topics(pipeline: &Pipeline) -> Vec<String> {
    match pipeline.spec.source.kind() {
        Some(SourceKind::Kafka(k, _)) => k
            .topics
            .clone()
            .or_else(|| k.topic.clone().map(|t| vec![t]))
            .unwrap_or_default(),
        Some(SourceKind::Generator(g)) => vec![g.topic.clone()],
        _ => Vec::new(),
    }
}

/// Whether Delta `txn` app id `app` is one of `pipeline`'s positions for one of `topics`
/// (`flowgate-{pipeline}-{topic}-{partition}`, and its `.epoch` twin).
fn own_app_id(app: &str, pipeline: &str, topics: &[String]) -> bool {
    let app = app.strip_suffix(".epoch").unwrap_or(app);
    let Some(rest) = app.strip_prefix(&format!("flowgate-{pipeline}-")) else {
        return false;
    };
    topics.iter().any(|t| {
        rest.strip_prefix(t.as_str())
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

fn when(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| format!(", last written {}", t.format("%Y-%m-%d %H:%M:%S UTC")))
        .unwrap_or_default()
}

/// One table found at start: where, what it is, and whether another writer committed into it.
struct Found {
    location: String,
    what: String,
    foreign: Option<String>,
    remove: Box<dyn FnOnce() -> Result<(), String>>,
}

/// What sink `name` (spec `spec`) has on disk; `None`: nothing yet.
fn inspect(
    pipeline: &Pipeline,
    name: &str,
    spec: &SinkSpec,
    rt: &Arc<tokio::runtime::Runtime>,
) -> Result<Option<Found>, RunError> {
    let this = pipeline.spec.name.as_str();
    let topics = topics(pipeline);
    let fail = |message: String| {
        RunError::Sink(crate::sink::SinkError::Config {
            sink: name.into(),
            message,
        })
    };
    if spec.postgres.is_some() {
        return Err(RunError::Config(format!(
            "sink `{name}`: the embedded broker starts empty every run, so pipeline `{this}` starts its tables anew each time; a PostgreSQL table is not started anew by Flowgate (it may hold other writers' rows): read from a real Kafka (`source.kafka.brokers`), or use a Delta, Parquet or CSV sink"
        )));
    }
    if let Some(t) = &spec.delta {
        let location = delta_location(pipeline, name, t)?;
        let Some(writers) = crate::sink::log_writers(&location, rt).map_err(fail)? else {
            return Ok(None);
        };
        let others: Vec<&String> = writers
            .app_ids
            .iter()
            .filter(|a| !own_app_id(a, this, &topics))
            .collect();
        let foreign = if let Some(first) = others.first() {
            Some(format!(
                "its log records positions of another writer (`txn` app id `{first}`{})",
                if others.len() > 1 {
                    format!(" and {} more", others.len() - 1)
                } else {
                    String::new()
                }
            ))
        } else if writers.app_ids.is_empty() && writers.has_rows {
            Some("it holds rows no Flowgate pipeline committed".to_string())
        } else {
            None
        };
        let shown = location.to_string();
        let rt = rt.clone();
        return Ok(Some(Found {
            location: shown,
            what: format!(
                "Delta, {} versions{}",
                writers.version + 1,
                when(writers.committed_ms)
            ),
            foreign,
            remove: Box::new(move || crate::storage::remove_tree(&location, &rt)),
        }));
    }
    let (path, options) = match (&spec.parquet, &spec.csv) {
        (Some(t), _) => (&t.path, &t.storage_options),
        (None, Some(c)) => (&c.path, &c.storage_options),
        (None, None) => return Ok(None),
    };
    let place = file_place(pipeline, name, path, options, rt)?;
    let writers = crate::sink::file_writers(&place).map_err(fail)?;
    if writers.entries.is_empty() {
        return Ok(None);
    }
    let foreign = writers
        .entries
        .iter()
        .find(|(p, topics_written)| {
            if p.is_empty() {
                topics_written.iter().any(|t| !topics.contains(t))
            } else {
                p != this
            }
        })
        .map(|(p, t)| {
            if p.is_empty() {
                format!("its commit log records positions of topics {t:?}, which this pipeline does not read")
            } else {
                format!("its commit log records positions of pipeline `{p}`")
            }
        });
    let location = super::plan::table_location(pipeline, name, path, options)?;
    let rt = rt.clone();
    Ok(Some(Found {
        location: place.to_string(),
        what: format!(
            "{}, {} commits{}",
            if spec.parquet.is_some() {
                "Parquet"
            } else {
                "CSV"
            },
            writers.entries.len(),
            when(writers.written_ms)
        ),
        foreign,
        remove: Box::new(move || crate::storage::remove_tree(&location, &rt)),
    }))
}

/// Removes the tables `pipeline` (on the embedded broker) wrote, and its stored state; refuses,
/// touching nothing, if any of them holds another writer's commits.
pub(crate) fn start_anew(
    pipeline: &Pipeline,
    store: &dyn StateStore,
    rt: &Arc<tokio::runtime::Runtime>,
) -> Result<(), RunError> {
    let spec = &pipeline.spec;
    let mut found = Vec::new();
    let mut seen = BTreeSet::new();
    let sinks = spec
        .sinks
        .iter()
        .chain(spec.dead_letter.iter().map(|d| ("dead_letter", d)));
    for (name, sink) in sinks {
        if let Some(f) = inspect(pipeline, name, sink, rt)? {
            if let Some(why) = &f.foreign {
                return Err(RunError::Config(format!(
                    "sink `{name}`: the embedded broker starts empty every run, so pipeline `{}` starts its tables anew each time, but `{}` ({}) is not only its own: {why}. It is left untouched: give the sink a `path` of its own, or remove that table if it is a leftover",
                    spec.name, f.location, f.what
                )));
            }
            // Two sinks may name one table (the same dead letter, say): removed once.
            if seen.insert(f.location.clone()) {
                found.push(f);
            }
        }
    }
    let mut removed = Vec::new();
    for f in found {
        (f.remove)().map_err(|message| {
            RunError::Config(format!(
                "cannot start `{}` anew for the embedded broker's new stream: {message}",
                f.location
            ))
        })?;
        removed.push(format!("{} ({})", f.location, f.what));
    }
    store.clear()?;
    if removed.is_empty() {
        tracing::info!(
            "the embedded broker starts empty every run: pipeline `{}` writes its tables from scratch",
            spec.name
        );
    } else {
        tracing::info!(
            "the embedded broker starts empty every run, so pipeline `{}` starts its tables anew: removed {} and its stored plugin state",
            spec.name,
            removed.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::own_app_id;

    #[test]
    fn only_the_pipelines_own_positions_count_as_its_own() {
        let topics = vec!["ticks".to_string()];
        assert!(own_app_id("flowgate-demo-ticks-0", "demo", &topics));
        assert!(own_app_id("flowgate-demo-ticks-12.epoch", "demo", &topics));
        assert!(!own_app_id("flowgate-demo-x-ticks-0", "demo", &topics));
        assert!(!own_app_id("flowgate-stocks-ticks-0", "demo", &topics));
        assert!(!own_app_id("flowgate-demo-ticks-", "demo", &topics));
        assert!(!own_app_id("flowgate-demo-other-1", "demo", &topics));
        assert!(!own_app_id("kafka-delta-ingest-0", "demo", &topics));
    }
}

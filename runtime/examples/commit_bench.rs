//! Delta commit cost as a table's log grows: one sink appends VERSIONS commits (ROWS rows and one
//! partition's offset each) to a fresh local table with the pipelines' default upkeep (a log
//! checkpoint every 100 commits, compaction every 10 minutes), and reports the median commit
//! time near version 10 and near the last version.
//!
//! `cargo run --release -p flowgate --example commit_bench [VERSIONS] [ROWS] [FOLDER]` (default
//! 10,000 versions of 100 rows, in a temporary folder).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use flowgate::sink::maintenance::Plan;
use flowgate::sink::{DeltaOptions, DeltaSink, Position, Positions, Sink, TableShape};
use flowgate::storage::TableLocation;

/// Commits per window the medians are taken over.
const WINDOW: usize = 50;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let versions: usize = args
        .next()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(10_000);
    let rows: usize = args.next().map(|v| v.parse()).transpose()?.unwrap_or(100);
    let temp = tempfile::tempdir()?;
    let folder = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| temp.path().join("t"));
    anyhow::ensure!(
        versions >= 2 * WINDOW,
        "VERSIONS must be at least {}",
        2 * WINDOW
    );

    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?,
    );
    let schema = Arc::new(Schema::new(vec![
        Field::new("symbol", DataType::Utf8, false),
        Field::new("v", DataType::Int64, false),
    ]));
    let shape = TableShape::new("t", &schema, &[], None, None)?;
    let options = DeltaOptions {
        partition_by: Vec::new(),
        target_file_size: 128 << 20,
        schema_mode: flowgate::config::SchemaMode::Strict,
        maintenance: Some(Plan {
            optimize_every: Some(Duration::from_secs(600)),
            target_file_size: 128 << 20,
            vacuum_retention: None,
            checkpoint_every: 100,
        }),
    };
    let location = TableLocation::folder(&folder).map_err(anyhow::Error::msg)?;
    let mut sink = DeltaSink::open("t", location, "bench", shape, options, rt)?;
    let symbols: Vec<String> = (0..rows).map(|i| format!("S{:03}", i % 500)).collect();
    let mut times = Vec::with_capacity(versions);
    let started = Instant::now();
    for i in 0..versions {
        let values: Vec<i64> = (0..rows as i64)
            .map(|r| i as i64 * rows as i64 + r)
            .collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(symbols.clone())),
                Arc::new(Int64Array::from(values)),
            ],
        )?;
        sink.write(batch)?;
        let positions: Positions = [(
            ("ticks".to_string(), 0),
            Position {
                offset: ((i + 1) * rows) as i64 - 1,
                epoch: 1,
            },
        )]
        .into();
        let commit = Instant::now();
        anyhow::ensure!(sink.commit(&positions)?, "commit {i} recorded nothing");
        times.push(commit.elapsed());
        if (i + 1) % 1000 == 0 {
            eprintln!(
                "{} commits, {:.1} s, last {:.2} ms",
                i + 1,
                started.elapsed().as_secs_f64(),
                ms(times[i])
            );
        }
    }
    let median = |window: &[Duration]| {
        let mut w = window.to_vec();
        w.sort();
        ms(w[w.len() / 2])
    };
    let early = median(&times[..WINDOW]);
    let late = median(&times[versions - WINDOW..]);
    println!(
        "{versions} commits of {rows} rows in {:.1} s; median commit: versions 1-{WINDOW} {early:.2} ms, versions {}-{versions} {late:.2} ms, ratio {:.2}",
        started.elapsed().as_secs_f64(),
        versions - WINDOW + 1,
        late / early
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

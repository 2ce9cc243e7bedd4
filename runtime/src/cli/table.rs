//! `flowgate table`: upkeep of a Delta table by hand (what a Delta sink's `maintenance` does on
//! its own while a pipeline runs).

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;

use crate::sink::maintenance;
use crate::storage::TableLocation;

/// Below this retention, `vacuum` wants `--force`: a younger file no commit names may be one a
/// running writer has staged for its next commit.
const SAFE_RETENTION: Duration = Duration::from_secs(3600);

#[derive(Debug, Subcommand)]
pub enum TableCommand {
    /// Print a table's version, data files, rows or bytes, partitions, columns, and the
    /// source position each pipeline's commits recorded per partition (Delta, Parquet or CSV).
    Info {
        /// The table: a folder, or `s3://bucket/prefix` (settings from `AWS_*`).
        path: String,
    },
    /// Compact small data files into files of about `--target-file-size` (safe while a
    /// pipeline appends to the table: the compaction changes no data and no offsets).
    Optimize {
        /// The table: a folder, or `s3://bucket/prefix` (settings from `AWS_*`).
        path: String,
        /// Size to pack files up to, in bytes.
        #[arg(long, value_name = "BYTES", default_value_t = 128 << 20)]
        target_file_size: u64,
    },
    /// Delete data files that left the table (compacted away) longer ago than `--retention`,
    /// and files no commit names that are older than that.
    Vacuum {
        /// The table: a folder, or `s3://bucket/prefix` (settings from `AWS_*`).
        path: String,
        /// How long a file that left the table is kept (readers of older versions need it).
        #[arg(long, default_value = "7d", value_parser = super::parse_duration)]
        retention: Duration,
        /// List what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Allow a retention under 1h: only when no pipeline is writing the table.
        #[arg(long)]
        force: bool,
    },
    /// Write a log checkpoint at the current version (readers then skip replaying the log).
    Checkpoint {
        /// The table: a folder, or `s3://bucket/prefix` (settings from `AWS_*`).
        path: String,
    },
}

fn open(path: &str, rt: &tokio::runtime::Runtime) -> anyhow::Result<deltalake::DeltaTable> {
    let location =
        TableLocation::parse(path, Path::new("."), HashMap::new()).map_err(super::UsageError)?;
    rt.block_on(maintenance::open(&location))
        .with_context(|| format!("cannot open the Delta table at `{path}`"))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn when(ms: Option<i64>) -> String {
    ms.filter(|&ms| ms > 0)
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "time not recorded".into())
}

/// `flowgate table info`: a Delta table from its log, else a Parquet/CSV table from its commit
/// log (`_flowgate_log/`).
fn info(path: &str, rt: tokio::runtime::Runtime) -> anyhow::Result<()> {
    let rt = std::sync::Arc::new(rt);
    let location =
        TableLocation::parse(path, Path::new("."), HashMap::new()).map_err(super::UsageError)?;
    let delta = crate::sink::log_writers(&location, &rt);
    if let Ok(Some(writers)) = &delta {
        let table = open(path, &rt)?;
        let snapshot = table.snapshot()?;
        let (mut files, mut bytes) = (0usize, 0u64);
        let mut partitions = std::collections::BTreeSet::new();
        for view in snapshot.log_data().iter() {
            files += 1;
            bytes += u64::try_from(view.size()).unwrap_or(0);
            let mut values: Vec<_> = view.partition_values_map().into_iter().collect();
            values.sort();
            partitions.insert(values);
        }
        println!("table:      {path} (Delta)");
        println!("version:    {}", snapshot.version());
        println!("data files: {files}");
        println!("bytes:      {bytes} ({})", mib(bytes));
        println!("partitions: {}", partitions.len());
        println!(
            "columns:    {}",
            flowgate_sdk::columns::describe_schema(&snapshot.snapshot().arrow_schema())
        );
        println!(
            "positions:  {}",
            if writers.positions.is_empty() {
                "none recorded"
            } else {
                "(txn app id: last offset covered, checkpoint epoch, recorded by)"
            }
        );
        for (app, (position, version, ms)) in &writers.positions {
            println!(
                "  {app}: offset {}, epoch {}, version {version}, {}",
                position.offset,
                position.epoch,
                when(*ms)
            );
        }
        return Ok(());
    }
    let place = crate::sink::Place::at(&location, &rt).map_err(anyhow::Error::msg)?;
    let writers = crate::sink::file_writers(&place).map_err(anyhow::Error::msg)?;
    if writers.entries.is_empty() {
        let why = match delta {
            Err(e) => format!(": as Delta: {e}"),
            _ => String::new(),
        };
        anyhow::bail!(
            "no table at `{path}`: neither a Delta log (`_delta_log/`) nor a Flowgate Parquet/CSV commit log (`_flowgate_log/`) with entries{why}"
        );
    }
    println!("table:      {path} (Parquet or CSV files with a Flowgate commit log)");
    println!(
        "commits:    {}, the newest {}",
        writers.entries.len(),
        when(writers.written_ms)
    );
    println!("data files: {}", writers.files);
    println!("rows:       {}", writers.rows);
    if !writers.columns.is_empty() {
        let columns: Vec<String> = writers
            .columns
            .iter()
            .map(|[n, t]| format!("{n}: {t}"))
            .collect();
        println!("columns:    {}", columns.join(", "));
    }
    println!(
        "positions:  {}",
        if writers.positions.is_empty() {
            "none recorded"
        } else {
            "(pipeline, topic/partition: last offset covered, checkpoint epoch, recorded by)"
        }
    );
    for ((pipeline, partition), (position, entry, ms)) in &writers.positions {
        let pipeline = if pipeline.is_empty() {
            "(unnamed)"
        } else {
            pipeline
        };
        println!(
            "  {pipeline}, {partition}: offset {}, epoch {}, entry {entry}, {}",
            position.offset,
            position.epoch,
            when(Some(*ms))
        );
    }
    Ok(())
}

/// Runs a `flowgate table` command.
pub fn run(command: TableCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match command {
        TableCommand::Info { path } => info(&path, rt)?,
        TableCommand::Optimize {
            path,
            target_file_size,
        } => {
            anyhow::ensure!(target_file_size > 0, "`--target-file-size` must be above 0");
            let mut table = open(&path, &rt)?;
            let started = Instant::now();
            let report = rt
                .block_on(maintenance::compact(&mut table, target_file_size))
                .with_context(|| format!("compacting `{path}`"))?;
            match report.version {
                Some(version) => println!(
                    "compacted {} of {} files into {} ({} rewritten) in {:.1} s: version {version}",
                    report.files_removed,
                    report.files_before,
                    report.files_added,
                    mib(report.bytes_rewritten),
                    started.elapsed().as_secs_f64()
                ),
                None => println!(
                    "nothing to compact: no table partition has two files under {}",
                    mib(target_file_size)
                ),
            }
        }
        TableCommand::Vacuum {
            path,
            retention,
            dry_run,
            force,
        } => {
            if retention < SAFE_RETENTION && !force && !dry_run {
                return Err(super::UsageError(format!(
                    "`--retention {}` is under 1h: a file a running pipeline staged for its next commit could be deleted; stop every pipeline writing `{path}` and add `--force`",
                    flowgate_sdk::config::Duration::from_millis(retention.as_millis() as i64),
                ))
                .into());
            }
            let table = open(&path, &rt)?;
            let deleted = rt
                .block_on(maintenance::vacuum(
                    table,
                    retention,
                    dry_run,
                    maintenance::VacuumMode::Full,
                ))
                .with_context(|| format!("vacuuming `{path}`"))?;
            let verb = if dry_run { "would delete" } else { "deleted" };
            println!("{verb} {} file(s)", deleted.len());
            for file in deleted.iter().take(20) {
                println!("  {file}");
            }
            if deleted.len() > 20 {
                println!("  … and {} more", deleted.len() - 20);
            }
        }
        TableCommand::Checkpoint { path } => {
            let mut table = open(&path, &rt)?;
            let version = rt
                .block_on(maintenance::checkpoint(&mut table))
                .with_context(|| format!("checkpointing `{path}`"))?;
            println!("wrote a checkpoint at version {version}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

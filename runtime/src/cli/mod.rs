//! The `flowgate` command line. `main.rs` parses arguments and calls [`run`].

mod plugin_new;
mod plugin_test;
mod produce;
mod table;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::Pipeline;

use crate::plugin::{Compile, ErrorKind, HostConfig, PluginError, PluginHost};

/// Flowgate: Kafka → Arrow → WebAssembly plugins → Delta Lake and Parquet.
#[derive(Debug, Parser)]
#[command(name = "flowgate", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline until interrupted (Ctrl+C / SIGTERM: flush, commit, exit 0), or until
    /// `--max-records` / `--until-idle` say so.
    Run {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Set a `${VAR}` used in the pipeline file (before the environment).
        #[arg(long = "set", value_name = "VAR=VALUE", value_parser = parse_var)]
        vars: Vec<(String, String)>,
        /// Stop after this many input records, with everything committed.
        #[arg(long, value_name = "N")]
        max_records: Option<u64>,
        /// Stop once no record arrived for this long (e.g. `10s`), with everything committed.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        until_idle: Option<Duration>,
        /// At exit, write a JSON report here: counts, time per stage (decode, each plugin with
        /// its WASM boundary, each sink's encode and commit) and latency percentiles from Kafka
        /// append to the last plugin and to the committed tables.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// Start a partition's steps with empty state when the checkpoint store has none for the
        /// offsets its sinks hold (without it, such a run refuses to start).
        #[arg(long)]
        reset_state: bool,
        /// Do not watch the pipeline file and its plugins for changes (SIGHUP still reloads
        /// them). By default a change to `transforms` or a plugin file is swapped in live.
        #[arg(long)]
        no_watch: bool,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Check a pipeline: parse it, load every plugin, create every step, and print each stage
    /// with its schema. Exits 2 with every problem found otherwise.
    Validate {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Set a `${VAR}` used in the pipeline file.
        #[arg(long = "set", value_name = "VAR=VALUE", value_parser = parse_var)]
        vars: Vec<(String, String)>,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Produce seed ticks (or replay a file) to a Kafka topic.
    Produce(produce::ProduceArgs),
    /// Work with transform plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Upkeep of a Delta table: info, optimize (compact small files), vacuum, checkpoint.
    #[command(subcommand)]
    Table(table::TableCommand),
}

/// The kind of sink a spec names, as the pipeline file spells it.
fn sink_kind(sink: &crate::config::SinkSpec) -> &'static str {
    if sink.delta.is_some() {
        "delta"
    } else if sink.parquet.is_some() {
        "parquet"
    } else if sink.csv.is_some() {
        "csv"
    } else if sink.postgres.is_some() {
        "postgres"
    } else {
        "console"
    }
}

/// `VAR=VALUE` → (VAR, VALUE), for `--set` and similar options.
pub fn parse_var(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{text}`: expected VAR=VALUE"))
}

/// Resolves on Ctrl+C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("signal received: finishing the current batches, then committing");
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Write a new plugin crate (SDK vendored, so it builds anywhere) with a sample and a test.
    New(plugin_new::NewArgs),
    /// Run one plugin (or a chain) over a JSON-lines file and print output and rejected rows.
    Test(plugin_test::TestArgs),
    /// Load a plugin and print its name, version and state version.
    Info {
        /// The plugin file.
        wasm: PathBuf,
        #[command(flatten)]
        host: HostArgs,
    },
}

/// Sandbox limits and the compiled-plugin cache.
#[derive(Debug, Clone, Args)]
pub struct HostArgs {
    /// Folder for compiled plugins [default: $FLOWGATE_CACHE_DIR, else ~/.cache/flowgate/plugins].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Compile plugins every time instead of using the cache.
    #[arg(long)]
    no_cache: bool,
    /// Longest one plugin call may run, e.g. `5s`, `500ms`.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Memory cap per plugin instance, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    memory_mib: usize,
}

impl HostArgs {
    fn host(&self, compile: Compile) -> Result<PluginHost, PluginError> {
        let cache_dir = if self.no_cache {
            None
        } else {
            self.cache_dir
                .clone()
                .or_else(crate::plugin::default_cache_dir)
        };
        PluginHost::new(HostConfig {
            cache_dir,
            call_timeout: self.timeout,
            memory_limit: self.memory_mib << 20,
            compile,
        })
    }
}

/// A duration as pipelines write it (`500ms`, `10s`, `1m`), for command-line options.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = flowgate_sdk::config::Duration::parse(text)?;
    u64::try_from(d.as_millis())
        .map(Duration::from_millis)
        .map_err(|_| "must not be negative".to_string())
}

/// Sets up logging to stderr: Flowgate's own lines at info (`-v` debug, `-vv` trace), the
/// libraries' at warn (`-v` info); `RUST_LOG` wins. Colours only on a terminal.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,flowgate=info",
        1 => "info,flowgate=debug",
        _ => "debug,flowgate=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .try_init();
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            pipeline,
            vars,
            max_records,
            until_idle,
            report,
            reset_state,
            no_watch,
            host,
        } => {
            let vars: std::collections::HashMap<String, String> = vars.into_iter().collect();
            let pipeline = Pipeline::load(&pipeline, &vars)?;
            let host = host.host(Compile::Optimized)?;
            let options = crate::engine::RunOptions {
                max_records,
                until_idle,
                reset_state,
                reload: Some(crate::engine::Reload {
                    vars,
                    watch_files: !no_watch,
                }),
            };
            run_pipeline(&pipeline, &host, &options, report.as_deref())
        }
        Command::Validate {
            pipeline,
            vars,
            host,
        } => {
            let pipeline = Pipeline::load(&pipeline, &vars.into_iter().collect())?;
            let host = host.host(Compile::Optimized)?;
            let plan = crate::engine::Plan::build(&pipeline, &host)?;
            println!(
                "pipeline `{}` ({})",
                pipeline.spec.name,
                pipeline.file.display()
            );
            for (i, schema) in plan.stages.iter().enumerate() {
                let name = if i == 0 {
                    "source (decoded)".to_string()
                } else {
                    format!("step `{}`", plan.names[i - 1])
                };
                println!(
                    "  {name}: {}",
                    flowgate_sdk::columns::describe_schema(schema)
                );
                if i == 0
                    && let Some(hop) = &pipeline.spec.repartition
                {
                    println!(
                        "  repartition: late records dead-lettered against their own partition's watermark; the rest keyed by [{}] into topic `{}` ({} partitions); the steps below read it as group `{}`",
                        hop.by.join(", "),
                        hop.topic_of(&pipeline.spec.name),
                        hop.partitions
                            .map_or("as many as the source topic's".to_string(), |n| n
                                .to_string()),
                        pipeline
                            .spec
                            .source
                            .kafka
                            .as_ref()
                            .map_or(String::new(), |k| format!("{}-repartition", k.group))
                    );
                }
            }
            // Each sink's table as it is now: a misfit is reported here, not at the first run.
            let rt = Arc::new(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()?,
            );
            let mut problems = Vec::new();
            let dead_letter_schema = crate::sink::dead_letter_schema();
            let sinks = pipeline
                .spec
                .sinks
                .iter()
                .chain(pipeline.spec.dead_letter.iter().map(|d| ("dead_letter", d)));
            for (name, sink) in sinks {
                let (schema, reads) = if name == "dead_letter" && sink.from.is_none() {
                    (&dead_letter_schema, "rejected records".to_string())
                } else {
                    let stage = plan.stage_of(sink.from.as_deref());
                    let reads = if stage == 0 {
                        "the decoded records".to_string()
                    } else {
                        format!("step `{}`", plan.names[stage - 1])
                    };
                    (&plan.stages[stage], reads)
                };
                let fit = match crate::engine::check_sink(&pipeline, name, sink, schema, &rt) {
                    Ok(Some(fit)) => format!(": {fit}"),
                    Ok(None) => String::new(),
                    Err(e) => {
                        let key = if name == "dead_letter" {
                            "dead_letter".to_string()
                        } else {
                            format!("sinks.{name}")
                        };
                        problems.push(format!("{}: {e}", pipeline.locate_key(&key)));
                        ": DOES NOT FIT (below)".to_string()
                    }
                };
                println!("  sink `{name}` ({}) reads {reads}{fit}", sink_kind(sink));
            }
            if !problems.is_empty() {
                return Err(crate::config::ConfigError { problems }.into());
            }
            println!(
                "valid: every plugin loads, every stage fits the next, every table fits its sink"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Produce(args) => produce::run(args),
        Command::Table(command) => table::run(command),
        Command::Plugin(PluginCommand::Test(args)) => plugin_test::run(args),
        Command::Plugin(PluginCommand::New(args)) => plugin_new::run(args),
        Command::Plugin(PluginCommand::Info { wasm, host }) => {
            let host = host.host(Compile::Optimized)?;
            let plugin = host.load(&wasm)?;
            let info = plugin.info()?;
            let stats = plugin.load_stats();
            println!("name:          {}", info.name);
            println!("version:       {}", info.version);
            println!("state version: {}", info.state_version);
            println!(
                "loaded in:     {:?} ({})",
                stats.elapsed,
                if stats.cache_hit {
                    "compiled artifact from the cache"
                } else {
                    "compiled now"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `flowgate run` once the pipeline is loaded: runs it, logs the summary, writes the report.
/// Also the entry point for embedders and the benchmark (which links plugins natively).
pub fn run_pipeline(
    pipeline: &Pipeline,
    host: &PluginHost,
    options: &crate::engine::RunOptions,
    report: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let summary = crate::engine::run(pipeline, host, options, shutdown_signal())?;
    tracing::info!(
        "done: {} records read, {} rows written, {} rejected, {} undecodable, {} checkpoints, in {:.1?}",
        summary.records,
        summary.rows_out,
        summary.rejected,
        summary.undecodable,
        summary.checkpoints,
        summary.wall,
    );
    // The summary goes to stderr with the log: stdout is a console sink's.
    let tables = crate::engine::tally::render(&summary.tables);
    if !tables.is_empty() {
        let _ = write!(std::io::stderr(), "{tables}");
    }
    if let Some(path) = report {
        let json = crate::metrics::report_json(&pipeline.spec.name, &summary);
        let text = serde_json::to_string_pretty(&json)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write the run report `{}`", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The process exit code for an error: 2 for configuration errors, 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(p) = e.downcast_ref::<PluginError>() {
        return if p.kind() == ErrorKind::Config { 2 } else { 1 };
    }
    if let Some(r) = e.downcast_ref::<crate::engine::RunError>() {
        return if r.kind() == ErrorKind::Config { 2 } else { 1 };
    }
    if e.downcast_ref::<crate::yaml::YamlError>().is_some()
        || e.downcast_ref::<UsageError>().is_some()
        || e.downcast_ref::<crate::config::ConfigError>().is_some()
    {
        return 2;
    }
    1
}

/// A command line that parses but does not make sense.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// An error and its causes as one line, each said once: an error whose text already includes
/// its cause's (as `step … failed: …` does) is not followed by the cause again.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod error_tests {
    #[test]
    fn each_cause_is_said_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("step failed: {source}")]
        struct Outer {
            source: std::io::Error,
        }
        let inner = std::io::Error::other("the plugin panicked");
        let e = anyhow::Error::new(Outer { source: inner });
        assert_eq!(super::error_text(&e), "step failed: the plugin panicked");
        let e = anyhow::anyhow!("disk full").context("writing the log");
        assert_eq!(super::error_text(&e), "writing the log: disk full");
    }
}

//! The `flowgate` command line. `main.rs` parses arguments and calls [`run`].

mod plugin_test;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::plugin::{ErrorKind, HostConfig, PluginError, PluginHost};

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
    /// Work with transform plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
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
    fn host(&self) -> Result<PluginHost, PluginError> {
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
        })
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = flowgate_sdk::config::Duration::parse(text)?;
    u64::try_from(d.as_millis())
        .map(Duration::from_millis)
        .map_err(|_| "must not be negative".to_string())
}

/// Sets up logging to stderr: info by default, `-v` debug, `-vv` trace; `RUST_LOG` wins.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Plugin(PluginCommand::Test(args)) => plugin_test::run(args),
        Command::Plugin(PluginCommand::Info { wasm, host }) => {
            let host = host.host()?;
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

/// The process exit code for an error: 2 for configuration errors, 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(p) = e.downcast_ref::<PluginError>() {
        return if p.kind() == ErrorKind::Config { 2 } else { 1 };
    }
    if e.downcast_ref::<crate::yaml::YamlError>().is_some()
        || e.downcast_ref::<UsageError>().is_some()
    {
        return 2;
    }
    1
}

/// A command line that parses but does not make sense.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

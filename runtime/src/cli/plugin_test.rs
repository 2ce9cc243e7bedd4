//! `flowgate plugin test`: the plugin author's harness.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use clap::{Args, ValueEnum};

use super::{HostArgs, UsageError};
use crate::decode::{self, JsonDecoder, SchemaSpec};
use crate::plugin::{Chain, ChainOutput, Compile, Grants};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Readable tables.
    Table,
    /// One JSON object per line: `{"kind":"output","row":{…}}` or
    /// `{"kind":"rejected","step":…,"reason":…,"row":{…}}`. Stable, for scripts.
    Jsonl,
}

/// Arguments of `flowgate plugin test`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  flowgate plugin test target/wasm32-wasip2/plugin/flowgate_validate.wasm \\\n    --config 'rules: {price: {min: 0}}' --input ticks.jsonl --schema ticks.schema.yaml"
)]
pub struct TestArgs {
    /// The plugin to run.
    wasm: PathBuf,
    /// More plugins after the first, in order (a chain).
    #[arg(long = "plugin", value_name = "WASM")]
    more: Vec<PathBuf>,
    /// A plugin's config: a YAML/JSON file, or inline YAML/JSON. Give none, or one per plugin.
    #[arg(long = "config", value_name = "FILE|YAML")]
    configs: Vec<String>,
    /// JSON-lines input, one record per line.
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// Input schema (YAML: `name: type` per line, types utf8, int64, float64, bool, timestamp).
    /// Without it the schema is inferred from the input (timestamps stay strings).
    #[arg(long, value_name = "FILE")]
    schema: Option<PathBuf>,
    /// After the input, advance event time to this watermark (epoch ms or RFC 3339).
    #[arg(long, value_name = "TS", conflicts_with = "flush")]
    watermark: Option<String>,
    /// After the input, advance event time to the end of time: emit everything still open.
    #[arg(long)]
    flush: bool,
    /// Rows per batch handed to the first plugin.
    #[arg(long, default_value_t = 8192)]
    batch_size: usize,
    /// Capabilities granted to every step (`clock`).
    #[arg(long = "grant", value_name = "CAPABILITY")]
    grants: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Compile the plugins optimized (Cranelift), as a pipeline does: slower to start, faster
    /// on a big input. By default the harness compiles with Winch, wasmtime's one-pass
    /// compiler, so a rebuilt plugin answers in about half a second.
    #[arg(long)]
    optimize: bool,
    #[command(flatten)]
    host: HostArgs,
}

fn parse_watermark(text: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            UsageError(format!(
                "--watermark `{text}` is neither epoch milliseconds nor RFC 3339 ({e})"
            ))
            .into()
        })
}

fn read_config(text: &str) -> anyhow::Result<String> {
    let path = Path::new(text);
    let (body, label) = if !text.contains(['{', ':', '\n']) || path.is_file() {
        let body = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file `{text}`"))?;
        (body, text.to_string())
    } else {
        (text.to_string(), "--config".to_string())
    };
    let value = crate::yaml::to_json(&body, &label)?;
    let value = if value.is_null() {
        serde_json::json!({})
    } else {
        value
    };
    Ok(value.to_string())
}

fn input_schema(args: &TestArgs, lines: &[&str]) -> anyhow::Result<SchemaRef> {
    if let Some(path) = &args.schema {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read schema `{}`", path.display()))?;
        let spec: SchemaSpec = crate::yaml::from_str(&text, &path.display().to_string())?;
        return Ok(decode::to_schema(&spec));
    }
    let sample = lines
        .iter()
        .take(1000)
        .copied()
        .collect::<Vec<_>>()
        .join("\n");
    let (schema, _) = arrow::json::reader::infer_json_schema(std::io::Cursor::new(sample), None)
        .context("cannot infer a schema from the input; give one with --schema")?;
    Ok(std::sync::Arc::new(schema))
}

/// Runs the harness.
pub fn run(args: TestArgs) -> anyhow::Result<ExitCode> {
    let plugins: Vec<&PathBuf> = std::iter::once(&args.wasm).chain(&args.more).collect();
    if !args.configs.is_empty() && args.configs.len() != plugins.len() {
        return Err(UsageError(format!(
            "{} plugins but {} --config: give one --config per plugin, or none",
            plugins.len(),
            args.configs.len()
        ))
        .into());
    }
    let mut grants = Grants::default();
    for g in &args.grants {
        match g.as_str() {
            "clock" => grants.clock = true,
            other => {
                return Err(UsageError(format!("unknown grant `{other}` (known: clock)")).into());
            }
        }
    }
    let watermark = match (&args.watermark, args.flush) {
        (Some(w), _) => Some(parse_watermark(w)?),
        (None, true) => Some(i64::MAX),
        (None, false) => None,
    };
    let text = std::fs::read_to_string(&args.input)
        .with_context(|| format!("cannot read input `{}`", args.input.display()))?;
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| (n + 1, l))
        .collect();
    let schema = input_schema(&args, &lines.iter().map(|(_, l)| *l).collect::<Vec<_>>())?;

    let host = args.host.host(if args.optimize {
        Compile::Optimized
    } else {
        Compile::Quick
    })?;
    let mut steps = Vec::new();
    let mut input = schema.clone();
    for (i, path) in plugins.iter().enumerate() {
        let plugin = host.load(path)?;
        let config = match args.configs.get(i) {
            Some(c) => read_config(c)?,
            None => "{}".to_string(),
        };
        let name = plugin.info()?.name;
        let step = plugin.instantiate(&name, &config, &input, grants)?;
        input = step.output_schema().clone();
        steps.push(step);
    }
    let mut chain = Chain::new(steps);
    let decoder = JsonDecoder::new(schema);
    let mut out = Printer::new(args.format);
    let (mut records_in, mut decode_failures) = (0usize, 0usize);
    for chunk in lines.chunks(args.batch_size.max(1)) {
        let records: Vec<&[u8]> = chunk.iter().map(|(_, l)| l.as_bytes()).collect();
        records_in += records.len();
        let (batch, failures) = decoder.decode(&records);
        for f in failures {
            decode_failures += 1;
            let (line, raw) = chunk[f.index];
            out.decode_failure(line, &f.reason, raw)?;
        }
        let result = chain.process(batch)?;
        out.chain_output(result)?;
    }
    if let Some(ts) = watermark {
        let result = chain.watermark(ts)?;
        out.chain_output(result)?;
    }
    out.finish()?;
    eprintln!(
        "{records_in} records in, {decode_failures} not decoded, {} rows out, {} rows rejected",
        out.rows_out, out.rows_rejected
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints rows as they come (jsonl) or collects them for tables.
struct Printer {
    format: Format,
    stdout: std::io::StdoutLock<'static>,
    batches: Vec<RecordBatch>,
    rejected: Vec<(String, String, String)>,
    rows_out: usize,
    rows_rejected: usize,
}

impl Printer {
    fn new(format: Format) -> Self {
        Printer {
            format,
            stdout: std::io::stdout().lock(),
            batches: Vec::new(),
            rejected: Vec::new(),
            rows_out: 0,
            rows_rejected: 0,
        }
    }

    fn decode_failure(&mut self, line: usize, reason: &str, raw: &str) -> anyhow::Result<()> {
        self.rows_rejected += 1;
        match self.format {
            Format::Jsonl => {
                let record = serde_json::json!({"kind": "rejected", "step": "decode", "line": line, "reason": reason, "raw": raw});
                writeln!(self.stdout, "{record}")?;
            }
            Format::Table => self.rejected.push((
                "decode".into(),
                format!("line {line}: {reason}"),
                raw.to_string(),
            )),
        }
        Ok(())
    }

    fn chain_output(&mut self, output: ChainOutput) -> anyhow::Result<()> {
        for rejected in output.rejected {
            self.rows_rejected += rejected.reasons.len();
            for (row, reason) in decode::rows_to_json(&rejected.rows)?
                .into_iter()
                .zip(rejected.reasons)
            {
                match self.format {
                    Format::Jsonl => {
                        let step = serde_json::to_string(&rejected.step)?;
                        let reason = serde_json::to_string(&reason)?;
                        writeln!(
                            self.stdout,
                            r#"{{"kind":"rejected","step":{step},"reason":{reason},"row":{row}}}"#
                        )?;
                    }
                    Format::Table => self.rejected.push((rejected.step.clone(), reason, row)),
                }
            }
        }
        for batch in output.batches {
            self.rows_out += batch.num_rows();
            match self.format {
                Format::Jsonl => {
                    for row in decode::rows_to_json(&batch)? {
                        writeln!(self.stdout, r#"{{"kind":"output","row":{row}}}"#)?;
                    }
                }
                Format::Table => self.batches.push(batch),
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        if self.format == Format::Table {
            writeln!(self.stdout, "output ({} rows):", self.rows_out)?;
            if !self.batches.is_empty() {
                writeln!(
                    self.stdout,
                    "{}",
                    arrow::util::pretty::pretty_format_batches(&self.batches)?
                )?;
            }
            if !self.rejected.is_empty() {
                writeln!(self.stdout, "rejected ({} rows):", self.rejected.len())?;
                for (step, reason, row) in &self.rejected {
                    writeln!(self.stdout, "  [{step}] {reason}\n      {row}")?;
                }
            }
        }
        self.stdout.flush()?;
        Ok(())
    }
}

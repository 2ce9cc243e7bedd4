//! Every plugin scenario, run natively and through the compiled `.wasm` in the host: the
//! transcripts (output rows, rejected rows with reasons, errors) must be identical.

use crate::common;

use arrow::record_batch::RecordBatch;
use flowgate::plugin::{Plugin, PluginError, PluginFault, Step};
use flowgate_sdk::testing::{Instance, Scenario};
use flowgate_sdk::{Error, Output, Rejected, Transform};

struct Wasm(Step);

fn sdk_error(e: PluginError) -> Error {
    match e {
        PluginError::Plugin {
            fault: PluginFault::InvalidConfig(m),
            ..
        } => Error::InvalidConfig(m),
        PluginError::Plugin {
            fault: PluginFault::BadInput(m),
            ..
        } => Error::BadInput(m),
        PluginError::Plugin {
            fault: PluginFault::Internal(m),
            ..
        } => Error::Internal(m),
        other => Error::Internal(format!("host: {other}")),
    }
}

impl Instance for Wasm {
    fn process(&mut self, batch: RecordBatch) -> flowgate_sdk::Result<Output> {
        let out = self.0.process(&batch).map_err(sdk_error)?;
        Ok(Output {
            batches: out.batches,
            rejected: out
                .rejected
                .into_iter()
                .map(|r| Rejected {
                    row: r.row as u32,
                    reason: r.reason,
                })
                .collect(),
        })
    }
    fn on_watermark(&mut self, ts_ms: i64) -> flowgate_sdk::Result<Output> {
        let out = self.0.on_watermark(ts_ms).map_err(sdk_error)?;
        Ok(Output {
            batches: out.batches,
            rejected: vec![],
        })
    }
    fn snapshot(&mut self) -> flowgate_sdk::Result<Vec<u8>> {
        self.0.snapshot().map_err(sdk_error)
    }
    fn restore(&mut self, state: &[u8]) -> flowgate_sdk::Result<()> {
        self.0.restore(state).map_err(sdk_error)
    }
    fn snapshot_delta(&mut self) -> flowgate_sdk::Result<Option<Vec<u8>>> {
        self.0.snapshot_delta().map_err(sdk_error)
    }
    fn restore_delta(&mut self, delta: &[u8]) -> flowgate_sdk::Result<()> {
        self.0.restore_delta(delta).map_err(sdk_error)
    }
}

fn compare<T: Transform>(wasm: &str, scenarios: Vec<Scenario>) {
    compare_in::<T>(&common::host(), wasm, scenarios, false);
}

/// Runs `scenarios` natively and through `host`'s steps for plugin `wasm`; the host's steps must
/// be native (`link_native`) or WASM as `native_steps` says.
fn compare_in<T: Transform>(
    host: &flowgate::plugin::PluginHost,
    wasm: &str,
    scenarios: Vec<Scenario>,
    native_steps: bool,
) {
    let plugin: Plugin = host.load(&common::plugin(wasm)).expect("load plugin");
    assert!(!scenarios.is_empty());
    for scenario in scenarios {
        let native = scenario.run_native::<T>();
        let in_wasm = scenario.run(|| {
            plugin
                .instantiate(
                    scenario.name,
                    scenario.config,
                    &scenario.schema,
                    Default::default(),
                )
                .inspect(|step| {
                    assert_eq!(step.is_native(), native_steps, "{}", scenario.name);
                    assert_eq!(step.memory_bytes().is_some(), !native_steps);
                })
                .map(Wasm)
                .map_err(sdk_error)
        });
        assert!(
            !native.is_empty(),
            "scenario `{}` produced nothing",
            scenario.name
        );
        assert_eq!(
            native, in_wasm,
            "scenario `{}`: native (left) and wasm (right) differ",
            scenario.name
        );
    }
}

#[test]
fn validate_wasm_matches_native() {
    compare::<flowgate_validate::Validate>(
        "flowgate_validate",
        flowgate_validate::scenarios::scenarios(),
    );
}

#[test]
fn dedup_wasm_matches_native() {
    compare::<flowgate_dedup::Dedup>("flowgate_dedup", flowgate_dedup::scenarios::scenarios());
}

/// The benchmark's native path: `link_native` puts the plugin crate in place of its `.wasm`, and
/// the host's steps then give the same transcripts without a WASM instance.
#[test]
fn linked_native_steps_match_the_plugin_run_natively() {
    let mut host = common::host();
    host.link_native(
        "dedup",
        std::sync::Arc::new(|config: &str, input: &arrow::datatypes::SchemaRef| {
            flowgate_sdk::create::<flowgate_dedup::Dedup>(config, input)
        }),
    );
    compare_in::<flowgate_dedup::Dedup>(
        &host,
        "flowgate_dedup",
        flowgate_dedup::scenarios::scenarios(),
        true,
    );
    // Other plugins on the same host stay WASM.
    compare_in::<flowgate_window::Window>(
        &host,
        "flowgate_window",
        flowgate_window::scenarios::scenarios(),
        false,
    );
}

#[test]
fn window_wasm_matches_native() {
    compare::<flowgate_window::Window>("flowgate_window", flowgate_window::scenarios::scenarios());
}

#[test]
fn pct_change_wasm_matches_native() {
    compare::<flowgate_pct_change::PctChange>(
        "flowgate_pct_change",
        flowgate_pct_change::scenarios::scenarios(),
    );
}

#[test]
fn plugins_describe_themselves() {
    let host = common::host();
    let info = host
        .load(&common::plugin("flowgate_window"))
        .expect("load")
        .info()
        .expect("info");
    assert_eq!(info.name, "window");
    assert_eq!(info.state_version, 4);
    let info = host
        .load(&common::plugin("flowgate_validate"))
        .expect("load")
        .info()
        .expect("info");
    assert_eq!((info.name.as_str(), info.state_version), ("validate", 1));
}

/// A step that keeps every row hands the host's own batch on (the next step and the poison
/// journal share its memory); one that drops a row hands on a batch of its own.
#[test]
fn a_step_that_keeps_every_row_hands_on_the_hosts_own_batch() {
    use std::sync::Arc;

    use arrow::array::{Array, Float64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use flowgate::plugin::Grants;

    let schema = Arc::new(Schema::new(vec![
        Field::new("symbol", DataType::Utf8, true),
        Field::new("price", DataType::Float64, true),
    ]));
    let host = common::host();
    let mut step = host
        .load(&common::plugin("flowgate_validate"))
        .expect("load")
        .instantiate(
            "validate",
            r#"{"rules": {"price": {"min": 0}}}"#,
            &schema,
            Grants::default(),
        )
        .expect("create");
    let batch = |prices: Vec<f64>| {
        let symbols: Vec<String> = (0..prices.len()).map(|i| format!("S{i}")).collect();
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(symbols)),
                Arc::new(Float64Array::from(prices)),
            ],
        )
        .expect("batch")
    };
    let values = |b: &RecordBatch| b.column(1).to_data().buffers()[0].as_ptr();

    let kept = batch((0..1000).map(f64::from).collect());
    let out = step.process(&kept).expect("process");
    assert_eq!(out.batches.len(), 1);
    assert_eq!(out.batches[0].num_rows(), 1000);
    assert_eq!(values(&out.batches[0]), values(&kept), "a decoded copy");
    assert_eq!(&out.batches[0].schema(), step.output_schema());

    let one_dropped = batch((0..1000).map(|i| f64::from(i) - 1.0).collect());
    let out = step.process(&one_dropped).expect("process");
    assert_eq!(out.rejected.len(), 1);
    let rows: usize = out.batches.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows, 999);
    assert_ne!(values(&out.batches[0]), values(&one_dropped));
    let prices = out.batches[0]
        .column(1)
        .as_any()
        .downcast_ref::<Float64Array>();
    assert_eq!(prices.map(|p| p.value(0)), Some(0.0));
    assert_eq!(out.batches[0].column(1).null_count(), 0);
}

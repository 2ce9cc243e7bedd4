//! A chain of steps: each step's output feeds the next; watermarks flow down the chain, and what
//! a step emits on a watermark passes through the steps after it before they see that watermark.

use arrow::array::UInt32Array;
use arrow::compute::take_record_batch;
use arrow::record_batch::RecordBatch;

use super::{ErrorKind, PluginError, Step};
use crate::config::OnError;

/// Rows one step refused, with a reason each.
#[derive(Debug, Clone)]
pub struct RejectedRows {
    /// The step that refused them.
    pub step: String,
    /// The rows, with the step's input schema.
    pub rows: RecordBatch,
    /// One reason per row.
    pub reasons: Vec<String>,
    /// Each row's index in the batch the step was given.
    pub indices: Vec<u32>,
}

/// A batch a step refused as a whole (a `bad-input` error) under `on_error: skip | dead_letter`:
/// the steps before it keep what they did with it, the steps after it never see it.
#[derive(Debug, Clone)]
pub struct RefusedBatch {
    /// The step that refused it.
    pub step: String,
    /// The batch as the step was given it.
    pub rows: RecordBatch,
    /// The step's error, as a reason.
    pub reason: String,
    /// The step's policy (`Skip` or `DeadLetter`).
    pub policy: OnError,
}

/// What the chain produced for one input batch or watermark.
#[derive(Debug, Clone, Default)]
pub struct ChainOutput {
    /// Batches out of the last step.
    pub batches: Vec<RecordBatch>,
    /// Rows refused anywhere along the chain.
    pub rejected: Vec<RejectedRows>,
    /// Batches out of tapped steps before the last, with the step's index.
    pub taps: Vec<(usize, RecordBatch)>,
    /// Batches refused whole by a step whose `on_error` lets the run go on.
    pub refused: Vec<RefusedBatch>,
}

/// Steps in order, for one partition.
#[derive(Debug)]
pub struct Chain {
    steps: Vec<Step>,
    tapped: Vec<bool>,
    policies: Vec<OnError>,
}

impl Chain {
    /// A chain of `steps`; each step's input schema must be the previous step's output schema.
    /// Every step's `on_error` is `fail` until [`Chain::with_policies`] says otherwise.
    pub fn new(steps: Vec<Step>) -> Self {
        let tapped = vec![false; steps.len()];
        let policies = vec![OnError::Fail; steps.len()];
        Chain {
            steps,
            tapped,
            policies,
        }
    }

    /// What each step does with a batch it refuses (`bad-input`), in step order.
    pub fn with_policies(mut self, policies: Vec<OnError>) -> Self {
        for (slot, p) in self.policies.iter_mut().zip(policies) {
            *slot = p;
        }
        self
    }

    /// Also hands out what step `index` emits (for sinks reading an earlier stage).
    pub fn tap(&mut self, index: usize) {
        if let Some(t) = self.tapped.get_mut(index) {
            *t = true;
        }
    }

    /// The steps.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The steps, mutably (to snapshot, restore or rebuild them).
    pub fn steps_mut(&mut self) -> &mut [Step] {
        &mut self.steps
    }

    /// Runs one batch through every step.
    pub fn process(&mut self, batch: RecordBatch) -> Result<ChainOutput, PluginError> {
        let mut out = ChainOutput::default();
        out.batches = self.run_from(0, vec![batch], &mut out)?;
        Ok(out)
    }

    /// Advances event time to `ts_ms` in every step, in order.
    pub fn watermark(&mut self, ts_ms: i64) -> Result<ChainOutput, PluginError> {
        let mut out = ChainOutput::default();
        for i in 0..self.steps.len() {
            let emitted = self.steps[i].on_watermark(ts_ms)?;
            if self.tapped[i] && i + 1 < self.steps.len() {
                out.taps
                    .extend(emitted.batches.iter().map(|b| (i, b.clone())));
            }
            let batches = self.run_from(i + 1, emitted.batches, &mut out)?;
            out.batches.extend(batches);
        }
        Ok(out)
    }

    fn run_from(
        &mut self,
        first: usize,
        mut batches: Vec<RecordBatch>,
        out: &mut ChainOutput,
    ) -> Result<Vec<RecordBatch>, PluginError> {
        let last = self.steps.len().saturating_sub(1);
        for (index, step) in self.steps.iter_mut().enumerate().skip(first) {
            let mut next = Vec::with_capacity(batches.len());
            for batch in &batches {
                let output = match step.process(batch) {
                    Ok(output) => output,
                    Err(e)
                        if e.kind() == ErrorKind::Data && self.policies[index] != OnError::Fail =>
                    {
                        out.refused.push(RefusedBatch {
                            step: step.name().to_string(),
                            rows: batch.clone(),
                            reason: e.to_string(),
                            policy: self.policies[index],
                        });
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if !output.rejected.is_empty() {
                    let indices =
                        UInt32Array::from_iter_values(output.rejected.iter().map(|r| r.row as u32));
                    let rows =
                        take_record_batch(batch, &indices).map_err(|e| PluginError::Protocol {
                            plugin: step.plugin().to_string(),
                            step: step.name().to_string(),
                            call: "process",
                            message: format!("taking rejected rows: {e}"),
                        })?;
                    out.rejected.push(RejectedRows {
                        step: step.name().to_string(),
                        rows,
                        reasons: output.rejected.iter().map(|r| r.reason.clone()).collect(),
                        indices: indices.values().to_vec(),
                    });
                }
                next.extend(output.batches);
            }
            if self.tapped[index] && index < last {
                out.taps.extend(next.iter().map(|b| (index, b.clone())));
            }
            batches = next;
        }
        Ok(batches)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
    use flowgate_sdk::DynTransform;
    use flowgate_sdk::Output;

    use super::*;
    use crate::plugin::NativeFactory;

    /// Passes batches through; or refuses every batch as bad input.
    struct Fixed {
        refuse: bool,
    }

    impl DynTransform for Fixed {
        fn process(&mut self, batch: RecordBatch) -> flowgate_sdk::Result<Output> {
            if self.refuse {
                return Err(flowgate_sdk::Error::bad_input("no thanks"));
            }
            Ok(Output::batch(batch))
        }
        fn on_watermark(&mut self, _ts_ms: i64) -> flowgate_sdk::Result<Output> {
            Ok(Output::empty())
        }
        fn snapshot(&self) -> flowgate_sdk::Result<Vec<u8>> {
            Ok(Vec::new())
        }
        fn restore(&mut self, _state: &[u8]) -> flowgate_sdk::Result<()> {
            Ok(())
        }
    }

    fn step(name: &str, refuse: bool, schema: &SchemaRef) -> Step {
        let factory: NativeFactory = Arc::new(move |_config: &str, input: &SchemaRef| {
            Ok((
                Box::new(Fixed { refuse }) as Box<dyn DynTransform>,
                input.clone(),
            ))
        });
        Step::native(factory, name, name, "{}", schema).unwrap()
    }

    #[test]
    fn a_refused_batch_keeps_what_the_steps_before_it_emitted() {
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![1, 2]))])
                .unwrap();
        let mut chain = Chain::new(vec![
            step("first", false, &schema),
            step("second", true, &schema),
            step("third", false, &schema),
        ])
        .with_policies(vec![OnError::Fail, OnError::DeadLetter, OnError::Fail]);
        chain.tap(0);
        let out = chain.process(batch.clone()).unwrap();
        assert_eq!(out.taps.len(), 1, "the tap of the step before the refusal");
        assert_eq!(out.taps[0].1, batch);
        assert!(out.batches.is_empty());
        assert_eq!(out.refused.len(), 1);
        assert_eq!(out.refused[0].step, "second");
        assert_eq!(out.refused[0].rows, batch);
        assert_eq!(out.refused[0].policy, OnError::DeadLetter);

        // `fail` stops the chain with the error.
        let mut failing = Chain::new(vec![
            step("first", false, &schema),
            step("second", true, &schema),
        ]);
        assert!(failing.process(batch).is_err());
    }
}

use arrow::datatypes::Schema;
use arrow::record_batch::RecordBatch;

/// One input row a plugin refused, with the reason. It goes to the dead-letter sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Index of the row in the batch given to `process`.
    pub row: u32,
    /// Why, e.g. `price: must be > 0`.
    pub reason: String,
}

/// What a call produced: result batches and refused rows.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// Result batches, all with the declared output schema. Empty batches are never kept.
    pub batches: Vec<RecordBatch>,
    /// Rows of the input batch the plugin refused.
    pub rejected: Vec<Rejected>,
}

impl Output {
    /// Nothing produced.
    pub fn empty() -> Self {
        Self::default()
    }

    /// One result batch (dropped if it has no rows).
    pub fn batch(batch: RecordBatch) -> Self {
        let mut out = Self::default();
        out.push(batch);
        out
    }

    /// Adds a result batch (ignored if it has no rows).
    pub fn push(&mut self, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.batches.push(batch);
        }
    }

    /// Refuses input row `row` for `reason`: the row goes to the dead letter, and never also to
    /// the output. An output batch made of the input's own rows (the input batch itself, or one
    /// with the input's row count that shares at least one of its columns: a projection, or the
    /// input with a computed column added) loses its rejected rows when the call returns; a
    /// plugin that builds its output from new arrays leaves the rejected rows out itself (as
    /// `filter_record_batch` with a keep mask does).
    pub fn reject(&mut self, row: usize, reason: impl Into<String>) {
        self.rejected.push(Rejected {
            row: row as u32,
            reason: reason.into(),
        });
    }

    /// Sets the refused rows.
    pub fn with_rejected(mut self, rejected: Vec<Rejected>) -> Self {
        self.rejected = rejected;
        self
    }

    /// Total rows over all result batches.
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

impl Output {
    /// Whether this output is `input` as it came: nothing rejected and one batch of the very
    /// same arrays, under a declared output `schema` that is the input's (so the input's IPC
    /// bytes are also a stream of the output schema, metadata and all).
    pub fn is_input(&self, input: &RecordBatch, schema: &Schema) -> bool {
        let [batch] = self.batches.as_slice() else {
            return false;
        };
        self.rejected.is_empty()
            && batch.num_rows() == input.num_rows()
            && batch.num_columns() == input.num_columns()
            && batch
                .columns()
                .iter()
                .zip(input.columns())
                .all(|(a, b)| std::sync::Arc::ptr_eq(a, b))
            && input.schema().as_ref() == schema
    }

    /// Takes rejected rows out of every output batch made of `input`'s own rows (see
    /// [`Output::reject`]); the SDK calls this when `process` returns, so a rejected row is
    /// never in both the output and the dead letter.
    pub fn settle(mut self, input: &RecordBatch) -> crate::Result<Self> {
        if self.rejected.is_empty() {
            return Ok(self);
        }
        let rows = input.num_rows();
        if let Some(bad) = self.rejected.iter().find(|r| r.row as usize >= rows) {
            return Err(crate::Error::internal(format!(
                "rejected row {} of a batch of {rows} rows (rows count from 0 in the batch given to `process`)",
                bad.row
            )));
        }
        let aligned = |batch: &RecordBatch| {
            batch.num_rows() == rows
                && batch.columns().iter().any(|c| {
                    input.columns().iter().any(|i| {
                        std::ptr::addr_eq(std::sync::Arc::as_ptr(c), std::sync::Arc::as_ptr(i))
                    })
                })
        };
        if !self.batches.iter().any(aligned) {
            return Ok(self);
        }
        let mut keep = vec![true; rows];
        for r in &self.rejected {
            keep[r.row as usize] = false;
        }
        let keep = arrow::array::BooleanArray::from(keep);
        let batches = std::mem::take(&mut self.batches);
        for batch in batches {
            if aligned(&batch) {
                let kept = arrow::compute::filter_record_batch(&batch, &keep)
                    .map_err(|e| crate::Error::internal(format!("removing rejected rows: {e}")))?;
                self.push(kept);
            } else {
                self.push(batch);
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn input() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, false),
            Field::new("b", DataType::Int64, false),
        ]));
        let a: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3, 4]));
        let b: ArrayRef = Arc::new(Int64Array::from(vec![10, 20, 30, 40]));
        RecordBatch::try_new(schema, vec![a, b]).unwrap()
    }

    fn column(batch: &RecordBatch, i: usize) -> Vec<i64> {
        batch
            .column(i)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .values()
            .to_vec()
    }

    #[test]
    fn a_rejected_row_leaves_an_output_made_of_the_input_rows() {
        // The input passed through whole while a row is rejected: the row leaves the output.
        let batch = input();
        let mut out = Output::batch(batch.clone());
        out.reject(1, "bad");
        out.reject(3, "worse");
        let out = out.settle(&batch).unwrap();
        assert_eq!(column(&out.batches[0], 0), vec![1, 3]);
        assert_eq!(out.rejected.len(), 2);
        // A projection of the input is its rows too.
        let mut out = Output::batch(batch.project(&[1]).unwrap());
        out.reject(0, "bad");
        let out = out.settle(&batch).unwrap();
        assert_eq!(column(&out.batches[0], 0), vec![20, 30, 40]);
    }

    #[test]
    fn an_output_the_plugin_filtered_or_built_is_left_alone() {
        let batch = input();
        let keep = arrow::array::BooleanArray::from(vec![true, false, true, true]);
        let mut out = Output::batch(arrow::compute::filter_record_batch(&batch, &keep).unwrap());
        out.reject(1, "bad");
        let out = out.settle(&batch).unwrap();
        assert_eq!(column(&out.batches[0], 0), vec![1, 3, 4]);
        // An aggregate with as many rows as the input but new arrays.
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let built = RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from(vec![7, 7, 7, 7])) as ArrayRef],
        )
        .unwrap();
        let mut out = Output::batch(built);
        out.reject(0, "bad");
        assert_eq!(out.settle(&batch).unwrap().num_rows(), 4);
        // A row number past the batch is the plugin's bug, named.
        let mut out = Output::empty();
        out.reject(9, "bad");
        let err = out.settle(&batch).unwrap_err().to_string();
        assert!(err.contains("rejected row 9 of a batch of 4 rows"), "{err}");
    }

    #[test]
    fn an_output_is_its_input_only_when_it_is_the_same_arrays_whole_under_the_same_schema() {
        let batch = input();
        let schema = batch.schema();
        assert!(Output::batch(batch.clone()).is_input(&batch, &schema));

        let mut rejected = Output::batch(batch.clone());
        rejected.reject(1, "no");
        assert!(!rejected.is_input(&batch, &schema));
        let copy = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
                batch.column(1).clone(),
            ],
        )
        .unwrap();
        assert!(
            !Output::batch(copy).is_input(&batch, &schema),
            "equal, not the same"
        );
        assert!(!Output::batch(batch.slice(0, 3)).is_input(&batch, &schema));
        let mut twice = Output::batch(batch.clone());
        twice.push(batch.clone());
        assert!(!twice.is_input(&batch, &schema));
        assert!(!Output::empty().is_input(&batch, &schema));
        let labelled = Schema::new(schema.fields().clone()).with_metadata(
            [("owner".to_string(), "desk".to_string())]
                .into_iter()
                .collect(),
        );
        assert!(!Output::batch(batch.clone()).is_input(&batch, &labelled));
    }
}

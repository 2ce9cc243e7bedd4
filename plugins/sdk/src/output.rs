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

    /// Refuses input row `row` for `reason`.
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

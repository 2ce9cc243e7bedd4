use arrow::record_batch::RecordBatch;

use super::{Position, Positions, Sink, SinkError};

/// Prints committed rows as a table on stdout (at most `max_rows` per commit), for debugging.
pub struct ConsoleSink {
    name: String,
    max_rows: usize,
    pending: Vec<RecordBatch>,
}

impl ConsoleSink {
    /// A console sink.
    pub fn new(name: &str, max_rows: usize) -> Self {
        ConsoleSink {
            name: name.into(),
            max_rows,
            pending: Vec::new(),
        }
    }
}

impl Sink for ConsoleSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn write(&mut self, batch: RecordBatch) -> Result<(), SinkError> {
        self.pending.push(batch);
        Ok(())
    }

    fn commit(&mut self, _positions: &Positions) -> Result<bool, SinkError> {
        let batches = std::mem::take(&mut self.pending);
        let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
        if total == 0 {
            return Ok(false);
        }
        let mut shown = Vec::new();
        let mut left = self.max_rows;
        for b in &batches {
            if left == 0 {
                break;
            }
            let n = b.num_rows().min(left);
            shown.push(b.slice(0, n));
            left -= n;
        }
        let table =
            arrow::util::pretty::pretty_format_batches(&shown).map_err(|e| SinkError::Table {
                sink: self.name.clone(),
                table: "stdout".into(),
                message: e.to_string(),
            })?;
        println!(
            "{} ({total} rows{}):\n{table}",
            self.name,
            if total > self.max_rows {
                format!(", first {}", self.max_rows)
            } else {
                String::new()
            }
        );
        Ok(true)
    }

    fn committed(&mut self, _topic: &str, _partition: i32) -> Result<Option<Position>, SinkError> {
        Ok(None)
    }

    /// It keeps nothing: a restart neither resumes from it nor replays for it.
    fn durable(&self) -> bool {
        false
    }
}

use std::future::IntoFuture;
use std::path::Path;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use deltalake::DeltaTable;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{StructType, Transaction};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use tokio::runtime::Runtime;

use super::{Offsets, Pending, Sink, SinkError, TableShape};

/// A Delta Lake table. Each commit appends the buffered rows and records, per source partition,
/// the last offset covered as a Delta `txn` action (app id `flowgate-{pipeline}-{topic}-{partition}`),
/// as kafka-delta-ingest does; a restart resumes after those offsets.
pub struct DeltaSink {
    name: String,
    location: String,
    pipeline: String,
    target_file_size: u64,
    rt: Arc<Runtime>,
    table: DeltaTable,
    pending: Pending,
    last: Offsets,
    encode_time: std::time::Duration,
}

impl DeltaSink {
    /// Opens the table at `path`, creating it from `shape` (partitioned by `partition_by`) if it
    /// does not exist; an existing table must have the same columns and types.
    pub fn open(
        name: &str,
        path: &Path,
        pipeline: &str,
        shape: TableShape,
        partition_by: &[String],
        target_file_size: u64,
        rt: Arc<Runtime>,
    ) -> Result<Self, SinkError> {
        let location = path.display().to_string();
        let fail = |message: String| SinkError::Table {
            sink: name.into(),
            table: location.clone(),
            message,
        };
        std::fs::create_dir_all(path)
            .map_err(|e| fail(format!("cannot create the folder: {e}")))?;
        let absolute = std::fs::canonicalize(path).map_err(|e| fail(e.to_string()))?;
        let url = deltalake::ensure_table_uri(absolute.display().to_string())
            .map_err(|e| fail(e.to_string()))?;
        // A folder without a log is a table to create: don't ask the reader to load it.
        let mut table = if absolute.join("_delta_log").is_dir() {
            rt.block_on(DeltaTable::try_from_url(url))
                .map_err(|e| fail(e.to_string()))?
        } else {
            deltalake::DeltaTableBuilder::from_url(url)
                .and_then(|b| b.build())
                .map_err(|e| fail(e.to_string()))?
        };
        if table.version().is_none() {
            let schema: StructType = shape
                .schema()
                .as_ref()
                .try_into_kernel()
                .map_err(|e| fail(format!("schema: {e}")))?;
            let create = table
                .create()
                .with_columns(schema.fields().cloned())
                .with_partition_columns(partition_by.to_vec())
                .with_table_name(name);
            table = rt
                .block_on(create.into_future())
                .map_err(|e| fail(format!("cannot create the table: {e}")))?;
            tracing::info!(sink = name, table = %location, "created Delta table");
        } else {
            let state = table.snapshot().map_err(|e| fail(e.to_string()))?;
            let existing = state.snapshot().arrow_schema();
            let ours = shape.schema();
            let describe = |s: &arrow::datatypes::Schema| flowgate_sdk::columns::describe_schema(s);
            let same = existing.fields().len() == ours.fields().len()
                && existing
                    .fields()
                    .iter()
                    .zip(ours.fields())
                    .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
            if !same {
                return Err(SinkError::SchemaMismatch {
                    sink: name.into(),
                    table: location,
                    message: format!(
                        "table has {}, stage gives {}",
                        describe(&existing),
                        describe(ours)
                    ),
                });
            }
            let partitions = state.metadata().partition_columns().to_vec();
            if partitions != partition_by {
                return Err(SinkError::SchemaMismatch {
                    sink: name.into(),
                    table: location,
                    message: format!(
                        "table is partitioned by {partitions:?}, config says {partition_by:?}"
                    ),
                });
            }
        }
        Ok(DeltaSink {
            name: name.into(),
            location,
            pipeline: pipeline.into(),
            target_file_size,
            rt,
            table,
            pending: Pending::new(shape),
            last: Offsets::new(),
            encode_time: std::time::Duration::ZERO,
        })
    }

    fn app_id(&self, topic: &str, partition: i32) -> String {
        format!("flowgate-{}-{topic}-{partition}", self.pipeline)
    }

    fn fail(&self, message: String) -> SinkError {
        SinkError::Table {
            sink: self.name.clone(),
            table: self.location.clone(),
            message,
        }
    }
}

impl Sink for DeltaSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn write(&mut self, batch: RecordBatch) -> Result<(), SinkError> {
        self.pending
            .push(&batch)
            .map_err(|e| self.fail(format!("converting a batch: {e}")))
    }

    fn commit(&mut self, offsets: &Offsets) -> Result<bool, SinkError> {
        if !self.pending.worth_committing(offsets, &self.last) {
            return Ok(false);
        }
        let txns: Vec<Transaction> = offsets
            .iter()
            .map(|((t, p), o)| Transaction::new(self.app_id(t, *p), *o))
            .collect();
        let pending = self.pending.take();
        let rows: usize = pending.iter().map(RecordBatch::num_rows).sum();
        let mut writer = RecordBatchWriter::for_table(&self.table)
            .map_err(|e| self.fail(e.to_string()))?
            .with_commit_properties(CommitProperties::default().with_application_transactions(txns))
            .with_target_file_size(self.target_file_size);
        let (table, encode_time) = (&mut self.table, &mut self.encode_time);
        let version = self
            .rt
            .block_on(async {
                let encoding = std::time::Instant::now();
                for batch in pending {
                    writer.write(batch).await?;
                }
                *encode_time += encoding.elapsed();
                // Another process (other partitions of the same group) may commit in between:
                // catch up with the table and try again; the staged files are kept.
                let mut attempt = 0;
                loop {
                    match writer.flush_and_commit(table).await {
                        Ok(version) => break Ok(version),
                        Err(e) if attempt < 5 => {
                            attempt += 1;
                            tracing::debug!("Delta commit attempt {attempt} conflicted ({e}); reloading the table and retrying");
                            table.update_state().await?;
                        }
                        Err(e) => break Err(e),
                    }
                }
            })
            .map_err(|e| SinkError::Table {
                sink: self.name.clone(),
                table: self.location.clone(),
                message: format!("commit failed: {e}"),
            })?;
        tracing::debug!(sink = %self.name, version, rows, "committed Delta version");
        self.last = offsets.clone();
        Ok(true)
    }

    fn encode_time(&self) -> std::time::Duration {
        self.encode_time
    }

    fn committed(&mut self, topic: &str, partition: i32) -> Result<Option<i64>, SinkError> {
        // The partition may have been written by another process until a moment ago.
        self.rt
            .block_on(self.table.update_state())
            .map_err(|e| self.fail(format!("reloading the table: {e}")))?;
        let app_id = self.app_id(topic, partition);
        let state = self
            .table
            .snapshot()
            .map_err(|e| self.fail(e.to_string()))?;
        let log_store = self.table.log_store();
        let version = self
            .rt
            .block_on(state.transaction_version(log_store.as_ref(), app_id))
            .map_err(|e| self.fail(e.to_string()))?;
        if let Some(v) = version {
            self.last.insert((topic.to_string(), partition), v);
        }
        Ok(version)
    }
}

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use serde::de::DeserializeOwned;

use crate::{Error, Output, Result};

/// Bytes the SDK puts in front of a snapshot or a delta (a magic and the state version). A
/// plugin that builds a large state leaves this much spare capacity at the end of its buffer
/// (`Vec::with_capacity(len + STATE_HEADER)`), and the SDK frames it in place.
pub const STATE_HEADER: usize = 8;

/// A transform step: what a plugin author implements.
///
/// One value exists per pipeline step and Kafka partition. Methods take `&mut self`; the SDK
/// takes care of the interior mutability the component model needs. Never panic on data (a panic
/// is a trap that discards the instance): return [`Error::BadInput`] or reject the row instead.
pub trait Transform: Sized + Send + 'static {
    /// The step's `config:` block. Use `#[serde(deny_unknown_fields)]`, so a misspelt key is an
    /// error that names it.
    type Config: DeserializeOwned;

    /// Short name for logs, e.g. `validate`.
    const NAME: &'static str;

    /// The plugin's version.
    const VERSION: &'static str = "0.1.0";

    /// Version of the bytes [`Transform::snapshot`] returns. Bump it when the layout changes, and
    /// teach [`Transform::restore`] to read the old one or refuse it. 0 for a stateless plugin.
    const STATE_VERSION: u32 = 0;

    /// Builds the step from its config and the input schema; returns it with its output schema.
    fn create(config: Self::Config, input: &SchemaRef) -> Result<(Self, SchemaRef)>;

    /// Processes one batch with the input schema.
    fn process(&mut self, batch: RecordBatch) -> Result<Output>;

    /// Event time advanced to `ts_ms`: emit what is complete, evict what expired.
    fn on_watermark(&mut self, ts_ms: i64) -> Result<Output> {
        let _ = ts_ms;
        Ok(Output::empty())
    }

    /// The state needed to resume exactly here (the SDK adds the version header: a state with
    /// [`STATE_HEADER`] bytes of spare capacity gets it without being copied, which matters for
    /// a state of many MB).
    fn snapshot(&self) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }

    /// Incremental checkpoints (optional): what changed since the last call of
    /// `snapshot_delta`, `restore` or `restore_delta` (a full [`Transform::snapshot`] does not
    /// move that point), as bytes [`Transform::restore_delta`] reads (the SDK adds the version
    /// header, in place given [`STATE_HEADER`] bytes of spare capacity). `None` when the step cannot tell (never asked before, or it stopped keeping
    /// track): the host then takes a full snapshot. Worth it for state that grows with data
    /// (keys remembered over a retention); the default says `None` every time.
    ///
    /// The deltas applied in order on top of the state they started from must leave a state
    /// that behaves as this one does now (not necessarily the same bytes).
    fn snapshot_delta(&mut self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    /// Applies a delta written at `version` by [`Transform::snapshot_delta`] on top of the
    /// state restored so far (a full snapshot, then every delta before this one).
    fn restore_delta(&mut self, version: u32, delta: &[u8]) -> Result<()> {
        let _ = (version, delta);
        Err(Error::bad_input(format!(
            "`{}` takes no state deltas",
            Self::NAME
        )))
    }

    /// Replaces the state with an earlier snapshot written at `version`.
    fn restore(&mut self, version: u32, state: &[u8]) -> Result<()> {
        if version != Self::STATE_VERSION {
            return Err(Error::bad_input(format!(
                "`{}` reads state version {}, got {version}",
                Self::NAME,
                Self::STATE_VERSION
            )));
        }
        if !state.is_empty() {
            return Err(Error::bad_input(format!(
                "`{}` keeps no state but was given {} bytes",
                Self::NAME,
                state.len()
            )));
        }
        Ok(())
    }
}

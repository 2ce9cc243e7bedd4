//! The plugin seen through one object-safe interface: used by the wasm adapter, and by hosts and
//! benchmarks that link a plugin natively.

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use crate::{Error, Output, Result, Transform};

/// Snapshot header: magic, then the plugin's state version (u32, little endian).
const STATE_MAGIC: &[u8; 4] = b"FGS1";

/// Delta header: magic, then the plugin's state version (u32, little endian).
const DELTA_MAGIC: &[u8; 4] = b"FGD1";

/// Name, version and state version of a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// Short name, e.g. `validate`.
    pub name: String,
    /// The plugin's version.
    pub version: String,
    /// Version of its snapshot bytes.
    pub state_version: u32,
}

/// The info of plugin `T`.
pub fn info<T: Transform>() -> PluginInfo {
    PluginInfo {
        name: T::NAME.to_string(),
        version: T::VERSION.to_string(),
        state_version: T::STATE_VERSION,
    }
}

/// A created transform, behind dynamic dispatch.
pub trait DynTransform: Send {
    /// See [`Transform::process`].
    fn process(&mut self, batch: RecordBatch) -> Result<Output>;
    /// See [`Transform::on_watermark`].
    fn on_watermark(&mut self, ts_ms: i64) -> Result<Output>;
    /// The plugin's snapshot with the version header.
    fn snapshot(&self) -> Result<Vec<u8>>;
    /// Restores bytes from [`DynTransform::snapshot`].
    fn restore(&mut self, state: &[u8]) -> Result<()>;
    /// See [`Transform::snapshot_delta`]; the delta with the version header.
    fn snapshot_delta(&mut self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
    /// Applies bytes from [`DynTransform::snapshot_delta`].
    fn restore_delta(&mut self, delta: &[u8]) -> Result<()> {
        let _ = delta;
        Err(Error::bad_input("this step takes no state deltas"))
    }
}

/// `body` with `magic` and `version` in front: in place when `body` has
/// [`crate::STATE_HEADER`] bytes of spare capacity (no second copy of a large state in the
/// instance's memory, which WASM never gives back), else moved into a bigger buffer.
fn frame(magic: &[u8; 4], version: u32, mut body: Vec<u8>) -> Vec<u8> {
    let mut header = [0u8; crate::STATE_HEADER];
    header[..4].copy_from_slice(magic);
    header[4..].copy_from_slice(&version.to_le_bytes());
    // Exactly the header's room when there is none (`splice` alone would double the buffer).
    body.reserve_exact(crate::STATE_HEADER);
    body.splice(0..0, header);
    body
}

/// The version and body of bytes [`frame`]d with `magic`; `what` names them in errors.
fn unframe<'a>(
    name: &str,
    what: &str,
    magic: &[u8; 4],
    bytes: &'a [u8],
) -> Result<(u32, &'a [u8])> {
    let (header, body) = bytes.split_at_checked(crate::STATE_HEADER).ok_or_else(|| {
        Error::bad_input(format!(
            "`{name}`: {what} is {} bytes, too short for its header",
            bytes.len()
        ))
    })?;
    if &header[..4] != magic {
        return Err(Error::bad_input(format!(
            "`{name}`: these bytes are not a Flowgate {what}"
        )));
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&header[4..]);
    Ok((u32::from_le_bytes(version), body))
}

struct Framed<T>(T);

impl<T: Transform> DynTransform for Framed<T> {
    fn process(&mut self, batch: RecordBatch) -> Result<Output> {
        self.0.process(batch.clone())?.settle(&batch)
    }

    fn on_watermark(&mut self, ts_ms: i64) -> Result<Output> {
        self.0.on_watermark(ts_ms)
    }

    fn snapshot(&self) -> Result<Vec<u8>> {
        Ok(frame(STATE_MAGIC, T::STATE_VERSION, self.0.snapshot()?))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let (version, body) = unframe(T::NAME, "snapshot", STATE_MAGIC, state)?;
        self.0.restore(version, body)
    }

    fn snapshot_delta(&mut self) -> Result<Option<Vec<u8>>> {
        Ok(self
            .0
            .snapshot_delta()?
            .map(|body| frame(DELTA_MAGIC, T::STATE_VERSION, body)))
    }

    fn restore_delta(&mut self, delta: &[u8]) -> Result<()> {
        let (version, body) = unframe(T::NAME, "state delta", DELTA_MAGIC, delta)?;
        self.0.restore_delta(version, body)
    }
}

/// Creates plugin `T` from its config as JSON text and the input schema, as the host does.
///
/// Config errors name the key path, e.g. ``invalid config: `rules.price.min`: invalid type``.
pub fn create<T: Transform>(
    config_json: &str,
    input: &SchemaRef,
) -> Result<(Box<dyn DynTransform>, SchemaRef)> {
    let config = crate::config::parse::<T::Config>(config_json)?;
    let (transform, output) = T::create(config, input)?;
    Ok((Box::new(Framed(transform)), output))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_with_room_for_the_header_is_framed_where_it_lies() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut body = Vec::with_capacity(bytes.len() + crate::STATE_HEADER);
        body.extend_from_slice(&bytes);
        let at = body.as_ptr();
        let framed = frame(STATE_MAGIC, 7, body);
        assert_eq!(framed.as_ptr(), at, "moved to another buffer");
        let (version, read) = unframe("t", "snapshot", STATE_MAGIC, &framed).expect("unframe");
        assert_eq!((version, read), (7, &bytes[..]));
        // Without the room it is framed all the same, in a buffer grown by the header only.
        let framed = frame(DELTA_MAGIC, 3, vec![1, 2, 3]);
        assert_eq!(framed.capacity(), 3 + crate::STATE_HEADER);
        let (version, read) = unframe("t", "delta", DELTA_MAGIC, &framed).expect("unframe");
        assert_eq!((version, read), (3, &[1u8, 2, 3][..]));
    }
}

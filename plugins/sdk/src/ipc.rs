//! Arrow IPC stream encoding, as it crosses the plugin boundary. The host uses these too, so both
//! sides agree on one framing.

use arrow::buffer::Buffer;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::ipc::reader::StreamDecoder;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;

/// Encodes a schema alone as an IPC stream.
pub fn encode_schema(schema: &Schema) -> Result<Vec<u8>, ArrowError> {
    let mut writer = StreamWriter::try_new(Vec::new(), schema)?;
    writer.finish()?;
    writer.into_inner()
}

/// Decodes a schema-only IPC stream.
pub fn decode_schema(bytes: &[u8]) -> Result<SchemaRef, ArrowError> {
    let (schema, batches) = decode(bytes.to_vec())?;
    if !batches.is_empty() {
        return Err(ArrowError::IpcError(
            "expected a schema-only stream, found record batches".into(),
        ));
    }
    schema.ok_or_else(|| ArrowError::IpcError("stream has no schema message".into()))
}

/// Encodes batches as one IPC stream. No batches: empty bytes (no schema message either).
pub fn encode_batches(schema: &Schema, batches: &[RecordBatch]) -> Result<Vec<u8>, ArrowError> {
    if batches.is_empty() {
        return Ok(Vec::new());
    }
    let capacity = batches
        .iter()
        .map(RecordBatch::get_array_memory_size)
        .sum::<usize>()
        + 1024;
    let mut writer = StreamWriter::try_new(Vec::with_capacity(capacity), schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    writer.into_inner()
}

/// Decodes an IPC stream without copying array data (aligned buffers are used in place).
/// Empty bytes decode to no schema and no batches.
pub fn decode(bytes: Vec<u8>) -> Result<(Option<SchemaRef>, Vec<RecordBatch>), ArrowError> {
    let mut buffer = Buffer::from_vec(bytes);
    let mut decoder = StreamDecoder::new();
    let mut batches = Vec::new();
    while !buffer.is_empty() {
        if let Some(batch) = decoder.decode(&mut buffer)? {
            batches.push(batch);
        }
    }
    decoder.finish()?;
    Ok((decoder.schema(), batches))
}

/// Decodes an IPC stream expected to hold exactly one batch (the `process` argument).
pub fn decode_one(bytes: Vec<u8>) -> Result<RecordBatch, ArrowError> {
    let (schema, mut batches) = decode(bytes)?;
    match (schema, batches.len()) {
        (_, 1) => Ok(batches.remove(0)),
        (Some(schema), 0) => Ok(RecordBatch::new_empty(schema)),
        (None, _) => Err(ArrowError::IpcError(
            "empty stream: no schema, no batch".into(),
        )),
        (_, n) => Err(ArrowError::IpcError(format!(
            "expected one batch, found {n}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field};
    use std::sync::Arc;

    #[test]
    fn round_trip() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, false),
            Field::new("b", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3])),
                Arc::new(StringArray::from(vec![Some("x"), None, Some("z")])),
            ],
        )
        .unwrap();
        let bytes = encode_batches(&schema, &[batch.clone(), batch.slice(1, 2)]).unwrap();
        let (got_schema, got) = decode(bytes).unwrap();
        assert_eq!(got_schema.unwrap(), schema);
        assert_eq!(got, vec![batch.clone(), batch.slice(1, 2)]);
        assert_eq!(
            decode_schema(&encode_schema(&schema).unwrap()).unwrap(),
            schema
        );
        assert!(encode_batches(&schema, &[]).unwrap().is_empty());
        assert!(decode_one(vec![1, 2, 3]).is_err());
    }
}

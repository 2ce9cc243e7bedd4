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
    decode_buffer(Buffer::from_vec(bytes))
}

/// [`decode`] from bytes already in an arrow [`Buffer`]: the batches share its memory, so a
/// caller that keeps a clone of `buffer` can take the bytes back once the batches are gone
/// ([`Buffer::into_vec`]).
pub fn decode_buffer(
    mut buffer: Buffer,
) -> Result<(Option<SchemaRef>, Vec<RecordBatch>), ArrowError> {
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

/// The bytes of `buffer` as a `Vec`: its own memory, without a copy, once nothing shares it any
/// more (the batches [`decode_buffer`] made from it are gone); a copy while something does.
pub fn into_bytes(buffer: Buffer) -> Vec<u8> {
    buffer
        .into_vec::<u8>()
        .unwrap_or_else(|shared| shared.as_slice().to_vec())
}

/// Decodes an IPC stream expected to hold exactly one batch (the `process` argument).
pub fn decode_one(bytes: Vec<u8>) -> Result<RecordBatch, ArrowError> {
    decode_one_buffer(Buffer::from_vec(bytes))
}

/// [`decode_one`] from bytes already in an arrow [`Buffer`] (see [`decode_buffer`]).
pub fn decode_one_buffer(buffer: Buffer) -> Result<RecordBatch, ArrowError> {
    let (schema, mut batches) = decode_buffer(buffer)?;
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
    use arrow::array::{Array, Int64Array, StringArray};
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

    #[test]
    fn bytes_come_back_uncopied_once_no_batch_shares_them() {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![1, 2, 3]))],
        )
        .unwrap();
        let bytes = encode_batches(&schema, &[batch]).unwrap();

        // Decoded, and the batch gone: the very bytes come back.
        let (sent, at) = (bytes.clone(), bytes.as_ptr());
        let buffer = Buffer::from_vec(bytes);
        drop(decode_one_buffer(buffer.clone()).unwrap());
        let back = into_bytes(buffer);
        assert_eq!(back.as_ptr(), at, "copied although nothing shared them");
        assert_eq!(back, sent);

        // A column still shares them (a plugin kept it): a copy.
        let buffer = Buffer::from_vec(back);
        let kept = decode_one_buffer(buffer.clone()).unwrap().column(0).clone();
        let copied = into_bytes(buffer);
        assert_ne!(copied.as_ptr(), at);
        assert_eq!(copied, sent);
        assert_eq!(kept.len(), 3);
    }
}

//! The JSON decoder on arbitrary bytes: records split at newlines, decoded as one batch into the
//! stock tick schema. It must never panic, and every record must come out exactly once: as a row
//! of the batch or as a failure with a reason. The fast path must agree with arrow's JSON reader
//! on every record: the same row or the same failure.
#![no_main]

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use flowgate_fuzz::decode::JsonDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let schema = Arc::new(Schema::new(vec![
        Field::new("symbol", DataType::Utf8, true),
        Field::new("price", DataType::Float64, true),
        Field::new("volume", DataType::Int64, true),
        Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
        Field::new("ok", DataType::Boolean, false),
    ]));
    let decoder = JsonDecoder::new(schema.clone());
    let general = JsonDecoder::general_only(schema.clone());
    // A good tick decodes: otherwise only the failure paths would be fuzzed.
    let good: &[u8] = br#"{"symbol":"A","price":1.5,"volume":3,"ts":"2025-11-12T14:30:00Z","ok":true}"#;
    assert_eq!(decoder.decode(&[good]).0.num_rows(), 1, "a good tick did not decode");
    let records: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let (batch, failures) = decoder.decode(&records);
    assert_eq!(batch.schema(), schema);
    assert_eq!(batch.num_rows() + failures.len(), records.len());
    let mut seen: Vec<usize> = failures.iter().map(|f| f.index).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), failures.len(), "a record failed twice");
    assert!(seen.iter().all(|&i| i < records.len()));
    assert!(failures.iter().all(|f| !f.reason.is_empty()));
    for record in &records {
        let one = [*record];
        let (fast, fast_failures) = decoder.decode(&one);
        let (slow, slow_failures) = general.decode(&one);
        assert_eq!(fast, slow, "the fast path decoded {:?} differently", String::from_utf8_lossy(record));
        assert_eq!(fast_failures, slow_failures);
    }
});

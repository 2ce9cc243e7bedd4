//! Replays every input kept under `fuzz/regressions/` (crashes `make fuzz` found, and seeds)
//! through what its fuzz target exercises, with the same checks: the JSON decoder accounts for
//! every record once, its fast path agrees with arrow's JSON reader record by record, and it
//! never panics; the pipeline parser never panics and names the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use flowgate::config::Pipeline;
use flowgate::decode::JsonDecoder;

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for kind in ["regressions", "seeds"] {
        let Ok(entries) = std::fs::read_dir(dir.join(kind).join(target)) else {
            continue;
        };
        files.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    files.sort();
    files
}

#[test]
fn the_decoder_accounts_for_every_record_of_every_kept_input() {
    let schema = Arc::new(Schema::new(vec![
        Field::new("symbol", DataType::Utf8, true),
        Field::new("price", DataType::Float64, true),
        Field::new("volume", DataType::Int64, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        Field::new("ok", DataType::Boolean, false),
    ]));
    let decoder = JsonDecoder::new(schema.clone());
    let general = JsonDecoder::general_only(schema);
    let good: &[u8] =
        br#"{"symbol":"A","price":1.5,"volume":3,"ts":"2025-11-12T14:30:00Z","ok":true}"#;
    assert_eq!(decoder.decode(&[good]).0.num_rows(), 1);
    let files = inputs("decode");
    assert!(!files.is_empty(), "no fuzz inputs found");
    for file in files {
        let data = std::fs::read(&file).expect("read");
        let records: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
        let (batch, failures) = decoder.decode(&records);
        assert_eq!(
            batch.num_rows() + failures.len(),
            records.len(),
            "{}",
            file.display()
        );
        // The fast path agrees with arrow's JSON reader on each record.
        for record in &records {
            assert_eq!(
                decoder.decode(&[record]),
                general.decode(&[record]),
                "{}: {}",
                file.display(),
                String::from_utf8_lossy(record)
            );
        }
    }
}

#[test]
fn the_pipeline_parser_survives_every_kept_input() {
    let files = inputs("pipeline_yaml");
    assert!(!files.is_empty(), "no fuzz inputs found");
    for file in files {
        let data = std::fs::read(&file).expect("read");
        let Ok(text) = std::str::from_utf8(&data) else {
            continue;
        };
        let label = Path::new("/nonexistent/fuzz.yaml");
        if let Err(e) = Pipeline::parse(text, label, &HashMap::new()) {
            assert!(
                e.to_string().contains("fuzz.yaml"),
                "{}: {e}",
                file.display()
            );
        }
    }
}

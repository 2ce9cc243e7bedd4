use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{Record, Source, SourceError};
use crate::sink::Offsets;

/// A JSON-lines file as one partition: offset = line number − 1. For replay and backfill.
pub struct FileSource {
    path: PathBuf,
    topic: Arc<str>,
    lines: std::io::Lines<BufReader<std::fs::File>>,
    next: i64,
    opened: std::time::Instant,
}

impl FileSource {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let file = std::fs::File::open(path)
            .map_err(|e| SourceError::Io(format!("cannot open `{}`: {e}", path.display())))?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("input");
        Ok(FileSource {
            path: path.to_path_buf(),
            topic: format!("file:{name}").into(),
            lines: BufReader::new(file).lines(),
            next: 0,
            opened: std::time::Instant::now(),
        })
    }
}

impl Source for FileSource {
    fn poll(
        &mut self,
        max: usize,
        _timeout: Duration,
        out: &mut Vec<Record>,
    ) -> Result<(), SourceError> {
        for _ in 0..max {
            match self.lines.next() {
                None => break,
                Some(Err(e)) => {
                    return Err(SourceError::Io(format!(
                        "reading `{}` line {}: {e}",
                        self.path.display(),
                        self.next + 1
                    )));
                }
                Some(Ok(line)) => {
                    let offset = self.next;
                    self.next += 1;
                    if line.trim().is_empty() {
                        continue;
                    }
                    out.push(Record {
                        topic: self.topic.clone(),
                        partition: 0,
                        offset,
                        payload: line.into_bytes(),
                        timestamp_ms: None,
                    });
                }
            }
        }
        Ok(())
    }

    fn commit(&mut self, _offsets: &Offsets) -> Result<(), SourceError> {
        Ok(())
    }

    fn assigned(&self) -> Vec<((String, i32), std::time::Instant)> {
        vec![((self.topic.to_string(), 0), self.opened)]
    }

    fn seek(&mut self, _topic: &str, _partition: i32, offset: i64) -> Result<(), SourceError> {
        if offset < self.next {
            *self = FileSource::open(&self.path)?;
        }
        while self.next < offset {
            if self.lines.next().is_none() {
                break;
            }
            self.next += 1;
        }
        Ok(())
    }
}

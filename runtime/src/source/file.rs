//! JSON-lines files as partitions, for replay and backfill (as Spark reads a folder of JSON
//! files): a file, a folder (its `*.json` / `*.jsonl` / `*.ndjson` files), or a pattern with `*`
//! in the file name (`ticks/part-*.jsonl`). Each file is a partition of its own, named by the
//! file: topic `file:{name}`, partition 0, and a record's offset is its line number − 1. So a
//! file keeps its positions and state however many files are added beside it or taken away (a
//! position in a sorted list would pass one file's offsets to another).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{Arena, Rebalance, Record, Source, SourceError, StartAt};
use crate::sink::Offsets;

/// One file being read.
struct FilePartition {
    /// `file:{name}`: the partition's topic (its partition number is 0).
    topic: Arc<str>,
    path: PathBuf,
    reader: BufReader<std::fs::File>,
    next: i64,
    done: bool,
}

impl FilePartition {
    fn open(path: &Path) -> Result<Self, SourceError> {
        let file = std::fs::File::open(path)
            .map_err(|e| SourceError::Io(format!("cannot open `{}`: {e}", path.display())))?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("input");
        Ok(FilePartition {
            topic: format!("file:{name}").into(),
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 16, file),
            next: 0,
            done: false,
        })
    }

    /// Reads the next line into `line` (cleared first) without its `\n` or `\r\n`; false at the
    /// end of the file. Bytes, not text: a line that is not UTF-8 is a record like any other,
    /// and the decoder dead-letters it.
    fn next_line(&mut self, line: &mut Vec<u8>) -> std::io::Result<bool> {
        if line.capacity() > Arena::OWN {
            // A long line's buffer is not kept for the short ones after it.
            *line = Vec::new();
        }
        line.clear();
        if self.reader.read_until(b'\n', line)? == 0 {
            return Ok(false);
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        Ok(true)
    }

    /// Skips to line `offset` (0-based).
    fn skip_to(&mut self, offset: i64) -> Result<(), SourceError> {
        while self.next < offset {
            match self.reader.skip_until(b'\n') {
                Ok(0) => {
                    self.done = true;
                    break;
                }
                Ok(_) => self.next += 1,
                Err(e) => return Err(self.failed(e)),
            }
        }
        Ok(())
    }

    /// A read error, with the file and line.
    fn failed(&self, e: std::io::Error) -> SourceError {
        SourceError::Io(format!(
            "reading `{}` line {}: {e}",
            self.path.display(),
            self.next + 1
        ))
    }
}

/// A line of whitespace only (Unicode's, as `str::trim` sees it), which is skipped.
fn blank(line: &[u8]) -> bool {
    match line.trim_ascii_start().first() {
        None => true,
        // Other whitespace begins with one of these bytes: U+000B, or a multi-byte character.
        Some(&b) if b == 0x0b || b >= 0x80 => {
            std::str::from_utf8(line).is_ok_and(|text| text.trim().is_empty())
        }
        Some(_) => false,
    }
}

/// JSON-lines files, one partition each.
pub struct FileSource {
    files: Vec<FilePartition>,
    handler: Option<Arc<dyn Rebalance>>,
    started: bool,
    turn: usize,
    /// Each line is read here, then copied into `arena`.
    line: Vec<u8>,
    arena: Arena,
}

/// The files `path` names: itself, a folder's JSON files, or a `*` pattern's matches, sorted.
fn files_of(path: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let list = |dir: &Path, keep: &dyn Fn(&str) -> bool| -> Result<Vec<PathBuf>, SourceError> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| SourceError::Io(format!("cannot list `{}`: {e}", dir.display())))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(keep))
            .collect();
        files.sort();
        Ok(files)
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let files = if name.contains('*') {
        let (prefix, suffix) = name.split_once('*').unwrap_or((name, ""));
        if suffix.contains('*') {
            return Err(SourceError::Io(format!(
                "`{}`: only one `*` is supported in a file pattern",
                path.display()
            )));
        }
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        list(dir.unwrap_or(Path::new(".")), &|n: &str| {
            n.len() >= prefix.len() + suffix.len() && n.starts_with(prefix) && n.ends_with(suffix)
        })?
    } else if path.is_dir() {
        list(path, &|n: &str| {
            [".json", ".jsonl", ".ndjson"]
                .iter()
                .any(|x| n.ends_with(x))
        })?
    } else {
        vec![path.to_path_buf()]
    };
    if files.is_empty() {
        return Err(SourceError::Io(format!(
            "`{}` names no JSON-lines file",
            path.display()
        )));
    }
    Ok(files)
}

impl FileSource {
    /// Opens the files `path` names.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let paths = files_of(path)?;
        let files = paths
            .iter()
            .map(|p| FilePartition::open(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FileSource {
            files,
            handler: None,
            started: false,
            turn: 0,
            line: Vec::new(),
            arena: Arena::default(),
        })
    }

    /// The partition count (one per file).
    pub fn partitions(&self) -> usize {
        self.files.len()
    }

    /// Hands every file to the engine once, and starts each where it says.
    fn start(&mut self) -> Result<(), SourceError> {
        self.started = true;
        let Some(handler) = self.handler.clone() else {
            return Ok(());
        };
        let parts: Vec<(String, i32)> = self
            .files
            .iter()
            .map(|f| (f.topic.to_string(), 0))
            .collect();
        for (file, start) in self.files.iter_mut().zip(handler.assigned(&parts)) {
            if let StartAt::Offset(o) = start {
                file.skip_to(o)?;
            }
        }
        Ok(())
    }
}

impl Source for FileSource {
    fn poll(
        &mut self,
        max: usize,
        timeout: Duration,
        out: &mut Vec<Record>,
    ) -> Result<(), SourceError> {
        if !self.started {
            self.start()?;
        }
        // Every file read to its end: nothing will come, so wait out the timeout here (the run
        // loop passes the time to its next deadline) instead of returning at once and being
        // called again in a tight loop (a finished backfill spun a whole core on that).
        if self.files.iter().all(|f| f.done) {
            std::thread::sleep(timeout);
            return Ok(());
        }
        // Round-robin in chunks, so every partition moves.
        let n = self.files.len();
        let chunk = (max / n.max(1)).max(1);
        let mut taken = 0;
        for _ in 0..n {
            let index = self.turn % n;
            self.turn += 1;
            let file = &mut self.files[index];
            let mut from_this = 0;
            while from_this < chunk && taken < max && !file.done {
                match file.next_line(&mut self.line) {
                    Ok(false) => file.done = true,
                    Err(e) => return Err(file.failed(e)),
                    Ok(true) => {
                        let offset = file.next;
                        file.next += 1;
                        if blank(&self.line) {
                            continue;
                        }
                        out.push(Record {
                            topic: file.topic.clone(),
                            partition: 0,
                            offset,
                            payload: self.arena.copy(&self.line),
                            tombstone: false,
                            timestamp_ms: None,
                            origin: None,
                        });
                        from_this += 1;
                        taken += 1;
                    }
                }
            }
        }
        Ok(())
    }

    fn commit(&mut self, _offsets: &Offsets) -> Result<(), SourceError> {
        Ok(())
    }

    fn bounded(&self) -> bool {
        true
    }

    fn exhausted(&self) -> bool {
        self.started && self.files.iter().all(|f| f.done)
    }

    /// A file with lines left to read is behind, however long since its last record.
    fn behind(&self, topic: &str, _partition: i32, _next: i64) -> bool {
        self.files.iter().any(|f| &*f.topic == topic && !f.done)
    }

    fn on_rebalance(&mut self, handler: Arc<dyn Rebalance>) {
        self.handler = Some(handler);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_or_pattern_is_one_partition_per_file_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        for (name, lines) in [
            ("b.jsonl", "3\n4\n"),
            ("a.jsonl", "1\n\n2\n"),
            ("c.txt", "x\n"),
        ] {
            std::fs::write(dir.path().join(name), lines).unwrap();
        }
        let mut folder = FileSource::open(dir.path()).unwrap();
        assert_eq!(folder.partitions(), 2);
        let mut out = Vec::new();
        folder.poll(100, Duration::ZERO, &mut out).unwrap();
        let got: Vec<(String, i32, i64, String)> = out
            .iter()
            .map(|r| {
                (
                    r.topic.to_string(),
                    r.partition,
                    r.offset,
                    String::from_utf8_lossy(&r.payload).into(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("file:a.jsonl".into(), 0, 0, "1".into()),
                ("file:a.jsonl".into(), 0, 2, "2".into()),
                ("file:b.jsonl".into(), 0, 0, "3".into()),
                ("file:b.jsonl".into(), 0, 1, "4".into())
            ]
        );
        let pattern = FileSource::open(&dir.path().join("*.txt")).unwrap();
        assert_eq!(pattern.partitions(), 1);
        assert!(FileSource::open(&dir.path().join("none-*.x")).is_err());
    }

    #[test]
    fn a_file_with_lines_left_is_behind_until_read_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.jsonl"), "1\n2\n3\n").unwrap();
        std::fs::write(dir.path().join("b.jsonl"), "4\n").unwrap();
        let mut source = FileSource::open(dir.path()).unwrap();
        let (a, b) = ("file:a.jsonl", "file:b.jsonl");
        assert!(source.behind(a, 0, 0) && source.behind(b, 0, 0));
        let mut out = Vec::new();
        source.poll(2, Duration::ZERO, &mut out).unwrap();
        assert!(source.behind(a, 0, 1), "two lines of `a` are left");
        for _ in 0..5 {
            source.poll(2, Duration::ZERO, &mut out).unwrap();
        }
        assert_eq!(out.len(), 4);
        assert!(!source.behind(a, 0, 3) && !source.behind(b, 0, 1));
        assert!(!source.behind("file:c.jsonl", 0, 0), "no such file");
    }

    #[test]
    fn a_line_that_is_not_utf8_is_a_record_and_line_endings_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        // Line 2 is blank in ASCII, line 3 in Unicode (NBSP, U+3000, a vertical tab).
        let text = b"{\"a\":1}\r\n\xff\xfe{}\n \t\r\n\xc2\xa0\xe3\x80\x80\x0b\n{\"a\":2}";
        std::fs::write(&path, text).unwrap();
        let mut source = FileSource::open(&path).unwrap();
        let mut out = Vec::new();
        source.poll(100, Duration::ZERO, &mut out).unwrap();
        let got: Vec<(i64, &[u8])> = out.iter().map(|r| (r.offset, &r.payload[..])).collect();
        assert_eq!(
            got,
            vec![
                (0, &b"{\"a\":1}"[..]),
                (1, &b"\xff\xfe{}"[..]),
                (4, &b"{\"a\":2}"[..])
            ],
            "blank lines are skipped, the last line needs no newline"
        );
        assert!(source.exhausted());
    }

    /// The engine's side in these tests: starts each file where a table would have it.
    struct Resume(std::collections::HashMap<String, i64>);

    impl Rebalance for Resume {
        fn assigned(&self, partitions: &[(String, i32)]) -> Vec<StartAt> {
            partitions
                .iter()
                .map(|(t, _)| {
                    self.0
                        .get(t)
                        .map_or(StartAt::Beginning, |o| StartAt::Offset(*o))
                })
                .collect()
        }
        fn revoked(&self, _: &[(String, i32)]) -> Offsets {
            Offsets::new()
        }
        fn lost(&self, _: &[(String, i32)]) {}
    }

    #[test]
    fn a_file_keeps_its_positions_when_files_are_added_beside_it_or_taken_away() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.jsonl"), "b0\nb1\nb2\n").unwrap();
        std::fs::write(dir.path().join("c.jsonl"), "c0\nc1\n").unwrap();
        // A table holds b up to line 1 and c up to line 0; then a.jsonl arrives and b goes.
        std::fs::write(dir.path().join("a.jsonl"), "a0\n").unwrap();
        std::fs::remove_file(dir.path().join("b.jsonl")).unwrap();
        let held = [
            ("file:b.jsonl".to_string(), 2),
            ("file:c.jsonl".to_string(), 1),
        ];
        let mut source = FileSource::open(dir.path()).unwrap();
        source.on_rebalance(Arc::new(Resume(held.into_iter().collect())));
        let mut out = Vec::new();
        source.poll(100, Duration::ZERO, &mut out).unwrap();
        let got: Vec<String> = out
            .iter()
            .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
            .collect();
        assert_eq!(got, vec!["a0", "c1"], "c resumes at its own line, a starts");
    }
}

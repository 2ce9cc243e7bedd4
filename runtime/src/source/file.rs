//! JSON-lines files as partitions, for replay and backfill (as Spark reads a folder of JSON
//! files): a file, a folder (its `*.json` / `*.jsonl` / `*.ndjson` files), or a pattern with `*`
//! in the file name (`ticks/part-*.jsonl`). Each file is a partition of its own, named by the
//! file: topic `file:{name}`, partition 0, and a record's offset is its line number − 1. So a
//! file keeps its positions and state however many files are added beside it or taken away (a
//! position in a sorted list would pass one file's offsets to another).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::{Arena, Rebalance, Record, Source, SourceError, StartAt};
use crate::sink::Offsets;

/// One file being read.
struct FilePartition {
    /// `file:{name}`: the partition's topic (its partition number is 0).
    topic: Arc<str>,
    path: PathBuf,
    file: std::fs::File,
    /// The file is read straight into a block of the source's [`Arena`], and each line handed
    /// out as a slice of it (no copy): `buf[..filled]` is read and not yet handed out, the rest
    /// is room for the next read.
    buf: BytesMut,
    filled: usize,
    /// How much of `buf[..filled]` holds no line end.
    scanned: usize,
    /// `buf` is a block of the arena, given back to it when done with (not the empty buffer a
    /// file starts with, nor one made bigger than a block for a line longer than one).
    reusable: bool,
    /// The file is read to its end (lines may be left in `buf`).
    eof: bool,
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
            file,
            buf: BytesMut::new(),
            filled: 0,
            scanned: 0,
            reusable: false,
            eof: false,
            next: 0,
            done: false,
        })
    }

    /// The next line without its `\n` or `\r\n`, or None at the end of the file. Bytes, not
    /// text: a line that is not UTF-8 is a record like any other, and the decoder dead-letters
    /// it. The last line needs no `\n`.
    fn next_line(&mut self, arena: &mut Arena, block: usize) -> std::io::Result<Option<Bytes>> {
        loop {
            if let Some(at) = memchr::memchr(b'\n', &self.buf[self.scanned..self.filled]) {
                let end = self.scanned + at;
                let mut line = self.buf.split_to(end + 1);
                self.filled -= end + 1;
                self.scanned = 0;
                line.truncate(if end > 0 && line[end - 1] == b'\r' {
                    end - 1
                } else {
                    end
                });
                return Ok(Some(line.freeze()));
            }
            self.scanned = self.filled;
            if self.eof {
                if self.filled == 0 {
                    return Ok(None);
                }
                let line = self.buf.split_to(self.filled);
                (self.filled, self.scanned) = (0, 0);
                return Ok(Some(line.freeze()));
            }
            if self.filled == self.buf.len() {
                self.renew(arena, block);
            }
            match self.file.read(&mut self.buf[self.filled..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// A new buffer with room to read into, starting with the part of a line read so far: a
    /// block of `block` bytes, or twice that part when it fills half a block or more.
    fn renew(&mut self, arena: &mut Arena, block: usize) {
        let size = block.max(2 * self.filled);
        let mut fresh = if size == block {
            arena.block(block)
        } else {
            BytesMut::with_capacity(size)
        };
        fresh.extend_from_slice(&self.buf[..self.filled]);
        // Zeroed once per block: the reads need initialised room, and this is all the writing
        // a block gets besides them.
        fresh.resize(size, 0);
        let old = std::mem::replace(&mut self.buf, fresh);
        if std::mem::replace(&mut self.reusable, size == block) {
            arena.retire(old);
        }
    }

    /// Read to its end: the file's block goes back to the arena.
    fn finish(&mut self, arena: &mut Arena) {
        self.done = true;
        let old = std::mem::take(&mut self.buf);
        if std::mem::replace(&mut self.reusable, false) {
            arena.retire(old);
        }
    }

    /// Skips to line `offset` (0-based).
    fn skip_to(&mut self, offset: i64, arena: &mut Arena, block: usize) -> Result<(), SourceError> {
        while self.next < offset {
            match self.next_line(arena, block) {
                Ok(None) => {
                    self.finish(arena);
                    break;
                }
                Ok(Some(_)) => self.next += 1,
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
    /// The blocks the files are read into.
    arena: Arena,
    /// Bytes of a file's block: [`Arena::BLOCK`] shared among the files, at least 64 KiB each.
    block: usize,
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
            block: (Arena::BLOCK / files.len().max(1)).max(Arena::OWN),
            files,
            handler: None,
            started: false,
            turn: 0,
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
                file.skip_to(o, &mut self.arena, self.block)?;
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
                match file.next_line(&mut self.arena, self.block) {
                    Ok(None) => file.finish(&mut self.arena),
                    Err(e) => return Err(file.failed(e)),
                    Ok(Some(line)) => {
                        let offset = file.next;
                        file.next += 1;
                        if blank(&line) {
                            continue;
                        }
                        out.push(Record {
                            topic: file.topic.clone(),
                            partition: 0,
                            offset,
                            payload: line,
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

    #[test]
    fn lines_read_straight_into_blocks_come_out_whole_across_block_ends() {
        // Lines of 0 to 99 bytes, some ending `\r\n`, a line holding a lone `\r`, and a last
        // line without a newline; read with blocks smaller and larger than the lines.
        let mut text = Vec::new();
        let mut seed = 7u64;
        for i in 0..500 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (seed >> 33) as usize % 100;
            text.extend((0..len).map(|j| b'a' + ((i + j) % 26) as u8));
            if i % 7 == 0 {
                text.extend_from_slice(b"x\ry");
            }
            text.extend_from_slice(if i % 3 == 0 { b"\r\n" } else { b"\n" });
        }
        text.extend_from_slice(b"last\r");
        let mut expected: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
        let last = expected.len() - 1;
        for line in &mut expected[..last] {
            *line = line.strip_suffix(b"\r").unwrap_or(line);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, &text).unwrap();
        for block in [8, 16, 101, 4096, Arena::BLOCK] {
            let mut file = FilePartition::open(&path).unwrap();
            let mut arena = Arena::default();
            let mut got = Vec::new();
            while let Some(line) = file.next_line(&mut arena, block).unwrap() {
                got.push(line);
            }
            let got: Vec<&[u8]> = got.iter().map(|l| &l[..]).collect();
            assert_eq!(got, expected, "blocks of {block} bytes");
            assert_eq!(
                got.last().unwrap(),
                b"last\r",
                "the last line keeps a lone \\r"
            );
        }
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

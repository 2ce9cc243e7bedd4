//! What a run committed, table by table: rows, rows per key, the newest rows of each key, and
//! dead-letter rows by stage and reason. The committer counts a batch when it writes it and adds
//! the count when the epoch commits, so an epoch a crash or a failed commit loses is never
//! counted. The summary at the end of a run prints it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions};

/// Rows the summary shows of a key, newest last.
pub const NEWEST: usize = 8;
/// Rows kept per key for the status page's chart, for the first [`CHART_KEYS`] keys seen
/// ([`NEWEST`] for the rest).
pub const CHART_ROWS: usize = 60;
pub const CHART_KEYS: usize = 32;
/// Dead-letter rows kept, newest last.
pub const DEAD_NEWEST: usize = 20;
/// Keys counted one by one per table; rows of further keys count under [`OTHER_KEYS`].
pub const MAX_KEYS: usize = 1000;
/// Where rows of keys beyond [`MAX_KEYS`] are counted.
pub const OTHER_KEYS: &str = "(other keys)";

/// What a sink's rows are counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TallyKind {
    /// Rows only.
    Rows,
    /// Rows per key (the first text column) with the newest rows of each: the chain's output.
    Keyed,
    /// The dead letter: rows per stage and reason.
    DeadLetter,
    /// Not a table (the repartition hop's topic).
    Hidden,
}

/// A row kept for the summary and the status page: row `index` of `rows`, the rows one counted
/// batch had kept (never the whole batch). Formatting every row of the chain's output as it was
/// committed, of which all but the newest few are pushed out unseen, was 4% of a file run's CPU.
#[derive(Debug, Clone)]
struct KeptRow {
    rows: Arc<RecordBatch>,
    index: u32,
}

/// `batch` with memory of its own. Rows taken from a batch copy their values, except in view
/// and dictionary columns, which keep every data buffer of the batch they came from (for a
/// plugin's output, decoded from IPC without a copy, the whole message): those are compacted
/// (views) or unpacked (dictionaries). Nested types keep theirs; a chain's output rarely has them.
fn detached(batch: RecordBatch) -> RecordBatch {
    let own = |c: &ArrayRef| -> Option<ArrayRef> {
        match c.data_type() {
            DataType::Utf8View => Some(Arc::new(c.as_string_view().gc())),
            DataType::BinaryView => Some(Arc::new(c.as_binary_view().gc())),
            DataType::Dictionary(_, value) => arrow::compute::cast(c, value).ok(),
            _ => None,
        }
    };
    if !batch.columns().iter().any(|c| {
        matches!(
            c.data_type(),
            DataType::Utf8View | DataType::BinaryView | DataType::Dictionary(..)
        )
    }) {
        return batch;
    }
    let (fields, columns): (Vec<Field>, Vec<ArrayRef>) = batch
        .schema()
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(f, c)| match own(c) {
            Some(owned) => (
                f.as_ref().clone().with_data_type(owned.data_type().clone()),
                owned,
            ),
            None => (f.as_ref().clone(), c.clone()),
        })
        .unzip();
    let schema = Arc::new(Schema::new_with_metadata(
        fields,
        batch.schema().metadata().clone(),
    ));
    RecordBatch::try_new(schema, columns).unwrap_or(batch)
}

/// One table's tally.
#[derive(Debug, Clone, Default)]
pub struct TableTally {
    /// The sink's name (`dead_letter` for the dead letter).
    pub name: String,
    /// Rows committed by this run.
    pub rows: u64,
    /// True for the dead letter.
    pub dead_letter: bool,
    /// The column rows are counted by, when counted by key.
    pub key: Option<String>,
    /// Rows per key value (at most [`MAX_KEYS`] values, then [`OTHER_KEYS`]).
    pub per_key: BTreeMap<String, u64>,
    /// Column names of the newest rows.
    pub columns: Vec<String>,
    /// The newest rows of each key, oldest first, formatted only when shown
    /// ([`TableTally::newest_rows`]).
    newest: BTreeMap<String, VecDeque<KeptRow>>,
    /// Rows of the batches `newest` points into, at most: kept rows share a batch with rows
    /// already pushed out, until [`TableTally::compact`] copies them into one.
    pinned: usize,
    /// Dead-letter rows by (stage, reason): the reason is its text up to the first `:`
    /// (`price`, `late`, `invalid JSON`).
    pub refused: BTreeMap<(String, String), u64>,
    /// The newest dead-letter rows: stage, reason, `topic/partition@offset`, payload (cut).
    pub dead_newest: VecDeque<[String; 4]>,
    /// Keys whose newest [`CHART_ROWS`] rows are kept.
    charted: BTreeSet<String>,
    hidden: bool,
}

impl TableTally {
    pub(crate) fn new(name: &str, kind: TallyKind) -> Self {
        TableTally {
            name: name.to_string(),
            dead_letter: kind == TallyKind::DeadLetter,
            hidden: kind == TallyKind::Hidden,
            ..Default::default()
        }
    }

    /// Not a table (the repartition hop's topic).
    pub fn is_hidden(&self) -> bool {
        self.hidden
    }

    fn cap(&mut self, key: &str) -> usize {
        if self.charted.contains(key) {
            return CHART_ROWS;
        }
        if self.charted.len() < CHART_KEYS {
            self.charted.insert(key.to_string());
            return CHART_ROWS;
        }
        NEWEST
    }

    /// Counts `batch` as `kind` says.
    pub(crate) fn count(&mut self, batch: &RecordBatch, kind: TallyKind) {
        self.rows += batch.num_rows() as u64;
        match kind {
            TallyKind::Rows | TallyKind::Hidden => {}
            TallyKind::Keyed => self.count_keys(batch),
            TallyKind::DeadLetter => self.count_refusals(batch),
        }
    }

    fn count_keys(&mut self, batch: &RecordBatch) {
        let schema = batch.schema();
        let Some(key) = schema
            .fields()
            .iter()
            .position(|f| f.data_type() == &DataType::Utf8)
        else {
            return;
        };
        let Some(keys) = batch.column(key).as_string_opt::<i32>() else {
            return;
        };
        self.key = Some(schema.field(key).name().clone());
        // The newest rows of each key in this batch (rows come in event-time order per key).
        let mut last: HashMap<&str, VecDeque<usize>> = HashMap::new();
        for row in 0..batch.num_rows() {
            let value = if keys.is_null(row) {
                ""
            } else {
                keys.value(row)
            };
            let slot = if self.per_key.contains_key(value) || self.per_key.len() < MAX_KEYS {
                value
            } else {
                OTHER_KEYS
            };
            match self.per_key.get_mut(slot) {
                Some(n) => *n += 1,
                None => {
                    self.per_key.insert(slot.to_string(), 1);
                }
            }
            if slot != OTHER_KEYS {
                let rows = last.entry(value).or_default();
                rows.push_back(row);
                if rows.len() > CHART_ROWS {
                    rows.pop_front();
                }
            }
        }
        // A batch arrow cannot show is not kept (nor does it push out rows that can be shown).
        let options = FormatOptions::default();
        if batch
            .columns()
            .iter()
            .any(|c| ArrayFormatter::try_new(c.as_ref(), &options).is_err())
        {
            return;
        }
        self.columns = schema.fields().iter().map(|f| f.name().clone()).collect();
        // Only the rows each key keeps are taken out of the batch (one `take` for all keys).
        let mut indices: Vec<u32> = Vec::new();
        let mut spans: Vec<(&str, usize, std::ops::Range<usize>)> = Vec::with_capacity(last.len());
        for (value, rows) in last {
            let cap = self.cap(value);
            let start = indices.len();
            indices.extend(
                rows.iter()
                    .skip(rows.len().saturating_sub(cap))
                    .map(|&row| row as u32),
            );
            spans.push((value, cap, start..indices.len()));
        }
        let Ok(kept) = arrow::compute::take_record_batch(batch, &UInt32Array::from(indices)) else {
            return;
        };
        let kept = Arc::new(detached(kept));
        self.pinned += kept.num_rows();
        for (value, cap, span) in spans {
            let rows = match self.newest.get_mut(value) {
                Some(rows) => rows,
                None => self.newest.entry(value.to_string()).or_default(),
            };
            for index in span {
                rows.push_back(KeptRow {
                    rows: kept.clone(),
                    index: index as u32,
                });
                if rows.len() > cap {
                    rows.pop_front();
                }
            }
        }
        self.compact();
    }

    /// Copies the kept rows into one batch (one per schema) once the batches they point into
    /// hold over four times as many rows, so rows pushed out never pile up behind a few kept
    /// ones (a key seen once pins the rows of every other key of its batch).
    fn compact(&mut self) {
        let kept: usize = self.newest.values().map(VecDeque::len).sum();
        if self.pinned <= 4 * kept + 4096 {
            return;
        }
        // Each distinct batch, and the kept rows in traversal order as (batch, row).
        let mut batches: Vec<Arc<RecordBatch>> = Vec::new();
        let mut seen: HashMap<*const RecordBatch, usize> = HashMap::new();
        let mut picks: Vec<(usize, usize)> = Vec::with_capacity(kept);
        for row in self.newest.values().flatten() {
            let b = *seen.entry(Arc::as_ptr(&row.rows)).or_insert_with(|| {
                batches.push(row.rows.clone());
                batches.len() - 1
            });
            picks.push((b, row.index as usize));
        }
        // Batches of one schema are merged; a live swap may have changed the output's.
        let mut schemas: Vec<SchemaRef> = Vec::new();
        let group: Vec<usize> = batches
            .iter()
            .map(|b| match schemas.iter().position(|s| *s == b.schema()) {
                Some(g) => g,
                None => {
                    schemas.push(b.schema());
                    schemas.len() - 1
                }
            })
            .collect();
        let mut merged: Vec<Arc<RecordBatch>> = Vec::with_capacity(schemas.len());
        for g in 0..schemas.len() {
            let members: Vec<usize> = (0..batches.len()).filter(|&b| group[b] == g).collect();
            let local: HashMap<usize, usize> =
                members.iter().enumerate().map(|(i, &b)| (b, i)).collect();
            let sources: Vec<&RecordBatch> = members.iter().map(|&b| batches[b].as_ref()).collect();
            let rows: Vec<(usize, usize)> = picks
                .iter()
                .filter(|(b, _)| group[*b] == g)
                .map(|&(b, row)| (local[&b], row))
                .collect();
            match arrow::compute::interleave_record_batch(&sources, &rows) {
                Ok(batch) => merged.push(Arc::new(batch)),
                // Cannot happen for batches of one schema; then the rows stay where they are.
                Err(_) => return,
            }
        }
        let mut next = vec![0u32; schemas.len()];
        for row in self.newest.values_mut().flatten() {
            let g = group[seen[&Arc::as_ptr(&row.rows)]];
            row.rows = merged[g].clone();
            row.index = next[g];
            next[g] += 1;
        }
        self.pinned = kept;
    }

    /// The newest rows of each key, oldest first, each cell formatted as text (nulls empty).
    pub fn newest_rows(&self) -> BTreeMap<&str, Vec<Vec<String>>> {
        let options = FormatOptions::default().with_null("");
        let mut formatters: HashMap<*const RecordBatch, Option<Vec<ArrayFormatter>>> =
            HashMap::new();
        let mut out = BTreeMap::new();
        for (key, rows) in &self.newest {
            let mut shown = Vec::with_capacity(rows.len());
            for row in rows {
                let columns = formatters.entry(Arc::as_ptr(&row.rows)).or_insert_with(|| {
                    row.rows
                        .columns()
                        .iter()
                        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
                        .collect::<Result<_, _>>()
                        .ok()
                });
                // A column arrow cannot show: the row is left out, as it always was.
                if let Some(columns) = columns {
                    let index = row.index as usize;
                    shown.push(columns.iter().map(|f| f.value(index).to_string()).collect());
                }
            }
            out.insert(key.as_str(), shown);
        }
        out
    }

    fn count_refusals(&mut self, batch: &RecordBatch) {
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_string_opt::<i32>())
        };
        let (Some(stages), Some(reasons)) = (column("stage"), column("reason")) else {
            return;
        };
        let (topics, payloads) = (column("topic"), column("payload"));
        let partitions = batch
            .column_by_name("partition")
            .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int32Type>());
        let offsets = batch
            .column_by_name("offset")
            .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int64Type>());
        for row in batch.num_rows().saturating_sub(DEAD_NEWEST)..batch.num_rows() {
            let place = match (topics, partitions, offsets) {
                (Some(t), Some(p), Some(o)) => {
                    format!("{}/{}@{}", t.value(row), p.value(row), o.value(row))
                }
                _ => String::new(),
            };
            let payload: String = payloads
                .map(|p| p.value(row).chars().take(300).collect())
                .unwrap_or_default();
            self.dead_newest.push_back([
                stages.value(row).to_string(),
                reasons.value(row).to_string(),
                place,
                payload,
            ]);
            if self.dead_newest.len() > DEAD_NEWEST {
                self.dead_newest.pop_front();
            }
        }
        for row in 0..batch.num_rows() {
            let class = reason_class(reasons.value(row));
            *self
                .refused
                .entry((stages.value(row).to_string(), class))
                .or_default() += 1;
        }
    }

    /// Adds `other` (counted later) to this tally.
    pub(crate) fn add(&mut self, other: TableTally) {
        self.rows += other.rows;
        if other.key.is_some() {
            self.key = other.key;
            self.columns = other.columns;
        }
        for (k, n) in other.per_key {
            let slot = if self.per_key.contains_key(&k) || self.per_key.len() < MAX_KEYS {
                k
            } else {
                OTHER_KEYS.to_string()
            };
            *self.per_key.entry(slot).or_default() += n;
        }
        for (k, rows) in other.newest {
            // Rows of keys counted under OTHER_KEYS are not kept.
            if !self.per_key.contains_key(&k) {
                continue;
            }
            let cap = self.cap(&k);
            let kept = self.newest.entry(k).or_default();
            kept.extend(rows);
            while kept.len() > cap {
                kept.pop_front();
            }
        }
        self.pinned += other.pinned;
        self.compact();
        for (k, n) in other.refused {
            *self.refused.entry(k).or_default() += n;
        }
        self.dead_newest.extend(other.dead_newest);
        while self.dead_newest.len() > DEAD_NEWEST {
            self.dead_newest.pop_front();
        }
    }
}

/// A reason's class: its text up to the first `:` (`price`, `late`, `invalid JSON`), cut before
/// the first digit so that values (`event time 2025-11-12T…`) never make classes of their own.
fn reason_class(reason: &str) -> String {
    let head = reason.split(':').next().unwrap_or(reason);
    let head = head
        .split(|c: char| c.is_ascii_digit())
        .next()
        .unwrap_or(head);
    let class: String = head.trim().chars().take(40).collect();
    if class.is_empty() {
        "other".into()
    } else {
        class
    }
}

/// Adds the tallies of `more` into `tables`, matching tables by name (the two halves of a
/// repartitioned run share the dead letter).
pub(crate) fn merge(tables: &mut Vec<TableTally>, more: Vec<TableTally>) {
    for t in more {
        match tables.iter_mut().find(|have| have.name == t.name) {
            Some(have) => have.add(t),
            None => tables.push(t),
        }
    }
}

/// The tables part of the end-of-run summary: rows per table, the dead letter by stage and
/// reason, rows per key of the chain's output, and its newest rows for one key.
pub fn render(tables: &[TableTally]) -> String {
    let mut out = String::new();
    let shown: Vec<&TableTally> = tables.iter().filter(|t| !t.hidden).collect();
    if shown.is_empty() {
        return out;
    }
    let width = shown.iter().map(|t| t.name.len()).max().unwrap_or(0);
    let _ = writeln!(out, "rows committed by this run:");
    for t in &shown {
        let _ = writeln!(out, "  {:width$}  {:>10}", t.name, group(t.rows));
    }
    for t in shown
        .iter()
        .filter(|t| t.dead_letter && !t.refused.is_empty())
    {
        let _ = writeln!(out, "{} by stage and reason:", t.name);
        let width = t
            .refused
            .keys()
            .map(|(s, r)| s.len() + r.len() + 3)
            .max()
            .unwrap_or(0);
        for ((stage, reason), n) in &t.refused {
            let label = format!("{stage} / {reason}");
            let _ = writeln!(out, "  {label:width$}  {:>10}", group(*n));
        }
    }
    for t in shown.iter().filter(|t| !t.per_key.is_empty()) {
        let key = t.key.as_deref().unwrap_or("key");
        let mut per_key: Vec<String> = t
            .per_key
            .iter()
            .take(16)
            .map(|(k, n)| format!("{k} {}", group(*n)))
            .collect();
        if t.per_key.len() > 16 {
            per_key.push(format!("… {} more", t.per_key.len() - 16));
        }
        let _ = writeln!(out, "{} per {key}: {}", t.name, per_key.join(", "));
        // The newest rows of the key with the most rows (the first of those, by name).
        let newest = t.newest_rows();
        let Some((value, rows)) = newest
            .iter()
            .max_by(|a, b| {
                let count = |k: &str| t.per_key.get(k).copied().unwrap_or(0);
                count(a.0).cmp(&count(b.0)).then(b.0.cmp(a.0))
            })
            .filter(|(_, rows)| !rows.is_empty())
        else {
            continue;
        };
        let _ = writeln!(out, "newest {} of {key} {value}:", t.name);
        // The key itself is in the heading, and a `date` partition column repeats the time.
        let keep: Vec<usize> = (0..t.columns.len())
            .filter(|&c| Some(t.columns[c].as_str()) != t.key.as_deref() && t.columns[c] != "date")
            .collect();
        let cells: Vec<Vec<String>> =
            std::iter::once(keep.iter().map(|&c| t.columns[c].clone()).collect())
                .chain(
                    rows.iter()
                        .skip(rows.len().saturating_sub(NEWEST))
                        .map(|r| {
                            keep.iter()
                                .map(|&c| short(r.get(c).map(String::as_str).unwrap_or("")))
                                .collect()
                        }),
                )
                .collect();
        let widths: Vec<usize> = (0..keep.len())
            .map(|c| {
                cells
                    .iter()
                    .map(|r| r[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &cells {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:>w$}"))
                .collect();
            let _ = writeln!(out, "  {}", line.join("  "));
        }
    }
    out
}

/// A cell made short for a terminal: timestamps to the second, floats to six significant
/// digits.
fn short(cell: &str) -> String {
    if let Some((date, time)) = cell.split_once('T')
        && date.len() == 10
    {
        let time: String = time.chars().take(8).collect();
        return format!("{date} {time}");
    }
    if cell.contains('.')
        && let Ok(v) = cell.parse::<f64>()
    {
        let text = format!("{v:.6}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        return match text.split_once('.') {
            Some((whole, frac)) if whole.len() + frac.len() > 8 => {
                let keep = 8usize.saturating_sub(whole.len()).max(2);
                format!("{whole}.{}", &frac[..frac.len().min(keep)])
            }
            _ => text.to_string(),
        };
    }
    cell.to_string()
}

/// `1234567` as `1,234,567`.
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, Int32Array, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    fn bars(rows: &[(&str, f64)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("symbol", DataType::Utf8, false),
            Field::new("close", DataType::Float64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    #[test]
    fn counts_rows_per_key_and_keeps_the_newest_of_each() {
        let mut t = TableTally::new("bars", TallyKind::Keyed);
        let many: Vec<(&str, f64)> = (0..20).map(|i| ("AAPL", i as f64 + 0.5)).collect();
        t.count(&bars(&many), TallyKind::Keyed);
        let mut later = TableTally::new("bars", TallyKind::Keyed);
        later.count(&bars(&[("MSFT", 1.25), ("AAPL", 99.5)]), TallyKind::Keyed);
        t.add(later);
        assert_eq!(t.rows, 22);
        assert_eq!(t.per_key["AAPL"], 21);
        assert_eq!(t.per_key["MSFT"], 1);
        let newest = &t.newest_rows()["AAPL"];
        assert_eq!(
            newest.len(),
            21,
            "a charted key keeps up to {CHART_ROWS} rows"
        );
        assert_eq!(
            newest.last().unwrap(),
            &vec!["AAPL".to_string(), "99.5".into()]
        );
        assert_eq!(newest.first().unwrap()[1], "0.5");
        let text = render(&[t]);
        assert!(text.contains("bars per symbol: AAPL 21, MSFT 1"), "{text}");
        assert!(text.contains("newest bars of symbol AAPL:"), "{text}");
        let shown: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("newest"))
            .skip(2)
            .collect();
        assert_eq!(shown.len(), NEWEST, "{text}");
        assert_eq!(shown.first().unwrap().trim(), "13.5", "{text}");
        assert_eq!(shown.last().unwrap().trim(), "99.5", "{text}");
    }

    /// Rows of the distinct batches the kept rows point into.
    fn pinned_rows(t: &TableTally) -> usize {
        let mut seen = std::collections::HashSet::new();
        t.newest
            .values()
            .flatten()
            .filter(|r| seen.insert(Arc::as_ptr(&r.rows)))
            .map(|r| r.rows.num_rows())
            .sum()
    }

    #[test]
    fn kept_rows_stay_as_counted_and_pin_few_batches_across_a_schema_change() {
        // Each batch: 5 rows of each of 10 common keys, and one key seen only there (which
        // would pin the whole batch); from batch 200 on the output has another column.
        let mut t = TableTally::new("bars", TallyKind::Keyed);
        let mut expected: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
        for b in 0..400u32 {
            let wide = b >= 200;
            let mut keys: Vec<String> = Vec::new();
            let mut close: Vec<f64> = Vec::new();
            for i in 0..50u32 {
                keys.push(format!("C{}", i % 10));
                close.push(f64::from(b * 100 + i) + 0.5);
            }
            keys.push(format!("R{b:04}"));
            close.push(f64::from(b) + 0.25);
            let mut fields = vec![
                Field::new("symbol", DataType::Utf8, false),
                Field::new("close", DataType::Float64, false),
            ];
            let mut columns: Vec<Arc<dyn Array>> = vec![
                Arc::new(StringArray::from(keys.clone())),
                Arc::new(Float64Array::from(close.clone())),
            ];
            if wide {
                fields.push(Field::new("n", DataType::Int64, false));
                columns.push(Arc::new(Int64Array::from(vec![i64::from(b); keys.len()])));
            }
            let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
            t.count(&batch, TallyKind::Keyed);
            for (k, c) in keys.iter().zip(&close) {
                let mut row = vec![k.clone(), c.to_string()];
                if wide {
                    row.push(b.to_string());
                }
                let rows = expected.entry(k.clone()).or_default();
                rows.push(row);
            }
            let kept: usize = t.newest.values().map(VecDeque::len).sum();
            assert!(
                pinned_rows(&t) <= 4 * kept + 4096 + batch.num_rows(),
                "batch {b}: {} rows pinned for {kept} kept",
                pinned_rows(&t)
            );
        }
        assert!(
            pinned_rows(&t) < 400 * 51 / 2,
            "compaction ran: {} rows pinned",
            pinned_rows(&t)
        );
        let shown = t.newest_rows();
        assert_eq!(shown.len(), 410);
        for (key, rows) in &shown {
            let all = &expected[*key];
            assert_eq!(
                rows[..],
                all[all.len() - rows.len()..],
                "the newest rows of {key}"
            );
            let cap = if t.charted.contains(*key) {
                CHART_ROWS
            } else {
                NEWEST
            };
            assert_eq!(rows.len(), all.len().min(cap), "rows kept of {key}");
        }
        // Rows from before and after the change, each with its own columns.
        assert_eq!(
            shown["R0000"],
            vec![vec!["R0000".to_string(), "0.25".into()]]
        );
        assert_eq!(
            shown["R0399"],
            vec![vec!["R0399".to_string(), "399.25".into(), "399".into()]]
        );
    }

    #[test]
    fn kept_rows_do_not_hold_the_batch_they_came_from_in_view_or_dictionary_columns() {
        // 10,000 rows of one key, each with 100 bytes of text as a view and as a dictionary.
        let n = 10_000;
        let long: Vec<String> = (0..n).map(|i| format!("{i:0>100}")).collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("symbol", DataType::Utf8, false),
            Field::new("view", DataType::Utf8View, false),
            Field::new(
                "dictionary",
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                false,
            ),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["AAPL"; n])),
                Arc::new(arrow::array::StringViewArray::from_iter_values(&long)),
                Arc::new(
                    long.iter()
                        .map(String::as_str)
                        .collect::<arrow::array::DictionaryArray<arrow::datatypes::Int32Type>>(),
                ),
            ],
        )
        .unwrap();
        assert!(batch.get_array_memory_size() > 2 * n * 100);
        let mut t = TableTally::new("bars", TallyKind::Keyed);
        t.count(&batch, TallyKind::Keyed);
        let held: usize = t.newest["AAPL"]
            .iter()
            .map(|r| Arc::as_ptr(&r.rows))
            .collect::<std::collections::HashSet<_>>()
            .into_iter()
            .map(|b| kept_batch_size(&t, b))
            .sum();
        assert!(held < 64 * 1024, "{CHART_ROWS} kept rows hold {held} bytes");
        let shown = &t.newest_rows()["AAPL"];
        assert_eq!(shown.len(), CHART_ROWS);
        assert_eq!(shown.last().unwrap()[1], long[n - 1]);
        assert_eq!(shown.last().unwrap()[2], long[n - 1]);
    }

    /// The memory of the kept batch at `ptr`.
    fn kept_batch_size(t: &TableTally, ptr: *const RecordBatch) -> usize {
        t.newest
            .values()
            .flatten()
            .find(|r| Arc::as_ptr(&r.rows) == ptr)
            .map_or(0, |r| r.rows.get_array_memory_size())
    }

    #[test]
    fn keys_beyond_the_limit_count_together() {
        let names: Vec<String> = (0..MAX_KEYS + 5).map(|i| format!("S{i:05}")).collect();
        let rows: Vec<(&str, f64)> = names.iter().map(|n| (n.as_str(), 1.0)).collect();
        let mut t = TableTally::new("bars", TallyKind::Keyed);
        t.count(&bars(&rows), TallyKind::Keyed);
        assert_eq!(t.per_key.len(), MAX_KEYS + 1);
        assert_eq!(t.per_key[OTHER_KEYS], 5);
        assert_eq!(t.per_key.values().sum::<u64>(), t.rows);
        assert_eq!(t.newest_rows()["S00000"].len(), 1);
        assert_eq!(
            t.newest_rows().len(),
            MAX_KEYS,
            "the newest rows of every counted key"
        );
    }

    #[test]
    fn the_dead_letter_counts_by_stage_and_the_reason_before_its_colon() {
        let schema = crate::sink::dead_letter_schema();
        let n = 3;
        let text = |v: &[&str]| Arc::new(StringArray::from(v.to_vec())) as Arc<dyn Array>;
        let batch = RecordBatch::try_new(
            schema,
            vec![
                text(&["p"; 3]),
                text(&["validate", "validate", "decode"]),
                text(&[
                    "price: must be > 0, got -1",
                    "price: must be > 0, got -2",
                    "invalid JSON: EOF while parsing",
                ]),
                text(&["ticks"; 3]),
                Arc::new(Int32Array::from(vec![0; n])),
                Arc::new(Int64Array::from(vec![1, 2, 3])),
                text(&["{}"; 3]),
                Arc::new(
                    arrow::array::TimestampMicrosecondArray::from(vec![0; n]).with_timezone("UTC"),
                ),
            ],
        )
        .unwrap();
        let mut t = TableTally::new("dead_letter", TallyKind::DeadLetter);
        t.count(&batch, TallyKind::DeadLetter);
        assert_eq!(t.refused[&("validate".into(), "price".into())], 2);
        assert_eq!(t.refused[&("decode".into(), "invalid JSON".into())], 1);
        assert_eq!(t.dead_newest.len(), 3);
        assert_eq!(t.dead_newest[2][2], "ticks/0@3");
        let text = render(&[t]);
        assert!(text.contains("validate / price"), "{text}");
    }

    #[test]
    fn reason_classes_leave_values_out() {
        assert_eq!(reason_class("price: must be > 0, got -1"), "price");
        assert_eq!(
            reason_class("event time 2025-11-12T14:38:00Z is 2h ahead"),
            "event time"
        );
        assert_eq!(
            reason_class("late: event time 1 falls in closed windows"),
            "late"
        );
        assert_eq!(reason_class("42"), "other");
    }

    #[test]
    fn cells_are_short() {
        assert_eq!(short("2026-12-02T12:01:00.123456Z"), "2026-12-02 12:01:00");
        assert_eq!(short("101.23000000000001"), "101.23");
        assert_eq!(short("0.000123456789"), "0.000123");
        assert_eq!(short("AAPL"), "AAPL");
        assert_eq!(group(1234567), "1,234,567");
    }
}

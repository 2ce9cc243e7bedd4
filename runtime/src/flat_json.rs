//! The fast path of [`crate::decode`]: a JSON decoder specialised to a flat declared schema. It
//! reads each record's bytes once, straight into column buffers, and builds the batch's arrays
//! from those buffers; no tape, no per-value allocation.
//!
//! It takes only records of the usual shape: one JSON object whose declared fields hold a value
//! of their own type (or null where nullable), undeclared fields scalars, no duplicate keys, no
//! escapes in keys. Every other record is left to the general decoder (arrow's JSON reader),
//! which gives it the same value or the same refusal it always did: so for each record this path
//! takes it must produce exactly what the general decoder would, and a differential test
//! (`decode::tests`) holds it to that. A record it takes is UTF-8 throughout (outside strings it
//! takes only ASCII, and a string with other bytes is checked), which spares the usual records
//! the general decoder's UTF-8 check.
//!
//! What it takes, per declared type (anything else in a declared field: left to the general
//! decoder):
//!
//! - `utf8`: a string; the escapes `\" \\ \/ \b \f \n \r \t` (a `\u` escape is left);
//! - `int64`: an integer literal that fits;
//! - `float64`: a JSON number, parsed as arrow does (correctly rounded);
//! - `bool`: `true`, `false`;
//! - `timestamp`: a string arrow's timestamp parser takes (RFC 3339 and its variants), or an
//!   integer of epoch milliseconds under 10^14 in magnitude (a larger one is left to the general
//!   decoder, which reads it as microseconds).

use std::sync::Arc;

use arrow::array::timezone::Tz;
use arrow::array::{
    ArrayRef, BooleanArray, BooleanBufferBuilder, Float64Array, Int64Array, NullBufferBuilder,
    PrimitiveArray, RecordBatch, StringArray,
};
use arrow::buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit, TimestampMicrosecondType};

/// Numbers below this magnitude in a timestamp field are epoch milliseconds (10^14 ms is the
/// year 5138); larger ones are microseconds (this path leaves them to the general decoder).
pub(crate) const MILLIS_BELOW: i64 = 100_000_000_000_000;

/// A flat schema's decoder, or `None` when the schema has a type this path does not write.
#[derive(Debug, Clone)]
pub(crate) struct FlatDecoder {
    schema: SchemaRef,
    fields: Vec<FieldPlan>,
}

#[derive(Debug, Clone)]
struct FieldPlan {
    name: Box<[u8]>,
    /// The name has no byte that a JSON string must escape or that needs a UTF-8 check: a key
    /// can be matched by comparing bytes, without scanning it first.
    plain: bool,
    /// A plain name of up to 14 bytes, to match with its quote and colon in two word
    /// comparisons.
    words: Option<KeyWords>,
    kind: Kind,
    nullable: bool,
}

#[derive(Debug, Clone)]
enum Kind {
    Utf8,
    Int64,
    Float64,
    Bool,
    /// Microseconds, with the field's time zone for strings without an offset.
    Timestamp(Tz),
}

/// A key, its closing quote and the colon after it, `name":`, as two little-endian words under
/// masks: matched against a record's next 16 bytes with two comparisons instead of a call to
/// `memcmp` and three more to read the quote, spaces and colon.
#[derive(Debug, Clone, Copy)]
struct KeyWords {
    words: [u64; 2],
    masks: [u64; 2],
}

impl KeyWords {
    /// For a name of up to 14 bytes.
    fn new(name: &[u8]) -> Option<Self> {
        if name.len() > 14 {
            return None;
        }
        let (mut bytes, mut mask) = ([0u8; 16], [0u8; 16]);
        bytes[..name.len()].copy_from_slice(name);
        bytes[name.len()..name.len() + 2].copy_from_slice(b"\":");
        mask[..name.len() + 2].fill(0xff);
        let word = |b: &[u8; 16], half: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[half * 8..half * 8 + 8]);
            u64::from_le_bytes(w)
        };
        Some(KeyWords {
            words: [word(&bytes, 0), word(&bytes, 1)],
            masks: [word(&mask, 0), word(&mask, 1)],
        })
    }

    /// Whether `head` begins with the name, its quote and a colon.
    fn matches(&self, head: &[u8; 16]) -> bool {
        let (low, high) = head.split_at(8);
        let word = |b: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            u64::from_le_bytes(w)
        };
        ((word(low) ^ self.words[0]) & self.masks[0])
            | ((word(high) ^ self.words[1]) & self.masks[1])
            == 0
    }
}

/// What the fast path made of a slice of records.
pub(crate) struct FlatBatch {
    /// The records it took, in order.
    pub batch: RecordBatch,
    /// Indices (ascending) of the records it left to the general decoder.
    pub left: Vec<usize>,
}

/// Where a string's contents are in the record.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    /// It holds escapes (to resolve when it is copied).
    escaped: bool,
    /// Every byte is ASCII (else it is checked as UTF-8 before it is kept).
    ascii: bool,
}

/// The bytes that end a run of plain string bytes: `"`, `\`, control characters, non-ASCII.
static STRING_STOP: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = b < 0x20 || b == b'"' as usize || b == b'\\' as usize || b >= 0x80;
        b += 1;
    }
    table
};

impl FlatDecoder {
    /// A decoder for `schema`, if every field is one of the types this path writes.
    pub(crate) fn new(schema: &SchemaRef) -> Option<Self> {
        let fields = schema
            .fields()
            .iter()
            .map(|f| {
                let kind = match f.data_type() {
                    DataType::Utf8 => Kind::Utf8,
                    DataType::Int64 => Kind::Int64,
                    DataType::Float64 => Kind::Float64,
                    DataType::Boolean => Kind::Bool,
                    DataType::Timestamp(TimeUnit::Microsecond, Some(tz)) => {
                        Kind::Timestamp(tz.parse().ok()?)
                    }
                    _ => return None,
                };
                let plain = !f.name().bytes().any(|b| STRING_STOP[usize::from(b)]);
                Some(FieldPlan {
                    name: f.name().as_bytes().into(),
                    plain,
                    words: plain.then(|| KeyWords::new(f.name().as_bytes())).flatten(),
                    kind,
                    nullable: f.is_nullable(),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(FlatDecoder {
            schema: schema.clone(),
            fields,
        })
    }

    /// Decodes the records this path takes and names the rest.
    pub(crate) fn decode(&self, records: &[&[u8]]) -> FlatBatch {
        let mut columns: Vec<Column> = self
            .fields
            .iter()
            .map(|f| Column::new(&f.kind, records.len()))
            .collect();
        let mut row = Row {
            seen: vec![0; self.fields.len()],
            stamp: 0,
        };
        // Producers write keys in one order: the field found at each key position of the last
        // record is tried first.
        let mut hints: Vec<usize> = Vec::new();
        let mut left = Vec::new();
        let mut hour = HourMemo::default();
        let mut rows = 0;
        for (index, record) in records.iter().enumerate() {
            row.stamp += 1;
            if self
                .read(record, &mut columns, &mut row, &mut hints, &mut hour)
                .is_some()
            {
                rows += 1;
            } else {
                // What the record appended before it was refused goes.
                for column in &mut columns {
                    column.truncate(rows);
                }
                left.push(index);
            }
        }
        let arrays: Vec<ArrayRef> = columns
            .into_iter()
            .zip(self.schema.fields())
            .map(|(c, f)| c.finish(f.data_type()))
            .collect();
        let batch = match RecordBatch::try_new(self.schema.clone(), arrays) {
            Ok(batch) => batch,
            // Cannot happen (the columns are built to the schema); should it, everything goes
            // the general way.
            Err(_) => {
                return FlatBatch {
                    batch: RecordBatch::new_empty(self.schema.clone()),
                    left: (0..records.len()).collect(),
                };
            }
        };
        FlatBatch { batch, left }
    }

    /// Reads one record, appending its values to `columns` as it goes: one value to each column
    /// when it returns `Some`. `None` leaves the record to the general decoder (the caller then
    /// truncates what it appended).
    fn read(
        &self,
        record: &[u8],
        columns: &mut [Column],
        row: &mut Row,
        hints: &mut Vec<usize>,
        hour: &mut HourMemo,
    ) -> Option<()> {
        let mut c = Cursor {
            b: record,
            i: 0,
            number_start: 0,
        };
        c.ws();
        c.eat(b'{')?;
        c.ws();
        if c.peek() == Some(b'}') {
            c.i += 1;
        } else {
            let mut position = 0;
            loop {
                c.eat(b'"')?;
                let field = match self.expected_key(&mut c, position, hints) {
                    Some(f) => Some(f),
                    None => {
                        let span = c.string()?;
                        if span.escaped {
                            return None;
                        }
                        let key = &record[span.start..span.end];
                        if !span.ascii && std::str::from_utf8(key).is_err() {
                            return None;
                        }
                        c.ws();
                        c.eat(b':')?;
                        self.field(key, position, hints)
                    }
                };
                c.ws();
                match field {
                    Some(f) => {
                        if row.seen[f] == row.stamp {
                            return None; // a duplicate key
                        }
                        row.seen[f] = row.stamp;
                        self.value(&mut c, &self.fields[f], &mut columns[f], hour)?;
                    }
                    None => c.skip_scalar()?,
                }
                position += 1;
                let mut after = c.next()?;
                if matches!(after, b' ' | b'\n' | b'\r' | b'\t') {
                    c.ws();
                    after = c.next()?;
                }
                match after {
                    b',' => c.ws(),
                    b'}' => break,
                    _ => return None,
                }
            }
        }
        c.ws();
        if c.i != record.len() {
            return None;
        }
        for ((field, column), &seen) in self.fields.iter().zip(columns).zip(&row.seen) {
            if seen != row.stamp {
                if !field.nullable {
                    return None;
                }
                column.push_null();
            }
        }
        Some(())
    }

    /// The field the last record had at key `position`, if this record's key (the cursor just
    /// after its opening quote) is that name: matched by comparing bytes, the cursor then after
    /// the colon that follows the key. Most records have their keys in one order.
    fn expected_key(&self, c: &mut Cursor<'_>, position: usize, hints: &[usize]) -> Option<usize> {
        let hint = *hints.get(position)?;
        let field = self.fields.get(hint)?;
        let rest = c.b.get(c.i..)?;
        if let (Some(words), Some(head)) = (&field.words, rest.first_chunk::<16>())
            && words.matches(head)
        {
            c.i += field.name.len() + 2;
            return Some(hint);
        }
        // A longer name, the record's last bytes, or space before the colon.
        if field.plain && rest.starts_with(&field.name) && rest.get(field.name.len()) == Some(&b'"')
        {
            let mut after = Cursor {
                b: c.b,
                i: c.i + field.name.len() + 1,
                number_start: 0,
            };
            after.ws();
            if after.eat(b':').is_some() {
                c.i = after.i;
                return Some(hint);
            }
        }
        None
    }

    /// The declared field named `key`, the key at `position` of the record.
    fn field(&self, key: &[u8], position: usize, hints: &mut Vec<usize>) -> Option<usize> {
        if let Some(&hint) = hints.get(position)
            && let Some(field) = self.fields.get(hint)
            && *field.name == *key
        {
            return Some(hint);
        }
        let found = self.fields.iter().position(|f| *f.name == *key)?;
        if position < 64 {
            if hints.len() <= position {
                hints.resize(position + 1, usize::MAX);
            }
            hints[position] = found;
        }
        Some(found)
    }

    /// Reads a declared field's value and appends it to its column.
    fn value(
        &self,
        c: &mut Cursor<'_>,
        field: &FieldPlan,
        column: &mut Column,
        hour: &mut HourMemo,
    ) -> Option<()> {
        if c.peek()? == b'n' {
            c.literal(b"null")?;
            if !field.nullable {
                return None;
            }
            column.push_null();
            return Some(());
        }
        match (&field.kind, column) {
            (
                Kind::Utf8,
                Column::Utf8 {
                    offsets,
                    data,
                    nulls,
                },
            ) => {
                c.eat(b'"')?;
                let span = c.string()?;
                let bytes = &c.b[span.start..span.end];
                if data.len() + bytes.len() > i32::MAX as usize
                    || !span.ascii && std::str::from_utf8(bytes).is_err()
                {
                    return None;
                }
                if span.escaped {
                    unescape(bytes, data)?;
                } else {
                    data.extend_from_slice(bytes);
                }
                // An unescaped string is no longer than its text: bounded by the check above.
                offsets.push(data.len() as i32);
                nulls.append_non_null();
            }
            (Kind::Int64, Column::Int { values, nulls }) => match c.number()? {
                Number::Int(v) => {
                    values.push(v);
                    nulls.append_non_null();
                }
                Number::Decimal { .. } | Number::Other => return None,
            },
            (Kind::Float64, Column::Float { values, nulls }) => {
                values.push(float(c)?);
                nulls.append_non_null();
            }
            (Kind::Bool, Column::Bool { values, nulls }) => {
                let v = match c.peek()? {
                    b't' => c.literal(b"true").map(|_| true)?,
                    b'f' => c.literal(b"false").map(|_| false)?,
                    _ => return None,
                };
                values.append(v);
                nulls.append_non_null();
            }
            (Kind::Timestamp(tz), Column::Int { values, nulls }) => {
                values.push(timestamp(c, tz, hour)?);
                nulls.append_non_null();
            }
            // `Column::new` makes each kind's column.
            _ => return None,
        }
        Some(())
    }
}

/// Which declared fields the record being read has had (to find duplicates and the absent).
struct Row {
    /// Per field, the `stamp` of the last record that had it.
    seen: Vec<u32>,
    /// The record being read, counted from 1.
    stamp: u32,
}

/// A JSON number as a float: a decimal whose digits make an integer under 2^53, with at most 15
/// after the point, is one exact division, which rounds correctly as a full parser would
/// (Clinger's fast path); any other number goes through the standard library's parser.
fn float(c: &mut Cursor<'_>) -> Option<f64> {
    const POW10: [f64; 16] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
    ];
    const EXACT: u64 = 1 << 53;
    match c.number()? {
        Number::Int(v) if v.unsigned_abs() < EXACT => {
            // `-0` keeps its sign.
            let negative = c.last_number().first() == Some(&b'-');
            return Some(if v == 0 && negative { -0.0 } else { v as f64 });
        }
        Number::Decimal {
            mantissa,
            scale,
            negative,
        } if mantissa < EXACT && scale < POW10.len() => {
            let v = mantissa as f64 / POW10[scale];
            return Some(if negative { -v } else { v });
        }
        _ => {}
    }
    // The number's bytes are ASCII digits, signs, `.` and `e`: valid UTF-8.
    let text = std::str::from_utf8(c.last_number()).ok()?;
    // Infinity (`1e400`) is left to the general decoder.
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// A timestamp field's value in microseconds: a string arrow's timestamp parser takes, or an
/// integer of epoch milliseconds under [`MILLIS_BELOW`] in magnitude.
fn timestamp(c: &mut Cursor<'_>, tz: &Tz, hour: &mut HourMemo) -> Option<i64> {
    if c.peek()? != b'"' {
        return match c.number()? {
            Number::Int(v) if v.unsigned_abs() < MILLIS_BELOW.unsigned_abs() => Some(v * 1000),
            _ => None,
        };
    }
    c.i += 1;
    let span = c.string()?;
    if span.escaped {
        return None;
    }
    let bytes = &c.b[span.start..span.end];
    if let Some(micros) = rfc3339_micros(bytes, hour) {
        return Some(micros);
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let micros = arrow::compute::kernels::cast_utils::string_to_datetime(tz, text)
        .ok()?
        .timestamp_micros();
    Some(micros)
}

/// A column being built.
enum Column {
    Utf8 {
        offsets: Vec<i32>,
        data: Vec<u8>,
        nulls: NullBufferBuilder,
    },
    Int {
        values: Vec<i64>,
        nulls: NullBufferBuilder,
    },
    Float {
        values: Vec<f64>,
        nulls: NullBufferBuilder,
    },
    Bool {
        values: BooleanBufferBuilder,
        nulls: NullBufferBuilder,
    },
}

impl Column {
    fn new(kind: &Kind, rows: usize) -> Self {
        let nulls = NullBufferBuilder::new(rows);
        match kind {
            Kind::Utf8 => {
                let mut offsets = Vec::with_capacity(rows + 1);
                offsets.push(0);
                Column::Utf8 {
                    offsets,
                    data: Vec::with_capacity(rows * 8),
                    nulls,
                }
            }
            Kind::Int64 | Kind::Timestamp(_) => Column::Int {
                values: Vec::with_capacity(rows),
                nulls,
            },
            Kind::Float64 => Column::Float {
                values: Vec::with_capacity(rows),
                nulls,
            },
            Kind::Bool => Column::Bool {
                values: BooleanBufferBuilder::new(rows),
                nulls,
            },
        }
    }

    fn push_null(&mut self) {
        match self {
            Column::Utf8 {
                offsets,
                data,
                nulls,
            } => {
                offsets.push(data.len() as i32);
                nulls.append_null();
            }
            Column::Int { values, nulls } => {
                values.push(0);
                nulls.append_null();
            }
            Column::Float { values, nulls } => {
                values.push(0.0);
                nulls.append_null();
            }
            Column::Bool { values, nulls } => {
                values.append(false);
                nulls.append_null();
            }
        }
    }

    /// Drops every value past the first `rows`.
    fn truncate(&mut self, rows: usize) {
        match self {
            Column::Utf8 {
                offsets,
                data,
                nulls,
            } => {
                offsets.truncate(rows + 1);
                data.truncate(offsets.last().map_or(0, |&end| end as usize));
                nulls.truncate(rows);
            }
            Column::Int { values, nulls } => {
                values.truncate(rows);
                nulls.truncate(rows);
            }
            Column::Float { values, nulls } => {
                values.truncate(rows);
                nulls.truncate(rows);
            }
            Column::Bool { values, nulls } => {
                values.truncate(rows);
                nulls.truncate(rows);
            }
        }
    }

    fn finish(self, data_type: &DataType) -> ArrayRef {
        match self {
            Column::Utf8 {
                offsets,
                data,
                mut nulls,
            } => {
                let offsets = OffsetBuffer::new(ScalarBuffer::from(offsets));
                match StringArray::try_new(offsets, Buffer::from_vec(data), only_nulls(&mut nulls))
                {
                    Ok(array) => Arc::new(array),
                    // Every string was checked as it was committed.
                    Err(_) => arrow::array::new_null_array(data_type, 0),
                }
            }
            Column::Int { values, mut nulls } => match data_type {
                DataType::Timestamp(..) => Arc::new(
                    PrimitiveArray::<TimestampMicrosecondType>::new(
                        ScalarBuffer::from(values),
                        only_nulls(&mut nulls),
                    )
                    .with_data_type(data_type.clone()),
                ),
                _ => Arc::new(Int64Array::new(
                    ScalarBuffer::from(values),
                    only_nulls(&mut nulls),
                )),
            },
            Column::Float { values, mut nulls } => Arc::new(Float64Array::new(
                ScalarBuffer::from(values),
                only_nulls(&mut nulls),
            )),
            Column::Bool {
                mut values,
                mut nulls,
            } => Arc::new(BooleanArray::new(values.finish(), only_nulls(&mut nulls))),
        }
    }
}

/// A column's null buffer, if it holds a null (a refused record's null, truncated away, can
/// leave one that holds none: the general decoder would have made no buffer).
fn only_nulls(nulls: &mut NullBufferBuilder) -> Option<arrow::buffer::NullBuffer> {
    nulls.finish().filter(|n| n.null_count() > 0)
}

/// What [`Cursor::number`] read.
enum Number {
    /// An integer literal that fits an `i64`.
    Int(i64),
    /// A number with a fraction and no exponent, `-?D+.D+`, of at most 19 digits: `mantissa` is
    /// its digits without the point, `scale` how many follow the point.
    Decimal {
        mantissa: u64,
        scale: usize,
        negative: bool,
    },
    /// Any other JSON number (an exponent, or too many digits): see [`Cursor::last_number`].
    Other,
}

/// A position in one record's bytes.
struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
    /// Where the last number read began.
    number_start: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.i += 1;
        Some(b)
    }

    fn eat(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    /// Skips JSON whitespace.
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.b.get(self.i..self.i + word.len())? == word {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }

    /// The contents of a string whose opening quote was read, the cursor after the closing
    /// quote. `None` for a control character, a `\u` escape or a string that does not end.
    fn string(&mut self) -> Option<Span> {
        let start = self.i;
        let (mut escaped, mut ascii) = (false, true);
        loop {
            // A run of plain bytes, eight at a time while eight are left, then what ended it.
            while let Some(chunk) = self.b.get(self.i..).and_then(|r| r.first_chunk::<8>()) {
                let plain = plain_run(u64::from_le_bytes(*chunk));
                self.i += plain;
                if plain < 8 {
                    break;
                }
            }
            let rest = self.b.get(self.i..)?;
            self.i += rest
                .iter()
                .position(|&b| STRING_STOP[usize::from(b)])
                .unwrap_or(rest.len());
            match *self.b.get(self.i)? {
                b'"' => {
                    let end = self.i;
                    self.i += 1;
                    return Some(Span {
                        start,
                        end,
                        escaped,
                        ascii,
                    });
                }
                b'\\' => {
                    match self.b.get(self.i + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                        _ => return None,
                    }
                    escaped = true;
                    self.i += 2;
                }
                0..=0x1f => return None,
                _ => {
                    ascii = false;
                    self.i += 1;
                }
            }
        }
    }

    /// A JSON number (strict grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`), its
    /// digits read as they are scanned.
    fn number(&mut self) -> Option<Number> {
        /// Digits a `u64` holds whatever they are.
        const U64_DIGITS: usize = 19;
        let start = self.i;
        self.number_start = start;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        let digits = self.i;
        // The digits (integer part, then fraction) as one integer, while they fit.
        let mut magnitude = 0u64;
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                while let Some(&d) = self.b.get(self.i)
                    && d.is_ascii_digit()
                {
                    if self.i - digits < U64_DIGITS {
                        magnitude = magnitude * 10 + u64::from(d - b'0');
                    }
                    self.i += 1;
                }
            }
            _ => return None,
        }
        let integer_end = self.i;
        let mut scale = 0;
        if self.peek() == Some(b'.') {
            self.i += 1;
            let first = self.i;
            let room = U64_DIGITS.saturating_sub(integer_end - digits);
            while let Some(&d) = self.b.get(self.i)
                && d.is_ascii_digit()
            {
                if self.i - first < room {
                    magnitude = magnitude * 10 + u64::from(d - b'0');
                }
                self.i += 1;
            }
            scale = self.i - first;
            if scale == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.digits()?;
            return Some(Number::Other);
        }
        let count = integer_end - digits + scale;
        if scale > 0 {
            return Some(if count <= U64_DIGITS {
                Number::Decimal {
                    mantissa: magnitude,
                    scale,
                    negative,
                }
            } else {
                Number::Other
            });
        }
        // Up to 18 digits fit an `i64` whatever they are; more are checked.
        if count <= 18 {
            // At most 10^18 - 1: fits.
            let magnitude = magnitude as i64;
            return Some(Number::Int(if negative { -magnitude } else { magnitude }));
        }
        let mut v: i64 = 0;
        for &d in &self.b[digits..integer_end] {
            let d = i64::from(d - b'0');
            v = match v.checked_mul(10).and_then(|v| {
                if negative {
                    v.checked_sub(d)
                } else {
                    v.checked_add(d)
                }
            }) {
                Some(v) => v,
                None => return Some(Number::Other),
            };
        }
        Some(Number::Int(v))
    }

    /// Skips ASCII digits.
    fn skip_digits(&mut self) {
        let rest = &self.b[self.i.min(self.b.len())..];
        self.i += rest
            .iter()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(rest.len());
    }

    /// The bytes of the number [`Cursor::number`] read last.
    fn last_number(&self) -> &'a [u8] {
        &self.b[self.number_start..self.i]
    }

    /// One or more ASCII digits.
    fn digits(&mut self) -> Option<()> {
        let start = self.i;
        self.skip_digits();
        (self.i > start).then_some(())
    }

    /// Skips an undeclared field's value: a string, number, `true`, `false` or `null` (an
    /// object or array is left to the general decoder).
    fn skip_scalar(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.i += 1;
                let span = self.string()?;
                // The general decoder refuses a record with text that is not UTF-8 anywhere.
                (span.ascii || std::str::from_utf8(&self.b[span.start..span.end]).is_ok())
                    .then_some(())
            }
            b'-' | b'0'..=b'9' => self.number().map(|_| ()),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => None,
        }
    }
}

/// Each byte of `0x01` repeated, and of `0x80`.
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// How many of the 8 bytes of `word` come before the first that ends a run of plain string
/// bytes ([`STRING_STOP`]: `"`, `\`, a control character, non-ASCII).
fn plain_run(word: u64) -> usize {
    // A zero byte in `x` sets the high bit of `(x - ONES) & !x`, and so does a byte under
    // 0x20 in `word - 0x20 * ONES`; a borrow only moves upward, from such a byte, so false
    // positives can only sit above a true one, and the lowest high bit marks the first.
    let zero = |x: u64| x.wrapping_sub(ONES) & !x;
    let stop = (zero(word ^ (u64::from(b'"') * ONES))
        | zero(word ^ (u64::from(b'\\') * ONES))
        | word.wrapping_sub(0x20 * ONES) & !word
        | word)
        & HIGHS;
    (stop.trailing_zeros() / 8) as usize
}

/// The text of a string's contents with its escapes (the subset [`Cursor::string`] takes)
/// resolved, appended to `out`.
fn unescape(bytes: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        out.push(match bytes.get(i + 1)? {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            _ => return None,
        });
        i += 2;
    }
    Some(())
}

/// The last date and hour [`rfc3339_micros`] read, as the bytes `YYYY-MM-DDTHH`, and their
/// seconds since the epoch: the records of a batch mostly share them, so each is parsed and
/// checked once.
#[derive(Default)]
struct HourMemo {
    head: Option<[u8; 13]>,
    seconds: i64,
}

/// Microseconds since the epoch of the common form `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`
/// (a fraction of 1 to 9 digits, cut to microseconds as arrow does), or `None` for anything
/// else, which arrow's parser then reads (other separators, no offset, a date alone, …).
fn rfc3339_micros(s: &[u8], memo: &mut HourMemo) -> Option<i64> {
    fn digits(s: &[u8], at: usize, n: usize) -> Option<i64> {
        let mut v = 0i64;
        for &b in s.get(at..at + n)? {
            if !b.is_ascii_digit() {
                return None;
            }
            v = v * 10 + i64::from(b - b'0');
        }
        Some(v)
    }
    if s.len() < 20 || s[13] != b':' || s[16] != b':' {
        return None;
    }
    let head: [u8; 13] = s[..13].try_into().ok()?;
    let hour_seconds = match memo.head {
        Some(last) if last == head => memo.seconds,
        _ => {
            let seconds = hour_seconds(&head)?;
            *memo = HourMemo {
                head: Some(head),
                seconds,
            };
            seconds
        }
    };
    let (minute, second) = (digits(s, 14, 2)?, digits(s, 17, 2)?);
    if minute > 59 || second > 59 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if s[i] == b'.' {
        i += 1;
        let start = i;
        while i < s.len() && s[i].is_ascii_digit() {
            i += 1;
        }
        let n = i - start;
        if n == 0 || n > 9 {
            return None;
        }
        for k in 0..6 {
            micros = micros * 10
                + if k < n {
                    i64::from(s[start + k] - b'0')
                } else {
                    0
                };
        }
    }
    let offset = match s.get(i)? {
        b'Z' if i + 1 == s.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == s.len() && s[i + 3] == b':' => {
            let (h, m) = (digits(s, i + 1, 2)?, digits(s, i + 4, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let seconds = h * 3600 + m * 60;
            if *sign == b'-' { -seconds } else { seconds }
        }
        _ => return None,
    };
    let seconds = hour_seconds + minute * 60 + second - offset;
    Some(seconds * 1_000_000 + micros)
}

/// Seconds since the epoch of the hour `YYYY-MM-DDTHH` (before any offset), if it is a valid
/// date and hour.
fn hour_seconds(head: &[u8; 13]) -> Option<i64> {
    fn digits(s: &[u8]) -> Option<i64> {
        let mut v = 0i64;
        for &b in s {
            if !b.is_ascii_digit() {
                return None;
            }
            v = v * 10 + i64::from(b - b'0');
        }
        Some(v)
    }
    if head[4] != b'-' || head[7] != b'-' || head[10] != b'T' {
        return None;
    }
    let (year, month, day) = (
        digits(&head[0..4])?,
        digits(&head[5..7])?,
        digits(&head[8..10])?,
    );
    let hour = digits(&head[11..13])?;
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month) || day < 1 || day > month_days[(month - 1) as usize] || hour > 23
    {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), March-based years.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(days * 86_400 + hour * 3600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_matches_by_words_only_when_every_byte_its_quote_and_colon_match() {
        for len in 0..=14usize {
            let name: Vec<u8> = (0..len).map(|i| b'a' + i as u8).collect();
            let words = KeyWords::new(&name).expect("up to 14 bytes");
            let mut record = name.clone();
            record.extend_from_slice(b"\":12345678901234567");
            let head = record.first_chunk::<16>().expect("16 bytes");
            assert!(words.matches(head), "{len} bytes");
            // One byte off anywhere in the name, its quote or colon: no match.
            for at in 0..len + 2 {
                let mut other = *head;
                other[at] ^= 0x20;
                assert!(!words.matches(&other), "{len} bytes, byte {at} changed");
            }
            // A longer key that starts with the name: no match (no quote where it ends).
            let mut longer = name.clone();
            longer.extend_from_slice(b"x\":1234567890123456");
            let head = longer.first_chunk::<16>().expect("16 bytes");
            assert!(!words.matches(head), "{len} bytes, a longer key");
        }
        // A space before the colon is for the slower match.
        let words = KeyWords::new(b"ts").expect("2 bytes");
        assert!(
            !words.matches(
                b"ts\" :12345678901234567"
                    .first_chunk::<16>()
                    .expect("16 bytes")
            )
        );
        assert!(KeyWords::new(b"fifteen_bytes_a").is_none());
    }

    /// Random words, weighted to the bytes that matter: the word-at-a-time scan of a string
    /// agrees with a byte-by-byte reading.
    #[test]
    fn the_word_scan_of_a_string_agrees_with_byte_by_byte_reading() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let interesting = [
            b'0', b'5', b'9', b'/', b':', b'"', b'\\', 0x1f, 0x20, 0x7f, 0x80, 0xff, 0,
        ];
        for _ in 0..200_000 {
            let mut bytes = [0u8; 8];
            for b in &mut bytes {
                *b = match next() % 4 {
                    0 => (next() % 256) as u8,
                    1 => interesting[(next() % interesting.len() as u64) as usize],
                    _ => b'0' + (next() % 10) as u8,
                };
            }
            let word = u64::from_le_bytes(bytes);
            let plain = bytes
                .iter()
                .take_while(|&&b| !STRING_STOP[usize::from(b)])
                .count();
            assert_eq!(plain_run(word), plain, "{bytes:?}");
        }
    }
}

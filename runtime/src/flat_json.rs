//! The fast path of [`crate::decode`]: a JSON decoder specialised to a flat declared schema. It
//! reads each record's bytes once, straight into column buffers, and builds the batch's arrays
//! from those buffers; no tape, no per-value allocation.
//!
//! It takes only records of the usual shape: one JSON object whose declared fields hold a value
//! of their own type (or null where nullable), undeclared fields scalars, no duplicate keys, no
//! escapes in keys. Every other record is left to the general decoder (arrow's JSON reader),
//! which gives it the same value or the same refusal it always did: so for each record this path
//! takes it must produce exactly what the general decoder would, and a differential test
//! (`decode::tests`) holds it to that.
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

/// What the fast path made of a slice of records.
pub(crate) struct FlatBatch {
    /// The records it took, in order.
    pub batch: RecordBatch,
    /// Indices (ascending) of the records it left to the general decoder.
    pub left: Vec<usize>,
}

/// One declared field's value in the record being read, before it is committed to the columns.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Absent,
    Null,
    /// A string's contents in the record.
    Str(Span),
    Int(i64),
    Float(f64),
    Bool(bool),
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
                Some(FieldPlan {
                    name: f.name().as_bytes().into(),
                    plain: !f.name().bytes().any(|b| STRING_STOP[usize::from(b)]),
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
        let mut slots = vec![Slot::Absent; self.fields.len()];
        // Producers write keys in one order: the field found at each key position of the last
        // record is tried first.
        let mut hints: Vec<usize> = Vec::new();
        let mut left = Vec::new();
        let mut scratch = Vec::new();
        for (index, record) in records.iter().enumerate() {
            if self.read(record, &mut slots, &mut hints).is_none()
                || !self.commit(record, &slots, &mut columns, &mut scratch)
            {
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

    /// Reads one record into `slots`; `None` leaves it to the general decoder.
    fn read(&self, record: &[u8], slots: &mut [Slot], hints: &mut Vec<usize>) -> Option<()> {
        slots.fill(Slot::Absent);
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
                        self.field(key, position, hints)
                    }
                };
                c.ws();
                c.eat(b':')?;
                c.ws();
                match field {
                    Some(f) => {
                        if !matches!(slots[f], Slot::Absent) {
                            return None; // a duplicate key
                        }
                        slots[f] = self.value(&mut c, &self.fields[f].kind)?;
                    }
                    None => c.skip_scalar()?,
                }
                position += 1;
                c.ws();
                match c.next()? {
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
        for (slot, field) in slots.iter().zip(&self.fields) {
            if !field.nullable && matches!(slot, Slot::Absent | Slot::Null) {
                return None;
            }
        }
        Some(())
    }

    /// The field the last record had at key `position`, if this record's key (the cursor just
    /// after its opening quote) is that name: matched by comparing bytes, the cursor then after
    /// the closing quote. Most records have their keys in one order.
    fn expected_key(&self, c: &mut Cursor<'_>, position: usize, hints: &[usize]) -> Option<usize> {
        let hint = *hints.get(position)?;
        let field = self.fields.get(hint)?;
        let rest = c.b.get(c.i..)?;
        if field.plain && rest.starts_with(&field.name) && rest.get(field.name.len()) == Some(&b'"')
        {
            c.i += field.name.len() + 1;
            Some(hint)
        } else {
            None
        }
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

    fn value(&self, c: &mut Cursor<'_>, kind: &Kind) -> Option<Slot> {
        if c.peek()? == b'n' {
            c.literal(b"null")?;
            return Some(Slot::Null);
        }
        match kind {
            Kind::Utf8 => {
                c.eat(b'"')?;
                c.string().map(Slot::Str)
            }
            Kind::Int64 => match c.number()? {
                Number::Int(v) => Some(Slot::Int(v)),
                Number::Other => None,
            },
            Kind::Float64 => {
                // Integers under 2^53 are short decimals too (and `-0` keeps its sign there).
                c.number()?;
                if let Some(v) = c.short_decimal() {
                    return Some(Slot::Float(v));
                }
                // The number's bytes are ASCII digits, signs, `.` and `e`: valid UTF-8.
                let text = std::str::from_utf8(c.last_number()).ok()?;
                // Infinity (`1e400`) is left to the general decoder.
                text.parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .map(Slot::Float)
            }
            Kind::Bool => match c.peek()? {
                b't' => c.literal(b"true").map(|_| Slot::Bool(true)),
                b'f' => c.literal(b"false").map(|_| Slot::Bool(false)),
                _ => None,
            },
            Kind::Timestamp(tz) => match c.peek()? {
                b'"' => {
                    c.i += 1;
                    let span = c.string()?;
                    if span.escaped {
                        return None;
                    }
                    let bytes = &c.b[span.start..span.end];
                    if let Some(micros) = rfc3339_micros(bytes) {
                        return Some(Slot::Int(micros));
                    }
                    let text = std::str::from_utf8(bytes).ok()?;
                    let micros = arrow::compute::kernels::cast_utils::string_to_datetime(tz, text)
                        .ok()?
                        .timestamp_micros();
                    Some(Slot::Int(micros))
                }
                _ => match c.number()? {
                    Number::Int(v) if v.unsigned_abs() < MILLIS_BELOW.unsigned_abs() => {
                        Some(Slot::Int(v * 1000))
                    }
                    _ => None,
                },
            },
        }
    }

    /// Appends the record read into `slots` to the columns; `false` (nothing appended) if a
    /// string column would overflow its 32-bit offsets or a string is not UTF-8.
    fn commit(
        &self,
        record: &[u8],
        slots: &[Slot],
        columns: &mut [Column],
        scratch: &mut Vec<u8>,
    ) -> bool {
        // Strings first: the only values that can still refuse the record.
        for (column, slot) in columns.iter().zip(slots) {
            if let (Column::Utf8 { data, .. }, Slot::Str(span)) = (column, slot)
                && (data.len() + (span.end - span.start) > i32::MAX as usize
                    || !span.ascii && std::str::from_utf8(&record[span.start..span.end]).is_err())
            {
                return false;
            }
        }
        for (column, slot) in columns.iter_mut().zip(slots) {
            match (column, *slot) {
                (column, Slot::Absent | Slot::Null) => column.push_null(),
                (
                    Column::Utf8 {
                        offsets,
                        data,
                        nulls,
                    },
                    Slot::Str(span),
                ) => {
                    let bytes = &record[span.start..span.end];
                    if span.escaped {
                        scratch.clear();
                        // Checked above.
                        let _ = unescape(bytes, scratch);
                        data.extend_from_slice(scratch);
                    } else {
                        data.extend_from_slice(bytes);
                    }
                    // Bounded by the check above.
                    offsets.push(data.len() as i32);
                    nulls.append_non_null();
                }
                (Column::Int { values, nulls }, Slot::Int(v)) => {
                    values.push(v);
                    nulls.append_non_null();
                }
                (Column::Float { values, nulls }, Slot::Float(v)) => {
                    values.push(v);
                    nulls.append_non_null();
                }
                (Column::Bool { values, nulls }, Slot::Bool(v)) => {
                    values.append(v);
                    nulls.append_non_null();
                }
                // `value` only fills a slot with its kind's variant.
                (column, _) => column.push_null(),
            }
        }
        true
    }
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

    fn finish(self, data_type: &DataType) -> ArrayRef {
        match self {
            Column::Utf8 {
                offsets,
                data,
                mut nulls,
            } => {
                let offsets = OffsetBuffer::new(ScalarBuffer::from(offsets));
                match StringArray::try_new(offsets, Buffer::from_vec(data), nulls.finish()) {
                    Ok(array) => Arc::new(array),
                    // Every string was checked as it was committed.
                    Err(_) => arrow::array::new_null_array(data_type, 0),
                }
            }
            Column::Int { values, mut nulls } => match data_type {
                DataType::Timestamp(..) => Arc::new(
                    PrimitiveArray::<TimestampMicrosecondType>::new(
                        ScalarBuffer::from(values),
                        nulls.finish(),
                    )
                    .with_data_type(data_type.clone()),
                ),
                _ => Arc::new(Int64Array::new(ScalarBuffer::from(values), nulls.finish())),
            },
            Column::Float { values, mut nulls } => Arc::new(Float64Array::new(
                ScalarBuffer::from(values),
                nulls.finish(),
            )),
            Column::Bool {
                mut values,
                mut nulls,
            } => Arc::new(BooleanArray::new(values.finish(), nulls.finish())),
        }
    }
}

/// What [`Cursor::number`] read.
enum Number {
    /// An integer literal that fits an `i64`.
    Int(i64),
    /// Any other JSON number (fraction, exponent, or too large): see [`Cursor::last_number`].
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
            // A run of plain bytes, then what ended it.
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

    /// The number [`Cursor::number`] read last as a float, if it is a plain decimal
    /// (`-?D+(.D+)?`, no exponent) whose digits make an integer under 2^53 with at most 15 after
    /// the point: the mantissa and 10^k are then exact doubles, and one division rounds
    /// correctly, as a full parser would (Clinger's fast path).
    fn short_decimal(&self) -> Option<f64> {
        const POW10: [f64; 16] = [
            1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
        ];
        let text = self.last_number();
        let (negative, digits) = match text.split_first()? {
            (b'-', rest) => (true, rest),
            _ => (false, text),
        };
        if digits.len() > 16 {
            return None;
        }
        let (mut mantissa, mut scale, mut point) = (0u64, 0usize, false);
        for &b in digits {
            match b {
                b'0'..=b'9' => {
                    mantissa = mantissa * 10 + u64::from(b - b'0');
                    scale += usize::from(point);
                }
                b'.' => point = true,
                _ => return None,
            }
        }
        if mantissa >= 1 << 53 {
            return None; // not an exact double: a full parser rounds it once
        }
        let v = mantissa as f64 / POW10[scale];
        Some(if negative { -v } else { v })
    }

    /// A JSON number (strict grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`).
    fn number(&mut self) -> Option<Number> {
        let start = self.i;
        self.number_start = start;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        let digits = self.i;
        // The integer part, read as it is scanned (under 10^18 it cannot overflow).
        let mut magnitude = 0i64;
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                while let Some(&d) = self.b.get(self.i)
                    && d.is_ascii_digit()
                {
                    if self.i - digits < 18 {
                        magnitude = magnitude * 10 + i64::from(d - b'0');
                    }
                    self.i += 1;
                }
            }
            _ => return None,
        }
        let integer_end = self.i;
        let mut integer = true;
        if self.peek() == Some(b'.') {
            integer = false;
            self.i += 1;
            self.digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            integer = false;
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.digits()?;
        }
        if !integer {
            return Some(Number::Other);
        }
        let text = &self.b[digits..integer_end];
        if text.len() <= 18 {
            return Some(Number::Int(if negative { -magnitude } else { magnitude }));
        }
        let mut v: i64 = 0;
        for &d in text {
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

/// Microseconds since the epoch of the common form `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`
/// (a fraction of 1 to 9 digits, cut to microseconds as arrow does), or `None` for anything
/// else, which arrow's parser then reads (other separators, no offset, a date alone, …).
fn rfc3339_micros(s: &[u8]) -> Option<i64> {
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
    if s.len() < 20
        || s[4] != b'-'
        || s[7] != b'-'
        || s[10] != b'T'
        || s[13] != b':'
        || s[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (digits(s, 0, 4)?, digits(s, 5, 2)?, digits(s, 8, 2)?);
    let (hour, minute, second) = (digits(s, 11, 2)?, digits(s, 14, 2)?, digits(s, 17, 2)?);
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
    if !(1..=12).contains(&month)
        || day < 1
        || day > month_days[(month - 1) as usize]
        || hour > 23
        || minute > 59
        || second > 59
    {
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
    // Days from the civil date (Howard Hinnant's algorithm), March-based years.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(seconds * 1_000_000 + micros)
}

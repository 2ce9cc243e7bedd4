"""Pure-Python Arrow IPC stream codec and columnar helpers for Flowgate plugins.

Python plugins run as CPython inside WebAssembly (componentize-py), where C
extensions such as pyarrow and numpy do not exist.  This module uses the
standard library only: the handful of Arrow flatbuffer tables it needs are
parsed and built by hand (no ``flatbuffers`` package, no generated code).

IPC stream framing (Arrow columnar format, "IPC Streaming Format")::

    0xFFFFFFFF  int32 metadata-length  flatbuffer Message (padded to 8)  body
    ...
    0xFFFFFFFF  0x00000000                          end-of-stream marker

Streams written before Arrow 0.15 have no 0xFFFFFFFF continuation marker; both
forms are read, the current form is written (MetadataVersion V5, little
endian).  The first message is a Schema; the following are RecordBatch
messages whose body holds, for each column in order, its buffers (validity
bitmap, then the values -- or the int32 offsets and the bytes for
utf8/binary), each located by an (offset, length) pair in the message.  A
validity buffer of length 0 means "no nulls".

Supported: flat schemas of int8..int64, uint8..uint64, float32, float64,
bool, utf8, binary, timestamp (any unit, optional time zone), date32 and
date64.  Anything else raises ``ValueError`` naming the column.

Memory layout of a `Column` (all arrays little endian, as on wasm32/x86/arm):

* fixed-width types: ``values`` is a ``memoryview`` cast to the element
  format ('q' int64, 'd' float64, ...).  timestamp/date64 are 'q' and date32
  is 'i': raw integers in the column's unit, never floats.
* utf8/binary: ``offsets`` (memoryview 'i', length + 1 entries, not
  necessarily starting at 0) and ``data`` (bytes; copied once when read,
  as slicing bytes is the fastest way to cut strings apart).
* bool: ``values`` is the bit-packed bitmap, bit i = row i.
* ``validity``: bitmap (bit set = valid) or None when the column has no nulls.

Bitmaps always start at bit 0 of their buffer.  Reading shares the stream's
memory for everything but string data.  `Batch.slice` is zero-copy for
values, offsets and data; bitmaps are zero-copy when the slice starts on a
multiple of 8 rows and are otherwise shifted into a small new buffer.

Hot paths avoid per-row Python code: ``memoryview.cast`` and slicing,
``itertools.compress`` / ``map`` feeding ``array.array`` (through a list,
which is faster than from an iterator) and ``bytes.join``, and bitmaps
converted to and from one byte per row through Python ints.
A cheap way to build a filter mask is also C-level, e.g.
``bytes(map(operator.gt, batch.column("price").values, repeat(100.0)))``.
"""

import struct
from array import array
from dataclasses import dataclass, field as _dc_field
from itertools import accumulate, compress, islice, repeat
from operator import is_not, sub

__all__ = [
    "DataType", "Field", "Schema", "Column", "Batch",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float32", "float64", "bool_", "utf8", "binary", "timestamp", "date32", "date64",
    "batch_from_pydict", "read_stream", "write_stream", "write_schema",
]

_SUPPORTED = ("flat schemas of ints, floats, bool, utf8, binary, timestamp "
              "and date columns")

# --------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------

_UNITS = ("s", "ms", "us", "ns")  # Arrow TimeUnit enum order
_FORMATS = {  # memoryview / array format of fixed-width values
    "int8": "b", "int16": "h", "int32": "i", "int64": "q",
    "uint8": "B", "uint16": "H", "uint32": "I", "uint64": "Q",
    "float32": "f", "float64": "d",
    "timestamp": "q", "date32": "i", "date64": "q",
}
_VARIABLE = ("utf8", "binary")
_TYPE_NAMES = frozenset(_FORMATS).union(("bool",), _VARIABLE)


@dataclass(frozen=True)
class DataType:
    """An Arrow column type.  Build it with the helpers (`int64()`, ...).

    ``name`` is one of int8..int64, uint8..uint64, float32, float64, bool,
    utf8, binary, timestamp, date32, date64; ``unit`` ('s', 'ms', 'us', 'ns')
    and ``tz`` (time zone string or None) apply to timestamps only.
    """

    name: str
    unit: str = None
    tz: str = None

    def __post_init__(self):
        if self.name not in _TYPE_NAMES:
            raise ValueError(f"unsupported type {self.name!r}: the Python SDK "
                             f"supports {_SUPPORTED}")
        if self.name == "timestamp":
            if self.unit not in _UNITS:
                raise ValueError(f"timestamp unit must be one of {_UNITS}, "
                                 f"not {self.unit!r}")
        elif self.unit is not None or self.tz is not None:
            raise ValueError(f"{self.name} takes no unit or time zone")

    @property
    def format(self):
        """The memoryview/array format of the values, or None (bool, utf8, binary)."""
        return _FORMATS.get(self.name)

    def __str__(self):
        if self.name != "timestamp":
            return self.name
        if self.tz is None:
            return f"timestamp[{self.unit}]"
        return f"timestamp[{self.unit}, tz={self.tz}]"


def int8(): return DataType("int8")
def int16(): return DataType("int16")
def int32(): return DataType("int32")
def int64(): return DataType("int64")
def uint8(): return DataType("uint8")
def uint16(): return DataType("uint16")
def uint32(): return DataType("uint32")
def uint64(): return DataType("uint64")
def float32(): return DataType("float32")
def float64(): return DataType("float64")
def bool_(): return DataType("bool")
def utf8(): return DataType("utf8")
def binary(): return DataType("binary")
def date32(): return DataType("date32")  # days since the epoch, int32
def date64(): return DataType("date64")  # milliseconds since the epoch, int64


def timestamp(unit, tz=None):
    """Timestamp type: int64 count of `unit` ('s', 'ms', 'us', 'ns') since the
    epoch, with an optional time zone name such as "UTC"."""
    return DataType("timestamp", unit, tz)


@dataclass(frozen=True)
class Field:
    """A named column of a schema.  ``metadata`` is the field's custom
    key/value metadata (dict of str) or None."""

    name: str
    type: DataType
    nullable: bool = True
    metadata: dict = _dc_field(default=None, hash=False)


class Schema:
    """An ordered list of `Field`s plus optional schema-level metadata."""

    __slots__ = ("fields", "metadata", "_positions")

    def __init__(self, fields, metadata=None):
        self.fields = tuple(fields)
        self.metadata = dict(metadata) if metadata else None
        self._positions = {}
        for i, f in enumerate(self.fields):
            if not isinstance(f, Field):
                raise TypeError(f"Schema fields must be Field objects, not {f!r}")
            self._positions.setdefault(f.name, i)

    @property
    def names(self):
        """Column names, in order."""
        return [f.name for f in self.fields]

    def index(self, name):
        """Position of the (first) column called `name`; KeyError if none."""
        try:
            return self._positions[name]
        except KeyError:
            raise KeyError(f"no column named `{name}`") from None

    def field(self, name):
        """The `Field` called `name`."""
        return self.fields[self.index(name)]

    def __len__(self):
        return len(self.fields)

    def __iter__(self):
        return iter(self.fields)

    def __eq__(self, other):
        return (isinstance(other, Schema) and self.fields == other.fields
                and self.metadata == other.metadata)

    def __repr__(self):
        cols = ", ".join(f"{f.name}: {f.type}{'' if f.nullable else ' not null'}"
                         for f in self.fields)
        return f"Schema({cols})"


# --------------------------------------------------------------------------
# Bitmaps <-> one byte (0 or 1) per row
# --------------------------------------------------------------------------

_FLAGS_TO_ASCII = bytes.maketrans(b"\0\1", b"01")
_ASCII_TO_FLAGS = bytes.maketrans(b"01", b"\0\1")


def _unpack_bits(bitmap, n):
    """The first `n` bits of an LSB-first bitmap as `n` bytes of 0/1."""
    if n == 0:
        return b""
    bits = int.from_bytes(bitmap[:(n + 7) >> 3], "little") & ((1 << n) - 1)
    return format(bits, f"0{n}b")[::-1].encode("ascii").translate(_ASCII_TO_FLAGS)


def _pack_bits(flags):
    """Bytes of 0/1 (one per row) to an LSB-first bitmap."""
    if not flags:
        return b""
    bits = int(flags.translate(_FLAGS_TO_ASCII)[::-1], 2)
    return bits.to_bytes((len(flags) + 7) >> 3, "little")


def _slice_bits(bitmap, offset, n):
    """Bits [offset, offset + n) of `bitmap` as a bitmap starting at bit 0."""
    start, stop = offset >> 3, (offset + n + 7) >> 3
    if offset & 7 == 0:
        return memoryview(bitmap)[start:stop]
    bits = int.from_bytes(bitmap[start:stop], "little") >> (offset & 7)
    return (bits & ((1 << n) - 1)).to_bytes((n + 7) >> 3, "little")


def _count_bits(bitmap, n):
    """Number of set bits among the first `n` bits of `bitmap`."""
    return (int.from_bytes(bitmap[:(n + 7) >> 3], "little") & ((1 << n) - 1)).bit_count()


def _typed_view(buf, fmt):
    """`buf` as a memoryview of format `fmt`; raw bytes are cast, other formats refused."""
    view = memoryview(buf)
    if view.format == "B" and fmt != "B":
        view = view.cast(fmt)
    if view.format != fmt:
        raise ValueError(f"expected a buffer of format {fmt!r}, got {view.format!r}")
    return view


def _gather(data, starts, ends):
    """Concatenate the pieces data[start:end]: (new offsets array, new data bytes)."""
    pieces = list(map(data.__getitem__, map(slice, starts, ends)))
    return array("i", list(accumulate(map(len, pieces), initial=0))), b"".join(pieces)


# --------------------------------------------------------------------------
# Columns and batches
# --------------------------------------------------------------------------

class Column:
    """One column of a `Batch`; see the module docstring for the buffers.

    Attributes: ``type``, ``length``, ``null_count``, ``validity``,
    ``values`` (fixed width and bool), ``offsets`` and ``data`` (utf8/binary).
    Build one with `Column.from_pylist`, or from buffers: e.g.
    ``Column(float64(), n, values=array('d', ...))``, ``Column(utf8(), n,
    offsets=array('i', ...), data=b"...")``, ``validity`` an optional
    bitmap (``null_count`` is counted from it when not given).
    """

    __slots__ = ("type", "length", "null_count", "validity", "values", "offsets", "data")

    def __init__(self, type, length, *, values=None, offsets=None, data=None,
                 validity=None, null_count=None):
        self.type, self.length = type, length
        name = type.name
        if name in _VARIABLE:
            offsets = _typed_view(offsets, "i")
            if len(offsets) != length + 1:
                raise ValueError(f"{type} column of {length} rows needs "
                                 f"{length + 1} offsets, got {len(offsets)}")
            if data is None:
                raise ValueError(f"{type} column needs a data buffer")
            data = bytes(data)  # slicing bytes is the fastest way to cut strings
        elif name == "bool":
            if memoryview(values).nbytes < (length + 7) >> 3:
                raise ValueError(f"bool bitmap too short for {length} rows")
        else:
            values = _typed_view(values, type.format)
            if len(values) != length:
                raise ValueError(f"{type} column of {length} rows got {len(values)} values")
        self.values, self.offsets, self.data = values, offsets, data
        if validity is None:
            if null_count:
                raise ValueError(f"{null_count} nulls but no validity bitmap")
            null_count = 0
        else:
            if memoryview(validity).nbytes < (length + 7) >> 3:
                raise ValueError(f"validity bitmap too short for {length} rows")
            if null_count is None:
                null_count = length - _count_bits(validity, length)
        self.null_count = null_count
        self.validity = validity if null_count else None

    @classmethod
    def from_pylist(cls, type, values):
        """Build a column of `type` from Python values (None = null).

        ints for integer, timestamp (in its unit) and date (days for date32,
        ms for date64) columns; floats or ints for float columns; truthiness
        for bool; str for utf8; bytes-like for binary.  Raises TypeError,
        ValueError or OverflowError on values that do not fit.
        """
        if not isinstance(values, (list, tuple)):
            values = list(values)
        n = len(values)
        validity = None
        name = type.name
        if None in values:
            validity = _pack_bits(bytes(map(is_not, values, repeat(None))))
            filler = {"utf8": "", "binary": b""}.get(name, 0)
            values = [filler if v is None else v for v in values]
        if name == "bool":
            return cls(type, n, values=_pack_bits(bytes(map(bool, values))), validity=validity)
        if name in _VARIABLE:
            expected = str if name == "utf8" else (bytes, bytearray, memoryview)
            for v in values:
                if not isinstance(v, expected):
                    raise TypeError(f"expected {'str' if name == 'utf8' else 'bytes'} "
                                    f"values for a {type} column, got {v!r}")
            parts = list(map(str.encode, values)) if name == "utf8" else list(map(bytes, values))
            offsets = array("i", list(accumulate(map(len, parts), initial=0)))
            return cls(type, n, offsets=offsets, data=b"".join(parts), validity=validity)
        return cls(type, n, values=array(type.format, values), validity=validity)

    def __len__(self):
        return self.length

    def __repr__(self):
        return f"<Column {self.type} length={self.length} nulls={self.null_count}>"

    def is_valid(self, i):
        """True if row `i` is not null."""
        if not 0 <= i < self.length:
            raise IndexError(f"row {i} out of range for a column of {self.length} rows")
        v = self.validity
        return v is None or bool(v[i >> 3] >> (i & 7) & 1)

    def get(self, i):
        """The Python value of row `i` (None if null).  Timestamps and dates
        are raw integers in the column's unit."""
        if not self.is_valid(i):
            return None
        name = self.type.name
        if name == "bool":
            return bool(self.values[i >> 3] >> (i & 7) & 1)
        if name in _VARIABLE:
            raw = self.data[self.offsets[i]:self.offsets[i + 1]]
            return str(raw, "utf-8") if name == "utf8" else bytes(raw)
        return self.values[i]

    def to_pylist(self):
        """All values as a Python list (None for nulls), like `get`."""
        name = self.type.name
        if name == "bool":
            out = list(map(bool, _unpack_bits(self.values, self.length)))
        elif name in _VARIABLE:
            pieces = map(self.data.__getitem__, map(slice, self.offsets[:-1], self.offsets[1:]))
            if name == "utf8":
                out = list(map(str, pieces, repeat("utf-8")))
            else:
                out = list(map(bytes, pieces))
        else:
            out = self.values.tolist()
        if self.validity is not None:
            flags = _unpack_bits(self.validity, self.length)
            out = [v if ok else None for v, ok in zip(out, flags)]
        return out

    def slice(self, offset, length):
        """Rows [offset, offset + length); zero-copy except unaligned bitmaps."""
        if offset < 0 or length < 0 or offset + length > self.length:
            raise IndexError(f"slice ({offset}, {length}) out of range for "
                             f"{self.length} rows")
        name = self.type.name
        values, offsets = self.values, self.offsets
        if name == "bool":
            values = _slice_bits(values, offset, length)
        elif name in _VARIABLE:
            offsets = offsets[offset:offset + length + 1]
        else:
            values = values[offset:offset + length]
        validity = self.validity
        if validity is not None:
            validity = _slice_bits(validity, offset, length)
        return Column(self.type, length, values=values, offsets=offsets,
                      data=self.data, validity=validity)

    def _filter(self, keep, kept):
        # keep: bytes, nonzero = keep the row; kept: number of nonzero bytes.
        name = self.type.name
        values = offsets = data = validity = None
        if name == "bool":
            values = _pack_bits(bytes(compress(_unpack_bits(self.values, self.length), keep)))
        elif name in _VARIABLE:
            offs = self.offsets.tolist()
            offsets, data = _gather(self.data, compress(offs, keep),
                                    compress(islice(offs, 1, None), keep))
        else:
            values = array(self.values.format, list(compress(self.values, keep)))
        if self.validity is not None:
            validity = _pack_bits(bytes(compress(_unpack_bits(self.validity, self.length), keep)))
        return Column(self.type, kept, values=values, offsets=offsets, data=data,
                      validity=validity)

    def _take(self, indices):
        # indices: list of ints already checked to lie in [0, length).
        name = self.type.name
        values = offsets = data = validity = None
        if name == "bool":
            values = _pack_bits(bytes(map(_unpack_bits(self.values, self.length).__getitem__,
                                          indices)))
        elif name in _VARIABLE:
            offs = self.offsets.tolist()
            offsets, data = _gather(self.data, map(offs.__getitem__, indices),
                                    map(offs[1:].__getitem__, indices))
        else:
            values = array(self.values.format, list(map(self.values.__getitem__, indices)))
        if self.validity is not None:
            flags = _unpack_bits(self.validity, self.length)
            validity = _pack_bits(bytes(map(flags.__getitem__, indices)))
        return Column(self.type, len(indices), values=values, offsets=offsets, data=data,
                      validity=validity)

    def _ipc_buffers(self):
        # The buffers of this column in IPC order, trimmed and rebased.
        nbytes = (self.length + 7) >> 3
        validity = b"" if self.validity is None else self.validity[:nbytes]
        name = self.type.name
        if name == "bool":
            return [validity, self.values[:nbytes]]
        if name in _VARIABLE:
            offsets = self.offsets
            first, last = offsets[0], offsets[-1]
            if first:
                offsets = array("i", list(map(sub, offsets, repeat(first))))
            return [validity, offsets, memoryview(self.data)[first:last]]
        return [validity, self.values]


class Batch:
    """A record batch: a `Schema` and one equal-length `Column` per field."""

    __slots__ = ("schema", "columns", "num_rows")

    def __init__(self, schema, columns, num_rows=None):
        columns = list(columns)
        if len(columns) != len(schema.fields):
            raise ValueError(f"schema has {len(schema.fields)} fields but "
                             f"{len(columns)} columns were given")
        if num_rows is None:
            if not columns:
                raise ValueError("num_rows is required for a batch without columns")
            num_rows = columns[0].length
        for f, c in zip(schema.fields, columns):
            if c.type != f.type:
                raise ValueError(f"column `{f.name}`: {c.type} data for a {f.type} field")
            if c.length != num_rows:
                raise ValueError(f"column `{f.name}` has {c.length} rows, expected {num_rows}")
            if c.null_count and not f.nullable:
                raise ValueError(f"column `{f.name}` is not nullable but has "
                                 f"{c.null_count} nulls")
        self.schema, self.columns, self.num_rows = schema, columns, num_rows

    def __len__(self):
        return self.num_rows

    def __repr__(self):
        return f"<Batch {self.num_rows} rows of {self.schema!r}>"

    def column(self, key):
        """The `Column` called `key` (str) or at position `key` (int)."""
        if isinstance(key, str):
            key = self.schema.index(key)
        return self.columns[key]

    def filter(self, keep):
        """The rows whose entry in `keep` is truthy.

        `keep` has one entry per row; bytes/bytearray (nonzero = keep) are
        used as they are, any other sequence is converted with `bool`.
        """
        if not isinstance(keep, (bytes, bytearray)):
            keep = bytes(map(bool, keep))
        if len(keep) != self.num_rows:
            raise ValueError(f"filter mask has {len(keep)} entries for {self.num_rows} rows")
        kept = self.num_rows - keep.count(0)
        if kept == self.num_rows:
            return self
        return Batch(self.schema, [c._filter(keep, kept) for c in self.columns], kept)

    def take(self, indices):
        """The rows at `indices` (ints in [0, num_rows), in any order, repeats allowed)."""
        indices = list(indices)
        if indices and (min(indices) < 0 or max(indices) >= self.num_rows):
            raise IndexError(f"take indices must be in [0, {self.num_rows})")
        return Batch(self.schema, [c._take(indices) for c in self.columns], len(indices))

    def slice(self, offset, length=None):
        """Rows [offset, offset + length) (to the end if `length` is None or
        too long), sharing the buffers of this batch where possible."""
        if not 0 <= offset <= self.num_rows:
            raise IndexError(f"slice offset {offset} out of range for {self.num_rows} rows")
        available = self.num_rows - offset
        length = available if length is None else min(length, available)
        if length < 0:
            raise ValueError("slice length must not be negative")
        return Batch(self.schema, [c.slice(offset, length) for c in self.columns], length)

    def to_pydict(self):
        """{column name: list of values}."""
        return {f.name: c.to_pylist() for f, c in zip(self.schema.fields, self.columns)}

    def to_pylist(self):
        """One dict {column name: value} per row."""
        names = self.schema.names
        if not names:
            return [{} for _ in range(self.num_rows)]
        return [dict(zip(names, row)) for row in zip(*(c.to_pylist() for c in self.columns))]


def batch_from_pydict(schema, data):
    """Build a `Batch` from {column name: list of Python values or None}.

    Every schema field needs an entry of the same length; see
    `Column.from_pylist` for the accepted values.  Raises ValueError naming
    the column on missing/unknown names or values that do not fit the type.
    """
    names = schema.names
    unknown = [name for name in data if name not in names]
    missing = [name for name in names if name not in data]
    if unknown or missing:
        raise ValueError(f"batch_from_pydict: missing columns {missing}, unknown columns {unknown}")
    columns = []
    for f in schema.fields:
        try:
            columns.append(Column.from_pylist(f.type, data[f.name]))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"column `{f.name}`: {exc}") from None
    lengths = {c.length for c in columns}
    if len(lengths) > 1:
        raise ValueError(f"batch_from_pydict: columns have different lengths {sorted(lengths)}")
    return Batch(schema, columns, lengths.pop() if lengths else 0)


# --------------------------------------------------------------------------
# Flatbuffers: reading
# --------------------------------------------------------------------------

_U8, _I8 = struct.Struct("<B"), struct.Struct("<b")
_I16, _U16 = struct.Struct("<h"), struct.Struct("<H")
_I32, _U32 = struct.Struct("<i"), struct.Struct("<I")
_I64, _QQ = struct.Struct("<q"), struct.Struct("<qq")


class _Table:
    """Read access to a flatbuffer table; fields are addressed by slot number
    (their declaration order in the .fbs file, a union taking two slots)."""

    __slots__ = ("buf", "pos", "vtable", "vsize")

    def __init__(self, buf, pos):
        vtable = pos - _I32.unpack_from(buf, pos)[0]
        if vtable < 0:  # struct would read from the end of buf
            raise ValueError("malformed Arrow IPC metadata (vtable out of range)")
        self.buf, self.pos, self.vtable = buf, pos, vtable
        self.vsize = _U16.unpack_from(buf, vtable)[0]

    def _at(self, slot):
        entry = 4 + 2 * slot
        if entry >= self.vsize:
            return 0
        rel = _U16.unpack_from(self.buf, self.vtable + entry)[0]
        return self.pos + rel if rel else 0

    def _target(self, slot):
        at = self._at(slot)
        return at + _U32.unpack_from(self.buf, at)[0] if at else None

    def scalar(self, slot, kind, default=0):
        at = self._at(slot)
        return kind.unpack_from(self.buf, at)[0] if at else default

    def table(self, slot):
        at = self._target(slot)
        return None if at is None else _Table(self.buf, at)

    def string(self, slot):
        at = self._target(slot)
        if at is None:
            return None
        n = _U32.unpack_from(self.buf, at)[0]
        if at + 4 + n > len(self.buf):
            raise ValueError("truncated or malformed Arrow IPC metadata (string)")
        return str(self.buf[at + 4:at + 4 + n], "utf-8")

    def vector(self, slot):
        """(position of the first element, element count); (0, 0) if absent."""
        at = self._target(slot)
        return (0, 0) if at is None else (at + 4, _U32.unpack_from(self.buf, at)[0])

    def structs(self, slot, kind):
        start, n = self.vector(slot)
        stop = start + kind.size * n
        if stop > len(self.buf):
            raise ValueError("truncated or malformed Arrow IPC metadata (vector)")
        return list(kind.iter_unpack(self.buf[start:stop]))

    def tables(self, slot):
        start, n = self.vector(slot)
        return [_Table(self.buf, p + _U32.unpack_from(self.buf, p)[0])
                for p in range(start, start + 4 * n, 4)]


# --------------------------------------------------------------------------
# Flatbuffers: writing
# --------------------------------------------------------------------------

class _Structs:
    """A flatbuffer vector of `count` 8-byte-aligned structs packed in `payload`."""

    __slots__ = ("count", "payload")

    def __init__(self, count, payload):
        self.count, self.payload = count, payload


def _fb_build(root):
    """Serialize a flatbuffer whose root table is `root`.

    A table is a dict {slot: value}; a value is a scalar ``(struct format,
    number)``, a str, a list of tables, or a `_Structs`.  Objects are laid out
    front to back, each after the table that refers to it, so every uoffset is
    positive; every scalar and struct is aligned to its size from the buffer
    start and strings are NUL-terminated, as the flatbuffer verifiers of Arrow
    readers require.
    """
    buf = bytearray(4)
    _U32.pack_into(buf, 0, _fb_table(buf, root))
    return buf


def _fb_table(buf, fields):
    inline = sorted(((struct.calcsize(v[0]) if isinstance(v, tuple) else 4, slot, v)
                     for slot, v in fields.items()), key=lambda e: -e[0])
    nslots = max(fields, default=-1) + 1
    layout = [0] * nslots
    size = 4  # the int32 soffset to the vtable comes first
    for width, slot, _ in inline:  # widest first keeps every field aligned
        layout[slot] = size
        size += width
    buf += bytes(len(buf) & 1)
    vtable = len(buf)
    buf += struct.pack(f"<{2 + nslots}H", 4 + 2 * nslots, size, *layout)
    start = len(buf) + (-len(buf) & 3)
    if inline and inline[0][0] == 8 and start & 7 == 0:
        start += 4  # 8-byte fields begin right after the soffset
    buf += bytes(start - len(buf))
    body = bytearray(size)
    _I32.pack_into(body, 0, start - vtable)
    for _, slot, value in inline:
        if isinstance(value, tuple):
            struct.pack_into("<" + value[0], body, layout[slot], value[1])
    buf += body
    for _, slot, value in inline:
        if not isinstance(value, tuple):
            at = start + layout[slot]
            _U32.pack_into(buf, at, _fb_object(buf, value) - at)
    return start


def _fb_object(buf, obj):
    if isinstance(obj, dict):
        return _fb_table(buf, obj)
    buf += bytes(-len(buf) & 3)
    if isinstance(obj, str):
        pos = len(buf)
        data = obj.encode()
        buf += _U32.pack(len(data)) + data + b"\0"
        return pos
    if isinstance(obj, _Structs):
        buf += bytes(4 - (len(buf) & 4))  # elements start 8-aligned after the count
        pos = len(buf)
        buf += _U32.pack(obj.count) + obj.payload
        return pos
    pos = len(buf)  # vector of tables
    buf += _U32.pack(len(obj)) + bytes(4 * len(obj))
    for i, table in enumerate(obj):
        at = pos + 4 + 4 * i
        _U32.pack_into(buf, at, _fb_table(buf, table) - at)
    return pos


# --------------------------------------------------------------------------
# Arrow metadata <-> objects
# --------------------------------------------------------------------------

_CONTINUATION = b"\xff\xff\xff\xff"
_EOS = _CONTINUATION + b"\0\0\0\0"
_V4, _V5 = 3, 4  # MetadataVersion enum values
_SCHEMA, _DICTIONARY_BATCH, _RECORD_BATCH = 1, 2, 3  # MessageHeader union
_ARROW_TYPE_NAMES = (  # Type union, for error messages
    "NONE", "Null", "Int", "FloatingPoint", "Binary", "Utf8", "Bool", "Decimal",
    "Date", "Time", "Timestamp", "Interval", "List", "Struct", "Union",
    "FixedSizeBinary", "FixedSizeList", "Map", "Duration", "LargeBinary",
    "LargeUtf8", "LargeList", "RunEndEncoded", "BinaryView", "Utf8View",
    "ListView", "LargeListView")
_INT_TYPE, _FLOAT_TYPE, _BINARY_TYPE, _UTF8_TYPE, _BOOL_TYPE = 2, 3, 4, 5, 6
_DATE_TYPE, _TIMESTAMP_TYPE = 8, 10
_INT_WIDTHS = {"int8": 8, "int16": 16, "int32": 32, "int64": 64,
               "uint8": 8, "uint16": 16, "uint32": 32, "uint64": 64}


def _refused(column, what):
    return ValueError(f"column `{column}`: {what} not supported by the Python SDK ({_SUPPORTED})")


def _decode_metadata(table, slot):
    pairs = {kv.string(0) or "": kv.string(1) or "" for kv in table.tables(slot)}
    return pairs or None


def _decode_type(column, type_id, params):
    if params is None and type_id in (_INT_TYPE, _FLOAT_TYPE, _DATE_TYPE, _TIMESTAMP_TYPE):
        raise ValueError(f"column `{column}`: malformed Arrow IPC metadata (no type parameters)")
    if type_id == _INT_TYPE:
        bits, signed = params.scalar(0, _I32), params.scalar(1, _U8)
        if bits not in (8, 16, 32, 64):
            raise _refused(column, f"Arrow type Int(bitWidth={bits}) is")
        return DataType(f"{'' if signed else 'u'}int{bits}")
    if type_id == _FLOAT_TYPE:
        precision = params.scalar(0, _I16)
        if precision not in (1, 2):
            raise _refused(column, "Arrow type Float16 is" if precision == 0
                           else f"Arrow FloatingPoint precision {precision} is")
        return DataType("float32" if precision == 1 else "float64")
    if type_id in (_BINARY_TYPE, _UTF8_TYPE, _BOOL_TYPE):
        return DataType({_BINARY_TYPE: "binary", _UTF8_TYPE: "utf8", _BOOL_TYPE: "bool"}[type_id])
    if type_id == _DATE_TYPE:
        unit = params.scalar(0, _I16, 1)
        if unit not in (0, 1):
            raise _refused(column, f"Arrow Date unit {unit} is")
        return DataType("date32" if unit == 0 else "date64")
    if type_id == _TIMESTAMP_TYPE:
        unit = params.scalar(0, _I16)
        if not 0 <= unit < 4:
            raise _refused(column, f"Arrow Timestamp unit {unit} is")
        return DataType("timestamp", _UNITS[unit], params.string(1))
    name = _ARROW_TYPE_NAMES[type_id] if type_id < len(_ARROW_TYPE_NAMES) else f"#{type_id}"
    raise _refused(column, f"Arrow type {name} is")


def _decode_schema(header):
    if header.scalar(0, _I16) != 0:
        raise ValueError("big-endian Arrow data is not supported by the Python SDK")
    fields = []
    for t in header.tables(1):
        name = t.string(0) or ""
        if t.table(4) is not None:
            raise _refused(name, "dictionary-encoded columns are")
        data_type = _decode_type(name, t.scalar(2, _U8), t.table(3))
        fields.append(Field(name, data_type, bool(t.scalar(1, _U8)), _decode_metadata(t, 6)))
    return Schema(fields, _decode_metadata(header, 2))


def _body_buffer(body, offset, length):
    if offset < 0 or length < 0 or offset + length > len(body):
        raise ValueError("truncated Arrow IPC stream: buffer outside the message body")
    return body[offset:offset + length]


def _decode_batch(schema, header, body):
    if header.table(3) is not None:
        codec = header.table(3).scalar(0, _I8)
        codec = {0: "LZ4_FRAME", 1: "ZSTD"}.get(codec, codec)
        raise ValueError(f"compressed record batches ({codec}) are not supported by "
                         "the Python SDK; write the stream without IPC compression")
    num_rows = header.scalar(0, _I64)
    nodes, buffers = header.structs(1, _QQ), header.structs(2, _QQ)
    if len(nodes) != len(schema.fields):
        raise ValueError(f"malformed Arrow IPC stream: {len(nodes)} field nodes for "
                         f"{len(schema.fields)} columns")
    buffers.reverse()  # consumed with pop() in order
    columns = []
    for f, (length, null_count) in zip(schema.fields, nodes):
        kind = f.type.name
        nbuf = 3 if kind in _VARIABLE else 2
        if len(buffers) < nbuf:
            raise ValueError("malformed Arrow IPC stream: too few buffers")
        if length != num_rows or not 0 <= null_count <= length:
            raise ValueError(f"column `{f.name}`: malformed Arrow IPC stream "
                             f"(length {length}, null count {null_count}, {num_rows} rows)")
        bufs = [_body_buffer(body, *buffers.pop()) for _ in range(nbuf)]
        nbytes = (length + 7) >> 3
        validity = None
        if null_count:
            if len(bufs[0]) < nbytes:
                raise ValueError(f"column `{f.name}`: validity bitmap missing or truncated")
            validity = bufs[0][:nbytes]
        values = offsets = data = None
        if kind in _VARIABLE:
            if length == 0 and len(bufs[1]) < 4:
                offsets = array("i", [0])
            else:
                if len(bufs[1]) < 4 * (length + 1):
                    raise ValueError(f"column `{f.name}`: offsets buffer truncated")
                offsets = bufs[1][:4 * (length + 1)].cast("i")
            data = bufs[2]
            if not 0 <= offsets[0] <= offsets[-1] <= len(data):
                raise ValueError(f"column `{f.name}`: offsets outside the data buffer")
        elif kind == "bool":
            values = bufs[1][:nbytes]
            if len(values) < nbytes:
                raise ValueError(f"column `{f.name}`: values buffer truncated")
        else:
            width = struct.calcsize(f.type.format)
            if len(bufs[1]) < width * length:
                raise ValueError(f"column `{f.name}`: values buffer truncated")
            values = bufs[1][:width * length].cast(f.type.format)
        columns.append(Column(f.type, length, values=values, offsets=offsets, data=data,
                              validity=validity, null_count=null_count))
    return Batch(schema, columns, num_rows)


def _encode_type(t):
    name = t.name
    if name in _INT_WIDTHS:
        return _INT_TYPE, {0: ("i", _INT_WIDTHS[name]), 1: ("B", not name.startswith("u"))}
    if name in ("float32", "float64"):
        return _FLOAT_TYPE, {0: ("h", 1 if name == "float32" else 2)}
    if name in ("date32", "date64"):
        return _DATE_TYPE, {0: ("h", 0 if name == "date32" else 1)}
    if name == "timestamp":
        params = {0: ("h", _UNITS.index(t.unit))}
        if t.tz is not None:
            params[1] = t.tz
        return _TIMESTAMP_TYPE, params
    return {"binary": _BINARY_TYPE, "utf8": _UTF8_TYPE, "bool": _BOOL_TYPE}[name], {}


def _encode_metadata(metadata):
    return [{0: str(k), 1: str(v)} for k, v in metadata.items()]


def _encode_schema(schema):
    fields = []
    for f in schema.fields:
        type_id, params = _encode_type(f.type)
        # children is written even when empty: older Arrow C++ rejects a missing one
        table = {0: f.name, 1: ("B", f.nullable), 2: ("B", type_id), 3: params, 5: []}
        if f.metadata:
            table[6] = _encode_metadata(f.metadata)
        fields.append(table)
    header = {0: ("h", 0), 1: fields}  # little endian
    if schema.metadata:
        header[2] = _encode_metadata(schema.metadata)
    return header


def _message(header_type, header, body_length):
    meta = _fb_build({0: ("h", _V5), 1: ("B", header_type), 2: header, 3: ("q", body_length)})
    meta += bytes(-len(meta) & 7)
    return _CONTINUATION + _I32.pack(len(meta)) + meta


def _append_batch(parts, schema, batch):
    if len(batch.columns) != len(schema.fields):
        raise ValueError(f"batch has {len(batch.columns)} columns, schema {len(schema.fields)}")
    nodes, specs, chunks, pos = bytearray(), bytearray(), [], 0
    for f, col in zip(schema.fields, batch.columns):
        if col.type != f.type:
            raise ValueError(f"column `{f.name}`: {col.type} data for a {f.type} field")
        if col.null_count and not f.nullable:
            raise ValueError(f"column `{f.name}` is not nullable but has {col.null_count} nulls")
        nodes += _QQ.pack(col.length, col.null_count)
        for buf in col._ipc_buffers():
            size = memoryview(buf).nbytes
            specs += _QQ.pack(pos, size)
            chunks.append(buf)
            if size & 7:
                chunks.append(bytes(-size & 7))
            pos += size + (-size & 7)
    header = {0: ("q", batch.num_rows), 1: _Structs(len(nodes) // 16, nodes),
              2: _Structs(len(specs) // 16, specs)}
    parts.append(_message(_RECORD_BATCH, header, pos))
    parts.extend(chunks)


# --------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------

def _messages(buf):
    """Yield (header type, header table, body memoryview) per IPC message."""
    pos, end = 0, len(buf)
    while pos < end:
        if end - pos < 4:
            raise ValueError("truncated Arrow IPC stream: incomplete message prefix")
        size = _I32.unpack_from(buf, pos)[0]
        pos += 4
        if size == -1:  # continuation marker: the length follows
            if end - pos < 4:
                raise ValueError("truncated Arrow IPC stream: incomplete message prefix")
            size = _I32.unpack_from(buf, pos)[0]
            pos += 4
        if size == 0:
            return  # end-of-stream marker
        if size < 0 or pos + size > end:
            raise ValueError("truncated Arrow IPC stream: incomplete message metadata")
        meta = bytes(buf[pos:pos + size])
        pos += size
        message = _Table(meta, _U32.unpack_from(meta, 0)[0])
        version = message.scalar(0, _I16)
        if version < _V4:
            raise ValueError(f"Arrow IPC metadata version V{version + 1} (before Arrow 0.8) "
                             "is not supported by the Python SDK")
        header_type, header = message.scalar(1, _U8), message.table(2)
        body_length = message.scalar(3, _I64)
        if header is None or body_length < 0:
            raise ValueError("malformed Arrow IPC message")
        if pos + body_length > end:
            raise ValueError("truncated Arrow IPC stream: incomplete message body")
        yield header_type, header, buf[pos:pos + body_length]
        pos += body_length


def read_stream(data):
    """Decode Arrow IPC stream bytes into ``(Schema, [Batch, ...])``.

    Columns share memory with `data` where they can.  Raises ValueError for
    unsupported types or features (naming the column) and for truncated or
    malformed input.
    """
    try:
        return _read_stream(memoryview(data).cast("B"))
    except (struct.error, IndexError) as exc:
        raise ValueError(f"truncated or malformed Arrow IPC stream ({exc})") from None


def _read_stream(buf):
    schema, batches = None, []
    for header_type, header, body in _messages(buf):
        if header_type == _SCHEMA:
            if schema is not None:
                raise ValueError("malformed Arrow IPC stream: a second Schema message")
            schema = _decode_schema(header)
        elif schema is None:
            raise ValueError("malformed Arrow IPC stream: the first message is not a Schema")
        elif header_type == _RECORD_BATCH:
            batches.append(_decode_batch(schema, header, body))
        elif header_type == _DICTIONARY_BATCH:
            raise ValueError("dictionary batches are not supported by the Python SDK "
                             f"({_SUPPORTED})")
        else:
            raise ValueError(f"unexpected Arrow IPC message type {header_type}")
    if schema is None:
        raise ValueError("truncated Arrow IPC stream: no Schema message")
    return schema, batches


def write_schema(schema):
    """IPC stream bytes holding only `schema` and the end-of-stream marker."""
    return _message(_SCHEMA, _encode_schema(schema), 0) + _EOS


def write_stream(schema, batches):
    """Encode `batches` (each matching `schema`) as Arrow IPC stream bytes:
    schema message, one RecordBatch message per batch, end-of-stream marker."""
    parts = [_message(_SCHEMA, _encode_schema(schema), 0)]
    for batch in batches:
        _append_batch(parts, schema, batch)
    parts.append(_EOS)
    return b"".join(parts)

"""Tests of flowgate.arrow against pyarrow (which only runs outside WebAssembly).

Run: python -m pytest -q plugins/sdk-python/tests
Timing: python plugins/sdk-python/tests/test_arrow.py
"""

import os
import random
import struct
import sys
import time
from operator import gt
from itertools import repeat

import pytest

pa = pytest.importorskip("pyarrow")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from flowgate import arrow as fa  # noqa: E402


# --------------------------------------------------------------------------
# One entry per supported type: (SDK type, pyarrow type, int storage or None)
# --------------------------------------------------------------------------

TYPES = {
    "int8": (fa.int8(), pa.int8(), None),
    "int16": (fa.int16(), pa.int16(), None),
    "int32": (fa.int32(), pa.int32(), None),
    "int64": (fa.int64(), pa.int64(), None),
    "uint8": (fa.uint8(), pa.uint8(), None),
    "uint16": (fa.uint16(), pa.uint16(), None),
    "uint32": (fa.uint32(), pa.uint32(), None),
    "uint64": (fa.uint64(), pa.uint64(), None),
    "float32": (fa.float32(), pa.float32(), None),
    "float64": (fa.float64(), pa.float64(), None),
    "bool": (fa.bool_(), pa.bool_(), None),
    "utf8": (fa.utf8(), pa.string(), None),
    "binary": (fa.binary(), pa.binary(), None),
    "ts_s": (fa.timestamp("s"), pa.timestamp("s"), pa.int64()),
    "ts_ms": (fa.timestamp("ms"), pa.timestamp("ms"), pa.int64()),
    "ts_us_utc": (fa.timestamp("us", "UTC"), pa.timestamp("us", tz="UTC"), pa.int64()),
    "ts_ns_ny": (fa.timestamp("ns", "America/New_York"),
                 pa.timestamp("ns", tz="America/New_York"), pa.int64()),
    "date32": (fa.date32(), pa.date32(), pa.int32()),
    "date64": (fa.date64(), pa.date64(), pa.int64()),
}
INT_RANGES = {"int8": (-2**7, 2**7 - 1), "int16": (-2**15, 2**15 - 1),
              "int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1),
              "uint8": (0, 2**8 - 1), "uint16": (0, 2**16 - 1),
              "uint32": (0, 2**32 - 1), "uint64": (0, 2**64 - 1)}
WORDS = ["", "a", "héllo", "日本語", "x" * 40, "tab\tnew\nline", "AAPL", "\u0000z"]


def sample(key, n, rng, nulls):
    """`n` Python values for TYPES[key] (raw ints for temporal types)."""
    name = TYPES[key][0].name
    if name in INT_RANGES:
        lo, hi = INT_RANGES[name]
        values = [lo, hi] + [rng.randint(lo, hi) for _ in range(n)]
    elif name == "float32":
        values = [rng.randint(-4000, 4000) / 8 for _ in range(n)]
    elif name == "float64":
        values = [rng.uniform(-1e9, 1e9) for _ in range(n)]
    elif name == "bool":
        values = [rng.random() < 0.5 for _ in range(n)]
    elif name == "utf8":
        values = [rng.choice(WORDS) + str(rng.randint(0, 999)) for _ in range(n)]
    elif name == "binary":
        values = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 9))) for _ in range(n)]
    elif name == "date32":
        values = [rng.randint(-100_000, 100_000) for _ in range(n)]
    elif name == "date64":
        values = [rng.randint(-100_000, 100_000) * 86_400_000 for _ in range(n)]
    else:  # timestamp
        values = [1731421801123457] + [rng.randint(-2**62, 2**62) for _ in range(n)]
    values = values[:n]
    if nulls:
        values = [None if rng.random() < 0.3 else v for v in values]
        if n:
            values[0] = None
    return values


def pa_array(key, values):
    _, pa_type, storage = TYPES[key]
    if storage is None:
        return pa.array(values, type=pa_type)
    return pa.array(values, type=storage).cast(pa_type)


def pa_values(key, array):
    """pyarrow array -> Python list, temporal types as raw integers."""
    storage = TYPES[key][2]
    return (array if storage is None else array.cast(storage)).to_pylist()


def pa_stream(batches, schema, **options):
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema, options=pa.ipc.IpcWriteOptions(**options)) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def pa_read(data):
    """(schema, list of record batches) as pyarrow reads our bytes."""
    reader = pa.ipc.open_stream(data)
    batches = list(reader)
    for batch in batches:
        batch.validate(full=True)
    return reader.schema, batches


NULLS = pytest.mark.parametrize("nulls", [False, True], ids=["no-nulls", "nulls"])
EACH_TYPE = pytest.mark.parametrize("key", list(TYPES))


# --------------------------------------------------------------------------
# pyarrow writes, flowgate reads
# --------------------------------------------------------------------------

@EACH_TYPE
@NULLS
def test_read_pyarrow_stream(key, nulls):
    rng = random.Random(key)
    fa_type, pa_type, _ = TYPES[key]
    metadata = {"unit": "EUR", "note": "ü"}
    pa_schema = pa.schema([pa.field("c", pa_type, nullable=nulls, metadata=metadata),
                           pa.field("n", pa.int64())], metadata={"origin": "test"})
    sizes = [37, 0, 5, 64, 1]
    batches = []
    for size in sizes:
        values = sample(key, size, rng, nulls)
        batches.append(pa.record_batch([pa_array(key, values), pa.array(range(size))],
                                       schema=pa_schema))
    schema, got = fa.read_stream(pa_stream(batches, pa_schema))

    assert schema.names == ["c", "n"]
    assert schema.field("c") == fa.Field("c", fa_type, nulls, metadata)
    assert schema.field("n") == fa.Field("n", fa.int64(), True, None)
    assert schema.metadata == {"origin": "test"}
    assert [b.num_rows for b in got] == sizes
    for expected, batch in zip(batches, got):
        column = batch.column("c")
        assert column.type == fa_type
        assert column.to_pylist() == pa_values(key, expected.column(0))
        assert column.null_count == expected.column(0).null_count
        assert [column.get(i) for i in range(batch.num_rows)] == column.to_pylist()
        assert [column.is_valid(i) for i in range(batch.num_rows)] == \
            expected.column(0).is_valid().to_pylist()
        assert batch.column("n").to_pylist() == list(range(batch.num_rows))
        assert batch.to_pylist() == [dict(zip(["c", "n"], row)) for row in
                                     zip(pa_values(key, expected.column(0)),
                                         range(batch.num_rows))]


@EACH_TYPE
def test_read_pyarrow_sliced_batch(key):
    rng = random.Random(key + "sliced")
    values = sample(key, 40, rng, nulls=True)
    pa_schema = pa.schema([pa.field("c", TYPES[key][1])])
    full = pa.record_batch([pa_array(key, values)], schema=pa_schema)
    for offset, length in [(3, 10), (13, 20), (8, 16), (39, 1)]:
        _, [batch] = fa.read_stream(pa_stream([full.slice(offset, length)], pa_schema))
        assert batch.column("c").to_pylist() == values[offset:offset + length]


def test_read_legacy_format_without_continuation_marker():
    pa_schema = pa.schema([pa.field("s", pa.string()), pa.field("x", pa.float64())])
    batch = pa.record_batch([pa.array(["a", None, "ccc"]), pa.array([1.5, 2.0, None])],
                            schema=pa_schema)
    data = pa_stream([batch, batch], pa_schema, use_legacy_format=True)
    assert data[:4] != b"\xff\xff\xff\xff"
    schema, batches = fa.read_stream(data)
    assert schema.names == ["s", "x"]
    assert [b.to_pylist() for b in batches] == [batch.to_pylist()] * 2


@pytest.mark.parametrize("unit", ["us", "ns"])
def test_timestamps_stay_exact_integers(unit):
    # 1731421801123457 (the brief's example) still fits a float64 mantissa;
    # 2**53 + 1 and a nanosecond timestamp of today do not.
    values = [1731421801123457, 2**53 + 1, 1731421801123456789, -(2**63) + 1]
    assert any(int(float(v)) != v for v in values)
    pa_type = pa.timestamp(unit, tz="UTC")
    pa_schema = pa.schema([pa.field("ts", pa_type)])
    batch = pa.record_batch([pa.array(values + [None], pa.int64()).cast(pa_type)],
                            schema=pa_schema)
    schema, [got] = fa.read_stream(pa_stream([batch], pa_schema))
    column = got.column("ts")
    assert column.type == fa.timestamp(unit, "UTC") and column.values.format == "q"
    assert column.values.tolist()[:4] == values
    assert [column.get(i) for i in range(5)] == values + [None]
    assert column.to_pylist() == values + [None]

    built = fa.batch_from_pydict(schema, {"ts": values + [None]})
    for written in (got, built, built.slice(1), built.filter([1, 1, 0, 1, 1])):
        _, [back] = pa_read(fa.write_stream(schema, [written]))
        assert back.schema.field("ts").type == pa_type
        assert back.column(0).cast(pa.int64()).to_pylist() == written.column("ts").to_pylist()
    assert back.column(0).cast(pa.int64()).to_pylist() == [values[0], values[1], values[3], None]


def test_column_buffers_are_zero_copy_views():
    pa_schema = pa.schema([pa.field("i", pa.int64()), pa.field("f", pa.float32()),
                           pa.field("d", pa.date32()), pa.field("s", pa.string()),
                           pa.field("b", pa.bool_())])
    batch = pa.record_batch([pa.array([1, 2, None]), pa.array([0.5, 1.5, 2.5]),
                             pa.array([0, 1, 2], pa.int32()).cast(pa.date32()),
                             pa.array(["ab", "", "c"]), pa.array([True, False, True])],
                            schema=pa_schema)
    data = pa_stream([batch], pa_schema)
    _, [got] = fa.read_stream(data)
    i, f, d, s, b = got.columns
    assert (i.values.format, f.values.format, d.values.format) == ("q", "f", "i")
    assert i.values.obj is data and i.values.tolist()[:2] == [1, 2]
    assert i.validity is not None and i.null_count == 1 and not i.is_valid(2)
    assert f.validity is None and f.null_count == 0
    assert s.offsets.format == "i" and s.offsets.tolist() == [0, 2, 2, 3]
    assert bytes(s.data) == b"abc"
    assert b.values[0] & 0b111 == 0b101 and b.get(1) is False
    sliced = got.slice(1, 2)
    assert sliced.column("i").values.obj is data
    assert sliced.column("s").offsets.tolist() == [2, 2, 3]


# --------------------------------------------------------------------------
# flowgate writes, pyarrow reads
# --------------------------------------------------------------------------

@EACH_TYPE
@NULLS
def test_write_matches_pyarrow(key, nulls):
    rng = random.Random(key + "write")
    fa_type, pa_type, _ = TYPES[key]
    n = 45
    values = sample(key, n, rng, nulls)
    rows = list(range(n))
    schema = fa.Schema([fa.Field("c", fa_type, nulls, {"k": "v"}), fa.Field("row", fa.int64())],
                       {"origin": "flowgate"})
    pa_schema = pa.schema([pa.field("c", pa_type, nullable=nulls, metadata={"k": "v"}),
                           pa.field("row", pa.int64())], metadata={"origin": "flowgate"})
    batch = fa.batch_from_pydict(schema, {"c": values, "row": rows})
    keep = [rng.random() < 0.5 for _ in range(n)]
    indices = [rng.randrange(n) for _ in range(30)] + [0, n - 1]
    cases = [  # (batch to write, expected Python values of `c` and `row`)
        (batch, values, rows),
        (fa.batch_from_pydict(schema, {"c": [], "row": []}), [], []),
        (batch.slice(3, 10), values[3:13], rows[3:13]),
        (batch.slice(13, 20), values[13:33], rows[13:33]),
        (batch.slice(16, 9), values[16:25], rows[16:25]),  # byte-aligned, zero-copy bitmaps
        (batch.slice(40), values[40:], rows[40:]),
        (batch.slice(7, 0), [], []),
        (batch.slice(3, 30).slice(13, 11), values[16:27], rows[16:27]),
        (batch.filter(keep), [v for v, k in zip(values, keep) if k],
         [r for r, k in zip(rows, keep) if k]),
        (batch.filter(bytes(n)), [], []),
        (batch.take(indices), [values[i] for i in indices], indices),
        (batch.take([]), [], []),
        (batch.slice(5, 30).filter(keep[5:35]),
         [v for v, k in zip(values[5:35], keep[5:35]) if k],
         [r for r, k in zip(rows[5:35], keep[5:35]) if k]),
        (batch.slice(13, 25).take([24, 0, 3, 3]),
         [values[13 + i] for i in (24, 0, 3, 3)], [13 + i for i in (24, 0, 3, 3)]),
        (batch.filter(keep).slice(3), [v for v, k in zip(values, keep) if k][3:],
         [r for r, k in zip(rows, keep) if k][3:]),
    ]
    got_schema, got = pa_read(fa.write_stream(schema, [b for b, _, _ in cases]))
    assert got_schema.equals(pa_schema, check_metadata=True)
    assert len(got) == len(cases)
    for (_, expected_values, expected_rows), rb in zip(cases, got):
        expected = pa.record_batch([pa_array(key, expected_values),
                                    pa.array(expected_rows, pa.int64())], schema=pa_schema)
        assert rb.equals(expected), (rb.to_pydict(), expected.to_pydict())

    # and the SDK reads its own output back identically
    _, ours = fa.read_stream(fa.write_stream(schema, [b for b, _, _ in cases]))
    for (_, expected_values, expected_rows), b in zip(cases, ours):
        assert b.column("c").to_pylist() == expected_values
        assert b.column("row").to_pylist() == expected_rows


@EACH_TYPE
def test_roundtrip_pyarrow_to_sdk_to_pyarrow(key):
    rng = random.Random(key + "roundtrip")
    pa_schema = pa.schema([pa.field("c", TYPES[key][1], metadata={"a": "1"})])
    batches = [pa.record_batch([pa_array(key, sample(key, n, rng, nulls))], schema=pa_schema)
               for n, nulls in [(33, True), (0, True), (17, False)]]
    schema, got = fa.read_stream(pa_stream(batches, pa_schema))
    back_schema, back = pa_read(fa.write_stream(schema, got))
    assert back_schema.equals(pa_schema, check_metadata=True)
    assert all(b.equals(e) for b, e in zip(back, batches)) and len(back) == 3


def test_write_schema_only():
    schema = fa.Schema([fa.Field("sym", fa.utf8(), False, {"x": "y"}),
                        fa.Field("ts", fa.timestamp("ms", "Europe/Paris")),
                        fa.Field("d", fa.date64())], {"k": "v"})
    data = fa.write_schema(schema)
    reader = pa.ipc.open_stream(data)
    assert reader.schema.equals(pa.schema(
        [pa.field("sym", pa.string(), nullable=False, metadata={"x": "y"}),
         pa.field("ts", pa.timestamp("ms", tz="Europe/Paris")),
         pa.field("d", pa.date64())], metadata={"k": "v"}), check_metadata=True)
    assert reader.read_all().num_rows == 0
    assert fa.read_stream(data) == (schema, [])
    assert data.endswith(b"\xff\xff\xff\xff\x00\x00\x00\x00")


def _messages(data):
    """(metadata bytes, body size) per message of a current-format stream."""
    pos, out = 0, []
    while True:
        marker, size = struct.unpack_from("<Ii", data, pos)
        assert marker == 0xFFFFFFFF and size % 8 == 0 and pos % 8 == 0
        if size == 0:
            assert pos + 8 == len(data)
            return out
        message = pa.ipc.read_message(pa.py_buffer(data[pos:]))
        assert message.metadata_version == pa.ipc.MetadataVersion.V5
        assert message.body.size % 8 == 0
        out.append((message.type, data[pos + 8:pos + 8 + size], message.body.size))
        pos += 8 + size + message.body.size


@pytest.mark.parametrize("name", ["s", "ab", "abc", "abcd", "abcde", "abcdef", "abcdefg"])
def test_written_framing_is_current_ipc_format(name):
    schema = fa.Schema([fa.Field(name, fa.utf8()), fa.Field("b", fa.bool_()),
                        fa.Field("x", fa.int16())])
    batch = fa.batch_from_pydict(schema, {name: ["abc", None, "de"], "b": [True, None, False],
                                          "x": [1, 2, 3]})
    data = fa.write_stream(schema, [batch, batch.slice(1)])
    assert [kind for kind, _, _ in _messages(data)] == ["schema", "record batch", "record batch"]
    assert [kind for kind, _, _ in _messages(fa.write_schema(schema))] == ["schema"]


def test_written_flatbuffers_are_aligned():
    # pyarrow's verifier checks scalar alignment but not that of struct
    # vectors, which the flatbuffers specification also requires.
    schema = fa.Schema([fa.Field("xyz", fa.utf8()), fa.Field("b", fa.bool_())])
    batch = fa.batch_from_pydict(schema, {"xyz": ["a"], "b": [None]})
    for _, meta, _ in _messages(fa.write_stream(schema, [batch]))[1:]:
        message = fa._Table(meta, struct.unpack_from("<I", meta)[0])
        assert message._at(3) % 8 == 0  # bodyLength: long
        record_batch = message.table(2)
        assert record_batch._at(0) % 8 == 0  # length: long
        # nodes (one per column) and buffers (3 for utf8, 2 for bool): 16-byte structs
        for slot, expected_count in ((1, 2), (2, 3 + 2)):
            start, count = record_batch.vector(slot)
            assert start % 8 == 0 and count == expected_count


def test_validity_written_only_with_nulls():
    schema = fa.Schema([fa.Field("x", fa.int64())])
    with_nulls = fa.batch_from_pydict(schema, {"x": [1, None, 3]})
    data = fa.write_stream(schema, [with_nulls, with_nulls.slice(2)])
    messages = pa.ipc.MessageReader.open_stream(data)
    messages.read_next_message()  # schema
    first, second = messages.read_next_message(), messages.read_next_message()
    assert first.body.size == 8 + 24  # bitmap (padded) + values
    assert second.body.size == 8  # no bitmap: the slice has no nulls


# --------------------------------------------------------------------------
# Refused input
# --------------------------------------------------------------------------

def _float16_array():  # pyarrow builds float16 only from numpy, so use raw buffers
    return pa.Array.from_buffers(pa.float16(), 2, [None, pa.py_buffer(struct.pack("<2e", 1, 2))])


REFUSED = [
    ("tags", pa.array([[1, 2], None]), "List"),
    ("big", pa.array(["a", "b"], pa.large_string()), "LargeUtf8"),
    ("blob", pa.array([b"a", b"b"], pa.large_binary()), "LargeBinary"),
    ("st", pa.array([{"a": 1}, {"a": 2}]), "Struct"),
    ("dec", pa.array([1, 2], pa.decimal128(10, 2)), "Decimal"),
    ("half", _float16_array(), "Float16"),
    ("t", pa.array([1, 2], pa.time32("s")), "Time"),
    ("dur", pa.array([1, 2], pa.duration("s")), "Duration"),
    ("nothing", pa.array([None, None]), "Null"),
    ("fixed", pa.array([b"ab", b"cd"], pa.binary(2)), "FixedSizeBinary"),
]


@pytest.mark.parametrize("name,array,arrow_name", REFUSED, ids=[r[2] for r in REFUSED])
def test_unsupported_types_are_refused(name, array, arrow_name):
    pa_schema = pa.schema([pa.field("ok", pa.int64()), pa.field(name, array.type)])
    data = pa_stream([pa.record_batch([pa.array([1, 2]), array], schema=pa_schema)], pa_schema)
    with pytest.raises(ValueError) as info:
        fa.read_stream(data)
    message = str(info.value)
    assert f"column `{name}`" in message
    assert f"Arrow type {arrow_name} is not supported by the Python SDK" in message
    assert "flat schemas of ints, floats, bool, utf8, binary, timestamp and date columns" in message


def test_dictionary_column_is_refused():
    array = pa.array(["a", "b", "a"]).dictionary_encode()
    pa_schema = pa.schema([pa.field("sym", array.type)])
    data = pa_stream([pa.record_batch([array], schema=pa_schema)], pa_schema)
    with pytest.raises(ValueError, match=r"column `sym`: dictionary-encoded columns are not "
                                         r"supported by the Python SDK"):
        fa.read_stream(data)


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_compressed_stream_is_refused(codec):
    if not pa.Codec.is_available(codec):
        pytest.skip(f"pyarrow built without {codec}")
    pa_schema = pa.schema([pa.field("x", pa.int64())])
    batch = pa.record_batch([pa.array(range(1000))], schema=pa_schema)
    data = pa_stream([batch], pa_schema, compression=codec)
    with pytest.raises(ValueError, match="compressed record batches .* not supported"):
        fa.read_stream(data)


def _sample_stream():
    schema = fa.Schema([fa.Field("s", fa.utf8()), fa.Field("x", fa.float64()),
                        fa.Field("b", fa.bool_())])
    batch = fa.batch_from_pydict(schema, {"s": ["abc", None, "de", "f"],
                                          "x": [1.0, 2.0, None, 4.0],
                                          "b": [True, False, None, True]})
    return fa.write_stream(schema, [batch, batch.slice(1)])


def test_truncated_streams_raise_value_error():
    data = _sample_stream()
    boundaries = set()
    pos = 0
    while pos < len(data):
        boundaries.add(pos)
        size = struct.unpack_from("<i", data, pos + 4)[0]
        if size == 0:
            break
        body = pa.ipc.read_message(pa.py_buffer(data[pos:])).body.size
        pos += 8 + size + body
    boundaries.discard(0)
    for cut in range(len(data)):
        if cut in boundaries:  # a whole number of messages is a valid stream
            schema, batches = fa.read_stream(data[:cut])
            assert schema.names == ["s", "x", "b"]
            continue
        with pytest.raises(ValueError, match="truncated|malformed"):
            fa.read_stream(data[:cut])


def test_corrupted_streams_raise_only_value_error():
    data = _sample_stream()
    rng = random.Random(7)
    for _ in range(3000):
        corrupt = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            corrupt[rng.randrange(len(corrupt))] = rng.getrandbits(8)
        try:
            fa.read_stream(bytes(corrupt))
        except ValueError:
            pass


def test_refused_stream_shapes():
    data = _sample_stream()
    with pytest.raises(ValueError, match="no Schema"):
        fa.read_stream(b"")
    first_batch = 8 + struct.unpack_from("<i", data, 4)[0]
    with pytest.raises(ValueError, match="first message is not a Schema"):
        fa.read_stream(data[first_batch:])
    with pytest.raises(ValueError, match="second Schema"):
        fa.read_stream(data[:first_batch] * 2)


# --------------------------------------------------------------------------
# Building batches and the Python-side API
# --------------------------------------------------------------------------

def test_types_and_schema_api():
    assert str(fa.timestamp("us", "UTC")) == "timestamp[us, tz=UTC]"
    assert str(fa.timestamp("ns")) == "timestamp[ns]"
    assert str(fa.int64()) == "int64" and fa.int64() == fa.int64()
    assert fa.float64().format == "d" and fa.utf8().format is None
    with pytest.raises(ValueError):
        fa.timestamp("minutes")
    with pytest.raises(ValueError):
        fa.DataType("list")
    schema = fa.Schema([fa.Field("a", fa.int8()), fa.Field("b", fa.utf8())])
    assert schema.names == ["a", "b"] and schema.index("b") == 1
    assert schema.field("a").type == fa.int8() and schema.field("a").nullable
    with pytest.raises(KeyError):
        schema.index("zzz")


def test_batch_from_pydict_errors_name_the_column():
    schema = fa.Schema([fa.Field("n", fa.int8()), fa.Field("s", fa.utf8(), nullable=False)])
    with pytest.raises(ValueError, match="column `n`"):
        fa.batch_from_pydict(schema, {"n": [1000], "s": ["a"]})
    with pytest.raises(ValueError, match="column `n`"):
        fa.batch_from_pydict(schema, {"n": [1.5], "s": ["a"]})
    with pytest.raises(ValueError, match="column `s`: expected str"):
        fa.batch_from_pydict(schema, {"n": [1], "s": [b"bytes"]})
    with pytest.raises(ValueError, match="column `s` is not nullable"):
        fa.batch_from_pydict(schema, {"n": [1], "s": [None]})
    with pytest.raises(ValueError, match="missing columns"):
        fa.batch_from_pydict(schema, {"n": [1]})
    with pytest.raises(ValueError, match="different lengths"):
        fa.batch_from_pydict(schema, {"n": [1, 2], "s": ["a"]})
    with pytest.raises(ValueError, match="column `b`: expected bytes"):
        fa.batch_from_pydict(fa.Schema([fa.Field("b", fa.binary())]), {"b": [3]})


def test_filter_take_slice_arguments():
    schema = fa.Schema([fa.Field("x", fa.int32()), fa.Field("s", fa.utf8())])
    batch = fa.batch_from_pydict(schema, {"x": [1, 2, None, 4], "s": ["a", "b", "c", None]})
    expected = [{"x": 1, "s": "a"}, {"x": None, "s": "c"}]
    assert batch.filter([True, False, 1, None]).to_pylist() == expected
    assert batch.filter(b"\x01\x00\x07\x00").to_pylist() == expected
    assert batch.filter(bytearray([1, 0, 1, 0])).to_pylist() == expected
    assert batch.filter([1, 1, 1, 1]) is batch
    assert batch.take(range(3, -1, -1)).column("x").to_pylist() == [4, None, 2, 1]
    assert batch.slice(2).to_pydict() == {"x": [None, 4], "s": ["c", None]}
    assert batch.slice(1, 100).num_rows == 3
    with pytest.raises(ValueError):
        batch.filter([True])
    with pytest.raises(IndexError):
        batch.take([4])
    with pytest.raises(IndexError):
        batch.take([-1])
    with pytest.raises(IndexError):
        batch.slice(5)
    with pytest.raises(IndexError):
        batch.column("x").get(4)
    out = batch.filter([0, 1, 1, 1])
    assert out.column("x").values.format == "i" and out.column("x").null_count == 1


def test_bool_column_bitmaps_at_odd_offsets():
    values = [i % 3 == 0 if i % 5 else None for i in range(50)]
    schema = fa.Schema([fa.Field("b", fa.bool_())])
    batch = fa.batch_from_pydict(schema, {"b": values})
    for offset in range(0, 20):
        part = batch.slice(offset, 23)
        assert part.column("b").to_pylist() == values[offset:offset + 23]
        _, [rb] = pa_read(fa.write_stream(schema, [part]))
        assert rb.column(0).to_pylist() == values[offset:offset + 23]


# --------------------------------------------------------------------------
# Timing: python tests/test_arrow.py
# --------------------------------------------------------------------------

def _timing(rows=16_384, repeats=50):
    rng = random.Random(1)
    symbols = ["AAPL", "MSFT", "GOOG", "AMZN", "NVDA", "META", "TSLA", "BRK.B"]
    schema = fa.Schema([fa.Field("symbol", fa.utf8()), fa.Field("price", fa.float64()),
                        fa.Field("volume", fa.int64()), fa.Field("ts", fa.timestamp("us", "UTC"))])
    batch = fa.batch_from_pydict(schema, {
        "symbol": [rng.choice(symbols) for _ in range(rows)],
        "price": [rng.uniform(0, 200) for _ in range(rows)],
        "volume": [rng.randrange(1, 10_000) for _ in range(rows)],
        "ts": [1731421801123457 + 1000 * i for i in range(rows)],
    })
    data = fa.write_stream(schema, [batch])
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        in_schema, batches = fa.read_stream(data)
        out = [b.filter(bytes(map(gt, b.column("price").values, repeat(100.0))))
               for b in batches]
        result = fa.write_stream(in_schema, out)
    cpu = time.process_time() - start_cpu
    wall = time.perf_counter() - start
    kept = pa.ipc.open_stream(result).read_all().num_rows
    print(f"read -> filter(price > 100, kept {kept}/{rows}) -> write, {rows}-row batches: "
          f"{rows * repeats / cpu:,.0f} rows/s of CPU time "
          f"({rows * repeats / wall:,.0f} rows/s wall clock)")


if __name__ == "__main__":
    _timing()

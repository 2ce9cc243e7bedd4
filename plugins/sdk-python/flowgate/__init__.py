"""The Flowgate plugin SDK for Python: the Rust SDK's shape over `flowgate.arrow`.

A plugin module defines ``plugin = define_plugin(...)``; ``python -m flowgate.build`` makes it a
WebAssembly component of the ``flowgate:plugin`` world (componentize-py: CPython compiled to
WebAssembly), the contract the Rust plugins implement. The same module runs under the machine's
Python for unit tests (`flowgate.testing`).

Columns stay columnar and exact (`flowgate.arrow`: typed memoryviews, µs timestamps as ints),
and the standard library is all there is: CPython inside WebAssembly has no C extensions, so no
pyarrow or numpy. The fast paths are the C-level ones: ``map``, ``itertools.compress``,
``bytes.count``, and the mask helpers below.
"""

import json
import struct
import sys
from itertools import repeat
from operator import ge, gt, le, lt

from . import arrow
from .arrow import (
    Batch,
    Column,
    DataType,
    Field,
    Schema,
    batch_from_pydict,
    binary,
    bool_,
    date32,
    date64,
    float32,
    float64,
    int8,
    int16,
    int32,
    int64,
    timestamp,
    uint8,
    uint16,
    uint32,
    uint64,
    utf8,
)

__all__ = [
    "PluginError", "InvalidConfig", "BadInput", "Internal",
    "log", "config", "parse_config", "require_column",
    "Output", "define_plugin", "Plugin",
    "valid_mask", "null_rows", "mask_and", "compare",
    "Batch", "Column", "DataType", "Field", "Schema", "batch_from_pydict",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float32", "float64", "bool_", "utf8", "binary", "timestamp", "date32", "date64",
]

# ---------------------------------------------------------------------------------------------
# Errors: the WIT contract's three variants.


class PluginError(Exception):
    """An error the host acts on: ``invalid-config``, ``bad-input`` or ``internal``
    (see wit/flowgate.wit). Raise one of the subclasses."""

    tag = "internal"

    def __init__(self, message):
        super().__init__(message)
        self.message = str(message)


class InvalidConfig(PluginError):
    """The step's ``config:`` (or its input schema) is wrong; ``key`` names it, as ``rules.min``
    (the host points at that key's line in the pipeline file)."""

    tag = "invalid-config"

    def __init__(self, key, message):
        super().__init__(f"`{key}`: {message}" if key else message)


class BadInput(PluginError):
    """A batch (or a restored state) cannot be processed as a whole."""

    tag = "bad-input"


class Internal(PluginError):
    """A bug or a broken invariant in the plugin: the host stops the step."""

    tag = "internal"


# ---------------------------------------------------------------------------------------------
# Logging: the host's `log` import inside WebAssembly, stderr under the machine's Python.

_LEVELS = ("trace", "debug", "info", "warn", "error")
_host_log = None


def _set_host_log(fn):
    """Wires the host's logger (the component's generated entry module calls it)."""
    global _host_log
    _host_log = fn


class _Log:
    """Log lines the host attributes to the calling step: ``log.info("...")``."""

    def _write(self, level, message):
        if _host_log is not None:
            _host_log(level, str(message))
        elif _LEVELS.index(level) >= 2:
            print(f"[{level}] {message}", file=sys.stderr)

    def trace(self, message):
        self._write("trace", message)

    def debug(self, message):
        self._write("debug", message)

    def info(self, message):
        self._write("info", message)

    def warn(self, message):
        self._write("warn", message)

    def error(self, message):
        self._write("error", message)


log = _Log()

# ---------------------------------------------------------------------------------------------
# Config: the step's `config:` block, with unknown keys refused.

_MISSING = object()


def _describe(value):
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a map"
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, (int, float)):
        return f"number {json.dumps(value)}"
    return f"string {json.dumps(value)}"


class _Want:
    __slots__ = ("kind", "test", "default", "spec")

    def __init__(self, kind, test, default, spec=None):
        self.kind, self.test, self.default, self.spec = kind, test, default, spec


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


class config:
    """Types for a config spec: ``{"column": config.string(), "min": config.number(default=0)}``.
    A key without a default must be given."""

    @staticmethod
    def string(default=_MISSING):
        return _Want("a string", lambda v: isinstance(v, str), default)

    @staticmethod
    def number(default=_MISSING):
        return _Want("a number", _is_number, default)

    @staticmethod
    def integer(default=_MISSING):
        return _Want("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool), default)

    @staticmethod
    def boolean(default=_MISSING):
        return _Want("true or false", lambda v: isinstance(v, bool), default)

    @staticmethod
    def strings(default=_MISSING):
        return _Want(
            "a list of strings",
            lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
            default,
        )

    @staticmethod
    def map(spec, default=_MISSING):
        """A nested map with its own spec."""
        return _Want("a map", lambda v: isinstance(v, dict), default, spec)


def parse_config(text, spec, prefix=""):
    """Parses the step's config (JSON text, or an already parsed dict) against ``spec``.

    Errors are `InvalidConfig` naming the key (``min``, ``rules.max``), in the words the Rust
    SDK uses, so the host points at its line. Returns a dict with every key of the spec.
    """
    if isinstance(text, (str, bytes)):
        try:
            value = json.loads(text) if text.strip() else {}
        except ValueError as e:
            raise InvalidConfig("", f"the config is not JSON: {e}") from None
    else:
        value = text
    where = prefix.rstrip(".")
    if not isinstance(value, dict):
        raise InvalidConfig(where, f"expected a map, got {_describe(value)}")
    for key in value:
        if key not in spec:
            expected = ", ".join(f"`{k}`" for k in spec)
            raise InvalidConfig(where, f"unknown field `{key}`, expected one of {expected}")
    out = {}
    for key, want in spec.items():
        path = prefix + key
        if key not in value:
            if want.default is _MISSING:
                raise InvalidConfig(path, f"missing field `{key}`")
            out[key] = want.default
            continue
        v = value[key]
        if not want.test(v):
            raise InvalidConfig(path, f"expected {want.kind}, got {_describe(v)}")
        out[key] = parse_config(v, want.spec, path + ".") if want.spec is not None else v
    return out


# ---------------------------------------------------------------------------------------------
# Columns.

_COLUMN_TYPES = {
    "float64": lambda t: t.name == "float64",
    "float32": lambda t: t.name == "float32",
    "int64": lambda t: t.name == "int64",
    "int32": lambda t: t.name == "int32",
    "utf8": lambda t: t.name == "utf8",
    "binary": lambda t: t.name == "binary",
    "bool": lambda t: t.name == "bool",
    "timestamp": lambda t: t.name == "timestamp" and t.unit == "us",
    "date": lambda t: t.name in ("date32", "date64"),
}


def require_column(schema, name, type, key):
    """The index of column ``name`` in ``schema``, checked to be of ``type`` (``float64``,
    ``int64``, ``utf8``, ``bool``, ``timestamp`` (µs), ``date``, ...): for ``create``, where a
    wrong column is the config's fault. ``key`` is the config key that named it."""
    names = schema.names
    if name not in names:
        raise InvalidConfig(key, f"the input has no column `{name}` (it has: {', '.join(names)})")
    test = _COLUMN_TYPES.get(type)
    if test is None:
        raise Internal(f"require_column: `{type}` is not a type it knows")
    index = schema.index(name)
    actual = schema.fields[index].type
    if not test(actual):
        raise InvalidConfig(key, f"column `{name}` is {actual}, expected {type}")
    return index


def valid_mask(column):
    """One byte per row, 1 where ``column`` has a value and 0 where it is null; None when it has
    no nulls. Made at C speed from the validity bitmap."""
    if column.validity is None:
        return None
    return arrow._unpack_bits(column.validity, column.length)


def null_rows(column):
    """The indices of ``column``'s null rows, in order (an empty list when there are none)."""
    mask = valid_mask(column)
    if mask is None:
        return []
    out, at = [], mask.find(0)
    while at >= 0:
        out.append(at)
        at = mask.find(0, at + 1)
    return out


def mask_and(a, b):
    """Row by row AND of two masks (bytes of 0/1, or None for all ones)."""
    if a is None:
        return b
    if b is None:
        return a
    n = len(a)
    if len(b) != n:
        raise ValueError(f"masks of {n} and {len(b)} rows")
    return (int.from_bytes(a, "little") & int.from_bytes(b, "little")).to_bytes(n, "little")


_COMPARE = {">=": ge, ">": gt, "<=": le, "<": lt}


def compare(column, op, value):
    """A mask (bytes, 1 = true) of ``column``'s values compared with ``value`` (``op`` one of
    ``>=``, ``>``, ``<=``, ``<``), at C speed; null rows are 0. For number, timestamp and date
    columns."""
    f = _COMPARE.get(op)
    if f is None:
        raise ValueError(f"compare: `{op}` is not one of >=, >, <=, <")
    if column.values is None or column.type.format is None:
        raise ValueError(f"compare: a {column.type} column has no numbers to compare")
    mask = bytes(map(f, column.values, repeat(value)))
    return mask_and(mask, valid_mask(column))


# ---------------------------------------------------------------------------------------------
# Output.


class Output:
    """What a call produced: batches, and input rows refused with a reason (the dead letter)."""

    __slots__ = ("batches", "rejected")

    def __init__(self, *batches):
        self.batches = []
        self.rejected = []
        for b in batches:
            self.push(b)

    def push(self, batch):
        """Adds a batch with the plugin's declared output schema; returns the output."""
        if not isinstance(batch, Batch):
            raise Internal(f"Output.push takes a flowgate Batch, not {type(batch).__name__}")
        if batch.num_rows > 0:
            self.batches.append(batch)
        return self

    def reject(self, row, reason):
        """Refuses input row ``row`` (its index in the batch given to ``process``). The row also
        leaves every output batch made of the input's own rows, so it is never in both the
        output and the dead letter: the input itself, or a batch with as many rows sharing one
        of its columns (the input with a computed column added). A batch the plugin filtered or
        built is left as it is: leave the rejected rows out of it yourself."""
        self.rejected.append((row, str(reason)))
        return self

    @property
    def num_rows(self):
        return sum(b.num_rows for b in self.batches)


def _settle(output, batch):
    if not output.rejected:
        return output
    rows = batch.num_rows
    refused = bytearray(b"\1") * rows
    for row, _ in output.rejected:
        if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < rows:
            raise Internal(
                f"rejected row {row!r} of a batch of {rows} rows "
                "(rows count from 0 in the batch given to `process`)"
            )
        refused[row] = 0
    own = {id(c) for c in batch.columns}

    def aligned(b):
        return b is batch or (b.num_rows == rows and any(id(c) in own for c in b.columns))

    keep = bytes(refused)
    output.batches = [b.filter(keep) if aligned(b) else b for b in output.batches]
    output.batches = [b for b in output.batches if b.num_rows > 0]
    return output


# ---------------------------------------------------------------------------------------------
# State bytes as every Flowgate SDK frames them: `FGS1`, the state version (u32, little endian),
# then the plugin's own bytes; so a state moves between the Rust, JavaScript and Python builds of
# a plugin (a live swap) when their bytes agree, and is refused by version when they do not.

_STATE_MAGIC = b"FGS1"


def _frame(version, body):
    return _STATE_MAGIC + struct.pack("<I", version) + bytes(body)


def _unframe(name, data):
    data = bytes(data)
    if len(data) < 8:
        raise BadInput(f"`{name}`: snapshot is {len(data)} bytes, too short for its header")
    if data[:4] != _STATE_MAGIC:
        raise BadInput(f"`{name}`: these bytes are not a Flowgate snapshot")
    return struct.unpack_from("<I", data, 4)[0], data[8:]


# ---------------------------------------------------------------------------------------------
# The plugin: what the component exports.


class _Step:
    """One step's instance: the plugin's own step object behind the contract's calls, on IPC
    bytes. Raises `PluginError` (the WIT errors) and anything the plugin raised."""

    def __init__(self, plugin, step, schema):
        self.plugin, self.step, self.schema = plugin, step, schema

    def _encode(self, output):
        batches = output.batches
        for b in batches:
            if b.schema.fields != self.schema.fields:
                raise Internal(
                    f"an output batch has the schema {b.schema!r}, but `create` declared {self.schema!r}"
                )
        data = arrow.write_stream(self.schema, batches) if batches else b""
        return data, output.rejected

    def process(self, data):
        """IPC stream bytes in; (IPC stream bytes, [(row, reason)]) out."""
        try:
            _, batches = arrow.read_stream(data)
        except ValueError as e:
            raise BadInput(f"the batch cannot be read: {e}") from None
        merged = Output()
        base = 0
        for batch in batches:
            if batch.num_rows == 0:
                continue
            out = self.step.process(batch)
            if not isinstance(out, Output):
                raise Internal(f"`process` must return an Output, not {type(out).__name__}")
            _settle(out, batch)
            merged.batches.extend(out.batches)
            merged.rejected.extend((row + base, reason) for row, reason in out.rejected)
            base += batch.num_rows
        return self._encode(merged)

    def on_watermark(self, ts_ms):
        handler = getattr(self.step, "on_watermark", None)
        out = handler(ts_ms) if handler is not None else Output()
        if not isinstance(out, Output):
            raise Internal(f"`on_watermark` must return an Output, not {type(out).__name__}")
        if out.rejected:
            raise Internal("`on_watermark` has no input rows to reject")
        return self._encode(out)

    def snapshot(self):
        handler = getattr(self.step, "snapshot", None)
        body = handler() if handler is not None else b""
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise Internal(f"`snapshot` must return bytes, not {type(body).__name__}")
        return _frame(self.plugin.state_version, body)

    def restore(self, state):
        name = self.plugin.name
        version, body = _unframe(name, state)
        handler = getattr(self.step, "restore", None)
        if handler is not None:
            handler(version, body)
        elif version != self.plugin.state_version:
            raise BadInput(f"`{name}` reads state version {self.plugin.state_version}, got {version}")
        elif body:
            raise BadInput(f"`{name}` keeps no state but was given {len(body)} bytes")


class Plugin:
    """A plugin, as `define_plugin` returns it: ``info()`` and ``create(config_json,
    schema_bytes)`` over the contract's bytes (what the component exports)."""

    def __init__(self, name, create, version="0.1.0", state_version=0, config=None):
        if not isinstance(name, str) or not name:
            raise TypeError("define_plugin needs a `name`")
        if not callable(create):
            raise TypeError("define_plugin needs a `create` function")
        if not isinstance(state_version, int) or not 0 <= state_version < 2**32:
            raise TypeError("`state_version` is a u32")
        self.name, self.version, self.state_version = name, version, state_version
        self.spec, self._create = config, create

    def info(self):
        return {"name": self.name, "version": self.version, "state_version": self.state_version}

    def create(self, config_text, schema_bytes):
        """Returns (step, output schema IPC bytes)."""
        try:
            input_schema, _ = arrow.read_stream(schema_bytes)
        except ValueError as e:
            raise InvalidConfig("", f"the input schema cannot be read: {e}") from None
        if self.spec is not None:
            parsed = parse_config(config_text, self.spec)
        else:
            parsed = json.loads(config_text) if config_text.strip() else {}
        made = self._create(parsed, input_schema)
        if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], Schema)):
            raise Internal("`create` must return (step, schema) with a flowgate Schema")
        step, schema = made
        if not callable(getattr(step, "process", None)):
            raise Internal("the step `create` returned has no `process` method")
        return _Step(self, step, schema), arrow.write_schema(schema)


def define_plugin(name, create, version="0.1.0", state_version=0, config=None):
    """Defines a plugin; assign it to a module-level name (``plugin = define_plugin(...)``).

    - ``name``, ``version``, ``state_version`` (0: stateless);
    - ``config``: a spec for `parse_config` (unknown keys are refused), or None for the raw dict;
    - ``create(config, input_schema)`` returns ``(step, schema)``: the step object and the output
      schema (``input_schema`` itself to keep the columns).

    The step object has ``process(batch) -> Output`` and may have ``on_watermark(ts_ms) ->
    Output``, ``snapshot() -> bytes`` and ``restore(version, data)`` (the SDK frames the bytes
    with the state version, as the Rust SDK does; ``restore`` gets the version they were written
    at).
    """
    return Plugin(name, create, version, state_version, config)

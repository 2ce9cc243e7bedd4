"""Unit-test helpers for Python plugins, run with the machine's Python (``python -m pytest``): a
step is created and called through the same exports, and the same Arrow IPC bytes, as the
Flowgate host uses."""

import json

from . import arrow
from .arrow import Field, Schema, batch_from_pydict

__all__ = ["instantiate", "schema_of", "make_batch", "rows"]

_TYPES = {
    "utf8": arrow.utf8,
    "string": arrow.utf8,
    "float64": arrow.float64,
    "int64": arrow.int64,
    "int32": arrow.int32,
    "bool": arrow.bool_,
    "boolean": arrow.bool_,
    "binary": arrow.binary,
    "date": arrow.date32,
    # As the host decodes a pipeline's `timestamp` column: microseconds, UTC.
    "timestamp": lambda: arrow.timestamp("us", "UTC"),
}


def schema_of(columns):
    """A schema from a pipeline-style dict: ``schema_of({"symbol": "utf8", "close": "float64",
    "ts": "timestamp"})``."""
    fields = []
    for name, type in columns.items():
        make = _TYPES.get(type)
        if make is None:
            raise ValueError(f"schema_of: unknown type `{type}` for `{name}` (known: {', '.join(_TYPES)})")
        fields.append(Field(name, make(), True))
    return Schema(fields)


def make_batch(schema, columns):
    """A batch of ``schema`` from ``{column: [values, None for null]}`` (timestamps as µs ints)."""
    return batch_from_pydict(schema, columns)


def rows(batches):
    """The rows of batches as dicts (timestamps as µs ints)."""
    if isinstance(batches, arrow.Batch):
        batches = [batches]
    return [row for b in batches for row in b.to_pylist()]


class Result:
    """What a call returned: ``batches`` (decoded from the IPC bytes) and ``rejected`` as
    ``[(row, reason)]``."""

    def __init__(self, data, rejected):
        self.batches = arrow.read_stream(data)[1] if data else []
        self.rejected = list(rejected)

    @property
    def rows(self):
        return rows(self.batches)


class Step:
    def __init__(self, step, output_schema):
        self._step = step
        self.output_schema = output_schema

    def process(self, batch):
        """Processes a batch (see `make_batch`); returns a `Result`."""
        return Result(*self._step.process(arrow.write_stream(batch.schema, [batch])))

    def on_watermark(self, ts_ms):
        return Result(*self._step.on_watermark(ts_ms))

    def snapshot(self):
        return self._step.snapshot()

    def restore(self, state):
        self._step.restore(state)


def instantiate(plugin, config, schema):
    """Creates a step of ``plugin`` (what `define_plugin` returned) with ``config`` (a dict, as
    the pipeline's ``config:`` block) and the input ``schema``, as the host would. Errors raise
    as in the component: `flowgate.PluginError`s (``e.tag`` is ``invalid-config``, ``bad-input``
    or ``internal``), and whatever else the plugin raised."""
    step, schema_bytes = plugin.create(json.dumps(config or {}), arrow.write_schema(schema))
    return Step(step, arrow.read_stream(schema_bytes)[0])

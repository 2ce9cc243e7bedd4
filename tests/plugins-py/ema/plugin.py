"""`ema` in Python: the Rust test plugin tests/plugins/ema, line for line (see its docs). The
languages must give the same rows and the same state bytes."""

import struct

from flowgate import (
    BadInput,
    Column,
    Field,
    InvalidConfig,
    Output,
    Schema,
    Batch,
    config,
    define_plugin,
    float64,
    require_column,
)


class Ema:
    def __init__(self, key, column, alpha, schema):
        self.key, self.column, self.alpha, self.schema = key, column, alpha, schema
        self.averages = {}

    def process(self, batch):
        keys = batch.column(self.key).to_pylist()
        values = batch.column(self.column).to_pylist()
        alpha, averages = self.alpha, self.averages
        ema = []
        for key, x in zip(keys, values):
            if key is None or x is None:
                ema.append(None)
                continue
            previous = averages.get(key)
            average = x if previous is None else alpha * x + (1 - alpha) * previous
            averages[key] = average
            ema.append(average)
        columns = [*batch.columns, Column.from_pylist(float64(), ema)]
        return Output(Batch(self.schema, columns, batch.num_rows))

    def snapshot(self):
        entries = sorted((k.encode(), v) for k, v in self.averages.items())
        parts = [struct.pack("<I", len(entries))]
        for k, v in entries:
            parts.append(struct.pack("<I", len(k)) + k + struct.pack("<d", v))
        return b"".join(parts)

    def restore(self, version, state):
        if version != 1:
            raise BadInput(f"`ema` reads state version 1, got {version}")

        def need(at, n):
            if at + n > len(state):
                raise BadInput("`ema`: the state is truncated")

        need(0, 4)
        (count,) = struct.unpack_from("<I", state, 0)
        at, averages = 4, {}
        for _ in range(count):
            need(at, 4)
            (n,) = struct.unpack_from("<I", state, at)
            need(at + 4, n + 8)
            key = state[at + 4 : at + 4 + n].decode()
            (averages[key],) = struct.unpack_from("<d", state, at + 4 + n)
            at += 4 + n + 8
        if at != len(state):
            raise BadInput(f"`ema`: {len(state) - at} bytes after the last key")
        self.averages = averages


def create(cfg, schema):
    require_column(schema, cfg["key"], "utf8", "key")
    require_column(schema, cfg["column"], "float64", "column")
    if not 0 < cfg["alpha"] <= 1:
        raise InvalidConfig("alpha", "must be in (0, 1]")
    out = Schema([*schema.fields, Field("ema", float64(), True)])
    return Ema(cfg["key"], cfg["column"], cfg["alpha"], out), out


plugin = define_plugin(
    name="ema",
    state_version=1,
    config={"key": config.string(), "column": config.string(), "alpha": config.number()},
    create=create,
)

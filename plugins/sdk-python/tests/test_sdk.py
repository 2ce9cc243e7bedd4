"""The Python SDK with the machine's Python: config, masks, rejected rows, state framing, the
errors a plugin author meets, and the EMA test plugin against a plain computation."""

import importlib.util
import struct
import sys
from pathlib import Path

import pytest

import flowgate
from flowgate import (
    BadInput,
    Batch,
    Column,
    Internal,
    InvalidConfig,
    Output,
    PluginError,
    compare,
    config,
    define_plugin,
    float64,
    mask_and,
    null_rows,
    parse_config,
    require_column,
    valid_mask,
)
from flowgate.testing import instantiate, make_batch, rows, schema_of

REPO = Path(__file__).resolve().parents[3]


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(text, spec, pattern):
    with pytest.raises(InvalidConfig, match=pattern) as e:
        parse_config(text, spec)
    assert e.value.tag == "invalid-config"


def test_config_keys_are_checked_defaults_filled_unknown_keys_refused_by_name():
    spec = {
        "column": config.string(),
        "min": config.number(default=0),
        "rules": config.map({"max": config.integer()}),
    }
    assert parse_config('{"column":"price","rules":{"max":3}}', spec) == {
        "column": "price",
        "min": 0,
        "rules": {"max": 3},
    }
    refused('{"column":"price","minimum":1,"rules":{"max":3}}', spec,
            r"^unknown field `minimum`, expected one of `column`, `min`, `rules`$")
    refused('{"rules":{"max":3}}', spec, r"^`column`: missing field `column`$")
    refused('{"column":7,"rules":{"max":3}}', spec, r"^`column`: expected a string, got number 7$")
    refused('{"column":"p","rules":{"max":1.5}}', spec, r"^`rules.max`: expected an integer, got number 1.5$")
    refused('{"column":"p","rules":{"max":true}}', spec, r"^`rules.max`: expected an integer, got boolean true$")
    refused('{"column":"p","min":false,"rules":{"max":1}}', spec, r"^`min`: expected a number, got boolean false$")
    refused('{"column":"p","rules":[]}', spec, r"^`rules`: expected a map, got a list$")
    refused('{"column":"p","rules":{"mux":3}}', spec, r"^`rules`: unknown field `mux`, expected one of `max`$")
    refused("{not json", spec, r"^the config is not JSON")
    refused("[1]", spec, r"^expected a map, got a list$")
    assert parse_config("", {"n": config.integer(default=2)}) == {"n": 2}
    assert parse_config('{"s":["a","b"],"f":true}', {"s": config.strings(), "f": config.boolean()}) == {
        "s": ["a", "b"],
        "f": True,
    }


def test_require_column_names_the_key_and_the_column():
    schema = schema_of({"symbol": "utf8", "price": "float64", "ts": "timestamp"})
    assert require_column(schema, "price", "float64", "column") == 1
    assert require_column(schema, "ts", "timestamp", "time") == 2
    with pytest.raises(InvalidConfig, match=r"^`column`: the input has no column `prize` \(it has: symbol, price, ts\)$"):
        require_column(schema, "prize", "float64", "column")
    with pytest.raises(InvalidConfig, match=r"^`column`: column `symbol` is utf8, expected float64$"):
        require_column(schema, "symbol", "float64", "column")


def test_masks_are_one_byte_per_row_and_nulls_never_compare_true():
    schema = schema_of({"price": "float64"})
    batch = make_batch(schema, {"price": [5.0, None, 12.0, 10.0, None]})
    prices = batch.column("price")
    assert valid_mask(prices) == b"\1\0\1\1\0"
    assert null_rows(prices) == [1, 4]
    # A null's slot holds 0.0, which is <= 10: the mask must still say 0.
    assert compare(prices, ">=", 10) == b"\0\0\1\1\0"
    assert compare(prices, "<=", 10) == b"\1\0\0\1\0"
    assert compare(prices, "<", 10) == b"\1\0\0\0\0"
    assert compare(prices, ">", 10) == b"\0\0\1\0\0"
    assert mask_and(b"\1\1\0", b"\1\0\1") == b"\1\0\0"
    assert mask_and(None, b"\1\0") == b"\1\0"
    full = make_batch(schema, {"price": [1.0, 2.0]}).column("price")
    assert valid_mask(full) is None and null_rows(full) == []
    # A slice at an odd offset reads its own rows.
    sliced = batch.slice(1, 3).column("price")
    assert valid_mask(sliced) == b"\0\1\1" and null_rows(sliced) == [0]
    with pytest.raises(ValueError, match="`=>` is not one of"):
        compare(prices, "=>", 1)


def test_through_the_host_s_ipc_rejected_rows_leave_the_output_and_timestamps_stay_us():
    schema = schema_of({"symbol": "utf8", "price": "float64", "ts": "timestamp"})

    class Step:
        def process(self, batch):
            out = Output(batch)
            for row in null_rows(batch.column("price")):
                out.reject(row, "no price")
            return out

    plugin = define_plugin(name="t", create=lambda cfg, s: (Step(), s))
    step = instantiate(plugin, {}, schema)
    ts = [1_700_000_000_123_457, 1_700_000_000_123_458, 9_007_199_254_740_993]
    out = step.process(make_batch(schema, {"symbol": ["A", "B", "C"], "price": [1.5, None, 2.5], "ts": ts}))
    assert out.rows == [
        {"symbol": "A", "price": 1.5, "ts": ts[0]},
        {"symbol": "C", "price": 2.5, "ts": ts[2]},
    ]
    assert out.rejected == [(1, "no price")]
    assert step.output_schema.field("ts").type == flowgate.timestamp("us", "UTC")


def test_a_rejected_row_leaves_an_output_that_is_the_input_with_a_column_added_not_one_the_plugin_filtered():
    schema = schema_of({"x": "float64"})
    out_schema = flowgate.Schema([*schema.fields, flowgate.Field("y", float64(), True)])

    class Step:
        def process(self, batch):
            added = Batch(out_schema, [*batch.columns, Column.from_pylist(float64(), [0.0, 1.0, 2.0])])
            filtered = batch.filter(b"\1\1\0")
            return Output(added, Batch(out_schema, [*filtered.columns, Column.from_pylist(float64(), [7.0, 8.0])])).reject(
                0, "bad"
            )

    plugin = define_plugin(name="t", create=lambda cfg, s: (Step(), out_schema))
    out = instantiate(plugin, {}, schema).process(make_batch(schema, {"x": [10.0, 11.0, 12.0]}))
    assert out.rows == [
        {"x": 11.0, "y": 1.0},
        {"x": 12.0, "y": 2.0},
        {"x": 10.0, "y": 7.0},
        {"x": 11.0, "y": 8.0},
    ]


def test_a_rejected_row_past_the_batch_is_the_plugin_s_bug_named():
    schema = schema_of({"x": "float64"})

    class Step:
        def process(self, batch):
            return Output(batch).reject(3, "no")

    step = instantiate(define_plugin(name="t", create=lambda cfg, s: (Step(), s)), {}, schema)
    with pytest.raises(Internal, match=r"rejected row 3 of a batch of 1 rows"):
        step.process(make_batch(schema, {"x": [1.0]}))


def test_an_output_batch_of_another_schema_than_declared_is_refused():
    schema = schema_of({"x": "float64"})

    class Step:
        def process(self, batch):
            return Output(make_batch(schema_of({"z": "float64"}), {"z": [1.0]}))

    step = instantiate(define_plugin(name="t", create=lambda cfg, s: (Step(), s)), {}, schema)
    with pytest.raises(Internal, match="but `create` declared"):
        step.process(make_batch(schema, {"x": [1.0]}))


def test_state_is_framed_as_the_rust_sdk_frames_it_and_refused_when_it_is_not_a_state():
    class Step:
        state = b""

        def process(self, batch):
            return Output()

        def snapshot(self):
            return b"abc"

        def restore(self, version, data):
            self.state = (version, data)

    made = []

    def create(cfg, schema):
        made.append(Step())
        return made[-1], schema

    step = instantiate(define_plugin(name="keeper", state_version=7, create=create), {}, schema_of({"x": "float64"}))
    assert step.snapshot() == b"FGS1" + struct.pack("<I", 7) + b"abc"
    step.restore(b"FGS1" + struct.pack("<I", 6) + b"old")
    assert made[-1].state == (6, b"old")
    with pytest.raises(BadInput, match="^`keeper`: these bytes are not a Flowgate snapshot$"):
        step.restore(b"XXXX\0\0\0\0")
    with pytest.raises(BadInput, match="^`keeper`: snapshot is 3 bytes, too short for its header$"):
        step.restore(b"FGS")


def test_a_stateless_plugin_refuses_a_state_with_bytes_in_it_or_of_another_version():
    class Step:
        def process(self, batch):
            return Output()

    step = instantiate(define_plugin(name="none", create=lambda c, s: (Step(), s)), {}, schema_of({"x": "float64"}))
    assert step.snapshot() == b"FGS1\0\0\0\0"
    step.restore(b"FGS1\0\0\0\0")
    with pytest.raises(BadInput, match="^`none` keeps no state but was given 2 bytes$"):
        step.restore(b"FGS1\0\0\0\0ab")
    with pytest.raises(BadInput, match="^`none` reads state version 0, got 1$"):
        step.restore(b"FGS1\1\0\0\0")


def test_an_exception_that_is_not_a_plugin_error_goes_on_as_it_is():
    class Step:
        def process(self, batch):
            raise KeyError("boom")

    step = instantiate(define_plugin(name="t", create=lambda c, s: (Step(), s)), {}, schema_of({"x": "float64"}))
    with pytest.raises(KeyError, match="boom"):
        step.process(make_batch(schema_of({"x": "float64"}), {"x": [1.0]}))


def test_create_must_return_a_step_and_a_schema():
    plugin = define_plugin(name="t", create=lambda c, s: s)
    with pytest.raises(Internal, match=r"`create` must return \(step, schema\)"):
        instantiate(plugin, {}, schema_of({"x": "float64"}))
    with pytest.raises(TypeError, match="needs a `create` function"):
        define_plugin(name="t", create=None)


def test_the_scaffold_s_filter_keeps_rejects_and_refuses_a_typo():
    template = _load(REPO / "plugins/sdk-python/template/src/plugin.py", "template_plugin")
    schema = schema_of({"symbol": "utf8", "price": "float64"})
    step = instantiate(template.plugin, {"column": "price", "min": 10}, schema)
    out = step.process(
        make_batch(schema, {"symbol": ["AAPL", "MSFT", "GOOG", "NVDA"], "price": [12.5, 3.25, None, 10.0]})
    )
    assert out.rows == [{"symbol": "AAPL", "price": 12.5}, {"symbol": "NVDA", "price": 10.0}]
    assert out.rejected == [(2, "the value is missing")]
    with pytest.raises(PluginError, match="unknown field `minimum`"):
        instantiate(template.plugin, {"column": "price", "minimum": 10}, schema)
    with pytest.raises(InvalidConfig, match="column `symbol` is utf8, expected float64"):
        instantiate(template.plugin, {"column": "symbol", "min": 10}, schema)


def test_the_ema_test_plugin_computes_each_key_s_average_and_its_state_round_trips():
    ema = _load(REPO / "tests/plugins-py/ema/plugin.py", "ema_plugin")
    schema = schema_of({"symbol": "utf8", "close": "float64"})
    cfg = {"key": "symbol", "column": "close", "alpha": 0.5}
    step = instantiate(ema.plugin, cfg, schema)
    out = step.process(make_batch(schema, {"symbol": ["b", "a", "b", None, "a"], "close": [2.0, 4.0, 4.0, 9.0, None]}))
    assert [r["ema"] for r in out.rows] == [2.0, 4.0, 3.0, None, None]
    state = step.snapshot()
    # FGS1, version 1, two keys in byte order: a → 4.0, b → 3.0.
    body = struct.pack("<I", 2) + struct.pack("<I", 1) + b"a" + struct.pack("<d", 4.0)
    body += struct.pack("<I", 1) + b"b" + struct.pack("<d", 3.0)
    assert state == b"FGS1" + struct.pack("<I", 1) + body
    again = instantiate(ema.plugin, cfg, schema)
    again.restore(state)
    assert rows(again.process(make_batch(schema, {"symbol": ["b"], "close": [5.0]})).batches)[0]["ema"] == 4.0
    with pytest.raises(BadInput, match="truncated"):
        again.restore(state[:-1])
    with pytest.raises(BadInput, match="1 bytes after the last key"):
        again.restore(state + b"x")
    with pytest.raises(InvalidConfig, match=r"^`alpha`: must be in \(0, 1\]$"):
        instantiate(ema.plugin, {**cfg, "alpha": 1.5}, schema)


def test_the_build_names_the_component_after_pyproject_s_name_on_python_3_10_too(tmp_path, monkeypatch):
    from flowgate import build

    project = tmp_path / "elsewhere"
    project.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "price-filter"\nversion = "0.1.0"\n')
    assert build._project_name(project) == "price_filter"
    monkeypatch.setitem(sys.modules, "tomllib", None)  # Python 3.10 has no tomllib
    assert build._project_name(project) == "price_filter"
    (project / "pyproject.toml").unlink()
    assert build._project_name(project) == "elsewhere"

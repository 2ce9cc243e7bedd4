"""The component's glue (`flowgate._component`) with the machine's Python, over the bindings
componentize-py generates for wit/flowgate.wit (the same modules the component imports): errors
cross as their WIT variants, anything else prints a traceback from the plugin's own frame on and
aborts (a trap inside WebAssembly)."""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


class Aborted(Exception):
    pass


@pytest.fixture(scope="module")
def component(tmp_path_factory):
    tool = shutil.which("componentize-py", path=os.path.dirname(sys.executable)) or shutil.which("componentize-py")
    if tool is None:
        pytest.skip("componentize-py is not installed (make venv installs it)")
    out = tmp_path_factory.mktemp("bindings")
    subprocess.run([tool, "-d", str(REPO / "wit"), "-w", "plugin", "bindings", str(out)], check=True)
    sys.path.insert(0, str(out))
    try:
        module = importlib.import_module("flowgate._component")
        yield module
    finally:
        sys.path.remove(str(out))
        for name in [n for n in sys.modules if n.startswith(("wit_world", "componentize_py", "flowgate._component"))]:
            del sys.modules[name]


@pytest.fixture
def aborts(monkeypatch, capsys):
    def abort():
        raise Aborted()

    monkeypatch.setattr(os, "abort", abort)
    return capsys


def test_plugin_errors_cross_as_their_variants_even_from_a_subclass_of_its_own(component, aborts):
    from componentize_py_types import Err
    from wit_world.imports import types

    import flowgate

    class Mine(flowgate.PluginError):
        tag = "not-a-tag"

    class NoSuper(flowgate.BadInput):
        def __init__(self, text):
            Exception.__init__(self, text)

    cases = [
        (flowgate.InvalidConfig("min", "must be > 0"), types.Error_InvalidConfig, "`min`: must be > 0"),
        (flowgate.BadInput("no"), types.Error_BadInput, "no"),
        (flowgate.Internal("bug"), types.Error_Internal, "bug"),
        (Mine("custom"), types.Error_Internal, "custom"),
        (NoSuper("plain"), types.Error_BadInput, "plain"),
    ]
    for error, variant, text in cases:
        def raise_it(error=error):
            raise error

        with pytest.raises(Err) as e:
            component._call(raise_it)
        assert type(e.value.value) is variant and e.value.value.value == text, e.value
    assert aborts.readouterr().err == ""


def test_any_other_exception_prints_its_traceback_from_the_plugin_s_frame_and_aborts(component, aborts, tmp_path):
    (tmp_path / "plugin_under_test.py").write_text(
        "from flowgate import Output, define_plugin\n"
        "class Step:\n"
        "    def process(self, batch):\n"
        "        raise TypeError('cannot price BOOM')\n"
        "plugin = define_plugin(name='t', create=lambda c, s: (Step(), s))\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        from plugin_under_test import plugin
    finally:
        sys.path.remove(str(tmp_path))
    from flowgate import arrow
    from flowgate.testing import make_batch, schema_of

    schema = schema_of({"x": "float64"})
    step, _ = plugin.create("{}", arrow.write_schema(schema))
    with pytest.raises(Aborted):
        component._call(step.process, arrow.write_stream(schema, [make_batch(schema, {"x": [1.0]})]))
    printed = aborts.readouterr().err
    lines = printed.splitlines()
    assert lines[0] == "Traceback (most recent call last):", printed
    assert lines[1].startswith('  File "') and 'plugin_under_test.py", line 4, in process' in lines[1], printed
    assert lines[-1] == "TypeError: cannot price BOOM", printed
    assert "flowgate" + os.sep not in printed, printed

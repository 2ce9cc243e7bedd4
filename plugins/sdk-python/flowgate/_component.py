"""The component's side of the contract: the `flowgate:plugin` world's exports over a `Plugin`.

Imported only inside WebAssembly, by the modules `flowgate.build` generates (componentize-py's
bindings, `wit_world`, exist only there). A `PluginError` becomes the WIT error of its variant;
any other exception prints its traceback to stderr, which the host keeps, and traps the call, so
the host reports what was printed and bisects the batch for a poison row, as for a Rust panic.
"""

import os
import sys
import traceback

import flowgate
import wit_world
import wit_world.exports
import wit_world.exports.transform
from componentize_py_types import Err
from wit_world.imports import log as _log
from wit_world.imports import types as _types

_VARIANTS = {
    "invalid-config": _types.Error_InvalidConfig,
    "bad-input": _types.Error_BadInput,
    "internal": _types.Error_Internal,
}
_LEVELS = {
    "trace": _log.Level.TRACE,
    "debug": _log.Level.DEBUG,
    "info": _log.Level.INFO,
    "warn": _log.Level.WARN,
    "error": _log.Level.ERROR,
}

flowgate._set_host_log(lambda level, message: _log.log(_LEVELS[level], message))

_plugin = None


def install(module):
    """Takes the one `Plugin` a module-level name of ``module`` holds."""
    global _plugin
    found = [v for v in vars(module).values() if isinstance(v, flowgate.Plugin)]
    if len(found) != 1:
        raise RuntimeError(
            f"module `{module.__name__}` must define one plugin at module level "
            f"(`plugin = flowgate.define_plugin(...)`); it defines {len(found)}"
        )
    _plugin = found[0]


_SDK = os.path.dirname(os.path.abspath(flowgate.__file__))


def _plugin_frames(tb):
    """The traceback from the first frame outside the SDK on: the SDK's own frames say nothing
    to the plugin's author (all of them, when the error is the SDK's)."""
    first = tb
    while first is not None and os.path.dirname(os.path.abspath(first.tb_frame.f_code.co_filename)) == _SDK:
        first = first.tb_next
    return first or tb


def _call(f, *args):
    try:
        return f(*args)
    except flowgate.PluginError as e:
        variant = _VARIANTS.get(getattr(e, "tag", None), _types.Error_Internal)
        raise Err(variant(getattr(e, "message", None) or str(e))) from None
    except BaseException as e:
        traceback.print_exception(type(e), e, _plugin_frames(e.__traceback__))
        sys.stderr.flush()
        # abort() is WebAssembly's `unreachable`: the call traps, and the host takes what was
        # printed above as the reason, once.
        os.abort()


def _output(result):
    data, rejected = result
    return _types.Output(data, [_types.RejectedRow(row, reason) for row, reason in rejected])


class Transformer(wit_world.exports.transform.Transformer):
    def __init__(self, step):
        self._step = step

    def process(self, batch):
        return _output(_call(self._step.process, batch))

    def on_watermark(self, ts_ms):
        return _output(_call(self._step.on_watermark, ts_ms))

    def snapshot(self):
        return _call(self._step.snapshot)

    def restore(self, state):
        _call(self._step.restore, state)


class Transform(wit_world.exports.Transform):
    def info(self):
        return _types.PluginInfo(_plugin.name, _plugin.version, _plugin.state_version)

    def create(self, config, input_schema):
        step, schema = _call(_plugin.create, config, input_schema)
        return Transformer(step), schema

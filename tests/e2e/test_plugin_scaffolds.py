"""JavaScript and Python plugins as a new user meets them (README, "Plugins in other languages"):
`flowgate plugin new --lang js|python` writes a project outside this repository that tests
natively (node / the machine's Python), builds with one command (the packages from the npm
registry or PyPI), and passes `flowgate plugin test`; a config typo is reported at its line; an
uncaught exception reaches the log once with the step's name, and the row it failed on reaches the
dead letter with the exception's message, found by the same poison-row search as a Rust panic."""
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import polars as pl
import pytest
from deltalake import DeltaTable

from conftest import REPO, assert_config_typo_reported, filter_pipeline, run_flowgate


def command(args, cwd, env=None, timeout=900):
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{' '.join(map(str, args))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def python_env():
    """The machine's Python as a user has it: no virtualenv on the PATH, so the first build
    installs componentize-py into the project's .venv (pip's cache makes that quick here)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    venv = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv)
    return env


@dataclass
class Lang:
    name: str
    hint: str  # what `plugin new` tells the user to run
    readme: list
    source: str  # the plugin's file in the project (the JavaScript one is made TypeScript first)
    anchor: str  # a line of the scaffold's plugin the bug goes after
    bug: str  # the line that throws on BOOM
    raised: str  # the start of what the log shows for it, as a regular expression

    def unit_tests(self, pkg):
        if self.name == "js":
            out = command(["npm", "test"], pkg)
            assert "# pass 2" in out.stdout and "# fail 0" in out.stdout, out.stdout
        else:
            out = command(["python3", "-m", "unittest"], pkg, env=python_env())
            assert "Ran 2 tests" in out.stderr and out.stderr.rstrip().endswith("OK"), out.stderr

    def build(self, pkg):
        if self.name == "js":
            out = command(["npm", "run", "build", "--prefer-offline"], pkg)
            assert "built dist/price_filter.wasm" in out.stdout, out.stdout + out.stderr
        else:
            out = command(["python3", "-m", "flowgate.build"], pkg, env=python_env())
            assert "built dist/price_filter.wasm" in out.stdout, out.stdout + out.stderr


LANGS = {
    "js": Lang(
        name="js",
        hint="npm run build",
        readme=["npm run build", "npm test"],
        source="src/plugin.js",
        anchor="        for (let i = 0; i < n; i++) {\n",
        bug='            if (batch.utf8("symbol").get(i) === "BOOM") throw new TypeError("cannot price BOOM");\n',
        # The exception's message first, then where it was thrown.
        raised=r"Uncaught TypeError: cannot price BOOM\n\S*process@",
    ),
    "python": Lang(
        name="python",
        hint="python3 -m flowgate.build",
        readme=["python3 -m flowgate.build", "python3 -m unittest"],
        source="src/plugin.py",
        anchor="        output = Output()\n",
        bug='        if "BOOM" in batch.column("symbol").to_pylist():\n'
            '            raise TypeError("cannot price BOOM")\n',
        # A Python traceback from the plugin's own frame (the SDK's left out), then the exception.
        raised=r"Traceback \(most recent call last\):\n  File \"[^\"]*/plugin\.py\", line \d+, in process\nTypeError: "
               r"cannot price BOOM",
    ),
}


def plugin_test(wasm, pkg, *extra):
    return run_flowgate("plugin", "test", wasm, "--config", pkg / "sample" / "config.yaml",
                        "--schema", pkg / "sample" / "schema.yaml", "--format", "jsonl", *extra)


def on_the_sample(wasm, pkg):
    """`flowgate plugin test` on the scaffold's sample: the rows kept, and (symbol, reason) of
    those rejected."""
    out = plugin_test(wasm, pkg, "--input", pkg / "sample" / "input.jsonl")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    kept = [line["row"] for line in lines if line["kind"] == "output"]
    rejected = [(line["row"]["symbol"], line["reason"]) for line in lines if line["kind"] == "rejected"]
    return kept, rejected


@pytest.mark.parametrize("lang", LANGS.values(), ids=list(LANGS))
def test_a_plugin_in_another_language_builds_outside_the_repository_and_runs(lang, tmp_path, data_dir):
    pkg = tmp_path / "elsewhere" / "price-filter"
    out = run_flowgate("plugin", "new", "price-filter", "--lang", lang.name, "--path", pkg)
    assert out.returncode == 0, out.stderr
    assert lang.hint in out.stdout, out.stdout
    readme = (pkg / "README.md").read_text()
    for text in [*lang.readme, "flowgate plugin test", "plugin: "]:
        assert text in readme, text
    assert not str(pkg).startswith(str(REPO))

    # The one command, on a project nothing was installed into (the JavaScript build runs `npm
    # install` first, from the npm cache `make js-sdk` filled; the Python one installs
    # componentize-py into .venv/); then the unit tests, natively.
    lang.build(pkg)
    lang.unit_tests(pkg)
    wasm = pkg / "dist" / "price_filter.wasm"
    assert wasm.is_file()

    kept, rejected = on_the_sample(wasm, pkg)
    assert [row["symbol"] for row in kept] == ["AAPL", "NVDA"], kept
    # Timestamps cross the boundary as µs, exact.
    assert kept[0]["ts"].startswith("2025-11-12T14:30:01"), kept
    assert rejected == [("GOOG", "the value is missing")], rejected

    if lang.name == "js":
        # TypeScript: the same plugin with types, as src/plugin.ts, which the build then takes.
        source = (pkg / "src" / "plugin.js").read_text()
        typed = source.replace("    constructor(column, min) {", "    column: string;\n    min: number;\n\n"
                               "    constructor(column: string, min: number) {")
        assert typed != source
        (pkg / "src" / "plugin.ts").write_text(typed)
        (pkg / "src" / "plugin.js").unlink()
        wasm.unlink()
        lang.build(pkg)
        assert on_the_sample(wasm, pkg) == (kept, rejected)
        source_file = "src/plugin.ts"
    else:
        source_file = lang.source

    # A config typo in a pipeline is reported at the key, once.
    assert_config_typo_reported(tmp_path, pkg / "sample" / "input.jsonl", wasm)

    # A bug: the plugin throws on one symbol. The exception reaches the log once, with the
    # step's name, and the row goes to the dead letter with it.
    source = (pkg / source_file).read_text()
    assert lang.anchor in source
    (pkg / source_file).write_text(source.replace(lang.anchor, lang.anchor + lang.bug))
    lang.build(pkg)

    ticks = tmp_path / "ticks.jsonl"
    symbols = ["AAPL", "MSFT", "BOOM", "NVDA", "AMZN", "TSLA", "BOOM", "META"]
    ticks.write_text("".join(
        json.dumps({"symbol": s, "price": 10.0 + i, "ts": f"2025-11-12T14:30:{i:02d}.123456Z"}) + "\n"
        for i, s in enumerate(symbols)))
    out = plugin_test(wasm, pkg, "--input", ticks)
    assert out.returncode != 0
    assert re.search(r"step `[^`]+` \(plugin `[^`]+`\) trapped in process: .*after the plugin printed: "
                     + lang.raised, out.stderr, re.S), out.stderr
    assert out.stderr.count("TypeError: cannot price BOOM") == 1, out.stderr

    boom = filter_pipeline(tmp_path / "boom.yaml", ticks, wasm, "      column: price\n      min: 0",
                    f"sinks:\n  out:\n    parquet:\n      path: {data_dir / 'out'}\n"
                    f"dead_letter:\n  delta:\n    path: {data_dir / 'dead_letter'}\n")
    out = run_flowgate("run", boom, "--until-idle", "2s")
    assert out.returncode == 0, out.stderr[-3000:]
    dead = pl.from_arrow(DeltaTable(str(data_dir / "dead_letter")).to_pyarrow_table())
    assert sorted(json.loads(p)["symbol"] for p in dead["payload"]) == ["BOOM", "BOOM"], dead
    for reason in dead["reason"]:
        assert reason.startswith("the plugin trapped on this row: "), reason
        assert re.search(lang.raised, reason, re.S), reason
    assert out.stderr.count("a row made the plugin fail by itself") == 2, out.stderr[-3000:]
    kept = pl.read_parquet(str(data_dir / "out" / "**" / "*.parquet"))
    assert sorted(kept["symbol"].to_list()) == sorted(s for s in symbols if s != "BOOM"), kept

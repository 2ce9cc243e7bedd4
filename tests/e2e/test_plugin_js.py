"""A JavaScript plugin as a new user meets it (README, "Plugins in other languages"):
`flowgate plugin new --lang js` writes a package outside this repository that installs from the
npm registry, tests under node, builds with `npm run build`, and passes `flowgate plugin test`; a
config typo is reported at its line; an uncaught JavaScript exception reaches the log once with
the step's name, and the row it failed on reaches the dead letter with the exception's message,
found by the same poison-row search as a Rust panic."""
import json
import re
import subprocess

import polars as pl
from deltalake import DeltaTable

from conftest import REPO, run_flowgate


def npm(args, cwd, timeout=900):
    # The packages come from the npm cache `make js-sdk` filled (the registry otherwise).
    out = subprocess.run(["npm", *args, "--no-audit", "--no-fund"], cwd=cwd, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"npm {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def plugin_test(wasm, pkg, *extra):
    return run_flowgate("plugin", "test", wasm, "--config", pkg / "sample" / "config.yaml",
                        "--schema", pkg / "sample" / "schema.yaml", "--format", "jsonl", *extra)


def test_a_javascript_plugin_builds_outside_the_repository_and_runs(tmp_path, data_dir):
    pkg = tmp_path / "elsewhere" / "price-filter"
    out = run_flowgate("plugin", "new", "price-filter", "--lang", "js", "--path", pkg)
    assert out.returncode == 0, out.stderr
    assert "npm install && npm run build" in out.stdout, out.stdout
    readme = (pkg / "README.md").read_text()
    for command in ["npm install", "npm run build", "flowgate plugin test", "npm test", "plugin: "]:
        assert command in readme, command
    assert not str(pkg).startswith(str(REPO))

    npm(["install", "--prefer-offline"], pkg)
    tested = npm(["test"], pkg)
    assert "# pass 2" in tested.stdout and "# fail 0" in tested.stdout, tested.stdout
    npm(["run", "build"], pkg)
    wasm = pkg / "dist" / "price_filter.wasm"
    assert wasm.is_file()

    out = plugin_test(wasm, pkg, "--input", pkg / "sample" / "input.jsonl")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    kept = [line["row"] for line in lines if line["kind"] == "output"]
    rejected = [(line["row"]["symbol"], line["reason"]) for line in lines if line["kind"] == "rejected"]
    assert [row["symbol"] for row in kept] == ["AAPL", "NVDA"], lines
    # Timestamps cross the boundary as µs, exact.
    assert kept[0]["ts"].startswith("2025-11-12T14:30:01"), kept
    assert rejected == [("GOOG", "the value is missing")], rejected

    # A config typo in a pipeline is reported at the key, once.
    pipeline = tmp_path / "typo.yaml"
    pipeline.write_text(f"""name: typo
source:
  file:
    path: {pkg / 'sample' / 'input.jsonl'}
schema:
  symbol: utf8
  price: float64
  ts: timestamp
transforms:
  - name: filter
    plugin: {wasm}
    config:
      column: price
      minimum: 10
sinks:
  out:
    console: {{}}
""")
    out = run_flowgate("validate", pipeline)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{pipeline}:14:7:" in out.stderr, out.stderr
    assert out.stderr.count("unknown field `minimum`") == 1, out.stderr

    # A bug: the plugin throws on one symbol. The exception's message and stack reach the log
    # once, with the step's name, and the row goes to the dead letter with them.
    source = (pkg / "src" / "plugin.js").read_text()
    loop = "        for (let i = 0; i < n; i++) {\n"
    assert loop in source
    source = source.replace(loop, loop + '            if (batch.utf8("symbol").get(i) === "BOOM") throw new TypeError("cannot price BOOM");\n')
    (pkg / "src" / "plugin.js").write_text(source)
    npm(["run", "build"], pkg)

    ticks = tmp_path / "ticks.jsonl"
    symbols = ["AAPL", "MSFT", "BOOM", "NVDA", "AMZN", "TSLA", "BOOM", "META"]
    ticks.write_text("".join(
        json.dumps({"symbol": s, "price": 10.0 + i, "ts": f"2025-11-12T14:30:{i:02d}.123456Z"}) + "\n"
        for i, s in enumerate(symbols)))
    out = plugin_test(wasm, pkg, "--input", ticks)
    assert out.returncode != 0
    # Named with its step, the exception's message first, then where it was thrown; once.
    assert re.search(r"step `[^`]+` \(plugin `[^`]+`\) trapped in process: .*after the plugin printed: "
                     r"Uncaught TypeError: cannot price BOOM\n\S*process@", out.stderr, re.S), out.stderr
    assert out.stderr.count("cannot price BOOM") == 1, out.stderr

    pipeline = tmp_path / "boom.yaml"
    pipeline.write_text(f"""name: boom
source:
  file:
    path: {ticks}
schema:
  symbol: utf8
  price: float64
  ts: timestamp
transforms:
  - name: filter
    plugin: {wasm}
    config:
      column: price
      min: 0
sinks:
  out:
    parquet:
      path: {data_dir / 'out'}
dead_letter:
  delta:
    path: {data_dir / 'dead_letter'}
""")
    out = run_flowgate("run", pipeline, "--until-idle", "2s")
    assert out.returncode == 0, out.stderr[-3000:]
    dead = pl.from_arrow(DeltaTable(str(data_dir / "dead_letter")).to_pyarrow_table())
    assert sorted(json.loads(p)["symbol"] for p in dead["payload"]) == ["BOOM", "BOOM"], dead
    for reason in dead["reason"]:
        assert reason.startswith("the plugin trapped on this row: "), reason
        assert "Uncaught TypeError: cannot price BOOM" in reason, reason
    assert out.stderr.count("a row made the plugin fail by itself") == 2, out.stderr[-3000:]
    kept = pl.read_parquet(str(data_dir / "out" / "**" / "*.parquet"))
    assert sorted(kept["symbol"].to_list()) == sorted(s for s in symbols if s != "BOOM"), kept

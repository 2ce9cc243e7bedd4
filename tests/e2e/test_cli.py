"""The demo on the embedded broker, stopping on SIGTERM, and a table that does not fit."""
import json
import os
import signal
import subprocess
import time

import polars as pl
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from conftest import FLOWGATE, REPO, run_flowgate


def test_demo_on_the_embedded_broker_leaves_readable_tables(data_dir):
    out = run_flowgate("run", "pipelines/demo.yaml", "--max-records", "40000", env={"DATA_DIR": str(data_dir)})
    assert out.returncode == 0, out.stderr
    assert "keeps recent messages in memory only, and nothing after this process exits" in out.stderr
    bars = pl.from_arrow(DeltaTable(str(data_dir / "bars")).to_pyarrow_table())
    assert len(bars) > 0
    assert bars["trades"].sum() <= 40000
    raw = pl.read_parquet(sorted((data_dir / "raw").glob("date=*/*.parquet")), hive_partitioning=True)
    assert len(raw) == 40000, "every generated tick is valid and unique"


def test_sigterm_flushes_commits_and_exits_0(data_dir):
    env = dict(os.environ, DATA_DIR=str(data_dir))
    proc = subprocess.Popen([str(FLOWGATE), "run", "pipelines/demo.yaml"], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "signal received" in err
    assert "done:" in err
    raw = pl.read_parquet(sorted((data_dir / "raw").glob("date=*/*.parquet")), hive_partitioning=True)
    assert len(raw) > 0, "what was read before the signal is committed"


def test_a_table_that_does_not_fit_the_stage_is_a_clear_error(data_dir):
    write_deltalake(str(data_dir / "bars"), pa.table({"symbol": ["A"], "close": [1.0]}))
    out = run_flowgate("run", "pipelines/ticks-file.yaml", "--until-idle", "1s",
                       env={"DATA_DIR": str(data_dir), "INPUT": str(REPO / "pipelines/samples/ticks.jsonl")})
    assert out.returncode == 2, out.stderr
    assert "sink `bars`: the table at" in out.stderr and "does not fit the stage's output" in out.stderr, out.stderr


def test_produce_to_a_file_writes_the_ticks_asked_for(tmp_path):
    out_file = tmp_path / "ticks.jsonl"
    out = run_flowgate("produce", "--output", out_file, "--count", "3000", "--rate", "0", "--symbol-count", "25",
                       "--duplicates", "0.1", "--malformed", "0.02")
    assert out.returncode == 0, out.stderr
    lines = out_file.read_text().splitlines()
    assert len(lines) == 3000
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    assert 20 <= 3000 - len(parsed) <= 150, "about 2% malformed"
    assert {t["symbol"] for t in parsed} == {f"S{i:05d}" for i in range(25)}
    assert len({(t["symbol"], t["ts"]) for t in parsed}) < len(parsed), "some ticks were written twice"

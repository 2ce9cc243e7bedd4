"""The demo on the embedded broker, stopping on SIGTERM, and a table that does not fit."""
import json
import os
import re
import signal
import subprocess
import threading

import polars as pl
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from conftest import FLOWGATE, REPO, run_flowgate


def test_demo_on_the_embedded_broker_leaves_readable_tables(data_dir):
    """The demo's generator mixes in bad ticks (`faults:`): the dead letter holds a row of every
    reason, dedup drops the copies, and at the end (`--max-records`, `end: flush`) every window
    is written, so the bars count every tick that reached them."""
    n = 40000
    out = run_flowgate("run", "pipelines/demo.yaml", "--max-records", str(n), env={"DATA_DIR": str(data_dir)})
    assert out.returncode == 0, out.stderr
    assert "keeps recent messages in memory only, and nothing after this process exits" in out.stderr
    bars = pl.from_arrow(DeltaTable(str(data_dir / "bars")).to_pyarrow_table())
    raw = pl.read_parquet(sorted((data_dir / "raw").glob("date=*/*.parquet")), hive_partitioning=True)
    dead = pl.from_arrow(DeltaTable(str(data_dir / "dead_letter")).to_pyarrow_table())
    by_stage = dict(dead.group_by("stage").len().iter_rows())
    assert set(by_stage) == {"decode", "validate", "bars"}, by_stage
    assert all(dead.filter(pl.col("stage") == "decode")["reason"].str.starts_with("incomplete JSON"))
    assert all(dead.filter(pl.col("stage") == "validate")["reason"].str.starts_with("price: must be > 0"))
    late = dead.filter(pl.col("stage") == "bars")
    assert all(late["reason"].str.starts_with("late: "))
    for stage, count in by_stage.items():
        assert 20 <= count <= 200, f"about 0.2% of {n} refused by {stage}: {by_stage}"
    assert raw.select(["symbol", "ts"]).is_duplicated().sum() == 0, "dedup dropped the copies"
    dropped = n - len(raw) - by_stage["decode"] - by_stage["validate"]
    assert 200 <= dropped <= 700, f"about 1% of {n} sent twice and dropped by dedup: {dropped}"
    # The raw tap is dedup's output, which the late ticks also left; every other tick is in a bar.
    assert bars["trades"].sum() == len(raw) - len(late)
    assert bars.group_by("symbol", "window_start").len()["len"].max() == 1
    # The summary says the same.
    assert re.search(rf"^  bars\s+{len(bars):,}$", out.stderr, re.M), out.stderr
    assert re.search(rf"^  raw\s+{len(raw):,}$", out.stderr, re.M), out.stderr
    assert re.search(rf"^  bars / late\s+{len(late):,}$", out.stderr, re.M), out.stderr
    assert re.search(rf"^  decode / incomplete JSON value\s+{by_stage['decode']:,}$", out.stderr, re.M), out.stderr
    assert "newest bars of symbol " in out.stderr, out.stderr


def test_sigterm_flushes_commits_and_exits_0(data_dir):
    """SIGTERM while ticks flow: the run finishes its batches, commits what it read and exits 0.
    The signal goes once the run reports records read (not after a fixed sleep: a cold plugin
    cache and a busy machine can take longer than any sleep to get there)."""
    env = dict(os.environ, DATA_DIR=str(data_dir))
    proc = subprocess.Popen([str(FLOWGATE), "run", "pipelines/demo.yaml"], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True)
    lines, reading = [], threading.Event()

    def drain():
        for line in proc.stderr:
            lines.append(line)
            progress = re.search(r"INFO ([\d,]+) records \(", line)
            if progress and int(progress.group(1).replace(",", "")) > 0:
                reading.set()

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    try:
        assert reading.wait(timeout=180), "no records read in 180 s:\n" + "".join(lines)
        read_before = int(re.search(r"INFO ([\d,]+) records \(", "".join(lines)).group(1).replace(",", ""))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    drainer.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 0, err
    assert "signal received" in err
    done = re.search(r"done: ([\d,]+) records read", err)
    assert done, err
    assert int(done.group(1).replace(",", "")) > read_before, "the signal came while ticks were read"
    raw = pl.read_parquet(sorted((data_dir / "raw").glob("date=*/*.parquet")), hive_partitioning=True)
    # Every row the run says it committed to the raw tap, up to the signal, is in the table.
    committed = re.search(r"^  raw\s+([\d,]+)$", err, re.M)
    assert committed, err
    assert len(raw) == int(committed.group(1).replace(",", "")) > 0, err


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


def test_make_run_twice_starts_the_demo_tables_anew():
    """`make run && make run`: the embedded broker starts empty every run, so the second run
    starts the demo's tables anew (it used to stop with "another process owns it")."""
    data = REPO / "data" / "demo"
    for attempt in (1, 2):
        out = subprocess.run(["make", "run", "DEMO_RECORDS=20000"], cwd=REPO, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, f"make run #{attempt}:\n{out.stdout}\n{out.stderr}"
    assert "starts its tables anew: removed" in out.stderr, out.stderr
    raw = pl.read_parquet(sorted((data / "raw").glob("date=*/*.parquet")), hive_partitioning=True)
    dead = pl.from_arrow(DeltaTable(str(data / "dead_letter")).to_pyarrow_table())
    # Only the second run's ticks: 20,000 read, less the copies dedup dropped (about 1%).
    assert 19500 <= len(raw) + len(dead.filter(pl.col("stage") != "bars")) < 20000, len(raw)
    bars = pl.from_arrow(DeltaTable(str(data / "bars")).to_pyarrow_table())
    assert bars["trades"].sum() <= 20000
    assert bars.group_by("symbol", "window_start").len()["len"].max() == 1, "one bar per symbol and minute"


def test_the_demo_never_touches_a_table_another_pipeline_wrote(data_dir):
    out = run_flowgate("run", "pipelines/ticks-file.yaml", "--until-idle", "1s",
                       env={"DATA_DIR": str(data_dir), "INPUT": str(REPO / "pipelines/samples/ticks.jsonl")})
    assert out.returncode == 0, out.stderr
    before = DeltaTable(str(data_dir / "bars")).version()
    out = run_flowgate("run", "pipelines/demo.yaml", "--max-records", "1000", env={"DATA_DIR": str(data_dir)})
    assert out.returncode == 2, out.stderr
    assert "is not only its own" in out.stderr and "flowgate-ticks-file-file:ticks.jsonl-0" in out.stderr, out.stderr
    assert DeltaTable(str(data_dir / "bars")).version() == before, "left untouched"


def test_each_stock_pipeline_keeps_its_tables_in_a_folder_of_its_own():
    """`make run` after `flowgate run pipelines/ticks-file.yaml` (or stocks.yaml) finds no
    other pipeline's table in its way: the default folders differ."""
    defaults = {}
    for name in ("demo", "ticks-file", "stocks", "stocks-postgres"):
        text = (REPO / "pipelines" / f"{name}.yaml").read_text()
        folders = set(re.findall(r"\$\{DATA_DIR:-([^}]+)\}", text))
        assert len(folders) == 1, (name, folders)
        defaults[name] = folders.pop()
    assert len(set(defaults.values())) == len(defaults), defaults

"""The engine's guarantees over file input (a folder of JSON-lines files, one partition each):
late data is judged the same however records are batched, plugin state follows each step by
name when the pipeline changes, and a run refuses to start when the state its sinks need is gone."""
import json
import pathlib
import random
import shutil

import pandas as pd
import polars as pl
from deltalake import DeltaTable

from conftest import REPO, run_flowgate
from expected import expected_bars, parse_ticks

SYMBOLS = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META"]


def pipeline(tmp_path, name="p.yaml", batch="{max_records: 16384, max_wait: 500ms}", extra_step="", workers=2):
    """pipelines/ticks-file.yaml with absolute plugin paths, another batch size, `end: keep`, and
    optionally a step inserted before `bars`."""
    text = (REPO / "pipelines" / "ticks-file.yaml").read_text()
    text = text.replace("../target/", f"{REPO}/target/")
    # These tests are about watermarks: windows stay open when the input ends (`end: keep`),
    # as they would on a live source; `end: flush` has its own test in test_file_pipeline.py.
    text = text.replace("batch:\n  max_records: 16384\n  max_wait: 500ms\n",
                        f"batch: {batch}\nworkers: {workers}\nend: keep\n")
    assert f"batch: {batch}" in text
    if extra_step:
        text = text.replace("  - name: bars\n", extra_step + "  - name: bars\n")
        assert extra_step in text
    path = tmp_path / name
    path.write_text(text)
    return path


def write_ticks(folder, rng, late_every=0):
    """Three files (partitions), each its own symbols, ticks 250 ms apart in event time, some
    sent twice, some bad; with `late_every`, every so often a tick 10 minutes late."""
    folder.mkdir()
    lines_by_file = {}
    start = pd.Timestamp("2025-11-12T14:30:00Z")
    for f in range(3):
        prices = {s: 100.0 + 10 * i for i, s in enumerate(SYMBOLS)}
        lines = []
        for i in range(1500):
            sym = SYMBOLS[2 * f + rng.randint(0, 1)]
            prices[sym] = round(prices[sym] * (1 + rng.gauss(0, 0.001)), 2)
            ts = start + pd.Timedelta(milliseconds=250 * i) + pd.Timedelta(microseconds=rng.randint(0, 999))
            if late_every and i > 0 and i % late_every == 0:
                ts = ts - pd.Timedelta(minutes=10)
            tick = {"symbol": sym, "price": prices[sym], "volume": rng.randint(1, 500),
                    "ts": ts.isoformat(), "ts_epoch_ms": int(ts.value // 1_000_000)}
            lines.append(json.dumps(tick))
            if rng.random() < 0.03:
                lines.append(json.dumps(tick))
            if rng.random() < 0.002:
                lines.append('{"symbol": "' + sym + '", "price": ')
        lines_by_file[f] = lines
        (folder / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
    return lines_by_file


def tables(data_dir):
    bars = pl.from_arrow(DeltaTable(str(data_dir / "bars")).to_pyarrow_table()).drop("date")
    dead = pl.from_arrow(DeltaTable(str(data_dir / "dead_letter")).to_pyarrow_table())
    raw = pl.read_parquet(sorted((data_dir / "raw").glob("date=*/*.parquet")), hive_partitioning=True)
    return (bars.sort(["symbol", "window_start"]),
            dead.select(["stage", "reason", "topic", "partition", "offset", "payload"]).sort(["topic", "partition", "offset", "stage", "payload"]),
            raw.sort(["symbol", "ts"]))


def test_a_replay_judges_late_ticks_exactly_as_the_live_run_did(tmp_path):
    """The same records batched one by one (as a live trickle arrives) and 16k at a time (a
    backlog replay) give identical tables: the chain gets its partition's own watermark, and a
    batch is cut before a row behind it."""
    rng = random.Random(5)
    folder = tmp_path / "ticks"
    write_ticks(folder, rng, late_every=400)
    results = []
    for name, batch in [("live", "{max_records: 1, max_wait: 1ms}"), ("backlog", "{max_records: 16384, max_wait: 500ms}")]:
        data = tmp_path / name
        p = pipeline(tmp_path, f"{name}.yaml", batch=batch)
        out = run_flowgate("run", p, "--until-idle", "2s", env={"DATA_DIR": str(data), "INPUT": str(folder)})
        assert out.returncode == 0, out.stderr
        results.append(tables(data))
    (live_bars, live_dead, live_raw), (bars, dead, raw) = results
    late = dead.filter(pl.col("reason").str.starts_with("late:"))
    assert len(late) >= 6, "the late ticks are judged late"
    # Rows refused after the first step carry the last offset of their batch (no lineage through
    # plugins), so only those offsets may differ.
    def comparable(d):
        return d.with_columns(pl.when(pl.col("stage").is_in(["decode", "validate"])).then(pl.col("offset"))
                              .otherwise(None).alias("offset")).sort(["topic", "partition", "stage", "payload", "offset"])
    assert comparable(live_dead).equals(comparable(dead)), (live_dead, dead)
    assert live_bars.equals(bars)
    assert live_raw.equals(raw)


def test_state_follows_each_step_by_name_when_a_step_is_added(tmp_path):
    """Half the input, then a step is added before `bars` and the run resumes: dedup and bars
    restore their own state (by name, not by position), and the bars are those of one run."""
    rng = random.Random(9)
    folder = tmp_path / "ticks"
    files = write_ticks(folder, rng)
    data = tmp_path / "data"
    env = {"DATA_DIR": str(data), "INPUT": str(folder)}
    first = run_flowgate("run", pipeline(tmp_path, "a.yaml"), "--max-records", "2000", env=env)
    assert first.returncode == 0, first.stderr
    added = ("  - name: sanity\n"
             "    plugin: " + f"{REPO}/target/wasm32-wasip2/plugin/flowgate_validate.wasm\n"
             "    config: {rules: {volume: {min: 0}}}\n")
    changed = pipeline(tmp_path, "b.yaml", extra_step=added)
    second = run_flowgate("run", changed, "--until-idle", "2s", env=env)
    assert second.returncode == 0, second.stderr
    assert "no stored state for this step" in second.stderr, second.stderr

    bars, dead, raw = tables(data)
    want = []
    for lines in files.values():
        want.append(expected_bars(parse_ticks(lines), watermark_delay_ms=5000))
    want = pd.concat(want).sort_values(["symbol", "window_start"]).reset_index(drop=True)
    got = bars.to_pandas()
    assert len(got) == len(want) > 20
    assert list(got["symbol"]) == list(want["symbol"])
    assert list(got["trades"]) == list(want["trades"])
    assert list(got["volume"]) == list(want["volume"])
    assert (got["close"] - want["close"]).abs().max() < 1e-9
    everything = pd.concat([parse_ticks(lines) for lines in files.values()])
    assert len(raw) == len(everything.drop_duplicates(subset=["symbol", "ts"]))
    assert dead.select(["topic", "partition", "offset"]).is_duplicated().sum() == 0

    # The state those offsets need is gone: the run refuses, naming the partition and the way out.
    shutil.rmtree(data / "_checkpoints")
    refused = run_flowgate("run", changed, "--until-idle", "1s", env=env)
    assert refused.returncode == 2, refused.stderr
    assert "has no plugin state for that epoch" in refused.stderr and "--reset-state" in refused.stderr
    assert "file:part-0.jsonl/0" in refused.stderr
    reset = run_flowgate("run", changed, "--until-idle", "1s", "--reset-state", env=env)
    assert reset.returncode == 0, reset.stderr


def test_a_sink_added_later_is_filled_from_the_start_and_the_others_keep_their_state(tmp_path):
    """A pipeline runs without its raw tap; the tap is added: it is replayed from the first record
    while the bars and the dead letter (which hold more) are not written again until the replay
    reaches them. A stop in the middle of that catch-up keeps the state the others need."""
    rng = random.Random(13)
    folder = tmp_path / "ticks"
    files = write_ticks(folder, rng)
    data = tmp_path / "data"
    env = {"DATA_DIR": str(data), "INPUT": str(folder)}
    full = pipeline(tmp_path, "full.yaml")
    text = full.read_text()
    tap = "  raw:                 # the bronze tap: every valid tick once, as it left dedup\n    from: dedup\n"
    assert tap in text
    without = tmp_path / "without.yaml"
    without.write_text(text.replace(tap, "  unused_raw:\n    from: dedup\n    console: {max_rows: 0}\n").replace(
        "    parquet:\n      path: ${DATA_DIR:-../data/ticks-file}/raw\n      partition_by: [date]\n", ""))
    first = run_flowgate("run", without, "--max-records", "3000", env=env)
    assert first.returncode == 0, first.stderr
    assert not (data / "raw").exists()
    bars_before = tables_without_raw(data)
    # The tap is added; the run stops halfway through its catch-up.
    second = run_flowgate("run", full, "--max-records", "1200", env=env)
    assert second.returncode == 0, second.stderr
    assert "replaying for the others" in second.stderr, second.stderr
    # Then to the end: every table complete, nothing twice.
    third = run_flowgate("run", full, "--until-idle", "2s", env=env)
    assert third.returncode == 0, third.stderr
    bars, dead, raw = tables(data)
    everything = pd.concat([parse_ticks(lines) for lines in files.values()])
    assert len(raw) == len(everything.drop_duplicates(subset=["symbol", "ts"]))
    assert raw.select(["symbol", "ts"]).is_duplicated().sum() == 0
    want = pd.concat([expected_bars(parse_ticks(lines), watermark_delay_ms=5000) for lines in files.values()])
    assert len(bars) == len(want)
    assert not bars.select(["symbol", "window_start"]).is_duplicated().any()
    assert bars_before.join(bars, on=["symbol", "window_start"], how="anti").is_empty()
    assert dead.select(["topic", "partition", "offset"]).is_duplicated().sum() == 0


def tables_without_raw(data_dir):
    return pl.from_arrow(DeltaTable(str(data_dir / "bars")).to_pyarrow_table()).drop("date")


def test_an_idle_partition_follows_the_others_so_its_windows_close(tmp_path):
    """A partition read to its end in one run has its last windows still open. In the next run it
    gets nothing new while another partition moves on: once idle (no record for `idle_timeout`,
    nothing left to read), its watermark follows the other's and its windows close."""
    rng = random.Random(17)
    folder = tmp_path / "ticks"
    files = write_ticks(folder, rng)
    data = tmp_path / "data"
    env = {"DATA_DIR": str(data), "INPUT": str(folder)}
    p = pipeline(tmp_path, "p.yaml")
    p.write_text(p.read_text().replace("idle_timeout: 30s", "idle_timeout: 1s"))
    first = run_flowgate("run", p, "--until-idle", "2s", env=env)
    assert first.returncode == 0, first.stderr
    before = tables_without_raw(data)
    # Partition 1 gets five more minutes of ticks; partitions 0 and 2 get nothing.
    last = json.loads(files[1][-1])
    start = pd.Timestamp(last["ts"])
    more = []
    for i in range(1, 1200):
        ts = start + pd.Timedelta(milliseconds=250 * i)
        more.append(json.dumps({"symbol": last["symbol"], "price": 100.0, "volume": 1,
                                "ts": ts.isoformat(), "ts_epoch_ms": int(ts.value // 1_000_000)}))
    with open(folder / "part-1.jsonl", "a") as f:
        f.write("\n".join(more) + "\n")
    second = run_flowgate("run", p, "--until-idle", "3s", env=env)
    assert second.returncode == 0, second.stderr
    after = tables_without_raw(data)
    for f in (0, 2):
        symbols = {SYMBOLS[2 * f], SYMBOLS[2 * f + 1]}
        ticks = parse_ticks(files[f])
        every_window = expected_bars(ticks, watermark_delay_ms=-10**12)
        had = before.filter(pl.col("symbol").is_in(list(symbols)))
        now = after.filter(pl.col("symbol").is_in(list(symbols)))
        assert len(had) < len(every_window), "its last windows were open after the first run"
        assert len(now) == len(every_window), f"partition {f}: its last windows closed"


def test_a_partition_with_records_waiting_is_never_idle(tmp_path):
    """Idleness is judged by what waits to be read, not by the clock alone. Partition 0's ticks
    are six hours behind partition 1's; `idle_timeout: 0s` lets a partition count as idle the
    moment nothing of it waits. Read in small batches over many epochs, partition 0 keeps its
    own watermark while lines wait in its file: none of its ticks is judged late, and every bar
    of both partitions lands. (Were it idle, it would take partition 1's watermark at the first
    barrier and dead-letter the rest of its ticks as `late`.)"""
    rng = random.Random(23)
    folder = tmp_path / "ticks"
    folder.mkdir()
    files = {}
    for f, start in [(0, "2025-11-12T09:00:00Z"), (1, "2025-11-12T15:00:00Z")]:
        start = pd.Timestamp(start)
        lines = []
        for i in range(12000):
            sym = SYMBOLS[2 * f + rng.randint(0, 1)]
            ts = start + pd.Timedelta(milliseconds=250 * i)
            lines.append(json.dumps({"symbol": sym, "price": round(100 + rng.random(), 2), "volume": rng.randint(1, 50),
                                     "ts": ts.isoformat(), "ts_epoch_ms": int(ts.value // 1_000_000)}))
        files[f] = lines
        (folder / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
    data = tmp_path / "data"
    p = pipeline(tmp_path, "p.yaml", batch="{max_records: 20, max_wait: 5ms}")
    text = p.read_text().replace("idle_timeout: 30s", "idle_timeout: 0s").replace("interval: 5s", "interval: 100ms")
    assert "idle_timeout: 0s" in text and "interval: 100ms" in text
    p.write_text(text)
    out = run_flowgate("run", p, "--until-idle", "2s", env={"DATA_DIR": str(data), "INPUT": str(folder)})
    assert out.returncode == 0, out.stderr
    bars, dead, raw = tables(data)
    assert dead.is_empty(), dead
    assert len(raw) == 24000
    # Partition 0 ends hours before partition 1's watermark: all its windows close.
    for f, delay in [(0, -10**12), (1, 5000)]:
        want = expected_bars(parse_ticks(files[f]), watermark_delay_ms=delay)
        got = bars.filter(pl.col("symbol").is_in([SYMBOLS[2 * f], SYMBOLS[2 * f + 1]])).to_pandas()
        assert len(got) == len(want) > 50, f
        assert list(got["trades"]) == list(want["trades"])
        assert (got["close"] - want["close"]).abs().max() < 1e-9

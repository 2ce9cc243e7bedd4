"""The seed pipeline over a JSON-lines file, into Delta, read back with the deltalake and polars
packages and compared with bars computed by pandas; then run again: nothing duplicated."""
import json
import pathlib
import re

import numpy as np
import polars as pl
from deltalake import DeltaTable

from conftest import REPO, run_flowgate
from expected import expected_bars, parse_ticks

SAMPLE = REPO / "pipelines" / "samples" / "ticks.jsonl"


def read_bars(data_dir):
    return pl.from_arrow(DeltaTable(str(data_dir / "bars")).to_pyarrow_table()).sort(["symbol", "window_start"])


def read_raw(data_dir):
    files = sorted((data_dir / "raw").glob("date=*/*.parquet"))
    assert files, "no Parquet files in the raw tap"
    return pl.read_parquet(files, hive_partitioning=True)


def test_file_pipeline_writes_the_bars_pandas_computes(data_dir: pathlib.Path):
    """A file read to its end closes every window (`end: flush`, the file source's default):
    the bars are every window pandas computes from the file, the last minute included."""
    env = {"DATA_DIR": str(data_dir), "INPUT": str(SAMPLE)}
    out = run_flowgate("run", "pipelines/ticks-file.yaml", "--until-idle", "1s", env=env)
    assert out.returncode == 0, out.stderr
    assert "closing every open window (`end: flush`)" in out.stderr, out.stderr

    bars = read_bars(data_dir)
    assert bars.columns == ["symbol", "window_start", "window_end", "open", "high", "low", "close",
                            "avg_price", "volume", "trades", "pct_change", "date"]
    ticks = parse_ticks(SAMPLE.read_text().splitlines())
    want = expected_bars(ticks, watermark_delay_ms=-10**12)
    closed_by_the_watermark = expected_bars(ticks, watermark_delay_ms=5000)
    assert len(bars) == len(want) > len(closed_by_the_watermark) > 0
    got = bars.to_pandas()
    assert list(got["symbol"]) == list(want["symbol"])
    assert [t.value for t in got["window_start"]] == [t.value for t in want["window_start"].dt.tz_convert("UTC")]
    for col in ["open", "high", "low", "close", "avg_price"]:
        np.testing.assert_allclose(got[col], want[col], rtol=1e-12, err_msg=col)
    assert list(got["volume"]) == list(want["volume"])
    assert list(got["trades"]) == list(want["trades"])
    np.testing.assert_allclose(got["pct_change"].astype(float), want["pct_change"].astype(float), rtol=1e-9, equal_nan=True)
    assert {str(d)[:10] for d in got["date"]} == {"2025-11-12"}

    # The raw tap (Parquet, after dedup): each valid tick exactly once, under date=… folders.
    raw = read_raw(data_dir)
    valid = parse_ticks(SAMPLE.read_text().splitlines())
    assert len(raw) == len(valid.drop_duplicates(subset=["symbol", "ts"])) > 0
    assert raw.select(["symbol", "ts"]).is_duplicated().sum() == 0
    assert set(raw["date"].cast(pl.Utf8).to_list()) == {"2025-11-12"}
    # The same ticks as CSV (header, RFC 3339 timestamps), in the same date=… layout.
    csv_files = sorted((data_dir / "raw_csv").glob("date=*/*.csv"))
    assert [f.parent.name for f in csv_files] == ["date=2025-11-12"] * len(csv_files) and csv_files
    raw_csv = pl.concat([pl.read_csv(f, try_parse_dates=True) for f in csv_files])
    assert raw_csv.columns == [c for c in raw.columns if c != "date"]
    assert raw_csv.sort(["symbol", "ts"])["price"].to_list() == raw.sort(["symbol", "ts"])["price"].to_list()
    assert raw_csv.sort(["symbol", "ts"])["ts"].dt.epoch("us").to_list() == \
        raw.sort(["symbol", "ts"])["ts"].dt.epoch("us").to_list()

    dead = pl.from_arrow(DeltaTable(str(data_dir / "dead_letter")).to_pyarrow_table())
    stages = sorted(dead["stage"].to_list())
    assert stages == ["decode", "decode", "validate", "validate"], dead
    bad_price = dead.filter(pl.col("reason") == "price: must be > 0, got -3.5")
    assert len(bad_price) == 1
    # The offset is the record's line in the file (0-based), and the payload the row it was.
    line = bad_price["offset"][0]
    assert '"price":-3.5' in SAMPLE.read_text().splitlines()[line]
    assert all(dead["pipeline"] == "ticks-file")

    # Run again over the same input: the sinks hold every offset, nothing is written twice.
    first = out
    out = run_flowgate("run", "pipelines/ticks-file.yaml", "--until-idle", "1s", env=env)
    assert out.returncode == 0, out.stderr
    assert read_bars(data_dir).equals(bars)
    assert len(read_raw(data_dir)) == len(raw)
    assert sorted((data_dir / "raw_csv").glob("date=*/*.csv")) == csv_files
    assert len(DeltaTable(str(data_dir / "dead_letter")).to_pyarrow_table()) == len(dead)

    # The end-of-run summary: rows per table as committed, the dead letter by stage and reason,
    # bars per symbol (the first run's stderr; the second committed nothing new).
    summary = first.stderr
    rows = dict(re.findall(r"^  (\w+)\s+([\d,]+)$", summary, re.M))
    assert int(rows["bars"].replace(",", "")) == len(bars), summary
    assert int(rows["raw"].replace(",", "")) == len(raw), summary
    assert int(rows["dead_letter"].replace(",", "")) == len(dead), summary
    assert re.search(r"^  validate / price\s+1$", summary, re.M), summary
    per_symbol = bars.group_by("symbol").len().sort("symbol")
    assert "bars per symbol: " + ", ".join(f"{s} {n}" for s, n in per_symbol.iter_rows()) in summary, summary
    assert "newest bars of symbol " in summary, summary

    # `flowgate table info` reads both formats and shows the positions the commits recorded:
    # the last line of the file (0-based), as pipeline `ticks-file` committed it.
    last_line = len(SAMPLE.read_text().splitlines()) - 1
    for table, kind in [("bars", "Delta"), ("raw", "Parquet or CSV")]:
        info = run_flowgate("table", "info", str(data_dir / table))
        assert info.returncode == 0, info.stderr
        assert f"({kind}" in info.stdout, info.stdout
        assert "ERROR" not in info.stderr, info.stderr
        assert re.search(rf"ticks\.jsonl.0.*: offset {last_line}, epoch \d+", info.stdout), info.stdout


def test_end_keep_leaves_the_last_windows_open_for_the_next_run(data_dir, tmp_path):
    """`end: keep`: a file read to its end keeps its open windows in the checkpoint, as a live
    source would; only the windows the watermark closed are written."""
    pipeline = tmp_path / "keep.yaml"
    text = (REPO / "pipelines" / "ticks-file.yaml").read_text().replace("../target/", f"{REPO}/target/")
    pipeline.write_text(text.replace("event_time: ts\n", "event_time: ts\nend: keep\n", 1))
    out = run_flowgate("run", pipeline, "--until-idle", "1s", env={"DATA_DIR": str(data_dir), "INPUT": str(SAMPLE)})
    assert out.returncode == 0, out.stderr
    assert "closing every open window" not in out.stderr
    want = expected_bars(parse_ticks(SAMPLE.read_text().splitlines()), watermark_delay_ms=5000)
    assert len(read_bars(data_dir)) == len(want) > 0


def test_validate_prints_each_stage(data_dir):
    out = run_flowgate("validate", "pipelines/stocks.yaml", env={"DATA_DIR": str(data_dir)})
    assert out.returncode == 0, out.stderr
    assert "step `bars`: [symbol: Utf8, window_start: Timestamp(ms, \"UTC\") not null" in out.stdout or "step `bars`" in out.stdout
    assert "sink `bars` (delta) reads step `pct_change`" in out.stdout


def test_bad_pipeline_exits_2_naming_the_place(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsource:\n  file:\n    path: t.jsonl\nschema:\n  a: utf8\nsinkz: {}\n")
    out = run_flowgate("run", str(bad))
    assert out.returncode == 2
    assert f"{bad}:7:1: at `sinkz`: unknown field `sinkz`" in out.stderr, out.stderr


def test_a_large_epoch_is_checkpointed_by_size_and_the_tables_stay_exact(data_dir, tmp_path):
    """Under load an epoch ends when a chain's poison journal (the epoch's input, held so a
    trapping row can be isolated) passes its mark, not only at `checkpoint.interval`: here the
    interval is an hour, yet 800,000 ticks are committed in several checkpoints, and the tables
    are exactly what one epoch would give."""
    ticks = tmp_path / "ticks.jsonl"
    made = run_flowgate("produce", "--rate", "0", "--count", "800000", "--symbol-count", "20",
                        "--duplicates", "0.01", "--malformed", "0.001", "--seed", "11", "--output", ticks)
    assert made.returncode == 0, made.stderr
    pipeline = tmp_path / "hourly.yaml"
    text = (REPO / "pipelines" / "ticks-file.yaml").read_text().replace("../target/", f"{REPO}/target/")
    assert "  interval: 5s\n" in text
    pipeline.write_text(text.replace("  interval: 5s\n", "  interval: 1h\n"))
    report = tmp_path / "report.json"
    out = run_flowgate("run", pipeline, "--until-idle", "1s", "--report", report,
                       env={"DATA_DIR": str(data_dir), "INPUT": str(ticks)})
    assert out.returncode == 0, out.stderr
    checkpoints = json.loads(report.read_text())["checkpoints"]
    assert checkpoints >= 2, f"{checkpoints} checkpoint(s): the epoch was not cut by size\n{out.stderr[-2000:]}"

    lines = ticks.read_text().splitlines()
    valid = parse_ticks(lines)
    want = expected_bars(valid, watermark_delay_ms=-10**12)
    got = read_bars(data_dir).to_pandas()
    assert len(got) == len(want) > 0
    assert list(got["trades"]) == list(want["trades"])
    assert list(got["volume"]) == list(want["volume"])
    np.testing.assert_allclose(got["close"], want["close"], rtol=1e-12)
    raw = read_raw(data_dir)
    assert len(raw) == len(valid.drop_duplicates(subset=["symbol", "ts"]))
    assert raw.select(["symbol", "ts"]).is_duplicated().sum() == 0

"""A stage that gains a column, as a user meets it: the pipeline's schema gets a new field while
its tables hold rows of the old shape. `flowgate validate` reports every table that does not fit
before anything runs; a Delta sink with `schema_mode: merge` adds the column (old rows read as
null); Parquet and CSV tables refuse the new shape instead of mixing files of two shapes."""
import json

import polars as pl
from deltalake import DeltaTable

from conftest import REPO, run_flowgate

PIPELINE = """
name: schema-change
source:
  file:
    path: {input}
schema:
  symbol: utf8
  price: float64
  ts: timestamp
{extra}
event_time: ts
transforms:
  - name: check
    plugin: {repo}/target/wasm32-wasip2/plugin/flowgate_validate.wasm
    config:
      rules:
        price: {{ not_null: true, min: 0 }}
sinks:
  ticks:
    delta:
      path: {data}/ticks
      partition_by: [date]
      schema_mode: {mode}
  {taps}
checkpoint:
  path: {data}/_checkpoints
  interval: 100ms
"""

TAPS = """raw:
    parquet:
      path: {data}/raw
  raw_csv:
    csv:
      path: {data}/raw_csv"""


def write_pipeline(tmp_path, data_dir, *, venue, mode="merge", taps=True):
    text = PIPELINE.format(
        input=tmp_path / "ticks.jsonl", repo=REPO, data=data_dir, mode=mode,
        extra="  venue: utf8" if venue else "",
        taps=TAPS.format(data=data_dir) if taps else "")
    path = tmp_path / f"pipeline-{'venue' if venue else 'plain'}-{mode}-{taps}.yaml"
    path.write_text(text)
    return path


def append_ticks(tmp_path, start, n, venue=None):
    with open(tmp_path / "ticks.jsonl", "a") as f:
        for i in range(start, start + n):
            tick = {"symbol": "AAPL", "price": 100.0 + i, "ts": f"2024-03-01T10:00:{i:02d}Z"}
            if venue:
                tick["venue"] = venue
            f.write(json.dumps(tick) + "\n")


def test_a_new_column_is_reported_by_validate_merged_into_delta_and_refused_by_file_tables(tmp_path, data_dir):
    append_ticks(tmp_path, 0, 10)
    first = write_pipeline(tmp_path, data_dir, venue=False)
    out = run_flowgate("run", first, "--until-idle", "1s")
    assert out.returncode == 0, out.stderr

    # The schema gains `venue`. Validate opens every table before anything runs.
    append_ticks(tmp_path, 10, 5, venue="XNAS")
    wider = write_pipeline(tmp_path, data_dir, venue=True)
    out = run_flowgate("validate", wider)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "sink `ticks` (delta) reads step `check`: the table fits after a schema merge: adds column(s) venue" in out.stdout, out.stdout
    for sink in ["raw", "raw_csv"]:
        assert f"sink `{sink}`: the table at `{data_dir}/{sink}` does not fit the stage's output" in out.stderr, out.stderr
    assert "the stage gives (symbol: string, price: float64, ts: timestamp[us, UTC], venue: string)" in out.stderr, out.stderr
    # The run refuses the same way, before it changes anything: no column added to the Delta
    # table (its sink comes first), no file of the new shape.
    files = sorted((data_dir / "raw").rglob("*.parquet"))
    out = run_flowgate("run", wider, "--until-idle", "1s")
    assert out.returncode == 2, out.stderr
    assert "sink `raw`: the table at" in out.stderr and "files of two shapes" in out.stderr, out.stderr
    table = DeltaTable(str(data_dir / "ticks"))
    assert len(table.to_pyarrow_table()) == 10
    assert "venue" not in [f.name for f in table.schema().fields]
    assert sorted((data_dir / "raw").rglob("*.parquet")) == files

    # Without the file taps, the Delta sink merges: the table gains `venue`, old rows read null.
    merged = write_pipeline(tmp_path, data_dir, venue=True, taps=False)
    out = run_flowgate("validate", merged)
    assert out.returncode == 0, out.stdout + out.stderr
    out = run_flowgate("run", merged, "--until-idle", "1s")
    assert out.returncode == 0, out.stderr
    ticks = pl.from_arrow(DeltaTable(str(data_dir / "ticks")).to_pyarrow_table()).sort("price")
    assert ticks.columns == ["symbol", "price", "ts", "date", "venue"], ticks.columns
    assert ticks["venue"].to_list() == [None] * 10 + ["XNAS"] * 5
    assert ticks["price"].to_list() == [100.0 + i for i in range(15)]

    # Strict mode (the default) refuses the wider table's shape the other way round too.
    strict = write_pipeline(tmp_path, data_dir, venue=False, mode="strict", taps=False)
    out = run_flowgate("validate", strict)
    assert out.returncode == 2
    assert "`schema_mode: merge` on a Delta sink adds new columns" in out.stderr, out.stderr

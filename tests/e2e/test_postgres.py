"""The PostgreSQL sink: bars upserted on (symbol, window_start), the deduplicated ticks appended,
the dead letter appended, each epoch's rows and offsets in one transaction; read back with
psycopg, an independent client, and compared with what pandas computes."""
import json
import random

import pandas as pd

from conftest import REPO, run_flowgate
from expected import expected_bars, parse_ticks
from test_engine import pipeline, write_ticks


def postgres_pipeline(tmp_path, url, schema, mode="upsert", bars_table="bars"):
    """ticks-file.yaml with its sinks in PostgreSQL (schema `schema`)."""
    text = pipeline(tmp_path, "pg.yaml").read_text()
    sinks = text.index("sinks:\n")
    checkpoint = text.index("checkpoint:\n")
    key = "      key: [symbol, window_start]\n" if mode == "upsert" else ""
    text = text[:sinks] + f"""sinks:
  bars:
    postgres:
      url: {url}
      table: {schema}.{bars_table}
      mode: {mode}
{key}  raw:
    from: dedup
    postgres:
      url: {url}
      table: {schema}.ticks

dead_letter:
  postgres:
    url: {url}
    table: {schema}.dead_letter

""" + text[checkpoint:]
    path = tmp_path / "pg.yaml"
    path.write_text(text)
    return path


def query(conn, sql):
    cur = conn.execute(sql)
    return pd.DataFrame(cur.fetchall(), columns=[d.name for d in cur.description])


def test_a_run_stopped_halfway_and_resumed_leaves_every_table_exact(tmp_path, pg_schema):
    url, schema, conn = pg_schema
    rng = random.Random(31)
    folder = tmp_path / "ticks"
    files = write_ticks(folder, rng)
    env = {"DATA_DIR": str(tmp_path / "data"), "INPUT": str(folder)}
    p = postgres_pipeline(tmp_path, url, schema)
    first = run_flowgate("run", p, "--max-records", "2500", env=env)
    assert first.returncode == 0, first.stderr
    assert "created PostgreSQL table" in first.stderr
    second = run_flowgate("run", p, "--until-idle", "2s", env=env)
    assert second.returncode == 0, second.stderr
    assert "resuming after offset" in second.stderr, second.stderr

    bars = query(conn, f"SELECT * FROM {schema}.bars ORDER BY symbol, window_start")
    want = pd.concat([expected_bars(parse_ticks(lines), watermark_delay_ms=5000) for lines in files.values()])
    want = want.sort_values(["symbol", "window_start"]).reset_index(drop=True)
    assert len(bars) == len(want) > 20
    assert list(bars["symbol"]) == list(want["symbol"])
    assert [pd.Timestamp(t) for t in bars["window_start"]] == list(want["window_start"])
    assert list(bars["trades"]) == list(want["trades"])
    assert list(bars["volume"]) == list(want["volume"])
    assert (bars["close"].astype(float) - want["close"]).abs().max() < 1e-9

    ticks = query(conn, f"SELECT symbol, ts FROM {schema}.ticks")
    everything = pd.concat([parse_ticks(lines) for lines in files.values()])
    assert len(ticks) == len(everything.drop_duplicates(subset=["symbol", "ts"]))
    assert not ticks.duplicated().any()

    dead = query(conn, f'SELECT stage, reason, topic, "partition", "offset" FROM {schema}.dead_letter')
    undecodable = sum(1 for lines in files.values() for l in lines if not l.endswith("}"))
    assert (dead["stage"] == "decode").sum() == undecodable > 0
    assert not dead[["topic", "partition", "offset"]].duplicated().any()

    offsets = query(conn, f"SELECT sink, topic, \"partition\", \"offset\" FROM {schema}.flowgate_offsets")
    assert sorted(offsets["sink"].unique()) == ["bars", "dead_letter", "raw"]
    assert set(zip(offsets["topic"], offsets["partition"])) == {(f"file:part-{f}.jsonl", 0) for f in range(3)}


def test_a_table_that_does_not_fit_stops_the_run_before_anything_is_read(tmp_path, pg_schema):
    url, schema, conn = pg_schema
    conn.execute(f"CREATE TABLE {schema}.bars (symbol text, window_start text)")
    folder = tmp_path / "ticks"
    write_ticks(folder, random.Random(3))
    p = postgres_pipeline(tmp_path, url, schema)
    out = run_flowgate("run", p, "--until-idle", "1s", env={"DATA_DIR": str(tmp_path / "data"), "INPUT": str(folder)})
    assert out.returncode == 2, out.stderr
    assert "does not fit the stage's output" in out.stderr
    assert "column `window_start` is text, the stage gives timestamptz" in out.stderr
    assert "no column `open` (float8)" in out.stderr
    # The password never shows; the place does.
    assert "postgres@127.0.0.1:5432/test" in out.stderr

"""The Prometheus endpoint of a running pipeline: /healthz, /readyz and /metrics, scraped while
the run is alive, checked against what was fed in and what the tables hold afterwards."""
import json
import os
import random
import re
import subprocess
import time
import urllib.error
import urllib.request

import polars as pl
from deltalake import DeltaTable

from conftest import FLOWGATE, REPO, free_port
from expected import parse_ticks
from test_engine import pipeline, write_ticks

SAMPLE = re.compile(r'^([a-z_]+)\{([^}]*)\} ([0-9.eE+-]+|NaN)$')


def scrape(port, path="/metrics"):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, "", e.read().decode()
    except OSError:
        return None, "", ""


def samples(text):
    """[(name, {label: value}, value)] of every sample line."""
    out = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            labels = dict(re.findall(r'([a-z_]+)="([^"]*)"', m.group(2)))
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def total(found, name, **want):
    return sum(v for n, labels, v in found if n == name and all(labels.get(k) == w for k, w in want.items()))


def test_a_running_pipeline_serves_metrics_that_match_what_it_did(tmp_path):
    rng = random.Random(41)
    folder = tmp_path / "ticks"
    files = write_ticks(folder, rng, late_every=300)
    lines = [l for f in files.values() for l in f if l.strip()]
    port = free_port()
    p = pipeline(tmp_path, "m.yaml", batch="{max_records: 200, max_wait: 20ms}")
    text = p.read_text().replace("interval: 5s", "interval: 200ms")
    p.write_text(text + f"\nmetrics:\n  listen: 127.0.0.1:{port}\n")
    data = tmp_path / "data"
    env = dict(os.environ, DATA_DIR=str(data), INPUT=str(folder))
    proc = subprocess.Popen([str(FLOWGATE), "run", str(p), "--until-idle", "6s"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        found, ready = [], None
        deadline = time.time() + 60
        while time.time() < deadline:
            if ready is None and scrape(port, "/readyz")[0] == 200:
                ready = True
            status, kind, body = scrape(port)
            if status == 200:
                found = samples(body)
                if total(found, "flowgate_records_in_total") == len(lines) and \
                        total(found, "flowgate_epoch_committed") >= 2:
                    break
            time.sleep(0.2)
        assert ready, "never ready"
        assert kind.startswith("application/openmetrics-text")
        assert scrape(port, "/healthz")[0] == 200
        assert scrape(port, "/nowhere")[0] == 404
        # Wait for one more commit, so everything counted is in the tables.
        epoch = total(found, "flowgate_epoch_committed")
        while time.time() < deadline and total(found, "flowgate_epoch_committed") < epoch + 2:
            time.sleep(0.2)
            found = samples(scrape(port)[2])
        metrics_text = scrape(port)[2]
        found = samples(metrics_text)
    finally:
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert all(labels.get("pipeline") == "ticks-file" for _, labels, _ in found)

    assert total(found, "flowgate_records_in_total") == len(lines)
    assert {(l["topic"], l["partition"]) for n, l, _ in found if n == "flowgate_records_in_total"} == \
        {(f"file:part-{f}.jsonl", "0") for f in range(3)}, "each file its own partition"
    assert total(found, "flowgate_batches_total") >= len(lines) / 200
    undecodable = sum(1 for l in lines if not l.endswith("}"))
    assert undecodable > 0
    assert total(found, "flowgate_rejected_total", stage="decode", reason="undecodable") == undecodable
    assert total(found, "flowgate_rejected_total", reason="late") >= 3

    raw = pl.read_parquet(sorted((data / "raw").glob("date=*/*.parquet")), hive_partitioning=True)
    assert total(found, "flowgate_sink_rows_total", sink="raw") == len(raw)
    dead = DeltaTable(str(data / "dead_letter")).to_pyarrow_table()
    assert total(found, "flowgate_sink_rows_total", sink="dead_letter") == len(dead)
    valid = parse_ticks(lines)
    assert len(raw) == len(valid.drop_duplicates(subset=["symbol", "ts"]))

    for step in ["validate", "dedup", "bars", "pct_change"]:
        assert total(found, "flowgate_step_call_seconds_count", stage=step) > 0, step
        assert total(found, "flowgate_wasm_memory_bytes", stage=step, partition="0") > 0, step
    assert total(found, "flowgate_sink_commit_seconds_count", sink="raw") >= 1
    ages = [v for n, l, v in found if n == "flowgate_sink_last_commit_age_seconds" and l["sink"] == "raw"]
    assert ages and 0 <= ages[0] < 10



def run_and_scrape(tmp_path, name, folder, batch, wait_until, seconds):
    """Runs the file pipeline over `folder` with `batch` and a checkpoint interval of an hour (so
    no barrier processes a batch early), scraping /metrics until `wait_until(samples)` or
    `seconds` pass; then stops it (SIGTERM: it finishes what it read and commits). Returns the
    last samples, the run report and the run's output."""
    port = free_port()
    p = pipeline(tmp_path, f"{name}.yaml", batch=batch)
    text = p.read_text().replace("interval: 5s", "interval: 1h")
    p.write_text(text + f"\nmetrics:\n  listen: 127.0.0.1:{port}\n")
    env = dict(os.environ, DATA_DIR=str(tmp_path / f"data-{name}"), INPUT=str(folder))
    report = tmp_path / f"{name}-report.json"
    proc = subprocess.Popen([str(FLOWGATE), "run", str(p), "--report", str(report)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found, ready = [], False
    try:
        deadline = time.time() + seconds
        while time.time() < deadline:
            ready = ready or scrape(port, "/readyz")[0] == 200
            status, _, body = scrape(port)
            if status == 200:
                found = samples(body)
                if wait_until(found):
                    break
            time.sleep(0.2)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=120)
    assert ready, f"never ready:\n{out}"
    assert proc.returncode == 0, out
    return found, json.loads(report.read_text()), out


def test_a_batch_goes_as_soon_as_nothing_more_of_the_input_is_ready(tmp_path):
    """With the default `linger: 0ms`, a batch is processed once the worker has nothing more
    queued, not when `max_wait` runs out: with `max_wait: 1h` and no checkpoint due for an hour,
    every record still reaches the last plugin. With `linger` as long as `max_wait`, batches are
    fixed again (full, or `max_wait`), so nothing is processed yet."""
    folder = tmp_path / "ticks"
    files = write_ticks(folder, random.Random(43))
    records = sum(1 for f in files.values() for l in f if l.strip())
    assert records < 16384, "every partition's records fit one batch"

    def done(found):
        return total(found, "flowgate_records_in_total") == records and \
            total(found, "flowgate_step_call_seconds_count", stage="pct_change") > 0

    found, _, out = run_and_scrape(tmp_path, "adaptive", folder, "{max_records: 16384, max_wait: 1h}", done, 60)
    assert done(found), out
    assert total(found, "flowgate_epoch_committed") == 0, "processed at a barrier, not by the batch rule"

    # Fixed batches: the files are read at once, then nothing is processed while the run is
    # watched (an hour's `max_wait`, no barrier).
    found, report, out = run_and_scrape(tmp_path, "fixed", folder,
                                        "{max_records: 16384, max_wait: 1h, linger: 1h}", lambda found: False, 5)
    assert total(found, "flowgate_batches_total") == 0, out
    assert total(found, "flowgate_records_in_total") == 0, out
    # They had been read, and went at the stop.
    assert report["records"] == records, out

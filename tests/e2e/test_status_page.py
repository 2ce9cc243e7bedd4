"""The live status page in a real headless browser (Debian's chromium, which .ci/run installs):
the page loads, draws a candle for each of the newest bars of a symbol, and shows the numbers
/metrics serves."""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from html.parser import HTMLParser

import polars as pl
from deltalake import DeltaTable

from conftest import FLOWGATE, REPO, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def metric(text, name, **labels):
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


class Dom(HTMLParser):
    """Elements of the rendered page by id, sink rows' cells, and the candles."""

    def __init__(self):
        super().__init__()
        self.ids, self.cells, self.candles, self.refused = {}, {}, [], {}
        self._row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids[a["id"]] = a
        if tag == "tr" and "data-sink" in a:
            self._row = ("sink", a["data-sink"])
        elif tag == "tr" and "data-reason" in a:
            self._row = ("refused", (a["data-stage"], a["data-reason"]))
        elif tag == "tr":
            self._row = None
        if tag == "td" and self._row and "data-value" in a:
            kind, key = self._row
            if kind == "sink":
                self.cells[(key, a.get("class", "").split()[-1])] = float(a["data-value"])
            else:
                self.refused[key] = float(a["data-value"])
        if tag == "rect" and "candle" in a.get("class", ""):
            self.candles.append(a)


def test_the_status_page_draws_the_bars_and_matches_the_metrics(data_dir, tmp_path):
    assert pathlib.Path(CHROMIUM).exists(), \
        "chromium is not installed: `apt-get install chromium` (.ci/run installs it)"
    count = 30000
    text = (REPO / "pipelines" / "demo.yaml").read_text().replace("../target/", f"{REPO}/target/")
    text = text.replace("    speedup: 30 ", f"    count: {count}\n    speedup: 30 ", 1)
    # No partition turns idle later and closes more windows: the tables hold still once read.
    text = text.replace("idle_timeout: 30s", "idle_timeout: 1h", 1)
    assert f"count: {count}" in text and "idle_timeout: 1h" in text
    pipeline = tmp_path / "demo.yaml"
    pipeline.write_text(text)
    port = free_port()
    env = dict(os.environ, DATA_DIR=str(data_dir), METRICS_LISTEN=f"127.0.0.1:{port}")
    run = subprocess.Popen([str(FLOWGATE), "run", str(pipeline)], cwd=REPO, env=env,
                           stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        # Wait until every tick is read and committed: the numbers hold still from then on.
        deadline = time.time() + 120
        while True:
            assert run.poll() is None, run.stderr.read()
            try:
                status = json.loads(get(f"{base}/status.json")[2])
                metrics = get(f"{base}/metrics")[2]
            except OSError:
                status, metrics = None, ""
            if status:
                committed = {t["name"]: t["rows"] for t in status["tables"]}
                handed = {s: metric(metrics, "flowgate_sink_rows_total", sink=s) for s in ("bars", "raw", "dead_letter")}
                if metric(metrics, "flowgate_records_in_total") == count and handed["raw"] > 0 \
                        and all(committed.get(s) == n for s, n in handed.items()):
                    break
            assert time.time() < deadline, f"the run did not read and commit {count} ticks: {metrics}"
            time.sleep(0.5)

        code, kind, page = get(f"{base}/")
        assert code == 200 and kind.startswith("text/html")
        bars = pl.from_arrow(DeltaTable(str(data_dir / "bars")).to_pyarrow_table())
        symbol = bars.group_by("symbol").len().sort(["len", "symbol"], descending=[True, False])["symbol"][0]
        dom = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--virtual-time-budget=5000", "--dump-dom", f"{base}/?key={symbol}"],
            capture_output=True, text=True, timeout=120)
        assert dom.returncode == 0, dom.stderr
        metrics = get(f"{base}/metrics")[2]
        parsed = Dom()
        parsed.feed(dom.stdout)

        # The header and the sinks table: the numbers /metrics has.
        assert float(parsed.ids["records-in"]["data-value"]) == metric(metrics, "flowgate_records_in_total") == count
        # Epochs go on being cut while the run idles: the page's is one /metrics had.
        assert 0 < float(parsed.ids["epoch"]["data-value"]) <= metric(metrics, "flowgate_epoch_committed")
        for sink in ("bars", "raw", "dead_letter"):
            handed = metric(metrics, "flowgate_sink_rows_total", sink=sink)
            assert parsed.cells[(sink, "handed")] == handed, (sink, parsed.cells)
            assert parsed.cells[(sink, "committed")] == handed, (sink, parsed.cells)
        assert parsed.cells[("bars", "committed")] == len(bars)
        # Refusals by stage and reason, as /metrics counts them (the demo's faults: every kind).
        assert {stage for stage, _ in parsed.refused} >= {"decode", "validate", "bars"}, parsed.refused
        for (stage, reason), rows in parsed.refused.items():
            assert rows == metric(metrics, "flowgate_rejected_total", stage=stage, reason=reason) > 0

        # A candle per bar of the symbol, the newest last, open and close as in the table.
        want = bars.filter(pl.col("symbol") == symbol).sort("window_start").tail(60)
        assert len(parsed.candles) == len(want) > 0, (len(parsed.candles), len(want))
        newest = parsed.candles[-1]
        assert float(newest["data-open"]) == want["open"][-1]
        assert float(newest["data-close"]) == want["close"][-1]
        assert newest["data-start"][:16] == want["window_start"][-1].strftime("%Y-%m-%dT%H:%M")
    finally:
        run.send_signal(signal.SIGTERM)
        try:
            _, err = run.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()
            _, err = run.communicate()
    assert run.returncode == 0, err
    assert f"status page at http://127.0.0.1:{port}/" in err

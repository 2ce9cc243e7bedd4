"""One stateful plugin in three languages (README, "Plugins in other languages"): a per-symbol
exponential moving average with snapshot and restore, written with the Rust SDK
(tests/plugins/ema), the JavaScript SDK (tests/plugins-js/ema) and the Python SDK
(tests/plugins-py/ema), each run against a Tansu broker on the same ticks. Each build must give
the table computed here independently, row for row and bit for bit, through kills with SIGKILL at
random moments and restarts (its state restored from checkpoints); and a run that starts on the
Rust build and is swapped live to the JavaScript one, then to the Python one, mid-stream, must
too: the averages are carried across in the state bytes the three SDKs write alike."""
import json
import os
import random
import re
import signal
import subprocess
import time

import polars as pl
import pytest
from confluent_kafka import Producer
from deltalake import DeltaTable
from kafka.admin import KafkaAdminClient, NewTopic

from conftest import FLOWGATE, REPO

PLUGINS = REPO / "target" / "wasm32-wasip2" / "plugin"
BUILDS = {
    "rust": PLUGINS / "flowgate_test_ema.wasm",
    "js": PLUGINS / "flowgate_test_ema_js.wasm",
    "python": PLUGINS / "flowgate_test_ema_py.wasm",
}
SYMBOLS = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "NFLX", "BRK.B", "JPM"]
ALPHA = 0.3


def pipeline(tmp_path, name, build, data_dir):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""name: {name}
source:
  kafka:
    brokers: ${{KAFKA_BROKERS}}
    topic: ticks
    group: {name}
    start: earliest
    options:
      # A member killed with SIGKILL is given up after 6 s, not librdkafka's 45.
      session.timeout.ms: "6000"
      heartbeat.interval.ms: "500"
format: json
schema:
  symbol: utf8
  price: float64
  ts: timestamp
batch:
  max_records: 512
  max_wait: 50ms
transforms:
  - name: ema
    plugin: {BUILDS[build]}
    config:
      key: symbol
      column: price
      alpha: {ALPHA}
sinks:
  averages:
    delta:
      path: {data_dir / name}
checkpoint:
  path: {data_dir / name}_checkpoints
  interval: 1s
""")
    return path


def ticks(rng, count, start_us):
    """Ticks with microsecond timestamps (some a float millisecond cannot hold), a few without a
    price; keyed by symbol, as a producer keeps each symbol's ticks in order."""
    out = []
    ts = start_us
    prices = {s: 100.0 + 7 * i for i, s in enumerate(SYMBOLS)}
    for _ in range(count):
        ts += rng.randint(1, 40_000)
        symbol = rng.choice(SYMBOLS)
        prices[symbol] = round(prices[symbol] * (1 + rng.gauss(0, 0.002)), 4)
        price = None if rng.random() < 0.01 else prices[symbol]
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts // 1_000_000)) + f".{ts % 1_000_000:06d}Z"
        out.append((symbol, ts, price, json.dumps({"symbol": symbol, "price": price, "ts": stamp})))
    return out


def produce(broker, rows):
    producer = Producer({"bootstrap.servers": broker, "linger.ms": 5})
    for symbol, _, _, value in rows:
        producer.produce("ticks", key=symbol.encode(), value=value.encode())
    assert producer.flush(60) == 0


def expected(rows):
    """{(symbol, ts µs): (price, ema)} computed the way the plugin is specified."""
    averages = {}
    out = {}
    for symbol, ts, price, _ in rows:
        if price is None:
            out[(symbol, ts)] = (None, None)
            continue
        previous = averages.get(symbol)
        average = price if previous is None else ALPHA * price + (1 - ALPHA) * previous
        averages[symbol] = average
        out[(symbol, ts)] = (price, average)
    return out


def table(path):
    frame = pl.from_arrow(DeltaTable(str(path)).to_pyarrow_table())
    return frame.with_columns(pl.col("ts").cast(pl.Int64).alias("us"))


def assert_same(frame, want):
    got = {(r["symbol"], r["us"]): (r["price"], r["ema"]) for r in frame.iter_rows(named=True)}
    assert len(frame) == len(got), "a row written twice"
    assert got.keys() == want.keys(), (len(got), len(want))
    differ = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    assert not differ, differ[:5]


def create_topic(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic("ticks", num_partitions=3, replication_factor=1)])
    admin.close()


def start(path, env, log):
    return subprocess.Popen([str(FLOWGATE), "run", str(path)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def run_to_idle(path, env):
    out = subprocess.run([str(FLOWGATE), "run", str(path), "--until-idle", "3s"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.mark.parametrize("build", list(BUILDS))
def test_each_build_gives_the_same_table_through_kill_9(build, broker, tmp_path, data_dir):
    assert BUILDS[build].is_file(), f"{BUILDS[build]} is missing: run `make test-plugins js-test-plugins py-test-plugins`"
    create_topic(broker)
    rng = random.Random(20)
    rows = ticks(rng, 6000, 1_762_957_800_000_000)
    want = expected(rows)
    env = dict(os.environ, KAFKA_BROKERS=broker, RUST_LOG="flowgate=info")
    # Killed with SIGKILL three times. The plugin's compile is cached first, so a start is quick;
    # each start then gets a new tranche of ticks and is killed only once it has committed rows
    # of it (restored averages in use), a random moment later.
    name = f"ema-{build}"
    path = pipeline(tmp_path, name, build, data_dir)
    out = subprocess.run([str(FLOWGATE), "validate", str(path)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    tranches = [rows[i:i + 1000] for i in range(0, len(rows), 1000)]
    produce(broker, tranches[0])
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "w") as log:
        for kill in range(3):
            proc = start(path, env, log)
            produce(broker, tranches[kill + 1])
            wait_rows(data_dir / name, 1000 * (kill + 1) + 1, proc, log_path)
            time.sleep(rng.uniform(0.0, 1.5))
            assert proc.poll() is None, log_path.read_text()[-4000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    for tranche in tranches[4:]:
        produce(broker, tranche)
    run_to_idle(path, env)
    assert_same(table(data_dir / name), want)
    assert log_path.read_text().count("resuming after offset") >= 2, log_path.read_text()[-3000:]


def swap_to(path, build, proc, log_path, swaps):
    """Rewrites the pipeline file to use another build, and waits for the live swap."""
    text = re.sub(r"plugin: .*", f"plugin: {BUILDS[build]}", path.read_text())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    deadline = time.time() + 120
    while log_path.read_text().count("live swap: switched to the new steps") < swaps:
        assert proc.poll() is None, log_path.read_text()[-4000:]
        assert time.time() < deadline, log_path.read_text()[-4000:]
        time.sleep(0.2)


def test_live_swaps_from_rust_to_javascript_to_python_keep_the_averages(broker, tmp_path, data_dir):
    create_topic(broker)
    rng = random.Random(21)
    rows = ticks(rng, 6000, 1_762_957_800_000_000)
    parts = [rows[:2000], rows[2000:4000], rows[4000:]]
    want = expected(rows)
    path = pipeline(tmp_path, "ema-swap", "rust", data_dir)
    env = dict(os.environ, KAFKA_BROKERS=broker, RUST_LOG="flowgate=info")
    log_path = tmp_path / "swap.log"
    produce(broker, parts[0])
    with open(log_path, "w") as log:
        proc = start(path, env, log)
        try:
            wait_rows(data_dir / "ema-swap", 2000, proc, log_path)
            swap_to(path, "js", proc, log_path, 1)
            produce(broker, parts[1])
            wait_rows(data_dir / "ema-swap", 4000, proc, log_path)
            swap_to(path, "python", proc, log_path, 2)
            produce(broker, parts[2])
            wait_rows(data_dir / "ema-swap", len(rows), proc, log_path)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    text = log_path.read_text()
    assert "refused" not in text, text[-4000:]
    assert_same(table(data_dir / "ema-swap"), want)


def wait_rows(path, count, proc, log_path, seconds=180):
    deadline = time.time() + seconds
    while True:
        try:
            if len(DeltaTable(str(path)).to_pyarrow_table()) >= count:
                return
        except Exception:  # noqa: BLE001 - the table may not exist yet
            pass
        assert proc.poll() is None, log_path.read_text()[-4000:]
        assert time.time() < deadline, log_path.read_text()[-4000:]
        time.sleep(0.5)

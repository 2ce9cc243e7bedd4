"""One stateful plugin in several languages (README, "Plugins in other languages"): a per-symbol
exponential moving average with snapshot and restore, written with the Rust SDK
(tests/plugins/ema) and the JavaScript SDK (tests/plugins-js/ema), each run against a Tansu
broker on the same ticks. Each must give the table computed here independently, row for row and
bit for bit: the Rust build straight through, the JavaScript build through kills with SIGKILL at
random moments and restarts (its state restored from checkpoints), and a run that starts on the
Rust build and is swapped live to the JavaScript one mid-stream, the averages carried across in
the state bytes both SDKs write."""
import json
import os
import random
import re
import signal
import subprocess
import time

import polars as pl
from confluent_kafka import Producer
from deltalake import DeltaTable
from kafka.admin import KafkaAdminClient, NewTopic

from conftest import FLOWGATE, REPO

PLUGINS = REPO / "target" / "wasm32-wasip2" / "plugin"
BUILDS = {"rust": PLUGINS / "flowgate_test_ema.wasm", "js": PLUGINS / "flowgate_test_ema_js.wasm"}
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


def test_rust_and_javascript_builds_give_the_same_table_through_kill_9(broker, tmp_path, data_dir):
    for build in BUILDS.values():
        assert build.is_file(), f"{build} is missing: run `make test-plugins js-test-plugins`"
    create_topic(broker)
    rng = random.Random(20)
    rows = ticks(rng, 6000, 1_762_957_800_000_000)
    want = expected(rows)
    env = dict(os.environ, KAFKA_BROKERS=broker, RUST_LOG="flowgate=info")
    # The JavaScript build, killed with SIGKILL three times. Its compile is cached first, so a start
    # is quick; each start then gets a new tranche of ticks and is killed only once it has
    # committed rows of it (restored averages in use), a random moment later.
    path = pipeline(tmp_path, "ema-js", "js", data_dir)
    out = subprocess.run([str(FLOWGATE), "validate", str(path)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    tranches = [rows[i:i + 1000] for i in range(0, len(rows), 1000)]
    produce(broker, tranches[0])
    log_path = tmp_path / "ema-js.log"
    with open(log_path, "w") as log:
        for kill in range(3):
            proc = start(path, env, log)
            produce(broker, tranches[kill + 1])
            wait_rows(data_dir / "ema-js", 1000 * (kill + 1) + 1, proc, log_path)
            time.sleep(rng.uniform(0.0, 1.5))
            assert proc.poll() is None, log_path.read_text()[-4000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    for tranche in tranches[4:]:
        produce(broker, tranche)
    run_to_idle(path, env)
    assert_same(table(data_dir / "ema-js"), want)
    assert log_path.read_text().count("resuming after offset") >= 2, log_path.read_text()[-3000:]

    # The Rust build, straight through the same ticks.
    run_to_idle(pipeline(tmp_path, "ema-rust", "rust", data_dir), env)
    assert_same(table(data_dir / "ema-rust"), want)


def test_a_live_swap_from_the_rust_build_to_the_javascript_one_keeps_the_averages(broker, tmp_path, data_dir):
    create_topic(broker)
    rng = random.Random(21)
    rows = ticks(rng, 4000, 1_762_957_800_000_000)
    first, second = rows[:2000], rows[2000:]
    want = expected(rows)
    path = pipeline(tmp_path, "ema-swap", "rust", data_dir)
    env = dict(os.environ, KAFKA_BROKERS=broker, RUST_LOG="flowgate=info")
    log_path = tmp_path / "swap.log"
    produce(broker, first)
    with open(log_path, "w") as log:
        proc = start(path, env, log)
        try:
            wait_rows(data_dir / "ema-swap", len(first), proc, log_path)
            text = path.read_text().replace(str(BUILDS["rust"]), str(BUILDS["js"]))
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
            deadline = time.time() + 120
            while not re.search(r"live swap: switched to the new steps", log_path.read_text()):
                assert proc.poll() is None, log_path.read_text()[-4000:]
                assert time.time() < deadline, log_path.read_text()[-4000:]
                time.sleep(0.2)
            produce(broker, second)
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

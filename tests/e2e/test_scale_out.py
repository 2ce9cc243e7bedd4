"""Right answers for any producer and any number of processes: `pipelines/stocks.yaml` (with its
repartition hop) against Tansu, ticks produced as real producers send them: without a Kafka key
(`producer.produce(topic, value=...)`), microsecond timestamps, into 3 partitions, some sent
twice, some malformed, invalid or late. Every table is compared record by record with what
pandas computes from what was produced:

- keyless producers with 1 and 2 processes sharing the group (keyed ones: test_kafka_pipeline.py);
- the scale-out run: 3 processes on separate working folders (as separate hosts would be), the
  tables and the checkpoint store on S3 (moto), one member at a time killed with SIGKILL and
  restarted, two live swaps during the kills.
"""
import json
import os
import random
import signal
import subprocess
import threading
import time

import pandas as pd
import polars as pl
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from deltalake import DeltaTable
from kafka.admin import KafkaAdminClient, NewTopic

from conftest import FLOWGATE, REPO
from expected import expected_bars_hop, parse_ticks

SYMBOLS = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "NFLX"]
DELAY = pd.Timedelta(seconds=5)
PARTITIONS = 3


class Feed:
    """Ticks in event-time order with µs timestamps; 3% sent twice, 0.2% malformed, 0.2% with a
    negative price, 0.3% ten minutes late. Remembers where each landed."""

    def __init__(self, bootstrap, rng, keyed):
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "batch.num.messages": 1})
        self.rng, self.keyed = rng, keyed
        self.ts = pd.Timestamp("2025-11-12T14:30:00.000001Z")
        self.prices = {s: 100.0 + 10 * i for i, s in enumerate(SYMBOLS)}
        self.delivered = []  # (partition, offset, value)
        self.errors = []
        self.lock = threading.Lock()

    def _sent(self, err, msg):
        with self.lock:
            if err is not None:
                self.errors.append(err)
            else:
                self.delivered.append((msg.partition(), msg.offset(), msg.value().decode()))

    def _produce(self, sym, value):
        if self.keyed:
            self.producer.produce("ticks", key=sym.encode(), value=value.encode(), on_delivery=self._sent)
        else:
            self.producer.produce("ticks", value=value.encode(), on_delivery=self._sent)

    def send(self, count):
        for _ in range(count):
            sym = self.rng.choice(SYMBOLS)
            self.ts += pd.Timedelta(microseconds=self.rng.randint(20_000, 80_000))
            ts = self.ts
            if self.rng.random() < 0.003:
                ts = ts - pd.Timedelta(minutes=10)
            self.prices[sym] = round(self.prices[sym] * (1 + self.rng.gauss(0, 0.001)), 2)
            tick = {"symbol": sym, "price": self.prices[sym], "volume": self.rng.randint(1, 500),
                    "ts": ts.isoformat(), "ts_epoch_ms": int(ts.value // 1_000_000)}
            r = self.rng.random()
            if r < 0.002:
                value = json.dumps(tick)[:25]
            elif r < 0.004:
                value = json.dumps(dict(tick, price=-1.0))
            else:
                value = json.dumps(tick)
            self._produce(sym, value)
            if r > 0.97:
                self._produce(sym, value)
            self.producer.poll(0)
        assert self.producer.flush(60) == 0
        assert not self.errors, self.errors


def event_time(value):
    try:
        t = json.loads(value)
        return pd.Timestamp(t["ts"]).tz_convert("UTC").floor("us")
    except Exception:
        return None


def expectations(delivered):
    """What the tables must hold. Per source partition, in offset order: a record is late when its
    event time is behind the partition's watermark (the newest event time before it less 5 s)."""
    by_partition = {}
    for p, offset, value in sorted(delivered):
        by_partition.setdefault(p, []).append((offset, value))
    kept, refused = {}, set()
    for p, rows in by_partition.items():
        newest = None
        for offset, value in rows:
            t = event_time(value)
            if t is None:
                refused.add((p, offset))  # does not decode
                continue
            if newest is not None and t < newest - DELAY:
                refused.add((p, offset))  # late, judged before the hop
                continue
            newest = t if newest is None or t > newest else newest
            kept.setdefault(p, []).append(value)
            if not len(parse_ticks([value])):
                refused.add((p, offset))  # refused by validate, behind the hop
    bars = expected_bars_hop(kept, 5000)
    valid = parse_ticks([v for values in kept.values() for v in values]).drop_duplicates(subset=["symbol", "ts"])
    return bars, valid, refused


def check(read_delta, read_raw, delivered, broker=None):
    want_bars, valid, refused = expectations(delivered)
    bars = read_delta("bars").sort(["symbol", "window_start"]).to_pandas()
    dup = bars[bars.duplicated(subset=["symbol", "window_start"], keep=False)]
    assert dup.empty, f"bars written twice:\n{dup}"
    got = set(zip(bars["symbol"], bars["window_start"]))
    want = set(zip(want_bars["symbol"], want_bars["window_start"]))
    assert not (want - got), f"bars missing: {sorted(want - got)[:10]}"
    assert not (got - want), f"bars nobody asked for: {sorted(got - want)[:10]}"
    assert list(bars["trades"]) == list(want_bars["trades"]), partial_trades(bars, want_bars, valid, read_raw,
                                                                             read_delta, delivered, broker)
    assert list(bars["volume"]) == list(want_bars["volume"])
    assert (bars["open"] - want_bars["open"]).abs().max() < 1e-9
    assert (bars["close"] - want_bars["close"]).abs().max() < 1e-9
    both = bars["pct_change"].isna() & want_bars["pct_change"].isna()
    diff = (bars["pct_change"].astype(float) - want_bars["pct_change"].astype(float)).abs()
    assert (both | (diff < 1e-9)).all(), "pct_change differs"
    raw = read_raw()
    assert raw.select(["symbol", "ts"]).is_duplicated().sum() == 0, "a tick written twice"
    assert len(raw) == len(valid)
    dead = read_delta("dead_letter")
    got = list(zip(dead["topic"].to_list(), dead["partition"].to_list(), dead["offset"].to_list()))
    assert len(got) == len(set(got)), "a refused record written twice"
    assert set(got) == {("ticks", p, o) for p, o in refused}
    late = dead.filter(pl.col("reason").str.starts_with("late"))
    assert len(late) > 0 and set(late["stage"].to_list()) == {"repartition"}


def partial_trades(bars, want_bars, valid, read_raw, read_delta, delivered, broker=None):
    """Why a bar has other trades than expected: for each such bar, the ticks of its window that
    the raw table lacks, where each was produced, and whether the dead letter has it (a window
    closed early) or not (lost before the raw tap: at the source, a hop message or its copy
    check)."""
    try:
        return _partial_trades(bars, want_bars, valid, read_raw, read_delta, delivered, broker)
    except Exception as e:  # noqa: BLE001 - the failure is reported either way
        return f"a bar of partial trades (and explaining it failed: {e!r})"


def _partial_trades(bars, want_bars, valid, read_raw, read_delta, delivered, broker):
    lines = ["a bar of partial trades:"]
    crossed = hop_messages(broker) if broker else None
    raw = read_raw().to_pandas()
    raw_keys = set(zip(raw["symbol"], pd.to_datetime(raw["ts"], utc=True)))
    dead = read_delta("dead_letter").to_pandas()
    dead_payloads = set(dead["payload"])
    where = {}
    for p, o, value in delivered:
        t = event_time(value)
        if t is not None:
            where.setdefault((json.loads(value).get("symbol"), t), []).append((p, o, value))
    differ = bars.index[bars["trades"].to_numpy() != want_bars["trades"].to_numpy()]
    for i in differ[:5]:
        symbol, start = bars["symbol"].iloc[i], bars["window_start"].iloc[i]
        lines.append(f"  {symbol} {start}: {bars['trades'].iloc[i]} trades, want {want_bars['trades'].iloc[i]}")
        start = pd.Timestamp(start).tz_convert("UTC") if pd.Timestamp(start).tzinfo else pd.Timestamp(start, tz="UTC")
        window = valid[(valid["symbol"] == symbol) & (valid["ts"] >= start) & (valid["ts"] < start + pd.Timedelta(minutes=1))]
        for ts in window["ts"]:
            if (symbol, ts) not in raw_keys:
                sent = where.get((symbol, ts), [])
                lines.append(f"    tick {ts} not in raw; produced at (partition, offset) "
                             f"{[(p, o) for p, o, _ in sent]}; in the dead letter: "
                             f"{any(v in dead_payloads for _, _, v in sent)}")
                if crossed is not None:
                    for p, o, _ in sent:
                        lines.append(f"      crossed the hop as (internal partition, offset, watermark): "
                                     f"{crossed.get(('ticks', p, o), 'never')}")
    return "\n".join(lines)


def hop_messages(broker, topic="stocks-repartition"):
    """Where each source record's row crossed the hop: (source topic, partition, offset) →
    [(internal partition, offset, watermark header)], read from the internal topic's start."""
    import pyarrow.ipc as ipc
    consumer = Consumer({"bootstrap.servers": broker, "group.id": f"trace-{time.time()}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    crossed = {}
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        ends = {}
        parts = []
        for p in meta.partitions:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            ends[p] = high
            parts.append(TopicPartition(topic, p, 0))
        consumer.assign(parts)
        done = {p for p, high in ends.items() if high == 0}
        deadline = time.time() + 60
        while len(done) < len(ends) and time.time() < deadline:
            m = consumer.poll(1.0)
            if m is None or m.error():
                continue
            if m.offset() + 1 >= ends[m.partition()]:
                done.add(m.partition())
            headers = {k: (v or b"").decode() for k, v in (m.headers() or [])}
            if not m.value():
                continue
            rows = ipc.open_stream(m.value()).read_all()
            for o in rows.column("_flowgate_source_offset").to_pylist():
                key = (headers.get("flowgate-source-topic"), int(headers.get("flowgate-source-partition", -1)), o)
                crossed.setdefault(key, []).append((m.partition(), m.offset(), headers.get("flowgate-watermark")))
    finally:
        consumer.close()
    return crossed


def pipeline_copy(folder, lake=None):
    """stocks.yaml in a working folder of its own, plugins by absolute path."""
    text = (REPO / "pipelines" / "stocks.yaml").read_text().replace("../target/", f"{REPO}/target/")
    text = text.replace("  interval: 5s\n", "  interval: 1s\n")
    strategy = os.environ.get("FLOWGATE_TEST_ASSIGNOR")
    if strategy:
        text = text.replace("    options:\n", f"    options:\n      partition.assignment.strategy: {strategy}\n", 1)
    path = folder / "stocks.yaml"
    path.write_text(text)
    return path


def committed_to_the_end(broker, group, topic):
    """Whether `group` committed every partition of `topic` to its end."""
    consumer = Consumer({"bootstrap.servers": broker, "group.id": group, "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        parts = [TopicPartition(topic, p) for p in meta.partitions]
        committed = {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > 0 and committed.get(p, -1) < high:
                return False
        return True
    finally:
        consumer.close()


def finish(broker, group, pipeline, env, log):
    """Runs to idle until both groups (the source's and the hop's) committed everything."""
    env = dict(env, GROUP=group)
    for attempt in range(4):
        out = subprocess.run([str(FLOWGATE), "run", str(pipeline), "--until-idle", "12s"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=600)
        log.write(f"=== final run {attempt + 1}\n" + out.stderr)
        assert out.returncode == 0, out.stderr[-3000:]
        if committed_to_the_end(broker, group, "ticks") and \
                committed_to_the_end(broker, f"{group}-repartition", "stocks-repartition"):
            return
    pytest.fail("the groups never committed to the end")


# Keyed with one process: test_kafka_pipeline.py (the same pipeline, bars compared exactly); keyed
# with three here.
@pytest.mark.parametrize("keyed,processes", [(False, 1), (False, 2), (True, 3)])
def test_keyed_and_keyless_producers_give_the_same_exact_tables(broker, tmp_path, data_dir, keyed, processes):
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic("ticks", num_partitions=PARTITIONS, replication_factor=1)])
    admin.close()
    feed = Feed(broker, random.Random(11), keyed)
    feed.send(4000)
    pipeline = pipeline_copy(tmp_path)
    env = dict(os.environ, DATA_DIR=str(data_dir), KAFKA_BROKERS=broker, GROUP="same",
               KAFKA_SESSION_TIMEOUT_MS="1000", KAFKA_HEARTBEAT_MS="250", KAFKA_MAX_POLL_INTERVAL_MS="10000")
    procs = [subprocess.Popen([str(FLOWGATE), "run", str(pipeline), "--until-idle", "10s"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(processes)]
    time.sleep(3)
    feed.send(2000)  # while they run
    logs = [p.communicate(timeout=600)[1] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    with open(tmp_path / "flowgate.log", "w") as log:
        finish(broker, "same", pipeline, env, log)
    check(lambda t: pl.from_arrow(DeltaTable(str(data_dir / t)).to_pyarrow_table()),
          lambda: pl.read_parquet(sorted((data_dir / "raw").glob("date=*/*.parquet")), hive_partitioning=True),
          feed.delivered)
    if processes > 1:
        assert sum("partition assigned" in log for log in logs) >= 2, "the group shared the work"


def test_three_processes_on_s3_killed_one_at_a_time_with_live_swaps(broker, s3, tmp_path):
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic("ticks", num_partitions=PARTITIONS, replication_factor=1)])
    admin.close()
    rng = random.Random(int(os.environ.get("FLOWGATE_CHAOS_SEED", "3")))
    feed = Feed(broker, rng, keyed=False)
    feed.send(3000)
    lake = "s3://flowgate/scale"
    base = dict(os.environ, **s3["env"], KAFKA_BROKERS=broker, GROUP="scale", LAKE=lake,
                CHECKPOINTS=f"{lake}/_checkpoints", KAFKA_SESSION_TIMEOUT_MS="3000", KAFKA_HEARTBEAT_MS="500",
                KAFKA_MAX_POLL_INTERVAL_MS="10000", RUST_LOG="flowgate=info")
    hosts = []
    for i in range(3):
        folder = tmp_path / f"host{i}"
        folder.mkdir()
        env = dict(base, DATA_DIR=str(folder / "data"), FLOWGATE_CACHE_DIR=str(tmp_path / "cache"))
        hosts.append({"folder": folder, "pipeline": pipeline_copy(folder), "env": env,
                      "log": open(folder / "flowgate.log", "w"), "proc": None})
    # Compile the plugins into the shared cache first, so early kills do not land in compiling.
    warm = subprocess.run([str(FLOWGATE), "validate", str(hosts[0]["pipeline"])], cwd=REPO, env=hosts[0]["env"],
                          capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stdout + warm.stderr

    def start(host):
        host["proc"] = subprocess.Popen([str(FLOWGATE), "run", str(host["pipeline"])], cwd=host["folder"],
                                        env=host["env"], stdout=host["log"], stderr=subprocess.STDOUT)

    stop_live = threading.Event()

    def live():
        while not stop_live.is_set():
            feed.send(150)
            time.sleep(0.4)

    for host in hosts:
        start(host)
    producer = threading.Thread(target=live)
    producer.start()
    swaps = [
        # dedup remembers keys a minute longer: its state is restored with the new retention.
        ("retention: 10m", "retention: 11m"),
        # one more rule that every tick passes: validate is a new instance, the others carried.
        ("volume: { not_null: true, min: 0 }", "volume: { not_null: true, min: 0, max: 1000000000 }"),
    ]
    try:
        for kill in range(6):
            time.sleep(rng.uniform(2, 6))
            if kill in (1, 3):
                old, new = swaps.pop(0)
                for host in hosts:
                    text = host["pipeline"].read_text()
                    assert old in text, old
                    tmp = host["pipeline"].with_suffix(".tmp")
                    tmp.write_text(text.replace(old, new))
                    os.replace(tmp, host["pipeline"])
                time.sleep(3)
            victim = rng.choice(hosts)
            assert victim["proc"].poll() is None, (victim["folder"] / "flowgate.log").read_text()[-3000:]
            victim["proc"].send_signal(signal.SIGKILL)
            victim["proc"].wait()
            start(victim)
    finally:
        stop_live.set()
        producer.join()
    time.sleep(3)
    # A rolling stop, one member at a time (Tansu 0.6 stops assigning a group's partitions after
    # several members leave it at the same moment): each finishes and commits what it read.
    for host in hosts:
        host["proc"].send_signal(signal.SIGTERM)
        assert host["proc"].wait(timeout=120) == 0, (host["folder"] / "flowgate.log").read_text()[-3000:]
        host["log"].close()
        time.sleep(4)
    # The last run joins a group of its own: Tansu 0.6 can leave a group that lived through
    # this many joins, kills and leaves assigning nothing. Positions live in the sinks, not in
    # the group, so a new group goes on exactly where the tables stand.
    with open(tmp_path / "final.log", "w") as log:
        finish(broker, "scale-final", hosts[0]["pipeline"], hosts[0]["env"], log)
    logs = "".join((h["folder"] / "flowgate.log").read_text() for h in hosts)
    assert "live swap: switched to the new steps" in logs, "no live swap applied during the kills"

    options = dict(s3["env"])

    def read_delta(table):
        return pl.from_arrow(DeltaTable(f"{lake}/{table}", storage_options=options).to_pyarrow_table())

    def read_raw():
        import io
        import pyarrow.parquet as pq
        client = s3["client"]
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="flowgate", Prefix="scale/raw/"):
            keys += [o["Key"] for o in page.get("Contents", [])]
        data = sorted(k for k in keys if k.endswith(".parquet") and "/_flowgate_" not in k)
        return pl.concat([pl.from_arrow(pq.read_table(io.BytesIO(client.get_object(Bucket="flowgate", Key=k)["Body"].read())))
                          for k in data])

    check(read_delta, read_raw, feed.delivered, broker)

"""pipelines/stocks.yaml against a real Kafka-protocol broker (Tansu, a separate process on a free
loopback port). Ticks are produced with confluent-kafka (an independent client) — with duplicates,
malformed and invalid records — and consumed by flowgate in a bounded run and a resumed run; a
late batch follows in a third run. The Delta tables are read back with the deltalake package and
compared with bars computed by pandas: nothing lost, nothing duplicated."""
import json
import os
import pathlib
import random
import subprocess
import time

import pandas as pd
import polars as pl
import pytest
from confluent_kafka import Producer
from deltalake import DeltaTable
from kafka.admin import KafkaAdminClient, NewTopic

from conftest import FLOWGATE, REPO, run_flowgate
from expected import expected_bars, expected_bars_hop, parse_ticks

SYMBOLS = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META"]
PARTITIONS = 3


def make_ticks(rng, start, count):
    """Random-walk ticks in event-time order, 250 ms apart, with ~3% repeated deliveries."""
    prices = {s: 100.0 + 50 * i for i, s in enumerate(SYMBOLS)}
    lines = []
    for i in range(count):
        sym = rng.choice(SYMBOLS)
        prices[sym] = round(prices[sym] * (1 + rng.gauss(0, 0.001)), 2)
        ts = start + pd.Timedelta(milliseconds=250 * i + rng.randint(0, 200))
        tick = {"symbol": sym, "price": prices[sym], "volume": rng.randint(1, 500),
                "ts": ts.isoformat(), "ts_epoch_ms": int(ts.value // 1_000_000)}
        lines.append((sym, json.dumps(tick)))
        if rng.random() < 0.03:
            lines.append((sym, json.dumps(tick)))
    return lines


def produce(bootstrap, keyed_lines, timeout=30):
    # One record per produce request: Tansu 0.6 (memory storage) returns nothing to a fetch that
    # starts inside a multi-record batch, so a consumer resuming mid-batch would stall. Seen with
    # confluent-kafka as the consumer too; single-record batches keep every offset a batch start.
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "batch.num.messages": 1})
    partitions = {}
    errors = []

    def delivered(err, msg):
        if err is not None:
            errors.append(err)
        else:
            partitions.setdefault(msg.partition(), []).append(msg.value().decode())

    for key, value in keyed_lines:
        producer.produce("ticks", key=key.encode(), value=value.encode(), on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(timeout) == 0
    assert not errors, errors
    return partitions


def read(data_dir, table):
    return pl.from_arrow(DeltaTable(str(data_dir / table)).to_pyarrow_table())


def test_stocks_pipeline_against_tansu_is_exactly_once(broker, data_dir):
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic("ticks", num_partitions=PARTITIONS, replication_factor=1)])
    admin.close()

    rng = random.Random(42)
    start = pd.Timestamp("2025-11-12T14:30:00Z")
    keyed = make_ticks(rng, start, 2400)  # 10 minutes of event time
    # Invalid ticks stamped like their neighbours (a tick far behind its partition's watermark
    # is refused as late before any rule is checked).
    at = lambda i: json.loads(keyed[300 + i * 500 - 1][1])["ts"]
    bad = [("AAPL", '{"symbol":"AAPL","price":'), ("MSFT", "not json at all"),
           ("NVDA", json.dumps({"symbol": "NVDA", "price": -1.0, "volume": 3, "ts": at(2)})),
           ("META", json.dumps({"symbol": "meta", "price": 10.0, "volume": 3, "ts": at(3)}))]
    for i, b in enumerate(bad):
        keyed.insert(300 + i * 500, b)
    by_partition = produce(broker, keyed)

    env = {"DATA_DIR": str(data_dir), "KAFKA_BROKERS": broker, "GROUP": "e2e"}
    first = run_flowgate("run", "pipelines/stocks.yaml", "--max-records", "300", env=env)
    assert first.returncode == 0, first.stderr
    report_file = data_dir / "report.json"
    second = run_flowgate("run", "pipelines/stocks.yaml", "--until-idle", "3s", "--report", report_file, env=env)
    assert second.returncode == 0, second.stderr

    # The run report: every record read counted, each stage timed, every record's latency seen.
    report = json.loads(report_file.read_text())
    assert report["records"] == len(keyed) - 300
    # Both halves of the repartition hop are timed: decode upstream, the steps and sinks keyed.
    stages = {s["stage"]: s for s in report["stages"]}
    for stage in ["upstream: decode", "upstream: sink repartition commit", "keyed: step validate",
                  "keyed: step dedup", "keyed: step bars", "keyed: step pct_change",
                  "keyed: sink bars encode", "keyed: sink raw encode", "keyed: sink bars commit"]:
        assert stage in stages, stages.keys()
    validate = stages["keyed: step validate"]
    assert validate["seconds"] > 0 and validate["host_boundary_seconds"] > 0
    assert validate["native"] is False
    # Latency runs from each tick's own append to the source topic, through the hop.
    latency = report["latency"]
    assert 0.99 * report["records"] <= latency["append_to_last_plugin"]["count"] <= report["records"]
    assert latency["append_to_commit"]["count"] == latency["append_to_last_plugin"]["count"]
    assert 0 < latency["append_to_last_plugin"]["p50_ms"] <= latency["append_to_commit"]["p50_ms"]

    # Behind the hop every tick of a symbol meets in one task; windows close at the slowest
    # source partition's watermark (its newest tick less the 5 s delay).
    valid = {p: parse_ticks(v) for p, v in by_partition.items()}
    everything = pd.concat(list(valid.values()), ignore_index=True)
    want = expected_bars_hop(by_partition, 5000)

    bars = read(data_dir, "bars").sort(["symbol", "window_start"]).to_pandas()
    assert len(bars) == len(want) > 20
    assert not bars.duplicated(subset=["symbol", "window_start"]).any(), "a bar was written twice"
    assert list(bars["symbol"]) == list(want["symbol"])
    assert list(bars["trades"]) == list(want["trades"])
    assert list(bars["volume"]) == list(want["volume"])
    assert (bars["close"] - want["close"]).abs().max() < 1e-9

    # The raw tap holds each valid tick once (duplicate deliveries dropped by dedup).
    raw = pl.read_parquet(sorted((data_dir / "raw").glob("date=*/*.parquet")), hive_partitioning=True)
    assert len(raw) == len(everything.drop_duplicates(subset=["symbol", "ts"]))
    assert raw.select(["symbol", "ts"]).is_duplicated().sum() == 0

    dead = read(data_dir, "dead_letter")
    assert sorted(dead["stage"].to_list()) == ["decode", "decode", "validate", "validate"], dead
    assert set(dead["topic"].to_list()) == {"ticks"}, "refusals behind the hop name the source"

    # Late ticks (far behind their partition's watermark) in a later run: dead-lettered as
    # `late` before the hop, with their own offset.
    late = [("AAPL", json.dumps({"symbol": "AAPL", "price": 101.0, "volume": 1, "ts": "2025-11-12T14:30:05Z"}))]
    produce(broker, late)
    third = run_flowgate("run", "pipelines/stocks.yaml", "--until-idle", "3s", env=env)
    assert third.returncode == 0, third.stderr
    dead = read(data_dir, "dead_letter")
    late_rows = dead.filter(pl.col("reason").str.starts_with("late:"))
    assert len(late_rows) == 1 and late_rows["stage"][0] == "repartition", dead
    assert len(read(data_dir, "bars")) == len(bars), "no bar added or repeated by the late run"


def test_a_second_process_takes_partitions_over_without_loss_or_duplicates(broker, data_dir):
    """Two flowgate processes in one consumer group: when the second joins, the first flushes and
    commits the partitions it gives up; every tick lands in the raw tap once, every bar once."""
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic("ticks", num_partitions=PARTITIONS, replication_factor=1)])
    admin.close()
    rng = random.Random(7)
    keyed = make_ticks(rng, pd.Timestamp("2025-11-12T14:30:00Z"), 3000)
    first_half, second_half = keyed[:1500], keyed[1500:]
    produced = produce(broker, first_half)

    env = dict(os.environ, DATA_DIR=str(data_dir), KAFKA_BROKERS=broker, GROUP="pair")
    cmd = [str(FLOWGATE), "run", "pipelines/stocks.yaml", "--until-idle", "12s"]
    a = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    b = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    for p, values in produce(broker, second_half).items():
        produced.setdefault(p, []).extend(values)
    _, a_err = a.communicate(timeout=120)
    _, b_err = b.communicate(timeout=120)
    assert a.returncode == 0, a_err
    assert b.returncode == 0, b_err
    assert "flushed and committed the revoked partition before giving it up" in a_err, a_err

    everything = pd.concat([parse_ticks(v) for v in produced.values()], ignore_index=True)
    raw = pl.read_parquet(sorted((data_dir / "raw").glob("date=*/*.parquet")), hive_partitioning=True)
    assert len(raw) == len(everything.drop_duplicates(subset=["symbol", "ts"]))
    assert raw.select(["symbol", "ts"]).is_duplicated().sum() == 0

    bars = read(data_dir, "bars").to_pandas()
    assert len(bars) > 0
    assert not bars.duplicated(subset=["symbol", "window_start"]).any(), "a bar was written twice"
    every_window = expected_bars(everything.sort_values("ts", kind="stable"), watermark_delay_ms=-10**12)
    want = every_window.set_index(["symbol", "window_start"])
    for _, bar in bars.iterrows():
        w = want.loc[(bar["symbol"], bar["window_start"])]
        assert bar["trades"] == w["trades"] and bar["volume"] == w["volume"], (bar, w)
        assert abs(bar["close"] - w["close"]) < 1e-9


def test_flowgate_produce_writes_seed_ticks_with_the_faults_asked_for(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic("ticks", num_partitions=PARTITIONS, replication_factor=1)])
    admin.close()
    out = run_flowgate("produce", "--brokers", broker, "--topic", "ticks", "--count", "2000", "--rate", "0",
                       "--symbols", "AAPL,MSFT", "--duplicates", "0.1", "--malformed", "0.05")
    assert out.returncode == 0, out.stderr
    from confluent_kafka import Consumer
    consumer = Consumer({"bootstrap.servers": broker, "group.id": "check", "auto.offset.reset": "earliest"})
    consumer.subscribe(["ticks"])
    values, deadline = [], time.time() + 30
    while time.time() < deadline and len(values) < 2000:
        m = consumer.poll(0.5)
        if m is not None and not m.error():
            values.append((m.key(), m.value()))
    consumer.close()
    assert len(values) == 2000, "--count counts every record sent, repeats included"
    parsed = []
    for key, value in values:
        try:
            parsed.append((key, json.loads(value)))
        except json.JSONDecodeError:
            pass
    malformed = 2000 - len(parsed)
    assert 40 <= malformed <= 200, malformed
    assert all(k.decode() == t["symbol"] and t["symbol"] in ("AAPL", "MSFT") for k, t in parsed)
    assert set(parsed[0][1]) == {"symbol", "price", "volume", "ts", "ts_epoch_ms"}
    distinct = {(t["symbol"], t["ts"]) for _, t in parsed}
    assert len(distinct) < len(parsed), "some ticks were sent twice"


def test_brokers_that_never_answer_are_a_clear_error_after_a_bounded_wait(tmp_path, data_dir):
    from conftest import free_port
    text = (REPO / "pipelines" / "stocks.yaml").read_text().replace("../target/", f"{REPO}/target/")
    text = text.replace("    start: earliest\n", "    start: earliest\n    connect_timeout: 3s\n")
    assert "connect_timeout: 3s" in text
    pipeline = tmp_path / "nobroker.yaml"
    pipeline.write_text(text)
    nobody = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    out = run_flowgate("run", pipeline, env={"DATA_DIR": str(data_dir), "KAFKA_BROKERS": nobody}, timeout=60)
    took = time.monotonic() - started
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"cannot reach the Kafka brokers at `{nobody}` within 3s" in out.stderr, out.stderr[-2000:]
    assert took < 30, f"gave up only after {took:.0f} s"
    assert out.stderr.count("cannot reach the Kafka brokers") == 1, out.stderr[-2000:]

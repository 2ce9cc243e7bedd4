"""A replay after a crash between two sinks' commits judges late records as the first run did
(with the steps on the source topic, and behind the repartition hop).

The pattern of the lost bars of the any-producer issue, made exact with a test hook that aborts
the process right after one sink's commit: a partition read to its end sits idle and follows
the other partition's watermark (a checkpoint that moves its watermark but not its offset); the
process dies right after `bars` committed that checkpoint, before `raw` and the dead letter did.
The next run hands that watermark again when it resumes, so the partition's next ticks are late;
it dies right after `bars` commits them. The last run replays from where `raw` stands: it must
hand the followed watermark at the same offset again, or those ticks go into windows `bars` is
never written for (it holds more), and they are neither in a bar nor dead-lettered as late.
"""
import json
import os
import subprocess

import pandas as pd
import polars as pl
import pytest
from confluent_kafka import Producer
from deltalake import DeltaTable
from kafka.admin import KafkaAdminClient, NewTopic

from conftest import FLOWGATE, REPO

PLUGINS = REPO / "target" / "wasm32-wasip2" / "plugin"


def pipeline(tmp_path, hop):
    text = (REPO / "pipelines" / "stocks.yaml").read_text()
    text = text.replace("../target/wasm32-wasip2/plugin", str(PLUGINS))
    text = text.replace("idle_timeout: 30s", "idle_timeout: 2s").replace("interval: 5s", "interval: 1s")
    if not hop:
        block = "repartition:\n  by: [symbol]\n"
        assert block in text
        text = text.replace(block, "")
    path = tmp_path / "replay.yaml"
    path.write_text(text)
    return path


def ticks(symbol, start, seconds, every):
    out = []
    for s in range(0, seconds + 1, every):
        ts = start + pd.Timedelta(seconds=s)
        out.append(json.dumps({"symbol": symbol, "price": 100.0 + s % 7, "volume": 1 + s % 5,
                               "ts": ts.isoformat(), "ts_epoch_ms": int(ts.value // 1_000_000)}))
    return out


def produce(broker, partition, lines):
    producer = Producer({"bootstrap.servers": broker, "linger.ms": 0, "batch.num.messages": 1})
    for line in lines:
        key = json.loads(line)["symbol"].encode()
        producer.produce("ticks", key=key, value=line.encode(), partition=partition)
    assert producer.flush(30) == 0


def run(path, broker, data_dir, group, abort_after=None, extra=()):
    env = dict(os.environ, KAFKA_BROKERS=broker, DATA_DIR=str(data_dir), GROUP=group)
    if abort_after:
        env["FLOWGATE_TEST_ABORT_AFTER_COMMIT"] = abort_after
    return subprocess.run([str(FLOWGATE), "run", str(path), *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("hop", [False, True], ids=["steps-on-the-source", "behind-the-hop"])
def test_a_replay_hands_the_watermark_an_idle_partition_followed(broker, tmp_path, data_dir, hop):
    """Behind the hop a source partition never follows another's watermark: it keeps its own and
    sends an idle marker through the internal topic, so every watermark change of a keyed task
    comes with an offset (no watermark-only commit exists to crash after). There the first run
    stops cleanly once the marker closed the windows, and the crash is the second run's, right
    after `bars` committed the later ticks: the replay must find them late again, from the
    marker's state restored at the position `raw` holds."""
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic("ticks", num_partitions=2, replication_factor=1)])
    admin.close()
    path = pipeline(tmp_path, hop)
    start = pd.Timestamp("2025-11-12T10:00:00Z")
    # Partition 0: AAPL for two minutes; partition 1: MSFT for ten, so its watermark leads.
    first = ticks("AAPL", start, 120, 1)
    produce(broker, 0, first)
    produce(broker, 1, ticks("MSFT", start, 600, 5))

    # Run 1: partition 0 goes idle and follows partition 1's watermark; the process dies right
    # after `bars` committed that (offset unchanged, newer checkpoint).
    if hop:
        out = run(path, broker, data_dir, "replay-1", extra=("--until-idle", "6s"))
        assert out.returncode == 0, out.stderr[-3000:]
    else:
        out = run(path, broker, data_dir, "replay-1", "bars:watermark")
        assert out.returncode != 0 and "test hook: aborting" in out.stderr, out.stderr[-3000:]

    # More AAPL ticks, older than the watermark partition 0 followed: late, as the run that
    # judges them first decides.
    later = ticks("AAPL", start + pd.Timedelta(seconds=121), 119, 1)
    produce(broker, 0, later)
    out = run(path, broker, data_dir, "replay-2", "bars:offset")
    assert out.returncode != 0 and "test hook: aborting" in out.stderr, out.stderr[-3000:]

    out = run(path, broker, data_dir, "replay-3", extra=("--until-idle", "4s"))
    assert out.returncode == 0, out.stderr[-3000:]

    bars = pl.from_arrow(DeltaTable(str(data_dir / "bars")).to_pyarrow_table())
    dead = pl.from_arrow(DeltaTable(str(data_dir / "dead_letter")).to_pyarrow_table())
    raw = pl.read_parquet(sorted((data_dir / "raw").glob("date=*/*.parquet")), hive_partitioning=True)
    aapl_raw = raw.filter(pl.col("symbol") == "AAPL")
    # The `bars` step refuses the late ticks, after the raw tap (behind the hop too: each is
    # newer than its own partition's watermark, so it crosses).
    assert len(aapl_raw) == len(first) + len(later), "every AAPL tick that passed dedup, once"
    in_bars = bars.filter(pl.col("symbol") == "AAPL")["trades"].sum()
    late = dead.filter(pl.col("reason").str.starts_with("late") & pl.col("payload").str.contains("AAPL"))
    assert in_bars + len(late) == len(first) + len(later), (
        f"{len(first) + len(later)} AAPL ticks, {in_bars} in bars, {len(late)} dead-lettered as late: "
        "ticks went into windows the bars table never got")
    assert len(late) == len(later), "the run that judged them first found the later ticks late"
    assert late["payload"].n_unique() == len(late), "each refusal once"

"""Bad input, all of it, through the Kafka pipeline (pipelines/stocks.yaml against Tansu): each
kind of bad record goes to the dead letter with a reason a person can act on, at its own offset,
none stops the run, none is lost; the good ticks around them make the same bars as alone."""
import json

import pandas as pd
import polars as pl
from confluent_kafka import Producer
from deltalake import DeltaTable
from kafka.admin import KafkaAdminClient, NewTopic

from conftest import REPO, run_flowgate
from expected import expected_bars, parse_ticks

START = pd.Timestamp("2025-11-12T14:30:00Z")


def tick(i, **fields):
    ts = START + pd.Timedelta(milliseconds=500 * i)
    t = {"symbol": "AAPL", "price": 100.0 + i * 0.01, "volume": 10 + i % 7, "ts": ts.isoformat(),
         "ts_epoch_ms": int(ts.value // 1_000_000)}
    t.update(fields)
    return json.dumps(t)


# (what, key, value, stage or None if the record is good, words the reason holds)
BAD = [
    ("10 MB message", b"AAPL", tick(0, pad="x" * (10 << 20)).encode(), "decode", ["over the limit", "max_record_bytes"]),
    ("invalid UTF-8", b"AAPL", b'{"symbol":"AA\xff\xfePL","price":1.0}', "decode", ["not UTF-8", "position 13"]),
    ("deeply nested JSON", b"AAPL", ('{"symbol":' + "[" * 50000 + "]" * 50000 + "}").encode(), "decode", ["nested more than 128 levels"]),
    ("NaN", b"AAPL", tick(0).replace('"price": 100.0', '"price": NaN').encode(), "decode", ["invalid JSON", "NaN"]),
    ("Infinity", b"AAPL", tick(0).replace('"price": 100.0', '"price": Infinity').encode(), "decode", ["Infinity"]),
    ("string as a number", b"AAPL", tick(0, symbol=12345).encode(), "decode", ["symbol"]),
    # Stamped like its neighbours (`NOW` is replaced at send time), so it is not late.
    ("missing field", b"AAPL", json.dumps({"symbol": "AAPL", "volume": 3, "ts": "NOW"}).encode(), "validate", ["price"]),
    ("null value (tombstone)", b"AAPL", None, "decode", ["tombstone"]),
    ("timestamp far in the future", b"AAPL", tick(0, ts="2999-01-01T00:00:00Z", ts_epoch_ms=32472144000000).encode(), "decode", ["watermark.max_future", "2999-01-01"]),
    ("timestamp an hour ahead", b"AAPL", tick(0, ts=(pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=1)).isoformat()).encode(), "decode", ["watermark.max_future", "(1m)"]),
    # Late against the partition's watermark: refused before the repartition hop, at its offset.
    ("timestamp before 1970", b"AAPL", tick(0, ts="1969-07-20T20:17:00Z", ts_epoch_ms=-14182980000).encode(), "repartition", ["late", "1969-07-20"]),
    ("empty message", b"AAPL", b"", "decode", ["empty record"]),
    ("not JSON at all", b"AAPL", b"hello", "decode", ["not a JSON object"]),
]
# Records that are fine though they look odd: kept, not dead-lettered. A number sent as a
# string is read as the number (arrow's JSON reader does, as Spark's does).
ODD_BUT_GOOD = [
    ("no key", None, {}),
    ("an extra field", b"AAPL", {"venue": "XNAS"}),
    ("a number as a string", b"AAPL", {"price": "101.5"}),
]


def test_every_kind_of_bad_input_goes_to_the_dead_letter_and_none_stops_the_run(broker, data_dir, tmp_path):
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic("ticks", num_partitions=1, replication_factor=1)])
    admin.close()
    producer = Producer({"bootstrap.servers": broker, "linger.ms": 0, "batch.num.messages": 1,
                         "message.max.bytes": 12 << 20})
    sent = []  # (offset order) value text or None, expected stage, words
    i = 0

    def send(key, value, stage=None, words=(), what="good tick", as_read=None):
        producer.produce("ticks", key=key, value=value)
        producer.flush(30)
        sent.append((what, as_read or value, stage, list(words)))

    for n in range(40):
        send(b"AAPL", tick(i).encode()); i += 1
    for what, key, value, stage, words in BAD:
        if value is not None and b'"NOW"' in value:
            value = value.replace(b'"NOW"', json.dumps((START + pd.Timedelta(milliseconds=500 * i)).isoformat()).encode())
        send(key, value, stage, words, what)
        for n in range(5):
            send(b"AAPL", tick(i).encode()); i += 1
    for what, key, extra in ODD_BUT_GOOD:
        as_read = tick(i, **{k: float(v) if k == "price" else v for k, v in extra.items()}).encode()
        send(key, tick(i, **extra).encode(), None, (), what, as_read); i += 1
    for n in range(200):
        send(b"AAPL", tick(i).encode()); i += 1

    pipeline = tmp_path / "stocks.yaml"
    pipeline.write_text((REPO / "pipelines" / "stocks.yaml").read_text().replace("../target/", f"{REPO}/target/"))
    env = {"DATA_DIR": str(data_dir), "KAFKA_BROKERS": broker, "GROUP": "bad-input"}
    out = run_flowgate("run", pipeline, "--until-idle", "3s", env=env)
    assert out.returncode == 0, out.stderr[-3000:]

    dead = pl.from_arrow(DeltaTable(str(data_dir / "dead_letter")).to_pyarrow_table()).sort("offset")
    by_offset = {row["offset"]: row for row in dead.iter_rows(named=True)}
    want_dead = {offset: (what, stage, words) for offset, (what, _, stage, words) in enumerate(sent) if stage}
    # Rows a later step refuses carry the last offset of their batch: found by payload.
    for offset, (what, stage, words) in want_dead.items():
        if stage not in ("decode", "validate"):
            matches = [o for o, row in by_offset.items()
                       if row["stage"] == stage and all(w in row["payload"] + row["reason"] for w in words)]
            assert len(matches) == 1 and matches[0] >= offset, (what, matches)
            by_offset[offset] = by_offset.pop(matches[0])
    problems = []
    for offset, (what, stage, words) in want_dead.items():
        row = by_offset.get(offset)
        if row is None:
            problems.append(f"{what} (offset {offset}): not in the dead letter")
            continue
        if row["stage"] != stage or not all(w in row["reason"] for w in words):
            problems.append(f"{what} (offset {offset}): stage {row['stage']!r}, reason {row['reason']!r}")
        assert len(row["payload"]) <= (64 << 10) + 100, what
    extra = set(by_offset) - set(want_dead)
    for offset in sorted(extra):
        problems.append(f"{sent[offset][0]} (offset {offset}) dead-lettered: {by_offset[offset]['reason']!r}")
    assert not problems, "\n".join(problems)
    assert len(dead) == len(want_dead), "one row per bad record"

    # Every good record made it: the bars are those of the good ticks alone.
    good = [v.decode() for _, v, stage, _ in sent if stage is None]
    want = expected_bars(parse_ticks(good), watermark_delay_ms=5000)
    bars = pl.from_arrow(DeltaTable(str(data_dir / "bars")).to_pyarrow_table()).sort(["symbol", "window_start"]).to_pandas()
    assert len(bars) == len(want) >= 2
    assert list(bars["trades"]) == list(want["trades"])
    assert list(bars["volume"]) == list(want["volume"])

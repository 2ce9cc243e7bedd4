"""pipelines/stocks.yaml with its tables on S3 (moto's S3 API on a loopback port, a real HTTP
server): Kafka (Tansu) → plugins → `s3://flowgate/…` (Delta bars and dead letter, the Parquet
tap, a CSV tap), a bounded run and a resumed one, read back with the deltalake package and
pyarrow and compared with bars computed by pandas. Also: two processes'
commits race on one table through S3's conditional put, and `flowgate table` works on S3."""
import random
import time

import pandas as pd
import polars as pl
from deltalake import DeltaTable
from kafka.admin import KafkaAdminClient, NewTopic

from conftest import REPO, run_flowgate
from expected import expected_bars_hop, parse_ticks
from test_kafka_pipeline import make_ticks, produce


def s3_pipeline(tmp_path, data_dir, csv_tap=False):
    """stocks.yaml with every table and the checkpoint store on S3 (and, with `csv_tap`, a CSV
    copy of the raw tap there too)."""
    text = (REPO / "pipelines" / "stocks.yaml").read_text().replace("../target/", f"{REPO}/target/")
    text = text.replace("${LAKE:-${DATA_DIR:-../data/stocks}}/", "s3://flowgate/run/")
    text = text.replace("${CHECKPOINTS:-${DATA_DIR:-../data/stocks}/_checkpoints}", "s3://flowgate/run/_checkpoints")
    assert text.count("s3://flowgate/run/") == 4
    if csv_tap:
        tap = "\ndead_letter:\n"
        assert text.count(tap) == 1
        text = text.replace(tap, """  raw_csv:
    from: dedup
    csv:
      path: s3://flowgate/run/raw_csv
      partition_by: [date]
""" + tap)
    path = tmp_path / "stocks-s3.yaml"
    path.write_text(text)
    return path


def read(s3, table):
    options = {k: v for k, v in s3["env"].items()}
    return pl.from_arrow(DeltaTable(f"s3://flowgate/run/{table}", storage_options=options).to_pyarrow_table())


def read_files(s3, table, suffix):
    """The data files of a Parquet or CSV table under `run/TABLE/` (outside `_flowgate_…`), read
    with pyarrow / polars from bytes fetched with boto3 (no Flowgate code in the way)."""
    import io
    import pyarrow.parquet as pq
    client = s3["client"]
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="flowgate", Prefix=f"run/{table}/"):
        keys += [o["Key"] for o in page.get("Contents", [])]
    data = sorted(k for k in keys if k.endswith(suffix) and "/_flowgate_" not in k)
    assert data, keys
    assert all("/date=" in k for k in data), data
    assert any("/_flowgate_log/" in k for k in keys), keys
    bodies = [client.get_object(Bucket="flowgate", Key=k)["Body"].read() for k in data]
    if suffix == ".parquet":
        return pl.concat([pl.from_arrow(pq.read_table(io.BytesIO(b))) for b in bodies])
    return pl.concat([pl.read_csv(io.BytesIO(b), try_parse_dates=True) for b in bodies])


def test_the_kafka_pipeline_writes_its_tables_on_s3_exactly_once_across_a_restart(broker, s3, tmp_path, data_dir):
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic("ticks", num_partitions=3, replication_factor=1)])
    admin.close()
    rng = random.Random(7)
    keyed = make_ticks(rng, pd.Timestamp("2025-11-12T14:30:00Z"), 1600)
    keyed.insert(500, ("MSFT", "not json at all"))
    by_partition = produce(broker, keyed)

    pipeline = s3_pipeline(tmp_path, data_dir, csv_tap=True)
    env = {**s3["env"], "DATA_DIR": str(data_dir), "KAFKA_BROKERS": broker, "GROUP": "s3"}
    out = run_flowgate("validate", pipeline, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sink `bars` (delta) reads step `pct_change`: no table yet" in out.stdout, out.stdout
    first = run_flowgate("run", pipeline, "--max-records", "400", env=env)
    assert first.returncode == 0, first.stderr
    second = run_flowgate("run", pipeline, "--until-idle", "3s", env=env)
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stderr, second.stderr

    valid = {p: parse_ticks(v) for p, v in by_partition.items()}
    want = expected_bars_hop(by_partition, 5000)
    bars = read(s3, "bars").sort(["symbol", "window_start"]).to_pandas()
    assert len(bars) == len(want) > 10
    assert not bars.duplicated(subset=["symbol", "window_start"]).any(), "a bar was written twice"
    assert list(bars["symbol"]) == list(want["symbol"])
    assert list(bars["trades"]) == list(want["trades"])
    assert (bars["close"] - want["close"]).abs().max() < 1e-9
    dead = read(s3, "dead_letter")
    assert dead["stage"].to_list() == ["decode"], dead
    # The Parquet and CSV taps hold each valid tick once, in committed files only.
    everything = pd.concat(valid.values())
    unique = everything.drop_duplicates(subset=["symbol", "ts"])
    raw = read_files(s3, "raw", ".parquet")
    assert len(raw) == len(unique) > 1000
    assert raw.select(["symbol", "ts"]).is_duplicated().sum() == 0
    raw_csv = read_files(s3, "raw_csv", ".csv")
    assert raw_csv.columns == [c for c in raw.columns if c != "date"]
    assert len(raw_csv) == len(raw)
    assert sorted(raw_csv["price"].to_list()) == sorted(raw["price"].to_list())
    staged = s3["client"].list_objects_v2(Bucket="flowgate", Prefix="run/raw/_flowgate_staging/")
    assert not staged.get("Contents"), "every staged file moved into place"
    # Nothing of the tables went to a local folder named `s3:`.
    assert not list(REPO.glob("**/s3:")) and not list(tmp_path.glob("**/s3:"))
    # The data files are in the bucket.
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket="flowgate", Prefix="run/bars/")["Contents"]]
    assert any(k.startswith("run/bars/_delta_log/") for k in keys)
    assert any(k.endswith(".parquet") and "/date=" in k for k in keys), keys
    # So is the plugin state each partition resumed from.
    states = s3["client"].list_objects_v2(Bucket="flowgate", Prefix="run/_checkpoints/stocks/")
    assert any(o["Key"].endswith(".state") for o in states.get("Contents", [])), states
    assert not (data_dir / "_checkpoints").exists()

    # Upkeep by hand on S3: compaction keeps every bar.
    out = run_flowgate("table", "optimize", "s3://flowgate/run/bars", env=s3["env"])
    assert out.returncode == 0, out.stderr
    assert "compacted" in out.stdout or "nothing to compact" in out.stdout, out.stdout
    again = read(s3, "bars").sort(["symbol", "window_start"]).to_pandas()
    assert len(again) == len(bars) and list(again["close"]) == list(bars["close"])


def test_a_location_s3_cannot_serve_is_a_clear_error(s3, tmp_path):
    text = (REPO / "pipelines" / "ticks-file.yaml").read_text().replace("../target/", f"{REPO}/target/")
    text = text.replace("${DATA_DIR:-../data/ticks-file}/bars", "s3://no-such-bucket/bars")
    path = tmp_path / "nobucket.yaml"
    path.write_text(text)
    out = run_flowgate("run", path, "--until-idle", "1s",
                       env={**s3["env"], "DATA_DIR": str(tmp_path / "data"),
                            "INPUT": str(REPO / "pipelines" / "samples" / "ticks.jsonl")})
    assert out.returncode != 0
    assert "sink `bars`" in out.stderr and "s3://no-such-bucket/bars" in out.stderr, out.stderr


def test_two_processes_committing_into_one_s3_table_lose_no_commit(broker, s3, tmp_path, data_dir):
    """Two members of one group commit into the same tables every 100 ms: their commits race for
    the same log versions, and S3's conditional put must let exactly one win each (the loser
    retries at the next version). A lost commit would lose its bars."""
    import subprocess
    import os
    from conftest import FLOWGATE
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic("ticks", num_partitions=4, replication_factor=1)])
    admin.close()
    keyed = make_ticks(random.Random(11), pd.Timestamp("2025-11-12T15:00:00Z"), 2400)
    by_partition = {}
    pipeline = s3_pipeline(tmp_path, data_dir)
    text = pipeline.read_text()
    assert "  interval: 5s\n" in text
    pipeline.write_text(text.replace("  interval: 5s\n", "  interval: 100ms\n"))
    # A 6 s session: this test is about racing commits, not fast failover (with 1 s, a member
    # on this 2-core box busy committing to a Python S3 server every 100 ms missed heartbeats
    # and was fenced out, as it should be).
    env = dict(os.environ, **s3["env"], DATA_DIR=str(data_dir), KAFKA_BROKERS=broker, GROUP="s3-pair",
               KAFKA_SESSION_TIMEOUT_MS="6000", KAFKA_HEARTBEAT_MS="1000", KAFKA_MAX_POLL_INTERVAL_MS="20000")
    procs = [subprocess.Popen([str(FLOWGATE), "run", str(pipeline), "--until-idle", "15s"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    # Ticks arrive while both run (after the group has settled), so both commit all along.
    time.sleep(4)
    for i in range(0, len(keyed), 60):
        for partition, values in produce(broker, keyed[i:i + 60]).items():
            by_partition.setdefault(partition, []).extend(values)
        time.sleep(0.2)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert all("partition assigned" in out for out in outs), "both members took partitions"

    valid = {p: parse_ticks(v) for p, v in by_partition.items()}
    want = expected_bars_hop(by_partition, 5000)
    bars = read(s3, "bars").sort(["symbol", "window_start"]).to_pandas()
    assert not bars.duplicated(subset=["symbol", "window_start"]).any(), "a bar was written twice"
    assert len(bars) == len(want) > 10
    assert list(bars["trades"]) == list(want["trades"])
    table = DeltaTable("s3://flowgate/run/bars", storage_options=dict(s3["env"]))
    assert table.version() > 10, "the two processes committed often"

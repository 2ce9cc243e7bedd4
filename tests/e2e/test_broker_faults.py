"""Broker faults: the broker (Tansu, its log kept in an S3 bucket on moto so it survives a
restart) is stopped mid-stream and started again. The pipeline waits, logs the outage once,
resumes within seconds of the broker's return, and the tables end complete with nothing twice."""
import os
import random
import re
import subprocess
import time

import pandas as pd
import polars as pl
from deltalake import DeltaTable
from kafka.admin import KafkaAdminClient, NewTopic

from conftest import FLOWGATE, REPO, free_port, stop, tansu_binary, wait_listening
from expected import expected_bars_hop, parse_ticks
from test_kafka_pipeline import make_ticks, produce


def start_tansu(port, s3, tmp_path, n):
    url = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, **s3["env"], AWS_ENDPOINT=s3["env"]["AWS_ENDPOINT_URL"], AWS_DEFAULT_REGION="us-east-1")
    log = tmp_path / f"tansu-{n}.log"
    proc = subprocess.Popen([tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--storage-engine", "s3://tansu/"], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    wait_listening(proc, port, log, "Tansu")
    return proc


def test_the_pipeline_waits_out_a_broker_restart_and_loses_nothing(s3, tmp_path, data_dir):
    s3["client"].create_bucket(Bucket="tansu")
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    tansu = start_tansu(port, s3, tmp_path, 1)
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics([NewTopic("ticks", num_partitions=2, replication_factor=1)])
        admin.close()
        # Tansu on S3 storage takes ~10 records/s one per request here: a small stream.
        keyed = make_ticks(random.Random(9), pd.Timestamp("2025-11-12T14:30:00Z"), 440)
        by_partition = produce(bootstrap, keyed[:220], timeout=120)

        pipeline = tmp_path / "stocks.yaml"
        pipeline.write_text((REPO / "pipelines" / "stocks.yaml").read_text().replace("../target/", f"{REPO}/target/"))
        env = dict(os.environ, DATA_DIR=str(data_dir), KAFKA_BROKERS=bootstrap, GROUP="faults",
                   KAFKA_SESSION_TIMEOUT_MS="30000", KAFKA_HEARTBEAT_MS="1000", KAFKA_MAX_POLL_INTERVAL_MS="60000")
        log = open(tmp_path / "flowgate.log", "w")
        run = subprocess.Popen([str(FLOWGATE), "run", str(pipeline), "--until-idle", "25s"], cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
        # Let it read the first half and commit, then take the broker away for 8 s.
        deadline = time.time() + 120
        # (version 0 is the table's creation; version 1 the first epoch's rows)
        while not (data_dir / "bars" / "_delta_log" / "00000000000000000001.json").exists():
            assert run.poll() is None, (tmp_path / "flowgate.log").read_text()[-3000:]
            assert time.time() < deadline, "no commit before the outage"
            time.sleep(0.5)
        time.sleep(2)
        tansu.kill()
        tansu.wait()
        time.sleep(8)
        assert run.poll() is None, "the pipeline waits for the broker"
        tansu = start_tansu(port, s3, tmp_path, 2)
        back_at = time.time()
        for partition, values in produce(bootstrap, keyed[220:], timeout=120).items():
            by_partition.setdefault(partition, []).extend(values)
        assert run.wait(timeout=180) == 0, (tmp_path / "flowgate.log").read_text()[-3000:]
    finally:
        stop(tansu)
    text = (tmp_path / "flowgate.log").read_text()
    assert text.count("lost the Kafka brokers") == 1, text[-4000:]
    # Not a line per retry: the few lines the outage's first moment gives (each broker thread
    # notices on its own before "all brokers down"; the same words from another client are not
    # repeated), then silence until it is over.
    complaints = [line for line in text.splitlines() if " WARN " in line or " ERROR " in line]
    assert len(complaints) <= 8, "\n".join(complaints)
    assert len(complaints) == len({line.split(" ", 1)[1] for line in complaints}), "a complaint repeated:\n" + "\n".join(complaints)
    match = re.search(r"^(\S+)\s+INFO.*the Kafka brokers are back after", text, re.M)
    assert match, text[-4000:]
    resumed = pd.Timestamp(match.group(1)).timestamp() - back_at
    print(f"the run had the brokers back {resumed:.1f} s after Tansu listened again")
    assert resumed < 5, f"resumed {resumed:.1f} s after the broker's return"

    valid = {p: parse_ticks(v) for p, v in by_partition.items()}
    want = expected_bars_hop(by_partition, 5000)
    bars = pl.from_arrow(DeltaTable(str(data_dir / "bars")).to_pyarrow_table()).sort(["symbol", "window_start"]).to_pandas()
    assert not bars.duplicated(subset=["symbol", "window_start"]).any(), "a bar was written twice"
    table = f"bars:\n{bars[['symbol', 'window_start', 'trades']]}\nexpected:\n{want}\nlog:\n" + text[-3000:]
    assert len(bars) == len(want) >= 6, table
    assert list(bars["trades"]) == list(want["trades"]), table
    raw = pl.read_parquet(sorted((data_dir / "raw").glob("date=*/*.parquet")), hive_partitioning=True)
    everything = pd.concat(list(valid.values()), ignore_index=True)
    assert len(raw) == len(everything.drop_duplicates(subset=["symbol", "ts"])), text[-3000:]

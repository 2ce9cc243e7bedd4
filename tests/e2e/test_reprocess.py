"""Reprocessing with new logic (README, "Reprocessing with new logic"): a plugin change applies
from the change on; to rebuild tables from the start with the new logic, run the pipeline as a
new consumer group into new table paths with a fresh checkpoint store. The old tables stay as
they were; the new ones hold every record of the topic through the new logic."""
import random

import pandas as pd
import polars as pl
from deltalake import DeltaTable
from kafka.admin import KafkaAdminClient, NewTopic

from conftest import REPO, run_flowgate
from expected import expected_bars, newest_event, parse_ticks
from test_kafka_pipeline import make_ticks, produce


def bars(data_dir):
    table = DeltaTable(str(data_dir / "bars")).to_pyarrow_table()
    return pl.from_arrow(table).sort(["symbol", "window_start"]).to_pandas()


def want(by_partition, keep=lambda df: df):
    # The watermark follows every tick, kept by the new rule or not; behind the repartition hop
    # windows close at the slowest partition's watermark.
    every = parse_ticks([line for lines in by_partition.values() for line in lines])
    slowest = min(newest_event(lines) for lines in by_partition.values())
    return expected_bars(keep(every), watermark_delay_ms=5000, newest=slowest)


def test_a_new_group_into_new_tables_rebuilds_them_from_the_start_with_new_logic(broker, tmp_path):
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic("ticks", num_partitions=2, replication_factor=1)])
    admin.close()
    by_partition = produce(broker, make_ticks(random.Random(5), pd.Timestamp("2025-11-12T14:30:00Z"), 1200))
    stocks = (REPO / "pipelines" / "stocks.yaml").read_text().replace("../target/", f"{REPO}/target/")
    old_pipeline = tmp_path / "stocks.yaml"
    old_pipeline.write_text(stocks)
    v1 = tmp_path / "v1"
    out = run_flowgate("run", old_pipeline, "--until-idle", "3s",
                       env={"DATA_DIR": str(v1), "KAFKA_BROKERS": broker, "GROUP": "stocks"})
    assert out.returncode == 0, out.stderr
    before = bars(v1)
    assert len(before) == len(want(by_partition)) > 10

    # New logic: ticks under 100 shares no longer count.
    rule = "volume: { not_null: true, min: 0 }"
    assert stocks.count(rule) == 1
    new_pipeline = tmp_path / "stocks-v2.yaml"
    new_pipeline.write_text(stocks.replace(rule, "volume: { not_null: true, min: 100 }"))
    v2 = tmp_path / "v2"
    out = run_flowgate("run", new_pipeline, "--until-idle", "3s",
                       env={"DATA_DIR": str(v2), "KAFKA_BROKERS": broker, "GROUP": "stocks-v2"})
    assert out.returncode == 0, out.stderr
    rebuilt = bars(v2)
    expected = want(by_partition, keep=lambda df: df[df["volume"] >= 100])
    assert len(rebuilt) == len(expected) > 10
    assert list(rebuilt["trades"]) == list(expected["trades"])
    assert list(rebuilt["volume"]) == list(expected["volume"])
    assert (rebuilt["close"] - expected["close"]).abs().max() < 1e-9
    assert rebuilt["trades"].sum() < before["trades"].sum(), "the new rule changed the bars"
    # The old tables are as they were.
    assert bars(v1).equals(before)
    dead = pl.from_arrow(DeltaTable(str(v2 / "dead_letter")).to_pyarrow_table())
    assert (dead["reason"].str.contains("volume")).sum() > 0

"""Poison records (README, "What a run guarantees"): a plugin that traps on one marked value.
With `on_error: dead_letter` (the default) the host rebuilds the step from its last snapshot,
replays the epoch's input, bisects the failing batch, and sends exactly the poison rows to the
dead letter with the panic message; every other row reaches the sinks and the bars are the ones
the ticks give without the poison. With `on_error: fail` the run stops, naming step, plugin,
partition and offsets, and says so once."""
import json
import random

import pandas as pd
import polars as pl
from deltalake import DeltaTable
from kafka.admin import KafkaAdminClient, NewTopic

from conftest import REPO, run_flowgate
from expected import expected_bars, newest_event, parse_ticks
from test_kafka_pipeline import make_ticks, produce

GUARD = """  - name: guard
    plugin: {repo}/target/wasm32-wasip2/plugin/flowgate_test_panic.wasm
    on_error: {policy}
"""


def guarded_pipeline(tmp_path, policy):
    text = (REPO / "pipelines" / "stocks.yaml").read_text().replace("../target/", f"{REPO}/target/")
    step = GUARD.format(repo=REPO, policy=policy)
    # The first step, so each dead-letter row carries its record's own offset.
    text = text.replace("  - name: validate\n", step + "  - name: validate\n")
    assert step in text
    path = tmp_path / f"guarded-{policy}.yaml"
    path.write_text(text)
    return path


def poisoned_ticks(seed):
    keyed = make_ticks(random.Random(seed), pd.Timestamp("2025-11-12T14:30:00Z"), 1500)
    poison = []
    for at in (300, 1100):
        _, line = keyed[at]
        tick = json.loads(line)
        tick["symbol"] = "POISON"
        poison.append(json.dumps(tick))
        keyed.insert(at, ("POISON", poison[-1]))
    return keyed, poison


def test_poison_rows_go_to_the_dead_letter_and_everything_else_flows_on(broker, tmp_path, data_dir):
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic("ticks", num_partitions=2, replication_factor=1)])
    admin.close()
    keyed, poison = poisoned_ticks(3)
    by_partition = produce(broker, keyed)
    pipeline = guarded_pipeline(tmp_path, "dead_letter")
    env = {"DATA_DIR": str(data_dir), "KAFKA_BROKERS": broker, "GROUP": "poison"}
    out = run_flowgate("run", pipeline, "--until-idle", "3s", env=env)
    assert out.returncode == 0, out.stderr[-3000:]

    dead = pl.from_arrow(DeltaTable(str(data_dir / "dead_letter")).to_pyarrow_table())
    guard = dead.filter(pl.col("stage") == "guard")
    assert len(guard) == 2, guard
    # One WARN per poison row, nothing more for the search that found it.
    assert out.stderr.count("a row made the plugin fail by itself") == 2, out.stderr[-3000:]
    assert "rebuilding the instance" not in out.stderr, out.stderr[-3000:]
    for row in guard.iter_rows(named=True):
        assert row["reason"].startswith("the plugin trapped on this row: the plugin panicked at "), row
        assert "called `Option::unwrap()` on a `None` value" in row["reason"], row
        assert json.loads(row["payload"])["symbol"] == "POISON"
        # The exact record: its partition and offset hold the poison tick.
        assert json.loads(by_partition[row["partition"]][row["offset"]])["symbol"] == "POISON"
    assert set(dead["stage"].to_list()) <= {"guard"}, dead

    # The bars are those of the ticks without the poison (the watermark still saw them), every
    # partition's ticks together behind the hop, closed at the slowest partition's watermark.
    clean = parse_ticks([l for lines in by_partition.values() for l in lines if '"POISON"' not in l])
    slowest = min(newest_event(lines) for lines in by_partition.values())
    want = expected_bars(clean, watermark_delay_ms=5000, newest=slowest)
    bars = pl.from_arrow(DeltaTable(str(data_dir / "bars")).to_pyarrow_table()).sort(["symbol", "window_start"]).to_pandas()
    assert len(bars) == len(want) > 10
    assert list(bars["symbol"]) == list(want["symbol"])
    assert list(bars["trades"]) == list(want["trades"])
    assert (bars["close"] - want["close"]).abs().max() < 1e-9


def test_on_error_fail_stops_the_run_naming_the_place_once(broker, tmp_path, data_dir):
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic("ticks", num_partitions=1, replication_factor=1)])
    admin.close()
    keyed, _ = poisoned_ticks(4)
    produce(broker, keyed[:400])
    pipeline = guarded_pipeline(tmp_path, "fail")
    env = {"DATA_DIR": str(data_dir), "KAFKA_BROKERS": broker, "GROUP": "poison-fail"}
    out = run_flowgate("run", pipeline, "--until-idle", "3s", env=env)
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "panicked at" in line]
    assert len(errors) == 1, out.stderr[-3000:]
    assert out.stderr.count("called `Option::unwrap()` on a `None` value") == 1, out.stderr[-3000:]
    line = errors[0]
    for part in ["partition `ticks/0`", "(offsets ", "step `guard`", "plugin `flowgate_test_panic`",
                 "called `Option::unwrap()` on a `None` value"]:
        assert part in line, line

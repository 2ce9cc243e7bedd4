"""Live swap (README, "Live swap"): `flowgate run` watches its pipeline file and the plugins it
loads, and reloads on SIGHUP. A good change to `transforms` is switched in at an epoch barrier
with every surviving step's state carried over; a change that cannot be swapped is refused with a
message and the running plan goes on. Either way nothing read from Kafka is lost or written twice.
"""
import json
import os
import random
import re
import signal
import subprocess
import time

import pandas as pd
import polars as pl
from confluent_kafka import Consumer, TopicPartition
from deltalake import DeltaTable
from kafka.admin import KafkaAdminClient, NewTopic

from conftest import FLOWGATE, REPO
from expected import expected_bars, expected_bars_hop, parse_ticks
from test_kafka_pipeline import make_ticks, produce

RULE = "volume: { not_null: true, min: 0 }"
STRICTER = "volume: { not_null: true, min: 100 }"


def stocks_text():
    text = (REPO / "pipelines" / "stocks.yaml").read_text().replace("../target/", f"{REPO}/target/")
    assert text.count(RULE) == 1
    return text


def write_atomically(path, text):
    """As an editor or a deploy script does: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def create_topic(broker, partitions=2):
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic("ticks", num_partitions=partitions, replication_factor=1)])
    admin.close()


def wait_committed(broker, group, ends, proc, log, seconds=90):
    """Waits until the group's committed Kafka offsets reach `ends` ({partition: count}), and the
    keyed half behind the repartition hop has committed everything the hop wrote."""
    # Asks for the offsets only (no subscribe: the groups are not joined).
    consumer = Consumer({"bootstrap.servers": broker, "group.id": group, "enable.auto.commit": False})
    keyed = Consumer({"bootstrap.servers": broker, "group.id": f"{group}-repartition", "enable.auto.commit": False})
    deadline = time.time() + seconds
    try:
        while True:
            asked = [TopicPartition("ticks", p) for p in ends]
            offsets = {tp.partition: tp.offset for tp in consumer.committed(asked, timeout=10)}
            if all(offsets.get(p, -1) >= n for p, n in ends.items()):
                topic = keyed.list_topics("stocks-repartition", timeout=10).topics["stocks-repartition"]
                parts = [TopicPartition("stocks-repartition", p) for p in topic.partitions]
                done = {tp.partition: tp.offset for tp in keyed.committed(parts, timeout=10)}
                highs = {p: keyed.get_watermark_offsets(TopicPartition("stocks-repartition", p), timeout=10)[1]
                         for p in topic.partitions}
                if all(done.get(p, -1) >= h for p, h in highs.items() if h > 0):
                    return
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.time() < deadline, f"offsets {offsets}, want {ends}\n" + log.read_text()[-4000:]
            time.sleep(0.5)
    finally:
        consumer.close()
        keyed.close()


def wait_log(log, pattern, proc, after=0, seconds=60):
    """Waits until the log (from character `after`) matches `pattern`; returns the match."""
    deadline = time.time() + seconds
    while True:
        text = log.read_text()
        m = re.search(pattern, text[after:], re.S)
        if m:
            return m
        assert proc.poll() is None, text[-4000:]
        assert time.time() < deadline, f"no `{pattern}` in the log:\n" + text[after:][-4000:]
        time.sleep(0.2)


def counts(*parts):
    """{partition: records} over several produce() results."""
    out = {}
    for part in parts:
        for p, values in part.items():
            out[p] = out.get(p, 0) + len(values)
    return out


def bars(data_dir):
    table = DeltaTable(str(data_dir / "bars")).to_pyarrow_table()
    return pl.from_arrow(table).sort(["symbol", "window_start"]).to_pandas()


def assert_bars(got, want):
    assert len(got) == len(want) > 10, (len(got), len(want))
    assert list(got["symbol"]) == list(want["symbol"])
    assert list(got["window_start"]) == list(want["window_start"])
    assert list(got["trades"]) == list(want["trades"])
    assert list(got["volume"]) == list(want["volume"])
    assert (got["close"] - want["close"]).abs().max() < 1e-9
    both = got["pct_change"].notna() & want["pct_change"].notna()
    assert (got["pct_change"][both].astype(float) - want["pct_change"][both].astype(float)).abs().max() < 1e-9
    assert got["pct_change"].isna().equals(want["pct_change"].isna())


def test_a_changed_rule_is_swapped_in_live_and_the_steps_keep_their_state(broker, tmp_path):
    """Phase A runs under the old rule; the pipeline file is rewritten (volume >= 100) while the
    run goes on; phase B runs under the new rule. The window open across the swap holds ticks of
    both phases (window state carried), phase-B copies of phase-A ticks are dropped (dedup state
    carried), and pct_change continues from the last bar before the swap. Then the process is
    killed with SIGKILL and restarted: the epoch after the swap replays through the new steps."""
    create_topic(broker)
    data = tmp_path / "data"
    pipeline = tmp_path / "stocks.yaml"
    pipeline.write_text(stocks_text())
    rng = random.Random(11)
    lines = make_ticks(rng, pd.Timestamp("2025-11-12T14:30:00Z"), 1200)
    phase_a, later = lines[:600], lines[600:]
    newest_a = max(pd.Timestamp(json.loads(v)["ts"]) for _, v in phase_a)
    # Copies of the last phase-A ticks, sent first in phase B (not late: within the 5 s delay).
    copies = [(k, v) for k, v in phase_a if pd.Timestamp(json.loads(v)["ts"]) > newest_a - pd.Timedelta(seconds=4)]
    assert len(copies) >= 8
    a = produce(broker, phase_a)

    env = dict(os.environ, DATA_DIR=str(data), KAFKA_BROKERS=broker, GROUP="swap",
               KAFKA_SESSION_TIMEOUT_MS="6000", KAFKA_HEARTBEAT_MS="500", RUST_LOG="flowgate=info")
    log = tmp_path / "flowgate.log"
    report = tmp_path / "report.json"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(FLOWGATE), "run", str(pipeline), "--report", str(report)], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_committed(broker, "swap", counts(a), proc, log)
        mark = len(log.read_text())
        # validate gets the stricter rule; dedup a longer retention (a fresh instance restored
        # from the running one's state); bars and pct_change are unchanged and carried over.
        changed = stocks_text().replace(RULE, STRICTER).replace("retention: 10m", "retention: 11m")
        write_atomically(pipeline, changed)
        swapped = wait_log(log, r"live swap: switched[^\n]*", proc, after=mark)
        line = swapped.group(0)
        assert "validate (config) → dedup (config) → bars → pct_change" in line, line
        assert "carried as they are: bars, pct_change" in line, line
        b = produce(broker, copies + later)
        # Killed mid-stream after the swap: what the new steps had not committed is replayed.
        time.sleep(random.Random(3).uniform(0.5, 4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_log = log.read_text()
    assert "live swap refused" not in killed_log
    assert re.search(r"input paused [0-9.]+ ms", swapped.group(0)), swapped.group(0)

    with open(log, "a") as out:
        again = subprocess.run([str(FLOWGATE), "run", str(pipeline), "--until-idle", "5s", "--report", str(report)],
                               cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    assert again.returncode == 0, log.read_text()[-4000:]

    # Behind the repartition hop windows close at the slowest partition's watermark.
    frames, newest, raw_want, refused_b = [], [], 0, 0
    for p in sorted(set(a) | set(b)):
        old, new = parse_ticks(a.get(p, [])), parse_ticks(b.get(p, []))
        everything = pd.concat([old, new])
        kept = pd.concat([old, new[new["volume"] >= 100]])
        refused_b += int((new["volume"] < 100).sum())
        frames.append(kept)
        newest.append(everything["ts"].max())
        raw_want += len(kept.drop_duplicates(subset=["symbol", "ts"]))
    want = expected_bars(pd.concat(frames), watermark_delay_ms=5000, newest=min(newest))
    got = bars(data)
    assert_bars(got, want)
    # The window open at the swap holds ticks of both phases.
    straddling = newest_a.floor("1min")
    assert (got["window_start"] == straddling).any()

    raw = pl.read_parquet(sorted((data / "raw").glob("date=*/*.parquet")), hive_partitioning=True)
    assert raw.select(["symbol", "ts"]).is_duplicated().sum() == 0, "a tick written twice"
    assert len(raw) == raw_want

    # The new rule refused phase-B ticks only, each once.
    dead = pl.from_arrow(DeltaTable(str(data / "dead_letter")).to_pyarrow_table())
    volume = dead.filter(pl.col("reason").str.contains("volume"))
    assert len(volume) == refused_b > 0
    firsts = {p: len(v) for p, v in a.items()}
    assert all(o >= firsts[p] for p, o in zip(volume["partition"].to_list(), volume["offset"].to_list()))
    got_keys = list(zip(dead["partition"].to_list(), dead["offset"].to_list()))
    assert len(got_keys) == len(set(got_keys)), "a refused record written twice"


def test_changes_that_cannot_be_swapped_are_refused_and_the_run_goes_on(broker, tmp_path):
    """With --no-watch, SIGHUP reloads. A config typo is reported at its line and column, a sink
    change asks for a restart, a plugin that cannot restore the running state is refused unless
    the step says `state: reset`; refused changes leave the old plan running, and the tables end
    complete."""
    create_topic(broker)
    data = tmp_path / "data"
    pipeline = tmp_path / "stocks.yaml"
    text = stocks_text()
    pipeline.write_text(text)
    rng = random.Random(12)
    lines = make_ticks(rng, pd.Timestamp("2025-11-12T14:30:00Z"), 1000)
    # Phase B goes through a plan without dedup: send it no repeated ticks.
    seen, phase_b = set(), []
    for k, v in lines[500:]:
        if v not in seen:
            seen.add(v)
            phase_b.append((k, v))
    a = produce(broker, lines[:500])
    env = dict(os.environ, DATA_DIR=str(data), KAFKA_BROKERS=broker, GROUP="refuse",
               KAFKA_SESSION_TIMEOUT_MS="6000", KAFKA_HEARTBEAT_MS="500", RUST_LOG="flowgate=info")
    log = tmp_path / "flowgate.log"
    report = tmp_path / "report.json"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(FLOWGATE), "run", str(pipeline), "--no-watch", "--report", str(report)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_committed(broker, "refuse", counts(a), proc, log)

        def reload(new_text, pattern):
            mark = len(log.read_text())
            write_atomically(pipeline, new_text)
            proc.send_signal(signal.SIGHUP)
            return wait_log(log, pattern, proc, after=mark)

        # --no-watch: a change alone does nothing.
        mark = len(log.read_text())
        write_atomically(pipeline, text.replace("retention: 10m", "retention: 11m"))
        time.sleep(2)
        assert "reloading" not in log.read_text()[mark:]

        # 1. A typo in a plugin's config: located at the key, old plan goes on.
        typo = text.replace("retention: 10m", "retension: 10m")
        line = typo.splitlines().index("      retension: 10m") + 1
        m = reload(typo, r"is not applied, the running plan goes on: [^\n]*")
        assert f"{pipeline}:{line}:7" in m.group(0), m.group(0)
        assert "retension" in m.group(0)

        # 2. A sink change needs a restart.
        moved = text.replace("/bars      # LAKE", "/bars2      # LAKE")
        assert moved != text
        m = reload(moved, r"is not applied, the running plan goes on: [^\n]*")
        assert "`sinks` changed" in m.group(0) and "restart" in m.group(0), m.group(0)

        # 3. dedup's state cannot be restored by another plugin: refused at the barrier.
        panic = f"{REPO}/target/wasm32-wasip2/plugin/flowgate_test_panic.wasm"
        swapped_text = re.sub(r"(  - name: dedup\n    plugin: )[^\n]+\n    config:\n(      [^\n]+\n)+",
                              rf"\g<1>{panic}\n    config: {{}}\n", text)
        assert panic in swapped_text and "retention: 10m" not in swapped_text
        m = reload(swapped_text, r"live swap refused[^\n]*")
        assert "step `dedup`" in m.group(0) and "state: reset" in m.group(0), m.group(0)

        # 4. The same with `state: reset`: switched, dedup's successor starts empty.
        reset_text = swapped_text.replace("    config: {}\n", "    config: {}\n    state: reset\n", 1)
        m = reload(reset_text, r"live swap: switched[^\n]*")
        assert "dedup (new plugin, config)" in m.group(0), m.group(0)
        assert "carried as they are: validate, bars, pct_change" in m.group(0), m.group(0)

        b = produce(broker, phase_b)
        wait_committed(broker, "refuse", counts(a, b), proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text_log = log.read_text()
    assert text_log.count("`state: reset`: the step starts empty") == 2  # one per partition

    want = expected_bars_hop({p: a.get(p, []) + b.get(p, []) for p in set(a) | set(b)}, 5000)
    assert_bars(bars(data), want)
    assert not (data / "bars2").exists()

    # Every change, in order: two refused before a barrier (no epoch), one refused at the
    # barrier, one applied.
    swaps = json.loads(report.read_text())["swaps"]
    assert [s["applied"] for s in swaps] == [False, False, False, True], swaps
    assert swaps[0]["epoch"] is None and "retension" in swaps[0]["refused"], swaps
    assert swaps[1]["epoch"] is None and "`sinks` changed" in swaps[1]["refused"], swaps
    assert swaps[2]["epoch"] > 0 and "state: reset" in swaps[2]["refused"], swaps
    assert swaps[3]["pause_ms"] > 0

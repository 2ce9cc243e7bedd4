#!/usr/bin/env python3
"""Flowgate's benchmark (`make bench`): throughput, ceiling, WASM overhead, stage breakdown,
latency, state memory, and PySpark side by side. See BENCHMARKS.md for what each figure means.

    make bench                       # 10M ticks, every part
    make bench BENCH_ARGS="--ticks 2000000 --skip spark"

Inputs are generated (`flowgate produce`), the broker (Tansu, memory storage) runs on a free
loopback port, every process's CPU seconds and peak RSS come from the OS (wait4). Results go to
bench/results/<date>.json and into BENCHMARKS.md between the `results` markers.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RELEASE = Path(os.environ.get("BENCH_BIN_DIR", ROOT / "target" / "release"))
FLOWGATE = Path(os.environ.get("FLOWGATE_BIN", RELEASE / "flowgate"))
BENCH = Path(os.environ.get("FLOWGATE_BENCH_BIN", RELEASE / "flowgate-bench"))
PLUGINS = ROOT / "target" / "wasm32-wasip2" / "plugin"
PARTS = ["flowgate-file", "workers", "native", "generator", "kafka", "latency", "state", "sinks", "compaction", "commits",
         "swap", "rebalance", "languages", "spark"]
# The benchmark's own PostgreSQL (the machine's, trust auth); `sinks` writes a scratch schema.
BENCH_PG = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def measure(cmd, stdout=None, stderr=None, env=None, started=None):
    """Runs `cmd` to completion; returns wall seconds, CPU seconds and peak RSS from wait4."""
    t0 = time.monotonic()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=stdout, stderr=stderr,
                            env={**os.environ, **(env or {})})
    if started:
        started(proc)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        raise RuntimeError(f"{cmd[0]} exited with {code}: {' '.join(map(str, cmd))}")
    return {"wall_s": wall, "cpu_user_s": ru.ru_utime, "cpu_sys_s": ru.ru_stime,
            "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    rustc = subprocess.run(["rustc", "-V"], capture_output=True, text=True).stdout.strip()
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**20, 1),
            "kernel": platform.release(), "rustc": rustc, "java": java[0] if java else "?",
            "commit": commit, "date": datetime.date.today().isoformat()}


def derive(work, name, source, batch=None, workers=None, hop=False):
    """pipelines/stocks.yaml with another source (and batch settings, worker threads); everything
    else the same. Without `hop`, no repartition (the file and generator sources cannot have one,
    and the ticks are keyed by symbol)."""
    spec = yaml.safe_load((ROOT / "pipelines" / "stocks.yaml").read_text())
    spec["source"] = source
    if not hop:
        spec.pop("repartition", None)
    if workers:
        spec["workers"] = workers
    if batch:
        spec["batch"] = {**spec["batch"], **batch}
    for t in spec["transforms"]:
        t["plugin"] = str((ROOT / "pipelines" / t["plugin"]).resolve())
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_pipeline(work, name, pipeline, records, native=False, binary="flowgate", extra=()):
    """One pipeline run from a clean data folder, stopping after `records` input records."""
    data = work / f"data-{name}"
    shutil.rmtree(data, ignore_errors=True)
    report = work / f"report-{name}.json"
    if binary == "flowgate":
        cmd = [FLOWGATE, "run", pipeline, "--max-records", records, "--report", report]
    else:
        cmd = [BENCH, "run", pipeline, "--max-records", records, "--report", report]
        if native:
            cmd.append("--native")
    with open(work / f"{name}.log", "w") as err:
        m = measure([*cmd, *extra], stderr=err, env={"DATA_DIR": str(data)})
    r = json.loads(report.read_text())
    busy = r["wall_seconds"] - (r["first_record_seconds"] or 0)
    m.update(records=r["records"], rows_out=r["rows_out"], rejected=r["rejected"],
             undecodable=r["undecodable"], run_s=busy, report=r, data=str(data))
    m["events_per_s"] = r["records"] / busy
    m["events_per_cpu_s"] = r["records"] / m["cpu_s"]
    log(f"{name}: {r['records']:,} records in {busy:.2f} s → {m['events_per_s']:,.0f} ev/s, "
        f"{m['events_per_cpu_s']:,.0f} ev/s per core (CPU {m['cpu_s']:.2f} s), peak RSS {m['peak_rss_mb']:.0f} MB")
    return m


def count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for _ in f)


class Tansu:
    def __init__(self, work):
        self.port = free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        binary = shutil.which("tansu") or str(Path.home() / ".cargo" / "bin" / "tansu")
        self.binary = binary
        self.log = open(work / "tansu.log", "w")
        self.proc = subprocess.Popen(
            [binary, "broker", "--listener-url", self.url, "--advertised-listener-url", self.url,
             "--storage-engine", "memory://tansu/"], stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("Tansu did not start")

    @property
    def bootstrap(self):
        return f"127.0.0.1:{self.port}"

    def topic(self, name, partitions):
        subprocess.run([self.binary, "topic", "create", name, "--broker", self.url,
                        "--partitions", str(partitions)], check=True, capture_output=True)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def produce_args(args):
    return ["--symbol-count", args.symbols, "--duplicates", args.duplicates,
            "--malformed", args.malformed, "--seed", 42]


def part_inputs(args, work, results):
    ticks = work / "ticks.jsonl"
    log(f"generating {args.ticks:,} ticks ({args.symbols} symbols, {args.duplicates:.1%} duplicates, "
        f"{args.malformed:.2%} malformed) → {ticks}")
    m = measure([FLOWGATE, "produce", "--rate", 0, "--count", args.ticks, "--output", ticks,
                 *produce_args(args)], stderr=subprocess.DEVNULL)
    results["input"] = {"ticks": args.ticks, "symbols": args.symbols, "duplicates": args.duplicates,
                        "malformed": args.malformed, "bytes": ticks.stat().st_size,
                        "generate_s": m["wall_s"]}
    # The same lines split into files for Spark's file source, in order.
    spark_in = work / "spark-in"
    shutil.rmtree(spark_in, ignore_errors=True)
    spark_in.mkdir()
    per = -(-args.ticks // args.spark_files)
    with open(ticks) as f:
        for i in range(args.spark_files):
            with open(spark_in / f"ticks-{i:03d}.json", "w") as out:
                for _ in range(per):
                    line = f.readline()
                    if not line:
                        break
                    out.write(line)
            time.sleep(0.01)  # distinct modification times keep Spark's file order
    return ticks


def part_file(args, work, results, ticks):
    pipeline = derive(work, "file", {"file": {"path": str(ticks)}})
    runs = [run_pipeline(work, f"file-{i}", pipeline, args.ticks) for i in range(args.repeat)]
    best = max(runs, key=lambda r: r["events_per_s"])
    results["file"] = best
    results["file_runs"] = [{k: r[k] for k in ("events_per_s", "events_per_cpu_s", "peak_rss_mb")} for r in runs]


def part_workers(args, work, results, ticks):
    """The same ticks as one file per partition (split by symbol, as a keyed Kafka topic would
    be), run with 1 and with 2 worker threads."""
    folder = work / "ticks-partitioned"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    outs = [open(folder / f"part-{i}.jsonl", "w") for i in range(args.partitions)]
    with open(ticks) as f:
        for line in f:
            parts = line.split('"', 4)
            key = parts[3] if len(parts) > 3 else line
            outs[zlib.crc32(key.encode()) % len(outs)].write(line)
    for o in outs:
        o.close()
    runs = {}
    for workers in (1, 2):
        pipeline = derive(work, f"workers-{workers}", {"file": {"path": str(folder)}}, workers=workers)
        best = max((run_pipeline(work, f"workers-{workers}-{i}", pipeline, args.ticks) for i in range(args.repeat)),
                   key=lambda r: r["events_per_s"])
        runs[workers] = best
    results["workers"] = {"partitions": args.partitions, "one": runs[1], "two": runs[2],
                          "scaling": runs[2]["events_per_s"] / runs[1]["events_per_s"]}
    log(f"workers 1 → 2 on {args.partitions} file partitions: {results['workers']['scaling']:.2f}×")


def part_native(args, work, results, ticks):
    pipeline = derive(work, "file", {"file": {"path": str(ticks)}})
    wasm, native = [], []
    for i in range(args.repeat):
        wasm.append(run_pipeline(work, f"bench-wasm-{i}", pipeline, args.ticks, binary="bench"))
        native.append(run_pipeline(work, f"bench-native-{i}", pipeline, args.ticks, binary="bench", native=True))
    w = max(wasm, key=lambda r: r["events_per_s"])
    n = max(native, key=lambda r: r["events_per_s"])
    results["wasm_vs_native"] = {"wasm": w, "native": n, "ratio": w["events_per_s"] / n["events_per_s"],
                                 "cpu_ratio": w["events_per_cpu_s"] / n["events_per_cpu_s"]}
    log(f"WASM/native: {results['wasm_vs_native']['ratio']:.1%} (per CPU second {results['wasm_vs_native']['cpu_ratio']:.1%})")


GENERATOR_SYMBOLS = 10_000


def generator_source(rate):
    """The generator at `rate` ticks/s, event time = wall clock. 10k symbols, so that ticks sharing a
    millisecond rarely share a symbol (dedup's key is (symbol, ts))."""
    return {"generator": {"symbols": [f"S{i:05d}" for i in range(GENERATOR_SYMBOLS)], "rate": rate, "speedup": 1}}


def part_generator(args, work, results):
    # As fast as the pipeline takes it: the generator stays at most 120k records ahead of what
    # the pipeline has read (the embedded broker keeps the newest 100k per partition).
    pipeline = derive(work, "generator", generator_source(10_000_000))
    results["generator"] = run_pipeline(work, "generator", pipeline, args.generator_ticks)


def part_swap(args, work, results):
    """Live swaps under load: pipelines/stocks.yaml fed by the generator at --swap-rate ticks/s,
    an epoch every second, the validate rule rewritten every 2 s (volume min 0 ↔ 1, so each
    rewrite is a real change). Each swap's pause (input held back from the barrier until every
    partition runs the new steps) comes from the run report."""
    pipeline = derive(work, "swap", generator_source(args.swap_rate))
    spec = yaml.safe_load(pipeline.read_text())
    spec["checkpoint"] = {**spec.get("checkpoint", {}), "interval": "1s"}
    pipeline.write_text(yaml.safe_dump(spec, sort_keys=False))
    data, report = work / "data-swap", work / "report-swap.json"
    shutil.rmtree(data, ignore_errors=True)
    with open(work / "swap.log", "w") as err:
        proc = subprocess.Popen([str(FLOWGATE), "run", str(pipeline), "--report", str(report)],
                                stderr=err, env=dict(os.environ, DATA_DIR=str(data)))
        try:
            time.sleep(8)  # the group join and the first epochs
            for i in range(args.swaps):
                spec["transforms"][0]["config"]["rules"]["volume"]["min"] = (i + 1) % 2
                tmp = pipeline.with_suffix(".tmp")
                tmp.write_text(yaml.safe_dump(spec, sort_keys=False))
                os.replace(tmp, pipeline)
                time.sleep(2)
            time.sleep(2)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
    r = json.loads(report.read_text())
    pauses = sorted(s["pause_ms"] for s in r["swaps"] if s["applied"])
    refused = [s for s in r["swaps"] if not s["applied"]]
    results["swap"] = {"rate": args.swap_rate, "rewrites": args.swaps, "applied": len(pauses),
                       "refused": len(refused), "pause_ms": pauses, "records": r["records"],
                       "median_ms": pauses[len(pauses) // 2] if pauses else None,
                       "max_ms": pauses[-1] if pauses else None}
    log(f"swap: {len(pauses)} swaps applied of {args.swaps} rewrites at {args.swap_rate:,} ticks/s; "
        f"pause median {results['swap']['median_ms']} ms, max {results['swap']['max_ms']} ms")


def part_kafka(args, work, results, tansu):
    n = args.kafka_ticks
    tansu.topic("ticks", args.partitions)
    log(f"producing {n:,} ticks to Tansu ({args.partitions} partitions)")
    m = measure([FLOWGATE, "produce", "--brokers", tansu.bootstrap, "--topic", "ticks", "--rate", 0,
                 "--count", n, *produce_args(args)], stderr=subprocess.DEVNULL)
    log(f"produced in {m['wall_s']:.1f} s ({n / m['wall_s']:,.0f}/s)")
    consume = []
    for i in range(args.repeat):
        out = subprocess.run([str(c) for c in [BENCH, "consume", "--brokers", tansu.bootstrap, "--topic", "ticks",
                                                "--count", n, "--group", f"consume-only-{i}",
                                                *[x for o in args.kafka_option for x in ("--option", o)]]],
                             capture_output=True, text=True, check=True)
        c = json.loads(out.stdout)
        consume.append(c)
        log(f"consume-only: {c['records_per_second']:,.0f} records/s")
    options = dict(o.split("=", 1) for o in args.kafka_option)
    pipeline = derive(work, "kafka", {"kafka": {"brokers": tansu.bootstrap, "topic": "ticks",
                                                "group": "flowgate-bench", "start": "earliest",
                                                "options": options}})
    runs = []
    for i in range(args.repeat):
        spec = yaml.safe_load(pipeline.read_text())
        spec["source"]["kafka"]["group"] = f"flowgate-bench-{i}"
        p = work / f"kafka-{i}.yaml"
        p.write_text(yaml.safe_dump(spec, sort_keys=False))
        runs.append(run_pipeline(work, f"kafka-{i}", p, n))
    best = max(runs, key=lambda r: r["events_per_s"])
    # The same with the repartition hop (pipelines/stocks.yaml as shipped): every record crosses
    # the internal topic before the steps; the run ends when the keyed half has read it all.
    hop = derive(work, "kafka-hop", {"kafka": {"brokers": tansu.bootstrap, "topic": "ticks",
                                               "group": "flowgate-bench-hop", "start": "earliest",
                                               "options": options}}, hop=True)
    hops = []
    for i in range(args.repeat):
        spec = yaml.safe_load(hop.read_text())
        spec["source"]["kafka"]["group"] = f"flowgate-bench-hop-{i}"
        spec["repartition"]["topic"] = f"bench-repartition-{i}"
        p = work / f"kafka-hop-{i}.yaml"
        p.write_text(yaml.safe_dump(spec, sort_keys=False))
        hops.append(run_pipeline(work, f"kafka-hop-{i}", p, n))
    best_hop = max(hops, key=lambda r: r["events_per_s"])
    ceiling = max(c["records_per_second"] for c in consume)
    results["kafka"] = {"produce": m, "consume_only": consume, "ceiling": ceiling, "flowgate": best,
                        "ratio": best["events_per_s"] / ceiling, "hop": best_hop}
    log(f"Flowgate from Kafka: {best['events_per_s']:,.0f} ev/s = {results['kafka']['ratio']:.0%} of consume-only; "
        f"with the repartition hop {best_hop['events_per_s']:,.0f} ev/s ({best_hop['events_per_cpu_s']:,.0f} per core)")


def scrape_records_in(port, topic):
    """flowgate_records_in_total per partition of `topic` from a running pipeline's /metrics."""
    import urllib.request
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("flowgate_records_in_total{") and f'topic="{topic}"' in line:
            m = re.search(r'partition="(\d+)"', line)
            if m:
                out[int(m.group(1))] = float(line.rsplit(" ", 1)[1])
    return out


def part_rebalance(args, work, results):
    """The pause of a member's partitions that do not move when a third member joins the group:
    two members read 6 partitions under a live producer; a third joins; member A's /metrics is
    sampled every 50 ms, and the longest stretch without progress of a partition A holds before
    and after is the pause. Once with cooperative-sticky (Flowgate's setting), once with eager
    `range` (every partition revoked and assigned again)."""
    out = {}
    for strategy in ("cooperative-sticky", "range"):
        tansu = Tansu(work)
        try:
            tansu.topic("rb", 6)
            producer = subprocess.Popen([str(FLOWGATE), "produce", "--brokers", tansu.bootstrap, "--topic", "rb",
                                         "--rate", "20000", "--duration", "45s", "--symbol-count", "60"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            members = []
            ports = [free_port() for _ in range(3)]
            for i in range(3):
                spec = yaml.safe_load(derive(work, f"rb-{strategy}-{i}", {"kafka": {
                    "brokers": tansu.bootstrap, "topic": "rb", "group": f"rb-{strategy}", "start": "latest",
                    "options": {"partition.assignment.strategy": strategy,
                                "session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}}}).read_text())
                spec["metrics"] = {"listen": f"127.0.0.1:{ports[i]}"}
                spec["checkpoint"]["interval"] = "1s"
                path = work / f"rb-{strategy}-{i}.yaml"
                path.write_text(yaml.safe_dump(spec, sort_keys=False))
                members.append(path)
            procs = []
            logs = [open(work / f"rb-{strategy}-{i}.log", "w") for i in range(3)]
            data = [work / f"data-rb-{strategy}-{i}" for i in range(3)]
            for d in data:
                shutil.rmtree(d, ignore_errors=True)
            for i in range(2):
                procs.append(subprocess.Popen([str(FLOWGATE), "run", str(members[i])], stderr=logs[i],
                                              env=dict(os.environ, DATA_DIR=str(data[i]))))
            samples = []
            started = time.time()
            joined_at = None
            while time.time() - started < 30:
                if joined_at is None and time.time() - started > 12:
                    procs.append(subprocess.Popen([str(FLOWGATE), "run", str(members[2])], stderr=logs[2],
                                                  env=dict(os.environ, DATA_DIR=str(data[2]))))
                    joined_at = time.time()
                samples.append((time.time(), scrape_records_in(ports[0], "rb")))
                time.sleep(0.05)
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(timeout=60)
            producer.kill()
        finally:
            tansu.stop()
        # Partitions A held just before the join and again at the end: did they stall meanwhile?
        before = [s for t, s in samples if joined_at - 3 < t < joined_at]
        after = [s for t, s in samples if t > joined_at + 10]
        def moving(window):
            if len(window) < 2:
                return set()
            return {p for p, v in window[-1].items() if v > window[0].get(p, 0)}
        kept = moving(before) & moving(after)
        pause = 0.0
        for p in kept:
            last_move, last_value = None, None
            for t, s in samples:
                if t < joined_at - 3 or p not in s:
                    continue
                if last_value is None or s[p] > last_value:
                    if last_move is not None and t > joined_at - 1:
                        pause = max(pause, t - last_move)
                    last_move, last_value = t, s[p]
        out[strategy] = {"kept_partitions": sorted(kept), "pause_ms": round(pause * 1000, 1),
                         "partitions_before": sorted(moving(before)), "partitions_after": sorted(moving(after))}
        log(f"rebalance ({strategy}): member A kept {sorted(kept)}; their longest pause around the join: "
            f"{pause * 1000:.0f} ms")
    results["rebalance"] = out


def part_latency(args, work, results, max_rate):
    """Latency at a steady rate from the generator (its producer stamps each record as it sends,
    `linger.ms=0`) through the embedded broker. Tansu is not used here: its memory storage returns
    nothing to a fetch that starts inside a multi-record batch, which a live producer makes."""
    results["latency"] = {"rate": int(max_rate * 0.5), "max_rate": max_rate, "runs": {}}
    for share, label, batch in [(0.5, "shipped batch settings (adaptive: `linger: 0ms`)", None),
                                (0.5, "fixed batches (`linger: 500ms`, the old default)", {"linger": "500ms"}),
                                (0.1, "shipped batch settings, 10% load", None)]:
        rate = int(max_rate * share)
        name = f"latency-{len(results['latency']['runs'])}"
        pipeline = derive(work, name, generator_source(rate), batch)
        log(f"latency ({label}): {rate:,} ticks/s for {args.latency_seconds} s")
        m = run_pipeline(work, name, pipeline, rate * args.latency_seconds)
        lat = m["report"]["latency"]
        results["latency"]["runs"][label] = {"records": m["records"], "cpu_s": m["cpu_s"], "rate": rate,
                                             "events_per_s": m["events_per_s"],
                                             "to_last_plugin": lat["append_to_last_plugin"],
                                             "to_commit": lat["append_to_commit"], "commit_interval_s": 5.0}
        log(f"  append → last plugin p50 {lat['append_to_last_plugin']['p50_ms']} ms, p99 "
            f"{lat['append_to_last_plugin']['p99_ms']} ms, p99.9 {lat['append_to_last_plugin']['p999_ms']} ms; "
            f"append → commit p50 {lat['append_to_commit']['p50_ms']} ms, p99 {lat['append_to_commit']['p99_ms']} ms")


def part_state(args, work, results):
    out = subprocess.run([str(BENCH), "state", "--plugin-dir", str(PLUGINS)], capture_output=True, text=True,
                         check=True)
    results["state"] = json.loads(out.stdout)
    d, w = results["state"]["dedup"], results["state"]["window"]
    log(f"dedup: {d['bytes_per_million_keys'] / 2**20:.1f} MiB per million keys (one bucket: "
        f"{results['state']['dedup_one_bucket']['bytes_per_million_keys'] / 2**20:.1f}); window: "
        f"{w['bytes'] / 2**20:.1f} MiB for {w['symbols']:,} symbols")


def part_spark(args, work, results):
    out_dir, ckpt, report = work / "spark-bars", work / "spark-checkpoint", work / "spark-report.json"
    for d in (out_dir, ckpt):
        shutil.rmtree(d, ignore_errors=True)
    log("PySpark Structured Streaming, local[2], same ticks (this takes a while)")
    with open(work / "spark.log", "w") as err:
        m = measure([sys.executable, ROOT / "bench" / "spark_bars.py", "--input", work / "spark-in",
                     "--output", out_dir, "--checkpoint", ckpt, "--report", report], stdout=subprocess.DEVNULL,
                    stderr=err)
    s = json.loads(report.read_text())
    s["process"] = m
    s["events_per_s"] = args.ticks / s["query_wall_seconds"]
    s["events_per_cpu_s"] = args.ticks / s["cpu_seconds"]
    results["spark"] = s
    log(f"Spark: {s['events_per_s']:,.0f} ev/s, {s['events_per_cpu_s']:,.0f} ev/s per core")
    if "file" in results:
        results["spark"]["comparison"] = compare_bars(Path(results["file"]["data"]) / "bars", out_dir)
        c = results["spark"]["comparison"]
        log(f"bars: {c['common']:,} in both, {c['mismatched']} differ, {c['only_flowgate']} only Flowgate, "
            f"{c['only_spark']} only Spark")


def sink_pipeline(work, name, ticks, sink):
    """The decoded ticks (validated, nothing else) straight into one sink: what a sink takes per
    second, with the plugins out of the way."""
    spec = yaml.safe_load((ROOT / "pipelines" / "stocks.yaml").read_text())
    validate = next(t for t in spec["transforms"] if t["name"] == "validate")
    validate["plugin"] = str((ROOT / "pipelines" / validate["plugin"]).resolve())
    spec.update(source={"file": {"path": str(ticks)}}, transforms=[validate],
                sinks={"out": sink}, metrics=None)
    spec.pop("metrics")
    spec.pop("repartition", None)  # a file source has no hop
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def part_sinks(args, work, results, ticks):
    """Rows/s into each sink: the same ticks through `validate` into Delta, Parquet, CSV and
    PostgreSQL (append and upsert), one sink per run."""
    records = min(args.ticks, args.sink_ticks)
    pg_schema = "flowgate_bench"
    subprocess.run(["psql", BENCH_PG, "-qc", f"DROP SCHEMA IF EXISTS {pg_schema} CASCADE; CREATE SCHEMA {pg_schema}"],
                   check=True, capture_output=True)
    sinks = {
        "delta": {"delta": {"path": "${DATA_DIR}/out", "partition_by": ["date"]}},
        "parquet": {"parquet": {"path": "${DATA_DIR}/out", "partition_by": ["date"]}},
        "csv": {"csv": {"path": "${DATA_DIR}/out", "partition_by": ["date"]}},
        "postgres-append": {"postgres": {"url": BENCH_PG, "table": f"{pg_schema}.ticks_append"}},
        "postgres-upsert": {"postgres": {"url": BENCH_PG, "table": f"{pg_schema}.ticks_upsert",
                                         "mode": "upsert", "key": ["symbol", "ts"]}},
    }
    out = {}
    for kind, sink in sinks.items():
        pipeline = sink_pipeline(work, f"sink-{kind}", ticks, sink)
        runs = []
        for i in range(args.repeat):
            if kind.startswith("postgres"):
                table = sink["postgres"]["table"]
                subprocess.run(["psql", BENCH_PG, "-qc", f"DROP TABLE IF EXISTS {table}; "
                                f"DELETE FROM {pg_schema}.flowgate_offsets WHERE true"],
                               capture_output=True)
            runs.append(run_pipeline(work, f"sink-{kind}-{i}", pipeline, records))
        best = max(runs, key=lambda r: r["events_per_s"])
        rows = best["rows_out"]
        sink_s = sum(v for k, v in flat_stage_seconds(best["report"]).items() if k.startswith("sink out"))
        out[kind] = {"rows": rows, "run_s": best["run_s"], "rows_per_s": rows / best["run_s"],
                     "sink_s": sink_s, "rows_per_sink_s": rows / sink_s if sink_s else None,
                     "cpu_s": best["cpu_s"], "peak_rss_mb": best["peak_rss_mb"]}
        log(f"sink {kind}: {rows:,} rows, {out[kind]['rows_per_s']:,.0f} rows/s end to end"
            + (f", {out[kind]['rows_per_sink_s']:,.0f} rows per second of sink time ({sink_s:.2f} s)" if sink_s else ""))
    results["sinks"] = {"records": records, "sinks": out}


def flat_stage_seconds(report):
    """Stage name → seconds from a run report's `stages` (whatever nesting it uses)."""
    found = {}
    for stage in report.get("stages", []):
        name = stage.get("stage") or stage.get("name") or "?"
        for key, value in stage.items():
            if key.endswith("seconds") and isinstance(value, (int, float)):
                found[f"{name} {key}"] = value
    return found


def read_seconds(table, repeat=3):
    """Best of `repeat` full reads of a Delta table with the deltalake package (a fresh process
    each: no cache carries over)."""
    # os._exit: the deltalake package (1.6.6) now and then aborts at interpreter exit
    # ("terminate called without an active exception") after the read is done.
    code = ("import os, sys, time; from deltalake import DeltaTable; t = time.perf_counter(); "
            "n = DeltaTable(sys.argv[1]).to_pyarrow_table().num_rows; "
            "print(n, time.perf_counter() - t, flush=True); os._exit(0)")
    best, rows = None, None
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", code, str(table)], capture_output=True, text=True, check=True)
        rows, seconds = out.stdout.split()
        best = min(best or float(seconds), float(seconds))
    return int(rows), best


def table_info(table):
    out = subprocess.run([FLOWGATE, "table", "info", table], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {"version": int(fields["version"]), "files": int(fields["data files"]),
            "bytes": int(fields["bytes"].split()[0])}


def part_compaction(args, work, results):
    """A Delta table of at least 1,000 commits from a live source (the generator at a steady rate,
    an epoch every 50 ms, compaction off), read before and after `flowgate table optimize` and a
    log checkpoint."""
    rate, seconds = 2000, args.compaction_seconds
    pipeline = derive(work, "compaction", generator_source(rate))
    spec = yaml.safe_load(pipeline.read_text())
    spec["checkpoint"]["interval"] = "50ms"
    spec["sinks"] = {"ticks": {"from": "validate", "delta": {
        "path": "${DATA_DIR}/ticks", "partition_by": ["date"],
        "maintenance": {"optimize_every": "0s", "checkpoint_every": 0}}}}
    spec.pop("dead_letter", None)
    spec.pop("metrics", None)
    pipeline.write_text(yaml.safe_dump(spec, sort_keys=False))
    run = run_pipeline(work, "compaction", pipeline, rate * seconds)
    table = Path(run["data"]) / "ticks"
    before = table_info(table)
    rows, read_before = read_seconds(table)
    log(f"compaction: {before['version'] + 1} commits, {before['files']:,} files, {rows:,} rows, read in {read_before:.3f} s")
    started = time.perf_counter()
    subprocess.run([FLOWGATE, "table", "optimize", table], check=True, capture_output=True)
    optimize_s = time.perf_counter() - started
    after = table_info(table)
    rows_after, read_after = read_seconds(table)
    subprocess.run([FLOWGATE, "table", "checkpoint", table], check=True, capture_output=True)
    rows_ckpt, read_ckpt = read_seconds(table)
    assert rows == rows_after == rows_ckpt, (rows, rows_after, rows_ckpt)
    results["compaction"] = {"commits": before["version"] + 1, "rows": rows, "before": before, "after": after,
                             "optimize_s": optimize_s, "read_before_s": read_before,
                             "read_after_optimize_s": read_after, "read_after_checkpoint_s": read_ckpt}
    log(f"compaction: optimize {optimize_s:.1f} s → {after['files']:,} files; read {read_before:.3f} s → "
        f"{read_after:.3f} s (compacted) → {read_ckpt:.3f} s (and checkpointed)")


def part_commits(args, work, results):
    """Delta commit time as the log grows: `commit_bench` appends `--commit-versions` commits of 100
    rows to a fresh table with the default upkeep, and gives the median commit near the first and
    the last version."""
    binary = RELEASE / "examples" / "commit_bench"
    out = subprocess.run([binary, str(args.commit_versions), "100", str(work / "commits")],
                         capture_output=True, text=True, check=True).stdout
    shutil.rmtree(work / "commits", ignore_errors=True)
    m = re.search(r"in ([\d.]+) s; median commit: versions 1-(\d+) ([\d.]+) ms, versions (\d+)-(\d+) ([\d.]+) ms", out)
    if not m:
        sys.exit(f"commit_bench said: {out}")
    results["commits"] = {"versions": int(m[5]), "window": int(m[2]), "seconds": float(m[1]),
                          "early_ms": float(m[3]), "late_ms": float(m[6])}
    log(f"commits: median {m[3]} ms near version {m[2]}, {m[6]} ms near version {m[5]}")


def part_languages(args, work, results):
    """Plugins in other languages: `language_bench` loads each build of the price filter and of
    the stateful `ema` plugin (Rust, JavaScript, Python), times the first load (Cranelift, empty cache) and
    rows/s on 16,384-row batches through the WASM host, and prints a JSON line per build."""
    binary = RELEASE / "examples" / "language_bench"
    out = subprocess.run([binary], capture_output=True, text=True, check=True, cwd=ROOT,
                         env=dict(os.environ, FLOWGATE_PLUGIN_DIR=str(ROOT / "target" / "wasm32-wasip2" / "plugin")))
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if len(rows) < 6:
        sys.exit(f"language_bench measured {len(rows)} builds of 6 (`make test-plugins js-test-plugins "
                 f"py-test-plugins` builds them):\n"
                 f"{out.stderr}")
    results["languages"] = rows
    for r in rows:
        log(f"languages: {r['plugin']} in {r['language']}: {r['rows_per_s'] / 1e6:.2f}M rows/s, "
            f"{r['bytes'] / 1e6:.1f} MB, first load {r['first_load_s']:.1f} s")


def compare_bars(delta_path, parquet_path):
    import pandas as pd
    from deltalake import DeltaTable

    fg = DeltaTable(str(delta_path)).to_pandas()
    sp = pd.read_parquet(parquet_path)
    for df in (fg, sp):
        df["window_start"] = pd.to_datetime(df["window_start"], utc=True).dt.tz_convert("UTC").astype("datetime64[us, UTC]")
    key = ["symbol", "window_start"]
    merged = fg.merge(sp, on=key, how="outer", suffixes=("_fg", "_sp"), indicator=True)
    both = merged[merged["_merge"] == "both"]
    bad = 0
    for col in ["open", "high", "low", "close", "avg_price", "volume", "trades", "pct_change"]:
        a, b = both[f"{col}_fg"].astype(float), both[f"{col}_sp"].astype(float)
        same = ((a - b).abs() <= 1e-9 * b.abs().clip(lower=1)) | (a.isna() & b.isna())
        bad += int((~same).sum())
    return {"flowgate": len(fg), "spark": len(sp), "common": len(both), "mismatched": bad,
            "only_flowgate": int((merged["_merge"] == "left_only").sum()),
            "only_spark": int((merged["_merge"] == "right_only").sum())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ticks", type=int, default=10_000_000, help="ticks in the file and for Spark")
    p.add_argument("--kafka-ticks", type=int, help="ticks pre-filled on Tansu (default: --ticks)")
    p.add_argument("--generator-ticks", type=int, help="ticks from the generator (default: --ticks / 2)")
    p.add_argument("--symbols", type=int, default=1000)
    p.add_argument("--duplicates", type=float, default=0.01)
    p.add_argument("--malformed", type=float, default=0.0005)
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--spark-files", type=int, default=20)
    p.add_argument("--latency-seconds", type=int, default=20)
    p.add_argument("--sink-ticks", type=int, default=2_000_000, help="ticks per sink run (`sinks`)")
    p.add_argument("--compaction-seconds", type=int, default=300,
                   help="seconds of live input for the compaction table (an epoch every 50 ms)")
    p.add_argument("--commit-versions", type=int, default=10_000, help="Delta versions `commits` appends")
    p.add_argument("--swap-rate", type=int, default=100_000, help="generator ticks/s during the live swaps (`swap`)")
    p.add_argument("--swaps", type=int, default=10, help="pipeline rewrites during `swap`")
    p.add_argument("--kafka-option", action="append", default=[], metavar="KEY=VALUE",
                   help="librdkafka setting for the Kafka runs (consume-only and Flowgate), as a pipeline's options")
    p.add_argument("--repeat", type=int, default=2, help="runs per throughput figure (the best is kept)")
    p.add_argument("--skip", action="append", default=[], choices=PARTS)
    p.add_argument("--only", action="append", default=[], choices=PARTS)
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    p.add_argument("--before", type=Path, default=ROOT / "bench" / "results" / "2026-11-21.json",
                   help="an earlier saved run, the 'earlier run' column of the targets table (default: the run "
                        "before issue 19's engine rebuild; 'none' for no column)")
    p.add_argument("--no-write", action="store_true",
                   help="leave BENCHMARKS.md and bench/results alone (results go to the work folder)")
    args = p.parse_args()
    args.kafka_ticks = args.kafka_ticks or args.ticks
    args.generator_ticks = args.generator_ticks or args.ticks // 2
    wanted = lambda part: part not in args.skip and (not args.only or part in args.only)
    for binary in (FLOWGATE, BENCH) if wanted("native") or wanted("state") or wanted("kafka") else (FLOWGATE,):
        if not binary.exists():
            sys.exit(f"{binary} is missing: run `make bench` (it builds the release binaries first)")
    args.work.mkdir(parents=True, exist_ok=True)
    work = args.work
    results = {"machine": machine(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    log(f"machine: {results['machine']}")
    ticks = part_inputs(args, work, results)
    # Compile the plugins into the cache before any timed run: a fresh clone's first run would
    # otherwise pay Cranelift's compile (~30 CPU s, ~250 MB) inside its CPU time and peak RSS.
    log("compiling the plugins into the cache (`flowgate validate`)")
    subprocess.run([str(FLOWGATE), "validate", str(derive(work, "warm", {"file": {"path": str(ticks)}}))],
                   check=True, stdout=subprocess.DEVNULL)
    if wanted("flowgate-file"):
        part_file(args, work, results, ticks)
    if wanted("workers"):
        part_workers(args, work, results, ticks)
    if wanted("native"):
        part_native(args, work, results, ticks)
    if wanted("generator"):
        part_generator(args, work, results)
    if wanted("state"):
        part_state(args, work, results)
    if wanted("latency"):
        max_rate = results["generator"]["events_per_s"] if "generator" in results else 400_000
        part_latency(args, work, results, max_rate)
    if wanted("kafka"):
        tansu = Tansu(work)
        try:
            part_kafka(args, work, results, tansu)
        finally:
            tansu.stop()
    if wanted("sinks"):
        part_sinks(args, work, results, ticks)
    if wanted("compaction"):
        part_compaction(args, work, results)
    if wanted("commits"):
        part_commits(args, work, results)
    if wanted("swap"):
        part_swap(args, work, results)
    if wanted("rebalance"):
        part_rebalance(args, work, results)
    if wanted("languages"):
        part_languages(args, work, results)
    if wanted("spark"):
        part_spark(args, work, results)
    # A partial or trial run (`--no-write`) keeps its results in the work folder.
    out = (work if args.no_write else ROOT / "bench" / "results") / f"{results['machine']['date']}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    log(f"results: {out}")
    from report import render
    before = json.loads(args.before.read_text()) if args.before.name != "none" and args.before.exists() else None
    text = render(results, before)
    print(text)
    if not args.no_write:
        md = ROOT / "BENCHMARKS.md"
        doc = md.read_text()
        start, end = "<!-- results:start -->", "<!-- results:end -->"
        if start in doc and end in doc:
            doc = doc[: doc.index(start) + len(start)] + "\n" + text + "\n" + doc[doc.index(end):]
            md.write_text(doc)
            log("BENCHMARKS.md updated")


if __name__ == "__main__":
    main()

"""Renders bench/run.py's results as the Markdown that goes into BENCHMARKS.md.

    python bench/report.py bench/results/<date>.json [--before bench/results/<earlier>.json]
"""

import argparse
import json
from pathlib import Path

# Issue 19's "now" column, as filed (an Intel Xeon with 2 cores, release, 10M ticks): the figures
# the per-core work started from. Quoted from the issue, not measured by this script.
ISSUE_19_START = {
    "file_per_cpu_s": 566_000, "peak_rss_mb": 648, "wasm_native": 0.849, "spark_per_core": 5.8,
    "kafka_ratio": 0.32, "workers": 1.16, "p99_last_plugin_ms": 297, "p99_commit_ms": 5340,
    "swap_ms": 136, "decode_s_per_m": 0.67,
}


def _n(x, digits=0):
    return "–" if x is None else f"{x:,.{digits}f}"


def _ms(x):
    return "–" if x is None else f"{x:,.1f} ms"


def render(r, before=None):
    m = r["machine"]
    a = r["args"]
    out = [
        f"Run of {m['date']} at commit `{m['commit']}`: {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}, {m['rustc']}, {m['java']}.",
        "",
        f"Command: `make bench{_bench_args(a)}`. Input: {a['ticks']:,} ticks "
        f"({a['symbols']:,} symbols, {a['duplicates']:.1%} duplicates, {a['malformed']:.2%} malformed), "
        f"{_n(r.get('input', {}).get('bytes', 0) / 2**20)} MiB of JSON lines. "
        f"Throughput figures are the best of {a['repeat']} runs.",
        "",
    ]
    out += targets(r, before)
    rows = []
    if "file" in r:
        rows.append(("file source (`flowgate run`)", r["file"]))
    if "generator" in r:
        rows.append(("generator + embedded broker", r["generator"]))
    if "kafka" in r:
        rows.append((f"Tansu broker, {a['partitions']} partitions, keyed producer, no repartition",
                     r["kafka"]["flowgate"]))
        if "hop" in r["kafka"]:
            rows.append((f"Tansu broker, {a['partitions']} partitions, with the repartition hop "
                         "(`pipelines/stocks.yaml` as shipped)", r["kafka"]["hop"]))
    if rows:
        out += ["### End to end: pipelines/stocks.yaml", "",
                "| source | records | events/s | CPU s | events/s per core | peak RSS |",
                "|---|---:|---:|---:|---:|---:|"]
        for name, x in rows:
            out.append(f"| {name} | {_n(x['records'])} | {_n(x['events_per_s'])} | {_n(x['cpu_s'], 2)} | "
                       f"{_n(x['events_per_cpu_s'])} | {_n(x['peak_rss_mb'])} MB |")
        out.append("")
    if "workers" in r:
        w = r["workers"]
        out += ["### Worker threads: the same ticks as one file per partition", "",
                f"{w['partitions']} partitions (split by symbol). Scaling 1 → 2 workers: "
                f"**{w['scaling']:.2f}×**.", "",
                "| workers | events/s | CPU s | events/s per core | peak RSS |", "|---:|---:|---:|---:|---:|"]
        for n, x in (("1", w["one"]), ("2", w["two"])):
            out.append(f"| {n} | {_n(x['events_per_s'])} | {_n(x['cpu_s'], 2)} | {_n(x['events_per_cpu_s'])} | "
                       f"{_n(x['peak_rss_mb'])} MB |")
        out.append("")
    if "kafka" in r:
        k = r["kafka"]
        out += ["### Ceiling: consume-only on the same broker", "",
                f"rdkafka with Flowgate's consumer settings, reading the {a['kafka_ticks']:,} records and doing "
                f"nothing: {', '.join(_n(c['records_per_second']) for c in k['consume_only'])} records/s. "
                f"Flowgate from Kafka: {_n(k['flowgate']['events_per_s'])} events/s = "
                f"**{k['ratio']:.0%} of consume-only**. (Producing the backlog took "
                f"{k['produce']['wall_s']:.0f} s.)", ""]
    if "wasm_vs_native" in r:
        w = r["wasm_vs_native"]
        out += ["### WASM vs native", "",
                "Same pipeline, file source, same `flowgate-bench` binary; `--native` links the four plugins "
                "into the host instead of loading their `.wasm`.", "",
                "| plugins | events/s | events/s per core |", "|---|---:|---:|",
                f"| WASM | {_n(w['wasm']['events_per_s'])} | {_n(w['wasm']['events_per_cpu_s'])} |",
                f"| native | {_n(w['native']['events_per_s'])} | {_n(w['native']['events_per_cpu_s'])} |",
                "", f"WASM/native: **{w['ratio']:.1%}** (per CPU second {w['cpu_ratio']:.1%}).", ""]
        out += ["### Stage breakdown (seconds per million events)", "",
                "From the run reports (`flowgate run --report`) of the two runs above. A step's time includes "
                "its WASM boundary; the host's side of it (IPC encode, decode and checks) is in brackets.", "",
                "| stage | WASM | native |", "|---|---:|---:|"]
        native = {s["stage"]: s for s in w["native"]["report"]["stages"]}
        for s in w["wasm"]["report"]["stages"]:
            n = native.get(s["stage"], {})
            boundary = s.get("host_boundary_seconds")
            extra = f" ({boundary * 1e6 / w['wasm']['records']:.3f})" if boundary else ""
            out.append(f"| {s['stage']} | {_n(s['seconds_per_million_records'], 3)}{extra} | "
                       f"{_n(n.get('seconds_per_million_records'), 3)} |")
        total_w = w["wasm"]["run_s"] * 1e6 / w["wasm"]["records"]
        total_n = w["native"]["run_s"] * 1e6 / w["native"]["records"]
        out += [f"| **wall, whole run** | {total_w:.3f} | {total_n:.3f} |", ""]
    if "latency" in r:
        lt = r["latency"]
        out += ["### Latency", "",
                f"Ticks from the generator at a steady rate — half of the {_n(lt['max_rate'])} events/s the "
                f"generator run sustained, and a tenth — through the embedded broker; the generator's producer "
                f"stamps each record as it hands it over (Kafka `CreateTime`; `linger.ms=1`, so up to 1 ms before the append). "
                f"Latency runs from that timestamp to the moment the batch holding the record left the last plugin, "
                f"and to the moment the checkpoint covering it committed (Delta versions, Parquet log, offsets; "
                f"interval 5 s). The generator, the broker and the pipeline share the 2 cores.", "",
                "| batch settings | ticks/s | records | to last plugin p50 / p99 / p99.9 | to committed Delta p50 / p99 / p99.9 |",
                "|---|---:|---:|---|---|"]
        for label, x in lt["runs"].items():
            p, c = x["to_last_plugin"], x["to_commit"]
            out.append(f"| {label} | {_n(x.get('rate', lt['rate']))} | {_n(x['records'])} | {_ms(p['p50_ms'])} / {_ms(p['p99_ms'])} / {_ms(p['p999_ms'])} "
                       f"| {_ms(c['p50_ms'])} / {_ms(c['p99_ms'])} / {_ms(c['p999_ms'])} |")
        out.append("")
    if "state" in r:
        d, w = r["state"]["dedup"], r["state"]["window"]
        one = r["state"].get("dedup_one_bucket")
        out += ["### State memory (inside the WASM instance)", "",
                f"- `dedup` on (symbol, ts), retention 10 min as shipped: **{d['bytes_per_million_keys'] / 2**20:.1f} MiB "
                f"per million keys** of linear memory with the keys' event times spread over the retention, as in a "
                f"steady stream ({d['keys']:,} distinct keys; snapshot {d['snapshot_bytes_per_million_keys'] / 2**20:.1f} "
                f"MiB per million)"
                + (f"; {one['bytes_per_million_keys'] / 2**20:.1f} MiB per million when all fall within one second "
                   f"(one expiry bucket, so one hash table grows to hold them all)." if one else "."),
                f"- `window` (the stock bar aggregates): **{w['bytes'] / 2**20:.2f} MiB for {w['symbols']:,} symbols** "
                f"with an open window each ({_n(w['bytes_per_symbol'])} bytes per symbol).", ""]
    if "sinks" in r:
        k = r["sinks"]
        out += ["### Rows per second into each sink", "",
                f"{k['records']:,} ticks through `validate` only, into one sink per run (a commit every 5 s; "
                "PostgreSQL: the machine's server on 127.0.0.1). *End to end* is rows over the run; "
                "*per sink second* is rows over the time the run spent in the sink (write, encode, commit).", "",
                "| sink | rows | rows/s end to end | sink seconds | rows per sink second | peak RSS |",
                "|---|---:|---:|---:|---:|---:|"]
        for kind, x in k["sinks"].items():
            out.append(f"| {kind} | {_n(x['rows'])} | {_n(x['rows_per_s'])} | {_n(x['sink_s'], 2)} | "
                       f"{_n(x['rows_per_sink_s']) if x['rows_per_sink_s'] else '–'} | {_n(x['peak_rss_mb'])} MB |")
        out.append("")
    if "compaction" in r:
        c = r["compaction"]
        out += ["### Compaction", "",
                f"A Delta table of **{c['commits']:,} commits** ({c['rows']:,} rows; the generator at a steady rate, "
                "an epoch every 50 ms, the sink's own compaction off), read in full with the `deltalake` package "
                "(best of 3, a fresh process each).", "",
                "| table | data files | read |", "|---|---:|---:|",
                f"| as written | {_n(c['before']['files'])} | {c['read_before_s']:.3f} s |",
                f"| after `flowgate table optimize` ({c['optimize_s']:.1f} s) | {_n(c['after']['files'])} | "
                f"{c['read_after_optimize_s']:.3f} s |",
                f"| and `flowgate table checkpoint` | {_n(c['after']['files'])} | {c['read_after_checkpoint_s']:.3f} s |",
                ""]
    if "commits" in r:
        c = r["commits"]
        out += ["### Delta commit time as the log grows", "",
                f"One sink appends {c['versions']:,} commits of 100 rows to a fresh local table with the default "
                f"upkeep (a log checkpoint every 100 commits) in {c['seconds']:.1f} s; a commit writes its data "
                "file and its log entry. Median over "
                f"{c['window']} commits. Command: `make bench BENCH_ARGS=\"--only commits\"`.", "",
                "| versions | median commit |", "|---|---:|",
                f"| 1–{c['window']} | {c['early_ms']:.2f} ms |",
                f"| {c['versions'] - c['window'] + 1:,}–{c['versions']:,} | {c['late_ms']:.2f} ms "
                f"({c['late_ms'] / c['early_ms']:.2f}×) |", ""]
    if "languages" in r:
        out += ["### Plugins in other languages", "",
                "Each build loaded by `language_bench` (`runtime/examples/language_bench.rs`): its first load "
                "(Cranelift, empty compile cache), then 16,384-row batches of ticks through the WASM host. The "
                "Rust filter is the stock `validate` with the same bound. Command: "
                "`make bench BENCH_ARGS=\"--only languages\"`.", "",
                "| plugin | language | component | first load | cached load | rows/s |", "|---|---|---:|---:|---:|---:|"]
        for x in r["languages"]:
            out.append(f"| {x['plugin']} | {x['language']} | {x['bytes'] / 1e6:.1f} MB | {x['first_load_s']:.1f} s | "
                       f"{x['cached_load_s'] * 1e3:.0f} ms | {x['rows_per_s'] / 1e6:.2f}M |")
        out.append("")
    if "rebalance" in r:
        rb = r["rebalance"]
        out += ["### Rebalance: a third member joins", "",
                "Two members read 6 partitions under a live producer (20k ticks/s); a third joins. The pause "
                "is the longest stretch without progress, around the join, of a partition the first member holds "
                "before and after (its `/metrics` sampled every 50 ms). Command: "
                "`make bench BENCH_ARGS=\"--only rebalance\"`.", "",
                "| assignment | partitions kept by member A | their longest pause |", "|---|---|---:|"]
        for name, x in rb.items():
            out.append(f"| {name} | {x['kept_partitions']} (of {x['partitions_before']}) | {x['pause_ms']:.0f} ms |")
        out.append("")
    if "swap" in r:
        w = r["swap"]
        out += ["### Live swap", "",
                f"`pipelines/stocks.yaml` fed by the generator at {_n(w['rate'])} ticks/s, an epoch every second, "
                f"its validate rule rewritten {w['rewrites']} times, 2 s apart. {w['applied']} swaps applied, "
                f"{w['refused']} refused. " + (
                    f"Input paused per swap (barrier → every partition on the new steps): "
                    f"median **{w['median_ms']:.1f} ms**, max {w['max_ms']:.1f} ms "
                    f"(all: {', '.join(f'{p:.1f}' for p in w['pause_ms'])})." if w["applied"] else
                    "No swap was applied: see bench/work/swap.log."), ""]
    if "spark" in r:
        s = r["spark"]
        f = r.get("file")
        out += ["### Side by side with PySpark Structured Streaming", "",
                f"Spark {s['spark_version']}, `local[2]`, `bench/spark_bars.py` over the same ticks split into "
                f"{a['spark_files']} JSON-lines files (one per micro-batch); CPU is the JVM process's CPU time plus "
                f"the Python driver's over the query (JVM start-up excluded).", "",
                "| engine | events/s | CPU s | events/s per core | peak RSS |", "|---|---:|---:|---:|---:|",
                f"| PySpark | {_n(s['events_per_s'])} | {_n(s['cpu_seconds'], 1)} | {_n(s['events_per_cpu_s'])} | "
                f"{_n((s.get('jvm_peak_rss_kb') or 0) / 1024)} MB |"]
        if f:
            out.append(f"| Flowgate (file source) | {_n(f['events_per_s'])} | {_n(f['cpu_s'], 1)} | "
                       f"{_n(f['events_per_cpu_s'])} | {_n(f['peak_rss_mb'])} MB |")
            out += ["", f"Flowgate/Spark per core: **{f['events_per_cpu_s'] / s['events_per_cpu_s']:.1f}×**; "
                    f"wall: {f['events_per_s'] / s['events_per_s']:.1f}×."]
        c = s.get("comparison")
        if c:
            out += ["", f"Same bars? Flowgate wrote {c['flowgate']:,}, Spark {c['spark']:,}; {c['common']:,} in both, "
                    f"**{c['mismatched']} values differ** (open, high, low, close, avg_price, volume, trades, "
                    f"pct_change); {c['only_flowgate']} only in Flowgate, {c['only_spark']} only in Spark."]
        out.append("")
    return "\n".join(out)


def _figures(r):
    """The figures issue 19 sets targets for, from one run's results (None where not measured)."""
    f = {}
    if "file" in r:
        f["file_per_cpu_s"] = r["file"]["events_per_cpu_s"]
        f["peak_rss_mb"] = r["file"]["peak_rss_mb"]
    w = r.get("wasm_vs_native")
    if w:
        f["wasm_native"] = w["cpu_ratio"]
        stages = {s["stage"]: s["seconds_per_million_records"] for s in w["wasm"]["report"].get("stages", [])}
        f["decode_s_per_m"] = stages.get("decode")
    if "file" in r and "spark" in r:
        f["spark_per_core"] = r["file"]["events_per_cpu_s"] / r["spark"]["events_per_cpu_s"]
    if "kafka" in r:
        f["kafka_ratio"] = r["kafka"]["ratio"]
    if "workers" in r:
        f["workers"] = r["workers"]["scaling"]
    if "latency" in r:
        # The shipped batch settings at half load (the run's label changed with the settings).
        for label, x in r["latency"]["runs"].items():
            if label.startswith("shipped") and "10%" not in label:
                f["p99_last_plugin_ms"] = x["to_last_plugin"]["p99_ms"]
                f["p99_commit_ms"] = x["to_commit"]["p99_ms"]
                f["commit_interval_ms"] = x["commit_interval_s"] * 1000
                break
    if "state" in r:
        f["dedup_mib_per_m"] = r["state"]["dedup"]["bytes_per_million_keys"] / 2**20
    if r.get("swap", {}).get("applied"):
        f["swap_ms"] = r["swap"]["max_ms"]
    if "commits" in r:
        f["commits_late_early"] = r["commits"]["late_ms"] / r["commits"]["early_ms"]
    return f


# (key, what, target text, is it met, how to print a value)
_TARGETS = [
    ("file_per_cpu_s", "file source, events per CPU second", "≥ 1,500,000", lambda v, f: v >= 1.5e6, lambda v: _n(v)),
    ("peak_rss_mb", "peak RSS of the file run", "≤ 200 MB", lambda v, f: v <= 200, lambda v: f"{v:,.0f} MB"),
    ("decode_s_per_m", "decode, seconds per million", "≤ 0.12", lambda v, f: v <= 0.12, lambda v: f"{v:.3f}"),
    ("wasm_native", "WASM / native, per CPU second", "≥ 95%", lambda v, f: v >= 0.95, lambda v: f"{v:.1%}"),
    ("spark_per_core", "Flowgate / PySpark per core", "≥ 20×", lambda v, f: v >= 20, lambda v: f"{v:.1f}×"),
    ("kafka_ratio", "Tansu source / consume-only", "≥ 70%", lambda v, f: v >= 0.7, lambda v: f"{v:.0%}"),
    ("workers", "1 → 2 workers, 3 file partitions", "≥ 1.7×", lambda v, f: v >= 1.7, lambda v: f"{v:.2f}×"),
    ("p99_last_plugin_ms", "p99 append → last plugin, half load, shipped settings", "≤ 5 ms",
     lambda v, f: v <= 5, lambda v: f"{v:,.1f} ms"),
    ("p99_commit_ms", "p99 append → committed, 5 s interval", "≤ 5,100 ms",
     lambda v, f: v <= f.get("commit_interval_ms", 5000) + 100, lambda v: f"{v:,.0f} ms"),
    ("dedup_mib_per_m", "dedup memory per million keys", "≤ 16 MiB", lambda v, f: v <= 16, lambda v: f"{v:.1f} MiB"),
    ("swap_ms", "live swap pause at 100k ticks/s (longest)", "≤ 50 ms", lambda v, f: v <= 50, lambda v: f"{v:,.0f} ms"),
    ("commits_late_early", "Delta commit at 10,000 versions / at 10", "≤ 2×", lambda v, f: v <= 2,
     lambda v: f"{v:.2f}×"),
]


def targets(r, before=None):
    """Issue 19's targets: where this run stands, beside where the issue started and an earlier run."""
    now = _figures(r)
    if not now:
        return []
    old = _figures(before) if before else {}
    head = ["### Against issue 19's targets", "",
            "*Issue start*: the figures issue 19 was filed with (an Intel Xeon, 2 cores; quoted from the issue). "
            + (f"*Earlier run*: this benchmark on {before['machine']['date']} at commit "
               f"`{before['machine']['commit']}` ({before['machine']['cpu']}). " if before else "")
            + "*This run*: the run below.", "",
            "| figure | target | issue start | earlier run | this run | met |", "|---|---|---:|---:|---:|:---:|"]
    rows = []
    for key, what, target, met, fmt in _TARGETS:
        if now.get(key) is None:
            continue
        start = ISSUE_19_START.get(key)
        rows.append(f"| {what} | {target} | {fmt(start) if start is not None else '–'} | "
                    f"{fmt(old[key]) if old.get(key) is not None else '–'} | **{fmt(now[key])}** | "
                    f"{'yes' if met(now[key], now) else 'no'} |")
    return head + rows + [""]


def _bench_args(a):
    args = " ".join(_args(a))
    return f' BENCH_ARGS="{args}"' if args else ""


def _args(a):
    defaults = {"ticks": 10_000_000, "symbols": 1000, "repeat": 2, "partitions": 3, "latency_seconds": 20}
    return [f"--{k.replace('_', '-')} {a[k]}" for k, v in defaults.items() if a.get(k) != v]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="a saved run (bench/results/<date>.json)")
    p.add_argument("--before", type=Path, help="an earlier saved run for the targets table")
    a = p.parse_args()
    before = json.loads(a.before.read_text()) if a.before else None
    print(render(json.loads(a.results.read_text()), before))

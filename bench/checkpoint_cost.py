"""What each checkpoint costs as the state grows (BENCHMARKS.md, "Incremental checkpoints").

    python bench/checkpoint_cost.py BINARY LABEL RATE SECONDS INTERVAL
    python bench/checkpoint_cost.py target/debug/flowgate gen 100000 75 2s

Runs pipelines/stocks.yaml without repartition on the generator (event time = wall clock, 10k
symbols) at RATE ticks/s for SECONDS, a checkpoint every INTERVAL, with the partition tasks'
debug log; prints, per partition checkpoint, whether dedup's state was stored whole or as a
delta, its bytes, and how long taking every step's state took. Work files under $BENCH_WORK
(default /tmp/flowgate-bench)/LABEL."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
import yaml
ROOT = Path(__file__).resolve().parent.parent
binary, label, rate, seconds, interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
work = Path(os.environ.get("BENCH_WORK", "/tmp/flowgate-bench")) / label
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
spec = yaml.safe_load((ROOT / "pipelines/stocks.yaml").read_text())
spec["source"] = {"generator": {"symbols": [f"S{i:05d}" for i in range(10000)], "rate": rate, "speedup": 1}}
spec.pop("repartition", None)
spec["checkpoint"] = {**spec.get("checkpoint", {}), "interval": interval}
for t in spec["transforms"]:
    t["plugin"] = str((ROOT / "pipelines" / t["plugin"]).resolve())
p = work / "p.yaml"; p.write_text(yaml.safe_dump(spec, sort_keys=False))
env = dict(os.environ, DATA_DIR=str(work / "data"), RUST_LOG="warn,flowgate::engine::task=debug")
with open(work / "log", "w") as err:
    proc = subprocess.Popen([binary, "run", str(p), "--report", str(work / "r.json")], stderr=err, env=env)
    time.sleep(seconds); proc.send_signal(signal.SIGTERM); proc.wait(timeout=300)
log = (work / "log").read_text()
rows = []
for line in log.splitlines():
    m = re.search(r"took_ms=([\d.]+).*\"dedup: (\d+) bytes( \(delta\))? in ([\d.]+) ms", line)
    if m:
        rows.append((float(m.group(1)), int(m.group(2)), bool(m.group(3)), float(m.group(4))))
for i, (ms, b, d, dedup_ms) in enumerate(rows):
    print(f"{i+1:3d} {'delta' if d else 'whole'} {b/1e6:8.2f} MB dedup in {dedup_ms:6.1f} ms; "
          f"all steps taken in {ms:7.1f} ms")

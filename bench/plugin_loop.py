"""The plugin author's loop, timed (issue 18): `flowgate plugin new`, the first release build for
wasm32-wasip2, a rebuild after an edit, the crate's `cargo test` (cold and after an edit), and
`flowgate plugin test` on the rebuilt plugin with an empty compile cache (Winch, the harness's
default, and `--optimize`, Cranelift as a pipeline compiles).

    make bench-plugin-loop                       # or:
    python3 bench/plugin_loop.py [--flowgate target/debug/flowgate] [--runs 5]

Every build starts from an empty target folder of its own and runs `--offline` against this
repository's Cargo.lock (the crates must be in cargo's download cache, as after `make test`), so
the figures are compile time, not download time. Prints a Markdown table and writes
bench/results/plugin-loop-<date>.json.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(args, cwd, env=None, check=True):
    start = time.monotonic()
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.monotonic() - start
    if check and out.returncode != 0:
        sys.exit(f"{' '.join(map(str, args))} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return took, out


def arrow_builds(stderr):
    """How many times cargo compiled the `arrow-array` crate in one command (once per target)."""
    return len(re.findall(r"Compiling arrow-array v", stderr))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flowgate", default=str(REPO / "target" / "debug" / "flowgate"))
    parser.add_argument("--runs", type=int, default=5, help="harness runs per compiler (median)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    flowgate = Path(args.flowgate).resolve()
    if not flowgate.is_file():
        sys.exit(f"{flowgate} is missing: build it with `cargo build -p flowgate` (or give --flowgate)")
    toolchain = re.search(r'channel = "([^"]+)"', (REPO / "rust-toolchain.toml").read_text()).group(1)

    work = Path(tempfile.mkdtemp(prefix="flowgate-plugin-loop-"))
    crate = work / "price-filter"
    env = dict(os.environ, CARGO_TARGET_DIR=str(work / "target"), RUSTUP_TOOLCHAIN=toolchain)
    # A lint wrapper from the caller's shell (CI's clippy-driver) is not part of a user's build.
    env.pop("RUSTC_WORKSPACE_WRAPPER", None)
    env.pop("CLIPPY_ARGS", None)
    results = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "flowgate": str(flowgate)}
    try:
        run([flowgate, "plugin", "new", "price-filter", "--path", crate], work)
        shutil.copy(REPO / "Cargo.lock", crate / "Cargo.lock")
        build = ["cargo", "build", "--release", "--target", "wasm32-wasip2", "--offline"]
        took, out = run(build, crate, env)
        results["first_build_s"] = took
        results["first_build_arrow_compilations"] = arrow_builds(out.stderr)
        wasm = work / "target" / "wasm32-wasip2" / "release" / "price_filter.wasm"
        results["wasm_bytes"] = wasm.stat().st_size

        lib = crate / "src" / "lib.rs"
        lib.write_text(lib.read_text().replace("the value is missing", "the value is absent"))
        took, _ = run(build, crate, env)
        results["rebuild_s"] = took

        took, out = run(["cargo", "test", "--offline"], crate, env)
        results["test_cold_s"] = took
        results["test_cold_arrow_compilations"] = arrow_builds(out.stderr)
        lib.write_text(lib.read_text().replace("the value is absent", "the value is not there"))
        took, _ = run(["cargo", "test", "--offline"], crate, env)
        results["test_after_edit_s"] = took
        run(build, crate, env)

        harness = [flowgate, "plugin", "test", wasm, "--config", crate / "sample" / "config.yaml",
                   "--schema", crate / "sample" / "schema.yaml", "--input", crate / "sample" / "input.jsonl"]
        for label, extra in [("harness_winch_s", []), ("harness_cranelift_s", ["--optimize"])]:
            times = []
            for i in range(args.runs):
                cache = work / f"cache-{label}-{i}"  # empty: a rebuilt plugin is never in the cache
                took, out = run(harness + extra + ["--cache-dir", cache], crate)
                assert "the value is not there" in out.stdout, out.stdout
                times.append(took)
            results[label] = statistics.median(times)
            results[label + "_all"] = times
        times = [run(harness + ["--cache-dir", work / "cache-harness_winch_s-0"], crate)[0] for _ in range(args.runs)]
        results["harness_cached_s"] = statistics.median(times)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("`plugin new`, first `cargo build --release --target wasm32-wasip2`", f"{results['first_build_s']:.1f} s"),
        ("the `.wasm`", f"{results['wasm_bytes'] / 1e6:.2f} MB"),
        ("rebuild after an edit of `src/lib.rs`", f"{results['rebuild_s']:.1f} s"),
        ("first `cargo test` (native)", f"{results['test_cold_s']:.1f} s"),
        ("`cargo test` after an edit", f"{results['test_after_edit_s']:.1f} s"),
        ("`flowgate plugin test` on the rebuilt plugin (Winch, the default; median)", f"{results['harness_winch_s']:.2f} s"),
        ("… with `--optimize` (Cranelift, as a pipeline compiles; median)", f"{results['harness_cranelift_s']:.2f} s"),
        ("… unchanged plugin, from the compile cache (median)", f"{results['harness_cached_s']:.2f} s"),
        ("arrow compiled by the first build / by the first `cargo test`",
         f"{results['first_build_arrow_compilations']} / {results['test_cold_arrow_compilations']}"),
    ]
    print(f"Plugin loop, {results['date']}, {results['machine']}, host {flowgate.name} ({flowgate.parent.name})\n")
    print("| step | time |\n|---|---|")
    for step, value in rows:
        print(f"| {step} | {value} |")
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"plugin-loop-{results['date']}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nsaved {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()

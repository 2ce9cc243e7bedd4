"""A run whose source has nothing more to give costs close to nothing: each source kind is read
to the end of its input, then the process's CPU time over 10 s of idling must stay under 0.5 s
(read from /proc/PID/stat). A finished file source used to spin a whole core."""
import os
import pathlib
import re
import subprocess
import threading
import time

from confluent_kafka import Producer
from kafka.admin import KafkaAdminClient, NewTopic

from conftest import FLOWGATE, REPO

IDLE_SECONDS = 10
CPU_LIMIT = 0.5
TICKS = REPO / "pipelines" / "samples" / "ticks.jsonl"
PLUGINS = REPO / "target" / "wasm32-wasip2" / "plugin"


def cpu_seconds(pid):
    """User + system CPU time of the whole process (every thread), in seconds."""
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    # Fields 14 and 15 of the file (utime, stime) are 12 and 13 after the command name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid):
    """Each thread's name and CPU seconds so far, by thread id (what a failure reports)."""
    threads = {}
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        threads[task.name] = (name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return threads


def busiest(before, after, n=6):
    """The threads that used the most CPU between two `thread_cpu` readings, as text."""
    used = sorted(((cpu - before.get(tid, (name, 0.0))[1], name) for tid, (name, cpu) in after.items()), reverse=True)
    return ", ".join(f"{name} {u:.2f} s" for u, name in used[:n])


class Run:
    """A `flowgate run` in the background, its log collected as it comes."""

    def __init__(self, pipeline, env):
        full_env = dict(os.environ, **env)
        self.proc = subprocess.Popen([str(FLOWGATE), "run", str(pipeline)], cwd=REPO, env=full_env,
                                     stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def records(self):
        """The newest record count the progress log shows."""
        counts = [int(m.group(1)) for line in self.lines for m in [re.search(r"(\d+) records \(", line)] if m]
        return counts[-1] if counts else 0

    def wait_for(self, count, seconds=120):
        deadline = time.time() + seconds
        while self.records() < count:
            assert self.proc.poll() is None, "".join(self.lines)
            assert time.time() < deadline, f"read {self.records()} of {count} records:\n" + "".join(self.lines[-30:])
            time.sleep(0.2)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.reader.join(timeout=10)
        return "".join(self.lines)


def pipeline_with(tmp_path, name, source_block):
    """The demo pipeline with another source block, written beside the test (plugins by absolute path)."""
    text = (REPO / "pipelines" / "demo.yaml").read_text()
    text = text.replace("../target/wasm32-wasip2/plugin", str(PLUGINS))
    start = text.index("source:")
    end = text.index("format: json")
    text = text[:start] + source_block + "\n" + text[end:]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_a_file_the_generator_and_the_embedded_broker_idle_at_the_end_of_their_input(tmp_path):
    """The three in-process sources, side by side (each its own process and tables)."""
    lines = sum(1 for _ in TICKS.open())
    generated = "source:\n  generator:\n    rate: 20000\n    speedup: 30\n    count: 5000\n"
    embedded = ("source:\n  kafka:\n    brokers: embedded\n    topic: ticks\n    group: idle\n"
                "  generator:\n    rate: 20000\n    speedup: 30\n    count: 5000\n")
    runs = {
        "file": (Run(REPO / "pipelines" / "ticks-file.yaml",
                     {"DATA_DIR": str(tmp_path / "file"), "INPUT": str(TICKS)}), lines),
        "generator": (Run(pipeline_with(tmp_path, "generated", generated),
                          {"DATA_DIR": str(tmp_path / "generated")}), 5000),
        "embedded broker": (Run(pipeline_with(tmp_path, "embedded", embedded),
                                {"DATA_DIR": str(tmp_path / "embedded")}), 5000),
    }
    used, logs = {}, {}
    try:
        for name, (run, count) in runs.items():
            run.wait_for(count)
        time.sleep(6)
        threads = {name: thread_cpu(run.proc.pid) for name, (run, _) in runs.items()}
        before = {name: cpu_seconds(run.proc.pid) for name, (run, _) in runs.items()}
        time.sleep(IDLE_SECONDS)
        for name, (run, _) in runs.items():
            assert run.proc.poll() is None, "".join(run.lines)
            used[name] = cpu_seconds(run.proc.pid) - before[name]
            threads[name] = busiest(threads[name], thread_cpu(run.proc.pid))
    finally:
        for name, (run, _) in runs.items():
            logs[name] = run.stop()
    print(", ".join(f"{name}: {u:.3f} s ({threads[name]})" for name, u in used.items()), f"of CPU in {IDLE_SECONDS} s of idling")
    assert "the generator sent its 5000 ticks" in logs["generator"]
    for name, u in used.items():
        assert u < CPU_LIMIT, f"{name}: {u:.2f} s of CPU in {IDLE_SECONDS} s of idling (threads: {threads[name]}):\n{logs[name][-3000:]}"


def test_kafka_members_with_and_without_partitions_idle(broker, tmp_path):
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic("ticks", num_partitions=1, replication_factor=1)])
    admin.close()
    producer = Producer({"bootstrap.servers": broker, "linger.ms": 0, "batch.num.messages": 1})
    ticks = TICKS.read_text().splitlines()
    for line in ticks:
        producer.produce("ticks", value=line.encode())
    assert producer.flush(30) == 0
    runs = []
    for i in range(2):
        data = tmp_path / f"member{i}"
        data.mkdir()
        runs.append(Run(REPO / "pipelines" / "stocks.yaml", {
            "KAFKA_BROKERS": broker, "DATA_DIR": str(data), "GROUP": "idle-group"}))
    try:
        # One member holds the topic's only partition and reads it to the end; the other has none.
        deadline = time.time() + 120
        while max(r.records() for r in runs) < len(ticks):
            assert all(r.proc.poll() is None for r in runs), "".join(runs[0].lines + runs[1].lines)
            assert time.time() < deadline, "".join(runs[0].lines[-20:] + runs[1].lines[-20:])
            time.sleep(0.2)
        time.sleep(6)
        threads = [thread_cpu(r.proc.pid) for r in runs]
        before = [cpu_seconds(r.proc.pid) for r in runs]
        time.sleep(IDLE_SECONDS)
        used = [cpu_seconds(r.proc.pid) - b for r, b in zip(runs, before)]
        threads = [busiest(t, thread_cpu(r.proc.pid)) for r, t in zip(runs, threads)]
    finally:
        logs = [r.stop() for r in runs]
    print(f"Kafka members: {', '.join(f'{u:.3f} s ({t})' for u, t in zip(used, threads))} of CPU in {IDLE_SECONDS} s of idling")
    for u, t, log in zip(used, threads, logs):
        assert u < CPU_LIMIT, f"{u:.2f} s of CPU in {IDLE_SECONDS} s of idling (threads: {t}):\n{log[-3000:]}"

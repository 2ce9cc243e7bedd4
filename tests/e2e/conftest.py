"""Shared fixtures for the end-to-end tests: the flowgate binary, the repo, a scratch data dir."""
import os
import pathlib
import shutil
import socket
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
FLOWGATE = pathlib.Path(os.environ.get("FLOWGATE_BIN", REPO / "target" / "debug" / "flowgate"))
# The demo serves its status page on 127.0.0.1:9464 unless told otherwise: every run a test
# starts listens on a free port instead, so runs never collide (a test may set its own).
os.environ.setdefault("METRICS_LISTEN", "127.0.0.1:0")


def run_flowgate(*args, env=None, timeout=600):
    """Runs the flowgate binary; returns the CompletedProcess (stdout/stderr as text)."""
    assert FLOWGATE.exists(), f"{FLOWGATE} is missing: run `make build`"
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([str(FLOWGATE), *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def filter_pipeline(path, ticks, wasm, config, sinks):
    """A pipeline file at `path`: the ticks file through the scaffolds' price filter (`wasm`,
    with the `config:` lines given) into `sinks` (YAML from `sinks:` on)."""
    path.write_text(f"""name: {path.stem}
source:
  file:
    path: {ticks}
schema:
  symbol: utf8
  price: float64
  ts: timestamp
transforms:
  - name: filter
    plugin: {wasm}
    config:
{config}
{sinks}""")
    return path


def assert_config_typo_reported(tmp_path, ticks, wasm):
    """A scaffold's filter given `minimum:` for `min:` is refused by `flowgate validate` at the
    key's line and column, once."""
    typo = filter_pipeline(tmp_path / "typo.yaml", ticks, wasm, "      column: price\n      minimum: 10",
                           "sinks:\n  out:\n    console: {}\n")
    out = run_flowgate("validate", typo)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{typo}:14:7:" in out.stderr, out.stderr
    assert out.stderr.count("unknown field `minimum`") == 1, out.stderr


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


def tansu_binary():
    """TANSU_BIN, else a `tansu` on PATH or in ~/.cargo/bin, else the one `make test-broker` builds."""
    home = pathlib.Path.home()
    candidates = [os.environ.get("TANSU_BIN"), shutil.which("tansu"), home / ".cargo" / "bin" / "tansu",
                  home / ".cache" / "flowgate" / "test-broker" / "bin" / "tansu"]
    for found in candidates:
        if found and pathlib.Path(found).exists():
            return str(found)
    raise AssertionError("the Tansu broker is not installed: `make test-broker` builds one (.ci/run does it)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc):
    """Stops a server the fixtures started: SIGTERM, then SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_listening(proc, port, log, what, seconds=30):
    """Waits until `proc` accepts connections on `port` (its log in the failure if it died)."""
    deadline = time.time() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, f"{what} did not start listening"
            time.sleep(0.1)


@pytest.fixture
def broker(tmp_path):
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = open(tmp_path / "tansu.log", "w")
    proc = subprocess.Popen([tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--storage-engine", "memory://tansu/"], stdout=log, stderr=subprocess.STDOUT)
    bootstrap = f"127.0.0.1:{port}"
    wait_listening(proc, port, tmp_path / "tansu.log", "Tansu")
    try:
        yield bootstrap
    finally:
        stop(proc)


POSTGRES_URL = os.environ.get("FLOWGATE_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_schema():
    """A PostgreSQL schema of its own (on FLOWGATE_TEST_POSTGRES, default the machine's own
    server), dropped afterwards; yields (url, schema, connection)."""
    import psycopg
    schema = f"fg_e2e_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        try:
            yield POSTGRES_URL, schema, conn
        finally:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def s3(tmp_path):
    """An S3-API server (moto, in memory) on a free loopback port with a bucket `flowgate`;
    yields the environment a Flowgate process (object_store reads `AWS_*`) and the deltalake
    package (as storage options) use to reach it."""
    import sys
    import boto3
    port = free_port()
    moto = pathlib.Path(sys.executable).parent / "moto_server"
    log = open(tmp_path / "moto.log", "w")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "flowgate", "AWS_SECRET_ACCESS_KEY": "flowgate-secret"}
    wait_listening(proc, port, tmp_path / "moto.log", "moto_server")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="flowgate", aws_secret_access_key="flowgate-secret")
    client.create_bucket(Bucket="flowgate")
    try:
        yield {"env": env, "client": client}
    finally:
        stop(proc)

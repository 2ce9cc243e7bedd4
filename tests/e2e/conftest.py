"""Shared fixtures for the end-to-end tests: the flowgate binary, the repo, a scratch data dir."""
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
FLOWGATE = pathlib.Path(os.environ.get("FLOWGATE_BIN", REPO / "target" / "debug" / "flowgate"))


def run_flowgate(*args, env=None, timeout=600):
    """Runs the flowgate binary; returns the CompletedProcess (stdout/stderr as text)."""
    assert FLOWGATE.exists(), f"{FLOWGATE} is missing: run `make build`"
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([str(FLOWGATE), *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d

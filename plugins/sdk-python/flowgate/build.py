"""Builds a Flowgate plugin component from a Python module: ``python3 -m flowgate.build
[--module plugin] [--src src] [--out dist/NAME.wasm] [--wit wit]``.

It needs componentize-py (pinned in ``requirements.txt``): when neither this Python nor the PATH
has it, the first build makes ``.venv/`` in the project and installs it there (from PyPI, once);
later builds run offline.

componentize-py (CPython compiled to WebAssembly) runs the module's top level at build time and
snapshots the result, so imports cost nothing when the host loads the plugin. The component's
entry is generated here: the plugin module's one `define_plugin` result behind the
``flowgate:plugin`` world's exports (`flowgate._component`).

The module may import the standard library, ``flowgate`` and modules beside it in ``--src``;
packages with C extensions (numpy, pyarrow) have no WebAssembly build and cannot be used.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The component's own top-level modules; a plugin module may not take these names.
_ENTRY = "flowgate_entry"
_RESERVED = {_ENTRY, "transform", "wit_world", "componentize_py_types", "componentize_py_runtime", "flowgate"}


def _componentize_py(root):
    """The componentize-py to run: this Python's, the PATH's, or the project's `.venv/` one,
    installed there from ``requirements.txt`` when there is none."""
    venv = root / ".venv" / "bin"
    for candidate in (Path(sys.executable).parent / "componentize-py", venv / "componentize-py"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("componentize-py")
    if found is not None:
        return found
    requirements = root / "requirements.txt"
    if not requirements.exists():
        sys.exit(f"componentize-py is not installed, and {requirements} is missing to install it from")
    print(f"componentize-py is not installed: installing {requirements} into {venv.parent} (once)", flush=True)
    try:
        if not (venv / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv.parent)], check=True)
        subprocess.run(
            [str(venv / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(requirements)],
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"installing componentize-py into {venv.parent} failed: {e}")
    return str(venv / "componentize-py")


def _project_name(root):
    """`[project] name` of pyproject.toml, else the folder's name; `-` becomes `_`."""
    name = None
    try:
        text = (root / "pyproject.toml").read_text()
    except OSError:
        text = ""
    try:
        import tomllib

        name = tomllib.loads(text).get("project", {}).get("name")
    except ImportError:  # Python 3.10: the line `name = "..."` of the scaffold's file
        found = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M)
        name = found and found.group(1)
    except ValueError:
        pass
    return re.sub(r"\W", "_", name or root.name) or "plugin"


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m flowgate.build", description="Build a Flowgate plugin component from a Python module."
    )
    parser.add_argument("--module", default="plugin", help="the plugin's module, in --src (default: plugin)")
    parser.add_argument("--src", default="src", help="the folder holding the module (default: src)")
    parser.add_argument("--out", help="the component to write (default: dist/NAME.wasm, NAME from pyproject.toml)")
    parser.add_argument("--wit", default="wit", help="the flowgate:plugin WIT folder (default: wit)")
    args = parser.parse_args(argv)

    root = Path.cwd()
    src = (root / args.src).resolve()
    if args.module in _RESERVED or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", args.module):
        sys.exit(f"--module {args.module!r}: pick another name (taken: {', '.join(sorted(_RESERVED))})")
    if not (src / f"{args.module}.py").exists() and not (src / args.module / "__init__.py").exists():
        sys.exit(f"no module `{args.module}` in {src}")
    out = Path(args.out).resolve() if args.out else root / "dist" / f"{_project_name(root)}.wasm"
    wit = (root / args.wit).resolve()
    sdk = Path(__file__).resolve().parent.parent  # the folder holding the `flowgate` package

    componentize_py = _componentize_py(root)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flowgate-build-") as work:
        entry = Path(work)
        (entry / f"{_ENTRY}.py").write_text(
            "import flowgate._component as _component\n"
            f"import {args.module} as _module\n"
            "_component.install(_module)\n"
            "Transform = _component.Transform\n"
        )
        # componentize-py looks for an exported resource's class in a module named after its
        # interface.
        (entry / "transform.py").write_text("from flowgate._component import Transformer\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # Only the paths below: a virtualenv's site-packages would be searched too.
        env.pop("VIRTUAL_ENV", None)
        command = [
            componentize_py, "--quiet", "-d", str(wit), "-w", "plugin", "componentize",
            "-p", str(entry), "-p", str(sdk), "-p", str(src), "-o", str(out), _ENTRY,
        ]  # fmt: skip
        done = subprocess.run(command, env=env)
        if done.returncode != 0:
            sys.exit(f"componentize-py failed (exit {done.returncode}): {' '.join(command)}")
    size = out.stat().st_size / 1e6
    shown = os.path.relpath(out, root)
    print(f"built {shown} ({size:.1f} MB) in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()

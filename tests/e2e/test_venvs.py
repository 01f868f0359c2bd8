"""Functions start from any interpreter a user can run locally (issue 9): a venv over an
interpreter outside /usr (pyenv's, here), a ``--copies`` venv, a
``--system-site-packages`` venv, and an interpreter reached through a chain of symlinks.
Each runs the hello example; the remote function reports the caller's ``sys.prefix``
and ``sys.version``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PYTHON_DIR, Server, unique

# The interpreter that runs the suite (pyenv's on the CI machine).
BASE = os.path.realpath(sys.executable)

HELLO = """
import sys
import flare

app = flare.App("{name}")

@app.function()
def hello(x):
    return {{"x": x + 1, "prefix": sys.prefix, "version": sys.version, "executable": sys.executable}}

@app.local_entrypoint()
def main():
    import json
    print("RESULT " + json.dumps(hello.remote(41)))
"""


def _site_packages(python: str) -> str:
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _install_sdk(python: str) -> None:
    """What `pip install -e python` leaves in an isolated venv: a .pth naming the SDK's
    source dir, and the SDK's dependencies (copied from the suite's own environment)."""
    import blake3
    import cloudpickle

    sp = Path(_site_packages(python))
    sp.mkdir(parents=True, exist_ok=True)
    (sp / "__editable__.flare.pth").write_text(str(PYTHON_DIR) + "\n")
    for mod in (cloudpickle, blake3):
        pkg = Path(mod.__file__).parent
        shutil.copytree(pkg, sp / pkg.name, dirs_exist_ok=True)


def _make_venv(tmp_path: Path, kind: str) -> str:
    """An interpreter of `kind`; returns the path to run (its `bin/python`)."""
    if BASE.startswith("/usr/"):
        pytest.skip(f"needs an interpreter outside /usr (this one is {BASE})")
    if kind == "chain":
        # bin/python3 -> ../links/py -> ../real/python3.X -> the real interpreter.
        root = tmp_path / "chain"
        (root / "bin").mkdir(parents=True)
        (root / "links").mkdir()
        (root / "real").mkdir()
        (root / "real" / "python3").symlink_to(BASE)
        (root / "links" / "py").symlink_to("../real/python3")
        (root / "bin" / "python3").symlink_to("../links/py")
        return str(root / "bin" / "python3")
    venv = tmp_path / f"venv-{kind}"
    args = [BASE, "-m", "venv", "--without-pip"]
    if kind == "copies":
        args.append("--copies")
    if kind == "system-site":
        args.append("--system-site-packages")
    subprocess.run([*args, str(venv)], check=True, capture_output=True, timeout=120)
    python = str(venv / "bin" / "python")
    if kind != "system-site":
        _install_sdk(python)
    return python


@pytest.fixture(scope="module")
def base_captured(server: Server, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Capture the base interpreter's environment once, outside the per-test time limit:
    on a fresh server the first capture hashes and uploads all of it (hundreds of MB);
    every venv over it then finds those blobs there and uploads only its own."""
    d = tmp_path_factory.mktemp("warm")
    app = d / f"{unique('warm')}.py"
    app.write_text(HELLO.format(name=unique("venv-warm")))
    r = subprocess.run([BASE, "-m", "flare.cli", "run", str(app)], capture_output=True, text=True, cwd=str(d),
                       env={**os.environ, "PYTHONPATH": str(PYTHON_DIR)}, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("kind", ["venv", "copies", "system-site", "chain"])
def test_hello_from_each_kind_of_interpreter(server: Server, tmp_path: Path, kind: str, base_captured: None) -> None:
    python = _make_venv(tmp_path, kind)
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    app = app_dir / f"{unique('hello')}.py"
    app.write_text(HELLO.format(name=unique(f"venv-{kind}")))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    if kind in ("chain", "system-site"):
        env["PYTHONPATH"] = str(PYTHON_DIR)  # the base's own site-packages has the SDK's deps
    local = subprocess.run([python, "-c", "import sys, json; print(json.dumps([sys.prefix, sys.version, sys.executable]))"],
                           capture_output=True, text=True, env=env, check=True)
    prefix, version, executable = json.loads(local.stdout)
    if kind != "chain":
        assert prefix != sys.base_prefix, "not a venv"
    r = subprocess.run([python, "-m", "flare.cli", "run", str(app)], capture_output=True, text=True,
                       env=env, cwd=str(app_dir), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert out["x"] == 42
    assert out["prefix"] == prefix, out
    assert out["version"] == version, out
    assert out["executable"] == executable, out

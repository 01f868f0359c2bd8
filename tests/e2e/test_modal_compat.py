"""An unmodified Modal program, run with the `modal run` command of the opt-in compatibility
package (python/modal-compat), against a live flared server (see conftest.py).

The package is installed into a fresh venv as `pip install ./python/modal-compat` would,
and the program is run by the venv's `modal` console script. The program says
`import modal` at the top and again inside its functions, so the containers import it
too: Flare's SDK mount carries the package (at /__flare/modal) next to the SDK.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import PYTHON_DIR, REPO, Server, unique

COMPAT_DIR = REPO / "python" / "modal-compat"

PROGRAM = '''
import modal
from modal.exception import NotFoundError

app = modal.App("{name}")


@app.function(retries=modal.Retries(max_retries=1, initial_delay=1.0), timeout=60)
def square(x: int) -> int:
    return x * x


@app.function()
def inside() -> str:
    # Modal's names, imported in the container.
    import flare
    import modal
    import modal.exception
    from modal.exception import InvalidError, NotFoundError

    same = (modal.App is flare.App and modal.exception.InvalidError is flare.exception.InvalidError
            and InvalidError is flare.exception.InvalidError and NotFoundError is flare.exception.NotFoundError)
    return f"marker={{modal.__flare_compat__}} same={{same}} local={{modal.is_local()}} file={{modal.__file__}}"


@app.function()
def lookup(key: str) -> str:
    from modal.exception import NotFoundError

    raise NotFoundError(f"no such key: {{key}}")


@app.local_entrypoint()
def main(n: int = 10):
    print("square", square.remote(7))
    print("map", sum(square.map(range(n))))
    print("spawn", square.spawn(9).get())
    try:
        lookup.remote("k1")
    except NotFoundError as e:
        print("caught", type(e).__module__ + "." + type(e).__name__, e)
    print("inside", inside.remote())
'''


def _venv_with_compat(tmp_path: Path) -> tuple[Path, str]:
    """A fresh venv with Flare's SDK and the compatibility package; returns its bin dir and
    how the package got there. `pip install ./python/modal-compat` when pip can build it
    here without the network; otherwise what `pip install -e` leaves: a .pth naming the
    source and the `modal` console script pip writes (from the package's pyproject)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, capture_output=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # Flare from this checkout (as `pip install -e ./python` leaves it).
    Path(purelib, "__editable__.flare_e2e.pth").write_text(str(PYTHON_DIR) + "\n")
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--no-index", str(COMPAT_DIR)],
        capture_output=True, text=True, timeout=300,
    )
    if pip.returncode == 0 and (venv / "bin" / "modal").exists():
        return venv / "bin", "pip"
    Path(purelib, "__editable__.flare_modal_compat.pth").write_text(str(COMPAT_DIR) + "\n")
    text = (COMPAT_DIR / "pyproject.toml").read_text()
    m = re.search(r'^modal\s*=\s*"([\w.]+):(\w+)"', text, re.M)
    assert m, "pyproject.toml of modal-compat names no `modal` console script"
    script = venv / "bin" / "modal"
    script.write_text(textwrap.dedent(f"""\
        #!{python}
        import sys
        from {m.group(1)} import {m.group(2)}
        if __name__ == "__main__":
            sys.exit({m.group(2)}())
    """))
    script.chmod(0o755)
    return venv / "bin", "pth"


@pytest.fixture(scope="module")
def modal_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bin_dir, how = _venv_with_compat(tmp_path_factory.mktemp("modal-venv"))
    sys.stderr.write(f"modal-compat installed by {how}\n")
    return bin_dir


def _modal(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PATH"] = str(bin_dir) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)  # only what the venv has installed
    return subprocess.run(["modal", *args], capture_output=True, text=True, timeout=200, env=env, cwd=str(cwd))


def test_modal_command_is_flares_cli(modal_bin: Path, tmp_path: Path) -> None:
    r = _modal(modal_bin, "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for command in ("run", "deploy", "app"):
        assert command in r.stdout, r.stdout
    # A Modal command Flare lacks: Flare's own usage error.
    r = _modal(modal_bin, "secret", "list", cwd=tmp_path)
    assert r.returncode == 2 and "invalid choice: 'secret'" in r.stderr, r.stdout + r.stderr


def test_unmodified_modal_program(server: Server, modal_bin: Path, tmp_path: Path) -> None:
    path = tmp_path / f"{unique('modal_prog')}.py"
    path.write_text(PROGRAM.format(name=unique("modal-compat")))
    r = _modal(modal_bin, "run", str(path), "--n", "20", cwd=tmp_path)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert re.search(r"(^|\n)square 49\n", out), out
    assert re.search(rf"(^|\n)map {sum(x * x for x in range(20))}\n", out), out
    assert re.search(r"(^|\n)spawn 81\n", out), out
    # The container's NotFoundError came back as flare's, which modal.exception's is.
    assert re.search(r"(^|\n)caught flare\.exception\.NotFoundError no such key: k1\n", out), out
    # In the container: `import modal` is the compatibility package, Flare's names.
    m = re.search(r"(^|\n)inside (.*)\n", out)
    assert m, out
    assert "marker=True same=True local=False" in m.group(2), m.group(2)
    # ... shipped by the SDK mount (not found on a host path the environment captured).
    assert "file=/__flare/modal/__init__.py" in m.group(2), m.group(2)


def test_function_by_name(server: Server, modal_bin: Path, tmp_path: Path) -> None:
    path = tmp_path / f"{unique('modal_prog')}.py"
    path.write_text(PROGRAM.format(name=unique("modal-compat")))
    r = _modal(modal_bin, "run", f"{path}::square", "--x", "12", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "144", r.stdout


SLIM_PROGRAM = '''
import modal

app = modal.App("{name}")


@app.function(image=modal.Image.debian_slim())
def where() -> str:
    import modal.exception

    return f"{{modal.__file__}} {{modal.exception.NotFoundError.__module__}} {{modal.is_local()}}"


@app.local_entrypoint()
def main():
    print("slim", where.remote())
'''


def test_modal_program_on_debian_slim(server: Server, modal_bin: Path, tmp_path: Path) -> None:
    """Modal's default image, where nothing of the caller's environment is: the container
    finds `modal` only in the SDK mount."""
    path = tmp_path / f"{unique('modal_slim')}.py"
    path.write_text(SLIM_PROGRAM.format(name=unique("modal-slim")))
    r = _modal(modal_bin, "run", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"(^|\n)slim /__flare/modal/__init__\.py flare\.exception False\n", r.stdout), r.stdout


def test_modal_deploy_and_app_commands(server: Server, modal_bin: Path, tmp_path: Path) -> None:
    name = unique("modal-deployed")
    path = tmp_path / f"{unique('modal_prog')}.py"
    path.write_text(PROGRAM.format(name=name))
    r = _modal(modal_bin, "deploy", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        # Another unmodified Modal program calls the deployed function by name.
        caller = tmp_path / "caller.py"
        caller.write_text(textwrap.dedent(f"""\
            import modal
            square = modal.Function.from_name({name!r}, "square")
            print("by name", square.remote(6))
            try:
                modal.Function.from_name({name!r}, "no_such_function").remote(1)
            except modal.exception.NotFoundError:
                print("not found")
        """))
        env = {**os.environ, "PATH": str(modal_bin) + os.pathsep + os.environ.get("PATH", "")}
        env.pop("PYTHONPATH", None)
        r = subprocess.run([str(modal_bin / "python"), str(caller)], capture_output=True, text=True,
                           timeout=200, env=env, cwd=str(tmp_path))
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.splitlines()[-2:] == ["by name 36", "not found"], r.stdout
        r = _modal(modal_bin, "app", "list", cwd=tmp_path)
        assert r.returncode == 0 and name in r.stdout, r.stdout + r.stderr
    finally:
        r = _modal(modal_bin, "app", "stop", name, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr


CLS_PROGRAM = '''
import modal

app = modal.App("{name}")


@app.cls(cpu=0.25, scaledown_window=60, enable_memory_snapshot=True)
class Model:
    size: int = modal.parameter(default=3)

    @modal.enter(snap=True)
    def load(self):
        self.w = [1] * self.size

    @modal.enter(snap=False)
    def after(self):
        self.ready = True

    @modal.method()
    def predict(self, x: int) -> int:
        return sum(self.w) * x

    @modal.method()
    def stream(self, n: int):
        yield from range(n)

    @modal.exit()
    def close(self):
        print("bye")


@app.local_entrypoint()
def main():
    print("predict", Model().predict.remote(2))
    print("params", sum(Model(size=8).predict.map(range(10))))
    print("gen", list(Model().stream.remote_gen(3)))
'''


def test_unmodified_modal_class_program(server: Server, modal_bin: Path, tmp_path: Path) -> None:
    path = tmp_path / f"{unique('modal_cls')}.py"
    path.write_text(CLS_PROGRAM.format(name=unique("modal-cls")))
    r = _modal(modal_bin, "run", str(path), cwd=tmp_path)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert re.search(r"(^|\n)predict 6\n", out), out
    assert re.search(rf"(^|\n)params {8 * sum(range(10))}\n", out), out
    assert re.search(r"(^|\n)gen \[0, 1, 2\]\n", out), out

"""End-to-end fixtures: one live ``flared server`` per test session.

Run: ``python -m pytest tests/e2e`` (as root; needs ``target/release/flared``).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
FLARED = Path(os.environ.get("FLARE_E2E_BIN", REPO / "target" / "release" / "flared"))
PYTHON_DIR = REPO / "python"
TEST_TIMEOUT = int(os.environ.get("FLARE_E2E_TEST_TIMEOUT", "240"))

if str(PYTHON_DIR) not in sys.path:
    sys.path.insert(0, str(PYTHON_DIR))


@dataclass
class Server:
    url: str
    host: str
    port: int
    home: str
    pid: int
    log: Path
    proc: subprocess.Popen[bytes]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/health", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


class Flared:
    """A `flared server` of a test's own (its flags, home, port and log), for what the
    session's shared server keeps at its defaults. ``wait()`` for it to be healthy,
    ``stop()`` it (SIGTERM, SIGKILL after 30 s; ``kill=True``: at once)."""

    def __init__(self, *flags: str, home: str | None = None, prefix: str = "flare-e2e-own-",
                 env: dict[str, str] | None = None) -> None:
        self.home = home or tempfile.mkdtemp(prefix=prefix)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(self.home) / "flared.log"
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(FLARED), "server", "--home", self.home, "--listen", f"127.0.0.1:{self.port}", *flags],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
        )

    def wait(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not _healthy(self.url):
            assert self.proc.poll() is None, f"flared exited:\n{self.log.read_text(errors='replace')[-5000:]}"
            assert time.monotonic() < deadline, f"flared not healthy:\n{self.log.read_text(errors='replace')[-5000:]}"
            time.sleep(0.05)

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    if not FLARED.exists():
        pytest.skip(f"flared binary not built: {FLARED} is missing (cargo build --release -p flared)")
    if os.geteuid() != 0:
        pytest.fail("the e2e suite must run as root: flared needs root to create containers")
    home = tempfile.mkdtemp(prefix="flare-e2e-home-")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(home) / "flared-e2e.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(FLARED), "server", "--home", home, "--listen", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not _healthy(url):
        if proc.poll() is not None:
            log.close()
            pytest.fail(f"flared exited with {proc.returncode} at start:\n{log_path.read_text(errors='replace')[-5000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"flared did not become healthy in 60 s:\n{log_path.read_text(errors='replace')[-5000:]}")
        time.sleep(0.05)
    saved = {k: os.environ.get(k) for k in ("FLARE_SERVER_URL", "FLARE_HOME")}
    os.environ["FLARE_SERVER_URL"] = url
    os.environ["FLARE_HOME"] = home
    srv = Server(url=url, host="127.0.0.1", port=port, home=home, pid=proc.pid, log=log_path, proc=proc)
    yield srv
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    if request.session.testsfailed:
        text = log_path.read_text(errors="replace")
        sys.stderr.write(f"\n===== flared log ({log_path}), last 20000 chars =====\n{text[-20000:]}\n")
    else:
        # A passing run leaves nothing behind (a home holds a Debian root file system and
        # the store: over a GiB a run); a failing one keeps it for a look.
        remove_home(home)


def remove_home(home: str) -> None:
    """Detach whatever is still mounted below ``home`` (deepest first), then delete it."""
    import shutil

    prefix = os.path.realpath(home) + "/"
    try:
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
    except OSError:
        points = []
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    shutil.rmtree(home, ignore_errors=True)


class E2ETimeout(BaseException):
    """A test ran past FLARE_E2E_TEST_TIMEOUT. Not an OSError (as TimeoutError is), so the
    SDK's retry loops, which handle OSError, cannot swallow it."""


@pytest.fixture(autouse=True)
def _per_test_timeout() -> Iterator[None]:
    """Fail a hanging test instead of hanging the suite (SIGALRM in the main thread)."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise E2ETimeout(f"e2e test exceeded {TEST_TIMEOUT} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def write_app(tmp_path: Path, source: str, stem: str | None = None) -> Path:
    stem = stem or unique("e2eapp")
    path = tmp_path / f"{stem}.py"
    path.write_text(textwrap.dedent(source))
    return path


def load_app(tmp_path: Path, source: str, stem: str | None = None) -> Any:
    """Write an app file and import it as a module named by its (unique) stem."""
    path = write_app(tmp_path, source, stem)
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, timeout: float = 180, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(PYTHON_DIR) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "flare.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env,
    )

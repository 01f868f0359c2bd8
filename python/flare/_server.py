"""Finding, starting and stopping the embedded ``flared server``."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time

from . import _api, exception
from ._home import flare_home
from ._localenv import environment_prefixes, python_roots
from ._transport import DEFAULT_SERVER_URL, Client, configured_server_url, get_client, how_to_start_hint

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_LISTEN = "127.0.0.1:7878"


def _package_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def find_flared() -> str:
    """Locate the ``flared`` binary ($FLARE_BIN, the package, PATH, the dev checkout)."""
    candidates: list[str] = []
    env_bin = os.environ.get("FLARE_BIN")
    if env_bin:
        if os.path.isfile(env_bin) and os.access(env_bin, os.X_OK):
            return env_bin
        raise exception.ExecutionError(f"FLARE_BIN={env_bin} is not an executable file")
    packaged = os.path.join(_package_dir(), "bin", "flared")
    candidates.append(packaged)
    if os.path.isfile(packaged) and os.access(packaged, os.X_OK):
        return packaged
    on_path = shutil.which("flared")
    if on_path:
        return on_path
    candidates.append("flared on PATH")
    repo = os.path.dirname(os.path.dirname(_package_dir()))
    dev = os.path.join(repo, "target", "release", "flared")
    candidates.append(dev)
    if os.path.isfile(dev) and os.access(dev, os.X_OK):
        return dev
    raise exception.ExecutionError(
        "Could not find the flared binary. Looked at: $FLARE_BIN (unset), "
        + ", ".join(candidates)
        + ". Install the flare wheel that bundles it, put flared on PATH, "
        "or build it with `cargo build --release -p flared`."
    )


def health(client: Client, timeout: float = 2.0) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = client.request("GET", _api.health(), timeout=timeout)
        return result
    except exception.ConnectionError:
        client.close()
        return None


def _pid_path() -> str:
    return os.path.join(flare_home(), "flared.pid")


def _log_path() -> str:
    return os.path.join(flare_home(), "flared.log")


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 8192))
            lines = f.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError:
        return ""


def host_bind_allow(home: str) -> list[str]:
    """What the server that ``flare`` starts for this user may bind from the host: this
    Python environment's own dirs (the user starting it is its operator), so a captured
    environment whose files are unchanged is bound directly instead of through the lazy
    image mount. Never the flare home or a dir holding it; nothing on a failure."""
    try:
        paths = [os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)]
        cwd = os.path.realpath(os.getcwd())
        roots = python_roots(sys.executable, [p for p in paths if p != cwd], environment_prefixes())
    except exception.Error:
        return []
    home = os.path.realpath(home)

    def overlaps(a: str, b: str) -> bool:
        return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")

    return [r for r in roots if not overlaps(r, home) and not any(overlaps(r, d) for d in ("/proc", "/sys", "/dev", "/run", "/boot"))]


def start_server(listen: str = DEFAULT_LISTEN, wait: float = 60.0) -> Client:
    """Start ``flared server`` in the background (setsid) and wait until it answers its health check."""
    home = flare_home()
    os.makedirs(home, exist_ok=True)
    client = get_client("http://" + listen)
    # Two `flare run`s at once start one server. (Not flared.lock: flared holds that one
    # for as long as it runs, and would refuse to start while we held it.)
    with open(os.path.join(home, "autostart.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if health(client) is not None:
            return client
        binary = find_flared()
        argv = [binary, "server", "--home", home, "--listen", listen]
        for d in host_bind_allow(home):
            argv += ["--host-bind-allow", d]
        log = open(_log_path(), "ab")
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            log.close()
        with open(_pid_path(), "w") as f:
            f.write(f"{proc.pid}\n")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if health(client, timeout=1.0) is not None:
                return client
            if proc.poll() is not None:
                raise exception.ConnectionError(
                    f"flared exited with status {proc.returncode} while starting (log: {_log_path()}):\n{_tail(_log_path())}"
                )
            time.sleep(0.05)
        raise exception.ConnectionError(
            f"flared did not become healthy within {wait:.0f}s (log: {_log_path()}):\n{_tail(_log_path())}"
        )


def ensure_server() -> Client:
    """A client for a live server; starts the embedded one when none is configured."""
    url = configured_server_url()
    if url is not None:
        client = get_client(url)
        if health(client, timeout=5.0) is None:
            raise exception.ConnectionError(f"No Flare server answers at {url}. " + how_to_start_hint(url))
        return client
    client = get_client(DEFAULT_SERVER_URL)
    if health(client, timeout=2.0) is not None:
        return client
    return start_server(DEFAULT_LISTEN)


def stop_server(timeout: float = 30.0) -> bool:
    """Stop the background server started by ``flare`` (from its pid file)."""
    try:
        with open(_pid_path()) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        os.unlink(_pid_path())
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
    try:
        os.unlink(_pid_path())
    except OSError:
        pass
    return True

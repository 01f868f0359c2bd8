"""Pre-started runners, end to end: a cold start served by a runner started before it
was asked for, which then belongs to that one container only (crates/flare-worker/src/prestart.rs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import (
    PYTHON_DIR,
    Flared,
    Server,
    load_app,
    remove_home,
    write_app,
)

# What every function below returns about its own container.
PROBE = """
import os, sys, time
import flare

def _probe():
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return {
        "start_ticks": start_ticks,
        "age": uptime - start_ticks / os.sysconf("SC_CLK_TCK"),
        "pid": os.getpid(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("FLARE_", "MY_"))},
        "cwd": os.getcwd(),
        "root": sorted(n for n in os.listdir("/root") if n.endswith(".py")),
        "path0": "/root" in sys.path,
    }
"""


def _stat_field(pid: int, i: int) -> int:
    """Field ``i`` after the command name of ``/proc/PID/stat`` (1: ppid, 19: start time)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[i])
    except (OSError, ValueError, IndexError):
        return -1


def _descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(e))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.add(k)
            todo.append(k)
    return out


def prestarted_pids(server_pid: int) -> set[int]:
    """Processes of idle pre-started runners of one server (their cgroup is `pre-...`)."""
    out = set()
    for pid in _descendants(server_pid):
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                if "/pre-" in f.read():
                    out.add(pid)
        except OSError:
            pass
    return out


def wait_for_runner(server_pid: int, timeout: float = 30) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = prestarted_pids(server_pid)
        if len(pids) >= 2:  # init and the interpreter
            time.sleep(0.5)  # its imports
            return pids
        time.sleep(0.05)
    raise AssertionError("no pre-started runner appeared")


def _no_containers(server: Server, app_id: str, timeout: float = 30) -> None:
    import json
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(server.url + "/v1/containers", timeout=10) as r:
            if not any(c["app_id"] == app_id for c in json.loads(r.read())["containers"]):
                return
        time.sleep(0.05)
    raise AssertionError("containers did not scale down")


def test_a_cold_start_takes_a_prestarted_runner_that_becomes_the_apps(server: Server, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # Apart, so that each app's code mount holds its own module only.
    a = load_app(tmp_path / "a", PROBE + """
app = flare.App()

@app.function(scaledown_window=0, env={"MY_VAR": "from-a"})
def probe():
    return _probe()
""")
    b = load_app(tmp_path / "b", PROBE + """
app = flare.App()

@app.function(scaledown_window=0, env={"MY_OTHER": "from-b"})
def probe():
    return _probe()
""")
    with a.app.run(), b.app.run():
        first = a.probe.remote()
        _no_containers(server, a.app.app_id)
        # The first start of this image recorded its template: a runner is started for it.
        wait_for_runner(server.pid)
        time.sleep(1.0)
        runners = prestarted_pids(server.pid)
        # (start time, parent) of each, while they are alive.
        stats = {p: (_stat_field(p, 19), _stat_field(p, 1)) for p in runners}
        t0 = time.monotonic()
        got = b.probe.remote()
        took = time.monotonic() - t0
        # Started before the call (a new container's process is younger than the call).
        assert got["age"] > took + 0.5, (got, took, first)
        # It is b's container now: b's environment only, b's code only, at /root.
        env = got["env"]
        assert env["FLARE_APP_ID"] == b.app.app_id
        assert env["MY_OTHER"] == "from-b"
        assert "MY_VAR" not in env and "FLARE_PRESTART" not in env
        assert got["root"] == [Path(b.__file__).name], got["root"]
        assert got["cwd"] == "/root" and got["path0"]
        _no_containers(server, b.app.app_id)
        # The runner b took (its interpreter started when the probe's did: start times
        # are boot-relative, the same inside and outside the pid namespace) and its init.
        # Runners of other images that earlier tests left in the pool stay.
        taken = {p for p, (start, _) in stats.items() if start == got["start_ticks"]}
        assert taken, (stats, got)
        taken |= {stats[p][1] for p in taken} & runners
        # Never back to the pool: the runner's processes died with b's container.
        alive = [pid for pid in taken if os.path.exists(f"/proc/{pid}")]
        assert not alive, alive


def test_a_memory_snapshot_function_never_takes_a_prestarted_runner(server: Server, tmp_path: Path) -> None:
    """enable_memory_snapshot: the container must be the checkpointable one (its program
    pid 1), so it starts new even when an idle runner of its image is there. (Its spec
    differs from the runner's template anyway: checkpointable, its own network namespace,
    an image on FUSE mounted without passthrough; the worker refuses it before comparing.)"""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = load_app(tmp_path / "a", PROBE + """
app = flare.App()

@app.function(scaledown_window=0)
def probe():
    return _probe()
""")
    b = load_app(tmp_path / "b", PROBE + """
app = flare.App()

@app.function(scaledown_window=0, enable_memory_snapshot=True)
def probe():
    return _probe()
""")
    with a.app.run(), b.app.run():
        a.probe.remote()
        _no_containers(server, a.app.app_id)
        wait_for_runner(server.pid)
        time.sleep(1.0)
        runners = prestarted_pids(server.pid)
        t0 = time.monotonic()
        got = b.probe.remote()
        took = time.monotonic() - t0
        # Started during the call, not before it; the idle runner is still idle.
        assert got["age"] < took, (got, took)
        assert "FLARE_PRESTART" not in got["env"]
        alive = [pid for pid in runners if os.path.exists(f"/proc/{pid}")]
        assert sorted(alive) == sorted(runners), (alive, runners)


def test_limits_are_the_functions_once_assigned(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, PROBE + """
app = flare.App()

@app.function(scaledown_window=0)
def warm():
    return _probe()

@app.function(scaledown_window=0, memory=1024)
def big():
    # Over the idle runner's 256 MiB limit, under the function's.
    b = bytearray(400 << 20)
    b[::4096] = b"x" * len(b[::4096])
    return _probe()

@app.function(scaledown_window=0, memory=128)
def small():
    b = bytearray(300 << 20)
    b[::4096] = b"x" * len(b[::4096])
    return _probe()
""")
    import flare

    with mod.app.run():
        mod.warm.remote()
        _no_containers(server, mod.app.app_id)
        wait_for_runner(server.pid)
        time.sleep(1.0)
        got = mod.big.remote()
        assert got["age"] > 0.5, got
        _no_containers(server, mod.app.app_id)
        wait_for_runner(server.pid)
        time.sleep(1.0)
        try:
            mod.small.remote()
            raise AssertionError("a 300 MiB allocation passed a 128 MiB limit")
        except flare.exception.Error as e:
            assert "OutOfMemory" in type(e).__name__ or "memory" in str(e).lower(), e


class OwnServer:
    """A flared server of the test's own (extra flags), and a client process for it."""

    def __init__(self, *flags: str) -> None:
        self.flared = Flared(*flags, prefix="flare-e2e-prestart-")
        self.home, self.url, self.proc = self.flared.home, self.flared.url, self.flared.proc
        self.flared.wait()

    def call_probe(self, tmp_path: Path) -> None:
        app_file = write_app(tmp_path, PROBE + """
app = flare.App()

@app.function(scaledown_window=0)
def probe():
    return _probe()
""")
        env = {**os.environ, "FLARE_SERVER_URL": self.url, "FLARE_HOME": self.home,
               "PYTHONPATH": f"{PYTHON_DIR}{os.pathsep}{tmp_path}"}
        script = f"import {app_file.stem} as m\nwith m.app.run():\n    m.probe.remote()\n"
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                           check=False)
        assert r.returncode == 0, r.stderr

    def close(self) -> None:
        self.flared.stop(kill=True)
        remove_home(self.home)


def test_prestarted_runners_are_stopped_at_shutdown(tmp_path: Path) -> None:
    """Its idle runners (processes, sockets, dirs) are gone once the server exits on SIGTERM."""
    srv = OwnServer()
    try:
        srv.call_probe(tmp_path)
        runners = wait_for_runner(srv.proc.pid)
        assert os.listdir(Path(srv.home) / "prestart"), "no runner dir"
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=30)
        alive = [p for p in runners if os.path.exists(f"/proc/{p}")]
        assert not alive, f"pre-started runner processes left: {alive}"
        assert not os.listdir(Path(srv.home) / "prestart"), os.listdir(Path(srv.home) / "prestart")
    finally:
        srv.close()


def test_idle_runners_of_an_unused_image_are_stopped(tmp_path: Path) -> None:
    """--prestart-idle-secs: no start of the image for that long and its runner goes, with
    no other start to trigger the pool."""
    srv = OwnServer("--prestart-idle-secs", "3")
    try:
        srv.call_probe(tmp_path)
        runners = wait_for_runner(srv.proc.pid)
        deadline = time.monotonic() + 15
        while any(os.path.exists(f"/proc/{p}") for p in runners) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(os.path.exists(f"/proc/{p}") for p in runners), "the idle runner outlived its image's use"
        assert not prestarted_pids(srv.proc.pid), "a new runner was started for an expired image"
    finally:
        srv.close()

"""Isolation and resource hygiene of containers, end to end."""

from __future__ import annotations

import glob
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from .conftest import PYTHON_DIR, Server, load_app, run_cli, write_app


def _get(server: Server, path: str) -> Any:
    with urllib.request.urlopen(server.url + path, timeout=10) as r:
        return json.loads(r.read())


def test_block_network_has_only_loopback(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, """
        import socket
        import flare
        app = flare.App()

        @app.function(block_network=True)
        def interfaces():
            return sorted(name for _, name in socket.if_nameindex())
    """)
    with mod.app.run():
        assert mod.interfaces.remote() == ["lo"]


def test_container_cannot_reach_control_plane(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, """
        import socket
        import flare
        app = flare.App()

        @app.function()
        def probe(host, port):
            try:
                socket.create_connection((host, port), timeout=3).close()
                return "connected"
            except OSError as e:
                return f"failed: {e}"

        @app.function()
        def via_socket():
            # the per-container API socket is the supported way to call the platform
            return probe.remote("127.0.0.1", 9)
    """)
    with mod.app.run():
        result = mod.probe.remote(server.host, server.port)
        assert result.startswith("failed"), result
        assert mod.via_socket.remote().startswith("failed")


def test_warm_reuse_and_scaledown(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, """
        import os
        import flare
        app = flare.App()

        @app.function(scaledown_window=2)
        def container_id():
            return os.environ["FLARE_CONTAINER_ID"]
    """)
    with mod.app.run():
        first = mod.container_id.remote()
        assert mod.container_id.remote() == first  # warm container reused
        fid = mod.container_id.object_id
        deadline = time.monotonic() + 30
        while True:
            stats = _get(server, f"/v1/functions/{fid}/stats")
            if stats["num_total_runners"] == 0:
                break
            assert time.monotonic() < deadline, f"container still up 30 s after a 2 s scaledown_window: {stats}"
            time.sleep(0.25)
        assert mod.container_id.remote() != first  # a new (cold) container


def _children(pid: int) -> list[int]:
    kids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.split("/")[2]))
    return kids


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        for k in _children(todo.pop()):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


def _snapshot(server: Server) -> dict[str, Any]:
    pid = server.pid
    with open(f"/proc/{pid}/mountinfo") as f:
        mounts = f.read().splitlines()
    with open("/proc/self/mountinfo") as f:
        host_mounts = f.read().splitlines()
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "mounts": len(mounts),
        "host_mounts": len(host_mounts),
        "cgroups": sorted(glob.glob("/sys/fs/cgroup/flare/*") + glob.glob("/sys/fs/cgroup/*/flare/*")),
        # Idle pre-started runners (cgroup `pre-*`) are the pool's, replaced as they are
        # used; test_prestart.py checks they go at shutdown.
        "descendants": {d for d in _descendants(pid) if not _prestarted(d)},
    }


def _prestarted(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return "/pre-" in f.read()
    except OSError:
        return False


def test_cold_containers_leave_nothing_behind(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, """
        import os
        import flare
        app = flare.App()

        @app.function()
        def cid():
            return os.environ["FLARE_CONTAINER_ID"]
    """)
    # Warm-up: pools and caches exist before the baseline. Twice, so that the second start
    # takes a pre-started runner (whose warm-up imports read more of the image: the image
    # FS keeps those chunk files open) and the pool has its idle runner again.
    for _ in range(2):
        with mod.app.run():
            mod.cid.remote()
        time.sleep(0.5)
    before = _snapshot(server)
    seen = set()
    t0 = time.monotonic()
    for _ in range(100):
        with mod.app.run():  # a new ephemeral app each time: every call is a cold container
            seen.add(mod.cid.remote())
    elapsed = time.monotonic() - t0
    assert len(seen) == 100
    deadline = time.monotonic() + 10
    while True:
        after = _snapshot(server)
        ok = (
            after["fds"] <= before["fds"] + 2
            and after["mounts"] <= before["mounts"]
            and after["host_mounts"] <= before["host_mounts"]
            and len(after["cgroups"]) <= len(before["cgroups"])
            and after["descendants"] <= before["descendants"]
        )
        if ok or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    print(f"100 cold app runs in {elapsed:.1f} s")
    assert after["fds"] <= before["fds"] + 2, (before["fds"], after["fds"])
    assert after["mounts"] <= before["mounts"], (before["mounts"], after["mounts"])
    assert after["host_mounts"] <= before["host_mounts"], (before["host_mounts"], after["host_mounts"])
    assert len(after["cgroups"]) <= len(before["cgroups"]), (before["cgroups"], after["cgroups"])
    leftover = after["descendants"] - before["descendants"]
    assert not leftover, f"processes left behind: {leftover}"


def test_callers_extra_import_paths_work_in_containers(server: Server, tmp_path: Path) -> None:
    # A module importable by the caller only through PYTHONPATH (outside the app's
    # directory, so not uploaded with it) imports inside the container too.
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "extramod_e2e.py").write_text("VALUE = 'from-extra-path'\n")
    appdir = tmp_path / "app"
    appdir.mkdir()
    path = write_app(appdir, """
        import flare
        app = flare.App()

        @app.function()
        def which():
            import extramod_e2e
            return extramod_e2e.VALUE

        @app.local_entrypoint()
        def main():
            print("got", which.remote())
    """)
    r = run_cli("run", str(path), env={"PYTHONPATH": f"{PYTHON_DIR}{os.pathsep}{extra}"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "got from-extra-path" in r.stdout

"""Memory snapshots (enable_memory_snapshot=True) end to end against live flared servers:
the first container is checkpointed with CRIU after its snap=True hooks, later cold starts
restore from the snapshot; every failure falls back to a cold start (docs/SNAPSHOTS.md)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from .conftest import Flared, Server, load_app, remove_home

SNAP_CLASS = """
    import os, random, socket, time, uuid
    import flare
    app = flare.App()

    @app.cls(cpu=0.25, memory=512, scaledown_window=2, enable_memory_snapshot=True)
    class Snap:
        @flare.enter(snap=True)
        def load(self):
            self.token = os.urandom(8).hex()
            self.data = list(range(200000))
            self.pid_at_snap = os.getpid()
            print("snap hook ran")

        @flare.enter(snap=False)
        def after(self):
            self.mode = os.environ.get("FLARE_SNAPSHOT")
            print("after hook ran", self.mode)

        @flare.method()
        def info(self, hold=0.0):
            time.sleep(hold)
            return {
                "token": self.token,
                "sum": sum(self.data),
                "mode": self.mode,
                "uuid": str(uuid.uuid4()),
                "random": random.random(),
                "container": os.environ.get("FLARE_CONTAINER_ID"),
                "links": sorted(name for _, name in socket.if_nameindex()),
            }
"""


def _get(url: str, path: str) -> Any:
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return json.loads(r.read())


def _logs(url: str, app_id: str) -> str:
    out: list[dict[str, Any]] = []
    after = -1
    while True:
        page = _get(url, f"/v1/apps/{app_id}/logs?after={after}&limit=1000")
        if not page["logs"]:
            return "".join(r["data"] for r in out)
        out += page["logs"]
        after = page["next"]


def _wait_logs(url: str, app_id: str, needle: str, count: int = 1, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = _logs(url, app_id)
        if text.count(needle) >= count:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not {count}x in the app's logs:\n{text}")
        time.sleep(0.1)


def _wait_no_containers(url: str, app_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while [c for c in _get(url, "/v1/containers")["containers"] if c["app_id"] == app_id]:
        assert time.monotonic() < deadline, "the app's containers did not scale to zero"
        time.sleep(0.2)


def _snapshots_available(log: Path) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "memory snapshots available" in text:
            return True
        if "memory snapshots unavailable" in text:
            return False
        time.sleep(0.1)
    return False


def _nat_available(log: Path) -> bool:
    """The runtime's start line says `nat=None` when outbound NAT works."""
    return any("container runtime ready" in line and "nat=None" in line for line in log.read_text(errors="replace").splitlines())


@pytest.fixture()
def snap_server(server: Server) -> Server:
    if not _snapshots_available(server.log):
        pytest.skip("criu is not usable on this host (scripts/install-criu.sh installs it)")
    return server


@contextmanager
def extra_server(env: dict[str, str]) -> Iterator[tuple[str, Path]]:
    """Another flared server with ``env``; FLARE_SERVER_URL points at it meanwhile."""
    own = Flared(prefix="flare-e2e-home-snap-", env=env)
    saved = os.environ.get("FLARE_SERVER_URL")
    try:
        own.wait()
        os.environ["FLARE_SERVER_URL"] = own.url
        yield own.url, own.log
    finally:
        if saved is None:
            os.environ.pop("FLARE_SERVER_URL", None)
        else:
            os.environ["FLARE_SERVER_URL"] = saved
        own.stop()
        remove_home(own.home)


def _concurrently(n: int, f: Any) -> list[Any]:
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = f()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_restored_containers_share_the_snapshot_but_not_its_entropy(snap_server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, SNAP_CLASS)
    with mod.app.run():
        app_id = mod.app.app_id
        first = mod.Snap().info.remote()
        # The checkpointed container itself goes on: it ran the snap=False hook, unrestored.
        assert first["mode"] is None and first["sum"] == sum(range(200000))
        # Outbound NAT is attached after the checkpoint (and after each restore).
        nat = _nat_available(snap_server.log)
        assert ("eth0" in first["links"]) == nat, first
        _wait_logs(snap_server.url, app_id, "flare: memory snapshot saved")
        _wait_no_containers(snap_server.url, app_id)
        # Two cold starts at once: both restore the same snapshot.
        a, b = _concurrently(2, lambda: mod.Snap().info.remote(1.5))
        for r in (a, b):
            assert r["mode"] == "restored", r
            assert r["token"] == first["token"], "memory comes from the snapshot"
            assert r["sum"] == first["sum"]
            assert r["container"] != first["container"], "the new container's own id"
            assert ("eth0" in r["links"]) == nat, r
        assert a["container"] != b["container"]
        assert a["uuid"] != b["uuid"], "uuid4() differs between two restores"
        assert a["random"] != b["random"], "random is reseeded after a restore"
        logs = _wait_logs(snap_server.url, app_id, "restored from a memory snapshot", count=2)
        # snap=True ran once (before the checkpoint); snap=False in each container.
        assert logs.count("snap hook ran") == 1, logs
        assert logs.count("after hook ran restored") == 2, logs


def test_a_snap_hook_that_opens_a_socket_is_told_why_and_still_serves(snap_server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, """
        import socket
        import flare
        app = flare.App()

        @app.cls(scaledown_window=2, enable_memory_snapshot=True)
        class Listener:
            @flare.enter(snap=True)
            def load(self):
                self.s = socket.socket()
                self.s.bind(("127.0.0.1", 0))
                self.s.listen()

            @flare.method()
            def port(self):
                return self.s.getsockname()[1]
    """)
    with mod.app.run():
        assert mod.Listener().port.remote() > 0
        logs = _wait_logs(snap_server.url, mod.app.app_id, "no memory snapshot taken")
        assert "TCP socket" in logs and "fd " in logs, logs
        assert "memory snapshot saved" not in logs, logs


def test_a_snapshot_corrupt_in_the_store_is_discarded_and_made_again(snap_server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, SNAP_CLASS)
    snaps = Path(snap_server.home) / "snapshots"
    with mod.app.run():
        app_id = mod.app.app_id
        first = mod.Snap().info.remote()
        _wait_logs(snap_server.url, app_id, "flare: memory snapshot saved")
        _wait_no_containers(snap_server.url, app_id)
        # Flip a byte in every stored blob and drop the materialized copies: the next
        # cold start reads the snapshot back from the store and meets digest mismatches.
        for p in (snaps / "blobs").rglob("*"):
            if p.is_file() and p.stat().st_size > 0:
                data = bytearray(p.read_bytes())
                data[len(data) // 2] ^= 0xFF
                p.chmod(stat.S_IRUSR | stat.S_IWUSR)
                p.write_bytes(bytes(data))
        for p in (snaps / "cache").iterdir():
            subprocess.run(["rm", "-rf", str(p)], check=True)
        again = mod.Snap().info.remote()
        assert again["mode"] is None and again["token"] != first["token"], "a cold start"
        _wait_logs(snap_server.url, app_id, "flare: memory snapshot saved", count=2)
        logs = _logs(snap_server.url, app_id)
        assert "stored memory snapshot was discarded" in logs, logs


def test_broken_snapshot_images_fall_back_to_a_cold_start(snap_server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, SNAP_CLASS)
    snaps = Path(snap_server.home) / "snapshots"
    with mod.app.run():
        app_id = mod.app.app_id
        mod.Snap().info.remote()
        _wait_logs(snap_server.url, app_id, "flare: memory snapshot saved")
        _wait_no_containers(snap_server.url, app_id)
        # Truncate the memory pages of every materialized snapshot: CRIU's restore fails.
        pages = [p for p in (snaps / "cache").rglob("pages-*.img")]
        assert pages
        for p in pages:
            with open(p, "r+b") as f:
                f.truncate(4096)
        r = mod.Snap().info.remote()
        assert r["mode"] is None, "started cold, the input did not fail"
        logs = _wait_logs(snap_server.url, app_id, "restoring the memory snapshot failed, starting cold instead")
        # ... and the snapshot is made again by that container.
        _wait_logs(snap_server.url, app_id, "flare: memory snapshot saved", count=2)
        assert "criu restore failed" in logs or "criu restore did not finish" in logs, logs


def test_a_failing_snap_hook_fails_the_start_like_any_enter_hook(snap_server: Server, tmp_path: Path) -> None:
    import flare

    mod = load_app(tmp_path, """
        import flare
        app = flare.App()

        @app.cls(enable_memory_snapshot=True)
        class Broken:
            @flare.enter(snap=True)
            def load(self):
                raise RuntimeError("snap hook exploded 7")

            @flare.method()
            def f(self):
                return 1
    """)
    with mod.app.run():
        with pytest.raises(flare.exception.ExecutionError, match="snap hook exploded 7"):
            mod.Broken().f.remote()


def test_without_criu_functions_start_cold_and_say_why_once(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, SNAP_CLASS)
    with extra_server({"FLARE_CRIU": "/nonexistent/criu"}) as (url, _log):
        with mod.app.run():
            app_id = mod.app.app_id
            assert mod.Snap().info.remote()["mode"] is None
            assert mod.Snap().info.remote()["mode"] is None
            logs = _wait_logs(url, app_id, "flare: no memory snapshot for")
            assert logs.count("flare: no memory snapshot for") == 1, logs
            assert "memory snapshot saved" not in logs, logs


def test_a_restore_killed_midway_falls_back_to_a_cold_start(snap_server: Server, tmp_path: Path) -> None:
    # A criu whose restores are killed 50 ms in (dumps and checks run as usual).
    real = subprocess.run(["sh", "-c", "command -v criu"], capture_output=True, text=True).stdout.strip()
    wrapper = tmp_path / "criu-killed-restore"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = restore ]; then\n'
        f'  {real} "$@" & pid=$!\n'
        "  sleep 0.05; kill -9 $pid; wait $pid; exit 137\n"
        "fi\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    mod = load_app(tmp_path, SNAP_CLASS)
    with extra_server({"FLARE_CRIU": str(wrapper)}) as (url, _log):
        with mod.app.run():
            app_id = mod.app.app_id
            mod.Snap().info.remote()
            _wait_logs(url, app_id, "flare: memory snapshot saved")
            _wait_no_containers(url, app_id)
            r = mod.Snap().info.remote()
            assert r["mode"] is None and r["sum"] == sum(range(200000))
            _wait_logs(url, app_id, "restoring the memory snapshot failed, starting cold instead")
            # Nothing of the killed restore is left running.
            time.sleep(1)
            conts = [c for c in _get(url, "/v1/containers")["containers"] if c["app_id"] == app_id]
            assert len(conts) <= 1, conts


def test_a_snapshot_never_serves_another_app(snap_server: Server, tmp_path: Path) -> None:
    # Two apps with the very same class: the second app's containers never restore the
    # first app's snapshot (whose memory holds the first app's state).
    a = load_app(tmp_path, SNAP_CLASS, stem="snap_app_a")
    b = load_app(tmp_path, SNAP_CLASS, stem="snap_app_b")
    with a.app.run():
        first = a.Snap().info.remote()
        _wait_logs(snap_server.url, a.app.app_id, "flare: memory snapshot saved")
        with b.app.run():
            other = b.Snap().info.remote()
            assert other["mode"] is None, "a cold start, not a restore of the other app's snapshot"
            assert other["token"] != first["token"]
            _wait_logs(snap_server.url, b.app.app_id, "flare: memory snapshot saved")


def test_snapshot_files_are_root_only(snap_server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, SNAP_CLASS)
    with mod.app.run():
        mod.Snap().info.remote()
        _wait_logs(snap_server.url, mod.app.app_id, "flare: memory snapshot saved")
    snaps = Path(snap_server.home) / "snapshots"
    # The memory images hold whatever the functions had in memory: no other host user
    # may read them (the dir is 0700, root's).
    st = snaps.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) & 0o077 == 0, oct(st.st_mode)

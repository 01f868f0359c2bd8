"""Fleet mode end to end: one ``flared control`` and three ``flared worker``s on this machine,
each worker in its own network namespace with its own address (veth pairs).

Kill a worker in the middle of a .map, cut one off the network, restart the control plane,
place GPU functions on declared GPUs, drain a worker. Run as root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import flare

from .conftest import FLARED, _healthy, load_app, run_cli, unique

TOKEN = "fleet-e2e-token"
TAG = f"{os.getpid() % 10000}"
# Host interfaces whose names start with "fl" are taken for container veths by flared's
# firewall rules (FLARE-INPUT drops `-i fl+`): name ours differently.
# Containers' own addresses: flared's firewall drops whatever comes from them to the host,
# so workers there could never reach the control plane.
CONTAINER_SUBNET_OCTET = 213


def _free_octet() -> int:
    """A second octet for the workers' 10.X.n.0/24 networks that no address or route on this
    host uses, and that is not the containers' 10.213.0.0/16 (a clash makes the workers'
    packets go elsewhere or be dropped: they never register)."""
    taken = {CONTAINER_SUBNET_OCTET}
    for cmd in (["ip", "-4", "-o", "addr"], ["ip", "-4", "route"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True).stdout
        except OSError:
            continue
        for word in out.split():
            parts = word.split("/")[0].split(".")
            if len(parts) == 4 and parts[0] == "10" and parts[1].isdigit():
                taken.add(int(parts[1]))
    start = os.getpid() % 100
    for i in range(100):
        octet = 150 + (start + i) % 100
        if octet not in taken:
            return octet
    raise RuntimeError("no free 10.X.0.0/16 network for the fleet's workers")


OCTET = _free_octet()


@dataclass
class Worker:
    n: int
    wid: str
    ns: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str
    home: str
    extra: list[str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None


@dataclass
class Fleet:
    url: str
    port: int
    home: str
    control: subprocess.Popen[bytes] | None
    workers: dict[str, Worker] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)

    # ------------------------------------------------------------------ API
    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def workers_now(self) -> dict[str, dict[str, Any]]:
        return {w["worker_id"]: w for w in self.get("/v1/workers")["workers"]}

    def containers_now(self) -> list[dict[str, Any]]:
        return list(self.get("/v1/containers")["containers"])

    # ------------------------------------------------------------------ processes
    def start_control(self) -> None:
        log = Path(self.home) / f"control-{len(self.logs)}.log"
        self.logs.append(log)
        self.control = subprocess.Popen(
            [str(FLARED), "control", "--home", self.home, "--listen", f"0.0.0.0:{self.port}", "--worker-token", TOKEN],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for(lambda: _healthy(self.url), 30, "control plane healthy", self.control)

    def stop_control(self, grace: float = 5.0) -> bool:
        """SIGTERM the control plane; SIGKILL it after ``grace`` s. True if it exited by itself.
        (flared control with connected workers does not exit on SIGTERM at the time of
        writing: reported; the restart test then proceeds as after a crash.)"""
        if self.control is not None and self.control.poll() is None:
            self.control.send_signal(signal.SIGTERM)
            try:
                self.control.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.control.kill()
                self.control.wait()
                return False
        return True

    def start_worker(self, w: Worker) -> None:
        log = Path(w.home) / f"worker-{len(self.logs)}.log"
        self.logs.append(log)
        w.log = log
        # nsenter switches the network namespace only: `ip netns exec` also remounts /sys,
        # which hides the cgroup hierarchy the container runtime needs.
        w.proc = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{w.ns}", str(FLARED), "worker",
             "--control", f"http://{w.host_ip}:{self.port}", "--token", TOKEN, "--home", w.home,
             "--id", w.wid, "--cpu", "1", "--memory", "4096", "--no-nat", "--address", w.ns_ip, *w.extra],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            # As if on another machine: the captured Python environment comes from the
            # control plane's store over HTTP into a lazy mount, never from this host's files.
            env={**os.environ, "FLARE_LOCAL_ENV_FROM_HOST": "0"},
        )

    def kill_worker(self, w: Worker) -> None:
        """kill -9 the worker agent and every process under it (its containers)."""
        if w.proc is None:
            return
        pids = [w.proc.pid, *descendants(w.proc.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        w.proc.wait()

    def wait_registered(self, ids: list[str], timeout: float = 30) -> None:
        wait_for(lambda: set(ids) <= {i for i, w in self.workers_now().items() if w.get("state") == "ready"},
                 timeout, f"workers {ids} registered")

    def worker_of_container(self, container_id: str) -> str | None:
        """The id of the worker whose process tree holds the container (host /proc; for a
        container made from a pre-started runner, whose initial environment predates it,
        the worker the control plane names)."""
        pid = _pid_with_env("FLARE_CONTAINER_ID", container_id)
        if pid is None:
            return next((c["worker_id"] for c in self.containers_now() if c["container_id"] == container_id), None)
        by_pid = {w.proc.pid: w.wid for w in self.workers.values() if w.proc is not None and w.proc.poll() is None}
        parents = _ppids()
        while pid > 1:
            if pid in by_pid:
                return by_pid[pid]
            pid = parents.get(pid, 0)
        return None


def wait_for(cond: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = cond()
        except (OSError, ValueError):
            v = None
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _ppids() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _pid_with_env(key: str, value: str) -> int | None:
    needle = f"{key}={value}".encode()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                env = Path(f"/proc/{d}/environ").read_bytes()
            except OSError:
                continue
            if needle in env.split(b"\0"):
                return int(d)
    return None


def _sh(*args: str, check: bool = True) -> None:
    r = subprocess.run(list(args), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {r.stderr.strip()}")


def _netns_up(w: Worker) -> None:
    _sh("ip", "netns", "add", w.ns)
    _sh("ip", "link", "add", w.host_if, "type", "veth", "peer", "name", w.ns_if)
    _sh("ip", "link", "set", w.ns_if, "netns", w.ns)
    _sh("ip", "addr", "add", f"{w.host_ip}/24", "dev", w.host_if)
    _sh("ip", "link", "set", w.host_if, "up")
    _sh("ip", "netns", "exec", w.ns, "ip", "addr", "add", f"{w.ns_ip}/24", "dev", w.ns_if)
    _sh("ip", "netns", "exec", w.ns, "ip", "link", "set", w.ns_if, "up")
    _sh("ip", "netns", "exec", w.ns, "ip", "link", "set", "lo", "up")


def _netns_down(w: Worker) -> None:
    _sh("ip", "netns", "del", w.ns, check=False)
    _sh("ip", "link", "del", w.host_if, check=False)


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.skip("fleet tests need root (network namespaces, containers)")
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"fleet tests need `{tool}`")
    if not FLARED.exists():
        pytest.skip(f"flared binary not built: {FLARED} is missing (cargo build --release -p flared)")
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port = int(s.getsockname()[1])
    root = tempfile.mkdtemp(prefix="flare-e2e-fleet-")
    fl = Fleet(url=f"http://127.0.0.1:{port}", port=port, home=os.path.join(root, "control"), control=None)
    os.makedirs(fl.home)
    # Workers 2 and 3 serve web tunnels (in their own network namespaces, so one port);
    # worker 1 does not, so it gets no containers of web endpoints.
    specs = {1: ["--gpu", "A100:1"], 2: ["--web-listen", "0.0.0.0:7879"], 3: ["--web-listen", "0.0.0.0:7879"]}
    for n, extra in specs.items():
        w = Worker(
            n=n, wid=f"fw{n}", ns=f"flare-e2e-{TAG}-w{n}", host_if=f"fe{TAG}h{n}", ns_if=f"fe{TAG}n{n}",
            host_ip=f"10.{OCTET}.{n}.1", ns_ip=f"10.{OCTET}.{n}.2", home=os.path.join(root, f"w{n}"), extra=extra,
        )
        os.makedirs(w.home)
        fl.workers[w.wid] = w
    saved = os.environ.get("FLARE_SERVER_URL")
    try:
        for w in fl.workers.values():
            _netns_up(w)
        fl.start_control()
        for w in fl.workers.values():
            fl.start_worker(w)
        try:
            fl.wait_registered(list(fl.workers))
        except AssertionError:
            _dump_logs(fl)
            raise
        os.environ["FLARE_SERVER_URL"] = fl.url
        yield fl
    finally:
        if saved is None:
            os.environ.pop("FLARE_SERVER_URL", None)
        else:
            os.environ["FLARE_SERVER_URL"] = saved
        for w in fl.workers.values():
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in fl.workers.values():
            if w.proc is not None:
                try:
                    w.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    fl.kill_worker(w)
        fl.stop_control()
        for w in fl.workers.values():
            _netns_down(w)
        if request.session.testsfailed:
            _dump_logs(fl)
        shutil.rmtree(root, ignore_errors=True)


def _dump_logs(fl: Fleet) -> None:
    for log in fl.logs:
        if log.exists():
            sys.stderr.write(f"\n===== {log} (last 6000 chars) =====\n{log.read_text(errors='replace')[-6000:]}\n")


APP_SOURCE = """
    import os, time
    import flare

    app = flare.App({name!r})

    @app.function()
    def square(x):
        time.sleep(0.002)
        return x * x

    @app.function(timeout=120)
    def slow(x, seconds=6.0):
        time.sleep(seconds)
        return (x, os.environ["FLARE_CONTAINER_ID"])

    @app.function(gpu="A100")
    def on_a100(x):
        return os.environ["FLARE_CONTAINER_ID"]

    @app.function(gpu="H100")
    def on_h100(x):
        return x
"""


@pytest.fixture(scope="module")
def fleet_app(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    mod = load_app(tmp_path_factory.mktemp("fleetapp"), APP_SOURCE.format(name=unique("fleet")))
    try:
        with mod.app.run():
            yield mod
    except flare.exception.NotFoundError:
        pass  # the control plane restart forgot this ephemeral app (stopping it finds nothing)


def _running_container(fleet: Fleet, function: str) -> dict[str, Any]:
    def find() -> Any:
        for c in fleet.containers_now():
            if c["function"] == function and c.get("inputs_in_flight", 0) > 0:
                return c
        return None

    return wait_for(find, 30, f"a container of {function} running an input")  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- images


def test_remote_workers_run_the_captured_environment_from_the_store(fleet: Fleet, fleet_app: Any) -> None:
    """The functions' default image (the caller's captured environment) reaches workers
    from the control plane's store over HTTP: a lazy mount and chunks in their own cache."""
    cid = fleet_app.on_a100.remote(1)
    w = fleet.workers[fleet.worker_of_container(cid) or ""]
    mnt = Path(w.home) / "imagefs" / "mnt"
    mounted = [p for p in mnt.iterdir() if os.path.ismount(p)]
    assert mounted, list(mnt.iterdir())
    cached = sum(1 for _ in (Path(w.home) / "chunk-cache").rglob("*") if _.is_file())
    assert cached > 10, cached


# --------------------------------------------------------------------------- placement


def test_gpu_placement_and_visible_wait(fleet: Fleet, fleet_app: Any) -> None:
    cid = fleet_app.on_a100.remote(1)
    assert fleet.worker_of_container(cid) == "fw1"  # the only worker that declares an A100
    assert fleet.workers_now()["fw1"]["gpus_used"] == {"A100": 1}
    call = fleet_app.on_h100.spawn(1)
    try:
        reason = "waiting: no worker with gpu=H100"
        wait_for(lambda: any(c["function"] == "on_h100" and c["state"] == reason for c in fleet.containers_now()),
                 10, "a visible waiting reason")
        r = run_cli("container", "list")
        assert r.returncode == 0, r.stderr
        assert any("on_h100" in line and reason in line for line in r.stdout.splitlines()), r.stdout
        r = run_cli("app", "list")
        assert r.returncode == 0 and "on_h100(0/1)" in r.stdout, r.stdout + r.stderr
        r = run_cli("worker", "list")
        assert r.returncode == 0, r.stderr
        assert any(line.startswith("fw1") and "A100 1/1" in line for line in r.stdout.splitlines()), r.stdout
    finally:
        call.cancel()
    with pytest.raises(flare.exception.InputCancellation):
        call.get(timeout=10)
    wait_for(lambda: not any(c["function"] == "on_h100" for c in fleet.containers_now()), 10, "the wait to go away")


# --------------------------------------------------------------------------- memory snapshots


def _stop_worker(fleet: Fleet, w: Worker) -> None:
    """SIGTERM a worker (it stops its containers and leaves) and wait until it is gone."""
    assert w.proc is not None
    w.proc.send_signal(signal.SIGTERM)
    w.proc.wait(timeout=30)
    wait_for(lambda: w.wid not in fleet.workers_now(), 15, f"{w.wid} to leave")


def _worker_of(fleet: Fleet, container_id: str) -> str:
    """The worker the control plane names for a live container (a restored container's
    initial environment is its snapshot's, so host /proc cannot tell)."""
    found = next((c["worker_id"] for c in fleet.containers_now() if c["container_id"] == container_id), None)
    assert found is not None, f"container {container_id} is not listed"
    return str(found)


def _record(fleet: Fleet) -> tuple[Path, dict[str, Any]]:
    records = list((Path(fleet.home) / "snapshot-records").glob("*.json"))
    assert len(records) == 1, records
    return records[0], json.loads(records[0].read_text())


def test_a_snapshot_made_on_one_worker_restores_on_another(fleet: Fleet, tmp_path: Path) -> None:
    """Snapshots are shared through the control plane: the first container (worker A)
    checkpoints and uploads; with A gone, a cold start on B finds the record and, since
    it claims a CPU feature B lacks, starts cold (the reason in the app's logs), makes its
    own snapshot and replaces the record; with B gone too, C restores B's snapshot."""
    from .test_snapshots import SNAP_CLASS, _logs, _snapshots_available, _wait_logs, _wait_no_containers

    if not all(w.log is not None and _snapshots_available(w.log) for w in fleet.workers.values()):
        pytest.skip("criu is not usable on this host (scripts/install-criu.sh installs it)")
    mod = load_app(tmp_path, SNAP_CLASS)
    stopped: list[Worker] = []
    try:
        with mod.app.run():
            app_id = mod.app.app_id
            first = mod.Snap().info.remote()
            a = fleet.workers[_worker_of(fleet, first["container"])]
            _wait_logs(fleet.url, app_id, "flare: memory snapshot shared with the fleet")
            path, record = _record(fleet)
            assert record["key"] == path.stem and record["cpu_flags"], record
            # Records are the workers' only: no token, a wrong one, and any container, refused.
            for headers in ({}, {"Authorization": "Bearer not-the-token"}):
                req = urllib.request.Request(f"{fleet.url}/v1/snapshots/{path.stem}", headers=headers)
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(req, timeout=10)
                assert e.value.code == 403
            # As if the snapshot had been taken on a CPU with a feature no worker here has.
            record["cpu_flags"] = [*record["cpu_flags"], "flare_test_feature"]
            path.write_text(json.dumps(record))
            _stop_worker(fleet, a)
            stopped.append(a)

            second = mod.Snap().info.remote()
            b = fleet.workers[_worker_of(fleet, second["container"])]
            assert b.wid != a.wid
            assert second["mode"] is None and second["token"] != first["token"], "a cold start"
            logs = _wait_logs(fleet.url, app_id, "flare: memory snapshot shared with the fleet", count=2)
            assert "features this one lacks (flare_test_feature)" in logs, logs
            replaced = json.loads(path.read_text())
            assert "flare_test_feature" not in replaced["cpu_flags"], "B's snapshot replaced the record"
            _wait_no_containers(fleet.url, app_id)
            _stop_worker(fleet, b)
            stopped.append(b)

            third = mod.Snap().info.remote()
            c = _worker_of(fleet, third["container"])
            assert c not in (a.wid, b.wid)
            assert third["mode"] == "restored", third
            assert third["token"] == second["token"], "memory comes from B's snapshot"
            assert third["sum"] == second["sum"]
            assert "restored from a memory snapshot" in _logs(fleet.url, app_id)
            # C pulled the snapshot's blobs into its own store.
            blobs = Path(fleet.workers[c].home) / "snapshots" / "blobs"
            assert sum(p.stat().st_size for p in blobs.rglob("*") if p.is_file()) > 1 << 20
            log = fleet.workers[c].log
            fetched = [line for line in (log.read_text(errors="replace") if log else "").splitlines()
                       if "snapshot blobs fetched" in line]
            print(f"snapshot across workers: {fetched[-1] if fetched else 'no fetch line'}; "
                  f"{[line for line in _logs(fleet.url, app_id).splitlines() if 'restored from' in line or 'shared with' in line]}")
    finally:
        for w in stopped:
            fleet.start_worker(w)
        fleet.wait_registered([w.wid for w in stopped], timeout=30)


# --------------------------------------------------------------------------- worker cut off


def test_worker_cut_off_and_back(fleet: Fleet, fleet_app: Any) -> None:
    t0 = time.monotonic()
    call = fleet_app.slow.spawn(7, 6.0)
    c = _running_container(fleet, "slow")
    wid = fleet.worker_of_container(c["container_id"])
    assert wid is not None
    w = fleet.workers[wid]
    _sh("ip", "link", "set", w.host_if, "down")
    cut = time.monotonic()
    try:
        wait_for(lambda: wid not in fleet.workers_now(), 12, f"{wid} declared dead")
        dead_after = time.monotonic() - cut
        assert dead_after < 11, dead_after
        x, new_cid = call.get(timeout=60)
        assert x == 7 and new_cid != c["container_id"]
        assert fleet.worker_of_container(new_cid) != wid
        assert time.monotonic() - t0 > 6.0 + dead_after - 1  # it ran again after the cut
    finally:
        _sh("ip", "link", "set", w.host_if, "up")
    back = time.monotonic()
    fleet.wait_registered([wid], timeout=40)
    rejoined_after = time.monotonic() - back
    # the stale container of the old session is stopped and never listed again
    wait_for(lambda: fleet.worker_of_container(c["container_id"]) is None, 20, "the stale container to stop")
    assert c["container_id"] not in {x["container_id"] for x in fleet.containers_now()}
    time.sleep(1.0)  # give a late result every chance to arrive
    info = fleet.get(f"/v1/calls/{call.object_id}")
    assert info["num_outputs"] == 1, info
    outs = fleet.get(f"/v1/calls/{call.object_id}/outputs?after=-1&wait_ms=0")["outputs"]
    assert len(outs) == 1 and outs[0]["status"] == "success", outs
    print(f"cut-off: dead after {dead_after:.1f}s, re-registered {rejoined_after:.1f}s after the link came back")


# --------------------------------------------------------------------------- worker killed


def test_map_survives_worker_kill(fleet: Fleet, fleet_app: Any) -> None:
    victim = fleet.workers["fw3"]
    n = 10_000
    results = []
    killed_at = None
    t0 = time.monotonic()
    for i, r in enumerate(fleet_app.square.map(range(n))):
        results.append(r)
        if i == n // 2:
            assert fleet.workers_now()["fw3"]["containers"] > 0
            fleet.kill_worker(victim)
            killed_at = time.monotonic() - t0
    elapsed = time.monotonic() - t0
    assert killed_at is not None
    assert len(results) == n
    assert results == [x * x for x in range(n)]
    wait_for(lambda: "fw3" not in fleet.workers_now(), 15, "fw3 declared dead")
    # the killed worker's inputs did not use up user retries: square has none and succeeded
    print(f"10k map: {elapsed:.1f}s, worker killed at {killed_at:.1f}s")
    fleet.start_worker(victim)
    fleet.wait_registered(["fw3"], timeout=30)


# --------------------------------------------------------------------------- control plane restart


def test_control_plane_restart(fleet: Fleet, tmp_path: Path) -> None:
    name = unique("fleetdep")
    mod = load_app(tmp_path, APP_SOURCE.format(name=name))
    mod.app.deploy(name)
    square = flare.Function.from_name(name, "square")
    slow = flare.Function.from_name(name, "slow")
    spawned = slow.spawn(3, 4.0)
    n = 6000
    out: dict[str, Any] = {}

    def run_map() -> None:
        try:
            out["results"] = list(square.map(range(n)))
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=run_map, daemon=True)
    t.start()
    _running_container(fleet, "slow")
    wait_for(lambda: any(c["function"] == "square" and c.get("inputs_in_flight") for c in fleet.containers_now()),
             20, "the map running")
    assert t.is_alive(), "the map finished before the restart"
    t_restart = time.monotonic()
    graceful = fleet.stop_control()
    stopped = time.monotonic() - t_restart
    time.sleep(0.5)
    fleet.start_control()
    started = time.monotonic() - t_restart
    fleet.wait_registered(list(fleet.workers), timeout=30)
    rejoin = time.monotonic() - t_restart
    assert flare.Function.from_name(name, "square").remote(9) == 81
    assert flare.FunctionCall.from_id(spawned.object_id).get(timeout=60)[0] == 3
    spawned_done = time.monotonic() - t_restart
    t.join(timeout=90)
    map_done = time.monotonic() - t_restart
    assert not t.is_alive(), "the map did not finish after the restart"
    assert "error" not in out, repr(out.get("error"))
    assert out["results"] == [x * x for x in range(n)]
    print(f"restart: control stopped {stopped:.1f}s (graceful={graceful}), up {started:.1f}s, workers re-registered {rejoin:.1f}s, spawned result {spawned_done:.1f}s, "
          f"map finished {map_done:.1f}s after SIGTERM")
    run_cli("app", "stop", name)


# --------------------------------------------------------------------------- drain


def test_worker_drain(fleet: Fleet, tmp_path: Path) -> None:
    # A fresh app: ephemeral apps do not survive the control-plane restart above.
    fleet_app = load_app(tmp_path, APP_SOURCE.format(name=unique("fleetdrain")))
    with fleet_app.app.run():
        _drain(fleet, fleet_app)


def _drain(fleet: Fleet, fleet_app: Any) -> None:
    call = fleet_app.slow.spawn(5, 4.0)
    c = _running_container(fleet, "slow")
    wid = fleet.worker_of_container(c["container_id"])
    assert wid is not None
    w = fleet.workers[wid]
    # `flared worker drain` signals the worker and waits until it has left
    drain = subprocess.Popen([str(FLARED), "worker", "drain", "--home", w.home],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: fleet.workers_now()[wid].get("state") != "ready", 10, f"{wid} draining")
    # new work lands elsewhere while the running input finishes
    got = list(fleet_app.slow.starmap([(i, 0.5) for i in range(4)]))
    assert [g[0] for g in got] == [0, 1, 2, 3]
    for _, cid in got:
        assert fleet.worker_of_container(cid) != wid
    assert call.get(timeout=30)[0] == 5
    assert w.proc is not None
    w.proc.wait(timeout=30)
    wait_for(lambda: wid not in fleet.workers_now(), 10, f"{wid} to leave")
    out, _ = drain.communicate(timeout=30)
    assert drain.returncode == 0, out


WEB_SOURCE = """
    import flare

    app = flare.App({name!r})

    @app.function(min_containers=2)
    @flare.asgi_app()
    def api():
        import os

        async def web(scope, receive, send):
            if scope["type"] == "websocket":
                await receive()
                await send({{"type": "websocket.accept"}})
                msg = await receive()
                await send({{"type": "websocket.send", "text": "echo:" + msg["text"]}})
                await send({{"type": "websocket.close"}})
                return
            if scope["type"] != "http":
                return
            await send({{"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}})
            for i in range(3):
                await send({{"type": "http.response.body", "body": f"part {{i}} ".encode(), "more_body": True}})
            await send({{"type": "http.response.body", "body": os.environ["FLARE_CONTAINER_ID"].encode()}})
        return web
"""


def test_web_requests_reach_containers_on_remote_workers(fleet: Fleet, tmp_path: Path) -> None:
    """The control plane's ingress reaches containers on remote workers through their web
    tunnels (`--web-listen`, advertised as 0.0.0.0 and dialed at the session's address);
    a worker without a tunnel gets no web containers."""
    import socket

    from websockets.sync.client import connect

    mod = load_app(tmp_path, WEB_SOURCE.format(name=unique("fleetweb")))
    with mod.app.run():
        url = mod.api.get_web_url()
        host = url.split("://", 1)[1]
        seen = set()
        for _ in range(10):
            req = urllib.request.Request(f"http://127.0.0.1:{fleet.port}/", headers={"Host": host})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    body = r.read().decode()
            except urllib.error.HTTPError as e:
                raise AssertionError(f"{e.code}: {e.read().decode(errors='replace')}") from e
            assert body.startswith("part 0 part 1 part 2 "), body
            seen.add(body.rsplit(" ", 1)[1])
        workers = {_worker_of(fleet, cid) for cid in seen}
        assert workers and workers <= {"fw2", "fw3"}, workers
        web_containers = [c for c in fleet.containers_now() if c["function"] == "api"]
        assert {c["worker_id"] for c in web_containers} <= {"fw2", "fw3"}, web_containers
        sock = socket.create_connection(("127.0.0.1", fleet.port), timeout=60)
        with connect(f"ws://{host}/ws", sock=sock, open_timeout=60) as ws:
            ws.send("through the tunnel")
            assert ws.recv(timeout=30) == "echo:through the tunnel"

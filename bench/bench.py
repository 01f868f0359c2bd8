#!/usr/bin/env python3
"""Flare benchmark suite: cold start, warm round trip, .map throughput, memory.

    python bench/bench.py [--quick]

Starts its own ``flared server`` (as root) on a free port with a temporary FLARE_HOME,
runs every benchmark in one run against it, prints a table, writes
bench/results/<UTC timestamp>.json and bench/results/latest.json, and stops the server.
Standard library only, plus the flare SDK. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
sys.path.insert(0, os.path.join(REPO, "python"))

Json = dict[str, Any]


# --------------------------------------------------------------------------- helpers


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample list."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def summary_ms(samples_s: list[float]) -> Json:
    """p50/p90/p99/mean/min/max in milliseconds of samples given in seconds."""
    ms = [s * 1000.0 for s in samples_s]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def read_kv_kb(path: str, key: str) -> int | None:
    """Value in kB of ``key:`` in a /proc status-like file, None if absent/unreadable."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_kb(pid: int) -> int | None:
    return read_kv_kb(f"/proc/{pid}/status", "VmRSS")


def pss_kb(pid: int) -> int | None:
    return read_kv_kb(f"/proc/{pid}/smaps_rollup", "Pss")


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid``, found by scanning /proc/*/stat."""
    kids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: fields follow the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            kids.append(int(entry))
    return sorted(kids)


def cmd_output(args: list[str]) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> Json:
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = cmd_output(["git", "-C", REPO, "rev-parse", "HEAD"])
    dirty = cmd_output(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"])
    return {
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_total_kb": read_kv_kb("/proc/meminfo", "MemTotal"),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "loadavg_start": list(os.getloadavg()),
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
    }


# --------------------------------------------------------------------------- server


class Server:
    """A private ``flared server`` on a free port with a temporary FLARE_HOME."""

    def __init__(self, flared: str) -> None:
        self.flared = flared
        self.home = tempfile.mkdtemp(prefix="flare-bench-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.home, "flared.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        from flare._server import host_bind_allow

        # As the server `flare run` starts on a laptop: this environment's dirs may be
        # bound from the host (an explicitly started server serves them from the store).
        argv = [self.flared, "server", "--home", self.home, "--listen", f"127.0.0.1:{self.port}"]
        for d in host_bind_allow(self.home):
            argv += ["--host-bind-allow", d]
        # The worker logs each container start's steps at debug (cold_start_steps reads them).
        env = {**os.environ, "FLARE_LOG": os.environ.get("FLARE_LOG", "info,flare_worker=debug")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flared exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                if self.get("/v1/health").get("status") == "ok":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"flared did not become healthy in {timeout:.0f}s; log:\n{self.log_tail()}")

    def get(self, path: str, timeout: float = 10.0) -> Json:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise OSError(f"GET {path}: HTTP {resp.status}: {body[:200]!r}")
            data: Json = json.loads(body)
            return data
        finally:
            conn.close()

    def containers(self) -> list[Json]:
        items: list[Json] = self.get("/v1/containers")["containers"]
        return items

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.home, ignore_errors=True)


def cold_start_steps(log_path: str, skip: int) -> Json:
    """p50 of each start step from the worker's "cold start steps" debug lines.

    Each line holds ``step=us`` marks, microseconds since the worker got the assignment;
    the first ``skip`` lines (untimed starts) are left out. Reported per step: the p50
    of the mark itself and of the time since the previous mark."""
    rows: list[list[tuple[str, int]]] = []  # per start: (step, us) in order
    try:
        with open(log_path, errors="replace") as fh:
            for line in fh:
                if "cold start steps" not in line:
                    continue
                marks = [(k, int(v)) for k, v in (kv.split("=", 1) for kv in line.split("steps=", 1)[1].split()
                                                   if "=" in kv) if v.isdigit()]
                rows.append(marks)
    except OSError:
        return {}
    rows = rows[skip:]
    if not rows:
        return {}
    # Starts by path: a pre-started runner's ("assign" step) or a new container's.
    out: Json = {}
    for kind, group in (("prestarted", [r for r in rows if any(k == "assign" for k, _ in r)]),
                        ("new_container", [r for r in rows if not any(k == "assign" for k, _ in r)])):
        if not group:
            continue
        names: list[str] = []
        at: dict[str, list[int]] = {}
        delta: dict[str, list[int]] = {}
        for r in group:
            prev = 0
            for k, us in r:
                if k not in at:
                    names.append(k)
                    at[k], delta[k] = [], []
                at[k].append(us)
                delta[k].append(us - prev)
                prev = us
        out[kind] = {"n": len(group), "steps": [
            {"step": k, "at_p50_ms": round(percentile(at[k], 50) / 1000, 3),
             "delta_p50_ms": round(percentile(delta[k], 50) / 1000, 3)} for k in names]}
    return out


def is_prestarted(pid: int) -> bool:
    """Whether ``pid`` is in an idle pre-started runner's cgroup (``.../pre-<worker>-<n>``)."""
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            return "/pre-" in fh.read()
    except OSError:
        return False


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        ppid = _parent_pid(pid)
        if ppid is None or ppid <= 1:
            return False
        if ppid == ancestor:
            return True
        pid = ppid
    return False


def prestarted_memory(server_pid: int) -> Json:
    """Pss of the idle pre-started runners (each one: the container's init plus the
    interpreter), found by their cgroup (``.../pre-<worker>-<n>``), of this bench's flared
    only (another flared on the machine names its runners' cgroups the same way)."""
    per: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cgroup") as fh:
                cg = fh.read()
        except OSError:
            continue
        names = [part for line in cg.splitlines() for part in line.split("/") if part.startswith("pre-")]
        if not names or not _descends_from(int(entry), server_pid):
            continue
        pss = pss_kb(int(entry))
        if pss is not None:
            per[names[-1]] = per.get(names[-1], 0) + pss
    return {"runners": len(per), "pss_kb": per,
            "pss_kb_mean": round(statistics.fmean(per.values()), 1) if per else None}


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


# --------------------------------------------------------------------------- runc baseline


@dataclass
class RuncBundle:
    """An OCI bundle equivalent to a Flare container running ``python -c pass``."""

    runc: str
    path: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="flare-bench-oci-"))

    def build(self) -> None:
        rootfs = os.path.join(self.path, "rootfs")
        os.makedirs(rootfs)
        mounts: list[Json] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        ]
        prefix = os.path.realpath(sys.base_prefix)
        for host in ("/usr", "/lib", "/lib64", "/etc", prefix):
            if os.path.islink(host):
                # Merged /usr: /lib -> usr/lib. Mirror the link instead of mounting it twice.
                os.symlink(os.readlink(host), os.path.join(rootfs, host.lstrip("/")))
            elif os.path.isdir(host):
                os.makedirs(os.path.join(rootfs, host.lstrip("/")), exist_ok=True)
                mounts.append({"destination": host, "type": "bind", "source": host,
                               "options": ["rbind", "ro", "nosuid", "nodev"]})
        for d in ("proc", "dev", "tmp"):
            os.makedirs(os.path.join(rootfs, d), exist_ok=True)
        caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID", "CAP_SETUID"]
        config: Json = {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": 0, "gid": 0},
                "args": [os.path.realpath(sys.executable), "-c", "pass"],
                "env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"],
                "cwd": "/",
                "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
                "noNewPrivileges": True,
            },
            "root": {"path": "rootfs", "readonly": True},
            "hostname": "bench",
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            },
        }
        with open(os.path.join(self.path, "config.json"), "w") as fh:
            json.dump(config, fh, indent=2)

    def run_once(self, container_id: str) -> float:
        t0 = time.perf_counter()
        proc = subprocess.run([self.runc, "run", "--bundle", self.path, container_id],
                              stdin=subprocess.DEVNULL, capture_output=True)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"runc run exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-500:]}")
        return elapsed

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def find_or_install_runc(allow_install: bool) -> tuple[str | None, str | None]:
    """(path to runc, None) or (None, reason it is unavailable)."""
    found = shutil.which("runc")
    if found:
        return found, None
    if not allow_install:
        return None, "runc is not installed and --no-install was given"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "runc is not installed and apt-get (as root) is not available"
    print("runc not found: apt-get install -y runc ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        proc = subprocess.run(["apt-get", "install", "-y", "runc"], env=env, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"apt-get install runc failed: {e}"
    found = shutil.which("runc")
    if proc.returncode != 0 or not found:
        return None, f"apt-get install runc failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
    return found, None


# --------------------------------------------------------------------------- benchmarks


def bench_cold_start(server: Server, runs: int, allow_install: bool) -> Json:
    """Cold .remote() vs. `python -c pass` vs. `runc run`, interleaved so they share the noise."""
    import bench_apps

    runc, runc_skip = find_or_install_runc(allow_install)
    bundle: RuncBundle | None = None
    if runc is not None:
        bundle = RuncBundle(runc)
        try:
            bundle.build()
            bundle.run_once(f"flare-bench-{os.getpid()}-warmup")
        except (OSError, RuntimeError) as e:
            runc_skip = f"runc run does not work here: {e}"
            bundle.cleanup()
            bundle = None
    if runc_skip:
        print(f"  runc baseline skipped: {runc_skip}", flush=True)

    python_cmd = [sys.executable, "-c", "pass"]
    # Reference only: the interpreter without site.py (no .pth files, no user site).
    bare_cmd = [sys.executable, "-I", "-S", "-c", "pass"]
    cold: list[float] = []
    nopool: list[float] = []
    plain: list[float] = []
    bare: list[float] = []
    oci: list[float] = []
    with bench_apps.cold_app.run(show_output=False):
        app_id = bench_apps.cold_app.app_id

        def no_containers() -> bool:
            return not any(c["app_id"] == app_id for c in server.containers())

        # One untimed round: page cache, .pyc files, first registration work.
        bench_apps.cold_noop.remote(0)
        bench_apps.cold_noop_nopool.remote(0)
        subprocess.run(python_cmd, check=True)
        for i in range(runs):
            if not wait_until(no_containers, timeout=30):
                raise RuntimeError("the cold-start container did not scale down within 30 s")
            time.sleep(0.05)  # let the exited container's teardown finish off the clock
            t0 = time.perf_counter()
            result = bench_apps.cold_noop.remote(i)
            cold.append(time.perf_counter() - t0)
            assert result == i, result

            if not wait_until(no_containers, timeout=30):
                raise RuntimeError("the cold-start container did not scale down within 30 s")
            time.sleep(0.05)
            t0 = time.perf_counter()
            result = bench_apps.cold_noop_nopool.remote(i)
            nopool.append(time.perf_counter() - t0)
            assert result == i, result

            t0 = time.perf_counter()
            subprocess.run(python_cmd, check=True)
            plain.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            subprocess.run(bare_cmd, check=True)
            bare.append(time.perf_counter() - t0)

            if bundle is not None:
                oci.append(bundle.run_once(f"flare-bench-{os.getpid()}-{i}"))
        time.sleep(1.0)
        idle_runners = prestarted_memory(server.pid)
    if bundle is not None:
        bundle.cleanup()

    out: Json = {
        "runs": runs,
        "flare_cold_remote": summary_ms(cold),
        "flare_cold_remote_no_pool": summary_ms(nopool),
        "prestarted_idle_memory": idle_runners,
        "python_c_pass": summary_ms(plain),
        "python_IS_c_pass": summary_ms(bare),
        "runc_run_python_c_pass": summary_ms(oci) if oci else {"skipped": runc_skip},
    }
    out["worker_steps"] = cold_start_steps(server.log_path, skip=2)
    out["ratio_p50_no_pool_vs_python"] = round(
        out["flare_cold_remote_no_pool"]["p50_ms"] / out["python_c_pass"]["p50_ms"], 3)
    out["ratio_p50_vs_python"] = round(out["flare_cold_remote"]["p50_ms"] / out["python_c_pass"]["p50_ms"], 3)
    out["ratio_p90_vs_python"] = round(out["flare_cold_remote"]["p90_ms"] / out["python_c_pass"]["p90_ms"], 3)
    if oci:
        out["ratio_p50_vs_runc"] = round(out["flare_cold_remote"]["p50_ms"] / out["runc_run_python_c_pass"]["p50_ms"], 3)
    return out


def bench_warm_and_map(server: Server, calls: int, map_inputs: int) -> tuple[Json, Json]:
    import bench_apps

    warm: list[float] = []
    maps: list[Json] = []
    with bench_apps.warm_app.run(show_output=False):
        app_id = bench_apps.warm_app.app_id
        for i in range(50):  # warm-up: container start, connection, allocator
            bench_apps.echo.remote(i)
        for i in range(calls):
            t0 = time.perf_counter()
            result = bench_apps.echo.remote(i)
            warm.append(time.perf_counter() - t0)
            assert result == i, result

        for label in ("first", "second"):
            t0 = time.perf_counter()
            results = list(bench_apps.ident.map(range(map_inputs)))
            elapsed = time.perf_counter() - t0
            assert results == list(range(map_inputs)), "map returned wrong results"
            n_containers = sum(1 for c in server.containers() if c["app_id"] == app_id and c["function"] == "ident")
            maps.append({
                "run": label,
                "inputs": map_inputs,
                "seconds": round(elapsed, 4),
                "inputs_per_s": round(map_inputs / elapsed, 1),
                "containers_after": n_containers,
            })
    warm_out: Json = {"calls": calls, **summary_ms(warm)}
    map_out: Json = {"inputs": map_inputs, "first": maps[0], "second": maps[1],
                     "inputs_per_s": maps[1]["inputs_per_s"]}
    return warm_out, map_out


def bench_concurrent_writes(server: Server, clients: int, spawns_per_client: int, probes: int) -> Json:
    """API latency while ``clients`` threads spawn calls as fast as they can.

    A spawned input is durable before its response (it is written to the store), so each
    spawn is a disk write. Each client thread holds its own keep-alive connection and
    sends ``POST /v1/functions/{id}/calls`` (kind ``spawn``) back to back; meanwhile a
    probe thread times ``GET /v1/functions/{id}/stats`` (a read that needs the state lock
    and no disk). Reported: spawn latency and throughput, and the probe's latency idle vs.
    under the spawn load: if the lock waited on the disk, the probe would wait with it.
    Raw HTTP (standard library) so the SDK's own client costs stay out of the number."""
    import pickle
    import threading
    from binascii import b2a_base64

    import bench_apps

    with bench_apps.spawn_app.run(show_output=False):
        app_id = bench_apps.spawn_app.app_id
        fid = server.get(f"/v1/apps/{app_id}/functions/spawned")["function_id"]
        calls_path = f"/v1/functions/{fid}/calls"
        stats_path = f"/v1/functions/{fid}/stats"

        def body(i: int) -> bytes:
            args = b2a_base64(pickle.dumps(((i,), {}), protocol=4), newline=False).decode()
            return ('{"kind":"spawn","inputs":[{"args":"%s"}],"more":false,"wait_ms":0}' % args).encode()

        def timed_requests(method: str, path: str, bodies: list[bytes | None], out: list[float]) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            try:
                for b in bodies:
                    headers = {"Content-Type": "application/json"} if b is not None else {}
                    t0 = time.perf_counter()
                    conn.request(method, path, body=b, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out.append(time.perf_counter() - t0)
                    if resp.status != 200:
                        raise OSError(f"{method} {path}: HTTP {resp.status}: {data[:200]!r}")
            finally:
                conn.close()

        idle_probe: list[float] = []
        timed_requests("GET", stats_path, [None] * probes, idle_probe)

        spawn_lat: list[list[float]] = [[] for _ in range(clients)]
        loaded_probe: list[float] = []
        errors: list[BaseException] = []
        stop_probe = threading.Event()

        def client(k: int) -> None:
            try:
                timed_requests("POST", calls_path, [body(k * spawns_per_client + i) for i in range(spawns_per_client)],
                               spawn_lat[k])
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        def probe() -> None:
            try:
                while not stop_probe.is_set():
                    timed_requests("GET", stats_path, [None] * 10, loaded_probe)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        prober = threading.Thread(target=probe)
        t0 = time.perf_counter()
        prober.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        stop_probe.set()
        prober.join()
        if errors:
            raise RuntimeError(f"concurrent spawn benchmark failed: {errors[0]!r}")
        total = clients * spawns_per_client
        # Let the spawned inputs drain before the app stops (not timed).
        wait_until(lambda: (lambda s: s["backlog"] == 0 and s["num_running_inputs"] == 0)(server.get(stats_path)),
                   timeout=120, interval=0.2)
    all_spawns = [x for lat in spawn_lat for x in lat]
    return {
        "clients": clients,
        "spawns": total,
        "spawns_per_s": round(total / elapsed, 1),
        "spawn": summary_ms(all_spawns),
        "probe_idle": summary_ms(idle_probe),
        "probe_under_load": summary_ms(loaded_probe),
    }


def memory_snapshot(pid: int) -> Json:
    return {"rss_kb": rss_kb(pid), "pss_kb": pss_kb(pid)}


def bench_memory(server: Server, idle: Json) -> Json:
    """Per idle container: its init's Pss + flared's RSS growth, with N warm containers."""
    import bench_apps

    n = bench_apps.MEMORY_CONTAINERS
    before = memory_snapshot(server.pid)
    with bench_apps.memory_app.run(show_output=False):
        app_id = bench_apps.memory_app.app_id

        def all_ready() -> bool:
            return sum(1 for c in server.containers() if c["app_id"] == app_id and c["state"] == "ready") >= n

        if not wait_until(all_ready, timeout=120, interval=0.1):
            raise RuntimeError(f"{n} containers did not become ready within 120 s")
        time.sleep(1.0)  # let start-up allocations settle
        after = memory_snapshot(server.pid)
        inits: list[Json] = []
        for child in children_of(server.pid):
            grandkids = children_of(child)
            if not grandkids:
                continue  # not a container init (it has the python runner as its child)
            if is_prestarted(child):
                continue  # an idle pre-started runner: no app's container (reported with cold start)
            inits.append({
                "init_pid": child,
                "init_pss_kb": pss_kb(child),
                "init_rss_kb": rss_kb(child),
                "runner_pss_kb": sum(pss_kb(g) or 0 for g in grandkids),
                "runner_rss_kb": sum(rss_kb(g) or 0 for g in grandkids),
            })
    if len(inits) != n:
        print(f"  warning: found {len(inits)} container inits under flared, expected {n}", flush=True)
    init_pss = [i["init_pss_kb"] for i in inits if i["init_pss_kb"] is not None]
    growth_rss = (after["rss_kb"] or 0) - (before["rss_kb"] or 0)
    growth_pss = (after["pss_kb"] or 0) - (before["pss_kb"] or 0)
    init_mean = statistics.fmean(init_pss) if init_pss else 0.0
    per_container_flared = growth_rss / n
    return {
        "flared_idle": idle,
        "containers": n,
        "flared_before": before,
        "flared_with_containers": after,
        "flared_rss_growth_kb_per_container": round(per_container_flared, 1),
        "flared_pss_growth_kb_per_container": round(growth_pss / n, 1),
        "init_pss_kb_mean": round(init_mean, 1),
        "init_pss_kb_max": max(init_pss) if init_pss else None,
        "runner_pss_kb_mean": round(statistics.fmean(i["runner_pss_kb"] for i in inits), 1) if inits else None,
        "platform_kb_per_container": round(init_mean + per_container_flared, 1),
        "inits": inits,
    }


# --------------------------------------------------------------------------- report


def fmt_ms(v: float) -> str:
    return f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms"


def fmt_mb(kb: float | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024:.1f} MB"


def table(results: Json) -> str:
    rows: list[tuple[str, str, str]] = []
    c = results.get("cold_start")
    if c:
        f, p, r = c["flare_cold_remote"], c["python_c_pass"], c["runc_run_python_c_pass"]
        rows.append(("cold .remote() p50 / p90", f"{fmt_ms(f['p50_ms'])} / {fmt_ms(f['p90_ms'])}", ""))
        npl = c.get("flare_cold_remote_no_pool")
        if npl:
            rows.append(("cold .remote(), pool out of reach, p50 / p90",
                         f"{fmt_ms(npl['p50_ms'])} / {fmt_ms(npl['p90_ms'])}", ""))
        rows.append(("  python -c pass p50 / p90", f"{fmt_ms(p['p50_ms'])} / {fmt_ms(p['p90_ms'])}", ""))
        b = c["python_IS_c_pass"]
        rows.append(("  python -I -S -c pass p50 / p90", f"{fmt_ms(b['p50_ms'])} / {fmt_ms(b['p90_ms'])}", "(reference)"))
        if "p50_ms" in r:
            rows.append(("  runc run python -c pass p50 / p90", f"{fmt_ms(r['p50_ms'])} / {fmt_ms(r['p90_ms'])}", ""))
        else:
            rows.append(("  runc run python -c pass", "skipped", ""))
        rows.append(("  cold p50 / python p50", f"{c['ratio_p50_vs_python']:.2f}x", "<= 1.0x with the pool"))
        if "ratio_p50_no_pool_vs_python" in c:
            rows.append(("  cold (pool out of reach) p50 / python p50", f"{c['ratio_p50_no_pool_vs_python']:.2f}x",
                         "<= 1.25x"))
        im = c.get("prestarted_idle_memory") or {}
        if im.get("pss_kb_mean") is not None:
            rows.append((f"  idle pre-started runner Pss (mean of {im['runners']})", fmt_mb(im["pss_kb_mean"]), ""))
        if "ratio_p50_vs_runc" in c:
            rows.append(("  cold p50 / runc p50", f"{c['ratio_p50_vs_runc']:.2f}x", ""))
        for kind, ws in (c.get("worker_steps") or {}).items():
            for st in ws["steps"]:
                rows.append((f"  {kind} ({ws['n']}) step {st['step']} (p50 at / since previous)",
                             f"{fmt_ms(st['at_p50_ms'])} / {fmt_ms(st['delta_p50_ms'])}", ""))
    w = results.get("warm_remote")
    if w:
        rows.append((f"warm .remote() p50 / p99 ({w['calls']} calls)", f"{fmt_ms(w['p50_ms'])} / {fmt_ms(w['p99_ms'])}",
                     "p50 <= 1 ms, p99 <= 3 ms"))
    m = results.get("map")
    if m:
        rows.append((f".map {m['inputs']} inputs, 2nd (warm)", f"{m['second']['inputs_per_s']:,.0f} inputs/s", ">= 5,000/s"))
        rows.append((f".map {m['inputs']} inputs, 1st", f"{m['first']['inputs_per_s']:,.0f} inputs/s", ""))
    cw = results.get("concurrent_writes")
    if cw:
        sp, pi, pl = cw["spawn"], cw["probe_idle"], cw["probe_under_load"]
        rows.append((f"spawn p50 / p99 ({cw['clients']} clients, {cw['spawns']} spawns)",
                     f"{fmt_ms(sp['p50_ms'])} / {fmt_ms(sp['p99_ms'])}", f"{cw['spawns_per_s']:,.0f} spawns/s"))
        rows.append(("  GET stats p50 / p99, idle", f"{fmt_ms(pi['p50_ms'])} / {fmt_ms(pi['p99_ms'])}", ""))
        rows.append(("  GET stats p50 / p99, during the spawns", f"{fmt_ms(pl['p50_ms'])} / {fmt_ms(pl['p99_ms'])}", ""))
    mem = results.get("memory")
    if mem:
        idle = mem["flared_idle"]
        rows.append(("flared idle RSS / Pss", f"{fmt_mb(idle['rss_kb'])} / {fmt_mb(idle['pss_kb'])}", "<= 50 MB"))
        rows.append((f"per idle container: init Pss (mean of {mem['containers']})", fmt_mb(mem["init_pss_kb_mean"]), ""))
        rows.append(("per idle container: flared RSS growth", fmt_mb(mem["flared_rss_growth_kb_per_container"]), ""))
        rows.append(("per idle container: platform total", fmt_mb(mem["platform_kb_per_container"]), "<= 5 MB"))
        rows.append(("  (user python runner Pss, for reference)", fmt_mb(mem["runner_pss_kb_mean"]), ""))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines = [f"{'metric'.ljust(width)}  {'value'.ljust(vwidth)}  target", "-" * (width + vwidth + 26)]
    lines += [f"{a.ljust(width)}  {b.ljust(vwidth)}  {t}".rstrip() for a, b, t in rows]
    return "\n".join(lines)


def write_results(results: Json) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = results["started_at_utc"].replace(":", "").replace("-", "")
    path = os.path.join(RESULTS_DIR, f"{stamp}.json")
    text = json.dumps(results, indent=2) + "\n"
    for target in (path, os.path.join(RESULTS_DIR, "latest.json")):
        tmp = target + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, target)
    return path


# --------------------------------------------------------------------------- main


def find_flared() -> str:
    env_bin = os.environ.get("FLARE_BIN")
    candidates = [env_bin] if env_bin else []
    candidates.append(os.path.join(REPO, "target", "release", "flared"))
    which = shutil.which("flared")
    if which:
        candidates.append(which)
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise SystemExit("flared not found: build it with `cargo build --release -p flared` or set FLARE_BIN")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer iterations (smoke test, noisier numbers)")
    p.add_argument("--cold-runs", type=int, help="cold starts to time (default 30, --quick 20)")
    p.add_argument("--warm-calls", type=int, help="warm .remote() calls to time (default 1000, --quick 200)")
    p.add_argument("--map-inputs", type=int, help="inputs per .map run (default 10000, --quick 2000)")
    p.add_argument("--spawn-clients", type=int, default=8, help="client threads spawning calls at once (default 8)")
    p.add_argument("--spawns-per-client", type=int, help="spawns each client sends (default 250, --quick 100)")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install runc when it is missing")
    p.add_argument("--only", help="comma-separated subset of: memory,cold,warm,writes (default: all)")
    args = p.parse_args(argv)
    args.cold_runs = args.cold_runs or (20 if args.quick else 30)
    args.warm_calls = args.warm_calls or (200 if args.quick else 1000)
    args.map_inputs = args.map_inputs or (2000 if args.quick else 10000)
    args.spawns_per_client = args.spawns_per_client or (100 if args.quick else 250)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench.py must run as root: flared server creates containers")
    flared = find_flared()
    started = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    results: Json = {
        "started_at_utc": started.isoformat().replace("+00:00", "Z"),
        "quick": args.quick,
        "machine": machine_info(),
        "flared": flared,
    }
    m = results["machine"]
    print(f"machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, python {m['python']}, "
          f"load {m['loadavg_start'][0]:.2f}, commit {(m['git_commit'] or '?')[:12]}", flush=True)

    server = Server(flared)
    # The SDK reads these when it first talks to the server (bench_apps imports flare lazily).
    os.environ["FLARE_SERVER_URL"] = server.url
    os.environ["FLARE_HOME"] = server.home
    sys.path.insert(0, HERE)
    try:
        server.start()
        time.sleep(1.0)  # idle: let start-up work finish
        idle = memory_snapshot(server.pid)
        print(f"flared pid {server.pid} on {server.url}: idle RSS {fmt_mb(idle['rss_kb'])}", flush=True)

        only = set(args.only.split(",")) if args.only else {"memory", "cold", "warm", "writes"}
        if "memory" in only:
            print("memory: idle containers ...", flush=True)
            results["memory"] = bench_memory(server, idle)
        if "cold" in only:
            print(f"cold start: {args.cold_runs} runs ...", flush=True)
            results["cold_start"] = bench_cold_start(server, args.cold_runs, not args.no_install)
        if "warm" in only:
            print(f"warm .remote(): {args.warm_calls} calls; .map: 2 x {args.map_inputs} inputs ...", flush=True)
            results["warm_remote"], results["map"] = bench_warm_and_map(server, args.warm_calls, args.map_inputs)
        if "writes" in only:
            print(f"concurrent writes: {args.spawn_clients} clients x {args.spawns_per_client} spawns ...",
                  flush=True)
            results["concurrent_writes"] = bench_concurrent_writes(server, args.spawn_clients,
                                                                   args.spawns_per_client, probes=200)
        results["flared_after_all"] = memory_snapshot(server.pid)
    except BaseException:
        print("flared log tail:\n" + server.log_tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["finished_at_utc"] = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")

    print()
    print(table(results))
    path = write_results(results)
    print(f"\nwrote {os.path.relpath(path, REPO)} and bench/results/latest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

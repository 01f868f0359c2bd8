#!/usr/bin/env python3
"""Memory snapshot benchmarks (issue 11): heavy cold starts with and without a snapshot,
a 1 GiB snapshot (restore time, dump time, stored and shared bytes), and the idle memory
of restored vs cold-started containers.

    sudo python3 bench/snapshots.py [--runs 10] [--state-runs 10] [--state-mib 1024] [--lazy]

Starts its own ``flared server`` (temporary FLARE_HOME, so the pip image is built once
from scratch: minutes), prints a table and writes ``bench/results/snapshots-<UTC>.json``
and ``bench/results/snapshots.json``. See bench/README.md ("Memory snapshots").

- Heavy start (``bench_snapshot_apps.py``, one ``app.run()`` for the whole part, so the
  snapshot key stays the same): ``HeavySnap``/``HeavyCold`` on debian_slim + numpy, pandas,
  scikit-learn, and ``HostSnap``/``HostCold`` on the host Python, each pair identical but
  for ``enable_memory_snapshot``. One untimed call each first (the snapshot classes'
  first container runs the hooks and is checkpointed then). Then rounds: per class, wait
  until ``GET /v1/containers`` has none of that class (``scaledown_window=2``), 50 ms
  more, and time ``.remote()`` to its result. After each timed call, while the container
  idles, read its memory (cgroup and the Pss of its processes).
- State size (``snapshot_state_app.py``, deployed with ``flare deploy`` and called through
  ``flare.Cls.from_name``): ``@enter(snap=True)`` fills 1 GiB; the first call (fill and
  dump), the ``memory snapshot saved`` log line, ``du -sb`` of the snapshot store, then
  timed cold starts (restores); then a redeploy with one line of the method body changed,
  its first call and its log line (bytes shared with the previous snapshot), and a few
  restores of the new version.

Restores are eager unless ``--lazy``: the worker restores snapshots of 64 MiB and more with
CRIU lazy pages only where ``/proc/sys/vm/unprivileged_userfaultfd`` is 1 when flared starts
(docs/SNAPSHOTS.md), a host-wide setting that Flare never changes. ``--lazy`` sets it to 1
for the lifetime of the bench's own flared server only, and writes the previous value back
when the server has stopped (in a ``finally``, on SIGINT/SIGTERM, and at exit), printing
both steps. flared's ``criu restore done ... lazy=...`` log lines are counted into the
result (``flared_restores``) so a run shows which kind of restore it measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "python"))

import bench  # noqa: E402  (Server, helpers)

Json = dict[str, Any]

SAVED_RE = re.compile(r"memory snapshot saved \(([\d.]+) MiB, dump (\d+) ms, ([\d.]+) MiB shared with the previous one\)")
RESTORED_RE = re.compile(r"container restored from a memory snapshot in (\d+) ms")
CRIU_RESTORE_RE = re.compile(r"criu restore done.*?lazy=(true|false)")
UFFD_SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"
FAILED_RE = re.compile(r"flare: (restoring the memory snapshot failed.*|memory snapshot failed.*|no memory snapshot.*|the stored memory snapshot was discarded.*)")


# --------------------------------------------------------------------------- helpers


class UffdSysctl:
    """Sets vm.unprivileged_userfaultfd to 1 until restore(); restore() writes the previous
    value back (idempotent). Used only by --lazy, around the bench's own flared server."""

    def __init__(self) -> None:
        self.previous: str | None = None

    @staticmethod
    def read() -> str:
        with open(UFFD_SYSCTL) as fh:
            return fh.read().strip()

    def enable(self) -> None:
        self.previous = self.read()
        with open(UFFD_SYSCTL, "w") as fh:
            fh.write("1\n")
        print(f"--lazy: set {UFFD_SYSCTL} to 1 (was {self.previous}) for this bench's flared server only; "
              "it is written back when the server stops", flush=True)

    def restore(self) -> None:
        if self.previous is None:
            return
        prev, self.previous = self.previous, None
        with open(UFFD_SYSCTL, "w") as fh:
            fh.write(prev + "\n")
        print(f"--lazy: wrote {UFFD_SYSCTL} back to {prev} (now {self.read()})", flush=True)


def flared_restores(log_path: str) -> Json:
    """flared's `criu restore done` lines: how many were lazy and how many eager."""
    try:
        with open(log_path, errors="replace") as fh:
            text = fh.read()
    except OSError:
        return {"lazy": 0, "eager": 0}
    kinds = CRIU_RESTORE_RE.findall(re.sub(r"\x1b\[[0-9;]*m", "", text))
    return {"lazy": kinds.count("true"), "eager": kinds.count("false")}



def du_bytes(path: str) -> int:
    if not os.path.exists(path):
        return 0
    out = subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def app_logs(server: bench.Server, app_id: str) -> list[Json]:
    """Every stored log record of the app (system lines included)."""
    records: list[Json] = []
    after: int | None = None
    while True:
        q = "wait_ms=0&limit=1000" + ("" if after is None else f"&after={after}")
        page = server.get(f"/v1/apps/{app_id}/logs?{q}")
        logs = page.get("logs") or []
        records += logs
        if not logs:
            return records
        after = page.get("next", after)


def snapshot_lines(records: list[Json]) -> Json:
    """The snapshot lines of an app's logs, parsed, in order."""
    saved, restored, failed = [], [], []
    for r in records:
        data = r.get("data", "")
        for m in SAVED_RE.finditer(data):
            saved.append({"function": r.get("function"), "container_id": r.get("container_id"),
                          "mib": float(m.group(1)), "dump_ms": int(m.group(2)), "shared_mib": float(m.group(3)),
                          "line": m.group(0)})
        for m in RESTORED_RE.finditer(data):
            restored.append({"function": r.get("function"), "container_id": r.get("container_id"),
                             "ms": int(m.group(1))})
        for m in FAILED_RE.finditer(data):
            failed.append({"function": r.get("function"), "container_id": r.get("container_id"),
                           "line": m.group(1).strip()})
    return {"saved": saved, "restored": restored, "failed": failed}


def memory_cgroup_dirs() -> list[str]:
    roots = ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
    return [r for r in roots if os.path.isdir(r)]


def find_cgroup(container_id: str) -> str | None:
    """The memory cgroup directory of a container (cgroup v1 memory or v2), by its id."""
    for root in memory_cgroup_dirs():
        for dirpath, dirnames, _ in os.walk(root):
            depth = dirpath[len(root):].count("/")
            if depth > 3:
                dirnames[:] = []
                continue
            for d in dirnames:
                if container_id in d:
                    p = os.path.join(dirpath, d)
                    if os.path.exists(os.path.join(p, "memory.usage_in_bytes")) or \
                            os.path.exists(os.path.join(p, "memory.current")):
                        return p
    return None


def read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def read_stat(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(path) as fh:
            for line in fh:
                k, _, v = line.partition(" ")
                if v.strip().isdigit():
                    out[k] = int(v)
    except OSError:
        pass
    return out


def container_memory(container_id: str) -> Json | None:
    """cgroup usage, anon/file from memory.stat, and the summed Rss/Pss of its processes."""
    cg = find_cgroup(container_id)
    if cg is None:
        return None
    usage = read_int(os.path.join(cg, "memory.usage_in_bytes"))
    if usage is None:
        usage = read_int(os.path.join(cg, "memory.current"))
    stat = read_stat(os.path.join(cg, "memory.stat"))
    pids: list[int] = []
    try:
        with open(os.path.join(cg, "cgroup.procs")) as fh:
            pids = [int(x) for x in fh.read().split()]
    except OSError:
        pass
    pss = sum(bench.pss_kb(p) or 0 for p in pids)
    rss = sum(bench.rss_kb(p) or 0 for p in pids)
    return {
        "cgroup": cg,
        "usage_bytes": usage,
        "anon_bytes": stat.get("total_rss", stat.get("rss", stat.get("anon"))),
        "file_bytes": stat.get("total_cache", stat.get("cache", stat.get("file"))),
        "procs": len(pids),
        "pss_kb": pss,
        "rss_kb": rss,
    }


def mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 1048576:.1f} MiB"


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.1f} ms" if v < 1000 else f"{v / 1000:.2f} s")


def median(xs: list[float]) -> float | None:
    return bench.percentile(xs, 50) if xs else None


# --------------------------------------------------------------------------- heavy start


def wait_no_containers(server: bench.Server, pred: Callable[[Json], bool], what: str, timeout: float = 60) -> None:
    if not bench.wait_until(lambda: not any(pred(c) for c in server.containers()), timeout, interval=0.02):
        raise RuntimeError(f"{what}: containers did not scale down within {timeout:.0f} s")
    time.sleep(0.05)


def bench_heavy(server: bench.Server, runs: int, parts: list[str]) -> Json:
    import bench_snapshot_apps as apps

    classes = {
        "heavy_snap": apps.HeavySnap, "heavy_cold": apps.HeavyCold,
        "host_snap": apps.HostSnap, "host_cold": apps.HostCold,
    }
    classes = {k: v for k, v in classes.items() if k.split("_")[0] in parts}
    fn_name = {"heavy_snap": "HeavySnap", "heavy_cold": "HeavyCold", "host_snap": "HostSnap", "host_cold": "HostCold"}
    out: Json = {"runs": runs}
    samples: dict[str, list[float]] = {k: [] for k in classes}
    results: dict[str, list[Json]] = {k: [] for k in classes}
    mem: dict[str, list[Json]] = {k: [] for k in classes}
    runs_ctx = []
    for pair, app in (("heavy", apps.heavy_app), ("host", apps.host_app)):
        if pair in parts:
            t0 = time.perf_counter()
            ctx = app.run(show_output=False)
            ctx.__enter__()
            runs_ctx.append(ctx)
            out[f"{pair}_publish_s"] = round(time.perf_counter() - t0, 2)  # includes the image build
            print(f"  {pair} app published in {out[f'{pair}_publish_s']:.1f} s (image build included)", flush=True)
    app_ids = {k: (apps.heavy_app if k.startswith("heavy") else apps.host_app).app_id for k in classes}
    try:
        objs = {k: c() for k, c in classes.items()}
        first: Json = {}
        for k, o in objs.items():
            t0 = time.perf_counter()
            r = o.predict.remote(0)
            first[k] = {"s": round(time.perf_counter() - t0, 3), "result": r}
            print(f"  first call {k}: {first[k]['s']:.2f} s (init {r['init_s']:.2f} s, imports {r['import_s']:.2f} s)",
                  flush=True)
        out["first_call"] = first

        def ours(k: str) -> Callable[[Json], bool]:
            return lambda c: c["app_id"] == app_ids[k] and c["function"] == fn_name[k]

        for i in range(1, runs + 1):
            for k, o in objs.items():
                wait_no_containers(server, ours(k), k)
                t0 = time.perf_counter()
                r = o.predict.remote(i)
                samples[k].append(time.perf_counter() - t0)
                results[k].append(r)
                # The container idles for scaledown_window=2 s: read its memory now.
                time.sleep(0.5)
                cs = [c for c in server.containers() if ours(k)(c)]
                if cs:
                    m = container_memory(cs[0]["container_id"])
                    if m is not None:
                        mem[k].append(m)
            print(f"  round {i}/{runs}: " + ", ".join(f"{k} {samples[k][-1] * 1000:.0f} ms" for k in objs), flush=True)
        records: list[Json] = []
        for aid in sorted(set(app_ids.values())):
            records += app_logs(server, aid)
        logs = snapshot_lines(records)
    finally:
        for ctx in reversed(runs_ctx):
            ctx.__exit__(None, None, None)

    for k in classes:
        restored = sum(1 for r in results[k] if r.get("snapshot") == "restored")
        entry: Json = {
            "cold_start": bench.summary_ms(samples[k]),
            "samples_ms": [round(s * 1000, 2) for s in samples[k]],
            "restored_containers": restored,
            "init_s_in_first_container": round(first[k]["result"]["init_s"], 3),
            "import_s_in_first_container": round(first[k]["result"]["import_s"], 3),
        }
        if mem[k]:
            entry["idle_memory"] = {
                "samples": len(mem[k]),
                "cgroup_usage_bytes_p50": median([m["usage_bytes"] for m in mem[k] if m["usage_bytes"] is not None]),
                "anon_bytes_p50": median([m["anon_bytes"] for m in mem[k] if m["anon_bytes"] is not None]),
                "file_bytes_p50": median([m["file_bytes"] for m in mem[k] if m["file_bytes"] is not None]),
                "pss_kb_p50": median([m["pss_kb"] for m in mem[k]]),
                "rss_kb_p50": median([m["rss_kb"] for m in mem[k]]),
                "procs": mem[k][0]["procs"],
                "cgroup_example": mem[k][0]["cgroup"],
            }
        fname = fn_name[k]
        entry["log_restored_ms"] = [x["ms"] for x in logs["restored"] if x["function"] == fname]
        entry["log_saved"] = [x for x in logs["saved"] if x["function"] == fname]
        entry["log_failed"] = [x for x in logs["failed"] if x["function"] == fname]
        out[k] = entry
    for pair in ("heavy", "host"):
        s, c = out.get(f"{pair}_snap"), out.get(f"{pair}_cold")
        if s and c:
            out[f"{pair}_speedup_p50"] = round(c["cold_start"]["p50_ms"] / s["cold_start"]["p50_ms"], 2)
            out[f"{pair}_speedup_p90"] = round(c["cold_start"]["p90_ms"] / s["cold_start"]["p90_ms"], 2)
    if logs["failed"]:
        out["failures"] = logs["failed"]
    return out


# --------------------------------------------------------------------------- state size


def deploy_state(workdir: str, state_mib: int, variant: int) -> str:
    """Write the state app with this variant into workdir and `flare deploy` it; its app id."""
    with open(os.path.join(HERE, "snapshot_state_app.py")) as fh:
        src = fh.read()
    src = re.sub(r'^STATE_MIB = .*$', f"STATE_MIB = {state_mib}", src, count=1, flags=re.M)
    src, n = re.subn(r"variant = \d+  # VARIANT", f"variant = {variant}  # VARIANT", src)
    assert n == 1, "the VARIANT line is missing from snapshot_state_app.py"
    path = os.path.join(workdir, "snap_state_app.py")
    with open(path, "w") as fh:
        fh.write(src)
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "python"))
    proc = subprocess.run([sys.executable, "-m", "flare.cli", "deploy", path], env=env, cwd=workdir,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"flare deploy failed ({proc.returncode}): {proc.stdout[-1000:]} {proc.stderr[-2000:]}")
    m = re.search(r"\((ap-[^)]+)\)", proc.stdout)
    if not m:
        raise RuntimeError(f"no app id in the deploy output: {proc.stdout[-500:]}")
    return m.group(1)


def bench_state(server: bench.Server, runs: int, state_mib: int, v2_runs: int, lazy: bool) -> Json:
    import flare

    snaps = os.path.join(server.home, "snapshots")
    workdir = tempfile.mkdtemp(prefix="flare-bench-snapstate-")
    out: Json = {"state_mib": state_mib, "runs": runs, "restore": "lazy" if lazy else "eager"}
    try:
        app_id = deploy_state(workdir, state_mib, 1)
        out["app_id"] = app_id

        def ours(c: Json) -> bool:
            return c["app_id"] == app_id

        def store_sizes() -> Json:
            return {"blobs_bytes": du_bytes(os.path.join(snaps, "blobs")),
                    "cache_bytes": du_bytes(os.path.join(snaps, "cache")),
                    "all_bytes": du_bytes(snaps)}

        before = store_sizes()
        State = flare.Cls.from_name("bench-snap-state", "State")
        obj = State()
        t0 = time.perf_counter()
        r = obj.probe.remote(0)
        out["v1_first_call_s"] = round(time.perf_counter() - t0, 3)
        out["v1_fill_s"] = round(r["fill_s"], 3)
        assert r["bytes"] == state_mib << 20 and r["variant"] == 1, r
        logs = snapshot_lines(app_logs(server, app_id))
        out["v1_saved"] = logs["saved"]
        out["store_after_v1"] = store_sizes()
        out["store_before"] = before
        print(f"  v1 first call {out['v1_first_call_s']:.2f} s (fill {r['fill_s']:.2f} s); "
              f"{logs['saved'][0]['line'] if logs['saved'] else 'NO SNAPSHOT SAVED: ' + str(logs['failed'])}", flush=True)

        samples: list[float] = []
        restored = 0
        mem: list[Json] = []
        for i in range(1, runs + 1):
            wait_no_containers(server, ours, "state")
            t0 = time.perf_counter()
            r = obj.probe.remote(i)
            samples.append(time.perf_counter() - t0)
            restored += r["snapshot"] == "restored"
            time.sleep(0.5)
            cs = [c for c in server.containers() if ours(c)]
            if cs and i <= 3:
                m = container_memory(cs[0]["container_id"])
                if m:
                    mem.append(m)
            print(f"  state restore {i}/{runs}: {samples[-1] * 1000:.0f} ms ({r['snapshot'] or 'cold'})", flush=True)
        logs = snapshot_lines(app_logs(server, app_id))
        out["v1_cold_start"] = bench.summary_ms(samples)
        out["v1_samples_ms"] = [round(s * 1000, 2) for s in samples]
        out["v1_restored_containers"] = restored
        out["v1_log_restored_ms"] = [x["ms"] for x in logs["restored"]]
        out["restored_idle_memory"] = mem

        # One-line code change: redeploy, first call makes the new version's snapshot.
        wait_no_containers(server, ours, "state")
        app_id2 = deploy_state(workdir, state_mib, 2)
        assert app_id2 == app_id, (app_id, app_id2)
        State = flare.Cls.from_name("bench-snap-state", "State")
        obj = State()
        t0 = time.perf_counter()
        r = obj.probe.remote(0)
        out["v2_first_call_s"] = round(time.perf_counter() - t0, 3)
        assert r["variant"] == 2, r
        logs = snapshot_lines(app_logs(server, app_id))
        out["v2_saved"] = logs["saved"][1:]
        out["store_after_v2"] = store_sizes()
        print(f"  v2 first call {out['v2_first_call_s']:.2f} s; "
              f"{logs['saved'][-1]['line'] if len(logs['saved']) > 1 else 'NO SECOND SNAPSHOT: ' + str(logs['failed'])}",
              flush=True)
        samples2: list[float] = []
        restored2 = 0
        for i in range(1, v2_runs + 1):
            wait_no_containers(server, ours, "state")
            t0 = time.perf_counter()
            r = obj.probe.remote(i)
            samples2.append(time.perf_counter() - t0)
            restored2 += r["snapshot"] == "restored"
        if samples2:
            out["v2_cold_start"] = bench.summary_ms(samples2)
            out["v2_restored_containers"] = restored2
        logs = snapshot_lines(app_logs(server, app_id))
        out["log_restored_ms"] = [x["ms"] for x in logs["restored"]]
        if logs["failed"]:
            out["failures"] = logs["failed"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- report


def table(res: Json) -> str:
    rows: list[tuple[str, str]] = []
    fr = res.get("flared_restores")
    if fr is not None:
        rows.append(("mode / flared's criu restores (lazy, eager)",
                     f"{'lazy' if res['args']['lazy'] else 'eager'} / {fr['lazy']} lazy=true, {fr['eager']} lazy=false"))
    h = res.get("heavy")
    if h:
        for pair, label in (("heavy", "pip image (numpy, pandas, sklearn)"), ("host", "host Python (stdlib + site-packages)")):
            s, c = h.get(f"{pair}_snap"), h.get(f"{pair}_cold")
            if not (s and c):
                continue
            rows.append((f"{label}: init in the first container (imports)",
                         f"{c['init_s_in_first_container']:.2f} s ({c['import_s_in_first_container']:.2f} s)"))
            rows.append((f"{label}: cold start p50 / p90, no snapshot",
                         f"{fmt_ms(c['cold_start']['p50_ms'])} / {fmt_ms(c['cold_start']['p90_ms'])}"))
            rows.append((f"{label}: cold start p50 / p90, snapshot enabled",
                         f"{fmt_ms(s['cold_start']['p50_ms'])} / {fmt_ms(s['cold_start']['p90_ms'])}"
                         f" ({s['restored_containers']}/{s['cold_start']['n']} restored)"))
            if s["log_restored_ms"]:
                rows.append((f"{label}: restore (worker log) p50", fmt_ms(median([float(x) for x in s["log_restored_ms"]]))))
            rows.append((f"{label}: speedup p50 / p90",
                         f"{h[f'{pair}_speedup_p50']:.1f}x / {h[f'{pair}_speedup_p90']:.1f}x"))
            if s["log_saved"]:
                sv = s["log_saved"][0]
                rows.append((f"{label}: snapshot size / dump", f"{sv['mib']:.1f} MiB / {sv['dump_ms']} ms"))
            snap_name = "restored" if s["restored_containers"] == s["cold_start"]["n"] else \
                f"snapshot class ({s['restored_containers']}/{s['cold_start']['n']} restored)"
            for name, e in (("cold", c), (snap_name, s)):
                m = e.get("idle_memory")
                if m:
                    rows.append((f"{label}: idle memory, {name}: Pss / cgroup (anon + file)",
                                 f"{m['pss_kb_p50'] / 1024:.1f} MiB / {mib(m['cgroup_usage_bytes_p50'])} "
                                 f"({mib(m['anon_bytes_p50'])} + {mib(m['file_bytes_p50'])})"))
    st = res.get("state")
    if st:
        gib = f"{st['state_mib']} MiB state"
        rows.append((f"{gib}: first call (fill {st['v1_fill_s']:.2f} s + dump + save)", f"{st['v1_first_call_s']:.2f} s"))
        if st.get("v1_saved"):
            sv = st["v1_saved"][0]
            rows.append((f"{gib}: snapshot (log line)", f"{sv['mib']:.1f} MiB, dump {sv['dump_ms']} ms"))
        rows.append((f"{gib}: store growth (blobs) / materialized cache",
                     f"{mib(st['store_after_v1']['blobs_bytes'] - st['store_before']['blobs_bytes'])} / "
                     f"{mib(st['store_after_v1']['cache_bytes'] - st['store_before']['cache_bytes'])}"))
        cs = st["v1_cold_start"]
        rows.append((f"{gib}: restore to first result p50 / p90 ({st['restore']})",
                     f"{fmt_ms(cs['p50_ms'])} / {fmt_ms(cs['p90_ms'])} ({st['v1_restored_containers']}/{cs['n']} restored)"))
        if st["v1_log_restored_ms"]:
            rows.append((f"{gib}: restore (worker log) p50", fmt_ms(median([float(x) for x in st["v1_log_restored_ms"]]))))
        if st.get("v2_saved"):
            sv = st["v2_saved"][0]
            rows.append((f"{gib}: after a one-line change: snapshot / shared",
                         f"{sv['mib']:.1f} MiB, dump {sv['dump_ms']} ms, {sv['shared_mib']:.1f} MiB shared"))
            rows.append((f"{gib}: store growth for the new version (blobs)",
                         mib(st["store_after_v2"]["blobs_bytes"] - st["store_after_v1"]["blobs_bytes"])))
        if st.get("v2_cold_start"):
            rows.append((f"{gib}: new version restore p50", fmt_ms(st["v2_cold_start"]["p50_ms"])))
        if st.get("restored_idle_memory"):
            m = st["restored_idle_memory"][0]
            rows.append((f"{gib}: idle restored container Pss / cgroup", f"{m['pss_kb'] / 1024:.1f} MiB / {mib(m['usage_bytes'])}"))
    width = max((len(r[0]) for r in rows), default=10)
    lines = [f"{a.ljust(width)}  {b}" for a, b in rows]
    for part in ("heavy", "state"):
        fails = (res.get(part) or {}).get("failures") or []
        seen: set[str] = set()
        for f in fails:
            key = re.sub(r"mount=\d+|\(\d+\.\d+\)|pid: \d+|/[^ ]*flare-bench-[^ /]*", "#", f["line"])[:160]
            if key not in seen:
                seen.add(key)
                lines.append(f"FAILED ({f['function']}, {sum(1 for g in fails if g['function'] == f['function'])} lines): {f['line']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10, help="timed cold starts per heavy class (default 10)")
    p.add_argument("--state-runs", type=int, default=10, help="timed restores of the state snapshot (default 10)")
    p.add_argument("--state-mib", type=int, default=1024, help="state filled by the snap=True hook (default 1024)")
    p.add_argument("--v2-runs", type=int, default=3, help="restores of the changed version (default 3)")
    p.add_argument("--parts", default="heavy,host,state", help="comma list of heavy, host, state")
    p.add_argument("--lazy", action="store_true",
                   help=f"set {UFFD_SYSCTL} to 1 while the bench's flared runs (lazy restores), then back")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("snapshots.py must run as root: flared server creates containers")
    parts = args.parts.split(",")
    flared = bench.find_flared()
    started = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    res: Json = {"started_at_utc": started.isoformat().replace("+00:00", "Z"),
                 "machine": bench.machine_info(), "flared": flared, "args": vars(args)}
    criu = bench.cmd_output(["criu", "--version"])
    res["criu"] = criu.splitlines()[0] if criu else None
    m = res["machine"]
    print(f"machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, python {m['python']}, "
          f"load {m['loadavg_start'][0]:.2f}, commit {(m['git_commit'] or '?')[:12]}, {res['criu']}", flush=True)
    server = bench.Server(flared)
    os.environ["FLARE_SERVER_URL"] = server.url
    os.environ["FLARE_HOME"] = server.home
    uffd = UffdSysctl()
    res["uffd_sysctl_before"] = UffdSysctl.read()

    def on_signal(signum: int, _frame: Any) -> None:
        # Stop the server and put the sysctl back now, then unwind as an interrupt.
        server.stop()
        uffd.restore()
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    import atexit
    atexit.register(uffd.restore)
    try:
        if args.lazy:
            uffd.enable()
        server.start()
        if "heavy" in parts or "host" in parts:
            print(f"heavy start: {args.runs} cold starts per class ...", flush=True)
            res["heavy"] = bench_heavy(server, args.runs, parts)
        if "state" in parts:
            print(f"state: {args.state_mib} MiB, {args.state_runs} restores ...", flush=True)
            res["state"] = bench_state(server, args.state_runs, args.state_mib, args.v2_runs, args.lazy)
    except BaseException:
        print("flared log tail:\n" + server.log_tail(60), file=sys.stderr)
        raise
    finally:
        res["flared_restores"] = flared_restores(server.log_path)
        try:
            server.stop()
        finally:
            uffd.restore()
    res["uffd_sysctl_after"] = UffdSysctl.read()
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["finished_at_utc"] = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    print()
    print(table(res))
    os.makedirs(bench.RESULTS_DIR, exist_ok=True)
    stamp = res["started_at_utc"].replace(":", "").replace("-", "")
    text = json.dumps(res, indent=2) + "\n"
    for target in (os.path.join(bench.RESULTS_DIR, f"snapshots-{stamp}.json"),
                   os.path.join(bench.RESULTS_DIR, "snapshots.json")):
        with open(target + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(target + ".tmp", target)
    print(f"\nwrote bench/results/snapshots-{stamp}.json and bench/results/snapshots.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

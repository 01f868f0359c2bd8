#!/usr/bin/env python3
"""Image benchmarks: start overhead of image roots, unchanged rebuilds, shared storage.

    sudo python3 bench/images.py [--runs 30] [--rebuilds 20]

Starts a private ``flared server`` (temporary FLARE_HOME), prints a table and writes
``bench/results/images.json``. The lazy-start and sequential-read numbers of the image
file system are taken by the flare-imagefs bench (see bench/README.md).

- Cold start, interleaved so that all three share the machine's noise: the same trivial
  function on (a) the host-environment root (FLARE_LOCAL_PYTHON=bind), (b) the captured
  local environment (the default), (c) a cached ``debian_slim`` image. Each timed call
  starts from zero containers (scaledown_window=0). The image mounts stay up between
  starts on a worker, so this is a start from a *cached* image.
- Unchanged rebuild: the README example's image spec submitted again (all layers cached),
  and the captured environment re-checked (the SDK's fingerprint, then the short form),
  from the client's point of view.
- Shared storage: two images that share Debian and pip packages: the bytes each tree
  holds, the bytes they share, and how much the store grew for the second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "python"))

import bench  # noqa: E402  (Server, helpers)

Json = dict[str, Any]


def du_bytes(path: str) -> int:
    out = subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def bench_cold(server: bench.Server, runs: int) -> Json:
    import bench_image_apps as apps

    samples: dict[str, list[float]] = {"host": [], "captured": [], "debian": []}
    prev = os.environ.get("FLARE_LOCAL_PYTHON")
    os.environ["FLARE_LOCAL_PYTHON"] = "bind"
    host_run = apps.host_app.run(show_output=False)
    host_run.__enter__()
    if prev is None:
        os.environ.pop("FLARE_LOCAL_PYTHON")
    else:
        os.environ["FLARE_LOCAL_PYTHON"] = prev
    t0 = time.perf_counter()
    cap_run = apps.captured_app.run(show_output=False)
    cap_run.__enter__()
    capture_publish_s = time.perf_counter() - t0
    deb_run = apps.debian_app.run(show_output=True)
    deb_run.__enter__()
    try:
        fns = {"host": apps.on_host, "captured": apps.on_captured, "debian": apps.on_debian}
        ids = {"host": apps.host_app.app_id, "captured": apps.captured_app.app_id, "debian": apps.debian_app.app_id}
        for fn in fns.values():
            fn.remote(0)  # untimed: first mount, page cache
        for i in range(runs):
            for name, fn in fns.items():
                app_id = ids[name]
                if not bench.wait_until(lambda: not any(c["app_id"] == app_id for c in server.containers()), 30):
                    raise RuntimeError(f"{name}: container did not scale down")
                time.sleep(0.05)
                t0 = time.perf_counter()
                assert fn.remote(i) == i
                samples[name].append(time.perf_counter() - t0)
    finally:
        for r in (deb_run, cap_run, host_run):
            r.__exit__(None, None, None)
    out: Json = {"runs": runs, "capture_publish_s": round(capture_publish_s, 3)}
    for k, v in samples.items():
        out[k] = bench.summary_ms(v)
    out["captured_minus_host_p50_ms"] = round(out["captured"]["p50_ms"] - out["host"]["p50_ms"], 2)
    out["debian_minus_host_p50_ms"] = round(out["debian"]["p50_ms"] - out["host"]["p50_ms"], 2)
    return out


README_IMAGE = """
import flare
image = (
    flare.Image.debian_slim()
    .apt_install("curl")
    .pip_install("requests==2.32.3")
    .env({"MODE": "prod"})
)
"""


def bench_rebuild(server: bench.Server, rebuilds: int) -> Json:
    from flare._transport import get_client
    from flare.image import build_images

    ns: Json = {}
    exec(README_IMAGE, ns)  # noqa: S102 - our own constant
    image = ns["image"]
    client = get_client(server.url)
    t0 = time.perf_counter()
    build_images(client, [image], True)
    first = time.perf_counter() - t0
    times = []
    for _ in range(rebuilds):
        t0 = time.perf_counter()
        build_images(client, [image], False)
        times.append(time.perf_counter() - t0)
    out: Json = {"first_build_s": round(first, 2), "unchanged": bench.summary_ms(times)}
    try:
        from flare._localenv import capture_image_id  # type: ignore[attr-defined]
    except ImportError:
        return out
    capture_image_id(client, None, False)
    env_times = []
    for _ in range(rebuilds):
        t0 = time.perf_counter()
        capture_image_id(client, None, False)
        env_times.append(time.perf_counter() - t0)
    out["captured_env_unchanged"] = bench.summary_ms(env_times)
    return out


def bench_shared(server: bench.Server) -> Json:
    import flare
    from flare._transport import get_client
    from flare.image import build_images

    client = get_client(server.url)
    cas = os.path.join(server.home, "cas")
    a = flare.Image.debian_slim().pip_install("requests==2.32.3")
    b = flare.Image.debian_slim().pip_install("requests==2.32.3", "six==1.16.0")
    ida = build_images(client, [a], False)[id(a)]
    before = du_bytes(cas)
    idb = build_images(client, [b], False)[id(b)]
    after = du_bytes(cas)
    ia = server.get(f"/v1/images/{ida}")
    ib = server.get(f"/v1/images/{idb}")
    shared = next((s["bytes"] for s in ib["shared"] if s["image_id"] == ida), 0)
    return {
        "image_a": {"id": ida, "total_bytes": ia["total_bytes"]},
        "image_b": {"id": idb, "total_bytes": ib["total_bytes"]},
        "shared_bytes": shared,
        "store_growth_for_b_bytes": after - before,
    }


def fmt_mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def table(r: Json) -> str:
    rows: list[tuple[str, str, str]] = []
    c = r.get("cold")
    if c:
        for k, label in [("host", "host-environment root"), ("captured", "captured local environment"), ("debian", "cached debian_slim image")]:
            rows.append((f"cold .remote() p50 / p90, {label}", f"{c[k]['p50_ms']:.1f} / {c[k]['p90_ms']:.1f} ms", ""))
        rows.append(("  captured env - host root, p50", f"{c['captured_minus_host_p50_ms']:+.1f} ms", "<= 5 ms"))
        rows.append(("  debian image - host root, p50", f"{c['debian_minus_host_p50_ms']:+.1f} ms", "<= 5 ms"))
        rows.append(("  publish with env capture (first)", f"{c['capture_publish_s']:.2f} s", ""))
    b = r.get("rebuild")
    if b:
        rows.append(("README image, first build", f"{b['first_build_s']:.1f} s", ""))
        u = b["unchanged"]
        rows.append(("README image, unchanged rebuild p50 / p90", f"{u['p50_ms']:.1f} / {u['p90_ms']:.1f} ms", "<= 200 ms"))
        if "captured_env_unchanged" in b:
            e = b["captured_env_unchanged"]
            rows.append(("captured env, unchanged re-check p50 / p90", f"{e['p50_ms']:.1f} / {e['p90_ms']:.1f} ms", ""))
    s = r.get("shared")
    if s:
        rows.append(("image A (debian + requests) tree", fmt_mib(s["image_a"]["total_bytes"]), ""))
        rows.append(("image B (debian + requests + six) tree", fmt_mib(s["image_b"]["total_bytes"]), ""))
        rows.append(("  bytes B shares with A", fmt_mib(s["shared_bytes"]), ""))
        rows.append(("  store growth for B", fmt_mib(s["store_growth_for_b_bytes"]), "shared stored once"))
    w = max(len(x[0]) for x in rows)
    v = max(len(x[1]) for x in rows)
    lines = [f"{'metric'.ljust(w)}  {'value'.ljust(v)}  target", "-" * (w + v + 20)]
    lines += [f"{a.ljust(w)}  {b2.ljust(v)}  {t}".rstrip() for a, b2, t in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rebuilds", type=int, default=20)
    ap.add_argument("--flared", default=os.path.join(REPO, "target", "release", "flared"))
    args = ap.parse_args()
    server = bench.Server(args.flared)
    server.start()
    os.environ["FLARE_SERVER_URL"] = server.url
    os.environ["FLARE_HOME"] = server.home
    results: Json = {"started_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": bench.machine_info()}
    try:
        results["rebuild"] = bench_rebuild(server, args.rebuilds)
        results["shared"] = bench_shared(server)
        results["cold"] = bench_cold(server, args.runs)
    finally:
        server.stop()
    print(table(results))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "images.json"), "w") as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

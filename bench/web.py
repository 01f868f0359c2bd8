"""Web endpoints: Flare's ingress against the same FastAPI app under uvicorn on the host.

    sudo python bench/web.py              # ~2 minutes
    sudo python bench/web.py --quick      # shorter runs

Starts its own `flared server` (bench.Server), serves `bench/web_apps.py` (an ephemeral
app, so the URLs end in `-dev`), starts `uvicorn` on the host with the same app, and
measures, interleaved round by round so both see the same machine noise:

1. warm request latency (p50/p99) and requests/s of `GET /` with `wrk` (apt; installed
   if missing unless --no-install) at 1 and 64 connections, 3 rounds of `--seconds` each
   (medians of the rounds reported);
2. cold request: time to the whole answer of a scaled-to-zero `fastapi_endpoint`
   (`scaledown_window=0`, waited until it has no container) vs a cold `.remote()` of a
   plain function, same loop;
3. streaming time to first byte of a `StreamingResponse` (warm), both servers;
4. WebSocket echo round trip (warm, `websockets` client), both servers.

Prints a table, writes bench/results/web-<UTC>.json and bench/results/web.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import re
import shutil
import socket
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


def find_or_install_wrk(allow_install: bool) -> str | None:
    w = shutil.which("wrk")
    if w or not allow_install or os.geteuid() != 0:
        return w
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("wrk")


def _ms(v: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    assert m, v
    x = float(m.group(1))
    return {"us": x / 1000, "ms": x, "s": x * 1000}[m.group(2)]


def run_wrk(wrk: str, url: str, host: str, conns: int, seconds: float) -> Json:
    out = subprocess.run(
        [wrk, f"-t{min(conns, 2)}", f"-c{conns}", f"-d{max(1, int(seconds))}s", "--latency", "-H", f"Host: {host}", url],
        capture_output=True, text=True, timeout=seconds + 60,
    ).stdout
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    if "50" not in lat:
        raise RuntimeError(f"wrk gave no latencies for {url} (Host: {host}):\n{out}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    return {
        "p50_ms": _ms(lat["50"]), "p99_ms": _ms(lat["99"]), "rps": float(rps.group(1)) if rps else 0.0,
        "errors": errors.group(0) if errors else None,
    }


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def first_byte(host_port: tuple[str, int], host: str, path: str) -> tuple[float, float]:
    """(time to the first body byte, to the whole answer) of one GET on a new connection."""
    t0 = time.perf_counter()
    with socket.create_connection(host_port, timeout=120) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        buf = b""
        ttfb = None
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if ttfb is None and b"\r\n\r\n" in buf and len(buf) > buf.index(b"\r\n\r\n") + 4:
                ttfb = time.perf_counter() - t0
        total = time.perf_counter() - t0
    assert buf.startswith(b"HTTP/1.1 200"), buf[:200]
    return (ttfb or total), total


def ws_rtt(port: int, host: str, n: int) -> Json:
    from websockets.sync.client import connect

    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    samples = []
    with connect(f"ws://{host}/ws", sock=sock, open_timeout=60) as ws:
        for i in range(n + 20):
            t0 = time.perf_counter()
            ws.send(f"m{i}")
            ws.recv(timeout=10)
            if i >= 20:
                samples.append(time.perf_counter() - t0)
    return bench.summary_ms(samples)


def start_uvicorn(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "web_apps:make_app", "--host", "127.0.0.1",
         "--port", str(port), "--no-access-log", "--log-level", "warning"],
        cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": HERE + os.pathsep + os.path.join(REPO, "python")},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("uvicorn did not start")


def uvicorn_flavour() -> str:
    have = [m for m in ("uvloop", "httptools") if importlib.util.find_spec(m)]
    return "uvicorn " + __import__("uvicorn").__version__ + (" + " + "+".join(have) if have else " (asyncio, h11)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold-runs", type=int, default=10)
    ap.add_argument("--no-install", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds, args.cold_runs = 2, 1, 3
    wrk = find_or_install_wrk(not args.no_install)
    if wrk is None:
        raise SystemExit("wrk not found (apt-get install wrk)")
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    server = bench.Server(bench.find_flared())
    server.start()
    os.environ["FLARE_SERVER_URL"] = server.url
    os.environ["FLARE_HOME"] = server.home
    uv_port = bench.free_port()
    uv = start_uvicorn(uv_port)
    results: Json = {"started_at_utc": started, "machine": bench.machine_info(), "baseline": uvicorn_flavour()}
    try:
        import web_apps

        with web_apps.app.run():
            url = web_apps.api.get_web_url()
            host = url.split("://", 1)[1]
            fport = server.port
            flare_url = f"http://127.0.0.1:{fport}/"
            uv_url = f"http://127.0.0.1:{uv_port}/"
            # Warm up both (the container's first requests, wrk's connections).
            for target, h in ((flare_url, host), (uv_url, "127.0.0.1")):
                run_wrk(wrk, target, h, 8, 1)
            rounds: dict[str, list[Json]] = {}
            for _ in range(args.rounds):
                for conns in (1, 64):
                    for name, target, h in (("flare", flare_url, host), ("uvicorn", uv_url, f"127.0.0.1:{uv_port}")):
                        rounds.setdefault(f"{name}_c{conns}", []).append(run_wrk(wrk, target, h, conns, args.seconds))
            warm: Json = {}
            for k, rs in rounds.items():
                warm[k] = {m: median([r[m] for r in rs]) for m in ("p50_ms", "p99_ms", "rps")}
                warm[k]["errors"] = [r["errors"] for r in rs if r["errors"]]
                warm[k]["rounds"] = rs
            results["warm"] = warm
            # Streaming first byte and WebSocket round trips, warm.
            stream: Json = {}
            for name, port, h in (("flare", fport, host), ("uvicorn", uv_port, f"127.0.0.1:{uv_port}")):
                ttfb = [first_byte(("127.0.0.1", port), h, "/stream")[0] for _ in range(30)]
                stream[name] = {"ttfb": bench.summary_ms(ttfb), "ws_rtt": ws_rtt(port, h, 500 if not args.quick else 100)}
            results["stream"] = stream
            # Cold: a scaled-to-zero endpoint's first request vs a cold .remote().
            cold_host = web_apps.cold.get_web_url().split("://", 1)[1]
            app_id = web_apps.app.app_id
            cold_fids = {"cold", "cold_remote"}

            def idle() -> bool:
                return not [c for c in server.containers()
                            if c.get("app_id") == app_id and c.get("function") in cold_fids]

            web_cold, remote_cold = [], []
            for i in range(args.cold_runs + 1):
                bench.wait_until(idle, 30)
                time.sleep(0.05)
                t = first_byte(("127.0.0.1", fport), cold_host, "/")[1]
                bench.wait_until(idle, 30)
                time.sleep(0.05)
                t0 = time.perf_counter()
                web_apps.cold_remote.remote()
                r = time.perf_counter() - t0
                if i:
                    web_cold.append(t)
                    remote_cold.append(r)
            results["cold"] = {"web_request": bench.summary_ms(web_cold), "remote": bench.summary_ms(remote_cold)}
    finally:
        uv.terminate()
        uv.wait(timeout=10)
        server.stop()
    print(table(results))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    stamp = started.replace(":", "").replace("-", "")
    for path in (os.path.join(HERE, "results", f"web-{stamp}.json"), os.path.join(HERE, "results", "web.json")):
        with open(path, "w") as fh:
            json.dump(results, fh, indent=2)
            fh.write("\n")
    print(f"\nwrote bench/results/web-{stamp}.json and bench/results/web.json")
    return 0


def table(r: Json) -> str:
    w = r["warm"]
    lines = [f"baseline: {r['baseline']} on the host; load generator wrk", "",
             f"{'warm GET /':<28}{'flare':>12}{'uvicorn':>12}{'flare - uvicorn':>18}{'ratio':>8}"]
    for c in (1, 64):
        f, u = w[f"flare_c{c}"], w[f"uvicorn_c{c}"]
        lines.append(f"{f'p50 ms, {c} conn':<28}{f['p50_ms']:>12.3f}{u['p50_ms']:>12.3f}{f['p50_ms'] - u['p50_ms']:>+18.3f}"
                     f"{f['p50_ms'] / u['p50_ms']:>8.2f}")
        lines.append(f"{f'p99 ms, {c} conn':<28}{f['p99_ms']:>12.3f}{u['p99_ms']:>12.3f}{f['p99_ms'] - u['p99_ms']:>+18.3f}"
                     f"{f['p99_ms'] / u['p99_ms']:>8.2f}")
        lines.append(f"{f'requests/s, {c} conn':<28}{f['rps']:>12.0f}{u['rps']:>12.0f}{'':>18}{f['rps'] / u['rps']:>8.2f}")
    s = r["stream"]
    lines += ["", f"{'warm, p50 ms':<28}{'flare':>12}{'uvicorn':>12}"]
    lines.append(f"{'stream first byte':<28}{s['flare']['ttfb']['p50_ms']:>12.3f}{s['uvicorn']['ttfb']['p50_ms']:>12.3f}")
    lines.append(f"{'websocket echo round trip':<28}{s['flare']['ws_rtt']['p50_ms']:>12.3f}{s['uvicorn']['ws_rtt']['p50_ms']:>12.3f}")
    c = r["cold"]
    lines += ["", f"{'cold, ms':<28}{'p50':>12}{'p90':>12}"]
    lines.append(f"{'web request (whole answer)':<28}{c['web_request']['p50_ms']:>12.1f}{c['web_request']['p90_ms']:>12.1f}")
    lines.append(f"{'.remote()':<28}{c['remote']['p50_ms']:>12.1f}{c['remote']['p90_ms']:>12.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Server and client memory of large maps (issue 15).

Starts its own ``flared server`` (as root, from target/release/flared) and runs, each in
its own ephemeral app (``with app.run()``), maps of 10k, 100k and 1M inputs of an identity
function, then three 100k maps in a row. After each it records flared's VmRSS (once the
server's sweep dropped the stopped app, ~2.5 s) and this client's peak and current RSS.
Bytes retained per finished input = (server RSS after the last of the three 100k maps -
RSS after the first) / 200k. Prints a table, writes bench/results/memory.json.

    sudo python3 bench/memory.py [--sizes 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))

APP = """
import flare
app = flare.App("bench-memory")

@app.function()
def identity(x):
    return x
"""


def vmrss(pid: int | str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--repeat", type=int, default=100_000, help="size of the three maps in a row")
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="flare-bench-mem-")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(Path(home) / "flared.log", "wb")
    proc = subprocess.Popen(
        [str(REPO / "target/release/flared"), "server", "--home", home, "--listen", f"127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    os.environ["FLARE_SERVER_URL"] = url
    os.environ["FLARE_HOME"] = home
    try:
        import urllib.request

        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/v1/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        app_path = Path(home) / "bench_memory_app.py"
        app_path.write_text(APP)
        sys.path.insert(0, home)
        import bench_memory_app as mod  # type: ignore[import-not-found]

        rows = []
        base = vmrss(proc.pid)

        def run(label: str, n: int) -> dict:
            t0 = time.perf_counter()
            with mod.app.run(show_output=False):
                total = 0
                peak_server = 0
                for i, v in enumerate(mod.identity.map(range(n))):
                    total += v
                    if i % 20_000 == 0:
                        peak_server = max(peak_server, vmrss(proc.pid))
            secs = time.perf_counter() - t0
            assert total == n * (n - 1) // 2
            time.sleep(2.5)
            row = {
                "run": label,
                "inputs": n,
                "seconds": round(secs, 2),
                "inputs_per_s": round(n / secs),
                "server_rss_peak_mib": round(max(peak_server, vmrss(proc.pid)) / 2**20, 1),
                "server_rss_after_mib": round(vmrss(proc.pid) / 2**20, 1),
                "client_rss_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "client_rss_now_mib": round(vmrss("self") / 2**20, 1),
            }
            rows.append(row)
            return row

        for n in [int(s) for s in args.sizes.split(",") if s]:
            run(f"map {n}", n)
        after = [run(f"map {args.repeat} #{k + 1}", args.repeat)["server_rss_after_mib"] for k in range(3)]
        per_input = (after[2] - after[0]) * 2**20 / (2 * args.repeat)
        cols = list(rows[0].keys())
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(str(r[c]) for c in cols))
        print(f"server RSS at start: {base / 2**20:.1f} MiB")
        print(f"bytes retained per finished input (3 x {args.repeat}, after the apps stopped): {per_input:.1f}")
        out = {
            "bench": "memory",
            "time": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
            "server_rss_start_mib": round(base / 2**20, 1),
            "rows": rows,
            "bytes_retained_per_input": round(per_input, 1),
        }
        results = REPO / "bench" / "results"
        results.mkdir(exist_ok=True)
        (results / "memory.json").write_text(json.dumps(out, indent=2) + "\n")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()

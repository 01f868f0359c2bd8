"""Scale-out benchmark: bursts of 20 concurrent one-second inputs on a scaled-to-zero function.

Reports, over several bursts (p50 and max):
- burst -> first container started: from submitting the burst to the start of the first
  new container's init process (read from /proc inside the container; 10 ms ticks);
  this is the platform's share of a cold start (scheduling + worker + runtime spawn);
- burst -> first input running and burst -> all 20 running: up to the moment each
  function body starts (these include the interpreter start and imports);
- containers used per burst.

Usage: python bench/scaleout.py [--bursts N] [--size 20]   (as root; starts its own flared)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import Server, find_flared, machine_info, percentile, wait_until  # noqa: E402


def run(bursts: int, size: int) -> dict:
    import flare

    import bench_apps

    server = Server(find_flared())
    server.start()
    rows = []
    try:
        os.environ["FLARE_SERVER_URL"] = server.url
        with bench_apps.burst_app.run():
            for b in range(bursts):
                # Scaled to zero before each burst.
                wait_until(lambda: not server.containers(), timeout=30)
                time.sleep(0.2)
                t0 = time.time()
                calls = [bench_apps.sleep_one.spawn(i) for i in range(size)]
                results = flare.FunctionCall.gather(*calls)
                container_starts = sorted({(c, s) for s, _, c in results}, key=lambda x: x[1])
                input_starts = sorted(r[1] for r in results)
                rows.append(
                    {
                        "first_container_ms": (container_starts[0][1] - t0) * 1000,
                        "first_input_ms": (input_starts[0] - t0) * 1000,
                        "all_running_ms": (input_starts[-1] - t0) * 1000,
                        "containers": len(container_starts),
                    }
                )
                print(f"burst {b + 1}/{bursts}: " + ", ".join(f"{k}={v:.0f}" for k, v in rows[-1].items()), flush=True)
    finally:
        server.stop()

    def stat(key: str) -> dict:
        v = [r[key] for r in rows]
        return {"p50": percentile(v, 0.5), "max": max(v)}

    return {
        "bursts": bursts,
        "size": size,
        "first_container_ms": stat("first_container_ms"),
        "first_input_ms": stat("first_input_ms"),
        "all_running_ms": stat("all_running_ms"),
        "containers": stat("containers"),
        "rows": rows,
        "machine": machine_info(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bursts", type=int, default=5)
    ap.add_argument("--size", type=int, default=20)
    args = ap.parse_args()
    res = run(args.bursts, args.size)
    print()
    print(f"{'scale-out, burst of ' + str(args.size) + ' x 1 s inputs':<44} {'p50':>9} {'max':>9}")
    for key, label in [
        ("first_container_ms", "burst -> first container started (ms)"),
        ("first_input_ms", "burst -> first input running (ms)"),
        ("all_running_ms", "burst -> all inputs running (ms)"),
        ("containers", "containers used"),
    ]:
        print(f"{label:<44} {res[key]['p50']:>9.0f} {res[key]['max']:>9.0f}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scaleout.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

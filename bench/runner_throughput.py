"""Micro-benchmark: inputs/s through the in-container runner over its fd-3 socket.

Plays the worker side (flare._runner_client) against `python -m flare._runtime` and
measures trivial-function throughput for several batch sizes and concurrency
settings, plus cold start (spawn -> READY) against `python -c pass`.

    python bench/runner_throughput.py [--inputs 20000]

Prints a table and writes bench/results/runner_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

import cloudpickle  # noqa: E402

from flare._runtime import READY  # noqa: E402
from flare._runner_client import RunnerProcess  # noqa: E402


def trivial(x: int) -> int:
    return x


def start(max_inputs: int = 1) -> RunnerProcess:
    r = RunnerProcess()
    r.init({"name": "trivial", "module": None, "qualname": None, "serialized": True, "is_generator": False,
            "is_async": False, "max_inputs": max_inputs}, cloudpickle.dumps(trivial, protocol=4))
    frame = r.recv()
    assert frame is not None and frame[0] == READY, frame
    return r


def throughput(n: int, batch: int, max_inputs: int) -> float:
    r = start(max_inputs)
    try:
        r.send_inputs([("warm", (0,), {})])
        r.outputs(1)
        t0 = time.perf_counter()
        sent = 0
        received = 0
        window = max(batch * 4, 4000)  # keep the pipe full without unbounded buffering
        while received < n:
            while sent < n and sent - received < window:
                k = min(batch, n - sent)
                r.send_inputs([(f"i{sent + j}", (sent + j,), {}) for j in range(k)], start_idx=sent)
                sent += k
            received += len(r.outputs(1))
            # drain whatever else already arrived in that frame batch
            while r._queued:
                received += len(r.outputs(1))
        return n / (time.perf_counter() - t0)
    finally:
        r.shutdown()
        r.close()


def warm_latency(samples: int) -> float:
    r = start()
    try:
        times = []
        for i in range(samples):
            t0 = time.perf_counter()
            r.send_inputs([(f"l{i}", (i,), {})])
            r.outputs(1)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    finally:
        r.shutdown()
        r.close()


def cold_start(samples: int) -> tuple[float, float]:
    py = []
    for _ in range(samples):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-X", "frozen_modules=on", "-c", "pass"], check=True)
        py.append(time.perf_counter() - t0)
    runner = []
    for _ in range(samples):
        t0 = time.perf_counter()
        r = start()
        runner.append(time.perf_counter() - t0)
        r.shutdown()
        r.close()
    return statistics.median(py) * 1e3, statistics.median(runner) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=20000)
    ap.add_argument("--samples", type=int, default=15)
    args = ap.parse_args()
    rows = []
    for batch, max_inputs in [(1, 1), (100, 1), (1000, 1), (1000, 8)]:
        rate = throughput(args.inputs if batch > 1 else min(args.inputs, 5000), batch, max_inputs)
        rows.append({"batch": batch, "max_inputs": max_inputs, "inputs_per_s": round(rate)})
    lat = warm_latency(500)
    py_ms, runner_ms = cold_start(args.samples)
    print(f"{'inputs/frame':>12} {'max_inputs':>10} {'inputs/s':>10}")
    for row in rows:
        print(f"{row['batch']:>12} {row['max_inputs']:>10} {row['inputs_per_s']:>10}")
    print(f"single-input round trip over the socket (p50): {lat:.0f} us")
    print(f"cold start to READY: {runner_ms:.1f} ms vs `python -c pass` {py_ms:.1f} ms ({runner_ms / py_ms:.2f}x)")
    result = {
        "benchmark": "runner_throughput",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "throughput": rows,
        "warm_round_trip_p50_us": round(lat, 1),
        "cold_start_ms": round(runner_ms, 2),
        "python_c_pass_ms": round(py_ms, 2),
        "cold_start_ratio": round(runner_ms / py_ms, 3),
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "runner_throughput.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""The apps that bench/bench.py runs on Flare.

Kept apart from bench.py and free of everything but ``import flare`` so that what a
container imports at start-up is as small as a user's trivial function module: the
cold-start number then measures the platform, not the benchmark's own imports.
Each benchmark gets its own app so that, e.g., the 8 warm containers of the memory
benchmark never exist while cold starts are being timed.
"""

from __future__ import annotations

import flare

MEMORY_CONTAINERS = 8

# Cold start: scaledown_window=0 makes the container exit as soon as it is idle
# (the control plane's 100 ms tick), so every timed call starts from zero containers.
cold_app = flare.App("bench-cold")


@cold_app.function(scaledown_window=0)
def cold_noop(x: int) -> int:
    return x


# The same with the pre-started runner pool out of reach: a function whose environment
# sets a PYTHON* variable (read only at interpreter start, so never applied to a runner
# started earlier) always gets a new container. The interpreter ignores this one.
@cold_app.function(scaledown_window=0, env={"PYTHONFLAREBENCHNOPOOL": "1"})
def cold_noop_nopool(x: int) -> int:
    return x


# Warm round trips and .map: default settings, as a user would write them.
warm_app = flare.App("bench-warm")


@warm_app.function()
def echo(x: int) -> int:
    return x


@warm_app.function()
def ident(x: int) -> int:
    return x


# Concurrent writes: spawned calls (each one a durable store write before its response).
spawn_app = flare.App("bench-spawn")


@spawn_app.function()
def spawned(x: int) -> int:
    return x


# Memory: a floor of warm, idle containers.
memory_app = flare.App("bench-memory")


@memory_app.function(min_containers=MEMORY_CONTAINERS)
def idle(x: int) -> int:
    return x

# Scale-out: bursts of one-second inputs on a function scaled to zero. A small cpu
# reservation lets one 2-core machine hold the whole burst at once.
burst_app = flare.App("bench-burst")


def _container_started_at() -> float:
    """Wall-clock start of this container's init process (pid 1), from /proc (10 ms ticks):
    now minus its age, where age = system uptime - its start time since boot."""
    import os
    import time

    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    with open("/proc/1/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - age


@burst_app.function(scaledown_window=1, cpu=0.0625)
def sleep_one(i: int) -> tuple[float, float, str]:
    import os
    import time

    started = time.time()
    time.sleep(1.0)
    return _container_started_at(), started, os.environ.get("FLARE_CONTAINER_ID", "")

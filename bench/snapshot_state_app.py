"""App for bench/snapshots.py's state-size part: ``@enter(snap=True)`` fills 1 GiB.

Deployed with ``flare deploy`` from a copy of this file; the bench then redeploys it with
the one line marked ``VARIANT`` changed (a changed method body) to see how many bytes the
new snapshot shares with the previous one. The 1 GiB is pseudo-random bytes from a fixed
seed: incompressible and not deduplicated within itself, but the same in both versions.
"""

from __future__ import annotations

import os
import time
from typing import Any

import flare

app = flare.App("bench-snap-state")

STATE_MIB = int(os.environ.get("FLARE_BENCH_STATE_MIB", "1024"))


@app.cls(enable_memory_snapshot=True, scaledown_window=2, timeout=600, memory=STATE_MIB + 2048)
class State:
    @flare.enter(snap=True)
    def fill(self) -> None:
        import random

        t0 = time.perf_counter()
        # randbytes() overflows on 1 GiB at once (n * 8 bits > INT_MAX): 64 MiB at a time.
        rng, chunk = random.Random(1234), 64 << 20
        self.buf = bytearray(STATE_MIB << 20)
        for off in range(0, len(self.buf), chunk):
            n = min(chunk, len(self.buf) - off)
            self.buf[off:off + n] = rng.randbytes(n)
        self.fill_s = time.perf_counter() - t0

    @flare.method()
    def probe(self, i: int) -> dict[str, Any]:
        variant = 1  # VARIANT
        n = len(self.buf)
        return {
            "variant": variant,
            "bytes": n,
            "sample": self.buf[(i * 4099) % n],
            "snapshot": os.environ.get("FLARE_SNAPSHOT", ""),
            "fill_s": self.fill_s,
            "pid": os.getpid(),
        }

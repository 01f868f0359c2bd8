"""The server's memory is bounded by what is live, not by history (issue 15).

Several large maps run against one ``flared server``, each in its own ephemeral app; the
server's VmRSS after the last is within a small margin of what it was after the first
(delivered outputs, finished calls and stopped apps leave memory, and the heap is given
back). A map whose outputs are not read holds its submitter back instead of growing the
server (back-pressure on ``/inputs``).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from flare._serialization import b64, serialize_args

from .conftest import Server, load_app

APP = """
import flare

app = flare.App("memory")

@app.function()
def identity(x):
    return x
"""

N = 40_000
# What issue 15 measured: ~470 bytes kept per finished input, i.e. ~28 MB per map of N.
MARGIN = 10 << 20


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def settled_rss(pid: int) -> int:
    """RSS once the server's sweep (every second) dropped the stopped app and trimmed."""
    time.sleep(2.5)
    return rss(pid)


def one_map(mod: Any) -> None:
    with mod.app.run():
        total = 0
        for v in mod.identity.map(range(N)):
            total += v
        assert total == sum(range(N))


def test_memory_after_maps_returns_to_level_of_first(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, APP)
    t0 = time.monotonic()
    one_map(mod)
    first = settled_rss(server.pid)
    after = [first]
    for _ in range(2):
        one_map(mod)
        after.append(settled_rss(server.pid))
    took = time.monotonic() - t0
    mib = [f"{r / 2**20:.1f}" for r in after]
    print(f"flared VmRSS after each of 3 maps of {N}: {mib} MiB ({took:.1f} s)")
    assert after[-1] - first < MARGIN, f"flared grew {(after[-1] - first) / 2**20:.1f} MiB over 2 maps of {N}: {mib}"


def _req(server: Server, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_unread_map_outputs_hold_the_submitter_back(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, APP)
    arg = b64(serialize_args((1,), {}))
    batch = [{"args": arg}] * 1000
    with mod.app.run():
        fid = mod.identity.hydrate().object_id
        st, created = _req(server, "POST", f"/v1/functions/{fid}/calls", {"kind": "map", "inputs": batch, "more": True, "wait_ms": 0})
        assert st == 200, created
        call_id = created["call_id"]
        # A reader is there (it polled once), but reads nothing more.
        st, page = _req(server, "GET", f"/v1/calls/{call_id}/outputs?after=-1&wait_ms=0")
        assert st == 200, page
        accepted = 1000
        refused = None
        for _ in range(40):
            t = time.monotonic()
            st, body = _req(server, "POST", f"/v1/calls/{call_id}/inputs", {"inputs": batch, "more": True})
            if st != 200:
                refused = (st, body, time.monotonic() - t)
                break
            accepted += 1000
        assert refused is not None, f"{accepted} inputs accepted without their outputs being read"
        st, body, waited = refused
        assert st == 429 and body["error"]["code"] == "resource_exhausted", body
        assert "not read" in body["error"]["message"]
        assert waited >= 5, "the server should hold the batch a while before refusing it"
        assert accepted <= 20_000, accepted
        # Reading the outputs makes room: the same batch is taken, the call completes.
        after = -1
        got = 0
        while got < accepted:
            st, page = _req(server, "GET", f"/v1/calls/{call_id}/outputs?after={after}&wait_ms=5000")
            assert st == 200, page
            got += len(page["outputs"])
            after = page["next"]
        st, body = _req(server, "POST", f"/v1/calls/{call_id}/inputs", {"inputs": batch, "more": False})
        assert st == 200, body
        # Outputs already read are gone from the server: reading them again is refused.
        st, body = _req(server, "GET", f"/v1/calls/{call_id}/outputs?after=-1&wait_ms=0")
        assert st == 412 and "already read" in body["error"]["message"], body
        total = accepted + 1000
        while got < total:
            st, page = _req(server, "GET", f"/v1/calls/{call_id}/outputs?after={after}&wait_ms=5000")
            assert st == 200, page
            got += len(page["outputs"])
            after = page["next"]
        assert page["done"]


@pytest.mark.parametrize("n", [30_000])
def test_sdk_map_with_a_slow_consumer_completes(server: Server, tmp_path: Path, n: int) -> None:
    """The SDK's sender waits out back-pressure (HTTP 429) while its consumer lags."""
    mod = load_app(tmp_path, APP)
    with mod.app.run():
        it = mod.identity.map(range(n))
        first = [next(it) for _ in range(10)]
        time.sleep(12)  # longer than the server holds a batch: the sender sees a 429
        rest = list(it)
    assert first + rest == list(range(n))

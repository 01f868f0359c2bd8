"""The API's protections against web pages, big or slow requests, flooding containers
and curious containers (issue 8: findings 5, 7, 8, 9 and 11), against a live flared."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from flare import exception

from .conftest import FLARED, Flared, Server, load_app, run_cli

APP = '{"name": "csrf_probe", "mode": "ephemeral"}'


def _raw(server: Server, method: str, path: str, body: bytes | str | None, headers: dict[str, str]) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw
    finally:
        conn.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------- #5 cross-site requests


def test_browser_style_requests_are_refused(server: Server) -> None:
    # What a web page can send without a preflight: text/plain (a form, a no-cors fetch).
    status, body = _raw(server, "POST", "/v1/apps", APP, {"Content-Type": "text/plain"})
    assert status == 415, body
    assert body["error"]["code"] == "unsupported_media_type"
    status, _ = _raw(server, "POST", "/v1/images/build", "{}", {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415
    status, _ = _raw(server, "POST", "/v1/apps/ap-x/stop", None, {})
    assert status == 415
    # A foreign page's Origin, even with the right content type.
    status, body = _raw(server, "POST", "/v1/apps", APP, {"Content-Type": "application/json", "Origin": "https://evil.example"})
    assert status == 403, body
    assert body["error"]["code"] == "permission_denied"
    # DNS rebinding: the request reaches us under the attacker's name.
    for method, path, data in [("POST", "/v1/apps", APP), ("GET", "/v1/apps", None)]:
        headers = {"Host": f"evil.example:{server.port}", "Content-Type": "application/json"}
        status, body = _raw(server, method, path, data, headers)
        assert status == 403, (method, body)
        assert "--allowed-host" in body["error"]["message"]
    # Blob uploads take octet-stream only.
    status, _ = _raw(server, "PUT", "/v1/blobs/blake3:" + "0" * 64, b"x", {"Content-Type": "text/plain"})
    assert status == 415
    # What the SDK and curl with -H 'Content-Type: application/json' send still works.
    status, body = _raw(server, "POST", "/v1/apps", APP, {"Content-Type": "application/json"})
    assert status == 200, body
    _raw(server, "POST", f"/v1/apps/{body['app_id']}/stop", "{}", {"Content-Type": "application/json"})
    status, _ = _raw(server, "GET", "/v1/apps", None, {"Host": f"localhost:{server.port}"})
    assert status == 200


# --------------------------------------------------------------- #8 the daemon's memory


def test_oversized_bodies_are_refused_without_being_held(server: Server) -> None:
    """Four clients announcing 500 MB bodies: refused at once (413), flared's memory flat."""
    before = _rss_kib(server.pid)
    results: list[tuple[int, Any]] = []

    def send() -> None:
        sock = socket.create_connection((server.host, server.port), timeout=30)
        try:
            head = (
                f"POST /v1/apps HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {500 << 20}\r\n\r\n"
            )
            sock.sendall(head.encode())
            chunk = b" " * (1 << 20)
            try:
                for _ in range(500):
                    sock.sendall(chunk)
            except OSError:
                pass  # the server answered and closed: it does not read what it refuses
            data = b""
            while b"\r\n\r\n" not in data:
                more = sock.recv(65536)
                if not more:
                    break
                data += more
            status = int(data.split(b" ", 2)[1]) if data else 0
            results.append((status, data))
        finally:
            sock.close()

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = _rss_kib(server.pid)
    assert [s for s, _ in results] == [413] * 4, results
    assert b"payload_too_large" in results[0][1] or b"413" in results[0][1]
    assert after - before < 64 * 1024, f"flared grew from {before} to {after} KiB"


def test_oversized_argument_and_result_are_readable_errors(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, """
        import flare
        app = flare.App()

        @app.function()
        def size(b):
            return len(b)

        @app.function()
        def big(n):
            return b"x" * n
    """)
    with mod.app.run():
        with pytest.raises(exception.PayloadTooLargeError, match="over the limit of 64.0 MiB per input"):
            mod.size.remote(b"x" * (65 << 20))
        assert mod.size.remote(b"x" * (8 << 20)) == 8 << 20
        with pytest.raises(exception.PayloadTooLargeError, match="over the limit of 64.0 MiB per output"):
            mod.big.remote(70 << 20)
        assert len(mod.big.remote(1 << 20)) == 1 << 20


@contextmanager
def _extra_server(*flags: str) -> Iterator[tuple[str, int, subprocess.Popen[bytes]]]:
    """A second flared with its own home and flags (for limits the shared one keeps at defaults)."""
    own = Flared(*flags, prefix="flare-e2e-hardening-")
    try:
        own.wait()
        yield own.home, own.port, own.proc
    finally:
        own.stop()


def test_slow_clients_time_out_and_connections_are_capped() -> None:
    if not FLARED.exists() or os.geteuid() != 0:
        pytest.skip("needs the flared binary and root")
    with _extra_server("--max-connections", "16", "--header-timeout-secs", "2") as (_, port, _proc):
        # Slowloris: connections that never finish their headers hold every slot...
        slow = []
        for _ in range(16):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            slow.append(s)
        time.sleep(0.3)
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("GET", "/v1/health")
        assert conn.getresponse().status == 200
        waited = time.monotonic() - t0
        conn.close()
        # ... only until the header timeout frees them: the honest client waited for it.
        assert 1.0 <= waited < 6.0, waited
        for s in slow:
            s.settimeout(5)
            try:
                got = s.recv(100)
            except ConnectionResetError:
                got = b""
            assert got == b"" or got.startswith(b"HTTP/1.1 408"), got
            s.close()
        # A client that keeps to its headers is served at once.
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("GET", "/v1/health")
        assert conn.getresponse().status == 200
        assert time.monotonic() - t0 < 1.0
        conn.close()


# --------------------------------------------------------------- #7 default memory limit


def test_default_memory_limit_applies_and_is_listed(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, """
        import time
        import flare
        app = flare.App()

        @app.function()
        def hog(n_mib):
            b = b"x" * (n_mib << 20)
            return len(b)

        @app.function()
        def nap(s):
            time.sleep(s)
            return s
    """)
    with mod.app.run():
        call = mod.nap.spawn(8)
        deadline = time.monotonic() + 60
        while True:
            r = run_cli("container", "list")
            assert r.returncode == 0, r.stderr
            lines = [line for line in r.stdout.splitlines() if "nap" in line]
            if lines and "ready" in lines[0]:
                break
            assert time.monotonic() < deadline, r.stdout
            time.sleep(0.2)
        assert "MEMORY" in r.stdout.splitlines()[0], r.stdout
        assert "2 GiB" in lines[0], r.stdout
        assert call.get(timeout=60) == 8
        # No memory= means the server's default limit, not the whole machine.
        with pytest.raises(exception.OutOfMemoryError, match="2048 MiB"):
            mod.hog.remote(3 << 10)


# --------------------------------------------------------------- #9 logs


def test_a_flooding_container_is_rate_limited_with_a_note(server: Server, tmp_path: Path) -> None:
    from flare._transport import get_client

    mod = load_app(tmp_path, """
        import sys
        import flare
        app = flare.App()

        @app.function()
        def flood(mib):
            line = "y" * 1023 + "\\n"
            for _ in range(mib * 1024):
                sys.stdout.write(line)
            sys.stdout.flush()
            return mib
    """)
    db = Path(server.home) / "state.db"
    wal = Path(server.home) / "state.db-wal"
    size = lambda: db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)  # noqa: E731
    before = size()
    with mod.app.run():
        assert mod.flood.remote(40) == 40
        app_id = mod.app.app_id
        client = get_client()
        deadline = time.monotonic() + 30
        note = None
        kept = 0
        after = -1
        while note is None and time.monotonic() < deadline:
            page = client.request("GET", f"/v1/apps/{app_id}/logs?after={after}&wait_ms=1000&limit=50000")
            for rec in page["logs"]:
                if rec["stream"] == "system" and "log rate limit" in rec["data"]:
                    note = rec["data"]
                elif rec["stream"] == "stdout":
                    kept += len(rec["data"])
            after = page["next"]
    assert note is not None, "no note about dropped output"
    assert "lines" in note and "dropped" in note, note
    # The burst (8 MiB) and a few seconds at 1 MiB/s got through, not 40 MiB.
    assert kept < 24 << 20, kept
    time.sleep(0.5)
    assert size() - before < 40 << 20, (before, size())


def test_logs_are_kept_within_the_per_app_size(monkeypatch: pytest.MonkeyPatch) -> None:
    if not FLARED.exists() or os.geteuid() != 0:
        pytest.skip("needs the flared binary and root")
    from flare._transport import Client

    with _extra_server("--log-retention-mib", "1", "--log-burst-kib", "65536") as (home, port, _proc):
        client = Client(f"http://127.0.0.1:{port}")
        monkeypatch.setenv("FLARE_SERVER_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("FLARE_HOME", home)
        tmp = Path(tempfile.mkdtemp())
        mod = load_app(tmp, """
            import sys
            import flare
            app = flare.App()

            @app.function()
            def chatter(n):
                for i in range(n):
                    print(f"line {i:06d} " + "z" * 1000)
                return n
        """)
        with mod.app.run():
            assert mod.chatter.remote(4000) == 4000
            app_id = mod.app.app_id
        # Stopped app: its logs come from the store, the oldest deleted first with a note.
        deadline = time.monotonic() + 20
        while True:
            logs = client.request("GET", f"/v1/apps/{app_id}/logs?after=-1&limit=50000")["logs"]
            notes = [r for r in logs if r["stream"] == "system" and "were deleted" in r["data"]]
            if notes or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert notes, [r["data"][:80] for r in logs[:3]]
        text = sum(len(r["data"]) for r in logs)
        assert text <= 1100 << 10, text
        lines = [r["data"] for r in logs if r["stream"] == "stdout"]
        assert "line 003999" in lines[-1], lines[-1][:40]
        assert not any("line 000000" in line for line in lines)
        assert logs[0] is notes[0], logs[0]


# --------------------------------------------------------------- #11 the container socket


def test_a_container_reaches_only_its_own_apps_calls(server: Server, tmp_path: Path) -> None:
    other = load_app(tmp_path, """
        import time
        import flare
        app = flare.App()

        @app.function()
        def secret(s):
            time.sleep(s)
            return "the other app's result"
    """)
    mine = load_app(tmp_path, """
        import json
        import flare
        from flare import exception
        from flare._transport import get_client
        app = flare.App()

        @app.function()
        def helper(x):
            return x * 2

        @app.function()
        def probe(call_id, function_id):
            client = get_client()
            seen = {}
            for name, do in [
                ("get", lambda: flare.FunctionCall.from_id(call_id).get(timeout=5)),
                ("info", lambda: client.request("GET", f"/v1/calls/{call_id}")),
                ("outputs", lambda: client.request("GET", f"/v1/calls/{call_id}/outputs")),
                ("cancel", lambda: client.request("POST", f"/v1/calls/{call_id}/cancel", {})),
                ("call", lambda: client.request("POST", f"/v1/functions/{function_id}/calls",
                                                {"kind": "spawn", "inputs": [{"args": "eA=="}]})),
                ("create_app", lambda: client.request("POST", "/v1/apps", {"name": "x", "mode": "deployed"})),
                ("list_apps", lambda: client.request("GET", "/v1/apps")),
            ]:
                try:
                    do()
                    seen[name] = "allowed"
                except exception.NotFoundError:
                    seen[name] = "not found"
                except Exception as e:
                    seen[name] = type(e).__name__
            own = helper.spawn(21)
            seen["own"] = flare.FunctionCall.from_id(own.object_id).get(timeout=60)
            return seen
    """)
    with other.app.run(), mine.app.run():
        victim = other.secret.spawn(5)
        seen = mine.probe.remote(victim.object_id, other.secret.object_id)
        assert seen == {
            "get": "not found", "info": "not found", "outputs": "not found", "cancel": "not found",
            "call": "not found", "create_app": "not found", "list_apps": "not found", "own": 42,
        }, seen
        # The cancel was refused: the other app's call still finishes.
        assert victim.get(timeout=60) == "the other app's result"

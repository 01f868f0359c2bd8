"""The in-container web server (python/flare/_runtime/web.py): ASGI and WSGI apps served
on an abstract unix socket, driven by real clients (http.client over the socket, and a
minimal websocket client written here)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import itertools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from flare._runtime.web import WebServer, listen_socket

_COUNTER = itertools.count()
TIMEOUT = 5.0


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, address: str, timeout: float = TIMEOUT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.address = address

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.address)
        self.sock = s


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """serve(app, kind="asgi", **kw) -> the socket address (abstract, unique per test)."""
    servers: list[WebServer] = []

    def start(app: Any, kind: str = "asgi", **kw: Any) -> str:
        name = f"@flare-test-web-{os.getpid()}-{next(_COUNTER)}-{time.monotonic_ns()}"
        sock = listen_socket(name)
        server = WebServer(app, kind, sock, **kw)
        server.start()
        servers.append(server)
        return "\0" + name[1:]

    yield start
    for s in servers:
        s.stop(timeout=1.0)


def _raw(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(address)
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        out += data
    return out


async def _text(send: Any, body: bytes, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers or [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        m = await receive()
        assert m["type"] == "http.request", m
        body += m["body"]
        if not m.get("more_body"):
            return body


# -- plain ASGI apps


async def scope_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await _read_body(receive)
    info = {k: scope[k] for k in ("type", "http_version", "method", "scheme", "path", "root_path", "client", "server")}
    info["raw_path"] = scope["raw_path"].decode()
    info["query_string"] = scope["query_string"].decode()
    info["headers"] = [[k.decode(), v.decode()] for k, v in scope["headers"]]
    info["asgi"] = scope["asgi"]
    await _text(send, json.dumps(info).encode(), headers=[(b"content-type", b"application/json")])


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    parts = []
    while True:
        m = await receive()
        parts.append(m["body"])
        if not m.get("more_body"):
            break
    body = b"".join(parts)
    await _text(send, body, headers=[(b"x-parts", str(len(parts)).encode())])


def test_get_and_the_http_scope(serve: Callable[..., str]) -> None:
    addr = serve(scope_app)
    c = UnixHTTPConnection(addr)
    c.request(
        "GET",
        "/a%20b/c?x=1&y=%20",
        headers={
            "X-Forwarded-For": "1.2.3.4, 10.0.0.1",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Prefix": "/api",
            "X-Thing": "Yes",
        },
    )
    r = c.getresponse()
    assert r.status == 200
    info = json.loads(r.read())
    assert info["type"] == "http" and info["http_version"] == "1.1" and info["method"] == "GET"
    assert info["asgi"]["version"] == "3.0"
    assert info["scheme"] == "https"
    assert info["root_path"] == "/api"
    assert info["path"] == "/api/a b/c"
    assert info["raw_path"] == "/api/a%20b/c"
    assert info["query_string"] == "x=1&y=%20"
    assert info["client"] == ["1.2.3.4", 0]
    assert info["server"] is None
    assert ["x-thing", "Yes"] in info["headers"]
    assert info["headers"][0][0] == "host"
    c.close()


def test_default_scheme_client_and_root_path(serve: Callable[..., str]) -> None:
    addr = serve(scope_app)
    c = UnixHTTPConnection(addr)
    c.request("DELETE", "/x")
    info = json.loads(c.getresponse().read())
    assert (info["scheme"], info["client"], info["root_path"], info["path"], info["method"]) == ("http", None, "", "/x", "DELETE")


def test_keep_alive_serves_several_requests_on_one_connection(serve: Callable[..., str]) -> None:
    addr = serve(echo_app)
    c = UnixHTTPConnection(addr)
    c.request("GET", "/")
    c.getresponse().read()
    sock = c.sock
    for i in range(5):
        c.request("POST", "/", body=b"n%d" % i)
        r = c.getresponse()
        assert r.read() == b"n%d" % i
        assert r.getheader("connection") is None
    assert c.sock is sock  # never reconnected
    c.close()


def test_connection_close_and_http10(serve: Callable[..., str]) -> None:
    addr = serve(echo_app)
    s = _raw(addr)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = _read_all(s)  # the server closes
    assert out.startswith(b"HTTP/1.1 200 ") and b"connection: close" in out.lower()
    s = _raw(addr)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert _read_all(s).startswith(b"HTTP/1.1 200 ")
    s = _raw(addr)
    s.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.0\r\n\r\n")
    assert _read_all(s).count(b"HTTP/1.1 200 ") == 2


def test_pipelined_requests_are_answered_in_order(serve: Callable[..., str]) -> None:
    addr = serve(echo_app)
    s = _raw(addr)
    s.sendall(
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nonePOST / HTTP/1.1\r\nContent-Length: 3\r\n\r\ntwoGET / HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    out = _read_all(s)
    assert out.count(b"HTTP/1.1 200 ") == 3
    assert out.index(b"one") < out.index(b"two")


def test_post_with_content_length_and_chunked(serve: Callable[..., str]) -> None:
    addr = serve(echo_app)
    c = UnixHTTPConnection(addr)
    big = os.urandom(200_000)
    c.request("POST", "/", body=big)
    r = c.getresponse()
    assert r.read() == big
    assert int(r.getheader("x-parts") or 0) > 1  # streamed to the app in pieces

    def gen() -> Iterator[bytes]:
        yield b"hello "
        yield b"chunked "
        yield b"world"

    c.request("POST", "/", body=gen(), encode_chunked=True)
    r = c.getresponse()
    assert r.read() == b"hello chunked world"
    # and the connection is still usable
    c.request("POST", "/", body=b"after")
    assert c.getresponse().read() == b"after"


def test_expect_100_continue(serve: Callable[..., str]) -> None:
    addr = serve(echo_app)
    s = _raw(addr)
    s.sendall(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(100)
    assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    s.sendall(b"body")
    out = got[len(b"HTTP/1.1 100 Continue\r\n\r\n") :]
    while not out.endswith(b"body"):
        out += s.recv(1000)
    assert out.startswith(b"HTTP/1.1 200 ")


def test_streaming_chunks_arrive_as_produced(serve: Callable[..., str]) -> None:
    finished = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
            await asyncio.sleep(0.2)
        await send({"type": "http.response.body", "body": b""})
        finished.set()

    addr = serve(app)
    c = UnixHTTPConnection(addr)
    c.request("GET", "/events")
    r = c.getresponse()
    assert r.getheader("transfer-encoding") == "chunked"
    first = r.read1()
    assert first == b"data: 0\n\n"
    assert not finished.is_set()  # the app still has 0.4 s of sleeping to do
    rest = r.read()
    assert rest == b"data: 1\n\ndata: 2\n\n"
    assert finished.wait(TIMEOUT)


def test_huge_headers_get_431(serve: Callable[..., str]) -> None:
    addr = serve(echo_app)
    s = _raw(addr)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert _read_all(s).startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"G(T / HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_malformed_requests_get_400_and_close(serve: Callable[..., str], request_bytes: bytes) -> None:
    addr = serve(echo_app)
    s = _raw(addr)
    s.sendall(request_bytes)
    out = _read_all(s)
    assert out.startswith(b"HTTP/1.1 400 ")
    # the server lives on
    c = UnixHTTPConnection(addr)
    c.request("GET", "/")
    assert c.getresponse().status == 200


def test_app_exception_gives_500(serve: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raise ValueError("boom")

    addr = serve(app)
    c = UnixHTTPConnection(addr)
    c.request("GET", "/")
    r = c.getresponse()
    assert r.status == 500
    assert r.read() == b"Internal Server Error"
    c.close()
    c = UnixHTTPConnection(addr)
    c.request("GET", "/")
    assert c.getresponse().status == 500
    assert "ValueError: boom" in capsys.readouterr().err


def test_app_exception_after_start_closes_the_connection(serve: Callable[..., str]) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise ValueError("late boom")

    addr = serve(app)
    s = _raw(addr)
    s.sendall(b"GET / HTTP/1.1\r\n\r\n")
    out = _read_all(s)
    assert out.startswith(b"HTTP/1.1 200 ") and b"partial" in out and not out.endswith(b"0\r\n\r\n")


def test_head_has_no_body(serve: Callable[..., str]) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await _text(send, b"hello", headers=[(b"content-length", b"5")])

    addr = serve(app)
    s = _raw(addr)
    s.sendall(b"HEAD / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    out = _read_all(s)
    first, _, second = out.partition(b"\r\n\r\n")
    assert b"content-length: 5" in first
    assert second.startswith(b"HTTP/1.1 200 ")  # no body bytes after the HEAD response
    assert second.endswith(b"\r\n\r\nhello")


def test_client_disconnect_is_http_disconnect(serve: Callable[..., str]) -> None:
    seen: list[dict[str, Any]] = []
    got = threading.Event()
    waiting = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await _read_body(receive)
        waiting.set()
        seen.append(await receive())
        got.set()

    addr = serve(app)
    s = _raw(addr)
    s.sendall(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi")
    assert waiting.wait(TIMEOUT)
    s.close()
    assert got.wait(TIMEOUT)
    assert seen == [{"type": "http.disconnect"}]


def test_send_after_disconnect_is_ignored(serve: Callable[..., str]) -> None:
    done = threading.Event()
    errors: list[BaseException] = []
    streaming = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            streaming.set()
            assert (await receive())["type"] == "http.request"
            assert (await receive())["type"] == "http.disconnect"
            for _ in range(3):
                await send({"type": "http.response.body", "body": b"y", "more_body": True})
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            done.set()

    addr = serve(app)
    s = _raw(addr)
    s.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert streaming.wait(TIMEOUT)
    s.close()
    assert done.wait(TIMEOUT)
    assert errors == []


def test_max_concurrency_limits_the_app(serve: Callable[..., str]) -> None:
    active = [0]
    peak = [0]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        await asyncio.sleep(0.05)
        active[0] -= 1
        await _text(send, b"ok")

    addr = serve(app, max_concurrency=2)
    results: list[int] = []

    def one() -> None:
        c = UnixHTTPConnection(addr)
        c.request("GET", "/")
        results.append(c.getresponse().status)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert results == [200] * 6
    assert peak[0] == 2


def test_lifespan_startup_state_and_shutdown(serve: Callable[..., str]) -> None:
    events: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                m = await receive()
                events.append(m["type"])
                if m["type"] == "lifespan.startup":
                    scope["state"]["db"] = "connected"
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await _text(send, scope["state"]["db"].encode())

    sock = listen_socket(f"@flare-test-web-lifespan-{os.getpid()}-{time.monotonic_ns()}")
    addr = sock.getsockname()
    server = WebServer(app, "asgi", sock)
    server.start()
    assert events == ["lifespan.startup"]
    c = UnixHTTPConnection(addr)
    c.request("GET", "/")
    assert c.getresponse().read() == b"connected"
    c.close()
    server.stop()
    assert events == ["lifespan.startup", "lifespan.shutdown"]


def test_lifespan_startup_failed_raises(serve: Callable[..., str]) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    sock = listen_socket(f"@flare-test-web-lsfail-{os.getpid()}-{time.monotonic_ns()}")
    server = WebServer(app, "asgi", sock)
    with pytest.raises(RuntimeError, match="no database"):
        server.start()
    sock.close()


def test_lifespan_unsupported_is_fine(serve: Callable[..., str]) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            raise ValueError("unsupported")
        assert "state" not in scope
        await _text(send, b"ok")

    addr = serve(app)
    c = UnixHTTPConnection(addr)
    c.request("GET", "/")
    assert c.getresponse().read() == b"ok"


def test_on_request_is_called(serve: Callable[..., str]) -> None:
    calls: list[dict[str, Any]] = []
    got = threading.Event()

    def on_request(info: dict[str, Any]) -> None:
        calls.append(info)
        got.set()

    addr = serve(echo_app, on_request=on_request)
    c = UnixHTTPConnection(addr)
    c.request("POST", "/p?q", body=b"abc")
    assert c.getresponse().read() == b"abc"
    assert got.wait(TIMEOUT)
    (info,) = calls
    assert info["method"] == "POST" and info["path"] == "/p" and info["status"] == 200
    assert info["kind"] == "http" and info["error"] is None and info["bytes_out"] == 3
    assert info["duration_ms"] >= 0


# -- websockets


class WSClient:
    def __init__(self, address: str, path: str = "/ws", protocols: list[str] | None = None) -> None:
        self.sock = _raw(address)
        key = base64.b64encode(os.urandom(16))
        lines = [
            b"GET %s HTTP/1.1" % path.encode(),
            b"Host: localhost",
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Key: " + key,
            b"Sec-WebSocket-Version: 13",
        ]
        if protocols:
            lines.append(b"Sec-WebSocket-Protocol: " + ", ".join(protocols).encode())
        self.sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                break
            self.buf += data
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.split(b"\r\n")
        self.status = int(status_line.split(b" ")[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in header_lines)}
        self.expected_accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())

    def send(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        n = len(payload)
        b0 = (0x80 if fin else 0) | opcode
        if n < 126:
            head = bytes((b0, 0x80 | n))
        elif n < 65536:
            head = bytes((b0, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((b0, 0x80 | 127)) + n.to_bytes(8, "big")
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> tuple[int, bytes]:
        b0, b1 = self._read(2)
        assert not b1 & 0x80, "server frames are not masked"
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._read(2), "big")
        elif n == 127:
            n = int.from_bytes(self._read(8), "big")
        assert b0 & 0x80
        return b0 & 0x0F, self._read(n)


def make_ws_app(log: list[Any], done: threading.Event) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        log.append(("scope", scope["path"], scope["scheme"], scope["subprotocols"]))
        assert (await receive())["type"] == "websocket.connect"
        if scope["path"] == "/reject":
            await send({"type": "websocket.close"})
            return
        sub = scope["subprotocols"][0] if scope["subprotocols"] else None
        await send({"type": "websocket.accept", "subprotocol": sub, "headers": [(b"x-extra", b"1")]})
        try:
            while True:
                m = await receive()
                if m["type"] == "websocket.disconnect":
                    log.append(("disconnect", m["code"]))
                    return
                if m.get("text") == "bye":
                    await send({"type": "websocket.close", "code": 4001, "reason": "later"})
                    continue
                if m.get("text") is not None:
                    await send({"type": "websocket.send", "text": m["text"]})
                else:
                    await send({"type": "websocket.send", "bytes": m["bytes"]})
        finally:
            done.set()

    return app


def test_websocket_echo_and_close(serve: Callable[..., str]) -> None:
    log: list[Any] = []
    done = threading.Event()
    addr = serve(make_ws_app(log, done))
    ws = WSClient(addr, protocols=["chat", "other"])
    assert ws.status == 101
    assert ws.headers[b"sec-websocket-accept"] == ws.expected_accept
    assert ws.headers[b"sec-websocket-protocol"] == b"chat"
    assert ws.headers[b"x-extra"] == b"1"
    ws.send(1, "héllo".encode())
    assert ws.recv() == (1, "héllo".encode())
    ws.send(2, b"\x00\x01\x02")
    assert ws.recv() == (2, b"\x00\x01\x02")
    medium = os.urandom(300)
    ws.send(2, medium)
    assert ws.recv() == (2, medium)
    big = os.urandom(70_000)
    ws.send(2, big)
    assert ws.recv() == (2, big)
    # a fragmented message with a ping in the middle
    ws.send(1, b"frag", fin=False)
    ws.send(9, b"are you there")
    assert ws.recv() == (10, b"are you there")
    ws.send(0, b"mented")
    assert ws.recv() == (1, b"fragmented")
    ws.send(8, (1000).to_bytes(2, "big") + b"done")
    op, payload = ws.recv()
    assert op == 8 and int.from_bytes(payload[:2], "big") == 1000
    assert done.wait(TIMEOUT)
    assert log == [("scope", "/ws", "ws", ["chat", "other"]), ("disconnect", 1000)]


def test_websocket_close_from_the_app(serve: Callable[..., str]) -> None:
    log: list[Any] = []
    done = threading.Event()
    addr = serve(make_ws_app(log, done))
    ws = WSClient(addr)
    assert ws.status == 101 and b"sec-websocket-protocol" not in ws.headers
    ws.send(1, b"bye")
    op, payload = ws.recv()
    assert op == 8 and int.from_bytes(payload[:2], "big") == 4001 and payload[2:] == b"later"
    ws.send(8, payload[:2])
    assert done.wait(TIMEOUT)
    assert log[-1] == ("disconnect", 4001)


def test_websocket_too_big_message_closes_1009(serve: Callable[..., str]) -> None:
    log: list[Any] = []
    done = threading.Event()
    addr = serve(make_ws_app(log, done))
    ws = WSClient(addr)
    # just the header of a 17 MiB frame: the server refuses before the payload
    ws.sock.sendall(bytes((0x82, 0x80 | 127)) + (17 * 1024 * 1024).to_bytes(8, "big"))
    op, payload = ws.recv()
    assert op == 8 and int.from_bytes(payload[:2], "big") == 1009
    assert done.wait(TIMEOUT)
    assert log[-1] == ("disconnect", 1009)


def test_websocket_client_vanishing_is_1006(serve: Callable[..., str]) -> None:
    log: list[Any] = []
    done = threading.Event()
    addr = serve(make_ws_app(log, done))
    ws = WSClient(addr)
    ws.send(1, b"x")
    assert ws.recv() == (1, b"x")
    ws.sock.close()
    assert done.wait(TIMEOUT)
    assert log[-1] == ("disconnect", 1006)


def test_websocket_rejected_is_403(serve: Callable[..., str]) -> None:
    log: list[Any] = []
    addr = serve(make_ws_app(log, threading.Event()))
    ws = WSClient(addr, path="/reject")
    assert ws.status == 403


def test_websocket_scheme_wss_and_bad_version(serve: Callable[..., str]) -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            seen.append(scope["scheme"])
            await send({"type": "websocket.close"})

    addr = serve(app)
    s = _raw(addr)
    s.sendall(
        b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nX-Forwarded-Proto: https\r\n\r\n"
    )
    assert _read_all(s).startswith(b"HTTP/1.1 403 ")
    assert seen == ["wss"]
    s = _raw(addr)
    s.sendall(
        b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 8\r\n\r\n"
    )
    assert _read_all(s).startswith(b"HTTP/1.1 426 ")


# -- WSGI


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Any:
    path = environ["PATH_INFO"]
    if path == "/echo":
        body = environ["wsgi.input"].read()
        start_response("201 Created", [("Content-Type", "application/octet-stream")])
        return [body]
    if path == "/environ":
        keys = [
            "REQUEST_METHOD",
            "SCRIPT_NAME",
            "PATH_INFO",
            "QUERY_STRING",
            "SERVER_NAME",
            "SERVER_PORT",
            "SERVER_PROTOCOL",
            "HTTP_X_THING",
            "CONTENT_TYPE",
            "CONTENT_LENGTH",
            "wsgi.url_scheme",
            "wsgi.multithread",
            "wsgi.multiprocess",
            "wsgi.run_once",
        ]
        info = {k: environ.get(k) for k in keys}
        info["errors_is_stderr"] = environ["wsgi.errors"] is sys.stderr
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(info).encode()]
    if path == "/fail":
        raise RuntimeError("wsgi boom")
    start_response("404 Not Found", [])
    return [b"nope"]


def test_wsgi_get_post_and_environ(serve: Callable[..., str]) -> None:
    addr = serve(wsgi_app, kind="wsgi")
    c = UnixHTTPConnection(addr)
    c.request(
        "POST",
        "/environ?a=b",
        body=b"xyz",
        headers={"Host": "example.com:8080", "X-Thing": "t", "Content-Type": "text/plain", "X-Forwarded-Prefix": "/pre"},
    )
    r = c.getresponse()
    assert r.status == 200
    info = json.loads(r.read())
    assert info == {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "/pre",
        "PATH_INFO": "/environ",
        "QUERY_STRING": "a=b",
        "SERVER_NAME": "example.com",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_X_THING": "t",
        "CONTENT_TYPE": "text/plain",
        "CONTENT_LENGTH": "3",
        "wsgi.url_scheme": "http",
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "errors_is_stderr": True,
    }
    c.request("POST", "/echo", body=iter([b"chunk", b"ed"]), encode_chunked=True)
    r = c.getresponse()
    assert (r.status, r.read()) == (201, b"chunked")
    c.request("GET", "/missing")
    r = c.getresponse()
    assert (r.status, r.read()) == (404, b"nope")


def test_wsgi_exception_is_500(serve: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    addr = serve(wsgi_app, kind="wsgi")
    c = UnixHTTPConnection(addr)
    c.request("GET", "/fail")
    assert c.getresponse().status == 500
    assert "wsgi boom" in capsys.readouterr().err


def test_wsgi_streaming_iterable(serve: Callable[..., str]) -> None:
    release = threading.Event()
    closed = threading.Event()

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"first"
            assert release.wait(TIMEOUT)
            yield b"second"

        def close(self) -> None:
            closed.set()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    addr = serve(app, kind="wsgi")
    c = UnixHTTPConnection(addr)
    c.request("GET", "/")
    r = c.getresponse()
    assert r.getheader("transfer-encoding") == "chunked"
    assert r.read1() == b"first"  # before the iterable is done
    release.set()
    assert r.read() == b"second"
    assert closed.wait(TIMEOUT)


# -- frameworks, when installed


def test_fastapi_pydantic_body_streaming_and_websocket(serve: Callable[..., str]) -> None:
    fastapi = pytest.importorskip("fastapi")
    pydantic = pytest.importorskip("pydantic")
    from fastapi.responses import StreamingResponse

    class Item(pydantic.BaseModel):
        name: str
        price: float

    started = threading.Event()
    stopped = threading.Event()
    app = fastapi.FastAPI()

    async def create(item: Any) -> dict[str, Any]:
        return {"name": item.name, "double": item.price * 2}

    # The class itself, not the string "Item" (this module's annotations are strings, and
    # FastAPI resolves them in the module's globals, where a test-local class is not).
    create.__annotations__ = {"item": Item, "return": dict}
    app.post("/items")(create)

    @app.get("/stream")
    async def stream() -> Any:
        async def gen() -> Any:
            try:
                while True:
                    yield b"tick\n"
                    started.set()
                    await asyncio.sleep(0.05)
            finally:
                stopped.set()

        return StreamingResponse(gen(), media_type="text/plain")

    async def ws_route(websocket: Any) -> None:
        await websocket.accept()
        text = await websocket.receive_text()
        await websocket.send_text(text.upper())
        await websocket.close(code=1000)

    ws_route.__annotations__ = {"websocket": fastapi.WebSocket, "return": None}
    app.websocket("/ws")(ws_route)

    addr = serve(app)
    c = UnixHTTPConnection(addr)
    c.request("POST", "/items", body=json.dumps({"name": "x", "price": 1.5}), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert (r.status, json.loads(r.read())) == (200, {"name": "x", "double": 3.0})
    c.request("POST", "/items", body=b'{"name": 1}', headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 422
    r.read()

    c2 = UnixHTTPConnection(addr)
    c2.request("GET", "/stream")
    r = c2.getresponse()
    assert r.read1().startswith(b"tick")
    assert started.wait(TIMEOUT)
    c2.close()
    r.close()
    assert stopped.wait(TIMEOUT)  # the generator was cancelled after the disconnect

    ws = WSClient(addr, "/ws")
    assert ws.status == 101
    ws.send(1, b"hi")
    assert ws.recv() == (1, b"HI")
    op, payload = ws.recv()
    assert op == 8 and int.from_bytes(payload[:2], "big") == 1000


def test_flask_app(serve: Callable[..., str]) -> None:
    flask = pytest.importorskip("flask")
    app = flask.Flask(__name__)

    @app.route("/hello/<name>")
    def hello(name: str) -> Any:
        return {"hello": name, "q": flask.request.args.get("q")}

    @app.route("/echo", methods=["POST"])
    def echo() -> Any:
        return flask.request.get_data()

    @app.route("/stream")
    def stream() -> Any:
        return flask.Response((b"%d," % i for i in range(3)), mimetype="text/plain")

    addr = serve(app, kind="wsgi")
    c = UnixHTTPConnection(addr)
    c.request("GET", "/hello/w%C3%B6rld?q=1")
    r = c.getresponse()
    assert (r.status, json.loads(r.read())) == (200, {"hello": "wörld", "q": "1"})
    c.request("POST", "/echo", body=iter([b"a", b"b"]), encode_chunked=True)
    assert c.getresponse().read() == b"ab"
    c.request("GET", "/stream")
    assert c.getresponse().read() == b"0,1,2,"


def test_stop_finishes_in_flight_requests_and_closes_idle_connections() -> None:
    entered = threading.Event()
    release = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/slow":
            entered.set()
            while not release.is_set():
                await asyncio.sleep(0.01)
        await _text(send, b"done")

    sock = listen_socket(f"@flare-test-web-stop-{os.getpid()}-{time.monotonic_ns()}")
    addr = sock.getsockname()
    server = WebServer(app, "asgi", sock)
    server.start()
    idle = UnixHTTPConnection(addr)
    idle.request("GET", "/")
    assert idle.getresponse().read() == b"done"
    busy = _raw(addr)
    busy.sendall(b"GET /slow HTTP/1.1\r\n\r\n")
    assert entered.wait(TIMEOUT)
    stopper = threading.Thread(target=server.stop, kwargs={"timeout": TIMEOUT})
    stopper.start()
    assert idle.sock.recv(10) == b""  # the idle keep-alive connection is closed at once
    release.set()
    out = _read_all(busy)
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"done") and b"connection: close" in out
    stopper.join(TIMEOUT)
    assert not stopper.is_alive()
    with pytest.raises(OSError):
        _raw(addr)  # no longer listening


def test_websocket_invalid_utf8_closes_1007(serve: Callable[..., str]) -> None:
    log: list[Any] = []
    done = threading.Event()
    addr = serve(make_ws_app(log, done))
    ws = WSClient(addr)
    ws.send(1, b"\xff\xfe")
    op, payload = ws.recv()
    assert op == 8 and int.from_bytes(payload[:2], "big") == 1007
    assert done.wait(TIMEOUT)
    assert log[-1] == ("disconnect", 1007)


def test_other_upgrades_are_plain_http(serve: Callable[..., str]) -> None:
    addr = serve(echo_app)
    s = _raw(addr)
    s.sendall(b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade, close\r\n\r\n")
    assert _read_all(s).startswith(b"HTTP/1.1 200 ")


def test_websockets_library_client(serve: Callable[..., str]) -> None:
    pytest.importorskip("websockets")
    from websockets.sync.client import unix_connect

    log: list[Any] = []
    done = threading.Event()
    addr = serve(make_ws_app(log, done))
    with unix_connect(addr, uri="ws://localhost/ws", subprotocols=["chat"], max_size=None, open_timeout=TIMEOUT) as ws:
        assert ws.subprotocol == "chat"
        ws.send("hello")
        assert ws.recv(timeout=TIMEOUT) == "hello"
        big = os.urandom(1_000_000)
        ws.send(big)
        assert ws.recv(timeout=TIMEOUT) == big
        assert ws.ping().wait(TIMEOUT)
    assert done.wait(TIMEOUT)
    assert log[-1] == ("disconnect", 1000)

"""The in-container HTTP/1.1 server of web endpoints: ASGI 3 (http, websocket, lifespan)
and WSGI apps, on a listening unix socket that the worker's reverse proxy connects to.

Standard library only (it runs on arbitrary images) and light to import: asyncio here,
anything else (hashlib, base64, urllib.parse, concurrent.futures, traceback) lazily.

One ``asyncio.Protocol`` per connection buffers what arrives; one task per connection
parses requests and runs the app on them one after the other (keep-alive; pipelined
requests wait their turn). The app runs in that task (no thread hop for ASGI); a
connection lost while it runs resolves ``_Conn.lost``, which ``receive()`` turns into
``http.disconnect``. Sends after a disconnect are ignored for HTTP (ASGI spec 2.3) and
raise ``ClientDisconnected`` (an OSError) for websockets.

``scope["path"]`` is ``root_path`` (``x-forwarded-prefix``, which the proxy strips) plus
the path that arrived, as the ASGI spec asks and Starlette expects (its routing strips
``root_path`` again, its ``request.url`` uses ``path`` alone); WSGI gets the prefix as
``SCRIPT_NAME`` and the path that arrived as ``PATH_INFO``.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import sys
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor
    from typing import Any, Callable

    Message = dict[str, Any]

MAX_HEAD = 64 * 1024
BODY_CHUNK = 64 * 1024
READ_HIGH = 1 << 20  # pause reading when this much is buffered and unread
DRAIN_LIMIT = 1 << 20  # unread request body discarded for keep-alive; more closes
WS_MAX_MESSAGE = 16 * 1024 * 1024
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HEX = b"0123456789abcdefABCDEF"
_REASONS: dict[int, bytes] = {200: b"OK", 404: b"Not Found", 500: b"Internal Server Error"}


class ClientDisconnected(OSError):
    """A websocket send after the client went away."""


class _Closed(Exception):
    """The connection is gone (or must go): stop serving it."""


class _BadRequest(Exception):
    pass


def listen_socket(path: str) -> socket.socket:
    """A non-blocking listening AF_UNIX stream socket at ``path`` ("@name": abstract)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if path.startswith("@"):
            sock.bind("\0" + path[1:])
        else:
            import stat

            try:
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass
            sock.bind(path)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _reason(status: int) -> bytes:
    r = _REASONS.get(status)
    if r is None:
        from http import HTTPStatus

        try:
            r = HTTPStatus(status).phrase.encode()
        except ValueError:
            r = b""
        _REASONS[status] = r
    return r


def _simple(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n%s" % (
        status,
        _reason(status),
        len(body),
        extra,
        body,
    )


def _print_exc(what: str) -> None:
    import traceback

    print(f"flare web: {what}", file=sys.stderr)
    traceback.print_exc()


def _decode_path(raw: bytes) -> str:
    if b"%" in raw:
        from urllib.parse import unquote_to_bytes

        raw = unquote_to_bytes(raw)
    return raw.decode("utf-8", "replace")


def _unmask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    m = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(m, "little")).to_bytes(n, "little")


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


class _Request:
    """A parsed request head."""

    __slots__ = (
        "chunked",
        "client",
        "expect",
        "headers",
        "host",
        "http11",
        "keep_alive",
        "length",
        "method",
        "query",
        "raw_path",
        "root_path",
        "scheme",
        "upgrade",
        "ws_key",
        "ws_protocols",
        "ws_version",
    )

    def __init__(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise _BadRequest("bad request line")
        method, target, version = parts
        if version == b"HTTP/1.1":
            self.http11 = True
        elif version == b"HTTP/1.0":
            self.http11 = False
        else:
            raise _BadRequest("bad version")
        if not method or method.translate(None, _TOKEN):
            raise _BadRequest("bad method")
        self.method = method.decode("ascii").upper()
        if target[:1] == b"/":
            raw = target
        elif target == b"*":
            raw = b"*"
        elif target.startswith((b"http://", b"https://")):
            i = target.find(b"/", target.find(b"//") + 2)
            raw = target[i:] if i >= 0 else b"/"
        else:
            raise _BadRequest("bad target")
        self.raw_path, _, self.query = raw.partition(b"?")
        headers: list[tuple[bytes, bytes]] = []
        length = -1
        te = b""
        conn = b""
        self.upgrade = b""
        self.expect = False
        self.host = b""
        self.scheme = "http"
        self.root_path = ""
        self.client: list[Any] | None = None
        self.ws_key = b""
        self.ws_version = b""
        self.ws_protocols: list[str] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or b" " in name or b"\t" in name:
                raise _BadRequest("bad header")
            name = name.lower()
            value = value.strip(b" \t")
            headers.append((name, value))
            if name == b"content-length":
                if not value.isdigit() or (length >= 0 and int(value) != length):
                    raise _BadRequest("bad content-length")
                length = int(value)
            elif name == b"transfer-encoding":
                te = te + b"," + value.lower() if te else value.lower()
            elif name == b"connection":
                conn = conn + b"," + value.lower() if conn else value.lower()
            elif name == b"host":
                self.host = value
            elif name == b"expect":
                self.expect = value.lower() == b"100-continue"
            elif name == b"upgrade":
                self.upgrade = value.lower()
            elif name == b"x-forwarded-proto":
                self.scheme = value.decode("latin-1").strip().lower() or "http"
            elif name == b"x-forwarded-prefix":
                self.root_path = _decode_path(value.rstrip(b"/"))
            elif name == b"x-forwarded-for":
                if self.client is None:
                    self.client = [value.split(b",", 1)[0].strip().decode("latin-1"), 0]
            elif name == b"sec-websocket-key":
                self.ws_key = value
            elif name == b"sec-websocket-version":
                self.ws_version = value
            elif name == b"sec-websocket-protocol":
                self.ws_protocols += [p.strip() for p in value.decode("latin-1").split(",") if p.strip()]
        self.headers = headers
        tokens = [t.strip() for t in conn.split(b",")] if conn else []
        if self.http11:
            self.keep_alive = b"close" not in tokens
        else:
            self.keep_alive = b"keep-alive" in tokens
        self.chunked = False
        if te:
            codings = [c.strip() for c in te.split(b",")]
            if codings != [b"chunked"]:
                raise _BadRequest("unsupported transfer-encoding")
            self.chunked = True
            self.keep_alive = False if length >= 0 else self.keep_alive  # both: suspicious, close after
            length = -1
        self.length = max(length, 0)
        if not self.upgrade or b"upgrade" not in tokens:
            self.upgrade = b""

    @property
    def path(self) -> str:
        return self.root_path + _decode_path(self.raw_path)



def _scope(req: _Request, kind: str, scheme: str) -> dict[str, Any]:
    """The ASGI scope fields HTTP and WebSocket requests share."""
    return {
        "type": kind,
        "asgi": _ASGI,
        "http_version": "1.1" if req.http11 else "1.0",
        "scheme": scheme,
        "path": req.path,
        "raw_path": req.root_path.encode("utf-8") + req.raw_path if req.root_path else req.raw_path,
        "query_string": req.query,
        "root_path": req.root_path,
        "headers": req.headers,
        "client": req.client,
        "server": None,
    }

class _Body:
    """The request body, read from the connection on demand (Content-Length or chunked)."""

    __slots__ = ("chunk_left", "chunked", "conn", "done", "expect", "remaining")

    def __init__(self, conn: _Conn, req: _Request) -> None:
        self.conn = conn
        self.chunked = req.chunked
        self.remaining = req.length
        self.chunk_left = 0
        self.done = not self.chunked and self.remaining == 0
        self.expect = req.expect and req.http11 and not self.done

    async def read(self, n: int = BODY_CHUNK) -> bytes:
        """Up to ``n`` bytes of the body; b"" only when it is done."""
        conn = self.conn
        if self.done:
            return b""
        if self.expect:
            self.expect = False
            conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        buf = conn.buf
        if not self.chunked:
            if not buf:
                await conn.more()
            take = min(self.remaining, n, len(buf))
            data = bytes(buf[:take])
            del buf[:take]
            self.remaining -= take
            if not self.remaining:
                self.done = True
            return data
        if not self.chunk_left:
            line = await conn.read_line(4096)
            size = line.split(b";", 1)[0].strip(b" \t")
            if not size or size.translate(None, _HEX):
                raise _BadRequest("bad chunk size")
            self.chunk_left = int(size, 16)
            if not self.chunk_left:
                while await conn.read_line(MAX_HEAD):  # trailers
                    pass
                self.done = True
                return b""
        if not buf:
            await conn.more()
        take = min(self.chunk_left, n, len(buf))
        data = bytes(buf[:take])
        del buf[:take]
        self.chunk_left -= take
        if not self.chunk_left and await conn.read_exact(2) != b"\r\n":
            raise _BadRequest("bad chunk end")
        return data


class _HTTPCycle:
    """One request/response: the ASGI ``receive`` and ``send`` of an http scope."""

    __slots__ = (
        "bad",
        "body",
        "bytes_out",
        "chunked",
        "complete",
        "conn",
        "content_length",
        "head_only",
        "head_written",
        "headers",
        "http11",
        "keep_alive",
        "request_done",
        "started",
        "status",
        "waiter",
    )

    def __init__(self, conn: _Conn, req: _Request, body: _Body) -> None:
        self.conn = conn
        self.body = body
        self.http11 = req.http11
        self.keep_alive = req.keep_alive and not conn.server._stopping
        self.head_only = req.method == "HEAD"
        self.started = False
        self.head_written = False
        self.complete = False
        self.chunked = False
        self.request_done = False
        self.bad = False
        self.status = 0
        self.headers: Any = ()
        self.bytes_out = 0
        self.content_length = -1
        self.waiter: asyncio.Future[None] | None = None

    async def receive(self) -> Message:
        conn = self.conn
        body = self.body
        if not self.request_done:
            if conn.eof and not conn.buf:
                self.request_done = True
                self.keep_alive = False
                return {"type": "http.disconnect"}
            try:
                data = await body.read()
            except (_Closed, _BadRequest) as e:
                self.request_done = True
                self.keep_alive = False
                self.bad = isinstance(e, _BadRequest)
                return {"type": "http.disconnect"}
            if body.done:
                self.request_done = True
            return {"type": "http.request", "body": data, "more_body": not body.done}
        if not self.complete and not conn.eof:
            fut = self.waiter
            if fut is None:
                fut = self.waiter = conn.loop.create_future()
            await asyncio.wait((fut, conn.lost), return_when=asyncio.FIRST_COMPLETED)
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        t = message["type"]
        if t == "http.response.body":
            if not self.started:
                raise RuntimeError("http.response.body before http.response.start")
            if self.complete:
                return
            data = message.get("body", b"")
            more = message.get("more_body", False)
            conn = self.conn
            if not more:
                self.complete = True
                if self.waiter is not None and not self.waiter.done():
                    self.waiter.set_result(None)
            if conn.eof:
                return
            self.bytes_out += len(data)
            if not self.head_written:
                conn.write(self._head(data, more))
            elif self.head_only:
                pass
            elif self.chunked:
                if data:
                    conn.write(b"%x\r\n%s\r\n" % (len(data), data) if more else b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
                elif not more:
                    conn.write(b"0\r\n\r\n")
            elif data:
                conn.write(data)
            if not more and self.content_length >= 0 and self.bytes_out != self.content_length and not self.head_only:
                self.keep_alive = False
            if conn.write_paused:
                await conn.drain()
        elif t == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            self.status = int(message["status"])
            self.headers = message.get("headers", ())
        elif t == "http.response.trailers":
            pass
        else:
            raise RuntimeError(f"unexpected ASGI message {t!r} in an http scope")

    def _head(self, data: bytes, more: bool) -> bytes:
        status = self.status
        out = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
        for name, value in self.headers:
            if isinstance(name, str):
                name = name.encode("latin-1")
            if isinstance(value, str):
                value = value.encode("latin-1")
            if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
                raise RuntimeError("invalid response header")
            lname = name.lower()
            if lname == b"content-length":
                self.content_length = int(value)
            elif lname == b"connection":
                if b"close" in value.lower():
                    self.keep_alive = False
                continue
            elif lname == b"transfer-encoding":
                continue
            out.append(b"%s: %s\r\n" % (name, value))
        no_body = self.head_only or status < 200 or status in (204, 304)
        if no_body:
            if not self.head_only:
                self.content_length = -1
            data = b""
        elif self.content_length >= 0:
            pass
        elif not more:
            self.content_length = len(data)
            out.append(b"content-length: %d\r\n" % len(data))
        elif self.http11:
            self.chunked = True
            out.append(b"transfer-encoding: chunked\r\n")
            if data:
                data = b"%x\r\n%s\r\n" % (len(data), data)
        else:
            self.keep_alive = False  # close-delimited
        if self.conn.server._stopping:
            self.keep_alive = False
        if not self.keep_alive:
            out.append(b"connection: close\r\n")
        elif not self.http11:
            out.append(b"connection: keep-alive\r\n")
        out.append(b"\r\n")
        if data:
            out.append(data)
        if no_body:
            self.head_only = True
        self.head_written = True
        return b"".join(out)


class _WebSocket:
    """The ASGI ``receive`` and ``send`` of a websocket scope."""

    def __init__(self, conn: _Conn, req: _Request) -> None:
        self.conn = conn
        self.req = req
        self.connect_delivered = False
        self.accepted = False
        self.rejected = False
        self.close_sent = False
        self.gone = False
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.space: asyncio.Future[None] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.status = 0
        self.bytes_out = 0
        self.disconnect: Message | None = None

    async def receive(self) -> Message:
        if not self.connect_delivered:
            self.connect_delivered = True
            return {"type": "websocket.connect"}
        if not self.accepted:
            if self.rejected:
                return {"type": "websocket.disconnect", "code": 1006}
            await self.conn.lost
            return {"type": "websocket.disconnect", "code": 1006}
        if self.disconnect is not None and self.queue.empty():
            return self.disconnect
        msg = await self.queue.get()
        if self.space is not None and not self.space.done():
            self.space.set_result(None)
        if msg["type"] == "websocket.disconnect":
            self.disconnect = msg
        return msg

    async def send(self, message: Message) -> None:
        t = message["type"]
        conn = self.conn
        if t == "websocket.send":
            if not self.accepted:
                raise RuntimeError("websocket.send before websocket.accept")
            if self.close_sent or conn.eof:
                raise ClientDisconnected("the websocket is closed")
            data = message.get("bytes")
            if data is not None:
                frame = _ws_frame(2, data)
            else:
                frame = _ws_frame(1, message.get("text", "").encode("utf-8"))
            self.bytes_out += len(frame)
            conn.write(frame)
            if conn.write_paused:
                await conn.drain()
        elif t == "websocket.accept":
            if self.accepted or self.rejected:
                raise RuntimeError("websocket.accept out of order")
            import base64
            import hashlib

            accept = base64.b64encode(hashlib.sha1(self.req.ws_key + WS_GUID).digest())
            out = [
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: %s\r\n"
                % accept
            ]
            sub = message.get("subprotocol")
            if sub:
                out.append(b"sec-websocket-protocol: %s\r\n" % sub.encode("latin-1"))
            for name, value in message.get("headers", ()):
                if isinstance(name, str):
                    name = name.encode("latin-1")
                if isinstance(value, str):
                    value = value.encode("latin-1")
                if b"\n" in value or b"\r" in value or name.lower() in (b"sec-websocket-protocol", b"upgrade", b"connection"):
                    continue
                out.append(b"%s: %s\r\n" % (name, value))
            out.append(b"\r\n")
            conn.write(b"".join(out))
            self.accepted = True
            self.status = 101
            self.reader = conn.loop.create_task(self._read())
        elif t == "websocket.close":
            if not self.accepted:
                if not self.rejected:
                    self.rejected = True
                    self.status = 403
                    conn.write(_simple(403, b"Forbidden"))
                return
            if self.close_sent or conn.eof:
                return
            self.close_sent = True
            code = int(message.get("code") or 1000)
            reason = (message.get("reason") or "").encode("utf-8")[:123]
            conn.write(_ws_frame(8, code.to_bytes(2, "big") + reason))
        else:
            raise RuntimeError(f"unexpected ASGI message {t!r} in a websocket scope")

    def _fail(self, code: int) -> None:
        if not self.close_sent and not self.conn.eof:
            self.close_sent = True
            self.conn.write(_ws_frame(8, code.to_bytes(2, "big")))

    async def _read(self) -> None:
        conn = self.conn
        queue = self.queue
        code = 1006
        op_msg = 0
        parts: list[bytes] = []
        size = 0
        try:
            while True:
                h = await conn.read_exact(2)
                b0, b1 = h[0], h[1]
                fin = b0 & 0x80
                op = b0 & 0x0F
                n = b1 & 0x7F
                if b0 & 0x70 or not b1 & 0x80:
                    code = 1002
                    break
                if n == 126:
                    n = int.from_bytes(await conn.read_exact(2), "big")
                elif n == 127:
                    n = int.from_bytes(await conn.read_exact(8), "big")
                if op >= 8:
                    if n > 125 or not fin:
                        code = 1002
                        break
                elif size + n > WS_MAX_MESSAGE:
                    code = 1009
                    break
                mask = await conn.read_exact(4)
                payload = _unmask(await conn.read_exact(n), mask) if n else b""
                if op == 8:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    if not self.close_sent and not conn.eof:
                        self.close_sent = True
                        conn.write(_ws_frame(8, payload[:2]))
                    code = -code  # a clean close: nothing more to send
                    break
                if op == 9:
                    if not conn.eof:
                        conn.write(_ws_frame(10, payload))
                    continue
                if op == 10:
                    continue
                if op == 0:
                    if not op_msg:
                        code = 1002
                        break
                    parts.append(payload)
                elif op in (1, 2):
                    if op_msg:
                        code = 1002
                        break
                    op_msg = op
                    parts = [payload]
                else:
                    code = 1002
                    break
                size += n
                if not fin:
                    continue
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                parts = []
                size = 0
                if op_msg == 1:
                    try:
                        text = data.decode("utf-8")
                    except UnicodeDecodeError:
                        op_msg = 0
                        code = 1007
                        break
                    msg: Message = {"type": "websocket.receive", "text": text}
                else:
                    msg = {"type": "websocket.receive", "bytes": data}
                op_msg = 0
                while queue.qsize() >= 64:
                    self.space = conn.loop.create_future()
                    await self.space
                queue.put_nowait(msg)
        except _Closed:
            code = 1006
        finally:
            if code > 0 and code != 1006:
                self._fail(code)
            self.gone = True
            queue.put_nowait({"type": "websocket.disconnect", "code": abs(code)})
            conn.close()


class _Conn(asyncio.Protocol):
    """One connection: its buffer, its flow control and the task that serves it."""

    def __init__(self, server: WebServer) -> None:
        self.server = server
        loop = server._loop
        assert loop is not None
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.waiter: asyncio.Future[None] | None = None
        self.read_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[None] = loop.create_future()
        self.idle = True
        self.task: asyncio.Task[None] | None = None

    # -- protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._conns.add(self)
        self.task = self.loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > READ_HIGH and not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # a half-close is a disconnect

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        for w in (self.waiter, self.drain_waiter):
            if w is not None and not w.done():
                w.set_result(None)
        self.waiter = self.drain_waiter = None
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        w = self.drain_waiter
        if w is not None:
            self.drain_waiter = None
            if not w.done():
                w.set_result(None)

    # -- reading and writing
    async def more(self) -> None:
        """Wait for more bytes; _Closed when the peer is gone."""
        if self.eof:
            raise _Closed
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()
        fut = self.waiter = self.loop.create_future()
        await fut
        if self.eof and not self.buf:
            raise _Closed

    async def read_exact(self, n: int) -> bytes:
        buf = self.buf
        while len(buf) < n:
            if self.eof:
                raise _Closed
            await self.more()
        data = bytes(buf[:n])
        del buf[:n]
        return data

    async def read_line(self, limit: int) -> bytes:
        buf = self.buf
        start = 0
        while True:
            i = buf.find(b"\r\n", start)
            if i >= 0:
                line = bytes(buf[:i])
                del buf[: i + 2]
                return line
            if len(buf) > limit:
                raise _BadRequest("line too long")
            start = max(0, len(buf) - 1)
            if self.eof:
                raise _Closed
            await self.more()

    def write(self, data: bytes) -> None:
        if not self.eof and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.write_paused and not self.eof:
            fut = self.drain_waiter = self.loop.create_future()
            await fut

    def close(self) -> None:
        self.eof = True
        if self.transport is not None:
            self.transport.close()

    # -- serving
    async def _read_head(self) -> bytes | None:
        buf = self.buf
        start = 0
        while True:
            while buf[:2] == b"\r\n":
                del buf[:2]
            i = buf.find(b"\r\n\r\n", start)
            if i >= 0:
                if i > MAX_HEAD:
                    break
                head = bytes(buf[:i])
                del buf[: i + 4]
                return head
            if len(buf) > MAX_HEAD:
                break
            if self.eof:
                return None
            start = max(0, len(buf) - 3)
            try:
                await self.more()
            except _Closed:
                return None
        self.write(_simple(431, b"Request Header Fields Too Large"))
        return None

    async def _serve(self) -> None:
        server = self.server
        try:
            while not self.eof:
                self.idle = True
                head = await self._read_head()
                if head is None:
                    break
                self.idle = False
                try:
                    req = _Request(head)
                except _BadRequest:
                    self.write(_simple(400, b"Bad Request"))
                    break
                except Exception:  # noqa: BLE001
                    self.write(_simple(400, b"Bad Request"))
                    break
                if req.upgrade == b"websocket" and server.kind == "asgi":
                    await self._websocket(req)
                    break
                # any other upgrade (h2c, a websocket for a WSGI app) is ignored: plain HTTP
                if not await self._http(req) or server._stopping:
                    break
        except _Closed:
            pass
        except Exception:  # noqa: BLE001
            _print_exc("connection failed")
        finally:
            self.close()
            server._conns.discard(self)

    async def _http(self, req: _Request) -> bool:
        server = self.server
        body = _Body(self, req)
        cycle = _HTTPCycle(self, req, body)
        t0 = time.perf_counter()
        error: str | None = None
        try:
            async with server._sem:
                if server.kind == "asgi":
                    scope = _scope(req, "http", req.scheme)
                    scope["method"] = req.method
                    if server._state is not None:
                        scope["state"] = dict(server._state)
                    await server.app(scope, cycle.receive, cycle.send)
                else:
                    await self._wsgi(req, cycle)
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
            cycle.keep_alive = False
            if cycle.bad or self.eof:
                pass  # the app failed on the http.disconnect of a broken request or a gone client
            elif not isinstance(e, ClientDisconnected):
                _print_exc(f"the app failed on {req.method} {req.path}")
            if cycle.bad and not cycle.head_written:
                cycle.status = 400
                self.write(_simple(400, b"Bad Request"))
            elif not cycle.head_written:
                cycle.status = 500
                self.write(_simple(500, b"Internal Server Error"))
        else:
            if not cycle.complete:
                cycle.keep_alive = False
                if not cycle.head_written:
                    error = "the app returned without a complete response"
                    print(f"flare web: {error} ({req.method} {req.path})", file=sys.stderr)
                    cycle.status = 500
                    self.write(_simple(500, b"Internal Server Error"))
        keep = cycle.keep_alive and not self.eof
        if keep and not body.done:
            if body.expect:
                keep = False  # the client waits for 100 Continue: it won't send the body
            else:
                try:
                    left = DRAIN_LIMIT
                    while not body.done and left > 0:
                        left -= len(await body.read())
                    keep = body.done
                except (_Closed, _BadRequest):
                    keep = False
        if server._on_request is not None:
            server._report(req, "http", cycle.status, cycle.bytes_out, t0, error)
        return keep

    async def _websocket(self, req: _Request) -> None:
        server = self.server
        if not req.ws_key or req.ws_version != b"13":
            self.write(_simple(426, b"Upgrade Required", b"sec-websocket-version: 13\r\n"))
            return
        ws = _WebSocket(self, req)
        t0 = time.perf_counter()
        error: str | None = None
        scope = _scope(req, "websocket", "wss" if req.scheme in ("https", "wss") else "ws")
        scope["subprotocols"] = req.ws_protocols
        if server._state is not None:
            scope["state"] = dict(server._state)
        try:
            async with server._sem:
                await server.app(scope, ws.receive, ws.send)
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
            if not isinstance(e, ClientDisconnected):
                _print_exc(f"the app failed on websocket {req.path}")
            if not ws.accepted and not ws.rejected:
                ws.status = 500
                self.write(_simple(500, b"Internal Server Error"))
            elif ws.accepted:
                ws._fail(1011)
        else:
            if not ws.accepted and not ws.rejected:
                ws.status = 403
                self.write(_simple(403, b"Forbidden"))
            elif ws.accepted:
                ws._fail(1000)
        reader = ws.reader
        if reader is not None and not reader.done():
            try:
                await asyncio.wait_for(asyncio.shield(reader), 1.0)  # the client's close frame
            except asyncio.TimeoutError:
                reader.cancel()
        if server._on_request is not None:
            server._report(req, "websocket", ws.status, ws.bytes_out, t0, error)

    async def _wsgi(self, req: _Request, cycle: _HTTPCycle) -> None:
        body = cycle.body
        chunks = []
        try:
            while not body.done:
                chunks.append(await body.read())
        except (_Closed, _BadRequest):
            cycle.keep_alive = False
            cycle.complete = True
            return
        cycle.request_done = True
        data = b"".join(chunks)
        host = req.host.decode("latin-1")
        default_port = "443" if req.scheme == "https" else "80"
        if host.startswith("["):
            name, _, rest = host.partition("]")
            name += "]"
            port = rest[1:] if rest.startswith(":") else default_port
        else:
            name, sep, port = host.partition(":")
            if not sep:
                port = default_port
        from urllib.parse import unquote_to_bytes

        environ: dict[str, Any] = {
            "REQUEST_METHOD": req.method,
            "SCRIPT_NAME": req.root_path,
            "PATH_INFO": unquote_to_bytes(req.raw_path).decode("latin-1"),
            "QUERY_STRING": req.query.decode("latin-1"),
            "SERVER_NAME": name or "localhost",
            "SERVER_PORT": port or default_port,
            "SERVER_PROTOCOL": "HTTP/1.1" if req.http11 else "HTTP/1.0",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": req.scheme,
            "wsgi.input": io.BytesIO(data),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
        }
        if req.client is not None:
            environ["REMOTE_ADDR"] = req.client[0]
            environ["REMOTE_PORT"] = "0"
        for hname, hvalue in req.headers:
            if hname == b"content-type":
                environ["CONTENT_TYPE"] = hvalue.decode("latin-1")
                continue
            if hname in (b"content-length", b"transfer-encoding"):
                continue
            key = "HTTP_" + hname.decode("latin-1").upper().replace("-", "_")
            v = hvalue.decode("latin-1")
            environ[key] = environ[key] + "," + v if key in environ else v
        if data or req.length or req.chunked:
            environ["CONTENT_LENGTH"] = str(len(data))
        loop = self.loop
        await loop.run_in_executor(self.server._executor(), _run_wsgi, self.server.app, environ, cycle, loop)


async def _wsgi_send(cycle: _HTTPCycle, start: tuple[int, list[tuple[bytes, bytes]]] | None, data: bytes, more: bool) -> bool:
    if start is not None:
        await cycle.send({"type": "http.response.start", "status": start[0], "headers": start[1]})
    await cycle.send({"type": "http.response.body", "body": data, "more_body": more})
    return not cycle.conn.eof


def _run_wsgi(app: Any, environ: dict[str, Any], cycle: _HTTPCycle, loop: asyncio.AbstractEventLoop) -> None:
    """Runs in a worker thread: the WSGI app, its chunks sent through the loop as produced."""
    state: dict[str, Any] = {"start": None, "sent": False}

    def emit(data: bytes, more: bool) -> None:
        start = None
        if not state["sent"]:
            if state["start"] is None:
                raise RuntimeError("the WSGI app sent a body before start_response()")
            start = state["start"]
            state["sent"] = True
        ok = asyncio.run_coroutine_threadsafe(_wsgi_send(cycle, start, data, more), loop).result()
        if not ok and more:
            raise ClientDisconnected("the client went away")

    def write(data: bytes) -> None:
        if data:
            emit(data, True)

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if state["sent"]:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif state["start"] is not None:
            raise RuntimeError("start_response() called twice without exc_info")
        code = int(status.split(" ", 1)[0])
        state["start"] = (code, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers])
        return write

    result = app(environ, start_response)
    try:
        if isinstance(result, (list, tuple)):
            emit(b"".join(result), False)
        else:
            for chunk in result:
                if chunk:
                    emit(chunk, True)
            emit(b"", False)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()


class WebServer:
    """Serves an ASGI or WSGI app on a listening socket, from a loop in a daemon thread."""

    def __init__(
        self,
        app: Any,
        kind: str,
        sock: socket.socket,
        *,
        max_concurrency: int = 1000,
        wsgi_threads: int = 8,
        on_request: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if kind not in ("asgi", "wsgi"):
            raise ValueError(f"kind must be 'asgi' or 'wsgi', not {kind!r}")
        self.app = app
        self.kind = kind
        self.sock = sock
        self.max_concurrency = max(1, max_concurrency)
        self.wsgi_threads = max(1, wsgi_threads)
        self._on_request = on_request
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Conn] = set()
        self._stopping = False
        self._state: dict[str, Any] | None = None
        self._sem: asyncio.Semaphore = None  # type: ignore[assignment]  # made on the loop
        self._pool: ThreadPoolExecutor | None = None
        self._lifespan_task: asyncio.Task[None] | None = None
        self._lifespan_shutdown: asyncio.Future[None] | None = None
        self._lifespan_done: asyncio.Future[None] | None = None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.wsgi_threads, thread_name_prefix="flare-wsgi")
        return self._pool

    def _report(self, req: _Request, kind: str, status: int, bytes_out: int, t0: float, error: str | None) -> None:
        """Tells ``on_request`` about a finished request (``t0``: its ``perf_counter`` start)."""
        assert self._on_request is not None
        info = {
            "method": req.method,
            "path": req.path,
            "status": status,
            "duration_ms": (time.perf_counter() - t0) * 1000.0,
            "bytes_out": bytes_out,
            "kind": kind,
            "error": error,
        }
        try:
            self._on_request(info)
        except Exception:  # noqa: BLE001
            _print_exc("on_request failed")

    # -- lifecycle
    def start(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._startup())
            except BaseException as e:  # noqa: BLE001
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                try:
                    for task in asyncio.all_tasks(loop):
                        task.cancel()
                    loop.run_until_complete(asyncio.sleep(0))
                finally:
                    loop.close()

        self._thread = threading.Thread(target=run, name="flare-web", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            e = failure[0]
            raise e if isinstance(e, RuntimeError) else RuntimeError(f"the web server failed to start: {e!r}") from e

    async def _startup(self) -> None:
        loop = asyncio.get_running_loop()
        self._sem = asyncio.Semaphore(self.max_concurrency)
        if self.kind == "asgi":
            await self._lifespan_startup()
        self._server = await loop.create_unix_server(lambda: _Conn(self), sock=self.sock)

    async def _lifespan_startup(self) -> None:
        loop = asyncio.get_running_loop()
        state: dict[str, Any] = {}
        started: asyncio.Future[str | None] = loop.create_future()  # None: ok; else why not
        shutdown = self._lifespan_shutdown = loop.create_future()
        done = self._lifespan_done = loop.create_future()
        asked = [False]

        async def receive() -> Message:
            if not asked[0]:
                asked[0] = True
                return {"type": "lifespan.startup"}
            await shutdown
            return {"type": "lifespan.shutdown"}

        async def send(message: Message) -> None:
            t = message["type"]
            if t == "lifespan.startup.complete":
                if not started.done():
                    started.set_result(None)
            elif t == "lifespan.startup.failed":
                if not started.done():
                    started.set_result("failed: " + str(message.get("message", "")))
            elif t in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                if t == "lifespan.shutdown.failed":
                    print(f"flare web: lifespan shutdown failed: {message.get('message', '')}", file=sys.stderr)
                if not done.done():
                    done.set_result(None)

        async def run() -> None:
            try:
                await self.app(
                    {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}, receive, send
                )
            except Exception:  # noqa: BLE001
                if started.done() and started.result() is None:
                    _print_exc("the app's lifespan failed")
            finally:
                if not started.done():
                    started.set_result("unsupported")
                if not done.done():
                    done.set_result(None)

        self._lifespan_task = loop.create_task(run())
        why = await started
        if why is None:
            self._state = state
        elif why.startswith("failed"):
            raise RuntimeError(f"the app's lifespan startup {why}")
        else:
            self._lifespan_shutdown = None  # unsupported: nothing to shut down

    def stop(self, timeout: float = 3.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(timeout), loop)
        try:
            fut.result(timeout + 5)
        except Exception:  # noqa: BLE001
            _print_exc("the web server's shutdown failed")
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout + 5)
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    async def _shutdown(self, timeout: float) -> None:
        self._stopping = True
        deadline = time.monotonic() + timeout
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            if c.idle:
                c.close()
        tasks = [c.task for c in self._conns if c.task is not None and not c.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        for c in list(self._conns):
            c.close()
            if c.task is not None:
                c.task.cancel()
        if self._lifespan_shutdown is not None and self._lifespan_done is not None:
            if not self._lifespan_shutdown.done():
                self._lifespan_shutdown.set_result(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._lifespan_done), max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                print("flare web: the app's lifespan shutdown timed out", file=sys.stderr)
        if self._lifespan_task is not None and not self._lifespan_task.done():
            self._lifespan_task.cancel()

"""HTTP/JSON transport to the Flare API (stdlib only).

One keep-alive ``http.client`` connection per thread; ``http://host:port`` and
``unix:///path/to.sock`` base URLs; error bodies mapped to ``flare.exception`` classes.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading

from . import exception

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterator

DEFAULT_SERVER_URL = "http://127.0.0.1:7878"

_ERROR_CLASSES: dict[str, type[exception.Error]] = {
    "resource_exhausted": exception.ResourceExhaustedError,
    "not_found": exception.NotFoundError,
    "invalid_argument": exception.InvalidError,
    "conflict": exception.ConflictError,
    "failed_precondition": exception.InvalidError,
    "internal": exception.ServerError,
    "unavailable": exception.ExecutionError,
    "payload_too_large": exception.PayloadTooLargeError,
    "unsupported_media_type": exception.InvalidError,
    "permission_denied": exception.InvalidError,
}

_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.BadStatusLine)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def configured_server_url() -> str | None:
    return os.environ.get("FLARE_SERVER_URL") or None


def server_url() -> str:
    return configured_server_url() or DEFAULT_SERVER_URL


def how_to_start_hint(url: str) -> str:
    return (
        f"Start one with `flare server start` (or `flared server --listen 127.0.0.1:7878`), "
        f"or point FLARE_SERVER_URL at a running server (currently {url})."
    )


class Client:
    """A client for one base URL. Thread-safe: each thread uses its own connection."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._local = threading.local()
        if self.url.startswith("unix://"):
            self._unix_path: str | None = self.url[len("unix://") :]
            self._host = "localhost"
            self._port = 0
        elif self.url.startswith("http://"):
            self._unix_path = None
            hostport = self.url[len("http://") :].split("/", 1)[0]
            host, _, port = hostport.rpartition(":")
            if not host:
                host, port = hostport, "80"
            self._host = host.strip("[]")
            self._port = int(port)
        else:
            raise exception.InvalidError(f"Unsupported server URL {url!r}: use http://HOST:PORT or unix:///PATH")

    def _new_connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._unix_path is not None:
            return _UnixHTTPConnection(self._unix_path, timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._new_connection(self.timeout)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(
        self, method: str, path: str, body: Any = None, timeout: float | None = None, content_type: str | None = None
    ) -> Any:
        """Send a request with a JSON body (dict), pre-encoded bytes or a binary file opened for
        reading (sent from its start, so a retried request resends it whole); return the decoded
        JSON. ``content_type`` overrides ``application/json`` for bytes and file bodies."""
        if body is None:
            data = None
            headers = {}
        else:
            if isinstance(body, bytes) or hasattr(body, "read"):
                data = body
            else:
                data = json.dumps(body, separators=(",", ":")).encode()
            headers = {"Content-Type": content_type or "application/json"}
            if hasattr(body, "read"):
                headers["Content-Length"] = str(_remaining_length(body))
        try:
            return self._request(method, path, data, headers, timeout)
        except exception.ConnectionError as e:
            # Whether the request may have reached the server (callers that recover from a
            # restarted server resubmit then; a server that was never reachable is reported).
            e.request_sent = self._local.__dict__.pop("sent", False)  # type: ignore[attr-defined]
            raise

    def _request(self, method: str, path: str, data: Any, headers: dict[str, str], timeout: float | None) -> Any:
        self._local.sent = False
        start = data.tell() if hasattr(data, "read") else None
        for attempt in (0, 1):
            if start is not None:
                data.seek(start)
            conn = self._connection()
            fresh = conn.sock is None
            try:
                if fresh:
                    conn.connect()
                if timeout is not None and conn.sock is not None:
                    conn.sock.settimeout(timeout)
                elif conn.sock is not None:
                    conn.sock.settimeout(self.timeout)
                self._local.sent = True
                _send(conn, method, path, data, headers)
                resp = conn.getresponse()
                raw = resp.read()
                status = resp.status
                if resp.will_close:
                    conn.close()
            except _STALE as e:
                conn.close()
                if fresh or attempt:
                    raise exception.ConnectionError(
                        f"Lost the connection to the Flare server at {self.url}: {e}"
                    ) from None
                continue  # a kept-alive connection the server had closed: retry once on a new one
            except (ConnectionRefusedError, FileNotFoundError, socket.gaierror) as e:
                conn.close()
                raise exception.ConnectionError(
                    f"Could not connect to the Flare server at {self.url} ({e.strerror or e}). "
                    + how_to_start_hint(self.url)
                ) from None
            except socket.timeout:
                conn.close()
                raise exception.ConnectionError(f"The Flare server at {self.url} did not answer in time") from None
            except OSError as e:
                conn.close()
                raise exception.ConnectionError(f"Error talking to the Flare server at {self.url}: {e}") from None
            break
        if 200 <= status < 300:
            return json.loads(raw) if raw else {}
        raise _error_from_response(status, raw, method, path)

    @contextlib.contextmanager
    def _streamed(
        self, method: str, path: str, data: bytes | None, headers: dict[str, str], timeout: float | None
    ) -> Iterator[http.client.HTTPResponse]:
        """A request on a connection of its own whose 2xx answer the caller reads as it
        arrives (``timeout`` bounds each read); the connection is closed at the end, and
        network failures while sending or reading become ConnectionError."""
        conn = self._new_connection(self.timeout)
        try:
            try:
                conn.connect()
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                _send(conn, method, path, data, headers)
                resp = conn.getresponse()
                if not 200 <= resp.status < 300:
                    raise _error_from_response(resp.status, resp.read(), method, path)
                yield resp
            except (ConnectionRefusedError, FileNotFoundError, socket.gaierror) as e:
                raise exception.ConnectionError(
                    f"Could not connect to the Flare server at {self.url} ({e.strerror or e}). "
                    + how_to_start_hint(self.url)
                ) from None
            except socket.timeout:
                raise exception.ConnectionError(f"The Flare server at {self.url} did not answer in time") from None
            except (http.client.HTTPException, OSError) as e:
                raise exception.ConnectionError(f"Lost the connection to the Flare server at {self.url}: {e}") from None
        finally:
            conn.close()

    def stream_ndjson(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Iterator[Any]:
        """Send a JSON request and yield each JSON line of a streamed ``application/x-ndjson``
        answer as it arrives. Uses a connection of its own, closed when the stream ends;
        ``timeout`` bounds the wait for each line (None: no bound)."""
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        with self._streamed(method, path, data, headers, timeout) as resp:
            while True:
                line = resp.readline()
                if not line:
                    return
                line = line.strip()
                if line:
                    yield json.loads(line)

    def stream_bytes(self, path: str, piece: int = 1 << 20, timeout: float | None = 600) -> Iterator[bytes]:
        """GET ``path`` and yield its binary answer in pieces of at most ``piece`` bytes as
        they arrive (never the whole body in memory). Uses a connection of its own, closed
        when the stream ends; ``timeout`` bounds the wait for each piece. A body cut short
        (the server failed mid-way) raises ConnectionError."""
        with self._streamed("GET", path, None, {}, timeout) as resp:
            expected = resp.getheader("Content-Length")
            got = 0
            while True:
                data = resp.read(piece)
                if not data:
                    break
                got += len(data)
                yield data
            if expected is not None and got != int(expected):
                raise exception.ConnectionError(f"The answer to GET {path} was cut short at {got} of {expected} bytes")


def _send(conn: http.client.HTTPConnection, method: str, path: str, data: Any, headers: dict[str, str]) -> None:
    """Send a request. A server that refuses a body it will not read (413: over a size limit)
    answers and closes while the body is still going out: then its answer is what counts,
    and ``getresponse()`` reads it."""
    try:
        conn.request(method, path, data, headers)
    except (BrokenPipeError, ConnectionResetError):
        if data is None or conn.sock is None:
            raise
        conn.sock.settimeout(5)


def _remaining_length(fh: Any) -> int:
    pos = fh.tell()
    end = fh.seek(0, os.SEEK_END)
    fh.seek(pos)
    return int(end - pos)


def _error_from_response(status: int, raw: bytes, method: str, path: str) -> exception.Error:
    code = None
    message = raw.decode(errors="replace")[:2000]
    try:
        err = json.loads(raw)["error"]
        code = err.get("code")
        message = err.get("message", message)
    except Exception:  # noqa: BLE001 - non-JSON error body
        pass
    cls = _ERROR_CLASSES.get(code or "")
    if cls is None:
        cls = {
            404: exception.NotFoundError,
            400: exception.InvalidError,
            409: exception.ConflictError,
            413: exception.PayloadTooLargeError,
        }.get(status, exception.ServerError)
    if cls is exception.ServerError:
        message = f"{method} {path} failed with HTTP {status}: {message}"
    return cls(message)


_clients: dict[str, Client] = {}
_clients_lock = threading.Lock()


def get_client(url: str | None = None) -> Client:
    """The shared client for ``url`` (default: FLARE_SERVER_URL or the local default)."""
    url = url or server_url()
    client = _clients.get(url)
    if client is None:
        with _clients_lock:
            client = _clients.get(url)
            if client is None:
                client = _clients[url] = Client(url)
    return client

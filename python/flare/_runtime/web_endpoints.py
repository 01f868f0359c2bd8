"""Starting a container's web endpoints before it reports READY (docs/PROTOCOL.md section 2).

The INIT header's ``function["web"]`` lists them (``flare/web_endpoints.py`` builds the
list). Endpoint ``i`` of kind ``asgi``/``wsgi``/``fastapi`` is served by ``web.py`` on the
abstract unix socket ``@flare-web-{i}``, where the worker's proxy connects; a ``server``
endpoint is the user's own server on a TCP port, and the container is ready once
something listens there. Any failure here is an INIT_FAILURE, like an import error.

Imported by the runner only for a function with web endpoints (``web.py``, asyncio and
``socket`` are paid by those alone). Standard library only (``fastapi`` is the user
image's, imported for a ``fastapi_endpoint`` alone).
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

# The socket of endpoint i is PREFIX + str(i); tests running several runners on one host
# (one network namespace) set their own prefix.
SOCKET_PREFIX_ENV = "FLARE_WEB_SOCKET_PREFIX"
DEFAULT_PREFIX = "@flare-web-"
DEFAULT_SERVER_STARTUP_TIMEOUT = 60.0
POLL_INTERVAL = 0.02

FASTAPI_MISSING = "fastapi_endpoint needs fastapi in the image: add .pip_install('fastapi[standard]')"


def socket_path(i: int) -> str:
    """Where endpoint ``i`` listens: ``@flare-web-{i}`` (an abstract unix socket)."""
    return (os.environ.get(SOCKET_PREFIX_ENV) or DEFAULT_PREFIX) + str(i)


def start(info: dict[str, Any], func: Callable[..., Any], instance: Any = None) -> list[Any]:
    """Start every endpoint of ``info["web"]``; the started ``WebServer``s (keep them, and
    ``stop()`` them at the end). ``instance``: the object of an ``@app.cls()`` class, whose
    methods the endpoints name (``method_name``)."""
    endpoints = info.get("web") or []
    max_inputs = max(1, int(info.get("max_inputs") or 1))
    servers: list[Any] = []
    try:
        for i, ep in enumerate(endpoints):
            server = _start_one(i, ep, func, instance, max_inputs)
            if server is not None:
                servers.append(server)
    except BaseException:
        stop(servers, 0.5)
        raise
    return servers


def _target(ep: dict[str, Any], func: Callable[..., Any], instance: Any) -> Callable[..., Any]:
    name = ep.get("method_name")
    if name:
        if instance is None:
            raise TypeError(f"web endpoint {name!r} names a method, but this container serves no class")
        target: Callable[..., Any] = getattr(instance, name)
        return target
    return func


def _start_one(i: int, ep: dict[str, Any], func: Callable[..., Any], instance: Any, max_inputs: int) -> Any:
    kind = ep.get("kind")
    target = _target(ep, func, instance)
    if kind == "server":
        target()
        port = int(ep["port"])
        timeout = ep.get("startup_timeout")
        wait_for_port(port, float(timeout) if timeout is not None else DEFAULT_SERVER_STARTUP_TIMEOUT)
        return None
    if kind == "fastapi":
        app = fastapi_app(target, ep)
        kind = "asgi"
    elif kind in ("asgi", "wsgi"):
        app = target()
        if app is None:
            what = "asgi_app" if kind == "asgi" else "wsgi_app"
            raise TypeError(f"the @flare.{what}() function {getattr(target, '__qualname__', '')} returned None, not an app")
    else:
        raise ValueError(f"unknown web endpoint kind {kind!r}")
    from . import web

    sock = web.listen_socket(socket_path(i))
    try:
        kwargs: dict[str, Any] = {"max_concurrency": max_inputs}
        if kind == "wsgi":
            kwargs["wsgi_threads"] = max(1, max_inputs)
        server = web.WebServer(app, kind, sock, **kwargs)
        server.start()
    except BaseException:
        sock.close()
        raise
    return server


def fastapi_app(fn: Callable[..., Any], ep: dict[str, Any]) -> Any:
    """A FastAPI app with ``fn`` as its one route (``/``, the endpoint's HTTP method)."""
    try:
        import fastapi
    except ImportError as e:
        raise ImportError(FASTAPI_MISSING) from e
    docs = bool(ep.get("docs"))
    app = fastapi.FastAPI(
        docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None
    )
    app.add_api_route("/", fn, methods=[str(ep.get("http_method") or "GET")])
    return app


def wait_for_port(port: int, timeout: float) -> None:
    """Return once a TCP connection to ``127.0.0.1:port`` succeeds; TimeoutError after ``timeout`` s."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=max(0.05, min(1.0, timeout))):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"web_server: nothing listens on port {port} after {timeout:g} s")
        time.sleep(POLL_INTERVAL)


def stop(servers: list[Any], timeout: float = 2.0) -> None:
    """Stop the servers (in-flight requests get up to ``timeout`` s)."""
    for server in servers:
        try:
            server.stop(timeout)
        except Exception:  # noqa: BLE001 - stopping must not fail the container's exit
            pass

"""Web endpoints (Modal's ``fastapi_endpoint``, ``web_endpoint``, ``asgi_app``,
``wsgi_app``, ``web_server``): a function, or a method of an ``@app.cls()`` class, served
over HTTP at a URL of the server's ingress (``http://<label>.localhost:7878/``).

Place them under ``@app.function()`` (and any ``@flare.concurrent()``)::

    @app.function()
    @flare.concurrent(max_inputs=100)
    @flare.asgi_app()
    def web():
        from fastapi import FastAPI
        ...

Each decorator validates its arguments now (a bad label or port fails at decoration) and
marks the raw function with its endpoint (``__flare_web__``, plain data); ``@app.function``
and ``@app.cls`` copy the marks into the function's definition (its ``"web"`` list), which
the runner reads to start the app's HTTP server before the container is ready
(``flare/_runtime/web_endpoints.py``).

Imported inside containers (user modules decorate at import time): nothing but the
exception module at module level.
"""

from __future__ import annotations

from . import exception

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable, TypeVar

    F = TypeVar("F")

# The attribute the decorators set on the raw function (the SDK reads it at registration).
WEB_ATTR = "__flare_web__"
KINDS = ("fastapi", "asgi", "wsgi", "server")
HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
MAX_LABEL = 63
MAX_STARTUP_TIMEOUT = 3600  # the server's limit (flare_api)


def check_label(label: Any) -> str | None:
    """``label`` if it is a valid DNS label (``[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?``) or None."""
    if label is None:
        return None
    if (
        not isinstance(label, str)
        or not 1 <= len(label) <= MAX_LABEL
        or not set(label) <= _LABEL_CHARS
        or label[0] == "-"
        or label[-1] == "-"
    ):
        raise exception.InvalidError(
            f"invalid web endpoint label {label!r}: a label is 1 to {MAX_LABEL} characters of lowercase "
            "letters, digits and '-', starting and ending with a letter or a digit (it becomes the "
            "first part of the endpoint's host name)"
        )
    return label


def _check_domains(custom_domains: Iterable[str] | None) -> list[str]:
    if custom_domains is None:
        return []
    if isinstance(custom_domains, str):
        raise exception.InvalidError("custom_domains must be a list of domain names, not a single string")
    out = []
    for d in custom_domains:
        if not isinstance(d, str) or not d or any(c.isspace() or c == "/" for c in d):
            raise exception.InvalidError(f"custom_domains: {d!r} is not a domain name")
        out.append(d.lower())
    return out


def _check_parentheses(value: Any, name: str) -> None:
    if value is not None:
        raise exception.InvalidError(f"@flare.{name} needs parentheses: write @flare.{name}()")


def _endpoint(
    kind: str,
    *,
    label: str | None,
    custom_domains: Iterable[str] | None,
    requires_proxy_auth: bool,
    http_method: str | None = None,
    docs: bool = False,
    port: int | None = None,
    startup_timeout: float | None = None,
) -> dict[str, Any]:
    """The endpoint as the definition's ``"web"`` list holds it (``method_name`` added later)."""
    if not isinstance(requires_proxy_auth, bool):
        raise exception.InvalidError(f"requires_proxy_auth must be True or False, got {requires_proxy_auth!r}")
    ep: dict[str, Any] = {
        "kind": kind,
        "label": check_label(label),
        "docs": bool(docs),
        "requires_proxy_auth": requires_proxy_auth,
        "custom_domains": _check_domains(custom_domains),
        "startup_timeout": startup_timeout,
    }
    if http_method is not None:
        ep["http_method"] = http_method
    if port is not None:
        ep["port"] = port
    return ep


def _mark(name: str, ep: dict[str, Any]) -> Callable[[F], F]:
    def wrapper(f: F) -> F:
        if getattr(f, "_is_flare_function", False) or getattr(f, "__flare_raw_f__", None) is not None:
            raise exception.InvalidError(
                f"@flare.{name}() must be placed under @app.function() (or on a method of an @app.cls() class), "
                "not above it"
            )
        if isinstance(f, type) or not callable(f):
            raise exception.InvalidError(f"@flare.{name}() must decorate a function or a method")
        qual = getattr(f, "__qualname__", "the function")
        if getattr(f, WEB_ATTR, None) is not None:
            raise exception.InvalidError(f"{qual} has two web endpoint decorators; a function serves one endpoint")
        if getattr(f, "__flare_batched__", None) is not None:
            raise exception.InvalidError(f"{qual} is @flare.batched(): it cannot also be a web endpoint")
        flags = getattr(getattr(f, "__code__", None), "co_flags", 0)
        if ep["kind"] != "fastapi" and flags & 0x2A0:  # CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR
            what = "the ASGI app" if ep["kind"] == "asgi" else "the WSGI app" if ep["kind"] == "wsgi" else "nothing"
            raise exception.InvalidError(
                f"@flare.{name}() decorates a plain (non-async, non-generator) function that returns {what}; "
                f"{qual} is async or a generator"
            )
        try:
            setattr(f, WEB_ATTR, dict(ep))
        except AttributeError:
            raise exception.InvalidError(f"@flare.{name}() cannot annotate this object") from None
        return f

    return wrapper


def fastapi_endpoint(
    _warn_parentheses_missing: Any = None,
    *,
    method: str = "GET",
    label: str | None = None,
    custom_domains: Iterable[str] | None = None,
    docs: bool = False,
    requires_proxy_auth: bool = False,
) -> Callable[[F], F]:
    """Serve the function as one FastAPI route (``/``, ``method``): its parameters are query
    parameters (or the JSON body, as FastAPI decides from their types). The image needs
    ``fastapi``. ``docs=True`` also serves ``/docs`` and ``/openapi.json``. The function can
    still be called with ``.remote()``."""
    _check_parentheses(_warn_parentheses_missing, "fastapi_endpoint")
    if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
        raise exception.InvalidError(f"method must be one of {', '.join(HTTP_METHODS)}, got {method!r}")
    ep = _endpoint(
        "fastapi", label=label, custom_domains=custom_domains, requires_proxy_auth=requires_proxy_auth,
        http_method=method.upper(), docs=docs,
    )
    return _mark("fastapi_endpoint", ep)


def web_endpoint(
    _warn_parentheses_missing: Any = None,
    *,
    method: str = "GET",
    label: str | None = None,
    custom_domains: Iterable[str] | None = None,
    docs: bool = False,
    requires_proxy_auth: bool = False,
) -> Callable[[F], F]:
    """The former name of :func:`fastapi_endpoint` (deprecated, as in Modal)."""
    import warnings

    warnings.warn(
        "flare.web_endpoint is deprecated: use flare.fastapi_endpoint (same parameters)", DeprecationWarning, stacklevel=2
    )
    _check_parentheses(_warn_parentheses_missing, "web_endpoint")
    return fastapi_endpoint(
        method=method, label=label, custom_domains=custom_domains, docs=docs, requires_proxy_auth=requires_proxy_auth
    )


def asgi_app(
    _warn_parentheses_missing: Any = None,
    *,
    label: str | None = None,
    custom_domains: Iterable[str] | None = None,
    requires_proxy_auth: bool = False,
) -> Callable[[F], F]:
    """Serve the ASGI app (FastAPI, Starlette, ...) the function returns. The function runs
    once per container, before it takes requests; ``@flare.concurrent(max_inputs=n)`` lets a
    container handle ``n`` requests at once."""
    _check_parentheses(_warn_parentheses_missing, "asgi_app")
    ep = _endpoint("asgi", label=label, custom_domains=custom_domains, requires_proxy_auth=requires_proxy_auth)
    return _mark("asgi_app", ep)


def wsgi_app(
    _warn_parentheses_missing: Any = None,
    *,
    label: str | None = None,
    custom_domains: Iterable[str] | None = None,
    requires_proxy_auth: bool = False,
) -> Callable[[F], F]:
    """Serve the WSGI app (Flask, Django, ...) the function returns, on ``max_inputs``
    threads (``@flare.concurrent``)."""
    _check_parentheses(_warn_parentheses_missing, "wsgi_app")
    ep = _endpoint("wsgi", label=label, custom_domains=custom_domains, requires_proxy_auth=requires_proxy_auth)
    return _mark("wsgi_app", ep)


def web_server(
    port: int,
    *,
    startup_timeout: float = 5.0,
    label: str | None = None,
    custom_domains: Iterable[str] | None = None,
    requires_proxy_auth: bool = False,
) -> Callable[[F], F]:
    """Serve whatever listens on ``port`` inside the container: the function starts it (a
    subprocess, a thread) and returns; the container is ready once a TCP connection to
    ``127.0.0.1:port`` succeeds, and fails to start if none does within ``startup_timeout``
    seconds."""
    if callable(port):
        raise exception.InvalidError("@flare.web_server needs the port: write @flare.web_server(8000)")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise exception.InvalidError(f"web_server port must be an int from 1 to 65535, got {port!r}")
    if (
        not isinstance(startup_timeout, (int, float))
        or isinstance(startup_timeout, bool)
        or not 0 < startup_timeout <= MAX_STARTUP_TIMEOUT
    ):
        raise exception.InvalidError(
            f"startup_timeout must be a number of seconds above 0 and at most {MAX_STARTUP_TIMEOUT}, got {startup_timeout!r}"
        )
    ep = _endpoint(
        "server", label=label, custom_domains=custom_domains, requires_proxy_auth=requires_proxy_auth,
        port=port, startup_timeout=float(startup_timeout),
    )
    return _mark("web_server", ep)


def web_of(f: Any) -> dict[str, Any] | None:
    """The endpoint a decorator above marked ``f`` with (a copy), else None."""
    ep = getattr(f, WEB_ATTR, None)
    return dict(ep) if isinstance(ep, dict) else None

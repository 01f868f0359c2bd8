"""Modal's ``modal.partial_function``: its decorators, Flare's own (``asgi_app``, ``batched``,
``concurrent``, ``enter``, ``exit``, ``fastapi_endpoint``, ``method``, ``web_endpoint``,
``web_server``, ``wsgi_app``); one Flare lacked would raise ``ImportError`` saying so."""

from __future__ import annotations

from . import _compat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MODAL_NAMES = (
    "asgi_app",
    "batched",
    "concurrent",
    "enter",
    "exit",
    "fastapi_endpoint",
    "method",
    "web_endpoint",
    "web_server",
    "wsgi_app",
)


def __getattr__(name: str) -> Any:
    value = _compat.resolve("modal.partial_function", name, MODAL_NAMES)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = sorted(_compat.available(MODAL_NAMES))

"""Modal's ``modal.queue``: ``Queue`` is ``flare.Queue``."""

from __future__ import annotations

from . import _compat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MODAL_NAMES = (
    "Queue",
)


def __getattr__(name: str) -> Any:
    value = _compat.resolve("modal.queue", name, MODAL_NAMES)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = sorted(_compat.available(MODAL_NAMES))

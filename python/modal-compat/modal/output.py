"""Modal's ``modal.output``: ``enable_output`` is Flare's."""

from __future__ import annotations

from . import _compat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MODAL_NAMES = (
    "enable_output",
)


def __getattr__(name: str) -> Any:
    value = _compat.resolve("modal.output", name, MODAL_NAMES)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = sorted(_compat.available(MODAL_NAMES))

"""Modal's ``modal.volume``: ``Volume``, ``FileEntry`` and ``FileEntryType`` are Flare's
(``flare.volume``)."""

from __future__ import annotations

from . import _compat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MODAL_NAMES = (
    "FileEntry",
    "FileEntryType",
    "Volume",
)


def _lookup(name: str) -> Any:
    import flare.volume

    return getattr(flare.volume, name, None)


def __getattr__(name: str) -> Any:
    value = _compat.resolve("modal.volume", name, MODAL_NAMES, _lookup)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = list(MODAL_NAMES)

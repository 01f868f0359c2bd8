"""Modal's ``modal.app``: ``App`` is ``flare.App``.

LocalEntrypoint is not listed: Flare has no public name for it."""

from __future__ import annotations

from . import _compat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MODAL_NAMES = (
    "App",
)


def __getattr__(name: str) -> Any:
    value = _compat.resolve("modal.app", name, MODAL_NAMES)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = sorted(_compat.available(MODAL_NAMES))

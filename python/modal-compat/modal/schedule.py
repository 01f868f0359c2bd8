"""Modal's ``modal.schedule``: ``Cron`` and ``Period`` are Flare's, and so is their base
class ``Schedule``."""

from __future__ import annotations

from . import _compat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MODAL_NAMES = (
    "Cron",
    "Period",
    "Schedule",
)


def _lookup(name: str) -> Any:
    if name == "Schedule":
        from flare.schedule import Schedule

        return Schedule
    return _compat.flare_name(name)


def __getattr__(name: str) -> Any:
    value = _compat.resolve("modal.schedule", name, MODAL_NAMES, _lookup)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = sorted(_compat.available(MODAL_NAMES, lambda n: n == "Schedule" or _compat.flare_has(n)))

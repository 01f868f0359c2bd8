"""Modal's ``modal.file_pattern_matcher``: ``FilePatternMatcher`` is Flare's."""

from __future__ import annotations

from . import _compat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MODAL_NAMES = (
    "FilePatternMatcher",
)


def __getattr__(name: str) -> Any:
    value = _compat.resolve("modal.file_pattern_matcher", name, MODAL_NAMES)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = sorted(_compat.available(MODAL_NAMES))

"""Per-input context inside a container (set by the runner; thread and task local)."""

from __future__ import annotations

import os
from contextvars import ContextVar

_input_id: ContextVar[str | None] = ContextVar("flare_input_id", default=None)
_call_id: ContextVar[str | None] = ContextVar("flare_call_id", default=None)


def is_local() -> bool:
    """True when running on the caller's machine, False inside a Flare container."""
    return os.environ.get("FLARE_IS_REMOTE") != "1"


def current_input_id() -> str | None:
    """The id of the input being processed by this thread/task, or None outside an input."""
    return _input_id.get()


def current_function_call_id() -> str | None:
    """The id of the call the current input belongs to, or None outside an input."""
    return _call_id.get()

"""What the commands share: command-line errors and table formatting."""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Sequence

    # Each command's handler: (args, rest, connect) -> exit status; ``connect()`` gives a
    # client for a live server (starting the embedded one if needed).
    Connect = Callable[[], Any]


class UserError(Exception):
    """A mistake on the command line: printed as one `Error:` line (plus a hint)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _age(seconds: Any) -> str:
    s = float(seconds or 0)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s // 60:.0f}m{s % 60:02.0f}s"
    if s < 86400:
        return f"{s // 3600:.0f}h{s % 3600 // 60:02.0f}m"
    return f"{s // 86400:.0f}d{s % 86400 // 3600:02.0f}h"


def _memory_limit(mb: Any) -> str:
    """A container's memory limit for display: ``2 GiB``, ``512 MiB``, ``-`` (none)."""
    if not mb:
        return "-"
    mb = int(mb)
    return f"{mb // 1024} GiB" if mb % 1024 == 0 else f"{mb} MiB"


def _bytes(n: Any) -> str:
    size = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # unreachable


def _when(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts or 0))) if ts else "-"


def _count(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return str(len(value))
    return "-" if value is None else str(value)

"""Heartbeats of ephemeral objects (``Dict.ephemeral()``, ``Queue.ephemeral()``): while the
``with`` block runs a daemon thread tells the server every 30 s that the client is still
there; an object whose client died goes 300 s after its last heartbeat (see
crates/flare-control/src/services/leases.rs)."""

from __future__ import annotations

import contextlib
import threading

from . import exception

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterator

HEARTBEAT_EVERY_S = 30.0


@contextlib.contextmanager
def heartbeats(path: str) -> Iterator[None]:
    """POST ``path`` every :data:`HEARTBEAT_EVERY_S` until the block exits."""
    from . import _invocation

    stop = threading.Event()

    def main() -> None:
        while not stop.wait(HEARTBEAT_EVERY_S):
            try:
                _invocation.client().request("POST", path, {}, timeout=10)
            except exception.NotFoundError:
                return  # deleted meanwhile
            except exception.Error:
                pass  # transient; the next one may get through

    t = threading.Thread(target=main, name="flare-ephemeral-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()

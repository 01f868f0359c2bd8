"""Streaming container logs to the local terminal, and ``flare.enable_output()``."""

from __future__ import annotations

import os
import sys
import threading
import time

from . import _api
from .exception import Error

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterator

    from ._transport import Client

_enabled = 0
# Log streamers of the apps this process runs, by app id (see catch_up()).
_streamers: dict[str, LogStreamer] = {}


def output_enabled() -> bool:
    return _enabled > 0


class enable_output:
    """Context manager: while active, ``app.run()`` streams the containers' stdout/stderr here."""

    def __init__(self, show_progress: bool = True) -> None:
        self.show_progress = show_progress

    def __enter__(self) -> enable_output:
        global _enabled
        _enabled += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        global _enabled
        _enabled -= 1


def _write_records(records: list[dict[str, Any]], show_system: bool) -> None:
    wrote_out = wrote_err = False
    for rec in records:
        stream = rec.get("stream")
        data = rec.get("data") or ""
        if stream == "stdout":
            sys.stdout.write(data)
            wrote_out = True
        elif stream == "stderr":
            sys.stderr.write(data)
            wrote_err = True
        elif show_system:
            sys.stderr.write(f"[flare] {data}" if data.endswith("\n") else f"[flare] {data}\n")
            wrote_err = True
    if wrote_out:
        sys.stdout.flush()
    if wrote_err:
        sys.stderr.flush()


def _show_system() -> bool:
    return os.environ.get("FLARE_VERBOSE", "") not in ("", "0")


class LogStreamer:
    """Long-polls the app's logs (``_api.app_logs``) on a thread and writes records to stdout/stderr."""

    def __init__(self, client: Client, app_id: str) -> None:
        self.client = client
        self.app_id = app_id
        self.after: int | None = None  # None: from the first record
        self.lock = threading.Lock()
        self.printed = threading.Condition(self.lock)
        self.stopped = False
        self.show_system = _show_system()
        self.thread = threading.Thread(target=self._main, name="flare-logs", daemon=True)

    def start(self) -> None:
        _streamers[self.app_id] = self
        self.thread.start()

    def wait_printed(self, seq: int, timeout: float) -> None:
        """Block (at most ``timeout`` s) until records up to ``seq`` have been written."""
        with self.printed:
            self.printed.wait_for(
                lambda: self.stopped or (self.after is not None and self.after >= seq), timeout=timeout
            )

    def _fetch(self, after: int | None, wait_ms: int) -> dict[str, Any]:
        return logs_page(self.client, self.app_id, after, wait_ms)

    def _main(self) -> None:
        try:
            while not self.stopped:
                after = self.after
                try:
                    r = self._fetch(after, 25000)
                except Error:
                    if self.stopped:
                        return
                    time.sleep(1.0)
                    continue
                with self.lock:
                    if self.stopped or self.after != after:
                        return  # drain() took over
                    _write_records(r.get("logs") or [], self.show_system)
                    self.after = r.get("next", after)
                    self.printed.notify_all()
        finally:
            self.client.close()

    def drain(self) -> None:
        """Stop the thread and print every record still stored (call after the app stopped)."""
        _streamers.pop(self.app_id, None)
        with self.lock:
            self.stopped = True
            after = self.after
            self.printed.notify_all()
        for _ in range(1000):
            try:
                r = self._fetch(after, 0)
            except Error:
                return
            logs = r.get("logs") or []
            if not logs:
                return
            _write_records(logs, self.show_system)
            after = r.get("next", after)


def catch_up(app_id: str | None, log_seq: int | None, timeout: float = 0.5) -> None:
    """Let the app's log streamer print up to ``log_seq`` before a result is handed over,
    so a remote function's prints appear before the value it returned."""
    if log_seq is None or log_seq < 0 or not app_id:
        return
    streamer = _streamers.get(app_id)
    if streamer is not None:
        streamer.wait_printed(log_seq, timeout)


def logs_page(client: Client, app_id: str, after: int | None, wait_ms: int) -> dict[str, Any]:
    query = f"wait_ms={wait_ms}&limit=1000" + ("" if after is None else f"&after={after}")
    result: dict[str, Any] = client.request("GET", _api.app_logs(app_id, query), timeout=wait_ms / 1000 + 30)
    return result


def follow_logs(client: Client, app_id: str, follow: bool) -> Iterator[dict[str, Any]]:
    """Log records of an app: what is stored, then (``follow``) new ones until the app stops."""
    after: int | None = None
    while True:
        r = logs_page(client, app_id, after, 25000 if follow else 0)
        logs = r.get("logs") or []
        yield from logs
        after = r.get("next", after)
        if not logs and (not follow or r.get("app_state") == "stopped"):
            return

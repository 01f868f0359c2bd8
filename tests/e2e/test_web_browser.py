"""A web endpoint in a real browser (docs/WEB.md): headless Chromium, driven over the Chrome
DevTools Protocol with the `websockets` client, loads a page an `@flare.asgi_app()` serves at
its printed `*.localhost` URL; the page's JavaScript opens a WebSocket back to the endpoint
and writes the echo into the page. Skipped only where no `chromium` binary is installed
(scripts/setup.sh installs Debian's)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from .conftest import Server, load_app
from .test_web import ASGI_APP, _app_name

pytest.importorskip("fastapi")
pytest.importorskip("websockets")

WANTED_TITLE = "got:echo:from the browser"


class Chromium:
    """A headless Chromium of the test's own: its own profile directory and process group,
    the DevTools endpoint read from its stderr."""

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="flare-e2e-chromium-")
        self.stderr: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [
                binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--no-proxy-server",
                "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            errors="replace", start_new_session=True,
        )
        # Drained by a thread to the end, so a chatty Chromium never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def devtools_url(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no DevTools URL from chromium in {timeout} s:\n{self.stderr_tail()}"
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            assert line is not None, f"chromium exited ({self.proc.poll()}) before listening:\n{self.stderr_tail()}"
            if line.startswith("DevTools listening on "):
                return line.split(" on ", 1)[1].strip()

    def stderr_tail(self) -> str:
        return "".join(self.stderr)[-4000:]

    def close(self) -> None:
        # The whole process group: the browser and its zygote, renderer and utility children.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                continue
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        try:  # stragglers of the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.profile, ignore_errors=True)


class CDP:
    """A minimal Chrome DevTools Protocol session over one WebSocket: `call` sends a command
    and waits for its answer; the events that arrive meanwhile are kept in `events`."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30,
             check: bool = True) -> dict[str, Any]:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no answer to {method} in {timeout} s"
            try:
                msg = json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                continue
            if msg.get("id") == my_id:
                assert not check or "error" not in msg, f"{method}: {msg['error']}"
                return dict(msg.get("result", msg))
            if "method" in msg:
                self.events.append(msg)

    def evaluate(self, expression: str, check: bool = True) -> Any:
        """The expression's value in the page; with check=False, None where it failed (as it
        may while a navigation swaps the document)."""
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, check=check)
        if "exceptionDetails" in res or "error" in res:
            assert not check, res
            return None
        return res["result"].get("value")


def _logged(events: list[dict[str, Any]]) -> list[str]:
    """The page's console messages and errors, for a failure's message."""
    out = []
    for e in events:
        if e["method"] == "Log.entryAdded":
            entry = e["params"]["entry"]
            out.append(f"{entry.get('level')}: {entry.get('text')} {entry.get('url', '')}".rstrip())
        elif e["method"] == "Runtime.exceptionThrown":
            out.append(f"exception: {e['params']['exceptionDetails'].get('text')}")
        elif e["method"] == "Runtime.consoleAPICalled":
            out.append(f"console.{e['params']['type']}: {[a.get('value') for a in e['params']['args']]}")
    return out


def test_a_browser_loads_the_page_and_talks_websocket_to_the_endpoint(server: Server, tmp_path: Path) -> None:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("no chromium binary on PATH (scripts/setup.sh installs Debian's `chromium`)")
    mod = load_app(tmp_path, ASGI_APP.format(name=_app_name()))
    with mod.app.run():
        url = mod.api.get_web_url()
        host = urllib.parse.urlsplit(url).hostname
        assert host and host.endswith(".localhost"), url
        browser = Chromium(binary)
        try:
            with contextlib.ExitStack() as sockets:
                _drive(browser, sockets, url)
        finally:
            browser.close()


def _drive(browser: Chromium, sockets: contextlib.ExitStack, url: str) -> None:
    from websockets.sync.client import connect

    browser_ws = browser.devtools_url()
    devtools = urllib.parse.urlsplit(browser_ws).netloc
    cdp = CDP(sockets.enter_context(connect(browser_ws, max_size=None, open_timeout=30)))
    target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    page_ws = f"ws://{devtools}/devtools/page/{target}"
    page = CDP(sockets.enter_context(connect(page_ws, max_size=None, open_timeout=30)))
    page.call("Page.enable")
    page.call("Runtime.enable")
    page.call("Log.enable")
    # The printed URL as it is: Chromium resolves *.localhost to loopback itself, so the
    # default domain needs no DNS and no hosts-file entry. The answer to navigate comes once
    # the response commits (the first request starts the container).
    nav = page.call("Page.navigate", {"url": url + "/page"}, timeout=60)
    assert not nav.get("errorText"), f"navigating to {url}/page: {nav}\n{browser.stderr_tail()}"
    deadline = time.monotonic() + 60
    title = None
    while time.monotonic() < deadline:
        title = page.evaluate("document.title", check=False)
        if title == WANTED_TITLE:
            break
        time.sleep(0.1)
    pre = page.evaluate('document.getElementById("out")?.textContent')
    assert title == WANTED_TITLE, (
        f"title {title!r} after 60 s; <pre>: {pre!r}; page log: {_logged(page.events)}\n"
        f"chromium stderr:\n{browser.stderr_tail()}"
    )
    assert pre == "echo:from the browser", pre
    assert page.evaluate("location.href") == url + "/page"

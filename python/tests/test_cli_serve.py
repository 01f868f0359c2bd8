"""``flare serve`` (against a fake HTTP server: registration, reload into the same app,
stop) and ``flare proxy-auth``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from flare.cli.serve import changed_files, snapshot

SDK_PARENT = str(Path(__file__).resolve().parents[1])


class FakeServer:
    """Just enough of the API for ``flare serve``: apps, mounts, blobs, registration
    (answering each web function's URL), heartbeats, logs, stop."""

    def __init__(self) -> None:
        self.registrations: list[tuple[str, list[dict[str, Any]]]] = []
        self.stopped: list[str] = []
        self.apps = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                n = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    return json.loads(raw) if raw else None
                except ValueError:
                    return None

            def do_GET(self) -> None:
                if self.path == "/v1/health":
                    self._reply(200, {"status": "ok"})
                elif "/logs" in self.path:
                    time.sleep(0.05)
                    self._reply(200, {"logs": [], "next": 0})
                else:
                    self._reply(404, {"error": {"code": "not_found", "message": "no"}})

            def do_POST(self) -> None:
                body = self._body()
                path = self.path
                if path == "/v1/apps":
                    fake.apps += 1
                    self._reply(200, {"app_id": f"ap-{fake.apps}"})
                elif path == "/v1/blobs/missing":
                    self._reply(200, {"missing": []})
                elif path == "/v1/mounts":
                    self._reply(200, {"mount_id": "mo-1"})
                elif path.endswith("/functions"):
                    app_id = path.split("/")[3]
                    defs = body["functions"]
                    fake.registrations.append((app_id, defs))
                    n = len(fake.registrations)
                    out = []
                    for d in defs:
                        url = f"http://{d['name']}-v{n}.localhost:7878/" if d.get("web") else None
                        out.append({"name": d["name"], "function_id": f"fu-{d['name']}-{n}", "web_url": url})
                    self._reply(200, {"functions": out})
                elif path.endswith("/heartbeat"):
                    self._reply(200, {})
                elif path.endswith("/stop"):
                    fake.stopped.append(path.split("/")[3])
                    self._reply(200, {})
                else:
                    self._reply(404, {"error": {"code": "not_found", "message": "no"}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    f = FakeServer()
    yield f
    f.close()


APP = """
    import flare
    app = flare.App("served")

    @app.function()
    @flare.asgi_app()
    def web():
        return None

    @app.function()
    def plain():
        return {value}
"""


def _wait(pred: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_serve_registers_reloads_into_the_same_app_and_stops(fake: FakeServer, tmp_path: Path) -> None:
    src = tmp_path / "proj" / "served.py"
    src.parent.mkdir()
    src.write_text(textwrap.dedent(APP.format(value=1)))
    env = {**os.environ, "FLARE_SERVER_URL": fake.url, "FLARE_HOME": str(tmp_path / "home"),
           "FLARE_LOCAL_PYTHON": "bind", "PYTHONPATH": SDK_PARENT, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flare.cli", "serve", str(src), "--timeout", "6"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path))
    try:
        _wait(lambda: len(fake.registrations) == 1)
        time.sleep(0.6)  # the watcher's first snapshot
        src.write_text(textwrap.dedent(APP.format(value=2)))
        _wait(lambda: len(fake.registrations) == 2)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    (app1, defs1), (app2, defs2) = fake.registrations
    assert app1 == app2 == "ap-1" and fake.apps == 1  # the same app, registered again
    assert [d["name"] for d in defs1] == [d["name"] for d in defs2] == ["web", "plain"]
    assert defs1[0]["web"][0]["kind"] == "asgi" and "web" not in defs1[1]
    assert "Created web function web => http://web-v1.localhost:7878/" in out
    assert "Created function plain" in out
    assert "reloading" in out and "Updated web function web => http://web-v2.localhost:7878/" in out
    assert fake.stopped == ["ap-1"]


def test_serve_survives_a_broken_reload(fake: FakeServer, tmp_path: Path) -> None:
    from flare.cli.serve import reregister

    src = tmp_path / "broken.py"
    src.write_text("import flare\nthis is not python\n")
    env_before = dict(os.environ)
    os.environ.update({"FLARE_SERVER_URL": fake.url, "FLARE_HOME": str(tmp_path / "home"), "FLARE_LOCAL_PYTHON": "bind"})
    try:
        assert reregister(str(src), False, "ap-9") is None
        src.write_text(textwrap.dedent(APP.format(value=3)))
        result = reregister(str(src), False, "ap-9")
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    assert result == {"urls": [["web", "http://web-v1.localhost:7878/"]], "functions": ["web", "plain"]}
    assert fake.registrations[0][0] == "ap-9" and fake.apps == 0


def test_snapshot_sees_py_changes_only(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("1")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "b.py").write_text("1")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "c.py").write_text("1")
    (tmp_path / "notes.txt").write_text("1")
    before = snapshot(str(tmp_path))
    assert sorted(os.path.relpath(p, tmp_path) for p in before) == ["a.py", os.path.join("pkg", "b.py")]
    os.utime(tmp_path / "pkg" / "b.py", ns=(1, 1))
    (tmp_path / "notes.txt").write_text("2")
    (tmp_path / ".venv" / "c.py").write_text("2")
    assert changed_files(before, snapshot(str(tmp_path))) == [str(tmp_path / "pkg" / "b.py")]


def test_proxy_auth_commands(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from flare import cli

    calls: list[tuple[str, str, Any]] = []

    class Client:
        def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
            calls.append((method, path, body))
            if method == "POST":
                return {"token_id": "wk-1", "token_secret": "ws-2", "name": body["name"], "created_at": 1700000000.0}
            if method == "GET":
                return {"tokens": [{"token_id": "wk-1", "name": "ci", "created_at": 1700000000.0}]}
            return {}

    monkeypatch.setattr(cli, "_client", lambda: Client())
    assert cli.main(["proxy-auth", "create", "--name", "ci"]) == 0
    out = capsys.readouterr().out
    assert "wk-1" in out and "ws-2" in out and "Flare-Key: wk-1" in out
    assert cli.main(["proxy-auth", "list"]) == 0
    out = capsys.readouterr().out
    assert "TOKEN ID" in out and "wk-1" in out and "ci" in out and "ws-2" not in out
    assert cli.main(["proxy-auth", "delete", "wk-1"]) == 0
    assert calls == [
        ("POST", "/v1/proxy-auth-tokens", {"name": "ci"}),
        ("GET", "/v1/proxy-auth-tokens", None),
        ("DELETE", "/v1/proxy-auth-tokens/wk-1", {}),
    ]

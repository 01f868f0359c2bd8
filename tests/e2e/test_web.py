"""Web endpoints end to end (docs/WEB.md): real clients (httpx, curl, websockets, raw
sockets) against a live flared's ingress, each decorator kind, streaming, WebSockets,
scale from zero, `flare serve` reloads, proxy auth and every limit."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from .conftest import PYTHON_DIR, Flared, Server, load_app, run_cli

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


def _app_name() -> str:
    return f"web{uuid.uuid4().hex[:8]}"


def _split(url: str) -> tuple[str, int, str]:
    """(Host header, port, path) of an endpoint URL like http://x.localhost:7878/."""
    u = urllib.parse.urlsplit(url)
    assert u.hostname and u.port, url
    return u.netloc, u.port, u.path or "/"


def client(url: str, timeout: float = 60) -> Any:
    """An httpx client for an endpoint: it connects to 127.0.0.1 and names the endpoint in
    the Host header (Python's resolver, unlike curl's and browsers', does not map
    *.localhost to loopback)."""
    host, port, _ = _split(url)
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"host": host}, timeout=timeout)


def _logs(server: Server, app_id: str) -> str:
    out = []
    after = -1
    while True:
        with urllib.request.urlopen(f"{server.url}/v1/apps/{app_id}/logs?after={after}&limit=1000", timeout=30) as r:
            page = json.loads(r.read())
        if not page["logs"]:
            return "".join(x["data"] for x in out)
        out += page["logs"]
        after = page["next"]


def _wait_for(pred: Any, timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


FASTAPI_APP = """
    import os
    import flare
    from pydantic import BaseModel

    app = flare.App({name!r})

    class Item(BaseModel):
        name: str
        qty: int

    @app.function()
    @flare.fastapi_endpoint(method="POST", docs=True)
    def predict(item: Item):
        return {{"echo": item.name, "double": item.qty * 2, "pid": os.getpid()}}

    @app.function()
    @flare.fastapi_endpoint()
    def hello(name: str = "world"):
        return {{"hello": name}}
"""


def test_fastapi_endpoint_json_body_validated_by_pydantic(server: Server, tmp_path: Path) -> None:
    name = _app_name()
    mod = load_app(tmp_path, FASTAPI_APP.format(name=name))
    with mod.app.run():
        url = mod.predict.get_web_url()
        assert url == f"http://{name}-predict-dev.localhost:{server.port}", url
        with client(url) as c:
            r = c.post("/", json={"name": "apple", "qty": 21})
            assert r.status_code == 200, r.text
            assert r.json()["echo"] == "apple" and r.json()["double"] == 42
            bad = c.post("/", json={"name": "apple", "qty": "many"})
            assert bad.status_code == 422, bad.text
            assert "qty" in bad.text
            assert c.get("/docs").status_code == 200
            assert c.get("/openapi.json").json()["paths"]["/"]["post"]
        # The path form, for clients that cannot set a Host header.
        r = httpx.get(f"{server.url}/web/{name}/hello/?name=path", timeout=60)
        assert r.status_code == 200 and r.json() == {"hello": "path"}, r.text
        # curl resolves *.localhost to loopback itself: the printed URL works as it is.
        if shutil.which("curl"):
            out = subprocess.run(
                ["curl", "-sS", "-m", "60", mod.hello.get_web_url() + "/?name=curl"],
                capture_output=True, text=True, timeout=90, check=False,
            )
            assert json.loads(out.stdout) == {"hello": "curl"}, (out.stdout, out.stderr)
            # HTTP/2 without TLS (prior knowledge), as load balancers speak it.
            out = subprocess.run(
                ["curl", "-sS", "-m", "60", "--http2-prior-knowledge", "-w", "\n%{http_version}",
                 mod.hello.get_web_url() + "/?name=h2"],
                capture_output=True, text=True, timeout=90, check=False,
            )
            body, version = out.stdout.rsplit("\n", 1)
            assert json.loads(body) == {"hello": "h2"} and version == "2", (out.stdout, out.stderr)
        logs = _logs(server, mod.app.app_id)
        assert "POST / -> 200" in logs and "POST / -> 422" in logs, logs


ASGI_APP = """
    import asyncio
    import time
    import flare

    app = flare.App({name!r})

    @app.function()
    @flare.concurrent(max_inputs=100)
    @flare.asgi_app()
    def api():
        from fastapi import FastAPI, WebSocket, Request
        from fastapi.responses import HTMLResponse, StreamingResponse

        web = FastAPI()

        @web.get("/stream")
        async def stream(n: int = 5, gap: float = 0.1):
            async def gen():
                for i in range(n):
                    yield f"chunk {{i}} {{time.time():.3f}}\\n"
                    await asyncio.sleep(gap)
            return StreamingResponse(gen(), media_type="text/plain")

        @web.get("/sse")
        async def sse():
            async def gen():
                for i in range(3):
                    yield f"data: event {{i}}\\n\\n"
                    await asyncio.sleep(0.1)
            return StreamingResponse(gen(), media_type="text/event-stream")

        @web.get("/forever")
        async def forever(request: Request):
            async def gen():
                i = 0
                try:
                    while True:
                        yield f"tick {{i}}\\n"
                        i += 1
                        await asyncio.sleep(0.05)
                finally:
                    print(f"generator stopped after {{i}} ticks", flush=True)
            return StreamingResponse(gen(), media_type="text/plain")

        @web.get("/where")
        async def where(request: Request):
            return {{"url": str(request.url), "root_path": request.scope.get("root_path", "")}}

        @web.websocket("/ws")
        async def ws(sock: WebSocket):
            await sock.accept()
            while True:
                msg = await sock.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                if msg.get("text") is not None:
                    await sock.send_text("echo:" + msg["text"])
                else:
                    await sock.send_bytes(msg["bytes"])

        @web.get("/page")
        async def page():
            return HTMLResponse(PAGE)

        return web

    PAGE = '''<!doctype html><html><body><pre id="out">waiting</pre><script>
    const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
    ws.onopen = () => ws.send("from the browser");
    ws.onmessage = (e) => {{ document.getElementById("out").textContent = e.data; document.title = "got:" + e.data; }};
    </script></body></html>'''
"""


@pytest.fixture(scope="module")
def asgi(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    mod = load_app(tmp_path_factory.mktemp("asgi"), ASGI_APP.format(name=_app_name()))
    with mod.app.run():
        yield mod


def test_streaming_response_chunks_arrive_as_produced(asgi: Any) -> None:
    with client(asgi.api.get_web_url()) as c:
        arrivals = []
        with c.stream("GET", "/stream", params={"n": 5, "gap": 0.1}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    arrivals.append(time.monotonic())
        assert len(arrivals) == 5
        gaps = [b - a for a, b in pairwise(arrivals)]
        # Produced 100 ms apart, they arrive spread over the 400 ms (not all at the end, as a
        # buffering proxy would deliver them); one late chunk may shorten the gap after it.
        assert arrivals[-1] - arrivals[0] > 0.3, gaps
        assert sorted(gaps)[len(gaps) // 2] > 0.05, gaps


def test_server_sent_events(asgi: Any) -> None:
    with client(asgi.api.get_web_url()) as c:
        with c.stream("GET", "/sse") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = []
            at = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    at.append(time.monotonic())
        assert events == ["event 0", "event 1", "event 2"]
        # Each event as it is produced (100 ms apart), not all at the end.
        assert at[-1] - at[0] > 0.15, at


def test_path_form_gives_the_app_its_root_path(server: Server, asgi: Any) -> None:
    name = asgi.app.name
    r = httpx.get(f"{server.url}/web/{name}/api/where", timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["root_path"] == f"/web/{name}/api"
    assert r.json()["url"].endswith(f"/web/{name}/api/where")


def test_websocket_echo_from_the_websockets_client(asgi: Any) -> None:
    websockets = pytest.importorskip("websockets")
    from websockets.sync.client import connect

    host, port, _ = _split(asgi.api.get_web_url())
    # Connected to loopback by hand (Python's resolver does not map *.localhost), with the
    # endpoint's own URL, so the Host header names it.
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    with connect(f"ws://{host}/ws", sock=sock, open_timeout=60) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "echo:hello"
        blob = os.urandom(200_000)
        ws.send(blob)
        assert ws.recv(timeout=10) == blob
    assert websockets is not None


def test_client_disconnect_mid_stream_stops_the_generator(server: Server, asgi: Any) -> None:
    with client(asgi.api.get_web_url()) as c, c.stream("GET", "/forever") as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("tick"):
                got += 1
            if got == 3:
                break
    # The client closed its connection: the ingress closes the container's, the app sees
    # http.disconnect and the generator is cancelled (its finally runs).
    def stopped() -> str | None:
        text = _logs(server, asgi.app.app_id)
        return text if "generator stopped after" in text else None

    logs = _wait_for(stopped, what="the generator to stop")
    ticks = int(re.search(r"generator stopped after (\d+) ticks", logs).group(1))  # type: ignore[union-attr]
    assert ticks < 100, logs
    assert "GET /forever -> 200" in logs and "client went away" in logs, logs


def test_a_thousand_concurrent_keep_alive_connections(asgi: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    host, port, _ = _split(asgi.api.get_web_url())
    n_conns, rounds = 1000, 3

    async def one(i: int, ready: asyncio.Event, opened: list[int]) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened.append(i)
        if len(opened) == n_conns:
            ready.set()
        await asyncio.wait_for(ready.wait(), 120)  # every connection is open at once
        ok = 0
        for _ in range(rounds):
            writer.write(f"GET /where HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            ok += status == 200
        writer.close()
        return ok

    async def main() -> list[int]:
        ready = asyncio.Event()
        opened: list[int] = []
        return await asyncio.gather(*(one(i, ready, opened) for i in range(n_conns)))

    results = asyncio.run(main())
    assert sum(results) == n_conns * rounds, f"{sum(results)} of {n_conns * rounds} requests answered 200"


WSGI_APP = """
    import flare as modal  # an unmodified Modal-style app

    app = modal.App({name!r})

    @app.function()
    @modal.wsgi_app()
    def legacy():
        from flask import Flask, request, Response
        web = Flask("legacy")

        @web.route("/")
        def index():
            return "flask says hi"

        @web.route("/echo", methods=["POST"])
        def echo():
            return {{"got": request.get_json()["x"], "script": request.script_root}}

        @web.route("/lines")
        def lines():
            return Response((f"line {{i}}\\n" for i in range(3)), mimetype="text/plain")

        return web

    @app.function()
    @modal.web_server(8000, startup_timeout=30)
    def files():
        import subprocess, sys, os
        os.makedirs("/tmp/site", exist_ok=True)
        with open("/tmp/site/index.html", "w") as f:
            f.write("served by http.server")
        subprocess.Popen([sys.executable, "-m", "http.server", "8000", "--directory", "/tmp/site"])
"""


def test_wsgi_flask_app_and_web_server(server: Server, tmp_path: Path) -> None:
    pytest.importorskip("flask")
    name = _app_name()
    mod = load_app(tmp_path, WSGI_APP.format(name=name))
    with mod.app.run():
        with client(mod.legacy.get_web_url()) as c:
            assert c.get("/").text == "flask says hi"
            assert c.post("/echo", json={"x": 7}).json() == {"got": 7, "script": ""}
            assert c.get("/lines").text == "line 0\nline 1\nline 2\n"
        r = httpx.post(f"{server.url}/web/{name}/legacy/echo", json={"x": 1}, timeout=60)
        assert r.json() == {"got": 1, "script": f"/web/{name}/legacy"}
        with client(mod.files.get_web_url()) as c:
            r = c.get("/index.html")
            assert r.status_code == 200 and r.text == "served by http.server"


def test_a_scaled_to_zero_endpoint_answers_its_first_request(server: Server, tmp_path: Path) -> None:
    name = _app_name()
    mod = load_app(tmp_path, f"""
        import flare
        app = flare.App({name!r})

        @app.function(scaledown_window=2)
        @flare.fastapi_endpoint()
        def ping():
            return "pong"
    """)
    with mod.app.run():
        app_id = mod.app.app_id

        def containers() -> list[Any]:
            with urllib.request.urlopen(f"{server.url}/v1/containers", timeout=30) as r:
                return [c for c in json.loads(r.read())["containers"] if c.get("app_id") == app_id]

        assert containers() == []
        with client(mod.ping.get_web_url()) as c:
            r = c.get("/")
            assert r.status_code == 200 and r.json() == "pong"
            # Idle past its scaledown window, the container stops; the next request starts one.
            _wait_for(lambda: containers() == [], timeout=30, what="scale to zero")
            r = c.get("/")
            assert r.status_code == 200 and r.json() == "pong"


LIMITS_APP = """
    import os
    import time
    import flare
    from fastapi import Request
    app = flare.App({name!r})

    @app.function(timeout=2)
    @flare.fastapi_endpoint(method="POST")
    def slow(body: dict):
        time.sleep(float(body.get("sleep", 0)))
        if body.get("die"):
            os._exit(3)
        return "done"

    @app.function()
    @flare.fastapi_endpoint(requires_proxy_auth=True)
    def private(request: Request):
        return {{"secret": "stuff", "headers": sorted(request.headers.keys())}}
"""


def test_limits_and_errors_have_clear_answers(tmp_path: Path) -> None:
    own = Flared("--web-max-body-mib", "1")
    try:
        own.wait()
        env = {**os.environ, "FLARE_SERVER_URL": own.url, "FLARE_HOME": own.home}
        name = _app_name()
        app_file = tmp_path / f"{name}.py"
        app_file.write_text(__import__("textwrap").dedent(LIMITS_APP.format(name=name)))
        script = f"""
import json, os, sys, time, importlib.util
sys.path.insert(0, {str(PYTHON_DIR)!r})
spec = importlib.util.spec_from_file_location({name!r}, {str(app_file)!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
with mod.app.run():
    print(json.dumps({{"slow": mod.slow.get_web_url(), "private": mod.private.get_web_url(), "app_id": mod.app.app_id}}), flush=True)
    sys.stdin.readline()
"""
        holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=env)
        try:
            assert holder.stdout is not None
            urls = json.loads(holder.stdout.readline())
            _, port, _ = _split(urls["slow"])
            with client(urls["slow"]) as c:
                assert c.post("/", json={}).json() == "done"
                # Body over --web-max-body-mib: 413 before the container sees it.
                r = c.post("/", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
                assert r.status_code == 413, r.text
                # Streamed (chunked) over the limit: 413 too.
                r = c.post("/", content=iter([b"x" * (512 << 10)] * 4), headers={"content-type": "application/json"})
                assert r.status_code == 413, r.text
                # Headers over 64 KiB: 431.
                r = c.get("/", headers={"x-big": "y" * (70 << 10)})
                assert r.status_code == 431, r.text
                # Past the function's timeout (2 s): 504.
                r = c.post("/", json={"sleep": 4})
                assert r.status_code == 504 and "timeout" in r.text, r.text
                # The container dies mid-request: 502.
                r = c.post("/", json={"die": True})
                assert r.status_code == 502, r.text
                # And the endpoint still works afterwards (a new container).
                assert c.post("/", json={}).json() == "done"
            # Unknown host: 404 saying how URLs are formed.
            r = httpx.get(f"http://127.0.0.1:{port}/", headers={"host": f"nope.localhost:{port}"}, timeout=30)
            assert r.status_code == 404 and "<label>" in r.text and "/web/<app>/<function>/" in r.text, r.text
            # Proxy auth: refused without a token, before any container starts.
            with client(urls["private"]) as c:
                r = c.get("/")
                assert r.status_code == 401 and "Flare-Key" in r.text, r.text
                with urllib.request.urlopen(f"{own.url}/v1/containers", timeout=30) as resp:
                    fns = [x.get("function") for x in json.loads(resp.read())["containers"]]
                assert "private" not in fns, fns
                cli_env = {"FLARE_SERVER_URL": own.url, "FLARE_HOME": own.home}
                made = run_cli("proxy-auth", "create", "--name", "e2e", env=cli_env)
                assert made.returncode == 0, made.stdout + made.stderr
                tok = {
                    "token_id": re.search(r"Token ID:\s+(\S+)", made.stdout).group(1),  # type: ignore[union-attr]
                    "token_secret": re.search(r"Token secret:\s+(\S+)", made.stdout).group(1),  # type: ignore[union-attr]
                }
                r = c.get("/", headers={"Flare-Key": tok["token_id"], "Flare-Secret": "ws-wrong"})
                assert r.status_code == 401
                r = c.get("/", headers={"Flare-Key": tok["token_id"], "Flare-Secret": tok["token_secret"]})
                assert r.status_code == 200 and r.json()["secret"] == "stuff", r.text
                # The token never reaches the app's container.
                assert not {"flare-key", "flare-secret"} & set(r.json()["headers"]), r.json()
                r = c.get("/", headers={"Modal-Key": tok["token_id"], "Modal-Secret": tok["token_secret"]})
                assert r.status_code == 200, r.text
                assert not {"modal-key", "modal-secret"} & set(r.json()["headers"]), r.json()
                listed = json.loads(urllib.request.urlopen(f"{own.url}/v1/proxy-auth-tokens", timeout=30).read())
                assert [t["token_id"] for t in listed["tokens"]] == [tok["token_id"]]
                assert "token_secret" not in json.dumps(listed)
                listed_cli = run_cli("proxy-auth", "list", env=cli_env)
                assert tok["token_id"] in listed_cli.stdout and tok["token_secret"] not in listed_cli.stdout
                deleted = run_cli("proxy-auth", "delete", tok["token_id"], env=cli_env)
                assert deleted.returncode == 0, deleted.stdout + deleted.stderr
                r = c.get("/", headers={"Flare-Key": tok["token_id"], "Flare-Secret": tok["token_secret"]})
                assert r.status_code == 401
        finally:
            if holder.stdin:
                holder.stdin.close()
            holder.wait(timeout=60)
        # The app stopped: its endpoints answer 404.
        with client(urls["slow"]) as c:
            def gone() -> Any:
                r = c.post("/", json={})
                return r if r.status_code == 404 else None

            r = _wait_for(gone, what="404 after the app stopped")
            assert "no web endpoint" in r.text, r.text
    finally:
        own.stop()


def test_flare_serve_reloads_after_an_edit(server: Server, tmp_path: Path) -> None:
    name = _app_name()
    src = tmp_path / f"{name}.py"
    body = """
import time
import flare
app = flare.App({name!r})

@app.function()
@flare.fastapi_endpoint()
def version():
    return {v!r}

@app.function()
@flare.fastapi_endpoint()
def slow():
    time.sleep(4)
    return {v!r} + "-slow"
"""
    src.write_text(body.format(name=name, v="v1"))
    env = {**os.environ, "PYTHONPATH": str(PYTHON_DIR) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "flare.cli", "serve", str(src)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        urls: dict[str, str] = {}
        seen = []
        deadline = time.monotonic() + 120
        while len(urls) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(r"(http://\S+\.localhost:\d+)", line)
            if m:
                u = m.group(1).rstrip("/")
                urls["slow" if "-slow-dev." in u else "version"] = u
        assert len(urls) == 2, "".join(seen)
        url = urls["version"]
        with client(url) as c, client(urls["slow"]) as slow:
            assert c.get("/").json() == "v1"
            assert slow.get("/").json() == "v1-slow"  # its container is up
            # A request in flight when the file changes finishes on the old version.
            in_flight: dict[str, Any] = {}
            t = __import__("threading").Thread(target=lambda: in_flight.update(r=slow.get("/")))
            t.start()
            time.sleep(0.5)
            src.write_text(body.format(name=name, v="v2"))
            t0 = time.monotonic()
            _wait_for(lambda: c.get("/").json() == "v2", timeout=60, what="the reloaded version")
            reload_s = time.monotonic() - t0
            print(f"reloaded in {reload_s:.2f} s")
            assert reload_s < 30, reload_s
            t.join(timeout=60)
            assert in_flight["r"].status_code == 200 and in_flight["r"].json() == "v1-slow", in_flight
            assert slow.get("/").json() == "v2-slow"
    finally:
        proc.send_signal(2)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", headers={"host": _split(url)[0]}) as c:
        _wait_for(lambda: c.get("/").status_code == 404, what="404 after serve stopped")


ISOLATION_APP = """
    import socket
    import flare
    app = flare.App({name!r})

    @app.function()
    @flare.web_server(8000, startup_timeout=30)
    def target():
        import os, subprocess, sys
        os.makedirs("/tmp/site", exist_ok=True)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("10.213.0.1", 9))  # no packet: picks the address of the default route
        with open("/tmp/site/ip.txt", "w") as f:
            f.write(s.getsockname()[0])
        subprocess.Popen([sys.executable, "-m", "http.server", "8000", "--bind", "0.0.0.0", "--directory", "/tmp/site"])

    @app.function()
    @flare.asgi_app()
    def other():
        async def web(scope, receive, send):
            if scope["type"] != "http":
                return
            await send({{"type": "http.response.start", "status": 200, "headers": []}})
            await send({{"type": "http.response.body", "body": b"other"}})
        return web

    @app.function()
    def probe(ip: str) -> dict:
        out = {{}}
        # The runner's ASGI socket of another container: abstract sockets are per network
        # namespace, so this one does not exist here (or is this container's own).
        for name in ("flare-web-0", "flare-web-1"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect("\\0" + name)
                out[name] = "connected"
            except OSError as e:
                out[name] = type(e).__name__
            finally:
                s.close()
        try:
            socket.create_connection((ip, 8000), timeout=2).close()
            out["tcp"] = "connected"
        except OSError as e:
            out["tcp"] = type(e).__name__
        return out
"""


def test_endpoints_are_reachable_only_through_the_ingress(server: Server, tmp_path: Path) -> None:
    """The attack: reach a container's web server around the ingress (so around proxy auth
    and the app's scoping) from another container (its veth address, the runner's abstract
    socket) and from the host."""
    mod = load_app(tmp_path, ISOLATION_APP.format(name=_app_name()))
    with mod.app.run():
        with client(mod.target.get_web_url()) as c:
            ip = c.get("/ip.txt").text.strip()
        assert ip.startswith("10.213."), ip
        with client(mod.other.get_web_url()) as c:
            assert c.get("/").text == "other"
        got = mod.probe.remote(ip)
        assert got["flare-web-0"] != "connected" and got["flare-web-1"] != "connected", got
        assert got["tcp"] != "connected", got
        # The host (this process, in the host's network namespace): no such socket either,
        # and the container's address does not answer.
        for name in ("flare-web-0", "flare-web-1"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with pytest.raises(OSError):
                s.connect("\0" + name)
            s.close()
        with pytest.raises(OSError):
            socket.create_connection((ip, 8000), timeout=2).close()


CLASS_APP = """
    import flare

    app = flare.App({name!r})

    @app.cls(scaledown_window=60)
    class Model:
        @flare.enter()
        def load(self):
            self.weights = 21

        @flare.fastapi_endpoint(method="POST")
        def predict(self, body: dict):
            return {{"y": body["x"] * self.weights}}

        @flare.asgi_app(label={label!r})
        def web(self):
            from fastapi import FastAPI
            api = FastAPI()

            @api.get("/weights")
            def weights():
                return self.weights
            return api

        @flare.method()
        def plain(self, x):
            return x + self.weights
"""


def test_endpoints_on_class_methods_share_the_enter_hooks(server: Server, tmp_path: Path) -> None:
    name = _app_name()
    label = f"{name}-custom"
    mod = load_app(tmp_path, CLASS_APP.format(name=name, label=label))
    with mod.app.run():
        m = mod.Model()
        assert m.predict.get_web_url() == f"http://{name}-model-predict-dev.localhost:{server.port}"
        assert m.web.get_web_url() == f"http://{label}-dev.localhost:{server.port}"
        with client(m.predict.get_web_url()) as c:
            assert c.post("/", json={"x": 2}).json() == {"y": 42}
        with client(m.web.get_web_url()) as c:
            assert c.get("/weights").json() == 21
        assert m.plain.remote(1) == 22


def test_deployed_endpoints_print_their_urls_and_stay_up(server: Server, tmp_path: Path) -> None:
    name = _app_name()
    src = tmp_path / f"{name}.py"
    src.write_text(f"""
import flare
app = flare.App({name!r})

@app.function()
@flare.fastapi_endpoint()
def hello():
    return "deployed"
""")
    out = run_cli("deploy", str(src))
    assert out.returncode == 0, out.stdout + out.stderr
    url = f"http://{name}-hello.localhost:{server.port}"
    assert url in out.stdout, out.stdout
    try:
        with client(url) as c:
            assert c.get("/").json() == "deployed"
    finally:
        stop = run_cli("app", "stop", name)
        assert stop.returncode == 0, stop.stdout + stop.stderr
    with client(url) as c:
        _wait_for(lambda: c.get("/").status_code == 404, what="404 after the app stopped")

"""Web endpoints: the decorators' checks, the definition's ``web`` list, the registration
answer's URLs, and the runner serving endpoints over its unix sockets before READY."""

from __future__ import annotations

import http.client
import json
import os
import socket
import textwrap
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest

import flare
from flare import exception, function as _functions
from flare._runtime.runner import INIT_FAILURE, READY
from flare._runtime.runner_client import RunnerProcess
from flare.app import _function_def, take_registration, web_urls
from flare.web_endpoints import check_label


def _defn(fn: flare.Function) -> dict[str, Any]:
    return _function_def(fn, None, None)


# ------------------------------------------------------------------ decorators


@pytest.mark.parametrize("label", ["", "-a", "a-", "A", "a_b", "a.b", "x" * 64, 5])
def test_bad_labels_are_refused_at_decoration(label: Any) -> None:
    with pytest.raises(exception.InvalidError, match="label"):
        flare.asgi_app(label=label)
    with pytest.raises(exception.InvalidError, match="label"):
        flare.fastapi_endpoint(label=label)


@pytest.mark.parametrize("label", ["a", "my-app-1", "0", "x" * 63])
def test_good_labels(label: str) -> None:
    assert check_label(label) == label


@pytest.mark.parametrize("port", [0, 65536, -1, "80", 1.5, True])
def test_bad_ports(port: Any) -> None:
    with pytest.raises(exception.InvalidError, match="port"):
        flare.web_server(port)


def test_other_checks() -> None:
    with pytest.raises(exception.InvalidError, match="startup_timeout"):
        flare.web_server(8000, startup_timeout=0)
    with pytest.raises(exception.InvalidError, match="method"):
        flare.fastapi_endpoint(method="FETCH")
    with pytest.raises(exception.InvalidError, match="parentheses"):
        flare.asgi_app(lambda: None)  # @flare.asgi_app without ()
    with pytest.raises(exception.InvalidError, match="custom_domains"):
        flare.asgi_app(custom_domains="example.com")  # type: ignore[arg-type]
    with pytest.raises(exception.InvalidError, match="async"):

        @flare.asgi_app()
        async def make() -> None: ...

    def twice() -> None: ...

    flare.wsgi_app()(twice)
    with pytest.raises(exception.InvalidError, match="two web endpoint"):
        flare.asgi_app()(twice)


def test_web_endpoint_is_deprecated() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deco = flare.web_endpoint(method="POST")
    assert any(issubclass(w.category, DeprecationWarning) and "fastapi_endpoint" in str(w.message) for w in caught)

    def f() -> None: ...

    assert deco(f).__flare_web__["http_method"] == "POST"  # type: ignore[attr-defined]


def test_above_app_function_is_an_error() -> None:
    app = flare.App("w")
    with pytest.raises(exception.InvalidError, match=r"under @app\.function"):

        @flare.asgi_app()
        @app.function()
        def web() -> None: ...


# ------------------------------------------------------------------ definitions


def test_function_definitions_carry_the_web_list() -> None:
    app = flare.App("w")

    @app.function()
    @flare.concurrent(max_inputs=100)
    @flare.asgi_app(label="my-app", requires_proxy_auth=True)
    def web() -> Any: ...

    @app.function()
    @flare.fastapi_endpoint(method="post", docs=True, custom_domains=["API.example.com"])
    def predict(x: int) -> int:
        return x

    @app.function()
    @flare.web_server(8000, startup_timeout=10)
    def server() -> None: ...

    @app.function()
    def plain() -> None: ...

    d = _defn(web)
    assert d["config"]["max_inputs"] == 100
    assert d["web"] == [{
        "kind": "asgi", "method_name": None, "label": "my-app", "docs": False, "requires_proxy_auth": True,
        "custom_domains": [], "startup_timeout": None,
    }]
    assert _defn(predict)["web"] == [{
        "kind": "fastapi", "method_name": None, "label": None, "http_method": "POST", "docs": True,
        "requires_proxy_auth": False, "custom_domains": ["api.example.com"], "startup_timeout": None,
    }]
    [ep] = _defn(server)["web"]
    assert (ep["kind"], ep["port"], ep["startup_timeout"]) == ("server", 8000, 10.0)
    assert "web" not in _defn(plain)
    assert json.loads(json.dumps(d)) == d  # plain JSON


def test_batched_web_endpoint_is_refused() -> None:
    app = flare.App("w")
    with pytest.raises(exception.InvalidError, match="batched"):

        @app.function()
        @flare.batched(max_batch_size=2, wait_ms=10)
        @flare.fastapi_endpoint()
        def f(xs: list[int]) -> list[int]:
            return xs


def test_class_web_methods() -> None:
    app = flare.App("w")

    @app.cls()
    class Model:
        @flare.enter()
        def load(self) -> None:
            self.w = 2

        @flare.method()
        def predict(self, x: int) -> int:
            return x * self.w

        @flare.fastapi_endpoint(method="POST")
        def api(self, x: int) -> int:
            return x

        @flare.asgi_app(label="model-ui")
        def ui(self) -> Any: ...

    d = _defn(app.registered_functions["Model"])
    assert d["is_class"] is True
    assert [(e["kind"], e["method_name"], e["label"]) for e in d["web"]] == [
        ("fastapi", "api", None), ("asgi", "ui", "model-ui"),
    ]
    info = Model.__flare_raw_f__.__flare_cls_info__  # type: ignore[attr-defined]
    assert set(info["methods"]) == {"predict", "api"}  # a FastAPI endpoint is callable too

    # A class with web endpoints only is fine; with neither, nothing to call.
    @app.cls()
    class OnlyWeb:
        @flare.wsgi_app()
        def app(self) -> Any: ...

    assert _defn(app.registered_functions["OnlyWeb"])["web"][0]["method_name"] == "app"
    with pytest.raises(exception.InvalidError, match="nothing to call"):

        @app.cls()
        class Nothing:
            def f(self) -> None: ...

    with pytest.raises(exception.InvalidError, match="lifecycle"):

        @app.cls()
        class Bad:
            @flare.enter()
            @flare.asgi_app()
            def ui(self) -> Any: ...


# ------------------------------------------------------------------ URLs


class _Fake:
    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.calls: list[tuple[str, str]] = []

    def request(self, method: str, path: str, body: Any = None, **_: Any) -> Any:
        self.calls.append((method, path))
        return self.reply


def test_registration_urls_and_get_web_url(monkeypatch: pytest.MonkeyPatch) -> None:
    app = flare.App("w")

    @app.function()
    @flare.asgi_app()
    def web() -> Any: ...

    @app.function()
    def plain() -> None: ...

    @app.cls()
    class Model:
        @flare.method()
        def predict(self) -> None: ...

        @flare.asgi_app()
        def ui(self) -> Any: ...

    fake = _Fake({})
    monkeypatch.setattr(_functions, "_client", lambda: fake)
    assert plain.get_web_url() is None  # no endpoint: no request
    take_registration(app, [
        {"name": "web", "function_id": "fu-1", "web_url": "http://w-web.localhost:7878/"},
        {"name": "plain", "function_id": "fu-2", "web_url": None},
        {"name": "Model", "function_id": "fu-3", "web_url": None, "web_urls": {"ui": "http://w-model-ui.localhost:7878/"}},
    ])
    assert web.get_web_url() == "http://w-web.localhost:7878/"
    assert plain.get_web_url() is None
    assert Model().ui.get_web_url() == "http://w-model-ui.localhost:7878/"
    assert Model().predict.get_web_url() is None
    assert fake.calls == []
    assert web_urls(app) == [("web", "http://w-web.localhost:7878/"), ("Model.ui", "http://w-model-ui.localhost:7878/")]
    # The URL travels with a pickled reference.
    import pickle

    assert pickle.loads(pickle.dumps(web)).get_web_url() == "http://w-web.localhost:7878/"


def test_get_web_url_of_a_reference_looks_it_up(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _Fake({"function_id": "fu-9", "web_url": "http://d-f.localhost:7878/"})
    monkeypatch.setattr(_functions, "_client", lambda: fake)
    f = flare.Function.from_name("d", "f")
    assert f.get_web_url() == "http://d-f.localhost:7878/"
    assert fake.calls == [("GET", "/v1/apps/by-name/d/functions/f")]
    # The server leaves a null web_url out: no endpoint, and no second request.
    fake2 = _Fake({"function_id": "fu-9"})
    monkeypatch.setattr(_functions, "_client", lambda: fake2)
    g = flare.Function.from_name("d", "g")
    assert g.get_web_url() is None
    assert fake2.calls == [("GET", "/v1/apps/by-name/d/functions/g")]
    # Hydrated without the URLs and nothing to look it up by: the function itself is asked.
    fake3 = _Fake({"function_id": "fu-7", "web_url": "http://x.localhost:7878/"})
    monkeypatch.setattr(_functions, "_client", lambda: fake3)
    monkeypatch.delenv("FLARE_IS_REMOTE", raising=False)
    h = flare.Function._new_reference("h")
    h._function_id = "fu-7"
    assert h.get_web_url() == "http://x.localhost:7878/"
    assert fake3.calls == [("GET", "/v1/functions/fu-7")]


# ------------------------------------------------------------------ runner


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect("\0" + self.unix_path[1:] if self.unix_path.startswith("@") else self.unix_path)
        self.sock = s


def _get(path: str, url: str = "/", method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    conn = _UnixHTTP(path)
    try:
        conn.request(method, url, body=body, headers={"content-type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def prefix() -> str:
    return f"@flare-web-test-{uuid.uuid4().hex[:10]}-"


@pytest.fixture
def runners() -> Iterator[list[RunnerProcess]]:
    started: list[RunnerProcess] = []
    yield started
    for r in started:
        r.close(timeout=5)


def _web_runner(runners: list[RunnerProcess], tmp_path: Path, prefix: str, source: str, name: str,
                web: list[dict[str, Any]], max_inputs: int = 1) -> RunnerProcess:
    (tmp_path / "webmod.py").write_text(textwrap.dedent(source))
    r = RunnerProcess(env={"PYTHONPATH": str(tmp_path), "FLARE_WEB_SOCKET_PREFIX": prefix})
    runners.append(r)
    r.init({"name": name, "module": "webmod", "qualname": name, "serialized": False, "is_generator": False,
            "is_async": False, "max_inputs": max_inputs, "web": web})
    return r


def _ep(kind: str, **kw: Any) -> dict[str, Any]:
    return {"kind": kind, "method_name": None, "label": None, "docs": False, "requires_proxy_auth": False,
            "custom_domains": [], "startup_timeout": None, **kw}


ASGI_MODULE = """
    import flare
    app = flare.App("t")

    async def asgi(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                m = await receive()
                if m["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": ("asgi " + scope["path"]).encode()})

    def wsgi(environ, start_response):
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"wsgi " + environ["PATH_INFO"].encode()]

    @app.function()
    @flare.concurrent(max_inputs=4)
    @flare.asgi_app()
    def web():
        print("making the app")
        return asgi

    @app.function()
    @flare.wsgi_app()
    def wweb():
        return wsgi
"""


def test_runner_serves_an_asgi_app(runners: list[RunnerProcess], tmp_path: Path, prefix: str) -> None:
    r = _web_runner(runners, tmp_path, prefix, ASGI_MODULE, "web", [_ep("asgi")], max_inputs=4)
    typ, header, _ = r.recv()  # type: ignore[misc]
    assert typ == READY, header
    assert _get(prefix + "0", "/hello") == (200, b"asgi /hello")
    assert _get(prefix + "0", "/again") == (200, b"asgi /again")
    r.shutdown()
    rc, out, _ = r.close()
    assert rc == 0 and out.count(b"making the app") == 1


def test_runner_serves_a_wsgi_app(runners: list[RunnerProcess], tmp_path: Path, prefix: str) -> None:
    r = _web_runner(runners, tmp_path, prefix, ASGI_MODULE, "wweb", [_ep("wsgi")])
    typ, header, _ = r.recv()  # type: ignore[misc]
    assert typ == READY, header
    assert _get(prefix + "0", "/x") == (201, b"wsgi /x")


def test_runner_serves_a_fastapi_endpoint_and_remote_calls(runners: list[RunnerProcess], tmp_path: Path, prefix: str) -> None:
    pytest.importorskip("fastapi")
    source = """
        import flare
        app = flare.App("t")

        @app.function()
        @flare.fastapi_endpoint(method="GET", docs=True)
        def square(x: int):
            return {"square": x * x}
    """
    r = _web_runner(runners, tmp_path, prefix, source, "square", [_ep("fastapi", http_method="GET", docs=True)])
    typ, header, _ = r.recv()  # type: ignore[misc]
    assert typ == READY, header
    status, body = _get(prefix + "0", "/?x=7")
    assert (status, json.loads(body)) == (200, {"square": 49})
    assert _get(prefix + "0", "/openapi.json")[0] == 200
    # The function still takes inputs.
    import pickle

    r.send_inputs([("in-1", (3,), {})])
    [(h, payload)] = r.outputs(1)
    assert h["status"] == "success" and pickle.loads(payload) == {"square": 9}


def test_runner_class_web_method(runners: list[RunnerProcess], tmp_path: Path, prefix: str) -> None:
    source = ASGI_MODULE + """
    @app.cls()
    class Model:
        @flare.enter()
        def load(self):
            self.greeting = b"hi from the class"

        @flare.asgi_app()
        def ui(self):
            greeting = self.greeting

            async def inner(scope, receive, send):
                if scope["type"] != "http":
                    return
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": greeting})
            return inner
    """
    r = _web_runner(runners, tmp_path, prefix, source, "Model", [_ep("asgi", method_name="ui")])
    typ, header, _ = r.recv()  # type: ignore[misc]
    assert typ == READY, header
    assert _get(prefix + "0") == (200, b"hi from the class")


def test_runner_web_server_waits_for_the_port(runners: list[RunnerProcess], tmp_path: Path, prefix: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = f"""
        import socket, threading, time
        import flare
        app = flare.App("t")

        @app.function()
        @flare.web_server({port})
        def serve():
            def later():
                time.sleep(0.3)
                srv = socket.socket()
                srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                srv.bind(("127.0.0.1", {port}))
                srv.listen()
                globals()["SRV"] = srv
            threading.Thread(target=later, daemon=True).start()
    """
    r = _web_runner(runners, tmp_path, prefix, source, "serve", [_ep("server", port=port, startup_timeout=10.0)])
    typ, header, _ = r.recv()  # type: ignore[misc]
    assert typ == READY, header
    socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_runner_web_server_that_never_listens_is_init_failure(runners: list[RunnerProcess], tmp_path: Path, prefix: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = f"""
        import flare
        app = flare.App("t")

        @app.function()
        @flare.web_server({port}, startup_timeout=0.3)
        def serve():
            pass
    """
    r = _web_runner(runners, tmp_path, prefix, source, "serve", [_ep("server", port=port, startup_timeout=0.3)])
    typ, header, _ = r.recv()  # type: ignore[misc]
    assert typ == INIT_FAILURE
    assert header["exception"]["message"] == f"web_server: nothing listens on port {port} after 0.3 s"
    assert r.close()[0] == 1


def test_runner_app_factory_failure_is_init_failure(runners: list[RunnerProcess], tmp_path: Path, prefix: str) -> None:
    source = """
        import flare
        app = flare.App("t")

        @app.function()
        @flare.asgi_app()
        def web():
            raise RuntimeError("no app today")
    """
    r = _web_runner(runners, tmp_path, prefix, source, "web", [_ep("asgi")])
    typ, header, _ = r.recv()  # type: ignore[misc]
    assert typ == INIT_FAILURE
    assert header["exception"]["message"] == "no app today"
    assert 'raise RuntimeError("no app today")' in header["exception"]["traceback"]


def test_fastapi_missing_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from flare._runtime import web_endpoints

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fails
    with pytest.raises(ImportError, match=r"add \.pip_install\('fastapi\[standard\]'\)"):
        web_endpoints.fastapi_app(lambda: None, {"kind": "fastapi"})


def test_runner_without_web_does_not_import_the_web_server() -> None:
    import subprocess
    import sys

    sdk_parent = str(Path(__file__).resolve().parents[1])
    probe = "import sys, flare._runtime.runner; print('flare._runtime.web' in sys.modules, 'flare._runtime.web_endpoints' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": sdk_parent}).stdout
    assert out.split() == ["False", "False"]


def test_runner_class_fastapi_method_and_remote(runners: list[RunnerProcess], tmp_path: Path, prefix: str) -> None:
    pytest.importorskip("fastapi")
    source = """
        import flare
        app = flare.App("t")

        @app.cls()
        class Model:
            @flare.enter()
            def load(self):
                self.k = 10

            @flare.fastapi_endpoint(method="POST")
            def api(self, item: dict):
                return {"got": item["x"] * self.k}
    """
    r = _web_runner(runners, tmp_path, prefix, source, "Model",
                    [_ep("fastapi", method_name="api", http_method="POST")], max_inputs=2)
    typ, header, _ = r.recv()  # type: ignore[misc]
    assert typ == READY, header
    status, body = _get(prefix + "0", "/", method="POST", body=b'{"x": 4}')
    assert (status, json.loads(body)) == (200, {"got": 40})
    assert _get(prefix + "0", "/docs")[0] == 404  # docs=False
    import pickle

    r.send_inputs([("in-1", ("api", {"x": 1}), {})])
    [(h, payload)] = r.outputs(1)
    assert h["status"] == "success" and pickle.loads(payload) == {"got": 10}

"""Classes (@app.cls) end to end against a live flared server (see conftest.py)."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import flare
import pytest

from .conftest import Server, load_app, run_cli, unique, write_app

MODEL = """
    import os
    import flare
    app = flare.App()

    @app.cls(cpu=0.25, memory=512, scaledown_window=60)
    class Model:
        size: int = flare.parameter(default=3)

        @flare.enter()
        def load(self):
            self.w = [1] * self.size
            self.pid = os.getpid()
            self.entered = getattr(self, "entered", 0) + 1

        @flare.method()
        def predict(self, x):
            return sum(self.w) * x

        @flare.method()
        def stream(self, n):
            yield from range(n)

        @flare.method()
        async def apredict(self, x):
            return -x

        @flare.method()
        def whoami(self):
            return (self.pid, self.entered, os.environ.get("FLARE_FUNCTION_NAME"))

        @flare.exit()
        def close(self):
            print("bye from exit hook", self.size)
"""


def _get(server: Server, path: str) -> Any:
    with urllib.request.urlopen(server.url + path, timeout=30) as r:
        return json.loads(r.read())


def _logs(server: Server, app_id: str) -> str:
    out = []
    after = -1
    while True:
        page = _get(server, f"/v1/apps/{app_id}/logs?after={after}&limit=1000")
        if not page["logs"]:
            return "".join(r["data"] for r in out)
        out += page["logs"]
        after = page["next"]


def test_class_end_to_end(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, MODEL)
    Model = mod.Model
    with mod.app.run():
        app_id = mod.app.app_id
        assert Model().predict.remote(2) == 6
        assert list(Model(size=8).predict.map(range(100))) == [8 * x for x in range(100)]
        assert list(Model().stream.remote_gen(3)) == [0, 1, 2]
        assert Model().apredict.remote(4) == -4
        assert list(Model(size=2).predict.starmap([(1,), (2,)])) == [2, 4]
        assert Model.with_options(cpu=0.5)().predict.spawn(1).get() == 3
        # enter ran once per container: the same container answers twice with one entry.
        a = Model().whoami.remote()
        b = Model().whoami.remote()
        assert a == b and a[1] == 1
        # Each parameter set / options variant is its own function, with its own pool.
        names = {f["name"] for app in _get(server, "/v1/apps")["apps"] if app["app_id"] == app_id for f in app["functions"]}
        assert "Model" in names
        variants = {n for n in names if n.startswith("Model.p")}
        assert len(variants) == 3, names  # size=8, size=2, with_options(cpu=2)
        conts = [c for c in _get(server, "/v1/containers")["containers"] if c["app_id"] == app_id]
        assert len({c["function"] for c in conts}) >= 2, conts
        with pytest.raises(AttributeError, match="its methods"):
            Model().nope  # noqa: B018
    # exit hooks ran at app stop; their prints are in the app's logs
    logs = _logs(server, app_id)
    assert "bye from exit hook 3" in logs, logs
    assert "bye from exit hook 8" in logs, logs


def test_enter_hook_failure(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, """
        import flare
        app = flare.App()

        @app.cls()
        class Broken:
            @flare.enter()
            def load(self):
                raise RuntimeError("enter hook exploded 42")

            @flare.method()
            def f(self):
                return 1
    """)
    with mod.app.run():
        t0 = time.monotonic()
        with pytest.raises(flare.exception.ExecutionError) as info:
            mod.Broken().f.remote()
        assert time.monotonic() - t0 < 60
        tb = getattr(info.value, "remote_traceback", "")
        assert 'raise RuntimeError("enter hook exploded 42")' in tb, tb
        assert "enter hook exploded 42" in str(info.value)
        # No restart loop: the failed container is not replaced while no input asks.
        time.sleep(2)
        app_id = mod.app.app_id
        conts = [c for c in _get(server, "/v1/containers")["containers"] if c["app_id"] == app_id]
        assert conts == [], conts


def test_cls_from_name_deployed(server: Server, tmp_path: Path) -> None:
    name = unique("clsdeployed")
    path = write_app(tmp_path, MODEL.replace("flare.App()", f"flare.App({name!r})"))
    r = run_cli("deploy", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        Model = flare.Cls.from_name(name, "Model")
        assert Model().predict.remote(1) == 3
        assert list(Model().stream.remote_gen(2)) == [0, 1]
        with pytest.raises(AttributeError, match="predict"):
            Model().no_such_method.remote(1)
        with pytest.raises(flare.exception.InvalidError, match="parameters"):
            Model(size=2)
    finally:
        run_cli("app", "stop", name)


def test_classes_example_cli(server: Server, tmp_path: Path) -> None:
    import shutil

    from .conftest import REPO

    app_file = tmp_path / "classes.py"
    shutil.copy(REPO / "examples" / "classes.py", app_file)
    r = run_cli("run", str(app_file))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for token in ["6", str(8 * sum(range(100))), r"\[0, 1, 2\]", "3"]:
        assert re.search(rf"(^|\n){token}\n", out), (token, out)
    assert "loading weights of size 3" in out


def test_cli_runs_a_class_method(server: Server, tmp_path: Path) -> None:
    path = write_app(tmp_path, MODEL)
    r = run_cli("run", f"{path}::Model.predict", "--x", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    # predict's x has no annotation, so the flag's value is the string "5": 3 * "5"
    assert re.search(r"(^|\n)555\n", r.stdout), r.stdout
    r = run_cli("run", f"{path}::Model.nope")
    assert r.returncode != 0 and "Model.predict" in r.stdout + r.stderr


def test_twenty_parameter_sets_each_get_a_pool_that_scales_to_zero(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, """
        import os
        import flare
        app = flare.App()

        @app.cls(cpu=0.1, memory=128, scaledown_window=2)
        class P:
            n: int = flare.parameter()

            @flare.method()
            def get(self):
                return (self.n, os.environ.get("FLARE_FUNCTION_NAME"))
    """)
    with mod.app.run():
        app_id = mod.app.app_id
        results = [mod.P(n=i).get.remote() for i in range(20)]
        assert [n for n, _ in results] == list(range(20))
        assert len({fn for _, fn in results}) == 20, "one function (pool) per parameter set"
        names = {f["name"] for app in _get(server, "/v1/apps")["apps"] if app["app_id"] == app_id for f in app["functions"]}
        assert len({n for n in names if n.startswith("P.p")}) == 20, names
        # Every pool goes back to zero containers on its own.
        deadline = time.monotonic() + 90
        while True:
            conts = [c for c in _get(server, "/v1/containers")["containers"] if c["app_id"] == app_id]
            if not conts:
                break
            assert time.monotonic() < deadline, f"{len(conts)} containers left: {conts[:3]}"
            time.sleep(0.5)

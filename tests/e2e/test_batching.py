"""@flare.batched, Cls.with_batching/with_concurrency and the class errors of issue 11,
end to end against a live flared server (see conftest.py)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import flare
import pytest

from .conftest import Server, load_app, run_cli, unique, write_app

BATCHED = """
    import asyncio
    import os
    import threading
    import time
    import flare
    app = flare.App()

    @app.function(max_containers=1)
    @flare.batched(max_batch_size=4, wait_ms=500)
    def add(xs, ys):
        if -1 in xs:
            raise ValueError(f"batch of {len(xs)} failed")
        return [ValueError(f"bad input {x}") if x == 13 else (x + y, len(xs)) for x, y in zip(xs, ys)]

    @app.function()
    @flare.batched(max_batch_size=8, wait_ms=300)
    async def aneg(xs):
        await asyncio.sleep(0.01)
        return [(-x, len(xs)) for x in xs]

    @app.cls()
    class Model:
        k: int = flare.parameter(default=10)

        @flare.enter()
        def load(self):
            self.pid = os.getpid()

        @flare.batched(max_batch_size=5, wait_ms=500)
        def predict(self, xs: list[int]) -> list[tuple[int, int, int]]:
            return [(x * self.k, len(xs), self.pid) for x in xs]

    @app.cls()
    class Slow:
        @flare.method()
        def nap(self, i):
            t0 = time.time()
            time.sleep(1.0)
            return (os.getpid(), threading.get_ident(), t0, time.time())

    @app.cls(max_containers=1)
    @flare.concurrent(max_inputs=4)
    class Together:
        @flare.method()
        def nap(self, i):
            t0 = time.time()
            time.sleep(1.0)
            return (os.getpid(), threading.get_ident(), t0, time.time())
"""


def _overlap(naps: list[tuple[int, int, float, float]]) -> bool:
    """Two inputs that ran at the same time in one container, on different threads."""
    return any(
        a[0] == b[0] and a[1] != b[1] and a[2] < b[3] and b[2] < a[3] for a in naps for b in naps
    )


def test_batched_function(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, BATCHED)
    with mod.app.run():
        # .map: every caller gets its own result; batches hold at most max_batch_size.
        xs = [x for x in range(21) if x != 13]
        out = list(mod.add.map(xs, [100] * len(xs)))
        assert [r for r, _ in out] == [x + 100 for x in xs]
        sizes = [n for _, n in out]
        assert max(sizes) <= 4 and max(sizes) > 1, sizes
        # One caller's exception (an element of the returned list) is its own only.
        res = list(mod.add.map([12, 13, 14], [0, 0, 0], return_exceptions=True))
        assert res[0][0] == 12 and res[2][0] == 14, res
        assert isinstance(res[1], ValueError) and "bad input 13" in str(res[1]), res
        with pytest.raises(ValueError, match="bad input 13"):
            mod.add.remote(13, 0)
        # spawned callers within wait_ms share one batch; a batch-level exception reaches each.
        calls = [mod.add.spawn(x, 0) for x in (-1, 5, 6)]
        for c in calls:
            with pytest.raises(ValueError, match=r"batch of \d failed"):
                c.get()
        calls = [mod.add.spawn(x, 1) for x in (1, 2, 3, 4)]
        got = [c.get() for c in calls]
        assert [r for r, _ in got] == [2, 3, 4, 5] and max(n for _, n in got) > 1, got
        assert mod.add.remote(1, 2)[0] == 3
        # Positional arguments only (the SDK refuses keyword arguments before sending).
        with pytest.raises(flare.exception.InvalidError, match="positional arguments only"):
            mod.add.remote(1, ys=2)
        # Async batched function, called through .aio and .map.
        assert sorted(r for r, _ in mod.aneg.map(range(16))) == sorted(-x for x in range(16))

        async def many() -> list[tuple[int, int]]:
            return list(await asyncio.gather(*(mod.aneg.remote.aio(x) for x in range(6))))

        got = asyncio.run(many())
        assert [r for r, _ in got] == [-x for x in range(6)] and max(n for _, n in got) > 1, got


def test_batched_method_with_batching_and_concurrency(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, BATCHED)
    with mod.app.run():
        out = list(mod.Model().predict.map(range(10)))
        assert [r for r, _, _ in out] == [10 * x for x in range(10)]
        assert max(n for _, n, _ in out) <= 5 and max(n for _, n, _ in out) > 1, out
        out = list(mod.Model(k=2).predict.map(range(6)))
        assert [r for r, _, _ in out] == [2 * x for x in range(6)]
        # with_batching: another batch size (its own pool).
        small = mod.Model.with_batching(max_batch_size=2, wait_ms=500)
        out = list(small().predict.map(range(8)))
        assert [r for r, _, _ in out] == [10 * x for x in range(8)]
        assert max(n for _, n, _ in out) <= 2, out
        with pytest.raises(flare.exception.InvalidError, match="positional arguments only"):
            mod.Model().predict.remote(xs=1)
        # with_concurrency: one container runs several inputs at once.
        conc = mod.Slow.with_concurrency(max_inputs=4)
        t0 = time.monotonic()
        naps = list(conc().nap.map(range(4)))
        assert time.monotonic() - t0 < 3.5, naps
        assert _overlap(naps), naps
        # @flare.concurrent on the class: the same, in its own (one) container.
        naps = list(mod.Together().nap.map(range(4)))
        assert len({n[0] for n in naps}) == 1 and _overlap(naps), naps


def test_from_name_unknown_method_and_app_list(server: Server, tmp_path: Path) -> None:
    name = unique("clsnames")
    path = write_app(tmp_path, BATCHED.replace("flare.App()", f"flare.App({name!r})"))
    r = run_cli("deploy", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        Model = flare.Cls.from_name(name, "Model")
        assert Model().predict.remote(3)[0] == 30
        with pytest.raises(AttributeError) as info:
            Model().nosuch.remote(1)
        msg = str(info.value)
        assert "'nosuch'" in msg and "predict" in msg and "Model" in msg, msg
        # Batched over from_name: keyword arguments are refused by the container.
        with pytest.raises(flare.exception.InvalidError, match="positional arguments only"):
            Model().predict.remote(xs=1)
    finally:
        run_cli("app", "stop", name)


def test_app_list_shows_class_pools(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, BATCHED)
    with mod.app.run():
        assert mod.Model(k=3).predict.remote(1)[0] == 3
        assert mod.Model().predict.remote(1)[0] == 10
        r = run_cli("app", "list")
        assert r.returncode == 0, r.stderr
        line = next(line for line in r.stdout.splitlines() if mod.app.app_id in line)
        assert re.search(r"Model \[class, pools: default\(\d+/\d+\), p[0-9a-f]{12}\(\d+/\d+\)\]", line), line
        assert "Model.p" not in line, line


def test_cli_runs_a_batched_method(server: Server, tmp_path: Path) -> None:
    path = write_app(tmp_path, BATCHED)
    r = run_cli("run", f"{path}::Model.predict", "--xs", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"(^|\n)\(30, 1, \d+\)\n", r.stdout), r.stdout
    r = run_cli("run", f"{path}::add", "--xs", "3", "--ys", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"(^|\n)\('34', 1\)\n", r.stdout), r.stdout  # unannotated: strings


def test_lifecycle_hook_on_a_function_is_a_definition_error(server: Server, tmp_path: Path) -> None:
    for deco in ("@flare.enter()", "@flare.exit()", "@flare.method()"):
        path = write_app(tmp_path, f"""
            import flare
            app = flare.App()

            @app.function()
            {deco}
            def f():
                return 1
        """)
        r = run_cli("run", f"{path}::f")
        assert r.returncode != 0, r.stdout
        err = r.stdout + r.stderr
        assert "@app.cls()" in err and deco.split("(")[0] in err, err


def test_batching_example_cli(server: Server, tmp_path: Path) -> None:
    import shutil

    from .conftest import REPO

    app_file = tmp_path / "batching.py"
    shutil.copy(REPO / "examples" / "batching.py", app_file)
    r = run_cli("run", str(app_file))
    assert r.returncode == 0, r.stdout + r.stderr
    for token in ["328350", "144", re.escape("[1.25, 1.25, 1.25, 1.25]"), "3"]:
        assert re.search(rf"(^|\n){token}\n", r.stdout), (token, r.stdout)
    sizes = [int(m) for m in re.findall(r"a batch of (\d+)", r.stdout)]
    assert sizes and max(sizes) > 1 and max(sizes) <= 8, r.stdout

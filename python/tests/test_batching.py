"""@flare.batched: the decorator's checks, the SDK's call checks, and the runner's batching
(a real ``python -m flare._runtime`` with this test as the worker side, as test_runner.py)."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest

import flare
from flare import exception
from flare._runtime.runner import READY
from flare._runtime.runner_client import RunnerProcess


def _app() -> flare.App:
    return flare.App("batch-test")


# ------------------------------------------------------------------ definition


def test_batched_function_takes_max_batch_size_inputs_per_container() -> None:
    app = _app()

    @app.function()
    @flare.batched(max_batch_size=16, wait_ms=50)
    def add(xs: list[int], ys: list[int]) -> list[int]:
        return [x + y for x, y in zip(xs, ys)]

    assert add._config["max_inputs"] == 16 and add._config["target_inputs"] == 16
    assert add._batched
    assert add.get_raw_f().__flare_batched__ == {"max_batch_size": 16, "wait_ms": 50}  # type: ignore[attr-defined]


@pytest.mark.parametrize(("size", "wait", "match"), [
    (0, 10, "max_batch_size"), (1001, 10, "max_batch_size"), (True, 10, "max_batch_size"), (2.0, 10, "max_batch_size"),
    (4, -1, "wait_ms"), (4, 600_001, "wait_ms"), (4, 1.5, "wait_ms"),
])
def test_batched_limits(size: Any, wait: Any, match: str) -> None:
    with pytest.raises(exception.InvalidError, match=match):
        flare.batched(max_batch_size=size, wait_ms=wait)


def test_batched_limits_at_the_edges() -> None:
    flare.batched(max_batch_size=1, wait_ms=0)
    flare.batched(max_batch_size=1000, wait_ms=600_000)


def test_batched_function_shape_is_checked() -> None:
    b = flare.batched(max_batch_size=2, wait_ms=0)
    with pytest.raises(exception.InvalidError, match=r"\*args"):
        b(lambda *xs: xs)
    with pytest.raises(exception.InvalidError, match=r"\*args"):
        b(lambda xs, *, y: xs)
    with pytest.raises(exception.InvalidError, match="default arguments"):
        b(lambda xs=[]: xs)

    def gen(xs: list[int]) -> Iterator[int]:
        yield from xs

    with pytest.raises(exception.InvalidError, match="generator"):
        b(gen)
    app = _app()
    with pytest.raises(exception.InvalidError, match="at least one"):
        app.function()(b(lambda: []))
    with pytest.raises(exception.InvalidError, match=r"under @app\.function"):
        b(app.function()(lambda xs: xs))


def test_batched_and_concurrent_do_not_mix() -> None:
    app = _app()

    def f(xs: list[int]) -> list[int]:
        return xs

    with pytest.raises(exception.InvalidError, match="concurrent"):
        app.function()(flare.concurrent(max_inputs=2)(flare.batched(max_batch_size=2, wait_ms=0)(f)))
    with pytest.raises(exception.InvalidError, match="concurrent"):
        flare.batched(max_batch_size=2, wait_ms=0)(flare.concurrent(max_inputs=2)(lambda xs: xs))
    g = app.function(name="g")(flare.batched(max_batch_size=2, wait_ms=0)(lambda xs: xs))
    with pytest.raises(exception.InvalidError, match="concurrent"):
        flare.concurrent(max_inputs=2)(g)


def test_batched_calls_take_positional_arguments_only() -> None:
    app = _app()

    @app.function()
    @flare.batched(max_batch_size=2, wait_ms=0)
    def f(xs: list[int]) -> list[int]:
        return xs

    for call in (lambda: f.remote(xs=1), lambda: f.spawn(xs=1), lambda: list(f.map([1], kwargs={"y": 2}))):
        with pytest.raises(exception.InvalidError, match="positional arguments only"):
            call()


def test_batched_class() -> None:
    app = _app()

    @app.cls()
    class Model:
        @flare.batched(max_batch_size=8, wait_ms=100)
        def predict(self, xs: list[int]) -> list[int]:
            return [x * 2 for x in xs]

    info = Model._info
    assert info["batched"] == {"max_batch_size": 8, "wait_ms": 100}
    assert info["methods"]["predict"]["batched"]
    assert app.registered_functions["Model"]._config["max_inputs"] == 8
    assert Model().predict._batched
    with pytest.raises(exception.InvalidError, match="positional arguments only"):
        Model().predict.remote(xs=1)
    v = Model.with_batching(max_batch_size=3, wait_ms=5)
    assert v._options_override["_batching"] == (3, 5)
    assert v()._fn is not Model._base and v()._fn is Model.with_batching(max_batch_size=3, wait_ms=5)()._fn
    with pytest.raises(exception.InvalidError, match="max_batch_size"):
        Model.with_batching(max_batch_size=0, wait_ms=5)
    with pytest.raises(exception.InvalidError, match="batched"):
        Model.with_concurrency(max_inputs=4)
    with pytest.raises(exception.InvalidError, match="concurrent"):
        flare.concurrent(max_inputs=2)(Model)


def test_batched_class_rules() -> None:
    app = _app()
    with pytest.raises(exception.InvalidError, match="cannot have other methods"):
        @app.cls()
        class A:
            @flare.batched(max_batch_size=2, wait_ms=0)
            def b(self, xs: list[int]) -> list[int]:
                return xs

            @flare.method()
            def m(self) -> None: ...
    with pytest.raises(exception.InvalidError, match="only one"):
        @app.cls()
        class B:
            @flare.batched(max_batch_size=2, wait_ms=0)
            def b1(self, xs: list[int]) -> list[int]:
                return xs

            @flare.batched(max_batch_size=2, wait_ms=0)
            def b2(self, xs: list[int]) -> list[int]:
                return xs
    with pytest.raises(exception.InvalidError, match="besides self"):
        @app.cls()
        class C:
            @flare.batched(max_batch_size=2, wait_ms=0)
            def b(self) -> list[int]:
                return []
    with pytest.raises(exception.InvalidError, match="concurrent"):
        @app.cls()
        @flare.concurrent(max_inputs=2)
        class D:
            @flare.batched(max_batch_size=2, wait_ms=0)
            def b(self, xs: list[int]) -> list[int]:
                return xs


def test_with_concurrency_and_with_batching_need_their_class() -> None:
    app = _app()

    @app.cls()
    class M:
        @flare.method()
        def m(self) -> None: ...

    v = M.with_concurrency(max_inputs=6, target_inputs=3)
    assert v._options_override == {"_concurrency": (6, 3)} and v()._fn is not M._base
    assert v.with_options(cpu=2)._options_override == {"_concurrency": (6, 3), "cpu": 2}
    with pytest.raises(exception.InvalidError, match="max_inputs"):
        M.with_concurrency(max_inputs=0)
    with pytest.raises(exception.InvalidError, match="has none"):
        M.with_batching(max_batch_size=2, wait_ms=0)
    ref = flare.Cls.from_name("a", "M")
    with pytest.raises(exception.InvalidError, match="from_name"):
        ref.with_concurrency(max_inputs=2)
    with pytest.raises(exception.InvalidError, match="from_name"):
        ref.with_batching(max_batch_size=2, wait_ms=1)


def test_experimental_options() -> None:
    import flare._options as opts

    app = _app()
    with pytest.raises(exception.InvalidError, match=r"unknown experimental option.*nope.*enable_gpu_snapshot"):
        app.function(experimental_options={"nope": True})
    with pytest.raises(exception.InvalidError, match="experimental_options"):
        app.function(experimental_options=["enable_gpu_snapshot"])  # type: ignore[arg-type]
    opts._warned_gpu_snapshot[0] = False
    with pytest.warns(UserWarning, match="GPU memory snapshots are not supported yet"):
        app.function(experimental_options={"enable_gpu_snapshot": True})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        app.cls(experimental_options={"enable_gpu_snapshot": True})
        app.function(experimental_options={"enable_gpu_snapshot": False})


# ------------------------------------------------------------------ the runner


def _start(tmp_path: Path, source: str, name: str, max_inputs: int, env: dict[str, str] | None = None) -> RunnerProcess:
    (tmp_path / "batchmod.py").write_text(textwrap.dedent(source))
    r = RunnerProcess(env={"PYTHONPATH": str(tmp_path), **(env or {})})
    r.init({"name": name, "module": "batchmod", "qualname": name, "serialized": False,
            "is_generator": False, "is_async": False, "max_inputs": max_inputs})
    typ, header, _ = r.recv()  # type: ignore[misc]
    assert typ == READY, header
    return r


@pytest.fixture
def runner_box() -> Iterator[list[RunnerProcess]]:
    box: list[RunnerProcess] = []
    yield box
    for r in box:
        r.close(timeout=5)


SOURCE = """
    import flare
    app = flare.App("t")

    @app.function()
    @flare.batched(max_batch_size=4, wait_ms=300)
    def add(xs, ys):
        print("batch", len(xs))
        if -1 in xs:
            raise ValueError("batch failed")
        return [ValueError(f"bad {x}") if x == 13 else x + y for x, y in zip(xs, ys)]

    @app.function()
    @flare.batched(max_batch_size=3, wait_ms=200)
    async def aadd(xs, ys):
        return [x + y for x, y in zip(xs, ys)]

    @app.function()
    @flare.batched(max_batch_size=3, wait_ms=0)
    def short(xs):
        return xs[:1]
"""


def _by_id(outs: list[tuple[dict[str, Any], bytes]]) -> dict[str, tuple[dict[str, Any], bytes]]:
    return {h["input_id"]: (h, p) for h, p in outs}


def test_runner_groups_inputs_and_splits_results(runner_box: list[RunnerProcess], tmp_path: Path) -> None:
    r = _start(tmp_path, SOURCE, "add", 4)
    runner_box.append(r)
    # 6 inputs at once: a batch of 4, then one of 2; x=13 fails alone; a kwargs call fails alone.
    r.send_inputs([(f"in-{i}", (i, 100), {}) for i in range(6)] + [("in-13", (13, 0), {}), ("in-kw", (1,), {"ys": 2})])
    outs = _by_id(r.outputs(8))
    for i in range(6):
        h, p = outs[f"in-{i}"]
        assert h["status"] == "success" and pickle.loads(p) == i + 100
    h, p = outs["in-13"]
    assert h["status"] == "failure" and "bad 13" in h["exception"]["message"]
    assert isinstance(pickle.loads(p), ValueError)
    h, _ = outs["in-kw"]
    assert h["status"] == "failure" and "positional arguments only" in h["exception"]["message"]
    # A batch-level exception reaches every caller of the batch.
    r.send_inputs([("f-1", (-1, 0), {}), ("f-2", (5, 0), {}), ("arity", (1, 2, 3), {})])
    outs = _by_id(r.outputs(3))
    for k in ("f-1", "f-2"):
        h, _ = outs[k]
        assert h["status"] == "failure" and h["exception"]["message"] == "batch failed", h
        assert 'raise ValueError("batch failed")' in h["exception"]["traceback"]
    assert "takes 2 positional argument(s)" in outs["arity"][0]["exception"]["message"]
    r.shutdown()
    _, stdout, _ = r.close()
    sizes = [int(line.split()[1]) for line in stdout.decode().splitlines() if line.startswith("batch ")]
    assert sizes[:2] == [4, 3], sizes  # 4, then the 2 left with x=13 (the kwargs call never ran)


def test_runner_waits_for_a_batch_to_fill(runner_box: list[RunnerProcess], tmp_path: Path) -> None:
    import time

    r = _start(tmp_path, SOURCE, "add", 4)
    runner_box.append(r)
    r.send_inputs([("a", (1, 1), {})])
    time.sleep(0.1)  # within wait_ms: joins the same batch
    r.send_inputs([("b", (2, 2), {})], start_idx=1)
    outs = _by_id(r.outputs(2))
    assert pickle.loads(outs["a"][1]) == 2 and pickle.loads(outs["b"][1]) == 4
    r.shutdown()
    _, stdout, _ = r.close()
    assert b"batch 2\n" in stdout, stdout


def test_runner_async_batched_and_bad_result_length(runner_box: list[RunnerProcess], tmp_path: Path) -> None:
    r = _start(tmp_path, SOURCE, "aadd", 3)
    runner_box.append(r)
    r.send_inputs([(f"a{i}", (i, i), {}) for i in range(5)])
    outs = _by_id(r.outputs(5))
    assert [pickle.loads(outs[f"a{i}"][1]) for i in range(5)] == [0, 2, 4, 6, 8]
    r.shutdown()
    r.close()
    r = _start(tmp_path, SOURCE, "short", 3)
    runner_box.append(r)
    r.send_inputs([("s1", (1,), {}), ("s2", (2,), {})])
    outs = _by_id(r.outputs(2))
    for k in ("s1", "s2"):
        h, _ = outs[k]
        assert h["status"] == "failure" and "one result per input" in h["exception"]["message"], h


def test_runner_with_batching_variant_env(runner_box: list[RunnerProcess], tmp_path: Path) -> None:
    # FLARE_BATCH (a with_batching() variant) overrides the decorator's size.
    r = _start(tmp_path, SOURCE, "add", 2, env={"FLARE_BATCH": "2,300"})
    runner_box.append(r)
    r.send_inputs([(f"in-{i}", (i, 0), {}) for i in range(3)])
    r.outputs(3)
    r.shutdown()
    _, stdout, _ = r.close()
    assert b"batch 2\nbatch 1\n" in stdout, stdout


def test_runner_batched_class(runner_box: list[RunnerProcess], tmp_path: Path) -> None:
    r = _start(tmp_path, """
        import flare
        app = flare.App("t")

        @app.cls()
        class Model:
            k: int = flare.parameter(default=10)

            @flare.batched(max_batch_size=4, wait_ms=200)
            def predict(self, xs):
                print("batch", len(xs))
                return [x * self.k for x in xs]
    """, "Model", 4)
    runner_box.append(r)
    r.send_inputs([(f"m{i}", ("predict", i), {}) for i in range(4)] + [("bad", ("nosuch", 1), {})])
    outs = _by_id(r.outputs(5))
    assert [pickle.loads(outs[f"m{i}"][1]) for i in range(4)] == [0, 10, 20, 30]
    h, _ = outs["bad"]
    assert h["status"] == "failure" and "nosuch" in h["exception"]["message"] and "predict" in h["exception"]["message"]
    r.shutdown()
    _, stdout, _ = r.close()
    assert b"batch 4\n" in stdout


# ------------------------------------------------------------------ the CLI


def test_app_list_groups_class_pools() -> None:
    from flare.cli.app import _functions_column

    fns = [
        {"name": "Model", "containers": 1, "backlog": 0},
        {"name": "f", "containers": 0, "backlog": 2},
        {"name": "Model.p0123456789ab", "containers": 2, "backlog": 3},
        {"name": "Outer.inner", "containers": 0, "backlog": 0},  # a dotted name that is no pool
    ]
    assert _functions_column(fns) == (
        "Model [class, pools: default(1/0), p0123456789ab(2/3)], f(0/2), Outer.inner(0/0)"
    )


def test_run_flags_of_a_batched_function_take_one_element() -> None:
    import functools

    from flare.cli._load import _parse_entry_args

    class M:
        def predict(self, xs: list[int], ys: list[float]) -> None: ...

    f = functools.partial(M.predict, None)
    assert _parse_entry_args(f, ["--xs", "3", "--ys", "2.5"], "p", batched=True) == {"xs": 3, "ys": 2.5}
    assert _parse_entry_args(f, ["--xs", "3", "--ys", "2.5"], "p") == {"xs": "3", "ys": "2.5"}

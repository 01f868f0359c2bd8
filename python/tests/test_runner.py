"""The in-container runner, exercised for real: ``python -m flare._runtime`` with a
two pipes at fds 3 and 4, this test playing the worker side of the framing."""

from __future__ import annotations

import os
import pickle
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import cloudpickle
import pytest

from flare._runtime.runner import INIT_FAILURE, OUTPUTS, READY
from flare._runtime.runner_client import RunnerProcess


def _info(name: str, *, module: str | None = None, serialized: bool = False, max_inputs: int = 1,
          is_generator: bool = False, is_async: bool = False) -> dict[str, Any]:
    return {"name": name, "module": module, "qualname": name if module else None, "serialized": serialized,
            "is_generator": is_generator, "is_async": is_async, "max_inputs": max_inputs}


@pytest.fixture
def runners() -> Iterator[list[RunnerProcess]]:
    started: list[RunnerProcess] = []
    yield started
    for r in started:
        r.close(timeout=5)


def start_pickled(runners: list[RunnerProcess], f: Callable[..., Any], **kw: Any) -> RunnerProcess:
    r = RunnerProcess()
    runners.append(r)
    r.init(_info(f.__name__, serialized=True, **kw), cloudpickle.dumps(f, protocol=4))
    typ, header, _ = r.recv()  # type: ignore[misc]
    assert typ == READY, header
    assert header["pid"] > 0 and header["python"].count(".") == 2
    return r


def start_module(runners: list[RunnerProcess], tmp_path: Path, source: str, name: str, **kw: Any) -> RunnerProcess:
    (tmp_path / "usermod.py").write_text(textwrap.dedent(source))
    r = RunnerProcess(env={"PYTHONPATH": str(tmp_path)})
    runners.append(r)
    r.init(_info(name, module="usermod", **kw))
    return r


def value(out: tuple[dict[str, Any], bytes]) -> Any:
    header, payload = out
    assert header["status"] == "success", header
    return pickle.loads(payload)


# ------------------------------------------------------------------------- tests


def test_module_function_ready_and_call(runners: list[RunnerProcess], tmp_path: Path) -> None:
    r = start_module(runners, tmp_path, """
        import flare
        app = flare.App("t")

        @app.function()
        def square(x):
            print("computing", x)
            return x * x
    """, "square")
    typ, header, _ = r.recv()  # type: ignore[misc]
    assert typ == READY
    r.send_inputs([("in-1", (7,), {})])
    [out] = r.outputs(1)
    assert out[0]["input_id"] == "in-1" and out[0]["gen"] is None and out[0]["exception"] is None
    assert value(out) == 49
    r.shutdown()
    rc, stdout, _ = r.close()
    assert rc == 0
    assert b"computing 7" in stdout


def test_kwargs_and_none_result(runners: list[RunnerProcess]) -> None:
    def f(a: int, *, b: int = 0) -> None:
        assert (a, b) == (1, 2)

    r = start_pickled(runners, f)
    r.send_inputs([("i", (1,), {"b": 2})])
    assert value(r.outputs(1)[0]) is None


def test_prints_flushed_before_output(runners: list[RunnerProcess]) -> None:
    def f(x: int) -> int:
        print("hello from", x, end="")  # no newline: only an explicit flush writes it
        return x

    r = start_pickled(runners, f)
    r.send_inputs([("i", (5,), {})])
    r.outputs(1)
    assert r.logs()[0] == b"hello from 5"


def test_import_error_is_init_failure(runners: list[RunnerProcess], tmp_path: Path) -> None:
    r = start_module(runners, tmp_path, """
        import flare
        import no_such_module_xyz
    """, "f")
    typ, header, body = r.recv()  # type: ignore[misc]
    assert typ == INIT_FAILURE
    exc = header["exception"]
    assert exc["type"] == "builtins.ModuleNotFoundError"
    assert "no_such_module_xyz" in exc["message"]
    assert "usermod.py" in exc["traceback"] and "import no_such_module_xyz" in exc["traceback"]
    assert isinstance(pickle.loads(bytes(body)), ModuleNotFoundError)
    rc, _, stderr = r.close()
    assert rc == 1
    assert b"no_such_module_xyz" in stderr


def test_missing_function_is_init_failure(runners: list[RunnerProcess], tmp_path: Path) -> None:
    r = start_module(runners, tmp_path, "x = 1\n", "nope")
    typ, header, _ = r.recv()  # type: ignore[misc]
    assert typ == INIT_FAILURE and header["exception"]["type"] == "builtins.AttributeError"
    assert r.close()[0] == 1


def test_user_exception_with_traceback(runners: list[RunnerProcess], tmp_path: Path) -> None:
    r = start_module(runners, tmp_path, """
        class MyError(Exception):
            pass

        def inner(x):
            raise MyError(f"bad input {x}")

        def f(x):
            return inner(x)
    """, "f")
    assert r.recv()[0] == READY  # type: ignore[index]
    r.send_inputs([("i", (3,), {})])
    [(header, payload)] = r.outputs(1)
    assert header["status"] == "failure"
    exc = header["exception"]
    assert exc["type"] == "usermod.MyError" and exc["message"] == "bad input 3"
    tb = exc["traceback"]
    assert "in inner" in tb and 'raise MyError(f"bad input {x}")' in tb and "in f" in tb
    assert "_runner.py" not in tb  # the runner's own frame is cut off
    assert "_runtime/runner.py" not in tb  # (its path since the runner moved into flare._runtime)
    assert payload  # the exception object itself is pickled (importable usermod)


def test_unpicklable_exception_falls_back_to_info(runners: list[RunnerProcess]) -> None:
    def f() -> None:
        class Local(Exception):
            def __init__(self, a: int, b: int) -> None:  # unpicklable: needs two args
                super().__init__(f"{a}/{b}")

        raise Local(1, 2)

    r = start_pickled(runners, f)
    r.send_inputs([("i", (), {})])
    [(header, _)] = r.outputs(1)
    assert header["status"] == "failure" and header["exception"]["message"] == "1/2"


def test_unpicklable_result(runners: list[RunnerProcess]) -> None:
    def f() -> Any:
        import threading

        return threading.Lock()

    r = start_pickled(runners, f)
    r.send_inputs([("i", (), {})])
    [(header, _)] = r.outputs(1)
    assert header["status"] == "failure"
    assert header["exception"]["type"] == "flare.exception.SerializationError"
    assert "_thread.lock" in header["exception"]["message"]


def test_cloudpickle_fallback_for_results(runners: list[RunnerProcess]) -> None:
    def f() -> Any:
        return lambda y: y + 1

    r = start_pickled(runners, f)
    r.send_inputs([("i", (), {})])
    assert value(r.outputs(1)[0])(1) == 2


def test_generator(runners: list[RunnerProcess]) -> None:
    def gen(n: int) -> Iterator[int]:
        for i in range(n):
            yield i * 10

    r = start_pickled(runners, gen, is_generator=True)
    r.send_inputs([("g", (3,), {})])
    outs = r.outputs(4)
    assert [h["gen"] for h, _ in outs] == ["item", "item", "item", "done"]
    assert [pickle.loads(p) for h, p in outs[:3]] == [0, 10, 20]


def test_generator_items_are_streamed(runners: list[RunnerProcess]) -> None:
    def gen() -> Iterator[int]:
        yield 1
        time.sleep(3)
        yield 2

    r = start_pickled(runners, gen, is_generator=True)
    t0 = time.monotonic()
    r.send_inputs([("g", (), {})])
    [first] = r.outputs(1)
    assert value(first) == 1 and time.monotonic() - t0 < 2.5  # not held back until the end


def test_generator_exception(runners: list[RunnerProcess]) -> None:
    def gen() -> Iterator[int]:
        yield 1
        raise KeyError("boom")

    r = start_pickled(runners, gen, is_generator=True)
    r.send_inputs([("g", (), {})])
    outs = r.outputs(2)
    assert outs[1][0]["status"] == "failure" and outs[1][0]["gen"] == "done"
    assert outs[1][0]["exception"]["type"] == "builtins.KeyError"


def test_async_function_and_async_generator(runners: list[RunnerProcess]) -> None:
    async def f(x: int) -> int:
        import asyncio

        await asyncio.sleep(0.01)
        return x + 1

    async def agen(n: int) -> Any:
        for i in range(n):
            yield i

    r = start_pickled(runners, f, is_async=True)
    r.send_inputs([("a", (1,), {})])
    assert value(r.outputs(1)[0]) == 2
    r2 = start_pickled(runners, agen, is_async=True, is_generator=True)
    r2.send_inputs([("b", (2,), {})])
    assert [h["gen"] for h, _ in r2.outputs(3)] == ["item", "item", "done"]


def test_current_input_and_call_id(runners: list[RunnerProcess]) -> None:
    def f() -> Any:
        import flare

        return (flare.current_input_id(), flare.current_function_call_id(), flare.is_local())

    r = start_pickled(runners, f)
    r.send_inputs([("in-a", (), {}), ("in-b", (), {})], call_id="fc-1")
    outs = r.outputs(2)
    assert [value(o) for o in outs] == [("in-a", "fc-1", False), ("in-b", "fc-1", False)]


def test_sync_concurrency(runners: list[RunnerProcess]) -> None:
    def f(x: int) -> Any:
        import threading
        import time

        import flare

        time.sleep(0.5)
        return (x, flare.current_input_id(), threading.get_ident())

    r = start_pickled(runners, f, max_inputs=4)
    t0 = time.monotonic()
    r.send_inputs([(f"in-{i}", (i,), {}) for i in range(4)])
    outs = [value(o) for o in r.outputs(4)]
    assert time.monotonic() - t0 < 1.4  # ran at the same time, not 2 s in a row
    assert sorted(o[0] for o in outs) == [0, 1, 2, 3]
    assert all(o[1] == f"in-{o[0]}" for o in outs)  # per-thread input id
    assert len({o[2] for o in outs}) == 4


def test_async_concurrency_is_limited(runners: list[RunnerProcess]) -> None:
    async def f(x: int) -> Any:
        import asyncio

        import flare

        await asyncio.sleep(0.4)
        return flare.current_input_id()

    r = start_pickled(runners, f, max_inputs=3, is_async=True)
    t0 = time.monotonic()
    r.send_inputs([(f"in-{i}", (i,), {}) for i in range(6)])
    outs = r.outputs(6)
    elapsed = time.monotonic() - t0
    assert 0.75 < elapsed < 1.5  # two waves of three
    assert sorted(value(o) for o in outs) == sorted(f"in-{i}" for i in range(6))


def test_batches_outputs(runners: list[RunnerProcess]) -> None:
    def f(x: int) -> int:
        return x + 1

    r = start_pickled(runners, f)
    n = 2000
    r.send_inputs([(f"in-{i}", (i,), {}) for i in range(n)])
    frames = 0
    got: list[Any] = []
    while len(got) < n:
        typ, header, body = r.recv()  # type: ignore[misc]
        assert typ == OUTPUTS
        frames += 1
        off = 0
        for item in header["outputs"]:
            got.append(pickle.loads(bytes(body[off: off + item["len"]])))
            off += item["len"]
    assert got == [i + 1 for i in range(n)]
    assert frames < n / 5  # many outputs per frame


def test_slow_input_does_not_hold_back_earlier_outputs(runners: list[RunnerProcess]) -> None:
    def f(x: float) -> float:
        import time

        time.sleep(x)
        return x

    r = start_pickled(runners, f)
    t0 = time.monotonic()
    r.send_inputs([("fast", (0.0,), {}), ("slow", (3.0,), {})])
    [first] = r.outputs(1)
    assert first[0]["input_id"] == "fast" and time.monotonic() - t0 < 2.0


def test_cancel_pending_inputs(runners: list[RunnerProcess]) -> None:
    def f(x: float) -> float:
        import time

        time.sleep(x)
        return x

    r = start_pickled(runners, f)
    r.send_inputs([("a", (0.5,), {}), ("b", (0.0,), {}), ("c", (0.0,), {})])
    r.cancel(["b"])
    outs = {h["input_id"]: h for h, _ in r.outputs(3)}
    assert outs["a"]["status"] == "success" and outs["c"]["status"] == "success"
    assert outs["b"]["status"] == "failure"
    assert outs["b"]["exception"]["type"] == "flare.exception.InputCancellation"


def test_large_argument_and_result(runners: list[RunnerProcess]) -> None:
    def f(data: bytes) -> bytes:
        return data[::-1] + os.urandom(0)

    r = start_pickled(runners, f)
    blob = os.urandom(10 * 1024 * 1024)
    r.send_inputs([("big", (blob,), {})])
    assert value(r.outputs(1)[0]) == blob[::-1]


def test_exit_on_eof(runners: list[RunnerProcess]) -> None:
    r = start_pickled(runners, lambda: 1)
    assert r.close()[0] == 0


def test_bad_arguments_are_a_failure_not_a_crash(runners: list[RunnerProcess]) -> None:
    def f(x: int) -> int:
        return x

    r = start_pickled(runners, f)
    r.send(2, {"inputs": [{"input_id": "bad", "call_id": "c", "idx": 0, "len": 3}]}, [b"xyz"])
    r.send_inputs([("good", (1,), {})])
    outs = r.outputs(2)
    assert outs[0][0]["status"] == "failure" and outs[0][0]["exception"]["type"] == "flare.exception.DeserializationError"
    assert value(outs[1]) == 1


def test_no_space_errors_name_the_disk_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from flare._runtime import runner as _runner

    monkeypatch.setenv("FLARE_DISK_QUOTA_BYTES", str(4 << 30))
    info = _runner.exception_info(OSError(errno.ENOSPC, "No space left on device"))
    assert "disk quota" in info["message"] and "4096 MiB" in info["message"]
    assert "disk quota" in info["traceback"]
    other = _runner.exception_info(OSError(errno.EACCES, "Permission denied"))
    assert "disk quota" not in other["message"]


def test_old_entry_point_still_starts_the_runner(runners: list[RunnerProcess]) -> None:
    """``python -m flare._runner`` (workers from before flare._runtime) runs the same runner."""

    def f(x: int) -> int:
        return x + 1

    r = RunnerProcess(module="flare._runner")
    runners.append(r)
    r.init(_info("f", serialized=True), cloudpickle.dumps(f, protocol=4))
    typ, _, _ = r.recv()  # type: ignore[misc]
    assert typ == READY
    r.send_inputs([("in-1", (1,), {})])
    assert value(r.outputs(1)[0]) == 2


def test_the_runner_imports_no_client_sdk() -> None:
    """The container's entry point loads only flare, flare._runtime's modules and what
    they need from the standard library before READY (its cold start)."""
    import subprocess
    import sys

    probe = "import sys, flare._runtime.runner; print(sorted(m for m in sys.modules if m.startswith('flare')))"
    sdk_parent = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": sdk_parent}).stdout
    assert out.strip() == "['flare', 'flare._runtime', 'flare._runtime.runner']"


def test_the_c_pickler_skips_functools_and_leaves_the_real_one_importable() -> None:
    """The runner's first pickle imports ``_pickle`` without ``functools`` (and its
    ``collections``...); user code importing ``functools`` afterwards gets the real one."""
    import subprocess
    import sys

    probe = textwrap.dedent("""
        import sys
        from flare._runtime import runner
        p = runner._pickler()
        assert p.__name__ == "_pickle", p
        assert "functools" not in sys.modules and "collections" not in sys.modules, sorted(sys.modules)
        import functools
        assert functools.lru_cache and functools.partial is sys.modules["_functools"].partial
        assert p.loads(p.dumps(functools.partial(max, 1), 4))(2) == 2
        print("ok")
    """)
    sdk_parent = str(Path(__file__).resolve().parents[1])
    # -S: this interpreter's site (.pth hooks) imports functools itself, a container's need not.
    out = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": sdk_parent}).stdout
    assert out.strip() == "ok"


# ------------------------------------------------------------------------- classes

CLASS_MODULE = """
    import asyncio
    import flare
    app = flare.App("t")

    @app.cls()
    {concurrent}
    class Model:
        size: int = flare.parameter(default=3)

        @flare.enter()
        def load(self):
            print("enter", self.size)
            self.w = [1] * self.size
            {fail}

        @flare.enter(snap=True)
        def first(self):
            print("snap enter")

        @flare.method()
        def predict(self, x):
            return sum(self.w) * x

        @flare.method()
        def stream(self, n):
            yield from range(n)

        @flare.method()
        async def apredict(self, x):
            await asyncio.sleep(0)
            return -x

        @flare.exit()
        def close(self):
            print("bye", self.size)
"""


def _class_module(fail: str = "", concurrent: str = "") -> str:
    return CLASS_MODULE.format(fail=fail or "pass", concurrent=concurrent)


@pytest.mark.parametrize("max_inputs", [1, 4])
def test_class_methods_enter_and_exit(runners: list[RunnerProcess], tmp_path: Path, max_inputs: int) -> None:
    r = start_module(runners, tmp_path, _class_module(), "Model", max_inputs=max_inputs)
    typ, header, _ = r.recv()  # type: ignore[misc]
    assert typ == READY, header
    r.send_inputs([("a", ("predict", 2), {})])
    assert value(r.outputs(1)[0]) == 6
    r.send_inputs([("b", ("apredict", 5), {})])
    assert value(r.outputs(1)[0]) == -5
    r.send_inputs([("c", ("stream", 2), {})])
    outs = r.outputs(3)
    assert [o[0]["gen"] for o in outs] == ["item", "item", "done"]
    assert [value(o) for o in outs[:2]] == [0, 1]
    r.send_inputs([("d", ("nope",), {})])
    [out] = r.outputs(1)
    assert out[0]["status"] == "failure" and "its methods: apredict, predict, stream" in out[0]["exception"]["message"]
    r.shutdown()
    rc, stdout, _ = r.close()
    assert rc == 0
    assert stdout.index(b"snap enter") < stdout.index(b"enter 3") < stdout.index(b"bye 3")
    assert stdout.count(b"enter 3") == 1


def test_class_parameters_from_the_environment(runners: list[RunnerProcess], tmp_path: Path) -> None:
    import base64

    (tmp_path / "usermod.py").write_text(textwrap.dedent(_class_module()))
    blob = base64.b64encode(pickle.dumps({"size": 8}, 4)).decode()
    r = RunnerProcess(env={"PYTHONPATH": str(tmp_path), "FLARE_CLS_PARAMS": blob})
    runners.append(r)
    r.init(_info("Model", module="usermod"))
    assert r.recv()[0] == READY  # type: ignore[index]
    r.send_inputs([("a", ("predict", 1), {})])
    assert value(r.outputs(1)[0]) == 8


def test_class_enter_failure_is_init_failure(runners: list[RunnerProcess], tmp_path: Path) -> None:
    r = start_module(runners, tmp_path, _class_module(fail='raise RuntimeError("hook broke")'), "Model")
    typ, header, _ = r.recv()  # type: ignore[misc]
    assert typ == INIT_FAILURE
    assert 'raise RuntimeError("hook broke")' in header["exception"]["traceback"]
    assert r.close()[0] == 1


def test_class_exit_hook_on_sigterm(runners: list[RunnerProcess], tmp_path: Path) -> None:
    import signal

    r = start_module(runners, tmp_path, _class_module(), "Model")
    assert r.recv()[0] == READY  # type: ignore[index]
    os.kill(r.pid, signal.SIGTERM)
    assert r.wait(10) == 0
    assert b"bye 3" in r.logs()[0]


def test_prestarted_runner_takes_env_and_cwd_from_init(runners: list[RunnerProcess], tmp_path: Path) -> None:
    """A pre-started runner (FLARE_PRESTART=1) warms up before INIT, then takes the whole
    environment and the working dir from INIT before it imports the user's module."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "usermod.py").write_text(textwrap.dedent("""
        import os, sys
        SEEN = (os.environ.get("MY_VAR"), "FLARE_PRESTART" in os.environ, "OLD_VAR" in os.environ, os.getcwd())

        def probe():
            return SEEN + ("cloudpickle" in sys.modules,)
    """))
    r = RunnerProcess(env={"FLARE_PRESTART": "1", "OLD_VAR": "x", "PYTHONPATH": str(code)})
    runners.append(r)
    time.sleep(0.5)  # the warm-up runs before INIT arrives
    env = {k: v for k, v in os.environ.items() if k not in ("OLD_VAR", "FLARE_PRESTART")}
    env.update({"MY_VAR": "assigned", "PYTHONPATH": str(code), "FLARE_IS_REMOTE": "1"})
    r.send(1, {"function": _info("probe", module="usermod"), "env": env, "cwd": str(code)})
    typ, header, _ = r.recv()  # type: ignore[misc]
    assert typ == READY, header
    r.send_inputs([("in-1", (), {})])
    [out] = r.outputs(1)
    assert value(out) == ("assigned", False, False, str(code), True)

"""Functions end to end against a live flared server (see conftest.py)."""

from __future__ import annotations

import asyncio
import builtins
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import flare
from flare import exception

from .conftest import PYTHON_DIR, REPO, Server, load_app, run_cli, unique, write_app

# --------------------------------------------------------------------------- CLI


def test_hello_world_cli(server: Server, tmp_path: Path) -> None:
    app_file = tmp_path / "hello_world.py"
    shutil.copy(REPO / "examples" / "hello_world.py", app_file)
    r = run_cli("run", str(app_file), "--n", "500")
    assert r.returncode == 0, r.stdout + r.stderr
    # Local prints and streamed remote prints share the terminal, so a remote line can
    # land between a local print's text and its newline: match tokens, not whole lines.
    out = r.stdout
    assert re.search(r"(^|\n)16(\n|computing)", out), out
    assert re.search(rf"\b{sum(x * x for x in range(500))}\b", out), out
    # prints inside the containers are streamed back to this terminal
    assert "computing 4\n" in out
    assert len(re.findall(r"computing \d+", out)) == 501


def test_modal_compat_cli(server: Server, tmp_path: Path) -> None:
    app_file = tmp_path / "modal_compat.py"
    shutil.copy(REPO / "examples" / "modal_compat.py", app_file)
    r = run_cli("run", str(app_file), "--n", "100")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for token in ["16", str(sum(x * x for x in range(100))), "49", "remote"]:
        assert re.search(rf"(^|\n){token}", out), (token, out)


def test_cli_runs_plain_function_with_flags(server: Server, tmp_path: Path) -> None:
    path = write_app(tmp_path, """
        import flare
        app = flare.App()

        @app.function()
        def add(a: int, b: int = 2, loud: bool = False) -> str:
            s = str(a + b)
            return s + "!" if loud else s
    """)
    r = run_cli("run", f"{path}::add", "--a", "40", "--loud")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "42!"


def test_cli_user_errors_are_one_line(server: Server, tmp_path: Path) -> None:
    r = run_cli("run", str(tmp_path / "missing.py"))
    assert r.returncode != 0 and r.stderr.startswith("Error: file not found")
    path = write_app(tmp_path, """
        import flare
        app = flare.App()

        @app.local_entrypoint()
        def one(n: int): pass

        @app.local_entrypoint()
        def two(): pass
    """)
    r = run_cli("run", str(path))
    assert r.returncode != 0 and r.stderr.startswith("Error:") and "Hint:" in r.stderr
    r = run_cli("run", f"{path}::one", "--n", "1", "--bogus", "1")
    assert r.returncode != 0 and "Error: unknown option" in r.stderr
    r = run_cli("run", f"{path}::one")  # required --n missing
    assert r.returncode != 0 and r.stderr.startswith("Error:") and "--n" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_remote_exception_prints_traceback(server: Server, tmp_path: Path) -> None:
    path = write_app(tmp_path, """
        import flare
        app = flare.App()

        @app.function()
        def boom():
            raise ValueError("user bug 123")

        @app.local_entrypoint()
        def main():
            boom.remote()
    """)
    r = run_cli("run", str(path))
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "ValueError: user bug 123" in r.stderr
    assert 'raise ValueError("user bug 123")' in r.stderr  # the remote frame


# ------------------------------------------------------------------- calling


BASIC = """
import os, time
import flare
app = flare.App()

@app.function()
def square(x):
    return x * x

@app.function()
def add(a, b, scale=1):
    return (a + b) * scale

@app.function()
def fail_on(x, bad=3):
    if x == bad:
        raise ValueError(f"bad {x}")
    return x

@app.function()
def sleepy(s):
    time.sleep(s)
    return s

@app.function()
def gen(n):
    for i in range(n):
        yield i * 2

@app.function()
def identity(x):
    return x

@app.function()
def where(_=None):
    return flare.is_local(), flare.current_input_id(), flare.current_function_call_id(), os.environ.get("FLARE_CONTAINER_ID")
"""


@pytest.fixture(scope="module")
def basic(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Any:
    mod = load_app(tmp_path_factory.mktemp("basic"), BASIC)
    with mod.app.run():
        yield mod


def test_remote_and_local(basic: Any) -> None:
    assert basic.square.remote(4) == 16
    assert basic.square.local(5) == 25
    assert basic.add.remote(1, 2, scale=3) == 9
    assert basic.square.get_raw_f()(3) == 9


def test_map_starmap_for_each(basic: Any) -> None:
    assert list(basic.square.map(range(100))) == [x * x for x in range(100)]
    assert list(basic.add.map([1, 2], [10, 20], kwargs={"scale": 2})) == [22, 44]
    assert list(basic.add.starmap([(1, 2), (3, 4)])) == [3, 7]
    assert sorted(basic.square.map(range(10), order_outputs=False)) == sorted(x * x for x in range(10))
    assert basic.square.for_each(range(5)) is None
    assert list(basic.square.map([])) == []


def test_map_exceptions(basic: Any) -> None:
    with pytest.raises(ValueError, match="bad 3"):
        list(basic.fail_on.map(range(6)))
    out = list(basic.fail_on.map(range(6), return_exceptions=True))
    assert out[:3] == [0, 1, 2] and out[4:] == [4, 5]
    assert isinstance(out[3], ValueError)
    basic.fail_on.for_each(range(6), ignore_exceptions=True)
    with pytest.raises(ValueError):
        basic.fail_on.for_each(range(6))


def test_map_of_many_inputs(basic: Any) -> None:
    # Correctness of a large map; its throughput target is measured by bench/bench.py,
    # not asserted here (a shared machine's load would make a timed test flaky).
    n = 20000
    t0 = time.perf_counter()
    total = sum(basic.identity.map(range(n)))
    rate = n / (time.perf_counter() - t0)
    assert total == sum(range(n))
    print(f"map of {n} inputs: {rate:.0f} inputs/s")


def test_spawn_get_gather_from_id(basic: Any) -> None:
    call = basic.square.spawn(7)
    assert isinstance(call, flare.FunctionCall) and call.object_id
    assert call.get() == 49
    assert flare.FunctionCall.from_id(call.object_id).get() == 49
    calls = [basic.square.spawn(i) for i in range(5)]
    assert flare.FunctionCall.gather(*calls) == [0, 1, 4, 9, 16]


def test_get_timeout(basic: Any) -> None:
    call = basic.sleepy.spawn(3)
    with pytest.raises(exception.TimeoutError) as info:
        call.get(timeout=0.2)
    assert isinstance(info.value, builtins.TimeoutError)
    assert call.get(timeout=30) == 3


def test_cancel(basic: Any) -> None:
    call = basic.sleepy.spawn(60)
    time.sleep(1.0)
    t0 = time.monotonic()
    call.cancel()
    with pytest.raises((exception.InputCancellation, exception.ExecutionError)):
        call.get(timeout=30)
    assert time.monotonic() - t0 < 30


def test_spawn_map(basic: Any) -> None:
    call = basic.square.spawn_map(range(10))
    assert isinstance(call, flare.FunctionCall)
    assert call.get(timeout=60) == [x * x for x in range(10)]


def test_remote_gen(basic: Any) -> None:
    assert list(basic.gen.remote_gen(4)) == [0, 2, 4, 6]
    with pytest.raises(exception.InvalidError, match="remote_gen"):
        basic.gen.remote(3)


def test_aio_variants(basic: Any) -> None:
    async def agen(n: int) -> Any:
        for i in range(n):
            yield i

    async def main() -> None:
        assert await basic.square.remote.aio(6) == 36
        assert [x async for x in basic.square.map.aio(range(5))] == [0, 1, 4, 9, 16]
        assert [x async for x in basic.square.map.aio(agen(4))] == [0, 1, 4, 9]
        assert [x async for x in basic.add.starmap.aio([(1, 1)])] == [2]
        assert [x async for x in basic.gen.remote_gen.aio(3)] == [0, 2, 4]
        call = await basic.square.spawn.aio(9)
        assert await call.get.aio() == 81
        calls = [await basic.square.spawn.aio(i) for i in range(3)]
        assert await flare.FunctionCall.gather.aio(*calls) == [0, 1, 4]
        await basic.square.for_each.aio(range(3))

    asyncio.run(main())


def test_is_local_and_current_ids(basic: Any) -> None:
    assert flare.is_local() is True
    assert flare.current_input_id() is None
    is_local, input_id, call_id, container_id = basic.where.remote()
    assert is_local is False
    assert input_id and call_id and container_id
    ids = list(basic.where.map(range(3)))
    assert len({i[1] for i in ids}) == 3  # one input id per input
    assert len({i[2] for i in ids}) == 1  # one call for the whole map


def test_user_exception_keeps_type_and_traceback(basic: Any) -> None:
    with pytest.raises(ValueError, match="bad 3") as info:
        basic.fail_on.remote(3)
    cause = info.value.__cause__
    assert isinstance(cause, exception.RemoteTraceback)
    assert 'raise ValueError(f"bad {x}")' in str(cause) and "in fail_on" in str(cause)


def test_unpicklable_argument(basic: Any) -> None:
    import threading

    with pytest.raises(exception.SerializationError, match="lock"):
        basic.identity.remote(threading.Lock())


def test_big_argument_and_result(basic: Any) -> None:
    import os

    blob = os.urandom(10 * 1024 * 1024)
    assert basic.identity.remote(blob) == blob


def test_unpicklable_result(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, """
        import flare
        app = flare.App()

        @app.function()
        def lock():
            import threading
            return threading.Lock()
    """)
    with mod.app.run():
        with pytest.raises(exception.SerializationError, match="lock"):
            mod.lock.remote()


def test_unhydrated_function_is_a_clear_error(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, """
        import flare
        app = flare.App()

        @app.function()
        def f():
            return 1
    """)
    with pytest.raises(exception.ExecutionError, match="app.run"):
        mod.f.remote()


def test_image_must_be_an_image() -> None:
    app = flare.App()
    with pytest.raises(exception.InvalidError, match="must be a flare.Image"):
        app.function(image=object())


def test_local_function_is_serialized(server: Server) -> None:
    app = flare.App("locals")

    def make() -> Any:
        factor = 3

        @app.function()
        def times(x: int) -> int:
            return x * factor

        return times

    times = make()
    with app.run():
        assert times.remote(5) == 15


# --------------------------------------------------------------- by name / nested


def test_from_name_deployed(server: Server, tmp_path: Path) -> None:
    name = unique("deployed")
    path = write_app(tmp_path, f"""
        import flare
        app = flare.App({name!r})

        @app.function()
        def triple(x):
            return 3 * x
    """)
    r = run_cli("deploy", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        f = flare.Function.from_name(name, "triple")
        assert f.remote(5) == 15
        assert list(f.map([1, 2])) == [3, 6]
        with pytest.raises(exception.NotFoundError):
            flare.Function.from_name(unique("no_such_app"), "triple").remote(1)
        with pytest.raises(exception.NotFoundError):
            flare.Function.from_name(name, "no_such_function").remote(1)
        r = run_cli("app", "list")
        assert r.returncode == 0 and name in r.stdout
    finally:
        run_cli("app", "stop", name)


def test_call_from_inside_container(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, """
        import flare
        app = flare.App()

        @app.function()
        def inner(x):
            return x + 1

        @app.function()
        def outer(x):
            return inner.remote(x) * 10, list(inner.map(range(3)))
    """)
    with mod.app.run():
        assert mod.outer.remote(1) == (20, [1, 2, 3])


def test_concurrent_inputs(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, """
        import os, threading, time
        import flare
        app = flare.App()

        @app.function(max_containers=1)
        @flare.concurrent(max_inputs=4)
        def slow(x):
            time.sleep(2)
            return os.environ["FLARE_CONTAINER_ID"], threading.get_ident()
    """)
    with mod.app.run():
        mod.slow.remote(0)  # warm the one container
        t0 = time.monotonic()
        out = list(mod.slow.map(range(4)))
        elapsed = time.monotonic() - t0
    assert len({c for c, _ in out}) == 1  # all in one container
    assert len({t for _, t in out}) == 4  # on four threads
    assert elapsed < 6, f"4 inputs x 2 s with max_inputs=4 took {elapsed:.1f} s"


# -------------------------------------------------------------- failures


def test_import_error_in_container(server: Server, tmp_path: Path) -> None:
    path = write_app(tmp_path, """
        import flare
        if not flare.is_local():
            import module_that_only_fails_remotely
        app = flare.App()

        @app.function()
        def f():
            return 1

        @app.local_entrypoint()
        def main():
            f.remote()
    """)
    t0 = time.monotonic()
    r = run_cli("run", str(path), timeout=120)
    assert time.monotonic() - t0 < 120
    assert r.returncode == 1
    assert "module_that_only_fails_remotely" in r.stderr
    assert "import module_that_only_fails_remotely" in r.stderr  # the remote traceback


def test_timeout(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, """
        import time
        import flare
        app = flare.App()

        @app.function(timeout=2)
        def forever():
            time.sleep(120)
    """)
    with mod.app.run():
        t0 = time.monotonic()
        with pytest.raises(exception.FunctionTimeoutError):
            mod.forever.remote()
        assert time.monotonic() - t0 < 30


def test_out_of_memory(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, """
        import flare
        app = flare.App()

        @app.function(memory=128)
        def hog():
            chunks = []
            for _ in range(64):
                chunks.append(bytearray(32 * 1024 * 1024))
            return len(chunks)
    """)
    with mod.app.run():
        with pytest.raises(exception.OutOfMemoryError) as info:
            mod.hog.remote()
    msg = str(info.value)
    assert "128" in msg, msg
    assert "oom" in msg.lower() or "out of memory" in msg.lower(), msg


KILLER = """
import os
import flare
app = flare.App()

@app.function(max_containers=1, retries={retries})
def victim(kill_in_container=None):
    me = os.environ["FLARE_CONTAINER_ID"]
    if me == kill_in_container:
        os.kill(os.getpid(), 9)
    return me
"""


def test_killed_runner_is_retried(server: Server, tmp_path: Path) -> None:
    # The side channel is the container id: the first attempt runs in the one warm
    # container (max_containers=1) and kills it; the retry needs a new container.
    mod = load_app(tmp_path, KILLER.format(retries="flare.Retries(max_retries=2, initial_delay=0.1, backoff_coefficient=1.0)"))
    with mod.app.run():
        first = mod.victim.remote()
        t0 = time.monotonic()
        second = mod.victim.remote(first)
        assert second != first
        assert time.monotonic() - t0 < 60


def test_killed_runner_without_retries_fails_clearly(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, KILLER.format(retries="None"))
    with mod.app.run():
        first = mod.victim.remote()
        t0 = time.monotonic()
        with pytest.raises(exception.ExecutionError):
            mod.victim.remote(first)
        assert time.monotonic() - t0 < 60


def test_no_server_is_a_connection_error(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("FLARE_SERVER_URL", dead)
    app = flare.App()

    @app.function()
    def f() -> int:
        return 1

    with pytest.raises(exception.ConnectionError) as info:
        with app.run():
            pass
    assert dead in str(info.value) and "flare server start" in str(info.value)
    path = write_app(tmp_path, """
        import flare
        app = flare.App()

        @app.local_entrypoint()
        def main():
            pass
    """)
    r = run_cli("run", str(path), env={"FLARE_SERVER_URL": dead})
    assert r.returncode != 0
    assert r.stderr.startswith("Error:") and "flare server start" in r.stderr and "Traceback" not in r.stderr


def test_flare_run_starts_the_embedded_server_when_none_is_configured(tmp_path: Path) -> None:
    # The README's main path: no FLARE_SERVER_URL, nothing listening on the default port,
    # so `flare run` starts `flared server` in the background under FLARE_HOME and uses it.
    import socket
    import subprocess

    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 7878)) == 0:
            pytest.skip("something already listens on the default port 127.0.0.1:7878")
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "FLARE_SERVER_URL"}
    env["FLARE_HOME"] = str(home)
    env["PYTHONPATH"] = str(PYTHON_DIR) + os.pathsep + env.get("PYTHONPATH", "")
    app = write_app(tmp_path, """
        import flare
        app = flare.App()

        @app.function()
        def square(x):
            return x * x

        @app.local_entrypoint()
        def main():
            print("result", square.remote(7))
    """)
    try:
        r = subprocess.run([sys.executable, "-m", "flare.cli", "run", str(app)],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stdout + r.stderr + (home / "flared.log").read_text()
        assert "result 49" in r.stdout
        assert (home / "flared.pid").exists()
    finally:
        stop = subprocess.run([sys.executable, "-m", "flare.cli", "server", "stop"],
                              capture_output=True, text=True, timeout=60, env=env)
    assert "Stopped flared" in stop.stdout, stop.stdout + stop.stderr

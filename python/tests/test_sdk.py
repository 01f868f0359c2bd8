"""SDK behaviour that needs no server: import cost, decorators, serialization, errors, CLI parsing."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import flare
from flare import exception
from flare._serialization import b64, exception_from_output, serialize_args
from flare._transport import Client

SDK_PARENT = str(Path(flare.__file__).resolve().parents[1])


def _run_py(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full["PYTHONPATH"] = SDK_PARENT
    full.pop("PYTHONDONTWRITEBYTECODE", None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=full)


def test_import_flare_is_cheap() -> None:
    _run_py("import flare")  # warm the .pyc cache
    r = _run_py("import flare")
    lines = [ln for ln in r.stderr.splitlines() if ln.rstrip().endswith("| flare")]
    assert lines, r.stderr
    cumulative_us = int(lines[-1].split("|")[1])
    assert cumulative_us < 5000, lines[-1]
    heavy = ("asyncio", "http.client", "json", "typing", "threading", "cloudpickle", "socket")
    r = _run_py("import sys, flare; app = flare.App('x'); f = app.function()(lambda x: x); "
                f"print([m for m in {heavy!r} if m in sys.modules])")
    assert r.returncode == 0, r.stderr
    imported = eval(r.stdout.strip())  # noqa: S307 - our own printout
    preloaded = eval(_run_py(f"import sys; print([m for m in {heavy!r} if m in sys.modules])").stdout.strip())  # noqa: S307
    assert set(imported) <= set(preloaded), f"decorating a function imported {set(imported) - set(preloaded)}"


def test_public_names() -> None:
    for name in ["App", "Function", "FunctionCall", "Retries", "concurrent", "is_local", "current_input_id",
                 "current_function_call_id", "enable_output", "exception", "Error"]:
        assert getattr(flare, name) is not None
    assert issubclass(exception.TimeoutError, TimeoutError)
    assert issubclass(exception.ConnectionError, ConnectionError)
    with pytest.raises(AttributeError):
        flare.nope  # noqa: B018


def test_function_decorator_config() -> None:
    app = flare.App("cfg")

    @app.function(cpu=0.5, memory=256, timeout=10, retries=3, env={"A": "1"}, max_containers=2)
    @flare.concurrent(max_inputs=8, target_inputs=4)
    def f(x: int) -> int:
        return x + 1

    assert isinstance(f, flare.Function)
    assert f.local(1) == 2 and f.get_raw_f()(2) == 3
    assert f._config["max_inputs"] == 8 and f._config["target_inputs"] == 4
    assert f._config["retries"] == {"max_retries": 3, "backoff_coefficient": 1.0, "initial_delay": 1.0, "max_delay": 60.0}
    assert app.registered_functions == {"f": f}

    @app.function()
    def g() -> object:
        yield 1

    assert g.is_generator
    with pytest.raises(exception.InvalidError, match="remote_gen"):
        g.remote()
    with pytest.raises(exception.InvalidError):
        app.function(cpu=1000)
    with pytest.raises(exception.InvalidError, match="must be a flare.Image"):
        app.function(image="debian")
    with pytest.raises(exception.InvalidError):
        flare.Retries(max_retries=99)


def test_locals_are_auto_serialized() -> None:
    app = flare.App()

    def make() -> flare.Function:
        @app.function()
        def inner() -> int:
            return 1

        return inner  # type: ignore[no-any-return]

    assert make()._serialized


def test_unhydrated_remote_is_clear() -> None:
    app = flare.App()
    f = app.function()(lambda: 1)
    with pytest.raises(exception.ExecutionError, match="app.run"):
        f.remote()


def test_serialize_args_names_unpicklable_type() -> None:
    with pytest.raises(exception.SerializationError, match="lock"):
        serialize_args((1, [threading.Lock()]), {})
    data = serialize_args((1, "a"), {"k": lambda: 2})
    args, kwargs = pickle.loads(data)
    assert args == (1, "a") and kwargs["k"]() == 2


def test_remote_exceptions_are_rebuilt() -> None:
    tb = 'Traceback (most recent call last):\n  File "/root/app.py", line 3, in f\nValueError: x\n'
    out = {"status": "failure", "data": b64(pickle.dumps(ValueError("x"))),
           "exception": {"type": "builtins.ValueError", "message": "x", "traceback": tb}}
    exc = exception_from_output(out)
    assert type(exc) is ValueError and isinstance(exc.__cause__, exception.RemoteTraceback)
    assert "/root/app.py" in str(exc.__cause__)
    out = {"status": "failure", "data": None, "exception": {"type": "somewhere.Custom", "message": "m", "traceback": tb}}
    exc = exception_from_output(out)
    assert isinstance(exc, exception.RemoteError) and str(exc) == "somewhere.Custom: m"
    for status, type_name, cls in [
        ("timeout", "flare.exception.FunctionTimeoutError", exception.FunctionTimeoutError),
        ("terminated", "flare.exception.OutOfMemoryError", exception.OutOfMemoryError),
        ("terminated", "", exception.ExecutionError),
        ("init_failure", "builtins.ModuleNotFoundError", exception.ExecutionError),
    ]:
        exc = exception_from_output({"status": status, "exception": {"type": type_name, "message": "msg", "traceback": tb}}, "f")
        assert type(exc) is cls, (status, exc)
    exc = exception_from_output({"status": "terminated", "exception": {"type": "", "message": "cancelled", "traceback": ""}})
    assert isinstance(exc, exception.InputCancellation)


def test_connection_refused_names_url_and_fix() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = Client(f"http://127.0.0.1:{port}")
    with pytest.raises(exception.ConnectionError) as info:
        c.request("GET", "/v1/health")
    assert f"127.0.0.1:{port}" in str(info.value) and "flare server start" in str(info.value)
    c = Client("unix:///nonexistent/api.sock")
    with pytest.raises(exception.ConnectionError):
        c.request("GET", "/v1/health")


def test_error_bodies_map_to_exceptions() -> None:
    from flare._transport import _error_from_response

    assert isinstance(_error_from_response(404, b'{"error":{"code":"not_found","message":"no app x"}}', "GET", "/"), exception.NotFoundError)
    assert isinstance(_error_from_response(400, b'{"error":{"code":"invalid_argument","message":"m"}}', "GET", "/"), exception.InvalidError)
    assert isinstance(_error_from_response(502, b"gateway", "GET", "/"), exception.ServerError)


def _cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SDK_PARENT
    env["FLARE_SERVER_URL"] = "http://127.0.0.1:9"  # nothing listens there
    return subprocess.run([sys.executable, "-m", "flare.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_cli_errors(tmp_path: Path) -> None:
    r = _cli("--version")
    assert r.returncode == 0 and "flare 0.1.0" in r.stdout
    r = _cli("run", str(tmp_path / "nope.py"))
    assert r.returncode == 1 and r.stderr.startswith("Error: file not found")
    app_file = tmp_path / "two.py"
    app_file.write_text(textwrap.dedent("""
        import flare
        app = flare.App()

        @app.local_entrypoint()
        def a(n: int, flag: bool = False): print("a", n, flag)

        @app.local_entrypoint()
        def b(): pass
    """))
    r = _cli("run", str(app_file))
    assert r.returncode == 1 and "several local entrypoints" in r.stderr and "Hint:" in r.stderr
    r = _cli("run", f"{app_file}::a", "--bogus", "1", "--n", "2")
    assert r.returncode == 1 and r.stderr.startswith("Error:") and "--bogus" in r.stderr
    r = _cli("run", f"{app_file}::a", "--n", "2")
    assert r.returncode == 1 and r.stderr.startswith("Error:") and "flare server start" in r.stderr
    assert "Traceback" not in r.stderr


def test_entrypoint_flags() -> None:
    from flare.cli._load import _parse_entry_args

    def main(n: int, ratio: float = 0.5, name: str = "x", dry_run: bool = False) -> None: ...

    assert _parse_entry_args(main, ["--n", "3", "--dry-run"], "p") == {"n": 3, "ratio": 0.5, "name": "x", "dry_run": True}
    assert _parse_entry_args(main, ["--n", "1", "--ratio", "2", "--no-dry-run", "--name", "y"], "p") == {
        "n": 1, "ratio": 2.0, "name": "y", "dry_run": False}


def test_mount_collects_local_modules(tmp_path: Path) -> None:
    from flare._mount import collect_files, module_name_for

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "helper.py").write_text("X = 1\n")
    (tmp_path / "main.py").write_text("import pkg.helper\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import pkg.helper  # noqa: F401

        paths = {f["path"] for f in collect_files(str(tmp_path / "main.py"))}
    finally:
        sys.path.remove(str(tmp_path))
        for m in ("pkg", "pkg.helper"):
            sys.modules.pop(m, None)
    assert {"main.py", "pkg/__init__.py", "pkg/helper.py"} <= paths
    assert any(p.startswith("pkg/__pycache__/helper.") and p.endswith(".pyc") for p in paths)
    assert not any("site-packages" in p or p.startswith("flare/") for p in paths)
    assert module_name_for(str(tmp_path / "pkg" / "helper.py"), str(tmp_path)) == "pkg.helper"

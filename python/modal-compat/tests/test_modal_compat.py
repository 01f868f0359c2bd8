"""The compatibility package without a server: its marker, that Modal's names are Flare's
objects, the clear error for names Flare lacks, ``modal.exception``, and the ``modal``
console script."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

COMPAT_DIR = Path(__file__).resolve().parents[1]
PYTHON_DIR = COMPAT_DIR.parent
for p in (str(PYTHON_DIR), str(COMPAT_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

import modal  # noqa: E402
import modal.exception  # noqa: E402

import flare  # noqa: E402
import flare.exception  # noqa: E402

# Names both have today; each must be Flare's own object.
SHARED = [
    "App", "Error", "FilePatternMatcher", "Function", "FunctionCall", "Image", "Retries",
    "concurrent", "current_function_call_id", "current_input_id", "enable_output", "is_local",
    "Cls", "enter", "exit", "method", "parameter", "batched",
    "fastapi_endpoint", "web_endpoint", "asgi_app", "wsgi_app", "web_server", "Dict", "Queue", "Cron", "Period",
    "Volume",
]
MISSING = ["Secret", "Sandbox", "Server", "Client"]
NOT_APPLICABLE = ["Proxy", "SchedulerPlacement", "billing"]


def test_it_is_this_package() -> None:
    assert modal.__flare_compat__ is True
    assert Path(modal.__file__).resolve().parent == COMPAT_DIR / "modal"


@pytest.mark.parametrize("name", SHARED)
def test_shared_names_are_flares(name: str) -> None:
    assert getattr(modal, name) is getattr(flare, name)
    assert name in modal.__all__
    ns: dict[str, object] = {}
    exec(f"from modal import {name} as x", ns)
    assert ns["x"] is getattr(flare, name)


def test_version_is_flares() -> None:
    assert modal.__version__ == flare.__version__


def test_every_flare_name_modal_has_is_mapped() -> None:
    # A Modal name Flare gains is picked up without a change to the package.
    for name in modal.MODAL_NAMES:
        if name in flare.__all__:
            assert getattr(modal, name) is getattr(flare, name)
            assert name in modal.__all__
        else:
            assert name not in modal.__all__


@pytest.mark.parametrize("name", MISSING)
def test_missing_names_raise_a_clear_error(name: str) -> None:
    assert name not in flare.__all__, f"Flare has {name} now: move it to SHARED"
    with pytest.raises(ImportError, match=rf"^modal\.{name} is not available in Flare yet \(.*see docs/COMPAT\.md\)$"):
        getattr(modal, name)
    # `from modal import X` shows the same message, not Python's "cannot import name".
    with pytest.raises(ImportError, match=rf"modal\.{name} is not available in Flare yet"):
        exec(f"from modal import {name}", {})


def test_the_error_names_the_issue() -> None:
    with pytest.raises(ImportError, match=r"\(#14; see docs/COMPAT\.md\)"):
        _ = modal.Secret
    with pytest.raises(ImportError, match=r"\(#12 .*; see docs/COMPAT\.md\)"):
        _ = modal.Server


@pytest.mark.parametrize("name", NOT_APPLICABLE)
def test_not_applicable_names_say_so(name: str) -> None:
    with pytest.raises(ImportError, match=rf"^modal\.{name} has no equivalent in Flare \(.+; see docs/COMPAT\.md\)$"):
        getattr(modal, name)


def test_unknown_names_are_plain_attribute_errors() -> None:
    assert not hasattr(modal, "no_such_name")
    assert not hasattr(modal, "__wrapped__")
    with pytest.raises(ImportError, match="cannot import name"):
        exec("from modal import no_such_name", {})


def test_star_import_gives_the_shared_names() -> None:
    ns: dict[str, object] = {}
    exec("from modal import *", ns)
    assert ns["App"] is flare.App and "Secret" not in ns


def test_dir_lists_no_missing_name() -> None:
    names = dir(modal)
    assert "App" in names and "exception" in names and "Secret" not in names


def test_stub_is_app_with_a_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert modal.Stub is flare.App
    assert any(issubclass(w.category, DeprecationWarning) and "App" in str(w.message) for w in caught)


# ------------------------------------------------------------------ exceptions

SAME_EXCEPTIONS = [
    "Error", "NotFoundError", "InvalidError", "ConflictError", "ExecutionError", "RemoteError",
    "ImageBuildError", "FunctionTimeoutError", "InputCancellation", "SerializationError",
    "DeserializationError", "TimeoutError", "ConnectionError", "ResourceExhaustedError",
]


@pytest.mark.parametrize("name", SAME_EXCEPTIONS)
def test_exceptions_are_flares(name: str) -> None:
    assert getattr(modal.exception, name) is getattr(flare.exception, name)
    assert name in modal.exception.__all__


def test_renamed_exceptions() -> None:
    assert modal.exception.InternalError is flare.exception.ServerError
    assert modal.exception.RequestSizeError is flare.exception.PayloadTooLargeError
    from modal.exception import InternalError, RequestSizeError

    assert InternalError is flare.exception.ServerError and RequestSizeError is flare.exception.PayloadTooLargeError


def test_modal_error_catches_flare_errors() -> None:
    with pytest.raises(modal.Error):
        raise flare.exception.NotFoundError("x")
    with pytest.raises(modal.exception.RequestSizeError):
        raise flare.exception.PayloadTooLargeError("big")


@pytest.mark.parametrize("name", ["AuthError", "AlreadyExistsError", "SandboxTimeoutError", "VersionError",
                                  "PermissionDeniedError", "ClientClosed"])
def test_missing_exceptions_raise_a_clear_error(name: str) -> None:
    with pytest.raises(ImportError, match=rf"^modal\.exception\.{name} is not available in Flare yet"):
        getattr(modal.exception, name)
    with pytest.raises(ImportError, match=rf"modal\.exception\.{name} is not available in Flare yet"):
        exec(f"from modal.exception import {name}", {})
    assert name not in modal.exception.__all__


def test_exception_module_is_modals_name_for_it() -> None:
    assert modal.exception.__name__ == "modal.exception"
    assert "flare_compat" not in modal.exception.__all__
    with pytest.raises(AttributeError):
        modal.exception.NoSuchError  # noqa: B018


# ------------------------------------------------------------------ submodules


@pytest.mark.parametrize("module,name", [
    ("modal.app", "App"), ("modal.functions", "Function"), ("modal.functions", "FunctionCall"),
    ("modal.image", "Image"), ("modal.retries", "Retries"), ("modal.output", "enable_output"),
    ("modal.file_pattern_matcher", "FilePatternMatcher"), ("modal.partial_function", "concurrent"),
])
def test_submodules(module: str, name: str) -> None:
    mod = importlib.import_module(module)
    assert getattr(mod, name) is getattr(flare, name)
    assert name in mod.__all__


def test_partial_function_decorators() -> None:
    ns: dict[str, object] = {}
    exec("from modal.partial_function import enter, exit, method, batched", ns)
    assert ns["method"] is flare.method and ns["enter"] is flare.enter and ns["exit"] is flare.exit
    assert ns["batched"] is flare.batched
    exec("from modal.partial_function import asgi_app, wsgi_app, fastapi_endpoint, web_endpoint, web_server", ns)
    assert ns["asgi_app"] is flare.asgi_app and ns["wsgi_app"] is flare.wsgi_app
    assert ns["fastapi_endpoint"] is flare.fastapi_endpoint and ns["web_endpoint"] is flare.web_endpoint
    assert ns["web_server"] is flare.web_server


@pytest.mark.parametrize("sub", ["cls", "secret", "sandbox", "runner", "config"])
def test_missing_submodules_raise_a_clear_error(sub: str) -> None:
    with pytest.raises(ImportError, match=rf"^modal\.{sub} (is not available in Flare yet|has no equivalent in Flare)"):
        importlib.import_module(f"modal.{sub}")
    assert f"modal.{sub}" not in sys.modules


def test_finder_leaves_other_modules_alone() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("modal.no_such_submodule")


def test_import_modal_imports_little() -> None:
    # Containers import it at cold start: nothing of Flare's beyond its lazy __init__.
    code = ("import sys, modal; modal.exception.NotFoundError; "
            "print(sorted(m for m in sys.modules if m.startswith(('flare', 'cloudpickle', 'blake3'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(COMPAT_DIR), str(PYTHON_DIR)])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "['flare', 'flare.exception']", out.stdout


# --------------------------------------------------------------------- the command


def _script_target() -> str:
    text = (COMPAT_DIR / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert section
    m = re.search(r'^modal\s*=\s*"([\w.:]+)"', section.group(1), re.M)
    assert m, "no `modal` console script"
    return m.group(1)


def test_console_script_resolves() -> None:
    module_name, _, attr = _script_target().partition(":")
    fn = getattr(importlib.import_module(module_name), attr)
    assert callable(fn)


def test_console_script_runs_flares_cli() -> None:
    from modal.__main__ import _from_pyproject, flare_cli

    # Flare's own pyproject names its CLI; the `modal` command finds the same function.
    flare_text = (PYTHON_DIR / "pyproject.toml").read_text()
    m = re.search(r'^flare\s*=\s*"([\w.]+):([\w.]+)"', flare_text, re.M)
    assert m
    expected = getattr(importlib.import_module(m.group(1)), m.group(2))
    assert flare_cli() is expected
    assert _from_pyproject() == f"{m.group(1)}:{m.group(2)}"


def _run_modal(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(COMPAT_DIR), str(PYTHON_DIR)])}
    return subprocess.run([sys.executable, "-m", "modal", *args], capture_output=True, text=True, env=env, timeout=60)


def test_python_m_modal_is_flares_cli() -> None:
    r = _run_modal("--help")
    assert r.returncode == 0, r.stderr
    assert "run" in r.stdout and "deploy" in r.stdout
    r = _run_modal("--version")
    assert r.returncode == 0 and flare.__version__ in r.stdout + r.stderr


def test_modal_commands_flare_lacks_get_flares_error() -> None:
    r = _run_modal("secret", "list")
    assert r.returncode == 2 and "invalid choice: 'secret'" in r.stderr


def test_main_with_argv_restores_sys_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    import modal.__main__ as entry

    seen: list[list[str]] = []
    monkeypatch.setattr(entry, "flare_cli", lambda: (lambda: seen.append(list(sys.argv)) or 0))
    before = list(sys.argv)
    assert entry.main(["app", "list"]) == 0
    assert seen[0][1:] == ["app", "list"] and sys.argv == before


def test_wheel_has_the_console_script(tmp_path: Path) -> None:
    """`pip install ./python/modal-compat` installs the package and a `modal` script (where
    pip can build a wheel here without the network)."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "--no-index",
                        "-w", str(tmp_path), str(COMPAT_DIR)], capture_output=True, text=True, timeout=300)
    wheels = list(tmp_path.glob("flare_modal_compat-*.whl"))
    if r.returncode != 0 or not wheels:
        pytest.skip(f"pip cannot build the wheel offline here: {r.stderr.strip().splitlines()[-1:]}")
    import zipfile

    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
        assert "modal/__init__.py" in names and "modal/exception.py" in names
        eps = next(n for n in names if n.endswith("entry_points.txt"))
        assert re.search(r"^modal\s*=\s*modal\.__main__:main$", z.read(eps).decode(), re.M)


def test_stale_metadata_falls_back_to_pyproject(monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed metadata naming a CLI module that is gone (Flare moved it): the command
    still finds the one Flare's pyproject names."""
    import modal.__main__ as entry

    monkeypatch.setattr(entry, "_from_metadata", lambda: "flare_moved_away.cli:main")
    target = entry._from_pyproject()
    assert target is not None
    module_name, _, attr = target.partition(":")
    assert entry.flare_cli() is getattr(importlib.import_module(module_name), attr)


def test_modal_volume_is_flare_volume() -> None:
    import modal
    import modal.volume

    import flare
    import flare.volume

    assert modal.Volume is flare.Volume
    assert modal.volume.Volume is flare.Volume
    assert modal.volume.FileEntry is flare.volume.FileEntry
    assert modal.volume.FileEntryType is flare.volume.FileEntryType


def test_modal_dict_is_flare_dict() -> None:
    import modal
    import modal.dict

    import flare

    assert modal.Dict is flare.Dict
    assert modal.dict.Dict is flare.Dict


def test_modal_queue_is_flare_queue() -> None:
    import modal
    import modal.queue

    import flare

    assert modal.Queue is flare.Queue
    assert modal.queue.Queue is flare.Queue


def test_modal_schedule_is_flare_schedule() -> None:
    import modal
    import modal.schedule

    import flare
    import flare.schedule

    assert modal.Period is flare.Period
    assert modal.Cron is flare.Cron
    assert modal.schedule.Period is flare.Period
    assert modal.schedule.Cron is flare.Cron
    assert modal.schedule.Schedule is flare.schedule.Schedule
    assert isinstance(modal.Period(hours=4), modal.schedule.Schedule)

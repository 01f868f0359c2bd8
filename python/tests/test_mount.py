"""The SDK mount (``flare._mount.sdk_entries``): subpackages, compiled modules, and
Flare's ``modal`` compatibility package."""

from __future__ import annotations

import importlib
import marshal
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from flare import _mount
from flare._blobs import BlobSet


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("FLARE_HOME", str(tmp_path / "home"))
    saved = {k: v for k, v in sys.modules.items() if k == "modal" or k.startswith("modal.")}
    for k in saved:
        del sys.modules[k]
    yield
    for k in [k for k in sys.modules if k == "modal" or k.startswith("modal.")]:
        del sys.modules[k]
    sys.modules.update(saved)
    importlib.invalidate_caches()


def _by_path(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["path"]: e for e in entries}


def _code_filename(blobs: BlobSet, entry: dict[str, Any]) -> str:
    data = blobs.sources[entry["digest"]]
    assert isinstance(data, bytes)
    return str(marshal.loads(data[16:]).co_filename)


def test_sdk_mount_walks_subpackages() -> None:
    blobs = BlobSet()
    entries = _mount.sdk_entries(blobs)
    paths = _by_path(entries)
    tag = sys.implementation.cache_tag
    for pkg in ("flare", "flare/_runtime", "flare/cli", "cloudpickle"):
        assert paths[pkg]["kind"] == "dir" and paths[pkg + "/__pycache__"]["kind"] == "dir", pkg
    for module in ("flare/__init__.py", "flare/_runtime/__main__.py", "flare/_runtime/runner.py", "flare/cli/__init__.py"):
        assert paths[module]["kind"] == "file", module
        d, _, name = module.rpartition("/")
        pyc = paths[f"{d}/__pycache__/{name[:-3]}.{tag}.pyc"]
        # Compiled under the path the module has in containers.
        assert _code_filename(blobs, pyc) == "/__flare/" + module
    assert "flare/py.typed" in paths
    # Every file's parent dir is listed before the file, dirs before files.
    kinds = [e["kind"] for e in entries]
    assert kinds == sorted(kinds)  # "dir" < "file"
    dirs = {e["path"] for e in entries if e["kind"] == "dir"}
    for e in entries:
        parent = e["path"].rpartition("/")[0]
        assert not parent or parent in dirs, e["path"]
    # Data dirs, cached bytecode of the host and non-Python files stay out.
    assert not any(p.startswith("flare/bin") for p in paths)
    assert not any(p.endswith(".pyc") and f".{tag}." not in p for p in paths)
    assert not any(p.startswith("modal") for p in paths) or _mount.modal_compat_dir() is not None


def test_package_tree_skips_non_packages(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    for rel in ("__init__.py", "a.py", "sub/__init__.py", "sub/b.py", "sub/deeper/__init__.py", "sub/deeper/c.py",
                "bin/tool.py", "__pycache__/a.cpython-311.py", ".hidden/__init__.py", "notes.txt", "py.typed"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("X = 1\n")
    dirs, files = _mount._package_tree(str(root))
    assert dirs == ["sub", "sub/deeper"]
    assert files == ["__init__.py", "a.py", "py.typed", "sub/__init__.py", "sub/b.py", "sub/deeper/__init__.py",
                     "sub/deeper/c.py"]


def _make_modal(tmp_path: Path, init: str) -> Path:
    pkg = tmp_path / "site" / "modal"
    (pkg / "experimental").mkdir(parents=True)
    (pkg / "__init__.py").write_text(init)
    (pkg / "app.py").write_text("from flare import App\n")
    (pkg / "experimental" / "__init__.py").write_text("")
    (pkg / "experimental" / "x.py").write_text("Y = 2\n")
    return pkg.parent


def test_flare_modal_compat_package_is_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _make_modal(tmp_path, '"""Modal\'s API on Flare."""\n\n__flare_compat__ = True\nfrom flare import *\n')
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    assert _mount.modal_compat_dir() == str((site / "modal").resolve())
    blobs = BlobSet()
    paths = _by_path(_mount.sdk_entries(blobs))
    tag = sys.implementation.cache_tag
    for d in ("modal", "modal/__pycache__", "modal/experimental", "modal/experimental/__pycache__"):
        assert paths[d]["kind"] == "dir", d
    for f in ("modal/__init__.py", "modal/app.py", "modal/experimental/x.py"):
        assert paths[f]["kind"] == "file", f
    pyc = paths[f"modal/experimental/__pycache__/x.{tag}.pyc"]
    assert _code_filename(blobs, pyc) == "/__flare/modal/experimental/x.py"
    assert "modal" not in sys.modules  # found and read, never imported


@pytest.mark.parametrize("init", ["import sys\n", "# __flare_compat__ = True\n", "__flare_compat__ = False\n"])
def test_a_real_modal_is_never_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, init: str) -> None:
    site = _make_modal(tmp_path, init)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    assert _mount.modal_compat_dir() is None
    paths = _by_path(_mount.sdk_entries(BlobSet()))
    assert not any(p == "modal" or p.startswith("modal/") for p in paths)
    assert "flare/_runtime/runner.py" in paths

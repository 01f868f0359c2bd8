"""Shipping code: the code mount (the user's local modules) and the SDK mount (this
package, cloudpickle and Flare's ``modal`` compatibility package). Client side only."""

from __future__ import annotations

import importlib._bootstrap_external as bootstrap  # the same helpers py_compile uses
import importlib.util
import os
import py_compile
import re
import sys
import tempfile

from ._blobs import BlobSet
from ._home import flare_home

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_SDK_DIR = os.path.dirname(os.path.abspath(__file__))


def _excluded_roots() -> list[str]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, _SDK_DIR}
    return [os.path.realpath(r) for r in roots if r]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_local_file(path: str, entry_dir: str, excluded: list[str]) -> bool:
    if not _under(path, entry_dir):
        return False
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    for root in excluded:
        if _under(path, root) and not _under(entry_dir, root):
            return False
        if _under(path, root) and root == _SDK_DIR:
            return False
    # Anything inside a virtualenv (a directory with pyvenv.cfg above it, below entry_dir).
    d = os.path.dirname(path)
    while _under(d, entry_dir) and d != entry_dir:
        if os.path.exists(os.path.join(d, "pyvenv.cfg")):
            return False
        d = os.path.dirname(d)
    return True


def module_name_for(file: str, entry_dir: str) -> str:
    """The dotted name under which the module at ``file`` imports from the mount root."""
    rel = os.path.relpath(os.path.realpath(file), entry_dir)
    if rel.endswith(".py"):
        rel = rel[:-3]
    parts = rel.split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def collect_files(entry_file: str, blobs: BlobSet | None = None) -> list[dict[str, Any]]:
    """The code mount's file list (see docs/IMAGES.md): the entry file plus every imported
    local module under its directory, each with its compiled ``.pyc``. Contents are added
    to ``blobs`` (digest -> source) for upload."""
    if blobs is None:
        blobs = BlobSet()
    entry_file = os.path.realpath(entry_file)
    entry_dir = os.path.dirname(entry_file)
    excluded = _excluded_roots()
    paths = {entry_file}
    for module in list(sys.modules.values()):
        f = getattr(module, "__file__", None)
        if not f or not f.endswith(".py"):
            continue
        real = os.path.realpath(f)
        if _is_local_file(real, entry_dir, excluded):
            paths.add(real)
    files: list[dict[str, Any]] = []
    for real in sorted(paths):
        rel = os.path.relpath(real, entry_dir).replace(os.sep, "/")
        try:
            st = os.stat(real)
            entry = blobs.file_entry(rel, real, st.st_mode & 0o777)
        except OSError:
            continue
        files.append(entry)
        pyc = _compile(real, rel)
        if pyc is not None:
            # Unchecked-hash .pyc next to the source: the container imports without
            # compiling (the mount is read-only, so it could never cache it itself).
            cache_rel, data = pyc
            files.append(blobs.bytes_entry(cache_rel, data, 0o644))
    dirs = sorted({"/".join(f["path"].split("/")[:i]) for f in files for i in range(1, f["path"].count("/") + 1)})
    return [{"path": d, "kind": "dir", "mode": 0o755} for d in dirs] + files


def _compile(real: str, rel: str) -> tuple[str, bytes] | None:
    cache_rel = importlib.util.cache_from_source(rel)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "x.pyc")
        try:
            py_compile.compile(
                real, cfile=out, dfile="/root/" + rel, doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
            with open(out, "rb") as fh:
                data = fh.read()
        except (py_compile.PyCompileError, OSError, SyntaxError):
            return None
    return cache_rel.replace(os.sep, "/"), data


# Where the SDK mount's packages appear in containers (the worker binds them there).
_SDK_IN_CONTAINER = {"flare": "/__flare/flare", "cloudpickle": "/__flare/cloudpickle", "modal": "/__flare/modal"}

# ``__flare_compat__ = True`` in a ``modal`` package's ``__init__.py`` marks Flare's
# compatibility package (python/modal-compat); any other ``modal`` is never shipped.
_COMPAT_MARKER = re.compile(rb"^__flare_compat__\s*=\s*True\b", re.MULTILINE)


def modal_compat_dir() -> str | None:
    """The dir of Flare's ``modal`` compatibility package if it is what ``import modal``
    finds here, else None (no ``modal``, or a real Modal install). Not imported: its
    ``__init__.py`` is read for the marker."""
    try:
        spec = importlib.util.find_spec("modal")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if len(locations) != 1:
        return None  # not a package, or a namespace package: not ours
    init = os.path.join(locations[0], "__init__.py")
    try:
        with open(init, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return None
    return os.path.realpath(locations[0]) if _COMPAT_MARKER.search(head) else None


def _package_tree(src_dir: str) -> tuple[list[str], list[str]]:
    """The package at ``src_dir``: its subpackage dirs (those with an ``__init__.py``;
    ``__pycache__``, hidden dirs and data dirs such as ``bin/`` are left out) and its
    ``.py``/``py.typed`` files, as paths relative to ``src_dir``, sorted."""
    dirs: list[str] = []
    files: list[str] = []
    for root, subdirs, names in os.walk(src_dir):
        rel_root = os.path.relpath(root, src_dir)
        rel_root = "" if rel_root == "." else rel_root.replace(os.sep, "/") + "/"
        subdirs[:] = sorted(
            d for d in subdirs
            if not d.startswith(".") and d != "__pycache__" and os.path.isfile(os.path.join(root, d, "__init__.py"))
        )
        dirs += [rel_root + d for d in subdirs]
        for name in sorted(names):
            if (name.endswith(".py") or name == "py.typed") and os.path.isfile(os.path.join(root, name)):
                files.append(rel_root + name)
    return sorted(dirs), sorted(files)


def sdk_entries(blobs: BlobSet) -> list[dict[str, Any]]:
    """The SDK mount's file list: this package as ``flare/`` and cloudpickle as
    ``cloudpickle/`` (their ``.py`` files and ``py.typed``, subpackages included), plus
    Flare's ``modal`` compatibility package as ``modal/`` when that is the ``modal``
    importable here; each module with an unchecked-hash ``.pyc`` so containers import
    without compiling. The server binds them under ``/__flare``: the SDK reaches
    containers through the store like user code, never as a host path the client names."""
    packages = [("flare", _SDK_DIR), ("cloudpickle", cloudpickle_dir())]
    modal_dir = modal_compat_dir()
    if modal_dir is not None:
        packages.append(("modal", modal_dir))
    trees = [(pkg, src_dir, *_package_tree(src_dir)) for pkg, src_dir in packages]
    dirs: list[str] = []
    for pkg, _, subdirs, _ in trees:
        dirs += [pkg, pkg + "/__pycache__"]
        for d in subdirs:
            dirs += [f"{pkg}/{d}", f"{pkg}/{d}/__pycache__"]
    # Directories first (top-level ones first, like before), then the files.
    files: list[dict[str, Any]] = [{"path": d, "kind": "dir", "mode": 0o755} for d in sorted(dirs, key=_depth_first_key)]
    for pkg, src_dir, _, names in trees:
        for name in names:
            real = os.path.join(src_dir, *name.split("/"))
            entry = blobs.file_entry(f"{pkg}/{name}", real, 0o644)
            files.append(entry)
            if name.endswith(".py"):
                data = _cached_pyc(real, entry["digest"], f"{_SDK_IN_CONTAINER[pkg]}/{name}")
                if data is not None:
                    cache_rel = importlib.util.cache_from_source(f"{pkg}/{name}").replace(os.sep, "/")
                    files.append(blobs.bytes_entry(cache_rel, data, 0o644))
    return files


def _depth_first_key(path: str) -> tuple[int, str]:
    return (path.count("/"), path)


def _cached_pyc(real: str, digest: str, dfile: str) -> bytes | None:
    """The unchecked-hash ``.pyc`` of source ``real`` (content ``digest``), compiled once
    and kept in the flare home (``pyc-cache/``), keyed by digest and interpreter."""
    tag = sys.implementation.cache_tag or "none"
    key = importlib.util.source_hash(f"{digest} {dfile}".encode()).hex()
    cache_dir = os.path.join(flare_home(), "pyc-cache", tag)
    path = os.path.join(cache_dir, key + ".pyc")
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        pass
    data = _compile_unchecked(real, dfile)
    if data is not None:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".pyc-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: compiled again next time
    return data


def _compile_unchecked(real: str, dfile: str) -> bytes | None:
    try:
        with open(real, "rb") as fh:
            source = fh.read()
        code = compile(source, dfile, "exec", dont_inherit=True)
    except (OSError, SyntaxError, ValueError):
        return None
    pyc = bootstrap._code_to_hash_pyc(code, importlib.util.source_hash(source), checked=False)  # type: ignore[attr-defined]  # private, not in the stubs
    return bytes(pyc)


def cloudpickle_dir() -> str:
    """The cloudpickle package dir (shipped in the SDK mount)."""
    import cloudpickle

    return os.path.dirname(os.path.realpath(str(cloudpickle.__file__)))

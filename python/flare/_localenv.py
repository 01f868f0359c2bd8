"""Capturing the caller's own Python environment into the server's content-addressed store.

Functions without ``image=`` (and no App default image) run on the caller's environment.
Instead of having the worker bind the host's directories, the SDK sends the environment to
the server as a ``local_python`` image base (see docs/IMAGES.md), so that it also works on a
worker on another machine:

- the *roots* are the host dirs that make up the environment, by the same rule as
  ``python_roots`` in the Rust worker;
- every publication scans them (``os.scandir``, one ``lstat`` per entry but for the files
  of ``__pycache__`` dirs, symlinks never followed) and fingerprints the scan (path, size,
  mtime, inode, mode, symlink target);
- a small cache in the flare home maps (server, interpreter, roots, fingerprint) to the
  ``base_key`` the server returned: an unchanged environment is sent by key only (no
  hashing, no upload check);
- otherwise the full file lists are sent, hashing only files the hash cache does not know
  and uploading only the blobs the server lacks. A key the server has forgotten
  (``unknown_base``) falls back to the full form.

``FLARE_LOCAL_PYTHON=bind`` skips all this (the worker binds the host dirs read-only).

Client side only: code that runs in containers never imports this module.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import stat
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import blake3

from . import _api, exception
from ._blobs import BlobSet
from ._home import flare_home
from .image import _BUILD_EVENT_TIMEOUT, _force_build_env, _write, follow_build

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterator, Optional, Tuple

    from ._blobs import HashCache
    from ._transport import Client

    # (path relative to the root, st_mode, size, mtime_ns, inode, symlink target)
    Record = Tuple[str, int, int, int, int, Optional[str]]

# Host dirs that are never captured (the worker's HOST_SYSTEM_PREFIXES): each worker has its own.
SYSTEM_PREFIXES = ("/usr/", "/lib/", "/lib64/", "/lib32/", "/bin/", "/sbin/", "/etc/", "/opt/")

_CACHE_FILE = "local-env-cache.json"
_CACHE_MAX_ENTRIES = 32
# A scan with more entries than this is most likely not a Python environment (say a home
# directory that is on sys.path as the current directory): not captured.
_MAX_ENTRIES_DEFAULT = 1_000_000
# A file modified this recently (ns) may still change within the same mtime tick: a scan
# with one is not remembered as a fingerprint (the hash cache's "racily clean" rule).
_RACY_NS = 2_000_000_000
_HASH_THREADS = 8
_FINGERPRINT_VERSION = 1


class _TooLarge(Exception):
    pass


# ------------------------------------------------------------------ roots


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def python_roots(executable: str, paths: list[str], prefixes: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The smallest set of host dirs holding the Python environment: the interpreter's
    prefix (two levels above the executable), the environment's ``prefixes`` (see
    ``environment_prefixes``) and every existing absolute ``paths`` dir, without ``/`` and
    the system dirs, deduplicated, nested dirs dropped (realpaths). Mirrors
    ``python_roots`` in crates/flare-api (``hostpaths.rs``)."""
    cands: list[str] = []
    prefix = os.path.dirname(os.path.dirname(executable)) if executable else ""
    if prefix and os.path.isabs(prefix):
        cands.append(os.path.realpath(prefix))
    for p in [*prefixes, *paths]:
        if os.path.isabs(p) and os.path.isdir(p):
            cands.append(os.path.realpath(p))
    kept = sorted({c for c in cands if c != "/" and not (c + "/").startswith(SYSTEM_PREFIXES)})
    out: list[str] = []
    for c in kept:
        if not any(_under(c, o) for o in out):
            out.append(c)
    return out


def _symlink_dirs(path: str, what: str) -> tuple[str, list[str]]:
    """Resolve ``path`` as the kernel does, returning its real path and the real dirs
    that hold each symlink followed on the way (a container must have those dirs to
    resolve the same chain). A dangling link or a missing part raises ``InvalidError``
    naming it."""
    dirs: list[str] = []
    todo = [c for c in path.split("/") if c]
    todo.reverse()
    cur = "/"
    hops = 0
    while todo:
        c = todo.pop()
        if c == ".":
            continue
        if c == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, c)
        try:
            st = os.lstat(nxt)
        except OSError:
            raise exception.InvalidError(
                f"The local Python environment cannot be captured: {nxt} ({what}, from {path}) cannot be found"
            ) from None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                raise exception.InvalidError(f"The local Python environment cannot be captured: {path} ({what}) is a symlink loop")
            if cur not in dirs:
                dirs.append(cur)
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur = "/"
            parts = [t for t in target.split("/") if t]
            parts.reverse()
            todo.extend(parts)
        else:
            cur = nxt
    return cur, dirs


def _loaded_libpython() -> str | None:
    """The shared libpython this process runs on (Linux: from /proc/self/maps), if any."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                path = line.rstrip("\n").split(None, 5)[-1] if line.count(" ") >= 5 else ""
                if path.startswith("/") and os.path.basename(path).startswith("libpython"):
                    return path
    except OSError:
        pass
    return None


def environment_prefixes() -> list[str]:
    """The dirs besides ``sys.path`` that running this interpreter needs, as real paths:
    ``sys.prefix``, ``sys.exec_prefix``, ``sys.base_prefix``, ``sys.base_exec_prefix`` (a
    venv's base interpreter with its stdlib and ``bin/``), the prefix of the real
    interpreter the executable's symlink chain ends at, the dirs holding each link of
    that chain, and the dir of a shared ``libpython``. A part that cannot be found is an
    ``InvalidError`` naming it, at capture time (never an ``execve`` failure in a container)."""
    out: list[str] = []

    def add(p: str) -> None:
        if p and p not in out:
            out.append(p)

    for what, p in (("sys.prefix", sys.prefix), ("sys.exec_prefix", sys.exec_prefix),
                    ("sys.base_prefix", sys.base_prefix), ("sys.base_exec_prefix", sys.base_exec_prefix)):
        if not p:
            continue
        real, _ = _symlink_dirs(p, what)
        if not os.path.isdir(real):
            raise exception.InvalidError(f"The local Python environment cannot be captured: {what} {p} is not a directory")
        add(real)
    if sys.executable:
        real, dirs = _symlink_dirs(sys.executable, "the interpreter")
        for d in dirs:
            add(d)
        add(os.path.dirname(os.path.dirname(real)))
    lib = _loaded_libpython()
    if lib is not None:
        real, dirs = _symlink_dirs(lib, "the shared libpython")
        for d in dirs:
            add(d)
        add(os.path.dirname(real))
    return out


def python_info(entry_dir: str | None, sdk_mount: str | None = None) -> dict[str, Any]:
    """The ``python`` part of a function definition. No host paths for the server to bind:
    the SDK and cloudpickle travel as the ``sdk_mount`` (see ``_mount.sdk_entries``), the
    environment as a captured image (or, with ``FLARE_LOCAL_PYTHON=bind``, as host dirs
    the server binds only if its operator allows them)."""
    entry = os.path.realpath(entry_dir) if entry_dir else None
    paths: list[str] = []
    for p in sys.path:
        p = os.path.realpath(p or os.getcwd())
        if p == entry or not os.path.isdir(p) or p in paths:
            continue
        paths.append(p)
    info: dict[str, Any] = {
        "executable": sys.executable,
        "paths": paths,
        "prefixes": environment_prefixes(),
    }
    if sdk_mount:
        info["sdk_mount"] = sdk_mount
    return info


def local_roots(entry_dir: str | None) -> list[str]:
    """The roots of this interpreter's environment for an app whose entry file is in
    ``entry_dir`` (that dir itself is left out: it is shipped as the code mount)."""
    # The current directory (sys.path's "" under `python -m` or an interactive shell) is
    # where the user happens to stand, not part of the environment: it can be a whole
    # source checkout with build outputs. Local modules travel in the code mount.
    cwd = os.path.realpath(os.getcwd())
    paths = [p for p in python_info(entry_dir)["paths"] if os.path.realpath(p) != cwd]
    return python_roots(sys.executable, paths, environment_prefixes())


# ------------------------------------------------------------------ scanning


# The mode recorded for a file in a ``__pycache__`` dir, which is not stat'ed by the scan.
PENDING = -1


def scan_root(root: str, budget: list[int] | None = None, skip: frozenset[str] = frozenset()) -> list[Record]:
    """Every entry below ``root``, dirs before their contents (in the file system's order:
    stable while nothing changes). Symlinks are recorded with their target, never followed;
    special files (sockets, fifos, devices) and entries that vanish mid-scan are skipped; an
    unreadable dir is recorded without its contents; dirs in ``skip`` (absolute) are left
    out. ``budget``: ``[entries left]``, raising ``_TooLarge`` when it runs out.

    Every entry is ``lstat``-ed once, except the files in ``__pycache__`` dirs: CPython only
    ever writes those by an atomic rename, which changes the dir's mtime and the file's
    inode, both recorded (with ``PENDING`` as their mode)."""
    out: list[Record] = []
    app = out.append
    S_ISREG, S_ISDIR, S_ISLNK = stat.S_ISREG, stat.S_ISDIR, stat.S_ISLNK
    left = budget[0] if budget is not None else -1
    stack: list[tuple[str, str, bool]] = [(root, "", False)]
    while stack:
        d, rel, pycache = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                left -= 1
                if pycache:
                    try:
                        if e.is_file(follow_symlinks=False):
                            app((rel + e.name, PENDING, 0, 0, e.inode(), None))
                            continue
                    except OSError:
                        continue
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                m = st.st_mode
                if S_ISREG(m):
                    app((rel + e.name, m, st.st_size, st.st_mtime_ns, st.st_ino, None))
                elif S_ISDIR(m):
                    if skip and e.path in skip:
                        continue
                    r = rel + e.name
                    if e.name == "__pycache__":
                        app((r, m, 0, st.st_mtime_ns, st.st_ino, None))
                        stack.append((e.path, r + "/", True))
                    else:
                        # The dir's mtime is left out: its entries' records say what changed in it.
                        app((r, m, 0, 0, st.st_ino, None))
                        stack.append((e.path, r + "/", False))
                elif S_ISLNK(m):
                    try:
                        target = os.readlink(e.path)
                    except OSError:
                        continue
                    app((rel + e.name, m, 0, 0, st.st_ino, target))
        if left < 0 and budget is not None:
            raise _TooLarge
    if budget is not None:
        budget[0] = left
    return out


def fingerprint(server: str, python: str, scans: list[tuple[str, list[Record]]]) -> str:
    """A digest of everything the scans saw (and of the server and interpreter)."""
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=4)
    p.fast = True  # no memo: the bytes depend on the values only
    p.dump((_FINGERPRINT_VERSION, server, python, scans))
    return blake3.blake3(buf.getbuffer()).hexdigest()


def _racy(scans: list[tuple[str, list[Record]]]) -> bool:
    newest = max((r[3] for _, recs in scans for r in recs), default=0)
    return time.time_ns() - newest <= _RACY_NS


# ------------------------------------------------------------------ fingerprint -> base key cache


def _cache_path() -> str:
    return os.path.join(flare_home(), _CACHE_FILE)


def _load_cache() -> dict[str, str]:
    try:
        with open(_cache_path(), encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict) or raw.get("version") != 1 or not isinstance(raw.get("entries"), dict):
        return {}
    return {k: v for k, v in raw["entries"].items() if isinstance(k, str) and isinstance(v, str)}


def _save_cache(entries: dict[str, str]) -> None:
    while len(entries) > _CACHE_MAX_ENTRIES:
        del entries[next(iter(entries))]  # oldest first
    path = _cache_path()
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".local-env-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"version": 1, "entries": entries}, fh, separators=(",", ":"))
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # a read-only home: the cache is an optimisation only


def _remember(fp: str, base_key: str | None) -> None:
    entries = _load_cache()
    entries.pop(fp, None)
    if base_key:
        entries[fp] = base_key  # re-inserted last: the newest
    _save_cache(entries)


# ------------------------------------------------------------------ file lists


def _resolved(root: str, recs: list[Record]) -> list[Record]:
    """``recs`` sorted by path (so parents come before their contents, in an order that
    does not depend on the file system), with the ``PENDING`` files stat'ed."""
    out: list[Record] = []
    for rec in sorted(recs):
        if rec[1] == PENDING:
            try:
                st = os.lstat(root + "/" + rec[0])
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            rec = (rec[0], st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, None)
        out.append(rec)
    return out


def _file_lists(
    scans: list[tuple[str, list[Record]]], cache: HashCache
) -> tuple[list[dict[str, Any]], dict[str, str], int, int]:
    """``(roots as in the spec, digest -> path, files, files hashed)``. Only files the hash
    cache does not know are read (on several threads); unreadable files are left out."""
    scans = [(root, _resolved(root, recs)) for root, recs in scans]
    digests: dict[str, tuple[str, int] | None] = {}
    todo: list[tuple[str, int, int, int]] = []
    lookup = cache.lookup
    S_ISREG = stat.S_ISREG
    for root, recs in scans:
        for rel, mode, size, mtime, ino, _target in recs:
            if S_ISREG(mode):
                path = root + "/" + rel
                digest = lookup(path, size, mtime, ino)
                if digest is not None:
                    digests[path] = (digest, size)
                else:
                    todo.append((path, size, mtime, ino))

    def hash_one(item: tuple[str, int, int, int]) -> tuple[str, tuple[str, int] | None]:
        path = item[0]
        try:
            return path, cache.hash_known(*item)
        except OSError:
            return path, None  # unreadable, or gone since the scan

    if len(todo) > 1:
        n = min(_HASH_THREADS, os.cpu_count() or 1, len(todo))
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="flare-hash") as pool:
            digests.update(pool.map(hash_one, todo))
    else:
        digests.update(map(hash_one, todo))

    roots: list[dict[str, Any]] = []
    sources: dict[str, str] = {}
    files = 0
    for root, recs in scans:
        entries: list[dict[str, Any]] = []
        for rel, mode, _size, mtime_ns, _ino, target in recs:
            if stat.S_ISREG(mode):
                path = root + "/" + rel
                got = digests.get(path)
                if got is None:
                    continue
                digest, size = got
                sources.setdefault(digest, path)
                # mtime: timestamp-based .pyc files stay valid against their sources.
                entries.append({"path": rel, "kind": "file", "mode": mode & 0o7777, "digest": digest, "size": size,
                                "mtime": mtime_ns // 1_000_000_000})
                files += 1
            elif stat.S_ISDIR(mode):
                entries.append({"path": rel, "kind": "dir", "mode": mode & 0o7777})
            else:
                entries.append({"path": rel, "kind": "symlink", "target": target})
        roots.append({"path": root, "entries": entries})
    return roots, sources, files, len(todo)


# ------------------------------------------------------------------ building


def _build(client: Client, spec: dict[str, Any], show_output: bool) -> dict[str, Any] | None:
    """Send the build and follow it; None when the server does not know the base key."""
    events: Iterator[Any] = iter(client.stream_ndjson("POST", _api.images_build(), spec, timeout=_BUILD_EVENT_TIMEOUT))
    first = next(events, None)
    if isinstance(first, dict) and first.get("type") == "error" and first.get("code") == "unknown_base":
        close = getattr(events, "close", None)
        if close is not None:
            close()
        return None

    def chained() -> Iterator[Any]:
        if first is not None:
            yield first
        yield from events

    done = follow_build(chained(), show_output)
    image_id = done.get("image_id")
    if not isinstance(image_id, str) or not image_id:
        raise exception.RemoteError(f"The capture of the local Python environment finished without an image id: {done!r}")
    return done


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024.0
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _max_entries() -> int:
    try:
        return int(os.environ.get("FLARE_LOCAL_PYTHON_MAX_FILES", "") or _MAX_ENTRIES_DEFAULT)
    except ValueError:
        return _MAX_ENTRIES_DEFAULT


def _skipped_dirs() -> frozenset[str]:
    """Dirs never captured even inside a root: the flare home (these caches, maybe the
    server's own store)."""
    return frozenset({os.path.realpath(flare_home())})


def enabled() -> bool:
    """Whether functions without an image run on a captured copy of this environment."""
    if os.environ.get("FLARE_IS_REMOTE") == "1":
        return False
    return os.environ.get("FLARE_LOCAL_PYTHON", "").strip().lower() != "bind"


def capture(
    client: Client,
    entry_dir: str | None,
    show_output: bool = False,
    *,
    python: str | None = None,
    roots: list[str] | None = None,
) -> str | None:
    """The image id of this Python environment on the server (captured if needed), or None
    when there is nothing to capture or it is not to be captured (then functions run on the
    host's dirs, bound by the worker)."""
    if not enabled():
        return None
    python = python or sys.executable
    if roots is None:
        roots = local_roots(entry_dir)
    if not roots:
        return None  # e.g. a system Python without a venv: all in the workers' system dirs
    budget = [_max_entries()]
    skip = _skipped_dirs()
    try:
        scans = [(root, scan_root(root, budget, skip)) for root in roots]
    except _TooLarge:
        _write(
            f"warning: the local Python environment ({', '.join(roots)}) has more than {_max_entries():,} entries; "
            "not capturing it (functions without image= use the host's directories). Set "
            "FLARE_LOCAL_PYTHON_MAX_FILES to raise the limit, or FLARE_LOCAL_PYTHON=bind.\n"
        )
        return None
    server = str(getattr(client, "url", "") or "")
    fp = fingerprint(server, python, scans)
    force = _force_build_env()
    if not force:
        key = _load_cache().get(fp)
        if key is not None:
            short = {"base": {"type": "local_python", "python": python, "key": key}, "layers": [], "mounts": []}
            try:
                done = _build(client, short, show_output)
            except exception.NotFoundError:
                return None  # a server without images
            if done is not None:
                return str(done["image_id"])
            _remember(fp, None)  # the server lost it: send it whole
    try:
        client.request("GET", _api.images())
    except exception.NotFoundError:
        return None  # a server from before images
    blobs = BlobSet()
    spec_roots, sources, files, hashed = _file_lists(scans, blobs.cache)
    blobs.sources.update(sources)
    sent = blobs.upload(client)
    if show_output:
        _write(
            f"=> capturing the local Python environment ({files:,} files, {hashed:,} changed, {_size(sent)} uploaded)\n"
        )
    full = {
        "base": {"type": "local_python", "python": python, "roots": spec_roots},
        "layers": [],
        "mounts": [],
        "force_build": force,
    }
    done = _build(client, full, show_output)
    if done is None:
        raise exception.RemoteError("The server rejected the local Python environment's file lists (unknown_base)")
    base_key = done.get("base_key")
    if isinstance(base_key, str) and base_key and not _racy(scans):
        _remember(fp, base_key)
    return str(done["image_id"])

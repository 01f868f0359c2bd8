"""Content-addressed uploads: BLAKE3 digests of local files (cached across runs) and
sending only the blobs the server lacks (``_api.blobs_missing``, ``PUT _api.blob(digest)``).

Client side only: code that runs in containers never imports this module.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import blake3

from . import _api, exception
from ._home import flare_home

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterable, Union

    from ._transport import Client

    # A blob's content: a local file (by path) or bytes held in memory.
    Source = Union[str, bytes]

_CHUNK = 1 << 20
# Files at least this large are hashed on several threads.
_PARALLEL_HASH_MIN = 32 << 20
# A file modified this recently (ns) may still change within the same mtime tick:
# its digest is not cached (git's "racily clean" rule).
_RACY_NS = 2_000_000_000
_CACHE_MAX_ENTRIES = 200_000
_MISSING_BATCH = 1000
_UPLOAD_THREADS = 8


def digest_bytes(data: bytes) -> str:
    return "blake3:" + blake3.blake3(data).hexdigest()


def _hash_path(path: str) -> str:
    """The digest of the file at ``path`` (read whole, in chunks)."""
    size = os.path.getsize(path)
    h = blake3.blake3(max_threads=blake3.blake3.AUTO) if size >= _PARALLEL_HASH_MIN else blake3.blake3()
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return "blake3:" + h.hexdigest()


def _hash_path_sized(path: str) -> tuple[str, int]:
    """``(digest, size)`` of the file at ``path``, the size being what was actually read."""
    size = 0
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        h = blake3.blake3(max_threads=blake3.blake3.AUTO) if st.st_size >= _PARALLEL_HASH_MIN else blake3.blake3()
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            h.update(chunk)
    return "blake3:" + h.hexdigest(), size


def _cache_path() -> str:
    return os.path.join(flare_home(), "hash-cache.json")


class HashCache:
    """Digests of local files keyed by (realpath, size, mtime_ns, inode), persisted as JSON
    in the flare home directory so that unchanged files are not hashed again."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or _cache_path()
        self._lock = threading.Lock()
        self._entries: dict[str, list[Any]] | None = None  # realpath -> [size, mtime_ns, inode, digest]
        self._dirty = False

    def _load(self) -> dict[str, list[Any]]:
        if self._entries is None:
            entries: dict[str, list[Any]] = {}
            try:
                with open(self.path, encoding="utf-8") as fh:
                    raw = json.load(fh)
                if isinstance(raw, dict) and raw.get("version") == 1 and isinstance(raw.get("files"), dict):
                    entries = {k: v for k, v in raw["files"].items() if isinstance(v, list) and len(v) == 4}
            except (OSError, ValueError):
                pass  # no cache yet, or an unreadable one: start afresh
            self._entries = entries
        return self._entries

    def hash_file(self, path: str) -> tuple[str, int]:
        """``(digest, size)`` of the file at ``path`` (symlinks to it are resolved)."""
        real = os.path.realpath(path)
        st = os.stat(real)
        key = [st.st_size, st.st_mtime_ns, st.st_ino]
        with self._lock:
            hit = self._load().get(real)
        if hit is not None and hit[:3] == key:
            return str(hit[3]), st.st_size
        digest = _hash_path(real)
        after = os.stat(real)
        stable = (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
        if stable and time.time_ns() - st.st_mtime_ns > _RACY_NS:
            with self._lock:
                entries = self._load()
                entries.pop(real, None)  # re-inserted last: the dict's order is least recently hashed first
                entries[real] = key + [digest]
                self._dirty = True
        return digest, st.st_size

    def lookup(self, real: str, size: int, mtime_ns: int, ino: int) -> str | None:
        """The cached digest of the file at ``real`` (a path without symlinks in it) if its
        (size, mtime_ns, inode) are still those cached."""
        with self._lock:
            hit = self._load().get(real)
        if hit is not None and hit[0] == size and hit[1] == mtime_ns and hit[2] == ino:
            return str(hit[3])
        return None

    def hash_known(self, real: str, size: int, mtime_ns: int, ino: int) -> tuple[str, int]:
        """Like ``hash_file`` for a path known to have no symlink in it, whose ``lstat`` gave
        (size, mtime_ns, inode): no ``realpath``, no stat on a cache hit. Returns
        ``(digest, size)``, the size being that of the content hashed."""
        digest = self.lookup(real, size, mtime_ns, ino)
        if digest is not None:
            return digest, size
        digest, got = _hash_path_sized(real)
        after = os.lstat(real)
        key = [after.st_size, after.st_mtime_ns, after.st_ino]
        if key == [got, mtime_ns, ino] and time.time_ns() - after.st_mtime_ns > _RACY_NS:
            with self._lock:
                entries = self._load()
                entries.pop(real, None)  # re-inserted last: the dict's order is least recently hashed first
                entries[real] = key + [digest]
                self._dirty = True
        return digest, got

    def save(self) -> None:
        """Write the cache back (atomically; a concurrent writer's entries may be lost, which
        only costs hashing them again)."""
        with self._lock:
            if not self._dirty or self._entries is None:
                return
            # Merge with what is on disk now: another cache object (in this process or
            # another) may have saved entries since this one loaded.
            on_disk = HashCache(self.path)._load()
            for k, v in self._entries.items():
                on_disk.pop(k, None)
                on_disk[k] = v
            self._entries = entries = on_disk
            if len(entries) > _CACHE_MAX_ENTRIES:
                for k in list(entries)[: len(entries) - _CACHE_MAX_ENTRIES]:
                    del entries[k]
            data = json.dumps({"version": 1, "files": entries}, separators=(",", ":"))
            self._dirty = False
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".hash-cache-", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(data)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError:
            pass  # a read-only home: the cache is an optimisation only


_cache: HashCache | None = None
_cache_lock = threading.Lock()


def hash_cache() -> HashCache:
    """The process-wide cache (at ``$FLARE_HOME/hash-cache.json``)."""
    global _cache
    with _cache_lock:
        if _cache is None or _cache.path != _cache_path():
            _cache = HashCache()
        return _cache


class BlobSet:
    """The blobs one publication needs: digest -> where its content comes from."""

    def __init__(self, cache: HashCache | None = None) -> None:
        self.cache = cache or hash_cache()
        self.sources: dict[str, Source] = {}

    def add_file(self, path: str) -> tuple[str, int]:
        digest, size = self.cache.hash_file(path)
        self.sources.setdefault(digest, path)
        return digest, size

    def add_bytes(self, data: bytes) -> tuple[str, int]:
        digest = digest_bytes(data)
        self.sources.setdefault(digest, data)
        return digest, len(data)

    def file_entry(self, rel: str, path: str, mode: int) -> dict[str, Any]:
        digest, size = self.add_file(path)
        return {"path": rel, "kind": "file", "mode": mode & 0o7777, "digest": digest, "size": size}

    def bytes_entry(self, rel: str, data: bytes, mode: int = 0o644) -> dict[str, Any]:
        digest, size = self.add_bytes(data)
        return {"path": rel, "kind": "file", "mode": mode & 0o7777, "digest": digest, "size": size}

    def upload(self, client: Client) -> int:
        """Upload what the server lacks; save the hash cache. Returns the number of bytes sent."""
        self.cache.save()
        return upload(client, self.sources)


def missing(client: Client, digests: Iterable[str]) -> list[str]:
    """The digests (of ``digests``) that the server does not hold yet."""
    wanted = list(dict.fromkeys(digests))
    out: list[str] = []
    for i in range(0, len(wanted), _MISSING_BATCH):
        batch = wanted[i : i + _MISSING_BATCH]
        resp = client.request("POST", _api.blobs_missing(), {"digests": batch})
        out.extend(str(d) for d in resp.get("missing") or [])
    return out


def _put(client: Client, digest: str, source: Source) -> int:
    path = _api.blob(digest)
    if isinstance(source, bytes):
        resp = client.request("PUT", path, source, timeout=600, content_type="application/octet-stream")
        size = len(source)
    else:
        try:
            fh = open(source, "rb")
        except OSError as e:
            raise exception.InvalidError(f"Cannot read {source}: {e.strerror or e}") from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            resp = client.request("PUT", path, fh, timeout=600, content_type="application/octet-stream")
    got = resp.get("digest") if isinstance(resp, dict) else None
    if got is not None and got != digest:
        raise exception.InvalidError(f"{source if isinstance(source, str) else 'data'} changed while uploading it")
    return size


_BATCH_FILE_MAX = 1 << 20
_BATCH_BYTES = 16 << 20
_BATCH_COUNT = 4096


def _read(source: Source) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        with open(source, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise exception.InvalidError(f"Cannot read {source}: {e.strerror or e}") from None


def _post_batch(client: Client, items: list[tuple[str, bytes]]) -> int:
    """Send many small blobs in one request (``POST _api.blobs_batch()``)."""
    for d, data in items:
        if digest_bytes(data) != d:
            raise exception.InvalidError("a file changed while uploading it; run again")
    header = json.dumps({"blobs": [{"digest": d, "size": len(data)} for d, data in items]}).encode()
    body = b"".join([header, b"\n", *(data for _, data in items)])
    client.request("POST", _api.blobs_batch(), body, timeout=600, content_type="application/octet-stream")
    return len(body) - len(header) - 1


def _small(source: Source) -> bool:
    if isinstance(source, bytes):
        return len(source) <= _BATCH_FILE_MAX
    try:
        return os.stat(source).st_size <= _BATCH_FILE_MAX
    except OSError:
        return False


def upload(client: Client, sources: dict[str, Source]) -> int:
    """Send the blobs of ``sources`` (digest -> local path or bytes) that the server is
    missing: small ones in batches, big ones one PUT each. Returns the bytes sent."""
    if not sources:
        return 0
    todo = [d for d in missing(client, sources) if d in sources]
    if not todo:
        return 0
    small = [d for d in todo if _small(sources[d])]
    small_set = set(small)
    big = [d for d in todo if d not in small_set]
    sent = 0
    batch: list[tuple[str, bytes]] = []
    size = 0
    for d in small:
        data = _read(sources[d])
        batch.append((d, data))
        size += len(data)
        if size >= _BATCH_BYTES or len(batch) >= _BATCH_COUNT:
            sent += _post_batch(client, batch)
            batch, size = [], 0
    if batch:
        sent += _post_batch(client, batch)
    todo = big
    if not todo:
        return sent
    if len(todo) == 1:
        return sent + _put(client, todo[0], sources[todo[0]])
    n = min(_UPLOAD_THREADS, len(todo))
    groups = [todo[i::n] for i in range(n)]

    def send(group: list[str]) -> int:
        try:
            return sum(_put(client, d, sources[d]) for d in group)
        finally:
            close = getattr(client, "close", None)
            if close is not None:
                close()  # this thread's connection

    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="flare-upload") as pool:
        return sent + sum(pool.map(send, groups))

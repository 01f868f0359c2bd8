"""``flare.Volume``: a versioned file tree kept by the server (Modal's ``modal.Volume``).

Each version of a volume is a manifest in the server's content-addressed store; file data
are blobs there too, so identical files are stored once (across volumes and images).
Writes go in batches: ``with vol.batch_upload() as b: b.put_file(...)`` uploads the file
contents the server lacks, then publishes every change of the batch in one commit request.
A commit is applied file by file onto the latest version: two writers of different files
both keep theirs; of two commits of the same file the later wins. ``remove_file`` and
``copy_files`` are commits of their own.

``Volume.from_name`` is lazy (the name resolves on first use); a Volume passed to a remote
function travels by reference and works inside the container through the API, as does one
looked up by name there. Every method has an ``.aio`` variant (``await v.listdir.aio("/")``).

Mounting a volume into a function's containers (``volumes={"/data": vol}``) is not there
yet: ``commit()`` and ``reload()`` refresh the version this object knows of.

Imported inside containers: the standard library only (uploads from a container send
files in 4 MiB pieces whose digests the server computes).
"""

from __future__ import annotations

import enum
import os
import posixpath
import time

from . import _api, exception
from ._bridge import Method, aiter_in_thread, in_thread
from ._named import _NamedObject

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any, Iterator, Union

    from ._transport import Client

    LocalFile = Union[str, "os.PathLike[str]", IO[bytes]]

# Pieces of a file uploaded from a container (the server's limit is 16 MiB).
_PIECE = 4 << 20
# Pieces of a file read back.
_READ_PIECE = 1 << 20


def _client() -> Client:
    from . import _invocation

    return _invocation.client()


class FileEntryType(enum.IntEnum):
    """What a volume entry is (Modal's ``FileEntryType``)."""

    UNSPECIFIED = 0
    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3
    FIFO = 4
    SOCKET = 5


_TYPES = {"file": FileEntryType.FILE, "directory": FileEntryType.DIRECTORY, "symlink": FileEntryType.SYMLINK}


class FileEntry:
    """One entry of ``listdir``: its path in the volume (no leading ``/``), type, mtime
    (seconds since the epoch) and size in bytes."""

    __slots__ = ("path", "type", "mtime", "size")

    def __init__(self, path: str, type: FileEntryType, mtime: int, size: int) -> None:
        self.path = path
        self.type = type
        self.mtime = mtime
        self.size = size

    def __repr__(self) -> str:
        return f"FileEntry(path={self.path!r}, type={self.type.name}, mtime={self.mtime}, size={self.size})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FileEntry):
            return NotImplemented
        return (self.path, self.type, self.mtime, self.size) == (other.path, other.type, other.mtime, other.size)

    __hash__ = None  # type: ignore[assignment]


def _file_error(e: exception.Error) -> BaseException:
    """A missing path as Python's FileNotFoundError; other errors as they are."""
    msg = str(e)
    if isinstance(e, exception.NotFoundError) and "no file or directory" in msg:
        return FileNotFoundError(msg)
    if isinstance(e, exception.ConflictError) and "already exists" in msg:
        return FileExistsError(msg)
    if isinstance(e, exception.InvalidError):
        if "is a directory" in msg:
            return IsADirectoryError(msg)
        if "is not a directory" in msg:
            return NotADirectoryError(msg)
    return e


def _remote_path(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    if not isinstance(p, str):
        raise exception.InvalidError("a volume path is a string")
    return p


class Volume(_NamedObject):
    """A file tree on the server: ``Volume.from_name("data", create_if_missing=True)``."""

    _kind = "Volume"
    _collection = "volumes"
    _version: int

    def _init_object(self, name: str, object_id: str | None = None, lookup: tuple[str, ...] | None = None) -> None:
        super()._init_object(name, object_id, lookup)
        self._version = 0
        self.listdir = Method(self._listdir, self._aio(self._listdir))
        self.iterdir = Method(self._iterdir, lambda *a, **k: aiter_in_thread(lambda: self._iterdir(*a, **k)))
        self.read_file = Method(self._read_file, lambda *a, **k: aiter_in_thread(lambda: self._read_file(*a, **k)))
        self.read_file_into_fileobj = Method(self._read_file_into_fileobj, self._aio(self._read_file_into_fileobj))
        self.remove_file = Method(self._remove_file, self._aio(self._remove_file))
        self.copy_files = Method(self._copy_files, self._aio(self._copy_files))
        self.commit = Method(self._commit, self._aio(self._commit))
        self.reload = Method(self._reload, self._aio(self._reload))

    # ------------------------------------------------------------ construction

    def _hydrate_metadata(self, info: dict[str, Any]) -> None:
        if "version" in info:
            self._version = int(info["version"])

    def _metadata(self) -> dict[str, Any]:
        return {"version": self._version}

    @property
    def name(self) -> str | None:
        return self._name or None

    # ----------------------------------------------------------------- reading

    def _entries(self, path: str, recursive: bool) -> list[dict[str, Any]]:
        try:
            r = _client().request("GET", _api.volume_entries(self._hydrate(), _remote_path(path), recursive))
        except exception.Error as e:
            raise _file_error(e) from None
        self._version = max(self._version, int(r.get("version", 0)))
        entries: list[dict[str, Any]] = r.get("entries", [])
        return entries

    @staticmethod
    def _entry(e: dict[str, Any]) -> FileEntry:
        return FileEntry(
            str(e["path"]), _TYPES.get(str(e.get("type")), FileEntryType.UNSPECIFIED), int(e["mtime"]), int(e["size"])
        )

    def _listdir(self, path: str, *, recursive: bool = False) -> list[FileEntry]:
        """The entries of the directory ``path`` (everything below it with ``recursive``),
        or the file ``path`` itself. FileNotFoundError if there is nothing at ``path``."""
        return [self._entry(e) for e in self._entries(path, recursive)]

    def _iterdir(self, path: str, *, recursive: bool = True) -> Iterator[FileEntry]:
        """Like ``listdir``, recursive by default (as Modal's)."""
        yield from self._listdir(path, recursive=recursive)

    def _read_file(self, path: str) -> Iterator[bytes]:
        """The bytes of the file ``path``, as they arrive from the server (pieces of at
        most 1 MiB; the file is never held whole in memory). FileNotFoundError if absent."""
        url = _api.volume_file(self._hydrate(), _remote_path(path))
        stream = _client().stream_bytes(url, _READ_PIECE)
        try:
            first = next(stream, None)
        except exception.Error as e:
            raise _file_error(e) from None
        if first is None:
            return
        yield first
        yield from stream

    def _read_file_into_fileobj(self, path: str, fileobj: IO[bytes]) -> int:
        """Write the file ``path`` to ``fileobj``; returns the number of bytes written."""
        n = 0
        for piece in self._read_file(path):
            fileobj.write(piece)
            n += len(piece)
        return n

    # ----------------------------------------------------------------- writing

    def _commit_changes(self, body: dict[str, Any]) -> int:
        body.setdefault("base_version", self._version)
        try:
            r = _client().request("POST", _api.volume_op(self._hydrate(), "commit"), body, timeout=600)
        except exception.Error as e:
            raise _file_error(e) from None
        self._version = int(r["version"])
        return self._version

    def _remove_file(self, path: str, *, recursive: bool = False) -> None:
        """Remove the file ``path`` (a directory and what is below it with ``recursive``).
        FileNotFoundError if there is nothing at ``path``."""
        self._commit_changes({"remove": [{"path": _remote_path(path), "recursive": recursive}]})

    def _copy_files(self, src_paths: list[str], dst_path: str, recursive: bool = False) -> None:
        """Copy files inside the volume, like ``cp``: into ``dst_path`` if it is a directory
        (it must be, for several sources), else to that path. Directories need ``recursive``."""
        if isinstance(src_paths, str):
            src_paths = [src_paths]
        body = {"src_paths": [_remote_path(p) for p in src_paths], "dst_path": _remote_path(dst_path)}
        self._commit_changes({"copy": [dict(body, recursive=recursive)]})

    def batch_upload(self, force: bool = False) -> VolumeUploadContextManager:
        """A context manager collecting ``put_file`` and ``put_directory`` calls; on exit the
        contents the server lacks are uploaded, then every file is published in one commit.
        Without ``force`` a file that already exists in the volume fails the commit
        (FileExistsError) and nothing of the batch is published."""
        return VolumeUploadContextManager(self, force)

    def _commit(self) -> None:
        """Learn the volume's latest version. (Inside a container with the volume mounted
        this will publish the mount's changes; mounts are not there yet.)"""
        self._reload()

    def _reload(self) -> None:
        """Learn the volume's latest version."""
        info = _client().request("GET", _api.volume(self._hydrate()))
        self._version = int(info.get("version", 0))


class VolumeUploadContextManager:
    """What ``Volume.batch_upload()`` returns: ``put_file`` / ``put_directory`` record files,
    the ``with`` block's exit uploads and commits them (nothing if the block raised)."""

    def __init__(self, volume: Volume, force: bool) -> None:
        self._volume = volume
        self._force = force
        # remote path -> (local path or bytes, mode, mtime)
        self._files: dict[str, tuple[str | bytes, int, int]] = {}
        self.commits = 0  # commit requests this batch made (0 or 1)

    def __enter__(self) -> VolumeUploadContextManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self._flush()

    async def __aenter__(self) -> VolumeUploadContextManager:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            await in_thread(self._flush)

    def put_file(self, local_file: LocalFile, remote_path: str, mode: int | None = None) -> None:
        """Upload ``local_file`` (a path, or a binary file object read now) to ``remote_path``.
        A ``remote_path`` ending in ``/`` keeps the local file's name."""
        remote = _remote_path(remote_path)
        if hasattr(local_file, "read"):
            data = local_file.read()
            if not isinstance(data, bytes):
                raise exception.InvalidError("put_file reads a binary file object (open it with 'rb')")
            if remote.endswith("/"):
                raise exception.InvalidError("put_file of a file object needs a remote path with a file name")
            self._files[remote] = (data, 0o644 if mode is None else mode, int(time.time()))
            return
        path = os.fspath(local_file)
        try:
            st = os.stat(path)
        except OSError as e:
            raise FileNotFoundError(f"cannot read {path}: {e.strerror or e}") from None
        if not os.path.isfile(path):
            raise IsADirectoryError(f"{path} is not a file (use put_directory for directories)")
        if remote.endswith("/"):
            remote = remote + os.path.basename(path)
        self._files[remote] = (path, (st.st_mode & 0o7777) if mode is None else mode, int(st.st_mtime))

    def put_directory(self, local_path: str | os.PathLike[str], remote_path: str, recursive: bool = True) -> None:
        """Upload every file under ``local_path`` to the same place under ``remote_path``."""
        root = os.fspath(local_path)
        if not os.path.isdir(root):
            raise NotADirectoryError(f"{root} is not a directory")
        remote = _remote_path(remote_path)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if not os.path.isfile(full):
                    continue  # sockets, broken links
                sub = name if rel == "." else posixpath.join(rel.replace(os.sep, "/"), name)
                self.put_file(full, posixpath.join(remote, sub))
            if not recursive:
                break

    def _flush(self) -> None:
        if not self._files:
            return
        client = _client()
        vid = self._volume._hydrate()
        from ._runtime.context import is_local

        if is_local():
            from . import _blobs  # the client's BLAKE3 hashing and upload (not in containers)

            puts = self._put_blobs(client, _blobs)
        else:
            puts = self._put_pieces(client, vid)
        self._volume._commit_changes({"put": puts, "force": self._force})
        self.commits += 1
        self._files.clear()

    def _put_blobs(self, client: Client, _blobs: Any) -> list[dict[str, Any]]:
        """Hash every file (cached), upload what the server lacks, describe each file by its
        one whole-file blob."""
        blobs = _blobs.BlobSet()
        puts: list[dict[str, Any]] = []
        for remote, (src, mode, mtime) in self._files.items():
            digest, size = blobs.add_bytes(src) if isinstance(src, bytes) else blobs.add_file(src)
            item: dict[str, Any] = {"path": remote, "mode": mode, "mtime": mtime, "size": size}
            if size:
                item["blob"] = digest
            puts.append(item)
        blobs.upload(client)
        return puts

    def _put_pieces(self, client: Client, vid: str) -> list[dict[str, Any]]:
        """Send every file in pieces the server stores and names (code in containers has no
        BLAKE3 to hash them with)."""
        puts: list[dict[str, Any]] = []
        path = _api.volume_op(vid, "blobs")
        for remote, (src, mode, mtime) in self._files.items():
            chunks: list[dict[str, Any]] = []
            fh: Any
            if isinstance(src, bytes):
                import io

                fh = io.BytesIO(src)
            else:
                fh = open(src, "rb")
            with fh:
                while True:
                    piece = fh.read(_PIECE)
                    if not piece:
                        break
                    r = client.request("POST", path, piece, timeout=600, content_type="application/octet-stream")
                    chunks.append({"digest": r["digest"], "len": len(piece)})
            size = sum(int(c["len"]) for c in chunks)
            puts.append({"path": remote, "mode": mode, "mtime": mtime, "size": size, "chunks": chunks})
        return puts

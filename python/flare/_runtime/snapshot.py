"""The runner's side of memory snapshots (docs/SNAPSHOTS.md): after the imports and the
``@enter(snap=True)`` hooks, make the process safe to checkpoint, tell the worker
(SNAPSHOT_READY), and wait for RESUME, which comes twice in a snapshot's life: in the
container that was checkpointed (``restored`` false) and in every container restored
from it (``restored`` true, with the new container's environment). Standard library only.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .runner import FrameReader

# Frame types: runner -> worker, worker -> runner.
SNAPSHOT_READY = 13
RESUME = 5

# fds the worker gives the runner: stdin, stdout, stderr, frames out, frames in.
_PROTOCOL_FDS = {0, 1, 2, 3, 4}
# Paths where open files survive a restore: the image (read-only), /tmp (its content is
# in the checkpoint) and the device nodes.
_SAFE_PREFIXES = ("/tmp/", "/dev/", "/proc/", "/sys/")


def _close_api_connections() -> None:
    """Close the SDK's keep-alive connections to the worker's API socket (a restored
    container gets its own socket; a connection cannot be taken along)."""
    transport = sys.modules.get("flare._transport")
    cls = getattr(transport, "_UnixHTTPConnection", None) if transport is not None else None
    if cls is None:
        return
    import gc

    for o in gc.get_objects():
        try:
            if isinstance(o, cls):
                o.close()
        except Exception:  # noqa: BLE001
            pass


def _socket_peer(inode: str) -> str:
    """What a socket inode is, from /proc/net (for the error message)."""
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/net/{proto}") as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if len(cols) > 9 and cols[9] == inode:
                        return f"a {proto.rstrip('6').upper()} socket (remote {_addr(cols[2])})"
        except (OSError, StopIteration):
            continue
    try:
        with open("/proc/net/unix") as f:
            for line in f:
                cols = line.split()
                if len(cols) > 6 and cols[6] == inode:
                    path = cols[7] if len(cols) > 7 else ""
                    return f"a unix socket{(' ' + path) if path else ''}"
    except OSError:
        pass
    return "a socket"


def _addr(hexaddr: str) -> str:
    host, _, port = hexaddr.partition(":")
    try:
        if len(host) == 8:
            b = bytes.fromhex(host)[::-1]
            return f"{'.'.join(str(x) for x in b)}:{int(port, 16)}"
        return f"[{host}]:{int(port, 16)}"
    except ValueError:
        return hexaddr


def blockers() -> list[str]:
    """Open resources a checkpoint cannot take along, each named: sockets (network
    connections, listeners, unix sockets) and files open for writing outside /tmp."""
    found: list[str] = []
    try:
        fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
    except OSError:
        return found
    for fd in fds:
        if fd in _PROTOCOL_FDS:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own fd, closed since
        if target.startswith("socket:["):
            found.append(f"fd {fd}: {_socket_peer(target[8:-1])}")
            continue
        if not target.startswith("/") or target.startswith(_SAFE_PREFIXES):
            continue
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                flags = next((int(line.split()[1], 8) for line in f if line.startswith("flags:")), 0)
        except (OSError, ValueError):
            flags = 0
        if flags & (os.O_WRONLY | os.O_RDWR):
            found.append(f"fd {fd}: {target} (open for writing outside /tmp)")
    return found


def _reseed() -> None:
    """Fresh entropy in a restored process: every restore of one snapshot would otherwise
    draw the same ``random`` (and numpy) streams. ``os.urandom``, ``uuid.uuid4`` and
    ``secrets`` read the kernel and need nothing."""
    import random

    random.seed()
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            np.random.seed()
        except Exception:  # noqa: BLE001
            pass


def checkpoint(fd_out: int, reader: FrameReader) -> tuple[bool, list[tuple[int, dict[str, Any], memoryview]]]:
    """Offer this process for a checkpoint and block until RESUME. Returns whether this
    is a restored container, and frames that came after RESUME."""
    from .runner import encode_frame, write_all

    _close_api_connections()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
    found = blockers()
    header: dict[str, Any] = {"pid": os.getpid()}
    if found:
        header["refused"] = "the snap=True hooks left open what a snapshot cannot take along: " + "; ".join(found)
    write_all(fd_out, encode_frame(SNAPSHOT_READY, header))
    # A checkpoint is taken here (the process is frozen in this read), and every restore
    # of it continues from here too, reading from its own new pipe.
    while True:
        frames = reader.read_frames()
        if not frames:
            raise EOFError("the worker closed the container's pipe before RESUME")
        for i, (typ, h, _body) in enumerate(frames):
            if typ == RESUME:
                restored = bool(h.get("restored"))
                env = h.get("env") or {}
                for k, v in env.items():
                    os.environ[str(k)] = str(v)
                if restored:
                    _reseed()
                    os.environ["FLARE_SNAPSHOT"] = "restored"
                return restored, frames[i + 1 :]

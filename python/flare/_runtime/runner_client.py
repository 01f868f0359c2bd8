"""The worker side of the container protocol, for tests and benchmarks.

Starts ``python -m flare._runtime`` with two pipes as fds 3 (its frames to us) and 4
(ours to it) and speaks
the framing of docs/PROTOCOL.md section 2. (The real worker is the Rust agent.)
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import time

from .runner import CANCEL, INIT, INPUTS, SHUTDOWN, FrameReader, encode_frame, write_all

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class RunnerProcess:
    def __init__(self, env: dict[str, str] | None = None, python: str | None = None, module: str = "flare._runtime") -> None:
        from_r, from_w = os.pipe()
        to_r, to_w = os.pipe()
        sdk_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        full_env = dict(os.environ)
        full_env.setdefault("FLARE_IS_REMOTE", "1")
        if env:
            full_env.update(env)
        # The SDK stays importable when ``env`` brings its own PYTHONPATH (the user's modules).
        full_env["PYTHONPATH"] = sdk_parent + os.pathsep + full_env.get("PYTHONPATH", "")
        # posix_spawn dup2s the runner's pipe ends onto fds 3 and 4 (and the log files
        # onto 1 and 2); every other fd is close-on-exec, so the runner sees fds 0-4.
        self._out = tempfile.TemporaryFile()
        self._err = tempfile.TemporaryFile()
        argv = [python or sys.executable, "-X", "frozen_modules=on", "-m", module]
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            self.pid = os.posix_spawn(
                argv[0],
                argv,
                full_env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, devnull, 0),
                    (os.POSIX_SPAWN_DUP2, self._out.fileno(), 1),
                    (os.POSIX_SPAWN_DUP2, self._err.fileno(), 2),
                    (os.POSIX_SPAWN_DUP2, from_w, 3),
                    (os.POSIX_SPAWN_DUP2, to_r, 4),
                ],
            )
        finally:
            os.close(devnull)
        self.returncode: int | None = None
        os.close(from_w)
        os.close(to_r)
        self.fd = to_w
        self._from = from_r
        self.reader = FrameReader(from_r)
        self._queued: list[tuple[int, dict[str, Any], memoryview]] = []

    def send(self, typ: int, header: dict[str, Any], body: list[bytes] | tuple[bytes, ...] = ()) -> None:
        write_all(self.fd, encode_frame(typ, header, body))

    def init(self, function: dict[str, Any], pickled: bytes = b"") -> None:
        self.send(INIT, {"function": function}, [pickled] if pickled else [])

    def send_inputs(self, items: list[tuple[str, tuple[Any, ...], dict[str, Any]]], call_id: str = "fc-test", start_idx: int = 0) -> None:
        headers = []
        bodies = []
        for i, (input_id, args, kwargs) in enumerate(items):
            data = pickle.dumps((args, kwargs), 4)
            headers.append({"input_id": input_id, "call_id": call_id, "idx": start_idx + i, "len": len(data)})
            bodies.append(data)
        self.send(INPUTS, {"inputs": headers}, bodies)

    def cancel(self, input_ids: list[str]) -> None:
        self.send(CANCEL, {"input_ids": input_ids})

    def shutdown(self) -> None:
        self.send(SHUTDOWN, {})

    def recv(self) -> tuple[int, dict[str, Any], memoryview] | None:
        """Next frame, or None at EOF."""
        if not self._queued:
            self._queued = self.reader.read_frames()
            if not self._queued:
                return None
        return self._queued.pop(0)

    def outputs(self, n: int) -> list[tuple[dict[str, Any], bytes]]:
        """Collect ``n`` outputs (across OUTPUTS frames) as (header, payload)."""
        out: list[tuple[dict[str, Any], bytes]] = []
        while len(out) < n:
            frame = self.recv()
            if frame is None:
                raise EOFError(f"runner closed its pipe after {len(out)} of {n} outputs")
            typ, header, body = frame
            if typ != 12:
                raise AssertionError(f"unexpected frame type {typ}: {header}")
            off = 0
            for item in header["outputs"]:
                out.append((item, bytes(body[off : off + item["len"]])))
                off += item["len"]
        return out

    def wait(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, 9)
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.002)
        return self.returncode

    def logs(self) -> tuple[bytes, bytes]:
        self._out.seek(0)
        self._err.seek(0)
        return self._out.read(), self._err.read()

    def close(self, timeout: float = 10) -> tuple[int, bytes, bytes]:
        """Close our ends of the pipes, wait for the runner to exit: (rc, stdout, stderr)."""
        for fd in (self.fd, self._from):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self._from = -1
        rc = self.wait(timeout)
        out, err = self.logs()
        return rc, out, err

"""The in-container runner, started as ``python -m flare._runtime`` (docs/PROTOCOL.md section 2).

Talks to the worker over two pipes (writes on fd 3, reads on fd 4) with length-prefixed frames:
``u32 length | u8 type | u32 header_length | header (JSON) | body``.

Cold start matters (it is measured against ``python -c pass``), so this module imports
only builtin/frozen modules at start: no ``socket``, ``json``, ``threading`` or
``cloudpickle`` unless an input needs them. JSON headers go through the C scanner
and encoder in ``_json`` directly (what ``json`` uses underneath, without the
``re``-based pure-Python layers). The function-local imports below are deliberate:
each one is paid only by the inputs that need it. Never import the client SDK
(``flare.app``, ``flare.function``, transport, ...) from here.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

# Frames: the runner writes on fd 3 and reads on fd 4 (two pipes; docs/PROTOCOL.md section 2).
FD_OUT = 3
FD_IN = 4

# Frame types (worker -> runner)
INIT = 1
INPUTS = 2
CANCEL = 3
SHUTDOWN = 4
# Frame types (runner -> worker)
READY = 10
INIT_FAILURE = 11
OUTPUTS = 12

_READ_SIZE = 1 << 18
# Flush outputs once this many are buffered even if more inputs are waiting.
_MAX_BATCH_ITEMS = 1000
_MAX_BATCH_BYTES = 4 << 20
# The server's cap on one result or yielded item (flare_api::MAX_RESULT_BYTES, PROTOCOL.md).
_MAX_RESULT_BYTES = 64 << 20


# --------------------------------------------------------------------------- JSON


def _make_json() -> tuple[Callable[[str], Any], Callable[[Any], str]]:
    try:
        import _json

        class _Ctx:
            strict = True
            object_hook = None
            object_pairs_hook = None
            parse_float = float
            parse_int = int
            parse_constant = float
            memo: dict[str, Any] = {}  # noqa: RUF012 - the scanner reads it as json.decoder.JSONDecoder does

        scanner = _json.make_scanner(_Ctx())  # type: ignore[arg-type]  # a duck-typed context, as json.decoder passes
        encoder = _json.make_encoder(
            None, _json_default, _json.encode_basestring_ascii, None, ":", ",", False, False, True
        )

        def loads(s: str) -> Any:
            obj, end = scanner(s, 0)
            if end != len(s) and s[end:].strip():
                raise ValueError("extra data after JSON value")
            return obj

        def dumps(obj: Any) -> str:
            return "".join(encoder(obj, 0))

        return loads, dumps
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - non-CPython
        import json

        return json.loads, lambda o: json.dumps(o, separators=(",", ":"), default=_json_default)


def _json_default(o: Any) -> Any:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


json_loads, json_dumps = _make_json()


def _pickler() -> Any:
    """The C pickle module: ``pickle.dumps``/``loads`` are ``_pickle``'s, but ``import pickle``
    also imports ``re``, ``struct``, ``enum``... (about 4 ms of a cold start's first output)."""
    try:
        return _import_c_pickler()
    except ImportError:  # pragma: no cover - non-CPython
        import pickle

        return pickle


def _import_c_pickler() -> Any:
    """``import _pickle``, without ``functools`` where nothing imported it yet.

    ``_pickle`` takes one name from ``functools``, ``partial`` (``_functools.partial``, the
    very object ``functools.partial`` is), and ``functools`` imports ``collections``,
    ``operator``, ``keyword``, ``reprlib`` and ``types``: ~1.7 ms of a new container's first
    output. So while ``functools`` is not imported and no other thread could import it
    meanwhile, ``_pickle`` is given a stand-in holding only that name, removed right after:
    a later ``import functools`` gets the real module. Any failure: the plain import."""
    if "functools" in sys.modules or "threading" in sys.modules or len(sys._current_frames()) != 1:
        import _pickle

        return _pickle
    try:
        stand_in = type(sys)("functools")
        stand_in.partial = __import__("_functools").partial  # type: ignore[attr-defined]
    except (ImportError, AttributeError):  # pragma: no cover - non-CPython
        import _pickle

        return _pickle
    sys.modules["functools"] = stand_in
    try:
        import _pickle
    except Exception:  # noqa: BLE001 - an interpreter whose _pickle wants more: the plain import
        if sys.modules.get("functools") is stand_in:
            del sys.modules["functools"]
        import _pickle
    finally:
        if sys.modules.get("functools") is stand_in:
            del sys.modules["functools"]
    return _pickle


# ------------------------------------------------------------------------ framing


def encode_frame(typ: int, header: dict[str, Any], body: list[bytes] | tuple[bytes, ...] = ()) -> bytes:
    h = json_dumps(header).encode()
    n = 5 + len(h)
    for b in body:
        n += len(b)
    return b"".join([n.to_bytes(4, "big"), typ.to_bytes(1, "big"), len(h).to_bytes(4, "big"), h, *body])


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class FrameReader:
    """Incremental reader of frames from a file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.eof = False

    def fill(self, min_bytes: int = 1) -> bool:
        """Blocking read of at least ``min_bytes`` more bytes; False at EOF."""
        want = len(self.buf) + min_bytes
        while len(self.buf) < want:
            chunk = os.read(self.fd, max(_READ_SIZE, want - len(self.buf)))
            if not chunk:
                self.eof = True
                return False
            self.buf += chunk
        return True

    def frames(self) -> list[tuple[int, dict[str, Any], memoryview]]:
        """All complete frames currently buffered (consumes them)."""
        out = []
        buf = self.buf
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            n = int.from_bytes(buf[pos : pos + 4], "big")
            if end - pos - 4 < n:
                break
            frame = bytes(buf[pos + 4 : pos + 4 + n])
            pos += 4 + n
            typ = frame[0]
            hlen = int.from_bytes(frame[1:5], "big")
            header = json_loads(frame[5 : 5 + hlen].decode()) if hlen else {}
            out.append((typ, header, memoryview(frame)[5 + hlen :]))
        if pos:
            del buf[:pos]
        return out

    def missing(self) -> int:
        """Bytes still needed to complete the next frame (at least 1)."""
        if len(self.buf) < 4:
            return 4 - len(self.buf)
        n = int.from_bytes(self.buf[:4], "big")
        return max(1, 4 + n - len(self.buf))

    def read_frames(self) -> list[tuple[int, dict[str, Any], memoryview]]:
        """Block until at least one frame is complete; [] at EOF."""
        while True:
            frames = self.frames()
            if frames:
                return frames
            if not self.fill(self.missing()):
                return []


# --------------------------------------------------------------------- exceptions


def _qualified_type(exc: BaseException) -> str:
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


def exception_info(exc: BaseException, skip_frames: int = 0) -> dict[str, str]:
    import traceback

    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not break the runner
        message = f"<unprintable {type(exc).__name__}>"
    note = _disk_quota_note(exc)
    if note:
        message += note
        text += note.lstrip() + "\n"
    return {"type": _qualified_type(exc), "message": message, "traceback": text}


def _disk_quota_note(exc: BaseException) -> str:
    """Name the container's disk quota when a write failed for lack of space."""
    import errno

    if not isinstance(exc, OSError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return ""
    quota = os.environ.get("FLARE_DISK_QUOTA_BYTES", "")
    if not quota.isdigit():
        return ""
    mib = int(quota) // (1024 * 1024)
    return (
        f" (disk quota: the container's writable layer and /tmp hold {mib} MiB each, "
        "and count against its memory limit)"
    )


def pickle_exception(exc: BaseException) -> bytes:
    """Pickled exception, or b"" when it cannot be pickled and unpickled again."""
    pickle = _pickler()

    try:
        data: bytes = pickle.dumps(exc, 4)
    except Exception:  # noqa: BLE001
        try:
            import cloudpickle

            data = cloudpickle.dumps(exc, protocol=4)
        except Exception:  # noqa: BLE001
            return b""
    try:
        pickle.loads(data)
    except Exception:  # noqa: BLE001
        return b""
    return data


def _checked_size(data: bytes) -> bytes:
    """``data`` if the server takes a result that big, else PayloadTooLargeError."""
    if len(data) > _MAX_RESULT_BYTES:
        from ..exception import PayloadTooLargeError

        raise PayloadTooLargeError(
            f"the function's result is {len(data) / (1 << 20):.1f} MiB pickled, over the limit of "
            f"{_MAX_RESULT_BYTES / (1 << 20):.1f} MiB per output; return a smaller value "
            "(or write large data to storage and return its location)"
        )
    return data


def dumps_result(value: Any) -> bytes:
    """Pickle a return value: plain pickle first, cloudpickle when pickle cannot."""
    pickle = _pickler()

    try:
        plain: bytes = pickle.dumps(value, 4)
        return plain
    except Exception:  # noqa: BLE001
        pass
    try:
        import cloudpickle

        data: bytes = cloudpickle.dumps(value, protocol=4)
        return data
    except Exception as e:  # noqa: BLE001
        from ..exception import SerializationError

        raise SerializationError(
            f"Could not serialize the return value of type {type(value).__module__}.{type(value).__qualname__}: {e}"
        ) from None


# ------------------------------------------------------------------------- loading


def extend_sys_path() -> None:
    """Add the caller's import paths that this interpreter lacks (e.g. PYTHONPATH entries:
    the worker binds them read-only at the same paths and lists them in FLARE_SYS_PATH)."""
    extra = os.environ.get("FLARE_SYS_PATH")
    if not extra:
        return
    for p in extra.split(os.pathsep):
        if p and p not in sys.path and os.path.isdir(p):
            sys.path.append(p)


def load_function(info: dict[str, Any], body: memoryview) -> Callable[..., Any]:
    extend_sys_path()
    if info.get("serialized"):
        pickle = _pickler()

        obj = pickle.loads(body)
    else:
        if "/root" not in sys.path:
            sys.path.insert(0, "/root")
        module_name = info["module"]
        __import__(module_name)
        obj = sys.modules[module_name]
        for part in (info.get("qualname") or info["name"]).split("."):
            obj = getattr(obj, part)
    raw = getattr(obj, "__flare_raw_f__", None)  # a flare.Function wrapper
    if raw is not None:
        obj = raw
    if not callable(obj):
        raise TypeError(f"{info.get('qualname') or info['name']} is not callable (got {type(obj).__name__})")
    return obj  # type: ignore[no-any-return]


# -------------------------------------------------------------------------- runner


class Input:
    __slots__ = ("input_id", "call_id", "idx", "payload")

    def __init__(self, input_id: str, call_id: str, idx: int, payload: memoryview) -> None:
        self.input_id = input_id
        self.call_id = call_id
        self.idx = idx
        self.payload = payload


class Runner:
    def __init__(self, fd: int, reader: FrameReader, func: Callable[..., Any], info: dict[str, Any]) -> None:
        from . import context as _context

        code = getattr(func, "__code__", None)
        flags = code.co_flags if code is not None else 0
        self.fd = fd
        self.reader = reader
        self.func = func
        # CO_GENERATOR 0x20, CO_COROUTINE 0x80, CO_ASYNC_GENERATOR 0x200
        self.is_async = bool(info.get("is_async")) or bool(flags & 0x280)
        self.is_generator = bool(info.get("is_generator")) or bool(flags & 0x220)
        self.max_inputs = max(1, int(info.get("max_inputs") or 1))
        # A class (@app.cls): method name -> (bound method, is_async, is_generator); the
        # method is each input's first positional argument. None for plain functions.
        self.methods: dict[str, tuple[Callable[..., Any], bool, bool]] | None = None
        self.pending: list[Input] = []
        self.cancelled: set[str] = set()
        self.stopping = False
        self.ctx = _context
        self.loop: Any = None
        import _thread

        self._thread = _thread
        self.out: list[tuple[dict[str, Any], bytes]] = []
        self.out_lock = _thread.allocate_lock()
        self.write_lock = _thread.allocate_lock()
        self.writer_signal: Any = None  # lock used as a wake-up for the writer thread

    # -- outputs

    def emit(self, header: dict[str, Any], payload: bytes, flush: bool) -> None:
        with self.out_lock:
            self.out.append((header, payload))
        if flush:
            self.flush()
        else:
            self._wake_writer()

    def flush(self) -> None:
        with self.write_lock:
            while True:
                with self.out_lock:
                    if not self.out:
                        return
                    items = self.out
                    self.out = []
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                except Exception:  # noqa: BLE001
                    pass
                start = 0
                while start < len(items):
                    # Split very large batches so one frame stays reasonable.
                    end = start
                    size = 0
                    while end < len(items) and (end == start or (end - start < _MAX_BATCH_ITEMS and size < _MAX_BATCH_BYTES)):
                        size += len(items[end][1])
                        end += 1
                    chunk = items[start:end]
                    write_all(
                        self.fd,
                        encode_frame(OUTPUTS, {"outputs": [h for h, _ in chunk]}, [p for _, p in chunk]),
                    )
                    start = end

    def _wake_writer(self) -> None:
        if self.writer_signal is None:
            self.writer_signal = self._thread.allocate_lock()
            self.writer_signal.acquire()
            self._thread.start_new_thread(self._writer_main, ())
        try:
            self.writer_signal.release()
        except RuntimeError:  # already signalled
            pass

    def _writer_main(self) -> None:
        sig = self.writer_signal
        while True:
            sig.acquire()
            try:
                self.flush()
            except OSError:
                return

    def output(self, inp: Input, status: str, payload: bytes, gen: str | None, exc: dict[str, str] | None, flush: bool) -> None:
        header = {"input_id": inp.input_id, "status": status, "gen": gen, "len": len(payload), "exception": exc}
        self.emit(header, payload, flush)

    def failure(self, inp: Input, exc: BaseException, gen: str | None, flush: bool, skip_frames: int = 1) -> None:
        info = exception_info(exc, skip_frames)
        self.output(inp, "failure", pickle_exception(exc), gen, info, flush)

    # -- frames

    def handle_frames(self, frames: list[tuple[int, dict[str, Any], memoryview]]) -> None:
        for typ, header, body in frames:
            if typ == INPUTS:
                off = 0
                for item in header.get("inputs", ()):
                    n = item["len"]
                    self.pending.append(
                        Input(item["input_id"], item.get("call_id", ""), item.get("idx", 0), body[off : off + n])
                    )
                    off += n
            elif typ == CANCEL:
                ids = set(header.get("input_ids", ()))
                self.cancelled |= ids
            elif typ == SHUTDOWN:
                self.stopping = True
            # Unknown frame types are ignored (forward compatibility).

    def take_cancelled(self, inp: Input) -> bool:
        if inp.input_id not in self.cancelled:
            return False
        self.cancelled.discard(inp.input_id)
        from ..exception import InputCancellation

        e = InputCancellation("input cancelled before it started")
        self.output(inp, "failure", b"", None, {"type": "flare.exception.InputCancellation", "message": str(e), "traceback": ""}, True)
        return True

    # -- execution

    def run_input(self, inp: Input, flush_last: bool) -> None:
        ctx = self.ctx
        t1 = ctx._input_id.set(inp.input_id)
        t2 = ctx._call_id.set(inp.call_id)
        try:
            call = self._decode(inp, "Could not deserialize the arguments in the container")
            if call is None:
                return
            inp.payload = memoryview(b"")
            func, is_async, is_generator, args, kwargs = call
            if is_async:
                self._run_async(inp, func, is_generator, args, kwargs, flush_last)
            elif is_generator:
                self._run_gen(inp, func, args, kwargs)
            else:
                try:
                    result = func(*args, **kwargs)
                except BaseException as e:  # noqa: BLE001
                    self.failure(inp, e, None, flush_last)
                    return
                self._send_result(inp, result, None, flush_last)
        finally:
            ctx._input_id.reset(t1)
            ctx._call_id.reset(t2)

    def _decode(
        self, inp: Input, what: str
    ) -> tuple[Callable[..., Any], bool, bool, tuple[Any, ...], dict[str, Any]] | None:
        """An input's arguments and what to call with them (the function, or the class method
        the input names): ``(func, is_async, is_generator, args, kwargs)``; None after a
        final failure output when they cannot be unpickled or name no method."""
        pickle = _pickler()

        try:
            args, kwargs = pickle.loads(inp.payload)
        except BaseException as e:  # noqa: BLE001
            from ..exception import DeserializationError

            self.failure(inp, DeserializationError(f"{what}: {type(e).__name__}: {e}"), None, True, 0)
            return None
        if self.methods is None:
            return self.func, self.is_async, self.is_generator, args, kwargs
        try:
            func, is_async, is_generator, args = self._method(args)
        except BaseException as e:  # noqa: BLE001
            self.failure(inp, e, None, True, 0)
            return None
        return func, is_async, is_generator, args, kwargs

    def _method(self, args: tuple[Any, ...]) -> tuple[Callable[..., Any], bool, bool, tuple[Any, ...]]:
        """The class method an input names (its first positional argument) and the rest."""
        methods = self.methods or {}
        name = args[0] if args else None
        entry = methods.get(name) if isinstance(name, str) else None
        if entry is None:
            cls_name = getattr(self.func, "__qualname__", "the class")
            raise AttributeError(
                f"{cls_name} has no method {name!r} (its methods: {', '.join(sorted(methods)) or 'none'}; "
                "methods need @flare.method())"
            )
        return entry[0], entry[1], entry[2], args[1:]

    def _send_result(self, inp: Input, result: Any, gen: str | None, flush: bool) -> None:
        try:
            data = _checked_size(dumps_result(result))
        except BaseException as e:  # noqa: BLE001
            self.failure(inp, e, gen, flush, 0)
            return
        self.output(inp, "success", data, gen, None, flush)

    def _emit_item(self, inp: Input, item: Any) -> bool:
        """Send one yielded value; False (after a final failure output) if it can't be pickled."""
        try:
            data = _checked_size(dumps_result(item))
        except BaseException as e:  # noqa: BLE001
            self.failure(inp, e, "done", True, 0)
            return False
        self.output(inp, "success", data, "item", None, True)
        return True

    def _run_gen(self, inp: Input, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            for item in func(*args, **kwargs):
                if not self._emit_item(inp, item):
                    return
        except BaseException as e:  # noqa: BLE001
            self.failure(inp, e, "done", True)
            return
        self.output(inp, "success", dumps_result(None), "done", None, True)

    def _get_loop(self) -> Any:
        if self.loop is None:
            import asyncio

            self.loop = asyncio.new_event_loop()
        return self.loop

    async def _call_async(
        self, inp: Input, func: Callable[..., Any], is_generator: bool, args: tuple[Any, ...], kwargs: dict[str, Any], flush: bool
    ) -> None:
        ctx = self.ctx
        ctx._input_id.set(inp.input_id)
        ctx._call_id.set(inp.call_id)
        if is_generator:
            try:
                async for item in func(*args, **kwargs):
                    if not self._emit_item(inp, item):
                        return
            except BaseException as e:  # noqa: BLE001
                self.failure(inp, e, "done", True)
                return
            self.output(inp, "success", dumps_result(None), "done", None, True)
            return
        try:
            result = await func(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            self.failure(inp, e, None, flush)
            return
        self._send_result(inp, result, None, flush)

    def _run_async(
        self, inp: Input, func: Callable[..., Any], is_generator: bool, args: tuple[Any, ...], kwargs: dict[str, Any], flush: bool
    ) -> None:
        coro = self._call_async(inp, func, is_generator, args, kwargs, flush)
        if self.methods is not None and self.max_inputs > 1:
            import asyncio

            asyncio.run(coro)  # a class's async method on an input thread: a loop of its own
        else:
            self._get_loop().run_until_complete(coro)

    # -- main loops

    def serve(self) -> None:
        func = self.func
        if getattr(func, "__flare_batched__", None) is not None or "FLARE_BATCH" in os.environ or (
            isinstance(func, type) and "batched" in (getattr(func, "__flare_cls_info__", None) or {})
        ):
            from . import batching  # @flare.batched: one batch at a time (batching.py)

            config = batching.batch_config(func)
            if config is not None:
                batching.serve(self, *config)
                self.flush()
                return
        if self.max_inputs > 1:
            self.serve_concurrent()
        else:
            self.serve_serial()
        self.flush()

    def serve_serial(self) -> None:
        """max_inputs == 1: run inputs one after the other on the main thread."""
        reader = self.reader
        pending = self.pending
        select: Any = None
        while True:
            if not pending:
                if self.stopping:
                    return
                frames = reader.read_frames()
                if not frames:
                    return
                self.handle_frames(frames)
                continue
            if len(pending) > 1 or reader.buf:
                # A batch is queued: look for more inputs/cancels without blocking, so
                # outputs can be batched and cancelled inputs skipped.
                if select is None:
                    import select as select_module

                    select = select_module.select
                while select([reader.fd], [], [], 0)[0]:
                    if not reader.fill(1):
                        break
                    self.handle_frames(reader.frames())
                if self.stopping:
                    return
            inp = pending.pop(0)
            if self.cancelled and self.take_cancelled(inp):
                continue
            # Flush directly when nothing else is queued (the warm-call path);
            # otherwise hand the output to the writer thread, which batches.
            self.run_input(inp, not pending)

    def serve_concurrent(self) -> None:
        """max_inputs > 1: sync functions on a thread pool, async ones on one event loop."""
        import threading

        if self.is_async:
            import asyncio

            loop = self._get_loop()
            threading.Thread(target=loop.run_forever, name="flare-loop", daemon=True).start()
            sem_box: list[Any] = []

            async def limited(inp: Input) -> None:
                if not sem_box:
                    sem_box.append(asyncio.Semaphore(self.max_inputs))
                async with sem_box[0]:
                    if self.cancelled and self.take_cancelled(inp):
                        return
                    await self._async_input(inp)

            def submit(inp: Input) -> None:
                asyncio.run_coroutine_threadsafe(limited(inp), loop)

            dispatch = submit
        else:
            import queue

            work: queue.SimpleQueue[Input] = queue.SimpleQueue()
            threads: list[threading.Thread] = []
            outstanding = [0]  # inputs queued or running
            count_lock = threading.Lock()

            def worker() -> None:
                while True:
                    inp = work.get()
                    try:
                        if not (self.cancelled and self.take_cancelled(inp)):
                            self.run_input(inp, True)
                    finally:
                        with count_lock:
                            outstanding[0] -= 1

            def submit(inp: Input) -> None:
                with count_lock:
                    outstanding[0] += 1
                    need = outstanding[0] > len(threads) and len(threads) < self.max_inputs
                if need:
                    t = threading.Thread(target=worker, name=f"flare-input-{len(threads)}", daemon=True)
                    threads.append(t)
                    t.start()
                work.put(inp)

            dispatch = submit

        reader = self.reader
        while not self.stopping:
            frames = reader.read_frames()
            if not frames:
                return
            self.handle_frames(frames)
            while self.pending:
                dispatch(self.pending.pop(0))

    async def _async_input(self, inp: Input) -> None:
        call = self._decode(inp, "Could not deserialize the arguments")
        if call is None:
            return
        func, _, is_generator, args, kwargs = call
        await self._call_async(inp, func, is_generator, args, kwargs, True)


class ClassService:
    """The instance of an ``@app.cls()`` class this container serves (``flare/cls.py``).

    The class carries ``__flare_cls_info__`` (plain data: parameters, hooks, methods); the
    parameter values come in ``FLARE_CLS_PARAMS`` (base64 of a pickled dict, absent for the
    defaults). Exit hooks run once: after SHUTDOWN or EOF, or on SIGTERM.
    """

    def __init__(self, user_cls: type, snap_only: bool = False) -> None:
        info = getattr(user_cls, "__flare_cls_info__", None) or {}
        params: dict[str, Any] = {n: p["default"] for n, p in (info.get("params") or {}).items() if "default" in p}
        blob = os.environ.get("FLARE_CLS_PARAMS")
        if blob:
            pickle = _pickler()
            from binascii import a2b_base64

            params.update(pickle.loads(a2b_base64(blob)))
        obj: Any = object.__new__(user_cls)
        for k, v in params.items():
            setattr(obj, k, v)
        klass: Any = user_cls
        if klass.__init__ is not object.__init__:
            klass.__init__(obj)
        self.obj = obj
        self.info = info
        self.exited = False
        if info.get("exit"):
            import signal

            signal.signal(signal.SIGTERM, self._on_sigterm)
        # Before a checkpoint only the snap=True hooks run; the others after RESUME.
        snap = set(info.get("enter_snap") or ())
        self.later = [n for n in info.get("enter") or () if n not in snap] if snap_only else []
        for name in info.get("enter") or ():
            if not snap_only or name in snap:
                getattr(obj, name)()

    def run_later_enter_hooks(self) -> None:
        """The snap=False hooks, in every container after its start or restore."""
        for name in self.later:
            getattr(self.obj, name)()

    def attach(self, runner: Runner) -> None:
        methods: dict[str, tuple[Callable[..., Any], bool, bool]] = {}
        for name, flags in (self.info.get("methods") or {}).items():
            methods[name] = (getattr(self.obj, name), bool(flags.get("is_async")), bool(flags.get("is_generator")))
        runner.methods = methods
        runner.is_generator = False
        # One event loop serves concurrent inputs only when every method is async.
        runner.is_async = bool(methods) and all(m[1] for m in methods.values())

    def run_exit_hooks(self) -> None:
        if self.exited:
            return
        self.exited = True
        for name in self.info.get("exit") or ():
            try:
                getattr(self.obj, name)()
            except BaseException as e:  # noqa: BLE001 - the others still run
                try:
                    sys.stderr.write(exception_info(e)["traceback"])
                except Exception:  # noqa: BLE001
                    pass
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.run_exit_hooks()
        os._exit(0)


def prestart_warmup() -> None:
    """A pre-started runner (``FLARE_PRESTART=1``; no app's code is here yet) imports now
    what a start would: the pickler, cloudpickle, the SDK objects a user's module
    builds (``flare.App`` and its decorators). Platform code only, from the SDK mount."""
    _pickler()
    for name in ("cloudpickle", "flare.app"):
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - whatever fails here is imported (and reported) later
            pass


def apply_assignment(header: dict[str, Any]) -> None:
    """What an INIT to a pre-started runner carries (PROTOCOL.md section 2): the
    container's whole environment (``env``, replacing the pre-start one) and working dir
    (``cwd``: the code mount was attached over it after this process started)."""
    env = header.get("env")
    if isinstance(env, dict):
        for k in [k for k in os.environ if k not in env]:
            del os.environ[k]
        for k, v in env.items():
            if os.environ.get(k) != v:
                os.environ[k] = v
    cwd = header.get("cwd")
    if isinstance(cwd, str) and cwd:
        os.chdir(cwd)
        # A finder cached for the dir before the code mount covered it lists the old dir.
        for p in [p for p in sys.path_importer_cache if p == cwd or p == "/root"]:
            del sys.path_importer_cache[p]


def _stop_web(servers: list[Any]) -> None:
    if servers:
        from . import web_endpoints

        web_endpoints.stop(servers)


def main() -> int:
    fd = FD_OUT
    reader = FrameReader(FD_IN)
    if os.environ.get("FLARE_PRESTART") == "1":
        prestart_warmup()
    frames = reader.read_frames()
    if not frames:
        return 0
    typ, header, body = frames[0]
    if typ != INIT:
        sys.stderr.write(f"flare runner: expected INIT, got frame type {typ}\n")
        return 1
    try:
        # Whole lines per write, even under PYTHONUNBUFFERED (which would otherwise
        # write print()'s pieces separately and let lines of concurrent containers
        # interleave in the app's log); still flushed at every newline.
        sys.stdout.reconfigure(line_buffering=True, write_through=False)  # type: ignore[union-attr]
        sys.stderr.reconfigure(line_buffering=True, write_through=False)  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001
        pass
    apply_assignment(header)
    info = header.get("function") or {}
    service: ClassService | None = None
    snapshot = bool(header.get("snapshot"))
    web_servers: list[Any] = []
    try:
        func = load_function(info, body)
        if isinstance(func, type):
            # A class (@app.cls): instantiate it and run its enter hooks now, so that a
            # failing hook fails the start exactly like an import error.
            service = ClassService(func, snap_only=snapshot)
        if snapshot:
            # Memory snapshot (docs/SNAPSHOTS.md): checkpointed here, restored from here.
            from . import snapshot as _snapshot

            _restored, more = _snapshot.checkpoint(fd, reader)
            frames = frames[:1] + more
            if service is not None:
                service.run_later_enter_hooks()
        if info.get("web"):
            # Web endpoints (after the restore point: their sockets and threads are not
            # in a snapshot): serving before READY, so the first request finds them.
            from . import web_endpoints

            web_servers = web_endpoints.start(info, func, service.obj if service is not None else None)
    except BaseException as e:  # noqa: BLE001 - report anything, including SystemExit
        exc = exception_info(e)
        try:
            sys.stderr.write(exc["traceback"])
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        write_all(fd, encode_frame(INIT_FAILURE, {"exception": exc}, [pickle_exception(e)]))
        return 1
    vi = sys.version_info
    write_all(fd, encode_frame(READY, {"pid": os.getpid(), "python": f"{vi[0]}.{vi[1]}.{vi[2]}"}))
    runner = Runner(fd, reader, func, info)
    if service is not None:
        service.attach(runner)
    if len(frames) > 1:
        runner.handle_frames(frames[1:])
    try:
        runner.serve()
    except BrokenPipeError:
        _stop_web(web_servers)
        if service is not None:
            service.run_exit_hooks()
        return 0
    _stop_web(web_servers)
    if service is not None:
        service.run_exit_hooks()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
    return 0

"""``flare.Function`` and ``flare.FunctionCall``.

This module is imported inside every container (user modules decorate functions at
import time), so it imports nothing heavy at module level; the client machinery
(HTTP, threads, serialization) is imported when a method that needs it runs.
"""

from __future__ import annotations

import os

from . import _api, exception

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, AsyncIterator, Callable, Iterable, Iterator

    from ._transport import Client
    from .app import App

_CALL_WAIT_MS = 25000
_POLL_WAIT_MS = 25000
_FIRST_BATCH = 100
_MAX_BATCH = 1000
_MAX_BATCH_BYTES = 4 << 20


class _Method:
    """A blocking method with an ``.aio`` async variant (``f.remote(x)``, ``await f.remote.aio(x)``)."""

    __slots__ = ("_sync", "aio")

    def __init__(self, sync: Callable[..., Any], aio: Callable[..., Any]) -> None:
        self._sync = sync
        self.aio = aio

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._sync(*args, **kwargs)


def _client() -> Client:
    from ._transport import get_client

    return get_client()


def _output_value(output: dict[str, Any], name: str) -> Any:
    from ._serialization import deserialize, exception_from_output, unb64

    if output.get("status") == "success":
        data = output.get("data")
        return deserialize(unb64(data)) if data else None
    raise exception_from_output(output, name)


def _poll_outputs(client: Client, call_id: str, after: int, wait_ms: int, limit: int | None = None) -> dict[str, Any]:
    path = _api.call_outputs(call_id, after, wait_ms, limit)
    result: dict[str, Any] = client.request("GET", path, timeout=wait_ms / 1000 + 60)
    return result


async def _in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    import asyncio
    import functools

    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))


async def _aiter_in_thread(make_iter: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Run a blocking iterator in a thread and yield its items on the event loop."""
    import asyncio
    import threading

    loop = asyncio.get_running_loop()
    q: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    stop = threading.Event()

    def put(item: tuple[int, Any]) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # loop closed
            stop.set()

    def produce() -> None:
        try:
            it = make_iter()
            try:
                for item in it:
                    put((0, item))
                    if stop.is_set():
                        break
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            put((1, e))
        else:
            put((2, None))

    threading.Thread(target=produce, name="flare-aio-bridge", daemon=True).start()
    try:
        while True:
            kind, value = await q.get()
            if kind == 0:
                yield value
            elif kind == 1:
                raise value
            else:
                return
    finally:
        stop.set()


def _sync_iter_from_async(aiterable: Any, loop: Any) -> Iterator[Any]:
    """A blocking iterator over an async iterable that is consumed on ``loop``."""
    import asyncio
    import queue

    q: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()

    async def pump() -> None:
        try:
            async for item in aiterable:
                q.put((0, item))
        except BaseException as e:  # noqa: BLE001
            q.put((1, e))
        else:
            q.put((2, None))

    task = loop.create_task(pump())  # called on the running loop (from an .aio method)
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)

    def gen() -> Iterator[Any]:
        while True:
            kind, value = q.get()
            if kind == 0:
                yield value
            elif kind == 1:
                raise value
            else:
                return

    return gen()


_background_tasks: set[Any] = set()


class Function:
    """A function that runs in Flare containers. Made by ``@app.function()``."""

    _is_flare_function = True

    def __init__(
        self,
        raw_f: Callable[..., Any] | None,
        app: App | None,
        tag: str,
        config: dict[str, Any],
        serialized: bool = False,
    ) -> None:
        self._raw_f = raw_f
        self.__flare_raw_f__ = raw_f
        self._app = app
        self._tag = tag
        self._config = config
        self._serialized = serialized
        code = getattr(raw_f, "__code__", None)
        flags = code.co_flags if code is not None else 0
        self._is_generator = bool(flags & 0x220)  # CO_GENERATOR | CO_ASYNC_GENERATOR
        self._is_async = bool(flags & 0x280)  # CO_COROUTINE | CO_ASYNC_GENERATOR
        self._function_id: str | None = None
        self._from_name: tuple[str, str] | None = None
        if raw_f is not None:
            self.__name__ = getattr(raw_f, "__name__", tag)
            self.__qualname__ = getattr(raw_f, "__qualname__", tag)
            self.__module__ = getattr(raw_f, "__module__", __name__)
            self.__doc__ = getattr(raw_f, "__doc__", None)
        self.remote = _Method(self._remote, self._remote_aio)
        self.remote_gen = _Method(self._remote_gen, self._remote_gen_aio)
        self.map = _Method(self._map, self._map_aio)
        self.starmap = _Method(self._starmap, self._starmap_aio)
        self.for_each = _Method(self._for_each, self._for_each_aio)
        self.spawn = _Method(self._spawn, self._spawn_aio)
        self.spawn_map = _Method(self._spawn_map, self._spawn_map_aio)
        self.update_autoscaler = _Method(self._update_autoscaler, self._update_autoscaler_aio)
        self.get_current_stats = _Method(self._get_current_stats, self._get_current_stats_aio)

    # ------------------------------------------------------------------ identity

    def __repr__(self) -> str:
        return f"Function({self._tag!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore_function, (self._tag, self._function_id, self._from_name, self._is_generator, self._is_async))

    @property
    def object_id(self) -> str | None:
        return self._function_id

    @property
    def tag(self) -> str:
        return self._tag

    @property
    def is_generator(self) -> bool:
        return self._is_generator

    def get_raw_f(self) -> Callable[..., Any]:
        if self._raw_f is None:
            raise exception.InvalidError(f"Function {self._tag!r} was looked up by name; its code is not available here")
        return self._raw_f

    @classmethod
    def from_name(cls, app_name: str, name: str, *, environment_name: str | None = None) -> Function:
        """A reference to function ``name`` of the deployed app ``app_name`` (resolved on first use)."""
        f = cls(None, None, name, {})
        f._from_name = (app_name, name)
        return f

    def hydrate(self) -> Function:
        """Resolve the function's id now (``from_name`` references resolve lazily otherwise)."""
        self._hydrate()
        return self

    def _hydrate(self) -> str:
        fid = self._function_id
        if fid is not None:
            return fid
        client = _client()
        if self._from_name is not None:
            app_name, name = self._from_name
            info = client.request("GET", _api.app_function_by_name(app_name, name))
        elif os.environ.get("FLARE_IS_REMOTE") == "1" and os.environ.get("FLARE_APP_ID"):
            app_id = os.environ["FLARE_APP_ID"]
            info = client.request("GET", _api.app_function(app_id, self._tag))
        else:
            raise exception.ExecutionError(
                f"Function {self._tag!r} has not been hydrated: its app is not running. "
                "Call it inside `with app.run():`, from a `flare run` entrypoint, or use Function.from_name() "
                "for a deployed app."
            )
        self._is_generator = bool(info.get("is_generator", self._is_generator))
        self._is_async = bool(info.get("is_async", self._is_async))
        self._function_id = info["function_id"]
        return self._function_id  # type: ignore[return-value]

    # ------------------------------------------------------------------ local

    def local(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function in this process."""
        return self.get_raw_f()(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.local(*args, **kwargs)

    # ------------------------------------------------------------------ remote

    def _remote(self, *args: Any, **kwargs: Any) -> Any:
        from ._serialization import b64, serialize_args

        if self._is_generator:
            raise exception.InvalidError(
                f"{self._tag} is a generator function: call it with .remote_gen() (and iterate the result)"
            )
        payload = serialize_args(args, kwargs)
        fid = self._hydrate()
        if self._is_generator:
            raise exception.InvalidError(f"{self._tag} is a generator function: call it with .remote_gen()")
        client = _client()
        body = ('{"kind":"call","inputs":[{"args":"%s"}],"more":false,"wait_ms":%d}' % (b64(payload), _CALL_WAIT_MS)).encode()
        return self._call_until_output(client, fid, body)

    def _call_until_output(self, client: Client, fid: str, body: bytes) -> Any:
        """Submit one input and wait for its output. If the server goes away (a restarted
        control plane forgets in-memory calls), wait up to ``_RECONNECT_WINDOW`` seconds for it
        to come back and submit the input again."""
        import time

        deadline: float | None = None
        while True:
            try:
                resp = client.request("POST", _api.function_calls(fid), body, timeout=_CALL_WAIT_MS / 1000 + 60)
            except exception.ConnectionError as e:
                if deadline is None:
                    if not getattr(e, "request_sent", False):
                        raise  # never reached the server: nothing to recover
                    deadline = time.monotonic() + _RECONNECT_WINDOW
                _await_server(client, deadline, e)
                continue
            outputs = resp.get("outputs")
            if outputs:
                self._catch_up_logs(resp)
                return _output_value(outputs[0], self._tag)
            call_id = resp["call_id"]
            after = -1
            try:
                while True:
                    r = _poll_outputs(client, call_id, after, _POLL_WAIT_MS)
                    if r["outputs"]:
                        self._catch_up_logs(r)
                        return _output_value(r["outputs"][0], self._tag)
                    after = r.get("next", after)
            except (exception.ConnectionError, exception.NotFoundError) as e:
                if deadline is None:
                    deadline = time.monotonic() + _RECONNECT_WINDOW
                _await_server(client, deadline, e)
                try:
                    client.request("GET", _api.call(call_id), timeout=10)
                except exception.NotFoundError:
                    continue  # forgotten: submit the input again
                except exception.ConnectionError:
                    pass
                # still known (a transient failure): keep polling the same call
                while True:
                    try:
                        r = _poll_outputs(client, call_id, after, _POLL_WAIT_MS)
                    except exception.NotFoundError:
                        break
                    except exception.ConnectionError as e2:
                        _await_server(client, deadline, e2)
                        continue
                    if r["outputs"]:
                        self._catch_up_logs(r)
                        return _output_value(r["outputs"][0], self._tag)
                    after = r.get("next", after)

    def _catch_up_logs(self, resp: dict[str, Any]) -> None:
        """Prints the function made before returning reach the terminal before its result."""
        from . import _output

        if _output._streamers and self._app is not None:
            _output.catch_up(self._app._app_id, resp.get("log_seq"))

    async def _remote_aio(self, *args: Any, **kwargs: Any) -> Any:
        return await _in_thread(self._remote, *args, **kwargs)

    def _remote_gen(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        from ._serialization import b64, serialize_args

        payload = serialize_args(args, kwargs)
        fid = self._hydrate()
        if not self._is_generator:
            raise exception.InvalidError(f"{self._tag} is not a generator function: call it with .remote()")
        return self._gen_iter(fid, b64(payload))

    def _gen_iter(self, fid: str, args_b64: str) -> Iterator[Any]:
        client = _client()
        body = ('{"kind":"gen","inputs":[{"args":"%s"}],"more":false,"wait_ms":0}' % args_b64).encode()
        resp = client.request("POST", _api.function_calls(fid), body)
        call_id = resp["call_id"]
        finished = False
        try:
            pending = sorted(resp.get("outputs") or [], key=lambda o: o["seq"])
            after = pending[-1]["seq"] if pending else -1
            while True:
                for o in pending:
                    if o.get("gen") == "item" and o.get("status") == "success":
                        yield _output_value(o, self._tag)
                    elif o.get("gen") == "done" and o.get("status") == "success":
                        finished = True
                        return
                    else:
                        finished = True
                        raise _exception_of(o, self._tag)
                r = _poll_outputs(client, call_id, after, _POLL_WAIT_MS)
                pending = sorted(r["outputs"], key=lambda o: o["seq"])
                after = r.get("next", after)
                if not pending and r.get("done"):
                    finished = True
                    return
        finally:
            if not finished:
                _cancel_quietly(client, call_id)

    def _remote_gen_aio(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        return _aiter_in_thread(lambda: self._remote_gen(*args, **kwargs))

    # ------------------------------------------------------------------ autoscaler

    def _update_autoscaler(
        self,
        *,
        min_containers: int | None = None,
        max_containers: int | None = None,
        buffer_containers: int | None = None,
        scaledown_window: int | None = None,
    ) -> None:
        """Change the autoscaler of the running or deployed function now, without a redeploy
        (``f.update_autoscaler(min_containers=2)``); parameters left as ``None`` keep their
        value. Like Modal, the override lasts until the app is deployed again."""
        fields = {
            "min_containers": min_containers,
            "max_containers": max_containers,
            "buffer_containers": buffer_containers,
            "scaledown_window": scaledown_window,
        }
        for label, value in fields.items():
            if value is None:
                continue
            low = 1 if label == "max_containers" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise exception.InvalidError(f"{label} must be an int >= {low}, got {value!r}")
        if min_containers is not None and max_containers is not None and min_containers > max_containers:
            raise exception.InvalidError(
                f"min_containers ({min_containers}) must not exceed max_containers ({max_containers})"
            )
        body = {k: v for k, v in fields.items() if v is not None}
        fid = self._hydrate()
        _client().request("POST", _api.function_autoscaler(fid), body)

    async def _update_autoscaler_aio(self, **kwargs: Any) -> None:
        await _in_thread(self._update_autoscaler, **kwargs)

    def _get_current_stats(self) -> FunctionStats:
        """Backlog and containers of the function right now (like Modal's ``FunctionStats``)."""
        fid = self._hydrate()
        info = _client().request("GET", _api.function_stats(fid))
        return FunctionStats._from_json(info)

    async def _get_current_stats_aio(self) -> FunctionStats:
        return await _in_thread(self._get_current_stats)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ spawn

    def _spawn(self, *args: Any, **kwargs: Any) -> FunctionCall:
        from ._serialization import b64, serialize_args

        payload = serialize_args(args, kwargs)
        fid = self._hydrate()
        if self._is_generator:
            raise exception.InvalidError(f"{self._tag} is a generator function: it cannot be spawned; use .remote_gen()")
        body = ('{"kind":"spawn","inputs":[{"args":"%s"}],"more":false,"wait_ms":0}' % b64(payload)).encode()
        resp = _client().request("POST", _api.function_calls(fid), body)
        return FunctionCall(resp["call_id"], "spawn", self._tag)

    async def _spawn_aio(self, *args: Any, **kwargs: Any) -> FunctionCall:
        return await _in_thread(self._spawn, *args, **kwargs)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ map

    def _check_mappable(self) -> str:
        fid = self._hydrate()
        if self._is_generator:
            raise exception.InvalidError(f"{self._tag} is a generator function: .map() is not supported for generators")
        return fid

    def _map(
        self,
        *iterables: Iterable[Any],
        kwargs: dict[str, Any] | None = None,
        order_outputs: bool = True,
        return_exceptions: bool = False,
    ) -> Iterator[Any]:
        """Run the function over ``zip(*iterables)`` in parallel; yields results (in input order by default)."""
        if not iterables:
            raise exception.InvalidError("map() needs at least one iterable")
        fid = self._check_mappable()
        return _MapRun(self, fid, zip(*iterables), kwargs or {}, False).results(order_outputs, return_exceptions)

    def _starmap(
        self,
        iterable: Iterable[Any],
        kwargs: dict[str, Any] | None = None,
        order_outputs: bool = True,
        return_exceptions: bool = False,
    ) -> Iterator[Any]:
        """Like map(), but each item is a tuple of positional arguments."""
        fid = self._check_mappable()
        return _MapRun(self, fid, iter(iterable), kwargs or {}, True).results(order_outputs, return_exceptions)

    def _for_each(self, *iterables: Iterable[Any], kwargs: dict[str, Any] | None = None, ignore_exceptions: bool = False) -> None:
        """Run the function over the inputs for its side effects, discarding results."""
        for _ in self._map(*iterables, kwargs=kwargs, order_outputs=False, return_exceptions=ignore_exceptions):
            pass

    def _spawn_map(self, *iterables: Iterable[Any], kwargs: dict[str, Any] | None = None) -> FunctionCall:
        """Submit all inputs and return without waiting; the FunctionCall's get() returns the result list."""
        if not iterables:
            raise exception.InvalidError("spawn_map() needs at least one iterable")
        fid = self._check_mappable()
        run = _MapRun(self, fid, zip(*iterables), kwargs or {}, False)
        run.send_all()
        if run.error is not None:
            raise run.error
        assert run.call_id is not None
        return FunctionCall(run.call_id, "map", self._tag)

    # async variants: the blocking machinery runs in a thread, items are bridged to the loop.

    def _aio_inputs(self, iterables: tuple[Any, ...]) -> tuple[Any, ...]:
        import asyncio

        loop = asyncio.get_running_loop()
        return tuple(_sync_iter_from_async(it, loop) if hasattr(it, "__aiter__") else it for it in iterables)

    def _map_aio(
        self,
        *iterables: Any,
        kwargs: dict[str, Any] | None = None,
        order_outputs: bool = True,
        return_exceptions: bool = False,
    ) -> AsyncIterator[Any]:
        async def gen() -> AsyncIterator[Any]:
            its = self._aio_inputs(iterables)
            async for item in _aiter_in_thread(
                lambda: self._map(*its, kwargs=kwargs, order_outputs=order_outputs, return_exceptions=return_exceptions)
            ):
                yield item

        return gen()

    def _starmap_aio(
        self,
        iterable: Any,
        kwargs: dict[str, Any] | None = None,
        order_outputs: bool = True,
        return_exceptions: bool = False,
    ) -> AsyncIterator[Any]:
        async def gen() -> AsyncIterator[Any]:
            (it,) = self._aio_inputs((iterable,))
            async for item in _aiter_in_thread(
                lambda: self._starmap(it, kwargs=kwargs, order_outputs=order_outputs, return_exceptions=return_exceptions)
            ):
                yield item

        return gen()

    async def _for_each_aio(self, *iterables: Any, kwargs: dict[str, Any] | None = None, ignore_exceptions: bool = False) -> None:
        async for _ in self._map_aio(*iterables, kwargs=kwargs, order_outputs=False, return_exceptions=ignore_exceptions):
            pass

    async def _spawn_map_aio(self, *iterables: Any, kwargs: dict[str, Any] | None = None) -> FunctionCall:
        its = self._aio_inputs(iterables)
        return await _in_thread(self._spawn_map, *its, kwargs=kwargs)  # type: ignore[no-any-return]


class FunctionStats:
    """A function's queue and containers at one moment (``Function.get_current_stats()``).

    - ``backlog``: inputs waiting for a container;
    - ``num_total_runners``: containers alive (starting, running or idle);
    - ``num_running_inputs``: inputs being executed now.
    """

    __slots__ = ("backlog", "num_total_runners", "num_running_inputs")

    def __init__(self, backlog: int, num_total_runners: int, num_running_inputs: int = 0) -> None:
        self.backlog = backlog
        self.num_total_runners = num_total_runners
        self.num_running_inputs = num_running_inputs

    @classmethod
    def _from_json(cls, info: dict[str, Any]) -> FunctionStats:
        def num(*keys: str) -> int:
            for k in keys:
                v = info.get(k)
                if v is not None:
                    return int(v)
            return 0

        return cls(
            backlog=num("backlog"),
            num_total_runners=num("num_total_runners", "containers"),
            num_running_inputs=num("num_running_inputs", "in_flight"),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FunctionStats):
            return NotImplemented
        return (self.backlog, self.num_total_runners, self.num_running_inputs) == (
            other.backlog,
            other.num_total_runners,
            other.num_running_inputs,
        )

    def __repr__(self) -> str:
        return (
            f"FunctionStats(backlog={self.backlog}, num_total_runners={self.num_total_runners}, "
            f"num_running_inputs={self.num_running_inputs})"
        )


def _restore_function(
    tag: str, function_id: str | None, from_name: tuple[str, str] | None, is_generator: bool, is_async: bool
) -> Function:
    f = Function(None, None, tag, {})
    f._function_id = function_id
    f._from_name = from_name
    f._is_generator = is_generator
    f._is_async = is_async
    return f


def _exception_of(output: dict[str, Any], name: str) -> BaseException:
    from ._serialization import exception_from_output

    return exception_from_output(output, name)


def _cancel_quietly(client: Client, call_id: str) -> None:
    try:
        client.request("POST", _api.call_cancel(call_id), {"terminate_containers": False}, timeout=10)
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


_RECONNECT_WINDOW = 60.0


def _await_server(client: Client, deadline: float, error: BaseException) -> None:
    """Wait (with backoff) until the server answers its health check; re-raise ``error`` at ``deadline``."""
    import time

    delay = 0.1
    while True:
        try:
            client.request("GET", _api.health(), timeout=5)
            return
        except exception.ConnectionError:
            pass
        now = time.monotonic()
        if now >= deadline:
            raise error
        time.sleep(min(delay, max(0.0, deadline - now)))
        delay = min(delay * 2, 2.0)


class _InputLedger:
    """Which original inputs of a ``.map()`` still wait for their final output, and how the
    indexes of each server-side call map back to the original ones.

    A control plane that restarts forgets in-memory calls: the map client then submits the
    pending inputs again as a new call, whose index ``i`` is original index ``maps[new][i]``.
    An output counts once: ``resolve`` returns the original index the first time only.
    """

    __slots__ = ("pending", "maps")

    def __init__(self) -> None:
        self.pending: dict[int, str] = {}  # original index -> serialized input (JSON fragment)
        self.maps: dict[str, _IndexMap] = {}  # call id -> original index of each of its inputs

    def add(self, call_id: str, items: list[tuple[int, str]]) -> None:
        m = self.maps.setdefault(call_id, _IndexMap())
        for orig, frag in items:
            self.pending[orig] = frag
            m.append(orig)

    def resolve(self, call_id: str, idx: int) -> int | None:
        """The original index of output ``idx`` of ``call_id``, or None if it was already delivered."""
        m = self.maps.get(call_id)
        if m is None or not 0 <= idx < len(m):
            return None
        orig = m[idx]
        if self.pending.pop(orig, None) is None:
            return None
        return orig

    def resubmission(self) -> list[tuple[int, str]]:
        """The inputs to submit again (still pending), in original order."""
        return sorted(self.pending.items())

    def rebind(self, new_call_id: str, items: list[tuple[int, str]]) -> None:
        m = self.maps[new_call_id] = _IndexMap()
        for orig, _ in items:
            m.append(orig)


class _IndexMap:
    """Original index of each input of one server-side call: a run of consecutive indexes
    (the usual case: a call's input ``i`` is original input ``start + i``) held as two
    numbers, then a list for what follows out of order (after a resubmission). So a long
    map costs the client memory for its pending inputs only, not for every input."""

    __slots__ = ("start", "run", "rest")

    def __init__(self) -> None:
        self.start = 0
        self.run = 0
        self.rest: list[int] = []

    def append(self, orig: int) -> None:
        if not self.rest and (self.run == 0 or orig == self.start + self.run):
            if self.run == 0:
                self.start = orig
            self.run += 1
        else:
            self.rest.append(orig)

    def __len__(self) -> int:
        return self.run + len(self.rest)

    def __getitem__(self, idx: Any) -> Any:
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        if idx < 0:
            idx += len(self)
        if 0 <= idx < self.run:
            return self.start + idx
        if 0 <= idx - self.run < len(self.rest):
            return self.rest[idx - self.run]
        raise IndexError(idx)


class _MapRun:
    """One ``.map()`` call: a sender thread streams input batches, the caller polls outputs.

    Survives a control-plane restart: when the server is unreachable, or forgets the call
    (404 after having known it), the inputs still without a final output are submitted again
    as a new call (waiting up to ``_RECONNECT_WINDOW`` seconds for the server to return).
    """

    def __init__(self, function: Function, function_id: str, items: Iterator[Any], kwargs: dict[str, Any], star: bool) -> None:
        import threading

        self.function = function
        self.function_id = function_id
        self.items = items
        self.kwargs = kwargs
        self.star = star
        self.call_id: str | None = None
        self.error: BaseException | None = None
        self.created = threading.Event()
        self.sender_done = threading.Event()
        self.sent_all = False
        self.final_posted = False  # the batch with more=false was handed to the server (maybe)
        self.stop = False
        self.num_sent = 0
        self.ledger = _InputLedger()
        self.state_lock = threading.Lock()  # ledger and call_id
        self.call_lock = threading.RLock()  # serializes posts and recoveries

    def _post(self, client: Client, batch: list[tuple[int, str]], more: bool) -> None:
        with self.call_lock:
            if more is False:
                self.final_posted = True
            call_id = self.call_id
            if call_id is None:
                inputs = ",".join(frag for _, frag in batch)
                body = ('{"kind":"map","inputs":[%s],"more":%s,"wait_ms":0}' % (inputs, "true" if more else "false")).encode()
                resp = client.request("POST", _api.function_calls(self.function_id), body)
                with self.state_lock:
                    self.ledger.add(resp["call_id"], batch)
                    self.call_id = resp["call_id"]
                self.created.set()
                self.num_sent += len(batch)
                return
            with self.state_lock:
                self.ledger.add(call_id, batch)
                known = len(self.ledger.maps[call_id]) - len(batch)
            inputs = ",".join(frag for _, frag in batch)
            body = ('{"inputs":[%s],"more":%s}' % (inputs, "true" if more else "false")).encode()
            try:
                while True:
                    try:
                        client.request("POST", _api.call_inputs(call_id), body)
                        break
                    except exception.ResourceExhaustedError:
                        # The server held the batch while our outputs were not being read
                        # (the consumer is slow): send it again, nothing was recorded.
                        if self.stop:
                            return
            except (exception.ConnectionError, exception.NotFoundError) as e:
                # Resubmits everything pending, this batch included, or (call still known)
                # re-posts whatever part of it the server did not record.
                self._recover(client, call_id, e, unposted_from=known, more=more)
            self.num_sent += len(batch)

    def _recover(
        self,
        client: Client,
        failed_call_id: str,
        error: BaseException,
        unposted_from: int | None = None,
        more: bool | None = None,
    ) -> None:
        """The server failed us on ``failed_call_id``: wait for it, then carry on with that call
        if it still exists, else submit the pending inputs again as a new call."""
        import time

        deadline = time.monotonic() + _RECONNECT_WINDOW
        with self.call_lock:
            if self.call_id != failed_call_id:
                return  # another thread already recovered
            while True:
                _await_server(client, deadline, error)
                try:
                    info = client.request("GET", _api.call(failed_call_id), timeout=10)
                except exception.ConnectionError:
                    continue
                except exception.NotFoundError:
                    info = None
                if info is not None:
                    # A transient failure: the call is still there.
                    if unposted_from is not None:
                        with self.state_lock:
                            m = self.ledger.maps[failed_call_id]
                            have = int(info.get("num_inputs", len(m)))
                            rest = [self.ledger.pending[o] for o in m[have:] if o in self.ledger.pending]
                        if have < len(m):
                            body = ('{"inputs":[%s],"more":%s}' % (",".join(rest), "true" if more else "false")).encode()
                            try:
                                client.request("POST", _api.call_inputs(failed_call_id), body)
                            except (exception.ConnectionError, exception.ResourceExhaustedError):
                                continue
                            except exception.NotFoundError:
                                pass  # forgotten after all: resubmit below
                            else:
                                return
                        else:
                            return
                    else:
                        return
                with self.state_lock:
                    items = self.ledger.resubmission()
                more_after = not self.final_posted
                inputs = ",".join(frag for _, frag in items)
                body = ('{"kind":"map","inputs":[%s],"more":%s,"wait_ms":0}' % (inputs, "true" if more_after else "false")).encode()
                try:
                    resp = client.request("POST", _api.function_calls(self.function_id), body)
                except exception.ConnectionError:
                    continue
                with self.state_lock:
                    self.ledger.rebind(resp["call_id"], items)
                    self.call_id = resp["call_id"]
                return

    def send_all(self) -> None:
        from ._serialization import b64, serialize_args

        client = _client()
        kwargs = self.kwargs
        star = self.star
        batch: list[tuple[int, str]] = []
        size = 0
        limit = _FIRST_BATCH
        n = 0
        try:
            for item in self.items:
                if self.stop:
                    return
                args = tuple(item) if star else item
                data = b64(serialize_args(args, kwargs))
                batch.append((n, '{"args":"%s"}' % data))
                n += 1
                size += len(data)
                if len(batch) >= limit or size >= _MAX_BATCH_BYTES:
                    self._post(client, batch, True)
                    batch = []
                    size = 0
                    limit = _MAX_BATCH
            if not self.stop:
                self._post(client, batch, False)
                self.sent_all = True
        except BaseException as e:  # noqa: BLE001 - reported to the consumer
            self.error = e
            if self.call_id is not None:
                _cancel_quietly(client, self.call_id)
        finally:
            self.created.set()
            self.sender_done.set()

    def _sender_main(self) -> None:
        try:
            self.send_all()
        finally:
            _client().close()

    def results(self, order_outputs: bool, return_exceptions: bool) -> Iterator[Any]:
        import threading

        threading.Thread(target=self._sender_main, name="flare-map-sender", daemon=True).start()
        return self._results(order_outputs, return_exceptions)

    def _results(self, order_outputs: bool, return_exceptions: bool) -> Iterator[Any]:
        import time

        from ._serialization import deserialize, exception_from_output, unb64

        name = self.function._tag
        client = _client()
        finished = False
        try:
            self.created.wait()
            if self.call_id is None:
                assert self.error is not None
                raise self.error
            call_id = self.call_id
            after = -1
            buffered: dict[int, tuple[bool, Any]] = {}
            next_idx = 0
            while True:
                with self.state_lock:
                    if self.call_id != call_id:  # re-submitted (by the sender or by us)
                        call_id = self.call_id
                        after = -1
                try:
                    r = _poll_outputs(client, call_id, after, 1000 if not self.sent_all else _POLL_WAIT_MS)
                except (exception.ConnectionError, exception.NotFoundError) as e:
                    if self.error is not None:
                        raise self.error from None
                    self._recover(client, call_id, e)
                    continue
                after = r.get("next", after)
                if r["outputs"]:
                    self.function._catch_up_logs(r)
                for o in r["outputs"]:
                    with self.state_lock:
                        orig = self.ledger.resolve(call_id, o["idx"])
                    if orig is None:
                        continue  # already delivered (a late output of a re-run input)
                    if o.get("status") == "success":
                        data = o.get("data")
                        ok, value = True, deserialize(unb64(data)) if data else None
                    else:
                        ok, value = False, exception_from_output(o, name)
                        if not return_exceptions:
                            raise value
                    if order_outputs:
                        buffered[orig] = (ok, value)
                        while next_idx in buffered:
                            yield buffered.pop(next_idx)[1]
                            next_idx += 1
                    else:
                        yield value
                if self.error is not None:
                    raise self.error
                if 0 < len(r["outputs"]) < 200 and not r.get("done"):
                    # Outputs are trickling in: let a few milliseconds' worth accumulate
                    # instead of paying one HTTP round trip per handful of outputs.
                    time.sleep(0.004)
                if r.get("done"):
                    with self.state_lock:
                        current = self.call_id == call_id
                    if not current:
                        continue
                    # The server only says done after our last batch (more=false) was accepted.
                    self.sender_done.wait()
                    if self.error is not None:
                        raise self.error
                    with self.state_lock:
                        if self.call_id != call_id:
                            continue
                    for idx in sorted(buffered):
                        yield buffered[idx][1]
                    finished = True
                    return
        finally:
            if not finished:
                self.stop = True
                if self.call_id is not None:
                    _cancel_quietly(client, self.call_id)


class FunctionCall:
    """A handle on a spawned call (``f.spawn(...)``, ``f.spawn_map(...)``)."""

    gather: _Method  # FunctionCall.gather(*calls) / await FunctionCall.gather.aio(*calls), set below

    def __init__(self, call_id: str, kind: str | None = None, function_name: str = "") -> None:
        self._call_id = call_id
        self._kind = kind
        self._function_name = function_name
        self.get = _Method(self._get, self._get_aio)
        self.cancel = _Method(self._cancel, self._cancel_aio)

    def __repr__(self) -> str:
        return f"FunctionCall({self._call_id!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FunctionCall, (self._call_id, self._kind, self._function_name))

    @property
    def object_id(self) -> str:
        return self._call_id

    @staticmethod
    def from_id(function_call_id: str) -> FunctionCall:
        return FunctionCall(function_call_id)

    def _get(self, timeout: float | None = None) -> Any:
        """The result; raises flare.exception.TimeoutError if not ready within ``timeout`` seconds."""
        import time

        client = _client()
        if self._kind is None:
            info = client.request("GET", _api.call(self._call_id))
            self._kind = info.get("kind") or "spawn"
        deadline = None if timeout is None else time.monotonic() + timeout
        after = -1
        outputs: list[dict[str, Any]] = []
        while True:
            if deadline is None:
                wait_ms = _POLL_WAIT_MS
            else:
                wait_ms = max(0, min(_POLL_WAIT_MS, int((deadline - time.monotonic()) * 1000)))
            r = _poll_outputs(client, self._call_id, after, wait_ms)
            outputs.extend(r["outputs"])
            after = r.get("next", after)
            if r.get("done"):
                break
            if self._kind in ("call", "spawn") and outputs:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise exception.TimeoutError(f"FunctionCall {self._call_id} did not finish within {timeout}s")
        if self._kind == "map":
            outputs.sort(key=lambda o: o["idx"])
            return [_output_value(o, self._function_name) for o in outputs]
        if self._kind == "gen":
            outputs.sort(key=lambda o: o["seq"])
            items = []
            for o in outputs:
                if o.get("status") != "success":
                    raise _exception_of(o, self._function_name)
                if o.get("gen") == "item":
                    items.append(_output_value(o, self._function_name))
            return items
        if not outputs:
            raise exception.ExecutionError(f"FunctionCall {self._call_id} finished without an output")
        return _output_value(outputs[0], self._function_name)

    async def _get_aio(self, timeout: float | None = None) -> Any:
        return await _in_thread(self._get, timeout)

    def _cancel(self, terminate_containers: bool = False) -> None:
        """Cancel the call: pending inputs are dropped, running ones stopped."""
        _client().request("POST", _api.call_cancel(self._call_id), {"terminate_containers": bool(terminate_containers)})

    async def _cancel_aio(self, terminate_containers: bool = False) -> None:
        await _in_thread(self._cancel, terminate_containers)



def _gather(*calls: FunctionCall) -> list[Any]:
    """Wait for several FunctionCalls; their results in order (raises the first failure)."""
    return [c.get() for c in calls]


async def _gather_aio(*calls: FunctionCall) -> list[Any]:
    import asyncio

    return list(await asyncio.gather(*(c.get.aio() for c in calls)))


FunctionCall.gather = _Method(_gather, _gather_aio)  # type: ignore[attr-defined]

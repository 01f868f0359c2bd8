"""``flare.Function``: a function that runs in Flare containers (``@app.function()``).

This module is imported inside every container (user modules decorate functions at
import time), so at module level it imports only what defining a function needs; what
calling one needs (the invocation loop, the map engine, ``FunctionCall``, log catch-up,
transport, serialization) is imported by the methods that call (deliberately lazy, for
the containers' start; ``tests/test_structure.py`` checks it).
"""

from __future__ import annotations

import os

from . import exception
from ._bridge import Method, aio_inputs, aiter_in_thread, in_thread
from ._object import _Object
from ._options import Concurrency, FunctionOptions, check_autoscaler_update

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, AsyncIterator, Callable, Iterable, Iterator, TypeVar

    from ._transport import Client
    from .app import App
    from .function_call import FunctionCall
    from .schedule import Schedule

    F = TypeVar("F")


def _client() -> Client:
    from . import _invocation

    return _invocation.client()


class Function(_Object):
    """A function that runs in Flare containers. Made by ``@app.function()``."""

    _is_flare_function = True
    _kind = "Function"
    # Prepended to every input's positional arguments (a class method's name, flare.cls).
    _arg_prefix: tuple[Any, ...] = ()
    # @flare.batched (flare/batching.py): callers pass positional arguments only.
    _batched = False
    # schedule= of @app.function (flare/schedule.py): runs on its own, with no arguments.
    _schedule: Schedule | None = None

    def __init__(
        self,
        raw_f: Callable[..., Any] | None,
        app: App | None,
        tag: str,
        options: FunctionOptions | None,
        serialized: bool = False,
    ) -> None:
        self._init_object(tag)
        self._raw_f = raw_f
        self.__flare_raw_f__ = raw_f
        self._app = app
        self._options = options
        self._serialized = serialized
        # Web endpoints (flare/web_endpoints.py): the definition's "web" list, and the URLs
        # the server gave (``web_urls``: a class's, by method name); ``_web_known`` once
        # the server said (None is an answer too: no endpoint).
        self._web: list[dict[str, Any]] = []
        self._web_url: str | None = None
        self._web_urls: dict[str, str] = {}
        self._web_known = False
        code = getattr(raw_f, "__code__", None)
        flags = code.co_flags if code is not None else 0
        self._is_generator = bool(flags & 0x220)  # CO_GENERATOR | CO_ASYNC_GENERATOR
        self._is_async = bool(flags & 0x280)  # CO_COROUTINE | CO_ASYNC_GENERATOR
        if raw_f is not None:
            self.__name__ = getattr(raw_f, "__name__", tag)
            self.__qualname__ = getattr(raw_f, "__qualname__", tag)
            self.__module__ = getattr(raw_f, "__module__", __name__)
            self.__doc__ = getattr(raw_f, "__doc__", None)
        self.remote = Method(self._remote, self._remote_aio)
        self.remote_gen = Method(self._remote_gen, self._remote_gen_aio)
        self.map = Method(self._map, self._map_aio)
        self.starmap = Method(self._starmap, self._starmap_aio)
        self.for_each = Method(self._for_each, self._for_each_aio)
        self.spawn = Method(self._spawn, self._spawn_aio)
        self.spawn_map = Method(self._spawn_map, self._spawn_map_aio)
        self.update_autoscaler = Method(self._update_autoscaler, self._update_autoscaler_aio)
        self.get_current_stats = Method(self._get_current_stats, self._get_current_stats_aio)
        self.get_web_url = Method(self._get_web_url, self._get_web_url_aio)

    # ------------------------------------------------------------------ identity

    def __repr__(self) -> str:
        return f"Function({self._tag!r})"

    @classmethod
    def _new_reference(cls, name: str) -> Function:
        return cls(None, None, name, None)

    @property
    def _config(self) -> dict[str, Any]:
        """The definition's ``config`` as sent to the server (``{}`` for a reference)."""
        return self._options.to_wire() if self._options is not None else {}

    @property
    def tag(self) -> str:
        return self._name

    @property
    def _tag(self) -> str:
        return self._name

    @property
    def _function_id(self) -> str | None:
        return self._object_id

    @_function_id.setter
    def _function_id(self, value: str | None) -> None:
        self._object_id = value

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
        return cls._from_lookup(name, (app_name, name))

    # ------------------------------------------------------------------ hydration (see _object.py)

    def _id_field(self) -> str:
        return "function_id"

    def _resolve(self) -> dict[str, Any]:
        from . import _api

        if self._lookup is not None:
            app_name, name = self._lookup
            info: dict[str, Any] = _client().request("GET", _api.app_function_by_name(app_name, name))
            return info
        if os.environ.get("FLARE_IS_REMOTE") == "1" and os.environ.get("FLARE_APP_ID"):
            # Inside a container: a function of the container's own app, by its tag.
            app_id = os.environ["FLARE_APP_ID"]
            info = _client().request("GET", _api.app_function(app_id, self._tag))
            return info
        raise exception.ExecutionError(
            f"Function {self._tag!r} has not been hydrated: its app is not running. "
            "Call it inside `with app.run():`, from a `flare run` entrypoint, or use Function.from_name() "
            "for a deployed app."
        )

    def _hydrate_metadata(self, info: dict[str, Any]) -> None:
        self._is_generator = bool(info.get("is_generator", self._is_generator))
        self._is_async = bool(info.get("is_async", self._is_async))
        self._take_web_urls(info)

    def _metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"is_generator": self._is_generator, "is_async": self._is_async}
        if self._web_known:
            meta["web_url"] = self._web_url
            if self._web_urls:
                meta["web_urls"] = dict(self._web_urls)
        return meta

    def _take_web_urls(self, info: dict[str, Any]) -> None:
        """The ``web_url`` / ``web_urls`` of a registration answer or a lookup (the server
        leaves out a null ``web_url`` and empty ``web_urls``: such an answer means none), or
        of a pickled reference's metadata when it has them."""
        if "web_url" in info or "web_urls" in info or "function_id" in info:
            url = info.get("web_url")
            self._web_url = url if isinstance(url, str) and url else None
            urls = info.get("web_urls")
            self._web_urls = {str(k): str(v) for k, v in urls.items() if v} if isinstance(urls, dict) else {}
            self._web_known = True

    def _forget_web_urls(self) -> None:
        self._web_url = None
        self._web_urls = {}
        self._web_known = False

    # ------------------------------------------------------------------ web endpoints

    def _get_web_url(self) -> str | None:
        """The URL of the function's web endpoint (``@flare.fastapi_endpoint()``,
        ``asgi_app``, ``wsgi_app``, ``web_server``), or None when it has none. Looks the
        function up first if needed (a ``from_name`` reference, or inside a container)."""
        if self._raw_f is not None and not self._web and not self._web_known:
            return None  # its definition is here, and it has no endpoint
        if not self._web_known:
            self._hydrate()
        if not self._web_known and self._object_id is not None:
            # Hydrated without the URLs (a reference pickled before they were known).
            try:
                info = self._resolve()  # by name, or (in a container) through its app
            except exception.ExecutionError:
                from . import _api

                info = _client().request("GET", _api.function(self._object_id))
            self._take_web_urls(info)
        return self._web_url

    async def _get_web_url_aio(self) -> str | None:
        return await in_thread(self._get_web_url)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ local

    def local(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function in this process."""
        return self.get_raw_f()(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.local(*args, **kwargs)

    # ------------------------------------------------------------------ remote

    def _check_batched_call(self, kwargs: dict[str, Any] | None) -> None:
        if kwargs and self._batched:
            from .batching import check_call

            check_call(self._tag, True, kwargs)

    def _remote(self, *args: Any, **kwargs: Any) -> Any:
        from ._serialization import b64, serialize_args

        self._check_batched_call(kwargs)
        if self._is_generator:
            raise exception.InvalidError(
                f"{self._tag} is a generator function: call it with .remote_gen() (and iterate the result)"
            )
        payload = serialize_args(self._arg_prefix + args, kwargs)
        fid = self._hydrate()
        if self._is_generator:
            raise exception.InvalidError(f"{self._tag} is a generator function: call it with .remote_gen()")
        from . import _invocation

        body = _invocation.call_body("call", b64(payload), _invocation.CALL_WAIT_MS)
        return _invocation.call_until_output(_client(), fid, body, self._tag, self._catch_up_logs)

    def _catch_up_logs(self, resp: dict[str, Any]) -> None:
        """Prints the function made before returning reach the terminal before its result."""
        from . import _output

        if _output._streamers and self._app is not None:
            _output.catch_up(self._app._app_id, resp.get("log_seq"))

    async def _remote_aio(self, *args: Any, **kwargs: Any) -> Any:
        return await in_thread(self._remote, *args, **kwargs)

    def _remote_gen(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        from ._serialization import b64, serialize_args

        payload = serialize_args(self._arg_prefix + args, kwargs)
        fid = self._hydrate()
        if not self._is_generator:
            raise exception.InvalidError(f"{self._tag} is not a generator function: call it with .remote()")
        from . import _invocation

        return _invocation.gen_iter(_client(), fid, b64(payload), self._tag)

    def _remote_gen_aio(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        return aiter_in_thread(lambda: self._remote_gen(*args, **kwargs))

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
        from . import _api

        body = check_autoscaler_update(
            min_containers=min_containers,
            max_containers=max_containers,
            buffer_containers=buffer_containers,
            scaledown_window=scaledown_window,
        )
        fid = self._hydrate()
        _client().request("POST", _api.function_autoscaler(fid), body)

    async def _update_autoscaler_aio(self, **kwargs: Any) -> None:
        await in_thread(self._update_autoscaler, **kwargs)

    def _get_current_stats(self) -> FunctionStats:
        """Backlog and containers of the function right now (like Modal's ``FunctionStats``)."""
        from . import _api

        fid = self._hydrate()
        info = _client().request("GET", _api.function_stats(fid))
        return FunctionStats._from_json(info)

    async def _get_current_stats_aio(self) -> FunctionStats:
        return await in_thread(self._get_current_stats)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ spawn

    def _spawn(self, *args: Any, **kwargs: Any) -> FunctionCall:
        from . import _api
        from ._serialization import b64, serialize_args

        self._check_batched_call(kwargs)
        payload = serialize_args(self._arg_prefix + args, kwargs)
        fid = self._hydrate()
        if self._is_generator:
            raise exception.InvalidError(f"{self._tag} is a generator function: it cannot be spawned; use .remote_gen()")
        from . import _invocation
        from .function_call import FunctionCall

        body = _invocation.call_body("spawn", b64(payload), 0)
        resp = _client().request("POST", _api.function_calls(fid), body)
        return FunctionCall(resp["call_id"], "spawn", self._tag)

    async def _spawn_aio(self, *args: Any, **kwargs: Any) -> FunctionCall:
        return await in_thread(self._spawn, *args, **kwargs)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ map

    def _map_items(self, iterables: tuple[Iterable[Any], ...]) -> Iterator[Any]:
        if not self._arg_prefix:
            return zip(*iterables)
        import itertools

        return zip(*(itertools.repeat(p) for p in self._arg_prefix), *iterables)

    def _starmap_items(self, iterable: Iterable[Any]) -> Iterator[Any]:
        if not self._arg_prefix:
            return iter(iterable)
        prefix = self._arg_prefix
        return (prefix + tuple(item) for item in iterable)

    def _check_mappable(self, kwargs: dict[str, Any] | None = None) -> str:
        self._check_batched_call(kwargs)
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
        from ._map import MapRun

        fid = self._check_mappable(kwargs)
        return MapRun(fid, self._tag, self._map_items(iterables), kwargs or {}, False, self._catch_up_logs).results(order_outputs, return_exceptions)

    def _starmap(
        self,
        iterable: Iterable[Any],
        kwargs: dict[str, Any] | None = None,
        order_outputs: bool = True,
        return_exceptions: bool = False,
    ) -> Iterator[Any]:
        """Like map(), but each item is a tuple of positional arguments."""
        from ._map import MapRun

        fid = self._check_mappable(kwargs)
        return MapRun(fid, self._tag, self._starmap_items(iterable), kwargs or {}, True, self._catch_up_logs).results(order_outputs, return_exceptions)

    def _for_each(self, *iterables: Iterable[Any], kwargs: dict[str, Any] | None = None, ignore_exceptions: bool = False) -> None:
        """Run the function over the inputs for its side effects, discarding results."""
        for _ in self._map(*iterables, kwargs=kwargs, order_outputs=False, return_exceptions=ignore_exceptions):
            pass

    def _spawn_map(self, *iterables: Iterable[Any], kwargs: dict[str, Any] | None = None) -> FunctionCall:
        """Submit all inputs and return without waiting; the FunctionCall's get() returns the result list."""
        if not iterables:
            raise exception.InvalidError("spawn_map() needs at least one iterable")
        from ._map import MapRun
        from .function_call import FunctionCall

        fid = self._check_mappable(kwargs)
        run = MapRun(fid, self._tag, self._map_items(iterables), kwargs or {}, False, self._catch_up_logs)
        run.send_all()
        if run.error is not None:
            raise run.error
        assert run.call_id is not None
        return FunctionCall(run.call_id, "map", self._tag)

    # async variants: the blocking machinery runs in a thread, items are bridged to the loop.

    def _map_aio(
        self,
        *iterables: Any,
        kwargs: dict[str, Any] | None = None,
        order_outputs: bool = True,
        return_exceptions: bool = False,
    ) -> AsyncIterator[Any]:
        async def gen() -> AsyncIterator[Any]:
            its = aio_inputs(iterables)
            async for item in aiter_in_thread(
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
            (it,) = aio_inputs((iterable,))
            async for item in aiter_in_thread(
                lambda: self._starmap(it, kwargs=kwargs, order_outputs=order_outputs, return_exceptions=return_exceptions)
            ):
                yield item

        return gen()

    async def _for_each_aio(self, *iterables: Any, kwargs: dict[str, Any] | None = None, ignore_exceptions: bool = False) -> None:
        async for _ in self._map_aio(*iterables, kwargs=kwargs, order_outputs=False, return_exceptions=ignore_exceptions):
            pass

    async def _spawn_map_aio(self, *iterables: Any, kwargs: dict[str, Any] | None = None) -> FunctionCall:
        its = aio_inputs(iterables)
        return await in_thread(self._spawn_map, *its, kwargs=kwargs)  # type: ignore[no-any-return]


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


def concurrent(*, max_inputs: int, target_inputs: int | None = None) -> Callable[[F], F]:
    """Let one container process up to ``max_inputs`` inputs at once.

    Place it under ``@app.function()``::

        @app.function()
        @flare.concurrent(max_inputs=10)
        def f(x): ...
    """
    Concurrency(max_inputs, target_inputs)  # checks both

    def wrapper(f: F) -> F:
        base = getattr(f, "_base", None)  # a flare.Cls: its class's own function
        if getattr(f, "_batched", False) or getattr(f, "__flare_batched__", None) is not None or (
            isinstance(base, Function) and (getattr(f, "_info", None) or {}).get("batched")
        ):
            raise exception.InvalidError(
                f"{getattr(f, '__qualname__', f)!r} is @flare.batched(): it cannot also be @flare.concurrent() "
                "(a batched function's containers take max_batch_size inputs at once)"
            )
        if isinstance(base, Function) and base._options is not None:
            base._options = base._options.with_concurrency(max_inputs, target_inputs)
            return f
        if isinstance(f, Function):
            # Also accepted above @app.function(): the definition is sent at app.run().
            if f._options is not None:
                f._options = f._options.with_concurrency(max_inputs, target_inputs)
            return f
        if not callable(f):
            raise exception.InvalidError("@flare.concurrent must decorate a function")
        try:
            f.__flare_concurrency__ = (max_inputs, target_inputs)  # type: ignore[attr-defined]
        except AttributeError:
            raise exception.InvalidError("@flare.concurrent cannot annotate this object") from None
        return f

    return wrapper

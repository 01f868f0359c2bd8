"""The sync/async bridges of the SDK's objects, in one place.

Every blocking method of a public object has an ``.aio`` variant (``f.remote(x)``,
``await f.remote.aio(x)``): the blocking machinery runs in a thread and its result, or
its items, reach the event loop. Imported inside containers (through ``flare.function``),
so ``asyncio``, ``threading`` and ``queue`` are imported by the functions that use them:
deliberately lazy, for the containers' start.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, AsyncIterator, Callable, Iterator


class Method:
    """A blocking method with an ``.aio`` async variant."""

    __slots__ = ("_sync", "aio")

    def __init__(self, sync: Callable[..., Any], aio: Callable[..., Any]) -> None:
        self._sync = sync
        self.aio = aio

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._sync(*args, **kwargs)


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on the loop's default executor."""
    import asyncio
    import functools

    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))


async def aiter_in_thread(make_iter: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
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


_background_tasks: set[Any] = set()


def sync_iter_from_async(aiterable: Any, loop: Any) -> Iterator[Any]:
    """A blocking iterator over an async iterable that is consumed on ``loop``."""
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


def aio_inputs(iterables: tuple[Any, ...]) -> tuple[Any, ...]:
    """The iterables of an ``.aio`` map, async ones turned into blocking iterators fed
    from the running loop."""
    import asyncio

    loop = asyncio.get_running_loop()
    return tuple(sync_iter_from_async(it, loop) if hasattr(it, "__aiter__") else it for it in iterables)

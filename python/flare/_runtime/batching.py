"""Dynamic batching in the runner (``@flare.batched``, ``flare/batching.py``).

The container serves one batch at a time on the main thread: it waits for a first input,
gathers more for up to ``wait_ms`` (or until ``max_batch_size`` are there), then calls
the function once with one list per positional argument. The control plane lets up to
``max_batch_size`` inputs be in flight on the container (its ``max_inputs``), so a batch
can fill while nothing runs; inputs that arrive during a batch wait for the next one.

Each input gets its own output: the element of the returned list at its position (an
element that is an exception instance is that caller's failure), or, when the call
raises or returns something that is not a list of the batch's length, the same failure
for every input of the batch. An input that names another method (a class), passes
keyword arguments, or the wrong number of positional arguments fails alone.

Standard library only, and nothing of the client SDK (``test_structure.py``).
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

    from .runner import Input, Runner

# What flare/batching.py sets: on the raw function, in a class's info, and (a
# with_batching() variant) in the environment.
BATCHED_ATTR = "__flare_batched__"
BATCH_ENV = "FLARE_BATCH"


def batch_config(func: Any) -> tuple[int, int] | None:
    """``(max_batch_size, wait_ms)`` of the function or class this container serves, else None."""
    env = os.environ.get(BATCH_ENV)
    if env:
        size, _, wait = env.partition(",")
        return max(1, int(size)), max(0, int(wait or 0))
    if isinstance(func, type):
        b = (getattr(func, "__flare_cls_info__", None) or {}).get("batched")
    else:
        b = getattr(func, BATCHED_ATTR, None)
    if not isinstance(b, dict):
        return None
    return max(1, int(b["max_batch_size"])), max(0, int(b["wait_ms"]))


def serve(runner: Runner, max_batch_size: int, wait_ms: int) -> None:
    """The batched serving loop (instead of ``serve_serial``/``serve_concurrent``)."""
    import select

    reader = runner.reader
    pending = runner.pending
    fd = reader.fd
    eof = False
    while True:
        if not pending:
            if runner.stopping or eof:
                return
            frames = reader.read_frames()
            if not frames:
                return
            runner.handle_frames(frames)
            continue
        # Gather: the frames already buffered, then whatever arrives before the deadline.
        deadline = time.monotonic() + wait_ms / 1000.0
        while len(pending) < max_batch_size and not runner.stopping and not eof:
            runner.handle_frames(reader.frames())
            if len(pending) >= max_batch_size:
                break
            # Past the deadline, still take what is already there (wait_ms=0: no waiting).
            left = max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                break
            if not reader.fill(1):
                eof = True
        runner.handle_frames(reader.frames())
        batch = pending[:max_batch_size]
        del pending[:max_batch_size]
        live = [inp for inp in batch if not (runner.cancelled and runner.take_cancelled(inp))]
        if live:
            run_batch(runner, live)
        runner.flush()


def run_batch(runner: Runner, batch: list[Input]) -> None:
    """Call the function once for ``batch`` and give each input its output."""
    groups: dict[int, tuple[Callable[..., Any], bool, list[tuple[Input, tuple[Any, ...]]]]] = {}
    for inp in batch:
        call = runner._decode(inp, "Could not deserialize the arguments in the container")
        if call is None:
            continue  # its failure is sent
        inp.payload = memoryview(b"")
        func, is_async, _, args, kwargs = call
        error = _check_input(func, args, kwargs)
        if error is not None:
            runner.failure(inp, error, None, False, 0)
            continue
        key = id(getattr(func, "__func__", func))
        groups.setdefault(key, (func, is_async, []))[2].append((inp, args))
    for func, is_async, items in groups.values():
        _call(runner, func, is_async, items)


def _name(func: Any) -> str:
    return str(getattr(func, "__qualname__", None) or getattr(func, "__name__", "the batched function"))


def _arity(func: Any) -> int:
    raw = getattr(func, "__func__", func)
    code = getattr(raw, "__code__", None)
    n = code.co_argcount if code is not None else 0
    return n - 1 if raw is not func else n  # a bound method: self is given


def _check_input(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BaseException | None:
    from ..exception import InvalidError

    if kwargs:
        return InvalidError(
            f"{_name(func)} is a batched function: call it with positional arguments only "
            f"(got keyword argument(s) {', '.join(sorted(kwargs))})"
        )
    n = _arity(func)
    if len(args) != n:
        return InvalidError(
            f"batched function {_name(func)} takes {n} positional argument(s) per call, but this call gave {len(args)}"
        )
    return None


def _call(runner: Runner, func: Callable[..., Any], is_async: bool, items: list[tuple[Input, tuple[Any, ...]]]) -> None:
    ctx = runner.ctx
    first = items[0][0]
    t1 = ctx._input_id.set(first.input_id)
    t2 = ctx._call_id.set(first.call_id)
    columns = [list(col) for col in zip(*(args for _, args in items))]
    try:
        try:
            if is_async:
                result = runner._get_loop().run_until_complete(func(*columns))
            else:
                result = func(*columns)
        except BaseException as e:  # noqa: BLE001 - the batch's failure, to each of its callers
            for inp, _ in items:
                runner.failure(inp, e, None, False)
            return
        if not isinstance(result, (list, tuple)) or len(result) != len(items):
            from ..exception import InvalidError

            got = f"a {type(result).__name__} of length {len(result)}" if isinstance(result, (list, tuple)) else type(result).__name__
            err = InvalidError(
                f"batched function {_name(func)} must return a list with one result per input: "
                f"the batch had {len(items)} input(s), it returned {got}"
            )
            for inp, _ in items:
                runner.failure(inp, err, None, False, 0)
            return
        for (inp, _), value in zip(items, result):
            if isinstance(value, BaseException):
                runner.failure(inp, value, None, False, 0)
            else:
                runner._send_result(inp, value, None, False)
    finally:
        ctx._input_id.reset(t1)
        ctx._call_id.reset(t2)

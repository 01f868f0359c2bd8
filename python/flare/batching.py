"""``flare.batched``: dynamic batching of a function's or a class method's inputs (Modal's
``@modal.batched``).

The decorated function takes a list per argument and returns a list of the same length;
callers call it with single values. The runner (``flare/_runtime/batching.py``) groups the
inputs that reach a container within ``wait_ms`` of the first one, up to
``max_batch_size``, into one call, and gives each caller its own element of the result (an
element that is an exception instance is raised to that caller alone); an exception of the
call goes to every caller of the batch. So that a batch can fill, a batched function's
containers take ``max_batch_size`` inputs at once (its ``max_inputs`` and
``target_inputs``); a batched function cannot also be ``@flare.concurrent``.

Imported inside containers (user modules decorate at import time): only sibling modules
that are as light.
"""

from __future__ import annotations

from . import exception

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, TypeVar

    F = TypeVar("F")

MAX_BATCH_SIZE = 1000
MAX_WAIT_MS = 10 * 60 * 1000
# The attribute the decorator sets on the raw function (the runner reads it, plain data).
BATCHED_ATTR = "__flare_batched__"
# A with_batching() variant's batching, for the runner ("SIZE,WAIT_MS").
BATCH_ENV = "FLARE_BATCH"

# CO_VARARGS, CO_VARKEYWORDS; CO_GENERATOR | CO_ASYNC_GENERATOR
_VARIADIC = 0x04 | 0x08
_GENERATOR = 0x20 | 0x200


def check_batching(max_batch_size: Any, wait_ms: Any) -> tuple[int, int]:
    """``(max_batch_size, wait_ms)`` if both are in range, else InvalidError naming the bad one."""
    if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or not 1 <= max_batch_size <= MAX_BATCH_SIZE:
        raise exception.InvalidError(
            f"max_batch_size must be an int from 1 to {MAX_BATCH_SIZE}, got {max_batch_size!r}"
        )
    if not isinstance(wait_ms, int) or isinstance(wait_ms, bool) or not 0 <= wait_ms <= MAX_WAIT_MS:
        raise exception.InvalidError(
            f"wait_ms must be an int number of milliseconds from 0 to {MAX_WAIT_MS} (10 minutes), got {wait_ms!r}"
        )
    return max_batch_size, wait_ms


def batched(*, max_batch_size: int, wait_ms: int) -> Callable[[F], F]:
    """Run the function on batches of inputs: up to ``max_batch_size`` of them, gathered for
    at most ``wait_ms`` milliseconds after the first. Place it under ``@app.function()``, or
    on a method of an ``@app.cls()`` class (it makes the method callable, as
    ``@flare.method()`` does)::

        @app.function()
        @flare.batched(max_batch_size=8, wait_ms=100)
        def embed(texts: list[str]) -> list[list[float]]: ...

        embed.remote("one text")  # callers pass single values, positional only
    """
    size, wait = check_batching(max_batch_size, wait_ms)

    def wrapper(f: F) -> F:
        if getattr(f, "_is_flare_function", False) or getattr(f, "__flare_raw_f__", None) is not None:
            raise exception.InvalidError(
                "@flare.batched() must be placed under @app.function() (or on a method of an @app.cls() class)"
            )
        code = getattr(f, "__code__", None)
        if code is None or isinstance(f, type):
            raise exception.InvalidError("@flare.batched() must decorate a function or a method")
        name = getattr(f, "__qualname__", "the function")
        if code.co_flags & _VARIADIC or code.co_kwonlyargcount:
            raise exception.InvalidError(
                f"batched function {name} takes *args, **kwargs or keyword-only arguments; "
                "a batched function takes one list per positional argument"
            )
        if code.co_flags & _GENERATOR:
            raise exception.InvalidError(f"batched function {name} is a generator; batched functions must return a list")
        if getattr(f, "__defaults__", None):
            raise exception.InvalidError(f"batched function {name} has default arguments; batched functions take none")
        if getattr(f, "__flare_concurrency__", None) is not None:
            raise exception.InvalidError(f"{name} cannot be both @flare.batched() and @flare.concurrent()")
        try:
            setattr(f, BATCHED_ATTR, {"max_batch_size": size, "wait_ms": wait})
        except AttributeError:
            raise exception.InvalidError("@flare.batched() cannot annotate this object") from None
        return f

    return wrapper


def batched_of(f: Any) -> dict[str, int] | None:
    """The ``{"max_batch_size", "wait_ms"}`` of a ``@flare.batched()`` function, else None."""
    b = getattr(f, BATCHED_ATTR, None)
    return b if isinstance(b, dict) else None


def positional_count(f: Any, is_method: bool) -> int:
    """How many list arguments a batched function takes (``self`` left out for a method)."""
    code = getattr(f, "__code__", None)
    n = code.co_argcount if code is not None else 0
    return n - 1 if is_method else n


def check_call(tag: str, batched: bool, kwargs: dict[str, Any] | None) -> None:
    """A batched function's callers pass positional arguments only (as on Modal)."""
    if batched and kwargs:
        raise exception.InvalidError(
            f"{tag} is a batched function: call it with positional arguments only "
            f"(got keyword argument(s) {', '.join(sorted(kwargs))})"
        )

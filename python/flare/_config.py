"""Function configuration helpers: ``Retries``, ``@flare.concurrent`` and ``gpu=`` parsing."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, TypeVar

    F = TypeVar("F")


class Retries:
    """Retry policy for a function (same parameters and limits as ``modal.Retries``).

    The delay before retry ``n`` (1-based) is
    ``min(initial_delay * backoff_coefficient ** (n - 1), max_delay)`` seconds.
    """

    def __init__(
        self,
        *,
        max_retries: int,
        backoff_coefficient: float = 2.0,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
    ) -> None:
        from .exception import InvalidError

        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or not 0 <= max_retries <= 10:
            raise InvalidError(f"Invalid retries number: {max_retries!r}. Must be an int between 0 and 10.")
        if not 1.0 <= backoff_coefficient <= 10.0:
            raise InvalidError(f"Invalid backoff_coefficient: {backoff_coefficient}. Must be between 1.0 and 10.0.")
        if not 0.0 <= initial_delay <= 60.0:
            raise InvalidError(f"Invalid initial_delay: {initial_delay}. Must be between 0 and 60 seconds.")
        if not 1.0 <= max_delay <= 60.0:
            raise InvalidError(f"Invalid max_delay: {max_delay}. Must be between 1 and 60 seconds.")
        self.max_retries = max_retries
        self.backoff_coefficient = float(backoff_coefficient)
        self.initial_delay = float(initial_delay)
        self.max_delay = float(max_delay)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_retries": self.max_retries,
            "backoff_coefficient": self.backoff_coefficient,
            "initial_delay": self.initial_delay,
            "max_delay": self.max_delay,
        }

    def __repr__(self) -> str:
        return (
            f"Retries(max_retries={self.max_retries}, backoff_coefficient={self.backoff_coefficient}, "
            f"initial_delay={self.initial_delay}, max_delay={self.max_delay})"
        )


def retries_to_dict(retries: int | Retries | None) -> dict[str, Any] | None:
    from .exception import InvalidError

    if retries is None:
        return None
    if isinstance(retries, Retries):
        return retries.to_dict()
    if isinstance(retries, int) and not isinstance(retries, bool):
        # Like Modal: an int means that many retries with a fixed 1 s delay.
        return Retries(max_retries=retries, backoff_coefficient=1.0, initial_delay=1.0).to_dict()
    raise InvalidError(f"retries must be an int or flare.Retries, not {type(retries).__name__}")


_MAX_GPU_COUNT = 8
_GPU_TYPE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _parse_gpu_spec(spec: object) -> dict[str, Any]:
    """One ``TYPE`` or ``TYPE:COUNT`` spec (``"H100"``, ``"a100-80gb:2"``, ``"any"``) ->
    ``{"type": "A100-80GB", "count": 2}``. Same rules as the control plane's parser."""
    from .exception import InvalidError

    if not isinstance(spec, str):
        raise InvalidError(
            f"invalid gpu {spec!r}: expected a string like \"H100\" or \"A100-80GB:2\", "
            f"or a list of such strings, not {type(spec).__name__}"
        )
    kind, sep, count_s = spec.strip().partition(":")
    kind = kind.strip().upper()
    if not kind:
        raise InvalidError(f"invalid gpu {spec!r}: missing GPU type (expected e.g. \"H100\" or \"H100:2\")")
    bad = [c for c in kind if c not in _GPU_TYPE_CHARS]
    if bad:
        raise InvalidError(
            f"invalid gpu {spec!r}: unexpected character {bad[0]!r} in the GPU type "
            "(use letters, digits, '-', '_' or '.', e.g. \"A100-80GB\")"
        )
    count = 1
    if sep:
        count_s = count_s.strip()
        if not (count_s.isascii() and count_s.isdigit()):
            raise InvalidError(f"invalid gpu {spec!r}: the count after ':' must be an integer from 1 to {_MAX_GPU_COUNT}")
        count = int(count_s)
        if not 1 <= count <= _MAX_GPU_COUNT:
            raise InvalidError(f"invalid gpu {spec!r}: the GPU count must be from 1 to {_MAX_GPU_COUNT}, got {count}")
    return {"type": kind, "count": count}


def parse_gpu(gpu: object) -> list[dict[str, Any]]:
    """``gpu=`` of ``@app.function`` (Modal's syntax) -> the alternatives in order of
    preference, as sent in ``config.gpu``: ``None`` -> ``[]``; ``"H100:2"`` ->
    ``[{"type": "H100", "count": 2}]``; ``["H100", "A100-80GB"]`` -> both, in order
    (the first one free anywhere is used)."""
    from .exception import InvalidError

    if gpu is None:
        return []
    if isinstance(gpu, str):
        return [_parse_gpu_spec(gpu)]
    if isinstance(gpu, (list, tuple)):
        if not gpu:
            raise InvalidError("invalid gpu []: give at least one GPU type, or gpu=None for no GPU")
        alts = [_parse_gpu_spec(s) for s in gpu]
        seen: set[tuple[str, int]] = set()
        for a in alts:
            key = (a["type"], a["count"])
            if key in seen:
                raise InvalidError(f"invalid gpu {list(gpu)!r}: {a['type']}:{a['count']} is listed twice")
            seen.add(key)
        return alts
    raise InvalidError(
        f"invalid gpu {gpu!r}: expected a string like \"H100\" or \"A100-80GB:2\", "
        f"or a list of such strings, not {type(gpu).__name__}"
    )


def concurrent(*, max_inputs: int, target_inputs: int | None = None) -> Callable[[F], F]:
    """Let one container process up to ``max_inputs`` inputs at once.

    Place it under ``@app.function()``::

        @app.function()
        @flare.concurrent(max_inputs=10)
        def f(x): ...
    """
    from .exception import InvalidError

    if not isinstance(max_inputs, int) or max_inputs < 1:
        raise InvalidError("max_inputs must be an int >= 1")
    if target_inputs is not None and (not isinstance(target_inputs, int) or not 1 <= target_inputs <= max_inputs):
        raise InvalidError("target_inputs must be an int between 1 and max_inputs")

    def wrapper(f: F) -> F:
        from .function import Function

        if isinstance(f, Function):
            # Also accepted above @app.function(): the definition is sent at app.run().
            f._config["max_inputs"] = max_inputs
            f._config["target_inputs"] = target_inputs
            return f
        if not callable(f):
            raise InvalidError("@flare.concurrent must decorate a function")
        try:
            f.__flare_concurrency__ = (max_inputs, target_inputs)  # type: ignore[attr-defined]
        except AttributeError:
            raise InvalidError("@flare.concurrent cannot annotate this object") from None
        return f

    return wrapper

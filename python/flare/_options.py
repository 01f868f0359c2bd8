"""The options of ``@app.function()``, validated once into frozen value classes, and
``flare.Retries`` and ``gpu=`` parsing.

``FunctionOptions.from_decorator(...)`` checks every argument (an ``InvalidError`` that
names the option and the bad value), and ``to_wire()`` gives the ``config`` object of a
function definition exactly as the server reads it (``FunctionConfig`` in
crates/flare-proto). ``flare.concurrent`` and ``Function.update_autoscaler`` use the
same checks. Imported inside containers (user modules decorate at import time): only
sibling modules at import time. (The value classes are written out rather than made with
``dataclasses``: importing that module costs a container's start about 7 ms, for
``inspect`` and ``re``.)
"""

from __future__ import annotations

from . import exception

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar

    F = TypeVar("F", bound="_Frozen")

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
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or not 0 <= max_retries <= 10:
            raise exception.InvalidError(f"Invalid retries number: {max_retries!r}. Must be an int between 0 and 10.")
        if not 1.0 <= backoff_coefficient <= 10.0:
            raise exception.InvalidError(f"Invalid backoff_coefficient: {backoff_coefficient}. Must be between 1.0 and 10.0.")
        if not 0.0 <= initial_delay <= 60.0:
            raise exception.InvalidError(f"Invalid initial_delay: {initial_delay}. Must be between 0 and 60 seconds.")
        if not 1.0 <= max_delay <= 60.0:
            raise exception.InvalidError(f"Invalid max_delay: {max_delay}. Must be between 1 and 60 seconds.")
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
    if retries is None:
        return None
    if isinstance(retries, Retries):
        return retries.to_dict()
    if isinstance(retries, int) and not isinstance(retries, bool):
        # Like Modal: an int means that many retries with a fixed 1 s delay.
        return Retries(max_retries=retries, backoff_coefficient=1.0, initial_delay=1.0).to_dict()
    raise exception.InvalidError(f"retries must be an int or flare.Retries, not {type(retries).__name__}")


_MAX_GPU_COUNT = 8
_GPU_TYPE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _parse_gpu_spec(spec: object) -> dict[str, Any]:
    """One ``TYPE`` or ``TYPE:COUNT`` spec (``"H100"``, ``"a100-80gb:2"``, ``"any"``) ->
    ``{"type": "A100-80GB", "count": 2}``. Same rules as the control plane's parser."""
    if not isinstance(spec, str):
        raise exception.InvalidError(
            f"invalid gpu {spec!r}: expected a string like \"H100\" or \"A100-80GB:2\", "
            f"or a list of such strings, not {type(spec).__name__}"
        )
    kind, sep, count_s = spec.strip().partition(":")
    kind = kind.strip().upper()
    if not kind:
        raise exception.InvalidError(f"invalid gpu {spec!r}: missing GPU type (expected e.g. \"H100\" or \"H100:2\")")
    bad = [c for c in kind if c not in _GPU_TYPE_CHARS]
    if bad:
        raise exception.InvalidError(
            f"invalid gpu {spec!r}: unexpected character {bad[0]!r} in the GPU type "
            "(use letters, digits, '-', '_' or '.', e.g. \"A100-80GB\")"
        )
    count = 1
    if sep:
        count_s = count_s.strip()
        if not (count_s.isascii() and count_s.isdigit()):
            raise exception.InvalidError(f"invalid gpu {spec!r}: the count after ':' must be an integer from 1 to {_MAX_GPU_COUNT}")
        count = int(count_s)
        if not 1 <= count <= _MAX_GPU_COUNT:
            raise exception.InvalidError(f"invalid gpu {spec!r}: the GPU count must be from 1 to {_MAX_GPU_COUNT}, got {count}")
    return {"type": kind, "count": count}


def parse_gpu(gpu: object) -> list[dict[str, Any]]:
    """``gpu=`` of ``@app.function`` (Modal's syntax) -> the alternatives in order of
    preference, as sent in ``config.gpu``: ``None`` -> ``[]``; ``"H100:2"`` ->
    ``[{"type": "H100", "count": 2}]``; ``["H100", "A100-80GB"]`` -> both, in order
    (the first one free anywhere is used)."""
    if gpu is None:
        return []
    if isinstance(gpu, str):
        return [_parse_gpu_spec(gpu)]
    if isinstance(gpu, (list, tuple)):
        if not gpu:
            raise exception.InvalidError("invalid gpu []: give at least one GPU type, or gpu=None for no GPU")
        alts = [_parse_gpu_spec(s) for s in gpu]
        seen: set[tuple[str, int]] = set()
        for a in alts:
            key = (a["type"], a["count"])
            if key in seen:
                raise exception.InvalidError(f"invalid gpu {list(gpu)!r}: {a['type']}:{a['count']} is listed twice")
            seen.add(key)
        return alts
    raise exception.InvalidError(
        f"invalid gpu {gpu!r}: expected a string like \"H100\" or \"A100-80GB:2\", "
        f"or a list of such strings, not {type(gpu).__name__}"
    )


class _Frozen:
    """A frozen value: fields in ``__slots__``, compared, hashed and shown by value."""

    __slots__: tuple[str, ...] = ()

    def _set(self, **fields: Any) -> None:
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot assign {name!r}")

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((type(self).__name__,) + tuple(
            tuple(sorted(v.items())) if isinstance(v, dict) else v for v in self._fields()
        ))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({args})"

    def replace(self: F, **changes: Any) -> F:
        """A copy with ``changes`` (checked again)."""
        fields = {k: getattr(self, k) for k in self.__slots__}
        fields.update(changes)
        return type(self)(**fields)


MIN_CPU = 0.0625
MAX_CPU = 64
MAX_TIMEOUT = 86400
DEFAULT_TIMEOUT = 300
DEFAULT_SCALEDOWN_WINDOW = 60


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_count(label: str, value: object, low: int) -> int:
    """``value`` if it is an int >= ``low``, else InvalidError naming ``label``."""
    if not _is_int(value) or value < low:  # type: ignore[operator]
        raise exception.InvalidError(f"{label} must be an int >= {low}, got {value!r}")
    return value  # type: ignore[return-value]


class GpuRequest(_Frozen):
    """One GPU alternative: an upper-case type (``"H100"``, ``"ANY"``) and a count."""

    __slots__ = ("type", "count")
    type: str
    count: int

    def __init__(self, type: str, count: int = 1) -> None:
        self._set(type=type, count=count)

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "count": self.count}


class Resources(_Frozen):
    """What one container reserves: ``cpu`` cores (it may burst above them; up to
    ``cpu_limit`` when given), ``memory`` MiB, and GPUs (alternatives in order of preference)."""

    __slots__ = ("cpu", "cpu_limit", "memory", "gpu")
    cpu: float | None
    cpu_limit: float | None
    memory: int | None
    gpu: tuple[GpuRequest, ...]

    def __init__(
        self,
        cpu: float | None = None,
        cpu_limit: float | None = None,
        memory: int | None = None,
        gpu: tuple[GpuRequest, ...] = (),
    ) -> None:
        self._set(cpu=cpu, cpu_limit=cpu_limit, memory=memory, gpu=tuple(gpu))

    @classmethod
    def parse(cls, cpu: Any = None, memory: Any = None, gpu: Any = None) -> Resources:
        cpu_limit: Any = None
        if isinstance(cpu, tuple):
            if len(cpu) != 2:
                raise exception.InvalidError(f"cpu=(request, limit) needs two numbers, got {cpu!r}")
            cpu, cpu_limit = cpu
            if not (_is_number(cpu_limit) and _is_number(cpu) and cpu_limit >= cpu):
                raise exception.InvalidError(f"cpu limit must be a number >= the request, got {cpu_limit!r}")
        if cpu is not None and not (_is_number(cpu) and MIN_CPU <= cpu <= MAX_CPU):
            raise exception.InvalidError(
                f"cpu must be a number of cores between {MIN_CPU} and {MAX_CPU}, got {cpu!r}"
            )
        if memory is not None and not (_is_int(memory) and memory > 0):
            raise exception.InvalidError(f"memory must be a positive int (MiB), got {memory!r}")
        gpus = tuple(GpuRequest(g["type"], g["count"]) for g in parse_gpu(gpu))
        return cls(
            cpu=float(cpu) if cpu is not None else None,
            cpu_limit=float(cpu_limit) if cpu_limit is not None else None,
            memory=memory,
            gpu=gpus,
        )


class Autoscaler(_Frozen):
    """How many containers the function keeps: at least ``min_containers`` (plus
    ``buffer_containers`` idle ones while busy), at most ``max_containers``; idle ones
    stop after ``scaledown_window`` seconds."""

    __slots__ = ("min_containers", "max_containers", "buffer_containers", "scaledown_window")
    min_containers: int
    max_containers: int | None
    buffer_containers: int
    scaledown_window: int

    def __init__(
        self,
        min_containers: int = 0,
        max_containers: int | None = None,
        buffer_containers: int = 0,
        scaledown_window: int = DEFAULT_SCALEDOWN_WINDOW,
    ) -> None:
        check_count("min_containers", min_containers, 0)
        check_count("buffer_containers", buffer_containers, 0)
        check_count("scaledown_window", scaledown_window, 0)
        if max_containers is not None:
            check_count("max_containers", max_containers, 1)
        self._set(
            min_containers=min_containers,
            max_containers=max_containers,
            buffer_containers=buffer_containers,
            scaledown_window=scaledown_window,
        )


def check_autoscaler_update(**fields: int | None) -> dict[str, int]:
    """The fields of ``Function.update_autoscaler`` that are set, checked."""
    for label, value in fields.items():
        if value is not None:
            check_count(label, value, 1 if label == "max_containers" else 0)
    lo, hi = fields.get("min_containers"), fields.get("max_containers")
    if lo is not None and hi is not None and lo > hi:
        raise exception.InvalidError(f"min_containers ({lo}) must not exceed max_containers ({hi})")
    return {k: v for k, v in fields.items() if v is not None}


class Concurrency(_Frozen):
    """Inputs one container runs at once (``@flare.concurrent``)."""

    __slots__ = ("max_inputs", "target_inputs")
    max_inputs: int
    target_inputs: int | None

    def __init__(self, max_inputs: int = 1, target_inputs: int | None = None) -> None:
        if not _is_int(max_inputs) or max_inputs < 1:
            raise exception.InvalidError("max_inputs must be an int >= 1")
        t = target_inputs
        if t is not None and (not _is_int(t) or not 1 <= t <= max_inputs):
            raise exception.InvalidError("target_inputs must be an int between 1 and max_inputs")
        self._set(max_inputs=max_inputs, target_inputs=target_inputs)


class FunctionOptions(_Frozen):
    """Everything ``@app.function()`` configures about how the function runs."""

    __slots__ = (
        "resources", "timeout", "retries", "env", "autoscaler", "concurrency", "block_network",
        "enable_memory_snapshot",
    )
    resources: Resources
    timeout: int
    retries: Retries | None
    env: dict[str, str]
    autoscaler: Autoscaler
    concurrency: Concurrency
    block_network: bool
    enable_memory_snapshot: bool

    def __init__(
        self,
        resources: Resources | None = None,
        timeout: int = DEFAULT_TIMEOUT,
        retries: Retries | None = None,
        env: dict[str, str] | None = None,
        autoscaler: Autoscaler | None = None,
        concurrency: Concurrency | None = None,
        block_network: bool = False,
        enable_memory_snapshot: bool = False,
    ) -> None:
        _check_timeout(timeout)
        _check_env(env)
        self._set(
            resources=resources or Resources(),
            timeout=timeout,
            retries=retries,
            env=dict(env or {}),
            autoscaler=autoscaler or Autoscaler(),
            concurrency=concurrency or Concurrency(),
            block_network=bool(block_network),
            enable_memory_snapshot=bool(enable_memory_snapshot),
        )

    @classmethod
    def from_decorator(
        cls,
        *,
        cpu: Any = None,
        memory: Any = None,
        gpu: Any = None,
        timeout: Any = DEFAULT_TIMEOUT,
        retries: Any = None,
        env: Any = None,
        min_containers: Any = 0,
        max_containers: Any = None,
        buffer_containers: Any = 0,
        scaledown_window: Any = DEFAULT_SCALEDOWN_WINDOW,
        block_network: Any = False,
        concurrency: Concurrency | None = None,
        enable_memory_snapshot: Any = False,
    ) -> FunctionOptions:
        """The options from ``@app.function()``'s arguments (checked in the order the
        decorator always checked them)."""
        resources = Resources.parse(cpu=cpu, memory=memory, gpu=None)
        _check_timeout(timeout)
        _check_env(env)
        autoscaler = Autoscaler(
            min_containers=min_containers,
            max_containers=max_containers,
            buffer_containers=buffer_containers,
            scaledown_window=scaledown_window,
        )
        resources = resources.replace(gpu=Resources.parse(gpu=gpu).gpu)
        return cls(
            resources=resources,
            timeout=timeout,
            retries=_retries(retries),
            env=dict(env or {}),
            autoscaler=autoscaler,
            concurrency=concurrency or Concurrency(),
            block_network=bool(block_network),
            enable_memory_snapshot=_check_bool("enable_memory_snapshot", enable_memory_snapshot),
        )

    def with_concurrency(self, max_inputs: int, target_inputs: int | None) -> FunctionOptions:
        return self.replace(concurrency=Concurrency(max_inputs, target_inputs))

    def to_wire(self) -> dict[str, Any]:
        """The function definition's ``config`` (same keys, order and values as always)."""
        r, a, c = self.resources, self.autoscaler, self.concurrency
        return {
            "cpu": r.cpu,
            "cpu_limit": r.cpu_limit,
            "memory": r.memory,
            "timeout": self.timeout,
            "retries": self.retries.to_dict() if self.retries is not None else None,
            "env": dict(self.env),
            "min_containers": a.min_containers,
            "max_containers": a.max_containers,
            "buffer_containers": a.buffer_containers,
            "scaledown_window": a.scaledown_window,
            "max_inputs": c.max_inputs,
            "target_inputs": c.target_inputs,
            "block_network": self.block_network,
            "gpu": [g.to_wire() for g in r.gpu],
            "enable_memory_snapshot": self.enable_memory_snapshot,
        }


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise exception.InvalidError(f"{name} must be True or False, got {value!r}")
    return value


def _check_timeout(timeout: Any) -> None:
    if not _is_int(timeout) or not 1 <= timeout <= MAX_TIMEOUT:
        raise exception.InvalidError(
            f"timeout must be an int number of seconds between 1 and {MAX_TIMEOUT}, got {timeout!r}"
        )


def _check_env(env: Any) -> None:
    if env is not None and not (
        isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise exception.InvalidError("env must map str to str")


def _retries(retries: Any) -> Retries | None:
    """``retries=``: None, a ``flare.Retries``, or an int (that many retries, 1 s apart, like Modal)."""
    d = retries_to_dict(retries)  # the checks and the error for a bad type
    if d is None:
        return None
    return retries if isinstance(retries, Retries) else Retries(**d)


# experimental_options= of @app.function/@app.cls: the names Flare knows, each with what it
# does here.
EXPERIMENTAL_OPTIONS = ("enable_gpu_snapshot",)
_warned_gpu_snapshot = [False]


def check_experimental_options(options: Any) -> dict[str, Any]:
    """``experimental_options=``: a dict of known names (an unknown one is an InvalidError).
    ``enable_gpu_snapshot`` is accepted and says, once per process, that GPU memory
    snapshots are not supported yet (issue 16): the function runs without one."""
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise exception.InvalidError(f"experimental_options must be a dict of option names to values, got {options!r}")
    unknown = sorted(set(options) - set(EXPERIMENTAL_OPTIONS))
    if unknown:
        raise exception.InvalidError(
            f"unknown experimental option(s) {', '.join(unknown)}; known: {', '.join(EXPERIMENTAL_OPTIONS)}"
        )
    if options.get("enable_gpu_snapshot") and not _warned_gpu_snapshot[0]:
        _warned_gpu_snapshot[0] = True
        import os

        if os.environ.get("FLARE_IS_REMOTE") != "1":  # said once, on the caller's side
            import warnings

            warnings.warn(
                "experimental_options={'enable_gpu_snapshot': True}: GPU memory snapshots are not supported "
                "yet (issue 16); the function's containers start without one",
                UserWarning,
                stacklevel=3,
            )
    return dict(options)

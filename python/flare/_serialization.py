"""Serialization of arguments and results, and rebuilding remote exceptions."""

from __future__ import annotations

import pickle
from binascii import a2b_base64, b2a_base64

from . import exception

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_PLAIN = frozenset([int, float, str, bytes, bool, type(None), complex])


def _is_plain(value: Any, depth: int = 0) -> bool:
    t = type(value)
    if t in _PLAIN:
        return True
    if depth < 2 and (t is tuple or t is list):
        return len(value) <= 64 and all(_is_plain(v, depth + 1) for v in value)
    if depth < 2 and t is dict:
        return len(value) <= 64 and all(type(k) in _PLAIN and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def dumps(value: Any) -> bytes:
    """Pickle a value the way the protocol says (cloudpickle, protocol 4).

    Values made only of builtin scalars and small containers of them pickle to the same
    kind of stream with plain ``pickle`` (much faster per item, which ``.map`` needs).
    """
    if _is_plain(value):
        return pickle.dumps(value, 4)
    import cloudpickle

    data: bytes = cloudpickle.dumps(value, protocol=4)
    return data


def _type_name(value: Any) -> str:
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _find_unpicklable(value: Any, depth: int = 0) -> Any:
    """The innermost part of ``value`` that cannot be pickled (best effort)."""
    import cloudpickle

    if depth > 4:
        return value
    children: list[Any] = []
    if isinstance(value, (list, tuple, set, frozenset)):
        children = list(value)
    elif isinstance(value, dict):
        children = list(value.values())
    for child in children:
        try:
            cloudpickle.dumps(child, protocol=4)
        except Exception:  # noqa: BLE001
            return _find_unpicklable(child, depth + 1)
    return value


def serialize_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle ``(args, kwargs)``; SerializationError naming the offending type."""
    try:
        return dumps((args, kwargs))
    except Exception as e:  # noqa: BLE001
        bad = _find_unpicklable((args, kwargs))
        raise exception.SerializationError(
            f"Could not serialize an argument of type {_type_name(bad)}: {type(e).__name__}: {e}"
        ) from None


def b64(data: bytes) -> str:
    return b2a_base64(data, newline=False).decode("ascii")


def unb64(text: str) -> bytes:
    return a2b_base64(text)


def deserialize(data: bytes) -> Any:
    try:
        return pickle.loads(data)
    except Exception as e:  # noqa: BLE001
        raise exception.DeserializationError(
            f"Could not deserialize a value returned by the function: {type(e).__name__}: {e}. "
            "Make sure the types it uses are importable locally."
        ) from None


def _attach(exc: BaseException, tb: str) -> BaseException:
    if tb:
        exc.__cause__ = exception.RemoteTraceback(tb)
        try:
            exc.remote_traceback = tb  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001
            pass
    return exc


_STATUS_CLASSES: dict[str, type[BaseException]] = {
    "timeout": exception.FunctionTimeoutError,
    "terminated": exception.ExecutionError,
    "internal_failure": exception.ExecutionError,
}


def exception_from_output(output: dict[str, Any], function_name: str = "") -> BaseException:
    """Rebuild the exception an output stands for (the remote one, or a platform error)."""
    status = output.get("status")
    info = output.get("exception") or {}
    type_name: str = info.get("type") or ""
    message: str = info.get("message") or ""
    tb: str = info.get("traceback") or ""
    data = output.get("data")

    if status == "init_failure":
        short = type_name.rsplit(".", 1)[-1] if type_name else "Error"
        where = f"Function {function_name!r}" if function_name else "The function"
        return _attach(
            exception.ExecutionError(f"{where} failed to start in its container: {short}: {message}"), tb
        )

    if type_name.startswith("flare.exception."):
        cls = getattr(exception, type_name[len("flare.exception.") :], None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            return _attach(cls(message), tb)

    if status == "failure":
        if data:
            try:
                exc = pickle.loads(unb64(data))
            except Exception:  # noqa: BLE001 - exception type not importable here
                exc = None
            if isinstance(exc, BaseException):
                return _attach(exc, tb)
        short = type_name[len("builtins.") :] if type_name.startswith("builtins.") else type_name
        return _attach(exception.RemoteError(f"{short}: {message}" if short else message), tb)

    if status == "terminated" and message in ("cancelled", "input cancelled"):
        return _attach(exception.InputCancellation(message), tb)
    cls = _STATUS_CLASSES.get(status or "", exception.ExecutionError)
    return _attach(cls(message or f"input ended with status {status}"), tb)

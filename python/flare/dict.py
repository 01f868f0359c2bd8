"""``flare.Dict``: a durable key-value map kept by the server (Modal's ``modal.Dict``).

Keys and values are pickled (cloudpickle); two keys are the same key when their pickles
are the same bytes. A key is at most 64 KiB pickled, a value at most 16 MiB; both are
checked here before any request (and again by the server). Every write returns once the
server committed it to its store, so an acknowledged write survives a server crash.

``Dict.from_name`` is lazy (the name resolves on first use); a Dict passed to a remote
function travels by reference and works inside the container, as does one looked up by
name there. Every method has an ``.aio`` variant (``await d.get.aio(k)``); ``keys``,
``values`` and ``items`` iterate pages from the server (``async for`` with ``.aio``).
"""

from __future__ import annotations

import pickle

from . import _api, exception
from ._bridge import Method, aiter_in_thread
from ._named import _NamedObject
from ._serialization import _type_name, b64, dumps, unb64

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, AsyncIterator, Iterator, Mapping

    from ._transport import Client

# The server's limits (crates/flare-control/src/services/dicts.rs).
MAX_KEY_BYTES = 64 << 10
MAX_VALUE_BYTES = 16 << 20
# Entries per page when iterating.
_PAGE = 100
_MISSING: Any = object()


def _client() -> Client:
    from . import _invocation

    return _invocation.client()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _pickle(what: str, value: Any) -> bytes:
    try:
        return dumps(value)
    except Exception as e:  # noqa: BLE001
        raise exception.SerializationError(
            f"Could not serialize a dict {what} of type {_type_name(value)}: {type(e).__name__}: {e}"
        ) from None


def _key(key: Any) -> str:
    data = _pickle("key", key)
    if len(data) > MAX_KEY_BYTES:
        raise exception.InvalidError(f"a dict key is at most {MAX_KEY_BYTES} bytes pickled; this one is {len(data)} bytes")
    return b64(data)


def _value(value: Any) -> str:
    data = _pickle("value", value)
    if len(data) > MAX_VALUE_BYTES:
        raise exception.PayloadTooLargeError(
            f"a dict value is at most {_mib(MAX_VALUE_BYTES)} pickled; this one is {_mib(len(data))}"
        )
    return b64(data)


def _load(text: str) -> Any:
    try:
        return pickle.loads(unb64(text))
    except Exception as e:  # noqa: BLE001
        raise exception.DeserializationError(
            f"Could not deserialize a dict key or value: {type(e).__name__}: {e}. "
            "Make sure the types it uses are importable here."
        ) from None


class Dict(_NamedObject):
    """A durable dict on the server: ``Dict.from_name("cache", create_if_missing=True)``."""

    _kind = "Dict"
    _collection = "dicts"

    def _init_object(self, name: str, object_id: str | None = None, lookup: tuple[str, ...] | None = None) -> None:
        super()._init_object(name, object_id, lookup)
        self.get = Method(self._get, self._aio(self._get))
        self.put = Method(self._put, self._aio(self._put))
        self.pop = Method(self._pop, self._aio(self._pop))
        self.update = Method(self._update, self._aio(self._update))
        self.contains = Method(self._contains, self._aio(self._contains))
        self.len = Method(self._len, self._aio(self._len))
        self.clear = Method(self._clear, self._aio(self._clear))
        self.keys = Method(self._keys, lambda: aiter_in_thread(self._keys))
        self.values = Method(self._values, lambda: aiter_in_thread(self._values))
        self.items = Method(self._items, lambda: aiter_in_thread(self._items))

    # ----------------------------------------------------------------- methods

    def _op(self, op: str, body: dict[str, Any]) -> Any:
        return _client().request("POST", _api.dict_op(self._hydrate(), op), body)

    def _get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        r = self._op("get", {"key": _key(key)})
        return _load(r["value"]) if r.get("found") else default

    def _put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool:
        """Set ``key`` to ``value``; with ``skip_if_exists``, only if ``key`` is absent.
        Returns whether it was written."""
        body = {"items": [{"key": _key(key), "value": _value(value)}], "skip_if_exists": skip_if_exists}
        return bool(self._op("put", body).get("written"))

    def _update(self, other: Mapping[Any, Any] | None = None, /, **kwargs: Any) -> None:
        """Set every item of ``other`` and of ``kwargs``, in one request (all or none)."""
        pairs = list(other.items()) if other is not None else []
        pairs += list(kwargs.items())
        items = [{"key": _key(k), "value": _value(v)} for k, v in pairs]
        if items:
            self._op("put", {"items": items})

    def _pop(self, key: Any, default: Any = _MISSING) -> Any:
        """Remove ``key`` and return its value (KeyError if absent and no default)."""
        r = self._op("pop", {"key": _key(key)})
        if r.get("found"):
            return _load(r["value"])
        if default is _MISSING:
            raise KeyError(key)
        return default

    def _contains(self, key: Any) -> bool:
        return bool(self._op("contains", {"key": _key(key)}).get("found"))

    def _len(self) -> int:
        return int(_client().request("GET", _api.dict_op(self._hydrate(), "len"))["len"])

    def _clear(self) -> None:
        """Remove every entry."""
        self._op("clear", {})

    def _pages(self, keys_only: bool) -> Iterator[dict[str, Any]]:
        did, after = self._hydrate(), 0
        while True:
            page = _client().request("GET", _api.dict_items(did, after, _PAGE, keys_only))
            yield from page.get("items", [])
            nxt = page.get("next")
            if nxt is None:
                return
            after = int(nxt)

    def _keys(self) -> Iterator[Any]:
        for e in self._pages(True):
            yield _load(e["key"])

    def _values(self) -> Iterator[Any]:
        for e in self._pages(False):
            yield _load(e["value"])

    def _items(self) -> Iterator[tuple[Any, Any]]:
        for e in self._pages(False):
            yield _load(e["key"]), _load(e["value"])

    # ---------------------------------------------------------- dict protocol

    def __getitem__(self, key: Any) -> Any:
        value = self._get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        self._put(key, value)

    def __delitem__(self, key: Any) -> None:
        self._pop(key)

    def __contains__(self, key: Any) -> bool:
        return self._contains(key)

    def __len__(self) -> int:
        return self._len()

    def __iter__(self) -> Iterator[Any]:
        return self._keys()

    def __aiter__(self) -> AsyncIterator[Any]:
        return aiter_in_thread(self._keys)

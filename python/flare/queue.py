"""``flare.Queue``: a durable FIFO queue kept by the server (Modal's ``modal.Queue``).

Values are pickled (cloudpickle), at most 1 MiB each, checked here before any request
(and again by the server). A queue is split into partitions by a string key (at most 64
bytes; ``partition=None`` is the default partition), each at most 5000 items; a
partition lives ``partition_ttl`` seconds (24 hours by default) after its last put.
Every put returns once the server committed it, so an acknowledged put survives a server
crash; a get removes what it returns before it answers, and hands each item to one
getter only.

Blocking ``get`` and ``put`` wait on the server (long poll: one request waits at most
50 s and is re-issued for longer waits), and raise ``queue.Empty`` / ``queue.Full`` when
their timeout passes. ``Queue.from_name`` is lazy (the name resolves on first use); a
Queue passed to a remote function travels by reference and works inside the container,
as does one looked up by name there. Every method has an ``.aio`` variant
(``await q.get.aio()``; ``async for v in q.iterate.aio()``).
"""

from __future__ import annotations

import pickle

from . import _api, exception
from ._bridge import Method, aiter_in_thread
from ._named import _NamedObject
from ._serialization import _type_name, b64, dumps, unb64

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, AsyncIterator, Iterable, Iterator

    from ._transport import Client

# The server's limits (crates/flare-control/src/services/queues.rs).
MAX_VALUE_BYTES = 1 << 20
MAX_PARTITION_ITEMS = 5000
MAX_PARTITION_KEY = 64
# Longest wait of one request (the server's cap; longer waits re-issue it).
_MAX_WAIT = 50.0
# What the HTTP request may take beyond its wait.
_SLACK = 30.0
_PAGE = 100


def _client() -> Client:
    from . import _invocation

    return _invocation.client()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _value(value: Any) -> str:
    try:
        data = dumps(value)
    except Exception as e:  # noqa: BLE001
        raise exception.SerializationError(
            f"Could not serialize a queue value of type {_type_name(value)}: {type(e).__name__}: {e}"
        ) from None
    if len(data) > MAX_VALUE_BYTES:
        raise exception.PayloadTooLargeError(
            f"a queue item is at most {_mib(MAX_VALUE_BYTES)} pickled; this one is {_mib(len(data))}"
        )
    return b64(data)


def _load(text: str) -> Any:
    try:
        return pickle.loads(unb64(text))
    except Exception as e:  # noqa: BLE001
        raise exception.DeserializationError(
            f"Could not deserialize a queue value: {type(e).__name__}: {e}. Make sure the types it uses are importable here."
        ) from None


def _partition(partition: str | None) -> str:
    if partition is None:
        return ""
    if not isinstance(partition, str) or not partition:
        raise exception.InvalidError(f"a queue partition key is a non-empty string, got {partition!r}")
    n = len(partition.encode())
    if n > MAX_PARTITION_KEY:
        raise exception.InvalidError(f"a queue partition key is at most {MAX_PARTITION_KEY} bytes; this one is {n} bytes")
    return partition


def _timeout(block: bool, timeout: float | None) -> float | None:
    """Seconds to wait in all (None: forever)."""
    if not block:
        return 0.0
    if timeout is None:
        return None
    if timeout < 0:
        raise exception.InvalidError(f"timeout is a number of seconds, 0 or more; got {timeout!r}")
    return float(timeout)


class Queue(_NamedObject):
    """A durable FIFO queue on the server: ``Queue.from_name("jobs", create_if_missing=True)``."""

    _kind = "Queue"
    _collection = "queues"

    def _init_object(self, name: str, object_id: str | None = None, lookup: tuple[str, ...] | None = None) -> None:
        super()._init_object(name, object_id, lookup)
        self.put = Method(self._put, self._aio(self._put))
        self.put_many = Method(self._put_many, self._aio(self._put_many))
        self.get = Method(self._get, self._aio(self._get))
        self.get_many = Method(self._get_many, self._aio(self._get_many))
        self.len = Method(self._len, self._aio(self._len))
        self.clear = Method(self._clear, self._aio(self._clear))
        self.iterate = Method(self._iterate, lambda **kw: aiter_in_thread(lambda: self._iterate(**kw)))

    # ----------------------------------------------------------------- methods

    def _long_poll(self, op: str, body: dict[str, Any], total: float | None, done: Any) -> Any:
        """Re-issue ``op`` (each waiting at most 50 s on the server) until ``done(answer)``
        or ``total`` seconds passed; returns the last answer."""
        import time

        qid = self._hydrate()
        deadline = None if total is None else time.monotonic() + total
        while True:
            left = _MAX_WAIT if deadline is None else max(0.0, deadline - time.monotonic())
            wait = min(left, _MAX_WAIT)
            r = _client().request("POST", _api.queue_op(qid, op), {**body, "timeout": wait}, timeout=wait + _SLACK)
            if done(r) or (deadline is not None and time.monotonic() >= deadline):
                return r

    def _put(
        self,
        v: Any,
        block: bool = True,
        timeout: float | None = None,
        *,
        partition: str | None = None,
        partition_ttl: int = 24 * 3600,
    ) -> None:
        """Add ``v`` to the end of a partition; on a full one (5000 items), wait up to
        ``timeout`` (forever if None; not at all unless ``block``) for room, then raise
        ``queue.Full``."""
        self._put_many([v], block, timeout, partition=partition, partition_ttl=partition_ttl)

    def _put_many(
        self,
        vs: Iterable[Any],
        block: bool = True,
        timeout: float | None = None,
        *,
        partition: str | None = None,
        partition_ttl: int = 24 * 3600,
    ) -> None:
        """Add every value of ``vs`` to the end of a partition, in one request (all or none)."""
        import queue

        values = [_value(v) for v in vs]
        if len(values) > MAX_PARTITION_ITEMS:
            raise exception.InvalidError(
                f"a queue partition holds at most {MAX_PARTITION_ITEMS} items; this put has {len(values)}"
            )
        body: dict[str, Any] = {"values": values, "partition": _partition(partition), "partition_ttl": partition_ttl}
        r = self._long_poll("put", body, _timeout(block, timeout), lambda r: not r.get("full"))
        if r.get("full"):
            raise queue.Full(f"queue partition is full ({MAX_PARTITION_ITEMS} items)")

    def _get_many(
        self, n_values: int, block: bool = True, timeout: float | None = None, *, partition: str | None = None
    ) -> list[Any]:
        """Remove and return up to ``n_values`` of the oldest values of a partition; waits up
        to ``timeout`` (forever if None; not at all unless ``block``) for at least one.
        Without ``block``, an empty partition gives ``[]``; with it, a timeout raises
        ``queue.Empty``."""
        import queue

        if not isinstance(n_values, int) or n_values < 1:
            raise exception.InvalidError(f"n_values is a positive int, got {n_values!r}")
        body = {"n": min(n_values, MAX_PARTITION_ITEMS), "partition": _partition(partition)}
        r = self._long_poll("get", body, _timeout(block, timeout), lambda r: bool(r.get("values")))
        values = r.get("values") or []
        if not values and block:
            raise queue.Empty()
        return [_load(v["value"]) for v in values]

    def _get(self, block: bool = True, timeout: float | None = None, *, partition: str | None = None) -> Any:
        """Remove and return the oldest value of a partition. Waits up to ``timeout``
        (forever if None) for one, then raises ``queue.Empty``; without ``block``, returns
        None at once when the partition is empty."""
        got = self._get_many(1, block, timeout, partition=partition)
        return got[0] if got else None

    def _len(self, *, partition: str | None = None, total: bool = False) -> int:
        """Number of items of a partition, or of every partition with ``total``."""
        if partition is not None and total:
            raise exception.InvalidError("len takes a partition or total=True, not both")
        path = _api.queue_len(self._hydrate(), _partition(partition), total)
        return int(_client().request("GET", path)["len"])

    def _clear(self, *, partition: str | None = None, all: bool = False) -> None:
        """Remove every item of a partition, or of every partition with ``all``."""
        if partition is not None and all:
            raise exception.InvalidError("clear takes a partition or all=True, not both")
        _client().request("POST", _api.queue_op(self._hydrate(), "clear"), {"partition": _partition(partition), "all": all})

    def _iterate(self, *, partition: str | None = None, item_poll_timeout: float = 0.0) -> Iterator[Any]:
        """The values of a partition in order, without removing them; at the end, waits up
        to ``item_poll_timeout`` seconds for another one before stopping."""
        if item_poll_timeout < 0:
            raise exception.InvalidError(f"item_poll_timeout is 0 or more, got {item_poll_timeout!r}")
        body: dict[str, Any] = {"partition": _partition(partition), "limit": _PAGE}
        after = 0
        while True:
            page = self._long_poll("peek", {**body, "after": after}, float(item_poll_timeout), lambda r: bool(r.get("values")))
            values = page.get("values") or []
            if not values:
                return
            for v in values:
                yield _load(v["value"])
            after = int(values[-1]["seq"])

    def __aiter__(self) -> AsyncIterator[Any]:
        return aiter_in_thread(self._iterate)

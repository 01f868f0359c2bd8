"""The base of ``Dict``, ``Queue`` and ``Volume``: objects the server keeps by name, or
ephemeral ones without a name that live while their ``with`` block runs.

``from_name`` is lazy (the name resolves on first use, creating the object with
``create_if_missing``); ``ephemeral()`` makes one, heartbeats it while the block runs
(``_ephemeral.py``) and deletes it at the end; ``delete(name)`` deletes a named one. The
routes are the same for each kind under its collection (``dicts``, ``queues``, ``volumes``;
see ``_api.named_objects``): ``POST`` creates or gets, ``DELETE`` of one deletes it, and its
``heartbeat`` keeps an ephemeral one alive.

Imported inside containers: the standard library only.
"""

from __future__ import annotations

import contextlib

from . import _api, exception
from ._bridge import in_thread
from ._ephemeral import heartbeats
from ._object import _Object

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterator, TypeVar

    from ._transport import Client

    NamedT = TypeVar("NamedT", bound="_NamedObject")


def _client() -> Client:
    from . import _invocation

    return _invocation.client()


class _NamedObject(_Object):
    """A server-side object of one kind (``_kind``, e.g. "Dict") under ``_collection``
    (e.g. "dicts"); its id field is ``<kind>_id``."""

    _collection = ""

    def __init__(self) -> None:
        k = self._kind
        raise exception.InvalidError(
            f"make a {k} with flare.{k}.from_name(name, create_if_missing=True) or flare.{k}.ephemeral()"
        )

    @staticmethod
    def _aio(fn: Any) -> Any:
        """The ``.aio`` variant of a blocking method: it runs on a worker thread."""

        async def aio(*args: Any, **kwargs: Any) -> Any:
            return await in_thread(fn, *args, **kwargs)

        return aio

    # ------------------------------------------------------------ construction

    @classmethod
    def from_name(
        cls: type[NamedT], name: str, *, create_if_missing: bool = False, environment_name: str | None = None
    ) -> NamedT:
        """A reference to the object ``name``, resolved on first use (NotFoundError then if
        it does not exist and ``create_if_missing`` is False). ``environment_name`` is
        accepted for Modal compatibility and ignored (one workspace)."""
        if not isinstance(name, str) or not name:
            raise exception.InvalidError(f"a {cls._kind}'s name is a non-empty string")
        return cls._from_lookup(name, ("create" if create_if_missing else "lookup",))

    @classmethod
    @contextlib.contextmanager
    def ephemeral(cls: type[NamedT]) -> Iterator[NamedT]:
        """A new object without a name, deleted when the ``with`` block exits (or, if this
        process dies, 300 s after its last heartbeat)."""
        info = _client().request("POST", _api.named_objects(cls._collection), {"ephemeral": True})
        obj = cls._new_reference("")
        oid = str(info[obj._id_field()])
        obj._object_id = oid
        obj._hydrate_metadata(info)
        try:
            with heartbeats(_api.named_object(cls._collection, oid) + "/heartbeat"):
                yield obj
        finally:
            _client().request("DELETE", _api.named_object(cls._collection, oid), {})

    @classmethod
    def delete(cls, name: str) -> None:
        """Delete the object ``name`` and its contents (NotFoundError if there is none)."""
        try:
            info = _client().request("POST", _api.named_objects(cls._collection), {"name": name})
        except exception.NotFoundError:
            raise exception.NotFoundError(f"{cls._kind} {name!r} not found") from None
        _client().request("DELETE", _api.named_object(cls._collection, str(info[f"{cls._kind.lower()}_id"])), {})

    def _id_field(self) -> str:
        return f"{self._kind.lower()}_id"

    def _resolve(self) -> dict[str, Any]:
        create = bool(self._lookup) and self._lookup[0] == "create"  # type: ignore[index]
        try:
            info: dict[str, Any] = _client().request(
                "POST", _api.named_objects(self._collection), {"name": self._name, "create_if_missing": create}
            )
        except exception.NotFoundError:
            raise exception.NotFoundError(
                f"{self._kind} {self._name!r} not found (pass create_if_missing=True to create it)"
            ) from None
        return info

    def __repr__(self) -> str:
        what = repr(self._name) if self._name else "ephemeral"
        return f"{self._kind}({what}{', ' + self._object_id if self._object_id else ''})"

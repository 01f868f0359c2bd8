"""The base of the SDK's objects that the server knows by an id and users by a name.

A ``_Object`` is either *hydrated* (it holds its server-side id) or a lazy reference
(``from_name``: an app and a name, or, inside a container, the name alone) that resolves
its id on first use (``hydrate()``). Pickling is by reference: the class, the name, the
id if known, the lookup and the small metadata the server returned travel, never the
local code, configuration or client state, so an object passed to a remote function
re-hydrates inside the container. ``flare.Function`` is one; the same base is meant for
the other named objects (classes, volumes, secrets, dicts, queues, sandboxes).

Imported inside containers: nothing but the exception module at import time.
"""

from __future__ import annotations

from . import exception

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar

    ObjT = TypeVar("ObjT", bound="_Object")


class _Object:
    """An id (``object_id``, None until hydrated), a name and an optional lookup."""

    # Subclasses say what they are in messages ("Function").
    _kind = "Object"

    _object_id: str | None
    _name: str
    _lookup: tuple[str, ...] | None

    def _init_object(self, name: str, object_id: str | None = None, lookup: tuple[str, ...] | None = None) -> None:
        self._name = name
        self._object_id = object_id
        self._lookup = lookup

    # ------------------------------------------------------------ construction

    @classmethod
    def _new_reference(cls: type[ObjT], name: str) -> ObjT:
        """An instance that only refers to the server-side object ``name`` (no local state).
        Subclasses whose ``__init__`` needs more than that override it."""
        obj = cls.__new__(cls)
        obj._init_object(name)
        return obj

    @classmethod
    def _from_lookup(cls: type[ObjT], name: str, lookup: tuple[str, ...]) -> ObjT:
        """A lazy reference resolved by ``_resolve`` on first use (what ``from_name`` returns)."""
        obj = cls._new_reference(name)
        obj._lookup = lookup
        return obj

    # ---------------------------------------------------------------- identity

    @property
    def object_id(self) -> str | None:
        return self._object_id

    @property
    def is_hydrated(self) -> bool:
        return self._object_id is not None

    def hydrate(self: ObjT) -> ObjT:
        """Resolve the object's id now (references resolve lazily otherwise)."""
        self._hydrate()
        return self

    def _hydrate(self) -> str:
        """The object's id, resolved (once) if needed."""
        oid = self._object_id
        if oid is not None:
            return oid
        info = self._resolve()
        self._hydrate_metadata(info)
        oid = str(info[self._id_field()])
        self._object_id = oid
        return oid

    def _id_field(self) -> str:
        return "object_id"

    def _resolve(self) -> dict[str, Any]:
        """Look the object up on the server: its id (``_id_field()``) and metadata."""
        raise exception.ExecutionError(f"{self._kind} {self._name!r} has not been hydrated")

    def _hydrate_metadata(self, info: dict[str, Any]) -> None:
        """Take what the lookup returned besides the id (nothing by default)."""

    def _metadata(self) -> dict[str, Any]:
        """What a pickled reference carries besides the id and lookup (see ``__reduce__``)."""
        return {}

    # ---------------------------------------------------------------- pickling

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (type(self), self._name, self._object_id, self._lookup, self._metadata()))


def _restore(
    cls: type[_Object], name: str, object_id: str | None, lookup: tuple[str, ...] | None, metadata: dict[str, Any]
) -> _Object:
    """Unpickle a reference: a fresh instance with the id, lookup and metadata it had."""
    obj = cls._new_reference(name)
    obj._object_id = object_id
    obj._lookup = tuple(lookup) if lookup is not None else None
    obj._hydrate_metadata(metadata)
    return obj

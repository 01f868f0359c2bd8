"""``flare.FunctionCall``: a handle on a spawned call (``f.spawn(...)``, ``f.spawn_map(...)``).

Imported when a call is spawned (``flare.function`` imports it lazily). ``asyncio`` is
imported by the ``.aio`` variant only (already loaded there; costly for sync callers).
"""

from __future__ import annotations

import time

from . import _api, exception
from ._bridge import Method, in_thread
from ._invocation import POLL_WAIT_MS, client as _client, exception_of, output_value, poll_outputs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class FunctionCall:
    """A handle on a spawned call (``f.spawn(...)``, ``f.spawn_map(...)``)."""

    gather: Method  # FunctionCall.gather(*calls) / await FunctionCall.gather.aio(*calls), set below

    def __init__(self, call_id: str, kind: str | None = None, function_name: str = "") -> None:
        self._call_id = call_id
        self._kind = kind
        self._function_name = function_name
        self.get = Method(self._get, self._get_aio)
        self.cancel = Method(self._cancel, self._cancel_aio)

    def __repr__(self) -> str:
        return f"FunctionCall({self._call_id!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FunctionCall, (self._call_id, self._kind, self._function_name))

    @property
    def object_id(self) -> str:
        return self._call_id

    @staticmethod
    def from_id(function_call_id: str) -> FunctionCall:
        return FunctionCall(function_call_id)

    def _get(self, timeout: float | None = None) -> Any:
        """The result; raises flare.exception.TimeoutError if not ready within ``timeout`` seconds."""
        client = _client()
        if self._kind is None:
            info = client.request("GET", _api.call(self._call_id))
            self._kind = info.get("kind") or "spawn"
        deadline = None if timeout is None else time.monotonic() + timeout
        after = -1
        outputs: list[dict[str, Any]] = []
        while True:
            if deadline is None:
                wait_ms = POLL_WAIT_MS
            else:
                wait_ms = max(0, min(POLL_WAIT_MS, int((deadline - time.monotonic()) * 1000)))
            r = poll_outputs(client, self._call_id, after, wait_ms)
            outputs.extend(r["outputs"])
            after = r.get("next", after)
            if r.get("done"):
                break
            if self._kind in ("call", "spawn") and outputs:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise exception.TimeoutError(f"FunctionCall {self._call_id} did not finish within {timeout}s")
        if self._kind == "map":
            outputs.sort(key=lambda o: o["idx"])
            return [output_value(o, self._function_name) for o in outputs]
        if self._kind == "gen":
            outputs.sort(key=lambda o: o["seq"])
            items = []
            for o in outputs:
                if o.get("status") != "success":
                    raise exception_of(o, self._function_name)
                if o.get("gen") == "item":
                    items.append(output_value(o, self._function_name))
            return items
        if not outputs:
            raise exception.ExecutionError(f"FunctionCall {self._call_id} finished without an output")
        return output_value(outputs[0], self._function_name)

    async def _get_aio(self, timeout: float | None = None) -> Any:
        return await in_thread(self._get, timeout)

    def _cancel(self, terminate_containers: bool = False) -> None:
        """Cancel the call: pending inputs are dropped, running ones stopped."""
        _client().request("POST", _api.call_cancel(self._call_id), {"terminate_containers": bool(terminate_containers)})

    async def _cancel_aio(self, terminate_containers: bool = False) -> None:
        await in_thread(self._cancel, terminate_containers)


def _gather(*calls: FunctionCall) -> list[Any]:
    """Wait for several FunctionCalls; their results in order (raises the first failure)."""
    return [c.get() for c in calls]


async def _gather_aio(*calls: FunctionCall) -> list[Any]:
    import asyncio

    return list(await asyncio.gather(*(c.get.aio() for c in calls)))


FunctionCall.gather = Method(_gather, _gather_aio)

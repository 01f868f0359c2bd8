"""The map engine: ``.map()``, ``.starmap()``, ``.for_each()`` and ``.spawn_map()``.

A sender thread streams input batches into one server-side call while the caller polls
its outputs; when the control plane restarts and forgets the call, the inputs still
without an output are submitted again as a new call (``_InputLedger`` maps the new
indexes back to the original ones).

Imported when a map starts (``flare.function`` imports it lazily).
"""

from __future__ import annotations

import threading
import time

from . import _api, exception
from ._invocation import POLL_WAIT_MS, RECONNECT_WINDOW, await_server, cancel_quietly, client as _client, poll_outputs
from ._serialization import b64, deserialize, exception_from_output, serialize_args, unb64

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterator

    from ._transport import Client

_FIRST_BATCH = 100
_MAX_BATCH = 1000
_MAX_BATCH_BYTES = 4 << 20


class _InputLedger:
    """Which original inputs of a ``.map()`` still wait for their final output, and how the
    indexes of each server-side call map back to the original ones.

    A control plane that restarts forgets in-memory calls: the map client then submits the
    pending inputs again as a new call, whose index ``i`` is original index ``maps[new][i]``.
    An output counts once: ``resolve`` returns the original index the first time only.
    """

    __slots__ = ("pending", "maps")

    def __init__(self) -> None:
        self.pending: dict[int, str] = {}  # original index -> serialized input (JSON fragment)
        self.maps: dict[str, _IndexMap] = {}  # call id -> original index of each of its inputs

    def add(self, call_id: str, items: list[tuple[int, str]]) -> None:
        m = self.maps.setdefault(call_id, _IndexMap())
        for orig, frag in items:
            self.pending[orig] = frag
            m.append(orig)

    def resolve(self, call_id: str, idx: int) -> int | None:
        """The original index of output ``idx`` of ``call_id``, or None if it was already delivered."""
        m = self.maps.get(call_id)
        if m is None or not 0 <= idx < len(m):
            return None
        orig: int = m[idx]
        if self.pending.pop(orig, None) is None:
            return None
        return orig

    def resubmission(self) -> list[tuple[int, str]]:
        """The inputs to submit again (still pending), in original order."""
        return sorted(self.pending.items())

    def rebind(self, new_call_id: str, items: list[tuple[int, str]]) -> None:
        m = self.maps[new_call_id] = _IndexMap()
        for orig, _ in items:
            m.append(orig)


class _IndexMap:
    """Original index of each input of one server-side call: a run of consecutive indexes
    (the usual case: a call's input ``i`` is original input ``start + i``) held as two
    numbers, then a list for what follows out of order (after a resubmission). So a long
    map costs the client memory for its pending inputs only, not for every input."""

    __slots__ = ("start", "run", "rest")

    def __init__(self) -> None:
        self.start = 0
        self.run = 0
        self.rest: list[int] = []

    def append(self, orig: int) -> None:
        if not self.rest and (self.run == 0 or orig == self.start + self.run):
            if self.run == 0:
                self.start = orig
            self.run += 1
        else:
            self.rest.append(orig)

    def __len__(self) -> int:
        return self.run + len(self.rest)

    def __getitem__(self, idx: Any) -> Any:
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        if idx < 0:
            idx += len(self)
        if 0 <= idx < self.run:
            return self.start + idx
        if 0 <= idx - self.run < len(self.rest):
            return self.rest[idx - self.run]
        raise IndexError(idx)


class MapRun:
    """One ``.map()`` call: a sender thread streams input batches, the caller polls outputs.

    Survives a control-plane restart: when the server is unreachable, or forgets the call
    (404 after having known it), the inputs still without a final output are submitted again
    as a new call (waiting up to ``RECONNECT_WINDOW`` seconds for the server to return).
    """

    def __init__(
        self,
        function_id: str,
        name: str,
        items: Iterator[Any],
        kwargs: dict[str, Any],
        star: bool,
        on_outputs: Callable[[dict[str, Any]], None],
    ) -> None:
        self.function_id = function_id
        self.name = name
        self.on_outputs = on_outputs
        self.items = items
        self.kwargs = kwargs
        self.star = star
        self.call_id: str | None = None
        self.error: BaseException | None = None
        self.created = threading.Event()
        self.sender_done = threading.Event()
        self.sent_all = False
        self.final_posted = False  # the batch with more=false was handed to the server (maybe)
        self.stop = False
        self.num_sent = 0
        self.ledger = _InputLedger()
        self.state_lock = threading.Lock()  # ledger and call_id
        self.call_lock = threading.RLock()  # serializes posts and recoveries

    def _post(self, client: Client, batch: list[tuple[int, str]], more: bool) -> None:
        with self.call_lock:
            if more is False:
                self.final_posted = True
            call_id = self.call_id
            if call_id is None:
                inputs = ",".join(frag for _, frag in batch)
                body = ('{"kind":"map","inputs":[%s],"more":%s,"wait_ms":0}' % (inputs, "true" if more else "false")).encode()
                resp = client.request("POST", _api.function_calls(self.function_id), body)
                with self.state_lock:
                    self.ledger.add(resp["call_id"], batch)
                    self.call_id = resp["call_id"]
                self.created.set()
                self.num_sent += len(batch)
                return
            with self.state_lock:
                self.ledger.add(call_id, batch)
                known = len(self.ledger.maps[call_id]) - len(batch)
            inputs = ",".join(frag for _, frag in batch)
            body = ('{"inputs":[%s],"more":%s}' % (inputs, "true" if more else "false")).encode()
            try:
                while True:
                    try:
                        client.request("POST", _api.call_inputs(call_id), body)
                        break
                    except exception.ResourceExhaustedError:
                        # The server held the batch while our outputs were not being read
                        # (the consumer is slow): send it again, nothing was recorded.
                        if self.stop:
                            return
            except (exception.ConnectionError, exception.NotFoundError) as e:
                # Resubmits everything pending, this batch included, or (call still known)
                # re-posts whatever part of it the server did not record.
                self._recover(client, call_id, e, unposted_from=known, more=more)
            self.num_sent += len(batch)

    def _recover(
        self,
        client: Client,
        failed_call_id: str,
        error: BaseException,
        unposted_from: int | None = None,
        more: bool | None = None,
    ) -> None:
        """The server failed us on ``failed_call_id``: wait for it, then carry on with that call
        if it still exists, else submit the pending inputs again as a new call."""
        deadline = time.monotonic() + RECONNECT_WINDOW
        with self.call_lock:
            if self.call_id != failed_call_id:
                return  # another thread already recovered
            while True:
                await_server(client, deadline, error)
                try:
                    info = client.request("GET", _api.call(failed_call_id), timeout=10)
                except exception.ConnectionError:
                    continue
                except exception.NotFoundError:
                    info = None
                if info is not None:
                    # A transient failure: the call is still there.
                    if unposted_from is not None:
                        with self.state_lock:
                            m = self.ledger.maps[failed_call_id]
                            have = int(info.get("num_inputs", len(m)))
                            rest = [self.ledger.pending[o] for o in m[have:] if o in self.ledger.pending]
                        if have < len(m):
                            body = ('{"inputs":[%s],"more":%s}' % (",".join(rest), "true" if more else "false")).encode()
                            try:
                                client.request("POST", _api.call_inputs(failed_call_id), body)
                            except (exception.ConnectionError, exception.ResourceExhaustedError):
                                continue
                            except exception.NotFoundError:
                                pass  # forgotten after all: resubmit below
                            else:
                                return
                        else:
                            return
                    else:
                        return
                with self.state_lock:
                    items = self.ledger.resubmission()
                more_after = not self.final_posted
                inputs = ",".join(frag for _, frag in items)
                body = ('{"kind":"map","inputs":[%s],"more":%s,"wait_ms":0}' % (inputs, "true" if more_after else "false")).encode()
                try:
                    resp = client.request("POST", _api.function_calls(self.function_id), body)
                except exception.ConnectionError:
                    continue
                with self.state_lock:
                    self.ledger.rebind(resp["call_id"], items)
                    self.call_id = resp["call_id"]
                return

    def send_all(self) -> None:
        client = _client()
        kwargs = self.kwargs
        star = self.star
        batch: list[tuple[int, str]] = []
        size = 0
        limit = _FIRST_BATCH
        n = 0
        try:
            for item in self.items:
                if self.stop:
                    return
                args = tuple(item) if star else item
                data = b64(serialize_args(args, kwargs))
                batch.append((n, '{"args":"%s"}' % data))
                n += 1
                size += len(data)
                if len(batch) >= limit or size >= _MAX_BATCH_BYTES:
                    self._post(client, batch, True)
                    batch = []
                    size = 0
                    limit = _MAX_BATCH
            if not self.stop:
                self._post(client, batch, False)
                self.sent_all = True
        except BaseException as e:  # noqa: BLE001 - reported to the consumer
            self.error = e
            if self.call_id is not None:
                cancel_quietly(client, self.call_id)
        finally:
            self.created.set()
            self.sender_done.set()

    def _sender_main(self) -> None:
        try:
            self.send_all()
        finally:
            _client().close()

    def results(self, order_outputs: bool, return_exceptions: bool) -> Iterator[Any]:
        threading.Thread(target=self._sender_main, name="flare-map-sender", daemon=True).start()
        return self._results(order_outputs, return_exceptions)

    def _results(self, order_outputs: bool, return_exceptions: bool) -> Iterator[Any]:
        name = self.name
        client = _client()
        finished = False
        try:
            self.created.wait()
            if self.call_id is None:
                assert self.error is not None
                raise self.error
            call_id = self.call_id
            after = -1
            buffered: dict[int, tuple[bool, Any]] = {}
            next_idx = 0
            while True:
                with self.state_lock:
                    if self.call_id != call_id:  # re-submitted (by the sender or by us)
                        call_id = self.call_id
                        after = -1
                try:
                    r = poll_outputs(client, call_id, after, 1000 if not self.sent_all else POLL_WAIT_MS)
                except (exception.ConnectionError, exception.NotFoundError) as e:
                    if self.error is not None:
                        raise self.error from None
                    self._recover(client, call_id, e)
                    continue
                after = r.get("next", after)
                if r["outputs"]:
                    self.on_outputs(r)
                for o in r["outputs"]:
                    with self.state_lock:
                        orig = self.ledger.resolve(call_id, o["idx"])
                    if orig is None:
                        continue  # already delivered (a late output of a re-run input)
                    if o.get("status") == "success":
                        data = o.get("data")
                        ok, value = True, deserialize(unb64(data)) if data else None
                    else:
                        ok, value = False, exception_from_output(o, name)
                        if not return_exceptions:
                            raise value
                    if order_outputs:
                        buffered[orig] = (ok, value)
                        while next_idx in buffered:
                            yield buffered.pop(next_idx)[1]
                            next_idx += 1
                    else:
                        yield value
                if self.error is not None:
                    raise self.error
                if 0 < len(r["outputs"]) < 200 and not r.get("done"):
                    # Outputs are trickling in: let a few milliseconds' worth accumulate
                    # instead of paying one HTTP round trip per handful of outputs.
                    time.sleep(0.004)
                if r.get("done"):
                    with self.state_lock:
                        current = self.call_id == call_id
                    if not current:
                        continue
                    # The server only says done after our last batch (more=false) was accepted.
                    self.sender_done.wait()
                    if self.error is not None:
                        raise self.error
                    with self.state_lock:
                        if self.call_id != call_id:
                            continue
                    for idx in sorted(buffered):
                        yield buffered[idx][1]
                    finished = True
                    return
        finally:
            if not finished:
                self.stop = True
                if self.call_id is not None:
                    cancel_quietly(client, self.call_id)

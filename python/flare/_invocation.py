"""One invocation of a function: submitting its input, waiting for the output, and
surviving a control plane that restarts (the reconnect loop); generator calls; the
helpers shared with the map engine (``_map``) and ``FunctionCall``.

Imported when a function is called (``flare.function`` imports it lazily), so it may
import the client machinery at the top.
"""

from __future__ import annotations

import time

from . import _api, exception
from ._serialization import deserialize, exception_from_output, unb64
from ._transport import get_client

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterator

    from ._transport import Client

CALL_WAIT_MS = 25000
POLL_WAIT_MS = 25000
# How long a call waits for a server that went away to come back.
RECONNECT_WINDOW = 60.0


def client() -> Client:
    """The shared client of this process (FLARE_SERVER_URL or the local server)."""
    return get_client()


def output_value(output: dict[str, Any], name: str) -> Any:
    """The value of a success output; the exception a failed one stands for, raised."""
    if output.get("status") == "success":
        data = output.get("data")
        return deserialize(unb64(data)) if data else None
    raise exception_from_output(output, name)


def exception_of(output: dict[str, Any], name: str) -> BaseException:
    return exception_from_output(output, name)


def poll_outputs(client: Client, call_id: str, after: int, wait_ms: int, limit: int | None = None) -> dict[str, Any]:
    result: dict[str, Any] = client.request(
        "GET", _api.call_outputs(call_id, after, wait_ms, limit), timeout=wait_ms / 1000 + 60
    )
    return result


def cancel_quietly(client: Client, call_id: str) -> None:
    try:
        client.request("POST", _api.call_cancel(call_id), {"terminate_containers": False}, timeout=10)
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def await_server(client: Client, deadline: float, error: BaseException) -> None:
    """Wait (with backoff) until the server answers its health check; re-raise ``error`` at ``deadline``."""
    delay = 0.1
    while True:
        try:
            client.request("GET", _api.health(), timeout=5)
            return
        except exception.ConnectionError:
            pass
        now = time.monotonic()
        if now >= deadline:
            raise error
        time.sleep(min(delay, max(0.0, deadline - now)))
        delay = min(delay * 2, 2.0)


def call_body(kind: str, args_b64: str, wait_ms: int) -> bytes:
    """The body of a one-input call (``kind`` call, gen or spawn), built without ``json``."""
    return ('{"kind":"%s","inputs":[{"args":"%s"}],"more":false,"wait_ms":%d}' % (kind, args_b64, wait_ms)).encode()


def call_until_output(
    client: Client, fid: str, body: bytes, name: str, on_outputs: Callable[[dict[str, Any]], None]
) -> Any:
    """Submit one input and wait for its output. If the server goes away (a restarted
    control plane forgets in-memory calls), wait up to ``RECONNECT_WINDOW`` seconds for it
    to come back and submit the input again. ``on_outputs`` sees each answer that carries
    the output before its value is returned (log catch-up)."""
    deadline: float | None = None
    while True:
        try:
            resp = client.request("POST", _api.function_calls(fid), body, timeout=CALL_WAIT_MS / 1000 + 60)
        except exception.ConnectionError as e:
            if deadline is None:
                if not getattr(e, "request_sent", False):
                    raise  # never reached the server: nothing to recover
                deadline = time.monotonic() + RECONNECT_WINDOW
            await_server(client, deadline, e)
            continue
        outputs = resp.get("outputs")
        if outputs:
            on_outputs(resp)
            return output_value(outputs[0], name)
        call_id = resp["call_id"]
        after = -1
        try:
            while True:
                r = poll_outputs(client, call_id, after, POLL_WAIT_MS)
                if r["outputs"]:
                    on_outputs(r)
                    return output_value(r["outputs"][0], name)
                after = r.get("next", after)
        except (exception.ConnectionError, exception.NotFoundError) as e:
            if deadline is None:
                deadline = time.monotonic() + RECONNECT_WINDOW
            await_server(client, deadline, e)
            try:
                client.request("GET", _api.call(call_id), timeout=10)
            except exception.NotFoundError:
                continue  # forgotten: submit the input again
            except exception.ConnectionError:
                pass
            # still known (a transient failure): keep polling the same call
            while True:
                try:
                    r = poll_outputs(client, call_id, after, POLL_WAIT_MS)
                except exception.NotFoundError:
                    break
                except exception.ConnectionError as e2:
                    await_server(client, deadline, e2)
                    continue
                if r["outputs"]:
                    on_outputs(r)
                    return output_value(r["outputs"][0], name)
                after = r.get("next", after)


def gen_iter(client: Client, fid: str, args_b64: str, name: str) -> Iterator[Any]:
    """The items of a generator call, as they come; the call is cancelled if the
    iteration stops early."""
    resp = client.request("POST", _api.function_calls(fid), call_body("gen", args_b64, 0))
    call_id = resp["call_id"]
    finished = False
    try:
        pending = sorted(resp.get("outputs") or [], key=lambda o: o["seq"])
        after = pending[-1]["seq"] if pending else -1
        while True:
            for o in pending:
                if o.get("gen") == "item" and o.get("status") == "success":
                    yield output_value(o, name)
                elif o.get("gen") == "done" and o.get("status") == "success":
                    finished = True
                    return
                else:
                    finished = True
                    raise exception_of(o, name)
            r = poll_outputs(client, call_id, after, POLL_WAIT_MS)
            pending = sorted(r["outputs"], key=lambda o: o["seq"])
            after = r.get("next", after)
            if not pending and r.get("done"):
                finished = True
                return
    finally:
        if not finished:
            cancel_quietly(client, call_id)

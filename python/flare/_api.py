"""The paths of the Flare HTTP API that the SDK calls (docs/PROTOCOL.md section 1), all
in this module: no other module spells a ``/v1`` path (``tests/test_structure.py``).

Ids made by the server (``ap-``, ``fu-``, ``fc-``, digests) are used as they are; names
chosen by users (app and function names, image ids typed on the command line) are
percent-encoded.
"""

from __future__ import annotations

_V1 = "/v1"


def _q(segment: str) -> str:
    # Deliberately lazy: this module is imported in containers (by flare.function), where
    # most programs never look a function up by name.
    from urllib.parse import quote

    return quote(segment, safe="")


# ------------------------------------------------------------------ server


def health() -> str:
    return f"{_V1}/health"


def containers() -> str:
    return f"{_V1}/containers"


def workers() -> str:
    return f"{_V1}/workers"


# -------------------------------------------------------------------- apps


def apps() -> str:
    return f"{_V1}/apps"


def app_stop(app_id: str) -> str:
    return f"{_V1}/apps/{app_id}/stop"


def app_detach(app_id: str) -> str:
    return f"{_V1}/apps/{app_id}/detach"


def app_heartbeat(app_id: str) -> str:
    return f"{_V1}/apps/{app_id}/heartbeat"


def app_functions(app_id: str) -> str:
    return f"{_V1}/apps/{app_id}/functions"


def app_function(app_id: str, tag: str) -> str:
    return f"{_V1}/apps/{app_id}/functions/{_q(tag)}"


def app_by_name(app_name: str) -> str:
    return f"{_V1}/apps/by-name/{_q(app_name)}"


def app_function_by_name(app_name: str, name: str) -> str:
    return f"{_V1}/apps/by-name/{_q(app_name)}/functions/{_q(name)}"


def app_logs(app_id: str, query: str) -> str:
    return f"{_V1}/apps/{app_id}/logs?{query}"


# --------------------------------------------------------------- functions


def function(function_id: str) -> str:
    return f"{_V1}/functions/{function_id}"


def function_calls(function_id: str) -> str:
    return f"{_V1}/functions/{function_id}/calls"


def function_autoscaler(function_id: str) -> str:
    return f"{_V1}/functions/{function_id}/autoscaler"


def function_stats(function_id: str) -> str:
    return f"{_V1}/functions/{function_id}/stats"


# ------------------------------------------------------------------- calls


def call(call_id: str) -> str:
    return f"{_V1}/calls/{call_id}"


def call_outputs(call_id: str, after: int, wait_ms: int, limit: int | None = None) -> str:
    path = f"{_V1}/calls/{call_id}/outputs?after={after}&wait_ms={wait_ms}"
    if limit:
        path += f"&limit={limit}"
    return path


def call_inputs(call_id: str) -> str:
    return f"{_V1}/calls/{call_id}/inputs"


def call_cancel(call_id: str) -> str:
    return f"{_V1}/calls/{call_id}/cancel"


# ------------------------------------------------------- proxy auth tokens


def proxy_auth_tokens() -> str:
    return f"{_V1}/proxy-auth-tokens"


def proxy_auth_token(token_id: str) -> str:
    return f"{_V1}/proxy-auth-tokens/{_q(token_id)}"


# ------------------------------------------------------ mounts, images, blobs


def mounts() -> str:
    return f"{_V1}/mounts"


def images() -> str:
    return f"{_V1}/images"


def image(image_id: str) -> str:
    return f"{_V1}/images/{_q(image_id)}"


def images_build() -> str:
    return f"{_V1}/images/build"


def blobs_missing() -> str:
    return f"{_V1}/blobs/missing"


def blobs_batch() -> str:
    return f"{_V1}/blobs/batch"


def blob(digest: str) -> str:
    return f"{_V1}/blobs/{digest}"


# ------------------------------------------------------------------- dicts


def dicts() -> str:
    return f"{_V1}/dicts"


def dict_(dict_id: str) -> str:
    return f"{_V1}/dicts/{_q(dict_id)}"


def named_objects(collection: str) -> str:
    """``dicts``, ``queues``, ``volumes``: create-or-get (POST) and list (GET)."""
    return f"{_V1}/{collection}"


def named_object(collection: str, object_id: str) -> str:
    return f"{_V1}/{collection}/{_q(object_id)}"


def dict_op(dict_id: str, op: str) -> str:
    """``get``, ``contains``, ``put``, ``pop``, ``len``, ``clear``."""
    return f"{_V1}/dicts/{_q(dict_id)}/{op}"


def dict_items(dict_id: str, after: int, limit: int, keys_only: bool) -> str:
    path = f"{_V1}/dicts/{_q(dict_id)}/items?after={after}&limit={limit}"
    if keys_only:
        path += "&keys_only=true"
    return path


# ------------------------------------------------------------------ queues


def queues() -> str:
    return f"{_V1}/queues"


def queue(queue_id: str) -> str:
    return f"{_V1}/queues/{_q(queue_id)}"


def queue_op(queue_id: str, op: str) -> str:
    """``put``, ``get``, ``peek``, ``clear``."""
    return f"{_V1}/queues/{_q(queue_id)}/{op}"


def queue_len(queue_id: str, partition: str, total: bool) -> str:
    path = f"{_V1}/queues/{_q(queue_id)}/len"
    if total:
        return path + "?total=true"
    return path + (f"?partition={_q(partition)}" if partition else "")
# ----------------------------------------------------------------- volumes


def volumes() -> str:
    return f"{_V1}/volumes"


def volume(volume_id: str) -> str:
    return f"{_V1}/volumes/{_q(volume_id)}"


def volume_op(volume_id: str, op: str) -> str:
    """``commit``, ``blobs``, ``blobs/missing``."""
    return f"{_V1}/volumes/{_q(volume_id)}/{op}"


def volume_entries(volume_id: str, path: str, recursive: bool) -> str:
    q = f"path={_q(path)}"
    if recursive:
        q += "&recursive=true"
    return f"{_V1}/volumes/{_q(volume_id)}/entries?{q}"


def volume_file(volume_id: str, path: str) -> str:
    return f"{_V1}/volumes/{_q(volume_id)}/file?path={_q(path)}"

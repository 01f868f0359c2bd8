"""``flare.Dict`` without a server: references, pickling, client-side limits."""

from __future__ import annotations

import pickle
import threading
from typing import Any

import cloudpickle
import pytest

import flare
from flare import dict as dict_module
from flare import exception


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def request(self, method: str, path: str, body: Any = None, **_: Any) -> Any:
        self.calls.append((method, path, body))
        if path == "/v1/dicts":
            return {"dict_id": "di-1", "name": body.get("name", "")}
        return {"found": False, "written": 1}


@pytest.fixture()
def client(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    c = _Recorder()
    monkeypatch.setattr(dict_module, "_client", lambda: c)
    return c


def test_from_name_is_lazy_and_pickles_by_reference(client: _Recorder) -> None:
    d = flare.Dict.from_name("cache", create_if_missing=True)
    assert not d.is_hydrated and client.calls == []
    back = pickle.loads(cloudpickle.dumps(d))
    assert type(back) is flare.Dict and not back.is_hydrated
    assert back.get("k", 5) == 5
    assert client.calls[0] == ("POST", "/v1/dicts", {"name": "cache", "create_if_missing": True})
    assert back.object_id == "di-1"
    again = pickle.loads(pickle.dumps(back))
    assert again.object_id == "di-1" and hasattr(again.get, "aio")


def test_limits_and_unpicklable_values_fail_before_any_request(client: _Recorder) -> None:
    d = flare.Dict.from_name("cache")
    with pytest.raises(exception.InvalidError, match="at most 65536 bytes pickled; this one is 10000"):
        d.put(b"x" * 1_000_000, 1)
    with pytest.raises(exception.PayloadTooLargeError, match="at most 16.0 MiB"):
        d.put("k", b"x" * (17 << 20))
    with pytest.raises(exception.SerializationError, match="dict value of type _thread.lock"):
        d["k"] = threading.Lock()
    assert client.calls == []


def test_dict_cannot_be_made_directly() -> None:
    with pytest.raises(exception.InvalidError, match="from_name"):
        flare.Dict()

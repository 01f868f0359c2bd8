"""``flare.Dict`` without a server: references, pickling, client-side limits."""

from __future__ import annotations

import pickle
import threading
from typing import Any

import cloudpickle
import pytest

import flare
import flare._named
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
    monkeypatch.setattr(flare._named, "_client", lambda: c)
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


def test_dict_commands(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from flare import cli
    from flare._serialization import b64, dumps

    calls: list[tuple[str, str, Any]] = []

    class Client:
        def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
            calls.append((method, path, body))
            if path == "/v1/dicts" and method == "POST":
                if body["name"] == "nope":
                    raise exception.NotFoundError("no dict named 'nope'")
                return {"dict_id": "di-1", "name": body["name"], "created": True}
            if path == "/v1/dicts":
                return {"dicts": [{"dict_id": "di-1", "name": "cache", "len": 2, "created_at": 1700000000.0}]}
            if path.endswith("/get"):
                return {"found": True, "value": b64(dumps([1, 2]))}
            if "/items" in path:
                return {"items": [{"key": b64(dumps("a")), "value": b64(dumps(1))}]}
            return {}

    monkeypatch.setattr(cli, "_client", lambda: Client())
    assert cli.main(["dict", "create", "cache"]) == 0
    assert "Created dict 'cache' (di-1)" in capsys.readouterr().out
    assert cli.main(["dict", "list"]) == 0
    out = capsys.readouterr().out
    assert "ENTRIES" in out and "cache" in out and "di-1" in out
    assert cli.main(["dict", "get", "cache", "k"]) == 0
    assert capsys.readouterr().out.strip() == "[1, 2]"
    assert calls[-1] == ("POST", "/v1/dicts/di-1/get", {"key": b64(dumps("k"))})
    assert cli.main(["dict", "items", "cache", "-n", "5"]) == 0
    assert "'a'" in capsys.readouterr().out
    assert calls[-1][1] == "/v1/dicts/di-1/items?after=0&limit=5"
    assert cli.main(["dict", "clear", "cache", "--yes"]) == 0
    assert calls[-1] == ("POST", "/v1/dicts/di-1/clear", {})
    assert cli.main(["dict", "delete", "cache", "-y"]) == 0
    assert calls[-1] == ("DELETE", "/v1/dicts/di-1", {})
    with pytest.raises(SystemExit):
        cli.main(["dict", "get", "nope", "k"])
    assert "no dict named 'nope'" in capsys.readouterr().err

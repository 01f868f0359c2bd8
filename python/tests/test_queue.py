"""``flare.Queue`` without a server: references, pickling, client-side limits, long poll."""

from __future__ import annotations

import pickle
import queue
import threading
from typing import Any

import cloudpickle
import pytest

import flare
import flare._named
from flare import exception
from flare import queue as queue_module


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any, Any]] = []
        self.answers: list[Any] = []

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None, **_: Any) -> Any:
        self.calls.append((method, path, body, timeout))
        if path == "/v1/queues":
            return {"queue_id": "qu-1", "name": body.get("name", "")}
        if self.answers:
            return self.answers.pop(0)
        return {"values": [], "written": 1, "len": 3}


@pytest.fixture()
def client(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    c = _Recorder()
    monkeypatch.setattr(queue_module, "_client", lambda: c)
    monkeypatch.setattr(flare._named, "_client", lambda: c)
    return c


def test_from_name_is_lazy_and_pickles_by_reference(client: _Recorder) -> None:
    q = flare.Queue.from_name("jobs", create_if_missing=True)
    assert not q.is_hydrated and client.calls == []
    back = pickle.loads(cloudpickle.dumps(q))
    assert type(back) is flare.Queue and not back.is_hydrated
    assert back.get(block=False) is None
    assert client.calls[0][:3] == ("POST", "/v1/queues", {"name": "jobs", "create_if_missing": True})
    assert client.calls[1][:3] == ("POST", "/v1/queues/qu-1/get", {"n": 1, "partition": "", "timeout": 0.0})
    assert back.object_id == "qu-1"
    again = pickle.loads(pickle.dumps(back))
    assert again.object_id == "qu-1" and hasattr(again.get, "aio") and hasattr(again.iterate, "aio")


def test_limits_and_unpicklable_values_fail_before_any_request(client: _Recorder) -> None:
    q = flare.Queue.from_name("jobs")
    with pytest.raises(exception.PayloadTooLargeError, match="at most 1.0 MiB pickled"):
        q.put(b"x" * (2 << 20))
    with pytest.raises(exception.SerializationError, match="queue value of type _thread.lock"):
        q.put(threading.Lock())
    with pytest.raises(exception.InvalidError, match="at most 64 bytes; this one is 65"):
        q.put(1, partition="p" * 65)
    with pytest.raises(exception.InvalidError, match="non-empty"):
        q.get(partition="")
    with pytest.raises(exception.InvalidError, match="at most 5000 items"):
        q.put_many(range(5001))
    assert client.calls == []


def test_long_poll_reissues_until_the_timeout(client: _Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    q = flare.Queue.from_name("jobs")
    monkeypatch.setattr(queue_module, "_MAX_WAIT", 0.05)
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    gets = [c for c in client.calls if c[1].endswith("/get")]
    assert len(gets) >= 3 and all(c[2]["timeout"] <= 0.05 for c in gets)
    # An answer with values ends the wait; values are unpickled in order.
    from flare._serialization import b64, dumps

    client.answers = [{"values": []}, {"values": [{"seq": 1, "value": b64(dumps("a"))}]}]
    assert q.get() == "a"
    client.answers = [{"written": 0, "full": True}]
    with pytest.raises(queue.Full):
        q.put(1, block=False)


def test_queue_cannot_be_made_directly() -> None:
    with pytest.raises(exception.InvalidError, match="from_name"):
        flare.Queue()


def test_queue_commands(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from flare import cli
    from flare._serialization import b64, dumps

    calls: list[tuple[str, str, Any]] = []

    class Client:
        def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
            calls.append((method, path, body))
            if path == "/v1/queues" and method == "POST":
                if body["name"] == "nope":
                    raise exception.NotFoundError("no queue named 'nope'")
                return {"queue_id": "qu-1", "name": body["name"], "created": True}
            if path == "/v1/queues":
                return {"queues": [{"queue_id": "qu-1", "name": "jobs", "len": 2, "created_at": 1700000000.0}]}
            if path.endswith("/peek"):
                return {"values": [{"seq": 1, "value": b64(dumps([1, 2]))}]}
            if "/len" in path:
                return {"len": 7}
            return {}

    monkeypatch.setattr(cli, "_client", lambda: Client())
    assert cli.main(["queue", "create", "jobs"]) == 0
    assert "Created queue 'jobs' (qu-1)" in capsys.readouterr().out
    assert cli.main(["queue", "list"]) == 0
    out = capsys.readouterr().out
    assert "ITEMS" in out and "jobs" in out and "qu-1" in out
    assert cli.main(["queue", "peek", "jobs", "-n", "5", "--partition", "p"]) == 0
    assert capsys.readouterr().out.strip() == "[1, 2]"
    assert calls[-1] == ("POST", "/v1/queues/qu-1/peek", {"partition": "p", "after": 0, "limit": 5, "timeout": 0})
    assert cli.main(["queue", "len", "jobs", "--total"]) == 0
    assert capsys.readouterr().out.strip() == "7"
    assert calls[-1][1] == "/v1/queues/qu-1/len?total=true"
    assert cli.main(["queue", "len", "jobs", "--partition", "a b"]) == 0
    assert calls[-1][1] == "/v1/queues/qu-1/len?partition=a%20b"
    assert cli.main(["queue", "clear", "jobs", "--all", "--yes"]) == 0
    assert calls[-1] == ("POST", "/v1/queues/qu-1/clear", {"partition": "", "all": True})
    assert cli.main(["queue", "delete", "jobs", "-y"]) == 0
    assert calls[-1] == ("DELETE", "/v1/queues/qu-1", {})
    with pytest.raises(SystemExit):
        cli.main(["queue", "len", "nope"])
    assert "no queue named 'nope'" in capsys.readouterr().err

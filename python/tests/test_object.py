"""``flare._object``: lazy hydration and pickling by reference (``flare.Function``)."""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle
import pytest

import flare
from flare import exception
from flare import function as function_module
from flare._object import _Object


class _FakeClient:
    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.calls: list[tuple[str, str]] = []

    def request(self, method: str, path: str, body: Any = None, **_: Any) -> Any:
        self.calls.append((method, path))
        return self.reply


def _defined() -> flare.Function:
    app = flare.App("objs")

    @app.function(cpu=2.0, env={"SECRET": "x"})
    def square(x: int) -> int:
        return x * x

    return square


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
def test_function_pickles_by_reference(dumps: Any) -> None:
    f = _defined()
    assert isinstance(f, _Object)
    f._function_id = "fu-1"
    back = pickle.loads(dumps(f))
    assert type(back) is flare.Function
    assert back.object_id == "fu-1" and back.tag == "square" and back.is_hydrated
    assert back._is_generator is False and back._is_async is False
    # No local state: code, app, options stay behind.
    assert back._raw_f is None and back._app is None and back._config == {}
    with pytest.raises(exception.InvalidError, match="looked up by name"):
        back.local(3)
    data = dumps(f)
    assert b"SECRET" not in data and b"x * x" not in data


def test_generator_metadata_travels_with_the_reference() -> None:
    app = flare.App("objs")

    @app.function()
    def gen() -> Any:
        yield 1

    back = pickle.loads(pickle.dumps(gen))
    assert back._is_generator and not back.is_hydrated


def test_from_name_hydrates_lazily_once(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeClient({"function_id": "fu-9", "is_generator": True, "is_async": False})
    monkeypatch.setattr(function_module, "_client", lambda: fake)
    f = flare.Function.from_name("my app", "g/1")
    assert not f.is_hydrated and f.object_id is None and fake.calls == []
    # A reference pickled before hydration re-resolves where it is unpickled.
    ref = pickle.loads(pickle.dumps(f))
    assert ref._lookup == ("my app", "g/1") and ref.object_id is None
    assert f.hydrate() is f
    assert f.object_id == "fu-9" and f._is_generator
    assert fake.calls == [("GET", "/v1/apps/by-name/my%20app/functions/g%2F1")]
    f.hydrate()
    assert len(fake.calls) == 1  # resolved once
    assert ref._hydrate() == "fu-9" and len(fake.calls) == 2


def test_inside_a_container_a_function_resolves_by_its_app(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeClient({"function_id": "fu-3"})
    monkeypatch.setattr(function_module, "_client", lambda: fake)
    f = _defined()
    monkeypatch.delenv("FLARE_IS_REMOTE", raising=False)
    with pytest.raises(exception.ExecutionError, match="has not been hydrated"):
        f.hydrate()
    monkeypatch.setenv("FLARE_IS_REMOTE", "1")
    monkeypatch.setenv("FLARE_APP_ID", "ap-7")
    back = pickle.loads(pickle.dumps(f))
    assert back._hydrate() == "fu-3"
    assert fake.calls == [("GET", "/v1/apps/ap-7/functions/square")]


def test_unhydrated_base_object_says_what_it_is() -> None:
    class Thing(_Object):
        _kind = "Thing"

    t = Thing._from_lookup("t", ("app", "t"))
    with pytest.raises(exception.ExecutionError, match="Thing 't' has not been hydrated"):
        t.hydrate()

"""``gpu=`` parsing and the autoscaler/stats methods of ``flare.Function`` (no server)."""

from __future__ import annotations

from typing import Any

import pytest

import flare
from flare import exception
from flare import function as _functions
from flare._options import parse_gpu


def test_parse_gpu_specs() -> None:
    assert parse_gpu(None) == []
    assert parse_gpu("H100") == [{"type": "H100", "count": 1}]
    assert parse_gpu("h100:2") == [{"type": "H100", "count": 2}]
    assert parse_gpu("A100-80GB:8") == [{"type": "A100-80GB", "count": 8}]
    assert parse_gpu("any") == [{"type": "ANY", "count": 1}]
    assert parse_gpu(" l4 : 3 ") == [{"type": "L4", "count": 3}]
    assert parse_gpu(["H100", "a100-80gb:2"]) == [{"type": "H100", "count": 1}, {"type": "A100-80GB", "count": 2}]
    assert parse_gpu(("L4",)) == [{"type": "L4", "count": 1}]


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("", "missing GPU type"),
        (":2", "missing GPU type"),
        ("H100:0", "from 1 to 8, got 0"),
        ("H100:9", "from 1 to 8, got 9"),
        ("H100:two", "integer from 1 to 8"),
        ("H100:", "integer from 1 to 8"),
        ("H100:-1", "integer from 1 to 8"),
        ("H100:²", "integer from 1 to 8"),
        ("H100 x2", "unexpected character ' '"),
        ([], "at least one GPU type"),
        (["H100", "h100"], "listed twice"),
        (["H100", 2], "not int"),
        (True, "not bool"),
        ({"type": "H100"}, "not dict"),
    ],
)
def test_parse_gpu_rejects_with_the_bad_value(bad: Any, needle: str) -> None:
    with pytest.raises(exception.InvalidError, match="invalid gpu") as e:
        parse_gpu(bad)
    assert needle in str(e.value)
    if isinstance(bad, str):
        assert repr(bad) in str(e.value)


def test_function_decorator_sends_gpu() -> None:
    app = flare.App("gpu")

    @app.function(gpu=["H100:2", "a100-80gb:2"])
    def f() -> None:
        pass

    @app.function()
    def g() -> None:
        pass

    assert f._config["gpu"] == [{"type": "H100", "count": 2}, {"type": "A100-80GB", "count": 2}]
    assert g._config["gpu"] == []
    with pytest.raises(exception.InvalidError, match="'H100:16'"):
        app.function(gpu="H100:16")


class _FakeClient:
    def __init__(self, reply: Any = None) -> None:
        self.reply = reply
        self.calls: list[tuple[str, str, Any]] = []

    def request(self, method: str, path: str, body: Any = None, **_: Any) -> Any:
        self.calls.append((method, path, body))
        return self.reply


def _hydrated() -> flare.Function:
    f = flare.Function.from_name("app", "f")
    f._function_id = "fu-1"
    return f


def test_update_autoscaler_and_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeClient()
    monkeypatch.setattr(_functions, "_client", lambda: fake)
    f = _hydrated()
    f.update_autoscaler(min_containers=2, scaledown_window=30)
    f.update_autoscaler(max_containers=5, buffer_containers=0)
    assert fake.calls == [
        ("POST", "/v1/functions/fu-1/autoscaler", {"min_containers": 2, "scaledown_window": 30}),
        ("POST", "/v1/functions/fu-1/autoscaler", {"max_containers": 5, "buffer_containers": 0}),
    ]
    for bad in ({"min_containers": -1}, {"max_containers": 0}, {"buffer_containers": 1.5},
                {"min_containers": 3, "max_containers": 2}):
        with pytest.raises(exception.InvalidError):
            f.update_autoscaler(**bad)
    assert len(fake.calls) == 2

    fake.reply = {"backlog": 7, "num_total_runners": 3, "num_running_inputs": 2}
    stats = f.get_current_stats()
    assert fake.calls[-1][:2] == ("GET", "/v1/functions/fu-1/stats")
    assert (stats.backlog, stats.num_total_runners, stats.num_running_inputs) == (7, 3, 2)
    assert stats == _functions.FunctionStats(7, 3, 2)
    assert "backlog=7" in repr(stats)

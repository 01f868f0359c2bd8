"""``flare._options``: the options of ``@app.function()`` (checks and wire form)."""

from __future__ import annotations

import json
from typing import Any

import pytest

import flare
from flare import exception
from flare._options import (
    Autoscaler,
    Concurrency,
    FunctionOptions,
    GpuRequest,
    Resources,
    Retries,
    check_autoscaler_update,
    parse_gpu,
    retries_to_dict,
)


def _legacy_config(
    cpu: Any = None, memory: Any = None, gpu: Any = None, timeout: Any = 300, retries: Any = None, env: Any = None,
    min_containers: Any = 0, max_containers: Any = None, buffer_containers: Any = 0, scaledown_window: Any = 60,
    block_network: Any = False, max_inputs: int = 1, target_inputs: int | None = None,
    enable_memory_snapshot: bool = False,
) -> dict[str, Any]:
    """The ``config`` that ``App.function`` built before the options were dataclasses
    (copied from it, checks left out: only valid inputs are compared)."""
    cpu_limit = None
    if isinstance(cpu, tuple):
        cpu, cpu_limit = cpu
    return {
        "cpu": float(cpu) if cpu is not None else None,
        "cpu_limit": float(cpu_limit) if cpu_limit is not None else None,
        "memory": memory,
        "timeout": timeout,
        "retries": retries_to_dict(retries),
        "env": dict(env or {}),
        "min_containers": min_containers,
        "max_containers": max_containers,
        "buffer_containers": buffer_containers,
        "scaledown_window": scaledown_window,
        "max_inputs": max_inputs,
        "target_inputs": target_inputs,
        "block_network": bool(block_network),
        "gpu": parse_gpu(gpu),
        # Added with memory snapshots (the server reads a missing key as False).
        "enable_memory_snapshot": enable_memory_snapshot,
    }


CASES: list[dict[str, Any]] = [
    {},
    {"cpu": 2},
    {"cpu": 0.5, "memory": 512, "timeout": 60},
    {"cpu": (1, 4.5)},
    {"gpu": "h100:2", "retries": 3},
    {"gpu": ["H100", "a100-80gb:2"], "retries": Retries(max_retries=2, initial_delay=0.5)},
    {"env": {"A": "1", "B": "two"}, "block_network": True},
    {"min_containers": 1, "max_containers": 10, "buffer_containers": 2, "scaledown_window": 5},
    {"timeout": 86400, "max_containers": 1, "block_network": 1},
    {"enable_memory_snapshot": True},
]


@pytest.mark.parametrize("kwargs", CASES)
def test_wire_form_is_what_app_function_always_sent(kwargs: dict[str, Any]) -> None:
    expected = _legacy_config(**kwargs)
    options = FunctionOptions.from_decorator(**kwargs)
    wire = options.to_wire()
    assert list(wire) == list(expected)  # same keys, same order
    assert json.dumps(wire) == json.dumps(expected)  # same values and JSON types (1.0 vs 1)
    app = flare.App("opts")
    f = app.function(**kwargs)(lambda: None)
    assert json.dumps(f._config) == json.dumps(expected)


def test_concurrency_is_in_the_wire_form_both_ways() -> None:
    app = flare.App("conc")

    @app.function()
    @flare.concurrent(max_inputs=8, target_inputs=4)
    def below() -> None: ...

    @flare.concurrent(max_inputs=3)
    @app.function(cpu=1)
    def above() -> None: ...

    assert json.dumps(below._config) == json.dumps(_legacy_config(max_inputs=8, target_inputs=4))
    assert json.dumps(above._config) == json.dumps(_legacy_config(cpu=1, max_inputs=3))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"cpu": 0.01}, "cpu must be a number of cores between 0.0625 and 64, got 0.01"),
        ({"cpu": 65}, "got 65"),
        ({"cpu": "2"}, "got '2'"),
        ({"cpu": True}, "got True"),
        ({"cpu": (1, 2, 3)}, "cpu=(request, limit) needs two numbers"),
        ({"cpu": (2, 1)}, "cpu limit must be a number >= the request, got 1"),
        ({"memory": 0}, "memory must be a positive int (MiB), got 0"),
        ({"memory": 1.5}, "got 1.5"),
        ({"timeout": 0}, "timeout must be an int number of seconds between 1 and 86400, got 0"),
        ({"timeout": 86401}, "got 86401"),
        ({"timeout": 1.0}, "got 1.0"),
        ({"env": {"A": 1}}, "env must map str to str"),
        ({"env": ["A=1"]}, "env must map str to str"),
        ({"min_containers": -1}, "min_containers must be an int >= 0, got -1"),
        ({"buffer_containers": None}, "buffer_containers must be an int >= 0, got None"),
        ({"scaledown_window": 1.5}, "scaledown_window must be an int >= 0, got 1.5"),
        ({"max_containers": 0}, "max_containers must be an int >= 1, got 0"),
        ({"gpu": "H100:9"}, "invalid gpu 'H100:9'"),
        ({"retries": 11}, "Invalid retries number: 11"),
        ({"retries": "3"}, "retries must be an int or flare.Retries, not str"),
    ],
)
def test_bad_options_name_the_option_and_value(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(exception.InvalidError) as e:
        FunctionOptions.from_decorator(**kwargs)
    assert needle in str(e.value)
    with pytest.raises(exception.InvalidError):
        flare.App("bad").function(**kwargs)


def test_dataclasses_check_on_construction_and_are_frozen() -> None:
    with pytest.raises(exception.InvalidError, match="max_inputs must be an int >= 1"):
        Concurrency(0)
    with pytest.raises(exception.InvalidError, match="target_inputs must be an int between 1 and max_inputs"):
        Concurrency(2, 3)
    with pytest.raises(exception.InvalidError, match="max_containers must be an int >= 1"):
        Autoscaler(max_containers=0)
    with pytest.raises(exception.InvalidError, match="timeout"):
        FunctionOptions(timeout=0)
    opts = FunctionOptions(resources=Resources.parse(cpu=(1, 2), gpu="L4"))
    assert opts.resources == Resources(cpu=1.0, cpu_limit=2.0, memory=None, gpu=(GpuRequest("L4", 1),))
    with pytest.raises(AttributeError):
        opts.timeout = 5  # type: ignore[misc]
    assert opts.with_concurrency(4, None).concurrency == Concurrency(4) and opts.concurrency == Concurrency()


def test_autoscaler_update_checks() -> None:
    assert check_autoscaler_update(min_containers=2, max_containers=None) == {"min_containers": 2}
    with pytest.raises(exception.InvalidError, match="must not exceed"):
        check_autoscaler_update(min_containers=3, max_containers=2)
    with pytest.raises(exception.InvalidError, match="buffer_containers must be an int >= 0, got True"):
        check_autoscaler_update(buffer_containers=True)

"""Schedules in the SDK: ``flare.Period`` and ``flare.Cron``, their checks, and the
``schedule`` of a function's definition."""

from __future__ import annotations

from typing import Any

import pytest

import flare
from flare import exception
from flare.app import _function_def
from flare.schedule import Schedule


def test_periods_add_up_and_go_on_the_wire() -> None:
    assert flare.Period(seconds=5)._wire() == {"period": {"seconds": 5.0}}
    assert flare.Period(minutes=15)._wire() == {"period": {"seconds": 900.0}}
    assert flare.Period(weeks=1, days=1, hours=1, minutes=1, seconds=1.5)._wire() == {
        "period": {"seconds": 8 * 86400 + 3600 + 60 + 1.5}
    }
    assert flare.Period(years=1, months=2, days=1)._wire() == {"period": {"seconds": 86400.0, "months": 14}}
    assert flare.Period(hours=4) == flare.Period(minutes=240)
    assert repr(flare.Period(hours=4)) == "Period(hours=4)"
    assert isinstance(flare.Period(days=1), Schedule)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({}, "too short"),
        ({"seconds": 0.5}, "too short"),
        ({"seconds": -1}, "expected a number"),
        ({"minutes": 1.5}, "whole number"),
        ({"days": -1}, "whole number"),
        ({"hours": True}, "whole number"),
    ],
)
def test_bad_periods(kwargs: dict[str, Any], why: str) -> None:
    with pytest.raises(exception.InvalidError, match=why):
        flare.Period(**kwargs)


def test_crons() -> None:
    assert flare.Cron("*/5 * * * *")._wire() == {"cron": {"expr": "*/5 * * * *", "timezone": "UTC"}}
    c = flare.Cron("0 9 * * 1-5", timezone="Europe/Paris")
    assert c._wire() == {"cron": {"expr": "0 9 * * 1-5", "timezone": "Europe/Paris"}}
    assert repr(c) == "Cron('0 9 * * 1-5', timezone='Europe/Paris')"
    assert flare.Cron("@daily")._wire()["cron"]["expr"] == "@daily"
    with pytest.raises(exception.InvalidError, match="expected 5 fields"):
        flare.Cron("* * *")
    with pytest.raises(exception.InvalidError, match="time zone"):
        flare.Cron("* * * * *", timezone="")


def test_a_scheduled_function_takes_no_arguments() -> None:
    app = flare.App("s")

    @app.function(schedule=flare.Period(seconds=2))
    def tick() -> None: ...

    @app.function(schedule=flare.Cron("0 * * * *"))
    def hourly(x: int = 1, *args: Any, **kwargs: Any) -> None: ...

    @app.function()
    def plain() -> None: ...

    assert _function_def(tick, None, None)["schedule"] == {"period": {"seconds": 2.0}}
    assert _function_def(hourly, None, None)["schedule"] == {"cron": {"expr": "0 * * * *", "timezone": "UTC"}}
    assert "schedule" not in _function_def(plain, None, None)

    with pytest.raises(exception.InvalidError, match="requires x, y"):

        @app.function(schedule=flare.Period(seconds=2))
        def needs(x: int, y: int, z: int = 0) -> None: ...

    with pytest.raises(exception.InvalidError, match="generator"):

        @app.function(schedule=flare.Period(seconds=2))
        def gen() -> Any:
            yield 1

    with pytest.raises(exception.InvalidError, match="web endpoint"):

        @app.function(schedule=flare.Period(seconds=2))
        @flare.fastapi_endpoint()
        def web() -> None: ...

    with pytest.raises(exception.InvalidError, match=r"expected flare\.Period"):
        app.function(schedule="* * * * *")  # type: ignore[arg-type]


def test_app_list_shows_each_scheduled_functions_next_run() -> None:
    from flare.cli.app import _next_runs_column

    fns = [
        {"name": "tick", "next_run": 1796166902.5},
        {"name": "plain"},
        {"name": "nightly", "next_run": 1796169600.0},
    ]
    assert _next_runs_column(fns) == "tick 2026-12-01 23:15:02 UTC, nightly 2026-12-02 00:00:00 UTC"
    assert _next_runs_column([{"name": "plain"}]) == ""

"""Schedules (``schedule=flare.Period(...)`` / ``flare.Cron(...)``) end to end against a
live flared server (see conftest.py): runs of deployed and ephemeral apps, the next run in
``flare app list``, stops, a kill -9 restart, and the checks at deploy."""

from __future__ import annotations

import datetime
import itertools
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import flare
import pytest

from .conftest import Flared, Server, load_app, remove_home, run_cli, unique, write_app

TICK = """
import time

import flare

app = flare.App({app!r})


@app.function(schedule={schedule})
def tick():
    d = flare.Dict.from_name({dict!r}, create_if_missing=True)
    d[flare.current_function_call_id()] = time.time()
    print("tick ran")
"""


def _get(url: str, path: str) -> Any:
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return json.loads(r.read())


def _app(url: str, name: str) -> dict[str, Any]:
    apps = [a for a in _get(url, "/v1/apps")["apps"] if a["name"] == name and a["state"] != "stopped"]
    assert apps, f"no live app {name}"
    return dict(apps[-1])


def _logs(url: str, app_id: str) -> str:
    out, after = [], -1
    while True:
        page = _get(url, f"/v1/apps/{app_id}/logs?after={after}&limit=1000")
        if not page["logs"]:
            return "".join(r["data"] for r in out)
        out += page["logs"]
        after = page["next"]


def _runs_by_slot(logs: str) -> list[tuple[str, str]]:
    """``(call id, slot)`` of each ``scheduled run`` line."""
    return re.findall(r"scheduled run of tick \(call (\S+), slot (\S+)\)", logs)


def _wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _deploy(tmp_path: Path, name: str, schedule: str, dict_name: str) -> None:
    path = write_app(tmp_path, TICK.format(app=name, schedule=schedule, dict=dict_name))
    r = run_cli("deploy", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_period_runs_shows_next_run_and_stops(server: Server, tmp_path: Path) -> None:
    name, dict_name = unique("sched"), unique("sched-dict")
    d = flare.Dict.from_name(dict_name, create_if_missing=True)
    _deploy(tmp_path, name, "flare.Period(seconds=1)", dict_name)
    try:
        app = _app(server.url, name)
        next_run = app["functions"][0]["next_run"]
        assert 0 < next_run - time.time() <= 1.5
        r = run_cli("app", "list")
        assert r.returncode == 0, r.stderr
        line = next(ln for ln in r.stdout.splitlines() if name in ln)
        assert re.search(r"tick \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", line), line
        _wait_for(lambda: len(d) >= 2, 20, "two scheduled runs")
        logs = _logs(server.url, app["app_id"])
        runs = _runs_by_slot(logs)
        assert len(runs) >= 2 and "tick ran" in logs, logs
        assert len({slot for _, slot in runs}) == len(runs)
        r = run_cli("app", "logs", name)
        assert "scheduled run of tick" in r.stdout + r.stderr
    finally:
        r = run_cli("app", "stop", name)
    assert r.returncode == 0, r.stderr
    time.sleep(0.5)
    count = len(d)
    time.sleep(2.5)
    assert len(d) == count, "no runs after the stop"
    flare.Dict.delete(dict_name)


def test_ephemeral_app_runs_while_it_lives(server: Server, tmp_path: Path) -> None:
    dict_name = unique("sched-eph")
    mod = load_app(tmp_path, TICK.format(app=unique("sched-eph"), schedule="flare.Period(seconds=1)", dict=dict_name))
    d = flare.Dict.from_name(dict_name, create_if_missing=True)
    with mod.app.run():
        _wait_for(lambda: len(d) >= 2, 20, "two scheduled runs")
    time.sleep(0.5)
    count = len(d)
    time.sleep(2.5)
    assert len(d) == count, "no runs once the app stopped"
    flare.Dict.delete(dict_name)


def test_cron_next_run_in_a_time_zone(server: Server, tmp_path: Path) -> None:
    name = unique("sched-cron")
    path = write_app(tmp_path, f"""
        import flare

        app = flare.App({name!r})


        @app.function(schedule=flare.Cron("*/5 * * * *", timezone="Europe/Paris"))
        def every_five():
            pass


        @app.function(schedule=flare.Cron("30 9 * * *", timezone="America/New_York"))
        def morning():
            pass
    """)
    r = run_cli("deploy", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        now = time.time()
        fns = {f["name"]: f for f in _app(server.url, name)["functions"]}
        five = fns["every_five"]["next_run"]
        assert five % 300 == 0 and 0 < five - now <= 300, five
        # 9:30 in New York, whatever its offset today.
        ny = ZoneInfo("America/New_York")
        today = datetime.datetime.fromtimestamp(now, ny).date()
        want = next(
            t
            for t in (
                datetime.datetime.combine(today + datetime.timedelta(days=k), datetime.time(9, 30), ny).timestamp()
                for k in range(3)
            )
            if t > now
        )
        assert fns["morning"]["next_run"] == want
        r = run_cli("app", "list")
        line = next(ln for ln in r.stdout.splitlines() if name in ln)
        shown = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(five))
        assert f"every_five {shown}" in line, line
    finally:
        run_cli("app", "stop", name)


@pytest.mark.parametrize(
    ("schedule", "why"),
    [
        ('flare.Cron("61 * * * *")', "cron minute field"),
        ('flare.Cron("* * * * * *")', "expected 5 fields"),
        ('flare.Cron("0 0 30 2 *")', "never fires"),
        ('flare.Cron("* * * * *", timezone="Europe/Pariss")', 'unknown time zone "Europe/Pariss"'),
        ("flare.Period(seconds=0.5)", "too short"),
    ],
)
def test_invalid_schedules_fail_the_deploy(server: Server, tmp_path: Path, schedule: str, why: str) -> None:
    name = unique("sched-bad")
    path = write_app(tmp_path, TICK.format(app=name, schedule=schedule, dict="unused"))
    r = run_cli("deploy", str(path))
    assert r.returncode != 0
    assert why in r.stdout + r.stderr, r.stdout + r.stderr


def test_a_restart_neither_loses_nor_doubles_a_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    own = Flared()
    home = own.home
    name, dict_name = unique("sched-restart"), unique("sched-restart")
    try:
        own.wait()
        monkeypatch.setenv("FLARE_SERVER_URL", own.url)
        d = flare.Dict.from_name(dict_name, create_if_missing=True)
        _deploy(tmp_path, name, "flare.Period(seconds=2)", dict_name)
        app_id = _app(own.url, name)["app_id"]
        _wait_for(lambda: len(d) >= 2, 20, "two scheduled runs")
        time.sleep(0.5)  # the run's log line is stored (logs are written in batches)
        before = _runs_by_slot(_logs(own.url, app_id))
        own.stop(kill=True)
        time.sleep(3)  # a slot or two pass while the server is down
        again = Flared(home=home)
        try:
            again.wait()
            monkeypatch.setenv("FLARE_SERVER_URL", again.url)
            assert _app(again.url, name)["functions"][0]["next_run"] is not None
            d = flare.Dict.from_name(dict_name)
            n = len(d)
            _wait_for(lambda: len(d) >= n + 2, 20, "runs after the restart")
            time.sleep(0.3)
            runs = _runs_by_slot(_logs(again.url, app_id))
            slots = [slot for _, slot in runs]
            assert len(set(slots)) == len(slots), f"a slot ran twice: {runs}"
            assert len({c for c, _ in runs}) == len(runs)
            assert runs[: len(before)] == before
            times = [datetime.datetime.fromisoformat(s).timestamp() for s in slots]
            assert times == sorted(times)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(abs(g / 2 - round(g / 2)) < 1e-3 and g >= 2 - 1e-3 for g in gaps), gaps
            # The downtime's missed slots ran once: one run at the restart, not one each.
            down = [g for g in gaps if g > 2 + 1e-3]
            assert len(down) <= 1, gaps
        finally:
            again.stop()
    finally:
        own.stop()
        remove_home(home)

"""Detached runs (``flare run --detach``) and ``App.lookup`` against a live flared server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import flare
import pytest
from flare import _api, _invocation, exception

from .conftest import Server, run_cli, unique, write_app

APP = """
import time

import flare

app = flare.App("{name}")


@app.function()
def slow(dict_name, key):
    time.sleep(4)
    flare.Dict.from_name(dict_name)[key] = "finished"
    return key


@app.local_entrypoint()
def main(dict_name: str, key: str):
    slow.spawn(dict_name, key)
    print("spawned", key)
"""


def _app(name: str) -> dict[str, Any]:
    apps = [a for a in _invocation.client().request("GET", _api.apps())["apps"] if a["name"] == name]
    assert len(apps) == 1, apps
    return apps[0]


def _wait_for(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_detached_run_finishes_its_calls_after_the_client_exits_then_stops(server: Server, tmp_path: Path) -> None:
    name = unique("detached")
    dict_name = unique("detach-dict")
    d = flare.Dict.from_name(dict_name, create_if_missing=True)
    path = write_app(tmp_path, APP.format(name=name))
    t0 = time.monotonic()
    r = run_cli("run", "--detach", str(path), "--dict-name", dict_name, "--key", "k1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "spawned k1" in r.stdout
    assert "detached" in r.stderr and "keeps running" in r.stderr
    # The client is gone before the call could finish; the app carries on without it.
    assert time.monotonic() - t0 < 60
    assert _app(name)["state"] == "detached"
    _wait_for("the spawned call's write", lambda: d.get("k1") == "finished", 60)
    # Nothing is left to do: the app stops by itself (the jobs loop checks every second).
    _wait_for("the detached app to stop", lambda: _app(name)["state"] == "stopped", 30)


def test_without_detach_the_app_stops_with_its_client(server: Server, tmp_path: Path) -> None:
    name = unique("attached")
    dict_name = unique("attach-dict")
    d = flare.Dict.from_name(dict_name, create_if_missing=True)
    path = write_app(tmp_path, APP.format(name=name))
    r = run_cli("run", str(path), "--dict-name", dict_name, "--key", "k2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _app(name)["state"] == "stopped"
    time.sleep(5)
    assert d.get("k2") is None


def test_a_deployed_app_cannot_be_detached(server: Server, tmp_path: Path) -> None:
    app = flare.App.lookup(unique("lookup-deployed"), create_if_missing=True)
    with pytest.raises(exception.Error, match="only an ephemeral app can be detached"):
        _invocation.client().request("POST", _api.app_detach(app.app_id or ""), {})


def test_app_lookup_finds_creates_or_names_what_is_missing(server: Server, tmp_path: Path) -> None:
    name = unique("lookup")
    with pytest.raises(exception.NotFoundError, match=name):
        flare.App.lookup(name)
    made = flare.App.lookup(name, create_if_missing=True)
    assert made.name == name and made.app_id
    again = flare.App.lookup(name)
    assert again.app_id == made.app_id
    assert _app(name)["state"] == "deployed"
    # A deployed app's functions are found through the looked-up name too.
    path = write_app(tmp_path, """
import flare

app = flare.App("{name}")


@app.function()
def hello():
    return "hi"
""".replace("{name}", name))
    r = run_cli("deploy", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert flare.App.lookup(name).app_id == made.app_id
    assert flare.Function.from_name(name, "hello").remote() == "hi"

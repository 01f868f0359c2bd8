"""``flare.Dict`` end to end against a live flared server (see conftest.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import flare
import pytest
from flare import _api, _invocation, exception

from .conftest import PYTHON_DIR, Flared, Server, load_app, remove_home, run_cli, unique

APP = """
import flare

app = flare.App()


@app.function()
def use_passed(d, key):
    d[key] = "from container"
    return d.get("client-key"), len(d), key in d


@app.function()
def use_by_name(name):
    d = flare.Dict.from_name(name, create_if_missing=True)
    d.put("n", 41)
    d.update({"n": d["n"] + 1}, other="x")
    return sorted(d.items())
"""


def test_every_method_round_trips_from_a_plain_script(server: Server) -> None:
    name = unique("dict")
    d = flare.Dict.from_name(name, create_if_missing=True)
    d["a"] = 1
    d[("tuple", 2)] = {"nested": [1, 2]}
    assert d["a"] == 1 and d[("tuple", 2)] == {"nested": [1, 2]}
    assert d.get("missing") is None and d.get("missing", 7) == 7
    with pytest.raises(KeyError):
        d["missing"]  # noqa: B018
    assert d.put("b", 2) is True
    assert d.put("b", 3, skip_if_exists=True) is False and d["b"] == 2
    assert d.pop("b") == 2
    with pytest.raises(KeyError):
        d.pop("b")
    d.update({"c": 3}, e=5)
    assert "c" in d and d.contains("e") and "zz" not in d
    assert len(d) == d.len() == 4
    assert list(d.keys()) == ["a", ("tuple", 2), "c", "e"]
    assert list(d.values()) == [1, {"nested": [1, 2]}, 3, 5]
    assert dict(d.items()) == {"a": 1, ("tuple", 2): {"nested": [1, 2]}, "c": 3, "e": 5}
    # Iteration goes page by page (100 entries a page).
    d.update({i: i * i for i in range(250)})
    assert sum(1 for _ in d.keys()) == 254
    d.clear()
    assert len(d) == 0 and list(d.items()) == []
    # A second reference by name sees the same dict.
    d["x"] = "y"
    assert flare.Dict.from_name(name)["x"] == "y"
    flare.Dict.delete(name)
    with pytest.raises(exception.NotFoundError, match=name):
        flare.Dict.from_name(name).get("x")


def test_aio(server: Server) -> None:
    async def main() -> list[object]:
        d = flare.Dict.from_name(unique("dict-aio"), create_if_missing=True)
        await d.put.aio("k", 1)
        await d.update.aio({"j": 2})
        got = [await d.get.aio("k"), await d.contains.aio("j"), await d.len.aio()]
        got.append([k async for k in d.keys.aio()])
        got.append([kv async for kv in d.items.aio()])
        got.append(await d.pop.aio("k"))
        await d.clear.aio()
        got.append(await d.len.aio())
        return got

    assert asyncio.run(main()) == [1, True, 2, ["k", "j"], [("k", 1), ("j", 2)], 1, 0]


def test_not_found_without_create_if_missing(server: Server) -> None:
    name = unique("nope")
    d = flare.Dict.from_name(name)
    with pytest.raises(exception.NotFoundError, match=name):
        d["k"] = 1
    with pytest.raises(exception.NotFoundError):
        flare.Dict.delete(name)


def test_limits_give_clear_errors(server: Server) -> None:
    d = flare.Dict.from_name(unique("dict-limits"), create_if_missing=True)
    with pytest.raises(exception.InvalidError, match="key is at most 65536 bytes pickled; this one is 10000"):
        d[b"k" * 1_000_000] = 1
    with pytest.raises(exception.PayloadTooLargeError, match="at most 16.0 MiB pickled"):
        d["big"] = b"v" * (17 << 20)
    with pytest.raises(exception.SerializationError, match="dict value of type _thread.lock"):
        d["lock"] = threading.Lock()
    # A value just under the limit is fine.
    d["ok"] = b"v" * (15 << 20)
    assert len(d["ok"]) == 15 << 20 and len(d) == 1


def test_ephemeral_dict_is_deleted_at_exit(server: Server) -> None:
    with flare.Dict.ephemeral() as d:
        d["k"] = "v"
        assert d["k"] == "v"
        did = d.object_id
    assert did
    with pytest.raises(exception.NotFoundError):
        d.get("k")


def test_from_inside_a_function(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, APP)
    name = unique("dict-fn")
    d = flare.Dict.from_name(name, create_if_missing=True)
    d["client-key"] = "hello"
    with mod.app.run():
        assert mod.use_passed.remote(d, "ck") == ("hello", 2, True)
        assert d["ck"] == "from container"
        # Looked up by name inside the container (made there).
        other = unique("dict-in")
        assert mod.use_by_name.remote(other) == [("n", 42), ("other", "x")]
    assert flare.Dict.from_name(other)["n"] == 42


def test_acknowledged_writes_survive_kill_9(monkeypatch: pytest.MonkeyPatch) -> None:
    own = Flared()
    home = own.home
    try:
        own.wait()
        monkeypatch.setenv("FLARE_SERVER_URL", own.url)
        d = flare.Dict.from_name("durable", create_if_missing=True)
        for i in range(50):
            d[i] = f"value {i}"
        d.update({"big": b"x" * (4 << 20)})
        assert d.pop(0) == "value 0"
        own.stop(kill=True)
        again = Flared(home=home)
        try:
            again.wait()
            monkeypatch.setenv("FLARE_SERVER_URL", again.url)
            d = flare.Dict.from_name("durable")
            assert len(d) == 50
            assert d[49] == "value 49" and 0 not in d
            assert d["big"] == b"x" * (4 << 20)
        finally:
            again.stop()
    finally:
        own.stop()
        remove_home(home)


def test_cli_create_get_items_clear_delete(server: Server) -> None:
    name = unique("clidict")
    r = run_cli("dict", "create", name)
    assert r.returncode == 0 and "Created" in r.stdout, r.stdout + r.stderr
    d = flare.Dict.from_name(name)
    d.update({"greeting": "hello", "n": 3})
    r = run_cli("dict", "list")
    assert r.returncode == 0 and name in r.stdout, r.stdout + r.stderr
    r = run_cli("dict", "get", name, "greeting")
    assert r.returncode == 0 and "'hello'" in r.stdout, r.stdout + r.stderr
    r = run_cli("dict", "get", name, "missing")
    assert r.returncode != 0 and "missing" in r.stderr, r.stdout + r.stderr
    r = run_cli("dict", "items", name)
    assert r.returncode == 0 and "greeting" in r.stdout and "3" in r.stdout, r.stdout + r.stderr
    r = run_cli("dict", "clear", name, "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(d) == 0
    r = run_cli("dict", "delete", name, "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    with pytest.raises(exception.NotFoundError, match=name):
        flare.Dict.from_name(name).get("x")
    r = run_cli("dict", "get", name, "greeting")
    assert r.returncode != 0 and name in r.stderr, r.stdout + r.stderr


ORPHAN = """
import os
import signal

import flare

with flare.Dict.ephemeral() as d, flare.Queue.ephemeral() as q, flare.Volume.ephemeral() as v:
    d["x"] = 1
    q.put("item")
    print(d.object_id, q.object_id, v.object_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_an_ephemeral_dict_queue_or_volume_whose_client_died_is_deleted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    own = Flared("--ephemeral-ttl-secs", "2")
    try:
        own.wait()
        monkeypatch.setenv("FLARE_SERVER_URL", own.url)
        script = tmp_path / "orphan.py"
        script.write_text(ORPHAN)
        env = {**os.environ, "PYTHONPATH": str(PYTHON_DIR)}
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == -9, r.stdout + r.stderr
        dict_id, queue_id, volume_id = r.stdout.split()
        client = _invocation.client()
        # The client died inside its `with` block: the objects outlive it, for now.
        assert client.request("GET", _api.dict_op(dict_id, "len"))["len"] == 1
        assert client.request("GET", _api.queue_len(queue_id, "", True))["len"] == 1
        assert client.request("GET", _api.volume(volume_id))["volume_id"] == volume_id
        for path in (_api.dict_op(dict_id, "len"), _api.queue_len(queue_id, "", True), _api.volume(volume_id)):
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.request("GET", path)
                except exception.NotFoundError:
                    break
                assert time.monotonic() < deadline, f"the orphaned ephemeral object was not deleted: {path}"
                time.sleep(0.2)
        # A named dict has no lease: it stays.
        named = flare.Dict.from_name("kept", create_if_missing=True)
        named["k"] = 1
        time.sleep(3)
        assert named["k"] == 1
    finally:
        own.stop()
        remove_home(own.home)

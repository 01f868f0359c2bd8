"""``flare.Queue`` end to end against a live flared server (see conftest.py)."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from pathlib import Path

import flare
import pytest
from flare import exception

from .conftest import Flared, Server, load_app, remove_home, run_cli, unique

APP = """
import flare

app = flare.App()


@app.function()
def use_passed(q):
    got = q.get(timeout=30)
    q.put(("from container", got))
    q.put_many([1, 2], partition="p")
    return q.len(total=True)


@app.function()
def consume(q, n):
    # Blocks on the server until the client puts.
    return [q.get(timeout=60) for _ in range(n)]


@app.function()
def use_by_name(name):
    q = flare.Queue.from_name(name, create_if_missing=True)
    q.put_many(["a", "b", "c"])
    return q.get_many(2)
"""


def test_every_method_round_trips_from_a_plain_script(server: Server) -> None:
    name = unique("queue")
    q = flare.Queue.from_name(name, create_if_missing=True)
    q.put(1)
    q.put({"nested": [1, 2]})
    q.put_many([3, 4, 5])
    assert q.len() == 5 and len(list(q.iterate())) == 5, "iterate leaves the items"
    assert q.get() == 1 and q.get() == {"nested": [1, 2]}
    assert q.get_many(2) == [3, 4]
    assert q.get_many(10) == [5], "get_many returns what there is"
    assert q.get(block=False) is None and q.get_many(3, block=False) == []
    # Partitions are independent FIFOs.
    q.put("default")
    q.put_many(["x", "y"], partition="p1")
    q.put("z", partition="p2")
    assert q.len() == 1 and q.len(partition="p1") == 2 and q.len(total=True) == 4
    assert list(q.iterate(partition="p1")) == ["x", "y"]
    assert q.get(partition="p1") == "x" and q.get(partition="p2") == "z" and q.get() == "default"
    q.clear(partition="p1")
    assert q.len(partition="p1") == 0
    q.put_many(range(250), partition="many")
    assert list(q.iterate(partition="many")) == list(range(250)), "iterate goes page by page"
    q.put(1)
    q.clear(all=True)
    assert q.len(total=True) == 0
    # A second reference by name sees the same queue.
    q.put("shared")
    assert flare.Queue.from_name(name).get() == "shared"
    flare.Queue.delete(name)
    with pytest.raises(exception.NotFoundError, match=name):
        flare.Queue.from_name(name).put(1)


def test_get_timeout_on_an_empty_queue_raises_empty_fast(server: Server) -> None:
    q = flare.Queue.from_name(unique("queue-empty"), create_if_missing=True)
    q.len()  # resolved before the clock starts
    t = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.1)
    took = time.monotonic() - t
    assert 0.1 <= took < 1.0, took
    with pytest.raises(queue.Empty):
        q.get_many(5, timeout=0.1)


def test_a_blocked_get_wakes_on_a_put(server: Server) -> None:
    q = flare.Queue.from_name(unique("queue-wake"), create_if_missing=True)
    q.len()
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(q.get(timeout=30)))
    t.start()
    time.sleep(0.5)
    start = time.monotonic()
    q.put("hello")
    t.join(10)
    assert out == ["hello"] and time.monotonic() - start < 2.0


def test_many_blocked_getters_each_get_a_distinct_item(server: Server) -> None:
    q = flare.Queue.from_name(unique("queue-many"), create_if_missing=True)
    q.len()
    got: list[object] = []
    lock = threading.Lock()

    def getter() -> None:
        v = q.get(timeout=60)
        with lock:
            got.append(v)

    threads = [threading.Thread(target=getter) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    for i in range(8):
        q.put(i)
    for t in threads:
        t.join(30)
    assert sorted(got) == list(range(8)), got  # type: ignore[type-var]
    assert q.len() == 0


def test_partition_ttl_expires_a_partition(server: Server) -> None:
    q = flare.Queue.from_name(unique("queue-ttl"), create_if_missing=True)
    q.put("short", partition="p", partition_ttl=1)
    q.put("long", partition="keep")
    assert q.len(partition="p") == 1
    time.sleep(1.5)
    assert q.len(partition="p") == 0 and q.get(partition="p", block=False) is None
    assert q.len(total=True) == 1 and q.get(partition="keep") == "long"


def test_aio(server: Server) -> None:
    async def main() -> list[object]:
        q = flare.Queue.from_name(unique("queue-aio"), create_if_missing=True)
        await q.put.aio(1)
        await q.put_many.aio([2, 3])
        got: list[object] = [await q.len.aio(), [v async for v in q.iterate.aio()]]
        got.append(await q.get.aio())
        got.append(await q.get_many.aio(5))
        try:
            await q.get.aio(timeout=0.1)
        except queue.Empty:
            got.append("empty")
        await q.put.aio(4, partition="x")
        await q.clear.aio(all=True)
        got.append(await q.len.aio(total=True))
        return got

    assert asyncio.run(main()) == [3, [1, 2, 3], 1, [2, 3], "empty", 0]


def test_not_found_without_create_if_missing(server: Server) -> None:
    name = unique("nope")
    with pytest.raises(exception.NotFoundError, match=name):
        flare.Queue.from_name(name).put(1)
    with pytest.raises(exception.NotFoundError, match=name):
        flare.Queue.delete(name)


def test_limits_give_clear_errors(server: Server) -> None:
    q = flare.Queue.from_name(unique("queue-limits"), create_if_missing=True)
    with pytest.raises(exception.PayloadTooLargeError, match="at most 1.0 MiB pickled"):
        q.put(b"v" * (2 << 20))
    with pytest.raises(exception.SerializationError, match="queue value of type _thread.lock"):
        q.put(threading.Lock())
    with pytest.raises(exception.InvalidError, match="at most 64 bytes"):
        q.put(1, partition="k" * 65)
    assert q.len() == 0, "nothing of a refused put is sent"
    q.put(b"v" * ((1 << 20) - 100))
    assert len(q.get()) == (1 << 20) - 100
    # A full partition (5000 items): a put waits for room, then raises queue.Full.
    q.put_many(range(5000), partition="full")
    t = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(1, partition="full", timeout=0.3)
    assert time.monotonic() - t >= 0.3
    with pytest.raises(queue.Full):
        q.put(1, partition="full", block=False)
    # Room made by a get lets a waiting put through.
    done = threading.Event()
    threading.Thread(target=lambda: (q.put("last", partition="full", timeout=30), done.set())).start()
    time.sleep(0.3)
    assert q.get(partition="full") == 0
    assert done.wait(10) and q.len(partition="full") == 5000


def test_ephemeral_queue_is_deleted_at_exit(server: Server) -> None:
    with flare.Queue.ephemeral() as q:
        q.put("v")
        assert q.get() == "v"
        qid = q.object_id
    assert qid
    with pytest.raises(exception.NotFoundError):
        q.put(1)


def test_from_inside_a_function(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, APP)
    with mod.app.run():
        with flare.Queue.ephemeral() as q:
            q.put("client")
            assert mod.use_passed.remote(q) == 3
            assert q.get() == ("from container", "client")
            assert q.get_many(2, partition="p") == [1, 2]
            # A function blocked on the server gets what the client puts afterwards.
            call = mod.consume.spawn(q, 3)
            time.sleep(1.0)
            q.put_many(["a", "b", "c"])
            assert call.get(timeout=60) == ["a", "b", "c"]
        other = unique("queue-in")
        assert mod.use_by_name.remote(other) == ["a", "b"]
    assert flare.Queue.from_name(other).get() == "c"


def test_cli(server: Server) -> None:
    name = unique("queue-cli")
    r = run_cli("queue", "create", name)
    assert r.returncode == 0 and f"Created queue {name!r}" in r.stdout, r.stderr
    q = flare.Queue.from_name(name)
    q.put_many(["first", "second"])
    q.put("p", partition="part")
    r = run_cli("queue", "list")
    assert r.returncode == 0 and name in r.stdout, r.stderr
    r = run_cli("queue", "peek", name, "-n", "2")
    assert r.stdout.split() == ["'first'", "'second'"], r.stderr
    assert run_cli("queue", "len", name).stdout.strip() == "2"
    assert run_cli("queue", "len", name, "--total").stdout.strip() == "3"
    assert run_cli("queue", "len", name, "--partition", "part").stdout.strip() == "1"
    assert run_cli("queue", "clear", name, "--yes").returncode == 0
    assert q.len() == 0 and q.len(total=True) == 1
    assert run_cli("queue", "delete", name, "--yes").returncode == 0
    r = run_cli("queue", "len", name)
    assert r.returncode != 0 and f"no queue named {name!r}" in r.stderr


def test_acknowledged_puts_survive_kill_9(monkeypatch: pytest.MonkeyPatch) -> None:
    own = Flared()
    home = own.home
    try:
        own.wait()
        monkeypatch.setenv("FLARE_SERVER_URL", own.url)
        q = flare.Queue.from_name("durable", create_if_missing=True)
        for i in range(50):
            q.put(i)
        q.put_many(["x", "y"], partition="p")
        assert q.get() == 0
        own.stop(kill=True)
        again = Flared(home=home)
        try:
            again.wait()
            monkeypatch.setenv("FLARE_SERVER_URL", again.url)
            q = flare.Queue.from_name("durable")
            assert q.len() == 49 and q.len(total=True) == 51
            assert q.get_many(100) == list(range(1, 50))
            assert q.get(partition="p") == "x"
        finally:
            again.stop()
    finally:
        own.stop()
        remove_home(home)

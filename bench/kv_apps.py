"""The functions `bench/kv.py` runs inside containers: the same one-op-per-round-trip loops
as the client side, timed where they run."""

import time

import flare

app = flare.App("kvbench")


def _timed(op, n):
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        op(i)
        lat.append(time.perf_counter() - t)
    return lat, time.perf_counter() - t0


@app.function()
def dict_ops(name: str, n: int) -> dict:
    d = flare.Dict.from_name(name)
    d["warm"] = 1
    put, put_total = _timed(lambda i: d.__setitem__(f"c{i}", ("value", i)), n)
    get, get_total = _timed(lambda i: d[f"c{i}"], n)
    return {"put": put, "put_total": put_total, "get": get, "get_total": get_total}


@app.function()
def queue_ops(name: str, n: int) -> dict:
    q = flare.Queue.from_name(name)
    put, put_total = _timed(lambda i: q.put(("value", i)), n)
    get, get_total = _timed(lambda i: q.get(), n)
    return {"put": put, "put_total": put_total, "get": get, "get_total": get_total}

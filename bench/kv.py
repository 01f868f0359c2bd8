"""Dicts and Queues against Redis, side by side in one run.

    sudo python bench/kv.py              # ~2 minutes
    sudo python bench/kv.py --quick      # fewer operations

Starts its own `flared server` (bench.Server) and a Debian `redis-server` (apt; installed if
missing unless --no-install) with `appendonly yes, appendfsync everysec`: like Flare's
store, an acknowledged write is in the file before the answer, so it survives `kill -9` of
the server. Redis is driven from Python with a minimal RESP client over one socket (no
client library: less overhead than redis-py, so a strict baseline), with the same pickled
values and the same access pattern:

1. one operation per round trip from the client: Dict `d[k] = v` / `d[k]` vs SET / GET;
   Queue `put` / `get` vs RPUSH / LPOP (p50, p99, ops/s);
2. the same loops inside a container (`bench/kv_apps.py`): the API path containers take
   (Redis is not reachable from a container's network namespace, so no Redis column);
3. batched: Dict `update` of 10,000 items vs MSET; Queue `put_many` / `get_many` of
   5,000 (a partition's limit) vs RPUSH / LPOP count (items/s);
4. a producer thread and a blocked consumer thread: Queue `put` / `get` vs RPUSH / BLPOP
   (items/s through the queue).

Prints a table, writes bench/results/kv-<UTC>.json and bench/results/kv.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "python"))

import bench  # noqa: E402  (Server, helpers)

Json = dict[str, Any]
BATCH = 10_000
# A queue partition holds at most 5000 items (Modal's limit).
QBATCH = 5_000


def find_or_install_redis(allow_install: bool) -> str | None:
    r = shutil.which("redis-server")
    if r or not allow_install:
        return r
    subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return shutil.which("redis-server")


class Resp:
    """A minimal RESP2 client: one socket, one command at a time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.sock.makefile("rb")

    def cmd(self, *args: bytes | str | int) -> Any:
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(parts))
        return self._read()

    def _read(self) -> Any:
        line = self.f.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RuntimeError(f"bad RESP line {line!r}")

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def start_redis(binary: str) -> tuple[subprocess.Popen[bytes], int, str]:
    port = bench.free_port()
    work = tempfile.mkdtemp(prefix="flare-kvbench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", work, "--save", "",
         "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        try:
            c = Resp(port)
            ok = c.cmd("PING") == b"PONG"
            c.close()
            return ok
        except OSError:
            return False

    if not bench.wait_until(up, 20, 0.05):
        proc.kill()
        raise SystemExit("redis-server did not answer PING in 20 s")
    return proc, port, work


def timed(op: Callable[[int], Any], n: int) -> tuple[list[float], float]:
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        op(i)
        lat.append(time.perf_counter() - t)
    return lat, time.perf_counter() - t0


def ops(lat: list[float], total: float) -> Json:
    s = bench.summary_ms(lat)
    s["ops_per_s"] = len(lat) / total
    return s


def value(i: int) -> bytes:
    return pickle.dumps(("value", i))


def single_ops(n: int, r: Resp) -> Json:
    import flare

    out: Json = {}
    name = f"kvbench-{os.getpid()}"
    d = flare.Dict.from_name(name, create_if_missing=True)
    d["warm"] = 1
    r.cmd("SET", "warm", value(0))
    fl_put = timed(lambda i: d.__setitem__(f"k{i}", ("value", i)), n)
    rd_put = timed(lambda i: r.cmd("SET", f"k{i}", value(i)), n)
    fl_get = timed(lambda i: d[f"k{i}"], n)
    rd_get = timed(lambda i: pickle.loads(r.cmd("GET", f"k{i}")), n)
    out["dict_put"] = {"flare": ops(*fl_put), "redis": ops(*rd_put)}
    out["dict_get"] = {"flare": ops(*fl_get), "redis": ops(*rd_get)}
    q = flare.Queue.from_name(name, create_if_missing=True)
    fq_put = timed(lambda i: q.put(("value", i)), n)
    rq_put = timed(lambda i: r.cmd("RPUSH", "q", value(i)), n)
    fq_get = timed(lambda i: q.get(), n)
    rq_get = timed(lambda i: pickle.loads(r.cmd("LPOP", "q")), n)
    out["queue_put"] = {"flare": ops(*fq_put), "redis": ops(*rq_put)}
    out["queue_get"] = {"flare": ops(*fq_get), "redis": ops(*rq_get)}
    return out


def batched(rounds: int, r: Resp) -> Json:
    import flare

    name = f"kvbench-batch-{os.getpid()}"
    d = flare.Dict.from_name(name, create_if_missing=True)
    q = flare.Queue.from_name(name, create_if_missing=True)
    res: dict[str, list[float]] = {k: [] for k in ("dict_update_flare", "dict_update_redis", "queue_put_many_flare",
                                                   "queue_put_many_redis", "queue_get_many_flare",
                                                   "queue_get_many_redis")}
    for k in range(rounds):
        items = {f"b{k}-{i}": ("value", i) for i in range(BATCH)}
        t = time.perf_counter()
        d.update(items)
        res["dict_update_flare"].append(time.perf_counter() - t)
        flat: list[bytes | str | int] = ["MSET"]
        t = time.perf_counter()
        for key, v in items.items():
            flat += [key, pickle.dumps(v)]
        r.cmd(*flat)
        res["dict_update_redis"].append(time.perf_counter() - t)
        vals = [("value", i) for i in range(QBATCH)]
        t = time.perf_counter()
        q.put_many(vals)
        res["queue_put_many_flare"].append(time.perf_counter() - t)
        t = time.perf_counter()
        r.cmd("RPUSH", "bq", *[pickle.dumps(v) for v in vals])
        res["queue_put_many_redis"].append(time.perf_counter() - t)
        t = time.perf_counter()
        got = q.get_many(QBATCH)
        res["queue_get_many_flare"].append(time.perf_counter() - t)
        assert len(got) == QBATCH, len(got)
        t = time.perf_counter()
        got_r = [pickle.loads(b) for b in r.cmd("LPOP", "bq", QBATCH)]
        res["queue_get_many_redis"].append(time.perf_counter() - t)
        assert len(got_r) == QBATCH
    n = {k: BATCH if k.startswith("dict") else QBATCH for k in res}
    return {k: {"items": n[k], "items_per_s": n[k] / bench.percentile(v, 50), "p50_ms": bench.percentile(v, 50) * 1000}
            for k, v in res.items()}


def producer_consumer(n: int, port: int) -> Json:
    import flare

    q = flare.Queue.from_name(f"kvbench-pc-{os.getpid()}", create_if_missing=True)

    def run(put: Callable[[int], Any], get: Callable[[], Any]) -> float:
        got: list[Any] = []
        consumer = threading.Thread(target=lambda: got.extend(get() for _ in range(n)))
        t0 = time.perf_counter()
        consumer.start()
        for i in range(n):
            put(i)
        consumer.join()
        elapsed = time.perf_counter() - t0
        assert len(got) == n
        return n / elapsed

    fl = run(lambda i: q.put(("value", i)), lambda: q.get(timeout=30))
    prod, cons = Resp(port), Resp(port)
    rd = run(lambda i: prod.cmd("RPUSH", "pc", value(i)), lambda: pickle.loads(cons.cmd("BLPOP", "pc", 30)[1]))
    prod.close()
    cons.close()
    return {"flare_items_per_s": fl, "redis_items_per_s": rd}


def in_container(n: int) -> Json:
    import flare
    import kv_apps

    name = f"kvbench-ctr-{os.getpid()}"
    flare.Dict.from_name(name, create_if_missing=True).hydrate()
    flare.Queue.from_name(name, create_if_missing=True).hydrate()
    with kv_apps.app.run():
        kv_apps.dict_ops.remote(name, 10)  # a warm container
        d = kv_apps.dict_ops.remote(name, n)
        q = kv_apps.queue_ops.remote(name, n)
    return {"dict_put": ops(d["put"], d["put_total"]), "dict_get": ops(d["get"], d["get_total"]),
            "queue_put": ops(q["put"], q["put_total"]), "queue_get": ops(q["get"], q["get_total"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ops", type=int, default=3000)
    ap.add_argument("--batch-rounds", type=int, default=5)
    ap.add_argument("--no-install", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.ops, args.batch_rounds = 500, 2
    redis_bin = find_or_install_redis(not args.no_install)
    if redis_bin is None:
        raise SystemExit("redis-server not found (apt-get install redis-server)")
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    version = subprocess.run([redis_bin, "--version"], capture_output=True, text=True).stdout.strip()
    server = bench.Server(bench.find_flared())
    server.start()
    os.environ["FLARE_SERVER_URL"] = server.url
    os.environ["FLARE_HOME"] = server.home
    redis, port, work = start_redis(redis_bin)
    r = Resp(port)
    results: Json = {"started_at_utc": started, "machine": bench.machine_info(), "redis": version,
                     "ops": args.ops, "batch": BATCH}
    try:
        results["single"] = single_ops(args.ops, r)
        results["batched"] = batched(args.batch_rounds, r)
        results["producer_consumer"] = producer_consumer(args.ops, port)
        results["container"] = in_container(args.ops)
    finally:
        r.close()
        redis.terminate()
        redis.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
        server.stop()
    print(table(results))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    stamp = started.replace(":", "").replace("-", "")
    for path in (os.path.join(HERE, "results", f"kv-{stamp}.json"), os.path.join(HERE, "results", "kv.json")):
        with open(path, "w") as fh:
            json.dump(results, fh, indent=2)
            fh.write("\n")
    print(f"\nwrote bench/results/kv-{stamp}.json and bench/results/kv.json")
    return 0


def table(r: Json) -> str:
    lines = [f"baseline: {r['redis']} (appendonly, everysec), minimal RESP client; {r['ops']} ops each", "",
             f"{'one op per round trip':<26}{'flare p50':>11}{'redis p50':>11}{'flare p99':>11}{'redis p99':>11}"
             f"{'flare ops/s':>13}{'redis ops/s':>13}{'ratio':>7}"]
    for k, v in r["single"].items():
        f, d = v["flare"], v["redis"]
        lines.append(f"{k + ' (client)':<26}{f['p50_ms']:>11.3f}{d['p50_ms']:>11.3f}{f['p99_ms']:>11.3f}{d['p99_ms']:>11.3f}"
                     f"{f['ops_per_s']:>13.0f}{d['ops_per_s']:>13.0f}{f['ops_per_s'] / d['ops_per_s']:>7.2f}")
    for k, f in r["container"].items():
        lines.append(f"{k + ' (container)':<26}{f['p50_ms']:>11.3f}{'-':>11}{f['p99_ms']:>11.3f}{'-':>11}"
                     f"{f['ops_per_s']:>13.0f}{'-':>13}{'':>7}")
    b = r["batched"]
    lines += ["", f"{'batched (items a call)':<26}{'flare items/s':>15}{'redis items/s':>15}{'ratio':>7}"]
    for k in ("dict_update", "queue_put_many", "queue_get_many"):
        f, d = b[f"{k}_flare"]["items_per_s"], b[f"{k}_redis"]["items_per_s"]
        lines.append(f"{k + ' (' + str(b[k + '_flare']['items']) + ')':<26}{f:>15.0f}{d:>15.0f}{f / d:>7.2f}")
    pc = r["producer_consumer"]
    lines.append(f"{'producer -> consumer':<26}{pc['flare_items_per_s']:>15.0f}{pc['redis_items_per_s']:>15.0f}"
                 f"{pc['flare_items_per_s'] / pc['redis_items_per_s']:>7.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Volumes through the API (mounts in containers are not there yet: docs/VOLUMES.md).

    sudo python bench/volumes.py            # ~2 minutes, 1 GiB of temporary files
    sudo python bench/volumes.py --quick    # 256 MiB

Starts its own `flared server` (bench.Server) and measures, from a client on this machine:

1. upload and commit of one large file of random bytes (`batch_upload().put_file`: chunked
   and hashed locally, missing chunks uploaded, one commit), next to copying the same file
   on the local disk (`cp`, page cache dropped before each);
2. the same file uploaded again into another path (every chunk is already in the store:
   the upload is a hash pass and one commit);
3. reading it back with `read_file` (streamed over HTTP) vs reading the local file, page
   cache dropped before each and warm (second read);
4. one commit of 10,000 small files (`put_directory`: one upload check, one commit).

Prints a table, writes bench/results/volumes-<UTC>.json and bench/results/volumes.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "python"))

import bench  # noqa: E402  (Server, helpers)

Json = dict[str, Any]


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: the cold numbers are warm then (noted in the JSON)


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def read_local(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=10_000)
    args = ap.parse_args(argv)
    if args.quick:
        args.mib = 256
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    work = tempfile.mkdtemp(prefix="flare-volbench-")
    server = bench.Server(bench.find_flared())
    server.start()
    os.environ["FLARE_SERVER_URL"] = server.url
    os.environ["FLARE_HOME"] = server.home
    results: Json = {"started_at_utc": started, "machine": bench.machine_info(), "mib": args.mib,
                     "files": args.files, "root": os.geteuid() == 0}
    try:
        import flare

        big = os.path.join(work, "big.bin")
        with open(big, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        size = os.path.getsize(big)
        vol = flare.Volume.from_name(f"volbench-{os.getpid()}", create_if_missing=True)

        def upload(remote: str) -> None:
            with vol.batch_upload() as b:
                b.put_file(big, remote)

        drop_caches()
        t_upload = timed(lambda: upload("/big.bin"))
        drop_caches()
        t_cp = timed(lambda: subprocess.run(["cp", big, big + ".copy"], check=True))
        os.unlink(big + ".copy")
        t_again = timed(lambda: upload("/again/big.bin"))

        def read_vol() -> None:
            n = 0
            for piece in vol.read_file("/big.bin"):
                n += len(piece)
            assert n == size, n

        drop_caches()
        t_read_cold = timed(read_vol)
        t_read_warm = timed(read_vol)
        drop_caches()
        t_local_cold = timed(lambda: read_local(big))
        t_local_warm = timed(lambda: read_local(big))
        mb = size / 1e6
        results["large"] = {
            "upload_commit_s": t_upload, "upload_mb_s": mb / t_upload, "local_cp_s": t_cp, "local_cp_mb_s": mb / t_cp,
            "reupload_same_content_s": t_again,
            "read_cold_mb_s": mb / t_read_cold, "read_warm_mb_s": mb / t_read_warm,
            "local_read_cold_mb_s": mb / t_local_cold, "local_read_warm_mb_s": mb / t_local_warm,
        }
        os.unlink(big)
        small = os.path.join(work, "small")
        for i in range(args.files):
            d = os.path.join(small, f"d{i // 1000}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"f{i}.txt"), "wb") as f:
                f.write(f"file {i}\n".encode() * 8)

        def put_tree() -> None:
            with vol.batch_upload() as b:
                b.put_directory(small, "/tree")

        t_tree = timed(put_tree)
        from flare.volume import FileEntryType

        assert len([e for e in vol.listdir("/tree", recursive=True) if e.type == FileEntryType.FILE]) \
            == args.files
        results["small_files"] = {"files": args.files, "commit_s": t_tree}
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    stamp = started.replace(":", "").replace("-", "")
    for path in (os.path.join(HERE, "results", f"volumes-{stamp}.json"), os.path.join(HERE, "results", "volumes.json")):
        with open(path, "w") as fh:
            json.dump(results, fh, indent=2)
            fh.write("\n")
    print(f"\nwrote bench/results/volumes-{stamp}.json and bench/results/volumes.json")
    return 0


def table(r: Json) -> str:
    g = r["large"]
    lines = [f"one {r['mib']} MiB file of random bytes, from a client on this machine", "",
             f"{'':<34}{'volume':>12}{'local disk':>12}{'ratio':>8}",
             f"{'write (upload+commit / cp), MB/s':<34}{g['upload_mb_s']:>12.0f}{g['local_cp_mb_s']:>12.0f}"
             f"{g['upload_mb_s'] / g['local_cp_mb_s']:>8.2f}",
             f"{'read, cold, MB/s':<34}{g['read_cold_mb_s']:>12.0f}{g['local_read_cold_mb_s']:>12.0f}"
             f"{g['read_cold_mb_s'] / g['local_read_cold_mb_s']:>8.2f}",
             f"{'read, warm, MB/s':<34}{g['read_warm_mb_s']:>12.0f}{g['local_read_warm_mb_s']:>12.0f}"
             f"{g['read_warm_mb_s'] / g['local_read_warm_mb_s']:>8.2f}",
             f"{'same content again (dedup), s':<34}{g['reupload_same_content_s']:>12.2f}",
             "", f"commit of {r['small_files']['files']} small files (one batch): {r['small_files']['commit_s']:.2f} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

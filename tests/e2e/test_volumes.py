"""``flare.Volume`` end to end against a live flared server (see conftest.py)."""

from __future__ import annotations

import io
import os
import resource
import subprocess
import threading
import time
from pathlib import Path

import flare
import flare._transport
import pytest
from flare import exception

from .conftest import FLARED, Flared, Server, load_app, remove_home, run_cli, unique

APP = """
import flare

app = flare.App()


@app.function()
def read_passed(vol, path):
    data = b"".join(vol.read_file(path))
    names = sorted(e.path for e in vol.listdir("/", recursive=True))
    return data, names


@app.function()
def write_by_name(name):
    vol = flare.Volume.from_name(name)
    with vol.batch_upload(force=True) as b:
        b.put_file(__import__("io").BytesIO(b"made in a container" * 1000), "/from-container/x.bin")
    return [(e.path, e.size) for e in vol.listdir("/from-container")]
"""


def _read(vol: flare.Volume, path: str) -> bytes:
    return b"".join(vol.read_file(path))


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_batch_upload_listdir_read_round_trip(server: Server, tmp_path: Path) -> None:
    name = unique("vol")
    vol = flare.Volume.from_name(name, create_if_missing=True)
    local = tmp_path / "src"
    files = {
        "a.txt": b"alpha",
        "sub/b.bin": os.urandom(3 << 20),
        "sub/deeper/c": b"",
        "sub/d.txt": b"delta" * 100,
    }
    _tree(local, files)
    single = tmp_path / "one.txt"
    single.write_bytes(b"just one file")
    with vol.batch_upload() as batch:
        batch.put_directory(local, "/data")
        batch.put_file(single, "/one.txt")
        batch.put_file(io.BytesIO(b"in memory"), "/mem/x")
        batch.put_file(str(single), "/copies/")
    top = vol.listdir("/")
    assert sorted(e.path for e in top) == ["copies", "data", "mem", "one.txt"]
    kinds = {e.path: e.type for e in top}
    assert (
        kinds["data"] == flare.volume.FileEntryType.DIRECTORY
        and kinds["one.txt"] == flare.volume.FileEntryType.FILE
    )
    listed = {e.path: e for e in vol.listdir("/data", recursive=True)}
    assert set(listed) == {
        "data/a.txt",
        "data/sub",
        "data/sub/b.bin",
        "data/sub/deeper",
        "data/sub/deeper/c",
        "data/sub/d.txt",
    }
    assert (
        listed["data/sub/b.bin"].size == 3 << 20 and listed["data/sub/b.bin"].mtime > 0
    )
    for rel, data in files.items():
        assert _read(vol, f"/data/{rel}") == data, rel
    assert (
        _read(vol, "one.txt") == b"just one file"
        and _read(vol, "/copies/one.txt") == b"just one file"
    )
    assert _read(vol, "/mem/x") == b"in memory"
    assert [e.path for e in vol.listdir("/one.txt")] == ["one.txt"]
    assert list(vol.iterdir("/data/sub/deeper")) == vol.listdir("/data/sub/deeper")
    # Missing paths are FileNotFoundError; escaping paths are refused.
    with pytest.raises(FileNotFoundError, match="nope"):
        vol.listdir("/nope")
    with pytest.raises(FileNotFoundError):
        _read(vol, "/data/nope.txt")
    with pytest.raises(IsADirectoryError):
        _read(vol, "/data")
    with pytest.raises(exception.InvalidError, match=r"\.\."):
        vol.listdir("/../etc")
    with pytest.raises(exception.InvalidError), vol.batch_upload(force=True) as batch:
        batch.put_file(single, "/a/../../escape")
    # Without force an existing file fails the whole batch; with force it is replaced.
    with pytest.raises(FileExistsError, match="one.txt"), vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"new"), "/new-file")
        batch.put_file(io.BytesIO(b"replaced"), "/one.txt")
    with pytest.raises(FileNotFoundError):
        vol.listdir("/new-file")
    with vol.batch_upload(force=True) as batch:
        batch.put_file(io.BytesIO(b"replaced"), "/one.txt")
    assert _read(vol, "/one.txt") == b"replaced"
    flare.Volume.delete(name)
    with pytest.raises(exception.NotFoundError, match=name):
        flare.Volume.from_name(name).listdir("/")


def test_aio_and_ephemeral(server: Server) -> None:
    import asyncio

    with flare.Volume.ephemeral() as vol:

        async def main() -> tuple[list[str], bytes]:
            async with vol.batch_upload() as b:
                b.put_file(io.BytesIO(b"async"), "/f")
            names = [e.path for e in await vol.listdir.aio("/")]
            data = b"".join([p async for p in vol.read_file.aio("/f")])
            await vol.reload.aio()
            return names, data

        assert asyncio.run(main()) == (["f"], b"async")
        vid = vol.object_id
    assert vid
    with pytest.raises(exception.NotFoundError):
        vol.listdir("/")


def test_big_file_streams(server: Server, tmp_path: Path) -> None:
    vol = flare.Volume.from_name(unique("vol-big"), create_if_missing=True)
    big = tmp_path / "big.bin"
    size = 200 << 20
    block = os.urandom(1 << 20)
    with open(big, "wb") as fh:
        fh.writelines(i.to_bytes(8, "little") + block[8:] for i in range(size >> 20))
    try:
        with vol.batch_upload() as b:
            b.put_file(big, "/big.bin")
        assert vol.listdir("/big.bin")[0].size == size
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
        got, pieces, largest = 0, 0, 0
        with open(big, "rb") as fh:
            for piece in vol.read_file("/big.bin"):
                assert piece == fh.read(len(piece))
                got += len(piece)
                pieces += 1
                largest = max(largest, len(piece))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert got == size and pieces >= 100 and largest <= 1 << 20
        assert (after - before) * 1024 < 64 << 20, (
            f"reading grew the peak RSS by {(after - before) >> 10} MiB"
        )
    finally:
        big.unlink()
        vol.remove_file("/big.bin")


def test_concurrent_commits_merge_per_file(server: Server) -> None:
    name = unique("vol-conc")
    vol = flare.Volume.from_name(name, create_if_missing=True)
    with vol.batch_upload() as b:
        b.put_file(io.BytesIO(b"base"), "/base")
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def writer(path: str, data: bytes) -> None:
        try:
            v = flare.Volume.from_name(name)  # each writer knows the same base version
            v.reload()
            start.wait()
            with v.batch_upload(force=True) as b:
                b.put_file(io.BytesIO(data), path)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [
        threading.Thread(target=writer, args=(f"/w{i}", f"writer {i}".encode()))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(e.path for e in vol.listdir("/")) == ["base", "w0", "w1"]
    assert _read(vol, "/w0") == b"writer 0" and _read(vol, "/w1") == b"writer 1"
    # The same file twice: the later commit wins.
    for data in (b"first", b"second"):
        with flare.Volume.from_name(name).batch_upload(force=True) as b:
            b.put_file(io.BytesIO(data), "/same")
    assert _read(vol, "/same") == b"second"


def test_remove_and_copy(server: Server) -> None:
    vol = flare.Volume.from_name(unique("vol-rm"), create_if_missing=True)
    with vol.batch_upload() as b:
        for p in ("/d/a", "/d/b", "/d/sub/c", "/top"):
            b.put_file(io.BytesIO(p.encode()), p)
    vol.reload()
    v0 = vol._version
    vol.remove_file("/d/a")
    assert vol._version == v0 + 1
    with pytest.raises(FileNotFoundError, match="/d/a"):
        vol.remove_file("/d/a")
    with pytest.raises(exception.InvalidError, match="recursive"):
        vol.remove_file("/d")
    vol.copy_files(["/top"], "/top2")
    vol.copy_files(["/top", "/d/b"], "/d/sub")
    with pytest.raises(IsADirectoryError):
        vol.copy_files(["/d"], "/e")
    vol.copy_files(["/d"], "/e", recursive=True)
    assert (
        _read(vol, "/top2") == b"/top"
        and _read(vol, "/d/sub/b") == b"/d/b"
        and _read(vol, "/d/sub/top") == b"/top"
    )
    assert sorted(e.path for e in vol.listdir("/e", recursive=True)) == [
        "e/b",
        "e/sub",
        "e/sub/b",
        "e/sub/c",
        "e/sub/top",
    ]
    with pytest.raises(FileNotFoundError):
        vol.copy_files(["/missing"], "/x")
    vol.remove_file("/d", recursive=True)
    assert sorted(e.path for e in vol.listdir("/")) == ["e", "top", "top2"]


def test_volume_used_inside_a_function(server: Server, tmp_path: Path) -> None:
    mod = load_app(tmp_path, APP)
    name = unique("vol-fn")
    vol = flare.Volume.from_name(name, create_if_missing=True)
    with vol.batch_upload() as b:
        b.put_file(io.BytesIO(b"hello from the client"), "/in/hello.txt")
    with mod.app.run():
        data, names = mod.read_passed.remote(vol, "/in/hello.txt")
        assert data == b"hello from the client" and names == ["in", "in/hello.txt"]
        assert mod.write_by_name.remote(name) == [("from-container/x.bin", 19000)]
    assert _read(vol, "/from-container/x.bin") == b"made in a container" * 1000


def test_not_found_names_the_volume(server: Server) -> None:
    name = unique("nope")
    with pytest.raises(exception.NotFoundError, match=name):
        flare.Volume.from_name(name).listdir("/")
    with pytest.raises(exception.NotFoundError):
        flare.Volume.delete(name)


def test_cli_round_trip(server: Server, tmp_path: Path) -> None:
    name = unique("vol-cli")
    r = run_cli("volume", "create", name)
    assert r.returncode == 0 and "Created" in r.stdout, r.stderr
    src = tmp_path / "src"
    _tree(src, {"x.txt": b"ex", "dir/y.txt": b"why"})
    r = run_cli("volume", "put", name, str(src), "/up")
    assert r.returncode == 0 and "Uploaded 2 files" in r.stdout, r.stderr
    r = run_cli("volume", "put", name, str(src / "x.txt"), "/up/x.txt")
    assert r.returncode == 1 and "already exists" in r.stderr, r.stdout + r.stderr
    r = run_cli("volume", "ls", name, "/up", "-r")
    assert (
        r.returncode == 0 and "/up/dir/y.txt" in r.stdout and "/up/x.txt" in r.stdout
    ), r.stderr
    out = tmp_path / "out"
    r = run_cli("volume", "get", name, "/up", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "x.txt").read_bytes() == b"ex" and (
        out / "dir" / "y.txt"
    ).read_bytes() == b"why"
    r = run_cli("volume", "get", name, "/up/x.txt", "-")
    assert r.returncode == 0 and r.stdout == "ex", r.stderr
    r = run_cli("volume", "cp", name, "/up/x.txt", "/x2.txt")
    assert r.returncode == 0, r.stderr
    r = run_cli("volume", "rm", name, "/up", "-r")
    assert r.returncode == 0, r.stderr
    r = run_cli("volume", "rm", name, "/up")
    assert r.returncode == 1 and "no file or directory" in r.stderr
    r = run_cli("volume", "ls", name)
    assert r.returncode == 0 and "/x2.txt" in r.stdout and "/up" not in r.stdout, (
        r.stderr
    )
    r = run_cli("volume", "list")
    assert r.returncode == 0 and name in r.stdout
    r = run_cli("volume", "delete", name, "--yes")
    assert r.returncode == 0, r.stderr
    r = run_cli("volume", "ls", name)
    assert r.returncode == 1 and "no volume named" in r.stderr


def test_ten_thousand_files_in_one_commit(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "many"
    for i in range(100):
        d = src / f"d{i:02d}"
        d.mkdir(parents=True)
        for j in range(100):
            (d / f"f{j:02d}").write_bytes(f"file {i} {j}".encode())
    vol = flare.Volume.from_name(unique("vol-many"), create_if_missing=True)
    commits: list[str] = []
    real = flare._transport.Client.request

    def counting(
        self: flare._transport.Client, method: str, path: str, *a: object, **k: object
    ) -> object:
        if path.endswith("/commit"):
            commits.append(path)
        return real(self, method, path, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(flare._transport.Client, "request", counting)
    t0 = time.monotonic()
    with vol.batch_upload() as b:
        b.put_directory(src, "/many")
    took = time.monotonic() - t0
    assert len(commits) == 1 and b.commits == 1
    listed = vol.listdir("/many", recursive=True)
    assert sum(1 for e in listed if e.type == flare.volume.FileEntryType.FILE) == 10_000
    assert _read(vol, "/many/d42/f07") == b"file 42 7"
    print(f"10,000 files uploaded and committed in {took:.2f}s")


def test_commits_survive_kill_9(monkeypatch: pytest.MonkeyPatch) -> None:
    own = Flared()
    home = own.home
    try:
        own.wait()
        monkeypatch.setenv("FLARE_SERVER_URL", own.url)
        vol = flare.Volume.from_name("durable", create_if_missing=True)
        with vol.batch_upload() as b:
            b.put_file(io.BytesIO(b"kept" * 1000), "/k/kept.bin")
        vol.remove_file("/k/kept.bin")
        with vol.batch_upload() as b:
            b.put_file(io.BytesIO(b"survives"), "/k/survives")
        version = vol._version
        own.stop(kill=True)
        # Garbage collection keeps what the volume's current version reaches (and only
        # that: the removed file's blob goes).
        gc = subprocess.run(
            [str(FLARED), "gc", "--home", home, "--grace-secs", "0"],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert gc.returncode == 0, gc.stderr
        assert " 0 deleted" not in gc.stdout, gc.stdout
        again = Flared(home=home)
        try:
            again.wait()
            monkeypatch.setenv("FLARE_SERVER_URL", again.url)
            vol = flare.Volume.from_name("durable")
            vol.reload()
            assert vol._version == version == 3
            assert [e.path for e in vol.listdir("/k")] == ["k/survives"]
            assert _read(vol, "/k/survives") == b"survives"
        finally:
            again.stop()
    finally:
        own.stop()
        remove_home(home)

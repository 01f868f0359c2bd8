"""Capturing the caller's Python environment (flare._localenv), without a server."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import cloudpickle  # noqa: F401 - imported before tests replace sys.path
import pytest

import flare
from flare import _localenv, exception
from flare._blobs import HashCache
from flare._localenv import capture, fingerprint, python_roots, scan_root

OLD = time.time_ns() - 3600 * 10**9  # an mtime old enough for the caches to trust


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLARE_HOME", str(tmp_path / "home"))
    for var in ("FLARE_FORCE_BUILD", "FLARE_IS_REMOTE", "FLARE_LOCAL_PYTHON", "FLARE_LOCAL_PYTHON_MAX_FILES"):
        monkeypatch.delenv(var, raising=False)


def digest(data: bytes) -> str:
    import blake3

    return "blake3:" + blake3.blake3(data).hexdigest()


def write(path: Path, data: bytes, mtime_ns: int = OLD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def make_env(root: Path) -> Path:
    """A small venv-like tree."""
    sp = root / "lib/python3.11/site-packages"
    write(sp / "pkg/__init__.py", b"X = 1\n")
    write(sp / "pkg/mod.py", b"def f():\n    return 2\n")
    write(sp / "pkg/__pycache__/mod.cpython-311.pyc", b"pyc")
    write(sp / "pkg/data.bin", b"\0" * 5000)
    (root / "bin").mkdir(parents=True)
    write(root / "bin/tool", b"#!/bin/sh\n").chmod(0o755)
    os.symlink("/usr/bin/python3", root / "bin/python")
    os.symlink("python", root / "bin/python3")
    for d in (root / "lib", sp, sp / "pkg", sp / "pkg/__pycache__", root / "bin"):
        os.utime(d, ns=(OLD, OLD))
    return root


def scans_of(root: Path) -> list[tuple[str, list[Any]]]:
    return [(str(root), scan_root(str(root)))]


class EnvClient:
    """Stands in for the server: blobs, the images probe and local_python builds."""

    url = "http://fake:6000"

    def __init__(self, images: bool = True) -> None:
        self.images = images
        self.have: set[str] = set()
        self.puts: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []
        self.builds: list[dict[str, Any]] = []
        self.keys: dict[str, str] = {}  # base_key -> image id

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None,
                content_type: str | None = None) -> Any:
        if hasattr(body, "read"):
            body = body.read()
        self.calls.append((method, path))
        if not self.images:
            raise exception.NotFoundError(f"{method} {path}: not found")
        if (method, path) == ("GET", "/v1/images"):
            return {"images": []}
        if path == "/v1/blobs/missing":
            return {"missing": [d for d in body["digests"] if d not in self.have]}
        if method == "PUT" and path.startswith("/v1/blobs/"):
            d = path[len("/v1/blobs/"):]
            assert d == digest(body)
            self.puts[d] = body
            self.have.add(d)
            return {"digest": d, "size": len(body)}
        if (method, path) == ("POST", "/v1/blobs/batch"):
            from test_image import split_batch

            got = split_batch(body)
            self.puts.update(got)
            self.have.update(got)
            return {"stored": len(got)}
        raise AssertionError(f"unexpected request {method} {path}")

    def stream_ndjson(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Iterator[Any]:
        assert (method, path) == ("POST", "/v1/images/build")
        self.calls.append((method, path))
        if not self.images:
            raise exception.NotFoundError("POST /v1/images/build: not found")
        self.builds.append(body)
        base = body["base"]
        assert base["type"] == "local_python" and body["layers"] == [] and body["mounts"] == []
        if "key" in base:
            assert "roots" not in base
            if base["key"] not in self.keys:
                yield {"type": "error", "code": "unknown_base", "message": f"unknown base {base['key']}"}
                return
            key = base["key"]
        else:
            for root in base["roots"]:
                for e in root["entries"]:
                    if e["kind"] == "file":
                        assert e["digest"] in self.have, e  # uploaded before the build
            import json

            key = "bk-" + digest(json.dumps(base["roots"], sort_keys=True).encode())[7:19]
            self.keys.setdefault(key, f"im-{len(self.keys) + 1}")
        yield {"type": "step", "index": 0, "total": 1, "description": "local python", "cached": "key" in base}
        yield {"type": "done", "image_id": self.keys[key], "python": base["python"], "seconds": 0.0, "base_key": key}

    def short_builds(self) -> int:
        return sum("key" in b["base"] for b in self.builds)

    def full_builds(self) -> int:
        return sum("roots" in b["base"] for b in self.builds)


# ------------------------------------------------------------------ roots


def test_roots_rule(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    sp = venv / "lib/python3.11/site-packages"
    sp.mkdir(parents=True)
    (venv / "bin").mkdir()
    other = tmp_path / "src"
    other.mkdir()
    (tmp_path / "link").symlink_to(other)
    exe = str(venv / "bin/python3")
    roots = python_roots(exe, [str(sp), "/usr/lib/python3.11", "/nonexistent", "relative", str(tmp_path / "link"),
                               str(other), "/", "/opt", "/etc/x"])
    assert roots == sorted([str(venv), str(other)])
    # A system interpreter without a venv: nothing to capture.
    assert python_roots("/usr/bin/python3", ["/usr/lib/python3.11", "/usr/lib/python3/dist-packages"]) == []
    assert python_roots("", []) == []
    # Nested dirs collapse into their ancestor; a sibling with a common string prefix does not.
    (tmp_path / "venv-2").mkdir()
    assert python_roots(exe, [str(tmp_path / "venv-2"), str(sp)]) == [str(venv), str(tmp_path / "venv-2")]


def test_local_roots_leave_out_the_entry_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    monkeypatch.setattr(sys, "executable", str(venv / "bin/python"))
    monkeypatch.setattr(sys, "path", [str(app_dir), str(venv / "lib")])
    monkeypatch.setattr(_localenv, "environment_prefixes", lambda: [])
    (venv / "lib").mkdir()
    assert _localenv.local_roots(str(app_dir)) == [str(venv)]
    assert _localenv.local_roots(None) == sorted([str(venv), str(app_dir)])


def test_environment_prefixes_follow_the_interpreter_and_the_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A venv whose python is a chain of symlinks (bin/python -> python3 -> ../../links/py ->
    # the real interpreter), over a base prefix outside /usr: the capture takes the base
    # prefix, the real interpreter's prefix and every dir that holds a link of the chain.
    real = os.path.realpath(sys.executable)
    base = os.path.dirname(os.path.dirname(real))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    links = tmp_path / "links"
    links.mkdir()
    (links / "py").symlink_to(real)
    (venv / "bin/python3").symlink_to("../../links/py")
    (venv / "bin/python").symlink_to("python3")
    monkeypatch.setattr(sys, "executable", str(venv / "bin/python"))
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "exec_prefix", str(venv))
    monkeypatch.setattr(sys, "base_prefix", base)
    monkeypatch.setattr(sys, "base_exec_prefix", base)
    got = _localenv.environment_prefixes()
    for want in (str(venv), base, str(venv / "bin"), str(links)):
        assert want in got, (want, got)
    roots = python_roots(sys.executable, [], got)
    assert str(venv) in roots and str(links) in roots
    assert any(base == r or base.startswith(r + "/") for r in roots) or base.startswith("/usr/"), roots


@pytest.mark.parametrize("broken", ["base_prefix", "dangling_link"])
def test_a_missing_part_of_the_environment_is_named_at_capture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    if broken == "base_prefix":
        missing = str(tmp_path / "gone/python-3.12")
        monkeypatch.setattr(sys, "base_prefix", missing)
        monkeypatch.setattr(sys, "base_exec_prefix", missing)
    else:
        missing = str(tmp_path / "deleted-python")
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin/python").symlink_to(missing)
        monkeypatch.setattr(sys, "executable", str(tmp_path / "bin/python"))
    with pytest.raises(exception.InvalidError, match="cannot be captured") as e:
        _localenv.environment_prefixes()
    assert str(tmp_path / "gone") in str(e.value) or missing in str(e.value), e.value


# ------------------------------------------------------------------ scanning and fingerprints


def test_scan_records_and_never_follows_symlinks(tmp_path: Path) -> None:
    root = make_env(tmp_path / "env")
    outside = tmp_path / "outside"
    write(outside / "secret.txt", b"not part of the env")
    os.symlink(str(outside), root / "lib/linked-dir")
    os.symlink("nowhere", root / "bin/dangling")
    fifo = root / "bin/fifo"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock_path = root / "bin/sock"
    try:
        sock.bind(str(sock_path))
    except OSError:
        sock_path = None  # type: ignore[assignment]
    recs = {r[0]: r for r in scan_root(str(root))}
    assert recs["lib/linked-dir"][5] == str(outside)
    assert not any(p.startswith("lib/linked-dir/") for p in recs)
    assert recs["bin/dangling"][5] == "nowhere" and recs["bin/python"][5] == "/usr/bin/python3"
    assert "bin/fifo" not in recs and "bin/sock" not in recs
    assert recs["lib/python3.11/site-packages/pkg/__pycache__/mod.cpython-311.pyc"][1] == _localenv.PENDING
    order = [r[0] for r in scan_root(str(root))]
    for i, p in enumerate(order):
        parent = p.rsplit("/", 1)[0]
        if "/" in p:
            assert order.index(parent) < i  # parents first
    sock.close()

    spec_roots, sources, files, hashed = _localenv._file_lists([(str(root), scan_root(str(root)))], HashCache())
    entries = {e["path"]: e for e in spec_roots[0]["entries"]}
    paths = [e["path"] for e in spec_roots[0]["entries"]]
    assert paths == sorted(paths)
    assert entries["lib/linked-dir"] == {"path": "lib/linked-dir", "kind": "symlink", "target": str(outside)}
    assert entries["bin/python3"] == {"path": "bin/python3", "kind": "symlink", "target": "python"}
    assert entries["bin/tool"]["mode"] == 0o755 and entries["bin/tool"]["kind"] == "file"
    assert entries["bin"] == {"path": "bin", "kind": "dir", "mode": 0o755 & ~_umask()}
    pyc = entries["lib/python3.11/site-packages/pkg/__pycache__/mod.cpython-311.pyc"]
    assert pyc["digest"] == digest(b"pyc") and pyc["size"] == 3
    assert digest(b"not part of the env") not in sources
    assert files == 5 and hashed == 5
    assert set(sources) == {digest(b"X = 1\n"), digest(b"def f():\n    return 2\n"), digest(b"pyc"),
                            digest(b"\0" * 5000), digest(b"#!/bin/sh\n")}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_unreadable_and_vanishing_files_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_env(tmp_path / "env")
    gone = write(root / "gone.py", b"gone")
    secret = write(root / "secret.py", b"secret")
    scans = scans_of(root)
    gone.unlink()  # vanishes between the scan and the hashing
    real_open = open

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(secret):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    import builtins

    monkeypatch.setattr(builtins, "open", guarded_open)
    spec_roots, sources, files, _ = _localenv._file_lists(scans, HashCache())
    paths = {e["path"] for e in spec_roots[0]["entries"]}
    assert "gone.py" not in paths and "secret.py" not in paths and "bin/tool" in paths
    assert digest(b"secret") not in sources


def test_fingerprint_notices_edits_additions_removals(tmp_path: Path) -> None:
    root = make_env(tmp_path / "env")
    sp = root / "lib/python3.11/site-packages"

    def fp() -> str:
        return fingerprint("http://s", "/py", scans_of(root))

    base = fp()
    assert fp() == base  # stable while nothing changes
    # An edit in place (same size, only the mtime differs).
    write(sp / "pkg/mod.py", b"def f():\n    return 3\n", OLD + 10**9)
    edited = fp()
    assert edited != base
    # An addition (pip install), a removal, a chmod, a changed symlink.
    write(sp / "newpkg/__init__.py", b"")
    added = fp()
    assert added != edited
    (sp / "newpkg/__init__.py").unlink()
    (sp / "newpkg").rmdir()
    removed = fp()
    assert removed != added and removed == edited  # back to the earlier state (dir mtimes are not part of it)
    (root / "bin/tool").chmod(0o700)
    chmodded = fp()
    assert chmodded != removed
    os.unlink(root / "bin/python3")
    os.symlink("python3.11", root / "bin/python3")
    assert fp() != chmodded
    # A .pyc rewritten by CPython (an atomic rename): the dir and the inode change.
    pyc = sp / "pkg/__pycache__/mod.cpython-311.pyc"
    before = fp()
    tmp = pyc.with_name("mod.tmp")
    write(tmp, b"pyc2")
    os.replace(tmp, pyc)
    assert fp() != before
    # Server and interpreter are part of it.
    scans = scans_of(root)
    assert fingerprint("http://a", "/py", scans) != fingerprint("http://b", "/py", scans)
    assert fingerprint("http://a", "/py", scans) != fingerprint("http://a", "/py2", scans)


def test_removal_changes_fingerprint(tmp_path: Path) -> None:
    root = make_env(tmp_path / "env")
    before = fingerprint("s", "p", scans_of(root))
    (root / "lib/python3.11/site-packages/pkg/data.bin").unlink()
    assert fingerprint("s", "p", scans_of(root)) != before


# ------------------------------------------------------------------ capture


def test_capture_full_then_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_env(tmp_path / "env")
    client = EnvClient()
    image_id = capture(client, None, True, python="/env/bin/python", roots=[str(root)])  # type: ignore[arg-type]
    assert image_id == "im-1"
    assert client.full_builds() == 1 and client.short_builds() == 0
    full = client.builds[0]
    assert full["base"]["python"] == "/env/bin/python" and [r["path"] for r in full["base"]["roots"]] == [str(root)]
    assert set(client.puts) == {digest(b"X = 1\n"), digest(b"def f():\n    return 2\n"), digest(b"pyc"),
                                digest(b"\0" * 5000), digest(b"#!/bin/sh\n")}
    err = capsys.readouterr().err
    assert "=> capturing the local Python environment (5 files, 5 changed, " in err and "uploaded)" in err

    # Unchanged: only the short form, no hashing, no upload check.
    client.calls.clear()
    assert capture(client, None, True, python="/env/bin/python", roots=[str(root)]) == "im-1"  # type: ignore[arg-type]
    assert client.calls == [("POST", "/v1/images/build")]
    assert client.builds[-1] == {"base": {"type": "local_python", "python": "/env/bin/python", "key": next(iter(client.keys))},
                                 "layers": [], "mounts": []}
    assert "capturing" not in capsys.readouterr().err

    # Output off: nothing printed.
    capture(client, None, False, python="/env/bin/python", roots=[str(root)])  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""


def test_capture_rehashes_only_changed_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_env(tmp_path / "env")
    client = EnvClient()
    capture(client, None, False, python="/py", roots=[str(root)])  # type: ignore[arg-type]
    hashed: list[str] = []
    from flare import _blobs

    real = _blobs._hash_path_sized

    def counting(path: str) -> tuple[str, int]:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(_blobs, "_hash_path_sized", counting)
    mod = root / "lib/python3.11/site-packages/pkg/mod.py"
    write(mod, b"def f():\n    return 3\n", OLD + 10**9)
    client.calls.clear()
    puts_before = set(client.puts)
    image_id = capture(client, None, True, python="/py", roots=[str(root)])  # type: ignore[arg-type]
    assert hashed == [str(mod)]
    assert set(client.puts) - puts_before == {digest(b"def f():\n    return 3\n")}
    assert image_id == "im-2" and client.full_builds() == 2
    assert "(5 files, 1 changed, 22 B uploaded)" in capsys.readouterr().err
    # Touched but not changed: re-hashed (once), nothing uploaded; a new tree all the same,
    # since file mtimes are part of it (timestamp-checked .pyc files depend on them).
    os.utime(mod, ns=(OLD + 2 * 10**9, OLD + 2 * 10**9))
    hashed.clear()
    puts_before = set(client.puts)
    assert capture(client, None, False, python="/py", roots=[str(root)]) == "im-3"  # type: ignore[arg-type]
    assert hashed == [str(mod)] and set(client.puts) == puts_before
    hashed.clear()
    assert capture(client, None, False, python="/py", roots=[str(root)]) == "im-3"  # type: ignore[arg-type]
    assert hashed == [] and client.builds[-1]["base"].get("key")


def test_capture_falls_back_to_full_form_on_unknown_base(tmp_path: Path) -> None:
    root = make_env(tmp_path / "env")
    client = EnvClient()
    capture(client, None, False, python="/py", roots=[str(root)])  # type: ignore[arg-type]
    # The server forgot the base (a new store, say).
    client.keys.clear()
    client.builds.clear()
    image_id = capture(client, None, False, python="/py", roots=[str(root)])  # type: ignore[arg-type]
    assert image_id == "im-1"
    assert ["key" in b["base"] for b in client.builds] == [True, False]
    # ... and the key it returned is used from then on.
    client.builds.clear()
    capture(client, None, False, python="/py", roots=[str(root)])  # type: ignore[arg-type]
    assert ["key" in b["base"] for b in client.builds] == [True]


def test_recently_modified_env_is_not_remembered(tmp_path: Path) -> None:
    root = make_env(tmp_path / "env")
    write(root / "fresh.py", b"just written", time.time_ns())
    client = EnvClient()
    capture(client, None, False, python="/py", roots=[str(root)])  # type: ignore[arg-type]
    capture(client, None, False, python="/py", roots=[str(root)])  # type: ignore[arg-type]
    assert client.full_builds() == 2 and client.short_builds() == 0


def test_capture_is_keyed_by_server(tmp_path: Path) -> None:
    root = make_env(tmp_path / "env")
    a, b = EnvClient(), EnvClient()
    b.url = "http://other:6000"
    capture(a, None, False, python="/py", roots=[str(root)])  # type: ignore[arg-type]
    capture(b, None, False, python="/py", roots=[str(root)])  # type: ignore[arg-type]
    assert b.full_builds() == 1 and b.short_builds() == 0


def test_capture_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_env(tmp_path / "env")
    client = EnvClient()
    monkeypatch.setenv("FLARE_LOCAL_PYTHON", "bind")
    assert capture(client, None, False, python="/py", roots=[str(root)]) is None  # type: ignore[arg-type]
    monkeypatch.delenv("FLARE_LOCAL_PYTHON")
    monkeypatch.setenv("FLARE_IS_REMOTE", "1")
    assert capture(client, None, False, python="/py", roots=[str(root)]) is None  # type: ignore[arg-type]
    monkeypatch.delenv("FLARE_IS_REMOTE")
    assert client.calls == []
    # Nothing to capture.
    assert capture(client, None, False, python="/py", roots=[]) is None  # type: ignore[arg-type]
    # A server without images: probed, nothing hashed or uploaded.
    old = EnvClient(images=False)
    assert capture(old, None, False, python="/py", roots=[str(root)]) is None  # type: ignore[arg-type]
    assert old.calls == [("GET", "/v1/images")]
    # Too many entries: a warning, not captured.
    monkeypatch.setenv("FLARE_LOCAL_PYTHON_MAX_FILES", "3")
    assert capture(client, None, False, python="/py", roots=[str(root)]) is None  # type: ignore[arg-type]
    assert client.calls == []


def test_force_build_sends_full_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_env(tmp_path / "env")
    client = EnvClient()
    capture(client, None, False, python="/py", roots=[str(root)])  # type: ignore[arg-type]
    monkeypatch.setenv("FLARE_FORCE_BUILD", "1")
    capture(client, None, False, python="/py", roots=[str(root)])  # type: ignore[arg-type]
    assert client.short_builds() == 0 and client.builds[-1]["force_build"] is True


def test_flare_home_inside_a_root_is_not_captured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_env(tmp_path / "env")
    monkeypatch.setenv("FLARE_HOME", str(root / "dot-flare"))
    write(root / "dot-flare/hash-cache.json", b"{}")
    client = EnvClient()
    capture(client, None, False, python="/py", roots=[str(root)])  # type: ignore[arg-type]
    paths = {e["path"] for e in client.builds[0]["base"]["roots"][0]["entries"]}
    assert "bin/tool" in paths and not any(p.startswith("dot-flare") for p in paths)


# ------------------------------------------------------------------ publishing


class PublishClient(EnvClient):
    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None,
                content_type: str | None = None) -> Any:
        if path == "/v1/apps":
            self.calls.append((method, path))
            return {"app_id": "ap-1"}
        if path == "/v1/mounts":
            self.calls.append((method, path))
            return {"mount_id": "mo-1"}
        if path == "/v1/apps/ap-1/functions":
            self.calls.append((method, path))
            self.defs = body["functions"]
            return {"functions": [{"name": f["name"], "function_id": "fu-" + f["name"]} for f in body["functions"]]}
        return super().request(method, path, body, timeout, content_type)


def test_publish_puts_the_captured_image_into_function_defs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flare.app import _publish

    root = make_env(tmp_path / "env")
    monkeypatch.setattr(_localenv, "local_roots", lambda entry_dir: [str(root)])
    entry = tmp_path / "proj/main.py"
    write(entry, b"X = 1\n")
    app = flare.App("le")
    app._entry_file = str(entry)
    app.function(serialized=True, name="f")(lambda: 1)
    client = PublishClient()
    _publish(app, client, "le", "ephemeral")  # type: ignore[arg-type]
    assert [d.get("image_id") for d in client.defs] == ["im-1"]
    paths = [p for _, p in client.calls]
    assert paths.index("/v1/images/build") < paths.index("/v1/apps")

    # The escape hatch: the old behaviour (no image id).
    monkeypatch.setenv("FLARE_LOCAL_PYTHON", "bind")
    client = PublishClient()
    _publish(app, client, "le", "ephemeral")  # type: ignore[arg-type]
    assert all("image_id" not in d for d in client.defs) and client.builds == []

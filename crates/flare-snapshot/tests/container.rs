//! Dump and restore a real Flare container (flare-runtime: user, pid, mount, UTS, IPC and
//! network namespaces, an overlay root over idmapped host binds, seccomp, dropped caps).

mod common;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use flare_runtime::{
    CommandSpec, ContainerSpec, Limits, Network, Rootfs, Runtime, RuntimeConfig, UserNamespace,
};
use flare_snapshot::{CgroupMode, DumpOpts, ExternalMount};

struct Rt {
    rt: Option<Runtime>,
    state: PathBuf,
    cgroup_parent: String,
}

impl Drop for Rt {
    fn drop(&mut self) {
        drop(self.rt.take());
        let _ = std::fs::remove_dir_all(&self.state);
        // The runtime's cgroup parent (v2, or each v1 controller it uses).
        for ctrl in ["", "cpu", "memory", "pids"] {
            let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(ctrl).join(&self.cgroup_parent));
        }
    }
}

fn runtime(name: &str, userns: Option<UserNamespace>) -> Rt {
    let state = std::env::temp_dir().join(format!("flare-snap-rt-{name}-{}", std::process::id()));
    let cgroup_parent = format!("flare-snap-test-{name}-{}", std::process::id());
    let rt = Runtime::new(RuntimeConfig {
        state_dir: state.clone(),
        cgroup_parent: cgroup_parent.clone(),
        enable_nat: false,
        userns,
    })
    .expect("Runtime::new");
    Rt { rt: Some(rt), state, cgroup_parent }
}

fn devnull() -> OwnedFd {
    File::options().write(true).open("/dev/null").unwrap().into()
}

fn holder_spec(id: &str, py: &str, checkpointable: bool) -> ContainerSpec {
    CommandSpec {
        id: id.into(),
        hostname: "flare-snap".into(),
        argv: vec![py.into(), "-c".into(), HOLDER.into(), "/tmp/report".into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: "/".into(),
        rootfs: Rootfs::Host,
        binds: vec![],
        limits: Limits::default(),
        network: Network::Isolated,
        upper_dir: None,
        checkpointable,
    }
    .with_stdio(devnull(), devnull(), vec![])
}

/// The container's program: init's only child.
fn program_pid(init: i32) -> i32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let [p] = children(init)[..] {
            return p;
        }
        assert!(std::time::Instant::now() < deadline, "init {init} has no single child");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn report_path(pid: i32) -> PathBuf {
    Path::new("/proc").join(pid.to_string()).join("root/tmp/report")
}

/// Where criu stands on a real flare-runtime container today. Both shapes fail at dump,
/// for reasons in the runtime's design rather than criu options (see README.md):
/// - with a user namespace, the container's init (a fork of the spawning process that
///   changed its uid and never exec'd, so it is not dumpable and its memory belongs to the
///   host's user namespace) cannot be inspected from inside the container's user
///   namespace: "One or more namespaces doesn't belong to the target user namespace";
/// - without one, init still maps the spawning process's own binary, a file outside
///   the container's mount namespace: "Can't lookup mount=N for fd=-3 path=<the binary>".
///
/// The test passes on those known errors (printing them) and on a successful dump (then
/// it restores nothing: a restore needs a root prepared the way the namespaced tests do),
/// and fails on any other error, so a change in the runtime or criu shows up here.
fn container_dump(userns: Option<UserNamespace>, name: &str) {
    let criu = require_criu!();
    let Some(py) = python() else {
        return;
    };
    let rt = runtime(name, userns);
    let mut c = rt.rt.as_ref().unwrap().spawn(holder_spec(&format!("snap-{name}"), py, false)).unwrap();
    let init = c.pid();
    let prog = program_pid(init);
    let before = take_report(&report_path(prog), Duration::from_secs(20));
    assert_eq!(before.pid, 2, "the program is pid 2 under the runtime's init");
    let dir = tempdir(name);
    let opts = DumpOpts {
        external_mounts: vec![ExternalMount::Auto],
        manage_cgroups: Some(CgroupMode::Ignore),
        ..Default::default()
    };
    let known = ["doesn't belong to the target user namespace", "Can't lookup mount"];
    match criu.dump(init, &dir.join("images"), &opts) {
        Ok(rep) => eprintln!("flare-runtime container ({name}) dumped: {rep:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(known.iter().any(|k| msg.contains(k)), "unexpected dump failure: {msg}");
            eprintln!("flare-runtime container ({name}): known dump failure: {msg}");
            // criu leaves a tree it failed to dump running.
            c.kill().unwrap();
        }
    }
    let _ = c.wait();
    c.cleanup().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flare_runtime_container_with_user_namespace() {
    container_dump(Some(UserNamespace::DEFAULT), "userns");
}

#[test]
fn flare_runtime_container_without_user_namespace() {
    container_dump(None, "nouserns");
}

/// Reads messages on fd 4 and answers each on fd 3 with `token:message:random` (the token and the
/// random stream live in memory only), after printing `ready token` on stdout.
const ECHO: &str = r#"
import os, random, sys
token = os.urandom(8).hex()
state = [i * i for i in range(100000)]
print("ready", token, flush=True)
while True:
    m = os.read(4, 100)
    if not m:
        break
    os.write(3, ("%s:%s:%d" % (token, m.decode(), random.getrandbits(32))).encode())
    print("answered", m.decode(), flush=True)
"#;

fn echo_spec(id: &str, py: &str) -> CommandSpec {
    CommandSpec {
        id: id.into(),
        hostname: "flare-snap".into(),
        argv: vec![py.into(), "-c".into(), ECHO.into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: "/".into(),
        rootfs: Rootfs::Host,
        binds: vec![],
        limits: Limits { memory_bytes: Some(512 << 20), ..Limits::default() },
        network: Network::Isolated,
        upper_dir: None,
        checkpointable: true,
    }
}

fn inode(fd: &impl std::os::fd::AsRawFd) -> u64 {
    // SAFETY: fstat on an open fd into a zeroed stat buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        assert_eq!(libc::fstat(fd.as_raw_fd(), &mut st), 0);
        st.st_ino
    }
}

fn read_line(r: &mut impl std::io::BufRead) -> String {
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    l.trim_end().to_string()
}

/// The worker's ends of a container's two frame pipes, and the container's.
struct Chan {
    to: File,
    from: File,
}

fn chan() -> (Chan, OwnedFd, OwnedFd, u64, u64) {
    let (in_r, in_w) = flare_runtime::pipe_cloexec().unwrap();
    let (out_r, out_w) = flare_runtime::pipe_cloexec().unwrap();
    let (ino_in, ino_out) = (inode(&in_r), inode(&out_r));
    (Chan { to: File::from(in_w), from: File::from(out_r) }, in_r, out_w, ino_in, ino_out)
}

fn ask(c: &mut Chan, m: &str) -> Vec<String> {
    use std::io::{Read, Write};
    c.to.write_all(m.as_bytes()).unwrap();
    let mut buf = [0u8; 200];
    let n = c.from.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).split(':').map(str::to_string).collect()
}

/// A checkpointable flare-runtime container (program as pid 1, user namespace, overlay
/// root over idmapped host binds, seccomp) is dumped while it keeps running, and restored
/// twice into containers the runtime prepared (own cgroup, fresh root), each with new
/// stdout and frame pipes (fds 3 and 4) handed in for the dumped ones: memory comes back, both answer.
#[test]
fn checkpointable_container_dumps_and_restores_into_new_containers() {
    use std::io::BufReader;
    let criu = require_criu!();
    let Some(py) = python() else {
        return;
    };
    let rt = runtime("ckpt", Some(UserNamespace::DEFAULT));
    let runtime = rt.rt.as_ref().unwrap();
    let (out_r, out_w) = flare_runtime::pipe_cloexec().unwrap();
    let (mut ours, fd4, fd3, ino4, ino3) = chan();
    let pipe_ino = inode(&out_r);
    let mut c = runtime
        .spawn(echo_spec("ckpt-0", py).with_stdio(out_w, devnull(), vec![(fd3, 3), (fd4, 4)]))
        .unwrap();
    let mut out = BufReader::new(File::from(out_r));
    let ready = read_line(&mut out);
    let token = ready.strip_prefix("ready ").expect(&ready).to_string();
    let dir = tempdir("ckpt");
    let images = dir.join("images");
    let opts = DumpOpts {
        leave_running: true,
        external_mounts: vec![ExternalMount::Auto],
        manage_cgroups: Some(CgroupMode::Ignore),
        ..Default::default()
    };
    let rep = criu.dump(c.pid(), &images, &opts).unwrap_or_else(|e| panic!("dump: {e}"));
    eprintln!("dump {:?}, {} bytes", rep.elapsed, rep.image_bytes);
    // Its root's upper layer seeds the restored roots.
    let upper = dir.join("upper");
    c.copy_upper(&upper).unwrap();
    // The original goes on.
    let a = ask(&mut ours, "a");
    assert_eq!((a[0].as_str(), a[1].as_str()), (token.as_str(), "a"));

    let mut restored = Vec::new();
    for i in 1..=2 {
        let (r_out_r, r_out_w) = flare_runtime::pipe_cloexec().unwrap();
        let (mut r_ours, r4, r3, _, _) = chan();
        let ct = runtime
            .restore(&echo_spec(&format!("ckpt-{i}"), py), Some(&upper), |t| {
                let ropts = flare_snapshot::RestoreOpts {
                    work_dir: Some(dir.join(format!("w{i}"))),
                    root: Some(t.root.to_path_buf()),
                    auto_external_mounts: true,
                    manage_cgroups: Some(CgroupMode::Ignore),
                    join_cgroups: t.cgroup_procs.clone(),
                    restore_sibling: true,
                    inherit_fds: vec![
                        (std::os::fd::AsFd::as_fd(&r_out_w), format!("pipe:[{pipe_ino}]")),
                        (std::os::fd::AsFd::as_fd(&r3), format!("pipe:[{ino3}]")),
                        (std::os::fd::AsFd::as_fd(&r4), format!("pipe:[{ino4}]")),
                    ],
                    ..Default::default()
                };
                criu.restore(&images, &ropts).map(|r| {
                    eprintln!("restore {i}: {:?}", r.elapsed);
                    r.pid
                })
            })
            .unwrap_or_else(|e| panic!("restore {i}: {e}"));
        drop((r_out_w, r3, r4));
        let b = ask(&mut r_ours, &format!("r{i}"));
        assert_eq!((b[0].as_str(), b[1].as_str()), (token.as_str(), format!("r{i}").as_str()));
        let mut r_out = BufReader::new(File::from(r_out_r));
        assert_eq!(read_line(&mut r_out), format!("answered r{i}"), "stdout reaches the new pipe");
        // Its limits are the new cgroup's.
        assert_eq!(ct.memory_limit(), Some(512 << 20));
        restored.push((ct, r_ours));
    }
    // The original still answers on its own socket and prints on its own pipe.
    assert_eq!(read_line(&mut out), "answered a");
    for (mut ct, _) in restored {
        ct.kill().unwrap();
        let exit = ct.wait().unwrap();
        assert_eq!(exit.signal, Some(libc::SIGKILL));
        ct.cleanup().unwrap();
    }
    c.kill().unwrap();
    let _ = c.wait();
    c.cleanup().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

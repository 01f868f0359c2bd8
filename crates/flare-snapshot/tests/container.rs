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

fn holder_spec(id: &str, py: &str) -> ContainerSpec {
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
    let mut c = rt.rt.as_ref().unwrap().spawn(holder_spec(&format!("snap-{name}"), py)).unwrap();
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

//! Dump and restore a real Flare container (flare-runtime: user, pid, mount, UTS, IPC and
//! network namespaces, an overlay root over idmapped host binds, seccomp, dropped caps).

mod common;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use flare_runtime::{ContainerSpec, Limits, Network, Rootfs, Runtime, RuntimeConfig, UserNamespace};
use flare_snapshot::{CgroupMode, DumpOpts, ExternalMount, RestoreOpts};

struct Rt {
    rt: Option<Runtime>,
    state: PathBuf,
}

impl Drop for Rt {
    fn drop(&mut self) {
        drop(self.rt.take());
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn runtime(name: &str, userns: Option<UserNamespace>) -> Rt {
    let state = std::env::temp_dir().join(format!("flare-snap-rt-{name}-{}", std::process::id()));
    let rt = Runtime::new(RuntimeConfig {
        state_dir: state.clone(),
        cgroup_parent: format!("flare-snap-test-{name}-{}", std::process::id()),
        enable_nat: false,
        userns,
    })
    .expect("Runtime::new");
    Rt { rt: Some(rt), state }
}

fn devnull() -> OwnedFd {
    File::options().write(true).open("/dev/null").unwrap().into()
}

fn holder_spec(id: &str, py: &str) -> ContainerSpec {
    ContainerSpec {
        id: id.into(),
        hostname: "flare-snap".into(),
        argv: vec![py.into(), "-c".into(), HOLDER.into(), "/tmp/report".into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: "/".into(),
        rootfs: Rootfs::Host,
        binds: vec![],
        limits: Limits::default(),
        network: Network::Isolated,
        stdout: devnull(),
        stderr: devnull(),
        extra_fds: vec![],
        upper_dir: None,
    }
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

#[test]
fn container_dump_explore() {
    let criu = require_criu!();
    let Some(py) = python() else {
        return;
    };
    flare_snapshot::sys::set_child_subreaper().unwrap();
    let rt = runtime("explore", None);
    let mut c = rt.rt.as_ref().unwrap().spawn(holder_spec("snap-a", py)).unwrap();
    let init = c.pid();
    let prog = program_pid(init);
    let before = take_report(&report_path(prog), Duration::from_secs(20));
    eprintln!("before: {before:?}");
    let dir = tempdir("ct");
    let images = dir.join("images");
    let opts = DumpOpts {
        external_mounts: vec![ExternalMount::Auto],
        manage_cgroups: Some(CgroupMode::Ignore),
        ..Default::default()
    };
    let r = criu.dump(init, &images, &opts);
    eprintln!("dump: {r:?}");
    if r.is_err() {
        c.kill().unwrap();
    }
    let _ = c.wait();
    let _ = c.cleanup();
}

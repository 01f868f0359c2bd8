#![allow(dead_code)]
//! Shared helpers for the privileged integration tests.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use flare_runtime::*;

pub const PYTHON: &str = "/root/.pyenv/versions/3.11.7/bin/python3";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[macro_export]
macro_rules! require_root {
    () => {
        if !common::is_root() {
            eprintln!("skipping: this test needs root (namespaces, mounts, cgroups)");
            return;
        }
    };
}

/// A runtime with its own state dir and cgroup parent, removed on drop.
pub struct TestRuntime {
    pub rt: Option<Runtime>,
    pub state: PathBuf,
    pub parent: String,
}

impl std::ops::Deref for TestRuntime {
    type Target = Runtime;
    fn deref(&self) -> &Runtime {
        self.rt.as_ref().unwrap()
    }
}

pub fn cgroup_parent_dirs(parent: &str) -> Vec<PathBuf> {
    let v1: Vec<PathBuf> =
        ["cpu", "memory", "pids"].iter().map(|c| Path::new("/sys/fs/cgroup").join(c).join(parent)).collect();
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        vec![Path::new("/sys/fs/cgroup").join(parent)]
    } else {
        v1
    }
}

impl Drop for TestRuntime {
    fn drop(&mut self) {
        drop(self.rt.take());
        let _ = std::fs::remove_dir_all(&self.state);
        for d in cgroup_parent_dirs(&self.parent) {
            let _ = std::fs::remove_dir(d);
        }
    }
}

pub fn runtime(name: &str, nat: bool) -> TestRuntime {
    let state = std::env::temp_dir().join(format!("flare-rt-{name}-{}", std::process::id()));
    let parent = format!("flare-test-{name}-{}", std::process::id());
    let rt = Runtime::new(RuntimeConfig {
        state_dir: state.clone(),
        cgroup_parent: parent.clone(),
        enable_nat: nat,
        userns: Some(flare_runtime::UserNamespace::DEFAULT),
    })
    .expect("Runtime::new");
    TestRuntime { rt: Some(rt), state, parent }
}

pub fn pipe() -> (File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: valid out array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds we own.
    unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

static N: AtomicU32 = AtomicU32::new(0);

pub fn next_id(prefix: &str) -> String {
    format!("{prefix}-{}", N.fetch_add(1, Ordering::Relaxed))
}

pub struct Readers {
    pub stdout: std::thread::JoinHandle<String>,
    pub stderr: std::thread::JoinHandle<String>,
}

impl Readers {
    pub fn finish(self) -> (String, String) {
        (self.stdout.join().unwrap(), self.stderr.join().unwrap())
    }
}

fn reader(mut f: File) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        s
    })
}

/// A spec for `argv` plus threads collecting stdout/stderr.
pub fn spec(argv: &[&str]) -> (ContainerSpec, Readers) {
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    let spec = CommandSpec {
        id: next_id("t"),
        hostname: "flare-test".into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![
            ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()),
            ("HOME".into(), "/root".into()),
        ],
        cwd: "/".into(),
        rootfs: Rootfs::Host,
        binds: vec![],
        limits: Limits::default(),
        network: Network::Isolated,
        upper_dir: None,
        checkpointable: false,
    }
    .with_stdio(out_w, err_w, vec![]);
    (spec, Readers { stdout: reader(out_r), stderr: reader(err_r) })
}

pub fn pyenv_bind() -> Bind {
    Bind { src: "/root/.pyenv".into(), dst: "/root/.pyenv".into(), readonly: true }
}

pub struct Out {
    pub exit: ExitInfo,
    pub stdout: String,
    pub stderr: String,
}

/// Spawn, wait, clean up.
pub fn run(rt: &Runtime, argv: &[&str], edit: impl FnOnce(&mut CommandSpec)) -> Out {
    let (mut s, readers) = spec(argv);
    edit(&mut s.command);
    let mut c = rt.spawn(s).expect("spawn");
    let exit = c.wait().expect("wait");
    c.cleanup().expect("cleanup");
    let (stdout, stderr) = readers.finish();
    Out { exit, stdout, stderr }
}

pub fn sh(rt: &Runtime, script: &str, edit: impl FnOnce(&mut CommandSpec)) -> Out {
    run(rt, &["/bin/sh", "-c", script], edit)
}

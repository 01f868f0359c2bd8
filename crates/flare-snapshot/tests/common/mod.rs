#![allow(dead_code)]
//! Shared helpers for the privileged CRIU tests: they skip (saying why) where criu is
//! missing or fails `criu check`, and run for real where scripts/install-criu.sh was run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flare_snapshot::Criu;

/// A Python program that keeps state only in memory (a random token and a big list) and,
/// on SIGUSR1 (and once at start), writes `token sum ticks pid` to the file in argv[1].
pub const HOLDER: &str = r#"
import os, signal, sys, time
out = sys.argv[1]
state = {"data": [i * i for i in range(200000)], "token": os.urandom(8).hex()}
ticks = 0
def report(sig, frame):
    with open(out + ".tmp", "w") as f:
        f.write("%s %d %d %d\n" % (state["token"], sum(state["data"]), ticks, os.getpid()))
    os.rename(out + ".tmp", out)
signal.signal(signal.SIGUSR1, report)
report(0, None)
while True:
    ticks += 1
    time.sleep(0.01)
"#;

/// sum(i*i for i in range(200000))
pub const HOLDER_SUM: u64 = 2_666_646_666_700_000;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The usable criu, or `None` with the reason printed (the test then returns).
pub fn criu_or_skip() -> Option<Criu> {
    if !is_root() {
        eprintln!("skipping: criu needs root");
        return None;
    }
    // FLARE_CRIU names a criu binary to test with (default: the one in PATH).
    let path = std::env::var_os("FLARE_CRIU").map(PathBuf::from);
    match Criu::detect(path.as_deref()) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

#[macro_export]
macro_rules! require_criu {
    () => {
        match common::criu_or_skip() {
            Some(c) => c,
            None => return,
        }
    };
}

/// What the holder reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub token: String,
    pub sum: u64,
    pub ticks: u64,
    /// Its pid as it sees it (inside its pid namespace).
    pub pid: i32,
}

/// Wait for `path` to hold a report, and take it (the file is removed).
pub fn take_report(path: &Path, timeout: Duration) -> Report {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let f: Vec<&str> = text.split_whitespace().collect();
            if f.len() == 4 {
                let _ = std::fs::remove_file(path);
                return Report {
                    token: f[0].to_string(),
                    sum: f[1].parse().unwrap(),
                    ticks: f[2].parse().unwrap(),
                    pid: f[3].parse().unwrap(),
                };
            }
        }
        assert!(Instant::now() < deadline, "no report in {} after {timeout:?}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The pids of `pid`'s children.
pub fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kill `pid` and reap it (it must be our child, e.g. through the subreaper flag).
pub fn kill_and_reap(pid: i32) {
    flare_snapshot::sys::kill(pid, libc::SIGKILL).unwrap();
    let _ = flare_snapshot::sys::waitpid(pid, true);
}

/// Wait until no process has `pid` (reaped by whoever its parent is).
pub fn wait_gone(pid: i32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while flare_snapshot::sys::pid_exists(Path::new("/proc"), pid) {
        let _ = flare_snapshot::sys::waitpid(pid, false);
        assert!(Instant::now() < deadline, "pid {pid} still exists after {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flare-snap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn python() -> Option<&'static str> {
    ["/usr/bin/python3", "/usr/local/bin/python3"].into_iter().find(|p| Path::new(p).exists())
}

/// Close every fd above 2 in a child before exec: whatever the test runner inherited
/// (a CI shell's fds) would otherwise be open in the tree and be dumped, and criu refuses
/// files it cannot resolve in the tree's mount namespace.
pub fn close_inherited_fds(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: close_range is one async-signal-safe syscall; nothing is allocated.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
}

/// Is `tool` in PATH? (The namespaced tests drive util-linux's unshare, mount, setsid.)
pub fn has_tools(tools: &[&str]) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    tools.iter().all(|t| path.split(':').any(|d| Path::new(d).join(t).exists()))
}

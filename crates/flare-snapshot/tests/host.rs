//! Dump and restore a plain host process (same namespaces as criu).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use flare_snapshot::{DumpOpts, RestoreOpts};

/// The holder in a session of its own (so no --shell-job is needed), fds above 2 closed.
fn spawn_holder(py: &str, out: &std::path::Path) -> std::process::Child {
    let mut cmd = Command::new("setsid");
    cmd.args([py, "-c", HOLDER]).arg(out).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    close_inherited_fds(&mut cmd);
    cmd.spawn().unwrap()
}

#[test]
fn detect_reports_version_kernel_and_features() {
    let criu = require_criu!();
    assert!(criu.version().major >= flare_snapshot::MIN_MAJOR);
    assert_eq!(criu.kernel_release(), flare_snapshot::sys::kernel_release().unwrap());
    eprintln!("criu {} on {}: {:?}", criu.version(), criu.kernel_release(), criu.features());
}

#[test]
fn host_process_memory_survives_dump_and_two_restores() {
    let criu = require_criu!();
    let Some(py) = python() else {
        eprintln!("skipping: no python3");
        return;
    };
    flare_snapshot::sys::set_child_subreaper().unwrap();
    let dir = tempdir("host");
    let out = dir.join("report");
    let images = dir.join("images");
    let mut child = spawn_holder(py, &out);
    let pid = child.id() as i32;
    let before = take_report(&out, Duration::from_secs(20));
    assert_eq!(before.sum, HOLDER_SUM);
    assert_eq!(before.pid, pid);

    let rep = criu.dump(pid, &images, &DumpOpts::default()).unwrap_or_else(|e| panic!("dump: {e}"));
    eprintln!("dump: {:?}, {} bytes of images", rep.elapsed, rep.image_bytes);
    // criu killed the tree; reap it so that its pid is free for the restore.
    child.wait().unwrap();

    // A tree restored in criu's own pid namespace gets its old pids back, so two restores
    // of it cannot run at once: one after the other.
    for round in 0..2 {
        let work = dir.join(format!("restore-{round}"));
        let opts = RestoreOpts { work_dir: Some(work), ..Default::default() };
        let r = criu.restore(&images, &opts).unwrap_or_else(|e| panic!("restore {round}: {e}"));
        eprintln!("restore {round}: pid {} in {:?}", r.pid, r.elapsed);
        assert_eq!(r.pid, pid, "the restored process has its old pid");
        flare_snapshot::sys::kill(r.pid, libc::SIGUSR1).unwrap();
        let after = take_report(&out, Duration::from_secs(10));
        assert_eq!(after.token, before.token, "memory (the random token) survived");
        assert_eq!(after.sum, HOLDER_SUM);
        assert!(after.ticks >= before.ticks);
        // The restored process is our child (we are its subreaper).
        kill_and_reap(r.pid);
        wait_gone(r.pid, Duration::from_secs(5));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn second_concurrent_restore_in_the_same_pid_namespace_fails_clearly() {
    let criu = require_criu!();
    let Some(py) = python() else {
        return;
    };
    flare_snapshot::sys::set_child_subreaper().unwrap();
    let dir = tempdir("host-clash");
    let out = dir.join("report");
    let images = dir.join("images");
    let mut child = spawn_holder(py, &out);
    let pid = child.id() as i32;
    take_report(&out, Duration::from_secs(20));
    criu.dump(pid, &images, &DumpOpts::default()).unwrap();
    child.wait().unwrap();
    let first =
        criu.restore(&images, &RestoreOpts { work_dir: Some(dir.join("r0")), ..Default::default() }).unwrap();
    let err = criu
        .restore(&images, &RestoreOpts { work_dir: Some(dir.join("r1")), ..Default::default() })
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("File exists") || msg.contains("pid"), "{msg}");
    eprintln!("second restore: {msg}");
    kill_and_reap(first.pid);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn host_process_restores_with_lazy_pages() {
    let criu = require_criu!();
    let Some(py) = python() else {
        return;
    };
    if !criu.features().lazy_pages() {
        eprintln!("skipping: no userfaultfd here ({:?})", criu.features());
        return;
    }
    flare_snapshot::sys::set_child_subreaper().unwrap();
    let dir = tempdir("host-lazy");
    let out = dir.join("report");
    let images = dir.join("images");
    let mut child = spawn_holder(py, &out);
    let pid = child.id() as i32;
    let before = take_report(&out, Duration::from_secs(20));
    criu.dump(pid, &images, &DumpOpts::default()).unwrap();
    child.wait().unwrap();
    let opts = RestoreOpts { work_dir: Some(dir.join("w")), lazy_pages: true, ..Default::default() };
    let mut r = criu.restore(&images, &opts).unwrap_or_else(|e| panic!("lazy restore: {e}"));
    eprintln!("lazy restore: pid {} in {:?}", r.pid, r.elapsed);
    flare_snapshot::sys::kill(r.pid, libc::SIGUSR1).unwrap();
    let after = take_report(&out, Duration::from_secs(10));
    assert_eq!(after.token, before.token, "pages served on demand hold the dumped memory");
    assert!(r.wait_lazy_done(Duration::from_secs(30)).unwrap(), "the lazy-pages daemon served every page");
    kill_and_reap(r.pid);
    let _ = std::fs::remove_dir_all(&dir);
}

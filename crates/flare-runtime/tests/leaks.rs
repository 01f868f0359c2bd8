//! 100 sequential containers leave nothing behind (own test binary: it counts the
//! process's fds and mounts, so nothing else may run concurrently).

mod common;

use std::time::Instant;

use common::*;

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Mounts on the host that this runtime could have made: under its state dir (pinned
/// network namespaces, container dirs) or the runtime's dirs in /run. Other processes on
/// the host (a flared, another suite) mount and unmount elsewhere meanwhile, so the whole
/// table is no measure of this runtime's leaks.
fn mount_count(state: &std::path::Path) -> usize {
    let state = state.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|at| at.starts_with(&state) || at.starts_with("/run/flare"))
        .count()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[test]
fn hundred_containers_leave_nothing_behind() {
    require_root!();
    let rt = runtime("leaks", false);
    // Warm up (first spawn pays for page cache etc.), then take the baseline.
    let _ = run(&rt, &["/bin/true"], |_| {});
    let fds = fd_count();
    let mounts = mount_count(&rt.state);
    let mut spawn_ms = Vec::new();
    let mut total_ms = Vec::new();
    for i in 0..100 {
        let (mut s, readers) = spec(&["/bin/true"]);
        if i % 2 == 0 {
            s.command.binds.push(pyenv_bind());
            s.command.limits.memory_bytes = Some(256 << 20);
            s.command.limits.cpu_millicores = Some(1000);
        }
        let t0 = Instant::now();
        let mut c = rt.spawn(s).expect("spawn");
        let t1 = Instant::now();
        let e = c.wait().unwrap();
        let t2 = Instant::now();
        c.cleanup().unwrap();
        readers.finish();
        assert_eq!(e.code, Some(0));
        spawn_ms.push((t1 - t0).as_secs_f64() * 1000.0);
        total_ms.push((t2 - t0).as_secs_f64() * 1000.0);
    }
    eprintln!(
        "spawn() p50 {:.2} ms p90 {:.2} ms; spawn-to-exit of /bin/true p50 {:.2} ms p90 {:.2} ms",
        percentile(&mut spawn_ms, 0.5),
        percentile(&mut spawn_ms, 0.9),
        percentile(&mut total_ms, 0.5),
        percentile(&mut total_ms, 0.9)
    );
    assert_eq!(fd_count(), fds, "leaked fds");
    assert_eq!(mount_count(&rt.state), mounts, "leaked mounts");
    assert!(std::fs::read_dir(rt.state.join("containers")).unwrap().next().is_none());
    for d in cgroup_parent_dirs(&rt.parent) {
        let n = std::fs::read_dir(&d).unwrap().flatten().filter(|e| e.path().is_dir()).count();
        assert_eq!(n, 0, "leaked cgroups in {}", d.display());
    }
    // No children at all (no zombies).
    // SAFETY: waitpid with a null status pointer.
    let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
    assert_eq!(r, -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ECHILD));
}

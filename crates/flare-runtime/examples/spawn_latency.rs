//! Cold-start latency: spawn-to-exit of `/bin/true` in a fresh container, 50 runs.
//!
//! `sudo cargo run --release -p flare-runtime --example spawn_latency [isolated|nat]`
//! (`FLARE_USERNS=0`: without a user namespace, to see what it costs)

use std::os::fd::OwnedFd;
use std::time::Instant;

use flare_runtime::*;

fn devnull() -> OwnedFd {
    std::fs::OpenOptions::new().write(true).open("/dev/null").unwrap().into()
}

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> Result<(), RuntimeError> {
    let nat = std::env::args().nth(1).as_deref() == Some("nat");
    let state = std::env::temp_dir().join(format!("flare-latency-{}", std::process::id()));
    let parent = format!("flare-latency-{}", std::process::id());
    let rt = Runtime::new(RuntimeConfig {
        state_dir: state.clone(),
        cgroup_parent: parent.clone(),
        enable_nat: nat,
        userns: match std::env::var("FLARE_USERNS").as_deref() {
            Ok("0") => None,
            _ => Some(flare_runtime::UserNamespace::DEFAULT),
        },
    })?;
    if nat {
        if let Some(r) = rt.nat_available() {
            eprintln!("NAT unavailable: {r}");
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(1)); // let the pool fill
    }
    let mut spawn = Vec::new();
    let mut total = Vec::new();
    for i in 0..51 {
        let spec = CommandSpec {
            id: format!("lat-{i}"),
            hostname: "lat".into(),
            argv: vec!["/bin/true".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: "/".into(),
            rootfs: Rootfs::Host,
            binds: vec![],
            limits: Limits { cpu_millicores: Some(1000), memory_bytes: Some(512 << 20), ..Limits::default() },
            network: if nat { Network::Nat } else { Network::Isolated },
            upper_dir: None,
            checkpointable: false,
        }
        .with_stdio(devnull(), devnull(), vec![]);
        let t0 = Instant::now();
        let mut c = rt.spawn(spec)?;
        let t1 = Instant::now();
        c.wait()?;
        let t2 = Instant::now();
        c.cleanup()?;
        if i > 0 {
            spawn.push((t1 - t0).as_secs_f64() * 1e3);
            total.push((t2 - t0).as_secs_f64() * 1e3);
        }
        if nat {
            std::thread::sleep(std::time::Duration::from_millis(
                std::env::var("GAP_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(100),
            ));
        }
    }
    spawn.sort_by(|a, b| a.partial_cmp(b).unwrap());
    total.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{} x50: spawn() (clone..exec) p50 {:.2} ms p90 {:.2} ms | spawn-to-exit p50 {:.2} ms p90 {:.2} ms",
        if nat { "nat" } else { "isolated" },
        pct(&spawn, 0.5),
        pct(&spawn, 0.9),
        pct(&total, 0.5),
        pct(&total, 0.9)
    );
    drop(rt);
    let _ = std::fs::remove_dir_all(&state);
    for c in ["cpu", "memory", "pids", ""] {
        let _ = std::fs::remove_dir(std::path::Path::new("/sys/fs/cgroup").join(c).join(&parent));
    }
    Ok(())
}

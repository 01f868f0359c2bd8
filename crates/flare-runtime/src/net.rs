//! Outbound NAT networking: a small pool of pre-made network namespaces.
//!
//! Each pooled namespace is pinned by a bind mount at `state_dir/netns/<n>` and holds one
//! end of a veth pair renamed `eth0` with `10.213.x.y+2/30`, default route via the host
//! end `flv<n>` (`10.213.x.y+1/30`). One /30 per container and no bridge, so containers
//! cannot talk to each other. Host-wide rules (set once): `ip_forward=1`; MASQUERADE for
//! 10.213.0.0/16 leaving through non-`flv+` interfaces; FORWARD drops `flv+ -> flv+` and
//! traffic to the host's own addresses; INPUT drops everything arriving from `flv+`, so a
//! container cannot reach anything listening on the host (the control plane included).
//! IPv6 is off on both ends of every veth (no link-local address, so no `fe80::` path to
//! the host's `[::]` listeners), and the same INPUT/FORWARD drops are installed with
//! `ip6tables` as a second wall where it exists. Inside each namespace unprivileged ports
//! start at 0 and ICMP datagram sockets are allowed: the namespace belongs to the host's
//! user namespace, so the container's root has no capability over it, and needs neither
//! for servers on port 80 or `ping`.
//!
//! Set-up shells out to `ip` (iproute2) and `iptables`: it is off the hot path (a
//! background thread keeps the pool full). After a container exits its namespace goes back
//! to the pool (see [`NetPool::release`] for why that is safe); beyond `POOL_MAX` it and
//! its veth are deleted in the background.

use std::collections::{HashSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::sys;

const POOL_TARGET: usize = 3;
/// Namespaces kept for reuse at most (beyond this, released ones are deleted).
const POOL_MAX: usize = 16;
const MAX_INDEX: u32 = 16384; // /30s in a /16
pub(crate) const SUBNET: &str = "10.213.0.0/16";

/// A pinned, configured network namespace.
#[derive(Debug)]
pub(crate) struct NetNs {
    pub index: u32,
    pub pin: PathBuf,
}

pub(crate) fn host_if_name(index: u32) -> String {
    format!("{IF_PREFIX}{index}")
}

/// (host address, container address) of the /30 for `index`.
pub(crate) fn addresses(index: u32) -> (String, String) {
    let base = index * 4;
    let (a, b) = (base / 256, base % 256);
    (format!("10.213.{a}.{}", b + 1), format!("10.213.{a}.{}", b + 2))
}

/// Host-side names of container veths: `flv<n>`. The firewall matches `flv+`, so the
/// prefix must not be one other software uses for its interfaces (`fl` alone would catch
/// e.g. `flannel.1`).
const IF_PREFIX: &str = "flv";

/// Run a command, returning its stderr as the error.
fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`{cmd} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Run `ip -batch -` with one command per line: one process instead of one per command.
fn ip_batch(lines: &[String]) -> Result<(), String> {
    pipe_to("ip", &["-batch", "-"], &(lines.join("\n") + "\n"))
}

/// Check the tools and install the host rules. Returns the reason on failure.
pub(crate) fn setup_host() -> Result<(), String> {
    run("ip", &["-V"]).map_err(|e| format!("iproute2 `ip` not usable ({e})"))?;
    run("iptables", &["-V"]).map_err(|e| format!("iptables not installed or not usable ({e})"))?;
    fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| format!("enable net.ipv4.ip_forward: {e}"))?;
    // Each chain is replaced atomically (iptables-restore --noflush: declaring a chain
    // empties it), so concurrent start-ups of several runtimes never duplicate rules.
    let chain = |table: &str, chain: &str, hook: &str, rules: &[&str]| -> Result<(), String> {
        let mut script = format!("*{table}\n:{chain} - [0:0]\n");
        for r in rules {
            script.push_str(&format!("-A {chain} {r}\n"));
        }
        script.push_str("COMMIT\n");
        pipe_to("iptables-restore", &["-w", "--noflush"], &script)?;
        if run("iptables", &["-w", "-t", table, "-C", hook, "-j", chain]).is_err() {
            run("iptables", &["-w", "-t", table, "-I", hook, "1", "-j", chain])?;
        }
        Ok(())
    };
    let ifs = format!("{IF_PREFIX}+");
    chain("nat", "FLARE-POSTROUTING", "POSTROUTING", &[&format!("-s {SUBNET} ! -o {ifs} -j MASQUERADE")])?;
    let forward = forward_rules(&ifs);
    let forward: Vec<&str> = forward.iter().map(String::as_str).collect();
    chain("filter", "FLARE-FORWARD", "FORWARD", &forward)?;
    chain(
        "filter",
        "FLARE-INPUT",
        "INPUT",
        &[&format!("-i {ifs} -j DROP"), &format!("-s {SUBNET} -j DROP")],
    )?;
    // IPv6: the veths have it disabled; these rules hold even if something enables it.
    if run("ip6tables", &["-V"]).is_ok() {
        let chain6 = |chain: &str, hook: &str, rules: &[&str]| -> Result<(), String> {
            let mut script = format!("*filter\n:{chain} - [0:0]\n");
            for r in rules {
                script.push_str(&format!("-A {chain} {r}\n"));
            }
            script.push_str("COMMIT\n");
            pipe_to("ip6tables-restore", &["-w", "--noflush"], &script)?;
            if run("ip6tables", &["-w", "-C", hook, "-j", chain]).is_err() {
                run("ip6tables", &["-w", "-I", hook, "1", "-j", chain])?;
            }
            Ok(())
        };
        chain6("FLARE-INPUT", "INPUT", &[&format!("-i {ifs} -j DROP")])?;
        chain6("FLARE-FORWARD", "FORWARD", &[&format!("-i {ifs} -j DROP"), &format!("-o {ifs} -j DROP")])?;
    } else {
        tracing::warn!("ip6tables not found: container links rely on IPv6 being disabled on them");
    }
    Ok(())
}

/// The FORWARD rules for container links matching `ifs`: no container-to-container
/// traffic, nothing to the host's own addresses, nothing to link-local addresses (cloud
/// metadata services at 169.254.169.254 hand out the machine's credentials), the rest out.
fn forward_rules(ifs: &str) -> Vec<String> {
    vec![
        format!("-i {ifs} -o {ifs} -j DROP"),
        format!("-i {ifs} -m addrtype --dst-type LOCAL -j DROP"),
        format!("-i {ifs} -d 169.254.0.0/16 -j DROP"),
        format!("-i {ifs} -j ACCEPT"),
        format!("-o {ifs} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
        format!("-o {ifs} -j DROP"),
    ]
}

/// Write a sysctl of the calling thread's network namespace (`rel` under /proc/sys/net).
fn net_sysctl(rel: &str, value: &str) -> Result<(), String> {
    let p = Path::new("/proc/sys/net").join(rel);
    fs::write(&p, value).map_err(|e| format!("write {}: {e}", p.display()))
}

/// Runs a command with `input` on its stdin; its stderr is the error.
fn pipe_to(cmd: &str, args: &[&str], input: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(|e| format!("{cmd}: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`{cmd}` failed on:\n{input}{}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Create and configure namespace `index` pinned at `pin`.
fn create(index: u32, pin: &Path) -> Result<(), String> {
    fs::File::create(pin).map_err(|e| format!("create {}: {e}", pin.display()))?;
    let host_if = host_if_name(index);
    let (host_addr, ct_addr) = addresses(index);
    let host_pid = std::process::id().to_string();
    let pin2 = pin.to_owned();
    let hi = host_if.clone();
    let gw = host_addr.clone();
    // unshare(CLONE_NEWNET) only affects this (short-lived) thread; commands it spawns
    // inherit its namespace.
    let inside = std::thread::spawn(move || -> Result<(), String> {
        sys::unshare(libc::CLONE_NEWNET).map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
        sys::bind_mount(Path::new("/proc/thread-self/ns/net"), &pin2)
            .map_err(|e| format!("pin netns at {}: {e}", pin2.display()))?;
        // Interfaces made from now on (eth0) get no IPv6; lo keeps ::1.
        net_sysctl("ipv6/conf/default/disable_ipv6", "1")?;
        net_sysctl("ipv4/ip_unprivileged_port_start", "0")?;
        net_sysctl("ipv4/ping_group_range", "0 2147483647")?;
        ip_batch(&[
            "link set lo up".into(),
            format!("link add eth0 type veth peer name {hi} netns {host_pid}"),
            format!("addr add {ct_addr}/30 dev eth0"),
            "link set eth0 up".into(),
            format!("route add default via {gw}"),
        ])
    })
    .join()
    .map_err(|_| "netns set-up thread panicked".to_string())?;
    inside?;
    // The host end: no IPv6 (and so no fe80:: address) before it comes up.
    net_sysctl(&format!("ipv6/conf/{host_if}/disable_ipv6"), "1")?;
    ip_batch(&[format!("addr add {host_addr}/30 dev {host_if}"), format!("link set {host_if} up")])
}

/// Give the network namespace `netns` (a container's own, e.g. one CRIU restored) a veth
/// to the host as namespace `index`, like [`create`] does for pooled ones.
fn attach_to(index: u32, netns: &std::os::fd::OwnedFd) -> Result<(), String> {
    let host_if = host_if_name(index);
    let (host_addr, ct_addr) = addresses(index);
    let host_pid = std::process::id().to_string();
    let hi = host_if.clone();
    let gw = host_addr.clone();
    let ns = netns.try_clone().map_err(|e| format!("dup netns fd: {e}"))?;
    // setns(CLONE_NEWNET) only affects this (short-lived) thread; `ip` inherits it.
    let inside = std::thread::spawn(move || -> Result<(), String> {
        sys::setns(&ns, libc::CLONE_NEWNET)
            .map_err(|e| format!("join the container's network namespace: {e}"))?;
        net_sysctl("ipv6/conf/default/disable_ipv6", "1")?;
        // Best effort: the namespace belongs to the container's user namespace.
        let _ = net_sysctl("ipv4/ip_unprivileged_port_start", "0");
        ip_batch(&[
            "link set lo up".into(),
            format!("link add eth0 type veth peer name {hi} netns {host_pid}"),
            format!("addr add {ct_addr}/30 dev eth0"),
            "link set eth0 up".into(),
            format!("route add default via {gw}"),
        ])
    })
    .join()
    .map_err(|_| "netns attach thread panicked".to_string())?;
    inside?;
    net_sysctl(&format!("ipv6/conf/{host_if}/disable_ipv6"), "1")?;
    ip_batch(&[format!("addr add {host_addr}/30 dev {host_if}"), format!("link set {host_if} up")])
}

/// Remove a namespace pin and its veth (errors ignored: best effort, idempotent).
pub(crate) fn destroy(index: u32, pin: &Path) {
    let _ = sys::umount_detach(pin);
    let _ = fs::remove_file(pin);
    let name = host_if_name(index);
    if Path::new("/sys/class/net").join(&name).exists() {
        let _ = run("ip", &["link", "del", &name]);
    }
}

/// Remove leftover pins under `dir` and their `fl<n>` links, except indexes in `keep`.
/// Returns how many pins were removed.
pub(crate) fn cleanup_stale(dir: &Path, keep: &HashSet<u32>) -> usize {
    // Only namespaces pinned in this runtime's own dir are ours: other runtimes on the
    // host (another server, a test) keep their links.
    let mut n = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(index) = name.parse::<u32>() else { continue };
            if keep.contains(&index) {
                continue;
            }
            destroy(index, &e.path());
            n += 1;
        }
    }
    n
}

struct PoolState {
    ready: VecDeque<NetNs>,
    release: Vec<NetNs>,
    in_use: HashSet<u32>,
    next: u32,
    stop: bool,
}

struct Shared {
    dir: PathBuf,
    state: Mutex<PoolState>,
    cv: Condvar,
}

/// The pool and its refill/release thread.
pub(crate) struct NetPool {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserve a free index.
    fn reserve(&self) -> Option<u32> {
        let mut st = self.lock();
        for _ in 0..MAX_INDEX {
            let i = st.next;
            st.next = (st.next + 1) % MAX_INDEX;
            if !st.in_use.contains(&i) && !Path::new("/sys/class/net").join(host_if_name(i)).exists() {
                st.in_use.insert(i);
                return Some(i);
            }
        }
        None
    }

    fn make(&self) -> Result<NetNs, String> {
        let index = self.reserve().ok_or("no free 10.213.0.0/16 subnet")?;
        let pin = self.dir.join(index.to_string());
        match create(index, &pin) {
            Ok(()) => Ok(NetNs { index, pin }),
            Err(e) => {
                destroy(index, &pin);
                self.lock().in_use.remove(&index);
                Err(e)
            }
        }
    }

    fn free(&self, ns: NetNs) {
        destroy(ns.index, &ns.pin);
        self.lock().in_use.remove(&ns.index);
    }
}

impl NetPool {
    pub fn start(dir: PathBuf) -> std::io::Result<NetPool> {
        fs::create_dir_all(&dir)?;
        let shared = Arc::new(Shared {
            dir,
            state: Mutex::new(PoolState {
                ready: VecDeque::new(),
                release: Vec::new(),
                in_use: HashSet::new(),
                next: (std::process::id() * 7) % MAX_INDEX,
                stop: false,
            }),
            cv: Condvar::new(),
        });
        let s2 = shared.clone();
        let thread =
            std::thread::Builder::new().name("flare-netpool".into()).spawn(move || pool_thread(&s2))?;
        Ok(NetPool { shared, thread: Some(thread) })
    }

    /// Take a ready namespace (or make one now if the pool is empty).
    pub fn acquire(&self) -> Result<NetNs, String> {
        let ready = {
            let mut st = self.shared.lock();
            let r = st.ready.pop_front();
            self.shared.cv.notify_all();
            r
        };
        match ready {
            Some(ns) => Ok(ns),
            None => self.shared.make(),
        }
    }

    /// Give a used namespace back: it is recycled into the pool while the pool is below
    /// [`POOL_MAX`], else deleted in the background.
    ///
    /// Recycling is safe because containers lack CAP_NET_ADMIN (they cannot change the
    /// namespace's links, addresses, routes or firewall) and their sockets die with their
    /// processes. It also matters for speed: deleting a namespace with a veth makes the
    /// kernel wait for RCU grace periods, which delays the next container's cgroup join
    /// by ~10 ms on cgroup v1.
    pub fn release(&self, ns: NetNs) {
        let mut st = self.shared.lock();
        if st.ready.len() < POOL_MAX {
            st.ready.push_back(ns);
        } else {
            st.release.push(ns);
        }
        drop(st);
        self.shared.cv.notify_all();
    }

    /// Connect a container's own network namespace (`netns`, e.g. restored by CRIU)
    /// to the host with outbound NAT, as a pooled one is. Returns its index, for
    /// [`NetPool::detach`].
    pub fn attach(&self, netns: &std::os::fd::OwnedFd) -> Result<u32, String> {
        let index = self.shared.reserve().ok_or("no free 10.213.0.0/16 subnet")?;
        match attach_to(index, netns) {
            Ok(()) => Ok(index),
            Err(e) => {
                self.detach(index);
                Err(e)
            }
        }
    }

    /// Undo [`NetPool::attach`] (the namespace may be gone already, its veth with it).
    pub fn detach(&self, index: u32) {
        let name = host_if_name(index);
        if Path::new("/sys/class/net").join(&name).exists() {
            let _ = run("ip", &["link", "del", &name]);
        }
        self.shared.lock().in_use.remove(&index);
    }

    /// Remove pins and links of namespaces this pool does not know about.
    pub fn cleanup_stale(&self) -> usize {
        let keep = self.shared.lock().in_use.clone();
        cleanup_stale(&self.shared.dir, &keep)
    }
}

fn pool_thread(s: &Shared) {
    // Pool upkeep must not compete with container starts for the CPU: run it (and the
    // `ip` processes it spawns, which inherit the nice value) at low priority.
    crate::sys::lower_thread_priority(10);
    let mut failures = 0u32;
    loop {
        let (release, need, stop) = {
            let mut st = s.lock();
            loop {
                let need = st.ready.len() < POOL_TARGET && failures < 5;
                if st.stop || !st.release.is_empty() || need {
                    break;
                }
                st = s.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            (std::mem::take(&mut st.release), st.ready.len() < POOL_TARGET && failures < 5, st.stop)
        };
        for ns in release {
            s.free(ns);
        }
        if stop {
            let ready: Vec<NetNs> = s.lock().ready.drain(..).collect();
            for ns in ready {
                s.free(ns);
            }
            return;
        }
        if need {
            match s.make() {
                Ok(ns) => {
                    failures = 0;
                    tracing::debug!(index = ns.index, "network namespace ready");
                    s.lock().ready.push_back(ns);
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "could not prepare a network namespace");
                }
            }
        }
    }
}

impl Drop for NetPool {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_rules_drop_before_they_accept() {
        let rules = forward_rules("flv+");
        let accept = rules.iter().position(|r| r == "-i flv+ -j ACCEPT").unwrap();
        for drop in ["-i flv+ -o flv+ -j DROP", "-i flv+ -d 169.254.0.0/16 -j DROP"] {
            let at = rules.iter().position(|r| r == drop).unwrap();
            assert!(at < accept, "{drop} must come before the accept");
        }
    }

    #[test]
    fn subnet_math() {
        assert_eq!(addresses(0), ("10.213.0.1".into(), "10.213.0.2".into()));
        assert_eq!(addresses(64), ("10.213.1.1".into(), "10.213.1.2".into()));
        assert_eq!(addresses(16383), ("10.213.255.253".into(), "10.213.255.254".into()));
    }
}

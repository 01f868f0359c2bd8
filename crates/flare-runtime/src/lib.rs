//! Flare's container runtime: synchronous, no async runtime inside.
//!
//! [`Runtime::spawn`] creates a container in one `clone`: new pid, mount, UTS, IPC (and
//! network) namespaces; a pre-made cgroup with cpu/memory/pids limits (v1 or v2); an
//! overlay root (upper on a per-container tmpfs) over either the host's system directories
//! (read-only) or an image directory; a minimal `/dev`, `/proc`, read-only `/sys`, tmpfs
//! `/tmp`; user binds; `pivot_root`; a tiny init as pid 1; and for the program itself
//! dropped capabilities, `no_new_privs` and a seccomp filter (see `seccomp.json`).
//!
//! All mounts are made inside the container's own mount namespace, so they disappear with
//! it: nothing can leak on the host. See `child.rs` for the in-child code and the
//! capability set.

mod attach;
mod cgroup;
mod child;
mod command;
mod detached;
mod error;
mod etc;
mod net;
mod netconnect;
mod output;
mod plan;
mod restore;
pub mod seccomp;
mod sys;

use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use cgroup::{CgroupMode, DEFAULT_PIDS_MAX};
pub use child::KEPT_CAPS;
pub use command::{base_env, set_env, CommandExit, CommandRunner, CommandSpec, BASE_ENV};
pub use error::RuntimeError;
pub use netconnect::{connect_in_netns, NsStream, NsTarget};
pub use output::LogDecoder;
pub use restore::RestoreTarget;
pub use sys::pipe_cloexec;

/// Return freed heap memory to the system. Containers are cloned from the calling
/// process and clone copies its page tables (and each container's init keeps its pages
/// copy-on-write), so a heap left large by one big piece of work slows every later start.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One malloc arena for the process that spawns containers: with one per thread (glibc's
/// default) memory a big request freed stays with its thread's arena, out of reach of
/// [`trim_heap`]. Call first thing in `main`, before any thread exists.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Raises the soft limit of open files to the hard limit (a server holding thousands of
/// web connections, each proxied to a container, needs more than the usual 1024); answers
/// the limit now in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

use cgroup::{CgroupLayout, ContainerCgroup};
use child::{ChildErr, ChildPlan, Step};
use error::IoContext;
use net::{NetNs, NetPool};

/// How the runtime is set up on this host.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Runtime state, e.g. `$FLARE_HOME/run`; containers live under `state_dir/containers/<id>`.
    pub state_dir: PathBuf,
    /// cgroup parent name, e.g. `flare` -> `/sys/fs/cgroup/<ctrl>/flare/<id>` (v1) or
    /// `/sys/fs/cgroup/flare/<id>` (v2).
    pub cgroup_parent: String,
    /// Set up the NAT network pool.
    pub enable_nat: bool,
    /// Run containers in a user namespace that maps these host ids (`None`: no user
    /// namespace; only for hosts that cannot create one).
    pub userns: Option<UserNamespace>,
}

/// The ids a container's user namespace maps: container uid/gid `n` (for `n < size`) is
/// host uid/gid `host_base + n`. Every container uses the same range, so files that must
/// look owned by root inside (image files, a build's upper dir) are owned by `host_base`
/// on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserNamespace {
    pub host_base: u32,
    pub size: u32,
}

impl UserNamespace {
    /// The default range: 65,536 ids from 1,000,000,000 (far above any real account).
    pub const DEFAULT: UserNamespace = UserNamespace { host_base: 1_000_000_000, size: 65_536 };

    /// The host id that container id `id` maps to (ids past the range map to the host's
    /// overflow id, as the kernel shows them).
    pub fn to_host(&self, id: u32) -> u32 {
        if id < self.size {
            self.host_base + id
        } else {
            65_534
        }
    }

    /// The container id of host id `id`, if it is in the range.
    pub fn to_container(&self, id: u32) -> Option<u32> {
        id.checked_sub(self.host_base).filter(|n| *n < self.size)
    }
}

/// The container's root file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rootfs {
    /// The host's own environment, read-only: an overlay (lower = a generated skeleton,
    /// upper = a per-container tmpfs) with read-only binds of the host's system dirs that
    /// exist among /usr /lib /lib32 /lib64 /libx32 /bin /sbin /etc /opt (top-level
    /// symlinks such as /bin -> usr/bin are replicated as symlinks in the skeleton), and
    /// /etc/shadow, /etc/gshadow masked by /dev/null.
    Host,
    /// An image root directory used as the overlay lower dir.
    Dir(PathBuf),
}

/// A bind mount into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Host path.
    pub src: PathBuf,
    /// Absolute path in the container; the mountpoint is created if missing.
    pub dst: PathBuf,
    /// Remount read-only.
    pub readonly: bool,
}

/// Resource limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// CPU quota in thousandths of a CPU.
    pub cpu_millicores: Option<u64>,
    /// Memory limit (swap is not allowed beyond it).
    pub memory_bytes: Option<u64>,
    /// Max tasks; [`DEFAULT_PIDS_MAX`] when `None`.
    pub pids_max: Option<u64>,
    /// Size of the writable root layer (a tmpfs, unless the spec keeps its upper dir on the
    /// host) and, separately, of `/tmp`; [`DEFAULT_DISK_BYTES`] when `None`. Both are
    /// memory and count against `memory_bytes` as they fill.
    pub disk_bytes: Option<u64>,
    /// Size of `/dev/shm`; [`DEFAULT_SHM_BYTES`] when `None`.
    pub shm_bytes: Option<u64>,
}

/// Default size of a container's writable root layer and of its `/tmp`.
pub const DEFAULT_DISK_BYTES: u64 = 4 << 30;
/// Default size of a container's `/dev/shm`.
pub const DEFAULT_SHM_BYTES: u64 = 1 << 30;

/// The container's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// Own network namespace with only `lo` (up).
    Isolated,
    /// Own network namespace with outbound NAT.
    Nat,
}

/// What to run and how: a [`CommandSpec`] with the file descriptors the program gets.
#[derive(Debug)]
pub struct ContainerSpec {
    pub command: CommandSpec,
    /// stdin is /dev/null.
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// (fd, number it must have in the container), e.g. a unix socket as fd 3.
    pub extra_fds: Vec<(OwnedFd, RawFd)>,
}

/// How the container's program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code if it exited normally.
    pub code: Option<i32>,
    /// Signal number if it was killed by a signal.
    pub signal: Option<i32>,
    /// The cgroup's OOM killer fired.
    pub oom_killed: bool,
}

impl ExitInfo {
    fn from_status(status: i32, oom_killed: bool) -> ExitInfo {
        if libc::WIFEXITED(status) {
            ExitInfo { code: Some(libc::WEXITSTATUS(status)), signal: None, oom_killed }
        } else {
            ExitInfo { code: None, signal: Some(libc::WTERMSIG(status)), oom_killed }
        }
    }
}

const SYSTEM_DIRS: [&str; 9] = ["usr", "lib", "lib32", "lib64", "libx32", "bin", "sbin", "etc", "opt"];
const SKELETON_DIRS: [&str; 10] = ["proc", "dev", "sys", "tmp", "root", "run", "var", "home", "mnt", "srv"];
const DEV_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
const CLONE_STACK: usize = 256 * 1024;
/// How long a container's set-up (clone to exec) may take before it is killed.
const SETUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

struct Inner {
    cfg: RuntimeConfig,
    cgroups: CgroupLayout,
    skeleton: PathBuf,
    /// System dirs (relative names) that are real directories on the host, bound read-only.
    host_dirs: Vec<String>,
    /// The minimal `/etc` that `Rootfs::Host` containers see instead of the host's.
    etc_dir: PathBuf,
    /// The dir whose `rootfs` every spawned container attaches its root overlay on, in its
    /// own (private) mount namespace before `pivot_root`: made once here, so that a spawn
    /// makes no mountpoint of its own (a `mkdir` on a busy ext4 state dir took ~0.4-1 ms).
    spawn_root: PathBuf,
    /// The host's network namespace (the spawning thread returns to it after joining a
    /// pooled one to clone a NAT container).
    host_netns: OwnedFd,
    /// A user namespace with the containers' id map, for idmapped read-only binds (host
    /// root's files show as the container's root's); `None` without user namespaces.
    idmap: Option<OwnedFd>,
    nat: Result<NetPool, String>,
    seccomp: Vec<libc::sock_filter>,
    cap_last: u32,
}

/// The container runtime. `Send + Sync`: share it behind an `Arc`.
pub struct Runtime {
    inner: Arc<Inner>,
}

// SAFETY: sock_filter is plain data; nothing in Inner is tied to a thread.
unsafe impl Send for Inner {}
// SAFETY: as above; Inner is only read after construction (the pool has its own lock).
unsafe impl Sync for Inner {}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Build (idempotently) the skeleton lower dir for `Rootfs::Host` at `dir`, mirroring
/// `host_root`. Returns the system dirs that are real directories (to be bound).
pub(crate) fn build_skeleton(
    dir: &Path,
    host_root: &Path,
    owner: (u32, u32),
) -> Result<Vec<String>, RuntimeError> {
    use std::os::unix::fs::{lchown, symlink, PermissionsExt};
    fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
    let mut bound = Vec::new();
    for name in SYSTEM_DIRS {
        let host = host_root.join(name);
        let ours = dir.join(name);
        let Ok(meta) = fs::symlink_metadata(&host) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&host).ctx(|| format!("readlink {}", host.display()))?;
            match fs::read_link(&ours) {
                Ok(t) if t == target => {}
                _ => {
                    let _ = fs::remove_dir(&ours);
                    let _ = fs::remove_file(&ours);
                    symlink(&target, &ours).ctx(|| format!("symlink {}", ours.display()))?;
                }
            }
        } else if meta.is_dir() {
            if fs::symlink_metadata(&ours).map(|m| m.file_type().is_symlink()).unwrap_or(false) {
                let _ = fs::remove_file(&ours);
            }
            fs::create_dir_all(&ours).ctx(|| format!("create {}", ours.display()))?;
            bound.push(name.to_string());
        }
    }
    for name in SKELETON_DIRS {
        let p = dir.join(name);
        fs::create_dir_all(&p).ctx(|| format!("create {}", p.display()))?;
        let mode = match name {
            "tmp" => 0o1777,
            "root" => 0o700,
            _ => 0o755,
        };
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).ctx(|| format!("chmod {}", p.display()))?;
        // Owned by the container's root, who may then write in them (copy-up keeps owners).
        lchown(&p, Some(owner.0), Some(owner.1)).ctx(|| format!("chown {}", p.display()))?;
    }
    Ok(bound)
}

impl Runtime {
    /// Detect the cgroup mode, check overlay support, build the host skeleton root and
    /// start the network pool.
    pub fn new(cfg: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        if !valid_id(&cfg.cgroup_parent) {
            return Err(RuntimeError::InvalidSpec(format!(
                "cgroup_parent {:?} must match [a-zA-Z0-9_-]+",
                cfg.cgroup_parent
            )));
        }
        let filesystems = fs::read_to_string("/proc/filesystems").ctx(|| "read /proc/filesystems".into())?;
        if !filesystems.lines().any(|l| l.split_whitespace().last() == Some("overlay")) {
            return Err(RuntimeError::Unsupported("the kernel has no overlayfs (modprobe overlay)".into()));
        }
        let cgroups = CgroupLayout::detect(&cfg.cgroup_parent)?;
        cgroups.setup_parent()?;
        let dynmods = cgroup::favor_dynmods(Path::new(cgroup::DYNMODS_MOUNT));
        let containers = cfg.state_dir.join("containers");
        fs::create_dir_all(&containers).ctx(|| format!("create {}", containers.display()))?;
        let owner = cfg.userns.map(|u| (u.host_base, u.host_base)).unwrap_or((0, 0));
        let skeleton = cfg.state_dir.join("skeleton");
        let host_dirs = build_skeleton(&skeleton, Path::new("/"), owner)?;
        let etc_dir = cfg.state_dir.join("etc");
        etc::build_minimal_etc(Path::new("/etc"), &etc_dir)?;
        let spawn_root = cfg.state_dir.join("spawn");
        let mountpoint = spawn_root.join("rootfs");
        fs::create_dir_all(&mountpoint).ctx(|| format!("create {}", mountpoint.display()))?;
        let host_netns = fs::File::open("/proc/thread-self/ns/net")
            .map(OwnedFd::from)
            .ctx(|| "open the host's network namespace".into())?;
        let idmap = match cfg.userns {
            Some(u) => {
                if u.size == 0 || u.host_base == 0 || u.host_base.checked_add(u.size).is_none() {
                    return Err(RuntimeError::InvalidSpec(format!(
                        "user namespace range {u:?} is not valid"
                    )));
                }
                Some(
                    detached::userns_fd(u.host_base, u.size)
                        .ctx(|| "create a user namespace (is user.max_user_namespaces 0?)".into())?,
                )
            }
            None => None,
        };
        let seccomp = seccomp::default_program()?;
        let cap_last = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40);
        let nat = if cfg.enable_nat {
            // Leftovers of a crashed previous run, before the pool starts filling the dir.
            net::cleanup_stale(&cfg.state_dir.join("netns"), &Default::default());
            net::setup_host().and_then(|()| {
                NetPool::start(cfg.state_dir.join("netns")).map_err(|e| format!("start network pool: {e}"))
            })
        } else {
            Err("NAT networking is disabled in the runtime configuration".to_string())
        };
        tracing::info!(
            cgroup_mode = ?cgroups.mode,
            cgroup_dirs = ?cgroups.parent_dirs(),
            host_dirs = ?host_dirs,
            nat = ?nat.as_ref().err(),
            seccomp_instructions = seccomp.len(),
            fast_cgroup_join = ?dynmods,
            "container runtime ready"
        );
        Ok(Runtime {
            inner: Arc::new(Inner {
                cfg,
                cgroups,
                skeleton,
                host_dirs,
                etc_dir,
                spawn_root,
                host_netns,
                idmap,
                nat,
                seccomp,
                cap_last,
            }),
        })
    }

    /// The user namespace containers run in, if any.
    pub fn userns(&self) -> Option<UserNamespace> {
        self.inner.cfg.userns
    }

    /// The host's cgroup mode.
    pub fn cgroup_mode(&self) -> CgroupMode {
        self.inner.cgroups.mode
    }

    /// `None` if NAT networking works, otherwise why not.
    /// The host-sourced bind mounts a container of `spec` gets whose sources may lie on
    /// paths others cannot search: (container path, host source) of the generated `/etc`
    /// (`Rootfs::Host`) and of every spec bind. (The system dirs and device nodes come
    /// from world-searchable host paths.) A checkpoint's restore needs them staged.
    pub fn private_binds(&self, spec: &CommandSpec) -> Vec<(PathBuf, PathBuf)> {
        let mut out = Vec::new();
        if matches!(spec.rootfs, Rootfs::Host) && self.inner.host_dirs.iter().any(|d| d == "etc") {
            out.push((PathBuf::from("/etc"), self.inner.etc_dir.clone()));
        }
        out.extend(spec.binds.iter().map(|b| (b.dst.clone(), b.src.clone())));
        out
    }

    pub fn nat_available(&self) -> Option<String> {
        self.inner.nat.as_ref().err().cloned()
    }

    /// Kill and remove leftovers of a previous run: cgroups under the parent, state dirs,
    /// pinned network namespaces. Returns how many containers were cleaned up.
    pub fn cleanup_stale(&self) -> Result<usize, RuntimeError> {
        let inner = &self.inner;
        let mut count = 0;
        for (name, cg) in inner.cgroups.children() {
            tracing::info!(container = %name, "removing stale container cgroup");
            cg.kill_all();
            cg.remove()?;
            count += 1;
        }
        let containers = inner.cfg.state_dir.join("containers");
        if let Ok(rd) = fs::read_dir(&containers) {
            for e in rd.flatten() {
                let p = e.path();
                // Mounts were private to the container's namespace; a lazy unmount is only a
                // safety net for odd hosts.
                let _ = sys::umount_detach(&p.join("rootfs"));
                let _ = sys::umount_detach(&p.join("scratch"));
                fs::remove_dir_all(&p).ctx(|| format!("remove {}", p.display()))?;
                count += 1;
            }
        }
        if let Ok(pool) = &inner.nat {
            count += pool.cleanup_stale();
        }
        Ok(count)
    }

    /// Create and start a container. Returns once the program has been exec'd (or with
    /// [`RuntimeError::Setup`] naming the step that failed).
    /// The new container `id`'s state dir, owned by the returned resources.
    fn container_dir(&self, id: &str) -> Result<(PathBuf, Resources), RuntimeError> {
        let dir = self.inner.cfg.state_dir.join("containers").join(id);
        fs::create_dir(&dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                RuntimeError::InvalidSpec(format!("container id {id:?} is already in use"))
            } else {
                RuntimeError::io(format!("create {}", dir.display()), e)
            }
        })?;
        let res = Resources {
            inner: self.inner.clone(),
            dir: Some(dir.clone()),
            cgroup: None,
            netns: None,
            root_mount: None,
            attached_nat: None,
        };
        Ok((dir, res))
    }

    pub fn spawn(&self, spec: ContainerSpec) -> Result<Container, RuntimeError> {
        let inner = &self.inner;
        validate(&spec)?;
        // The dir holds no mountpoint (see `Inner::spawn_root`); it claims the id.
        let (_dir, mut res) = self.container_dir(&spec.command.id)?;
        let cg = inner.cgroups.create(&spec.command.id, &spec.command.limits)?;
        let procs = cg.open_procs();
        res.cgroup = Some(cg);
        let procs = procs?;
        let netns = match spec.command.network {
            Network::Isolated => None,
            Network::Nat => {
                let pool = inner.nat.as_ref().map_err(|r| RuntimeError::NetworkUnavailable(r.clone()))?;
                let ns = pool.acquire().map_err(RuntimeError::NetworkUnavailable)?;
                let f = fs::File::open(&ns.pin);
                let pin = ns.pin.clone();
                res.netns = Some(ns);
                Some(OwnedFd::from(f.ctx(|| format!("open {}", pin.display()))?))
            }
        };
        // A NAT container is cloned from this thread while it is in the pooled namespace
        // (the namespace belongs to the host's user namespace, so the container, in a user
        // namespace of its own, could not join it itself); its /sys is made here too.
        let in_netns = match &netns {
            Some(fd) => Some(NetnsGuard::enter(fd, &inner.host_netns)?),
            None => None,
        };
        let sysfs = match &in_netns {
            Some(_) => Some(
                detached::sysfs(
                    libc::MOUNT_ATTR_RDONLY
                        | libc::MOUNT_ATTR_NOSUID
                        | libc::MOUNT_ATTR_NODEV
                        | libc::MOUNT_ATTR_NOEXEC,
                )
                .ctx(|| "mount the container's sysfs".into())?,
            ),
            None => None,
        };

        let (mut plan, prep) = plan::build_plan(inner, &spec, &inner.spawn_root, sysfs)?;
        plan.loopback_up = spec.command.network == Network::Isolated;
        plan.cgroup_fds = procs.iter().map(|f| f.as_raw_fd()).collect();
        let (err_r, err_w) = sys::pipe_cloexec().ctx(|| "create pipe".into())?;
        plan.err_fd = err_w.as_raw_fd();
        let sync = match inner.cfg.userns {
            Some(_) => Some(sys::pipe_cloexec().ctx(|| "create pipe".into())?),
            None => None,
        };
        plan.sync_fd = sync.as_ref().map_or(-1, |(r, _)| r.as_raw_fd());
        let page = sys::SharedPage::new().ctx(|| "mmap status page".into())?;
        plan.status_page = page.as_ptr();
        let stack = sys::Stack::new(CLONE_STACK).ctx(|| "mmap clone stack".into())?;
        // The main process's, in init's copy of memory (see child::setup_and_run).
        let main_stack = (!plan.no_init)
            .then(|| sys::Stack::new(CLONE_STACK))
            .transpose()
            .ctx(|| "mmap clone stack".into())?;
        plan.main_stack = main_stack.as_ref().map_or(std::ptr::null_mut(), |s| s.top());

        let mut flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if spec.command.network == Network::Isolated {
            flags |= libc::CLONE_NEWNET;
        }
        if inner.cfg.userns.is_some() {
            flags |= libc::CLONE_NEWUSER;
        }
        // SAFETY: child_main only uses the plan (kept alive until after clone returns in the
        // parent; the child has its own copy of memory) and raw syscalls; the stack is a
        // fresh mapping of CLONE_STACK bytes.
        let pid = unsafe {
            libc::clone(
                child::child_main,
                stack.top(),
                flags | libc::SIGCHLD,
                (&mut plan as *mut ChildPlan).cast(),
            )
        };
        let clone_err = std::io::Error::last_os_error();
        drop(in_netns);
        if pid < 0 {
            return Err(RuntimeError::io("clone the container", clone_err));
        }
        // Close our copies of everything the child inherited.
        drop(err_w);
        drop(stack);
        drop(main_stack);
        drop(procs);
        drop(netns);
        drop(spec.stdout);
        drop(spec.stderr);
        drop(spec.extra_fds);
        let mut map_err = None;
        if let (Some(u), Some((sync_r, sync_w))) = (inner.cfg.userns, sync) {
            drop(sync_r);
            let map = format!("0 {} {}\n", u.host_base, u.size);
            let written = fs::write(format!("/proc/{pid}/uid_map"), &map)
                .and_then(|()| fs::write(format!("/proc/{pid}/gid_map"), &map))
                .and_then(|()| sys::write_all(&sync_w, b"1"));
            if let Err(e) = written {
                map_err = Some(e);
            }
            // Dropping the write end: EOF for a child still waiting (it then gives up).
        }
        drop(prep.fds);

        let pidfd = sys::pidfd_open(pid);
        let mut buf = [0u8; 12];
        // The child closes the pipe at exec (or writes why it failed); one that hangs in
        // set-up must not pin the caller.
        let n = sys::read_to_eof(&err_r, &mut buf, std::time::Instant::now() + SETUP_TIMEOUT);
        let failure = match (&pidfd, n) {
            (Err(e), _) => Some(RuntimeError::io("pidfd_open", std::io::Error::from(e.kind()))),
            (_, Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => Some(RuntimeError::Setup {
                step: format!("set-up (not finished after {} s)", SETUP_TIMEOUT.as_secs()),
                errno: libc::ETIMEDOUT,
            }),
            (_, Err(e)) => Some(RuntimeError::io("read container set-up status", e)),
            (_, Ok(12)) => {
                let e = ChildErr::decode(&buf);
                let step = Step::from_u32(e.step);
                let name = match step {
                    Some(Step::Op) => plan
                        .ops
                        .get(e.index as usize)
                        .map(|o| o.label.clone())
                        .unwrap_or_else(|| "filesystem".into()),
                    Some(s) => s.name().to_string(),
                    None => format!("step {}", e.step),
                };
                Some(RuntimeError::Setup { step: name, errno: e.errno })
            }
            (_, Ok(0)) => map_err.map(|e| RuntimeError::io("write the user namespace's id maps", e)),
            (_, Ok(k)) => {
                Some(RuntimeError::Setup { step: format!("truncated status ({k} bytes)"), errno: libc::EIO })
            }
        };
        if let Some(err) = failure {
            sys::kill(pid, libc::SIGKILL);
            let _ = sys::waitpid(pid, false);
            res.release()?;
            return Err(err);
        }
        let pidfd = pidfd.ctx(|| "pidfd_open".into())?;
        tracing::debug!(container = %res.id(), pid, "container started");
        Ok(Container {
            id: spec.command.id,
            pid,
            pidfd,
            page,
            scratch: prep.scratch,
            memory_limit: spec.command.limits.memory_bytes,
            exit: None,
            res,
        })
    }
}

fn validate(spec: &ContainerSpec) -> Result<(), RuntimeError> {
    let bad = |m: String| Err(RuntimeError::InvalidSpec(m));
    if !valid_id(&spec.command.id) {
        return bad(format!("id {:?} must match [a-zA-Z0-9_-]+", spec.command.id));
    }
    if spec.command.argv.is_empty() || !spec.command.argv[0].starts_with('/') {
        return bad("argv[0] must be an absolute path".into());
    }
    if spec.command.checkpointable && spec.command.network != Network::Isolated {
        return bad("a checkpointable container needs its own network namespace (Network::Isolated)".into());
    }
    if !spec.command.cwd.starts_with('/') {
        return bad("cwd must be absolute".into());
    }
    if spec.command.hostname.len() > 64 {
        return bad("hostname longer than 64 bytes".into());
    }
    for (k, _) in &spec.command.env {
        if k.is_empty() || k.contains('=') {
            return bad(format!("invalid environment variable name {k:?}"));
        }
    }
    let mut targets: Vec<RawFd> = spec.extra_fds.iter().map(|(_, t)| *t).collect();
    targets.sort_unstable();
    targets.dedup();
    if targets.len() != spec.extra_fds.len() || targets.iter().any(|t| *t < 3 || *t > 1 << 20) {
        return bad("extra fd targets must be distinct and >= 3".into());
    }
    for b in &spec.command.binds {
        if !b.dst.is_absolute() || b.dst.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return bad(format!("bind destination {} must be absolute without '..'", b.dst.display()));
        }
    }
    Ok(())
}

/// The calling thread inside another network namespace until dropped.
struct NetnsGuard<'a> {
    host: &'a OwnedFd,
}

impl<'a> NetnsGuard<'a> {
    fn enter(ns: &OwnedFd, host: &'a OwnedFd) -> Result<NetnsGuard<'a>, RuntimeError> {
        sys::setns(ns, libc::CLONE_NEWNET).ctx(|| "join the container's network namespace".into())?;
        Ok(NetnsGuard { host })
    }
}

impl Drop for NetnsGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = sys::setns(self.host, libc::CLONE_NEWNET) {
            // A thread left in a container's namespace would open the daemon's own
            // connections from there: stop rather than go on like that.
            panic!("cannot return to the host's network namespace: {e}");
        }
    }
}

/// Host resources of one container, released exactly once.
struct Resources {
    inner: Arc<Inner>,
    dir: Option<PathBuf>,
    cgroup: Option<ContainerCgroup>,
    netns: Option<NetNs>,
    /// A root mounted on the host (restored containers), unmounted before `dir` goes.
    root_mount: Option<PathBuf>,
    /// The NAT link given to the container's own namespace ([`Container::attach_nat`]).
    attached_nat: Option<u32>,
}

impl Resources {
    fn id(&self) -> String {
        self.dir
            .as_ref()
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn release(&mut self) -> Result<(), RuntimeError> {
        let mut first_err = None;
        if let Some(cg) = self.cgroup.take() {
            if let Err(e) = cg.remove() {
                cg.kill_all();
                if let Err(e2) = cg.remove() {
                    tracing::warn!(error = %e, "cgroup removal failed");
                    first_err.get_or_insert(e2);
                }
            }
        }
        if let (Some(index), Ok(pool)) = (self.attached_nat.take(), &self.inner.nat) {
            pool.detach(index);
        }
        if let Some(ns) = self.netns.take() {
            match &self.inner.nat {
                Ok(pool) => pool.release(ns),
                Err(_) => net::destroy(ns.index, &ns.pin),
            }
        }
        if let Some(root) = self.root_mount.take() {
            if let Err(e) = sys::umount_detach(&root) {
                // Never remove files through a root that is still mounted.
                self.dir = None;
                first_err.get_or_insert(RuntimeError::io(format!("unmount {}", root.display()), e));
            }
        }
        if let Some(dir) = self.dir.take() {
            if let Err(e) = fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    first_err.get_or_insert(RuntimeError::io(format!("remove {}", dir.display()), e));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!(error = %e, "container resources not fully released");
        }
    }
}

/// A running (or exited, not yet cleaned up) container.
pub struct Container {
    id: String,
    pid: i32,
    pidfd: OwnedFd,
    page: sys::SharedPage,
    /// The tmpfs under the root overlay's upper layer (none when it is a host dir).
    scratch: Option<OwnedFd>,
    memory_limit: Option<u64>,
    exit: Option<ExitInfo>,
    res: Resources,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("id", &self.id)
            .field("pid", &self.pid)
            .field("exit", &self.exit)
            .finish()
    }
}

impl Container {
    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Host pid of the container's init.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// A pidfd for init: readable once it has exited.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    fn finish(&mut self, init_status: i32) -> ExitInfo {
        let status = self.page.read_status().unwrap_or(init_status);
        let oom = self.res.cgroup.as_ref().map_or(0, |c| c.oom_kills()) > 0;
        let info = ExitInfo::from_status(status, oom);
        tracing::debug!(container = %self.id, ?info, "container exited");
        self.exit = Some(info);
        info
    }

    /// Non-blocking: `Some` once the container has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitInfo>, RuntimeError> {
        if let Some(e) = self.exit {
            return Ok(Some(e));
        }
        match sys::waitpid(self.pid, true).ctx(|| format!("waitpid {}", self.pid))? {
            Some(st) => Ok(Some(self.finish(st))),
            None => Ok(None),
        }
    }

    /// Block until the container exits.
    pub fn wait(&mut self) -> Result<ExitInfo, RuntimeError> {
        if let Some(e) = self.exit {
            return Ok(e);
        }
        let st = sys::waitpid(self.pid, false).ctx(|| format!("waitpid {}", self.pid))?.unwrap_or(0);
        Ok(self.finish(st))
    }

    /// SIGKILL init; the kernel then kills every process in the container.
    pub fn kill(&self) -> Result<(), RuntimeError> {
        if self.exit.is_some() {
            return Ok(());
        }
        // SAFETY: pidfd_send_signal with a valid pidfd and no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(RuntimeError::io(format!("kill container {}", self.id), e));
            }
        }
        Ok(())
    }

    /// The memory limit, if any.
    pub fn memory_limit(&self) -> Option<u64> {
        self.memory_limit
    }

    /// (used, size) bytes of the container's writable root layer, when it is a tmpfs.
    pub fn disk_usage(&self) -> Option<(u64, u64)> {
        self.scratch.as_ref().and_then(|fd| detached::usage(fd).ok())
    }

    /// Give a container with its own network namespace (`Network::Isolated`: a
    /// checkpointable one, or one restored from a checkpoint) outbound NAT, as
    /// `Network::Nat` containers have from the start. Done by the host: the container
    /// cannot change its links, addresses or routes (no CAP_NET_ADMIN).
    pub fn attach_nat(&mut self) -> Result<(), RuntimeError> {
        if self.res.attached_nat.is_some() || self.res.netns.is_some() {
            return Ok(());
        }
        let pool = self.res.inner.nat.as_ref().map_err(|r| RuntimeError::NetworkUnavailable(r.clone()))?;
        let path = format!("/proc/{}/ns/net", self.pid);
        let ns = OwnedFd::from(fs::File::open(&path).ctx(|| format!("open {path}"))?);
        let index = pool.attach(&ns).map_err(RuntimeError::NetworkUnavailable)?;
        self.res.attached_nat = Some(index);
        Ok(())
    }

    /// Copy the root overlay's upper layer (what the container wrote to its root file
    /// system, and the mountpoints the runtime made for its binds) to the new dir `dest`,
    /// owners, modes and whiteouts kept: a restore of a checkpoint seeds its root with it.
    /// Only for a container whose upper layer is on its own tmpfs.
    pub fn copy_upper(&self, dest: &Path) -> Result<(), RuntimeError> {
        let fd = self
            .scratch
            .as_ref()
            .ok_or_else(|| RuntimeError::InvalidSpec("the container's upper layer is a host dir".into()))?;
        // Seen through this process's fd table (the copying child has its own).
        let src = format!("/proc/{}/fd/{}/upper", std::process::id(), fd.as_raw_fd());
        restore::copy_tree(Path::new(&src), dest)
    }

    /// Current memory usage of the container's cgroup.
    pub fn memory_usage(&self) -> Option<u64> {
        self.res.cgroup.as_ref().and_then(|c| c.memory_usage())
    }

    /// Remove everything the container left on the host. Kills and reaps it first if it
    /// is still running.
    pub fn cleanup(mut self) -> Result<(), RuntimeError> {
        if self.exit.is_none() {
            self.kill()?;
            self.wait()?;
        }
        self.res.release()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.kill();
            let _ = self.wait();
        }
        // Resources::drop releases whatever cleanup() did not.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("abc-DEF_123"));
        assert!(!valid_id(""));
        assert!(!valid_id("a/b"));
        assert!(!valid_id("a.b"));
    }

    #[test]
    fn skeleton_mirrors_host() {
        let tmp = std::env::temp_dir().join(format!("flare-skel-{}", std::process::id()));
        let host = tmp.join("host");
        fs::create_dir_all(host.join("usr/bin")).unwrap();
        fs::create_dir_all(host.join("etc")).unwrap();
        std::os::unix::fs::symlink("usr/bin", host.join("bin")).unwrap();
        let skel = tmp.join("skel");
        let bound = build_skeleton(&skel, &host, (0, 0)).unwrap();
        assert_eq!(bound, vec!["usr".to_string(), "etc".to_string()]);
        assert_eq!(fs::read_link(skel.join("bin")).unwrap(), PathBuf::from("usr/bin"));
        assert!(skel.join("proc").is_dir());
        // idempotent
        build_skeleton(&skel, &host, (0, 0)).unwrap();
        fs::remove_dir_all(&tmp).unwrap();
    }
}

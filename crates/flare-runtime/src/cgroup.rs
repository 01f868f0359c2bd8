//! cgroups v1 (per-controller hierarchies) and v2 (unified), detected from the mount table.
//!
//! Hybrid hosts (v1 controllers plus a controller-less cgroup2 at `/sys/fs/cgroup/unified`)
//! are treated as v1: a cgroup2 mount only counts when it actually offers the memory
//! controller.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::IoContext;
use crate::{Limits, RuntimeError};

/// Which cgroup hierarchy the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// Legacy per-controller hierarchies (cpu, memory, pids).
    V1,
    /// The unified hierarchy.
    V2,
}

/// Default `pids.max` when `Limits::pids_max` is `None`.
pub const DEFAULT_PIDS_MAX: u64 = 4096;
const CFS_PERIOD_US: u64 = 100_000;

/// Where the hierarchies live on this host.
#[derive(Debug, Clone)]
pub(crate) struct CgroupLayout {
    pub mode: CgroupMode,
    /// V1: mount points of the cpu, memory and pids controllers (in that order).
    /// V2: the single cgroup2 mount point.
    cpu: PathBuf,
    memory: PathBuf,
    pids: PathBuf,
    parent: String,
}

/// Parse `/proc/self/mounts`-format text into (mount point, fstype, options) triples.
fn parse_mounts(text: &str) -> Vec<(String, String, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _src = f.next()?;
            let mp = f.next()?;
            let ty = f.next()?;
            let opts = f.next()?.split(',').map(str::to_owned).collect();
            Some((mp.to_owned(), ty.to_owned(), opts))
        })
        .collect()
}

impl CgroupLayout {
    /// Detect from mount-table text; `controllers_of` reads a v2 mount's `cgroup.controllers`.
    pub fn detect_from(
        mounts: &str,
        parent: &str,
        controllers_of: impl Fn(&Path) -> Option<String>,
    ) -> Result<Self, RuntimeError> {
        let mounts = parse_mounts(mounts);
        for (mp, ty, _) in &mounts {
            if ty == "cgroup2" {
                let p = PathBuf::from(mp);
                if let Some(c) = controllers_of(&p) {
                    if c.split_whitespace().any(|c| c == "memory") {
                        return Ok(CgroupLayout {
                            mode: CgroupMode::V2,
                            cpu: p.clone(),
                            memory: p.clone(),
                            pids: p,
                            parent: parent.to_owned(),
                        });
                    }
                }
            }
        }
        let find = |ctrl: &str| {
            mounts
                .iter()
                .find(|(_, ty, opts)| ty == "cgroup" && opts.iter().any(|o| o == ctrl))
                .map(|(mp, _, _)| PathBuf::from(mp))
                .ok_or_else(|| {
                    RuntimeError::Unsupported(format!(
                        "no cgroup2 mount with the memory controller and no cgroup v1 '{ctrl}' hierarchy"
                    ))
                })
        };
        Ok(CgroupLayout {
            mode: CgroupMode::V1,
            cpu: find("cpu")?,
            memory: find("memory")?,
            pids: find("pids")?,
            parent: parent.to_owned(),
        })
    }

    pub fn detect(parent: &str) -> Result<Self, RuntimeError> {
        let mounts = fs::read_to_string("/proc/self/mounts").ctx(|| "read /proc/self/mounts".into())?;
        Self::detect_from(&mounts, parent, |p| fs::read_to_string(p.join("cgroup.controllers")).ok())
    }

    /// Distinct hierarchy roots (v1 controllers may be co-mounted).
    fn roots(&self) -> Vec<&Path> {
        let mut v: Vec<&Path> = Vec::new();
        for p in [&self.cpu, &self.memory, &self.pids] {
            if !v.contains(&p.as_path()) {
                v.push(p);
            }
        }
        v
    }

    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        self.roots().iter().map(|r| r.join(&self.parent)).collect()
    }

    /// Create the parent group(s); on v2 delegate cpu, memory and pids to children.
    pub fn setup_parent(&self) -> Result<(), RuntimeError> {
        for dir in self.parent_dirs() {
            fs::create_dir_all(&dir).ctx(|| format!("create cgroup {}", dir.display()))?;
        }
        if self.mode == CgroupMode::V2 {
            let root = &self.memory;
            let parent = root.join(&self.parent);
            for dir in [root.as_path(), parent.as_path()] {
                for c in ["+cpu", "+memory", "+pids"] {
                    let f = dir.join("cgroup.subtree_control");
                    if let Err(e) = fs::write(&f, c) {
                        // The root's may already be managed by systemd; only the parent's matters.
                        if dir == parent {
                            return Err(RuntimeError::io(format!("enable {c} in {}", f.display()), e));
                        }
                        tracing::debug!(file = %f.display(), controller = c, error = %e, "could not enable controller");
                    }
                }
            }
        }
        Ok(())
    }

    /// Existing child groups under the parent (leftovers).
    pub fn children(&self) -> Vec<(String, ContainerCgroup)> {
        let mut names = std::collections::BTreeSet::new();
        for dir in self.parent_dirs() {
            if let Ok(rd) = fs::read_dir(&dir) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        names.insert(e.file_name().to_string_lossy().into_owned());
                    }
                }
            }
        }
        names
            .into_iter()
            .map(|n| {
                let cg = self.group(&n);
                (n, cg)
            })
            .collect()
    }

    fn group(&self, id: &str) -> ContainerCgroup {
        let dirs = self.parent_dirs().into_iter().map(|d| d.join(id)).collect();
        ContainerCgroup { mode: self.mode, dirs, memory: self.memory.join(&self.parent).join(id) }
    }

    /// Create the container's group(s) and write the limits.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<ContainerCgroup, RuntimeError> {
        let cg = self.group(id);
        for d in &cg.dirs {
            fs::create_dir(d).ctx(|| format!("create cgroup {}", d.display()))?;
        }
        if let Err(e) = cg.write_limits(self, limits) {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }
}

/// Write `value` to `dir/file`.
fn write_file(dir: &Path, file: &str, value: &str) -> Result<(), RuntimeError> {
    let p = dir.join(file);
    fs::write(&p, value).ctx(|| format!("write {value:?} to {}", p.display()))
}

/// One container's cgroup directories.
#[derive(Debug)]
pub(crate) struct ContainerCgroup {
    mode: CgroupMode,
    dirs: Vec<PathBuf>,
    memory: PathBuf,
}

/// The value for v2 `cpu.max`, or v1 `cpu.cfs_quota_us`, for a millicore limit.
pub(crate) fn cpu_quota_us(millicores: u64) -> u64 {
    (millicores.saturating_mul(CFS_PERIOD_US) / 1000).max(1000)
}

impl ContainerCgroup {
    fn write_limits(&self, layout: &CgroupLayout, l: &Limits) -> Result<(), RuntimeError> {
        let pids = l.pids_max.unwrap_or(DEFAULT_PIDS_MAX).to_string();
        match self.mode {
            CgroupMode::V1 => {
                let cpu = layout.cpu.join(&layout.parent).join(self.name());
                let pidsd = layout.pids.join(&layout.parent).join(self.name());
                if let Some(m) = l.cpu_millicores {
                    write_file(&cpu, "cpu.cfs_period_us", &CFS_PERIOD_US.to_string())?;
                    write_file(&cpu, "cpu.cfs_quota_us", &cpu_quota_us(m).to_string())?;
                }
                if let Some(b) = l.memory_bytes {
                    write_file(&self.memory, "memory.limit_in_bytes", &b.to_string())?;
                    if self.memory.join("memory.memsw.limit_in_bytes").exists() {
                        write_file(&self.memory, "memory.memsw.limit_in_bytes", &b.to_string())?;
                    }
                }
                write_file(&pidsd, "pids.max", &pids)?;
            }
            CgroupMode::V2 => {
                let d = &self.memory;
                if let Some(m) = l.cpu_millicores {
                    write_file(d, "cpu.max", &format!("{} {CFS_PERIOD_US}", cpu_quota_us(m)))?;
                }
                if let Some(b) = l.memory_bytes {
                    write_file(d, "memory.max", &b.to_string())?;
                    if d.join("memory.swap.max").exists() {
                        write_file(d, "memory.swap.max", "0")?;
                    }
                }
                write_file(d, "pids.max", &pids)?;
            }
        }
        Ok(())
    }

    /// Replace the limits of a running container's group: each limit of `l`, and `None`
    /// lifts it (v2 `max`, v1 `-1`); pids fall back to [`DEFAULT_PIDS_MAX`]. On v1 the
    /// memory+swap limit must stay at or above the memory limit at every step, so the
    /// order of the two writes depends on whether the limit goes up or down.
    pub fn apply_limits(&self, layout: &CgroupLayout, l: &Limits) -> Result<(), RuntimeError> {
        let pids = l.pids_max.unwrap_or(DEFAULT_PIDS_MAX).to_string();
        match self.mode {
            CgroupMode::V1 => {
                let cpu = layout.cpu.join(&layout.parent).join(self.name());
                let pidsd = layout.pids.join(&layout.parent).join(self.name());
                write_file(&cpu, "cpu.cfs_period_us", &CFS_PERIOD_US.to_string())?;
                let quota = l.cpu_millicores.map_or("-1".to_owned(), |m| cpu_quota_us(m).to_string());
                write_file(&cpu, "cpu.cfs_quota_us", &quota)?;
                let mem = l.memory_bytes.map_or("-1".to_owned(), |b| b.to_string());
                let memsw = self.memory.join("memory.memsw.limit_in_bytes").exists();
                let current: Option<u64> = fs::read_to_string(self.memory.join("memory.limit_in_bytes"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                let raising = match (l.memory_bytes, current) {
                    (None, _) => true,
                    (Some(new), Some(cur)) => new > cur,
                    (Some(_), None) => false,
                };
                if memsw && raising {
                    write_file(&self.memory, "memory.memsw.limit_in_bytes", &mem)?;
                }
                write_file(&self.memory, "memory.limit_in_bytes", &mem)?;
                if memsw && !raising {
                    write_file(&self.memory, "memory.memsw.limit_in_bytes", &mem)?;
                }
                write_file(&pidsd, "pids.max", &pids)?;
            }
            CgroupMode::V2 => {
                let d = &self.memory;
                let cpu = l.cpu_millicores.map_or("max".to_owned(), |m| cpu_quota_us(m).to_string());
                write_file(d, "cpu.max", &format!("{cpu} {CFS_PERIOD_US}"))?;
                write_file(d, "memory.max", &l.memory_bytes.map_or("max".to_owned(), |b| b.to_string()))?;
                if d.join("memory.swap.max").exists() {
                    write_file(d, "memory.swap.max", "0")?;
                }
                write_file(d, "pids.max", &pids)?;
            }
        }
        Ok(())
    }

    fn name(&self) -> &std::ffi::OsStr {
        self.memory.file_name().unwrap_or_default()
    }

    /// Every `cgroup.procs` file of the group (one per v1 controller).
    pub fn procs_paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Open every `cgroup.procs` for writing (the child writes "0" to join).
    pub fn open_procs(&self) -> Result<Vec<OwnedFd>, RuntimeError> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map(OwnedFd::from)
                    .ctx(|| format!("open {}", p.display()))
            })
            .collect()
    }

    pub fn memory_usage(&self) -> Option<u64> {
        let f = match self.mode {
            CgroupMode::V1 => "memory.usage_in_bytes",
            CgroupMode::V2 => "memory.current",
        };
        fs::read_to_string(self.memory.join(f)).ok()?.trim().parse().ok()
    }

    /// Number of OOM kills in this group.
    pub fn oom_kills(&self) -> u64 {
        let f = match self.mode {
            CgroupMode::V1 => "memory.oom_control",
            CgroupMode::V2 => "memory.events",
        };
        let text = fs::read_to_string(self.memory.join(f)).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// SIGKILL everything still in the group.
    pub fn kill_all(&self) {
        for d in &self.dirs {
            if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
                for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    crate::sys::kill(pid, libc::SIGKILL);
                }
            }
        }
    }

    /// rmdir every directory, retrying on EBUSY while exiting tasks drain.
    pub fn remove(&self) -> Result<(), RuntimeError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        for d in &self.dirs {
            let mut delay = Duration::from_micros(200);
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_millis(20));
                    }
                    Err(e) => return Err(RuntimeError::io(format!("remove cgroup {}", d.display()), e)),
                }
            }
        }
        Ok(())
    }
}

/// Puts the kernel's cgroup threadgroup lock into its writer-friendly mode (the
/// `favordynmods` cgroup option) by mounting a named, controller-less v1 hierarchy with
/// that option at `dir`; the host's own cgroup mounts are left untouched.
///
/// Without it every move of a process into a cgroup waits for an RCU grace period
/// (10-25 ms measured here, on the cold-start path); with it a container's cgroup join
/// takes microseconds, at a small cost to fork and exit elsewhere on the host. The mount
/// stays at one host-wide path ([`DYNMODS_MOUNT`]) for the life of the host: repeated
/// calls and several runtimes share it. Returns false when the kernel refuses (the runtime works
/// either way, only slower).
pub(crate) const DYNMODS_MOUNT: &str = "/run/flare-cgroup-dynmods";

pub(crate) fn favor_dynmods(dir: &Path) -> Result<bool, String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let target = dir.display().to_string();
    if mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(target.as_str())) {
        return Ok(true);
    }
    fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let src = std::ffi::CString::new("cgroup").expect("no NUL");
    let fstype = std::ffi::CString::new("cgroup").expect("no NUL");
    let data = std::ffi::CString::new("none,name=flare-dynmods,favordynmods").expect("no NUL");
    let path = crate::sys::cpath(dir).map_err(|e| e.to_string())?;
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    };
    if r == 0 {
        Ok(true)
    } else {
        let e = std::io::Error::last_os_error();
        let _ = fs::remove_dir(dir);
        Err(format!("mount favordynmods hierarchy: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn hybrid_is_v1() {
        let l = CgroupLayout::detect_from(HYBRID, "flare", |_| Some(String::new())).unwrap();
        assert_eq!(l.mode, CgroupMode::V1);
        assert_eq!(l.cpu, PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(l.parent_dirs().len(), 3);
    }

    #[test]
    fn pure_v2() {
        let m = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        let l = CgroupLayout::detect_from(m, "flare", |_| Some("cpuset cpu io memory pids".into())).unwrap();
        assert_eq!(l.mode, CgroupMode::V2);
        assert_eq!(l.parent_dirs(), vec![PathBuf::from("/sys/fs/cgroup/flare")]);
    }

    #[test]
    fn comounted_v1() {
        let m = "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n\
                 cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n\
                 cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\n";
        let l = CgroupLayout::detect_from(m, "flare", |_| None).unwrap();
        assert_eq!(l.cpu, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
    }

    #[test]
    fn quota() {
        assert_eq!(cpu_quota_us(1000), 100_000);
        assert_eq!(cpu_quota_us(250), 25_000);
        assert_eq!(cpu_quota_us(1), 1000);
    }
}

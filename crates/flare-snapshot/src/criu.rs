//! Running criu: dump a process tree to an images directory, restore it from one.

use std::ffi::OsString;
use std::fs;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::detect::{self, CriuInfo, CriuVersion, Features};
use crate::error::{IoContext, SnapshotError};

/// How criu handles the tree's cgroups (`--manage-cgroups=MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// Pretend there are no cgroups: restored tasks land in criu's own cgroup (or where
    /// the caller puts criu). What Flare wants: the worker makes each container's cgroup.
    Ignore,
    /// Dump cgroup paths; on restore require them to exist, set no properties.
    None,
    /// Restore properties of cgroups that must already exist.
    Props,
    /// criu's default: restore properties only of cgroups criu had to create.
    Soft,
    /// Create and configure every cgroup.
    Full,
    /// As `Full`, and fail if any already exists.
    Strict,
}

/// How criu keeps the tree's network quiet while it works (`--network-lock METHOD`). The
/// method of a dump is saved in its images and used by their restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkLock {
    /// criu's default: iptables rules (each lock and unlock runs the iptables tools).
    Iptables,
    Nftables,
    /// No lock: for trees with no TCP connections to keep consistent (a restore then
    /// does not run iptables tools at unlock time, ~60 ms here).
    Skip,
}

impl NetworkLock {
    fn arg(self) -> &'static str {
        match self {
            NetworkLock::Iptables => "iptables",
            NetworkLock::Nftables => "nftables",
            NetworkLock::Skip => "skip",
        }
    }
}

impl CgroupMode {
    fn arg(self) -> &'static str {
        match self {
            CgroupMode::Ignore => "--manage-cgroups=ignore",
            CgroupMode::None => "--manage-cgroups=none",
            CgroupMode::Props => "--manage-cgroups=props",
            CgroupMode::Soft => "--manage-cgroups=soft",
            CgroupMode::Full => "--manage-cgroups=full",
            CgroupMode::Strict => "--manage-cgroups=strict",
        }
    }
}

/// Options of [`Criu::dump`].
#[derive(Debug, Clone)]
pub struct DumpOpts {
    /// Leave the tree running after the dump (`-R`) instead of killing it (criu's default).
    pub leave_running: bool,
    /// The tree is a shell job: its session/process group leader is outside (`-j`).
    pub shell_job: bool,
    /// Dump established TCP connections (`--tcp-established`).
    pub tcp_established: bool,
    /// `--network-lock`; `None`: criu's default (iptables). Restores use the dump's.
    pub network_lock: Option<NetworkLock>,
    /// Allow unix sockets whose peer is outside the tree (`--ext-unix-sk`).
    pub ext_unix_sk: bool,
    /// Mounts of the tree's mount namespace that come from outside it: `Auto` dumps
    /// every bind mount of a host path as external (`--external mnt[]`), `Named`
    /// marks one mountpoint (path inside the namespace) under a name that restore maps
    /// back to a host path.
    pub external_mounts: Vec<ExternalMount>,
    /// Further `--external` values, verbatim (e.g. `unix[123]`, `net[4026531840]:net`).
    pub external: Vec<String>,
    /// `--manage-cgroups`; `None`: criu's default (soft).
    pub manage_cgroups: Option<CgroupMode>,
    /// Dump file locks (`--file-locks`).
    pub file_locks: bool,
    /// Allow open-but-unlinked files to be linked back (`--link-remap`).
    pub link_remap: bool,
    /// Largest deleted file criu copies into the images (`--ghost-limit`).
    pub ghost_limit: Option<u64>,
    /// Freeze the tree with this freezer cgroup instead of ptrace-seizing task by task.
    pub freeze_cgroup: Option<PathBuf>,
    /// criu's log verbosity (0..=4; 4 is very verbose).
    pub log_level: u8,
    pub timeout: Duration,
    /// Appended to criu's arguments as they are.
    pub extra_args: Vec<String>,
}

impl Default for DumpOpts {
    fn default() -> DumpOpts {
        DumpOpts {
            leave_running: false,
            shell_job: false,
            tcp_established: false,
            network_lock: None,
            ext_unix_sk: false,
            external_mounts: Vec::new(),
            external: Vec::new(),
            manage_cgroups: None,
            file_locks: false,
            link_remap: false,
            ghost_limit: None,
            freeze_cgroup: None,
            log_level: 4,
            timeout: Duration::from_secs(120),
            extra_args: Vec::new(),
        }
    }
}

/// An external mount at dump time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExternalMount {
    /// `--external mnt[]`: every bind mount whose source is outside the namespace.
    Auto,
    /// `--external mnt[MOUNTPOINT]:NAME`.
    Named { mountpoint: String, name: String },
}

/// Options of [`Criu::restore`].
#[derive(Debug)]
pub struct RestoreOpts<'a> {
    /// criu's working directory for this restore: its log, the pid file and the lazy
    /// pages socket go here, so several restores of one images dir can run at once.
    /// `None`: the images dir (one restore at a time).
    pub work_dir: Option<PathBuf>,
    /// The new root of a restored mount namespace (`--root`); required when the tree had
    /// its own. Must be a mount point whose parent is not overmounted.
    pub root: Option<PathBuf>,
    /// `(name, host path)`: `--external mnt[NAME]:PATH` for mounts dumped as `Named`.
    pub external_mounts: Vec<(String, PathBuf)>,
    /// `--external mnt[]`: restore every auto-detected external bind mount from the path
    /// it had at dump time.
    pub auto_external_mounts: bool,
    /// Further `--external` values, verbatim.
    pub external: Vec<String>,
    /// `(fd, resource)`: `--inherit-fd fd[N]:RESOURCE`, with `fd` kept open (at its own
    /// number N) in criu, e.g. a new pipe for `pipe:[INODE]` of the dumped tree.
    pub inherit_fds: Vec<(BorrowedFd<'a>, String)>,
    pub shell_job: bool,
    pub tcp_established: bool,
    pub manage_cgroups: Option<CgroupMode>,
    /// `--cgroup-root`: restore the tree's cgroups below this one.
    pub cgroup_root: Option<String>,
    /// `cgroup.procs` files criu joins before it starts (e.g. the container's cgroup made
    /// by the worker, one file per v1 controller): with [`CgroupMode::Ignore`] the
    /// restored tasks, forked by criu, start in them.
    pub join_cgroups: Vec<PathBuf>,
    /// Restore memory on demand (`--lazy-pages`) from a `criu lazy-pages` daemon that
    /// this call starts; needs [`Features::lazy_pages`].
    pub lazy_pages: bool,
    /// Leave the restored tasks stopped (`--leave-stopped`).
    pub leave_stopped: bool,
    /// Restore the root task as criu's sibling, i.e. as the caller's child (`-S`).
    pub restore_sibling: bool,
    pub log_level: u8,
    pub timeout: Duration,
    pub extra_args: Vec<String>,
}

impl Default for RestoreOpts<'_> {
    fn default() -> Self {
        RestoreOpts {
            work_dir: None,
            root: None,
            external_mounts: Vec::new(),
            auto_external_mounts: false,
            external: Vec::new(),
            inherit_fds: Vec::new(),
            shell_job: false,
            tcp_established: false,
            manage_cgroups: None,
            cgroup_root: None,
            join_cgroups: Vec::new(),
            lazy_pages: false,
            leave_stopped: false,
            restore_sibling: false,
            log_level: 4,
            timeout: Duration::from_secs(120),
            extra_args: Vec::new(),
        }
    }
}

/// What a dump produced.
#[derive(Debug, Clone)]
pub struct DumpReport {
    pub log: PathBuf,
    pub elapsed: Duration,
    /// Bytes of all files in the images dir.
    pub image_bytes: u64,
}

/// A restored tree.
#[derive(Debug)]
pub struct Restored {
    /// The root task's pid in the caller's pid namespace.
    pub pid: i32,
    pub log: PathBuf,
    pub elapsed: Duration,
    /// The lazy pages daemon, while it serves pages (it exits when all are in).
    pub lazy_daemon: Option<Child>,
}

impl Restored {
    /// Wait for the lazy pages daemon (if any) to have served every page; `Ok(true)` when
    /// it exited successfully within `timeout`.
    pub fn wait_lazy_done(&mut self, timeout: Duration) -> Result<bool, SnapshotError> {
        let Some(child) = self.lazy_daemon.as_mut() else {
            return Ok(true);
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().ctx(|| "wait for criu lazy-pages".into())? {
                self.lazy_daemon = None;
                return Ok(st.success());
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        if let Some(mut c) = self.lazy_daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A usable criu.
#[derive(Debug, Clone)]
pub struct Criu {
    bin: PathBuf,
    version: CriuVersion,
    kernel_release: String,
    features: Features,
}

impl Criu {
    /// Detect criu (see [`detect::detect`]); an error says why it is not usable.
    pub fn detect(path: Option<&Path>) -> Result<Criu, SnapshotError> {
        Criu::from_info(&detect::detect(path))
    }

    pub fn from_info(info: &CriuInfo) -> Result<Criu, SnapshotError> {
        let (bin, version) = info.usable()?;
        Ok(Criu {
            bin: bin.to_path_buf(),
            version,
            kernel_release: info.kernel_release.clone(),
            features: info.features,
        })
    }

    pub fn path(&self) -> &Path {
        &self.bin
    }

    /// For the snapshot key.
    pub fn version(&self) -> CriuVersion {
        self.version
    }

    /// For the snapshot key.
    pub fn kernel_release(&self) -> &str {
        &self.kernel_release
    }

    pub fn features(&self) -> Features {
        self.features
    }

    /// Checkpoint the tree rooted at `pid` into `images_dir` (created if missing; it
    /// should be empty). The tree's own namespaces (pid, mount, user, uts, ipc, net) are
    /// detected and dumped by criu; the log is `images_dir/dump.log`.
    pub fn dump(&self, pid: i32, images_dir: &Path, opts: &DumpOpts) -> Result<DumpReport, SnapshotError> {
        fs::create_dir_all(images_dir).ctx(|| format!("create {}", images_dir.display()))?;
        let images_dir = fs::canonicalize(images_dir).ctx(|| format!("resolve {}", images_dir.display()))?;
        let log = images_dir.join("dump.log");
        let mut args: Vec<OsString> = vec!["dump".into(), "-t".into(), pid.to_string().into()];
        args.extend(["-D".into(), images_dir.clone().into_os_string()]);
        args.extend(["-o".into(), log.clone().into_os_string()]);
        args.push(format!("-v{}", opts.log_level.min(4)).into());
        if opts.leave_running {
            args.push("--leave-running".into());
        }
        if opts.shell_job {
            args.push("--shell-job".into());
        }
        if opts.tcp_established {
            args.push("--tcp-established".into());
        }
        if opts.ext_unix_sk {
            args.push("--ext-unix-sk".into());
        }
        if let Some(lock) = opts.network_lock {
            args.extend(["--network-lock".into(), lock.arg().into()]);
        }
        for m in &opts.external_mounts {
            args.push("--external".into());
            args.push(match m {
                ExternalMount::Auto => "mnt[]".into(),
                ExternalMount::Named { mountpoint, name } => format!("mnt[{mountpoint}]:{name}").into(),
            });
        }
        for e in &opts.external {
            args.extend(["--external".into(), e.into()]);
        }
        if let Some(m) = opts.manage_cgroups {
            args.push(m.arg().into());
        }
        if opts.file_locks {
            args.push("--file-locks".into());
        }
        if opts.link_remap {
            args.push("--link-remap".into());
        }
        if let Some(g) = opts.ghost_limit {
            args.push(format!("--ghost-limit={g}").into());
        }
        if let Some(f) = &opts.freeze_cgroup {
            args.push("--freeze-cgroup".into());
            args.push(f.clone().into_os_string());
        }
        args.extend(opts.extra_args.iter().map(OsString::from));
        let start = Instant::now();
        self.run("dump", &args, &[], &[], &log, opts.timeout)?;
        let elapsed = start.elapsed();
        let image_bytes = dir_bytes(&images_dir);
        tracing::info!(pid, images = %images_dir.display(), ?elapsed, image_bytes, "criu dump done");
        Ok(DumpReport { log, elapsed, image_bytes })
    }

    /// Restore the tree in `images_dir`, detached (`-d`): criu exits once the tree runs,
    /// and the tree's root is re-parented to the nearest child subreaper (see
    /// [`crate::sys::set_child_subreaper`]) or init. Returns its pid.
    pub fn restore(&self, images_dir: &Path, opts: &RestoreOpts<'_>) -> Result<Restored, SnapshotError> {
        let images_dir = fs::canonicalize(images_dir).ctx(|| format!("resolve {}", images_dir.display()))?;
        let work = match &opts.work_dir {
            Some(w) => {
                fs::create_dir_all(w).ctx(|| format!("create {}", w.display()))?;
                fs::canonicalize(w).ctx(|| format!("resolve {}", w.display()))?
            }
            None => images_dir.clone(),
        };
        if opts.lazy_pages && !self.features.lazy_pages() {
            return Err(SnapshotError::Unsupported(format!(
                "lazy pages need userfaultfd with non-cooperative events; kernel {} has uffd={} uffd-noncoop={}",
                self.kernel_release, self.features.uffd, self.features.uffd_noncoop
            )));
        }
        let log = work.join("restore.log");
        let pidfile = work.join("restore.pid");
        let _ = fs::remove_file(&pidfile);
        let mut args: Vec<OsString> = vec!["restore".into(), "-d".into()];
        args.extend(["-D".into(), images_dir.clone().into_os_string()]);
        args.extend(["-W".into(), work.clone().into_os_string()]);
        args.extend(["-o".into(), log.clone().into_os_string()]);
        args.extend(["--pidfile".into(), pidfile.clone().into_os_string()]);
        args.push(format!("-v{}", opts.log_level.min(4)).into());
        if let Some(r) = &opts.root {
            args.push("--root".into());
            args.push(r.clone().into_os_string());
        }
        for (name, path) in &opts.external_mounts {
            let mut v = OsString::from(format!("mnt[{name}]:"));
            v.push(path);
            args.extend(["--external".into(), v]);
        }
        if opts.auto_external_mounts {
            args.extend(["--external".into(), "mnt[]".into()]);
        }
        for e in &opts.external {
            args.extend(["--external".into(), e.into()]);
        }
        for (fd, res) in &opts.inherit_fds {
            args.extend(["--inherit-fd".into(), format!("fd[{}]:{res}", fd.as_raw_fd()).into()]);
        }
        if opts.shell_job {
            args.push("--shell-job".into());
        }
        if opts.tcp_established {
            args.push("--tcp-established".into());
        }
        if let Some(m) = opts.manage_cgroups {
            args.push(m.arg().into());
        }
        if let Some(r) = &opts.cgroup_root {
            args.extend(["--cgroup-root".into(), r.into()]);
        }
        if opts.leave_stopped {
            args.push("--leave-stopped".into());
        }
        if opts.restore_sibling {
            args.push("--restore-sibling".into());
        }
        let start = Instant::now();
        let lazy_daemon = if opts.lazy_pages {
            args.push("--lazy-pages".into());
            Some(self.start_lazy_pages(&images_dir, &work, opts.log_level)?)
        } else {
            None
        };
        args.extend(opts.extra_args.iter().map(OsString::from));
        let mut restored = Restored { pid: 0, log: log.clone(), elapsed: Duration::ZERO, lazy_daemon };
        let fds: Vec<i32> = opts.inherit_fds.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
        let mut cgroups = Vec::new();
        for p in &opts.join_cgroups {
            cgroups.push(fs::OpenOptions::new().write(true).open(p).ctx(|| format!("open {}", p.display()))?);
        }
        let cgroup_fds: Vec<i32> = cgroups.iter().map(|f| f.as_raw_fd()).collect();
        self.run("restore", &args, &fds, &cgroup_fds, &log, opts.timeout)?;
        drop(cgroups);
        let text = fs::read_to_string(&pidfile).ctx(|| format!("read {}", pidfile.display()))?;
        restored.pid = text.trim().parse().map_err(|_| {
            SnapshotError::io(format!("parse {}", pidfile.display()), std::io::ErrorKind::InvalidData.into())
        })?;
        restored.elapsed = start.elapsed();
        tracing::info!(pid = restored.pid, images = %images_dir.display(), elapsed = ?restored.elapsed, lazy = opts.lazy_pages, "criu restore done");
        Ok(restored)
    }

    /// `criu lazy-pages` serving `images_dir` on `work/lazy-pages.socket`, once it listens.
    fn start_lazy_pages(&self, images_dir: &Path, work: &Path, level: u8) -> Result<Child, SnapshotError> {
        let sock = work.join("lazy-pages.socket");
        let _ = fs::remove_file(&sock);
        let log = work.join("lazy-pages.log");
        let mut child = Command::new(&self.bin)
            .arg("lazy-pages")
            .arg("-D")
            .arg(images_dir)
            .arg("-W")
            .arg(work)
            .arg("-o")
            .arg(&log)
            .arg(format!("-v{}", level.min(4)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ctx(|| format!("run {} lazy-pages", self.bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if let Some(st) = child.try_wait().ctx(|| "wait for criu lazy-pages".into())? {
                return Err(criu_failed("lazy-pages", format!("{st}"), &log));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SnapshotError::Timeout { action: "lazy-pages", secs: 10 });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(child)
    }

    fn run(
        &self,
        action: &'static str,
        args: &[OsString],
        keep_fds: &[i32],
        cgroup_procs: &[i32],
        log: &Path,
        timeout: Duration,
    ) -> Result<(), SnapshotError> {
        tracing::debug!(criu = %self.bin.display(), ?args, "running criu");
        let mut cmd = Command::new(&self.bin);
        // stderr goes to a file, not a pipe: a restored tree (or a half-restored one, when
        // criu is killed) may inherit it and would hold a pipe open forever.
        let err_path = log.with_extension("stderr");
        let err_file = fs::File::create(&err_path).ctx(|| format!("create {}", err_path.display()))?;
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(err_file);
        if !keep_fds.is_empty() || !cgroup_procs.is_empty() {
            let fds = keep_fds.to_vec();
            let procs = cgroup_procs.to_vec();
            // SAFETY: the closure runs between fork and exec and only calls write and
            // fcntl (async-signal-safe) on fd numbers the caller keeps open until the
            // child has exec'd; it allocates nothing (the vectors were moved in before).
            unsafe {
                cmd.pre_exec(move || {
                    for fd in &procs {
                        crate::sys::join_cgroup(*fd)?;
                    }
                    for fd in &fds {
                        crate::sys::place_fd(*fd, *fd)?;
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().ctx(|| format!("run {} {action}", self.bin.display()))?;
        drop(cmd);
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait().ctx(|| format!("wait for criu {action}"))? {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SnapshotError::Timeout { action, secs: timeout.as_secs() });
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let stderr = fs::read_to_string(&err_path).unwrap_or_default();
        let _ = fs::remove_file(&err_path);
        if !status.success() {
            let mut e = criu_failed(action, status.to_string(), log);
            if let SnapshotError::Criu { log_tail, .. } = &mut e {
                if log_tail.is_empty() {
                    *log_tail = detect::tail(&stderr, 6);
                }
            }
            return Err(e);
        }
        Ok(())
    }
}

/// The error of a failed criu command: its log's last error lines (all errors but the
/// harmless RLIMIT_NOFILE one, else the last lines).
fn criu_failed(action: &'static str, status: String, log: &Path) -> SnapshotError {
    let text = fs::read_to_string(log).unwrap_or_default();
    SnapshotError::Criu { action, status, log_tail: log_errors(&text), log: log.to_path_buf() }
}

/// The last few `Error` lines of a criu log, or its last lines when it has none.
pub fn log_errors(text: &str) -> String {
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error (") && !l.contains("RLIMIT_NOFILE"))
        .map(|l| l.trim())
        .collect();
    if errors.is_empty() {
        return detect::tail(text, 4);
    }
    errors[errors.len().saturating_sub(5)..].join(" | ")
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| if m.is_dir() { 0 } else { m.len() }).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_errors_pick_the_real_errors() {
        let log = "(00.01) Warn  (criu/kerndat.c:1285): Can't keep kdat cache on non-tempfs\n\
                   (00.03) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
                   (00.06) Error (criu/cr-restore.c:1230): Can't fork for 26396: File exists\n\
                   (00.07) Error (criu/cr-restore.c:2320): Restoring FAILED.\n";
        assert_eq!(
            log_errors(log),
            "(00.06) Error (criu/cr-restore.c:1230): Can't fork for 26396: File exists | \
             (00.07) Error (criu/cr-restore.c:2320): Restoring FAILED."
        );
        assert_eq!(log_errors("a\nb\n"), "a | b");
    }

    #[test]
    fn cgroup_mode_args() {
        assert_eq!(CgroupMode::Ignore.arg(), "--manage-cgroups=ignore");
        assert_eq!(CgroupMode::Full.arg(), "--manage-cgroups=full");
    }
}

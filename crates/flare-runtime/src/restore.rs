//! Containers restored from a checkpoint instead of started: the runtime prepares what a
//! container owns on the host (its state dir, cgroup with limits, a fresh root overlay
//! mounted where the restorer can see it), a caller-supplied restorer (CRIU, in
//! flare-snapshot) recreates the process tree into it, and the runtime adopts the
//! restored pid 1 as a [`Container`] like any spawned one.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, RuntimeError};
use crate::{detached, plan, sys, CommandSpec, Container, Network, Runtime};

/// What the restorer gets.
#[derive(Debug)]
pub struct RestoreTarget<'a> {
    /// The container id.
    pub id: &'a str,
    /// A fresh root overlay (same lower as a spawned container, empty upper), mounted on
    /// the host at this path: `criu restore --root`.
    pub root: &'a Path,
    /// The container's `cgroup.procs` files (one per controller on cgroup v1): the
    /// restorer joins them before it forks the tree, so limits hold from the first page.
    pub cgroup_procs: Vec<PathBuf>,
    /// Its private binds ([`Runtime::private_binds`]): (container path, where the host
    /// bound the source for the restorer). CRIU mounts a restored tree's binds from
    /// inside its user namespace, whose root may not search the way to their sources (a
    /// 0700 home, `/root`), so each is first bound under `/run/flare-restore` (0711).
    pub binds: Vec<(PathBuf, PathBuf)>,
}

impl Runtime {
    /// Restores a container of `spec` (its id, root, limits; argv and binds are the
    /// checkpoint's) with `restore`, which must return the host pid of the restored pid 1,
    /// a child of this process (criu's `--restore-sibling`). On any error everything the
    /// runtime prepared is released.
    ///
    /// `upper` seeds the new root's upper layer (a [`Container::copy_upper`] of the
    /// checkpointed container: its files and the mountpoints of its binds).
    pub fn restore<E: std::fmt::Display>(
        &self,
        spec: &CommandSpec,
        upper: Option<&Path>,
        restore: impl FnOnce(&RestoreTarget<'_>) -> Result<i32, E>,
    ) -> Result<Container, RuntimeError> {
        let inner = &self.inner;
        if spec.network != Network::Isolated {
            return Err(RuntimeError::InvalidSpec(
                "a restored container has its own network namespace".into(),
            ));
        }
        let (dir, mut res) = self.container_dir(&spec.id)?;
        let cg = inner.cgroups.create(&spec.id, &spec.limits)?;
        let cgroup_procs = cg.procs_paths();
        res.cgroup = Some(cg);
        let root_dir = dir.join("rootfs");
        fs::create_dir(&root_dir).ctx(|| format!("create {}", root_dir.display()))?;
        let (root, scratch) = plan::root_overlay(inner, spec, upper)?;
        detached::attach_at(&root, &root_dir).ctx(|| format!("mount the root at {}", root_dir.display()))?;
        res.root_mount = Some(root_dir.clone());
        drop(root);
        let staged = Staged::new(
            &Path::new(STAGING).join(&inner.cfg.cgroup_parent).join(&spec.id),
            &self.private_binds(spec),
        )?;
        let target =
            RestoreTarget { id: &spec.id, root: &root_dir, cgroup_procs, binds: staged.mounts.clone() };
        let pid = restore(&target).map_err(|e| RuntimeError::Restore(e.to_string()));
        drop(staged);
        let pid = pid?;
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                sys::kill(pid, libc::SIGKILL);
                let _ = sys::waitpid(pid, false);
                return Err(RuntimeError::io("pidfd_open (restored container)", e));
            }
        };
        tracing::debug!(container = %spec.id, pid, "container restored");
        let page = sys::SharedPage::new().ctx(|| "mmap status page".into())?;
        Ok(Container {
            id: spec.id.clone(),
            pid,
            pidfd,
            page,
            scratch,
            memory_limit: spec.limits.memory_bytes,
            exit: None,
            res,
        })
    }
}

/// Where private bind sources are staged for restores (see [`RestoreTarget::binds`]).
const STAGING: &str = "/run/flare-restore";

/// Bind sources bound by the host under a dir the containers' root can search; unmounted
/// and removed on drop (the restored container has its own copies of the mounts).
struct Staged {
    dir: PathBuf,
    /// (container path, staged host path).
    mounts: Vec<(PathBuf, PathBuf)>,
}

impl Staged {
    fn new(dir: &Path, binds: &[(PathBuf, PathBuf)]) -> Result<Staged, RuntimeError> {
        use std::os::unix::fs::PermissionsExt;
        let searchable = |d: &Path| {
            fs::set_permissions(d, fs::Permissions::from_mode(0o711)).ctx(|| format!("chmod {}", d.display()))
        };
        for d in dir.ancestors().skip(1).take(2) {
            fs::create_dir_all(d).ctx(|| format!("create {}", d.display()))?;
            searchable(d)?;
        }
        let _ = fs::remove_dir_all(dir);
        fs::create_dir(dir).ctx(|| format!("create {}", dir.display()))?;
        searchable(dir)?;
        let mut staged = Staged { dir: dir.to_path_buf(), mounts: Vec::new() };
        for (i, (dst, src)) in binds.iter().enumerate() {
            let at = dir.join(format!("b{i}"));
            // The source as the runtime opens it: its own path, never through a link.
            let meta = fs::symlink_metadata(src).ctx(|| format!("stat {}", src.display()))?;
            if meta.file_type().is_symlink() {
                return Err(RuntimeError::InvalidSpec(format!("bind source {} is a symlink", src.display())));
            }
            if meta.is_dir() {
                fs::create_dir(&at).ctx(|| format!("create {}", at.display()))?;
            } else {
                fs::write(&at, b"").ctx(|| format!("create {}", at.display()))?;
            }
            sys::rbind_private(src, &at).ctx(|| format!("bind {} at {}", src.display(), at.display()))?;
            staged.mounts.push((dst.clone(), at));
        }
        Ok(staged)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (_, at) in &self.mounts {
            let _ = sys::umount_detach(at);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `cp -a SRC/. DEST` (DEST is created): owners, modes, times, symlinks, overlay whiteouts
/// (character devices 0/0) and hard links kept.
pub(crate) fn copy_tree(src: &Path, dest: &Path) -> Result<(), RuntimeError> {
    fs::create_dir_all(dest).ctx(|| format!("create {}", dest.display()))?;
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg("--")
        .arg(src.join("."))
        .arg(dest)
        .stdin(std::process::Stdio::null())
        .output()
        .ctx(|| "run cp".into())?;
    if !out.status.success() {
        return Err(RuntimeError::io(
            format!("copy {} to {}", src.display(), dest.display()),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(())
}

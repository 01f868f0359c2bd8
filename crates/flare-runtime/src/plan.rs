//! Turning a [`ContainerSpec`] into what the child runs: the detached mounts made here on
//! the host side (root overlay, binds, devices, a sysfs of the pooled network namespace)
//! and the list of operations the child executes inside the container after `pivot_root`
//! (its own `/proc`, `/dev`, `/sys`, `/tmp`, and the masks below). The masks are data: one
//! line each, with the reason.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use crate::child::{ChildPlan, LabeledOp, MountFd, Op};
use crate::detached::{self, SourceKind};
use crate::error::{IoContext, RuntimeError};
use crate::{CommandSpec, ContainerSpec, Inner, Rootfs, DEFAULT_DISK_BYTES, DEFAULT_SHM_BYTES, DEV_NODES};

/// `/proc` entries made read-only: (path under /proc, why).
pub(crate) const PROC_READONLY: &[(&str, &str)] = &[
    ("sys", "sysctls: kernel.core_pattern runs a program as host root, others tune the host"),
    ("sysrq-trigger", "magic SysRq: crash, reboot or sync the host"),
    ("irq", "interrupt affinity of host devices"),
    ("bus", "PCI/USB device configuration"),
    ("fs", "file system tunables (e.g. nfsd)"),
];

/// `/proc` files hidden behind `/dev/null`: (path under /proc, why).
pub(crate) const PROC_MASKED_FILES: &[(&str, &str)] = &[
    ("kcore", "the host's physical memory as an ELF core"),
    ("keys", "the keys of every keyring the kernel lets it see"),
    ("timer_list", "host timers with kernel addresses and other processes' tasks"),
    ("timer_stats", "host timer statistics"),
    ("kallsyms", "kernel symbol addresses (defeats KASLR)"),
    ("sched_debug", "every host task's scheduling state"),
    ("latency_stats", "host latency statistics"),
    ("kmsg", "the kernel log"),
    ("kpagecount", "physical page counts (rowhammer-style attacks)"),
    ("kpageflags", "physical page flags (rowhammer-style attacks)"),
    ("kpagecgroup", "physical page owners"),
];

/// `/proc` directories hidden behind an empty read-only tmpfs: (path under /proc, why).
pub(crate) const PROC_MASKED_DIRS: &[(&str, &str)] = &[
    ("acpi", "ACPI tables and controls of the host"),
    ("scsi", "SCSI device control (scanning, removing host disks)"),
    ("asound", "host sound devices"),
];

/// `/sys` directories hidden behind an empty read-only tmpfs: (path under /sys, why).
pub(crate) const SYS_MASKED_DIRS: &[(&str, &str)] = &[
    ("firmware", "firmware tables (ACPI, DMI, EFI variables) of the host"),
    ("devices/virtual/powercap", "energy counters: a power side channel on host secrets"),
];

/// The detached mounts a plan refers to: kept open until the child has attached them
/// (after `clone`); `scratch` (the root overlay's tmpfs) stays with the container for
/// [`crate::Container::disk_usage`].
pub(crate) struct Prepared {
    pub fds: Vec<OwnedFd>,
    pub scratch: Option<OwnedFd>,
}

fn cstr(s: impl AsRef<[u8]>, what: &str) -> Result<CString, RuntimeError> {
    CString::new(s.as_ref()).map_err(|_| RuntimeError::InvalidSpec(format!("{what} contains NUL")))
}

fn cpath(p: &Path) -> Result<CString, RuntimeError> {
    use std::os::unix::ffi::OsStrExt;
    cstr(p.as_os_str().as_bytes(), &format!("path {}", p.display()))
}

fn op(op: Op, label: impl Into<String>) -> LabeledOp {
    LabeledOp { op, label: label.into(), optional: false }
}

fn optional(op: Op, label: impl Into<String>) -> LabeledOp {
    LabeledOp { op, label: label.into(), optional: true }
}

fn mount(
    src: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Op {
    Op::Mount {
        src: src.map(|s| CString::new(s).unwrap_or_default()),
        target: CString::new(target).unwrap_or_default(),
        fstype: fstype.map(|s| CString::new(s).unwrap_or_default()),
        flags,
        data: data.map(|s| CString::new(s).unwrap_or_default()),
    }
}

/// A tmpfs at `target` (`nosuid,nodev` plus `flags`) with mount options `data`.
fn tmpfs(target: &str, flags: libc::c_ulong, data: &str) -> Op {
    mount(Some("tmpfs"), target, Some("tmpfs"), libc::MS_NOSUID | libc::MS_NODEV | flags, Some(data))
}

/// Hide the directory `path` (if the kernel has it) behind an empty read-only tmpfs.
fn mask_dir(path: &str) -> LabeledOp {
    optional(tmpfs(path, libc::MS_RDONLY, "size=4k"), format!("mask {path}"))
}

fn mkdir(path: &str, mode: u32) -> LabeledOp {
    op(Op::Mkdir { path: CString::new(path).unwrap_or_default(), mode }, format!("mkdir {path}"))
}

/// Keep `fd` alive in `prep` and return its number for an `Op::Attach`.
fn keep(prep: &mut Prepared, fd: OwnedFd) -> MountFd {
    let raw: RawFd = fd.as_raw_fd();
    prep.fds.push(fd);
    MountFd::Parent(raw)
}

fn attach(fd: MountFd, target: &str, label: String) -> LabeledOp {
    op(Op::Attach { fd, target: CString::new(target).unwrap_or_default() }, label)
}

/// The container's root: an overlay mounted by the host (detached), its upper layer on a
/// tmpfs of the disk limit (returned, to be kept open) or on the spec's host dir.
pub(crate) fn root_overlay(
    inner: &Inner,
    spec: &CommandSpec,
    seed_upper: Option<&Path>,
) -> Result<(OwnedFd, Option<OwnedFd>), RuntimeError> {
    let root_owner = inner.cfg.userns.map(|u| (u.host_base, u.host_base)).unwrap_or((0, 0));
    let disk = spec.limits.disk_bytes.unwrap_or(DEFAULT_DISK_BYTES);
    let nosuid_nodev = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    let mut kept = None;
    // The root overlay, mounted here by the host: its upper layer on a tmpfs of `disk`
    // bytes (or the spec's host dir), its root dir owned by the container's root.
    let (upper, work) = match &spec.upper_dir {
        None => {
            let scratch =
                detached::tmpfs(disk, 0o755, nosuid_nodev).ctx(|| "mount the container's tmpfs".into())?;
            detached::mkdir_in(&scratch, "upper", 0o755, Some(root_owner)).ctx(|| "mkdir upper".into())?;
            detached::mkdir_in(&scratch, "work", 0o700, None).ctx(|| "mkdir work".into())?;
            if let Some(seed) = seed_upper {
                // Through this process's fd table: the copying child has its own.
                let upper = format!("/proc/{}/fd/{}/upper", std::process::id(), scratch.as_raw_fd());
                crate::restore::copy_tree(seed, Path::new(&upper))?;
            }
            let paths = (detached::fd_path(&scratch, "upper"), detached::fd_path(&scratch, "work"));
            kept = Some(scratch);
            paths
        }
        Some(d) => {
            let dfd = detached::open_dir(d).ctx(|| format!("open {}", d.display()))?;
            detached::mkdir_in(&dfd, "upper", 0o755, Some(root_owner))
                .ctx(|| format!("mkdir {}/upper", d.display()))?;
            detached::mkdir_in(&dfd, "work", 0o700, None).ctx(|| format!("mkdir {}/work", d.display()))?;
            (format!("{}/upper", d.display()), format!("{}/work", d.display()))
        }
    };
    let lower = match &spec.rootfs {
        Rootfs::Host => inner.skeleton.clone(),
        Rootfs::Dir(p) => p.clone(),
    };
    let lower_s = lower.to_string_lossy();
    if lower_s.contains(',') || lower_s.contains(':') {
        return Err(RuntimeError::InvalidSpec(format!(
            "rootfs dir {} must not contain ',' or ':'",
            lower.display()
        )));
    }
    let root = detached::overlay(&lower_s, &upper, &work, nosuid_nodev)
        .ctx(|| format!("mount the root overlay (lower {})", lower.display()))?;
    Ok((root, kept))
}

/// Build the plan for `spec`; the child attaches the root overlay on `dir/rootfs` (in its
/// own mount namespace). `sysfs` is a sysfs instance of the container's (pooled) network
/// namespace, or `None` when the child makes its own.
pub(crate) fn build_plan(
    inner: &Inner,
    spec: &ContainerSpec,
    dir: &Path,
    sysfs: Option<OwnedFd>,
) -> Result<(ChildPlan, Prepared), RuntimeError> {
    let mut prep = Prepared { fds: Vec::new(), scratch: None };
    let disk = spec.command.limits.disk_bytes.unwrap_or(DEFAULT_DISK_BYTES);
    let shm = spec.command.limits.shm_bytes.unwrap_or(DEFAULT_SHM_BYTES);

    let (root, scratch) = root_overlay(inner, &spec.command, None)?;
    prep.scratch = scratch;
    let root_fd = root.as_raw_fd();
    prep.fds.push(root);

    let mut ops: Vec<LabeledOp> = Vec::with_capacity(96);
    if matches!(spec.command.rootfs, Rootfs::Host) {
        for d in &inner.host_dirs {
            let src = if d == "etc" { inner.etc_dir.clone() } else { Path::new("/").join(d) };
            // /opt holds whatever software put there (configs with secrets included): it
            // keeps plain ownership, so its root-only files stay unreadable inside.
            let bound = if d == "opt" { detached::bind(&src, true) } else { readonly_bind(inner, &src) };
            let (tree, _) = bound.ctx(|| format!("bind {}", src.display()))?;
            let fd = keep(&mut prep, tree);
            ops.push(attach(fd, &format!("/{d}"), format!("bind /{d} read-only")));
        }
    }
    // /dev: a small tmpfs with the host's harmless character devices bound in.
    ops.push(mkdir("/dev", 0o755));
    ops.push(op(
        mount(
            Some("tmpfs"),
            "/dev",
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("mode=755,size=65536k"),
        ),
        "mount /dev",
    ));
    for node in DEV_NODES {
        let host = Path::new("/dev").join(node);
        if !host.exists() {
            continue;
        }
        let tree = detached::bind_device(&host).ctx(|| format!("bind {}", host.display()))?;
        let fd = keep(&mut prep, tree);
        let target = format!("/dev/{node}");
        ops.push(op(
            Op::Touch { path: CString::new(target.clone()).unwrap_or_default() },
            format!("create {target}"),
        ));
        ops.push(attach(fd, &target, format!("bind {target}")));
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/ptmx", "pts/ptmx"),
    ] {
        ops.push(op(
            Op::Symlink { target: cstr(target, "link")?, path: cstr(link, "link")? },
            format!("symlink {link}"),
        ));
    }
    ops.push(mkdir("/dev/pts", 0o755));
    ops.push(op(
        mount(
            Some("devpts"),
            "/dev/pts",
            Some("devpts"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
        "mount /dev/pts",
    ));
    ops.push(mkdir("/dev/shm", 0o1777));
    ops.push(op(tmpfs("/dev/shm", 0, &format!("mode=1777,size={shm}")), "mount /dev/shm"));
    // /proc: the container's own, with the host-wide knobs read-only or masked.
    ops.push(mkdir("/proc", 0o555));
    ops.push(attach(MountFd::Proc, "/proc", "mount /proc".into()));
    push_masks(&mut ops);
    // /sys: read-only, its network view that of the container's namespace.
    ops.push(mkdir("/sys", 0o555));
    let make_sysfs = sysfs.is_none();
    let sysfs_fd = match sysfs {
        Some(fd) => keep(&mut prep, fd),
        None => MountFd::Sysfs,
    };
    ops.push(attach(sysfs_fd, "/sys", "mount /sys read-only".into()));
    for (rel, _why) in SYS_MASKED_DIRS {
        ops.push(mask_dir(&format!("/sys/{rel}")));
    }
    // /tmp, /root
    ops.push(mkdir("/tmp", 0o1777));
    ops.push(op(tmpfs("/tmp", 0, &format!("mode=1777,size={disk}")), "mount /tmp"));
    ops.push(mkdir("/root", 0o700));

    // User binds: sources opened without following links, cloned as detached trees
    // (read-only ones recursively read-only) before the container exists.
    for (i, b) in spec.command.binds.iter().enumerate() {
        // Not idmapped: in user-supplied trees a host root-only file must stay unreadable
        // to the container's root.
        let (tree, kind) = detached::bind(&b.src, b.readonly)
            .map_err(|e| RuntimeError::InvalidSpec(format!("bind[{i}] source {}: {e}", b.src.display())))?;
        let fd = keep(&mut prep, tree);
        let rel = b.dst.strip_prefix("/").unwrap_or(&b.dst);
        let comps: Vec<_> = rel.components().collect();
        let mut acc = PathBuf::from("/");
        for (j, c) in comps.iter().enumerate() {
            acc.push(c);
            let last = j + 1 == comps.len();
            let path = cpath(&acc)?;
            let o = if last && kind == SourceKind::File {
                Op::Touch { path }
            } else {
                Op::Mkdir { path, mode: 0o755 }
            };
            ops.push(op(o, format!("bind[{i}]: create mountpoint {}", acc.display())));
        }
        ops.push(attach(
            fd,
            &b.dst.to_string_lossy(),
            format!("bind[{i}]: mount {} at {}", b.src.display(), b.dst.display()),
        ));
    }

    let argv: Vec<CString> = spec.command.argv.iter().map(|a| cstr(a, "argv")).collect::<Result<_, _>>()?;
    let envp: Vec<CString> =
        spec.command.env.iter().map(|(k, v)| cstr(format!("{k}={v}"), "env")).collect::<Result<_, _>>()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    let extra_fds: Vec<(RawFd, RawFd)> = spec.extra_fds.iter().map(|(f, t)| (f.as_raw_fd(), *t)).collect();
    let fd_base = extra_fds.iter().map(|(_, t)| *t + 1).max().unwrap_or(3).max(3);
    let plan = ChildPlan {
        sync_fd: -1,
        dir: cpath(dir)?,
        root_fd,
        make_proc: true,
        make_sysfs,
        proc_fd: -1,
        sysfs_fd: -1,
        loopback_up: false,
        cgroup_fds: Vec::new(),
        hostname: cstr(&spec.command.hostname, "hostname")?,
        ops,
        cwd: cstr(&spec.command.cwd, "cwd")?,
        argv_ptrs,
        envp_ptrs,
        strings: (argv, envp),
        stdout_fd: spec.stdout.as_raw_fd(),
        stderr_fd: spec.stderr.as_raw_fd(),
        extra_scratch: vec![-1; extra_fds.len()],
        extra_fds,
        fd_base,
        err_fd: -1,
        status_page: std::ptr::null_mut(),
        main_stack: std::ptr::null_mut(),
        no_init: spec.command.checkpointable,
        seccomp: inner.seccomp.clone(),
        cap_last: inner.cap_last,
    };
    Ok((plan, prep))
}

/// A read-only bind of a host system dir, idmapped where the runtime has a user namespace
/// and the file system allows it (then host root's files look root-owned inside, not
/// `nobody`'s; root-only files there, if any, become readable to the container's root,
/// which is why only the system dirs and the generated `/etc` get it).
fn readonly_bind(inner: &Inner, src: &Path) -> std::io::Result<(OwnedFd, SourceKind)> {
    match &inner.idmap {
        Some(ns) => detached::bind_readonly_idmapped(src, ns).map(|(t, k, _)| (t, k)),
        None => detached::bind(src, true),
    }
}

/// The `/proc` masks, in order (after `/proc` and `/dev/null` exist).
fn push_masks(ops: &mut Vec<LabeledOp>) {
    for (rel, _why) in PROC_READONLY {
        let p = format!("/proc/{rel}");
        ops.push(optional(
            mount(Some(&p), &p, None, libc::MS_BIND | libc::MS_REC, None),
            format!("bind {p}"),
        ));
        ops.push(optional(
            Op::Setattr {
                path: CString::new(p.clone()).unwrap_or_default(),
                set: libc::MOUNT_ATTR_RDONLY
                    | libc::MOUNT_ATTR_NOSUID
                    | libc::MOUNT_ATTR_NODEV
                    | libc::MOUNT_ATTR_NOEXEC,
                recursive: true,
            },
            format!("make {p} read-only"),
        ));
    }
    for (rel, _why) in PROC_MASKED_FILES {
        let p = format!("/proc/{rel}");
        ops.push(optional(mount(Some("/dev/null"), &p, None, libc::MS_BIND, None), format!("mask {p}")));
    }
    for (rel, _why) in PROC_MASKED_DIRS {
        ops.push(mask_dir(&format!("/proc/{rel}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mask_has_a_reason_and_a_plain_path() {
        for (rel, why) in
            PROC_READONLY.iter().chain(PROC_MASKED_FILES).chain(PROC_MASKED_DIRS).chain(SYS_MASKED_DIRS)
        {
            assert!(!why.is_empty(), "{rel}");
            assert!(!rel.starts_with('/') && !rel.contains(".."), "{rel}");
        }
    }
}

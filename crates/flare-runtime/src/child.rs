//! The code that runs in the cloned child, and the plan it executes.
//!
//! Everything the child needs (paths as `CString`s, mount options, argv/envp pointer
//! arrays, the seccomp program, pre-opened fds) is built by the parent in a [`ChildPlan`]
//! before `clone`. The caller is a multi-threaded process, so after `clone` the child may
//! find allocator or stdio locks held by threads that do not exist in it: the child code
//! therefore only makes raw libc syscall wrappers, never allocates, and reports failure as
//! a fixed-size record (step, index, errno) on a close-on-exec pipe.
//!
//! # User namespace
//!
//! The child is cloned into a new user namespace together with its other namespaces, so
//! they all belong to it. It waits (on `sync_fd`) until the parent has written its id maps
//! (container ids `0..size` = host ids `base..base+size`), changes directory to the runtime's
//! `spawn` dir while it is still the host's uid 0 (the owner of the root-only dirs above it), then
//! becomes uid/gid 0 of the namespace and drops the host's supplementary groups. From then
//! on every capability it has is a capability over its own namespaces only: the kernel
//! itself refuses writes to host sysctls, host-owned files (they show as `nobody`),
//! devices and mounts it does not own.
//!
//! # Capabilities
//!
//! The program keeps Docker's default capability set minus `CAP_MKNOD` and `CAP_NET_RAW`
//! (a set that years of container images are known to work with, and that excludes
//! everything that reaches beyond the container's own namespaces such as `CAP_SYS_ADMIN`,
//! `CAP_SYS_PTRACE`, `CAP_SYS_MODULE`, `CAP_NET_ADMIN`, `CAP_SYS_TIME`, `CAP_SYS_RAWIO`,
//! `CAP_DAC_READ_SEARCH`): `CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
//! NET_BIND_SERVICE SYS_CHROOT AUDIT_WRITE SETFCAP` (mask `0xa00405fb`), held in the
//! container's user namespace. `CAP_MKNOD` is dropped because no devices cgroup restricts
//! which nodes a container may open; `CAP_NET_RAW` because raw and packet sockets let a
//! container forge traffic on its link (ping works without it through ICMP datagram
//! sockets, which the network pool allows). The root overlay is also mounted `nodev,nosuid`.
//! Root inside the container needs CHOWN/DAC_OVERRIDE/FOWNER/FSETID to manage its own
//! (overlay upper) files, SETUID/SETGID/SETPCAP to drop to another user (pip, some
//! servers), KILL to signal its own processes, NET_BIND_SERVICE for servers. The bounding
//! set is reduced to this set (so nothing can be regained by exec), the ambient set is
//! cleared, and effective = permitted = inheritable = this set. `no_new_privs` is set, so
//! setuid binaries cannot raise privileges either.

use std::ffi::CString;
use std::os::fd::RawFd;

// Capability numbers from <linux/capability.h>.
const CAP_CHOWN: u32 = 0;
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_FOWNER: u32 = 3;
const CAP_FSETID: u32 = 4;
const CAP_KILL: u32 = 5;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_SYS_CHROOT: u32 = 18;
const CAP_AUDIT_WRITE: u32 = 29;
const CAP_SETFCAP: u32 = 31;

/// Capabilities kept in the container (see module docs).
pub const KEPT_CAPS: u64 = (1 << CAP_CHOWN)
    | (1 << CAP_DAC_OVERRIDE)
    | (1 << CAP_FOWNER)
    | (1 << CAP_FSETID)
    | (1 << CAP_KILL)
    | (1 << CAP_SETGID)
    | (1 << CAP_SETUID)
    | (1 << CAP_SETPCAP)
    | (1 << CAP_NET_BIND_SERVICE)
    | (1 << CAP_SYS_CHROOT)
    | (1 << CAP_AUDIT_WRITE)
    | (1 << CAP_SETFCAP);

/// A filesystem operation executed in the child, in order, after `pivot_root`: every path
/// is a path inside the container, resolved there (a symlink in an image cannot point an
/// operation at a host path).
#[derive(Debug)]
pub(crate) enum Op {
    Mount {
        src: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// Attach a detached mount at `target`.
    Attach { fd: MountFd, target: CString },
    /// `mount_setattr`: set `MOUNT_ATTR_*` bits on the mount at `path` (and below it).
    Setattr { path: CString, set: u64, recursive: bool },
    /// mkdir; EEXIST is fine.
    Mkdir { path: CString, mode: u32 },
    /// Create an empty file if missing.
    Touch { path: CString },
    /// symlink(target, path); EEXIST is fine.
    Symlink { target: CString, path: CString },
}

/// A detached mount to attach.
#[derive(Debug, Clone, Copy)]
pub(crate) enum MountFd {
    /// Made by the parent (see `detached.rs`), inherited by the child.
    Parent(RawFd),
    /// The container's own `/proc`, made by the child before `pivot_root` (the kernel
    /// lets a user namespace mount proc only while a full proc is visible to it).
    Proc,
    /// The container's own `/sys` (for a network namespace of its own; same rule).
    Sysfs,
}

/// An operation and the human-readable step name reported on failure.
#[derive(Debug)]
pub(crate) struct LabeledOp {
    pub op: Op,
    pub label: String,
    /// Skip the operation when its path does not exist in the container (masks of `/proc`
    /// and `/sys` entries that a kernel may not have).
    pub optional: bool,
}

/// Fixed (non-op) steps, reported by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Step {
    CgroupJoin = 1,
    WaitIdMap,
    SetIds,
    ChdirDir,
    AttachRoot,
    NewProc,
    MakePrivate,
    Hostname,
    LoopbackUp,
    Op,
    ChdirRootfs,
    PivotRoot,
    UmountOldRoot,
    ChdirRoot,
    SigMask,
    Fork,
    Fds,
    Setsid,
    Chdir,
    NoNewPrivs,
    CapBoundingSet,
    CapAmbient,
    Capset,
    Seccomp,
    Exec,
}

impl Step {
    pub fn from_u32(v: u32) -> Option<Step> {
        use Step::*;
        const ALL: [Step; 25] = [
            CgroupJoin,
            WaitIdMap,
            SetIds,
            ChdirDir,
            AttachRoot,
            NewProc,
            MakePrivate,
            Hostname,
            LoopbackUp,
            Op,
            ChdirRootfs,
            PivotRoot,
            UmountOldRoot,
            ChdirRoot,
            SigMask,
            Fork,
            Fds,
            Setsid,
            Chdir,
            NoNewPrivs,
            CapBoundingSet,
            CapAmbient,
            Capset,
            Seccomp,
            Exec,
        ];
        ALL.into_iter().find(|s| *s as u32 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Step::CgroupJoin => "join cgroup",
            Step::WaitIdMap => "wait for the user namespace's id maps",
            Step::SetIds => "become root of the user namespace",
            Step::ChdirDir => "chdir to the spawn dir",
            Step::AttachRoot => "attach the root overlay",
            Step::NewProc => "mount the container's proc/sysfs",
            Step::MakePrivate => "make mounts private",
            Step::Hostname => "sethostname",
            Step::LoopbackUp => "bring up lo",
            Step::Op => "filesystem",
            Step::ChdirRootfs => "chdir to rootfs",
            Step::PivotRoot => "pivot_root",
            Step::UmountOldRoot => "unmount old root",
            Step::ChdirRoot => "chdir /",
            Step::SigMask => "block signals",
            Step::Fork => "fork init",
            Step::Fds => "set up stdio and fds",
            Step::Setsid => "setsid",
            Step::Chdir => "chdir to cwd",
            Step::NoNewPrivs => "no_new_privs",
            Step::CapBoundingSet => "drop bounding capabilities",
            Step::CapAmbient => "clear ambient capabilities",
            Step::Capset => "capset",
            Step::Seccomp => "install seccomp filter",
            Step::Exec => "execve",
        }
    }
}

/// The error record the child writes to the pipe.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildErr {
    pub step: u32,
    pub index: u32,
    pub errno: i32,
}

impl ChildErr {
    pub fn encode(self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0..4].copy_from_slice(&self.step.to_ne_bytes());
        b[4..8].copy_from_slice(&self.index.to_ne_bytes());
        b[8..12].copy_from_slice(&self.errno.to_ne_bytes());
        b
    }

    pub fn decode(b: &[u8; 12]) -> ChildErr {
        let w = |i: usize| [b[i], b[i + 1], b[i + 2], b[i + 3]];
        ChildErr {
            step: u32::from_ne_bytes(w(0)),
            index: u32::from_ne_bytes(w(4)),
            errno: i32::from_ne_bytes(w(8)),
        }
    }
}

/// Everything the child needs, prepared by the parent.
pub(crate) struct ChildPlan {
    /// Read end of the pipe on which the parent says the id maps are written (-1: no user
    /// namespace).
    pub sync_fd: RawFd,
    /// A dir on the host (absolute) whose `rootfs` is the root overlay's mountpoint: the
    /// runtime's one `spawn` dir, shared by every container (each attaches there in its own
    /// mount namespace, after making every mount private).
    pub dir: CString,
    /// The detached root overlay.
    pub root_fd: RawFd,
    /// Make a proc (and a sysfs) instance before `pivot_root`, for `MountFd::Proc`/`Sysfs`.
    pub make_proc: bool,
    pub make_sysfs: bool,
    /// Filled in by the child.
    pub proc_fd: RawFd,
    pub sysfs_fd: RawFd,
    pub loopback_up: bool,
    pub cgroup_fds: Vec<RawFd>,
    pub hostname: CString,
    pub ops: Vec<LabeledOp>,
    pub cwd: CString,
    pub argv_ptrs: Vec<*const libc::c_char>,
    pub envp_ptrs: Vec<*const libc::c_char>,
    /// Owners of the strings the pointer arrays point into (kept alive, never read).
    #[allow(dead_code)]
    pub strings: (Vec<CString>, Vec<CString>),
    pub stdout_fd: RawFd,
    pub stderr_fd: RawFd,
    /// (source fd in the parent, target number in the container), plus scratch space.
    pub extra_fds: Vec<(RawFd, RawFd)>,
    pub extra_scratch: Vec<RawFd>,
    /// Lowest fd number above every target (fds are parked at or above it while shuffling).
    pub fd_base: RawFd,
    pub err_fd: RawFd,
    pub status_page: *mut i32,
    /// Top of the stack the main process runs on between init's `clone` and its `execve`
    /// (a mapping the parent made; init's copy of it is shared with the main process, see
    /// `setup_and_run`).
    pub main_stack: *mut libc::c_void,
    /// Exec the program as pid 1 (no init): see `CommandSpec::checkpointable`.
    pub no_init: bool,
    pub seccomp: Vec<libc::sock_filter>,
    pub cap_last: u32,
}

const DOT: &std::ffi::CStr = c".";
const ROOTFS: &std::ffi::CStr = c"rootfs";
const SLASH: &std::ffi::CStr = c"/";
const DEV_NULL: &std::ffi::CStr = c"/dev/null";
const EMPTY: &std::ffi::CStr = c"";

fn errno() -> i32 {
    // SAFETY: __errno_location returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() }
}

type R<T> = Result<T, ChildErr>;

fn fail(step: Step, index: u32) -> ChildErr {
    ChildErr { step: step as u32, index, errno: errno() }
}

fn check(r: libc::c_int, step: Step) -> R<libc::c_int> {
    if r < 0 {
        Err(fail(step, 0))
    } else {
        Ok(r)
    }
}

fn opt_ptr(c: &Option<CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// Write the error record and exit. Never returns.
fn report_and_exit(fd: RawFd, e: ChildErr) -> ! {
    let b = e.encode();
    // SAFETY: b is a valid 12-byte buffer; _exit never returns.
    unsafe {
        libc::write(fd, b.as_ptr().cast(), b.len());
        libc::_exit(127)
    }
}

/// clone(2) entry point. `arg` points at the (copied) `ChildPlan`.
pub(crate) extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: the parent passed a pointer to a ChildPlan that lives across clone; without
    // CLONE_VM the child has its own copy of that memory, which nobody else touches.
    let plan = unsafe { &mut *(arg as *mut ChildPlan) };
    let err_fd = plan.err_fd;
    match setup_and_run(plan) {
        Ok(never) => match never {},
        Err(e) => report_and_exit(err_fd, e),
    }
}

/// Does `path` exist (without following a final symlink)?
fn exists(path: &CString) -> bool {
    // SAFETY: st is a valid out buffer; path is NUL-terminated.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::lstat(path.as_ptr(), &mut st) == 0 }
}

fn op_target(op: &Op) -> &CString {
    match op {
        Op::Mount { target, .. } | Op::Attach { target, .. } => target,
        Op::Setattr { path, .. } | Op::Mkdir { path, .. } | Op::Touch { path } | Op::Symlink { path, .. } => {
            path
        }
    }
}

fn attach(fd: RawFd, target: &std::ffi::CStr) -> libc::c_long {
    // SAFETY: fd is a detached mount fd the parent made; target is NUL-terminated.
    unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd,
            EMPTY.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    }
}

/// A detached mount of a new `fstype` instance, made in the child (no allocation).
fn new_fs(fstype: &std::ffi::CStr, attrs: u64) -> libc::c_int {
    // SAFETY: raw syscalls on static NUL-terminated names; fds are closed on failure.
    unsafe {
        let ctx = libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), libc::FSOPEN_CLOEXEC) as libc::c_int;
        if ctx < 0 {
            return -1;
        }
        let r = libc::syscall(
            libc::SYS_fsconfig,
            ctx,
            libc::FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        );
        if r < 0 {
            libc::close(ctx);
            return -1;
        }
        let m = libc::syscall(libc::SYS_fsmount, ctx, libc::FSMOUNT_CLOEXEC, attrs) as libc::c_int;
        libc::close(ctx);
        m
    }
}

fn run_op(plan: &ChildPlan, lop: &LabeledOp, index: u32) -> R<()> {
    let op = &lop.op;
    // An optional op is skipped when its path does not exist. One that would create the
    // path checks first; the others (the masks: mounts over /proc and /sys entries) just
    // run, and only an ENOENT failure looks the path up, so that the usual case (the entry
    // exists) costs no lookup, and a failure for another reason (an ENOENT of the source,
    // say) stays an error.
    let creates = matches!(op, Op::Mkdir { .. } | Op::Touch { .. } | Op::Symlink { .. });
    if lop.optional && creates && !exists(op_target(op)) {
        return Ok(());
    }
    match do_op(plan, op, index) {
        Err(e) if lop.optional && !creates && e.errno == libc::ENOENT && !exists(op_target(op)) => Ok(()),
        r => r,
    }
}

fn do_op(plan: &ChildPlan, op: &Op, index: u32) -> R<()> {
    let f = |_| fail(Step::Op, index);
    // In every arm, each pointer is a NUL-terminated string owned by the plan, or null
    // where the syscall accepts null.
    match op {
        Op::Mount { src, target, fstype, flags, data } => {
            // SAFETY: plan-owned NUL-terminated paths; plain syscall.
            let r = unsafe {
                libc::mount(opt_ptr(src), target.as_ptr(), opt_ptr(fstype), *flags, opt_ptr(data).cast())
            };
            if r < 0 {
                return Err(f(()));
            }
        }
        Op::Attach { fd, target } => {
            let fd = match fd {
                MountFd::Parent(fd) => *fd,
                MountFd::Proc => plan.proc_fd,
                MountFd::Sysfs => plan.sysfs_fd,
            };
            if attach(fd, target) < 0 {
                return Err(f(()));
            }
        }
        Op::Setattr { path, set, recursive } => {
            let attr = libc::mount_attr { attr_set: *set, attr_clr: 0, propagation: 0, userns_fd: 0 };
            let flags = if *recursive { libc::AT_RECURSIVE as libc::c_uint } else { 0 };
            // SAFETY: attr is a valid mount_attr of the size passed; path is NUL-terminated.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_mount_setattr,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    flags,
                    &attr as *const libc::mount_attr,
                    std::mem::size_of::<libc::mount_attr>(),
                )
            };
            if r < 0 {
                return Err(f(()));
            }
        }
        Op::Mkdir { path, mode } => {
            // SAFETY: plan-owned NUL-terminated paths; plain syscall.
            let r = unsafe { libc::mkdir(path.as_ptr(), *mode) };
            if r < 0 && errno() != libc::EEXIST {
                return Err(f(()));
            }
        }
        Op::Touch { path } => {
            // SAFETY: plan-owned NUL-terminated paths; plain syscall.
            let fd = unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                    0o644,
                )
            };
            if fd < 0 {
                // An existing read-only file (e.g. in a read-only bind) is a fine mountpoint.
                // SAFETY: plan-owned NUL-terminated paths; plain syscall.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: plan-owned NUL-terminated paths; plain syscall.
                if unsafe { libc::stat(path.as_ptr(), &mut st) } < 0 {
                    return Err(f(()));
                }
            } else {
                // SAFETY: plan-owned NUL-terminated paths; plain syscall.
                unsafe { libc::close(fd) };
            }
        }
        Op::Symlink { target, path } => {
            // SAFETY: plan-owned NUL-terminated paths; plain syscall.
            let r = unsafe { libc::symlink(target.as_ptr(), path.as_ptr()) };
            if r < 0 && errno() != libc::EEXIST {
                return Err(f(()));
            }
        }
    }
    Ok(())
}

/// struct ifreq with the flags member (40 bytes on 64-bit Linux).
#[repr(C)]
struct IfreqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn loopback_up() -> R<()> {
    // SAFETY: plain socket/ioctl calls on a stack-allocated ifreq of the right size.
    unsafe {
        let s =
            check(libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0), Step::LoopbackUp)?;
        let mut ifr = IfreqFlags { name: [0; 16], flags: 0, _pad: [0; 22] };
        ifr.name[0] = b'l';
        ifr.name[1] = b'o';
        check(libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr as *mut IfreqFlags), Step::LoopbackUp)?;
        ifr.flags |= libc::IFF_UP as libc::c_short;
        check(libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr as *const IfreqFlags), Step::LoopbackUp)?;
        libc::close(s);
    }
    Ok(())
}

fn setup_and_run(plan: &mut ChildPlan) -> R<std::convert::Infallible> {
    // SAFETY: (whole function) raw syscalls on pointers owned by `plan`; no allocation.
    unsafe {
        for &fd in &plan.cgroup_fds {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(fail(Step::CgroupJoin, 0));
            }
        }
        if plan.sync_fd >= 0 {
            // The parent writes uid_map/gid_map, then one byte (EOF: it gave up).
            let mut b = 0u8;
            loop {
                let r = libc::read(plan.sync_fd, (&mut b as *mut u8).cast(), 1);
                if r == 1 {
                    break;
                }
                if r < 0 && errno() == libc::EINTR {
                    continue;
                }
                return Err(fail(Step::WaitIdMap, 0));
            }
        }
        // Still the host's uid 0 here: the owner of the state dir's root-only ancestors.
        check(libc::chdir(plan.dir.as_ptr()), Step::ChdirDir)?;
        if plan.sync_fd >= 0 {
            // Root of the new user namespace (an unprivileged uid on the host), with no
            // supplementary groups left from the host. Raw syscalls: glibc's wrappers
            // would signal the parent's other threads (which do not exist here) and wait.
            check(libc::syscall(libc::SYS_setresgid, 0, 0, 0) as libc::c_int, Step::SetIds)?;
            check(libc::syscall(libc::SYS_setresuid, 0, 0, 0) as libc::c_int, Step::SetIds)?;
            check(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) as libc::c_int,
                Step::SetIds,
            )?;
        }
        check(
            libc::mount(
                EMPTY.as_ptr(),
                SLASH.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            Step::MakePrivate,
        )?;
        let h = plan.hostname.as_bytes();
        check(libc::sethostname(h.as_ptr().cast(), h.len()), Step::Hostname)?;
        if plan.loopback_up {
            loopback_up()?;
        }
        if attach(plan.root_fd, ROOTFS) < 0 {
            return Err(fail(Step::AttachRoot, 0));
        }
        check(libc::chdir(ROOTFS.as_ptr()), Step::ChdirRootfs)?;
        if plan.make_proc {
            plan.proc_fd =
                new_fs(c"proc", libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOEXEC);
            if plan.proc_fd < 0 {
                return Err(fail(Step::NewProc, 0));
            }
        }
        if plan.make_sysfs {
            plan.sysfs_fd = new_fs(
                c"sysfs",
                libc::MOUNT_ATTR_RDONLY
                    | libc::MOUNT_ATTR_NOSUID
                    | libc::MOUNT_ATTR_NODEV
                    | libc::MOUNT_ATTR_NOEXEC,
            );
            if plan.sysfs_fd < 0 {
                return Err(fail(Step::NewProc, 1));
            }
        }
        check(
            libc::syscall(libc::SYS_pivot_root, DOT.as_ptr(), DOT.as_ptr()) as libc::c_int,
            Step::PivotRoot,
        )?;
        check(libc::umount2(DOT.as_ptr(), libc::MNT_DETACH), Step::UmountOldRoot)?;
        check(libc::chdir(SLASH.as_ptr()), Step::ChdirRoot)?;
        for (i, op) in plan.ops.iter().enumerate() {
            run_op(plan, op, i as u32)?;
        }

        if plan.no_init {
            return exec_main(plan);
        }
        // Signals init handles synchronously; blocked before fork so none is lost.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in FORWARDED.iter().chain([libc::SIGCHLD].iter()) {
            libc::sigaddset(&mut set, *s);
        }
        check(libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()), Step::SigMask)?;
        // The main process shares init's memory until its execve (CLONE_VM|CLONE_VFORK, as
        // posix_spawn does; init waits meanwhile): no copy of the page tables of this
        // copy of the runtime's process, which a plain fork paid for (0.1-0.4 ms). It has
        // its own stack, fd table, signal dispositions, credentials and seccomp filter
        // (none of CLONE_FILES, CLONE_SIGHAND, CLONE_THREAD), and every signal stays
        // blocked until it has reset the dispositions (`exec_main`), so no handler of the
        // runtime's runs on the shared memory. The exec'd program gets a memory of its own.
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut init_mask: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        check(libc::sigprocmask(libc::SIG_BLOCK, &all, &mut init_mask), Step::SigMask)?;
        let plan_ptr: *mut ChildPlan = plan;
        let pid = libc::clone(
            main_entry,
            plan.main_stack,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            plan_ptr.cast(),
        );
        if pid < 0 {
            return Err(fail(Step::Fork, 0));
        }
        check(libc::sigprocmask(libc::SIG_SETMASK, &init_mask, std::ptr::null_mut()), Step::SigMask)?;
        run_init(pid as libc::pid_t, &set, plan.status_page)
    }
}

/// clone(2) entry point of the main process (see `setup_and_run`). `arg` is init's plan.
extern "C" fn main_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is init's plan; init is suspended (CLONE_VFORK) until this process
    // execs or exits, so nothing else touches it meanwhile.
    let plan = unsafe { &mut *(arg as *mut ChildPlan) };
    let err_fd = plan.err_fd;
    match exec_main(plan) {
        Ok(never) => match never {},
        Err(e) => report_and_exit(err_fd, e),
    }
}

const FORWARDED: [libc::c_int; 6] =
    [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2];

/// The container's pid 1: reap everything, forward termination signals to the main
/// process, and exit when it exits (its raw wait status goes to the shared page).
fn run_init(main: libc::pid_t, set: &libc::sigset_t, page: *mut i32) -> ! {
    // SAFETY: raw syscalls; `page` is a 4096-byte shared mapping created by the parent.
    unsafe {
        // Drop every inherited fd (host fds, the error pipe: EOF for the parent at exec).
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        loop {
            let sig = libc::sigwaitinfo(set, std::ptr::null_mut());
            if sig < 0 {
                continue;
            }
            if sig == libc::SIGCHLD {
                loop {
                    let mut status = 0;
                    let r = libc::waitpid(-1, &mut status, libc::WNOHANG);
                    if r <= 0 {
                        break;
                    }
                    if r == main {
                        page.write_volatile(status);
                        page.add(1).write_volatile(1);
                        let code = if libc::WIFEXITED(status) {
                            libc::WEXITSTATUS(status)
                        } else {
                            128 + libc::WTERMSIG(status)
                        };
                        libc::_exit(code);
                    }
                }
            } else {
                libc::kill(main, sig);
            }
        }
    }
}

fn dup_high(fd: RawFd, base: RawFd) -> R<RawFd> {
    // SAFETY: fcntl on an fd number; failure is reported.
    check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, base) }, Step::Fds)
}

fn dup_to(from: RawFd, to: RawFd) -> R<()> {
    // SAFETY: dup2 on fd numbers; clears CLOEXEC on `to`.
    check(unsafe { libc::dup2(from, to) }, Step::Fds).map(|_| ())
}

/// The main process: fds, cwd, privileges, seccomp, exec.
fn exec_main(plan: &mut ChildPlan) -> R<std::convert::Infallible> {
    // SAFETY: (whole function) raw syscalls on plan-owned memory; no allocation.
    unsafe {
        // Default dispositions (the host may ignore SIGPIPE, which exec would keep).
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        check(libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()), Step::SigMask)?;
        check(libc::setsid(), Step::Setsid)?;

        // Park every fd we need above all targets, then place them.
        let base = plan.fd_base;
        let err = dup_high(plan.err_fd, base)?;
        let out = dup_high(plan.stdout_fd, base)?;
        let errout = dup_high(plan.stderr_fd, base)?;
        let null = check(libc::open(DEV_NULL.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC), Step::Fds)?;
        let null = dup_high(null, base)?;
        for (i, (src, _)) in plan.extra_fds.iter().enumerate() {
            plan.extra_scratch[i] = dup_high(*src, base)?;
        }
        // Everything from 3 up closes at exec; the dup2 targets below are exempted.
        check(
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) as libc::c_int,
            Step::Fds,
        )?;
        dup_to(null, 0)?;
        dup_to(out, 1)?;
        dup_to(errout, 2)?;
        for (i, (_, target)) in plan.extra_fds.iter().enumerate() {
            dup_to(plan.extra_scratch[i], *target)?;
        }
        let report = |e: ChildErr| -> ChildErr {
            let b = e.encode();
            libc::write(err, b.as_ptr().cast(), b.len());
            e
        };
        let result = (|| -> R<()> {
            check(libc::chdir(plan.cwd.as_ptr()), Step::Chdir)?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), Step::NoNewPrivs)?;
            for cap in 0..=plan.cap_last {
                if cap < 64 && KEPT_CAPS & (1u64 << cap) != 0 {
                    continue;
                }
                if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0
                    && errno() != libc::EINVAL
                {
                    return Err(fail(Step::CapBoundingSet, cap));
                }
            }
            check(
                libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0),
                Step::CapAmbient,
            )?;
            let mut hdr = CapHeader {
                version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
                pid: 0,
            };
            let lo = KEPT_CAPS as u32;
            let hi = (KEPT_CAPS >> 32) as u32;
            let data = [
                CapData { effective: lo, permitted: lo, inheritable: lo },
                CapData { effective: hi, permitted: hi, inheritable: hi },
            ];
            check(
                libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) as libc::c_int,
                Step::Capset,
            )?;
            let prog = libc::sock_fprog { len: plan.seccomp.len() as u16, filter: plan.seccomp.as_mut_ptr() };
            check(
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                    &prog as *const libc::sock_fprog,
                    0,
                    0,
                ),
                Step::Seccomp,
            )?;
            libc::execve(plan.argv_ptrs[0], plan.argv_ptrs.as_ptr(), plan.envp_ptrs.as_ptr());
            Err(fail(Step::Exec, 0))
        })();
        match result {
            Ok(()) => libc::_exit(127),
            Err(e) => {
                report(e);
                libc::_exit(127)
            }
        }
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_caps_are_docker_default_minus_mknod_and_net_raw() {
        assert_eq!(KEPT_CAPS, 0xa004_25fb & !(1 << 13));
    }

    #[test]
    fn err_roundtrip() {
        let e = ChildErr { step: Step::PivotRoot as u32, index: 7, errno: libc::EINVAL };
        let d = ChildErr::decode(&e.encode());
        assert_eq!((d.step, d.index, d.errno), (e.step, 7, libc::EINVAL));
        assert_eq!(Step::from_u32(d.step), Some(Step::PivotRoot));
    }
}

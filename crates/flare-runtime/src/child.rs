//! The code that runs in the cloned child, and the plan it executes.
//!
//! Everything the child needs (paths as `CString`s, mount options, argv/envp pointer
//! arrays, the seccomp program, pre-opened fds) is built by the parent in a [`ChildPlan`]
//! before `clone`. The caller is a multi-threaded process, so after `clone` the child may
//! find allocator or stdio locks held by threads that do not exist in it: the child code
//! therefore only makes raw libc syscall wrappers, never allocates, and reports failure as
//! a fixed-size record (step, index, errno) on a close-on-exec pipe.
//!
//! # Capabilities
//!
//! The program keeps Docker's default capability set minus `CAP_MKNOD` (a set that years
//! of container images are known to work with, and that excludes everything that reaches
//! beyond the container's own namespaces such as `CAP_SYS_ADMIN`, `CAP_SYS_PTRACE`,
//! `CAP_SYS_MODULE`, `CAP_NET_ADMIN`, `CAP_SYS_TIME`, `CAP_SYS_RAWIO`,
//! `CAP_DAC_READ_SEARCH`): `CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
//! NET_BIND_SERVICE NET_RAW SYS_CHROOT AUDIT_WRITE SETFCAP` (mask `0xa00425fb`).
//! `CAP_MKNOD` is dropped because no devices cgroup restricts which nodes a container may
//! open: with it, root in the container could create a node for the host's disk. The root
//! overlay is also mounted `nodev,nosuid`. Root inside the container
//! needs CHOWN/DAC_OVERRIDE/FOWNER/FSETID to manage its own (overlay upper) files,
//! SETUID/SETGID/SETPCAP to drop to another user (pip, some servers), KILL to signal its
//! own processes, NET_BIND_SERVICE/NET_RAW for servers and ping. The bounding set is
//! reduced to this set (so nothing can be regained by exec), the ambient set is cleared,
//! and effective = permitted = inheritable = this set. `no_new_privs` is set, so setuid
//! binaries cannot raise privileges either.

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
const CAP_NET_RAW: u32 = 13;
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
    | (1 << CAP_NET_RAW)
    | (1 << CAP_SYS_CHROOT)
    | (1 << CAP_AUDIT_WRITE)
    | (1 << CAP_SETFCAP);

/// A filesystem operation executed in the child, in order.
#[derive(Debug)]
pub(crate) enum Op {
    Mount {
        src: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// mkdir; EEXIST is fine.
    Mkdir { path: CString, mode: u32 },
    /// Create an empty file if missing.
    Touch { path: CString },
    /// symlink(target, path); EEXIST is fine.
    Symlink { target: CString, path: CString },
}

/// An operation and the human-readable step name reported on failure.
#[derive(Debug)]
pub(crate) struct LabeledOp {
    pub op: Op,
    pub label: String,
}

/// Fixed (non-op) steps, reported by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Step {
    Setns = 1,
    CgroupJoin,
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
        const ALL: [Step; 21] = [
            Setns,
            CgroupJoin,
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
            Step::Setns => "join network namespace",
            Step::CgroupJoin => "join cgroup",
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
    pub net_fd: RawFd,
    pub loopback_up: bool,
    pub cgroup_fds: Vec<RawFd>,
    pub hostname: CString,
    pub ops: Vec<LabeledOp>,
    pub rootfs: CString,
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
    pub seccomp: Vec<libc::sock_filter>,
    pub cap_last: u32,
}

const DOT: &std::ffi::CStr = c".";
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

fn run_op(op: &Op, index: u32) -> R<()> {
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
        if plan.net_fd >= 0 {
            check(libc::setns(plan.net_fd, libc::CLONE_NEWNET), Step::Setns)?;
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
        for (i, op) in plan.ops.iter().enumerate() {
            run_op(&op.op, i as u32)?;
        }
        check(libc::chdir(plan.rootfs.as_ptr()), Step::ChdirRootfs)?;
        check(
            libc::syscall(libc::SYS_pivot_root, DOT.as_ptr(), DOT.as_ptr()) as libc::c_int,
            Step::PivotRoot,
        )?;
        check(libc::umount2(DOT.as_ptr(), libc::MNT_DETACH), Step::UmountOldRoot)?;
        check(libc::chdir(SLASH.as_ptr()), Step::ChdirRoot)?;

        // Signals init handles synchronously; blocked before fork so none is lost.
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in FORWARDED.iter().chain([libc::SIGCHLD].iter()) {
            libc::sigaddset(&mut set, *s);
        }
        check(libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old), Step::SigMask)?;
        // Raw clone == fork without glibc's atfork handlers (which take locks).
        let pid =
            libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0usize, 0usize, 0usize, 0usize);
        if pid < 0 {
            return Err(fail(Step::Fork, 0));
        }
        if pid == 0 {
            return exec_main(plan);
        }
        run_init(pid as libc::pid_t, &set, plan.status_page)
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
    fn kept_caps_match_docker_default() {
        assert_eq!(KEPT_CAPS, 0xa004_25fb);
    }

    #[test]
    fn err_roundtrip() {
        let e = ChildErr { step: Step::PivotRoot as u32, index: 7, errno: libc::EINVAL };
        let d = ChildErr::decode(&e.encode());
        assert_eq!((d.step, d.index, d.errno), (e.step, 7, libc::EINVAL));
        assert_eq!(Step::from_u32(d.step), Some(Step::PivotRoot));
    }
}

//! Changing a running container: binds attached into its mount namespace, and its cgroup
//! limits rewritten. This is what a pre-started runner needs at assignment (the worker
//! starts containers before it knows whose code they will run).
//!
//! Attaching a bind, and why it is safe:
//! - the source is opened on the host as at spawn ([`crate::detached::bind`]:
//!   `O_PATH|O_NOFOLLOW`, a symlink refused, `open_tree(OPEN_TREE_CLONE)`, `nosuid,nodev`,
//!   read-only recursively before anyone sees it): no host path is resolved through
//!   anything the container controls;
//! - `setns(CLONE_NEWNS)` fails in a multithreaded process (the daemon is one), so a
//!   helper process (a `clone` with its own fs struct, running only raw syscalls) joins the container's
//!   mount namespace through the init's pidfd (no pid reuse race), changes its root to the
//!   container's root (opened from `/proc/<pid>/root` while the pidfd proves the pid is
//!   still the container's), and `move_mount`s each detached tree onto its destination.
//!   The destination is resolved inside the container (a symlink there can only point at
//!   something of the container's own), never on the host;
//! - binds are attached in order, so a later one may sit inside an earlier one (a Python
//!   environment under `/root` over the code mount).

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use crate::error::IoContext;
use crate::{detached, sys, Bind, Container, Limits, RuntimeError};

impl Container {
    /// Attach `binds` (in order) into the running container's mount namespace. Each
    /// destination must already exist in the container (a dir for a dir, a file for a
    /// file); the mount goes on top of whatever is there.
    pub fn attach_binds(&self, binds: &[Bind]) -> Result<(), RuntimeError> {
        if self.exit.is_some() {
            return Err(RuntimeError::InvalidSpec(format!("container {} has exited", self.id)));
        }
        let mut trees = Vec::with_capacity(binds.len());
        let mut dsts = Vec::with_capacity(binds.len());
        for b in binds {
            if !b.dst.is_absolute()
                || b.dst.components().any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(RuntimeError::InvalidSpec(format!(
                    "bind destination {} must be absolute without '..'",
                    b.dst.display()
                )));
            }
            let (tree, _) = detached::bind(&b.src, b.readonly).ctx(|| format!("bind {}", b.src.display()))?;
            trees.push(tree);
            dsts.push(
                CString::new(b.dst.as_os_str().as_bytes())
                    .map_err(|_| RuntimeError::InvalidSpec(format!("bind destination {:?}", b.dst)))?,
            );
        }
        let root: OwnedFd = fs::File::open(format!("/proc/{}/root", self.pid))
            .ctx(|| format!("open the root of container {}", self.id))?
            .into();
        // The pid named the container's init when the root was opened if init is still
        // alive now (signal 0 through the pidfd that pins it).
        // SAFETY: pidfd_send_signal with a valid pidfd, signal 0 and no siginfo.
        let alive = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if alive < 0 {
            return Err(RuntimeError::io(
                format!("container {} is gone", self.id),
                std::io::Error::last_os_error(),
            ));
        }
        let (err_r, err_w) = sys::pipe_cloexec().ctx(|| "create pipe".into())?;
        let plan = AttachPlan {
            pidfd: self.pidfd.as_raw_fd(),
            root: root.as_raw_fd(),
            err: err_w.as_raw_fd(),
            trees: trees.iter().map(|t| t.as_raw_fd()).collect(),
            dsts: dsts.iter().map(|d| d.as_ptr()).collect(),
        };
        // The helper shares this process's memory and runs while this thread waits
        // (CLONE_VM|CLONE_VFORK: no page tables copied, about a millisecond less than a
        // fork of the daemon), but has its own fs struct (no CLONE_FS), which
        // setns(CLONE_NEWNS) requires.
        let stack = sys::Stack::new(HELPER_STACK).ctx(|| "mmap the attach helper's stack".into())?;
        // SAFETY: `attach_entry` only reads `plan` (alive, and not touched by this thread,
        // which is suspended until the helper exits) and makes raw syscalls on its own
        // fresh stack; it never returns into Rust code of this thread.
        let pid = unsafe {
            libc::clone(
                attach_entry,
                stack.top(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                (&plan as *const AttachPlan).cast_mut().cast(),
            )
        };
        if pid < 0 {
            return Err(RuntimeError::io("start the attach helper", std::io::Error::last_os_error()));
        }
        drop(err_w);
        let status = sys::waitpid(pid, false).ctx(|| "wait for the attach helper".into())?.unwrap_or(0);
        // The helper has exited: whatever it reported is in the pipe (non-blocking read,
        // since a process forked meanwhile may hold a copy of the write end).
        let mut buf = [0u8; 8];
        // SAFETY: fcntl and read on a pipe fd we own, into a buffer of the size passed.
        let n = unsafe {
            libc::fcntl(err_r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
            libc::read(err_r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
        };
        if n == 8 {
            let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
            let what = match step {
                0 => "join the container's mount namespace".to_owned(),
                1 => "enter the container's root".to_owned(),
                n => format!("attach {}", binds[(n - 2) as usize].dst.display()),
            };
            return Err(RuntimeError::Setup { step: what, errno });
        }
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            return Err(RuntimeError::Setup { step: format!("attach helper (status {status})"), errno: 0 });
        }
        Ok(())
    }

    /// Replace the container's cgroup limits with `limits` (cpu, memory, pids; a `None`
    /// lifts that limit). The writable layer's size (`disk_bytes`) is fixed at spawn.
    pub fn apply_limits(&mut self, limits: &Limits) -> Result<(), RuntimeError> {
        let cg = self
            .res
            .cgroup
            .as_ref()
            .ok_or_else(|| RuntimeError::InvalidSpec(format!("container {} has no cgroup", self.id)))?;
        cg.apply_limits(&self.res.inner.cgroups, limits)?;
        self.memory_limit = limits.memory_bytes;
        Ok(())
    }
}

/// What the forked helper needs, all prepared before the fork.
struct AttachPlan {
    pidfd: libc::c_int,
    root: libc::c_int,
    err: libc::c_int,
    trees: Vec<libc::c_int>,
    dsts: Vec<*const libc::c_char>,
}

/// The helper's stack: it calls a handful of syscalls and nothing else.
const HELPER_STACK: usize = 64 * 1024;

extern "C" fn attach_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `AttachPlan` that `attach_binds` passed to clone, alive while
    // the helper runs (its caller waits for it).
    let plan = unsafe { &*(arg as *const AttachPlan) };
    attach_child(plan)
}

/// The helper: joins the container's mount namespace, enters its root, attaches
/// every tree; on failure writes (step, errno) to the error pipe. Never returns. It runs
/// in the caller's memory with the calling thread's TLS, so it touches nothing but `p`.
fn attach_child(p: &AttachPlan) -> ! {
    let fail = |step: u32| -> ! {
        // SAFETY: errno location is valid in this (single) thread; write and _exit are
        // async-signal-safe and take a valid buffer.
        unsafe {
            let errno = *libc::__errno_location();
            let mut buf = [0u8; 8];
            buf[..4].copy_from_slice(&step.to_ne_bytes());
            buf[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(p.err, buf.as_ptr().cast(), 8);
            libc::_exit(1)
        }
    };
    // SAFETY: setns with a valid pidfd; this process is single-threaded (just forked),
    // which setns(CLONE_NEWNS) requires.
    if unsafe { libc::setns(p.pidfd, libc::CLONE_NEWNS) } != 0 {
        fail(0);
    }
    // SAFETY: fchdir/chroot on an fd of a directory in the namespace just joined.
    if unsafe { libc::fchdir(p.root) } != 0 || unsafe { libc::chroot(c".".as_ptr()) } != 0 {
        fail(1);
    }
    for (i, (tree, dst)) in p.trees.iter().zip(&p.dsts).enumerate() {
        // SAFETY: tree is a detached mount fd, dst a NUL-terminated path that outlives the
        // call (the parent's memory, copied by fork); the empty path names the fd itself.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                *tree,
                c"".as_ptr(),
                libc::AT_FDCWD,
                *dst,
                libc::MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        if r != 0 {
            fail(i as u32 + 2);
        }
    }
    // SAFETY: _exit is always safe to call.
    unsafe { libc::_exit(0) }
}

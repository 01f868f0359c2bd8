//! The few system calls this crate makes, each behind a small function.

use std::ffi::CStr;
use std::io;
use std::os::fd::RawFd;
use std::path::Path;

/// The running kernel's release (`uname -r`), e.g. `6.18.4-foo`.
pub fn kernel_release() -> io::Result<String> {
    // SAFETY: utsname is plain data; zeroed is a valid value for it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid out buffer for uname.
    if unsafe { libc::uname(&mut u) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: uname NUL-terminates release within its fixed-size array.
    let r = unsafe { CStr::from_ptr(u.release.as_ptr()) };
    Ok(r.to_string_lossy().into_owned())
}

/// Make the calling process a child subreaper: processes that `criu restore -d` leaves
/// behind (their parent, criu, exits) are re-parented to it, so it can `waitpid` them.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) only changes a flag of this process.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Does `/proc/<pid>` exist (a process, or a zombie, with that pid)?
pub fn pid_exists(proc_root: &Path, pid: i32) -> bool {
    proc_root.join(pid.to_string()).exists()
}

/// Send `sig` to `pid` (ESRCH is not an error).
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill has no memory preconditions.
    if unsafe { libc::kill(pid, sig) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// Non-blocking (`hang == false`) or blocking `waitpid` of a child; `Ok(None)`: still running.
pub fn waitpid(pid: i32, hang: bool) -> io::Result<Option<i32>> {
    let mut status = 0;
    let flags = if hang { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: status is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(if r == 0 { None } else { Some(status) });
    }
}

/// In a child between fork and exec: move `src` to number `dst` without close-on-exec.
/// Only async-signal-safe calls (dup2, fcntl).
pub(crate) fn place_fd(src: RawFd, dst: RawFd) -> io::Result<()> {
    if src == dst {
        // SAFETY: fcntl on an fd number; failure is reported.
        let flags = unsafe { libc::fcntl(src, libc::F_GETFD) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(src, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(());
    }
    // SAFETY: dup2 on fd numbers; the new fd has no close-on-exec flag.
    if unsafe { libc::dup2(src, dst) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// In a child between fork and exec: move the calling process into the cgroup whose
/// `cgroup.procs` is open as `procs` ("0" means the writer). Async-signal-safe.
pub(crate) fn join_cgroup(procs: RawFd) -> io::Result<()> {
    // SAFETY: writes 1 byte from a static buffer to an fd number.
    if unsafe { libc::write(procs, b"0".as_ptr().cast(), 1) } != 1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

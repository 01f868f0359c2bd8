//! Thin syscall wrappers for the host (parent) side. Paths are parameters so they can be
//! exercised in tests. The in-container (post-clone) code lives in `child.rs` and uses raw
//! libc calls only.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Path to a NUL-terminated string (fails on interior NUL).
pub(crate) fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Send a signal; errors (e.g. ESRCH) are ignored.
pub(crate) fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// A close-on-exec pipe: (read, write).
pub fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid 2-element array for pipe2 to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both fds are fresh and owned by us.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// pidfd_open(2).
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes plain integers.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// Wait until `fd` is readable (or hung up), at most until `deadline`: `Ok(false)` on
/// time-out.
pub(crate) fn wait_readable(fd: &OwnedFd, deadline: std::time::Instant) -> io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r > 0 {
            return Ok(true);
        }
        if left.is_zero() {
            return Ok(false);
        }
    }
}

/// Read until EOF (retrying EINTR), up to `buf.len()` bytes; returns the count. Fails
/// with `TimedOut` if the writer keeps the pipe open past `deadline`.
pub(crate) fn read_to_eof(fd: &OwnedFd, buf: &mut [u8], deadline: std::time::Instant) -> io::Result<usize> {
    let mut n = 0;
    loop {
        if !wait_readable(fd, deadline)? {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        let rest = &mut buf[n..];
        if rest.is_empty() {
            // Drain the remainder so the writer never blocks; content beyond is ignored.
            let mut sink = [0u8; 64];
            // SAFETY: sink is a valid writable buffer of the given length.
            let r = unsafe { libc::read(fd.as_raw_fd(), sink.as_mut_ptr().cast(), sink.len()) };
            if r <= 0 {
                return Ok(n);
            }
            continue;
        }
        // SAFETY: rest is a valid writable buffer of rest.len() bytes.
        let r = unsafe { libc::read(fd.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(n);
        }
        n += r as usize;
    }
}

/// waitpid(2) on one pid, retrying EINTR. Returns `None` with WNOHANG if still running.
pub(crate) fn waitpid(pid: i32, nohang: bool) -> io::Result<Option<i32>> {
    let mut status = 0;
    loop {
        let flags = if nohang { libc::WNOHANG } else { 0 };
        // SAFETY: status is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(None);
        }
        return Ok(Some(status));
    }
}

/// Lazily unmount `target` (MNT_DETACH).
pub(crate) fn umount_detach(target: &Path) -> io::Result<()> {
    let c = cpath(target)?;
    // SAFETY: c is a valid NUL-terminated path.
    cvt(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) }).map(|_| ())
}

/// Bind-mount `src` onto `dst`.
pub(crate) fn bind_mount(src: &Path, dst: &Path) -> io::Result<()> {
    let s = cpath(src)?;
    let d = cpath(dst)?;
    // SAFETY: all pointers are valid NUL-terminated strings or null.
    cvt(unsafe { libc::mount(s.as_ptr(), d.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) })
        .map(|_| ())
}

/// Recursively bind-mount `src` onto `dst` and make the new mount private (nothing
/// propagates to or from it).
pub(crate) fn rbind_private(src: &Path, dst: &Path) -> io::Result<()> {
    let s = cpath(src)?;
    let d = cpath(dst)?;
    // SAFETY: all pointers are valid NUL-terminated strings or null.
    cvt(unsafe {
        libc::mount(s.as_ptr(), d.as_ptr(), std::ptr::null(), libc::MS_BIND | libc::MS_REC, std::ptr::null())
    })?;
    // SAFETY: as above.
    cvt(unsafe {
        libc::mount(
            std::ptr::null(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_PRIVATE | libc::MS_REC,
            std::ptr::null(),
        )
    })
    .map(|_| ())
}

/// setns(2) for the calling thread.
pub(crate) fn setns(fd: &OwnedFd, nstype: libc::c_int) -> io::Result<()> {
    // SAFETY: setns takes an fd and a flag word.
    cvt(unsafe { libc::setns(fd.as_raw_fd(), nstype) }).map(|_| ())
}

/// Write all of `buf` to `fd`.
pub(crate) fn write_all(fd: &OwnedFd, buf: &[u8]) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: the slice is valid for its length.
        let r = unsafe { libc::write(fd.as_raw_fd(), buf[off..].as_ptr().cast(), buf.len() - off) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        off += r as usize;
    }
    Ok(())
}

/// unshare(2) for the calling thread.
pub(crate) fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes a flag word.
    cvt(unsafe { libc::unshare(flags) }).map(|_| ())
}

/// An anonymous shared mapping of one page, visible to the cloned child and the parent.
pub(crate) struct SharedPage(*mut libc::c_void);

// SAFETY: the page is plain memory; access goes through volatile reads of i32s.
unsafe impl Send for SharedPage {}
// SAFETY: as above; the parent only reads.
unsafe impl Sync for SharedPage {}

impl SharedPage {
    pub fn new() -> io::Result<Self> {
        // SAFETY: anonymous mapping with no address hint.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedPage(p))
    }

    pub fn as_ptr(&self) -> *mut i32 {
        self.0.cast()
    }

    /// (valid flag, value) as written by the container's init.
    pub fn read_status(&self) -> Option<i32> {
        let p = self.as_ptr();
        // SAFETY: the mapping is 4096 bytes, so offsets 0 and 1 (i32) are in bounds.
        let (flag, status) = unsafe { (p.add(1).read_volatile(), p.read_volatile()) };
        (flag == 1).then_some(status)
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: we own the mapping of exactly this size.
        unsafe {
            libc::munmap(self.0, 4096);
        }
    }
}

/// A private anonymous mapping used as the clone child's stack.
pub(crate) struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

impl Stack {
    pub fn new(len: usize) -> io::Result<Self> {
        // SAFETY: anonymous mapping with no address hint.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Stack { base: p, len })
    }

    /// The (16-byte aligned) top: stacks grow down.
    pub fn top(&self) -> *mut libc::c_void {
        // SAFETY: base+len is one past the end of the mapping, a valid pointer to form.
        let top = unsafe { self.base.cast::<u8>().add(self.len) };
        ((top as usize) & !15) as *mut libc::c_void
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: we own the mapping of exactly this size.
        unsafe {
            libc::munmap(self.base, self.len);
        }
    }
}

/// Raise the calling thread's nice value (lower its priority); threads and processes it
/// starts inherit it. Best effort: failures are ignored.
pub(crate) fn lower_thread_priority(nice: i32) {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // SAFETY: setpriority on our own thread id; on Linux PRIO_PROCESS with a tid affects that thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, tid, nice);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_to_eof_gives_up_at_the_deadline() {
        let (r, w) = pipe_cloexec().unwrap();
        let mut buf = [0u8; 12];
        let start = std::time::Instant::now();
        let err = read_to_eof(&r, &mut buf, start + std::time::Duration::from_millis(50)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= std::time::Duration::from_millis(50));
        write_all(&w, b"abc").unwrap();
        drop(w);
        let n =
            read_to_eof(&r, &mut buf, std::time::Instant::now() + std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(&buf[..n], b"abc");
    }
}

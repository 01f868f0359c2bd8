//! Detached mounts made on the host side before `clone` (the new mount API: `fsopen`,
//! `fsmount`, `open_tree`, `mount_setattr`). A detached mount belongs to no mount namespace
//! and vanishes when its last fd closes; the container attaches it with `move_mount` into
//! its own namespace. Doing it here, as host root outside the container's user namespace,
//! means:
//! - no user path is ever resolved on the host by the container: bind sources are opened
//!   `O_PATH|O_NOFOLLOW` and checked, then cloned from the fd;
//! - read-only binds are read-only recursively (`AT_RECURSIVE`) before anyone sees them;
//! - the root overlay is mounted with the host's credentials, so copy-up and whiteouts
//!   work as on any host overlay while the container's root is an unprivileged host uid.
//!
//! Every function takes its paths as parameters (tests drive them on temp dirs).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use crate::sys::cpath;

fn cvt_fd(r: libc::c_long) -> io::Result<OwnedFd> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

fn cvt(r: libc::c_long) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A file system context (`fsopen`) being configured.
struct FsContext(OwnedFd);

impl FsContext {
    fn open(fstype: &std::ffi::CStr) -> io::Result<FsContext> {
        // SAFETY: fstype is NUL-terminated; fsopen returns a new fd.
        cvt_fd(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), libc::FSOPEN_CLOEXEC) })
            .map(FsContext)
    }

    fn set(&self, key: &str, value: &str) -> io::Result<()> {
        let k = CString::new(key).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let v = CString::new(value).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: both strings are NUL-terminated; aux is unused for SET_STRING.
        cvt(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.0.as_raw_fd(),
                libc::FSCONFIG_SET_STRING,
                k.as_ptr(),
                v.as_ptr(),
                0,
            )
        })
        .map_err(|e| io::Error::new(e.kind(), format!("{key}={value}: {e}")))
    }

    /// Create the superblock and a detached mount of it with `attrs` (`MOUNT_ATTR_*`).
    fn mount(self, attrs: u64) -> io::Result<OwnedFd> {
        // SAFETY: CMD_CREATE takes no key/value.
        cvt(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.0.as_raw_fd(),
                libc::FSCONFIG_CMD_CREATE,
                std::ptr::null::<libc::c_char>(),
                std::ptr::null::<libc::c_void>(),
                0,
            )
        })?;
        // SAFETY: fsmount on a created context returns a new mount fd.
        cvt_fd(unsafe { libc::syscall(libc::SYS_fsmount, self.0.as_raw_fd(), libc::FSMOUNT_CLOEXEC, attrs) })
    }
}

/// A detached tmpfs of at most `size_bytes`, root dir mode `mode`.
pub(crate) fn tmpfs(size_bytes: u64, mode: u32, attrs: u64) -> io::Result<OwnedFd> {
    let ctx = FsContext::open(c"tmpfs")?;
    ctx.set("size", &size_bytes.to_string())?;
    ctx.set("mode", &format!("{mode:o}"))?;
    ctx.mount(attrs)
}

/// A detached overlay mount. `lower`, `upper` and `work` are paths the host resolves; use
/// [`fd_path`] to name a directory inside a detached mount.
pub(crate) fn overlay(lower: &str, upper: &str, work: &str, attrs: u64) -> io::Result<OwnedFd> {
    let ctx = FsContext::open(c"overlay")?;
    ctx.set("lowerdir", lower)?;
    ctx.set("upperdir", upper)?;
    ctx.set("workdir", work)?;
    ctx.mount(attrs)
}

/// A fresh, detached sysfs instance: it shows the network devices of the calling thread's
/// network namespace.
pub(crate) fn sysfs(attrs: u64) -> io::Result<OwnedFd> {
    FsContext::open(c"sysfs")?.mount(attrs)
}

/// Attach the detached mount `fd` at the host path `target` (in the caller's mount
/// namespace).
pub(crate) fn attach_at(fd: &OwnedFd, target: &Path) -> io::Result<()> {
    let t = crate::sys::cpath(target)?;
    // SAFETY: move_mount with a valid detached-mount fd, an empty source path (the fd
    // itself) and a NUL-terminated target path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The path of `rel` inside the directory (or detached mount) `fd`, via `/proc/self/fd`.
pub(crate) fn fd_path(fd: &OwnedFd, rel: &str) -> String {
    format!("/proc/self/fd/{}/{rel}", fd.as_raw_fd())
}

/// What a bind source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceKind {
    Dir,
    /// Anything else a bind may carry: regular file, socket, character device.
    File,
}

/// Open `path` with `O_PATH|O_NOFOLLOW` (the last component is never followed) and say
/// what it is. A symlink is refused: bind sources are resolved by the server, never
/// through a link someone else could have planted.
pub(crate) fn open_source(path: &Path) -> io::Result<(OwnedFd, SourceKind)> {
    let c = cpath(path)?;
    // SAFETY: c is NUL-terminated; O_PATH opens nothing's contents.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    let fd = cvt_fd(fd as libc::c_long)?;
    // SAFETY: st is a valid out buffer; fd is an O_PATH fd, which fstat accepts.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } as libc::c_long)?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFLNK => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is a symlink; bind sources must not be links", path.display()),
        )),
        libc::S_IFDIR => Ok((fd, SourceKind::Dir)),
        libc::S_IFREG | libc::S_IFSOCK | libc::S_IFCHR => Ok((fd, SourceKind::File)),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has file type {other:o}, which cannot be bound", path.display()),
        )),
    }
}

/// Clone the mount tree at `fd` (from [`open_source`]) as a detached bind. `recursive`
/// takes the mounts below it too (then `attrs` applies to all of them).
pub(crate) fn clone_tree(fd: &OwnedFd, recursive: bool) -> io::Result<OwnedFd> {
    let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: an empty NUL-terminated path with AT_EMPTY_PATH names the fd itself.
    cvt_fd(unsafe { libc::syscall(libc::SYS_open_tree, fd.as_raw_fd(), c"".as_ptr(), flags) })
}

/// Set `MOUNT_ATTR_*` bits on the mount at `fd` (and every mount below it if `recursive`).
pub(crate) fn set_attrs(fd: &OwnedFd, attrs: u64, recursive: bool) -> io::Result<()> {
    set_attrs_idmap(fd, attrs, recursive, None)
}

/// [`set_attrs`], plus an id mapping (`MOUNT_ATTR_IDMAP`) taken from the user namespace
/// `userns` when given: files owned by host id `n` then show as the ids that namespace
/// maps `n` to.
fn set_attrs_idmap(fd: &OwnedFd, attrs: u64, recursive: bool, userns: Option<&OwnedFd>) -> io::Result<()> {
    let (attrs, userns_fd) = match userns {
        Some(u) => (attrs | libc::MOUNT_ATTR_IDMAP, u.as_raw_fd() as u64),
        None => (attrs, 0),
    };
    let attr = libc::mount_attr { attr_set: attrs, attr_clr: 0, propagation: 0, userns_fd };
    let mut flags = libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: attr is a valid mount_attr of the size passed; the path is empty.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    })
}

/// A detached bind of `path` (opened without following it), read-only and recursive if
/// `readonly`, otherwise just that mount; always `nosuid,nodev`.
pub(crate) fn bind(path: &Path, readonly: bool) -> io::Result<(OwnedFd, SourceKind)> {
    let (src, kind) = open_source(path)?;
    let tree = clone_tree(&src, readonly)?;
    let mut attrs = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if readonly {
        attrs |= libc::MOUNT_ATTR_RDONLY;
    }
    set_attrs(&tree, attrs, readonly)?;
    Ok((tree, kind))
}

/// A read-only, recursive detached bind of `path` whose files show through the id map of
/// `userns` (host root's files as the container's root's). Only ever read-only: through a
/// writable idmapped bind the container's root could chown or chmod host files. Falls
/// back to a plain read-only bind where a file system below `path` cannot be idmapped,
/// and says so with `false`.
pub(crate) fn bind_readonly_idmapped(
    path: &Path,
    userns: &OwnedFd,
) -> io::Result<(OwnedFd, SourceKind, bool)> {
    let (src, kind) = open_source(path)?;
    let attrs = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_RDONLY;
    let tree = clone_tree(&src, true)?;
    match set_attrs_idmap(&tree, attrs, true, Some(userns)) {
        Ok(()) => Ok((tree, kind, true)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EPERM) | Some(libc::ENOSYS)) => {
            let tree = clone_tree(&src, true)?;
            set_attrs(&tree, attrs, true)?;
            Ok((tree, kind, false))
        }
        Err(e) => Err(e),
    }
}

/// A user namespace that maps ids `0..size` to host ids `base..base+size`, for idmapped
/// binds: a short-lived child is cloned into it, its maps written, the namespace opened,
/// and the child ended. Call where spawning a process is fine (start-up).
pub(crate) fn userns_fd(base: u32, size: u32) -> io::Result<OwnedFd> {
    extern "C" fn wait_for_parent(arg: *mut libc::c_void) -> libc::c_int {
        let fd = arg as usize as libc::c_int;
        let mut b = 0u8;
        // SAFETY: reads one byte into a stack variable; _exit never returns.
        unsafe {
            libc::read(fd, (&mut b as *mut u8).cast(), 1);
            libc::_exit(0)
        }
    }
    let (r, w) = crate::sys::pipe_cloexec()?;
    let stack = crate::sys::Stack::new(64 * 1024)?;
    // SAFETY: the child only reads from the pipe and exits (no allocation, no locks).
    let pid = unsafe {
        libc::clone(
            wait_for_parent,
            stack.top(),
            libc::CLONE_NEWUSER | libc::SIGCHLD,
            r.as_raw_fd() as usize as *mut libc::c_void,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    let map = format!("0 {base} {size}\n");
    let result = std::fs::write(format!("/proc/{pid}/uid_map"), &map)
        .and_then(|()| std::fs::write(format!("/proc/{pid}/gid_map"), &map))
        .and_then(|()| std::fs::File::open(format!("/proc/{pid}/ns/user")).map(OwnedFd::from));
    // The child holds a copy of the write end too: end it rather than wait for EOF.
    crate::sys::kill(pid, libc::SIGKILL);
    drop(w);
    let _ = crate::sys::waitpid(pid, false);
    drop(stack);
    result
}

/// A detached bind of a host device node (`/dev/null` & co.): `nosuid,noexec`.
pub(crate) fn bind_device(path: &Path) -> io::Result<OwnedFd> {
    let (src, _) = open_source(path)?;
    let tree = clone_tree(&src, false)?;
    set_attrs(&tree, libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NOEXEC, false)?;
    Ok(tree)
}

/// mkdir `name` in the directory `dir` (EEXIST is fine), owned by `owner` if given.
pub(crate) fn mkdir_in(dir: &OwnedFd, name: &str, mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: c is NUL-terminated; dir is a directory fd.
    let r = unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    if let Some((uid, gid)) = owner {
        // SAFETY: c is NUL-terminated; no symlink is followed.
        cvt(unsafe { libc::fchownat(dir.as_raw_fd(), c.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) }
            as libc::c_long)?;
    }
    Ok(())
}

/// Open a directory (for [`mkdir_in`] and [`fd_path`]).
pub(crate) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cpath(path)?;
    // SAFETY: c is NUL-terminated.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    cvt_fd(fd as libc::c_long)
}

/// Statistics of the file system a (detached) mount fd is on: (used bytes, size bytes).
pub(crate) fn usage(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    // SAFETY: st is a valid out buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    cvt(unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } as libc::c_long)?;
    let bs = st.f_bsize as u64;
    Ok(((st.f_blocks - st.f_bfree) as u64 * bs, st.f_blocks as u64 * bs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn symlink_sources_are_refused() {
        let tmp = std::env::temp_dir().join(format!("flare-detached-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let link = tmp.join("hostroot");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/", &link).unwrap();
        let err = open_source(&link).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert_eq!(open_source(&tmp).unwrap().1, SourceKind::Dir);
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn overlay_on_detached_tmpfs() {
        if !is_root() {
            return;
        }
        let tmp = std::env::temp_dir().join(format!("flare-detached-ovl-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("lower")).unwrap();
        std::fs::write(tmp.join("lower/f"), b"lower").unwrap();
        let scratch = tmpfs(1 << 20, 0o755, 0).unwrap();
        mkdir_in(&scratch, "upper", 0o755, Some((1_000_000_000, 1_000_000_000))).unwrap();
        mkdir_in(&scratch, "work", 0o755, None).unwrap();
        let ovl = overlay(
            tmp.join("lower").to_str().unwrap(),
            &fd_path(&scratch, "upper"),
            &fd_path(&scratch, "work"),
            libc::MOUNT_ATTR_NOSUID,
        )
        .unwrap();
        let root = fd_path(&ovl, "");
        assert_eq!(std::fs::read(format!("{root}f")).unwrap(), b"lower");
        std::fs::write(format!("{root}g"), b"upper").unwrap();
        assert!(std::path::Path::new(&fd_path(&scratch, "upper/g")).exists());
        assert!(!tmp.join("lower/g").exists());
        let (used, size) = usage(&scratch).unwrap();
        assert!(used > 0 && size >= 1 << 20, "{used} {size}");
        // A 2 MiB write does not fit a 1 MiB tmpfs.
        let big = vec![0u8; 2 << 20];
        assert!(std::fs::write(format!("{root}big"), &big).is_err());
        drop(ovl);
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn idmapped_binds_show_host_root_as_the_mapped_root() {
        if !is_root() {
            return;
        }
        let ns = userns_fd(1_000_000_000, 65_536).unwrap();
        let (tree, _, idmapped) = bind_readonly_idmapped(Path::new("/usr"), &ns).unwrap();
        if !idmapped {
            eprintln!("skipping: /usr's file system cannot be idmapped here");
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(fd_path(&tree, "bin")).unwrap();
        assert_eq!(meta.uid(), 1_000_000_000, "host root's files show as the mapped root");
        let err = std::fs::write(fd_path(&tree, "flare-probe"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    }

    #[test]
    fn readonly_binds_are_readonly_below_too() {
        if !is_root() {
            return;
        }
        let (tree, kind) = bind(Path::new("/tmp"), true).unwrap();
        assert_eq!(kind, SourceKind::Dir);
        let p = fd_path(&tree, "flare-ro-probe");
        let err = std::fs::write(&p, b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    }
}

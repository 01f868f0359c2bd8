//! Mounting through `fuser` and unmounting without ever hanging the process.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use tracing::{debug, info, warn};

use crate::error::{ImageFsError, Result};
use crate::fs::{FuseAdapter, ImageFsOptions};

/// How long an unmount waits for the FUSE threads to finish before leaving them.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A mounted [`crate::ImageFs`]. [`MountHandle::unmount`] (or dropping the handle)
/// unmounts it: a plain `umount(2)`, or, if the mount is busy (a process still has a
/// file open, an overlay still uses it as a lower dir), a lazy detach plus an abort
/// of the FUSE connection through fusectl (`/sys/fs/fuse/connections`), so the request
/// threads end and nothing waits on them.
#[derive(Debug)]
pub struct MountHandle {
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    /// FUSE connection id (the mount's device minor), for fusectl.
    conn: Option<u32>,
}

pub(crate) fn mount_fs(fs: FuseAdapter, mountpoint: &Path, opts: &ImageFsOptions) -> Result<MountHandle> {
    let mountpoint = mountpoint
        .canonicalize()
        .map_err(|source| ImageFsError::Mount { mountpoint: mountpoint.to_path_buf(), source })?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(opts.fsname.clone()),
        MountOption::Subtype("flare-imagefs".to_owned()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoAtime,
        if opts.suid { MountOption::Suid } else { MountOption::NoSuid },
    ];
    config.acl = if opts.allow_other { SessionACL::All } else { SessionACL::Owner };
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = opts.threads > 1;
    let session = fuser::spawn_mount(fs, &mountpoint, &config)
        .map_err(|source| ImageFsError::Mount { mountpoint: mountpoint.clone(), source })?;
    let dev = std::fs::metadata(&mountpoint).ok().map(|md| md.dev());
    let conn = dev.map(|d| libc::minor(d));
    if let (Some(dev), Some(kb)) = (dev, opts.read_ahead_kb) {
        // The kernel's default readahead for a FUSE mount is 128 KiB, which caps read
        // requests at 128 KiB and serializes sequential reads; a larger window lets it
        // send up to 1 MiB requests, several in flight, to our request threads.
        let knob = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
        if let Err(e) = std::fs::write(&knob, kb.to_string()) {
            debug!(knob, error = %e, "could not raise the readahead window");
        }
    }
    info!(mountpoint = %mountpoint.display(), ?conn, "image fs mounted");
    Ok(MountHandle { mountpoint, session: Some(session), conn })
}

impl MountHandle {
    /// Where the file system is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmount (see the type's documentation) and wait, bounded, for the FUSE threads.
    pub fn unmount(mut self) -> Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else { return Ok(()) };
        let path =
            CString::new(self.mountpoint.as_os_str().as_bytes()).map_err(|e| ImageFsError::Unmount {
                mountpoint: self.mountpoint.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?;
        let mut result = Ok(());
        match umount2(&path, 0) {
            Ok(()) => debug!(mountpoint = %self.mountpoint.display(), "unmounted"),
            // Not mounted any more (someone unmounted it already).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => {
                warn!(mountpoint = %self.mountpoint.display(), error = %e, "umount failed; detaching lazily and aborting the connection");
                if let Err(e) = umount2(&path, libc::MNT_DETACH) {
                    if e.raw_os_error() != Some(libc::EINVAL) {
                        result =
                            Err(ImageFsError::Unmount { mountpoint: self.mountpoint.clone(), source: e });
                    }
                }
                self.abort_connection();
            }
        }
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while !session.guard.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if session.guard.is_finished() {
            if let Err(e) = session.join() {
                debug!(error = %e, "fuse session ended with an error");
            }
        } else {
            warn!(mountpoint = %self.mountpoint.display(), "fuse threads still running after unmount; leaving them");
            self.abort_connection();
            // Dropping the session detaches its thread (fuser's own unmount sees the
            // mount gone and does nothing).
            drop(session);
        }
        result
    }

    /// Abort the FUSE connection: pending and future requests fail with ENOTCONN and
    /// the request threads see the device close.
    fn abort_connection(&self) {
        let Some(conn) = self.conn else { return };
        let path = format!("/sys/fs/fuse/connections/{conn}/abort");
        match std::fs::write(&path, b"1") {
            Ok(()) => debug!(conn, "fuse connection aborted"),
            Err(e) => debug!(conn, error = %e, "could not abort the fuse connection (is fusectl mounted?)"),
        }
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            warn!(error = %e, "unmount on drop failed");
        }
    }
}

fn umount2(path: &CString, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `path` is a valid NUL-terminated C string that outlives the call;
    // umount2 does not keep the pointer.
    let rc = unsafe { libc::umount2(path.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Unmount whatever is mounted at `mountpoint` (lazily if busy), e.g. a mount a
/// crashed worker left behind ("Transport endpoint is not connected"). `Ok(false)` if
/// nothing was mounted there.
pub fn force_unmount(mountpoint: &Path) -> Result<bool> {
    let path = CString::new(mountpoint.as_os_str().as_bytes()).map_err(|e| ImageFsError::Unmount {
        mountpoint: mountpoint.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    match umount2(&path, libc::MNT_DETACH) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(source) => Err(ImageFsError::Unmount { mountpoint: mountpoint.to_path_buf(), source }),
    }
}

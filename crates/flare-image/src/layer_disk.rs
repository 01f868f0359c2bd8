//! The disk quota of a build step: its writable layer (the overlay's upper and work
//! dirs) lives on a file system of its own, as big as the quota. A sparse file is
//! formatted as ext4 (no blocks reserved for root, a small journal, lazy inode tables),
//! attached to a loop device (direct I/O, so its data is not cached twice; detached
//! by the kernel on unmount) and mounted where the runtime puts the upper dir. Writing
//! past the quota is `ENOSPC` for the step, whoever it runs as. The file system's own
//! metadata counts against the quota (about 2%). Only what is written takes host disk.
//!
//! Whether a step ran out ([`LayerDisk::usage`]): the file system is out of space or
//! inodes now; or ext4 counted an allocation that failed after its retries
//! (`/sys/fs/ext4/<dev>/sra_exceeded_retry_limit`; not every path counts); or a
//! sampler, which reads the file system's free space every 10 ms while it is mounted,
//! saw it within 1% (at least 4 MiB, 16 inodes) of the limit — so a step that filled
//! the layer and then removed what it wrote (pip rolling back an install) is still
//! known to have reached it.
//!
//! Costs per step: one `mke2fs` run (a few ms), a loop device attach and a mount,
//! then an unmount and a file removal: about 11 ms in all on an idle machine
//! (`layer_disk_cost` below; `docs/ARCHITECTURE.md` has end-to-end numbers).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::ImageError;

/// The smallest quota a layer file system can have (ext4 with a journal needs room).
pub const MIN_QUOTA: u64 = 16 << 20;

/// `ioctl` numbers and flags of `linux/loop.h`.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// How close a layer disk came to its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// Never near it.
    Within,
    /// Seen within the margin of the limit (not necessarily over it).
    NearLimit,
    /// Out of space or inodes now, or an allocation failed for want of them.
    Exhausted,
}

/// How often the sampler reads the free space.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// A mounted, size-limited file system for one build step's writable layer. Dropping
/// it unmounts it (the loop device goes with it) and removes its backing file.
#[derive(Debug)]
pub struct LayerDisk {
    mountpoint: PathBuf,
    image: PathBuf,
    limit: u64,
    /// The loop device's name (`loop7`), for its ext4 counters in sysfs.
    dev: String,
    mounted: bool,
    near_limit: Arc<AtomicBool>,
    /// Dropping it stops the sampler.
    stop: Option<mpsc::Sender<()>>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl LayerDisk {
    /// Create `image` (a sparse file of `limit` bytes), make it an ext4 file system and
    /// mount it at `mountpoint` (an existing, empty directory).
    pub fn create(image: &Path, mountpoint: &Path, limit: u64) -> Result<LayerDisk, ImageError> {
        if limit < MIN_QUOTA {
            return Err(ImageError::Invalid(format!(
                "a build step disk quota must be at least {}",
                human_bytes(MIN_QUOTA)
            )));
        }
        let t0 = Instant::now();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(image)
            .map_err(|e| ImageError::io(format!("creating {}", image.display()), e))?;
        file.set_len(limit).map_err(|e| ImageError::io(format!("sizing {}", image.display()), e))?;
        let mut disk = LayerDisk {
            mountpoint: mountpoint.to_path_buf(),
            image: image.to_path_buf(),
            limit,
            dev: String::new(),
            mounted: false,
            near_limit: Arc::new(AtomicBool::new(false)),
            stop: None,
            sampler: None,
        };
        mkfs(image, limit)?;
        let t_mkfs = t0.elapsed();
        let (n, loop_dev) = attach_loop(&file)?;
        disk.dev = format!("loop{n}");
        drop(file);
        let dev_path = PathBuf::from(format!("/dev/{}", disk.dev));
        mount_ext4(&dev_path, mountpoint).map_err(|e| {
            ImageError::io(format!("mounting the build step's layer disk at {}", mountpoint.display()), e)
        })?;
        disk.mounted = true;
        // The mount holds the device now; with autoclear it goes away on unmount.
        drop(loop_dev);
        disk.start_sampler()?;
        debug!(
            dev = %disk.dev,
            limit,
            mkfs_us = t_mkfs.as_micros() as u64,
            total_us = t0.elapsed().as_micros() as u64,
            "layer disk mounted"
        );
        Ok(disk)
    }

    /// The quota in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// How close the file system came to its limit since it was mounted.
    pub fn usage(&self) -> Usage {
        let counter = format!("/sys/fs/ext4/{}/sra_exceeded_retry_limit", self.dev);
        let failed_allocs =
            std::fs::read_to_string(&counter).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
        let full_now = match statfs(&self.mountpoint) {
            Ok(st) => st.f_bavail == 0 || st.f_ffree == 0,
            Err(e) => {
                warn!(mountpoint = %self.mountpoint.display(), error = %e, "statfs of a layer disk failed");
                false
            }
        };
        if failed_allocs > 0 || full_now {
            Usage::Exhausted
        } else if self.near_limit.load(Ordering::Relaxed) {
            Usage::NearLimit
        } else {
            Usage::Within
        }
    }

    /// Watch the free space every [`SAMPLE_EVERY`] until dropped.
    fn start_sampler(&mut self) -> Result<(), ImageError> {
        let (tx, rx) = mpsc::channel::<()>();
        let path = cpath(&self.mountpoint).map_err(|e| ImageError::io("layer disk path", e))?;
        let near = self.near_limit.clone();
        let margin_bytes = (self.limit / 100).max(4 << 20);
        let handle = std::thread::Builder::new()
            .name("layer-disk-watch".into())
            .spawn(move || {
                // No allocation per sample (containers are cloned from this process).
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(SAMPLE_EVERY) {
                    let Ok(st) = statvfs_c(&path) else { continue };
                    let margin_inodes = (st.f_files / 100).max(16);
                    if st.f_bavail * st.f_frsize < margin_bytes || st.f_favail < margin_inodes {
                        near.store(true, Ordering::Relaxed);
                    }
                }
            })
            .map_err(|e| ImageError::io("starting the layer disk sampler", e))?;
        self.stop = Some(tx);
        self.sampler = Some(handle);
        Ok(())
    }

    /// Bytes in use now (data and the file system's metadata).
    pub fn used(&self) -> Option<u64> {
        let st = statfs(&self.mountpoint).ok()?;
        Some(st.f_blocks.saturating_sub(st.f_bfree) * st.f_frsize)
    }
}

impl Drop for LayerDisk {
    fn drop(&mut self) {
        let t0 = Instant::now();
        drop(self.stop.take());
        if let Some(h) = self.sampler.take() {
            let _ = h.join();
        }
        if self.mounted {
            if let Err(e) = unmount(&self.mountpoint, 0) {
                warn!(mountpoint = %self.mountpoint.display(), error = %e, "layer disk busy; detaching it");
                if let Err(e) = unmount(&self.mountpoint, libc::MNT_DETACH) {
                    warn!(mountpoint = %self.mountpoint.display(), error = %e, "could not unmount a layer disk");
                }
            }
        }
        if let Err(e) = std::fs::remove_file(&self.image) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!(image = %self.image.display(), error = %e, "could not remove a layer disk");
            }
        }
        debug!(dev = %self.dev, us = t0.elapsed().as_micros() as u64, "layer disk removed");
    }
}

/// Whether the files under `dir` add up, by apparent size (`st_size`: a sparse file
/// counts in full although it takes no blocks), to more than `limit` bytes: the size of
/// the layer the builder would read, hash and store. Walked with `lstat` (symlinks are
/// counted as links, never followed), a file with several hard links once; the walk stops
/// as soon as the total passes `limit`. Returns the total seen so far when it did.
pub fn apparent_size_over(dir: &Path, limit: u64) -> io::Result<Option<u64>> {
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;
    let mut total: u64 = 0;
    let mut linked: HashSet<(u64, u64)> = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = std::fs::symlink_metadata(entry.path())?;
            if meta.is_dir() {
                stack.push(entry.path());
                continue;
            }
            if meta.is_file() && meta.nlink() > 1 && !linked.insert((meta.dev(), meta.ino())) {
                continue;
            }
            total = total.saturating_add(meta.len());
            if total > limit {
                return Ok(Some(total));
            }
        }
    }
    Ok(None)
}

/// `1 GiB`, `64 MiB`, `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if n >= size {
            let v = n as f64 / size as f64;
            return if (v - v.round()).abs() < 0.005 {
                format!("{} {unit}", v.round() as u64)
            } else {
                format!("{v:.2} {unit}").replace(".00 ", " ")
            };
        }
    }
    format!("{n} bytes")
}

/// The `mke2fs` binary (often outside the daemon's PATH, in /sbin or /usr/sbin).
fn mke2fs_path() -> PathBuf {
    ["/usr/sbin/mke2fs", "/sbin/mke2fs", "/usr/bin/mke2fs"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("mke2fs"))
}

/// Format `image` as ext4: no root reserve (a step's root must not get past the quota),
/// a journal of 1/256 of the size (4..64 MiB: ext4 only counts failed allocations
/// with one), inode tables and journal left unzeroed (the file stays sparse).
fn mkfs(image: &Path, limit: u64) -> Result<(), ImageError> {
    let journal_mib = ((limit >> 20) / 256).clamp(4, 64);
    let out = Command::new(mke2fs_path())
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", "flare-layer"])
        .arg("-J")
        .arg(format!("size={journal_mib}"))
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg(image)
        .output()
        .map_err(|e| {
            ImageError::Unavailable(format!(
                "the build step disk quota needs mke2fs (e2fsprogs) on the server: {e} \
                 (FLARE_BUILD_DISK_QUOTA_GB=0 builds without a quota)"
            ))
        })?;
    if !out.status.success() {
        return Err(ImageError::Unavailable(format!(
            "mke2fs failed on {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Attach `backing` to a free loop device (direct I/O where the backing file system
/// allows it; detached automatically when its last user goes). The device number and
/// an open handle to the device.
fn attach_loop(backing: &File) -> Result<(u32, File), ImageError> {
    let unavailable = |e: io::Error| {
        ImageError::Unavailable(format!(
            "the build step disk quota needs loop devices (/dev/loop-control): {e} \
             (FLARE_BUILD_DISK_QUOTA_GB=0 builds without a quota)"
        ))
    };
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .map_err(unavailable)?;
    let mut flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO;
    // Another attach may take the free device between the two calls: try again.
    for _ in 0..16 {
        let n = loop_get_free(&ctl).map_err(unavailable)?;
        let path = format!("/dev/loop{n}");
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(unavailable)?;
        match loop_configure(&dev, backing, flags) {
            Ok(()) => return Ok((n, dev)),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && flags & LO_FLAGS_DIRECT_IO != 0 => {
                debug!(error = %e, "loop device refused direct I/O; using buffered I/O");
                flags &= !LO_FLAGS_DIRECT_IO;
                continue;
            }
            Err(e) => return Err(unavailable(e)),
        }
    }
    Err(unavailable(io::Error::new(io::ErrorKind::ResourceBusy, "no free loop device")))
}

fn loop_get_free(ctl: &File) -> io::Result<u32> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument; `ctl` is an open /dev/loop-control.
    let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as u32)
    }
}

fn loop_configure(dev: &File, backing: &File, flags: u32) -> io::Result<()> {
    // SAFETY: an all-zero loop_config is valid (plain integers and byte arrays).
    let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
    cfg.fd = backing.as_raw_fd() as u32;
    cfg.info.lo_flags = flags;
    // SAFETY: `cfg` is a properly laid out `struct loop_config` that lives across the
    // call; the kernel only reads it. `dev` is an open loop device.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &cfg as *const LoopConfig) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Mount the ext4 file system on `dev` at `target`: no setuid, devices or atime;
/// no background inode table zeroing (it would fill the sparse file) and no write
/// barriers (a scratch file system: a crash discards it anyway).
fn mount_ext4(dev: &Path, target: &Path) -> io::Result<()> {
    let (src, dst) = (cpath(dev)?, cpath(target)?);
    let data = c"noinit_itable,nobarrier";
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc =
        unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), c"ext4".as_ptr(), flags, data.as_ptr().cast()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn unmount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let t = cpath(target)?;
    // SAFETY: `t` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(t.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn statfs(path: &Path) -> io::Result<libc::statvfs> {
    statvfs_c(&cpath(path)?)
}

fn statvfs_c(p: &std::ffi::CStr) -> io::Result<libc::statvfs> {
    // SAFETY: an all-zero statvfs is a valid value for the kernel to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `p` is a valid C string and `st` a writable statvfs, both live across the call.
    if unsafe { libc::statvfs(p.as_ptr(), &mut st) } == 0 {
        Ok(st)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Unmount (lazily) everything mounted at or below `dir`, deepest first: what builds
/// that were running when the server stopped left there (layer disks, image mounts).
/// The number unmounted.
pub fn unmount_below(dir: &Path) -> usize {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return 0 };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    let mut n = 0;
    for p in points {
        match unmount(&p, libc::MNT_DETACH) {
            Ok(()) => n += 1,
            Err(e) => warn!(mountpoint = %p.display(), error = %e, "could not unmount a stale build mount"),
        }
    }
    n
}

/// Mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\' && i + 3 < b.len())
            .then(|| &b[i + 1..i + 4])
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        if let Some(c) = octal {
            out.push(c);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(10 << 30), "10 GiB");
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(human_bytes(3 << 29), "1.50 GiB");
        assert_eq!(human_bytes(100), "100 bytes");
    }

    #[test]
    fn apparent_sizes_count_sparse_files_in_full() {
        let d = tempfile::tempdir().unwrap();
        let limit = 64 << 20;
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/small"), b"0123456789").unwrap();
        assert_eq!(apparent_size_over(d.path(), limit).unwrap(), None);
        // A sparse file of twice the limit takes no blocks but counts in full.
        let f = File::create(d.path().join("a/b/sparse")).unwrap();
        f.set_len(2 * limit).unwrap();
        let over = apparent_size_over(d.path(), limit).unwrap().expect("over the limit");
        assert!(over > limit, "{over}");
        // Many files below the limit each, over it together; hard links count once.
        std::fs::remove_file(d.path().join("a/b/sparse")).unwrap();
        for i in 0..3 {
            File::create(d.path().join(format!("part{i}"))).unwrap().set_len(limit / 4).unwrap();
        }
        assert_eq!(apparent_size_over(d.path(), limit).unwrap(), None);
        for i in 0..4 {
            std::fs::hard_link(d.path().join("part0"), d.path().join(format!("link{i}"))).unwrap();
        }
        assert_eq!(apparent_size_over(d.path(), limit).unwrap(), None, "hard links count once");
        File::create(d.path().join("part3")).unwrap().set_len(limit / 4 + 1).unwrap();
        assert!(apparent_size_over(d.path(), limit).unwrap().is_some());
        // Symlinks are not followed.
        let big = tempfile::tempdir().unwrap();
        File::create(big.path().join("huge")).unwrap().set_len(4 * limit).unwrap();
        std::fs::remove_file(d.path().join("part3")).unwrap();
        std::os::unix::fs::symlink(big.path().join("huge"), d.path().join("to-huge")).unwrap();
        std::os::unix::fs::symlink(big.path(), d.path().join("to-dir")).unwrap();
        assert_eq!(apparent_size_over(d.path(), limit).unwrap(), None);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b/c\134d"), "/a b/c\\d");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }

    fn can_mount() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root || !Path::new("/dev/loop-control").exists() {
            eprintln!("SKIP: needs root and /dev/loop-control");
            return false;
        }
        true
    }

    fn mounted(p: &Path) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines().any(|l| l.split(' ').nth(4).map(unescape_mountinfo).as_deref() == p.to_str())
    }

    #[test]
    fn writes_past_the_quota_fail_and_are_counted() {
        if !can_mount() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("layer");
        std::fs::create_dir(&mnt).unwrap();
        let img = tmp.path().join("layer.img");
        let t0 = Instant::now();
        let disk = LayerDisk::create(&img, &mnt, 64 << 20).unwrap();
        let setup = t0.elapsed();
        assert!(mounted(&mnt));
        assert_eq!(disk.usage(), Usage::Within);
        // Sparse: the host holds little of the 64 MiB.
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&img).unwrap());
        assert!(blocks * 512 < 8 << 20, "{blocks} blocks");
        // Within the quota: fine, and not exhausted.
        std::fs::write(mnt.join("small"), vec![7u8; 8 << 20]).unwrap();
        std::thread::sleep(SAMPLE_EVERY * 3);
        assert_eq!(disk.usage(), Usage::Within);
        // Past it: ENOSPC, for root too; the disk is full...
        let err = std::fs::write(mnt.join("big"), vec![1u8; 80 << 20]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        assert_eq!(disk.usage(), Usage::Exhausted);
        // ...and known to have been near its limit after the writer removed what it wrote.
        std::thread::sleep(SAMPLE_EVERY * 3);
        std::fs::remove_file(mnt.join("big")).unwrap();
        assert_ne!(disk.usage(), Usage::Within);
        assert!(disk.used().unwrap() < 16 << 20);
        let t1 = Instant::now();
        drop(disk);
        let teardown = t1.elapsed();
        assert!(!mounted(&mnt));
        assert!(!img.exists());
        eprintln!("layer disk: setup {setup:?}, teardown {teardown:?}");
    }

    #[test]
    fn running_out_of_inodes_is_exhaustion_too() {
        if !can_mount() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("layer");
        std::fs::create_dir(&mnt).unwrap();
        let disk = LayerDisk::create(&tmp.path().join("layer.img"), &mnt, 16 << 20).unwrap();
        let mut n = 0;
        let err = loop {
            match std::fs::write(mnt.join(format!("f{n}")), b"") {
                Ok(()) => n += 1,
                Err(e) => break e,
            }
            assert!(n < 1_000_000, "no inode limit");
        };
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(disk.usage(), Usage::Exhausted);
    }

    #[test]
    fn fallocate_past_the_quota_is_exhaustion() {
        if !can_mount() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("layer");
        std::fs::create_dir(&mnt).unwrap();
        let disk = LayerDisk::create(&tmp.path().join("layer.img"), &mnt, 64 << 20).unwrap();
        let f = std::fs::File::create(mnt.join("big")).unwrap();
        // SAFETY: `f` is an open file; fallocate takes no pointers.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 100 << 20) };
        assert_eq!(rc, -1);
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(disk.usage(), Usage::Exhausted);
    }

    #[test]
    fn stale_mounts_below_a_dir_are_unmounted() {
        if !can_mount() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("a b").join("layer");
        std::fs::create_dir_all(&mnt).unwrap();
        let disk = LayerDisk::create(&tmp.path().join("layer.img"), &mnt, 16 << 20).unwrap();
        std::mem::forget(disk);
        assert!(mounted(&mnt));
        assert_eq!(unmount_below(tmp.path()), 1);
        assert!(!mounted(&mnt));
    }

    /// The cost per build step at the default quota: `cargo test --release -p
    /// flare-image layer_disk_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn layer_disk_cost() {
        if !can_mount() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (mut setup, mut teardown) = (Vec::new(), Vec::new());
        for i in 0..20 {
            let mnt = tmp.path().join(format!("layer{i}"));
            std::fs::create_dir(&mnt).unwrap();
            let t0 = Instant::now();
            let disk = LayerDisk::create(&tmp.path().join(format!("layer{i}.img")), &mnt, 10 << 30).unwrap();
            setup.push(t0.elapsed());
            std::fs::write(mnt.join("f"), b"x").unwrap();
            let t1 = Instant::now();
            drop(disk);
            teardown.push(t1.elapsed());
        }
        setup.sort();
        teardown.sort();
        eprintln!(
            "10 GiB layer disk: setup median {:?} (max {:?}), teardown median {:?} (max {:?})",
            setup[10], setup[19], teardown[10], teardown[19]
        );
    }

    #[test]
    fn too_small_a_quota_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let err = LayerDisk::create(&tmp.path().join("x.img"), tmp.path(), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("at least 16 MiB"), "{err}");
    }
}

//! Writing a [`Manifest`] out as a real directory tree.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{fchown, lchown, symlink, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::debug;

use crate::chunk::write_file_to;
use crate::error::{io_ctx, CasError, Result};
use crate::manifest::{Entry, EntryKind, Manifest};
use crate::store::BlobStore;

/// Write `manifest` below `dest` (created if missing): directories, files (content
/// verified chunk by chunk), symlinks, modes and mtimes, and owners when running as root.
///
/// Never writes outside `dest`: the manifest must [validate](Manifest::validate) (so no
/// entry sits below a symlink or a file, no `..`), entries are created parents first,
/// every parent is checked to be a real directory (not a symlink) before use, files are
/// opened with `O_NOFOLLOW | O_CREAT | O_EXCL`, and whatever already exists at an
/// entry's path (say, a symlink planted there) is removed, never followed. Symlink
/// mtimes and extended attributes are not set. Concurrent modification of `dest` by
/// someone else while this runs is out of scope.
pub fn materialize(store: &dyn BlobStore, manifest: &Manifest, dest: &Path) -> Result<()> {
    manifest.validate()?;
    fs::create_dir_all(dest).map_err(io_ctx(format!("creating {}", dest.display())))?;
    let as_root = running_as_root();
    for (rel, entry) in &manifest.entries {
        let path = dest.join(rel);
        check_parent_is_dir(dest, &path)?;
        clear_existing(&path, entry)?;
        match &entry.kind {
            EntryKind::Dir => create_dir(&path)?,
            EntryKind::File(_) => write_file(store, &path, entry, as_root)?,
            EntryKind::Symlink { target } => {
                symlink(target, &path).map_err(io_ctx(format!("symlink {}", path.display())))?;
                if as_root {
                    lchown(&path, Some(entry.uid), Some(entry.gid))
                        .map_err(io_ctx(format!("lchown {}", path.display())))?;
                }
            }
        }
    }
    // Directories last, deepest first: their modes may forbid writing into them and
    // creating children changes their mtimes.
    for (rel, entry) in manifest.entries.iter().rev().filter(|(_, e)| e.is_dir()) {
        finish_dir(&dest.join(rel), entry, as_root)?;
    }
    debug!(dest = %dest.display(), entries = manifest.entries.len(), "materialized");
    Ok(())
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn check_parent_is_dir(dest: &Path, path: &Path) -> Result<()> {
    let parent = path.parent().unwrap_or(dest);
    let meta = fs::symlink_metadata(parent).map_err(io_ctx(format!("stat {}", parent.display())))?;
    if !meta.file_type().is_dir() {
        return Err(CasError::Escape {
            path: path.to_owned(),
            reason: format!("parent {} is not a real directory", parent.display()),
        });
    }
    Ok(())
}

/// Remove what is at `path` unless it is a real directory and `entry` is one too.
fn clear_existing(path: &Path, entry: &Entry) -> Result<()> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    let ft = meta.file_type();
    if ft.is_dir() && entry.is_dir() {
        return Ok(());
    }
    let removed = if ft.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    removed.map_err(io_ctx(format!("removing existing {}", path.display())))
}

fn create_dir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(CasError::Io { context: format!("mkdir {}", path.display()), source: e }),
    }
    // Writable by us until `finish_dir` applies the real mode.
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .map_err(io_ctx(format!("chmod {}", path.display())))
}

fn write_file(store: &dyn BlobStore, path: &Path, entry: &Entry, as_root: bool) -> Result<()> {
    let EntryKind::File(content) = &entry.kind else { unreachable!("write_file on a non-file") };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_ctx(format!("creating {}", path.display())))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    write_file_to(store, content, &mut out)?;
    out.flush().map_err(io_ctx(format!("writing {}", path.display())))?;
    let file = out.into_inner().map_err(|e| CasError::Io {
        context: format!("writing {}", path.display()),
        source: e.into_error(),
    })?;
    set_metadata(&file, path, entry, as_root)
}

fn finish_dir(path: &Path, entry: &Entry, as_root: bool) -> Result<()> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(path)
        .map_err(io_ctx(format!("opening {}", path.display())))?;
    set_metadata(&dir, path, entry, as_root)
}

/// Owner (first: chown clears setuid bits), then mode, then mtime, all through the fd.
fn set_metadata(file: &File, path: &Path, entry: &Entry, as_root: bool) -> Result<()> {
    if as_root {
        fchown(file, Some(entry.uid), Some(entry.gid))
            .map_err(io_ctx(format!("chown {}", path.display())))?;
    }
    file.set_permissions(fs::Permissions::from_mode(entry.mode & 0o7777))
        .map_err(io_ctx(format!("chmod {}", path.display())))?;
    file.set_modified(to_system_time(entry.mtime, entry.mtime_nsec))
        .map_err(io_ctx(format!("setting mtime of {}", path.display())))
}

fn to_system_time(secs: i64, nsec: u32) -> SystemTime {
    let nsec = Duration::from_nanos(u64::from(nsec.min(999_999_999)));
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nsec
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nsec
    }
}

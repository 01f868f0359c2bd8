//! An overlayfs upper directory as a layer manifest: whiteouts (0/0 character devices)
//! become `.wh.NAME` entries and opaque directories get a `.wh..wh..opq` entry, as in
//! OCI layers, so [`flare_cas::Manifest::apply_layer`] merges it onto the parent tree.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use flare_cas::{
    entry_from, store_file, BlobStore, Entry, EntryKind, FileContent, Manifest, OPAQUE_MARKER,
    WHITEOUT_PREFIX,
};

use crate::ImageError;

/// Paths the builder binds into build containers; never part of a layer.
const BUILD_ONLY: [&str; 2] = ["etc/resolv.conf", "run/flare-build"];

fn opaque(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    let mut buf = [0u8; 8];
    for name in [c"trusted.overlay.opaque", c"user.overlay.opaque"] {
        // SAFETY: both pointers are valid NUL-terminated strings / a buffer of the given
        // length that lives across the call.
        let n = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n == 1 && buf[0] == b'y' {
            return true;
        }
    }
    false
}

/// Snapshot `upper` into `store` as a layer manifest.
pub fn snapshot_upper(store: &dyn BlobStore, upper: &Path) -> Result<Manifest, ImageError> {
    let mut m = Manifest::new();
    let mut pending = vec![(upper.to_path_buf(), String::new())];
    while let Some((dir, rel_dir)) = pending.pop() {
        if !rel_dir.is_empty() && opaque(&dir) {
            m.insert(&format!("{rel_dir}/{OPAQUE_MARKER}"), Entry::file(FileContent::default(), 0o644))?;
        }
        let rd =
            std::fs::read_dir(&dir).map_err(|e| ImageError::io(format!("listing {}", dir.display()), e))?;
        for de in rd {
            let de = de.map_err(|e| ImageError::io(format!("listing {}", dir.display()), e))?;
            let name =
                de.file_name().to_str().map(str::to_owned).ok_or_else(|| {
                    ImageError::Invalid(format!("non-UTF-8 file name in {}", dir.display()))
                })?;
            let rel = if rel_dir.is_empty() { name.clone() } else { format!("{rel_dir}/{name}") };
            if BUILD_ONLY.contains(&rel.as_str()) {
                continue;
            }
            let path = de.path();
            let meta = std::fs::symlink_metadata(&path)
                .map_err(|e| ImageError::io(format!("stat {}", path.display()), e))?;
            let ft = meta.file_type();
            let kind = if ft.is_char_device() && meta.rdev() == 0 {
                let wh = if rel_dir.is_empty() {
                    format!("{WHITEOUT_PREFIX}{name}")
                } else {
                    format!("{rel_dir}/{WHITEOUT_PREFIX}{name}")
                };
                m.insert(&wh, Entry::file(FileContent::default(), 0o644))?;
                continue;
            } else if ft.is_dir() {
                pending.push((path.clone(), rel.clone()));
                EntryKind::Dir
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&path)
                    .map_err(|e| ImageError::io(format!("readlink {}", path.display()), e))?;
                EntryKind::Symlink {
                    target: t
                        .to_str()
                        .ok_or_else(|| ImageError::Invalid(format!("non-UTF-8 link {}", path.display())))?
                        .to_owned(),
                }
            } else if ft.is_file() {
                EntryKind::File(store_file(store, &path)?)
            } else {
                tracing::warn!(path = %path.display(), "special file skipped in a layer");
                continue;
            };
            m.entries.insert(rel, entry_from(kind, &meta));
        }
    }
    Ok(m)
}

//! An overlayfs upper directory as a layer manifest: whiteouts (0/0 character devices)
//! become `.wh.NAME` entries and opaque directories get a `.wh..wh..opq` entry, as in
//! OCI layers, so [`flare_cas::Manifest::apply_layer`] merges it onto the parent tree.
//! Owners are mapped back from host ids to the container's ([`Owners`]).

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use flare_cas::{
    entry_from, store_file, BlobStore, Entry, EntryKind, FileContent, Manifest, OPAQUE_MARKER,
    WHITEOUT_PREFIX,
};

use flare_imagefs::{IdShift, OVERFLOW_ID};

use crate::ImageError;

/// How the owners of an upper dir's files (host ids) become the layer's (the ids the
/// step's processes saw).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Owners {
    /// The id range of the user namespace the parent image was shifted into (its files
    /// appear owned by `host_base + n`; copies of them in the upper dir keep that).
    pub ids: Option<IdShift>,
    /// Whether the step's processes ran in that user namespace. If so, they can only
    /// create files owned by ids in the range; an owner outside it is one they saw as
    /// the overflow id (a copied-up parent file whose owner is past the range, a
    /// mountpoint the runtime made as host root) and is recorded as such: never as
    /// root, which would hand root a file the step did not own, and not as an error,
    /// since a step can cause it legitimately (renaming such a file). If not (no user
    /// namespace: the step ran as host root), owners outside the range are kept.
    pub in_userns: bool,
}

impl Owners {
    /// The layer's owner for host id `id`.
    pub fn layer_id(&self, id: u32) -> u32 {
        match self.ids.and_then(|s| s.to_container(id)) {
            Some(n) => n,
            None if self.ids.is_some() && self.in_userns => OVERFLOW_ID,
            None => id,
        }
    }
}

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

/// Snapshot `upper` into `store` as a layer manifest, owners mapped by `owners`.
pub fn snapshot_upper(store: &dyn BlobStore, upper: &Path, owners: Owners) -> Result<Manifest, ImageError> {
    let mut m = Manifest::new();
    let mut unmapped = 0u64;
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
            let mut entry = entry_from(kind, &meta);
            let (uid, gid) = (owners.layer_id(entry.uid), owners.layer_id(entry.gid));
            if (uid == OVERFLOW_ID && entry.uid != uid) || (gid == OVERFLOW_ID && entry.gid != gid) {
                unmapped += 1;
                tracing::debug!(
                    path = rel,
                    uid = entry.uid,
                    gid = entry.gid,
                    "owner outside the user namespace's range: recorded as the overflow id"
                );
            }
            (entry.uid, entry.gid) = (uid, gid);
            m.entries.insert(rel, entry);
        }
    }
    if unmapped > 0 {
        tracing::warn!(entries = unmapped, "layer entries owned outside the user namespace's range were recorded as owned by the overflow id (65534)");
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: IdShift = IdShift { host_base: 1_000_000_000, size: 65_536 };

    #[test]
    fn owners_in_a_user_namespace_are_unshifted() {
        let o = Owners { ids: Some(NS), in_userns: true };
        assert_eq!(o.layer_id(1_000_000_000), 0);
        assert_eq!(o.layer_id(1_000_001_000), 1000);
        assert_eq!(o.layer_id(1_000_065_535), 65_535);
        // What the step could only have seen as the overflow id.
        for host in [0, 1000, 65_534, 999_999_999, 1_000_065_536] {
            assert_eq!(o.layer_id(host), OVERFLOW_ID, "{host}");
        }
    }

    #[test]
    fn without_a_user_namespace_only_shifted_copies_are_unshifted() {
        // The parent was shifted but the step ran as host root: its own files keep
        // their owners; copies of parent files come back to the parent's owners.
        let o = Owners { ids: Some(NS), in_userns: false };
        assert_eq!(o.layer_id(0), 0);
        assert_eq!(o.layer_id(1000), 1000);
        assert_eq!(o.layer_id(1_000_000_033), 33);
        let none = Owners::default();
        for id in [0, 1000, 1_000_000_000] {
            assert_eq!(none.layer_id(id), id);
        }
    }

    #[test]
    fn snapshot_maps_owners_back() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: chown needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let store = flare_cas::LocalStore::open(&tmp.path().join("store")).unwrap();
        let up = tmp.path().join("upper");
        std::fs::create_dir_all(up.join("etc")).unwrap();
        std::fs::write(up.join("etc/root-file"), b"r").unwrap();
        std::fs::write(up.join("user-file"), b"u").unwrap();
        std::fs::write(up.join("stray"), b"s").unwrap();
        std::os::unix::fs::symlink("user-file", up.join("link")).unwrap();
        let chown = |p: &str, id: u32| std::os::unix::fs::lchown(up.join(p), Some(id), Some(id)).unwrap();
        chown("etc", NS.host_base);
        chown("etc/root-file", NS.host_base);
        chown("user-file", NS.host_base + 1000);
        chown("link", NS.host_base + 1000);
        chown("stray", 4242);
        let m = snapshot_upper(&store, &up, Owners { ids: Some(NS), in_userns: true }).unwrap();
        let owner = |p: &str| {
            let e = m.get(p).unwrap();
            (e.uid, e.gid)
        };
        assert_eq!(owner("etc"), (0, 0));
        assert_eq!(owner("etc/root-file"), (0, 0));
        assert_eq!(owner("user-file"), (1000, 1000));
        assert_eq!(owner("link"), (1000, 1000));
        assert_eq!(owner("stray"), (OVERFLOW_ID, OVERFLOW_ID));
        // No shift: as found.
        let m = snapshot_upper(&store, &up, Owners::default()).unwrap();
        assert_eq!(m.get("user-file").unwrap().uid, NS.host_base + 1000);
    }
}

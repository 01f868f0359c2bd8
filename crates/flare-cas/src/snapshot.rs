//! Capturing a directory tree into the store as a [`Manifest`].

use std::collections::BTreeMap;
use std::fs::{self, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tracing::{debug, warn};

use crate::chunk::{store_file, FileContent};
use crate::error::{io_ctx, CasError, Result};
use crate::manifest::{Entry, EntryKind, Manifest};
use crate::store::BlobStore;

/// What a snapshot did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SnapshotStats {
    /// Files read, hashed and stored (new or changed).
    pub files_hashed: u64,
    /// Files taken from the previous manifest unread (same size, mtime and mode).
    pub files_reused: u64,
    /// Bytes read and hashed.
    pub bytes_hashed: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Devices, fifos and sockets left out.
    pub skipped_special: u64,
}

/// Snapshot `root` (see [`snapshot_dir_with_stats`]).
pub fn snapshot_dir(store: &dyn BlobStore, root: &Path, previous: Option<&Manifest>) -> Result<Manifest> {
    Ok(snapshot_dir_with_stats(store, root, previous)?.0)
}

/// Walk `root` without following symlinks and record every directory, regular file and
/// symlink (its target verbatim, wherever it points) with mode, owner and mtime; store
/// file contents (chunked, existing blobs are only touched). Devices, fifos and sockets
/// are skipped with a warning; hard links become independent files (their content is
/// stored once anyway). Extended attributes are not read.
///
/// With `previous`, a file whose path, size, mtime (to the nanosecond) and mode match
/// the previous entry is not read again: its chunks are reused after a
/// [`BlobStore::touch`] confirms they are still stored (and protects them from GC).
///
/// `root` itself is followed if it is a symlink; nothing below it is.
pub fn snapshot_dir_with_stats(
    store: &dyn BlobStore,
    root: &Path,
    previous: Option<&Manifest>,
) -> Result<(Manifest, SnapshotStats)> {
    let root_meta = fs::metadata(root).map_err(io_ctx(format!("stat {}", root.display())))?;
    if !root_meta.is_dir() {
        return Err(CasError::InvalidManifest(format!("{} is not a directory", root.display())));
    }
    let mut manifest = Manifest::new();
    let mut stats = SnapshotStats::default();
    let mut pending: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel_dir)) = pending.pop() {
        for dirent in fs::read_dir(&dir).map_err(io_ctx(format!("listing {}", dir.display())))? {
            let dirent = dirent.map_err(io_ctx(format!("listing {}", dir.display())))?;
            let path = dirent.path();
            let name = dirent.file_name().into_string().map_err(|_| CasError::NonUtf8Path(path.clone()))?;
            let rel = if rel_dir.is_empty() { name } else { format!("{rel_dir}/{name}") };
            let meta = fs::symlink_metadata(&path).map_err(io_ctx(format!("stat {}", path.display())))?;
            let Some(kind) = entry_kind(store, &path, &rel, &meta, previous, &mut stats)? else {
                continue;
            };
            if matches!(kind, EntryKind::Dir) {
                pending.push((path, rel.clone()));
            }
            manifest.entries.insert(rel, entry_from(kind, &meta));
        }
    }
    debug!(root = %root.display(), ?stats, "snapshot done");
    Ok((manifest, stats))
}

/// An entry of `kind` with the ownership, mode and mtime of `meta` (no xattrs).
pub fn entry_from(kind: EntryKind, meta: &Metadata) -> Entry {
    Entry {
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: meta.mtime(),
        mtime_nsec: meta.mtime_nsec() as u32,
        xattrs: BTreeMap::new(),
    }
}

fn entry_kind(
    store: &dyn BlobStore,
    path: &Path,
    rel: &str,
    meta: &Metadata,
    previous: Option<&Manifest>,
    stats: &mut SnapshotStats,
) -> Result<Option<EntryKind>> {
    let ft = meta.file_type();
    if ft.is_dir() {
        stats.dirs += 1;
        Ok(Some(EntryKind::Dir))
    } else if ft.is_symlink() {
        stats.symlinks += 1;
        let target = fs::read_link(path).map_err(io_ctx(format!("readlink {}", path.display())))?;
        let target =
            target.into_os_string().into_string().map_err(|_| CasError::NonUtf8Path(path.to_owned()))?;
        Ok(Some(EntryKind::Symlink { target }))
    } else if ft.is_file() {
        if let Some(content) = reusable(store, previous.and_then(|m| m.get(rel)), meta)? {
            stats.files_reused += 1;
            return Ok(Some(EntryKind::File(content)));
        }
        let content = store_file(store, path)?;
        stats.files_hashed += 1;
        stats.bytes_hashed += content.size;
        Ok(Some(EntryKind::File(content)))
    } else {
        stats.skipped_special += 1;
        warn!(path = %path.display(), "special file (device, fifo or socket) skipped in snapshot");
        Ok(None)
    }
}

/// The previous content of an unchanged file, if all its chunks are still stored.
fn reusable(store: &dyn BlobStore, prev: Option<&Entry>, meta: &Metadata) -> Result<Option<FileContent>> {
    let Some(Entry { kind: EntryKind::File(content), mode, mtime, mtime_nsec, .. }) = prev else {
        return Ok(None);
    };
    let unchanged = content.size == meta.len()
        && *mtime == meta.mtime()
        && *mtime_nsec == meta.mtime_nsec() as u32
        && *mode == meta.mode() & 0o7777;
    if !unchanged {
        return Ok(None);
    }
    for chunk in &content.chunks {
        if !store.touch(&chunk.digest)? {
            return Ok(None);
        }
    }
    Ok(Some(content.clone()))
}

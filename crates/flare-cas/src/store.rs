//! The [`BlobStore`] trait and its local-directory implementation, [`LocalStore`].

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use tracing::{debug, warn};

use crate::digest::{Digest, Hasher, ALGORITHM};
use crate::error::{io_ctx, CasError, Result};

/// Size and age of a stored blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    /// Length in bytes.
    pub size: u64,
    /// Last time the blob was written or [touched](BlobStore::touch); GC's grace period
    /// is measured from it.
    pub modified: SystemTime,
}

/// A content-addressed blob store. Implementations must be usable from many threads.
///
/// Nothing here assumes a local file system (an S3 store implements the same trait);
/// `put_file` reads a *source* file on the caller's machine.
pub trait BlobStore: Send + Sync {
    /// Store `data`, returning its digest. Idempotent: storing an existing blob only
    /// refreshes its modification time (see [`BlobStore::touch`]).
    fn put(&self, data: &[u8]) -> Result<Digest>;

    /// Store the content of the file at `path` as one blob, streaming (never holding the
    /// whole file in memory).
    fn put_file(&self, path: &Path) -> Result<Digest>;

    /// The blob's bytes, verified against the digest. A mismatch is
    /// [`CasError::Corrupt`] and the bad copy is removed from view so a later `put` repairs it.
    fn get(&self, digest: &Digest) -> Result<Vec<u8>>;

    /// `len` bytes from `offset` of the blob (for lazy reads of large chunks). A read that
    /// runs past the end is [`CasError::OutOfRange`]. Verification policy is up to the
    /// implementation but must catch corruption at least once per blob per process
    /// (see [`LocalStore`]).
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>>;

    /// Whether the blob is present (does not change it).
    fn has(&self, digest: &Digest) -> Result<bool>;

    /// Mark a present blob as just written, so garbage collection treats it as young.
    /// Returns `false` if the blob is absent. Writers that skip a `put` because a blob is
    /// already there must call this instead of [`BlobStore::has`] (see [`crate::gc`]).
    fn touch(&self, digest: &Digest) -> Result<bool>;

    /// The blob's size, or `None` if absent.
    fn size(&self, digest: &Digest) -> Result<Option<u64>> {
        Ok(self.stat(digest)?.map(|i| i.size))
    }

    /// The blob's size and age, or `None` if absent.
    fn stat(&self, digest: &Digest) -> Result<Option<BlobInfo>>;

    /// Every blob in the store (any order).
    fn list(&self) -> Result<Vec<Digest>>;

    /// Make every blob stored so far durable (survive a crash). Call before publishing
    /// anything that references them; [`crate::put_manifest`] does.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Remove the blob; `false` if it was absent.
    fn delete(&self, digest: &Digest) -> Result<bool>;

    /// Remove the blob only if it was not written or touched at or after `cutoff`,
    /// returning the bytes freed (`None`: kept or absent). Implementations should make
    /// this safe against a concurrent `put`/`touch` of the same blob; the default is a
    /// plain check-then-delete.
    fn delete_if_idle(&self, digest: &Digest, cutoff: SystemTime) -> Result<Option<u64>> {
        match self.stat(digest)? {
            Some(info) if info.modified < cutoff => Ok(self.delete(digest)?.then_some(info.size)),
            _ => Ok(None),
        }
    }
}

/// When a [`LocalStore`] makes new blobs durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync each blob and its directory as it is written (slow for many small files).
    EachBlob,
    /// Only on [`BlobStore::flush`] (one `syncfs` for everything written before).
    Batched,
    /// Never (a cache that can be refetched); `flush` does nothing.
    None,
}

/// Upper bound on remembered "already verified" digests before the set is reset.
const VERIFIED_CAP: usize = 1 << 20;
/// I/O buffer for streaming copies and hashing.
const IO_BUF: usize = 1 << 20;

/// A [`BlobStore`] in a local directory:
///
/// ```text
/// ROOT/blobs/blake3/ab/ab12…(64 hex)   blobs, mode 0444, fanned out by the first byte
/// ROOT/tmp/                            writes in progress (same file system)
/// ROOT/quarantine/                     blobs that failed verification
/// ROOT/trash/                          blobs being garbage-collected
/// ```
///
/// Writes go to a temp file under `tmp/` (same file system), are made read-only and
/// renamed into place, so a reader sees a blob whole or not at all, and concurrent puts
/// of the same blob simply race to rename identical content.
///
/// Durability ([`Durability`]): by default (`Batched`) blobs are not fsynced one by one
/// (that costs milliseconds per blob: 1,400 small files took 10 s instead of 0.3 s);
/// [`BlobStore::flush`] — which [`crate::put_manifest`] calls before storing a manifest —
/// makes everything written so far durable with one `syncfs`. A crash before the flush
/// can leave a torn blob, which verification on read detects and quarantines.
/// `EachBlob` fsyncs every blob file and its directory before the rename returns.
///
/// Verification: `get` hashes every read. `read_range` hashes the whole blob the first
/// time this process reads a range of it, then trusts it (blobs are immutable, read-only
/// files) — a remembered set bounded to about a million digests, reset when full.
pub struct LocalStore {
    root: PathBuf,
    durability: Durability,
    verified: Mutex<HashSet<Digest>>,
    counter: AtomicU64,
}

impl LocalStore {
    /// Open (creating if needed) a store rooted at `root`, with batched durability.
    pub fn open(root: &Path) -> Result<LocalStore> {
        for dir in [Self::blob_root_of(root), root.join("tmp"), root.join("quarantine"), root.join("trash")] {
            fs::create_dir_all(&dir).map_err(io_ctx(format!("creating {}", dir.display())))?;
        }
        Ok(LocalStore {
            root: root.to_path_buf(),
            durability: Durability::Batched,
            verified: Mutex::new(HashSet::new()),
            counter: AtomicU64::new(0),
        })
    }

    /// Choose when writes are made durable.
    pub fn with_durability(mut self, durability: Durability) -> LocalStore {
        self.durability = durability;
        self
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_root_of(root: &Path) -> PathBuf {
        root.join("blobs").join(ALGORITHM)
    }

    /// Where the blob lives (or would live) on disk.
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        Self::blob_root_of(&self.root).join(&hex[..2]).join(hex)
    }

    fn scratch_path(&self, dir: &str, stem: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let nanos =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        self.root.join(dir).join(format!("{stem}.{}.{n}.{nanos}", std::process::id()))
    }

    fn create_temp(&self) -> Result<(PathBuf, File)> {
        let path = self.scratch_path("tmp", "put");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_ctx(format!("creating {}", path.display())))?;
        Ok((path, file))
    }

    /// Make the temp file durable and read-only, then rename it into place.
    fn publish(&self, tmp: &Path, file: File, digest: &Digest) -> Result<()> {
        if self.durability == Durability::EachBlob {
            file.sync_all().map_err(io_ctx(format!("fsync {}", tmp.display())))?;
        }
        file.set_permissions(fs::Permissions::from_mode(0o444))
            .map_err(io_ctx(format!("chmod {}", tmp.display())))?;
        drop(file);
        let dest = self.path_of(digest);
        let dir = dest.parent().expect("blob path has a parent");
        fs::create_dir_all(dir).map_err(io_ctx(format!("creating {}", dir.display())))?;
        fs::rename(tmp, &dest).map_err(io_ctx(format!("renaming into {}", dest.display())))?;
        if self.durability == Durability::EachBlob {
            sync_dir(dir)?;
        }
        debug!(%digest, "blob stored");
        Ok(())
    }

    /// Move a blob that failed verification out of the way (kept for inspection).
    fn quarantine(&self, digest: &Digest) {
        self.forget_verified(digest);
        let from = self.path_of(digest);
        let to = self.scratch_path("quarantine", &digest.hex());
        match fs::rename(&from, &to) {
            Ok(()) => warn!(%digest, to = %to.display(), "corrupt blob quarantined"),
            Err(e) => warn!(%digest, error = %e, "could not quarantine corrupt blob"),
        }
    }

    fn forget_verified(&self, digest: &Digest) {
        self.verified.lock().unwrap_or_else(|p| p.into_inner()).remove(digest);
    }

    fn is_verified(&self, digest: &Digest) -> bool {
        self.verified.lock().unwrap_or_else(|p| p.into_inner()).contains(digest)
    }

    fn mark_verified(&self, digest: &Digest) {
        let mut set = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if set.len() >= VERIFIED_CAP {
            set.clear();
        }
        set.insert(*digest);
    }

    fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.path_of(digest);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => CasError::NotFound { digest: *digest },
            _ => CasError::Io { context: format!("opening {}", path.display()), source: e },
        })
    }

    /// Hash the whole blob from `file`; quarantine and fail on mismatch.
    fn verify_file(&self, digest: &Digest, file: &File) -> Result<()> {
        let mut hasher = Hasher::new();
        let mut buf = vec![0u8; IO_BUF];
        let mut offset = 0u64;
        loop {
            let n = file.read_at(&mut buf, offset).map_err(io_ctx(format!("reading blob {digest}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        if hasher.finalize() != *digest {
            self.quarantine(digest);
            return Err(CasError::Corrupt { digest: *digest });
        }
        self.mark_verified(digest);
        Ok(())
    }

    /// Remove leftovers in `tmp/`, `quarantine/` and `trash/` older than `cutoff`
    /// (crashed writers, inspected corrupt blobs). Returns how many were removed.
    pub fn clean_scratch(&self, cutoff: SystemTime) -> Result<u64> {
        let mut removed = 0;
        for dir in ["tmp", "quarantine", "trash"] {
            let dir = self.root.join(dir);
            for entry in fs::read_dir(&dir).map_err(io_ctx(format!("listing {}", dir.display())))? {
                let entry = entry.map_err(io_ctx(format!("listing {}", dir.display())))?;
                let old = entry.metadata().and_then(|m| m.modified()).map(|t| t < cutoff).unwrap_or(false);
                if old && fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// Flush the whole file system holding `dir` (one call instead of an fsync per file).
fn sync_filesystem(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let handle = File::open(dir).map_err(io_ctx(format!("opening {}", dir.display())))?;
    // SAFETY: `syncfs` only reads the descriptor number; `handle` owns that open
    // descriptor and outlives the call.
    let rc = unsafe { libc::syncfs(handle.as_raw_fd()) };
    if rc != 0 {
        return Err(CasError::Io {
            context: format!("syncfs {}", dir.display()),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_ctx(format!("fsync {}", dir.display())))
}

fn not_found_is_none<T>(r: io::Result<T>, context: impl FnOnce() -> String) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CasError::Io { context: context(), source: e }),
    }
}

impl BlobStore for LocalStore {
    fn put(&self, data: &[u8]) -> Result<Digest> {
        let digest = Digest::of(data);
        if self.touch(&digest)? {
            return Ok(digest);
        }
        let (tmp, mut file) = self.create_temp()?;
        let written = file.write_all(data).map_err(io_ctx(format!("writing {}", tmp.display())));
        if let Err(e) = written.and_then(|()| self.publish(&tmp, file, &digest)) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(digest)
    }

    fn put_file(&self, path: &Path) -> Result<Digest> {
        let mut src = File::open(path).map_err(io_ctx(format!("opening {}", path.display())))?;
        let (tmp, mut file) = self.create_temp()?;
        let result = (|| {
            let mut hasher = Hasher::new();
            let mut buf = vec![0u8; IO_BUF];
            loop {
                let n = src.read(&mut buf).map_err(io_ctx(format!("reading {}", path.display())))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).map_err(io_ctx(format!("writing {}", tmp.display())))?;
            }
            let digest = hasher.finalize();
            if self.touch(&digest)? {
                let _ = fs::remove_file(&tmp);
                return Ok(digest);
            }
            self.publish(&tmp, file, &digest)?;
            Ok(digest)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn get(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut file = self.open_blob(digest)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io_ctx(format!("reading blob {digest}")))?;
        if Digest::of(&data) != *digest {
            self.quarantine(digest);
            return Err(CasError::Corrupt { digest: *digest });
        }
        self.mark_verified(digest);
        Ok(data)
    }

    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>> {
        let file = self.open_blob(digest)?;
        let size = file.metadata().map_err(io_ctx(format!("stat blob {digest}")))?.len();
        match offset.checked_add(len) {
            Some(end) if end <= size => {}
            _ => return Err(CasError::OutOfRange { what: format!("blob {digest}"), offset, len, size }),
        }
        if !self.is_verified(digest) {
            self.verify_file(digest, &file)?;
        }
        let mut data = vec![0u8; len as usize];
        file.read_exact_at(&mut data, offset).map_err(io_ctx(format!("reading blob {digest}")))?;
        Ok(data)
    }

    fn has(&self, digest: &Digest) -> Result<bool> {
        Ok(self.stat(digest)?.is_some())
    }

    fn touch(&self, digest: &Digest) -> Result<bool> {
        let path = self.path_of(digest);
        let Some(file) = not_found_is_none(File::open(&path), || format!("opening {}", path.display()))?
        else {
            return Ok(false);
        };
        file.set_modified(SystemTime::now()).map_err(io_ctx(format!("touching {}", path.display())))?;
        // Re-check by path after the time is set: if GC moved the blob away in between,
        // report it absent so the caller writes it again (see `delete_if_idle`).
        Ok(not_found_is_none(fs::symlink_metadata(&path), || format!("stat {}", path.display()))?.is_some())
    }

    fn stat(&self, digest: &Digest) -> Result<Option<BlobInfo>> {
        let path = self.path_of(digest);
        let meta = not_found_is_none(fs::symlink_metadata(&path), || format!("stat {}", path.display()))?;
        meta.map(|m| {
            let modified = m.modified().map_err(io_ctx(format!("mtime of {}", path.display())))?;
            Ok(BlobInfo { size: m.len(), modified })
        })
        .transpose()
    }

    fn list(&self) -> Result<Vec<Digest>> {
        let root = Self::blob_root_of(&self.root);
        let mut out = Vec::new();
        for fan in fs::read_dir(&root).map_err(io_ctx(format!("listing {}", root.display())))? {
            let fan = fan.map_err(io_ctx(format!("listing {}", root.display())))?;
            if !fan.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let fan_path = fan.path();
            for blob in fs::read_dir(&fan_path).map_err(io_ctx(format!("listing {}", fan_path.display())))? {
                let blob = blob.map_err(io_ctx(format!("listing {}", fan_path.display())))?;
                match blob.file_name().to_str().map(Digest::from_hex) {
                    Some(Ok(d)) => out.push(d),
                    _ => warn!(path = %blob.path().display(), "stray file in blob store ignored"),
                }
            }
        }
        Ok(out)
    }

    fn flush(&self) -> Result<()> {
        match self.durability {
            Durability::Batched => sync_filesystem(&self.root),
            Durability::EachBlob | Durability::None => Ok(()),
        }
    }

    fn delete(&self, digest: &Digest) -> Result<bool> {
        self.forget_verified(digest);
        let path = self.path_of(digest);
        Ok(not_found_is_none(fs::remove_file(&path), || format!("removing {}", path.display()))?.is_some())
    }

    /// Safe against a concurrent `put`/`touch`: the blob is first renamed into `trash/`
    /// (a writer's `touch` after that sees it absent and writes it again), then its mtime
    /// is read there; if a writer touched it in the meantime it is renamed back.
    fn delete_if_idle(&self, digest: &Digest, cutoff: SystemTime) -> Result<Option<u64>> {
        match self.stat(digest)? {
            Some(info) if info.modified < cutoff => {}
            _ => return Ok(None),
        }
        let path = self.path_of(digest);
        let trash = self.scratch_path("trash", &digest.hex());
        if not_found_is_none(fs::rename(&path, &trash), || format!("moving {} to trash", path.display()))?
            .is_none()
        {
            return Ok(None);
        }
        self.forget_verified(digest);
        let meta = fs::symlink_metadata(&trash).map_err(io_ctx(format!("stat {}", trash.display())))?;
        let modified = meta.modified().map_err(io_ctx(format!("mtime of {}", trash.display())))?;
        if modified >= cutoff {
            fs::rename(&trash, &path).map_err(io_ctx(format!("restoring {}", path.display())))?;
            return Ok(None);
        }
        fs::remove_file(&trash).map_err(io_ctx(format!("removing {}", trash.display())))?;
        Ok(Some(meta.len()))
    }
}

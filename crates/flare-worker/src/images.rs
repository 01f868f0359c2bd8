//! Images on this worker: one lazy FUSE mount per image (shared by all its containers,
//! kept while the worker runs), a chunk cache shared by all images, start-time mounts
//! materialized once, and the record of what a start read, prefetched next time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use flare_cas::{get_manifest, materialize, BlobStore, Digest};
use flare_imagefs::{ChunkCache, IdShift, ImageFs, ImageFsOptions, MountHandle};

use crate::WorkerError;

/// Default size bound of the worker's chunk cache.
pub const DEFAULT_CACHE_BYTES: u64 = 20 << 30;

struct Mounted {
    fs: Arc<ImageFs>,
    _handle: MountHandle,
    path: PathBuf,
    access_saved: bool,
}

/// One image mount, made by the first start that needs it.
type MountSlot = Arc<Mutex<Option<Mounted>>>;

/// The images of one worker.
pub struct ImageHost {
    store: Arc<dyn BlobStore>,
    cache: Arc<ChunkCache>,
    root: PathBuf,
    /// Keyed by image and whether the mount uses FUSE passthrough.
    mounts: Mutex<HashMap<(Digest, bool), MountSlot>>,
    /// Captured environments checked against this machine's files: do they match?
    /// (One check per image: concurrent starts wait for it instead of each loading the
    /// manifest, which would leave every container cloned meanwhile with a big heap.)
    host_checked: Mutex<HashMap<Digest, Arc<Mutex<Option<bool>>>>>,
    /// Image owners shifted into the containers' user namespace (see [`ImageHost::with_userns`]).
    ids: Option<IdShift>,
}

/// Whether image mounts use FUSE passthrough (`FLARE_IMAGEFS_PASSTHROUGH=0`: never).
fn passthrough_allowed() -> bool {
    !std::env::var("FLARE_IMAGEFS_PASSTHROUGH").is_ok_and(|v| v == "0")
}

/// Mount options of image `d`.
fn image_fs_options(d: &Digest, ids: Option<IdShift>, passthrough: bool) -> ImageFsOptions {
    let mut o =
        ImageFsOptions { fsname: format!("flare-image-{}", &d.hex()[..12]), ids, ..Default::default() };
    o.passthrough = o.passthrough && passthrough && passthrough_allowed();
    o
}

impl ImageHost {
    /// `root` holds the mountpoints, access logs and materialized mounts.
    pub fn new(
        store: Arc<dyn BlobStore>,
        cache: Arc<ChunkCache>,
        root: &Path,
    ) -> Result<ImageHost, WorkerError> {
        for d in ["mnt", "access", "trees"] {
            std::fs::create_dir_all(root.join(d))
                .map_err(|e| WorkerError::io(format!("creating {}", root.join(d).display()), e))?;
        }
        // Mounts left by a previous run of this worker.
        if let Ok(rd) = std::fs::read_dir(root.join("mnt")) {
            for e in rd.flatten() {
                let _ = flare_imagefs::force_unmount(&e.path());
            }
        }
        Ok(ImageHost {
            store,
            cache,
            root: root.to_path_buf(),
            mounts: Mutex::new(HashMap::new()),
            host_checked: Mutex::new(HashMap::new()),
            ids: None,
        })
    }

    /// Mount images for containers that run in user namespace `ns` (the runtime's
    /// `userns()`): their owners appear shifted into its range, so root inside owns
    /// what the image gives to root.
    pub fn with_userns(mut self, ns: Option<flare_runtime::UserNamespace>) -> ImageHost {
        self.ids = ns.map(|ns| IdShift { host_base: ns.host_base, size: ns.size });
        self
    }

    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.store
    }

    /// The mountpoint of image `manifest` (mounting it on first use). Blocking.
    pub fn ensure(&self, manifest: &str) -> Result<PathBuf, WorkerError> {
        self.ensure_with(manifest, true)
    }

    /// As [`Self::ensure`]; `passthrough: false` gives a mount of the image without FUSE
    /// passthrough (its own mount): memory snapshots need it, because a file mapped
    /// through passthrough is the host's backing file, which CRIU cannot find in the
    /// container's mount namespace.
    pub fn ensure_with(&self, manifest: &str, passthrough: bool) -> Result<PathBuf, WorkerError> {
        let d: Digest = manifest
            .parse()
            .map_err(|_| WorkerError::images("bad image manifest digest", format!("{manifest:?}")))?;
        let passthrough = passthrough && passthrough_allowed();
        let slot = {
            let mut m = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
            m.entry((d, passthrough)).or_default().clone()
        };
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = slot.as_ref() {
            return Ok(m.path.clone());
        }
        let tree = get_manifest(self.store.as_ref(), &d)
            .map_err(|e| WorkerError::images(format!("image {d}"), e))?;
        let fs = ImageFs::new(
            Arc::new(tree),
            self.store.clone(),
            self.cache.clone(),
            image_fs_options(&d, self.ids, passthrough),
        )
        .map_err(|e| WorkerError::images(format!("image {d}"), e))?;
        let fs = Arc::new(fs);
        // What the last start of this image read: fetch it in parallel before starting.
        let access = self.root.join("access").join(d.hex());
        let mut access_saved = false;
        if let Ok(text) = std::fs::read_to_string(&access) {
            access_saved = true;
            let digests: Vec<Digest> = text.lines().filter_map(|l| l.parse().ok()).collect();
            let r = fs.prefetch(&digests, 8);
            tracing::debug!(image = %d, report = ?r, "prefetched the recorded start");
        }
        let path = self.root.join("mnt").join(if passthrough { d.hex() } else { format!("{}-np", d.hex()) });
        std::fs::create_dir_all(&path)
            .map_err(|e| WorkerError::io(format!("creating {}", path.display()), e))?;
        let handle = fs.mount(&path).map_err(|e| WorkerError::images(format!("mounting image {d}"), e))?;
        flare_runtime::trim_heap();
        *slot = Some(Mounted { fs, _handle: handle, path: path.clone(), access_saved });
        Ok(path)
    }

    /// Whether this machine's own files under `roots` are those of captured environment
    /// `manifest`: every entry exists with the same type, mode, size and modification
    /// time (files) or target (symlinks) — the rule the client's hash cache uses to call
    /// a file unchanged. Checked once per image (one `lstat` per entry), then remembered.
    /// `FLARE_LOCAL_ENV_FROM_HOST=0` turns this off (always the lazy image mount).
    pub fn host_matches(&self, manifest: &str, roots: &[String]) -> bool {
        if std::env::var("FLARE_LOCAL_ENV_FROM_HOST").is_ok_and(|v| v == "0") {
            return false;
        }
        let Ok(d) = manifest.parse::<Digest>() else { return false };
        let slot = self.host_checked.lock().unwrap_or_else(|e| e.into_inner()).entry(d).or_default().clone();
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = *slot {
            return known;
        }
        let t0 = std::time::Instant::now();
        let verdict = match get_manifest(self.store.as_ref(), &d) {
            Ok(tree) => match first_difference(&tree, roots) {
                None => true,
                Some(why) => {
                    tracing::info!(image = %d, %why, "captured environment differs from this machine's files: using the image mount");
                    false
                }
            },
            Err(e) => {
                tracing::warn!(image = %d, error = %e, "cannot read a captured environment's manifest");
                false
            }
        };
        tracing::debug!(image = %d, verdict, ms = t0.elapsed().as_millis() as u64, "captured environment checked against the host");
        flare_runtime::trim_heap();
        *slot = Some(verdict);
        verdict
    }

    /// Save what the image's first start read (once per image and worker run).
    pub fn record_start(&self, manifest: &str) {
        let Ok(d) = manifest.parse::<Digest>() else { return };
        let slot = {
            let m = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
            m.get(&(d, true)).or_else(|| m.get(&(d, false))).cloned()
        };
        let Some(slot) = slot else { return };
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        let Some(m) = slot.as_mut() else { return };
        if m.access_saved {
            return;
        }
        m.access_saved = true;
        let log: Vec<String> = m.fs.access_log().iter().map(|d| d.to_string()).collect();
        let p = self.root.join("access").join(d.hex());
        let tmp = p.with_extension("tmp");
        if std::fs::write(&tmp, log.join("\n")).and_then(|_| std::fs::rename(&tmp, &p)).is_err() {
            tracing::warn!(path = %p.display(), "could not save an image's start record");
        }
    }

    /// A directory holding file tree `manifest` (materialized once), its owners shifted
    /// into the containers' user namespace like the image mounts' (so a private file is
    /// its owner's inside, not the overflow id's). Blocking.
    pub fn tree(&self, manifest: &str) -> Result<PathBuf, WorkerError> {
        let d: Digest = manifest
            .parse()
            .map_err(|_| WorkerError::images("bad mount manifest digest", format!("{manifest:?}")))?;
        let name = match self.ids {
            Some(s) => format!("{}-u{}", d.hex(), s.host_base),
            None => d.hex(),
        };
        let dir = self.root.join("trees").join(&name);
        if dir.is_dir() {
            return Ok(dir);
        }
        let mut tree = get_manifest(self.store.as_ref(), &d)
            .map_err(|e| WorkerError::images(format!("mount {d}"), e))?;
        if let Some(s) = self.ids {
            for e in tree.entries.values_mut() {
                (e.uid, e.gid) = (s.to_host(e.uid), s.to_host(e.gid));
            }
        }
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.root.join("trees").join(format!(".tmp-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .map_err(|e| WorkerError::io(format!("creating {}", tmp.display()), e))?;
        materialize(self.store.as_ref(), &tree, &tmp)
            .map_err(|e| WorkerError::images(format!("mount {d}"), e))?;
        if let Some(s) = self.ids {
            let root = s.to_host(0);
            std::os::unix::fs::chown(&tmp, Some(root), Some(root))
                .map_err(|e| WorkerError::io(format!("chown {}", tmp.display()), e))?;
        }
        match std::fs::rename(&tmp, &dir) {
            Ok(()) => Ok(dir),
            Err(_) if dir.is_dir() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(dir)
            }
            Err(e) => Err(WorkerError::io(format!("storing mount {d}"), e)),
        }
    }
}

/// The first entry of `tree` under `roots` that this machine does not have as recorded.
fn first_difference(tree: &flare_cas::Manifest, roots: &[String]) -> Option<String> {
    use flare_cas::EntryKind;
    use std::os::unix::fs::MetadataExt;
    let rels: Vec<String> = roots.iter().map(|r| r.trim_start_matches('/').to_owned()).collect();
    if rels.iter().any(|r| r.is_empty()) {
        return Some("a root is /".into());
    }
    let mut checked = 0usize;
    for (path, e) in &tree.entries {
        if !rels.iter().any(|r| path == r || path.starts_with(&format!("{r}/"))) {
            continue;
        }
        checked += 1;
        let host = Path::new("/").join(path);
        let Ok(meta) = std::fs::symlink_metadata(&host) else {
            return Some(format!("{} is missing", host.display()));
        };
        let same = match &e.kind {
            EntryKind::Dir => meta.is_dir(),
            EntryKind::Symlink { target } => {
                meta.file_type().is_symlink()
                    && std::fs::read_link(&host).is_ok_and(|t| t.as_os_str() == std::ffi::OsStr::new(target))
            }
            EntryKind::File(c) => {
                meta.is_file()
                    && meta.len() == c.size
                    && e.mtime != 0
                    && meta.mtime() == e.mtime
                    && meta.mode() & 0o7777 == e.mode
            }
        };
        if !same {
            return Some(format!("{} changed", host.display()));
        }
    }
    if checked == 0 {
        return Some("no entries under the roots".into());
    }
    None
}

/// The control plane's blob store seen from a worker on another machine: blobs are
/// fetched over HTTP (`GET /v1/blobs/{digest}`) and verified here. Read-only.
pub struct HttpBlobStore {
    client: crate::http::HttpClient,
    handle: tokio::runtime::Handle,
}

impl HttpBlobStore {
    /// `handle`: the runtime that drives the HTTP client (calls block on it, so they
    /// must come from threads outside that runtime's workers, e.g. FUSE or blocking tasks).
    pub fn new(client: crate::http::HttpClient, handle: tokio::runtime::Handle) -> HttpBlobStore {
        HttpBlobStore { client, handle }
    }

    fn fetch(&self, d: &Digest) -> flare_cas::Result<Option<Vec<u8>>> {
        let path = format!("/v1/blobs/{d}");
        match self.handle.block_on(self.client.get(&path)) {
            Ok(body) => {
                if Digest::of(&body) != *d {
                    return Err(flare_cas::CasError::Corrupt { digest: *d });
                }
                Ok(Some(body.to_vec()))
            }
            Err(WorkerError::HttpStatus { status: axum::http::StatusCode::NOT_FOUND, .. }) => Ok(None),
            Err(e) => Err(flare_cas::CasError::Io {
                context: format!("fetching {d} from {}", self.client.base()),
                source: std::io::Error::other(e),
            }),
        }
    }

    fn read_only() -> flare_cas::CasError {
        flare_cas::CasError::Io {
            context: "the control plane's blob store".into(),
            source: std::io::Error::new(std::io::ErrorKind::Unsupported, "read-only from a worker"),
        }
    }
}

impl BlobStore for HttpBlobStore {
    fn put(&self, _data: &[u8]) -> flare_cas::Result<Digest> {
        Err(Self::read_only())
    }

    fn put_file(&self, _path: &Path) -> flare_cas::Result<Digest> {
        Err(Self::read_only())
    }

    fn get(&self, digest: &Digest) -> flare_cas::Result<Vec<u8>> {
        self.fetch(digest)?.ok_or(flare_cas::CasError::NotFound { digest: *digest })
    }

    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> flare_cas::Result<Vec<u8>> {
        let data = self.get(digest)?;
        let size = data.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(flare_cas::CasError::OutOfRange {
                what: format!("blob {digest}"),
                offset,
                len,
                size,
            });
        }
        Ok(data[offset as usize..(offset + len) as usize].to_vec())
    }

    fn has(&self, digest: &Digest) -> flare_cas::Result<bool> {
        Ok(self.fetch(digest)?.is_some())
    }

    fn touch(&self, digest: &Digest) -> flare_cas::Result<bool> {
        self.has(digest)
    }

    fn stat(&self, digest: &Digest) -> flare_cas::Result<Option<flare_cas::BlobInfo>> {
        Ok(self
            .fetch(digest)?
            .map(|b| flare_cas::BlobInfo { size: b.len() as u64, modified: std::time::SystemTime::now() }))
    }

    fn list(&self) -> flare_cas::Result<Vec<Digest>> {
        Ok(Vec::new())
    }

    fn delete(&self, _digest: &Digest) -> flare_cas::Result<bool> {
        Err(Self::read_only())
    }
}

//! Memory snapshots on this worker (docs/SNAPSHOTS.md): which snapshot a cold start may
//! use (a pure decision over the assignment and the host's CRIU), checkpointing the first
//! container of a function version after its `@enter(snap=True)` hooks, and keeping
//! snapshots in a content-addressed store (chunked, so unchanged pages are shared between
//! snapshots) with a materialized copy that restores read.
//!
//! Layout under `home/snapshots`: `blobs/` (the store), `index/<key>.json` (a
//! [`Meta`] naming the manifest), `cache/<key>/` (the images, materialized and verified
//! once; `.complete` marks a finished copy), `tmp/` (dumps and copies in progress).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flare_cas::{Digest, LocalStore};
use flare_proto::ContainerAssignment;
use flare_snapshot::{CgroupMode, Criu, DumpOpts, ExternalMount, NetworkLock, RestoreOpts};
use serde::{Deserialize, Serialize};

use crate::snapshot_share::SnapshotShare;

/// The name of a bind mount in a checkpoint (`--external mnt[DST]:NAME`): stable per
/// container path, so that a restore maps it to the new container's source for that path.
fn mount_name(dst: &Path) -> String {
    let h = blake3::hash(dst.as_os_str().as_encoded_bytes());
    format!("fb-{}", &h.to_hex()[..16])
}

/// Where a snapshot keeps the checkpointed container's upper layer (its root's files and
/// its binds' mountpoints), beside CRIU's images.
pub(crate) const UPPER_DIR: &str = "rootfs-upper";

/// What the host offers for snapshots, detected once at worker start.
pub(crate) struct Support {
    pub criu: Criu,
    /// CRIU's version as text (part of every key).
    pub criu_version: String,
    pub cpu_flags: Vec<String>,
    /// Restores may use lazy pages: CRIU has userfaultfd with non-cooperative events and
    /// a restored task (inside its user namespace) may open one, which takes
    /// `vm.unprivileged_userfaultfd=1`, a host-wide setting left to the operator.
    /// `FLARE_SNAPSHOT_LAZY=0` turns lazy restores off.
    pub lazy: bool,
}

impl Support {
    /// This host's part of snapshot keys.
    pub fn host_key(&self) -> HostKey<'_> {
        HostKey {
            cpu_flags: &self.cpu_flags,
            kernel_release: self.criu.kernel_release(),
            criu_version: &self.criu_version,
        }
    }
}

/// Snapshots smaller than this restore eagerly even where lazy pages work (the lazy-pages
/// daemon costs more than reading a few MiB).
const LAZY_MIN_BYTES: u64 = 64 << 20;

/// How many snapshots a worker keeps (the least recently restored go first).
const SNAPSHOTS_KEPT: usize = 16;

/// The inodes of a checkpointed container's pipes (stdout, stderr, frames out, frames
/// in): a restore hands in new pipes for them (`--inherit-fd fd[N]:pipe:[INODE]`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct PipeInodes {
    pub stdout: u64,
    pub stderr: u64,
    pub frames_out: u64,
    pub frames_in: u64,
}

/// A stored snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Meta {
    pub key: String,
    /// Digest (hex) of the images' manifest in the store.
    pub manifest: String,
    pub pipes: PipeInodes,
    /// How long the dump took, and the images' size.
    pub dump_ms: u64,
    pub image_bytes: u64,
    /// Bytes of this snapshot's files shared with the function's previous snapshot.
    pub shared_bytes: u64,
    /// The host it was taken on (also in the key; checked again on a snapshot that comes
    /// from another worker): its CPU flags, kernel release and CRIU version.
    #[serde(default)]
    pub cpu_flags: Vec<String>,
    #[serde(default)]
    pub kernel_release: String,
    #[serde(default)]
    pub criu_version: String,
}

/// Whether a snapshot taken on the host `meta` names may restore here: the same kernel
/// and CRIU, and no CPU feature this host lacks (a restored process goes on using the
/// instructions it picked on the dumping CPU). The reason when not.
pub(crate) fn compatible(meta: &Meta, host: &HostKey<'_>) -> Result<(), String> {
    let here: HashSet<&str> = host.cpu_flags.iter().map(String::as_str).collect();
    let lacking: Vec<&str> =
        meta.cpu_flags.iter().map(String::as_str).filter(|f| !here.contains(f)).collect();
    if !lacking.is_empty() {
        return Err(format!(
            "it was taken on a CPU with features this one lacks ({})",
            lacking.iter().take(8).copied().collect::<Vec<_>>().join(", ")
        ));
    }
    if meta.kernel_release != host.kernel_release {
        return Err(format!(
            "it was taken on kernel {}, this is {}",
            meta.kernel_release, host.kernel_release
        ));
    }
    if meta.criu_version != host.criu_version {
        return Err(format!("it was taken with CRIU {}, this is {}", meta.criu_version, host.criu_version));
    }
    Ok(())
}

/// What a cold start of an assignment does about snapshots.
#[derive(Debug, PartialEq)]
pub(crate) enum Plan {
    /// The function did not ask for one.
    Off,
    /// It asked, but none can be taken here: run cold, tell the app once why.
    Unavailable(String),
    /// No snapshot yet: start normally, checkpoint after the snap=True hooks. `dropped`:
    /// why a stored one was discarded (it could not be read back).
    Create { key: String, dropped: Option<String> },
    /// Another container of this version is checkpointing right now: start normally.
    Busy,
    /// Restore from this snapshot.
    Restore { key: String, images: PathBuf, meta: Meta },
}

/// Why a snapshot could not be used or made (the text goes to the app's logs).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SnapError {
    #[error("{0}")]
    Criu(#[from] flare_snapshot::SnapshotError),
    #[error("snapshot store: {0}")]
    Store(#[from] flare_cas::CasError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{0}")]
    Runtime(#[from] flare_runtime::RuntimeError),
    #[error("snapshot index {0}: {1}")]
    Index(String, String),
    #[error("fetching from the control plane: {0}")]
    Fetch(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapError {
    let context = context.into();
    move |source| SnapError::Io { context, source }
}

/// What, besides the function, a snapshot depends on: the host's CPU flags (a restored
/// process may use any instruction the dumping CPU had), kernel and CRIU.
#[derive(Clone, Debug)]
pub(crate) struct HostKey<'a> {
    pub cpu_flags: &'a [String],
    pub kernel_release: &'a str,
    pub criu_version: &'a str,
}

/// The snapshot key of an assignment: its app (a snapshot never serves another app),
/// the function version (its whole definition: code mount, pickled body, config, image,
/// Python), the image, and the host.
pub(crate) fn key_of(a: &ContainerAssignment, host: &HostKey<'_>) -> String {
    let def = serde_json::to_vec(&a.def).unwrap_or_default();
    let mut h = blake3::Hasher::new();
    h.update(&(a.app_id.len() as u64).to_le_bytes());
    h.update(a.app_id.as_bytes());
    h.update(&def);
    let version = h.finalize().to_hex().to_string();
    let image = a.def.image.as_ref().map(|i| i.image_id.as_str()).unwrap_or("host");
    flare_snapshot::snapshot_key(&flare_snapshot::KeyInputs {
        function_version: &version,
        image_id: image,
        cpu_flags: host.cpu_flags,
        kernel_release: host.kernel_release,
        criu_version: host.criu_version,
    })
}

/// Decide (pure, given what is stored): `key` is the assignment's key or why there is
/// none; `stored` finds a usable stored snapshot; `busy` says whether a container is
/// creating that key right now.
pub(crate) fn decide(
    wanted: bool,
    key: Result<String, &str>,
    stored: impl FnOnce(&str) -> Result<Option<(PathBuf, Meta)>, String>,
    busy: impl FnOnce(&str) -> bool,
) -> Plan {
    if !wanted {
        return Plan::Off;
    }
    let key = match key {
        Ok(k) => k,
        Err(why) => return Plan::Unavailable(why.to_owned()),
    };
    let dropped = match stored(&key) {
        Ok(Some((images, meta))) => return Plan::Restore { key, images, meta },
        Ok(None) => None,
        Err(why) => Some(why),
    };
    if busy(&key) {
        return Plan::Busy;
    }
    Plan::Create { key, dropped }
}

/// Which earlier snapshot a new one of `a` is compared with (same app and function).
pub(crate) fn lineage_of(a: &ContainerAssignment) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&(a.app_id.len() as u64).to_le_bytes());
    h.update(a.app_id.as_bytes());
    h.update(a.def.name.as_bytes());
    h.finalize().to_hex()[..32].to_string()
}

/// The worker's snapshots.
pub(crate) struct Snapshots {
    dir: PathBuf,
    store: Option<LocalStore>,
    /// The fleet's snapshots (a remote worker), see [`crate::snapshot_share`].
    share: Option<Arc<SnapshotShare>>,
    support: Result<Support, String>,
    creating: Mutex<HashSet<String>>,
    /// Apps already told why no snapshot is taken.
    told: Mutex<HashSet<String>>,
}

impl Snapshots {
    /// Opens `dir` and detects CRIU (`FLARE_CRIU` names another binary). `share`: where
    /// the fleet's snapshots are.
    pub fn open(dir: &Path, share: Option<Arc<SnapshotShare>>) -> Snapshots {
        // Memory images hold whatever the functions had in memory: root's only.
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::create_dir_all(dir);
            if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot make the snapshot dir root-only");
            }
        }
        let path = std::env::var_os("FLARE_CRIU").map(PathBuf::from);
        let support = match Criu::detect(path.as_deref()) {
            Ok(criu) => {
                // Unknown flags (no /proc/cpuinfo) key snapshots to an empty set: still
                // per kernel and CRIU, and never mixed with a known set.
                let cpu_flags = flare_snapshot::host_cpu_flags().unwrap_or_default();
                tracing::info!(
                    criu = %criu.path().display(),
                    version = %criu.version(),
                    lazy_pages = criu.features().lazy_pages(),
                    "memory snapshots available"
                );
                let uffd =
                    std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
                let lazy = criu.features().lazy_pages()
                    && uffd.trim() == "1"
                    && !std::env::var("FLARE_SNAPSHOT_LAZY").is_ok_and(|v| v == "0");
                let criu_version = criu.version().to_string();
                Ok(Support { criu, criu_version, cpu_flags, lazy })
            }
            Err(e) => {
                tracing::info!(reason = %e, "memory snapshots unavailable: functions that ask for one start cold");
                Err(e.to_string())
            }
        };
        let store = match LocalStore::open(&dir.join("blobs")) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "snapshot store unavailable");
                None
            }
        };
        let support = match (support, &store) {
            (Ok(s), Some(_)) => Ok(s),
            (Ok(_), None) => Err("the snapshot store could not be opened".to_owned()),
            (Err(e), _) => Err(e),
        };
        Snapshots {
            dir: dir.to_path_buf(),
            store,
            share,
            support,
            creating: Mutex::default(),
            told: Mutex::default(),
        }
    }

    pub fn support(&self) -> Option<&Support> {
        self.support.as_ref().ok()
    }

    /// Whether the app `app_id` has not been told yet (and now counts as told).
    pub fn tell_once(&self, app_id: &str) -> bool {
        self.told.lock().unwrap_or_else(|p| p.into_inner()).insert(app_id.to_owned())
    }

    /// What a cold start of `a` does. A `Create` reserves the key until [`Self::done_creating`].
    pub fn plan(&self, a: &ContainerAssignment) -> Plan {
        let wanted = a.def.config.enable_memory_snapshot;
        let key = match (&self.support, wanted) {
            (Ok(s), true) => Ok(key_of(a, &s.host_key())),
            (Ok(_), false) => Ok(String::new()),
            (Err(e), _) => Err(e.as_str()),
        };
        let plan = decide(
            wanted,
            key,
            |k| self.stored(k),
            |k| self.creating.lock().unwrap_or_else(|p| p.into_inner()).contains(k),
        );
        if let Plan::Create { key, .. } = &plan {
            if !self.creating.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone()) {
                return Plan::Busy;
            }
        }
        plan
    }

    /// Reserve `key` for a container that will create it (false: another one is).
    pub fn begin_create(&self, key: &str) -> bool {
        self.creating.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_owned())
    }

    pub fn done_creating(&self, key: &str) {
        self.creating.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    fn index_path(&self, key: &str) -> PathBuf {
        self.dir.join("index").join(format!("{key}.json"))
    }

    fn cache_path(&self, key: &str) -> PathBuf {
        self.dir.join("cache").join(key)
    }

    /// The images of `key`, materialized from the store if the cache lacks them. A
    /// snapshot that cannot be read back (digest mismatch, missing blobs) is discarded,
    /// and the error says why.
    fn stored(&self, key: &str) -> Result<Option<(PathBuf, Meta)>, String> {
        let text = match std::fs::read(self.index_path(key)) {
            Ok(t) => t,
            Err(_) => match self.fetch_record(key)? {
                Some(t) => t,
                None => return Ok(None),
            },
        };
        let meta: Meta = match serde_json::from_slice(&text) {
            Ok(m) => m,
            Err(e) => {
                self.discard(key);
                return Err(format!("its index is unreadable ({e})"));
            }
        };
        let cache = self.cache_path(key);
        if cache.join(".complete").exists() {
            return Ok(Some((cache, meta)));
        }
        match self.materialize(&meta, &cache) {
            Ok(()) => Ok(Some((cache, meta))),
            // The control plane could not be reached for its blobs: the fleet's snapshot
            // may be fine, keep its record (this worker starts cold and asks again next time).
            Err(e @ SnapError::Fetch(_)) => {
                tracing::warn!(%key, error = %e, "snapshot blobs unavailable from the control plane");
                self.discard(key);
                Err(format!("its blobs could not be fetched ({e})"))
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "snapshot unreadable from the store; discarding it");
                self.discard_everywhere(key);
                Err(format!("it could not be read back from the store ({e})"))
            }
        }
    }

    /// The fleet's record of `key` (none without a share), checked against this host and
    /// written to the index (its blobs come with [`Self::materialize`]).
    fn fetch_record(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let (Some(share), Ok(s)) = (&self.share, &self.support) else { return Ok(None) };
        let Some(meta) = share.record(key)? else { return Ok(None) };
        let checked = if meta.key != key {
            Err(format!("the control plane's record names another key ({})", meta.key))
        } else {
            compatible(&meta, &s.host_key())
        };
        if let Err(why) = checked {
            tracing::warn!(%key, %why, "shared snapshot not usable here");
            return Err(format!("the fleet's snapshot cannot restore on this worker: {why}"));
        }
        let body = serde_json::to_vec(&meta).map_err(|e| e.to_string())?;
        self.write_index(key, &body).map_err(|e| e.to_string())?;
        tracing::info!(%key, bytes = meta.image_bytes, "memory snapshot found in the fleet");
        Ok(Some(body))
    }

    fn write_index(&self, key: &str, body: &[u8]) -> Result<(), SnapError> {
        std::fs::create_dir_all(self.dir.join("index")).map_err(io("create the snapshot index"))?;
        let tmp = self.index_path(key).with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&tmp, body).map_err(io("write the snapshot index"))?;
        std::fs::rename(&tmp, self.index_path(key)).map_err(io("write the snapshot index"))?;
        Ok(())
    }

    fn materialize(&self, meta: &Meta, cache: &Path) -> Result<(), SnapError> {
        let store =
            self.store.as_ref().ok_or_else(|| SnapError::Index(meta.key.clone(), "no store".into()))?;
        let digest = Digest::from_hex(&meta.manifest)?;
        if let Some(share) = &self.share {
            let t0 = Instant::now();
            let bytes = share.pull(store, &digest).map_err(|e| match e {
                crate::snapshot_share::PullError::Corrupt(e) => SnapError::Index(meta.key.clone(), e),
                crate::snapshot_share::PullError::Unavailable(e) => SnapError::Fetch(e),
            })?;
            if bytes > 0 {
                tracing::info!(key = %meta.key, bytes, ms = t0.elapsed().as_millis() as u64, "snapshot blobs fetched from the control plane");
            }
        }
        let manifest = flare_cas::get_manifest(store, &digest)?;
        let tmp = self.tmp_dir(&format!("copy-{}", meta.key))?;
        flare_cas::materialize(store, &manifest, &tmp)?;
        std::fs::write(tmp.join(".complete"), b"").map_err(io("mark the snapshot copy complete"))?;
        let _ = std::fs::remove_dir_all(cache);
        std::fs::create_dir_all(self.dir.join("cache")).map_err(io("create the snapshot cache"))?;
        std::fs::rename(&tmp, cache).map_err(io(format!("move the snapshot copy to {}", cache.display())))?;
        Ok(())
    }

    /// Forget `key` (index and cached copy); its blobs go with the store's GC.
    pub fn discard(&self, key: &str) {
        let _ = std::fs::remove_file(self.index_path(key));
        let _ = std::fs::remove_dir_all(self.cache_path(key));
    }

    /// Forget `key` here and in the fleet (it could not be read back or restored; the
    /// snapshot made instead replaces it).
    pub fn discard_everywhere(&self, key: &str) {
        self.discard(key);
        if let Some(share) = &self.share {
            share.forget(key);
        }
    }

    /// Share a saved snapshot with the fleet (blocking): `None` where there is no fleet.
    pub fn share(&self, meta: &Meta) -> Option<Result<crate::snapshot_share::Uploaded, String>> {
        let share = self.share.as_ref()?;
        let store = self.store.as_ref()?;
        Some(share.upload(store, meta))
    }

    /// A fresh directory under `tmp/`.
    pub fn tmp_dir(&self, name: &str) -> Result<PathBuf, SnapError> {
        let d = self.dir.join("tmp").join(format!("{name}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&d).map_err(io(format!("create {}", d.display())))?;
        Ok(d)
    }

    /// Checkpoint the container with pid 1 `pid` (host pid) into a new dir, leaving it
    /// running. `binds`: its private binds (`Runtime::private_binds`), named in the
    /// checkpoint; every other host bind is found by CRIU (world-searchable sources).
    pub fn dump(
        &self,
        pid: i32,
        binds: &[(PathBuf, PathBuf)],
    ) -> Result<(PathBuf, flare_snapshot::DumpReport), SnapError> {
        let s = self.support().ok_or_else(|| SnapError::Index(String::new(), "no criu".into()))?;
        let dir = self.tmp_dir("dump")?;
        let mut external_mounts: Vec<ExternalMount> = binds
            .iter()
            .map(|(dst, _)| ExternalMount::Named {
                mountpoint: dst.to_string_lossy().into_owned(),
                name: mount_name(dst),
            })
            .collect();
        external_mounts.push(ExternalMount::Auto);
        let opts = DumpOpts {
            leave_running: true,
            // The runner refuses sockets before a checkpoint and the container's network
            // namespace is its own: no connection for a lock to protect, and an iptables
            // lock costs every restore ~60 ms of iptables runs at unlock.
            network_lock: Some(NetworkLock::Skip),
            external_mounts,
            manage_cgroups: Some(CgroupMode::Ignore),
            timeout: Duration::from_secs(300),
            ..Default::default()
        };
        match s.criu.dump(pid, &dir, &opts) {
            Ok(rep) => Ok((dir, rep)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e.into())
            }
        }
    }

    /// Store a finished dump as `key`: into the store (chunks shared with what is there),
    /// the index, and the cache (the dump dir itself, renamed).
    pub fn save(
        &self,
        key: &str,
        lineage: &str,
        dumped: &Path,
        pipes: PipeInodes,
        rep: &flare_snapshot::DumpReport,
    ) -> Result<Meta, SnapError> {
        let store = self.store.as_ref().ok_or_else(|| SnapError::Index(key.to_owned(), "no store".into()))?;
        // Logs are not part of the snapshot.
        let _ = std::fs::remove_file(dumped.join("dump.log"));
        let manifest = flare_cas::snapshot_dir(store, dumped, None)?;
        let digest = flare_cas::put_manifest(store, &manifest)?;
        // What this snapshot shares with the function's previous one (a code change
        // re-dumps the same libraries and heap pages: their chunks are stored once).
        let last = self.dir.join("index").join(format!("last-{lineage}"));
        let prev_key = std::fs::read_to_string(&last).ok().map(|k| k.trim().to_owned()).filter(|k| k != key);
        let prev_meta: Option<Meta> = prev_key
            .as_ref()
            .and_then(|k| std::fs::read(self.index_path(k)).ok())
            .and_then(|b| serde_json::from_slice(&b).ok());
        let shared = prev_meta
            .and_then(|m| Digest::from_hex(&m.manifest).ok())
            .and_then(|d| flare_cas::get_manifest(store, &d).ok())
            .map_or(0, |prev| flare_cas::shared_bytes(&prev, &manifest));
        let (cpu_flags, kernel_release, criu_version) = match self.support() {
            Some(s) => (s.cpu_flags.clone(), s.criu.kernel_release().to_owned(), s.criu_version.clone()),
            None => Default::default(),
        };
        let meta = Meta {
            key: key.to_owned(),
            manifest: digest.hex(),
            pipes,
            dump_ms: rep.elapsed.as_millis() as u64,
            image_bytes: rep.image_bytes,
            shared_bytes: shared,
            cpu_flags,
            kernel_release,
            criu_version,
        };
        std::fs::write(dumped.join(".complete"), b"").map_err(io("mark the snapshot complete"))?;
        let cache = self.cache_path(key);
        std::fs::create_dir_all(self.dir.join("cache")).map_err(io("create the snapshot cache"))?;
        let _ = std::fs::remove_dir_all(&cache);
        std::fs::rename(dumped, &cache).map_err(io(format!("move the snapshot to {}", cache.display())))?;
        let body = serde_json::to_vec(&meta).map_err(|e| SnapError::Index(key.to_owned(), e.to_string()))?;
        self.write_index(key, &body)?;
        let _ = std::fs::write(&last, key);
        // The function's previous version is not restored again: forget it, keep at most
        // SNAPSHOTS_KEPT in all (least recently used go), and collect unshared blobs.
        if let Some(prev) = prev_key {
            self.discard(&prev);
        }
        self.retain(store);
        Ok(meta)
    }

    /// Keep the `SNAPSHOTS_KEPT` most recently used snapshots (ephemeral apps leave
    /// theirs behind) and delete blobs no kept snapshot references (after a grace period
    /// that protects snapshots being saved meanwhile).
    fn retain(&self, store: &LocalStore) {
        let mut used: Vec<(std::time::SystemTime, String)> = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.join("index")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(key) = name.strip_suffix(".json") else { continue };
                let mark = self.cache_path(key).join(".complete");
                let t = std::fs::metadata(&mark).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                used.push((t, key.to_owned()));
            }
        }
        used.sort();
        let excess = used.len().saturating_sub(SNAPSHOTS_KEPT);
        for (_, key) in used.drain(..excess) {
            tracing::info!(%key, "snapshot dropped (least recently used)");
            self.discard(&key);
        }
        let roots: Vec<Digest> = used
            .iter()
            .filter_map(|(_, k)| std::fs::read(self.index_path(k)).ok())
            .filter_map(|b| serde_json::from_slice::<Meta>(&b).ok())
            .filter_map(|m| Digest::from_hex(&m.manifest).ok())
            .collect();
        match flare_cas::gc(store, &roots, Duration::from_secs(600)) {
            Ok(r) => {
                tracing::debug!(deleted = r.deleted, bytes = r.deleted_bytes, "snapshot blobs collected")
            }
            Err(e) => tracing::warn!(error = %e, "snapshot blob collection failed"),
        }
    }

    /// Mark `key` as just used (its cache's `.complete` mtime orders [`Self::retain`]).
    pub fn touch(&self, key: &str) {
        let mark = self.cache_path(key).join(".complete");
        let _ = std::fs::File::options()
            .write(true)
            .open(&mark)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    }

    /// Restore options for `images` into a runtime-prepared target.
    fn restore_opts<'a>(
        &self,
        lazy: bool,
        meta: &Meta,
        work: &Path,
        target: &flare_runtime::RestoreTarget<'_>,
        staged: Vec<(String, PathBuf)>,
        inherit: Vec<(std::os::fd::BorrowedFd<'a>, String)>,
    ) -> RestoreOpts<'a> {
        RestoreOpts {
            work_dir: Some(work.to_path_buf()),
            root: Some(target.root.to_path_buf()),
            external_mounts: staged,
            auto_external_mounts: true,
            inherit_fds: inherit,
            manage_cgroups: Some(CgroupMode::Ignore),
            join_cgroups: target.cgroup_procs.clone(),
            restore_sibling: true,
            lazy_pages: lazy,
            // A restore reads the images once: 10 s plus 64 MiB/s is far beyond a healthy
            // one, and a stuck one must not hold a cold start for long.
            timeout: Duration::from_secs(10 + meta.image_bytes / (64 << 20)),
            ..Default::default()
        }
    }

    /// Restores `images` into a new container of `spec` (blocking). `fds` are the new
    /// container's stdout, stderr, frames-out and frames-in pipe ends, handed in for the
    /// checkpoint's `pipes`. The new container's private binds (its own API socket among
    /// them, staged by the runtime: `RestoreTarget::binds`) are bound where the checkpoint
    /// had them.
    pub fn restore(
        &self,
        rt: &flare_runtime::Runtime,
        spec: &flare_runtime::CommandSpec,
        images: &Path,
        meta: &Meta,
        fds: [&std::os::fd::OwnedFd; 4],
    ) -> Result<(flare_runtime::Container, Duration), String> {
        use std::os::fd::AsFd;
        let s = self.support().ok_or("criu is unavailable")?;
        let t0 = Instant::now();
        let work = self.tmp_dir(&format!("restore-{}", spec.id)).map_err(|e| e.to_string())?;
        let pipes = meta.pipes;
        let inherit = vec![
            (fds[0].as_fd(), format!("pipe:[{}]", pipes.stdout)),
            (fds[1].as_fd(), format!("pipe:[{}]", pipes.stderr)),
            (fds[2].as_fd(), format!("pipe:[{}]", pipes.frames_out)),
            (fds[3].as_fd(), format!("pipe:[{}]", pipes.frames_in)),
        ];
        let upper = images.join(UPPER_DIR);
        let upper = upper.is_dir().then_some(upper.as_path());
        let lazy = s.lazy && meta.image_bytes >= LAZY_MIN_BYTES;
        let mut daemon = None;
        let r = rt.restore(spec, upper, |t| {
            let staged = t.binds.iter().map(|(dst, at)| (mount_name(dst), at.clone())).collect();
            let opts = self.restore_opts(lazy, meta, &work, t, staged, inherit);
            s.criu.restore(images, &opts).map(|r| {
                let pid = r.pid;
                daemon = Some(r);
                pid
            })
        });
        match daemon {
            // The lazy-pages daemon serves the rest of the memory (and pushes it in the
            // background), then exits; its socket lives in the work dir until then.
            Some(mut d) if d.lazy_daemon.is_some() && r.is_ok() => {
                let work = work.clone();
                std::thread::spawn(move || {
                    let _ = d.wait_lazy_done(Duration::from_secs(3600));
                    drop(d);
                    let _ = std::fs::remove_dir_all(&work);
                });
            }
            _ => {
                let _ = std::fs::remove_dir_all(&work);
            }
        }
        r.map(|c| (c, t0.elapsed())).map_err(|e| e.to_string())
    }
}

/// The inode of an open file (a pipe's, for `--inherit-fd`).
pub(crate) fn inode(fd: &impl std::os::fd::AsRawFd) -> u64 {
    // SAFETY: fstat on an open fd into a zeroed stat buffer; failure leaves st_ino 0.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd.as_raw_fd(), &mut st);
        st.st_ino
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &str) -> Meta {
        Meta {
            key: key.into(),
            manifest: String::new(),
            pipes: PipeInodes::default(),
            dump_ms: 0,
            image_bytes: 0,
            shared_bytes: 0,
            cpu_flags: vec!["fpu".into(), "sse2".into()],
            kernel_release: "6.18.0".into(),
            criu_version: "4.1".into(),
        }
    }

    fn host<'a>(flags: &'a [String], kernel: &'a str, criu: &'a str) -> HostKey<'a> {
        HostKey { cpu_flags: flags, kernel_release: kernel, criu_version: criu }
    }

    #[test]
    fn a_snapshot_restores_on_a_host_with_at_least_its_cpu_features() {
        let m = meta("k");
        let same: Vec<String> = vec!["fpu".into(), "sse2".into()];
        let more: Vec<String> = vec!["avx2".into(), "fpu".into(), "sse2".into()];
        let less: Vec<String> = vec!["fpu".into()];
        assert_eq!(compatible(&m, &host(&same, "6.18.0", "4.1")), Ok(()));
        assert_eq!(compatible(&m, &host(&more, "6.18.0", "4.1")), Ok(()));
        let why = compatible(&m, &host(&less, "6.18.0", "4.1")).unwrap_err();
        assert!(why.contains("lacks (sse2)"), "{why}");
        assert!(compatible(&m, &host(&same, "6.19.0", "4.1")).unwrap_err().contains("kernel 6.18.0"));
        assert!(compatible(&m, &host(&same, "6.18.0", "4.2")).unwrap_err().contains("CRIU 4.1"));
    }

    #[test]
    fn off_unless_asked() {
        let p = decide(false, Err("no criu"), |_| unreachable!(), |_| unreachable!());
        assert_eq!(p, Plan::Off);
    }

    #[test]
    fn unavailable_says_why() {
        let p = decide(true, Err("criu 3.17 fails criu check"), |_| unreachable!(), |_| unreachable!());
        assert_eq!(p, Plan::Unavailable("criu 3.17 fails criu check".into()));
    }

    #[test]
    fn stored_snapshot_is_restored_before_anything_else() {
        let p = decide(true, Ok("k".into()), |k| Ok(Some((PathBuf::from("/c").join(k), meta(k)))), |_| true);
        assert_eq!(p, Plan::Restore { key: "k".into(), images: "/c/k".into(), meta: meta("k") });
    }

    #[test]
    fn one_creator_at_a_time() {
        assert_eq!(decide(true, Ok("k".into()), |_| Ok(None), |_| true), Plan::Busy);
        assert_eq!(
            decide(true, Ok("k".into()), |_| Ok(None), |_| false),
            Plan::Create { key: "k".into(), dropped: None }
        );
    }

    #[test]
    fn an_unreadable_snapshot_is_made_again_saying_why() {
        let p = decide(true, Ok("k".into()), |_| Err("digest mismatch".into()), |_| false);
        assert_eq!(p, Plan::Create { key: "k".into(), dropped: Some("digest mismatch".into()) });
    }

    fn assignment(app: &str, pickled: &[u8]) -> ContainerAssignment {
        ContainerAssignment {
            container_id: "ct-1".into(),
            app_id: app.into(),
            app_name: "a".into(),
            function_id: "fu-1".into(),
            def: flare_proto::FunctionDef {
                name: "f".into(),
                pickled: Some(flare_proto::B64(bytes::Bytes::copy_from_slice(pickled))),
                ..serde_json::from_str(r#"{"name":"f","python":{"executable":"/usr/bin/python3"}}"#).unwrap()
            },
        }
    }

    #[test]
    fn keys_differ_by_app_code_cpu_kernel_and_criu() {
        let flags = vec!["sse4_2".to_string(), "avx2".to_string()];
        let host = HostKey { cpu_flags: &flags, kernel_release: "6.18", criu_version: "4.1.1" };
        let base = key_of(&assignment("ap-1", b"v1"), &host);
        // Same inputs, same key; the container id does not matter.
        let mut other_ct = assignment("ap-1", b"v1");
        other_ct.container_id = "ct-2".into();
        assert_eq!(key_of(&other_ct, &host), base);
        assert_ne!(key_of(&assignment("ap-2", b"v1"), &host), base, "never shared across apps");
        assert_ne!(key_of(&assignment("ap-1", b"v2"), &host), base, "a new version");
        let fewer = vec!["sse4_2".to_string()];
        let cpu = HostKey { cpu_flags: &fewer, ..host.clone() };
        assert_ne!(key_of(&assignment("ap-1", b"v1"), &cpu), base, "another CPU-feature set");
        let kernel = HostKey { kernel_release: "6.19", ..host.clone() };
        assert_ne!(key_of(&assignment("ap-1", b"v1"), &kernel), base);
        let criu = HostKey { criu_version: "4.2", ..host.clone() };
        assert_ne!(key_of(&assignment("ap-1", b"v1"), &criu), base);
    }

    #[test]
    fn only_the_most_recently_used_snapshots_are_kept() {
        let dir = std::env::temp_dir().join(format!("flare-snap-retain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let snaps = Snapshots::open(&dir, None);
        let store = snaps.store.as_ref().unwrap();
        std::fs::create_dir_all(dir.join("index")).unwrap();
        let n = SNAPSHOTS_KEPT + 2;
        for i in 0..n {
            let key = format!("k{i:02}");
            let mut m = flare_cas::Manifest::new();
            m.insert(&format!("f{i}"), flare_cas::Entry::dir(0o755)).unwrap();
            let digest = flare_cas::put_manifest(store, &m).unwrap();
            let meta = Meta { manifest: digest.hex(), ..meta(&key) };
            std::fs::write(snaps.index_path(&key), serde_json::to_vec(&meta).unwrap()).unwrap();
            let cache = snaps.cache_path(&key);
            std::fs::create_dir_all(&cache).unwrap();
            let mark = std::fs::File::create(cache.join(".complete")).unwrap();
            // k00 is the oldest use, k17 the newest; k00 is then restored again.
            mark.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000 + i as u64)).unwrap();
        }
        snaps.touch("k00");
        snaps.retain(store);
        let left: Vec<bool> = (0..n).map(|i| snaps.index_path(&format!("k{i:02}")).exists()).collect();
        assert!(left[0], "restored just now: kept");
        assert!(!left[1] && !left[2], "the two least recently used are dropped");
        assert!(left[3..].iter().all(|&k| k));
        assert!(!snaps.cache_path("k01").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The control plane: apps, functions, calls, input queues, the autoscaler, and the
//! public HTTP API (see [`http`]).
//!
//! All live state sits in one `State` (`state/`) behind a mutex; every handler holds it
//! only for short, non-blocking sections, and store writes leave it through `persist`.
//! Workers are reached through channels carrying [`flare_proto::ToWorker`] messages and
//! answer with [`flare_proto::FromWorker`].
//!
//! This file is the wiring: configuration, construction, the public types. The rest:
//! `apps`, `calls`, `workers`, `mounts`, `logs` (operations behind the API), `dispatch`
//! and `autoscale` (with the pure `scheduler`), `events` and `faults` (worker events and
//! the decisions on them), `jobs` (periodic jobs), `persist` (write-behind), `retention`
//! (what stays in memory), [`http`] (the route table and its routers), [`services`].

mod apps;
mod autoscale;
mod calls;
mod dispatch;
mod events;
mod faults;
pub mod grpc;
pub mod http;
mod jobs;
mod logs;
mod mounts;
mod persist;
mod retention;
pub mod scheduler;
mod secret;
pub mod services;
mod state;
mod workers;

pub use state::{AppState, ContainerEvent};

/// The HTTP API under its earlier name.
pub use http as api;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flare_api::ApiError;
use flare_proto::ToWorker;
use flare_store::{LogRow, Store};
use tokio::sync::{mpsc, watch};

use crate::logs::log_writer;
use crate::persist::Persist;
use crate::state::State;

// The tests name the log ring's byte bound from the crate root.
#[cfg(test)]
use crate::logs::LOG_RING_BYTES;

/// A remote worker with no heartbeat for this long is treated as dead.
pub const WORKER_TIMEOUT: Duration = Duration::from_secs(6);
/// Default of [`ControlConfig::call_window`].
pub const DEFAULT_CALL_WINDOW: u64 = 20_000;
/// Default of [`ControlConfig::call_retention`] (days).
pub const DEFAULT_CALL_RETENTION_DAYS: f64 = 7.0;
/// A submitter waiting for room (back-pressure) is answered after this long at most.
pub const BACKPRESSURE_WAIT: Duration = Duration::from_secs(10);

/// Operator settings of the control plane (`flared server` / `flared control` flags).
#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// Memory limit (MiB) of containers whose function sets no `memory=`; 0: no limit.
    pub default_memory_mb: u64,
    /// Log bytes kept per app in the store; the oldest records are deleted first.
    pub log_retention_bytes: u64,
    /// Log records older than this are deleted from the store.
    pub log_retention_age: Duration,
    /// Log bytes per second a container may write, sustained (token bucket refill).
    pub log_rate_bytes: u64,
    /// Log bytes a container may write in one burst (token bucket size).
    pub log_burst_bytes: u64,
    /// Request bodies held in memory at once, all requests together.
    pub body_budget_bytes: usize,
    /// A spawned call and its results are deleted from the store this long after it
    /// finished.
    pub call_retention: Duration,
    /// Inputs of a call whose caller reads its outputs (`.map`) that may be accepted but not
    /// yet consumed (queued, running, or with an output not read yet); a submitter past it
    /// waits (back-pressure).
    pub call_window: u64,
    /// The token remote workers join with; the routes only workers may call (the shared
    /// snapshot index) take it as a bearer token. `None`: no remote workers, and those
    /// routes refuse every request.
    pub worker_token: Option<String>,
    /// Where web endpoints are served.
    pub web: services::ingress::WebSettings,
    /// How long an ephemeral Dict or Queue lives without a heartbeat from its client
    /// (see [`services::leases`]).
    pub ephemeral_ttl: Duration,
}

/// Default memory limit of containers without `memory=` (MiB).
pub const DEFAULT_MEMORY_LIMIT_MB: u64 = 2048;

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            default_memory_mb: DEFAULT_MEMORY_LIMIT_MB,
            log_retention_bytes: 64 << 20,
            log_retention_age: Duration::from_secs(7 * 24 * 3600),
            log_rate_bytes: 1 << 20,
            log_burst_bytes: 8 << 20,
            body_budget_bytes: 512 << 20,
            call_retention: Duration::from_secs_f64(DEFAULT_CALL_RETENTION_DAYS * 86400.0),
            call_window: DEFAULT_CALL_WINDOW,
            worker_token: None,
            web: services::ingress::WebSettings::default(),
            ephemeral_ttl: services::leases::TTL,
        }
    }
}

/// Who makes an API request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A client of the public API (tokens come with access control).
    Client,
    /// Code in a container of `app_id`, through its worker's API socket.
    Container { container_id: String, app_id: String },
}

pub fn now_ts() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

pub fn new_id(prefix: &str) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let n: u128 = rng.gen();
    format!("{prefix}-{}", &format!("{n:032x}")[..20])
}

/// A worker as the control plane sees it.
pub struct WorkerLink {
    pub id: String,
    pub tx: mpsc::UnboundedSender<ToWorker>,
    pub cpu_millis: u64,
    pub memory_mb: u64,
    /// GPUs by type (upper-case) and count.
    pub gpus: BTreeMap<String, u32>,
    /// Identifies this connection of the worker; events of older sessions are ignored.
    pub session: String,
    /// In-process workers share the server's fate and need no heartbeats.
    pub remote: bool,
    /// Where the worker connects from, for display.
    pub address: String,
    /// How the ingress reaches this worker's containers' web endpoints (`None`: it cannot).
    pub web: Option<Arc<dyn services::ingress::WebDialer>>,
}

impl WorkerLink {
    /// An in-process worker (the embedded server's).
    pub fn local(id: &str, tx: mpsc::UnboundedSender<ToWorker>, cpu_millis: u64, memory_mb: u64) -> Self {
        WorkerLink {
            id: id.to_string(),
            tx,
            cpu_millis,
            memory_mb,
            gpus: BTreeMap::new(),
            session: "local".into(),
            remote: false,
            address: "in-process".into(),
            web: None,
        }
    }
}

/// What [`ControlPlane::try_add_inputs`] answers: the first index and count of the
/// inputs taken, or the inputs back with why there is no room yet.
pub type Admitted = Result<(u64, u64), (Vec<Bytes>, NoRoom)>;

/// Inputs a call could not take yet: the caller has not read enough outputs.
pub struct NoRoom {
    /// Changes when there may be room.
    pub room: watch::Receiver<u64>,
    /// Inputs accepted and not consumed, and the window.
    pub unconsumed: u64,
    pub window: u64,
}

struct Inner {
    store: Arc<dyn Store>,
    /// The store's writes, committed in groups off the state lock.
    persist: Persist,
    home: PathBuf,
    state: Mutex<State>,
    server_id: String,
    started_at: f64,
    log_tx: mpsc::UnboundedSender<LogRow>,
    containers_changed: watch::Sender<u64>,
    images: std::sync::OnceLock<Arc<dyn ImageService>>,
    /// Request bodies in flight, in KiB (see [`ControlConfig::body_budget_bytes`]).
    body_budget: Arc<tokio::sync::Semaphore>,
    body_budget_kib: u32,
    /// Gives the allocator's free memory back to the system (installed by the binary).
    heap_trim: std::sync::OnceLock<fn()>,
    /// Tokens of endpoints with `requires_proxy_auth`.
    proxy_tokens: services::proxy_auth::Tokens,
    /// Striped locks of the dicts' read-then-write operations.
    dict_locks: services::named::Locks,
    /// Leases of ephemeral objects.
    leases: services::leases::Leases,
    /// The queues' locks and waiters.
    queues: services::queues::QueueState,
    /// Wakes the schedules' ticker to plan again.
    schedule_wake: tokio::sync::Notify,
    /// Striped locks of the volumes' commits (and create-or-get by name).
    volume_locks: services::named::Locks,
}

/// What the control plane needs from the image service (the `flare-image` crate).
pub trait ImageService: Send + Sync {
    /// Turn an image id from a build into what workers need to run on it.
    fn resolve(&self, image_id: &str) -> Result<flare_proto::ImageUse, ApiError>;
    /// The files of a content-addressed file list (code mounts sent as digests).
    fn mount_files(&self, entries: &serde_json::Value) -> Result<Vec<flare_api::MountFile>, ApiError>;
    /// The blob store the image routes serve (`GET /v1/blobs/{digest}`); shared memory
    /// snapshots keep their blobs there too.
    fn blob_store(&self) -> Arc<dyn flare_cas::BlobStore>;
    /// The stored content of a whole file uploaded by its digest (`PUT /v1/blobs/{digest}`
    /// keeps a large file as chunks). By default: the one blob of that digest.
    fn file_content(
        &self,
        digest: &flare_cas::Digest,
        size: u64,
    ) -> Result<flare_cas::FileContent, ApiError> {
        if size == 0 {
            return Ok(flare_cas::FileContent::default());
        }
        match self.blob_store().stat(digest) {
            Ok(Some(i)) if i.size == size => Ok(flare_cas::FileContent {
                size,
                chunks: vec![flare_cas::Chunk { digest: *digest, offset: 0, len: size }],
            }),
            Ok(_) => Err(ApiError::precondition(format!("file {digest} ({size} bytes) was not uploaded"))),
            Err(e) => Err(ApiError::internal(format!("reading the blob store: {e}"))),
        }
    }
}

/// Handle to the control plane; cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

type ApiResult<T> = Result<T, ApiError>;

fn store_err(e: flare_store::StoreError) -> ApiError {
    tracing::error!(error = %e, "store failure");
    ApiError::internal(format!("state store failure: {e}"))
}

impl ControlPlane {
    /// Opens the control plane on a store; loads deployed apps and re-queues persisted inputs.
    pub fn new(store: Arc<dyn Store>, home: &Path) -> Result<Self, ControlError> {
        Self::with_config(store, home, ControlConfig::default())
    }

    /// Opens the control plane with operator settings.
    pub fn with_config(
        store: Arc<dyn Store>,
        home: &Path,
        config: ControlConfig,
    ) -> Result<Self, ControlError> {
        let (log_tx, log_rx) = mpsc::unbounded_channel();
        let (containers_changed, _) = watch::channel(0);
        let body_budget_kib = (config.body_budget_bytes / 1024).clamp(1, u32::MAX as usize >> 1) as u32;
        let persist = Persist::start(store.clone()).map_err(ControlError::Writer)?;
        let inner = Arc::new(Inner {
            store,
            persist,
            home: home.to_path_buf(),
            state: Mutex::new(State { config: config.clone(), ..State::default() }),
            server_id: new_id("srv"),
            started_at: now_ts(),
            log_tx,
            containers_changed,
            images: std::sync::OnceLock::new(),
            body_budget: Arc::new(tokio::sync::Semaphore::new(body_budget_kib as usize)),
            body_budget_kib,
            heap_trim: std::sync::OnceLock::new(),
            proxy_tokens: services::proxy_auth::Tokens::open(home),
            dict_locks: services::named::Locks::default(),
            leases: services::leases::Leases::default(),
            queues: services::queues::QueueState::default(),
            schedule_wake: tokio::sync::Notify::new(),
            volume_locks: services::named::Locks::default(),
        });
        let cp = ControlPlane { inner };
        cp.load()?;
        tokio::spawn(log_writer(cp.inner.store.clone(), log_rx, config.clone()));
        jobs::spawn(&cp, &config);
        services::leases::spawn_sweeper(&cp, config.ephemeral_ttl);
        services::queues::spawn_expiry(&cp);
        services::schedules::spawn(&cp);
        Ok(cp)
    }

    /// The URLs of a function's web endpoints (see [`services::ingress`]).
    pub fn web_urls(&self, fid: &str) -> (Option<String>, BTreeMap<String, String>) {
        services::ingress::urls_of(&self.lock(), fid)
    }

    /// The proxy auth tokens.
    pub(crate) fn proxy_tokens(&self) -> &services::proxy_auth::Tokens {
        &self.inner.proxy_tokens
    }

    /// The dicts' locks.
    pub(crate) fn dict_locks(&self) -> &services::named::Locks {
        &self.inner.dict_locks
    }

    /// The leases of ephemeral objects.
    pub(crate) fn leases(&self) -> &services::leases::Leases {
        &self.inner.leases
    }

    /// The queues' locks and waiters.
    pub(crate) fn queues(&self) -> &services::queues::QueueState {
        &self.inner.queues
    }

    /// The volumes' locks.
    pub(crate) fn volume_locks(&self) -> &services::named::Locks {
        &self.inner.volume_locks
    }

    pub fn home(&self) -> &Path {
        &self.inner.home
    }

    /// The worker token (see [`ControlConfig::worker_token`]).
    pub(crate) fn worker_token(&self) -> Option<String> {
        self.lock().config.worker_token.clone()
    }

    /// The budget of request bodies in flight (KiB permits) and its size.
    pub(crate) fn body_budget(&self) -> (&Arc<tokio::sync::Semaphore>, u32) {
        (&self.inner.body_budget, self.inner.body_budget_kib)
    }

    /// Install the image service (once, at start); without one `image_id` is refused.
    pub fn set_image_service(&self, images: Arc<dyn ImageService>) {
        let _ = self.inner.images.set(images);
    }

    /// Install what gives freed heap memory back to the system (`flare_runtime::trim_heap`):
    /// called after the state of a big call or a stopped app left memory.
    pub fn set_heap_trim(&self, trim: fn()) {
        let _ = self.inner.heap_trim.set(trim);
    }

    pub fn image_service(&self) -> Option<&Arc<dyn ImageService>> {
        self.inner.images.get()
    }

    pub fn server_id(&self) -> &str {
        &self.inner.server_id
    }

    pub fn started_at(&self) -> f64 {
        self.inner.started_at
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn store(&self) -> &dyn Store {
        &*self.inner.store
    }

    pub(crate) fn persist(&self) -> &Persist {
        &self.inner.persist
    }

    /// Waits until every store write queued so far is committed (at shutdown, so that the
    /// last outputs are not lost).
    pub async fn flush(&self) {
        if let Err(e) = self.persist().ticket().wait().await {
            tracing::error!(error = %e.message, "store writes lost at shutdown");
        }
        let stats = self.persist().stats();
        tracing::info!(
            batches = stats.batches.load(std::sync::atomic::Ordering::Relaxed),
            writes = stats.writes.load(std::sync::atomic::Ordering::Relaxed),
            "store writes committed"
        );
    }

    pub fn mounts_dir(&self) -> PathBuf {
        self.inner.home.join("mounts")
    }
}

/// How an API call names an app.
pub enum AppRef<'a> {
    Id(&'a str),
    DeployedName(&'a str),
}

/// Errors opening the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("loading state: {0}")]
    Store(#[from] flare_store::StoreError),
    #[error("starting the store writer: {0}")]
    Writer(std::io::Error),
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod hardening_tests;

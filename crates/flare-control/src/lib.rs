//! The control plane: apps, functions, calls, input queues, the autoscaler, and the
//! public HTTP API (see `api`).
//!
//! All live state sits in one [`State`] behind a mutex; every handler holds it only
//! for short, non-blocking sections. Workers are reached through channels carrying
//! [`flare_proto::ToWorker`] messages and answer with [`flare_proto::FromWorker`].

pub mod api;
pub mod grpc;
mod retention;
pub mod scheduler;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flare_api::{ApiError, AppMode, CallKind, LogRecord, Output};
use flare_proto::{
    ContainerAssignment, ExceptionInfo, ExitReport, FromWorker, FunctionDef, GenMark, InputMsg, LogStream,
    OutputMsg, OutputStatus, ToWorker, B64,
};
use flare_store::{AppRow, CallRow, FunctionRow, LogRow, OutputRow, PendingInputRow, Store};
use tokio::sync::{mpsc, watch};

/// Containers of a function that may fail to start in a row before its queue fails.
const START_FAILURE_LIMIT: u32 = 3;
/// Inputs a platform fault may re-run before the input fails, beyond the user's retries.
const PLATFORM_RETRIES: u32 = 3;
/// Containers of one function starting at the same time.
const MAX_STARTING_PER_FUNCTION: u32 = 8;
/// Log records kept in memory per app (older ones are read from the store).
const LOG_RING: usize = 20_000;
/// A remote worker with no heartbeat for this long is treated as dead.
pub const WORKER_TIMEOUT: Duration = Duration::from_secs(6);
/// An ephemeral app with no heartbeat for this long is stopped.
const EPHEMERAL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often calls, stopped apps and their functions are checked for leaving memory.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Outputs freed since the last heap trim that make the next sweep trim the heap.
const TRIM_AFTER_OUTPUTS: u64 = 50_000;
/// How often spawned calls past their retention are deleted from the store.
const CALL_EXPIRY_EVERY: Duration = Duration::from_secs(600);
/// Default of [`ControlConfig::call_window`].
pub const DEFAULT_CALL_WINDOW: u64 = 20_000;
/// Default of [`ControlConfig::call_retention`] (days).
pub const DEFAULT_CALL_RETENTION_DAYS: f64 = 7.0;
/// A submitter waiting for room (back-pressure) is answered after this long at most.
pub const BACKPRESSURE_WAIT: Duration = Duration::from_secs(10);
/// Default reservation of a container without `cpu=` / `memory=`.
const DEFAULT_CPU_MILLIS: u64 = 125;
const DEFAULT_MEMORY_MB: u64 = 128;
/// Log bytes kept in memory per app (besides the [`LOG_RING`] record count).
const LOG_RING_BYTES: usize = 4 << 20;
/// A stopped app's in-memory logs are dropped this long after its last container exited
/// (they stay in the store).
const STOPPED_APP_LOG_KEEP: Duration = Duration::from_secs(60);
/// How often old logs are deleted from the store.
const LOG_EXPIRY_EVERY: Duration = Duration::from_secs(60);

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

/// Per-container token bucket for log output, and what it dropped.
struct LogBucket {
    tokens: f64,
    last: Instant,
    dropped_lines: u64,
    dropped_bytes: u64,
    last_drop: Instant,
}

impl LogBucket {
    fn new(burst: u64) -> Self {
        let now = Instant::now();
        LogBucket { tokens: burst as f64, last: now, dropped_lines: 0, dropped_bytes: 0, last_drop: now }
    }

    /// Takes `n` bytes' worth of tokens if there are enough.
    fn take(&mut self, n: usize, cfg: &ControlConfig) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * cfg.log_rate_bytes as f64;
        self.tokens = (self.tokens + refill).min(cfg.log_burst_bytes as f64);
        self.last = now;
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }

    /// The note about dropped output, once (then the counts start again).
    fn take_note(&mut self, cfg: &ControlConfig) -> Option<String> {
        if self.dropped_lines == 0 {
            return None;
        }
        let note = format!(
            "[flare] {} lines ({}) of this container's output were dropped: it wrote faster than the log rate limit ({}/s, bursts of {})",
            self.dropped_lines,
            flare_api::mib(self.dropped_bytes as usize),
            flare_api::mib(cfg.log_rate_bytes as usize),
            flare_api::mib(cfg.log_burst_bytes as usize),
        );
        self.dropped_lines = 0;
        self.dropped_bytes = 0;
        Some(note)
    }
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
        }
    }
}

struct WorkerRt {
    link: WorkerLink,
    cpu_used: u64,
    mem_used: u64,
    gpus_used: BTreeMap<String, u32>,
    accepting: bool,
    draining: bool,
    last_seen: Instant,
    joined_at: f64,
    /// Images (manifest digests) a container has started on here: their files are in
    /// this worker's chunk cache, so the scheduler prefers it for them.
    images: scheduler::ImageSet,
}

#[derive(Clone)]
struct QueuedInput {
    input_id: String,
    call_id: String,
    idx: u64,
    args: Bytes,
    /// User retries used so far.
    retry_count: u32,
    /// Platform re-runs used so far (worker or container died under it).
    platform_retries: u32,
}

struct AppRt {
    row: AppRow,
    functions: BTreeMap<String, String>,
    last_heartbeat: Instant,
    logs: VecDeque<LogRecord>,
    next_log_seq: u64,
    log_notify: watch::Sender<u64>,
    /// Bytes of the records in `logs`.
    log_bytes: usize,
    /// When the app was stopped with no container left (its in-memory logs go later).
    stopped_idle_since: Option<Instant>,
}

struct FnRt {
    id: String,
    app_id: String,
    name: String,
    def: FunctionDef,
    version: u64,
    queue: VecDeque<QueuedInput>,
    delayed: Vec<(Instant, QueuedInput)>,
    containers: HashSet<String>,
    active: bool,
    /// Why the function's next container cannot be placed, while it cannot.
    waiting: Option<String>,
    /// Containers that died before becoming ready, in a row.
    start_failures: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CState {
    Starting,
    Ready,
    Stopping,
}

impl CState {
    fn as_str(self) -> &'static str {
        match self {
            CState::Starting => "starting",
            CState::Ready => "ready",
            CState::Stopping => "stopping",
        }
    }
}

struct ContainerRt {
    id: String,
    function_id: String,
    app_id: String,
    worker_id: String,
    fn_version: u64,
    state: CState,
    inflight: HashMap<String, QueuedInput>,
    started_at: Instant,
    idle_since: Instant,
    cpu: u64,
    mem: u64,
    gpu: Option<flare_proto::GpuRequest>,
    /// Inputs killed with this container because the user asked (cancel): no output for them.
    cancelled: HashSet<String>,
    /// Memory limit (MiB) and core cap the worker was told to apply.
    memory_limit_mb: Option<u64>,
    cpu_limit: Option<f64>,
    logs: LogBucket,
}

struct CallRt {
    id: String,
    function_id: String,
    kind: CallKind,
    num_inputs: u64,
    more: bool,
    /// Outputs the caller has not read yet (see [`retention::OutputLog`]).
    outputs: retention::OutputLog,
    final_count: u64,
    notify: watch::Sender<u64>,
    created_at: f64,
    persisted: bool,
    finished: retention::FinishedSet,
    last_access: Instant,
    /// The app whose container made the call (None: a client outside containers).
    caller_app: Option<String>,
    /// When a page reaching the end of the done call was served.
    delivered_at: Option<Instant>,
    /// Someone reads the outputs as they come (`.map`), so back-pressure applies.
    read_by_caller: bool,
    /// Bumped when outputs are acknowledged or the call stops taking inputs (wakes a
    /// submitter waiting for room).
    room: watch::Sender<u64>,
}

impl CallRt {
    fn done(&self) -> bool {
        !self.more && self.final_count >= self.num_inputs
    }

    /// Inputs accepted whose final output the caller has not acknowledged.
    fn unconsumed(&self) -> u64 {
        self.num_inputs.saturating_sub(self.outputs.delivered_finals())
    }
}

/// Inputs a call could not take yet: the caller has not read enough outputs.
pub struct NoRoom {
    /// Changes when there may be room.
    pub room: watch::Receiver<u64>,
    /// Inputs accepted and not consumed, and the window.
    pub unconsumed: u64,
    pub window: u64,
}

#[derive(Default)]
struct State {
    apps: HashMap<String, AppRt>,
    functions: HashMap<String, FnRt>,
    calls: HashMap<String, CallRt>,
    containers: HashMap<String, ContainerRt>,
    workers: Vec<WorkerRt>,
    config: ControlConfig,
    /// Outputs dropped (read by their caller, or their call left memory) since the heap
    /// was last trimmed.
    freed_outputs: u64,
    last_sweep: Option<Instant>,
}

struct Inner {
    store: Arc<dyn Store>,
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
}

/// What the control plane needs from the image service (the `flare-image` crate).
pub trait ImageService: Send + Sync {
    /// Turn an image id from a build into what workers need to run on it.
    fn resolve(&self, image_id: &str) -> Result<flare_proto::ImageUse, ApiError>;
    /// The files of a content-addressed file list (code mounts sent as digests).
    fn mount_files(&self, entries: &serde_json::Value) -> Result<Vec<flare_api::MountFile>, ApiError>;
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
        let inner = Arc::new(Inner {
            store,
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
        });
        let cp = ControlPlane { inner };
        cp.load()?;
        tokio::spawn(log_writer(cp.inner.store.clone(), log_rx, config.clone()));
        tokio::spawn(call_expiry(cp.inner.store.clone(), config.call_retention));
        tokio::spawn(log_expiry(cp.inner.store.clone(), config));
        let ticker = cp.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(100));
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                iv.tick().await;
                ticker.tick();
            }
        });
        Ok(cp)
    }

    pub fn home(&self) -> &Path {
        &self.inner.home
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

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store(&self) -> &dyn Store {
        &*self.inner.store
    }

    pub fn mounts_dir(&self) -> PathBuf {
        self.inner.home.join("mounts")
    }

    fn load(&self) -> Result<(), ControlError> {
        let store = self.store();
        let mut st = self.lock();
        // Every app that was not stopped comes back, ephemeral ones included: a client
        // that is still there (a `flare run` in the middle of a `.map`) heartbeats again
        // and carries on; one that is gone lets the app time out like any lost client.
        for app in store.list_apps()? {
            if app.state == "stopped" {
                continue;
            }
            let mut functions = BTreeMap::new();
            for f in store.functions_of_app(&app.app_id)? {
                functions.insert(f.name.clone(), f.function_id.clone());
                st.functions.insert(
                    f.function_id.clone(),
                    FnRt {
                        id: f.function_id,
                        app_id: app.app_id.clone(),
                        name: f.name,
                        def: f.def,
                        version: 1,
                        queue: VecDeque::new(),
                        delayed: Vec::new(),
                        containers: HashSet::new(),
                        active: true,
                        waiting: None,
                        start_failures: 0,
                    },
                );
            }
            let next_log_seq = store.max_log_seq(&app.app_id)?.map(|s| s + 1).unwrap_or(0);
            st.apps.insert(
                app.app_id.clone(),
                AppRt {
                    row: app,
                    functions,
                    last_heartbeat: Instant::now(),
                    logs: VecDeque::new(),
                    next_log_seq,
                    log_notify: watch::channel(0).0,
                    log_bytes: 0,
                    stopped_idle_since: None,
                },
            );
        }
        // Accepted inputs with no final output yet run again (durability of spawned calls).
        let pending = store.pending_inputs()?;
        let mut requeued = 0;
        for p in pending {
            let call = store.get_call(&p.call_id)?;
            let Some(call) = call else { continue };
            if !st.calls.contains_key(&p.call_id) {
                let outputs = store
                    .outputs_after(&p.call_id, -1, usize::MAX >> 1)?
                    .into_iter()
                    .map(output_from_row)
                    .collect::<Vec<_>>();
                let final_count = store.count_final_outputs(&p.call_id)?;
                st.calls.insert(p.call_id.clone(), call_from_row(&call, outputs, final_count));
            }
            let qi = QueuedInput {
                input_id: p.input_id.clone(),
                call_id: p.call_id.clone(),
                idx: p.idx,
                args: Bytes::from(p.args),
                retry_count: p.retry_count,
                platform_retries: 0,
            };
            if let Some(f) = st.functions.get_mut(&p.function_id) {
                f.queue.push_back(qi);
                requeued += 1;
            } else {
                let out = platform_output(
                    &qi,
                    OutputStatus::Terminated,
                    ExceptionInfo::new(
                        "flare.exception.ExecutionError",
                        "the app of this call was stopped while the server was down",
                    ),
                );
                finish_input(&mut st, store, &qi, out);
            }
        }
        if requeued > 0 {
            tracing::info!(requeued, "persisted inputs re-queued");
        }
        Ok(())
    }

    /// Adds a worker; it receives containers from now on. A worker that registers again
    /// (a new session) first loses everything of its old session: those containers are
    /// fenced off (their late events are ignored) and their inputs run again elsewhere.
    pub fn add_worker(&self, link: WorkerLink) {
        let mut st = self.lock();
        let st = &mut *st;
        if st.workers.iter().any(|w| w.link.id == link.id) {
            self.worker_lost_locked(st, &link.id, "it registered again (new session)");
        }
        tracing::info!(
            worker = %link.id, session = %link.session, cpu_millis = link.cpu_millis,
            memory_mb = link.memory_mb, gpus = ?link.gpus, "worker registered"
        );
        st.workers.push(WorkerRt {
            link,
            cpu_used: 0,
            mem_used: 0,
            gpus_used: BTreeMap::new(),
            accepting: true,
            draining: false,
            images: Default::default(),
            last_seen: Instant::now(),
            joined_at: now_ts(),
        });
        let ids: Vec<String> = st.functions.keys().cloned().collect();
        for id in ids {
            schedule(st, &id);
        }
    }

    /// A heartbeat of a worker's session; `draining` stops new work from going there.
    pub fn worker_heartbeat(&self, worker_id: &str, session: &str, draining: bool) -> bool {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(w) = st.workers.iter_mut().find(|w| w.link.id == worker_id && w.link.session == session)
        else {
            return false;
        };
        w.last_seen = Instant::now();
        if draining && !w.draining {
            tracing::info!(worker = %worker_id, "worker draining: no new containers or inputs");
            w.draining = true;
            w.accepting = false;
            let idle: Vec<String> = st
                .containers
                .values()
                .filter(|c| c.worker_id == worker_id && c.inflight.is_empty())
                .map(|c| c.id.clone())
                .collect();
            for cid in idle {
                stop_container(st, &cid, true);
            }
            let fids: Vec<String> = st.functions.keys().cloned().collect();
            for fid in fids {
                schedule(st, &fid);
            }
        }
        true
    }

    /// An event from a worker's session; dropped if that session is no longer current or
    /// the container is not (or no longer) that worker's.
    pub fn worker_event(&self, worker_id: &str, session: &str, ev: FromWorker) {
        {
            let mut st = self.lock();
            let Some(w) = st.workers.iter_mut().find(|w| w.link.id == worker_id) else { return };
            if w.link.session != session {
                return;
            }
            w.last_seen = Instant::now();
            let cid = match &ev {
                FromWorker::Ready { container_id }
                | FromWorker::InitFailed { container_id, .. }
                | FromWorker::Outputs { container_id, .. }
                | FromWorker::Log { container_id, .. }
                | FromWorker::Exited { container_id, .. } => container_id,
            };
            if st.containers.get(cid).is_some_and(|c| c.worker_id != worker_id) {
                return;
            }
        }
        self.on_worker_event(ev);
    }

    /// A worker's session ended or timed out: its containers are gone; inputs they were
    /// running go back to the front of their queues without using the user's retries.
    pub fn worker_disconnected(&self, worker_id: &str, session: &str, why: &str) {
        let mut st = self.lock();
        let st = &mut *st;
        if st.workers.iter().any(|w| w.link.id == worker_id && w.link.session == session) {
            self.worker_lost_locked(st, worker_id, why);
        }
    }

    fn worker_lost_locked(&self, st: &mut State, worker_id: &str, why: &str) {
        let Some(pos) = st.workers.iter().position(|w| w.link.id == worker_id) else { return };
        let w = st.workers.remove(pos);
        let cids: Vec<String> =
            st.containers.values().filter(|c| c.worker_id == worker_id).map(|c| c.id.clone()).collect();
        tracing::warn!(worker = %worker_id, containers = cids.len(), %why, "worker lost");
        let mut fids = HashSet::new();
        for cid in cids {
            let Some(c) = st.containers.remove(&cid) else { continue };
            fids.insert(c.function_id.clone());
            if let Some(f) = st.functions.get_mut(&c.function_id) {
                f.containers.remove(&cid);
            }
            for (input_id, qi) in c.inflight {
                if c.cancelled.contains(&input_id) {
                    continue;
                }
                if qi.platform_retries < PLATFORM_RETRIES {
                    let mut again = qi;
                    again.platform_retries += 1;
                    if let Some(f) = st.functions.get_mut(&c.function_id) {
                        f.queue.push_front(again);
                    }
                } else {
                    let exc = ExceptionInfo::new(
                        "flare.exception.ExecutionError",
                        format!(
                            "the input was lost with its worker {PLATFORM_RETRIES} times (last: worker {worker_id}: {why})"
                        ),
                    );
                    let out = platform_output(&qi, OutputStatus::InternalFailure, exc);
                    finish_input(st, self.store(), &qi, out);
                }
            }
        }
        drop(w);
        self.inner.containers_changed.send_modify(|v| *v += 1);
        let all: Vec<String> = st.functions.keys().cloned().collect();
        for fid in all {
            schedule(st, &fid);
        }
    }

    /// Ends every remote worker's session (control-plane shutdown): their streams close,
    /// so the HTTP server can finish, and the workers reconnect to the next instance.
    pub fn disconnect_remote_workers(&self, why: &str) {
        let mut st = self.lock();
        let st = &mut *st;
        let remote: Vec<String> =
            st.workers.iter().filter(|w| w.link.remote).map(|w| w.link.id.clone()).collect();
        for id in remote {
            self.worker_lost_locked(st, &id, why);
        }
    }

    /// Workers as the API shows them.
    pub fn list_workers(&self) -> Vec<flare_api::WorkerInfo> {
        let st = self.lock();
        st.workers
            .iter()
            .map(|w| flare_api::WorkerInfo {
                worker_id: w.link.id.clone(),
                address: w.link.address.clone(),
                state: if w.draining { "draining".into() } else { "ready".into() },
                cpu_millis: w.link.cpu_millis,
                cpu_millis_used: w.cpu_used,
                memory_mb: w.link.memory_mb,
                memory_mb_used: w.mem_used,
                gpus: w.link.gpus.clone(),
                gpus_used: w.gpus_used.clone(),
                containers: st.containers.values().filter(|c| c.worker_id == w.link.id).count() as u32,
                joined_at: w.joined_at,
            })
            .collect()
    }

    /// Feeds worker events into the state; run this on the worker's event stream.
    pub async fn run_worker_events(self, mut rx: mpsc::UnboundedReceiver<FromWorker>) {
        while let Some(ev) = rx.recv().await {
            self.on_worker_event(ev);
        }
    }

    fn on_worker_event(&self, ev: FromWorker) {
        let mut st = self.lock();
        let st = &mut *st;
        match ev {
            FromWorker::Ready { container_id } => {
                let Some(c) = st.containers.get_mut(&container_id) else { return };
                if c.state == CState::Starting {
                    c.state = CState::Ready;
                    c.idle_since = Instant::now();
                }
                let fid = c.function_id.clone();
                let wid = c.worker_id.clone();
                if let Some(f) = st.functions.get_mut(&fid) {
                    f.start_failures = 0;
                    if let Some(img) = &f.def.image {
                        if let Some(w) = st.workers.iter_mut().find(|w| w.link.id == wid) {
                            w.images.insert(&img.manifest);
                        }
                    }
                }
                tracing::debug!(container = %container_id, ms = c.started_at.elapsed().as_millis() as u64, "container ready");
                schedule(st, &fid);
            }
            FromWorker::InitFailed { container_id, exception } => {
                let Some(c) = st.containers.get_mut(&container_id) else { return };
                c.state = CState::Stopping;
                let fid = c.function_id.clone();
                let app_id = c.app_id.clone();
                push_log(
                    st,
                    &self.inner.log_tx,
                    &app_id,
                    &container_id,
                    LogStream::System,
                    &format!(
                        "container failed to start: {}: {}\n{}",
                        exception.type_name, exception.message, exception.traceback
                    ),
                );
                fail_queue(st, self.store(), &fid, OutputStatus::InitFailure, &exception);
            }
            FromWorker::Outputs { container_id, outputs } => {
                self.on_outputs(st, &container_id, outputs);
            }
            FromWorker::Log { container_id, stream, data } => {
                let Some(c) = st.containers.get_mut(&container_id) else { return };
                let app_id = c.app_id.clone();
                if stream != LogStream::System && !c.logs.take(data.len(), &st.config) {
                    // A flood: dropped here, with a note once the container is within its rate.
                    c.logs.dropped_lines += data.lines().count().max(1) as u64;
                    c.logs.dropped_bytes += data.len() as u64;
                    c.logs.last_drop = Instant::now();
                    return;
                }
                if let Some(note) = c.logs.take_note(&st.config) {
                    push_log(st, &self.inner.log_tx, &app_id, &container_id, LogStream::System, &note);
                }
                push_log(st, &self.inner.log_tx, &app_id, &container_id, stream, &data);
            }
            FromWorker::Exited { container_id, report } => {
                self.on_exit(st, &container_id, report);
                self.inner.containers_changed.send_modify(|v| *v += 1);
            }
        }
    }

    fn on_outputs(&self, st: &mut State, container_id: &str, outputs: Vec<OutputMsg>) {
        let Some(c) = st.containers.get_mut(container_id) else { return };
        let fid = c.function_id.clone();
        let mut finals = Vec::new();
        let mut items = Vec::new();
        for mut o in outputs {
            if o.data.len() > flare_api::MAX_RESULT_BYTES {
                // The runner refuses such results itself; this holds for any container.
                let what = if o.status == OutputStatus::Success { "result" } else { "exception" };
                o.exception = Some(ExceptionInfo::new(
                    "flare.exception.PayloadTooLargeError",
                    format!(
                        "the function's {what} is {}, over the limit of {} per output",
                        flare_api::mib(o.data.len()),
                        flare_api::mib(flare_api::MAX_RESULT_BYTES)
                    ),
                ));
                o.status = OutputStatus::Failure;
                o.data = Bytes::new();
                if o.gen == Some(GenMark::Item) {
                    o.gen = Some(GenMark::Done);
                }
            }
            if o.gen == Some(GenMark::Item) {
                if let Some(qi) = c.inflight.get(&o.input_id) {
                    items.push((qi.clone(), o));
                }
            } else if let Some(qi) = c.inflight.remove(&o.input_id) {
                finals.push((qi, o));
            }
        }
        if c.inflight.is_empty() {
            c.idle_since = Instant::now();
        }
        for (qi, o) in items {
            let out = Output {
                idx: qi.idx,
                seq: 0,
                input_id: qi.input_id.clone(),
                status: o.status,
                data: Some(B64(o.data)),
                gen: o.gen,
                exception: o.exception,
                retry_count: qi.retry_count,
            };
            append_output(st, self.store(), &qi.call_id, out, false);
        }
        for (qi, o) in finals {
            let too_large =
                o.exception.as_ref().is_some_and(|e| e.type_name == "flare.exception.PayloadTooLargeError");
            if o.status == OutputStatus::Failure && !too_large && self.maybe_retry(st, &fid, &qi) {
                continue;
            }
            let out = Output {
                idx: qi.idx,
                seq: 0,
                input_id: qi.input_id.clone(),
                status: o.status,
                data: if o.data.is_empty() { None } else { Some(B64(o.data)) },
                gen: o.gen,
                exception: o.exception,
                retry_count: qi.retry_count,
            };
            finish_input(st, self.store(), &qi, out);
        }
        schedule(st, &fid);
    }

    /// Re-queues a failed input if the function's retry policy allows; true if it did.
    fn maybe_retry(&self, st: &mut State, fid: &str, qi: &QueuedInput) -> bool {
        let Some(f) = st.functions.get_mut(fid) else { return false };
        let Some(policy) = f.def.config.retries.clone() else { return false };
        if qi.retry_count >= policy.max_retries || !f.active {
            return false;
        }
        if !st.calls.contains_key(&qi.call_id) {
            return false;
        }
        let mut next = qi.clone();
        next.retry_count += 1;
        let delay = Duration::from_secs_f64(policy.delay(next.retry_count));
        tracing::info!(input = %qi.input_id, retry = next.retry_count, delay_ms = delay.as_millis() as u64, "retrying input");
        f.delayed.push((Instant::now() + delay, next));
        true
    }

    fn on_exit(&self, st: &mut State, container_id: &str, report: ExitReport) {
        let Some(mut c) = st.containers.remove(container_id) else { return };
        if let Some(note) = c.logs.take_note(&st.config) {
            push_log(st, &self.inner.log_tx, &c.app_id, container_id, LogStream::System, &note);
        }
        if let Some(w) = st.workers.iter_mut().find(|w| w.link.id == c.worker_id) {
            w.cpu_used = w.cpu_used.saturating_sub(c.cpu);
            w.mem_used = w.mem_used.saturating_sub(c.mem);
            if let Some(g) = &c.gpu {
                if let Some(used) = w.gpus_used.get_mut(&g.kind) {
                    *used = used.saturating_sub(g.count);
                }
            }
        }
        let fid = c.function_id.clone();
        if let Some(f) = st.functions.get_mut(&fid) {
            f.containers.remove(container_id);
        }
        tracing::debug!(container = %container_id, ?report, "container exited");
        let limit_text = report
            .memory_limit
            .map(|b| format!("{} MiB", b / (1024 * 1024)))
            .unwrap_or_else(|| "the machine's memory".into());
        // A container that dies before it is ready (without reporting an import error,
        // which fails the queue at once) may have hit a passing platform fault: the
        // function gets a few more tries, then its queue fails, so nothing loops.
        let start_failures = if c.state == CState::Starting && !report.requested {
            st.functions.get_mut(&fid).map(|f| {
                f.start_failures += 1;
                f.start_failures
            })
        } else {
            None
        };
        if let Some(n) = start_failures.filter(|n| *n < START_FAILURE_LIMIT && !report.oom_killed) {
            tracing::warn!(container = %container_id, failures = n, error = ?report.start_error, "container failed to start; trying again");
        } else if start_failures.is_some() {
            if let Some(f) = st.functions.get_mut(&fid) {
                f.start_failures = 0;
            }
            let msg = report.start_error.clone().unwrap_or_else(|| {
                if report.oom_killed {
                    format!("container ran out of memory (OOM) while starting: limit {limit_text}")
                } else {
                    format!("container exited before it was ready ({})", describe_exit(&report))
                }
            });
            let exc = ExceptionInfo::new("flare.exception.ExecutionError", msg);
            fail_queue(st, self.store(), &fid, OutputStatus::InitFailure, &exc);
        }
        for (input_id, qi) in c.inflight {
            if c.cancelled.contains(&input_id) {
                continue;
            }
            let (status, exc) = if report.timed_out_input.as_deref() == Some(input_id.as_str()) {
                let t = st.functions.get(&fid).map(|f| f.def.config.timeout).unwrap_or(0);
                (
                    OutputStatus::Timeout,
                    ExceptionInfo::new(
                        "flare.exception.FunctionTimeoutError",
                        format!("function timed out after {t} s (timeout={t}); its container was stopped"),
                    ),
                )
            } else if report.timed_out_input.is_some() || (report.requested && !report.oom_killed) {
                // Killed along with another input, or by a scale-down race: run again.
                if qi.platform_retries < PLATFORM_RETRIES {
                    let mut again = qi;
                    again.platform_retries += 1;
                    if let Some(f) = st.functions.get_mut(&fid) {
                        f.queue.push_front(again);
                    }
                    continue;
                }
                (
                    OutputStatus::Terminated,
                    ExceptionInfo::new("flare.exception.ExecutionError", "the container was stopped"),
                )
            } else if report.oom_killed {
                (
                    OutputStatus::Terminated,
                    ExceptionInfo::new(
                        "flare.exception.OutOfMemoryError",
                        format!(
                            "container was OOM-killed: out of memory (memory limit {limit_text}); raise memory= on the function"
                        ),
                    ),
                )
            } else {
                (
                    OutputStatus::Terminated,
                    ExceptionInfo::new(
                        "flare.exception.ExecutionError",
                        format!("the container running this input died ({})", describe_exit(&report)),
                    ),
                )
            };
            if self.maybe_retry(st, &fid, &qi) {
                continue;
            }
            let out = platform_output(&qi, status, exc);
            finish_input(st, self.store(), &qi, out);
        }
        schedule(st, &fid);
        // The freed capacity may be what another function's backlog is waiting for.
        let waiting: Vec<String> = st
            .functions
            .values()
            .filter(|f| f.id != fid && !f.queue.is_empty())
            .map(|f| f.id.clone())
            .collect();
        for other in waiting {
            schedule(st, &other);
        }
    }

    /// Periodic work: delayed retries, heartbeats, scale-down, warm floors, call eviction.
    fn tick(&self) {
        let mut st = self.lock();
        let st = &mut *st;
        let now = Instant::now();
        let fids: Vec<String> = st.functions.keys().cloned().collect();
        for fid in &fids {
            let f = st.functions.get_mut(fid).expect("listed");
            if !f.delayed.is_empty() {
                let (due, later): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut f.delayed).into_iter().partition(|(t, _)| *t <= now);
                f.delayed = later;
                for (_, qi) in due {
                    f.queue.push_back(qi);
                }
            }
            // Scale down idle containers above the floor.
            let min = f.def.config.min_containers as usize;
            let window = Duration::from_secs(f.def.config.scaledown_window);
            let idle: Vec<String> = f
                .containers
                .iter()
                .filter(|id| {
                    st.containers.get(*id).is_some_and(|c| {
                        c.state == CState::Ready
                            && c.inflight.is_empty()
                            && now.duration_since(c.idle_since) >= window
                    })
                })
                .cloned()
                .collect();
            let live = f
                .containers
                .iter()
                .filter(|id| st.containers.get(*id).is_some_and(|c| c.state != CState::Stopping))
                .count();
            let excess = if f.active { live.saturating_sub(min) } else { live };
            for id in idle.into_iter().take(excess) {
                stop_container(st, &id, true);
            }
            schedule(st, fid);
        }
        // Remote workers that stopped heartbeating are gone (a cut-off network looks like this).
        let silent: Vec<String> = st
            .workers
            .iter()
            .filter(|w| w.link.remote && now.duration_since(w.last_seen) > WORKER_TIMEOUT)
            .map(|w| w.link.id.clone())
            .collect();
        for wid in silent {
            self.worker_lost_locked(st, &wid, &format!("no heartbeat for {} s", WORKER_TIMEOUT.as_secs()));
        }
        // Draining workers: containers stop as soon as they are idle.
        let draining: Vec<String> =
            st.workers.iter().filter(|w| w.draining).map(|w| w.link.id.clone()).collect();
        if !draining.is_empty() {
            let idle: Vec<String> = st
                .containers
                .values()
                .filter(|c| {
                    draining.contains(&c.worker_id) && c.inflight.is_empty() && c.state != CState::Stopping
                })
                .map(|c| c.id.clone())
                .collect();
            for cid in idle {
                stop_container(st, &cid, true);
            }
        }
        // Ephemeral apps whose client went away.
        let dead: Vec<String> = st
            .apps
            .values()
            .filter(|a| {
                a.row.mode == "ephemeral"
                    && a.row.state == "running"
                    && now.duration_since(a.last_heartbeat) > EPHEMERAL_TIMEOUT
            })
            .map(|a| a.row.app_id.clone())
            .collect();
        for app_id in dead {
            tracing::info!(app = %app_id, "ephemeral app lost its client; stopping it");
            self.stop_app_locked(st, &app_id);
        }
        // Notes about dropped output of containers that have been quiet for a second.
        let cfg = st.config.clone();
        let notes: Vec<(String, String, String)> = st
            .containers
            .values_mut()
            .filter(|c| {
                c.logs.dropped_lines > 0 && now.duration_since(c.logs.last_drop) >= Duration::from_secs(1)
            })
            .filter_map(|c| c.logs.take_note(&cfg).map(|n| (c.app_id.clone(), c.id.clone(), n)))
            .collect();
        for (app_id, cid, note) in notes {
            push_log(st, &self.inner.log_tx, &app_id, &cid, LogStream::System, &note);
        }
        if st.last_sweep.is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY) {
            st.last_sweep = Some(now);
            if self.sweep(st, now) {
                if let Some(trim) = self.inner.heap_trim.get().copied() {
                    // Outside the state lock; the allocator's own lock is held briefly.
                    tokio::task::spawn_blocking(trim);
                }
            }
        }
    }

    /// Drops what is no longer live: calls (see [`retention::call_evictable`]), functions
    /// of stopped apps without containers, and stopped apps whose containers are gone (their
    /// logs are in the store). True if the heap should be trimmed now.
    fn sweep(&self, st: &mut State, now: Instant) -> bool {
        let stopped: HashSet<String> =
            st.apps.values().filter(|a| a.row.state == "stopped").map(|a| a.row.app_id.clone()).collect();
        let app_stopped = |st: &State, fid: &str| {
            st.functions.get(fid).is_none_or(|f| !f.active && stopped.contains(&f.app_id))
        };
        let evict: Vec<String> = st
            .calls
            .values()
            .filter(|c| {
                retention::call_evictable(
                    &retention::CallFacts {
                        done: c.done(),
                        persisted: c.persisted,
                        delivered_at: c.delivered_at,
                        last_access: c.last_access,
                        app_stopped: app_stopped(st, &c.function_id),
                    },
                    now,
                )
            })
            .map(|c| c.id.clone())
            .collect();
        for id in evict {
            if let Some(c) = st.calls.remove(&id) {
                st.freed_outputs += c.outputs.kept() as u64;
                c.room.send_modify(|v| *v += 1);
            }
        }
        // Functions of stopped apps, once their containers exited.
        let gone_fns: Vec<String> = st
            .functions
            .values()
            .filter(|f| !f.active && stopped.contains(&f.app_id) && f.containers.is_empty())
            .map(|f| f.id.clone())
            .collect();
        for fid in &gone_fns {
            st.functions.remove(fid);
        }
        // Stopped apps: their record and log ring, once the tail of the logs is stored.
        let busy: HashSet<&str> = st.containers.values().map(|c| c.app_id.as_str()).collect();
        let mut gone_apps = Vec::new();
        for a in st.apps.values_mut().filter(|a| a.row.state == "stopped") {
            if busy.contains(a.row.app_id.as_str()) {
                a.stopped_idle_since = None;
                continue;
            }
            let since = *a.stopped_idle_since.get_or_insert(now);
            let functions_left =
                a.functions.values().any(|fid| !gone_fns.contains(fid) && st.functions.contains_key(fid));
            if !functions_left && retention::stopped_app_evictable(0, since, STOPPED_APP_LOG_KEEP, now) {
                gone_apps.push(a.row.app_id.clone());
            }
        }
        let app_gone = !gone_apps.is_empty() || !gone_fns.is_empty();
        for id in gone_apps {
            if let Some(a) = st.apps.remove(&id) {
                tracing::debug!(app = %id, logs = a.logs.len(), "stopped app left memory");
            }
        }
        if st.freed_outputs >= TRIM_AFTER_OUTPUTS || app_gone && st.freed_outputs > 0 {
            st.freed_outputs = 0;
            return true;
        }
        false
    }

    // ----- operations used by the API -----

    pub fn create_app(&self, name: &str, mode: AppMode) -> ApiResult<(AppRow, bool)> {
        let mut st = self.lock();
        if mode == AppMode::Deployed {
            let existing = st
                .apps
                .values()
                .find(|a| a.row.name == name && a.row.mode == "deployed" && a.row.state != "stopped")
                .map(|a| a.row.app_id.clone());
            if let Some(id) = existing {
                let app = st.apps.get_mut(&id).expect("found");
                app.row.version += 1;
                app.row.state = "deployed".into();
                self.store().put_app(&app.row).map_err(store_err)?;
                return Ok((app.row.clone(), false));
            }
        }
        let row = AppRow {
            app_id: new_id("ap"),
            name: name.to_string(),
            mode: mode.as_str().to_string(),
            state: if mode == AppMode::Deployed { "deployed".into() } else { "running".into() },
            version: 1,
            created_at: now_ts(),
        };
        self.store().put_app(&row).map_err(store_err)?;
        st.apps.insert(
            row.app_id.clone(),
            AppRt {
                row: row.clone(),
                functions: BTreeMap::new(),
                last_heartbeat: Instant::now(),
                logs: VecDeque::new(),
                next_log_seq: 0,
                log_notify: watch::channel(0).0,
                log_bytes: 0,
                stopped_idle_since: None,
            },
        );
        Ok((row, true))
    }

    pub fn heartbeat(&self, app_id: &str) -> ApiResult<()> {
        let mut st = self.lock();
        let app =
            st.apps.get_mut(app_id).ok_or_else(|| ApiError::not_found(format!("app {app_id} not found")))?;
        if app.row.state == "stopped" {
            return Err(ApiError::precondition(format!("app {} ({app_id}) is stopped", app.row.name)));
        }
        app.last_heartbeat = Instant::now();
        Ok(())
    }

    fn running_app<'a>(st: &'a mut State, app_id: &str) -> ApiResult<&'a mut AppRt> {
        let app =
            st.apps.get_mut(app_id).ok_or_else(|| ApiError::not_found(format!("app {app_id} not found")))?;
        if app.row.state == "stopped" {
            return Err(ApiError::precondition(format!("app {} ({app_id}) is stopped", app.row.name)));
        }
        Ok(app)
    }

    pub fn register_functions(
        &self,
        app_id: &str,
        mut defs: Vec<FunctionDef>,
    ) -> ApiResult<Vec<(String, String)>> {
        for d in &mut defs {
            d.image = match &d.image_id {
                None => None,
                Some(id) => match self.inner.images.get() {
                    Some(images) => Some(images.resolve(id).map_err(|e| ApiError {
                        message: format!("function {:?}: {}", d.name, e.message),
                        ..e
                    })?),
                    None => return Err(ApiError::invalid("this server has no image support")),
                },
            };
            if let Some(m) = &d.mount_id {
                if !self.mounts_dir().join(m).is_dir() {
                    return Err(ApiError::invalid(format!("function {:?}: unknown mount {m}", d.name)));
                }
            }
        }
        let mut st = self.lock();
        let st = &mut *st;
        Self::running_app(st, app_id)?;
        let mut out = Vec::new();
        for def in defs {
            let existing = st.apps.get(app_id).and_then(|a| a.functions.get(&def.name)).cloned();
            let fid = existing.unwrap_or_else(|| new_id("fu"));
            let row = FunctionRow {
                function_id: fid.clone(),
                app_id: app_id.to_string(),
                name: def.name.clone(),
                def: def.clone(),
                created_at: now_ts(),
            };
            self.store().put_function(&row).map_err(store_err)?;
            match st.functions.get_mut(&fid) {
                Some(f) => {
                    f.def = def.clone();
                    f.version += 1;
                    f.active = true;
                    // Old-version containers drain: they take no new inputs and stop when idle.
                    let old: Vec<String> = f.containers.iter().cloned().collect();
                    for cid in old {
                        stop_container(st, &cid, true);
                    }
                }
                None => {
                    st.functions.insert(
                        fid.clone(),
                        FnRt {
                            id: fid.clone(),
                            app_id: app_id.to_string(),
                            name: def.name.clone(),
                            def: def.clone(),
                            version: 1,
                            queue: VecDeque::new(),
                            delayed: Vec::new(),
                            containers: HashSet::new(),
                            active: true,
                            waiting: None,
                            start_failures: 0,
                        },
                    );
                }
            }
            st.apps.get_mut(app_id).expect("checked").functions.insert(def.name.clone(), fid.clone());
            schedule(st, &fid);
            out.push((def.name, fid));
        }
        Ok(out)
    }

    /// Stores a mount's files under `home/mounts/<id>`; identical uploads share one id.
    pub fn create_mount(&self, files: Vec<flare_api::MountFile>) -> ApiResult<String> {
        use sha2::Digest;
        // The API checked the request as received; this is what gets written (a file list's
        // files included), checked again before anything of it is.
        flare_api::validate_file_list(
            files
                .iter()
                .map(|f| flare_api::ListEntry { path: &f.path, kind: flare_api::ListEntryKind::File }),
        )?;
        let mut sorted: Vec<&flare_api::MountFile> = files.iter().collect();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        let mut h = sha2::Sha256::new();
        for f in &sorted {
            h.update((f.path.len() as u64).to_le_bytes());
            h.update(f.path.as_bytes());
            h.update(f.mode.to_le_bytes());
            h.update((f.data.0.len() as u64).to_le_bytes());
            h.update(&f.data.0);
        }
        let id = format!("mo-{}", &hex::encode(h.finalize())[..32]);
        let dir = self.mounts_dir().join(&id);
        if dir.is_dir() {
            return Ok(id);
        }
        let tmp = self.mounts_dir().join(format!(".tmp-{}", new_id("m")));
        let write = || flare_api::write_mount_dir(&dir, &tmp, sorted.iter().copied());
        write().map_err(|e| ApiError::internal(format!("could not store mount: {e}")))?;
        self.store().put_mount(&id, now_ts()).map_err(store_err)?;
        Ok(id)
    }

    pub fn stop_app(&self, app_id: &str) -> ApiResult<watch::Receiver<u64>> {
        let mut st = self.lock();
        let st = &mut *st;
        if !st.apps.contains_key(app_id) {
            return Err(ApiError::not_found(format!("app {app_id} not found")));
        }
        let rx = self.inner.containers_changed.subscribe();
        self.stop_app_locked(st, app_id);
        Ok(rx)
    }

    /// Containers of an app that have not exited yet.
    pub fn app_containers(&self, app_id: &str) -> usize {
        self.lock().containers.values().filter(|c| c.app_id == app_id).count()
    }

    fn stop_app_locked(&self, st: &mut State, app_id: &str) {
        let Some(app) = st.apps.get_mut(app_id) else { return };
        app.row.state = "stopped".into();
        let _ = self.store().set_app_state(app_id, "stopped");
        let fids: Vec<String> = app.functions.values().cloned().collect();
        let exc = ExceptionInfo::new("flare.exception.ExecutionError", "the app was stopped");
        for fid in &fids {
            if let Some(f) = st.functions.get_mut(fid) {
                f.active = false;
            }
            // A submitter waiting for room learns that the app stopped.
            for c in st.calls.values().filter(|c| c.function_id == *fid) {
                c.room.send_modify(|v| *v += 1);
            }
            fail_queue(st, self.store(), fid, OutputStatus::Terminated, &exc);
            let cids: Vec<String> =
                st.functions.get(fid).map(|f| f.containers.iter().cloned().collect()).unwrap_or_default();
            for cid in cids {
                // Inputs still running fail now; the container is stopped.
                if let Some(c) = st.containers.get_mut(&cid) {
                    let inflight: Vec<QueuedInput> = c.inflight.values().cloned().collect();
                    c.cancelled.extend(inflight.iter().map(|q| q.input_id.clone()));
                    for qi in inflight {
                        let out = platform_output(&qi, OutputStatus::Terminated, exc.clone());
                        finish_input(st, self.store(), &qi, out);
                    }
                }
                stop_container(st, &cid, false);
            }
        }
    }

    pub fn list_apps(&self) -> ApiResult<Vec<flare_api::AppInfo>> {
        let rows = self.store().list_apps().map_err(store_err)?;
        let st = self.lock();
        Ok(rows
            .into_iter()
            .map(|row| {
                let row = st.apps.get(&row.app_id).map(|a| a.row.clone()).unwrap_or(row);
                app_info(&st, row)
            })
            .collect())
    }

    pub fn app_by_name(&self, name: &str) -> ApiResult<flare_api::AppInfo> {
        let st = self.lock();
        let found = st
            .apps
            .values()
            .filter(|a| a.row.name == name && a.row.mode == "deployed" && a.row.state != "stopped")
            .map(|a| a.row.clone())
            .next();
        match found {
            Some(row) => Ok(app_info(&st, row)),
            None => Err(ApiError::not_found(format!("no deployed app named {name:?}"))),
        }
    }

    /// Looks up a function of an app by id or by deployed-app name.
    pub fn function_info(&self, app: AppRef<'_>, name: &str) -> ApiResult<flare_api::FunctionInfo> {
        let st = self.lock();
        let app_rt = match app {
            AppRef::Id(id) => {
                st.apps.get(id).ok_or_else(|| ApiError::not_found(format!("app {id} not found")))?
            }
            AppRef::DeployedName(n) => st
                .apps
                .values()
                .find(|a| a.row.name == n && a.row.mode == "deployed" && a.row.state != "stopped")
                .ok_or_else(|| ApiError::not_found(format!("no deployed app named {n:?}")))?,
        };
        let fid = app_rt.functions.get(name).ok_or_else(|| {
            ApiError::not_found(format!("app {:?} has no function named {name:?}", app_rt.row.name))
        })?;
        let f =
            st.functions.get(fid).ok_or_else(|| ApiError::not_found(format!("function {fid} not found")))?;
        Ok(flare_api::FunctionInfo {
            function_id: f.id.clone(),
            name: f.name.clone(),
            app_id: f.app_id.clone(),
            is_generator: f.def.is_generator,
            is_async: f.def.is_async,
        })
    }

    pub fn function_stats(&self, fid: &str) -> ApiResult<flare_api::FunctionStats> {
        let st = self.lock();
        let f =
            st.functions.get(fid).ok_or_else(|| ApiError::not_found(format!("function {fid} not found")))?;
        let running: usize =
            f.containers.iter().filter_map(|c| st.containers.get(c)).map(|c| c.inflight.len()).sum();
        Ok(flare_api::FunctionStats {
            backlog: (f.queue.len() + f.delayed.len()) as u64,
            num_total_runners: f.containers.len() as u32,
            num_running_inputs: running as u64,
        })
    }

    pub fn list_containers(&self) -> Vec<flare_api::ContainerInfo> {
        let st = self.lock();
        let mut v: Vec<_> = st
            .containers
            .values()
            .map(|c| flare_api::ContainerInfo {
                container_id: c.id.clone(),
                app_id: c.app_id.clone(),
                function: st.functions.get(&c.function_id).map(|f| f.name.clone()).unwrap_or_default(),
                worker_id: c.worker_id.clone(),
                state: c.state.as_str().into(),
                age_s: c.started_at.elapsed().as_secs_f64(),
                inputs_in_flight: c.inflight.len() as u32,
                memory_limit_mb: c.memory_limit_mb,
                cpu_limit: c.cpu_limit,
            })
            .collect();
        // Containers a function needs but no worker can take yet, with the reason.
        for f in st.functions.values() {
            if let (Some(reason), true) = (&f.waiting, !f.queue.is_empty()) {
                v.push(flare_api::ContainerInfo {
                    container_id: "-".into(),
                    app_id: f.app_id.clone(),
                    function: f.name.clone(),
                    worker_id: String::new(),
                    state: format!("waiting: {reason}"),
                    age_s: 0.0,
                    inputs_in_flight: 0,
                    memory_limit_mb: None,
                    cpu_limit: None,
                });
            }
        }
        v.sort_by(|a, b| b.age_s.total_cmp(&a.age_s));
        v
    }

    /// Changes a function's autoscaler settings at run time.
    pub fn update_autoscaler(&self, fid: &str, u: flare_api::UpdateAutoscaler) -> ApiResult<()> {
        let mut st = self.lock();
        let st = &mut *st;
        let f = st
            .functions
            .get_mut(fid)
            .ok_or_else(|| ApiError::not_found(format!("function {fid} not found")))?;
        let mut cfg = f.def.config.clone();
        if let Some(v) = u.min_containers {
            cfg.min_containers = v;
        }
        if let Some(v) = u.max_containers {
            cfg.max_containers = Some(v);
        }
        if let Some(v) = u.buffer_containers {
            cfg.buffer_containers = v;
        }
        if let Some(v) = u.scaledown_window {
            cfg.scaledown_window = v;
        }
        if let Some(max) = cfg.max_containers {
            if max == 0 || max < cfg.min_containers {
                return Err(ApiError::invalid(format!(
                    "max_containers={max} must be >= 1 and >= min_containers={}",
                    cfg.min_containers
                )));
            }
        }
        f.def.config = cfg;
        let row = FunctionRow {
            function_id: f.id.clone(),
            app_id: f.app_id.clone(),
            name: f.name.clone(),
            def: f.def.clone(),
            created_at: now_ts(),
        };
        self.store().put_function(&row).map_err(store_err)?;
        schedule(st, fid);
        Ok(())
    }

    /// The files of a mount (workers on other machines fetch mounts with this).
    pub fn read_mount(&self, mount_id: &str) -> ApiResult<Vec<flare_api::MountFile>> {
        use std::os::unix::fs::PermissionsExt;
        if flare_api::validate_relative_path(mount_id).is_err() || mount_id.contains('/') {
            return Err(ApiError::invalid(format!("invalid mount id {mount_id:?}")));
        }
        let root = self.mounts_dir().join(mount_id);
        if !root.is_dir() {
            return Err(ApiError::not_found(format!("mount {mount_id} not found")));
        }
        let mut files = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let rd =
                std::fs::read_dir(&dir).map_err(|e| ApiError::internal(format!("reading mount: {e}")))?;
            for e in rd.flatten() {
                let p = e.path();
                let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
                if meta.is_dir() {
                    stack.push(p);
                } else if meta.is_file() {
                    let rel = p.strip_prefix(&root).expect("under root").to_string_lossy().into_owned();
                    let data =
                        std::fs::read(&p).map_err(|e| ApiError::internal(format!("reading mount: {e}")))?;
                    files.push(flare_api::MountFile {
                        path: rel,
                        data: B64(Bytes::from(data)),
                        mode: meta.permissions().mode() & 0o777,
                    });
                }
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    /// Creates a call with its first inputs; returns the call id and a receiver of output counts.
    pub fn create_call(
        &self,
        fid: &str,
        kind: CallKind,
        inputs: Vec<Bytes>,
        more: bool,
    ) -> ApiResult<(String, watch::Receiver<u64>)> {
        self.create_call_by(&Caller::Client, fid, kind, inputs, more)
    }

    /// [`Self::create_call`] on behalf of `caller`: a container may call functions of its
    /// own app and of deployed apps; the call remembers the caller's app.
    pub fn create_call_by(
        &self,
        caller: &Caller,
        fid: &str,
        kind: CallKind,
        inputs: Vec<Bytes>,
        more: bool,
    ) -> ApiResult<(String, watch::Receiver<u64>)> {
        let mut st = self.lock();
        let st = &mut *st;
        check_function_access(st, caller, fid)?;
        let caller_app = match caller {
            Caller::Client => None,
            Caller::Container { app_id, .. } => Some(app_id.clone()),
        };
        let f =
            st.functions.get(fid).ok_or_else(|| ApiError::not_found(format!("function {fid} not found")))?;
        let app_id = f.app_id.clone();
        let fname = f.name.clone();
        let is_gen = f.def.is_generator;
        let app = st.apps.get(&app_id).ok_or_else(|| ApiError::not_found("app not found"))?;
        if app.row.state == "stopped" || !f.active {
            return Err(ApiError::precondition(format!(
                "app {:?} is stopped; function {fname:?} cannot take inputs",
                app.row.name
            )));
        }
        match (kind, is_gen) {
            (CallKind::Gen, false) => {
                return Err(ApiError::invalid(format!("{fname} is not a generator function; use .remote()")))
            }
            (CallKind::Call | CallKind::Spawn | CallKind::Map, true) => {
                return Err(ApiError::invalid(format!("{fname} is a generator function; use .remote_gen()")))
            }
            _ => {}
        }
        let call_id = new_id("fc");
        let persisted = kind == CallKind::Spawn;
        let created_at = now_ts();
        if persisted {
            self.store()
                .put_call(&CallRow {
                    call_id: call_id.clone(),
                    function_id: fid.to_string(),
                    kind: kind.as_str().into(),
                    num_inputs: inputs.len() as u64,
                    created_at,
                    caller_app_id: caller_app.clone(),
                })
                .map_err(store_err)?;
        }
        let (tx, rx) = watch::channel(0);
        st.calls.insert(
            call_id.clone(),
            CallRt {
                id: call_id.clone(),
                function_id: fid.to_string(),
                kind,
                num_inputs: 0,
                more,
                outputs: retention::OutputLog::default(),
                final_count: 0,
                notify: tx,
                created_at,
                persisted,
                finished: retention::FinishedSet::default(),
                last_access: Instant::now(),
                caller_app: caller_app.clone(),
                delivered_at: None,
                read_by_caller: false,
                room: watch::channel(0).0,
            },
        );
        self.add_inputs_locked(st, &call_id, inputs, more)?;
        Ok((call_id, rx))
    }

    pub fn add_inputs(&self, call_id: &str, inputs: Vec<Bytes>, more: bool) -> ApiResult<(u64, u64)> {
        let mut st = self.lock();
        self.add_inputs_locked(&mut st, call_id, inputs, more)
    }

    /// [`Self::add_inputs`] with back-pressure: a call whose caller reads its outputs takes
    /// inputs only while fewer than [`ControlConfig::call_window`] are unconsumed. Without
    /// room the inputs come back with a receiver that changes when there may be some.
    pub fn try_add_inputs(
        &self,
        call_id: &str,
        inputs: Vec<Bytes>,
        more: bool,
    ) -> ApiResult<Result<(u64, u64), (Vec<Bytes>, NoRoom)>> {
        let mut st = self.lock();
        let window = st.config.call_window;
        let call =
            st.calls.get(call_id).ok_or_else(|| ApiError::not_found(format!("call {call_id} not found")))?;
        let unconsumed = call.unconsumed();
        let accepting = call.more || call.num_inputs == 0;
        if accepting && !retention::has_room(call.read_by_caller, unconsumed, inputs.len() as u64, window) {
            let room = call.room.subscribe();
            return Ok(Err((inputs, NoRoom { room, unconsumed, window })));
        }
        self.add_inputs_locked(&mut st, call_id, inputs, more).map(Ok)
    }

    fn add_inputs_locked(
        &self,
        st: &mut State,
        call_id: &str,
        inputs: Vec<Bytes>,
        more: bool,
    ) -> ApiResult<(u64, u64)> {
        let call = st
            .calls
            .get_mut(call_id)
            .ok_or_else(|| ApiError::not_found(format!("call {call_id} not found")))?;
        if !call.more && call.num_inputs > 0 {
            return Err(ApiError::precondition(format!("call {call_id} takes no more inputs")));
        }
        let first = call.num_inputs;
        let fid = call.function_id.clone();
        if st.functions.get(&fid).is_none_or(|f| !f.active) {
            return Err(ApiError::precondition(format!(
                "the app of call {call_id} is stopped; it takes no more inputs"
            )));
        }
        let call = st.calls.get_mut(call_id).expect("looked up");
        let persisted = call.persisted;
        call.num_inputs += inputs.len() as u64;
        call.more = more;
        call.last_access = Instant::now();
        let n = inputs.len() as u64;
        let mut qis = Vec::with_capacity(inputs.len());
        for (i, args) in inputs.into_iter().enumerate() {
            qis.push(QueuedInput {
                input_id: new_id("in"),
                call_id: call_id.to_string(),
                idx: first + i as u64,
                args,
                retry_count: 0,
                platform_retries: 0,
            });
        }
        if persisted {
            for qi in &qis {
                self.store()
                    .put_input(&PendingInputRow {
                        call_id: qi.call_id.clone(),
                        function_id: fid.clone(),
                        idx: qi.idx,
                        input_id: qi.input_id.clone(),
                        args: qi.args.to_vec(),
                        retry_count: 0,
                    })
                    .map_err(store_err)?;
            }
        }
        let notify_done = call.done();
        if notify_done {
            call.notify.send_modify(|v| *v += 1);
        }
        let f = st.functions.get_mut(&fid).ok_or_else(|| ApiError::not_found("function not found"))?;
        f.queue.extend(qis);
        schedule(st, &fid);
        Ok((first, n))
    }

    /// Loads a persisted call from the store into memory if it is not there.
    fn ensure_call_locked(&self, st: &mut State, call_id: &str) -> ApiResult<()> {
        if st.calls.contains_key(call_id) {
            return Ok(());
        }
        let row = self.store().get_call(call_id).map_err(store_err)?;
        let Some(row) = row else {
            return Err(ApiError::not_found(format!("function call {call_id} not found (or expired)")));
        };
        let outs = self
            .store()
            .outputs_after(call_id, -1, usize::MAX >> 1)
            .map_err(store_err)?
            .into_iter()
            .map(output_from_row)
            .collect();
        let final_count = self.store().count_final_outputs(call_id).map_err(store_err)?;
        st.calls.insert(call_id.to_string(), call_from_row(&row, outs, final_count));
        Ok(())
    }

    /// Outputs of a call after `after`, and whether the call is done; loads persisted calls.
    ///
    /// This is the caller's read: it has every output up to `after`, so those leave memory
    /// (a spawned call's stay in the store). Reading before outputs that were dropped so
    /// fails, except for spawned calls (read from the store).
    pub fn outputs(
        &self,
        call_id: &str,
        after: i64,
        limit: usize,
    ) -> ApiResult<(Vec<Output>, bool, watch::Receiver<u64>)> {
        let mut st = self.lock();
        let st = &mut *st;
        self.ensure_call_locked(st, call_id)?;
        let call = st.calls.get_mut(call_id).expect("loaded");
        call.last_access = Instant::now();
        // Someone reads this call's outputs as they come: back-pressure applies from now on.
        call.read_by_caller = true;
        if after >= 0 {
            let n = call.outputs.ack(after);
            if n > 0 {
                st.freed_outputs += n as u64;
                call.room.send_modify(|v| *v += 1);
            }
        }
        let (outs, reaches_end) = match call.outputs.page(after, limit, flare_api::MAX_PAGE_BYTES) {
            Ok(page) => page,
            Err(gone) if call.persisted => {
                let rows = self.store().outputs_after(call_id, after, limit).map_err(store_err)?;
                let outs: Vec<Output> = rows.into_iter().map(output_from_row).collect();
                let _ = gone;
                let end = (after + 1).max(0) as u64 + outs.len() as u64 >= call.outputs.total();
                (outs, end)
            }
            Err(gone) => {
                return Err(ApiError::precondition(format!(
                    "outputs of call {call_id} up to seq {} were already read (after={} acknowledged them) and are no longer kept",
                    gone.first_kept as i64 - 1,
                    gone.first_kept as i64 - 1,
                )))
            }
        };
        // Done only once the caller has everything: a cut page is followed by another.
        let done = call.done() && reaches_end;
        if done && limit > 0 {
            call.delivered_at.get_or_insert_with(Instant::now);
        }
        Ok((outs, done, call.notify.subscribe()))
    }

    /// The caller behind a container's API socket (None: no such container).
    pub fn caller_of_container(&self, container_id: &str) -> Option<Caller> {
        let st = self.lock();
        st.containers
            .get(container_id)
            .map(|c| Caller::Container { container_id: c.id.clone(), app_id: c.app_id.clone() })
    }

    /// Whether `caller` may see a call: clients may; a container may see the calls its
    /// app made and the calls made to its app's functions. Others look missing (404).
    pub fn check_call_access(&self, caller: &Caller, call_id: &str) -> ApiResult<()> {
        let Caller::Container { app_id, .. } = caller else { return Ok(()) };
        let mut st = self.lock();
        self.ensure_call_locked(&mut st, call_id)?;
        let ok = st.calls.get(call_id).is_some_and(|c| {
            c.caller_app.as_deref() == Some(app_id.as_str())
                || st.functions.get(&c.function_id).is_some_and(|f| f.app_id == *app_id)
        });
        if ok {
            Ok(())
        } else {
            Err(ApiError::not_found(format!("function call {call_id} not found (or expired)")))
        }
    }

    /// Whether `caller` may look up, inspect or call a function (see [`check_function_access`]).
    pub fn check_function_access(&self, caller: &Caller, fid: &str) -> ApiResult<()> {
        check_function_access(&self.lock(), caller, fid)
    }

    /// Whether `caller` may look up functions of an app by its id: a container only its own.
    pub fn check_app_access(&self, caller: &Caller, app_id: &str) -> ApiResult<()> {
        match caller {
            Caller::Container { app_id: own, .. } if own != app_id => {
                Err(ApiError::not_found(format!("app {app_id} not found")))
            }
            _ => Ok(()),
        }
    }

    /// Seq of the last log record of the app a call belongs to (-1 if none yet).
    pub fn log_position(&self, call_id: &str) -> i64 {
        let st = self.lock();
        st.calls
            .get(call_id)
            .and_then(|c| st.functions.get(&c.function_id))
            .and_then(|f| st.apps.get(&f.app_id))
            .map(|a| a.next_log_seq as i64 - 1)
            .unwrap_or(-1)
    }

    pub fn call_info(&self, call_id: &str) -> ApiResult<flare_api::CallInfo> {
        let mut st = self.lock();
        self.ensure_call_locked(&mut st, call_id)?;
        let c =
            st.calls.get(call_id).ok_or_else(|| ApiError::not_found(format!("call {call_id} not found")))?;
        Ok(flare_api::CallInfo {
            call_id: c.id.clone(),
            function_id: c.function_id.clone(),
            kind: c.kind,
            num_inputs: c.num_inputs,
            num_outputs: c.outputs.total(),
            done: c.done(),
            created_at: c.created_at,
        })
    }

    pub fn cancel_call(&self, call_id: &str, _terminate_containers: bool) -> ApiResult<()> {
        let mut st = self.lock();
        let st = &mut *st;
        self.ensure_call_locked(st, call_id)?;
        let call = st
            .calls
            .get_mut(call_id)
            .ok_or_else(|| ApiError::not_found(format!("call {call_id} not found")))?;
        call.more = false;
        let fid = call.function_id.clone();
        let exc = ExceptionInfo::new("flare.exception.InputCancellation", "the function call was cancelled");
        // Queued inputs of the call.
        let mut cancelled = Vec::new();
        if let Some(f) = st.functions.get_mut(&fid) {
            let (mine, rest): (VecDeque<_>, VecDeque<_>) =
                std::mem::take(&mut f.queue).into_iter().partition(|q| q.call_id == call_id);
            f.queue = rest;
            cancelled.extend(mine);
            let (mine, rest): (Vec<_>, Vec<_>) =
                std::mem::take(&mut f.delayed).into_iter().partition(|(_, q)| q.call_id == call_id);
            f.delayed = rest;
            cancelled.extend(mine.into_iter().map(|(_, q)| q));
        }
        // Running inputs: their containers are stopped.
        let mut kill = Vec::new();
        for c in st.containers.values_mut() {
            let ids: Vec<String> =
                c.inflight.values().filter(|q| q.call_id == call_id).map(|q| q.input_id.clone()).collect();
            for id in ids {
                if let Some(q) = c.inflight.remove(&id) {
                    c.cancelled.insert(id);
                    cancelled.push(q);
                    kill.push(c.id.clone());
                }
            }
        }
        for qi in cancelled {
            let out = platform_output(&qi, OutputStatus::Terminated, exc.clone());
            finish_input(st, self.store(), &qi, out);
        }
        kill.dedup();
        for cid in kill {
            stop_container(st, &cid, false);
        }
        if let Some(c) = st.calls.get(call_id) {
            c.notify.send_modify(|v| *v += 1);
            c.room.send_modify(|v| *v += 1);
        }
        Ok(())
    }

    pub fn logs(
        &self,
        app_id: &str,
        after: i64,
        limit: usize,
    ) -> ApiResult<(Vec<LogRecord>, String, watch::Receiver<u64>)> {
        let st = self.lock();
        let app = st.apps.get(app_id);
        let (state, rx, ring_start) = match app {
            Some(a) => (
                a.row.state.clone(),
                a.log_notify.subscribe(),
                a.logs.front().map(|l| l.seq as i64).unwrap_or(a.next_log_seq as i64),
            ),
            None => {
                drop(st);
                let row = self.store().get_app(app_id).map_err(store_err)?;
                let row = row.ok_or_else(|| ApiError::not_found(format!("app {app_id} not found")))?;
                let logs = self.store().logs_after(app_id, after, limit).map_err(store_err)?;
                return Ok((logs.into_iter().map(log_from_row).collect(), row.state, watch::channel(0).1));
            }
        };
        if after + 1 >= ring_start {
            let a = app.expect("some");
            let skip = (after + 1 - ring_start).max(0) as usize;
            let logs = a.logs.iter().skip(skip).take(limit).cloned().collect();
            return Ok((logs, state, rx));
        }
        drop(st);
        let logs = self.store().logs_after(app_id, after, limit).map_err(store_err)?;
        Ok((logs.into_iter().map(log_from_row).collect(), state, rx))
    }

    pub fn app_id_by_name(&self, name: &str) -> ApiResult<String> {
        let st = self.lock();
        let mut apps: Vec<&AppRt> = st.apps.values().filter(|a| a.row.name == name).collect();
        apps.sort_by(|a, b| a.row.created_at.total_cmp(&b.row.created_at));
        apps.last()
            .map(|a| a.row.app_id.clone())
            .ok_or_else(|| ApiError::not_found(format!("no app named {name:?}")))
    }

    /// Stops every container (server shutdown).
    pub fn shutdown(&self) {
        let mut st = self.lock();
        let ids: Vec<String> = st.containers.keys().cloned().collect();
        for id in ids {
            stop_container(&mut st, &id, false);
        }
    }

    pub fn live_containers(&self) -> usize {
        self.lock().containers.len()
    }

    pub fn subscribe_containers(&self) -> watch::Receiver<u64> {
        self.inner.containers_changed.subscribe()
    }
}

/// A container may use functions of its own app and of deployed apps (looked up by
/// name); functions of other apps look missing.
fn check_function_access(st: &State, caller: &Caller, fid: &str) -> ApiResult<()> {
    let Caller::Container { app_id, .. } = caller else { return Ok(()) };
    let ok = st.functions.get(fid).is_some_and(|f| {
        f.app_id == *app_id || st.apps.get(&f.app_id).is_some_and(|a| a.row.mode == "deployed")
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("function {fid} not found")))
    }
}

/// How an API call names an app.
pub enum AppRef<'a> {
    Id(&'a str),
    DeployedName(&'a str),
}

fn app_info(st: &State, row: AppRow) -> flare_api::AppInfo {
    let functions = st
        .apps
        .get(&row.app_id)
        .map(|a| {
            a.functions
                .iter()
                .map(|(name, fid)| {
                    let f = st.functions.get(fid);
                    flare_api::FunctionSummary {
                        name: name.clone(),
                        function_id: fid.clone(),
                        containers: f.map(|f| f.containers.len() as u32).unwrap_or(0),
                        backlog: f.map(|f| (f.queue.len() + f.delayed.len()) as u64).unwrap_or(0),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    flare_api::AppInfo {
        app_id: row.app_id,
        name: row.name,
        mode: if row.mode == "deployed" { AppMode::Deployed } else { AppMode::Ephemeral },
        state: row.state,
        version: row.version,
        created_at: row.created_at,
        functions,
    }
}

fn describe_exit(r: &ExitReport) -> String {
    match (r.code, r.signal) {
        (_, Some(sig)) => format!("killed by signal {sig}"),
        (Some(code), None) => format!("exit code {code}"),
        _ => "unknown status".into(),
    }
}

fn platform_output(qi: &QueuedInput, status: OutputStatus, exc: ExceptionInfo) -> Output {
    Output {
        idx: qi.idx,
        seq: 0,
        input_id: qi.input_id.clone(),
        status,
        data: None,
        gen: None,
        exception: Some(exc),
        retry_count: qi.retry_count,
    }
}

fn output_from_row(r: OutputRow) -> Output {
    Output {
        idx: r.idx,
        seq: r.seq,
        input_id: r.input_id,
        status: r.status,
        data: if r.data.is_empty() { None } else { Some(B64(Bytes::from(r.data))) },
        gen: r.gen,
        exception: r.exception,
        retry_count: r.retry_count,
    }
}

fn call_from_row(row: &CallRow, outputs: Vec<Output>, final_count: u64) -> CallRt {
    CallRt {
        id: row.call_id.clone(),
        function_id: row.function_id.clone(),
        kind: CallKind::parse(&row.kind).unwrap_or(CallKind::Spawn),
        num_inputs: row.num_inputs,
        more: false,
        finished: retention::FinishedSet::default(),
        outputs: retention::OutputLog::from_outputs(outputs),
        final_count,
        notify: watch::channel(0).0,
        created_at: row.created_at,
        persisted: true,
        last_access: Instant::now(),
        caller_app: row.caller_app_id.clone(),
        delivered_at: None,
        read_by_caller: false,
        room: watch::channel(0).0,
    }
}

fn log_from_row(l: LogRow) -> LogRecord {
    LogRecord {
        seq: l.seq,
        ts: l.ts,
        container_id: l.container_id,
        function: l.function,
        stream: match l.stream.as_str() {
            "stderr" => LogStream::Stderr,
            "system" => LogStream::System,
            _ => LogStream::Stdout,
        },
        data: l.data,
    }
}

/// Appends an output to its call's log (and to the store for persisted calls).
fn append_output(st: &mut State, store: &dyn Store, call_id: &str, mut out: Output, final_output: bool) {
    let Some(call) = st.calls.get_mut(call_id) else { return };
    if final_output && !call.finished.insert(out.idx) {
        return; // idempotent: one final output per input
    }
    out.seq = call.outputs.total();
    if call.persisted {
        let row = OutputRow {
            seq: out.seq,
            idx: out.idx,
            input_id: out.input_id.clone(),
            status: out.status,
            data: out.data.as_ref().map(|d| d.0.to_vec()).unwrap_or_default(),
            gen: out.gen,
            exception: out.exception.clone(),
            retry_count: out.retry_count,
        };
        if let Err(e) = store.put_output(call_id, &row, final_output) {
            tracing::error!(error = %e, call = call_id, "could not persist output");
        }
    }
    call.outputs.push(out);
    if final_output {
        call.final_count += 1;
        if call.persisted && call.done() {
            // The retention period of its results starts now.
            if let Err(e) = store.set_call_done(call_id, now_ts()) {
                tracing::error!(error = %e, call = call_id, "could not mark call done");
            }
        }
    }
    let n = call.outputs.total();
    call.notify.send_replace(n);
}

fn finish_input(st: &mut State, store: &dyn Store, qi: &QueuedInput, out: Output) {
    append_output(st, store, &qi.call_id, out, true);
}

/// Fails every queued input of a function (init failures, app stop).
fn fail_queue(st: &mut State, store: &dyn Store, fid: &str, status: OutputStatus, exc: &ExceptionInfo) {
    let Some(f) = st.functions.get_mut(fid) else { return };
    let mut all: Vec<QueuedInput> = f.queue.drain(..).collect();
    all.extend(f.delayed.drain(..).map(|(_, q)| q));
    for qi in all {
        let out = platform_output(&qi, status, exc.clone());
        finish_input(st, store, &qi, out);
    }
}

fn push_log(
    st: &mut State,
    log_tx: &mpsc::UnboundedSender<LogRow>,
    app_id: &str,
    container_id: &str,
    stream: LogStream,
    data: &str,
) {
    let fname = st
        .containers
        .get(container_id)
        .and_then(|c| st.functions.get(&c.function_id))
        .map(|f| f.name.clone())
        .unwrap_or_default();
    let log_retention = st.config.log_retention_bytes;
    let Some(app) = st.apps.get_mut(app_id) else { return };
    let rec = LogRecord {
        seq: app.next_log_seq,
        ts: now_ts(),
        container_id: container_id.to_string(),
        function: fname,
        stream,
        data: data.to_string(),
    };
    app.next_log_seq += 1;
    let _ = log_tx.send(LogRow {
        app_id: app_id.to_string(),
        seq: rec.seq,
        ts: rec.ts,
        container_id: rec.container_id.clone(),
        function: rec.function.clone(),
        stream: match stream {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::System => "system",
        }
        .into(),
        data: rec.data.clone(),
    });
    app.log_bytes += rec.data.len();
    app.logs.push_back(rec);
    // Never more in memory than half of what the store keeps, so both show the same tail.
    let ring_bytes = LOG_RING_BYTES.min(log_retention as usize / 2);
    while app.logs.len() > LOG_RING || app.log_bytes > ring_bytes && app.logs.len() > 1 {
        if let Some(old) = app.logs.pop_front() {
            app.log_bytes -= old.data.len();
        }
    }
    app.log_notify.send_replace(app.next_log_seq);
}

fn stop_container(st: &mut State, cid: &str, graceful: bool) {
    let Some(c) = st.containers.get_mut(cid) else { return };
    if c.state == CState::Stopping && graceful {
        return;
    }
    c.state = CState::Stopping;
    if let Some(w) = st.workers.iter().find(|w| w.link.id == c.worker_id) {
        let _ = w.link.tx.send(ToWorker::Stop { container_id: cid.to_string(), graceful });
    }
}

/// Hands queued inputs to containers with free slots, then starts containers for what is left.
fn schedule(st: &mut State, fid: &str) {
    let Some(f) = st.functions.get_mut(fid) else { return };
    if !f.active {
        return;
    }
    let max_inputs = f.def.config.max_inputs.max(1) as usize;
    let timeout_ms = f.def.config.timeout * 1000;
    // 1. Dispatch to ready containers of the current version.
    if !f.queue.is_empty() {
        let mut cids: Vec<&String> = f.containers.iter().collect();
        cids.sort();
        for cid in cids {
            if f.queue.is_empty() {
                break;
            }
            let Some(c) = st.containers.get_mut(cid) else { continue };
            if c.state != CState::Ready || c.fn_version != f.version {
                continue;
            }
            if st.workers.iter().any(|w| w.link.id == c.worker_id && w.draining) {
                continue;
            }
            let free = max_inputs.saturating_sub(c.inflight.len());
            if free == 0 {
                continue;
            }
            let mut batch = Vec::with_capacity(free.min(f.queue.len()));
            for _ in 0..free {
                let Some(qi) = f.queue.pop_front() else { break };
                batch.push(InputMsg {
                    input_id: qi.input_id.clone(),
                    call_id: qi.call_id.clone(),
                    idx: qi.idx,
                    args: qi.args.clone(),
                    timeout_ms,
                });
                c.inflight.insert(qi.input_id.clone(), qi);
            }
            if let Some(w) = st.workers.iter().find(|w| w.link.id == c.worker_id) {
                let _ = w.link.tx.send(ToWorker::Inputs { container_id: c.id.clone(), inputs: batch });
            }
        }
    }
    // 2. Autoscale.
    let mut live = 0u32;
    let mut starting = 0u32;
    let mut in_flight = 0u64;
    for cid in &f.containers {
        if let Some(c) = st.containers.get(cid) {
            in_flight += c.inflight.len() as u64;
            if c.state != CState::Stopping && c.fn_version == f.version {
                live += 1;
                if c.state == CState::Starting {
                    starting += 1;
                }
            }
        }
    }
    let cfg = &f.def.config;
    let n = scheduler::containers_to_start(
        scheduler::ScaleInput {
            backlog: f.queue.len() as u64,
            in_flight,
            live,
            starting,
            target_inputs: cfg.target_inputs.unwrap_or(cfg.max_inputs).max(1),
            min_containers: cfg.min_containers,
            max_containers: cfg.max_containers,
            buffer_containers: cfg.buffer_containers,
        },
        MAX_STARTING_PER_FUNCTION,
    );
    if n == 0 {
        return;
    }
    let req = scheduler::Request {
        cpu_millis: cfg.cpu.map(|c| (c * 1000.0) as u64).unwrap_or(DEFAULT_CPU_MILLIS),
        memory_mb: cfg.memory.unwrap_or(DEFAULT_MEMORY_MB),
        gpu: cfg.gpu.clone(),
        image: f.def.image.as_ref().map(|i| i.manifest.clone()),
    };
    let app_name = st.apps.get(&f.app_id).map(|a| a.row.name.clone()).unwrap_or_default();
    let mut make_room = false;
    for _ in 0..n {
        let views: Vec<scheduler::WorkerView> = st
            .workers
            .iter()
            .map(|w| scheduler::WorkerView {
                id: w.link.id.clone(),
                cpu_millis_total: w.link.cpu_millis,
                cpu_millis_used: w.cpu_used,
                memory_mb_total: w.link.memory_mb,
                memory_mb_used: w.mem_used,
                gpus_total: w.link.gpus.clone(),
                gpus_used: w.gpus_used.clone(),
                images: w.images.clone(),
                same_function: f
                    .containers
                    .iter()
                    .filter(|c| st.containers.get(*c).is_some_and(|c| c.worker_id == w.link.id))
                    .count() as u32,
                accepting: w.accepting,
            })
            .collect();
        let Some(placement) = scheduler::place(&views, &req) else {
            let reason = scheduler::unplaceable_reason(&views, &req);
            if f.waiting.as_deref() != Some(reason.as_str()) {
                tracing::info!(function = %f.name, %reason, "container waiting for a worker");
                f.waiting = Some(reason);
            }
            make_room = true;
            break;
        };
        f.waiting = None;
        let w = &mut st.workers[placement.worker];
        w.cpu_used += req.cpu_millis;
        w.mem_used += req.memory_mb;
        if let Some(g) = &placement.gpu {
            *w.gpus_used.entry(g.kind.clone()).or_insert(0) += g.count;
        }
        let cid = new_id("ct");
        // The worker gets explicit limits: the server's defaults where the function sets none.
        let mut def = f.def.clone();
        if def.config.memory.is_none() && st.config.default_memory_mb > 0 {
            def.config.memory = Some(st.config.default_memory_mb);
        }
        if def.config.cpu_limit.is_none() {
            let request = def.config.cpu.unwrap_or(DEFAULT_CPU_MILLIS as f64 / 1000.0);
            def.config.cpu_limit = Some(request + flare_proto::CPU_BURST_CORES);
        }
        let (memory_limit_mb, cpu_limit) = (def.config.memory, def.config.cpu_limit);
        let assignment = ContainerAssignment {
            container_id: cid.clone(),
            app_id: f.app_id.clone(),
            app_name: app_name.clone(),
            function_id: f.id.clone(),
            def,
        };
        if w.link.tx.send(ToWorker::Start(assignment)).is_err() {
            w.accepting = false;
            continue;
        }
        let now = Instant::now();
        st.containers.insert(
            cid.clone(),
            ContainerRt {
                id: cid.clone(),
                function_id: f.id.clone(),
                app_id: f.app_id.clone(),
                worker_id: w.link.id.clone(),
                fn_version: f.version,
                state: CState::Starting,
                inflight: HashMap::new(),
                started_at: now,
                idle_since: now,
                cpu: req.cpu_millis,
                mem: req.memory_mb,
                gpu: placement.gpu.clone(),
                cancelled: HashSet::new(),
                memory_limit_mb,
                cpu_limit,
                logs: LogBucket::new(st.config.log_burst_bytes),
            },
        );
        f.containers.insert(cid);
    }
    if make_room && req.gpu.is_empty() {
        evict_idle_for(st, fid, &req);
    }
}

/// Stops idle containers of other functions (oldest idle first, never below their
/// `min_containers`) so that a container of `fid` fits on some worker. Capacity held by
/// containers already stopping counts as free, so repeated calls do not over-evict.
fn evict_idle_for(st: &mut State, fid: &str, req: &scheduler::Request) {
    for wi in 0..st.workers.len() {
        let w = &st.workers[wi];
        if !w.accepting {
            continue;
        }
        let wid = w.link.id.clone();
        let (mut cpu_free, mut mem_free) =
            (w.link.cpu_millis.saturating_sub(w.cpu_used), w.link.memory_mb.saturating_sub(w.mem_used));
        for c in st.containers.values().filter(|c| c.worker_id == wid && c.state == CState::Stopping) {
            cpu_free += c.cpu;
            mem_free += c.mem;
        }
        if cpu_free >= req.cpu_millis && mem_free >= req.memory_mb {
            return; // room is already on its way
        }
        let mut idle: Vec<(Instant, String, String)> = st
            .containers
            .values()
            .filter(|c| {
                c.worker_id == wid
                    && c.function_id != fid
                    && c.state == CState::Ready
                    && c.inflight.is_empty()
            })
            .map(|c| (c.idle_since, c.id.clone(), c.function_id.clone()))
            .collect();
        idle.sort();
        let mut chosen = Vec::new();
        let mut live_left: HashMap<String, usize> = HashMap::new();
        for (_, cid, ofid) in idle {
            let Some(of) = st.functions.get(&ofid) else { continue };
            let min = of.def.config.min_containers as usize;
            let live = *live_left.entry(ofid.clone()).or_insert_with(|| {
                of.containers
                    .iter()
                    .filter(|c| st.containers.get(*c).is_some_and(|c| c.state != CState::Stopping))
                    .count()
            });
            if of.active && live <= min {
                continue;
            }
            live_left.insert(ofid, live - 1);
            let c = &st.containers[&cid];
            cpu_free += c.cpu;
            mem_free += c.mem;
            chosen.push(cid);
            if cpu_free >= req.cpu_millis && mem_free >= req.memory_mb {
                break;
            }
        }
        if cpu_free >= req.cpu_millis && mem_free >= req.memory_mb {
            for cid in chosen {
                tracing::debug!(container = %cid, "stopping an idle container to make room");
                stop_container(st, &cid, true);
            }
            return;
        }
    }
}

/// Persists log records in batches and keeps each app's stored logs within
/// [`ControlConfig::log_retention_bytes`] (oldest first, with a note).
async fn log_writer(store: Arc<dyn Store>, mut rx: mpsc::UnboundedReceiver<LogRow>, cfg: ControlConfig) {
    let mut buf = Vec::new();
    // Stored log bytes per app, as far as this process knows (read once per app).
    let mut usage: HashMap<String, u64> = HashMap::new();
    while let Some(first) = rx.recv().await {
        buf.push(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(more) = rx.try_recv() {
            buf.push(more);
        }
        let batch = std::mem::take(&mut buf);
        let store = store.clone();
        let cfg = cfg.clone();
        let mut known = std::mem::take(&mut usage);
        let res = tokio::task::spawn_blocking(move || {
            store.append_logs(&batch)?;
            enforce_log_size(&*store, &batch, &mut known, &cfg)?;
            Ok::<_, flare_store::StoreError>(known)
        })
        .await;
        match res {
            Ok(Ok(known)) => usage = known,
            Ok(Err(e)) => tracing::error!(error = %e, "could not persist logs"),
            Err(e) => tracing::error!(error = %e, "log writer task failed"),
        }
    }
}

fn retention_note(cfg: &ControlConfig) -> impl Fn(u64, u64) -> String + '_ {
    move |records, bytes| {
        format!(
            "[flare] {records} older log records ({}) of this app were deleted: the server keeps {} of logs per app, for {} days",
            flare_api::mib(bytes as usize),
            flare_api::mib(cfg.log_retention_bytes as usize),
            cfg.log_retention_age.as_secs_f64() / 86400.0,
        )
    }
}

fn enforce_log_size(
    store: &dyn Store,
    batch: &[LogRow],
    usage: &mut HashMap<String, u64>,
    cfg: &ControlConfig,
) -> Result<(), flare_store::StoreError> {
    let mut added: HashMap<&str, u64> = HashMap::new();
    for l in batch {
        *added.entry(l.app_id.as_str()).or_default() += l.data.len() as u64;
    }
    for (app, n) in added {
        let total = match usage.get_mut(app) {
            Some(t) => {
                *t += n;
                *t
            }
            None => {
                let t = store.log_bytes(app)?;
                usage.insert(app.to_string(), t);
                t
            }
        };
        if total > cfg.log_retention_bytes {
            // Down to 90%, so that trimming happens once per tenth of the budget.
            let left = store.trim_logs(app, cfg.log_retention_bytes / 10 * 9, &retention_note(cfg))?;
            usage.insert(app.to_string(), left);
        }
    }
    Ok(())
}

/// Deletes spawned calls (and their results) that finished more than `retention` ago.
async fn call_expiry(store: Arc<dyn Store>, retention: Duration) {
    let mut iv = tokio::time::interval(CALL_EXPIRY_EVERY);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        iv.tick().await;
        let store = store.clone();
        let res =
            tokio::task::spawn_blocking(move || store.expire_calls(now_ts() - retention.as_secs_f64())).await;
        match res {
            Ok(Ok(n)) if n > 0 => tracing::info!(calls = n, "deleted spawned calls past their retention"),
            Ok(Err(e)) => tracing::error!(error = %e, "could not delete expired calls"),
            _ => {}
        }
    }
}

/// Deletes stored logs older than [`ControlConfig::log_retention_age`], once a minute.
async fn log_expiry(store: Arc<dyn Store>, cfg: ControlConfig) {
    let mut iv = tokio::time::interval(LOG_EXPIRY_EVERY);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        iv.tick().await;
        let store = store.clone();
        let cfg = cfg.clone();
        let res = tokio::task::spawn_blocking(move || {
            let before = now_ts() - cfg.log_retention_age.as_secs_f64();
            store.expire_logs(before, &retention_note(&cfg))
        })
        .await;
        match res {
            Ok(Ok(apps)) if !apps.is_empty() => tracing::info!(apps = apps.len(), "deleted expired logs"),
            Ok(Err(e)) => tracing::error!(error = %e, "could not delete expired logs"),
            _ => {}
        }
    }
}

/// Errors opening the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("loading state: {0}")]
    Store(#[from] flare_store::StoreError),
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod hardening_tests;

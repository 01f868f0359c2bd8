//! The worker agent: starts containers for the control plane, feeds them inputs over
//! their fd-3 socket, relays outputs, logs and exits, and enforces input timeouts.
//!
//! The agent talks to the control plane only through [`ToWorker`] / [`FromWorker`]
//! messages, so the embedded server (channels) and a remote worker share this code.

mod binds;
mod codemount;
mod error;
pub mod frame;
pub mod gpu;
pub mod http;
pub mod images;
mod phase;
pub mod prestart;
pub mod remote;
pub mod sandbox;
mod snapshot;
pub mod snapshot_share;
mod spec;
pub mod web;

pub use error::WorkerError;

use std::collections::HashMap;
use std::future::IntoFuture;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use flare_proto::{
    ContainerAssignment, ExceptionInfo, ExitReport, FromWorker, GenMark, InputMsg, LogStream, OutputMsg,
    OutputStatus, ToWorker,
};
use flare_runtime::{pipe_cloexec as pipe, LogDecoder, Runtime};
use serde::Deserialize;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use phase::{Action, Event};

/// Bytes of stderr kept to explain a container that died while starting.
const STDERR_TAIL: usize = 4096;
/// Where the worker's API socket appears inside containers.
const API_SOCKET_IN_CONTAINER: &str = "/__flare/api.sock";
/// Where the SDK appears inside containers (on PYTHONPATH).
const SDK_IN_CONTAINER: &str = "/__flare/flare";

/// How a worker is set up.
pub struct WorkerConfig {
    pub id: String,
    /// FLARE_HOME: mounts are read from `home/mounts`, container dirs live in `home/worker`.
    pub home: PathBuf,
    pub runtime: Arc<Runtime>,
    /// The API served on each container's socket (calls from inside containers).
    pub api: axum::Router,
    /// A short directory for the containers' API sockets (unix socket paths are limited
    /// to 108 bytes, which a deep `home` would exceed).
    pub socket_dir: PathBuf,
    /// Where to fetch mounts this machine does not have (a remote worker: the control
    /// plane's URL); `None` when the control plane shares `home`.
    pub mount_source: Option<http::HttpClient>,
    /// Images: lazy mounts over the blob store; `None`: functions with an image fail to start.
    pub images: Option<Arc<images::ImageHost>>,
    /// The host directories containers may have bound (the operator's allow-list,
    /// `--host-bind-allow`); everything else they see comes from dirs this server created.
    pub host_binds: flare_api::HostBindPolicy,
    /// Pre-started runners ([`prestart`]).
    pub prestart: prestart::PrestartConfig,
    /// Where memory snapshots are shared with the rest of the fleet (a remote worker: the
    /// control plane); `None`: this worker's snapshots are its own.
    pub snapshot_share: Option<Arc<snapshot_share::SnapshotShare>>,
    /// Where the running containers' web endpoints are (the ingress dials through it).
    pub web: web::WebTargets,
}

/// Resources a worker offers.
#[derive(Clone, Debug)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_mb: u64,
}

/// What this machine has.
pub fn host_resources() -> Resources {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as u64;
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(1024 * 1024);
    Resources { cpu_millis: cpus * 1000, memory_mb: mem_kb / 1024 }
}

enum Cmd {
    Inputs(Vec<InputMsg>),
    Stop { graceful: bool },
}

type Registry = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Cmd>>>>;
/// The worker's snapshots, once CRIU detection has finished.
type Snaps = Arc<tokio::sync::OnceCell<Arc<snapshot::Snapshots>>>;

/// A started worker: the channel the control plane sends on, and what it runs.
#[derive(Clone)]
pub struct WorkerHandle {
    pub tx: mpsc::UnboundedSender<ToWorker>,
    registry: Registry,
    pool: Arc<prestart::Pool>,
}

impl WorkerHandle {
    /// Ids of the containers running (or starting, or exiting) on this worker.
    pub fn container_ids(&self) -> Vec<String> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// Ids of the idle pre-started runners' containers (owned by no app).
    pub fn prestarted_ids(&self) -> Vec<String> {
        self.pool.idle_ids()
    }

    /// Stops the idle pre-started runners and starts no more (at shutdown); blocks until
    /// they are gone.
    pub fn shutdown_prestarted(&self) {
        self.pool.shutdown();
    }
}

/// Starts the worker; returns its handle.
pub fn start(cfg: WorkerConfig, events: mpsc::UnboundedSender<FromWorker>) -> WorkerHandle {
    let (tx, mut rx) = mpsc::unbounded_channel::<ToWorker>();
    // What pre-started runners of an earlier run of this worker left (a crash: their
    // containers were killed when the runtime started; their dirs and sockets remain).
    prestart::remove_leftovers(&cfg.home, &cfg.socket_dir);
    let pool = prestart::Pool::new(cfg.prestart.clone());
    let cfg = Arc::new(cfg);
    let registry: Registry = Arc::default();
    let handle = WorkerHandle { tx: tx.clone(), registry: registry.clone(), pool: pool.clone() };
    if pool.enabled() {
        // Runners of templates nobody used for the idle time are stopped even when no
        // start comes along to trigger the pool.
        let (pool, cfg) = (pool.clone(), cfg.clone());
        let every = (cfg.prestart.idle_ttl / 4).max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                pool.reconcile(&cfg);
            }
        });
    }
    if let Some(reason) = cfg.runtime.nat_available() {
        tracing::warn!(%reason, "outbound networking (NAT) is off: containers get loopback only");
    }
    // CRIU is detected at start, in the background: only functions that ask for a memory
    // snapshot wait for it.
    let snaps: Snaps = Arc::default();
    {
        let (snaps, cfg) = (snaps.clone(), cfg.clone());
        tokio::spawn(async move { snapshots(&snaps, &cfg).await });
    }
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            match msg {
                ToWorker::Start(a) => {
                    let (ctx, crx) = mpsc::unbounded_channel();
                    registry.lock().unwrap_or_else(|p| p.into_inner()).insert(a.container_id.clone(), ctx);
                    let cfg = cfg.clone();
                    let events = events.clone();
                    let registry = registry.clone();
                    let pool = pool.clone();
                    let snaps = snaps.clone();
                    tokio::spawn(async move {
                        let id = a.container_id.clone();
                        let report = run_container(&cfg, &pool, &snaps, a, crx, &events).await;
                        registry.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                        let _ = events.send(FromWorker::Exited { container_id: id, report });
                    });
                }
                ToWorker::Inputs { container_id, inputs } => {
                    let reg = registry.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(c) = reg.get(&container_id) {
                        let _ = c.send(Cmd::Inputs(inputs));
                    }
                }
                ToWorker::Stop { container_id, graceful } => {
                    let reg = registry.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(c) = reg.get(&container_id) {
                        let _ = c.send(Cmd::Stop { graceful });
                    }
                }
            }
        }
    });
    handle
}

pub use flare_api::python_roots;

/// Where an image's file systems are on this worker, for one container start.
#[derive(Default)]
struct ImageDirs {
    /// The image's lazily mounted root (the overlay's lower dir).
    root: Option<PathBuf>,
    /// Start-time mounts: (destination, materialized dir).
    mounts: Vec<(String, PathBuf)>,
}

#[derive(Deserialize)]
struct OutputHeader {
    outputs: Vec<OutputItem>,
}

#[derive(Deserialize)]
struct OutputItem {
    input_id: String,
    status: String,
    #[serde(default)]
    gen: Option<GenMark>,
    len: usize,
    #[serde(default)]
    exception: Option<ExceptionInfo>,
}

#[derive(Deserialize)]
struct InitFailureHeader {
    exception: ExceptionInfo,
}

#[derive(Deserialize)]
struct SnapshotReadyHeader {
    /// Why the runner will not be checkpointed (open sockets, files outside the image).
    #[serde(default)]
    refused: Option<String>,
}

/// RESUME: go on after a checkpoint (`restored`: in a container restored from it), with
/// the environment that differs from the checkpointed container's.
fn resume_frame(a: &ContainerAssignment, restored: bool) -> Bytes {
    let header = serde_json::json!({
        "restored": restored,
        "env": {"FLARE_CONTAINER_ID": a.container_id},
    });
    frame::encode(frame::RESUME, header.to_string().as_bytes(), b"")
}

/// INIT (`snapshot`: checkpoint after the snap=True hooks); `extra` (a pre-started
/// runner's assignment): the container's whole environment and working dir, which the
/// runner applies before it imports anything of the app.
fn init_frame(
    a: &ContainerAssignment,
    snapshot: bool,
    extra: Option<(Vec<(String, String)>, String)>,
) -> Bytes {
    let d = &a.def;
    let mut header = serde_json::json!({
        "snapshot": snapshot,
        "function": {
            "name": d.name,
            "module": d.module,
            "qualname": d.qualname,
            "serialized": d.serialized,
            "is_generator": d.is_generator,
            "is_async": d.is_async,
            "max_inputs": d.config.max_inputs,
        }
    });
    if !d.web.is_empty() {
        header["function"]["web"] = serde_json::to_value(&d.web).unwrap_or_default();
    }
    if let Some((env, cwd)) = extra {
        let env: serde_json::Map<String, serde_json::Value> =
            env.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect();
        header["env"] = serde_json::Value::Object(env);
        header["cwd"] = serde_json::Value::String(cwd);
    }
    let body = d.pickled.as_ref().map(|p| p.0.clone()).unwrap_or_default();
    frame::encode(frame::INIT, header.to_string().as_bytes(), &body)
}

fn inputs_frame(inputs: &[InputMsg]) -> Bytes {
    let items: Vec<serde_json::Value> = inputs
        .iter()
        .map(|i| serde_json::json!({"input_id": i.input_id, "call_id": i.call_id, "idx": i.idx, "len": i.args.len()}))
        .collect();
    let header = serde_json::json!({ "inputs": items }).to_string();
    let total: usize = inputs.iter().map(|i| i.args.len()).sum();
    let mut body = Vec::with_capacity(total);
    for i in inputs {
        body.extend_from_slice(&i.args);
    }
    frame::encode(frame::INPUTS, header.as_bytes(), &body)
}

fn parse_outputs(f: &frame::Frame) -> Result<Vec<OutputMsg>, WorkerError> {
    let bad = WorkerError::Protocol;
    let h: OutputHeader =
        serde_json::from_slice(&f.header).map_err(|e| bad(format!("bad OUTPUTS header: {e}")))?;
    let lens: Vec<usize> = h.outputs.iter().map(|o| o.len).collect();
    let bodies = frame::split_body(&f.body, &lens).map_err(|e| bad(e.to_string()))?;
    h.outputs
        .into_iter()
        .zip(bodies)
        .map(|(o, data)| {
            let status = OutputStatus::parse(&o.status)
                .ok_or_else(|| bad(format!("unknown status {:?}", o.status)))?;
            Ok(OutputMsg { input_id: o.input_id, status, gen: o.gen, data, exception: o.exception })
        })
        .collect()
}

struct Pipe {
    rx: tokio::net::unix::pipe::Receiver,
    dec: LogDecoder,
    stream: LogStream,
    eof: bool,
}

impl Pipe {
    fn new(fd: OwnedFd, stream: LogStream) -> std::io::Result<Self> {
        Ok(Pipe {
            rx: tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?,
            dec: LogDecoder::new(STDERR_TAIL),
            stream,
            eof: false,
        })
    }

    fn emit(&mut self, n: usize, buf: &[u8], cid: &str, events: &mpsc::UnboundedSender<FromWorker>) {
        if n == 0 {
            self.eof = true;
            return;
        }
        let text = self.dec.push(&buf[..n]);
        if !text.is_empty() {
            let _ = events.send(FromWorker::Log {
                container_id: cid.to_string(),
                stream: self.stream,
                data: text,
            });
        }
    }

    /// Forwards whatever is readable right now without waiting.
    fn drain_now(&mut self, buf: &mut [u8], cid: &str, events: &mpsc::UnboundedSender<FromWorker>) {
        while !self.eof {
            match self.rx.try_read(buf) {
                Ok(n) => self.emit(n, buf, cid, events),
                Err(_) => break,
            }
        }
    }
}

/// Runs one container from start to cleanup; returns how it ended.
/// The worker's snapshots (detecting CRIU the first time).
async fn snapshots(snaps: &Snaps, cfg: &WorkerConfig) -> Arc<snapshot::Snapshots> {
    let dir = cfg.home.join("snapshots");
    snaps
        .get_or_init(|| async move {
            let share = cfg.snapshot_share.clone();
            let open = tokio::task::spawn_blocking(move || snapshot::Snapshots::open(&dir, share));
            Arc::new(open.await.expect("snapshot detection task"))
        })
        .await
        .clone()
}

/// Upload a saved snapshot to the fleet in the background (the container goes on serving);
/// the outcome goes to the app's logs.
fn share_snapshot(
    sn: Arc<snapshot::Snapshots>,
    meta: snapshot::Meta,
    cid: String,
    events: mpsc::UnboundedSender<FromWorker>,
) {
    tokio::task::spawn_blocking(move || {
        let t0 = std::time::Instant::now();
        let text = match sn.share(&meta)? {
            Ok(up) => {
                tracing::info!(key = %meta.key, blobs = up.blobs, bytes = up.bytes, ms = t0.elapsed().as_millis() as u64, "memory snapshot shared");
                format!(
                    "flare: memory snapshot shared with the fleet ({:.1} MiB uploaded in {} ms)\n",
                    up.bytes as f64 / 1048576.0,
                    t0.elapsed().as_millis()
                )
            }
            Err(e) => {
                tracing::warn!(key = %meta.key, error = %e, "memory snapshot not shared");
                format!("flare: memory snapshot not shared with the fleet (other workers start cold): {e}\n")
            }
        };
        let _ = events.send(FromWorker::Log { container_id: cid, stream: LogStream::Stderr, data: text });
        Some(())
    });
}

async fn run_container(
    cfg: &Arc<WorkerConfig>,
    pool: &Arc<prestart::Pool>,
    snaps: &Snaps,
    a: ContainerAssignment,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    events: &mpsc::UnboundedSender<FromWorker>,
) -> ExitReport {
    let cid = a.container_id.clone();
    let snaps = if a.def.config.enable_memory_snapshot { Some(snapshots(snaps, cfg).await) } else { None };
    match run_container_in(cfg, pool, snaps, &a, &mut cmds, events).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(container = %cid, error = %e, "container failed to start");
            ExitReport { start_error: Some(e.to_string()), ..Default::default() }
        }
    }
}

async fn run_container_in(
    cfg: &Arc<WorkerConfig>,
    pool: &Arc<prestart::Pool>,
    snaps: Option<Arc<snapshot::Snapshots>>,
    a: &ContainerAssignment,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    events: &mpsc::UnboundedSender<FromWorker>,
) -> Result<ExitReport, WorkerError> {
    let cid = a.container_id.clone();
    let t0 = std::time::Instant::now();
    // Calls from inside the container reach the API through this socket only.
    let api_path = cfg.socket_dir.join(format!("{cid}.sock"));
    let mut steps = StartSteps::new(t0);
    if let Some(src) = &cfg.mount_source {
        for m in a.def.mount_id.iter().chain(Some(&a.def.python.sdk_mount).filter(|m| !m.is_empty())) {
            ensure_mount(&cfg.home.join("mounts"), m, src).await?;
        }
    }
    steps.mark("mounts");
    let image_dirs = match &a.def.image {
        None => ImageDirs::default(),
        Some(img) => {
            let img_id = img.image_id.clone();
            let host = cfg.images.clone().ok_or(WorkerError::NoImageStore)?;
            let img = img.clone();
            let cfg = cfg.clone();
            let snapshot_wanted = a.def.config.enable_memory_snapshot;
            tokio::task::spawn_blocking(move || -> Result<ImageDirs, WorkerError> {
                // A captured environment whose files this machine has unchanged (the
                // caller's own machine, usually) is bound from the host: no FUSE at all,
                // but only dirs the operator allows to bind (`--host-bind-allow`).
                let from_host = !img.host_roots.is_empty()
                    && img.host_roots.iter().all(|r| cfg.host_binds.check_on_host(r).is_ok())
                    && host.host_matches(&img.manifest, &img.host_roots);
                // Memory snapshots need a mount without FUSE passthrough (images.rs).
                let root =
                    if from_host { None } else { Some(host.ensure_with(&img.manifest, !snapshot_wanted)?) };
                let mut mounts = Vec::new();
                for m in &img.mounts {
                    mounts.push((m.dest.clone(), host.tree(&m.manifest)?));
                }
                Ok(ImageDirs { root, mounts })
            })
            .await
            .map_err(|e| WorkerError::task("image", e))?
            .map_err(|e| WorkerError::ImageMount { image_id: img_id.clone(), message: e.to_string() })?
        }
    };
    steps.mark("image_dirs");
    // Side effects first (the code mount's mountpoints), then the pure spec.
    let sources = binds::bind_sources(cfg, &a.def, &image_dirs, &api_path).map_err(WorkerError::Binds)?;
    binds::make_code_mountpoints(&sources).map_err(WorkerError::Binds)?;
    let mut spec = spec::function_spec(spec::SpecInputs {
        assignment: a,
        binds: sources.plan(),
        image_root: image_dirs.root,
        nat_available: cfg.runtime.nat_available().is_none(),
    })?;
    steps.mark("binds_spec");
    // Memory snapshots: restore this container from one, or make one after its
    // snap=True hooks (docs/SNAPSHOTS.md).
    let note = |text: String| {
        let _ =
            events.send(FromWorker::Log { container_id: cid.clone(), stream: LogStream::Stderr, data: text });
    };
    let mut plan = match &snaps {
        Some(sn) => {
            let (sn, a) = (sn.clone(), a.clone());
            tokio::task::spawn_blocking(move || sn.plan(&a))
                .await
                .map_err(|e| WorkerError::task("snapshot", e))?
        }
        None => snapshot::Plan::Off,
    };
    if let (snapshot::Plan::Unavailable(why), Some(sn)) = (&plan, &snaps) {
        if sn.tell_once(&a.app_id) {
            note(format!("flare: no memory snapshot for {}: {why}; containers start cold\n", a.def.name));
        }
    }
    if let snapshot::Plan::Create { dropped: Some(why), .. } = &plan {
        note(format!("flare: the stored memory snapshot was discarded and is made again: {why}\n"));
    }
    // A checkpoint cannot take a pooled (host-owned) network namespace along: snapshot
    // containers start in their own, and get NAT attached after the checkpoint (or the
    // restore), before RESUME.
    let nat_after = spec.network == flare_runtime::Network::Nat;
    if matches!(plan, snapshot::Plan::Create { .. } | snapshot::Plan::Restore { .. }) {
        spec.checkpointable = true;
        spec.network = flare_runtime::Network::Isolated;
    }
    // A pre-started runner of this spec's template, else a new container. Functions with
    // memory snapshots never take one (a runner is not the checkpointable pid 1 that a
    // snapshot needs; prestart::template refuses checkpointable specs too).
    let mut template = match pool.enabled() && !a.def.config.enable_memory_snapshot {
        true => prestart::template(&spec, &spec::prestart_env(a), sources.code.as_deref(), &api_path)
            .inspect_err(
                |why| tracing::debug!(container = %cid, %why, "no pre-started runner for this function"),
            )
            .ok(),
        false => None,
    };
    let assigned = match template.as_ref().and_then(|t| pool.take(t)) {
        Some(runner) => assign_runner(runner, &spec, &cid).await,
        None => None,
    };
    let init_extra = assigned.is_some().then(|| (spec.env.clone(), spec.cwd.clone()));
    // What a checkpoint names as its private binds (only snapshot containers need it; a
    // failed restore may turn into a create).
    let dump_binds = matches!(plan, snapshot::Plan::Create { .. } | snapshot::Plan::Restore { .. })
        .then(|| cfg.runtime.private_binds(&spec))
        .unwrap_or_default();
    let (mut container, listener, frames_r, to_w, out_r, err_r, _paths, is_restored) = match assigned {
        Some(r) => {
            steps.mark("assign");
            r.listener.set_nonblocking(true).map_err(|e| WorkerError::io("api socket", e))?;
            let listener = tokio::net::UnixListener::from_std(r.listener)
                .map_err(|e| WorkerError::io("api socket", e))?;
            (
                r.container,
                listener,
                r.frames_out,
                r.frames_in,
                r.stdout,
                r.stderr,
                Paths::Runner(r.paths),
                false,
            )
        }
        None => {
            std::fs::create_dir_all(&cfg.socket_dir).map_err(|e| WorkerError::io("api socket dir", e))?;
            let _ = std::fs::remove_file(&api_path);
            let listener = tokio::net::UnixListener::bind(&api_path)
                .map_err(|e| WorkerError::io(format!("api socket {}", api_path.display()), e))?;
            let guard = RemoveOnDrop(api_path.clone());
            {
                // Root in the container is an unprivileged host uid (user namespace): it
                // connects through the bind mount, so the socket is open to all; the dir
                // keeps host users out.
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&cfg.socket_dir, std::fs::Permissions::from_mode(0o700));
                std::fs::set_permissions(&api_path, std::fs::Permissions::from_mode(0o666))
                    .map_err(|e| WorkerError::io(format!("api socket {}", api_path.display()), e))?;
            }
            steps.mark("api_socket");
            // Frames travel on two pipes (fd 3: container to worker, fd 4: worker to
            // container): unlike a socket, a pipe belongs to no network namespace, so CRIU
            // can hand a restored container new ones (docs/SNAPSHOTS.md).
            let (frames_r, frames_w) = frame_pipe()?;
            let (to_r, to_w) = frame_pipe()?;
            let (out_r, out_w) = pipe().map_err(|e| WorkerError::io("pipe", e))?;
            let (err_r, err_w) = pipe().map_err(|e| WorkerError::io("pipe", e))?;
            let rt = cfg.runtime.clone();
            let restore_from = match &plan {
                snapshot::Plan::Restore { key, images, meta } => {
                    snaps.clone().map(|sn| (sn, key.clone(), images.clone(), meta.clone()))
                }
                _ => None,
            };
            let (spawned, restored) = tokio::task::spawn_blocking(move || {
                let mut restored = None;
                if let Some((sn, key, images, old)) = restore_from {
                    match sn.restore(&rt, &spec, &images, &old, [&out_w, &err_w, &frames_w, &to_r]) {
                        Ok((c, took)) => {
                            sn.touch(&key);
                            return (Ok(c), Some(Ok(took)));
                        }
                        Err(e) => {
                            // Never fail the input: forget the snapshot and start cold
                            // (making a new one if no other container is, which
                            // replaces this one in the fleet too).
                            sn.discard_everywhere(&key);
                            let create = sn.begin_create(&key);
                            spec.checkpointable = create;
                            restored = Some(Err((e, create.then_some(key))));
                        }
                    }
                }
                (sandbox::spawn(&rt, spec, out_w, err_w, vec![(frames_w, 3), (to_r, 4)]), restored)
            })
            .await
            .map_err(|e| WorkerError::task("spawn", e))?;
            let container = match spawned {
                Ok(c) => c,
                Err(e) => {
                    if let (snapshot::Plan::Create { key, .. }, Some(sn)) = (&plan, &snaps) {
                        sn.done_creating(key);
                    }
                    return Err(WorkerError::Spawn(e));
                }
            };
            steps.mark("spawn");
            let is_restored = match restored {
                Some(Ok(took)) => {
                    tracing::info!(container = %cid, ms = took.as_millis() as u64, "restored from a memory snapshot");
                    note(format!(
                        "flare: container restored from a memory snapshot in {} ms\n",
                        took.as_millis()
                    ));
                    true
                }
                Some(Err((e, create))) => {
                    tracing::warn!(container = %cid, error = %e, "snapshot restore failed; starting cold");
                    note(format!(
                        "flare: restoring the memory snapshot failed, starting cold instead: {e}\n"
                    ));
                    plan = match create {
                        Some(key) => snapshot::Plan::Create { key, dropped: None },
                        None => snapshot::Plan::Busy,
                    };
                    false
                }
                None => false,
            };
            (container, listener, frames_r, to_w, out_r, err_r, Paths::Socket(guard), is_restored)
        }
    };
    let pipes = snapshot::PipeInodes {
        stdout: snapshot::inode(&out_r),
        stderr: snapshot::inode(&err_r),
        frames_out: snapshot::inode(&frames_r),
        // The same pipe as the container's fd 4 (both ends share its inode).
        frames_in: snapshot::inode(&to_w),
    };
    // Every request on this socket names its container, so the control plane scopes it to
    // the container's app (any value the container sends is replaced).
    let caller = axum::http::HeaderValue::from_str(&cid)
        .map_err(|e| WorkerError::io("container id", std::io::Error::other(e)))?;
    let api = cfg.api.clone().layer(axum::middleware::from_fn(
        move |mut req: axum::extract::Request, next: axum::middleware::Next| {
            req.headers_mut().insert(flare_api::CALLER_CONTAINER_HEADER, caller.clone());
            next.run(req)
        },
    ));
    let _web_guard = cfg.web.register(&cid, container.pid(), &a.def.web);
    let api_task = tokio::spawn(axum::serve(listener, api).into_future());
    let _api_guard = AbortOnDrop(api_task);
    tracing::debug!(container = %cid, us = t0.elapsed().as_micros() as u64, "container spawned");

    let memory_limit = container.memory_limit();
    let pidfd = container.pidfd().try_clone_to_owned().map_err(|e| WorkerError::io("pidfd", e))?;
    // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it until dropped; its raw
    // fd stays the same open pidfd for that whole time.
    let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|e| WorkerError::io("pidfd", e.into()))?;
    let mut out = Pipe::new(out_r, LogStream::Stdout).map_err(|e| WorkerError::io("pipe", e))?;
    let mut err = Pipe::new(err_r, LogStream::Stderr).map_err(|e| WorkerError::io("pipe", e))?;

    let mut rd = tokio::net::unix::pipe::Receiver::from_owned_fd(frames_r)
        .map_err(|e| WorkerError::io("container frames pipe", e))?;
    let mut wr = tokio::net::unix::pipe::Sender::from_owned_fd(to_w)
        .map_err(|e| WorkerError::io("container frames pipe", e))?;
    // Writer: frames to the container, in order, without blocking the event loop.
    let (wtx, mut wrx) = mpsc::unbounded_channel::<Bytes>();
    let writer = tokio::spawn(async move {
        while let Some(b) = wrx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    let _writer_guard = AbortOnDrop(writer);
    // Reader: frames from the container.
    let (ftx, mut frx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut rd = tokio::io::BufReader::with_capacity(64 * 1024, &mut rd);
        loop {
            match frame::read(&mut rd).await {
                Ok(Some(f)) => {
                    if ftx.send(Ok(f)).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = ftx.send(Err(e.to_string()));
                    break;
                }
            }
        }
    });
    let _reader_guard = AbortOnDrop(reader);
    if is_restored {
        if nat_after {
            attach_nat(&mut container, &cid, &note);
        }
        let _ = wtx.send(resume_frame(a, true));
    } else {
        let _ = wtx.send(init_frame(a, matches!(plan, snapshot::Plan::Create { .. }), init_extra));
    }

    let timeout = Duration::from_millis(a.def.config.timeout.max(1) * 1000);
    let start_limit = timeout.max(Duration::from_secs(60));
    let mut state = phase::State::starting(Instant::now() + start_limit);
    let mut report = ExitReport { memory_limit, ..Default::default() };
    // The event sources that are still open (a closed one is not polled again).
    let mut frames_open = true;
    let mut cmds_open = true;
    let mut explain_exit = false;
    let mut obuf = vec![0u8; 64 * 1024];
    let mut ebuf = vec![0u8; 64 * 1024];

    loop {
        let next_deadline = state.next_deadline();
        // Wait for the next event; the pipes are forwarded as they are read.
        let event = tokio::select! {
            f = frx.recv(), if frames_open => match f {
                Some(Ok(f)) => match f.kind {
                    frame::READY => Event::Ready,
                    frame::INIT_FAILURE => Event::InitFailure(
                        serde_json::from_slice::<InitFailureHeader>(&f.header)
                            .map(|h| h.exception)
                            .unwrap_or_else(|e| ExceptionInfo::new("flare.exception.ExecutionError", format!("container start failed (unreadable report: {e})"))),
                    ),
                    frame::SNAPSHOT_READY => {
                        let refused = serde_json::from_slice::<SnapshotReadyHeader>(&f.header)
                            .map(|h| h.refused)
                            .unwrap_or_else(|e| Some(format!("unreadable SNAPSHOT_READY ({e})")));
                        if let (snapshot::Plan::Create { key, .. }, Some(sn)) = (&plan, &snaps) {
                            match refused {
                                Some(why) => note(format!("flare: no memory snapshot taken: {why}\n")),
                                None => {
                                    let (sn2, key2, pid, lineage) =
                                        (sn.clone(), key.clone(), container.pid(), snapshot::lineage_of(a));
                                    let binds = dump_binds.clone();
                                    let dumped = tokio::task::spawn_blocking(move || sn2.dump(pid, &binds)).await;
                                    // The runner waits for RESUME: its root's files are still.
                                    let saved = match dumped {
                                        Ok(Ok((dir, rep))) => match container.copy_upper(&dir.join(snapshot::UPPER_DIR)) {
                                            Ok(()) => {
                                                let sn2 = sn.clone();
                                                tokio::task::spawn_blocking(move || sn2.save(&key2, &lineage, &dir, pipes, &rep)).await
                                            }
                                            Err(e) => {
                                                let _ = std::fs::remove_dir_all(&dir);
                                                Ok(Err(snapshot::SnapError::Runtime(e)))
                                            }
                                        },
                                        Ok(Err(e)) => Ok(Err(e)),
                                        Err(e) => Err(e),
                                    };
                                    match saved {
                                        Ok(Ok(m)) => {
                                            tracing::info!(container = %cid, dump_ms = m.dump_ms, bytes = m.image_bytes, "memory snapshot saved");
                                            note(format!(
                                                "flare: memory snapshot saved ({:.1} MiB, dump {} ms, {:.1} MiB shared with the previous one)\n",
                                                m.image_bytes as f64 / 1048576.0,
                                                m.dump_ms,
                                                m.shared_bytes as f64 / 1048576.0
                                            ));
                                            share_snapshot(sn.clone(), m, cid.clone(), events.clone());
                                        }
                                        Ok(Err(e)) => note(format!("flare: memory snapshot failed: {e}\n")),
                                        Err(e) => note(format!("flare: memory snapshot failed: {e}\n")),
                                    }
                                }
                            }
                            sn.done_creating(key);
                        }
                        if nat_after {
                            attach_nat(&mut container, &cid, &note);
                        }
                        let _ = wtx.send(resume_frame(a, false));
                        continue;
                    }
                    frame::OUTPUTS => match parse_outputs(&f) {
                        Ok(outputs) => Event::Outputs(outputs),
                        Err(e) => {
                            tracing::error!(container = %cid, error = %e, "protocol error; stopping container");
                            Event::ProtocolError
                        }
                    },
                    other => {
                        tracing::error!(container = %cid, kind = other, "unexpected frame; stopping container");
                        Event::ProtocolError
                    }
                },
                Some(Err(e)) => {
                    if state.stopping() || report.requested {
                        tracing::debug!(container = %cid, error = %e, "socket closed while stopping");
                    } else {
                        tracing::error!(container = %cid, error = %e, "bad frame; stopping container");
                    }
                    Event::ProtocolError
                }
                None => {
                    frames_open = false;
                    continue;
                }
            },
            c = cmds.recv(), if cmds_open => match c {
                Some(Cmd::Inputs(inputs)) => {
                    steps.mark_once("inputs");
                    Event::Inputs(inputs)
                }
                Some(Cmd::Stop { graceful }) => Event::Stop { graceful },
                None => {
                    cmds_open = false;
                    Event::CommandsClosed
                }
            },
            r = out.rx.read(&mut obuf), if !out.eof => {
                let n = r.unwrap_or(0);
                out.emit(n, &obuf, &cid, events);
                continue;
            }
            r = err.rx.read(&mut ebuf), if !err.eof => {
                let n = r.unwrap_or(0);
                err.emit(n, &ebuf, &cid, events);
                continue;
            }
            _ = pidfd.readable() => Event::Exited,
            _ = sleep_until_opt(next_deadline), if next_deadline.is_some() => Event::Timer,
        };
        let exited = matches!(event, Event::Exited);
        let actions;
        (state, actions) = phase::step(state, event, Instant::now());
        for action in actions {
            match action {
                Action::Ready => {
                    steps.mark("ready");
                    tracing::debug!(container = %cid, ms = t0.elapsed().as_millis() as u64, "ready");
                    // Keep (or start) runners of this template for the next start.
                    if let Some(t) = template.take() {
                        pool.used(t, &sources);
                        pool.reconcile_soon(cfg);
                    }
                    if let (Some(img), Some(host)) = (&a.def.image, &cfg.images) {
                        let (host, manifest) = (host.clone(), img.manifest.clone());
                        tokio::task::spawn_blocking(move || host.record_start(&manifest));
                    }
                    let _ = events.send(FromWorker::Ready { container_id: cid.clone() });
                }
                Action::InitFailed(exception) => {
                    out.drain_now(&mut obuf, &cid, events);
                    err.drain_now(&mut ebuf, &cid, events);
                    let _ = events.send(FromWorker::InitFailed { container_id: cid.clone(), exception });
                }
                Action::Forward(outputs) => {
                    if steps.mark_once("first_output") {
                        tracing::debug!(container = %cid, steps = %steps, "cold start steps");
                    }
                    // Prints made before the result go out before it.
                    out.drain_now(&mut obuf, &cid, events);
                    err.drain_now(&mut ebuf, &cid, events);
                    let _ = events.send(FromWorker::Outputs { container_id: cid.clone(), outputs });
                }
                Action::SendInputs(inputs) => {
                    let _ = wtx.send(inputs_frame(&inputs));
                }
                Action::SendShutdown => {
                    let _ = wtx.send(frame::encode(frame::SHUTDOWN, b"{}", b""));
                }
                Action::Kill => {
                    let _ = container.kill();
                }
                Action::MarkRequested => report.requested = true,
                Action::InputTimedOut(id) => {
                    tracing::info!(container = %cid, input = %id, "input timed out; killing its container");
                    report.timed_out_input = Some(id);
                }
                Action::StartTimedOut => {
                    report.start_error =
                        Some(format!("container did not become ready within {} s", start_limit.as_secs()));
                }
                Action::ExplainEarlyExit => explain_exit = true,
            }
        }
        if exited {
            break;
        }
    }
    // Everything in the container is gone with its init; the pipes reach EOF.
    let drain = async {
        while !out.eof {
            let n = out.rx.read(&mut obuf).await.unwrap_or(0);
            out.emit(n, &obuf, &cid, events);
        }
        while !err.eof {
            let n = err.rx.read(&mut ebuf).await.unwrap_or(0);
            err.emit(n, &ebuf, &cid, events);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    let info = container.try_wait().ok().flatten();
    if let Some(info) = info {
        report.code = info.code;
        report.signal = info.signal;
        report.oom_killed = info.oom_killed;
    }
    if explain_exit {
        let status = flare_proto::exit_status_text(report.code, report.signal, false);
        let tail = err.dec.tail_text();
        report.start_error = Some(if report.oom_killed {
            format!(
                "container ran out of memory (OOM) while starting (limit {} MiB)",
                memory_limit.unwrap_or(0) / (1024 * 1024)
            )
        } else if tail.trim().is_empty() {
            format!("container exited before it was ready ({status})")
        } else {
            format!(
                "container exited before it was ready ({status}); its stderr ended with:\n{}",
                tail.trim_end()
            )
        });
    }
    let cid2 = cid.clone();
    let cleanup = tokio::task::spawn_blocking(move || container.cleanup()).await;
    match cleanup {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(container = %cid2, error = %e, "container cleanup incomplete"),
        Err(e) => tracing::warn!(container = %cid2, error = %e, "container cleanup task failed"),
    }
    tracing::debug!(container = %cid, ?report, "container done");
    Ok(report)
}

/// Outbound NAT for a snapshot container's own network namespace; a failure leaves it
/// loopback-only and says so in the app's logs.
fn attach_nat(container: &mut flare_runtime::Container, cid: &str, note: &impl Fn(String)) {
    if let Err(e) = container.attach_nat() {
        tracing::warn!(container = %cid, error = %e, "could not attach NAT to a snapshot container");
        note(format!("flare: this container has no outbound network: {e}\n"));
    }
}

/// A pipe for frames, as large as an unprivileged pipe may be (fewer wake-ups for big
/// inputs and outputs; the default size where that fails).
pub(crate) fn frame_pipe() -> Result<(OwnedFd, OwnedFd), WorkerError> {
    use std::os::fd::AsRawFd;
    let (r, w) = pipe().map_err(|e| WorkerError::io("pipe", e))?;
    // SAFETY: fcntl F_SETPIPE_SZ on an open pipe fd; failure leaves the default size.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    Ok((r, w))
}

/// Fetches a mount from the control plane into `mounts/<id>` unless it is there already
/// (written to a temporary dir, then renamed, so a half-written mount is never used).
async fn ensure_mount(mounts: &Path, mount_id: &str, src: &http::HttpClient) -> Result<(), WorkerError> {
    if mount_id.is_empty() || mount_id.contains('/') || mount_id.starts_with('.') {
        return Err(WorkerError::InvalidMountId(mount_id.to_owned()));
    }
    let fetch = |message: String| WorkerError::FetchMount { id: mount_id.to_owned(), message };
    let dir = mounts.join(mount_id);
    if dir.is_dir() {
        return Ok(());
    }
    let body = src.get(&format!("/v1/mounts/{mount_id}")).await.map_err(|e| fetch(e.to_string()))?;
    let m: flare_api::CreateMount =
        serde_json::from_slice(&body).map_err(|e| fetch(format!("bad response: {e}")))?;
    m.validate().map_err(|e| fetch(e.message))?;
    // Unique per fetch: containers of one function often fetch the same mount at once.
    static FETCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = FETCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = mounts.join(format!(".tmp-{mount_id}-{}-{n}", std::process::id()));
    let write = || flare_api::write_mount_dir(&dir, &tmp, &m.files);
    tokio::task::block_in_place(write)
        .map_err(|source| WorkerError::StoreMount { id: mount_id.to_owned(), source })
}

async fn sleep_until_opt(d: Option<Instant>) {
    match d {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// When each step of a container's start finished (microseconds since the assignment
/// arrived), logged at debug once its first output is forwarded: the measurement behind
/// the cold-start step table in `bench/README.md`.
struct StartSteps {
    t0: Instant,
    marks: Vec<(&'static str, u64)>,
}

impl StartSteps {
    fn new(t0: std::time::Instant) -> Self {
        Self { t0: Instant::from_std(t0), marks: Vec::with_capacity(8) }
    }

    fn mark(&mut self, step: &'static str) {
        self.marks.push((step, self.t0.elapsed().as_micros() as u64));
    }

    /// Marks `step` unless it was marked before; whether it marked.
    fn mark_once(&mut self, step: &'static str) -> bool {
        if self.marks.iter().any(|(s, _)| *s == step) {
            return false;
        }
        self.mark(step);
        true
    }
}

impl std::fmt::Display for StartSteps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (step, us)) in self.marks.iter().enumerate() {
            write!(f, "{}{step}={us}", if i == 0 { "" } else { " " })?;
        }
        Ok(())
    }
}

/// A pre-started runner made the container of `spec`: its code mount (and the binds
/// under it) attached, its limits written. `None` (the runner stopped) when that failed.
async fn assign_runner(
    runner: prestart::Runner,
    spec: &flare_runtime::CommandSpec,
    cid: &str,
) -> Option<prestart::Runner> {
    let attach = prestart::attach_list(&spec.binds);
    let limits = spec.limits.clone();
    let cid = cid.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut r = runner;
        let done = r.container.attach_binds(&attach).and_then(|()| r.container.apply_limits(&limits));
        match done {
            Ok(()) => {
                tracing::debug!(container = %cid, runner = %r.container.id(), "assigned a pre-started runner");
                Some(r)
            }
            Err(e) => {
                tracing::warn!(container = %cid, runner = %r.container.id(), error = %e, "assigning a pre-started runner failed; starting a new container");
                None
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// What a container's start left on the host that goes with it.
enum Paths {
    Socket(#[allow(dead_code)] RemoveOnDrop),
    Runner(#[allow(dead_code)] prestart::RunnerPaths),
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

//! `flared`: the Flare daemon.
//!
//! - `flared server`: the control plane and one in-process worker, SQLite and a local data
//!   dir under `FLARE_HOME`: the embedded default that `flare run` starts. With
//!   `--worker-token` it also accepts remote workers.
//! - `flared control`: the control plane alone; workers join over gRPC on the API's port.
//! - `flared worker --control URL --token T`: a worker agent on its own machine.
//!   `flared worker drain` asks the worker of a data dir to finish its work and leave.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use flare_control::{api, grpc, ControlPlane, WorkerLink};
use flare_runtime::{Runtime, RuntimeConfig};
use flare_store::SqliteStore;
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(name = "flared", version, about = "The Flare daemon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Control plane and one worker in one process (the embedded default).
    Server(ServerArgs),
    /// The control plane alone: API, scheduler, state; workers join it over the network.
    Control(ControlArgs),
    /// A worker agent that joins a control plane (or `drain` to make one leave).
    Worker(WorkerArgs),
    /// Print the GPUs this machine offers (as NVML reports them), as JSON.
    Gpus,
    /// Delete blobs no image, layer or mount references (safe while a server builds:
    /// blobs written or touched within the grace period are kept).
    Gc(GcArgs),
}

#[derive(clap::Args)]
struct GcArgs {
    #[arg(long, env = "FLARE_HOME")]
    home: Option<PathBuf>,
    /// Keep unreferenced blobs younger than this many seconds.
    #[arg(long, default_value_t = 3600)]
    grace_secs: u64,
}

#[derive(clap::Args)]
struct CommonArgs {
    /// Data directory (state database, mounts, logs, container state).
    #[arg(long, env = "FLARE_HOME")]
    home: Option<PathBuf>,
    /// Address of the HTTP API (remote workers use the same port).
    #[arg(long, default_value = "127.0.0.1:7878", env = "FLARE_LISTEN")]
    listen: SocketAddr,
    #[command(flatten)]
    host_binds: HostBindArgs,
    #[command(flatten)]
    api: ApiArgs,
}

/// Limits of the API and of what containers may use by default.
#[derive(clap::Args)]
struct ApiArgs {
    /// A host name the API answers to besides IP addresses and localhost (repeatable;
    /// `*`: any). Requests with another `Host` are refused (DNS rebinding protection),
    /// so a fleet that reaches the control plane by name lists that name here.
    #[arg(long = "allowed-host", value_name = "NAME", env = "FLARE_ALLOWED_HOSTS", value_delimiter = ',')]
    allowed_hosts: Vec<String>,
    /// Memory limit (MiB) of containers whose function sets no `memory=` (0: none).
    #[arg(long, value_name = "MIB", default_value_t = flare_control::DEFAULT_MEMORY_LIMIT_MB, env = "FLARE_DEFAULT_MEMORY")]
    default_memory: u64,
    /// Log data kept per app (MiB); the oldest records are deleted first, with a note.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    log_retention_mib: u64,
    /// Days logs are kept.
    #[arg(long, value_name = "DAYS", default_value_t = 7.0)]
    log_retention_days: f64,
    /// Days a spawned call's result is kept in the store after the call finished
    /// (`FunctionCall.get()` after that: not found).
    #[arg(long, value_name = "DAYS", default_value_t = flare_control::DEFAULT_CALL_RETENTION_DAYS)]
    call_retention_days: f64,
    /// Inputs of a `.map` that may be accepted but not consumed yet (queued, running, or
    /// with an output its caller has not read); the submitter waits past it.
    #[arg(long, value_name = "N", default_value_t = flare_control::DEFAULT_CALL_WINDOW)]
    call_window: u64,
    /// Log output a container may write per second (KiB, sustained); more is dropped, with a note.
    #[arg(long, value_name = "KIB", default_value_t = 1024)]
    log_rate_kib: u64,
    /// Log output a container may write in one burst (KiB).
    #[arg(long, value_name = "KIB", default_value_t = 8192)]
    log_burst_kib: u64,
    /// The web endpoints' domain: each is served at `<label>.<domain>` (default
    /// `localhost:<API port>`, which browsers and curl resolve to loopback with no DNS
    /// set-up; a fleet behind a real domain sets it, e.g. `flare.example.com`, with a
    /// wildcard DNS record and TLS terminated in front).
    #[arg(long, value_name = "DOMAIN", env = "FLARE_WEB_DOMAIN")]
    web_domain: Option<String>,
    /// The scheme of the endpoint URLs handed out (`https` when TLS is terminated in front).
    #[arg(long, value_name = "SCHEME", default_value = "http", env = "FLARE_WEB_SCHEME")]
    web_scheme: String,
    /// Largest web request body (MiB); larger ones get 413.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    web_max_body_mib: u64,
    /// Request bodies held in memory at once, all requests together (MiB).
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    body_budget_mib: usize,
    /// Open HTTP connections at most; more wait in the listen backlog.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers (slow clients are disconnected).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    header_timeout_secs: u64,
    /// Seconds an ephemeral Dict or Queue lives without a heartbeat from its client
    /// (clients send one every 30 s; one whose client died is deleted after this).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    ephemeral_ttl_secs: u64,
}

impl ApiArgs {
    fn control_config(&self) -> Result<flare_control::ControlConfig> {
        if self.log_retention_days.is_nan()
            || self.log_retention_days <= 0.0
            || self.log_rate_kib == 0
            || self.log_burst_kib == 0
        {
            bail!("--log-retention-days, --log-rate-kib and --log-burst-kib must be positive");
        }
        if self.call_retention_days.is_nan() || self.call_retention_days <= 0.0 || self.call_window == 0 {
            bail!("--call-retention-days and --call-window must be positive");
        }
        if self.body_budget_mib == 0
            || self.max_connections == 0
            || self.header_timeout_secs == 0
            || self.ephemeral_ttl_secs == 0
        {
            bail!(
                "--body-budget-mib, --max-connections, --header-timeout-secs and --ephemeral-ttl-secs must be positive"
            );
        }
        Ok(flare_control::ControlConfig {
            default_memory_mb: self.default_memory,
            log_retention_bytes: self.log_retention_mib << 20,
            log_retention_age: Duration::from_secs_f64(self.log_retention_days * 86400.0),
            log_rate_bytes: self.log_rate_kib << 10,
            log_burst_bytes: self.log_burst_kib << 10,
            body_budget_bytes: self.body_budget_mib << 20,
            call_retention: Duration::from_secs_f64(self.call_retention_days * 86400.0),
            call_window: self.call_window,
            worker_token: None,
            web: Default::default(),
            ephemeral_ttl: Duration::from_secs(self.ephemeral_ttl_secs),
        })
    }

    fn web_settings(&self, listen: SocketAddr) -> Result<flare_control::services::ingress::WebSettings> {
        if !matches!(self.web_scheme.as_str(), "http" | "https") {
            bail!("--web-scheme must be http or https");
        }
        let domain = self.web_domain.clone().unwrap_or_else(|| format!("localhost:{}", listen.port()));
        if domain.is_empty() || domain.contains('/') || domain.starts_with('.') {
            bail!("--web-domain {domain:?}: expected a domain, with an optional port (flare.example.com)");
        }
        Ok(flare_control::services::ingress::WebSettings {
            domain: domain.to_ascii_lowercase(),
            scheme: self.web_scheme.clone(),
            max_body_bytes: self.web_max_body_mib << 20,
        })
    }

    fn listen_limits(&self) -> ListenLimits {
        ListenLimits {
            max_connections: self.max_connections,
            header_timeout: Duration::from_secs(self.header_timeout_secs),
            policy: api::SitePolicy::new(&self.allowed_hosts),
        }
    }
}

/// How the API listener protects the daemon.
struct ListenLimits {
    max_connections: usize,
    header_timeout: Duration,
    policy: api::SitePolicy,
}

#[derive(clap::Args)]
struct PrestartArgs {
    /// Pre-started runners this worker keeps idle, all images together (0: none). Each is
    /// an interpreter with the runner imported, owned by no app until one is assigned; a
    /// cold start of a function with its image then only imports the user's module.
    #[arg(long = "prestart-runners", value_name = "N", env = "FLARE_PRESTART_RUNNERS",
          default_value_t = flare_worker::prestart::PrestartConfig::default().runners)]
    runners: usize,
    /// At most this many idle runners of one image (and interpreter and network mode).
    #[arg(long = "prestart-per-image", value_name = "N", env = "FLARE_PRESTART_PER_IMAGE",
          default_value_t = flare_worker::prestart::PrestartConfig::default().per_template)]
    per_image: usize,
    /// Stop an image's idle runners when no container of it started for this long.
    #[arg(long = "prestart-idle-secs", value_name = "SECS", env = "FLARE_PRESTART_IDLE_SECS",
          default_value_t = flare_worker::prestart::PrestartConfig::default().idle_ttl.as_secs())]
    idle_secs: u64,
}

impl PrestartArgs {
    fn config(&self) -> flare_worker::prestart::PrestartConfig {
        flare_worker::prestart::PrestartConfig {
            runners: self.runners,
            per_template: self.per_image,
            idle_ttl: Duration::from_secs(self.idle_secs),
            ..Default::default()
        }
    }
}

#[derive(clap::Args)]
struct HostBindArgs {
    /// A host directory whose contents function definitions may have bound into their
    /// containers (repeatable; env: colon-separated). Default: none, so a captured Python
    /// environment comes from the store. The data dir, /proc, /sys, /dev, /run are never bound.
    #[arg(
        long = "host-bind-allow",
        value_name = "DIR",
        env = "FLARE_HOST_BIND_ALLOW",
        value_delimiter = ':'
    )]
    allow: Vec<PathBuf>,
}

impl HostBindArgs {
    /// The policy for `home`, installed for the API's checks and returned for the worker.
    fn install(&self, home: &Path) -> Result<flare_api::HostBindPolicy> {
        let allow: Vec<PathBuf> = self.allow.iter().filter(|p| !p.as_os_str().is_empty()).cloned().collect();
        let policy = flare_api::HostBindPolicy::with_allowed(&allow, Some(home))
            .map_err(|e| anyhow::anyhow!("--host-bind-allow {e}"))?;
        if !policy.allowed().is_empty() {
            tracing::info!(allowed = ?policy.allowed(), "host dirs containers may have bound");
        }
        flare_api::set_host_bind_policy(policy.clone());
        Ok(policy)
    }
}

#[derive(clap::Args)]
struct ServerArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Give containers no outbound network, even when NAT could be set up.
    #[arg(long, env = "FLARE_NO_NAT")]
    no_nat: bool,
    /// Also accept remote workers that present this token.
    #[arg(long, env = "FLARE_WORKER_TOKEN")]
    worker_token: Option<String>,
    #[command(flatten)]
    prestart: PrestartArgs,
}

#[derive(clap::Args)]
struct ControlArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The token workers must present to join.
    #[arg(long, env = "FLARE_WORKER_TOKEN")]
    worker_token: String,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WorkerAction {
    /// Run the worker (the default).
    Run,
    /// Ask the worker using --home to stop taking work, finish, and leave.
    Drain,
}

#[derive(clap::Args)]
struct WorkerArgs {
    #[arg(value_enum, default_value = "run")]
    action: WorkerAction,
    /// The control plane's URL, e.g. http://10.0.0.1:7878.
    #[arg(long, env = "FLARE_CONTROL_URL")]
    control: Option<String>,
    /// The control plane's worker token.
    #[arg(long, env = "FLARE_WORKER_TOKEN")]
    token: Option<String>,
    /// Data directory of this worker (mount cache, container state).
    #[arg(long, env = "FLARE_HOME")]
    home: Option<PathBuf>,
    /// Worker id (default: the host name plus the data dir).
    #[arg(long)]
    id: Option<String>,
    /// GPUs this machine offers, e.g. `--gpu H100:8` (repeatable); replaces what NVML
    /// discovers (for machines where it cannot, and to test placement).
    #[arg(long = "gpu")]
    gpus: Vec<String>,
    /// CPU (cores) offered to containers (default: all).
    #[arg(long)]
    cpu: Option<f64>,
    /// Memory (MiB) offered to containers (default: all).
    #[arg(long)]
    memory: Option<u64>,
    /// Give containers no outbound network.
    #[arg(long, env = "FLARE_NO_NAT")]
    no_nat: bool,
    /// Address shown for this worker in `flare worker list`.
    #[arg(long, default_value = "")]
    address: String,
    /// Where this worker serves the control plane's tunnels to its containers' web
    /// endpoints (e.g. `0.0.0.0:7879`); without it, its containers serve no web requests.
    #[arg(long, value_name = "ADDR", env = "FLARE_WEB_LISTEN")]
    web_listen: Option<SocketAddr>,
    /// The host:port the control plane dials for the tunnel (default: `--web-listen`, with
    /// the address this worker's session comes from when that is 0.0.0.0).
    #[arg(long, value_name = "HOST:PORT")]
    web_advertise: Option<String>,
    #[command(flatten)]
    host_binds: HostBindArgs,
    #[command(flatten)]
    prestart: PrestartArgs,
}

fn default_home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root")).join(".flare")
}

fn prepare_home(home: Option<PathBuf>) -> Result<PathBuf> {
    let home = home.unwrap_or_else(default_home);
    std::fs::create_dir_all(home.join("mounts")).with_context(|| format!("creating {}", home.display()))?;
    Ok(home.canonicalize()?)
}

/// Holds an exclusive lock on `home/<name>.lock` for the life of the process.
fn lock_home(home: &Path, name: &str) -> Result<std::fs::File> {
    let path = home.join(format!("{name}.lock"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd we own; non-blocking exclusive lock.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        bail!("another {name} is already using {} (stop it first)", home.display());
    }
    Ok(f)
}

fn write_pid(home: &Path, name: &str) -> Result<PathBuf> {
    let p = home.join(format!("{name}.pid"));
    std::fs::File::create(&p)?.write_all(format!("{}\n", std::process::id()).as_bytes())?;
    Ok(p)
}

/// A cgroup parent name unique to this data dir, so two daemons never clean up each other.
fn cgroup_parent(home: &Path) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in home.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("flare-{:08x}", h as u32)
}

/// Where this daemon's containers' API sockets live: short, and unique per data dir.
fn socket_dir(home: &Path) -> PathBuf {
    PathBuf::from("/run/flare-sockets").join(cgroup_parent(home))
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} must run as root: containers need namespaces, mounts and cgroups");
    }
    Ok(())
}

fn start_runtime(home: &Path, no_nat: bool) -> Result<Arc<Runtime>> {
    let runtime = Runtime::new(RuntimeConfig {
        state_dir: home.join("run"),
        cgroup_parent: cgroup_parent(home),
        enable_nat: !no_nat,
        userns: Some(flare_runtime::UserNamespace::DEFAULT),
    })
    .context("starting the container runtime")?;
    match runtime.cleanup_stale() {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "cleaned up containers left by a previous run"),
        Err(e) => tracing::warn!(error = %e, "could not clean up a previous run"),
    }
    Ok(Arc::new(runtime))
}

/// The image service: the blob store, chunk cache and builder of `home`.
struct Images {
    builder: Arc<flare_image::Builder>,
    host: Arc<flare_worker::images::ImageHost>,
}

impl flare_control::ImageService for Images {
    fn resolve(&self, image_id: &str) -> Result<flare_proto::ImageUse, flare_api::ApiError> {
        self.builder.resolve(image_id).map_err(|e| e.to_api())
    }

    fn mount_files(
        &self,
        entries: &serde_json::Value,
    ) -> Result<Vec<flare_api::MountFile>, flare_api::ApiError> {
        flare_image::http::mount_files(&self.builder, entries)
    }

    fn blob_store(&self) -> Arc<dyn flare_cas::BlobStore> {
        self.builder.store().clone()
    }

    fn file_content(
        &self,
        digest: &flare_cas::Digest,
        size: u64,
    ) -> Result<flare_cas::FileContent, flare_api::ApiError> {
        if size == 0 {
            return Ok(flare_cas::FileContent::default());
        }
        self.builder.files().content(digest, size).map_err(|e| e.to_api())
    }
}

fn chunk_cache_bytes() -> u64 {
    std::env::var("FLARE_CHUNK_CACHE_GB")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map(|g| (g * (1u64 << 30) as f64) as u64)
        .unwrap_or(flare_worker::images::DEFAULT_CACHE_BYTES)
}

/// Open the blob store, the chunk cache, the builder (building with `runtime`) and the
/// worker-side image host of `home`.
fn open_images(home: &Path, runtime: Option<Arc<Runtime>>) -> Result<Images> {
    let store: Arc<dyn flare_cas::BlobStore> =
        Arc::new(flare_cas::LocalStore::open(&home.join("cas")).context("opening the blob store")?);
    let cache = Arc::new(
        flare_imagefs::ChunkCache::open(&home.join("chunk-cache"), chunk_cache_bytes())
            .context("opening the chunk cache")?,
    );
    let userns = runtime.as_ref().and_then(|r| r.userns());
    let builder = flare_image::Builder::new(flare_image::BuilderConfig {
        home: home.to_path_buf(),
        store: store.clone(),
        cache: cache.clone(),
        runner: runtime.map(|rt| Arc::new(flare_worker::sandbox::Sandboxes::new(rt)) as _),
        step_limits: flare_image::step_limits_from_env().map_err(anyhow::Error::msg)?,
        cloudpickle_dir: None,
        step_disk_quota: flare_image::step_disk_quota_from_env().map_err(anyhow::Error::msg)?,
    })
    .context("starting the image builder")?;
    let host = flare_worker::images::ImageHost::new(store, cache, &home.join("imagefs"))
        .map_err(anyhow::Error::msg)?
        .with_userns(userns);
    Ok(Images { builder: Arc::new(builder), host: Arc::new(host) })
}

fn open_control(home: &Path, config: flare_control::ControlConfig) -> Result<ControlPlane> {
    let store = SqliteStore::open(&home.join("state.db")).context("opening the state database")?;
    let cp = ControlPlane::with_config(Arc::new(store), home, config).context("loading state")?;
    cp.set_heap_trim(flare_runtime::trim_heap);
    Ok(cp)
}

/// The embedded server's worker, reached in-process by the web ingress.
struct LocalWeb(flare_worker::web::WebTargets);

impl flare_control::services::ingress::WebDialer for LocalWeb {
    fn dial(
        &self,
        container_id: &str,
        endpoint: usize,
    ) -> flare_control::services::ingress::upstream::Dialing {
        let (targets, cid) = (self.0.clone(), container_id.to_string());
        Box::pin(async move {
            let s = targets.dial(&cid, endpoint).await?;
            Ok(Box::new(s) as Box<dyn flare_control::services::ingress::WebIo>)
        })
    }
}

/// The API router, plus the worker hub on the same port when a token is set.
fn api_router(cp: &ControlPlane, worker_token: Option<String>) -> axum::Router {
    let router = api::router(cp.clone());
    match worker_token {
        Some(token) if !token.is_empty() => {
            use tonic::server::NamedService;
            type Hub = flare_proto::wire::worker_hub_server::WorkerHubServer<grpc::Hub>;
            router.route_service(&format!("/{}/{{*method}}", Hub::NAME), grpc::service(cp.clone(), token))
        }
        _ => router,
    }
}

/// Serves the API until SIGTERM/SIGINT. Worker sessions are long-lived streams, so on the
/// signal they are ended first, and open connections get at most 5 s to finish.
///
/// HTTP/1 and HTTP/2 (gRPC workers) on one port; at most `max_connections` open at once
/// (more wait in the kernel's backlog) and `header_timeout` to send a request's headers,
/// so slow clients cannot hold the daemon's connections or memory.
async fn serve_api(
    listen: SocketAddr,
    router: axum::Router,
    cp: &ControlPlane,
    limits: ListenLimits,
) -> Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen} (is another server running?)"))?;
    let router = flare_control::services::ingress::layer(api::harden(router, cp, limits.policy), cp.clone());
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    builder.http2().timer(TokioTimer::new());
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut last_full_warning: Option<tokio::time::Instant> = None;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(s) => s,
            Err(_) => {
                if last_full_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(
                        max = limits.max_connections,
                        "connection limit reached; new connections wait"
                    );
                    last_full_warning = Some(tokio::time::Instant::now());
                }
                tokio::select! {
                    s = slots.clone().acquire_owned() => s.context("connection slots closed")?,
                    _ = &mut shutdown => break,
                }
            }
        };
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, never spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn =
            graceful.watch(builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    cp.disconnect_remote_workers("the control plane is shutting down");
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(5)) => {
            tracing::warn!("connections still open 5 s after the shutdown signal; closing anyway");
        }
    }
    Ok(())
}

async fn stop_containers(cp: &ControlPlane) {
    tracing::info!("shutting down: stopping containers");
    cp.shutdown();
    let mut rx = cp.subscribe_containers();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cp.live_containers() > 0 {
        if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
            tracing::warn!(left = cp.live_containers(), "containers still running at exit");
            break;
        }
    }
    // The store's writes are committed behind the API; the last ones before exiting.
    cp.flush().await;
}

async fn server(args: ServerArgs) -> Result<()> {
    let mut config = args.common.api.control_config()?;
    config.worker_token = args.worker_token.clone().filter(|t| !t.is_empty());
    config.web = args.common.api.web_settings(args.common.listen)?;
    let limits = args.common.api.listen_limits();
    let home = prepare_home(args.common.home)?;
    let _lock = lock_home(&home, "flared")?;
    require_root("flared server")?;
    let host_binds = args.common.host_binds.install(&home)?;
    let runtime = start_runtime(&home, args.no_nat)?;
    let cp = open_control(&home, config)?;
    let images = Arc::new(open_images(&home, Some(runtime.clone()))?);
    cp.set_image_service(images.clone());
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let mut res = flare_worker::host_resources();
    let prestart = args.prestart.config();
    // Idle pre-started runners belong to no app: their memory is the worker's, not offered.
    res.memory_mb = res.memory_mb.saturating_sub(prestart.reserved_mb());
    let web_targets = flare_worker::web::WebTargets::default();
    let worker = flare_worker::start(
        flare_worker::WorkerConfig {
            id: "local".into(),
            home: home.clone(),
            runtime: runtime.clone(),
            api: api::container_router(cp.clone()),
            socket_dir: socket_dir(&home),
            mount_source: None,
            images: Some(images.host.clone()),
            host_binds,
            prestart,
            snapshot_share: None,
            web: web_targets.clone(),
        },
        events_tx,
    );
    tokio::spawn(cp.clone().run_worker_events(events_rx));
    let mut link = WorkerLink::local("local", worker.tx.clone(), res.cpu_millis, res.memory_mb);
    link.gpus = discovered_gpus();
    link.web = Some(Arc::new(LocalWeb(web_targets)));
    cp.add_worker(link);
    let pid_path = write_pid(&home, "flared")?;
    tracing::info!(listen = %args.common.listen, home = %home.display(), cgroups = ?runtime.cgroup_mode(), remote_workers = args.worker_token.is_some(), "flared server ready");
    let router = api_router(&cp, args.worker_token).merge(flare_image::http::router(images.builder.clone()));
    serve_api(args.common.listen, router, &cp, limits).await?;
    stop_containers(&cp).await;
    let w = worker.clone();
    let _ = tokio::task::spawn_blocking(move || w.shutdown_prestarted()).await;
    let _ = std::fs::remove_file(&pid_path);
    Ok(())
}

async fn control(args: ControlArgs) -> Result<()> {
    if args.worker_token.is_empty() {
        bail!("--worker-token (or FLARE_WORKER_TOKEN) must not be empty: workers join with it");
    }
    let mut config = args.common.api.control_config()?;
    config.worker_token = Some(args.worker_token.clone());
    config.web = args.common.api.web_settings(args.common.listen)?;
    let limits = args.common.api.listen_limits();
    let home = prepare_home(args.common.home)?;
    let _lock = lock_home(&home, "flared")?;
    args.common.host_binds.install(&home)?;
    let cp = open_control(&home, config)?;
    // Build steps run in containers here when this control plane runs as root.
    let runtime = match start_runtime(&home, false) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no container runtime: image build steps will fail");
            None
        }
    };
    let images = Arc::new(open_images(&home, runtime)?);
    cp.set_image_service(images.clone());
    let pid_path = write_pid(&home, "flared")?;
    tracing::info!(listen = %args.common.listen, home = %home.display(), "flared control ready; waiting for workers");
    let router =
        api_router(&cp, Some(args.worker_token)).merge(flare_image::http::router(images.builder.clone()));
    serve_api(args.common.listen, router, &cp, limits).await?;
    stop_containers(&cp).await;
    let _ = std::fs::remove_file(&pid_path);
    Ok(())
}

fn parse_gpus(specs: &[String]) -> Result<BTreeMap<String, u32>> {
    let mut gpus = BTreeMap::new();
    for s in specs {
        let (kind, count) = match s.split_once(':') {
            Some((k, c)) => (k, c.parse::<u32>().with_context(|| format!("--gpu {s}: bad count"))?),
            None => (s.as_str(), 1),
        };
        if kind.is_empty() || count == 0 {
            bail!("--gpu {s}: expected TYPE or TYPE:COUNT, e.g. H100:8");
        }
        *gpus.entry(kind.to_ascii_uppercase()).or_insert(0) += count;
    }
    Ok(gpus)
}

async fn worker(args: WorkerArgs) -> Result<()> {
    let home = prepare_home(args.home)?;
    if args.action == WorkerAction::Drain {
        return drain(&home).await;
    }
    let control = args.control.context("--control URL (or FLARE_CONTROL_URL) is required")?;
    let token = args.token.context("--token (or FLARE_WORKER_TOKEN) is required")?;
    let _lock = lock_home(&home, "flared-worker")?;
    require_root("flared worker")?;
    let host_binds = args.host_binds.install(&home)?;
    let gpus = if args.gpus.is_empty() { discovered_gpus() } else { parse_gpus(&args.gpus)? };
    let mut res = flare_worker::host_resources();
    if let Some(cpu) = args.cpu {
        res.cpu_millis = (cpu * 1000.0) as u64;
    }
    if let Some(m) = args.memory {
        res.memory_mb = m;
    }
    let prestart = args.prestart.config();
    // Idle pre-started runners belong to no app: their memory is the worker's, not offered.
    res.memory_mb = res.memory_mb.saturating_sub(prestart.reserved_mb());
    let id = args.id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), &cgroup_parent(&home)[6..])
    });
    let client = flare_worker::http::HttpClient::new(&control).map_err(anyhow::Error::msg)?;
    let runtime = start_runtime(&home, args.no_nat)?;
    // Images: blobs come from the control plane over HTTP into this machine's chunk cache.
    let remote_store: Arc<dyn flare_cas::BlobStore> =
        Arc::new(flare_worker::images::HttpBlobStore::new(client.clone(), tokio::runtime::Handle::current()));
    let cache = Arc::new(
        flare_imagefs::ChunkCache::open(&home.join("chunk-cache"), chunk_cache_bytes())
            .context("opening the chunk cache")?,
    );
    let image_host = flare_worker::images::ImageHost::new(remote_store, cache, &home.join("imagefs"))
        .map_err(anyhow::Error::msg)?
        .with_userns(runtime.userns());
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let web_targets = flare_worker::web::WebTargets::default();
    let web_address = match args.web_listen {
        Some(listen) => {
            let l = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("--web-listen {listen}"))?;
            tokio::spawn(flare_worker::web::serve_tunnel(l, web_targets.clone(), token.clone()));
            args.web_advertise.clone().unwrap_or_else(|| listen.to_string())
        }
        None => String::new(),
    };
    let handle = flare_worker::start(
        flare_worker::WorkerConfig {
            id: id.clone(),
            home: home.clone(),
            runtime,
            api: flare_worker::http::proxy_router(client.clone()),
            socket_dir: socket_dir(&home),
            mount_source: Some(client.clone()),
            images: Some(Arc::new(image_host)),
            host_binds,
            prestart,
            snapshot_share: Some(Arc::new(flare_worker::snapshot_share::SnapshotShare::new(
                client.clone(),
                token.clone(),
                tokio::runtime::Handle::current(),
            ))),
            web: web_targets.clone(),
        },
        events_tx,
    );
    let draining = Arc::new(AtomicBool::new(false));
    let pid_path = write_pid(&home, "flared-worker")?;
    {
        let draining = draining.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut usr1 = signal(SignalKind::user_defined1()).expect("SIGUSR1 handler");
            while usr1.recv().await.is_some() {
                tracing::info!("drain requested");
                draining.store(true, Ordering::Relaxed);
            }
        });
    }
    tracing::info!(%id, %control, cpu_millis = res.cpu_millis, memory_mb = res.memory_mb, ?gpus, "flared worker starting");
    let cfg = flare_worker::remote::RemoteConfig {
        control_url: control,
        token,
        worker_id: id,
        resources: res,
        gpus,
        address: args.address,
        web_address,
        draining,
    };
    let result = tokio::select! {
        r = flare_worker::remote::run(cfg, handle.clone(), events_rx) => r.map_err(anyhow::Error::msg),
        _ = shutdown_signal() => Ok(()),
    };
    for cid in handle.container_ids() {
        let _ = handle.tx.send(flare_proto::ToWorker::Stop { container_id: cid, graceful: false });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !handle.container_ids().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let h = handle.clone();
    let _ = tokio::task::spawn_blocking(move || h.shutdown_prestarted()).await;
    let _ = std::fs::remove_file(&pid_path);
    result
}

/// GPUs found through NVML (none, with the reason logged, where there are none).
fn discovered_gpus() -> BTreeMap<String, u32> {
    match flare_worker::gpu::discover() {
        Ok(g) => {
            tracing::info!(gpus = ?g, "GPUs discovered");
            g
        }
        Err(why) => {
            tracing::info!(%why, "no GPUs discovered");
            BTreeMap::new()
        }
    }
}

/// Signals the worker of `home` to drain and waits for it to leave.
async fn drain(home: &Path) -> Result<()> {
    let pid_path = home.join("flared-worker.pid");
    let pid: i32 = std::fs::read_to_string(&pid_path)
        .with_context(|| {
            format!("no worker is running with data dir {} (no {})", home.display(), pid_path.display())
        })?
        .trim()
        .parse()
        .context("corrupt pid file")?;
    // SAFETY: kill with a pid read from our own pid file and a valid signal number.
    if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
        bail!("worker process {pid} is not running");
    }
    eprintln!("draining worker (pid {pid}): running inputs finish, then it leaves");
    loop {
        // SAFETY: signal 0 only checks that the process exists.
        if unsafe { libc::kill(pid, 0) } != 0 {
            eprintln!("worker left");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn main() -> Result<()> {
    flare_runtime::limit_malloc_arenas();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLARE_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = flare_runtime::raise_open_files_limit() {
        tracing::warn!(error = %e, "cannot raise the open files limit");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.cmd {
        Cmd::Server(args) => rt.block_on(server(args)),
        Cmd::Control(args) => rt.block_on(control(args)),
        Cmd::Worker(args) => rt.block_on(worker(args)),
        Cmd::Gpus => match flare_worker::gpu::discover() {
            Ok(g) => {
                println!("{}", serde_json::to_string(&g)?);
                Ok(())
            }
            Err(why) => bail!("no GPUs: {why}"),
        },
        Cmd::Gc(args) => gc(args),
    }
}

fn gc(args: GcArgs) -> Result<()> {
    let home = prepare_home(args.home)?;
    let store = flare_cas::LocalStore::open(&home.join("cas")).context("opening the blob store")?;
    let records = flare_image::records::Records::open(&home.join("images")).map_err(anyhow::Error::msg)?;
    let mut roots: Vec<flare_cas::Digest> = Vec::new();
    for d in records.manifest_roots().map_err(anyhow::Error::msg)? {
        roots.push(d.parse().map_err(|_| anyhow::anyhow!("bad manifest digest {d} in a layer record"))?);
    }
    for img in records.images().map_err(anyhow::Error::msg)? {
        for m in img.mounts {
            roots.push(m.manifest.parse().map_err(|_| anyhow::anyhow!("bad mount digest {}", m.manifest))?);
        }
    }
    // The fleet's memory snapshots (records the control plane keeps). A record whose
    // manifest is gone (the store was cleaned by hand) keeps nothing and fails nothing.
    for m in flare_control::services::snapshots::manifest_roots(&home) {
        let d = flare_cas::Digest::from_hex(&m)
            .map_err(|_| anyhow::anyhow!("bad manifest {m} in a snapshot record"))?;
        if flare_cas::BlobStore::has(&store, &d).context("reading the blob store")? {
            roots.push(d);
        }
    }
    // The current version of every volume (rows of the state database). A volume's
    // commit writes its manifest before the row points at it, and touches the blobs the
    // manifest reaches, so a commit racing this collection is covered by the grace period.
    let state = home.join("state.db");
    if state.exists() {
        let db = SqliteStore::open(&state).context("opening the state database")?;
        for m in flare_control::services::volumes::manifest_roots(&db).context("reading the volumes")? {
            roots.push(m.parse().map_err(|_| anyhow::anyhow!("bad manifest digest {m} of a volume"))?);
        }
    }
    let report =
        flare_cas::gc(&store, &roots, Duration::from_secs(args.grace_secs)).context("garbage collection")?;
    println!(
        "{} blobs reachable ({} missing), {} scanned, {} deleted ({} bytes), {} young kept ({} bytes)",
        report.reachable,
        report.missing,
        report.scanned,
        report.deleted,
        report.deleted_bytes,
        report.kept_young,
        report.kept_young_bytes
    );
    Ok(())
}

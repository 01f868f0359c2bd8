//! `flared`: the Flare daemon.
//!
//! `flared server` runs the control plane and one in-process worker with SQLite and a
//! local data dir under `FLARE_HOME`: the embedded default that `flare run` starts.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use flare_control::{api, ControlPlane, WorkerLink};
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
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Data directory (state database, mounts, logs, container state).
    #[arg(long, env = "FLARE_HOME")]
    home: Option<PathBuf>,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:7878", env = "FLARE_LISTEN")]
    listen: SocketAddr,
    /// Give containers no outbound network, even when NAT could be set up.
    #[arg(long, env = "FLARE_NO_NAT")]
    no_nat: bool,
}

fn default_home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root")).join(".flare")
}

/// Holds an exclusive lock on `home/flared.lock` for the life of the process.
fn lock_home(home: &Path) -> Result<std::fs::File> {
    let path = home.join("flared.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd we own; non-blocking exclusive lock.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        bail!("another flared server is already using {} (stop it with `flare server stop`)", home.display());
    }
    Ok(f)
}

/// A cgroup parent name unique to this data dir, so two servers never clean up each other.
fn cgroup_parent(home: &Path) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in home.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("flare-{:08x}", h as u32)
}

async fn server(args: ServerArgs) -> Result<()> {
    let home = args.home.unwrap_or_else(default_home);
    std::fs::create_dir_all(home.join("mounts")).with_context(|| format!("creating {}", home.display()))?;
    let home = home.canonicalize()?;
    let _lock = lock_home(&home)?;
    if !nix_is_root() {
        bail!("flared server must run as root: containers need namespaces, mounts and cgroups");
    }

    let runtime = Runtime::new(RuntimeConfig {
        state_dir: home.join("run"),
        cgroup_parent: cgroup_parent(&home),
        enable_nat: !args.no_nat,
    })
    .context("starting the container runtime")?;
    match runtime.cleanup_stale() {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "cleaned up containers left by a previous run"),
        Err(e) => tracing::warn!(error = %e, "could not clean up a previous run"),
    }
    let runtime = Arc::new(runtime);

    let store = SqliteStore::open(&home.join("state.db")).context("opening the state database")?;
    let cp = ControlPlane::new(Arc::new(store), &home).context("loading state")?;
    let router = api::router(cp.clone());

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let res = flare_worker::host_resources();
    let worker_tx = flare_worker::start(
        flare_worker::WorkerConfig {
            id: "local".into(),
            home: home.clone(),
            runtime: runtime.clone(),
            api: api::container_router(cp.clone()),
        },
        events_tx,
    );
    tokio::spawn(cp.clone().run_worker_events(events_rx));
    cp.add_worker(WorkerLink {
        id: "local".into(),
        tx: worker_tx,
        cpu_millis: res.cpu_millis,
        memory_mb: res.memory_mb,
    });

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {} (is another server running?)", args.listen))?;
    let pid_path = home.join("flared.pid");
    std::fs::File::create(&pid_path)?.write_all(format!("{}\n", std::process::id()).as_bytes())?;
    tracing::info!(listen = %args.listen, home = %home.display(), cgroups = ?runtime.cgroup_mode(), "flared server ready");

    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving the API")?;

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
    let _ = std::fs::remove_file(&pid_path);
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
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
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLARE_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.cmd {
        Cmd::Server(args) => rt.block_on(server(args)),
    }
}

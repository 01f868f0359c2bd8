//! A worker on its own machine: one gRPC session with the control plane at a time,
//! re-established with backoff when it breaks (the control plane restarting, the network
//! failing). Each new session re-registers the worker and reports the containers still
//! running, which the control plane stops (their inputs already run elsewhere).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flare_proto::wire::worker_hub_client::WorkerHubClient;
use flare_proto::wire::{self, worker_message::Msg};
use flare_proto::{FromWorker, ToWorker};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::{Resources, WorkerHandle};

/// Interval of heartbeats; the control plane declares a worker dead after a few missed.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

pub struct RemoteConfig {
    /// The control plane, `http://host:port` (API and worker sessions share the port).
    pub control_url: String,
    pub token: String,
    pub worker_id: String,
    pub resources: Resources,
    pub gpus: BTreeMap<String, u32>,
    /// Shown in `flare worker list`.
    pub address: String,
    /// host:port of this worker's web tunnel (empty: none).
    pub web_address: String,
    /// Set (e.g. by `flared worker drain`) to stop taking work and leave once idle.
    pub draining: Arc<AtomicBool>,
}

enum SessionEnd {
    Drained,
}

/// Serves sessions until the worker has drained; errors only if the token is refused.
pub async fn run(
    cfg: RemoteConfig,
    handle: WorkerHandle,
    mut events: mpsc::UnboundedReceiver<FromWorker>,
) -> Result<(), crate::WorkerError> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match session(&cfg, &handle, &mut events).await {
            Ok(SessionEnd::Drained) => {
                tracing::info!("worker drained: leaving");
                return Ok(());
            }
            Err(SessionError::Refused(msg)) => return Err(crate::WorkerError::Refused(msg)),
            Err(SessionError::Lost(msg)) => {
                tracing::warn!(error = %msg, retry_in_ms = backoff.as_millis() as u64, "session with the control plane lost");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(3));
            }
            Err(SessionError::Ended) => backoff = Duration::from_millis(200),
        }
    }
}

enum SessionError {
    /// The control plane refused this worker (bad token): retrying will not help.
    Refused(String),
    /// Could not connect, or the session broke.
    Lost(String),
    /// The session ran and then ended; reconnect at once.
    Ended,
}

async fn session(
    cfg: &RemoteConfig,
    handle: &WorkerHandle,
    events: &mut mpsc::UnboundedReceiver<FromWorker>,
) -> Result<SessionEnd, SessionError> {
    let mut client = WorkerHubClient::connect(cfg.control_url.clone())
        .await
        .map_err(|e| SessionError::Lost(format!("connecting to {}: {e}", cfg.control_url)))?
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(1 << 30);
    let (out_tx, out_rx) = mpsc::unbounded_channel::<wire::WorkerMessage>();
    let register = wire::Register {
        worker_id: cfg.worker_id.clone(),
        token: cfg.token.clone(),
        cpu_millis: cfg.resources.cpu_millis,
        memory_mb: cfg.resources.memory_mb,
        gpus: cfg.gpus.clone().into_iter().collect(),
        containers: handle.container_ids(),
        draining: cfg.draining.load(Ordering::Relaxed),
        address: cfg.address.clone(),
        web_address: cfg.web_address.clone(),
    };
    let _ = out_tx.send(wire::WorkerMessage { msg: Some(Msg::Register(register)) });
    let resp = client.session(UnboundedReceiverStream::new(out_rx)).await.map_err(|s| match s.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => {
            SessionError::Refused(format!("the control plane refused this worker: {}", s.message()))
        }
        _ => SessionError::Lost(format!("opening a session: {}", s.message())),
    })?;
    let mut inbound = resp.into_inner();
    match inbound.message().await {
        Ok(Some(wire::ControlMessage { msg: Some(wire::control_message::Msg::Registered(r)) })) => {
            tracing::info!(control = %cfg.control_url, session = %r.session, "registered with the control plane");
        }
        Ok(_) => return Err(SessionError::Lost("the control plane did not confirm the registration".into())),
        Err(s) => return Err(SessionError::Lost(format!("registering: {}", s.message()))),
    }
    // Events of containers from before this session belong to no one now.
    while events.try_recv().is_ok() {}
    let mut hb = tokio::time::interval(HEARTBEAT);
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(m)) => match ToWorker::from_wire(m) {
                    Ok(Some(cmd)) => {
                        let _ = handle.tx.send(cmd);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "bad message from the control plane"),
                },
                Ok(None) => return Err(SessionError::Ended),
                Err(s) => return Err(SessionError::Lost(format!("session broke: {}", s.message()))),
            },
            ev = events.recv() => match ev {
                Some(ev) => {
                    if out_tx.send(ev.into_wire()).is_err() {
                        return Err(SessionError::Lost("session closed".into()));
                    }
                }
                None => return Err(SessionError::Refused("the worker agent stopped".into())),
            },
            _ = hb.tick() => {
                let draining = cfg.draining.load(Ordering::Relaxed);
                let containers = handle.container_ids().len() as u32;
                if draining && containers == 0 {
                    return Ok(SessionEnd::Drained);
                }
                let msg = wire::WorkerMessage { msg: Some(Msg::Heartbeat(wire::Heartbeat { draining, containers })) };
                if out_tx.send(msg).is_err() {
                    return Err(SessionError::Lost("session closed".into()));
                }
            }
        }
    }
}

//! The worker hub: remote workers hold one gRPC session each (`proto/worker.proto`).
//!
//! A session starts with `Register` (checked against the worker token), gets a session
//! id, and from then on carries container commands one way and container events plus
//! heartbeats the other. Events are accepted only from the worker's current session, so
//! a worker that was declared dead (network cut, heartbeat timeout) and comes back cannot
//! deliver late results of containers it no longer owns; the containers it reports at
//! registration are stopped.

use std::pin::Pin;
use std::sync::Arc;

use flare_proto::wire::worker_hub_server::{WorkerHub, WorkerHubServer};
use flare_proto::wire::{self, worker_message::Msg};
use flare_proto::{FromWorker, ToWorker};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::{new_id, ControlPlane, WorkerLink};

pub struct Hub {
    cp: ControlPlane,
    token: String,
}

/// The gRPC service workers connect to; `token` is the shared worker token.
pub fn service(cp: ControlPlane, token: String) -> WorkerHubServer<Hub> {
    WorkerHubServer::new(Hub { cp, token })
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(1 << 30)
}

type Outbound = Pin<Box<dyn Stream<Item = Result<wire::ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerHub for Hub {
    type SessionStream = Outbound;

    async fn session(
        &self,
        req: Request<Streaming<wire::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = req.remote_addr().map(|a| a.ip().to_string()).unwrap_or_default();
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty session"))?;
        let Some(Msg::Register(reg)) = first.msg else {
            return Err(Status::invalid_argument("the first message of a session must be Register"));
        };
        if self.token.is_empty() {
            return Err(Status::permission_denied(
                "this server does not accept remote workers (no worker token set)",
            ));
        }
        if !crate::secret::same_secret(reg.token.as_bytes(), self.token.as_bytes()) {
            return Err(Status::unauthenticated("wrong worker token"));
        }
        if reg.worker_id.is_empty() {
            return Err(Status::invalid_argument("worker_id is empty"));
        }
        let session = new_id("ses");
        let (out_tx, out_rx) = mpsc::unbounded_channel::<Result<wire::ControlMessage, Status>>();
        let registered = wire::Registered { session: session.clone() };
        let _ = out_tx
            .send(Ok(wire::ControlMessage { msg: Some(wire::control_message::Msg::Registered(registered)) }));
        // Containers of an earlier session are not ours any more: stop them.
        for container_id in reg.containers {
            let _ = out_tx.send(Ok(ToWorker::Stop { container_id, graceful: false }.into_wire()));
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<ToWorker>();
        let fwd = out_tx.clone();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if fwd.send(Ok(m.into_wire())).is_err() {
                    break;
                }
            }
        });
        // The session's address when known, else the address the worker gave for display.
        let web_address = tunnel_address(
            &reg.web_address,
            if peer.is_empty() { reg.address.as_str() } else { peer.as_str() },
        );
        let address = if reg.address.is_empty() { peer } else { reg.address };
        self.cp.add_worker(WorkerLink {
            id: reg.worker_id.clone(),
            tx,
            cpu_millis: reg.cpu_millis,
            memory_mb: reg.memory_mb,
            gpus: reg.gpus.into_iter().map(|(k, v)| (k.to_ascii_uppercase(), v)).collect(),
            session: session.clone(),
            remote: true,
            address,
            web: web_address.map(|address| {
                Arc::new(crate::services::ingress::TunnelDialer { address, token: self.token.clone() })
                    as Arc<dyn crate::services::ingress::WebDialer>
            }),
        });
        if reg.draining {
            self.cp.worker_heartbeat(&reg.worker_id, &session, true);
        }
        let cp = self.cp.clone();
        let worker_id = reg.worker_id;
        tokio::spawn(async move {
            let why = loop {
                match inbound.message().await {
                    Ok(Some(m)) => match m.msg {
                        Some(Msg::Heartbeat(h)) if !cp.worker_heartbeat(&worker_id, &session, h.draining) => {
                            break "session superseded".to_string();
                        }
                        Some(Msg::Heartbeat(_)) => {}
                        Some(Msg::Register(_)) => break "Register sent twice".to_string(),
                        Some(other) => match FromWorker::from_wire(other) {
                            Ok(ev) => cp.worker_event(&worker_id, &session, ev),
                            Err(e) => tracing::warn!(worker = %worker_id, error = %e, "bad worker message"),
                        },
                        None => {}
                    },
                    Ok(None) => break "the worker closed its session".to_string(),
                    Err(e) => break format!("session error: {}", e.message()),
                }
            };
            cp.worker_disconnected(&worker_id, &session, &why);
            drop(out_tx);
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(out_rx))))
    }
}

/// Where a worker's web tunnel is dialed: what it advertised, with `peer` (the address its
/// session comes from, or the one it gave) in place of an unspecified host
/// (`0.0.0.0:7879`); `None`: no tunnel, or no host to dial.
fn tunnel_address(advertised: &str, peer: &str) -> Option<String> {
    if advertised.is_empty() {
        return None;
    }
    let (host, port) = advertised.rsplit_once(':')?;
    if matches!(host, "0.0.0.0" | "[::]" | "::" | "") {
        if peer.is_empty() {
            return None;
        }
        // `peer` is an IP address or a host name.
        return Some(if peer.contains(':') { format!("[{peer}]:{port}") } else { format!("{peer}:{port}") });
    }
    Some(advertised.to_string())
}

#[cfg(test)]
mod tunnel_tests {
    use super::tunnel_address;

    #[test]
    fn tunnel_addresses() {
        assert_eq!(tunnel_address("", "10.0.0.5"), None);
        assert_eq!(tunnel_address("0.0.0.0:7879", ""), None);
        assert_eq!(tunnel_address("0.0.0.0:7879", "10.0.0.5").as_deref(), Some("10.0.0.5:7879"));
        assert_eq!(tunnel_address("[::]:7879", "fd00::5").as_deref(), Some("[fd00::5]:7879"));
        assert_eq!(tunnel_address("w1.internal:7879", "10.0.0.5").as_deref(), Some("w1.internal:7879"));
    }
}

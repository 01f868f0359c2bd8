//! Connections to containers' web endpoints: how a worker is dialed ([`WebDialer`]: the
//! embedded server's worker in-process, a remote worker through its web tunnel), and a
//! pool of HTTP/1.1 connections per container endpoint, reused across requests.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Mutex;

use axum::body::Body;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A byte stream to a container's endpoint.
pub trait WebIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> WebIo for T {}

/// A connection being made.
pub type Dialing = Pin<Box<dyn Future<Output = io::Result<Box<dyn WebIo>>> + Send>>;

/// How the control plane reaches a worker's containers' web endpoints.
pub trait WebDialer: Send + Sync {
    /// A new connection to endpoint `endpoint` of container `container_id`.
    fn dial(&self, container_id: &str, endpoint: usize) -> Dialing;
}

/// A remote worker's web tunnel (`flared worker --web-listen`): one `CONNECT
/// <container>/<endpoint>` per connection with the worker token, then the bytes.
pub struct TunnelDialer {
    pub address: String,
    pub token: String,
}

impl WebDialer for TunnelDialer {
    fn dial(&self, container_id: &str, endpoint: usize) -> Dialing {
        let address = self.address.clone();
        let head = format!(
            "CONNECT {container_id}/{endpoint} HTTP/1.1\r\nAuthorization: Bearer {}\r\n\r\n",
            self.token
        );
        Box::pin(async move {
            let mut s = tokio::net::TcpStream::connect(&address).await?;
            let _ = s.set_nodelay(true);
            s.write_all(head.as_bytes()).await?;
            let mut got = Vec::with_capacity(64);
            let mut byte = [0u8; 1];
            while !got.ends_with(b"\r\n\r\n") {
                if got.len() > 4096 || s.read(&mut byte).await? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the worker closed its web tunnel",
                    ));
                }
                got.push(byte[0]);
            }
            if !got.starts_with(b"HTTP/1.1 200") {
                let line = String::from_utf8_lossy(&got);
                let mut rest = vec![0u8; 512];
                let n = s.read(&mut rest).await.unwrap_or(0);
                return Err(io::Error::other(format!(
                    "the worker refused the tunnel: {} {}",
                    line.lines().next().unwrap_or(""),
                    String::from_utf8_lossy(&rest[..n])
                )));
            }
            Ok(Box::new(s) as Box<dyn WebIo>)
        })
    }
}

type Key = (String, usize);

/// Idle HTTP/1.1 connections per container endpoint.
#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<HashMap<Key, Vec<SendRequest<Body>>>>,
}

/// Idle connections kept per container endpoint.
const IDLE_PER_ENDPOINT: usize = 256;

impl Pool {
    /// An idle connection to the endpoint, if one is open.
    pub(crate) fn take(&self, cid: &str, endpoint: usize) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let key = (cid.to_string(), endpoint);
        let list = idle.get_mut(&key)?;
        while let Some(s) = list.pop() {
            if !s.is_closed() && s.is_ready() {
                return Some(s);
            }
        }
        idle.remove(&key);
        None
    }

    /// A connection whose last response was read to the end, for the next request.
    pub(crate) fn put(&self, cid: &str, endpoint: usize, s: SendRequest<Body>) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry((cid.to_string(), endpoint)).or_default();
        if list.len() < IDLE_PER_ENDPOINT {
            list.push(s);
        }
    }

    /// Drops the connections of containers that are gone.
    pub(crate) fn retain(&self, live: impl Fn(&str) -> bool) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|(cid, _), list| {
            list.retain(|s| !s.is_closed());
            live(cid) && !list.is_empty()
        });
    }
}

/// Opens an HTTP/1.1 connection over a dialed stream (upgrades allowed, for WebSockets).
pub(crate) async fn handshake(io: Box<dyn WebIo>) -> io::Result<SendRequest<Body>> {
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| io::Error::other(format!("HTTP handshake with the container: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "container web connection ended");
        }
    });
    Ok(sender)
}

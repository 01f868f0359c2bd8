//! Web endpoints' servers inside containers, as the worker reaches them.
//!
//! A container of a function with web endpoints serves each one inside its own network
//! namespace (ASGI/WSGI apps: the runner on an abstract unix socket; `web_server`: the
//! user's server on a loopback port), so only the worker, creating its socket in that
//! namespace (`flare_runtime::connect_in_netns`), reaches it. [`WebTargets`] maps each
//! running container to its namespace and endpoints; the embedded server's ingress dials
//! through it in-process, and a remote worker serves [`serve_tunnel`] for the control
//! plane's ingress: one `CONNECT <container>/<endpoint>` with the worker token per
//! connection, then the bytes both ways.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use flare_proto::{WebEndpoint, WebKind};
use flare_runtime::{NsStream, NsTarget};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Where each running container's web endpoints are.
#[derive(Clone, Default)]
pub struct WebTargets {
    map: Arc<Mutex<HashMap<String, Entry>>>,
}

struct Entry {
    netns: PathBuf,
    endpoints: Vec<NsTarget>,
}

/// What an endpoint is reached at inside the container.
pub fn target_of(index: usize, w: &WebEndpoint) -> NsTarget {
    match (w.kind, w.port) {
        (WebKind::Server, Some(port)) => NsTarget::Tcp(port),
        _ => NsTarget::Abstract(WebEndpoint::socket_name(index).trim_start_matches('@').to_string()),
    }
}

impl WebTargets {
    /// Records a container's endpoints (`pid`: a process in its network namespace) until
    /// the guard is dropped.
    pub(crate) fn register(&self, cid: &str, pid: i32, web: &[WebEndpoint]) -> Option<WebGuard> {
        if web.is_empty() {
            return None;
        }
        let endpoints = web.iter().enumerate().map(|(i, w)| target_of(i, w)).collect();
        let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        self.lock().insert(cid.to_string(), Entry { netns, endpoints });
        Some(WebGuard { targets: self.clone(), cid: cid.to_string() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection to endpoint `index` of container `cid`.
    pub async fn dial(&self, cid: &str, index: usize) -> io::Result<WebStream> {
        let (netns, target) = {
            let map = self.lock();
            let e = map.get(cid).ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("container {cid} is not running here"))
            })?;
            let t = e.endpoints.get(index).cloned().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("container {cid} has no web endpoint {index}"),
                )
            })?;
            (e.netns.clone(), t)
        };
        let s = tokio::task::spawn_blocking(move || flare_runtime::connect_in_netns(&netns, &target))
            .await
            .map_err(io::Error::other)??;
        Ok(match s {
            NsStream::Unix(u) => {
                u.set_nonblocking(true)?;
                WebStream::Unix(tokio::net::UnixStream::from_std(u)?)
            }
            NsStream::Tcp(t) => {
                t.set_nonblocking(true)?;
                WebStream::Tcp(tokio::net::TcpStream::from_std(t)?)
            }
        })
    }
}

/// Removes a container's endpoints when it stops.
pub(crate) struct WebGuard {
    targets: WebTargets,
    cid: String,
}

impl Drop for WebGuard {
    fn drop(&mut self) {
        self.targets.lock().remove(&self.cid);
    }
}

/// A connection to a container's web endpoint.
pub enum WebStream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl AsyncRead for WebStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WebStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            WebStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WebStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WebStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            WebStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WebStream::Unix(s) => Pin::new(s).poll_flush(cx),
            WebStream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WebStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            WebStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The longest tunnel request head accepted.
const MAX_TUNNEL_HEAD: usize = 4096;

/// What a tunnel request asks for: `CONNECT <container>/<endpoint> HTTP/1.1` with
/// `Authorization: Bearer <token>`; `None` if it is not one.
pub fn parse_tunnel_head(head: &str) -> Option<(String, usize, Option<String>)> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    if first.next()? != "CONNECT" {
        return None;
    }
    let (cid, index) = first.next()?.split_once('/')?;
    let index = index.parse().ok()?;
    if cid.is_empty() || !cid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return None;
    }
    let bearer = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if !k.trim().eq_ignore_ascii_case("authorization") {
            return None;
        }
        v.trim().strip_prefix("Bearer ").map(|t| t.trim().to_string())
    });
    Some((cid.to_string(), index, bearer))
}

/// Serves the control plane's tunnels to this worker's containers on `listener` (a
/// remote worker's `--web-listen`): each connection names a container and endpoint and
/// carries the worker token; then bytes flow both ways until either side closes.
pub async fn serve_tunnel(listener: tokio::net::TcpListener, targets: WebTargets, token: String) {
    let token = Arc::new(token);
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let _ = conn.set_nodelay(true);
        let (targets, token) = (targets.clone(), token.clone());
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(256);
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if head.len() >= MAX_TUNNEL_HEAD || conn.read(&mut byte).await.unwrap_or(0) == 0 {
                    return;
                }
                head.push(byte[0]);
            }
            let parsed = std::str::from_utf8(&head).ok().and_then(parse_tunnel_head);
            let Some((cid, index, bearer)) = parsed else {
                let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
                return;
            };
            let ok = bearer.is_some_and(|b| flare_api::same_secret(b.as_bytes(), token.as_bytes()));
            if !ok {
                let _ = conn.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n").await;
                return;
            }
            match targets.dial(&cid, index).await {
                Ok(mut up) => {
                    if conn.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                }
                Err(e) => {
                    let msg = e.to_string();
                    let resp =
                        format!("HTTP/1.1 502 Bad Gateway\r\ncontent-length: {}\r\n\r\n{msg}", msg.len());
                    let _ = conn.write_all(resp.as_bytes()).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_heads() {
        let h = "CONNECT ct-abc/1 HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n";
        assert_eq!(parse_tunnel_head(h), Some(("ct-abc".into(), 1, Some("s3cret".into()))));
        assert_eq!(parse_tunnel_head("CONNECT ct-abc/0 HTTP/1.1\r\n\r\n"), Some(("ct-abc".into(), 0, None)));
        assert_eq!(parse_tunnel_head("GET / HTTP/1.1\r\n\r\n"), None);
        assert_eq!(parse_tunnel_head("CONNECT ../x/0 HTTP/1.1\r\n\r\n"), None);
        assert_eq!(parse_tunnel_head("CONNECT ct/x HTTP/1.1\r\n\r\n"), None);
    }

    #[test]
    fn targets_of_endpoints() {
        let mut w: WebEndpoint = serde_json::from_str(r#"{"kind":"asgi"}"#).unwrap();
        assert_eq!(target_of(2, &w), NsTarget::Abstract("flare-web-2".into()));
        w.kind = WebKind::Server;
        w.port = Some(8000);
        assert_eq!(target_of(0, &w), NsTarget::Tcp(8000));
    }
}

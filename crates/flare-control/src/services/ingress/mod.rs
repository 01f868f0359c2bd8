//! The web ingress (docs/WEB.md): HTTP requests to web endpoints, proxied to the
//! function's containers as HTTP, bodies streamed both ways, WebSockets spliced.
//!
//! A request names its endpoint by host (`<label>.<web domain>`) or by path
//! (`/web/<app>/<name>/...`) ([`route`]); it is refused before any container starts if it
//! lacks a needed proxy auth token (401), its headers are too big (431) or its body
//! (413). It takes a slot in a ready container of the function's current version
//! ([`slots`]: `max_inputs` per container, shared with inputs), or waits as backlog while
//! the autoscaler starts one (a scaled-to-zero endpoint's first request), up to the
//! endpoint's startup timeout (then 503 saying why). The request goes over a pooled
//! HTTP/1.1 connection ([`upstream`]) to the container's server, reached inside the
//! container's network namespace by its worker; the slot is given back when the response
//! body ends or the client goes away (the container's app then sees `http.disconnect`).
//! Each request is one line in the app's logs. Unknown endpoints: 404 with how URLs are
//! formed; a stopped app: 404; a container that dies mid-request: 502; no response head
//! within the function's timeout: 504.

pub mod route;
pub(crate) mod slots;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Uri};
use axum::middleware::Next;
use axum::Router;
use bytes::Bytes;
use flare_proto::LogStream;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::logs::push_log;
use crate::ControlPlane;
use route::WebAddress;
use slots::{Endpoint, Slot, Take};
use upstream::Pool;

pub use upstream::{TunnelDialer, WebDialer, WebIo};

/// Request headers larger than this, all together, are refused (431).
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// Where endpoints are served (`flared --web-domain`, `--web-scheme`, `--web-max-body`).
#[derive(Clone, Debug)]
pub struct WebSettings {
    /// Endpoints are `<label>.<domain>`; the default `localhost:<port>` resolves to
    /// loopback with no DNS set-up.
    pub domain: String,
    /// The scheme of the URLs handed out (`https` behind a TLS-terminating proxy).
    pub scheme: String,
    /// Largest request body.
    pub max_body_bytes: u64,
}

impl Default for WebSettings {
    fn default() -> Self {
        WebSettings { domain: "localhost:7878".into(), scheme: "http".into(), max_body_bytes: 1 << 30 }
    }
}

/// The URLs of a function's endpoints: a plain function's, and a class's by method.
pub(crate) fn urls_of(
    st: &crate::state::State,
    fid: &str,
) -> (Option<String>, std::collections::BTreeMap<String, String>) {
    let mut by_method = std::collections::BTreeMap::new();
    let mut plain = None;
    let Some(f) = st.functions.get(fid) else { return (None, by_method) };
    let Some(app) = st.apps.get(&f.app_id) else { return (None, by_method) };
    let web = &st.config.web;
    for (w, label) in f.def.web.iter().zip(slots::labels(app, &f.name, &f.def)) {
        let url = route::url(&web.scheme, &web.domain, &label);
        match &w.method_name {
            Some(m) => {
                by_method.insert(m.clone(), url);
            }
            None => plain = Some(url),
        }
    }
    (plain, by_method)
}

/// Refuses to register endpoints whose labels another running app's functions have
/// (409), or that repeat within the registration.
pub(crate) fn check_labels(
    st: &crate::state::State,
    app_id: &str,
    defs: &[flare_proto::FunctionDef],
) -> Result<(), flare_api::ApiError> {
    let Some(app) = st.apps.get(app_id) else { return Ok(()) };
    let mut mine = std::collections::HashMap::new();
    for d in defs {
        for l in slots::labels(app, &d.name, d) {
            if let Some(other) = mine.insert(l.clone(), d.name.clone()) {
                return Err(flare_api::ApiError {
                    code: flare_api::ErrorCode::Conflict,
                    message: format!("functions {other:?} and {:?} both serve the web label {l:?}", d.name),
                });
            }
        }
    }
    for f in st.functions.values().filter(|f| f.active && f.app_id != app_id && !f.def.web.is_empty()) {
        let Some(other) = st.apps.get(&f.app_id) else { continue };
        if other.app.stopped() || other.app.mode != app.app.mode {
            continue;
        }
        for l in slots::labels(other, &f.name, &f.def) {
            if let Some(fname) = mine.get(&l) {
                return Err(flare_api::ApiError {
                    code: flare_api::ErrorCode::Conflict,
                    message: format!(
                        "function {fname:?}: the web label {l:?} is served by app {:?} already (stop it, or \
                         set label= to another name)",
                        other.app.name
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The ingress: the control plane and its pool of container connections.
struct Ingress {
    cp: ControlPlane,
    pool: Arc<Pool>,
    /// The web domain (fixed at start): every API request is checked against it, so it is
    /// read here once, not under the state lock per request.
    domain: String,
}

/// Puts the ingress in front of `router`: requests that name a web endpoint go to it,
/// all others to the API (whose cross-site and body guards do not apply to endpoints).
pub fn layer(router: Router, cp: ControlPlane) -> Router {
    let domain = cp.lock().config.web.domain.clone();
    let ing = Arc::new(Ingress { cp, pool: Arc::default(), domain });
    {
        // Connections of containers that are gone leave the pool.
        let ing = ing.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let live: std::collections::HashSet<String> =
                    ing.cp.lock().containers.keys().cloned().collect();
                ing.pool.retain(|cid| live.contains(cid));
            }
        });
    }
    router.layer(axum::middleware::from_fn_with_state(ing, intercept))
}

async fn intercept(State(ing): State<Arc<Ingress>>, req: Request, next: Next) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    match route::parse(host.as_deref(), req.uri().path(), &ing.domain) {
        Some(addr) => ing.serve(addr, req).await,
        None => next.run(req).await,
    }
}

fn plain(status: StatusCode, message: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(format!("{message}\n")))
        .expect("static response")
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the proxy's own, never forwarded.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "flare-key"
            | "flare-secret"
            | "modal-key"
            | "modal-secret"
    )
}

fn is_websocket(h: &HeaderMap) -> bool {
    h.get(header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// The proxy auth headers of a request: (key, secret), Flare's or Modal's names.
fn proxy_credentials(h: &HeaderMap) -> Option<(&str, &str)> {
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
    match (get("flare-key"), get("flare-secret")) {
        (Some(k), Some(s)) => Some((k, s)),
        _ => Some((get("modal-key")?, get("modal-secret")?)),
    }
}

/// What a finished request leaves in the app's logs.
struct Done {
    method: String,
    path: String,
    started: Instant,
    status: u16,
    note: &'static str,
}

/// A taken slot: given back (and the request logged) when dropped.
struct SlotGuard {
    cp: ControlPlane,
    slot: Slot,
    app_id: String,
    done: Done,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let d = &self.done;
        let line = format!(
            "{} {} -> {} in {:.1} ms{}\n",
            d.method,
            d.path,
            d.status,
            d.started.elapsed().as_secs_f64() * 1000.0,
            d.note
        );
        let mut st = self.cp.lock();
        let st = &mut *st;
        slots::give_back(st, &self.slot);
        push_log(st, &self.cp.inner.log_tx, &self.app_id, &self.slot.cid, LogStream::System, &line);
    }
}

/// Counts a request as waiting for a slot until dropped.
struct Waiting<'a> {
    cp: &'a ControlPlane,
    fid: &'a str,
    on: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.on {
            slots::stop_waiting(&mut self.cp.lock(), self.fid);
        }
    }
}

impl Ingress {
    async fn serve(&self, addr: WebAddress, mut req: Request) -> Response<Body> {
        let started = Instant::now();
        let header_bytes: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
        if header_bytes > MAX_HEADER_BYTES {
            return plain(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                &format!("request headers are {header_bytes} bytes, over the limit of {MAX_HEADER_BYTES}"),
            );
        }
        let (looked_up, settings) = {
            let st = self.cp.lock();
            (slots::lookup(&st, &addr), st.config.web.clone())
        };
        let ep = match looked_up {
            Ok(ep) => ep,
            Err(why) => {
                return plain(
                    StatusCode::NOT_FOUND,
                    &format!(
                        "{why}.\nWeb endpoints are at {scheme}://<label>.{domain}/ (the label is \
                         <app>-<function> unless the endpoint sets label=; apps run by `flare serve` \
                         or `flare run` add -dev) or at /web/<app>/<function>/ on this server; \
                         `flare app list` shows the running apps.",
                        scheme = settings.scheme,
                        domain = settings.domain
                    ),
                )
            }
        };
        if ep.requires_proxy_auth {
            let ok =
                proxy_credentials(req.headers()).is_some_and(|(k, s)| self.cp.proxy_tokens().check(k, s));
            if !ok {
                return plain(
                    StatusCode::UNAUTHORIZED,
                    "this endpoint requires proxy auth: send the headers Flare-Key and Flare-Secret \
                     of a token made with `flare proxy-auth create`",
                );
            }
        }
        let length = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if length.is_some_and(|n| n > settings.max_body_bytes) {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the request body is over the limit of {} bytes", settings.max_body_bytes),
            );
        }
        let (method, path) = (req.method().to_string(), req.uri().path().to_string());
        let done = || Done { method: method.clone(), path: path.clone(), started, status: 0, note: "" };
        // A container that cannot be reached (it exited a moment ago, and its exit is not
        // known yet) gets no more requests; the request, not sent yet, tries another.
        let mut tries = 0;
        let (mut guard, mut sender) = loop {
            let slot = match self.acquire(&ep).await {
                Ok(s) => s,
                Err((status, message)) => return plain(status, &message),
            };
            let mut guard = SlotGuard {
                cp: self.cp.clone(),
                slot: slot.clone(),
                app_id: ep.app_id.clone(),
                done: done(),
            };
            match self.connection(&slot, ep.index).await {
                Ok(s) => break (guard, s),
                Err(message) => {
                    tries += 1;
                    guard.done.note = " (container unreachable)";
                    guard.done.status = 502;
                    retire(&self.cp, &slot.cid);
                    if tries == 3 {
                        return plain(StatusCode::BAD_GATEWAY, &message);
                    }
                }
            }
        };
        let slot = guard.slot.clone();
        let websocket = is_websocket(req.headers());
        let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
        let up_req = match self.upstream_request(req, &addr, &settings, websocket) {
            Ok(r) => r,
            Err(message) => {
                guard.done.status = 400;
                return plain(StatusCode::BAD_REQUEST, &message);
            }
        };
        let resp = match tokio::time::timeout(ep.timeout, sender.send_request(up_req)).await {
            Err(_) => {
                guard.done.status = 504;
                // As with an input past its timeout, the container is stopped: its app is
                // still busy with the request, which no one waits for any more.
                crate::workers::stop_container(&mut self.cp.lock(), &slot.cid, false);
                return plain(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!(
                        "the endpoint did not answer within its function's timeout ({} s)",
                        ep.timeout.as_secs()
                    ),
                );
            }
            Ok(Err(e)) => {
                if error_chain_has_limit(&e) {
                    guard.done.status = 413;
                    return plain(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &format!("the request body is over the limit of {} bytes", settings.max_body_bytes),
                    );
                }
                guard.done.status = 502;
                retire(&self.cp, &slot.cid);
                return plain(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "the endpoint's container closed the connection before answering (did it exit?): {e}"
                    ),
                );
            }
            Ok(Ok(r)) => r,
        };
        guard.done.status = resp.status().as_u16();
        let (mut parts, body) = resp.into_parts();
        parts.headers.retain_hop_by_hop();
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(Response::from_parts(parts.clone(), body));
                parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                guard.done.note = " (websocket)";
                tokio::spawn(async move {
                    let _guard = guard;
                    let (Ok(client), Ok(up)) = (client_upgrade.await, upstream_upgrade.await) else { return };
                    let (mut client, mut up) = (TokioIo::new(client), TokioIo::new(up));
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                });
                return Response::from_parts(parts, Body::empty());
            }
        }
        let body = ProxyBody {
            inner: body,
            sender: Some(sender),
            pool: self.pool.clone(),
            endpoint: ep.index,
            guard: Some(guard),
        };
        Response::from_parts(parts, Body::new(body))
    }

    /// A slot in a container of the endpoint's function, waiting up to its startup timeout.
    async fn acquire(&self, ep: &Endpoint) -> Result<Slot, (StatusCode, String)> {
        let deadline = tokio::time::Instant::now() + ep.startup_timeout;
        let mut waiting = Waiting { cp: &self.cp, fid: &ep.fid, on: false };
        loop {
            let took = slots::take(&mut self.cp.lock(), ep, waiting.on);
            match took {
                Take::Got(s) => return Ok(s),
                Take::Fail { status, message } => {
                    return Err((
                        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                        message,
                    ))
                }
                Take::Wait(mut rx) => {
                    waiting.on = true;
                    if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                        return Err((
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!(
                                "no container of this endpoint could take the request within its startup \
                                 timeout ({:.0} s); `flare app logs` shows why",
                                ep.startup_timeout.as_secs_f64()
                            ),
                        ));
                    }
                }
            }
        }
    }

    /// A pooled connection to the slot's container endpoint, or a new one.
    async fn connection(&self, slot: &Slot, endpoint: usize) -> Result<SendRequest<Body>, String> {
        if let Some(s) = self.pool.take(&slot.cid, endpoint) {
            return Ok(s);
        }
        let dialer = {
            let st = self.cp.lock();
            st.workers.iter().find(|w| w.link.id == slot.worker_id).and_then(|w| w.link.web.clone())
        };
        let Some(dialer) = dialer else {
            return Err(format!("worker {} cannot reach its containers' web endpoints", slot.worker_id));
        };
        let io = dialer
            .dial(&slot.cid, endpoint)
            .await
            .map_err(|e| format!("cannot reach the endpoint in container {}: {e}", slot.cid))?;
        upstream::handshake(io).await.map_err(|e| e.to_string())
    }

    /// The request as the container's server gets it.
    fn upstream_request(
        &self,
        req: Request,
        addr: &WebAddress,
        settings: &WebSettings,
        websocket: bool,
    ) -> Result<hyper::Request<Body>, String> {
        let (parts, body) = req.into_parts();
        let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        let (path, prefix) = match addr {
            WebAddress::Host { .. } => (parts.uri.path().to_string(), None),
            WebAddress::Path { prefix, rest, .. } => (rest.clone(), Some(prefix.clone())),
        };
        let uri: Uri = format!("{path}{query}").parse().map_err(|e| format!("bad request path: {e}"))?;
        let mut out = hyper::Request::builder().method(parts.method).uri(uri);
        let headers = out.headers_mut().expect("builder is valid");
        for (k, v) in &parts.headers {
            if !hop_by_hop(k) {
                headers.append(k, v.clone());
            }
        }
        if !headers.contains_key(header::HOST) {
            if let Some(a) = parts.uri.authority() {
                headers.insert(header::HOST, HeaderValue::from_str(a.as_str()).map_err(|e| e.to_string())?);
            }
        }
        headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_str(&settings.scheme).map_err(|e| e.to_string())?,
        );
        if let Some(p) = prefix {
            headers.insert(
                HeaderName::from_static("x-forwarded-prefix"),
                HeaderValue::from_str(&p).map_err(|e| e.to_string())?,
            );
        }
        if websocket {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        let limited = http_body_util::Limited::new(body, settings.max_body_bytes as usize);
        out.body(Body::new(limited)).map_err(|e| e.to_string())
    }
}

/// A container that failed a request (unreachable, or its connection closed before an
/// answer) takes no more requests and stops once idle.
fn retire(cp: &ControlPlane, cid: &str) {
    if let Some(c) = cp.lock().containers.get_mut(cid) {
        c.retire = true;
    }
}

fn error_chain_has_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

trait RetainHopByHop {
    fn retain_hop_by_hop(&mut self);
}

impl RetainHopByHop for HeaderMap {
    /// Drops the hop-by-hop headers of a response.
    fn retain_hop_by_hop(&mut self) {
        for name in
            ["connection", "keep-alive", "transfer-encoding", "trailer", "upgrade", "proxy-authenticate"]
        {
            self.remove(name);
        }
    }
}

/// A container's response body on its way to the client: streamed frame by frame; at its
/// end the connection goes back to the pool and the slot is given back; dropped early (the
/// client went away), the connection closes, which the container's app sees as a
/// disconnect.
struct ProxyBody {
    inner: Incoming,
    sender: Option<SendRequest<Body>>,
    pool: Arc<Pool>,
    endpoint: usize,
    guard: Option<SlotGuard>,
}

impl ProxyBody {
    fn finish(&mut self) {
        if let (Some(s), Some(g)) = (self.sender.take(), self.guard.as_ref()) {
            self.pool.put(&g.slot.cid, self.endpoint, s);
        }
        self.guard.take();
    }
}

impl hyper::body::Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            std::task::Poll::Ready(None) => this.finish(),
            std::task::Poll::Ready(Some(Err(_))) => {
                if let Some(g) = this.guard.as_mut() {
                    g.done.note = " (the container's response broke off)";
                }
                this.sender.take();
                this.guard.take();
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if self.guard.is_some() && !self.inner.is_end_stream() {
            if let Some(g) = self.guard.as_mut() {
                g.done.note = " (client went away)";
            }
            // The connection is not reused: closing it tells the app the client left.
            self.sender.take();
        } else {
            self.finish();
        }
    }
}

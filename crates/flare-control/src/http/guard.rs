//! What every request passes before its handler: cross-site checks, body limits and the
//! budget of bodies in flight, and the scope of requests made from containers.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use flare_api::{body_limit, mib, required_content_type, ApiError, CALLER_CONTAINER_HEADER};

use super::routes::{container_allowed, specs, RouteSpec};
use super::HttpError;
use crate::ControlPlane;

/// Longest a request waits for room in the budget of bodies in flight.
const BUDGET_WAIT: Duration = Duration::from_secs(30);
/// Longest a request body may stall (no bytes at all) before the request fails.
const BODY_STALL: Duration = Duration::from_secs(30);

/// Which `Host` names the public API answers to (DNS rebinding), beyond IP literals and
/// `localhost`: the operator's `--allowed-host` names; `*` allows any.
#[derive(Clone, Debug, Default)]
pub struct SitePolicy {
    pub allowed_hosts: Vec<String>,
}

impl SitePolicy {
    pub fn new(allowed_hosts: &[String]) -> Self {
        SitePolicy {
            allowed_hosts: allowed_hosts
                .iter()
                .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether a `Host` value (with or without port) names this server. IP literals always
    /// do (a rebinding attack needs a DNS name the attacker controls), as do `localhost`
    /// and `*.localhost`; other names only when configured.
    pub fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host);
        if name.parse::<std::net::IpAddr>().is_ok() || name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        self.allowed_hosts.iter().any(|h| h == "*" || *h == name)
    }

    /// The cross-site checks of a request, in order: `Host`, `Origin`, `Content-Type`.
    pub fn check(
        &self,
        method: &str,
        path: &str,
        headers: &HeaderMap,
        authority: Option<&str>,
    ) -> Result<(), ApiError> {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).or(authority);
        if let Some(h) = host {
            if !self.host_allowed(h) {
                return Err(ApiError::forbidden(format!(
                    "Host {h:?} is not a name of this server (DNS rebinding protection); \
                     start flared with --allowed-host {} to serve it",
                    host_name(h)
                )));
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let o = origin.to_str().unwrap_or("");
            let same = host.is_some_and(|h| o.eq_ignore_ascii_case(&format!("http://{h}")));
            if !same {
                return Err(ApiError::forbidden(format!(
                    "cross-origin request from {o:?} refused: the Flare API does not serve web pages"
                )));
            }
        }
        if let Some(want) = required_content_type(method, path) {
            let got = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
            if got.as_deref() != Some(want) {
                return Err(ApiError::unsupported_media_type(format!(
                    "{method} {path} takes Content-Type: {want} (got {})",
                    got.as_deref().unwrap_or("none")
                )));
            }
        }
        Ok(())
    }
}

/// The host part of a `Host` value: lower case, without port, brackets or a final dot.
fn host_name(host: &str) -> String {
    let h = host.trim();
    let name = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match h.rsplit_once(':') {
            Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => h,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// gRPC (the worker hub) streams and authenticates with its token; browsers cannot send it.
fn is_grpc(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
        && !req.uri().path().starts_with("/v1/")
}

async fn site_guard(State(policy): State<Arc<SitePolicy>>, req: Request, next: Next) -> Response {
    if !is_grpc(&req) {
        let authority = req.uri().authority().map(|a| a.as_str().to_string());
        if let Err(e) =
            policy.check(req.method().as_str(), req.uri().path(), req.headers(), authority.as_deref())
        {
            tracing::warn!(method = %req.method(), path = %req.uri().path(), error = %e.message, "request refused");
            return HttpError(e).into_response();
        }
    }
    next.run(req).await
}

/// Reads a request body within its route's limit ([`body_limit`]) and the server's budget
/// of bodies in flight, so that neither one huge body nor many big ones at once can exhaust
/// the daemon's memory. The permit is held until the handler has answered.
pub(super) async fn body_guard(State(cp): State<ControlPlane>, req: Request, next: Next) -> Response {
    if is_grpc(&req) {
        return next.run(req).await;
    }
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let limit = body_limit(&method, &path);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    if let Some(n) = declared {
        if n > limit as u64 {
            return HttpError(too_large(&method, &path, n as usize, limit)).into_response();
        }
    }
    let expected = match declared {
        Some(n) => n as usize,
        None if chunked => limit,
        None => 0,
    };
    if expected == 0 {
        return next.run(req).await;
    }
    let (budget, total_kib) = cp.body_budget();
    let kib = (expected.div_ceil(1024)).min(total_kib as usize).max(1) as u32;
    let permit = match tokio::time::timeout(BUDGET_WAIT, budget.clone().acquire_many_owned(kib)).await {
        Ok(Ok(p)) => p,
        _ => {
            return HttpError(ApiError::unavailable(format!(
                "the server is receiving too many request bodies at once (budget {}); try again",
                mib(total_kib as usize * 1024)
            )))
            .into_response()
        }
    };
    let (parts, body) = req.into_parts();
    let mut stream = body.into_data_stream();
    // Chunked bodies grow as they come; a declared length is allocated once.
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize).min(limit));
    loop {
        use tokio_stream::StreamExt as _;
        match tokio::time::timeout(BODY_STALL, stream.next()).await {
            Err(_) => {
                return HttpError(ApiError::invalid(format!(
                    "request body stalled: no data for {} s",
                    BODY_STALL.as_secs()
                )))
                .into_response()
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return HttpError(ApiError::invalid(format!("reading the request body: {e}"))).into_response()
            }
            Ok(Some(Ok(chunk))) => {
                if buf.len() + chunk.len() > limit {
                    return HttpError(too_large(&method, &path, buf.len() + chunk.len(), limit))
                        .into_response();
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
    let resp = next.run(Request::from_parts(parts, Body::from(buf))).await;
    drop(permit);
    resp
}

fn too_large(method: &str, path: &str, n: usize, limit: usize) -> ApiError {
    ApiError::too_large(format!(
        "request body of {} is over the limit of {} for {method} {path}",
        if n > limit { format!("more than {}", mib(limit)) } else { mib(n) },
        mib(limit)
    ))
}

/// Requests made from a container (the worker sets [`CALLER_CONTAINER_HEADER`] on its
/// socket) act for that container's app: only the routes of the table marked `container`, and
/// the handlers scope what they show. `required`: the container socket's router, where
/// every request must name its container.
pub(super) async fn container_scope(
    State((cp, required, routes)): State<(ControlPlane, bool, Arc<[RouteSpec]>)>,
    mut req: Request,
    next: Next,
) -> Response {
    let cid = req.headers().get(CALLER_CONTAINER_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
    let Some(cid) = cid else {
        if required {
            return HttpError(ApiError::forbidden("request without a caller container")).into_response();
        }
        return next.run(req).await;
    };
    let Some(caller) = cp.caller_of_container(&cid) else {
        return HttpError(ApiError::forbidden(format!("unknown caller container {cid}"))).into_response();
    };
    if !container_allowed(&routes, req.method().as_str(), req.uri().path()) {
        return HttpError(ApiError::not_found("not available from inside a container")).into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The public router with its protections: cross-site checks (`policy`), body limits and
/// the budget of bodies in flight, and container scoping of relayed requests. `flared`
/// merges the image routes into `router` before calling this, so they are covered too.
pub fn harden(router: Router, cp: &ControlPlane, policy: SitePolicy) -> Router {
    router
        .layer(from_fn_with_state((cp.clone(), false, specs()), container_scope))
        .layer(from_fn_with_state(cp.clone(), body_guard))
        .layer(from_fn_with_state(Arc::new(policy), site_guard))
}

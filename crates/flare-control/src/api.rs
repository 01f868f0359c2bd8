//! The public HTTP API (JSON), as described in `docs/PROTOCOL.md`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use flare_api::*;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::{AppRef, Caller, ControlPlane};

/// Longest a long-poll request waits.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Longest a request waits for room in the budget of bodies in flight.
const BUDGET_WAIT: Duration = Duration::from_secs(30);
/// Longest a request body may stall (no bytes at all) before the request fails.
const BODY_STALL: Duration = Duration::from_secs(30);

/// An API error as an HTTP response.
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0.body())).into_response()
    }
}

type R<T> = Result<Json<T>, HttpError>;

/// The caller a handler acts for: [`Caller::Client`] unless [`container_scope`] said otherwise.
type CallerExt = Option<Extension<Caller>>;

fn caller(ext: CallerExt) -> Caller {
    ext.map(|Extension(c)| c).unwrap_or(Caller::Client)
}

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
async fn body_guard(State(cp): State<ControlPlane>, req: Request, next: Next) -> Response {
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
/// socket) act for that container's app: only the paths of [`container_may_call`], and
/// the handlers scope what they show. `required`: the container socket's router, where
/// every request must name its container.
async fn container_scope(
    State((cp, required)): State<(ControlPlane, bool)>,
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
    if !container_may_call(req.method().as_str(), req.uri().path()) {
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
        .layer(from_fn_with_state((cp.clone(), false), container_scope))
        .layer(from_fn_with_state(cp.clone(), body_guard))
        .layer(from_fn_with_state(Arc::new(policy), site_guard))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, HttpError> {
    serde_json::from_slice(body)
        .map_err(|e| HttpError(ApiError::invalid(format!("invalid request body: {e}"))))
}

/// The router of the public API.
pub fn router(cp: ControlPlane) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/openapi.json", get(openapi))
        .route("/v1/apps", post(create_app).get(list_apps))
        .route("/v1/apps/by-name/{name}", get(app_by_name))
        .route("/v1/apps/by-name/{name}/functions/{fname}", get(function_by_app_name))
        .route("/v1/apps/{app_id}/heartbeat", post(heartbeat))
        .route("/v1/apps/{app_id}/stop", post(stop_app))
        .route("/v1/apps/{app_id}/logs", get(logs))
        .route("/v1/apps/{app_id}/functions", post(register_functions))
        .route("/v1/apps/{app_id}/functions/{name}", get(function_by_app_id))
        .route("/v1/mounts", post(create_mount))
        .route("/v1/functions/{function_id}/stats", get(function_stats))
        .route("/v1/functions/{function_id}/autoscaler", post(update_autoscaler))
        .route("/v1/functions/{function_id}/calls", post(create_call))
        .route("/v1/calls/{call_id}", get(call_info))
        .route("/v1/calls/{call_id}/inputs", post(add_inputs))
        .route("/v1/calls/{call_id}/outputs", get(outputs))
        .route("/v1/calls/{call_id}/cancel", post(cancel_call))
        .route("/v1/containers", get(containers))
        .route("/v1/workers", get(workers))
        .route("/v1/mounts/{mount_id}", get(read_mount))
        .fallback(|| async { HttpError(ApiError::not_found("no such API path")) })
        .layer(DefaultBodyLimit::disable())
        .with_state(cp)
}

/// The subset of the API served on each container's socket: what code running in a
/// container needs to call functions (look them up, call, read outputs, cancel), scoped to
/// the container's app (see [`Caller`]). App management (create, deploy, stop, logs,
/// mounts) is not reachable from containers. Every request must carry
/// [`CALLER_CONTAINER_HEADER`], which the worker sets on each container's socket.
pub fn container_router(cp: ControlPlane) -> Router {
    let scope = cp.clone();
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/apps/by-name/{name}/functions/{fname}", get(function_by_app_name))
        .route("/v1/apps/{app_id}/functions/{name}", get(function_by_app_id))
        .route("/v1/functions/{function_id}/stats", get(function_stats))
        .route("/v1/functions/{function_id}/calls", post(create_call))
        .route("/v1/calls/{call_id}", get(call_info))
        .route("/v1/calls/{call_id}/inputs", post(add_inputs))
        .route("/v1/calls/{call_id}/outputs", get(outputs))
        .route("/v1/calls/{call_id}/cancel", post(cancel_call))
        .fallback(|| async {
            HttpError(ApiError {
                code: ErrorCode::NotFound,
                message: "not available from inside a container".into(),
            })
        })
        .layer(DefaultBodyLimit::disable())
        .with_state(cp)
        .layer(from_fn_with_state((scope.clone(), true), container_scope))
        .layer(from_fn_with_state(scope, body_guard))
}

async fn health(State(cp): State<ControlPlane>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        server_id: cp.server_id().to_string(),
        started_at: cp.started_at(),
    })
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

async fn create_app(State(cp): State<ControlPlane>, body: Bytes) -> R<AppCreated> {
    let req: CreateApp = parse(&body)?;
    req.validate()?;
    let (row, _) = cp.create_app(&req.name, req.mode)?;
    Ok(Json(AppCreated { app_id: row.app_id, name: row.name, mode: req.mode, version: row.version }))
}

async fn list_apps(State(cp): State<ControlPlane>) -> R<AppList> {
    Ok(Json(AppList { apps: cp.list_apps()? }))
}

async fn app_by_name(State(cp): State<ControlPlane>, Path(name): Path<String>) -> R<AppInfo> {
    Ok(Json(cp.app_by_name(&name)?))
}

async fn function_by_app_name(
    State(cp): State<ControlPlane>,
    Path((name, fname)): Path<(String, String)>,
) -> R<FunctionInfo> {
    Ok(Json(cp.function_info(AppRef::DeployedName(&name), &fname)?))
}

async fn function_by_app_id(
    State(cp): State<ControlPlane>,
    who: CallerExt,
    Path((app_id, name)): Path<(String, String)>,
) -> R<FunctionInfo> {
    cp.check_app_access(&caller(who), &app_id)?;
    Ok(Json(cp.function_info(AppRef::Id(&app_id), &name)?))
}

async fn heartbeat(State(cp): State<ControlPlane>, Path(app_id): Path<String>) -> R<Empty> {
    cp.heartbeat(&app_id)?;
    Ok(Json(Empty {}))
}

async fn stop_app(State(cp): State<ControlPlane>, Path(app_id): Path<String>) -> R<Empty> {
    let mut rx = cp.stop_app(&app_id)?;
    // Wait for the app's containers to exit, so their last logs are stored.
    let deadline = Instant::now() + Duration::from_secs(15);
    while cp.app_containers(&app_id) > 0 {
        if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
            tracing::warn!(app = %app_id, "containers still exiting after stop");
            break;
        }
    }
    Ok(Json(Empty {}))
}

async fn logs(
    State(cp): State<ControlPlane>,
    Path(app_id): Path<String>,
    Query(q): Query<PollQuery>,
) -> R<LogsPage> {
    let limit = q.limit.unwrap_or(5000).clamp(1, 50_000);
    let deadline = Instant::now() + Duration::from_millis(q.wait_ms).min(MAX_WAIT);
    loop {
        let (logs, app_state, mut rx) = cp.logs(&app_id, q.after, limit)?;
        if !logs.is_empty()
            || Instant::now() >= deadline
            || app_state == crate::AppState::Stopped && cp.app_containers(&app_id) == 0
        {
            let next = logs.last().map(|l| l.seq as i64).unwrap_or(q.after);
            return Ok(Json(LogsPage { logs, next, app_state: app_state.as_str().into() }));
        }
        let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
    }
}

async fn register_functions(
    State(cp): State<ControlPlane>,
    Path(app_id): Path<String>,
    body: Bytes,
) -> R<FunctionsRegistered> {
    let req: RegisterFunctions = parse(&body)?;
    req.validate()?;
    let done = cp.register_functions(&app_id, req.functions)?;
    Ok(Json(FunctionsRegistered {
        functions: done.into_iter().map(|(name, function_id)| FunctionRef { name, function_id }).collect(),
    }))
}

async fn create_mount(State(cp): State<ControlPlane>, body: Bytes) -> R<MountCreated> {
    let mut req: CreateMount = parse(&body)?;
    req.validate()?;
    let cp2 = cp.clone();
    let mount_id = tokio::task::spawn_blocking(move || {
        if let Some(entries) = req.entries.take() {
            let images =
                cp2.image_service().ok_or_else(|| ApiError::invalid("this server has no blob store"))?;
            req.files.extend(images.mount_files(&entries)?);
        }
        cp2.create_mount(req.files)
    })
    .await
    .map_err(|e| HttpError(ApiError::internal(e.to_string())))??;
    Ok(Json(MountCreated { mount_id }))
}

async fn function_stats(
    State(cp): State<ControlPlane>,
    who: CallerExt,
    Path(fid): Path<String>,
) -> R<FunctionStats> {
    cp.check_function_access(&caller(who), &fid)?;
    Ok(Json(cp.function_stats(&fid)?))
}

/// Waits until the call has outputs after `after`, is done, or the deadline passes.
async fn wait_outputs(
    cp: &ControlPlane,
    call_id: &str,
    after: i64,
    wait: Duration,
    limit: usize,
) -> Result<(Vec<Output>, bool), HttpError> {
    let deadline = Instant::now() + wait.min(MAX_WAIT);
    loop {
        let (outs, done, mut rx) = cp.outputs(call_id, after, limit)?;
        if !outs.is_empty() || done || Instant::now() >= deadline {
            return Ok((outs, done));
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) | Err(_) => continue,
            Ok(Err(_)) => return Ok((outs, done)),
        }
    }
}

async fn create_call(
    State(cp): State<ControlPlane>,
    who: CallerExt,
    Path(fid): Path<String>,
    body: Bytes,
) -> R<CallCreated> {
    let req: CreateCall = parse(&body)?;
    drop(body);
    req.validate()?;
    let inputs = req.inputs.into_iter().map(|i| i.args.0).collect();
    let (call_id, _rx) = cp.create_call_by(&caller(who), &fid, req.kind, inputs, req.more)?;
    let (outputs, done) = if req.wait_ms > 0 {
        wait_outputs(&cp, &call_id, -1, Duration::from_millis(req.wait_ms), 10_000).await?
    } else {
        (Vec::new(), false)
    };
    let log_seq = if outputs.is_empty() { -1 } else { cp.log_position(&call_id) };
    Ok(Json(CallCreated { call_id, outputs, done, log_seq }))
}

async fn add_inputs(
    State(cp): State<ControlPlane>,
    who: CallerExt,
    Path(call_id): Path<String>,
    body: Bytes,
) -> R<InputsAdded> {
    cp.check_call_access(&caller(who), &call_id)?;
    let req: AddInputs = parse(&body)?;
    drop(body);
    validate_inputs(&req.inputs)?;
    let mut inputs: Vec<Bytes> = req.inputs.into_iter().map(|i| i.args.0).collect();
    // Back-pressure: while the caller has not read enough outputs, the inputs wait here
    // (at most BACKPRESSURE_WAIT, then the client is told to send them again).
    let deadline = Instant::now() + crate::BACKPRESSURE_WAIT;
    loop {
        match cp.try_add_inputs(&call_id, inputs, req.more)? {
            Ok((first_idx, count)) => return Ok(Json(InputsAdded { first_idx, count })),
            Err((back, mut no_room)) => {
                inputs = back;
                if tokio::time::timeout_at(deadline, no_room.room.changed()).await.is_err() {
                    return Err(ApiError::exhausted(format!(
                        "call {call_id} has {} inputs whose outputs were not read yet (the limit is {}): read outputs, then send these inputs again",
                        no_room.unconsumed, no_room.window
                    ))
                    .into());
                }
            }
        }
    }
}

async fn outputs(
    State(cp): State<ControlPlane>,
    who: CallerExt,
    Path(call_id): Path<String>,
    Query(q): Query<PollQuery>,
) -> R<OutputsPage> {
    cp.check_call_access(&caller(who), &call_id)?;
    let limit = q.limit.unwrap_or(10_000).clamp(1, 100_000);
    let (outputs, done) =
        wait_outputs(&cp, &call_id, q.after, Duration::from_millis(q.wait_ms), limit).await?;
    let next = outputs.last().map(|o| o.seq as i64).unwrap_or(q.after);
    let log_seq = if outputs.is_empty() { -1 } else { cp.log_position(&call_id) };
    Ok(Json(OutputsPage { outputs, next, done, log_seq }))
}

async fn cancel_call(
    State(cp): State<ControlPlane>,
    who: CallerExt,
    Path(call_id): Path<String>,
    body: Bytes,
) -> R<Empty> {
    cp.check_call_access(&caller(who), &call_id)?;
    let req: CancelCall = if body.is_empty() { CancelCall::default() } else { parse(&body)? };
    cp.cancel_call(&call_id, req.terminate_containers)?;
    Ok(Json(Empty {}))
}

async fn call_info(
    State(cp): State<ControlPlane>,
    who: CallerExt,
    Path(call_id): Path<String>,
) -> R<CallInfo> {
    cp.check_call_access(&caller(who), &call_id)?;
    Ok(Json(cp.call_info(&call_id)?))
}

async fn containers(State(cp): State<ControlPlane>) -> R<ContainerList> {
    Ok(Json(ContainerList { containers: cp.list_containers() }))
}

async fn workers(State(cp): State<ControlPlane>) -> R<WorkerList> {
    Ok(Json(WorkerList { workers: cp.list_workers() }))
}

async fn read_mount(State(cp): State<ControlPlane>, Path(mount_id): Path<String>) -> R<CreateMount> {
    let cp2 = cp.clone();
    let files = tokio::task::spawn_blocking(move || cp2.read_mount(&mount_id))
        .await
        .map_err(|e| HttpError(ApiError::internal(e.to_string())))??;
    Ok(Json(CreateMount { files, entries: None }))
}

async fn update_autoscaler(State(cp): State<ControlPlane>, Path(fid): Path<String>, body: Bytes) -> R<Empty> {
    let req: UpdateAutoscaler = if body.is_empty() { UpdateAutoscaler::default() } else { parse(&body)? };
    cp.update_autoscaler(&fid, req)?;
    Ok(Json(Empty {}))
}

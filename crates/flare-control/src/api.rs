//! The public HTTP API (JSON), as described in `docs/PROTOCOL.md`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flare_api::*;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::{AppRef, ControlPlane};

/// Longest a long-poll request waits.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Largest request body (a 10 MB argument is ~13.4 MB in base64).
const MAX_BODY: usize = 512 * 1024 * 1024;

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
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(cp)
}

/// The subset of the API served on each container's socket: what code running in a
/// container needs to call functions (look them up, call, read outputs, cancel). App
/// management (create, deploy, stop, logs, mounts) is not reachable from containers.
pub fn container_router(cp: ControlPlane) -> Router {
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
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(cp)
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
    Path((app_id, name)): Path<(String, String)>,
) -> R<FunctionInfo> {
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
            || app_state == "stopped" && cp.app_containers(&app_id) == 0
        {
            let next = logs.last().map(|l| l.seq as i64).unwrap_or(q.after);
            return Ok(Json(LogsPage { logs, next, app_state }));
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

async fn function_stats(State(cp): State<ControlPlane>, Path(fid): Path<String>) -> R<FunctionStats> {
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

async fn create_call(State(cp): State<ControlPlane>, Path(fid): Path<String>, body: Bytes) -> R<CallCreated> {
    let req: CreateCall = parse(&body)?;
    req.validate()?;
    let inputs = req.inputs.into_iter().map(|i| i.args.0).collect();
    let (call_id, _rx) = cp.create_call(&fid, req.kind, inputs, req.more)?;
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
    Path(call_id): Path<String>,
    body: Bytes,
) -> R<InputsAdded> {
    let req: AddInputs = parse(&body)?;
    let inputs = req.inputs.into_iter().map(|i| i.args.0).collect();
    let (first_idx, count) = cp.add_inputs(&call_id, inputs, req.more)?;
    Ok(Json(InputsAdded { first_idx, count }))
}

async fn outputs(
    State(cp): State<ControlPlane>,
    Path(call_id): Path<String>,
    Query(q): Query<PollQuery>,
) -> R<OutputsPage> {
    let limit = q.limit.unwrap_or(10_000).clamp(1, 100_000);
    let (outputs, done) =
        wait_outputs(&cp, &call_id, q.after, Duration::from_millis(q.wait_ms), limit).await?;
    let next = outputs.last().map(|o| o.seq as i64).unwrap_or(q.after);
    let log_seq = if outputs.is_empty() { -1 } else { cp.log_position(&call_id) };
    Ok(Json(OutputsPage { outputs, next, done, log_seq }))
}

async fn cancel_call(State(cp): State<ControlPlane>, Path(call_id): Path<String>, body: Bytes) -> R<Empty> {
    let req: CancelCall = if body.is_empty() { CancelCall::default() } else { parse(&body)? };
    cp.cancel_call(&call_id, req.terminate_containers)?;
    Ok(Json(Empty {}))
}

async fn call_info(State(cp): State<ControlPlane>, Path(call_id): Path<String>) -> R<CallInfo> {
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

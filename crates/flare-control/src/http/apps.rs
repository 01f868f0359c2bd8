//! Apps: create or deploy, list, look up by name, heartbeat, stop, logs.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::Json;
use flare_api::*;
use tokio::time::Instant;

use super::body::Valid;
use super::routes::Route;
use super::{MAX_WAIT, R};
use crate::ControlPlane;

pub(super) fn routes() -> Vec<Route> {
    vec![
        Route::post("/v1/apps", create_app),
        Route::get("/v1/apps", list_apps),
        Route::get("/v1/apps/by-name/{app_name}", app_by_name),
        Route::post("/v1/apps/{app_id}/heartbeat", heartbeat),
        Route::post("/v1/apps/{app_id}/detach", detach_app),
        Route::post("/v1/apps/{app_id}/stop", stop_app),
        Route::get("/v1/apps/{app_id}/logs", logs),
    ]
}

async fn create_app(State(cp): State<ControlPlane>, Valid(req): Valid<CreateApp>) -> R<AppCreated> {
    let ((row, _), ticket) = cp.create_app_queued(&req.name, req.mode)?;
    ticket.wait().await?;
    Ok(Json(AppCreated { app_id: row.app_id, name: row.name, mode: req.mode, version: row.version }))
}

async fn list_apps(State(cp): State<ControlPlane>) -> R<AppList> {
    Ok(Json(AppList { apps: cp.list_apps()? }))
}

async fn app_by_name(State(cp): State<ControlPlane>, Path(name): Path<String>) -> R<AppInfo> {
    Ok(Json(cp.app_by_name(&name)?))
}

async fn heartbeat(State(cp): State<ControlPlane>, Path(app_id): Path<String>) -> R<Empty> {
    cp.heartbeat(&app_id)?;
    Ok(Json(Empty {}))
}

async fn detach_app(
    State(cp): State<ControlPlane>,
    Path(app_id): Path<String>,
    Valid(req): Valid<DetachApp>,
) -> R<Empty> {
    cp.detach(&app_id, req.client_left)?.wait().await?;
    Ok(Json(Empty {}))
}

async fn stop_app(State(cp): State<ControlPlane>, Path(app_id): Path<String>) -> R<Empty> {
    let (mut rx, ticket) = cp.stop_app_queued(&app_id)?;
    ticket.wait().await?;
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

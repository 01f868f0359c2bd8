//! Containers and workers, as operators see them.

use axum::extract::State;
use axum::Json;
use flare_api::*;

use super::routes::Route;
use super::R;
use crate::ControlPlane;

pub(super) fn routes() -> Vec<Route> {
    vec![Route::get("/v1/containers", containers), Route::get("/v1/workers", workers)]
}

async fn containers(State(cp): State<ControlPlane>) -> R<ContainerList> {
    Ok(Json(ContainerList { containers: cp.list_containers() }))
}

async fn workers(State(cp): State<ControlPlane>) -> R<WorkerList> {
    Ok(Json(WorkerList { workers: cp.list_workers() }))
}

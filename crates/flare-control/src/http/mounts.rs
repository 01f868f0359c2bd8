//! Code mounts: upload (inline files or a file list of stored blobs) and read back.

use axum::extract::{Path, State};
use axum::Json;
use flare_api::*;

use super::body::Valid;
use super::routes::Route;
use super::{HttpError, R};
use crate::ControlPlane;

pub(super) fn routes() -> Vec<Route> {
    vec![Route::post("/v1/mounts", create_mount), Route::get("/v1/mounts/{mount_id}", read_mount)]
}

async fn create_mount(State(cp): State<ControlPlane>, Valid(mut req): Valid<CreateMount>) -> R<MountCreated> {
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

async fn read_mount(State(cp): State<ControlPlane>, Path(mount_id): Path<String>) -> R<CreateMount> {
    let cp2 = cp.clone();
    let files = tokio::task::spawn_blocking(move || cp2.read_mount(&mount_id))
        .await
        .map_err(|e| HttpError(ApiError::internal(e.to_string())))??;
    Ok(Json(CreateMount { files, entries: None }))
}

//! Health and the OpenAPI document.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use flare_api::{Health, OPENAPI_JSON};

use super::routes::Route;
use crate::ControlPlane;

pub(super) fn routes() -> Vec<Route> {
    vec![Route::get("/v1/health", health).container(), Route::get("/openapi.json", openapi)]
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

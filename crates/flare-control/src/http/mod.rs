//! The public HTTP API (JSON), as described in `docs/PROTOCOL.md`.
//!
//! - [`routes`]: the one route table (each area's routes, then each service's), with the
//!   `container` flag of the calls code in a container may make;
//! - [`guard`]: cross-site checks, body limits and budget, container scoping;
//! - [`body`]: the extractor that parses and validates JSON bodies;
//! - one error type, [`HttpError`];
//! - one module per area: `apps`, `functions`, `calls`, `mounts`, `cluster`
//!   (containers and workers), `meta` (health, OpenAPI).

mod apps;
pub(crate) mod body;
mod calls;
mod cluster;
mod functions;
mod guard;
mod meta;
mod mounts;
pub mod routes;

use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use flare_api::ApiError;

pub use guard::{harden, SitePolicy};
pub use routes::{Route, RouteSpec};

use crate::{Caller, ControlPlane};

/// Longest a long-poll request waits.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// An API error as an HTTP response: the one error adapter of the API.
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

/// The caller a handler acts for: [`Caller::Client`] unless the container scope said otherwise.
type CallerExt = Option<Extension<Caller>>;

fn caller(ext: CallerExt) -> Caller {
    ext.map(|Extension(c)| c).unwrap_or(Caller::Client)
}

/// Builds a router of the routes `keep` selects from the table.
fn build(cp: ControlPlane, keep: impl Fn(&RouteSpec) -> bool, fallback_message: &'static str) -> Router {
    let mut router = Router::new();
    for r in routes::table().into_iter().filter(|r| keep(&r.spec)) {
        router = router.route(r.spec.path, r.handler);
    }
    router
        .fallback(move || async move { HttpError(ApiError::not_found(fallback_message)) })
        .layer(DefaultBodyLimit::disable())
        .with_state(cp)
}

/// The router of the public API: every route of the table.
pub fn router(cp: ControlPlane) -> Router {
    build(cp, |_| true, "no such API path")
}

/// The subset of the API served on each container's socket: the routes of the table
/// marked `container` (look functions up, call them, read outputs, cancel), scoped to the
/// container's app (see [`Caller`]). App management (create, deploy, stop, logs, mounts)
/// is not reachable from containers. Every request must carry
/// [`flare_api::CALLER_CONTAINER_HEADER`], which the worker sets on each container's socket.
pub fn container_router(cp: ControlPlane) -> Router {
    let scope = cp.clone();
    build(cp, |r| r.container, "not available from inside a container")
        .layer(from_fn_with_state((scope.clone(), true, routes::specs()), guard::container_scope))
        .layer(from_fn_with_state(scope, guard::body_guard))
}

#[cfg(test)]
mod tests;

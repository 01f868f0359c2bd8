//! The route table: every route of the API once, with whether code in a container may
//! call it. The public router, the container socket's router and the scope check of
//! relayed container requests are all built from it.

use std::sync::Arc;

use axum::handler::Handler;
use axum::routing::{self, MethodRouter};

use crate::ControlPlane;

/// What a route is, without its handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    /// Upper-case HTTP method.
    pub method: &'static str,
    /// Path template, with `{name}` for a segment (as in the OpenAPI document).
    pub path: &'static str,
    /// Code in a container may make this call (its API socket, a worker's relay).
    pub container: bool,
}

/// A route with its handler.
pub struct Route {
    pub spec: RouteSpec,
    pub(crate) handler: MethodRouter<ControlPlane>,
}

impl Route {
    fn new(method: &'static str, path: &'static str, handler: MethodRouter<ControlPlane>) -> Self {
        Route { spec: RouteSpec { method, path, container: false }, handler }
    }

    pub fn get<H: Handler<T, ControlPlane>, T: 'static>(path: &'static str, h: H) -> Self {
        Route::new("GET", path, routing::get(h))
    }

    pub fn post<H: Handler<T, ControlPlane>, T: 'static>(path: &'static str, h: H) -> Self {
        Route::new("POST", path, routing::post(h))
    }

    pub fn put<H: Handler<T, ControlPlane>, T: 'static>(path: &'static str, h: H) -> Self {
        Route::new("PUT", path, routing::put(h))
    }

    pub fn delete<H: Handler<T, ControlPlane>, T: 'static>(path: &'static str, h: H) -> Self {
        Route::new("DELETE", path, routing::delete(h))
    }

    /// Marks the route as one a container may call.
    pub fn container(mut self) -> Self {
        self.spec.container = true;
        self
    }
}

/// Every route: the core areas, then each service's (see [`crate::services`]).
pub fn table() -> Vec<Route> {
    let mut t = Vec::new();
    t.extend(super::meta::routes());
    t.extend(super::apps::routes());
    t.extend(super::functions::routes());
    t.extend(super::calls::routes());
    t.extend(super::mounts::routes());
    t.extend(super::cluster::routes());
    for s in crate::services::registered() {
        t.extend(s.routes());
    }
    t
}

/// The table without handlers.
pub fn specs() -> Arc<[RouteSpec]> {
    table().into_iter().map(|r| r.spec).collect()
}

pub use flare_api::path_matches;

/// Whether a container may make this request: a route of the table marked `container`.
pub fn container_allowed(routes: &[RouteSpec], method: &str, path: &str) -> bool {
    routes.iter().any(|r| r.container && r.method == method && path_matches(r.path, path))
}

//! Services: the capabilities built on the core control plane.
//!
//! Each later capability — ingress (web endpoints), volumes, dicts, queues, secrets,
//! sandboxes, usage — lives in its own module here and owns its state, its store tables
//! and its routes. It implements [`Service`] and is listed in [`registered`]; the HTTP
//! layer merges each service's route table into the one table
//! ([`crate::http::routes::table`]), so its routes get the same guards, the same error
//! type, the same `container` flag and the same OpenAPI completeness check as the core's.
//!
//! - [`snapshots`]: the fleet's memory snapshot records (workers only).
//! - [`ingress`]: web endpoints (no routes of its own: it sits in front of the API).
//! - [`proxy_auth`]: the tokens endpoints with `requires_proxy_auth` take.
//! - [`dicts`]: `flare.Dict`, durable key-value maps in the store.
//! - [`leases`]: ephemeral objects live while their client heartbeats them.
//! - [`named`]: what the services of named objects share (store access, locks, names).
//! - [`queues`]: `flare.Queue`, durable FIFO queues in the store, with blocking gets.
//! - [`schedules`]: functions that run on their own (`Period`, `Cron`); no routes.
//! - [`volumes`]: `flare.Volume`, versioned file trees (manifests in the CAS).

use crate::http::Route;

pub mod dicts;
pub mod ingress;
pub mod leases;
pub mod named;
pub mod proxy_auth;
pub mod queues;
pub mod schedules;
pub mod snapshots;
pub mod volumes;

/// A capability with its own routes.
pub trait Service: Send + Sync {
    /// Short name, for logs.
    fn name(&self) -> &'static str;
    /// Its routes (paths under `/v1/<name>...`), each marked `container` if code in a
    /// container may call it.
    fn routes(&self) -> Vec<Route>;
}

/// The services of this control plane, in route-table order.
pub fn registered() -> Vec<Box<dyn Service>> {
    vec![
        Box::new(snapshots::Snapshots),
        Box::new(proxy_auth::ProxyAuth),
        Box::new(dicts::Dicts),
        Box::new(queues::Queues),
        Box::new(schedules::Schedules),
        Box::new(volumes::Volumes),
    ]
}

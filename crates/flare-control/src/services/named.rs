//! What the services that keep named objects in the store (dicts, queues, volumes) share:
//! store reads off the async threads, writes answered after their commit, striped locks
//! for read-then-write operations, and the check of a create request's name.

use std::sync::Arc;

use flare_api::ApiError;
use flare_store::{Store, Write};

use crate::{store_err, ControlPlane};

/// Longest name of a named object.
pub const MAX_NAME_LEN: usize = 128;
/// Number of striped locks.
const STRIPES: usize = 64;

/// Striped locks over object ids (and `name:<name>`, for create-or-get).
pub struct Locks(Vec<tokio::sync::Mutex<()>>);

impl Default for Locks {
    fn default() -> Self {
        Locks((0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect())
    }
}

impl Locks {
    pub(crate) async fn lock(&self, what: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let i = blake3::hash(what.as_bytes()).as_bytes()[0] as usize % self.0.len();
        self.0[i].lock().await
    }
}

/// Runs a store read off the async threads.
pub(super) async fn read<T: Send + 'static>(
    cp: &ControlPlane,
    f: impl FnOnce(&dyn Store) -> flare_store::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let store: Arc<dyn Store> = cp.inner.store.clone();
    tokio::task::spawn_blocking(move || f(&*store))
        .await
        .map_err(|e| ApiError::internal(format!("store read: {e}")))?
        .map_err(store_err)
}

/// Queues writes and waits for their commit.
pub(super) async fn commit(cp: &ControlPlane, writes: Vec<Write>) -> Result<(), ApiError> {
    for w in writes {
        cp.persist().write(w);
    }
    cp.persist().ticket().wait().await
}

/// A create request of a `kind` ("dict", "queue", "volume"): an ephemeral object has no
/// name; a named one's is 1 to [`MAX_NAME_LEN`] letters, digits, `-`, `_` and `.`.
pub(super) fn check_create(kind: &str, name: &str, ephemeral: bool) -> Result<(), ApiError> {
    if ephemeral {
        if !name.is_empty() {
            return Err(ApiError::invalid(format!("an ephemeral {kind} has no name")));
        }
        return Ok(());
    }
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        return Err(ApiError::invalid(format!(
            "invalid {kind} name {name:?}: 1 to {MAX_NAME_LEN} characters of letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

/// Helpers of the services' route tests.
#[cfg(test)]
pub(super) mod testing {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use base64::Engine as _;
    use serde_json::Value;
    use tower::ServiceExt as _;

    pub(in crate::services) fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    pub(in crate::services) fn unb64(v: &Value) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap()
    }

    /// One request to the router: its status and JSON body (`Null` if not JSON).
    pub(in crate::services) async fn call(
        api: &axum::Router,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut r = Request::builder().method(method).uri(path).header("host", "127.0.0.1");
        if method != "GET" {
            r = r.header("content-type", "application/json");
        }
        let req = r.header("content-length", body.len().to_string()).body(Body::from(body)).unwrap();
        let resp = api.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    #[test]
    fn names_are_checked() {
        assert!(super::check_create("dict", "a-b_c.1", false).is_ok());
        assert!(super::check_create("dict", "", true).is_ok());
        let e = super::check_create("queue", "x", true).unwrap_err();
        assert!(e.message.contains("an ephemeral queue has no name"), "{}", e.message);
        for bad in ["", "a/b", "é", &"n".repeat(129)] {
            let e = super::check_create("volume", bad, false).unwrap_err();
            assert!(e.message.starts_with("invalid volume name"), "{}", e.message);
        }
    }
}

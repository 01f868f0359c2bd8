//! The route table against the container scope and the OpenAPI document.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bytes::Bytes;
use flare_api::{container_may_call, AppMode, CallKind, CALLER_CONTAINER_HEADER, CONTAINER_ROUTES};
use flare_proto::ToWorker;
use tower::ServiceExt as _;

use super::routes::{specs, RouteSpec};
use super::{container_router, harden, router, SitePolicy};
use crate::tests::{def, harness};

/// A concrete path for a template: each `{name}` becomes `x-1`.
fn sample(template: &str) -> String {
    template.split('/').map(|s| if s.starts_with('{') { "x-1" } else { s }).collect::<Vec<_>>().join("/")
}

#[test]
fn routes_are_unique() {
    let all = specs();
    let set: BTreeSet<(&str, &str)> = all.iter().map(|r| (r.method, r.path)).collect();
    assert_eq!(set.len(), all.len(), "a route is in the table twice");
}

/// `flare_api::container_may_call` (what a remote worker relays) and the table's
/// `container` flags are the same set of routes.
#[test]
fn container_flags_agree_with_container_may_call() {
    let table: BTreeSet<(&str, &str)> =
        specs().iter().filter(|r| r.container).map(|r| (r.method, r.path)).collect();
    let api: BTreeSet<(&str, &str)> = CONTAINER_ROUTES.iter().copied().collect();
    assert_eq!(table, api);
    for r in specs().iter() {
        let p = sample(r.path);
        assert_eq!(container_may_call(r.method, &p), r.container, "{} {p}", r.method);
        assert_eq!(container_may_call(r.method, &format!("{p}?after=1")), r.container);
    }
}

/// Every route of the table is in `openapi.json` with its method, and every operation
/// there is a route (the image routes are `flare-image`'s, merged by `flared`).
#[test]
fn openapi_documents_every_route() {
    let doc: serde_json::Value = serde_json::from_str(flare_api::OPENAPI_JSON).unwrap();
    let paths = doc["paths"].as_object().expect("paths");
    let mut documented = BTreeSet::new();
    for (path, ops) in paths {
        for method in ops.as_object().expect("operations").keys() {
            if ["get", "post", "put", "delete", "patch", "head", "options"].contains(&method.as_str()) {
                documented.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    let table: BTreeSet<(String, String)> =
        specs().iter().map(|r| (r.method.to_string(), r.path.to_string())).collect();
    let undocumented: Vec<_> = table.difference(&documented).collect();
    assert!(undocumented.is_empty(), "routes missing from openapi.json: {undocumented:?}");
    let image_service = |p: &str| p.starts_with("/v1/blobs") || p.starts_with("/v1/images");
    let unknown: Vec<_> = documented.difference(&table).filter(|(_, p)| !image_service(p)).collect();
    assert!(unknown.is_empty(), "openapi.json documents routes the server does not have: {unknown:?}");
}

/// Each documented route of the table declares its path parameters (by name, resolving
/// `$ref`s) and its responses.
#[test]
fn openapi_operations_declare_their_path_parameters() {
    let doc: serde_json::Value = serde_json::from_str(flare_api::OPENAPI_JSON).unwrap();
    let resolve = |p: &serde_json::Value| match p["$ref"].as_str() {
        Some(r) => doc.pointer(r.trim_start_matches('#')).cloned().unwrap_or_default(),
        None => p.clone(),
    };
    for r in specs().iter() {
        let op = &doc["paths"][r.path][r.method.to_ascii_lowercase()];
        let mut declared: Vec<String> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(resolve)
            .filter(|p| p["in"] == "path")
            .filter_map(|p| p["name"].as_str().map(str::to_string))
            .collect();
        declared.sort();
        let mut wanted: Vec<String> = r
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_string)
            .collect();
        wanted.sort();
        assert_eq!(declared, wanted, "{} {}: path parameters", r.method, r.path);
        assert!(op["responses"].is_object(), "{} {}: no responses", r.method, r.path);
    }
}

async fn send(router: &axum::Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
}

fn from_container(cid: &str, r: &RouteSpec) -> Request<Body> {
    let body = if r.method == "GET" { "" } else { "{}" };
    let uri = sample(r.path);
    let content_type = flare_api::required_content_type(r.method, &uri).unwrap_or("application/json");
    Request::builder()
        .method(r.method)
        .uri(uri)
        .header("host", "127.0.0.1")
        .header(CALLER_CONTAINER_HEADER, cid)
        .header("content-type", content_type)
        .header("content-length", body.len().to_string())
        .body(Body::from(body))
        .unwrap()
}

/// The container socket serves exactly the routes marked `container`; the public router
/// refuses the others for requests relayed from a container.
#[tokio::test]
async fn container_routers_follow_the_flag() {
    let mut h = harness().await;
    let (app, _) = h.cp.create_app("a", AppMode::Ephemeral).unwrap();
    let fid = h.cp.register_functions(&app.app_id, vec![def("f")]).unwrap()[0].1.clone();
    h.cp.create_call(&fid, CallKind::Call, vec![Bytes::from_static(b"x")], false).unwrap();
    let ToWorker::Start(a) = h.rx.recv().await.unwrap() else { panic!() };
    let socket = container_router(h.cp.clone());
    let public = harden(router(h.cp.clone()), &h.cp, SitePolicy::default());
    let refused = |v: &serde_json::Value| v["error"]["message"] == "not available from inside a container";
    for r in specs().iter() {
        for (which, rt) in [("socket", &socket), ("public", &public)] {
            let (s, v) = send(rt, from_container(&a.container_id, r)).await;
            if r.container {
                assert!(!refused(&v), "{which}: {} {} refused: {v}", r.method, r.path);
            } else {
                assert_eq!(s, StatusCode::NOT_FOUND, "{which}: {} {}", r.method, r.path);
                assert!(refused(&v), "{which}: {} {}: {v}", r.method, r.path);
            }
        }
    }
}

/// Only the blob store of an image service (what the snapshot routes use).
struct BlobsOnly(std::sync::Arc<flare_cas::LocalStore>);

impl crate::ImageService for BlobsOnly {
    fn resolve(&self, _: &str) -> Result<flare_proto::ImageUse, flare_api::ApiError> {
        Err(flare_api::ApiError::not_found("no images here"))
    }
    fn mount_files(&self, _: &serde_json::Value) -> Result<Vec<flare_api::MountFile>, flare_api::ApiError> {
        Err(flare_api::ApiError::not_found("no images here"))
    }
    fn blob_store(&self) -> std::sync::Arc<dyn flare_cas::BlobStore> {
        self.0.clone()
    }
}

/// The fleet's snapshot records: a worker token round trip; no token, a wrong one, or a
/// server without remote workers, refused; a record must name its own key and a manifest
/// already in the blob store; blobs go in as they are, verified.
#[tokio::test]
async fn snapshot_records_are_for_workers_only() {
    use flare_cas::BlobStore as _;
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(flare_store::SqliteStore::open(&dir.path().join("s.db")).unwrap());
    let config = crate::ControlConfig { worker_token: Some("tok".into()), ..Default::default() };
    let cp = crate::ControlPlane::with_config(store, dir.path(), config).unwrap();
    let blobs = std::sync::Arc::new(flare_cas::LocalStore::open(&dir.path().join("cas")).unwrap());
    cp.set_image_service(std::sync::Arc::new(BlobsOnly(blobs.clone())));
    let api = harden(router(cp.clone()), &cp, SitePolicy::default());
    let key = "ab".repeat(32);
    let typed = |method: &str, path: &str, token: Option<&str>, content_type: &str, body: Vec<u8>| {
        let mut r = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "127.0.0.1")
            .header("content-type", content_type)
            .header("content-length", body.len().to_string());
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        r.body(Body::from(body)).unwrap()
    };
    // Blobs: which are missing, then uploads as they are (a 3 MiB chunk stays one blob).
    let chunk = vec![7u8; 3 << 20];
    let d = flare_cas::Digest::of(&chunk);
    let ask = serde_json::json!({"digests": [d.to_string()]}).to_string().into_bytes();
    let (s, v) =
        send(&api, typed("POST", "/v1/snapshots/blobs/missing", Some("tok"), "application/json", ask)).await;
    assert_eq!((s, v["missing"].as_array().map(Vec::len)), (StatusCode::OK, Some(1)), "{v}");
    let put = |d: flare_cas::Digest, token: Option<&str>| {
        typed("PUT", &format!("/v1/snapshots/blobs/{d}"), token, "application/octet-stream", chunk.clone())
    };
    assert_eq!(send(&api, put(d, None)).await.0, StatusCode::FORBIDDEN);
    let wrong = flare_cas::Digest::of(b"something else");
    assert_eq!(send(&api, put(wrong, Some("tok"))).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(send(&api, put(d, Some("tok"))).await.0, StatusCode::NO_CONTENT);
    assert_eq!(blobs.get(&d).unwrap(), chunk);
    let manifest = flare_cas::Digest::of(b"a manifest").hex();
    let req = |method: &str, path: &str, token: Option<&str>, body: String| {
        let mut r = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .header("content-length", body.len().to_string());
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        r.body(Body::from(body)).unwrap()
    };
    let path = format!("/v1/snapshots/{key}");
    let record = serde_json::json!({"key": key, "manifest": manifest, "image_bytes": 7}).to_string();
    for token in [None, Some("wrong")] {
        let (s, _) = send(&api, req("PUT", &path, token, record.clone())).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let (s, _) = send(&api, req("GET", &path, token, String::new())).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
    }
    let (s, _) = send(&api, req("GET", &path, Some("tok"), String::new())).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let other = serde_json::json!({"key": "ef".repeat(32), "manifest": manifest}).to_string();
    let (s, v) = send(&api, req("PUT", &path, Some("tok"), other)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let bad = serde_json::json!({"key": key, "manifest": "x"}).to_string();
    assert_eq!(send(&api, req("PUT", &path, Some("tok"), bad)).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(
        send(&api, req("GET", "/v1/snapshots/..%2f..", Some("tok"), String::new())).await.0,
        StatusCode::BAD_REQUEST
    );
    // Its manifest is not stored yet.
    assert_eq!(
        send(&api, req("PUT", &path, Some("tok"), record.clone())).await.0,
        StatusCode::PRECONDITION_FAILED
    );
    blobs.put(b"a manifest").unwrap();
    assert_eq!(send(&api, req("PUT", &path, Some("tok"), record)).await.0, StatusCode::NO_CONTENT);
    let (s, v) = send(&api, req("GET", &path, Some("tok"), String::new())).await;
    assert_eq!((s, v["image_bytes"].as_u64()), (StatusCode::OK, Some(7)));
    assert_eq!(crate::services::snapshots::manifest_roots(dir.path()), [manifest]);
    assert_eq!(send(&api, req("DELETE", &path, Some("tok"), String::new())).await.0, StatusCode::NO_CONTENT);
    assert_eq!(send(&api, req("GET", &path, Some("tok"), String::new())).await.0, StatusCode::NOT_FOUND);

    // No worker token: nobody may.
    let h = harness().await;
    let api = harden(router(h.cp.clone()), &h.cp, SitePolicy::default());
    assert_eq!(send(&api, req("GET", &path, Some(""), String::new())).await.0, StatusCode::FORBIDDEN);
}

//! Tests of the API's protections (issue 8: cross-site requests, body limits, default
//! limits, log retention and rate limits, the container socket's scope).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bytes::Bytes;
use flare_api::{AppMode, CallKind, CALLER_CONTAINER_HEADER};
use flare_proto::*;
use flare_store::SqliteStore;
use tokio::sync::mpsc;
use tower::ServiceExt as _;

use crate::api::{self, SitePolicy};
use crate::{ControlConfig, ControlPlane, WorkerLink};

use crate::tests::{def, Harness};

async fn harness(config: ControlConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
    let cp = ControlPlane::with_config(store, dir.path(), config).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    cp.add_worker(WorkerLink::local("w1", tx, 64_000, 1 << 20));
    Harness { cp, rx, _dir: dir }
}

async fn send(router: &axum::Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
}

fn json_post(path: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("host", "127.0.0.1:7878")
        .header("content-type", "application/json")
        .header("content-length", body.len().to_string())
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn public(h: &Harness, hosts: &[&str]) -> axum::Router {
    let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    api::harden(api::router(h.cp.clone()), &h.cp, SitePolicy::new(&hosts))
}

#[tokio::test]
async fn cross_site_requests_are_refused() {
    let h = harness(ControlConfig::default()).await;
    let r = public(&h, &["flare.internal"]);
    let app = r#"{"name":"x","mode":"ephemeral"}"#;
    // A form post or a no-cors fetch from a web page: text/plain (or none), foreign Origin.
    let mut req = json_post("/v1/apps", app);
    req.headers_mut().insert("content-type", "text/plain".parse().unwrap());
    let (s, v) = send(&r, req).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(v["error"]["code"], "unsupported_media_type");
    let mut req = json_post("/v1/apps", app);
    req.headers_mut().remove("content-type");
    assert_eq!(send(&r, req).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let mut req = json_post("/v1/apps/ap-1/stop", "");
    req.headers_mut().remove("content-type");
    assert_eq!(send(&r, req).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let mut req = json_post("/v1/apps", app);
    req.headers_mut().insert("origin", "https://evil.example".parse().unwrap());
    let (s, v) = send(&r, req).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(v["error"]["code"], "permission_denied");
    let mut req = json_post("/v1/apps", app);
    req.headers_mut().insert("origin", "null".parse().unwrap());
    assert_eq!(send(&r, req).await.0, StatusCode::FORBIDDEN);
    // DNS rebinding: a name that resolves to us but is not ours. GETs too.
    let mut req = json_post("/v1/apps", app);
    req.headers_mut().insert("host", "evil.example:7878".parse().unwrap());
    assert_eq!(send(&r, req).await.0, StatusCode::FORBIDDEN);
    let get = |host: &str| Request::get("/v1/apps").header("host", host).body(Body::empty()).unwrap();
    assert_eq!(send(&r, get("evil.example")).await.0, StatusCode::FORBIDDEN);
    for ok in [
        "127.0.0.1:7878",
        "localhost:7878",
        "[::1]:7878",
        "10.0.0.5:7878",
        "FLARE.internal:7878",
        "x.localhost",
    ] {
        assert_eq!(send(&r, get(ok)).await.0, StatusCode::OK, "{ok}");
    }
    // The server's own origin, and what the SDK sends, are fine.
    let mut req = json_post("/v1/apps", app);
    req.headers_mut().insert("origin", "http://127.0.0.1:7878".parse().unwrap());
    assert_eq!(send(&r, req).await.0, StatusCode::OK);
    let mut req = json_post("/v1/apps", app);
    req.headers_mut().insert("content-type", "application/json; charset=utf-8".parse().unwrap());
    assert_eq!(send(&r, req).await.0, StatusCode::OK);
    // Blob uploads take octet-stream, not JSON or text.
    let mut req = json_post("/v1/blobs/blake3:00", "x");
    *req.method_mut() = axum::http::Method::PUT;
    req.headers_mut().insert("content-type", "text/plain".parse().unwrap());
    assert_eq!(send(&r, req).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // gRPC (the worker hub, token-authenticated) is not held to these rules.
    let req = Request::post("/flare.worker.v1.WorkerHub/Session")
        .header("host", "control.example")
        .header("content-type", "application/grpc")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&r, req).await.0, StatusCode::NOT_FOUND);
    // `*` accepts any Host.
    let any = public(&h, &["*"]);
    assert_eq!(send(&any, get("evil.example")).await.0, StatusCode::OK);
}

#[tokio::test]
async fn bodies_have_limits_and_a_budget() {
    let h = harness(ControlConfig { body_budget_bytes: 4 << 20, ..ControlConfig::default() }).await;
    let r = public(&h, &[]);
    // Over the JSON limit: refused from Content-Length alone, with a readable 413.
    let mut req = json_post("/v1/apps", "{}");
    req.headers_mut().insert("content-length", (600u64 << 20).to_string().parse().unwrap());
    let (s, v) = send(&r, req).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["error"]["code"], "payload_too_large");
    assert!(v["error"]["message"].as_str().unwrap().contains("limit of 1.0 MiB for POST /v1/apps"), "{v}");
    // A chunked body is cut off at the limit while it is read.
    let chunks = (0..40).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 64 << 10])));
    let req = Request::post("/v1/apps")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(Body::from_stream(tokio_stream::iter(chunks)))
        .unwrap();
    assert_eq!(send(&r, req).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    // While the budget is used up, a request with a body waits for it.
    let (budget, kib) = h.cp.body_budget();
    let held = budget.clone().acquire_many_owned(kib).await.unwrap();
    let r2 = r.clone();
    let waiting =
        tokio::spawn(
            async move { send(&r2, json_post("/v1/apps", r#"{"name":"x","mode":"ephemeral"}"#)).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a body was read while the budget was used up");
    drop(held);
    assert_eq!(waiting.await.unwrap().0, StatusCode::OK);
    // Arguments over the cap per input: 413 with the sizes.
    let (app, _) = h.cp.create_app("a", AppMode::Ephemeral).unwrap();
    let fid = h.cp.register_functions(&app.app_id, vec![def("f")]).unwrap()[0].1.clone();
    use base64::Engine as _;
    let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; flare_api::MAX_ARGS_BYTES + 1]);
    let body = format!(r#"{{"kind":"call","inputs":[{{"args":"{big}"}}]}}"#);
    let (s, v) = send(&r, json_post(&format!("/v1/functions/{fid}/calls"), &body)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(v["error"]["message"].as_str().unwrap().contains("over the limit of 64.0 MiB per input"), "{v}");
}

#[tokio::test]
async fn containers_get_default_limits_shown_in_the_list() {
    let mut h = harness(ControlConfig { default_memory_mb: 1536, ..ControlConfig::default() }).await;
    let (app, _) = h.cp.create_app("a", AppMode::Ephemeral).unwrap();
    let mut sized = def("sized");
    sized.config.memory = Some(256);
    sized.config.cpu = Some(2.0);
    let fns = h.cp.register_functions(&app.app_id, vec![def("plain"), sized]).unwrap();
    h.cp.create_call(&fns[0].1, CallKind::Call, vec![Bytes::from_static(b"x")], false).unwrap();
    let ToWorker::Start(a) = h.rx.recv().await.unwrap() else { panic!() };
    assert_eq!(a.def.config.memory, Some(1536));
    assert_eq!(a.def.config.cpu_limit, Some(0.125 + CPU_BURST_CORES));
    h.cp.create_call(&fns[1].1, CallKind::Call, vec![Bytes::from_static(b"x")], false).unwrap();
    let ToWorker::Start(b) = h.rx.recv().await.unwrap() else { panic!() };
    assert_eq!(b.def.config.memory, Some(256));
    assert_eq!(b.def.config.cpu_limit, Some(2.0 + CPU_BURST_CORES));
    let list = h.cp.list_containers();
    let of = |id: &str| list.iter().find(|c| c.container_id == id).unwrap().clone();
    assert_eq!(of(&a.container_id).memory_limit_mb, Some(1536));
    assert_eq!(of(&b.container_id).memory_limit_mb, Some(256));
    // The scheduler still books the request, not the limit.
    let w = &h.cp.list_workers()[0];
    assert_eq!(w.memory_mb_used, 128 + 256);
    // 0: no default limit.
    let mut h = harness(ControlConfig { default_memory_mb: 0, ..ControlConfig::default() }).await;
    let (app, _) = h.cp.create_app("a", AppMode::Ephemeral).unwrap();
    let fid = h.cp.register_functions(&app.app_id, vec![def("plain")]).unwrap()[0].1.clone();
    h.cp.create_call(&fid, CallKind::Call, vec![Bytes::from_static(b"x")], false).unwrap();
    let ToWorker::Start(a) = h.rx.recv().await.unwrap() else { panic!() };
    assert_eq!(a.def.config.memory, None);
}

#[tokio::test]
async fn results_over_the_cap_fail_and_pages_are_bounded() {
    let mut h = harness(ControlConfig::default()).await;
    let (app, _) = h.cp.create_app("a", AppMode::Ephemeral).unwrap();
    let mut f = def("f");
    f.config.max_inputs = 3;
    let fid = h.cp.register_functions(&app.app_id, vec![f]).unwrap()[0].1.clone();
    let (call_id, _) =
        h.cp.create_call(&fid, CallKind::Map, (0..3).map(|_| Bytes::from_static(b"x")).collect(), false)
            .unwrap();
    let ToWorker::Start(a) = h.rx.recv().await.unwrap() else { panic!() };
    h.cp.on_worker_event(FromWorker::Ready { container_id: a.container_id.clone() });
    let ToWorker::Inputs { inputs, .. } = h.rx.recv().await.unwrap() else { panic!() };
    let out = |i: usize, n: usize| OutputMsg {
        input_id: inputs[i].input_id.clone(),
        status: OutputStatus::Success,
        gen: None,
        data: Bytes::from(vec![1u8; n]),
        exception: None,
    };
    h.cp.on_worker_event(FromWorker::Outputs {
        container_id: a.container_id.clone(),
        outputs: vec![out(0, flare_api::MAX_RESULT_BYTES + 1), out(1, 40 << 20), out(2, 40 << 20)],
    });
    let (outs, done, _) = h.cp.outputs(&call_id, -1, 10).unwrap();
    assert_eq!(outs[0].status, OutputStatus::Failure);
    let exc = outs[0].exception.as_ref().unwrap();
    assert_eq!(exc.type_name, "flare.exception.PayloadTooLargeError");
    assert!(exc.message.contains("over the limit of 64.0 MiB"), "{}", exc.message);
    // 40 + 40 MiB is over one page: the page stops after the first, and is not `done`.
    assert_eq!(outs.len(), 2);
    assert!(!done);
    let (rest, done, _) = h.cp.outputs(&call_id, 1, 10).unwrap();
    assert_eq!(rest.len(), 1);
    assert!(done);
}

#[tokio::test]
async fn flooding_containers_are_rate_limited_with_a_note() {
    let mut h = harness(ControlConfig {
        log_rate_bytes: 10_000,
        log_burst_bytes: 50_000,
        ..ControlConfig::default()
    })
    .await;
    let (app, _) = h.cp.create_app("a", AppMode::Ephemeral).unwrap();
    let fid = h.cp.register_functions(&app.app_id, vec![def("f")]).unwrap()[0].1.clone();
    h.cp.create_call(&fid, CallKind::Call, vec![Bytes::from_static(b"x")], false).unwrap();
    let ToWorker::Start(a) = h.rx.recv().await.unwrap() else { panic!() };
    let line = format!("{}\n", "y".repeat(999));
    for _ in 0..1000 {
        h.cp.on_worker_event(FromWorker::Log {
            container_id: a.container_id.clone(),
            stream: LogStream::Stdout,
            data: line.clone(),
        });
    }
    // The note comes once the container has been quiet for a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.cp.tick();
    let (logs, _, _) = h.cp.logs(&app.app_id, -1, 100_000).unwrap();
    let kept = logs.iter().filter(|l| l.stream == LogStream::Stdout).count();
    assert!((50..=62).contains(&kept), "{kept} lines kept");
    let note = logs.last().unwrap();
    assert_eq!(note.stream, LogStream::System);
    assert!(note.data.contains(&format!("{} lines", 1000 - kept)), "{}", note.data);
    assert!(note.data.contains("log rate limit"), "{}", note.data);
}

#[tokio::test]
async fn the_in_memory_log_ring_is_bounded_in_bytes() {
    let mut h = harness(ControlConfig { log_burst_bytes: 1 << 30, ..ControlConfig::default() }).await;
    let (app, _) = h.cp.create_app("a", AppMode::Ephemeral).unwrap();
    let fid = h.cp.register_functions(&app.app_id, vec![def("f")]).unwrap()[0].1.clone();
    h.cp.create_call(&fid, CallKind::Call, vec![Bytes::from_static(b"x")], false).unwrap();
    let ToWorker::Start(a) = h.rx.recv().await.unwrap() else { panic!() };
    let chunk = "z".repeat(64 << 10);
    for _ in 0..200 {
        h.cp.on_worker_event(FromWorker::Log {
            container_id: a.container_id.clone(),
            stream: LogStream::Stdout,
            data: chunk.clone(),
        });
    }
    let st = h.cp.lock();
    let ring = &st.apps[&app.app_id];
    assert!(ring.log_bytes <= crate::LOG_RING_BYTES, "{}", ring.log_bytes);
    assert_eq!(ring.log_bytes, ring.logs.iter().map(|l| l.data.len()).sum::<usize>());
}

/// Two apps with a container each, and a deployed app; requests through the container
/// socket's router act for the container they name.
#[tokio::test]
async fn the_container_socket_is_scoped_to_the_containers_app() {
    let mut h = harness(ControlConfig::default()).await;
    let (a, _) = h.cp.create_app("a", AppMode::Ephemeral).unwrap();
    let (b, _) = h.cp.create_app("b", AppMode::Ephemeral).unwrap();
    let (d, _) = h.cp.create_app("dep", AppMode::Deployed).unwrap();
    let fa = h.cp.register_functions(&a.app_id, vec![def("f"), def("g")]).unwrap();
    let fb = h.cp.register_functions(&b.app_id, vec![def("f")]).unwrap()[0].1.clone();
    let fd = h.cp.register_functions(&d.app_id, vec![def("f")]).unwrap()[0].1.clone();
    let (call_a, _) =
        h.cp.create_call(&fa[0].1, CallKind::Call, vec![Bytes::from_static(b"x")], false).unwrap();
    let ToWorker::Start(ca) = h.rx.recv().await.unwrap() else { panic!() };
    let (call_b, _) = h.cp.create_call(&fb, CallKind::Spawn, vec![Bytes::from_static(b"x")], false).unwrap();
    let ToWorker::Start(_cb) = h.rx.recv().await.unwrap() else { panic!() };
    let r = api::container_router(h.cp.clone());
    let from = |cid: &str, method: &str, path: &str, body: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header(CALLER_CONTAINER_HEADER, cid)
            .header("content-type", "application/json")
            .header("content-length", body.len().to_string())
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let cid = ca.container_id.as_str();
    let args = r#"{"kind":"spawn","inputs":[{"args":"eA=="}]}"#;
    // Calling by name: its own app's functions and deployed apps' functions.
    for fid in [&fa[1].1, &fd] {
        let (s, v) = send(&r, from(cid, "POST", &format!("/v1/functions/{fid}/calls"), args)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let id = v["call_id"].as_str().unwrap().to_string();
        // ... and reading the results of the calls it made.
        let (s, _) = send(&r, from(cid, "GET", &format!("/v1/calls/{id}/outputs"), "")).await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = send(&r, from(cid, "POST", &format!("/v1/calls/{id}/cancel"), "{}")).await;
        assert_eq!(s, StatusCode::OK);
    }
    let (s, _) = send(&r, from(cid, "GET", "/v1/apps/by-name/dep/functions/f", "")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = send(&r, from(cid, "GET", &format!("/v1/apps/{}/functions/g", a.app_id), "")).await;
    assert_eq!(s, StatusCode::OK);
    // The calls made to its own functions (it serves them) are visible too.
    let (s, _) = send(&r, from(cid, "GET", &format!("/v1/calls/{call_a}"), "")).await;
    assert_eq!(s, StatusCode::OK);
    // Another ephemeral app: its functions, its calls and their results look missing.
    let (s, _) = send(&r, from(cid, "POST", &format!("/v1/functions/{fb}/calls"), args)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = send(&r, from(cid, "GET", &format!("/v1/functions/{fb}/stats"), "")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = send(&r, from(cid, "GET", &format!("/v1/apps/{}/functions/f", b.app_id), "")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    for (m, p, body) in [
        ("GET", format!("/v1/calls/{call_b}/outputs"), ""),
        ("GET", format!("/v1/calls/{call_b}"), ""),
        ("POST", format!("/v1/calls/{call_b}/cancel"), "{}"),
        ("POST", format!("/v1/calls/{call_b}/inputs"), r#"{"inputs":[]}"#),
    ] {
        let (s, v) = send(&r, from(cid, m, &p, body)).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{m} {p}: {v}");
    }
    // Still running: the cancel above was refused.
    assert!(!h.cp.call_info(&call_b).unwrap().done);
    // App management is not reachable; nor is anything without a known caller.
    let (s, _) = send(&r, from(cid, "POST", "/v1/apps", r#"{"name":"x","mode":"deployed"}"#)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = send(&r, from("ct-nope", "GET", "/v1/health", "")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let req = Request::get("/v1/health").body(Body::empty()).unwrap();
    assert_eq!(send(&r, req).await.0, StatusCode::FORBIDDEN);
    // A remote worker relays to the public API with the header: the same scope applies.
    let p = public(&h, &[]);
    let mut req = from(cid, "GET", &format!("/v1/calls/{call_b}/outputs"), "");
    req.headers_mut().insert("host", "127.0.0.1".parse().unwrap());
    assert_eq!(send(&p, req).await.0, StatusCode::NOT_FOUND);
    let mut req = from(cid, "GET", "/v1/apps", "");
    req.headers_mut().insert("host", "127.0.0.1".parse().unwrap());
    assert_eq!(send(&p, req).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_containers_spawned_calls_stay_its_own_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (call_id, app_id);
    {
        let store = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let cp = ControlPlane::new(store, dir.path()).unwrap();
        let (app, _) = cp.create_app("dep", AppMode::Deployed).unwrap();
        let fid = cp.register_functions(&app.app_id, vec![def("f")]).unwrap()[0].1.clone();
        let caller = crate::Caller::Container { container_id: "ct-x".into(), app_id: "ap-other".into() };
        call_id = cp
            .create_call_by(&caller, &fid, CallKind::Spawn, vec![Bytes::from_static(b"x")], false)
            .unwrap()
            .0;
        app_id = app.app_id;
    }
    let store = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
    let cp = ControlPlane::new(store, dir.path()).unwrap();
    let other = crate::Caller::Container { container_id: "ct-y".into(), app_id: "ap-other".into() };
    assert!(cp.check_call_access(&other, &call_id).is_ok());
    let third = crate::Caller::Container { container_id: "ct-z".into(), app_id: "ap-third".into() };
    assert_eq!(cp.check_call_access(&third, &call_id).unwrap_err().code, flare_api::ErrorCode::NotFound);
    // The deployed app's own containers serve the call, so they see it.
    let own = crate::Caller::Container { container_id: "ct-w".into(), app_id };
    assert!(cp.check_call_access(&own, &call_id).is_ok());
}

//! Control-plane state machine tests: a test worker plays the worker's side of the channel.

use std::sync::Arc;

use bytes::Bytes;
use flare_api::{AppMode, CallKind};
use flare_proto::*;
use flare_store::SqliteStore;
use tokio::sync::mpsc;

use crate::{ControlPlane, WorkerLink};

pub(crate) fn def(name: &str) -> FunctionDef {
    serde_json::from_value(serde_json::json!({
        "name": name, "module": "m", "qualname": name, "python": {"executable": "/usr/bin/python3"}
    }))
    .unwrap()
}

pub(crate) struct Harness {
    pub(crate) cp: ControlPlane,
    pub(crate) rx: mpsc::UnboundedReceiver<ToWorker>,
    pub(crate) _dir: tempfile::TempDir,
}

pub(crate) async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
    let cp = ControlPlane::new(store, dir.path()).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    cp.add_worker(WorkerLink::local("w1", tx, 2000, 8192));
    Harness { cp, rx, _dir: dir }
}

fn output(input_id: &str, status: OutputStatus, data: &'static [u8]) -> OutputMsg {
    OutputMsg {
        input_id: input_id.into(),
        status,
        gen: None,
        data: Bytes::from_static(data),
        exception: None,
    }
}

#[tokio::test]
async fn call_runs_on_a_started_container() {
    let mut h = harness().await;
    let (app, _) = h.cp.create_app("a", AppMode::Ephemeral).unwrap();
    let fns = h.cp.register_functions(&app.app_id, vec![def("f")]).unwrap();
    let fid = &fns[0].1;
    let (call_id, _) =
        h.cp.create_call(fid, CallKind::Call, vec![Bytes::from_static(b"args")], false).unwrap();
    let ToWorker::Start(a) = h.rx.recv().await.unwrap() else { panic!("expected start") };
    assert_eq!(a.function_id, *fid);
    h.cp.on_worker_event(FromWorker::Ready { container_id: a.container_id.clone() });
    let ToWorker::Inputs { container_id, inputs } = h.rx.recv().await.unwrap() else {
        panic!("expected inputs")
    };
    assert_eq!(container_id, a.container_id);
    assert_eq!(inputs[0].args, Bytes::from_static(b"args"));
    h.cp.on_worker_event(FromWorker::Outputs {
        container_id,
        outputs: vec![output(&inputs[0].input_id, OutputStatus::Success, b"result")],
    });
    let (outs, done, _) = h.cp.outputs(&call_id, -1, 10).unwrap();
    assert!(done);
    assert_eq!(outs[0].data.as_ref().unwrap().0, Bytes::from_static(b"result"));
}

#[tokio::test]
async fn failures_retry_then_report_and_oom_names_the_limit() {
    let mut h = harness().await;
    let (app, _) = h.cp.create_app("a", AppMode::Ephemeral).unwrap();
    let mut d = def("f");
    d.config.retries =
        Some(RetryPolicy { max_retries: 1, backoff_coefficient: 1.0, initial_delay: 0.0, max_delay: 0.0 });
    let fid = h.cp.register_functions(&app.app_id, vec![d]).unwrap()[0].1.clone();
    let (call_id, _) = h.cp.create_call(&fid, CallKind::Call, vec![Bytes::from_static(b"x")], false).unwrap();
    let ToWorker::Start(a) = h.rx.recv().await.unwrap() else { panic!() };
    h.cp.on_worker_event(FromWorker::Ready { container_id: a.container_id.clone() });
    let ToWorker::Inputs { inputs, .. } = h.rx.recv().await.unwrap() else { panic!() };
    h.cp.on_worker_event(FromWorker::Outputs {
        container_id: a.container_id.clone(),
        outputs: vec![output(&inputs[0].input_id, OutputStatus::Failure, b"")],
    });
    // Retried after its (zero) delay on the next tick.
    h.cp.tick();
    let ToWorker::Inputs { inputs, .. } = h.rx.recv().await.unwrap() else { panic!() };
    // This time the container is OOM-killed: no retries left.
    h.cp.on_worker_event(FromWorker::Exited {
        container_id: a.container_id.clone(),
        report: ExitReport {
            oom_killed: true,
            memory_limit: Some(64 << 20),
            signal: Some(9),
            ..Default::default()
        },
    });
    let (outs, done, _) = h.cp.outputs(&call_id, -1, 10).unwrap();
    assert!(done);
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0].input_id, inputs[0].input_id);
    assert_eq!(outs[0].status, OutputStatus::Terminated);
    assert_eq!(outs[0].retry_count, 1);
    let exc = outs[0].exception.as_ref().unwrap();
    assert_eq!(exc.type_name, "flare.exception.OutOfMemoryError");
    assert!(exc.message.contains("64 MiB"), "{}", exc.message);
}

#[tokio::test]
async fn init_failure_fails_the_queue_instead_of_looping() {
    let mut h = harness().await;
    let (app, _) = h.cp.create_app("a", AppMode::Ephemeral).unwrap();
    let fid = h.cp.register_functions(&app.app_id, vec![def("f")]).unwrap()[0].1.clone();
    let (call_id, _) = h
        .cp
        .create_call(&fid, CallKind::Map, vec![Bytes::from_static(b"1"), Bytes::from_static(b"2")], false)
        .unwrap();
    let ToWorker::Start(a) = h.rx.recv().await.unwrap() else { panic!() };
    h.cp.on_worker_event(FromWorker::InitFailed {
        container_id: a.container_id.clone(),
        exception: ExceptionInfo::new("builtins.ImportError", "no module named nope"),
    });
    let (outs, done, _) = h.cp.outputs(&call_id, -1, 10).unwrap();
    assert!(done);
    assert!(outs.iter().all(|o| o.status == OutputStatus::InitFailure));
}

#[tokio::test]
async fn spawned_inputs_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let call_id;
    {
        let store = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let cp = ControlPlane::new(store, dir.path()).unwrap();
        let (app, _) = cp.create_app("dep", AppMode::Deployed).unwrap();
        let fid = cp.register_functions(&app.app_id, vec![def("f")]).unwrap()[0].1.clone();
        call_id = cp.create_call(&fid, CallKind::Spawn, vec![Bytes::from_static(b"x")], false).unwrap().0;
    }
    let store = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
    let cp = ControlPlane::new(store, dir.path()).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    cp.add_worker(WorkerLink::local("w1", tx, 2000, 8192));
    let ToWorker::Start(a) = rx.recv().await.unwrap() else { panic!() };
    cp.on_worker_event(FromWorker::Ready { container_id: a.container_id.clone() });
    let ToWorker::Inputs { inputs, .. } = rx.recv().await.unwrap() else { panic!() };
    cp.on_worker_event(FromWorker::Outputs {
        container_id: a.container_id,
        outputs: vec![output(&inputs[0].input_id, OutputStatus::Success, b"ok")],
    });
    let (outs, done, _) = cp.outputs(&call_id, -1, 10).unwrap();
    assert!(done);
    assert_eq!(outs[0].data.as_ref().unwrap().0, Bytes::from_static(b"ok"));
}

/// One call of `fid` run to its output on a fresh container, which is then idle; its id.
async fn serve_one_call(cp: &ControlPlane, rx: &mut mpsc::UnboundedReceiver<ToWorker>, fid: &str) -> String {
    cp.create_call(fid, CallKind::Call, vec![Bytes::from_static(b"x")], false).unwrap();
    let ToWorker::Start(a) = rx.recv().await.unwrap() else { panic!() };
    cp.on_worker_event(FromWorker::Ready { container_id: a.container_id.clone() });
    let ToWorker::Inputs { inputs, .. } = rx.recv().await.unwrap() else { panic!() };
    cp.on_worker_event(FromWorker::Outputs {
        container_id: a.container_id.clone(),
        outputs: vec![output(&inputs[0].input_id, OutputStatus::Success, b"ok")],
    });
    a.container_id
}

#[tokio::test]
async fn idle_containers_of_other_functions_make_room() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
    let cp = ControlPlane::new(store, dir.path()).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Room for exactly one default-sized container.
    cp.add_worker(WorkerLink::local("w1", tx, 125, 8192));
    let (app, _) = cp.create_app("a", AppMode::Ephemeral).unwrap();
    let fns = cp.register_functions(&app.app_id, vec![def("f"), def("g")]).unwrap();
    let (f, g) = (fns[0].1.clone(), fns[1].1.clone());
    let a = serve_one_call(&cp, &mut rx, &f).await;
    // f's container is now idle and holds the worker's only slot; g needs it.
    cp.create_call(&g, CallKind::Call, vec![Bytes::from_static(b"y")], false).unwrap();
    let ToWorker::Stop { container_id, graceful } = rx.recv().await.unwrap() else {
        panic!("expected a stop")
    };
    assert_eq!(container_id, a);
    assert!(graceful);
    cp.on_worker_event(FromWorker::Exited {
        container_id,
        report: ExitReport { requested: true, ..Default::default() },
    });
    let ToWorker::Start(b) = rx.recv().await.unwrap() else { panic!("expected g to start") };
    assert_eq!(b.function_id, g);
}

#[tokio::test]
async fn routers_build() {
    let h = harness().await;
    let _ = crate::api::router(h.cp.clone());
    let _ = crate::api::container_router(h.cp.clone());
}

#[tokio::test]
async fn containers_dying_before_ready_are_retried_then_fail_the_queue() {
    let mut h = harness().await;
    let (app, _) = h.cp.create_app("a", AppMode::Ephemeral).unwrap();
    let fid = h.cp.register_functions(&app.app_id, vec![def("f")]).unwrap()[0].1.clone();
    let (call_id, _) = h.cp.create_call(&fid, CallKind::Call, vec![Bytes::from_static(b"x")], false).unwrap();
    let report =
        || ExitReport { code: Some(1), start_error: Some("could not start".into()), ..Default::default() };
    // A passing fault: the next container is started, the input still waits.
    for _ in 0..2 {
        let ToWorker::Start(a) = h.rx.recv().await.unwrap() else { panic!("expected a start") };
        h.cp.on_worker_event(FromWorker::Exited { container_id: a.container_id, report: report() });
        let (outs, done, _) = h.cp.outputs(&call_id, -1, 10).unwrap();
        assert!(outs.is_empty() && !done);
    }
    // The third failure in a row fails the queue with the reason.
    let ToWorker::Start(a) = h.rx.recv().await.unwrap() else { panic!("expected a start") };
    h.cp.on_worker_event(FromWorker::Exited { container_id: a.container_id, report: report() });
    let (outs, done, _) = h.cp.outputs(&call_id, -1, 10).unwrap();
    assert!(done);
    assert_eq!(outs[0].status, OutputStatus::InitFailure);
    assert!(outs[0].exception.as_ref().unwrap().message.contains("could not start"));
}

/// Issue 15: what a finished map leaves in memory. Read outputs leave at once; the
/// call, its function and its stopped app leave with the sweep.
#[tokio::test]
async fn read_outputs_and_stopped_apps_leave_memory() {
    let mut h = harness().await;
    let (app, _) = h.cp.create_app("a", AppMode::Ephemeral).unwrap();
    let mut d = def("f");
    d.config.max_inputs = 100;
    d.config.max_containers = Some(1);
    let fid = h.cp.register_functions(&app.app_id, vec![d]).unwrap()[0].1.clone();
    let n = 50;
    let inputs: Vec<Bytes> = (0..n).map(|_| Bytes::from_static(b"x")).collect();
    let (call_id, _) = h.cp.create_call(&fid, CallKind::Map, inputs, false).unwrap();
    let ToWorker::Start(a) = h.rx.recv().await.unwrap() else { panic!() };
    h.cp.on_worker_event(FromWorker::Ready { container_id: a.container_id.clone() });
    let ToWorker::Inputs { inputs, .. } = h.rx.recv().await.unwrap() else { panic!() };
    assert_eq!(inputs.len(), n);
    h.cp.on_worker_event(FromWorker::Outputs {
        container_id: a.container_id.clone(),
        outputs: inputs.iter().map(|i| output(&i.input_id, OutputStatus::Success, b"r")).collect(),
    });
    let kept = |cp: &ControlPlane| cp.lock().calls.get(&call_id).map(|c| c.outputs.kept());
    assert_eq!(kept(&h.cp), Some(n));
    let (outs, done, _) = h.cp.outputs(&call_id, -1, 20).unwrap();
    assert_eq!((outs.len(), done), (20, false));
    let (outs, done, _) = h.cp.outputs(&call_id, 19, 100).unwrap();
    assert_eq!((outs.len(), done), (30, true));
    assert_eq!(kept(&h.cp), Some(30), "the first page was acknowledged by the second read");
    assert!(h.cp.outputs(&call_id, 5, 10).is_err(), "read outputs are gone");
    // The app stops: the delivered call leaves at the next sweep, the function once its
    // container exited, the app itself after its logs had time to reach the store.
    h.cp.stop_app(&app.app_id).unwrap();
    h.cp.on_worker_event(FromWorker::Exited {
        container_id: a.container_id.clone(),
        report: ExitReport { requested: true, ..Default::default() },
    });
    let now = std::time::Instant::now();
    {
        let mut st = h.cp.lock();
        h.cp.sweep(&mut st, now);
        assert!(!st.calls.contains_key(&call_id));
        assert!(!st.functions.contains_key(&fid));
        assert!(st.apps.contains_key(&app.app_id), "logs stay a minute");
        h.cp.sweep(&mut st, now + std::time::Duration::from_secs(61));
        assert!(!st.apps.contains_key(&app.app_id));
    }
    // What the API shows of the stopped app comes from the store.
    let apps = h.cp.list_apps().unwrap();
    assert!(apps.iter().any(|a| a.app_id == app.app_id && a.state == "stopped"));
    assert!(h.cp.logs(&app.app_id, -1, 10).is_ok());
}

/// A map whose caller reads outputs takes at most `call_window` unconsumed inputs.
#[tokio::test]
async fn map_submitter_is_held_back_until_outputs_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
    let cfg = crate::ControlConfig { call_window: 10, ..Default::default() };
    let cp = ControlPlane::with_config(store, dir.path(), cfg).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    cp.add_worker(WorkerLink::local("w1", tx, 2000, 8192));
    let (app, _) = cp.create_app("a", AppMode::Ephemeral).unwrap();
    let mut d = def("f");
    d.config.max_inputs = 100;
    d.config.max_containers = Some(1);
    let fid = cp.register_functions(&app.app_id, vec![d]).unwrap()[0].1.clone();
    let batch = |k: usize| (0..k).map(|_| Bytes::from_static(b"x")).collect::<Vec<_>>();
    let (call_id, _) = cp.create_call(&fid, CallKind::Map, batch(4), true).unwrap();
    // Nobody reads yet (spawn_map): no limit.
    assert!(cp.try_add_inputs(&call_id, batch(8), true).unwrap().is_ok());
    let _ = cp.outputs(&call_id, -1, 10).unwrap();
    let Err((back, no_room)) = cp.try_add_inputs(&call_id, batch(2), true).unwrap() else {
        panic!("12 unconsumed of a window of 10")
    };
    assert_eq!((back.len(), no_room.unconsumed, no_room.window), (2, 12, 10));
    let ToWorker::Start(a) = rx.recv().await.unwrap() else { panic!() };
    cp.on_worker_event(FromWorker::Ready { container_id: a.container_id.clone() });
    let ToWorker::Inputs { inputs, .. } = rx.recv().await.unwrap() else { panic!() };
    assert_eq!(inputs.len(), 12);
    cp.on_worker_event(FromWorker::Outputs {
        container_id: a.container_id.clone(),
        outputs: inputs.iter().take(6).map(|i| output(&i.input_id, OutputStatus::Success, b"r")).collect(),
    });
    // Finished is not consumed: still no room until the caller reads them.
    assert!(cp.try_add_inputs(&call_id, batch(2), true).unwrap().is_err());
    let (outs, _, _) = cp.outputs(&call_id, -1, 10).unwrap();
    assert_eq!(outs.len(), 6);
    let _ = cp.outputs(&call_id, outs.last().unwrap().seq as i64, 10).unwrap();
    assert!(no_room.room.has_changed().unwrap(), "the waiting submitter is woken");
    assert!(cp.try_add_inputs(&call_id, batch(2), false).unwrap().is_ok());
}

/// Eviction counts GPUs: an idle GPU container of another function stops so that a GPU
/// request fits, and the ledger gives the GPU back when it exits.
#[tokio::test]
async fn idle_gpu_containers_make_room_for_gpu_requests() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
    let cp = ControlPlane::new(store, dir.path()).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut link = WorkerLink::local("w1", tx, 8000, 65536);
    link.gpus.insert("H100".into(), 1);
    cp.add_worker(link);
    let (app, _) = cp.create_app("a", AppMode::Ephemeral).unwrap();
    let gpu_def = |name: &str| {
        let mut d = def(name);
        d.config.gpu = vec![GpuRequest { kind: "H100".into(), count: 1 }];
        d
    };
    let fns = cp.register_functions(&app.app_id, vec![gpu_def("f"), gpu_def("g")]).unwrap();
    let (f, g) = (fns[0].1.clone(), fns[1].1.clone());
    let a = serve_one_call(&cp, &mut rx, &f).await;
    assert_eq!(cp.list_workers()[0].gpus_used.get("H100"), Some(&1));
    cp.create_call(&g, CallKind::Call, vec![Bytes::from_static(b"y")], false).unwrap();
    let ToWorker::Stop { container_id, .. } = rx.recv().await.unwrap() else { panic!("expected a stop") };
    assert_eq!(container_id, a);
    cp.on_worker_event(FromWorker::Exited {
        container_id,
        report: ExitReport { requested: true, ..Default::default() },
    });
    let ToWorker::Start(b) = rx.recv().await.unwrap() else { panic!("expected g to start") };
    assert_eq!(b.function_id, g);
    // The GPU went from f's container to g's: booked once.
    assert_eq!(cp.list_workers()[0].gpus_used.get("H100"), Some(&1));
    assert_eq!(cp.list_workers()[0].cpu_millis_used, 125);
}

/// Container lifecycle events come in the order of the state's changes, with what the
/// container holds.
#[tokio::test]
async fn lifecycle_events_follow_a_container() {
    use crate::ContainerEvent;
    let mut h = harness().await;
    let mut events = h.cp.subscribe_lifecycle();
    let (app, _) = h.cp.create_app("a", AppMode::Ephemeral).unwrap();
    let fid = h.cp.register_functions(&app.app_id, vec![def("f")]).unwrap()[0].1.clone();
    h.cp.create_call(&fid, CallKind::Call, vec![Bytes::from_static(b"x")], false).unwrap();
    let ToWorker::Start(a) = h.rx.recv().await.unwrap() else { panic!() };
    h.cp.on_worker_event(FromWorker::Ready { container_id: a.container_id.clone() });
    h.cp.stop_app(&app.app_id).unwrap();
    h.cp.on_worker_event(FromWorker::Exited {
        container_id: a.container_id.clone(),
        report: ExitReport { requested: true, ..Default::default() },
    });
    let ContainerEvent::Started { container_id, function_id, cpu_millis, gpu, .. } =
        events.recv().await.unwrap()
    else {
        panic!("expected started")
    };
    assert_eq!(
        (container_id.as_str(), function_id.as_str(), cpu_millis, gpu),
        (a.container_id.as_str(), fid.as_str(), 125, None)
    );
    assert!(matches!(events.recv().await.unwrap(), ContainerEvent::Ready { .. }));
    assert!(matches!(events.recv().await.unwrap(), ContainerEvent::Stopping { .. }));
    assert!(matches!(events.recv().await.unwrap(), ContainerEvent::Exited { .. }));
    assert_eq!(h.cp.list_workers()[0].cpu_millis_used, 0, "the ledger freed what the container held");
}

/// Mount ids are the server's BLAKE3 of the files: identical uploads share one.
#[tokio::test]
async fn identical_mounts_share_an_id() {
    let h = harness().await;
    let file = |data: &'static [u8]| flare_api::MountFile {
        path: "m.py".into(),
        data: B64(Bytes::from_static(data)),
        mode: 0o644,
    };
    let a = h.cp.create_mount(vec![file(b"x = 1\n")]).unwrap();
    let b = h.cp.create_mount(vec![file(b"x = 1\n")]).unwrap();
    let c = h.cp.create_mount(vec![file(b"x = 2\n")]).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.starts_with("mo-") && a.len() == 35 && a[3..].bytes().all(|b| b.is_ascii_hexdigit()), "{a}");
    assert_eq!(h.cp.read_mount(&a).unwrap()[0].data.0, Bytes::from_static(b"x = 1\n"));
}

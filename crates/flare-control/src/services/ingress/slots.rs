//! Web requests as the scheduler sees them: an endpoint found by its address, and a slot in
//! one of its function's containers taken per request, like an input (`max_inputs` per
//! container counts both). A request that finds no free slot waits as backlog, so the
//! autoscaler starts containers for it (from zero too), and is woken when a slot may
//! have freed up ([`crate::dispatch::dispatch`] bumps the function's `web_wake`).

use std::time::{Duration, Instant};

use flare_api::AppMode;
use flare_proto::FunctionDef;
use tokio::sync::watch;

use super::route::{self, WebAddress};
use crate::dispatch::schedule;
use crate::state::{AppRt, CState, State};
use crate::workers::stop_container;

/// What a request goes to.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub fid: String,
    pub app_id: String,
    pub index: usize,
    pub requires_proxy_auth: bool,
    /// How long a request waits for a container.
    pub startup_timeout: Duration,
    /// How long a request waits for the response's head (the function's timeout).
    pub timeout: Duration,
}

/// The labels of a function's endpoints, in order (ephemeral apps' end in `-dev`, so that
/// `flare serve` of a deployed app does not take its URLs).
pub(crate) fn labels(app: &AppRt, fname: &str, def: &FunctionDef) -> Vec<String> {
    let dev = app.app.mode == AppMode::Ephemeral;
    def.web
        .iter()
        .map(|w| {
            let l = route::label_for(&app.app.name, fname, w.method_name.as_deref(), w.label.as_deref());
            if dev {
                route::slug(&format!("{l}-dev"))
            } else {
                l
            }
        })
        .collect()
}

/// The function and endpoint that answer to `label`, among running apps (a deployed
/// app's over an ephemeral one's).
fn by_label(st: &State, label: &str) -> Option<(String, usize)> {
    let mut found: Option<(String, usize, bool)> = None;
    for f in st.functions.values().filter(|f| f.active && !f.def.web.is_empty()) {
        let Some(app) = st.apps.get(&f.app_id) else { continue };
        if app.app.stopped() {
            continue;
        }
        if let Some(i) = labels(app, &f.name, &f.def).iter().position(|l| l == label) {
            let deployed = app.app.mode == AppMode::Deployed;
            if found.as_ref().is_none_or(|(_, _, d)| deployed && !d) {
                found = Some((f.id.clone(), i, deployed));
            }
        }
    }
    found.map(|(fid, i, _)| (fid, i))
}

/// The endpoint named `name` (its label, its function's name, or `Class.method`) of the
/// running app named `app`.
fn by_path(st: &State, app: &str, name: &str) -> Option<(String, usize)> {
    let mut apps: Vec<&AppRt> = st.apps.values().filter(|a| a.app.name == app && !a.app.stopped()).collect();
    // A deployed app first, then the newest ephemeral one.
    apps.sort_by(|a, b| {
        (b.app.mode == AppMode::Deployed)
            .cmp(&(a.app.mode == AppMode::Deployed))
            .then(b.app.created_at.total_cmp(&a.app.created_at))
    });
    for a in apps {
        for fid in a.functions.values() {
            let Some(f) = st.functions.get(fid).filter(|f| f.active) else { continue };
            let labels = labels(a, &f.name, &f.def);
            for (i, w) in f.def.web.iter().enumerate() {
                let full = match &w.method_name {
                    Some(m) => format!("{}.{m}", f.name),
                    None => f.name.clone(),
                };
                if labels[i] == name
                    || w.label.as_deref() == Some(name)
                    || full == name
                    || route::slug(&full) == name
                {
                    return Some((f.id.clone(), i));
                }
            }
        }
    }
    None
}

/// The endpoint a request's address names, or why there is none (a 404's message).
pub(crate) fn lookup(st: &State, addr: &WebAddress) -> Result<Endpoint, String> {
    let found = match addr {
        WebAddress::Host { label } => by_label(st, label),
        WebAddress::Path { app, name, .. } => by_path(st, app, name),
    };
    let Some((fid, index)) = found else {
        return Err(match addr {
            WebAddress::Host { label } => format!("no web endpoint is named {label:?}"),
            WebAddress::Path { app, name, .. } => format!("app {app:?} has no running web endpoint {name:?}"),
        });
    };
    let f = &st.functions[&fid];
    let w = &f.def.web[index];
    let timeout = Duration::from_secs(f.def.config.timeout);
    Ok(Endpoint {
        fid,
        app_id: f.app_id.clone(),
        index,
        requires_proxy_auth: w.requires_proxy_auth,
        startup_timeout: w.startup_timeout.map(Duration::from_secs_f64).unwrap_or(timeout),
        timeout,
    })
}

/// A slot taken in a container.
#[derive(Clone, Debug)]
pub(crate) struct Slot {
    pub cid: String,
    pub worker_id: String,
}

/// What trying to take a slot gave.
pub(crate) enum Take {
    Got(Slot),
    /// None free: wait for the receiver to change, then try again.
    Wait(watch::Receiver<u64>),
    /// The endpoint cannot serve (app stopped, its containers fail to start).
    Fail {
        status: u16,
        message: String,
    },
}

/// Takes the least loaded free slot of the endpoint's function, or says what to wait for.
/// `waiting` is true when the caller already counts as waiting (see [`Waiting`]).
pub(crate) fn take(st: &mut State, ep: &Endpoint, waiting: bool) -> Take {
    let Some(f) = st.functions.get(&ep.fid) else {
        return Take::Fail { status: 404, message: "the endpoint's app was stopped".into() };
    };
    if !f.active {
        return Take::Fail { status: 404, message: "the endpoint's app was stopped".into() };
    }
    let max = f.def.config.max_inputs.max(1) as usize;
    let mut best: Option<(usize, &String)> = None;
    let mut starting = false;
    for cid in &f.containers {
        let Some(c) = st.containers.get(cid) else { continue };
        if c.fn_version != f.version {
            continue;
        }
        if c.state == CState::Starting {
            starting = true;
        }
        if c.state != CState::Ready || c.retire {
            continue;
        }
        if st.workers.iter().any(|w| w.link.id == c.worker_id && w.draining) {
            continue;
        }
        let load = c.load();
        if load < max && best.is_none_or(|(l, _)| load < l) {
            best = Some((load, cid));
        }
    }
    if let Some((_, cid)) = best {
        let cid = cid.clone();
        let c = st.containers.get_mut(&cid).expect("looked up");
        c.web_inflight += 1;
        return Take::Got(Slot { cid, worker_id: c.worker_id.clone() });
    }
    if let (Some(e), false) = (&f.init_error, starting) {
        return Take::Fail { status: 503, message: format!("the endpoint's container failed to start: {e}") };
    }
    let rx = f.web_wake.subscribe();
    if !waiting {
        st.functions.get_mut(&ep.fid).expect("looked up").web_waiting += 1;
        schedule(st, &ep.fid);
    }
    Take::Wait(rx)
}

/// Gives a slot back: the container is idle from now if nothing else runs there, an
/// old version's container stops once its last request ended, and waiting requests and
/// queued inputs get the slot.
pub(crate) fn give_back(st: &mut State, slot: &Slot) {
    let Some(c) = st.containers.get_mut(&slot.cid) else { return };
    c.web_inflight = c.web_inflight.saturating_sub(1);
    let fid = c.function_id.clone();
    if c.is_idle() {
        c.idle_since = Instant::now();
        if c.retire && c.state != CState::Stopping {
            stop_container(st, &slot.cid, true);
        }
    }
    schedule(st, &fid);
}

/// Stops counting a request as waiting (it got a slot, failed or its client left).
pub(crate) fn stop_waiting(st: &mut State, fid: &str) {
    if let Some(f) = st.functions.get_mut(fid) {
        f.web_waiting = f.web_waiting.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::services::ingress::upstream::{Dialing, WebDialer};
    use crate::tests::def;
    use crate::{ControlPlane, WorkerLink};
    use flare_api::AppMode;
    use flare_proto::{FromWorker, ToWorker};
    use tokio::sync::mpsc;

    /// A worker the ingress could reach (placement requires one for web functions).
    struct Reachable;

    impl WebDialer for Reachable {
        fn dial(&self, _: &str, _: usize) -> Dialing {
            Box::pin(async { Err(std::io::Error::other("not dialed in this test")) })
        }
    }

    fn web_def(name: &str) -> FunctionDef {
        let mut d = def(name);
        d.web = vec![serde_json::from_value(serde_json::json!({"kind": "asgi"})).unwrap()];
        d.config.max_inputs = 2;
        d
    }

    /// A request to a scaled-to-zero endpoint waits as backlog, which starts a container; once
    /// it is ready the request takes a slot, up to `max_inputs`; giving slots back frees them.
    #[tokio::test]
    async fn requests_take_slots_and_scale_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(flare_store::SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let cp = ControlPlane::new(store, dir.path()).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Without a way in, a worker gets no containers of web functions.
        let mut link = WorkerLink::local("w1", tx, 2000, 8192);
        link.web = Some(Arc::new(Reachable));
        cp.add_worker(link);
        let (app, _) = cp.create_app("shop", AppMode::Deployed).unwrap();
        cp.register_functions(&app.app_id, vec![web_def("api"), def("plain")]).unwrap();
        let ep = {
            let st = cp.lock();
            assert!(lookup(&st, &WebAddress::Host { label: "shop-plain".into() }).is_err());
            assert!(lookup(&st, &WebAddress::Host { label: "shop-api-dev".into() }).is_err());
            let by_path = WebAddress::Path {
                app: "shop".into(),
                name: "api".into(),
                prefix: "/web/shop/api".into(),
                rest: "/".into(),
            };
            assert!(lookup(&st, &by_path).is_ok());
            lookup(&st, &WebAddress::Host { label: "shop-api".into() }).unwrap()
        };
        let Take::Wait(_) = take(&mut cp.lock(), &ep, false) else { panic!("no container yet") };
        let ToWorker::Start(a) = rx.recv().await.unwrap() else { panic!("expected a start") };
        cp.on_worker_event(FromWorker::Ready { container_id: a.container_id.clone() });
        let mut st = cp.lock();
        stop_waiting(&mut st, &ep.fid);
        let Take::Got(s1) = take(&mut st, &ep, false) else { panic!("a slot") };
        let Take::Got(s2) = take(&mut st, &ep, false) else { panic!("a second slot") };
        assert_eq!(s1.cid, a.container_id);
        assert_eq!(st.containers[&s1.cid].load(), 2);
        // Full (max_inputs = 2): the third waits and asks for another container.
        let Take::Wait(_) = take(&mut st, &ep, false) else { panic!("full") };
        stop_waiting(&mut st, &ep.fid);
        give_back(&mut st, &s1);
        give_back(&mut st, &s2);
        assert!(st.containers[&a.container_id].is_idle());
        drop(st);
        cp.stop_app(&app.app_id).unwrap();
        assert!(lookup(&cp.lock(), &WebAddress::Host { label: "shop-api".into() }).is_err());
        let Take::Fail { status: 404, .. } = take(&mut cp.lock(), &ep, false) else { panic!("stopped") };
    }
}

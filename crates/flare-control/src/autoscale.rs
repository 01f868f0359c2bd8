//! Autoscaling: how many containers a function starts (`scheduler::containers_to_start`),
//! where they go (`scheduler::place` over the ledger's views), and which idle containers of
//! other functions stop to make room.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use flare_proto::{ContainerAssignment, FunctionDef, ToWorker};

use crate::logs::LogBucket;
use crate::state::{CState, ContainerEvent, ContainerRt, FnRt, Reservation, State};
use crate::workers::stop_container;
use crate::{new_id, now_ts, scheduler};

/// Containers of one function starting at the same time.
pub(crate) const MAX_STARTING_PER_FUNCTION: u32 = 8;
/// Default reservation of a container without `cpu=` / `memory=`.
pub(crate) const DEFAULT_CPU_MILLIS: u64 = 125;
pub(crate) const DEFAULT_MEMORY_MB: u64 = 128;

/// What one container of a function asks of a worker.
pub(crate) fn request_of(def: &FunctionDef) -> scheduler::Request {
    let cfg = &def.config;
    scheduler::Request {
        cpu_millis: cfg.cpu.map(|c| (c * 1000.0) as u64).unwrap_or(DEFAULT_CPU_MILLIS),
        memory_mb: cfg.memory.unwrap_or(DEFAULT_MEMORY_MB),
        gpu: cfg.gpu.clone(),
        image: def.image.as_ref().map(|i| i.manifest.clone()),
    }
}

/// The scheduler's views of the workers for placing a container of `f`.
fn worker_views(st: &State, f: &FnRt) -> Vec<scheduler::WorkerView> {
    st.workers
        .iter()
        .map(|w| scheduler::WorkerView {
            images: w.images.clone(),
            same_function: f
                .containers
                .iter()
                .filter(|c| st.containers.get(*c).is_some_and(|c| c.worker_id == w.link.id))
                .count() as u32,
            // Containers of web endpoints go only where the ingress can reach them.
            accepting: w.accepting && (f.def.web.is_empty() || w.link.web.is_some()),
            ..st.ledger.view(&w.link.id)
        })
        .collect()
}

/// Starts the containers a function needs now, as far as they can be placed; when one
/// cannot, records why and stops idle containers elsewhere to make room.
pub(crate) fn autoscale(st: &mut State, fid: &str) {
    let Some(f) = st.functions.get(fid) else { return };
    if !f.active {
        return;
    }
    let mut live = 0u32;
    let mut starting = 0u32;
    let mut in_flight = 0u64;
    for cid in &f.containers {
        if let Some(c) = st.containers.get(cid) {
            in_flight += c.load() as u64;
            if c.state != CState::Stopping && c.fn_version == f.version {
                live += 1;
                if c.state == CState::Starting {
                    starting += 1;
                }
            }
        }
    }
    let cfg = &f.def.config;
    let n = scheduler::containers_to_start(
        scheduler::ScaleInput {
            backlog: f.queue.len() as u64 + f.web_waiting as u64,
            in_flight,
            live,
            starting,
            target_inputs: cfg.target_inputs.unwrap_or(cfg.max_inputs).max(1),
            min_containers: cfg.min_containers,
            max_containers: cfg.max_containers,
            buffer_containers: cfg.buffer_containers,
        },
        MAX_STARTING_PER_FUNCTION,
    );
    if n == 0 {
        return;
    }
    let req = request_of(&f.def);
    let app_name = st.apps.get(&f.app_id).map(|a| a.app.name.clone()).unwrap_or_default();
    // One set of views for the whole round: each placement is booked on it
    // (`WorkerView::reserve`) as on the ledger, so the next decision sees it.
    let mut views = worker_views(st, f);
    let mut make_room = false;
    for _ in 0..n {
        let Some(placement) = scheduler::place(&views, &req) else {
            let reason = scheduler::unplaceable_reason(&views, &req);
            let f = st.functions.get_mut(fid).expect("looked up");
            if f.waiting.as_deref() != Some(reason.as_str()) {
                tracing::info!(function = %f.name, %reason, "container waiting for a worker");
                f.waiting = Some(reason);
            }
            make_room = true;
            break;
        };
        let f = st.functions.get_mut(fid).expect("looked up");
        f.waiting = None;
        let cid = new_id("ct");
        // The worker gets explicit limits: the server's defaults where the function sets none.
        let mut def = f.def.clone();
        if def.config.memory.is_none() && st.config.default_memory_mb > 0 {
            def.config.memory = Some(st.config.default_memory_mb);
        }
        if def.config.cpu_limit.is_none() {
            let request = def.config.cpu.unwrap_or(DEFAULT_CPU_MILLIS as f64 / 1000.0);
            def.config.cpu_limit = Some(request + flare_proto::CPU_BURST_CORES);
        }
        let (memory_limit_mb, cpu_limit) = (def.config.memory, def.config.cpu_limit);
        let assignment = ContainerAssignment {
            container_id: cid.clone(),
            app_id: f.app_id.clone(),
            app_name: app_name.clone(),
            function_id: f.id.clone(),
            def,
        };
        let w = &mut st.workers[placement.worker];
        if w.link.tx.send(ToWorker::Start(assignment)).is_err() {
            // The worker is going away; the next round places elsewhere.
            w.accepting = false;
            views[placement.worker].accepting = false;
            st.dirty.insert(fid.to_string());
            continue;
        }
        let reservation = Reservation::of(&req, placement.gpu.clone());
        views[placement.worker].reserve(&req, placement.gpu.as_ref());
        st.ledger.reserve(&w.link.id, &reservation);
        st.lifecycle.emit(ContainerEvent::started(
            (&cid, &f.app_id, &f.id, &w.link.id),
            &reservation,
            now_ts(),
        ));
        let now = Instant::now();
        st.containers.insert(
            cid.clone(),
            ContainerRt {
                id: cid.clone(),
                function_id: f.id.clone(),
                app_id: f.app_id.clone(),
                worker_id: w.link.id.clone(),
                fn_version: f.version,
                state: CState::Starting,
                inflight: HashMap::new(),
                started_at: now,
                idle_since: now,
                reservation,
                cancelled: HashSet::new(),
                memory_limit_mb,
                cpu_limit,
                logs: LogBucket::new(st.config.log_burst_bytes),
                web_inflight: 0,
                retire: false,
            },
        );
        f.containers.insert(cid);
    }
    if make_room {
        evict_idle_for(st, fid, &req);
    }
}

/// Takes a container's reservation off a scratch view (what stopping it would free).
fn free_on(view: &mut scheduler::WorkerView, r: &Reservation) {
    let req =
        scheduler::Request { cpu_millis: r.cpu_millis, memory_mb: r.memory_mb, gpu: Vec::new(), image: None };
    view.release(&req, r.gpu.as_ref());
}

/// Stops idle containers of other functions (oldest idle first, never below their
/// `min_containers`) so that a container of `fid` fits on some worker: its cpu, memory and
/// GPUs. What containers already stopping hold counts as free, so repeated calls do not
/// over-evict.
pub(crate) fn evict_idle_for(st: &mut State, fid: &str, req: &scheduler::Request) {
    for cid in eviction_plan(st, fid, req) {
        tracing::debug!(container = %cid, "stopping an idle container to make room");
        stop_container(st, &cid, true);
    }
}

/// The containers [`evict_idle_for`] stops: on the first worker where stopping them makes
/// `req` fit; none if room is already on its way or no worker can make it.
fn eviction_plan(st: &State, fid: &str, req: &scheduler::Request) -> Vec<String> {
    let fits = |view: &scheduler::WorkerView| scheduler::place(std::slice::from_ref(view), req).is_some();
    for w in st.workers.iter().filter(|w| w.accepting) {
        let wid = w.link.id.as_str();
        let mut view = scheduler::WorkerView { accepting: true, ..st.ledger.view(wid) };
        for c in st.containers.values().filter(|c| c.worker_id == wid && c.state == CState::Stopping) {
            free_on(&mut view, &c.reservation);
        }
        if fits(&view) {
            return Vec::new(); // room is already on its way
        }
        let mut idle: Vec<(Instant, &str, &str)> = st
            .containers
            .values()
            .filter(|c| c.worker_id == wid && c.function_id != fid && c.state == CState::Ready && c.is_idle())
            .map(|c| (c.idle_since, c.id.as_str(), c.function_id.as_str()))
            .collect();
        idle.sort();
        let mut chosen = Vec::new();
        let mut live_left: HashMap<&str, usize> = HashMap::new();
        for (_, cid, ofid) in idle {
            let Some(of) = st.functions.get(ofid) else { continue };
            let min = of.def.config.min_containers as usize;
            let live = *live_left.entry(ofid).or_insert_with(|| {
                of.containers
                    .iter()
                    .filter(|c| st.containers.get(*c).is_some_and(|c| c.state != CState::Stopping))
                    .count()
            });
            if of.active && live <= min {
                continue;
            }
            live_left.insert(ofid, live - 1);
            free_on(&mut view, &st.containers[cid].reservation);
            chosen.push(cid.to_string());
            if fits(&view) {
                return chosen;
            }
        }
    }
    Vec::new()
}

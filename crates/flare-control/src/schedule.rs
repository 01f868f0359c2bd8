//! Dispatch and autoscaling.

use crate::*;

/// Containers of one function starting at the same time.
pub(crate) const MAX_STARTING_PER_FUNCTION: u32 = 8;
/// Default reservation of a container without `cpu=` / `memory=`.
pub(crate) const DEFAULT_CPU_MILLIS: u64 = 125;
pub(crate) const DEFAULT_MEMORY_MB: u64 = 128;
/// Hands queued inputs to containers with free slots, then starts containers for what is left.
pub(crate) fn schedule(st: &mut State, fid: &str) {
    let Some(f) = st.functions.get_mut(fid) else { return };
    if !f.active {
        return;
    }
    let max_inputs = f.def.config.max_inputs.max(1) as usize;
    let timeout_ms = f.def.config.timeout * 1000;
    // 1. Dispatch to ready containers of the current version.
    if !f.queue.is_empty() {
        let mut cids: Vec<&String> = f.containers.iter().collect();
        cids.sort();
        for cid in cids {
            if f.queue.is_empty() {
                break;
            }
            let Some(c) = st.containers.get_mut(cid) else { continue };
            if c.state != CState::Ready || c.fn_version != f.version {
                continue;
            }
            if st.workers.iter().any(|w| w.link.id == c.worker_id && w.draining) {
                continue;
            }
            let free = max_inputs.saturating_sub(c.inflight.len());
            if free == 0 {
                continue;
            }
            let mut batch = Vec::with_capacity(free.min(f.queue.len()));
            for _ in 0..free {
                let Some(qi) = f.queue.pop_front() else { break };
                batch.push(InputMsg {
                    input_id: qi.input_id.clone(),
                    call_id: qi.call_id.clone(),
                    idx: qi.idx,
                    args: qi.args.clone(),
                    timeout_ms,
                });
                c.inflight.insert(qi.input_id.clone(), qi);
            }
            if let Some(w) = st.workers.iter().find(|w| w.link.id == c.worker_id) {
                let _ = w.link.tx.send(ToWorker::Inputs { container_id: c.id.clone(), inputs: batch });
            }
        }
    }
    // 2. Autoscale.
    let mut live = 0u32;
    let mut starting = 0u32;
    let mut in_flight = 0u64;
    for cid in &f.containers {
        if let Some(c) = st.containers.get(cid) {
            in_flight += c.inflight.len() as u64;
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
            backlog: f.queue.len() as u64,
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
    let req = scheduler::Request {
        cpu_millis: cfg.cpu.map(|c| (c * 1000.0) as u64).unwrap_or(DEFAULT_CPU_MILLIS),
        memory_mb: cfg.memory.unwrap_or(DEFAULT_MEMORY_MB),
        gpu: cfg.gpu.clone(),
        image: f.def.image.as_ref().map(|i| i.manifest.clone()),
    };
    let app_name = st.apps.get(&f.app_id).map(|a| a.row.name.clone()).unwrap_or_default();
    let mut make_room = false;
    for _ in 0..n {
        let views: Vec<scheduler::WorkerView> = st
            .workers
            .iter()
            .map(|w| scheduler::WorkerView {
                id: w.link.id.clone(),
                cpu_millis_total: w.link.cpu_millis,
                cpu_millis_used: w.cpu_used,
                memory_mb_total: w.link.memory_mb,
                memory_mb_used: w.mem_used,
                gpus_total: w.link.gpus.clone(),
                gpus_used: w.gpus_used.clone(),
                images: w.images.clone(),
                same_function: f
                    .containers
                    .iter()
                    .filter(|c| st.containers.get(*c).is_some_and(|c| c.worker_id == w.link.id))
                    .count() as u32,
                accepting: w.accepting,
            })
            .collect();
        let Some(placement) = scheduler::place(&views, &req) else {
            let reason = scheduler::unplaceable_reason(&views, &req);
            if f.waiting.as_deref() != Some(reason.as_str()) {
                tracing::info!(function = %f.name, %reason, "container waiting for a worker");
                f.waiting = Some(reason);
            }
            make_room = true;
            break;
        };
        f.waiting = None;
        let w = &mut st.workers[placement.worker];
        w.cpu_used += req.cpu_millis;
        w.mem_used += req.memory_mb;
        if let Some(g) = &placement.gpu {
            *w.gpus_used.entry(g.kind.clone()).or_insert(0) += g.count;
        }
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
        if w.link.tx.send(ToWorker::Start(assignment)).is_err() {
            w.accepting = false;
            continue;
        }
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
                cpu: req.cpu_millis,
                mem: req.memory_mb,
                gpu: placement.gpu.clone(),
                cancelled: HashSet::new(),
                memory_limit_mb,
                cpu_limit,
                logs: LogBucket::new(st.config.log_burst_bytes),
            },
        );
        f.containers.insert(cid);
    }
    if make_room && req.gpu.is_empty() {
        evict_idle_for(st, fid, &req);
    }
}

/// Stops idle containers of other functions (oldest idle first, never below their
/// `min_containers`) so that a container of `fid` fits on some worker. Capacity held by
/// containers already stopping counts as free, so repeated calls do not over-evict.
pub(crate) fn evict_idle_for(st: &mut State, fid: &str, req: &scheduler::Request) {
    for wi in 0..st.workers.len() {
        let w = &st.workers[wi];
        if !w.accepting {
            continue;
        }
        let wid = w.link.id.clone();
        let (mut cpu_free, mut mem_free) =
            (w.link.cpu_millis.saturating_sub(w.cpu_used), w.link.memory_mb.saturating_sub(w.mem_used));
        for c in st.containers.values().filter(|c| c.worker_id == wid && c.state == CState::Stopping) {
            cpu_free += c.cpu;
            mem_free += c.mem;
        }
        if cpu_free >= req.cpu_millis && mem_free >= req.memory_mb {
            return; // room is already on its way
        }
        let mut idle: Vec<(Instant, String, String)> = st
            .containers
            .values()
            .filter(|c| {
                c.worker_id == wid
                    && c.function_id != fid
                    && c.state == CState::Ready
                    && c.inflight.is_empty()
            })
            .map(|c| (c.idle_since, c.id.clone(), c.function_id.clone()))
            .collect();
        idle.sort();
        let mut chosen = Vec::new();
        let mut live_left: HashMap<String, usize> = HashMap::new();
        for (_, cid, ofid) in idle {
            let Some(of) = st.functions.get(&ofid) else { continue };
            let min = of.def.config.min_containers as usize;
            let live = *live_left.entry(ofid.clone()).or_insert_with(|| {
                of.containers
                    .iter()
                    .filter(|c| st.containers.get(*c).is_some_and(|c| c.state != CState::Stopping))
                    .count()
            });
            if of.active && live <= min {
                continue;
            }
            live_left.insert(ofid, live - 1);
            let c = &st.containers[&cid];
            cpu_free += c.cpu;
            mem_free += c.mem;
            chosen.push(cid);
            if cpu_free >= req.cpu_millis && mem_free >= req.memory_mb {
                break;
            }
        }
        if cpu_free >= req.cpu_millis && mem_free >= req.memory_mb {
            for cid in chosen {
                tracing::debug!(container = %cid, "stopping an idle container to make room");
                stop_container(st, &cid, true);
            }
            return;
        }
    }
}

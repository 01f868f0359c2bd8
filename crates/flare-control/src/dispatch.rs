//! Dispatch: queued inputs go to ready containers of the function's current version with
//! free slots (`max_inputs` per container), never to a draining worker's containers.

use flare_proto::{InputMsg, ToWorker};

use crate::state::{CState, State};

/// Hands a function's queued inputs to its containers with free slots.
pub(crate) fn dispatch(st: &mut State, fid: &str) {
    let Some(f) = st.functions.get_mut(fid) else { return };
    if f.web_waiting > 0 {
        // Web requests waiting for a slot look again (crate::services::ingress).
        f.web_wake.send_modify(|v| *v += 1);
    }
    if !f.active || f.queue.is_empty() {
        return;
    }
    let max_inputs = f.def.config.max_inputs.max(1) as usize;
    let timeout_ms = f.def.config.timeout * 1000;
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
        let Some(w) = st.workers.iter().find(|w| w.link.id == c.worker_id) else { continue };
        if w.draining {
            continue;
        }
        let free = max_inputs.saturating_sub(c.load());
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
        let _ = w.link.tx.send(ToWorker::Inputs { container_id: c.id.clone(), inputs: batch });
    }
}

/// Dispatch, then autoscale: what every change to a function's demand or capacity runs.
pub(crate) fn schedule(st: &mut State, fid: &str) {
    st.dirty.remove(fid);
    dispatch(st, fid);
    crate::autoscale::autoscale(st, fid);
}

/// Schedules the functions marked dirty and those waiting for capacity (see
/// [`State::mark_dirty`]): what runs after capacity or many functions changed, instead
/// of scheduling every function.
pub(crate) fn schedule_dirty(st: &mut State) {
    let mut fids = std::mem::take(&mut st.dirty);
    fids.extend(st.functions.values().filter(|f| f.waiting.is_some()).map(|f| f.id.clone()));
    for fid in fids {
        schedule(st, &fid);
    }
}

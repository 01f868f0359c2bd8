//! Worker sessions: registration, heartbeats, fencing of stale sessions, loss.

use std::time::Instant;

use flare_proto::{FromWorker, ToWorker};
use tokio::sync::watch;

use crate::calls::{finish_input, platform_output};
use crate::dispatch::schedule_dirty;
use crate::events::requeue_front;
use crate::state::{CState, Capacity, ContainerEvent, State, WorkerRt};
use crate::{now_ts, ControlPlane, WorkerLink};

impl ControlPlane {
    /// Adds a worker; it receives containers from now on. A worker that registers again
    /// (a new session) first loses everything of its old session: those containers are
    /// fenced off (their late events are ignored) and their inputs run again elsewhere.
    pub fn add_worker(&self, link: WorkerLink) {
        let mut st = self.lock();
        let st = &mut *st;
        if st.workers.iter().any(|w| w.link.id == link.id) {
            self.worker_lost_locked(st, &link.id, "it registered again (new session)");
        }
        tracing::info!(
            worker = %link.id, session = %link.session, cpu_millis = link.cpu_millis,
            memory_mb = link.memory_mb, gpus = ?link.gpus, "worker registered"
        );
        st.ledger.open(
            &link.id,
            Capacity { cpu_millis: link.cpu_millis, memory_mb: link.memory_mb, gpus: link.gpus.clone() },
        );
        st.workers.push(WorkerRt {
            link,
            accepting: true,
            draining: false,
            images: Default::default(),
            last_seen: Instant::now(),
            joined_at: now_ts(),
        });
        // New capacity: what waits for a worker may fit now.
        schedule_dirty(st);
    }

    /// A heartbeat of a worker's session; `draining` stops new work from going there.
    pub fn worker_heartbeat(&self, worker_id: &str, session: &str, draining: bool) -> bool {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(w) = st.workers.iter_mut().find(|w| w.link.id == worker_id && w.link.session == session)
        else {
            return false;
        };
        w.last_seen = Instant::now();
        if draining && !w.draining {
            tracing::info!(worker = %worker_id, "worker draining: no new containers or inputs");
            w.draining = true;
            w.accepting = false;
            let idle: Vec<String> = st
                .containers
                .values()
                .filter(|c| c.worker_id == worker_id && c.is_idle())
                .map(|c| c.id.clone())
                .collect();
            for cid in idle {
                stop_container(st, &cid, true);
            }
            // Functions with containers there get theirs elsewhere.
            st.dirty.extend(
                st.containers.values().filter(|c| c.worker_id == worker_id).map(|c| c.function_id.clone()),
            );
            schedule_dirty(st);
        }
        true
    }

    /// An event from a worker's session; dropped if that session is no longer current or
    /// the container is not (or no longer) that worker's.
    pub fn worker_event(&self, worker_id: &str, session: &str, ev: FromWorker) {
        {
            let mut st = self.lock();
            let Some(w) = st.workers.iter_mut().find(|w| w.link.id == worker_id) else { return };
            if w.link.session != session {
                return;
            }
            w.last_seen = Instant::now();
            let cid = match &ev {
                FromWorker::Ready { container_id }
                | FromWorker::InitFailed { container_id, .. }
                | FromWorker::Outputs { container_id, .. }
                | FromWorker::Log { container_id, .. }
                | FromWorker::Exited { container_id, .. } => container_id,
            };
            if st.containers.get(cid).is_some_and(|c| c.worker_id != worker_id) {
                return;
            }
        }
        self.on_worker_event(ev);
    }

    /// A worker's session ended or timed out: its containers are gone; inputs they were
    /// running go back to the front of their queues without using the user's retries.
    pub fn worker_disconnected(&self, worker_id: &str, session: &str, why: &str) {
        let mut st = self.lock();
        let st = &mut *st;
        if st.workers.iter().any(|w| w.link.id == worker_id && w.link.session == session) {
            self.worker_lost_locked(st, worker_id, why);
        }
    }

    pub(crate) fn worker_lost_locked(&self, st: &mut State, worker_id: &str, why: &str) {
        let Some(pos) = st.workers.iter().position(|w| w.link.id == worker_id) else { return };
        let w = st.workers.remove(pos);
        st.ledger.close(worker_id);
        let cids: Vec<String> =
            st.containers.values().filter(|c| c.worker_id == worker_id).map(|c| c.id.clone()).collect();
        tracing::warn!(worker = %worker_id, containers = cids.len(), %why, "worker lost");
        for cid in cids {
            let Some(c) = st.containers.remove(&cid) else { continue };
            st.lifecycle.emit(ContainerEvent::Exited { container_id: cid.clone(), at: now_ts() });
            st.mark_dirty(&c.function_id);
            if let Some(f) = st.functions.get_mut(&c.function_id) {
                f.containers.remove(&cid);
            }
            for (input_id, qi) in c.inflight {
                if c.cancelled.contains(&input_id) {
                    continue;
                }
                match crate::faults::lost_input_fate(qi.platform_retries, worker_id, why) {
                    crate::faults::InputFate::Rerun => requeue_front(st, &c.function_id, qi),
                    crate::faults::InputFate::Fail(status, exc) => {
                        let out = platform_output(&qi, status, exc);
                        finish_input(st, self.persist(), &qi, out);
                    }
                }
            }
        }
        drop(w);
        self.inner.containers_changed.send_modify(|v| *v += 1);
        schedule_dirty(st);
    }

    /// Ends every remote worker's session (control-plane shutdown): their streams close,
    /// so the HTTP server can finish, and the workers reconnect to the next instance.
    pub fn disconnect_remote_workers(&self, why: &str) {
        let mut st = self.lock();
        let st = &mut *st;
        let remote: Vec<String> =
            st.workers.iter().filter(|w| w.link.remote).map(|w| w.link.id.clone()).collect();
        for id in remote {
            self.worker_lost_locked(st, &id, why);
        }
    }

    /// Workers as the API shows them.
    pub fn list_workers(&self) -> Vec<flare_api::WorkerInfo> {
        let st = self.lock();
        st.workers
            .iter()
            .map(|w| (w, st.ledger.used(&w.link.id)))
            .map(|(w, used)| flare_api::WorkerInfo {
                worker_id: w.link.id.clone(),
                address: w.link.address.clone(),
                state: if w.draining { "draining".into() } else { "ready".into() },
                cpu_millis: w.link.cpu_millis,
                cpu_millis_used: used.cpu_millis,
                memory_mb: w.link.memory_mb,
                memory_mb_used: used.memory_mb,
                gpus: w.link.gpus.clone(),
                gpus_used: used.gpus,
                containers: st.containers.values().filter(|c| c.worker_id == w.link.id).count() as u32,
                joined_at: w.joined_at,
            })
            .collect()
    }

    /// Container lifecycle events from now on (started with its resources, ready,
    /// stopping, exited), in the order of the state's changes.
    pub fn subscribe_lifecycle(&self) -> tokio::sync::broadcast::Receiver<ContainerEvent> {
        self.lock().lifecycle.subscribe()
    }

    /// Stops every container (server shutdown).
    pub fn shutdown(&self) {
        let mut st = self.lock();
        let ids: Vec<String> = st.containers.keys().cloned().collect();
        for id in ids {
            stop_container(&mut st, &id, false);
        }
    }

    pub fn live_containers(&self) -> usize {
        self.lock().containers.len()
    }

    pub fn subscribe_containers(&self) -> watch::Receiver<u64> {
        self.inner.containers_changed.subscribe()
    }
}

pub(crate) fn stop_container(st: &mut State, cid: &str, graceful: bool) {
    let Some(c) = st.containers.get_mut(cid) else { return };
    if c.state == CState::Stopping && graceful {
        return;
    }
    if c.state != CState::Stopping {
        st.lifecycle.emit(ContainerEvent::Stopping { container_id: cid.to_string(), at: now_ts() });
    }
    c.state = CState::Stopping;
    if let Some(w) = st.workers.iter().find(|w| w.link.id == c.worker_id) {
        let _ = w.link.tx.send(ToWorker::Stop { container_id: cid.to_string(), graceful });
    }
}

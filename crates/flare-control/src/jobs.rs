//! Periodic jobs: each a named function with its own period (see [`JOBS`]), instead of one
//! tick doing everything; and the store's own jobs (expiry of spawned calls and of logs).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flare_api::AppMode;
use flare_proto::LogStream;
use flare_store::Store;

use crate::dispatch::schedule_dirty;
use crate::logs::{push_log, retention_note};
use crate::state::{AppState, CState, State};
use crate::workers::stop_container;
use crate::{now_ts, retention, ControlConfig, ControlPlane, WORKER_TIMEOUT};

/// An ephemeral app with no heartbeat for this long is stopped.
pub(crate) const EPHEMERAL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often calls, stopped apps and their functions are checked for leaving memory.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Outputs freed since the last heap trim that make the next sweep trim the heap.
pub(crate) const TRIM_AFTER_OUTPUTS: u64 = 50_000;
/// How often spawned calls past their retention are deleted from the store.
pub(crate) const CALL_EXPIRY_EVERY: Duration = Duration::from_secs(600);
/// A stopped app's in-memory logs are dropped this long after its last container exited
/// (they stay in the store).
pub(crate) const STOPPED_APP_LOG_KEEP: Duration = Duration::from_secs(60);
/// How often old logs are deleted from the store.
pub(crate) const LOG_EXPIRY_EVERY: Duration = Duration::from_secs(60);

/// A named periodic job over the state: each runs on its own period, under the state lock
/// for one short section.
pub(crate) struct Job {
    pub(crate) name: &'static str,
    pub(crate) every: Duration,
    pub(crate) run: fn(&ControlPlane, &mut State, Instant),
}

/// The jobs over the state, in the order [`ControlPlane::tick`] runs them. Store-only jobs
/// (call and log expiry, log size) run on the store's side: see [`spawn`].
pub(crate) const JOBS: &[Job] = &[
    Job { name: "retries_due", every: Duration::from_millis(100), run: retries_due },
    Job { name: "scale_down", every: Duration::from_millis(100), run: scale_down },
    Job { name: "worker_heartbeats", every: Duration::from_millis(100), run: worker_heartbeats },
    Job { name: "drain_idle", every: Duration::from_millis(100), run: drain_idle },
    Job { name: "app_heartbeats", every: Duration::from_secs(1), run: app_heartbeats },
    Job { name: "dropped_log_notes", every: Duration::from_millis(100), run: dropped_log_notes },
    Job { name: "sweep", every: SWEEP_EVERY, run: sweep },
    Job { name: "reschedule", every: Duration::from_millis(100), run: reschedule },
];

/// Starts every job: one task each for the state jobs, and the store's own jobs.
pub(crate) fn spawn(cp: &ControlPlane, config: &ControlConfig) {
    for job in JOBS {
        let cp = cp.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(job.every);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                iv.tick().await;
                let started = Instant::now();
                let mut st = cp.lock();
                (job.run)(&cp, &mut st, Instant::now());
                drop(st);
                let took = started.elapsed();
                if took > SLOW_JOB {
                    tracing::warn!(job = job.name, ms = took.as_millis() as u64, "slow periodic job");
                }
            }
        });
    }
    tokio::spawn(call_expiry(cp.inner.store.clone(), config.call_retention));
    tokio::spawn(log_expiry(cp.inner.store.clone(), config.clone()));
}

/// A state job that takes longer than this (the lock held, or waited for) is logged.
const SLOW_JOB: Duration = Duration::from_millis(100);

impl ControlPlane {
    /// Runs every state job once, now (what the periodic tasks do, on demand).
    #[cfg(test)]
    pub(crate) fn tick(&self) {
        let mut st = self.lock();
        let now = Instant::now();
        for job in JOBS {
            tracing::trace!(job = job.name, "running job");
            (job.run)(self, &mut st, now);
        }
    }

    /// Drops what is no longer live: calls (see [`retention::call_evictable`]), functions
    /// of stopped apps without containers, and stopped apps whose containers are gone (their
    /// logs are in the store). True if the heap should be trimmed now.
    pub(crate) fn sweep(&self, st: &mut State, now: Instant) -> bool {
        let stopped: HashSet<String> =
            st.apps.values().filter(|a| a.app.stopped()).map(|a| a.app.app_id.clone()).collect();
        let app_stopped = |st: &State, fid: &str| {
            st.functions.get(fid).is_none_or(|f| !f.active && stopped.contains(&f.app_id))
        };
        let evict: Vec<String> = st
            .calls
            .values()
            .filter(|c| {
                retention::call_evictable(
                    &retention::CallFacts {
                        done: c.done(),
                        persisted: c.persisted,
                        delivered_at: c.delivered_at,
                        last_access: c.last_access,
                        app_stopped: app_stopped(st, &c.function_id),
                    },
                    now,
                )
            })
            .map(|c| c.id.clone())
            .collect();
        for id in evict {
            if let Some(c) = st.calls.remove(&id) {
                st.freed_outputs += c.outputs.kept() as u64;
                c.room.send_modify(|v| *v += 1);
            }
        }
        // Functions of stopped apps, once their containers exited.
        let gone_fns: Vec<String> = st
            .functions
            .values()
            .filter(|f| !f.active && stopped.contains(&f.app_id) && f.containers.is_empty())
            .map(|f| f.id.clone())
            .collect();
        for fid in &gone_fns {
            st.functions.remove(fid);
        }
        // Stopped apps: their record and log ring, once the tail of the logs is stored.
        let busy: HashSet<&str> = st.containers.values().map(|c| c.app_id.as_str()).collect();
        let mut gone_apps = Vec::new();
        for a in st.apps.values_mut().filter(|a| a.app.stopped()) {
            if busy.contains(a.app.app_id.as_str()) {
                a.stopped_idle_since = None;
                continue;
            }
            let since = *a.stopped_idle_since.get_or_insert(now);
            let functions_left =
                a.functions.values().any(|fid| !gone_fns.contains(fid) && st.functions.contains_key(fid));
            if !functions_left && retention::stopped_app_evictable(0, since, STOPPED_APP_LOG_KEEP, now) {
                gone_apps.push(a.app.app_id.clone());
            }
        }
        let app_gone = !gone_apps.is_empty() || !gone_fns.is_empty();
        for id in gone_apps {
            if let Some(a) = st.apps.remove(&id) {
                tracing::debug!(app = %id, logs = a.logs.len(), "stopped app left memory");
            }
        }
        if st.freed_outputs >= TRIM_AFTER_OUTPUTS || app_gone && st.freed_outputs > 0 {
            st.freed_outputs = 0;
            return true;
        }
        false
    }

    // ----- operations used by the API -----
}

/// Deletes spawned calls (and their results) that finished more than `retention` ago.
pub(crate) async fn call_expiry(store: Arc<dyn Store>, retention: Duration) {
    let mut iv = tokio::time::interval(CALL_EXPIRY_EVERY);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        iv.tick().await;
        let store = store.clone();
        let res =
            tokio::task::spawn_blocking(move || store.expire_calls(now_ts() - retention.as_secs_f64())).await;
        match res {
            Ok(Ok(n)) if n > 0 => tracing::info!(calls = n, "deleted spawned calls past their retention"),
            Ok(Err(e)) => tracing::error!(error = %e, "could not delete expired calls"),
            _ => {}
        }
    }
}

/// Deletes stored logs older than [`ControlConfig::log_retention_age`], once a minute.
pub(crate) async fn log_expiry(store: Arc<dyn Store>, cfg: ControlConfig) {
    let mut iv = tokio::time::interval(LOG_EXPIRY_EVERY);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        iv.tick().await;
        let store = store.clone();
        let cfg = cfg.clone();
        let res = tokio::task::spawn_blocking(move || {
            let before = now_ts() - cfg.log_retention_age.as_secs_f64();
            store.expire_logs(before, &retention_note(&cfg))
        })
        .await;
        match res {
            Ok(Ok(apps)) if !apps.is_empty() => tracing::info!(apps = apps.len(), "deleted expired logs"),
            Ok(Err(e)) => tracing::error!(error = %e, "could not delete expired logs"),
            _ => {}
        }
    }
}

/// Delayed retries whose time has come go back to their queues.
fn retries_due(_: &ControlPlane, st: &mut State, now: Instant) {
    for f in st.functions.values_mut().filter(|f| f.delayed.iter().any(|(t, _)| *t <= now)) {
        let (due, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut f.delayed).into_iter().partition(|(t, _)| *t <= now);
        f.delayed = later;
        f.queue.extend(due.into_iter().map(|(_, qi)| qi));
        st.dirty.insert(f.id.clone());
    }
    schedule_dirty(st);
}

/// Idle containers past their function's `scaledown_window` stop, down to its
/// `min_containers` (all of them for a stopped app's functions).
fn scale_down(_: &ControlPlane, st: &mut State, now: Instant) {
    let mut stop = Vec::new();
    for f in st.functions.values() {
        let window = Duration::from_secs(f.def.config.scaledown_window);
        let live = f
            .containers
            .iter()
            .filter(|id| st.containers.get(*id).is_some_and(|c| c.state != CState::Stopping))
            .count();
        let min = f.def.config.min_containers as usize;
        let excess = if f.active { live.saturating_sub(min) } else { live };
        let idle = f.containers.iter().filter(|id| {
            st.containers.get(*id).is_some_and(|c| {
                c.state == CState::Ready && c.is_idle() && now.duration_since(c.idle_since) >= window
            })
        });
        let before = stop.len();
        stop.extend(idle.take(excess).cloned());
        if stop.len() > before {
            st.dirty.insert(f.id.clone());
        }
    }
    for cid in stop {
        stop_container(st, &cid, true);
    }
    schedule_dirty(st);
}

/// Remote workers that stopped heartbeating are gone (a cut-off network looks like this).
fn worker_heartbeats(cp: &ControlPlane, st: &mut State, now: Instant) {
    let silent: Vec<String> = st
        .workers
        .iter()
        .filter(|w| w.link.remote && now.duration_since(w.last_seen) > WORKER_TIMEOUT)
        .map(|w| w.link.id.clone())
        .collect();
    for wid in silent {
        cp.worker_lost_locked(st, &wid, &format!("no heartbeat for {} s", WORKER_TIMEOUT.as_secs()));
    }
}

/// Containers of draining workers stop as soon as they are idle.
fn drain_idle(_: &ControlPlane, st: &mut State, _: Instant) {
    let draining: HashSet<&str> =
        st.workers.iter().filter(|w| w.draining).map(|w| w.link.id.as_str()).collect();
    if draining.is_empty() {
        return;
    }
    let idle: Vec<String> = st
        .containers
        .values()
        .filter(|c| draining.contains(c.worker_id.as_str()) && c.is_idle() && c.state != CState::Stopping)
        .map(|c| c.id.clone())
        .collect();
    for cid in idle {
        stop_container(st, &cid, true);
    }
}

/// Ephemeral apps whose client went away (no heartbeat for [`EPHEMERAL_TIMEOUT`]) stop;
/// detached ones once their client is gone and no work of theirs is left.
fn app_heartbeats(cp: &ControlPlane, st: &mut State, now: Instant) {
    let dead: Vec<(String, &'static str)> = st
        .apps
        .values()
        .filter(|a| a.app.mode == AppMode::Ephemeral)
        .filter_map(|a| {
            let client_gone = a.client_left || now.duration_since(a.last_heartbeat) > EPHEMERAL_TIMEOUT;
            let busy = a.app.state == AppState::Detached && app_has_work(st, &a.functions);
            ephemeral_app_ends(a.app.state, client_gone, busy).map(|why| (a.app.app_id.clone(), why))
        })
        .collect();
    for (app_id, why) in dead {
        tracing::info!(app = %app_id, "ephemeral app {why}; stopping it");
        cp.stop_app_locked(st, &app_id);
    }
}

/// Whether any function of an app has inputs queued, delayed or running, or web requests
/// waiting or being served, or a schedule (always more to do: a detached app with one runs
/// until it is stopped).
fn app_has_work(st: &State, functions: &std::collections::BTreeMap<String, String>) -> bool {
    functions.values().filter_map(|fid| st.functions.get(fid)).any(|f| {
        f.def.schedule.is_some()
            || !f.queue.is_empty()
            || !f.delayed.is_empty()
            || f.web_waiting > 0
            || f.containers.iter().filter_map(|c| st.containers.get(c)).any(|c| !c.is_idle())
    })
}

/// Whether an ephemeral app ends now, and why: a running one when its client is gone, a
/// detached one when its client is gone and it has no work left.
pub(crate) fn ephemeral_app_ends(state: AppState, client_gone: bool, busy: bool) -> Option<&'static str> {
    match state {
        AppState::Running if client_gone => Some("lost its client"),
        AppState::Detached if client_gone && !busy => Some("is detached, its client gone and its work done"),
        _ => None,
    }
}

/// Notes about dropped output of containers that have been quiet for a second.
fn dropped_log_notes(cp: &ControlPlane, st: &mut State, now: Instant) {
    let cfg = st.config.clone();
    let notes: Vec<(String, String, String)> = st
        .containers
        .values_mut()
        .filter(|c| {
            c.logs.dropped_lines > 0 && now.duration_since(c.logs.last_drop) >= Duration::from_secs(1)
        })
        .filter_map(|c| c.logs.take_note(&cfg).map(|n| (c.app_id.clone(), c.id.clone(), n)))
        .collect();
    for (app_id, cid, note) in notes {
        push_log(st, &cp.inner.log_tx, &app_id, &cid, LogStream::System, &note);
    }
}

/// What is no longer live leaves memory ([`ControlPlane::sweep`]); then the heap is trimmed
/// if much was freed.
fn sweep(cp: &ControlPlane, st: &mut State, now: Instant) {
    if cp.sweep(st, now) {
        if let Some(trim) = cp.inner.heap_trim.get().copied() {
            // Outside the state lock; the allocator's own lock is held briefly.
            tokio::task::spawn_blocking(trim);
        }
    }
}

/// The safety net of dirty tracking: functions marked dirty, waiting for capacity, or with
/// a backlog are scheduled again.
fn reschedule(_: &ControlPlane, st: &mut State, _: Instant) {
    st.dirty.extend(st.functions.values().filter(|f| !f.queue.is_empty()).map(|f| f.id.clone()));
    schedule_dirty(st);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_apps_end_when_their_client_is_gone_and_detached_ones_when_idle_too() {
        assert!(ephemeral_app_ends(AppState::Running, false, true).is_none());
        assert!(ephemeral_app_ends(AppState::Running, true, true).is_some());
        assert!(ephemeral_app_ends(AppState::Detached, false, false).is_none());
        assert!(ephemeral_app_ends(AppState::Detached, true, true).is_none());
        assert!(ephemeral_app_ends(AppState::Detached, true, false).is_some());
        assert!(ephemeral_app_ends(AppState::Deployed, true, false).is_none());
        assert!(ephemeral_app_ends(AppState::Stopped, true, false).is_none());
    }
}

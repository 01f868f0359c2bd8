//! Periodic jobs.

use crate::*;

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

impl ControlPlane {
    /// Periodic work: delayed retries, heartbeats, scale-down, warm floors, call eviction.
    pub(crate) fn tick(&self) {
        let mut st = self.lock();
        let st = &mut *st;
        let now = Instant::now();
        let fids: Vec<String> = st.functions.keys().cloned().collect();
        for fid in &fids {
            let f = st.functions.get_mut(fid).expect("listed");
            if !f.delayed.is_empty() {
                let (due, later): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut f.delayed).into_iter().partition(|(t, _)| *t <= now);
                f.delayed = later;
                for (_, qi) in due {
                    f.queue.push_back(qi);
                }
            }
            // Scale down idle containers above the floor.
            let min = f.def.config.min_containers as usize;
            let window = Duration::from_secs(f.def.config.scaledown_window);
            let idle: Vec<String> = f
                .containers
                .iter()
                .filter(|id| {
                    st.containers.get(*id).is_some_and(|c| {
                        c.state == CState::Ready
                            && c.inflight.is_empty()
                            && now.duration_since(c.idle_since) >= window
                    })
                })
                .cloned()
                .collect();
            let live = f
                .containers
                .iter()
                .filter(|id| st.containers.get(*id).is_some_and(|c| c.state != CState::Stopping))
                .count();
            let excess = if f.active { live.saturating_sub(min) } else { live };
            for id in idle.into_iter().take(excess) {
                stop_container(st, &id, true);
            }
            schedule(st, fid);
        }
        // Remote workers that stopped heartbeating are gone (a cut-off network looks like this).
        let silent: Vec<String> = st
            .workers
            .iter()
            .filter(|w| w.link.remote && now.duration_since(w.last_seen) > WORKER_TIMEOUT)
            .map(|w| w.link.id.clone())
            .collect();
        for wid in silent {
            self.worker_lost_locked(st, &wid, &format!("no heartbeat for {} s", WORKER_TIMEOUT.as_secs()));
        }
        // Draining workers: containers stop as soon as they are idle.
        let draining: Vec<String> =
            st.workers.iter().filter(|w| w.draining).map(|w| w.link.id.clone()).collect();
        if !draining.is_empty() {
            let idle: Vec<String> = st
                .containers
                .values()
                .filter(|c| {
                    draining.contains(&c.worker_id) && c.inflight.is_empty() && c.state != CState::Stopping
                })
                .map(|c| c.id.clone())
                .collect();
            for cid in idle {
                stop_container(st, &cid, true);
            }
        }
        // Ephemeral apps whose client went away.
        let dead: Vec<String> = st
            .apps
            .values()
            .filter(|a| {
                a.app.mode == AppMode::Ephemeral
                    && a.app.state == AppState::Running
                    && now.duration_since(a.last_heartbeat) > EPHEMERAL_TIMEOUT
            })
            .map(|a| a.app.app_id.clone())
            .collect();
        for app_id in dead {
            tracing::info!(app = %app_id, "ephemeral app lost its client; stopping it");
            self.stop_app_locked(st, &app_id);
        }
        // Notes about dropped output of containers that have been quiet for a second.
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
            push_log(st, &self.inner.log_tx, &app_id, &cid, LogStream::System, &note);
        }
        if st.last_sweep.is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY) {
            st.last_sweep = Some(now);
            if self.sweep(st, now) {
                if let Some(trim) = self.inner.heap_trim.get().copied() {
                    // Outside the state lock; the allocator's own lock is held briefly.
                    tokio::task::spawn_blocking(trim);
                }
            }
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

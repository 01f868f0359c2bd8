//! Leases of ephemeral objects (`Dict.ephemeral()`, `Queue.ephemeral()`, `Volume.ephemeral()`): the client that
//! made one heartbeats it (every [`HEARTBEAT_EVERY`]) while its `with` block runs and
//! deletes it at the end. One whose client died without deleting it goes once it has had
//! no heartbeat for [`TTL`] (`flared server --ephemeral-ttl-secs`): [`spawn_sweeper`] looks
//! every [`SWEEP_EVERY`] (or half the TTL, if shorter).
//!
//! Leases live in memory only. After a restart every ephemeral object in the store starts
//! a fresh lease the first time the sweeper sees it, so a client that is still there keeps
//! its object by heartbeating on, and an orphan goes [`TTL`] after the restart.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ControlPlane;

/// How long an ephemeral object lives without a heartbeat, by default.
pub const TTL: Duration = Duration::from_secs(300);
/// How often clients heartbeat (the SDK's interval; documented in PROTOCOL.md).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(30);
/// How often the sweeper looks for expired leases.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Last heartbeat of each ephemeral object, by id.
#[derive(Default)]
pub struct Leases(Mutex<HashMap<String, Instant>>);

impl Leases {
    /// A heartbeat (or the object's creation).
    pub fn touch(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), Instant::now());
    }

    /// The object is gone.
    pub fn forget(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    /// Of the ephemeral objects that exist (`live`), those whose lease ran out at `now`.
    pub fn expired(&self, live: &[String], now: Instant, ttl: Duration) -> Vec<String> {
        sweep(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()), live, now, ttl)
    }
}

/// Leases of objects no longer `live` are dropped, objects seen for the first time get a
/// lease from `now`, and the ids whose last heartbeat is more than `ttl` old are answered.
fn sweep(leases: &mut HashMap<String, Instant>, live: &[String], now: Instant, ttl: Duration) -> Vec<String> {
    let live_set: std::collections::HashSet<&str> = live.iter().map(|s| s.as_str()).collect();
    leases.retain(|id, _| live_set.contains(id.as_str()));
    let mut out = Vec::new();
    for id in live {
        let last = *leases.entry(id.clone()).or_insert(now);
        if now.saturating_duration_since(last) > ttl {
            out.push(id.clone());
        }
    }
    out
}

/// Deletes ephemeral objects whose client went away.
pub(crate) fn spawn_sweeper(cp: &ControlPlane, ttl: Duration) {
    let cp = cp.clone();
    let every = SWEEP_EVERY.min(ttl / 2).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(every);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            iv.tick().await;
            if let Err(e) = sweep_once(&cp, ttl).await {
                tracing::warn!(error = %e.message, "sweeping ephemeral objects");
            }
        }
    });
}

async fn sweep_once(cp: &ControlPlane, ttl: Duration) -> Result<(), flare_api::ApiError> {
    let store = cp.inner.store.clone();
    let dicts: Vec<String> = tokio::task::spawn_blocking(move || store.list_dicts())
        .await
        .map_err(|e| flare_api::ApiError::internal(format!("store read: {e}")))?
        .map_err(crate::store_err)?
        .into_iter()
        .filter(|(d, _)| d.ephemeral)
        .map(|(d, _)| d.dict_id)
        .collect();
    let store = cp.inner.store.clone();
    let queues: Vec<String> = tokio::task::spawn_blocking(move || store.list_queues(crate::now_ts()))
        .await
        .map_err(|e| flare_api::ApiError::internal(format!("store read: {e}")))?
        .map_err(crate::store_err)?
        .into_iter()
        .filter(|(q, _)| q.ephemeral)
        .map(|(q, _)| q.queue_id)
        .collect();
    let store = cp.inner.store.clone();
    let volumes: Vec<String> = tokio::task::spawn_blocking(move || store.list_volumes())
        .await
        .map_err(|e| flare_api::ApiError::internal(format!("store read: {e}")))?
        .map_err(crate::store_err)?
        .into_iter()
        .filter(|v| v.ephemeral)
        .map(|v| v.volume_id)
        .collect();
    // One lease table for every kind (ids are unique across them: `di-…`, `qu-…`, `vo-…`).
    let live: Vec<String> = dicts.iter().chain(&queues).chain(&volumes).cloned().collect();
    for id in cp.leases().expired(&live, Instant::now(), ttl) {
        if dicts.contains(&id) {
            super::dicts::delete_orphan(cp, &id).await?;
        } else if queues.contains(&id) {
            super::queues::delete_orphan(cp, &id).await?;
        } else {
            super::volumes::delete_orphan(cp, &id).await?;
        }
        cp.leases().forget(&id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_expire_without_heartbeats_and_start_fresh_when_first_seen() {
        let mut m = HashMap::new();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let live = vec!["a".to_string(), "b".to_string()];
        // First seen (a restart): fresh leases, nothing expires.
        assert!(sweep(&mut m, &live, t0, ttl).is_empty());
        // `a` heartbeats, `b` does not.
        m.insert("a".into(), t0 + Duration::from_secs(8));
        assert_eq!(sweep(&mut m, &live, t0 + Duration::from_secs(11), ttl), vec!["b".to_string()]);
        // Objects no longer live lose their lease; new ones start one.
        let live = vec!["a".to_string(), "c".to_string()];
        assert!(sweep(&mut m, &live, t0 + Duration::from_secs(12), ttl).is_empty());
        assert!(!m.contains_key("b") && m.contains_key("c"));
        assert_eq!(sweep(&mut m, &live, t0 + Duration::from_secs(30), ttl), live);
    }
}

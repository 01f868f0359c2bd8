//! Leases of ephemeral objects (`Dict.ephemeral()`, `Queue.ephemeral()`, `Volume.ephemeral()`): the client that
//! made one heartbeats it (every [`HEARTBEAT_EVERY`]) while its `with` block runs and
//! deletes it at the end. One whose client died without deleting it goes once it has had
//! no heartbeat for [`TTL`] (`flared server --ephemeral-ttl-secs`): [`spawn_sweeper`] looks
//! every [`SWEEP_EVERY`] (or half the TTL, if shorter).
//!
//! Leases live in memory only: an ephemeral object gets one when it is made, a heartbeat
//! renews it, a delete drops it. At start the sweeper gives every ephemeral object in the
//! store a fresh lease (one read of the store), so a client that is still there keeps its
//! object by heartbeating on, and an orphan goes [`TTL`] after the restart; afterwards
//! the sweeps look at the leases only.

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

/// What an ephemeral object is (which service deletes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dict,
    Queue,
    Volume,
}

/// Each ephemeral object's kind and last heartbeat, by id.
#[derive(Default)]
pub struct Leases(Mutex<HashMap<String, (Kind, Instant)>>);

impl Leases {
    /// A heartbeat (or the object's creation).
    pub fn touch(&self, kind: Kind, id: &str) {
        self.map().insert(id.to_string(), (kind, Instant::now()));
    }

    /// The object is gone.
    pub fn forget(&self, id: &str) {
        self.map().remove(id);
    }

    /// Objects found in the store at start: a lease from now unless they have one already.
    fn adopt(&self, kind: Kind, ids: Vec<String>, now: Instant) {
        let mut m = self.map();
        for id in ids {
            m.entry(id).or_insert((kind, now));
        }
    }

    /// The objects whose lease ran out at `now`.
    fn expired(&self, now: Instant, ttl: Duration) -> Vec<(Kind, String)> {
        expired(&self.map(), now, ttl)
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Kind, Instant)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The leases whose last heartbeat is more than `ttl` before `now`.
fn expired(leases: &HashMap<String, (Kind, Instant)>, now: Instant, ttl: Duration) -> Vec<(Kind, String)> {
    leases
        .iter()
        .filter(|(_, (_, last))| now.saturating_duration_since(*last) > ttl)
        .map(|(id, (kind, _))| (*kind, id.clone()))
        .collect()
}

/// Gives the ephemeral objects in the store their leases, then deletes those whose client
/// went away.
pub(crate) fn spawn_sweeper(cp: &ControlPlane, ttl: Duration) {
    let cp = cp.clone();
    let every = SWEEP_EVERY.min(ttl / 2).max(Duration::from_millis(100));
    tokio::spawn(async move {
        if let Err(e) = adopt_stored(&cp).await {
            tracing::warn!(error = %e.message, "reading the ephemeral objects of the store");
        }
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

async fn adopt_stored(cp: &ControlPlane) -> Result<(), flare_api::ApiError> {
    let (dicts, queues, volumes) = super::named::read(cp, |s| {
        let dicts =
            s.list_dicts()?.into_iter().filter(|(d, _)| d.ephemeral).map(|(d, _)| d.dict_id).collect();
        let queues = s
            .list_queues(crate::now_ts())?
            .into_iter()
            .filter(|(q, _)| q.ephemeral)
            .map(|(q, _)| q.queue_id)
            .collect();
        let volumes = s.list_volumes()?.into_iter().filter(|v| v.ephemeral).map(|v| v.volume_id).collect();
        Ok((dicts, queues, volumes))
    })
    .await?;
    let now = Instant::now();
    cp.leases().adopt(Kind::Dict, dicts, now);
    cp.leases().adopt(Kind::Queue, queues, now);
    cp.leases().adopt(Kind::Volume, volumes, now);
    Ok(())
}

async fn sweep_once(cp: &ControlPlane, ttl: Duration) -> Result<(), flare_api::ApiError> {
    for (kind, id) in cp.leases().expired(Instant::now(), ttl) {
        match kind {
            Kind::Dict => super::dicts::delete_orphan(cp, &id).await?,
            Kind::Queue => super::queues::delete_orphan(cp, &id).await?,
            Kind::Volume => super::volumes::delete_orphan(cp, &id).await?,
        }
        cp.leases().forget(&id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_expire_without_heartbeats_and_start_fresh_when_adopted() {
        let leases = Leases::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        // Found in the store at start (a restart): fresh leases, nothing expires.
        leases.adopt(Kind::Dict, vec!["a".into(), "b".into()], t0);
        assert!(leases.expired(t0, ttl).is_empty());
        // `a` heartbeats, `b` does not.
        leases.map().insert("a".into(), (Kind::Dict, t0 + Duration::from_secs(8)));
        assert_eq!(leases.expired(t0 + Duration::from_secs(11), ttl), vec![(Kind::Dict, "b".to_string())]);
        // A deleted object loses its lease; adopting keeps a lease that is already there.
        leases.forget("b");
        leases.adopt(Kind::Dict, vec!["a".into()], t0 + Duration::from_secs(12));
        assert!(leases.expired(t0 + Duration::from_secs(12), ttl).is_empty());
        assert_eq!(leases.expired(t0 + Duration::from_secs(30), ttl), vec![(Kind::Dict, "a".to_string())]);
    }
}

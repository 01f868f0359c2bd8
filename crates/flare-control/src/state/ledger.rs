//! The resource ledger: what each worker offers and what its containers hold.
//!
//! Every container's cpu, memory and GPUs are booked here when it is placed
//! ([`Ledger::reserve`]) and given back when it exits ([`Ledger::release`]); a lost
//! worker's account closes with everything on it. Placement reads the ledger through
//! [`Ledger::view`], so the scheduler and the books never disagree.

use std::collections::{BTreeMap, HashMap};

use flare_proto::GpuRequest;

use crate::scheduler::{self, WorkerView};

/// What one container holds on its worker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Reservation {
    pub(crate) cpu_millis: u64,
    pub(crate) memory_mb: u64,
    /// The GPUs granted (a concrete type), if any.
    pub(crate) gpu: Option<GpuRequest>,
}

impl Reservation {
    /// The reservation of a placed request: its cpu and memory, and the GPUs granted.
    pub(crate) fn of(req: &scheduler::Request, gpu: Option<GpuRequest>) -> Self {
        Reservation { cpu_millis: req.cpu_millis, memory_mb: req.memory_mb, gpu }
    }
}

/// What a worker offers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Capacity {
    pub(crate) cpu_millis: u64,
    pub(crate) memory_mb: u64,
    pub(crate) gpus: BTreeMap<String, u32>,
}

/// What is in use on a worker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) cpu_millis: u64,
    pub(crate) memory_mb: u64,
    pub(crate) gpus: BTreeMap<String, u32>,
}

impl Usage {
    fn add(&mut self, r: &Reservation) {
        self.cpu_millis += r.cpu_millis;
        self.memory_mb += r.memory_mb;
        if let Some(g) = &r.gpu {
            *self.gpus.entry(g.kind.clone()).or_insert(0) += g.count;
        }
    }

    /// Takes `r` away; never below zero (a mismatch is logged, not propagated).
    fn sub(&mut self, r: &Reservation) {
        let under = self.cpu_millis < r.cpu_millis
            || self.memory_mb < r.memory_mb
            || r.gpu.as_ref().is_some_and(|g| self.gpus.get(&g.kind).copied().unwrap_or(0) < g.count);
        if under {
            tracing::warn!(?r, used = ?self, "resource ledger: release of more than was reserved");
        }
        self.cpu_millis = self.cpu_millis.saturating_sub(r.cpu_millis);
        self.memory_mb = self.memory_mb.saturating_sub(r.memory_mb);
        if let Some(g) = &r.gpu {
            if let Some(n) = self.gpus.get_mut(&g.kind) {
                *n = n.saturating_sub(g.count);
                if *n == 0 {
                    self.gpus.remove(&g.kind);
                }
            }
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Account {
    capacity: Capacity,
    used: Usage,
}

/// The books of every worker's resources.
#[derive(Default)]
pub(crate) struct Ledger {
    accounts: HashMap<String, Account>,
}

impl Ledger {
    /// Opens (or reopens, empty) the account of a worker that joined.
    pub(crate) fn open(&mut self, worker_id: &str, capacity: Capacity) {
        self.accounts.insert(worker_id.to_string(), Account { capacity, used: Usage::default() });
    }

    /// Closes a lost worker's account: what its containers held goes with it.
    pub(crate) fn close(&mut self, worker_id: &str) {
        self.accounts.remove(worker_id);
    }

    /// Books a placed container on `worker_id`. False if the worker has no account.
    pub(crate) fn reserve(&mut self, worker_id: &str, r: &Reservation) -> bool {
        match self.accounts.get_mut(worker_id) {
            Some(a) => {
                a.used.add(r);
                true
            }
            None => false,
        }
    }

    /// Gives back what a container held (it exited or was stopped for good).
    pub(crate) fn release(&mut self, worker_id: &str, r: &Reservation) {
        if let Some(a) = self.accounts.get_mut(worker_id) {
            a.used.sub(r);
        }
    }

    /// What is in use on a worker (zero for an unknown one).
    pub(crate) fn used(&self, worker_id: &str) -> Usage {
        self.accounts.get(worker_id).map(|a| a.used.clone()).unwrap_or_default()
    }

    /// The scheduler's view of a worker's resources (the other fields are left for the
    /// caller: images, containers of the function, accepting).
    pub(crate) fn view(&self, worker_id: &str) -> WorkerView {
        let a = self.accounts.get(worker_id).cloned().unwrap_or_default();
        WorkerView {
            id: worker_id.to_string(),
            cpu_millis_total: a.capacity.cpu_millis,
            cpu_millis_used: a.used.cpu_millis,
            memory_mb_total: a.capacity.memory_mb,
            memory_mb_used: a.used.memory_mb,
            gpus_total: a.capacity.gpus,
            gpus_used: a.used.gpus,
            ..WorkerView::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(kind: &str, count: u32) -> Option<GpuRequest> {
        Some(GpuRequest { kind: kind.into(), count })
    }

    fn ledger() -> Ledger {
        let mut l = Ledger::default();
        l.open(
            "w",
            Capacity { cpu_millis: 4000, memory_mb: 8192, gpus: BTreeMap::from([("H100".to_string(), 2)]) },
        );
        l
    }

    #[test]
    fn reserve_and_release_are_symmetric_gpus_included() {
        let mut l = ledger();
        let a = Reservation { cpu_millis: 500, memory_mb: 1024, gpu: gpu("H100", 2) };
        let b = Reservation { cpu_millis: 125, memory_mb: 128, gpu: None };
        assert!(l.reserve("w", &a));
        assert!(l.reserve("w", &b));
        let u = l.used("w");
        assert_eq!((u.cpu_millis, u.memory_mb, u.gpus.get("H100").copied()), (625, 1152, Some(2)));
        let v = l.view("w");
        assert_eq!(v.gpus_free("H100"), 0);
        l.release("w", &a);
        assert_eq!(l.view("w").gpus_free("H100"), 2, "the GPUs come back with the container");
        l.release("w", &b);
        assert_eq!(l.used("w"), Usage::default());
    }

    #[test]
    fn release_never_underflows() {
        let mut l = ledger();
        let r = Reservation { cpu_millis: 100, memory_mb: 100, gpu: gpu("H100", 1) };
        l.release("w", &r);
        assert_eq!(l.used("w"), Usage::default());
        l.reserve("w", &r);
        l.release("w", &r);
        l.release("w", &r);
        assert_eq!(l.used("w"), Usage::default());
    }

    #[test]
    fn unknown_and_closed_workers_hold_nothing() {
        let mut l = ledger();
        let r = Reservation { cpu_millis: 100, memory_mb: 100, gpu: None };
        assert!(!l.reserve("other", &r));
        assert!(l.reserve("w", &r));
        l.close("w");
        assert_eq!(l.used("w"), Usage::default());
        assert!(!l.reserve("w", &r));
        // A worker that joins again starts with an empty account.
        l.open("w", Capacity { cpu_millis: 1000, memory_mb: 1000, gpus: BTreeMap::new() });
        assert_eq!(l.used("w"), Usage::default());
    }

    /// The scheduler's `WorkerView::reserve`/`release` and the ledger agree: booking a
    /// placement on the view is what the ledger's next view shows.
    #[test]
    fn views_follow_the_books() {
        let mut l = ledger();
        let req = scheduler::Request {
            cpu_millis: 1000,
            memory_mb: 2048,
            gpu: vec![GpuRequest { kind: "H100".into(), count: 1 }],
            image: None,
        };
        let mut views = vec![WorkerView { accepting: true, ..l.view("w") }];
        let p = scheduler::place(&views, &req).expect("fits");
        views[p.worker].reserve(&req, p.gpu.as_ref());
        l.reserve("w", &Reservation::of(&req, p.gpu.clone()));
        let booked = l.view("w");
        assert_eq!(booked.cpu_millis_used, views[0].cpu_millis_used);
        assert_eq!(booked.memory_mb_used, views[0].memory_mb_used);
        assert_eq!(booked.gpus_used, views[0].gpus_used);
    }
}

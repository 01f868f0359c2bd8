//! Write-behind persistence with group commit, off the state lock.
//!
//! State changes enqueue their store writes ([`Persist::write`]) while they hold the state
//! lock — a channel send, so the queue's order is the order of the changes. One thread owns
//! the store's writes: it takes everything queued, applies it in one transaction
//! ([`flare_store::Store::write_batch`]), and starts over; writes that arrive during a
//! commit go into the next one (group commit).
//!
//! An API call that must be durable before it answers (an app created or deployed, functions
//! registered, a spawned call's inputs) takes a [`Ticket`] after its writes and waits for it
//! after releasing the lock; the ticket resolves once the transaction holding those writes
//! (and everything queued before them) committed. Other writes (outputs, a call marked done)
//! are not waited for: on a crash the last few are lost, and the inputs they finished run
//! again at restart (outputs are idempotent per input).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};

use flare_api::ApiError;
use flare_store::{Store, Write};

/// Most writes in one transaction.
const MAX_BATCH: usize = 4096;

enum Msg {
    Write(Write),
    /// Resolves once everything queued before it is committed.
    Barrier(Barrier),
}

/// A ticket's slot on the writer's side: resolved after the commit, or with an error if it
/// is dropped first (the writer stopped), so that no waiter waits forever.
struct Barrier(Arc<Slot>);

impl Drop for Barrier {
    fn drop(&mut self) {
        if self.0.get().is_none() {
            self.0.resolve(Err("the store writer stopped".into()));
        }
    }
}

/// Where the writer puts a ticket's result.
#[derive(Default)]
struct Slot {
    result: Mutex<Option<Result<(), String>>>,
    cv: Condvar,
    notify: tokio::sync::Notify,
}

impl Slot {
    fn resolve(&self, r: Result<(), String>) {
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        self.cv.notify_all();
        // Stores a permit if nobody waits yet, so a later `wait` sees it.
        self.notify.notify_one();
    }

    fn get(&self) -> Option<Result<(), String>> {
        self.result.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A promise that the writes queued before it are committed.
#[must_use = "a ticket is how a durable write is waited for"]
pub(crate) struct Ticket(Arc<Slot>);

impl Ticket {
    fn result(r: Result<(), String>) -> Result<(), ApiError> {
        r.map_err(|e| ApiError::internal(format!("state store failure: {e}")))
    }

    /// Waits for the commit, blocking this thread (for the synchronous API).
    pub(crate) fn wait_blocking(self) -> Result<(), ApiError> {
        let mut g = self.0.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g.clone() {
                return Self::result(r);
            }
            g = self.0.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits for the commit.
    pub(crate) async fn wait(self) -> Result<(), ApiError> {
        loop {
            let notified = self.0.notify.notified();
            if let Some(r) = self.0.get() {
                return Self::result(r);
            }
            notified.await;
        }
    }
}

/// Counts of the writer's work (tests and logs).
#[derive(Default)]
pub(crate) struct PersistStats {
    pub(crate) batches: AtomicU64,
    pub(crate) writes: AtomicU64,
}

/// The queue of store writes and the thread that commits them.
pub(crate) struct Persist {
    tx: mpsc::Sender<Msg>,
    stats: Arc<PersistStats>,
}

impl Persist {
    /// Starts the writer thread over `store`.
    pub(crate) fn start(store: Arc<dyn Store>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(PersistStats::default());
        let s = stats.clone();
        std::thread::Builder::new().name("flare-persist".into()).spawn(move || writer(&*store, &rx, &s))?;
        Ok(Persist { tx, stats })
    }

    fn send(&self, m: Msg) {
        // A barrier sent to a writer that is gone is dropped here, which resolves it.
        if self.tx.send(m).is_err() {
            tracing::error!("the store writer is gone; a write is lost");
        }
    }

    /// Queues a write (not waited for).
    pub(crate) fn write(&self, w: Write) {
        self.send(Msg::Write(w));
    }

    /// A ticket that resolves once everything queued so far is committed.
    pub(crate) fn ticket(&self) -> Ticket {
        let slot = Arc::new(Slot::default());
        self.send(Msg::Barrier(Barrier(slot.clone())));
        Ticket(slot)
    }

    pub(crate) fn stats(&self) -> &PersistStats {
        &self.stats
    }
}

fn writer(store: &dyn Store, rx: &mpsc::Receiver<Msg>, stats: &PersistStats) {
    let mut writes = Vec::new();
    let mut barriers: Vec<Barrier> = Vec::new();
    // A write lost since the last ticket resolved: the next tickets report it.
    let mut lost: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Msg::Write(w) => writes.push(w),
                Msg::Barrier(b) => barriers.push(b),
            }
            if writes.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if let Err(e) = commit(store, &writes, stats) {
            lost.get_or_insert(e);
        }
        writes.clear();
        if !barriers.is_empty() {
            let result = lost.take().map_or(Ok(()), Err);
            for b in barriers.drain(..) {
                b.0.resolve(result.clone());
            }
        }
    }
}

/// Commits one group; if the transaction fails, each write is tried on its own so that one
/// bad write does not take the others with it. Err if any write of the group was lost.
fn commit(store: &dyn Store, writes: &[Write], stats: &PersistStats) -> Result<(), String> {
    if writes.is_empty() {
        return Ok(());
    }
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.writes.fetch_add(writes.len() as u64, Ordering::Relaxed);
    let Err(e) = store.write_batch(writes) else { return Ok(()) };
    tracing::error!(error = %e, writes = writes.len(), "store batch failed; writing one by one");
    let mut first = None;
    for w in writes {
        if let Err(e) = store.write_batch(std::slice::from_ref(w)) {
            tracing::error!(error = %e, write = ?std::mem::discriminant(w), "could not persist a write");
            first.get_or_insert_with(|| e.to_string());
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests;

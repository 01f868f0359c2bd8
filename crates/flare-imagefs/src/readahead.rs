//! Chunk-level sequential read-ahead: a small pool of threads that fetch the next
//! chunks of a file being read into the [`ChunkCache`], so a sequential reader finds
//! them cached (or joins their fetch) instead of paying one store round trip per chunk.
//!
//! The same pool type runs directory-locality prefetch (a second instance per image fs).
//!
//! Fetches go through [`ChunkCache::ensure`], i.e. the same de-duplicated in-flight
//! path as reads: a reader that reaches a chunk being read ahead waits for that fetch,
//! never a second one. Readers never wait on the queue itself.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use flare_cas::{BlobStore, Digest};
use tracing::{debug, warn};

use crate::cache::{ChunkCache, Source};

#[derive(Default)]
struct Queue {
    todo: VecDeque<Digest>,
    /// Queued or being fetched.
    pending: HashSet<Digest>,
    active: usize,
    threads: usize,
    shutdown: bool,
}

/// The read-ahead pool of one image fs (threads started on first use).
pub(crate) struct ReadAhead {
    queue: Mutex<Queue>,
    work: Condvar,
    idle: Condvar,
    max_threads: usize,
    /// Chunks fetched from the store by read-ahead.
    pub(crate) fetched: AtomicU64,
}

fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReadAhead {
    pub(crate) fn new(max_threads: usize) -> Arc<ReadAhead> {
        Arc::new(ReadAhead {
            queue: Mutex::new(Queue::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            max_threads,
            fetched: AtomicU64::new(0),
        })
    }

    /// Queue `digests` (those not already queued) for fetching; returns at once.
    pub(crate) fn submit(
        self: &Arc<Self>,
        digests: impl IntoIterator<Item = Digest>,
        cache: &Arc<ChunkCache>,
        store: &Arc<dyn BlobStore>,
    ) {
        if self.max_threads == 0 {
            return;
        }
        let mut q = lock(&self.queue);
        if q.shutdown {
            return;
        }
        let mut added = 0;
        for digest in digests {
            if q.pending.insert(digest) {
                q.todo.push_back(digest);
                added += 1;
            }
        }
        if added == 0 {
            return;
        }
        // One more thread per queued chunk, up to the bound.
        while q.threads < self.max_threads && q.threads < q.active + q.todo.len() {
            q.threads += 1;
            let (me, cache, store) = (self.clone(), cache.clone(), store.clone());
            let spawned = std::thread::Builder::new()
                .name("imagefs-readahead".into())
                .spawn(move || me.worker(&cache, store.as_ref()));
            if let Err(e) = spawned {
                warn!(error = %e, "could not start a read-ahead thread");
                q.threads -= 1;
                break;
            }
        }
        drop(q);
        self.work.notify_all();
    }

    fn worker(&self, cache: &ChunkCache, store: &dyn BlobStore) {
        let mut q = lock(&self.queue);
        loop {
            if q.shutdown {
                q.threads -= 1;
                return;
            }
            let Some(digest) = q.todo.pop_front() else {
                q = self.work.wait(q).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            q.active += 1;
            drop(q);
            match cache.ensure(store, &digest) {
                Ok(Source::Fetched) => {
                    self.fetched.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                // The reader that gets there will fetch (and report) it itself.
                Err(e) => debug!(%digest, error = %e, "read-ahead fetch failed"),
            }
            q = lock(&self.queue);
            q.active -= 1;
            q.pending.remove(&digest);
            if q.todo.is_empty() && q.active == 0 {
                self.idle.notify_all();
            }
        }
    }

    /// Block until nothing is queued or being fetched.
    pub(crate) fn wait_idle(&self) {
        let mut q = lock(&self.queue);
        while !q.todo.is_empty() || q.active > 0 {
            q = self.idle.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Drop what is queued and let the threads end (after their current fetch).
    pub(crate) fn shutdown(&self) {
        let mut q = lock(&self.queue);
        q.shutdown = true;
        q.todo.clear();
        drop(q);
        self.work.notify_all();
        self.idle.notify_all();
    }
}

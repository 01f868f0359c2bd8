//! Garbage collection of blobs no manifest references.
//!
//! # The rule that makes GC safe against a running build
//!
//! A blob is kept if it is reachable from a root manifest (the manifest blob itself and
//! every chunk its files reference) **or** it was written or touched less than `grace`
//! before the collection started. Writers therefore `put` new blobs (fresh mtime) and
//! [`touch`](crate::BlobStore::touch) blobs they reuse instead of only checking `has`
//! (`store_file`, `snapshot_dir` and `put_manifest` all do); a build must make its
//! manifest a root (publish it) within `grace` of its last put/touch of each blob — a
//! build that runs longer re-touches its blobs before publishing. Roots are manifests
//! only: an image made of several layer manifests passes each layer as a root.
//!
//! Proof sketch: a build touches blob B at t1 and publishes at t2 ≤ t1 + grace. If GC
//! read its roots before t2, it started at t0 < t2, so its cutoff t0 − grace < t1 and B
//! is young. The last race, a touch landing while GC deletes, is closed by the store's
//! [`delete_if_idle`](crate::BlobStore::delete_if_idle) (for [`crate::LocalStore`]:
//! rename to trash, re-check mtime, restore if touched; a touch re-checks presence).
//!
//! A missing or corrupt root manifest aborts the collection: marking from an incomplete
//! set of roots could delete live blobs.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::{info, warn};

use crate::digest::Digest;
use crate::error::Result;
use crate::manifest::get_manifest;
use crate::store::BlobStore;

/// What a collection found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Blobs reachable from the roots (manifests included).
    pub reachable: u64,
    /// Reachable blobs that are not in the store (a broken image; reported, not fatal).
    pub missing: u64,
    /// Blobs listed in the store.
    pub scanned: u64,
    /// Unreachable blobs kept because they are younger than the grace period.
    pub kept_young: u64,
    pub kept_young_bytes: u64,
    /// Unreachable blobs deleted.
    pub deleted: u64,
    pub deleted_bytes: u64,
}

/// Delete every blob not reachable from `roots` (manifest digests) and idle for at
/// least `grace`. See the module docs for why this is safe during a build.
pub fn gc(store: &dyn BlobStore, roots: &[Digest], grace: Duration) -> Result<GcReport> {
    let cutoff = SystemTime::now().checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
    let live = mark(store, roots)?;
    let mut report = GcReport { reachable: live.len() as u64, ..GcReport::default() };
    let listed = store.list()?;
    report.scanned = listed.len() as u64;
    let listed_set: HashSet<Digest> = listed.iter().copied().collect();
    report.missing = live.iter().filter(|d| !listed_set.contains(d)).count() as u64;
    if report.missing > 0 {
        warn!(missing = report.missing, "blobs referenced by root manifests are missing from the store");
    }
    for digest in listed.iter().filter(|d| !live.contains(d)) {
        match store.delete_if_idle(digest, cutoff)? {
            Some(bytes) => {
                report.deleted += 1;
                report.deleted_bytes += bytes;
            }
            None => {
                if let Some(size) = store.size(digest)? {
                    report.kept_young += 1;
                    report.kept_young_bytes += size;
                }
            }
        }
    }
    info!(?report, "blob store garbage collection done");
    Ok(report)
}

/// Every blob reachable from the root manifests.
fn mark(store: &dyn BlobStore, roots: &[Digest]) -> Result<HashSet<Digest>> {
    let mut live = HashSet::new();
    for root in roots {
        let manifest = get_manifest(store, root)?;
        live.insert(*root);
        live.extend(manifest.chunk_digests().into_keys());
    }
    Ok(live)
}

//! Memory snapshots shared through the control plane (docs/SNAPSHOTS.md), so that a
//! snapshot one worker made serves cold starts on every worker of the fleet.
//!
//! After a worker saves a snapshot it uploads the blobs the control plane lacks (the
//! manifest and its chunks, as blobs: `POST /v1/snapshots/blobs/missing`, `PUT
//! /v1/snapshots/blobs/{digest}`), then the snapshot's record (`PUT /v1/snapshots/{key}`).
//! A worker without the key locally reads the record (`GET /v1/snapshots/{key}`) and
//! pulls the blobs it lacks into its own store (`GET /v1/blobs/{digest}`, verified) before
//! materializing the images as for one of its own. Records are the worker token's only.
//! All calls block on the worker's runtime: call them from blocking threads.

use axum::http::Method;
use bytes::Bytes;
use flare_cas::{BlobStore, Digest, LocalStore};

use crate::http::HttpClient;
use crate::snapshot::Meta;
use crate::WorkerError;

/// Digests per `missing` request.
const ASK_BATCH: usize = 4096;

/// The control plane's snapshot records and blobs.
pub struct SnapshotShare {
    client: HttpClient,
    token: String,
    handle: tokio::runtime::Handle,
}

/// What an upload sent.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Uploaded {
    pub blobs: usize,
    pub bytes: u64,
}

impl SnapshotShare {
    /// `handle`: the runtime that drives `client`.
    pub fn new(client: HttpClient, token: String, handle: tokio::runtime::Handle) -> SnapshotShare {
        SnapshotShare { client, token, handle }
    }

    fn call(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<Bytes, WorkerError> {
        self.handle.block_on(self.client.call(method, path, &self.token, content_type, body))
    }

    /// The record of `key`, if the control plane has one.
    pub(crate) fn record(&self, key: &str) -> Result<Option<Meta>, String> {
        match self.call(Method::GET, &format!("/v1/snapshots/{key}"), "", Bytes::new()) {
            Ok(body) => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| format!("the control plane's record of it is unreadable ({e})")),
            Err(WorkerError::HttpStatus { status: axum::http::StatusCode::NOT_FOUND, .. }) => Ok(None),
            Err(e) => Err(format!("asking the control plane for it: {e}")),
        }
    }

    /// Forget the record of `key` (its snapshot could not be read back).
    pub(crate) fn forget(&self, key: &str) {
        match self.call(Method::DELETE, &format!("/v1/snapshots/{key}"), "application/json", Bytes::new()) {
            Ok(_) | Err(WorkerError::HttpStatus { status: axum::http::StatusCode::NOT_FOUND, .. }) => {}
            Err(e) => tracing::warn!(%key, error = %e, "could not drop the shared snapshot record"),
        }
    }

    /// Upload `meta`'s blobs that the control plane lacks from `store`, then the record.
    pub(crate) fn upload(&self, store: &LocalStore, meta: &Meta) -> Result<Uploaded, String> {
        let root = Digest::from_hex(&meta.manifest).map_err(|e| e.to_string())?;
        let manifest = flare_cas::get_manifest(store, &root).map_err(|e| e.to_string())?;
        let mut all: Vec<Digest> = manifest.chunk_digests().into_keys().collect();
        // The manifest last: a blob store that has it has everything it names.
        all.sort();
        all.push(root);
        let mut sent = Uploaded::default();
        for batch in all.chunks(ASK_BATCH) {
            let ask =
                serde_json::json!({ "digests": batch.iter().map(|d| d.to_string()).collect::<Vec<_>>() });
            let body = self
                .call(
                    Method::POST,
                    "/v1/snapshots/blobs/missing",
                    "application/json",
                    Bytes::from(ask.to_string()),
                )
                .map_err(|e| format!("asking which blobs the control plane lacks: {e}"))?;
            let missing: Missing = serde_json::from_slice(&body)
                .map_err(|e| format!("unreadable answer about missing blobs: {e}"))?;
            for d in missing.missing {
                let d: Digest =
                    d.parse().map_err(|_| format!("the control plane named a bad digest {d:?}"))?;
                let data = store.get(&d).map_err(|e| format!("reading blob {d}: {e}"))?;
                sent.bytes += data.len() as u64;
                sent.blobs += 1;
                self.call(
                    Method::PUT,
                    &format!("/v1/snapshots/blobs/{d}"),
                    "application/octet-stream",
                    Bytes::from(data),
                )
                .map_err(|e| format!("uploading blob {d}: {e}"))?;
            }
        }
        let record = serde_json::to_vec(meta).map_err(|e| e.to_string())?;
        self.call(
            Method::PUT,
            &format!("/v1/snapshots/{}", meta.key),
            "application/json",
            Bytes::from(record),
        )
        .map_err(|e| format!("storing the snapshot's record: {e}"))?;
        Ok(sent)
    }

    /// Copy the blobs of the manifest `root` that `local` lacks from the control plane
    /// (each verified against its digest); how many bytes came.
    pub(crate) fn pull(&self, local: &LocalStore, root: &Digest) -> Result<u64, PullError> {
        let remote = crate::images::HttpBlobStore::new(self.client.clone(), self.handle.clone());
        let mut fetched = 0u64;
        let mut copy = |d: &Digest| -> Result<(), PullError> {
            if local.touch(d).map_err(|e| PullError::Unavailable(e.to_string()))? {
                return Ok(());
            }
            let data = remote.get(d).map_err(|e| match e {
                // Missing or not what its digest says: the fleet's snapshot is broken.
                flare_cas::CasError::NotFound { .. } | flare_cas::CasError::Corrupt { .. } => {
                    PullError::Corrupt(format!("blob {d}: {e}"))
                }
                e => PullError::Unavailable(format!("fetching blob {d}: {e}")),
            })?;
            fetched += data.len() as u64;
            local.put(&data).map_err(|e| PullError::Unavailable(format!("storing blob {d}: {e}")))?;
            Ok(())
        };
        copy(root)?;
        let manifest = flare_cas::get_manifest(local, root).map_err(|e| PullError::Corrupt(e.to_string()))?;
        for d in manifest.chunk_digests().keys() {
            copy(d)?;
        }
        Ok(fetched)
    }
}

/// Why [`SnapshotShare::pull`] failed.
#[derive(Debug)]
pub(crate) enum PullError {
    /// A blob is missing from the control plane or does not match its digest.
    Corrupt(String),
    /// The control plane (or this worker's store) could not be used just now.
    Unavailable(String),
}

#[derive(serde::Deserialize)]
struct Missing {
    missing: Vec<String>,
}

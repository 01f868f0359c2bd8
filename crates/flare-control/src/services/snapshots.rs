//! The fleet's memory snapshots (docs/SNAPSHOTS.md): a record per snapshot key, naming the
//! manifest of its images in the blob store. A worker that made a snapshot uploads its
//! blobs through the blob routes, then its record here; a worker that needs one reads the
//! record and fetches the blobs. Snapshots hold whatever a function had in memory: only
//! workers (the worker token, as a bearer token) may read or write records, and code in
//! containers never may.
//!
//! Records live in `home/snapshot-records/<key>.json` (root-only; not `home/snapshots`,
//! which is the embedded server's own worker's store); the control plane keeps the most
//! recently used [`RECORDS_KEPT`] and `flared gc` keeps their blobs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use flare_api::ApiError;
use flare_cas::{BlobStore, Digest};
use serde::{Deserialize, Serialize};

use super::Service;
use crate::http::{HttpError, Route};
use crate::ControlPlane;

/// Records kept (the least recently used go first; their blobs go with `flared gc`).
pub const RECORDS_KEPT: usize = 256;

/// Largest record accepted.
const MAX_RECORD: usize = 64 << 10;

/// The service.
pub struct Snapshots;

impl Service for Snapshots {
    fn name(&self) -> &'static str {
        "snapshots"
    }

    fn routes(&self) -> Vec<Route> {
        vec![
            Route::get("/v1/snapshots/{key}", get_record),
            Route::put("/v1/snapshots/{key}", put_record),
            Route::delete("/v1/snapshots/{key}", delete_record),
            Route::post("/v1/snapshots/blobs/missing", missing_blobs),
            Route::put("/v1/snapshots/blobs/{digest}", put_blob),
        ]
    }
}

/// Where the records of the control plane with data dir `home` are.
pub fn index_dir(home: &Path) -> PathBuf {
    home.join("snapshot-records")
}

/// The manifests the records name (roots for the blob store's garbage collection).
pub fn manifest_roots(home: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(index_dir(home)) else { return Vec::new() };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter_map(|v| v.get("manifest").and_then(|m| m.as_str()).map(str::to_owned))
        .collect()
}

/// A snapshot key: 64 lowercase hex digits (never a path).
fn check_key(key: &str) -> Result<(), HttpError> {
    if key.len() == 64 && key.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!("bad snapshot key {key:?} (expected 64 hex digits)")).into())
    }
}

/// The request carries this control plane's worker token.
fn check_worker(cp: &ControlPlane, headers: &HeaderMap) -> Result<(), HttpError> {
    let Some(token) = cp.worker_token().filter(|t| !t.is_empty()) else {
        return Err(ApiError::forbidden(
            "this server has no remote workers (no worker token set): snapshots are not shared",
        )
        .into());
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::forbidden("snapshot records are for workers: no bearer token"))?;
    if !crate::secret::same_secret(given.as_bytes(), token.as_bytes()) {
        return Err(ApiError::forbidden("wrong worker token").into());
    }
    Ok(())
}

fn record_path(cp: &ControlPlane, key: &str) -> PathBuf {
    index_dir(cp.home()).join(format!("{key}.json"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, HttpError> {
    Ok(tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(e.to_string()))??)
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> ApiError + '_ {
    move |e| ApiError::internal(format!("snapshot index: {what}: {e}"))
}

/// `GET /v1/snapshots/{key}`: the record, as stored.
async fn get_record(
    State(cp): State<ControlPlane>,
    headers: HeaderMap,
    UrlPath(key): UrlPath<String>,
) -> Result<Response, HttpError> {
    check_worker(&cp, &headers)?;
    check_key(&key)?;
    let path = record_path(&cp, &key);
    let body = blocking(move || match std::fs::read(&path) {
        Ok(b) => {
            // Used now: retention keeps the most recently used.
            let _ = std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            Ok(b)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ApiError::not_found(format!("no snapshot {key}")))
        }
        Err(e) => Err(io_err("read")(e)),
    })
    .await?;
    Ok((StatusCode::OK, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `PUT /v1/snapshots/{key}`: store a record (a JSON object whose `key` is the path's and
/// whose `manifest` is a digest), replacing any; then keep the most recently used.
async fn put_record(
    State(cp): State<ControlPlane>,
    headers: HeaderMap,
    UrlPath(key): UrlPath<String>,
    body: Bytes,
) -> Result<StatusCode, HttpError> {
    check_worker(&cp, &headers)?;
    check_key(&key)?;
    if body.len() > MAX_RECORD {
        return Err(ApiError::too_large(format!("a snapshot record is at most {MAX_RECORD} bytes")).into());
    }
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("invalid snapshot record: {e}")))?;
    if v.get("key").and_then(|k| k.as_str()) != Some(key.as_str()) {
        return Err(ApiError::invalid("the record's `key` is not the path's").into());
    }
    let manifest = v.get("manifest").and_then(|m| m.as_str()).unwrap_or_default();
    let Ok(manifest) = Digest::from_hex(manifest) else {
        return Err(ApiError::invalid("the record's `manifest` is not a digest").into());
    };
    let store = store(&cp)?;
    let dir = index_dir(cp.home());
    let path = record_path(&cp, &key);
    blocking(move || {
        // A record names what is stored: its blobs are uploaded first.
        if !store.has(&manifest).map_err(|e| ApiError::internal(e.to_string()))? {
            return Err(ApiError::precondition(format!(
                "the record's manifest {manifest} is not in the blob store: upload the snapshot's blobs first"
            )));
        }
        make_private_dir(&dir)?;
        let tmp = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
        std::fs::write(&tmp, &body).map_err(io_err("write"))?;
        std::fs::rename(&tmp, &path).map_err(io_err("write"))?;
        retain(&dir, RECORDS_KEPT);
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /v1/snapshots/{key}`: forget a record (a worker found its snapshot unreadable).
async fn delete_record(
    State(cp): State<ControlPlane>,
    headers: HeaderMap,
    UrlPath(key): UrlPath<String>,
) -> Result<StatusCode, HttpError> {
    check_worker(&cp, &headers)?;
    check_key(&key)?;
    let path = record_path(&cp, &key);
    blocking(move || match std::fs::remove_file(&path) {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ApiError::not_found(format!("no snapshot {key}")))
        }
        Err(e) => Err(io_err("delete")(e)),
    })
    .await
}

/// The blob store (an image service's), or why there is none.
fn store(cp: &ControlPlane) -> Result<Arc<dyn BlobStore>, ApiError> {
    cp.image_service()
        .map(|i| i.blob_store())
        .ok_or_else(|| ApiError::unavailable("this server has no blob store"))
}

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse().map_err(|_| ApiError::invalid(format!("bad digest {s:?} (expected blake3:<64 hex>)")))
}

#[derive(Deserialize)]
struct Digests {
    digests: Vec<String>,
}

#[derive(Serialize)]
struct Missing {
    missing: Vec<String>,
}

/// Most digests one `missing` request may ask about.
const MAX_ASKED: usize = 100_000;

/// `POST /v1/snapshots/blobs/missing`: which of a snapshot's blobs the store lacks (as
/// blobs: chunks are never re-chunked, unlike the image routes' whole-file uploads).
async fn missing_blobs(
    State(cp): State<ControlPlane>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<Missing>, HttpError> {
    check_worker(&cp, &headers)?;
    let req: Digests =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("invalid request body: {e}")))?;
    if req.digests.len() > MAX_ASKED {
        return Err(ApiError::too_large(format!("at most {MAX_ASKED} digests per request")).into());
    }
    let digests = req.digests.iter().map(|d| parse_digest(d)).collect::<Result<Vec<_>, _>>()?;
    let store = store(&cp)?;
    let missing = blocking(move || {
        let mut out = Vec::new();
        for d in digests {
            // `touch`, not `has`: a blob a new record will name must count as young for GC.
            if !store.touch(&d).map_err(|e| ApiError::internal(e.to_string()))? {
                out.push(d.to_string());
            }
        }
        Ok(out)
    })
    .await?;
    Ok(axum::Json(Missing { missing }))
}

/// `PUT /v1/snapshots/blobs/{digest}`: store one blob, verified against its digest.
async fn put_blob(
    State(cp): State<ControlPlane>,
    headers: HeaderMap,
    UrlPath(digest): UrlPath<String>,
    body: Bytes,
) -> Result<StatusCode, HttpError> {
    check_worker(&cp, &headers)?;
    let want = parse_digest(&digest)?;
    let got = Digest::of(&body);
    if got != want {
        return Err(ApiError::invalid(format!("uploaded content has digest {got}, not {want}")).into());
    }
    let store = store(&cp)?;
    blocking(move || store.put(&body).map(|_| ()).map_err(|e| ApiError::internal(e.to_string()))).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn make_private_dir(dir: &Path) -> Result<(), ApiError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.is_dir() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err("create"))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err("chmod"))?;
    Ok(())
}

/// Keep the `kept` most recently used records of `dir`.
fn retain(dir: &Path, kept: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let mut records: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .map(|e| (e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), e.path()))
        .collect();
    records.sort();
    let excess = records.len().saturating_sub(kept);
    for (_, p) in records.drain(..excess) {
        tracing::info!(record = %p.display(), "shared snapshot record dropped (least recently used)");
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hex_names_never_paths() {
        assert!(check_key(&"a".repeat(64)).is_ok());
        for bad in ["", "../x", &"A".repeat(64), &"a".repeat(63), &format!("{}/", "a".repeat(63))] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn retention_keeps_the_most_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
        for i in 0..5u64 {
            let p = dir.path().join(format!("{i}.json"));
            std::fs::write(&p, "{}").unwrap();
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(i * 10)).unwrap();
        }
        retain(dir.path(), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["3.json", "4.json"]);
    }

    #[test]
    fn roots_are_the_records_manifests() {
        let home = tempfile::tempdir().unwrap();
        let dir = index_dir(home.path());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.json"), r#"{"key":"a","manifest":"m1"}"#).unwrap();
        std::fs::write(dir.join("b.json"), "not json").unwrap();
        std::fs::write(dir.join("c.tmp-x"), r#"{"manifest":"m2"}"#).unwrap();
        assert_eq!(manifest_roots(home.path()), ["m1"]);
    }
}

//! Volumes (`flare.Volume`): versioned file trees, by name or ephemeral, usable from
//! clients and from code in containers.
//!
//! A volume's row in the store (table `volumes`) holds its current version number and
//! the CAS digest of that version's manifest (the format images use); the file data are
//! blobs in the server's CAS, so they dedupe with images and with each other. Files are
//! uploaded first (`/v1/blobs...`, or the volume-scoped blob routes here for code in
//! containers), then one commit request publishes any number of puts, removes and
//! copies: applied file by file onto the latest version under the volume's lock (see
//! [`tree`]), the new manifest written to the CAS, then the new version committed to the
//! store; the answer comes after that commit. A failure before it (a missing blob, a full
//! disk) leaves the previous version current.
//!
//! `flared gc` keeps every blob the current manifests reach ([`manifest_roots`]).

pub mod tree;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use flare_api::{ApiError, ErrorCode};
use flare_cas::{get_manifest, put_manifest, BlobStore, Chunk, Digest, EntryKind, FileContent, Manifest};
use flare_store::{Store, VolumeRow, Write};
use serde::{Deserialize, Serialize};

use super::named::{check_create, commit, read};
use super::Service;
use crate::http::body::{ApiBody, Valid};
use crate::http::{HttpError, Route};
use crate::{new_id, now_ts, ControlPlane};

use tree::{volume_path, Changes, TreeError};

/// Most changes (puts, removes and copied sources together) of one commit.
pub const MAX_COMMIT_CHANGES: usize = 500_000;
/// Largest piece of a file a read sends at once.
const READ_PIECE: u64 = 4 << 20;
/// Parsed manifests kept in memory (by digest; they never change).
const MANIFEST_CACHE: usize = 16;
/// Largest blob one `POST /v1/volumes/{id}/blobs` takes (a piece of a file uploaded
/// from a container).
const MAX_VOLUME_BLOB: usize = flare_api::MAX_VOLUME_BLOB_BODY;

/// The service.
pub struct Volumes;

impl Service for Volumes {
    fn name(&self) -> &'static str {
        "volumes"
    }

    fn routes(&self) -> Vec<Route> {
        vec![
            Route::post("/v1/volumes", create).container(),
            Route::get("/v1/volumes", list).container(),
            Route::get("/v1/volumes/{volume_id}", info).container(),
            Route::delete("/v1/volumes/{volume_id}", delete).container(),
            Route::get("/v1/volumes/{volume_id}/entries", entries).container(),
            Route::get("/v1/volumes/{volume_id}/file", read_file).container(),
            Route::post("/v1/volumes/{volume_id}/commit", commit_changes).container(),
            Route::post("/v1/volumes/{volume_id}/blobs/missing", blobs_missing).container(),
            Route::post("/v1/volumes/{volume_id}/blobs", upload_blob).container(),
            Route::post("/v1/volumes/{volume_id}/heartbeat", heartbeat).container(),
        ]
    }
}

/// The digests of the current manifests of every volume: roots for `flared gc`.
pub fn manifest_roots(store: &dyn Store) -> flare_store::Result<Vec<String>> {
    Ok(store.list_volumes()?.into_iter().map(|v| v.manifest).filter(|m| !m.is_empty()).collect())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("volume task: {e}")))?
}

fn images(cp: &ControlPlane) -> Result<Arc<dyn crate::ImageService>, ApiError> {
    cp.image_service()
        .cloned()
        .ok_or_else(|| ApiError::unavailable("this control plane has no blob store: volumes are unavailable"))
}

fn blobs(cp: &ControlPlane) -> Result<Arc<dyn BlobStore>, ApiError> {
    Ok(images(cp)?.blob_store())
}

fn cas_err(what: &str, e: flare_cas::CasError) -> ApiError {
    tracing::error!(error = %e, "volume {what}");
    ApiError::internal(format!("{what}: {e}"))
}

fn tree_err(e: TreeError) -> ApiError {
    let m = e.to_string();
    match e {
        TreeError::NotFound(_) => ApiError::not_found(m),
        TreeError::Exists(_) => ApiError { code: ErrorCode::Conflict, message: m },
        _ => ApiError::invalid(m),
    }
}

async fn existing(cp: &ControlPlane, volume_id: &str) -> Result<VolumeRow, ApiError> {
    let id = volume_id.to_string();
    read(cp, move |s| s.get_volume(&id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no volume {volume_id}")))
}

fn manifest_cache() -> &'static Mutex<HashMap<String, Arc<Manifest>>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Manifest>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The tree of a volume's version (empty for `""`). Blocking.
fn load(store: &dyn BlobStore, manifest: &str) -> Result<Arc<Manifest>, ApiError> {
    if manifest.is_empty() {
        return Ok(Arc::new(Manifest::new()));
    }
    if let Some(m) = manifest_cache().lock().unwrap_or_else(|e| e.into_inner()).get(manifest) {
        return Ok(m.clone());
    }
    let d: Digest =
        manifest.parse().map_err(|_| ApiError::internal(format!("bad volume manifest {manifest:?}")))?;
    let m = Arc::new(get_manifest(store, &d).map_err(|e| cas_err("reading the volume's manifest", e))?);
    let mut cache = manifest_cache().lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= MANIFEST_CACHE {
        cache.clear();
    }
    cache.insert(manifest.to_string(), m.clone());
    Ok(m)
}

#[derive(Deserialize)]
struct CreateVolume {
    #[serde(default)]
    name: String,
    #[serde(default)]
    create_if_missing: bool,
    #[serde(default)]
    ephemeral: bool,
}

impl ApiBody for CreateVolume {
    fn validate(&self) -> Result<(), ApiError> {
        check_create("volume", &self.name, self.ephemeral)
    }
}

#[derive(Serialize)]
struct VolumeInfo {
    volume_id: String,
    name: String,
    ephemeral: bool,
    created_at: f64,
    version: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
}

impl VolumeInfo {
    fn of(v: VolumeRow) -> Self {
        VolumeInfo {
            volume_id: v.volume_id,
            name: v.name,
            ephemeral: v.ephemeral,
            created_at: v.created_at,
            version: v.version,
            created: None,
        }
    }
}

async fn create(
    State(cp): State<ControlPlane>,
    Valid(req): Valid<CreateVolume>,
) -> Result<Json<VolumeInfo>, HttpError> {
    let new = |name: String| VolumeRow {
        volume_id: new_id("vo"),
        name,
        ephemeral: req.ephemeral,
        created_at: now_ts(),
        version: 0,
        manifest: String::new(),
    };
    if req.ephemeral {
        let v = new(String::new());
        cp.leases().touch(super::leases::Kind::Volume, &v.volume_id);
        commit(&cp, vec![Write::Volume(v.clone())]).await?;
        return Ok(Json(VolumeInfo { created: Some(true), ..VolumeInfo::of(v) }));
    }
    let _g = cp.volume_locks().lock(&format!("name:{}", req.name)).await;
    let name = req.name.clone();
    if let Some(v) = read(&cp, move |s| s.volume_by_name(&name)).await? {
        return Ok(Json(VolumeInfo { created: Some(false), ..VolumeInfo::of(v) }));
    }
    if !req.create_if_missing {
        return Err(ApiError::not_found(format!("no volume named {:?}", req.name)).into());
    }
    let v = new(req.name.clone());
    commit(&cp, vec![Write::Volume(v.clone())]).await?;
    tracing::info!(volume_id = %v.volume_id, name = %v.name, "volume created");
    Ok(Json(VolumeInfo { created: Some(true), ..VolumeInfo::of(v) }))
}

#[derive(Serialize)]
struct VolumeList {
    volumes: Vec<VolumeInfo>,
}

async fn list(State(cp): State<ControlPlane>) -> Result<Json<VolumeList>, HttpError> {
    let rows = read(&cp, |s| s.list_volumes()).await?;
    Ok(Json(VolumeList { volumes: rows.into_iter().map(VolumeInfo::of).collect() }))
}

async fn info(
    State(cp): State<ControlPlane>,
    Path(volume_id): Path<String>,
) -> Result<Json<VolumeInfo>, HttpError> {
    Ok(Json(VolumeInfo::of(existing(&cp, &volume_id).await?)))
}

async fn delete(
    State(cp): State<ControlPlane>,
    Path(volume_id): Path<String>,
) -> Result<Json<flare_api::Empty>, HttpError> {
    let v = {
        let _g = cp.volume_locks().lock(&volume_id).await;
        let v = existing(&cp, &volume_id).await?;
        commit(&cp, vec![Write::VolumeDelete { volume_id: volume_id.clone() }]).await?;
        v
    };
    cp.leases().forget(&volume_id);
    tracing::info!(volume_id = %v.volume_id, name = %v.name, "volume deleted");
    Ok(Json(flare_api::Empty {}))
}

/// Deletes an ephemeral volume whose client went away (see [`super::leases`]); its files
/// go with the next `flared gc`.
pub(super) async fn delete_orphan(cp: &ControlPlane, volume_id: &str) -> Result<(), ApiError> {
    let _g = cp.volume_locks().lock(volume_id).await;
    commit(cp, vec![Write::VolumeDelete { volume_id: volume_id.to_string() }]).await?;
    tracing::info!(volume_id = %volume_id, "ephemeral volume deleted: no heartbeat from its client");
    Ok(())
}

/// The client of an ephemeral volume is still there (see [`super::leases`]).
async fn heartbeat(
    State(cp): State<ControlPlane>,
    Path(volume_id): Path<String>,
) -> Result<Json<flare_api::Empty>, HttpError> {
    if existing(&cp, &volume_id).await?.ephemeral {
        cp.leases().touch(super::leases::Kind::Volume, &volume_id);
    }
    Ok(Json(flare_api::Empty {}))
}

#[derive(Deserialize)]
struct EntriesQuery {
    #[serde(default)]
    path: String,
    #[serde(default)]
    recursive: bool,
}

#[derive(Serialize)]
struct EntryInfo {
    /// The path in the volume, without a leading `/`.
    path: String,
    /// `file`, `directory` or `symlink`.
    #[serde(rename = "type")]
    kind: &'static str,
    mtime: i64,
    size: u64,
    mode: u32,
}

#[derive(Serialize)]
struct Entries {
    version: i64,
    entries: Vec<EntryInfo>,
}

async fn entries(
    State(cp): State<ControlPlane>,
    Path(volume_id): Path<String>,
    Query(q): Query<EntriesQuery>,
) -> Result<Json<Entries>, HttpError> {
    let path = volume_path(&q.path, true).map_err(tree_err)?;
    let v = existing(&cp, &volume_id).await?;
    let store = blobs(&cp)?;
    let listed = blocking(move || {
        let m = load(&*store, &v.manifest)?;
        let entries = tree::list(&m, &path, q.recursive)
            .map_err(tree_err)?
            .into_iter()
            .map(|(p, e)| EntryInfo {
                path: p.to_string(),
                kind: match e.kind {
                    EntryKind::Dir => "directory",
                    EntryKind::File(_) => "file",
                    EntryKind::Symlink { .. } => "symlink",
                },
                mtime: e.mtime,
                size: tree::entry_size(e),
                mode: e.mode,
            })
            .collect();
        Ok(Entries { version: v.version, entries })
    })
    .await?;
    Ok(Json(listed))
}

#[derive(Deserialize)]
struct FileQuery {
    path: String,
}

/// `GET /v1/volumes/{id}/file?path=`: a file's bytes, streamed a piece at a time (never
/// the whole file in memory). The `x-flare-volume-version` header names the version read.
async fn read_file(
    State(cp): State<ControlPlane>,
    Path(volume_id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response, HttpError> {
    let path = volume_path(&q.path, false).map_err(tree_err)?;
    let v = existing(&cp, &volume_id).await?;
    let store = blobs(&cp)?;
    let st = store.clone();
    let content = blocking(move || {
        let m = load(&*st, &v.manifest)?;
        match m.get(&path).map(|e| &e.kind) {
            Some(EntryKind::File(c)) => Ok(c.clone()),
            Some(EntryKind::Dir) => Err(tree_err(TreeError::IsADirectory(path))),
            Some(EntryKind::Symlink { .. }) => Err(ApiError::invalid(format!("/{path} is a symlink"))),
            None => Err(tree_err(TreeError::NotFound(path))),
        }
    })
    .await?;
    let size = content.size;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tokio::task::spawn_blocking(move || {
        for c in &content.chunks {
            let mut off = 0;
            while off < c.len {
                let n = READ_PIECE.min(c.len - off);
                let piece = if off == 0 && n == c.len {
                    store.get(&c.digest)
                } else {
                    store.read_range(&c.digest, off, n)
                };
                let item = piece.map(Bytes::from).map_err(|e| {
                    tracing::error!(error = %e, "reading a volume file");
                    std::io::Error::other(e.to_string())
                });
                let failed = item.is_err();
                if tx.blocking_send(item).is_err() || failed {
                    return; // the reader went away, or the stream ends with the error
                }
                off += n;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        body,
    )
        .into_response())
}

#[derive(Deserialize)]
struct ChunkRef {
    digest: Digest,
    len: u64,
}

#[derive(Deserialize)]
struct PutItem {
    path: String,
    #[serde(default = "default_mode")]
    mode: u32,
    /// Seconds since the epoch (default: the commit's time).
    #[serde(default)]
    mtime: Option<i64>,
    size: u64,
    /// The whole file as one blob.
    #[serde(default)]
    blob: Option<Digest>,
    /// Or its chunks, in order.
    #[serde(default)]
    chunks: Option<Vec<ChunkRef>>,
}

fn default_mode() -> u32 {
    0o644
}

#[derive(Deserialize)]
struct RemoveItem {
    path: String,
    #[serde(default)]
    recursive: bool,
}

#[derive(Deserialize)]
struct CopyItem {
    src_paths: Vec<String>,
    dst_path: String,
    #[serde(default)]
    recursive: bool,
}

#[derive(Deserialize)]
struct CommitReq {
    /// The version the writer last saw (informational: changes apply file by file onto
    /// the latest version; it must not be newer than that).
    #[serde(default)]
    base_version: Option<i64>,
    #[serde(default)]
    put: Vec<PutItem>,
    #[serde(default)]
    remove: Vec<RemoveItem>,
    #[serde(default)]
    copy: Vec<CopyItem>,
    /// Puts replace existing files.
    #[serde(default)]
    force: bool,
}

impl ApiBody for CommitReq {
    fn validate(&self) -> Result<(), ApiError> {
        let n =
            self.put.len() + self.remove.len() + self.copy.iter().map(|c| c.src_paths.len()).sum::<usize>();
        if n > MAX_COMMIT_CHANGES {
            return Err(ApiError::too_large(format!(
                "a volume commit has at most {MAX_COMMIT_CHANGES} changes; this one has {n}"
            )));
        }
        for p in &self.put {
            volume_path(&p.path, false).map_err(tree_err)?;
            match (&p.blob, &p.chunks) {
                (Some(_), Some(_)) => {
                    return Err(ApiError::invalid(format!("{}: give blob or chunks, not both", p.path)))
                }
                (None, None) if p.size > 0 => {
                    return Err(ApiError::invalid(format!(
                        "{}: a non-empty file needs blob or chunks",
                        p.path
                    )))
                }
                _ => {}
            }
        }
        for r in &self.remove {
            volume_path(&r.path, true).map_err(tree_err)?;
        }
        for c in &self.copy {
            volume_path(&c.dst_path, true).map_err(tree_err)?;
            for s in &c.src_paths {
                volume_path(s, false).map_err(tree_err)?;
            }
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct Committed {
    version: i64,
    /// Whether this commit made a new version (false: it changed nothing).
    changed: bool,
}

/// Turn the request into changes, checking that every blob is in the store (and
/// touching it, so that `flared gc` keeps it until the new manifest is a root).
fn changes_of(
    images: &dyn crate::ImageService,
    store: &dyn BlobStore,
    req: CommitReq,
    now: i64,
) -> Result<Changes, ApiError> {
    let mut seen: HashSet<Digest> = HashSet::new();
    let mut check = |d: &Digest, len: u64, path: &str| -> Result<(), ApiError> {
        if !seen.insert(*d) {
            return Ok(());
        }
        match store.stat(d).map_err(|e| cas_err("checking an uploaded blob", e))? {
            None => Err(ApiError::precondition(format!("blob {d} of {path} was not uploaded"))),
            Some(i) if i.size != len => Err(ApiError::invalid(format!(
                "blob {d} of {path} is {} bytes, the commit says {len}",
                i.size
            ))),
            Some(_) => {
                store.touch(d).map_err(|e| cas_err("touching an uploaded blob", e))?;
                Ok(())
            }
        }
    };
    let mut ch = Changes { force: req.force, ..Changes::default() };
    for p in req.put {
        let path = volume_path(&p.path, false).map_err(tree_err)?;
        let mut content = FileContent::default();
        if let Some(d) = p.blob {
            content = images.file_content(&d, p.size).map_err(|e| {
                if matches!(e.code, ErrorCode::NotFound | ErrorCode::FailedPrecondition) {
                    ApiError::precondition(format!("{}: {}", p.path, e.message))
                } else {
                    e
                }
            })?;
        } else {
            for c in p.chunks.unwrap_or_default() {
                content.chunks.push(Chunk { digest: c.digest, offset: content.size, len: c.len });
                content.size += c.len;
            }
        }
        content.validate().map_err(|e| ApiError::invalid(format!("{}: {e}", p.path)))?;
        for c in &content.chunks {
            check(&c.digest, c.len, &p.path)?;
        }
        ch.puts.push(tree::Put { path, mode: p.mode & 0o7777, mtime: p.mtime.unwrap_or(now), content });
    }
    for r in req.remove {
        ch.removes.push(tree::Remove {
            path: volume_path(&r.path, true).map_err(tree_err)?,
            recursive: r.recursive,
        });
    }
    for c in req.copy {
        ch.copies.push(tree::Copy {
            src_paths: c
                .src_paths
                .iter()
                .map(|s| volume_path(s, false))
                .collect::<Result<_, _>>()
                .map_err(tree_err)?,
            dst_path: volume_path(&c.dst_path, true).map_err(tree_err)?,
            recursive: c.recursive,
        });
    }
    Ok(ch)
}

/// `POST /v1/volumes/{id}/commit`: publish puts, removes and copies as one new version.
async fn commit_changes(
    State(cp): State<ControlPlane>,
    Path(volume_id): Path<String>,
    Valid(req): Valid<CommitReq>,
) -> Result<Json<Committed>, HttpError> {
    let images = images(&cp)?;
    let store = images.blob_store();
    let _g = cp.volume_locks().lock(&volume_id).await;
    let v = existing(&cp, &volume_id).await?;
    if let Some(base) = req.base_version {
        if base > v.version {
            return Err(ApiError::invalid(format!(
                "base version {base} is newer than the volume's latest version {}",
                v.version
            ))
            .into());
        }
    }
    let now = now_ts() as i64;
    let current = v.manifest.clone();
    let made = blocking(move || {
        let changes = changes_of(&*images, &*store, req, now)?;
        if changes.is_empty() {
            return Ok(None);
        }
        let mut m = (*load(&*store, &current)?).clone();
        tree::apply(&mut m, &changes, now).map_err(tree_err)?;
        // The manifest is in the CAS (flushed) before the version points at it.
        let d = put_manifest(&*store, &m).map_err(|e| cas_err("writing the volume's new manifest", e))?;
        Ok(Some(d.to_string()))
    })
    .await?;
    let Some(manifest) = made else {
        return Ok(Json(Committed { version: v.version, changed: false }));
    };
    let version = v.version + 1;
    commit(&cp, vec![Write::VolumeVersion { volume_id: volume_id.clone(), version, manifest }]).await?;
    tracing::debug!(volume_id = %volume_id, version, "volume committed");
    Ok(Json(Committed { version, changed: true }))
}

#[derive(Deserialize)]
struct MissingReq {
    digests: Vec<Digest>,
}

impl ApiBody for MissingReq {}

#[derive(Serialize)]
struct MissingBlobs {
    missing: Vec<Digest>,
}

/// `POST /v1/volumes/{id}/blobs/missing`: which of these blobs the server lacks (for
/// code in containers, which may not call `/v1/blobs/missing`).
async fn blobs_missing(
    State(cp): State<ControlPlane>,
    Path(volume_id): Path<String>,
    Valid(req): Valid<MissingReq>,
) -> Result<Json<MissingBlobs>, HttpError> {
    existing(&cp, &volume_id).await?;
    let store = blobs(&cp)?;
    let missing = blocking(move || {
        let mut out = Vec::new();
        for d in req.digests {
            if !store.touch(&d).map_err(|e| cas_err("checking a blob", e))? {
                out.push(d);
            }
        }
        Ok(out)
    })
    .await?;
    Ok(Json(MissingBlobs { missing }))
}

#[derive(Serialize)]
struct Stored {
    digest: Digest,
    size: u64,
}

/// `POST /v1/volumes/{id}/blobs`: store the body as one blob and say its digest (the
/// server computes it: code in containers has no BLAKE3 at hand).
async fn upload_blob(
    State(cp): State<ControlPlane>,
    Path(volume_id): Path<String>,
    body: Body,
) -> Result<Json<Stored>, HttpError> {
    existing(&cp, &volume_id).await?;
    let store = blobs(&cp)?;
    let data = axum::body::to_bytes(body, MAX_VOLUME_BLOB)
        .await
        .map_err(|e| ApiError::too_large(format!("reading the blob: {e}")))?;
    let size = data.len() as u64;
    let digest = blocking(move || store.put(&data).map_err(|e| cas_err("storing a blob", e))).await?;
    Ok(Json(Stored { digest, size }))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use serde_json::{json, Value};
    use tower::ServiceExt as _;

    use crate::http::{harden, router, SitePolicy};
    use crate::services::named::testing::*;

    /// A local blob store that refuses writes while `full` is set (a full disk).
    struct Fillable {
        inner: flare_cas::LocalStore,
        full: std::sync::atomic::AtomicBool,
    }

    impl Fillable {
        fn check(&self) -> flare_cas::Result<()> {
            if self.full.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(flare_cas::CasError::Io {
                    context: "writing a blob".into(),
                    source: std::io::Error::from_raw_os_error(28),
                });
            }
            Ok(())
        }
    }

    impl flare_cas::BlobStore for Fillable {
        fn put(&self, data: &[u8]) -> flare_cas::Result<flare_cas::Digest> {
            self.check()?;
            self.inner.put(data)
        }
        fn put_file(&self, path: &std::path::Path) -> flare_cas::Result<flare_cas::Digest> {
            self.check()?;
            self.inner.put_file(path)
        }
        fn get(&self, d: &flare_cas::Digest) -> flare_cas::Result<Vec<u8>> {
            self.inner.get(d)
        }
        fn read_range(&self, d: &flare_cas::Digest, offset: u64, len: u64) -> flare_cas::Result<Vec<u8>> {
            self.inner.read_range(d, offset, len)
        }
        fn has(&self, d: &flare_cas::Digest) -> flare_cas::Result<bool> {
            self.inner.has(d)
        }
        fn touch(&self, d: &flare_cas::Digest) -> flare_cas::Result<bool> {
            self.inner.touch(d)
        }
        fn stat(&self, d: &flare_cas::Digest) -> flare_cas::Result<Option<flare_cas::BlobInfo>> {
            self.inner.stat(d)
        }
        fn list(&self) -> flare_cas::Result<Vec<flare_cas::Digest>> {
            self.inner.list()
        }
        fn delete(&self, d: &flare_cas::Digest) -> flare_cas::Result<bool> {
            self.inner.delete(d)
        }
    }

    struct Blobs(std::sync::Arc<Fillable>);

    impl crate::ImageService for Blobs {
        fn resolve(&self, _: &str) -> Result<flare_proto::ImageUse, flare_api::ApiError> {
            Err(flare_api::ApiError::not_found("no images here"))
        }
        fn mount_files(
            &self,
            _: &serde_json::Value,
        ) -> Result<Vec<flare_api::MountFile>, flare_api::ApiError> {
            Err(flare_api::ApiError::not_found("no images here"))
        }
        fn blob_store(&self) -> std::sync::Arc<dyn flare_cas::BlobStore> {
            self.0.clone()
        }
    }

    async fn raw(api: &axum::Router, req: Request<Body>) -> (StatusCode, Vec<u8>) {
        let resp = api.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        (status, axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap().to_vec())
    }

    /// Commits with blobs and chunks, streamed reads, per-file merges, the container's
    /// piece uploads, and a full disk: the commit fails and the version stays.
    #[tokio::test]
    async fn commits_reads_and_a_full_disk() {
        use flare_cas::BlobStore as _;
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(flare_store::SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let cp = crate::ControlPlane::new(store, dir.path()).unwrap();
        let blobs = std::sync::Arc::new(Fillable {
            inner: flare_cas::LocalStore::open(&dir.path().join("cas")).unwrap(),
            full: false.into(),
        });
        cp.set_image_service(std::sync::Arc::new(Blobs(blobs.clone())));
        let api = harden(router(cp.clone()), &cp, SitePolicy::default());
        let (_, v) =
            call(&api, "POST", "/v1/volumes", Some(json!({"name": "data", "create_if_missing": true}))).await;
        let id = v["volume_id"].as_str().unwrap().to_string();
        let p = |op: &str| format!("/v1/volumes/{id}/{op}");

        let small = b"hello volume".to_vec();
        let ds = blobs.put(&small).unwrap();
        // A file in pieces (as a container uploads it): 9 MiB of three pieces.
        let mut chunks = Vec::new();
        let mut whole = Vec::new();
        for i in 0..3u8 {
            let piece = vec![i; 3 << 20];
            let req = Request::builder()
                .method("POST")
                .uri(p("blobs"))
                .header("host", "127.0.0.1")
                .header("content-type", "application/octet-stream")
                .header("content-length", piece.len().to_string())
                .body(Body::from(piece.clone()))
                .unwrap();
            let (s, body) = raw(&api, req).await;
            assert_eq!(s, StatusCode::OK);
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["digest"].as_str().unwrap(), flare_cas::Digest::of(&piece).to_string());
            chunks.push(json!({"digest": v["digest"], "len": piece.len()}));
            whole.extend_from_slice(&piece);
        }
        let (s, v) = call(
            &api,
            "POST",
            &p("commit"),
            Some(json!({"base_version": 0, "put": [
                {"path": "/a/small.txt", "size": small.len(), "blob": ds.to_string()},
                {"path": "big.bin", "size": whole.len(), "chunks": chunks, "mode": 0o600},
                {"path": "empty", "size": 0},
            ]})),
        )
        .await;
        assert_eq!((s, &v["version"]), (StatusCode::OK, &json!(1)), "{v}");
        let get = |path: &str| {
            Request::builder()
                .uri(format!("/v1/volumes/{id}/file?path={path}"))
                .header("host", "127.0.0.1")
                .body(Body::empty())
                .unwrap()
        };
        assert_eq!(raw(&api, get("a/small.txt")).await, (StatusCode::OK, small.clone()));
        assert_eq!(raw(&api, get("/big.bin")).await, (StatusCode::OK, whole));
        assert_eq!(raw(&api, get("empty")).await, (StatusCode::OK, Vec::new()));
        assert_eq!(raw(&api, get("nope")).await.0, StatusCode::NOT_FOUND);
        assert_eq!(raw(&api, get("a")).await.0, StatusCode::BAD_REQUEST);
        let (_, v) = call(&api, "GET", &format!("{}?path=/&recursive=true", p("entries")), None).await;
        let listed: Vec<(&str, &str, u64)> = v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["path"].as_str().unwrap(), e["type"].as_str().unwrap(), e["size"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            listed,
            [
                ("a", "directory", 0),
                ("a/small.txt", "file", 12),
                ("big.bin", "file", 9 << 20),
                ("empty", "file", 0)
            ]
        );
        // A blob never uploaded, and a put of an existing file without force.
        let missing = flare_cas::Digest::of(b"never uploaded");
        let (s, v) = call(
            &api,
            "POST",
            &p("commit"),
            Some(json!({"put": [{"path": "x", "size": 14, "blob": missing.to_string()}]})),
        )
        .await;
        assert_eq!(s, StatusCode::PRECONDITION_FAILED, "{v}");
        let (s, v) =
            call(&api, "POST", &p("commit"), Some(json!({"put": [{"path": "empty", "size": 0}]}))).await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        // A full disk: the new manifest cannot be written, the version stays.
        blobs.full.store(true, std::sync::atomic::Ordering::SeqCst);
        let (s, v) = call(&api, "POST", &p("commit"), Some(json!({"remove": [{"path": "empty"}]}))).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("manifest"), "{v}");
        let (_, v) = call(&api, "GET", &format!("/v1/volumes/{id}"), None).await;
        assert_eq!(v["version"], json!(1));
        assert_eq!(raw(&api, get("empty")).await.0, StatusCode::OK);
        blobs.full.store(false, std::sync::atomic::Ordering::SeqCst);
        let (s, v) = call(&api, "POST", &p("commit"), Some(json!({"remove": [{"path": "empty"}]}))).await;
        assert_eq!((s, &v["version"]), (StatusCode::OK, &json!(2)), "{v}");
        let (s, v) = call(&api, "POST", &p("commit"), Some(json!({"remove": [{"path": "empty"}]}))).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().starts_with("no file or directory /empty"), "{v}");
        // Nothing to do: no new version.
        let (_, v) = call(&api, "POST", &p("commit"), Some(json!({}))).await;
        assert_eq!((&v["version"], &v["changed"]), (&json!(2), &json!(false)));
        // gc roots: the current manifest.
        let roots = super::manifest_roots(&*cp.inner.store).unwrap();
        assert_eq!(roots.len(), 1);
    }

    /// Create-or-get by name and the errors that need no blob store.
    #[tokio::test]
    async fn volume_names_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(flare_store::SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let cp = crate::ControlPlane::new(store, dir.path()).unwrap();
        let api = harden(router(cp.clone()), &cp, SitePolicy::default());
        let (s, v) = call(&api, "POST", "/v1/volumes", Some(json!({"name": "data"}))).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("data"), "{v}");
        let (s, v) =
            call(&api, "POST", "/v1/volumes", Some(json!({"name": "data", "create_if_missing": true}))).await;
        assert_eq!((s, &v["created"], &v["version"]), (StatusCode::OK, &json!(true), &json!(0)), "{v}");
        let id = v["volume_id"].as_str().unwrap().to_string();
        let (_, v) = call(&api, "POST", "/v1/volumes", Some(json!({"name": "data"}))).await;
        assert_eq!(v["volume_id"].as_str(), Some(id.as_str()));
        let (s, _) = call(&api, "POST", "/v1/volumes", Some(json!({"name": "a b"}))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let (s, v) = call(
            &api,
            "POST",
            &format!("/v1/volumes/{id}/commit"),
            Some(json!({"put": [{"path": "../etc/passwd", "size": 0}]})),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        let (s, _) = call(&api, "GET", &format!("/v1/volumes/{id}"), None).await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = call(&api, "DELETE", &format!("/v1/volumes/{id}"), None).await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = call(&api, "GET", &format!("/v1/volumes/{id}"), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
}

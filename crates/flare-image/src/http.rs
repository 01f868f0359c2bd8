//! The image HTTP API (`docs/IMAGES.md`): uploads by digest, builds streamed as NDJSON,
//! listing and inspecting images. Merged into the control plane's router by `flared`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use flare_api::ApiError;
use flare_cas::{get_manifest, shared_bytes, Digest, Manifest};
use flare_proto::ImageMount;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::build::{BuildEvent, Builder};

use crate::spec::{FileEntry, ImageSpec};
use crate::ImageError;

/// Largest upload (one file).
const MAX_UPLOAD: usize = 8 << 30;

struct Err(ApiError);

impl From<ImageError> for Err {
    fn from(e: ImageError) -> Self {
        Err(e.to_api())
    }
}

impl From<ApiError> for Err {
    fn from(e: ApiError) -> Self {
        Err(e)
    }
}

impl IntoResponse for Err {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0.body())).into_response()
    }
}

type R<T> = Result<Json<T>, Err>;

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Err> {
    serde_json::from_slice(body).map_err(|e| Err(ApiError::invalid(format!("invalid request body: {e}"))))
}

fn digest(s: &str) -> Result<Digest, Err> {
    s.parse().map_err(|_| Err(ApiError::invalid(format!("bad digest {s:?} (expected blake3:<64 hex>)"))))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, Err> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Err(ApiError::internal(e.to_string())))?
        .map_err(Err::from)
}

/// The image routes.
pub fn router(builder: Arc<Builder>) -> Router {
    Router::new()
        .route("/v1/blobs/missing", post(missing))
        .route("/v1/blobs/batch", post(upload_batch))
        .route("/v1/blobs/{digest}", put(upload).get(download))
        .route("/v1/images/build", post(build))
        .route("/v1/images", get(list))
        .route("/v1/images/{image_id}", get(inspect))
        .route("/v1/images/{image_id}/export", get(export))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD))
        .with_state(builder)
}

#[derive(Deserialize)]
struct Missing {
    digests: Vec<String>,
}

/// `POST /v1/blobs/missing`: the digests the server does not have.
#[derive(Serialize)]
struct MissingBlobs {
    missing: Vec<String>,
}

/// `PUT /v1/blobs/{digest}`: what was stored.
#[derive(Serialize)]
struct Uploaded {
    digest: String,
    size: usize,
}

/// `POST /v1/blobs/batch`: how many blobs and bytes were stored.
#[derive(Serialize)]
struct BatchStored {
    stored: usize,
    bytes: usize,
}

/// `GET /v1/images`.
#[derive(Serialize)]
struct ImageList {
    images: Vec<ImageSummary>,
}

/// One image of [`ImageList`]; the sizes are its final layer's.
#[derive(Serialize)]
struct ImageSummary {
    image_id: String,
    created_at: f64,
    description: String,
    layers: usize,
    total_bytes: Option<u64>,
    files: Option<u64>,
    python: Option<String>,
}

/// `GET /v1/images/{image_id}`.
#[derive(Serialize)]
struct ImageDetail {
    image_id: String,
    description: String,
    created_at: f64,
    python: Option<String>,
    env: std::collections::BTreeMap<String, String>,
    workdir: Option<String>,
    mounts: Vec<ImageMount>,
    total_bytes: u64,
    /// Bytes of chunks no other image shares (None: the manifest is gone).
    unique_bytes: Option<u64>,
    files: u64,
    layers: Vec<LayerInfo>,
    shared: Vec<SharedWith>,
}

/// One layer of [`ImageDetail`], base first.
#[derive(Serialize)]
struct LayerInfo {
    index: usize,
    description: String,
    key: String,
    manifest: String,
    files: u64,
    total_bytes: u64,
    added_bytes: u64,
    build_seconds: f64,
    created_at: f64,
}

/// Another image sharing chunks with the inspected one.
#[derive(Serialize)]
struct SharedWith {
    image_id: String,
    bytes: u64,
}

async fn missing(State(b): State<Arc<Builder>>, body: Bytes) -> R<MissingBlobs> {
    let req: Missing = parse(&body)?;
    let digests = req.digests.iter().map(|d| digest(d)).collect::<Result<Vec<_>, _>>()?;
    let missing = blocking(move || {
        let mut out = Vec::new();
        for d in digests {
            if !b.files().has(&d)? {
                out.push(d.to_string());
            }
        }
        Ok(out)
    })
    .await?;
    Ok(Json(MissingBlobs { missing }))
}

async fn upload(State(b): State<Arc<Builder>>, Path(d): Path<String>, body: Bytes) -> R<Uploaded> {
    let d = digest(&d)?;
    let size = body.len();
    blocking(move || b.files().put(&d, &body)).await?;
    Ok(Json(Uploaded { digest: d.to_string(), size }))
}

#[derive(Deserialize)]
struct BatchHeader {
    blobs: Vec<BatchItem>,
}

#[derive(Deserialize)]
struct BatchItem {
    digest: String,
    size: usize,
}

/// Many small files in one request: a JSON header line `{"blobs": [{"digest", "size"}]}`,
/// then the files' bytes back to back in that order. Each is verified like a PUT.
async fn upload_batch(State(b): State<Arc<Builder>>, body: Bytes) -> R<BatchStored> {
    let nl = body
        .iter()
        .position(|&c| c == b'\n')
        .ok_or_else(|| Err(ApiError::invalid("batch upload: no header line")))?;
    let header: BatchHeader = parse(&body[..nl])?;
    let data = body.slice(nl + 1..);
    let total: usize = header.blobs.iter().map(|i| i.size).sum();
    if total != data.len() {
        return std::result::Result::Err(Err(ApiError::invalid(format!(
            "batch upload: the header announces {total} bytes, the body has {}",
            data.len()
        ))));
    }
    let items =
        header.blobs.iter().map(|i| Ok((digest(&i.digest)?, i.size))).collect::<Result<Vec<_>, Err>>()?;
    let n = items.len();
    blocking(move || {
        let mut at = 0;
        for (d, size) in items {
            b.files().put(&d, &data[at..at + size])?;
            at += size;
        }
        b.store().flush()?;
        Ok(())
    })
    .await?;
    Ok(Json(BatchStored { stored: n, bytes: total }))
}

/// A stored blob (whole file or chunk), for workers that do not share the store.
async fn download(State(b): State<Arc<Builder>>, Path(d): Path<String>) -> Result<Response, Err> {
    let d = digest(&d)?;
    let data = blocking(move || b.store().get(&d).map_err(ImageError::from)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

async fn build(State(b): State<Arc<Builder>>, body: Bytes) -> Result<Response, Err> {
    let spec: ImageSpec = parse(&body)?;
    // A spec the server refuses is a 400 before any progress is streamed.
    // (A few path checks and at most two `lstat`s: cheap enough for this task.)
    b.check_spec(&spec).map_err(Err::from)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<BuildEvent>();
    // The build goes on if the client goes away: its layers are cached for next time.
    tokio::spawn(async move {
        let result = b.build(spec, tx.clone()).await;
        // A build parses big file lists and manifests; give the freed heap back so it
        // does not stay in this process (containers are cloned from it).
        flare_runtime::trim_heap();
        if let std::result::Result::Err(e) = result {
            let (message, log_tail) = match &e {
                ImageError::StepFailed { message, log_tail } => (message.clone(), log_tail.clone()),
                other => (other.to_string(), String::new()),
            };
            let code = matches!(e, ImageError::UnknownBase(_)).then(|| "unknown_base".to_owned());
            if code.is_none() {
                tracing::info!(error = %message, "image build failed");
            }
            let _ = tx.send(BuildEvent::Error { index: None, message, log_tail, code });
        }
    });
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
    let lines = tokio_stream::StreamExt::map(stream, |ev| {
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response())
}

async fn list(State(b): State<Arc<Builder>>) -> R<ImageList> {
    let images = blocking(move || {
        let mut out = Vec::new();
        for img in b.records().images()? {
            let last = match img.layers.last() {
                Some(k) => b.records().layer(k)?,
                None => None,
            };
            out.push(ImageSummary {
                layers: img.layers.len(),
                image_id: img.image_id,
                created_at: img.created_at,
                description: img.description,
                total_bytes: last.as_ref().map(|l| l.total_bytes),
                files: last.as_ref().map(|l| l.files),
                python: last.as_ref().and_then(|l| l.config.python.clone()),
            });
        }
        Ok(out)
    })
    .await?;
    Ok(Json(ImageList { images }))
}

async fn inspect(State(b): State<Arc<Builder>>, Path(id): Path<String>) -> R<ImageDetail> {
    let v = blocking(move || inspect_image(&b, &id)).await?;
    Ok(Json(v))
}

fn final_manifest(b: &Builder, layer_key: &str) -> Result<Option<Manifest>, ImageError> {
    let Some(l) = b.records().layer(layer_key)? else { return Ok(None) };
    let d: Digest = l.manifest.parse().map_err(|_| ImageError::Invalid("bad digest".into()))?;
    Ok(Some(get_manifest(b.store().as_ref(), &d)?))
}

fn inspect_image(b: &Builder, id: &str) -> Result<ImageDetail, ImageError> {
    let img = b.records().image(id)?.ok_or_else(|| ImageError::NotFound(format!("image {id} not found")))?;
    let mut layers = Vec::new();
    let mut last = None;
    for (i, k) in img.layers.iter().enumerate() {
        let l = b
            .records()
            .layer(k)?
            .ok_or_else(|| ImageError::NotFound(format!("layer {k} of {id} is gone")))?;
        layers.push(LayerInfo {
            index: i,
            description: l.description.clone(),
            key: l.key.clone(),
            manifest: l.manifest.clone(),
            files: l.files,
            total_bytes: l.total_bytes,
            added_bytes: l.added_bytes,
            build_seconds: l.build_seconds,
            created_at: l.created_at,
        });
        last = Some(l);
    }
    let last = last.ok_or_else(|| ImageError::Invalid(format!("image {id} has no layers")))?;
    let mine = final_manifest(b, &last.key)?;
    let mut shared = Vec::new();
    if let Some(mine) = &mine {
        let mut seen: HashMap<String, ()> = HashMap::new();
        for other in b.records().images()? {
            if other.image_id == img.image_id {
                continue;
            }
            let Some(k) = other.layers.last() else { continue };
            if seen.insert(k.clone(), ()).is_some() {
                continue;
            }
            if let Some(om) = final_manifest(b, k)? {
                let bytes = shared_bytes(mine, &om);
                if bytes > 0 {
                    shared.push(SharedWith { image_id: other.image_id, bytes });
                }
            }
        }
    }
    let unique = mine.as_ref().map(|m| m.stats().unique_bytes);
    Ok(ImageDetail {
        image_id: img.image_id,
        description: img.description,
        created_at: img.created_at,
        python: last.config.python,
        env: last.config.env.into_iter().collect(),
        workdir: last.config.workdir,
        mounts: img.mounts,
        total_bytes: last.total_bytes,
        unique_bytes: unique,
        files: last.files,
        layers,
        shared,
    })
}

/// Read a file list's files into memory for a code mount (small source files).
pub fn mount_files(b: &Builder, entries: &Value) -> Result<Vec<flare_api::MountFile>, ApiError> {
    let entries: Vec<FileEntry> = serde_json::from_value(entries.clone())
        .map_err(|e| ApiError::invalid(format!("invalid entries: {e}")))?;
    let mut out = Vec::new();
    for e in entries {
        if let FileEntry::File { path, mode, digest: d, size, .. } = e {
            flare_api::validate_relative_path(&path)?;
            let d: Digest = d.parse().map_err(|_| ApiError::invalid(format!("bad digest {d:?}")))?;
            let content = b.files().content(&d, size).map_err(|e| e.to_api())?;
            let mut data = Vec::with_capacity(size as usize);
            flare_cas::write_file_to(b.store().as_ref(), &content, &mut data)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            out.push(flare_api::MountFile { path, data: flare_proto::B64(data.into()), mode });
        }
    }
    Ok(out)
}

/// Writes to a channel, for streaming a response body from a blocking thread.
struct ChannelWriter(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The image's file tree as an uncompressed tar (`docker export` style).
async fn export(State(b): State<Arc<Builder>>, Path(id): Path<String>) -> Result<Response, Err> {
    let b2 = b.clone();
    let manifest = blocking(move || {
        // Not `resolve`: an image without Python exports all the same.
        let (_, layer) = b2.final_layer(&id)?;
        let d: Digest = layer.manifest.parse().map_err(|_| ImageError::Invalid("bad digest".into()))?;
        Ok(get_manifest(b2.store().as_ref(), &d)?)
    })
    .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::task::spawn_blocking(move || {
        let err_tx = tx.clone();
        if let std::result::Result::Err(e) = write_tar(&b, &manifest, ChannelWriter(tx)) {
            tracing::warn!(error = %e, "image export failed");
            let _ = err_tx.blocking_send(std::result::Result::Err(std::io::Error::other(e.to_string())));
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(([(header::CONTENT_TYPE, "application/x-tar")], Body::from_stream(stream)).into_response())
}

fn write_tar(b: &Builder, m: &Manifest, out: ChannelWriter) -> Result<(), ImageError> {
    use flare_cas::EntryKind;
    let mut t = tar::Builder::new(out);
    let io = |e: std::io::Error| ImageError::io("writing the tar stream", e);
    for (path, e) in &m.entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(e.uid.into());
        h.set_gid(e.gid.into());
        h.set_mtime(e.mtime.max(0) as u64);
        match &e.kind {
            EntryKind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                t.append_data(&mut h, format!("{path}/"), std::io::empty()).map_err(io)?;
            }
            EntryKind::Symlink { target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                t.append_link(&mut h, path, target).map_err(io)?;
            }
            EntryKind::File(c) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(c.size);
                let mut data = Vec::with_capacity(c.size as usize);
                flare_cas::write_file_to(b.store().as_ref(), c, &mut data)?;
                t.append_data(&mut h, path, data.as_slice()).map_err(io)?;
            }
        }
    }
    t.finish().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed responses keep the wire names the JSON ones had.
    #[test]
    fn responses_keep_their_wire_names() {
        let v = serde_json::to_value(Uploaded { digest: "blake3:00".into(), size: 3 }).unwrap();
        assert_eq!(v, serde_json::json!({"digest": "blake3:00", "size": 3}));
        let v = serde_json::to_value(BatchStored { stored: 2, bytes: 9 }).unwrap();
        assert_eq!(v, serde_json::json!({"stored": 2, "bytes": 9}));
        let v = serde_json::to_value(MissingBlobs { missing: vec!["blake3:01".into()] }).unwrap();
        assert_eq!(v, serde_json::json!({"missing": ["blake3:01"]}));
        let v = serde_json::to_value(ImageList {
            images: vec![ImageSummary {
                image_id: "im-1".into(),
                created_at: 1.0,
                description: "d".into(),
                layers: 2,
                total_bytes: Some(10),
                files: None,
                python: Some("/usr/bin/python3".into()),
            }],
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"images": [{
                "image_id": "im-1", "created_at": 1.0, "description": "d", "layers": 2,
                "total_bytes": 10, "files": null, "python": "/usr/bin/python3"
            }]})
        );
    }
}

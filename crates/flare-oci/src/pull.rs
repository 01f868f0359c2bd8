//! Pulling an image: manifest (through an index if need be), config, then each layer
//! streamed, verified and unpacked into the blob store, merged in order.

use std::io::{self, Read};

use bytes::{Buf, Bytes};
use flare_cas::{put_manifest, BlobStore, Digest, Manifest};
use http_body_util::BodyExt;
use hyper::header::CONTENT_TYPE;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::client::{read_limited, Client, Session};
use crate::error::{OciError, Result};
use crate::reference::{validate_digest, ImageRef, Platform};
use crate::unpack::{sha256_digest, unpack_layer, Compression, HashingReader, Unpacked};

/// OCI image index.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list (v2 schema 2).
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest (v2 schema 2).
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

const MAX_MANIFEST: usize = 4 << 20;
const MAX_CONFIG: usize = 16 << 20;

/// One layer of a pulled image.
#[derive(Debug, Clone)]
pub struct LayerInfo {
    /// The blob's registry digest (`sha256:...`), verified.
    pub digest: String,
    pub media_type: String,
    /// Bytes transferred (the compressed blob).
    pub compressed_size: u64,
    /// `sha256:...` of the uncompressed tar (checked against the config's `diff_ids`).
    pub diff_id: String,
    pub uncompressed_size: u64,
    /// The layer alone as a stored manifest (whiteouts kept as entries).
    pub manifest_digest: Digest,
    /// Entries in the layer (whiteouts included).
    pub entries: usize,
}

/// The result of [`pull`].
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// What was pulled (as asked for).
    pub reference: ImageRef,
    /// The merged file tree: every layer applied in order, whiteouts resolved.
    pub manifest: Manifest,
    /// Digest of `manifest` as stored in the blob store (via [`flare_cas::put_manifest`]).
    pub manifest_digest: Digest,
    /// The registry's digest of the platform image manifest (`sha256:...`), which a
    /// `name@digest` reference would pin.
    pub image_digest: String,
    /// The image config JSON (`config.Env`, `config.WorkingDir`, `config.Cmd`, ...).
    pub config: serde_json::Value,
    pub layers: Vec<LayerInfo>,
    /// Things skipped on the way (device nodes, fifos, unknown tar entry types).
    pub warnings: Vec<String>,
}

impl PulledImage {
    fn cfg(&self, key: &str) -> Option<&serde_json::Value> {
        self.config.get("config").and_then(|c| c.get(key)).filter(|v| !v.is_null())
    }

    fn strings(&self, key: &str) -> Option<Vec<String>> {
        let list = self.cfg(key)?.as_array()?;
        Some(list.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
    }

    /// `config.Env` as (name, value) pairs, in order.
    pub fn env(&self) -> Vec<(String, String)> {
        self.strings("Env")
            .unwrap_or_default()
            .into_iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (kv, String::new()),
            })
            .collect()
    }

    /// `config.WorkingDir`, if set and non-empty.
    pub fn workdir(&self) -> Option<String> {
        self.cfg("WorkingDir").and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_owned)
    }

    /// `config.Cmd`.
    pub fn cmd(&self) -> Option<Vec<String>> {
        self.strings("Cmd")
    }

    /// `config.Entrypoint`.
    pub fn entrypoint(&self) -> Option<Vec<String>> {
        self.strings("Entrypoint")
    }

    /// `config.User`, if set and non-empty.
    pub fn user(&self) -> Option<String> {
        self.cfg("User").and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_owned)
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<PlatformJson>,
}

#[derive(Debug, Clone, Deserialize)]
struct PlatformJson {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

impl PlatformJson {
    fn display(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

#[derive(Debug, Deserialize)]
struct ImageManifestJson {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct IndexJson {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, PartialEq, Eq)]
enum ManifestKind {
    Index,
    Image,
}

/// Pull `image` for `platform` (use [`Platform::linux_amd64`] normally) into `store`.
///
/// Every manifest and blob is checked against its sha256 digest as it streams in (a
/// mismatching layer is fetched once more, then the pull fails); layers are unpacked as
/// they arrive, so they never sit on disk compressed. Blobs of a layer that fails
/// verification may remain in `store` unreferenced, for garbage collection.
///
/// Must run on a multi-threaded tokio runtime: unpacking writes to `store` synchronously
/// (via `block_in_place`) while the download continues on another worker.
pub async fn pull(
    client: &Client,
    image: &ImageRef,
    store: &dyn BlobStore,
    platform: &Platform,
) -> Result<PulledImage> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {}
        _ => return Err(OciError::Usage("flare_oci::pull needs a multi-threaded tokio runtime".into())),
    }
    let session = client.session(image);
    let (kind, body, digest) = fetch_manifest(&session, image.reference(), image.digest.as_deref()).await?;
    let (body, image_digest) = match kind {
        ManifestKind::Image => (body, digest),
        ManifestKind::Index => {
            let index: IndexJson = serde_json::from_slice(&body).map_err(|e| OciError::Invalid {
                what: format!("image index of {image}"),
                message: e.to_string(),
            })?;
            let chosen = select_platform(image, &index, platform)?;
            let (kind, body, digest) = fetch_manifest(&session, &chosen.digest, Some(&chosen.digest)).await?;
            if kind != ManifestKind::Image {
                return Err(OciError::UnsupportedMediaType {
                    what: format!("{platform} entry of {image}'s index (nested indexes are not supported)"),
                    media_type: chosen.media_type.clone(),
                });
            }
            (body, digest)
        }
    };
    let manifest: ImageManifestJson = serde_json::from_slice(&body).map_err(|e| OciError::Invalid {
        what: format!("image manifest of {image}"),
        message: e.to_string(),
    })?;

    let config_bytes = fetch_blob(&session, &manifest.config, MAX_CONFIG, "image config").await?;
    let config: serde_json::Value = serde_json::from_slice(&config_bytes).map_err(|e| OciError::Invalid {
        what: format!("image config of {image}"),
        message: e.to_string(),
    })?;
    let diff_ids: Option<Vec<String>> = config
        .pointer("/rootfs/diff_ids")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|d| d.as_str().map(str::to_owned)).collect());
    if let Some(ids) = &diff_ids {
        if ids.len() != manifest.layers.len() {
            return Err(OciError::Invalid {
                what: format!("image config of {image}"),
                message: format!("{} diff_ids for {} layers", ids.len(), manifest.layers.len()),
            });
        }
    }

    let mut merged = Manifest::new();
    let mut layers = Vec::with_capacity(manifest.layers.len());
    let mut warnings = Vec::new();
    for (i, desc) in manifest.layers.iter().enumerate() {
        validate_digest(&desc.digest)
            .map_err(|message| OciError::Invalid { what: format!("layer {i} of {image}"), message })?;
        let label = format!("{i} ({})", desc.digest);
        let compression =
            Compression::from_media_type(&desc.media_type).ok_or_else(|| OciError::UnsupportedMediaType {
                what: format!("layer {label} of {image}"),
                media_type: desc.media_type.clone(),
            })?;
        let unpacked = match pull_layer(&session, desc, compression, store, &label, &merged).await {
            Err(e @ (OciError::DigestMismatch { .. } | OciError::SizeMismatch { .. })) => {
                tracing::warn!("{e}; fetching layer {label} of {image} again");
                pull_layer(&session, desc, compression, store, &label, &merged).await?
            }
            other => other?,
        };
        if let Some(expected) = diff_ids.as_ref().and_then(|ids| ids.get(i)) {
            if *expected != unpacked.diff_id {
                return Err(OciError::DigestMismatch {
                    what: format!("uncompressed layer {label} of {image} (config diff_id)"),
                    expected: expected.clone(),
                    actual: unpacked.diff_id,
                });
            }
        }
        let layer_digest = put_manifest(store, &unpacked.manifest)?;
        merged.apply_layer(&unpacked.manifest)?;
        warnings.extend(unpacked.warnings);
        layers.push(LayerInfo {
            digest: desc.digest.clone(),
            media_type: desc.media_type.clone(),
            compressed_size: desc.size,
            diff_id: unpacked.diff_id,
            uncompressed_size: unpacked.uncompressed_size,
            manifest_digest: layer_digest,
            entries: unpacked.manifest.entries.len(),
        });
    }
    let manifest_digest = put_manifest(store, &merged)?;
    Ok(PulledImage {
        reference: image.clone(),
        manifest: merged,
        manifest_digest,
        image_digest,
        config,
        layers,
        warnings,
    })
}

fn select_platform<'a>(image: &ImageRef, index: &'a IndexJson, want: &Platform) -> Result<&'a Descriptor> {
    let matches = |p: &PlatformJson| {
        p.os == want.os
            && p.architecture == want.architecture
            && (want.variant.is_none() || p.variant.as_deref() == want.variant.as_deref())
    };
    index.manifests.iter().find(|d| d.platform.as_ref().is_some_and(matches)).ok_or_else(|| {
        OciError::NoMatchingPlatform {
            reference: image.to_string(),
            wanted: want.to_string(),
            available: index
                .manifests
                .iter()
                .map(|d| {
                    d.platform.as_ref().map_or_else(|| "(no platform)".to_owned(), PlatformJson::display)
                })
                .collect(),
        }
    })
}

/// GET a manifest by tag or digest; returns its kind, bytes and sha256 digest.
async fn fetch_manifest(
    session: &Session,
    reference: &str,
    expect: Option<&str>,
) -> Result<(ManifestKind, Bytes, String)> {
    let image = session.image().to_string();
    let accept = [MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST].join(", ");
    let resp =
        session.get(&format!("manifests/{reference}"), &accept, &format!("manifest {reference}")).await?;
    let content_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_owned())
        .unwrap_or_default();
    let uri: hyper::Uri = format!("manifests/{reference}").parse().unwrap_or_default();
    let body = read_limited(resp.into_body(), MAX_MANIFEST, &uri).await?;
    let digest = sha256_digest(&body);
    if let Some(expect) = expect {
        if digest != expect {
            return Err(OciError::DigestMismatch {
                what: format!("manifest of {image}"),
                expected: expect.into(),
                actual: digest,
            });
        }
    }
    let json: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| OciError::Invalid { what: format!("manifest of {image}"), message: e.to_string() })?;
    let media_type = json.get("mediaType").and_then(|m| m.as_str()).unwrap_or(&content_type).to_owned();
    let kind = match media_type.as_str() {
        MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST => ManifestKind::Index,
        MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST => ManifestKind::Image,
        _ if json.get("schemaVersion").and_then(|v| v.as_u64()) == Some(1) => {
            return Err(OciError::UnsupportedMediaType {
                what: format!("manifest of {image}"),
                media_type: "Docker schema 1 manifest".into(),
            })
        }
        _ if json.get("manifests").is_some() => ManifestKind::Index,
        _ if json.get("layers").is_some() && json.get("config").is_some() => ManifestKind::Image,
        other => {
            return Err(OciError::UnsupportedMediaType {
                what: format!("manifest of {image}"),
                media_type: other.into(),
            })
        }
    };
    Ok((kind, body, digest))
}

/// GET a small blob whole and verify it.
async fn fetch_blob(session: &Session, desc: &Descriptor, limit: usize, what: &str) -> Result<Bytes> {
    let image = session.image().to_string();
    validate_digest(&desc.digest)
        .map_err(|message| OciError::Invalid { what: format!("{what} of {image}"), message })?;
    if desc.size > limit as u64 {
        return Err(OciError::Invalid {
            what: format!("{what} of {image}"),
            message: format!("{} bytes is too large", desc.size),
        });
    }
    let resp = session.get(&format!("blobs/{}", desc.digest), "*/*", what).await?;
    let uri: hyper::Uri = format!("blobs/{}", desc.digest).parse().unwrap_or_default();
    let body = read_limited(resp.into_body(), limit, &uri).await?;
    let digest = sha256_digest(&body);
    if digest != desc.digest {
        return Err(OciError::DigestMismatch {
            what: format!("{what} of {image}"),
            expected: desc.digest.clone(),
            actual: digest,
        });
    }
    if body.len() as u64 != desc.size {
        return Err(OciError::SizeMismatch {
            what: format!("{what} of {image}"),
            expected: desc.size,
            actual: body.len() as u64,
        });
    }
    Ok(body)
}

/// Blocking reader over body chunks sent by the download task.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// Download one layer and unpack it as it arrives; the blob's digest and size are
/// checked at the end (a mismatch wins over whatever unpacking said).
async fn pull_layer(
    session: &Session,
    desc: &Descriptor,
    compression: Compression,
    store: &dyn BlobStore,
    label: &str,
    lower: &Manifest,
) -> Result<Unpacked> {
    let image = session.image().to_string();
    let what = format!("layer {label} of {image}");
    let resp = session.get(&format!("blobs/{}", desc.digest), "*/*", &format!("layer {label}")).await?;
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(32);
    let timeout = session.timeout();
    let limit = desc.size;
    let mut body = resp.into_body();
    let pump = tokio::spawn(async move {
        let mut seen = 0u64;
        loop {
            let item = match tokio::time::timeout(timeout, body.frame()).await {
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        seen += data.len() as u64;
                        if seen > limit {
                            // Stop reading a blob that runs past its size; the count
                            // will not match and the pull reports it.
                            let _ = tx.send(Ok(data)).await;
                            break;
                        }
                        Ok(data)
                    }
                    Err(_) => continue,
                },
                Ok(Some(Err(e))) => Err(io::Error::other(format!("download: {e}"))),
                Ok(None) => break,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no data for {timeout:?}"))),
            };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                break;
            }
        }
    });
    let (unpacked, finished) = tokio::task::block_in_place(|| {
        let mut raw = HashingReader::new(ChannelReader { rx, current: Bytes::new() });
        let unpacked = unpack_layer(&mut raw, compression, store, label, lower);
        // Read (and hash) the rest whatever happened, so corruption reports as such.
        (unpacked, raw.finish())
    });
    pump.abort();
    match finished {
        Ok((digest, size)) => {
            if digest != desc.digest {
                return Err(OciError::DigestMismatch { what, expected: desc.digest.clone(), actual: digest });
            }
            if size != desc.size {
                return Err(OciError::SizeMismatch { what, expected: desc.size, actual: size });
            }
            unpacked
        }
        Err(e) => match unpacked {
            Err(err) => Err(err),
            Ok(_) => {
                Err(OciError::Transport { url: format!("blobs/{}", desc.digest), message: e.to_string() })
            }
        },
    }
}

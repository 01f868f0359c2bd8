//! The layer cache and image records: small JSON files under `<home>/images`, written
//! atomically (temp file + rename), so a crash never leaves half a record.

use std::path::{Path, PathBuf};

use flare_proto::ImageMount;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::ImageError;

/// What a layer leaves for the next one and for containers, besides files.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageConfig {
    /// The Python interpreter found in the tree (absolute path), if any.
    pub python: Option<String>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    /// A captured local environment: these absolute dirs of the image are bound over the
    /// host's system root (no image root).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_roots: Vec<String>,
}

/// One cached layer: the merged tree after a step, keyed by hash(parent, step, inputs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRecord {
    pub key: String,
    pub parent: Option<String>,
    pub description: String,
    /// Digest of the merged tree's manifest.
    pub manifest: String,
    pub config: ImageConfig,
    pub files: u64,
    pub total_bytes: u64,
    /// Bytes of file content this layer added or changed relative to its parent.
    pub added_bytes: u64,
    pub build_seconds: f64,
    pub created_at: f64,
}

/// A built image: its layers (base first) and its start-time mounts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    pub image_id: String,
    pub layers: Vec<String>,
    pub mounts: Vec<ImageMount>,
    pub description: String,
    pub created_at: f64,
}

/// The record directory.
#[derive(Clone)]
pub struct Records {
    root: PathBuf,
}

impl Records {
    pub fn open(root: &Path) -> Result<Records, ImageError> {
        for d in ["layers", "images"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p)
                .map_err(|e| ImageError::io(format!("creating {}", p.display()), e))?;
        }
        Ok(Records { root: root.to_path_buf() })
    }

    fn path(&self, kind: &str, id: &str) -> Result<PathBuf, ImageError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(ImageError::NotFound(format!("no image or layer {id:?}")));
        }
        Ok(self.root.join(kind).join(format!("{id}.json")))
    }

    fn read<T: DeserializeOwned>(&self, kind: &str, id: &str) -> Result<Option<T>, ImageError> {
        let p = self.path(kind, id)?;
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b)
                    .map_err(|e| ImageError::Invalid(format!("record {}: {e}", p.display())))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io(format!("reading {}", p.display()), e)),
        }
    }

    fn write<T: Serialize>(&self, kind: &str, id: &str, v: &T) -> Result<(), ImageError> {
        let p = self.path(kind, id)?;
        let tmp = p.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
        let b = serde_json::to_vec_pretty(v).map_err(|e| ImageError::Invalid(e.to_string()))?;
        std::fs::write(&tmp, b).map_err(|e| ImageError::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &p).map_err(|e| ImageError::io(format!("renaming {}", tmp.display()), e))
    }

    fn key_id(key: &str) -> &str {
        key.strip_prefix("blake3:").unwrap_or(key)
    }

    pub fn layer(&self, key: &str) -> Result<Option<LayerRecord>, ImageError> {
        self.read("layers", Self::key_id(key))
    }

    pub fn put_layer(&self, rec: &LayerRecord) -> Result<(), ImageError> {
        self.write("layers", Self::key_id(&rec.key), rec)
    }

    pub fn image(&self, id: &str) -> Result<Option<ImageRecord>, ImageError> {
        self.read("images", id)
    }

    pub fn put_image(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        self.write("images", &rec.image_id, rec)
    }

    /// Every record of `kind` (`layers` or `images`).
    fn all<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<T>, ImageError> {
        let dir = self.root.join(kind);
        let listing = |e: std::io::Error| ImageError::io(format!("listing {}", dir.display()), e);
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(listing)? {
            let name = e.map_err(listing)?.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json") {
                if let Some(r) = self.read(kind, id)? {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// All image records, newest first.
    pub fn images(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let mut out: Vec<ImageRecord> = self.all("images")?;
        out.sort_by(|a, b| b.created_at.total_cmp(&a.created_at));
        Ok(out)
    }

    /// Manifest digests referenced by any layer (garbage collection roots).
    pub fn manifest_roots(&self) -> Result<Vec<String>, ImageError> {
        Ok(self.all::<LayerRecord>("layers")?.into_iter().map(|r| r.manifest).collect())
    }
}

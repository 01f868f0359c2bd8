//! Pull container images from OCI / Docker distribution registries into Flare's
//! content-addressed store.
//!
//! ```no_run
//! # async fn f(store: &dyn flare_cas::BlobStore) -> flare_oci::Result<()> {
//! use flare_oci::{pull, Client, ImageRef, Platform};
//! let image = ImageRef::parse("debian:bookworm-slim")?;
//! let pulled = pull(&Client::new(), &image, store, &Platform::linux_amd64()).await?;
//! println!("{} entries, stored as {}", pulled.manifest.entries.len(), pulled.manifest_digest);
//! # Ok(()) }
//! ```
//!
//! What it does: `GET /v2/<name>/manifests/<ref>` accepting OCI and Docker v2 manifests
//! and indexes, picks the wanted platform from an index, fetches the config, then streams
//! each layer (uncompressed, gzip or zstd) through a sha256 check and a tar reader into
//! the store, one per-layer [`flare_cas::Manifest`] each, merged in order with OCI
//! whiteouts. Anonymous first; a 401 with a Bearer challenge gets a token (with basic
//! credentials if configured) and the request is retried.

mod client;
mod error;
mod pull;
mod reference;
mod unpack;

pub use client::{Client, Credentials};
pub use error::{OciError, Result};
pub use pull::{
    pull, LayerInfo, PulledImage, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
};
pub use reference::{ImageRef, Platform, DEFAULT_REGISTRY, DEFAULT_TAG};
pub use unpack::Compression;

//! Errors of a pull.

use flare_cas::CasError;

/// Everything that can go wrong pulling an image.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The image reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    /// The registry does not know the repository, tag or digest.
    #[error("image not found: {reference} ({detail})")]
    NotFound { reference: String, detail: String },

    /// The registry (or its token service) refused our credentials or anonymous access.
    #[error("auth refused by {registry} for {reference}: {detail}")]
    AuthRefused { registry: String, reference: String, detail: String },

    /// A blob or manifest did not hash to the digest it was asked for by.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch { what: String, expected: String, actual: String },

    /// A blob had a different size than its descriptor says.
    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch { what: String, expected: u64, actual: u64 },

    /// An image index has no manifest for the wanted platform.
    #[error("{reference} has no image for platform {wanted} (available: {})", if available.is_empty() { "none".to_owned() } else { available.join(", ") })]
    NoMatchingPlatform { reference: String, wanted: String, available: Vec<String> },

    /// A manifest or layer media type this client does not handle.
    #[error("unsupported media type {media_type:?} for {what}")]
    UnsupportedMediaType { what: String, media_type: String },

    /// A layer entry whose path (or hardlink target) would escape the image root.
    #[error("layer {layer}: unsafe path {path:?} rejected: {reason}")]
    UnsafePath { layer: String, path: String, reason: String },

    /// A layer that cannot be decompressed or unpacked.
    #[error("layer {layer}: {message}")]
    Layer { layer: String, message: String },

    /// A manifest, index or config that does not parse or makes no sense.
    #[error("invalid {what}: {message}")]
    Invalid { what: String, message: String },

    /// The registry answered with an unexpected status.
    #[error("{method} {url}: HTTP {status}: {body}")]
    Http { method: &'static str, url: String, status: u16, body: String },

    /// The registry could not be reached, or the connection broke.
    #[error("{url}: {message}")]
    Transport { url: String, message: String },

    /// Storing into the content-addressed store failed.
    #[error("blob store: {0}")]
    Cas(#[from] CasError),

    /// The pull was called in a way it cannot run (e.g. on a current-thread runtime).
    #[error("{0}")]
    Usage(String),
}

/// Result of this crate.
pub type Result<T, E = OciError> = std::result::Result<T, E>;

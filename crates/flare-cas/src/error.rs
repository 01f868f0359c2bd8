//! The crate's error type.

use std::io;
use std::path::PathBuf;

use crate::digest::Digest;

/// Everything that can go wrong in the content-addressed store.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// A digest string that is not `blake3:<64 lowercase hex>`.
    #[error("invalid digest {input:?}: {reason}")]
    InvalidDigest { input: String, reason: String },
    /// The blob is not in the store.
    #[error("blob {digest} not found")]
    NotFound { digest: Digest },
    /// The stored bytes do not hash to their digest. The bad copy has been moved out of
    /// the way, so putting (or refetching) the blob again repairs the store.
    #[error("blob {digest} is corrupt (its content does not match its digest); it was quarantined")]
    Corrupt { digest: Digest },
    /// A read past the end of a blob or file.
    #[error("range {offset}+{len} is outside {what} of {size} bytes")]
    OutOfRange { what: String, offset: u64, len: u64, size: u64 },
    /// A manifest path that is absolute, contains `..`, or is otherwise not normalized.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
    /// A manifest that is structurally wrong (e.g. an entry below a non-directory).
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// A manifest written by a newer (or unknown) format version.
    #[error("unsupported manifest version {found} (this build reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    /// A file name that is not UTF-8 (manifest paths are strings).
    #[error("path {0:?} is not valid UTF-8")]
    NonUtf8Path(PathBuf),
    /// Writing would leave the destination directory.
    #[error("refusing to write {path:?}: {reason}")]
    Escape { path: PathBuf, reason: String },
    /// Manifest (de)serialization.
    #[error("manifest JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// Result alias for this crate.
pub type Result<T, E = CasError> = std::result::Result<T, E>;

/// Build a closure that wraps an `io::Error` with context, for `map_err`.
pub(crate) fn io_ctx<C: Into<String>>(context: C) -> impl FnOnce(io::Error) -> CasError {
    move |source| CasError::Io { context: context.into(), source }
}

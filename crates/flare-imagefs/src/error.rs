//! The crate's error type.

use std::io;
use std::path::PathBuf;

use flare_cas::{CasError, Digest};

/// Everything that can go wrong in the image file system and its chunk cache.
#[derive(Debug, thiserror::Error)]
pub enum ImageFsError {
    /// The blob store failed (unreachable, missing blob, corrupt blob, ...).
    #[error("blob store: {0}")]
    Store(#[from] CasError),
    /// The store returned bytes that do not hash to the requested digest, twice.
    #[error("chunk {digest} from the blob store is corrupt (digest mismatch after a refetch)")]
    Corrupt { digest: Digest },
    /// The store returned a chunk of the wrong length.
    #[error("chunk {digest} is {got} bytes, the manifest says {expected}")]
    WrongLength { digest: Digest, got: u64, expected: u64 },
    /// Another thread's fetch of the same chunk failed (its error, as text).
    #[error("fetching chunk {digest} failed: {message}")]
    FetchFailed { digest: Digest, message: String },
    /// The manifest cannot be served as a file system.
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// Mounting failed.
    #[error("mounting {} failed: {source}", mountpoint.display())]
    Mount {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Unmounting failed.
    #[error("unmounting {} failed: {source}", mountpoint.display())]
    Unmount {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// Result alias for this crate.
pub type Result<T, E = ImageFsError> = std::result::Result<T, E>;

/// Build a closure that wraps an `io::Error` with context, for `map_err`.
pub(crate) fn io_ctx<C: Into<String>>(context: C) -> impl FnOnce(io::Error) -> ImageFsError {
    move |source| ImageFsError::Io { context: context.into(), source }
}

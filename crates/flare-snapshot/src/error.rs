//! Errors of the snapshot crate.

use std::path::PathBuf;

/// What went wrong detecting, dumping or restoring.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// criu is missing, too old or fails `criu check` here; the reason says which.
    #[error("criu is not usable: {0}")]
    Unusable(String),
    /// A criu command failed; `log_tail` holds the end of its log (errors first).
    #[error("criu {action} failed ({status}): {log_tail}")]
    Criu { action: &'static str, status: String, log_tail: String, log: PathBuf },
    /// A criu command did not finish in time (it was killed).
    #[error("criu {action} did not finish within {secs} s")]
    Timeout { action: &'static str, secs: u64 },
    /// The options asked for something this criu or kernel cannot do.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl SnapshotError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> SnapshotError {
        SnapshotError::Io { context: context.into(), source }
    }
}

/// `.ctx(|| "what")` on io results.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, SnapshotError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, SnapshotError> {
        self.map_err(|e| SnapshotError::io(what(), e))
    }
}

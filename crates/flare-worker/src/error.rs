//! The worker's errors: why a container could not be started or run. Their text is what
//! a function's caller reads as the start error.

use flare_runtime::RuntimeError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A host-side step of a container start (sockets, pipes, the pidfd) failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A bind the container needs was refused or is missing on this machine.
    #[error("{0}")]
    Binds(#[source] std::io::Error),
    #[error("this worker cannot run images (no image store configured)")]
    NoImageStore,
    #[error("could not mount image {image_id}: {message}")]
    ImageMount { image_id: String, message: String },
    #[error("image {0} is not mounted on this worker")]
    ImageNotMounted(String),
    #[error("could not start the container: {0}")]
    Spawn(#[source] RuntimeError),
    /// A blocking task of the worker panicked or was cancelled.
    #[error("{what} task: {message}")]
    Task { what: &'static str, message: String },
    #[error("invalid mount id {0:?}")]
    InvalidMountId(String),
    #[error("fetching mount {id}: {message}")]
    FetchMount { id: String, message: String },
    #[error("storing mount {id}: {source}")]
    StoreMount {
        id: String,
        #[source]
        source: std::io::Error,
    },
    /// The runner sent something that breaks the fd-3 protocol.
    #[error("{0}")]
    Protocol(String),
    /// The image store or a lazy image mount failed (`context`: which image or tree).
    #[error("{context}: {message}")]
    Images { context: String, message: String },
    #[error("control plane URL must start with http:// (got {0:?})")]
    ControlUrlScheme(String),
    #[error("invalid control plane URL {url:?}: {message}")]
    ControlUrl { url: String, message: String },
    #[error("bad URL: {0}")]
    BadUrl(String),
    /// The control plane could not be reached (`base`: its URL).
    #[error("{base}: {message}")]
    Unreachable { base: String, message: String },
    /// The control plane answered with an error status.
    #[error("{status}: {body}")]
    HttpStatus { status: axum::http::StatusCode, body: String },
    /// The control plane refused this worker's session (a bad token, or the agent stopped).
    #[error("{0}")]
    Refused(String),
    /// An HTTP request or response body failed.
    #[error("{0}")]
    Http(String),
}

impl WorkerError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        WorkerError::Io { context: context.into(), source }
    }

    pub(crate) fn images(context: impl Into<String>, e: impl std::fmt::Display) -> Self {
        WorkerError::Images { context: context.into(), message: e.to_string() }
    }

    pub(crate) fn task(what: &'static str, e: tokio::task::JoinError) -> Self {
        WorkerError::Task { what, message: e.to_string() }
    }
}

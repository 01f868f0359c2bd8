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
    /// A plain command (a build step, a sandbox) could not be run.
    #[error("{0}")]
    Command(String),
}

impl WorkerError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        WorkerError::Io { context: context.into(), source }
    }

    pub(crate) fn task(what: &'static str, e: tokio::task::JoinError) -> Self {
        WorkerError::Task { what, message: e.to_string() }
    }
}

//! The runtime's error type.

/// Everything that can go wrong while creating, running or removing a container.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The [`crate::ContainerSpec`] (or [`crate::RuntimeConfig`]) is not valid.
    #[error("invalid container spec: {0}")]
    InvalidSpec(String),
    /// A host-side operation (files, cgroups, processes) failed.
    #[error("{context}: {source}")]
    Io {
        /// What the runtime was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A step inside the new container failed before the program was executed.
    #[error("container setup failed at {step}: {}", std::io::Error::from_raw_os_error(*errno))]
    Setup {
        /// Which step failed, e.g. `mount overlay at /.../rootfs`.
        step: String,
        /// The errno the kernel returned.
        errno: i32,
    },
    /// `Network::Nat` was requested but outbound networking is not available on this host.
    #[error("network unavailable: {0}")]
    NetworkUnavailable(String),
    /// The host lacks something the runtime needs (overlayfs, cgroup controllers, ...).
    #[error("unsupported host: {0}")]
    Unsupported(String),
    /// Restoring a checkpointed container failed (the restorer's own message).
    #[error("restore failed: {0}")]
    Restore(String),
    /// The seccomp policy data is invalid.
    #[error("seccomp policy: {0}")]
    Seccomp(String),
}

impl RuntimeError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RuntimeError::Io { context: context.into(), source }
    }
}

/// Attach a context string to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, RuntimeError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, RuntimeError> {
        self.map_err(|e| RuntimeError::io(context(), e))
    }
}

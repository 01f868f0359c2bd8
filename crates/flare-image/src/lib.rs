//! Flare images: the spec the SDK sends ([`spec`]), uploaded files by digest
//! ([`files`]), the layer cache and image records ([`records`]), the builder that runs
//! each step in a flare container and snapshots its overlay upper dir as a layer
//! ([`build`]), and the HTTP API for all of it ([`http`]). See `docs/IMAGES.md`.

pub mod build;
pub mod debian;
pub mod files;
pub mod http;
pub mod layer_disk;
pub mod records;
pub mod spec;
pub mod upper;

pub use build::{
    step_disk_quota_from_env, step_limits_from_env, BuildEvent, Builder, BuilderConfig,
    DEFAULT_STEP_DISK_QUOTA, DEFAULT_STEP_MEMORY,
};

/// Everything that can go wrong with images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("file {0} was not uploaded")]
    MissingBlob(String),
    #[error("{message}")]
    StepFailed { message: String, log_tail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cas(#[from] flare_cas::CasError),
    #[error(transparent)]
    Oci(#[from] flare_oci::OciError),
    #[error("image file system: {0}")]
    ImageFs(#[from] flare_imagefs::ImageFsError),
    #[error("container runtime: {0}")]
    Runtime(#[from] flare_runtime::RuntimeError),
    #[error("{0}")]
    Unavailable(String),
    #[error("unknown local environment {0}: send its file list")]
    UnknownBase(String),
}

impl ImageError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> ImageError {
        ImageError::Io { context: context.into(), source }
    }

    /// The API error a client sees.
    pub fn to_api(&self) -> flare_api::ApiError {
        use flare_api::ApiError;
        match self {
            ImageError::Invalid(_) | ImageError::MissingBlob(_) | ImageError::StepFailed { .. } => {
                ApiError::invalid(self.to_string())
            }
            ImageError::NotFound(_) => ApiError::not_found(self.to_string()),
            ImageError::Oci(flare_oci::OciError::NotFound { .. }) => ApiError::not_found(self.to_string()),
            ImageError::Oci(_) => ApiError::invalid(self.to_string()),
            ImageError::Unavailable(_) => ApiError::unavailable(self.to_string()),
            _ => ApiError::internal(self.to_string()),
        }
    }
}

pub(crate) fn now_ts() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

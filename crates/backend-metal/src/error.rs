//! Load-time errors: what is wrong with the files (`inference-formats`' and
//! `inference-text`'s [`FormatError`]) or what MLX reported while building
//! the model, converted to [`inference_core::Error`] at the crate edge.

use std::path::Path;

use inference_core::Error;
pub use inference_formats::LoadError as FormatError;

/// The name of the backend that runs wherever MLX runs (and that errors
/// from MLX carry).
pub const NAME: &str = "mlx";
/// The name of the backend that runs only on Apple Metal GPUs.
pub const METAL_NAME: &str = "metal";

/// What can go wrong while loading a model on MLX.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The model's files are missing, invalid or unsupported.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// MLX reported an error.
    #[error("mlx: {0}")]
    Mlx(String),
}

impl From<mlx_rs::error::Exception> for LoadError {
    fn from(e: mlx_rs::error::Exception) -> Self {
        LoadError::Mlx(e.to_string())
    }
}

impl LoadError {
    /// The public error for a failed load of `path`.
    pub fn into_error(self, path: &Path) -> Error {
        match self {
            LoadError::Format(e) => e.into_error(path),
            other => Error::model_load(path, other),
        }
    }
}

/// An MLX failure during generation as the public error: MLX's message,
/// without the Rust source location mlx-rs adds to its exceptions
/// (` at …/file.rs:line:column`).
pub(crate) fn mlx_error(e: impl std::fmt::Display) -> Error {
    let text = e.to_string();
    let message = match text.rsplit_once(" at ") {
        Some((what, at)) if at.contains(".rs:") && !at.contains(' ') => what.to_owned(),
        _ => text,
    };
    Error::backend(NAME, message)
}

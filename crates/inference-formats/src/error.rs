//! Errors of reading model files, converted to [`inference_core::Error`] at a
//! backend's edge with [`LoadError::into_error`].

use std::path::Path;

use inference_core::Error;

/// What can go wrong while reading a model from disk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A file could not be read (the I/O error is its source).
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// Something about the files is wrong that no I/O error describes (a
    /// file that is not there, a directory that cannot be listed).
    #[error("{0}")]
    Io(String),
    /// `config.json` is missing fields or has invalid values.
    #[error("config: {0}")]
    Config(String),
    /// The `model_type` is not implemented.
    #[error("unsupported architecture {0:?}")]
    UnsupportedArchitecture(String),
    /// A configuration value this backend does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A weight file is corrupt or truncated.
    #[error("corrupt weights {file}: {reason}")]
    CorruptWeights {
        /// The file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor the model needs is absent.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// A tensor the model does not use is present.
    #[error("unexpected tensor `{0}`")]
    UnexpectedTensor(String),
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    WrongShape {
        /// The tensor.
        name: String,
        /// Its shape on disk.
        found: Vec<i64>,
        /// The shape the config implies.
        expected: Vec<i64>,
    },
    /// A tensor has a dtype this backend cannot load.
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    WrongDtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// The tokenizer files are missing or invalid.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl LoadError {
    /// A [`LoadError::File`] for `path`.
    pub fn file(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        LoadError::File {
            path: path.into(),
            source,
        }
    }

    /// The public error for a failed load of `path`.
    pub fn into_error(self, path: &Path) -> Error {
        match self {
            LoadError::UnsupportedArchitecture(model_type) => {
                Error::UnsupportedArchitecture { model_type }
            }
            LoadError::Unsupported(what) => {
                Error::unsupported(format!("{what} (in {})", path.display()))
            }
            other => Error::model_load(path, other),
        }
    }
}

//! The one error type of the contracts.

use std::path::PathBuf;

/// A boxed error cause that can cross threads.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in inference, for every backend.
///
/// The enum is `#[non_exhaustive]`: match the variants you act on and keep a
/// wildcard arm for the rest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No backend is registered in this binary.
    ///
    /// Registration happens at link time: a binary must reference each backend
    /// crate (for example `use backend_metal as _;`) or the linker drops it.
    #[error("inference: no backends registered (reference a backend crate, e.g. `use backend_metal as _;`)")]
    NoBackends,

    /// Backends are registered, but none of them can run here.
    #[error("inference: no available backend ({details})")]
    NoBackendAvailable {
        /// Each registered backend with the reason it is unavailable.
        details: String,
    },

    /// No backend of this name is registered.
    #[error("inference: backend {name:?} not registered (registered: {registered})")]
    BackendNotRegistered {
        /// The name asked for.
        name: String,
        /// The names that are registered, comma-separated.
        registered: String,
    },

    /// The backend is registered but cannot run on this machine.
    #[error("inference: backend {name:?} not available on this hardware: {reason}")]
    BackendUnavailable {
        /// The backend's name.
        name: String,
        /// Why it is unavailable.
        reason: String,
    },

    /// An option is out of range or inconsistent with another.
    #[error("inference: invalid option `{field}`: {reason}")]
    InvalidOption {
        /// The option's field name, e.g. `top_p`.
        field: &'static str,
        /// What is wrong with its value.
        reason: String,
    },

    /// Input the model cannot take: an empty prompt, an unknown role, etc.
    #[error("inference: invalid input: {0}")]
    InvalidInput(String),

    /// The model could not be loaded.
    #[error("inference: cannot load model {path:?}: {source}")]
    ModelLoad {
        /// The model's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: BoxError,
    },

    /// The model's architecture is not implemented by this backend.
    #[error("inference: unsupported architecture {model_type:?}")]
    UnsupportedArchitecture {
        /// The `model_type` (or GGUF `general.architecture`) found.
        model_type: String,
    },

    /// A feature or option value this backend or model does not implement.
    ///
    /// Returned instead of silently ignoring an option.
    #[error("inference: unsupported: {feature}")]
    Unsupported {
        /// What is unsupported, e.g. `return_logits for generate`.
        feature: String,
    },

    /// The call was cancelled.
    #[error("inference: cancelled")]
    Cancelled,

    /// The prompt plus the requested tokens do not fit in the context.
    #[error("inference: context overflow: {needed} tokens needed, the context holds {limit}")]
    ContextOverflow {
        /// Tokens the call would need (prompt + generated).
        needed: usize,
        /// Tokens the model's context holds.
        limit: usize,
    },

    /// A file could not be written (a full disk, no permission, a missing
    /// directory). Files are written atomically where it matters: what was
    /// at `path` before is still there.
    #[error("inference: cannot write {path:?}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },

    /// The model's queue is full: the call was refused at once rather than
    /// queued (a server answers 429 or 503). Try again later.
    #[error("inference: busy: {waiting} calls are already waiting (the queue holds {limit})")]
    Busy {
        /// Calls waiting when this one came.
        waiting: usize,
        /// The queue's limit.
        limit: usize,
    },

    /// The call waited longer than its time limit before it could start.
    #[error("inference: timed out after {waited_ms} ms waiting for a free slot")]
    Timeout {
        /// How long it waited, in milliseconds.
        waited_ms: u64,
    },

    /// The call needs more KV-cache memory than the model's budget allows,
    /// even running alone.
    #[error("inference: KV memory budget exceeded: {needed} bytes needed, the budget is {budget}")]
    MemoryBudget {
        /// Bytes the call needed.
        needed: u64,
        /// The budget, in bytes.
        budget: u64,
    },

    /// A failure inside a backend.
    #[error("inference: backend {backend:?}: {message}")]
    Backend {
        /// The backend's name.
        backend: String,
        /// What failed.
        message: String,
    },
}

impl Error {
    /// An [`Error::InvalidOption`] for `field`.
    pub fn invalid_option(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidOption {
            field,
            reason: reason.into(),
        }
    }

    /// An [`Error::Unsupported`] naming `feature`.
    pub fn unsupported(feature: impl Into<String>) -> Self {
        Self::Unsupported {
            feature: feature.into(),
        }
    }

    /// An [`Error::ModelLoad`] for `path` caused by `source`.
    pub fn model_load(path: impl Into<PathBuf>, source: impl Into<BoxError>) -> Self {
        Self::ModelLoad {
            path: path.into(),
            source: source.into(),
        }
    }

    /// An [`Error::Backend`] from `backend` with `message`.
    pub fn backend(backend: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Backend {
            backend: backend.into(),
            message: message.into(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

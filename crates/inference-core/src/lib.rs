//! # inference-core
//!
//! The backend-neutral contracts of the inference framework: the [`Backend`]
//! and [`TextModel`] traits, [`TokenStream`] (a blocking iterator and an async
//! stream of [`Token`]s), generation and load options, one typed [`Error`], and
//! a registry of backends collected at link time.
//!
//! Nothing here knows about MLX or any other engine; backends live in their own
//! crates and register themselves with [`register_backend!`].
//!
//! ```no_run
//! use inference_core::{GenerateOptions, LoadOptions, Message};
//! // use backend_metal as _; // link a backend in, or nothing is registered
//!
//! # fn main() -> inference_core::Result<()> {
//! let model = inference_core::load_model("models/Qwen3-0.6B", &LoadOptions::default())?;
//! let opts = GenerateOptions::new().max_tokens(64);
//! for token in model.chat(&[Message::user("What is the capital of France?")], &opts)? {
//!     print!("{}", token?.text);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! See [`registry`] for the linker caveat of link-time registration.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod backend;
#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod model;
mod options;
pub mod registry;
mod stream;
mod tokenizer;
pub mod train;
mod types;

pub use backend::{Availability, Backend, CanLoad, ModelFormat};
pub use error::{BoxError, Error, Result};
pub use model::{ChatSession, HistoryOverflow, TextModel};
pub use options::{DType, GenerateOptions, KvCacheType, LoadOptions, MAX_TOP_LOGPROBS};
pub use registry::{
    backend_for, backends, default_backend, default_backend_for, get, load_model,
    BackendRegistration,
};
pub use stream::{CancelHandle, TokenSink, TokenStream};
pub use tokenizer::{RenderOptions, Tokenizer};
pub use train::{
    Checkpoints, Example, LoraConfig, LrSchedule, Optimizer, ParameterCounts, TrainOptions,
    TrainProgress, TrainSink, TrainStream, Trainable, TrainingData,
};
pub use types::{
    BatchResult, ClassifyResult, FinishReason, FunctionCall, GenerateMetrics, LastMetrics, Message,
    ModelInfo, QueueStatus, Role, Token, TokenId, TokenLogprobs, ToolCall,
};

/// Not public API: what [`register_backend!`] expands to needs.
#[doc(hidden)]
pub mod __private {
    pub use inventory;
}

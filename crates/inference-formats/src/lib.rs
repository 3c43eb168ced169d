//! # inference-formats
//!
//! Model files, for every backend: what is on disk and what it says, with no
//! tensor library involved.
//!
//! - [`gguf`]: the workspace's one GGUF reader ([`gguf::GgufFile`]),
//!   dequantisation of GGML types ([`gguf::quant`]), GGUF file types, and the
//!   mapping of a GGUF model onto a Hugging Face checkpoint
//!   ([`gguf::hf`]: a `config.json` from metadata, tensors under Hugging Face
//!   names with llama.cpp's conventions undone).
//! - [`config`]: Hugging Face `config.json` in all its variants
//!   (transformers 4.x and 5.x keys, multimodal `text_config`, MLX
//!   quantisation) resolved by [`config::HfConfig`] for the model files
//!   that own their configurations.
//! - [`discover`](mod@discover): finding models in a directory, choosing a
//!   directory's safetensors weight files as transformers does, and resolving
//!   the model path a user gives.
//! - [`write`](mod@write): files written atomically (a temporary file renamed over
//!   the target), so a reader never sees half of one.
//! - [`LoadError`]: what can be wrong with a model's files, turned into the
//!   public [`inference_core::Error`] by [`LoadError::into_error`].
//!
//! Tokenizers and chat templates are in `inference-text`.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod adapter;
pub mod config;
pub mod discover;
mod error;
pub mod gguf;
mod mmap;
pub mod write;

pub use discover::{
    discover, resolve_model_path, safetensors_files, DiscoveredModel, ModelFormat,
    WeightFilesError, UNKNOWN_MODEL_TYPE,
};
pub use error::LoadError;
pub use gguf::GgufFileType;
pub use mmap::map_file;

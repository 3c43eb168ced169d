//! The llama.cpp backend of inference-rs: GGUF models through the published
//! [`llama_cpp_2`] crate, which builds llama.cpp from the sources inside
//! `llama-cpp-sys-2` with cmake (a CPU build; the `cuda` and `metal`
//! features build it for a GPU).
//!
//! It registers `llamacpp`. What it shares with the MLX backend comes from
//! the shared crates: our GGUF reader checks a file before llama.cpp parses
//! it (`inference-formats`), the tokenizer and chat template are ours
//! (`inference-text`, from the GGUF metadata, so both backends render and
//! encode the same prompt), and the worker thread, per-step bookkeeping,
//! chat-session history and metrics are `inference-runtime`'s. llama.cpp
//! runs the forward passes and the sampler pieces.
//!
//! Everything of [`TextModel`] is there: generate and chat (streamed),
//! `classify` and `batch_generate` (the prompts decoded together as
//! llama.cpp sequences), chat sessions that keep their KV cache between
//! turns, logprobs and prompt logprobs, every sampling option in the MLX
//! backend's order (see the `sampler` module). Calls on one model queue.
//! Refused with [`Error::Unsupported`](inference_core::Error::Unsupported):
//! `context_len` (a rotating cache), LoRA adapters, `dtype`, memory limits,
//! `parallel_slots > 1`, and `gpu_layers > 0` without a GPU build.
//!
//! Its priority (50) puts it above MLX on the CPU (10) and below MLX on a
//! GPU (100): GGUF files go to llama.cpp unless MLX has a GPU; Hugging Face
//! directories, which this backend cannot load, go to MLX.
//!
//! A binary must reference this crate (`use backend_llamacpp as _;`) for the
//! registration to be linked in.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod decode;
mod engine;
mod options;
mod sampler;
mod session;
mod worker;

use std::path::Path;

use inference_core::{Availability, Backend, CanLoad, LoadOptions, ModelFormat, Result, TextModel};

pub use engine::LlamaCppModel;

/// The name this backend registers under.
pub const NAME: &str = "llamacpp";

/// The `llamacpp` backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct LlamaCppBackend;

impl Backend for LlamaCppBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn available(&self) -> Availability {
        Availability::Available
    }

    fn device(&self) -> String {
        options::DEVICE.to_owned()
    }

    fn priority(&self) -> i32 {
        // Above `mlx` on the CPU (10), below it on a GPU (100).
        50
    }

    fn load_model(&self, path: &Path, opts: &LoadOptions) -> Result<Box<dyn TextModel>> {
        Ok(Box::new(LlamaCppModel::load(path, opts)?))
    }

    fn can_load(&self, path: &Path) -> CanLoad {
        engine::can_load(path)
    }

    fn loads(&self) -> String {
        "GGUF files".to_owned()
    }

    fn formats(&self) -> Vec<ModelFormat> {
        vec![ModelFormat::Gguf]
    }
}

inference_core::register_backend!(|| Box::new(LlamaCppBackend));

//! The llama.cpp backend of inference-rs: GGUF models through the published
//! [`llama_cpp_2`] crate, which builds llama.cpp from the sources inside
//! `llama-cpp-sys-2` with cmake (CPU build).
//!
//! It registers `llamacpp`. What it shares with the MLX backend comes from
//! the shared crates: our GGUF reader checks a file before llama.cpp parses
//! it (`inference-formats`), the tokenizer and chat template are ours
//! (`inference-text`, from the GGUF metadata, so both backends render and
//! encode the same prompt), and the worker thread, per-step bookkeeping and
//! metrics are `inference-runtime`'s. llama.cpp runs the forward passes.
//!
//! This first slice decodes greedily; sampling options, logprobs, penalties,
//! bias, batches, classify and chat sessions answer `Unsupported` until they
//! are wired to llama.cpp's pieces. Its priority is below the MLX backend's,
//! so it is chosen with `LoadOptions::backend("llamacpp")`; the `infer`
//! program does not link it yet.
//!
//! A binary must reference this crate (`use backend_llamacpp as _;`) for the
//! registration to be linked in.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod engine;

use std::path::Path;

use inference_core::{Availability, Backend, CanLoad, LoadOptions, Result, TextModel};

pub use engine::LlamaCppModel;

/// The name this backend registers under.
pub const NAME: &str = "llamacpp";

/// The `llamacpp` backend: llama.cpp on the CPU.
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
        "cpu".to_owned()
    }

    fn priority(&self) -> i32 {
        // Below `mlx` (10 on the CPU) until this backend does all it must.
        5
    }

    fn load_model(&self, path: &Path, opts: &LoadOptions) -> Result<Box<dyn TextModel>> {
        Ok(Box::new(LlamaCppModel::load(path, opts)?))
    }

    fn can_load(&self, path: &Path) -> CanLoad {
        engine::can_load(path)
    }

    fn loads(&self) -> String {
        "GGUF files (greedy decoding so far)".to_owned()
    }
}

inference_core::register_backend!(|| Box::new(LlamaCppBackend));

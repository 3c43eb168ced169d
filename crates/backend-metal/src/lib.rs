//! The MLX backend of inference-rs.
//!
//! It runs Hugging Face models with [MLX] through [`mlx_rs`]: on Apple silicon
//! MLX uses Metal; on Linux it uses an NVIDIA GPU through CUDA when linked
//! against the CUDA build of MLX, and the CPU otherwise. MLX is the prebuilt
//! library of a PyPI wheel, linked through the workspace's own `mlx-sys` crate
//! (see `docs/building.md`; `cargo xtask setup` installs what it needs).
//!
//! Two backends register here:
//!
//! - `mlx`: available wherever the MLX runtime works (Metal, CUDA or CPU); its
//!   device and priority come from the device MLX finds at run time.
//! - `metal`: available only where MLX's GPU is Apple Metal; it always runs on
//!   that GPU.
//!
//! A binary must reference this crate (`use backend_metal as _;`) for the
//! registrations to be linked in.
//!
//! Models: the Qwen3 / Qwen2 / Llama decoder family from Hugging Face
//! safetensors directories (f32, f16, bf16, or MLX affine-quantised).
//!
//! Between logits and text: [`sample`] (the sampling chain, on the device),
//! [`template`] (chat templates with minijinja), [`ModelTokenizer`] (chat
//! encoding without a doubled BOS) and [`StreamDecoder`] (streaming
//! detokenisation that never splits a character).
//!
//! [MLX]: https://github.com/ml-explore/mlx

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod batch;
mod cache;
pub mod device;
mod engine;
mod error;
mod ffi;
mod generate;
pub mod gguf;
mod load;
pub mod memory;
mod models;
pub mod sample;
mod session;
pub mod template;
mod tokenizer;

use std::path::Path;
use std::sync::OnceLock;

use inference_core::{Availability, Backend, LoadOptions, Result, TextModel};

pub use engine::MlxModel;
pub use mlx_rs;
pub use session::IdSession;
pub use tokenizer::{ModelTokenizer, StreamDecoder};

use device::GpuApi;
pub use engine::Placement;

/// Where the `mlx` backend places a model loaded with `opts`: the CPU for
/// `gpu_layers == 0`, MLX's default device otherwise.
pub fn placement_for(opts: &LoadOptions) -> Placement {
    if opts.gpu_layers == 0 {
        Placement::Cpu
    } else {
        Placement::Default
    }
}

/// The name of the backend that runs wherever MLX runs.
pub const NAME: &str = "mlx";
/// The name of the backend that runs only on Apple Metal GPUs.
pub const METAL_NAME: &str = "metal";

/// What MLX reported about this machine, asked once.
fn mlx() -> &'static device::MlxInfo {
    static INFO: OnceLock<device::MlxInfo> = OnceLock::new();
    INFO.get_or_init(device::describe)
}

/// The device string of MLX's default device, e.g. `cuda:0`, `metal:0` or `cpu`.
fn default_device() -> String {
    let info = mlx();
    match (info.default_is_gpu, info.gpu) {
        (true, Some(GpuApi::Metal)) => "metal:0".to_owned(),
        (true, Some(GpuApi::Cuda)) => "cuda:0".to_owned(),
        _ => "cpu".to_owned(),
    }
}

/// The `mlx` backend: MLX on its default device (GPU where there is one).
#[derive(Debug, Clone, Copy, Default)]
pub struct MlxBackend;

impl Backend for MlxBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn available(&self) -> Availability {
        // Linking succeeded, so the runtime is here; a broken one fails to report its version.
        if device::mlx_version().is_some() {
            Availability::Available
        } else {
            Availability::Unavailable("the MLX runtime does not answer (mlx_version failed)".into())
        }
    }

    fn device(&self) -> String {
        default_device()
    }

    fn priority(&self) -> i32 {
        if mlx().default_is_gpu {
            100
        } else {
            10
        }
    }

    fn load_model(&self, path: &Path, opts: &LoadOptions) -> Result<Box<dyn TextModel>> {
        Ok(Box::new(MlxModel::load(path, opts, placement_for(opts))?))
    }
}

/// The `metal` backend: MLX on an Apple Metal GPU, and nowhere else.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetalBackend;

impl Backend for MetalBackend {
    fn name(&self) -> &str {
        METAL_NAME
    }

    fn available(&self) -> Availability {
        match mlx().gpu {
            Some(GpuApi::Metal) => Availability::Available,
            Some(GpuApi::Cuda) => Availability::Unavailable(
                "MLX's GPU here is NVIDIA CUDA, not Apple Metal (use the \"mlx\" backend)".into(),
            ),
            None => Availability::Unavailable(
                "no Apple Metal GPU: MLX runs on the CPU here (use the \"mlx\" backend)".into(),
            ),
        }
    }

    fn device(&self) -> String {
        "metal:0".to_owned()
    }

    fn priority(&self) -> i32 {
        // Above `mlx` on the same GPU: the name says what the user gets.
        110
    }

    fn load_model(&self, path: &Path, opts: &LoadOptions) -> Result<Box<dyn TextModel>> {
        if let Some(reason) = self.available().reason() {
            return Err(inference_core::Error::BackendUnavailable {
                name: METAL_NAME.to_owned(),
                reason: reason.to_owned(),
            });
        }
        let placement = if opts.gpu_layers == 0 {
            Placement::Cpu
        } else {
            Placement::Gpu
        };
        Ok(Box::new(MlxModel::load(path, opts, placement)?))
    }
}

inference_core::register_backend!(|| Box::new(MlxBackend));
inference_core::register_backend!(|| Box::new(MetalBackend));

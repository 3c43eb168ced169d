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
//! Calls on one model run through a scheduler on its worker (continuous
//! batching, see `scheduler.rs`): concurrent calls decode together, each
//! at its own position, joining and leaving between steps.
//!
//! Between logits and text: [`sample`] (the sampling chain, on the device);
//! tokenizers, chat templates, streaming detokenisation and stop strings come
//! from `inference-text`, model files from `inference-formats`.
//!
//! [MLX]: https://github.com/ml-explore/mlx

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod backend;
mod batch;
mod batch_kv;
mod cache;
mod checkpoint;
pub mod device;
mod distributed;
mod engine;
mod error;
mod ffi;
pub mod fuse;
mod generate;
pub mod gguf;
mod load;
pub mod memory;
mod models;
mod prompt_cache;
pub mod sample;
mod save;
mod scheduler;
mod session;
mod train;
mod tune;
mod worker;

pub use backend::{placement_for, MetalBackend, MlxBackend};
pub use engine::{MlxModel, Placement};
pub use error::{METAL_NAME, NAME};
pub use mlx_rs;
pub use models::fused::{check as check_fused_kernels, CheckResult as FusedCheck};
pub use models::fused_gemv::{time as time_gemv_kernels, GemvTiming};
pub use scheduler::SchedulerStats;
pub use session::IdSession;

/// An on/off environment switch: `Some(true)` for `1`, `Some(false)` for
/// `0`, `None` when unset or anything else (the caller's default then).
pub(crate) fn env_switch(name: &str) -> Option<bool> {
    switch_from(name, std::env::var(name).ok().as_deref())
}

/// [`env_switch`] of the value `setting` of the variable `name`: `1` or
/// `0`, spaces around it ignored; anything else is warned of and read as
/// unset.
pub(crate) fn switch_from(name: &str, setting: Option<&str>) -> Option<bool> {
    match setting.map(str::trim)? {
        "1" => Some(true),
        "0" => Some(false),
        other => {
            tracing::warn!("{name}={other:?} is neither 0 nor 1; read as unset");
            None
        }
    }
}

inference_core::register_backend!(|| Box::new(MlxBackend));
inference_core::register_backend!(|| Box::new(MetalBackend));

//! GGUF models on MLX: the tensors that `inference_formats::gguf::hf`
//! converts become MLX weights (`model`), and [`export_mlx_dir`] writes a
//! GGUF model out as an mlx-community style directory. Reading the file, its
//! configuration and its tokenizer is `inference-formats`' and
//! `inference-text`'s work.

mod export;
mod model;

pub use export::{export_mlx_dir, Exported};
pub(crate) use model::weights;

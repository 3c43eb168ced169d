//! Reading models from disk: safetensors weights into MLX arrays (the
//! configuration is `inference_formats::config`'s).

pub mod adapter;
pub mod weights;

use mlx_rs::Dtype;

/// The MLX dtype of a load-option dtype.
pub fn to_mlx_dtype(d: inference_core::DType) -> Dtype {
    match d {
        inference_core::DType::F32 => Dtype::Float32,
        inference_core::DType::F16 => Dtype::Float16,
        inference_core::DType::BF16 => Dtype::Bfloat16,
    }
}

/// A dtype's name as transformers writes it.
pub fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::Float32 => "float32",
        Dtype::Float16 => "float16",
        Dtype::Bfloat16 => "bfloat16",
        Dtype::Float64 => "float64",
        _ => "other",
    }
}

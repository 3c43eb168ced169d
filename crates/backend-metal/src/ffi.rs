//! `unsafe` at the edge of MLX for weights: mapping weight files and handing
//! raw bytes to MLX. (The only other `unsafe` code of the crate is `device`'s
//! queries of MLX's C API.)

use std::fs::File;

use memmap2::Mmap;
use mlx_rs::{Array, Dtype};

/// Maps `file` read-only.
pub fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is read-only; its readers (the safetensors loader and
    // the GGUF reader) bounds-check every range against the mapped length
    // before reading and copy tensors into MLX buffers, so no reference into
    // the map outlives it. Another process truncating the file while it is
    // mapped is the one hazard no mapping can rule out (the same holds for
    // every loader that maps weights, MLX's own included).
    unsafe { Mmap::map(file) }
}

/// An MLX array holding a copy of `bytes`, interpreted as `dtype` in `shape`.
///
/// Fails unless `bytes` holds exactly `shape`'s element count of `dtype`.
pub fn array_from_bytes(bytes: &[u8], shape: &[i32], dtype: Dtype) -> Result<Array, String> {
    let elements = shape.iter().try_fold(1usize, |n, &d| {
        usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
    });
    let expected = elements.and_then(|n| n.checked_mul(item_size(dtype)));
    if expected != Some(bytes.len()) {
        return Err(format!(
            "{} bytes for shape {shape:?} of {dtype:?} ({expected:?} expected)",
            bytes.len()
        ));
    }
    // SAFETY: `bytes` is a live slice of exactly the size that `shape` and
    // `dtype` describe (checked above); MLX copies it into its own buffer
    // before returning, so the array does not borrow the slice.
    Ok(unsafe { Array::from_raw_data(bytes.as_ptr().cast(), shape, dtype) })
}

/// Bytes per element of the dtypes weights come in.
pub fn item_size(dtype: Dtype) -> usize {
    match dtype {
        Dtype::Bool | Dtype::Uint8 | Dtype::Int8 => 1,
        Dtype::Uint16 | Dtype::Int16 | Dtype::Float16 | Dtype::Bfloat16 => 2,
        Dtype::Uint32 | Dtype::Int32 | Dtype::Float32 => 4,
        Dtype::Uint64 | Dtype::Int64 | Dtype::Float64 | Dtype::Complex64 => 8,
    }
}

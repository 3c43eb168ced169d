//! Writing MLX arrays as safetensors files: evaluated, copied out as
//! little-endian bytes, serialised with the `safetensors` crate and written
//! atomically ([`inference_formats::write::write_atomic`]), so a full disk
//! or a crash never leaves half a file where a good one was.

use std::collections::HashMap;
use std::path::Path;

use inference_core::{Error, Result};
use mlx_rs::{Array, Dtype};
use safetensors::tensor::TensorView;
use safetensors::Dtype as StDtype;

use crate::error::mlx_error;

/// An array's safetensors dtype and its elements as little-endian bytes
/// (row-major, whatever the array's strides).
pub fn tensor_bytes(a: &Array) -> Result<(StDtype, Vec<u8>)> {
    fn le<T: mlx_rs::ArrayElement + Copy, const N: usize>(
        a: &Array,
        to: impl Fn(T) -> [u8; N],
    ) -> Result<Vec<u8>> {
        let a = a.contiguous().map_err(mlx_error)?;
        let values = a.try_as_slice::<T>().map_err(mlx_error)?;
        Ok(values.iter().flat_map(|&v| to(v)).collect())
    }
    Ok(match a.dtype() {
        Dtype::Float32 => (StDtype::F32, le(a, f32::to_le_bytes)?),
        Dtype::Float16 => (StDtype::F16, le(a, half::f16::to_le_bytes)?),
        Dtype::Bfloat16 => (StDtype::BF16, le(a, half::bf16::to_le_bytes)?),
        Dtype::Uint32 => (StDtype::U32, le(a, u32::to_le_bytes)?),
        Dtype::Int32 => (StDtype::I32, le(a, i32::to_le_bytes)?),
        Dtype::Int64 => (StDtype::I64, le(a, i64::to_le_bytes)?),
        Dtype::Uint8 => (StDtype::U8, le(a, u8::to_le_bytes)?),
        Dtype::Int8 => (StDtype::I8, le(a, i8::to_le_bytes)?),
        other => {
            return Err(Error::backend(
                crate::NAME,
                format!("cannot write a {other:?} tensor"),
            ))
        }
    })
}

/// The bytes of a safetensors file holding `tensors` (in name order) and
/// `metadata`.
pub fn serialise(
    tensors: &[(String, Array)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let data = tensors
        .iter()
        .map(|(name, a)| Ok((name, a.shape().to_vec(), tensor_bytes(a)?)))
        .collect::<Result<Vec<_>>>()?;
    let views = data
        .iter()
        .map(|(name, shape, (dtype, bytes))| {
            let shape: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
            TensorView::new(*dtype, shape, bytes)
                .map(|v| (name.as_str(), v))
                .map_err(|e| Error::backend(crate::NAME, format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, metadata)
        .map_err(|e| Error::backend(crate::NAME, format!("serialising safetensors: {e}")))
}

/// Writes `tensors` and `metadata` to the safetensors file `path`
/// atomically; a failure is [`Error::Write`] and leaves the file that was
/// there.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Array)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = serialise(tensors, metadata)?;
    write_file(path, &bytes)
}

/// Writes `bytes` to `path` atomically ([`Error::Write`] on failure).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    inference_formats::write::write_atomic(path, bytes)
        .map_err(|(path, source)| Error::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Array::from_slice(&[1.5f32, -2.0, 3.25, 4.0, 5.0, 6.0], &[2, 3]);
        let tensors = vec![
            ("a".to_owned(), a.t()),
            ("b".to_owned(), a.as_dtype(Dtype::Bfloat16).unwrap()),
            ("c".to_owned(), Array::from_slice(&[7u32, 8], &[2])),
        ];
        let meta = HashMap::from([("k".to_owned(), "v".to_owned())]);
        write_safetensors(&path, &tensors, Some(meta)).unwrap();
        let back = Array::load_safetensors(&path).unwrap();
        for (name, want) in &tensors {
            let got = &back[name];
            assert_eq!(got.shape(), want.shape(), "{name}");
            assert_eq!(got.dtype(), want.dtype(), "{name}");
            let (g, w) = (
                got.as_dtype(Dtype::Float32).unwrap(),
                want.as_dtype(Dtype::Float32).unwrap(),
            );
            assert!(g.eq_values(&w).unwrap(), "{name}");
        }
    }
}

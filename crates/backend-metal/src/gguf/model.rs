//! GGUF tensors as MLX weights: `inference_formats::gguf::hf` converts each
//! tensor on the host (Hugging Face names, llama.cpp's conventions undone,
//! affine repacks or f32 values); here they become MLX arrays.

use std::collections::{BTreeMap, HashMap};

use inference_formats::config::Quantization;
use inference_formats::gguf::hf::{convert_tensors, HfTensor};
use inference_formats::gguf::GgufFile;
use inference_formats::LoadError as FormatError;
use mlx_rs::{Array, Dtype};

use crate::error::LoadError;
use crate::ffi;
use crate::load::weights::Weights;

fn array(bytes: &[u8], shape: &[usize], dtype: Dtype, name: &str) -> Result<Array, LoadError> {
    let shape: Vec<i32> = shape
        .iter()
        .map(|&d| {
            i32::try_from(d)
                .map_err(|_| FormatError::Config(format!("tensor `{name}` is too large")))
        })
        .collect::<Result<_, _>>()?;
    ffi::array_from_bytes(bytes, &shape, dtype).map_err(|e| {
        FormatError::CorruptWeights {
            file: "GGUF".into(),
            reason: format!("{name}: {e}"),
        }
        .into()
    })
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The tensors of `file` as weights under Hugging Face names, with the
/// quantisation of each quantised matrix, and the dominant quantisation.
pub fn weights(
    file: &GgufFile,
    architecture: &str,
) -> Result<(Weights, Option<Quantization>), LoadError> {
    let mut tensors: HashMap<String, Array> = HashMap::new();
    let mut quant: HashMap<String, Quantization> = HashMap::new();
    let mut bits_count: BTreeMap<i32, usize> = BTreeMap::new();
    let mut float_dtype = None;
    convert_tensors(file, architecture, |t| -> Result<(), LoadError> {
        match t {
            HfTensor::Affine {
                name,
                rows,
                packed,
                scales,
                biases,
                group_size,
                bits,
            } => {
                let prefix = name.trim_end_matches(".weight").to_owned();
                let words = packed.len() / rows.max(1);
                let groups = scales.len() / rows.max(1);
                tensors.insert(
                    name.clone(),
                    array(&u32_bytes(&packed), &[rows, words], Dtype::Uint32, &name)?,
                );
                tensors.insert(
                    format!("{prefix}.scales"),
                    array(&f32_bytes(&scales), &[rows, groups], Dtype::Float32, &name)?,
                );
                tensors.insert(
                    format!("{prefix}.biases"),
                    array(&f32_bytes(&biases), &[rows, groups], Dtype::Float32, &name)?,
                );
                quant.insert(prefix, Quantization { group_size, bits });
                *bits_count.entry(bits).or_default() += 1;
            }
            HfTensor::Half {
                name,
                shape,
                data,
                bf16,
            } => {
                let dtype = if bf16 {
                    Dtype::Bfloat16
                } else {
                    Dtype::Float16
                };
                float_dtype.get_or_insert(dtype);
                tensors.insert(name.clone(), array(data, &shape, dtype, &name)?);
            }
            HfTensor::F32 {
                name,
                shape,
                values,
            } => {
                float_dtype.get_or_insert(Dtype::Float32);
                tensors.insert(
                    name.clone(),
                    array(&f32_bytes(&values), &shape, Dtype::Float32, &name)?,
                );
            }
        }
        Ok(())
    })?;
    let dominant = bits_count
        .into_iter()
        .max_by_key(|&(_, n)| n)
        .map(|(bits, _)| Quantization {
            group_size: 32,
            bits,
        });
    Ok((Weights::from_parts(tensors, quant, float_dtype), dominant))
}

//! Writing GGUF files (version 3): metadata, the tensor table and the
//! tensors' bytes, each aligned as `general.alignment` says (32 by default),
//! streamed to a temporary file that is renamed over the target once
//! complete. With encoders for the two types a fused model is exported in:
//! F16 and Q8_0 (llama.cpp's reference rounding).

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::reader::{GgmlType, MetaValue, GGUF_MAGIC};

/// The default alignment of a GGUF file's tensor data.
const DEFAULT_ALIGNMENT: u64 = 32;

/// A tensor to write: its name, its dimensions in GGUF's order (the
/// fastest-varying first: `[in, out]` for a `[out, in]` matrix), its type,
/// and its bytes, produced when the writer reaches it.
pub struct TensorOut<'a> {
    /// The tensor's name.
    pub name: String,
    /// Dimensions, fastest-varying first.
    pub dims: Vec<u64>,
    /// Its GGML type.
    pub ggml_type: GgmlType,
    /// Its bytes (exactly `ggml_type.bytes_for(elements)` of them).
    pub data: Box<dyn FnOnce() -> Result<Vec<u8>, String> + 'a>,
}

/// What went wrong writing a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A tensor's bytes could not be made, or do not fit its type and shape.
    #[error("tensor `{name}`: {reason}")]
    Tensor {
        /// The tensor.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

fn value_type(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend(x.to_le_bytes()),
        MetaValue::U16(x) => out.extend(x.to_le_bytes()),
        MetaValue::I16(x) => out.extend(x.to_le_bytes()),
        MetaValue::U32(x) => out.extend(x.to_le_bytes()),
        MetaValue::I32(x) => out.extend(x.to_le_bytes()),
        MetaValue::F32(x) => out.extend(x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(items) => {
            // An empty array keeps a type; GGUF readers accept any.
            let ty = items.first().map_or(4, value_type);
            out.extend(ty.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        MetaValue::U64(x) => out.extend(x.to_le_bytes()),
        MetaValue::I64(x) => out.extend(x.to_le_bytes()),
        MetaValue::F64(x) => out.extend(x.to_le_bytes()),
    }
}

fn padding(at: u64, alignment: u64) -> u64 {
    (alignment - at % alignment) % alignment
}

/// Writes a GGUF file at `path` with `metadata` (in key order) and
/// `tensors` (in the order given). The file appears complete or not at
/// all; on an error nothing is left behind.
pub fn write_gguf(
    path: &Path,
    metadata: &BTreeMap<String, MetaValue>,
    tensors: Vec<TensorOut<'_>>,
) -> Result<(), WriteError> {
    let alignment = match metadata.get("general.alignment") {
        Some(MetaValue::U32(a)) if *a > 0 && a.is_power_of_two() => u64::from(*a),
        _ => DEFAULT_ALIGNMENT,
    };
    let tensor_error = |name: &str, reason: String| WriteError::Tensor {
        name: name.to_owned(),
        reason,
    };
    // The header and tables first: the offsets need every tensor's size.
    let mut head = Vec::new();
    head.extend(GGUF_MAGIC);
    head.extend(3u32.to_le_bytes());
    head.extend((tensors.len() as u64).to_le_bytes());
    head.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut head, key);
        head.extend(value_type(value).to_le_bytes());
        put_value(&mut head, value);
    }
    let mut offset = 0u64;
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in &tensors {
        let elements = t.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let size = elements
            .and_then(|n| t.ggml_type.bytes_for(n))
            .ok_or_else(|| {
                tensor_error(
                    &t.name,
                    format!("{:?} does not fit {:?}", t.dims, t.ggml_type),
                )
            })?;
        put_str(&mut head, &t.name);
        head.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            head.extend(d.to_le_bytes());
        }
        head.extend(t.ggml_type.id().to_le_bytes());
        head.extend(offset.to_le_bytes());
        sizes.push(size);
        offset += size + padding(size, alignment);
    }
    let pad = padding(head.len() as u64, alignment);
    head.extend(std::iter::repeat_n(0u8, pad as usize));

    let tmp = crate::write::temporary(path);
    let io = |source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&head).map_err(io)?;
        for (t, size) in tensors.into_iter().zip(sizes) {
            let name = t.name;
            let data = (t.data)().map_err(|reason| tensor_error(&name, reason))?;
            if data.len() as u64 != size {
                return Err(tensor_error(
                    &name,
                    format!("{} bytes where {size} were expected", data.len()),
                ));
            }
            out.write_all(&data).map_err(io)?;
            let pad = padding(size, alignment) as usize;
            out.write_all(&vec![0u8; pad]).map_err(io)?;
        }
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(io)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `values` as F16 bytes.
pub fn encode_f16(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect()
}

/// `values` (a multiple of 32) as Q8_0 blocks, rounded as llama.cpp's
/// `quantize_row_q8_0_ref`: per block of 32, `d = max|x| / 127` (stored as
/// f16) and `q = round(x / d)`.
pub fn encode_q8_0(values: &[f32]) -> Option<Vec<u8>> {
    if values.len() % 32 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for block in values.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&x| (x * id).round() as i8 as u8));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::quant::dequantize;
    use crate::gguf::GgufFile;

    #[test]
    fn a_written_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let values: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 7.0).collect();
        let mut meta = BTreeMap::new();
        meta.insert(
            "general.architecture".to_owned(),
            MetaValue::String("llama".into()),
        );
        meta.insert(
            "tokenizer.ggml.tokens".to_owned(),
            MetaValue::Array(vec![
                MetaValue::String("a".into()),
                MetaValue::String("b".into()),
            ]),
        );
        meta.insert("llama.block_count".to_owned(), MetaValue::U32(1));
        let (v1, v2) = (values.clone(), values.clone());
        let tensors = vec![
            TensorOut {
                name: "a".into(),
                dims: vec![32, 2],
                ggml_type: GgmlType::Q8_0,
                data: Box::new(move || encode_q8_0(&v1).ok_or_else(|| "rows".to_owned())),
            },
            TensorOut {
                name: "b".into(),
                dims: vec![64],
                ggml_type: GgmlType::F16,
                data: Box::new(move || Ok(encode_f16(&v2))),
            },
        ];
        write_gguf(&path, &meta, tensors).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.get_str("general.architecture"), Some("llama"));
        assert_eq!(
            f.get_str_array("tokenizer.ggml.tokens"),
            Some(vec!["a", "b"])
        );
        assert_eq!(f.get_u64("llama.block_count"), Some(1));
        let a = f.tensor("a").unwrap();
        assert_eq!(a.shape(), vec![2, 32]);
        let back = dequantize(GgmlType::Q8_0, f.tensor_data(a).unwrap(), 64).unwrap();
        let step = values.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
        for (x, y) in values.iter().zip(&back) {
            assert!((x - y).abs() <= step, "{x} vs {y}");
        }
        let b = dequantize(
            GgmlType::F16,
            f.tensor_data(f.tensor("b").unwrap()).unwrap(),
            64,
        )
        .unwrap();
        for (x, y) in values.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-3 * x.abs().max(1.0), "{x} vs {y}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A tensor whose bytes fail leaves nothing behind.
        let bad = vec![TensorOut {
            name: "c".into(),
            dims: vec![32],
            ggml_type: GgmlType::Q8_0,
            data: Box::new(|| Err("no values".to_owned())),
        }];
        let e = write_gguf(&dir.path().join("bad.gguf"), &meta, bad).unwrap_err();
        assert!(e.to_string().contains("no values"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

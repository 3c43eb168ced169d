//! Safetensors weights: validated, then copied into MLX arrays.
//!
//! Files are memory-mapped and checked with the `safetensors` crate (header,
//! offsets, sizes) before MLX sees a byte, so a corrupt or truncated file is a
//! typed error naming the file, never an abort or garbage.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use mlx_rs::{Array, Dtype};
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::distributed::{share, Group, Split};
use crate::error::{FormatError, LoadError};
use crate::ffi;
use inference_formats::config::Quantization;

/// Prefixes multimodal checkpoints put before the text model's tensor names.
const TEXT_PREFIXES: &[(&str, &str)] = &[
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", ""),
];

/// Tensors of other modalities, skipped when loading the text model.
const OTHER_MODALITIES: &[&str] = &[
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "audio_tower.",
];

/// The checkpoint's tensors, by (normalised) name. Model code takes what it
/// needs; [`Weights::finish`] then refuses leftovers.
pub struct Weights {
    tensors: HashMap<String, Array>,
    /// Quantisation of individual matrices (by name without `.weight`), where
    /// it differs from the checkpoint's.
    quant: HashMap<String, Quantization>,
    /// The dtype of the floating-point tensors (the first one seen).
    pub float_dtype: Option<Dtype>,
    /// The tensor-parallel group whose share was read, if any.
    group: Option<Rc<Group>>,
}

/// Which share of the split tensors to read: rank `rank` of `size`.
#[derive(Debug, Clone, Copy)]
struct Shard {
    rank: usize,
    size: usize,
}

/// The weight files of a model directory, chosen as transformers and mlx-lm
/// choose them ([`inference_formats::safetensors_files`]).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    Ok(inference_formats::safetensors_files(dir).map_err(FormatError::from)?)
}

fn mlx_dtype(dtype: StDtype) -> Option<Dtype> {
    Some(match dtype {
        StDtype::F32 => Dtype::Float32,
        StDtype::F16 => Dtype::Float16,
        StDtype::BF16 => Dtype::Bfloat16,
        StDtype::U32 => Dtype::Uint32,
        StDtype::I32 => Dtype::Int32,
        StDtype::U8 => Dtype::Uint8,
        StDtype::I8 => Dtype::Int8,
        StDtype::I64 => Dtype::Int64,
        _ => return None,
    })
}

/// A tensor's name in the text model (a multimodal checkpoint's prefixes
/// taken off); `None` for a tensor of another modality.
pub(crate) fn normalise(name: &str) -> Option<String> {
    if OTHER_MODALITIES.iter().any(|p| name.starts_with(p)) {
        return None;
    }
    for (from, to) in TEXT_PREFIXES {
        if let Some(rest) = name.strip_prefix(from) {
            return Some(format!("{to}{rest}"));
        }
    }
    Some(name.to_owned())
}

/// A safetensors file's tensors under their own names, and its metadata.
pub type RawFile = (Vec<(String, Array)>, HashMap<String, String>);

/// Every tensor of the safetensors file `path` under its own name, in the
/// file's order, validated as [`Weights::load_files`] validates them, and
/// the file's metadata.
pub fn read_raw(path: &Path) -> Result<RawFile, LoadError> {
    let mut out = Vec::new();
    let metadata = read_file(path, None, &mut |name, array| {
        out.push((name, array));
        Ok(())
    })?;
    Ok((out, metadata))
}

/// Validates the safetensors file `path`, hands each tensor, copied into an
/// MLX array, to `each` (whose error reason is reported as corruption of
/// the file), and returns the file's metadata. With `shard`, a tensor that
/// tensor parallelism splits ([`Split::of`]) is read as the shard's part
/// alone.
fn read_file(
    path: &Path,
    shard: Option<Shard>,
    each: &mut dyn FnMut(String, Array) -> Result<(), String>,
) -> Result<HashMap<String, String>, LoadError> {
    let file_name = path.display().to_string();
    let corrupt = |reason: String| FormatError::CorruptWeights {
        file: file_name.clone(),
        reason,
    };
    let file = File::open(path).map_err(|e| FormatError::file(path, e))?;
    let map = inference_formats::map_file(&file).map_err(|e| FormatError::file(path, e))?;
    let st = SafeTensors::deserialize(&map).map_err(|e| corrupt(e.to_string()))?;
    for (name, view) in st.tensors() {
        let dtype = mlx_dtype(view.dtype()).ok_or_else(|| FormatError::WrongDtype {
            name: name.clone(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        let shape: Vec<i32> = view
            .shape()
            .iter()
            .map(|&d| {
                i32::try_from(d).map_err(|_| corrupt(format!("tensor `{name}` is too large")))
            })
            .collect::<Result<_, _>>()?;
        let split = shard.and_then(|sh| {
            let key = normalise(&name)?;
            Split::of(&key).map(|split| (sh, split))
        });
        let array = match split {
            None => ffi::array_from_bytes(view.data(), &shape, dtype),
            Some((sh, split)) => {
                let (part, part_shape) = shard_bytes(
                    &name,
                    view.data(),
                    view.shape(),
                    ffi::item_size(dtype),
                    split,
                    sh,
                )
                .map_err(|e| LoadError::Format(FormatError::Config(e)))?;
                ffi::array_from_bytes(&part, &part_shape, dtype)
            }
        }
        .map_err(|e| corrupt(format!("tensor `{name}`: {e}")))?;
        each(name, array).map_err(corrupt)?;
    }
    let (_, header) = SafeTensors::read_metadata(&map).map_err(|e| corrupt(e.to_string()))?;
    Ok(header.metadata().clone().unwrap_or_default())
}

impl Weights {
    /// Reads every weight file of `dir`.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        Self::load_files(&weight_files(dir)?)
    }

    /// Reads the share of `group`'s rank of every weight file of `dir`:
    /// the tensors tensor parallelism splits ([`Split::of`]) as that rank's
    /// part (only those bytes are copied), the others whole.
    pub fn load_sharded(dir: &Path, group: Rc<Group>) -> Result<Self, LoadError> {
        let shard = Shard {
            rank: group.rank() as usize,
            size: group.size() as usize,
        };
        let mut w = Self::read(&weight_files(dir)?, Some(shard))?;
        w.group = Some(group);
        Ok(w)
    }

    /// Reads the safetensors files `files` (validated the same way).
    pub fn load_files(files: &[PathBuf]) -> Result<Self, LoadError> {
        Self::read(files, None)
    }

    fn read(files: &[PathBuf], shard: Option<Shard>) -> Result<Self, LoadError> {
        let mut tensors = HashMap::new();
        let mut float_dtype = None;
        for path in files {
            let mut skipped = 0usize;
            read_file(path, shard, &mut |name, array| {
                let Some(key) = normalise(&name) else {
                    skipped += 1;
                    return Ok(());
                };
                if matches!(
                    array.dtype(),
                    Dtype::Float32 | Dtype::Float16 | Dtype::Bfloat16
                ) {
                    float_dtype.get_or_insert(array.dtype());
                }
                match tensors.insert(key.clone(), array) {
                    Some(_) => Err(format!("tensor `{key}` appears twice")),
                    None => Ok(()),
                }
            })?;
            if skipped > 0 {
                tracing::debug!(file = %path.display(), skipped, "skipped tensors of other modalities");
            }
        }
        Ok(Self {
            tensors,
            quant: HashMap::new(),
            float_dtype,
            group: None,
        })
    }

    /// The group over which the layer `prefix` (a name without `.weight`)
    /// must sum its output: the group the weights were split for, when the
    /// layer's input columns were split ([`Split::Columns`]).
    pub fn reduce_group(&self, prefix: &str) -> Option<Rc<Group>> {
        let group = self.group.as_ref()?;
        (Split::of(&format!("{prefix}.weight")) == Some(Split::Columns)).then(|| Rc::clone(group))
    }

    /// Weights from arrays already in memory, with per-matrix quantisation.
    pub fn from_parts(
        tensors: HashMap<String, Array>,
        quant: HashMap<String, Quantization>,
        float_dtype: Option<Dtype>,
    ) -> Self {
        Self {
            tensors,
            quant,
            float_dtype,
            group: None,
        }
    }

    /// The quantisation of the matrix `prefix` (its name without `.weight`),
    /// when it has its own.
    pub fn quantization_of(&self, prefix: &str) -> Option<Quantization> {
        self.quant.get(prefix).copied()
    }

    /// Whether `name` is present (and not yet taken).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[i32]) -> Result<Array, LoadError> {
        let a = self
            .tensors
            .remove(name)
            .ok_or_else(|| FormatError::MissingTensor(name.to_owned()))?;
        check_shape(name, &a, shape)?;
        Ok(a)
    }

    /// Fails with the first (by name) tensor no model code took.
    pub fn finish(self) -> Result<(), LoadError> {
        let left: BTreeMap<_, _> = self.tensors.into_iter().collect();
        // Rotary caches some exporters save are derived data, not weights.
        match left
            .into_keys()
            .find(|n| !n.ends_with("rotary_emb.inv_freq"))
        {
            Some(name) => Err(FormatError::UnexpectedTensor(name).into()),
            None => Ok(()),
        }
    }
}

/// The bytes and shape of `shard`'s part of the tensor `name` (`data`,
/// shaped `shape`, `item` bytes per element), split `split`: a run of whole
/// rows, or the same columns of every row.
fn shard_bytes(
    name: &str,
    data: &[u8],
    shape: &[usize],
    item: usize,
    split: Split,
    shard: Shard,
) -> Result<(Vec<u8>, Vec<i32>), String> {
    let (lo, hi) = share(name, shape, split, shard.rank, shard.size).map_err(|e| {
        if name.ends_with(".scales") || name.ends_with(".biases") {
            format!(
                "{e}: each rank's input features must be a multiple of the quantisation group size"
            )
        } else {
            e
        }
    })?;
    let dims = |s: &[usize]| -> Result<Vec<i32>, String> {
        s.iter()
            .map(|&d| i32::try_from(d).map_err(|_| format!("tensor `{name}` is too large")))
            .collect()
    };
    let mut part_shape = shape.to_vec();
    match split {
        Split::Rows => {
            let row: usize = shape[1..].iter().product::<usize>() * item;
            part_shape[0] = hi - lo;
            let bytes = data
                .get(lo * row..hi * row)
                .ok_or_else(|| format!("tensor `{name}` is shorter than its shape"))?;
            Ok((bytes.to_vec(), dims(&part_shape)?))
        }
        Split::Columns => {
            if shape.len() != 2 {
                return Err(format!(
                    "tensor `{name}` of shape {shape:?}: only matrices split by columns"
                ));
            }
            let (rows, cols) = (shape[0], shape[1]);
            part_shape[1] = hi - lo;
            let mut bytes = Vec::with_capacity(rows * (hi - lo) * item);
            for r in 0..rows {
                let run = data
                    .get((r * cols + lo) * item..(r * cols + hi) * item)
                    .ok_or_else(|| format!("tensor `{name}` is shorter than its shape"))?;
                bytes.extend_from_slice(run);
            }
            Ok((bytes, dims(&part_shape)?))
        }
    }
}

/// Checks that `a` has `shape`.
pub fn check_shape(name: &str, a: &Array, shape: &[i32]) -> Result<(), LoadError> {
    if a.shape() != shape {
        return Err(LoadError::Format(FormatError::WrongShape {
            name: name.to_owned(),
            found: a.shape().iter().map(|&d| i64::from(d)).collect(),
            expected: shape.iter().map(|&d| i64::from(d)).collect(),
        }));
    }
    Ok(())
}

impl Weights {
    /// The tensors by name and the per-matrix quantisation, for writing out.
    pub fn into_parts(self) -> (HashMap<String, Array>, HashMap<String, Quantization>) {
        (self.tensors, self.quant)
    }

    /// Sets the quantisation of individual matrices, by module path as a
    /// checkpoint's config names them (normalised like tensor names).
    pub fn set_quantization(&mut self, overrides: &[(String, Quantization)]) {
        for (path, q) in overrides {
            if let Some(key) = normalise(path) {
                self.quant.insert(key, *q);
            }
        }
    }

    /// Converts every floating-point tensor to `dtype`.
    pub fn cast_floats(&mut self, dtype: Dtype) -> Result<(), LoadError> {
        for a in self.tensors.values_mut() {
            if matches!(a.dtype(), Dtype::Float32 | Dtype::Float16 | Dtype::Bfloat16)
                && a.dtype() != dtype
            {
                *a = a.as_dtype(dtype)?;
            }
        }
        self.float_dtype = Some(dtype);
        Ok(())
    }

    /// Parameters of the model, quantised weights counted unpacked and their
    /// scales and biases not counted. `bits` is the checkpoint's quantisation.
    pub fn parameter_count(&self, bits: Option<i32>) -> u64 {
        let prefix = |name: &str| {
            name.rsplit_once('.')
                .map_or(String::new(), |(p, _)| p.to_owned())
        };
        let quantised = |p: &str| self.tensors.contains_key(&format!("{p}.scales"));
        self.tensors
            .iter()
            .map(|(name, a)| {
                let p = prefix(name);
                let n = a.size() as u64;
                if !quantised(&p) {
                    return n;
                }
                if name.ends_with(".scales") || name.ends_with(".biases") {
                    return 0;
                }
                match self.quantization_of(&p).map(|q| q.bits).or(bits) {
                    Some(b) if b > 0 && name.ends_with(".weight") => n * 32 / b as u64,
                    _ => n,
                }
            })
            .sum()
    }
}

#[cfg(test)]
mod shard_tests {
    use super::*;

    fn bytes(values: &[u16]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// A rank's part is exactly its rows, or its columns of every row; a
    /// split that does not divide names the tensor and, for quantisation
    /// scales, the group size.
    #[test]
    fn a_shard_reads_its_rows_or_its_columns() {
        // A 4 × 6 matrix of 2-byte elements 0..24.
        let data = bytes(&(0..24).collect::<Vec<u16>>());
        let shard = |rank| Shard { rank, size: 2 };
        let (part, shape) = shard_bytes("w", &data, &[4, 6], 2, Split::Rows, shard(1)).unwrap();
        assert_eq!(shape, [2, 6]);
        assert_eq!(part, bytes(&(12..24).collect::<Vec<u16>>()));
        let (part, shape) = shard_bytes("w", &data, &[4, 6], 2, Split::Columns, shard(1)).unwrap();
        assert_eq!(shape, [4, 3]);
        assert_eq!(part, bytes(&[3, 4, 5, 9, 10, 11, 15, 16, 17, 21, 22, 23]));
        // A bias (1-D) splits by rows.
        let (part, shape) = shard_bytes("b", &data[..8], &[4], 2, Split::Rows, shard(0)).unwrap();
        assert_eq!((part, shape), (data[..4].to_vec(), vec![2]));
        let three = Shard { rank: 0, size: 4 };
        let e = shard_bytes("x.scales", &data, &[4, 6], 2, Split::Columns, three).unwrap_err();
        assert!(e.contains("x.scales") && e.contains("group size"), "{e}");
        let e = shard_bytes("short", &data[..10], &[4, 6], 2, Split::Rows, shard(1)).unwrap_err();
        assert!(e.contains("shorter"), "{e}");
    }
}

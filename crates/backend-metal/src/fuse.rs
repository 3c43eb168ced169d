//! Fusing a LoRA adapter into its base model: each adapted matrix becomes
//! `W + scale · (A B)ᵀ` (mlx-lm's `fuse`), and the result is written as a
//! model directory that this project, mlx-lm and (dense) transformers load.
//!
//! The base may be a Hugging Face directory (dense, or MLX affine-quantised
//! in mlx-community's layout) or a GGUF file (read as [`export_mlx_dir`]
//! reads it). A quantised matrix is dequantised, fused and quantised again
//! with its own bits and group, as mlx-lm does; with
//! [`FuseOptions::dequantize`] every quantised matrix is written dense
//! instead (in its scales' dtype) and `config.json` loses its
//! `quantization`. Tensor names, dtypes and every other file of the base
//! directory are kept.
//!
//! [`export_mlx_dir`]: crate::gguf::export_mlx_dir

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use inference_core::{Error, Result};
use inference_formats::adapter::{adapter_dir, adapter_file, AdapterConfig};
use inference_formats::config::{HfConfig, Quantization};
use mlx_rs::ops::{dequantize, matmul, quantize};
use mlx_rs::{Array, Dtype};
use serde_json::Value;

use crate::error::mlx_error;
use crate::load::weights::{normalise, read_raw, weight_files};
use crate::save::{serialise, write_file};

/// The largest weight file written before the weights are sharded (mlx-lm's
/// and transformers' 5 GB).
const SHARD_BYTES: usize = 5 << 30;

/// Weight files of a base that are not carried over (the fused weights
/// replace them).
const WEIGHT_SUFFIXES: &[&str] = &[".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz"];

/// How to fuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FuseOptions {
    /// Write every quantised matrix dense (in its scales' dtype), so that
    /// tools without MLX quantisation (transformers) load the result.
    pub dequantize: bool,
    /// Also write the fused model as a GGUF file of this type, for
    /// llama.cpp: from a GGUF base (its metadata kept), or from a Hugging
    /// Face directory of Qwen3, Qwen2 or Llama with a byte-level BPE
    /// vocabulary (dense, or quantised with [`dequantize`](Self::dequantize)),
    /// as llama.cpp's converter writes it.
    pub export_gguf: Option<GgufType>,
}

/// The type of an exported GGUF file's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    /// 16-bit floats.
    F16,
    /// llama.cpp's 8-bit blocks of 32 (a matrix whose rows are not a
    /// multiple of 32 long is written as F16).
    Q8_0,
}

impl GgufType {
    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
        }
    }

    /// The type a matrix with rows `cols` long is written in (F16 where a
    /// Q8_0 block of 32 would not fit the rows).
    fn matrix_type(self, cols: usize) -> inference_formats::gguf::GgmlType {
        use inference_formats::gguf::GgmlType;
        match self {
            GgufType::Q8_0 if cols % 32 == 0 => GgmlType::Q8_0,
            _ => GgmlType::F16,
        }
    }

    /// The file's name in the output directory.
    pub fn file_name(self) -> &'static str {
        match self {
            GgufType::F16 => "model-f16.gguf",
            GgufType::Q8_0 => "model-q8_0.gguf",
        }
    }
}

/// What [`fuse`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fused {
    /// Matrices the adapter changed.
    pub fused: usize,
    /// Of those, matrices quantised again after fusing.
    pub requantized: usize,
    /// Quantised matrices written dense ([`FuseOptions::dequantize`]).
    pub dequantized: usize,
    /// The weight files written.
    pub weight_files: Vec<PathBuf>,
    /// The GGUF file written ([`FuseOptions::export_gguf`]).
    pub gguf: Option<PathBuf>,
}

/// A quantised matrix `prefix.{weight,scales,biases}`.
struct Quantized {
    weight: Array,
    scales: Array,
    biases: Array,
    q: Quantization,
}

impl Quantized {
    fn dense(&self) -> Result<Array> {
        dequantize(
            &self.weight,
            &self.scales,
            &self.biases,
            self.q.group_size,
            self.q.bits,
        )
        .map_err(mlx_error)
    }
}

fn invalid(reason: String) -> Error {
    Error::InvalidInput(reason)
}

/// Fuses the adapter at `adapter` (its directory, or a safetensors file in
/// it) into the model at `model`, writing the result to `out` (created; it
/// must not exist or be empty). Errors: a base or adapter that is missing
/// or corrupt, an adapter of another model (a tensor without its base
/// matrix, or of the wrong shape), a `fine_tune_type` other than `lora`, a
/// non-empty `out`, or a failed write.
pub fn fuse(model: &Path, adapter: &Path, out: &Path, opts: &FuseOptions) -> Result<Fused> {
    let model = inference_formats::resolve_model_path(model)?;
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(invalid(format!(
                "{} exists and is not an empty directory",
                out.display()
            )));
        }
    }
    let write_error = |path: &Path, source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    if model.is_file() {
        // A GGUF file: its tensors as an mlx-community directory first.
        let staging = out.join(".gguf-export");
        crate::gguf::export_mlx_dir(&model, &staging)?;
        let result = fuse_dir(&staging, adapter, out, opts);
        let _ = std::fs::remove_dir_all(&staging);
        let (mut result, dense) = result?;
        if let Some(ty) = opts.export_gguf {
            let path = out.join(ty.file_name());
            export_gguf(&model, &dense, ty, &path)?;
            result.gguf = Some(path);
        }
        return Ok(result);
    }
    // Whatever would stop the export stops the fuse before it starts.
    let plan = match opts.export_gguf {
        Some(ty) => Some((ty, hf_gguf_plan(&model, ty, opts.dequantize)?)),
        None => None,
    };
    std::fs::create_dir_all(out).map_err(|e| write_error(out, e))?;
    let mut result = fuse_dir(&model, adapter, out, opts)?.0;
    if let Some((ty, plan)) = plan {
        let path = out.join(ty.file_name());
        export_hf_gguf(out, &plan, ty, &path)?;
        result.gguf = Some(path);
    }
    Ok(result)
}

/// What a GGUF export of a Hugging Face directory writes besides its
/// tensors: the metadata, and the `config.json` it came from.
struct HfGguf {
    metadata: BTreeMap<String, inference_formats::gguf::MetaValue>,
    config: Value,
}

/// The [`HfGguf`] of the Hugging Face model directory `dir` for a file of
/// type `ty` (see [`from_hf`]); refuses a quantised directory unless it is
/// to be written dense (`dense`). The fused directory keeps the base's
/// configuration and tokenizer, so the base's plan serves its export.
///
/// [`from_hf`]: inference_formats::gguf::from_hf
fn hf_gguf_plan(dir: &Path, ty: GgufType, dense: bool) -> Result<HfGguf> {
    use inference_formats::gguf::from_hf;
    let json =
        |name: &str| inference_text::read_json(&dir.join(name)).map_err(|e| e.into_error(dir));
    let config = json("config.json")?
        .ok_or_else(|| invalid(format!("{} has no config.json", dir.display())))?;
    if !dense
        && (config.get("quantization").is_some() || config.get("quantization_config").is_some())
    {
        return Err(Error::unsupported(
            "GGUF export of an MLX-quantised model (fuse with --dequantize, which the export \
             then requantises as it is asked)",
        ));
    }
    let tokenizer = json("tokenizer.json")?
        .ok_or_else(|| invalid(format!("{} has no tokenizer.json", dir.display())))?;
    let tokenizer_config = json("tokenizer_config.json")?;
    let template = inference_text::chat_template_of(dir, tokenizer_config.as_ref())
        .map_err(|e| e.into_error(dir))?;
    let name = dir
        .file_name()
        .map_or_else(|| "model".to_owned(), |n| n.to_string_lossy().into_owned());
    let mut metadata =
        from_hf::model_metadata(&config, ty.file_type(), &name).map_err(|e| e.into_error(dir))?;
    metadata.extend(
        from_hf::tokenizer_metadata(
            &tokenizer,
            tokenizer_config.as_ref(),
            &config,
            template.as_deref(),
        )
        .map_err(|e| e.into_error(dir))?,
    );
    Ok(HfGguf { metadata, config })
}

/// A matrix's f32 `values` encoded as `out_type` (F16 or Q8_0).
fn encode_matrix(
    out_type: inference_formats::gguf::GgmlType,
    values: &[f32],
) -> std::result::Result<Vec<u8>, String> {
    use inference_formats::gguf::writer::{encode_f16, encode_q8_0};
    match out_type {
        inference_formats::gguf::GgmlType::Q8_0 => {
            encode_q8_0(values).ok_or_else(|| "rows not a multiple of 32".to_owned())
        }
        _ => Ok(encode_f16(values)),
    }
}

/// Writes `tensors` and `metadata` as the GGUF file `path`.
fn write_gguf_file(
    path: &Path,
    metadata: &BTreeMap<String, inference_formats::gguf::MetaValue>,
    tensors: Vec<inference_formats::gguf::writer::TensorOut<'_>>,
) -> Result<()> {
    use inference_formats::gguf::writer::{write_gguf, WriteError};
    write_gguf(path, metadata, tensors).map_err(|e| match e {
        WriteError::Io { path, source } => Error::Write { path, source },
        other => Error::backend(crate::NAME, other.to_string()),
    })
}

/// Writes the dense Hugging Face model directory `dir` (Qwen3, Qwen2 or
/// Llama with a byte-level BPE vocabulary, Gemma 3 with its SentencePiece
/// one) as a GGUF file of type `ty` at `path`, as llama.cpp's converter
/// would: `plan`'s metadata (see [`hf_gguf_plan`]), matrices in `ty`, norms
/// and biases in F32 (Gemma's norms with transformers' `1 +` folded in), Llama's Q
/// and K rows permuted into llama.cpp's RoPE layout, no `output.weight`
/// where the embeddings are tied.
fn export_hf_gguf(dir: &Path, plan: &HfGguf, ty: GgufType, path: &Path) -> Result<()> {
    use inference_formats::gguf::writer::TensorOut;
    use inference_formats::gguf::{from_hf, hf, GgmlType, MetaValue};
    let metadata = &plan.metadata;
    // The text model's configuration (a multimodal one's `text_config`).
    let config = inference_formats::config::HfConfig::from_value(&plan.config)
        .map_err(|e| e.into_error(dir))?;
    let count = |key: &str| config.get::<usize>(key).ok().flatten();
    let heads = count("num_attention_heads").unwrap_or(1);
    let kv_heads = count("num_key_value_heads").unwrap_or(heads);
    let arch = match metadata.get("general.architecture") {
        Some(MetaValue::String(a)) => a.as_str(),
        _ => "",
    };
    let (llama, gemma) = (arch == "llama", arch == "gemma3");
    let tied = config
        .get::<bool>("tie_word_embeddings")
        .ok()
        .flatten()
        .unwrap_or(false);
    let tokens = match metadata.get("tokenizer.ggml.tokens") {
        Some(MetaValue::Array(t)) => t.len(),
        _ => 0,
    };
    let mut tensors = Vec::new();
    for file in weight_files(dir).map_err(|e| e.into_error(dir))? {
        for (name, array) in read_raw(&file).map_err(|e| e.into_error(&file))?.0 {
            // A multimodal checkpoint's text model alone (llama.cpp keeps the
            // other modalities in a file of their own).
            let Some(name) = normalise(&name) else {
                continue;
            };
            if name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight") {
                continue;
            }
            let vocab_rows = name == "model.embed_tokens.weight" || name == "lm_head.weight";
            if vocab_rows && array.dim(0) as usize != tokens {
                // llama.cpp would refuse the file: refuse to write it.
                return Err(invalid(format!(
                    "`{name}` has {} rows but the vocabulary written has {tokens} tokens \
                     (`vocab_size` in config.json)",
                    array.dim(0)
                )));
            }
            let gguf = from_hf::gguf_name(&name, gemma).ok_or_else(|| {
                invalid(format!(
                    "{} has tensor `{name}`, which has no GGUF name",
                    dir.display()
                ))
            })?;
            let shape: Vec<usize> = array.shape().iter().map(|&d| d as usize).collect();
            let (out_type, dims) = match shape.as_slice() {
                [n] => (GgmlType::F32, vec![*n as u64]),
                [rows, cols] => (ty.matrix_type(*cols), vec![*cols as u64, *rows as u64]),
                other => {
                    return Err(invalid(format!(
                    "tensor `{name}` has shape {other:?}: a GGUF export takes vectors and matrices"
                )))
                }
            };
            let permute = match name.as_str() {
                n if llama && n.ends_with("self_attn.q_proj.weight") => Some(heads),
                n if llama && n.ends_with("self_attn.k_proj.weight") => Some(kv_heads),
                _ => None,
            };
            // llama.cpp's Gemma multiplies by its norm weights as stored:
            // the converter folds transformers' `1 + w` in.
            let plus_one = gemma && name.ends_with("norm.weight");
            tensors.push(TensorOut {
                name: gguf,
                dims,
                ggml_type: out_type,
                data: Box::new(move || {
                    let values = array
                        .as_dtype(Dtype::Float32)
                        .and_then(|a| {
                            a.eval()?;
                            Ok(a.try_as_slice::<f32>().map(<[f32]>::to_vec))
                        })
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                    let values = match (permute, shape.as_slice()) {
                        (Some(h), [rows, cols]) => {
                            hf::permute_rows(&values, *rows, *cols, h).map_err(|e| e.to_string())?
                        }
                        _ if plus_one => values.iter().map(|w| w + 1.0).collect(),
                        _ => values,
                    };
                    match out_type {
                        GgmlType::F32 => Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
                        _ => encode_matrix(out_type, &values),
                    }
                }),
            });
        }
    }
    write_gguf_file(path, metadata, tensors)
}

/// Writes the GGUF base `base` again at `path` with its matrices in `ty`:
/// the fused ones from `fused` (dense f32, by Hugging Face name without
/// `.weight`; Llama's Q and K rows permuted back into llama.cpp's layout),
/// the others dequantised from the file; every other tensor (norms) and
/// every metadata entry as they were, but `general.file_type`.
fn export_gguf(
    base: &Path,
    fused: &BTreeMap<String, Array>,
    ty: GgufType,
    path: &Path,
) -> Result<()> {
    use inference_formats::gguf::writer::TensorOut;
    use inference_formats::gguf::{hf, quant, GgufFile, MetaValue};
    let file = GgufFile::open(base).map_err(|e| Error::model_load(base, e))?;
    let arch = file
        .get_str("general.architecture")
        .ok_or_else(|| invalid(format!("{} has no architecture", base.display())))?
        .to_owned();
    let gemma = arch.starts_with("gemma");
    let (heads, kv_heads) = hf::head_counts(&file, &arch);
    let mut metadata = file.metadata().clone();
    metadata.insert("general.file_type".into(), MetaValue::U32(ty.file_type()));
    let mut tensors = Vec::with_capacity(file.tensors().len());
    for t in file.tensors() {
        let name = hf::hf_name(&t.name, gemma).ok_or_else(|| {
            invalid(format!(
                "{} has tensor `{}` of no known role",
                base.display(),
                t.name
            ))
        })?;
        let data = file
            .tensor_data(t)
            .map_err(|e| Error::model_load(base, e))?;
        let dims = t.dims.clone();
        let is_matrix = dims.len() == 2 && !name.ends_with("norm.weight");
        if !is_matrix {
            tensors.push(TensorOut {
                name: t.name.clone(),
                dims,
                ggml_type: t.ggml_type,
                data: Box::new(move || Ok(data.to_vec())),
            });
            continue;
        }
        let (cols, rows) = (dims[0] as usize, dims[1] as usize);
        let out_type = ty.matrix_type(cols);
        let prefix = name.strip_suffix(".weight").unwrap_or(&name).to_owned();
        let permute = match prefix.rsplit('.').next() {
            Some("q_proj") if arch == "llama" => Some(heads),
            Some("k_proj") if arch == "llama" => Some(kv_heads),
            _ => None,
        };
        let fused_values = fused.get(&prefix);
        let ggml_type = t.ggml_type;
        tensors.push(TensorOut {
            name: t.name.clone(),
            dims,
            ggml_type: out_type,
            data: Box::new(move || {
                let values = match fused_values {
                    Some(w) => {
                        let w = w.as_dtype(Dtype::Float32).map_err(|e| e.to_string())?;
                        let v = w.try_as_slice::<f32>().map_err(|e| e.to_string())?.to_vec();
                        match permute {
                            Some(h) => {
                                hf::permute_rows(&v, rows, cols, h).map_err(|e| e.to_string())?
                            }
                            None => v,
                        }
                    }
                    None => quant::dequantize(ggml_type, data, rows * cols)
                        .map_err(|e| e.to_string())?,
                };
                encode_matrix(out_type, &values)
            }),
        });
    }
    write_gguf_file(path, &metadata, tensors)
}

/// [`fuse`] from the model directory `base`; also the fused matrices in
/// f32 by name (without `.weight`) when a GGUF export wants them.
fn fuse_dir(
    base: &Path,
    adapter: &Path,
    out: &Path,
    opts: &FuseOptions,
) -> Result<(Fused, BTreeMap<String, Array>)> {
    let config = HfConfig::load(base).map_err(|e| e.into_error(base))?;
    let (quant, overrides) = config.quantization().map_err(|e| e.into_error(base))?;
    let overrides: HashMap<String, Quantization> = overrides.into_iter().collect();
    let files = weight_files(base).map_err(|e| e.into_error(base))?;
    let mut tensors: BTreeMap<String, Array> = BTreeMap::new();
    for file in &files {
        for (name, array) in read_raw(file).map_err(|e| e.into_error(file))?.0 {
            tensors.insert(name, array);
        }
    }

    let adapters = read_adapter(adapter)?;
    let mut result = Fused {
        fused: 0,
        requantized: 0,
        dequantized: 0,
        weight_files: Vec::new(),
        gguf: None,
    };
    let mut dense_fused = BTreeMap::new();
    for (path, (a, b)) in &adapters.pairs {
        let prefix = base_prefix(path, &tensors).ok_or_else(|| {
            invalid(format!(
                "the adapter has `{path}`, which the model at {} has no matrix for",
                base.display()
            ))
        })?;
        let (input, rank) = (a.dim(0), a.dim(1));
        let output = b.dim(1);
        if b.dim(0) != rank {
            return Err(invalid(format!(
                "`{path}`: lora_a is {:?} and lora_b {:?}",
                a.shape(),
                b.shape()
            )));
        }
        // scale · (A B)ᵀ, [out, in], in f32.
        let delta = matmul(
            b.as_dtype(Dtype::Float32).map_err(mlx_error)?.t(),
            a.as_dtype(Dtype::Float32).map_err(mlx_error)?.t(),
        )
        .and_then(|d| d.multiply(Array::from_f32(adapters.scale)))
        .map_err(mlx_error)?;
        let wrong_shape = |found: &[i32]| {
            invalid(format!(
                "`{path}` adapts a [{output}, {input}] matrix; the model's `{prefix}.weight` is {found:?}"
            ))
        };
        match take_quantized(&mut tensors, &prefix, quant, &overrides)? {
            None => {
                let key = format!("{prefix}.weight");
                let w = tensors
                    .remove(&key)
                    .ok_or_else(|| invalid(format!("no `{key}`")))?;
                if w.shape() != [output, input] {
                    return Err(wrong_shape(w.shape()));
                }
                // The f32 sum, back in the matrix's own dtype.
                let dtype = w.dtype();
                let sum = w
                    .as_dtype(Dtype::Float32)
                    .and_then(|w| w.add(&delta))
                    .map_err(mlx_error)?;
                if opts.export_gguf.is_some() {
                    dense_fused.insert(prefix.clone(), sum.clone());
                }
                tensors.insert(key, sum.as_dtype(dtype).map_err(mlx_error)?);
            }
            Some(q) => {
                let dense = q.dense()?;
                if dense.shape() != [output, input] {
                    return Err(wrong_shape(dense.shape()));
                }
                let dtype = q.scales.dtype();
                let sum = dense
                    .as_dtype(Dtype::Float32)
                    .and_then(|w| w.add(&delta))
                    .map_err(mlx_error)?;
                if opts.export_gguf.is_some() {
                    dense_fused.insert(prefix.clone(), sum.clone());
                }
                let fused = sum.as_dtype(dtype).map_err(mlx_error)?;
                if opts.dequantize {
                    tensors.insert(format!("{prefix}.weight"), fused);
                    result.dequantized += 1;
                } else {
                    let (w, s, b) =
                        quantize(&fused, q.q.group_size, q.q.bits).map_err(mlx_error)?;
                    tensors.insert(format!("{prefix}.weight"), w);
                    tensors.insert(format!("{prefix}.scales"), s);
                    tensors.insert(format!("{prefix}.biases"), b);
                    result.requantized += 1;
                }
            }
        }
        result.fused += 1;
    }
    if opts.dequantize {
        let prefixes: Vec<String> = tensors
            .keys()
            .filter_map(|k| k.strip_suffix(".scales"))
            .filter(|p| tensors.contains_key(&format!("{p}.weight")))
            .map(str::to_owned)
            .collect();
        for prefix in prefixes {
            if let Some(q) = take_quantized(&mut tensors, &prefix, quant, &overrides)? {
                tensors.insert(format!("{prefix}.weight"), q.dense()?);
                result.dequantized += 1;
            }
        }
    }

    let quantized_out = tensors.keys().any(|k| k.ends_with(".scales"));
    result.weight_files = write_weights(out, tensors, quantized_out)?;
    copy_other_files(base, out, opts.dequantize)?;
    tracing::info!(
        out = %out.display(),
        fused = result.fused,
        requantized = result.requantized,
        dequantized = result.dequantized,
        "adapter fused"
    );
    Ok((result, dense_fused))
}

/// An adapter's pairs, by module path, and its scale.
struct AdapterTensors {
    pairs: BTreeMap<String, (Array, Array)>,
    scale: f32,
}

/// Reads the adapter at `path` (a directory, or a safetensors file in one).
fn read_adapter(path: &Path) -> Result<AdapterTensors> {
    let dir = adapter_dir(path);
    let config = AdapterConfig::load(dir).map_err(|e| e.into_error(dir))?;
    let file = adapter_file(path);
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    for (name, array) in read_raw(&file).map_err(|e| e.into_error(&file))?.0 {
        if let Some(p) = name.strip_suffix(".lora_a") {
            a.insert(p.to_owned(), array);
        } else if let Some(p) = name.strip_suffix(".lora_b") {
            b.insert(p.to_owned(), array);
        } else {
            return Err(invalid(format!(
                "{} has `{name}`, which is not a LoRA tensor",
                file.display()
            )));
        }
    }
    let mut pairs = BTreeMap::new();
    for (p, la) in a {
        let lb = b.remove(&p).ok_or_else(|| {
            invalid(format!(
                "{} has `{p}.lora_a` without its lora_b",
                file.display()
            ))
        })?;
        if la.ndim() != 2 || lb.ndim() != 2 {
            return Err(invalid(format!("`{p}`: LoRA tensors are matrices")));
        }
        pairs.insert(p, (la, lb));
    }
    if let Some(p) = b.keys().next() {
        return Err(invalid(format!(
            "{} has `{p}.lora_b` without its lora_a",
            file.display()
        )));
    }
    if pairs.is_empty() {
        return Err(invalid(format!(
            "{} has no adapter tensors",
            file.display()
        )));
    }
    Ok(AdapterTensors {
        pairs,
        scale: config.lora.scale,
    })
}

/// The name of the base's matrix that the adapter's `path` (mlx-lm's text
/// model names, `model.layers.N.key`) adapts, under the base's own naming
/// (multimodal checkpoints nest the text model).
fn base_prefix(path: &str, tensors: &BTreeMap<String, Array>) -> Option<String> {
    let mut candidates = vec![path.to_owned(), format!("language_model.{path}")];
    if let Some(rest) = path.strip_prefix("model.") {
        candidates.push(format!("model.language_model.{rest}"));
    }
    candidates
        .into_iter()
        .find(|c| tensors.contains_key(&format!("{c}.weight")))
}

/// Removes the quantised matrix `prefix` from `tensors` (`None`, leaving
/// it, when it is dense). Its bits and group are the configuration's, for
/// the module or the checkpoint, and must fit the stored shapes.
fn take_quantized(
    tensors: &mut BTreeMap<String, Array>,
    prefix: &str,
    quant: Option<Quantization>,
    overrides: &HashMap<String, Quantization>,
) -> Result<Option<Quantized>> {
    let scales_key = format!("{prefix}.scales");
    if !tensors.contains_key(&scales_key) {
        return Ok(None);
    }
    let q = overrides.get(prefix).copied().or(quant).ok_or_else(|| {
        invalid(format!(
            "`{scales_key}` is there but config.json has no `quantization`"
        ))
    })?;
    let mut take = |suffix: &str| {
        let key = format!("{prefix}.{suffix}");
        tensors
            .remove(&key)
            .ok_or_else(|| invalid(format!("no `{key}` beside `{scales_key}`")))
    };
    let weight = take("weight")?;
    let scales = take("scales")?;
    let biases = take("biases")?;
    let input = scales.dim(-1) * q.group_size;
    if weight.dim(-1) * 32 != input * q.bits || biases.shape() != scales.shape() {
        return Err(invalid(format!(
            "`{prefix}` is not {}-bit with groups of {}: weight {:?}, scales {:?}",
            q.bits,
            q.group_size,
            weight.shape(),
            scales.shape()
        )));
    }
    Ok(Some(Quantized {
        weight,
        scales,
        biases,
        q,
    }))
}

/// Writes `tensors` to `out` as `model.safetensors`, or in 5 GB shards with
/// `model.safetensors.index.json` as transformers and mlx-lm name them. The
/// files say `format: mlx` when quantised, `pt` otherwise.
fn write_weights(
    out: &Path,
    tensors: BTreeMap<String, Array>,
    quantized: bool,
) -> Result<Vec<PathBuf>> {
    let format = if quantized { "mlx" } else { "pt" };
    let metadata = || Some(HashMap::from([("format".to_owned(), format.to_owned())]));
    let mut shards: Vec<Vec<(String, Array)>> = vec![Vec::new()];
    let mut size = 0usize;
    let mut total = 0usize;
    for (name, array) in tensors {
        let bytes = array.nbytes();
        if size + bytes > SHARD_BYTES && size > 0 {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        total += bytes;
        if let Some(last) = shards.last_mut() {
            last.push((name, array));
        }
    }
    if shards.len() == 1 {
        let path = out.join("model.safetensors");
        let bytes = serialise(&shards[0], metadata())?;
        write_file(&path, &bytes)?;
        return Ok(vec![path]);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut written = Vec::with_capacity(n);
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let path = out.join(&name);
        write_file(&path, &serialise(shard, metadata())?)?;
        for (tensor, _) in shard {
            weight_map.insert(tensor.clone(), Value::String(name.clone()));
        }
        written.push(path);
    }
    let index = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    write_file(
        &out.join("model.safetensors.index.json"),
        index.to_string().as_bytes(),
    )?;
    Ok(written)
}

/// Copies the base's other files (configuration, tokenizer, template) to
/// `out`; with `dequantized`, `config.json` without its quantisation.
fn copy_other_files(base: &Path, out: &Path, dequantized: bool) -> Result<()> {
    let read_error = |path: &Path, e: std::io::Error| {
        Error::model_load(path, inference_formats::LoadError::file(path, e))
    };
    let entries = std::fs::read_dir(base).map_err(|e| read_error(base, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| read_error(base, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_weights = WEIGHT_SUFFIXES.iter().any(|s| name.ends_with(s))
            || name.ends_with(".safetensors.index.json");
        if !path.is_file() || is_weights || name.starts_with('.') {
            continue;
        }
        let mut bytes = std::fs::read(&path).map_err(|e| read_error(&path, e))?;
        if name == "config.json" && dequantized {
            let mut config: Value = serde_json::from_slice(&bytes)
                .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
            if let Value::Object(c) = &mut config {
                c.remove("quantization");
                c.remove("quantization_config");
            }
            bytes = serde_json::to_vec_pretty(&config)
                .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        }
        write_file(&out.join(&name), &bytes)?;
    }
    Ok(())
}

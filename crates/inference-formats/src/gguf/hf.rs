//! GGUF files as Hugging Face checkpoints: the configuration from metadata
//! (a `config.json` value), the tensors renamed and converted on the host,
//! and llama.cpp's conventions undone. A backend turns the [`HfTensor`]s
//! into its own arrays.
//!
//! - Q4_0, Q4_1 and Q8_0 become MLX affine-quantised weights (group 32)
//!   without loss; F32, F16 and BF16 pass as they are; every other type
//!   (K-quants, Q5_0, Q5_1) is dequantised to f32 (a backend then casts to
//!   the dtype `LoadOptions` asks for).
//! - llama.cpp's converter permutes the rows of Llama-architecture Q and K
//!   projections for its RoPE layout; they are permuted back here.
//! - It stores Gemma norm weights with the `+ 1` folded in; 1 is subtracted
//!   (in f32, as transformers does) so the model's `(1 + w)` gives them back.
//! - Hyper-parameters llama.cpp hard-codes rather than stores take the
//!   architecture's documented defaults: Gemma 3's sliding-window pattern (6),
//!   local RoPE base (10 000) and attention scale (`head_dim^-½`, or
//!   `(hidden / heads)^-½` for the 62-layer 27B shape, as llama.cpp does).

use serde_json::{json, Map, Value};

use super::file_type::GgufFileType;
use super::quant;
use super::reader::{GgmlType, GgufFile};
use crate::error::LoadError;

/// What a GGUF file says of its model before any weights are read: the
/// architecture, the Hugging Face `model_type` for it and a Hugging Face
/// style `config.json`.
#[derive(Debug, Clone)]
pub struct Opened {
    /// `general.architecture`.
    pub architecture: String,
    /// The Hugging Face `model_type`.
    pub model_type: &'static str,
    /// The configuration (vocabulary size from the embedding's rows).
    pub config: Value,
}

/// Reads [`Opened`] from `file`.
pub fn open(file: &GgufFile) -> Result<Opened, LoadError> {
    let architecture = file
        .get_str("general.architecture")
        .ok_or_else(|| LoadError::Config("GGUF has no `general.architecture`".into()))?
        .to_owned();
    let model_type = model_type(&architecture)?;
    let vocab = file
        .tensor("token_embd.weight")
        .and_then(|t| t.shape().first().copied())
        .ok_or_else(|| LoadError::MissingTensor("token_embd.weight".into()))?;
    let config = config_json(file, &architecture, usize_of(vocab, "token_embd.weight")?)?;
    Ok(Opened {
        architecture,
        model_type,
        config,
    })
}

/// The Hugging Face `model_type` of a GGUF `general.architecture`, for the
/// architectures whose tensors [`convert_tensors`] maps.
pub fn model_type(architecture: &str) -> Result<&'static str, LoadError> {
    match architecture {
        "llama" => Ok("llama"),
        "qwen2" => Ok("qwen2"),
        "qwen3" => Ok("qwen3"),
        "gemma3" | "gemma3_text" => Ok("gemma3_text"),
        other => Err(LoadError::UnsupportedArchitecture(other.to_owned())),
    }
}

/// A Hugging Face style `config.json` for the model in `file`.
pub fn config_json(
    file: &GgufFile,
    architecture: &str,
    vocab_size: usize,
) -> Result<Value, LoadError> {
    let model_type = model_type(architecture)?;
    let key = |k: &str| format!("{architecture}.{k}");
    let int = |k: &str| file.get_u64(&key(k));
    let float = |k: &str| file.get_f32(&key(k));
    let need =
        |k: &str| int(k).ok_or_else(|| LoadError::Config(format!("GGUF has no `{}`", key(k))));

    let hidden = need("embedding_length")?;
    let layers = need("block_count")?;
    let heads = need("attention.head_count")?;
    let kv_heads = int("attention.head_count_kv").unwrap_or(heads);
    let mut c = Map::new();
    c.insert("model_type".into(), json!(model_type));
    c.insert("vocab_size".into(), json!(vocab_size));
    c.insert("hidden_size".into(), json!(hidden));
    c.insert(
        "intermediate_size".into(),
        json!(need("feed_forward_length")?),
    );
    c.insert("num_hidden_layers".into(), json!(layers));
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert("num_key_value_heads".into(), json!(kv_heads));
    if let Some(d) = int("attention.key_length") {
        c.insert("head_dim".into(), json!(d));
    } else if let Some(d) = int("rope.dimension_count").filter(|_| model_type != "gemma3_text") {
        c.insert("head_dim".into(), json!(d));
    }
    if let Some(eps) = float("attention.layer_norm_rms_epsilon") {
        c.insert("rms_norm_eps".into(), json!(eps));
    }
    if let Some(n) = int("context_length") {
        c.insert("max_position_embeddings".into(), json!(n));
    }
    if let Some(theta) = float("rope.freq_base") {
        c.insert("rope_theta".into(), json!(theta));
    }
    match file.get_str(&key("rope.scaling.type")) {
        None | Some("none") => {}
        Some("linear") => {
            let factor = float("rope.scaling.factor").unwrap_or(1.0);
            c.insert(
                "rope_scaling".into(),
                json!({"rope_type": "linear", "factor": factor}),
            );
        }
        Some(other) => {
            return Err(LoadError::Unsupported(format!(
                "GGUF rope scaling {other:?}"
            )))
        }
    }
    c.insert(
        "tie_word_embeddings".into(),
        json!(file.tensor("output.weight").is_none()),
    );
    if file.tensor("rope_freqs.weight").is_some() {
        return Err(LoadError::Unsupported(
            "GGUF rope frequency factors (`rope_freqs`, Llama 3.1+ RoPE scaling)".into(),
        ));
    }
    if model_type == "gemma3_text" {
        let window = need("attention.sliding_window")?;
        let head_dim = int("attention.key_length").unwrap_or(256);
        let scalar = if layers == 62 {
            hidden / heads.max(1)
        } else {
            head_dim
        };
        c.insert("sliding_window".into(), json!(window));
        c.insert("sliding_window_pattern".into(), json!(6));
        c.insert("rope_local_base_freq".into(), json!(10_000.0));
        c.insert("query_pre_attn_scalar".into(), json!(scalar));
        if let Some(cap) = float("final_logit_softcapping") {
            c.insert("final_logit_softcapping".into(), json!(cap));
        }
    }
    Ok(Value::Object(c))
}

/// The parts of a decoder layer's tensor names, as (GGUF, Hugging Face):
/// `blk.N.{GGUF}` is `model.layers.N.{Hugging Face}` (but a Gemma's
/// `ffn_norm`, its pre-feed-forward norm). Where two GGUF parts name one
/// Hugging Face part, the first is the one written ([`from_hf`]).
///
/// [`from_hf`]: super::from_hf
pub(crate) const LAYER_TENSORS: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The Hugging Face name of a GGUF tensor (`gemma`: the model is a Gemma,
/// whose `ffn_norm` is the pre-feed-forward norm).
pub fn hf_name(name: &str, gemma: bool) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    let mapped = match stem {
        "token_embd" => "model.embed_tokens".to_owned(),
        "output_norm" => "model.norm".to_owned(),
        "output" => "lm_head".to_owned(),
        "rope_freqs" => "rope_freqs".to_owned(),
        _ => {
            let rest = stem.strip_prefix("blk.")?;
            let (layer, part) = rest.split_once('.')?;
            let part = match part {
                "ffn_norm" if gemma => "pre_feedforward_layernorm",
                _ => LAYER_TENSORS.iter().find(|(g, _)| *g == part)?.1,
            };
            format!("model.layers.{layer}.{part}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

/// Reorders rows `[heads × head_dim, …]` from llama.cpp's interleaved RoPE
/// layout back to Hugging Face's: within each head, GGUF row `2j + t` is
/// Hugging Face row `t × head_dim/2 + j`.
fn unpermute_rows<T: Copy>(
    data: &[T],
    rows: usize,
    row_len: usize,
    heads: usize,
) -> Result<Vec<T>, LoadError> {
    reorder_rows(data, rows, row_len, heads, false)
}

/// Reorders rows `[heads × head_dim, …]` from Hugging Face's layout to
/// llama.cpp's interleaved RoPE layout (what its converter does to Llama's
/// Q and K projections): the inverse of the permutation undone on reading.
pub fn permute_rows<T: Copy>(
    data: &[T],
    rows: usize,
    row_len: usize,
    heads: usize,
) -> Result<Vec<T>, LoadError> {
    reorder_rows(data, rows, row_len, heads, true)
}

/// The rows of `data` in llama.cpp's order (`to_gguf`) or Hugging Face's.
fn reorder_rows<T: Copy>(
    data: &[T],
    rows: usize,
    row_len: usize,
    heads: usize,
    to_gguf: bool,
) -> Result<Vec<T>, LoadError> {
    if heads == 0 || rows % heads != 0 || (rows / heads) % 2 != 0 || data.len() != rows * row_len {
        return Err(LoadError::Config(format!(
            "cannot reorder the Q/K rows: {rows} rows over {heads} heads"
        )));
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..heads {
        for r in 0..head_dim {
            // GGUF row 2j + t is Hugging Face row t · half + j.
            let source = match to_gguf {
                true => (r % 2) * half + r / 2,
                false => 2 * (r % half) + r / half,
            };
            let row = h * head_dim + source;
            out.extend_from_slice(&data[row * row_len..(row + 1) * row_len]);
        }
    }
    Ok(out)
}

fn usize_of(v: u64, what: &str) -> Result<usize, LoadError> {
    usize::try_from(v).map_err(|_| LoadError::Config(format!("{what} does not fit this platform")))
}

/// One GGUF tensor as a Hugging Face checkpoint holds it, under its Hugging
/// Face name, on the host.
#[derive(Debug)]
pub enum HfTensor<'a> {
    /// A matrix in MLX's affine layout (`rows × words` packed `u32`s, `rows ×
    /// groups` scales and biases): the lossless repack of `Q4_0`, `Q4_1` and
    /// `Q8_0`. `name` ends in `.weight`; the scales and biases belong beside
    /// it as `….scales` and `….biases`.
    Affine {
        /// The weight's name.
        name: String,
        /// Rows of the matrix.
        rows: usize,
        /// The packed matrix.
        packed: Vec<u32>,
        /// One scale per group.
        scales: Vec<f32>,
        /// One bias per group.
        biases: Vec<f32>,
        /// Elements per group.
        group_size: i32,
        /// Bits per element.
        bits: i32,
    },
    /// An `F16` (or, with `bf16`, `BF16`) tensor's bytes as stored.
    Half {
        /// The tensor's name.
        name: String,
        /// Its shape, outermost first.
        shape: Vec<usize>,
        /// Little-endian 16-bit floats, borrowed from the file's map.
        data: &'a [u8],
        /// Whether they are bfloat16 (else IEEE half).
        bf16: bool,
    },
    /// An `F32` tensor, or any other type dequantised to `f32`.
    F32 {
        /// The tensor's name.
        name: String,
        /// Its shape, outermost first.
        shape: Vec<usize>,
        /// The values.
        values: Vec<f32>,
    },
}

impl HfTensor<'_> {
    /// The tensor's Hugging Face name.
    pub fn name(&self) -> &str {
        match self {
            HfTensor::Affine { name, .. }
            | HfTensor::Half { name, .. }
            | HfTensor::F32 { name, .. } => name,
        }
    }
}

/// Hands every tensor of `file` to `visit` as a [`HfTensor`], one at a
/// time (so that at most one converted tensor is held on the host), with
/// llama.cpp's Q/K row permutation undone for `llama` and Gemma's folded
/// `+ 1` taken out of its norm weights. A tensor that has no Hugging Face
/// name is refused with [`LoadError::UnexpectedTensor`].
pub fn convert_tensors<E: From<LoadError>>(
    file: &GgufFile,
    architecture: &str,
    mut visit: impl FnMut(HfTensor<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let (heads, kv_heads) = head_counts(file, architecture);
    let gemma = architecture.starts_with("gemma");
    let llama = architecture == "llama";
    let corrupt = |t: &str, e: &dyn std::fmt::Display| LoadError::CorruptWeights {
        file: "GGUF".into(),
        reason: format!("{t}: {e}"),
    };
    for t in file.tensors() {
        let Some(name) = hf_name(&t.name, gemma) else {
            return Err(LoadError::UnexpectedTensor(t.name.clone()).into());
        };
        let data = file.tensor_data(t).map_err(|e| LoadError::CorruptWeights {
            file: "GGUF".into(),
            reason: e.to_string(),
        })?;
        let shape: Vec<usize> = t
            .shape()
            .iter()
            .map(|&d| usize_of(d, &t.name))
            .collect::<Result<_, _>>()?;
        let (rows, cols) = match shape.as_slice() {
            [r, c] => (*r, *c),
            [n] => (1, *n),
            _ => (0, 0),
        };
        let permute_heads = match name.rsplit_once('.').map(|(s, _)| s) {
            Some(s) if llama && s.ends_with("self_attn.q_proj") => Some(heads),
            Some(s) if llama && s.ends_with("self_attn.k_proj") => Some(kv_heads),
            _ => None,
        };
        let is_norm = name.ends_with("norm.weight");
        let tensor = match t.ggml_type {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 if shape.len() == 2 && !is_norm => {
                let mut a = quant::to_mlx_affine(t.ggml_type, data, rows, cols)
                    .map_err(|e| corrupt(&t.name, &e))?;
                if let Some(h) = permute_heads {
                    let words = a.packed.len() / rows.max(1);
                    let groups = a.scales.len() / rows.max(1);
                    a.packed = unpermute_rows(&a.packed, rows, words, h)?;
                    a.scales = unpermute_rows(&a.scales, rows, groups, h)?;
                    a.biases = unpermute_rows(&a.biases, rows, groups, h)?;
                }
                HfTensor::Affine {
                    name,
                    rows,
                    packed: a.packed,
                    scales: a.scales,
                    biases: a.biases,
                    group_size: a.group_size,
                    bits: a.bits,
                }
            }
            GgmlType::F16 | GgmlType::BF16 if permute_heads.is_none() && !(gemma && is_norm) => {
                HfTensor::Half {
                    name,
                    shape,
                    data,
                    bf16: t.ggml_type == GgmlType::BF16,
                }
            }
            ty => {
                let n = usize_of(t.n_elements(), &t.name)?;
                let mut values =
                    quant::dequantize(ty, data, n).map_err(|e| corrupt(&t.name, &e))?;
                if let Some(h) = permute_heads {
                    values = unpermute_rows(&values, rows, cols, h)?;
                }
                if gemma && is_norm {
                    values.iter_mut().for_each(|v| *v -= 1.0);
                }
                HfTensor::F32 {
                    name,
                    shape,
                    values,
                }
            }
        };
        visit(tensor)?;
    }
    Ok(())
}

/// Row counts needed to undo the permutation: query and key-value heads.
pub fn head_counts(file: &GgufFile, architecture: &str) -> (usize, usize) {
    let heads = file
        .get_u64(&format!("{architecture}.attention.head_count"))
        .unwrap_or(0) as usize;
    let kv = file
        .get_u64(&format!("{architecture}.attention.head_count_kv"))
        .map_or(heads, |v| v as usize);
    (heads, kv)
}

/// How a GGUF file stores its weights: the name of its `general.file_type`
/// (`Q4_1`, `Q4_K_M`, `F16`, …), or else the type holding most weight
/// elements; and whether that type is quantised.
pub fn stored_type(file: &GgufFile) -> (String, bool) {
    let declared = file
        .get_u64("general.file_type")
        .and_then(|id| u32::try_from(id).ok())
        .and_then(GgufFileType::from_id);
    if let Some(t) = declared {
        return (t.name.to_owned(), t.is_quantized());
    }
    let mut by_type: Vec<(GgmlType, u64)> = Vec::new();
    for t in file.tensors() {
        match by_type.iter_mut().find(|(ty, _)| *ty == t.ggml_type) {
            Some((_, n)) => *n = n.saturating_add(t.n_elements()),
            None => by_type.push((t.ggml_type, t.n_elements())),
        }
    }
    match by_type.into_iter().max_by_key(|&(_, n)| n) {
        Some((ty, _)) => {
            let quantised = !matches!(ty.name(), "F32" | "F16" | "BF16" | "F64");
            (ty.name().to_owned(), quantised)
        }
        None => (String::new(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_rows_inverts_unpermute_rows() {
        let data: Vec<u32> = (0..48).collect();
        let there = permute_rows(&data, 12, 4, 3).unwrap();
        assert_ne!(there, data);
        assert_eq!(unpermute_rows(&there, 12, 4, 3).unwrap(), data);
        assert!(permute_rows(&data, 12, 4, 5).is_err());
    }
}

//! `config.json` (and `generation_config.json`) as the model code needs them.
//!
//! Real configs vary: transformers 5.x writes `rope_parameters` where 4.x wrote
//! `rope_theta` / `rope_scaling`, and `dtype` where 4.x wrote `torch_dtype`;
//! multimodal checkpoints nest the text model under `text_config`. This module
//! reads every variant into one [`ModelConfig`].

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::LoadError;

/// MLX affine quantisation of a checkpoint (mlx-community layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Quantization {
    /// Elements sharing one scale and bias.
    pub group_size: i32,
    /// Bits per weight.
    pub bits: i32,
}

/// How RoPE frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// Overall factor.
        factor: f32,
        /// Low-frequency factor.
        low_freq_factor: f32,
        /// High-frequency factor.
        high_freq_factor: f32,
        /// The context the model was trained with.
        original_max_position_embeddings: f32,
    },
    /// Positions divided by `factor` (`linear`).
    Linear {
        /// The divisor.
        factor: f32,
    },
}

/// RoPE of one kind of layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// The base.
    pub theta: f32,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

/// The attention pattern of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Attends to every earlier position.
    Full,
    /// Attends to the last `window` positions.
    Sliding,
}

/// Everything the model code reads from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `model_type` of the text model (`qwen3`, `gemma3_text`, …).
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: i32,
    /// Hidden size.
    pub hidden_size: i32,
    /// MLP inner size.
    pub intermediate_size: i32,
    /// Decoder layers.
    pub num_hidden_layers: i32,
    /// Query heads.
    pub num_attention_heads: i32,
    /// Key/value heads (GQA).
    pub num_key_value_heads: i32,
    /// Per-head size (inferred as hidden / heads when absent).
    pub head_dim: i32,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Longest context the model was built for.
    pub max_position_embeddings: usize,
    /// The output projection shares the embedding.
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// RMSNorm on queries and keys per head (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Biases in the MLP.
    pub mlp_bias: bool,
    /// RoPE of full-attention layers.
    pub rope: Rope,
    /// RoPE of sliding-window layers (Gemma 3's local base).
    pub rope_local: Option<Rope>,
    /// Sliding window size, for architectures that have one.
    pub sliding_window: Option<usize>,
    /// Each layer's kind.
    pub layer_types: Vec<LayerKind>,
    /// Attention scale numerator (Gemma's `query_pre_attn_scalar`).
    pub query_pre_attn_scalar: Option<f32>,
    /// Final logit soft-capping, where configured.
    pub final_logit_softcapping: Option<f32>,
    /// MLX quantisation, when the checkpoint is quantised.
    pub quantization: Option<Quantization>,
    /// Matrices quantised differently from [`quantization`](Self::quantization)
    /// (mlx-community's per-module entries, e.g. an 8-bit embedding in a 4-bit
    /// model), by module path.
    pub quantization_overrides: Vec<(String, Quantization)>,
    /// The checkpoint's dtype as written (`float32`, `bfloat16`, …).
    pub dtype: Option<String>,
    /// BOS id, from config.json.
    pub bos_token_id: Option<u32>,
    /// EOS ids, from config.json.
    pub eos_token_ids: Vec<u32>,
    /// `general.architecture`, when the model comes from a GGUF file.
    pub gguf_architecture: Option<String>,
}

/// The fields read with serde; [`ModelConfig::from_value`] resolves the variants.
#[derive(Debug, Deserialize)]
struct Raw {
    model_type: Option<String>,
    vocab_size: Option<i32>,
    hidden_size: Option<i32>,
    intermediate_size: Option<i32>,
    num_hidden_layers: Option<i32>,
    num_attention_heads: Option<i32>,
    num_key_value_heads: Option<i32>,
    head_dim: Option<i32>,
    rms_norm_eps: Option<f32>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    rope_theta: Option<f32>,
    rope_local_base_freq: Option<f32>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    sliding_window: Option<usize>,
    sliding_window_pattern: Option<usize>,
    #[serde(rename = "_sliding_window_pattern")]
    sliding_window_pattern_private: Option<usize>,
    layer_types: Option<Vec<String>>,
    query_pre_attn_scalar: Option<f32>,
    final_logit_softcapping: Option<f32>,
    attn_logit_softcapping: Option<f32>,
    use_sliding_window: Option<bool>,
    partial_rotary_factor: Option<f32>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    quantization: Option<Value>,
    quantization_config: Option<Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

/// Per-module quantisation entries, by module path.
type QuantOverrides = Vec<(String, Quantization)>;

/// The checkpoint-wide MLX quantisation of a `quantization` object and its
/// per-module entries (objects with `group_size` and `bits`; `false` entries
/// mean "not quantised", which the weights already say by having no scales).
/// A quantisation mode other than affine is refused.
fn parse_quantization(q: &Value) -> Result<(Option<Quantization>, QuantOverrides), LoadError> {
    let Some(obj) = q.as_object() else {
        return Err(LoadError::Config("`quantization` is not an object".into()));
    };
    if let Some(mode) = obj.get("mode").and_then(Value::as_str) {
        if mode != "affine" {
            return Err(LoadError::Unsupported(format!(
                "MLX quantisation mode {mode:?} (only affine is supported)"
            )));
        }
    }
    let one = |v: &Value, what: &str| -> Result<Quantization, LoadError> {
        serde_json::from_value(v.clone())
            .map_err(|e| LoadError::Config(format!("quantization of {what}: {e}")))
    };
    let top = match (obj.get("group_size"), obj.get("bits")) {
        (Some(_), Some(_)) => Some(one(q, "the checkpoint")?),
        _ => None,
    };
    let mut overrides = Vec::new();
    for (key, v) in obj {
        if v.is_object() {
            overrides.push((key.clone(), one(v, key)?));
        }
    }
    Ok((top, overrides))
}

/// Token ids from a JSON number or array of numbers.
pub(crate) fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .into_iter()
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

fn require<T>(v: Option<T>, field: &str) -> Result<T, LoadError> {
    v.ok_or_else(|| LoadError::Config(format!("missing `{field}`")))
}

fn parse_rope(theta: f32, scaling: Option<&Value>) -> Result<Rope, LoadError> {
    let Some(s) = scaling.filter(|s| !s.is_null()) else {
        return Ok(Rope {
            theta,
            scaling: RopeScaling::None,
        });
    };
    let named = s.get("rope_type").or_else(|| s.get("type"));
    if named.is_none() && s.get("factor").is_some() {
        return Err(LoadError::Unsupported(
            "config key `rope_scaling` with a `factor` but no `rope_type`".into(),
        ));
    }
    let kind = named.and_then(Value::as_str).unwrap_or("default");
    let num = |k: &str| -> Result<f32, LoadError> {
        s.get(k)
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .ok_or_else(|| LoadError::Config(format!("rope scaling `{kind}` needs `{k}`")))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(LoadError::Unsupported(format!(
                "config key `rope_scaling` of type {other:?}"
            )));
        }
    };
    Ok(Rope { theta, scaling })
}

/// Refuses config keys that change the maths of a `family` model in a way its
/// model file does not implement, naming the key: the Qwen/Llama decoder has
/// no sliding-window attention, no final-logit soft-capping and no
/// `query_pre_attn_scalar`; no family has partial rotary embeddings.
fn refuse_unimplemented(
    family: Family,
    model_type: &str,
    raw: &Raw,
    layer_types: &[LayerKind],
) -> Result<(), LoadError> {
    let refuse = |what: String| Err(LoadError::Unsupported(what));
    if let Some(f) = raw.partial_rotary_factor.filter(|&f| f != 1.0) {
        return refuse(format!(
            "config key `partial_rotary_factor` = {f} (partial rotary embeddings) for {model_type}"
        ));
    }
    if family != Family::Decoder {
        return Ok(());
    }
    if raw.use_sliding_window == Some(true) {
        return refuse(format!(
            "config key `use_sliding_window: true` (sliding-window attention) for {model_type}"
        ));
    }
    if layer_types.contains(&LayerKind::Sliding) {
        return refuse(format!(
            "config key `layer_types` with `sliding_attention` layers for {model_type}"
        ));
    }
    if raw.final_logit_softcapping.is_some() {
        return refuse(format!(
            "config key `final_logit_softcapping` (logit soft-capping) for {model_type}"
        ));
    }
    if raw.query_pre_attn_scalar.is_some() {
        return refuse(format!(
            "config key `query_pre_attn_scalar` (a non-standard attention scale) for {model_type}"
        ));
    }
    Ok(())
}

/// `rope_parameters` as transformers 5.x writes it: either one set of
/// parameters or one per layer type (`full_attention`, `sliding_attention`).
fn rope_from_parameters<'a>(p: &'a Value, layer_type: &str) -> Option<&'a Value> {
    if p.get("rope_theta").is_some() || p.get("rope_type").is_some() {
        Some(p)
    } else {
        p.get(layer_type)
    }
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| LoadError::Io(format!("{}: {e}", path.display())))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::Config(format!("{}: invalid JSON: {e}", path.display())))?;
        Self::from_value(&value)
    }

    /// Resolves a parsed `config.json`.
    pub fn from_value(value: &Value) -> Result<Self, LoadError> {
        // Multimodal checkpoints (e.g. `gemma3`) keep the text model in `text_config`.
        let outer_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let text = value
            .get("text_config")
            .filter(|t| t.is_object())
            .unwrap_or(value);
        let raw: Raw = serde_json::from_value(text.clone())
            .map_err(|e| LoadError::Config(format!("config.json: {e}")))?;
        let model_type = match (outer_type.as_deref(), raw.model_type.as_deref()) {
            (Some("gemma3"), _) => "gemma3_text".to_owned(),
            (_, Some(t)) => t.to_owned(),
            (Some(t), None) => t.to_owned(),
            (None, None) => return Err(LoadError::Config("missing `model_type`".into())),
        };
        let family = Family::of(&model_type)
            .ok_or_else(|| LoadError::UnsupportedArchitecture(model_type.clone()))?;
        let defaults = family.defaults();

        let hidden_size = require(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = require(raw.num_attention_heads, "num_attention_heads")?;
        let num_hidden_layers = require(raw.num_hidden_layers, "num_hidden_layers")?;
        // Gemma's configuration class defaults head_dim to 256; the others
        // derive it from the hidden size.
        let head_dim = raw.head_dim.unwrap_or(match family {
            Family::Gemma3 => 256,
            Family::Decoder if num_attention_heads > 0 => hidden_size / num_attention_heads,
            Family::Decoder => 0,
        });
        let activation = raw
            .hidden_activation
            .as_deref()
            .or(raw.hidden_act.as_deref())
            .unwrap_or(defaults.activation);
        let expected_activation = match family {
            Family::Decoder => &["silu", "swish"][..],
            Family::Gemma3 => &["gelu_pytorch_tanh", "gelu_tanh"][..],
        };
        if !expected_activation.contains(&activation) {
            return Err(LoadError::Unsupported(format!(
                "activation {activation:?} for {model_type}"
            )));
        }
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        for (name, v) in [
            ("hidden_size", hidden_size),
            ("num_attention_heads", num_attention_heads),
            ("num_hidden_layers", num_hidden_layers),
            ("num_key_value_heads", num_key_value_heads),
            ("head_dim", head_dim),
        ] {
            if v <= 0 {
                return Err(LoadError::Config(format!(
                    "`{name}` must be positive, got {v}"
                )));
            }
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(LoadError::Config(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }

        // RoPE: `rope_parameters` (5.x) wins over `rope_theta` / `rope_scaling` (4.x).
        let params = raw.rope_parameters.as_ref().filter(|p| p.is_object());
        let global_params = params.and_then(|p| rope_from_parameters(p, "full_attention"));
        let theta = global_params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .or(raw.rope_theta)
            .unwrap_or(defaults.rope_theta);
        let rope = parse_rope(theta, global_params.or(raw.rope_scaling.as_ref()))?;
        let rope_local = if family == Family::Gemma3 {
            let local = params.and_then(|p| p.get("sliding_attention"));
            let theta = local
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
                .map(|x| x as f32)
                .or(raw.rope_local_base_freq)
                .unwrap_or(10_000.0);
            Some(parse_rope(theta, local)?)
        } else {
            None
        };

        let layer_types = match &raw.layer_types {
            Some(types) => types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(LayerKind::Full),
                    "sliding_attention" => Ok(LayerKind::Sliding),
                    other => Err(LoadError::Unsupported(format!("layer type {other:?}"))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => {
                let pattern = raw
                    .sliding_window_pattern
                    .or(raw.sliding_window_pattern_private)
                    .or(defaults.sliding_window_pattern);
                (0..num_hidden_layers as usize)
                    .map(|i| match pattern {
                        Some(p) if p > 0 && (i + 1) % p != 0 => LayerKind::Sliding,
                        _ => LayerKind::Full,
                    })
                    .collect()
            }
        };
        if layer_types.len() != num_hidden_layers as usize {
            return Err(LoadError::Config(format!(
                "layer_types has {} entries for {num_hidden_layers} layers",
                layer_types.len()
            )));
        }
        let sliding_window = if family == Family::Gemma3 {
            Some(require(raw.sliding_window, "sliding_window")?)
        } else {
            None
        };
        if sliding_window == Some(0) {
            return Err(LoadError::Config(
                "`sliding_window` must be positive".into(),
            ));
        }

        if raw.attn_logit_softcapping.is_some() {
            return Err(LoadError::Unsupported(
                "config key `attn_logit_softcapping` (attention soft-capping)".into(),
            ));
        }
        refuse_unimplemented(family, &model_type, &raw, &layer_types)?;
        let (quantization, quantization_overrides) = match raw
            .quantization
            .as_ref()
            .or(raw.quantization_config.as_ref())
        {
            Some(q) => parse_quantization(q)?,
            None => (None, Vec::new()),
        };
        let attention_bias = raw.attention_bias.unwrap_or(false);
        Ok(Self {
            vocab_size: require(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: require(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(defaults.rms_norm_eps),
            max_position_embeddings: raw
                .max_position_embeddings
                .unwrap_or(defaults.max_position_embeddings),
            tie_word_embeddings: raw
                .tie_word_embeddings
                .unwrap_or(defaults.tie_word_embeddings),
            // Qwen2 always has q/k/v biases; others follow `attention_bias`.
            qkv_bias: model_type == "qwen2" || attention_bias,
            qk_norm: matches!(model_type.as_str(), "qwen3" | "gemma3_text"),
            o_bias: attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            rope,
            rope_local,
            sliding_window,
            layer_types,
            query_pre_attn_scalar: match family {
                Family::Gemma3 => Some(raw.query_pre_attn_scalar.unwrap_or(256.0)),
                Family::Decoder => raw.query_pre_attn_scalar,
            },
            final_logit_softcapping: raw.final_logit_softcapping,
            quantization,
            quantization_overrides,
            dtype: raw.dtype.or(raw.torch_dtype),
            bos_token_id: token_ids(raw.bos_token_id.as_ref()).first().copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
            gguf_architecture: None,
            model_type,
        })
    }

    /// The architecture family.
    pub fn family(&self) -> Family {
        // `from_value` refuses model types without a family.
        Family::of(&self.model_type).unwrap_or(Family::Decoder)
    }
}

/// Architecture families, each implemented by one model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Qwen3, Qwen2 and Llama (`models/decoder.rs`).
    Decoder,
    /// Gemma 3 text (`models/gemma3.rs`).
    Gemma3,
}

struct Defaults {
    rope_theta: f32,
    rms_norm_eps: f32,
    max_position_embeddings: usize,
    tie_word_embeddings: bool,
    sliding_window_pattern: Option<usize>,
    activation: &'static str,
}

impl Family {
    /// The family of a `model_type`, if we implement it.
    pub fn of(model_type: &str) -> Option<Self> {
        match model_type {
            "qwen3" | "qwen2" | "llama" => Some(Family::Decoder),
            "gemma3_text" | "gemma3" => Some(Family::Gemma3),
            _ => None,
        }
    }

    fn defaults(self) -> Defaults {
        match self {
            Family::Decoder => Defaults {
                rope_theta: 10_000.0,
                rms_norm_eps: 1e-6,
                max_position_embeddings: 2048,
                tie_word_embeddings: false,
                sliding_window_pattern: None,
                activation: "silu",
            },
            Family::Gemma3 => Defaults {
                rope_theta: 1_000_000.0,
                rms_norm_eps: 1e-6,
                max_position_embeddings: 131_072,
                tie_word_embeddings: true,
                sliding_window_pattern: Some(6),
                activation: "gelu_pytorch_tanh",
            },
        }
    }
}

//! Hugging Face `config.json`, in all its variants, for model code.
//!
//! Real configs vary: transformers 5.x writes `rope_parameters` where 4.x wrote
//! `rope_theta` / `rope_scaling`, and `dtype` where 4.x wrote `torch_dtype`;
//! multimodal checkpoints nest the text model under `text_config`; MLX
//! checkpoints add a `quantization` object. [`HfConfig`] resolves every
//! variant behind one set of questions ([`HfConfig::rope`],
//! [`HfConfig::layer_types`], [`HfConfig::quantization`], …), and
//! [`TextConfig`] reads the part every decoder-only text model shares.
//! Each architecture's model file owns its own configuration, built from
//! these two: the keys only it reads, its defaults, and the keys it refuses.

use std::path::Path;

use serde::de::DeserializeOwned;
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

/// A parsed `config.json`, its text model resolved: a multimodal checkpoint's
/// `text_config` (Gemma 3's `gemma3`, for one) is read as the text model's
/// configuration, with `model_type` `gemma3` read as `gemma3_text`.
#[derive(Debug, Clone)]
pub struct HfConfig {
    model_type: String,
    /// The text model's object.
    text: Value,
}

impl HfConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| LoadError::file(&path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::Config(format!("{}: invalid JSON: {e}", path.display())))?;
        Self::from_value(&value)
    }

    /// Resolves a parsed `config.json` (or one made from GGUF metadata).
    pub fn from_value(value: &Value) -> Result<Self, LoadError> {
        if !value.is_object() {
            return Err(LoadError::Config("config.json is not a JSON object".into()));
        }
        let outer_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let text = value
            .get("text_config")
            .filter(|t| t.is_object())
            .unwrap_or(value)
            .clone();
        let inner_type = match text.get("model_type") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => Some(t.clone()),
            Some(other) => {
                return Err(LoadError::Config(format!(
                    "config.json: `model_type` must be a string, got {other}"
                )))
            }
        };
        let model_type = match (outer_type.as_deref(), inner_type) {
            (Some("gemma3"), _) => "gemma3_text".to_owned(),
            (_, Some(t)) => t,
            (Some(t), None) => t.to_owned(),
            (None, None) => return Err(LoadError::Config("missing `model_type`".into())),
        };
        Ok(Self { model_type, text })
    }

    /// The text model's `model_type` (`qwen3`, `gemma3_text`, …).
    pub fn model_type(&self) -> &str {
        &self.model_type
    }

    /// The value of `key` (`None` when absent or `null`); a value of the
    /// wrong type is a [`LoadError::Config`] naming the key.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, LoadError> {
        match self.text.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| LoadError::Config(format!("config.json: `{key}`: {e}"))),
        }
    }

    /// The value of `key`; [`LoadError::Config`] (`missing `key``) when absent.
    pub fn require<T: DeserializeOwned>(&self, key: &str) -> Result<T, LoadError> {
        self.get(key)?
            .ok_or_else(|| LoadError::Config(format!("missing `{key}`")))
    }

    /// The raw value of `key`, when present and not `null`.
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.text.get(key).filter(|v| !v.is_null())
    }

    /// The activation function: `hidden_activation` (Gemma's key), else
    /// `hidden_act`, else `default`.
    pub fn activation(&self, default: &str) -> Result<String, LoadError> {
        Ok(match self.get::<String>("hidden_activation")? {
            Some(a) => a,
            None => self
                .get::<String>("hidden_act")?
                .unwrap_or_else(|| default.to_owned()),
        })
    }

    /// The RoPE of layers of `layer_type` (`full_attention` or
    /// `sliding_attention`): transformers 5.x's `rope_parameters` (one set,
    /// or one per layer type) wins over 4.x's `theta_key` and
    /// `rope_scaling`, which only full-attention layers read; `default_theta`
    /// where neither gives a base.
    pub fn rope(
        &self,
        layer_type: &str,
        theta_key: &str,
        default_theta: f32,
    ) -> Result<Rope, LoadError> {
        let params = match self.value("rope_parameters") {
            None | Some(Value::Null) => None,
            Some(p @ Value::Object(_)) => Some(p),
            Some(other) => {
                return Err(LoadError::Config(format!(
                    "`rope_parameters` must be an object, got {other}"
                )))
            }
        };
        let full = layer_type == "full_attention";
        let chosen = params
            .and_then(|p| {
                if full {
                    rope_from_parameters(p, layer_type)
                } else {
                    p.get(layer_type)
                }
            })
            .filter(|p| !p.is_null());
        if let Some(p) = chosen.filter(|p| !p.is_object()) {
            return Err(LoadError::Config(format!(
                "`rope_parameters` for {layer_type} must be an object, got {p}"
            )));
        }
        let theta = match chosen.and_then(|p| p.get("rope_theta")) {
            None | Some(Value::Null) => self.get::<f32>(theta_key)?,
            Some(t) => Some(t.as_f64().map(|x| x as f32).ok_or_else(|| {
                LoadError::Config(format!("`rope_theta` must be a number, got {t}"))
            })?),
        }
        .unwrap_or(default_theta);
        let theta = positive(theta, theta_key)?;
        let scaling = match chosen {
            Some(p) => Some(p),
            None if full => self.value("rope_scaling"),
            None => None,
        };
        parse_rope(theta, scaling)
    }

    /// Each layer's kind: `layer_types` where given, else every
    /// `pattern`-th layer full and the others sliding (`sliding_window_pattern`
    /// or `_sliding_window_pattern`, else `default_pattern`; all full without
    /// one). Its length must be `layers`.
    pub fn layer_types(
        &self,
        layers: usize,
        default_pattern: Option<usize>,
    ) -> Result<Vec<LayerKind>, LoadError> {
        let kinds = match self.get::<Vec<String>>("layer_types")? {
            Some(types) => types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(LayerKind::Full),
                    "sliding_attention" => Ok(LayerKind::Sliding),
                    other => Err(LoadError::Unsupported(format!("layer type {other:?}"))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => {
                let pattern = match self.get::<usize>("sliding_window_pattern")? {
                    Some(p) => Some(p),
                    None => self.get::<usize>("_sliding_window_pattern")?,
                }
                .or(default_pattern);
                (0..layers)
                    .map(|i| match pattern {
                        Some(p) if p > 0 && (i + 1) % p != 0 => LayerKind::Sliding,
                        _ => LayerKind::Full,
                    })
                    .collect()
            }
        };
        if kinds.len() != layers {
            return Err(LoadError::Config(format!(
                "layer_types has {} entries for {layers} layers",
                kinds.len()
            )));
        }
        Ok(kinds)
    }

    /// MLX quantisation (`quantization`, or `quantization_config`): the
    /// checkpoint's and its per-module entries. A mode other than affine is
    /// refused.
    pub fn quantization(&self) -> Result<(Option<Quantization>, QuantOverrides), LoadError> {
        match self
            .value("quantization")
            .or_else(|| self.value("quantization_config"))
        {
            Some(q) => parse_quantization(q),
            None => Ok((None, Vec::new())),
        }
    }

    /// Refuses `key` when it is set (not `null`), as
    /// [`LoadError::Unsupported`] with `what` it would change.
    pub fn refuse_key(&self, key: &str, what: &str) -> Result<(), LoadError> {
        match self.value(key) {
            Some(_) => Err(LoadError::Unsupported(format!(
                "config key `{key}` ({what})"
            ))),
            None => Ok(()),
        }
    }
}

/// What an architecture's defaults are, where `config.json` is silent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// Whether the output projection shares the embedding.
    pub tie_word_embeddings: bool,
    /// The per-head size, where the architecture fixes one (Gemma: 256);
    /// `None` derives it as hidden size / heads.
    pub head_dim: Option<i32>,
}

/// What every decoder-only text model's configuration holds: its sizes,
/// context, quantisation, dtype and special ids. The engine reads these;
/// an architecture's own configuration adds the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
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
    /// Per-head size.
    pub head_dim: i32,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Longest context the model was built for.
    pub max_position_embeddings: usize,
    /// The output projection shares the embedding.
    pub tie_word_embeddings: bool,
    /// MLX quantisation, when the checkpoint is quantised.
    pub quantization: Option<Quantization>,
    /// Matrices quantised differently from [`quantization`](Self::quantization)
    /// (mlx-community's per-module entries, e.g. an 8-bit embedding in a 4-bit
    /// model), by module path.
    pub quantization_overrides: QuantOverrides,
    /// The checkpoint's dtype as written (`float32`, `bfloat16`, …).
    pub dtype: Option<String>,
    /// BOS id, from config.json.
    pub bos_token_id: Option<u32>,
    /// EOS ids, from config.json.
    pub eos_token_ids: Vec<u32>,
    /// `general.architecture`, when the model comes from a GGUF file.
    pub gguf_architecture: Option<String>,
}

impl TextConfig {
    /// Reads the shared part of `c`, with `defaults` where it is silent:
    /// sizes (and the context) must be positive, `rms_norm_eps` at least 0,
    /// and the query heads a multiple of the key/value heads. Partial rotary
    /// embeddings and attention-logit soft-capping, which no architecture
    /// here implements, are refused.
    pub fn read(c: &HfConfig, defaults: &Defaults) -> Result<Self, LoadError> {
        let hidden_size: i32 = c.require("hidden_size")?;
        let num_attention_heads: i32 = c.require("num_attention_heads")?;
        let num_hidden_layers: i32 = c.require("num_hidden_layers")?;
        let head_dim = match c.get::<i32>("head_dim")? {
            Some(d) => d,
            None => match defaults.head_dim {
                Some(d) => d,
                None if num_attention_heads > 0 => hidden_size / num_attention_heads,
                None => 0,
            },
        };
        let num_key_value_heads = c
            .get::<i32>("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let vocab_size: i32 = c.require("vocab_size")?;
        let intermediate_size: i32 = c.require("intermediate_size")?;
        for (name, v) in [
            ("hidden_size", hidden_size),
            ("num_attention_heads", num_attention_heads),
            ("num_hidden_layers", num_hidden_layers),
            ("num_key_value_heads", num_key_value_heads),
            ("head_dim", head_dim),
            ("vocab_size", vocab_size),
            ("intermediate_size", intermediate_size),
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
        if let Some(f) = c.get::<f32>("partial_rotary_factor")?.filter(|&f| f != 1.0) {
            return Err(LoadError::Unsupported(format!(
                "config key `partial_rotary_factor` = {f} (partial rotary embeddings) for {}",
                c.model_type()
            )));
        }
        if c.value("attn_logit_softcapping").is_some() {
            return Err(LoadError::Unsupported(
                "config key `attn_logit_softcapping` (attention soft-capping)".into(),
            ));
        }
        let rms_norm_eps: f32 = c.get("rms_norm_eps")?.unwrap_or(defaults.rms_norm_eps);
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            return Err(LoadError::Config(format!(
                "`rms_norm_eps` must be a number of at least 0, got {rms_norm_eps}"
            )));
        }
        let max_position_embeddings: usize = c
            .get("max_position_embeddings")?
            .unwrap_or(defaults.max_position_embeddings);
        if max_position_embeddings == 0 {
            return Err(LoadError::Config(
                "`max_position_embeddings` must be positive, got 0".into(),
            ));
        }
        let (quantization, quantization_overrides) = c.quantization()?;
        let dtype = match c.get::<String>("dtype")? {
            Some(d) => Some(d),
            None => c.get::<String>("torch_dtype")?,
        };
        Ok(Self {
            model_type: c.model_type().to_owned(),
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            max_position_embeddings,
            tie_word_embeddings: c
                .get("tie_word_embeddings")?
                .unwrap_or(defaults.tie_word_embeddings),
            quantization,
            quantization_overrides,
            dtype,
            bos_token_id: checked_ids(c.value("bos_token_id"), "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: checked_ids(c.value("eos_token_id"), "eos_token_id")?,
            gguf_architecture: None,
        })
    }
}

/// Per-module quantisation entries, by module path.
pub type QuantOverrides = Vec<(String, Quantization)>;

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

/// A special token's text as `tokenizer_config.json` gives it: a string or
/// `{"content": …}`.
pub fn token_text(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// `v`, the value of `name`, where it is a positive number; else an error
/// naming it.
pub fn positive(v: f32, name: &str) -> Result<f32, LoadError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(LoadError::Config(format!(
            "`{name}` must be a positive number, got {v}"
        )))
    }
}

/// Token ids from `v`, the value of `key`: absent or null, an id, or a list
/// of ids (a negative one, as some configurations write for "none", is
/// dropped); anything else is an error.
pub fn checked_ids(v: Option<&Value>, key: &str) -> Result<Vec<u32>, LoadError> {
    // `Some(Some(id))`, `Some(None)` for a negative "none", `None` for
    // anything else.
    let id = |x: &Value| match x.as_u64() {
        Some(u) => u32::try_from(u).ok().map(Some),
        None => x.as_i64().filter(|i| *i < 0).map(|_| None),
    };
    let x = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(x) => x,
    };
    let ids = match x {
        Value::Array(a) => a.iter().map(id).collect::<Option<Vec<_>>>(),
        one => id(one).map(|one| vec![one]),
    };
    ids.map(|ids| ids.into_iter().flatten().collect())
        .ok_or_else(|| {
            LoadError::Config(format!(
                "`{key}` must be a token id or a list of them, got {x}"
            ))
        })
}

/// Token ids from a JSON number or array of numbers.
pub fn token_ids(v: Option<&Value>) -> Vec<u32> {
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

fn parse_rope(theta: f32, scaling: Option<&Value>) -> Result<Rope, LoadError> {
    let Some(s) = scaling.filter(|s| !s.is_null()) else {
        return Ok(Rope {
            theta,
            scaling: RopeScaling::None,
        });
    };
    if !s.is_object() {
        return Err(LoadError::Config(format!(
            "`rope_scaling` must be an object, got {s}"
        )));
    }
    let named = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .filter(|n| !n.is_null());
    if named.is_none() && s.get("factor").is_some() {
        return Err(LoadError::Unsupported(
            "config key `rope_scaling` with a `factor` but no `rope_type`".into(),
        ));
    }
    let kind = match named {
        None => "default",
        Some(n) => n
            .as_str()
            .ok_or_else(|| LoadError::Config(format!("`rope_type` must be a string, got {n}")))?,
    };
    // Every factor and length is a positive number.
    let num = |k: &str| -> Result<f32, LoadError> {
        s.get(k)
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| {
                LoadError::Config(format!(
                    "rope scaling `{kind}` needs `{k}`, a positive number"
                ))
            })
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => {
            let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
            // The smoothing between the two divides by their difference.
            if high <= low {
                return Err(LoadError::Config(format!(
                    "rope scaling `llama3` needs `high_freq_factor` ({high}) above `low_freq_factor` ({low})"
                )));
            }
            RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }
        }
        other => {
            return Err(LoadError::Unsupported(format!(
                "config key `rope_scaling` of type {other:?}"
            )));
        }
    };
    Ok(Rope { theta, scaling })
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

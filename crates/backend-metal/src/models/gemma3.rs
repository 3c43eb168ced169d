//! Gemma 3 (text): `gemma3_text`, and the text part of `gemma3`.
//!
//! As transformers computes it: embeddings scaled by √hidden (the scale cast
//! to the weights' dtype, so exact in f32); RMSNorm with a `(1 + w)` scale
//! computed in f32; q/k RMSNorm; attention scaled by `query_pre_attn_scalar^-½`;
//! sandwich norms around attention and MLP; a GELU-tanh MLP; sliding-window
//! layers with the local RoPE base and global layers with the global base (and
//! its scaling); an optional final logit soft-cap.

use mlx_rs::error::Exception;
use mlx_rs::ops::tanh;
use mlx_rs::{fast, Array, Dtype};

use inference_formats::config::{positive, Defaults, HfConfig, LayerKind, Rope, TextConfig};

use crate::cache::{LayerCache, Rotation};
use crate::error::{FormatError, LoadError};
use crate::load::weights::Weights;
use crate::models::fused::{QkRope, QkShape};
use crate::models::grad_checkpoint::run_layer;
use crate::models::layers::{
    last_keepdim, Activation, Attention, AttentionBiases, GatedMlp, Matrix, Norm, RotaryEmbedding,
};
use crate::models::lora::LoraTarget;
use crate::models::{layer_slots, layer_targets, Architecture, CausalLm, ModelSpec};

type Result<T> = std::result::Result<T, Exception>;

/// The model types this file implements.
pub const ARCHITECTURE: Architecture = Architecture {
    model_types: &["gemma3_text", "gemma3"],
    read: |c| Ok(Box::new(Gemma3Config::from_hf(c)?)),
};

/// Where `config.json` is silent (transformers' `Gemma3TextConfig`).
const DEFAULTS: Defaults = Defaults {
    rms_norm_eps: 1e-6,
    max_position_embeddings: 131_072,
    tie_word_embeddings: true,
    head_dim: Some(256),
};

/// A Gemma 3 text model's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Config {
    /// Sizes, context, quantisation and special ids.
    pub text: TextConfig,
    /// Which projections have biases (`attention_bias`).
    pub biases: AttentionBiases,
    /// Biases in the MLP (`mlp_bias`).
    pub mlp_bias: bool,
    /// RoPE of the global (full-attention) layers.
    pub rope: Rope,
    /// RoPE of the local (sliding-window) layers: `rope_local_base_freq`.
    pub rope_local: Rope,
    /// The local layers' window.
    pub sliding_window: usize,
    /// Each layer's kind (every sixth layer global unless configured).
    pub layer_types: Vec<LayerKind>,
    /// Attention scale numerator (`query_pre_attn_scalar`, default 256).
    pub query_pre_attn_scalar: f32,
    /// Final logit soft-capping, where configured.
    pub final_logit_softcapping: Option<f32>,
}

impl Gemma3Config {
    /// Reads the configuration of a `gemma3_text` model (or the text part
    /// of a `gemma3` one). Activations other than GELU-tanh are refused.
    pub fn from_hf(c: &HfConfig) -> std::result::Result<Self, FormatError> {
        let text = TextConfig::read(c, &DEFAULTS)?;
        let activation = c.activation("gelu_pytorch_tanh")?;
        if !["gelu_pytorch_tanh", "gelu_tanh"].contains(&activation.as_str()) {
            return Err(FormatError::Unsupported(format!(
                "activation {activation:?} for {}",
                c.model_type()
            )));
        }
        let rope = c.rope("full_attention", "rope_theta", 1_000_000.0)?;
        let rope_local = c.rope("sliding_attention", "rope_local_base_freq", 10_000.0)?;
        let layer_types = c.layer_types(text.num_hidden_layers as usize, Some(6))?;
        let sliding_window: usize = c.require("sliding_window")?;
        if sliding_window == 0 {
            return Err(FormatError::Config(
                "`sliding_window` must be positive".into(),
            ));
        }
        // EmbeddingGemma's bidirectional attention is another model.
        if c.get::<bool>("use_bidirectional_attention")? == Some(true) {
            return Err(FormatError::Unsupported(
                "config key `use_bidirectional_attention` (bidirectional attention)".into(),
            ));
        }
        let attention_bias = c.get::<bool>("attention_bias")?.unwrap_or(false);
        Ok(Self {
            biases: AttentionBiases {
                qkv: attention_bias,
                o: attention_bias,
            },
            mlp_bias: c.get::<bool>("mlp_bias")?.unwrap_or(false),
            rope,
            rope_local,
            sliding_window,
            layer_types,
            query_pre_attn_scalar: positive(
                c.get("query_pre_attn_scalar")?.unwrap_or(256.0),
                "query_pre_attn_scalar",
            )?,
            final_logit_softcapping: c
                .get("final_logit_softcapping")?
                .map(|v| positive(v, "final_logit_softcapping"))
                .transpose()?,
            text,
        })
    }
}

impl ModelSpec for Gemma3Config {
    fn text(&self) -> &TextConfig {
        &self.text
    }

    fn text_mut(&mut self) -> &mut TextConfig {
        &mut self.text
    }

    fn build(&self, weights: &mut Weights) -> std::result::Result<Box<dyn CausalLm>, LoadError> {
        Ok(Box::new(Gemma3::load(self, weights)?))
    }
}

/// Gemma's RMSNorm: `x / rms(x) × (1 + w)`.
struct GemmaNorm {
    /// `1 + w`, in the weights' dtype.
    scale: Array,
    eps: f32,
}

impl Norm for GemmaNorm {
    fn forward(&self, x: &Array) -> Result<Array> {
        GemmaNorm::forward(self, x)
    }

    fn rms_weight(&self) -> Option<(&Array, f32)> {
        Some((&self.scale, self.eps))
    }
}

impl GemmaNorm {
    fn load(
        w: &mut Weights,
        prefix: &str,
        dim: i32,
        eps: f32,
    ) -> std::result::Result<Self, LoadError> {
        let weight = w.take(&format!("{prefix}.weight"), &[dim])?;
        // `1 + w` in f32, rounded once to the weights' dtype.
        let scale = weight
            .as_dtype(Dtype::Float32)?
            .add(Array::from_f32(1.0))?
            .as_dtype(weight.dtype())?;
        scale.eval()?;
        Ok(Self { scale, eps })
    }

    /// MLX's fused RMS norm (it accumulates in f32 whatever the dtype), in
    /// the input's dtype: one kernel per norm, where casting to f32 and back
    /// as transformers does would take three.
    fn forward(&self, x: &Array) -> Result<Array> {
        fast::rms_norm(x, Some(&self.scale), self.eps)
    }
}

struct Layer {
    kind: LayerKind,
    input_layernorm: GemmaNorm,
    self_attn: Attention<GemmaNorm>,
    post_attention_layernorm: GemmaNorm,
    pre_feedforward_layernorm: GemmaNorm,
    mlp: GatedMlp,
    post_feedforward_layernorm: GemmaNorm,
}

/// A loaded Gemma 3 text model.
pub struct Gemma3 {
    embed_tokens: Matrix,
    embed_scale: Array,
    layers: Vec<Layer>,
    norm: GemmaNorm,
    lm_head: Option<Matrix>,
    rope_global: RotaryEmbedding,
    rope_local: RotaryEmbedding,
    sliding_window: usize,
    final_logit_softcapping: Option<f32>,
    dtype: Dtype,
    /// The fused q/k norm and RoPE kernel of decode steps, on MLX's CUDA
    /// backend.
    qk: Option<QkRope>,
}

impl Gemma3 {
    /// Builds the model from `config` and `weights` (taking every tensor it uses).
    pub fn load(config: &Gemma3Config, w: &mut Weights) -> std::result::Result<Self, LoadError> {
        let c = &config.text;
        let q = c.quantization;
        let eps = c.rms_norm_eps;
        let hidden = c.hidden_size;
        let embed_tokens = Matrix::load(w, "model.embed_tokens", c.vocab_size, hidden, q)?;
        let dtype = w.float_dtype.unwrap_or(Dtype::Float32);
        // transformers: `embed * embed_scale.to(weight.dtype)` with the scale a
        // float32 tensor of the Python float √hidden.
        let embed_scale = Array::from_f32((f64::from(hidden)).sqrt() as f32).as_dtype(dtype)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let norm = |w: &mut Weights, name: &str| {
                    GemmaNorm::load(w, &format!("{p}.{name}"), hidden, eps)
                };
                Ok(Layer {
                    kind: config.layer_types[i as usize],
                    input_layernorm: norm(w, "input_layernorm")?,
                    self_attn: Attention::load(
                        w,
                        &format!("{p}.self_attn"),
                        c,
                        config.biases,
                        config.query_pre_attn_scalar.powf(-0.5),
                        |w, name| GemmaNorm::load(w, name, c.head_dim, c.rms_norm_eps).map(Some),
                    )?,
                    post_attention_layernorm: norm(w, "post_attention_layernorm")?,
                    pre_feedforward_layernorm: norm(w, "pre_feedforward_layernorm")?,
                    mlp: GatedMlp::load(
                        w,
                        &format!("{p}.mlp"),
                        c,
                        config.mlp_bias,
                        Activation::GeluTanh,
                    )?,
                    post_feedforward_layernorm: norm(w, "post_feedforward_layernorm")?,
                })
            })
            .collect::<std::result::Result<Vec<_>, LoadError>>()?;
        let norm = GemmaNorm::load(w, "model.norm", hidden, eps)?;
        let lm_head = if c.tie_word_embeddings {
            if w.contains("lm_head.weight") {
                let _ = Matrix::load(w, "lm_head", c.vocab_size, hidden, q)?;
            }
            None
        } else {
            Some(Matrix::load(w, "lm_head", c.vocab_size, hidden, q)?)
        };
        Ok(Self {
            embed_tokens,
            embed_scale,
            layers,
            norm,
            lm_head,
            rope_global: RotaryEmbedding::new(c.head_dim, &config.rope)?,
            rope_local: RotaryEmbedding::new(c.head_dim, &config.rope_local)?,
            sliding_window: config.sliding_window,
            final_logit_softcapping: config.final_logit_softcapping,
            dtype,
            qk: QkRope::new(
                QkShape {
                    heads: c.num_attention_heads,
                    kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                    norm_eps: Some(c.rms_norm_eps),
                },
                dtype,
                config.query_pre_attn_scalar.powf(-0.5),
            )
            .map_err(|e| FormatError::Config(format!("fused kernel: {e}")))?,
        })
    }
}

impl Gemma3 {
    /// The final logit soft-capping, where the model has one.
    fn softcap(&self, logits: Array) -> Result<Array> {
        match self.final_logit_softcapping {
            Some(cap) => {
                let cap = Array::from_f32(cap).as_dtype(logits.dtype())?;
                tanh(logits.divide(&cap)?)?.multiply(&cap)
            }
            None => Ok(logits),
        }
    }
}

impl CausalLm for Gemma3 {
    fn forward(&self, ids: &Array, caches: &mut [LayerCache], last_only: bool) -> Result<Array> {
        let mut h = self.embed_tokens.rows(ids)?.multiply(&self.embed_scale)?;
        let n = self.layers.len();
        let qk = self.qk.as_ref();
        for (i, (layer, cache)) in self.layers.iter().zip(caches.iter_mut()).enumerate() {
            let rope = match layer.kind {
                LayerKind::Sliding => &self.rope_local,
                LayerKind::Full => &self.rope_global,
            };
            let last = last_only && i + 1 == n;
            let slots = || layer_slots(&layer.self_attn, &layer.mlp);
            h = run_layer(&h, cache, slots, move |h, cache| {
                let a = layer.self_attn.forward(
                    &layer.input_layernorm.forward(h)?,
                    cache,
                    rope,
                    last,
                    qk,
                )?;
                let h = if last { last_keepdim(h) } else { h.clone() };
                let h = h.add(layer.post_attention_layernorm.forward(&a)?)?;
                let m = layer
                    .mlp
                    .forward(&layer.pre_feedforward_layernorm.forward(&h)?)?;
                h.add(layer.post_feedforward_layernorm.forward(&m)?)
            })?;
        }
        self.norm.forward(&h)
    }

    fn logits(&self, h: &Array) -> Result<Array> {
        let logits = self
            .lm_head
            .as_ref()
            .unwrap_or(&self.embed_tokens)
            .matmul_t(h)?;
        self.softcap(logits)
    }

    fn logit_parts(&self, h: &Array) -> Result<Vec<(i32, Array)>> {
        self.lm_head
            .as_ref()
            .unwrap_or(&self.embed_tokens)
            .matmul_t_parts(h)?
            .into_iter()
            .map(|(lo, part)| Ok((lo, self.softcap(part)?)))
            .collect()
    }

    fn lora_targets(&self) -> Vec<LoraTarget<'_>> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| layer_targets(i, &l.self_attn, &l.mlp))
            .collect()
    }

    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn new_caches(&self, context: Option<Rotation>) -> Vec<LayerCache> {
        self.layers
            .iter()
            .map(|layer| match layer.kind {
                // A sliding layer keeps its own window unless the context
                // bound is shorter.
                LayerKind::Sliding => LayerCache::new(Some(match context {
                    Some(c) if c.window < self.sliding_window => c,
                    _ => Rotation::sliding(self.sliding_window),
                })),
                LayerKind::Full => LayerCache::new(context),
            })
            .collect()
    }
}

//! The Qwen3 / Qwen2 / Llama decoder family: pre-norm decoder layers with
//! grouped-query attention, RoPE (with Llama 3 scaling when configured),
//! optional q/k RMSNorm (Qwen3) and q/k/v biases (Qwen2), and a SwiGLU MLP.

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

use inference_formats::config::{Defaults, HfConfig, LayerKind, Rope, TextConfig};

use crate::cache::{LayerCache, Rotation};
use crate::error::{FormatError, LoadError};
use crate::load::weights::Weights;
use crate::models::fused::{step_applies, wanted, AddNorm, Kind, QkRope, QkShape};
use crate::models::fused_gemv::{Fold, FusedGemv, Storage};
use crate::models::grad_checkpoint::run_layer;
use crate::models::layers::{
    last_keepdim, Activation, Attention, AttentionBiases, GatedMlp, Matrix, RmsNorm,
    RotaryEmbedding,
};
use crate::models::lora::LoraTarget;
use crate::models::{layer_slots, layer_targets, Architecture, CausalLm, ModelSpec};

type Result<T> = std::result::Result<T, Exception>;

/// The model types this file implements.
pub const ARCHITECTURE: Architecture = Architecture {
    model_types: &["qwen3", "qwen2", "llama"],
    read: |c| Ok(Box::new(DecoderConfig::from_hf(c)?)),
};

/// Where `config.json` is silent (transformers' defaults for Llama).
const DEFAULTS: Defaults = Defaults {
    rms_norm_eps: 1e-6,
    max_position_embeddings: 2048,
    tie_word_embeddings: false,
    head_dim: None,
};

/// A decoder-family model's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// Sizes, context, quantisation and special ids.
    pub text: TextConfig,
    /// Which projections have biases (Qwen2 always has q/k/v biases; the
    /// others follow `attention_bias`).
    pub biases: AttentionBiases,
    /// RMSNorm on queries and keys per head (Qwen3).
    pub qk_norm: bool,
    /// Biases in the MLP (`mlp_bias`).
    pub mlp_bias: bool,
    /// RoPE (`rope_theta` / `rope_scaling`, or `rope_parameters`).
    pub rope: Rope,
}

impl DecoderConfig {
    /// Reads the configuration of a `qwen3`, `qwen2` or `llama` model.
    /// Keys that change the maths in ways this file does not implement are
    /// refused, naming the key: sliding-window attention, final-logit
    /// soft-capping, `query_pre_attn_scalar`, activations other than SiLU.
    pub fn from_hf(c: &HfConfig) -> std::result::Result<Self, FormatError> {
        let text = TextConfig::read(c, &DEFAULTS)?;
        let model_type = c.model_type();
        let activation = c.activation("silu")?;
        if !["silu", "swish"].contains(&activation.as_str()) {
            return Err(FormatError::Unsupported(format!(
                "activation {activation:?} for {model_type}"
            )));
        }
        let rope = c.rope("full_attention", "rope_theta", 10_000.0)?;
        let layer_types = c.layer_types(text.num_hidden_layers as usize, None)?;
        let refuse = |what: String| Err(FormatError::Unsupported(what));
        if c.get::<bool>("use_sliding_window")? == Some(true) {
            return refuse(format!(
                "config key `use_sliding_window: true` (sliding-window attention) for {model_type}"
            ));
        }
        if layer_types.contains(&LayerKind::Sliding) {
            return refuse(format!(
                "config key `layer_types` with `sliding_attention` layers for {model_type}"
            ));
        }
        if c.get::<f32>("final_logit_softcapping")?.is_some() {
            return refuse(format!(
                "config key `final_logit_softcapping` (logit soft-capping) for {model_type}"
            ));
        }
        if c.get::<f32>("query_pre_attn_scalar")?.is_some() {
            return refuse(format!(
                "config key `query_pre_attn_scalar` (a non-standard attention scale) for {model_type}"
            ));
        }
        let attention_bias = c.get::<bool>("attention_bias")?.unwrap_or(false);
        Ok(Self {
            biases: AttentionBiases {
                qkv: model_type == "qwen2" || attention_bias,
                o: attention_bias,
            },
            qk_norm: model_type == "qwen3",
            mlp_bias: c.get::<bool>("mlp_bias")?.unwrap_or(false),
            rope,
            text,
        })
    }
}

impl ModelSpec for DecoderConfig {
    fn text(&self) -> &TextConfig {
        &self.text
    }

    fn text_mut(&mut self) -> &mut TextConfig {
        &mut self.text
    }

    fn build(&self, weights: &mut Weights) -> std::result::Result<Box<dyn CausalLm>, LoadError> {
        Ok(Box::new(Decoder::load(self, weights)?))
    }
}

struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention<RmsNorm>,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
}

/// A loaded decoder-family model.
pub struct Decoder {
    embed_tokens: Matrix,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// `None` when tied to the embedding.
    lm_head: Option<Matrix>,
    rope: RotaryEmbedding,
    /// The fused decode-step kernels, on MLX's CUDA backend.
    fused: Fused,
}

/// A decoder's fused kernels ([`crate::models::fused`]), where built.
struct Fused {
    add_norm: Option<AddNorm>,
    qk: Option<QkRope>,
    /// Built only with [`Fused::qk`].
    gemv: Option<LayerGemvs>,
}

/// A decoder layer's four products with what [`FusedGemv`] folds in.
struct LayerGemvs {
    /// Input norm and q/k/v.
    qkv: FusedGemv,
    /// Output projection and the residual add.
    o: FusedGemv,
    /// Post-attention norm, gate/up and SiLU × up.
    gate_up: FusedGemv,
    /// Down projection and the residual add.
    down: FusedGemv,
}

impl LayerGemvs {
    /// The kernels for `c`'s sizes in `dtype`, for weights stored as
    /// `first`'s (the first layer's: a layer stored otherwise, such as one
    /// quantised with other bits, runs MLX's operations), where `INFER_FUSE`
    /// asks for them (for quantised weights, `qgemv` too) and every one
    /// applies.
    fn new(c: &TextConfig, dtype: Dtype, first: &Layer) -> Result<Option<Self>> {
        if !wanted(Kind::Gemv) {
            return Ok(None);
        }
        let (Some((qkv, o)), Some((gate_up, down))) =
            (first.self_attn.plain_qkv_o(), first.mlp.plain_swiglu())
        else {
            return Ok(None);
        };
        let quantised = [qkv, o, gate_up, down]
            .iter()
            .any(|w| w.storage() != Storage::Dense);
        if quantised && !wanted(Kind::QGemv) {
            return Ok(None);
        }
        let (hidden, eps) = (c.hidden_size, c.rms_norm_eps);
        let attn = c.num_attention_heads * c.head_dim;
        let qkv_rows = attn + 2 * c.num_key_value_heads * c.head_dim;
        let make = |fold, k, n, storage| FusedGemv::make(fold, k, n, eps, dtype, storage);
        Ok(
            match (
                make(Fold::Norm, hidden, qkv_rows, qkv.storage())?,
                make(Fold::Residual, attn, hidden, o.storage())?,
                make(
                    Fold::NormSwiglu,
                    hidden,
                    c.intermediate_size,
                    gate_up.storage(),
                )?,
                make(Fold::Residual, c.intermediate_size, hidden, down.storage())?,
            ) {
                (Some(qkv), Some(o), Some(gate_up), Some(down)) => Some(Self {
                    qkv,
                    o,
                    gate_up,
                    down,
                }),
                _ => None,
            },
        )
    }
}

impl Decoder {
    /// Builds the model from `config` and `weights` (taking every tensor it uses).
    pub fn load(config: &DecoderConfig, w: &mut Weights) -> std::result::Result<Self, LoadError> {
        let c = &config.text;
        let q = c.quantization;
        let attn_scale = 1.0 / (c.head_dim as f32).sqrt();
        let embed_tokens = Matrix::load(w, "model.embed_tokens", c.vocab_size, c.hidden_size, q)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Layer {
                    input_layernorm: RmsNorm::load(
                        w,
                        &format!("{p}.input_layernorm"),
                        c.hidden_size,
                        c.rms_norm_eps,
                    )?,
                    self_attn: Attention::load(
                        w,
                        &format!("{p}.self_attn"),
                        c,
                        config.biases,
                        attn_scale,
                        |w, name| match config.qk_norm {
                            true => RmsNorm::load(w, name, c.head_dim, c.rms_norm_eps).map(Some),
                            false => Ok(None),
                        },
                    )?,
                    post_attention_layernorm: RmsNorm::load(
                        w,
                        &format!("{p}.post_attention_layernorm"),
                        c.hidden_size,
                        c.rms_norm_eps,
                    )?,
                    mlp: GatedMlp::load(
                        w,
                        &format!("{p}.mlp"),
                        c,
                        config.mlp_bias,
                        Activation::Silu,
                    )?,
                })
            })
            .collect::<std::result::Result<Vec<_>, LoadError>>()?;
        let norm = RmsNorm::load(w, "model.norm", c.hidden_size, c.rms_norm_eps)?;
        // Some tied checkpoints still ship an `lm_head.weight`; a tied model uses
        // the embedding either way, so a redundant copy is dropped, not an error.
        let lm_head = if c.tie_word_embeddings {
            if w.contains("lm_head.weight") {
                let _ = Matrix::load(w, "lm_head", c.vocab_size, c.hidden_size, q)?;
            }
            None
        } else {
            Some(Matrix::load(w, "lm_head", c.vocab_size, c.hidden_size, q)?)
        };
        let rope = RotaryEmbedding::new(c.head_dim, &config.rope)?;
        let dtype = norm.weight.dtype();
        let kernel =
            |e: Exception| LoadError::from(FormatError::Config(format!("fused kernel: {e}")));
        let qk = QkRope::new(
            QkShape {
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                norm_eps: config.qk_norm.then_some(c.rms_norm_eps),
            },
            dtype,
            attn_scale,
        )
        .map_err(kernel)?;
        let gemv = match (&qk, layers.first()) {
            (Some(_), Some(first)) => LayerGemvs::new(c, dtype, first).map_err(kernel)?,
            _ => None,
        };
        let fused = Fused {
            add_norm: AddNorm::new(c.hidden_size, c.rms_norm_eps, dtype).map_err(kernel)?,
            qk,
            gemv,
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            fused,
        })
    }
}

impl Decoder {
    /// A decode step of one row through [`LayerGemvs`] (each layer that
    /// they do not fit, through MLX's operations); `None` (nothing
    /// computed) where they are not built or `h` is not one row's step.
    fn gemv_step(&self, h: &Array, caches: &mut [LayerCache]) -> Result<Option<Array>> {
        let (Some(g), Some(qk)) = (&self.fused.gemv, &self.fused.qk) else {
            return Ok(None);
        };
        if h.dim(0) != 1 || !step_applies(h, self.dtype()) {
            return Ok(None);
        }
        let mut h = h.clone();
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            h = match self.gemv_layer(layer, &h, cache, g, qk)? {
                Some(next) => next,
                None => layer_step(layer, &h, cache, &self.rope, false, Some(qk))?,
            };
        }
        self.norm.forward(&h).map(Some)
    }

    /// One layer's step through `g`; `None` (nothing computed) where the
    /// layer's weights or norms are not theirs (adapters, biases, another
    /// storage than the first layer's, a tensor-parallel weight).
    fn gemv_layer(
        &self,
        layer: &Layer,
        h: &Array,
        cache: &mut LayerCache,
        g: &LayerGemvs,
        qk: &QkRope,
    ) -> Result<Option<Array>> {
        let (Some((wqkv, wo)), Some((wgu, wd))) =
            (layer.self_attn.plain_qkv_o(), layer.mlp.plain_swiglu())
        else {
            return Ok(None);
        };
        let (n_in, n_post) = (&layer.input_layernorm, &layer.post_attention_layernorm);
        let fits = g.qkv.takes(&wqkv, Some((&n_in.weight, n_in.eps)))
            && g.o.takes(&wo, None)
            && g.gate_up.takes(&wgu, Some((&n_post.weight, n_post.eps)))
            && g.down.takes(&wd, None);
        if !fits {
            return Ok(None);
        }
        let qkv = g.qkv.apply(h, Some(&n_in.weight), &wqkv, None)?;
        let Some(heads) = layer
            .self_attn
            .attend_projected(&qkv, cache, &self.rope, qk)?
        else {
            return Ok(None);
        };
        let h1 = g.o.apply(&heads, None, &wo, Some(h))?;
        let act = g.gate_up.apply(&h1, Some(&n_post.weight), &wgu, None)?;
        g.down.apply(&act, None, &wd, Some(&h1)).map(Some)
    }

    /// A decode step with each residual add and the norm after it in one
    /// kernel ([`AddNorm`]); `None` (nothing computed) where the kernel
    /// does not apply to `h`.
    fn fused_step(&self, h: &Array, caches: &mut [LayerCache]) -> Result<Option<Array>> {
        let Some(add_norm) = &self.fused.add_norm else {
            return Ok(None);
        };
        let (Some(first), true) = (self.layers.first(), add_norm.applies(h)) else {
            return Ok(None);
        };
        let qk = self.fused.qk.as_ref();
        let mut h = h.clone();
        let mut normed = first.input_layernorm.forward(&h)?;
        for (i, (layer, cache)) in self.layers.iter().zip(caches.iter_mut()).enumerate() {
            let a = layer
                .self_attn
                .forward(&normed, cache, &self.rope, false, qk)?;
            let (h1, n1) = add_norm.apply(&h, &a, &layer.post_attention_layernorm)?;
            let m = layer.mlp.forward(&n1)?;
            let next = self
                .layers
                .get(i + 1)
                .map_or(&self.norm, |l| &l.input_layernorm);
            (h, normed) = add_norm.apply(&h1, &m, next)?;
        }
        Ok(Some(normed))
    }
}

/// `layer` over `h` through MLX's operations (and the q/k kernel where
/// given), extending `cache`; with `last`, for the last position only.
fn layer_step(
    layer: &Layer,
    h: &Array,
    cache: &mut LayerCache,
    rope: &RotaryEmbedding,
    last: bool,
    qk: Option<&QkRope>,
) -> Result<Array> {
    let a = layer
        .self_attn
        .forward(&layer.input_layernorm.forward(h)?, cache, rope, last, qk)?;
    let h = if last { last_keepdim(h) } else { h.clone() };
    let h = h.add(a)?;
    let m = layer
        .mlp
        .forward(&layer.post_attention_layernorm.forward(&h)?)?;
    h.add(m)
}

impl CausalLm for Decoder {
    fn forward(&self, ids: &Array, caches: &mut [LayerCache], last_only: bool) -> Result<Array> {
        let mut h = self.embed_tokens.rows(ids)?;
        if let Some(out) = self.gemv_step(&h, caches)? {
            return Ok(out);
        }
        if let Some(out) = self.fused_step(&h, caches)? {
            return Ok(out);
        }
        let n = self.layers.len();
        let rope = &self.rope;
        let qk = self.fused.qk.as_ref();
        for (i, (layer, cache)) in self.layers.iter().zip(caches.iter_mut()).enumerate() {
            let last = last_only && i + 1 == n;
            let slots = || layer_slots(&layer.self_attn, &layer.mlp);
            h = run_layer(&h, cache, slots, move |h, cache| {
                layer_step(layer, h, cache, rope, last, qk)
            })?;
        }
        self.norm.forward(&h)
    }

    fn logits(&self, h: &Array) -> Result<Array> {
        self.lm_head
            .as_ref()
            .unwrap_or(&self.embed_tokens)
            .matmul_t(h)
    }

    fn logit_parts(&self, h: &Array) -> Result<Vec<(i32, Array)>> {
        self.lm_head
            .as_ref()
            .unwrap_or(&self.embed_tokens)
            .matmul_t_parts(h)
    }

    fn new_caches(&self, context: Option<Rotation>) -> Vec<LayerCache> {
        self.layers
            .iter()
            .map(|_| LayerCache::new(context))
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
        self.norm.weight.dtype()
    }
}

//! The Qwen3 / Qwen2 / Llama decoder family: pre-norm decoder layers with
//! grouped-query attention, RoPE (with Llama 3 scaling when configured),
//! optional q/k RMSNorm (Qwen3) and q/k/v biases (Qwen2), and a SwiGLU MLP.

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

use crate::cache::{LayerCache, Rotation};
use crate::error::LoadError;
use crate::load::config::ModelConfig;
use crate::load::weights::Weights;
use crate::models::layers::{
    last_keepdim, Activation, Attention, GatedMlp, Matrix, RmsNorm, RotaryEmbedding,
};
use crate::models::CausalLm;

type Result<T> = std::result::Result<T, Exception>;

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
}

impl Decoder {
    /// Builds the model from `config` and `weights` (taking every tensor it uses).
    pub fn load(c: &ModelConfig, w: &mut Weights) -> std::result::Result<Self, LoadError> {
        let q = c.quantization;
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
                        1.0 / (c.head_dim as f32).sqrt(),
                        |w, name| match c.qk_norm {
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
                    mlp: GatedMlp::load(w, &format!("{p}.mlp"), c, Activation::Silu)?,
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
        let rope = RotaryEmbedding::new(c.head_dim, &c.rope)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
        })
    }
}

impl CausalLm for Decoder {
    fn forward(&self, ids: &Array, caches: &mut [LayerCache], last_only: bool) -> Result<Array> {
        let mut h = self.embed_tokens.rows(ids)?;
        let n = self.layers.len();
        for (i, (layer, cache)) in self.layers.iter().zip(caches.iter_mut()).enumerate() {
            let last = last_only && i + 1 == n;
            let a = layer.self_attn.forward(
                &layer.input_layernorm.forward(&h)?,
                cache,
                &self.rope,
                last,
            )?;
            if last {
                h = last_keepdim(&h);
            }
            h = h.add(a)?;
            let m = layer
                .mlp
                .forward(&layer.post_attention_layernorm.forward(&h)?)?;
            h = h.add(m)?;
        }
        self.norm.forward(&h)
    }

    fn logits(&self, h: &Array) -> Result<Array> {
        self.lm_head
            .as_ref()
            .unwrap_or(&self.embed_tokens)
            .matmul_t(h)
    }

    fn new_caches(&self, context: Option<Rotation>) -> Vec<LayerCache> {
        self.layers
            .iter()
            .map(|_| LayerCache::new(context))
            .collect()
    }

    fn dtype(&self) -> Dtype {
        self.norm.weight.dtype()
    }
}

//! Model architectures, one file each, and dispatch by `model_type`.

pub mod decoder;
pub mod layers;

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

use crate::cache::KvCache;
use crate::error::LoadError;
use crate::load::config::{Family, ModelConfig};
use crate::load::weights::Weights;

/// A causal language model: token ids in, hidden states and logits out.
pub trait CausalLm: Send {
    /// Final-normed hidden states `[B, L, hidden]` of `ids` `[B, L]`, after the
    /// positions already in `caches` (one cache per layer), which it extends.
    fn hidden(&self, ids: &Array, caches: &mut [KvCache]) -> Result<Array, Exception>;

    /// Logits `[…, vocab]` of hidden states `[…, hidden]`.
    fn logits(&self, h: &Array) -> Result<Array, Exception>;

    /// Number of decoder layers (one cache each).
    fn num_layers(&self) -> usize;

    /// The compute dtype.
    fn dtype(&self) -> Dtype;

    /// Fresh, empty caches for one sequence.
    fn new_caches(&self) -> Vec<KvCache> {
        (0..self.num_layers()).map(|_| KvCache::new()).collect()
    }
}

/// Builds the model `config` describes from `weights`, then checks that every
/// tensor was used.
pub fn build(config: &ModelConfig, mut weights: Weights) -> Result<Box<dyn CausalLm>, LoadError> {
    let model: Box<dyn CausalLm> = match config.family() {
        Family::Decoder => Box::new(decoder::Decoder::load(config, &mut weights)?),
        Family::Gemma3 => {
            return Err(LoadError::UnsupportedArchitecture(format!(
                "{} (Gemma 3 is not implemented yet)",
                config.model_type
            )))
        }
    };
    weights.finish()?;
    Ok(model)
}

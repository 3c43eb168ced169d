//! Model architectures, one file each, and dispatch by `model_type`.

pub mod decoder;
pub mod gemma3;
pub mod layers;

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

use crate::cache::LayerCache;
use crate::error::LoadError;
use crate::load::config::{Family, ModelConfig};
use crate::load::weights::Weights;

/// A causal language model: token ids in, hidden states and logits out.
pub trait CausalLm: Send {
    /// Final-normed hidden states `[B, L, hidden]` of `ids` `[B, L]`, after the
    /// positions already in `caches` (one cache per layer), which it extends.
    fn hidden(&self, ids: &Array, caches: &mut [LayerCache]) -> Result<Array, Exception> {
        self.forward(ids, caches, false)
    }

    /// The final-normed hidden state of the last position only, `[B, 1,
    /// hidden]`, extending `caches` with every position: the final layer
    /// attends, projects and runs its MLP for that position alone, which is
    /// all a prefill needs.
    fn hidden_last(&self, ids: &Array, caches: &mut [LayerCache]) -> Result<Array, Exception> {
        self.forward(ids, caches, true)
    }

    /// [`hidden`](Self::hidden) (`last_only` false) or
    /// [`hidden_last`](Self::hidden_last) (true).
    fn forward(
        &self,
        ids: &Array,
        caches: &mut [LayerCache],
        last_only: bool,
    ) -> Result<Array, Exception>;

    /// Logits `[…, vocab]` of hidden states `[…, hidden]`.
    fn logits(&self, h: &Array) -> Result<Array, Exception>;

    /// The compute dtype.
    fn dtype(&self) -> Dtype;

    /// Fresh, empty caches for one sequence, one per layer. With `context`,
    /// every cache keeps at most that many positions (a rotating cache), which
    /// bounds memory; sliding-window layers keep their window either way.
    fn new_caches(&self, context: Option<usize>) -> Vec<LayerCache>;
}

/// Builds the model `config` describes from `weights`, then checks that every
/// tensor was used.
pub fn build(config: &ModelConfig, mut weights: Weights) -> Result<Box<dyn CausalLm>, LoadError> {
    let model: Box<dyn CausalLm> = match config.family() {
        Family::Decoder => Box::new(decoder::Decoder::load(config, &mut weights)?),
        Family::Gemma3 => Box::new(gemma3::Gemma3::load(config, &mut weights)?),
    };
    weights.finish()?;
    Ok(model)
}

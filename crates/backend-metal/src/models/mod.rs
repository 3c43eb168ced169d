//! Model architectures, one file each, and dispatch by `model_type`.

pub mod decoder;
pub mod gemma3;
pub mod layers;

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

use crate::cache::{LayerCache, Rotation};
use crate::error::LoadError;
use crate::load::config::{Family, ModelConfig};
use crate::load::weights::Weights;

/// A causal language model: token ids in, hidden states and logits out.
///
/// Not `Send`: a model holds compiled MLX functions, which belong to the
/// thread that made them; each model is built on, and stays on, its worker.
pub trait CausalLm {
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
    /// every cache keeps the positions it says (a rotating cache with
    /// attention sinks), which bounds memory; sliding-window layers keep
    /// their own window where it is shorter.
    fn new_caches(&self, context: Option<Rotation>) -> Vec<LayerCache>;
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use mlx_rs::{Array, Dtype};

    use super::*;

    /// A bf16 model computes in bf16 from end to end: a stray f32 constant
    /// (an activation's coefficients, say) would promote the hidden states,
    /// and every matmul after it would convert its bf16 weights to f32 on
    /// each step.
    #[test]
    fn bf16_models_keep_their_hidden_states_in_bf16() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
        for name in ["qwen3-bf16", "gemma3-bf16"] {
            let dir = fixtures.join(name);
            let config = ModelConfig::load(&dir).unwrap();
            let model = build(&config, Weights::load(&dir).unwrap()).unwrap();
            assert_eq!(model.dtype(), Dtype::Bfloat16, "{name}");
            let mut caches = model.new_caches(None);
            let ids = Array::from_slice(&[1u32, 2, 3, 4], &[1, 4]);
            let h = model.hidden(&ids, &mut caches).unwrap();
            assert_eq!(h.dtype(), Dtype::Bfloat16, "{name}: prefill");
            let last = model.hidden_last(&ids, &mut caches).unwrap();
            assert_eq!(last.shape(), &[1, 1, config.hidden_size], "{name}");
            let step = model
                .hidden(&Array::from_slice(&[5u32], &[1, 1]), &mut caches)
                .unwrap();
            assert_eq!(step.dtype(), Dtype::Bfloat16, "{name}: decode");
            assert_eq!(
                model.logits(&step).unwrap().dtype(),
                Dtype::Bfloat16,
                "{name}"
            );
        }
    }
}

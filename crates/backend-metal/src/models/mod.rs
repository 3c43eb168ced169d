//! Model architectures, one file each: every file owns its configuration
//! (read from [`HfConfig`] into a [`ModelSpec`]) and its model (a
//! [`CausalLm`]), and names the `model_type`s it implements in its
//! [`Architecture`]. [`ARCHITECTURES`] lists them; adding an architecture is
//! adding a file and a line there.

pub mod decoder;
pub mod fused;
pub mod fused_attn;
pub mod fused_gemv;
pub mod gemma3;
pub mod grad_checkpoint;
pub mod layers;
pub mod lora;

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

use inference_formats::config::{HfConfig, TextConfig};

use crate::cache::{LayerCache, Rotation};
use crate::error::{FormatError, LoadError};
use crate::load::weights::Weights;
use crate::models::lora::LoraTarget;

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

    /// The same logits in parts along the vocabulary, each with its first
    /// id (a loss reduces over them without concatenating them, which on a
    /// CPU whose matmuls are split saves a copy of every logit).
    fn logit_parts(&self, h: &Array) -> Result<Vec<(i32, Array)>, Exception> {
        Ok(vec![(0, self.logits(h)?)])
    }

    /// The compute dtype.
    fn dtype(&self) -> Dtype;

    /// Fresh, empty caches for one sequence, one per layer. With `context`,
    /// every cache keeps the positions it says (a rotating cache with
    /// attention sinks), which bounds memory; sliding-window layers keep
    /// their own window where it is shorter.
    fn new_caches(&self, context: Option<Rotation>) -> Vec<LayerCache>;

    /// Every linear layer of its decoder layers a LoRA adapter can go on,
    /// layer by layer, in mlx-lm's order within a layer (attention's q, k,
    /// v, o, then the MLP's gate, up, down).
    fn lora_targets(&self) -> Vec<LoraTarget<'_>>;
}

/// The adapter slots of a decoder layer's attention and MLP (what
/// [`grad_checkpoint::run_layer`] passes to a checkpointed layer).
pub fn layer_slots<'a, N: layers::Norm>(
    attention: &'a layers::Attention<N>,
    mlp: &'a layers::GatedMlp,
) -> Vec<&'a lora::LoraSlot> {
    layer_targets(0, attention, mlp).map(|t| t.slot).collect()
}

/// The LoRA targets of a decoder layer's attention and MLP, as model files
/// list them.
pub fn layer_targets<'a, N: layers::Norm>(
    layer: usize,
    attention: &'a layers::Attention<N>,
    mlp: &'a layers::GatedMlp,
) -> impl Iterator<Item = LoraTarget<'a>> {
    let attn = attention.lora_targets().into_iter();
    let mlp = mlp.lora_targets().into_iter();
    attn.chain(mlp)
        .map(move |(key, slot, input, output)| LoraTarget {
            layer,
            key,
            input,
            output,
            slot,
        })
}

/// An architecture's configuration, as its model file reads it.
pub trait ModelSpec: Send + std::fmt::Debug {
    /// What every text model's configuration holds (the engine reads it).
    fn text(&self) -> &TextConfig;

    /// The same, to amend (a GGUF file's special ids and architecture).
    fn text_mut(&mut self) -> &mut TextConfig;

    /// Builds the model from `weights`, taking every tensor it uses.
    fn build(&self, weights: &mut Weights) -> Result<Box<dyn CausalLm>, LoadError>;
}

/// One model file: the `model_type`s it implements and how it reads their
/// configuration.
#[derive(Clone, Copy)]
pub struct Architecture {
    /// The `model_type`s (as [`HfConfig::model_type`] resolves them).
    pub model_types: &'static [&'static str],
    /// Reads the configuration (refusing what the file does not implement).
    pub read: fn(&HfConfig) -> Result<Box<dyn ModelSpec>, FormatError>,
}

/// Every architecture this backend runs.
pub const ARCHITECTURES: &[Architecture] = &[decoder::ARCHITECTURE, gemma3::ARCHITECTURE];

/// The configuration of the model `config` describes, read by the file of
/// its architecture; [`FormatError::UnsupportedArchitecture`] when no file
/// implements its `model_type`.
pub fn read_config(config: &HfConfig) -> Result<Box<dyn ModelSpec>, FormatError> {
    let model_type = config.model_type();
    let arch = ARCHITECTURES
        .iter()
        .find(|a| a.model_types.contains(&model_type))
        .ok_or_else(|| FormatError::UnsupportedArchitecture(model_type.to_owned()))?;
    (arch.read)(config)
}

/// Builds the model `spec` describes from `weights`, then checks that every
/// tensor was used.
pub fn build(spec: &dyn ModelSpec, mut weights: Weights) -> Result<Box<dyn CausalLm>, LoadError> {
    let model = spec.build(&mut weights)?;
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
            let config = read_config(&HfConfig::load(&dir).unwrap()).unwrap();
            let model = build(&*config, Weights::load(&dir).unwrap()).unwrap();
            assert_eq!(model.dtype(), Dtype::Bfloat16, "{name}");
            let mut caches = model.new_caches(None);
            let ids = Array::from_slice(&[1u32, 2, 3, 4], &[1, 4]);
            let h = model.hidden(&ids, &mut caches).unwrap();
            assert_eq!(h.dtype(), Dtype::Bfloat16, "{name}: prefill");
            let last = model.hidden_last(&ids, &mut caches).unwrap();
            assert_eq!(last.shape(), &[1, 1, config.text().hidden_size], "{name}");
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

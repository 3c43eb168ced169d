//! LoRA training on MLX: the masked cross-entropy loss mlx-lm trains with,
//! its value and gradients with respect to the adapters (through MLX's
//! `value_and_grad`; the base weights are constants of the graph), and
//! optimiser steps as MLX defines them.

use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{IndexOp, NewAxis};
use mlx_rs::ops::{ge, le, logical_and};
use mlx_rs::optimizers::{Adam, AdamW, Optimizer, Sgd};
use mlx_rs::transforms::value_and_grad_with_argnums;
use mlx_rs::{Array, Dtype};

use crate::models::lora::Lora;
use crate::models::CausalLm;

type Result<T> = std::result::Result<T, Exception>;

/// Adapters on some of a model's LoRA targets: which ones, and their
/// hyper-parameters. The values live in the targets' slots (for inference)
/// or in a parameter list that [`Adapted::install`] puts there (for
/// differentiation).
#[derive(Debug, Clone)]
pub struct Adapted {
    /// Indices into [`CausalLm::lora_targets`], in order.
    pub targets: Vec<usize>,
    /// The factor on each delta.
    pub scale: f32,
    /// Dropout on each adapter's input while training.
    pub dropout: f32,
}

impl Adapted {
    /// Puts `params` (`A`, `B` of each adapted target in turn) into the
    /// targets' slots, with dropout when `training`.
    pub fn install(&self, model: &dyn CausalLm, params: &[Array], training: bool) -> Result<()> {
        if params.len() != 2 * self.targets.len() {
            return Err(Exception::custom(format!(
                "{} adapter arrays for {} targets",
                params.len(),
                self.targets.len()
            )));
        }
        let all = model.lora_targets();
        for (k, &t) in self.targets.iter().enumerate() {
            let target = all
                .get(t)
                .ok_or_else(|| Exception::custom(format!("no LoRA target {t}")))?;
            target.slot.set(Some(Lora {
                a: params[2 * k].clone(),
                b: params[2 * k + 1].clone(),
                scale: self.scale,
                dropout: if training { self.dropout } else { 0.0 },
            }));
        }
        Ok(())
    }

    /// The adapters' current values from the slots (`A`, `B` per target).
    pub fn params(&self, model: &dyn CausalLm) -> Result<Vec<Array>> {
        let all = model.lora_targets();
        let mut out = Vec::with_capacity(2 * self.targets.len());
        for &t in &self.targets {
            let lora = all
                .get(t)
                .and_then(|target| target.slot.get())
                .ok_or_else(|| Exception::custom(format!("LoRA target {t} has no adapter")))?;
            out.push(lora.a);
            out.push(lora.b);
        }
        Ok(out)
    }
}

/// mlx-lm's masked cross-entropy over a batch `[B, T]` of token ids with
/// `lengths` `[B, 2]` (each row's offset and length): the model reads
/// `batch[:, :-1]` and predicts `batch[:, 1:]`; the target at step `s`
/// (1-based) counts when `offset ≤ s ≤ length` (mlx-lm's rule, which
/// also counts the first padding target of a row shorter than the batch). Returns the mean over the
/// counted targets, in f32, and their number.
pub fn masked_loss(model: &dyn CausalLm, batch: &Array, lengths: &Array) -> Result<(Array, Array)> {
    let t = batch.dim(1);
    let inputs = batch.index((.., ..t - 1));
    let targets = batch.index((.., 1..));
    let mut caches = model.new_caches(None);
    let hidden = model.hidden(&inputs, &mut caches)?;
    let logits = model.logits(&hidden)?.as_dtype(Dtype::Float32)?;
    let picked = logits
        .take_along_axis(targets.index((.., .., NewAxis)), -1)?
        .squeeze_axes(&[-1])?;
    let ce = logits.logsumexp_axis(-1, false)?.subtract(&picked)?;
    let steps = Array::arange::<_, i32>(1, t, None)?;
    let offsets = lengths.index((.., 0..1));
    let ends = lengths.index((.., 1..2));
    let mask =
        logical_and(&ge(&steps, &offsets)?, &le(&steps, &ends)?)?.as_dtype(Dtype::Float32)?;
    let ntoks = mask.sum(None)?;
    let loss = ce.multiply(&mask)?.sum(None)?.divide(&ntoks)?;
    Ok((loss, ntoks))
}

/// The loss of `batch` with the adapters `params` (see [`masked_loss`]),
/// the number of targets it counted, and its gradient with respect to
/// each of `params`.
pub fn loss_and_grads(
    model: &dyn CausalLm,
    adapted: &Adapted,
    params: &[Array],
    batch: &Array,
    lengths: &Array,
    training: bool,
) -> Result<(Array, Array, Vec<Array>)> {
    let argnums: Vec<i32> = (0..params.len() as i32).collect();
    let f = |p: &[Array]| -> Result<Vec<Array>> {
        adapted.install(model, p, training)?;
        let (loss, ntoks) = masked_loss(model, batch, lengths)?;
        Ok(vec![loss, ntoks])
    };
    let (values, grads) = value_and_grad_with_argnums(f, &argnums[..])(params)?;
    // The slots hold the traced arrays now: put the values back.
    adapted.install(model, params, false)?;
    let mut values = values.into_iter();
    match (values.next(), values.next()) {
        (Some(loss), Some(ntoks)) => Ok((loss, ntoks, grads)),
        _ => Err(Exception::custom("the loss function returned too little")),
    }
}

/// An optimiser as MLX defines it, stepping named parameters.
pub enum Optimiser {
    /// Adam without bias correction (mlx-lm's default).
    Adam(Adam),
    /// AdamW: Adam with decoupled weight decay.
    AdamW(AdamW),
    /// Stochastic gradient descent.
    Sgd(Sgd),
}

impl std::fmt::Debug for Optimiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Optimiser::Adam(_) => "Adam",
            Optimiser::AdamW(_) => "AdamW",
            Optimiser::Sgd(_) => "Sgd",
        })
    }
}

impl Optimiser {
    /// Sets the learning rate for the next steps.
    pub fn set_learning_rate(&mut self, lr: f32) {
        match self {
            Optimiser::Adam(o) => o.lr = Array::from_f32(lr),
            Optimiser::AdamW(o) => o.lr = Array::from_f32(lr),
            Optimiser::Sgd(o) => o.lr = lr,
        }
    }

    /// One step of each parameter `params[i]` (named `names[i]`, which keys
    /// its state) along `grads[i]`.
    pub fn step(
        &mut self,
        names: &[std::rc::Rc<str>],
        grads: &[Array],
        params: &mut [Array],
    ) -> Result<()> {
        for ((name, g), p) in names.iter().zip(grads).zip(params.iter_mut()) {
            match self {
                Optimiser::Adam(o) => o.update_single(name, g, p)?,
                Optimiser::AdamW(o) => o.update_single(name, g, p)?,
                Optimiser::Sgd(o) => o.update_single(name, g, p)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::rc::Rc;

    use inference_formats::config::HfConfig;
    use mlx_rs::builder::Builder;
    use mlx_rs::optimizers::{AdamBuilder, AdamWBuilder};

    use super::*;
    use crate::load::weights::Weights;
    use crate::models::{build, read_config};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name)
    }

    fn load(dir: &Path) -> Box<dyn CausalLm> {
        let config = read_config(&HfConfig::load(dir).unwrap()).unwrap();
        build(&*config, Weights::load(dir).unwrap()).unwrap()
    }

    fn values(a: &Array) -> Vec<f32> {
        let a = a.as_dtype(Dtype::Float32).unwrap();
        a.eval().unwrap();
        a.as_slice::<f32>().to_vec()
    }

    /// Every element of `got` within 1e-4 × max|reference| + 1e-6 of it.
    fn assert_close(what: &str, got: &Array, want: &Array) {
        assert_eq!(got.shape(), want.shape(), "{what}");
        let (g, w) = (values(got), values(want));
        let tol = 1e-4 * w.iter().fold(0f32, |m, x| m.max(x.abs())) + 1e-6;
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            assert!(
                (a - b).abs() <= tol,
                "{what}[{i}]: {a} vs {b} (tolerance {tol})"
            );
        }
    }

    /// The fixture's adapters, as PyTorch set them: the adapted targets and
    /// their values in target order.
    fn golden_adapters(
        model: &dyn CausalLm,
        golden: &HashMap<String, Array>,
    ) -> (Adapted, Vec<String>, Vec<Array>) {
        let mut adapted = Adapted {
            targets: Vec::new(),
            scale: 2.0,
            dropout: 0.0,
        };
        let (mut names, mut params) = (Vec::new(), Vec::new());
        for (i, t) in model.lora_targets().iter().enumerate() {
            let path = t.path();
            let a = format!("{path}.lora_a");
            let b = format!("{path}.lora_b");
            if let (Some(va), Some(vb)) = (golden.get(&a), golden.get(&b)) {
                assert_eq!(va.shape(), &[t.input, 4], "{a}");
                assert_eq!(vb.shape(), &[4, t.output], "{b}");
                adapted.targets.push(i);
                names.extend([a, b]);
                params.extend([va.clone(), vb.clone()]);
            }
        }
        (adapted, names, params)
    }

    /// For each fixture architecture, with fixed non-zero adapters on every
    /// linear layer: the masked loss and every adapter gradient equal
    /// PyTorch's (`scripts/fixtures/make_lora_goldens.py`), one Adam and one
    /// AdamW step equal the same update computed in torch, and the adapted
    /// model's logits and greedy ids equal transformers' with the adapters.
    #[test]
    fn lora_loss_gradients_and_steps_match_pytorch() {
        for name in ["qwen3-f32", "qwen2-f32", "llama-f32", "gemma3-f32"] {
            let dir = fixture(name);
            let golden = Array::load_safetensors(dir.join("lora_golden.safetensors")).unwrap();
            let model = load(&dir);
            let (adapted, names, params) = golden_adapters(&*model, &golden);
            assert_eq!(adapted.targets.len(), model.lora_targets().len(), "{name}");
            let (loss, ntoks, grads) = loss_and_grads(
                &*model,
                &adapted,
                &params,
                &golden["input_ids"],
                &golden["lengths"],
                true,
            )
            .unwrap();
            assert_close(&format!("{name} loss"), &loss, &golden["loss"]);
            assert!(values(&ntoks)[0] > 0.0);
            for (n, g) in names.iter().zip(&grads) {
                assert_close(
                    &format!("{name} grad {n}"),
                    g,
                    &golden[&format!("grad.{n}")],
                );
            }
            let keys: Vec<Rc<str>> = names.iter().map(|n| Rc::from(n.as_str())).collect();
            let steps = [
                (
                    "adam",
                    Optimiser::Adam(AdamBuilder::new(1e-2).build().unwrap()),
                ),
                (
                    "adamw",
                    Optimiser::AdamW(AdamWBuilder::new(1e-2).build().unwrap()),
                ),
            ];
            // From torch's gradients: where a gradient is near 0, the first
            // Adam step (`lr · g / (√(g²/1000) + ε)`) turns a difference of
            // 1e-4 in it into a visible one in the update.
            let torch_grads: Vec<Array> = names
                .iter()
                .map(|n| golden[&format!("grad.{n}")].clone())
                .collect();
            for (label, mut opt) in steps {
                let mut stepped = params.clone();
                opt.step(&keys, &torch_grads, &mut stepped).unwrap();
                for (n, p) in names.iter().zip(&stepped) {
                    assert_close(
                        &format!("{name} {label} {n}"),
                        p,
                        &golden[&format!("{label}.{n}")],
                    );
                }
            }

            // Inference with the adapters in place.
            adapted.install(&*model, &params, false).unwrap();
            let prompt = values(&golden["prompt_ids"].as_dtype(Dtype::Float32).unwrap());
            let mut ids: Vec<u32> = prompt.iter().map(|&x| x as u32).collect();
            let mut caches = model.new_caches(None);
            let mut input = Array::from_slice(&ids, &[1, ids.len() as i32]);
            let want = values(&golden["greedy_ids"].as_dtype(Dtype::Float32).unwrap());
            let margins = values(&golden["greedy_margins"]);
            for step in 0..want.len() {
                let h = model.hidden_last(&input, &mut caches).unwrap();
                let logits = model.logits(&h).unwrap().reshape(&[-1]).unwrap();
                if step == 0 {
                    assert_close(
                        &format!("{name} adapted logits"),
                        &logits,
                        &golden["logits"],
                    );
                }
                let v = values(&logits);
                let next = (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b }) as u32;
                if margins[step] >= 1e-3 {
                    assert_eq!(next, want[step] as u32, "{name}: greedy step {step}");
                }
                let next = want[step] as u32;
                ids.push(next);
                input = Array::from_slice(&[next], &[1, 1]);
            }
        }
    }
}

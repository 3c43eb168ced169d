//! LoRA training on MLX: the masked cross-entropy loss mlx-lm trains with,
//! its value and gradients with respect to the adapters (through MLX's
//! `value_and_grad`; the base weights are constants of the graph), and
//! optimiser steps as MLX defines them.

use std::rc::Rc;
use std::time::Instant;

use inference_core::{
    Error, Example, LoraConfig, Optimizer as OptimizerKind, ParameterCounts, TrainOptions,
    TrainProgress, TrainSink, TrainingData,
};
use inference_formats::adapter::AdapterConfig;
use mlx_rs::builder::Builder;
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{IndexOp, NewAxis};
use mlx_rs::ops::{
    concatenate, ge, le, logical_and, lt, maximum, minimum, select, zeros, zeros_dtype, zeros_like,
};
use mlx_rs::optimizers::{Adam, AdamW, Sgd};
use mlx_rs::optimizers::{AdamBuilder, AdamWBuilder, Optimizer, SgdBuilder};
use mlx_rs::transforms::{eval, value_and_grad_with_argnums};
use mlx_rs::{random, Array, Dtype};

use crate::cache::LayerCache;
use crate::checkpoint::{self, RunState};
use crate::error::mlx_error;
use crate::ffi;
use crate::models::grad_checkpoint;
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
/// counted targets, in f32 (each target's loss in the model's dtype, as
/// mlx-lm's), and their number.
pub fn masked_loss(model: &dyn CausalLm, batch: &Array, lengths: &Array) -> Result<(Array, Array)> {
    let t = batch.dim(1);
    let inputs = batch.index((.., ..t - 1));
    let targets = batch.index((.., 1..));
    // No cache: each layer attends the pass's own keys and values.
    let mut caches = model
        .new_caches(None)
        .iter()
        .map(|c| LayerCache::pass(t - 1, c.rotation()))
        .collect::<Result<Vec<_>>>()?;
    let hidden = model.hidden(&inputs, &mut caches)?;
    let ce = cross_entropy(&model.logit_parts(&hidden)?, &targets)?;
    let steps = Array::arange::<_, i32>(1, t, None)?;
    let offsets = lengths.index((.., 0..1));
    let ends = lengths.index((.., 1..2));
    let mask =
        logical_and(&ge(&steps, &offsets)?, &le(&steps, &ends)?)?.as_dtype(Dtype::Float32)?;
    let ntoks = mask.sum(None)?;
    let loss = ce
        .as_dtype(Dtype::Float32)?
        .multiply(&mask)?
        .sum(None)?
        .divide(&ntoks)?;
    Ok((loss, ntoks))
}

/// Per-target cross-entropy `[B, T]` of logits given in parts along the
/// vocabulary (`(first id, [B, T, part])`, see
/// [`CausalLm::logit_parts`]): the log-sum-exp of the parts' log-sum-exps,
/// less the target's logit picked from the part that holds it. Computed in
/// the logits' own dtype, as mlx-lm's `nn.losses.cross_entropy` does (MLX
/// accumulates a reduction of bf16 or f16 in f32): a copy of the logits in
/// f32 would cost two vocabulary-wide f32 arrays per target token, which
/// for Qwen3's 151,936 ids is most of the memory a bf16 step needs beyond
/// mlx-lm's.
fn cross_entropy(parts: &[(i32, Array)], targets: &Array) -> Result<Array> {
    if let [(_, logits)] = parts {
        let picked = logits
            .take_along_axis(targets.index((.., .., NewAxis)), -1)?
            .squeeze_axes(&[-1])?;
        return logits.logsumexp_axis(-1, false)?.subtract(&picked);
    }
    let dtype = parts.first().map_or(Dtype::Float32, |(_, p)| p.dtype());
    let zero = zeros_dtype(&[], dtype)?;
    let mut sums = Vec::with_capacity(parts.len());
    let mut picked = zeros_dtype(targets.shape(), dtype)?;
    for (lo, part) in parts {
        let width = part.dim(-1);
        sums.push(part.logsumexp_axis(-1, true)?);
        let local = targets.subtract(Array::from_int(*lo))?;
        let inside = logical_and(
            &ge(&local, Array::from_int(0))?,
            &lt(&local, Array::from_int(width))?,
        )?;
        let index = minimum(
            &maximum(&local, Array::from_int(0))?,
            Array::from_int(width - 1),
        )?;
        let value = part
            .take_along_axis(index.index((.., .., NewAxis)), -1)?
            .squeeze_axes(&[-1])?;
        picked = picked.add(select(&inside, &value, &zero)?)?;
    }
    concatenate(&sums, -1)?
        .logsumexp_axis(-1, false)?
        .subtract(&picked)
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
    // MLX has no gradient for the fused decode kernels.
    let _plain = crate::models::fused::Suspend::new();
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

/// [`loss_and_grads`] compiled by MLX for `n` adapter arrays: called with
/// the adapters, then the batch and its lengths, it gives the loss, the
/// counted targets and the gradients. MLX traces the step once per batch
/// shape and replays the fused graph after (mlx-lm compiles its step the
/// same way): fewer kernels and fewer intermediate arrays kept for the
/// backward pass. Only for steps without adapter dropout: the dropout masks
/// would be drawn once, at tracing, and replayed. After each call the
/// adapters' slots hold the trace's placeholders: put the adapters back
/// with [`Adapted::install`] before running the model otherwise.
pub fn compiled_loss_and_grads<'m>(
    model: &'m dyn CausalLm,
    adapted: &'m Adapted,
    n: usize,
) -> Result<ffi::Compiled<'m>> {
    if adapted.dropout > 0.0 {
        return Err(Exception::custom(
            "a compiled training step cannot draw adapter dropout",
        ));
    }
    ffi::Compiled::new(
        move |inputs: &[Array]| {
            let (params, rest) = inputs.split_at(n.min(inputs.len()));
            let [batch, lengths] = rest else {
                return Err(Exception::custom(
                    "the compiled step takes the adapters, the batch and its lengths",
                ));
            };
            let (loss, ntoks, grads) =
                loss_and_grads(model, adapted, params, batch, lengths, true)?;
            Ok([loss, ntoks].into_iter().chain(grads).collect())
        },
        false,
    )
}

/// Whether training steps are compiled: on a GPU, where fusing the step's
/// element-wise work pays, unless adapters use dropout;
/// `INFER_TRAIN_COMPILE=0` or `1` overrides (on this project's 2-core CPU
/// a compiled step trained no faster and peaked 3% higher).
fn compile_steps(adapted: &Adapted) -> bool {
    let wanted =
        crate::env_switch("INFER_TRAIN_COMPILE").unwrap_or_else(crate::device::default_is_gpu);
    wanted && adapted.dropout == 0.0
}

/// Adam's (and AdamW's) update of every parameter as one compiled MLX
/// function: inputs `lr, β1, β2, ε, weight decay`, then the parameters,
/// gradients, first and second moments (`n` each); outputs the new
/// parameters, first and second moments. The same arithmetic as MLX's
/// `Adam` (no bias correction) and `AdamW` (the parameter decayed by
/// `1 − lr·wd` first; Adam passes a decay of 0), in a few fused kernels per
/// parameter instead of about ten.
fn fused_adam(n: usize) -> Result<ffi::Compiled<'static>> {
    ffi::Compiled::new(
        move |ins: &[Array]| {
            if ins.len() != 5 + 4 * n {
                return Err(Exception::custom("the fused Adam update lost its inputs"));
            }
            let (lr, b1, b2, eps, wd) = (&ins[0], &ins[1], &ins[2], &ins[3], &ins[4]);
            let one = Array::from_f32(1.0);
            let keep = one.subtract(lr.multiply(wd)?)?;
            let (c1, c2) = (one.subtract(b1)?, one.subtract(b2)?);
            let mut ps = Vec::with_capacity(n);
            let mut ms = Vec::with_capacity(n);
            let mut vs = Vec::with_capacity(n);
            for i in 0..n {
                let (p, g, m, v) = (
                    &ins[5 + i],
                    &ins[5 + n + i],
                    &ins[5 + 2 * n + i],
                    &ins[5 + 3 * n + i],
                );
                let p = p.multiply(&keep)?;
                let m = b1.multiply(m)?.add(c1.multiply(g)?)?;
                let v = b2.multiply(v)?.add(c2.multiply(g.square()?)?)?;
                ps.push(p.subtract(lr.multiply(m.divide(v.sqrt()?.add(eps)?)?)?)?);
                ms.push(m);
                vs.push(v);
            }
            Ok(ps.into_iter().chain(ms).chain(vs).collect())
        },
        false,
    )
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

impl Optimiser {
    /// [`step`](Self::step) through one compiled update of every parameter
    /// (Adam and AdamW; SGD steps as before), built into `fused` on first
    /// use. Parameters without state start from zero moments, as MLX's.
    pub fn step_fused(
        &mut self,
        fused: &mut Option<ffi::Compiled<'static>>,
        names: &[Rc<str>],
        grads: &[Array],
        params: &mut [Array],
    ) -> Result<()> {
        // lr, β1, β2, ε and the weight decay (none for Adam); the moments.
        let (hyper, moments) = match self {
            Optimiser::Adam(o) => (
                [&o.lr, &o.betas.0, &o.betas.1, &o.eps, &Array::from_f32(0.0)].map(Clone::clone),
                &mut o.state,
            ),
            Optimiser::AdamW(o) => (
                [&o.lr, &o.betas.0, &o.betas.1, &o.eps, &o.weight_decay].map(Clone::clone),
                &mut o.state,
            ),
            Optimiser::Sgd(_) => return self.step(names, grads, params),
        };
        let n = names.len();
        if grads.len() != n || params.len() != n {
            return Err(Exception::custom("one gradient and one parameter per name"));
        }
        let mut inputs = Vec::with_capacity(5 + 4 * n);
        inputs.extend(hyper);
        inputs.extend(params.iter().cloned());
        inputs.extend(grads.iter().cloned());
        let mut ms = Vec::with_capacity(n);
        let mut vs = Vec::with_capacity(n);
        for (name, p) in names.iter().zip(params.iter()) {
            match moments.get(name) {
                Some((m, v)) => {
                    ms.push(m.clone());
                    vs.push(v.clone());
                }
                None => {
                    ms.push(zeros_like(p)?);
                    vs.push(zeros_like(p)?);
                }
            }
        }
        inputs.extend(ms);
        inputs.extend(vs);
        let update = match fused {
            Some(f) => f,
            None => fused.insert(fused_adam(n)?),
        };
        let mut out = update.call(&inputs)?.into_iter();
        for p in params.iter_mut() {
            *p = out
                .next()
                .ok_or_else(|| Exception::custom("the fused update gave too little"))?;
        }
        let (new_m, new_v): (Vec<Array>, Vec<Array>) =
            (out.by_ref().take(n).collect(), out.collect());
        if new_m.len() != n || new_v.len() != n {
            return Err(Exception::custom("the fused update gave too little"));
        }
        for ((name, m), v) in names.iter().zip(new_m).zip(new_v) {
            moments.insert(name.clone(), (m, v));
        }
        Ok(())
    }
}

impl Optimiser {
    /// The optimiser `kind` names, at learning rate `lr`.
    pub fn new(kind: OptimizerKind, lr: f32) -> Result<Self> {
        let infallible = |e: std::convert::Infallible| -> Exception { match e {} };
        Ok(match kind {
            OptimizerKind::Adam => {
                Optimiser::Adam(AdamBuilder::new(lr).build().map_err(infallible)?)
            }
            OptimizerKind::AdamW { weight_decay } => Optimiser::AdamW(
                AdamWBuilder::new(lr)
                    .weight_decay(weight_decay)
                    .build()
                    .map_err(infallible)?,
            ),
            OptimizerKind::Sgd => Optimiser::Sgd(SgdBuilder::new(lr).build().map_err(infallible)?),
        })
    }

    /// The optimiser's name, as checkpoints record it.
    pub fn kind(&self) -> &'static str {
        match self {
            Optimiser::Adam(_) => "adam",
            Optimiser::AdamW(_) => "adamw",
            Optimiser::Sgd(_) => "sgd",
        }
    }

    /// The optimiser's state as named tensors (`optimizer.{param}.m` and
    /// `.v` for Adam's moments, `optimizer.{param}.velocity` for SGD).
    pub fn state_tensors(&self) -> Vec<(String, Array)> {
        let moments = |state: &mlx_rs::optimizers::State<(Array, Array)>| {
            state
                .iter()
                .flat_map(|(k, (m, v))| {
                    [
                        (format!("optimizer.{k}.m"), m.clone()),
                        (format!("optimizer.{k}.v"), v.clone()),
                    ]
                })
                .collect()
        };
        match self {
            Optimiser::Adam(o) => moments(&o.state),
            Optimiser::AdamW(o) => moments(&o.state),
            Optimiser::Sgd(o) => o
                .state
                .iter()
                .map(|(k, v)| (format!("optimizer.{k}.velocity"), v.clone()))
                .collect(),
        }
    }

    /// Puts back the state [`state_tensors`](Self::state_tensors) gave,
    /// for the parameters `names`. A parameter with no state has not been
    /// stepped yet; a tensor for no parameter is an error.
    pub fn restore(
        &mut self,
        names: &[Rc<str>],
        mut tensors: std::collections::HashMap<String, Array>,
    ) -> Result<()> {
        for name in names {
            let mut take = |part: &str| tensors.remove(&format!("optimizer.{name}.{part}"));
            match self {
                Optimiser::Adam(Adam { state, .. }) | Optimiser::AdamW(AdamW { state, .. }) => {
                    if let (Some(m), Some(v)) = (take("m"), take("v")) {
                        state.insert(name.clone(), (m, v));
                    }
                }
                Optimiser::Sgd(o) => {
                    if let Some(v) = take("velocity") {
                        o.state.insert(name.clone(), v);
                    }
                }
            }
        }
        match tensors.keys().next() {
            Some(extra) => Err(Exception::custom(format!(
                "the training state has `{extra}`, which belongs to no adapter"
            ))),
            None => Ok(()),
        }
    }
}

/// Fresh adapters on the targets `config` names, as mlx-lm starts them:
/// `A` uniform in ±1/√in, `B` zero, in f32, `A` drawn from `seed`. Keys
/// that match no target are `InvalidOption`.
pub fn fresh_adapters(
    model: &dyn CausalLm,
    config: &LoraConfig,
    seed: u64,
) -> inference_core::Result<Adapted> {
    config.validate()?;
    let targets = model.lora_targets();
    let layers = targets.iter().map(|t| t.layer + 1).max().unwrap_or(0);
    if let Some(keys) = &config.keys {
        if let Some(k) = keys
            .iter()
            .find(|k| !targets.iter().any(|t| t.key == k.as_str()))
        {
            let known: std::collections::BTreeSet<&str> = targets.iter().map(|t| t.key).collect();
            return Err(Error::invalid_option(
                "keys",
                format!("`{k}` matches no linear layer of the model (its keys: {known:?})"),
            ));
        }
    }
    let first = config.num_layers.map_or(0, |n| layers.saturating_sub(n));
    let mut adapted = Adapted {
        targets: Vec::new(),
        scale: config.scale,
        dropout: config.dropout,
    };
    let rank =
        i32::try_from(config.rank).map_err(|_| Error::invalid_option("rank", "too large"))?;
    let mut key = random::key(seed).map_err(mlx_error)?;
    for (i, t) in targets.iter().enumerate() {
        let chosen = t.layer >= first
            && config
                .keys
                .as_ref()
                .is_none_or(|keys| keys.iter().any(|k| k == t.key));
        if !chosen {
            t.slot.set(None);
            continue;
        }
        let bound = 1.0 / (t.input as f32).sqrt();
        let (next, draw) = random::split(&key, 2).map_err(mlx_error)?;
        key = next;
        let a = random::uniform::<_, f32>(-bound, bound, &[t.input, rank][..], &draw)
            .map_err(mlx_error)?;
        let b = zeros::<f32>(&[rank, t.output]).map_err(mlx_error)?;
        t.slot.set(Some(Lora {
            a,
            b,
            scale: config.scale,
            dropout: 0.0,
        }));
        adapted.targets.push(i);
    }
    Ok(adapted)
}

/// Parameters in the adapters (`A` and `B` of each).
pub fn adapter_parameters(model: &dyn CausalLm, adapted: &Adapted) -> u64 {
    let all = model.lora_targets();
    adapted
        .targets
        .iter()
        .filter_map(|&i| all.get(i))
        .filter_map(|t| t.slot.get())
        .map(|l| (l.a.size() + l.b.size()) as u64)
        .sum()
}

/// A batch as mlx-lm's `iterate_batches` makes it: ids padded with 0 to
/// one more than the next multiple of 32 (at most `max_seq_length`), each
/// row cut to `max_seq_length`, and each row's (offset, length): the
/// offset is its prompt length with `mask_prompt`, else 0.
pub fn make_batch(examples: &[&Example], opts: &TrainOptions) -> Result<(Array, Array)> {
    let longest = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let width = (1 + 32 * longest.div_ceil(32)).min(opts.max_seq_length);
    let mut ids = vec![0u32; examples.len() * width];
    let mut lengths = Vec::with_capacity(2 * examples.len());
    for (row, e) in examples.iter().enumerate() {
        let n = e.ids.len().min(opts.max_seq_length);
        ids[row * width..row * width + n].copy_from_slice(&e.ids[..n]);
        let offset = if opts.mask_prompt { e.prompt_len } else { 0 };
        lengths.extend([offset as i32, n as i32]);
    }
    let rows = examples.len() as i32;
    Ok((
        Array::from_slice(&ids, &[rows, width as i32]).as_dtype(Dtype::Int32)?,
        Array::from_slice(&lengths, &[rows, 2]),
    ))
}

/// A small seeded generator (SplitMix64) for the batch order.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A random permutation of `0..n`.
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
        v
    }
}

/// The order the length groups are trained in: a fresh seeded permutation
/// each epoch, as mlx-lm shuffles its batches.
struct BatchOrder {
    rng: Rng,
    groups: usize,
    left: Vec<usize>,
}

impl BatchOrder {
    fn new(seed: u64, groups: usize) -> Self {
        Self {
            rng: Rng(seed),
            groups,
            left: Vec::new(),
        }
    }

    /// The next group's index.
    fn next(&mut self) -> usize {
        if self.left.is_empty() {
            self.left = self.rng.permutation(self.groups);
        }
        self.left.pop().unwrap_or(0)
    }
}

/// Groups of `batch_size` examples of similar length, as mlx-lm makes them
/// (sorted by length, consecutive, the remainder left out).
fn length_groups(examples: &[Example], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].ids.len());
    order
        .chunks_exact(batch_size)
        .map(<[usize]>::to_vec)
        .collect()
}

/// The mean loss over `examples` with the adapters in place, weighted by
/// each batch's counted targets (mlx-lm's `evaluate`), over at most
/// `batches` batches in length order.
pub fn evaluate(
    model: &dyn CausalLm,
    examples: &[Example],
    opts: &TrainOptions,
    batches: Option<usize>,
) -> inference_core::Result<f32> {
    let groups = length_groups(examples, opts.batch_size.min(examples.len()).max(1));
    let (mut sum, mut count) = (0f64, 0f64);
    for group in groups.iter().take(batches.unwrap_or(usize::MAX)) {
        let rows: Vec<&Example> = group.iter().map(|&i| &examples[i]).collect();
        let (batch, lengths) = make_batch(&rows, opts).map_err(mlx_error)?;
        let (loss, ntoks) = masked_loss(model, &batch, &lengths).map_err(mlx_error)?;
        eval([&loss, &ntoks]).map_err(mlx_error)?;
        let n = f64::from(scalar(&ntoks)?);
        sum += f64::from(scalar(&loss)?) * n;
        count += n;
    }
    if count == 0.0 {
        return Err(Error::InvalidInput(
            "no target to evaluate the loss on".into(),
        ));
    }
    Ok((sum / count) as f32)
}

/// The names of `adapted`'s adapter tensors (`A`, `B` of each target in
/// turn), as mlx-lm's files name them.
pub fn adapter_names(model: &dyn CausalLm, adapted: &Adapted) -> Vec<Rc<str>> {
    let all = model.lora_targets();
    adapted
        .targets
        .iter()
        .filter_map(|&i| all.get(i))
        .flat_map(|t| {
            let p = t.path();
            [
                Rc::from(format!("{p}.lora_a")),
                Rc::from(format!("{p}.lora_b")),
            ]
        })
        .collect()
}

/// Trains `adapted`'s adapters (already in `model`'s slots) on `data`,
/// reporting to `sink`, until `opts.iters` batches are done or the consumer
/// cancels; the slots hold the last step's values. With
/// `opts.checkpoints`, writes checkpoints (with `config` as their
/// `adapter_config.json`); with `opts.resume`, continues from one.
///
/// Each step draws its dropout from a key made of the seed and the step,
/// and the batch order is replayed from the seed, so that a resumed run
/// takes the very steps the uninterrupted one would have.
pub fn train(
    model: &dyn CausalLm,
    adapted: &Adapted,
    data: &TrainingData,
    opts: &TrainOptions,
    config: &AdapterConfig,
    sink: &TrainSink,
) -> inference_core::Result<()> {
    let e = mlx_error;
    // MLX has no gradient for the fused decode kernels.
    let _plain = crate::models::fused::Suspend::new();
    if opts.grad_checkpoint && adapted.dropout > 0.0 {
        return Err(Error::unsupported(
            "grad_checkpoint with adapter dropout (a recomputed layer would draw other dropout masks)",
        ));
    }
    let groups = length_groups(&data.train, opts.batch_size);
    let mut params = adapted.params(model).map_err(e)?;
    let names = adapter_names(model, adapted);
    let mut optimiser = Optimiser::new(opts.optimizer, opts.learning_rate).map_err(e)?;
    let mut run = RunState::default();
    if let Some(file) = &opts.resume {
        let resumed = checkpoint::load(file, &names, &params, &optimiser, opts)?;
        params = resumed.params;
        if let Some(state) = resumed.optimiser {
            optimiser
                .restore(&names, state)
                .map_err(|err| Error::invalid_option("resume", err.to_string()))?;
        }
        run = resumed.run.unwrap_or_default();
        adapted.install(model, &params, false).map_err(e)?;
    }
    let mut compiled = match compile_steps(adapted) {
        true => Some(compiled_loss_and_grads(model, adapted, params.len()).map_err(e)?),
        false => None,
    };
    let mut fused = None;
    let mut order = BatchOrder::new(opts.seed, groups.len());
    // The batches the checkpoint's steps took, drawn again.
    for _ in 0..run.step {
        order.next();
    }
    crate::memory::reset_peak();
    let mut throttle = crate::memory::QueueThrottle::new();
    let (mut window_loss, mut window_steps, mut window_tokens) = (0f64, 0usize, 0f64);
    let mut window_start = Instant::now();
    let mut lr = opts.learning_rate_at(run.updates.saturating_sub(1));
    // The validation loss before any step, as mlx-lm reports it first.
    if !data.valid.is_empty() && run.step == 0 {
        let start = TrainProgress {
            step: 0,
            iters: opts.iters,
            train_loss: None,
            val_loss: Some(evaluate(model, &data.valid, opts, opts.val_batches)?),
            learning_rate: lr,
            tokens_per_sec: 0.0,
            trained_tokens: 0,
            peak_memory_bytes: crate::memory::peak(),
        };
        if sink.send(start).is_err() {
            return Ok(());
        }
    }
    for it in run.step + 1..=opts.iters {
        if sink.is_cancelled() {
            break;
        }
        let group = &groups[order.next()];
        let rows: Vec<&Example> = group.iter().map(|&i| &data.train[i]).collect();
        let (batch, lengths) = make_batch(&rows, opts).map_err(e)?;
        random::seed(opts.seed.wrapping_add(it as u64)).map_err(e)?;
        if let Some(t) = throttle.as_mut() {
            t.before_step(batch.dim(1))?;
        }
        let before = grad_checkpoint::checkpoint_layers(opts.grad_checkpoint);
        let outcome = match compiled.as_mut() {
            Some(step) => step_compiled(step, model, adapted, &params, &batch, &lengths),
            None => loss_and_grads(model, adapted, &params, &batch, &lengths, true),
        };
        grad_checkpoint::checkpoint_layers(before);
        let (loss, ntoks, grads) = outcome.map_err(e)?;
        run.accumulated = Some(match run.accumulated.take() {
            None => grads,
            Some(acc) => acc
                .iter()
                .zip(&grads)
                .map(|(a, g)| a.add(g))
                .collect::<Result<Vec<_>>>()
                .map_err(e)?,
        });
        if it % opts.grad_accumulation == 0 || it == opts.iters {
            let mut grads = run.accumulated.take().unwrap_or_default();
            if opts.grad_accumulation > 1 {
                let k = Array::from_f32(1.0 / opts.grad_accumulation as f32);
                grads = grads
                    .iter()
                    .map(|g| g.multiply(&k))
                    .collect::<Result<_>>()
                    .map_err(e)?;
            }
            if let Some(max) = opts.max_grad_norm {
                grads = clip(grads, max).map_err(e)?;
            }
            lr = opts.learning_rate_at(run.updates);
            optimiser.set_learning_rate(lr);
            match compiled {
                Some(_) => optimiser.step_fused(&mut fused, &names, &grads, &mut params),
                None => optimiser.step(&names, &grads, &mut params),
            }
            .map_err(e)?;
            run.updates += 1;
            adapted.install(model, &params, false).map_err(e)?;
        }
        eval(
            params
                .iter()
                .chain(run.accumulated.iter().flatten())
                .chain([&loss, &ntoks]),
        )
        .map_err(e)?;
        if let Some(t) = throttle.as_mut() {
            t.after_step()?;
        }
        let n = f64::from(scalar(&ntoks)?);
        window_loss += f64::from(scalar(&loss)?);
        window_steps += 1;
        window_tokens += n;
        run.trained_tokens += n as u64;
        run.step = it;
        if let Some(c) = opts.checkpoints.as_ref().filter(|c| it % c.every == 0) {
            checkpoint::save(&c.dir, &names, &params, &optimiser, &run, opts, config)?;
        }
        let report = it % opts.report_every == 0 || it == opts.iters;
        let validate = !data.valid.is_empty()
            && ((opts.val_every > 0 && it % opts.val_every == 0) || it == opts.iters);
        if report || validate {
            let elapsed = window_start.elapsed().as_secs_f64();
            let val_loss = match validate {
                true => Some(evaluate(model, &data.valid, opts, opts.val_batches)?),
                false => None,
            };
            let progress = TrainProgress {
                step: it,
                iters: opts.iters,
                train_loss: report.then(|| (window_loss / window_steps.max(1) as f64) as f32),
                val_loss,
                learning_rate: lr,
                tokens_per_sec: if elapsed > 0.0 {
                    window_tokens / elapsed
                } else {
                    0.0
                },
                trained_tokens: run.trained_tokens,
                peak_memory_bytes: crate::memory::peak(),
            };
            if report {
                (window_loss, window_steps, window_tokens) = (0.0, 0, 0.0);
                window_start = Instant::now();
            }
            if sink.send(progress).is_err() {
                break;
            }
        }
    }
    Ok(())
}

/// One call of the compiled step (see [`compiled_loss_and_grads`]): the
/// loss, counted targets and gradients; the adapters go back in their
/// slots afterwards.
fn step_compiled(
    step: &mut ffi::Compiled<'_>,
    model: &dyn CausalLm,
    adapted: &Adapted,
    params: &[Array],
    batch: &Array,
    lengths: &Array,
) -> Result<(Array, Array, Vec<Array>)> {
    let mut inputs = params.to_vec();
    inputs.extend([batch.clone(), lengths.clone()]);
    let out = step.call(&inputs);
    adapted.install(model, params, false)?;
    let mut out = out?.into_iter();
    match (out.next(), out.next()) {
        (Some(loss), Some(ntoks)) => Ok((loss, ntoks, out.collect())),
        _ => Err(Exception::custom("the compiled step returned too little")),
    }
}

/// The value of a scalar array.
fn scalar(a: &Array) -> inference_core::Result<f32> {
    a.try_item_cast::<f32>().map_err(mlx_error)
}

/// `grads` scaled so that their global norm is at most `max`.
fn clip(grads: Vec<Array>, max: f32) -> Result<Vec<Array>> {
    let mut total = Array::from_f32(0.0);
    for g in &grads {
        total = total.add(g.square()?.sum(None)?)?;
    }
    let norm = total
        .sqrt()?
        .try_item_cast::<f32>()
        .map_err(|e| Exception::custom(e.to_string()))?;
    if norm <= max {
        return Ok(grads);
    }
    let k = Array::from_f32(max / (norm + 1e-6));
    grads.iter().map(|g| g.multiply(&k)).collect()
}

/// The parameter counts of `model` with `adapted` (`base` parameters in
/// the model itself).
pub fn counts(model: &dyn CausalLm, adapted: &Adapted, base: u64) -> ParameterCounts {
    let trainable = adapter_parameters(model, adapted);
    ParameterCounts {
        trainable,
        total: base + trainable,
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

    /// The cross-entropy of logits in parts (as split CPU matmuls leave
    /// them) equals that of the whole logits.
    #[test]
    fn cross_entropy_over_parts_equals_the_whole() {
        let key = random::key(3).unwrap();
        let logits = random::normal::<f32>(&[2, 5, 11][..], 0.0, 3.0, &key).unwrap();
        let targets = Array::from_slice(&[0i32, 3, 4, 10, 7, 5, 6, 1, 2, 9], &[2, 5]);
        let whole = cross_entropy(&[(0, logits.clone())], &targets).unwrap();
        for cuts in [vec![0, 5], vec![0, 4, 7], vec![0, 1, 10]] {
            let parts: Vec<(i32, Array)> = cuts
                .iter()
                .enumerate()
                .map(|(i, &lo)| {
                    let hi = cuts.get(i + 1).copied().unwrap_or(11);
                    (lo, logits.index((.., .., lo..hi)))
                })
                .collect();
            assert_close("parts", &cross_entropy(&parts, &targets).unwrap(), &whole);
        }
    }

    /// For each fixture architecture, with fixed non-zero adapters on every
    /// linear layer: the masked loss and every adapter gradient equal
    /// PyTorch's (with and without gradient checkpointing) (`scripts/fixtures/make_lora_goldens.py`), one Adam and one
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
            let (batch, lengths) = (&golden["input_ids"], &golden["lengths"]);
            // Directly and compiled, each with and without every layer
            // checkpointed.
            for (checkpointed, compiled) in
                [(false, false), (true, false), (false, true), (true, true)]
            {
                let before = grad_checkpoint::checkpoint_layers(checkpointed);
                let outcome = if compiled {
                    let mut step =
                        compiled_loss_and_grads(&*model, &adapted, params.len()).unwrap();
                    // Traced with other adapters, then replayed with the
                    // golden ones: adapters baked into the trace would show.
                    let halved: Vec<Array> = params
                        .iter()
                        .map(|p| p.multiply(Array::from_f32(0.5)).unwrap())
                        .collect();
                    let first =
                        step_compiled(&mut step, &*model, &adapted, &halved, batch, lengths);
                    let (loss, _, _) = first.unwrap();
                    assert!((values(&loss)[0] - values(&golden["loss"])[0]).abs() > 1e-4);
                    let second =
                        step_compiled(&mut step, &*model, &adapted, &params, batch, lengths);
                    // The slots hold the adapters again, not the trace's
                    // placeholders.
                    let back = adapted.params(&*model).unwrap();
                    assert_eq!(values(&back[0]), values(&params[0]), "{name}");
                    second
                } else {
                    loss_and_grads(&*model, &adapted, &params, batch, lengths, true)
                };
                grad_checkpoint::checkpoint_layers(before);
                let (loss, ntoks, grads) = outcome.unwrap();
                let what = format!("{name} (checkpointed: {checkpointed}, compiled: {compiled})");
                assert_close(&format!("{what} loss"), &loss, &golden["loss"]);
                assert!(values(&ntoks)[0] > 0.0);
                for (n, g) in names.iter().zip(&grads) {
                    assert_close(
                        &format!("{what} grad {n}"),
                        g,
                        &golden[&format!("grad.{n}")],
                    );
                }
            }
            let keys: Vec<Rc<str>> = names.iter().map(|n| Rc::from(n.as_str())).collect();
            let make = |label: &str| match label {
                "adam" => Optimiser::Adam(AdamBuilder::new(1e-2).build().unwrap()),
                _ => Optimiser::AdamW(AdamWBuilder::new(1e-2).build().unwrap()),
            };
            // From torch's gradients: where a gradient is near 0, the first
            // Adam step (`lr · g / (√(g²/1000) + ε)`) turns a difference of
            // 1e-4 in it into a visible one in the update.
            let torch_grads: Vec<Array> = names
                .iter()
                .map(|n| golden[&format!("grad.{n}")].clone())
                .collect();
            for label in ["adam", "adamw"] {
                // MLX's own update and the fused one, twice each (the
                // second from the moments of the first).
                let (mut plain, mut fused) = (make(label), make(label));
                let (mut by_plain, mut by_fused) = (params.clone(), params.clone());
                let mut compiled = None;
                plain.step(&keys, &torch_grads, &mut by_plain).unwrap();
                fused
                    .step_fused(&mut compiled, &keys, &torch_grads, &mut by_fused)
                    .unwrap();
                for ((n, p), f) in names.iter().zip(&by_plain).zip(&by_fused) {
                    let want = &golden[&format!("{label}.{n}")];
                    assert_close(&format!("{name} {label} {n}"), p, want);
                    assert_close(&format!("{name} fused {label} {n}"), f, want);
                }
                plain.step(&keys, &torch_grads, &mut by_plain).unwrap();
                fused
                    .step_fused(&mut compiled, &keys, &torch_grads, &mut by_fused)
                    .unwrap();
                for ((n, p), f) in names.iter().zip(&by_plain).zip(&by_fused) {
                    assert_close(&format!("{name} fused {label} {n}, step 2"), f, p);
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

//! Sampling: from the last position's logits to the next token id, on the
//! device and lazily, so that the decode loop can queue a step (forward pass
//! and sample) before it reads the previous token back.
//!
//! The chain runs in the order [`GenerateOptions`] documents, the order of
//! mlx-lm's sampler with a repeat penalty in front:
//!
//! 1. repeat penalty over the last `repeat_last_n` tokens (prompt included):
//!    positive logits of those tokens are divided by the penalty, negative
//!    ones multiplied, each token once however often it occurs;
//! 1. presence and frequency penalties (OpenAI's): `count × frequency +
//!    (count > 0) × presence` subtracted from each id's logit, `count` being
//!    how often the sampler has drawn it in this call (a count per id kept on
//!    the device);
//! 1. logit bias: a bias added to chosen ids' logits;
//! 2. top-p: the smallest set of most likely tokens whose probability reaches
//!    `top_p` stays;
//! 3. min-p: tokens less likely than `min_p` × the most likely one go;
//! 4. top-k: the `top_k` most likely tokens stay;
//! 5. temperature: the logits are divided by it;
//! 6. a categorical draw with a key split off the sampler's seeded key.
//!
//! A temperature of 0 is greedy: the argmax of the (penalised, biased)
//! logits. [`logprobs_of`] gives the log-probabilities of the raw
//! distribution (before any of the chain) that `logprobs` reports. Each
//! filter maps logits to logits, masking what it removes with −∞; it is
//! unaffected by a constant added to every logit, so it takes raw logits or
//! log-probabilities alike. The filters work on `[..., V]` arrays along the
//! last axis and are public so that they can be checked on their own.

use std::hash::{BuildHasher, Hasher};

use inference_core::GenerateOptions;
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{argmax_axis, put_along_axis, take_along_axis, Ellipsis, TryIndexOp};
use mlx_rs::ops::{argpartition_axis, argsort_axis, cumsum, select, softmax_axis, zeros_like};
use mlx_rs::{random, Array, Dtype};

type Result<T> = std::result::Result<T, Exception>;

/// The sampling chain of one generation call, with its random key.
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repeat_penalty: f32,
    repeat_last_n: usize,
    presence_penalty: f32,
    frequency_penalty: f32,
    /// `(id, bias)` of the logit bias, sorted by id.
    bias: Vec<(u32, f32)>,
    /// The bias as a dense `[V]` array, made on the first draw.
    dense_bias: Option<Array>,
    /// How often each id was drawn, `[V]` f32, when the presence or
    /// frequency penalty is on (made on the first draw).
    counts: Option<Array>,
    /// The key the next draw splits; `None` for greedy decoding.
    key: Option<Array>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("temperature", &self.temperature)
            .field("top_k", &self.top_k)
            .field("top_p", &self.top_p)
            .field("min_p", &self.min_p)
            .field("repeat_penalty", &self.repeat_penalty)
            .field("repeat_last_n", &self.repeat_last_n)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// The sampler that `opts` (already validated) ask for, its key made from
    /// `opts.seed` or, without one, from the process's entropy.
    pub fn new(opts: &GenerateOptions) -> Result<Self> {
        let key = if opts.is_greedy() {
            None
        } else {
            Some(random::key(opts.seed.unwrap_or_else(entropy_seed))?)
        };
        Ok(Self {
            temperature: opts.temperature,
            top_k: opts.top_k,
            top_p: opts.top_p,
            min_p: opts.min_p,
            repeat_penalty: opts.repeat_penalty,
            repeat_last_n: opts.repeat_last_n,
            presence_penalty: opts.presence_penalty,
            frequency_penalty: opts.frequency_penalty,
            bias: opts.logit_bias.iter().map(|(&id, &b)| (id, b)).collect(),
            dense_bias: None,
            counts: None,
            key,
        })
    }

    /// Whether the sampler keeps state from one draw to the next beyond its
    /// key (the presence and frequency penalties count its draws).
    pub fn counts_draws(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }

    /// Whether anything changes the logits before the filters: a repeat
    /// penalty (with ids to look at), presence or frequency penalties, or a
    /// bias.
    fn changes_logits(&self, recent: Option<&Array>) -> bool {
        (self.penalty_window() > 0 && recent.is_some_and(|r| r.size() > 0))
            || self.counts_draws()
            || !self.bias.is_empty()
    }

    /// The logits after the penalties and the bias, as f32.
    fn adjusted(&mut self, logits: &Array, recent: Option<&Array>) -> Result<Array> {
        let mut x = logits.as_dtype(Dtype::Float32)?;
        if let Some(recent) = recent.filter(|r| self.penalty_window() > 0 && r.size() > 0) {
            x = apply_repeat_penalty(&x, recent, self.repeat_penalty)?;
        }
        let vocab = x.dim(-1);
        if self.counts_draws() {
            let counts = match &self.counts {
                Some(c) => c.clone(),
                None => Array::zeros::<f32>(&[vocab])?,
            };
            x = apply_presence_frequency(
                &x,
                &counts,
                self.presence_penalty,
                self.frequency_penalty,
            )?;
        }
        if !self.bias.is_empty() {
            if self.dense_bias.is_none() {
                self.dense_bias = Some(dense_bias(&self.bias, vocab)?);
            }
            if let Some(b) = &self.dense_bias {
                x = x.add(b)?;
            }
        }
        Ok(x)
    }

    /// Counts the draw `id` (shape `[]` or `[1]`) for the presence and
    /// frequency penalties.
    fn count(&mut self, id: &Array, vocab: i32) -> Result<()> {
        if !self.counts_draws() || id.size() != 1 {
            return Ok(());
        }
        let counts = match self.counts.take() {
            Some(c) => c,
            None => Array::zeros::<f32>(&[vocab])?,
        };
        let idx = id.reshape(&[1])?.as_dtype(Dtype::Int32)?;
        let one = take_along_axis(&counts, &idx, 0)?.add(Array::from_f32(1.0))?;
        self.counts = Some(put_along_axis(&counts, &idx, &one, 0)?);
        Ok(())
    }

    /// Whether the sampler takes the argmax (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.key.is_none()
    }

    /// How many recent tokens [`sample`](Self::sample) wants to see: 0 when
    /// the repeat penalty is off.
    pub fn penalty_window(&self) -> usize {
        // Any penalty but 1 changes logits: above 1 it discourages the
        // recent tokens, between 0 and 1 it favours them (transformers).
        if self.repeat_penalty != 1.0 {
            self.repeat_last_n
        } else {
            0
        }
    }

    /// The next token id (`uint32`, shape `logits.shape()` without its last
    /// axis) drawn from `logits` `[..., V]`, lazily. `recent` holds the ids
    /// the repeat penalty looks at (at most
    /// [`penalty_window`](Self::penalty_window) of them, any integer dtype,
    /// shape `[n]`); it is ignored when the penalty is off.
    pub fn sample(&mut self, logits: &Array, recent: Option<&Array>) -> Result<Array> {
        let vocab = logits.dim(-1);
        let adjusted = if self.changes_logits(recent) {
            Some(self.adjusted(logits, recent)?)
        } else {
            None
        };
        let Some(key) = self.key.take() else {
            // Greedy: the filters keep the most likely token, so only the
            // penalties and the bias can change the outcome.
            let id = argmax_axis(adjusted.as_ref().unwrap_or(logits), -1, false)?;
            self.count(&id, vocab)?;
            return Ok(id);
        };
        let (next, draw) = random::split(&key, 2)?;
        self.key = Some(next);
        let mut x = match adjusted {
            Some(x) => x,
            None => logits.as_dtype(Dtype::Float32)?,
        };
        if self.top_p > 0.0 && self.top_p < 1.0 {
            x = apply_top_p(&x, self.top_p)?;
        }
        if self.min_p > 0.0 {
            x = apply_min_p(&x, self.min_p)?;
        }
        if self.top_k > 0 {
            x = apply_top_k(&x, self.top_k)?;
        }
        let x = x.multiply(Array::from_f32(1.0 / self.temperature))?;
        let id = random::categorical(&x, -1, None, Some(&draw))?;
        self.count(&id, vocab)?;
        Ok(id)
    }
}

/// The log-probabilities of a raw distribution: for `logits` `[..., V]` and
/// the drawn `ids` `[...]`, lazily, `(chosen [...], top)` where `top` (when
/// `k > 0`) holds the `k` most likely ids `[..., k]` (`uint32`) and their
/// log-probabilities `[..., k]`, most likely first.
pub fn logprobs_of(
    logits: &Array,
    ids: &Array,
    k: usize,
) -> Result<(Array, Option<(Array, Array)>)> {
    let x = logits.as_dtype(Dtype::Float32)?;
    let lp = x.subtract(x.logsumexp_axis(-1, true)?)?;
    let picked = ids.as_dtype(Dtype::Int32)?.expand_dims(-1)?;
    let chosen = take_along_axis(&lp, &picked, -1)?.squeeze_axes(&[-1])?;
    if k == 0 {
        return Ok((chosen, None));
    }
    let k = (k as i32).min(lp.dim(-1));
    let part = argpartition_axis(lp.negative()?, k - 1, -1)?;
    let idx = part.try_index((Ellipsis, ..k))?;
    let vals = take_along_axis(&lp, &idx, -1)?;
    let order = argsort_axis(vals.negative()?, -1)?;
    let idx = take_along_axis(&idx, &order, -1)?.as_dtype(Dtype::Uint32)?;
    let vals = take_along_axis(&vals, &order, -1)?;
    Ok((chosen, Some((idx, vals))))
}

/// Subtracts OpenAI's presence and frequency penalties from `logits`
/// `[..., V]`: `counts` `[V]` (how often each id was generated) ×
/// `frequency`, plus `presence` for every id generated at least once.
pub fn apply_presence_frequency(
    logits: &Array,
    counts: &Array,
    presence: f32,
    frequency: f32,
) -> Result<Array> {
    let seen = counts.gt(Array::from_f32(0.0))?.as_dtype(Dtype::Float32)?;
    let penalty = counts
        .multiply(Array::from_f32(frequency))?
        .add(seen.multiply(Array::from_f32(presence))?)?;
    logits.subtract(penalty)
}

/// A dense `[vocab]` f32 array of `bias` (`(id, bias)`, ids inside the
/// vocabulary), zero elsewhere.
pub fn dense_bias(bias: &[(u32, f32)], vocab: i32) -> Result<Array> {
    let mut dense = vec![0f32; usize::try_from(vocab).unwrap_or(0)];
    for &(id, b) in bias {
        let slot = dense.get_mut(id as usize).ok_or_else(|| {
            Exception::custom(format!("logit_bias id {id} is outside the vocabulary"))
        })?;
        *slot += b;
    }
    Ok(Array::from_slice(&dense, &[vocab]))
}

/// A seed from the process's hashing entropy (random per process and call).
fn entropy_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// `−∞` where `keep` is false, `x` elsewhere.
fn mask(x: &Array, keep: &Array) -> Result<Array> {
    select(keep, x, Array::from_f32(f32::NEG_INFINITY))
}

/// Penalises the tokens of `recent` (ids, shape `[n]`) in `logits`
/// `[1, V]` (or `[V]`): positive logits divided by `penalty`, negative ones
/// multiplied. A token that occurs several times in `recent` is penalised
/// once: every occurrence gathers the same original logit and scatters the
/// same result back.
pub fn apply_repeat_penalty(logits: &Array, recent: &Array, penalty: f32) -> Result<Array> {
    let lead: Vec<i32> = logits.shape()[..logits.ndim().saturating_sub(1)]
        .iter()
        .map(|_| 1)
        .chain([recent.size() as i32])
        .collect();
    let idx = recent.reshape(&lead)?;
    let seen = take_along_axis(logits, &idx, -1)?;
    let p = Array::from_f32(penalty);
    let penalised = select(
        seen.gt(Array::from_f32(0.0))?,
        seen.divide(&p)?,
        seen.multiply(&p)?,
    )?;
    put_along_axis(logits, &idx, &penalised, -1)
}

/// Top-p (nucleus) filter: keeps the smallest set of most likely tokens
/// whose probability reaches `p` (a token stays when the tokens more likely
/// than it hold less than `p`), and always the most likely token.
pub fn apply_top_p(logits: &Array, p: f32) -> Result<Array> {
    let probs = softmax_axis(logits, -1, true)?;
    // Ascending order: the cumulative sum at a token is the mass of the
    // token and of every less likely one.
    let order = argsort_axis(logits, -1)?;
    let sorted = take_along_axis(&probs, &order, -1)?;
    let cumulative = cumsum(&sorted, -1, false, true)?;
    let cumulative = put_along_axis(zeros_like(&probs)?, &order, &cumulative, -1)?;
    let keep = cumulative
        .gt(Array::from_f32(1.0 - p))?
        .logical_or(logits.ge(logits.max_axis(-1, true)?)?)?;
    mask(logits, &keep)
}

/// Min-p filter: drops the tokens less likely than `p` × the most likely one.
pub fn apply_min_p(logits: &Array, p: f32) -> Result<Array> {
    let floor = logits.max_axis(-1, true)?.add(Array::from_f32(p.ln()))?;
    mask(logits, &logits.ge(&floor)?)
}

/// Top-k filter: keeps the `k` most likely tokens (exactly `k`: ties at the
/// boundary are broken by the partition). A `k` of at least the vocabulary
/// size keeps everything.
pub fn apply_top_k(logits: &Array, k: usize) -> Result<Array> {
    let vocab = logits.dim(-1) as usize;
    if k == 0 || k >= vocab {
        return Ok(logits.clone());
    }
    let order = argpartition_axis(logits.negative()?, k as i32 - 1, -1)?;
    let dropped = order.try_index((Ellipsis, k as i32..))?;
    put_along_axis(logits, &dropped, Array::from_f32(f32::NEG_INFINITY), -1)
}

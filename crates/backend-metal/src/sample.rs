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
//! 2. top-p: the smallest set of most likely tokens whose probability reaches
//!    `top_p` stays;
//! 3. min-p: tokens less likely than `min_p` × the most likely one go;
//! 4. top-k: the `top_k` most likely tokens stay;
//! 5. temperature: the logits are divided by it;
//! 6. a categorical draw with a key split off the sampler's seeded key.
//!
//! A temperature of 0 is greedy: the argmax of the (penalised) logits. Each
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
            key,
        })
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
        let penalise = self.penalty_window() > 0 && recent.is_some_and(|r| r.size() > 0);
        let Some(key) = self.key.take() else {
            // Greedy: the filters keep the most likely token, so only the
            // penalty can change the outcome.
            return match (penalise, recent) {
                (true, Some(recent)) => argmax_axis(
                    apply_repeat_penalty(
                        &logits.as_dtype(Dtype::Float32)?,
                        recent,
                        self.repeat_penalty,
                    )?,
                    -1,
                    false,
                ),
                _ => argmax_axis(logits, -1, false),
            };
        };
        let (next, draw) = random::split(&key, 2)?;
        self.key = Some(next);
        let mut x = logits.as_dtype(Dtype::Float32)?;
        if let (true, Some(recent)) = (penalise, recent) {
            x = apply_repeat_penalty(&x, recent, self.repeat_penalty)?;
        }
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
        random::categorical(&x, -1, None, Some(&draw))
    }
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

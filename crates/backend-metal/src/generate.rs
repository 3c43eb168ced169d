//! The generation loop: chunked prefill, then decode steps kept one ahead of
//! the consumer by MLX's lazy evaluation.

use std::collections::VecDeque;
use std::time::Instant;

use inference_core::{Error, GenerateOptions, TokenLogprobs, TokenSink};
use mlx_rs::error::Exception;
use mlx_rs::ops::concatenate;
use mlx_rs::transforms::eval;
use mlx_rs::Array;

use crate::cache::{LayerCache, Rotation};
use crate::error::mlx_error;
use crate::models::layers::last_position;
use crate::models::CausalLm;

/// Prompt tokens processed per forward pass during prefill (as mlx-lm).
pub const PREFILL_CHUNK: usize = 2048;

/// One generation call, ready to run on the model's worker.
pub struct Request {
    /// The encoded prompt (non-empty).
    pub prompt: Vec<u32>,
    /// Validated options.
    pub opts: GenerateOptions,
    /// Where tokens go.
    pub sink: TokenSink,
    /// When the call was made (queueing counts towards the total time).
    pub queued: Instant,
}

/// Reads back a draw's scores, one per row (`chosen` `[G]`, top `[G, k]`;
/// a single draw is one row).
pub(crate) fn read_scores(
    scores: &(Array, Option<(Array, Array)>),
) -> Result<Vec<TokenLogprobs>, Exception> {
    let floats = |a: &Array| -> Result<Vec<f32>, Exception> {
        a.as_dtype(mlx_rs::Dtype::Float32)?
            .flatten(None, None)?
            .try_as_slice::<f32>()
            .map(<[f32]>::to_vec)
            .map_err(|e| Exception::custom(e.to_string()))
    };
    let (chosen, top) = scores;
    let chosen = floats(chosen)?;
    let top = match top {
        Some((ids, vals)) => {
            let k = ids.dim(-1).max(1) as usize;
            let ids: Vec<u32> = ids
                .flatten(None, None)?
                .try_as_slice::<u32>()
                .map(<[u32]>::to_vec)
                .map_err(|e| Exception::custom(e.to_string()))?;
            let pairs: Vec<(u32, f32)> = ids.into_iter().zip(floats(vals)?).collect();
            pairs.chunks(k).map(<[(u32, f32)]>::to_vec).collect()
        }
        None => vec![Vec::new(); chosen.len()],
    };
    if top.len() != chosen.len() {
        return Err(Exception::custom("log-probabilities of unequal rows"));
    }
    Ok(chosen
        .into_iter()
        .zip(top)
        .map(|(logprob, top)| TokenLogprobs { logprob, top })
        .collect())
}

/// The ids the repeat penalty looks at for the step after `pending`: the
/// last of `read` (ids already read back) and `pending` (the sampled id
/// not read yet, `[1]`), `window` in all. `None` when the penalty is off.
pub(crate) fn recent_ids(
    read: &VecDeque<u32>,
    pending: Option<&Array>,
    window: usize,
) -> Result<Option<Array>, Exception> {
    if window == 0 {
        return Ok(None);
    }
    let keep = window - usize::from(pending.is_some());
    let known: Vec<u32> = read
        .iter()
        .skip(read.len().saturating_sub(keep))
        .copied()
        .collect();
    let known_arr = Array::from_slice(&known, &[known.len() as i32]);
    Ok(Some(match pending {
        None => known_arr,
        Some(y) if known.is_empty() => y.reshape(&[1])?,
        Some(y) => concatenate(&[known_arr, y.reshape(&[1])?], 0)?,
    }))
}

/// How a model's calls are bounded.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Most positions (prompt + generated) a call may use: a prompt that
    /// leaves no room is a `ContextOverflow`, a generation that reaches it
    /// ends with `length` (the model's `max_position_embeddings`, or
    /// unbounded where the load allowed positions past it with rotating
    /// caches).
    pub limit: usize,
    /// What each cache keeps, when a context length bounds memory.
    pub context: Option<Rotation>,
    /// Prompt tokens per prefill forward pass.
    pub chunk: usize,
}

/// Runs the prompt through the model in chunks of `chunk` tokens, filling
/// `caches`, and returns the last position's hidden state `[1, hidden]`.
/// Every chunk but the last is evaluated at once so the graph stays small;
/// `cancelled` is asked between chunks (`None` when it said yes).
pub fn prefill(
    model: &dyn CausalLm,
    prompt: &[u32],
    caches: &mut [LayerCache],
    chunk: usize,
    cancelled: impl Fn() -> bool,
) -> Result<Option<Array>, Exception> {
    let chunk = chunk.max(1);
    let mut start = 0;
    while prompt.len() - start > chunk {
        if cancelled() {
            return Ok(None);
        }
        let part = &prompt[start..start + chunk];
        model.hidden(&Array::from_slice(part, &[1, part.len() as i32]), caches)?;
        let state: Vec<&Array> = caches.iter().flat_map(LayerCache::arrays).collect();
        eval(state)?;
        start += chunk;
    }
    let part = &prompt[start..];
    let h = model.hidden_last(&Array::from_slice(part, &[1, part.len() as i32]), caches)?;
    Ok(Some(last_position(&h)))
}

/// The f32 logits after `ids`, from a fresh cache (prefilled in chunks).
pub fn last_logits(model: &dyn CausalLm, ids: &[u32], bounds: Bounds) -> Result<Vec<f32>, Error> {
    let run = || -> Result<Vec<f32>, Exception> {
        let mut caches = model.new_caches(bounds.context);
        let last = prefill(model, ids, &mut caches, bounds.chunk, || false)?
            .ok_or_else(|| Exception::custom("prefill was cancelled"))?;
        let logits = model.logits(&last)?.as_dtype(mlx_rs::Dtype::Float32)?;
        logits.eval()?;
        Ok(logits
            .try_as_slice::<f32>()
            .map_err(|e| Exception::custom(e.to_string()))?
            .to_vec())
    };
    run().map_err(mlx_error)
}

/// Positions scored per forward pass by [`prompt_logprobs`] (the logits of a
/// whole chunk are held at once, `chunk × vocab` floats).
const SCORE_CHUNK: usize = 256;

/// The log-probability the model gives each of `ids[1..]` after the ids
/// before it (`ids.len() − 1` values, natural log), from one pass over a
/// fresh cache bounded as generation is (a rotating cache under a context
/// length, so every position attends what a decode step at that position
/// would).
pub fn prompt_logprobs(
    model: &dyn CausalLm,
    ids: &[u32],
    bounds: Bounds,
) -> Result<Vec<f32>, Error> {
    let run = || -> Result<Vec<f32>, Exception> {
        let mut caches = model.new_caches(bounds.context);
        let mut out = Vec::with_capacity(ids.len().saturating_sub(1));
        let chunk = bounds.chunk.clamp(1, SCORE_CHUNK);
        let mut start = 0;
        while start + 1 < ids.len() {
            // Positions `start..end` predict `start + 1..=end`.
            let end = (start + chunk).min(ids.len() - 1);
            let part = &ids[start..end];
            let h = model.hidden(
                &Array::from_slice(part, &[1, part.len() as i32]),
                &mut caches,
            )?;
            let logits = model.logits(&h)?.as_dtype(mlx_rs::Dtype::Float32)?;
            let norm = logits.logsumexp_axis(-1, true)?;
            let targets = Array::from_slice(&ids[start + 1..=end], &[1, part.len() as i32, 1]);
            let picked = logits.take_along_axis(&targets, -1)?.subtract(&norm)?;
            let state: Vec<&Array> = caches.iter().flat_map(LayerCache::arrays).collect();
            eval(state.into_iter().chain([&picked]))?;
            out.extend_from_slice(
                picked
                    .try_as_slice::<f32>()
                    .map_err(|e| Exception::custom(e.to_string()))?,
            );
            start = end;
        }
        Ok(out)
    };
    run().map_err(mlx_error)
}

//! The generation loop: chunked prefill, then decode steps kept one ahead of
//! the consumer by MLX's lazy evaluation.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use inference_core::{
    Error, FinishReason, GenerateMetrics, GenerateOptions, TokenLogprobs, TokenSink,
};
use inference_runtime::{stream_tokens, Clock, Sequence};
use mlx_rs::error::Exception;
use mlx_rs::ops::concatenate;
use mlx_rs::transforms::{async_eval, eval};
use mlx_rs::Array;

use crate::cache::{LayerCache, Rotation};
use crate::error::mlx_error;
use crate::memory;
use crate::models::layers::last_position;
use crate::models::CausalLm;
use crate::sample::{logprobs_of, Sampler};
use inference_text::{ModelTokenizer, StreamDecoder};

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

/// What a finished call reports.
pub struct Outcome {
    /// The call's metrics.
    pub metrics: GenerateMetrics,
    /// Why it ended, or the error that ended it.
    pub end: Result<FinishReason, Error>,
}

/// A drawn id (lazily, on the device) with its log-probabilities when the
/// call asked for them.
pub(crate) struct Drawn {
    /// The id.
    pub(crate) id: Array,
    /// Its log-probability and the top alternatives (`logprobs_of`).
    pub(crate) scores: Option<(Array, Option<(Array, Array)>)>,
}

impl Drawn {
    /// Draws from `logits` with `sampler`, scoring the draw when `opts`
    /// ask for log-probabilities.
    pub(crate) fn draw(
        logits: &Array,
        sampler: &mut Sampler,
        recent: Option<&Array>,
        opts: &GenerateOptions,
    ) -> Result<Self, Exception> {
        let id = sampler.sample(logits, recent)?;
        let scores = if opts.logprobs {
            Some(logprobs_of(logits, &id, opts.top_logprobs)?)
        } else {
            None
        };
        Ok(Self { id, scores })
    }

    /// Queues the draw's computation.
    pub(crate) fn queue(&self) -> Result<(), Exception> {
        // No allocation per step: the arrays are chained, not collected.
        let scores = self.scores.iter().flat_map(|(chosen, top)| {
            std::iter::once(chosen).chain(top.iter().flat_map(|(i, v)| [i, v]))
        });
        async_eval(std::iter::once(&self.id).chain(scores))
    }
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

/// Runs one forward step for `ids` `[1, L]` and returns the next id drawn
/// by `sampler` (with `recent` for its repeat penalty), lazily, scored as
/// `opts` ask.
fn step(
    model: &dyn CausalLm,
    ids: &Array,
    caches: &mut [LayerCache],
    sampler: &mut Sampler,
    recent: Option<&Array>,
    opts: &GenerateOptions,
) -> Result<Drawn, Exception> {
    let h = model.hidden(ids, caches)?;
    Drawn::draw(&model.logits(&last_position(&h))?, sampler, recent, opts)
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

/// A generation that continues caches already holding a prefix of its
/// prompt, and what it leaves behind: the caches, every id it read back and
/// the text it streamed.
pub struct Resumed {
    /// The KV caches the run continues (empty caches for a full prefill).
    pub caches: Vec<LayerCache>,
    /// How many leading prompt ids `caches` already hold; only the rest is
    /// prefilled.
    pub cached: usize,
    /// Every id the run read back, stop and end-of-sequence ids included,
    /// in order.
    pub sampled: Vec<u32>,
    /// The text the run streamed.
    pub reply: String,
}

/// Runs `req` to completion, streaming into its sink.
pub fn run(
    model: &dyn CausalLm,
    tokenizer: &ModelTokenizer,
    req: &Request,
    bounds: Bounds,
) -> Outcome {
    run_resumed(model, tokenizer, req, bounds, None)
}

/// Runs `req` to completion, streaming into its sink; with `resumed`, on
/// its caches (prefilling the prompt after `resumed.cached`), recording what
/// was sampled and streamed.
pub fn run_resumed(
    model: &dyn CausalLm,
    tokenizer: &ModelTokenizer,
    req: &Request,
    bounds: Bounds,
    resumed: Option<&mut Resumed>,
) -> Outcome {
    let mut clock = Clock::start(req.queued);
    memory::reset_peak();
    let detok = StreamDecoder::new(&tokenizer.inner, &req.prompt);
    let mut seq = Sequence::new(&req.opts, &tokenizer.eos, detok);
    let end = decode_loop(model, req, bounds, &mut clock, &mut seq, resumed);
    let metrics = clock
        .metrics(req.prompt.len(), seq.generated())
        .with_memory(memory::peak(), memory::active());
    Outcome { metrics, end }
}

fn decode_loop(
    model: &dyn CausalLm,
    req: &Request,
    bounds: Bounds,
    clock: &mut Clock,
    seq: &mut Sequence<StreamDecoder<'_>>,
    resumed: Option<&mut Resumed>,
) -> Result<FinishReason, Error> {
    let limit = bounds.limit;
    let Request {
        prompt, opts, sink, ..
    } = req;
    if sink.prompt(prompt.clone()).is_err() {
        return Ok(FinishReason::Cancelled);
    }
    if opts.prompt_logprobs {
        // A pass of its own over fresh caches: every position's logits,
        // which the prefill below does not compute.
        let lps = prompt_logprobs(model, prompt, bounds)?;
        if sink.prompt_logprobs(lps).is_err() {
            return Ok(FinishReason::Cancelled);
        }
    }
    let _span = tracing::debug_span!(
        "generate",
        prompt_tokens = prompt.len(),
        max_tokens = opts.max_tokens
    )
    .entered();
    let mut fresh: Vec<LayerCache>;
    let (caches, cached, mut record) = match resumed {
        Some(t) => (
            &mut t.caches,
            t.cached,
            Some((&mut t.sampled, &mut t.reply)),
        ),
        None => {
            fresh = model.new_caches(bounds.context);
            (&mut fresh, 0, None)
        }
    };
    let Some(last) = prefill(model, &prompt[cached..], caches, bounds.chunk, || {
        sink.is_cancelled()
    })
    .map_err(mlx_error)?
    else {
        return Ok(FinishReason::Cancelled);
    };
    let mut sampler = Sampler::new(opts).map_err(mlx_error)?;
    let window = sampler.penalty_window();
    // The ids read back so far (prompt included), as far as the penalty looks.
    let mut read: VecDeque<u32> = prompt[prompt.len().saturating_sub(window)..]
        .iter()
        .copied()
        .collect();
    let recent = recent_ids(&read, None, window).map_err(mlx_error)?;
    let logits = model.logits(&last).map_err(mlx_error)?;
    let mut drawn = Drawn::draw(&logits, &mut sampler, recent.as_ref(), opts).map_err(mlx_error)?;
    drawn.queue().map_err(mlx_error)?;

    let mut profile = StepProfile::default();
    let mut ready = Vec::new();
    loop {
        // Queue the next step before reading this one, so MLX computes it
        // while the current token is handed over.
        let context_used = prompt.len() + seq.generated() + 1;
        let more = seq.generated() + 1 < opts.max_tokens && context_used < limit;
        let next = if more {
            let t0 = Instant::now();
            let y = &drawn.id;
            let input = y.reshape(&[1, 1]).map_err(mlx_error)?;
            let recent = recent_ids(&read, Some(y), window).map_err(mlx_error)?;
            let next = step(model, &input, caches, &mut sampler, recent.as_ref(), opts)
                .map_err(mlx_error)?;
            let t1 = Instant::now();
            next.queue().map_err(mlx_error)?;
            profile.build += t1 - t0;
            profile.dispatch += t1.elapsed();
            Some(next)
        } else {
            None
        };
        let t0 = Instant::now();
        let id: u32 = drawn.id.try_item_exact().map_err(mlx_error)?;
        let scores = match &drawn.scores {
            Some(s) => read_scores(s).map_err(mlx_error)?.into_iter().next(),
            None => None,
        };
        profile.wait += t0.elapsed();
        profile.steps += 1;
        clock.token();
        if let Some((sampled, _)) = record.as_mut() {
            sampled.push(id);
        }
        if window > 0 {
            read.push_back(id);
            if read.len() > window {
                read.pop_front();
            }
        }

        let before = seq.generated();
        let end = seq
            .push_scored(id, scores, next.is_none(), &mut ready)
            .map_err(|e| mlx_error(&e))?;
        if seq.generated() > before && seq.generated() % memory::CLEAR_CACHE_EVERY == 0 {
            memory::clear_cache();
        }
        if !stream_tokens(sink, &mut ready, reply_of(&mut record)) {
            return Ok(FinishReason::Cancelled);
        }
        if let Some(reason) = end {
            return Ok(reason);
        }
        if sink.is_cancelled() {
            return Ok(FinishReason::Cancelled);
        }
        match next {
            Some(next) => drawn = next,
            // `max_tokens`, or the end of the context after a prompt that
            // fitted: a normal end with the tokens kept (OpenAI's and
            // llama.cpp's `length`).
            None => {
                if seq.generated() < opts.max_tokens {
                    tracing::debug!(positions = context_used, limit, "the context is full");
                }
                seq.finish(&mut ready);
                if !stream_tokens(sink, &mut ready, reply_of(&mut record)) {
                    return Ok(FinishReason::Cancelled);
                }
                return Ok(FinishReason::Length);
            }
        }
    }
}

/// Where a decode loop's time goes, summed over its steps: building the next
/// step's graph, handing it to MLX, and waiting for the current token.
/// Reported at `debug` level when the loop ends (the rest of the wall time
/// is detokenising, stop strings and streaming).
#[derive(Debug, Default)]
struct StepProfile {
    steps: u32,
    build: Duration,
    dispatch: Duration,
    wait: Duration,
}

/// Logged when dropped, on every way out of the loop.
impl Drop for StepProfile {
    fn drop(&mut self) {
        let p = &*self;
        let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(p.steps.max(1));
        tracing::debug!(
            steps = p.steps,
            build_us = per(p.build),
            dispatch_us = per(p.dispatch),
            wait_us = per(p.wait),
            "decode step profile (means)"
        );
    }
}

/// The reply text a resumed run records, if the run records one.
fn reply_of<'a>(record: &'a mut Option<(&mut Vec<u32>, &mut String)>) -> Option<&'a mut String> {
    record.as_mut().map(|(_, reply)| &mut **reply)
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

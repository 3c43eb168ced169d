//! The generation loop: chunked prefill, then decode steps kept one ahead of
//! the consumer by MLX's lazy evaluation.

use std::time::{Duration, Instant};

use inference_core::stop::StopStrings;
use inference_core::{Error, FinishReason, GenerateMetrics, GenerateOptions, Token, TokenSink};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::argmax_axis;
use mlx_rs::transforms::{async_eval, eval};
use mlx_rs::Array;

use crate::cache::KvCache;
use crate::error::mlx_error;
use crate::memory;
use crate::models::layers::last_position;
use crate::models::CausalLm;
use crate::tokenizer::{ModelTokenizer, StreamDecoder};

/// Prompt tokens processed per forward pass during prefill.
pub const PREFILL_CHUNK: usize = 512;

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

/// The next token id of the last position of `logits` `[1, V]` (greedy).
fn sample(logits: &Array) -> Result<Array, Exception> {
    argmax_axis(logits, -1, false)
}

/// Runs one forward step for `ids` `[1, L]` and returns the sampled next id, lazily.
fn step(model: &dyn CausalLm, ids: &Array, caches: &mut [KvCache]) -> Result<Array, Exception> {
    let h = model.hidden(ids, caches)?;
    sample(&model.logits(&last_position(&h))?)
}

/// Runs `req` to completion, streaming into its sink. `limit` is the most
/// positions (prompt + generated) the context may hold.
pub fn run(
    model: &dyn CausalLm,
    tokenizer: &ModelTokenizer,
    req: &Request,
    limit: usize,
    chunk: usize,
) -> Outcome {
    let (prompt, queued) = (&req.prompt, req.queued);
    let started = Instant::now();
    memory::reset_peak();
    let mut state = Progress {
        generated: 0,
        first_token: None,
    };
    let end = decode_loop(model, tokenizer, req, limit, chunk, &mut state);
    let now = Instant::now();
    let first = state.first_token.unwrap_or(now);
    let prefill = first.saturating_duration_since(started);
    let decode: Duration = now.saturating_duration_since(first);
    let metrics = GenerateMetrics::from_timings(
        prompt.len(),
        state.generated,
        prefill,
        decode,
        now.saturating_duration_since(queued.min(started)),
    )
    .with_memory(memory::peak(), memory::active());
    Outcome { metrics, end }
}

struct Progress {
    generated: usize,
    first_token: Option<Instant>,
}

fn decode_loop(
    model: &dyn CausalLm,
    tokenizer: &ModelTokenizer,
    req: &Request,
    limit: usize,
    chunk: usize,
    progress: &mut Progress,
) -> Result<FinishReason, Error> {
    let Request {
        prompt, opts, sink, ..
    } = req;
    let _span = tracing::debug_span!(
        "generate",
        prompt_tokens = prompt.len(),
        max_tokens = opts.max_tokens
    )
    .entered();
    let mut caches = model.new_caches();
    let Some(last) =
        prefill(model, prompt, &mut caches, chunk, || sink.is_cancelled()).map_err(mlx_error)?
    else {
        return Ok(FinishReason::Cancelled);
    };
    let mut y = sample(&model.logits(&last).map_err(mlx_error)?).map_err(mlx_error)?;
    async_eval([&y]).map_err(mlx_error)?;

    let mut detok = StreamDecoder::new(&tokenizer.inner, prompt);
    let mut stops = StopStrings::new(&opts.stop_strings);
    let mut ready = Vec::new();
    let stop_ids = &opts.stop_tokens;
    loop {
        // Queue the next step before reading this one, so MLX computes it
        // while the current token is handed over.
        let context_used = prompt.len() + progress.generated + 1;
        let more = progress.generated + 1 < opts.max_tokens && context_used < limit;
        let next = if more {
            let input = y.reshape(&[1, 1]).map_err(mlx_error)?;
            let next = step(model, &input, &mut caches).map_err(mlx_error)?;
            async_eval([&next]).map_err(mlx_error)?;
            Some(next)
        } else {
            None
        };
        let id: u32 = y.try_item_exact().map_err(mlx_error)?;
        progress.first_token.get_or_insert_with(Instant::now);

        if (!opts.ignore_eos && tokenizer.is_eos(id)) || stop_ids.contains(&id) {
            return finish_text(&mut stops, sink, FinishReason::Stop);
        }
        let text = detok
            .step(id)
            .map_err(|e| Error::backend(crate::NAME, format!("detokenising id {id}: {e}")))?;
        progress.generated += 1;
        let stopped = stops.push(Token::new(id, text), &mut ready);
        for t in ready.drain(..) {
            if sink.send(t).is_err() {
                return Ok(FinishReason::Cancelled);
            }
        }
        if stopped {
            return Ok(FinishReason::Stop);
        }
        if sink.is_cancelled() {
            return Ok(FinishReason::Cancelled);
        }
        match next {
            Some(next) => y = next,
            None if progress.generated >= opts.max_tokens => {
                return finish_text(&mut stops, sink, FinishReason::Length);
            }
            None => {
                finish_text(&mut stops, sink, FinishReason::Length)?;
                return Err(Error::ContextOverflow {
                    needed: context_used + 1,
                    limit,
                });
            }
        }
    }
}

/// Releases text held back for stop strings, then ends with `reason`.
fn finish_text(
    stops: &mut StopStrings,
    sink: &TokenSink,
    reason: FinishReason,
) -> Result<FinishReason, Error> {
    let mut rest = Vec::new();
    stops.flush(&mut rest);
    for t in rest {
        if sink.send(t).is_err() {
            return Ok(FinishReason::Cancelled);
        }
    }
    Ok(reason)
}

/// Runs the prompt through the model in chunks of `chunk` tokens, filling
/// `caches`, and returns the last position's hidden state `[1, hidden]`.
/// Every chunk but the last is evaluated at once so the graph stays small;
/// `cancelled` is asked between chunks (`None` when it said yes).
fn prefill(
    model: &dyn CausalLm,
    prompt: &[u32],
    caches: &mut [KvCache],
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
        let state: Vec<&Array> = caches.iter().flat_map(|c| c.arrays()).collect();
        eval(state)?;
        start += chunk;
    }
    let part = &prompt[start..];
    let h = model.hidden(&Array::from_slice(part, &[1, part.len() as i32]), caches)?;
    Ok(Some(last_position(&h)))
}

/// The f32 logits after `ids`, from a fresh cache (prefilled in chunks).
pub fn last_logits(model: &dyn CausalLm, ids: &[u32], chunk: usize) -> Result<Vec<f32>, Error> {
    let run = || -> Result<Vec<f32>, Exception> {
        let mut caches = model.new_caches();
        let last = prefill(model, ids, &mut caches, chunk, || false)?
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

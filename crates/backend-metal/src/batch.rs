//! Batched work on the model's worker.
//!
//! - [`classify`]: one forward pass over every prompt at once, right-padded to
//!   the longest, under an explicit boolean mask `[B, 1, L, L]` (causal, the
//!   padding, and for sliding-window layers the window). Every row starts at
//!   position 0, so positions (and RoPE) are those of the prompt run alone.
//! - [`batch_generate`]: prompts of equal length are decoded together, one
//!   batch per length, each batch with its own caches; rows of a batch share
//!   positions, so no padding or mask is needed and each row's greedy ids are
//!   those of the prompt run alone. Batches of different lengths run one
//!   after another.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use inference_core::{
    BatchResult, ClassifyResult, Error, FinishReason, GenerateMetrics, GenerateOptions, Token,
};
use inference_runtime::Sequence;
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::ops::stack;
use mlx_rs::transforms::eval;
use mlx_rs::{Array, Dtype};

use crate::cache::{LayerCache, Rotation};
use crate::error::mlx_error;
use crate::generate::{read_scores, recent_ids, Bounds, Drawn};
use crate::models::layers::last_position;
use crate::models::CausalLm;
use crate::sample::{logprobs_of, Sampler};
use inference_text::{ModelTokenizer, StreamDecoder};

/// The boolean attention mask `[B, 1, L, L]` of right-padded rows of lengths
/// `lens`: query `i` of row `b` attends key `j` when `j ≤ i`, `j` is inside
/// `rotation` (one of its sinks, `j < sinks`, or recent enough,
/// `i − (window − sinks) < j`) and `j` is a real token of the row. A padding
/// query also attends itself, so that no row of the mask is empty (an empty
/// row would make NaNs that the next layer's keys would carry); real queries
/// never see padding, as padding comes after them.
pub fn padded_mask(
    lens: &[usize],
    l: usize,
    rotation: Option<Rotation>,
) -> Result<Array, Exception> {
    let (b, l) = (lens.len() as i32, l as i32);
    let q = Array::from_iter(0..l, &[1, 1, l, 1]);
    let k = Array::from_iter(0..l, &[1, 1, 1, l]);
    let mut keep = k.le(&q)?;
    if let Some(r) = rotation {
        let w = i32::try_from(r.window).unwrap_or(i32::MAX).max(1);
        let sinks = i32::try_from(r.sinks).unwrap_or(i32::MAX).min(w - 1);
        let mut visible = k.gt(&q.subtract(Array::from_int(w - sinks))?)?;
        if sinks > 0 {
            visible = visible.logical_or(&k.lt(Array::from_int(sinks))?)?;
        }
        keep = keep.logical_and(&visible)?;
    }
    let lens = Array::from_iter(lens.iter().map(|&n| n as i32), &[b, 1, 1, 1]);
    let real = k.lt(&lens)?.logical_or(&k.eq(&q)?)?;
    keep.logical_and(&real)
}

/// What the classify pass reads back: the picked ids, the f32 logits of
/// every row when asked for, and the vocabulary size.
type Picked = (Vec<u32>, Option<Vec<f32>>, usize);

/// The next token of each prompt (non-empty, inside the context) and, with
/// `opts.return_logits`, its f32 last-position logits, from one masked
/// forward pass over the right-padded batch.
pub fn classify(
    model: &dyn CausalLm,
    tokenizer: &ModelTokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    bounds: Bounds,
) -> Result<Vec<ClassifyResult>, Error> {
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let l = lens.iter().copied().max().unwrap_or(0);
    if l == 0 || lens.contains(&0) {
        return Err(Error::InvalidInput(
            "classify needs non-empty prompts".into(),
        ));
    }
    let run = || -> Result<Picked, Exception> {
        let b = prompts.len();
        let mut ids = vec![0u32; b * l];
        for (row, p) in ids.chunks_mut(l).zip(prompts) {
            row[..p.len()].copy_from_slice(p);
        }
        // One mask per distinct window, shared by the layers that use it.
        let mut masks: Vec<(Option<Rotation>, Array)> = Vec::new();
        let mut caches = Vec::new();
        for cache in model.new_caches(bounds.context) {
            let w = cache.rotation();
            let mask = match masks.iter().find(|(mw, _)| *mw == w) {
                Some((_, m)) => m.clone(),
                None => {
                    let m = padded_mask(&lens, l, w)?;
                    masks.push((w, m.clone()));
                    m
                }
            };
            caches.push(LayerCache::one_shot(mask));
        }
        let h = model.hidden(&Array::from_slice(&ids, &[b as i32, l as i32]), &mut caches)?;
        let hidden = h.dim(2);
        let rows: Vec<u32> = lens
            .iter()
            .enumerate()
            .map(|(r, len)| (r * l + len - 1) as u32)
            .collect();
        let last = h
            .reshape(&[(b * l) as i32, hidden])?
            .take_axis(Array::from_slice(&rows, &[b as i32]), 0)?;
        let logits = model.logits(&last)?;
        let vocab = logits.dim(1) as usize;
        let mut sampler = Sampler::new(opts)?;
        let window = sampler.penalty_window();
        let picks = if window == 0 {
            sampler.sample(&logits, None)?
        } else {
            let mut each = Vec::with_capacity(b);
            for (r, p) in prompts.iter().enumerate() {
                let recent = &p[p.len().saturating_sub(window)..];
                let recent = Array::from_slice(recent, &[recent.len() as i32]);
                each.push(sampler.sample(&logits.index(r as i32), Some(&recent))?);
            }
            stack(&each, 0)?
        };
        let logits = if opts.return_logits {
            Some(logits.as_dtype(Dtype::Float32)?)
        } else {
            None
        };
        let mut outputs = vec![&picks];
        outputs.extend(logits.as_ref());
        eval(outputs)?;
        let picks = picks
            .as_dtype(Dtype::Uint32)?
            .try_as_slice::<u32>()
            .map_err(|e| Exception::custom(e.to_string()))?
            .to_vec();
        let logits = match logits {
            Some(x) => Some(
                x.try_as_slice::<f32>()
                    .map_err(|e| Exception::custom(e.to_string()))?
                    .to_vec(),
            ),
            None => None,
        };
        Ok((picks, logits, vocab))
    };
    let (picks, logits, vocab) = run().map_err(mlx_error)?;
    let mut out = Vec::with_capacity(prompts.len());
    for (r, (p, &id)) in prompts.iter().zip(&picks).enumerate() {
        let mut detok = StreamDecoder::new(&tokenizer.inner, p);
        let detok_error =
            |e| Error::backend(crate::error::NAME, format!("detokenising id {id}: {e}"));
        let mut text = detok.step(id).map_err(detok_error)?;
        text.push_str(&detok.finish().map_err(detok_error)?);
        out.push(ClassifyResult {
            token: Token::new(id, text),
            logits: logits
                .as_ref()
                .map(|all| all[r * vocab..(r + 1) * vocab].to_vec()),
        });
    }
    Ok(out)
}

/// One row of a decoding batch.
struct Row<'t> {
    prompt: &'t [u32],
    /// Ids to tokens: end and stop ids, detokenising, stop strings.
    seq: Sequence<StreamDecoder<'t>>,
    tokens: Vec<Token>,
    /// The ids the repeat penalty looks at (prompt included).
    read: VecDeque<u32>,
    /// The row's own sampler, when rows are not sampled together.
    sampler: Option<Sampler>,
    /// Why the row ended, once it has.
    done: Option<(FinishReason, Option<Error>)>,
}

impl Row<'_> {
    /// Releases held-back text and ends the row with `reason`.
    fn finish(&mut self, reason: FinishReason, error: Option<Error>) {
        self.seq.finish(&mut self.tokens);
        self.done = Some((reason, error));
    }
}

/// Generates a continuation of each prompt (non-empty, shorter than the
/// context), batching prompts of equal length; returns the results in
/// order and the call's metrics.
pub fn batch_generate(
    model: &dyn CausalLm,
    tokenizer: &ModelTokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    bounds: Bounds,
) -> (Vec<BatchResult>, GenerateMetrics) {
    let started = Instant::now();
    crate::memory::reset_peak();
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, p) in prompts.iter().enumerate() {
        groups.entry(p.len()).or_default().push(i);
    }
    let mut results: Vec<Option<BatchResult>> = prompts.iter().map(|_| None).collect();
    let mut prefill = Duration::ZERO;
    for members in groups.values() {
        let rows: Vec<&[u32]> = members.iter().map(|&i| prompts[i].as_slice()).collect();
        let group_started = Instant::now();
        let (group, first) = run_group(model, tokenizer, &rows, opts, bounds);
        prefill += first.unwrap_or_else(Instant::now) - group_started;
        for (&i, r) in members.iter().zip(group) {
            results[i] = Some(r);
        }
    }
    let results: Vec<BatchResult> = results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| BatchResult {
                tokens: Vec::new(),
                finish_reason: FinishReason::Error,
                error: Some(Error::backend(
                    crate::error::NAME,
                    "a batch row was not run",
                )),
            })
        })
        .collect();
    let total = started.elapsed();
    let metrics = GenerateMetrics::from_timings(
        prompts.iter().map(Vec::len).sum(),
        results.iter().map(|r| r.tokens.len()).sum(),
        prefill,
        total.saturating_sub(prefill),
        total,
    )
    .with_memory(crate::memory::peak(), crate::memory::active());
    (results, metrics)
}

/// Decodes rows of equal length together; returns their results and when
/// the first tokens were read back.
fn run_group(
    model: &dyn CausalLm,
    tokenizer: &ModelTokenizer,
    prompts: &[&[u32]],
    opts: &GenerateOptions,
    bounds: Bounds,
) -> (Vec<BatchResult>, Option<Instant>) {
    let probe = Sampler::new(opts);
    let window = probe.as_ref().map_or(0, Sampler::penalty_window);
    // One argmax for every row, unless a row's sampler keeps state of its
    // own (a seeded key, a penalty window, counts of its draws) or biases.
    let together = probe.as_ref().is_ok_and(|s| s.is_greedy())
        && window == 0
        && !opts.uses_presence_frequency()
        && opts.logit_bias.is_empty();
    let mut rows: Vec<Row> = prompts
        .iter()
        .map(|&prompt| Row {
            prompt,
            seq: Sequence::new(
                opts,
                &tokenizer.eos,
                StreamDecoder::new(&tokenizer.inner, prompt),
            ),
            tokens: Vec::new(),
            read: prompt[prompt.len().saturating_sub(window)..]
                .iter()
                .copied()
                .collect(),
            sampler: None,
            done: None,
        })
        .collect();
    let mut first = None;
    if let Err(e) = decode_group(model, &mut rows, opts, bounds, together, &mut first) {
        let message = e.to_string();
        for row in rows.iter_mut().filter(|r| r.done.is_none()) {
            row.done = Some((
                FinishReason::Error,
                Some(Error::backend(crate::error::NAME, message.clone())),
            ));
        }
    }
    let results = rows
        .into_iter()
        .map(|r| {
            let (finish_reason, error) = r.done.unwrap_or((FinishReason::Error, None));
            BatchResult {
                tokens: r.tokens,
                finish_reason,
                error,
            }
        })
        .collect();
    (results, first)
}

/// Samples the next id of every row from `logits` `[G, V]`, lazily, as `[G]`:
/// with one argmax when `together`, else with each row's sampler and repeat
/// window (`pending` being the ids sampled but not read back yet).
fn sample_rows(
    rows: &mut [Row],
    logits: &Array,
    pending: Option<&Array>,
    together: bool,
    window: usize,
) -> Result<Array, Exception> {
    if together {
        return mlx_rs::ops::indexing::argmax_axis(logits, -1, false);
    }
    let mut each = Vec::with_capacity(rows.len());
    for (r, row) in rows.iter_mut().enumerate() {
        let pending_r = pending.map(|p| p.index(r as i32));
        let recent = recent_ids(&row.read, pending_r.as_ref(), window)?;
        let sampler = row
            .sampler
            .as_mut()
            .ok_or_else(|| Exception::custom("a batch row has no sampler"))?;
        each.push(sampler.sample(&logits.index(r as i32), recent.as_ref())?);
    }
    stack(&each, 0)
}

fn decode_group(
    model: &dyn CausalLm,
    rows: &mut [Row],
    opts: &GenerateOptions,
    bounds: Bounds,
    together: bool,
    first: &mut Option<Instant>,
) -> Result<(), Error> {
    let g = rows.len() as i32;
    let len = rows.first().map_or(0, |r| r.prompt.len());
    if !together {
        for row in rows.iter_mut() {
            row.sampler = Some(Sampler::new(opts).map_err(mlx_error)?);
        }
    }
    let window = rows
        .first()
        .and_then(|r| r.sampler.as_ref())
        .map_or(0, Sampler::penalty_window);
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.prompt.iter().copied()).collect();
    let ids = Array::from_slice(&flat, &[g, len as i32]);
    let mut caches = model.new_caches(bounds.context);
    let chunk = bounds.chunk.max(1);
    let mut start = 0;
    let last = loop {
        let end = (start + chunk).min(len);
        let part = ids.index((.., start as i32..end as i32));
        if end == len {
            let h = model.hidden_last(&part, &mut caches).map_err(mlx_error)?;
            break last_position(&h);
        }
        model.hidden(&part, &mut caches).map_err(mlx_error)?;
        let state: Vec<&Array> = caches.iter().flat_map(LayerCache::arrays).collect();
        eval(state).map_err(mlx_error)?;
        start = end;
    };
    let draw = |rows: &mut [Row], logits: &Array, pending: Option<&Array>| {
        let id = sample_rows(rows, logits, pending, together, window)?;
        let scores = if opts.logprobs {
            Some(logprobs_of(logits, &id, opts.top_logprobs)?)
        } else {
            None
        };
        let drawn = Drawn { id, scores };
        drawn.queue()?;
        Ok::<_, Exception>(drawn)
    };
    let logits = model.logits(&last).map_err(mlx_error)?;
    let mut drawn = draw(rows, &logits, None).map_err(mlx_error)?;
    let mut generated = 0usize;
    loop {
        let context_used = len + generated + 1;
        let more = generated + 1 < opts.max_tokens && context_used < bounds.limit;
        let next = if more {
            let input = drawn.id.reshape(&[g, 1]).map_err(mlx_error)?;
            let h = model.hidden(&input, &mut caches).map_err(mlx_error)?;
            let logits = model.logits(&last_position(&h)).map_err(mlx_error)?;
            Some(draw(rows, &logits, Some(&drawn.id)).map_err(mlx_error)?)
        } else {
            None
        };
        let y = &drawn.id;
        y.eval().map_err(mlx_error)?;
        let mut scores = match &drawn.scores {
            Some(s) => read_scores(s)
                .map_err(mlx_error)?
                .into_iter()
                .map(Some)
                .collect(),
            None => Vec::new(),
        }
        .into_iter();
        let ids: Vec<u32> = y
            .as_dtype(Dtype::Uint32)
            .and_then(|a| {
                a.try_as_slice::<u32>()
                    .map(<[u32]>::to_vec)
                    .map_err(|e| Exception::custom(e.to_string()))
            })
            .map_err(mlx_error)?;
        first.get_or_insert_with(Instant::now);
        generated += 1;
        if generated % crate::memory::CLEAR_CACHE_EVERY == 0 {
            crate::memory::clear_cache();
        }
        for (row, &id) in rows.iter_mut().zip(&ids) {
            let scored = scores.next().flatten();
            if row.done.is_some() {
                continue;
            }
            if window > 0 {
                row.read.push_back(id);
                if row.read.len() > window {
                    row.read.pop_front();
                }
            }
            match row
                .seq
                .push_scored(id, scored, next.is_none(), &mut row.tokens)
            {
                Ok(None) => {}
                Ok(Some(reason)) => row.done = Some((reason, None)),
                Err(e) => {
                    let e = Error::backend(crate::error::NAME, e.to_string());
                    row.finish(FinishReason::Error, Some(e));
                }
            }
        }
        if rows.iter().all(|r| r.done.is_some()) {
            return Ok(());
        }
        match next {
            Some(next) => drawn = next,
            None => {
                // `max_tokens` or the end of the context: both are a normal
                // end with the tokens kept.
                for row in rows.iter_mut().filter(|r| r.done.is_none()) {
                    row.finish(FinishReason::Length, None);
                }
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask equals the rule computed on the host: causal, inside the
    /// window, real keys only (a padding query also sees itself).
    #[test]
    fn padded_mask_follows_the_rule() {
        let lens = [3usize, 5, 1];
        let l = 5usize;
        let rotations = [
            None,
            Some(Rotation::sliding(2)),
            Some(Rotation::sliding(1)),
            Some(Rotation {
                window: 3,
                sinks: 1,
            }),
        ];
        for rotation in rotations {
            let m = padded_mask(&lens, l, rotation).unwrap();
            assert_eq!(m.shape(), &[3, 1, 5, 5]);
            let got = m.as_dtype(Dtype::Uint8).unwrap();
            let got = got.as_slice::<u8>();
            let mut n = 0;
            for &len in &lens {
                for i in 0..l {
                    for j in 0..l {
                        let inside =
                            rotation.is_none_or(|r| j < r.sinks || i < j + (r.window - r.sinks));
                        let want = j <= i && inside && (j < len || j == i);
                        assert_eq!(got[n] != 0, want, "len {len}, {rotation:?}, {i}, {j}");
                        if i < len && j >= len {
                            assert!(!want, "a real query sees padding");
                        }
                        n += 1;
                    }
                }
            }
        }
    }
}

//! Batched work on the model's worker.
//!
//! - [`classify`]: forward passes over groups of prompts, each group
//!   right-padded to its longest and at most a prefill chunk of tokens
//!   (rows × length), under an explicit boolean mask `[B, 1, L, L]` (causal,
//!   the padding, and for sliding-window layers the window); a prompt longer
//!   than a chunk is prefilled alone, in chunks. Every row starts at position
//!   0, so positions (and RoPE) are those of the prompt run alone.
//! - [`batch_generate`]: prompts of equal length are decoded together, one
//!   batch per length, each batch with its own caches; rows of a batch share
//!   positions, so no padding or mask is needed and each row's greedy ids are
//!   those of the prompt run alone. Batches of different lengths run one
//!   after another.

use inference_core::{ClassifyResult, Error, GenerateOptions, Token};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::ops::{concatenate, stack};
use mlx_rs::transforms::eval;
use mlx_rs::{Array, Dtype};

use crate::cache::{LayerCache, Rotation};
use crate::error::mlx_error;
use crate::generate::{prefill, Bounds};
use crate::models::CausalLm;
use crate::sample::Sampler;
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

/// The forward passes of a classify call over prompts of lengths `lens`:
/// rows grouped shortest first, each group's right-padded batch (rows × the
/// group's longest prompt) at most `chunk` tokens; a prompt longer than
/// `chunk` is a group of its own (prefilled in chunks).
fn passes(lens: &[usize], chunk: usize) -> Vec<Vec<usize>> {
    let chunk = chunk.max(1);
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&r| lens[r]);
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for r in order {
        // Sorted, so `lens[r]` is the group's longest prompt.
        match groups.last_mut() {
            Some(g) if (g.len() + 1) * lens[r] <= chunk => g.push(r),
            _ => groups.push(vec![r]),
        }
    }
    groups
}

/// The last positions' hidden states `[rows, hidden]` of `prompts[rows]`,
/// from one forward pass over their right-padded batch under
/// [`padded_mask`].
fn padded_last(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    rows: &[usize],
    bounds: Bounds,
) -> Result<Array, Exception> {
    let lens: Vec<usize> = rows.iter().map(|&r| prompts[r].len()).collect();
    let (b, l) = (rows.len(), lens.iter().copied().max().unwrap_or(0));
    let mut ids = vec![0u32; b * l];
    for (row, &r) in ids.chunks_mut(l).zip(rows) {
        row[..prompts[r].len()].copy_from_slice(&prompts[r]);
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
    let picks: Vec<u32> = lens
        .iter()
        .enumerate()
        .map(|(i, len)| (i * l + len - 1) as u32)
        .collect();
    h.reshape(&[(b * l) as i32, hidden])?
        .take_axis(Array::from_slice(&picks, &[b as i32]), 0)
}

/// What the classify pass reads back: the picked ids, the f32 logits of
/// every row when asked for, and the vocabulary size.
type Picked = (Vec<u32>, Option<Vec<f32>>, usize);

/// The next token of each prompt (non-empty, inside the context) and, with
/// `opts.return_logits`, its f32 last-position logits. Prompts go through
/// masked forward passes over right-padded batches of at most
/// `bounds.chunk` tokens ([`passes`]); a longer prompt is prefilled alone in
/// chunks. The tokens are then drawn from every row's logits at once.
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
        // Each pass's last positions, and the caller's row of each.
        let (mut parts, mut order) = (Vec::new(), Vec::with_capacity(b));
        for group in passes(&lens, bounds.chunk) {
            let h = match group.as_slice() {
                // Longer than a pass: prefilled alone, in chunks, through a
                // cache (the same attention as a one-shot pass).
                &[r] if lens[r] > bounds.chunk => {
                    let mut caches = model.new_caches(bounds.context);
                    prefill(model, &prompts[r], &mut caches, bounds.chunk, || false)?
                        .ok_or_else(|| Exception::custom("prefill was cancelled"))?
                }
                rows => padded_last(model, prompts, rows, bounds)?,
            };
            // A pass's intermediates go once its last positions are held.
            h.eval()?;
            order.extend(group);
            parts.push(h);
        }
        // Back in the caller's order: row `r` is row `at[r]` of the parts.
        let mut at = vec![0u32; b];
        for (k, &r) in order.iter().enumerate() {
            at[r] = k as u32;
        }
        let last = concatenate(&parts, 0)?.take_axis(Array::from_slice(&at, &[b as i32]), 0)?;
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

    /// Groups hold every row once, shortest first, within the chunk (rows ×
    /// longest); a prompt past the chunk is alone.
    #[test]
    fn passes_stay_within_the_chunk() {
        let lens = [5usize, 1, 9, 3, 3, 20, 2];
        for chunk in [1usize, 4, 9, 10, 64] {
            let groups = passes(&lens, chunk);
            let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>(), "chunk {chunk}");
            for g in &groups {
                let longest = g.iter().map(|&r| lens[r]).max().unwrap();
                assert!(g.len() == 1 || g.len() * longest <= chunk, "{chunk}: {g:?}");
                assert!(g.windows(2).all(|w| lens[w[0]] <= lens[w[1]]));
            }
        }
        assert_eq!(passes(&lens, 140), vec![vec![1, 6, 3, 4, 0, 2, 5]]);
        assert_eq!(passes(&lens, 64), vec![vec![1, 6, 3, 4, 0, 2], vec![5]]);
        assert_eq!(
            passes(&lens, 6),
            vec![vec![1, 6], vec![3, 4], vec![0], vec![2], vec![5]]
        );
    }
}

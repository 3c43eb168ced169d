//! The sampling chain of one sequence, in the MLX backend's order, built
//! from llama.cpp's sampler pieces:
//!
//! 1. the repeat penalty over the last `repeat_last_n` ids (prompt
//!    included; transformers' rule, which is llama.cpp's: positive logits
//!    divided, negative ones multiplied, once per distinct id);
//! 2. OpenAI's presence and frequency penalties over the ids generated in
//!    this call (the prompt does not count);
//! 3. the logit bias;
//! 4. top-p, then min-p, then top-k, then the temperature;
//! 5. a seeded draw (or the argmax when the temperature is 0).
//!
//! The penalties are two llama.cpp `penalties` samplers fed different
//! histories, which one llama.cpp chain could not do. Greedy decoding
//! without penalties or bias takes the argmax of the raw logits and builds
//! nothing per step.

use std::hash::{BuildHasher, Hasher};

use inference_core::{GenerateOptions, TokenId};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::token::LlamaToken;

/// One sequence's sampler.
pub(crate) struct Sampler {
    repeat: Option<LlamaSampler>,
    counts: Option<LlamaSampler>,
    bias: Option<LlamaSampler>,
    /// top-p, min-p, top-k, temperature and the draw; `None` is greedy.
    draw: Option<LlamaSampler>,
    /// The candidates, reused from step to step.
    data: Vec<LlamaTokenData>,
}

/// A 32-bit llama.cpp seed from ours. llama.cpp reads `u32::MAX` as "seed
/// from entropy", so that one value moves down by one.
pub(crate) fn llama_seed(seed: u64) -> u32 {
    let folded = (seed ^ (seed >> 32)) as u32;
    folded.min(u32::MAX - 1)
}

/// A seed from the process's hashing entropy (random per process and call).
fn entropy_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

impl Sampler {
    /// The chain `opts` (validated) ask for over a vocabulary of `vocab`
    /// ids, for a sequence whose prompt is `prompt` in a context of `n_ctx`
    /// positions (no window needs to be longer); `row` offsets the seed so
    /// that the rows of one batch draw differently.
    pub(crate) fn new(
        opts: &GenerateOptions,
        vocab: usize,
        n_ctx: usize,
        prompt: &[u32],
        row: u64,
    ) -> Self {
        let n_vocab = i32::try_from(vocab).unwrap_or(i32::MAX);
        let cap = |n: usize| i32::try_from(n.min(n_ctx).max(1)).unwrap_or(i32::MAX);
        let repeat = (opts.repeat_penalty != 1.0 && opts.repeat_last_n > 0).then(|| {
            let window = cap(opts.repeat_last_n);
            let mut s = LlamaSampler::penalties(n_vocab, window, opts.repeat_penalty, 0.0, 0.0);
            let tail = &prompt[prompt.len().saturating_sub(opts.repeat_last_n)..];
            s.accept_many(tail.iter().map(|&id| LlamaToken(id as i32)));
            s
        });
        let counts = opts.uses_presence_frequency().then(|| {
            // Every generated id stays in the window: a call generates at
            // most `max_tokens`, and fewer than the context holds.
            let window = cap(opts.max_tokens);
            LlamaSampler::penalties(
                n_vocab,
                window,
                1.0,
                opts.frequency_penalty,
                opts.presence_penalty,
            )
        });
        let bias = (!opts.logit_bias.is_empty()).then(|| {
            let biases: Vec<LlamaLogitBias> = opts
                .logit_bias
                .iter()
                .map(|(&id, &b)| LlamaLogitBias::new(LlamaToken(id as i32), b))
                .collect();
            LlamaSampler::logit_bias(n_vocab, &biases)
        });
        let draw = (!opts.is_greedy()).then(|| {
            let seed = opts.seed.unwrap_or_else(entropy_seed).wrapping_add(row);
            let mut chain = Vec::new();
            if opts.top_p > 0.0 && opts.top_p < 1.0 {
                chain.push(LlamaSampler::top_p(opts.top_p, 1));
            }
            if opts.min_p > 0.0 {
                chain.push(LlamaSampler::min_p(opts.min_p, 1));
            }
            if opts.top_k > 0 {
                chain.push(LlamaSampler::top_k(
                    i32::try_from(opts.top_k).unwrap_or(i32::MAX),
                ));
            }
            chain.push(LlamaSampler::temp(opts.temperature));
            chain.push(LlamaSampler::dist(llama_seed(seed)));
            LlamaSampler::chain_simple(chain)
        });
        Self {
            repeat,
            counts,
            bias,
            draw,
            data: Vec::new(),
        }
    }

    /// Whether anything but the argmax of the raw logits is needed.
    fn is_plain_greedy(&self) -> bool {
        self.repeat.is_none() && self.counts.is_none() && self.bias.is_none() && self.draw.is_none()
    }

    /// The next id drawn from `logits` (one row, the vocabulary's length).
    pub(crate) fn sample(&mut self, logits: &[f32]) -> TokenId {
        if self.is_plain_greedy() {
            return argmax(logits);
        }
        let mut data = std::mem::take(&mut self.data);
        data.clear();
        data.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &x)| LlamaTokenData::new(LlamaToken(i as i32), x, 0.0)),
        );
        let mut arr = LlamaTokenDataArray::new(data, false);
        for s in [&mut self.repeat, &mut self.counts, &mut self.bias]
            .into_iter()
            .flatten()
        {
            arr.apply_sampler(s);
        }
        let id = match &mut self.draw {
            Some(chain) => {
                arr.apply_sampler(chain);
                arr.selected_token().map(|t| t.0 as TokenId)
            }
            None => None,
        }
        .unwrap_or_else(|| {
            // Greedy (or a chain that selected nothing): the largest logit,
            // the first of equal ones.
            let mut best: Option<&LlamaTokenData> = None;
            for d in &arr.data {
                if best.is_none_or(|b| d.logit() > b.logit()) {
                    best = Some(d);
                }
            }
            best.map_or(0, |d| d.id().0 as TokenId)
        });
        self.data = arr.data;
        id
    }

    /// Records that `id` was generated (the penalties count it).
    pub(crate) fn accept(&mut self, id: TokenId) {
        let t = LlamaToken(id as i32);
        if let Some(s) = &mut self.repeat {
            s.accept(t);
        }
        if let Some(s) = &mut self.counts {
            s.accept(t);
        }
    }
}

/// The index of the largest logit (the first of equal ones).
pub(crate) fn argmax(logits: &[f32]) -> TokenId {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as TokenId
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![0.5, 2.0, -1.0, 1.9, 0.0]
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(&GenerateOptions::new(), 5, 64, &[], 0);
        assert_eq!(s.sample(&logits()), 1);
    }

    #[test]
    fn the_repeat_penalty_counts_the_prompt() {
        let opts = GenerateOptions::new().repeat_penalty(2.0);
        let mut s = Sampler::new(&opts, 5, 64, &[1], 0);
        // 2.0 / 2 = 1.0 < 1.9
        assert_eq!(s.sample(&logits()), 3);
    }

    #[test]
    fn presence_counts_generated_ids_only() {
        let mut opts = GenerateOptions::new();
        opts.presence_penalty = 0.5;
        let mut s = Sampler::new(&opts, 5, 64, &[1, 1, 1], 0);
        assert_eq!(s.sample(&logits()), 1, "the prompt does not count");
        s.accept(1);
        assert_eq!(s.sample(&logits()), 3, "2.0 − 0.5 < 1.9");
    }

    #[test]
    fn bias_moves_the_argmax() {
        let mut opts = GenerateOptions::new();
        opts.logit_bias.insert(4, 5.0);
        let mut s = Sampler::new(&opts, 5, 64, &[], 0);
        assert_eq!(s.sample(&logits()), 4);
    }

    #[test]
    fn seeded_draws_repeat_and_top_k_1_is_greedy() {
        let opts = GenerateOptions::new().temperature(1.0).seed(7);
        let draw = |row| {
            let mut s = Sampler::new(&opts, 5, 64, &[], row);
            (0..20).map(|_| s.sample(&logits())).collect::<Vec<_>>()
        };
        assert_eq!(draw(0), draw(0));
        let k1 = GenerateOptions::new().temperature(1.0).top_k(1).seed(3);
        let mut s = Sampler::new(&k1, 5, 64, &[], 0);
        assert!((0..20).all(|_| s.sample(&logits()) == 1));
    }

    #[test]
    fn seeds_fold_into_u32_without_the_entropy_value() {
        assert_eq!(llama_seed(7), 7);
        assert_ne!(llama_seed(u64::from(u32::MAX)), u32::MAX);
    }
}

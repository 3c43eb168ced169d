//! Log-probabilities of a row of raw logits on the host, for engines whose
//! logits come back to host memory (llama.cpp's do).

use inference_core::{TokenId, TokenLogprobs};

/// The log-softmax normaliser of `logits`: `log Σ exp(x)`, computed stably.
/// `−∞` for an empty row.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    max + sum.ln() as f32
}

/// The log-probability of `id` under the softmax of `logits` (`−∞` for an id
/// outside the row).
pub fn logprob_of(logits: &[f32], id: TokenId) -> f32 {
    logits
        .get(id as usize)
        .map_or(f32::NEG_INFINITY, |&x| x - log_sum_exp(logits))
}

/// `id`'s log-probability under the softmax of `logits` and, when `top > 0`,
/// the `top` most likely ids with theirs, most likely first (equal logits:
/// the lower id first).
pub fn token_logprobs(logits: &[f32], id: TokenId, top: usize) -> TokenLogprobs {
    let norm = log_sum_exp(logits);
    let logprob = logits
        .get(id as usize)
        .map_or(f32::NEG_INFINITY, |&x| x - norm);
    let mut best: Vec<(TokenId, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &x) in logits.iter().enumerate() {
            if best.len() == top && best.last().is_some_and(|&(_, low)| x <= low) {
                continue;
            }
            // After the equal ones already kept: they have lower ids.
            let at = best.partition_point(|&(_, v)| v >= x);
            best.insert(at, (i as TokenId, x));
            best.truncate(top);
        }
    }
    TokenLogprobs {
        logprob,
        top: best.into_iter().map(|(i, x)| (i, x - norm)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_direct_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        let lp = token_logprobs(&logits, 2, 3);
        assert!((lp.logprob - (2.0f32.exp() / z).ln()).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2], "most likely first, ties by id");
        for (id, v) in lp.top {
            assert!((v - (logits[id as usize].exp() / z).ln()).abs() < 1e-6);
        }
        let total: f32 = logits
            .iter()
            .map(|&x| (x - log_sum_exp(&logits)).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(logprob_of(&logits, 9), f32::NEG_INFINITY);
    }

    #[test]
    fn large_logits_do_not_overflow_and_top_is_capped() {
        let logits = [1000.0f32, 999.0];
        let lp = token_logprobs(&logits, 0, 5);
        assert!(lp.logprob.is_finite() && lp.logprob < 0.0);
        assert_eq!(lp.top.len(), 2);
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
    }
}

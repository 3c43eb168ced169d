//! The sampling chain: each filter against an expectation computed here on
//! the host (f64, plain sorting), the whole chain's distribution against the
//! documented order, seeding, and the chain inside generation on a fixture
//! model (seeded runs repeat, seeds differ, the repeat penalty acts on the
//! ids the decode loop has not read back yet).

mod common;

use backend_metal::mlx_rs::Array;
use backend_metal::sample::{apply_min_p, apply_repeat_penalty, apply_top_k, apply_top_p, Sampler};
use common::*;
use inference_core::{GenerateOptions, TextModel};

/// Distinct pseudo-random logits in [-6, 6) (a fixed LCG).
fn logits(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 12.0 - 6.0 + i as f32 * 1e-4
        })
        .collect()
}

fn row(x: &[f32]) -> Array {
    Array::from_slice(x, &[1, x.len() as i32])
}

fn values(a: &Array) -> Vec<f32> {
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

fn ids(a: &Array) -> Vec<u32> {
    a.eval().unwrap();
    a.as_slice::<u32>().to_vec()
}

/// Softmax in f64 (−∞ gets 0).
fn softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// Indices by descending value.
fn by_value_desc(x: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
    order
}

fn masked(x: &[f32], keep: impl Fn(usize) -> bool) -> Vec<f32> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| if keep(i) { v } else { f32::NEG_INFINITY })
        .collect()
}

/// Top-p on the host: a token stays when the tokens more likely than it
/// hold less than `p`.
fn host_top_p(x: &[f32], p: f64) -> Vec<f32> {
    let probs = softmax(x);
    let mut keep = vec![false; x.len()];
    let mut before = 0.0;
    for i in by_value_desc(x) {
        assert!(
            (before - p).abs() > 1e-4,
            "test data: top-p {p} sits on a boundary"
        );
        if before < p {
            keep[i] = true;
        }
        before += probs[i];
    }
    masked(x, |i| keep[i])
}

fn host_min_p(x: &[f32], p: f64) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let floor = m + p.ln();
    for &v in x {
        assert!(
            (v as f64 - floor).abs() > 1e-4,
            "test data: min-p {p} sits on a boundary"
        );
    }
    masked(x, |i| x[i] as f64 >= floor)
}

fn host_top_k(x: &[f32], k: usize) -> Vec<f32> {
    let top: Vec<usize> = by_value_desc(x).into_iter().take(k).collect();
    masked(x, |i| top.contains(&i))
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    let x = logits(64, 1);
    for p in [0.05, 0.3, 0.5, 0.77, 0.9, 0.99] {
        let ours = values(&apply_top_p(&row(&x), p as f32).unwrap());
        let expected = host_top_p(&x, p);
        assert_eq!(ours, expected, "top-p {p}");
        let kept = ours.iter().filter(|v| v.is_finite()).count();
        assert!((1..64).contains(&kept), "top-p {p} kept {kept}");
    }
    // A tiny p keeps just the most likely token.
    let ours = values(&apply_top_p(&row(&x), 1e-9).unwrap());
    assert_eq!(ours, host_top_k(&x, 1));
}

#[test]
fn min_p_drops_tokens_below_p_times_the_top() {
    let x = logits(64, 2);
    for p in [0.01, 0.1, 0.33, 0.8] {
        let ours = values(&apply_min_p(&row(&x), p as f32).unwrap());
        assert_eq!(ours, host_min_p(&x, p), "min-p {p}");
    }
}

#[test]
fn top_k_keeps_the_k_largest() {
    let x = logits(64, 3);
    for k in [1, 2, 5, 63] {
        let ours = values(&apply_top_k(&row(&x), k).unwrap());
        assert_eq!(ours, host_top_k(&x, k), "top-k {k}");
    }
    assert_eq!(values(&apply_top_k(&row(&x), 64).unwrap()), x);
    assert_eq!(values(&apply_top_k(&row(&x), 1000).unwrap()), x);
}

#[test]
fn repeat_penalty_hits_each_recent_token_once() {
    let mut x = logits(32, 4);
    x[3] = 2.5;
    x[7] = -1.5;
    x[12] = 0.0;
    let recent = [3u32, 7, 3, 3, 12, 7, 20];
    let penalty = 1.7f32;
    let ours = values(
        &apply_repeat_penalty(
            &row(&x),
            &Array::from_slice(&recent, &[recent.len() as i32]),
            penalty,
        )
        .unwrap(),
    );
    let expected: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if !recent.contains(&(i as u32)) {
                v
            } else if v > 0.0 {
                v / penalty
            } else {
                v * penalty
            }
        })
        .collect();
    assert_eq!(ours, expected);
    assert_eq!(ours[3], 2.5 / 1.7, "penalised once, not three times");
    assert_eq!(ours[7], -1.5 * 1.7);
}

/// Draws `n` samples from `x` with `opts` in one call (rows broadcast).
fn draw(opts: &GenerateOptions, x: &[f32], n: usize) -> Vec<u32> {
    let mut s = Sampler::new(opts).unwrap();
    let batch =
        backend_metal::mlx_rs::ops::broadcast_to(row(x), &[n as i32, x.len() as i32]).unwrap();
    ids(&s.sample(&batch, None).unwrap())
}

/// Checks the frequencies of `samples` against `probs` (5 σ, and never a
/// token of probability 0).
fn assert_distribution(label: &str, samples: &[u32], probs: &[f64]) {
    let n = samples.len() as f64;
    let mut counts = vec![0usize; probs.len()];
    for &s in samples {
        counts[s as usize] += 1;
    }
    for (i, (&c, &p)) in counts.iter().zip(probs).enumerate() {
        if p == 0.0 {
            assert_eq!(
                c, 0,
                "{label}: token {i} is filtered out but drawn {c} times"
            );
            continue;
        }
        let freq = c as f64 / n;
        let sigma = (p * (1.0 - p) / n).sqrt();
        assert!(
            (freq - p).abs() <= 5.0 * sigma + 1e-3,
            "{label}: token {i} drawn with frequency {freq}, expected {p}"
        );
    }
}

#[test]
fn the_chain_runs_in_the_documented_order() {
    // Probabilities 0.35, 0.25, 0.2, 0.2. Top-p 0.5 first keeps the two
    // most likely (0.35 < 0.5 before the second), top-k 2 keeps them both.
    // The other order (top-k, then top-p on the renormalised pair
    // 0.58 / 0.42) would keep one.
    let x: Vec<f32> = [0.35f32, 0.25, 0.2, 0.2].iter().map(|p| p.ln()).collect();
    let opts = GenerateOptions::new()
        .temperature(1.0)
        .top_p(0.5)
        .top_k(2)
        .seed(11);
    let samples = draw(&opts, &x, 20_000);
    assert_distribution("order", &samples, &[0.35 / 0.6, 0.25 / 0.6, 0.0, 0.0]);

    // Every filter and a temperature, against the host chain.
    let x = logits(48, 5);
    let (t, top_p, min_p, top_k) = (0.7f32, 0.9, 0.05, 9);
    let opts = GenerateOptions::new()
        .temperature(t)
        .top_p(top_p as f32)
        .min_p(min_p as f32)
        .top_k(top_k)
        .seed(3);
    let filtered = host_top_k(&host_min_p(&host_top_p(&x, top_p), min_p), top_k);
    let scaled: Vec<f32> = filtered.iter().map(|v| v / t).collect();
    let probs = softmax(&scaled);
    assert!(probs.iter().filter(|&&p| p > 0.0).count() >= 3);
    assert_distribution("chain", &draw(&opts, &x, 20_000), &probs);

    // Temperature alone.
    let opts = GenerateOptions::new().temperature(1.6).seed(4);
    let scaled: Vec<f32> = logits(16, 6).iter().map(|v| v / 1.6).collect();
    assert_distribution(
        "temperature",
        &draw(&opts, &logits(16, 6), 20_000),
        &softmax(&scaled),
    );
}

#[test]
fn seeds_repeat_and_differ() {
    let x = vec![0.0f32; 100];
    let opts = GenerateOptions::new().temperature(1.0);
    let a = draw(&opts.clone().seed(7), &x, 64);
    assert_eq!(a, draw(&opts.clone().seed(7), &x, 64));
    assert_ne!(a, draw(&opts.clone().seed(8), &x, 64));
    // Unseeded samplers differ from each other.
    assert_ne!(draw(&opts, &x, 64), draw(&opts, &x, 64));
    // One sampler's successive draws differ (its key moves on).
    let mut s = Sampler::new(&opts.seed(7)).unwrap();
    let first = ids(&s.sample(&row(&x), None).unwrap());
    let more: Vec<Vec<u32>> = (0..8)
        .map(|_| ids(&s.sample(&row(&x), None).unwrap()))
        .collect();
    assert!(more.iter().any(|m| *m != first));
}

#[test]
fn greedy_takes_the_argmax_of_the_penalised_logits() {
    let mut x = logits(40, 8);
    let top = by_value_desc(&x)[0];
    let second = by_value_desc(&x)[1];
    // Above every other logit (they lie in [-6, 6)).
    x[top] = 9.0;
    x[second] = 8.5;
    let mut s = Sampler::new(&GenerateOptions::new()).unwrap();
    assert!(s.is_greedy());
    assert_eq!(ids(&s.sample(&row(&x), None).unwrap()), [top as u32]);
    let mut s = Sampler::new(&GenerateOptions::new().repeat_penalty(1.5)).unwrap();
    let recent = Array::from_slice(&[top as u32], &[1]);
    assert_eq!(
        ids(&s.sample(&row(&x), Some(&recent)).unwrap()),
        [second as u32]
    );
}

// ---- in generation, on a fixture model --------------------------------------

fn run_ids(model: &backend_metal::MlxModel, prompt: &str, opts: &GenerateOptions) -> Vec<u32> {
    model
        .generate(prompt, opts)
        .unwrap()
        .collect_tokens()
        .unwrap()
        .iter()
        .map(|t| t.id)
        .collect()
}

#[test]
fn seeded_generation_repeats_and_top_k_1_is_greedy() {
    let model = load(&fixture("qwen3-f32"));
    let prompt = &golden("qwen3-f32")[0];
    let opts = GenerateOptions::new()
        .max_tokens(24)
        .ignore_eos(true)
        .temperature(1.0)
        .top_p(0.95);
    let a = run_ids(&model, &prompt.text, &opts.clone().seed(42));
    assert_eq!(a.len(), 24);
    assert_eq!(a, run_ids(&model, &prompt.text, &opts.clone().seed(42)));
    assert_ne!(a, run_ids(&model, &prompt.text, &opts.clone().seed(43)));
    assert_ne!(
        a,
        prompt.greedy[..24],
        "sampling at temperature 1 should leave the greedy path"
    );

    // Filters that leave one token make sampling greedy.
    for opts in [
        GenerateOptions::new().temperature(0.8).top_k(1).seed(1),
        GenerateOptions::new().temperature(0.8).min_p(1.0).seed(2),
    ] {
        let ours = run_ids(&model, &prompt.text, &opts.max_tokens(32).ignore_eos(true));
        assert_greedy_parity("top-k 1", &ours, &prompt.greedy, &prompt.margins, 1e-3);
    }
}

#[test]
fn repeat_penalty_in_generation_matches_a_host_computation() {
    penalty_in_generation_matches_the_host(4.0);
}

/// A penalty between 0 and 1 favours recent tokens, as in transformers
/// (their positive logits multiplied up, negative ones shrunk).
#[test]
fn a_penalty_below_one_favours_recent_tokens() {
    penalty_in_generation_matches_the_host(0.25);
}

fn penalty_in_generation_matches_the_host(penalty: f32) {
    // At each step: the model's logits after the ids so far, penalised on
    // the host over the last `n` ids, then argmax. The decode loop queues a
    // step before reading the previous id back, so this checks that the id
    // still on the device is part of the penalty's window.
    let model = load(&fixture("llama-f32"));
    let prompt = &golden("llama-f32")[1];
    let (n, steps) = (48, 20);
    let opts = GenerateOptions::new()
        .max_tokens(steps)
        .ignore_eos(true)
        .repeat_penalty(penalty)
        .repeat_last_n(n);
    let ours = run_ids(&model, &prompt.text, &opts);
    assert_eq!(ours.len(), steps);
    let mut ids = prompt.ids.clone();
    let mut checked = 0;
    for (step, &got) in ours.iter().enumerate() {
        let mut x = model.last_logits(&ids).unwrap();
        let window = &ids[ids.len().saturating_sub(n)..];
        for (i, v) in x.iter_mut().enumerate() {
            if window.contains(&(i as u32)) {
                *v = if *v > 0.0 { *v / penalty } else { *v * penalty };
            }
        }
        let order = by_value_desc(&x);
        let margin = x[order[0]] - x[order[1]];
        if got != order[0] as u32 {
            assert!(
                margin < 1e-3,
                "penalty {penalty}, step {step}: ours {got}, host {} (margin {margin})",
                order[0]
            );
            break;
        }
        checked += 1;
        ids.push(got);
    }
    assert!(checked >= 10, "only {checked} steps compared");
    // And the penalty changes the output.
    assert_ne!(ours, prompt.greedy[..steps]);
}

#[test]
fn sampling_speed_on_the_fixture() {
    // Reported, not asserted: decode speed of greedy and of the full chain.
    let model = load(&fixture("qwen3-f32"));
    let text = &golden("qwen3-f32")[0].text;
    // Warm-up.
    model
        .generate(text, &GenerateOptions::new().max_tokens(16))
        .unwrap()
        .collect_tokens()
        .unwrap();
    for (label, opts) in [
        ("greedy", GenerateOptions::new()),
        (
            "sampled (penalty, top-p, min-p, top-k, temperature)",
            GenerateOptions::new()
                .temperature(0.8)
                .top_p(0.9)
                .min_p(0.02)
                .top_k(40)
                .repeat_penalty(1.1)
                .seed(5),
        ),
    ] {
        let mut stream = model
            .generate(text, &opts.max_tokens(128).ignore_eos(true))
            .unwrap();
        let n = stream.collect_tokens().unwrap().len();
        assert_eq!(n, 128);
        let m = stream.metrics().unwrap();
        eprintln!(
            "{label}: {:.0} tok/s ({:.2} ms per step)",
            m.decode_tokens_per_sec,
            1e3 / m.decode_tokens_per_sec
        );
    }
}

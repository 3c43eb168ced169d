//! Log-probabilities against transformers (f32 fixtures), and the presence
//! and frequency penalties and logit bias against a host computation.

mod common;

use backend_metal::sample::{apply_presence_frequency, dense_bias};
use backend_metal::MlxModel;
use common::*;
use inference_core::{Error, GenerateOptions, TextModel, Token};

/// Natural-log softmax of `logits`, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    logits.iter().map(|&x| x as f64 - max - sum.ln()).collect()
}

fn tokens(model: &MlxModel, ids: &[u32], opts: &GenerateOptions) -> Vec<Token> {
    model
        .generate_ids(ids.to_vec(), opts)
        .unwrap()
        .collect_tokens()
        .unwrap()
}

/// The first token's log-probability and its top alternatives equal
/// log-softmax of transformers' logits within 1e-4; later tokens equal
/// log-softmax of our own logits after the prefix (one forward pass each).
#[test]
fn logprobs_match_log_softmax_of_transformers_logits() {
    for name in ["qwen3-f32", "qwen2-f32", "llama-f32", "gemma3-f32"] {
        let model = load(&fixture(name));
        for p in golden(name) {
            let label = format!("{name}/{}", p.name);
            let opts = GenerateOptions::new()
                .max_tokens(4)
                .ignore_eos(true)
                .logprobs(5);
            let out = tokens(&model, &p.ids, &opts);
            assert_eq!(out.len(), 4, "{label}");
            let reference = log_softmax(&p.last_logits);
            let first = out[0].logprobs.as_ref().expect("logprobs");
            assert!(
                (first.logprob as f64 - reference[out[0].id as usize]).abs() < 1e-4,
                "{label}: {} vs {}",
                first.logprob,
                reference[out[0].id as usize]
            );
            assert_eq!(first.top.len(), 5, "{label}");
            // Most likely first; each value is that id's log-probability.
            for w in first.top.windows(2) {
                assert!(w[0].1 >= w[1].1, "{label}: {:?}", first.top);
            }
            let mut order: Vec<usize> = (0..reference.len()).collect();
            order.sort_by(|&a, &b| reference[b].total_cmp(&reference[a]));
            for (rank, &(id, lp)) in first.top.iter().enumerate() {
                assert!((lp as f64 - reference[id as usize]).abs() < 1e-4, "{label}");
                // The same ids as transformers' top 5, but where two are tied.
                let theirs = order[rank];
                if theirs != id as usize {
                    assert!(
                        (reference[theirs] - reference[id as usize]).abs() < 1e-4,
                        "{label}: rank {rank}: {id} vs {theirs}"
                    );
                }
            }
            // Greedy: the token is the most likely one.
            assert_eq!(first.top[0].0, out[0].id, "{label}");
            let mut prefix = p.ids.clone();
            for (before, t) in out.iter().zip(&out[1..]) {
                prefix.push(before.id);
                let ours = log_softmax(&model.last_logits(&prefix).unwrap());
                let lp = t.logprobs.as_ref().expect("logprobs").logprob as f64;
                assert!((lp - ours[t.id as usize]).abs() < 1e-4, "{label}");
            }
        }
    }
}

/// Logprobs without alternatives, and the options' rules.
#[test]
fn logprobs_without_alternatives_and_refusals() {
    let model = load(&fixture("qwen3-f32"));
    let p = &golden("qwen3-f32")[0];
    let out = tokens(
        &model,
        &p.ids,
        &GenerateOptions::new().max_tokens(2).logprobs(0),
    );
    for t in &out {
        let lp = t.logprobs.as_ref().expect("logprobs");
        assert!(lp.top.is_empty() && lp.logprob <= 0.0);
    }
    let none = tokens(&model, &p.ids, &GenerateOptions::new().max_tokens(2));
    assert!(none.iter().all(|t| t.logprobs.is_none()));
    // The same ids with and without logprobs.
    let ids = |v: &[Token]| v.iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(ids(&out), ids(&none));

    let refused = |opts: GenerateOptions| model.generate("hi", &opts).err().unwrap();
    assert!(matches!(
        refused(GenerateOptions::new().logprobs(21)),
        Error::InvalidOption {
            field: "top_logprobs",
            ..
        }
    ));
    let mut opts = GenerateOptions::new();
    opts.top_logprobs = 3;
    assert!(matches!(
        refused(opts),
        Error::InvalidOption {
            field: "top_logprobs",
            ..
        }
    ));
    assert!(matches!(
        refused(GenerateOptions::new().presence_penalty(2.5)),
        Error::InvalidOption {
            field: "presence_penalty",
            ..
        }
    ));
    assert!(matches!(
        refused(GenerateOptions::new().logit_bias(1, 101.0)),
        Error::InvalidOption {
            field: "logit_bias",
            ..
        }
    ));
    let vocab = model.info().vocab_size as u32;
    assert!(matches!(
        refused(GenerateOptions::new().logit_bias(vocab, 1.0)),
        Error::InvalidOption {
            field: "logit_bias",
            ..
        }
    ));
    assert!(matches!(
        model.classify(&["hi".into()], &GenerateOptions::new().logprobs(1)),
        Err(Error::Unsupported { .. })
    ));
}

/// OpenAI's penalties and the bias on random logits, against the host.
#[test]
fn presence_frequency_and_bias_on_the_host() {
    use backend_metal::mlx_rs::Array;
    let v = 11usize;
    let logits: Vec<f32> = (0..v)
        .map(|i| ((i * 7) % 5) as f32 - 1.5 + i as f32 * 0.1)
        .collect();
    let counts: Vec<f32> = (0..v).map(|i| [0.0, 1.0, 3.0][i % 3]).collect();
    let (presence, frequency) = (0.7f32, -0.4f32);
    let got = apply_presence_frequency(
        &Array::from_slice(&logits, &[1, v as i32]),
        &Array::from_slice(&counts, &[v as i32]),
        presence,
        frequency,
    )
    .unwrap();
    got.eval().unwrap();
    let got: Vec<f32> = got.as_slice::<f32>().to_vec();
    for i in 0..v {
        let want = logits[i] - counts[i] * frequency - if counts[i] > 0.0 { presence } else { 0.0 };
        assert!((got[i] - want).abs() < 1e-6, "{i}: {} vs {want}", got[i]);
    }
    let bias = dense_bias(&[(2, 5.0), (7, -100.0)], v as i32).unwrap();
    bias.eval().unwrap();
    let b = bias.as_slice::<f32>();
    assert_eq!((b[2], b[7], b[0]), (5.0, -100.0, 0.0));
    assert!(dense_bias(&[(11, 1.0)], v as i32).is_err());
}

/// Greedy generation with presence and frequency penalties and a bias gives
/// the ids a host loop gives: at each step our logits after the prefix,
/// penalised by the counts of the ids generated so far, biased, argmax.
#[test]
fn penalised_biased_greedy_generation_equals_a_host_loop() {
    for name in ["qwen3-f32", "gemma3-f32"] {
        let model = load(&fixture(name));
        let p = &golden(name)[0];
        let (presence, frequency) = (0.9f32, 0.6f32);
        let favoured = p.greedy[3];
        let banned = p.greedy[0];
        let opts = GenerateOptions::new()
            .max_tokens(10)
            .ignore_eos(true)
            .presence_penalty(presence)
            .frequency_penalty(frequency)
            .logit_bias(favoured, 1.5)
            .logit_bias(banned, -100.0);
        let ours: Vec<u32> = tokens(&model, &p.ids, &opts).iter().map(|t| t.id).collect();
        let mut prefix = p.ids.clone();
        let mut counts = vec![0f32; model.info().vocab_size];
        for (step, &id) in ours.iter().enumerate() {
            let mut x = model.last_logits(&prefix).unwrap();
            for (j, xj) in x.iter_mut().enumerate() {
                let c = counts[j];
                *xj -= c * frequency + if c > 0.0 { presence } else { 0.0 };
            }
            x[favoured as usize] += 1.5;
            x[banned as usize] -= 100.0;
            let mut order: Vec<usize> = (0..x.len()).collect();
            order.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
            let best = order[0];
            if best != id as usize {
                assert!(
                    (x[best] - x[id as usize]).abs() < 1e-3,
                    "{name} step {step}: {id} vs {best} (not a near-tie)"
                );
            }
            assert_ne!(id, banned, "{name}: a −100 bias bans the id");
            counts[id as usize] += 1.0;
            prefix.push(id);
        }
        // The penalties change the greedy continuation of this prompt.
        let plain: Vec<u32> = tokens(
            &model,
            &p.ids,
            &GenerateOptions::new().max_tokens(10).ignore_eos(true),
        )
        .iter()
        .map(|t| t.id)
        .collect();
        assert_ne!(plain, ours, "{name}");
    }
}

/// Batch rows with logprobs and penalties equal their single runs.
#[test]
fn batch_rows_keep_their_logprobs_and_penalties() {
    let model = load(&fixture("qwen3-f32"));
    let prompts: Vec<Vec<u32>> = golden("qwen3-f32").iter().map(|p| p.ids.clone()).collect();
    let opts = GenerateOptions::new()
        .max_tokens(6)
        .ignore_eos(true)
        .logprobs(3)
        .frequency_penalty(0.8)
        .logit_bias(prompts[0][0], 2.0);
    let rows = model.batch_generate_ids(prompts.clone(), &opts).unwrap();
    for (p, row) in prompts.iter().zip(rows) {
        let single = tokens(&model, p, &opts);
        assert_eq!(
            row.tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
            single.iter().map(|t| t.id).collect::<Vec<_>>()
        );
        for (a, b) in row.tokens.iter().zip(&single) {
            let (a, b) = (a.logprobs.as_ref().unwrap(), b.logprobs.as_ref().unwrap());
            assert!((a.logprob - b.logprob).abs() < 1e-4);
            assert_eq!(a.top.len(), 3);
            assert_eq!(
                a.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                b.top.iter().map(|t| t.0).collect::<Vec<_>>()
            );
        }
    }
}

/// With `prompt_logprobs`, the stream reports each prompt id's
/// log-probability after the ids before it: log-softmax of the logits after
/// each prefix (which the parity tests hold to transformers').
#[test]
fn prompt_logprobs_are_those_of_each_prefix() {
    for name in ["qwen3-f32", "gemma3-f32"] {
        let model = load(&fixture(name));
        let p = &golden(name)[0];
        let mut stream = model
            .generate_ids(
                p.ids.clone(),
                &GenerateOptions::new().max_tokens(1).prompt_logprobs(true),
            )
            .unwrap();
        stream.collect_tokens().unwrap();
        let lps = stream.prompt_logprobs().expect("prompt logprobs").to_vec();
        assert_eq!(lps.len(), p.ids.len() - 1, "{name}");
        for k in 1..p.ids.len() {
            let reference = log_softmax(&model.last_logits(&p.ids[..k]).unwrap());
            assert!(
                (lps[k - 1] as f64 - reference[p.ids[k] as usize]).abs() < 1e-4,
                "{name}: position {k}"
            );
        }
        // Not asked for: none.
        let mut plain = model
            .generate_ids(p.ids.clone(), &GenerateOptions::new().max_tokens(1))
            .unwrap();
        plain.collect_tokens().unwrap();
        assert!(plain.prompt_logprobs().is_none());
        assert!(matches!(
            model.batch_generate_ids(
                vec![p.ids.clone()],
                &GenerateOptions::new().prompt_logprobs(true)
            ),
            Err(Error::Unsupported { .. })
        ));
    }
}

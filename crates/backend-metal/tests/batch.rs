//! `classify` and `batch_generate` against single-prompt runs, and concurrent
//! `generate` calls on one model.
//!
//! - `classify`: each prompt's next token and f32 logits equal a lone
//!   `last_logits` run (argmax equal, logits within 1e-4 × max|logit|), on
//!   every architecture, with prompts of different lengths in one batch (so
//!   rows are padded) in both orders, including Gemma prompts far longer
//!   than its 8-token sliding window; in one pass, and with a 4-token prefill
//!   chunk that splits the batch and prefills the longer prompts in chunks.
//! - `batch_generate`: each row's tokens and finish reason equal a lone
//!   `generate` with the same options, for greedy decoding with and without
//!   stops, with rows of equal and of different lengths.
//! - eight threads calling `generate` at once each get what a lone call gets.

mod common;

use backend_metal::MlxModel;
use common::*;
use inference_core::{Error, FinishReason, GenerateOptions, TextModel, Token};

const F32_LOGIT_TOL: f32 = 1e-4;

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// The golden prompts of a fixture plus one short prompt of the same length
/// as its first (so two rows share a length).
fn prompts(model: &MlxModel, name: &str) -> Vec<String> {
    let mut texts: Vec<String> = golden(name).into_iter().map(|p| p.text).collect();
    let short = model.encode(&texts[0]).unwrap().len();
    // The first prompt's words in another order (the tiny fixture
    // vocabularies know those words): rotations of all but the first word.
    let words: Vec<&str> = texts[0].split(' ').collect();
    let twin = (1..words.len().saturating_sub(1))
        .map(|k| {
            let mut w = words.clone();
            w[1..].rotate_left(k);
            w.join(" ")
        })
        .find(|t| model.encode(t).unwrap().len() == short)
        .expect("a prompt as long as the first golden one");
    texts.insert(1, twin);
    texts
}

fn check_classify(name: &str) {
    let model = load(&fixture(name));
    let texts = prompts(&model, name);
    let lens: Vec<usize> = texts
        .iter()
        .map(|t| model.encode(t).unwrap().len())
        .collect();
    assert!(
        lens.iter().min() != lens.iter().max(),
        "{name}: the batch must mix lengths: {lens:?}"
    );
    if name.starts_with("gemma3") {
        assert!(lens.iter().any(|&l| l > 8) && lens.iter().any(|&l| l <= 8));
    }
    let opts = GenerateOptions::new().return_logits(true);
    let mut reversed = texts.clone();
    reversed.reverse();
    // The lone runs, with the default prefill chunk.
    let alone: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| model.last_logits(&model.encode(t).unwrap()).unwrap())
        .collect();
    // One pass for the whole batch; then passes of at most 4 tokens (rows ×
    // length), which split the batch and prefill longer prompts in chunks.
    for chunk in [2048, 4] {
        model.set_prefill_chunk(chunk);
        for batch in [texts.clone(), reversed.clone()] {
            let results = model.classify(&batch, &opts).unwrap();
            assert_eq!(results.len(), batch.len());
            for (text, r) in batch.iter().zip(&results) {
                let label = format!("{name}/chunk {chunk}/{text:.20}");
                let alone = &alone[texts.iter().position(|t| t == text).unwrap()];
                let ours = r.logits.as_ref().expect("logits were asked for");
                let (err, scale) = logit_error(ours, alone);
                assert!(
                    err <= F32_LOGIT_TOL * scale,
                    "{label}: logits differ by {err} (max |logit| {scale})"
                );
                assert_eq!(r.token.id, argmax(alone), "{label}: next token");
                assert_eq!(argmax(ours), argmax(alone), "{label}: argmax");
            }
        }
    }
    model.set_prefill_chunk(2048);
    // Without return_logits: the same tokens, no logits.
    let plain = model.classify(&texts, &GenerateOptions::new()).unwrap();
    let with = model.classify(&texts, &opts).unwrap();
    for (a, b) in plain.iter().zip(&with) {
        assert!(a.logits.is_none());
        assert_eq!(a.token, b.token);
    }
}

#[test]
fn classify_qwen3() {
    check_classify("qwen3-f32");
}

#[test]
fn classify_qwen2() {
    check_classify("qwen2-f32");
}

#[test]
fn classify_llama() {
    check_classify("llama-f32");
}

#[test]
fn classify_gemma3_past_the_sliding_window() {
    check_classify("gemma3-f32");
}

#[test]
fn classify_samples_per_the_options_and_refuses_empty_input() {
    let model = load(&fixture("qwen3-f32"));
    let texts = prompts(&model, "qwen3-f32");
    // Options classify cannot honour are refused, not ignored.
    for opts in [
        GenerateOptions::new().stop_string("."),
        GenerateOptions::new().stop_token(3),
    ] {
        assert!(
            matches!(
                model.classify(&texts, &opts),
                Err(inference_core::Error::Unsupported { .. })
            ),
            "{opts:?}"
        );
    }
    let greedy = model.classify(&texts, &GenerateOptions::new()).unwrap();
    // top-k 1 leaves only the argmax to draw, at any temperature.
    let sampled = model
        .classify(
            &texts,
            &GenerateOptions::new().temperature(1.5).top_k(1).seed(3),
        )
        .unwrap();
    for (g, s) in greedy.iter().zip(&sampled) {
        assert_eq!(g.token.id, s.token.id);
    }
    // A strong repeat penalty on each row's own prompt changes a row only
    // where its argmax is one of its own last ids.
    let penalised = model
        .classify(
            &texts,
            &GenerateOptions::new().repeat_penalty(1e6).repeat_last_n(4),
        )
        .unwrap();
    for ((text, g), p) in texts.iter().zip(&greedy).zip(&penalised) {
        let ids = model.encode(text).unwrap();
        let last = &ids[ids.len().saturating_sub(4)..];
        assert!(
            !last.contains(&p.token.id),
            "{text:.20}: penalised id chosen"
        );
        if !last.contains(&g.token.id) {
            assert_eq!(g.token.id, p.token.id, "{text:.20}");
        }
    }
    for bad in [Vec::new(), vec!["ok".to_owned(), String::new()]] {
        match model.classify(&bad, &GenerateOptions::new()) {
            Err(Error::InvalidInput(_)) => {}
            other => panic!("{bad:?}: expected InvalidInput, got {other:?}"),
        }
    }
}

fn alone(model: &MlxModel, text: &str, opts: &GenerateOptions) -> (Vec<Token>, FinishReason) {
    let mut stream = model.generate(text, opts).unwrap();
    let tokens = stream.collect_tokens().unwrap();
    (tokens, stream.finish_reason().unwrap())
}

fn check_batch(name: &str) {
    let model = load(&fixture(name));
    let texts = prompts(&model, name);
    let lens: Vec<usize> = texts
        .iter()
        .map(|t| model.encode(t).unwrap().len())
        .collect();
    assert_eq!(lens[0], lens[1], "{name}: two rows share a length");
    assert!(lens.iter().min() != lens.iter().max());
    let plain = GenerateOptions::new().max_tokens(12).ignore_eos(true);
    // Stop on the third greedy id of the first row: that row stops early, the
    // others go on (or stop where that id comes up for them).
    let first = alone(&model, &texts[0], &plain).0;
    let stop_id = first[2].id;
    let stopping = GenerateOptions::new().max_tokens(12).stop_token(stop_id);
    for opts in [plain, stopping] {
        let results = model.batch_generate(&texts, &opts).unwrap();
        assert_eq!(results.len(), texts.len());
        let mut reasons = Vec::new();
        for (text, r) in texts.iter().zip(&results) {
            let (tokens, reason) = alone(&model, text, &opts);
            assert!(r.error.is_none(), "{name}/{text:.20}: {:?}", r.error);
            assert_eq!(r.tokens, tokens, "{name}/{text:.20}: tokens");
            assert_eq!(r.finish_reason, reason, "{name}/{text:.20}: finish");
            reasons.push(reason);
        }
        if !opts.stop_tokens.is_empty() {
            assert_eq!(results[0].tokens.len(), 2, "{name}: the first row stops");
            assert_eq!(reasons[0], FinishReason::Stop);
        }
    }
    match model.batch_generate(&[], &GenerateOptions::new()) {
        Err(Error::InvalidInput(_)) => {}
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn batch_generate_qwen3() {
    check_batch("qwen3-f32");
}

#[test]
fn batch_generate_gemma3() {
    check_batch("gemma3-f32");
}

#[test]
fn eight_threads_generate_at_once() {
    let name = "qwen3-f32";
    let model = load(&fixture(name));
    let texts: Vec<String> = golden(name).into_iter().map(|p| p.text).collect();
    let opts = GenerateOptions::new().max_tokens(16).ignore_eos(true);
    let expected: Vec<Vec<Token>> = texts.iter().map(|t| alone(&model, t, &opts).0).collect();
    let got: Vec<(usize, Vec<Token>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (model, opts, text) = (&model, &opts, &texts[i % texts.len()]);
                s.spawn(move || {
                    let mut stream = model.generate(text, opts).unwrap();
                    (i, stream.collect_tokens().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(got.len(), 8);
    for (i, tokens) in got {
        assert_eq!(tokens.len(), 16);
        assert_eq!(tokens, expected[i % texts.len()], "thread {i}");
    }
}

/// `batch_generate_ids`: rows given as ids decode together and each equals
/// its lone `generate_ids`; ids outside the vocabulary are refused up front.
#[test]
fn batch_generate_ids_rows_equal_lone_runs() {
    let model = load(&fixture("qwen3-f32"));
    let opts = GenerateOptions::new().max_tokens(6).ignore_eos(true);
    let prompts: Vec<Vec<u32>> = (0..3)
        .map(|r| (0..12).map(|i| 50 + r * 31 + i * 3).collect())
        .collect();
    let rows = model.batch_generate_ids(prompts.clone(), &opts).unwrap();
    assert_eq!(rows.len(), 3);
    for (p, row) in prompts.into_iter().zip(rows) {
        let alone: Vec<u32> = model
            .generate_ids(p, &opts)
            .unwrap()
            .collect_tokens()
            .unwrap()
            .iter()
            .map(|t| t.id)
            .collect();
        let got: Vec<u32> = row.tokens.iter().map(|t| t.id).collect();
        assert_eq!(got, alone);
        assert_eq!(row.finish_reason, FinishReason::Length);
    }
    let vocab = model.info().vocab_size as u32;
    assert!(matches!(
        model.batch_generate_ids(vec![vec![1, vocab]], &opts),
        Err(Error::InvalidInput(_))
    ));
}

//! Continuous batching: calls on one model decode together, each at its own
//! position, joining and leaving between steps, and each gets what it gets
//! alone.
//!
//! - Every architecture (f32, CPU): calls of different prompt lengths and
//!   `max_tokens`, sent at once, each give their lone run's greedy ids (a
//!   divergence is excused only where the lone run's top-2 margin is below
//!   1e-3), Gemma 3's sliding-window layers (an 8-token window in the
//!   fixture) included, and every layer rotating under a context length
//!   with attention sinks; the scheduler reports batched steps.
//! - 16 threads, staggered, with different options each (greedy, seeded
//!   sampling, penalties, logit bias, stop ids and strings, logprobs) each
//!   get their lone run's tokens.
//! - A cancelled call frees its slot at once; the others go on unchanged.
//! - The prompt cache: a prompt extending an earlier call's ids reuses its
//!   cache (reported in the metrics) and gives a cold run's tokens.
//! - A KV budget: a burst beyond it pauses the newest calls and still
//!   completes every one as alone; a call that alone outgrows it ends with
//!   `MemoryBudget`; a full queue answers `Busy`, a wait past the time limit
//!   `Timeout`.
//!
//! The lone references come from a second model that runs one call at a
//! time with no prompt cache.

mod common;

use std::time::{Duration, Instant};

use backend_metal::MlxModel;
use common::*;
use inference_core::{Error, FinishReason, GenerateOptions, LoadOptions, TextModel, Token};

const NEAR_TIE: f32 = 1e-3;

fn cpu() -> LoadOptions {
    LoadOptions::new().gpu_layers(default_gpu_layers())
}

/// A model that runs calls one at a time from fresh caches: the reference.
fn lone_model(name: &str) -> MlxModel {
    load_with(
        &fixture(name),
        &cpu().parallel_slots(1).prompt_cache_bytes(0),
    )
}

/// Runs `ids` with `opts`; the tokens and the finish reason.
fn run(model: &MlxModel, ids: &[u32], opts: &GenerateOptions) -> (Vec<Token>, FinishReason) {
    let mut stream = model.generate_ids(ids.to_vec(), opts).unwrap();
    let tokens = stream.collect_tokens().unwrap();
    (tokens, stream.finish_reason().unwrap())
}

/// `got` equals `want` (the lone run's tokens after `prompt`), except that a
/// divergence where the lone run's top-2 margin is below [`NEAR_TIE`] ends
/// the comparison there.
fn assert_as_alone(
    label: &str,
    reference: &MlxModel,
    prompt: &[u32],
    got: &[Token],
    want: &[Token],
) {
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        if a.id != b.id {
            let mut ids = prompt.to_vec();
            ids.extend(want[..k].iter().map(|t| t.id));
            let mut logits = reference.last_logits(&ids).unwrap();
            logits.sort_by(|x, y| y.total_cmp(x));
            let margin = logits[0] - logits[1];
            assert!(
                margin < NEAR_TIE,
                "{label}: diverges at step {k} ({} vs {} alone) with margin {margin}",
                a.id,
                b.id
            );
            eprintln!("{label}: near-tie at step {k} (margin {margin}): comparison ends there");
            return;
        }
        assert_eq!(a.text, b.text, "{label}: text at step {k}");
    }
    assert_eq!(got.len(), want.len(), "{label}: lengths");
}

/// Deterministic prompt ids inside a vocabulary of `vocab`.
fn prompt(len: usize, seed: u32, vocab: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed * 131 + i * 37 + 11) % (vocab - 10) + 5)
        .collect()
}

fn check_mixed_lengths(name: &str) {
    let cases = [(3, 40), (17, 25), (9, 33), (30, 12), (1, 40), (12, 7)];
    check_mixed_lengths_with(name, &cpu(), &cases);
}

fn check_mixed_lengths_with(name: &str, opts: &LoadOptions, cases: &[(usize, usize)]) {
    let model = load_with(&fixture(name), opts);
    let reference = load_with(
        &fixture(name),
        &opts.clone().parallel_slots(1).prompt_cache_bytes(0),
    );
    let vocab = model.info().vocab_size as u32;
    let cases: Vec<(Vec<u32>, usize)> = cases
        .iter()
        .enumerate()
        .map(|(i, &(len, max))| (prompt(len, i as u32, vocab), max))
        .collect();
    let results: Vec<(Vec<Token>, FinishReason)> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(ids, max)| {
                let model = &model;
                let opts = GenerateOptions::new().max_tokens(*max).ignore_eos(true);
                s.spawn(move || run(model, ids, &opts))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, ((ids, max), (tokens, reason))) in cases.iter().zip(&results).enumerate() {
        let opts = GenerateOptions::new().max_tokens(*max).ignore_eos(true);
        let (want, want_reason) = run(&reference, ids, &opts);
        assert_eq!(*reason, want_reason, "{name}/{i}: finish reason");
        assert_as_alone(&format!("{name}/{i}"), &reference, ids, tokens, &want);
    }
    let stats = model.scheduler_stats();
    assert!(
        stats.batched_steps > 20 && stats.largest_batch >= 4,
        "{name}: the calls were not batched: {stats:?}"
    );
    assert_eq!((stats.running, stats.waiting), (0, 0));
}

#[test]
fn mixed_lengths_qwen3() {
    check_mixed_lengths("qwen3-f32");
}

#[test]
fn mixed_lengths_qwen2() {
    check_mixed_lengths("qwen2-f32");
}

#[test]
fn mixed_lengths_llama() {
    check_mixed_lengths("llama-f32");
}

#[test]
fn mixed_lengths_gemma3_past_its_sliding_window() {
    check_mixed_lengths("gemma3-f32");
}

/// Under a context length with attention sinks every layer rotates: rows
/// (one far past the window, so that the batch drops dead columns and
/// keeps each row's sinks) still decode as alone.
#[test]
fn mixed_lengths_under_a_context_length_with_sinks() {
    let opts = cpu()
        .context_len(16)
        .sink_tokens(2)
        .allow_past_max_positions(true);
    let cases = [(1, 300), (20, 40), (5, 290), (9, 30)];
    check_mixed_lengths_with("qwen3-f32", &opts, &cases);
    check_mixed_lengths_with("gemma3-f32", &opts, &cases);
}

/// The options of thread `i`.
fn options_of(i: usize, stop_id: u32, stop_text: &str) -> GenerateOptions {
    let base = GenerateOptions::new().max_tokens(12 + i % 5 * 4);
    match i % 8 {
        0 => base.ignore_eos(true),
        1 => base
            .temperature(0.9)
            .top_p(0.9)
            .seed(i as u64)
            .ignore_eos(true),
        // A window of three: an id counted twice would push one out (and
        // the logprobs would show the penalty on the wrong ids).
        2 => base
            .repeat_penalty(1.3)
            .repeat_last_n(3)
            .logprobs(2)
            .frequency_penalty(0.4)
            .presence_penalty(0.2)
            .ignore_eos(true),
        3 => base.logprobs(3).ignore_eos(true),
        4 => base.stop_token(stop_id),
        5 => base.temperature(0.7).top_k(20).min_p(0.05).seed(7),
        6 => base.logit_bias(stop_id, 3.0).ignore_eos(true),
        _ => base.stop_string(stop_text).ignore_eos(true),
    }
}

#[test]
fn sixteen_staggered_threads_with_their_own_options() {
    let name = "qwen3-f32";
    let model = load(&fixture(name));
    let reference = lone_model(name);
    let vocab = model.info().vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|i| prompt(4 + i * 3 % 17, 50 + i as u32, vocab))
        .collect();
    // A stop id and string the greedy continuation of the first prompt meets.
    let (first, _) = run(
        &reference,
        &prompts[0],
        &GenerateOptions::new().max_tokens(8).ignore_eos(true),
    );
    let (stop_id, stop_text) = (first[3].id, first[5].text.clone());
    let got: Vec<(Vec<Token>, FinishReason)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let (model, p, text) = (&model, &prompts[i], stop_text.as_str());
                s.spawn(move || {
                    std::thread::sleep(Duration::from_millis(4 * i as u64));
                    run(model, p, &options_of(i, stop_id, text))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (tokens, reason)) in got.iter().enumerate() {
        let opts = options_of(i, stop_id, &stop_text);
        let (want, want_reason) = run(&reference, &prompts[i], &opts);
        let label = format!("thread {i}");
        assert_eq!(*reason, want_reason, "{label}: finish reason");
        if opts.temperature > 0.0 {
            let ids = |t: &[Token]| t.iter().map(|t| t.id).collect::<Vec<_>>();
            assert_eq!(ids(tokens), ids(&want), "{label}: sampled ids");
        } else {
            assert_as_alone(&label, &reference, &prompts[i], tokens, &want);
        }
        for (a, b) in tokens.iter().zip(&want) {
            match (&a.logprobs, &b.logprobs) {
                (Some(x), Some(y)) => {
                    assert!((x.logprob - y.logprob).abs() < 1e-3, "{label}: logprob");
                    assert_eq!(x.top.len(), y.top.len(), "{label}: top logprobs");
                }
                (None, None) => {}
                _ => panic!("{label}: logprobs on one side only"),
            }
        }
    }
    assert!(model.scheduler_stats().largest_batch >= 4);
}

/// With two slots, cancelling one of two long calls lets a waiting third
/// start at once; the other long call's tokens are its lone run's.
#[test]
fn a_cancelled_call_frees_its_slot() {
    let name = "llama-f32";
    let model = load_with(&fixture(name), &cpu().parallel_slots(2));
    let reference = lone_model(name);
    let vocab = model.info().vocab_size as u32;
    let long = GenerateOptions::new().max_tokens(200).ignore_eos(true);
    let short = GenerateOptions::new().max_tokens(5).ignore_eos(true);
    let (pa, pb, pc) = (
        prompt(6, 1, vocab),
        prompt(11, 2, vocab),
        prompt(4, 3, vocab),
    );
    let mut a = model.generate_ids(pa, &long).unwrap();
    let b = model.generate_ids(pb.clone(), &long).unwrap();
    let c = model.generate_ids(pc.clone(), &short).unwrap();
    for _ in 0..5 {
        a.next().unwrap().unwrap();
    }
    assert_eq!(model.scheduler_stats().waiting, 1, "the third call waits");
    a.cancel();
    let (b_done, c_done) = std::thread::scope(|s| {
        let hb = s.spawn(move || {
            let mut b = b;
            let tokens = b.collect_tokens().unwrap();
            (tokens, Instant::now())
        });
        let hc = s.spawn(move || {
            let mut c = c;
            let tokens = c.collect_tokens().unwrap();
            (tokens, Instant::now())
        });
        (hb.join().unwrap(), hc.join().unwrap())
    });
    assert!(
        c_done.1 < b_done.1,
        "the waiting call ran beside the long one"
    );
    assert_as_alone(
        "b",
        &reference,
        &pb,
        &b_done.0,
        &run(&reference, &pb, &long).0,
    );
    assert_as_alone(
        "c",
        &reference,
        &pc,
        &c_done.0,
        &run(&reference, &pc, &short).0,
    );
    assert_eq!(a.finish_reason(), None);
    let rest: Vec<_> = a.by_ref().collect();
    assert!(rest.len() < 195, "the cancelled call stopped");
    assert_eq!(a.finish_reason(), Some(FinishReason::Cancelled));
}

/// A prompt extending an earlier call's prompt and reply prefills only the
/// new part and gives what a cold run gives.
#[test]
fn prompt_cache_reuse_gives_a_cold_runs_tokens() {
    for name in ["qwen3-f32", "gemma3-f32"] {
        let model = load(&fixture(name));
        let reference = lone_model(name);
        let vocab = model.info().vocab_size as u32;
        let opts = GenerateOptions::new().max_tokens(10).ignore_eos(true);
        let first = prompt(14, 9, vocab);
        let (reply, _) = run(&model, &first, &opts);
        let mut second = first.clone();
        second.extend(reply.iter().map(|t| t.id));
        second.extend(prompt(5, 10, vocab));
        let mut stream = model.generate_ids(second.clone(), &opts).unwrap();
        let tokens = stream.collect_tokens().unwrap();
        let cached = stream.metrics().unwrap().cached_prompt_tokens;
        // The cache holds the prompt and the reply but its last id.
        assert_eq!(cached, first.len() + reply.len() - 1, "{name}");
        let (cold, _) = run(&reference, &second, &opts);
        assert_as_alone(name, &reference, &second, &tokens, &cold);
        assert_eq!(
            model.scheduler_stats().prompt_cache_tokens,
            cached as u64,
            "{name}"
        );
        // Off, nothing is reused.
        let (_, _) = run(&reference, &first, &opts);
        let mut s = reference.generate_ids(second.clone(), &opts).unwrap();
        s.collect_tokens().unwrap();
        assert_eq!(s.metrics().unwrap().cached_prompt_tokens, 0);
    }
}

/// KV bytes of one position of the qwen3 fixture (every layer, f32).
fn position_bytes(model: &MlxModel) -> u64 {
    let c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("qwen3-f32").join("config.json")).unwrap(),
    )
    .unwrap();
    let kv = c["num_key_value_heads"].as_u64().unwrap();
    let hd = c["head_dim"].as_u64().unwrap();
    let _ = model;
    2 * kv * hd * c["num_hidden_layers"].as_u64().unwrap() * 4
}

/// Six long calls under a budget of three 256-position caches: the steps
/// that grow the caches past 256 positions pause the newest calls, which
/// resume later; every call still gives its lone run's tokens. A call that
/// alone outgrows the budget ends with `MemoryBudget` after its tokens.
#[test]
fn a_burst_beyond_the_kv_budget_pauses_and_completes_every_call() {
    let name = "qwen3-f32";
    let probe = lone_model(name);
    let step = 256u64 * position_bytes(&probe);
    let opts = cpu().allow_past_max_positions(true);
    let model = load_with(
        &fixture(name),
        &opts.clone().kv_budget_bytes(3 * step + step / 2),
    );
    let reference = load_with(
        &fixture(name),
        &opts.clone().parallel_slots(1).prompt_cache_bytes(0),
    );
    let vocab = model.info().vocab_size as u32;
    let gen = GenerateOptions::new().max_tokens(300).ignore_eos(true);
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| prompt(5 + i, 20 + i as u32, vocab))
        .collect();
    let got: Vec<Vec<Token>> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (model, gen) = (&model, &gen);
                s.spawn(move || run(model, p, gen).0)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (p, tokens)) in prompts.iter().zip(&got).enumerate() {
        let (want, _) = run(&reference, p, &gen);
        assert_as_alone(&format!("call {i}"), &reference, p, tokens, &want);
    }
    let stats = model.scheduler_stats();
    assert!(stats.paused > 0, "nothing was paused: {stats:?}");
    assert!(stats.largest_batch <= 3, "{stats:?}");

    // Alone past the budget: the tokens so far, then the error.
    let small = load_with(&fixture(name), &opts.kv_budget_bytes(step + step / 2));
    let mut stream = small.generate_ids(prompts[0].clone(), &gen).unwrap();
    let mut n = 0;
    let error = loop {
        match stream.next() {
            Some(Ok(_)) => n += 1,
            Some(Err(e)) => break e,
            None => panic!("the call ended without an error"),
        }
    };
    assert!(matches!(error, Error::MemoryBudget { .. }), "{error}");
    assert!(n > 200, "{n} tokens before the budget ran out");
}

/// One slot and a queue of one: a third call is refused with `Busy` at
/// once; with a time limit, a call that waits too long ends with `Timeout`.
#[test]
fn a_full_queue_is_busy_and_a_long_wait_times_out() {
    let name = "qwen3-f32";
    let model = load_with(&fixture(name), &cpu().parallel_slots(1).max_queue(1));
    let vocab = model.info().vocab_size as u32;
    let long = GenerateOptions::new().max_tokens(150).ignore_eos(true);
    let mut a = model.generate_ids(prompt(5, 1, vocab), &long).unwrap();
    a.next().unwrap().unwrap();
    let b = model.generate_ids(prompt(5, 2, vocab), &long).unwrap();
    match model.generate_ids(prompt(5, 3, vocab), &long) {
        Err(Error::Busy { limit: 1, .. }) => {}
        other => panic!("expected Busy, got {other:?}"),
    }
    drop((a, b));

    let model = load_with(
        &fixture(name),
        &cpu()
            .parallel_slots(1)
            .queue_timeout(Duration::from_millis(30)),
    );
    let mut a = model.generate_ids(prompt(5, 1, vocab), &long).unwrap();
    a.next().unwrap().unwrap();
    let mut b = model.generate_ids(prompt(5, 2, vocab), &long).unwrap();
    match b.next() {
        Some(Err(Error::Timeout { waited_ms })) => assert!(waited_ms >= 30),
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert_eq!(a.collect_tokens().unwrap().len(), 149);
}

/// Prompts of one length sent together are prefilled as one batch (then
/// decode side by side): each row still gives its lone run's tokens, with
/// its own sampler.
#[test]
fn prompts_of_one_length_prefill_together_as_alone() {
    for name in ["qwen3-f32", "gemma3-f32"] {
        let model = load(&fixture(name));
        let reference = lone_model(name);
        let vocab = model.info().vocab_size as u32;
        let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(11, 70 + i, vocab)).collect();
        let greedy = GenerateOptions::new().max_tokens(20).ignore_eos(true);
        let rows = model.batch_generate_ids(prompts.clone(), &greedy).unwrap();
        for (i, (p, row)) in prompts.iter().zip(&rows).enumerate() {
            let (want, _) = run(&reference, p, &greedy);
            assert_as_alone(&format!("{name}/{i}"), &reference, p, &row.tokens, &want);
        }
        let sampled = greedy.clone().temperature(0.8).seed(3);
        let rows = model.batch_generate_ids(prompts.clone(), &sampled).unwrap();
        for (i, (p, row)) in prompts.iter().zip(&rows).enumerate() {
            let ids = |t: &[Token]| t.iter().map(|t| t.id).collect::<Vec<_>>();
            assert_eq!(
                ids(&row.tokens),
                ids(&run(&reference, p, &sampled).0),
                "{name}/{i}"
            );
        }
        assert!(model.scheduler_stats().largest_batch >= 6, "{name}");
    }
}

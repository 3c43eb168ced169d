//! Text as generation streams it: the pieces add up to the decode of the
//! generated ids, and a stop string split across tokens is never yielded
//! while the text before it is.

mod common;

use common::*;
use inference_core::{FinishReason, GenerateOptions, TextModel, Token};
use inference_text::ModelTokenizer;

fn tokens(model: &backend_metal::MlxModel, prompt: &str, opts: &GenerateOptions) -> Vec<Token> {
    model
        .generate(prompt, opts)
        .unwrap()
        .collect_tokens()
        .unwrap()
}

/// The random fixture models often generate invalid byte sequences. A
/// byte-level decoder shows each invalid sequence as U+FFFD wherever the
/// sequence is cut, so its stream must equal the full decode exactly. A
/// SentencePiece byte-fallback decoder turns a whole run of byte tokens into
/// U+FFFD when any part of it is invalid, even a valid ASCII byte that the
/// stream had already shown: there the comparison holds for valid text only.
#[test]
fn streamed_text_is_the_decode_of_the_generated_ids() {
    let mut compared = 0;
    for name in ["qwen3-f32", "qwen2-f32", "llama-f32"] {
        let model = load(&fixture(name));
        let tok = ModelTokenizer::from_dir(&fixture(name)).unwrap();
        for p in golden(name) {
            let opts = GenerateOptions::new().max_tokens(32).ignore_eos(true);
            let out = tokens(&model, &p.text, &opts);
            let ids: Vec<u32> = out.iter().map(|t| t.id).collect();
            let text: String = out.iter().map(|t| t.text.as_str()).collect();
            let all: Vec<u32> = p.ids.iter().chain(&ids).copied().collect();
            let full = tok.decode(&all).unwrap();
            let before = tok.decode(&p.ids).unwrap();
            if name == "llama-f32" && full.contains('\u{FFFD}') {
                continue;
            }
            compared += 1;
            assert_eq!(
                Some(text.as_str()),
                full.strip_prefix(before.as_str()),
                "{name}/{}",
                p.name
            );
        }
    }
    assert!(compared >= 8, "only {compared} generations compared");
}

#[test]
fn stop_string_across_tokens_in_generation() {
    let model = load(&fixture("qwen3-f32"));
    let prompt = &golden("qwen3-f32")[1].text;
    let opts = GenerateOptions::new().max_tokens(32).ignore_eos(true);
    let out = tokens(&model, prompt, &opts);
    let full: String = out.iter().map(|t| t.text.as_str()).collect();
    // The end of one token's text and the start of the next one's.
    let i = (1..out.len() - 1)
        .find(|&i| !out[i].text.is_empty() && !out[i + 1].text.is_empty())
        .expect("two neighbouring tokens with text");
    let left = out[i].text.chars().last().unwrap();
    let right = out[i + 1].text.chars().next().unwrap();
    let stop = format!("{left}{right}");
    let expected = &full[..full.find(&stop).unwrap()];

    let mut stream = model
        .generate(prompt, &opts.clone().stop_string(stop.clone()))
        .unwrap();
    let got = stream.collect_tokens().unwrap();
    let text: String = got.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(text, expected, "stop {stop:?}");
    assert_eq!(stream.finish_reason(), Some(FinishReason::Stop));
    let ids: Vec<u32> = got.iter().map(|t| t.id).collect();
    assert_eq!(
        ids[..],
        out.iter().map(|t| t.id).collect::<Vec<_>>()[..ids.len()]
    );
}

/// Concurrent calls keep their own metrics: each stream reports its own
/// prompt and generated counts, whichever call finishes last.
#[test]
fn concurrent_calls_keep_their_own_metrics() {
    let model = std::sync::Arc::new(load(&fixture("qwen3-f32")));
    let prompts = ["Hello", "The capital of France is a city that"];
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let model = std::sync::Arc::clone(&model);
            let prompt = prompts[i % 2];
            std::thread::spawn(move || {
                let n = 2 + i;
                let opts = GenerateOptions::new().max_tokens(n).ignore_eos(true);
                let mut s = model.generate(prompt, &opts).unwrap();
                let got = s.collect_tokens().unwrap().len();
                let m = s.metrics().unwrap().clone();
                let prompt_len = s.prompt_ids().unwrap().len();
                (n, got, prompt_len, m)
            })
        })
        .collect();
    for h in handles {
        let (n, got, prompt_len, m) = h.join().unwrap();
        assert_eq!(got, n);
        assert_eq!(m.generated_tokens, n, "{m:?}");
        assert_eq!(m.prompt_tokens, prompt_len, "{m:?}");
    }
    // The model's last metrics are one whole call's.
    let last = model.metrics().unwrap();
    assert!((2..8).contains(&last.generated_tokens), "{last:?}");
}

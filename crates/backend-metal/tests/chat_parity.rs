//! `chat()` parity with transformers on the fixture models, by the parity
//! rule of the decoder family (see `parity.rs`): the prompt ids of
//! `apply_chat_template` equal; f32 last-position logits within
//! 1e-4 × max|logit|; 32 greedy ids identical, except that a divergence at a
//! reference near-tie (top-2 margin < 1e-3) ends the comparison there.

mod common;

use common::*;
use inference_core::{GenerateOptions, TextModel};

const F32_LOGIT_TOL: f32 = 1e-4;
const F32_NEAR_TIE: f32 = 1e-3;

fn check(name: &str) {
    let model = load(&fixture(name));
    let golden = chat_golden(name);
    let cases = golden["chats"].as_array().unwrap();
    assert!(cases.len() >= 3, "{name}: single turn, system, multi-turn");
    let mut compared = 0;
    for case in cases {
        let label = format!("{name}/{}", case["name"].as_str().unwrap());
        let messages = json_messages(&case["messages"]);
        let mut opts = GenerateOptions::new();
        opts.template_args = json_args(&case["args"]);
        let ids = json_ids(&case["ids"]);
        assert_eq!(
            model.encode_chat(&messages, &opts).unwrap(),
            ids,
            "{label}: prompt ids"
        );
        let (err, scale) = logit_error(
            &model.last_logits(&ids).unwrap(),
            &json_floats(&case["last_logits"]),
        );
        assert!(
            err <= F32_LOGIT_TOL * scale,
            "{label}: logits differ by {err} (max |logit| {scale})"
        );
        let reference = json_ids(&case["greedy"]);
        let opts = opts.max_tokens(reference.len()).ignore_eos(true);
        let mut stream = model.chat(&messages, &opts).unwrap();
        let ours: Vec<u32> = stream
            .collect_tokens()
            .unwrap()
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(
            stream.metrics().unwrap().prompt_tokens,
            ids.len(),
            "{label}"
        );
        compared += assert_greedy_parity(
            &label,
            &ours,
            &reference,
            &json_floats(&case["margins"]),
            F32_NEAR_TIE,
        );
    }
    eprintln!("{name}: {compared} greedy chat steps compared");
}

#[test]
fn qwen3_f32_chat() {
    check("qwen3-f32");
}

#[test]
fn qwen2_f32_chat() {
    check("qwen2-f32");
}

#[test]
fn llama_f32_chat() {
    check("llama-f32");
}

#[test]
fn gemma3_f32_chat() {
    check("gemma3-f32");
}

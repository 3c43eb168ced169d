//! Hugging Face checkpoints as GGUF, the way llama.cpp's
//! `convert_hf_to_gguf.py` writes them: the inverse of [`hf`](super::hf),
//! for the architectures it maps (Qwen3, Qwen2, Llama) with a byte-level
//! BPE vocabulary (Qwen2/Qwen3, Llama 3, SmolLM2 and others whose
//! pre-tokenizer llama.cpp knows). Gemma 3 (a SentencePiece vocabulary,
//! whose scores live in `tokenizer.model`) and SentencePiece Llamas are
//! refused with [`LoadError::Unsupported`], as is anything whose
//! tokenisation llama.cpp would not reproduce.
//!
//! - [`model_metadata`]: `general.*` and the architecture's hyper-parameters
//!   from `config.json`.
//! - [`tokenizer_metadata`]: `tokenizer.ggml.*` (tokens by id, with ids the
//!   embedding has but the vocabulary lacks as `[PAD{id}]`, token types,
//!   merges, the pre-tokenizer's name, special ids, whether a BOS is
//!   added) and the chat template, from `tokenizer.json` and
//!   `tokenizer_config.json`.
//! - [`gguf_name`]: a tensor's GGUF name; Llama's Q and K rows also need
//!   [`permute_rows`](super::hf::permute_rows).

use std::collections::BTreeMap;

use serde_json::Value;

use super::hf::LAYER_TENSORS;
use super::reader::MetaValue;
use crate::config::{token_ids, token_text};
use crate::error::LoadError;

/// Qwen2's pre-tokenizer regex (llama.cpp's `qwen2`).
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's pre-tokenizer regex (llama.cpp's `llama-bpe`).
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The largest vocabulary written (the largest real ones hold a few hundred
/// thousand ids); a larger `vocab_size` or id is refused rather than
/// allocated.
const MOST_TOKENS: u64 = 1 << 24;

/// GGUF token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

fn unsupported(what: impl Into<String>) -> LoadError {
    LoadError::Unsupported(what.into())
}

fn config_error(what: impl Into<String>) -> LoadError {
    LoadError::Config(what.into())
}

/// The GGUF `general.architecture` of a Hugging Face `model_type`.
pub fn architecture(model_type: &str) -> Result<&'static str, LoadError> {
    match model_type {
        "qwen3" => Ok("qwen3"),
        "qwen2" => Ok("qwen2"),
        "llama" => Ok("llama"),
        "gemma3" | "gemma3_text" => Err(unsupported(
            "GGUF export of Gemma 3 (its SentencePiece vocabulary's scores are in \
             tokenizer.model; convert it with llama.cpp's convert_hf_to_gguf.py)",
        )),
        other => Err(LoadError::UnsupportedArchitecture(other.to_owned())),
    }
}

fn uint(config: &Value, key: &str) -> Option<u32> {
    config
        .get(key)
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
}

fn need(config: &Value, key: &str) -> Result<u32, LoadError> {
    uint(config, key).ok_or_else(|| config_error(format!("config.json has no integer `{key}`")))
}

/// `general.*` and the hyper-parameters of `config` (a `config.json`), for
/// a file of `file_type` (`general.file_type`: 1 for F16, 7 for Q8_0)
/// named `name`.
pub fn model_metadata(
    config: &Value,
    file_type: u32,
    name: &str,
) -> Result<BTreeMap<String, MetaValue>, LoadError> {
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| config_error("config.json has no `model_type`"))?;
    let arch = architecture(model_type)?;
    let key = |k: &str| format!("{arch}.{k}");
    let mut m = BTreeMap::new();
    m.insert(
        "general.architecture".into(),
        MetaValue::String(arch.into()),
    );
    m.insert("general.name".into(), MetaValue::String(name.into()));
    m.insert("general.file_type".into(), MetaValue::U32(file_type));
    if file_type != 0 && file_type != 1 {
        m.insert("general.quantization_version".into(), MetaValue::U32(2));
    }
    let hidden = need(config, "hidden_size")?;
    let heads = need(config, "num_attention_heads")?;
    if heads == 0 {
        return Err(config_error("`num_attention_heads` is 0"));
    }
    let kv_heads = uint(config, "num_key_value_heads").unwrap_or(heads);
    let ints = [
        ("block_count", need(config, "num_hidden_layers")?),
        ("embedding_length", hidden),
        ("feed_forward_length", need(config, "intermediate_size")?),
        ("attention.head_count", heads),
        ("attention.head_count_kv", kv_heads),
    ];
    for (k, v) in ints {
        m.insert(key(k), MetaValue::U32(v));
    }
    if let Some(n) = uint(config, "max_position_embeddings") {
        m.insert(key("context_length"), MetaValue::U32(n));
    }
    let float = |k: &str| config.get(k).and_then(Value::as_f64).map(|v| v as f32);
    m.insert(
        key("rope.freq_base"),
        MetaValue::F32(float("rope_theta").unwrap_or(10_000.0)),
    );
    m.insert(
        key("attention.layer_norm_rms_epsilon"),
        MetaValue::F32(float("rms_norm_eps").unwrap_or(1e-6)),
    );
    let head_dim = uint(config, "head_dim");
    if let Some(d) = head_dim {
        m.insert(key("attention.key_length"), MetaValue::U32(d));
        m.insert(key("attention.value_length"), MetaValue::U32(d));
    }
    if arch == "llama" {
        m.insert(
            key("rope.dimension_count"),
            MetaValue::U32(head_dim.unwrap_or(hidden / heads)),
        );
        if let Some(v) = uint(config, "vocab_size") {
            m.insert(key("vocab_size"), MetaValue::U32(v));
        }
    }
    match config.get("rope_scaling").filter(|v| !v.is_null()) {
        None => {}
        Some(s) => {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("?");
            match (kind, s.get("factor").and_then(Value::as_f64)) {
                ("linear", Some(f)) => {
                    m.insert(key("rope.scaling.type"), MetaValue::String("linear".into()));
                    m.insert(key("rope.scaling.factor"), MetaValue::F32(f as f32));
                }
                ("default", _) => {}
                _ => {
                    return Err(unsupported(format!(
                        "GGUF export of RoPE scaling {kind:?} (llama.cpp keeps it in a \
                         `rope_freqs` tensor this export does not write)"
                    )))
                }
            }
        }
    }
    Ok(m)
}

/// llama.cpp's name for the pre-tokenizer of `tokenizer` (a
/// `tokenizer.json`): `qwen2` and `llama-bpe` (a regex split, then bytes),
/// `gpt-2` (GPT-2's byte-level regex alone), `smollm` (single digits, then
/// GPT-2's byte-level regex).
fn pre_tokenizer(tokenizer: &Value) -> Result<&'static str, LoadError> {
    let pre = tokenizer.get("pre_tokenizer").unwrap_or(&Value::Null);
    let kind = |v: &Value| v.get("type").and_then(Value::as_str).map(str::to_owned);
    let parts: Vec<&Value> = match kind(pre).as_deref() {
        Some("Sequence") => pre
            .get("pretokenizers")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        Some(_) => vec![pre],
        None => Vec::new(),
    };
    let byte_level = |v: &Value, regex: bool| {
        kind(v).as_deref() == Some("ByteLevel")
            && v.get("use_regex").and_then(Value::as_bool) == Some(regex)
            && v.get("add_prefix_space").and_then(Value::as_bool) != Some(true)
    };
    match parts.as_slice() {
        [split, bytes] if kind(split).as_deref() == Some("Split") && byte_level(bytes, false) => {
            let pattern = split
                .get("pattern")
                .and_then(|p| p.get("Regex"))
                .and_then(Value::as_str);
            let isolated = split.get("behavior").and_then(Value::as_str) == Some("Isolated");
            match pattern {
                Some(QWEN2_PATTERN) if isolated => Ok("qwen2"),
                Some(LLAMA3_PATTERN) if isolated => Ok("llama-bpe"),
                _ => Err(unsupported(format!(
                    "GGUF export of a tokenizer that splits on {pattern:?} (llama.cpp's pre-tokenizers \
                     this export knows: gpt-2, qwen2, llama-bpe, smollm)"
                ))),
            }
        }
        [bytes] if byte_level(bytes, true) => Ok("gpt-2"),
        [digits, bytes]
            if kind(digits).as_deref() == Some("Digits")
                && digits.get("individual_digits").and_then(Value::as_bool) == Some(true)
                && byte_level(bytes, true) =>
        {
            Ok("smollm")
        }
        _ => Err(unsupported(format!(
            "GGUF export of a tokenizer with pre-tokenizer {} (llama.cpp's pre-tokenizers this \
             export knows: gpt-2, qwen2, llama-bpe, smollm)",
            serde_json::to_string(pre).unwrap_or_default()
        ))),
    }
}

/// `tokenizer.ggml.*` and `tokenizer.chat_template` for `tokenizer` (a
/// `tokenizer.json`: byte-level BPE), `tokenizer_config` (its
/// `tokenizer_config.json`, if any), `config` (the model's `config.json`,
/// whose `vocab_size` may exceed the vocabulary: the extra ids become
/// `[PAD{id}]`) and the chat template found beside them, if any.
pub fn tokenizer_metadata(
    tokenizer: &Value,
    tokenizer_config: Option<&Value>,
    config: &Value,
    chat_template: Option<&str>,
) -> Result<BTreeMap<String, MetaValue>, LoadError> {
    let model = tokenizer
        .get("model")
        .ok_or_else(|| LoadError::Tokenizer("tokenizer.json has no `model`".into()))?;
    if model.get("type").and_then(Value::as_str) != Some("BPE")
        || model.get("byte_fallback").and_then(Value::as_bool) == Some(true)
    {
        return Err(unsupported(
            "GGUF export of a vocabulary other than byte-level BPE (SentencePiece vocabularies \
             need tokenizer.model: use llama.cpp's convert_hf_to_gguf.py)",
        ));
    }
    let pre = pre_tokenizer(tokenizer)?;
    let bad = |what: String| LoadError::Tokenizer(what);
    let mut by_id: BTreeMap<u64, (String, i32)> = BTreeMap::new();
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("tokenizer.json's BPE model has no vocabulary".into()))?;
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("token {token:?} has no integer id")))?;
        by_id.insert(id, (token.clone(), NORMAL));
    }
    for added in tokenizer
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            added.get("id").and_then(Value::as_u64),
            added.get("content").and_then(Value::as_str),
        ) else {
            return Err(bad("an added token without id or content".into()));
        };
        let special = added.get("special").and_then(Value::as_bool) == Some(true);
        let kind = if special { CONTROL } else { USER_DEFINED };
        by_id.insert(id, (content.to_owned(), kind));
    }
    let known = by_id.keys().next_back().map_or(0, |&last| last + 1);
    let rows = uint(config, "vocab_size").map(u64::from);
    if let Some(rows) = rows.filter(|&r| r < known) {
        return Err(bad(format!(
            "the tokenizer has ids up to {} but the model's vocabulary (`vocab_size`) has {rows}",
            known - 1
        )));
    }
    let size = rows.unwrap_or(known);
    if size > MOST_TOKENS {
        return Err(bad(format!(
            "a vocabulary of {size} tokens (more than {MOST_TOKENS})"
        )));
    }
    let mut tokens = Vec::with_capacity(size as usize);
    let mut types = Vec::with_capacity(size as usize);
    for id in 0..size {
        let (token, kind) = by_id
            .remove(&id)
            .unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED));
        tokens.push(MetaValue::String(token));
        types.push(MetaValue::I32(kind));
    }
    let merges: Vec<MetaValue> = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("tokenizer.json's BPE model has no merges".into()))?
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(MetaValue::String(s.clone())),
            Value::Array(pair) => match pair.as_slice() {
                [Value::String(a), Value::String(b)] => Ok(MetaValue::String(format!("{a} {b}"))),
                _ => Err(bad("a merge that is not two strings".into())),
            },
            _ => Err(bad("a merge that is neither a string nor a pair".into())),
        })
        .collect::<Result<_, _>>()?;

    // Special ids: the tokens tokenizer_config.json names, else config.json's ids.
    let id_of = |content: &str| -> Option<u32> {
        tokens
            .iter()
            .position(|t| matches!(t, MetaValue::String(s) if s == content))
            .and_then(|i| u32::try_from(i).ok())
    };
    let from_config = |key: &str| token_ids(config.get(key)).first().copied();
    let special = |name: &str, config_key: Option<&str>| -> Option<u32> {
        token_text(tokenizer_config.and_then(|c| c.get(name)))
            .and_then(id_of)
            .or_else(|| config_key.and_then(from_config))
            .filter(|&id| u64::from(id) < size)
    };
    let bos = special("bos_token", Some("bos_token_id"));
    let eos = special("eos_token", Some("eos_token_id"));
    let pad = special("pad_token", None);

    // Whether a BOS is added: the post-processor puts it first, or the
    // tokenizer configuration says so.
    let post = tokenizer.get("post_processor").unwrap_or(&Value::Null);
    let templates: Vec<&Value> = match post.get("type").and_then(Value::as_str) {
        Some("Sequence") => post
            .get("processors")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        _ => vec![post],
    };
    let bos_text = bos.and_then(|b| match &tokens[b as usize] {
        MetaValue::String(s) => Some(s.as_str()),
        _ => None,
    });
    let post_adds_bos = templates.iter().any(|t| {
        t.get("type").and_then(Value::as_str) == Some("TemplateProcessing")
            && t.get("single")
                .and_then(Value::as_array)
                .and_then(|s| s.first())
                .and_then(|first| first.get("SpecialToken"))
                .and_then(|st| st.get("id"))
                .and_then(Value::as_str)
                .is_some_and(|id| Some(id) == bos_text)
    });
    let add_bos = post_adds_bos
        || tokenizer_config
            .and_then(|c| c.get("add_bos_token"))
            .and_then(Value::as_bool)
            .unwrap_or(false);

    let mut m = BTreeMap::new();
    m.insert(
        "tokenizer.ggml.model".into(),
        MetaValue::String("gpt2".into()),
    );
    m.insert("tokenizer.ggml.pre".into(), MetaValue::String(pre.into()));
    m.insert("tokenizer.ggml.tokens".into(), MetaValue::Array(tokens));
    m.insert("tokenizer.ggml.token_type".into(), MetaValue::Array(types));
    m.insert("tokenizer.ggml.merges".into(), MetaValue::Array(merges));
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", bos),
        ("tokenizer.ggml.eos_token_id", eos),
        ("tokenizer.ggml.padding_token_id", pad),
    ] {
        if let Some(id) = id {
            m.insert(key.into(), MetaValue::U32(id));
        }
    }
    m.insert(
        "tokenizer.ggml.add_bos_token".into(),
        MetaValue::Bool(add_bos),
    );
    m.insert(
        "tokenizer.ggml.add_eos_token".into(),
        MetaValue::Bool(false),
    );
    if let Some(t) = chat_template {
        m.insert(
            "tokenizer.chat_template".into(),
            MetaValue::String(t.into()),
        );
    }
    Ok(m)
}

/// The GGUF name of a Hugging Face tensor of a Qwen3, Qwen2 or Llama model
/// (`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`).
pub fn gguf_name(name: &str) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    let mapped = match stem {
        "model.embed_tokens" => "token_embd".to_owned(),
        "model.norm" => "output_norm".to_owned(),
        "lm_head" => "output".to_owned(),
        _ => {
            let rest = stem.strip_prefix("model.layers.")?;
            let (layer, part) = rest.split_once('.')?;
            layer.parse::<u32>().ok()?;
            let part = LAYER_TENSORS.iter().find(|(_, h)| *h == part)?.0;
            format!("blk.{layer}.{part}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::gguf::hf::hf_name;

    /// Every name maps back to itself through [`hf_name`].
    #[test]
    fn names_round_trip() {
        for name in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.11.self_attn.q_proj.weight",
            "model.layers.11.self_attn.q_proj.bias",
            "model.layers.2.self_attn.k_norm.weight",
            "model.layers.2.post_attention_layernorm.weight",
            "model.layers.7.mlp.down_proj.weight",
        ] {
            let g = gguf_name(name).unwrap();
            assert_eq!(hf_name(&g, false).as_deref(), Some(name), "{g}");
        }
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_name("model.rotary_emb.inv_freq"), None);
    }

    /// Hyper-parameters land under the architecture's keys; RoPE scaling
    /// llama.cpp would need a tensor for and Gemma are refused.
    #[test]
    fn model_metadata_from_a_config() {
        let config = json!({"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 2, "intermediate_size": 96,
            "max_position_embeddings": 4096, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "vocab_size": 100});
        let m = model_metadata(&config, 1, "t").unwrap();
        assert!(matches!(&m["general.architecture"], MetaValue::String(a) if a == "qwen3"));
        assert!(matches!(
            m["qwen3.attention.head_count_kv"],
            MetaValue::U32(2)
        ));
        assert!(matches!(
            m["qwen3.attention.key_length"],
            MetaValue::U32(32)
        ));
        assert!(matches!(m["qwen3.rope.freq_base"], MetaValue::F32(f) if f == 1e6));
        assert!(!m.contains_key("general.quantization_version"));
        let mut llama3 = config.clone();
        llama3["model_type"] = json!("llama");
        llama3["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        assert!(matches!(
            model_metadata(&llama3, 7, "t"),
            Err(LoadError::Unsupported(_))
        ));
        let mut gemma = config;
        gemma["model_type"] = json!("gemma3_text");
        assert!(matches!(
            model_metadata(&gemma, 1, "t"),
            Err(LoadError::Unsupported(_))
        ));
    }

    /// A tokenizer without a pre-tokenizer llama.cpp knows is refused
    /// rather than written with one that would split text otherwise, as is
    /// one with more ids than the embedding; ids past the vocabulary are
    /// padding tokens.
    #[test]
    fn unknown_pre_tokenizers_are_refused() {
        let tok = json!({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                         "pre_tokenizer": null});
        let err = tokenizer_metadata(&tok, None, &json!({}), None).unwrap_err();
        assert!(err.to_string().contains("pre-tokenizer"), "{err}");
        // More ids than the embedding has rows.
        let qwen = json!({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]}});
        let err = tokenizer_metadata(&qwen, None, &json!({"vocab_size": 2}), None).unwrap_err();
        assert!(err.to_string().contains("vocab_size"), "{err}");
        // A hostile size is refused, not allocated.
        let err = tokenizer_metadata(&qwen, None, &json!({"vocab_size": 4_000_000_000u64}), None)
            .unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        let m = tokenizer_metadata(&qwen, None, &json!({"vocab_size": 5}), None).unwrap();
        assert!(matches!(&m["tokenizer.ggml.pre"], MetaValue::String(p) if p == "qwen2"));
        match &m["tokenizer.ggml.tokens"] {
            MetaValue::Array(t) => {
                assert_eq!(t.len(), 5);
                assert!(matches!(&t[4], MetaValue::String(p) if p == "[PAD4]"));
            }
            other => panic!("{other:?}"),
        }
        let spm = json!({"model": {"type": "BPE", "byte_fallback": true, "vocab": {"a": 0}, "merges": []}});
        assert!(matches!(
            tokenizer_metadata(&spm, None, &json!({}), None),
            Err(LoadError::Unsupported(_))
        ));
    }
}

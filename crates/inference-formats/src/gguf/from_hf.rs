//! Hugging Face checkpoints as GGUF, the way llama.cpp's
//! `convert_hf_to_gguf.py` writes them: the inverse of [`hf`](super::hf),
//! for the architectures it maps (Qwen3, Qwen2, Llama, Gemma 3) with a
//! byte-level BPE vocabulary whose pre-tokenizer llama.cpp knows (Qwen2/Qwen3,
//! Llama 3, SmolLM2 and others) or a SentencePiece vocabulary as transformers
//! converts it (a BPE with byte fallback: Gemma 3's; its scores come from the
//! merges' order, since `tokenizer.model` may be absent). Anything whose
//! tokenisation or attention llama.cpp would not reproduce (an unknown
//! pre-tokenizer, Llama 3 RoPE scaling, a Gemma 3 with another layer pattern,
//! local RoPE base or attention scale) is refused with
//! [`LoadError::Unsupported`].
//!
//! - [`model_metadata`]: `general.*` and the architecture's hyper-parameters
//!   from `config.json`.
//! - [`tokenizer_metadata`]: `tokenizer.ggml.*` (tokens by id, with ids the
//!   embedding has but the vocabulary lacks as `[PAD{id}]`, token types,
//!   merges or SentencePiece scores, the pre-tokenizer's name, special ids,
//!   whether a BOS is added) and the chat template, from `tokenizer.json`
//!   and `tokenizer_config.json`.
//! - [`gguf_name`]: a tensor's GGUF name; Llama's Q and K rows also need
//!   [`permute_rows`](super::hf::permute_rows), Gemma's norms `1 +`.

use std::collections::BTreeMap;

use serde_json::Value;

use super::hf::LAYER_TENSORS;
use super::reader::MetaValue;
use crate::config::{token_ids, token_text, HfConfig, LayerKind, RopeScaling};
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
const BYTE: i32 = 6;

/// SentencePiece's mark for a space (`▁`).
const SPACE_MARK: char = '\u{2581}';

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
        "gemma3" | "gemma3_text" => Ok("gemma3"),
        other => Err(LoadError::UnsupportedArchitecture(other.to_owned())),
    }
}

fn need(config: &HfConfig, key: &str) -> Result<u32, LoadError> {
    config
        .get::<u32>(key)?
        .ok_or_else(|| config_error(format!("config.json has no integer `{key}`")))
}

/// `general.*` and the hyper-parameters of `config` (a `config.json`; a
/// multimodal one's `text_config`), for a file of `file_type`
/// (`general.file_type`: 1 for F16, 7 for Q8_0) named `name`.
pub fn model_metadata(
    config: &Value,
    file_type: u32,
    name: &str,
) -> Result<BTreeMap<String, MetaValue>, LoadError> {
    let config = HfConfig::from_value(config)?;
    let arch = architecture(config.model_type())?;
    let gemma = arch == "gemma3";
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
    let hidden = need(&config, "hidden_size")?;
    let heads = need(&config, "num_attention_heads")?;
    if heads == 0 {
        return Err(config_error("`num_attention_heads` is 0"));
    }
    let layers = need(&config, "num_hidden_layers")?;
    let kv_heads = config.get::<u32>("num_key_value_heads")?.unwrap_or(heads);
    let ints = [
        ("block_count", layers),
        ("embedding_length", hidden),
        ("feed_forward_length", need(&config, "intermediate_size")?),
        ("attention.head_count", heads),
        ("attention.head_count_kv", kv_heads),
    ];
    for (k, v) in ints {
        m.insert(key(k), MetaValue::U32(v));
    }
    if let Some(n) = config.get::<u32>("max_position_embeddings")? {
        m.insert(key("context_length"), MetaValue::U32(n));
    }
    let rope = config.rope(
        "full_attention",
        "rope_theta",
        if gemma { 1_000_000.0 } else { 10_000.0 },
    )?;
    m.insert(key("rope.freq_base"), MetaValue::F32(rope.theta));
    m.insert(
        key("attention.layer_norm_rms_epsilon"),
        MetaValue::F32(config.get::<f32>("rms_norm_eps")?.unwrap_or(1e-6)),
    );
    let head_dim = match config.get::<u32>("head_dim")? {
        Some(d) => Some(d),
        // Gemma 3's default (transformers' `Gemma3TextConfig`).
        None if gemma => Some(256),
        None => None,
    };
    if let Some(d) = head_dim {
        m.insert(key("attention.key_length"), MetaValue::U32(d));
        m.insert(key("attention.value_length"), MetaValue::U32(d));
    }
    if arch == "llama" {
        m.insert(
            key("rope.dimension_count"),
            MetaValue::U32(head_dim.unwrap_or(hidden / heads)),
        );
        if let Some(v) = config.get::<u32>("vocab_size")? {
            m.insert(key("vocab_size"), MetaValue::U32(v));
        }
    }
    match rope.scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            m.insert(key("rope.scaling.type"), MetaValue::String("linear".into()));
            m.insert(key("rope.scaling.factor"), MetaValue::F32(factor));
        }
        RopeScaling::Llama3 { .. } => {
            return Err(unsupported(
                "GGUF export of Llama 3 RoPE scaling (llama.cpp keeps it in a `rope_freqs` \
                 tensor this export does not write)",
            ))
        }
    }
    if gemma {
        let window = need(&config, "sliding_window")?;
        m.insert(key("attention.sliding_window"), MetaValue::U32(window));
        gemma3_matches_llama_cpp(&config, layers, hidden / heads, head_dim.unwrap_or(256))?;
    }
    Ok(m)
}

/// Refuses a Gemma 3 configuration that llama.cpp would run differently:
/// it stores no layer pattern, local RoPE base, attention scale or soft
/// capping, but fixes five sliding-window layers to one global, a local
/// base of 10 000, `head_dim^-½` as the scale (`(hidden / heads)^-½` for the
/// 62-layer 27B shape) and no soft capping (what [`super::hf`] assumes on
/// reading, too).
fn gemma3_matches_llama_cpp(
    config: &HfConfig,
    layers: u32,
    hidden_per_head: u32,
    head_dim: u32,
) -> Result<(), LoadError> {
    let refuse = |what: String| {
        Err(unsupported(format!(
            "GGUF export of a Gemma 3 with {what}: llama.cpp would run it differently"
        )))
    };
    let kinds = config.layer_types(layers as usize, Some(6))?;
    let standard = kinds
        .iter()
        .enumerate()
        .all(|(i, k)| (*k == LayerKind::Sliding) == ((i + 1) % 6 != 0));
    if !standard {
        return refuse("a layer pattern other than five local layers to one global".into());
    }
    let local = config.rope("sliding_attention", "rope_local_base_freq", 10_000.0)?;
    if local.theta != 10_000.0 || local.scaling != RopeScaling::None {
        return refuse(format!(
            "local RoPE {local:?} (llama.cpp fixes a base of 10 000)"
        ));
    }
    let expected = if layers == 62 {
        hidden_per_head
    } else {
        head_dim
    };
    let scalar = config.get::<f64>("query_pre_attn_scalar")?.unwrap_or(256.0);
    if scalar != f64::from(expected) {
        return refuse(format!(
            "`query_pre_attn_scalar` {scalar} (llama.cpp scales attention by {expected}^-½)"
        ));
    }
    for cap in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if let Some(v) = config.get::<f64>(cap)? {
            return refuse(format!("`{cap}` {v}"));
        }
    }
    let activation = config.activation("gelu_pytorch_tanh")?;
    if !["gelu_pytorch_tanh", "gelu_tanh"].contains(&activation.as_str()) {
        return refuse(format!("activation {activation:?}"));
    }
    if config.get::<bool>("attention_bias")? == Some(true) {
        return refuse("attention biases".into());
    }
    Ok(())
}

/// The steps of a `tokenizer.json` component (a normaliser, pre-tokenizer
/// or post-processor): a `Sequence`'s parts under `key`, the component
/// alone, or none where it is `null`.
fn sequence_parts<'a>(component: &'a Value, key: &str) -> Vec<&'a Value> {
    match component.get("type").and_then(Value::as_str) {
        Some("Sequence") => component
            .get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        Some(_) => vec![component],
        None => Vec::new(),
    }
}

/// llama.cpp's name for the pre-tokenizer of `tokenizer` (a
/// `tokenizer.json`): `qwen2` and `llama-bpe` (a regex split, then bytes),
/// `gpt-2` (GPT-2's byte-level regex alone), `smollm` (single digits, then
/// GPT-2's byte-level regex).
fn pre_tokenizer(tokenizer: &Value) -> Result<&'static str, LoadError> {
    let pre = tokenizer.get("pre_tokenizer").unwrap_or(&Value::Null);
    let kind = |v: &Value| v.get("type").and_then(Value::as_str).map(str::to_owned);
    let parts = sequence_parts(pre, "pretokenizers");
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

/// Whether a SentencePiece vocabulary's `token` is a byte (`<0x0A>`).
fn is_byte_token(token: &str) -> bool {
    token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && token[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// Refuses a SentencePiece vocabulary converted by transformers (a BPE with
/// byte fallback) unless it normalises text as llama.cpp's `llama`
/// tokenizer does without a space prefix: spaces become `▁`, nothing else
/// changes, and no pre-tokenizer splits (Gemma 3's splits on spaces, of
/// which none are left by then).
fn check_sentencepiece_normaliser(tokenizer: &Value) -> Result<(), LoadError> {
    let kind = |v: &Value| v.get("type").and_then(Value::as_str).map(str::to_owned);
    let text = |v: &Value, key: &str| {
        v.get(key)
            .and_then(|p| p.get("String").or(Some(p)))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let mark = SPACE_MARK.to_string();
    let replaces_spaces = |v: &Value| {
        kind(v).as_deref() == Some("Replace")
            && text(v, "pattern").as_deref() == Some(" ")
            && text(v, "content").as_deref() == Some(mark.as_str())
    };
    let normalizer = tokenizer.get("normalizer").unwrap_or(&Value::Null);
    let parts = sequence_parts(normalizer, "normalizers");
    // A normaliser that also puts `▁` first (Llama 2's) would be llama.cpp's
    // `add_space_prefix`, which splits text starting with spaces otherwise
    // (checked on Gemma's vocabulary): refused with the rest.
    if !matches!(parts.as_slice(), [r] if replaces_spaces(r)) {
        return Err(unsupported(format!(
            "GGUF export of a SentencePiece vocabulary normalised by {} (the export \
             writes only one that turns spaces into U+2581 and does nothing else)",
            serde_json::to_string(normalizer).unwrap_or_default()
        )));
    }
    let pre = tokenizer.get("pre_tokenizer").unwrap_or(&Value::Null);
    let splits_on_spaces = kind(pre).as_deref() == Some("Split")
        && text(pre, "pattern").as_deref() == Some(" ")
        && pre.get("invert").and_then(Value::as_bool) != Some(true);
    if !(pre.is_null() || splits_on_spaces) {
        return Err(unsupported(format!(
            "GGUF export of a SentencePiece vocabulary with pre-tokenizer {}",
            serde_json::to_string(pre).unwrap_or_default()
        )));
    }
    let model = tokenizer.get("model").unwrap_or(&Value::Null);
    if model.get("ignore_merges").and_then(Value::as_bool) == Some(true) {
        return Err(unsupported(
            "GGUF export of a SentencePiece vocabulary with `ignore_merges`",
        ));
    }
    Ok(())
}

/// Scores for a SentencePiece vocabulary from its BPE `merges` (in
/// priority order): llama.cpp's `llama` tokenizer merges the adjacent pair
/// whose joined token scores highest, so a token scores minus the rank of
/// the first merge that makes it, which merges in transformers' order (the
/// conversion lists a pair for every way a token splits, ranked by the
/// token). Tokens no merge makes score 0; a normal token of more than one
/// character that no merge makes is refused, since llama.cpp would make it
/// where the Hugging Face tokenizer cannot.
fn sentencepiece_scores(
    tokens: &[MetaValue],
    types: &[MetaValue],
    merges: &[(String, String)],
) -> Result<Vec<f32>, LoadError> {
    let mut rank: std::collections::HashMap<String, usize> =
        std::collections::HashMap::with_capacity(merges.len());
    for (k, (a, b)) in merges.iter().enumerate() {
        rank.entry(format!("{a}{b}")).or_insert(k);
    }
    tokens
        .iter()
        .zip(types)
        .map(|(token, kind)| {
            let (MetaValue::String(token), MetaValue::I32(kind)) = (token, kind) else {
                return Ok(0.0);
            };
            match rank.get(token.as_str()) {
                Some(&k) => Ok(-(k as f32)),
                None if *kind == NORMAL && token.chars().count() > 1 => Err(unsupported(format!(
                    "GGUF export of a SentencePiece vocabulary whose token {token:?} no merge \
                     makes (llama.cpp would make it; the Hugging Face tokenizer cannot)"
                ))),
                None => Ok(0.0),
            }
        })
        .collect()
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
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return Err(unsupported(
            "GGUF export of a vocabulary other than BPE (byte-level, or SentencePiece's as \
             transformers converts it)",
        ));
    }
    // A BPE with byte fallback is a SentencePiece vocabulary (Gemma's),
    // written as llama.cpp's `llama` tokenizer.
    let spm = model.get("byte_fallback").and_then(Value::as_bool) == Some(true);
    let pre = if spm {
        check_sentencepiece_normaliser(tokenizer)?;
        "default"
    } else {
        pre_tokenizer(tokenizer)?
    };
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
        let kind = if spm && is_byte_token(token) {
            BYTE
        } else {
            NORMAL
        };
        by_id.insert(id, (token.clone(), kind));
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
        // llama.cpp matches user-defined tokens in the raw text, before
        // spaces become `SPACE_MARK` (as its converter writes them).
        let content = if spm && !special {
            content.replace(SPACE_MARK, " ")
        } else {
            content.to_owned()
        };
        by_id.insert(id, (content, kind));
    }
    let known = by_id.keys().next_back().map_or(0, |&last| last + 1);
    let rows = config
        .get("text_config")
        .filter(|t| t.is_object())
        .unwrap_or(config)
        .get("vocab_size")
        .and_then(Value::as_u64);
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
    let pairs: Vec<(String, String)> = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("tokenizer.json's BPE model has no merges".into()))?
        .iter()
        .map(|m| match m {
            Value::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| bad(format!("a merge without a space: {s:?}"))),
            Value::Array(pair) => match pair.as_slice() {
                [Value::String(a), Value::String(b)] => Ok((a.clone(), b.clone())),
                _ => Err(bad("a merge that is not two strings".into())),
            },
            _ => Err(bad("a merge that is neither a string nor a pair".into())),
        })
        .collect::<Result<_, _>>()?;
    let merges_or_scores = if spm {
        let scores = sentencepiece_scores(&tokens, &types, &pairs)?;
        (
            "tokenizer.ggml.scores",
            scores.into_iter().map(MetaValue::F32).collect(),
        )
    } else {
        (
            "tokenizer.ggml.merges",
            pairs
                .iter()
                .map(|(a, b)| MetaValue::String(format!("{a} {b}")))
                .collect(),
        )
    };

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
    let unk = model
        .get("unk_token")
        .and_then(Value::as_str)
        .and_then(id_of);

    // Whether a BOS is added: the post-processor puts it first, or the
    // tokenizer configuration says so.
    let post = tokenizer.get("post_processor").unwrap_or(&Value::Null);
    let templates = sequence_parts(post, "processors");
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
        MetaValue::String(if spm { "llama" } else { "gpt2" }.into()),
    );
    m.insert("tokenizer.ggml.pre".into(), MetaValue::String(pre.into()));
    m.insert("tokenizer.ggml.tokens".into(), MetaValue::Array(tokens));
    m.insert("tokenizer.ggml.token_type".into(), MetaValue::Array(types));
    let (key, values) = merges_or_scores;
    m.insert(key.into(), MetaValue::Array(values));
    if spm {
        m.insert(
            "tokenizer.ggml.add_space_prefix".into(),
            MetaValue::Bool(false),
        );
    }
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", bos),
        ("tokenizer.ggml.eos_token_id", eos),
        ("tokenizer.ggml.padding_token_id", pad),
        ("tokenizer.ggml.unknown_token_id", unk.filter(|_| spm)),
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

/// The GGUF name of a Hugging Face tensor of a Qwen3, Qwen2, Llama or (with
/// `gemma`) Gemma 3 model (`model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`).
pub fn gguf_name(name: &str, gemma: bool) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    let mapped = match stem {
        "model.embed_tokens" => "token_embd".to_owned(),
        "model.norm" => "output_norm".to_owned(),
        "lm_head" => "output".to_owned(),
        _ => {
            let rest = stem.strip_prefix("model.layers.")?;
            let (layer, part) = rest.split_once('.')?;
            layer.parse::<u32>().ok()?;
            let part = match part {
                "pre_feedforward_layernorm" if gemma => "ffn_norm",
                "post_attention_layernorm" if gemma => "post_attention_norm",
                _ => LAYER_TENSORS.iter().find(|(_, h)| *h == part)?.0,
            };
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
            let g = gguf_name(name, false).unwrap();
            assert_eq!(hf_name(&g, false).as_deref(), Some(name), "{g}");
        }
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight", false), None);
        assert_eq!(gguf_name("model.rotary_emb.inv_freq", false), None);
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
        llama3["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        assert!(matches!(
            model_metadata(&llama3, 7, "t"),
            Err(LoadError::Unsupported(_))
        ));
        // transformers 5.x keeps the base in `rope_parameters`.
        let mut v5 = config.clone();
        v5.as_object_mut().unwrap().remove("rope_theta");
        v5["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 5e5});
        let m = model_metadata(&v5, 1, "t").unwrap();
        assert!(matches!(m["qwen3.rope.freq_base"], MetaValue::F32(f) if f == 5e5));

        // Gemma 3: its window, and only what llama.cpp fixes for it.
        let mut gemma = config;
        gemma["model_type"] = json!("gemma3_text");
        gemma["num_hidden_layers"] = json!(7);
        assert!(matches!(
            model_metadata(&gemma, 1, "t"),
            Err(LoadError::Config(_))
        ));
        gemma["sliding_window"] = json!(16);
        gemma["query_pre_attn_scalar"] = json!(32);
        let m = model_metadata(&gemma, 1, "t").unwrap();
        assert!(matches!(&m["general.architecture"], MetaValue::String(a) if a == "gemma3"));
        assert!(matches!(
            m["gemma3.attention.sliding_window"],
            MetaValue::U32(16)
        ));
        // A multimodal configuration's text part.
        let wrapped = json!({"model_type": "gemma3", "text_config": gemma.clone()});
        assert_eq!(model_metadata(&wrapped, 1, "t").unwrap().len(), m.len());
        for (key, value) in [
            ("sliding_window_pattern", json!(4)),
            ("query_pre_attn_scalar", json!(256)),
            ("rope_local_base_freq", json!(20_000.0)),
            ("final_logit_softcapping", json!(30.0)),
            ("hidden_activation", json!("silu")),
        ] {
            let mut other = gemma.clone();
            other[key] = value;
            assert!(
                matches!(
                    model_metadata(&other, 1, "t"),
                    Err(LoadError::Unsupported(_))
                ),
                "{key}"
            );
        }
    }

    /// A SentencePiece vocabulary (a BPE with byte fallback) becomes
    /// llama.cpp's `llama` tokenizer: scores from the merges' order, byte
    /// tokens, user-defined tokens with real spaces; a token no merge makes,
    /// a space prefix or another normaliser is refused.
    #[test]
    fn sentencepiece_vocabularies() {
        let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
        let mut tok = json!({
            "model": {"type": "BPE", "byte_fallback": true, "unk_token": "<unk>",
                "vocab": {"<unk>": 0, "<bos>": 1, "<0x41>": 2, "a": 3, "b": 4, "\u{2581}": 5,
                          "ab": 6, "\u{2581}a": 7, "\u{2581}\u{2581}": 8},
                "merges": [["a", "b"], ["\u{2581}", "a"]]},
            "added_tokens": [
                {"id": 0, "content": "<unk>", "special": true},
                {"id": 1, "content": "<bos>", "special": true},
                {"id": 8, "content": "\u{2581}\u{2581}", "special": false}],
            "normalizer": replace.clone(),
            "pre_tokenizer": {"type": "Split", "pattern": {"String": " "},
                              "behavior": "MergedWithPrevious", "invert": false}});
        let config = json!({"bos_token_id": 1});
        let m = tokenizer_metadata(&tok, None, &config, None).unwrap();
        assert!(matches!(&m["tokenizer.ggml.model"], MetaValue::String(p) if p == "llama"));
        assert!(!m.contains_key("tokenizer.ggml.merges"));
        assert!(matches!(
            m["tokenizer.ggml.add_space_prefix"],
            MetaValue::Bool(false)
        ));
        assert!(matches!(
            m["tokenizer.ggml.unknown_token_id"],
            MetaValue::U32(0)
        ));
        let floats = |k: &str| match &m[k] {
            MetaValue::Array(a) => a
                .iter()
                .map(|v| match v {
                    MetaValue::F32(f) => *f,
                    _ => f32::NAN,
                })
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            floats("tokenizer.ggml.scores"),
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0]
        );
        let (MetaValue::Array(types), MetaValue::Array(tokens)) =
            (&m["tokenizer.ggml.token_type"], &m["tokenizer.ggml.tokens"])
        else {
            panic!("types and tokens");
        };
        let types: Vec<i32> = types
            .iter()
            .map(|t| match t {
                MetaValue::I32(i) => *i,
                _ => -1,
            })
            .collect();
        assert_eq!(
            types,
            [
                CONTROL,
                CONTROL,
                BYTE,
                NORMAL,
                NORMAL,
                NORMAL,
                NORMAL,
                NORMAL,
                USER_DEFINED
            ]
        );
        assert!(matches!(&tokens[8], MetaValue::String(s) if s == "  "));

        // A space prefix (Llama 2's normaliser) is refused.
        let mut prefixed = tok.clone();
        prefixed["normalizer"] = json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"}, replace]});
        prefixed["pre_tokenizer"] = Value::Null;
        assert!(matches!(
            tokenizer_metadata(&prefixed, None, &config, None),
            Err(LoadError::Unsupported(_))
        ));

        // Refused: another normaliser, a token no merge makes.
        let mut lower = tok.clone();
        lower["normalizer"] = json!({"type": "Lowercase"});
        assert!(matches!(
            tokenizer_metadata(&lower, None, &config, None),
            Err(LoadError::Unsupported(_))
        ));
        tok["model"]["merges"] = json!([["\u{2581}", "a"]]);
        let err = tokenizer_metadata(&tok, None, &config, None).unwrap_err();
        assert!(err.to_string().contains("\"ab\""), "{err}");
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
        let spm = json!({"model": {"type": "BPE", "byte_fallback": true, "vocab": {"a": 0}, "merges": []},
                         "normalizer": {"type": "NFKC"}});
        assert!(matches!(
            tokenizer_metadata(&spm, None, &json!({}), None),
            Err(LoadError::Unsupported(_))
        ));
    }
}

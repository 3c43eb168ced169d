//! Tokenizers from GGUF metadata, built as `tokenizers::Tokenizer`s.
//!
//! - `gpt2` (byte-level BPE): `tokenizer.ggml.tokens` + `merges`, with the
//!   pre-tokenizer that `tokenizer.ggml.pre` names.
//! - `llama` (SentencePiece BPE): `tokens` + `scores` + `token_type`; merges are
//!   derived from the scores the way Hugging Face converts SentencePiece
//!   models (every split of a piece into two pieces of the vocabulary, ranked
//!   by the merged piece's score), with byte fallback.
//!
//! Control tokens (type 3) become special added tokens and user-defined ones
//! (type 4) plain added tokens; BOS and `add_bos_token` decide the
//! post-processor. The tokenizer is assembled as `tokenizer.json` and parsed
//! by the `tokenizers` crate itself.

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use inference_formats::gguf::GgufFile;
use inference_formats::LoadError;

/// GGUF token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

// Pre-tokenizer regexes of the byte-level BPE families, by `tokenizer.ggml.pre`.
use inference_formats::gguf::from_hf::{LLAMA3_PATTERN, QWEN2_PATTERN};

/// A tokenizer read from GGUF metadata, with the ids generation needs.
pub struct GgufTokenizer {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// BOS id.
    pub bos: Option<u32>,
    /// EOS ids (EOS, EOT and, for Gemma, `<end_of_turn>`).
    pub eos: Vec<u32>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// Unknown-token id.
    pub unk: Option<u32>,
    /// Padding id.
    pub pad: Option<u32>,
}

fn bad(msg: impl Into<String>) -> LoadError {
    LoadError::Tokenizer(msg.into())
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": use_regex})
}

fn regex_split(pattern: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        byte_level(false),
    ]})
}

/// The pre-tokenizer of a byte-level BPE vocabulary, from `tokenizer.ggml.pre`.
fn gpt2_pre_tokenizer(pre: Option<&str>) -> Result<Value, LoadError> {
    Ok(match pre.unwrap_or("default") {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        "qwen2" => regex_split(QWEN2_PATTERN),
        "llama-bpe" | "llama3" | "llama-v3" => regex_split(LLAMA3_PATTERN),
        other => {
            return Err(LoadError::Unsupported(format!(
                "GGUF pre-tokenizer {other:?} (known: default, gpt2, smollm, starcoder, qwen2, llama-bpe)"
            )))
        }
    })
}

/// Added-token entries for control and user-defined tokens.
fn added_tokens(tokens: &[&str], types: &[i32]) -> Vec<Value> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &t))| t == CONTROL || t == USER_DEFINED)
        .map(|(id, (content, &t))| {
            json!({
                "id": id,
                "content": content,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": t == USER_DEFINED,
                "special": t == CONTROL,
            })
        })
        .collect()
}

/// Merges of a SentencePiece BPE vocabulary: every split of a piece into two
/// pieces of the vocabulary, ranked by the merged piece's score (highest
/// first), ties in vocabulary order of (left, right).
fn merges_from_scores(tokens: &[&str], types: &[i32], scores: &[f32]) -> Vec<(String, String)> {
    let index: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(&NORMAL) | Some(&USER_DEFINED) | None))
        .map(|(i, t)| (*t, i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if !index.contains_key(piece) {
            continue;
        }
        let score = scores.get(id).copied().unwrap_or(0.0);
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = piece.split_at(at);
                Some((*index.get(l)?, *index.get(r)?))
            })
            .collect();
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(l, r)| (score, id, l, r)));
    }
    // Stable: equal scores keep their (merged id, left, right) order.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l].to_owned(), tokens[r].to_owned()))
        .collect()
}

impl GgufTokenizer {
    /// Builds the tokenizer the metadata of `file` describes.
    pub fn from_gguf(file: &GgufFile, architecture: &str) -> Result<Self, LoadError> {
        let model = file
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| bad("GGUF has no `tokenizer.ggml.model`"))?
            .to_owned();
        let tokens = file
            .get_str_array("tokenizer.ggml.tokens")
            .ok_or_else(|| bad("GGUF has no `tokenizer.ggml.tokens`"))?;
        let types: Vec<i32> = file
            .get_i32_array("tokenizer.ggml.token_type")
            .unwrap_or_else(|| vec![NORMAL; tokens.len()]);
        if types.len() != tokens.len() {
            return Err(bad("token_type and tokens differ in length"));
        }
        let id = |key: &str| {
            file.get_u64(key)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < tokens.len())
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let unk = id("tokenizer.ggml.unknown_token_id");
        let add_bos_default = model == "llama";
        let add_bos = file
            .get_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(add_bos_default);

        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| ((*t).to_owned(), json!(i)))
            .collect();
        let (model_json, normalizer, pre_tokenizer, decoder) = match model.as_str() {
            "gpt2" => {
                let merges = file
                    .get_str_array("tokenizer.ggml.merges")
                    .ok_or_else(|| bad("a gpt2 GGUF tokenizer needs `tokenizer.ggml.merges`"))?;
                let pre = gpt2_pre_tokenizer(file.get_str("tokenizer.ggml.pre"))?;
                (
                    json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                           "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                           "ignore_merges": false, "vocab": vocab, "merges": merges}),
                    Value::Null,
                    pre,
                    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true}),
                )
            }
            "llama" => {
                let scores = file.get_f32_array("tokenizer.ggml.scores").ok_or_else(|| {
                    bad("a llama (SentencePiece) GGUF tokenizer needs `tokenizer.ggml.scores`")
                })?;
                if scores.len() != tokens.len() {
                    return Err(bad("scores and tokens differ in length"));
                }
                let merges: Vec<Value> = merges_from_scores(&tokens, &types, &scores)
                    .into_iter()
                    .map(|(l, r)| json!([l, r]))
                    .collect();
                let prefix = file
                    .get_bool("tokenizer.ggml.add_space_prefix")
                    .unwrap_or(true);
                let mut norm = vec![];
                if prefix {
                    norm.push(json!({"type": "Prepend", "prepend": "▁"}));
                }
                norm.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
                let mut dec = vec![
                    json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if prefix {
                    dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                (
                    json!({"type": "BPE", "dropout": null, "unk_token": unk.map(|u| tokens[u as usize]),
                           "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                           "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges}),
                    json!({"type": "Sequence", "normalizers": norm}),
                    Value::Null,
                    json!({"type": "Sequence", "decoders": dec}),
                )
            }
            other => {
                return Err(LoadError::Unsupported(format!(
                    "GGUF tokenizer model {other:?}"
                )))
            }
        };
        let post = match (add_bos, bos) {
            (true, Some(b)) => {
                let t = tokens[b as usize];
                json!({"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                {"SpecialToken": {"id": t, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                       "special_tokens": {t: {"id": t, "ids": [b], "tokens": [t]}}})
            }
            _ => Value::Null,
        };
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens(&tokens, &types),
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post,
            "decoder": decoder,
            "model": model_json,
        });
        let tokenizer =
            Tokenizer::from_bytes(serde_json::to_vec(&doc).map_err(|e| bad(e.to_string()))?)
                .map_err(|e| {
                    bad(format!(
                        "cannot build the tokenizer from GGUF metadata: {e}"
                    ))
                })?;

        let mut eos: Vec<u32> = [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ]
        .iter()
        .filter_map(|k| id(k))
        .collect();
        if architecture.starts_with("gemma") {
            eos.extend(tokenizer.token_to_id("<end_of_turn>"));
        }
        eos.sort_unstable();
        eos.dedup();
        Ok(Self {
            tokenizer,
            bos,
            eos,
            chat_template: file.get_str("tokenizer.chat_template").map(str::to_owned),
            unk,
            pad: id("tokenizer.ggml.padding_token_id"),
        })
    }
}

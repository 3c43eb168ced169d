//! The model's tokenizer (`tokenizers` crate) and its special ids.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::LoadError;
use crate::load::config::token_ids;

/// A tokenizer with the ids generation needs.
pub struct ModelTokenizer {
    /// The `tokenizers` tokenizer from `tokenizer.json`.
    pub inner: Tokenizer,
    /// Beginning-of-sequence id, when the model has one.
    pub bos: Option<u32>,
    /// Every end-of-sequence id (tokenizer config, generation config, model config).
    pub eos: Vec<u32>,
    /// The chat template, when the model ships one.
    pub chat_template: Option<String>,
}

fn read_json(path: &Path) -> Result<Option<Value>, LoadError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| LoadError::Io(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| LoadError::Tokenizer(format!("{}: invalid JSON: {e}", path.display())))
}

/// A special token's text from `tokenizer_config.json`: a string or `{content}`.
fn token_text(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

impl ModelTokenizer {
    /// Reads `tokenizer.json`, `tokenizer_config.json` and
    /// `generation_config.json` from `dir`; `config_bos` / `config_eos` come
    /// from `config.json`.
    pub fn load(
        dir: &Path,
        config_bos: Option<u32>,
        config_eos: &[u32],
    ) -> Result<Self, LoadError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(LoadError::Tokenizer(format!(
                "{} is missing",
                path.display()
            )));
        }
        let inner = Tokenizer::from_file(&path)
            .map_err(|e| LoadError::Tokenizer(format!("{}: {e}", path.display())))?;
        let tok_config = read_json(&dir.join("tokenizer_config.json"))?;
        let gen_config = read_json(&dir.join("generation_config.json"))?;
        let by_text = |key: &str| {
            token_text(tok_config.as_ref().and_then(|c| c.get(key)))
                .and_then(|t| inner.token_to_id(t))
        };

        let mut eos: BTreeSet<u32> = config_eos.iter().copied().collect();
        eos.extend(token_ids(
            gen_config.as_ref().and_then(|g| g.get("eos_token_id")),
        ));
        eos.extend(by_text("eos_token"));
        let bos = by_text("bos_token")
            .or_else(|| {
                token_ids(gen_config.as_ref().and_then(|g| g.get("bos_token_id")))
                    .first()
                    .copied()
            })
            .or(config_bos);

        let chat_template = match tok_config.as_ref().and_then(|c| c.get("chat_template")) {
            Some(Value::String(t)) => Some(t.clone()),
            // A list of named templates: take the default one.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_owned),
            _ => None,
        }
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());

        Ok(Self {
            inner,
            bos,
            eos: eos.into_iter().collect(),
            chat_template,
        })
    }

    /// Encodes `text` with the tokenizer's own special-token rules (its
    /// post-processor decides whether a BOS is added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.inner
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    /// Whether `id` ends a sequence.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }
}

/// Turns generated ids into text as they arrive, never emitting broken UTF-8.
///
/// It decodes a small window (the last emitted token or tokens as context,
/// plus the new ones) and emits what the new ids add to the window's text. The
/// context keeps decoder rules that depend on position (SentencePiece's
/// leading-space strip, byte-level merges) from altering the text, and the
/// window only moves past complete characters: while the decoded text ends in
/// U+FFFD (an incomplete byte-fallback or byte-level sequence), nothing is
/// emitted, for at most [`StreamDecoder::MAX_PENDING`] tokens.
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<u32>,
    /// Start of the context window.
    prefix: usize,
    /// End of the context (what has been emitted).
    read: usize,
}

impl<'t> StreamDecoder<'t> {
    /// Tokens held back at most while waiting for a character to complete.
    pub const MAX_PENDING: usize = 4;

    /// A decoder whose context starts as the last prompt tokens, so that the
    /// first generated token keeps its leading space.
    pub fn new(tokenizer: &'t Tokenizer, prompt: &[u32]) -> Self {
        let tail = &prompt[prompt.len().saturating_sub(4)..];
        Self {
            tokenizer,
            ids: tail.to_vec(),
            prefix: 0,
            read: tail.len(),
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer.decode(ids, false).map_err(|e| e.to_string())
    }

    /// The text `id` adds (possibly empty while a character is incomplete).
    pub fn step(&mut self, id: u32) -> Result<String, String> {
        self.ids.push(id);
        let context = self.decode(&self.ids[self.prefix..self.read])?;
        let full = self.decode(&self.ids[self.prefix..])?;
        if full.ends_with('\u{FFFD}') && self.ids.len() - self.read < Self::MAX_PENDING {
            return Ok(String::new());
        }
        let added = match full.strip_prefix(context.as_str()) {
            Some(added) => added.to_owned(),
            // The context decoded differently in a longer window: emit what
            // lies past its length rather than repeat or lose text.
            None => full.get(context.len()..).unwrap_or_default().to_owned(),
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(added)
    }
}

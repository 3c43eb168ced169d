//! The model's tokenizer (`tokenizers` crate), its special tokens and
//! BOS/EOS rules from the config files, and chat encoding.

use std::collections::BTreeSet;
use std::path::Path;

use inference_core::{Error, Message, Result as CoreResult};
use serde_json::Value;
use tokenizers::Tokenizer;

use inference_formats::config::{checked_ids, token_ids, token_text};
use inference_formats::LoadError;

use crate::gguf::GgufTokenizer;
use crate::template::{BuiltinTemplate, ChatTemplate, SpecialTokens};

/// A tokenizer with the ids and texts generation and chat need.
pub struct ModelTokenizer {
    /// The `tokenizers` tokenizer from `tokenizer.json`.
    pub inner: Tokenizer,
    /// Beginning-of-sequence id, when the model has one.
    pub bos: Option<u32>,
    /// Every end-of-sequence id (tokenizer config, generation config, model config).
    pub eos: Vec<u32>,
    /// The chat template, when the model ships one.
    pub chat_template: Option<String>,
    /// The special tokens' texts that chat templates see.
    pub special: SpecialTokens,
    /// Whether encoding a plain prompt adds the BOS id (the tokenizer's
    /// post-processor does), so that a chat prompt gets one too.
    pub adds_bos: bool,
}

/// Whether encoding a plain prompt puts `bos` in front (the tokenizer's
/// post-processor adds it), probed on a one-letter text.
fn adds_bos(inner: &Tokenizer, bos: Option<u32>) -> bool {
    bos.is_some_and(|bos| {
        let first = |special| {
            inner
                .encode("a", special)
                .map(|e| e.get_ids().first().copied())
                .ok()
                .flatten()
        };
        first(true) == Some(bos) && first(false) != Some(bos)
    })
}

/// The JSON file at `path`, or `None` when there is none; invalid JSON is a
/// [`LoadError::Tokenizer`] naming the file.
pub fn read_json(path: &Path) -> Result<Option<Value>, LoadError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::file(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| LoadError::Tokenizer(format!("{}: invalid JSON: {e}", path.display())))
}

/// The chat template a `tokenizer_config.json` (at `file`) ships in its
/// `chat_template` value: a string, or a list of named templates of which the
/// `default` one is taken. `null` is no template; anything else, an empty
/// template or a list without a `default` entry is a config error naming the
/// file.
fn shipped_template(v: &Value, file: &Path) -> Result<Option<String>, LoadError> {
    let bad = |why: String| LoadError::Config(format!("{}: `chat_template` {why}", file.display()));
    let text = match v {
        Value::Null => return Ok(None),
        Value::String(t) => t.as_str(),
        Value::Array(list) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
            };
            let Some(entry) = named("default") else {
                let names: Vec<&str> = list
                    .iter()
                    .filter_map(|t| t.get("name").and_then(Value::as_str))
                    .collect();
                return Err(bad(format!(
                    "is a list of named templates without a `default` one (names: {})",
                    names.join(", ")
                )));
            };
            entry
                .get("template")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("`default` entry has no `template` string".into()))?
        }
        other => {
            let kind = match other {
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                _ => "an object",
            };
            return Err(bad(format!(
                "must be a string or a list of named templates, got {kind} ({other})"
            )));
        }
    };
    if text.trim().is_empty() {
        return Err(bad("is empty".into()));
    }
    Ok(Some(text.to_owned()))
}

/// The chat template a model directory ships: `tokenizer_config`'s (the
/// parsed `dir/tokenizer_config.json`: a string, or the `default` of a
/// list of named templates), else
/// `dir/chat_template.jinja`, else none.
pub fn chat_template_of(
    dir: &Path,
    tokenizer_config: Option<&Value>,
) -> Result<Option<String>, LoadError> {
    Ok(
        match tokenizer_config.and_then(|c| c.get("chat_template")) {
            Some(v) => shipped_template(v, &dir.join("tokenizer_config.json"))?,
            None => None,
        }
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok()),
    )
}

impl ModelTokenizer {
    /// Reads `tokenizer.json`, `tokenizer_config.json` and
    /// `generation_config.json` (and `chat_template.jinja` where the config
    /// ships no template) from `dir`; `config_bos` / `config_eos` come from
    /// `config.json`. EOS ids are the union of all three files'; the BOS is
    /// the tokenizer config's, else the generation config's, else
    /// `config_bos`.
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
        // A named token missing from the vocabulary is left out, and said so
        // (transformers would add it as a new token, one the model has no
        // embedding or logit for).
        let by_text = |key: &str| {
            let text = token_text(tok_config.as_ref().and_then(|c| c.get(key)))?;
            let id = inner.token_to_id(text);
            if id.is_none() {
                tracing::warn!(
                    key,
                    token = text,
                    "tokenizer_config.json names a token that is not in tokenizer.json's vocabulary; left out"
                );
            }
            id
        };

        // The generation config's ids, checked as config.json's are.
        let gen_ids = |key: &str| {
            checked_ids(
                gen_config.as_ref().and_then(|g| g.get(key)),
                &format!("generation_config.json: {key}"),
            )
        };
        let mut eos: BTreeSet<u32> = config_eos.iter().copied().collect();
        eos.extend(gen_ids("eos_token_id")?);
        eos.extend(by_text("eos_token"));
        let gen_bos = gen_ids("bos_token_id")?.first().copied();
        let bos = by_text("bos_token").or(gen_bos).or(config_bos);

        let chat_template = chat_template_of(dir, tok_config.as_ref())?;

        let text_of =
            |key: &str| token_text(tok_config.as_ref().and_then(|c| c.get(key))).map(str::to_owned);
        let special = SpecialTokens {
            bos_token: text_of("bos_token"),
            eos_token: text_of("eos_token"),
            unk_token: text_of("unk_token"),
            pad_token: text_of("pad_token"),
        };
        let adds_bos = adds_bos(&inner, bos);

        Ok(Self {
            inner,
            bos,
            eos: eos.into_iter().collect(),
            chat_template,
            special,
            adds_bos,
        })
    }

    /// A tokenizer from parts read elsewhere (a GGUF file's metadata): the
    /// special tokens' texts come from the tokenizer's own vocabulary.
    pub fn from_parts(
        inner: Tokenizer,
        bos: Option<u32>,
        eos: Vec<u32>,
        chat_template: Option<String>,
        unk: Option<u32>,
        pad: Option<u32>,
    ) -> Self {
        let text = |id: Option<u32>| id.and_then(|id| inner.id_to_token(id));
        let special = SpecialTokens {
            bos_token: text(bos),
            eos_token: text(eos.first().copied()),
            unk_token: text(unk),
            pad_token: text(pad),
        };
        let adds_bos = adds_bos(&inner, bos);
        Self {
            inner,
            bos,
            eos,
            chat_template,
            special,
            adds_bos,
        }
    }

    /// The tokenizer of a GGUF file's metadata (see [`GgufTokenizer`]).
    pub fn from_gguf(
        file: &inference_formats::gguf::GgufFile,
        architecture: &str,
    ) -> Result<Self, LoadError> {
        let t = GgufTokenizer::from_gguf(file, architecture)?;
        Ok(Self::from_parts(
            t.tokenizer,
            t.bos,
            t.eos,
            t.chat_template,
            t.unk,
            t.pad,
        ))
    }

    /// Reads a tokenizer directory (`tokenizer.json`, and where present
    /// `tokenizer_config.json`, `generation_config.json`, `config.json`,
    /// `chat_template.jinja`) without loading a model.
    pub fn from_dir(dir: &Path) -> CoreResult<Self> {
        let config = read_json(&dir.join("config.json")).map_err(|e| e.into_error(dir))?;
        let field = |key: &str| {
            let c = config.as_ref();
            token_ids(
                c.and_then(|c| c.get(key))
                    .or_else(|| c.and_then(|c| c.get("text_config")?.get(key))),
            )
        };
        Self::load(
            dir,
            field("bos_token_id").first().copied(),
            &field("eos_token_id"),
        )
        .map_err(|e| e.into_error(dir))
    }

    /// The chat template for a model of `model_type`: the one the model
    /// ships, else the built-in one [`BuiltinTemplate::detect`] picks.
    /// [`Error::Unsupported`] when the shipped template does not compile or
    /// there is neither.
    pub fn chat_template_for(&self, model_type: &str) -> CoreResult<ChatTemplate> {
        if let Some(source) = &self.chat_template {
            return ChatTemplate::new(source.clone());
        }
        BuiltinTemplate::detect(model_type, |t| self.inner.token_to_id(t).is_some())
            .map(ChatTemplate::builtin)
            .ok_or_else(|| {
                Error::unsupported(format!(
                    "chat on this {model_type} model: it ships no chat template and its \
                     vocabulary fits none of the built-in formats (Gemma, ChatML, Llama 3)"
                ))
            })
    }

    /// Renders `messages` with `template` (assistant turn header added) and
    /// encodes the result with [`encode_chat`](Self::encode_chat).
    pub fn encode_messages(
        &self,
        template: &ChatTemplate,
        messages: &[Message],
        args: &std::collections::BTreeMap<String, Value>,
    ) -> CoreResult<Vec<u32>> {
        let text = template.render(messages, &self.special, true, args)?;
        self.encode_chat(&text)
            .map_err(|e| Error::InvalidInput(format!("cannot encode the chat prompt: {e}")))
    }

    /// Encodes a rendered chat prompt: its special tokens are parsed, the
    /// post-processor is not run (so nothing is appended), and a BOS is
    /// put in front only when the tokenizer adds one to plain prompts and the
    /// text does not already begin with it (templates that write
    /// `{{ bos_token }}` do): the BOS is never doubled.
    pub fn encode_chat(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = self
            .inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())?;
        if let Some(bos) = self.bos.filter(|_| self.adds_bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Decodes `ids` with special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.inner.decode(ids, false).map_err(|e| e.to_string())
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

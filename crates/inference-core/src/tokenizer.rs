//! [`Tokenizer`]: a model's tokenizer and chat template, for callers that
//! count tokens, build prompts or render templates themselves.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::options::GenerateOptions;
use crate::types::{Message, TokenId};

/// How a chat template is rendered: as transformers' `apply_chat_template`
/// takes `add_generation_prompt`, `tools` and the template's keyword
/// arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RenderOptions {
    /// End with the assistant's turn header (default `true`: what `chat`
    /// sends).
    pub add_generation_prompt: bool,
    /// Tool definitions (JSON schemas, as OpenAI's `tools`), given to the
    /// template as `tools`; empty: the template sees no `tools`.
    pub tools: Vec<serde_json::Value>,
    /// Extra template variables (e.g. `enable_thinking`).
    pub template_args: BTreeMap<String, serde_json::Value>,
    /// Text appended after the generation prompt: the start of the
    /// assistant's reply (needs `add_generation_prompt`).
    pub reply_prefix: Option<String>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            add_generation_prompt: true,
            tools: Vec::new(),
            template_args: BTreeMap::new(),
            reply_prefix: None,
        }
    }
}

impl RenderOptions {
    /// The defaults: the generation prompt added, no tools, no arguments.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether to end with the assistant's turn header.
    pub fn add_generation_prompt(mut self, yes: bool) -> Self {
        self.add_generation_prompt = yes;
        self
    }

    /// Sets the tool definitions.
    pub fn tools(mut self, tools: Vec<serde_json::Value>) -> Self {
        self.tools = tools;
        self
    }

    /// Adds a template variable.
    pub fn template_arg(
        mut self,
        name: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        self.template_args.insert(name.into(), value.into());
        self
    }

    /// Sets the start of the assistant's reply, rendered after the
    /// generation prompt.
    pub fn reply_prefix(mut self, text: impl Into<String>) -> Self {
        self.reply_prefix = Some(text.into());
        self
    }

    /// What [`chat`](crate::TextModel::chat) renders with `opts`: the
    /// generation prompt, `opts.tools`, `opts.template_args` and
    /// `opts.reply_prefix`.
    pub fn for_chat(opts: &GenerateOptions) -> Self {
        Self {
            tools: opts.tools.clone(),
            template_args: opts.template_args.clone(),
            reply_prefix: opts.reply_prefix.clone(),
            ..Self::default()
        }
    }
}

/// A model's tokenizer and chat template, as
/// [`TextModel::tokenizer`](crate::TextModel::tokenizer) hands them out.
///
/// Object-safe. Errors: text the tokenizer cannot encode or ids it cannot
/// decode are [`Error::InvalidInput`](crate::Error::InvalidInput); a model
/// without a usable chat template answers the chat methods with
/// [`Error::Unsupported`](crate::Error::Unsupported); template errors are as
/// [`chat`](crate::TextModel::chat) reports them.
pub trait Tokenizer: Send + Sync {
    /// The ids of `text`; with `add_special_tokens`, as
    /// [`generate`](crate::TextModel::generate) encodes a prompt (the
    /// tokenizer's post-processor may add a BOS), else the text's own
    /// tokens only.
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>>;

    /// The text of `ids`; with `skip_special_tokens`, without the special
    /// tokens' texts.
    fn decode(&self, ids: &[TokenId], skip_special_tokens: bool) -> Result<String>;

    /// How many ids [`generate`](crate::TextModel::generate) would run for
    /// `text`.
    fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.encode(text, true)?.len())
    }

    /// The prompt text the chat template renders for `messages`.
    fn render_chat(&self, messages: &[Message], opts: &RenderOptions) -> Result<String>;

    /// The ids of [`render_chat`](Self::render_chat)'s text as
    /// [`chat`](crate::TextModel::chat) encodes them (special tokens parsed,
    /// a BOS in front exactly once where the model uses one).
    fn encode_chat(&self, messages: &[Message], opts: &RenderOptions) -> Result<Vec<TokenId>>;

    /// The beginning-of-sequence id, if the model has one.
    fn bos_token_id(&self) -> Option<TokenId>;

    /// Every end-of-sequence id.
    fn eos_token_ids(&self) -> Vec<TokenId>;

    /// The number of ids the model knows (its embedding rows).
    fn vocab_size(&self) -> usize;
}

//! [`ChatTokenizer`]: a model's tokenizer with its chat template, as the
//! public [`inference_core::Tokenizer`].

use std::borrow::Cow;
use std::collections::BTreeMap;

use inference_core::{Error, Message, RenderOptions, Result, TokenId, Tokenizer};

use crate::template::ChatTemplate;
use crate::tokenizer::ModelTokenizer;

/// A model's tokenizer and the chat template chosen for it (the model's own,
/// or a built-in one), or why chat cannot run.
pub struct ChatTokenizer {
    tokenizer: ModelTokenizer,
    template: std::result::Result<ChatTemplate, String>,
    vocab_size: usize,
}

impl ChatTokenizer {
    /// Pairs `tokenizer` with the chat template for a `model_type` model
    /// ([`ModelTokenizer::chat_template_for`]) whose embedding has
    /// `vocab_size` rows. A model without a usable template still gets a
    /// tokenizer; its chat calls answer [`Error::Unsupported`] with the
    /// reason.
    pub fn new(tokenizer: ModelTokenizer, model_type: &str, vocab_size: usize) -> Self {
        let template = tokenizer
            .chat_template_for(model_type)
            .map_err(|e| match e {
                Error::Unsupported { feature } => feature,
                other => other.to_string(),
            });
        match &template {
            Ok(t) => tracing::debug!(builtin = ?t.builtin_kind(), "chat template ready"),
            // Not a warning: `chat` reports it as its error, and `generate`
            // does not need a template.
            Err(why) => tracing::debug!(%why, "chat is unavailable for this model"),
        }
        Self {
            tokenizer,
            template,
            vocab_size,
        }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &ModelTokenizer {
        &self.tokenizer
    }

    /// The chat template, or [`Error::Unsupported`] saying why there is none.
    pub fn template(&self) -> Result<&ChatTemplate> {
        self.template
            .as_ref()
            .map_err(|why| Error::unsupported(why.clone()))
    }

    /// The template variables of `opts`: its arguments, and `tools` when it
    /// has any (an argument of that name beside them is refused).
    fn args<'a>(opts: &'a RenderOptions) -> Result<Cow<'a, BTreeMap<String, serde_json::Value>>> {
        if opts.tools.is_empty() {
            return Ok(Cow::Borrowed(&opts.template_args));
        }
        if opts.template_args.contains_key("tools") {
            return Err(Error::invalid_option(
                "template_args",
                "`tools` is set by the tools option",
            ));
        }
        let mut args = opts.template_args.clone();
        args.insert(
            "tools".to_owned(),
            serde_json::Value::from(opts.tools.clone()),
        );
        Ok(Cow::Owned(args))
    }
}

impl Tokenizer for ChatTokenizer {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>> {
        self.tokenizer
            .inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::InvalidInput(format!("cannot encode the text: {e}")))
    }

    fn decode(&self, ids: &[TokenId], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::InvalidInput(format!("cannot decode the ids: {e}")))
    }

    fn render_chat(&self, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        if opts.reply_prefix.is_some() && !opts.add_generation_prompt {
            return Err(Error::InvalidInput(
                "a reply prefix needs the generation prompt (add_generation_prompt)".into(),
            ));
        }
        let args = Self::args(opts)?;
        let mut text = self.template()?.render(
            messages,
            &self.tokenizer.special,
            opts.add_generation_prompt,
            &args,
        )?;
        if let Some(prefix) = &opts.reply_prefix {
            text.push_str(prefix);
        }
        Ok(text)
    }

    fn encode_chat(&self, messages: &[Message], opts: &RenderOptions) -> Result<Vec<TokenId>> {
        let text = self.render_chat(messages, opts)?;
        self.tokenizer
            .encode_chat(&text)
            .map_err(|e| Error::InvalidInput(format!("cannot encode the chat prompt: {e}")))
    }

    fn bos_token_id(&self) -> Option<TokenId> {
        self.tokenizer.bos
    }

    fn eos_token_ids(&self) -> Vec<TokenId> {
        self.tokenizer.eos.clone()
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

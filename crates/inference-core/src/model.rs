//! [`TextModel`] and [`ChatSession`]: what a loaded model does.

use crate::error::{Error, Result};
use crate::options::GenerateOptions;
use crate::stream::TokenStream;
use crate::tokenizer::Tokenizer;
use crate::train::Trainable;
use crate::types::{
    BatchResult, ClassifyResult, GenerateMetrics, Message, ModelInfo, QueueStatus, TokenId,
};

/// A loaded text-generation model.
///
/// Object-safe: backends hand it out as `Box<dyn TextModel>`. Methods take
/// `&self`; a backend runs its engine on a worker it owns, so concurrent calls
/// on one model queue (or batch) and never interleave in one KV cache.
/// Dropping the model frees it (once its in-flight streams have ended).
///
/// Every method validates its options before any work and returns an
/// [`Error::InvalidOption`] or [`Error::Unsupported`] at once; errors that
/// happen during generation are items of the returned [`TokenStream`].
pub trait TextModel: Send + Sync {
    /// Streams the continuation of a raw `prompt`, encoded with the
    /// tokenizer's own special-token rules.
    fn generate(&self, prompt: &str, opts: &GenerateOptions) -> Result<TokenStream>;

    /// Streams the assistant's reply to `messages`, rendered with the model's
    /// chat template.
    fn chat(&self, messages: &[Message], opts: &GenerateOptions) -> Result<TokenStream>;

    /// Streams the continuation of prompt ids given directly (no tokenizer,
    /// no template), with [`generate`](Self::generate)'s checks.
    fn generate_ids(&self, ids: Vec<TokenId>, opts: &GenerateOptions) -> Result<TokenStream> {
        let _ = (ids, opts);
        Err(Error::unsupported(format!(
            "prompts as token ids on {}",
            self.model_type()
        )))
    }

    /// On a rank other than 0 of a tensor-parallel model (see
    /// [`LoadOptions::tensor_parallel`](crate::LoadOptions::tensor_parallel)):
    /// runs rank 0's calls alongside it until rank 0's model is dropped
    /// (`Ok`) or rank 0 is lost (an error). Calls made on such a rank are
    /// refused: rank 0 takes them. Backends without tensor parallelism
    /// answer [`Error::Unsupported`].
    fn follow(&self) -> Result<()> {
        Err(Error::unsupported(format!(
            "tensor-parallel ranks on {}",
            self.model_type()
        )))
    }

    /// How busy the model is now, where the backend knows (a server's
    /// queue-depth and batch-size gauges).
    fn queue_status(&self) -> Option<QueueStatus> {
        None
    }

    /// The next token of each prompt (and its logits when `return_logits`),
    /// from one batched forward pass.
    fn classify(&self, prompts: &[String], opts: &GenerateOptions) -> Result<Vec<ClassifyResult>> {
        let _ = (prompts, opts);
        Err(Error::unsupported(format!(
            "classify on {}",
            self.model_type()
        )))
    }

    /// Generates a continuation for each prompt, batched; one result per prompt,
    /// in order.
    fn batch_generate(
        &self,
        prompts: &[String],
        opts: &GenerateOptions,
    ) -> Result<Vec<BatchResult>> {
        let _ = (prompts, opts);
        Err(Error::unsupported(format!(
            "batch_generate on {}",
            self.model_type()
        )))
    }

    /// A multi-turn conversation that keeps its history (and, where the backend
    /// can, its KV cache) between turns.
    fn chat_session(&self) -> Result<Box<dyn ChatSession>> {
        Err(Error::unsupported(format!(
            "chat sessions on {}",
            self.model_type()
        )))
    }

    /// The model's tokenizer and chat template: encode, decode, count
    /// tokens, render the chat template. [`Error::Unsupported`] for a model
    /// that has none to offer.
    fn tokenizer(&self) -> Result<&dyn Tokenizer> {
        Err(Error::unsupported(format!(
            "tokenizer access on {}",
            self.model_type()
        )))
    }

    /// LoRA fine-tuning of this model ([`Trainable`]). [`Error::Unsupported`]
    /// for a backend that cannot train.
    fn trainable(&self) -> Result<&dyn Trainable> {
        Err(Error::unsupported(format!(
            "training on {} with this backend",
            self.model_type()
        )))
    }

    /// What the model is.
    fn info(&self) -> ModelInfo;

    /// The metrics of the last finished call, if any call has finished.
    fn metrics(&self) -> Option<GenerateMetrics>;

    /// The architecture name, e.g. `qwen3`.
    fn model_type(&self) -> &str;
}

/// A conversation with a model that remembers its turns.
pub trait ChatSession: Send {
    /// Adds a user message and streams the assistant's reply. The reply joins
    /// the history when its stream ends.
    fn send(&mut self, user: &str, opts: &GenerateOptions) -> Result<TokenStream>;

    /// The conversation so far (replies still streaming are not included).
    fn history(&self) -> Vec<Message>;

    /// Forgets the conversation (and any cached state), keeping `system` as the
    /// first message when given.
    fn reset(&mut self, system: Option<&str>);

    /// Chooses what [`send`](Self::send) does when the conversation no longer
    /// fits the model's context (default [`HistoryOverflow::DropOldest`]).
    /// Backends whose sessions cannot drop turns refuse it with
    /// [`Error::Unsupported`].
    fn set_history_overflow(&mut self, overflow: HistoryOverflow) -> Result<()> {
        let _ = overflow;
        Err(Error::unsupported(
            "a history overflow policy for this chat session",
        ))
    }

    /// How many turns (a user message and its reply) this session has dropped
    /// so far to fit the context (see [`HistoryOverflow`]); a reset does not
    /// count them back.
    fn dropped_turns(&self) -> usize {
        0
    }
}

/// What a [`ChatSession`] does when its conversation outgrows the context.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HistoryOverflow {
    /// Drop the oldest turns (the system message stays) until the prompt
    /// fits, logging it; fail only when the system message and the new user
    /// message alone do not fit.
    #[default]
    DropOldest,
    /// Fail the turn with [`Error::ContextOverflow`].
    Error,
}

//! Plain data shared by every backend: tokens, messages, model facts, metrics.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A token id, as the model's tokenizer numbers it.
pub type TokenId = u32;

/// One generated token: its id and the text it adds to the output.
///
/// `text` is what the token contributes once detokenised in context; it may be
/// empty (for example while a multi-byte character is incomplete) or shorter
/// than the token's own text when a stop string begins inside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Token {
    /// The token id.
    pub id: TokenId,
    /// The text this token adds to the output.
    pub text: String,
    /// Its log-probability and the most likely alternatives, when the call
    /// asked for them ([`GenerateOptions::logprobs`](crate::GenerateOptions::logprobs)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<TokenLogprobs>,
}

impl Token {
    /// A token with `id` and `text`.
    pub fn new(id: TokenId, text: impl Into<String>) -> Self {
        Self {
            id,
            text: text.into(),
            logprobs: None,
        }
    }

    /// The same token with `logprobs`.
    pub fn with_logprobs(mut self, logprobs: Option<TokenLogprobs>) -> Self {
        self.logprobs = logprobs;
        self
    }
}

/// A generated token's log-probability (natural log) under the model's raw
/// distribution, and the most likely ids at that step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// The log-probability of the token's id.
    pub logprob: f32,
    /// The most likely ids and their log-probabilities, most likely first
    /// ([`GenerateOptions::top_logprobs`](crate::GenerateOptions::top_logprobs)
    /// of them).
    pub top: Vec<(TokenId, f32)>,
}

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The person talking to the model.
    User,
    /// The model.
    Assistant,
    /// The result of a tool call the model made (see
    /// [`Message::tool_call_id`]).
    Tool,
}

impl Role {
    /// The role's name as chat templates spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One chat message, as chat templates receive it (transformers' message
/// dicts): `role`, `content`, and where present `reasoning_content`,
/// `tool_calls` and `tool_call_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// What they wrote (may be empty for an assistant message that only
    /// calls tools).
    #[serde(default)]
    pub content: String,
    /// An assistant message's reasoning (a thinking model's), which
    /// templates such as Qwen3's render as its `<think>` block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// The tool calls an assistant message makes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a [`Role::Tool`] message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// A call of a tool by the model, as OpenAI and transformers write it:
/// `{"id", "type": "function", "function": {"name", "arguments"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id, which the tool message with the result repeats.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    /// The function called.
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".to_owned()
}

/// The function of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments: a JSON object (what templates expect), or a string of
    /// JSON as OpenAI's API sends it (templates print it as it is).
    pub arguments: serde_json::Value,
}

impl ToolCall {
    /// A call `id` of the function `name` with `arguments`.
    pub fn function(
        id: impl Into<String>,
        name: impl Into<String>,
        arguments: serde_json::Value,
    ) -> Self {
        Self {
            id: id.into(),
            kind: function_kind(),
            function: FunctionCall {
                name: name.into(),
                arguments,
            },
        }
    }
}

impl Message {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            reasoning_content: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// An assistant message that calls tools (with `content` beside the
    /// calls, possibly empty).
    pub fn assistant_tool_calls(content: impl Into<String>, calls: Vec<ToolCall>) -> Self {
        Self {
            tool_calls: calls,
            ..Self::assistant(content)
        }
    }

    /// The result of the tool call `call_id`.
    pub fn tool(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(call_id.into()),
            ..Self::new(Role::Tool, content)
        }
    }

    /// The same message with `reasoning` as its reasoning content.
    pub fn with_reasoning(mut self, reasoning: impl Into<String>) -> Self {
        self.reasoning_content = Some(reasoning.into());
        self
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// What a loaded model is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ModelInfo {
    /// The architecture, e.g. `qwen3` or `gemma3_text`.
    pub architecture: String,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Bits per quantised weight, when the weights are quantised.
    pub quant_bits: Option<u32>,
    /// Quantisation group size, when the weights are quantised.
    pub quant_group: Option<u32>,
    /// The context length the model runs with.
    pub context_length: usize,
    /// The compute dtype, e.g. `bfloat16`.
    pub dtype: String,
    /// How the weights are stored on disk, before any conversion at load:
    /// the checkpoint's float dtype (`bfloat16`, …) for a Hugging Face
    /// directory (its quantised matrices are described by
    /// [`quant_type`](Self::quant_type)), or the GGUF file type (`Q4_1`,
    /// `Q4_K_M`, `F16`, …). Empty when unknown.
    #[serde(default)]
    pub stored_dtype: String,
    /// The quantisation scheme of the stored weights, when quantised:
    /// `affine` for MLX-quantised directories, the GGUF file type (`Q4_1`,
    /// …) for GGUF files.
    #[serde(default)]
    pub quant_type: Option<String>,
    /// Number of parameters (quantised weights counted unpacked).
    pub parameter_count: u64,
    /// Whether the model ships its own chat template (for example
    /// `tokenizer_config.json`'s `chat_template`, a `chat_template.jinja` file
    /// or GGUF's `tokenizer.chat_template`). A built-in fallback template that
    /// a backend picks for a model without one does not count.
    ///
    /// Front ends use it to choose between [`chat`](crate::TextModel::chat)
    /// and a raw [`generate`](crate::TextModel::generate) by default.
    /// Absent from serialised data written before it existed: `false`.
    #[serde(default)]
    pub chat_template: bool,
    /// This process's rank in a tensor-parallel group (0 in one process);
    /// rank 0 is the one that reports.
    #[serde(default)]
    pub rank: usize,
    /// Processes the model is split over (1 in one process; see
    /// [`LoadOptions::tensor_parallel`](crate::LoadOptions::tensor_parallel)).
    /// [`parameter_count`](Self::parameter_count) counts this rank's share.
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

impl Default for ModelInfo {
    fn default() -> Self {
        Self {
            architecture: String::new(),
            vocab_size: 0,
            num_layers: 0,
            hidden_size: 0,
            quant_bits: None,
            quant_group: None,
            context_length: 0,
            dtype: String::new(),
            stored_dtype: String::new(),
            quant_type: None,
            parameter_count: 0,
            chat_template: false,
            rank: 0,
            world_size: 1,
        }
    }
}

impl ModelInfo {
    /// A `ModelInfo` for `architecture`, everything else zero; assign the other
    /// fields on the returned value.
    pub fn new(architecture: impl Into<String>) -> Self {
        Self {
            architecture: architecture.into(),
            ..Self::default()
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token id or a stop string.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// Cancelled by the caller (stream dropped or cancel handle used).
    Cancelled,
    /// An error ended it; the stream's last item is that error.
    Error,
}

impl FinishReason {
    /// The reason as a lowercase word (`stop`, `length`, `cancelled`, `error`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Serde for a [`Duration`] as f64 seconds.
mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

/// Measurements of one finished call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GenerateMetrics {
    /// Tokens in the prompt (after templating).
    pub prompt_tokens: usize,
    /// Tokens generated (stop tokens not counted).
    pub generated_tokens: usize,
    /// Time to process the prompt, up to the first sampled token.
    #[serde(with = "seconds")]
    pub prefill_duration: Duration,
    /// Time from the first sampled token to the end.
    #[serde(with = "seconds")]
    pub decode_duration: Duration,
    /// Wall time of the whole call.
    #[serde(with = "seconds")]
    pub total_duration: Duration,
    /// Prompt tokens per second of prefill.
    pub prefill_tokens_per_sec: f64,
    /// Generated tokens per second of decode.
    pub decode_tokens_per_sec: f64,
    /// Peak device memory during the call, in bytes (0 where unknown).
    pub peak_memory_bytes: u64,
    /// Active device memory at the end of the call, in bytes (0 where unknown).
    pub active_memory_bytes: u64,
    /// Prompt tokens taken from a KV cache (a chat session's, or a prompt
    /// cache shared across calls) instead of being prefilled; they count in
    /// `prompt_tokens` too.
    #[serde(default)]
    pub cached_prompt_tokens: usize,
}

impl GenerateMetrics {
    /// Metrics from counts and durations, with the rates derived from them.
    ///
    /// The decode rate counts the tokens after the first, which prefill produces.
    pub fn from_timings(
        prompt_tokens: usize,
        generated_tokens: usize,
        prefill: Duration,
        decode: Duration,
        total: Duration,
    ) -> Self {
        let rate = |n: usize, d: Duration| {
            let s = d.as_secs_f64();
            if n == 0 || s <= 0.0 {
                0.0
            } else {
                n as f64 / s
            }
        };
        Self {
            prompt_tokens,
            generated_tokens,
            prefill_duration: prefill,
            decode_duration: decode,
            total_duration: total,
            prefill_tokens_per_sec: rate(prompt_tokens, prefill),
            decode_tokens_per_sec: rate(generated_tokens.saturating_sub(1), decode),
            peak_memory_bytes: 0,
            active_memory_bytes: 0,
            cached_prompt_tokens: 0,
        }
    }

    /// These metrics with `tokens` prompt tokens taken from a cache.
    pub fn with_cached_prompt_tokens(mut self, tokens: usize) -> Self {
        self.cached_prompt_tokens = tokens;
        self
    }

    /// These metrics with the memory figures set.
    pub fn with_memory(mut self, peak_bytes: u64, active_bytes: u64) -> Self {
        self.peak_memory_bytes = peak_bytes;
        self.active_memory_bytes = active_bytes;
        self
    }
}

/// How busy a model is ([`TextModel::queue_status`](crate::TextModel::queue_status)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QueueStatus {
    /// Calls running (prefilling or decoding) now.
    pub running: usize,
    /// Calls waiting to start.
    pub waiting: usize,
}

impl QueueStatus {
    /// `running` calls running and `waiting` waiting.
    pub fn new(running: usize, waiting: usize) -> Self {
        Self { running, waiting }
    }
}

/// The next token a model predicts for one prompt of [`classify`](crate::TextModel::classify).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifyResult {
    /// The sampled next token.
    pub token: Token,
    /// The full last-position logits, when `return_logits` was asked for.
    pub logits: Option<Vec<f32>>,
}

/// The outcome of one prompt of [`batch_generate`](crate::TextModel::batch_generate).
#[derive(Debug)]
pub struct BatchResult {
    /// The generated tokens.
    pub tokens: Vec<Token>,
    /// Why this row ended.
    pub finish_reason: FinishReason,
    /// The error that ended this row, if one did.
    pub error: Option<Error>,
}

impl BatchResult {
    /// The concatenated text of the tokens.
    pub fn text(&self) -> String {
        self.tokens.iter().map(|t| t.text.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_info_chat_template_defaults_to_false_and_round_trips() {
        let mut info = ModelInfo::new("qwen3");
        assert!(!info.chat_template);
        info.chat_template = true;
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["chat_template"], serde_json::Value::Bool(true));
        let back: ModelInfo = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, info);

        // Data written before the field existed still reads, as "no template".
        let mut old = json;
        old.as_object_mut().unwrap().remove("chat_template");
        let back: ModelInfo = serde_json::from_value(old).unwrap();
        assert!(!back.chat_template);
        assert_eq!(back.architecture, "qwen3");
    }
}

/// The metrics of a model's last finished call, shared between the model's
/// worker (which sets them) and its callers ([`TextModel::metrics`](crate::TextModel::metrics)).
#[derive(Debug, Default)]
pub struct LastMetrics(std::sync::Mutex<Option<GenerateMetrics>>);

impl LastMetrics {
    /// Nothing recorded yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the metrics of a call that finished.
    pub fn set(&self, metrics: &GenerateMetrics) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(metrics.clone());
    }

    /// The last recorded metrics.
    pub fn get(&self) -> Option<GenerateMetrics> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

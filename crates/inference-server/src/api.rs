//! The OpenAI request bodies this server takes, and their translation into
//! messages and [`GenerateOptions`].
//!
//! Fields are checked as OpenAI's own API checks them: a field outside the
//! spec is a 400 (`unrecognized request argument`), in messages, content
//! parts, tool calls and tools too; the fields this server
//! honours are honoured; `user`, `metadata`, `store`, `service_tier` and
//! `parallel_tool_calls` are accepted and have no effect; `n > 1`, a
//! `response_format` other than text, audio and images are a 400 naming the
//! field.

use std::collections::BTreeMap;

use inference_core::{GenerateOptions, Message, Role, ToolCall};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// A message's `content`: a string, or text parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts (`{"type": "text", "text": …}`; other kinds are refused).
    Parts(Vec<Map<String, Value>>),
}

/// One message of a chat request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// `system` (or `developer`), `user`, `assistant` or `tool`.
    pub role: String,
    /// The text (absent or null for an assistant message that only calls
    /// tools).
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant message's calls.
    #[serde(default)]
    pub tool_calls: Option<Vec<RequestToolCall>>,
    /// The call a tool message answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// An assistant message's reasoning (as this server returns it).
    #[serde(default, alias = "reasoning")]
    pub reasoning_content: Option<String>,
    /// A participant's name (accepted; templates do not use it).
    #[serde(default)]
    pub name: Option<String>,
}

/// A call in an assistant message of a request:
/// `{"id", "type": "function", "function": {"name", "arguments"}}`, nothing
/// else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestToolCall {
    /// The call's id.
    pub id: String,
    /// Only `function`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The function called.
    pub function: RequestFunctionCall,
}

/// The function of a [`RequestToolCall`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFunctionCall {
    /// The function's name.
    pub name: String,
    /// A string of JSON, as OpenAI sends it, or a JSON object.
    pub arguments: Value,
}

impl RequestToolCall {
    /// The call, or a 400 for message `at` where its type is not
    /// `function` or its arguments are neither a string nor an object.
    fn to_call(&self, at: usize) -> Result<ToolCall, ApiError> {
        if self.kind.as_deref().is_some_and(|k| k != "function") {
            return Err(ApiError::bad_param(
                "messages",
                format!("message {at}: a tool call's type must be \"function\""),
            ));
        }
        if !(self.function.arguments.is_string() || self.function.arguments.is_object()) {
            return Err(ApiError::bad_param(
                "messages",
                format!(
                    "message {at}: a tool call's arguments must be a string of JSON or an object"
                ),
            ));
        }
        Ok(ToolCall {
            id: self.id.clone(),
            kind: "function".into(),
            function: inference_core::FunctionCall {
                name: self.function.name.clone(),
                arguments: self.function.arguments.clone(),
            },
        })
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// The model's id.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Most tokens to generate (older name).
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    /// Sampling temperature (OpenAI's default: 1).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k sampling (an extension, as vLLM and llama.cpp take it).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Min-p sampling (an extension).
    #[serde(default)]
    pub min_p: Option<f32>,
    /// OpenAI's presence penalty.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// OpenAI's frequency penalty.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// The multiplicative repetition penalty (an extension).
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Bias per token id (keys are ids as strings).
    #[serde(default)]
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// Seed of the sampler.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Return each token's log-probability.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// And this many alternatives.
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    /// Tools the model may call.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// `auto`, `none`, or `{"type": "function", "function": {"name": …}}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Extra arguments for the chat template (`enable_thinking`, …).
    #[serde(default)]
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// Accepted, no effect.
    #[serde(default)]
    pub user: Option<Value>,
    /// Accepted, no effect.
    #[serde(default)]
    pub metadata: Option<Value>,
    /// Accepted, no effect.
    #[serde(default)]
    pub store: Option<Value>,
    /// Accepted, no effect.
    #[serde(default)]
    pub service_tier: Option<Value>,
    /// Accepted, no effect (calls are parsed as the model writes them).
    #[serde(default)]
    pub parallel_tool_calls: Option<Value>,
    /// Only 1.
    #[serde(default)]
    pub n: Option<u64>,
    /// Only `{"type": "text"}`.
    #[serde(default)]
    pub response_format: Option<Value>,
    /// Refused.
    #[serde(default)]
    pub audio: Option<Value>,
    /// Only `["text"]`.
    #[serde(default)]
    pub modalities: Option<Value>,
}

/// A completion request's `prompt`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
    /// A batch of one (`["text"]` or `[[ids]]`).
    Texts(Vec<String>),
    /// A batch of ids.
    IdLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    /// The model's id.
    #[serde(default)]
    pub model: Option<String>,
    /// The prompt.
    pub prompt: Prompt,
    /// Repeat the prompt before the completion.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Return the log-probabilities of this many alternatives (0–20).
    #[serde(default)]
    pub logprobs: Option<u32>,
    /// Refused (no fill-in-the-middle).
    #[serde(default)]
    pub suffix: Option<Value>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Most tokens to generate (OpenAI's default: 16).
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k sampling.
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Min-p sampling.
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Presence penalty.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Repetition penalty.
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Bias per token id.
    #[serde(default)]
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// Seed.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Only 1.
    #[serde(default)]
    pub n: Option<u64>,
    /// Only 1.
    #[serde(default)]
    pub best_of: Option<u64>,
    /// Accepted, no effect.
    #[serde(default)]
    pub user: Option<Value>,
}

/// The sampling fields both requests share (each as its request has it).
#[allow(missing_docs)]
pub struct Sampling<'a> {
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub logit_bias: Option<&'a BTreeMap<String, f32>>,
    pub seed: Option<i64>,
    pub stop: Option<&'a Stop>,
    pub n: Option<u64>,
}

/// Generation options from a request's sampling fields; `max_default` when
/// it sets no limit.
pub fn options(s: &Sampling<'_>, max_default: usize) -> Result<GenerateOptions, ApiError> {
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_param("n", "only n = 1 is supported"));
    }
    let mut o = GenerateOptions::new();
    o.max_tokens = match s.max_tokens {
        Some(0) => return Err(ApiError::bad_param("max_tokens", "must be at least 1")),
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => max_default,
    };
    // OpenAI's ranges: a value outside them is refused there, so here too.
    let within = |name: &'static str, v: Option<f32>, lo: f32, hi: f32| match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(ApiError::bad_param(
            name,
            format!("must be between {lo} and {hi}, got {x}"),
        )),
        _ => Ok(()),
    };
    within("temperature", s.temperature, 0.0, 2.0)?;
    within("presence_penalty", s.presence_penalty, -2.0, 2.0)?;
    within("frequency_penalty", s.frequency_penalty, -2.0, 2.0)?;
    // OpenAI samples at temperature 1 unless told otherwise.
    o.temperature = s.temperature.unwrap_or(1.0);
    if let Some(p) = s.top_p {
        o.top_p = p;
    }
    if let Some(k) = s.top_k {
        // -1 and 0 mean "off" in vLLM and llama.cpp.
        o.top_k = usize::try_from(k.max(0)).unwrap_or(0);
    }
    if let Some(p) = s.min_p {
        o.min_p = p;
    }
    if let Some(p) = s.presence_penalty {
        o.presence_penalty = p;
    }
    if let Some(p) = s.frequency_penalty {
        o.frequency_penalty = p;
    }
    if let Some(p) = s.repetition_penalty {
        o.repeat_penalty = p;
    }
    if let Some(bias) = s.logit_bias {
        for (id, b) in bias {
            let id: u32 = id.parse().map_err(|_| {
                ApiError::bad_param("logit_bias", format!("{id:?} is not a token id"))
            })?;
            if !(-100.0..=100.0).contains(b) {
                return Err(ApiError::bad_param(
                    "logit_bias",
                    format!("the bias of {id} must be between -100 and 100"),
                ));
            }
            o = o.logit_bias(id, *b);
        }
    }
    if let Some(seed) = s.seed {
        o = o.seed(seed as u64);
    }
    match s.stop {
        Some(Stop::One(t)) => o = o.stop_string(t.clone()),
        Some(Stop::Many(v)) => {
            for t in v {
                o = o.stop_string(t.clone());
            }
        }
        None => {}
    }
    o.validate().map_err(ApiError::from)?;
    Ok(o)
}

fn text_of(content: Option<&Content>, at: usize) -> Result<String, ApiError> {
    Ok(match content {
        None => String::new(),
        Some(Content::Text(t)) => t.clone(),
        Some(Content::Parts(parts)) => {
            if parts.is_empty() {
                return Err(ApiError::bad_param(
                    "messages",
                    format!("message {at}: content parts must not be empty"),
                ));
            }
            let mut text = String::new();
            for part in parts {
                if let Some(k) = part.keys().find(|k| !matches!(k.as_str(), "type" | "text")) {
                    return Err(ApiError::bad_param(
                        "messages",
                        format!("message {at}: unknown field {k:?} in a content part"),
                    ));
                }
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => text.push_str(
                        part.get("text")
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                ApiError::bad_param(
                                    "messages",
                                    format!("message {at}: a text part needs `text`"),
                                )
                            })?,
                    ),
                    Some(kind) => {
                        return Err(ApiError::bad_param(
                            "messages",
                            format!("message {at}: content parts of type {kind:?} are not supported (text only)"),
                        ))
                    }
                    None => {
                        return Err(ApiError::bad_param(
                            "messages",
                            format!("message {at}: a content part needs `type`"),
                        ))
                    }
                }
            }
            text
        }
    })
}

/// The conversation of a chat request.
pub fn messages(req: &ChatRequest) -> Result<Vec<Message>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "at least one message is needed",
        ));
    }
    req.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" => Role::Tool,
                other => {
                    return Err(ApiError::bad_param(
                        "messages",
                        format!("message {i}: unknown role {other:?}"),
                    ))
                }
            };
            let _ = &m.name;
            // As OpenAI: only an assistant message may leave out its text.
            if role != Role::Assistant && m.content.is_none() {
                return Err(ApiError::bad_param(
                    "messages",
                    format!("message {i}: a {} message needs content", m.role),
                ));
            }
            if role == Role::Tool && m.tool_call_id.is_none() {
                return Err(ApiError::bad_param(
                    "messages",
                    format!("message {i}: a tool message needs tool_call_id"),
                ));
            }
            let tool_calls = match (&m.tool_calls, role) {
                (None, _) => Vec::new(),
                (Some(calls), Role::Assistant) => calls
                    .iter()
                    .map(|c| c.to_call(i))
                    .collect::<Result<_, _>>()?,
                (Some(_), _) => {
                    return Err(ApiError::bad_param(
                        "messages",
                        format!("message {i}: only an assistant message has tool_calls"),
                    ))
                }
            };
            Ok(Message {
                role,
                content: text_of(m.content.as_ref(), i)?,
                reasoning_content: m.reasoning_content.clone(),
                tool_calls,
                tool_call_id: m.tool_call_id.clone(),
            })
        })
        .collect()
}

/// The fields a chat request refuses, checked before anything runs.
pub fn refuse_chat_fields(req: &ChatRequest) -> Result<(), ApiError> {
    if let Some(f) = &req.response_format {
        if f.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::bad_param(
                "response_format",
                "only {\"type\": \"text\"} is supported",
            ));
        }
    }
    if req.audio.is_some() {
        return Err(ApiError::bad_param(
            "audio",
            "audio output is not supported",
        ));
    }
    if let Some(m) = &req.modalities {
        if m != &Value::Array(vec![Value::String("text".into())]) {
            return Err(ApiError::bad_param(
                "modalities",
                "only [\"text\"] is supported",
            ));
        }
    }
    if req.top_logprobs.is_some_and(|n| n > 20) {
        return Err(ApiError::bad_param(
            "top_logprobs",
            "must be between 0 and 20",
        ));
    }
    if req.top_logprobs.is_some() && req.logprobs != Some(true) {
        return Err(ApiError::bad_param("top_logprobs", "needs logprobs: true"));
    }
    Ok(())
}

/// What `tool_choice` asks of the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forced {
    /// Nothing: the model calls a tool or answers (`auto`, `none`, absent).
    No,
    /// A call of some offered tool (`required`).
    AnyTool,
    /// A call of this tool (a named function).
    Tool(String),
}

/// The tools a chat request offers the model, after `tool_choice`: all of
/// them (`auto`, absent, `required`), none (`none`) or the one named; and
/// whether a call is forced.
pub fn offered_tools(req: &ChatRequest) -> Result<(Vec<Value>, Forced), ApiError> {
    let tools = req.tools.clone().unwrap_or_default();
    // OpenAI's rule for function names: what a forced call's opening
    // writes into the reply stays a plain JSON string.
    let valid = |n: &str| {
        (1..=64).contains(&n.len())
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    for (i, t) in tools.iter().enumerate() {
        let unknown = |v: &Value, known: &[&str]| {
            v.as_object()
                .and_then(|m| m.keys().find(|k| !known.contains(&k.as_str())).cloned())
        };
        if let Some(k) = unknown(t, &["type", "function"]).or_else(|| {
            unknown(
                &t["function"],
                &["name", "description", "parameters", "strict"],
            )
        }) {
            return Err(ApiError::bad_param(
                "tools",
                format!("tool {i}: unknown field {k:?}"),
            ));
        }
        if t.pointer("/function/strict").and_then(Value::as_bool) == Some(true) {
            return Err(ApiError::bad_param(
                "tools",
                format!("tool {i}: strict schema adherence is not supported"),
            ));
        }
        if t.pointer("/function/parameters")
            .is_some_and(|p| !p.is_object())
            || t.pointer("/function/description")
                .is_some_and(|d| !d.is_string())
            || t.pointer("/function/strict")
                .is_some_and(|d| !(d.is_boolean() || d.is_null()))
        {
            return Err(ApiError::bad_param(
                "tools",
                format!("tool {i}: parameters must be an object, description a string and strict a boolean"),
            ));
        }
        if t.get("type").and_then(Value::as_str) != Some("function")
            || !t
                .pointer("/function/name")
                .and_then(Value::as_str)
                .is_some_and(valid)
        {
            return Err(ApiError::bad_param(
                "tools",
                format!(
                    "tool {i} must be {{\"type\": \"function\", \"function\": {{\"name\": …}}}} with a name of 1 to 64 letters, digits, underscores or dashes"
                ),
            ));
        }
    }
    match &req.tool_choice {
        None => Ok((tools, Forced::No)),
        Some(Value::String(s)) if s == "auto" => Ok((tools, Forced::No)),
        Some(Value::String(s)) if s == "none" => Ok((Vec::new(), Forced::No)),
        Some(Value::String(s)) if s == "required" => {
            if tools.is_empty() {
                return Err(ApiError::bad_param(
                    "tool_choice",
                    "\"required\" needs at least one tool in tools",
                ));
            }
            Ok((tools, Forced::AnyTool))
        }
        Some(choice) => {
            let name = choice
                .pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::bad_param(
                        "tool_choice",
                        "must be \"auto\", \"none\" or {\"type\": \"function\", \"function\": {\"name\": …}}",
                    )
                })?;
            let chosen: Vec<Value> = tools
                .into_iter()
                .filter(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name))
                .collect();
            if chosen.is_empty() {
                return Err(ApiError::bad_param(
                    "tool_choice",
                    format!("no tool named {name:?} in tools"),
                ));
            }
            Ok((chosen, Forced::Tool(name.to_owned())))
        }
    }
}

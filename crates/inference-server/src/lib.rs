//! An OpenAI-compatible HTTP server over loaded [`TextModel`]s, and a chat
//! page.
//!
//! [`router`] builds an axum [`Router`] (usable inside another program);
//! [`serve`] runs it on a listener until a shutdown signal, letting
//! in-flight responses finish. Endpoints:
//!
//! - `POST /v1/chat/completions` and `POST /v1/completions`, streamed as
//!   server-sent events (`data: {chunk}` … `data: [DONE]`) or whole;
//! - `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text);
//! - `GET /`: the chat page.
//!
//! Any backend serves; the MLX backend batches concurrent requests (a
//! client's disconnect drops its stream, which cancels its generation and
//! frees its slot). Errors are OpenAI's error JSON (see [`error`]).

pub mod api;
pub mod error;
mod metrics;
pub mod parse;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use inference_core::{
    FinishReason, GenerateMetrics, GenerateOptions, TextModel, Token, TokenStream,
};
use serde_json::{json, Value};

use crate::api::{ChatRequest, CompletionRequest, Prompt, Sampling};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::parse::{Piece, ReplyParser, ToolFormat};

/// Which field carries a thinking model's reasoning in replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReasoningField {
    /// `reasoning_content` (DeepSeek's API, vLLM, llama.cpp's server).
    #[default]
    ReasoningContent,
    /// `reasoning` (mlx-lm's server).
    Reasoning,
}

impl ReasoningField {
    fn name(self) -> &'static str {
        match self {
            ReasoningField::ReasoningContent => "reasoning_content",
            ReasoningField::Reasoning => "reasoning",
        }
    }
}

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Requests to `/v1/*` need `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Origins allowed by CORS (`*` for any); none: no CORS headers.
    pub cors_origins: Vec<String>,
    /// The largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// The reasoning field's name.
    pub reasoning_field: ReasoningField,
    /// A request that has not finished after this long ends with a 503
    /// (whole responses) or an error event (streams).
    pub request_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            cors_origins: Vec::new(),
            max_body_bytes: 4 << 20,
            reasoning_field: ReasoningField::default(),
            request_timeout: None,
        }
    }
}

/// A model the server serves.
pub struct ServedModel {
    /// Its id in `/v1/models` and in requests' `model`.
    pub id: String,
    /// The model.
    pub model: Arc<dyn TextModel>,
}

impl ServedModel {
    /// `model` served as `id`.
    pub fn new(id: impl Into<String>, model: Arc<dyn TextModel>) -> Self {
        Self {
            id: id.into(),
            model,
        }
    }
}

struct AppState {
    models: Vec<ServedModel>,
    config: ServerConfig,
    metrics: Metrics,
    started: u64,
    next_id: AtomicU64,
}

type Shared = Arc<AppState>;

impl AppState {
    /// The model a request names: with one model, any name (or none) is
    /// that model; with several, an unknown name is a 404.
    fn model(&self, name: Option<&str>) -> Result<&ServedModel, ApiError> {
        if let [only] = self.models.as_slice() {
            return Ok(only);
        }
        let name = name.ok_or_else(|| ApiError::bad_param("model", "name the model to use"))?;
        self.models
            .iter()
            .find(|m| m.id == name)
            .ok_or_else(|| ApiError {
                code: Some("model_not_found"),
                param: Some("model".into()),
                ..ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    None,
                    format!("the model {name:?} does not exist"),
                )
            })
    }

    fn id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06x}", self.started)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The server's routes over `models` (at least one).
pub fn router(models: Vec<ServedModel>, config: ServerConfig) -> Router {
    let limit = config.max_body_bytes;
    let cors = cors_layer(&config.cors_origins);
    let state: Shared = Arc::new(AppState {
        models,
        config,
        metrics: Metrics::default(),
        started: now_secs(),
        next_id: AtomicU64::new(0),
    });
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authorise,
        ));
    let mut app = Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/", get(chat_page))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), count));
    if let Some(cors) = cors {
        app = app.layer(cors);
    }
    app.with_state(state)
}

fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new().allow_methods(Any).allow_headers(Any);
    Some(if origins.iter().any(|o| o == "*") {
        layer.allow_origin(Any)
    } else {
        let list: Vec<HeaderValue> = origins.iter().filter_map(|o| o.parse().ok()).collect();
        layer.allow_origin(AllowOrigin::list(list))
    })
}

/// Runs `app` on `listener` until `shutdown` resolves; in-flight responses
/// (streams included) finish first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn authorise(State(state): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                Some("invalid_api_key"),
                "a valid API key is needed (Authorization: Bearer <key>)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn count(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let res = next.run(req).await;
    state.metrics.request(&path, res.status().as_u16());
    res
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("unknown_url"),
        "no such endpoint",
    )
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn list_models(State(state): State<Shared>) -> Json<Value> {
    let data: Vec<Value> = state
        .models
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "object": "model",
                "created": state.started,
                "owned_by": "inference-rs",
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn metrics_text(State(state): State<Shared>) -> Response {
    let queues: Vec<(String, inference_core::QueueStatus)> = state
        .models
        .iter()
        .filter_map(|m| m.model.queue_status().map(|q| (m.id.clone(), q)))
        .collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&queues),
    )
        .into_response()
}

async fn chat_page() -> Html<&'static str> {
    Html(include_str!("chat.html"))
}

/// The JSON body, or the OpenAI error for a body that is too large or not
/// JSON of the request's shape (an unknown field named as OpenAI names it).
fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
                "the request body is too large",
            )
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    serde_json::from_value(value).map_err(|e| {
        let text = e.to_string();
        match text
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            Some(field) => ApiError::bad_param(
                field,
                format!("Unrecognized request argument supplied: {field}"),
            ),
            None => ApiError::bad_request(format!("invalid request: {text}")),
        }
    })
}

/// Runs a blocking submit (templating and tokenising may take a while) off
/// the async executor.
async fn submit(
    f: impl FnOnce() -> inference_core::Result<TokenStream> + Send + 'static,
) -> Result<TokenStream, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                e.to_string(),
            )
        })?
        .map_err(ApiError::from)
}

fn finish_name(reason: Option<FinishReason>, calls: bool) -> &'static str {
    match reason {
        _ if calls => "tool_calls",
        Some(FinishReason::Length) => "length",
        _ => "stop",
    }
}

fn usage(m: Option<&GenerateMetrics>) -> Value {
    let (prompt, completion, cached) = m.map_or((0, 0, 0), |m| {
        (m.prompt_tokens, m.generated_tokens, m.cached_prompt_tokens)
    });
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// A token's logprobs in the chat shape.
fn chat_logprob(model: &dyn TextModel, t: &Token) -> Option<Value> {
    let lp = t.logprobs.as_ref()?;
    let text_of = |id: u32| -> String {
        model
            .tokenizer()
            .ok()
            .and_then(|tk| tk.decode(&[id], false).ok())
            .unwrap_or_default()
    };
    Some(json!({
        "token": t.text,
        "logprob": lp.logprob,
        "bytes": t.text.as_bytes(),
        "top_logprobs": lp.top.iter().map(|(id, l)| {
            let s = text_of(*id);
            json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
        }).collect::<Vec<_>>(),
    }))
}

/// What one chat request runs.
struct ChatCall {
    model: Arc<dyn TextModel>,
    model_id: String,
    format: ToolFormat,
    tools: bool,
    /// The start of the reply that the request forced (the model's tokens
    /// continue it).
    prefix: Option<String>,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
}

impl ChatCall {
    /// The parser of this call's reply, which has read the forced start.
    fn parser(&self, id: &str) -> ReplyParser {
        let mut parser = ReplyParser::new(self.format, self.tools, &format!("call_{id}"));
        if let Some(prefix) = &self.prefix {
            // A call's opening says nothing until the call is complete.
            let said = parser.push(prefix);
            debug_assert!(said.is_empty(), "{said:?}");
        }
        parser
    }
}

async fn chat_completions(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_body(body)?;
    api::refuse_chat_fields(&req)?;
    let served = state.model(req.model.as_deref())?;
    let model = Arc::clone(&served.model);
    let info = model.info();
    let messages = api::messages(&req)?;
    let sampling = Sampling {
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        min_p: req.min_p,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        repetition_penalty: req.repetition_penalty,
        logit_bias: req.logit_bias.as_ref(),
        seed: req.seed,
        stop: req.stop.as_ref(),
        n: req.n,
    };
    // No limit asked: up to the end of the context (OpenAI's rule), or the
    // library's default where the context is unknown.
    let unbounded = match info.context_length {
        0 => GenerateOptions::new().max_tokens,
        n => n,
    };
    let mut opts = api::options(&sampling, unbounded)?;
    let (tools, forced) = api::offered_tools(&req)?;
    let offered = !tools.is_empty();
    opts.tools = tools;
    let format = ToolFormat::for_model_type(&info.architecture);
    // A forced call: the reply starts with the call's opening (and the
    // function's name when one is named); the model writes the rest.
    let prefix = match &forced {
        api::Forced::No => None,
        api::Forced::AnyTool => Some(format.call_prefix(None)),
        api::Forced::Tool(name) => Some(format.call_prefix(Some(name))),
    };
    opts.reply_prefix = prefix.clone();
    if let Some(kwargs) = &req.chat_template_kwargs {
        opts.template_args = kwargs.clone().into_iter().collect();
    }
    if req.logprobs == Some(true) {
        opts = opts.logprobs(req.top_logprobs.unwrap_or(0) as usize);
    }
    let call = ChatCall {
        model: Arc::clone(&model),
        model_id: served.id.clone(),
        format,
        tools: offered,
        prefix,
        stream: req.stream == Some(true),
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs: opts.logprobs,
    };
    let started = Instant::now();
    let stream = submit(move || model.chat(&messages, &opts)).await?;
    let id = state.id("chatcmpl");
    if call.stream {
        Ok(chat_stream(state, call, id, stream, started).into_response())
    } else {
        chat_whole(&state, call, id, stream, started).await
    }
}

/// Collects a stream's tokens (up to the request time limit).
async fn collect(
    state: &AppState,
    stream: &mut TokenStream,
    started: Instant,
) -> Result<Vec<Token>, ApiError> {
    let mut tokens = Vec::new();
    let mut first = true;
    loop {
        let next = match state.config.request_timeout {
            Some(limit) => {
                let left = limit.saturating_sub(started.elapsed());
                match tokio::time::timeout(left, stream.recv()).await {
                    Ok(n) => n,
                    Err(_) => {
                        stream.cancel();
                        return Err(timeout_error());
                    }
                }
            }
            None => stream.recv().await,
        };
        match next {
            Some(Ok(t)) => {
                if first {
                    state.metrics.first_token(started.elapsed());
                    first = false;
                }
                tokens.push(t);
            }
            Some(Err(e)) => return Err(e.into()),
            None => return Ok(tokens),
        }
    }
}

fn timeout_error() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        Some("timeout"),
        "the request took longer than the server's time limit",
    )
}

async fn chat_whole(
    state: &AppState,
    call: ChatCall,
    id: String,
    mut stream: TokenStream,
    started: Instant,
) -> Result<Response, ApiError> {
    let tokens = collect(state, &mut stream, started).await?;
    let mut parser = call.parser(&id);
    let mut pieces = Vec::new();
    for t in &tokens {
        pieces.extend(parser.push(&t.text));
    }
    pieces.extend(parser.finish());
    let (mut content, mut reasoning, mut calls) = (String::new(), String::new(), Vec::new());
    for p in pieces {
        match p {
            Piece::Content(c) => content.push_str(&c),
            Piece::Reasoning(r) => reasoning.push_str(&r),
            Piece::Call(c) => calls.push(c),
        }
    }
    state.metrics.usage(stream.metrics());
    let mut message = json!({"role": "assistant", "content": if content.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(content) }});
    if !reasoning.is_empty() {
        message[state.config.reasoning_field.name()] = Value::String(reasoning);
    }
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls.iter().map(openai_call).collect());
    }
    let logprobs = call.logprobs.then(|| {
        json!({"content": tokens.iter().filter_map(|t| chat_logprob(&*call.model, t)).collect::<Vec<_>>()})
    });
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": now_secs(),
        "model": call.model_id,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish_name(stream.finish_reason(), !calls.is_empty()),
        }],
        "usage": usage(stream.metrics()),
    }))
    .into_response())
}

/// A call as OpenAI writes it: the arguments as a JSON string.
fn openai_call(c: &inference_core::ToolCall) -> Value {
    let arguments = match &c.function.arguments {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    json!({
        "id": c.id,
        "type": "function",
        "function": {"name": c.function.name, "arguments": arguments},
    })
}

fn sse(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

/// What a streamed chat reply still has to do.
struct ChatStreamState {
    state: Shared,
    call: ChatCall,
    id: String,
    created: u64,
    stream: TokenStream,
    parser: ReplyParser,
    started: Instant,
    first: bool,
    calls: usize,
    done: bool,
}

impl ChatStreamState {
    fn chunk(&self, delta: Value, logprobs: Option<Value>, finish: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.call.model_id,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        })
    }

    fn pieces(&mut self, pieces: Vec<Piece>, logprobs: Option<Value>) -> Vec<Value> {
        let field = self.state.config.reasoning_field.name();
        let mut out = Vec::new();
        let mut logprobs = logprobs;
        for p in pieces {
            let delta = match p {
                Piece::Content(c) => json!({"content": c}),
                Piece::Reasoning(r) => json!({ field: r }),
                Piece::Call(c) => {
                    let mut call = openai_call(&c);
                    call["index"] = json!(self.calls);
                    self.calls += 1;
                    json!({ "tool_calls": [call] })
                }
            };
            out.push(self.chunk(delta, logprobs.take(), None));
        }
        if let Some(lp) = logprobs {
            // A token whose text is held back still reports its logprob.
            out.push(self.chunk(json!({}), Some(lp), None));
        }
        out
    }
}

fn chat_stream(
    state: Shared,
    call: ChatCall,
    id: String,
    stream: TokenStream,
    started: Instant,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let parser = call.parser(&id);
    let st = ChatStreamState {
        state,
        call,
        id,
        created: now_secs(),
        stream,
        parser,
        started,
        first: true,
        calls: 0,
        done: false,
    };
    let role = st.chunk(json!({"role": "assistant", "content": ""}), None, None);
    let head = futures::stream::iter([sse(&role)]);
    let body = futures::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        let limit = st.state.config.request_timeout;
        let next = match limit {
            Some(l) => {
                let left = l.saturating_sub(st.started.elapsed());
                match tokio::time::timeout(left, st.stream.recv()).await {
                    Ok(n) => n,
                    Err(_) => {
                        st.stream.cancel();
                        st.done = true;
                        let e = timeout_error();
                        let events = vec![sse(&e.body()), Ok(Event::default().data("[DONE]"))];
                        return Some((events, st));
                    }
                }
            }
            None => st.stream.recv().await,
        };
        let events = match next {
            Some(Ok(t)) => {
                if st.first {
                    st.state.metrics.first_token(st.started.elapsed());
                    st.first = false;
                }
                let lp = if st.call.logprobs {
                    chat_logprob(&*st.call.model, &t).map(|v| json!({"content": [v]}))
                } else {
                    None
                };
                let pieces = st.parser.push(&t.text);
                st.pieces(pieces, lp).iter().map(sse).collect()
            }
            Some(Err(e)) => {
                st.done = true;
                let e = ApiError::from(e);
                vec![sse(&e.body()), Ok(Event::default().data("[DONE]"))]
            }
            None => {
                st.done = true;
                let pieces = st.parser.finish();
                let mut out: Vec<Value> = st.pieces(pieces, None);
                let finish = finish_name(st.stream.finish_reason(), st.calls > 0);
                out.push(st.chunk(json!({}), None, Some(finish)));
                st.state.metrics.usage(st.stream.metrics());
                if st.call.include_usage {
                    out.push(json!({
                        "id": st.id,
                        "object": "chat.completion.chunk",
                        "created": st.created,
                        "model": st.call.model_id,
                        "choices": [],
                        "usage": usage(st.stream.metrics()),
                    }));
                }
                let mut events: Vec<Result<Event, Infallible>> = out.iter().map(sse).collect();
                events.push(Ok(Event::default().data("[DONE]")));
                events
            }
        };
        Some((events, st))
    })
    .flat_map(futures::stream::iter);
    Sse::new(head.chain(body)).keep_alive(KeepAlive::default())
}

async fn completions(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(body)?;
    if req.suffix.is_some() {
        return Err(ApiError::bad_param(
            "suffix",
            "suffix (fill in the middle) is not supported",
        ));
    }
    if req.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_param(
            "best_of",
            "only best_of = 1 is supported",
        ));
    }
    if req.logprobs.is_some_and(|n| n > 20) {
        return Err(ApiError::bad_param("logprobs", "must be between 0 and 20"));
    }
    let served = state.model(req.model.as_deref())?;
    let model = Arc::clone(&served.model);
    let sampling = Sampling {
        max_tokens: Some(req.max_tokens.unwrap_or(16)),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        min_p: req.min_p,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        repetition_penalty: req.repetition_penalty,
        logit_bias: req.logit_bias.as_ref(),
        seed: req.seed,
        stop: req.stop.as_ref(),
        n: req.n,
    };
    let mut opts = api::options(&sampling, 16)?;
    if let Some(n) = req.logprobs {
        opts = opts.logprobs(n as usize);
    }
    let prompt = match req.prompt {
        Prompt::Text(t) => Ok(t),
        Prompt::Ids(ids) => Err(ids),
        Prompt::Texts(mut v) if v.len() == 1 => Ok(v.remove(0)),
        Prompt::IdLists(mut v) if v.len() == 1 => Err(v.remove(0)),
        _ => {
            return Err(ApiError::bad_param(
                "prompt",
                "one prompt per request (a batch of prompts is not supported)",
            ))
        }
    };
    let echo = req.echo == Some(true);
    let echo_text = match (&prompt, echo) {
        (Ok(t), true) => t.clone(),
        (Err(ids), true) => model
            .tokenizer()
            .and_then(|t| t.decode(ids, false))
            .map_err(ApiError::from)?,
        (_, false) => String::new(),
    };
    let started = Instant::now();
    let submit_model = Arc::clone(&model);
    let submit_opts = opts.clone();
    let mut stream = submit(move || match prompt {
        Ok(text) => submit_model.generate(&text, &submit_opts),
        Err(ids) => submit_model.generate_ids(ids, &submit_opts),
    })
    .await?;
    let id = state.id("cmpl");
    let model_id = served.id.clone();
    let created = now_secs();
    let logprobs = opts.logprobs;
    let lp_of = |model: &dyn TextModel, t: &Token, offset: usize| -> Value {
        let Some(lp) = &t.logprobs else {
            return Value::Null;
        };
        let mut top = serde_json::Map::new();
        for (id, l) in &lp.top {
            let s = model
                .tokenizer()
                .ok()
                .and_then(|tk| tk.decode(&[*id], false).ok())
                .unwrap_or_default();
            top.insert(s, json!(l));
        }
        json!({"tokens": [t.text], "token_logprobs": [lp.logprob], "top_logprobs": [top], "text_offset": [offset]})
    };
    if req.stream != Some(true) {
        let tokens = collect(&state, &mut stream, started).await?;
        state.metrics.usage(stream.metrics());
        let mut text = echo_text.clone();
        let mut lps =
            json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
        for t in &tokens {
            if logprobs {
                let one = lp_of(&*model, t, text.len());
                for k in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                    if let (Some(all), Some(v)) = (lps[k].as_array_mut(), one[k].get(0)) {
                        all.push(v.clone());
                    }
                }
            }
            text.push_str(&t.text);
        }
        return Ok(Json(json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model_id,
            "choices": [{
                "text": text,
                "index": 0,
                "logprobs": if logprobs { lps } else { Value::Null },
                "finish_reason": finish_name(stream.finish_reason(), false),
            }],
            "usage": usage(stream.metrics()),
        }))
        .into_response());
    }
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let chunk = move |text: &str, lp: Value, finish: Option<&str>| {
        json!({
            "id": id, "object": "text_completion", "created": created, "model": model_id,
            "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}],
        })
    };
    let head: Vec<Result<Event, Infallible>> = if echo_text.is_empty() {
        Vec::new()
    } else {
        vec![sse(&chunk(&echo_text, Value::Null, None))]
    };
    let st = (state, stream, false, echo_text.len(), true);
    let body = futures::stream::unfold(
        st,
        move |(state, mut stream, done, mut offset, mut first)| {
            let chunk = chunk.clone();
            let model = Arc::clone(&model);
            async move {
                if done {
                    return None;
                }
                let events = match stream.recv().await {
                    Some(Ok(t)) => {
                        if first {
                            state.metrics.first_token(started.elapsed());
                            first = false;
                        }
                        let lp = if logprobs {
                            lp_of(&*model, &t, offset)
                        } else {
                            Value::Null
                        };
                        offset += t.text.len();
                        vec![sse(&chunk(&t.text, lp, None))]
                    }
                    Some(Err(e)) => {
                        let e = ApiError::from(e);
                        vec![sse(&e.body()), Ok(Event::default().data("[DONE]"))]
                    }
                    None => {
                        state.metrics.usage(stream.metrics());
                        let mut out = vec![sse(&chunk(
                            "",
                            Value::Null,
                            Some(finish_name(stream.finish_reason(), false)),
                        ))];
                        if include_usage {
                            let mut u = chunk("", Value::Null, None);
                            u["choices"] = json!([]);
                            u["usage"] = usage(stream.metrics());
                            out.push(sse(&u));
                        }
                        out.push(Ok(Event::default().data("[DONE]")));
                        return Some((out, (state, stream, true, offset, first)));
                    }
                };
                let done = events.len() > 1;
                Some((events, (state, stream, done, offset, first)))
            }
        },
    )
    .flat_map(futures::stream::iter);
    Ok(Sse::new(futures::stream::iter(head).chain(body))
        .keep_alive(KeepAlive::default())
        .into_response())
}

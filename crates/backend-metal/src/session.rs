//! Chat sessions that keep their KV cache between turns.
//!
//! A [`MlxChatSession`] holds the conversation on the caller's side and its KV
//! cache on the model's worker (a map from session id to [`SessionCache`]),
//! so MLX is only touched on the worker. Each turn renders the whole
//! conversation with the chat template and encodes it; when those ids extend
//! the ids the cache holds (the previous turn's prompt and the reply ids fed
//! back through the model), only the new suffix is prefilled; otherwise the
//! turn starts from an empty cache. Either way the reply is the one a fresh
//! [`chat`](inference_core::TextModel::chat) with the full history gives.
//! The cache is kept only after a turn that ends on a stop or on
//! `max_tokens`; a cancelled or failed turn leaves the conversation as it
//! was and the next turn prefills in full. Dropping or resetting the session
//! frees its cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use inference_core::{
    ChatSession, Error, FinishReason, GenerateMetrics, GenerateOptions, HistoryOverflow, Message,
    Result, Role, TokenStream,
};

use crate::cache::LayerCache;
use crate::engine::{check_generate_options, Job, Shared, Worker};
use crate::generate::{self, Request, Turn};
use crate::models::CausalLm;

/// Session ids, unique in the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A session's KV cache on the worker and the ids it holds.
pub(crate) struct SessionCache {
    caches: Vec<LayerCache>,
    ids: Vec<u32>,
}

/// The conversation, with a counter that a reset advances (a turn that
/// finishes after a reset does not join the new conversation).
struct History {
    epoch: u64,
    messages: Vec<Message>,
}

/// What a session and its turns on the worker share.
struct SessionState {
    history: Mutex<History>,
    /// A turn is queued or streaming.
    busy: AtomicBool,
}

impl SessionState {
    /// The conversation, locked (a poisoned lock still holds it).
    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One turn, ready to run on the worker.
pub(crate) struct TurnJob {
    id: u64,
    epoch: u64,
    /// The user message joining the history (none for an [`IdSession`]).
    user: Option<Message>,
    req: Request,
    state: Arc<SessionState>,
}

/// What both kinds of session hold: an id, the model's worker, and the
/// state the worker's turns share with the caller.
struct SessionCore {
    id: u64,
    shared: Arc<Shared>,
    worker: Arc<Worker>,
    vocab: usize,
    state: Arc<SessionState>,
}

impl SessionCore {
    fn new(shared: Arc<Shared>, worker: Arc<Worker>, vocab: usize) -> Self {
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            shared,
            worker,
            vocab,
            state: Arc::new(SessionState {
                history: Mutex::new(History {
                    epoch: 0,
                    messages: Vec::new(),
                }),
                busy: AtomicBool::new(false),
            }),
        }
    }

    /// Refused with `InvalidInput` while the previous turn still streams.
    fn check_idle(&self) -> Result<()> {
        if self.state.busy.load(Ordering::Acquire) {
            return Err(Error::InvalidInput(
                "the previous turn of this session is still streaming".into(),
            ));
        }
        Ok(())
    }

    /// Queues a turn on `prompt`; `user` joins the history with the reply
    /// (for a conversation of this `epoch`).
    fn submit(
        &self,
        prompt: Vec<u32>,
        user: Option<Message>,
        epoch: u64,
        opts: &GenerateOptions,
    ) -> Result<TokenStream> {
        self.shared.check_prompt(&prompt, self.vocab)?;
        let (sink, stream) = TokenStream::channel();
        self.state.busy.store(true, Ordering::Release);
        let job = Job::Turn(TurnJob {
            id: self.id,
            epoch,
            user,
            req: Request {
                prompt,
                opts: opts.clone(),
                sink,
                queued: Instant::now(),
            },
            state: Arc::clone(&self.state),
        });
        if self.worker.send(job).is_err() {
            self.state.busy.store(false, Ordering::Release);
            return Err(Error::backend(crate::NAME, "the model worker has stopped"));
        }
        Ok(stream)
    }

    /// Frees the session's cache on the worker.
    fn end(&self) {
        // A worker that has stopped holds no cache to free.
        let _ = self.worker.send(Job::EndSession(self.id));
    }
}

impl Drop for SessionCore {
    fn drop(&mut self) {
        self.end();
    }
}

/// A chat session on an [`MlxModel`](crate::MlxModel).
pub(crate) struct MlxChatSession {
    core: SessionCore,
    overflow: HistoryOverflow,
    /// Turns dropped so far to fit the context.
    dropped: usize,
}

impl MlxChatSession {
    /// An empty session sending its turns to `worker`.
    pub(crate) fn new(shared: Arc<Shared>, worker: Arc<Worker>, vocab: usize) -> Self {
        Self {
            core: SessionCore::new(shared, worker, vocab),
            overflow: HistoryOverflow::default(),
            dropped: 0,
        }
    }
}

/// Removes the oldest turn of `messages` (the first message after the
/// leading system messages, and every message up to the next user message);
/// `false` when there is no turn to drop.
fn drop_oldest_turn(messages: &mut Vec<Message>) -> bool {
    let Some(first) = messages.iter().position(|m| m.role != Role::System) else {
        return false;
    };
    let end = messages[first + 1..]
        .iter()
        .position(|m| m.role == Role::User)
        .map_or(messages.len(), |i| first + 1 + i);
    messages.drain(first..end);
    true
}

impl ChatSession for MlxChatSession {
    /// Adds `user` and streams the reply. The user message and the reply join
    /// the history together when the reply's stream ends on a stop or on
    /// `max_tokens`. Refused with `InvalidInput` while the previous reply is
    /// still streaming.
    fn send(&mut self, user: &str, opts: &GenerateOptions) -> Result<TokenStream> {
        check_generate_options(opts)?;
        self.core.check_idle()?;
        let (epoch, mut messages) = {
            let h = self.core.state.history();
            (h.epoch, h.messages.clone())
        };
        let user = Message::user(user);
        let limit = self.core.shared.context_limit();
        let mut dropped = 0;
        let prompt = loop {
            messages.push(user.clone());
            let prompt = self.core.shared.encode_chat(&messages, opts)?;
            messages.pop();
            // `check_prompt` refuses a prompt that leaves no room for a token.
            if prompt.len() < limit
                || self.overflow == HistoryOverflow::Error
                || !drop_oldest_turn(&mut messages)
            {
                break prompt;
            }
            dropped += 1;
        };
        if dropped > 0 {
            // Checked before the history changes: a refused prompt drops
            // nothing.
            self.core.shared.check_prompt(&prompt, self.core.vocab)?;
            tracing::info!(
                dropped,
                kept_messages = messages.len(),
                "the conversation outgrew the context: dropped its oldest turns"
            );
            let mut h = self.core.state.history();
            if h.epoch == epoch {
                h.messages = messages;
            }
            self.dropped += dropped;
        }
        self.core.submit(prompt, Some(user), epoch, opts)
    }

    fn set_history_overflow(&mut self, overflow: HistoryOverflow) -> Result<()> {
        self.overflow = overflow;
        Ok(())
    }

    fn dropped_turns(&self) -> usize {
        self.dropped
    }

    fn history(&self) -> Vec<Message> {
        self.core.state.history().messages.clone()
    }

    fn reset(&mut self, system: Option<&str>) {
        {
            let mut h = self.core.state.history();
            h.epoch += 1;
            h.messages = system.map(Message::system).into_iter().collect();
        }
        self.core.end();
    }
}

/// A session driven by token ids: each [`send`](IdSession::send) takes the
/// whole conversation as ids (templated by the caller) and reuses the KV
/// cache for the longest prefix it shares with the ids the previous turn
/// left behind (its prompt and the reply ids fed back through the model),
/// exactly as a [`ChatSession`] turn does after templating. Dropping the
/// session frees its cache.
pub struct IdSession {
    core: SessionCore,
}

impl IdSession {
    /// An empty session sending its turns to `worker`.
    pub(crate) fn new(shared: Arc<Shared>, worker: Arc<Worker>, vocab: usize) -> Self {
        Self {
            core: SessionCore::new(shared, worker, vocab),
        }
    }

    /// Streams the continuation of `ids`, the whole conversation so far.
    /// Refused with `InvalidInput` while the previous turn is still
    /// streaming, for no ids, or for ids outside the vocabulary.
    pub fn send(&mut self, ids: Vec<u32>, opts: &GenerateOptions) -> Result<TokenStream> {
        check_generate_options(opts)?;
        self.core.check_idle()?;
        self.core.submit(ids, None, 0, opts)
    }

    /// Forgets the cached state; the next turn prefills in full.
    pub fn reset(&mut self) {
        self.core.end();
    }
}

/// The session's caches cut back to the longest prefix they share with
/// `prompt` (leaving at least one prompt id to prefill), and that prefix's
/// length; `None` when nothing can be reused.
fn reuse(mut cache: SessionCache, prompt: &[u32]) -> Option<(Vec<LayerCache>, usize)> {
    let common = cache
        .ids
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count()
        .min(prompt.len().saturating_sub(1));
    tracing::debug!(common, cached = cache.ids.len(), "chat session prefix");
    if common == 0 {
        return None;
    }
    let n = i32::try_from(common).ok()?;
    for c in &mut cache.caches {
        match c.trim_to(n) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "cannot trim a session cache");
                return None;
            }
        }
    }
    Some((cache.caches, common))
}

/// Runs one turn on the worker: on the session's cache when the prompt
/// extends the ids it holds, else on empty caches; keeps the cache and
/// extends the history when the turn ends well. Returns the turn's metrics.
pub(crate) fn run(
    model: &dyn CausalLm,
    shared: &Shared,
    sessions: &mut HashMap<u64, SessionCache>,
    job: TurnJob,
) -> GenerateMetrics {
    let TurnJob {
        id,
        epoch,
        user,
        req,
        state,
    } = job;
    let prompt = &req.prompt;
    let bounds = shared.bounds();
    let (caches, cached) = match sessions.remove(&id).and_then(|c| reuse(c, prompt)) {
        Some(reused) => reused,
        None => (model.new_caches(bounds.context), 0),
    };
    tracing::debug!(
        session = id,
        cached,
        prompt_tokens = prompt.len(),
        "chat session turn"
    );
    shared.note_reused(cached);
    let mut turn = Turn {
        caches,
        cached,
        sampled: Vec::new(),
        reply: String::new(),
    };
    let outcome = generate::run_turn(model, &shared.tokenizer, &req, bounds, Some(&mut turn));
    if matches!(outcome.end, Ok(FinishReason::Stop | FinishReason::Length)) {
        let offset = turn
            .caches
            .first()
            .map_or(0, |c| usize::try_from(c.offset()).unwrap_or(0));
        if offset >= prompt.len() && offset <= prompt.len() + turn.sampled.len() {
            let mut ids = prompt.clone();
            ids.extend_from_slice(&turn.sampled[..offset - prompt.len()]);
            sessions.insert(
                id,
                SessionCache {
                    caches: turn.caches,
                    ids,
                },
            );
        }
        let mut h = state.history();
        if let (true, Some(user)) = (h.epoch == epoch, user) {
            h.messages.push(user);
            h.messages.push(Message::assistant(turn.reply));
        }
    }
    state.busy.store(false, Ordering::Release);
    let metrics = outcome.metrics.clone();
    match outcome.end {
        Ok(reason) => req.sink.finish(outcome.metrics, reason),
        Err(e) => req.sink.fail(e),
    }
    metrics
}

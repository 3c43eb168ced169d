//! Chat sessions that keep their KV cache between turns.
//!
//! A [`MlxChatSession`] holds the conversation on the caller's side (an
//! [`inference_runtime::session::Conversation`], which also decides what to
//! drop when it outgrows the context) and its KV cache on the model's worker
//! (a map from session id to [`SessionCache`]), so MLX is only touched on the
//! worker. Each turn renders the whole
//! conversation with the chat template and encodes it; when those ids extend
//! the ids the cache holds (the previous turn's prompt and the reply ids fed
//! back through the model), only the new suffix is prefilled; otherwise the
//! turn starts from an empty cache. Either way the reply is the one a fresh
//! [`chat`](inference_core::TextModel::chat) with the full history gives
//! (the prefix rule is `inference_runtime::session`'s).
//! The cache is kept only after a turn that ends on a stop or on
//! `max_tokens`; a cancelled or failed turn leaves the conversation as it
//! was and the next turn prefills in full. Dropping or resetting the session
//! frees its cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use inference_core::{ChatSession, GenerateOptions, HistoryOverflow, Message, Result, TokenStream};
use inference_runtime::session::{reusable_prefix, Conversation, Turn as SessionTurn};

use crate::cache::LayerCache;
use crate::generate::Request;
use crate::worker::{check_generate_options, Job, Shared, TurnJob, Worker};

/// Session ids, unique in the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A session's KV cache on the worker and the ids it holds.
pub(crate) struct SessionCache {
    /// One cache per layer.
    pub(crate) caches: Vec<LayerCache>,
    /// The ids they hold.
    pub(crate) ids: Vec<u32>,
}

/// What both kinds of session hold: an id, the model's worker, and the
/// conversation.
struct SessionCore {
    id: u64,
    shared: Arc<Shared>,
    worker: Arc<Worker>,
    vocab: usize,
    conversation: Conversation,
}

impl SessionCore {
    fn new(shared: Arc<Shared>, worker: Arc<Worker>, vocab: usize) -> Self {
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            shared,
            worker,
            vocab,
            conversation: Conversation::new(),
        }
    }

    /// Queues `turn` on `prompt` (already checked).
    fn submit(
        &self,
        prompt: Vec<u32>,
        turn: SessionTurn,
        opts: &GenerateOptions,
    ) -> Result<TokenStream> {
        self.shared.enter_queue(1)?;
        let (sink, stream) = TokenStream::channel();
        // A job the worker never takes drops its turn, which makes the
        // session idle again.
        let sent = self.worker.send(Job::Turn(TurnJob {
            id: self.id,
            req: Request {
                prompt,
                opts: opts.clone(),
                sink,
                queued: Instant::now(),
            },
            turn,
        }));
        if sent.is_err() {
            self.shared.left_queue();
        }
        sent?;
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
}

impl MlxChatSession {
    /// An empty session sending its turns to `worker`.
    pub(crate) fn new(shared: Arc<Shared>, worker: Arc<Worker>, vocab: usize) -> Self {
        Self {
            core: SessionCore::new(shared, worker, vocab),
        }
    }
}

impl ChatSession for MlxChatSession {
    /// Adds `user` and streams the reply. The user message and the reply join
    /// the history together when the reply's stream ends on a stop or on
    /// `max_tokens`. Refused with `InvalidInput` while the previous reply is
    /// still streaming.
    fn send(&mut self, user: &str, opts: &GenerateOptions) -> Result<TokenStream> {
        check_generate_options(opts, self.core.vocab)?;
        if opts.reply_prefix.is_some() {
            return Err(inference_core::Error::unsupported(
                "reply_prefix in chat sessions (the history keeps what the model said)",
            ));
        }
        let core = &mut self.core;
        let shared = &core.shared;
        let vocab = core.vocab;
        let (prompt, turn) = core.conversation.begin_turn(
            user,
            shared.context_limit(),
            |messages| shared.encode_chat(messages, opts),
            |prompt| shared.check_prompt(prompt, vocab),
        )?;
        core.submit(prompt, turn, opts)
    }

    fn set_history_overflow(&mut self, overflow: HistoryOverflow) -> Result<()> {
        self.core.conversation.set_overflow(overflow);
        Ok(())
    }

    fn dropped_turns(&self) -> usize {
        self.core.conversation.dropped_turns()
    }

    fn history(&self) -> Vec<Message> {
        self.core.conversation.history()
    }

    fn reset(&mut self, system: Option<&str>) {
        self.core.conversation.reset(system);
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
        check_generate_options(opts, self.core.vocab)?;
        self.core.conversation.check_idle()?;
        self.core.shared.check_prompt(&ids, self.core.vocab)?;
        let turn = self.core.conversation.begin_id_turn()?;
        self.core.submit(ids, turn, opts)
    }

    /// Forgets the cached state; the next turn prefills in full.
    pub fn reset(&mut self) {
        self.core.end();
    }
}

/// The session's caches cut back to the longest prefix they share with
/// `prompt` (as [`reusable_prefix`] rules), and that prefix's length;
/// `None` when nothing can be reused.
pub(crate) fn reuse(mut cache: SessionCache, prompt: &[u32]) -> Option<(Vec<LayerCache>, usize)> {
    let common = reusable_prefix(&cache.ids, prompt);
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

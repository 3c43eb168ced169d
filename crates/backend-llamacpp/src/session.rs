//! Chat sessions whose KV cache stays in llama.cpp between turns.
//!
//! The conversation lives on the caller's side (an
//! [`inference_runtime::session::Conversation`], which also drops the
//! oldest turns when it outgrows the context); each turn renders the whole
//! conversation with the chat template, and the worker prefills only what
//! the cached sequence does not already hold (the shared prefix rule of
//! `inference_runtime::session`). The reply is the one a fresh `chat` with
//! the whole history gives.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use inference_core::{
    ChatSession, GenerateOptions, HistoryOverflow, Message, RenderOptions, Result, TokenStream,
    Tokenizer,
};
use inference_runtime::session::Conversation;
use inference_runtime::{check, Worker};

use crate::options::check_generate_options;
use crate::worker::{Job, Request, Shared};

/// Session ids, unique in the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A chat session on a [`LlamaCppModel`](crate::LlamaCppModel); it keeps
/// the model's worker alive while it lives.
pub(crate) struct LlamaChatSession {
    id: u64,
    shared: Arc<Shared>,
    worker: Arc<Worker<Job>>,
    conversation: Conversation,
}

impl LlamaChatSession {
    pub(crate) fn new(shared: Arc<Shared>, worker: Arc<Worker<Job>>) -> Self {
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            shared,
            worker,
            conversation: Conversation::new(),
        }
    }

    /// Drops the session's cache on the worker.
    fn end(&self) {
        // A worker that has stopped holds no cache.
        let _ = self.worker.send(Job::EndSession(self.id));
    }
}

impl Drop for LlamaChatSession {
    fn drop(&mut self) {
        self.end();
    }
}

impl ChatSession for LlamaChatSession {
    /// Adds `user` and streams the reply; the two join the history when the
    /// reply ends on a stop or on `max_tokens`. Refused with `InvalidInput`
    /// while the previous reply is still streaming.
    fn send(&mut self, user: &str, opts: &GenerateOptions) -> Result<TokenStream> {
        let shared = &self.shared;
        check_generate_options(opts, shared.vocab)?;
        if opts.reply_prefix.is_some() {
            return Err(inference_core::Error::unsupported(
                "reply_prefix in chat sessions (the history keeps what the model said)",
            ));
        }
        let render = RenderOptions::for_chat(opts);
        let (prompt, turn) = self.conversation.begin_turn(
            user,
            shared.n_ctx,
            |messages| shared.text.encode_chat(messages, &render),
            |prompt| check::prompt(prompt, shared.vocab, shared.n_ctx),
        )?;
        let (sink, stream) = TokenStream::channel();
        self.worker.send(Job::Turn {
            session: self.id,
            req: Request {
                prompt,
                opts: opts.clone(),
                sink,
                queued: Instant::now(),
            },
            turn,
        })?;
        Ok(stream)
    }

    fn history(&self) -> Vec<Message> {
        self.conversation.history()
    }

    fn reset(&mut self, system: Option<&str>) {
        self.conversation.reset(system);
        self.end();
    }

    fn set_history_overflow(&mut self, overflow: HistoryOverflow) -> Result<()> {
        self.conversation.set_overflow(overflow);
        Ok(())
    }

    fn dropped_turns(&self) -> usize {
        self.conversation.dropped_turns()
    }
}

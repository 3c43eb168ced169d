//! What the caller's side of a model and its worker share: the jobs the
//! worker runs, the state both read, and the checks every call makes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;

use inference_core::{
    ClassifyResult, Error, GenerateMetrics, GenerateOptions, LastMetrics, Message, ParameterCounts,
    Result,
};
use inference_runtime::check;
use inference_text::{ChatTokenizer, ModelTokenizer};

use crate::cache::Rotation;
use crate::generate::{self, Request};

/// Work for the model's worker.
pub(crate) enum Job {
    /// A streamed generation.
    Generate(Request),
    /// The last-position logits of a prompt.
    Logits {
        ids: Vec<u32>,
        reply: Sender<Result<Vec<f32>>>,
    },
    /// The log-probability of each prompt id after the ones before it.
    Score {
        ids: Vec<u32>,
        reply: Sender<Result<Vec<f32>>>,
    },
    /// The next token of each prompt, from one batched forward pass.
    Classify {
        prompts: Vec<Vec<u32>>,
        opts: GenerateOptions,
        reply: Sender<Result<Vec<ClassifyResult>>>,
    },
    /// One turn of a chat session, on the session's KV cache.
    Turn(TurnJob),
    /// A chat session ended or was reset: its KV cache is freed.
    EndSession(u64),
    /// Fine-tuning: adapters applied, trained, evaluated or saved.
    Tune(crate::tune::TuneJob),
}

/// One chat-session turn, ready to run on the worker.
pub(crate) struct TurnJob {
    /// The session.
    pub(crate) id: u64,
    /// The generation.
    pub(crate) req: Request,
    /// The conversation's side of the turn: committed when it ends well,
    /// and the session is idle again once it is dropped.
    pub(crate) turn: inference_runtime::session::Turn,
}

/// The model's worker: a thread that builds the model, owns every MLX
/// array of it and runs its [`Job`]s in order (see
/// [`inference_runtime::Worker`] for when it stops).
pub(crate) type Worker = inference_runtime::Worker<Job>;

/// What the caller's side and the worker share.
pub(crate) struct Shared {
    /// The tokenizer and the chat template (the model's or a built-in one),
    /// or why `chat` cannot run.
    pub(crate) text: ChatTokenizer,
    /// Most positions (prompt + generated) one call may use: the model's
    /// `max_position_embeddings`, or unbounded where the load allowed
    /// positions past it.
    pub(crate) context_limit: usize,
    /// `LoadOptions::context_len` and `sink_tokens`: what each cache keeps.
    pub(crate) context: Option<Rotation>,
    pub(crate) last_metrics: LastMetrics,
    /// Prompt tokens per prefill forward pass.
    pub(crate) prefill_chunk: AtomicUsize,
    /// Prompt tokens chat-session turns took from their KV caches.
    pub(crate) reused_tokens: AtomicUsize,
    /// Parameters of the base model (set once it is built).
    pub(crate) base_parameters: std::sync::atomic::AtomicU64,
    /// Parameters with the adapters, once there are adapters.
    pub(crate) parameter_counts: std::sync::Mutex<Option<ParameterCounts>>,
    /// Generations sent to the worker that have not started yet.
    pub(crate) queued: AtomicUsize,
    /// `LoadOptions::max_queue`.
    pub(crate) max_queue: Option<usize>,
    /// What the scheduler has done.
    pub(crate) counters: crate::scheduler::Counters,
    /// On a tensor-parallel follower: how following rank 0 ended, once it
    /// has (`MlxModel::follow` waits for it).
    pub(crate) following: (
        std::sync::Mutex<Option<Result<(), String>>>,
        std::sync::Condvar,
    ),
}

impl Shared {
    /// A follower stopped following rank 0: `Ok` when rank 0 shut down.
    pub(crate) fn end_following(&self, how: Result<(), String>) {
        let (state, changed) = &self.following;
        *state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(how);
        changed.notify_all();
    }

    /// Waits until the follower stops following rank 0.
    pub(crate) fn wait_following(&self) -> Result<(), String> {
        let (state, changed) = &self.following;
        let mut s = state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(how) = s.as_ref() {
                return how.clone();
            }
            s = changed
                .wait(s)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Counts a call the worker made itself (a follower's, from rank 0) as
    /// waiting, as a caller's call is; never refused.
    pub(crate) fn enter_queue_unbounded(&self) {
        self.queued.fetch_add(1, Ordering::AcqRel);
    }

    /// The tokenizer.
    pub(crate) fn tokenizer(&self) -> &ModelTokenizer {
        self.text.tokenizer()
    }

    /// Most positions one call may use.
    pub(crate) fn context_limit(&self) -> usize {
        self.context_limit
    }

    /// How calls are bounded now.
    pub(crate) fn bounds(&self) -> generate::Bounds {
        generate::Bounds {
            limit: self.context_limit,
            context: self.context,
            chunk: self.prefill_chunk.load(Ordering::Relaxed),
        }
    }
}

impl Shared {
    /// Refuses a prompt that is empty, holds ids outside a vocabulary of
    /// `vocab` ids, or leaves no room for a token in the context.
    pub(crate) fn check_prompt(&self, prompt: &[u32], vocab: usize) -> Result<()> {
        check::prompt(prompt, vocab, self.context_limit)
    }

    /// The prompt ids [`chat`](TextModel::chat) runs for `messages`.
    pub(crate) fn encode_chat(
        &self,
        messages: &[Message],
        opts: &GenerateOptions,
    ) -> Result<Vec<u32>> {
        inference_core::Tokenizer::encode_chat(
            &self.text,
            messages,
            &inference_core::RenderOptions::for_chat(opts),
        )
    }

    /// Counts `n` more generations waiting to start, refusing them with
    /// [`Error::Busy`] when the queue would outgrow `max_queue`.
    pub(crate) fn enter_queue(&self, n: usize) -> Result<()> {
        let now = self.queued.fetch_add(n, Ordering::AcqRel);
        if let Some(limit) = self.max_queue {
            if now + n > limit {
                self.queued.fetch_sub(n, Ordering::AcqRel);
                return Err(Error::Busy {
                    waiting: now,
                    limit,
                });
            }
        }
        Ok(())
    }

    /// Counts a generation that left the queue (it started, or ended
    /// without starting).
    pub(crate) fn left_queue(&self) {
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Counts `tokens` prompt tokens a session turn did not prefill.
    pub(crate) fn note_reused(&self, tokens: usize) {
        self.reused_tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    pub(crate) fn parameter_counts(&self) -> Option<ParameterCounts> {
        *self
            .parameter_counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn set_parameter_counts(&self, counts: Option<ParameterCounts>) {
        *self
            .parameter_counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = counts;
    }

    pub(crate) fn set_metrics(&self, metrics: &GenerateMetrics) {
        self.last_metrics.set(metrics);
    }
}

/// Refuses generation options that are invalid or that generation does not
/// implement. Every sampling option is honoured (see `sample.rs`);
/// `template_args` and `tools` are used by `chat` and refused by `generate`.
pub(crate) fn check_generate_options(opts: &GenerateOptions, vocab: usize) -> Result<()> {
    opts.validate()?;
    if opts.return_logits {
        return Err(Error::unsupported("return_logits for generate"));
    }
    check::logit_bias_in_vocab(opts, vocab)
}

//! Decoding on llama.cpp. Every call is a set of rows, one llama.cpp
//! sequence each: each prompt is prefilled in batches of up to [`BATCH`]
//! tokens of its own (as it would be alone: llama.cpp's CPU kernels depend
//! on a batch's size, and a batch row must give what `generate` gives),
//! then the rows step together, one token per live row per decode (at most
//! [`ROWS`] tokens, a size whose kernels are those of a single token), until
//! each ends. A single generation is one row; a batch is
//! up to [`ROWS`] rows at a time; `classify` is a prefill whose last
//! positions are sampled once.
//!
//! The KV cache is unified: every sequence draws on the context's `n_ctx`
//! positions. A chat session's cache stays in sequence [`SESSION_SEQ`]
//! between its turns (one session's at a time: another session's turn, or
//! a call that needs the room, drops it, and that session's next turn
//! prefills in full).

use std::sync::Arc;
use std::time::Instant;

use inference_core::{
    BatchResult, ClassifyResult, Error, FinishReason, GenerateMetrics, GenerateOptions, Result,
    Token, TokenSink,
};
use inference_runtime::logprobs::{logprob_of, token_logprobs};
use inference_runtime::session::{cached_ids, reusable_prefix, Turn};
use inference_runtime::{stream_tokens, Clock, Sequence};
use inference_text::StreamDecoder;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use crate::options::{BATCH, ROWS, SCORED_BATCH, SESSION_SEQ};
use crate::sampler::Sampler;
use crate::worker::{Request, Shared};
use crate::NAME;

fn engine_error(e: impl std::fmt::Display) -> Error {
    Error::backend(NAME, e.to_string())
}

/// The chat session whose cache sequence [`SESSION_SEQ`] holds, and the
/// ids in it.
struct Resident {
    session: u64,
    ids: Vec<u32>,
}

/// Where a row's tokens go.
enum Out<'a> {
    /// To a stream, the text also kept for a session's history.
    Stream {
        sink: &'a TokenSink,
        reply: Option<String>,
    },
    /// Into a batch result.
    Collect(Vec<Token>),
    /// Nowhere: `classify` keeps the first pick.
    Pick {
        keep_logits: bool,
        picked: Option<(u32, Option<Vec<f32>>)>,
    },
}

/// One sequence of a call.
struct Row<'a> {
    seq: i32,
    prompt: &'a [u32],
    /// Prompt ids already in the cache (a session's reused prefix).
    start: usize,
    /// The next position to write.
    pos: usize,
    steps: Sequence<StreamDecoder<'a>>,
    sampler: Sampler,
    opts: &'a GenerateOptions,
    out: Out<'a>,
    ready: Vec<Token>,
    /// The id to feed at the next step.
    next: Option<u32>,
    /// Every id read back.
    sampled: Vec<u32>,
    /// Prompt log-probabilities being gathered.
    scores: Option<Vec<f32>>,
    end: Option<Result<FinishReason>>,
}

impl<'a> Row<'a> {
    fn new(
        shared: &'a Shared,
        seq: i32,
        prompt: &'a [u32],
        opts: &'a GenerateOptions,
        out: Out<'a>,
        row: u64,
    ) -> Self {
        let tokenizer = shared.tokenizer();
        Row {
            seq,
            prompt,
            start: 0,
            pos: 0,
            steps: Sequence::new(
                opts,
                &tokenizer.eos,
                StreamDecoder::new(&tokenizer.inner, prompt),
            ),
            sampler: Sampler::new(opts, shared.vocab, shared.n_ctx, prompt, row),
            opts,
            out,
            ready: Vec::new(),
            next: None,
            sampled: Vec::new(),
            scores: None,
            end: None,
        }
    }

    fn cancelled(&self) -> bool {
        matches!(&self.out, Out::Stream { sink, .. } if sink.is_cancelled())
    }

    /// Hands the ready tokens on; `false` when a stream's consumer is gone.
    fn emit(&mut self) -> bool {
        match &mut self.out {
            Out::Stream { sink, reply } => stream_tokens(sink, &mut self.ready, reply.as_mut()),
            Out::Collect(tokens) => {
                tokens.append(&mut self.ready);
                true
            }
            Out::Pick { .. } => {
                self.ready.clear();
                true
            }
        }
    }

    /// The prompt's log-probabilities are complete: they go to the stream.
    fn send_scores(&mut self) {
        if let (Some(scores), Out::Stream { sink, .. }) = (self.scores.take(), &self.out) {
            if sink.prompt_logprobs(scores).is_err() {
                self.end = Some(Ok(FinishReason::Cancelled));
            }
        }
    }

    /// One step: draws the next id from `logits` and passes it through the
    /// row's bookkeeping, ending the row when it stops, reaches
    /// `max_tokens` or the end of a context of `n_ctx` positions, or its
    /// consumer goes.
    fn take(&mut self, logits: &[f32], n_ctx: usize, clock: &mut Clock) {
        if self.end.is_some() {
            return;
        }
        if self.cancelled() {
            self.end = Some(Ok(FinishReason::Cancelled));
            return;
        }
        let id = self.sampler.sample(logits);
        clock.token();
        if let Out::Pick {
            keep_logits,
            picked,
        } = &mut self.out
        {
            *picked = Some((id, keep_logits.then(|| logits.to_vec())));
            self.end = Some(Ok(FinishReason::Length));
            return;
        }
        let lp = self
            .opts
            .logprobs
            .then(|| token_logprobs(logits, id, self.opts.top_logprobs));
        self.sampled.push(id);
        let more = self.steps.generated() + 1 < self.opts.max_tokens && self.pos + 1 < n_ctx;
        let end = match self.steps.push_scored(id, lp, !more, &mut self.ready) {
            Ok(end) => end,
            Err(e) => {
                self.end = Some(Err(engine_error(e)));
                return;
            }
        };
        if !self.emit() {
            self.end = Some(Ok(FinishReason::Cancelled));
        } else if let Some(reason) = end {
            self.end = Some(Ok(reason));
        } else if !more {
            self.steps.finish(&mut self.ready);
            self.end = Some(Ok(if self.emit() {
                FinishReason::Length
            } else {
                FinishReason::Cancelled
            }));
        } else {
            self.sampler.accept(id);
            self.next = Some(id);
        }
    }

    /// The positions this row may take in the cache.
    fn budget(&self, n_ctx: usize) -> usize {
        match self.out {
            Out::Pick { .. } => self.prompt.len(),
            _ => (self.prompt.len() + self.opts.max_tokens).min(n_ctx),
        }
    }
}

/// The worker's decoding state.
pub(crate) struct Engine<'m> {
    ctx: LlamaContext<'m>,
    shared: Arc<Shared>,
    batch: LlamaBatch<'static>,
    /// Positions the model's local attention layers see, if it has them.
    sliding_window: Option<usize>,
    resident: Option<Resident>,
}

impl<'m> Engine<'m> {
    pub(crate) fn new(
        ctx: LlamaContext<'m>,
        shared: &Arc<Shared>,
        sliding_window: Option<usize>,
    ) -> Self {
        Self {
            ctx,
            shared: Arc::clone(shared),
            batch: LlamaBatch::new(BATCH, 1),
            sliding_window,
            resident: None,
        }
    }

    /// Forgets whatever sequence `seq` holds.
    fn clear(&mut self, seq: i32) {
        if self
            .ctx
            .clear_kv_cache_seq(u32::try_from(seq).ok(), None, None)
            != Ok(true)
        {
            // A failed removal leaves cells behind: start from nothing.
            self.ctx.clear_kv_cache();
            self.resident = None;
        }
    }

    /// Drops the resident session's cache.
    fn evict(&mut self) {
        if self.resident.take().is_some() {
            self.clear(SESSION_SEQ);
        }
    }

    /// Positions the resident session holds.
    fn resident_len(&self) -> usize {
        self.resident.as_ref().map_or(0, |r| r.ids.len())
    }

    /// A session `id` has ended: its cache goes.
    pub(crate) fn end_session(&mut self, id: u64) {
        if self.resident.as_ref().is_some_and(|r| r.session == id) {
            self.evict();
        }
    }

    /// How many prompt ids session `id`'s turn on `prompt` can take from
    /// the resident cache (cut back to them); 0 after dropping it.
    fn resume(&mut self, id: u64, prompt: &[u32]) -> usize {
        let Some(res) = self.resident.take() else {
            return 0;
        };
        if res.session == id {
            let p = reusable_prefix(&res.ids, prompt);
            let cut = p > 0
                && self
                    .ctx
                    .clear_kv_cache_seq(Some(SESSION_SEQ as u32), Some(p as u32), None)
                    == Ok(true);
            let whole = self.ctx.kv_cache_seq_pos_max(SESSION_SEQ) == p as i32 - 1;
            // Local attention layers must still hold the window before `p`.
            let window = self.sliding_window.is_none_or(|w| {
                self.ctx.kv_cache_seq_pos_min(SESSION_SEQ) <= p.saturating_sub(w) as i32
            });
            tracing::debug!(
                common = p,
                cached = res.ids.len(),
                cut,
                whole,
                window,
                "chat session prefix"
            );
            if cut && whole && window {
                self.shared.note_reused(p);
                return p;
            }
        }
        self.clear(SESSION_SEQ);
        0
    }

    /// Prefills the rows' prompts, then steps them until every row has
    /// ended. A decode failure ends every live row with it.
    fn run(&mut self, rows: &mut [Row<'_>], clock: &mut Clock) {
        if let Err(e) = self.decode_rows(rows, clock) {
            let message = e.to_string();
            for row in rows.iter_mut().filter(|r| r.end.is_none()) {
                row.end = Some(Err(engine_error(&message)));
            }
        }
        for row in rows.iter().filter(|r| r.seq != SESSION_SEQ) {
            let seq = row.seq;
            if self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None) != Ok(true) {
                self.ctx.clear_kv_cache();
                self.resident = None;
            }
        }
    }

    fn decode_rows(&mut self, rows: &mut [Row<'_>], clock: &mut Clock) -> Result<()> {
        let n_ctx = self.shared.n_ctx;
        let cap = if rows.iter().any(|r| r.scores.is_some()) {
            SCORED_BATCH
        } else {
            BATCH
        };
        // (row, position, index in the batch) of each position whose
        // logits the batch computes.
        let mut wanted: Vec<(usize, usize, i32)> = Vec::new();
        self.batch.clear();
        for r in 0..rows.len() {
            let (seq, start, prompt, scored) = {
                let row = &rows[r];
                (row.seq, row.start, row.prompt, row.scores.is_some())
            };
            for (p, &id) in prompt.iter().enumerate().skip(start) {
                let last = p + 1 == prompt.len();
                self.batch
                    .add(LlamaToken(id as i32), p as i32, &[seq], last || scored)
                    .map_err(engine_error)?;
                if last || scored {
                    wanted.push((r, p, self.batch.n_tokens() - 1));
                }
                if self.batch.n_tokens() as usize == cap {
                    if rows.iter().all(|r| r.cancelled()) {
                        return Ok(());
                    }
                    self.prefill(rows, &mut wanted, clock)?;
                }
            }
            rows[r].pos = prompt.len();
            // Each row's prompt in batches of its own: llama.cpp's CPU
            // kernels change with the number of tokens in a batch (past a
            // few dozen), so a prompt batched with others would not give
            // the logits it gives alone.
            if self.batch.n_tokens() > 0 {
                self.prefill(rows, &mut wanted, clock)?;
            }
        }
        let mut fed: Vec<(usize, i32)> = Vec::with_capacity(rows.len());
        loop {
            self.batch.clear();
            fed.clear();
            for (r, row) in rows.iter_mut().enumerate() {
                if row.end.is_some() {
                    continue;
                }
                if row.cancelled() {
                    row.end = Some(Ok(FinishReason::Cancelled));
                    continue;
                }
                let Some(id) = row.next.take() else { continue };
                self.batch
                    .add(LlamaToken(id as i32), row.pos as i32, &[row.seq], true)
                    .map_err(engine_error)?;
                row.pos += 1;
                fed.push((r, self.batch.n_tokens() - 1));
            }
            if fed.is_empty() {
                return Ok(());
            }
            self.ctx.decode(&mut self.batch).map_err(engine_error)?;
            for &(r, i) in &fed {
                rows[r].take(self.ctx.get_logits_ith(i), n_ctx, clock);
            }
        }
    }

    /// Decodes the prompt batch and reads the logits it was asked for: a
    /// prompt log-probability, or a row's first draw at its last position.
    fn prefill(
        &mut self,
        rows: &mut [Row<'_>],
        wanted: &mut Vec<(usize, usize, i32)>,
        clock: &mut Clock,
    ) -> Result<()> {
        self.ctx.decode(&mut self.batch).map_err(engine_error)?;
        let n_ctx = self.shared.n_ctx;
        for (r, p, i) in wanted.drain(..) {
            let logits = self.ctx.get_logits_ith(i);
            let row = &mut rows[r];
            let last = p + 1 == row.prompt.len();
            if let Some(scores) = &mut row.scores {
                if !last {
                    scores.push(logprob_of(logits, row.prompt[p + 1]));
                }
            }
            if last {
                row.pos = row.prompt.len();
                row.send_scores();
                row.take(logits, n_ctx, clock);
            }
        }
        self.batch.clear();
        Ok(())
    }

    /// Makes room for rows needing `budget` positions: drops the resident
    /// session when they would not fit beside it.
    fn make_room(&mut self, budget: usize) {
        if self.resident_len() + budget > self.shared.n_ctx {
            self.evict();
        }
    }

    /// A streamed generation, or a chat session's turn; it sets the
    /// model's last metrics.
    pub(crate) fn generate(&mut self, req: Request, session: Option<(u64, Turn)>) {
        let shared = Arc::clone(&self.shared);
        let Request {
            prompt,
            opts,
            sink,
            queued,
        } = req;
        let mut clock = Clock::start(queued);
        let _span = tracing::debug_span!(
            "generate",
            prompt_tokens = prompt.len(),
            max_tokens = opts.max_tokens
        )
        .entered();
        if sink.prompt(prompt.clone()).is_err() {
            let metrics = clock.metrics(prompt.len(), 0);
            self.shared.last_metrics.set(&metrics);
            sink.finish(metrics, FinishReason::Cancelled);
            return;
        }
        let out = Out::Stream {
            sink: &sink,
            reply: session.as_ref().map(|_| String::new()),
        };
        let mut row = Row::new(&shared, 1, &prompt, &opts, out, 0);
        if opts.prompt_logprobs {
            row.scores = Some(Vec::with_capacity(prompt.len()));
        }
        match &session {
            Some((id, _)) => {
                row.seq = SESSION_SEQ;
                row.start = if opts.prompt_logprobs {
                    // Every prompt position's logits are needed.
                    self.resume(*id, &[]);
                    0
                } else {
                    self.resume(*id, &prompt)
                };
            }
            None => self.make_room(row.budget(shared.n_ctx)),
        }
        let mut rows = [row];
        self.run(&mut rows, &mut clock);
        let [row] = rows;
        let generated = row.steps.generated();
        let end = row.end.unwrap_or(Ok(FinishReason::Cancelled));
        let (sampled, pos) = (row.sampled, row.pos);
        let reply = match row.out {
            Out::Stream { reply, .. } => reply,
            _ => None,
        };
        let metrics = clock.metrics(prompt.len(), generated);
        if let Some((id, turn)) = session {
            let kept = matches!(end, Ok(FinishReason::Stop | FinishReason::Length));
            match cached_ids(&prompt, &sampled, pos).filter(|_| kept) {
                Some(ids) => {
                    self.resident = Some(Resident { session: id, ids });
                    turn.commit(reply.unwrap_or_default());
                }
                None => self.clear(SESSION_SEQ),
            }
        }
        // Before the stream ends: a caller who reads `metrics()` once it
        // has must see this call's.
        self.shared.last_metrics.set(&metrics);
        match end {
            Ok(reason) => sink.finish(metrics, reason),
            Err(e) => sink.fail(e),
        }
    }

    /// Groups of consecutive rows whose budgets fit the context together
    /// (at most [`ROWS`] rows each), after making room.
    fn groups(&mut self, budgets: &[usize]) -> Vec<std::ops::Range<usize>> {
        let total: usize = budgets.iter().sum();
        self.make_room(total.min(self.shared.n_ctx));
        let room = self.shared.n_ctx - self.resident_len().min(self.shared.n_ctx);
        let mut groups = Vec::new();
        let (mut start, mut used) = (0, 0);
        for (i, &b) in budgets.iter().enumerate() {
            if i > start && (i - start == ROWS || used + b > room) {
                groups.push(start..i);
                (start, used) = (i, 0);
            }
            used += b;
        }
        if start < budgets.len() {
            groups.push(start..budgets.len());
        }
        groups
    }

    /// A continuation of each prompt; the results in order, and the call's
    /// metrics.
    pub(crate) fn batch(
        &mut self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
    ) -> (Vec<BatchResult>, GenerateMetrics) {
        let shared = Arc::clone(&self.shared);
        let mut clock = Clock::start(Instant::now());
        let n_ctx = shared.n_ctx;
        let budgets: Vec<usize> = prompts
            .iter()
            .map(|p| (p.len() + opts.max_tokens).min(n_ctx))
            .collect();
        let mut results = Vec::with_capacity(prompts.len());
        let mut generated = 0;
        for group in self.groups(&budgets) {
            let mut rows: Vec<Row<'_>> = group
                .clone()
                .enumerate()
                .map(|(k, i)| {
                    let out = Out::Collect(Vec::new());
                    Row::new(&shared, 1 + k as i32, &prompts[i], opts, out, i as u64)
                })
                .collect();
            self.run(&mut rows, &mut clock);
            for row in rows {
                generated += row.steps.generated();
                let tokens = match row.out {
                    Out::Collect(t) => t,
                    _ => Vec::new(),
                };
                let (finish_reason, error) = match row.end.unwrap_or(Ok(FinishReason::Length)) {
                    Ok(reason) => (reason, None),
                    Err(e) => (FinishReason::Error, Some(e)),
                };
                results.push(BatchResult {
                    tokens,
                    finish_reason,
                    error,
                });
            }
        }
        let prompt_tokens = prompts.iter().map(Vec::len).sum();
        (results, clock.metrics(prompt_tokens, generated))
    }

    /// The next token of each prompt (and its logits when `return_logits`),
    /// the prompts prefilled together.
    pub(crate) fn classify(
        &mut self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
    ) -> Result<Vec<ClassifyResult>> {
        let shared = Arc::clone(&self.shared);
        let mut clock = Clock::start(Instant::now());
        let budgets: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let mut out = Vec::with_capacity(prompts.len());
        for group in self.groups(&budgets) {
            let mut rows: Vec<Row<'_>> = group
                .clone()
                .enumerate()
                .map(|(k, i)| {
                    let pick = Out::Pick {
                        keep_logits: opts.return_logits,
                        picked: None,
                    };
                    Row::new(&shared, 1 + k as i32, &prompts[i], opts, pick, i as u64)
                })
                .collect();
            self.run(&mut rows, &mut clock);
            for (row, i) in rows.into_iter().zip(group) {
                if let Some(Err(e)) = row.end {
                    return Err(e);
                }
                let Out::Pick {
                    picked: Some((id, logits)),
                    ..
                } = row.out
                else {
                    return Err(engine_error(format!("classify: prompt {i} gave no token")));
                };
                let tokenizer = shared.tokenizer();
                let mut detok = StreamDecoder::new(&tokenizer.inner, &prompts[i]);
                let detok_error = |e| engine_error(format!("detokenising id {id}: {e}"));
                let mut text = detok.step(id).map_err(detok_error)?;
                text.push_str(&detok.finish().map_err(detok_error)?);
                out.push(ClassifyResult {
                    token: Token::new(id, text),
                    logits,
                });
            }
        }
        Ok(out)
    }
}

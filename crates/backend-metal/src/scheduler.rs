//! Continuous batching: the model's worker runs every generation (single
//! calls, chat turns, `batch_generate` rows) through one scheduler that
//! keeps a running batch.
//!
//! Each pass of the loop:
//!
//! 1. takes the jobs that came in, in arrival order (FIFO): a generation
//!    starts when a slot is free and the KV budget has room (or waits, up to
//!    its time limit); other jobs (logits, scores, classify, ending a
//!    session) run when they reach the front; fine-tuning waits until no
//!    generation runs;
//! 2. prefills one chunk of the oldest starting call, alone (a long prompt
//!    takes several passes, so it never stalls the others' next token for
//!    more than a chunk); its first token is drawn when its prompt is done;
//! 3. runs one decode step of every running call as one forward pass: a call
//!    alone decodes on its own caches exactly as before batching; two or more
//!    decode in a [`BatchKv`] (rows at positions of their own, under a mask);
//! 4. reads back the previous step's tokens (the next step is already
//!    queued, so MLX computes it meanwhile) and streams them; calls that end
//!    (a stop, `max_tokens`, the context, a cancel) leave at once.
//!
//! Each call keeps its own options (sampler and seed, penalties, logit bias,
//! stop ids and strings, `max_tokens`, logprobs). A chat session's cache
//! belongs to the session; finished calls leave theirs to the
//! [`PromptCache`], which later calls sharing a prefix reuse.
//!
//! With a KV budget, when a step would outgrow it the newest calls are
//! paused: their caches are dropped and they wait at the front of the queue
//! to be prefilled again (prompt and tokens so far) and go on where they
//! were; a call that alone outgrows the budget ends with
//! [`Error::MemoryBudget`].

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use inference_core::{Error, FinishReason, GenerateMetrics, Token, TokenLogprobs};
use inference_runtime::session::{cached_ids, Turn as SessionTurn};
use inference_runtime::{stream_tokens, Clock, Jobs, Poll, Sequence};
use mlx_rs::error::Exception;
use mlx_rs::ops::concatenate;
use mlx_rs::ops::indexing::{argmax_axis, IndexOp};
use mlx_rs::transforms::{async_eval, eval};
use mlx_rs::{Array, Dtype};

use crate::batch_kv::BatchKv;
use crate::cache::{KvCache, LayerCache};
use crate::distributed::{Group, Watchdog};
use crate::error::mlx_error;
use crate::generate::{self, read_scores, recent_ids, Request};
use crate::memory;
use crate::models::layers::last_position;
use crate::models::CausalLm;
use crate::prompt_cache::PromptCache;
use crate::sample::{logprobs_of, Sampler};
use crate::session::{self, SessionCache};
use crate::tune;
use crate::worker::{Job, Shared, TurnJob};
use inference_text::{ModelTokenizer, StreamDecoder};

/// Prompt tokens a starting call prefills per pass while others decode: a
/// long prompt delays the running calls' next token by this much at most.
pub const INTERLEAVED_CHUNK: usize = 512;

/// Bytes of finished calls' caches kept for later prompts, unless
/// `LoadOptions::prompt_cache_bytes` says otherwise.
pub const DEFAULT_PROMPT_CACHE_BYTES: u64 = 512 << 20;

/// How the scheduler admits calls.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Calls decoding (or prefilling) at once.
    pub max_rows: usize,
    /// KV bytes the running calls may hold.
    pub kv_budget: Option<u64>,
    /// How long a call may wait to start.
    pub queue_timeout: Option<Duration>,
    /// KV bytes of a position, every layer (to estimate a waiting call's
    /// need).
    pub position_bytes: u64,
}

/// What a model's scheduler has done so far (see
/// [`MlxModel::scheduler_stats`](crate::MlxModel::scheduler_stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SchedulerStats {
    /// Decode steps run.
    pub steps: u64,
    /// Decode steps that decoded two or more calls in one forward pass.
    pub batched_steps: u64,
    /// The most calls one step decoded.
    pub largest_batch: usize,
    /// Calls paused (their caches dropped) to keep to the KV budget.
    pub paused: u64,
    /// Prompt tokens calls took from the prompt cache.
    pub prompt_cache_tokens: u64,
    /// Calls running (prefilling or decoding) now.
    pub running: usize,
    /// Calls waiting to start now.
    pub waiting: usize,
}

/// The scheduler's counters, shared with the callers' side.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    steps: AtomicU64,
    batched_steps: AtomicU64,
    largest_batch: AtomicUsize,
    paused: AtomicU64,
    prompt_cache_tokens: AtomicU64,
    running: AtomicUsize,
}

impl Counters {
    /// A snapshot, with `waiting` calls queued.
    pub(crate) fn snapshot(&self, waiting: usize) -> SchedulerStats {
        SchedulerStats {
            steps: self.steps.load(Ordering::Relaxed),
            batched_steps: self.batched_steps.load(Ordering::Relaxed),
            largest_batch: self.largest_batch.load(Ordering::Relaxed),
            paused: self.paused.load(Ordering::Relaxed),
            prompt_cache_tokens: self.prompt_cache_tokens.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            waiting,
        }
    }

    fn step(&self, rows: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        if rows > 1 {
            self.batched_steps.fetch_add(1, Ordering::Relaxed);
        }
        self.largest_batch.fetch_max(rows, Ordering::Relaxed);
    }
}

/// A log-probability draw, as `logprobs_of` returns it.
type Scores = (Array, Option<(Array, Array)>);

/// Ids drawn for some rows at once (lazily), and once read, on the host.
struct Draw {
    /// `[G]` uint32.
    ids: Array,
    /// Per position: the log-probabilities, where the row asked for them.
    scores: Vec<Option<Scores>>,
    host: Option<(Vec<u32>, Vec<Option<TokenLogprobs>>)>,
    /// Under tensor parallelism, rank 0's stop flag (`[1]` int32, 1: the
    /// call ends here on every rank).
    stop: Option<Array>,
}

impl Draw {
    fn queue(&self) -> Result<(), Exception> {
        let scores = self.scores.iter().flatten().flat_map(|(chosen, top)| {
            std::iter::once(chosen).chain(top.iter().flat_map(|(i, v)| [i, v]))
        });
        async_eval(
            std::iter::once(&self.ids)
                .chain(scores)
                .chain(self.stop.iter()),
        )
    }

    /// Whether rank 0 ended the call at this draw (never in one process).
    fn stopped(&self) -> Result<bool, Exception> {
        match &self.stop {
            None => Ok(false),
            Some(flag) => {
                flag.eval()?;
                Ok(flag.as_slice::<i32>().first().is_some_and(|&v| v != 0))
            }
        }
    }

    /// The id (and scores) at `index`, reading the draw back once.
    fn read(&mut self, index: usize) -> Result<(u32, Option<TokenLogprobs>), Exception> {
        if self.host.is_none() {
            self.ids.eval()?;
            let ids: Vec<u32> = self
                .ids
                .try_as_slice::<u32>()
                .map_err(|e| Exception::custom(e.to_string()))?
                .to_vec();
            let mut scores = Vec::with_capacity(self.scores.len());
            for s in &self.scores {
                scores.push(match s {
                    Some(s) => read_scores(s)?.into_iter().next(),
                    None => None,
                });
            }
            self.host = Some((ids, scores));
        }
        let (ids, scores) = self
            .host
            .as_ref()
            .ok_or_else(|| Exception::custom("unread"))?;
        let id = *ids
            .get(index)
            .ok_or_else(|| Exception::custom("a draw has no such row"))?;
        Ok((id, scores.get(index).cloned().flatten()))
    }
}

/// Where a row's next unread id is: a draw and a position in it.
#[derive(Debug, Clone, Copy)]
struct Pending {
    draw: usize,
    index: usize,
    /// Already read back and streamed (a first token delivered as soon as
    /// its prefill ended, see [`Scheduler::deliver_first_tokens`]).
    read: bool,
}

/// Where a row's KV cache is.
enum Place {
    /// Prefilling `feed` (the prompt after what the caches hold, or after a
    /// pause the prompt and every token so far), `done` of it so far.
    Prefill {
        caches: Vec<LayerCache>,
        feed: Vec<u32>,
        done: usize,
    },
    /// Decoding on caches of its own.
    Alone(Vec<LayerCache>),
    /// Decoding in the batch, at this row.
    Batch(usize),
    /// No cache: paused, or finished.
    None,
}

/// A chat-session turn's side of a row.
struct TurnState {
    id: u64,
    turn: SessionTurn,
    /// False once the session ended while the turn ran: its cache is not
    /// kept.
    keep: bool,
}

/// A call that started (or was paused).
struct Row<'t> {
    /// Admission order: larger is newer.
    order: u64,
    req: Request,
    turn: Option<TurnState>,
    seq: Sequence<StreamDecoder<'t>>,
    sampler: Sampler,
    /// The repeat penalty's window (0: off).
    window: usize,
    /// Ids the penalty looks at (prompt included), as far as it looks.
    read: VecDeque<u32>,
    /// Every id read back, stop and end ids included.
    sampled: Vec<u32>,
    /// The text streamed (a session turn's reply).
    reply: String,
    clock: Clock,
    ready: Vec<Token>,
    /// Prompt tokens taken from a cache.
    cached: usize,
    place: Place,
    /// The unread id drawn last (the next step's input).
    pending: Option<Pending>,
    /// The id the step queued this pass draws.
    next: Option<Pending>,
    /// Paused this pass: requeued once its pending id is read.
    paused: bool,
    /// Under tensor parallelism on rank 0: its caller went away, and the
    /// next draw tells every rank to end the call.
    stop_asked: bool,
    /// Whether the sampler alone draws (argmax of plain logits): such rows
    /// are drawn together.
    plain_greedy: bool,
    end: Option<Result<FinishReason, Error>>,
}

impl Row<'_> {
    fn decoding(&self) -> bool {
        matches!(self.place, Place::Alone(_) | Place::Batch(_))
    }

    /// Whether the row still has prompt to prefill (and has not ended).
    fn prefilling(&self) -> bool {
        matches!(self.place, Place::Prefill { .. }) && self.end.is_none()
    }

    /// Whether a step follows the pending id: room under `max_tokens` and
    /// the context after it.
    fn wants_step(&self, limit: usize) -> bool {
        // Tokens before the pending one (which may already be read).
        let generated = self.seq.generated() - usize::from(self.pending.is_some_and(|p| p.read));
        generated + 1 < self.req.opts.max_tokens
            && self.req.prompt.len() + generated + 1 < limit
            && !self.paused
            && self.end.is_none()
    }

    /// Draws the row's next id from its `logits` `[1, V]` with its own
    /// sampler (the repeat penalty looking at its ids, `pending` the id not
    /// read back yet), scored when it asked for logprobs; not queued.
    fn draw(&mut self, logits: &Array, pending: Option<&Array>) -> Result<Draw, Exception> {
        let recent = recent_ids(&self.read, pending, self.window)?;
        let opts = &self.req.opts;
        draw_one(
            &mut self.sampler,
            logits,
            recent.as_ref(),
            opts.logprobs,
            opts.top_logprobs,
            self.stop_asked,
        )
    }

    /// Whether its cache outlives it (a session's, or for the prompt cache).
    fn keeps_cache(&self, prompt_cache: bool) -> bool {
        match &self.turn {
            Some(t) => t.keep,
            None => prompt_cache,
        }
    }
}

/// A job not started yet: as it came, or a paused row. (The queue holds
/// few of them, and moves them once: their size does not matter.)
#[allow(clippy::large_enum_variant)]
enum Waiting<'t> {
    Job(Job),
    Paused(Row<'t>),
}

/// Where one pass's time went, logged (debug) when the pass was slow.
#[derive(Debug, Default)]
struct SlowPass {
    rows: usize,
    prefill: Duration,
    build: Duration,
    wait: Duration,
    retire: Duration,
    /// Within a batched step: joining the batch (and settling it), the
    /// mask and positions, the forward graph, the draw, queueing it.
    join: Duration,
    prepare: Duration,
    forward: Duration,
    draw: Duration,
    queue: Duration,
}

impl SlowPass {
    /// A pass slower than this is logged.
    const SLOW: Duration = Duration::from_millis(15);

    fn report(&self, total: Duration) {
        if total >= Self::SLOW {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            tracing::debug!(
                total_ms = ms(total),
                rows = self.rows,
                prefill_ms = ms(self.prefill),
                step_build_ms = ms(self.build),
                read_back_ms = ms(self.wait),
                retire_ms = ms(self.retire),
                join_ms = ms(self.join),
                prepare_ms = ms(self.prepare),
                forward_ms = ms(self.forward),
                draw_ms = ms(self.draw),
                queue_ms = ms(self.queue),
                "slow pass"
            );
        }
    }
}

/// A rank's part under tensor parallelism.
enum Tp {
    /// Rank 0: takes the calls, hands each one it starts to the others,
    /// and decides when a call ends early.
    Leader(Rc<Group>),
    /// Another rank: runs rank 0's calls.
    Follower(Rc<Group>),
}

impl Tp {
    /// The group, whichever part this rank plays.
    fn group(&self) -> &Group {
        match self {
            Tp::Leader(g) | Tp::Follower(g) => g,
        }
    }
}

/// Refuses a call made on a follower (rank 0 takes the calls).
fn refuse_local(job: Job, rank: i32) {
    refuse_job(
        job,
        &format!(
            "calls on rank {rank} of a tensor-parallel model (rank 0 takes the calls; the \
             others follow it)"
        ),
    );
}

/// Ends `job` with [`Error::Unsupported`] saying `what`.
fn refuse_job(job: Job, what: &str) {
    let e = || Error::unsupported(what);
    match job {
        Job::Generate(r) => r.sink.fail(e()),
        Job::Turn(t) => t.req.sink.fail(e()),
        Job::Logits { reply, .. } | Job::Score { reply, .. } => {
            let _ = reply.send(Err(e()));
        }
        Job::Classify { reply, .. } => {
            let _ = reply.send(Err(e()));
        }
        Job::EndSession(_) | Job::Tune(_) => {}
    }
}

/// The scheduler of one model's worker.
pub(crate) struct Scheduler<'a> {
    model: &'a dyn CausalLm,
    shared: &'a Shared,
    tokenizer: &'a ModelTokenizer,
    limits: Limits,
    waiting: VecDeque<Waiting<'a>>,
    rows: Vec<Row<'a>>,
    batch: Option<BatchKv>,
    /// Draws not read yet, and the draws of the step queued this pass.
    unread: Vec<Draw>,
    fresh: Vec<Draw>,
    sessions: HashMap<u64, SessionCache>,
    prompt_cache: PromptCache,
    adapters: Option<tune::AdapterState>,
    admitted: u64,
    steps: u64,
    profile: StepProfile,
    /// Ends the process when a tensor-parallel pass hangs.
    watchdog: Option<Watchdog>,
    /// Under tensor parallelism: this rank's part.
    tp: Option<Tp>,
    /// A follower's stream of the call it runs (kept so that the call's
    /// sink has a consumer; nobody reads it).
    followed: Option<inference_core::TokenStream>,
    /// Where the time of the current pass went (a debug log of slow
    /// passes).
    slow: SlowPass,
    /// Whether batches grow in powers of two ([`BatchKv::with_buckets`]):
    /// on a GPU (`INFER_BATCH_BUCKETS=0` or `1` overrides).
    bucket_batches: bool,
    /// When first tokens go out as soon as their prefill ends
    /// ([`Scheduler::deliver_first_tokens`]; `INFER_EAGER_FIRST`, `auto` by
    /// default).
    eager_first: EagerFirst,
}

/// When a call's first token is read back as soon as its prefill is
/// queued, before the batch's next decode step is built
/// ([`Scheduler::deliver_first_tokens`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EagerFirst {
    /// Never: a first token is read with the step after its prefill.
    Off,
    /// Always (`INFER_EAGER_FIRST=1`).
    Always,
    /// Only for a call that arrived alone: no other call waits to be
    /// admitted or is still prefilling (`INFER_EAGER_FIRST=auto`, the
    /// default). Each early read leaves the GPU idle while the next step is
    /// built, which a lone arrival pays once; in a burst every admission
    /// would pay it in turn (on an H100, 16 calls at once: first-token p99
    /// 26 ms without early reads, 152 ms with all of them, 12 ms under this
    /// rule).
    WhenAlone,
}

impl EagerFirst {
    /// The setting of `INFER_EAGER_FIRST` (`0`, `1` or `auto`; nothing is
    /// `auto`, and so is anything else, with a warning).
    fn from_env() -> Self {
        let value = std::env::var("INFER_EAGER_FIRST").ok();
        let setting = Self::parse(value.as_deref());
        if let Some(v) = value.filter(|v| !matches!(v.as_str(), "0" | "1" | "auto")) {
            tracing::warn!(value = %v, "INFER_EAGER_FIRST is 0, 1 or auto; taken as auto");
        }
        setting
    }

    fn parse(value: Option<&str>) -> Self {
        match value {
            Some("0") => EagerFirst::Off,
            Some("1") => EagerFirst::Always,
            _ => EagerFirst::WhenAlone,
        }
    }

    /// Whether the first tokens of this pass are read at once;
    /// `others_pending` says whether another call waits to be admitted or
    /// is still prefilling (asked only for `auto`).
    fn now(self, others_pending: impl FnOnce() -> bool) -> bool {
        match self {
            EagerFirst::Off => false,
            EagerFirst::Always => true,
            EagerFirst::WhenAlone => !others_pending(),
        }
    }
}

/// Where the passes' time goes while calls run: building and queueing the
/// decode step (`build_us`, of which `queue_us` queueing), and waiting for
/// the previous step's ids (the rest is detokenising, stop strings and
/// streaming). Logged at `debug` level, as means per step, whenever the
/// scheduler falls idle.
#[derive(Debug, Default)]
struct StepProfile {
    steps: u32,
    rows: u64,
    build: Duration,
    /// The part of `build` spent queueing the step (MLX's `async_eval`:
    /// evaluating each node's primitive and handing its work to the
    /// device); the rest is building the graph.
    queue: Duration,
    wait: Duration,
}

impl StepProfile {
    fn report(&mut self) {
        if self.steps == 0 {
            return;
        }
        let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(self.steps);
        tracing::debug!(
            steps = self.steps,
            mean_rows = self.rows as f64 / f64::from(self.steps),
            build_us = per(self.build),
            queue_us = per(self.queue),
            wait_us = per(self.wait),
            "decode step profile (means)"
        );
        *self = Self::default();
    }
}

impl<'a> Scheduler<'a> {
    pub(crate) fn new(
        model: &'a dyn CausalLm,
        shared: &'a Shared,
        limits: Limits,
        prompt_cache_bytes: u64,
        adapters: Option<tune::AdapterState>,
    ) -> Self {
        Self {
            model,
            shared,
            tokenizer: shared.tokenizer(),
            limits,
            waiting: VecDeque::new(),
            rows: Vec::new(),
            batch: None,
            unread: Vec::new(),
            fresh: Vec::new(),
            sessions: HashMap::new(),
            prompt_cache: PromptCache::new(prompt_cache_bytes),
            adapters,
            admitted: 0,
            steps: 0,
            profile: StepProfile::default(),
            watchdog: None,
            tp: None,
            followed: None,
            slow: SlowPass::default(),
            bucket_batches: crate::env_switch("INFER_BATCH_BUCKETS")
                .unwrap_or_else(crate::device::default_is_gpu),
            eager_first: EagerFirst::from_env(),
        }
    }

    /// Under tensor parallelism over `group`: rank 0 leads (takes the calls
    /// and hands each one it starts to the others, and decides when a call
    /// ends early), the others follow it.
    pub(crate) fn with_tensor_parallel(mut self, group: Option<Rc<Group>>) -> Self {
        self.tp = group.map(|g| {
            if g.rank() == 0 {
                Tp::Leader(g)
            } else {
                Tp::Follower(g)
            }
        });
        self
    }

    /// Under tensor parallelism: a watchdog that ends the process when one
    /// pass (a prefill chunk, a decode step) outlasts its limit, since a
    /// collective whose peer is gone blocks inside MLX.
    pub(crate) fn with_watchdog(mut self, watchdog: Option<Watchdog>) -> Self {
        self.watchdog = watchdog;
        self
    }

    /// Serves `jobs` until every handle of the worker is dropped and every
    /// call has ended.
    pub(crate) fn run(mut self, jobs: Jobs<Job>) {
        let mut open = true;
        loop {
            if open {
                open = match &self.tp {
                    Some(Tp::Follower(g)) => {
                        let g = Rc::clone(g);
                        self.follow(&g, &jobs)
                    }
                    _ => self.receive(&jobs),
                };
            }
            if !open && self.rows.is_empty() && self.waiting.is_empty() {
                if let Some(Tp::Leader(g)) = &self.tp {
                    // The followers stop following (bounded by the
                    // watchdog: a lost follower may leave it waiting).
                    if let Some(dog) = &self.watchdog {
                        dog.busy();
                    }
                    if let Err(e) = g.broadcast(None) {
                        tracing::warn!("cannot tell the other ranks to stop: {}", e.what());
                    }
                }
                return;
            }
            // Watched from here: starting a call broadcasts it to the other
            // ranks under tensor parallelism.
            if let Some(dog) = &self.watchdog {
                dog.busy();
            }
            self.expire();
            self.start_jobs();
            let pass_started = Instant::now();
            self.slow = SlowPass {
                rows: self.rows.len(),
                ..SlowPass::default()
            };
            if let Err(e) = self.pass() {
                if let Some(g) = self.tp.as_ref().map(Tp::group) {
                    // The ranks may have parted: no further collective.
                    g.mark_broken();
                }
                self.fail_running(&e);
            }
            let t_retire = Instant::now();
            self.retire();
            self.slow.retire = t_retire.elapsed();
            self.slow.report(pass_started.elapsed());
            if let Some(dog) = self.watchdog.as_ref().filter(|_| self.rows.is_empty()) {
                dog.idle();
            }
            self.shared
                .counters
                .running
                .store(self.rows.len(), Ordering::Relaxed);
            if self.rows.is_empty() && self.profile.steps > 0 {
                self.profile.report();
                // Idle: MLX's buffer cache goes back to the system, so a
                // burst's memory does not outlive it (and what the host
                // allocator then holds free, too).
                memory::clear_cache();
                crate::device::release_free_host_memory();
            }
        }
    }

    /// Takes the jobs that came in (waiting for one when there is nothing
    /// else to do); false once the channel is closed.
    fn receive(&mut self, jobs: &Jobs<Job>) -> bool {
        let idle = self.rows.is_empty() && self.waiting.is_empty();
        let wait = if idle {
            None
        } else if self.rows.is_empty() {
            // Only waiting jobs that cannot start (a timeout may end them).
            Some(Duration::from_millis(50))
        } else {
            Some(Duration::ZERO)
        };
        let mut first = true;
        loop {
            match jobs.poll(if first { wait } else { Some(Duration::ZERO) }) {
                Poll::Job(job) => self.waiting.push_back(Waiting::Job(job)),
                Poll::Empty => return true,
                Poll::Closed => return false,
            }
            first = false;
        }
    }

    /// A follower's intake: its own callers are refused (rank 0 takes the
    /// calls), and when it has nothing to run it waits for rank 0's next
    /// call; false once rank 0 shuts down (or is lost).
    fn follow(&mut self, group: &Group, jobs: &Jobs<Job>) -> bool {
        while let Poll::Job(job) = jobs.poll(Some(Duration::ZERO)) {
            refuse_local(job, group.rank());
        }
        if !(self.rows.is_empty() && self.waiting.is_empty()) {
            return true;
        }
        let message = match group.broadcast(None) {
            Ok(Some(m)) => m,
            Ok(None) => {
                self.shared.end_following(Ok(()));
                return false;
            }
            Err(e) => {
                let e = format!("lost rank 0: {}", e.what());
                tracing::error!(rank = group.rank(), "{e}");
                self.shared.end_following(Err(e));
                return false;
            }
        };
        let call: Result<(Vec<u32>, inference_core::GenerateOptions), _> =
            serde_json::from_slice(&message);
        match call {
            Ok((prompt, opts)) => {
                let (sink, stream) = inference_core::TokenStream::channel();
                self.followed = Some(stream);
                self.shared.enter_queue_unbounded();
                self.waiting.push_back(Waiting::Job(Job::Generate(Request {
                    prompt,
                    opts,
                    sink,
                    queued: Instant::now(),
                })));
                true
            }
            Err(e) => {
                let e = format!("a call from rank 0 that does not parse: {e}");
                tracing::error!(rank = group.rank(), "{e}");
                self.shared.end_following(Err(e));
                false
            }
        }
    }

    /// Ends waiting calls that were cancelled or waited too long.
    fn expire(&mut self) {
        let timeout = self.limits.queue_timeout;
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        while let Some(w) = self.waiting.pop_front() {
            let (sink, waited) = match &w {
                Waiting::Job(Job::Generate(r)) => (&r.sink, r.queued.elapsed()),
                Waiting::Job(Job::Turn(t)) => (&t.req.sink, t.req.queued.elapsed()),
                // A paused call has started: no time limit.
                Waiting::Paused(row) => (&row.req.sink, Duration::ZERO),
                Waiting::Job(_) => {
                    kept.push_back(w);
                    continue;
                }
            };
            let end = if sink.is_cancelled() {
                Some(Ok(FinishReason::Cancelled))
            } else if timeout.is_some_and(|t| waited > t) {
                Some(Err(Error::Timeout {
                    waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                }))
            } else {
                None
            };
            match end {
                None => kept.push_back(w),
                Some(end) => self.drop_waiting(w, end),
            }
        }
        self.waiting = kept;
    }

    /// Ends a call that never ran (or was paused) with `end`.
    fn drop_waiting(&mut self, w: Waiting<'a>, end: Result<FinishReason, Error>) {
        let req = match w {
            Waiting::Job(Job::Generate(req)) => {
                self.shared.left_queue();
                req
            }
            Waiting::Job(Job::Turn(t)) => {
                self.shared.left_queue();
                t.req
            }
            Waiting::Paused(mut row) => {
                row.end = Some(end);
                self.finish(row);
                return;
            }
            Waiting::Job(_) => return,
        };
        let metrics = Clock::start(req.queued).metrics(req.prompt.len(), 0);
        match end {
            Ok(reason) => req.sink.finish(metrics, reason),
            Err(e) => req.sink.fail(e),
        }
    }

    /// Bytes of every KV cache the running calls hold.
    fn kv_bytes(&self) -> u64 {
        let own: u64 = self
            .rows
            .iter()
            .map(|r| match &r.place {
                Place::Prefill { caches, .. } | Place::Alone(caches) => {
                    caches.iter().map(LayerCache::bytes).sum()
                }
                Place::Batch(_) | Place::None => 0,
            })
            .sum();
        own + self.batch.as_ref().map_or(0, BatchKv::bytes)
    }

    /// Starts jobs from the front of the queue while they can start.
    fn start_jobs(&mut self) {
        while let Some(front) = self.waiting.front() {
            let needs = match front {
                Waiting::Job(Job::Generate(r)) => Some(r.prompt.len()),
                Waiting::Job(Job::Turn(t)) => Some(t.req.prompt.len()),
                Waiting::Paused(row) => Some(row.req.prompt.len() + row.sampled.len()),
                Waiting::Job(Job::Tune(_)) if !self.rows.is_empty() => return,
                Waiting::Job(_) => None,
            };
            if let Some(positions) = needs {
                if self.rows.len() >= self.limits.max_rows {
                    return;
                }
                if let Some(budget) = self.limits.kv_budget {
                    let step = KvCache::STEP as u64;
                    let positions = (positions as u64 + 1).div_ceil(step) * step;
                    let need = positions * self.limits.position_bytes;
                    if self.kv_bytes() + need > budget {
                        if self.rows.is_empty() {
                            let Some(w) = self.waiting.pop_front() else {
                                return;
                            };
                            let end = Err(Error::MemoryBudget {
                                needed: need,
                                budget,
                            });
                            self.drop_waiting(w, end);
                            continue;
                        }
                        return;
                    }
                }
            }
            let Some(w) = self.waiting.pop_front() else {
                return;
            };
            match w {
                Waiting::Job(job) => self.start(job),
                Waiting::Paused(row) => self.resume(row),
            }
        }
    }

    /// Runs or starts `job`.
    fn start(&mut self, job: Job) {
        let bounds = self.shared.bounds();
        if let (
            Some(Tp::Leader(_)),
            Job::Logits { .. } | Job::Score { .. } | Job::Classify { .. },
        ) = (&self.tp, &job)
        {
            // One forward pass of rank 0's alone would wait for the others.
            return refuse_job(
                job,
                "last_logits, prompt scores and classify under tensor parallelism",
            );
        }
        match job {
            Job::Generate(req) => {
                self.shared.left_queue();
                if let Some(Tp::Leader(g)) = &self.tp {
                    // The other ranks start the same call, before anything
                    // (the prompt cache included) changes here.
                    if req.opts.prompt_logprobs {
                        return req.sink.fail(Error::unsupported(
                            "prompt_logprobs under tensor parallelism",
                        ));
                    }
                    let call = serde_json::to_vec(&(&req.prompt, &req.opts))
                        .map_err(|e| Error::backend(crate::error::NAME, e.to_string()));
                    if let Err(e) = call.and_then(|c| g.broadcast(Some(&c)).map_err(mlx_error)) {
                        g.mark_broken();
                        return req.sink.fail(e);
                    }
                }
                let found = self.prompt_cache.take(&req.prompt);
                if let Some((_, n)) = &found {
                    self.shared
                        .counters
                        .prompt_cache_tokens
                        .fetch_add(*n as u64, Ordering::Relaxed);
                }
                self.admit(req, None, found);
            }
            Job::Turn(TurnJob { req, .. }) if self.tp.is_some() => {
                self.shared.left_queue();
                req.sink.fail(Error::unsupported(
                    "chat sessions under tensor parallelism (send the conversation to chat)",
                ));
            }
            Job::Turn(TurnJob { id, req, turn }) => {
                self.shared.left_queue();
                let found = self
                    .sessions
                    .remove(&id)
                    .and_then(|c| session::reuse(c, &req.prompt));
                tracing::debug!(
                    session = id,
                    cached = found.as_ref().map_or(0, |f| f.1),
                    prompt_tokens = req.prompt.len(),
                    "chat session turn"
                );
                self.shared.note_reused(found.as_ref().map_or(0, |f| f.1));
                let turn = TurnState {
                    id,
                    turn,
                    keep: true,
                };
                self.admit(req, Some(turn), found);
            }
            Job::Logits { ids, reply } => {
                let _ = reply.send(generate::last_logits(self.model, &ids, bounds));
            }
            Job::Score { ids, reply } => {
                let _ = reply.send(generate::prompt_logprobs(self.model, &ids, bounds));
            }
            Job::Classify {
                prompts,
                opts,
                reply,
            } => {
                let _ = reply.send(crate::batch::classify(
                    self.model,
                    self.tokenizer,
                    &prompts,
                    &opts,
                    bounds,
                ));
            }
            Job::EndSession(id) => {
                self.sessions.remove(&id);
                for row in &mut self.rows {
                    if let Some(t) = row.turn.as_mut().filter(|t| t.id == id) {
                        t.keep = false;
                    }
                }
            }
            Job::Tune(job) => {
                // Caches hold attention states of the adapters before: the
                // sessions' next turns and later prompts prefill afresh.
                let (sessions, prompt_cache) = (&mut self.sessions, &mut self.prompt_cache);
                tune::run(
                    job,
                    self.model,
                    self.shared,
                    &mut self.adapters,
                    &mut || {
                        sessions.clear();
                        prompt_cache.clear();
                    },
                );
            }
        }
    }

    /// Makes a row of `req`, on the cache `found` (and how many prompt
    /// tokens it holds) or on fresh caches, and starts its prefill.
    fn admit(
        &mut self,
        req: Request,
        turn: Option<TurnState>,
        found: Option<(Vec<LayerCache>, usize)>,
    ) {
        let bounds = self.shared.bounds();
        let fail = |req: Request, end: Result<FinishReason, Error>, turn: Option<TurnState>| {
            drop(turn);
            let metrics = Clock::start(req.queued).metrics(req.prompt.len(), 0);
            match end {
                Ok(reason) => req.sink.finish(metrics, reason),
                Err(e) => req.sink.fail(e),
            }
        };
        // Under tensor parallelism a call that started on rank 0 runs on
        // every rank: a caller already gone ends it at the first draw.
        let mut stop_asked = false;
        if req.sink.prompt(req.prompt.clone()).is_err() {
            if self.tp.is_none() {
                return fail(req, Ok(FinishReason::Cancelled), turn);
            }
            stop_asked = true;
        }
        if req.opts.prompt_logprobs {
            // A pass of its own over fresh caches: every position's logits,
            // which the prefill does not compute.
            match generate::prompt_logprobs(self.model, &req.prompt, bounds) {
                Ok(lps) => {
                    if req.sink.prompt_logprobs(lps).is_err() {
                        return fail(req, Ok(FinishReason::Cancelled), turn);
                    }
                }
                Err(e) => return fail(req, Err(e), turn),
            }
        }
        let sampler = match Sampler::new(&req.opts) {
            Ok(s) => s,
            Err(e) => return fail(req, Err(mlx_error(&e)), turn),
        };
        let window = sampler.penalty_window();
        let opts = &req.opts;
        let plain_greedy = sampler.is_greedy()
            && window == 0
            && !opts.uses_presence_frequency()
            && opts.logit_bias.is_empty()
            && !opts.logprobs;
        if self.rows.is_empty() {
            // A busy spell begins: the calls' peak memory is this spell's.
            memory::reset_peak();
        }
        let (caches, cached) = found.unwrap_or_else(|| (self.model.new_caches(bounds.context), 0));
        let detok = StreamDecoder::new(&self.tokenizer.inner, &req.prompt);
        self.admitted += 1;
        let row = Row {
            order: self.admitted,
            seq: Sequence::new(&req.opts, &self.tokenizer.eos, detok),
            read: req.prompt[req.prompt.len().saturating_sub(window)..]
                .iter()
                .copied()
                .collect(),
            sampler,
            window,
            sampled: Vec::new(),
            reply: String::new(),
            clock: Clock::start(req.queued),
            ready: Vec::new(),
            cached,
            place: Place::Prefill {
                caches,
                feed: req.prompt[cached..].to_vec(),
                done: 0,
            },
            pending: None,
            next: None,
            paused: false,
            stop_asked,
            plain_greedy,
            end: None,
            turn,
            req,
        };
        self.rows.push(row);
    }

    /// Starts a paused row again: its prompt and every token so far are
    /// prefilled, then it draws its next token as if never paused.
    fn resume(&mut self, mut row: Row<'a>) {
        let mut feed = row.req.prompt.clone();
        feed.extend_from_slice(&row.sampled);
        row.place = Place::Prefill {
            caches: self.model.new_caches(self.shared.bounds().context),
            feed,
            done: 0,
        };
        row.paused = false;
        self.rows.push(row);
    }

    /// One pass: a prefill chunk, the budget, a decode step, the reads.
    fn pass(&mut self) -> Result<(), Error> {
        let t_prefill = Instant::now();
        let first_draw = self.unread.len();
        self.prefill_chunk()?;
        self.deliver_first_tokens(first_draw);
        self.slow.prefill += t_prefill.elapsed();
        self.keep_to_budget();
        let t0 = Instant::now();
        let before = self.steps;
        self.step()?;
        let t1 = Instant::now();
        self.read_back();
        self.slow.build += t1 - t0;
        self.slow.wait += t1.elapsed();
        if self.steps > before {
            self.profile.steps += 1;
            self.profile.rows += self
                .fresh
                .iter()
                .map(|d| d.scores.len() as u64)
                .sum::<u64>();
            self.profile.build += t1 - t0;
            self.profile.wait += t1.elapsed();
        }
        std::mem::swap(&mut self.unread, &mut self.fresh);
        self.fresh.clear();
        Ok(())
    }

    /// Prefills one chunk of the oldest prefilling row; when its prompt is
    /// done, draws its first token (queued, unread).
    fn prefill_chunk(&mut self) -> Result<(), Error> {
        let decoding = self.rows.iter().any(Row::decoding);
        let bounds = self.shared.bounds();
        let chunk = if decoding {
            bounds.chunk.min(INTERLEAVED_CHUNK)
        } else {
            bounds.chunk
        }
        .max(1);
        let Some(r) = self.rows.iter().position(Row::prefilling) else {
            return Ok(());
        };
        if self.rows[r].req.sink.is_cancelled() {
            if self.tp.is_none() {
                self.rows[r].end = Some(Ok(FinishReason::Cancelled));
                return Ok(());
            }
            // Every rank ends it at the next draw.
            self.rows[r].stop_asked = true;
        }
        let group = self.prefill_group(r, chunk);
        if group.len() > 1 {
            return self.prefill_together(&group);
        }
        let model = self.model;
        let row = &mut self.rows[r];
        let Place::Prefill {
            caches, feed, done, ..
        } = &mut row.place
        else {
            return Ok(());
        };
        let rest = &feed[*done..];
        if rest.len() > chunk {
            let part = &rest[..chunk];
            model
                .hidden(&Array::from_slice(part, &[1, chunk as i32]), caches)
                .map_err(mlx_error)?;
            let state: Vec<&Array> = caches.iter().flat_map(LayerCache::arrays).collect();
            eval(state).map_err(mlx_error)?;
            *done += chunk;
            return Ok(());
        }
        let h = model
            .hidden_last(&Array::from_slice(rest, &[1, rest.len() as i32]), caches)
            .map_err(mlx_error)?;
        let logits = model.logits(&last_position(&h)).map_err(mlx_error)?;
        let draw = row.draw(&logits, None).map_err(mlx_error)?;
        draw.queue().map_err(mlx_error)?;
        let Place::Prefill { caches, .. } = std::mem::replace(&mut row.place, Place::None) else {
            return Ok(());
        };
        row.place = Place::Alone(caches);
        row.pending = Some(Pending {
            draw: self.unread.len(),
            index: 0,
            read: false,
        });
        self.unread.push(draw);
        Ok(())
    }

    /// Rows to prefill with row `r` in one forward pass: prompts of the same
    /// length on fresh caches, `chunk` tokens in all (at least `r`).
    fn prefill_group(&self, r: usize, chunk: usize) -> Vec<usize> {
        let fresh = |row: &Row| match &row.place {
            Place::Prefill { caches, done, .. } => {
                *done == 0 && caches.iter().all(|c| c.offset() == 0)
            }
            _ => false,
        };
        let len = |row: &Row| match &row.place {
            Place::Prefill { feed, .. } => feed.len(),
            _ => 0,
        };
        let first = &self.rows[r];
        let l = len(first);
        if !fresh(first) || l > chunk {
            return vec![r];
        }
        let most = (chunk / l.max(1)).max(1);
        let mut group = vec![r];
        for (i, row) in self.rows.iter().enumerate().skip(r + 1) {
            if group.len() >= most {
                break;
            }
            if fresh(row) && len(row) == l && row.end.is_none() && !row.req.sink.is_cancelled() {
                group.push(i);
            }
        }
        group
    }

    /// Prefills the prompts of `group` (one length, fresh caches) as one
    /// batch, then splits the caches and draws each row's first token.
    fn prefill_together(&mut self, group: &[usize]) -> Result<(), Error> {
        let model = self.model;
        let mut flat = Vec::new();
        for &i in group {
            if let Place::Prefill { feed, .. } = &self.rows[i].place {
                flat.extend_from_slice(feed);
            }
        }
        let g = group.len();
        let l = flat.len() / g;
        let mut caches = model.new_caches(self.shared.bounds().context);
        let h = model
            .hidden_last(
                &Array::from_slice(&flat, &[g as i32, l as i32]),
                &mut caches,
            )
            .map_err(mlx_error)?;
        let logits = model.logits(&last_position(&h)).map_err(mlx_error)?;
        let mut split: Vec<std::vec::IntoIter<LayerCache>> = caches
            .iter()
            .map(|c| c.split_rows(g).map(Vec::into_iter))
            .collect::<Result<_, _>>()
            .map_err(mlx_error)?;
        for (k, &i) in group.iter().enumerate() {
            let own: Vec<LayerCache> = split.iter_mut().filter_map(Iterator::next).collect();
            let row = &mut self.rows[i];
            let draw = row
                .draw(&logits.index(k as i32..k as i32 + 1), None)
                .map_err(mlx_error)?;
            draw.queue().map_err(mlx_error)?;
            row.place = Place::Alone(own);
            row.pending = Some(Pending {
                draw: self.unread.len(),
                index: 0,
                read: false,
            });
            self.unread.push(draw);
        }
        Ok(())
    }

    /// With a KV budget: pauses the newest decoding rows while the next
    /// step would outgrow it; a row alone that would ends with an error.
    fn keep_to_budget(&mut self) {
        let Some(budget) = self.limits.kv_budget else {
            return;
        };
        loop {
            // Holes hold memory until the batch is compacted.
            if self.batch.as_ref().is_some_and(|b| b.live() < b.slots()) {
                if let Err(e) = self.compact_batch() {
                    tracing::warn!(error = %e, "cannot compact the batch");
                }
            }
            let growth: u64 = self
                .rows
                .iter()
                .filter(|r| !r.paused && r.end.is_none())
                .map(|r| match &r.place {
                    Place::Alone(c) => c.iter().map(LayerCache::growth).sum(),
                    _ => 0,
                })
                .sum::<u64>()
                + self.batch.as_ref().map_or(0, BatchKv::growth);
            let used = self.kv_bytes();
            if used + growth <= budget {
                return;
            }
            let mut live: Vec<usize> = (0..self.rows.len())
                .filter(|&i| {
                    let r = &self.rows[i];
                    !r.paused && r.end.is_none() && !matches!(r.place, Place::None)
                })
                .collect();
            live.sort_by_key(|&i| self.rows[i].order);
            let Some(&newest) = live.last() else { return };
            if live.len() == 1 {
                let row = &mut self.rows[newest];
                row.end = Some(Err(Error::MemoryBudget {
                    needed: used + growth,
                    budget,
                }));
                self.drop_cache(newest);
                return;
            }
            tracing::debug!(
                order = self.rows[newest].order,
                used,
                growth,
                budget,
                "pausing a call"
            );
            self.rows[newest].paused = true;
            self.shared.counters.paused.fetch_add(1, Ordering::Relaxed);
            self.drop_cache(newest);
        }
    }

    /// Frees row `r`'s cache (its batch row becomes a hole).
    fn drop_cache(&mut self, r: usize) {
        if let Place::Batch(b) = std::mem::replace(&mut self.rows[r].place, Place::None) {
            if let Some(batch) = self.batch.as_mut() {
                batch.leave(b);
            }
        }
    }

    /// Queues one decode step of every row that takes one.
    fn step(&mut self) -> Result<(), Error> {
        let limit = self.shared.bounds().limit;
        // Under tensor parallelism a row whose caller left still steps on
        // until every rank reads rank 0's stop flag.
        let lockstep = self.tp.is_some();
        let steppers: Vec<usize> = (0..self.rows.len())
            .filter(|&i| {
                let r = &self.rows[i];
                r.decoding()
                    && r.pending.is_some()
                    && r.wants_step(limit)
                    && (lockstep || !r.req.sink.is_cancelled())
            })
            .collect();
        // Rows in the batch that take no step leave it now (keeping their
        // cache where it outlives them).
        let keep_all = self.prompt_cache.enabled();
        let mut stepping = vec![false; self.rows.len()];
        for &i in &steppers {
            stepping[i] = true;
        }
        for (i, &steps) in stepping.iter().enumerate() {
            if steps {
                continue;
            }
            if let Place::Batch(b) = self.rows[i].place {
                let batch = self.batch.as_mut().ok_or_else(no_batch)?;
                let keep = self.rows[i].keeps_cache(keep_all)
                    && self.rows[i].end.is_none()
                    && !self.rows[i].paused;
                self.rows[i].place = if keep {
                    Place::Alone(batch.extract(b).map_err(mlx_error)?)
                } else {
                    Place::None
                };
                batch.leave(b);
            }
        }
        if steppers.is_empty() {
            self.settle_batch()?;
            return Ok(());
        }
        self.steps += 1;
        if self.steps % memory::CLEAR_CACHE_EVERY as u64 == 0 {
            memory::clear_cache();
        }
        self.shared.counters.step(steppers.len());
        if steppers.len() == 1 {
            return self.step_alone(steppers[0]);
        }
        self.step_batch(&steppers)
    }

    /// Drops the batch's holes when they are many, and the batch when no
    /// row is left.
    fn settle_batch(&mut self) -> Result<(), Error> {
        let Some(batch) = self.batch.as_mut() else {
            return Ok(());
        };
        let holes = batch.slots() - batch.live();
        if batch.live() == 0 {
            self.batch = None;
            return Ok(());
        }
        if holes * 2 > batch.slots() {
            self.compact_batch()?;
        }
        Ok(())
    }

    /// Drops the batch's holes, renumbering the rows in it.
    fn compact_batch(&mut self) -> Result<(), Error> {
        let Some(batch) = self.batch.as_mut() else {
            return Ok(());
        };
        let map = batch.compact().map_err(mlx_error)?;
        for row in &mut self.rows {
            if let Place::Batch(b) = row.place {
                row.place = Place::Batch(map[b].ok_or_else(no_batch)?);
            }
        }
        Ok(())
    }

    /// A decode step of row `r` alone, on caches of its own (a row that was
    /// in the batch takes its cache out first).
    fn step_alone(&mut self, r: usize) -> Result<(), Error> {
        if let Place::Batch(b) = self.rows[r].place {
            let batch = self.batch.as_mut().ok_or_else(no_batch)?;
            let caches = batch.extract(b).map_err(mlx_error)?;
            batch.leave(b);
            self.rows[r].place = Place::Alone(caches);
        }
        self.settle_batch()?;
        let model = self.model;
        let row = &mut self.rows[r];
        let pending = row.pending.ok_or_else(no_batch)?;
        let ids = &self.unread[pending.draw].ids;
        let y = if ids.dim(0) == 1 {
            ids.clone()
        } else {
            ids.index(pending.index as i32..pending.index as i32 + 1)
        };
        let Place::Alone(caches) = &mut row.place else {
            return Err(no_batch());
        };
        let input = y.reshape(&[1, 1]).map_err(mlx_error)?;
        let h = model.hidden(&input, caches).map_err(mlx_error)?;
        let logits = model.logits(&last_position(&h)).map_err(mlx_error)?;
        // An id already read back is among the row's recent ids.
        let unread = (!pending.read).then_some(&y);
        let draw = row.draw(&logits, unread).map_err(mlx_error)?;
        let t_queue = Instant::now();
        draw.queue().map_err(mlx_error)?;
        self.profile.queue += t_queue.elapsed();
        row.next = Some(Pending {
            draw: self.fresh.len(),
            index: 0,
            read: false,
        });
        self.fresh.push(draw);
        Ok(())
    }

    /// A decode step of `steppers` (two or more) as one batch.
    fn step_batch(&mut self, steppers: &[usize]) -> Result<(), Error> {
        let model = self.model;
        let t_join = Instant::now();
        // Everyone joins the batch.
        for &i in steppers {
            if matches!(self.rows[i].place, Place::Batch(_)) {
                continue;
            }
            let Place::Alone(caches) = std::mem::replace(&mut self.rows[i].place, Place::None)
            else {
                return Err(no_batch());
            };
            let buckets = self.bucket_batches;
            let batch = self
                .batch
                .get_or_insert_with(|| BatchKv::new(&caches).with_buckets(buckets));
            let b = batch.join(&caches).map_err(mlx_error)?;
            self.rows[i].place = Place::Batch(b);
        }
        self.settle_batch()?;
        let batch = self.batch.as_mut().ok_or_else(no_batch)?;
        let n = batch.slots();
        // Batch row → row.
        let mut owner: Vec<Option<usize>> = vec![None; n];
        for &i in steppers {
            if let Place::Batch(b) = self.rows[i].place {
                owner[b] = Some(i);
            }
        }
        // Each row's pending id (a hole feeds id 0): the last step's draw as
        // it is when every row is where it was, else gathered.
        let zero = Array::from_slice(&[0u32], &[1]);
        let pendings: Vec<Option<Pending>> = owner
            .iter()
            .map(|o| o.and_then(|i| self.rows[i].pending))
            .collect();
        let whole = match pendings.first().copied().flatten() {
            Some(first) => {
                let ids = &self.unread[first.draw].ids;
                (ids.dim(0) == n as i32
                    && pendings
                        .iter()
                        .enumerate()
                        .all(|(b, p)| p.is_some_and(|p| p.draw == first.draw && p.index == b)))
                .then(|| ids.clone())
            }
            None => None,
        };
        let pending_id = |p: Pending| {
            self.unread[p.draw]
                .ids
                .index(p.index as i32..p.index as i32 + 1)
        };
        let input = match &whole {
            Some(ids) => ids.clone(),
            None => {
                let parts: Vec<Array> = pendings
                    .iter()
                    .map(|p| p.map_or_else(|| zero.clone(), pending_id))
                    .collect();
                concatenate(&parts, 0).map_err(mlx_error)?
            }
        }
        .reshape(&[n as i32, 1])
        .map_err(mlx_error)?;
        let t_prepare = Instant::now();
        batch.prepare_step().map_err(mlx_error)?;
        let t_forward = Instant::now();
        let h = model
            .hidden(&input, batch.layers_mut())
            .map_err(mlx_error)?;
        batch.finish_step();
        let logits = model.logits(&last_position(&h)).map_err(mlx_error)?;
        let t_draw = Instant::now();
        self.slow.join += t_prepare - t_join;
        self.slow.prepare += t_forward - t_prepare;
        self.slow.forward += t_draw - t_forward;
        // Draw: one argmax for every row when none needs more.
        let together = owner.iter().flatten().all(|&i| self.rows[i].plain_greedy);
        let draw = if together {
            Draw {
                ids: argmax_axis(&logits, -1, false)
                    .and_then(|a| a.as_dtype(Dtype::Uint32))
                    .map_err(mlx_error)?,
                scores: vec![None; n],
                host: None,
                stop: None,
            }
        } else {
            let mut ids = Vec::with_capacity(n);
            let mut scores = Vec::with_capacity(n);
            for (b, o) in owner.iter().enumerate() {
                let Some(i) = o else {
                    ids.push(zero.clone());
                    scores.push(None);
                    continue;
                };
                let pending = match (pendings[b], self.rows[*i].window) {
                    // An id already read back is among the row's recent ids.
                    (Some(p), w) if w > 0 && !p.read => Some(pending_id(p)),
                    _ => None,
                };
                let row_logits = logits.index(b as i32..b as i32 + 1);
                let one = self.rows[*i]
                    .draw(&row_logits, pending.as_ref())
                    .map_err(mlx_error)?;
                ids.push(one.ids);
                scores.push(one.scores.into_iter().next().flatten());
            }
            Draw {
                ids: concatenate(&ids, 0).map_err(mlx_error)?,
                scores,
                host: None,
                stop: None,
            }
        };
        let t_queue = Instant::now();
        draw.queue().map_err(mlx_error)?;
        let queued = t_queue.elapsed();
        self.slow.draw += t_queue - t_draw;
        self.slow.queue += queued;
        self.profile.queue += queued;
        let d = self.fresh.len();
        self.fresh.push(draw);
        for (b, o) in owner.iter().enumerate() {
            if let Some(i) = o {
                self.rows[*i].next = Some(Pending {
                    draw: d,
                    index: b,
                    read: false,
                });
            }
        }
        Ok(())
    }

    /// Reads back every pending id and streams it; rows without a next
    /// step end (or, paused, wait to resume).
    fn read_back(&mut self) {
        for i in 0..self.rows.len() {
            let row = &mut self.rows[i];
            let Some(p) = row.pending.take() else {
                continue;
            };
            let next = row.next.take();
            if row.end.is_some() {
                continue;
            }
            if p.read {
                // Delivered when its prefill ended; a row the step left out
                // was cancelled, or paused to wait for room.
                match next {
                    Some(n) => row.pending = Some(n),
                    None if row.paused => {}
                    None => row.end = Some(Ok(FinishReason::Cancelled)),
                }
                continue;
            }
            let last = next.is_none() && !row.paused;
            if self.deliver(i, p, last) {
                self.rows[i].pending = next;
            }
        }
    }

    /// Delivers the first token of each row whose prefill ended in this
    /// pass at once, before the pass queues its decode step: a caller's
    /// first token waits for its prefill alone, not also for the building
    /// and queueing of a step of the whole batch (which, joins and new
    /// shapes included, can take tens of milliseconds on a GPU). The GPU
    /// idles while that step is built, once per arrival (with
    /// [`EagerFirst::WhenAlone`], only where no other call waits or is
    /// still prefilling). Not under tensor parallelism, where reads follow
    /// rank 0's lock step.
    fn deliver_first_tokens(&mut self, first_draw: usize) {
        // Most passes drew nothing in their prefill: nothing to deliver.
        if self.unread.len() == first_draw || self.tp.is_some() {
            return;
        }
        let others_pending = || !self.waiting.is_empty() || self.rows.iter().any(Row::prefilling);
        if !self.eager_first.now(others_pending) {
            return;
        }
        let limit = self.shared.bounds().limit;
        for i in 0..self.rows.len() {
            let Some(p) = self.rows[i].pending else {
                continue;
            };
            if p.read || p.draw < first_draw || self.rows[i].end.is_some() {
                continue;
            }
            let last = !self.rows[i].wants_step(limit);
            self.rows[i].pending = None;
            if self.deliver(i, p, last) {
                self.rows[i].pending = Some(Pending { read: true, ..p });
            }
        }
    }

    /// Reads row `i`'s id at `p` and streams it, `last` when no step
    /// follows it; ends the row where it ended (a stop, an error, a caller
    /// gone, or `last`). Whether the row goes on.
    fn deliver(&mut self, i: usize, p: Pending, last: bool) -> bool {
        // Under tensor parallelism a call ends early only where rank 0's
        // flag says so (the same draw on every rank).
        let lockstep = self.tp.is_some();
        let row = &mut self.rows[i];
        let read = self.unread[p.draw]
            .read(p.index)
            .and_then(|x| Ok((x, self.unread[p.draw].stopped()?)));
        let (id, scores) = match read {
            Ok((x, false)) => x,
            Ok((_, true)) => {
                tracing::debug!("rank 0's caller left: the call ends on every rank");
                row.end = Some(Ok(FinishReason::Cancelled));
                return false;
            }
            Err(e) => {
                if let Some(g) = self.tp.as_ref().map(Tp::group) {
                    // A collective of this step failed: the ranks may
                    // have parted.
                    g.mark_broken();
                }
                row.end = Some(Err(mlx_error(&e)));
                return false;
            }
        };
        row.clock.token();
        row.sampled.push(id);
        if row.window > 0 {
            row.read.push_back(id);
            if row.read.len() > row.window {
                row.read.pop_front();
            }
        }
        let end = match row.seq.push_scored(id, scores, last, &mut row.ready) {
            Ok(end) => end,
            Err(e) => {
                row.end = Some(Err(mlx_error(&e)));
                return false;
            }
        };
        let reply = row.turn.is_some().then_some(&mut row.reply);
        let gone =
            !stream_tokens(&row.req.sink, &mut row.ready, reply) || row.req.sink.is_cancelled();
        if gone && lockstep {
            // Every rank ends it at the next draw.
            row.stop_asked = true;
        }
        if let Some(reason) = end {
            row.end = Some(Ok(reason));
        } else if gone && !lockstep {
            row.end = Some(Ok(FinishReason::Cancelled));
        } else if last {
            // `max_tokens` or the end of the context: a normal end with
            // the tokens kept.
            row.seq.finish(&mut row.ready);
            let reply = row.turn.is_some().then_some(&mut row.reply);
            // Under tensor parallelism every rank ends it alike (whether
            // it is kept in the prompt cache depends on it).
            let delivered = stream_tokens(&row.req.sink, &mut row.ready, reply);
            row.end = Some(if delivered || lockstep {
                Ok(FinishReason::Length)
            } else {
                Ok(FinishReason::Cancelled)
            });
        } else {
            return true;
        }
        false
    }

    /// Ends the rows that ended and requeues the paused ones.
    fn retire(&mut self) {
        let mut i = 0;
        let mut paused = Vec::new();
        while i < self.rows.len() {
            let row = &self.rows[i];
            let done = row.end.is_some();
            let pause = !done && row.paused && row.pending.is_none();
            if !done && !pause {
                i += 1;
                continue;
            }
            let mut row = self.rows.remove(i);
            if let Place::Batch(b) = row.place {
                if let Some(batch) = self.batch.as_mut() {
                    let keep = done
                        && row.keeps_cache(self.prompt_cache.enabled())
                        && matches!(row.end, Some(Ok(FinishReason::Stop | FinishReason::Length)));
                    row.place = match batch.extract(b) {
                        Ok(c) if keep => Place::Alone(c),
                        _ => Place::None,
                    };
                    batch.leave(b);
                }
            }
            if done {
                self.finish(row);
            } else {
                row.place = Place::None;
                paused.push(row);
            }
        }
        // The paused wait at the front, oldest first.
        paused.sort_by_key(|r| std::cmp::Reverse(r.order));
        for row in paused {
            self.waiting.push_front(Waiting::Paused(row));
        }
        if self.batch.as_ref().is_some_and(|b| b.live() == 0) {
            self.batch = None;
        }
    }

    /// Ends every running row with `e` (a failed forward pass).
    fn fail_running(&mut self, e: &Error) {
        let message = match e {
            Error::Backend { message, .. } => message.clone(),
            other => other.to_string(),
        };
        for row in &mut self.rows {
            if row.end.is_none() {
                row.end = Some(Err(Error::backend(crate::error::NAME, message.clone())));
            }
            row.pending = None;
            row.place = Place::None;
        }
        self.batch = None;
        self.unread.clear();
        self.fresh.clear();
    }

    /// Reports a finished row: its metrics, its stream's end, and its
    /// cache to its session or to the prompt cache.
    fn finish(&mut self, mut row: Row<'a>) {
        let end = row.end.take().unwrap_or(Ok(FinishReason::Length));
        let metrics = row
            .clock
            .metrics(row.req.prompt.len(), row.seq.generated())
            .with_memory(memory::peak(), memory::active())
            .with_cached_prompt_tokens(row.cached);
        self.shared.set_metrics(&metrics);
        let good = matches!(end, Ok(FinishReason::Stop | FinishReason::Length));
        let caches = match std::mem::replace(&mut row.place, Place::None) {
            Place::Alone(c) if good => Some(c),
            _ => None,
        };
        let kept = caches.and_then(|c| {
            let offset = c
                .first()
                .map_or(0, |c| usize::try_from(c.offset()).unwrap_or(0));
            cached_ids(&row.req.prompt, &row.sampled, offset).map(|ids| (c, ids))
        });
        match row.turn.take() {
            Some(t) => {
                if good {
                    if let (Some((caches, ids)), true) = (kept, t.keep) {
                        self.sessions.insert(t.id, SessionCache { caches, ids });
                    }
                    t.turn.commit(std::mem::take(&mut row.reply));
                }
            }
            None => {
                if let Some((caches, ids)) = kept {
                    self.prompt_cache.insert(ids, caches);
                }
            }
        }
        finish_sink(row.req, metrics, end);
    }
}

fn finish_sink(req: Request, metrics: GenerateMetrics, end: Result<FinishReason, Error>) {
    match end {
        Ok(reason) => req.sink.finish(metrics, reason),
        Err(e) => req.sink.fail(e),
    }
}

fn no_batch() -> Error {
    Error::backend(crate::error::NAME, "the scheduler lost track of a row")
}

/// One row's draw from `logits` `[1, V]` by `sampler`, scored when asked.
fn draw_one(
    sampler: &mut Sampler,
    logits: &Array,
    recent: Option<&Array>,
    logprobs: bool,
    top: usize,
    stop: bool,
) -> Result<Draw, Exception> {
    // Under tensor parallelism every rank feeds rank 0's draw, and ends the
    // call where rank 0 does.
    let (id, stop) = crate::distributed::agree(sampler.sample(logits, recent)?, stop)?;
    let scores = if logprobs {
        Some(logprobs_of(logits, &id, top)?)
    } else {
        None
    };
    // No graph nodes when the sampler's id is already `[1]` uint32.
    let id = if id.dtype() == Dtype::Uint32 {
        id
    } else {
        id.as_dtype(Dtype::Uint32)?
    };
    let ids = if id.shape() == [1] {
        id
    } else {
        id.reshape(&[1])?
    };
    Ok(Draw {
        ids,
        scores: vec![scores],
        host: None,
        stop,
    })
}

#[cfg(test)]
mod tests {
    use super::EagerFirst;

    /// `auto` (also nothing, or an unknown value) reads a first token
    /// early only for a call that arrived alone; `1` always, `0` never.
    #[test]
    fn eager_first_settings() {
        assert_eq!(EagerFirst::parse(None), EagerFirst::WhenAlone);
        assert_eq!(EagerFirst::parse(Some("0")), EagerFirst::Off);
        assert_eq!(EagerFirst::parse(Some("yes")), EagerFirst::WhenAlone);
        assert_eq!(EagerFirst::parse(Some("1")), EagerFirst::Always);
        assert_eq!(EagerFirst::parse(Some("auto")), EagerFirst::WhenAlone);
        for others in [false, true] {
            assert!(!EagerFirst::Off.now(|| others));
            assert!(EagerFirst::Always.now(|| others));
        }
        assert!(EagerFirst::WhenAlone.now(|| false));
        assert!(!EagerFirst::WhenAlone.now(|| true));
    }
}

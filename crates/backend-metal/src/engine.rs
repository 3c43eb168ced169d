//! [`MlxModel`]: a loaded model served by a worker thread that owns every MLX
//! array of the model, so calls queue and never share a KV cache.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Instant;

use inference_core::{
    BatchResult, ChatSession, ClassifyResult, Error, GenerateMetrics, GenerateOptions, LastMetrics,
    LoadOptions, Message, ModelInfo, Result, TextModel, TokenStream,
};
use mlx_rs::Device;

use crate::cache::Rotation;
use crate::error::LoadError;
use crate::generate::{self, Request};
use crate::gguf::{self, reader::GgufFile};
use crate::load::config::ModelConfig;
use crate::load::weights::Weights;
use crate::memory;
use crate::models::{self, CausalLm};
use crate::session;
use crate::template::ChatTemplate;
use crate::tokenizer::ModelTokenizer;

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
    /// A continuation of each prompt, batched.
    Batch {
        prompts: Vec<Vec<u32>>,
        opts: GenerateOptions,
        reply: Sender<Vec<BatchResult>>,
    },
    /// One turn of a chat session, on the session's KV cache.
    Turn(session::TurnJob),
    /// A chat session ended or was reset: its KV cache is freed.
    EndSession(u64),
}

/// A model loaded by the MLX backend.
pub struct MlxModel {
    worker: Arc<Worker>,
    shared: Arc<Shared>,
    info: ModelInfo,
}

/// The model's worker thread and the only sender of its jobs.
///
/// When the last holder (the model, or a chat session that outlives it) drops
/// it, the job channel closes, the worker finishes the call in flight and
/// frees the model's arrays, and the drop waits for that: no MLX work may
/// still be running when the process exits and MLX's own globals are torn
/// down (that race corrupted the heap at exit).
pub(crate) struct Worker {
    jobs: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl Worker {
    /// Queues `job`; fails when the worker has stopped.
    pub(crate) fn send(&self, job: Job) -> Result<()> {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .ok_or_else(|| Error::backend(crate::NAME, "the model worker has stopped"))?
            .send(job)
            .map_err(|_| Error::backend(crate::NAME, "the model worker has stopped"))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(
            self.jobs
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let handle = self
            .thread
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            // The worker never holds its own handle, but guard against joining
            // ourselves all the same.
            if handle.thread().id() != thread::current().id() && handle.join().is_err() {
                tracing::warn!("the model worker panicked");
            }
        }
    }
}

/// What the caller's side and the worker share.
pub(crate) struct Shared {
    pub(crate) tokenizer: ModelTokenizer,
    /// The chat template (the model's or a built-in one), or why `chat`
    /// cannot run.
    template: std::result::Result<ChatTemplate, String>,
    /// Most positions (prompt + generated) one call may use: the model's
    /// `max_position_embeddings`, or unbounded where the load allowed
    /// positions past it.
    context_limit: usize,
    /// `LoadOptions::context_len` and `sink_tokens`: what each cache keeps.
    context: Option<Rotation>,
    last_metrics: LastMetrics,
    /// Prompt tokens per prefill forward pass.
    prefill_chunk: AtomicUsize,
    /// Prompt tokens chat-session turns took from their KV caches.
    reused_tokens: AtomicUsize,
}

impl Shared {
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

/// The device a model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// MLX's default device (the GPU where there is one).
    Default,
    /// The CPU.
    Cpu,
    /// The GPU.
    Gpu,
}

/// Refuses load options this backend cannot honour.
pub fn check_load_options(opts: &LoadOptions) -> Result<()> {
    opts.validate()?;
    if opts.gpu_layers > 0 {
        return Err(Error::unsupported(format!(
            "gpu_layers = {} (MLX places a whole model on one device: use -1 or 0)",
            opts.gpu_layers
        )));
    }
    if opts.parallel_slots > 1 {
        return Err(Error::unsupported(
            "parallel_slots > 1 (calls on one model queue)",
        ));
    }
    if opts.adapter_path.is_some() {
        return Err(Error::unsupported("LoRA adapters"));
    }
    Ok(())
}

type Ready = std::result::Result<ModelInfo, LoadError>;

impl MlxModel {
    /// Loads the model directory `path` on `placement`.
    pub fn load(path: &Path, opts: &LoadOptions, placement: Placement) -> Result<Self> {
        check_load_options(opts)?;
        let started = Instant::now();
        let path = &inference_core::resolve_model_path(path)?;
        let (config, tokenizer, source) = open(path)?;
        let max_positions = config.max_position_embeddings;
        if let Some(n) = opts.context_len {
            if n > max_positions && !opts.allow_past_max_positions {
                return Err(Error::invalid_option(
                    "context_len",
                    format!(
                        "{n} is more than the model's max_position_embeddings ({max_positions}); \
                         allow_past_max_positions lets positions go past it"
                    ),
                ));
            }
        }
        if opts.allow_past_max_positions {
            tracing::warn!(
                max_positions,
                "positions may pass the model's max_position_embeddings: RoPE extrapolates \
                 and quality usually falls"
            );
        }
        memory::apply_limits(
            opts.memory_limit_bytes,
            opts.cache_limit_bytes,
            opts.wired_limit_bytes,
        )
        .map_err(|e| Error::backend(crate::NAME, format!("memory limits: {e}")))?;
        let template = tokenizer
            .chat_template_for(&config.model_type)
            .map_err(|e| match e {
                Error::Unsupported { feature } => feature,
                other => other.to_string(),
            });
        // Not a warning: `chat` reports it as its error, in one line, and
        // `generate` does not need a template.
        match &template {
            Ok(t) => tracing::debug!(builtin = ?t.builtin_kind(), "chat template ready"),
            Err(why) => tracing::debug!(%why, "chat is unavailable for this model"),
        }
        let shared = Arc::new(Shared {
            tokenizer,
            template,
            context_limit: if opts.allow_past_max_positions {
                usize::MAX
            } else {
                max_positions
            },
            context: opts.context_len.map(|window| Rotation {
                window,
                sinks: opts.sink_tokens,
            }),
            last_metrics: LastMetrics::new(),
            prefill_chunk: AtomicUsize::new(generate::PREFILL_CHUNK),
            reused_tokens: AtomicUsize::new(0),
        });

        let (ready_tx, ready_rx) = sync_channel::<Ready>(1);
        let (jobs, queue) = channel::<Job>();
        let dtype = opts.dtype;
        let worker_shared = Arc::clone(&shared);
        let handle = thread::Builder::new()
            .name("mlx-model".into())
            .spawn(move || {
                let on_cpu = match placement {
                    Placement::Cpu => true,
                    Placement::Gpu => false,
                    Placement::Default => !crate::mlx().default_is_gpu,
                };
                if on_cpu {
                    // MLX's CPU matmuls use one core each: split them over
                    // the machine's cores (at most 8).
                    let cores = thread::available_parallelism().map_or(1, |n| n.get());
                    crate::models::layers::split_cpu_matmuls(cores.min(8));
                }
                let body = move || {
                    let context = worker_shared
                        .context
                        .map_or(config.max_position_embeddings, |r| r.window);
                    let built = build(source, &config, dtype, context);
                    match built {
                        Ok((model, info)) => {
                            let _ = ready_tx.send(Ok(info));
                            serve(&*model, &worker_shared, queue);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                };
                // The default placement stays on MLX's default stream: a
                // stream of the worker's own (as mlx-lm generates on) made
                // each decode step's dispatch 2–4× slower on the CUDA backend
                // (measured on an H200; docs/benchmarks.md).
                match placement {
                    Placement::Default => body(),
                    Placement::Cpu => mlx_rs::with_device(Device::cpu(), body),
                    Placement::Gpu => mlx_rs::with_device(Device::gpu(), body),
                }
            })
            .map_err(|e| {
                Error::backend(crate::NAME, format!("cannot start the model worker: {e}"))
            })?;
        let worker = Arc::new(Worker {
            jobs: Mutex::new(Some(jobs)),
            thread: Mutex::new(Some(handle)),
        });
        let mut info = match ready_rx.recv() {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => return Err(e.into_error(path)),
            Err(_) => {
                return Err(Error::backend(
                    crate::NAME,
                    "the model worker stopped while loading",
                ))
            }
        };
        info.chat_template = shared.tokenizer.chat_template.is_some();
        tracing::info!(
            model_type = %info.architecture,
            parameters = info.parameter_count,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "loaded"
        );
        Ok(Self {
            worker,
            shared,
            info,
        })
    }

    fn submit(&self, prompt: Vec<u32>, opts: &GenerateOptions) -> Result<TokenStream> {
        self.shared.check_prompt(&prompt, self.info.vocab_size)?;
        let (sink, stream) = TokenStream::channel();
        self.send(Job::Generate(Request {
            prompt,
            opts: opts.clone(),
            sink,
            queued: Instant::now(),
        }))?;
        Ok(stream)
    }

    fn send(&self, job: Job) -> Result<()> {
        self.worker.send(job)
    }

    /// The chat template the model ships (`tokenizer_config.json` or
    /// `chat_template.jinja`), if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.shared.tokenizer.chat_template.as_deref()
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.shared.tokenizer.bos
    }

    /// Every end-of-sequence id.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.shared.tokenizer.eos
    }

    /// How many prompt tokens the turns of this model's chat sessions took
    /// from their KV caches instead of prefilling them, in all so far.
    pub fn reused_prompt_tokens(&self) -> usize {
        self.shared.reused_tokens.load(Ordering::Relaxed)
    }

    /// Sets how many prompt tokens one prefill forward pass takes (default
    /// 2,048, as mlx-lm); calls already queued may use either value. Values
    /// below 1 count as 1.
    pub fn set_prefill_chunk(&self, tokens: usize) {
        self.shared
            .prefill_chunk
            .store(tokens.max(1), Ordering::Relaxed);
    }

    /// The prompt text [`chat`](TextModel::chat) renders for `messages` with
    /// `opts.template_args` (the assistant's turn header included).
    pub fn render_chat(&self, messages: &[Message], opts: &GenerateOptions) -> Result<String> {
        self.template()?.render(
            messages,
            &self.shared.tokenizer.special,
            true,
            &opts.template_args,
        )
    }

    /// The prompt ids [`chat`](TextModel::chat) runs for `messages` with
    /// `opts.template_args`: the rendered template, its special tokens
    /// parsed, a BOS in front only where the tokenizer adds one and the
    /// template did not write it.
    pub fn encode_chat(&self, messages: &[Message], opts: &GenerateOptions) -> Result<Vec<u32>> {
        self.shared.encode_chat(messages, opts)
    }

    fn template(&self) -> Result<&ChatTemplate> {
        self.shared
            .template
            .as_ref()
            .map_err(|why| Error::unsupported(why.clone()))
    }

    /// Encodes `text` as [`generate`](TextModel::generate) does: with the
    /// tokenizer's own special-token rules.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.shared
            .tokenizer
            .encode(text)
            .map_err(|e| Error::InvalidInput(format!("cannot encode the prompt: {e}")))
    }

    /// Refuses ids outside the model's vocabulary (MLX would index out of
    /// bounds).
    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        check_ids(ids, self.info.vocab_size)
    }

    /// Encodes each of `prompts` as [`generate`](TextModel::generate) does,
    /// refusing an empty list and empty prompts.
    fn encode_all(&self, prompts: &[String]) -> Result<Vec<Vec<u32>>> {
        if prompts.is_empty() {
            return Err(Error::InvalidInput("no prompts".into()));
        }
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if p.is_empty() {
                    return Err(Error::InvalidInput(format!("prompt {i} is empty")));
                }
                let ids = self.encode(p)?;
                if ids.is_empty() {
                    return Err(Error::InvalidInput(format!(
                        "prompt {i} encodes to no tokens"
                    )));
                }
                self.check_ids(&ids)?;
                Ok(ids)
            })
            .collect()
    }

    /// The log-probability (natural log) the model gives each of `ids[1..]`
    /// after the ids before it, from its raw distribution (log-softmax of
    /// the logits: no sampling options apply), computed as generation would
    /// see it (through rotating caches under a context length). Needs at
    /// least two ids inside the vocabulary and the context.
    pub fn prompt_logprobs(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.len() < 2 {
            return Err(Error::InvalidInput(
                "scoring needs at least two tokens".into(),
            ));
        }
        self.ask_about(ids, |ids, reply| Job::Score { ids, reply })
    }

    /// Checks `ids` (inside the vocabulary and the context), sends the job
    /// `job` makes of them and waits for its answer.
    fn ask_about(
        &self,
        ids: &[u32],
        job: impl FnOnce(Vec<u32>, Sender<Result<Vec<f32>>>) -> Job,
    ) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        if ids.len() > self.shared.context_limit {
            return Err(Error::ContextOverflow {
                needed: ids.len(),
                limit: self.shared.context_limit,
            });
        }
        let (reply, answer) = channel();
        self.send(job(ids.to_vec(), reply))?;
        Self::await_reply(&answer)?
    }

    /// Waits for the worker's answer on `answer`.
    fn await_reply<T>(answer: &Receiver<T>) -> Result<T> {
        answer
            .recv()
            .map_err(|_| Error::backend(crate::NAME, "the model worker stopped"))
    }

    /// Streams the continuation of prompt ids given directly (no tokenizer,
    /// no template), with the same checks as [`generate`](TextModel::generate).
    pub fn generate_ids(&self, ids: Vec<u32>, opts: &GenerateOptions) -> Result<TokenStream> {
        check_generate_options(opts)?;
        self.submit(ids, opts)
    }

    /// [`batch_generate`](TextModel::batch_generate) on prompt ids given
    /// directly (no tokenizer), with the same checks and batching.
    pub fn batch_generate_ids(
        &self,
        prompts: Vec<Vec<u32>>,
        opts: &GenerateOptions,
    ) -> Result<Vec<BatchResult>> {
        check_generate_options(opts)?;
        for p in &prompts {
            self.shared.check_prompt(p, self.info.vocab_size)?;
        }
        let (reply, answer) = channel();
        self.send(Job::Batch {
            prompts,
            opts: opts.clone(),
            reply,
        })?;
        Self::await_reply(&answer)
    }

    /// A session driven by token ids, reusing its KV cache between turns
    /// (see [`IdSession`](crate::IdSession)).
    pub fn id_session(&self) -> crate::IdSession {
        crate::IdSession::new(
            Arc::clone(&self.shared),
            Arc::clone(&self.worker),
            self.info.vocab_size,
        )
    }

    /// The logits (as f32) that the model predicts after `ids`, from one
    /// forward pass over a fresh cache.
    pub fn last_logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::InvalidInput("no tokens".into()));
        }
        self.ask_about(ids, |ids, reply| Job::Logits { ids, reply })
    }
}

/// Loads weights and builds the model, on the worker thread.
fn build(
    source: Source,
    config: &ModelConfig,
    dtype: Option<inference_core::DType>,
    context_length: usize,
) -> std::result::Result<(Box<dyn CausalLm>, ModelInfo), LoadError> {
    let (mut weights, quant, stored_dtype, quant_type) = match source {
        Source::Dir(dir) => {
            let mut w = Weights::load(&dir)?;
            w.set_quantization(&config.quantization_overrides);
            let stored = w
                .float_dtype
                .map(|d| crate::load::dtype_name(d).to_owned())
                .or_else(|| config.dtype.clone())
                .unwrap_or_default();
            let scheme = config.quantization.map(|_| "affine".to_owned());
            (w, config.quantization, stored, scheme)
        }
        Source::Gguf(file) => {
            let arch = config.gguf_architecture.clone().unwrap_or_default();
            let (heads, kv) = gguf::head_counts(&file, &arch);
            let (stored, quantised) = gguf::stored_type(&file);
            let (w, q) = gguf::weights(&file, &arch, heads, kv)?;
            let scheme = quantised.then(|| stored.clone());
            (w, q, stored, scheme)
        }
    };
    if let Some(d) = dtype {
        weights.cast_floats(crate::load::to_mlx_dtype(d))?;
    }
    let mut info = ModelInfo::new(config.model_type.clone());
    info.vocab_size = config.vocab_size as usize;
    info.num_layers = config.num_hidden_layers as usize;
    info.hidden_size = config.hidden_size as usize;
    info.quant_bits = quant.map(|q| q.bits as u32);
    info.quant_group = quant.map(|q| q.group_size as u32);
    info.stored_dtype = stored_dtype;
    info.quant_type = quant_type;
    info.context_length = context_length;
    info.parameter_count = weights.parameter_count(quant.map(|q| q.bits));
    let model = models::build(config, weights)?;
    info.dtype = crate::load::dtype_name(model.dtype()).to_owned();
    Ok((model, info))
}

/// Where a model's weights come from.
enum Source {
    /// A Hugging Face directory.
    Dir(std::path::PathBuf),
    /// A GGUF file (its map travels to the worker).
    Gguf(GgufFile),
}

fn is_gguf(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Reads the configuration and the tokenizer of the model at `path` (cheap:
/// no weights), on the caller's thread so that errors come back at once.
fn open(path: &Path) -> Result<(ModelConfig, ModelTokenizer, Source)> {
    let fail = |e: LoadError| e.into_error(path);
    if is_gguf(path) {
        let file = GgufFile::open(path).map_err(|e| Error::model_load(path, e))?;
        if let Some(n) = file.get_u64("split.count").filter(|&n| n > 1) {
            return Err(Error::unsupported(format!(
                "split GGUF files ({} is one of {n} parts): merge them into one file with \
                 llama.cpp's `llama-gguf-split --merge`",
                path.display()
            )));
        }
        let gguf::Opened {
            architecture: arch,
            tokenizer: tok,
            config: json,
            ..
        } = gguf::open(&file).map_err(fail)?;
        let mut config = ModelConfig::from_value(&json).map_err(fail)?;
        config.bos_token_id = tok.bos;
        config.eos_token_ids = tok.eos.clone();
        config.gguf_architecture = Some(arch);
        let tokenizer = ModelTokenizer::from_parts(
            tok.tokenizer,
            tok.bos,
            tok.eos,
            tok.chat_template,
            tok.unk,
            tok.pad,
        );
        return Ok((config, tokenizer, Source::Gguf(file)));
    }
    if !path.join("config.json").is_file() {
        let why = if path.exists() {
            "has no config.json (and is not a .gguf file)"
        } else {
            "does not exist"
        };
        return Err(Error::model_load(
            path,
            LoadError::Io(format!("{} {why}", path.display())),
        ));
    }
    let config = ModelConfig::load(path).map_err(fail)?;
    let tokenizer =
        ModelTokenizer::load(path, config.bos_token_id, &config.eos_token_ids).map_err(fail)?;
    Ok((config, tokenizer, Source::Dir(path.to_path_buf())))
}

impl Shared {
    /// Refuses a prompt that is empty, holds ids outside a vocabulary of
    /// `vocab` ids, or leaves no room for a token in the context.
    pub(crate) fn check_prompt(&self, prompt: &[u32], vocab: usize) -> Result<()> {
        if prompt.is_empty() {
            return Err(Error::InvalidInput(
                "the prompt encodes to no tokens".into(),
            ));
        }
        check_ids(prompt, vocab)?;
        let limit = self.context_limit;
        if prompt.len() >= limit {
            return Err(Error::ContextOverflow {
                needed: prompt.len() + 1,
                limit,
            });
        }
        Ok(())
    }

    /// The prompt ids [`chat`](TextModel::chat) runs for `messages`.
    pub(crate) fn encode_chat(
        &self,
        messages: &[Message],
        opts: &GenerateOptions,
    ) -> Result<Vec<u32>> {
        let template = self
            .template
            .as_ref()
            .map_err(|why| Error::unsupported(why.clone()))?;
        self.tokenizer
            .encode_messages(template, messages, &opts.template_args)
    }

    /// Counts `tokens` prompt tokens a session turn did not prefill.
    pub(crate) fn note_reused(&self, tokens: usize) {
        self.reused_tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    fn set_metrics(&self, metrics: &GenerateMetrics) {
        self.last_metrics.set(metrics);
    }
}

/// Refuses ids outside a vocabulary of `vocab` ids (MLX would index out of
/// bounds).
fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(bad) => Err(Error::InvalidInput(format!(
            "token id {bad} is outside the vocabulary ({vocab} ids)"
        ))),
        None => Ok(()),
    }
}

/// Runs jobs in arrival order until the model (and every chat session) is
/// dropped. Chat sessions' KV caches live here, by session id.
fn serve(model: &dyn CausalLm, shared: &Shared, queue: Receiver<Job>) {
    let mut sessions: HashMap<u64, session::SessionCache> = HashMap::new();
    for job in queue {
        let req = match job {
            Job::Generate(req) => req,
            Job::Logits { ids, reply } => {
                let _ = reply.send(generate::last_logits(model, &ids, shared.bounds()));
                continue;
            }
            Job::Score { ids, reply } => {
                let _ = reply.send(generate::prompt_logprobs(model, &ids, shared.bounds()));
                continue;
            }
            Job::Classify {
                prompts,
                opts,
                reply,
            } => {
                let _ = reply.send(crate::batch::classify(
                    model,
                    &shared.tokenizer,
                    &prompts,
                    &opts,
                    shared.bounds(),
                ));
                continue;
            }
            Job::Batch {
                prompts,
                opts,
                reply,
            } => {
                let (results, metrics) = crate::batch::batch_generate(
                    model,
                    &shared.tokenizer,
                    &prompts,
                    &opts,
                    shared.bounds(),
                );
                shared.set_metrics(&metrics);
                let _ = reply.send(results);
                continue;
            }
            Job::Turn(turn) => {
                let metrics = session::run(model, shared, &mut sessions, turn);
                shared.set_metrics(&metrics);
                continue;
            }
            Job::EndSession(id) => {
                sessions.remove(&id);
                continue;
            }
        };
        let outcome = generate::run(model, &shared.tokenizer, &req, shared.bounds());
        shared.set_metrics(&outcome.metrics);
        match outcome.end {
            Ok(reason) => req.sink.finish(outcome.metrics, reason),
            Err(e) => req.sink.fail(e),
        }
    }
}

/// Refuses generation options that are invalid or that generation does not
/// implement. Every sampling option is honoured (see `sample.rs`);
/// `template_args` are used by `chat` and refused by `generate`.
pub(crate) fn check_generate_options(opts: &GenerateOptions) -> Result<()> {
    opts.validate()?;
    if opts.return_logits {
        return Err(Error::unsupported("return_logits for generate"));
    }
    Ok(())
}

impl TextModel for MlxModel {
    fn generate(&self, prompt: &str, opts: &GenerateOptions) -> Result<TokenStream> {
        check_generate_options(opts)?;
        if !opts.template_args.is_empty() {
            return Err(Error::unsupported(
                "template_args for generate (a raw prompt is not templated: use chat)",
            ));
        }
        if prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        let ids = self
            .shared
            .tokenizer
            .encode(prompt)
            .map_err(|e| Error::InvalidInput(format!("cannot encode the prompt: {e}")))?;
        self.submit(ids, opts)
    }

    fn chat(&self, messages: &[Message], opts: &GenerateOptions) -> Result<TokenStream> {
        check_generate_options(opts)?;
        if messages.is_empty() {
            return Err(Error::InvalidInput("no messages to answer".into()));
        }
        let ids = self.encode_chat(messages, opts)?;
        self.submit(ids, opts)
    }

    /// Runs every prompt (right-padded to the longest) through one masked
    /// forward pass and returns each prompt's next token: the argmax, or a
    /// draw by the options' sampler (its repeat penalty looking at each
    /// prompt's own last ids); with `return_logits`, also its f32
    /// last-position logits. Equal to running each prompt alone.
    ///
    /// Stop ids and stop strings are refused with `Unsupported` (classify
    /// returns the next token whatever it is); `max_tokens` bounds nothing
    /// here (one token is always within it) and `ignore_eos` changes nothing.
    fn classify(&self, prompts: &[String], opts: &GenerateOptions) -> Result<Vec<ClassifyResult>> {
        opts.validate()?;
        if !opts.template_args.is_empty() {
            return Err(Error::unsupported(
                "template_args for classify (raw prompts are not templated)",
            ));
        }
        if !opts.stop_tokens.is_empty() || !opts.stop_strings.is_empty() {
            return Err(Error::unsupported(
                "stop_tokens and stop_strings for classify (it returns the next token, whatever it is)",
            ));
        }
        let prompts = self.encode_all(prompts)?;
        let limit = self.shared.context_limit;
        if let Some(p) = prompts.iter().find(|p| p.len() > limit) {
            return Err(Error::ContextOverflow {
                needed: p.len(),
                limit,
            });
        }
        let (reply, answer) = channel();
        self.send(Job::Classify {
            prompts,
            opts: opts.clone(),
            reply,
        })?;
        Self::await_reply(&answer)?
    }

    /// Generates a continuation of each prompt. Prompts of equal length (in
    /// tokens) decode together as one batch with per-row stop, EOS and
    /// `max_tokens` handling; batches of different lengths run one after
    /// another on the worker. Each row's greedy ids equal the prompt's
    /// single [`generate`](TextModel::generate); with sampling, each row has
    /// its own sampler seeded from `opts.seed`, as a single call would.
    fn batch_generate(
        &self,
        prompts: &[String],
        opts: &GenerateOptions,
    ) -> Result<Vec<BatchResult>> {
        check_generate_options(opts)?;
        if !opts.template_args.is_empty() {
            return Err(Error::unsupported(
                "template_args for batch_generate (raw prompts are not templated)",
            ));
        }
        let prompts = self.encode_all(prompts)?;
        self.batch_generate_ids(prompts, opts)
    }

    /// A chat session that keeps its KV cache on the model's worker between
    /// turns (the session module describes when a turn reuses it). The session keeps the worker
    /// alive while it lives.
    fn chat_session(&self) -> Result<Box<dyn ChatSession>> {
        Ok(Box::new(session::MlxChatSession::new(
            Arc::clone(&self.shared),
            Arc::clone(&self.worker),
            self.info.vocab_size,
        )))
    }

    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn metrics(&self) -> Option<GenerateMetrics> {
        self.shared.last_metrics.get()
    }

    fn model_type(&self) -> &str {
        &self.info.architecture
    }
}

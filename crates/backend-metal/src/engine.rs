//! [`MlxModel`]: a loaded model served by a worker thread that owns every MLX
//! array of the model, so calls queue and never share a KV cache.

use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use inference_core::{
    BatchResult, CanLoad, ChatSession, ClassifyResult, Error, GenerateMetrics, GenerateOptions,
    LastMetrics, LoadOptions, Message, ModelInfo, Result, TextModel, TokenStream, Trainable,
};
use mlx_rs::Device;

use crate::cache::Rotation;
use inference_formats::gguf::{hf, GgufFile};
use inference_runtime::{check, Jobs};

use crate::distributed::{self, Group, Watchdog};
use crate::error::{FormatError, LoadError};
use crate::generate::{self, Request};
use crate::gguf;
use crate::load::weights::Weights;
use crate::memory;
use crate::models::{self, CausalLm, ModelSpec};
use crate::session;
use crate::train;
use crate::tune;
use crate::worker::{check_generate_options, Job, Shared, Worker};
use inference_formats::config::HfConfig;
use inference_text::{ChatTokenizer, ModelTokenizer};

/// A model loaded by the MLX backend.
pub struct MlxModel {
    worker: Arc<Worker>,
    pub(crate) shared: Arc<Shared>,
    info: ModelInfo,
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
    if opts.threads.is_some() {
        return Err(Error::unsupported(
            "threads on the MLX backend (MLX chooses its own CPU threads)",
        ));
    }
    if let Some(t) = opts.kv_cache_type {
        return Err(Error::unsupported(format!(
            "kv_cache_type = {t} on the MLX backend (its KV cache takes the compute dtype: see dtype)"
        )));
    }
    if opts.flash_attention.is_some() {
        return Err(Error::unsupported(
            "flash_attention on the MLX backend (attention is always MLX's fused kernel)",
        ));
    }
    if !opts.mmap {
        return Err(Error::unsupported(
            "mmap = false on the MLX backend (weight files are always mapped)",
        ));
    }
    if opts.tensor_parallel.is_some() {
        // Every rank must run the same steps in the same order: one call
        // at a time, and nothing that depends on a rank's own clock.
        let refuse = |what: &str| {
            Err(Error::unsupported(format!(
                "{what} under tensor parallelism on the MLX backend"
            )))
        };
        if opts.parallel_slots.is_some_and(|n| n > 1) {
            return refuse("parallel_slots > 1 (calls run one at a time across the ranks)");
        }
        if opts.queue_timeout.is_some() {
            return refuse("queue_timeout (the ranks' clocks would part their schedules)");
        }
        if opts.adapter_path.is_some() {
            return refuse("LoRA adapters (fuse the adapter into the model first: infer fuse)");
        }
    }
    Ok(())
}

type Ready = std::result::Result<ModelInfo, LoadError>;

impl MlxModel {
    /// Loads the model directory `path` on `placement`.
    pub fn load(path: &Path, opts: &LoadOptions, placement: Placement) -> Result<Self> {
        check_load_options(opts)?;
        let started = Instant::now();
        let path = &inference_formats::resolve_model_path(path)?;
        let (config, tokenizer, source) = open(path)?;
        if opts.tensor_parallel.is_some() && matches!(source, Source::Gguf(_)) {
            return Err(Error::unsupported(
                "GGUF files under tensor parallelism on the MLX backend (use a Hugging Face \
                 or mlx-community directory)",
            ));
        }
        if let Some(adapter) = &opts.adapter_path {
            // Its configuration now, its tensors once the model is built.
            let dir = inference_formats::adapter::adapter_dir(adapter);
            inference_formats::adapter::AdapterConfig::load(dir).map_err(|e| e.into_error(path))?;
        }
        let max_positions = config.text().max_position_embeddings;
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
        )?;
        let text = config.text();
        let text = ChatTokenizer::new(tokenizer, &text.model_type, text.vocab_size as usize);
        let shared = Arc::new(Shared {
            text,
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
            base_parameters: std::sync::atomic::AtomicU64::new(0),
            parameter_counts: std::sync::Mutex::new(None),
            queued: AtomicUsize::new(0),
            max_queue: opts.max_queue,
            counters: crate::scheduler::Counters::default(),
            following: Default::default(),
        });
        let tensor_parallel = opts.tensor_parallel.clone();
        let max_rows = opts.parallel_slots.unwrap_or(if tensor_parallel.is_some() {
            1
        } else {
            LoadOptions::DEFAULT_PARALLEL_SLOTS
        });
        let (kv_budget, queue_timeout) = (opts.kv_budget_bytes, opts.queue_timeout);
        let prompt_cache_bytes = opts
            .prompt_cache_bytes
            .unwrap_or(crate::scheduler::DEFAULT_PROMPT_CACHE_BYTES);

        let dtype = opts.dtype;
        let adapter_path = opts.adapter_path.clone();
        let worker_shared = Arc::clone(&shared);
        let body = move |ready: inference_runtime::Ready<Ready>, queue: Jobs<Job>| {
            let on_cpu = match placement {
                Placement::Cpu => true,
                Placement::Gpu => false,
                Placement::Default => !crate::device::default_is_gpu(),
            };
            if on_cpu {
                // MLX's CPU matmuls use one core each: split them over
                // the machine's cores (at most 8).
                let cores = thread::available_parallelism().map_or(1, |n| n.get());
                crate::models::layers::split_cpu_matmuls(cores.min(8));
            }
            let body = move || {
                let mut config = config;
                let context = worker_shared
                    .context
                    .map_or(config.text().max_position_embeddings, |r| r.window);
                let built = join_group(tensor_parallel.as_deref())
                    .and_then(|group| {
                        if let Some(g) = &group {
                            shard_config(config.text_mut(), g.size())?;
                        }
                        let (model, mut info) =
                            build(source, &*config, dtype, context, group.clone())?;
                        if let Some(g) = &group {
                            info.rank = g.rank() as usize;
                            info.world_size = g.size() as usize;
                        }
                        Ok((model, info, group))
                    })
                    .and_then(|(model, info, group)| {
                        let state = match &adapter_path {
                            Some(path) => Some(tune::applied(path, &*model)?),
                            None => None,
                        };
                        Ok((model, info, state, group))
                    });
                match built {
                    Ok((model, info, state, group)) => {
                        let watchdog = group
                            .as_ref()
                            .map(|g| Watchdog::start(g.rank(), Watchdog::limit_from_env()));
                        distributed::set_thread_group(group.clone());
                        let counts = state
                            .as_ref()
                            .map(|s| train::counts(&*model, &s.adapted, info.parameter_count));
                        worker_shared.set_parameter_counts(counts);
                        worker_shared
                            .base_parameters
                            .store(info.parameter_count, Ordering::Relaxed);
                        ready.send(Ok(info));
                        let limits = crate::scheduler::Limits {
                            max_rows,
                            kv_budget,
                            queue_timeout,
                            position_bytes: position_bytes(config.text(), model.dtype()),
                        };
                        crate::scheduler::Scheduler::new(
                            &*model,
                            &worker_shared,
                            limits,
                            prompt_cache_bytes,
                            state,
                        )
                        .with_watchdog(watchdog)
                        .with_tensor_parallel(group)
                        .run(queue);
                    }
                    Err(e) => ready.send(Err(e)),
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
        };
        let (worker, built) = Worker::start(crate::error::NAME, "mlx-model", body)?;
        let mut info = built.map_err(|e| e.into_error(path))?;
        let worker = Arc::new(worker);
        info.chat_template = shared.tokenizer().chat_template.is_some();
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
        self.shared.enter_queue(1)?;
        self.send_generate(prompt, opts)
    }

    /// Sends a generation already counted in the queue.
    fn send_generate(&self, prompt: Vec<u32>, opts: &GenerateOptions) -> Result<TokenStream> {
        let (sink, stream) = TokenStream::channel();
        let sent = self.send(Job::Generate(Request {
            prompt,
            opts: opts.clone(),
            sink,
            queued: Instant::now(),
        }));
        if sent.is_err() {
            self.shared.left_queue();
        }
        sent?;
        Ok(stream)
    }

    pub(crate) fn send(&self, job: Job) -> Result<()> {
        self.worker.send(job)
    }

    /// The chat template the model ships (`tokenizer_config.json` or
    /// `chat_template.jinja`), if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.shared.tokenizer().chat_template.as_deref()
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.shared.tokenizer().bos
    }

    /// Every end-of-sequence id.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.shared.tokenizer().eos
    }

    /// How many prompt tokens the turns of this model's chat sessions took
    /// from their KV caches instead of prefilling them, in all so far.
    pub fn reused_prompt_tokens(&self) -> usize {
        self.shared.reused_tokens.load(Ordering::Relaxed)
    }

    /// What the model's scheduler has done so far (decode steps, how many
    /// calls they batched, pauses, prompt-cache reuse) and how many calls
    /// run and wait now.
    pub fn scheduler_stats(&self) -> crate::SchedulerStats {
        self.shared
            .counters
            .snapshot(self.shared.queued.load(Ordering::Relaxed))
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
    /// `opts.tools` and `opts.template_args` (the assistant's turn header
    /// included).
    pub fn render_chat(&self, messages: &[Message], opts: &GenerateOptions) -> Result<String> {
        inference_core::Tokenizer::render_chat(
            &self.shared.text,
            messages,
            &inference_core::RenderOptions::for_chat(opts),
        )
    }

    /// The prompt ids [`chat`](TextModel::chat) runs for `messages` with
    /// `opts.template_args`: the rendered template, its special tokens
    /// parsed, a BOS in front only where the tokenizer adds one and the
    /// template did not write it.
    pub fn encode_chat(&self, messages: &[Message], opts: &GenerateOptions) -> Result<Vec<u32>> {
        self.shared.encode_chat(messages, opts)
    }

    /// Encodes `text` as [`generate`](TextModel::generate) does: with the
    /// tokenizer's own special-token rules.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.shared
            .tokenizer()
            .encode(text)
            .map_err(|e| Error::InvalidInput(format!("cannot encode the prompt: {e}")))
    }

    /// Refuses ids outside the model's vocabulary (MLX would index out of
    /// bounds).
    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        check::ids_in_vocab(ids, self.info.vocab_size)
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
    pub(crate) fn await_reply<T>(answer: &Receiver<T>) -> Result<T> {
        answer
            .recv()
            .map_err(|_| Error::backend(crate::error::NAME, "the model worker stopped"))
    }

    /// Streams the continuation of prompt ids given directly (no tokenizer,
    /// no template), with the same checks as [`generate`](TextModel::generate).
    pub fn generate_ids(&self, ids: Vec<u32>, opts: &GenerateOptions) -> Result<TokenStream> {
        check_generate_options(opts, self.info.vocab_size)?;
        self.submit(ids, opts)
    }

    /// [`batch_generate`](TextModel::batch_generate) on prompt ids given
    /// directly (no tokenizer), with the same checks and batching.
    pub fn batch_generate_ids(
        &self,
        prompts: Vec<Vec<u32>>,
        opts: &GenerateOptions,
    ) -> Result<Vec<BatchResult>> {
        check_generate_options(opts, self.info.vocab_size)?;
        if opts.prompt_logprobs {
            return Err(Error::unsupported(
                "prompt_logprobs for batch_generate (a batch result has no prompt)",
            ));
        }
        for p in &prompts {
            self.shared.check_prompt(p, self.info.vocab_size)?;
        }
        // Every row is a call of its own on the scheduler, which decodes
        // them together (with any other calls) as they come and go.
        let started = Instant::now();
        self.shared.enter_queue(prompts.len())?;
        let mut streams = Vec::with_capacity(prompts.len());
        let mut sent = Ok(());
        for (i, p) in prompts.into_iter().enumerate() {
            match self.send_generate(p, opts) {
                Ok(s) => streams.push(s),
                Err(e) => {
                    // The rows not sent leave the queue count.
                    for _ in i + 1..streams.capacity() {
                        self.shared.left_queue();
                    }
                    sent = Err(e);
                    break;
                }
            }
        }
        sent?;
        let mut results = Vec::with_capacity(streams.len());
        let (mut prompt_tokens, mut generated, mut first) = (0, 0, None::<std::time::Duration>);
        for mut stream in streams {
            let mut tokens = Vec::new();
            let mut error = None;
            for item in &mut stream {
                match item {
                    Ok(t) => tokens.push(t),
                    Err(e) => error = Some(e),
                }
            }
            if let Some(m) = stream.metrics() {
                prompt_tokens += m.prompt_tokens;
                generated += m.generated_tokens;
                let to_first = started.elapsed().saturating_sub(m.decode_duration);
                first = Some(first.map_or(to_first, |f| f.min(to_first)));
            }
            let finish_reason = match (&error, stream.finish_reason()) {
                (None, Some(r)) => r,
                _ => inference_core::FinishReason::Error,
            };
            results.push(BatchResult {
                tokens,
                finish_reason,
                error,
            });
        }
        let total = started.elapsed();
        let prefill = first.unwrap_or(total);
        let metrics = GenerateMetrics::from_timings(
            prompt_tokens,
            generated,
            prefill,
            total.saturating_sub(prefill),
            total,
        )
        .with_memory(memory::peak(), memory::active());
        self.shared.set_metrics(&metrics);
        Ok(results)
    }

    /// A session driven by token ids, reusing its KV cache between turns
    /// (see [`IdSession`](crate::IdSession)).
    pub fn id_session(&self) -> session::IdSession {
        session::IdSession::new(
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
    spec: &dyn ModelSpec,
    dtype: Option<inference_core::DType>,
    context_length: usize,
    group: Option<Rc<Group>>,
) -> std::result::Result<(Box<dyn CausalLm>, ModelInfo), LoadError> {
    let config = spec.text();
    let (mut weights, quant, stored_dtype, quant_type) = match source {
        Source::Dir(dir) => {
            let mut w = match group {
                Some(g) => Weights::load_sharded(&dir, g)?,
                None => Weights::load(&dir)?,
            };
            w.set_quantization(&config.quantization_overrides);
            let stored = w
                .float_dtype
                .map(|d| crate::load::dtype_name(d).to_owned())
                .or_else(|| config.dtype.clone())
                .unwrap_or_default();
            let scheme = config.quantization.map(|_| "affine".to_owned());
            (w, config.quantization, stored, scheme)
        }
        Source::Gguf(_) if group.is_some() => {
            return Err(
                FormatError::Unsupported("GGUF files under tensor parallelism".into()).into(),
            )
        }
        Source::Gguf(file) => {
            let arch = config.gguf_architecture.clone().unwrap_or_default();
            let (stored, quantised) = hf::stored_type(&file);
            let (w, q) = gguf::weights(&file, &arch)?;
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
    let model = models::build(spec, weights)?;
    info.dtype = crate::load::dtype_name(model.dtype()).to_owned();
    Ok((model, info))
}

/// The tensor-parallel group of `backend`, when asked for one and it has
/// more than one rank (a group of one runs as one process).
fn join_group(backend: Option<&str>) -> std::result::Result<Option<Rc<Group>>, LoadError> {
    let Some(backend) = backend else {
        return Ok(None);
    };
    let group =
        Group::join(backend).map_err(|e| LoadError::Mlx(format!("tensor parallel: {e}")))?;
    Ok((group.size() > 1).then_some(group))
}

/// Divides `config`'s attention heads, key-value heads and MLP units over
/// `ranks` (each rank's share), refusing sizes that do not divide.
fn shard_config(
    config: &mut inference_formats::config::TextConfig,
    ranks: i32,
) -> std::result::Result<(), LoadError> {
    for (what, n) in [
        ("attention heads", config.num_attention_heads),
        ("key-value heads", config.num_key_value_heads),
        ("MLP units (intermediate_size)", config.intermediate_size),
    ] {
        if ranks <= 0 || n % ranks != 0 {
            return Err(FormatError::Config(format!(
                "tensor parallelism over {ranks} ranks needs the {what} ({n}) to divide by {ranks}"
            ))
            .into());
        }
    }
    config.num_attention_heads /= ranks;
    config.num_key_value_heads /= ranks;
    config.intermediate_size /= ranks;
    Ok(())
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

/// Whether this backend can load the model at `path`: a GGUF file or a
/// Hugging Face directory of an architecture in [`models::ARCHITECTURES`],
/// read from its metadata or `config.json` alone.
pub(crate) fn can_load(path: &Path) -> CanLoad {
    let path = match inference_formats::resolve_model_path(path) {
        Ok(p) => p,
        Err(e) => return CanLoad::No(e.to_string()),
    };
    let model_type = if is_gguf(&path) {
        let file = match GgufFile::open(&path) {
            Ok(f) => f,
            Err(e) => return CanLoad::No(format!("{}: {e}", path.display())),
        };
        match file.get_str("general.architecture").map(hf::model_type) {
            Some(Ok(t)) => t.to_owned(),
            Some(Err(e)) => return CanLoad::No(e.to_string()),
            None => return CanLoad::No("the GGUF file has no `general.architecture`".into()),
        }
    } else if path.join("config.json").is_file() {
        match HfConfig::load(&path) {
            Ok(c) => c.model_type().to_owned(),
            Err(e) => return CanLoad::No(e.to_string()),
        }
    } else {
        return CanLoad::No(format!(
            "{} is neither a GGUF file nor a directory with config.json",
            path.display()
        ));
    };
    if models::ARCHITECTURES
        .iter()
        .any(|a| a.model_types.contains(&model_type.as_str()))
    {
        CanLoad::Yes
    } else {
        CanLoad::No(format!(
            "architecture {model_type:?} is not implemented here"
        ))
    }
}

/// What this backend loads, in a line.
pub(crate) fn loads() -> String {
    let types: Vec<&str> = models::ARCHITECTURES
        .iter()
        .flat_map(|a| a.model_types.iter().copied())
        .collect();
    format!(
        "Hugging Face safetensors directories (f32, f16, bf16, MLX affine 4/8-bit) and GGUF files; \
         model types {}",
        types.join(", ")
    )
}

/// Reads the configuration and the tokenizer of the model at `path` (cheap:
/// no weights), on the caller's thread so that errors come back at once.
fn open(path: &Path) -> Result<(Box<dyn ModelSpec>, ModelTokenizer, Source)> {
    let fail = |e: FormatError| e.into_error(path);
    if is_gguf(path) {
        let file = GgufFile::open(path).map_err(|e| Error::model_load(path, e))?;
        inference_formats::discover::check_gguf_not_split(&file, path)?;
        let hf::Opened {
            architecture: arch,
            config: json,
            ..
        } = hf::open(&file).map_err(fail)?;
        let tokenizer = ModelTokenizer::from_gguf(&file, &arch).map_err(fail)?;
        let hf = HfConfig::from_value(&json).map_err(fail)?;
        let mut spec = models::read_config(&hf).map_err(fail)?;
        let text = spec.text_mut();
        text.bos_token_id = tokenizer.bos;
        text.eos_token_ids = tokenizer.eos.clone();
        text.gguf_architecture = Some(arch);
        return Ok((spec, tokenizer, Source::Gguf(file)));
    }
    if !path.join("config.json").is_file() {
        let why = if path.exists() {
            "has no config.json (and is not a .gguf file)"
        } else {
            "does not exist"
        };
        return Err(Error::model_load(
            path,
            FormatError::Io(format!("{} {why}", path.display())),
        ));
    }
    let spec = models::read_config(&HfConfig::load(path).map_err(fail)?).map_err(fail)?;
    let text = spec.text();
    let tokenizer =
        ModelTokenizer::load(path, text.bos_token_id, &text.eos_token_ids).map_err(fail)?;
    Ok((spec, tokenizer, Source::Dir(path.to_path_buf())))
}

/// KV bytes of one position in every layer of a model of `config` computing
/// in `dtype` (what a waiting call's admission is estimated with; windowed
/// layers count in full).
fn position_bytes(config: &inference_formats::config::TextConfig, dtype: mlx_rs::Dtype) -> u64 {
    let per_layer =
        2 * u64::try_from(config.num_key_value_heads.max(0) * config.head_dim.max(0)).unwrap_or(0);
    per_layer
        * u64::try_from(config.num_hidden_layers.max(0)).unwrap_or(0)
        * crate::ffi::item_size(dtype) as u64
}

impl TextModel for MlxModel {
    fn generate(&self, prompt: &str, opts: &GenerateOptions) -> Result<TokenStream> {
        check_generate_options(opts, self.info.vocab_size)?;
        if opts.uses_template() {
            return Err(Error::unsupported(
                "template_args, tools and reply_prefix for generate (a raw prompt is not templated: use chat)",
            ));
        }
        if prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        let ids = self
            .shared
            .tokenizer()
            .encode(prompt)
            .map_err(|e| Error::InvalidInput(format!("cannot encode the prompt: {e}")))?;
        self.submit(ids, opts)
    }

    fn generate_ids(&self, ids: Vec<u32>, opts: &GenerateOptions) -> Result<TokenStream> {
        MlxModel::generate_ids(self, ids, opts)
    }

    fn queue_status(&self) -> Option<inference_core::QueueStatus> {
        let s = self.scheduler_stats();
        Some(inference_core::QueueStatus::new(s.running, s.waiting))
    }

    fn chat(&self, messages: &[Message], opts: &GenerateOptions) -> Result<TokenStream> {
        check_generate_options(opts, self.info.vocab_size)?;
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
        check::classify_options(opts, self.info.vocab_size)?;
        let prompts = self.encode_all(prompts)?;
        check::classify_prompts(&prompts, self.shared.context_limit)?;
        let (reply, answer) = channel();
        self.send(Job::Classify {
            prompts,
            opts: opts.clone(),
            reply,
        })?;
        Self::await_reply(&answer)?
    }

    /// Generates a continuation of each prompt: every prompt is a call of
    /// its own on the model's scheduler, decoded together with the others
    /// (and with any other calls) whatever their lengths, each with per-row
    /// stop, EOS and `max_tokens` handling. Each row's greedy ids are the
    /// prompt's single [`generate`](TextModel::generate) (up to near-ties
    /// that batched arithmetic may tip); with sampling, each row has its own
    /// sampler seeded from `opts.seed`, as a single call would.
    fn batch_generate(
        &self,
        prompts: &[String],
        opts: &GenerateOptions,
    ) -> Result<Vec<BatchResult>> {
        check_generate_options(opts, self.info.vocab_size)?;
        if opts.uses_template() {
            return Err(Error::unsupported(
                "template_args, tools and reply_prefix for batch_generate (raw prompts are not templated)",
            ));
        }
        let prompts = self.encode_all(prompts)?;
        self.batch_generate_ids(prompts, opts)
    }

    /// A chat session that keeps its KV cache on the model's worker between
    /// turns (the session module describes when a turn reuses it). The session keeps the worker
    /// alive while it lives.
    fn chat_session(&self) -> Result<Box<dyn ChatSession>> {
        if self.info.world_size > 1 {
            // A session's cache would live on this rank alone; `chat` with
            // the whole conversation (and the prompt cache) works instead.
            return Err(Error::unsupported(
                "chat sessions under tensor parallelism (send the conversation to chat)",
            ));
        }
        Ok(Box::new(session::MlxChatSession::new(
            Arc::clone(&self.shared),
            Arc::clone(&self.worker),
            self.info.vocab_size,
        )))
    }

    /// The model's tokenizer and chat template (`inference_text`'s
    /// [`ChatTokenizer`]): what `generate` and `chat` encode with.
    fn tokenizer(&self) -> Result<&dyn inference_core::Tokenizer> {
        Ok(&self.shared.text)
    }

    fn follow(&self) -> Result<()> {
        if self.info.world_size <= 1 || self.info.rank == 0 {
            return Err(Error::InvalidInput(
                "only a rank other than 0 of a tensor-parallel model follows rank 0".into(),
            ));
        }
        self.shared
            .wait_following()
            .map_err(|e| Error::backend(crate::error::NAME, e))
    }

    /// LoRA fine-tuning on the model's worker ([`Trainable`]).
    fn trainable(&self) -> Result<&dyn Trainable> {
        if self.info.world_size > 1 {
            return Err(Error::unsupported(
                "fine-tuning a model split over ranks (tensor parallelism)",
            ));
        }
        Ok(self)
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

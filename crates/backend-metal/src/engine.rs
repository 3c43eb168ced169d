//! [`MlxModel`]: a loaded model served by a worker thread that owns every MLX
//! array of the model, so calls queue and never share a KV cache.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Instant;

use inference_core::{
    Error, GenerateMetrics, GenerateOptions, LoadOptions, Message, ModelInfo, Result, TextModel,
    TokenStream,
};
use mlx_rs::Device;

use crate::error::LoadError;
use crate::generate::{self, Request};
use crate::gguf::{self, reader::GgufFile, GgufTokenizer};
use crate::load::config::ModelConfig;
use crate::load::weights::Weights;
use crate::memory;
use crate::models::{self, CausalLm};
use crate::template::ChatTemplate;
use crate::tokenizer::ModelTokenizer;

/// Work for the model's worker.
enum Job {
    /// A streamed generation.
    Generate(Request),
    /// The last-position logits of a prompt.
    Logits {
        ids: Vec<u32>,
        reply: Sender<Result<Vec<f32>>>,
    },
}

/// A model loaded by the MLX backend.
pub struct MlxModel {
    jobs: Mutex<Sender<Job>>,
    shared: Arc<Shared>,
    info: ModelInfo,
}

/// What the caller's side and the worker share.
struct Shared {
    tokenizer: ModelTokenizer,
    /// The chat template (the model's or a built-in one), or why `chat`
    /// cannot run.
    template: std::result::Result<ChatTemplate, String>,
    /// Most positions (prompt + generated) one call may use: the model's
    /// `max_position_embeddings`, or unbounded when `context_len` makes every
    /// cache rotate.
    context_limit: usize,
    /// `LoadOptions::context_len`: positions each cache keeps.
    context_len: Option<usize>,
    last_metrics: Mutex<Option<GenerateMetrics>>,
    /// Prompt tokens per prefill forward pass.
    prefill_chunk: AtomicUsize,
}

impl Shared {
    fn bounds(&self) -> generate::Bounds {
        generate::Bounds {
            limit: self.context_limit,
            context: self.context_len,
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
        let (config, tokenizer, source) = open(path)?;
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
        match &template {
            Ok(t) => tracing::debug!(builtin = ?t.builtin_kind(), "chat template ready"),
            Err(why) => tracing::warn!(%why, "chat is unavailable for this model"),
        }
        let shared = Arc::new(Shared {
            tokenizer,
            template,
            context_limit: if opts.context_len.is_some() {
                usize::MAX
            } else {
                config.max_position_embeddings
            },
            context_len: opts.context_len,
            last_metrics: Mutex::new(None),
            prefill_chunk: AtomicUsize::new(generate::PREFILL_CHUNK),
        });

        let (ready_tx, ready_rx) = sync_channel::<Ready>(1);
        let (jobs, queue) = channel::<Job>();
        let dtype = opts.dtype;
        let worker_shared = Arc::clone(&shared);
        thread::Builder::new()
            .name("mlx-model".into())
            .spawn(move || {
                let body = move || {
                    let context = worker_shared
                        .context_len
                        .unwrap_or(config.max_position_embeddings);
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
                match placement {
                    Placement::Default => body(),
                    Placement::Cpu => mlx_rs::with_device(Device::cpu(), body),
                    Placement::Gpu => mlx_rs::with_device(Device::gpu(), body),
                }
            })
            .map_err(|e| {
                Error::backend(crate::NAME, format!("cannot start the model worker: {e}"))
            })?;
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
            jobs: Mutex::new(jobs),
            shared,
            info,
        })
    }

    fn submit(&self, prompt: Vec<u32>, opts: &GenerateOptions) -> Result<TokenStream> {
        if prompt.is_empty() {
            return Err(Error::InvalidInput(
                "the prompt encodes to no tokens".into(),
            ));
        }
        self.check_ids(&prompt)?;
        let limit = self.shared.context_limit;
        if prompt.len() >= limit {
            return Err(Error::ContextOverflow {
                needed: prompt.len() + 1,
                limit,
            });
        }
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
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(job)
            .map_err(|_| Error::backend(crate::NAME, "the model worker has stopped"))
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

    /// Sets how many prompt tokens one prefill forward pass takes (default
    /// 512); calls already
    /// queued may use either value. Values below 1 count as 1.
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
        self.shared
            .tokenizer
            .encode_messages(self.template()?, messages, &opts.template_args)
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
        let vocab = self.info.vocab_size;
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(bad) => Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary ({vocab} ids)"
            ))),
            None => Ok(()),
        }
    }

    /// Streams the continuation of prompt ids given directly (no tokenizer,
    /// no template), with the same checks as [`generate`](TextModel::generate).
    pub fn generate_ids(&self, ids: Vec<u32>, opts: &GenerateOptions) -> Result<TokenStream> {
        check_generate_options(opts)?;
        self.submit(ids, opts)
    }

    /// The logits (as f32) that the model predicts after `ids`, from one
    /// forward pass over a fresh cache.
    pub fn last_logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::InvalidInput("no tokens".into()));
        }
        self.check_ids(ids)?;
        if ids.len() > self.shared.context_limit {
            return Err(Error::ContextOverflow {
                needed: ids.len(),
                limit: self.shared.context_limit,
            });
        }
        let (reply, answer) = channel();
        self.send(Job::Logits {
            ids: ids.to_vec(),
            reply,
        })?;
        answer
            .recv()
            .map_err(|_| Error::backend(crate::NAME, "the model worker stopped"))?
    }
}

/// Loads weights and builds the model, on the worker thread.
fn build(
    source: Source,
    config: &ModelConfig,
    dtype: Option<inference_core::DType>,
    context_length: usize,
) -> std::result::Result<(Box<dyn CausalLm>, ModelInfo), LoadError> {
    let (mut weights, quant) = match source {
        Source::Dir(dir) => (Weights::load(&dir)?, config.quantization),
        Source::Gguf(file) => {
            let arch = config.gguf_architecture.clone().unwrap_or_default();
            let (heads, kv) = gguf::head_counts(&file, &arch);
            gguf::weights(&file, &arch, heads, kv)?
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
        let arch = file
            .get_str("general.architecture")
            .ok_or_else(|| {
                fail(LoadError::Config(
                    "GGUF has no `general.architecture`".into(),
                ))
            })?
            .to_owned();
        gguf::model_type(&arch).map_err(fail)?;
        let tok = GgufTokenizer::from_gguf(&file, &arch).map_err(fail)?;
        let vocab = file
            .tensor("token_embd.weight")
            .and_then(|t| t.shape().first().copied())
            .ok_or_else(|| fail(LoadError::MissingTensor("token_embd.weight".into())))?;
        let json = gguf::config_json(&file, &arch, vocab as usize).map_err(fail)?;
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

/// Runs jobs in arrival order until the model is dropped.
fn serve(model: &dyn CausalLm, shared: &Shared, queue: Receiver<Job>) {
    for job in queue {
        let req = match job {
            Job::Generate(req) => req,
            Job::Logits { ids, reply } => {
                let _ = reply.send(generate::last_logits(model, &ids, shared.bounds()));
                continue;
            }
        };
        let outcome = generate::run(model, &shared.tokenizer, &req, shared.bounds());
        *shared
            .last_metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(outcome.metrics.clone());
        match outcome.end {
            Ok(reason) => req.sink.finish(outcome.metrics, reason),
            Err(e) => req.sink.fail(e),
        }
    }
}

/// Refuses generation options that are invalid or that generation does not
/// implement. Every sampling option is honoured (see `sample.rs`);
/// `template_args` are used by `chat` and refused by `generate`.
fn check_generate_options(opts: &GenerateOptions) -> Result<()> {
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

    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn metrics(&self) -> Option<GenerateMetrics> {
        self.shared
            .last_metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn model_type(&self) -> &str {
        &self.info.architecture
    }
}

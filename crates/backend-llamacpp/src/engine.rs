//! [`LlamaCppModel`]: a GGUF model on llama.cpp, served by a worker thread
//! that owns the llama.cpp model and context.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use inference_core::{
    CanLoad, Error, FinishReason, GenerateMetrics, GenerateOptions, LastMetrics, LoadOptions,
    Message, ModelInfo, Result, TextModel, TokenSink, TokenStream, Tokenizer,
};
use inference_formats::gguf::{hf, GgufFile};
use inference_runtime::{check, stream_tokens, Clock, Jobs, Ready, Sequence, Worker};
use inference_text::{ChatTokenizer, ModelTokenizer, StreamDecoder};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use crate::NAME;

/// Prompt tokens per llama.cpp batch (its default `n_batch`).
const BATCH: usize = 512;

/// llama.cpp's process-wide initialisation, done once (its logs silenced:
/// they would interleave with a program's own output).
fn llama() -> std::result::Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let mut b = LlamaBackend::init().map_err(|e| e.to_string())?;
            b.void_logs();
            Ok(b)
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn engine_error(e: impl std::fmt::Display) -> Error {
    Error::backend(NAME, e.to_string())
}

/// One generation, ready to run on the worker.
struct Job {
    prompt: Vec<u32>,
    opts: GenerateOptions,
    sink: TokenSink,
    queued: Instant,
}

/// What the caller's side and the worker share.
struct Shared {
    text: ChatTokenizer,
    /// Positions of llama.cpp's context (the model's training context).
    n_ctx: usize,
    last_metrics: LastMetrics,
}

/// A GGUF model loaded by the llama.cpp backend.
pub struct LlamaCppModel {
    worker: Worker<Job>,
    shared: Arc<Shared>,
    info: ModelInfo,
}

/// What the worker reports once the model is loaded.
struct Loaded {
    n_ctx: usize,
    vocab: usize,
    layers: usize,
    hidden: usize,
    parameters: u64,
}

/// Refuses load options this backend does not implement yet.
fn check_load_options(opts: &LoadOptions) -> Result<()> {
    opts.validate()?;
    let refuse = |what: &str| {
        Err(Error::unsupported(format!(
            "{what} on the llamacpp backend"
        )))
    };
    if opts.gpu_layers > 0 {
        return refuse("gpu_layers > 0 (this build of llama.cpp runs on the CPU)");
    }
    if opts.context_len.is_some() {
        return refuse("context_len (a rotating context)");
    }
    if opts.allow_past_max_positions {
        return refuse("allow_past_max_positions");
    }
    if opts.adapter_path.is_some() {
        return refuse("LoRA adapters");
    }
    if opts.dtype.is_some() {
        return refuse("dtype (llama.cpp runs the GGUF file's own types)");
    }
    if opts.parallel_slots > 1 {
        return refuse("parallel_slots > 1 (calls queue)");
    }
    if opts.memory_limit_bytes.is_some()
        || opts.cache_limit_bytes.is_some()
        || opts.wired_limit_bytes.is_some()
    {
        return refuse("memory, cache and wired limits");
    }
    Ok(())
}

/// Refuses generation options this backend does not implement yet: it
/// decodes greedily.
fn check_generate_options(opts: &GenerateOptions) -> Result<()> {
    opts.validate()?;
    let refuse = |what: &str| {
        Err(Error::unsupported(format!(
            "{what} on the llamacpp backend"
        )))
    };
    if !opts.is_greedy() || opts.uses_filters() {
        return refuse("sampling (temperature, top-k, top-p, min-p, repeat penalty)");
    }
    if opts.uses_presence_frequency() || !opts.logit_bias.is_empty() {
        return refuse("presence and frequency penalties and logit bias");
    }
    if opts.logprobs || opts.prompt_logprobs {
        return refuse("logprobs");
    }
    if opts.return_logits {
        return refuse("return_logits for generate");
    }
    Ok(())
}

/// Whether this backend can load `path`: a GGUF file our reader accepts,
/// with an architecture.
pub(crate) fn can_load(path: &Path) -> CanLoad {
    let path = match inference_formats::resolve_model_path(path) {
        Ok(p) => p,
        Err(e) => return CanLoad::No(e.to_string()),
    };
    let is_gguf = path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if !is_gguf {
        return CanLoad::No(format!("{} is not a GGUF file", path.display()));
    }
    match GgufFile::open(&path) {
        Ok(f) if f.get_str("general.architecture").is_some() => CanLoad::Yes,
        Ok(_) => CanLoad::No("the GGUF file has no `general.architecture`".into()),
        Err(e) => CanLoad::No(format!("{}: {e}", path.display())),
    }
}

impl LlamaCppModel {
    /// Loads the GGUF file at `path` (or the one `.gguf` in a directory).
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        check_load_options(opts)?;
        let started = Instant::now();
        let path = inference_formats::resolve_model_path(path)?;
        // Our bounds-checked reader looks at the file before llama.cpp does.
        let file = GgufFile::open(&path).map_err(|e| Error::model_load(&path, e))?;
        if let Some(n) = file.get_u64("split.count").filter(|&n| n > 1) {
            return Err(Error::unsupported(format!(
                "split GGUF files ({} is one of {n} parts)",
                path.display()
            )));
        }
        let architecture = file
            .get_str("general.architecture")
            .ok_or_else(|| Error::model_load(&path, "the GGUF file has no `general.architecture`"))?
            .to_owned();
        let model_type = hf::model_type(&architecture)
            .map(str::to_owned)
            .unwrap_or_else(|_| architecture.clone());
        let tokenizer =
            ModelTokenizer::from_gguf(&file, &architecture).map_err(|e| e.into_error(&path))?;
        let (stored, quantised) = hf::stored_type(&file);
        drop(file);

        let weights = path.clone();
        let worker_type = model_type.clone();
        let body = move |ready: Ready<Started>, jobs: Jobs<Job>| {
            serve(&weights, tokenizer, &worker_type, ready, jobs);
        };
        let (worker, started_worker) = Worker::start(NAME, "llamacpp-model", body)?;
        let (shared, loaded) = started_worker.map_err(|e| Error::model_load(&path, e))?;
        let mut info = ModelInfo::new(model_type);
        info.vocab_size = loaded.vocab;
        info.num_layers = loaded.layers;
        info.hidden_size = loaded.hidden;
        info.context_length = loaded.n_ctx;
        info.parameter_count = loaded.parameters;
        info.quant_type = quantised.then(|| stored.clone());
        info.stored_dtype = stored;
        info.dtype = "gguf".to_owned();
        info.chat_template = shared.text.tokenizer().chat_template.is_some();
        tracing::info!(
            model_type = %info.architecture,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "loaded with llama.cpp"
        );
        Ok(Self {
            worker,
            shared,
            info,
        })
    }

    fn submit(&self, prompt: Vec<u32>, opts: &GenerateOptions) -> Result<TokenStream> {
        check::prompt(&prompt, self.info.vocab_size, self.shared.n_ctx)?;
        let (sink, stream) = TokenStream::channel();
        self.worker.send(Job {
            prompt,
            opts: opts.clone(),
            sink,
            queued: Instant::now(),
        })?;
        Ok(stream)
    }
}

/// What the worker reports: the shared state and the model's facts, or why
/// llama.cpp could not load it.
type Started = std::result::Result<(Arc<Shared>, Loaded), String>;

/// The worker: loads the model and its context, reports, then runs jobs in
/// order until the model is dropped.
fn serve(
    path: &PathBuf,
    tokenizer: ModelTokenizer,
    model_type: &str,
    ready: Ready<Started>,
    jobs: Jobs<Job>,
) {
    let backend = match llama() {
        Ok(b) => b,
        Err(e) => return ready.send(Err(format!("llama.cpp did not start: {e}"))),
    };
    let model = match LlamaModel::load_from_file(backend, path, &LlamaModelParams::default()) {
        Ok(m) => m,
        Err(e) => return ready.send(Err(format!("llama.cpp could not load it: {e}"))),
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    let n_ctx = model.n_ctx_train();
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(BATCH as u32)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = match model.new_context(backend, params) {
        Ok(c) => c,
        Err(e) => return ready.send(Err(format!("llama.cpp could not make a context: {e}"))),
    };
    let loaded = Loaded {
        n_ctx: n_ctx as usize,
        vocab: usize::try_from(model.n_vocab()).unwrap_or(0),
        layers: model.n_layer() as usize,
        hidden: usize::try_from(model.n_embd()).unwrap_or(0),
        parameters: model.n_params(),
    };
    let shared = Arc::new(Shared {
        text: ChatTokenizer::new(tokenizer, model_type, loaded.vocab),
        n_ctx: loaded.n_ctx,
        last_metrics: LastMetrics::new(),
    });
    ready.send(Ok((Arc::clone(&shared), loaded)));
    for job in jobs {
        let (metrics, end) = run(&mut ctx, &shared, &job);
        shared.last_metrics.set(&metrics);
        match end {
            Ok(reason) => job.sink.finish(metrics, reason),
            Err(e) => job.sink.fail(e),
        }
    }
}

/// The index of the largest logit (the first of equal ones).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Runs one generation: the prompt in batches of [`BATCH`], then one token
/// per step, each through a [`Sequence`]; its metrics and how it ended.
fn run(
    ctx: &mut LlamaContext<'_>,
    shared: &Shared,
    job: &Job,
) -> (GenerateMetrics, Result<FinishReason>) {
    let mut clock = Clock::start(job.queued);
    let tokenizer = shared.text.tokenizer();
    let detok = StreamDecoder::new(&tokenizer.inner, &job.prompt);
    let mut seq = Sequence::new(&job.opts, &tokenizer.eos, detok);
    let end = decode(ctx, shared, job, &mut clock, &mut seq);
    (clock.metrics(job.prompt.len(), seq.generated()), end)
}

fn decode(
    ctx: &mut LlamaContext<'_>,
    shared: &Shared,
    job: &Job,
    clock: &mut Clock,
    seq: &mut Sequence<StreamDecoder<'_>>,
) -> Result<FinishReason> {
    let Job {
        prompt, opts, sink, ..
    } = job;
    if sink.prompt(prompt.clone()).is_err() {
        return Ok(FinishReason::Cancelled);
    }
    ctx.clear_kv_cache();
    let mut batch = LlamaBatch::new(BATCH, 1);
    let mut pos = 0usize;
    for chunk in prompt.chunks(BATCH) {
        if sink.is_cancelled() {
            return Ok(FinishReason::Cancelled);
        }
        batch.clear();
        for &id in chunk {
            let last = pos + 1 == prompt.len();
            batch
                .add(LlamaToken(id as i32), pos as i32, &[0], last)
                .map_err(engine_error)?;
            pos += 1;
        }
        ctx.decode(&mut batch).map_err(engine_error)?;
    }
    let mut logits_at = batch.n_tokens() - 1;
    let mut ready = Vec::new();
    loop {
        let id = argmax(ctx.get_logits_ith(logits_at));
        clock.token();
        let context_used = prompt.len() + seq.generated() + 1;
        let more = seq.generated() + 1 < opts.max_tokens && context_used < shared.n_ctx;
        let end = seq.push(id, !more, &mut ready).map_err(engine_error)?;
        if !stream_tokens(sink, &mut ready, None) {
            return Ok(FinishReason::Cancelled);
        }
        if let Some(reason) = end {
            return Ok(reason);
        }
        if sink.is_cancelled() {
            return Ok(FinishReason::Cancelled);
        }
        if !more {
            seq.finish(&mut ready);
            if !stream_tokens(sink, &mut ready, None) {
                return Ok(FinishReason::Cancelled);
            }
            return Ok(FinishReason::Length);
        }
        batch.clear();
        batch
            .add(LlamaToken(id as i32), pos as i32, &[0], true)
            .map_err(engine_error)?;
        pos += 1;
        ctx.decode(&mut batch).map_err(engine_error)?;
        logits_at = 0;
    }
}

impl TextModel for LlamaCppModel {
    fn generate(&self, prompt: &str, opts: &GenerateOptions) -> Result<TokenStream> {
        check_generate_options(opts)?;
        if opts.uses_template() {
            return Err(Error::unsupported(
                "template_args and tools for generate (a raw prompt is not templated: use chat)",
            ));
        }
        if prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        let ids = self.shared.text.encode(prompt, true)?;
        self.submit(ids, opts)
    }

    fn chat(&self, messages: &[Message], opts: &GenerateOptions) -> Result<TokenStream> {
        check_generate_options(opts)?;
        if messages.is_empty() {
            return Err(Error::InvalidInput("no messages to answer".into()));
        }
        let ids = self
            .shared
            .text
            .encode_chat(messages, &inference_core::RenderOptions::for_chat(opts))?;
        self.submit(ids, opts)
    }

    fn tokenizer(&self) -> Result<&dyn Tokenizer> {
        Ok(&self.shared.text)
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

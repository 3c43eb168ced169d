//! The model's worker: a thread that owns the llama.cpp model and context
//! and runs [`Job`]s in arrival order. Calls queue; one batched call
//! decodes its sequences together.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use inference_core::{
    BatchResult, ClassifyResult, GenerateOptions, LastMetrics, LoadOptions, Result, TokenSink,
};
use inference_runtime::{Jobs, Ready};
use inference_text::{ChatTokenizer, ModelTokenizer};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;

use crate::decode::Engine;
use crate::options;

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

/// One streamed generation.
pub(crate) struct Request {
    pub(crate) prompt: Vec<u32>,
    pub(crate) opts: GenerateOptions,
    pub(crate) sink: TokenSink,
    pub(crate) queued: Instant,
}

/// Work for the worker.
pub(crate) enum Job {
    /// A streamed generation.
    Generate(Request),
    /// The next token of each prompt (and its logits when asked).
    Classify {
        prompts: Vec<Vec<u32>>,
        opts: GenerateOptions,
        reply: Sender<Result<Vec<ClassifyResult>>>,
    },
    /// A continuation of each prompt, its sequences decoded together.
    Batch {
        prompts: Vec<Vec<u32>>,
        opts: GenerateOptions,
        reply: Sender<Vec<BatchResult>>,
    },
    /// One turn of a chat session, on the session's cached sequence.
    Turn {
        session: u64,
        req: Request,
        turn: inference_runtime::session::Turn,
    },
    /// A chat session ended or was reset: its cache is dropped.
    EndSession(u64),
    /// llama.cpp's own tokenisation of a text (for comparison with ours).
    Tokenize {
        text: String,
        add_special: bool,
        reply: Sender<Vec<u32>>,
    },
}

/// What the caller's side and the worker share.
pub(crate) struct Shared {
    pub(crate) text: ChatTokenizer,
    /// Positions of llama.cpp's context (the model's training context),
    /// shared by every sequence.
    pub(crate) n_ctx: usize,
    pub(crate) vocab: usize,
    pub(crate) last_metrics: LastMetrics,
    /// Prompt tokens chat-session turns took from their caches.
    pub(crate) reused_tokens: AtomicUsize,
}

impl Shared {
    /// The tokenizer.
    pub(crate) fn tokenizer(&self) -> &ModelTokenizer {
        self.text.tokenizer()
    }

    /// Counts `n` prompt tokens a session turn did not prefill.
    pub(crate) fn note_reused(&self, n: usize) {
        self.reused_tokens.fetch_add(n, Ordering::Relaxed);
    }
}

/// The model's facts, once loaded.
pub(crate) struct Loaded {
    pub(crate) n_ctx: usize,
    pub(crate) vocab: usize,
    pub(crate) layers: usize,
    pub(crate) hidden: usize,
    pub(crate) parameters: u64,
}

/// What the worker reports: the shared state and the model's facts, or why
/// llama.cpp could not load it.
pub(crate) type Started = std::result::Result<(Arc<Shared>, Loaded), String>;

/// What the worker needs to start.
pub(crate) struct Setup {
    pub(crate) path: std::path::PathBuf,
    pub(crate) tokenizer: ModelTokenizer,
    pub(crate) model_type: String,
    pub(crate) opts: LoadOptions,
    /// The sliding window of the model's local layers, if it has one.
    pub(crate) sliding_window: Option<usize>,
}

/// The worker: loads the model and its context, reports, then runs jobs in
/// order until the model is dropped.
pub(crate) fn serve(setup: Setup, ready: Ready<Started>, jobs: Jobs<Job>) {
    let backend = match llama() {
        Ok(b) => b,
        Err(e) => return ready.send(Err(format!("llama.cpp did not start: {e}"))),
    };
    let model = match load(backend, &setup.path, &setup.opts) {
        Ok(m) => m,
        Err(e) => return ready.send(Err(e)),
    };
    let n_ctx = model.n_ctx_train();
    let params = options::context_params(&setup.opts, n_ctx);
    let ctx = match model.new_context(backend, params) {
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
        text: ChatTokenizer::new(setup.tokenizer, &setup.model_type, loaded.vocab),
        n_ctx: loaded.n_ctx,
        vocab: loaded.vocab,
        last_metrics: LastMetrics::new(),
        reused_tokens: AtomicUsize::new(0),
    });
    ready.send(Ok((Arc::clone(&shared), loaded)));
    let mut engine = Engine::new(ctx, &shared, setup.sliding_window);
    for job in jobs {
        match job {
            Job::Generate(req) => engine.generate(req, None),
            Job::Turn { session, req, turn } => engine.generate(req, Some((session, turn))),
            Job::Batch {
                prompts,
                opts,
                reply,
            } => {
                let (results, metrics) = engine.batch(&prompts, &opts);
                shared.last_metrics.set(&metrics);
                let _ = reply.send(results);
            }
            Job::Classify {
                prompts,
                opts,
                reply,
            } => {
                let _ = reply.send(engine.classify(&prompts, &opts));
            }
            Job::EndSession(id) => engine.end_session(id),
            Job::Tokenize {
                text,
                add_special,
                reply,
            } => {
                let ids = model
                    .vocab()
                    .tokenize(text.as_bytes(), add_special, true)
                    .into_iter()
                    .map(|t| t.0 as u32)
                    .collect();
                let _ = reply.send(ids);
            }
        }
    }
}

/// llama.cpp's load of the (already checked) file.
fn load(
    backend: &LlamaBackend,
    path: &Path,
    opts: &LoadOptions,
) -> std::result::Result<LlamaModel, String> {
    LlamaModel::load_from_file(backend, path, &options::model_params(opts))
        .map_err(|e| format!("llama.cpp could not load it: {e}"))
}

//! [`LlamaCppModel`]: a GGUF model on llama.cpp, served by a worker thread
//! that owns the llama.cpp model and context.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Instant;

use inference_core::{
    BatchResult, CanLoad, ChatSession, ClassifyResult, Error, GenerateMetrics, GenerateOptions,
    LoadOptions, Message, ModelInfo, RenderOptions, Result, TextModel, TokenStream, Tokenizer,
};
use inference_formats::gguf::{hf, GgufFile};
use inference_runtime::{check, Ready, Worker};
use inference_text::ModelTokenizer;

use crate::options::{check_generate_options, check_load_options, refuse_template};
use crate::session::LlamaChatSession;
use crate::worker::{serve, Job, Request, Setup, Shared, Started};
use crate::NAME;

/// A GGUF model loaded by the llama.cpp backend.
///
/// Calls queue on the model's worker and run one at a time; a
/// `batch_generate` or `classify` call decodes its prompts together as
/// llama.cpp sequences.
pub struct LlamaCppModel {
    worker: Arc<Worker<Job>>,
    shared: Arc<Shared>,
    info: ModelInfo,
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
        inference_formats::discover::check_gguf_not_split(&file, &path)?;
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
        let sliding_window = file
            .get_u64(&format!("{architecture}.attention.sliding_window"))
            .and_then(|w| usize::try_from(w).ok())
            .filter(|&w| w > 0);
        drop(file);

        let setup = Setup {
            path: path.clone(),
            tokenizer,
            model_type: model_type.clone(),
            opts: opts.clone(),
            sliding_window,
        };
        let body = move |ready: Ready<Started>, jobs| serve(setup, ready, jobs);
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
        info.chat_template = shared.tokenizer().chat_template.is_some();
        tracing::info!(
            model_type = %info.architecture,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "loaded with llama.cpp"
        );
        Ok(Self {
            worker: Arc::new(worker),
            shared,
            info,
        })
    }

    fn submit(&self, prompt: Vec<u32>, opts: &GenerateOptions) -> Result<TokenStream> {
        check::prompt(&prompt, self.info.vocab_size, self.shared.n_ctx)?;
        let (sink, stream) = TokenStream::channel();
        self.worker.send(Job::Generate(Request {
            prompt,
            opts: opts.clone(),
            sink,
            queued: Instant::now(),
        }))?;
        Ok(stream)
    }

    /// Encodes raw prompts, refusing an empty one.
    fn encode_all(&self, prompts: &[String]) -> Result<Vec<Vec<u32>>> {
        if prompts.is_empty() {
            return Err(Error::InvalidInput("no prompts".into()));
        }
        prompts
            .iter()
            .map(|p| {
                if p.is_empty() {
                    return Err(Error::InvalidInput("a prompt is empty".into()));
                }
                self.shared.text.encode(p, true)
            })
            .collect()
    }

    fn await_reply<T>(answer: &Receiver<T>) -> Result<T> {
        answer
            .recv()
            .map_err(|_| Error::backend(NAME, "the model's worker stopped"))
    }

    /// Streams the continuation of `ids` (already encoded; checked against
    /// the vocabulary and the context).
    pub fn generate_ids(&self, ids: Vec<u32>, opts: &GenerateOptions) -> Result<TokenStream> {
        check_generate_options(opts, self.info.vocab_size)?;
        refuse_template(opts, "generate_ids")?;
        self.submit(ids, opts)
    }

    /// [`batch_generate`](TextModel::batch_generate) of encoded prompts.
    pub fn batch_generate_ids(
        &self,
        prompts: Vec<Vec<u32>>,
        opts: &GenerateOptions,
    ) -> Result<Vec<BatchResult>> {
        check_generate_options(opts, self.info.vocab_size)?;
        refuse_template(opts, "batch_generate")?;
        if opts.prompt_logprobs {
            return Err(Error::unsupported(
                "prompt_logprobs for batch_generate (a batch result has no prompt)",
            ));
        }
        if prompts.is_empty() {
            return Err(Error::InvalidInput("no prompts".into()));
        }
        for p in &prompts {
            check::prompt(p, self.info.vocab_size, self.shared.n_ctx)?;
        }
        let (reply, answer) = channel();
        self.worker.send(Job::Batch {
            prompts,
            opts: opts.clone(),
            reply,
        })?;
        Self::await_reply(&answer)
    }

    /// llama.cpp's own tokenisation of `text` (`add_special`: its BOS rule;
    /// special tokens in the text are parsed), for comparing with the
    /// tokenizer this backend encodes with (ours, from the same GGUF).
    pub fn llama_tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let (reply, answer) = channel();
        self.worker.send(Job::Tokenize {
            text: text.to_owned(),
            add_special,
            reply,
        })?;
        Self::await_reply(&answer)
    }

    /// Prompt tokens chat-session turns have taken from their cache rather
    /// than prefilled, since the model was loaded.
    pub fn reused_tokens(&self) -> usize {
        self.shared.reused_tokens.load(Ordering::Relaxed)
    }
}

impl TextModel for LlamaCppModel {
    fn generate_ids(&self, ids: Vec<u32>, opts: &GenerateOptions) -> Result<TokenStream> {
        LlamaCppModel::generate_ids(self, ids, opts)
    }

    fn generate(&self, prompt: &str, opts: &GenerateOptions) -> Result<TokenStream> {
        check_generate_options(opts, self.info.vocab_size)?;
        refuse_template(opts, "generate")?;
        if prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        let ids = self.shared.text.encode(prompt, true)?;
        self.submit(ids, opts)
    }

    fn chat(&self, messages: &[Message], opts: &GenerateOptions) -> Result<TokenStream> {
        check_generate_options(opts, self.info.vocab_size)?;
        if messages.is_empty() {
            return Err(Error::InvalidInput("no messages to answer".into()));
        }
        let ids = self
            .shared
            .text
            .encode_chat(messages, &RenderOptions::for_chat(opts))?;
        self.submit(ids, opts)
    }

    fn classify(&self, prompts: &[String], opts: &GenerateOptions) -> Result<Vec<ClassifyResult>> {
        check::classify_options(opts, self.info.vocab_size)?;
        let prompts = self.encode_all(prompts)?;
        check::classify_prompts(&prompts, self.shared.n_ctx)?;
        let (reply, answer) = channel();
        self.worker.send(Job::Classify {
            prompts,
            opts: opts.clone(),
            reply,
        })?;
        Self::await_reply(&answer)?
    }

    fn batch_generate(
        &self,
        prompts: &[String],
        opts: &GenerateOptions,
    ) -> Result<Vec<BatchResult>> {
        check_generate_options(opts, self.info.vocab_size)?;
        refuse_template(opts, "batch_generate")?;
        let prompts = self.encode_all(prompts)?;
        self.batch_generate_ids(prompts, opts)
    }

    /// A chat session whose cache stays in llama.cpp between turns (see
    /// the `decode` module for when a turn reuses it).
    fn chat_session(&self) -> Result<Box<dyn ChatSession>> {
        Ok(Box::new(LlamaChatSession::new(
            Arc::clone(&self.shared),
            Arc::clone(&self.worker),
        )))
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

//! [`ScriptedModel`]: a deterministic model that replays a script.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use inference_core::{
    BatchResult, Error, FinishReason, GenerateMetrics, GenerateOptions, LastMetrics, Message,
    ModelInfo, Result, TextModel, Token, TokenId, TokenSink, TokenStream,
};
use inference_runtime::{stream_tokens, Clock, Sequence, Worker};
use inference_text::Detokenize;

/// The architecture name a scripted model reports.
pub const MODEL_TYPE: &str = "scripted";

/// Builds a [`ScriptedModel`].
#[derive(Debug, Clone)]
pub struct ScriptedModelBuilder {
    script: Vec<Token>,
    eos: Option<TokenId>,
    step_delay: Duration,
    model_type: String,
    renders_tools: bool,
}

impl ScriptedModelBuilder {
    /// The end-of-sequence id: generation stops there (without yielding it)
    /// unless `ignore_eos` is set.
    pub fn eos(mut self, id: TokenId) -> Self {
        self.eos = Some(id);
        self
    }

    /// Sleeps this long before each token, to make cancellation observable.
    pub fn step_delay(mut self, delay: Duration) -> Self {
        self.step_delay = delay;
        self
    }

    /// The architecture the model reports (`ModelInfo::architecture` and
    /// `model_type`; default `scripted`): a server picks the tool-call
    /// format it parses by it.
    pub fn model_type(mut self, name: impl Into<String>) -> Self {
        self.model_type = name.into();
        self
    }

    /// Let `chat` take tools and chat-template arguments: they are rendered
    /// as `tool: NAME` and `arg: KEY=VALUE` lines before the messages (the
    /// script is replayed whatever they say). Off by default: they are
    /// refused with [`Error::Unsupported`].
    pub fn renders_tools(mut self, yes: bool) -> Self {
        self.renders_tools = yes;
        self
    }

    /// The model; fails with [`Error::InvalidInput`] for an empty script.
    pub fn build(self) -> Result<ScriptedModel> {
        if self.script.is_empty() {
            return Err(Error::InvalidInput(
                "a scripted model needs at least one token".into(),
            ));
        }
        let shared = Arc::new(Shared {
            script: self.script,
            eos: self.eos,
            step_delay: self.step_delay,
            last_metrics: LastMetrics::new(),
            model_type: self.model_type,
            renders_tools: self.renders_tools,
        });
        let worker_shared = Arc::clone(&shared);
        let (worker, ()) = Worker::start(crate::NAME, "scripted-model", move |ready, jobs| {
            ready.send(());
            // Jobs run one at a time, in arrival order; the loop ends when
            // the model (the worker's only holder) is dropped.
            for job in jobs {
                worker_shared.run(job);
            }
        })?;
        Ok(ScriptedModel { shared, worker })
    }
}

/// A deterministic [`TextModel`] for tests: every call replays the script from
/// its start (cycling when `max_tokens` asks for more), greedy by nature.
///
/// A prompt counts one token per whitespace-separated word, and the model has
/// no vocabulary for prompts: the prompt ids it announces (see
/// [`TokenStream::prompt_ids`]) are the words' positions, `0, 1, 2, …`
/// (for [`chat`](TextModel::chat), of the words of the messages rendered as
/// `role: content` lines). Calls queue on one
/// worker thread the model owns, so concurrent calls never interleave.
/// Sampling options (temperature above 0 and the filters), chat-template
/// arguments and `return_logits` are refused with [`Error::Unsupported`].
///
/// ```
/// use backend_stub::ScriptedModel;
/// use inference_core::{GenerateOptions, TextModel, Token};
///
/// let model = ScriptedModel::builder(vec![Token::new(1, "Hi"), Token::new(2, "!"), Token::new(0, "")])
///     .eos(0)
///     .build()
///     .unwrap();
/// let text = model.generate("hello", &GenerateOptions::new()).unwrap().collect_text().unwrap();
/// assert_eq!(text, "Hi!");
/// ```
#[derive(Debug)]
pub struct ScriptedModel {
    shared: Arc<Shared>,
    worker: Worker<Job>,
}

#[derive(Debug)]
struct Shared {
    script: Vec<Token>,
    eos: Option<TokenId>,
    step_delay: Duration,
    last_metrics: LastMetrics,
    model_type: String,
    renders_tools: bool,
}

struct Job {
    prompt_tokens: usize,
    opts: GenerateOptions,
    sink: TokenSink,
    queued: Instant,
}

impl ScriptedModel {
    /// A builder for a model that replays `script`.
    pub fn builder(script: Vec<Token>) -> ScriptedModelBuilder {
        ScriptedModelBuilder {
            script,
            eos: None,
            step_delay: Duration::ZERO,
            model_type: MODEL_TYPE.to_owned(),
            renders_tools: false,
        }
    }

    /// A model replaying `words` as tokens with ids 1, 2, … and then an
    /// end-of-sequence token (id 0).
    pub fn from_words(words: &[&str]) -> Result<Self> {
        let mut script: Vec<Token> = (1..).zip(words).map(|(id, w)| Token::new(id, *w)).collect();
        script.push(Token::new(0, ""));
        Self::builder(script).eos(0).build()
    }

    fn check(&self, opts: &GenerateOptions) -> Result<()> {
        opts.validate()?;
        if !opts.is_greedy() || opts.uses_filters() {
            return Err(Error::unsupported(
                "sampling (temperature, top-k, top-p, min-p, repeat penalty) on the scripted model",
            ));
        }
        if opts.return_logits {
            return Err(Error::unsupported("return_logits for generate"));
        }
        if opts.logprobs || opts.prompt_logprobs {
            return Err(Error::unsupported(
                "logprobs on the scripted model (it has no distribution)",
            ));
        }
        if opts.uses_template() {
            return Err(Error::unsupported(
                "template_args, tools and reply_prefix for a raw prompt (it is not templated)",
            ));
        }
        if opts.uses_presence_frequency() || !opts.logit_bias.is_empty() {
            return Err(Error::unsupported(
                "presence and frequency penalties and logit bias on the scripted model",
            ));
        }
        Ok(())
    }

    fn submit(&self, prompt: &str, opts: &GenerateOptions) -> Result<TokenStream> {
        self.check(opts)?;
        let prompt_tokens = prompt.split_whitespace().count();
        if prompt_tokens == 0 {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        let (sink, stream) = TokenStream::channel();
        let job = Job {
            prompt_tokens,
            opts: opts.clone(),
            sink,
            queued: Instant::now(),
        };
        self.worker.send(job)?;
        Ok(stream)
    }
}

/// The script's texts, in order: what a tokenizer's detokeniser would give
/// for the ids the script replays.
struct Replay<'s> {
    script: &'s [Token],
    next: usize,
}

impl Detokenize for Replay<'_> {
    fn step(&mut self, _id: u32) -> std::result::Result<String, String> {
        let text = self.script[self.next % self.script.len()].text.clone();
        self.next += 1;
        Ok(text)
    }

    fn finish(&mut self) -> std::result::Result<String, String> {
        Ok(String::new())
    }
}

impl Shared {
    fn run(&self, job: Job) {
        let Job {
            prompt_tokens,
            opts,
            sink,
            queued,
        } = job;
        let _span = tracing::debug_span!("generate", model = MODEL_TYPE, prompt_tokens).entered();
        let mut clock = Clock::start(queued);
        // No vocabulary for prompts: each word's position is its id.
        let prompt_ids = (0..prompt_tokens)
            .map(|i| TokenId::try_from(i).unwrap_or(TokenId::MAX))
            .collect();
        let announced = sink.prompt(prompt_ids).is_ok();
        let replay = Replay {
            script: &self.script,
            next: 0,
        };
        let mut seq = Sequence::new(&opts, self.eos.as_slice(), replay);
        let mut ready = Vec::new();
        let mut reason = FinishReason::Length;
        let steps = self.script.iter().cycle().take(opts.max_tokens);
        for (i, token) in steps.enumerate() {
            if !announced || sink.is_cancelled() {
                reason = FinishReason::Cancelled;
                break;
            }
            if !self.step_delay.is_zero() {
                thread::sleep(self.step_delay);
            }
            clock.token();
            let end = match seq.push(token.id, i + 1 == opts.max_tokens, &mut ready) {
                Ok(end) => end,
                Err(e) => {
                    sink.fail(Error::backend(crate::NAME, e.to_string()));
                    return;
                }
            };
            if !stream_tokens(&sink, &mut ready, None) {
                reason = FinishReason::Cancelled;
                break;
            }
            if let Some(end) = end {
                reason = end;
                break;
            }
        }
        if reason != FinishReason::Cancelled {
            seq.finish(&mut ready);
            stream_tokens(&sink, &mut ready, None);
        }
        let metrics = clock.metrics(prompt_tokens, seq.generated());
        self.last_metrics.set(&metrics);
        sink.finish(metrics, reason);
    }
}

impl TextModel for ScriptedModel {
    fn generate(&self, prompt: &str, opts: &GenerateOptions) -> Result<TokenStream> {
        self.submit(prompt, opts)
    }

    fn chat(&self, messages: &[Message], opts: &GenerateOptions) -> Result<TokenStream> {
        if messages.is_empty() {
            return Err(Error::InvalidInput("no messages to answer".into()));
        }
        if opts.uses_template() && !self.shared.renders_tools {
            return Err(Error::unsupported(
                "chat-template arguments and tools on the scripted model (it has no template)",
            ));
        }
        let mut rendered = String::new();
        for t in &opts.tools {
            let name = t
                .pointer("/function/name")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("?");
            rendered.push_str(&format!("tool: {name}\n"));
        }
        for (k, v) in &opts.template_args {
            rendered.push_str(&format!("arg: {k}={v}\n"));
        }
        rendered.extend(
            messages
                .iter()
                .map(|m| format!("{}: {}\n", m.role, m.content)),
        );
        if let Some(prefix) = &opts.reply_prefix {
            rendered.push_str(&format!("assistant: {prefix}"));
        }
        let mut plain = opts.clone();
        plain.tools.clear();
        plain.template_args.clear();
        plain.reply_prefix = None;
        self.submit(&rendered, &plain)
    }

    fn batch_generate(
        &self,
        prompts: &[String],
        opts: &GenerateOptions,
    ) -> Result<Vec<BatchResult>> {
        self.check(opts)?;
        if prompts.is_empty() {
            return Err(Error::InvalidInput("no prompts".into()));
        }
        let streams: Vec<TokenStream> = prompts
            .iter()
            .map(|p| self.submit(p, opts))
            .collect::<Result<_>>()?;
        Ok(streams
            .into_iter()
            .map(|mut stream| {
                let mut tokens = Vec::new();
                let mut error = None;
                for item in stream.by_ref() {
                    match item {
                        Ok(t) => tokens.push(t),
                        Err(e) => error = Some(e),
                    }
                }
                BatchResult {
                    tokens,
                    finish_reason: stream.finish_reason().unwrap_or(FinishReason::Error),
                    error,
                }
            })
            .collect())
    }

    fn info(&self) -> ModelInfo {
        let mut info = ModelInfo::new(self.shared.model_type.clone());
        info.vocab_size = self
            .shared
            .script
            .iter()
            .map(|t| t.id as usize + 1)
            .max()
            .unwrap_or(0);
        info.dtype = "none".into();
        info
    }

    fn metrics(&self) -> Option<GenerateMetrics> {
        self.shared.last_metrics.get()
    }

    fn model_type(&self) -> &str {
        &self.shared.model_type
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inference_core::conformance::{assert_conformance, ConformanceConfig};

    fn words() -> ScriptedModel {
        ScriptedModel::builder(
            ["The", " answer", " is", " forty", "-two", ".", " Done", ""]
                .iter()
                .zip(10..)
                .map(|(w, id)| Token::new(id, *w))
                .collect(),
        )
        .eos(17)
        .step_delay(Duration::from_millis(1))
        .build()
        .unwrap()
    }

    #[test]
    fn passes_the_conformance_kit() {
        assert_conformance(&words(), &ConformanceConfig::default());
    }

    #[test]
    fn eos_ends_and_is_not_yielded() {
        let model = words();
        let mut s = model.generate("q", &GenerateOptions::new()).unwrap();
        assert_eq!(s.collect_text().unwrap(), "The answer is forty-two. Done");
        assert_eq!(s.finish_reason(), Some(FinishReason::Stop));
        assert_eq!(s.metrics().unwrap().generated_tokens, 7);
        assert_eq!(s.metrics().unwrap().prompt_tokens, 1);
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        let model = words();
        for opts in [
            GenerateOptions::new().temperature(0.5),
            GenerateOptions::new().top_k(3),
            GenerateOptions::new().repeat_penalty(1.3),
            GenerateOptions::new().logprobs(0),
            GenerateOptions::new().presence_penalty(0.5),
            GenerateOptions::new().frequency_penalty(0.5),
            GenerateOptions::new().logit_bias(1, 2.0),
        ] {
            assert!(matches!(
                model.generate("q", &opts),
                Err(Error::Unsupported { .. })
            ));
        }
        let args = GenerateOptions::new().template_arg("enable_thinking", true);
        assert!(matches!(
            model.chat(&[Message::user("hi")], &args),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(
            model.generate("q", &args),
            Err(Error::Unsupported { .. })
        ));
        let tools = GenerateOptions::new().tool(serde_json::json!({"type": "function"}));
        assert!(matches!(
            model.chat(&[Message::user("hi")], &tools),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(
            model.classify(&["q".into()], &GenerateOptions::new()),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(
            model.chat_session(),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(model.tokenizer(), Err(Error::Unsupported { .. })));
        assert!(ScriptedModel::builder(Vec::new()).build().is_err());
    }

    #[test]
    fn announces_word_positions_as_prompt_ids() {
        let model = words();
        let mut s = model
            .generate("what is  the answer", &GenerateOptions::new().max_tokens(2))
            .unwrap();
        assert_eq!(s.prompt_ids(), None);
        assert_eq!(s.collect_text().unwrap(), "The answer");
        assert_eq!(s.prompt_ids(), Some(&[0, 1, 2, 3][..]));
        assert_eq!(s.metrics().unwrap().prompt_tokens, 4);

        // chat: the rendered `role: content` lines, word by word.
        let mut s = model
            .chat(
                &[Message::system("be brief"), Message::user("hi there")],
                &GenerateOptions::new().max_tokens(1),
            )
            .unwrap();
        s.collect_text().unwrap();
        assert_eq!(s.prompt_ids(), Some(&[0, 1, 2, 3, 4, 5][..]));
    }

    #[test]
    fn batch_matches_single_runs() {
        let model = words();
        let opts = GenerateOptions::new().max_tokens(4);
        let rows = model
            .batch_generate(&["a".into(), "b c".into()], &opts)
            .unwrap();
        assert_eq!(rows.len(), 2);
        for row in rows {
            assert_eq!(row.text(), "The answer is forty");
            assert_eq!(row.finish_reason, FinishReason::Length);
            assert!(row.error.is_none());
        }
    }
}

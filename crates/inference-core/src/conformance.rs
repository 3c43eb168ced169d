//! The conformance kit: checks every backend's models must pass.
//!
//! Enabled with the `conformance` feature. Run it from a backend's tests:
//!
//! ```ignore
//! let model = my_backend.load_model(path, &LoadOptions::default())?;
//! inference_core::conformance::assert_conformance(&*model, &ConformanceConfig::default());
//! ```
//!
//! The kit assumes greedy decoding is deterministic and that the model can
//! generate [`ConformanceConfig::long_max_tokens`] tokens after its prompt.

use std::time::{Duration, Instant};

use crate::error::Error;
use crate::model::TextModel;
use crate::options::GenerateOptions;
use crate::types::{FinishReason, Message, TokenId};

/// What the kit feeds the model.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConformanceConfig {
    /// The main prompt.
    pub prompt: String,
    /// A second, different prompt (for the concurrency check).
    pub other_prompt: String,
    /// Tokens to generate in the short checks (at least 4).
    pub max_tokens: usize,
    /// Tokens asked for in the cancellation checks; cancellation must stop the
    /// call well before this, so choose it so that the call takes at least
    /// tens of milliseconds. (Engines run ahead of the consumer; a call that
    /// finishes before the consumer reads its first token cannot be cancelled.)
    pub long_max_tokens: usize,
    /// Threads in the concurrency check.
    pub threads: usize,
    /// How long to wait for a cancelled call to finish.
    pub timeout: Duration,
}

impl Default for ConformanceConfig {
    fn default() -> Self {
        Self {
            prompt: "The quick brown fox".to_owned(),
            other_prompt: "Once upon a time".to_owned(),
            max_tokens: 8,
            long_max_tokens: 200,
            threads: 4,
            timeout: Duration::from_secs(120),
        }
    }
}

impl ConformanceConfig {
    /// Sets the two prompts.
    pub fn prompts(mut self, prompt: impl Into<String>, other: impl Into<String>) -> Self {
        self.prompt = prompt.into();
        self.other_prompt = other.into();
        self
    }

    /// Sets [`max_tokens`](Self::max_tokens) and [`long_max_tokens`](Self::long_max_tokens).
    pub fn token_counts(mut self, short: usize, long: usize) -> Self {
        self.max_tokens = short.max(4);
        self.long_max_tokens = long;
        self
    }

    /// Sets [`threads`](Self::threads).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n.max(2);
        self
    }
}

/// A failed check.
#[derive(Debug, Clone)]
pub struct CheckFailure {
    /// The check's name.
    pub check: &'static str,
    /// What went wrong.
    pub message: String,
}

type Check = fn(&dyn TextModel, &ConformanceConfig) -> Result<(), String>;

/// Every check, by name.
pub const CHECKS: &[(&str, Check)] = &[
    ("stream_ends", stream_ends),
    ("max_tokens_and_ignore_eos", max_tokens_and_ignore_eos),
    ("stop_tokens_not_yielded", stop_tokens_not_yielded),
    ("stop_strings_not_yielded", stop_strings_not_yielded),
    ("cancel_by_drop", cancel_by_drop),
    ("cancel_by_handle", cancel_by_handle),
    (
        "invalid_options_rejected_before_work",
        invalid_options_rejected_before_work,
    ),
    ("metrics_filled_in", metrics_filled_in),
    (
        "concurrent_calls_do_not_interfere",
        concurrent_calls_do_not_interfere,
    ),
];

/// Runs every check; the failures, if any.
pub fn check_all(model: &dyn TextModel, cfg: &ConformanceConfig) -> Result<(), Vec<CheckFailure>> {
    let failures: Vec<CheckFailure> = CHECKS
        .iter()
        .filter_map(|(check, f)| {
            f(model, cfg)
                .err()
                .map(|message| CheckFailure { check, message })
        })
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures)
    }
}

/// Runs every check and panics with a list of the failures.
#[track_caller]
pub fn assert_conformance(model: &dyn TextModel, cfg: &ConformanceConfig) {
    if let Err(failures) = check_all(model, cfg) {
        let list: Vec<String> = failures
            .iter()
            .map(|f| format!("  - {}: {}", f.check, f.message))
            .collect();
        panic!(
            "{} of {} conformance checks failed for {}:\n{}",
            failures.len(),
            CHECKS.len(),
            model.model_type(),
            list.join("\n")
        );
    }
}

/// What one complete greedy run produced.
struct Run {
    ids: Vec<TokenId>,
    text: String,
    reason: Option<FinishReason>,
}

fn run(model: &dyn TextModel, prompt: &str, opts: &GenerateOptions) -> Result<Run, String> {
    let mut stream = model
        .generate(prompt, opts)
        .map_err(|e| format!("generate failed: {e}"))?;
    let mut ids = Vec::new();
    let mut text = String::new();
    for item in stream.by_ref() {
        let token = item.map_err(|e| format!("stream yielded an error: {e}"))?;
        ids.push(token.id);
        text.push_str(&token.text);
    }
    Ok(Run {
        ids,
        text,
        reason: stream.finish_reason(),
    })
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

fn fixed_length(n: usize) -> GenerateOptions {
    GenerateOptions::new().max_tokens(n).ignore_eos(true)
}

/// A stream ends on its own, within `max_tokens`, with a reason and metrics.
pub fn stream_ends(model: &dyn TextModel, cfg: &ConformanceConfig) -> Result<(), String> {
    let opts = GenerateOptions::new().max_tokens(cfg.max_tokens);
    let mut stream = model
        .generate(&cfg.prompt, &opts)
        .map_err(|e| e.to_string())?;
    let mut n = 0;
    for item in stream.by_ref() {
        item.map_err(|e| format!("stream yielded an error: {e}"))?;
        n += 1;
        ensure(n <= cfg.max_tokens, || {
            format!("more than max_tokens={} tokens", cfg.max_tokens)
        })?;
    }
    ensure(
        matches!(
            stream.finish_reason(),
            Some(FinishReason::Stop | FinishReason::Length)
        ),
        || {
            format!(
                "finish reason {:?}, expected stop or length",
                stream.finish_reason()
            )
        },
    )?;
    ensure(stream.metrics().is_some(), || {
        "no metrics on the ended stream".into()
    })
}

/// With `ignore_eos`, exactly `max_tokens` tokens; without, at most that.
pub fn max_tokens_and_ignore_eos(
    model: &dyn TextModel,
    cfg: &ConformanceConfig,
) -> Result<(), String> {
    for n in [1, cfg.max_tokens] {
        let r = run(model, &cfg.prompt, &fixed_length(n))?;
        ensure(r.ids.len() == n, || {
            format!("ignore_eos with max_tokens={n} gave {} tokens", r.ids.len())
        })?;
        ensure(r.reason == Some(FinishReason::Length), || {
            format!("finish reason {:?}, expected length", r.reason)
        })?;
    }
    let r = run(
        model,
        &cfg.prompt,
        &GenerateOptions::new().max_tokens(cfg.max_tokens),
    )?;
    ensure(r.ids.len() <= cfg.max_tokens, || {
        "max_tokens exceeded".into()
    })
}

/// A stop id ends generation and is not yielded.
pub fn stop_tokens_not_yielded(
    model: &dyn TextModel,
    cfg: &ConformanceConfig,
) -> Result<(), String> {
    let reference = run(model, &cfg.prompt, &fixed_length(cfg.max_tokens))?;
    let stop = reference.ids[cfg.max_tokens / 2];
    let cut = reference.ids.iter().position(|&id| id == stop).unwrap_or(0);
    let r = run(
        model,
        &cfg.prompt,
        &fixed_length(cfg.max_tokens).stop_token(stop),
    )?;
    ensure(r.ids == reference.ids[..cut], || {
        format!(
            "with stop id {stop}: got {:?}, expected {:?}",
            r.ids,
            &reference.ids[..cut]
        )
    })?;
    ensure(r.reason == Some(FinishReason::Stop), || {
        format!("finish reason {:?}, expected stop", r.reason)
    })
}

/// A stop string ends generation; neither it nor anything after it is yielded,
/// and everything before it is.
pub fn stop_strings_not_yielded(
    model: &dyn TextModel,
    cfg: &ConformanceConfig,
) -> Result<(), String> {
    let mut stream = model
        .generate(&cfg.prompt, &fixed_length(cfg.max_tokens))
        .map_err(|e| e.to_string())?;
    let tokens = stream.collect_tokens().map_err(|e| e.to_string())?;
    let full: String = tokens.iter().map(|t| t.text.as_str()).collect();
    let Some(stop) = tokens
        .iter()
        .skip(1)
        .map(|t| t.text.trim())
        .find(|t| !t.is_empty())
    else {
        return Err(format!(
            "the model's output {full:?} has no text to use as a stop string"
        ));
    };
    let expected = &full[..full.find(stop).unwrap_or(0)];
    let r = run(
        model,
        &cfg.prompt,
        &fixed_length(cfg.max_tokens).stop_string(stop),
    )?;
    ensure(r.text == expected, || {
        format!(
            "with stop string {stop:?}: got {:?}, expected {expected:?}",
            r.text
        )
    })?;
    ensure(r.reason == Some(FinishReason::Stop), || {
        format!("finish reason {:?}, expected stop", r.reason)
    })
}

/// Dropping a stream stops its generation early.
pub fn cancel_by_drop(model: &dyn TextModel, cfg: &ConformanceConfig) -> Result<(), String> {
    // Make sure a finished call is on record, so that the cancelled call's
    // metrics are recognisable as new.
    run(model, &cfg.prompt, &fixed_length(2))?;
    let before = model.metrics();
    let mut stream = model
        .generate(&cfg.prompt, &fixed_length(cfg.long_max_tokens))
        .map_err(|e| e.to_string())?;
    stream
        .next()
        .ok_or("the stream ended before its first token")?
        .map_err(|e| e.to_string())?;
    drop(stream);
    let deadline = Instant::now() + cfg.timeout;
    loop {
        let now = model.metrics();
        if now != before {
            let m = now.ok_or("metrics disappeared")?;
            return ensure(m.generated_tokens < cfg.long_max_tokens, || {
                format!(
                    "the dropped stream's call generated all {} tokens",
                    m.generated_tokens
                )
            });
        }
        if Instant::now() > deadline {
            return Err("the call of a dropped stream did not finish in time".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A cancel handle stops generation early; the stream ends as cancelled.
pub fn cancel_by_handle(model: &dyn TextModel, cfg: &ConformanceConfig) -> Result<(), String> {
    let mut stream = model
        .generate(&cfg.prompt, &fixed_length(cfg.long_max_tokens))
        .map_err(|e| e.to_string())?;
    let handle = stream.cancel_handle();
    stream
        .next()
        .ok_or("the stream ended before its first token")?
        .map_err(|e| e.to_string())?;
    handle.cancel();
    let mut n = 1;
    for item in stream.by_ref() {
        item.map_err(|e| format!("stream yielded an error after cancel: {e}"))?;
        n += 1;
    }
    ensure(n < cfg.long_max_tokens, || {
        "cancel did not stop generation".into()
    })?;
    ensure(
        stream.finish_reason() == Some(FinishReason::Cancelled),
        || {
            format!(
                "finish reason {:?}, expected cancelled",
                stream.finish_reason()
            )
        },
    )
}

/// Invalid options and inputs fail at the call, before any stream exists.
pub fn invalid_options_rejected_before_work(
    model: &dyn TextModel,
    cfg: &ConformanceConfig,
) -> Result<(), String> {
    let cases: [(&str, GenerateOptions); 4] = [
        ("temperature", GenerateOptions::new().temperature(-1.0)),
        ("top_p", GenerateOptions::new().top_p(2.0)),
        ("max_tokens", GenerateOptions::new().max_tokens(0)),
        ("stop_strings", GenerateOptions::new().stop_string("")),
    ];
    for (field, opts) in cases {
        match model.generate(&cfg.prompt, &opts) {
            Err(Error::InvalidOption { field: f, .. }) if f == field => {}
            Err(other) => return Err(format!("bad {field}: expected InvalidOption, got {other}")),
            Ok(_) => return Err(format!("bad {field}: accepted")),
        }
    }
    match model.generate(&cfg.prompt, &GenerateOptions::new().return_logits(true)) {
        Err(Error::Unsupported { .. }) => {}
        Err(other) => {
            return Err(format!(
                "return_logits on generate: expected Unsupported, got {other}"
            ))
        }
        Ok(_) => return Err("return_logits on generate: accepted".into()),
    }
    match model.generate("", &GenerateOptions::new()) {
        Err(Error::InvalidInput(_)) => {}
        Err(other) => return Err(format!("empty prompt: expected InvalidInput, got {other}")),
        Ok(_) => return Err("empty prompt: accepted".into()),
    }
    let no_messages: &[Message] = &[];
    match model.chat(no_messages, &GenerateOptions::new()) {
        Err(Error::InvalidInput(_)) => Ok(()),
        Err(other) => Err(format!(
            "no chat messages: expected InvalidInput, got {other}"
        )),
        Ok(_) => Err("no chat messages: accepted".into()),
    }
}

/// The ended stream and the model report the same, filled-in metrics.
pub fn metrics_filled_in(model: &dyn TextModel, cfg: &ConformanceConfig) -> Result<(), String> {
    let mut stream = model
        .generate(&cfg.prompt, &fixed_length(cfg.max_tokens))
        .map_err(|e| e.to_string())?;
    let n = stream.collect_tokens().map_err(|e| e.to_string())?.len();
    let m = stream
        .metrics()
        .ok_or("no metrics on the ended stream")?
        .clone();
    ensure(m.prompt_tokens > 0, || "prompt_tokens is 0".into())?;
    ensure(m.generated_tokens == n, || {
        format!(
            "generated_tokens {} but {n} tokens were yielded",
            m.generated_tokens
        )
    })?;
    ensure(!m.total_duration.is_zero(), || "total_duration is 0".into())?;
    ensure(m.total_duration >= m.prefill_duration, || {
        "total < prefill".into()
    })?;
    ensure(m.prefill_tokens_per_sec > 0.0, || {
        "prefill_tokens_per_sec is 0".into()
    })?;
    ensure(m.decode_tokens_per_sec > 0.0, || {
        "decode_tokens_per_sec is 0".into()
    })?;
    ensure(model.metrics().as_ref() == Some(&m), || {
        format!(
            "model.metrics() {:?} differs from the stream's {m:?}",
            model.metrics()
        )
    })
}

/// Calls from several threads at once each get what they get alone.
pub fn concurrent_calls_do_not_interfere(
    model: &dyn TextModel,
    cfg: &ConformanceConfig,
) -> Result<(), String> {
    let opts = fixed_length(cfg.max_tokens);
    let prompts = [cfg.prompt.as_str(), cfg.other_prompt.as_str()];
    let alone: Vec<Vec<TokenId>> = prompts
        .iter()
        .map(|p| run(model, p, &opts).map(|r| r.ids))
        .collect::<Result<_, _>>()?;
    let together: Vec<Result<Vec<TokenId>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..cfg.threads)
            .map(|i| {
                let (prompt, opts) = (prompts[i % 2], &opts);
                s.spawn(move || run(model, prompt, opts).map(|r| r.ids))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a thread panicked".into())))
            .collect()
    });
    for (i, got) in together.into_iter().enumerate() {
        let got = got?;
        ensure(got == alone[i % 2], || {
            format!("thread {i}: got {got:?}, alone {:?}", alone[i % 2])
        })?;
    }
    Ok(())
}

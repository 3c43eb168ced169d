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
    ("chat_streams_a_reply", chat_streams_a_reply),
    (
        "chat_sessions_remember_their_turns",
        chat_sessions_remember_their_turns,
    ),
    ("batch_rows_equal_single_runs", batch_rows_equal_single_runs),
    (
        "classify_gives_the_next_token",
        classify_gives_the_next_token,
    ),
    (
        "async_stream_equals_the_iterator",
        async_stream_equals_the_iterator,
    ),
    ("a_seed_repeats_its_tokens", a_seed_repeats_its_tokens),
    (
        "logprobs_are_log_probabilities",
        logprobs_are_log_probabilities,
    ),
    (
        "tokenizer_counts_what_generate_runs",
        tokenizer_counts_what_generate_runs,
    ),
];

/// `Ok(None)` for a capability the model refuses with
/// [`Error::Unsupported`] (optional capabilities may be absent); the value
/// otherwise; any other error fails the check.
fn optional<T>(what: &str, r: crate::error::Result<T>) -> Result<Option<T>, String> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(Error::Unsupported { .. }) => Ok(None),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Drains `stream`, failing on an error item; the ids and the reason.
fn drain(
    what: &str,
    mut stream: crate::stream::TokenStream,
) -> Result<(Vec<TokenId>, Option<FinishReason>), String> {
    let mut ids = Vec::new();
    for item in stream.by_ref() {
        ids.push(
            item.map_err(|e| format!("{what}: the stream yielded an error: {e}"))?
                .id,
        );
    }
    Ok((ids, stream.finish_reason()))
}

/// `chat` with one user message streams a reply that ends with a reason,
/// within `max_tokens`.
pub fn chat_streams_a_reply(model: &dyn TextModel, cfg: &ConformanceConfig) -> Result<(), String> {
    let opts = GenerateOptions::new().max_tokens(cfg.max_tokens);
    let Some(stream) = optional(
        "chat",
        model.chat(&[Message::user(cfg.prompt.clone())], &opts),
    )?
    else {
        return Ok(());
    };
    let (ids, reason) = drain("chat", stream)?;
    ensure(ids.len() <= cfg.max_tokens, || {
        format!("{} tokens", ids.len())
    })?;
    ensure(
        matches!(reason, Some(FinishReason::Stop | FinishReason::Length)),
        || format!("chat ended with {reason:?}"),
    )
}

/// A chat session keeps each finished turn (the user message and the reply)
/// and a reset keeps only the system message.
pub fn chat_sessions_remember_their_turns(
    model: &dyn TextModel,
    cfg: &ConformanceConfig,
) -> Result<(), String> {
    let Some(mut session) = optional("chat_session", model.chat_session())? else {
        return Ok(());
    };
    let opts = GenerateOptions::new().max_tokens(cfg.max_tokens.min(4));
    for (turn, text) in [&cfg.prompt, &cfg.other_prompt].into_iter().enumerate() {
        let stream = session
            .send(text, &opts)
            .map_err(|e| format!("send: {e}"))?;
        drain("session turn", stream)?;
        let history = session.history();
        ensure(history.len() == 2 * (turn + 1), || {
            format!("after turn {}: {} messages", turn + 1, history.len())
        })?;
        ensure(history[2 * turn] == Message::user(text.clone()), || {
            format!(
                "turn {}: the user message is {:?}",
                turn + 1,
                history[2 * turn]
            )
        })?;
    }
    session.reset(Some("be brief"));
    ensure(session.history() == [Message::system("be brief")], || {
        format!("after a reset: {:?}", session.history())
    })
}

/// Each row of `batch_generate` holds what `generate` gives its prompt alone
/// (greedy).
pub fn batch_rows_equal_single_runs(
    model: &dyn TextModel,
    cfg: &ConformanceConfig,
) -> Result<(), String> {
    let opts = fixed_length(cfg.max_tokens);
    let prompts = [cfg.prompt.clone(), cfg.other_prompt.clone()];
    let Some(rows) = optional("batch_generate", model.batch_generate(&prompts, &opts))? else {
        return Ok(());
    };
    ensure(rows.len() == prompts.len(), || {
        format!("{} rows for 2 prompts", rows.len())
    })?;
    for (p, row) in prompts.iter().zip(&rows) {
        let alone = run(model, p, &opts)?.ids;
        let got: Vec<TokenId> = row.tokens.iter().map(|t| t.id).collect();
        ensure(row.error.is_none(), || {
            format!("row error: {:?}", row.error)
        })?;
        ensure(got == alone, || format!("row {got:?}, alone {alone:?}"))?;
    }
    Ok(())
}

/// `classify` gives one token per prompt: the first token greedy
/// generation gives.
pub fn classify_gives_the_next_token(
    model: &dyn TextModel,
    cfg: &ConformanceConfig,
) -> Result<(), String> {
    let prompts = [cfg.prompt.clone(), cfg.other_prompt.clone()];
    let Some(out) = optional(
        "classify",
        model.classify(&prompts, &GenerateOptions::new().max_tokens(1)),
    )?
    else {
        return Ok(());
    };
    ensure(out.len() == prompts.len(), || {
        format!("{} results for 2 prompts", out.len())
    })?;
    for (p, r) in prompts.iter().zip(&out) {
        let first = run(model, p, &fixed_length(1))?.ids;
        ensure(first == [r.token.id], || {
            format!("classify gave {}, generate {first:?}", r.token.id)
        })?;
    }
    Ok(())
}

/// The async stream yields what the blocking iterator yields.
pub fn async_stream_equals_the_iterator(
    model: &dyn TextModel,
    cfg: &ConformanceConfig,
) -> Result<(), String> {
    use futures::StreamExt;
    let opts = fixed_length(cfg.max_tokens);
    let blocking = run(model, &cfg.prompt, &opts)?.ids;
    let stream = model
        .generate(&cfg.prompt, &opts)
        .map_err(|e| e.to_string())?;
    let items: Vec<crate::error::Result<crate::types::Token>> =
        futures::executor::block_on(StreamExt::collect(stream));
    let ids = items
        .into_iter()
        .map(|t| t.map(|t| t.id).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    ensure(ids == blocking, || {
        format!("async {ids:?}, blocking {blocking:?}")
    })
}

/// Sampling with a seed repeats its tokens (where the model samples).
pub fn a_seed_repeats_its_tokens(
    model: &dyn TextModel,
    cfg: &ConformanceConfig,
) -> Result<(), String> {
    let opts = fixed_length(cfg.max_tokens).temperature(0.9).seed(1234);
    let Some(first) = optional("seeded sampling", model.generate(&cfg.prompt, &opts))? else {
        return Ok(());
    };
    let (a, _) = drain("seeded sampling", first)?;
    let b = run(model, &cfg.prompt, &opts)?.ids;
    ensure(a == b, || format!("seed 1234 gave {a:?}, then {b:?}"))
}

/// With `logprobs`, every token carries a log-probability (finite, at most
/// 0) and its alternatives, most likely first; under greedy decoding the
/// token is the most likely one (but for a tie) and its log-probability is
/// the first alternative's.
pub fn logprobs_are_log_probabilities(
    model: &dyn TextModel,
    cfg: &ConformanceConfig,
) -> Result<(), String> {
    let opts = fixed_length(cfg.max_tokens).logprobs(3);
    let Some(mut stream) = optional("logprobs", model.generate(&cfg.prompt, &opts))? else {
        return Ok(());
    };
    let tokens = stream.collect_tokens().map_err(|e| e.to_string())?;
    for t in &tokens {
        let lp = t
            .logprobs
            .as_ref()
            .ok_or_else(|| format!("token {} has no logprobs", t.id))?;
        ensure(lp.logprob.is_finite() && lp.logprob <= 0.0, || {
            format!("token {}: logprob {}", t.id, lp.logprob)
        })?;
        ensure(lp.top.len() == 3, || {
            format!("{} alternatives", lp.top.len())
        })?;
        ensure(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), || {
            format!("alternatives out of order: {:?}", lp.top)
        })?;
        ensure((lp.top[0].1 - lp.logprob).abs() < 1e-4, || {
            format!(
                "greedy token {} ({}) is not the most likely ({:?})",
                t.id, lp.logprob, lp.top
            )
        })?;
    }
    Ok(())
}

/// The tokenizer counts the prompt ids `generate` announces.
pub fn tokenizer_counts_what_generate_runs(
    model: &dyn TextModel,
    cfg: &ConformanceConfig,
) -> Result<(), String> {
    let Some(tok) = optional("tokenizer", model.tokenizer())? else {
        return Ok(());
    };
    let n = tok.count_tokens(&cfg.prompt).map_err(|e| e.to_string())?;
    let ids = tok.encode(&cfg.prompt, true).map_err(|e| e.to_string())?;
    ensure(ids.len() == n, || {
        format!("count {n}, encode {}", ids.len())
    })?;
    let mut stream = model
        .generate(&cfg.prompt, &fixed_length(1))
        .map_err(|e| e.to_string())?;
    stream.collect_tokens().map_err(|e| e.to_string())?;
    match stream.prompt_ids() {
        Some(announced) => ensure(announced == ids.as_slice(), || {
            format!("generate ran {announced:?}, the tokenizer encodes {ids:?}")
        }),
        None => Ok(()),
    }
}

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
    // A backend may support `return_logits` on generate; then the call
    // must run to its end.
    match model.generate(&cfg.prompt, &GenerateOptions::new().return_logits(true)) {
        Err(Error::Unsupported { .. }) => {}
        Err(other) => {
            return Err(format!(
                "return_logits on generate: expected Unsupported or a stream, got {other}"
            ))
        }
        Ok(stream) => {
            drain("return_logits on generate", stream)?;
        }
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

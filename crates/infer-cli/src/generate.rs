//! `infer generate`: one prompt (or conversation) in, one answer out.

use std::fs;
use std::io::{self, IsTerminal, Read};
use std::path::PathBuf;

use clap::Args;
use inference_core::{
    FinishReason, GenerateMetrics, GenerateOptions, Message, TextModel, TokenId, TokenLogprobs,
    TokenStream,
};
use serde::Serialize;

use crate::args::{Format, GenerationArgs, ModelArgs};
use crate::error::CliError;
use crate::interrupt::Interrupt;
use crate::load;
use crate::output::{json_out, stats_line, stream_out};

/// Flags of `infer generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,

    #[command(flatten)]
    generation: GenerationArgs,

    /// Render the prompt with the model's chat template (a built-in one when
    /// the model ships none). Default: chat when the model ships a template,
    /// raw otherwise.
    #[arg(long, conflicts_with_all = ["raw", "messages"])]
    chat: bool,

    /// Encode the prompt as is, with the tokenizer's own special-token rules.
    #[arg(long, conflicts_with_all = ["messages", "system", "template_args"])]
    raw: bool,

    /// Answer the conversation in FILE: a JSON array of {"role", "content"}
    /// objects (roles system, user, assistant); implies chat mode.
    #[arg(long, value_name = "FILE.json", conflicts_with_all = ["prompt", "system"])]
    messages: Option<PathBuf>,

    /// A system message before the prompt (chat mode).
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,

    /// text: stream the answer; json: print one JSON object at the end.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,

    /// The prompt. Without it (and without --messages) the prompt is read
    /// from stdin, less one trailing line break.
    prompt: Option<String>,
}

/// What to answer.
#[derive(Debug, Clone, PartialEq)]
enum Input {
    /// A prompt from the command line or stdin.
    Prompt(String),
    /// A conversation from `--messages`.
    Messages(Vec<Message>),
}

/// How the prompt reaches the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Through the chat template ([`TextModel::chat`]).
    Chat,
    /// As is ([`TextModel::generate`]).
    Raw,
}

/// The `--format json` document.
#[derive(Debug, Serialize)]
struct Report<'a> {
    model_type: &'a str,
    backend: &'a str,
    device: &'a str,
    /// `null` when the backend does not announce its prompt ids.
    prompt_ids: Option<&'a [TokenId]>,
    /// Each prompt id's log-probability after the ones before it, with
    /// `--prompt-logprobs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_logprobs: Option<&'a [f32]>,
    ids: &'a [TokenId],
    /// Each token's log-probability and alternatives, with `--logprobs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<&'a [TokenLogprobs]>,
    text: &'a str,
    finish_reason: FinishReason,
    metrics: Option<&'a GenerateMetrics>,
    /// The error that ended the generation (`finish_reason` is then
    /// `error`); absent when it ended well.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Runs `infer generate`.
pub fn run(args: &GenerateArgs, quiet: bool) -> Result<(), CliError> {
    let opts = args.generation.options()?;
    let load_opts = args.model.load_options()?;
    // A rank other than 0 of a tensor-parallel run follows rank 0, which
    // reads the prompt (the others' stdin is not the user's).
    let follower = std::env::var("MLX_RANK").is_ok_and(|r| r.trim() != "0");
    let input = if follower {
        Input::Prompt(String::new())
    } else {
        read_input(args)?
    };
    let interrupt = Interrupt::install()?;
    let loaded = load::load(&args.model, load_opts, quiet)?;
    let model = &*loaded.model;
    if model.info().rank > 0 {
        // Tensor parallel: rank 0 generates, this rank runs its calls
        // alongside it (and leaves Ctrl-C to rank 0, which ends the call on
        // every rank).
        interrupt.ignore();
        return Ok(model.follow()?);
    }
    let mode = choose_mode(args, &input, model.info().chat_template)?;
    tracing::info!(?mode, "generating");
    let mut stream = start(model, mode, input, args.system.as_deref(), &opts)?;

    let watch = interrupt.watch(stream.cancel_handle());
    let Some(Collected {
        ids,
        logprobs,
        text,
        failure,
    }) = collect(&mut stream, args.format)?
    else {
        // Nobody reads stdout any more: stop quietly.
        return Ok(());
    };
    drop(watch);
    let interrupted = interrupt.was_hit();
    if args.format == Format::Text && !text.is_empty() && !text.ends_with('\n') {
        stream_out("\n")?;
    }
    let failure = match failure {
        Some(_) if interrupted => return Err(CliError::Interrupted),
        Some(e) => Some(CliError::from(e)),
        None => None,
    };
    let reason = match stream.finish_reason() {
        _ if failure.is_some() => FinishReason::Error,
        Some(r) => r,
        None if interrupted => FinishReason::Cancelled,
        None => FinishReason::Error,
    };
    if args.format == Format::Json {
        // The document is printed whatever ended the generation, so the
        // tokens already made are never lost.
        json_out(&Report {
            model_type: model.model_type(),
            backend: &loaded.backend,
            device: &loaded.device,
            prompt_ids: stream.prompt_ids(),
            prompt_logprobs: stream.prompt_logprobs(),
            ids: &ids,
            logprobs: opts.logprobs.then_some(&logprobs[..]),
            text: &text,
            finish_reason: reason,
            metrics: stream.metrics(),
            error: failure.as_ref().map(CliError::one_line),
        })?;
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if let (false, Some(m)) = (quiet, stream.metrics()) {
        eprintln!("{}", stats_line(m, Some(reason)));
    }
    if interrupted {
        return Err(CliError::Interrupted);
    }
    Ok(())
}

/// What a generation streamed, and the error that ended it, if one did.
struct Collected {
    ids: Vec<TokenId>,
    logprobs: Vec<TokenLogprobs>,
    text: String,
    failure: Option<inference_core::Error>,
}

/// Reads `stream` to its end, streaming the text to stdout in text mode;
/// `None` when stdout was closed (nobody reads the answer any more).
fn collect(stream: &mut TokenStream, format: Format) -> Result<Option<Collected>, CliError> {
    let mut got = Collected {
        ids: Vec::new(),
        logprobs: Vec::new(),
        text: String::new(),
        failure: None,
    };
    for item in stream.by_ref() {
        match item {
            Ok(token) => {
                got.ids.push(token.id);
                got.logprobs.extend(token.logprobs.clone());
                got.text.push_str(&token.text);
                if format == Format::Text && !stream_out(&token.text)? {
                    return Ok(None);
                }
            }
            Err(e) => {
                got.failure = Some(e);
                break;
            }
        }
    }
    Ok(Some(got))
}

/// The prompt or conversation the flags (or stdin) give.
fn read_input(args: &GenerateArgs) -> Result<Input, CliError> {
    if let Some(path) = &args.messages {
        let what = || format!("cannot read {}", path.display());
        let text = fs::read_to_string(path).map_err(|e| CliError::io(what(), e))?;
        let messages: Vec<Message> = serde_json::from_str(&text).map_err(|e| {
            CliError::Input(format!(
                "{}: expected a JSON array of {{\"role\", \"content\"}} messages: {e}",
                path.display()
            ))
        })?;
        if messages.is_empty() {
            return Err(CliError::Input(format!(
                "{}: the conversation has no messages",
                path.display()
            )));
        }
        return Ok(Input::Messages(messages));
    }
    let prompt = match &args.prompt {
        Some(p) => p.clone(),
        None => {
            let stdin = io::stdin();
            if stdin.is_terminal() {
                return Err(CliError::Usage(
                    "no prompt: give PROMPT, --messages FILE.json, or pipe the prompt on stdin"
                        .into(),
                ));
            }
            let mut s = String::new();
            stdin
                .lock()
                .read_to_string(&mut s)
                .map_err(|e| CliError::io("cannot read the prompt from stdin", e))?;
            strip_one_line_break(s)
        }
    };
    if prompt.trim().is_empty() {
        return Err(CliError::Usage("the prompt is empty".into()));
    }
    Ok(Input::Prompt(prompt))
}

/// `s` less one trailing `\n` or `\r\n`.
fn strip_one_line_break(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    s
}

/// The default-mode rule: `--messages` and `--chat` mean chat, `--raw` raw;
/// otherwise chat when the model ships a chat template, raw when it does not.
fn choose_mode(args: &GenerateArgs, input: &Input, ships_template: bool) -> Result<Mode, CliError> {
    if matches!(input, Input::Messages(_)) || args.chat {
        return Ok(Mode::Chat);
    }
    if args.raw {
        return Ok(Mode::Raw);
    }
    if ships_template {
        return Ok(Mode::Chat);
    }
    if args.system.is_some() || !args.generation.template_args.is_empty() {
        return Err(CliError::Usage(
            "the model ships no chat template, so the prompt runs raw, where --system and \
             --template-arg mean nothing: add --chat to use a built-in template"
                .into(),
        ));
    }
    Ok(Mode::Raw)
}

/// Starts the generation.
fn start(
    model: &dyn TextModel,
    mode: Mode,
    input: Input,
    system: Option<&str>,
    opts: &GenerateOptions,
) -> Result<TokenStream, CliError> {
    let stream = match (mode, input) {
        (_, Input::Messages(messages)) => model.chat(&messages, opts),
        (Mode::Raw, Input::Prompt(prompt)) => model.generate(&prompt, opts),
        (Mode::Chat, Input::Prompt(prompt)) => {
            let mut messages = Vec::with_capacity(2);
            if let Some(s) = system {
                messages.push(Message::system(s));
            }
            messages.push(Message::user(prompt));
            model.chat(&messages, opts)
        }
    };
    Ok(stream?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }

    fn parse(argv: &[&str]) -> GenerateArgs {
        let mut full = vec!["generate"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).unwrap().args
    }

    fn prompt() -> Input {
        Input::Prompt("hi".into())
    }

    #[test]
    fn default_mode_follows_the_template() {
        let a = parse(&["hi"]);
        assert_eq!(choose_mode(&a, &prompt(), true).unwrap(), Mode::Chat);
        assert_eq!(choose_mode(&a, &prompt(), false).unwrap(), Mode::Raw);
    }

    #[test]
    fn flags_force_the_mode() {
        let a = parse(&["--chat", "hi"]);
        assert_eq!(choose_mode(&a, &prompt(), false).unwrap(), Mode::Chat);
        let a = parse(&["--raw", "hi"]);
        assert_eq!(choose_mode(&a, &prompt(), true).unwrap(), Mode::Raw);
        let a = parse(&["--messages", "m.json"]);
        let msgs = Input::Messages(vec![Message::user("hi")]);
        assert_eq!(choose_mode(&a, &msgs, false).unwrap(), Mode::Chat);
    }

    #[test]
    fn chat_only_flags_on_a_raw_default_are_usage_errors() {
        let a = parse(&["--system", "be brief", "hi"]);
        assert_eq!(choose_mode(&a, &prompt(), true).unwrap(), Mode::Chat);
        assert!(matches!(
            choose_mode(&a, &prompt(), false),
            Err(CliError::Usage(_))
        ));
        let a = parse(&["--template-arg", "enable_thinking=false", "hi"]);
        assert!(matches!(
            choose_mode(&a, &prompt(), false),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn conflicting_modes_do_not_parse() {
        for argv in [
            &["generate", "--chat", "--raw", "hi"][..],
            &["generate", "--raw", "--system", "s", "hi"],
            &["generate", "--raw", "--template-arg", "a=1", "hi"],
            &["generate", "--messages", "m.json", "hi"],
            &["generate", "--messages", "m.json", "--chat"],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }

    /// An error after generation started still gives the JSON document,
    /// with the tokens so far and the error.
    #[test]
    fn a_failed_generation_keeps_its_tokens_in_the_report() {
        let (sink, mut stream) = TokenStream::channel();
        sink.prompt(vec![1, 2]).unwrap();
        sink.send(inference_core::Token::new(7, "Hel")).unwrap();
        sink.send(inference_core::Token::new(8, "lo")).unwrap();
        sink.fail(inference_core::Error::backend(
            "mlx",
            "the device went away",
        ));
        let got = collect(&mut stream, Format::Json).unwrap().unwrap();
        assert_eq!(
            (got.ids.as_slice(), got.text.as_str()),
            (&[7, 8][..], "Hello")
        );
        let failure = got.failure.map(CliError::from);
        let report = Report {
            model_type: "qwen3",
            backend: "mlx",
            device: "cpu",
            prompt_ids: stream.prompt_ids(),
            prompt_logprobs: None,
            ids: &got.ids,
            logprobs: None,
            text: &got.text,
            finish_reason: FinishReason::Error,
            metrics: stream.metrics(),
            error: failure.as_ref().map(CliError::one_line),
        };
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!(v["ids"], serde_json::json!([7, 8]));
        assert_eq!(v["finish_reason"], "error");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("the device went away"),
            "{v}"
        );
        // A generation that ended well has no `error` field.
        let fine = Report {
            error: None,
            finish_reason: FinishReason::Stop,
            ..report
        };
        assert!(serde_json::to_value(&fine).unwrap().get("error").is_none());
    }

    #[test]
    fn one_trailing_line_break_is_dropped() {
        assert_eq!(strip_one_line_break("a\n\n".into()), "a\n");
        assert_eq!(strip_one_line_break("a\r\n".into()), "a");
        assert_eq!(strip_one_line_break("a".into()), "a");
    }
}

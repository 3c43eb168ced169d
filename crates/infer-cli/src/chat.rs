//! `infer chat`: an interactive, multi-turn conversation.
//!
//! Each line read from stdin is a user turn; the answer streams to stdout and
//! its statistics go to stderr. `/reset` starts the conversation over (the
//! `--system` message stays), `/quit` or end of input leaves. Ctrl-C stops
//! the answer being generated and returns to the prompt; at the prompt it
//! leaves (exit status 130).
//!
//! The history lives in the backend's chat session
//! ([`TextModel::chat_session`]) where the backend has one, so it can keep its
//! KV cache between turns. Where it answers `Unsupported`, this command keeps
//! the history itself and sends the whole conversation to
//! [`TextModel::chat`] every turn. Either way a turn that fails leaves no
//! trace in the history, and an answer stopped with Ctrl-C stays in it as far
//! as it got. A conversation that outgrows the context drops its oldest turns
//! (the system message stays) and says so on stderr, or, with
//! `--history-overflow error`, fails the turn. The command exits with status
//! 1 when its last turn failed.

use std::io::{self, BufRead, IsTerminal};

use clap::{Args, ValueEnum};
use inference_core::{
    ChatSession, Error, GenerateOptions, HistoryOverflow, Message, TextModel, TokenStream,
};

use crate::args::{GenerationArgs, ModelArgs};
use crate::error::CliError;
use crate::interrupt::Interrupt;
use crate::load;
use crate::output::{stats_line, stream_out};

/// Flags of `infer chat`.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,

    #[command(flatten)]
    generation: GenerationArgs,

    /// A system message that opens the conversation (kept by /reset).
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,

    /// When the conversation outgrows the context: drop its oldest turns
    /// (the system message stays), or fail the turn.
    #[arg(long, value_enum, default_value_t = Overflow::Drop)]
    history_overflow: Overflow,
}

/// `--history-overflow`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
enum Overflow {
    /// Drop the oldest turns.
    #[default]
    Drop,
    /// Fail the turn.
    Error,
}

impl Overflow {
    fn policy(self) -> HistoryOverflow {
        match self {
            Overflow::Drop => HistoryOverflow::DropOldest,
            Overflow::Error => HistoryOverflow::Error,
        }
    }
}

/// The conversation and where its history is kept.
enum Conversation {
    /// The backend's chat session: it keeps the history.
    Session(Box<dyn ChatSession>),
    /// History kept here, sent whole to `chat()` each turn.
    Manual {
        system: Option<String>,
        history: Vec<Message>,
        overflow: HistoryOverflow,
        dropped: usize,
    },
}

impl Conversation {
    /// The backend's session when it has one, the CLI's own history otherwise.
    fn start(
        model: &dyn TextModel,
        system: Option<&str>,
        overflow: HistoryOverflow,
    ) -> Result<Self, CliError> {
        match model.chat_session() {
            Ok(mut session) => {
                tracing::debug!("using the backend's chat session");
                session.reset(system);
                match session.set_history_overflow(overflow) {
                    Ok(()) => {}
                    // The default asks for nothing the session must do.
                    Err(Error::Unsupported { feature })
                        if overflow == HistoryOverflow::default() =>
                    {
                        tracing::debug!(%feature, "the session keeps its own overflow rule");
                    }
                    Err(e) => return Err(e.into()),
                }
                Ok(Conversation::Session(session))
            }
            Err(Error::Unsupported { feature }) => {
                tracing::debug!(%feature, "keeping the chat history in the CLI");
                Ok(Conversation::Manual {
                    system: system.map(str::to_owned),
                    history: Vec::new(),
                    overflow,
                    dropped: 0,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Turns dropped so far to fit the context.
    fn dropped_turns(&self) -> usize {
        match self {
            Conversation::Session(session) => session.dropped_turns(),
            Conversation::Manual { dropped, .. } => *dropped,
        }
    }

    /// Starts the answer to `user`.
    fn send(
        &mut self,
        model: &dyn TextModel,
        user: &str,
        opts: &GenerateOptions,
    ) -> inference_core::Result<TokenStream> {
        match self {
            Conversation::Session(session) => session.send(user, opts),
            Conversation::Manual {
                system,
                history,
                overflow,
                dropped,
            } => loop {
                let mut messages = Vec::with_capacity(history.len() + 2);
                messages.extend(system.as_deref().map(Message::system));
                messages.extend(history.iter().cloned());
                messages.push(Message::user(user));
                match model.chat(&messages, opts) {
                    // The oldest turn (a user message and its reply) goes.
                    Err(Error::ContextOverflow { .. })
                        if *overflow == HistoryOverflow::DropOldest && history.len() >= 2 =>
                    {
                        history.drain(..2);
                        *dropped += 1;
                    }
                    other => return other,
                }
            },
        }
    }

    /// Records a turn that produced `reply` (a session records it itself).
    fn record(&mut self, user: &str, reply: String) {
        if let Conversation::Manual { history, .. } = self {
            history.push(Message::user(user));
            history.push(Message::assistant(reply));
        }
    }

    /// Forgets every turn, keeping the system message.
    fn reset(&mut self) {
        match self {
            Conversation::Session(session) => {
                let system = session
                    .history()
                    .into_iter()
                    .next()
                    .filter(|m| m.role == inference_core::Role::System)
                    .map(|m| m.content);
                session.reset(system.as_deref());
            }
            Conversation::Manual { history, .. } => history.clear(),
        }
    }
}

/// What one line of input asks for.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    /// Nothing (an empty line).
    Empty,
    /// A user turn.
    Turn(&'a str),
    /// `/reset`.
    Reset,
    /// `/quit` or `/exit`.
    Quit,
    /// `/help`.
    Help,
    /// Some other `/command`.
    Unknown(&'a str),
}

fn parse_line(line: &str) -> Line<'_> {
    let line = line.trim_end_matches(['\n', '\r']);
    match line.trim() {
        "" => Line::Empty,
        "/reset" => Line::Reset,
        "/quit" | "/exit" => Line::Quit,
        "/help" | "/?" => Line::Help,
        cmd if cmd.starts_with('/') && !cmd.contains(char::is_whitespace) => Line::Unknown(cmd),
        _ => Line::Turn(line),
    }
}

const HELP: &str = "/reset starts over, /quit (or Ctrl-D) leaves, Ctrl-C stops an answer";

/// Runs `infer chat`.
pub fn run(args: &ChatArgs, quiet: bool) -> Result<(), CliError> {
    let opts = args.generation.options()?;
    let load_opts = args.model.load_options()?;
    let interrupt = Interrupt::install()?;
    let loaded = load::load(&args.model, load_opts, quiet)?;
    let model = &*loaded.model;
    if model.info().rank > 0 {
        // Tensor parallel: rank 0 reads the conversation and answers, this
        // rank runs its calls alongside it (Ctrl-C is rank 0's to handle).
        interrupt.ignore();
        return Ok(model.follow()?);
    }
    let mut conversation = Conversation::start(
        model,
        args.system.as_deref(),
        args.history_overflow.policy(),
    )?;
    // The error of the last turn, when it failed: the exit status says so.
    let mut last_failure: Option<CliError> = None;
    let finish = |failure: Option<CliError>| failure.map_or(Ok(()), Err);
    let stdin = io::stdin();
    let interactive = stdin.is_terminal();
    if interactive && !quiet {
        eprintln!(
            "chatting with {} on {} ({}); {HELP}",
            model.model_type(),
            loaded.backend,
            loaded.device
        );
    }
    let mut line = String::new();
    loop {
        if interactive && !stream_out("> ")? {
            return Ok(());
        }
        line.clear();
        let read = stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| CliError::io("cannot read from stdin", e))?;
        if read == 0 {
            if interactive {
                stream_out("\n")?;
            }
            return finish(last_failure);
        }
        let user = match parse_line(&line) {
            Line::Empty => continue,
            Line::Quit => return finish(last_failure),
            Line::Reset => {
                conversation.reset();
                if !quiet {
                    eprintln!("(the conversation starts over)");
                }
                continue;
            }
            Line::Help => {
                eprintln!("{HELP}");
                continue;
            }
            Line::Unknown(cmd) => {
                eprintln!("unknown command {cmd}: {HELP}");
                continue;
            }
            Line::Turn(user) => user,
        };
        let dropped_before = conversation.dropped_turns();
        let sent = conversation.send(model, user, &opts);
        let dropped = conversation.dropped_turns() - dropped_before;
        if dropped > 0 {
            eprintln!(
                "(the conversation outgrew the context: dropped its oldest {})",
                if dropped == 1 {
                    "turn".to_owned()
                } else {
                    format!("{dropped} turns")
                }
            );
        }
        let mut stream = match sent {
            Ok(s) => s,
            // The model cannot chat at all: no later turn would do better.
            Err(e @ Error::Unsupported { .. }) => return Err(e.into()),
            Err(e) => {
                let e = CliError::from(e);
                eprintln!("error: {}", e.one_line());
                last_failure = Some(e);
                continue;
            }
        };
        let watch = interrupt.watch(stream.cancel_handle());
        let mut reply = String::new();
        let mut failure = None;
        for item in stream.by_ref() {
            match item {
                Ok(token) => {
                    reply.push_str(&token.text);
                    if !stream_out(&token.text)? {
                        return Ok(());
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(watch);
        if !reply.ends_with('\n') && !stream_out("\n")? {
            return Ok(());
        }
        let stopped = interrupt.was_hit();
        match failure {
            Some(_) if stopped => eprintln!("(stopped)"),
            Some(e) => {
                let e = CliError::from(e);
                eprintln!("error: {}", e.one_line());
                last_failure = Some(e);
                continue;
            }
            None if stopped => eprintln!("(stopped)"),
            None => {}
        }
        last_failure = None;
        if let (false, Some(m)) = (quiet, stream.metrics()) {
            eprintln!("{}", stats_line(m, stream.finish_reason()));
        }
        conversation.record(user, reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backend_stub::ScriptedModel;

    #[test]
    fn lines_are_turns_or_commands() {
        assert_eq!(parse_line("hello\n"), Line::Turn("hello"));
        assert_eq!(parse_line("  spaced  \r\n"), Line::Turn("  spaced  "));
        assert_eq!(parse_line("\n"), Line::Empty);
        assert_eq!(parse_line(" /reset \n"), Line::Reset);
        assert_eq!(parse_line("/quit"), Line::Quit);
        assert_eq!(parse_line("/exit\n"), Line::Quit);
        assert_eq!(parse_line("/help\n"), Line::Help);
        assert_eq!(parse_line("/nope\n"), Line::Unknown("/nope"));
        // A path-like question is a turn, not a command.
        assert_eq!(
            parse_line("/usr/bin is what?\n"),
            Line::Turn("/usr/bin is what?")
        );
    }

    #[test]
    fn manual_history_grows_and_resets_keeping_the_system_message() {
        // The scripted model has no chat sessions: the CLI keeps the history,
        // and each turn's prompt holds the whole conversation.
        let model = ScriptedModel::from_words(&["ok"]).unwrap();
        let mut conv =
            Conversation::start(&model, Some("be brief"), HistoryOverflow::DropOldest).unwrap();
        assert!(matches!(conv, Conversation::Manual { .. }));
        let opts = GenerateOptions::new();
        let mut prompt_words = Vec::new();
        for turn in ["one two", "three", "four"] {
            if turn == "four" {
                conv.reset();
            }
            let mut stream = conv.send(&model, turn, &opts).unwrap();
            let reply = stream.collect_text().unwrap();
            assert_eq!(reply, "ok");
            prompt_words.push(stream.metrics().unwrap().prompt_tokens);
            conv.record(turn, reply);
        }
        // "system: be brief" (3 words) + "user: one two" (3) = 6; then those
        // 6, the answer ("assistant: ok", 2) and "user: three" (2) = 10;
        // after a reset, "system: be brief" + "user: four" = 5.
        assert_eq!(prompt_words, vec![6, 10, 5]);
    }
}

//! `infer`: the command line of inference-rs.
//!
//! - `infer generate [PROMPT]`: streams an answer to stdout, statistics to
//!   stderr; `--format json` prints one JSON object instead.
//! - `infer chat`: an interactive conversation.
//! - `infer backends`: the registered backends, available or not.
//! - `infer models DIR`: the models in a directory.
//! - `infer train --data DIR`: LoRA fine-tuning, as `mlx_lm.lora`.
//! - `infer fuse --adapter DIR --out DIR`: an adapter merged into its base
//!   model, as `mlx_lm.fuse`.
//! - `infer serve`: an OpenAI-compatible HTTP server with a chat page.
//! - `infer launch -n N -- generate …`: a tensor-parallel run over MLX
//!   distributed, its ranks started here or over ssh.
//!
//! Exit status: 0 success, 1 runtime error, 2 usage error, 130 interrupted.
//! Errors are one line on stderr. See `docs/cli.md`.

use std::io::IsTerminal;
use std::process::ExitCode;

// Registration happens at link time: name every backend this binary offers.
use backend_llamacpp as _;
use backend_metal as _;
use backend_stub as _;

use clap::{ArgAction, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

mod args;
mod backends;
mod chat;
mod defaults;
mod error;
mod fuse;
mod generate;
mod interrupt;
mod launch;
mod load;
mod models;
mod output;
mod plot;
mod serve;
mod train;

use error::{CliError, EXIT_RUNTIME, EXIT_USAGE};

/// Run LLMs from the command line.
#[derive(Debug, Parser)]
#[command(name = "infer", version, propagate_version = true)]
struct Cli {
    /// No progress bars or statistics on stderr (errors are still shown).
    #[arg(long, short = 'q', global = true)]
    quiet: bool,

    /// More log output on stderr: -v info, -vv debug, -vvv trace. Without
    /// it, RUST_LOG applies when set.
    #[arg(long, short = 'v', global = true, action = ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate an answer to one prompt (or conversation), streamed to stdout.
    Generate(generate::GenerateArgs),
    /// Chat interactively: /reset starts over, /quit leaves, Ctrl-C stops an answer.
    Chat(chat::ChatArgs),
    /// List every registered backend, available or not, and its device.
    Backends(backends::BackendsArgs),
    /// List the models in a directory (itself and one level below).
    Models(models::ModelsArgs),
    /// Fine-tune LoRA adapters on a data directory (as mlx_lm.lora).
    Train(train::TrainArgs),
    /// Merge a LoRA adapter into its base model and write the model (as mlx_lm.fuse).
    Fuse(fuse::FuseArgs),
    /// Serve the model over an OpenAI-compatible HTTP API, with a chat page.
    Serve(serve::ServeArgs),
    /// Run a command tensor-parallel: start its ranks here or over ssh (as mlx.launch).
    Launch(launch::LaunchArgs),
}

fn main() -> ExitCode {
    install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_exit(&e),
    };
    init_logging(cli.verbose, cli.quiet);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&cli)));
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(CliError::Interrupted)) => {
            eprintln!("interrupted");
            ExitCode::from(CliError::Interrupted.exit_code())
        }
        Ok(Err(e)) => {
            eprintln!("error: {}", e.one_line());
            ExitCode::from(e.exit_code())
        }
        // The panic hook has printed the one line.
        Err(_) => ExitCode::from(EXIT_RUNTIME),
    }
}

fn run(cli: &Cli) -> Result<(), CliError> {
    match &cli.command {
        Command::Generate(args) => generate::run(args, cli.quiet),
        Command::Chat(args) => chat::run(args, cli.quiet),
        Command::Backends(args) => backends::run(args),
        Command::Models(args) => models::run(args, cli.quiet),
        Command::Train(args) => train::run(args, cli.quiet),
        Command::Fuse(args) => fuse::run(args, cli.quiet),
        Command::Serve(args) => serve::run(args, cli.quiet),
        Command::Launch(args) => launch::run(args),
    }
}

/// Help and version go to stdout with status 0; usage errors are one line on
/// stderr with status 2.
fn usage_exit(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // Printing can only fail on a closed stdout; nothing to add then.
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(EXIT_USAGE)
        }
        _ => {
            let text = e.to_string();
            let first = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("bad command line");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("error: {first} (see `infer --help`)");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// Logs go to stderr through `tracing-subscriber`: warnings and errors by
/// default, more with `-v`, only errors with `--quiet`; `RUST_LOG` applies
/// when set and `-v` is not given.
fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (_, 1) => "info",
        (_, 2) => "debug",
        (_, 3..) => "trace",
        (true, 0) => "error",
        (false, 0) => "warn",
    };
    let filter = match EnvFilter::try_from_default_env() {
        Ok(from_env) if verbose == 0 => from_env,
        _ => EnvFilter::new(level),
    };
    let stderr = std::io::stderr();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(stderr.is_terminal())
        .with_target(false)
        .try_init();
}

/// A panic is a bug: one line on stderr, no trace (`RUST_BACKTRACE=1` still
/// adds the location's backtrace for a bug report).
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: internal error{location}: {}; please report it",
            error::fold_lines(&message)
        );
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            eprintln!("{}", std::backtrace::Backtrace::force_capture());
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}

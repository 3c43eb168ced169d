//! The CLI's errors and their exit codes.

use std::io;
use std::path::PathBuf;

use crate::defaults::{DEFAULT_MODEL_FILE, FETCH_COMMAND};

/// Exit status of a runtime error: a missing or bad model, an unavailable
/// backend, a failed generation.
pub const EXIT_RUNTIME: u8 = 1;
/// Exit status of a usage error: bad flags or option values.
pub const EXIT_USAGE: u8 = 2;
/// Exit status after Ctrl-C (128 + SIGINT).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Everything that ends a command without success.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad flags, or flags that do not go together.
    #[error("{0}")]
    Usage(String),

    /// An error of the inference library.
    #[error(transparent)]
    Inference(#[from] inference_core::Error),

    /// No `--model`, no `$INFER_MODEL`, and the default model is not on disk.
    #[error(
        "no model given and the default model {DEFAULT_MODEL_FILE} is not in .cache/models \
         (of the current directory's workspace or the binary's): pass --model PATH, set \
         INFER_MODEL, or fetch it with `{FETCH_COMMAND}`"
    )]
    NoDefaultModel,

    /// The model path does not exist.
    #[error("model not found: {} (from {origin}) does not exist", path.display())]
    ModelNotFound {
        /// The path.
        path: PathBuf,
        /// Where it came from: `--model`, `$INFER_MODEL` or the default.
        origin: &'static str,
    },

    /// Reading or writing a file or stream failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, e.g. `cannot read messages.json`.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Input that is not what it should be (e.g. a malformed messages file).
    #[error("{0}")]
    Input(String),

    /// Ctrl-C.
    #[error("interrupted")]
    Interrupted,

    /// A rank of `infer launch` failed (the others were stopped).
    #[error("rank {rank} failed ({status}); the other ranks were stopped")]
    RankFailed {
        /// The rank that failed first.
        rank: usize,
        /// How it ended.
        status: String,
        /// Its exit status (this process's).
        code: u8,
    },
}

impl CliError {
    /// An [`CliError::Io`] saying what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        use inference_core::Error as E;
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Interrupted => EXIT_INTERRUPTED,
            CliError::Inference(e) => match e {
                E::InvalidOption { .. } | E::BackendNotRegistered { .. } => EXIT_USAGE,
                E::Cancelled => EXIT_INTERRUPTED,
                _ => EXIT_RUNTIME,
            },
            CliError::RankFailed { code, .. } => *code,
            CliError::NoDefaultModel
            | CliError::ModelNotFound { .. }
            | CliError::Io { .. }
            | CliError::Input(_) => EXIT_RUNTIME,
        }
    }

    /// The error as one line for stderr (without the `error: ` prefix):
    /// option fields named by their flags, the library's `inference: `
    /// prefix dropped, line breaks folded.
    pub fn one_line(&self) -> String {
        let text = match self {
            CliError::Inference(inference_core::Error::InvalidOption { field, reason }) => {
                format!("invalid value for {}: {reason}", flag_of(field))
            }
            CliError::Inference(e) => {
                let s = e.to_string();
                s.strip_prefix("inference: ")
                    .map(str::to_owned)
                    .unwrap_or(s)
            }
            other => other.to_string(),
        };
        fold_lines(&text)
    }
}

/// `text` with its lines joined by single spaces.
pub fn fold_lines(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The command-line flag of an option field that
/// [`inference_core::GenerateOptions::validate`] or
/// [`inference_core::LoadOptions::validate`] names.
pub fn flag_of(field: &str) -> String {
    match field {
        "stop_strings" => "--stop".to_owned(),
        "template_args" => "--template-arg".to_owned(),
        "backend" => "--backend".to_owned(),
        "logprobs" | "top_logprobs" => "--logprobs".to_owned(),
        other => format!("--{}", other.replace('_', "-")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inference_core::Error;

    #[test]
    fn exit_codes_follow_the_kind_of_error() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), EXIT_USAGE);
        assert_eq!(
            CliError::from(Error::invalid_option("top_p", "bad")).exit_code(),
            EXIT_USAGE
        );
        assert_eq!(
            CliError::from(Error::BackendNotRegistered {
                name: "x".into(),
                registered: "mlx".into()
            })
            .exit_code(),
            EXIT_USAGE
        );
        assert_eq!(
            CliError::from(Error::BackendUnavailable {
                name: "metal".into(),
                reason: "no GPU".into()
            })
            .exit_code(),
            EXIT_RUNTIME
        );
        assert_eq!(
            CliError::from(Error::model_load("/m", "broken")).exit_code(),
            EXIT_RUNTIME
        );
        assert_eq!(CliError::NoDefaultModel.exit_code(), EXIT_RUNTIME);
        assert_eq!(CliError::Interrupted.exit_code(), EXIT_INTERRUPTED);
        assert_eq!(
            CliError::from(Error::Cancelled).exit_code(),
            EXIT_INTERRUPTED
        );
    }

    #[test]
    fn messages_are_one_line_and_name_flags() {
        let e = CliError::from(Error::invalid_option("top_p", "must be in [0, 1], got 2"));
        assert_eq!(
            e.one_line(),
            "invalid value for --top-p: must be in [0, 1], got 2"
        );
        let e = CliError::from(Error::model_load("/m", "line one\nline two"));
        let line = e.one_line();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("cannot load model"), "{line}");
        assert!(CliError::NoDefaultModel.one_line().contains(FETCH_COMMAND));
    }

    #[test]
    fn option_fields_map_to_their_flags() {
        assert_eq!(flag_of("top_p"), "--top-p");
        assert_eq!(flag_of("max_tokens"), "--max-tokens");
        assert_eq!(flag_of("stop_strings"), "--stop");
        assert_eq!(flag_of("context_len"), "--context-len");
    }
}

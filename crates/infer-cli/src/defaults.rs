//! The default model and where it comes from.

/// The file name of the default model under `.cache/models`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The command that fetches the default model.
pub const FETCH_COMMAND: &str = "cargo xtask fetch-models";

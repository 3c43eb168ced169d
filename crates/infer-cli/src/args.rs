//! Flags shared by the subcommands that load a model: which model, where,
//! and how to generate.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use inference_core::{GenerateOptions, LoadOptions};

use crate::error::CliError;

/// How a subcommand writes its result on stdout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Text for people.
    #[default]
    Text,
    /// One JSON document.
    Json,
}

/// Which model to load, with which backend, and how.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// The model: a Hugging Face directory (config.json, tokenizer,
    /// *.safetensors) or a .gguf file. Default: $INFER_MODEL, else
    /// .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf of the enclosing
    /// workspace (of the current directory, then of the binary).
    #[arg(long, short = 'm', value_name = "PATH")]
    pub model: Option<PathBuf>,

    /// The backend to load with (see `infer backends`); default: the
    /// available backend of highest priority.
    #[arg(long, short = 'b', value_name = "NAME")]
    pub backend: Option<String>,

    /// Layers on the GPU: -1 the backend's default device, 0 the CPU.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub gpu_layers: Option<i32>,

    /// Bound the KV cache to N positions per layer: the first --sink-tokens
    /// positions and the most recent ones stay, older ones are dropped, and
    /// generation goes on past N (a rotating cache, as mlx-lm's
    /// --max-kv-size). Default: every position, up to the model's
    /// max_position_embeddings (which N may not exceed).
    #[arg(long, value_name = "N")]
    pub context_len: Option<usize>,

    /// With --context-len: leading positions the rotating cache never drops
    /// (attention sinks, as mlx-lm keeps) [default: 4].
    #[arg(long, value_name = "N")]
    pub sink_tokens: Option<usize>,

    /// Let positions pass the model's max_position_embeddings (RoPE then
    /// extrapolates; quality usually falls). Without it generation ends
    /// there with finish reason `length`.
    #[arg(long)]
    pub allow_past_max_positions: bool,

    /// The dtype to compute in: f32, f16 or bf16 (a bf16 checkpoint runs in
    /// f32, the fast path on MLX's CPU); default: the checkpoint's.
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,

    /// CPU threads for the forward passes (llama.cpp) [default: every core].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// The KV cache's element type (llama.cpp): f32, f16, bf16, q8_0, q5_1,
    /// q5_0, q4_1 or q4_0 [default: f16].
    #[arg(long, value_name = "TYPE")]
    pub kv_cache_type: Option<String>,

    /// Fused (flash) attention (llama.cpp) [default: the backend decides].
    #[arg(long, value_name = "ON|OFF", value_parser = parse_switch)]
    pub flash_attention: Option<bool>,

    /// Read the weights file into memory instead of mapping it (llama.cpp).
    #[arg(long)]
    pub no_mmap: bool,

    /// A LoRA adapter to apply: a directory as mlx-lm and `infer train`
    /// write it (adapters.safetensors and adapter_config.json).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,

    /// Run tensor-parallel with the other ranks of an MLX distributed group
    /// over BACKEND: any, ring, mpi, nccl or jaccl (mlx backend; `infer
    /// launch` starts the ranks). Default: $INFER_TENSOR_PARALLEL, else any
    /// when MLX_RANK is set (ranks started by hand), else one process.
    #[arg(long, value_name = "BACKEND")]
    pub tensor_parallel: Option<String>,
}

/// `on`/`off` (also `true`/`false`, `yes`/`no`, `1`/`0`).
fn parse_switch(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

impl ModelArgs {
    /// The load options these flags ask for (without the backend, which
    /// [`crate::load::load`] picks), validated: a bad value is a usage error.
    pub fn load_options(&self) -> Result<LoadOptions, CliError> {
        let mut opts = LoadOptions::new();
        if let Some(n) = self.gpu_layers {
            opts = opts.gpu_layers(n);
        }
        if let Some(n) = self.context_len {
            opts = opts.context_len(n);
        }
        if let Some(n) = self.sink_tokens {
            if self.context_len.is_none() {
                return Err(CliError::Usage(
                    "--sink-tokens needs --context-len (sinks are kept by a rotating cache)".into(),
                ));
            }
            opts = opts.sink_tokens(n);
        }
        opts = opts.allow_past_max_positions(self.allow_past_max_positions);
        if let Some(d) = &self.dtype {
            opts = opts.dtype(d.parse()?);
        }
        if let Some(n) = self.threads {
            opts = opts.threads(n);
        }
        if let Some(t) = &self.kv_cache_type {
            opts = opts.kv_cache_type(t.parse()?);
        }
        if let Some(on) = self.flash_attention {
            opts = opts.flash_attention(on);
        }
        opts = opts.mmap(!self.no_mmap);
        if let Some(dir) = &self.adapter {
            opts = opts.adapter_path(dir);
        }
        // `infer launch` sets INFER_TENSOR_PARALLEL for its ranks; ranks
        // started by hand have MLX_RANK.
        let launched = std::env::var("INFER_TENSOR_PARALLEL").ok();
        let by_hand = std::env::var_os("MLX_RANK").map(|_| "any".to_owned());
        if let Some(b) = self.tensor_parallel.clone().or(launched).or(by_hand) {
            opts = opts.tensor_parallel(b);
        }
        opts.validate()?;
        Ok(opts)
    }
}

/// How to generate: length, sampling, stops and chat-template variables.
#[derive(Debug, Clone, Args)]
pub struct GenerationArgs {
    /// Most tokens to generate [default: 256].
    #[arg(long, short = 'n', value_name = "N")]
    pub max_tokens: Option<usize>,

    /// Sampling temperature; 0 is greedy [default: 0].
    #[arg(long, short = 't', value_name = "T", allow_negative_numbers = true)]
    pub temperature: Option<f32>,

    /// Keep only the K most likely tokens; 0 is off.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,

    /// Nucleus sampling threshold in [0, 1]; 0 and 1 are off.
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub top_p: Option<f32>,

    /// Drop tokens less likely than P × the most likely one; 0 is off.
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub min_p: Option<f32>,

    /// Penalise recently seen tokens (transformers' semantics): above 1
    /// discourages them, between 0 and 1 favours them, 1 is off; must be
    /// more than 0 [default: 1].
    #[arg(long, value_name = "R", allow_negative_numbers = true)]
    pub repeat_penalty: Option<f32>,

    /// How many recent tokens the repeat penalty looks at [default: 64].
    #[arg(long, value_name = "N")]
    pub repeat_last_n: Option<usize>,

    /// OpenAI's presence penalty in [-2, 2], over the tokens generated so far
    /// [default: 0].
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub presence_penalty: Option<f32>,

    /// OpenAI's frequency penalty in [-2, 2], per time a token was generated
    /// so far [default: 0].
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub frequency_penalty: Option<f32>,

    /// Add BIAS (in [-100, 100]) to the logit of token ID before sampling;
    /// repeatable.
    #[arg(long = "logit-bias", value_name = "ID=BIAS", value_parser = parse_logit_bias)]
    pub logit_bias: Vec<(u32, f32)>,

    /// Report each token's log-probability and its N most likely
    /// alternatives (0 to 20) in the JSON report.
    #[arg(long, value_name = "N")]
    pub logprobs: Option<usize>,

    /// Report each prompt token's log-probability after the ones before it
    /// in the JSON report (a second pass over the prompt).
    #[arg(long)]
    pub prompt_logprobs: bool,

    /// Seed of the sampler (the same seed repeats its tokens); default:
    /// from entropy.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,

    /// Stop when the output contains TEXT (not printed); repeatable.
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,

    /// Keep generating past end-of-sequence tokens, up to --max-tokens.
    #[arg(long)]
    pub ignore_eos: bool,

    /// A chat-template variable, e.g. enable_thinking=false; VALUE is read as
    /// JSON when it is JSON, as a string otherwise; repeatable.
    #[arg(long = "template-arg", value_name = "KEY=VALUE", value_parser = parse_template_arg)]
    pub template_args: Vec<(String, serde_json::Value)>,
}

impl GenerationArgs {
    /// The generation options these flags ask for, validated: a bad value is
    /// a usage error.
    pub fn options(&self) -> Result<GenerateOptions, CliError> {
        let mut opts = GenerateOptions::new();
        if let Some(n) = self.max_tokens {
            opts = opts.max_tokens(n);
        }
        if let Some(t) = self.temperature {
            opts = opts.temperature(t);
        }
        if let Some(k) = self.top_k {
            opts = opts.top_k(k);
        }
        if let Some(p) = self.top_p {
            opts = opts.top_p(p);
        }
        if let Some(p) = self.min_p {
            opts = opts.min_p(p);
        }
        if let Some(r) = self.repeat_penalty {
            opts = opts.repeat_penalty(r);
        }
        if let Some(n) = self.repeat_last_n {
            opts = opts.repeat_last_n(n);
        }
        if let Some(p) = self.presence_penalty {
            opts = opts.presence_penalty(p);
        }
        if let Some(f) = self.frequency_penalty {
            opts = opts.frequency_penalty(f);
        }
        for &(id, bias) in &self.logit_bias {
            opts = opts.logit_bias(id, bias);
        }
        if let Some(n) = self.logprobs {
            opts = opts.logprobs(n);
        }
        opts = opts.prompt_logprobs(self.prompt_logprobs);
        if let Some(s) = self.seed {
            opts = opts.seed(s);
        }
        for s in &self.stop {
            opts = opts.stop_string(s.clone());
        }
        opts = opts.ignore_eos(self.ignore_eos);
        for (key, value) in &self.template_args {
            opts = opts.template_arg(key.clone(), value.clone());
        }
        opts.validate()?;
        Ok(opts)
    }
}

/// Parses `ID=BIAS`: a token id and a finite bias.
pub fn parse_logit_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, bias) = s
        .split_once('=')
        .ok_or_else(|| format!("expected ID=BIAS, got {s:?}"))?;
    let id: u32 = id
        .trim()
        .parse()
        .map_err(|_| format!("the token id must be a whole number, got {id:?}"))?;
    let bias: f32 = bias
        .trim()
        .parse()
        .map_err(|_| format!("the bias must be a number, got {bias:?}"))?;
    if !bias.is_finite() {
        return Err(format!("the bias must be finite, got {bias}"));
    }
    Ok((id, bias))
}

/// Parses `KEY=VALUE`: VALUE as JSON when it parses (`true`, `3`, `"x"`,
/// `[1, 2]`), as a plain string otherwise.
pub fn parse_template_arg(s: &str) -> Result<(String, serde_json::Value), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("the key is empty in {s:?}"));
    }
    let value =
        serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
    Ok((key.to_owned(), value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn template_args_are_json_or_strings() {
        assert_eq!(
            parse_template_arg("enable_thinking=false").unwrap(),
            ("enable_thinking".to_owned(), json!(false))
        );
        assert_eq!(
            parse_template_arg("n=3").unwrap(),
            ("n".to_owned(), json!(3))
        );
        assert_eq!(
            parse_template_arg("name=Ada Lovelace").unwrap(),
            ("name".to_owned(), json!("Ada Lovelace"))
        );
        assert_eq!(
            parse_template_arg("eq=a=b").unwrap(),
            ("eq".to_owned(), json!("a=b"))
        );
        assert_eq!(
            parse_template_arg("empty=").unwrap(),
            ("empty".to_owned(), json!(""))
        );
        assert!(parse_template_arg("no-equals").is_err());
        assert!(parse_template_arg("=value").is_err());
    }
}

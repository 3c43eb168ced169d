//! `infer-bench`: what `cargo xtask bench` drives on our side.
//!
//! - `random-model` writes a random-weight model in a real checkpoint's shape;
//! - `convert-gguf` writes a GGUF model out as an mlx-community directory, so
//!   that mlx-lm reads the same weights;
//! - `run` times one scenario on our engine and appends JSON records that
//!   match those of `bench/mlx_lm_bench.py`.

mod run;
mod shapes;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use inference_core as _;

/// Benchmarks of the MLX backend.
#[derive(Parser, Debug)]
#[command(name = "infer-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Writes a random-weight model in the shape of a real checkpoint.
    RandomModel {
        /// The shape: qwen3-0.6b, qwen3-1.7b, qwen3-4b or gemma3-1b.
        #[arg(long)]
        shape: String,
        /// float32, bfloat16 or float16.
        #[arg(long, default_value = "bfloat16")]
        dtype: String,
        /// Fewer layers than the real model (for quick checks).
        #[arg(long)]
        layers: Option<i32>,
        /// A directory with the family's tokenizer.json (and
        /// tokenizer_config.json).
        #[arg(long)]
        tokenizer: PathBuf,
        /// Seed of the weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The directory to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes a GGUF model as an mlx-community style MLX directory.
    ConvertGguf {
        /// The GGUF file.
        #[arg(long)]
        gguf: PathBuf,
        /// The directory to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Times one scenario and appends JSON records.
    Run {
        /// The model directory.
        #[arg(long)]
        model: PathBuf,
        /// single, batch or chat.
        #[arg(long, required_unless_present = "plan", conflicts_with = "plan")]
        scenario: Option<String>,
        /// A JSON list of steps (`{scenario, its parameters, runs?,
        /// warmup?}`) run on one loaded model, instead of `--scenario`.
        #[arg(long)]
        plan: Option<PathBuf>,
        /// Prompt tokens (single, batch).
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        /// Tokens generated (single, batch).
        #[arg(long, default_value_t = 128)]
        decode: usize,
        /// Rows (batch).
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// First-turn prompt tokens (chat).
        #[arg(long, default_value_t = 1024)]
        history: usize,
        /// First-turn reply tokens (chat).
        #[arg(long, default_value_t = 64)]
        reply: usize,
        /// Second-turn new tokens (chat).
        #[arg(long, default_value_t = 32)]
        new: usize,
        /// Measured runs.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Unrecorded runs before them.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// The JSON-lines file to append to.
        #[arg(long)]
        out: PathBuf,
        /// The model's name in the records (its directory name by default).
        #[arg(long)]
        label: Option<String>,
        /// Prompt tokens per prefill pass.
        #[arg(long)]
        prefill_chunk: Option<usize>,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::RandomModel {
            shape,
            dtype,
            layers,
            tokenizer,
            seed,
            out,
        } => {
            let s = shapes::shape(&shape)?;
            let bytes = shapes::write_model(&s, layers, &dtype, &tokenizer, seed, &out)?;
            eprintln!(
                "wrote {} ({:.2} GB of {dtype} weights)",
                out.display(),
                bytes as f64 / 1e9
            );
        }
        Command::ConvertGguf { gguf, out } => {
            let e = backend_metal::gguf::export_mlx_dir(&gguf, &out)?;
            eprintln!(
                "wrote {} ({}, {} tensors, quantised matrices by bits: {:?})",
                out.display(),
                e.model_type,
                e.tensors,
                e.quantized
            );
        }
        Command::Run {
            model,
            scenario,
            plan,
            prompt,
            decode,
            batch,
            history,
            reply,
            new,
            runs,
            warmup,
            out,
            label,
            prefill_chunk,
        } => {
            let steps = match (scenario.as_deref(), plan) {
                (_, Some(plan)) => run::read_plan(&plan, runs, warmup)?,
                (Some(name), None) => {
                    let scenario = match name {
                        "single" => run::Scenario::Single { prompt, decode },
                        "batch" => run::Scenario::Batch {
                            prompt,
                            decode,
                            batch,
                        },
                        "chat" => run::Scenario::Chat {
                            history,
                            reply,
                            new,
                        },
                        other => {
                            anyhow::bail!("unknown scenario {other:?} (single, batch or chat)")
                        }
                    };
                    vec![run::Step {
                        scenario,
                        runs,
                        warmup,
                    }]
                }
                (None, None) => anyhow::bail!("give --scenario or --plan"),
            };
            run::run(&run::RunArgs {
                model,
                steps,
                out,
                label,
                prefill_chunk,
            })?;
        }
    }
    Ok(())
}

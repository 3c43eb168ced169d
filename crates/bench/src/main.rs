//! `infer-bench`: what `cargo xtask bench` drives on our side.
//!
//! - `random-model` writes a random-weight model in a real checkpoint's shape;
//! - `convert-gguf` writes a GGUF model out as an mlx-community directory, so
//!   that mlx-lm reads the same weights;
//! - `run` times one scenario on our engine and appends JSON records that
//!   match those of `bench/mlx_lm_bench.py`.

mod http;
mod raw_llama;
mod run;
mod shapes;
mod train;

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
        /// The shape: qwen3-0.6b, qwen3-1.7b, qwen3-4b, gemma3-1b, or
        /// qwen3-overhead / gemma3-overhead (their depths, tiny matrices).
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
        /// Prompt tokens per prefill pass (MLX).
        #[arg(long)]
        prefill_chunk: Option<usize>,
        /// The backend to measure: `mlx` (the model directory or GGUF file
        /// on MLX's default device) or `llamacpp` (a GGUF file).
        #[arg(long, default_value = "mlx")]
        backend: String,
        /// Run as one rank of a tensor-parallel group over this MLX
        /// distributed backend (nccl, ring, any), started with MLX's
        /// environment (MLX_RANK, …); rank 0 measures and writes the
        /// records, the others follow it. Single-stream steps only.
        #[arg(long, value_name = "BACKEND")]
        tensor_parallel: Option<String>,
        /// llama.cpp's CPU threads (every core by default).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Times LoRA training (as `bench/mlx_lm_train_bench.py` times mlx-lm's)
    /// and appends one record per report window after the first.
    Train(train::TrainArgs),
    /// Serves a model over HTTP (our OpenAI-compatible server) until killed.
    Serve(http::ServeArgs),
    /// Drives an OpenAI-compatible server with concurrent streaming clients.
    HttpLoad(http::LoadArgs),
    /// Compares the fused CUDA decode kernels with MLX's own operations on
    /// random inputs (bfloat16, float16, float32) and prints one JSON line
    /// per comparison; fails where a difference is more than a rounding of
    /// the dtype. Needs MLX's CUDA backend.
    FusedCheck {
        /// Only this dtype (each one compiles its own kernels, which takes
        /// a while on a GPU machine); every one when left out.
        #[arg(long, value_enum)]
        dtype: Option<CheckDtype>,
    },
    /// Times the decode step's folded products of Qwen3-0.6B and Qwen3-4B
    /// (bf16): MLX's own operations and our gemv kernel, one JSON line a
    /// case (run it under `gpu.sh trace` for each kernel's own
    /// time). Needs MLX's CUDA backend.
    GemvTime {
        /// Products timed a case.
        #[arg(long, default_value_t = 200)]
        reps: usize,
    },
    /// llama-bench's method on llama.cpp's own API (no wrapper of ours):
    /// the `single` steps of a plan on a GGUF file, appended as records of
    /// engine `llama.cpp-raw`.
    LlamaRaw {
        /// The GGUF file.
        #[arg(long)]
        model: PathBuf,
        /// The plan (its `single` steps are run).
        #[arg(long)]
        plan: PathBuf,
        /// The model's name in the records.
        #[arg(long)]
        label: String,
        /// The JSON-lines file to append to.
        #[arg(long)]
        out: PathBuf,
        /// CPU threads (every core by default).
        #[arg(long)]
        threads: Option<usize>,
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
        Command::Train(args) => train::train(&args)?,
        Command::FusedCheck { dtype } => fused_check(dtype)?,
        Command::GemvTime { reps } => gemv_time(reps)?,
        Command::Serve(args) => http::serve(&args)?,
        Command::HttpLoad(args) => http::load(&args)?,
        Command::LlamaRaw {
            model,
            plan,
            label,
            out,
            threads,
        } => llama_raw(&model, &plan, &label, &out, threads)?,
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
            backend,
            tensor_parallel,
            threads,
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
                backend,
                tensor_parallel,
                threads,
            })?;
        }
    }
    Ok(())
}

/// A dtype [`Command::FusedCheck`] can be limited to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CheckDtype {
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
    /// float32.
    F32,
}

/// [`Command::FusedCheck`]: each comparison as a JSON line; an error where
/// a kernel is further from MLX than a couple of roundings of its dtype
/// (relative to the largest value), which the sums' other order of addition
/// can cost.
fn fused_check(only: Option<CheckDtype>) -> Result<()> {
    use backend_metal::mlx_rs::Dtype;
    let mut worst: Vec<String> = Vec::new();
    let all = [
        (CheckDtype::Bf16, Dtype::Bfloat16, 2f32.powi(-7)),
        (CheckDtype::F16, Dtype::Float16, 2f32.powi(-10)),
        (CheckDtype::F32, Dtype::Float32, 2f32.powi(-20)),
    ];
    for (_, dtype, ulp) in all
        .into_iter()
        .filter(|(d, ..)| only.is_none_or(|o| o == *d))
    {
        for c in backend_metal::check_fused_kernels(dtype)? {
            let bound = 4.0 * ulp * c.max_abs.max(1.0);
            println!(
                "{}",
                serde_json::json!({
                    "dtype": format!("{dtype:?}"),
                    "case": c.case,
                    "max_abs_diff": c.max_abs_diff,
                    "max_abs": c.max_abs,
                    "differing": c.differing,
                    "elements": c.elements,
                    "bound": bound,
                })
            );
            if c.max_abs_diff.is_nan() || c.max_abs_diff > bound {
                worst.push(format!(
                    "{dtype:?} {}: {} > {bound}",
                    c.case, c.max_abs_diff
                ));
            }
        }
    }
    anyhow::ensure!(
        worst.is_empty(),
        "fused kernels off MLX: {}",
        worst.join("; ")
    );
    Ok(())
}

fn gemv_time(reps: usize) -> Result<()> {
    for t in backend_metal::time_gemv_kernels(reps)? {
        let per = t.seconds / t.reps as f64;
        println!(
            "{}",
            serde_json::json!({
                "case": t.case,
                "implementation": t.implementation,
                "weight_bytes": t.weight_bytes,
                "reps": t.reps,
                "seconds": t.seconds,
                "us_per_product": per * 1e6,
                "wall_gb_per_s": t.weight_bytes as f64 / per / 1e9,
                "max_abs_diff": t.max_abs_diff,
                "max_abs": t.max_abs,
            })
        );
    }
    Ok(())
}

/// Runs the `single` steps of `plan` with [`raw_llama::measure`].
fn llama_raw(
    model: &std::path::Path,
    plan: &std::path::Path,
    label: &str,
    out: &std::path::Path,
    threads: Option<usize>,
) -> Result<()> {
    use std::io::Write;
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)?;
    for step in run::read_plan(plan, 3, 1)? {
        let run::Scenario::Single { prompt, decode } = step.scenario else {
            continue;
        };
        if step.runs == 0 {
            continue;
        }
        for (i, (pp, tg, tg_cpu)) in raw_llama::measure(model, prompt, decode, step.runs, threads)?
            .into_iter()
            .enumerate()
        {
            let rec = serde_json::json!({
                "engine": "llama.cpp-raw",
                "label": label,
                "scenario": "single",
                "prompt": prompt,
                "decode": decode,
                "run": i,
                "prefill_tps": pp,
                "decode_tps": tg,
                "decode_cpu_tps": tg_cpu,
                "threads": threads,
                "device": "cpu",
            });
            eprintln!("{rec}");
            writeln!(file, "{rec}")?;
        }
    }
    Ok(())
}

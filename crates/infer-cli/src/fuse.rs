//! `infer fuse`: merges a LoRA adapter into its base model and writes a
//! model directory (as `mlx_lm.fuse`).

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use crate::args::Format;
use crate::error::CliError;

/// `infer fuse`: write the model with the adapter merged into its weights.
#[derive(Debug, Clone, Args)]
pub struct FuseArgs {
    /// The base model: a Hugging Face or mlx-community directory, or a GGUF
    /// file.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,

    /// The adapter: its directory, or a checkpoint file in it.
    #[arg(long, value_name = "PATH")]
    adapter: PathBuf,

    /// The directory to write (must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// Write quantised matrices dense, so that transformers loads the result.
    #[arg(long)]
    dequantize: bool,

    /// `text` prints a summary; `json` one document.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Debug, Serialize)]
struct Report {
    out: PathBuf,
    fused: usize,
    requantized: usize,
    dequantized: usize,
    weight_files: Vec<PathBuf>,
}

/// Runs `infer fuse`.
pub fn run(args: &FuseArgs, quiet: bool) -> Result<(), CliError> {
    let opts = backend_metal::fuse::FuseOptions {
        dequantize: args.dequantize,
    };
    let fused = backend_metal::fuse::fuse(&args.model, &args.adapter, &args.out, &opts)?;
    match args.format {
        Format::Text => {
            if !quiet {
                eprintln!(
                    "fused {} matrices ({} quantised again, {} written dense) into {}",
                    fused.fused,
                    fused.requantized,
                    fused.dequantized,
                    args.out.display()
                );
            }
        }
        Format::Json => crate::output::json_out(&Report {
            out: args.out.clone(),
            fused: fused.fused,
            requantized: fused.requantized,
            dequantized: fused.dequantized,
            weight_files: fused.weight_files,
        })?,
    }
    Ok(())
}

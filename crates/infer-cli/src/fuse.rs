//! `infer fuse`: merges a LoRA adapter into its base model and writes a
//! model directory (as `mlx_lm.fuse`).

use std::path::PathBuf;

use clap::{Args, ValueEnum};
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

    /// Also write the fused model as a GGUF file (DIR/model-f16.gguf or
    /// DIR/model-q8_0.gguf) for llama.cpp: from a GGUF base, or a Qwen3,
    /// Qwen2 or Llama directory with a byte-level BPE vocabulary
    /// (a quantised one with --dequantize).
    #[arg(long, value_enum, value_name = "TYPE")]
    export_gguf: Option<GgufFlag>,

    /// `text` prints a summary; `json` one document.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// The `--export-gguf` flag's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GgufFlag {
    /// 16-bit floats.
    F16,
    /// llama.cpp's 8-bit blocks.
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(Debug, Serialize)]
struct Report {
    out: PathBuf,
    fused: usize,
    requantized: usize,
    dequantized: usize,
    weight_files: Vec<PathBuf>,
    gguf: Option<PathBuf>,
}

/// Runs `infer fuse`.
pub fn run(args: &FuseArgs, quiet: bool) -> Result<(), CliError> {
    let opts = backend_metal::fuse::FuseOptions {
        dequantize: args.dequantize,
        export_gguf: args.export_gguf.map(|f| match f {
            GgufFlag::F16 => backend_metal::fuse::GgufType::F16,
            GgufFlag::Q8_0 => backend_metal::fuse::GgufType::Q8_0,
        }),
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
                if let Some(g) = &fused.gguf {
                    eprintln!("GGUF: {}", g.display());
                }
            }
        }
        Format::Json => crate::output::json_out(&Report {
            out: args.out.clone(),
            fused: fused.fused,
            requantized: fused.requantized,
            dequantized: fused.dequantized,
            weight_files: fused.weight_files,
            gguf: fused.gguf,
        })?,
    }
    Ok(())
}

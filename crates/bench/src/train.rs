//! Timed LoRA training on our engine, measured as
//! `bench/mlx_lm_train_bench.py` measures `mlx_lm.lora`'s trainer: the same
//! synthetic examples (prompt-formula ids, every token counted), batch
//! size, sequence length, adapted layers and rank, Adam at 1e-5; one record
//! per report window after the first (which includes the warm-up).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use backend_metal::{MlxModel, Placement};
use inference_core::{
    Backend, Example, LoadOptions, LoraConfig, TextModel, TrainOptions, TrainingData,
};
use serde_json::json;

use crate::run::prompt_ids;

/// What [`train`] measures.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// The model directory (or GGUF file).
    #[arg(long)]
    pub model: PathBuf,
    /// Examples per batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per example.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Layers adapted, from the top.
    #[arg(long, default_value_t = 16)]
    pub layers: usize,
    /// The adapters' rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Steps per report window.
    #[arg(long, default_value_t = 5)]
    pub report: usize,
    /// Report windows recorded (one more runs first, unrecorded).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Gradient checkpointing per layer.
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// Each report's peak is that window's own (the peak is reset after each
    /// report), to tell the first, compiling steps from the later ones.
    #[arg(long)]
    pub window_peaks: bool,
    /// The JSON-lines file to append to.
    #[arg(long)]
    pub out: PathBuf,
    /// The model's name in the records.
    #[arg(long)]
    pub label: String,
}

/// The synthetic examples both drivers train on: `n` rows of `seq`
/// prompt-formula ids.
pub fn examples(n: usize, seq: usize, vocab: usize) -> Vec<Example> {
    (0..n)
        .map(|row| Example {
            ids: prompt_ids(seq, row, vocab),
            prompt_len: 0,
        })
        .collect()
}

/// Trains and appends one record per measured report window.
pub fn train(args: &TrainArgs) -> Result<()> {
    let model = MlxModel::load(&args.model, &LoadOptions::new(), Placement::Default)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let vocab = model.info().vocab_size;
    let trainable = model.trainable()?;
    trainable.apply_lora(
        &LoraConfig {
            rank: args.rank,
            num_layers: Some(args.layers),
            ..LoraConfig::default()
        },
        0,
    )?;
    let data = TrainingData {
        train: examples(8 * args.batch, args.seq, vocab),
        valid: Vec::new(),
    };
    let opts = TrainOptions {
        iters: args.report * (args.runs + 1),
        batch_size: args.batch,
        report_every: args.report,
        max_seq_length: args.seq + 1,
        grad_checkpoint: args.grad_checkpoint,
        ..TrainOptions::default()
    };
    // What MLX holds before the first step (weights, adapters): the part of
    // the peak that is not the step's own.
    let active_start = backend_metal::memory::active();
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .with_context(|| format!("opening {}", args.out.display()))?;
    for (i, progress) in trainable.train(data, &opts)?.enumerate() {
        let p = progress?;
        let rec = json!({
            "engine": "ours",
            "label": args.label,
            "scenario": "train",
            "batch": args.batch,
            "prompt": args.seq,
            "layers": args.layers,
            "rank": args.rank,
            "grad_checkpoint": u64::from(args.grad_checkpoint),
            "window_peaks": args.window_peaks,
            "run": i as i64 - 1,
            "train_tps": p.tokens_per_sec,
            "peak_memory_mb": p.peak_memory_bytes as f64 / 1e6,
            "active_start_mb": active_start as f64 / 1e6,
            "train_loss": p.train_loss,
            "mlx_version": backend_metal::device::mlx_version(),
            "device": backend_metal::MlxBackend.device(),
        });
        if args.window_peaks {
            backend_metal::memory::reset_peak();
        }
        let line = serde_json::to_string(&rec)?;
        eprintln!("{}{line}", if i == 0 { "(warm-up) " } else { "" });
        if i > 0 {
            writeln!(out, "{line}")?;
            out.flush()?;
        }
    }
    Ok(())
}

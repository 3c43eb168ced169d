//! `infer train`: LoRA fine-tuning on a data directory, as `mlx_lm.lora`
//! does it (the same defaults, data files and adapter files).

use std::io::{self, IsTerminal};
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use inference_core::{
    Checkpoints, LoraConfig, LrSchedule, Optimizer, TrainOptions, TrainProgress, Trainable,
};
use inference_runtime::dataset;
use serde::Serialize;

use crate::args::{Format, ModelArgs};
use crate::error::CliError;
use crate::interrupt::Interrupt;
use crate::load;

/// The optimiser flag's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerFlag {
    /// Adam without bias correction (mlx-lm's default).
    Adam,
    /// AdamW (decoupled weight decay, --weight-decay).
    Adamw,
    /// Plain SGD.
    Sgd,
}

/// The schedule flag's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleFlag {
    /// The learning rate throughout (after any warm-up).
    Constant,
    /// Cosine decay to --lr-end.
    Cosine,
    /// Linear decay to --lr-end.
    Linear,
}

/// `infer train`: fine-tune LoRA adapters (MLX backend unless --backend).
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,

    /// The data directory: train.jsonl, valid.jsonl and (for --test)
    /// test.jsonl, with `messages`, `prompt`/`completion` or `text` lines.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,

    /// Batches to train on.
    #[arg(long, default_value_t = 1000)]
    iters: usize,

    /// Examples per batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,

    /// The peak learning rate.
    #[arg(long, default_value_t = 1e-5)]
    learning_rate: f32,

    /// The optimiser.
    #[arg(long, value_enum, default_value_t = OptimizerFlag::Adam)]
    optimizer: OptimizerFlag,

    /// AdamW's weight decay.
    #[arg(long, default_value_t = 0.01, value_name = "W")]
    weight_decay: f32,

    /// The learning-rate schedule after the warm-up.
    #[arg(long, value_enum, default_value_t = ScheduleFlag::Constant)]
    lr_schedule: ScheduleFlag,

    /// The final learning rate of a cosine or linear schedule.
    #[arg(long, default_value_t = 0.0, value_name = "LR")]
    lr_end: f32,

    /// Optimiser steps of linear warm-up from 0.
    #[arg(long, default_value_t = 0, value_name = "STEPS")]
    warmup: usize,

    /// Batches whose gradients are averaged into one optimiser step.
    #[arg(long, default_value_t = 1, value_name = "N")]
    grad_accumulation: usize,

    /// Clip the gradients' global norm to this.
    #[arg(long, value_name = "NORM")]
    max_grad_norm: Option<f32>,

    /// The adapters' rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,

    /// The factor on the adapters' output.
    #[arg(long, default_value_t = 20.0)]
    scale: f32,

    /// Dropout on the adapters' input.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,

    /// The layers' modules to adapt, comma-separated (e.g.
    /// self_attn.q_proj,self_attn.v_proj) [default: every linear layer].
    #[arg(long, value_delimiter = ',', value_name = "KEYS")]
    keys: Option<Vec<String>>,

    /// Layers adapted, from the top; -1: all.
    #[arg(long, default_value_t = 16, allow_negative_numbers = true)]
    num_layers: i64,

    /// Count the loss on the completions only.
    #[arg(long)]
    mask_prompt: bool,

    /// Recompute each layer's activations in the backward pass (less memory,
    /// more compute).
    #[arg(long)]
    grad_checkpoint: bool,

    /// Longer examples are cut to this many tokens.
    #[arg(long, default_value_t = 2048)]
    max_seq_length: usize,

    /// Validate every N batches (and after the last); 0: only after the last.
    #[arg(long, default_value_t = 200, value_name = "N")]
    val_every: usize,

    /// Validation batches per validation; -1: the whole set.
    #[arg(long, default_value_t = 25, allow_negative_numbers = true)]
    val_batches: i64,

    /// Report the training loss every N batches.
    #[arg(long, default_value_t = 10, value_name = "N")]
    report_every: usize,

    /// Evaluate on test.jsonl after training.
    #[arg(long)]
    test: bool,

    /// Seeds the adapters' start, the batch order and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Where the adapter goes (with its checkpoints and loss.svg).
    #[arg(long, default_value = "adapters", value_name = "DIR")]
    adapter_out: PathBuf,

    /// Write a checkpoint (NNNNNNN_adapters.safetensors and its training
    /// state) into the adapter directory every N batches; 0: none.
    #[arg(long, default_value_t = 100, value_name = "N")]
    save_every: usize,

    /// Continue from a checkpoint (NNNNNNN_adapters.safetensors): with its
    /// training state, from the step after it as if never stopped; without
    /// (an mlx-lm checkpoint), from its adapters at step 1.
    #[arg(long, value_name = "FILE", alias = "resume-adapter-file")]
    resume: Option<PathBuf>,

    /// `text` reports as it goes; `json` prints one document at the end.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

impl TrainArgs {
    fn lora(&self) -> Result<LoraConfig, CliError> {
        let num_layers = match self.num_layers {
            -1 => None,
            n if n > 0 => Some(n as usize),
            n => {
                return Err(CliError::Usage(format!(
                    "--num-layers {n}: use -1 or a count"
                )))
            }
        };
        let config = LoraConfig {
            rank: self.rank,
            scale: self.scale,
            dropout: self.dropout,
            keys: self.keys.clone(),
            num_layers,
        };
        config.validate()?;
        Ok(config)
    }

    fn options(&self) -> Result<TrainOptions, CliError> {
        let val_batches = match self.val_batches {
            -1 => None,
            n if n > 0 => Some(n as usize),
            n => {
                return Err(CliError::Usage(format!(
                    "--val-batches {n}: use -1 or a count"
                )))
            }
        };
        let opts = TrainOptions {
            iters: self.iters,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            optimizer: match self.optimizer {
                OptimizerFlag::Adam => Optimizer::Adam,
                OptimizerFlag::Adamw => Optimizer::AdamW {
                    weight_decay: self.weight_decay,
                },
                OptimizerFlag::Sgd => Optimizer::Sgd,
            },
            lr_schedule: match self.lr_schedule {
                ScheduleFlag::Constant => LrSchedule::Constant,
                ScheduleFlag::Cosine => LrSchedule::Cosine { end: self.lr_end },
                ScheduleFlag::Linear => LrSchedule::Linear { end: self.lr_end },
            },
            warmup: self.warmup,
            grad_accumulation: self.grad_accumulation,
            max_grad_norm: self.max_grad_norm,
            mask_prompt: self.mask_prompt,
            max_seq_length: self.max_seq_length,
            val_every: self.val_every,
            val_batches,
            report_every: self.report_every,
            seed: self.seed,
            grad_checkpoint: self.grad_checkpoint,
            checkpoints: (self.save_every > 0).then(|| Checkpoints {
                dir: self.adapter_out.clone(),
                every: self.save_every,
            }),
            resume: self.resume.clone(),
        };
        opts.validate()?;
        Ok(opts)
    }
}

/// Refuses to resume from a checkpoint whose directory's
/// `adapter_config.json` names other adapters than the flags (a different
/// scale or layer set would otherwise go unnoticed; a different rank is
/// caught by the tensors' shapes).
fn check_resume(file: &std::path::Path, lora: &LoraConfig) -> Result<(), CliError> {
    let dir = inference_formats::adapter::adapter_dir(file);
    let Ok(config) = inference_formats::adapter::AdapterConfig::load(dir) else {
        return Ok(());
    };
    let layers = lora.num_layers.map_or(-1, |n| n as i64);
    let mut differ = Vec::new();
    if config.lora.rank != lora.rank {
        differ.push(format!(
            "--rank {} (the checkpoint: {})",
            lora.rank, config.lora.rank
        ));
    }
    if config.lora.scale != lora.scale {
        differ.push(format!(
            "--scale {} (the checkpoint: {})",
            lora.scale, config.lora.scale
        ));
    }
    if config.num_layers != layers {
        differ.push(format!(
            "--num-layers {layers} (the checkpoint: {})",
            config.num_layers
        ));
    }
    if config.lora.keys != lora.keys {
        differ.push(format!(
            "--keys {:?} (the checkpoint: {:?})",
            lora.keys, config.lora.keys
        ));
    }
    match differ.is_empty() {
        true => Ok(()),
        false => Err(CliError::Usage(format!(
            "--resume {}: the adapters differ from the checkpoint's: {}",
            file.display(),
            differ.join(", ")
        ))),
    }
}

#[derive(Debug, Serialize)]
struct Report {
    trainable_parameters: u64,
    total_parameters: u64,
    reports: Vec<TrainProgress>,
    test_loss: Option<f32>,
    adapter: PathBuf,
    loss_plot: Option<PathBuf>,
    interrupted: bool,
}

/// One report as mlx-lm prints it.
fn line(p: &TrainProgress) -> String {
    let mut parts = vec![format!("Iter {}/{}", p.step, p.iters)];
    if p.step == 0 {
        return format!(
            "before training: val loss {:.3}",
            p.val_loss.unwrap_or(f32::NAN)
        );
    }
    if let Some(l) = p.train_loss {
        parts.push(format!("train loss {l:.3}"));
    }
    if let Some(l) = p.val_loss {
        parts.push(format!("val loss {l:.3}"));
    }
    parts.push(format!("learning rate {:.3e}", p.learning_rate));
    parts.push(format!("{:.1} tok/s", p.tokens_per_sec));
    parts.push(format!("{} trained tokens", p.trained_tokens));
    parts.push(format!("peak memory {}", HumanBytes(p.peak_memory_bytes)));
    parts.join(", ")
}

/// Runs `infer train`.
pub fn run(args: &TrainArgs, quiet: bool) -> Result<(), CliError> {
    let lora = args.lora()?;
    let opts = args.options()?;
    if let Some(file) = &args.resume {
        check_resume(file, &lora)?;
    }
    let mut model_args = args.model.clone();
    // Training is MLX's: a GGUF file would otherwise go to llama.cpp.
    if model_args.backend.is_none() {
        model_args.backend = Some(backend_metal::NAME.to_owned());
    }
    let loaded = load::load(&model_args, model_args.load_options()?, quiet)?;
    let model = &*loaded.model;
    let trainable: &dyn Trainable = model.trainable()?;
    let tokenizer = model.tokenizer()?;
    let (data, test) = dataset::read_dir(&args.data, tokenizer, true, args.test)?;
    let counts = trainable.apply_lora(&lora, opts.seed)?;
    let text = args.format == Format::Text;
    if text && !quiet {
        eprintln!(
            "trainable parameters: {:.3}% ({} of {}); {} training and {} validation examples",
            100.0 * counts.trainable as f64 / counts.total.max(1) as f64,
            counts.trainable,
            counts.total,
            data.train.len(),
            data.valid.len()
        );
    }
    let interrupt = Interrupt::install()?;
    let stream = trainable.train(data, &opts)?;
    let watch = interrupt.watch(stream.cancel_handle());
    let bar = (text && !quiet && io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(opts.iters as u64).with_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message("training");
        bar
    });
    let mut reports = Vec::new();
    for progress in stream {
        let p = progress?;
        if text {
            match &bar {
                Some(bar) => {
                    bar.set_position(p.step as u64);
                    bar.println(line(&p));
                }
                None => eprintln!("{}", line(&p)),
            }
        }
        reports.push(p);
    }
    drop(watch);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let interrupted = interrupt.was_hit();
    // What the finished steps taught is kept, interrupted or not.
    trainable.save_adapter(&args.adapter_out)?;
    let loss_plot = crate::plot::write_loss_plot(&args.adapter_out, &reports)?;
    if text && !quiet {
        eprintln!("adapter saved to {}", args.adapter_out.display());
        if let Some(plot) = &loss_plot {
            eprintln!("loss curve: {}", plot.display());
        }
    }
    if interrupted {
        return Err(CliError::Interrupted);
    }
    let test_loss = match args.test {
        true => Some(trainable.evaluate(test, &opts)?),
        false => None,
    };
    match args.format {
        Format::Text => {
            if let Some(l) = test_loss {
                println!("test loss {l:.3}, test perplexity {:.3}", l.exp());
            }
        }
        Format::Json => crate::output::json_out(&Report {
            trainable_parameters: counts.trainable,
            total_parameters: counts.total,
            reports,
            test_loss,
            adapter: args.adapter_out.clone(),
            loss_plot,
            interrupted,
        })?,
    }
    Ok(())
}

//! Fine-tuning contracts: LoRA configurations, training options, examples,
//! the [`Trainable`] capability and the [`TrainStream`] of its progress.
//!
//! Defaults and meanings follow mlx-lm's `mlx_lm.lora`, so that a run here
//! and a run there with the same numbers mean the same thing, and their
//! adapters load in either.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use futures::stream::{FusedStream, Stream};
use serde::{Deserialize, Serialize};

use crate::stream::CancelHandle;
use crate::{Error, Result, TokenId};

/// Where LoRA adapters go and how they are shaped (mlx-lm's
/// `lora_parameters` and `num_layers`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// The rank `r` of each adapter (mlx-lm: 8).
    pub rank: usize,
    /// The factor on each adapter's delta (mlx-lm: 20).
    pub scale: f32,
    /// Dropout on each adapter's input while training, in `[0, 1)`.
    pub dropout: f32,
    /// The modules adapted within each decoder layer, as mlx-lm keys them
    /// (`self_attn.q_proj`, `mlp.down_proj`, …); `None`: every linear layer.
    pub keys: Option<Vec<String>>,
    /// Decoder layers adapted, counted from the top; `None`: all of them
    /// (mlx-lm: 16).
    pub num_layers: Option<usize>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            scale: 20.0,
            dropout: 0.0,
            keys: None,
            num_layers: Some(16),
        }
    }
}

impl LoraConfig {
    /// Checks the ranges: a rank and a layer count above 0, a finite scale,
    /// dropout in `[0, 1)`, and keys (when given) that are not empty.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::invalid_option("rank", "must be at least 1"));
        }
        if !self.scale.is_finite() {
            return Err(Error::invalid_option("scale", "must be finite"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid_option("dropout", "must be in [0, 1)"));
        }
        if self.num_layers == Some(0) {
            return Err(Error::invalid_option("num_layers", "must be at least 1"));
        }
        if self
            .keys
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.iter().any(String::is_empty))
        {
            return Err(Error::invalid_option("keys", "an empty list or key"));
        }
        Ok(())
    }
}

/// The optimiser, as MLX defines it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "name")]
pub enum Optimizer {
    /// Adam without bias correction (mlx-lm's default).
    Adam,
    /// AdamW: Adam after decaying each parameter by `1 − lr · weight_decay`.
    AdamW {
        /// MLX's default is 0.01.
        weight_decay: f32,
    },
    /// Plain stochastic gradient descent.
    Sgd,
}

/// How the learning rate moves after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "name")]
pub enum LrSchedule {
    /// The learning rate throughout.
    Constant,
    /// Cosine decay from the learning rate to `end` over the steps after
    /// the warm-up (MLX's `cosine_decay`).
    Cosine {
        /// The final learning rate.
        end: f32,
    },
    /// Linear decay from the learning rate to `end` over the steps after
    /// the warm-up (MLX's `linear_schedule`).
    Linear {
        /// The final learning rate.
        end: f32,
    },
}

/// A training run's options (mlx-lm's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainOptions {
    /// Optimiser steps (mlx-lm: 1,000).
    pub iters: usize,
    /// Examples per batch (mlx-lm: 4).
    pub batch_size: usize,
    /// The peak learning rate (mlx-lm: 1e-5).
    pub learning_rate: f32,
    /// The optimiser.
    pub optimizer: Optimizer,
    /// The schedule after the warm-up.
    pub lr_schedule: LrSchedule,
    /// Steps of linear warm-up from 0 to the learning rate.
    pub warmup: usize,
    /// Batches whose gradients are averaged into one step.
    pub grad_accumulation: usize,
    /// Clip the gradients' global norm to this, when set.
    pub max_grad_norm: Option<f32>,
    /// Count the loss on completions only (the prompt's tokens are masked).
    pub mask_prompt: bool,
    /// Longer examples are truncated to this many tokens (mlx-lm: 2,048).
    pub max_seq_length: usize,
    /// Validate every this many steps, and after the last (0: only then;
    /// mlx-lm: 200).
    pub val_every: usize,
    /// Validation batches per validation (`None`: the whole set; mlx-lm: 25).
    pub val_batches: Option<usize>,
    /// Report the running training loss every this many steps (mlx-lm: 10).
    pub report_every: usize,
    /// Seeds the batch order, dropout and the adapters' initial values.
    pub seed: u64,
    /// Recompute each layer's activations during the backward pass instead
    /// of keeping them from the forward one (mlx-lm's `grad_checkpoint`):
    /// less memory for longer sequences and bigger batches, about a third
    /// more compute. Backends without it refuse it (`Unsupported`).
    pub grad_checkpoint: bool,
    /// Checkpoints during the run (`None`: none; the caller saves the
    /// adapters at the end).
    pub checkpoints: Option<Checkpoints>,
    /// A checkpoint to continue from (its `NNNNNNN_adapters.safetensors`,
    /// see [`Checkpoints`]). With its training state beside it the run goes
    /// on from the step after it, optimiser state, batch order and dropout
    /// included, as if never interrupted; without one (an mlx-lm checkpoint,
    /// an `adapters.safetensors`) the adapters start from its values and the
    /// run from step 1, as `mlx_lm.lora --resume-adapter-file` does.
    pub resume: Option<PathBuf>,
}

/// Periodic checkpoints of a run, as mlx-lm writes them: every `every`
/// steps, `dir/NNNNNNN_adapters.safetensors` (the step, seven digits), a
/// copy in `dir/adapters.safetensors` and `dir/adapter_config.json`, and
/// beside it `NNNNNNN_train_state.safetensors` (optimiser state, partly
/// accumulated gradients, the step) for [`TrainOptions::resume`]. Each file
/// is written to a temporary file and renamed: a failure (a full disk)
/// ends the run with [`Error::Write`] and leaves the earlier checkpoints as
/// they were.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoints {
    /// The adapter directory.
    pub dir: PathBuf,
    /// Steps between checkpoints (mlx-lm: 100).
    pub every: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            iters: 1000,
            batch_size: 4,
            learning_rate: 1e-5,
            optimizer: Optimizer::Adam,
            lr_schedule: LrSchedule::Constant,
            warmup: 0,
            grad_accumulation: 1,
            max_grad_norm: None,
            mask_prompt: false,
            max_seq_length: 2048,
            val_every: 200,
            val_batches: Some(25),
            report_every: 10,
            seed: 0,
            grad_checkpoint: false,
            checkpoints: None,
            resume: None,
        }
    }
}

impl TrainOptions {
    /// Checks the ranges (counts above 0, finite positive rates, a warm-up
    /// shorter than the run).
    pub fn validate(&self) -> Result<()> {
        let positive = |field, n: usize| match n {
            0 => Err(Error::invalid_option(field, "must be at least 1")),
            _ => Ok(()),
        };
        positive("iters", self.iters)?;
        positive("batch_size", self.batch_size)?;
        positive("grad_accumulation", self.grad_accumulation)?;
        positive("max_seq_length", self.max_seq_length)?;
        positive("report_every", self.report_every)?;
        if let Some(c) = &self.checkpoints {
            positive("save_every", c.every)?;
        }
        if self.val_batches == Some(0) {
            return Err(Error::invalid_option("val_batches", "must be at least 1"));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(Error::invalid_option("learning_rate", "must be positive"));
        }
        if self.warmup >= self.iters && self.warmup > 0 {
            return Err(Error::invalid_option(
                "warmup",
                "must be shorter than iters",
            ));
        }
        if self
            .max_grad_norm
            .is_some_and(|n| !(n.is_finite() && n > 0.0))
        {
            return Err(Error::invalid_option("max_grad_norm", "must be positive"));
        }
        match self.optimizer {
            Optimizer::AdamW { weight_decay }
                if !(weight_decay.is_finite() && weight_decay >= 0.0) =>
            {
                return Err(Error::invalid_option("weight_decay", "must be 0 or more"));
            }
            _ => {}
        }
        match self.lr_schedule {
            LrSchedule::Cosine { end } | LrSchedule::Linear { end }
                if !(end.is_finite() && end >= 0.0) =>
            {
                Err(Error::invalid_option(
                    "lr_schedule",
                    "the end rate must be 0 or more",
                ))
            }
            _ => Ok(()),
        }
    }

    /// The learning rate of step `step` (0-based): linear warm-up from 0,
    /// then the schedule over the remaining steps.
    pub fn learning_rate_at(&self, step: usize) -> f32 {
        let peak = self.learning_rate;
        if step < self.warmup {
            return peak * step as f32 / self.warmup as f32;
        }
        let span = self.iters.saturating_sub(self.warmup).max(1) as f32;
        let t = ((step - self.warmup) as f32 / span).min(1.0);
        match self.lr_schedule {
            LrSchedule::Constant => peak,
            LrSchedule::Cosine { end } => {
                end + 0.5 * (peak - end) * (1.0 + (std::f32::consts::PI * t).cos())
            }
            LrSchedule::Linear { end } => peak + (end - peak) * t,
        }
    }
}

/// One training example: its token ids, and how many of the first are
/// prompt (not counted in the loss with [`TrainOptions::mask_prompt`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The ids, template and special tokens included.
    pub ids: Vec<TokenId>,
    /// Leading ids that are prompt.
    pub prompt_len: usize,
}

/// The examples of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrainingData {
    /// What is trained on.
    pub train: Vec<Example>,
    /// What the validation loss is measured on.
    pub valid: Vec<Example>,
}

/// Parameters of a model with adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParameterCounts {
    /// In the adapters (what training changes).
    pub trainable: u64,
    /// In the base model and the adapters together.
    pub total: u64,
}

/// A report of a training run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainProgress {
    /// Optimiser steps done.
    pub step: usize,
    /// The run's steps.
    pub iters: usize,
    /// The mean training loss since the last report, when this reports it.
    pub train_loss: Option<f32>,
    /// The validation loss, when this step measured it.
    pub val_loss: Option<f32>,
    /// The learning rate of the last step.
    pub learning_rate: f32,
    /// Tokens trained on per second since the last report.
    pub tokens_per_sec: f64,
    /// Tokens trained on since the start (the loss's counted targets).
    pub trained_tokens: u64,
    /// The most memory the backend held since the run began, in bytes.
    pub peak_memory_bytes: u64,
}

/// What a [`TrainStream`] carries.
#[derive(Debug)]
enum Event {
    Progress(TrainProgress),
    Failed(Error),
}

/// The progress of a training run: a blocking [`Iterator`] and a
/// [`futures::Stream`] of `Result<TrainProgress>`, ending when the run
/// does; a failure is its last item. Dropping it, or
/// [`cancel`](Self::cancel), stops the run after the step under way (the
/// adapters keep what the finished steps taught them).
#[derive(Debug)]
pub struct TrainStream {
    rx: UnboundedReceiver<Event>,
    cancel: CancelHandle,
    done: bool,
}

/// The engine's end of a [`TrainStream`].
#[derive(Debug)]
pub struct TrainSink {
    tx: UnboundedSender<Event>,
    cancel: CancelHandle,
}

impl TrainStream {
    /// A connected sink and stream.
    pub fn channel() -> (TrainSink, TrainStream) {
        let (tx, rx) = unbounded();
        let cancel = CancelHandle::new();
        (
            TrainSink {
                tx,
                cancel: cancel.clone(),
            },
            TrainStream {
                rx,
                cancel,
                done: false,
            },
        )
    }

    /// Stops the run after the step under way.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// A handle that stops the run from elsewhere.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }
}

impl Drop for TrainStream {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Stream for TrainStream {
    type Item = Result<TrainProgress>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.rx).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Event::Progress(p))) => Poll::Ready(Some(Ok(p))),
            Poll::Ready(Some(Event::Failed(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
        }
    }
}

impl FusedStream for TrainStream {
    fn is_terminated(&self) -> bool {
        self.done
    }
}

impl Iterator for TrainStream {
    type Item = Result<TrainProgress>;

    /// Blocks until the next report. In async code use the [`Stream`]
    /// implementation instead.
    fn next(&mut self) -> Option<Self::Item> {
        futures::executor::block_on(futures::future::poll_fn(|cx| {
            Pin::new(&mut *self).poll_next(cx)
        }))
    }
}

impl TrainSink {
    /// Whether the consumer cancelled or went away.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled() || self.tx.is_closed()
    }

    /// Reports progress; an error when the consumer is gone.
    pub fn send(&self, progress: TrainProgress) -> Result<()> {
        self.tx
            .unbounded_send(Event::Progress(progress))
            .map_err(|_| Error::Cancelled)
    }

    /// Ends the run with `error`.
    pub fn fail(self, error: Error) {
        let _ = self.tx.unbounded_send(Event::Failed(error));
    }
}

/// A model that can be fine-tuned with LoRA: an optional capability
/// ([`TextModel::trainable`](crate::TextModel::trainable) answers
/// `Unsupported` where a backend has none).
///
/// Adapters live beside the base weights, which are never changed:
/// generation through the same model uses the adapters from the moment they
/// are applied.
pub trait Trainable: Send + Sync {
    /// Puts fresh adapters (A uniform in ±1/√in, B zero, as mlx-lm starts
    /// them, seeded by `seed`) on the layers `config` names, replacing any
    /// there. Keys that match no linear layer of the model are
    /// `InvalidOption`.
    fn apply_lora(&self, config: &LoraConfig, seed: u64) -> Result<ParameterCounts>;

    /// Trains the adapters on `data`. Fails at once on options out of range
    /// or an empty training set (or an empty validation set when validating).
    fn train(&self, data: TrainingData, opts: &TrainOptions) -> Result<TrainStream>;

    /// The mean loss over `examples` (the masked cross-entropy training
    /// uses), in batches of `batch_size`.
    fn evaluate(&self, examples: Vec<Example>, opts: &TrainOptions) -> Result<f32>;

    /// Writes the adapters as mlx-lm does: `dir/adapters.safetensors` and
    /// `dir/adapter_config.json`.
    fn save_adapter(&self, dir: &Path) -> Result<()>;

    /// Trainable (adapter) and total parameters; `None` before
    /// [`apply_lora`](Self::apply_lora) or an adapter at load.
    fn parameter_counts(&self) -> Option<ParameterCounts>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_out_of_range_are_refused() {
        assert!(LoraConfig::default().validate().is_ok());
        let bad = [
            LoraConfig {
                rank: 0,
                ..Default::default()
            },
            LoraConfig {
                dropout: 1.0,
                ..Default::default()
            },
            LoraConfig {
                num_layers: Some(0),
                ..Default::default()
            },
            LoraConfig {
                keys: Some(vec![]),
                ..Default::default()
            },
            LoraConfig {
                scale: f32::NAN,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(
                matches!(c.validate(), Err(Error::InvalidOption { .. })),
                "{c:?}"
            );
        }
        assert!(TrainOptions::default().validate().is_ok());
        let bad = [
            TrainOptions {
                iters: 0,
                ..Default::default()
            },
            TrainOptions {
                batch_size: 0,
                ..Default::default()
            },
            TrainOptions {
                learning_rate: 0.0,
                ..Default::default()
            },
            TrainOptions {
                warmup: 1000,
                ..Default::default()
            },
            TrainOptions {
                max_grad_norm: Some(-1.0),
                ..Default::default()
            },
            TrainOptions {
                val_batches: Some(0),
                ..Default::default()
            },
            TrainOptions {
                optimizer: Optimizer::AdamW { weight_decay: -1.0 },
                ..Default::default()
            },
        ];
        for o in bad {
            assert!(
                matches!(o.validate(), Err(Error::InvalidOption { .. })),
                "{o:?}"
            );
        }
        let unknown = serde_json::from_str::<TrainOptions>(r#"{"iterz": 3}"#);
        assert!(unknown.is_err(), "unknown keys are refused");
    }

    #[test]
    fn schedules_warm_up_then_decay() {
        let o = TrainOptions {
            iters: 10,
            learning_rate: 1.0,
            warmup: 2,
            lr_schedule: LrSchedule::Cosine { end: 0.0 },
            ..Default::default()
        };
        assert_eq!(o.learning_rate_at(0), 0.0);
        assert_eq!(o.learning_rate_at(1), 0.5);
        assert_eq!(o.learning_rate_at(2), 1.0);
        assert!(
            (o.learning_rate_at(6) - 0.5).abs() < 1e-6,
            "half way down the cosine"
        );
        assert!(o.learning_rate_at(10).abs() < 1e-6);
        let lin = TrainOptions {
            lr_schedule: LrSchedule::Linear { end: 0.5 },
            ..o
        };
        assert!((lin.learning_rate_at(6) - 0.75).abs() < 1e-6);
    }

    #[test]
    fn a_dropped_stream_cancels_and_a_failure_ends_it() {
        let (sink, stream) = TrainStream::channel();
        assert!(!sink.is_cancelled());
        drop(stream);
        assert!(sink.is_cancelled());
        let (sink, mut stream) = TrainStream::channel();
        sink.fail(Error::Cancelled);
        assert!(matches!(stream.next(), Some(Err(Error::Cancelled))));
        assert!(stream.next().is_none());
    }
}

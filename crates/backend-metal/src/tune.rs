//! Fine-tuning through the model's worker: [`Trainable`] for [`MlxModel`],
//! the jobs it sends, and the adapter state the worker keeps.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};

use inference_core::{
    Error, Example, LoraConfig, ParameterCounts, Result, TrainOptions, TrainSink, TrainStream,
    Trainable, TrainingData,
};
use inference_formats::adapter::{AdapterConfig, LoraParameters};
use serde_json::Map;

use crate::engine::MlxModel;
use crate::load::adapter;
use crate::models::CausalLm;
use crate::train::{self, Adapted};
use crate::worker::{Job, Shared};

/// The adapters the worker's model carries, and what their configuration
/// file says.
pub(crate) struct AdapterState {
    pub(crate) adapted: Adapted,
    pub(crate) config: AdapterConfig,
}

/// Applies the adapter at `path` to a freshly built `model`.
pub(crate) fn applied(
    path: &Path,
    model: &dyn CausalLm,
) -> std::result::Result<AdapterState, crate::error::LoadError> {
    let (adapted, config) = adapter::apply(path, model)?;
    Ok(AdapterState { adapted, config })
}

/// A fine-tuning job.
pub(crate) enum TuneJob {
    Apply {
        config: LoraConfig,
        seed: u64,
        reply: Sender<Result<ParameterCounts>>,
    },
    Train {
        data: TrainingData,
        opts: TrainOptions,
        sink: TrainSink,
    },
    Evaluate {
        examples: Vec<Example>,
        opts: TrainOptions,
        reply: Sender<Result<f32>>,
    },
    Save {
        dir: PathBuf,
        reply: Sender<Result<()>>,
    },
}

/// The configuration file of fresh adapters made with `config`.
fn adapter_config(config: &LoraConfig) -> AdapterConfig {
    AdapterConfig {
        fine_tune_type: "lora".into(),
        num_layers: config.num_layers.map_or(-1, |n| n as i64),
        lora: LoraParameters {
            rank: config.rank,
            scale: config.scale,
            dropout: config.dropout,
            keys: config.keys.clone(),
        },
        rest: Map::new(),
    }
}

/// Runs `job` on the worker. `changed` is told when the adapters changed
/// (cached attention states computed before are stale then).
pub(crate) fn run(
    job: TuneJob,
    model: &dyn CausalLm,
    shared: &Shared,
    state: &mut Option<AdapterState>,
    changed: &mut dyn FnMut(),
) {
    let no_adapters = || Error::InvalidInput("no adapters: apply_lora first".into());
    match job {
        TuneJob::Apply {
            config,
            seed,
            reply,
        } => {
            let result = train::fresh_adapters(model, &config, seed).map(|adapted| {
                changed();
                let counts = train::counts(
                    model,
                    &adapted,
                    shared
                        .base_parameters
                        .load(std::sync::atomic::Ordering::Relaxed),
                );
                shared.set_parameter_counts(Some(counts));
                *state = Some(AdapterState {
                    adapted,
                    config: adapter_config(&config),
                });
                counts
            });
            let _ = reply.send(result);
        }
        TuneJob::Train { data, opts, sink } => {
            let Some(s) = state.as_mut() else {
                return sink.fail(no_adapters());
            };
            changed();
            // What the run was, kept in the adapter's configuration file
            // under a key of its own (mlx-lm's own argument names, such as
            // `optimizer`, mean other shapes there).
            if let Ok(args) = serde_json::to_value(&opts) {
                s.config.rest.insert("inference_rs_train".into(), args);
            }
            if let Err(e) = train::train(model, &s.adapted, &data, &opts, &s.config, &sink) {
                sink.fail(e);
            }
        }
        TuneJob::Evaluate {
            examples,
            opts,
            reply,
        } => {
            // The base model's loss when no adapters are on.
            let _ = reply.send(train::evaluate(model, &examples, &opts, None));
        }
        TuneJob::Save { dir, reply } => {
            let result = match state {
                Some(s) => adapter::save(&dir, model, &s.adapted, &s.config),
                None => Err(no_adapters()),
            };
            let _ = reply.send(result);
        }
    }
}

impl MlxModel {
    fn tune<T>(&self, job: impl FnOnce(Sender<Result<T>>) -> TuneJob) -> Result<T> {
        let (reply, answer) = channel();
        self.send(Job::Tune(job(reply)))?;
        Self::await_reply(&answer)?
    }
}

impl Trainable for MlxModel {
    fn apply_lora(&self, config: &LoraConfig, seed: u64) -> Result<ParameterCounts> {
        config.validate()?;
        self.tune(|reply| TuneJob::Apply {
            config: config.clone(),
            seed,
            reply,
        })
    }

    /// Trains on the worker: calls made meanwhile queue behind the run.
    fn train(&self, data: TrainingData, opts: &TrainOptions) -> Result<TrainStream> {
        opts.validate()?;
        if data.train.len() < opts.batch_size {
            return Err(Error::InvalidInput(format!(
                "{} training examples, fewer than one batch of {}",
                data.train.len(),
                opts.batch_size
            )));
        }
        self.check_examples(&data.train)?;
        self.check_examples(&data.valid)?;
        if self.shared.parameter_counts().is_none() {
            return Err(Error::InvalidInput("no adapters: apply_lora first".into()));
        }
        let (sink, stream) = TrainStream::channel();
        self.send(Job::Tune(TuneJob::Train {
            data,
            opts: opts.clone(),
            sink,
        }))?;
        Ok(stream)
    }

    fn evaluate(&self, examples: Vec<Example>, opts: &TrainOptions) -> Result<f32> {
        opts.validate()?;
        if examples.is_empty() {
            return Err(Error::InvalidInput("no examples to evaluate".into()));
        }
        self.check_examples(&examples)?;
        self.tune(|reply| TuneJob::Evaluate {
            examples,
            opts: opts.clone(),
            reply,
        })
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        self.tune(|reply| TuneJob::Save {
            dir: dir.to_path_buf(),
            reply,
        })
    }

    fn parameter_counts(&self) -> Option<ParameterCounts> {
        self.shared.parameter_counts()
    }
}

impl MlxModel {
    /// Refuses examples with ids outside the vocabulary or nothing to
    /// predict.
    fn check_examples(&self, examples: &[Example]) -> Result<()> {
        let vocab = inference_core::TextModel::info(self).vocab_size;
        for (i, e) in examples.iter().enumerate() {
            if e.ids.len() < 2 {
                return Err(Error::InvalidInput(format!(
                    "example {i} has fewer than two tokens"
                )));
            }
            inference_runtime::check::ids_in_vocab(&e.ids, vocab)
                .map_err(|err| Error::InvalidInput(format!("example {i}: {err}")))?;
        }
        Ok(())
    }
}

//! Applying an mlx-lm LoRA adapter directory to a built model, and writing
//! one (`inference_formats::adapter` reads and writes its configuration).

use std::path::Path;

use inference_formats::adapter::{adapter_dir, adapter_file, AdapterConfig, ADAPTER_FILE};
use mlx_rs::Array;

use crate::error::{mlx_error, FormatError, LoadError};
use crate::load::weights::Weights;
use crate::models::lora::Lora;
use crate::models::CausalLm;
use crate::train::Adapted;

/// Reads the adapter at `path` (its directory, or a safetensors file in it:
/// `adapters.safetensors` or a checkpoint such as
/// `0000200_adapters.safetensors`, with the directory's
/// `adapter_config.json`) and puts it into `model`'s LoRA slots. Every tensor must be the `lora_a`
/// `[in, rank]` or `lora_b` `[rank, out]` of one of the model's linear
/// layers that the configuration covers, each adapted layer must have both,
/// and at least one must be there: otherwise the adapter was made for
/// another architecture or shape, and the error says which tensor is wrong.
/// Returns what was applied and the adapter's configuration (the slots stay
/// empty on an error).
pub fn apply(path: &Path, model: &dyn CausalLm) -> Result<(Adapted, AdapterConfig), LoadError> {
    let file = adapter_file(path);
    let dir = adapter_dir(path);
    let config = AdapterConfig::load(dir)?;
    let mut weights = Weights::load_files(std::slice::from_ref(&file))?;
    let wrong = |e: LoadError| -> LoadError {
        match e {
            LoadError::Format(
                f @ (FormatError::MissingTensor(_)
                | FormatError::UnexpectedTensor(_)
                | FormatError::WrongShape { .. }),
            ) => FormatError::Config(format!(
                "the adapter {} does not fit this model: {f}",
                file.display()
            ))
            .into(),
            other => other,
        }
    };
    let targets = model.lora_targets();
    let layers = targets.iter().map(|t| t.layer + 1).max().unwrap_or(0);
    let rank = i32::try_from(config.lora.rank)
        .map_err(|_| FormatError::Config(format!("adapter rank {}", config.lora.rank)))?;
    let mut adapted = Adapted {
        targets: Vec::new(),
        scale: config.lora.scale,
        dropout: config.lora.dropout,
    };
    let mut found = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let (a, b) = (
            format!("{}.lora_a", t.path()),
            format!("{}.lora_b", t.path()),
        );
        if !weights.contains(&a) && !weights.contains(&b) {
            continue;
        }
        if !config.covers(t.layer, layers, t.key) {
            return Err(FormatError::Config(format!(
                "the adapter {} has `{a}`, outside the layers and keys its adapter_config.json names",
                file.display()
            ))
            .into());
        }
        let la = weights.take(&a, &[t.input, rank]).map_err(wrong)?;
        let lb = weights.take(&b, &[rank, t.output]).map_err(wrong)?;
        adapted.targets.push(i);
        found.push((t.slot, la, lb));
    }
    weights.finish().map_err(wrong)?;
    if found.is_empty() {
        return Err(
            FormatError::Config(format!("the adapter {} has no tensors", file.display())).into(),
        );
    }
    for (slot, a, b) in found {
        slot.set(Some(Lora {
            a,
            b,
            scale: adapted.scale,
            dropout: adapted.dropout,
        }));
    }
    tracing::info!(
        adapter = %dir.display(),
        layers = adapted.targets.len(),
        rank,
        scale = adapted.scale,
        "LoRA adapter applied"
    );
    Ok((adapted, config))
}

/// Writes the adapters in `model`'s slots that `adapted` names to
/// `dir/adapters.safetensors` (under mlx-lm's names) and `config` to
/// `dir/adapter_config.json`, creating `dir`; each file atomically, so a
/// failure ([`inference_core::Error::Write`]) leaves what was there.
pub fn save(
    dir: &Path,
    model: &dyn CausalLm,
    adapted: &Adapted,
    config: &AdapterConfig,
) -> inference_core::Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| inference_core::Error::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let names = crate::train::adapter_names(model, adapted);
    let params = adapted.params(model).map_err(mlx_error)?;
    let tensors: Vec<(String, Array)> = names.iter().map(|n| n.to_string()).zip(params).collect();
    crate::save::write_safetensors(&dir.join(ADAPTER_FILE), &tensors, None)?;
    write_config(dir, config)
}

/// Writes `config` to `dir/adapter_config.json` (atomically; a failed write
/// is [`inference_core::Error::Write`]).
pub fn write_config(dir: &Path, config: &AdapterConfig) -> inference_core::Result<()> {
    config.save(dir).map(drop).map_err(|e| match e {
        inference_formats::LoadError::File { path, source } => {
            inference_core::Error::Write { path, source }
        }
        other => other.into_error(dir),
    })
}

//! Training checkpoints, written as mlx-lm writes them and read back to
//! resume: `NNNNNNN_adapters.safetensors` (the adapters after step
//! `NNNNNNN`, loadable by mlx-lm), a copy in `adapters.safetensors`, the
//! `adapter_config.json`, and `NNNNNNN_train_state.safetensors` with what an
//! exact continuation needs besides (the optimiser's moments, gradients
//! accumulated towards the next step, counters). Every file is written
//! atomically; a checkpoint counts only when both of its files are there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use inference_core::{Error, Result, TrainOptions};
use inference_formats::adapter::{AdapterConfig, ADAPTER_FILE};
use mlx_rs::Array;

use crate::error::mlx_error;
use crate::load::adapter;
use crate::load::weights::read_raw;
use crate::save::{serialise, write_file, write_safetensors};
use crate::train::Optimiser;

/// What the state file's `format` metadata says.
const FORMAT: &str = "inference-rs/train-state";
/// The version of its layout.
const VERSION: &str = "1";
/// The suffix of a checkpoint's adapter file.
const ADAPTERS_SUFFIX: &str = "_adapters.safetensors";
/// The suffix of a checkpoint's training state file.
const STATE_SUFFIX: &str = "_train_state.safetensors";

/// Where a run stands, besides the adapters and the optimiser.
#[derive(Debug, Default)]
pub struct RunState {
    /// Steps (batches) done.
    pub step: usize,
    /// Optimiser updates done.
    pub updates: usize,
    /// Tokens trained on.
    pub trained_tokens: u64,
    /// Gradients summed since the last update (with gradient accumulation).
    pub accumulated: Option<Vec<Array>>,
}

/// The adapter file of the checkpoint after `step` in `dir`.
pub fn adapters_file(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("{step:07}{ADAPTERS_SUFFIX}"))
}

/// The training state file beside the checkpoint adapter file `adapters`
/// (`None` when its name is not a checkpoint's).
pub fn state_file(adapters: &Path) -> Option<PathBuf> {
    let name = adapters.file_name()?.to_str()?;
    let step = name.strip_suffix(ADAPTERS_SUFFIX)?;
    Some(adapters.with_file_name(format!("{step}{STATE_SUFFIX}")))
}

/// Writes the checkpoint after `run.step` to `dir` (see the module's
/// documentation). `names[i]` is `params[i]`'s adapter tensor name.
#[allow(clippy::too_many_arguments)]
pub fn save(
    dir: &Path,
    names: &[Rc<str>],
    params: &[Array],
    optimiser: &Optimiser,
    run: &RunState,
    opts: &TrainOptions,
    config: &AdapterConfig,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let adapters: Vec<(String, Array)> = names
        .iter()
        .zip(params)
        .map(|(n, p)| (n.to_string(), p.clone()))
        .collect();
    let mut state = optimiser.state_tensors();
    if let Some(acc) = &run.accumulated {
        state.extend(
            names
                .iter()
                .zip(acc)
                .map(|(n, g)| (format!("accumulated.{n}"), g.clone())),
        );
    }
    let metadata = HashMap::from([
        ("format".to_owned(), FORMAT.to_owned()),
        ("version".to_owned(), VERSION.to_owned()),
        ("step".to_owned(), run.step.to_string()),
        ("updates".to_owned(), run.updates.to_string()),
        ("trained_tokens".to_owned(), run.trained_tokens.to_string()),
        ("optimizer".to_owned(), optimiser.kind().to_owned()),
        ("seed".to_owned(), opts.seed.to_string()),
        ("batch_size".to_owned(), opts.batch_size.to_string()),
        (
            "grad_accumulation".to_owned(),
            opts.grad_accumulation.to_string(),
        ),
    ]);
    let file = adapters_file(dir, run.step);
    let state_path = state_file(&file).unwrap_or_else(|| dir.join(STATE_SUFFIX));
    let adapter_bytes = serialise(&adapters, None)?;
    write_file(&file, &adapter_bytes)?;
    if let Err(e) = write_safetensors(&state_path, &state, Some(metadata)) {
        // Half a checkpoint is none.
        let _ = std::fs::remove_file(&file);
        return Err(e);
    }
    write_file(&dir.join(ADAPTER_FILE), &adapter_bytes)?;
    adapter::write_config(dir, config)?;
    tracing::info!(checkpoint = %file.display(), step = run.step, "checkpoint written");
    Ok(())
}

/// A checkpoint read back.
pub struct Resumed {
    /// The adapters, in the order of the names asked for.
    pub params: Vec<Array>,
    /// The optimiser's state tensors, when the state file was there.
    pub optimiser: Option<HashMap<String, Array>>,
    /// Where the run stood (`None`: no state file, start at step 1).
    pub run: Option<RunState>,
}

/// Reads the checkpoint `file` for adapters named `names`, shaped as
/// `current` (the adapters in place). A file that is missing, corrupt, of
/// other shapes or names, or a state file of another optimiser, is a typed
/// error; differing seeds, batch sizes or accumulation are allowed but
/// logged, as the continuation then differs from the uninterrupted run.
pub fn load(
    file: &Path,
    names: &[Rc<str>],
    current: &[Array],
    optimiser: &Optimiser,
    opts: &TrainOptions,
) -> Result<Resumed> {
    let bad = |reason: String| Error::invalid_option("resume", reason);
    let read = |path: &Path| -> Result<(HashMap<String, Array>, HashMap<String, String>)> {
        let (tensors, metadata) =
            read_raw(path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
        Ok((tensors.into_iter().collect(), metadata))
    };
    let (mut tensors, _) = read(file)?;
    let mut params = Vec::with_capacity(names.len());
    for (name, now) in names.iter().zip(current) {
        let p = tensors.remove(name.as_ref()).ok_or_else(|| {
            bad(format!(
                "{} has no `{name}`: it was made with other layers or keys",
                file.display()
            ))
        })?;
        if p.shape() != now.shape() {
            return Err(bad(format!(
                "`{name}` in {} has shape {:?}, the adapters {:?} (another rank?)",
                file.display(),
                p.shape(),
                now.shape()
            )));
        }
        params.push(p.as_dtype(now.dtype()).map_err(mlx_error)?);
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(bad(format!(
            "{} has `{extra}`, which the adapters do not: it was made with other layers or keys",
            file.display()
        )));
    }
    let Some(state_path) = state_file(file).filter(|p| p.exists()) else {
        tracing::warn!(
            checkpoint = %file.display(),
            "no training state beside the checkpoint: its adapters are the start, the optimiser starts afresh at step 1"
        );
        return Ok(Resumed {
            params,
            optimiser: None,
            run: None,
        });
    };
    let (mut state, meta) = read(&state_path)?;
    let field = |key: &str| -> Result<&str> {
        meta.get(key).map(String::as_str).ok_or_else(|| {
            bad(format!(
                "{} has no `{key}` in its metadata",
                state_path.display()
            ))
        })
    };
    let number = |key: &str| -> Result<u64> {
        field(key)?.parse().map_err(|_| {
            bad(format!(
                "`{key}` in {} is not a number",
                state_path.display()
            ))
        })
    };
    if field("format")? != FORMAT || field("version")? != VERSION {
        return Err(bad(format!(
            "{} is not a training state this version reads",
            state_path.display()
        )));
    }
    if field("optimizer")? != optimiser.kind() {
        return Err(bad(format!(
            "the checkpoint was trained with {}, this run uses {}",
            field("optimizer")?,
            optimiser.kind()
        )));
    }
    for (key, now) in [
        ("seed", opts.seed),
        ("batch_size", opts.batch_size as u64),
        ("grad_accumulation", opts.grad_accumulation as u64),
    ] {
        let then = number(key)?;
        if then != now {
            tracing::warn!(
                option = key,
                checkpoint = then,
                now,
                "resuming with another value: the run differs from an uninterrupted one"
            );
        }
    }
    let step = number("step")? as usize;
    if step >= opts.iters {
        return Err(bad(format!(
            "the checkpoint is at step {step}, not before the run's last ({})",
            opts.iters
        )));
    }
    let mut accumulated = Vec::new();
    for (name, now) in names.iter().zip(current) {
        match state.remove(&format!("accumulated.{name}")) {
            Some(g) if g.shape() == now.shape() => accumulated.push(g),
            Some(_) => return Err(bad(format!("accumulated `{name}` has the wrong shape"))),
            None => break,
        }
    }
    let accumulated = match accumulated.len() {
        0 => None,
        n if n == names.len() => Some(accumulated),
        _ => return Err(bad("partly accumulated gradients are incomplete".into())),
    };
    Ok(Resumed {
        params,
        optimiser: Some(state),
        run: Some(RunState {
            step,
            updates: number("updates")? as usize,
            trained_tokens: number("trained_tokens")?,
            accumulated,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_follow_mlx_lm() {
        let dir = Path::new("out");
        let file = adapters_file(dir, 300);
        assert_eq!(file, Path::new("out/0000300_adapters.safetensors"));
        assert_eq!(
            state_file(&file).unwrap(),
            Path::new("out/0000300_train_state.safetensors")
        );
        assert_eq!(state_file(Path::new("out/adapters.safetensors")), None);
    }
}

//! Finding the model, picking the backend and loading, with progress on
//! stderr.

use std::ffi::OsString;
use std::fs;
use std::io::{self, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use inference_core::{LoadOptions, TextModel};

use crate::args::ModelArgs;
use crate::defaults::DEFAULT_MODEL_FILE;
use crate::error::CliError;

/// The environment variable naming the model when `--model` is absent.
pub const MODEL_ENV: &str = "INFER_MODEL";

/// A loaded model and what it runs on.
pub struct Loaded {
    /// The model.
    pub model: Box<dyn TextModel>,
    /// The backend's name.
    pub backend: String,
    /// The device the model runs on, e.g. `cpu` or `cuda:0`.
    pub device: String,
}

/// The model path: `explicit` (`--model`), else `$INFER_MODEL`, else the
/// default model in `.cache/models` of the nearest ancestor of the current
/// directory that has it, else of the binary's directory.
pub fn resolve_model(explicit: Option<&Path>) -> Result<(PathBuf, &'static str), CliError> {
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        roots.push(dir);
    }
    find_model(explicit, std::env::var_os(MODEL_ENV), &roots)
}

/// [`resolve_model`] with its inputs given: the path and where it came from.
pub fn find_model(
    explicit: Option<&Path>,
    env: Option<OsString>,
    roots: &[PathBuf],
) -> Result<(PathBuf, &'static str), CliError> {
    if let Some(path) = explicit {
        return Ok((path.to_path_buf(), "--model"));
    }
    if let Some(path) = env.filter(|v| !v.is_empty()) {
        return Ok((PathBuf::from(path), "$INFER_MODEL"));
    }
    roots
        .iter()
        .flat_map(|root| root.ancestors())
        .map(|dir| dir.join(".cache").join("models").join(DEFAULT_MODEL_FILE))
        .find(|candidate| candidate.is_file())
        .map(|path| (path, "the default model"))
        .ok_or(CliError::NoDefaultModel)
}

/// Resolves the model and the backend and loads the model; progress bars on
/// stderr unless `quiet` (or stderr is not a terminal).
pub fn load(args: &ModelArgs, opts: LoadOptions, quiet: bool) -> Result<Loaded, CliError> {
    // Usage errors first: an unknown backend name is a bad flag value.
    let named = match &args.backend {
        Some(name) => Some(inference_core::get(name)?),
        None => None,
    };
    let (path, origin) = resolve_model(args.model.as_deref())?;
    if !path.exists() {
        return Err(CliError::ModelNotFound { path, origin });
    }
    // Without --backend, the backend of highest priority that can load
    // this path (llama.cpp for GGUF files where MLX runs on the CPU).
    let backend = match named {
        Some(b) => b,
        None => inference_core::backend_for(&path)?,
    };
    tracing::info!(path = %path.display(), origin, backend = backend.name(), "model chosen");
    let opts = opts.backend(backend.name());
    let device = if opts.gpu_layers == 0 {
        "cpu".to_owned()
    } else {
        backend.device()
    };
    let show = !quiet && io::stderr().is_terminal();
    if show {
        warm_up(&path);
    }
    let spinner = if show {
        let s = ProgressBar::new_spinner().with_message(format!(
            "loading {} on {} ({device})",
            display_name(&path),
            backend.name()
        ));
        s.enable_steady_tick(Duration::from_millis(100));
        Some(s)
    } else {
        None
    };
    let model = inference_core::load_model(&path, &opts);
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let model = model?;
    let info = model.info();
    if info.world_size > 1 {
        tracing::info!(rank = info.rank, ranks = info.world_size, "tensor parallel");
        if info.rank > 0 {
            // Rank 0 prints; the others compute alongside it.
            crate::output::silence();
        }
    }
    Ok(Loaded {
        model,
        backend: backend.name().to_owned(),
        device,
    })
}

/// The file or directory name of a model path.
pub fn display_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The weight files of a model, with their sizes: the file itself (a GGUF
/// file, or the one a directory holds), or the safetensors files a directory
/// loads ([`inference_formats::safetensors_files`]). Empty when there are none.
pub fn weight_files(path: &Path) -> Vec<(PathBuf, u64)> {
    let path = inference_formats::resolve_model_path(path).unwrap_or_else(|_| path.to_path_buf());
    let files: Vec<PathBuf> = if path.is_file() {
        vec![path]
    } else {
        inference_formats::safetensors_files(&path).unwrap_or_default()
    };
    files
        .into_iter()
        .filter_map(|f| fs::metadata(&f).ok().map(|m| (f, m.len())))
        .collect()
}

/// Reads the weight files once with a progress bar in bytes.
///
/// The library's `load_model` has no progress hook, so the bar measures this
/// read instead: it brings the weights into the page cache, and the load that
/// follows (which maps or reads the same files) then runs from memory. A file
/// that cannot be read is skipped here; the load reports it.
fn warm_up(path: &Path) {
    let files = weight_files(path);
    let total: u64 = files.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return;
    }
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta})",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::new(total)
        .with_style(style)
        .with_message("reading weights");
    let mut buf = vec![0u8; 1 << 20];
    for (file, _) in &files {
        let Ok(mut f) = fs::File::open(file) else {
            continue;
        };
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => bar.inc(n as u64),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    }
    bar.finish_and_clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_then_env_then_nearest_default() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let models = root.join(".cache/models");
        fs::create_dir_all(&models).unwrap();
        let default = models.join(DEFAULT_MODEL_FILE);
        fs::write(&default, b"gguf").unwrap();
        let deep = root.join("a/b/c");
        fs::create_dir_all(&deep).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();

        let (p, origin) = find_model(
            Some(Path::new("/x/m")),
            Some("/env/m".into()),
            std::slice::from_ref(&deep),
        )
        .unwrap();
        assert_eq!((p.as_path(), origin), (Path::new("/x/m"), "--model"));

        let (p, origin) =
            find_model(None, Some("/env/m".into()), std::slice::from_ref(&deep)).unwrap();
        assert_eq!((p.as_path(), origin), (Path::new("/env/m"), "$INFER_MODEL"));

        // An empty variable counts as unset; the nearest ancestor's cache wins,
        // and the first root that has one wins over later roots.
        let (p, _) = find_model(
            None,
            Some("".into()),
            &[elsewhere.path().to_path_buf(), deep.clone()],
        )
        .unwrap();
        assert_eq!(p, default);

        assert!(matches!(
            find_model(None, None, &[elsewhere.path().to_path_buf()]),
            Err(CliError::NoDefaultModel)
        ));
    }

    #[test]
    fn weight_files_of_a_directory_and_of_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("model-00002-of-00002.safetensors"), [0u8; 3]).unwrap();
        fs::write(dir.join("model-00001-of-00002.safetensors"), [0u8; 5]).unwrap();
        // Not weights of the model: not read.
        fs::write(dir.join("adapters.safetensors"), [0u8; 7]).unwrap();
        fs::write(dir.join("config.json"), b"{}").unwrap();
        let files = weight_files(dir);
        assert_eq!(
            files,
            vec![
                (dir.join("model-00001-of-00002.safetensors"), 5),
                (dir.join("model-00002-of-00002.safetensors"), 3)
            ]
        );
        assert_eq!(weight_files(&dir.join("config.json")), files);
        assert_eq!(
            weight_files(&dir.join("adapters.safetensors")),
            vec![(dir.join("adapters.safetensors"), 7)]
        );
        assert!(weight_files(&dir.join("missing")).is_empty());
    }
}

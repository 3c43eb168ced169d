//! Finding models on disk.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use inference_core::{Error, Result};
use serde::Serialize;

use crate::error::LoadError;
use crate::gguf::{GgufFile, GgufFileType};

/// How a discovered model is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// A Hugging Face directory: `config.json` and `*.safetensors`.
    Safetensors,
    /// A single GGUF file.
    Gguf,
}

/// A model found by [`discover`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DiscoveredModel {
    /// The model directory (safetensors) or file (GGUF).
    pub path: PathBuf,
    /// How it is stored.
    pub format: ModelFormat,
    /// `model_type` from `config.json`, or `general.architecture` from GGUF
    /// metadata; `unknown` when it cannot be read.
    pub model_type: String,
    /// How the weights are stored: the checkpoint's dtype from `config.json`
    /// (`bfloat16`, …), or a GGUF file's type from `general.file_type`
    /// (`Q4_1`, `Q4_K_M`, `F16`, …); `None` when it cannot be read.
    pub stored_dtype: Option<String>,
    /// The quantisation scheme, when quantised: `affine` (MLX) or the GGUF
    /// file type (`Q4_1`, …).
    pub quant_type: Option<String>,
    /// Quantisation bits (nominal for GGUF's mixed K-quant types), when
    /// quantised.
    pub quant_bits: Option<u32>,
    /// Quantisation group size (for GGUF K-quants, the sub-block), when
    /// quantised.
    pub quant_group: Option<u32>,
    /// Number of weight files (as [`safetensors_files`] chooses them, or 1 for
    /// GGUF).
    pub num_files: usize,
}

/// Why a directory's weight files cannot be listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WeightFilesError {
    /// The directory (or the index) cannot be read.
    #[error("{path}: {reason}")]
    Unreadable {
        /// What could not be read.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// `model.safetensors.index.json` is not a valid index.
    #[error("{file} is not a valid safetensors index: {reason}")]
    BadIndex {
        /// The index file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A shard the index lists is missing.
    #[error("{file} (listed in the index) is missing")]
    MissingShard {
        /// The missing shard.
        file: PathBuf,
    },
    /// No weight files.
    #[error("no model*.safetensors files (and no model.safetensors.index.json) in {dir}")]
    NoWeights {
        /// The directory.
        dir: PathBuf,
    },
}

impl From<WeightFilesError> for LoadError {
    /// A bad index is corrupt weights (naming the index); the rest are I/O.
    fn from(e: WeightFilesError) -> Self {
        use WeightFilesError as E;
        match e {
            E::BadIndex { file, reason } => LoadError::CorruptWeights {
                file: file.display().to_string(),
                reason,
            },
            other => LoadError::Io(other.to_string()),
        }
    }
}

/// The safetensors weight files of a Hugging Face directory, chosen as
/// transformers and mlx-lm choose them: the shards that
/// `model.safetensors.index.json` lists when it is there, else every
/// `model*.safetensors` file (`model.safetensors`, or unindexed shards
/// `model-00001-of-00002.safetensors`, …), sorted. Other tensor files beside
/// them (`adapters.safetensors`, `consolidated.safetensors`, …) are not
/// weights of the model and are left alone.
pub fn safetensors_files(dir: &Path) -> std::result::Result<Vec<PathBuf>, WeightFilesError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = fs::read_to_string(&index).map_err(|e| WeightFilesError::Unreadable {
            path: index.clone(),
            reason: e.to_string(),
        })?;
        let bad = |reason: String| WeightFilesError::BadIndex {
            file: index.clone(),
            reason,
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let mut names = std::collections::BTreeSet::new();
        for (tensor, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("the file of `{tensor}` is not a string")))?;
            // A shard name is a file beside the index, never a path elsewhere.
            if file.is_empty() || file.contains(['/', '\\']) || file == ".." {
                return Err(bad(format!("`{file}` is not a file name")));
            }
            names.insert(file);
        }
        if names.is_empty() {
            return Err(bad("`weight_map` is empty".into()));
        }
        let files: Vec<PathBuf> = names.into_iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(WeightFilesError::MissingShard {
                file: missing.clone(),
            });
        }
        return Ok(files);
    }
    let entries = read_dir_sorted(dir).map_err(|e| WeightFilesError::Unreadable {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let files: Vec<PathBuf> = entries.into_iter().filter(|p| is_model_shard(p)).collect();
    if files.is_empty() {
        return Err(WeightFilesError::NoWeights {
            dir: dir.to_path_buf(),
        });
    }
    Ok(files)
}

/// `model*.safetensors`, a file.
fn is_model_shard(p: &Path) -> bool {
    has_ext(p, "safetensors")
        && p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("model"))
}

/// Where a model path given by a user leads: a `config.json` file means its
/// directory; a directory without `config.json` that holds exactly one
/// `.gguf` file means that file. Everything else is returned as given (the
/// backend reports what is wrong with it).
///
/// Refused: a directory holding several `.gguf` files (which one is
/// ambiguous), and split GGUF files (`…-00001-of-00003.gguf`), which no
/// backend here loads, with [`Error::Unsupported`] naming the way to merge
/// them.
pub fn resolve_model_path(path: &Path) -> Result<PathBuf> {
    if path.is_file() && path.file_name().and_then(|n| n.to_str()) == Some("config.json") {
        return Ok(path.parent().unwrap_or(Path::new(".")).to_path_buf());
    }
    if path.is_dir() && !path.join("config.json").exists() {
        let ggufs: Vec<PathBuf> = read_dir_sorted(path)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| has_ext(p, "gguf"))
            .collect();
        match ggufs.as_slice() {
            [] => {}
            [one] => return check_not_split(one).map(|()| one.clone()),
            several => {
                if let Some(first) = several.iter().find(|p| split_part(p).is_some()) {
                    check_not_split(first)?;
                }
                let names: Vec<String> = several
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect();
                return Err(Error::ModelLoad {
                    path: path.to_path_buf(),
                    source: format!(
                        "the directory has no config.json and holds {} .gguf files ({}): name one",
                        several.len(),
                        names.join(", ")
                    )
                    .into(),
                });
            }
        }
    }
    if has_ext(path, "gguf") {
        check_not_split(path)?;
    }
    Ok(path.to_path_buf())
}

/// `(part, parts)` of a split GGUF file name (`…-00001-of-00003.gguf`).
fn split_part(path: &Path) -> Option<(u32, u32)> {
    let stem = path.file_stem()?.to_str()?;
    let (rest, total) = stem.rsplit_once("-of-")?;
    let (_, part) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(part) || !digits(total) {
        return None;
    }
    Some((part.parse().ok()?, total.parse().ok()?))
}

/// Refuses one part of a split GGUF model (by its file name).
fn check_not_split(path: &Path) -> Result<()> {
    match split_part(path) {
        Some((_, total)) if total > 1 => Err(split_error(path, total)),
        _ => Ok(()),
    }
}

/// Refuses a GGUF file whose metadata says it is one part of a split model.
pub fn check_gguf_not_split(file: &crate::gguf::GgufFile, path: &Path) -> Result<()> {
    match file.get_u64("split.count") {
        Some(total) if total > 1 => Err(split_error(path, total)),
        _ => Ok(()),
    }
}

fn split_error(path: &Path, total: impl std::fmt::Display) -> Error {
    Error::unsupported(format!(
        "split GGUF files ({} is one of {total} parts): merge them into one file with \
         llama.cpp's `llama-gguf-split --merge FIRST-PART OUT.gguf`",
        path.display()
    ))
}

/// The `model_type` given to models whose type cannot be read.
pub const UNKNOWN_MODEL_TYPE: &str = "unknown";

/// Finds models in `dir` itself and one level below it: Hugging Face
/// directories (a `config.json` beside the weight files that
/// [`safetensors_files`] chooses) and
/// `*.gguf` files. Results are sorted by path. A `config.json` that is not valid
/// JSON keeps its entry, with model type [`UNKNOWN_MODEL_TYPE`].
///
/// Fails only when `dir` itself cannot be read; unreadable subdirectories are
/// skipped with a `tracing` warning.
pub fn discover(dir: impl AsRef<Path>) -> Result<Vec<DiscoveredModel>> {
    let dir = dir.as_ref();
    let entries = read_dir_sorted(dir).map_err(|e| {
        Error::InvalidInput(format!(
            "cannot read model directory {}: {e}",
            dir.display()
        ))
    })?;
    let mut found = Vec::new();
    scan_one(dir, &entries, &mut found);
    for sub in entries.iter().filter(|p| p.is_dir()) {
        match read_dir_sorted(sub) {
            Ok(children) => scan_one(sub, &children, &mut found),
            Err(e) => {
                tracing::warn!(dir = %sub.display(), error = %e, "skipping unreadable directory")
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(found)
}

fn read_dir_sorted(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

fn has_ext(p: &Path, ext: &str) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case(ext)) && p.is_file()
}

/// Adds the models stored directly in `dir` (whose entries are `entries`).
fn scan_one(dir: &Path, entries: &[PathBuf], found: &mut Vec<DiscoveredModel>) {
    let config = dir.join("config.json");
    if config.is_file() {
        if let Ok(weights) = safetensors_files(dir) {
            let mut model = read_config(&config);
            model.path = dir.to_path_buf();
            model.num_files = weights.len();
            found.push(model);
        }
    }
    for gguf in entries.iter().filter(|p| has_ext(p, "gguf")) {
        let (arch, file_type) = gguf_summary(gguf).unwrap_or((None, None));
        let ty = file_type.and_then(GgufFileType::from_id);
        found.push(DiscoveredModel {
            path: gguf.clone(),
            format: ModelFormat::Gguf,
            model_type: arch.unwrap_or_else(|| UNKNOWN_MODEL_TYPE.to_owned()),
            stored_dtype: ty.map(|t| t.name.to_owned()),
            quant_type: ty
                .filter(GgufFileType::is_quantized)
                .map(|t| t.name.to_owned()),
            quant_bits: ty.and_then(|t| t.bits),
            quant_group: ty.and_then(|t| t.group),
            num_files: 1,
        });
    }
}

/// What a `config.json` says of a Hugging Face model; unknown when invalid.
fn read_config(path: &Path) -> DiscoveredModel {
    let mut model = DiscoveredModel {
        path: PathBuf::new(),
        format: ModelFormat::Safetensors,
        model_type: UNKNOWN_MODEL_TYPE.to_owned(),
        stored_dtype: None,
        quant_type: None,
        quant_bits: None,
        quant_group: None,
        num_files: 0,
    };
    let parsed: Option<serde_json::Value> = fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    let Some(v) = parsed else {
        tracing::warn!(path = %path.display(), "config.json is not valid JSON");
        return model;
    };
    let text = v.get("text_config").filter(|t| t.is_object());
    let get = |key: &str| v.get(key).or_else(|| text.and_then(|t| t.get(key)));
    if let Some(t) = get("model_type").and_then(|t| t.as_str()) {
        t.clone_into(&mut model.model_type);
    }
    model.stored_dtype = get("dtype")
        .or_else(|| get("torch_dtype"))
        .and_then(|d| d.as_str())
        .map(str::to_owned);
    let quant = get("quantization").or_else(|| get("quantization_config"));
    let field = |name: &str| {
        quant
            .and_then(|q| q.get(name))
            .and_then(|x| x.as_u64())
            .and_then(|x| u32::try_from(x).ok())
    };
    model.quant_bits = field("bits");
    model.quant_group = field("group_size");
    if quant.is_some() {
        let mode = quant
            .and_then(|q| q.get("mode").or_else(|| q.get("quant_method")))
            .and_then(|m| m.as_str())
            .unwrap_or("affine");
        model.quant_type = Some(mode.to_owned());
    }
    model
}

/// Reads `general.architecture` and `general.file_type` from a GGUF file's
/// metadata. `None` when the file is not a GGUF file [`GgufFile::open`]
/// reads.
fn gguf_summary(path: &Path) -> Option<(Option<String>, Option<u32>)> {
    let file = match GgufFile::open(path) {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "not a readable GGUF file");
            return None;
        }
    };
    let arch = file.get_str("general.architecture").map(str::to_owned);
    let file_type = file
        .get_u64("general.file_type")
        .and_then(|t| u32::try_from(t).ok());
    Some((arch, file_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GGUF_U32: u32 = 4;
    const GGUF_STRING: u32 = 8;
    const GGUF_ARRAY: u32 = 9;

    fn gguf_bytes(arch: &str) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes()); // tensors
        b.extend(4u64.to_le_bytes()); // kv pairs
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        s(&mut b, "general.alignment");
        b.extend(4u32.to_le_bytes());
        b.extend(32u32.to_le_bytes());
        s(&mut b, "general.tags");
        b.extend(GGUF_ARRAY.to_le_bytes());
        b.extend(GGUF_STRING.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        s(&mut b, "a");
        s(&mut b, "bc");
        s(&mut b, "general.architecture");
        b.extend(GGUF_STRING.to_le_bytes());
        s(&mut b, arch);
        s(&mut b, "general.file_type");
        b.extend(GGUF_U32.to_le_bytes());
        b.extend(3u32.to_le_bytes()); // Q4_1
        b
    }

    #[test]
    fn finds_hf_dirs_and_gguf_files_one_level_deep() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // The directory itself is a model.
        fs::write(
            root.join("config.json"),
            r#"{"model_type":"llama","torch_dtype":"bfloat16"}"#,
        )
        .unwrap();
        fs::write(root.join("model.safetensors"), b"").unwrap();
        // Tensor files that are not the model's weights are not counted.
        fs::write(root.join("adapters.safetensors"), b"").unwrap();
        fs::write(root.join("consolidated.safetensors"), b"").unwrap();
        // A quantised one below it, with two shards.
        let q = root.join("qwen-4bit");
        fs::create_dir(&q).unwrap();
        fs::write(
            q.join("config.json"),
            r#"{"model_type":"qwen3","quantization":{"group_size":64,"bits":4}}"#,
        )
        .unwrap();
        fs::write(q.join("model-00001-of-00002.safetensors"), b"").unwrap();
        fs::write(q.join("model-00002-of-00002.safetensors"), b"").unwrap();
        // Invalid JSON keeps the entry.
        let bad = root.join("broken");
        fs::create_dir(&bad).unwrap();
        fs::write(bad.join("config.json"), "{not json").unwrap();
        fs::write(bad.join("model.safetensors"), b"").unwrap();
        // No weights: not a model.
        let empty = root.join("no-weights");
        fs::create_dir(&empty).unwrap();
        fs::write(empty.join("config.json"), "{}").unwrap();
        // Too deep: not found.
        let deep = q.join("nested");
        fs::create_dir(&deep).unwrap();
        fs::write(deep.join("config.json"), r#"{"model_type":"gemma3"}"#).unwrap();
        fs::write(deep.join("model.safetensors"), b"").unwrap();
        // GGUF files, readable or not.
        fs::write(root.join("smol.gguf"), gguf_bytes("llama")).unwrap();
        fs::write(q.join("junk.gguf"), b"not gguf").unwrap();

        let found = discover(root).unwrap();
        type Row<'a> = (
            String,
            ModelFormat,
            &'a str,
            Option<u32>,
            Option<u32>,
            usize,
        );
        let summary: Vec<Row> = found
            .iter()
            .map(|m| {
                (
                    m.path.strip_prefix(root).unwrap().display().to_string(),
                    m.format,
                    m.model_type.as_str(),
                    m.quant_bits,
                    m.quant_group,
                    m.num_files,
                )
            })
            .collect();
        let types: Vec<(Option<&str>, Option<&str>)> = found
            .iter()
            .map(|m| (m.stored_dtype.as_deref(), m.quant_type.as_deref()))
            .collect();
        assert_eq!(
            types,
            vec![
                (Some("bfloat16"), None),
                (None, None),
                (None, Some("affine")),
                (None, None),
                (Some("Q4_1"), Some("Q4_1")),
            ]
        );
        assert_eq!(
            summary,
            vec![
                ("".into(), ModelFormat::Safetensors, "llama", None, None, 1),
                (
                    "broken".into(),
                    ModelFormat::Safetensors,
                    "unknown",
                    None,
                    None,
                    1
                ),
                (
                    "qwen-4bit".into(),
                    ModelFormat::Safetensors,
                    "qwen3",
                    Some(4),
                    Some(64),
                    2
                ),
                (
                    "qwen-4bit/junk.gguf".into(),
                    ModelFormat::Gguf,
                    "unknown",
                    None,
                    None,
                    1
                ),
                (
                    "smol.gguf".into(),
                    ModelFormat::Gguf,
                    "llama",
                    Some(4),
                    Some(32),
                    1
                ),
            ]
        );
    }

    #[test]
    fn weight_files_follow_the_index_or_the_model_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for f in ["model.safetensors", "adapters.safetensors", "x.safetensors"] {
            fs::write(dir.join(f), b"").unwrap();
        }
        assert_eq!(
            safetensors_files(dir).unwrap(),
            vec![dir.join("model.safetensors")]
        );
        // Unindexed shards.
        fs::remove_file(dir.join("model.safetensors")).unwrap();
        for f in [
            "model-00002-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
        ] {
            fs::write(dir.join(f), b"").unwrap();
        }
        assert_eq!(
            safetensors_files(dir).unwrap(),
            vec![
                dir.join("model-00001-of-00002.safetensors"),
                dir.join("model-00002-of-00002.safetensors")
            ]
        );
        // The index wins, and names what it needs.
        let index = dir.join("model.safetensors.index.json");
        fs::write(
            &index,
            r#"{"weight_map": {"a": "x.safetensors", "b": "x.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(
            safetensors_files(dir).unwrap(),
            vec![dir.join("x.safetensors")]
        );
        fs::write(&index, r#"{"weight_map": {"a": "gone.safetensors"}}"#).unwrap();
        assert!(matches!(
            safetensors_files(dir),
            Err(WeightFilesError::MissingShard { .. })
        ));
        for bad in [
            "{not json",
            "{}",
            r#"{"weight_map": {}}"#,
            r#"{"weight_map": {"a": 3}}"#,
            r#"{"weight_map": {"a": "../elsewhere.safetensors"}}"#,
        ] {
            fs::write(&index, bad).unwrap();
            assert!(
                matches!(
                    safetensors_files(dir),
                    Err(WeightFilesError::BadIndex { .. })
                ),
                "{bad}"
            );
        }
        let empty = tempfile::tempdir().unwrap();
        fs::write(empty.path().join("adapters.safetensors"), b"").unwrap();
        let e = safetensors_files(empty.path()).unwrap_err();
        assert!(matches!(e, WeightFilesError::NoWeights { .. }));
        assert!(e.to_string().contains("model*.safetensors"), "{e}");
    }

    #[test]
    fn model_paths_resolve_to_the_model() {
        let tmp = tempfile::tempdir().unwrap();
        let hf = tmp.path().join("hf");
        fs::create_dir(&hf).unwrap();
        fs::write(hf.join("config.json"), "{}").unwrap();
        assert_eq!(resolve_model_path(&hf.join("config.json")).unwrap(), hf);
        assert_eq!(resolve_model_path(&hf).unwrap(), hf);
        // A directory with one GGUF file and no config.json.
        let one = tmp.path().join("one");
        fs::create_dir(&one).unwrap();
        fs::write(one.join("m.gguf"), b"GGUF").unwrap();
        assert_eq!(resolve_model_path(&one).unwrap(), one.join("m.gguf"));
        // Several: ambiguous, and the error names them.
        fs::write(one.join("n.gguf"), b"GGUF").unwrap();
        let e = resolve_model_path(&one).unwrap_err().to_string();
        assert!(e.contains("m.gguf") && e.contains("n.gguf"), "{e}");
        // Split files are refused, alone or in a directory.
        let split = tmp.path().join("split");
        fs::create_dir(&split).unwrap();
        for part in ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"] {
            fs::write(split.join(part), b"GGUF").unwrap();
        }
        for p in [split.clone(), split.join("m-00001-of-00002.gguf")] {
            let e = resolve_model_path(&p).unwrap_err();
            assert!(matches!(e, Error::Unsupported { .. }), "{e}");
            assert!(e.to_string().contains("llama-gguf-split"), "{e}");
        }
        // A single-part "split" is an ordinary file; missing paths pass through.
        let single = tmp.path().join("s-00001-of-00001.gguf");
        fs::write(&single, b"GGUF").unwrap();
        assert_eq!(resolve_model_path(&single).unwrap(), single);
        let missing = tmp.path().join("missing");
        assert_eq!(resolve_model_path(&missing).unwrap(), missing);
    }

    #[test]
    fn missing_dir_is_an_error() {
        let err = discover("/definitely/not/here").unwrap_err();
        assert!(err.to_string().contains("/definitely/not/here"), "{err}");
    }
}

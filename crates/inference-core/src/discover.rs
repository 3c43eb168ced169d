//! Finding models on disk.

use std::fs;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

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
    /// Quantisation bits from `config.json`, when quantised.
    pub quant_bits: Option<u32>,
    /// Quantisation group size from `config.json`, when quantised.
    pub quant_group: Option<u32>,
    /// Number of weight files (`*.safetensors`, or 1 for GGUF).
    pub num_files: usize,
}

/// The `model_type` given to models whose type cannot be read.
pub const UNKNOWN_MODEL_TYPE: &str = "unknown";

/// Finds models in `dir` itself and one level below it: Hugging Face
/// directories (a `config.json` beside at least one `*.safetensors`) and
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
    let weights = entries.iter().filter(|p| has_ext(p, "safetensors")).count();
    let config = dir.join("config.json");
    if weights > 0 && config.is_file() {
        let (model_type, quant_bits, quant_group) = read_config(&config);
        found.push(DiscoveredModel {
            path: dir.to_path_buf(),
            format: ModelFormat::Safetensors,
            model_type,
            quant_bits,
            quant_group,
            num_files: weights,
        });
    }
    for gguf in entries.iter().filter(|p| has_ext(p, "gguf")) {
        let model_type = gguf_architecture(gguf).unwrap_or_else(|| UNKNOWN_MODEL_TYPE.to_owned());
        found.push(DiscoveredModel {
            path: gguf.clone(),
            format: ModelFormat::Gguf,
            model_type,
            quant_bits: None,
            quant_group: None,
            num_files: 1,
        });
    }
}

/// `model_type` and quantisation from a `config.json`; unknown when invalid.
fn read_config(path: &Path) -> (String, Option<u32>, Option<u32>) {
    let parsed: Option<serde_json::Value> = fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    let Some(v) = parsed else {
        tracing::warn!(path = %path.display(), "config.json is not valid JSON");
        return (UNKNOWN_MODEL_TYPE.to_owned(), None, None);
    };
    let model_type = v
        .get("model_type")
        .and_then(|t| t.as_str())
        .unwrap_or(UNKNOWN_MODEL_TYPE)
        .to_owned();
    let quant = v
        .get("quantization")
        .or_else(|| v.get("quantization_config"));
    let field = |name: &str| {
        quant
            .and_then(|q| q.get(name))
            .and_then(|x| x.as_u64())
            .and_then(|x| u32::try_from(x).ok())
    };
    (model_type, field("bits"), field("group_size"))
}

/// Reads `general.architecture` from a GGUF file's metadata, scanning at most
/// the first few keys (it is normally the first). `None` when the file is not
/// GGUF v2/v3 or the key is not found early.
fn gguf_architecture(path: &Path) -> Option<String> {
    let mut r = BufReader::new(fs::File::open(path).ok()?);
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).ok()?;
    if &magic != b"GGUF" {
        return None;
    }
    let version = read_u32(&mut r)?;
    if !(2..=3).contains(&version) {
        return None;
    }
    let _tensors = read_u64(&mut r)?;
    let kv_count = read_u64(&mut r)?;
    for _ in 0..kv_count.min(32) {
        let key = read_string(&mut r)?;
        let ty = read_u32(&mut r)?;
        if key == "general.architecture" && ty == GGUF_STRING {
            return read_string(&mut r);
        }
        skip_value(&mut r, ty)?;
    }
    None
}

const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;

fn read_u32(r: &mut impl Read) -> Option<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).ok()?;
    Some(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> Option<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).ok()?;
    Some(u64::from_le_bytes(b))
}

fn skip(r: &mut impl Read, n: u64) -> Option<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink()).ok()?;
    (copied == n).then_some(())
}

fn read_string(r: &mut impl Read) -> Option<String> {
    let len = read_u64(r)?;
    if len > 1 << 20 {
        return None;
    }
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    r.read_exact(&mut buf).ok()?;
    String::from_utf8(buf).ok()
}

/// Size in bytes of a scalar GGUF value type.
fn scalar_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => return None,
    })
}

fn skip_value(r: &mut impl Read, ty: u32) -> Option<()> {
    match ty {
        GGUF_STRING => {
            let len = read_u64(r)?;
            skip(r, len)
        }
        GGUF_ARRAY => {
            let item = read_u32(r)?;
            let count = read_u64(r)?;
            match scalar_size(item) {
                Some(size) => skip(r, size.checked_mul(count)?),
                None => (0..count).try_for_each(|_| skip_value(r, item)),
            }
        }
        other => skip(r, scalar_size(other)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gguf_bytes(arch: &str) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes()); // tensors
        b.extend(3u64.to_le_bytes()); // kv pairs
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
        b
    }

    #[test]
    fn finds_hf_dirs_and_gguf_files_one_level_deep() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // The directory itself is a model.
        fs::write(root.join("config.json"), r#"{"model_type":"llama"}"#).unwrap();
        fs::write(root.join("model.safetensors"), b"").unwrap();
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
                    None,
                    None,
                    1
                ),
            ]
        );
    }

    #[test]
    fn missing_dir_is_an_error() {
        let err = discover("/definitely/not/here").unwrap_err();
        assert!(err.to_string().contains("/definitely/not/here"), "{err}");
    }
}

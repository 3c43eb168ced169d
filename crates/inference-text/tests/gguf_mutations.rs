//! GGUF files are input from anywhere: a file whose header, metadata or
//! tensor table is damaged at random must give a typed error or a model,
//! never a panic, wherever the damage lands. Each fixture (Qwen3's and
//! Qwen2's; the Llama and Gemma fixtures' SentencePiece vocabularies are
//! ones the export refuses) is exported as a GGUF
//! file here (the tensors of its safetensors as F16), then opened again
//! after random changes to the bytes before its tensor data: the reader,
//! the configuration and tensor conversion a backend runs, the tokenizer
//! built from the metadata, and an encoding with it.
//! `INFER_TEST_FUZZ_SEED` and `INFER_TEST_FUZZ_FILES` (300 per fixture) run
//! other and longer series.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use inference_formats::gguf::from_hf::{gguf_name, model_metadata, tokenizer_metadata};
use inference_formats::gguf::hf::{self, HfTensor};
use inference_formats::gguf::writer::{encode_f16, write_gguf, TensorOut};
use inference_formats::gguf::{GgmlType, GgufFile};
use inference_formats::LoadError;
use inference_text::ModelTokenizer;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The fixture `name` as a GGUF file at `out`, F16. (Llama's fixture
/// scales RoPE as the export does not write: the file says no scaling,
/// which does not matter to a file read back only to be damaged.)
fn export(name: &str, out: &Path) {
    let dir = fixture(name);
    let mut config = json(&dir.join("config.json"));
    if let Some(c) = config.as_object_mut() {
        c.remove("rope_scaling");
        c.insert("sliding_window_pattern".into(), 6.into());
    }
    let tokenizer_config = json(&dir.join("tokenizer_config.json"));
    let template = tokenizer_config
        .get("chat_template")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut metadata = model_metadata(&config, 1, name).unwrap();
    metadata.extend(
        tokenizer_metadata(
            &json(&dir.join("tokenizer.json")),
            Some(&tokenizer_config),
            &config,
            template.as_deref(),
        )
        .unwrap(),
    );
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let gemma = name.starts_with("gemma");
    let mut tensors = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
    names.sort();
    for hf_name in names {
        // Tied embeddings: no output matrix of their own.
        let Some(gguf) = gguf_name(&hf_name, gemma) else {
            continue;
        };
        let view = st.tensor(&hf_name).unwrap();
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let dims: Vec<u64> = view.shape().iter().rev().map(|&d| d as u64).collect();
        let ggml_type = if dims.len() == 1 {
            GgmlType::F32
        } else {
            GgmlType::F16
        };
        tensors.push(TensorOut {
            name: gguf,
            dims,
            ggml_type,
            data: Box::new(move || {
                Ok(match ggml_type {
                    GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    _ => encode_f16(&values),
                })
            }),
        });
    }
    write_gguf(out, &metadata, tensors).unwrap();
}

/// What a backend does with a GGUF file before it runs the model.
fn load(path: &Path) -> Result<(), String> {
    let file = GgufFile::open(path).map_err(|e| e.to_string())?;
    let opened = hf::open(&file).map_err(|e| e.to_string())?;
    hf::convert_tensors(&file, &opened.architecture, |t: HfTensor<'_>| {
        let _ = &t;
        Ok::<(), LoadError>(())
    })
    .map_err(|e| e.to_string())?;
    let tokenizer =
        ModelTokenizer::from_gguf(&file, &opened.architecture).map_err(|e| e.to_string())?;
    tokenizer.encode("Hello, world! <|im_end|>")?;
    Ok(())
}

#[test]
fn damaged_gguf_files_give_errors_not_panics() {
    let knob = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let mut rng = fastrand::Rng::with_seed(knob("INFER_TEST_FUZZ_SEED", 0x6775_6666));
    let files = knob("INFER_TEST_FUZZ_FILES", 300);
    let dir = tempfile::tempdir().unwrap();
    for name in ["qwen3-f32", "qwen2-f32"] {
        let clean = dir.path().join(format!("{name}.gguf"));
        export(name, &clean);
        load(&clean).unwrap_or_else(|e| panic!("{name}: the clean export does not load: {e}"));
        let bytes = std::fs::read(&clean).unwrap();
        let head = GgufFile::open(&clean).unwrap().data_offset() as usize;
        let mut outcomes = BTreeMap::new();
        let damaged = dir.path().join("damaged.gguf");
        for i in 0..files {
            let mut b = bytes.clone();
            let mut changes = Vec::new();
            for _ in 0..1 + rng.usize(..4) {
                // Before the data, and inside what an earlier cut left.
                let at = rng.usize(..head.min(b.len()));
                let kind = rng.usize(..4);
                changes.push((at, kind));
                match kind {
                    0 => b[at] ^= 1 << rng.u32(..8),
                    1 => b[at] = rng.u8(..),
                    // A length or count made huge, zero or off by a little.
                    2 => {
                        let v = match rng.usize(..3) {
                            0 => u64::MAX - rng.u64(..4),
                            1 => 0,
                            _ => rng.u64(..1 << 20),
                        };
                        let end = (at + 8).min(b.len());
                        b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
                    }
                    _ => b.truncate(at.max(1)),
                }
            }
            std::fs::write(&damaged, &b).unwrap();
            let outcome = catch_unwind(AssertUnwindSafe(|| load(&damaged)));
            let Ok(result) = outcome else {
                panic!("{name}: damaged file {i} made a panic; (offset, change): {changes:?}");
            };
            *outcomes.entry(result.is_ok()).or_insert(0) += 1;
        }
        // Most damage is caught; some (inside a string, say) still loads.
        assert!(
            outcomes.get(&false).copied().unwrap_or(0) > 0,
            "{name}: {outcomes:?}"
        );
    }
}

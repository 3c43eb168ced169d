//! Fusing adapters into their base models (`backend_metal::fuse`): the
//! fused model gives the adapter-applied model's logits, on every fixture
//! architecture, over dense and quantised bases, and from a GGUF file; bad
//! input is a typed error.

mod common;

use std::path::{Path, PathBuf};

use backend_metal::fuse::{fuse, FuseOptions};
use backend_metal::MlxModel;
use common::*;
use inference_core::{Error, LoadOptions, TextModel};

fn adapter(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/adapters")
        .join(name)
}

fn load_dir(path: &Path, adapter: Option<&Path>) -> MlxModel {
    let mut opts = LoadOptions::default();
    if let Some(a) = adapter {
        opts = opts.adapter_path(a);
    }
    MlxModel::load(path, &opts, backend_metal::Placement::Cpu).unwrap()
}

/// The largest |a − b| and the largest |b|.
fn error(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (err, b.iter().fold(0f32, |m, y| m.max(y.abs())))
}

fn prompt() -> Vec<u32> {
    vec![1, 7, 42, 99, 3, 250, 17, 8]
}

/// Fused f32 models give the adapted logits within 1e-4 × max|logit| on
/// Qwen3, Qwen2, Llama and Gemma 3 (adapters on every linear layer), and
/// the adapted logits of mlx-lm itself on the adapters trained here.
#[test]
fn fused_models_give_the_adapted_logits() {
    for (model, adapter_name) in [
        ("qwen3-f32", "qwen3-f32-lora"),
        ("qwen2-f32", "qwen2-f32-lora"),
        ("llama-f32", "llama-f32-lora"),
        ("gemma3-f32", "gemma3-f32-lora"),
        ("qwen3-f32", "qwen3-f32-ours"),
        ("llama-f32", "llama-f32-ours"),
    ] {
        let out = tempfile::tempdir().unwrap();
        let fused_dir = out.path().join("fused");
        let report = fuse(
            &fixture(model),
            &adapter(adapter_name),
            &fused_dir,
            &FuseOptions::default(),
        )
        .unwrap();
        assert!(report.fused > 0 && report.requantized == 0, "{report:?}");
        let adapted = load_dir(&fixture(model), Some(&adapter(adapter_name)));
        let fused = load_dir(&fused_dir, None);
        let base = load_dir(&fixture(model), None);
        let want = adapted.last_logits(&prompt()).unwrap();
        let (err, scale) = error(&fused.last_logits(&prompt()).unwrap(), &want);
        assert!(err <= 1e-4 * scale, "{adapter_name}: {err} (max {scale})");
        let (moved, _) = error(&base.last_logits(&prompt()).unwrap(), &want);
        assert!(
            moved > 1e3 * err.max(1e-6),
            "{adapter_name}: the adapter changes little"
        );
        // mlx-lm's own logits with the adapter, where it recorded them.
        let golden = adapter(adapter_name).join("mlx_lm_golden.json");
        if let Ok(text) = std::fs::read_to_string(&golden) {
            let g: serde_json::Value = serde_json::from_str(&text).unwrap();
            for p in g["prompts"].as_array().unwrap() {
                let ids = json_ids(&p["ids"]);
                let (err, scale) = error(
                    &fused.last_logits(&ids).unwrap(),
                    &json_floats(&p["logits"]),
                );
                assert!(err <= 1e-4 * scale, "{adapter_name} vs mlx-lm: {err}");
            }
        }
        // Everything but the weights is carried over.
        for file in ["config.json", "tokenizer.json"] {
            assert_eq!(
                std::fs::read(fixture(model).join(file)).unwrap(),
                std::fs::read(fused_dir.join(file)).unwrap(),
                "{file}"
            );
        }
    }
}

/// Over a 4-bit base: the fused matrices are quantised again (the model
/// stays 4-bit, its logits near the adapted ones), or with `dequantize`
/// every matrix is written dense, the configuration loses its
/// quantisation, and the logits are the adapted ones within 1e-4.
#[test]
fn quantized_bases_fuse_requantized_or_dense() {
    let base = quantized_fixture("qwen3-f32", 4, 32);
    let lora = adapter("qwen3-f32-ours");
    let want = load_dir(base.path(), Some(&lora))
        .last_logits(&prompt())
        .unwrap();
    let out = tempfile::tempdir().unwrap();

    let requantized = out.path().join("q4");
    let r = fuse(base.path(), &lora, &requantized, &FuseOptions::default()).unwrap();
    assert_eq!((r.requantized, r.dequantized), (r.fused, 0), "{r:?}");
    let model = load_dir(&requantized, None);
    assert_eq!(model.info().quant_bits, Some(4));
    let (err, scale) = error(&model.last_logits(&prompt()).unwrap(), &want);
    eprintln!("requantised: max error {err} of {scale}");
    assert!(err <= 0.05 * scale, "{err} (max {scale})");

    let dense = out.path().join("dense");
    let r = fuse(
        base.path(),
        &lora,
        &dense,
        &FuseOptions {
            dequantize: true,
            ..FuseOptions::default()
        },
    )
    .unwrap();
    assert!(r.dequantized > r.fused, "{r:?}");
    let config = std::fs::read_to_string(dense.join("config.json")).unwrap();
    assert!(!config.contains("quantization"), "{config}");
    let model = load_dir(&dense, None);
    assert_eq!(model.info().quant_bits, None);
    let (err, scale) = error(&model.last_logits(&prompt()).unwrap(), &want);
    assert!(err <= 1e-4 * scale, "{err} (max {scale})");
}

/// Wrong input: an adapter of another architecture (more layers), a missing adapter, a
/// non-empty output directory, DoRA, a corrupt adapter file.
#[test]
fn bad_fuse_input_is_a_typed_error() {
    let out = tempfile::tempdir().unwrap();
    let fresh = |n: &str| out.path().join(n);
    let opts = FuseOptions::default();
    let e = fuse(
        &fixture("qwen3-f32"),
        &adapter("gemma3-f32-lora"),
        &fresh("a"),
        &opts,
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");
    let e = fuse(&fixture("qwen3-f32"), &fresh("none"), &fresh("b"), &opts).unwrap_err();
    assert!(e.to_string().contains("adapter_config.json"), "{e}");
    let e = fuse(
        &fixture("qwen3-f32"),
        &adapter("qwen3-f32-lora"),
        &fixture("qwen3-f32"),
        &opts,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not an empty directory"), "{e}");

    let dora = tempfile::tempdir().unwrap();
    for f in ["adapters.safetensors", "adapter_config.json"] {
        std::fs::copy(adapter("qwen3-f32-lora").join(f), dora.path().join(f)).unwrap();
    }
    let cfg = dora.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"lora\"", "\"dora\"");
    std::fs::write(&cfg, text).unwrap();
    let e = fuse(&fixture("qwen3-f32"), dora.path(), &fresh("c"), &opts).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    std::fs::write(
        &cfg,
        std::fs::read(adapter("qwen3-f32-lora").join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    std::fs::write(dora.path().join("adapters.safetensors"), b"garbage").unwrap();
    let e = fuse(&fixture("qwen3-f32"), dora.path(), &fresh("d"), &opts).unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
}

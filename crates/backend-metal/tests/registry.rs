//! The "mlx" and "metal" registrations, seen through inference-core.

mod common;

use backend_metal::device::{self, GpuApi};
use inference_core::{GenerateOptions, LoadOptions};

// Link the backend in: without a reference the registrations are dropped.
use backend_metal as _;

#[test]
fn mlx_and_metal_are_registered_with_run_time_devices() {
    let names: Vec<String> = inference_core::backends()
        .iter()
        .map(|b| b.name().to_owned())
        .collect();
    assert_eq!(names, ["metal", "mlx"]);

    let info = device::describe();
    let mlx = inference_core::get("mlx").unwrap();
    assert!(mlx.available().is_available());
    let expected_device = match (info.default_is_gpu, info.gpu) {
        (true, Some(GpuApi::Cuda)) => "cuda:0",
        (true, Some(GpuApi::Metal)) => "metal:0",
        _ => "cpu",
    };
    assert_eq!(mlx.device(), expected_device);
    assert_eq!(mlx.priority(), if info.default_is_gpu { 100 } else { 10 });

    let metal = inference_core::get("metal").unwrap();
    match info.gpu {
        Some(GpuApi::Metal) => assert!(metal.available().is_available()),
        _ => {
            let reason = metal.available().reason().unwrap().to_owned();
            assert!(
                reason.contains("not Apple Metal") || reason.contains("no Apple Metal"),
                "{reason}"
            );
            let err = inference_core::load_model(
                common::fixture("qwen3-f32"),
                &LoadOptions::new().backend("metal"),
            )
            .err()
            .unwrap();
            assert!(
                matches!(err, inference_core::Error::BackendUnavailable { .. }),
                "{err}"
            );
            // The default backend is then "mlx".
            assert_eq!(inference_core::default_backend().unwrap().name(), "mlx");
        }
    }
}

#[test]
fn load_model_through_the_registry() {
    let opts = LoadOptions::new()
        .backend("mlx")
        .gpu_layers(common::default_gpu_layers());
    let model = inference_core::load_model(common::fixture("qwen2-f32"), &opts).unwrap();
    assert_eq!(model.model_type(), "qwen2");
    let golden = &common::golden("qwen2-f32")[0];
    let mut stream = model
        .generate(
            &golden.text,
            &GenerateOptions::new().max_tokens(8).ignore_eos(true),
        )
        .unwrap();
    let ids: Vec<u32> = stream.by_ref().map(|t| t.unwrap().id).collect();
    assert_eq!(ids, golden.greedy[..8]);
    let m = stream.metrics().unwrap();
    assert_eq!((m.prompt_tokens, m.generated_tokens), (golden.ids.len(), 8));
    assert!(m.peak_memory_bytes > 0, "peak memory is reported");
}

/// The MLX backends say which paths they load from the metadata alone: the
/// fixtures of every architecture, a real GGUF file, and nothing else.
#[test]
fn mlx_says_which_paths_it_loads() {
    let mlx = inference_core::get("mlx").unwrap();
    for name in ["qwen3-f32", "qwen2-bf16", "llama-f32", "gemma3-f32"] {
        let dir = common::fixture(name);
        assert!(
            mlx.can_load(&dir).is_yes(),
            "{name}: {:?}",
            mlx.can_load(&dir)
        );
        // Its config.json means its directory.
        assert!(mlx.can_load(&dir.join("config.json")).is_yes(), "{name}");
    }
    // `cargo xtask test` fetches it first.
    let gguf = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if gguf.is_file() {
        assert!(mlx.can_load(&gguf).is_yes(), "{:?}", mlx.can_load(&gguf));
    }

    let tmp = tempfile::tempdir().unwrap();
    let mamba = tmp.path().join("mamba");
    std::fs::create_dir(&mamba).unwrap();
    std::fs::write(mamba.join("config.json"), r#"{"model_type": "mamba"}"#).unwrap();
    let no = mlx.can_load(&mamba);
    assert!(no.reason().is_some_and(|r| r.contains("mamba")), "{no:?}");
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"not gguf").unwrap();
    assert!(!mlx.can_load(&junk).is_yes());
    let nothing = tmp.path().join("nothing-here");
    let no = mlx.can_load(&nothing);
    assert!(no.reason().is_some_and(|r| r.contains("neither")), "{no:?}");
    // Loading what no backend claims still reports the precise error.
    let err = inference_core::load_model(&mamba, &LoadOptions::new())
        .err()
        .unwrap();
    assert!(
        matches!(err, inference_core::Error::UnsupportedArchitecture { .. }),
        "{err}"
    );
}

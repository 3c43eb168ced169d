//! Loading: config variants, checkpoint layouts, quantised checkpoints, and
//! every kind of bad input giving its typed error.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use common::*;
use inference_core::{Error, FinishReason, GenerateOptions, LoadOptions, TextModel};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// Copies a fixture into a temporary directory.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    copy_dir(&fixture(name))
}

/// Copies the files of `dir` into a temporary directory.
fn copy_dir(dir: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    tmp
}

/// An owned tensor: dtype, shape, bytes.
type Owned = (Dtype, Vec<usize>, Vec<u8>);

fn read_tensors(path: &Path) -> BTreeMap<String, Owned> {
    let bytes = fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write_tensors(path: &Path, tensors: &BTreeMap<String, Owned>) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let p = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn load_err(path: &Path) -> Error {
    match backend_metal::MlxModel::load(
        path,
        &LoadOptions::new().gpu_layers(0),
        backend_metal::Placement::Cpu,
    ) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

fn load_cause(path: &Path) -> String {
    match load_err(path) {
        Error::ModelLoad { source, .. } => source.to_string(),
        other => panic!("expected ModelLoad, got {other:?}"),
    }
}

fn first_prompt_logits(model: &backend_metal::MlxModel, name: &str) -> Vec<f32> {
    model.last_logits(&golden(name)[0].ids).unwrap()
}

#[test]
fn language_model_prefix_and_missing_head_dim_load_the_same_model() {
    let tmp = copy_fixture("qwen2-f32");
    let file = tmp.path().join("model.safetensors");
    let renamed: BTreeMap<String, Owned> = read_tensors(&file)
        .into_iter()
        .map(|(n, t)| (format!("language_model.{n}"), t))
        .collect();
    write_tensors(&file, &renamed);
    edit_config(tmp.path(), |c| {
        c.remove("head_dim");
    });
    let model = load(tmp.path());
    let (err, scale) = logit_error(
        &first_prompt_logits(&model, "qwen2-f32"),
        &golden("qwen2-f32")[0].last_logits,
    );
    assert!(err <= 1e-4 * scale, "{err}");
}

#[test]
fn config_variants_parse() {
    // rope_theta written as rope_parameters, dtype as torch_dtype, and back.
    let tmp = copy_fixture("qwen3-f32");
    edit_config(tmp.path(), |c| {
        let theta = c.remove("rope_theta").unwrap();
        c.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "default", "rope_theta": theta}),
        );
        if let Some(d) = c.remove("dtype") {
            c.insert("torch_dtype".into(), d);
        }
    });
    let model = load(tmp.path());
    let (err, scale) = logit_error(
        &first_prompt_logits(&model, "qwen3-f32"),
        &golden("qwen3-f32")[0].last_logits,
    );
    assert!(err <= 1e-4 * scale, "{err}");
}

#[test]
fn info_describes_the_model() {
    let model = load(&fixture("qwen3-f32"));
    let info = model.info();
    assert_eq!(info.architecture, "qwen3");
    assert_eq!(
        (info.num_layers, info.hidden_size, info.context_length),
        (3, 64, 256)
    );
    assert_eq!(info.dtype, "float32");
    assert_eq!((info.quant_bits, info.quant_group), (None, None));
    // Tied embeddings: the output projection is not counted twice.
    let v = info.vocab_size as u64;
    let per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 16 + 3 * 64 * 128 + 2 * 64;
    assert_eq!(info.parameter_count, v * 64 + 3 * per_layer + 64);
    assert_eq!(model.model_type(), "qwen3");
}

#[test]
fn dtype_option_converts_the_weights() {
    let model = load_with(
        &fixture("qwen3-f32"),
        &LoadOptions::new()
            .gpu_layers(default_gpu_layers())
            .dtype(inference_core::DType::BF16),
    );
    assert_eq!(model.info().dtype, "bfloat16");
    let (err, scale) = logit_error(
        &first_prompt_logits(&model, "qwen3-f32"),
        &golden("qwen3-f32")[0].last_logits,
    );
    assert!(
        err <= 4e-2 * scale,
        "bf16 of an f32 model: {err} of {scale}"
    );
}

#[test]
fn corrupt_and_truncated_weights_are_typed_errors() {
    let tmp = copy_fixture("llama-f32");
    let file = tmp.path().join("model.safetensors");
    let bytes = fs::read(&file).unwrap();
    fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let cause = load_cause(tmp.path());
    assert!(
        cause.contains("corrupt weights") && cause.contains("model.safetensors"),
        "{cause}"
    );

    fs::write(&file, b"\x08\x00\x00\x00\x00\x00\x00\x00not json").unwrap();
    let cause = load_cause(tmp.path());
    assert!(cause.contains("corrupt weights"), "{cause}");

    fs::remove_file(&file).unwrap();
    let cause = load_cause(tmp.path());
    assert!(cause.contains("no model*.safetensors"), "{cause}");
}

#[test]
fn missing_unexpected_and_misshapen_tensors_are_named() {
    let tmp = copy_fixture("llama-f32");
    let file = tmp.path().join("model.safetensors");
    let original = read_tensors(&file);

    let mut t = original.clone();
    t.remove("model.layers.1.mlp.up_proj.weight");
    write_tensors(&file, &t);
    assert_eq!(
        load_cause(tmp.path()),
        "missing tensor `model.layers.1.mlp.up_proj.weight`"
    );

    let mut t = original.clone();
    let extra = t["model.norm.weight"].clone();
    t.insert("model.extra.weight".into(), extra);
    write_tensors(&file, &t);
    assert_eq!(
        load_cause(tmp.path()),
        "unexpected tensor `model.extra.weight`"
    );

    let mut t = original.clone();
    let q = t.get_mut("model.layers.0.self_attn.k_proj.weight").unwrap();
    q.1 = vec![q.1[1], q.1[0]];
    write_tensors(&file, &t);
    assert_eq!(
        load_cause(tmp.path()),
        "tensor `model.layers.0.self_attn.k_proj.weight` has shape [64, 32], expected [32, 64]"
    );
}

#[test]
fn unknown_architecture_and_bad_config_are_typed_errors() {
    let tmp = copy_fixture("qwen3-f32");
    edit_config(tmp.path(), |c| {
        c.insert("model_type".into(), "mamba".into());
    });
    match load_err(tmp.path()) {
        Error::UnsupportedArchitecture { model_type } => assert_eq!(model_type, "mamba"),
        other => panic!("{other:?}"),
    }
    edit_config(tmp.path(), |c| {
        c.insert("model_type".into(), "qwen3".into());
        c.remove("hidden_size");
    });
    assert!(load_cause(tmp.path()).contains("missing `hidden_size`"));
    fs::write(tmp.path().join("config.json"), "{").unwrap();
    assert!(load_cause(tmp.path()).contains("invalid JSON"));
    let missing = tmp.path().join("nothing-here");
    assert!(load_cause(&missing).contains("does not exist"));
    fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    fs::write(
        tmp.path().join("config.json"),
        fs::read(fixture("qwen3-f32").join("config.json")).unwrap(),
    )
    .unwrap();
    assert!(load_cause(tmp.path()).contains("tokenizer.json is missing"));
}

#[test]
fn unsupported_options_and_bad_input_are_refused_before_work() {
    let path = fixture("qwen3-f32");
    for (opts, what) in [
        (LoadOptions::new().gpu_layers(2), "gpu_layers"),
        (LoadOptions::new().threads(1), "threads"),
        (
            LoadOptions::new().kv_cache_type(inference_core::KvCacheType::Q8_0),
            "kv_cache_type = q8_0",
        ),
        (LoadOptions::new().flash_attention(false), "flash_attention"),
        (LoadOptions::new().mmap(false), "mmap"),
    ] {
        match backend_metal::MlxModel::load(&path, &opts, backend_metal::Placement::Cpu) {
            Err(Error::Unsupported { feature }) => assert!(feature.contains(what), "{feature}"),
            Err(other) => panic!("{what}: {other:?}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }
    let model = load(&path);
    assert!(matches!(
        model.generate("", &GenerateOptions::new()),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        model.generate("hi", &GenerateOptions::new().temperature(-1.0)),
        Err(Error::InvalidOption {
            field: "temperature",
            ..
        })
    ));
    assert!(matches!(
        model.generate("hi", &GenerateOptions::new().return_logits(true)),
        Err(Error::Unsupported { .. })
    ));
}

#[test]
fn the_end_of_the_context_is_a_normal_end() {
    // The fixture's max_position_embeddings is 256.
    let model = load(&fixture("qwen3-f32"));
    let long = &golden("qwen3-f32")[1];
    let twice = format!("{} {}", long.text, long.text);
    // A prompt that alone does not fit stays an error.
    match model.generate(&twice, &GenerateOptions::new()) {
        Err(Error::ContextOverflow { limit: 256, .. }) => {}
        other => panic!("{other:?}"),
    }
    // A prompt that fits, asked for more than fits: the tokens that fit, then
    // a normal end with finish reason `length`.
    let opts = GenerateOptions::new().max_tokens(200).ignore_eos(true);
    let mut stream = model.generate(&long.text, &opts).unwrap();
    let tokens = stream.collect_tokens().unwrap();
    assert_eq!(tokens.len(), 256 - long.ids.len());
    assert_eq!(stream.finish_reason(), Some(FinishReason::Length));
    let m = stream.metrics().unwrap();
    assert_eq!(m.prompt_tokens + m.generated_tokens, 256);
}

#[test]
fn context_len_rotates_the_caches_up_to_the_models_positions() {
    // With a context length every cache rotates: generation goes on past
    // `context_len`, attending the sinks and the last positions, until the
    // model's max_position_embeddings (256).
    let opts = LoadOptions::new()
        .gpu_layers(default_gpu_layers())
        .context_len(64);
    let model = load_with(&fixture("qwen3-f32"), &opts);
    assert_eq!(model.info().context_length, 64);
    let long = &golden("qwen3-f32")[1];
    let gen = GenerateOptions::new().max_tokens(120).ignore_eos(true);
    let mut stream = model.generate(&long.text, &gen).unwrap();
    let n = stream.collect_tokens().unwrap().len();
    assert_eq!(n, 256 - long.ids.len(), "stops at 256 positions");
    assert_eq!(stream.finish_reason(), Some(FinishReason::Length));
    // Allowed past it, generation goes on to max_tokens.
    let past = load_with(
        &fixture("qwen3-f32"),
        &opts.clone().allow_past_max_positions(true),
    );
    let mut stream = past.generate(&long.text, &gen).unwrap();
    assert_eq!(stream.collect_tokens().unwrap().len(), 120);
    // Inside the bound nothing changes: a short prompt's greedy ids equal the
    // unbounded model's.
    let short = &golden("qwen3-f32")[0];
    let ids = greedy_ids(&model, &short.text, 32);
    assert_greedy_parity("context_len 64", &ids, &short.greedy, &short.margins, 1e-3);
    // A context longer than the model's positions is refused, unless allowed.
    let too_long = LoadOptions::new().gpu_layers(0).context_len(300);
    match backend_metal::MlxModel::load(
        &fixture("qwen3-f32"),
        &too_long,
        backend_metal::Placement::Cpu,
    ) {
        Err(Error::InvalidOption {
            field: "context_len",
            reason,
        }) => assert!(reason.contains("256"), "{reason}"),
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("context_len 300 > 256 accepted"),
    }
    let allowed = load_with(
        &fixture("qwen3-f32"),
        &too_long.allow_past_max_positions(true),
    );
    assert_eq!(allowed.info().context_length, 300);
}

/// Scoring through a rotating cache equals scoring through a full one while
/// the text fits, and sinks change what later positions see once it rotates.
#[test]
fn prompt_logprobs_follow_the_cache_rules() {
    let full = load(&fixture("qwen3-f32"));
    let ids = golden("qwen3-f32")[1].ids.clone();
    assert!(ids.len() > 100);
    let lp = full.prompt_logprobs(&ids).unwrap();
    assert_eq!(lp.len(), ids.len() - 1);
    assert!(lp.iter().all(|x| x.is_finite() && *x <= 0.0));
    // The last value equals the log-softmax of the last logits at the last id.
    let last = full.last_logits(&ids[..ids.len() - 1]).unwrap();
    let max = last.iter().cloned().fold(f32::MIN, f32::max);
    let z: f64 = last.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let want = (last[*ids.last().unwrap() as usize] - max) as f64 - z.ln();
    assert!((lp[lp.len() - 1] as f64 - want).abs() < 1e-4, "{want}");
    let bounded = |sinks| {
        load_with(
            &fixture("qwen3-f32"),
            &LoadOptions::new()
                .gpu_layers(default_gpu_layers())
                .context_len(32)
                .sink_tokens(sinks),
        )
        .prompt_logprobs(&ids)
        .unwrap()
    };
    let (with, without) = (bounded(4), bounded(0));
    for (i, ((a, b), c)) in with.iter().zip(&without).zip(&lp).enumerate().take(31) {
        assert!((a - c).abs() < 1e-4 && (b - c).abs() < 1e-4, "position {i}");
    }
    let differs = with
        .iter()
        .zip(&without)
        .skip(40)
        .any(|(a, b)| (a - b).abs() > 1e-4);
    assert!(differs, "sinks changed nothing once the cache rotated");
    assert!(matches!(
        full.prompt_logprobs(&ids[..1]),
        Err(Error::InvalidInput(_))
    ));
}

#[test]
fn gemma3_multimodal_wrapper_loads_its_text_model() {
    // A `gemma3` checkpoint: the text config under `text_config`, the weights
    // under `language_model.`, and vision tensors that the text model skips.
    let tmp = copy_fixture("gemma3-f32");
    let cfg_path = tmp.path().join("config.json");
    let text: Value = serde_json::from_str(&fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let wrapped = serde_json::json!({"model_type": "gemma3", "text_config": text, "vision_config": {"hidden_size": 8}});
    fs::write(&cfg_path, serde_json::to_string(&wrapped).unwrap()).unwrap();
    let file = tmp.path().join("model.safetensors");
    let mut tensors: BTreeMap<String, Owned> = read_tensors(&file)
        .into_iter()
        .map(|(n, t)| (format!("language_model.{n}"), t))
        .collect();
    tensors.insert(
        "vision_tower.patch.weight".into(),
        (Dtype::F32, vec![2], vec![0; 8]),
    );
    write_tensors(&file, &tensors);
    let model = load(tmp.path());
    assert_eq!(model.model_type(), "gemma3_text");
    let g = &golden("gemma3-f32")[0];
    let (err, scale) = logit_error(&model.last_logits(&g.ids).unwrap(), &g.last_logits);
    assert!(err <= 1e-4 * scale, "{err}");
}

#[test]
fn quantized_checkpoint_matches_its_dequantized_twin() {
    use mlx_rs::ops::{dequantize, quantize};
    use mlx_rs::Array;

    // An mlx-community 4-bit layout made from the f32 fixture, and a dense
    // twin holding exactly the dequantised values.
    let (group, bits) = (32, 4);
    let quant_dir = copy_fixture("qwen3-f32");
    let twin_dir = copy_fixture("qwen3-f32");
    let file = quant_dir.path().join("model.safetensors");
    let dense = read_tensors(&file);
    let mut quant: BTreeMap<String, Owned> = BTreeMap::new();
    let mut twin: BTreeMap<String, Owned> = BTreeMap::new();
    let f32_bytes = |a: &Array| -> Vec<u8> {
        a.as_slice::<f32>()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect()
    };
    for (name, (dtype, shape, bytes)) in dense {
        let is_matrix = shape.len() == 2 && name.ends_with(".weight");
        if !is_matrix {
            quant.insert(name.clone(), (dtype, shape.clone(), bytes.clone()));
            twin.insert(name, (dtype, shape, bytes));
            continue;
        }
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let w = Array::from_slice(&values, &[shape[0] as i32, shape[1] as i32]);
        let (qw, scales, biases) = quantize(&w, group, bits).unwrap();
        let back = dequantize(&qw, &scales, &biases, group, bits).unwrap();
        back.eval().unwrap();
        let prefix = name.strip_suffix(".weight").unwrap();
        let packed: Vec<u8> = qw
            .as_slice::<u32>()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        quant.insert(
            name.clone(),
            (
                Dtype::U32,
                qw.shape().iter().map(|&d| d as usize).collect(),
                packed,
            ),
        );
        quant.insert(
            format!("{prefix}.scales"),
            (
                Dtype::F32,
                scales.shape().iter().map(|&d| d as usize).collect(),
                f32_bytes(&scales),
            ),
        );
        quant.insert(
            format!("{prefix}.biases"),
            (
                Dtype::F32,
                biases.shape().iter().map(|&d| d as usize).collect(),
                f32_bytes(&biases),
            ),
        );
        twin.insert(name, (Dtype::F32, shape, f32_bytes(&back)));
    }
    write_tensors(&file, &quant);
    write_tensors(&twin_dir.path().join("model.safetensors"), &twin);
    edit_config(quant_dir.path(), |c| {
        c.insert(
            "quantization".into(),
            serde_json::json!({"group_size": group, "bits": bits}),
        );
    });

    let q = load(quant_dir.path());
    let t = load(twin_dir.path());
    assert_eq!(
        (q.info().quant_bits, q.info().quant_group),
        (Some(4), Some(32))
    );
    assert_eq!(q.info().parameter_count, t.info().parameter_count);
    for p in golden("qwen3-f32") {
        let (err, scale) = logit_error(
            &q.last_logits(&p.ids).unwrap(),
            &t.last_logits(&p.ids).unwrap(),
        );
        assert!(
            err <= 1e-3 * scale,
            "{}: quantised vs dequantised logits differ by {err}",
            p.name
        );
        assert_eq!(
            greedy_ids(&q, &p.text, 16),
            greedy_ids(&t, &p.text, 16),
            "{}",
            p.name
        );
    }
}

#[test]
fn conformance_kit_passes_on_the_fixture_models() {
    for name in ["qwen3-f32", "llama-f32", "gemma3-f32"] {
        let model = load(&fixture(name));
        inference_core::conformance::assert_conformance(
            &model,
            &inference_core::conformance::ConformanceConfig::default()
                .prompts("The capital of France is", "def add(a, b):")
                .token_counts(8, 200),
        );
    }
}

/// Quantisation modes other than MLX's affine one are refused by name, and a
/// malformed per-module entry is a config error naming the module.
#[test]
fn unsupported_quantization_modes_are_refused() {
    let tmp = copy_fixture("qwen3-f32");
    edit_config(tmp.path(), |c| {
        c.insert(
            "quantization".into(),
            serde_json::json!({"group_size": 32, "bits": 4, "mode": "mxfp4"}),
        );
    });
    match load_err(tmp.path()) {
        Error::Unsupported { feature } => assert!(feature.contains("mxfp4"), "{feature}"),
        other => panic!("{other:?}"),
    }
    edit_config(tmp.path(), |c| {
        c.insert(
            "quantization".into(),
            serde_json::json!({"group_size": 32, "bits": 4, "model.embed_tokens": {"bits": "eight"}}),
        );
    });
    assert!(
        load_cause(tmp.path()).contains("model.embed_tokens"),
        "{}",
        load_cause(tmp.path())
    );
}

/// Config keys that change the maths and that the model does not implement
/// are refused with `Unsupported`, naming the key.
#[test]
fn unimplemented_config_keys_are_unsupported_by_name() {
    let cases: Vec<(&str, &str, Value)> = vec![
        ("qwen3-f32", "use_sliding_window", Value::Bool(true)),
        (
            "qwen3-f32",
            "final_logit_softcapping",
            serde_json::json!(30.0),
        ),
        (
            "llama-f32",
            "attn_logit_softcapping",
            serde_json::json!(50.0),
        ),
        ("llama-f32", "query_pre_attn_scalar", serde_json::json!(64)),
        ("llama-f32", "partial_rotary_factor", serde_json::json!(0.5)),
        (
            "llama-f32",
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
        ),
        (
            "llama-f32",
            "rope_scaling",
            serde_json::json!({"factor": 4.0}),
        ),
    ];
    for (name, key, value) in cases {
        let tmp = copy_fixture(name);
        edit_config(tmp.path(), |c| {
            c.remove("rope_parameters");
            c.insert(key.into(), value.clone());
        });
        match load_err(tmp.path()) {
            Error::Unsupported { feature } => {
                assert!(feature.contains(key), "{key}: {feature}")
            }
            other => panic!("{name} {key}: {other:?}"),
        }
    }
    // Sliding layers in a decoder's layer_types are refused too.
    let tmp = copy_fixture("qwen3-f32");
    edit_config(tmp.path(), |c| {
        let n = c["num_hidden_layers"].as_u64().unwrap() as usize;
        let mut types = vec![Value::from("full_attention"); n];
        types[0] = Value::from("sliding_attention");
        c.insert("layer_types".into(), Value::Array(types));
    });
    assert!(
        matches!(load_err(tmp.path()), Error::Unsupported { feature } if feature.contains("layer_types"))
    );
    // Keys that say "off" are fine.
    let tmp = copy_fixture("qwen3-f32");
    edit_config(tmp.path(), |c| {
        c.insert("use_sliding_window".into(), Value::Bool(false));
        c.insert("final_logit_softcapping".into(), Value::Null);
        c.insert("partial_rotary_factor".into(), serde_json::json!(1.0));
    });
    load(tmp.path());
}

/// Without an index only `model*.safetensors` are weights: other tensor
/// files beside them are left alone. What the weights are stored as is
/// reported.
#[test]
fn other_tensor_files_are_not_weights() {
    let tmp = copy_fixture("qwen3-f32");
    let junk: BTreeMap<String, Owned> =
        [("lora_a".to_owned(), (Dtype::F32, vec![2], vec![0u8; 8]))].into();
    write_tensors(&tmp.path().join("adapters.safetensors"), &junk);
    fs::write(tmp.path().join("consolidated.safetensors"), b"not tensors").unwrap();
    let model = load(tmp.path());
    let info = model.info();
    assert_eq!(info.stored_dtype, "float32");
    assert_eq!(info.quant_type, None);
    let found = inference_formats::discover(tmp.path()).unwrap();
    assert_eq!(found[0].num_files, 1);
    // `-m DIR/config.json` is the directory.
    let via_config = inference_core::load_model(
        tmp.path().join("config.json"),
        &LoadOptions::new().backend("mlx").gpu_layers(0),
    )
    .unwrap();
    assert_eq!(via_config.model_type(), "qwen3");
    // Weights converted at load: the storage and the compute dtypes apart.
    let model = load_with(
        &fixture("qwen3-f32"),
        &LoadOptions::new()
            .gpu_layers(0)
            .dtype(inference_core::DType::F16),
    );
    assert_eq!(
        (
            model.info().stored_dtype.as_str(),
            model.info().dtype.as_str()
        ),
        ("float32", "float16")
    );
}

/// Load errors keep their sources: an unreadable `config.json` (not UTF-8)
/// is a `ModelLoad` whose source chain reaches the `io::Error`.
#[test]
fn load_errors_keep_their_io_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("config.json"), [0xff_u8, 0xfe, 0x00]).unwrap();
    let err = match backend_metal::MlxModel::load(
        &dir,
        &inference_core::LoadOptions::new().gpu_layers(0),
        backend_metal::Placement::Cpu,
    ) {
        Ok(_) => panic!("a config.json that is not UTF-8 must not load"),
        Err(e) => e,
    };
    assert!(
        matches!(err, inference_core::Error::ModelLoad { .. }),
        "{err}"
    );
    let mut source = std::error::Error::source(&err);
    let mut kind = None;
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            kind = Some(io.kind());
        }
        source = s.source();
    }
    assert_eq!(kind, Some(std::io::ErrorKind::InvalidData), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");
}

/// Every field of `file` in a copy of `source` (with `nested`, the fields of
/// nested objects too) set in turn to a value of the wrong kind, size or
/// range, then `load` of the copy: the model loads (the field is unused or
/// the value is allowed) and a one-token chat gives a token or a typed
/// error, or the load is a typed error; never a panic, an abort or a hang.
/// Returns how many loaded and how many were refused.
fn sweep(
    source: &Path,
    file: &str,
    nested: bool,
    load: impl Fn(&Path) -> Result<backend_metal::MlxModel, Error>,
) -> (usize, usize) {
    let name = source.file_name().unwrap().to_string_lossy().into_owned();
    let odd = [
        Value::Null,
        Value::from(0),
        Value::from(-1),
        Value::from(3),
        Value::from(i64::from(i32::MAX) + 1),
        Value::from(u64::MAX),
        Value::from(1e308),
        Value::from(0.5),
        Value::from("x"),
        Value::from(Vec::<Value>::new()),
        Value::Object(serde_json::Map::new()),
    ];
    let tmp = copy_dir(source);
    let p = tmp.path().join(file);
    let clean: Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    // JSON pointers of every field.
    let mut fields = Vec::new();
    let mut stack = vec![(String::new(), &clean)];
    while let Some((at, v)) = stack.pop() {
        if let Value::Object(m) = v {
            for (k, x) in m {
                let here = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                fields.push(here.clone());
                if nested {
                    stack.push((here, x));
                }
            }
        }
    }
    let (mut loaded, mut refused) = (0, 0);
    for field in &fields {
        for value in &odd {
            let mut v = clean.clone();
            *v.pointer_mut(field).unwrap() = value.clone();
            fs::write(&p, v.to_string()).unwrap();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                load(tmp.path()).map(|m| {
                    m.chat(
                        &[inference_core::Message::user("Hello")],
                        &GenerateOptions::new().max_tokens(1).temperature(0.0),
                    )
                    .and_then(|mut s| s.collect_tokens())
                })
            }));
            match outcome {
                Err(_) => panic!("{name}: {file} {field} = {value}: the load panicked"),
                Ok(Ok(Ok(_))) => loaded += 1,
                // A typed error, from the load or (a context too small
                // for the prompt, say) from the call.
                Ok(Ok(Err(_)) | Err(_)) => refused += 1,
            }
        }
    }
    (loaded, refused)
}

/// A model directory on the CPU.
fn load_dir(dir: &Path) -> Result<backend_metal::MlxModel, Error> {
    backend_metal::MlxModel::load(
        dir,
        &LoadOptions::new().gpu_layers(0),
        backend_metal::Placement::Cpu,
    )
}

#[test]
fn every_config_field_set_to_odd_values_loads_or_errs() {
    for name in ["qwen3-f32", "qwen2-f32", "llama-f32", "gemma3-f32"] {
        let (loaded, refused) = sweep(&fixture(name), "config.json", true, load_dir);
        assert!(
            loaded > 0 && refused > 0,
            "{name}: {loaded} loaded, {refused} refused"
        );
    }
}

/// The same for the tokenizer's and the generation configurations' fields
/// (top level: the added tokens' table is left whole).
#[test]
fn every_tokenizer_and_generation_config_field_set_to_odd_values_loads_or_errs() {
    for name in ["qwen3-f32", "llama-f32", "gemma3-f32"] {
        for file in ["tokenizer_config.json", "generation_config.json"] {
            let (loaded, refused) = sweep(&fixture(name), file, false, load_dir);
            assert!(
                loaded > 0,
                "{name} {file}: {loaded} loaded, {refused} refused"
            );
        }
    }
}

/// Values that would load into a model computing nonsense (a division by
/// zero, an infinite scale, NaN norms) or that would be ignored are refused
/// at load, naming the key.
#[test]
fn config_values_that_would_compute_nonsense_are_refused() {
    use serde_json::json;
    let cases: [(&str, &str, Value, &str); 14] = [
        (
            "qwen3-f32",
            "/max_position_embeddings",
            json!(0),
            "max_position_embeddings",
        ),
        ("qwen3-f32", "/rms_norm_eps", json!(-1), "rms_norm_eps"),
        (
            "qwen3-f32",
            "/intermediate_size",
            json!(0),
            "intermediate_size",
        ),
        ("qwen3-f32", "/rope_theta", json!(0), "rope_theta"),
        ("qwen3-f32", "/eos_token_id", json!("x"), "eos_token_id"),
        ("qwen3-f32", "/rope_scaling", json!("x"), "rope_scaling"),
        ("llama-f32", "/rope_scaling/factor", json!(0), "factor"),
        (
            "llama-f32",
            "/rope_scaling/high_freq_factor",
            json!(1),
            "high_freq_factor",
        ),
        (
            "llama-f32",
            "/rope_scaling/rope_type",
            json!(3),
            "rope_type",
        ),
        (
            "qwen2-f32",
            "/rope_parameters",
            json!([]),
            "rope_parameters",
        ),
        (
            "qwen2-f32",
            "/rope_parameters/rope_theta",
            json!("x"),
            "rope_theta",
        ),
        (
            "gemma3-f32",
            "/query_pre_attn_scalar",
            json!(0),
            "query_pre_attn_scalar",
        ),
        (
            "gemma3-f32",
            "/final_logit_softcapping",
            json!(-1),
            "final_logit_softcapping",
        ),
        (
            "gemma3-f32",
            "/use_bidirectional_attention",
            json!(true),
            "use_bidirectional_attention",
        ),
    ];
    for (name, field, value, key) in cases {
        let tmp = copy_fixture(name);
        let p = tmp.path().join("config.json");
        let mut v: Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
        match v.pointer_mut(field) {
            Some(x) => *x = value.clone(),
            None => {
                v.as_object_mut()
                    .unwrap()
                    .insert(field[1..].to_owned(), value.clone());
            }
        }
        fs::write(&p, v.to_string()).unwrap();
        // A configuration error, or `Unsupported` for another model.
        let cause = match load_err(tmp.path()) {
            Error::ModelLoad { source, .. } => source.to_string(),
            Error::Unsupported { feature } => feature,
            other => panic!("{name}: {field} = {value}: {other:?}"),
        };
        assert!(cause.contains(key), "{name}: {field} = {value}: {cause}");
    }
    // The generation config's ids are checked as config.json's are.
    let tmp = copy_fixture("qwen3-f32");
    fs::write(
        tmp.path().join("generation_config.json"),
        r#"{"eos_token_id": "x"}"#,
    )
    .unwrap();
    let cause = format!("{:?}", load_err(tmp.path()));
    assert!(
        cause.contains("generation_config.json: eos_token_id"),
        "{cause}"
    );
}

/// The same for an mlx-lm adapter's `adapter_config.json` (nested fields
/// too), loaded over its model.
#[test]
fn every_adapter_config_field_set_to_odd_values_loads_or_errs() {
    let adapter = fixture("qwen3-f32").join("../../adapters/qwen3-f32-mlxlm");
    let (loaded, refused) = sweep(&adapter, "adapter_config.json", true, |dir| {
        backend_metal::MlxModel::load(
            &fixture("qwen3-f32"),
            &LoadOptions::new().gpu_layers(0).adapter_path(dir),
            backend_metal::Placement::Cpu,
        )
    });
    assert!(
        loaded > 0 && refused > 0,
        "{loaded} loaded, {refused} refused"
    );
}

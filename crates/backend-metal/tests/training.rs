//! LoRA on the MLX backend through the public API: mlx-lm adapters at load
//! (checked against transformers with the same adapters), training that
//! lowers the validation loss deterministically, saving and loading back,
//! and the typed errors of bad adapters, options and data.

mod common;

use std::path::{Path, PathBuf};

use backend_metal::MlxModel;
use common::fixture;
use inference_core::{
    Error, LoadOptions, LoraConfig, Optimizer, TextModel, TrainOptions, TrainProgress,
};
use inference_runtime::dataset;

fn adapter(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/adapters")
        .join(format!("{name}-lora"))
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train/zorb")
}

fn load(name: &str, opts: &LoadOptions) -> inference_core::Result<MlxModel> {
    MlxModel::load(&fixture(name), opts, backend_metal::Placement::Cpu)
}

/// The f32 values of a safetensors tensor in `lora_golden.safetensors`.
fn golden_tensor(name: &str, tensor: &str) -> Vec<f32> {
    let path = fixture(name).join("lora_golden.safetensors");
    let arrays = backend_metal::mlx_rs::Array::load_safetensors(path).expect("goldens");
    let a = arrays[tensor]
        .as_dtype(backend_metal::mlx_rs::Dtype::Float32)
        .unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

/// An adapter directory of mlx-lm's (written by the fixture script with
/// the values PyTorch used) loads at `adapter_path`, and the model gives
/// transformers' logits and greedy ids with it, on every architecture;
/// naming the `adapters.safetensors` file works too.
#[test]
fn mlx_lm_adapters_load_and_give_transformers_outputs() {
    for name in ["qwen3-f32", "qwen2-f32", "llama-f32", "gemma3-f32"] {
        for path in [adapter(name), adapter(name).join("adapters.safetensors")] {
            let model = load(name, &LoadOptions::default().adapter_path(&path)).unwrap();
            let counts = inference_core::Trainable::parameter_counts(&model).expect("counts");
            assert!(
                counts.trainable > 0 && counts.total > counts.trainable,
                "{name}"
            );
            let prompt: Vec<u32> = golden_tensor(name, "prompt_ids")
                .iter()
                .map(|&x| x as u32)
                .collect();
            let logits = model.last_logits(&prompt).unwrap();
            let want = golden_tensor(name, "logits");
            let tol = 1e-4 * want.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (i, (a, b)) in logits.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= tol, "{name} logit {i}: {a} vs {b}");
            }
            let greedy = golden_tensor(name, "greedy_ids");
            let margins = golden_tensor(name, "greedy_margins");
            let opts = inference_core::GenerateOptions::new()
                .max_tokens(greedy.len())
                .temperature(0.0)
                .ignore_eos(true);
            let ids: Vec<u32> = model
                .generate_ids(prompt.clone(), &opts)
                .unwrap()
                .map(|t| t.unwrap().id)
                .collect();
            for (step, (&got, &want)) in ids.iter().zip(&greedy).enumerate() {
                if margins[step] < 1e-3 {
                    break;
                }
                assert_eq!(got, want as u32, "{name}: greedy step {step}");
            }
        }
    }
}

/// Copies an adapter directory so that a test can spoil it.
fn copy_adapter(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["adapters.safetensors", "adapter_config.json"] {
        std::fs::copy(adapter(name).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

#[test]
fn bad_adapters_are_typed_errors() {
    let with = |path: &Path| load("qwen3-f32", &LoadOptions::default().adapter_path(path));
    let missing = with(Path::new("/nonexistent/adapter"))
        .err()
        .expect("missing");
    assert!(
        matches!(missing, Error::ModelLoad { .. }),
        "missing directory: {missing}"
    );
    // Another architecture's adapter: its shapes do not fit.
    let other = with(&adapter("gemma3-f32")).err().expect("gemma3 adapter");
    assert!(other.to_string().contains("does not fit"), "{other}");
    // A rank the tensors do not have.
    let d = copy_adapter("qwen3-f32");
    let cfg = d.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"rank\": 4", "\"rank\": 8")).unwrap();
    let e = with(d.path()).err().expect("wrong rank");
    assert!(e.to_string().contains("does not fit"), "{e}");
    // DoRA and full fine-tunes are refused by name.
    std::fs::write(&cfg, text.replace("\"lora\"", "\"dora\"")).unwrap();
    let e = with(d.path()).err().expect("dora");
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    // Fewer layers than the tensors cover.
    std::fs::write(&cfg, text.replace("\"num_layers\": 3", "\"num_layers\": 1")).unwrap();
    let e = with(d.path()).err().expect("num_layers");
    assert!(e.to_string().contains("outside the layers"), "{e}");
    // A corrupt tensor file.
    std::fs::write(&cfg, &text).unwrap();
    std::fs::write(d.path().join("adapters.safetensors"), b"not safetensors").unwrap();
    let e = with(d.path()).err().expect("corrupt");
    assert!(e.to_string().contains("corrupt"), "{e}");
}

fn train_opts() -> TrainOptions {
    TrainOptions {
        iters: 24,
        batch_size: 4,
        learning_rate: 1e-2,
        optimizer: Optimizer::AdamW { weight_decay: 0.01 },
        mask_prompt: true,
        val_every: 12,
        val_batches: None,
        report_every: 6,
        seed: 7,
        ..TrainOptions::default()
    }
}

fn lora() -> LoraConfig {
    LoraConfig {
        rank: 4,
        scale: 2.0,
        num_layers: None,
        ..LoraConfig::default()
    }
}

/// Trains the fixture model on the Zorb data; the reports in order.
fn train_once(model: &MlxModel) -> Vec<TrainProgress> {
    let tokenizer = model.tokenizer().unwrap();
    let (data, test) = dataset::read_dir(&data_dir(), tokenizer, true, true).unwrap();
    assert_eq!((data.train.len(), data.valid.len(), test.len()), (16, 4, 1));
    let trainable = model.trainable().unwrap();
    trainable.apply_lora(&lora(), 3).unwrap();
    trainable
        .train(data, &train_opts())
        .unwrap()
        .collect::<inference_core::Result<Vec<_>>>()
        .unwrap()
}

/// A few seconds of training at least halve the validation loss (10.2 →
/// 1.5 when measured), the same way on every run with the same seed; the saved adapter
/// loads back (in mlx-lm's layout) and gives the same loss.
#[test]
fn training_lowers_the_validation_loss_deterministically_and_saves_an_adapter() {
    let model = load("qwen3-f32", &LoadOptions::default()).unwrap();
    let tokenizer = model.tokenizer().unwrap();
    let (data, _) = dataset::read_dir(&data_dir(), tokenizer, true, false).unwrap();
    let trainable = model.trainable().unwrap();
    let before = trainable
        .evaluate(data.valid.clone(), &train_opts())
        .unwrap();
    let reports = train_once(&model);
    let steps: Vec<usize> = reports.iter().map(|r| r.step).collect();
    assert_eq!(
        steps,
        [0, 6, 12, 18, 24],
        "before training, then every 6 steps"
    );
    let vals: Vec<f32> = reports.iter().filter_map(|r| r.val_loss).collect();
    assert_eq!(vals.len(), 3, "validation first, at 12 and at the end");
    assert!((vals[0] - before).abs() < 1e-5, "{vals:?} vs {before}");
    let after = *vals.last().unwrap();
    eprintln!("validation loss {before} → {vals:?}; reports {reports:?}");
    assert!(
        after < before * 0.5,
        "validation loss {before} → {after}: not halved"
    );
    assert!(reports[1..]
        .iter()
        .all(|r| r.train_loss.is_some() && r.tokens_per_sec > 0.0));
    let evaluated = trainable
        .evaluate(data.valid.clone(), &train_opts())
        .unwrap();
    assert!((evaluated - after).abs() < 1e-5, "{evaluated} vs {after}");

    // Deterministic with the seed: a second model trains to the same losses.
    let again = load("qwen3-f32", &LoadOptions::default()).unwrap();
    let vals2: Vec<f32> = train_once(&again)
        .iter()
        .filter_map(|r| r.val_loss)
        .collect();
    assert_eq!(vals, vals2);

    let out = tempfile::tempdir().unwrap();
    trainable.save_adapter(out.path()).unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["fine_tune_type"], "lora");
    assert_eq!(config["num_layers"], -1);
    assert_eq!(config["lora_parameters"]["rank"], 4);
    let reloaded = load(
        "qwen3-f32",
        &LoadOptions::default().adapter_path(out.path()),
    )
    .unwrap();
    let loss = reloaded
        .trainable()
        .unwrap()
        .evaluate(data.valid, &train_opts())
        .unwrap();
    assert!((loss - after).abs() < 1e-5, "{loss} vs {after}");
}

#[test]
fn bad_training_input_is_refused_with_typed_errors() {
    let model = load("qwen3-f32", &LoadOptions::default()).unwrap();
    let t = model.trainable().unwrap();
    let tokenizer = model.tokenizer().unwrap();
    let (data, _) = dataset::read_dir(&data_dir(), tokenizer, true, false).unwrap();
    let e = t
        .train(data.clone(), &train_opts())
        .expect_err("no adapters");
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");
    let rank0 = LoraConfig { rank: 0, ..lora() };
    assert!(matches!(
        t.apply_lora(&rank0, 0),
        Err(Error::InvalidOption { field: "rank", .. })
    ));
    let keys = LoraConfig {
        keys: Some(vec!["self_attn.nope".into()]),
        ..lora()
    };
    assert!(matches!(
        t.apply_lora(&keys, 0),
        Err(Error::InvalidOption { field: "keys", .. })
    ));
    t.apply_lora(&lora(), 0).unwrap();
    let opts = TrainOptions {
        batch_size: 100,
        ..train_opts()
    };
    assert!(matches!(
        t.train(data.clone(), &opts),
        Err(Error::InvalidInput(_))
    ));
    let mut bad = data.clone();
    bad.train[0].ids.push(1_000_000);
    assert!(matches!(
        t.train(bad, &train_opts()),
        Err(Error::InvalidInput(_))
    ));
    let zero_lr = TrainOptions {
        learning_rate: 0.0,
        ..train_opts()
    };
    assert!(matches!(
        t.train(data, &zero_lr),
        Err(Error::InvalidOption { .. })
    ));

    // Data files: missing, and a malformed line named by file and line.
    let dir = tempfile::tempdir().unwrap();
    let e = dataset::read_dir(dir.path(), tokenizer, true, false).unwrap_err();
    assert!(e.to_string().contains("train.jsonl"), "{e}");
    std::fs::write(
        dir.path().join("train.jsonl"),
        "{\"text\": \"fine\"}\n{\"question\": 1}\n",
    )
    .unwrap();
    let e = dataset::read_dir(dir.path(), tokenizer, false, false).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidInput(m) if m.contains("train.jsonl:2")),
        "{e}"
    );
    std::fs::write(dir.path().join("train.jsonl"), "{\"messages\": []}\n").unwrap();
    let e = dataset::read_dir(dir.path(), tokenizer, false, false).unwrap_err();
    assert!(e.to_string().contains("train.jsonl:1"), "{e}");
}

/// The prompt of a chat example is everything before the last message with
/// the assistant's header, and the ids are the whole rendered
/// conversation, as mlx-lm's chat dataset makes them.
#[test]
fn chat_examples_mask_the_prompt_as_mlx_lm_does() {
    let model = load("qwen3-f32", &LoadOptions::default()).unwrap();
    let tok = model.tokenizer().unwrap();
    let examples = dataset::read_jsonl(&data_dir().join("train.jsonl"), tok).unwrap();
    let first = &examples[0];
    let messages = [
        inference_core::Message::user("What colour is the sky on Zorb?"),
        inference_core::Message::assistant("The sky on Zorb is green."),
    ];
    let whole = tok
        .encode_chat(
            &messages,
            &inference_core::RenderOptions::new().add_generation_prompt(false),
        )
        .unwrap();
    let prompt = tok
        .encode_chat(&messages[..1], &inference_core::RenderOptions::new())
        .unwrap();
    assert_eq!(first.ids, whole);
    assert_eq!(first.prompt_len, prompt.len());
    assert_eq!(&first.ids[..prompt.len()], &prompt[..]);
    // Text examples end with an end-of-sequence id and have no prompt.
    let text = examples.last().unwrap();
    assert_eq!(text.prompt_len, 0);
    assert!(tok.eos_token_ids().contains(text.ids.last().unwrap()));
}

/// Adapters and mlx-lm agree both ways. An adapter trained by mlx-lm
/// 0.32.2 itself on the Zorb data (`*-mlxlm`, made by
/// `scripts/fixtures/make_mlx_lm_adapters.py`) gives, here, mlx-lm's
/// last-position logits (within 1e-4 × max|logit|) and greedy ids (until a
/// step whose top-2 margin in mlx-lm is below 1e-3), for a raw and a chat
/// prompt, on Qwen3, Llama and Qwen2 fixtures; and adapters trained here
/// by `infer train` (`*-ours`) give in mlx-lm (the same script's
/// `--check`, recorded beside them) what they give here.
#[test]
fn adapters_give_the_same_outputs_here_and_in_mlx_lm() {
    let made = [
        "qwen3-f32-mlxlm",
        "llama-f32-mlxlm",
        "qwen2-f32-mlxlm",
        "qwen3-f32-ours",
        "llama-f32-ours",
    ];
    for adapter in made {
        let name = adapter.rsplit_once('-').map_or(adapter, |(m, _)| m);
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/adapters")
            .join(adapter);
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("mlx_lm_golden.json")).unwrap())
                .unwrap();
        let model = load(name, &LoadOptions::default().adapter_path(&dir)).unwrap();
        for prompt in golden["prompts"].as_array().unwrap() {
            let what = format!("{adapter} {}", prompt["name"]);
            let list = |k: &str| -> Vec<f64> {
                prompt[k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            };
            let ids: Vec<u32> = list("ids").iter().map(|&x| x as u32).collect();
            let want = list("logits");
            let logits = model.last_logits(&ids).unwrap();
            let tol = 1e-4 * want.iter().fold(0f64, |m, x| m.max(x.abs()));
            for (i, (&a, &b)) in logits.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(a) - b).abs() <= tol,
                    "{what} logit {i}: {a} vs {b}"
                );
            }
            let greedy = list("greedy_ids");
            let margins = list("margins");
            let opts = inference_core::GenerateOptions::new()
                .max_tokens(greedy.len())
                .temperature(0.0)
                .ignore_eos(true);
            let got: Vec<u32> = model
                .generate_ids(ids, &opts)
                .unwrap()
                .map(|t| t.unwrap().id)
                .collect();
            for (step, (&g, &w)) in got.iter().zip(&greedy).enumerate() {
                if margins[step] < 1e-3 {
                    break;
                }
                assert_eq!(g, w as u32, "{what}: greedy step {step}");
            }
        }
    }
}

/// Gradient accumulation (two batches a step), a warm-up and a cosine
/// schedule: the run reports the scheduled rates and still lowers the
/// validation loss. Clipping, with SGD (whose step is the gradient's size):
/// a run clipped to a global norm of 1e-6 stays where it started, an
/// unclipped one does not.
#[test]
fn accumulation_clipping_and_schedules_take_effect() {
    let run = |optimizer: Optimizer, learning_rate: f32, max_grad_norm: Option<f32>| {
        let model = load("qwen3-f32", &LoadOptions::default()).unwrap();
        let tokenizer = model.tokenizer().unwrap();
        let (data, _) = dataset::read_dir(&data_dir(), tokenizer, true, false).unwrap();
        let t = model.trainable().unwrap();
        t.apply_lora(&lora(), 3).unwrap();
        let opts = TrainOptions {
            iters: 16,
            grad_accumulation: 2,
            max_grad_norm,
            optimizer,
            learning_rate,
            warmup: 2,
            lr_schedule: inference_core::LrSchedule::Cosine { end: 1e-3 },
            report_every: 2,
            val_every: 0,
            ..train_opts()
        };
        let reports: Vec<TrainProgress> = t
            .train(data, &opts)
            .unwrap()
            .collect::<inference_core::Result<_>>()
            .unwrap();
        // A report after batch 2k follows update k: the rate of update k − 1.
        for r in reports.iter().filter(|r| r.step > 0) {
            let want = opts.learning_rate_at(r.step / 2 - 1);
            assert!((r.learning_rate - want).abs() < 1e-9, "{r:?} vs {want}");
        }
        let vals: Vec<f32> = reports.iter().filter_map(|r| r.val_loss).collect();
        (vals[0], *vals.last().unwrap())
    };
    let (before, adam) = run(Optimizer::Adam, 1e-2, None);
    assert!(adam < before * 0.8, "{before} → {adam}");
    let (_, sgd) = run(Optimizer::Sgd, 0.5, None);
    let (_, clipped) = run(Optimizer::Sgd, 0.5, Some(1e-6));
    assert!(sgd < before - 0.01, "SGD: {before} → {sgd}");
    assert!(
        (clipped - before).abs() < 1e-3,
        "clipped SGD: {before} → {clipped}"
    );
}

/// Checkpoints and resume: a run that writes checkpoints every 4 steps, and
/// runs resumed from its step-4 and step-8 checkpoints (AdamW, dropout,
/// gradient accumulation over 3 batches so that step 4 is mid-way through
/// an update), report the same training and validation losses after the
/// checkpoint and end with the same adapters as the uninterrupted run. The
/// checkpoint files are mlx-lm's names; a checkpoint of another rank, or of
/// another optimiser, or one at the last step, is refused; an mlx-lm
/// checkpoint without training state starts the adapters from it at step 1.
#[test]
fn a_resumed_run_continues_as_the_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let lora = LoraConfig {
        dropout: 0.1,
        ..lora()
    };
    let opts = TrainOptions {
        iters: 12,
        grad_accumulation: 3,
        report_every: 4,
        val_every: 4,
        checkpoints: Some(inference_core::Checkpoints {
            dir: dir.path().to_path_buf(),
            every: 4,
        }),
        ..train_opts()
    };
    let run = |opts: &TrainOptions, lora: &LoraConfig| {
        let model = load("qwen3-f32", &LoadOptions::default()).unwrap();
        let tokenizer = model.tokenizer().unwrap();
        let (data, _) = dataset::read_dir(&data_dir(), tokenizer, true, false).unwrap();
        let t = model.trainable().unwrap();
        t.apply_lora(lora, 3).unwrap();
        let reports = t
            .train(data, opts)
            .and_then(|s| s.collect::<inference_core::Result<Vec<TrainProgress>>>());
        let out = tempfile::tempdir().unwrap();
        if reports.is_ok() {
            t.save_adapter(out.path()).unwrap();
        }
        (
            reports,
            std::fs::read(out.path().join("adapters.safetensors")).ok(),
        )
    };
    let (whole, whole_adapters) = run(&opts, &lora);
    let whole = whole.unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "0000004_adapters.safetensors",
            "0000004_train_state.safetensors",
            "0000008_adapters.safetensors",
            "0000008_train_state.safetensors",
            "0000012_adapters.safetensors",
            "0000012_train_state.safetensors",
            "adapter_config.json",
            "adapters.safetensors",
        ]
    );
    let key = |r: &TrainProgress| (r.step, r.train_loss, r.val_loss, r.trained_tokens);
    for from in [4, 8] {
        let resumed = TrainOptions {
            checkpoints: None,
            resume: Some(dir.path().join(format!("{from:07}_adapters.safetensors"))),
            ..opts.clone()
        };
        let (reports, adapters) = run(&resumed, &lora);
        let reports = reports.unwrap();
        let want: Vec<_> = whole.iter().filter(|r| r.step > from).map(key).collect();
        let got: Vec<_> = reports.iter().map(key).collect();
        assert_eq!(got, want, "resumed from step {from}");
        assert_eq!(
            adapters, whole_adapters,
            "adapters resumed from step {from}"
        );
    }

    let resume = |file: &str| TrainOptions {
        checkpoints: None,
        resume: Some(dir.path().join(file)),
        ..opts.clone()
    };
    let refused = |opts: &TrainOptions, lora: &LoraConfig| match run(opts, lora).0 {
        Err(Error::InvalidOption {
            field: "resume",
            reason,
        }) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let wrong_rank = LoraConfig {
        rank: 2,
        ..lora.clone()
    };
    let reason = refused(&resume("0000004_adapters.safetensors"), &wrong_rank);
    assert!(reason.contains("shape"), "{reason}");
    let sgd = TrainOptions {
        optimizer: Optimizer::Sgd,
        ..resume("0000004_adapters.safetensors")
    };
    assert!(refused(&sgd, &lora).contains("adamw"));
    assert!(refused(&resume("0000012_adapters.safetensors"), &lora).contains("step 12"));
    assert!(refused(&resume("none_adapters.safetensors"), &lora).contains("cannot read"));

    // Without a training state (as mlx-lm's checkpoints are): from step 1,
    // starting from the checkpoint's adapters, so the first validation
    // loss is the one after step 8.
    std::fs::remove_file(dir.path().join("0000008_train_state.safetensors")).unwrap();
    let reports = run(&resume("0000008_adapters.safetensors"), &lora)
        .0
        .unwrap();
    assert_eq!(reports[0].step, 0);
    let at_8 = whole.iter().find(|r| r.step == 8).unwrap().val_loss;
    assert_eq!(reports[0].val_loss, at_8);
}

/// QLoRA: adapters over 4- and 8-bit MLX-quantised bases (the fixture in
/// mlx-community's layout) train like over the dense one; the base stays
/// quantised.
#[test]
fn qlora_over_quantized_bases_lowers_the_validation_loss() {
    for bits in [4, 8] {
        let dir = common::quantized_fixture("qwen3-f32", bits, 32);
        let model = MlxModel::load(
            dir.path(),
            &LoadOptions::default(),
            backend_metal::Placement::Cpu,
        )
        .unwrap();
        assert_eq!(model.info().quant_bits, Some(bits as u32));
        let reports = train_once(&model);
        let vals: Vec<f32> = reports.iter().filter_map(|r| r.val_loss).collect();
        let (before, after) = (vals[0], *vals.last().unwrap());
        eprintln!("{bits}-bit: validation loss {vals:?}");
        assert!(after < before * 0.5, "{bits}-bit: {before} → {after}");
        assert_eq!(model.info().quant_bits, Some(bits as u32));
    }
}

/// Gradient checkpointing changes where activations come from, not the
/// run: the same losses (to rounding) as without it; with adapter dropout
/// it is refused.
#[test]
fn grad_checkpointing_trains_alike() {
    let run = |opts: &TrainOptions, lora: &LoraConfig| {
        let model = load("gemma3-f32", &LoadOptions::default()).unwrap();
        let tokenizer = model.tokenizer().unwrap();
        let (data, _) = dataset::read_dir(&data_dir(), tokenizer, true, false).unwrap();
        let t = model.trainable().unwrap();
        t.apply_lora(lora, 3).unwrap();
        t.train(data, opts)
            .and_then(|s| s.collect::<inference_core::Result<Vec<TrainProgress>>>())
    };
    let opts = TrainOptions {
        iters: 8,
        report_every: 4,
        val_every: 4,
        ..train_opts()
    };
    let plain = run(&opts, &lora()).unwrap();
    let checkpointed = TrainOptions {
        grad_checkpoint: true,
        ..opts.clone()
    };
    let with = run(&checkpointed, &lora()).unwrap();
    assert_eq!(plain.len(), with.len());
    for (a, b) in plain.iter().zip(&with) {
        for (x, y) in [(a.train_loss, b.train_loss), (a.val_loss, b.val_loss)] {
            match (x, y) {
                (Some(x), Some(y)) => assert!((x - y).abs() <= 1e-4 * x.abs(), "{a:?} vs {b:?}"),
                (None, None) => {}
                _ => panic!("{a:?} vs {b:?}"),
            }
        }
    }
    let dropout = LoraConfig {
        dropout: 0.1,
        ..lora()
    };
    assert!(matches!(
        run(&checkpointed, &dropout),
        Err(Error::Unsupported { .. })
    ));
}

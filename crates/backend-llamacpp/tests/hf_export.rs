//! A fused Hugging Face directory exported as GGUF (`FuseOptions::export_gguf`)
//! runs on llama.cpp as it runs on MLX: small random models of each exported
//! architecture (Qwen3 with tied embeddings, Qwen2 with attention biases,
//! Llama with its permuted Q and K, Gemma 3 with its SentencePiece vocabulary,
//! four norms per layer and a sliding window) carry their family's real tokenizer, so
//! that llama.cpp's tokenisation of the exported vocabulary can be checked
//! against the Hugging Face tokenizer, and greedy ids against MLX on the
//! fused directory (f32) wherever MLX's top-2 margin leaves room for the
//! export's rounding.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use backend_llamacpp::LlamaCppModel;
use backend_metal::fuse::{fuse, FuseOptions, GgufType};
use backend_metal::{MlxModel, Placement};
use inference_core::{GenerateOptions, LoadOptions, TextModel};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

mod common;
use common::TRICKY;

/// Long words, whose pieces a tokenizer must merge in its own order (with
/// Gemma's vocabulary, merging in any other order splits most of them
/// otherwise): a check of SentencePiece scores.
const LONG_WORDS: [&str; 4] = [
    "jumps over the lazy dog, unbelievable antidisestablishmentarianism",
    "Donaudampfschifffahrtsgesellschaftskapitän incompréhensiblement",
    "supercalifragilisticexpialidocious thermodynamics uncharacteristically",
    "hippopotomonstrosesquippedaliophobia misunderstandings",
];

const HIDDEN: usize = 64;
const INTER: usize = 128;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const LAYERS: usize = 2;

/// A deterministic generator of weights (xorshift, uniform in ±`scale`).
struct Weights(u64);

impl Weights {
    fn take(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: HashMap<String, TensorView<'_>> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(&views, None, path).unwrap();
}

/// The vocabulary size of a `tokenizer.json` (its largest id + 1).
fn vocab_size(tokenizer: &serde_json::Value) -> usize {
    let vocab = tokenizer["model"]["vocab"].as_object().unwrap();
    let added = tokenizer["added_tokens"].as_array().unwrap();
    vocab
        .values()
        .chain(added.iter().map(|a| &a["id"]))
        .filter_map(serde_json::Value::as_u64)
        .max()
        .unwrap() as usize
        + 1
}

/// Layers of the random models: Gemma 3's five sliding-window layers and a
/// global one, two for the others.
fn layers_of(model_type: &str) -> usize {
    if model_type == "gemma3_text" {
        6
    } else {
        LAYERS
    }
}

/// A random `model_type` model with the `family`'s tokenizer in `dir`.
fn random_model(dir: &Path, model_type: &str, family: &str, tied: bool) {
    let gemma = model_type == "gemma3_text";
    let layers = layers_of(model_type);
    let tokenizers = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/tokenizers");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tokenizers.join(family).join(f), dir.join(f)).unwrap();
    }
    let tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = vocab_size(&tok);
    let mut config = json!({
        "model_type": model_type, "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": vocab,
        "max_position_embeddings": 512, "tie_word_embeddings": tied, "torch_dtype": "float32",
    });
    if model_type == "llama" {
        config["architectures"] = json!(["LlamaForCausalLM"]);
    }
    if gemma {
        // A window shorter than the test's prompt and reply.
        config["sliding_window"] = json!(8);
        config["query_pre_attn_scalar"] = json!(HEAD_DIM);
        config["rope_theta"] = json!(1_000_000.0);
        config["rope_local_base_freq"] = json!(10_000.0);
        config["hidden_activation"] = json!("gelu_pytorch_tanh");
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut w = Weights(0x9e37_79b9_7f4a_7c15 ^ vocab as u64);
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    // Logits with a spread of a few units: clear greedy choices. Gemma
    // multiplies its embeddings by √hidden: smaller ones, so that the
    // layers, not the token itself, decide the next one.
    let embed_scale = if gemma { 0.1 } else { 2.0 };
    t.push((
        "model.embed_tokens.weight".into(),
        vec![vocab, HIDDEN],
        w.take(vocab * HIDDEN, embed_scale),
    ));
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        let m = |w: &mut Weights, rows, cols| w.take(rows * cols, (3.0 / cols as f32).sqrt());
        // Gemma's norms scale by `1 + w`: random `w` near 0 there.
        let norm = |w: &mut Weights, n: usize| match gemma {
            true => w.take(n, 0.2),
            false => vec![1.0; n],
        };
        let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
        if gemma {
            norms.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
        }
        for n in norms {
            t.push((
                format!("{p}.{n}.weight"),
                vec![HIDDEN],
                norm(&mut w, HIDDEN),
            ));
        }
        for (name, rows) in [
            ("q", HEADS * HEAD_DIM),
            ("k", KV_HEADS * HEAD_DIM),
            ("v", KV_HEADS * HEAD_DIM),
        ] {
            t.push((
                format!("{p}.self_attn.{name}_proj.weight"),
                vec![rows, HIDDEN],
                m(&mut w, rows, HIDDEN),
            ));
            if model_type == "qwen2" {
                t.push((
                    format!("{p}.self_attn.{name}_proj.bias"),
                    vec![rows],
                    w.take(rows, 0.5),
                ));
            }
        }
        t.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![HIDDEN, HEADS * HEAD_DIM],
            m(&mut w, HIDDEN, HEADS * HEAD_DIM),
        ));
        if model_type == "qwen3" || gemma {
            for n in ["q_norm", "k_norm"] {
                let shift = if gemma { 0.0 } else { 1.0 };
                t.push((
                    format!("{p}.self_attn.{n}.weight"),
                    vec![HEAD_DIM],
                    w.take(HEAD_DIM, 0.2).iter().map(|x| shift + x).collect(),
                ));
            }
        }
        t.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![INTER, HIDDEN],
            m(&mut w, INTER, HIDDEN),
        ));
        t.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![INTER, HIDDEN],
            m(&mut w, INTER, HIDDEN),
        ));
        t.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![HIDDEN, INTER],
            m(&mut w, HIDDEN, INTER),
        ));
    }
    let final_norm = if gemma {
        w.take(HIDDEN, 0.2)
    } else {
        vec![1.0; HIDDEN]
    };
    t.push(("model.norm.weight".into(), vec![HIDDEN], final_norm));
    if !tied {
        t.push((
            "lm_head.weight".into(),
            vec![vocab, HIDDEN],
            w.take(vocab * HIDDEN, 2.0),
        ));
    }
    write_safetensors(&dir.join("model.safetensors"), &t);
}

/// An mlx-lm adapter on the last two of `layers` layers' `q_proj` and
/// `down_proj`.
fn random_adapter(dir: &Path, layers: usize) {
    let config = json!({"fine_tune_type": "lora", "num_layers": LAYERS,
        "lora_parameters": {"rank": 2, "scale": 2.0, "dropout": 0.0,
                            "keys": ["self_attn.q_proj", "mlp.down_proj"]}});
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut w = Weights(7);
    let mut t = Vec::new();
    for l in layers - LAYERS..layers {
        for (key, input, output) in [
            ("self_attn.q_proj", HIDDEN, HEADS * HEAD_DIM),
            ("mlp.down_proj", INTER, HIDDEN),
        ] {
            let p = format!("model.layers.{l}.{key}");
            t.push((
                format!("{p}.lora_a"),
                vec![input, 2],
                w.take(input * 2, 0.3),
            ));
            t.push((
                format!("{p}.lora_b"),
                vec![2, output],
                w.take(2 * output, 0.3),
            ));
        }
    }
    write_safetensors(&dir.join("adapters.safetensors"), &t);
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions::new()
        .max_tokens(n)
        .temperature(0.0)
        .ignore_eos(true)
}

/// Fuses a random adapter into a random `model_type` model, exports `ty`,
/// and checks the GGUF on llama.cpp against the fused directory on MLX.
fn check(model_type: &str, family: &str, tied: bool, ty: GgufType, margin: f32) {
    check_with(model_type, family, tied, ty, margin, |_| {});
}

/// [`check`], with the base directory changed by `reshape` before fusing.
fn check_with(
    model_type: &str,
    family: &str,
    tied: bool,
    ty: GgufType,
    margin: f32,
    reshape: impl FnOnce(&Path),
) {
    let base = tempfile::tempdir().unwrap();
    let adapter = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let fused = out.path().join("fused");
    random_model(base.path(), model_type, family, tied);
    reshape(base.path());
    random_adapter(adapter.path(), layers_of(model_type));
    let opts = FuseOptions {
        dequantize: false,
        export_gguf: Some(ty),
    };
    let result = fuse(base.path(), adapter.path(), &fused, &opts).unwrap();
    let gguf = result.gguf.unwrap();
    let llama = LlamaCppModel::load(&gguf, &LoadOptions::new().threads(2)).unwrap();
    let mlx = MlxModel::load(&fused, &LoadOptions::new(), Placement::Cpu).unwrap();

    // llama.cpp reads the exported vocabulary as the Hugging Face tokenizer
    // splits text.
    let hf = mlx.tokenizer().unwrap();
    for text in TRICKY.iter().chain(&LONG_WORDS) {
        assert_eq!(
            llama.llama_tokenize(text, true).unwrap(),
            hf.encode(text, true).unwrap(),
            "{model_type}: {text:?}"
        );
    }
    assert_eq!(llama.info().vocab_size, mlx.info().vocab_size);

    // Greedy ids agree while MLX's choice is clear of the export's rounding.
    let prompt = hf.encode("The capital of France is", true).unwrap();
    let steps = 12;
    let want: Vec<_> = mlx
        .generate_ids(prompt.clone(), &greedy(steps).logprobs(2))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let got: Vec<u32> = llama
        .generate_ids(prompt, &greedy(steps))
        .unwrap()
        .map(|t| t.unwrap().id)
        .collect();
    let mut compared = 0;
    for (i, w) in want.iter().enumerate() {
        let top = &w.logprobs.as_ref().unwrap().top;
        if top[0].1 - top[1].1 < margin {
            break;
        }
        assert_eq!(
            got[i], w.id,
            "{model_type} step {i}: want {want:?}, got {got:?}"
        );
        compared += 1;
    }
    assert!(
        compared >= 3,
        "{model_type}: only {compared} clear steps: {want:?}"
    );
}

#[test]
fn fused_qwen3_exports_to_a_gguf_llama_cpp_runs_alike() {
    check("qwen3", "qwen3", true, GgufType::F16, 0.05);
}

#[test]
fn fused_qwen2_exports_to_a_gguf_llama_cpp_runs_alike() {
    check("qwen2", "qwen3", false, GgufType::F16, 0.05);
}

/// Q8_0 weights, and llama.cpp's Q8 activations beside them, move logits
/// by tenths here: only choices clear by half a unit are compared.
#[test]
fn fused_llama_exports_to_a_q8_0_gguf_llama_cpp_runs_alike() {
    check("llama", "llama3", false, GgufType::Q8_0, 0.5);
}

/// Gemma 3 with its SentencePiece vocabulary (scores from the merges'
/// order; llama.cpp's own `llama` tokenizer must split every tricky string as
/// the Hugging Face one does), its own `lm_head` (so that small embeddings
/// leave the choice to the layers), F16.
#[test]
fn fused_gemma3_exports_to_a_gguf_llama_cpp_runs_alike() {
    check("gemma3_text", "gemma3", false, GgufType::F16, 0.05);
}

/// A multimodal Gemma 3 checkpoint (`Gemma3ForConditionalGeneration`: the
/// text model under `language_model.` and `text_config`, a vision tower
/// beside it) exports its text model alone, which llama.cpp runs as MLX
/// runs the fused directory.
#[test]
fn a_multimodal_gemma3_exports_its_text_model() {
    check_with("gemma3_text", "gemma3", false, GgufType::F16, 0.05, |dir| {
        let path = dir.join("config.json");
        let text: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let config = json!({"model_type": "gemma3",
                "architectures": ["Gemma3ForConditionalGeneration"],
                "text_config": text, "vision_config": {"model_type": "siglip_vision_model"}});
        std::fs::write(&path, config.to_string()).unwrap();
        let weights = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = file
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let values = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                (
                    format!("language_model.{name}"),
                    view.shape().to_vec(),
                    values,
                )
            })
            .collect();
        t.push((
            "vision_tower.vision_model.embeddings.patch_embedding.weight".into(),
            vec![4, 4],
            vec![0.5; 16],
        ));
        t.push((
            "multi_modal_projector.mm_input_projection_weight".into(),
            vec![4, HIDDEN],
            vec![0.25; 4 * HIDDEN],
        ));
        write_safetensors(&weights, &t);
    });
}

/// Fusing a random `model_type` model whose `tokenizer.json` `edit`
/// changes, with a GGUF export, fails with `Unsupported` naming `what`,
/// and nothing is written.
fn refused(model_type: &str, family: &str, edit: impl FnOnce(&mut serde_json::Value), what: &str) {
    let base = tempfile::tempdir().unwrap();
    let adapter = tempfile::tempdir().unwrap();
    random_model(base.path(), model_type, family, false);
    random_adapter(adapter.path(), layers_of(model_type));
    let path = base.path().join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut tok);
    std::fs::write(&path, tok.to_string()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let fused = out.path().join("fused");
    let opts = FuseOptions {
        dequantize: false,
        export_gguf: Some(GgufType::F16),
    };
    let err = fuse(base.path(), adapter.path(), &fused, &opts).unwrap_err();
    assert!(
        matches!(err, inference_core::Error::Unsupported { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(what), "{err}");
    assert!(!fused.exists(), "nothing is written");
}

/// Vocabularies llama.cpp would split otherwise are refused before
/// anything is written.
#[test]
fn unsupported_exports_are_refused_up_front() {
    refused(
        "qwen3",
        "qwen3",
        |tok| tok["pre_tokenizer"] = serde_json::Value::Null,
        "pre-tokenizer",
    );
}

/// A SentencePiece vocabulary that puts a space first (Llama 2's
/// normaliser, here on Gemma's vocabulary) is refused before anything is
/// written: with llama.cpp's `add_space_prefix`, text that starts with
/// spaces splits otherwise than in the Hugging Face tokenizer (found by this
/// test when the export still wrote it).
#[test]
fn a_space_prefixing_sentencepiece_vocabulary_is_refused() {
    refused(
        "gemma3_text",
        "gemma3",
        |tok| {
            let replace = tok["normalizer"].clone();
            tok["normalizer"] = json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"}, replace]});
        },
        "normalised",
    );
}

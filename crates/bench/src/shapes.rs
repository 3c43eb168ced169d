//! Random-weight models in the shapes of real checkpoints.
//!
//! Speed depends on shapes and dtypes, not on the values of the weights, so a
//! benchmark can run a model of Qwen3-4B's shape without downloading Qwen3-4B.
//! [`write_model`] writes a Hugging Face directory (`config.json`,
//! `model.safetensors`, and the tokenizer files copied from a directory of the
//! same family) that both our engine and mlx-lm load.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use backend_metal::mlx_rs::{random, Array, Dtype};
use serde_json::{json, Value};

/// The architecture family of a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Qwen3 (q/k norms, tied embeddings for the small sizes).
    Qwen3,
    /// Gemma 3 text (sandwich norms, sliding-window layers).
    Gemma3,
}

/// The dimensions of a real checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// The name used on the command line (`qwen3-0.6b`, …).
    pub name: &'static str,
    /// Family.
    pub family: Family,
    /// Vocabulary size.
    pub vocab: i32,
    /// Hidden size.
    pub hidden: i32,
    /// MLP inner size.
    pub intermediate: i32,
    /// Decoder layers.
    pub layers: i32,
    /// Query heads.
    pub heads: i32,
    /// Key-value heads.
    pub kv_heads: i32,
    /// Head dimension.
    pub head_dim: i32,
}

/// The shapes the benchmarks know, from the published configs.
pub const SHAPES: &[Shape] = &[
    Shape {
        name: "qwen3-0.6b",
        family: Family::Qwen3,
        vocab: 151_936,
        hidden: 1024,
        intermediate: 3072,
        layers: 28,
        heads: 16,
        kv_heads: 8,
        head_dim: 128,
    },
    Shape {
        name: "qwen3-1.7b",
        family: Family::Qwen3,
        vocab: 151_936,
        hidden: 2048,
        intermediate: 6144,
        layers: 28,
        heads: 16,
        kv_heads: 8,
        head_dim: 128,
    },
    Shape {
        name: "qwen3-4b",
        family: Family::Qwen3,
        vocab: 151_936,
        hidden: 2560,
        intermediate: 9728,
        layers: 36,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
    },
    Shape {
        name: "qwen3-8b",
        family: Family::Qwen3,
        vocab: 151_936,
        hidden: 4096,
        intermediate: 12288,
        layers: 36,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
    },
    Shape {
        name: "gemma3-1b",
        family: Family::Gemma3,
        vocab: 262_144,
        hidden: 1152,
        intermediate: 6912,
        layers: 26,
        heads: 4,
        kv_heads: 1,
        head_dim: 256,
    },
    // Not a real checkpoint: Qwen3-0.6B's depth with tiny matrices, so that a
    // step costs what building and dispatching its graph costs (the per-token
    // overhead that bounds small models on a GPU), measurable on a CPU.
    Shape {
        name: "qwen3-overhead",
        family: Family::Qwen3,
        vocab: 1024,
        hidden: 64,
        intermediate: 128,
        layers: 28,
        heads: 2,
        kv_heads: 1,
        head_dim: 32,
    },
    // The same for Gemma-3-1B: its depth, its 512-position sliding window
    // on five layers in six, tiny matrices.
    Shape {
        name: "gemma3-overhead",
        family: Family::Gemma3,
        vocab: 1024,
        hidden: 64,
        intermediate: 128,
        layers: 26,
        heads: 2,
        kv_heads: 1,
        head_dim: 32,
    },
];

/// The shape called `name`.
pub fn shape(name: &str) -> Result<Shape> {
    SHAPES
        .iter()
        .find(|s| s.name == name)
        .copied()
        .with_context(|| {
            let known: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
            format!("unknown shape {name:?} (known: {})", known.join(", "))
        })
}

/// `config.json` of `shape` with `layers` decoder layers in `dtype`
/// (`float32` / `bfloat16` / `float16`).
pub fn config(shape: &Shape, layers: i32, dtype: &str) -> Value {
    let common = json!({
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "tie_word_embeddings": true,
        "torch_dtype": dtype,
    });
    let extra = match shape.family {
        Family::Qwen3 => json!({
            "model_type": "qwen3",
            "architectures": ["Qwen3ForCausalLM"],
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "max_position_embeddings": 40_960,
            "attention_bias": false,
            "bos_token_id": 151_643,
            "eos_token_id": 151_645,
        }),
        Family::Gemma3 => json!({
            "model_type": "gemma3_text",
            "architectures": ["Gemma3ForCausalLM"],
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "rope_scaling": null,
            "sliding_window": 512,
            "sliding_window_pattern": 6,
            "query_pre_attn_scalar": 256,
            "max_position_embeddings": 32_768,
            "final_logit_softcapping": null,
            "attn_logit_softcapping": null,
            "bos_token_id": 2,
            "eos_token_id": [1, 106],
        }),
    };
    let mut out = common;
    if let (Value::Object(o), Value::Object(e)) = (&mut out, extra) {
        o.extend(e);
    }
    out
}

/// Every tensor of the model: name, shape, and whether it is a norm weight.
fn tensor_list(shape: &Shape, layers: i32) -> Vec<(String, Vec<i32>, bool)> {
    let (h, i, d) = (shape.hidden, shape.intermediate, shape.head_dim);
    let (q, kv) = (shape.heads * d, shape.kv_heads * d);
    let mut t = vec![
        (
            "model.embed_tokens.weight".to_owned(),
            vec![shape.vocab, h],
            false,
        ),
        ("model.norm.weight".to_owned(), vec![h], true),
    ];
    let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
    if shape.family == Family::Gemma3 {
        norms.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
    }
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for n in &norms {
            t.push((format!("{p}.{n}.weight"), vec![h], true));
        }
        t.push((format!("{p}.self_attn.q_norm.weight"), vec![d], true));
        t.push((format!("{p}.self_attn.k_norm.weight"), vec![d], true));
        for (m, s) in [
            ("self_attn.q_proj", [q, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, q]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            t.push((format!("{p}.{m}.weight"), s.to_vec(), false));
        }
    }
    t
}

fn dtype_of(name: &str) -> Result<Dtype> {
    Ok(match name {
        "float32" | "f32" => Dtype::Float32,
        "bfloat16" | "bf16" => Dtype::Bfloat16,
        "float16" | "f16" => Dtype::Float16,
        other => bail!("unknown dtype {other:?} (float32, bfloat16 or float16)"),
    })
}

/// The canonical name of a dtype given as `f32`/`float32`, ….
pub fn dtype_name(name: &str) -> Result<&'static str> {
    Ok(match dtype_of(name)? {
        Dtype::Float32 => "float32",
        Dtype::Bfloat16 => "bfloat16",
        _ => "float16",
    })
}

/// Writes a random model of `shape` (with `layers` layers, or all of them)
/// in `dtype` to `out`, with the tokenizer files of `tokenizer_dir`. Weights
/// are N(0, 0.02²); norm weights are 1 (0 for Gemma, whose norms scale by
/// `1 + w`). Returns the bytes of weights written.
pub fn write_model(
    shape: &Shape,
    layers: Option<i32>,
    dtype: &str,
    tokenizer_dir: &Path,
    seed: u64,
    out: &Path,
) -> Result<u64> {
    let layers = layers.unwrap_or(shape.layers);
    if layers < 1 || layers > shape.layers {
        bail!(
            "{} has 1 to {} layers, not {layers}",
            shape.name,
            shape.layers
        );
    }
    let dt = dtype_of(dtype)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cfg = config(shape, layers, dtype_name(dtype)?);
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let from = tokenizer_dir.join(f);
        if from.is_file() {
            std::fs::copy(&from, out.join(f))
                .with_context(|| format!("copying {}", from.display()))?;
        } else if f == "tokenizer.json" {
            bail!("{} is missing", from.display());
        }
    }
    let mut arrays: HashMap<String, Array> = HashMap::new();
    let mut bytes = 0u64;
    for (n, (name, dims, norm)) in tensor_list(shape, layers).into_iter().enumerate() {
        let a = if norm {
            let fill = if shape.family == Family::Gemma3 {
                0.0
            } else {
                1.0
            };
            Array::full::<f32>(&dims, &Array::from_f32(fill))?.as_dtype(dt)?
        } else {
            let k = random::key(seed.wrapping_mul(1_000_003).wrapping_add(n as u64))?;
            random::normal::<f32>(&dims, 0.0, 0.02, &k)?.as_dtype(dt)?
        };
        a.eval()?;
        bytes += a.nbytes() as u64;
        arrays.insert(name, a);
    }
    let metadata: HashMap<String, String> = [("format".to_owned(), "pt".to_owned())].into();
    Array::save_safetensors(
        arrays.iter().map(|(k, v)| (k.as_str(), v)),
        &metadata,
        out.join("model.safetensors"),
    )?;
    Ok(bytes)
}

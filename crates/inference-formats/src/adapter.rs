//! LoRA adapters as mlx-lm writes them: a directory with
//! `adapters.safetensors` (tensors `<module path>.lora_a` `[in, r]` and
//! `<module path>.lora_b` `[r, out]`) and `adapter_config.json`, whose
//! `fine_tune_type`, `num_layers` and `lora_parameters` (`rank`, `scale`,
//! `dropout`, optional `keys`) say what the tensors mean. mlx-lm writes
//! every training argument into that file; the others are kept as they are
//! and not interpreted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::LoadError;

/// The adapter weights' file name in an adapter directory.
pub const ADAPTER_FILE: &str = "adapters.safetensors";
/// The adapter configuration's file name in an adapter directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// `lora_parameters` of an adapter configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraParameters {
    /// The rank `r` of each adapter.
    pub rank: usize,
    /// The factor on each adapter's delta.
    pub scale: f32,
    /// Dropout on each adapter's input while training.
    #[serde(default)]
    pub dropout: f32,
    /// The modules adapted within each layer (`self_attn.q_proj`, …);
    /// absent: every linear layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
}

/// An adapter directory's `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// `lora` (the only kind read today), `dora` or `full`.
    pub fine_tune_type: String,
    /// Layers adapted, counted from the top; −1: all.
    pub num_layers: i64,
    /// The adapters' shape and scale.
    pub lora: LoraParameters,
    /// Every other key, as written.
    pub rest: Map<String, Value>,
}

impl AdapterConfig {
    /// Reads `dir/adapter_config.json`. A missing or unreadable file is
    /// [`LoadError::File`]; invalid JSON or fields, a rank of 0 or a
    /// negative scale are [`LoadError::Config`]; a `fine_tune_type` other
    /// than `lora` is [`LoadError::Unsupported`].
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&path).map_err(|e| LoadError::file(&path, e))?;
        let bad = |what: String| LoadError::Config(format!("{}: {what}", path.display()));
        let mut rest: Map<String, Value> = match serde_json::from_str(&text) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(bad("not a JSON object".into())),
            Err(e) => return Err(bad(e.to_string())),
        };
        let fine_tune_type = match rest.remove("fine_tune_type") {
            None => "lora".to_owned(),
            Some(Value::String(s)) => s,
            Some(v) => return Err(bad(format!("fine_tune_type {v} is not a string"))),
        };
        if fine_tune_type != "lora" {
            return Err(LoadError::Unsupported(format!(
                "{}: fine_tune_type {fine_tune_type:?} (only `lora` adapters are read)",
                path.display()
            )));
        }
        let num_layers = match rest.remove("num_layers") {
            None => -1,
            Some(v) => v
                .as_i64()
                .filter(|&n| n == -1 || n > 0)
                .ok_or_else(|| bad(format!("num_layers {v} is not a positive count or -1")))?,
        };
        let lora: LoraParameters = match rest.remove("lora_parameters") {
            Some(v) => {
                serde_json::from_value(v).map_err(|e| bad(format!("lora_parameters: {e}")))?
            }
            None => return Err(bad("no lora_parameters".into())),
        };
        if lora.rank == 0 {
            return Err(bad("lora_parameters.rank is 0".into()));
        }
        if !lora.scale.is_finite() || !(0.0..1.0).contains(&lora.dropout) {
            return Err(bad(format!(
                "lora_parameters: scale {} / dropout {} out of range",
                lora.scale, lora.dropout
            )));
        }
        Ok(Self {
            fine_tune_type,
            num_layers,
            lora,
            rest,
        })
    }

    /// Whether an adapter on layer `layer` of `layers` at `key` is one this
    /// configuration describes (in the last `num_layers` layers, and among
    /// `keys` when it names them).
    pub fn covers(&self, layer: usize, layers: usize, key: &str) -> bool {
        let first = match usize::try_from(self.num_layers) {
            Ok(n) => layers.saturating_sub(n),
            Err(_) => 0,
        };
        layer >= first
            && self
                .lora
                .keys
                .as_ref()
                .is_none_or(|keys| keys.iter().any(|k| k == key))
    }

    /// The configuration as mlx-lm writes it (every other key kept).
    pub fn to_json(&self) -> Value {
        let mut map = self.rest.clone();
        map.insert("fine_tune_type".into(), self.fine_tune_type.clone().into());
        map.insert("num_layers".into(), self.num_layers.into());
        map.insert(
            "lora_parameters".into(),
            serde_json::to_value(&self.lora).unwrap_or(Value::Null),
        );
        Value::Object(map)
    }

    /// Writes `dir/adapter_config.json` (atomically).
    pub fn save(&self, dir: &Path) -> Result<PathBuf, LoadError> {
        let path = dir.join(ADAPTER_CONFIG);
        let text = serde_json::to_string_pretty(&self.to_json())
            .map_err(|e| LoadError::Config(e.to_string()))?;
        crate::write::write_atomic(&path, text.as_bytes())
            .map_err(|(p, e)| LoadError::file(p, e))?;
        Ok(path)
    }
}

/// The adapter weights file `path` names: a safetensors file named
/// directly (`adapters.safetensors` or a checkpoint's), else the
/// `adapters.safetensors` of the directory [`adapter_dir`] finds.
pub fn adapter_file(path: &Path) -> PathBuf {
    match path.extension() {
        Some(ext) if ext == "safetensors" => path.to_path_buf(),
        _ => adapter_dir(path).join(ADAPTER_FILE),
    }
}

/// The adapter directory `path` names: the directory itself, or the one
/// holding a file named directly (its `adapter_config.json`, its
/// `adapters.safetensors`, or a checkpoint's `NNNNNNN_adapters.safetensors`).
pub fn adapter_dir(path: &Path) -> &Path {
    let is_file = path.file_name().is_some_and(|n| n == ADAPTER_CONFIG)
        || path.extension().is_some_and(|e| e == "safetensors");
    match is_file {
        true => path.parent().unwrap_or(path),
        false => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) {
        std::fs::write(dir.join(ADAPTER_CONFIG), text).unwrap();
    }

    #[test]
    fn reads_mlx_lm_configs_and_refuses_what_it_cannot_use() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(matches!(
            AdapterConfig::load(d),
            Err(LoadError::File { .. })
        ));
        write(
            d,
            r#"{"fine_tune_type": "lora", "num_layers": 2, "iters": 5,
                "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}}"#,
        );
        let c = AdapterConfig::load(d).unwrap();
        assert_eq!((c.num_layers, c.lora.rank, c.lora.scale), (2, 8, 20.0));
        assert!(c.covers(3, 4, "self_attn.q_proj"));
        assert!(
            !c.covers(1, 4, "self_attn.q_proj"),
            "below the last two layers"
        );
        assert!(!c.covers(3, 4, "mlp.up_proj"), "not among the keys");
        assert_eq!(c.rest["iters"], 5, "other keys are kept");
        // Written back and read again: the same configuration.
        c.save(d).unwrap();
        assert_eq!(AdapterConfig::load(d).unwrap(), c);

        for (text, kind) in [
            ("[1, 2]", "config"),
            ("{", "config"),
            (
                r#"{"lora_parameters": {"rank": 0, "scale": 1.0}}"#,
                "config",
            ),
            (r#"{"lora_parameters": {"rank": 4}}"#, "config"),
            (
                r#"{"num_layers": 0, "lora_parameters": {"rank": 4, "scale": 1.0}}"#,
                "config",
            ),
            (
                r#"{"fine_tune_type": "dora", "lora_parameters": {"rank": 4, "scale": 1.0}}"#,
                "unsupported",
            ),
            (r#"{"fine_tune_type": "full"}"#, "unsupported"),
        ] {
            write(d, text);
            let e = AdapterConfig::load(d).unwrap_err();
            match kind {
                "config" => assert!(matches!(e, LoadError::Config(_)), "{text}: {e}"),
                _ => assert!(matches!(e, LoadError::Unsupported(_)), "{text}: {e}"),
            }
        }
    }
}

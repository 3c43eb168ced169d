//! The official `openai` Python package (PyPI, pinned by `cargo xtask test`,
//! which passes its interpreter in `INFER_TEST_OPENAI_PYTHON`) against the
//! server: `tests/openai_client.py` runs chat (whole, streamed, stop, tools,
//! logprobs, seed) and text completions, and checks the SDK's own error
//! classes for bad requests, an unknown model and a wrong key.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{scripted, start};
use inference_core::{LoadOptions, TextModel};
use inference_server::{ServedModel, ServerConfig};

#[test]
fn the_openai_sdk_talks_to_the_server() {
    let Some(python) = std::env::var_os("INFER_TEST_OPENAI_PYTHON") else {
        eprintln!("skipped: INFER_TEST_OPENAI_PYTHON is not set (`cargo xtask test` sets it)");
        return;
    };
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen3-f32");
    let qwen: Arc<dyn TextModel> = Arc::new(
        backend_metal::MlxModel::load(
            &fixture,
            &LoadOptions::new().gpu_layers(0),
            backend_metal::Placement::Cpu,
        )
        .unwrap(),
    );
    let tools = scripted(
        &[
            "<think>",
            "Need the weather.",
            "</think>",
            "\n\n",
            "<tool_call>",
            "\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n",
            "</tool_call>",
        ],
        "qwen3",
    );
    let words = scripted(&["Hello", " there", "!"], "scripted");
    let server = start(
        vec![
            ServedModel::new("qwen3", qwen),
            ServedModel::new("tools", tools),
            ServedModel::new("words", words),
        ],
        ServerConfig {
            api_key: Some("test-key".into()),
            ..ServerConfig::default()
        },
    );
    let base = server.base.clone();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(&base)
        .arg("test-key")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all passed"), "{stdout}");
}

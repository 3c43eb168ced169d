//! `cargo xtask bench`: our engine and mlx-lm side by side, on the same MLX
//! build, the same model files and the same prompt ids.
//!
//! - `bench cpu [--quick] [--llamacpp-only]` runs the CPU plan here (`--quick`:
//!   one short plan on SmolLM2, to check the set-up; `--llamacpp-only`: only
//!   the GGUF comparison below): it installs mlx-lm
//!   [`MLX_LM_VERSION`] with the `mlx-cpu` wheel our build links (checked to be
//!   the same `libmlx.so`), writes the models (a random Qwen3-0.6B-shaped f32
//!   model and SmolLM2-135M-Instruct converted from its Q4_1 GGUF), runs each
//!   scenario on both engines one after the other, then the SmolLM2 GGUF file
//!   itself on our llama.cpp backend, on llama-bench's method over llama.cpp's
//!   own API in the same build (`infer-bench llama-raw`) and on our MLX
//!   backend, and reports.
//! - `bench train [--quick]` times LoRA training here, ours
//!   (`infer-bench train`) against mlx-lm's trainer
//!   (`bench/mlx_lm_train_bench.py`), on SmolLM2-135M in f32 (from the demo
//!   GGUF file, dequantised) with the same synthetic data, batch, sequence
//!   length, layers and rank, in two interleaved rounds; tokens/s and peak
//!   memory into `bench/results/train-cpu.json`.
//! - `bench streams [--quick]` times concurrent calls here (continuous
//!   batching), ours against mlx-lm's `BatchGenerator`
//!   (`bench/plans/cpu-streams.json`: 1, 4 and 8 calls at once and 8
//!   arriving over 2 s, on SmolLM2-135M in f32), in two interleaved rounds;
//!   aggregate tokens/s and time to first token (p50, p99) into
//!   `bench/results/streams-cpu.json`. The GPU plan is
//!   `bench/plans/gpu-streams.json` (`gpu.sh plan`).
//! - `bench http [--quick]` times serving over HTTP here: our server
//!   (`infer-bench serve`) and `mlx_lm.server` on SmolLM2-135M in f32, each
//!   driven by `infer-bench http-load` with 1, 8 and 32 concurrent streaming
//!   clients, in two interleaved rounds; tokens/s and time to first token
//!   into `bench/results/http-cpu.json` (`gpu.sh http` on a GPU).
//! - `bench gpu-bundle` builds what a GPU machine without Rust or internet needs
//!   (`target/cuda/bench-bundle/`; `bench/gpu.sh` runs it there).
//! - `bench report RAW.jsonl --machine TEXT --out NAME` turns raw records into
//!   `bench/results/NAME.json` (medians, min/max, ratios) and prints a Markdown
//!   table.
//! - `bench plot RAW.jsonl --out NAME [--title TEXT]` draws each engine's and
//!   model's median decode tokens/s against the prompt length of the `single`
//!   records into `docs/img/NAME.svg` (for the context sweep,
//!   `bench/plans/gpu-context.json`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};

use crate::setup::{self, MLX_VERSION};
use crate::{cargo, models, run};

/// The mlx-lm release compared against.
pub const MLX_LM_VERSION: &str = "0.32.2";

const USAGE: &str = "usage: cargo xtask bench <cpu [--quick] [--llamacpp-only] | train [--quick] | streams [--quick] | http [--quick] | gpu-bundle | report RAW.jsonl --machine TEXT --out NAME [--bandwidth BYTES_PER_S] | plot RAW.jsonl --out NAME [--title TEXT]>";

/// Entry point of `cargo xtask bench …`.
pub fn main(root: &Path, args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("cpu") => {
            let (mut quick, mut only_llamacpp) = (false, false);
            for a in &args[1..] {
                match a.as_str() {
                    "--quick" => quick = true,
                    "--llamacpp-only" => only_llamacpp = true,
                    _ => bail!("{USAGE}"),
                }
            }
            cpu(root, quick, only_llamacpp)
        }
        Some("train") => match &args[1..] {
            [] => train(root, false),
            [q] if q == "--quick" => train(root, true),
            _ => bail!("{USAGE}"),
        },
        Some("http") => match &args[1..] {
            [] => http(root, false),
            [q] if q == "--quick" => http(root, true),
            _ => bail!("{USAGE}"),
        },
        Some("streams") => match &args[1..] {
            [] => streams(root, false),
            [q] if q == "--quick" => streams(root, true),
            _ => bail!("{USAGE}"),
        },
        Some("gpu-bundle") => gpu_bundle(root),
        Some("report") => {
            let mut raw = None;
            let mut machine = None;
            let mut out = None;
            let mut bandwidth = None;
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--machine" => machine = it.next().cloned(),
                    "--out" => out = it.next().cloned(),
                    "--bandwidth" => bandwidth = it.next().and_then(|b| b.parse::<f64>().ok()),
                    other if raw.is_none() => raw = Some(PathBuf::from(other)),
                    _ => bail!("{USAGE}"),
                }
            }
            let (Some(raw), Some(machine), Some(out)) = (raw, machine, out) else {
                bail!("{USAGE}");
            };
            report(root, &raw, &machine, &out, bandwidth)
        }
        Some("plot") => {
            let mut it = args[1..].iter();
            let (mut raw, mut out, mut title) = (None, None, None);
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--out" => out = it.next().cloned(),
                    "--title" => title = it.next().cloned(),
                    other if raw.is_none() => raw = Some(PathBuf::from(other)),
                    _ => bail!("{USAGE}"),
                }
            }
            let (Some(raw), Some(out)) = (raw, out) else {
                bail!("{USAGE}");
            };
            plot(
                root,
                &raw,
                &out,
                title.as_deref().unwrap_or("decode against context"),
            )
        }
        _ => bail!("{USAGE}"),
    }
}

/// `bench plot RAW --out NAME [--title T]`: each engine's and model's median
/// decode tokens/s of the `single` records in RAW against their prompt
/// length (the context a decode starts at), as `docs/img/NAME.svg`.
fn plot(root: &Path, raw: &Path, out: &str, title: &str) -> Result<()> {
    use plotters::prelude::*;
    let text = fs::read_to_string(raw).with_context(|| format!("reading {}", raw.display()))?;
    // (engine, model) → prompt → decode tokens/s.
    let mut series: BTreeMap<(String, String), BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let r: Value = serde_json::from_str(line).context("a raw record is not JSON")?;
        let (Some("single"), Some(engine), Some(label), Some(prompt), Some(tps)) = (
            r["scenario"].as_str(),
            r["engine"].as_str(),
            r["label"].as_str(),
            r["prompt"].as_u64(),
            r["decode_tps"].as_f64(),
        ) else {
            continue;
        };
        if r["run"].as_i64().is_some_and(|run| run < 0) {
            continue;
        }
        series
            .entry((engine.to_owned(), label.to_owned()))
            .or_default()
            .entry(prompt)
            .or_default()
            .push(tps);
    }
    let lines: Vec<(String, Vec<(f64, f64)>)> = series
        .into_iter()
        .map(|((engine, label), by_prompt)| {
            let points = by_prompt
                .into_iter()
                .map(|(p, mut v)| (p as f64, stats(&mut v)["median"].as_f64().unwrap_or(0.0)))
                .collect();
            (format!("{engine} · {label}"), points)
        })
        .filter(|(_, points): &(String, Vec<(f64, f64)>)| points.len() > 1)
        .collect();
    ensure!(
        !lines.is_empty(),
        "{} has no engine with `single` records at two or more prompt lengths",
        raw.display()
    );
    let all = || lines.iter().flat_map(|(_, p)| p.iter());
    let (x0, x1) = all().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let y1 = all().fold(0f64, |hi, p| hi.max(p.1)) * 1.1;
    let mut svg = String::new();
    {
        let area = SVGBackend::with_string(&mut svg, (860, 520)).into_drawing_area();
        let e = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing the plot: {e}");
        area.fill(&WHITE).map_err(|x| e(&x))?;
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((x0..x1).log_scale(), 0f64..y1)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("prompt tokens before decoding (log scale)")
            .y_desc("decode tokens/s")
            .x_labels(12)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|x| e(&x))?;
        for (i, (name, points)) in lines.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(|x| e(&x))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(|x| e(&x))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|x| e(&x))?;
        area.present().map_err(|x| e(&x))?;
    }
    let dir = root.join("docs/img");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{out}.svg"));
    fs::write(&path, svg)?;
    println!("bench: wrote {}", path.display());
    Ok(())
}

/// The Python environment with mlx-lm, `.cache/bench/venv`; returns its
/// interpreter.
fn venv(root: &Path) -> Result<PathBuf> {
    let dir = root.join(".cache/bench/venv");
    let py = dir.join("bin/python");
    let ready = Command::new(&py)
        .args([
            "-c",
            "import mlx.core as mx, mlx_lm; print(mx.__version__, mlx_lm.__version__)",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let want = format!("{MLX_VERSION} {MLX_LM_VERSION}");
    if ready.as_deref() != Some(want.as_str()) {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        run(Command::new(python).args(["-m", "venv"]).arg(&dir))?;
        run(Command::new(&py)
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .arg(format!("mlx[cpu]=={MLX_VERSION}"))
            .arg(format!("mlx-lm=={MLX_LM_VERSION}")))?;
    }
    Ok(py)
}

/// Builds `infer-bench` (release) for `env` and returns its path.
fn build_bench(root: &Path, env: &setup::MlxEnv) -> Result<PathBuf> {
    run(cargo(root, env).args(["build", "--release", "--package", "infer-bench"]))?;
    let target = env
        .target_dir()
        .map_or_else(|| root.join("target"), Path::to_path_buf);
    Ok(target.join("release/infer-bench"))
}

fn cpu(root: &Path, quick: bool, only_llamacpp: bool) -> Result<()> {
    let env = setup::run(root, false)?;
    crate::fetch::tokenizers(root)?;
    let gguf = models::fetch_default(root)?;
    let py = venv(root)?;
    let ours_lib = env.prefix().join("lib/libmlx.so");
    let theirs_lib = root.join(".cache/bench/venv/lib");
    let theirs = fs::read_dir(&theirs_lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/mlx/lib/libmlx.so"))
        .find(|p| p.is_file())
        .context("mlx-lm's environment has no libmlx.so")?;
    ensure!(
        models::sha256(&ours_lib)? == models::sha256(&theirs)?,
        "{} and {} differ: the comparison needs the same MLX build",
        ours_lib.display(),
        theirs.display()
    );
    println!(
        "bench: both engines load the same libmlx.so ({})",
        ours_lib.display()
    );
    let bin = build_bench(root, &env)?;

    let models = root.join(".cache/bench/models");
    let smol = models.join("smollm2-135m-q4");
    if !smol.join("model.safetensors").is_file() {
        run(Command::new(&bin)
            .args(["convert-gguf", "--gguf"])
            .arg(&gguf)
            .arg("--out")
            .arg(&smol))?;
    }
    let qwen = models.join("qwen3-0.6b-f32");
    if !quick && !qwen.join("model.safetensors").is_file() {
        run(Command::new(&bin)
            .args([
                "random-model",
                "--shape",
                "qwen3-0.6b",
                "--dtype",
                "float32",
            ])
            .arg("--tokenizer")
            .arg(root.join(".cache/tokenizers/qwen3"))
            .arg("--out")
            .arg(&qwen))?;
    }

    // The same model quantised by mlx-lm itself (4 and 8 bits, groups of
    // 64: the mlx-community layout), as `gpu.sh models SHAPE-q4|q8` does.
    for bits in ["4", "8"].into_iter().filter(|_| !quick) {
        let out = models.join(format!("qwen3-0.6b-q{bits}"));
        if !out.join("config.json").is_file() {
            run(Command::new(&py)
                .args(["-m", "mlx_lm", "convert", "--hf-path"])
                .arg(&qwen)
                .arg("--mlx-path")
                .arg(&out)
                .args(["-q", "--q-bits", bits, "--q-group-size", "64"]))?;
        }
    }

    // `--quick`: one short plan on SmolLM2 (about a minute), to check the set-up.
    let plan = if quick {
        vec![("smollm2-135m-q4", "quick.json")]
    } else {
        vec![
            ("smollm2-135m-q4", "cpu-smollm2.json"),
            ("qwen3-0.6b-f32", "cpu-qwen3.json"),
            ("qwen3-0.6b-q4", "cpu-quantised.json"),
            ("qwen3-0.6b-q8", "cpu-quantised.json"),
        ]
    };
    let stamp = Command::new("date")
        .arg("+%Y%m%d-%H%M%S")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "run".into());
    let raw_dir = root.join("bench/results/raw");
    fs::create_dir_all(&raw_dir)?;
    let raw = raw_dir.join(format!("cpu-{stamp}.jsonl"));
    for (label, plan_file) in plan.into_iter().filter(|_| !only_llamacpp) {
        let plan_file = root.join("bench/plans").join(plan_file);
        let model = models.join(label);
        let common = |cmd: &mut Command| {
            cmd.arg("--model")
                .arg(&model)
                .arg("--plan")
                .arg(&plan_file)
                .args(["--label", label, "--out"])
                .arg(&raw);
        };
        let mut ours = Command::new(&bin);
        ours.arg("run");
        common(&mut ours);
        run(&mut ours)?;
        let mut theirs = Command::new(&py);
        theirs.arg(root.join("bench/mlx_lm_bench.py"));
        common(&mut theirs);
        run(&mut theirs)?;
    }
    // llama.cpp on the GGUF file itself: our llama.cpp backend, the raw
    // llama.cpp loop of the same build, and our MLX backend on the same file.
    let gguf_label = "smollm2-135m-q4-gguf";
    let gguf_plan = root.join("bench/plans").join(if quick {
        "quick.json"
    } else {
        "cpu-smollm2.json"
    });
    for backend in ["llamacpp", "mlx"] {
        run(Command::new(&bin)
            .args(["run", "--backend", backend, "--model"])
            .arg(&gguf)
            .arg("--plan")
            .arg(&gguf_plan)
            .args(["--label", gguf_label, "--out"])
            .arg(&raw))?;
        if backend == "llamacpp" {
            run(Command::new(&bin)
                .args(["llama-raw", "--model"])
                .arg(&gguf)
                .arg("--plan")
                .arg(&gguf_plan)
                .args(["--label", gguf_label, "--out"])
                .arg(&raw))?;
        }
    }
    let machine = cpu_name();
    let out = match (quick, only_llamacpp) {
        (true, _) => "cpu-quick",
        (false, true) => "cpu-llamacpp",
        (false, false) => "cpu",
    };
    report(root, &raw, &machine, out, None)
}

/// `bench train`: LoRA training, ours and mlx-lm's, interleaved (ours,
/// theirs, theirs, ours) on the same model and synthetic data.
fn train(root: &Path, quick: bool) -> Result<()> {
    let env = setup::run(root, false)?;
    let py = venv(root)?;
    let bin = build_bench(root, &env)?;
    let label = "smollm2-135m-f32";
    let dense = smollm2_f32(root, &bin, &py)?;
    let raw_dir = root.join("bench/results/raw");
    fs::create_dir_all(&raw_dir)?;
    let raw = raw_dir.join("train-cpu.jsonl");
    if raw.exists() {
        fs::remove_file(&raw)?;
    }
    // (batch, sequence length): mlx-lm's default batch, short rows (a CPU
    // step of 4 × 64 tokens takes about 15 s here).
    let configs: &[(usize, usize)] = if quick { &[(2, 32)] } else { &[(4, 64)] };
    let (report_every, runs) = if quick { ("2", "1") } else { ("3", "2") };
    for &(batch, seq) in configs {
        let args = |cmd: &mut Command| {
            cmd.arg("--model")
                .arg(&dense)
                .args(["--label", label, "--batch", &batch.to_string()])
                .args(["--seq", &seq.to_string(), "--layers", "16", "--rank", "8"])
                .args(["--report", report_every, "--runs", runs, "--out"])
                .arg(&raw);
        };
        let ours = || {
            let mut c = Command::new(&bin);
            c.arg("train");
            args(&mut c);
            run(&mut c)
        };
        let theirs = || {
            let mut c = Command::new(&py);
            c.arg(root.join("bench/mlx_lm_train_bench.py"));
            args(&mut c);
            run(&mut c)
        };
        ours()?;
        theirs()?;
        theirs()?;
        ours()?;
    }
    report(root, &raw, &cpu_name(), "train-cpu", None)
}

/// The demo GGUF's SmolLM2-135M as an MLX directory in f32 (dequantised
/// by mlx-lm), written once; returns its directory.
fn smollm2_f32(root: &Path, bin: &Path, py: &Path) -> Result<PathBuf> {
    let gguf = models::fetch_default(root)?;
    let models = root.join(".cache/bench/models");
    let q4 = models.join("smollm2-135m-q4");
    if !q4.join("model.safetensors").is_file() {
        run(Command::new(bin)
            .args(["convert-gguf", "--gguf"])
            .arg(&gguf)
            .arg("--out")
            .arg(&q4))?;
    }
    let dense = models.join("smollm2-135m-f32");
    if !dense.join("config.json").is_file() {
        run(Command::new(py)
            .args(["-m", "mlx_lm", "convert", "--hf-path"])
            .arg(&q4)
            .arg("--mlx-path")
            .arg(&dense)
            .args(["--dequantize", "--dtype", "float32"]))?;
    }
    Ok(dense)
}

/// `bench streams`: concurrent calls (continuous batching), ours and
/// mlx-lm's `BatchGenerator`, interleaved (ours, theirs, theirs, ours) on
/// SmolLM2-135M in f32: aggregate tokens/s and time to first token.
fn streams(root: &Path, quick: bool) -> Result<()> {
    let env = setup::run(root, false)?;
    let py = venv(root)?;
    let bin = build_bench(root, &env)?;
    let model = smollm2_f32(root, &bin, &py)?;
    let raw_dir = root.join("bench/results/raw");
    fs::create_dir_all(&raw_dir)?;
    let raw = raw_dir.join("streams-cpu.jsonl");
    if raw.exists() {
        fs::remove_file(&raw)?;
    }
    let plan = root.join("bench/plans").join(if quick {
        "quick-streams.json"
    } else {
        "cpu-streams.json"
    });
    let common = |cmd: &mut Command| {
        cmd.arg("--model")
            .arg(&model)
            .arg("--plan")
            .arg(&plan)
            .args(["--label", "smollm2-135m-f32", "--out"])
            .arg(&raw);
    };
    let ours = || {
        let mut c = Command::new(&bin);
        c.arg("run");
        common(&mut c);
        run(&mut c)
    };
    let theirs = || {
        let mut c = Command::new(&py);
        c.arg(root.join("bench/mlx_lm_bench.py"));
        common(&mut c);
        run(&mut c)
    };
    ours()?;
    theirs()?;
    theirs()?;
    ours()?;
    let out = if quick {
        "streams-cpu-quick"
    } else {
        "streams-cpu"
    };
    report(root, &raw, &cpu_name(), out, None)
}

/// A server process, killed when dropped.
struct ServerProcess(std::process::Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `url`/v1/models answers (a server has loaded its model).
fn wait_ready(url: &str, server: &mut ServerProcess) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let ok = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", &format!("{url}/v1/models")])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        if let Some(status) = server.0.try_wait()? {
            bail!("the server exited with {status}");
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{url} did not come up"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// `bench http`: our server (`infer-bench serve`) and `mlx_lm.server` on the
/// same model, driven by `infer-bench http-load` with 1, 8 and 32 concurrent
/// streaming clients, interleaved (ours, theirs, theirs, ours), on
/// SmolLM2-135M in f32 here.
fn http(root: &Path, quick: bool) -> Result<()> {
    let env = setup::run(root, false)?;
    let py = venv(root)?;
    let bin = build_bench(root, &env)?;
    let model = smollm2_f32(root, &bin, &py)?;
    let raw_dir = root.join("bench/results/raw");
    fs::create_dir_all(&raw_dir)?;
    let raw = raw_dir.join("http-cpu.jsonl");
    if raw.exists() {
        fs::remove_file(&raw)?;
    }
    let clients: &[usize] = if quick { &[1, 4] } else { &[1, 8, 32] };
    fs::create_dir_all(root.join(".cache/bench/hf-cache"))?;
    let port = 8097;
    let url = format!("http://127.0.0.1:{port}");
    let engine = |ours: bool| -> Result<()> {
        let mut server = ServerProcess(if ours {
            Command::new(&bin)
                .arg("serve")
                .arg("--model")
                .arg(&model)
                .args(["--port", &port.to_string(), "--parallel", "32"])
                .spawn()?
        } else {
            Command::new(&py)
                .env("HF_HUB_CACHE", root.join(".cache/bench/hf-cache"))
                .args(["-m", "mlx_lm", "server", "--model"])
                .arg(&model)
                .args(["--port", &port.to_string(), "--log-level", "WARNING"])
                .spawn()?
        });
        wait_ready(&url, &mut server)?;
        for &c in clients {
            run(Command::new(&bin)
                .args(["http-load", "--url", &url, "--clients", &c.to_string()])
                .args(["--model-name", if ours { "model" } else { "default_model" }])
                .args([
                    "--requests",
                    "1",
                    "--prompt-words",
                    "8",
                    "--max-tokens",
                    "8",
                ])
                .args(["--runs", if quick { "1" } else { "2" }])
                .args(["--engine", if ours { "ours" } else { "mlx-lm" }])
                .args(["--label", "smollm2-135m-f32", "--out"])
                .arg(&raw))?;
        }
        Ok(())
    };
    engine(true)?;
    engine(false)?;
    engine(false)?;
    engine(true)?;
    let out = if quick { "http-cpu-quick" } else { "http-cpu" };
    report(root, &raw, &cpu_name(), out, None)
}

/// This machine's CPU model and core count.
fn cpu_name() -> String {
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cores} cores, MLX CPU backend")
}

/// What a GPU machine without Rust and internet needs to run `bench/gpu.sh`:
/// the CUDA build of `infer-bench`, the driver, the tokenizers, and the
/// mlx / mlx-lm wheels (the mlx-cuda-13 wheel in pieces, as for the smoke
/// tests).
fn gpu_bundle(root: &Path) -> Result<()> {
    let env = setup::run(root, true)?;
    crate::fetch::tokenizers(root)?;
    let bin = build_bench(root, &env)?;
    let target = env
        .target_dir()
        .context("the CUDA environment has no target directory")?
        .to_path_buf();
    let bundle = target.join("bench-bundle");
    if bundle.exists() {
        fs::remove_dir_all(&bundle)?;
    }
    fs::create_dir_all(&bundle)?;
    run(Command::new("sh").arg("-c").arg(format!(
        "strip -o '{b}/infer-bench' '{bin}' && xz -T2 -6 -f '{b}/infer-bench' && \
         tar -C '{tok}' -cJf '{b}/tokenizers.tar.xz' qwen3 gemma3 && \
         cp -r '{root}/bench/mlx_lm_bench.py' '{root}/bench/mlx_lm_train_bench.py' '{root}/bench/gpu.sh' '{root}/bench/plans' '{root}/bench/cupti' '{b}/'",
        b = bundle.display(),
        bin = bin.display(),
        tok = root.join(".cache/tokenizers").display(),
        root = root.display(),
    )))?;
    let wheels = bundle.join("wheels");
    fs::create_dir_all(&wheels)?;
    run(Command::new(venv(root)?)
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .args([
            "-m",
            "pip",
            "download",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
        ])
        .args([
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
        ])
        .args(["--platform", "manylinux_2_35_x86_64", "--dest"])
        .arg(&wheels)
        .arg(format!("mlx=={MLX_VERSION}"))
        .arg(format!("mlx-lm=={MLX_LM_VERSION}")))?;
    let wheel = setup::cuda_wheel_pieces(root, &target)?;
    fs::write(bundle.join("wheel.name"), format!("{wheel}\n"))?;
    let sha = models::sha256(&root.join(".cache/mlx/wheels").join(&wheel))?;
    fs::write(bundle.join("wheel.sha256"), format!("{sha}  {wheel}\n"))?;
    println!(
        "bench: bundle {} (carry it with the pieces of {wheel} in {}; bench/gpu.sh says how)",
        bundle.display(),
        target.join("bundle-wheel").display()
    );
    Ok(())
}

/// Median, min and max of `v` (non-empty).
fn stats(v: &mut [f64]) -> Value {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    json!({"median": median, "min": v[0], "max": v[n - 1], "runs": n})
}

/// The figures of a scenario, as (key, higher is better).
fn metrics(scenario: &str) -> &'static [(&'static str, bool)] {
    match scenario {
        "single" => &[
            ("prefill_tps", true),
            ("decode_tps", true),
            ("decode_cpu_tps", true),
            ("ttft_s", false),
        ],
        "train" => &[("train_tps", true), ("peak_memory_mb", false)],
        "http" => &[
            ("http_tps", true),
            ("ttft_p50_s", false),
            ("ttft_p99_s", false),
        ],
        "streams" => &[
            ("stream_tps", true),
            ("ttft_p50_s", false),
            ("ttft_p99_s", false),
        ],
        "batch" => &[
            ("batch_tps", true),
            ("sequential_tps", true),
            ("speedup", true),
        ],
        _ => &[
            ("reuse_ttft_s", false),
            ("fresh_ttft_s", false),
            ("speedup", true),
        ],
    }
}

const PARAMS: &[&str] = &[
    "prompt",
    "decode",
    "batch",
    "history",
    "reply",
    "new",
    "layers",
    "rank",
    "grad_checkpoint",
    "streams",
    "spread_ms",
    "clients",
    "requests",
];

/// The engines compared, as (A, B): the report gives A ÷ B for rates (B ÷ A
/// for times). `ours` is the MLX backend, `ours-llamacpp` the llama.cpp
/// backend, `llama.cpp-raw` llama-bench's method on llama.cpp's own API in
/// the same build (`infer-bench llama-raw`; llama-bench itself is not in
/// the llama-cpp-sys-2 crate's sources).
const PAIRS: &[(&str, &str)] = &[
    ("ours", "mlx-lm"),
    ("ours-llamacpp", "llama.cpp-raw"),
    ("ours-llamacpp", "ours"),
];

/// Aggregates raw records into `bench/results/{out}.json` and prints a
/// Markdown summary.
fn report(root: &Path, raw: &Path, machine: &str, out: &str, bandwidth: Option<f64>) -> Result<()> {
    let text = fs::read_to_string(raw).with_context(|| format!("reading {}", raw.display()))?;
    // (label, scenario, params) → engine → records.
    let mut groups: BTreeMap<(String, String, String), BTreeMap<String, Vec<Value>>> =
        BTreeMap::new();
    let mut versions = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let r: Value = serde_json::from_str(line).context("a raw record is not JSON")?;
        let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
        let params: Vec<String> = PARAMS
            .iter()
            .filter_map(|p| r[*p].as_u64().map(|v| format!("{p}={v}")))
            .collect();
        for k in ["mlx_version", "mlx_lm_version", "device"] {
            if let Some(v) = r[k].as_str() {
                versions.insert(format!("{}.{k}", s("engine")), v.to_owned());
            }
        }
        groups
            .entry((s("label"), s("scenario"), params.join(" ")))
            .or_default()
            .entry(s("engine"))
            .or_default()
            .push(r);
    }
    let mut rows = Vec::new();
    let mut table = String::from(
        "| model | scenario | figure | A (median [min–max]) | B (median [min–max]) | A ÷ B |\n|---|---|---|---|---|---|\n",
    );
    for ((label, scenario, params), engines) in &groups {
        let mut row = Map::new();
        row.insert("model".into(), json!(label));
        row.insert("scenario".into(), json!(scenario));
        row.insert("params".into(), json!(params));
        let weight_bytes = ["ours", "ours-llamacpp"]
            .iter()
            .filter_map(|e| engines.get(*e))
            .filter_map(|v| v.first())
            .find_map(|r| r["weight_bytes"].as_u64());
        for (key, higher) in metrics(scenario) {
            let mut per = Map::new();
            let mut medians = BTreeMap::new();
            for (engine, recs) in engines {
                let mut v: Vec<f64> = recs.iter().filter_map(|r| r[*key].as_f64()).collect();
                if v.is_empty() {
                    continue;
                }
                let st = stats(&mut v);
                medians.insert(engine.clone(), st["median"].as_f64().unwrap_or(0.0));
                per.insert(engine.clone(), st);
            }
            let cell = |e: &str, per: &Map<String, Value>| {
                per.get(e).map_or("–".to_owned(), |s| {
                    format!(
                        "{} {} [{}–{}]",
                        e,
                        fmt(s["median"].as_f64()),
                        fmt(s["min"].as_f64()),
                        fmt(s["max"].as_f64())
                    )
                })
            };
            for (a, b) in PAIRS {
                let ratio = match (medians.get(*a), medians.get(*b)) {
                    (Some(x), Some(y)) if *x > 0.0 && *y > 0.0 => {
                        Some(if *higher { x / y } else { y / x })
                    }
                    _ => None,
                };
                let Some(r) = ratio else { continue };
                let name = if (*a, *b) == PAIRS[0] {
                    "ratio".to_owned()
                } else {
                    format!("ratio_{a}_vs_{b}")
                };
                per.insert(name, json!(r));
                table.push_str(&format!(
                    "| {label} | {scenario} {params} | {key} | {} | {} | {r:.2}× |\n",
                    cell(a, &per),
                    cell(b, &per),
                ));
            }
            if let (true, Some(b), Some(bw)) = (*key == "decode_tps", weight_bytes, bandwidth) {
                for (engine, m) in &medians {
                    per.insert(
                        format!("{engine}_bandwidth_fraction"),
                        json!(b as f64 * m / bw),
                    );
                }
            }
            row.insert((*key).into(), Value::Object(per));
        }
        if let Some(b) = weight_bytes {
            row.insert("weight_bytes".into(), json!(b));
        }
        rows.push(Value::Object(row));
    }
    let doc = json!({
        "machine": machine,
        "versions": versions,
        "bandwidth_bytes_per_s": bandwidth,
        "raw": raw.strip_prefix(root).unwrap_or(raw).display().to_string(),
        "note": "ratio: ours ÷ mlx-lm for rates, mlx-lm ÷ ours for times (above 1 = ours faster); ratio_A_vs_B likewise for the other pairs",
        "results": rows,
    });
    let dir = root.join("bench/results");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{out}.json"));
    fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
    println!("{table}");
    println!("bench: wrote {}", path.display());
    Ok(())
}

fn fmt(v: Option<f64>) -> String {
    match v {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 1.0 => format!("{x:.2}"),
        Some(x) => format!("{x:.4}"),
        None => "–".into(),
    }
}

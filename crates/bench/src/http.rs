//! Serving benchmarks over HTTP: `infer-bench serve` runs our server
//! (`inference-server`, the MLX backend) in this binary, and
//! `infer-bench http-load` drives any OpenAI-compatible server (ours or
//! `mlx_lm.server`) with C concurrent clients, each sending R streamed chat
//! requests one after another: aggregate tokens/s (content chunks, one per
//! token on both servers) over the wall time, and each request's time to
//! first token.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use backend_metal::{MlxModel, Placement};
use inference_core::{LoadOptions, TextModel};
use inference_server::{ServedModel, ServerConfig};
use serde_json::{json, Value};

/// `infer-bench serve`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The model directory (or GGUF file).
    #[arg(long)]
    pub model: PathBuf,
    /// The port on 127.0.0.1.
    #[arg(long, default_value_t = 8090)]
    pub port: u16,
    /// Requests decoded together.
    #[arg(long, default_value_t = 32)]
    pub parallel: usize,
}

/// Serves `args.model` until killed.
pub fn serve(args: &ServeArgs) -> Result<()> {
    let opts = LoadOptions::new().parallel_slots(args.parallel);
    let model = MlxModel::load(&args.model, &opts, Placement::Default)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let model: Arc<dyn TextModel> = Arc::new(model);
    let app = inference_server::router(
        vec![ServedModel::new("model", model)],
        ServerConfig::default(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
        eprintln!("serving on http://127.0.0.1:{}", args.port);
        inference_server::serve(listener, app, std::future::pending()).await?;
        Ok(())
    })
}

/// `infer-bench http-load`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// The server's base URL.
    #[arg(long)]
    pub url: String,
    /// The `model` field of the requests.
    #[arg(long, default_value = "model")]
    pub model_name: String,
    /// Concurrent clients.
    #[arg(long)]
    pub clients: usize,
    /// Requests per client, one after another.
    #[arg(long, default_value_t = 4)]
    pub requests: usize,
    /// Words of each prompt.
    #[arg(long, default_value_t = 64)]
    pub prompt_words: usize,
    /// `max_tokens` of each request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// The engine's name in the records (`ours`, `mlx-lm`).
    #[arg(long)]
    pub engine: String,
    /// The model's name in the records.
    #[arg(long)]
    pub label: String,
    /// Measured runs (one more runs first, unrecorded).
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
    /// The JSON-lines file to append to.
    #[arg(long)]
    pub out: PathBuf,
}

/// The prompt of client `c`'s request `r`: `words` distinct words.
fn prompt(c: usize, r: usize, words: usize) -> String {
    (0..words)
        .map(|i| format!("w{}", (c * 7919 + r * 104_729 + i * 31) % 9973))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One streamed request: (time to first token, tokens).
fn request(
    client: &reqwest::blocking::Client,
    args: &LoadArgs,
    c: usize,
    r: usize,
) -> Result<(f64, usize)> {
    let body = json!({
        "model": args.model_name,
        "messages": [{"role": "user", "content": prompt(c, r, args.prompt_words)}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": true,
    });
    let started = Instant::now();
    let mut resp = client
        .post(format!("{}/v1/chat/completions", args.url))
        .json(&body)
        .send()?;
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    let mut buf = String::new();
    let mut first = None;
    let mut tokens = 0usize;
    let mut chunk = [0u8; 4096];
    loop {
        let n = std::io::Read::read(&mut resp, &mut chunk)?;
        if n == 0 {
            break;
        }
        buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
        while let Some(at) = buf.find("\n\n") {
            let event: String = buf.drain(..at + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data)?;
                let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
                if !content.is_empty() {
                    tokens += 1;
                    first.get_or_insert_with(|| started.elapsed().as_secs_f64());
                }
            }
        }
    }
    Ok((first.context("no token came")?, tokens))
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Runs the load and appends one record per measured run.
pub fn load(args: &LoadArgs) -> Result<()> {
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .with_context(|| format!("opening {}", args.out.display()))?;
    for run in 0..=args.runs {
        let started = Instant::now();
        let results: Vec<Result<Vec<(f64, usize)>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..args.clients)
                .map(|c| {
                    s.spawn(move || {
                        let client = reqwest::blocking::Client::builder()
                            .timeout(Duration::from_secs(600))
                            .build()?;
                        (0..args.requests)
                            .map(|r| request(&client, args, c + run * args.clients, r))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| bail!("a client panicked")))
                .collect()
        });
        let wall = started.elapsed().as_secs_f64();
        let mut ttfts = Vec::new();
        let mut tokens = 0;
        for r in results {
            for (ttft, n) in r? {
                ttfts.push(ttft);
                tokens += n;
            }
        }
        ttfts.sort_by(f64::total_cmp);
        let rec = json!({
            "engine": args.engine,
            "label": args.label,
            "scenario": "http",
            "clients": args.clients,
            "requests": args.requests,
            "prompt": args.prompt_words,
            "decode": args.max_tokens,
            "run": run as i64 - 1,
            "wall_s": wall,
            "tokens": tokens,
            "http_tps": tokens as f64 / wall,
            "ttft_p50_s": percentile(&ttfts, 50.0),
            "ttft_p99_s": percentile(&ttfts, 99.0),
        });
        let line = serde_json::to_string(&rec)?;
        eprintln!("{}{line}", if run == 0 { "(warm-up) " } else { "" });
        if run > 0 {
            writeln!(out, "{line}")?;
            out.flush()?;
        }
    }
    Ok(())
}

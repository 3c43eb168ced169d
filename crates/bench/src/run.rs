//! Timed runs of our engine, measured exactly as `bench/mlx_lm_bench.py`
//! measures mlx-lm: the same prompt ids, greedy sampling, exactly the
//! requested number of tokens (end-of-sequence ignored), and times taken
//! where the caller receives tokens.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use backend_llamacpp::LlamaCppModel;
use backend_metal::{memory, MlxModel, Placement};
use inference_core::{Backend, BatchResult, GenerateOptions, LoadOptions, TextModel, TokenStream};
use serde_json::{json, Map, Value};

/// The prompt ids of row `row`: `n` ids spread over the ordinary part of a
/// vocabulary of `vocab` ids (the same formula as the Python driver).
pub fn prompt_ids(n: usize, row: usize, vocab: usize) -> Vec<u32> {
    let lo = 100.min(vocab / 4);
    let span = 29_000.min(vocab - lo).max(1);
    (0..n)
        .map(|i| (lo + ((i + 1009 * row) * 7919) % span) as u32)
        .collect()
}

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub enum Scenario {
    /// One stream: prefill `prompt` ids, then decode `decode` tokens.
    Single {
        /// Prompt length.
        prompt: usize,
        /// Tokens generated.
        decode: usize,
    },
    /// `batch` prompts generated together, then one after another.
    Batch {
        /// Prompt length of every row.
        prompt: usize,
        /// Tokens generated per row.
        decode: usize,
        /// Rows.
        batch: usize,
    },
    /// `streams` calls, each of `prompt` ids and `decode` tokens, arriving
    /// evenly over `spread_ms` (0: all at once) and served together:
    /// aggregate tokens/s and each call's time to first token from its
    /// arrival.
    Streams {
        /// Prompt length of every call.
        prompt: usize,
        /// Tokens generated per call.
        decode: usize,
        /// Calls.
        streams: usize,
        /// Milliseconds over which the calls arrive.
        spread_ms: usize,
    },
    /// A second chat turn's time to first token, with and without reusing
    /// the first turn's KV cache.
    Chat {
        /// First-turn prompt length.
        history: usize,
        /// First-turn reply length.
        reply: usize,
        /// New ids of the second turn.
        new: usize,
    },
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Single { .. } => "single",
            Scenario::Batch { .. } => "batch",
            Scenario::Streams { .. } => "streams",
            Scenario::Chat { .. } => "chat",
        }
    }

    fn params(&self) -> Value {
        match *self {
            Scenario::Single { prompt, decode } => json!({"prompt": prompt, "decode": decode}),
            Scenario::Batch {
                prompt,
                decode,
                batch,
            } => json!({"prompt": prompt, "decode": decode, "batch": batch}),
            Scenario::Streams {
                prompt,
                decode,
                streams,
                spread_ms,
            } => json!({
                "prompt": prompt,
                "decode": decode,
                "streams": streams,
                "spread_ms": spread_ms,
            }),
            Scenario::Chat {
                history,
                reply,
                new,
            } => json!({"history": history, "reply": reply, "new": new}),
        }
    }
}

/// Greedy options that generate exactly `n` tokens.
fn exactly(n: usize) -> GenerateOptions {
    GenerateOptions::new()
        .max_tokens(n)
        .temperature(0.0)
        .ignore_eos(true)
}

/// The CPU time this process (every thread) has used, in seconds: unlike
/// the wall clock, not moved by time a shared machine's other tenants take.
pub fn process_cpu_s() -> f64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
}

/// A stream's timings.
struct Drained {
    /// Time to the first token.
    ttft: f64,
    /// First token to last, wall clock.
    decode: f64,
    /// First token to last, the process's CPU time.
    decode_cpu: f64,
    ids: Vec<u32>,
}

fn drain(started: Instant, stream: TokenStream) -> Result<Drained> {
    let mut first = None;
    let mut last = (started, 0.0);
    let mut ids = Vec::new();
    for tok in stream {
        let tok = tok.context("generation failed")?;
        let now = (Instant::now(), process_cpu_s());
        first.get_or_insert(now);
        last = now;
        ids.push(tok.id);
    }
    let first = first.context("the stream produced no token")?;
    Ok(Drained {
        ttft: first.0.duration_since(started).as_secs_f64(),
        decode: last.0.duration_since(first.0).as_secs_f64(),
        decode_cpu: last.1 - first.1,
        ids,
    })
}

/// The engine a run measures.
enum Engine {
    Mlx(MlxModel),
    LlamaCpp(LlamaCppModel),
}

impl Engine {
    fn generate_ids(&self, ids: Vec<u32>, opts: &GenerateOptions) -> Result<TokenStream> {
        Ok(match self {
            Engine::Mlx(m) => m.generate_ids(ids, opts)?,
            Engine::LlamaCpp(m) => m.generate_ids(ids, opts)?,
        })
    }

    fn batch_generate_ids(
        &self,
        prompts: Vec<Vec<u32>>,
        opts: &GenerateOptions,
    ) -> Result<Vec<BatchResult>> {
        Ok(match self {
            Engine::Mlx(m) => m.batch_generate_ids(prompts, opts)?,
            Engine::LlamaCpp(m) => m.batch_generate_ids(prompts, opts)?,
        })
    }

    fn model(&self) -> &dyn TextModel {
        match self {
            Engine::Mlx(m) => m,
            Engine::LlamaCpp(m) => m,
        }
    }

    /// Frees MLX's buffer cache between runs (llama.cpp keeps none).
    fn clear_cache(&self) {
        if let Engine::Mlx(_) = self {
            memory::clear_cache();
        }
    }
}

fn single(model: &Engine, ids: Vec<u32>, decode: usize) -> Result<Drained> {
    let started = Instant::now();
    let stream = model.generate_ids(ids, &exactly(decode))?;
    let out = drain(started, stream)?;
    if out.ids.len() != decode {
        bail!("generated {} tokens, not {decode}", out.ids.len());
    }
    Ok(out)
}

fn measure(model: &Engine, scenario: Scenario, vocab: usize) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    match scenario {
        Scenario::Single { prompt, decode } => {
            let Drained {
                ttft,
                decode: dec,
                decode_cpu,
                ids,
            } = single(model, prompt_ids(prompt, 0, vocab), decode)?;
            m.insert("ttft_s".into(), json!(ttft));
            m.insert("prefill_tps".into(), json!(prompt as f64 / ttft));
            m.insert("decode_s".into(), json!(dec));
            m.insert(
                "decode_tps".into(),
                json!(decode.saturating_sub(1) as f64 / dec),
            );
            m.insert(
                "decode_cpu_tps".into(),
                json!(decode.saturating_sub(1) as f64 / decode_cpu),
            );
            m.insert("generated".into(), json!(ids.len()));
            m.insert("first_ids".into(), json!(&ids[..ids.len().min(16)]));
            // Every id, so that two settings' greedy outputs can be compared
            // in full (an A/B of a kernel change).
            m.insert("ids".into(), json!(&ids));
        }
        Scenario::Batch {
            prompt,
            decode,
            batch,
        } => {
            let prompts: Vec<Vec<u32>> = (0..batch).map(|r| prompt_ids(prompt, r, vocab)).collect();
            let started = Instant::now();
            let results = model.batch_generate_ids(prompts.clone(), &exactly(decode))?;
            let batch_s = started.elapsed().as_secs_f64();
            for (r, res) in results.iter().enumerate() {
                if let Some(e) = &res.error {
                    bail!("batch row {r} failed: {e}");
                }
                if res.tokens.len() != decode {
                    bail!("batch row {r} generated {}, not {decode}", res.tokens.len());
                }
            }
            // Each row timed as `single` times it, summed (the Python driver
            // does the same).
            let mut seq_s = 0.0;
            let mut same = true;
            for (p, res) in prompts.into_iter().zip(&results) {
                model.clear_cache();
                let Drained {
                    ttft,
                    decode: dec,
                    ids,
                    ..
                } = single(model, p, decode)?;
                seq_s += ttft + dec;
                same &= res.tokens.iter().map(|t| t.id).eq(ids.iter().copied());
            }
            let total = (batch * decode) as f64;
            m.insert("batch_s".into(), json!(batch_s));
            m.insert("batch_tps".into(), json!(total / batch_s));
            m.insert("sequential_s".into(), json!(seq_s));
            m.insert("sequential_tps".into(), json!(total / seq_s));
            m.insert("speedup".into(), json!(seq_s / batch_s));
            m.insert("rows_match_single".into(), json!(same));
        }
        Scenario::Streams {
            prompt,
            decode,
            streams,
            spread_ms,
        } => {
            let start = Instant::now() + std::time::Duration::from_millis(20);
            let spread = std::time::Duration::from_millis(spread_ms as u64);
            let results: Vec<Result<(f64, Instant, usize)>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..streams)
                    .map(|r| {
                        let arrive = start + spread * r as u32 / streams as u32;
                        let ids = prompt_ids(prompt, r, vocab);
                        s.spawn(move || {
                            std::thread::sleep(arrive.saturating_duration_since(Instant::now()));
                            let stream = model.generate_ids(ids, &exactly(decode))?;
                            let Drained { ttft, ids: got, .. } = drain(arrive, stream)?;
                            Ok((ttft, Instant::now(), got.len()))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| bail!("a stream panicked")))
                    .collect()
            });
            let mut ttfts = Vec::with_capacity(streams);
            let mut end = start;
            for (r, res) in results.into_iter().enumerate() {
                let (ttft, done, n) = res?;
                if n != decode {
                    bail!("stream {r} generated {n}, not {decode}");
                }
                ttfts.push(ttft);
                end = end.max(done);
            }
            ttfts.sort_by(f64::total_cmp);
            let wall = end.duration_since(start).as_secs_f64();
            m.insert("wall_s".into(), json!(wall));
            m.insert("stream_tps".into(), json!((streams * decode) as f64 / wall));
            m.insert("ttft_p50_s".into(), json!(percentile(&ttfts, 50.0)));
            m.insert("ttft_p99_s".into(), json!(percentile(&ttfts, 99.0)));
        }
        Scenario::Chat {
            history,
            reply,
            new,
        } => {
            let Engine::Mlx(model) = model else {
                bail!("the chat scenario measures MLX's id sessions");
            };
            let mut session = model.id_session();
            let first = prompt_ids(history, 0, vocab);
            let stream = session.send(first.clone(), &exactly(reply))?;
            let reply_ids = drain(Instant::now(), stream)?.ids;
            let mut second = first;
            second.extend_from_slice(&reply_ids);
            second.extend(prompt_ids(new, 1, vocab));
            let before = model.reused_prompt_tokens();
            let started = Instant::now();
            let stream = session.send(second.clone(), &exactly(1))?;
            let Drained {
                ttft: reuse_ttft,
                ids: reuse_ids,
                ..
            } = drain(started, stream)?;
            let reused = model.reused_prompt_tokens() - before;
            let started = Instant::now();
            let stream = model.generate_ids(second.clone(), &exactly(1))?;
            let Drained {
                ttft: fresh_ttft,
                ids: fresh_ids,
                ..
            } = drain(started, stream)?;
            m.insert("reuse_ttft_s".into(), json!(reuse_ttft));
            m.insert("fresh_ttft_s".into(), json!(fresh_ttft));
            m.insert("cached_positions".into(), json!(reused));
            m.insert("reuse_prefilled".into(), json!(second.len() - reused));
            m.insert("fresh_prefilled".into(), json!(second.len()));
            m.insert("speedup".into(), json!(fresh_ttft / reuse_ttft));
            m.insert("first_tokens_match".into(), json!(reuse_ids == fresh_ids));
        }
    }
    Ok(m)
}

/// The `p`-th percentile of sorted `v` (nearest rank), as the Python
/// driver computes it.
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// One step of a plan: a scenario with its run counts.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// What to measure.
    pub scenario: Scenario,
    /// Measured runs.
    pub runs: usize,
    /// Unrecorded runs first.
    pub warmup: usize,
}

/// Reads a plan: a JSON list of `{scenario, its parameters, runs?, warmup?}`
/// (the file `bench/mlx_lm_bench.py --plan` reads too); `runs` and `warmup`
/// default to the given values.
pub fn read_plan(path: &Path, runs: usize, warmup: usize) -> Result<Vec<Step>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let items: Vec<Map<String, Value>> =
        serde_json::from_str(&text).with_context(|| format!("{} is not a plan", path.display()))?;
    items
        .iter()
        .map(|item| {
            let num = |k: &str| -> Result<usize> {
                item.get(k)
                    .and_then(Value::as_u64)
                    .map(|v| v as usize)
                    .with_context(|| format!("plan step {item:?} has no `{k}`"))
            };
            let or = |k: &str, d: usize| {
                item.get(k)
                    .and_then(Value::as_u64)
                    .map_or(d, |v| v as usize)
            };
            let scenario = match item.get("scenario").and_then(Value::as_str) {
                Some("single") => Scenario::Single {
                    prompt: num("prompt")?,
                    decode: num("decode")?,
                },
                Some("batch") => Scenario::Batch {
                    prompt: num("prompt")?,
                    decode: num("decode")?,
                    batch: num("batch")?,
                },
                Some("streams") => Scenario::Streams {
                    prompt: num("prompt")?,
                    decode: num("decode")?,
                    streams: num("streams")?,
                    spread_ms: or("spread_ms", 0),
                },
                Some("chat") => Scenario::Chat {
                    history: num("history")?,
                    reply: num("reply")?,
                    new: num("new")?,
                },
                other => bail!("plan step with unknown scenario {other:?}"),
            };
            Ok(Step {
                scenario,
                runs: or("runs", runs),
                warmup: or("warmup", warmup),
            })
        })
        .collect()
}

/// How [`run`] is asked to work.
#[derive(Debug, Clone)]
pub struct RunArgs {
    /// The model directory (or GGUF file).
    pub model: PathBuf,
    /// What to measure, in order, on one loaded model.
    pub steps: Vec<Step>,
    /// JSON-lines file the records are appended to.
    pub out: PathBuf,
    /// The model's name in the records.
    pub label: Option<String>,
    /// Prompt tokens per prefill pass (our default when absent; MLX).
    pub prefill_chunk: Option<usize>,
    /// `mlx` or `llamacpp`.
    pub backend: String,
    /// Tensor parallelism over this MLX distributed backend (MLX only,
    /// single-stream steps only).
    pub tensor_parallel: Option<String>,
    /// llama.cpp's CPU threads (every core by default; MLX refuses it).
    pub threads: Option<usize>,
}

/// Loads the model once, runs each step `warmup + runs` times and appends
/// one JSON record per measured run to `args.out`.
pub fn run(args: &RunArgs) -> Result<()> {
    let load = || format!("loading {}", args.model.display());
    if args.tensor_parallel.is_some() && args.backend != "mlx" {
        bail!("--tensor-parallel is the mlx backend's");
    }
    let (model, engine, device) = match args.backend.as_str() {
        "mlx" => {
            if args.threads.is_some() {
                bail!("--threads is llama.cpp's (MLX sizes its own CPU pool)");
            }
            // Every call of a plan decodes together (as many slots as its
            // largest step has streams), and no prompt cache: repeated runs
            // of the same prompts must prefill them as mlx-lm does.
            let slots = args
                .steps
                .iter()
                .map(|s| match s.scenario {
                    Scenario::Streams { streams, .. } => streams,
                    Scenario::Batch { batch, .. } => batch,
                    _ => 1,
                })
                .max()
                .unwrap_or(1)
                .max(LoadOptions::DEFAULT_PARALLEL_SLOTS);
            let mut opts = LoadOptions::new().prompt_cache_bytes(0);
            match &args.tensor_parallel {
                Some(backend) => {
                    if args
                        .steps
                        .iter()
                        .any(|s| !matches!(s.scenario, Scenario::Single { .. }))
                    {
                        bail!("--tensor-parallel runs single-stream steps only");
                    }
                    opts = opts.tensor_parallel(backend.clone());
                }
                None => opts = opts.parallel_slots(slots),
            }
            let m = MlxModel::load(&args.model, &opts, Placement::Default).with_context(load)?;
            if let Some(c) = args.prefill_chunk {
                m.set_prefill_chunk(c);
            }
            if m.info().rank > 0 {
                // Rank 0 measures; this rank runs its calls alongside it
                // (with the same prefill chunk: the ranks' passes must match).
                m.follow().context("following rank 0")?;
                return Ok(());
            }
            (Engine::Mlx(m), "ours", backend_metal::MlxBackend.device())
        }
        "llamacpp" => {
            if args.prefill_chunk.is_some() {
                bail!("--prefill-chunk is MLX's (llama.cpp prefills 512 tokens a batch)");
            }
            let mut opts = LoadOptions::new();
            if let Some(n) = args.threads {
                opts = opts.threads(n);
            }
            let m = LlamaCppModel::load(&args.model, &opts).with_context(load)?;
            let device = backend_llamacpp::LlamaCppBackend.device();
            (Engine::LlamaCpp(m), "ours-llamacpp", device)
        }
        other => bail!("unknown backend {other:?} (mlx or llamacpp)"),
    };
    let world_size = model.model().info().world_size;
    let vocab = model.model().info().vocab_size;
    let label = args.label.clone().unwrap_or_else(|| file_name(&args.model));
    let weight_bytes = weight_bytes(&args.model);
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .with_context(|| format!("opening {}", args.out.display()))?;
    for step in &args.steps {
        for i in 0..step.warmup + step.runs {
            if matches!(
                (&model, step.scenario),
                (Engine::LlamaCpp(_), Scenario::Chat { .. })
            ) {
                if i == 0 {
                    eprintln!(
                        "(skipped) the chat scenario on llama.cpp: it measures MLX's id sessions"
                    );
                }
                continue;
            }
            model.clear_cache();
            let m = measure(&model, step.scenario, vocab)?;
            let warm = i < step.warmup;
            let mut rec = Map::new();
            rec.insert("engine".into(), json!(engine));
            rec.insert("label".into(), json!(label));
            rec.insert("scenario".into(), json!(step.scenario.name()));
            if let Value::Object(p) = step.scenario.params() {
                rec.extend(p);
            }
            rec.insert("run".into(), json!(i as i64 - step.warmup as i64));
            rec.extend(m);
            if let Engine::Mlx(_) = model {
                rec.insert(
                    "mlx_version".into(),
                    json!(backend_metal::device::mlx_version()),
                );
            }
            rec.insert("device".into(), json!(device));
            rec.insert("weight_bytes".into(), json!(weight_bytes));
            rec.insert("world_size".into(), json!(world_size));
            let line = serde_json::to_string(&Value::Object(rec))?;
            eprintln!("{}{line}", if warm { "(warm-up) " } else { "" });
            if !warm {
                writeln!(out, "{line}")?;
                out.flush()?;
            }
        }
    }
    Ok(())
}

/// Bytes of the model's weight files: what a decode step reads (a tied
/// embedding is read once, as the output projection). A GGUF file counts
/// whole.
fn weight_bytes(model: &Path) -> u64 {
    if model.is_file() {
        return std::fs::metadata(model).map_or(0, |m| m.len());
    }
    std::fs::read_dir(model)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
}

#[cfg(test)]
mod tests {
    use super::prompt_ids;

    #[test]
    fn prompt_ids_stay_in_the_ordinary_vocabulary_and_rows_differ() {
        for vocab in [64, 1000, 49_152, 151_936] {
            let lo = 100.min(vocab / 4) as u32;
            let a = prompt_ids(300, 0, vocab);
            let b = prompt_ids(300, 1, vocab);
            assert_eq!(a.len(), 300);
            assert!(a.iter().chain(&b).all(|&i| i >= lo && (i as usize) < vocab));
            assert_ne!(a, b);
            // Rows are shifted windows of one sequence (as in the Python driver).
            assert_eq!(prompt_ids(10, 0, vocab)[..], prompt_ids(20, 0, vocab)[..10]);
        }
    }
}

//! llama-bench's method on llama.cpp's own API, with nothing of ours in
//! between: the floor our llama.cpp backend is measured against.
//!
//! The `llama-cpp-sys-2` crate ships llama.cpp without its `tools/`
//! directory, so `llama-bench` itself cannot be built from the sources our
//! backend links; this loop does what `llama-bench` does on the same
//! library build: `pp` decodes the prompt in batches of 512 with the last
//! position's logits; `tg` decodes one token at a time after a prefilled
//! depth, each token chosen without sampling (llama-bench draws them at
//! random), waiting for each step's logits.

use std::num::NonZeroU32;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use crate::run::prompt_ids;

const BATCH: usize = 512;

/// Prefills `ids` from position `from` (untimed by the caller's choice).
fn prefill(ctx: &mut LlamaContext<'_>, batch: &mut LlamaBatch<'_>, ids: &[u32]) -> Result<()> {
    for (c, chunk) in ids.chunks(BATCH).enumerate() {
        batch.clear();
        for (i, &id) in chunk.iter().enumerate() {
            let pos = c * BATCH + i;
            batch.add(
                LlamaToken(id as i32),
                pos as i32,
                &[0],
                pos + 1 == ids.len(),
            )?;
        }
        ctx.decode(batch)?;
    }
    Ok(())
}

/// `runs` measured (prefill tokens/s, decode tokens/s, decode tokens per
/// CPU second of the process) triples after one
/// warm-up, for a prompt of `prompt` ids and `decode` generated ones, on
/// `threads` threads.
pub fn measure(
    gguf: &Path,
    prompt: usize,
    decode: usize,
    runs: usize,
    threads: usize,
) -> Result<Vec<(f64, f64, f64)>> {
    let mut backend = LlamaBackend::init()?;
    backend.void_logs();
    let model = LlamaModel::load_from_file(&backend, gguf, &LlamaModelParams::default())
        .with_context(|| format!("loading {}", gguf.display()))?;
    let vocab = usize::try_from(model.n_vocab()).unwrap_or(0);
    let t = i32::try_from(threads).unwrap_or(1);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(model.n_ctx_train()))
        .with_n_batch(BATCH as u32)
        .with_n_threads(t)
        .with_n_threads_batch(t);
    let mut ctx = model.new_context(&backend, params)?;
    let mut batch = LlamaBatch::new(BATCH, 1);
    let ids = prompt_ids(prompt, 0, vocab);
    let mut out = Vec::with_capacity(runs);
    for run in 0..=runs {
        ctx.clear_kv_cache();
        let started = Instant::now();
        prefill(&mut ctx, &mut batch, &ids)?;
        let pp = prompt as f64 / started.elapsed().as_secs_f64();
        // tg at a depth of the prompt: the prompt is in the cache above.
        let mut token = 1 + (run % (vocab - 1).max(1)) as i32;
        let started = Instant::now();
        let cpu = crate::run::process_cpu_s();
        for i in 0..decode {
            batch.clear();
            batch.add(LlamaToken(token), (prompt + i) as i32, &[0], true)?;
            ctx.decode(&mut batch)?;
            // Reading the logits waits for them, as a caller must.
            token = 1 + (ctx.get_logits_ith(0)[0].to_bits() as usize % (vocab - 1).max(1)) as i32;
        }
        let tg = decode as f64 / started.elapsed().as_secs_f64();
        let tg_cpu = decode as f64 / (crate::run::process_cpu_s() - cpu);
        if run > 0 {
            out.push((pp, tg, tg_cpu));
        }
    }
    Ok(out)
}

//! Which options the llama.cpp backend honours, and how they become
//! llama.cpp's model and context parameters.

use std::num::NonZeroU32;

use inference_core::{Error, GenerateOptions, KvCacheType, LoadOptions, Result};
use inference_runtime::check;
use llama_cpp_2::context::params::{KvCacheType as LlamaKvType, LlamaContextParams};
use llama_cpp_2::model::params::LlamaModelParams;

/// Prompt tokens per llama.cpp batch (its default `n_batch`).
pub(crate) const BATCH: usize = 512;

/// Prompt tokens per batch when every position's logits are read (prompt
/// logprobs): each position keeps a whole vocabulary of logits, which for
/// a 262k-token vocabulary is 1 MiB.
pub(crate) const SCORED_BATCH: usize = 64;

/// Sequences one batched call decodes together (llama.cpp sequence ids
/// `1..=ROWS`); larger batches run in groups of this many.
pub(crate) const ROWS: usize = 16;

/// The llama.cpp sequence id that holds a chat session's cache between
/// turns.
pub(crate) const SESSION_SEQ: i32 = 0;

/// Whether this build of llama.cpp has a GPU (the `cuda` or `metal`
/// feature). The crate's only build-configuration switch lives here.
const GPU_BUILD: bool = cfg!(any(feature = "cuda", feature = "metal"));

/// The device models run on.
pub(crate) const DEVICE: &str = if cfg!(feature = "cuda") {
    "gpu (CUDA)"
} else if cfg!(feature = "metal") {
    "gpu (Metal)"
} else {
    "cpu"
};

fn refuse(what: &str) -> Result<()> {
    Err(Error::unsupported(format!(
        "{what} on the llamacpp backend"
    )))
}

/// Refuses load options this backend cannot honour.
pub(crate) fn check_load_options(opts: &LoadOptions) -> Result<()> {
    opts.validate()?;
    if opts.gpu_layers > 0 && !GPU_BUILD {
        return refuse(
            "gpu_layers > 0 (this build of llama.cpp runs on the CPU; the `cuda` and `metal` \
             features build it for a GPU)",
        );
    }
    if opts.context_len.is_some() {
        return refuse(
            "context_len (a rotating KV cache; llama.cpp's context shift renumbers positions, \
             which is not the same model behaviour)",
        );
    }
    if opts.allow_past_max_positions {
        return refuse("allow_past_max_positions");
    }
    if opts.adapter_path.is_some() {
        return refuse("LoRA adapters");
    }
    if opts.dtype.is_some() {
        return refuse("dtype (llama.cpp computes in the GGUF file's own types)");
    }
    if opts.parallel_slots.is_some_and(|n| n > 1) {
        return refuse(
            "parallel_slots > 1 (calls queue; batch_generate decodes sequences together)",
        );
    }
    if opts.tensor_parallel.is_some() {
        return refuse("tensor_parallel (the llama.cpp backend runs in one process)");
    }
    if opts.kv_budget_bytes.is_some() {
        return refuse("kv_budget_bytes (calls run one at a time in one context)");
    }
    if opts.max_queue.is_some() || opts.queue_timeout.is_some() {
        return refuse("max_queue and queue_timeout (calls queue on a mutex)");
    }
    if opts.prompt_cache_bytes.is_some_and(|n| n > 0) {
        return refuse("prompt_cache_bytes (chat sessions keep their own KV cache)");
    }
    if opts.memory_limit_bytes.is_some()
        || opts.cache_limit_bytes.is_some()
        || opts.wired_limit_bytes.is_some()
    {
        return refuse("memory, cache and wired limits");
    }
    if let Some(t) = opts.kv_cache_type.filter(|&t| llama_kv_type(t).is_none()) {
        return refuse(&format!("kv_cache_type = {t}"));
    }
    if opts.kv_cache_type.is_some_and(KvCacheType::is_quantised)
        && opts.flash_attention == Some(false)
    {
        return Err(Error::invalid_option(
            "kv_cache_type",
            "a quantised KV cache needs flash attention (llama.cpp quantises V only inside it)",
        ));
    }
    Ok(())
}

/// Refuses generation options that are invalid here. Every sampling
/// option is honoured (see `sampler.rs`); `template_args` and `tools` are
/// for `chat` and refused by raw-prompt calls; `return_logits` is for
/// `classify`.
pub(crate) fn check_generate_options(opts: &GenerateOptions, vocab: usize) -> Result<()> {
    opts.validate()?;
    if opts.return_logits {
        return Err(Error::unsupported(
            "return_logits for generate (classify returns logits)",
        ));
    }
    check::logit_bias_in_vocab(opts, vocab)
}

/// Refuses `template_args`, `tools` and `reply_prefix` for a call on raw prompts.
pub(crate) fn refuse_template(opts: &GenerateOptions, call: &str) -> Result<()> {
    if opts.uses_template() {
        return Err(Error::unsupported(format!(
            "template_args, tools and reply_prefix for {call} (raw prompts are not templated: use chat)"
        )));
    }
    Ok(())
}

/// CPU threads: the option, or every core.
pub(crate) fn threads(opts: &LoadOptions) -> i32 {
    let n = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The model parameters `opts` ask for.
pub(crate) fn model_params(opts: &LoadOptions) -> LlamaModelParams {
    let params = LlamaModelParams::default().with_use_mmap(opts.mmap);
    if !GPU_BUILD {
        return params;
    }
    // −1: every layer (llama.cpp's "999"); 0: none; n: the first n.
    let layers = u32::try_from(opts.gpu_layers).unwrap_or(999);
    params.with_n_gpu_layers(layers)
}

/// llama.cpp's name for a KV cache type; `None` for a type this backend
/// does not know (refused at load).
fn llama_kv_type(t: KvCacheType) -> Option<LlamaKvType> {
    Some(match t {
        KvCacheType::F32 => LlamaKvType::F32,
        KvCacheType::F16 => LlamaKvType::F16,
        KvCacheType::BF16 => LlamaKvType::BF16,
        KvCacheType::Q8_0 => LlamaKvType::Q8_0,
        KvCacheType::Q5_1 => LlamaKvType::Q5_1,
        KvCacheType::Q5_0 => LlamaKvType::Q5_0,
        KvCacheType::Q4_1 => LlamaKvType::Q4_1,
        KvCacheType::Q4_0 => LlamaKvType::Q4_0,
        _ => return None,
    })
}

/// The context parameters: `n_ctx` positions shared by every sequence
/// (a unified KV cache, so that one sequence may use all of them), the
/// session's sequence plus [`ROWS`] batch rows, and the load options.
pub(crate) fn context_params(opts: &LoadOptions, n_ctx: u32) -> LlamaContextParams {
    let threads = threads(opts);
    let mut params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(BATCH as u32)
        .with_n_seq_max(ROWS as u32 + 1)
        .with_kv_unified(true)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    if let Some(t) = opts.kv_cache_type.and_then(llama_kv_type) {
        params = params.with_type_k(t).with_type_v(t);
    }
    let flash = match opts.flash_attention {
        Some(true) => Some(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED),
        Some(false) => Some(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED),
        // A quantised V cache lives inside flash attention.
        None if opts.kv_cache_type.is_some_and(KvCacheType::is_quantised) => {
            Some(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED)
        }
        None => None,
    };
    if let Some(f) = flash {
        params = params.with_flash_attention_policy(f);
    }
    params
}

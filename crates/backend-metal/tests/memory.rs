//! Memory: a long generation keeps MLX's active memory flat, and the safe
//! wrappers read and set MLX's figures and limits. One test per file would
//! be ideal (MLX's figures are process-wide); the two tests here run one
//! after the other under a lock.

mod common;

use std::sync::Mutex;

use backend_metal::memory;
use common::*;
use inference_core::{GenerateOptions, LoadOptions, TextModel};

static SERIAL: Mutex<()> = Mutex::new(());

/// 2,000 tokens on a tiny model (its caches bounded by `context_len`, as the
/// fixture's own context is 256): active memory after the last token is
/// within 512 KiB of its value after the first 100. A decode loop that kept
/// anything per step (a logits row alone is 1.6 KB) would exceed it.
#[test]
fn two_thousand_tokens_keep_active_memory_flat() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let opts = LoadOptions::new()
        .gpu_layers(default_gpu_layers())
        .context_len(128);
    let model = load_with(&fixture("qwen3-f32"), &opts);
    let gen = GenerateOptions::new().max_tokens(2000).ignore_eos(true);
    let mut stream = model.generate("The capital of France is", &gen).unwrap();
    let mut after_100 = None;
    let mut count = 0usize;
    for token in stream.by_ref() {
        token.unwrap();
        count += 1;
        if count == 100 {
            after_100 = Some(memory::active());
        }
    }
    let end = memory::active();
    let after_100 = after_100.expect("100 tokens");
    assert_eq!(count, 2000);
    eprintln!("active memory: {after_100} B after 100 tokens, {end} B after 2000");
    assert!(after_100 > 0, "MLX reports active memory");
    assert!(
        end <= after_100 + 512 * 1024,
        "active memory grew from {after_100} to {end} bytes"
    );
    let m = stream.metrics().unwrap();
    assert_eq!(m.generated_tokens, 2000);
    assert!(m.peak_memory_bytes >= m.active_memory_bytes.min(after_100) / 2);
}

#[test]
fn wrappers_read_and_set_limits() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let model = load(&fixture("qwen3-f32"));
    let mut s = model
        .generate("The capital", &GenerateOptions::new().max_tokens(4))
        .unwrap();
    s.collect_tokens().unwrap();
    assert!(memory::active() > 0);
    memory::reset_peak();
    assert!(memory::peak() <= memory::active().max(1) * 2);
    memory::clear_cache();
    assert_eq!(memory::cache(), 0, "a cleared cache holds nothing");
    // Limits: setting returns the previous value, which a second set sees.
    let old = memory::set_cache_limit(1 << 20).unwrap();
    assert_eq!(memory::set_cache_limit(old).unwrap(), 1 << 20);
    let old = memory::set_memory_limit(1 << 40).unwrap();
    assert_eq!(memory::memory_limit(), 1 << 40);
    assert_eq!(memory::set_memory_limit(old).unwrap(), 1 << 40);
    assert_eq!(memory::memory_limit(), old);
}

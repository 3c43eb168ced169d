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

/// 2,000 tokens on a tiny model (its caches bounded by `context_len`, and
/// positions allowed past the fixture's own 256): active memory after the last token is
/// within 512 KiB of its value after the first 100. A decode loop that kept
/// anything per step (a logits row alone is 1.6 KB) would exceed it.
#[test]
fn two_thousand_tokens_keep_active_memory_flat() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let opts = LoadOptions::new()
        .gpu_layers(default_gpu_layers())
        .context_len(128)
        .allow_past_max_positions(true);
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

/// Cancelling a generation mid-stream releases what the call held: once the
/// call has finished, active memory is back at its level before the call.
#[test]
fn cancelling_mid_stream_releases_the_calls_memory() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let model = load(&fixture("qwen3-f32"));
    // Warm up (first-call allocations), then measure the idle level.
    model
        .generate("warm up", &GenerateOptions::new().max_tokens(4))
        .unwrap()
        .collect_tokens()
        .unwrap();
    let idle = memory::active();
    let before = model.metrics();
    let gen = GenerateOptions::new().max_tokens(200).ignore_eos(true);
    let mut stream = model.generate("The capital of France is", &gen).unwrap();
    for _ in 0..20 {
        stream.next().unwrap().unwrap();
    }
    let during = memory::active();
    stream.cancel();
    drop(stream);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while model.metrics() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the cancelled call did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let m = model.metrics().unwrap();
    assert!(m.generated_tokens < 200, "cancel did not stop the call");
    let after = memory::active();
    assert!(during > idle, "the call held memory: {during} vs {idle}");
    assert!(
        after <= idle + 16 * 1024,
        "active memory {after} after cancel, {idle} before the call"
    );
}

/// MLX's device information answers for the CPU.
#[test]
fn device_information_is_reported() {
    let info = backend_metal::device::device_info(backend_metal::device::Which::Cpu).unwrap();
    eprintln!("CPU device information: {info:?}");
    // MLX 0.32 reports the CPU's architecture and name.
    let arch = info.get("architecture");
    assert!(
        matches!(arch, Some(backend_metal::device::InfoValue::Text(a)) if a == std::env::consts::ARCH),
        "architecture {arch:?}, expected {}",
        std::env::consts::ARCH
    );
    assert!(
        matches!(info.get("device_name"), Some(backend_metal::device::InfoValue::Text(n)) if !n.is_empty())
    );
}

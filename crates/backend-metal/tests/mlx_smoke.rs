//! Smoke tests of the MLX native layer through mlx-rs: each result is compared with values
//! computed independently here, in plain Rust.
//!
//! They run on MLX's default device: the GPU where MLX has one (CUDA or Metal), else the CPU.
//! `MLX_DEVICE=cpu` (or `gpu`) picks the device. The tests share MLX's process-global state
//! (memory counters, the default device), so each holds one lock while it runs.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, Once, PoisonError};

use backend_metal::device;
use mlx_rs::error::Exception;
use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::indexing::{argmax, argmax_axis};
use mlx_rs::transforms::compile::compile;
use mlx_rs::{memory, Array, Device, DeviceType, Dtype};

static LOCK: Mutex<()> = Mutex::new(());
static INIT: Once = Once::new();

/// Serialises the tests and applies `MLX_DEVICE` once.
fn mlx() -> MutexGuard<'static, ()> {
    let guard = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    INIT.call_once(|| {
        match std::env::var("MLX_DEVICE").as_deref() {
            Ok("cpu") => Device::set_default(&Device::cpu()),
            Ok("gpu") => Device::set_default(&Device::gpu()),
            _ => {}
        }
        println!("{}", device::describe());
    });
    guard
}

fn on_gpu() -> bool {
    matches!(Device::default().get_type(), Ok(DeviceType::Gpu))
}

/// Deterministic values in [-1, 1) (xorshift64*), independent of MLX's random numbers.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let bits = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 bits
            bits as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// An array's elements as f32 (evaluated).
fn f32s(a: &Array) -> Vec<f32> {
    let a = a.as_dtype(Dtype::Float32).unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

/// Rounds to the nearest bfloat16 (ties to even), as f32.
fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
    f32::from_bits(rounded)
}

/// Asserts |got - want| <= tol * (1 + |want|) elementwise.
fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst = 0.0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / (1.0 + w.abs());
        assert!(
            err <= tol,
            "{name}: element {i}: got {g}, want {w} (relative error {err:.2e} > {tol:.0e})"
        );
        worst = worst.max(err);
    }
    println!("{name}: max relative error {worst:.2e} (tolerance {tol:.0e})");
}

/// Row-major [m, k] @ [k, n] in f64.
fn matmul_ref(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|t| f64::from(a[i * k + t]) * f64::from(b[t * n + j]))
                .sum();
            out[i * n + j] = s as f32;
        }
    }
    out
}

#[test]
fn reports_device() {
    let _mlx = mlx();
    let info = device::describe();
    println!("{info}; built against MLX {}", device::MLX_BUILD_VERSION);
    assert_eq!(info.version, device::MLX_BUILD_VERSION);
    assert_eq!(info.default_is_gpu, on_gpu());
    if info.gpu.is_some() && std::env::var("MLX_DEVICE").is_err() {
        assert!(info.default_is_gpu, "MLX has a GPU but did not pick it");
    }
}

#[test]
fn matmul_f32() {
    let _mlx = mlx();
    let (m, k, n) = (8, 32, 5);
    let (av, bv) = (values(m * k, 1), values(k * n, 2));
    let a = Array::from_slice(&av, &[m as i32, k as i32]);
    let b = Array::from_slice(&bv, &[k as i32, n as i32]);
    let got = f32s(&a.matmul(&b).unwrap());
    // MLX runs f32 matrix products in TF32 on CUDA by default.
    let tol = if on_gpu() { 1e-2 } else { 1e-5 };
    assert_close("matmul f32", &got, &matmul_ref(&av, &bv, m, k, n), tol);

    // A small exact case.
    let a = Array::from_slice(&[1f32, 2., 3., 4., 5., 6.], &[2, 3]);
    let b = Array::from_slice(&[7f32, 8., 9., 10., 11., 12.], &[3, 2]);
    assert_eq!(f32s(&a.matmul(&b).unwrap()), [58., 64., 139., 154.]);
}

#[test]
fn matmul_bf16() {
    let _mlx = mlx();
    let (m, k, n) = (4, 64, 6);
    let (av, bv) = (values(m * k, 3), values(k * n, 4));
    let a = Array::from_slice(&av, &[m as i32, k as i32])
        .as_dtype(Dtype::Bfloat16)
        .unwrap();
    let b = Array::from_slice(&bv, &[k as i32, n as i32])
        .as_dtype(Dtype::Bfloat16)
        .unwrap();
    let c = a.matmul(&b).unwrap();
    assert_eq!(c.dtype(), Dtype::Bfloat16);
    // The inputs as MLX holds them, rounded to bf16 here; the product is rounded to bf16
    // (8 significant bits) and may be accumulated in lower precision.
    let (ar, br): (Vec<f32>, Vec<f32>) = (
        av.iter().copied().map(round_bf16).collect(),
        bv.iter().copied().map(round_bf16).collect(),
    );
    assert_eq!(f32s(&a), ar, "f32 -> bf16 conversion");
    let want = matmul_ref(&ar, &br, m, k, n);
    let got = f32s(&c);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let (row, col) = (i / n, i % n);
        let scale: f32 = (0..k)
            .map(|t| (ar[row * k + t] * br[t * n + col]).abs())
            .sum();
        let err = (g - w).abs();
        assert!(
            err <= 1e-2 * scale + 1e-3,
            "matmul bf16: element {i}: got {g}, want {w} (error {err:.2e}, scale {scale:.2})"
        );
    }
    println!("matmul bf16: ok");
}

#[test]
fn rms_norm() {
    let _mlx = mlx();
    let (rows, dims) = (3, 16);
    let xv = values(rows * dims, 5);
    let wv: Vec<f32> = values(dims, 6).iter().map(|w| 1.0 + w).collect();
    let eps = 1e-5f32;
    let x = Array::from_slice(&xv, &[rows as i32, dims as i32]);
    let w = Array::from_slice(&wv, &[dims as i32]);
    let want: Vec<f32> = xv
        .chunks(dims)
        .flat_map(|row| {
            let mean_sq = row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / dims as f64;
            let inv = 1.0 / (mean_sq + f64::from(eps)).sqrt();
            row.iter()
                .zip(&wv)
                .map(move |(v, w)| (f64::from(*v) * inv * f64::from(*w)) as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    let got = f32s(&fast::rms_norm(&x, Some(&w), eps).unwrap());
    assert_close("fast::rms_norm", &got, &want, 1e-5);
}

/// RoPE over [batch * heads, len, dims] with MLX's conventions: pairs (i, i + dims/2), or
/// (2i, 2i + 1) when `traditional`; angle (offset + p) * scale * base^(-2i / dims).
fn rope_ref(
    x: &[f32],
    len: usize,
    dims: usize,
    traditional: bool,
    base: f64,
    offset: usize,
) -> Vec<f32> {
    let half = dims / 2;
    let mut out = vec![0.0f32; x.len()];
    for (row_index, (row, out_row)) in x.chunks(dims).zip(out.chunks_mut(dims)).enumerate() {
        let pos = (offset + row_index % len) as f64;
        for i in 0..half {
            let theta = pos * base.powf(-2.0 * i as f64 / dims as f64);
            let (sin, cos) = theta.sin_cos();
            let (i1, i2) = if traditional {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (x1, x2) = (f64::from(row[i1]), f64::from(row[i2]));
            out_row[i1] = (x1 * cos - x2 * sin) as f32;
            out_row[i2] = (x1 * sin + x2 * cos) as f32;
        }
    }
    out
}

#[test]
fn rope() {
    let _mlx = mlx();
    let (heads, len, dims, offset) = (2, 5, 16, 3);
    let xv = values(heads * len * dims, 7);
    let x = Array::from_slice(&xv, &[1, heads as i32, len as i32, dims as i32]);
    for traditional in [false, true] {
        let got = fast::rope(
            &x,
            dims as i32,
            traditional,
            10_000.0,
            1.0,
            offset as i32,
            None,
        )
        .unwrap();
        let want = rope_ref(&xv, len, dims, traditional, 10_000.0, offset);
        assert_close(
            &format!("fast::rope (traditional: {traditional})"),
            &f32s(&got),
            &want,
            1e-4,
        );
    }
}

/// Naive attention: q [hq, lq, d], k and v [hkv, lk, d] (grouped-query: query head h reads
/// key/value head h / (hq / hkv)); with `causal`, query i (aligned to the end of the keys)
/// sees keys j <= i + lk - lq.
#[allow(clippy::too_many_arguments)]
fn attention_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (hq, hkv): (usize, usize),
    (lq, lk): (usize, usize),
    d: usize,
    scale: f64,
    causal: bool,
) -> Vec<f32> {
    let mut out = vec![0.0f32; hq * lq * d];
    for h in 0..hq {
        let kv = h / (hq / hkv);
        for i in 0..lq {
            let qrow = &q[(h * lq + i) * d..][..d];
            let scores: Vec<f64> = (0..lk)
                .map(|j| {
                    if causal && j > i + (lk - lq) {
                        return f64::NEG_INFINITY;
                    }
                    let krow = &k[(kv * lk + j) * d..][..d];
                    let dot: f64 = qrow
                        .iter()
                        .zip(krow)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    dot * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            let orow = &mut out[(h * lq + i) * d..][..d];
            for (t, o) in orow.iter_mut().enumerate() {
                let acc: f64 = (0..lk)
                    .map(|j| weights[j] / total * f64::from(v[(kv * lk + j) * d + t]))
                    .sum();
                *o = acc as f32;
            }
        }
    }
    out
}

#[test]
fn scaled_dot_product_attention_causal_gqa() {
    let _mlx = mlx();
    let (hq, hkv, lq, lk, d) = (4, 2, 3, 6, 8);
    let (qv, kv, vv) = (
        values(hq * lq * d, 8),
        values(hkv * lk * d, 9),
        values(hkv * lk * d, 10),
    );
    let q = Array::from_slice(&qv, &[1, hq as i32, lq as i32, d as i32]);
    let k = Array::from_slice(&kv, &[1, hkv as i32, lk as i32, d as i32]);
    let v = Array::from_slice(&vv, &[1, hkv as i32, lk as i32, d as i32]);
    let scale = 1.0 / (d as f32).sqrt();
    let tol = if on_gpu() { 5e-3 } else { 1e-5 };
    for causal in [true, false] {
        let got = if causal {
            fast::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                scale,
                ScaledDotProductAttentionMask::Causal,
                None,
            )
        } else {
            fast::scaled_dot_product_attention(&q, &k, &v, scale, None, None)
        }
        .unwrap();
        assert_eq!(got.shape(), [1, hq as i32, lq as i32, d as i32]);
        let want = attention_ref(
            &qv,
            &kv,
            &vv,
            (hq, hkv),
            (lq, lk),
            d,
            f64::from(scale),
            causal,
        );
        assert_close(
            &format!("fast::scaled_dot_product_attention (causal: {causal})"),
            &f32s(&got),
            &want,
            tol,
        );
    }
}

#[test]
fn argmax_flat_and_axis() {
    let _mlx = mlx();
    let xv = values(4 * 7, 11);
    let x = Array::from_slice(&xv, &[4, 7]);
    let index_of_max = |row: &[f32]| {
        row.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    let flat = argmax(&x, None).unwrap();
    flat.eval().unwrap();
    assert_eq!(flat.dtype(), Dtype::Uint32);
    assert_eq!(flat.item_exact::<u32>(), index_of_max(&xv));
    let rows = argmax_axis(&x, 1, None).unwrap();
    rows.eval().unwrap();
    let want: Vec<u32> = xv.chunks(7).map(index_of_max).collect();
    assert_eq!(rows.as_slice::<u32>(), want.as_slice());
}

#[test]
fn safetensors_round_trip() {
    let _mlx = mlx();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    let xv = values(6, 12);
    let x = Array::from_slice(&xv, &[2, 3]);
    let x_bf16 = x.as_dtype(Dtype::Bfloat16).unwrap();
    let ids = Array::from_slice(&[3i32, -1, 7], &[3]);
    let metadata: HashMap<String, String> = [("format".to_owned(), "mlx".to_owned())].into();
    Array::save_safetensors(
        [("x", &x), ("x_bf16", &x_bf16), ("ids", &ids)],
        &metadata,
        &path,
    )
    .unwrap();

    let (loaded, loaded_metadata) = Array::load_safetensors_with_metadata(&path).unwrap();
    assert_eq!(loaded_metadata, metadata);
    let mut keys: Vec<&str> = loaded.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["ids", "x", "x_bf16"]);
    assert_eq!(loaded["x"].dtype(), Dtype::Float32);
    assert_eq!(loaded["x"].shape(), [2, 3]);
    assert_eq!(f32s(&loaded["x"]), xv);
    assert_eq!(loaded["x_bf16"].dtype(), Dtype::Bfloat16);
    let bf16_want: Vec<f32> = xv.iter().copied().map(round_bf16).collect();
    assert_eq!(f32s(&loaded["x_bf16"]), bf16_want);
    let ids_back = &loaded["ids"];
    ids_back.eval().unwrap();
    assert_eq!(ids_back.as_slice::<i32>(), [3, -1, 7]);

    let plain = Array::load_safetensors(&path).unwrap();
    assert_eq!(plain.len(), 3);
}

#[test]
fn compiled_function() {
    let _mlx = mlx();
    let f = |x: &Array| -> Result<Array, Exception> {
        let y = x.multiply(x)?;
        let y = y.add(Array::from_f32(1.0))?;
        y.sqrt()
    };
    let mut compiled = compile(f, None);
    let tol = if on_gpu() { 1e-5 } else { 1e-6 };
    let reference = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| (x * x + 1.0).sqrt()).collect() };
    let xv = values(12, 13);
    let x = Array::from_slice(&xv, &[3, 4]);
    assert_close(
        "compile (3x4)",
        &f32s(&compiled(&x).unwrap()),
        &reference(&xv),
        tol,
    );
    // Another shape: the compiled function is traced again.
    let yv = values(5, 14);
    let y = Array::from_slice(&yv, &[5]);
    assert_close(
        "compile (5)",
        &f32s(&compiled(&y).unwrap()),
        &reference(&yv),
        tol,
    );
    // The same shape again: the cached trace, new data.
    let zv = values(12, 15);
    let z = Array::from_slice(&zv, &[3, 4]);
    assert_close(
        "compile (3x4 again)",
        &f32s(&compiled(&z).unwrap()),
        &reference(&zv),
        tol,
    );
}

#[test]
fn memory_counters() {
    let _mlx = mlx();
    const N: usize = 1 << 20; // f32 elements: 4 MiB
    let bytes = N * std::mem::size_of::<f32>();

    memory::clear_cache().unwrap();
    memory::reset_peak_memory().unwrap();
    let before = memory::active_memory().unwrap();
    let a = Array::ones::<f32>(&[N as i32]).unwrap();
    let b = a.multiply(Array::from_f32(2.0)).unwrap();
    b.eval().unwrap();
    let active = memory::active_memory().unwrap();
    let peak = memory::peak_memory().unwrap();
    println!("memory: active {before} -> {active} bytes, peak {peak}");
    assert!(
        active >= before + bytes,
        "active {active} < {before} + {bytes}"
    );
    assert!(peak >= active, "peak {peak} < active {active}");
    assert_eq!(f32s(&b.sum(None).unwrap()), [2.0 * N as f32]);

    // Freed buffers go to MLX's cache; clearing it empties it.
    drop((a, b));
    assert!(device::synchronize());
    memory::clear_cache().unwrap();
    assert_eq!(memory::cache_memory().unwrap(), 0);

    // With a cache limit of 0 nothing is kept; the previous limit comes back.
    let previous = memory::set_cache_limit(0).unwrap();
    let c = Array::ones::<f32>(&[N as i32]).unwrap();
    c.eval().unwrap();
    drop(c);
    assert!(device::synchronize());
    assert_eq!(memory::cache_memory().unwrap(), 0);
    assert_eq!(memory::set_cache_limit(previous).unwrap(), 0);

    // Resetting the peak brings it down to at most what was reached since.
    memory::reset_peak_memory().unwrap();
    let after_reset = memory::peak_memory().unwrap();
    assert!(
        after_reset < peak,
        "peak after reset {after_reset} >= {peak}"
    );
}

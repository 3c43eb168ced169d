//! Fused CUDA kernels for the decode step (one position per row).
//!
//! On a GPU a small model's decode step is bound by the host: every MLX
//! kernel costs graph building, a node of MLX's CUDA graph and its share of
//! the graph update, whatever little it computes. Two kernels of ours do the
//! work of five of MLX's per decoder layer:
//!
//! - [`AddNorm`]: the residual add and the RMSNorm after it, giving both the
//!   sum (the next residual) and its norm. A layer has two: after attention,
//!   and after the MLP (fused with the next layer's input norm, or the
//!   model's final norm).
//! - [`QkRope`]: from the stacked q/k/v projection, the per-head q and k
//!   RMSNorms (Qwen3) and RoPE of both, written as heads `[B, H, 1, D]`.
//!
//! They compute what MLX's `add`, `fast::rms_norm` and `fast::rope` compute,
//! in the same order of roundings (each intermediate rounded to the
//! model's dtype where MLX's kernels round it), but their sums of squares
//! add in another order, so the last bit of a norm can differ.
//!
//! Only MLX's CUDA backend runs them (MLX compiles them with NVRTC on first
//! use); anywhere else, and while training (MLX has no gradient for a
//! custom kernel; see [`Suspend`]), the model runs MLX's own operations, so
//! Metal and the CPU keep the portable path. [`QkRope`] is on by default
//! there, [`AddNorm`] only when `INFER_FUSE` asks for it (see [`wanted`]).

use std::cell::Cell;

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

use crate::cache::Positions;
use crate::ffi::CudaKernel;
use crate::models::layers::{RmsNorm, RotaryEmbedding};

type Result<T> = std::result::Result<T, Exception>;

std::thread_local! {
    /// Set while training on this thread (see [`Suspend`]).
    static SUSPENDED: Cell<bool> = const { Cell::new(false) };
}

/// While alive, this thread's models run MLX's own operations instead of
/// the fused kernels (which have no gradient); the previous state comes
/// back on drop.
pub struct Suspend(bool);

impl Suspend {
    /// Suspends the fused kernels on this thread.
    pub fn new() -> Self {
        Self(SUSPENDED.with(|s| s.replace(true)))
    }
}

impl Default for Suspend {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Suspend {
    fn drop(&mut self) {
        SUSPENDED.with(|s| s.set(self.0));
    }
}

/// The fused kernels of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// [`AddNorm`].
    AddNorm,
    /// [`QkRope`].
    QkRope,
}

/// Whether a model loaded on this thread should build the fused kernel
/// `kind` (where [`cuda_here`]): `INFER_FUSE` unset builds [`QkRope`]
/// alone, `1` both, `add` or `qk` that one alone, `0` none. On an H100 the
/// q/k kernel made Qwen3-4B's decode faster and both kernels Qwen3-0.6B's,
/// but [`AddNorm`] made Qwen3-4B's slower, so it is opt-in.
pub fn wanted(kind: Kind) -> bool {
    let asked = match (std::env::var("INFER_FUSE").as_deref(), kind) {
        (Ok("0"), _) => false,
        (Ok("1"), _) => true,
        (Ok("add"), k) => k == Kind::AddNorm,
        (_, k) => k == Kind::QkRope,
    };
    asked && cuda_here()
}

/// Whether MLX reaches the GPU through CUDA and this thread's default
/// stream is on the GPU: where the kernels can run.
pub fn cuda_here() -> bool {
    crate::device::mlx().gpu == Some(crate::device::GpuApi::Cuda)
        && crate::device::thread_stream_is_gpu()
}

/// Whether a step of `x` `[B, L, …]` in `dtype` may take a kernel made for
/// `dtype`: one position per row, the same dtype, not training.
fn step_applies(x: &Array, dtype: Dtype) -> bool {
    x.ndim() == 3 && x.dim(1) == 1 && x.dtype() == dtype && !SUSPENDED.with(Cell::get)
}

/// The CUDA spelling of an MLX dtype the kernels take.
fn cuda_type(dtype: Dtype) -> Option<&'static str> {
    match dtype {
        Dtype::Bfloat16 => Some("__nv_bfloat16"),
        Dtype::Float16 => Some("__half"),
        Dtype::Float32 => Some("float"),
        _ => None,
    }
}

/// Threads per block of [`AddNorm`].
const ADD_NORM_THREADS: i32 = 256;

/// `h = x + r` and `n = rms_norm(h) · w` in one kernel, one block per row.
#[derive(Debug)]
pub struct AddNorm {
    kernel: CudaKernel,
    dim: i32,
    eps: f32,
    dtype: Dtype,
}

impl AddNorm {
    /// The kernel for rows of `dim` features in `dtype`, with `eps`; `None`
    /// where [`wanted`] says no or the dtype has no kernel.
    pub fn new(dim: i32, eps: f32, dtype: Dtype) -> Result<Option<Self>> {
        match wanted(Kind::AddNorm) {
            true => Self::make(dim, eps, dtype),
            false => Ok(None),
        }
    }

    /// The kernel whatever `INFER_FUSE` says (`None` for a dtype without
    /// one).
    fn make(dim: i32, eps: f32, dtype: Dtype) -> Result<Option<Self>> {
        let Some(ty) = cuda_type(dtype).filter(|_| dim > 0) else {
            return Ok(None);
        };
        let source = format!(
            r#"
    using T = {ty};
    constexpr int D = {dim};
    constexpr int TPB = {ADD_NORM_THREADS};
    constexpr float EPS = {eps:e}f;
    __shared__ float part[TPB / 32];
    const int t = threadIdx.x;
    const size_t row = blockIdx.x;
    const T* xr = x + row * D;
    const T* rr = r + row * D;
    T* hr = h + row * D;
    T* nr = n + row * D;
    float ss = 0.0f;
    for (int j = t; j < D; j += TPB) {{
        T v = xr[j] + rr[j];
        hr[j] = v;
        float f = static_cast<float>(v);
        ss += f * f;
    }}
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((t & 31) == 0) part[t >> 5] = ss;
    __syncthreads();
    float total = 0.0f;
    for (int k = 0; k < TPB / 32; ++k) total += part[k];
    const float inv = ::rsqrtf(total / static_cast<float>(D) + EPS);
    for (int j = t; j < D; j += TPB) {{
        float f = static_cast<float>(hr[j]);
        nr[j] = w[j] * static_cast<T>(f * inv);
    }}
"#
        );
        let kernel = CudaKernel::new("infer_add_rms_norm", &["x", "r", "w"], &["h", "n"], &source)?;
        Ok(Some(Self {
            kernel,
            dim,
            eps,
            dtype,
        }))
    }

    /// Whether a decode step's hidden state `x` `[B, 1, dim]` takes the
    /// kernel (the right size and dtype, and not training).
    pub fn applies(&self, x: &Array) -> bool {
        step_applies(x, self.dtype) && x.dim(2) == self.dim
    }

    /// `(x + r, norm(x + r))` for a decode step's `x` and `r` `[B, 1, dim]`:
    /// one kernel where `r` and `norm` fit it, MLX's operations otherwise.
    pub fn apply(&self, x: &Array, r: &Array, norm: &RmsNorm) -> Result<(Array, Array)> {
        let fits = self.applies(x)
            && r.shape() == x.shape()
            && r.dtype() == self.dtype
            && norm.weight.shape() == [self.dim]
            && norm.weight.dtype() == self.dtype
            && norm.eps == self.eps;
        if !fits {
            let h = x.add(r)?;
            let n = norm.forward(&h)?;
            return Ok((h, n));
        }
        let rows = x.dim(0);
        let shape = x.shape();
        let mut out = self
            .kernel
            .apply(
                &[x, r, &norm.weight],
                &[(shape, self.dtype), (shape, self.dtype)],
                [ADD_NORM_THREADS * rows, 1, 1],
                [ADD_NORM_THREADS, 1, 1],
            )?
            .into_iter();
        match (out.next(), out.next()) {
            (Some(h), Some(n)) => Ok((h, n)),
            _ => Err(Exception::custom("the add-norm kernel lost an output")),
        }
    }
}

/// The sizes of the attention a [`QkRope`] serves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QkShape {
    /// Query heads.
    pub heads: i32,
    /// Key and value heads.
    pub kv_heads: i32,
    /// Features per head.
    pub head_dim: i32,
    /// The q/k norms' epsilon, where the model has them.
    pub norm_eps: Option<f32>,
}

/// From a decode step's stacked q/k/v projection `[B, 1, (H + 2·Hkv)·D]`:
/// q and k normed per head (where the model has q/k norms) and rotated,
/// as `[B, H, 1, D]` and `[B, Hkv, 1, D]`. One block per head and row, a
/// thread per rotated pair.
#[derive(Debug)]
pub struct QkRope {
    /// With RoPE from a base (MLX's `exp2(-d · log2 base)`), and with
    /// explicit frequencies (Llama 3 scaling); each compiled on first use.
    base: CudaKernel,
    freqs: CudaKernel,
    shape: QkShape,
    dtype: Dtype,
    /// One element of `dtype`, passed for the norms' weights where the
    /// model has none (the kernel's text reads them in that type).
    no_norm: Array,
}

impl QkRope {
    /// The kernels for `shape` in `dtype`; `None` where [`wanted`] says no,
    /// the dtype has no kernel or a head's size is odd or over 2,048.
    pub fn new(shape: QkShape, dtype: Dtype) -> Result<Option<Self>> {
        match wanted(Kind::QkRope) {
            true => Self::make(shape, dtype),
            false => Ok(None),
        }
    }

    /// The kernels whatever `INFER_FUSE` says (`None` where they do not
    /// apply).
    fn make(shape: QkShape, dtype: Dtype) -> Result<Option<Self>> {
        let d = shape.head_dim;
        let ok = d > 0 && d % 2 == 0 && d <= 2048 && shape.heads > 0;
        let Some(ty) = cuda_type(dtype).filter(|_| ok && shape.kv_heads > 0) else {
            return Ok(None);
        };
        let make = |with_freqs: bool| {
            let source = qk_rope_source(ty, shape, with_freqs);
            CudaKernel::new(
                "infer_qk_norm_rope",
                &["qkv", "qw", "kw", "rope_p", "freqs", "offsets"],
                &["q", "k"],
                &source,
            )
        };
        Ok(Some(Self {
            base: make(false)?,
            freqs: make(true)?,
            shape,
            dtype,
            no_norm: Array::zeros::<f32>(&[1])?.as_dtype(dtype)?,
        }))
    }

    /// Whether a decode step of `x` (the layer's input, `[B, 1, hidden]`)
    /// with `rope` takes this kernel.
    pub fn applies(&self, x: &Array, rope: &RotaryEmbedding) -> bool {
        step_applies(x, self.dtype) && rope.dims() == self.shape.head_dim
    }

    /// Whether the kernel was made for q/k norms of epsilon `eps` (`None`:
    /// for a model without them).
    pub fn takes_norm(&self, eps: Option<f32>) -> bool {
        self.shape.norm_eps == eps
    }

    /// q and k of the stacked projection `qkv` `[B, 1, (H + 2·Hkv)·D]`,
    /// normed by `norms` (the q and k norms' weights, where the model has
    /// them) and rotated by `rope` from `start`.
    pub fn apply(
        &self,
        qkv: &Array,
        norms: Option<(&Array, &Array)>,
        rope: &RotaryEmbedding,
        start: &Positions,
    ) -> Result<(Array, Array)> {
        let QkShape {
            heads,
            kv_heads,
            head_dim: d,
            norm_eps,
        } = self.shape;
        let b = qkv.dim(0);
        let width = (heads + 2 * kv_heads) * d;
        if qkv.shape() != [b, 1, width] || qkv.dtype() != self.dtype {
            return Err(Exception::custom(format!(
                "q/k kernel: projection {:?} {:?}, not [{b}, 1, {width}] {:?}",
                qkv.shape(),
                qkv.dtype(),
                self.dtype
            )));
        }
        let (params, freqs) = rope.kernel_inputs();
        let (qw, kw) = match (norms, norm_eps) {
            (Some((qw, kw)), Some(_)) => (qw, kw),
            (None, None) => (&self.no_norm, &self.no_norm),
            _ => return Err(Exception::custom("q/k kernel: norms unlike its model's")),
        };
        let offsets = match start {
            Positions::Start(p) => Array::from_slice(&[*p], &[1]),
            Positions::Rows(a) => a.as_dtype(Dtype::Int32)?,
        };
        let kernel = if freqs.is_some() {
            &self.freqs
        } else {
            &self.base
        };
        let mut out = kernel
            .apply(
                &[qkv, qw, kw, params, freqs.unwrap_or(params), &offsets],
                &[
                    (&[b, heads, 1, d], self.dtype),
                    (&[b, kv_heads, 1, d], self.dtype),
                ],
                [(heads + kv_heads) * d / 2, b, 1],
                [d / 2, 1, 1],
            )?
            .into_iter();
        match (out.next(), out.next()) {
            (Some(q), Some(k)) => Ok((q, k)),
            _ => Err(Exception::custom("the q/k kernel lost an output")),
        }
    }
}

/// The body of [`QkRope`]'s kernel for `ty`, `shape`, and RoPE from a base
/// or (`with_freqs`) from explicit frequencies. `rope_p` is `[log2 base,
/// scale]` in f32; `offsets` holds one position, or one per row.
fn qk_rope_source(ty: &str, shape: QkShape, with_freqs: bool) -> String {
    let QkShape {
        heads,
        kv_heads,
        head_dim,
        norm_eps,
    } = shape;
    let (norm, eps) = match norm_eps {
        Some(e) => ("true", e),
        None => ("false", 0.0),
    };
    format!(
        r#"
    using T = {ty};
    constexpr int D = {head_dim};
    constexpr int HALF = D / 2;
    constexpr int HQ = {heads};
    constexpr int HK = {kv_heads};
    constexpr int ROW = (HQ + 2 * HK) * D;
    constexpr bool NORM = {norm};
    constexpr bool FREQS = {with_freqs};
    constexpr float EPS = {eps:e}f;
    __shared__ float part[HALF];
    const int i = threadIdx.x;
    const int head = blockIdx.x;
    const int b = blockIdx.y;
    const T* x = qkv + static_cast<size_t>(b) * ROW + static_cast<size_t>(head) * D;
    float x1 = static_cast<float>(x[i]);
    float x2 = static_cast<float>(x[i + HALF]);
    if (NORM) {{
        part[i] = x1 * x1 + x2 * x2;
        __syncthreads();
        for (int s = 1; s < HALF; s *= 2) {{
            if (i % (2 * s) == 0 && i + s < HALF) part[i] += part[i + s];
            __syncthreads();
        }}
        const float inv = ::rsqrtf(part[0] / static_cast<float>(D) + EPS);
        const T* w = head < HQ ? qw : kw;
        x1 = static_cast<float>(w[i] * static_cast<T>(x1 * inv));
        x2 = static_cast<float>(w[i + HALF] * static_cast<T>(x2 * inv));
    }}
    const int pos = offsets[offsets_shape[0] == 1 ? 0 : b];
    const float L = rope_p[1] * static_cast<float>(pos);
    float inv_freq;
    if (FREQS) {{
        inv_freq = 1.0 / freqs[i];
    }} else {{
        const float d = static_cast<float>(i) / static_cast<float>(HALF);
        inv_freq = ::exp2f(-d * rope_p[0]);
    }}
    const float theta = L * inv_freq;
    const float c = ::cosf(theta);
    const float s = ::sinf(theta);
    T* out = head < HQ
        ? q + (static_cast<size_t>(b) * HQ + head) * D
        : k + (static_cast<size_t>(b) * HK + (head - HQ)) * D;
    out[i] = static_cast<T>(x1 * c - x2 * s);
    out[i + HALF] = static_cast<T>(x1 * s + x2 * c);
"#
    )
}

/// One comparison of [`check`]: a kernel's output against MLX's own
/// operations on the same random inputs.
#[derive(Debug, Clone)]
pub struct CheckResult {
    /// What was compared.
    pub case: String,
    /// The largest absolute difference.
    pub max_abs_diff: f32,
    /// The largest absolute value of MLX's result (the scale of the diff).
    pub max_abs: f32,
    /// Elements that differ at all, of `elements`.
    pub differing: usize,
    /// Elements compared.
    pub elements: usize,
}

/// Runs each fused kernel on random inputs of Qwen3-like sizes in `dtype`
/// and compares it with MLX's own operations: the residual add and norm,
/// and q/k norms with RoPE from a base, with Llama 3 frequencies and
/// without norms, for one position for every row and for a position per
/// row, whatever `INFER_FUSE` says. An error off MLX's CUDA backend.
pub fn check(dtype: Dtype) -> Result<Vec<CheckResult>> {
    use inference_formats::config::{Rope, RopeScaling};
    use mlx_rs::random;

    let compare = |case: String, got: &Array, want: &Array| -> Result<CheckResult> {
        let (g, w) = (
            got.as_dtype(Dtype::Float32)?,
            want.as_dtype(Dtype::Float32)?,
        );
        if g.shape() != w.shape() {
            return Err(Exception::custom(format!(
                "{case}: shape {:?}, MLX's {:?}",
                g.shape(),
                w.shape()
            )));
        }
        let diff = g.subtract(&w)?.abs()?;
        let differing = diff.gt(Array::from_f32(0.0))?.sum(None)?;
        let (max_diff, max_abs) = (diff.max(None)?, w.abs()?.max(None)?);
        mlx_rs::transforms::eval([&max_diff, &max_abs, &differing])?;
        let read = |a: &Array| {
            a.try_item_cast::<f32>()
                .map_err(|e| Exception::custom(format!("{case}: {e}")))
        };
        Ok(CheckResult {
            max_abs_diff: read(&max_diff)?,
            max_abs: read(&max_abs)?,
            differing: read(&differing)? as usize,
            elements: w.size(),
            case,
        })
    };
    let normal = |shape: &[i32]| -> Result<Array> {
        random::normal::<f32>(shape, None, None, None)?.as_dtype(dtype)
    };
    if !cuda_here() {
        return Err(Exception::custom(
            "no fused kernels here (MLX CUDA backend only)",
        ));
    }
    random::seed(7)?;
    let mut out = Vec::new();
    let (b, hidden, eps) = (2, 1024, 1e-6);
    let add_norm = AddNorm::make(hidden, eps, dtype)?
        .ok_or_else(|| Exception::custom(format!("no add-norm kernel for {dtype:?}")))?;
    let (x, r) = (normal(&[b, 1, hidden])?, normal(&[b, 1, hidden])?);
    let norm = RmsNorm {
        weight: normal(&[hidden])?,
        eps,
    };
    let (h, n) = add_norm.apply(&x, &r, &norm)?;
    let want_h = x.add(&r)?;
    out.push(compare("add_norm: sum".into(), &h, &want_h)?);
    out.push(compare(
        "add_norm: norm".into(),
        &n,
        &norm.forward(&want_h)?,
    )?);

    let (hq, hk, d) = (16, 8, 128);
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    let ropes = [
        ("base 1e6", RopeScaling::None, true),
        ("llama3 frequencies", llama3, true),
        (
            "linear ×8, no norms",
            RopeScaling::Linear { factor: 8.0 },
            false,
        ),
    ];
    for (what, scaling, with_norms) in ropes {
        let rope = RotaryEmbedding::new(
            d,
            &Rope {
                theta: 1_000_000.0,
                scaling,
            },
        )?;
        let shape = QkShape {
            heads: hq,
            kv_heads: hk,
            head_dim: d,
            norm_eps: with_norms.then_some(eps),
        };
        let kernel = QkRope::make(shape, dtype)?
            .ok_or_else(|| Exception::custom(format!("no q/k kernel for {dtype:?}")))?;
        let qkv = normal(&[b, 1, (hq + 2 * hk) * d])?;
        let (qn, kn) = (
            RmsNorm {
                weight: normal(&[d])?,
                eps,
            },
            RmsNorm {
                weight: normal(&[d])?,
                eps,
            },
        );
        let starts = [
            ("one start", Positions::Start(3_000)),
            (
                "a start per row",
                Positions::Rows(Array::from_slice(&[5i32, 70_000], &[2])),
            ),
        ];
        for (at, start) in starts {
            let norms = with_norms.then_some((&qn.weight, &kn.weight));
            let (q, k) = kernel.apply(&qkv, norms, &rope, &start)?;
            let heads = qkv.reshape(&[b, hq + 2 * hk, 1, d])?;
            let parts = heads.split_at_indices(&[hq, hq + hk], 1)?;
            // MLX's RoPE of a strided view of two rows with one offset
            // wrote the second row wrongly (f16, f32, on an H100): the
            // reference takes a contiguous copy (`x + 0`, exact).
            let zero = Array::zeros::<f32>(&[1])?.as_dtype(dtype)?;
            let prep = |x: &Array, n: &RmsNorm| match with_norms {
                true => n.forward(x),
                false => x.add(&zero),
            };
            let want_q = rope.forward(&prep(&parts[0], &qn)?, &start)?;
            let want_k = rope.forward(&prep(&parts[1], &kn)?, &start)?;
            out.push(compare(format!("q: {what}, {at}"), &q, &want_q)?);
            out.push(compare(format!("k: {what}, {at}"), &k, &want_k)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off the CUDA backend (this test's CPU) no kernel is built, so the
    /// models run MLX's own operations; a suspension nests and comes back.
    #[test]
    fn no_kernels_off_cuda_and_suspension_nests() {
        if crate::device::mlx().gpu != Some(crate::device::GpuApi::Cuda) {
            assert!(!cuda_here());
            assert!(!wanted(Kind::AddNorm) && !wanted(Kind::QkRope));
            assert!(AddNorm::new(64, 1e-6, Dtype::Float32).unwrap().is_none());
            assert!(check(Dtype::Float32).is_err(), "the check needs CUDA");
        }
        let x = Array::zeros::<f32>(&[1, 1, 8]).unwrap();
        assert!(step_applies(&x, Dtype::Float32));
        assert!(!step_applies(&x, Dtype::Bfloat16));
        {
            let _outer = Suspend::new();
            assert!(!step_applies(&x, Dtype::Float32));
            {
                let _inner = Suspend::new();
            }
            assert!(
                !step_applies(&x, Dtype::Float32),
                "the outer suspension holds"
            );
        }
        assert!(step_applies(&x, Dtype::Float32));
        let two = Array::zeros::<f32>(&[1, 2, 8]).unwrap();
        assert!(
            !step_applies(&two, Dtype::Float32),
            "one position per row only"
        );
    }

    /// The kernel text names every input and output it is given (MLX passes
    /// shapes only for names the text mentions) and bakes in the sizes.
    #[test]
    fn qk_source_bakes_in_the_shape() {
        let shape = QkShape {
            heads: 16,
            kv_heads: 8,
            head_dim: 128,
            norm_eps: Some(1e-6),
        };
        let s = qk_rope_source("__nv_bfloat16", shape, false);
        for want in [
            "constexpr int D = 128;",
            "constexpr int HQ = 16;",
            "constexpr int HK = 8;",
            "constexpr bool NORM = true;",
            "constexpr bool FREQS = false;",
            "constexpr float EPS = 1e-6f;",
            "offsets_shape[0]",
        ] {
            assert!(s.contains(want), "{want} missing");
        }
        for name in [
            "qkv", "qw", "kw", "rope_p", "freqs", "offsets", "q +", "k +",
        ] {
            assert!(s.contains(name), "{name} unused");
        }
    }
}

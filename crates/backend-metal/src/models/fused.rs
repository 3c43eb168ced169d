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
//!   RMSNorms (Qwen3) and RoPE of both, written as heads `[B, H, 1, D]`,
//!   and v copied out as contiguous heads (so that the cache takes it in a
//!   plain copy, not a strided one); by default ([`Kind::KvWrite`]) k and v
//!   go straight into the layer's KV cache instead, which saves MLX's two
//!   slice updates a layer and the copies of the whole cache they make
//!   while the previous step still holds it (see [`crate::cache`]).
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
//! [`crate::models::fused_gemv`] holds the third kind, on by default with
//! [`QkRope`]: a layer's matrix-vector products with its norms, activation
//! and residual adds folded in (which leaves [`AddNorm`] nothing to do).

use std::cell::Cell;
use std::sync::Mutex;

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

use crate::cache::{KvCache, Positions};
use crate::ffi::CudaKernel;
use crate::models::fused_attn::{AttnShape, DecodeAttention};
use crate::models::fused_gemv::{Fold, FusedGemv, GemvWeight, Storage};
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
    /// [`FusedGemv`](crate::models::fused_gemv::FusedGemv): a layer's four
    /// products with its norms, activation and residual adds folded in.
    Gemv,
    /// The gemv kernels also for MLX affine-quantised weights (with
    /// [`Kind::Gemv`]). Opt-in: on an H100 they were slower than MLX's
    /// `qmv`.
    QGemv,
    /// [`QkRope`] writing a decode step's keys and values straight into
    /// the layer's cache ([`KvCache::write_in_place`](crate::cache::KvCache::write_in_place))
    /// instead of MLX's slice updates.
    KvWrite,
    /// [`DecodeAttention`]: a decode step's attention over the cache that
    /// [`Kind::KvWrite`] writes, instead of MLX's `sdpa_vector`.
    Attn,
}

impl Kind {
    /// The name `INFER_FUSE` lists it by.
    fn name(self) -> &'static str {
        match self {
            Kind::AddNorm => "add",
            Kind::QkRope => "qk",
            Kind::Gemv => "gemv",
            Kind::QGemv => "qgemv",
            Kind::KvWrite => "kv",
            Kind::Attn => "attn",
        }
    }

    /// Whether an unset `INFER_FUSE` builds it.
    fn by_default(self) -> bool {
        matches!(self, Kind::QkRope | Kind::Gemv | Kind::KvWrite | Kind::Attn)
    }
}

/// Whether `INFER_FUSE` (`setting`, `None` when unset) asks for `kind`:
/// unset builds [`QkRope`] (writing into the caches), the gemv kernels and
/// the decode attention, `1` every kind, `0` none, and a list of `qk`, `add`,
/// `gemv`, `qgemv`, `kv` and `attn` (separated by `,` or `+`) those named
/// (the gemv kernels and `kv` serve only with the q/k one, `qgemv` only
/// with `gemv`, `attn` only with `kv`). Anything else is warned of and read
/// as unset.
fn asks_for(setting: Option<&str>, kind: Kind) -> bool {
    const NAMES: [&str; 6] = ["qk", "add", "gemv", "qgemv", "kv", "attn"];
    match setting.map(str::trim) {
        None => kind.by_default(),
        Some("0") => false,
        Some("1") => true,
        Some(list) if list.split([',', '+']).all(|n| NAMES.contains(&n.trim())) => {
            list.split([',', '+']).any(|n| n.trim() == kind.name())
        }
        Some(other) => {
            tracing::warn!(
                "INFER_FUSE={other:?} is not 0, 1 or a list of qk, add, gemv, qgemv, kv and attn; \
                 read as unset"
            );
            kind.by_default()
        }
    }
}

/// Whether a model loaded on this thread should build the fused kernel
/// `kind` (where [`cuda_here`]), as `INFER_FUSE` says: unset builds
/// [`QkRope`] writing into the caches ([`Kind::KvWrite`]), the gemv
/// kernels and the decode attention ([`Kind::Attn`]), `1` every kind, `0`
/// none, and a list of `qk`, `add`, `gemv`, `qgemv`, `kv` and `attn`
/// (separated by `,` or `+`) those named ([`Kind::QGemv`] is opt-in: on an
/// H100 it made a 4-bit Qwen3-4B's decode slower). On an H100 each default
/// kind made decode faster; [`AddNorm`] saves GPU time but
/// each call of a custom kernel costs the host more than MLX's own two
/// kernels, so with it decode was slower and it is opt-in (the gemv kernels
/// fold its work into theirs).
pub fn wanted(kind: Kind) -> bool {
    asks_for(std::env::var("INFER_FUSE").ok().as_deref(), kind) && cuda_here()
}

/// Whether MLX reaches the GPU through CUDA and this thread's default
/// stream is on the GPU: where the kernels can run.
pub fn cuda_here() -> bool {
    crate::device::mlx().gpu == Some(crate::device::GpuApi::Cuda)
        && crate::device::thread_stream_is_gpu()
}

/// Whether a step of `x` `[B, L, …]` in `dtype` may take a kernel made for
/// `dtype`: one position per row, the same dtype, not training.
pub(crate) fn step_applies(x: &Array, dtype: Dtype) -> bool {
    x.ndim() == 3 && x.dim(1) == 1 && x.dtype() == dtype && !SUSPENDED.with(Cell::get)
}

/// The CUDA spelling of an MLX dtype the kernels take.
pub(crate) fn cuda_type(dtype: Dtype) -> Option<&'static str> {
    match dtype {
        Dtype::Bfloat16 => Some("__nv_bfloat16"),
        Dtype::Float16 => Some("__half"),
        Dtype::Float32 => Some("float"),
        _ => None,
    }
}

/// Threads per block of [`AddNorm`] for rows of `dim` in `dtype`: one per
/// 16 bytes of a row, in whole warps, between 64 and 1,024.
fn add_norm_threads(dim: i32, dtype: Dtype) -> i32 {
    let per_load = match dtype {
        Dtype::Bfloat16 | Dtype::Float16 => 8,
        _ => 4,
    };
    let loads = (dim + per_load - 1) / per_load;
    ((loads + 31) / 32 * 32).clamp(64, 1_024)
}

/// `h = x + r` and `n = rms_norm(h) · w` in one kernel, one block per row.
#[derive(Debug)]
pub struct AddNorm {
    kernel: CudaKernel,
    threads: i32,
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
        let threads = add_norm_threads(dim, dtype);
        let source = format!(
            r#"
    using T = {ty};
    constexpr int D = {dim};
    constexpr int TPB = {threads};
    constexpr int V = 16 / sizeof(T);
    constexpr int NV = D % V == 0 ? D / V : 0;
    constexpr int C = NV > 0 ? (NV + TPB - 1) / TPB : 1;
    constexpr float EPS = {eps:e}f;
    __shared__ float part[TPB / 32];
    const int t = threadIdx.x;
    const size_t row = blockIdx.x;
    const T* xr = x + row * D;
    const T* rr = r + row * D;
    T* hr = h + row * D;
    T* nr = n + row * D;
    const bool vector = NV > 0
        && ((reinterpret_cast<size_t>(xr) | reinterpret_cast<size_t>(rr)
             | reinterpret_cast<size_t>(hr) | reinterpret_cast<size_t>(nr)
             | reinterpret_cast<size_t>(w)) & 15) == 0;
    float ss = 0.0f;
    uint4 held[C];
    if (vector) {{
        // 16 bytes a load; the sums stay in registers for the norm.
#pragma unroll
        for (int c = 0; c < C; ++c) {{
            const int j = t + c * TPB;
            if (j < NV) {{
                const uint4 a = reinterpret_cast<const uint4*>(xr)[j];
                const uint4 b = reinterpret_cast<const uint4*>(rr)[j];
                const T* pa = reinterpret_cast<const T*>(&a);
                const T* pb = reinterpret_cast<const T*>(&b);
                T* ps = reinterpret_cast<T*>(&held[c]);
#pragma unroll
                for (int e = 0; e < V; ++e) {{
                    const T v = pa[e] + pb[e];
                    ps[e] = v;
                    const float f = static_cast<float>(v);
                    ss += f * f;
                }}
                reinterpret_cast<uint4*>(hr)[j] = held[c];
            }}
        }}
    }} else {{
        for (int j = t; j < D; j += TPB) {{
            T v = xr[j] + rr[j];
            hr[j] = v;
            float f = static_cast<float>(v);
            ss += f * f;
        }}
    }}
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((t & 31) == 0) part[t >> 5] = ss;
    __syncthreads();
    float total = 0.0f;
    for (int k = 0; k < TPB / 32; ++k) total += part[k];
    const float inv = ::rsqrtf(total / static_cast<float>(D) + EPS);
    if (vector) {{
#pragma unroll
        for (int c = 0; c < C; ++c) {{
            const int j = t + c * TPB;
            if (j < NV) {{
                const uint4 wv = reinterpret_cast<const uint4*>(w)[j];
                const T* pw = reinterpret_cast<const T*>(&wv);
                const T* ph = reinterpret_cast<const T*>(&held[c]);
                uint4 o;
                T* po = reinterpret_cast<T*>(&o);
#pragma unroll
                for (int e = 0; e < V; ++e) {{
                    po[e] = pw[e] * static_cast<T>(static_cast<float>(ph[e]) * inv);
                }}
                reinterpret_cast<uint4*>(nr)[j] = o;
            }}
        }}
    }} else {{
        for (int j = t; j < D; j += TPB) {{
            float f = static_cast<float>(hr[j]);
            nr[j] = w[j] * static_cast<T>(f * inv);
        }}
    }}
"#
        );
        let kernel = CudaKernel::new("infer_add_rms_norm", &["x", "r", "w"], &["h", "n"], &source)?;
        Ok(Some(Self {
            kernel,
            threads,
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
                [self.threads * rows, 1, 1],
                [self.threads, 1, 1],
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
/// and v, as heads `[B, H, 1, D]`, `[B, Hkv, 1, D]` and `[B, Hkv, 1, D]`
/// (v contiguous, so that the cache takes it in a plain copy); or q alone,
/// with k and v written into the layer's cache ([`QkRope::apply_into`]).
/// One block per head and row, a thread per rotated pair.
#[derive(Debug)]
pub struct QkRope {
    /// With RoPE from a base (MLX's `exp2(-d · log2 base)`), and with
    /// explicit frequencies (Llama 3 scaling); each compiled on first use.
    base: CudaKernel,
    freqs: CudaKernel,
    /// The same writing k and v into the cache.
    base_into: CudaKernel,
    freqs_into: CudaKernel,
    /// Whether decode steps take [`QkRope::apply_into`] ([`Kind::KvWrite`]).
    into_cache: bool,
    /// The attention after it, over the cache it wrote ([`Kind::Attn`]).
    attention: Option<DecodeAttention>,
    shape: QkShape,
    dtype: Dtype,
    /// One element of `dtype`, passed for the norms' weights where the
    /// model has none (the kernel's text reads them in that type).
    no_norm: Array,
    /// Every layer of a decode step rotates from the same position: one
    /// offset array serves them all.
    offset: OffsetMemo,
}

impl QkRope {
    /// The kernels for `shape` in `dtype`; `None` where [`wanted`] says no,
    /// the dtype has no kernel or a head's size is odd or over 2,048. With
    /// the attention after them ([`Kind::Attn`]) for scores scaled by
    /// `scale`, where it applies.
    pub fn new(shape: QkShape, dtype: Dtype, scale: f32) -> Result<Option<Self>> {
        if !wanted(Kind::QkRope) {
            return Ok(None);
        }
        let Some(k) = Self::make(shape, dtype)? else {
            return Ok(None);
        };
        let into_cache = wanted(Kind::KvWrite);
        let attention = match into_cache && wanted(Kind::Attn) {
            true => DecodeAttention::make(
                AttnShape {
                    heads: shape.heads,
                    kv_heads: shape.kv_heads,
                    head_dim: shape.head_dim,
                    scale,
                },
                dtype,
            )?,
            false => None,
        };
        Ok(Some(Self {
            into_cache,
            attention,
            ..k
        }))
    }

    /// The kernels whatever `INFER_FUSE` says (`None` where they do not
    /// apply).
    fn make(shape: QkShape, dtype: Dtype) -> Result<Option<Self>> {
        let d = shape.head_dim;
        let ok = d > 0 && d % 2 == 0 && d <= 2048 && shape.heads > 0;
        let Some(ty) = cuda_type(dtype).filter(|_| ok && shape.kv_heads > 0) else {
            return Ok(None);
        };
        let make = |with_freqs: bool, into_cache: bool| {
            let source = qk_rope_source(ty, shape, with_freqs, into_cache);
            let inputs = ["qkv", "qw", "kw", "rope_p", "freqs", "offsets", "kc", "vc"];
            match into_cache {
                true => CudaKernel::new("infer_qk_norm_rope_kv", &inputs, &["q"], &source),
                false => CudaKernel::new(
                    "infer_qk_norm_rope",
                    &inputs[..6],
                    &["q", "k", "v"],
                    &source,
                ),
            }
        };
        Ok(Some(Self {
            base: make(false, false)?,
            freqs: make(true, false)?,
            base_into: make(false, true)?,
            freqs_into: make(true, true)?,
            into_cache: false,
            attention: None,
            shape,
            dtype,
            no_norm: Array::zeros::<f32>(&[1])?.as_dtype(dtype)?,
            offset: OffsetMemo::default(),
        }))
    }

    /// Whether a decode step of `x` (the layer's input, `[B, 1, hidden]`)
    /// with `rope` takes this kernel.
    pub fn applies(&self, x: &Array, rope: &RotaryEmbedding) -> bool {
        step_applies(x, self.dtype) && rope.dims() == self.shape.head_dim
    }

    /// Whether decode steps should write k and v straight into their cache
    /// ([`QkRope::apply_into`]).
    pub fn writes_cache(&self) -> bool {
        self.into_cache
    }

    /// Whether the kernel was made for q/k norms of epsilon `eps` (`None`:
    /// for a model without them).
    pub fn takes_norm(&self, eps: Option<f32>) -> bool {
        self.shape.norm_eps == eps
    }

    /// q, k and v of the stacked projection `qkv` `[B, 1, (H + 2·Hkv)·D]`
    /// as heads: q and k normed by `norms` (the q and k norms' weights,
    /// where the model has them) and rotated by `rope` from `start`, v
    /// copied.
    pub fn apply(
        &self,
        qkv: &Array,
        norms: Option<(&Array, &Array)>,
        rope: &RotaryEmbedding,
        start: &Positions,
    ) -> Result<(Array, Array, Array)> {
        let offsets = match start {
            Positions::Start(p) => self.offset.get(*p)?,
            Positions::Rows(a) => a.as_dtype(Dtype::Int32)?,
        };
        let mut out = self.launch(qkv, norms, rope, &offsets, None)?.into_iter();
        match (out.next(), out.next(), out.next()) {
            (Some(q), Some(k), Some(v)) => Ok((q, k, v)),
            _ => Err(Exception::custom("the q/k kernel lost an output")),
        }
    }

    /// As [`QkRope::apply`] from position `at` for every row, returning q
    /// and writing k and v into position `at` of `cache` (the keys and
    /// values `[B, H_kv, capacity, D]`, row-major) in place. For
    /// [`KvCache::write_in_place`](crate::cache::KvCache::write_in_place),
    /// whose rules make the write safe: the returned q depends on it, so
    /// an attention reading q reads the cache after the write.
    pub fn apply_into(
        &self,
        qkv: &Array,
        norms: Option<(&Array, &Array)>,
        rope: &RotaryEmbedding,
        at: i32,
        cache: (&Array, &Array),
    ) -> Result<Array> {
        self.check_cache(qkv, at, cache)?;
        let offsets = self.offset.get(at)?;
        self.write_at(qkv, norms, rope, &offsets, cache)
    }

    /// An error unless `cache` `[B, H_kv, capacity, D]` of this kernel's
    /// dtype can take position `at` of `qkv`'s rows.
    fn check_cache(&self, qkv: &Array, at: i32, cache: (&Array, &Array)) -> Result<()> {
        let QkShape {
            kv_heads, head_dim, ..
        } = self.shape;
        let want = |a: &Array| {
            let s = a.shape();
            s.len() == 4
                && s[0] == qkv.dim(0)
                && s[1] == kv_heads
                && s[3] == head_dim
                && (0..s[2]).contains(&at)
                && a.dtype() == self.dtype
        };
        if !want(cache.0) || !want(cache.1) {
            return Err(Exception::custom(format!(
                "q/k kernel: cache {:?} {:?} and {:?} cannot take position {at} of {:?} {:?}",
                cache.0.shape(),
                cache.0.dtype(),
                cache.1.shape(),
                qkv.shape(),
                self.dtype
            )));
        }
        Ok(())
    }

    /// The q/k kernel from the position array `offsets`, writing into
    /// `cache` (already checked to take the position): q.
    fn write_at(
        &self,
        qkv: &Array,
        norms: Option<(&Array, &Array)>,
        rope: &RotaryEmbedding,
        offsets: &Array,
        cache: (&Array, &Array),
    ) -> Result<Array> {
        self.launch(qkv, norms, rope, offsets, Some(cache))?
            .into_iter()
            .next()
            .ok_or_else(|| Exception::custom("the q/k kernel lost its output"))
    }

    /// As [`QkRope::apply_into`], then, where this kernel has its
    /// attention ([`Kind::Attn`]) for scores scaled by `scale`, the
    /// attention of q over positions `0..=at` of `cache`:
    /// [`StepOut::Attended`] `[B, H, 1, D]`; otherwise [`StepOut::Query`]
    /// (q, for the caller's attention).
    pub fn attend_into(
        &self,
        qkv: &Array,
        norms: Option<(&Array, &Array)>,
        rope: &RotaryEmbedding,
        at: i32,
        cache: (&Array, &Array),
        scale: f32,
    ) -> Result<StepOut> {
        self.check_cache(qkv, at, cache)?;
        // One position array for both kernels (the attention reads the
        // length from it).
        let offsets = self.offset.get(at)?;
        let q = self.write_at(qkv, norms, rope, &offsets, cache)?;
        let shape = AttnShape {
            heads: self.shape.heads,
            kv_heads: self.shape.kv_heads,
            head_dim: self.shape.head_dim,
            scale,
        };
        match &self.attention {
            Some(attention) if attention.serves(&shape) => attention
                .apply(&q, cache.0, cache.1, &offsets, at + 1)
                .map(StepOut::Attended),
            _ => Ok(StepOut::Query(q)),
        }
    }

    /// The kernel over `qkv` from the positions `offsets` (one, or one a
    /// row): q, k and v, or q alone with k and v written into `cache`.
    fn launch(
        &self,
        qkv: &Array,
        norms: Option<(&Array, &Array)>,
        rope: &RotaryEmbedding,
        offsets: &Array,
        cache: Option<(&Array, &Array)>,
    ) -> Result<Vec<Array>> {
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
        // A thread per rotated pair, in whole warps.
        let threads = (d / 2 + 31) / 32 * 32;
        let grid = [(heads + 2 * kv_heads) * threads, b, 1];
        let f = freqs.unwrap_or(params);
        let q = (&[b, heads, 1, d][..], self.dtype);
        match cache {
            Some((kc, vc)) => {
                let kernel = match freqs {
                    Some(_) => &self.freqs_into,
                    None => &self.base_into,
                };
                let inputs = [qkv, qw, kw, params, f, offsets, kc, vc];
                kernel.apply(&inputs, &[q], grid, [threads, 1, 1])
            }
            None => {
                let kernel = match freqs {
                    Some(_) => &self.freqs,
                    None => &self.base,
                };
                let kv = (&[b, kv_heads, 1, d][..], self.dtype);
                let inputs = [qkv, qw, kw, params, f, offsets];
                kernel.apply(&inputs, &[q, kv, kv], grid, [threads, 1, 1])
            }
        }
    }
}

/// What [`QkRope::attend_into`] made.
#[derive(Debug)]
pub enum StepOut {
    /// The attention's output `[B, H, 1, D]`.
    Attended(Array),
    /// q `[B, H, 1, D]` alone: the caller attends.
    Query(Array),
}

/// The last single position passed to the q/k kernel and its int32
/// array, so that the layers of one decode step share one array instead of
/// making one each (a host allocation and a graph input per layer).
///
/// Where [`device_scalars`] says so, the array is `[1, 4]`
/// (the position, then three zeros) and the next position's is made on the
/// GPU from the last one's (`+ [1, 0, 0, 0]`): MLX keeps arrays of at most
/// 8 bytes, and arrays the host wrote, in managed memory that the GPU
/// reads across the bus (or faults in), while an output of a GPU operation
/// over 8 bytes is device memory; every layer's kernel then reads the
/// position from the GPU's own memory. Otherwise it is the host's `[1]`
/// array, a new one each position.
#[derive(Debug)]
struct OffsetMemo {
    last: Mutex<Option<(i32, Array)>>,
    /// `[1, 4]` int32 `[1, 0, 0, 0]`, where positions are made on the GPU.
    step: Option<Array>,
}

impl Default for OffsetMemo {
    fn default() -> Self {
        Self::new(device_scalars())
    }
}

impl OffsetMemo {
    fn new(on_device: bool) -> Self {
        Self {
            last: Mutex::new(None),
            step: on_device.then(|| Array::from_slice(&[1i32, 0, 0, 0], &[1, 4])),
        }
    }

    /// The position `p` as an int32 array whose first element is `p`, the
    /// same array while `p` repeats.
    fn get(&self, p: i32) -> Result<Array> {
        // A poisoned lock only means a panic elsewhere mid-update: the
        // memo is then rebuilt.
        let mut memo = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let a = match (memo.as_ref(), &self.step) {
            (Some((q, a)), _) if *q == p => return Ok(a.clone()),
            (Some((q, a)), Some(step)) if q.checked_add(1) == Some(p) => a.add(step)?,
            (_, Some(_)) => Array::from_slice(&[p, 0, 0, 0], &[1, 4]),
            (_, None) => Array::from_slice(&[p], &[1]),
        };
        *memo = Some((p, a.clone()));
        Ok(a)
    }
}

/// Whether the small per-step inputs of the decode kernels (the position,
/// RoPE's parameters) are made so that they live in the GPU's memory
/// (unset or `INFER_SCALARS=device`; `host` keeps the host's arrays, which
/// MLX's CUDA allocator leaves in managed memory that the kernels read
/// across the bus; anything else is warned of and read as unset). On an
/// H100 they made Qwen3-4B's decode 8 % (128 tokens) to 31 % (512) faster
/// (docs/benchmarks.md, item 15).
pub(crate) fn device_scalars() -> bool {
    match std::env::var("INFER_SCALARS").as_deref().map(str::trim) {
        Err(_) | Ok("device") => true,
        Ok("host") => false,
        Ok(other) => {
            tracing::warn!("INFER_SCALARS={other:?} is not device or host; read as unset");
            true
        }
    }
}

/// The body of [`QkRope`]'s kernel for `ty`, `shape`, and RoPE from a base
/// or (`with_freqs`) from explicit frequencies. `rope_p` is `[log2 base,
/// scale]` in f32; `offsets` holds one position, or one per row. With
/// `into_cache`, k and v go to their position in the caches `kc` and `vc`
/// `[B, H_kv, capacity, D]` (inputs, written through a cast: MLX has no
/// in-place outputs) instead of to outputs.
fn qk_rope_source(ty: &str, shape: QkShape, with_freqs: bool, into_cache: bool) -> String {
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
    // Where head `kh` of kind `k` or `v` of row `b` goes.
    let to = |out: &str, kh: &str| match into_cache {
        true => format!(
            "const_cast<T*>({out}c) + ((static_cast<size_t>(b) * HK + ({kh})) \
             * {out}c_shape[2] + pos) * D"
        ),
        false => format!("{out} + (static_cast<size_t>(b) * HK + ({kh})) * D"),
    };
    let (v_out, k_out) = (to("v", "head - HQ - HK"), to("k", "head - HQ"));
    format!(
        r#"
    using T = {ty};
    constexpr int D = {head_dim};
    constexpr int HALF = D / 2;
    constexpr int TPB = (HALF + 31) / 32 * 32;
    constexpr int HQ = {heads};
    constexpr int HK = {kv_heads};
    constexpr int ROW = (HQ + 2 * HK) * D;
    constexpr bool NORM = {norm};
    constexpr bool FREQS = {with_freqs};
    constexpr float EPS = {eps:e}f;
    __shared__ float part[TPB / 32];
    const int i = threadIdx.x;
    const int head = blockIdx.x;
    const int b = blockIdx.y;
    const bool live = i < HALF;
    const T* x = qkv + static_cast<size_t>(b) * ROW + static_cast<size_t>(head) * D;
    // Every load is issued before any result is needed.
    const int pos = offsets[offsets_shape[0] == 1 ? 0 : b];
    const T a1 = live ? x[i] : static_cast<T>(0.0f);
    const T a2 = live ? x[i + HALF] : static_cast<T>(0.0f);
    if (head >= HQ + HK) {{
        // A value head: copied out as it is.
        if (live) {{
            T* out = {v_out};
            out[i] = a1;
            out[i + HALF] = a2;
        }}
        return;
    }}
    const T* w = head < HQ ? qw : kw;
    const T w1 = NORM && live ? w[i] : static_cast<T>(0.0f);
    const T w2 = NORM && live ? w[i + HALF] : static_cast<T>(0.0f);
    float inv_freq;
    if (FREQS) {{
        inv_freq = live ? 1.0 / freqs[i] : 0.0f;
    }} else {{
        const float d = static_cast<float>(i) / static_cast<float>(HALF);
        inv_freq = ::exp2f(-d * rope_p[0]);
    }}
    const float scale = rope_p[1];
    float x1 = static_cast<float>(a1);
    float x2 = static_cast<float>(a2);
    if (NORM) {{
        float ss = x1 * x1 + x2 * x2;
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (TPB > 32) {{
            if ((i & 31) == 0) part[i >> 5] = ss;
            __syncthreads();
            ss = 0.0f;
            for (int k = 0; k < TPB / 32; ++k) ss += part[k];
        }}
        const float inv = ::rsqrtf(ss / static_cast<float>(D) + EPS);
        x1 = static_cast<float>(w1 * static_cast<T>(x1 * inv));
        x2 = static_cast<float>(w2 * static_cast<T>(x2 * inv));
    }}
    if (!live) return;
    const float theta = scale * static_cast<float>(pos) * inv_freq;
    const float c = ::cosf(theta);
    const float s = ::sinf(theta);
    T* out = head < HQ
        ? q + (static_cast<size_t>(b) * HQ + head) * D
        : {k_out};
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
    use mlx_rs::ops::concatenate;
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
    let (b, eps) = (2, 1e-6);
    // Qwen3-0.6B's and -4B's widths (16-byte loads) and one that is not a
    // whole number of loads (the kernel's element-wise path).
    for hidden in [1_024, 2_560, 1_001] {
        let add_norm = AddNorm::make(hidden, eps, dtype)?
            .ok_or_else(|| Exception::custom(format!("no add-norm kernel for {dtype:?}")))?;
        let (x, r) = (normal(&[b, 1, hidden])?, normal(&[b, 1, hidden])?);
        let norm = RmsNorm {
            weight: normal(&[hidden])?,
            eps,
        };
        let (h, n) = add_norm.apply(&x, &r, &norm)?;
        let want_h = x.add(&r)?;
        out.push(compare(format!("add_norm {hidden}: sum"), &h, &want_h)?);
        out.push(compare(
            format!("add_norm {hidden}: norm"),
            &n,
            &norm.forward(&want_h)?,
        )?);
    }

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
        // With its attention where the dtype has one (the queued steps
        // below then run the write and our attention as decode does).
        let scale = 1.0 / (d as f32).sqrt();
        let attn_shape = AttnShape {
            heads: hq,
            kv_heads: hk,
            head_dim: d,
            scale,
        };
        let kernel = QkRope {
            attention: DecodeAttention::make(attn_shape, dtype)?,
            ..kernel
        };
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
        let norms = with_norms.then_some((&qn.weight, &kn.weight));
        let heads = qkv.reshape(&[b, hq + 2 * hk, 1, d])?;
        let parts = heads.split_at_indices(&[hq, hq + hk], 1)?;
        // MLX's RoPE of a strided view of two rows with one offset wrote
        // the second row wrongly (f16, f32, on an H100): the reference
        // takes a contiguous copy (`x + 0`, exact).
        let zero = Array::zeros::<f32>(&[1])?.as_dtype(dtype)?;
        let prep = |x: &Array, n: &RmsNorm| match with_norms {
            true => n.forward(x),
            false => x.add(&zero),
        };
        for (at, start) in starts {
            let (q, k, v) = kernel.apply(&qkv, norms, &rope, &start)?;
            let want_q = rope.forward(&prep(&parts[0], &qn)?, &start)?;
            let want_k = rope.forward(&prep(&parts[1], &kn)?, &start)?;
            out.push(compare(format!("q: {what}, {at}"), &q, &want_q)?);
            out.push(compare(format!("k: {what}, {at}"), &k, &want_k)?);
            out.push(compare(format!("v: {what}, {at}"), &v, &parts[2])?);
        }
        // Into a cache holding five positions: q as above, and the cache
        // read back holds the five and then this step's k and v.
        let into = |cache: &mut KvCache, qkv: &Array| {
            cache
                .write_in_place(1, |kc, vc, at| {
                    kernel.apply_into(qkv, norms, &rope, at, (kc, vc))
                })?
                .ok_or_else(|| Exception::custom("the cache refused a write in place"))
        };
        let mut cache = KvCache::new();
        let (pk, pv) = (normal(&[b, hk, 5, d])?, normal(&[b, hk, 5, d])?);
        cache.update(&pk, &pv)?;
        let (k, v, q) = into(&mut cache, &qkv)?;
        let start = Positions::Start(5);
        let want_q = rope.forward(&prep(&parts[0], &qn)?, &start)?;
        let want_k = rope.forward(&prep(&parts[1], &kn)?, &start)?;
        let want_k = concatenate(&[pk, want_k], 2)?;
        let want_v = concatenate(&[pv, parts[2].add(&zero)?], 2)?;
        out.push(compare(format!("q into the cache: {what}"), &q, &want_q)?);
        out.push(compare(format!("cached k: {what}"), &k, &want_k)?);
        out.push(compare(format!("cached v: {what}"), &v, &want_v)?);
        // Decode steps queued one after another without waiting (as
        // generation does), past a growth of the cache: the same cache as
        // the q/k kernel's outputs written with slice updates.
        // Where the kernel has its attention, each step attends as decode
        // does (`attend_into`), against MLX's attention over the slice
        // updates' cache.
        let mut slices = cache.clone();
        let mut queued = Vec::new();
        let (mut attended, mut want_attended) = (Vec::new(), Vec::new());
        for _ in 0..KvCache::STEP {
            let qkv = normal(&[b, 1, (hq + 2 * hk) * d])?;
            let at = slices.offset();
            let (q_ref, k, v) = kernel.apply(&qkv, norms, &rope, &Positions::Start(at))?;
            let (k_all, v_all) = slices.update(&k, &v)?;
            let step = cache
                .write_in_place(1, |kc, vc, at| {
                    kernel.attend_into(&qkv, norms, &rope, at, (kc, vc), scale)
                })?
                .ok_or_else(|| Exception::custom("the cache refused a write in place"))?;
            let done = match step.2 {
                StepOut::Attended(out) => {
                    want_attended.push(crate::cache::attend(
                        &q_ref,
                        &k_all,
                        &v_all,
                        scale,
                        &crate::cache::AttnMask::None,
                    )?);
                    attended.push(out.clone());
                    out
                }
                StepOut::Query(q) => q,
            };
            mlx_rs::transforms::async_eval([&done])?;
            queued.push(done);
        }
        mlx_rs::transforms::eval(&queued)?;
        if !attended.is_empty() {
            out.push(compare(
                format!("attention of {} queued steps: {what}", attended.len()),
                &concatenate(&attended, 2)?,
                &concatenate(&want_attended, 2)?,
            )?);
        }
        let (Some((k, v)), Some((want_k, want_v))) = (cache.contents(), slices.contents()) else {
            return Err(Exception::custom("an empty cache after the steps"));
        };
        out.push(compare(
            format!("k after {} steps: {what}", KvCache::STEP),
            &k,
            &want_k,
        )?);
        out.push(compare(
            format!("v after {} steps: {what}", KvCache::STEP),
            &v,
            &want_v,
        )?);
    }

    // The folded products (bf16 and f16 only so far), at Qwen3-0.6B's and
    // -4B's sizes: (hidden, q/k/v rows, attention width, intermediate);
    // dense, then quantised as `mlx_lm.convert -q` does (4 and 8 bits,
    // groups of 64).
    let sizes: &[(i32, i32, i32, i32)] = match dtype {
        Dtype::Float32 => &[],
        _ => &[(1_024, 4_096, 2_048, 3_072), (2_560, 6_144, 4_096, 9_728)],
    };
    for &(hidden, qkv_rows, attn, inter) in sizes {
        for storage in [
            Storage::Dense,
            Storage::Affine { bits: 4, group: 64 },
            Storage::Affine { bits: 8, group: 64 },
        ] {
            out.extend(check_gemvs(
                storage,
                (hidden, qkv_rows, attn, inter),
                dtype,
                &compare,
            )?);
        }
    }

    // The decode attention (bf16 and f16 only so far) at Qwen3-4B's,
    // Qwen3-0.6B's, Gemma-3-1B's and Llama-3.2-1B's head sizes, against
    // MLX's attention over the same positions of the cache: within one
    // block, over several, and over more than MLX's own kernel takes in
    // one pass; two rows with positions past the last block's end; and
    // contexts long enough for the looped first kernel (each block walking
    // several chunks) under the default cap. An error (a kernel that does
    // not compile) is a failed case, so that the results above still print.
    if dtype != Dtype::Float32 {
        for (heads, kv_heads, head_dim) in [(32, 8, 128), (16, 8, 128), (4, 1, 256), (32, 8, 64)] {
            let case = format!("attention {heads}/{kv_heads} heads of {head_dim}");
            match check_attention((heads, kv_heads, head_dim), dtype, &normal, &compare) {
                Ok(results) => out.extend(results),
                Err(e) => out.push(CheckResult {
                    case: format!("{case}: {e}"),
                    max_abs_diff: f32::NAN,
                    max_abs: 0.0,
                    differing: 0,
                    elements: 0,
                }),
            }
        }
    }

    Ok(out)
}

/// [`check`]'s decode attention for `(heads, kv_heads, head_dim)` in
/// `dtype`, on inputs from `normal`.
fn check_attention(
    (heads, kv_heads, head_dim): (i32, i32, i32),
    dtype: Dtype,
    normal: &dyn Fn(&[i32]) -> Result<Array>,
    compare: &dyn Fn(String, &Array, &Array) -> Result<CheckResult>,
) -> Result<Vec<CheckResult>> {
    use mlx_rs::ops::indexing::IndexOp;

    let shape = AttnShape {
        heads,
        kv_heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
    };
    let attention = DecodeAttention::make(shape, dtype)?
        .ok_or_else(|| Exception::custom(format!("no decode attention for {shape:?} {dtype:?}")))?;
    let mut out = Vec::new();
    // The last three reach the first kernel's looped text under the
    // default cap (`DEFAULT_SPLITS` blocks a layer): at 8,200 and 2 × 3,000
    // for eight key/value heads, at 17,000 for one.
    for (b, len) in [
        (1, 1),
        (1, 65),
        (1, 2_100),
        (2, 300),
        (1, 8_200),
        (2, 3_000),
        (1, 17_000),
    ] {
        let cap = len + 7;
        let q = normal(&[b, heads, 1, head_dim])?;
        let (kc, vc) = (
            normal(&[b, kv_heads, cap, head_dim])?,
            normal(&[b, kv_heads, cap, head_dim])?,
        );
        // The position as the device's `[1, 4]` array, and for two rows
        // as the host's `[1]`.
        let offsets = OffsetMemo::new(b == 1).get(len - 1)?;
        let got = attention.apply(&q, &kc, &vc, &offsets, len)?;
        let (k, v) = (kc.index((.., .., ..len, ..)), vc.index((.., .., ..len, ..)));
        let want = crate::cache::attend(&q, &k, &v, shape.scale, &crate::cache::AttnMask::None)?;
        out.push(compare(
            format!("attention {heads}/{kv_heads} heads of {head_dim}: {b} × {len}"),
            &got,
            &want,
        )?);
    }
    Ok(out)
}

/// [`check`]'s folded products for weights stored as `storage`, at sizes
/// `(hidden, q/k/v rows, attention width, intermediate)`. A quantised
/// weight's reference is its dequantised matrix in f32 (the kernels add
/// `scale · q + bias` in f32 where MLX's `qmv` rounds it to the
/// activations' dtype), multiplied and summed in f32.
fn check_gemvs(
    storage: Storage,
    (hidden, qkv_rows, attn, inter): (i32, i32, i32, i32),
    dtype: Dtype,
    compare: &dyn Fn(String, &Array, &Array) -> Result<CheckResult>,
) -> Result<Vec<CheckResult>> {
    use mlx_rs::random;

    let eps = 1e-6;
    let normal = |shape: &[i32]| -> Result<Array> {
        random::normal::<f32>(shape, None, None, None)?.as_dtype(dtype)
    };
    let x = normal(&[1, 1, hidden])?;
    let norm = RmsNorm {
        weight: normal(&[hidden])?,
        eps,
    };
    // A weight of a trained model's size (so that sums stay in range), as
    // the kernel takes it, and as the reference multiplies it.
    let weight = |rows: i32, cols: i32| -> Result<(Vec<Array>, Array)> {
        let w = normal(&[rows, cols])?.multiply(Array::from_f32(0.05).as_dtype(dtype)?)?;
        match storage {
            Storage::Dense => Ok((vec![w.clone()], w)),
            Storage::Affine { bits, group } => {
                let (q, sc, bi) = mlx_rs::ops::quantize(&w, group, bits)?;
                let f32s = |a: &Array| a.as_dtype(Dtype::Float32);
                let reference = mlx_rs::ops::dequantize(&q, &f32s(&sc)?, &f32s(&bi)?, group, bits)?;
                Ok((vec![q, sc, bi], reference))
            }
        }
    };
    fn view(storage: Storage, parts: &[Array]) -> GemvWeight<'_> {
        match (storage, parts) {
            (Storage::Affine { bits, group }, [weight, scales, biases]) => GemvWeight::Affine {
                weight,
                scales,
                biases,
                bits,
                group,
            },
            _ => GemvWeight::Dense(&parts[0]),
        }
    }
    // `a` `[1, 1, k]` times `w`ᵀ: MLX's own product for a dense weight, in
    // f32 for a quantised one (rounded to `dtype` once, as the kernel does).
    let product = |a: &Array, w: &Array| -> Result<Array> {
        match storage {
            Storage::Dense => a.matmul(w.t()),
            Storage::Affine { .. } => w
                .multiply(a.as_dtype(Dtype::Float32)?.reshape(&[1, -1])?)?
                .sum_axis(-1, None)?
                .reshape(&[1, 1, -1])?
                .as_dtype(dtype),
        }
    };
    let make = |fold, k, n| {
        FusedGemv::make(fold, k, n, eps, dtype, storage)?.ok_or_else(|| {
            Exception::custom(format!(
                "no gemv kernel for {k} × {n} {dtype:?} {storage:?}"
            ))
        })
    };
    let what = match storage {
        Storage::Dense => String::new(),
        Storage::Affine { bits, group } => format!(", {bits}-bit groups of {group}"),
    };
    let mut out = Vec::new();
    let normed = norm.forward(&x)?;
    // A kernel that norms `x` first, for `n` outputs from a weight of
    // `rows` rows: its result and the reference weight.
    let normed_gemv = |fold, n, rows| -> Result<(Array, Array)> {
        let (parts, w) = weight(rows, hidden)?;
        let v = view(storage, &parts);
        let got = make(fold, hidden, n)?.apply(&x, Some(&norm.weight), &v, None)?;
        Ok((got, w))
    };
    let (got, w) = normed_gemv(Fold::Norm, qkv_rows, qkv_rows)?;
    out.push(compare(
        format!("gemv norm: {hidden} → {qkv_rows}{what}"),
        &got,
        &product(&normed, &w)?,
    )?);

    let (got, w) = normed_gemv(Fold::NormSwiglu, inter, 2 * inter)?;
    let gu = product(&normed, &w)?;
    let halves = gu.split_equal(2, -1)?;
    let (g, u) = (&halves[0], &halves[1]);
    let want = g.multiply(mlx_rs::ops::sigmoid(g)?)?.multiply(u)?;
    out.push(compare(
        format!("gemv norm swiglu: {hidden} → {inter}{what}"),
        &got,
        &want,
    )?);

    for (k, name) in [(attn, "output"), (inter, "down")] {
        let a = normal(&[1, 1, k])?;
        let (parts, w) = weight(hidden, k)?;
        let v = view(storage, &parts);
        let got = make(Fold::Residual, k, hidden)?.apply(&a, None, &v, Some(&x))?;
        let want = x.add(product(&a, &w)?)?;
        out.push(compare(
            format!("gemv residual ({name}): {k} → {hidden}{what}"),
            &got,
            &want,
        )?);
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
        let s = qk_rope_source("__nv_bfloat16", shape, false, false);
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
        assert!(!s.contains("kc") && !s.contains("vc"));
        // Into the cache: k and v to their position of `kc` and `vc`, whose
        // capacity MLX passes because the text reads `kc_shape`.
        let s = qk_rope_source("__nv_bfloat16", shape, true, true);
        for want in [
            "constexpr bool FREQS = true;",
            "const_cast<T*>(vc) + ((static_cast<size_t>(b) * HK + (head - HQ - HK)) * vc_shape[2] + pos) * D",
            "const_cast<T*>(kc) + ((static_cast<size_t>(b) * HK + (head - HQ)) * kc_shape[2] + pos) * D",
        ] {
            assert!(s.contains(want), "{want} missing");
        }
        assert!(!s.contains("k + (static_cast") && !s.contains("v + (static_cast"));
    }

    /// `INFER_FUSE`: unset gives the default kinds, `0` none, `1` all,
    /// a list those named; a value it does not know reads as unset.
    #[test]
    fn infer_fuse_reads_lists() {
        use Kind::*;
        let on = |setting: Option<&str>| {
            [QkRope, AddNorm, Gemv, QGemv, KvWrite, Attn]
                .into_iter()
                .filter(|k| asks_for(setting, *k))
                .collect::<Vec<_>>()
        };
        assert_eq!(on(None), [QkRope, Gemv, KvWrite, Attn]);
        assert_eq!(on(Some("0")), []);
        assert_eq!(on(Some("1")), [QkRope, AddNorm, Gemv, QGemv, KvWrite, Attn]);
        assert_eq!(on(Some("qk+gemv+kv+attn")), [QkRope, Gemv, KvWrite, Attn]);
        assert_eq!(on(Some("qk,gemv,qgemv")), [QkRope, Gemv, QGemv]);
        assert_eq!(on(Some("qk+gemv+kv")), [QkRope, Gemv, KvWrite]);
        assert_eq!(on(Some("qk+gemv")), [QkRope, Gemv]);
        assert_eq!(on(Some("add")), [AddNorm]);
        assert_eq!(on(Some("qk,add")), [QkRope, AddNorm]);
        assert_eq!(on(Some(" add ")), [AddNorm]);
        assert_eq!(on(Some("add+qk")), [QkRope, AddNorm]);
        assert_eq!(on(Some("qk")), [QkRope]);
        assert_eq!(
            on(Some("qk,ad")),
            [QkRope, Gemv, KvWrite, Attn],
            "a typo reads as unset"
        );
        assert_eq!(on(Some("")), [QkRope, Gemv, KvWrite, Attn]);
    }

    /// The layers of a step share one offset array; the next position
    /// gets a new one and leaves the old one as it was; on the device's
    /// side the next one is made from the last one, and a jump starts
    /// afresh.
    #[test]
    fn one_offset_array_per_position() {
        for on_device in [false, true] {
            let memo = OffsetMemo::new(on_device);
            let first = |x: &Array| -> i32 {
                let x = x.reshape(&[-1]).unwrap();
                x.as_slice::<i32>()[0]
            };
            let a = memo.get(7).unwrap();
            let b = memo.get(7).unwrap();
            assert_eq!(first(&a), 7);
            assert_eq!(a.shape(), if on_device { &[1, 4][..] } else { &[1][..] });
            // The same MLX array (one buffer), not an equal copy.
            let data = |x: &Array| x.as_slice::<i32>().as_ptr();
            assert_eq!(data(&a), data(&b));
            let c = memo.get(8).unwrap();
            assert_eq!(first(&c), 8);
            assert_ne!(data(&a), data(&c));
            assert_eq!(first(&a), 7, "an earlier step's array is untouched");
            assert_eq!(first(&memo.get(3).unwrap()), 3);
            assert_eq!(first(&memo.get(4).unwrap()), 4);
            assert_eq!(first(&memo.get(i32::MAX).unwrap()), i32::MAX);
        }
    }

    /// The add-norm kernel's blocks: a thread per 16-byte load, in whole
    /// warps, at least two warps and at most 1,024 threads.
    #[test]
    fn add_norm_blocks_fit_rows() {
        assert_eq!(add_norm_threads(2_560, Dtype::Bfloat16), 320);
        assert_eq!(add_norm_threads(1_024, Dtype::Float32), 256);
        assert_eq!(add_norm_threads(1_001, Dtype::Float16), 128);
        assert_eq!(add_norm_threads(64, Dtype::Bfloat16), 64);
        assert_eq!(add_norm_threads(65_536, Dtype::Float32), 1_024);
    }
}

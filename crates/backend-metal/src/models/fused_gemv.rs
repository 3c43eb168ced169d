//! Matrix-vector kernels for a decode step of one row, with the small
//! operations around each product folded in (`INFER_FUSE` names them
//! `gemv`; on by default with the q/k kernel, see
//! [`wanted`](crate::models::fused::wanted)).
//!
//! A decoder layer's step otherwise runs, around its four products, two
//! RMSNorms, two residual adds and the SiLU × up: five kernels and six graph
//! nodes (the gate/up split too) that each cost the host as much as a
//! product does. Here:
//!
//! - [`Fold::Norm`]: `y = W · rms_norm(x)`: for a dense weight each warp
//!   sums `x`'s squares itself and normalises the pieces of `x` it reads
//!   (for a quantised one each block first normalises `x` into shared
//!   memory) (the input norm before q/k/v);
//! - [`Fold::NormSwiglu`]: `y = silu(g) · u` with `[g; u] = W · rms_norm(x)`
//!   for a gate/up weight stacked `[2I, K]`: a warp computes row `i` of the
//!   gate and of the up part together (the post-attention norm, gate/up and
//!   the activation);
//! - [`Fold::Residual`]: `y = r + W · x` (the output projection and the
//!   down projection, each with the residual add after it).
//!
//! A layer's step is then eight kernels instead of thirteen. Each rounds
//! where MLX's own operations round (the norm's output, each product's
//! output, each step of the activation, which is MLX's own `Sigmoid` and
//! `Multiply`), but the products and the norm's sum of squares add in
//! another order than MLX's, so a result can differ in its last bit.
//! [`check`](crate::models::fused::check) compares them with MLX's
//! operations. Weights dense or MLX affine-quantised (4 or 8 bits, groups
//! of 32, 64 or 128; [`Storage`]), activations in bf16 or f16 (f32 waits
//! for its check on a GPU), one row (a batch keeps MLX's kernels).
//!
//! A quantised product adds `scale · Σ q·x + bias · Σ x` per group in f32
//! (the sum of each load's inputs is made once a block), where MLX's own
//! `qmv` dequantises each weight into the activations' dtype (and, for
//! fewer than 8 bits, adds the products in it too): the same value, with
//! fewer roundings. The quantised kernels are opt-in (`INFER_FUSE` naming
//! `qgemv`, [`Kind::QGemv`](crate::models::fused::Kind::QGemv)): on an H100
//! they passed [`check`](crate::models::fused::check) but made a 4-bit
//! Qwen3-4B's decode 12 % slower than MLX's `qmv` (docs/benchmarks.md,
//! item 13).

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

use crate::ffi::CudaKernel;

type Result<T> = std::result::Result<T, Exception>;

/// What a [`FusedGemv`] folds into its product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// `W · rms_norm(x)`.
    Norm,
    /// `silu(g) · u` of `[g; u] = W · rms_norm(x)`.
    NormSwiglu,
    /// `r + W · x`.
    Residual,
}

impl Fold {
    fn code(self) -> i32 {
        match self {
            Fold::Norm => 0,
            Fold::NormSwiglu => 1,
            Fold::Residual => 2,
        }
    }
}

/// How a product's weight is stored, which decides its kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// `[rows, k]` in the activations' dtype.
    Dense,
    /// MLX's affine quantisation: `bits` a value, a scale and a bias (in
    /// the activations' dtype) for every `group` values of a row.
    Affine {
        /// Bits a value (4 or 8 have kernels).
        bits: i32,
        /// Values a group (32, 64 or 128 have kernels).
        group: i32,
    },
}

/// A product's weight as the kernels read it.
#[derive(Debug, Clone, Copy)]
pub enum GemvWeight<'a> {
    /// `[rows, k]`.
    Dense(&'a Array),
    /// MLX's affine layout: `weight` `[rows, k · bits / 32]` uint32 (the
    /// lowest bits first), `scales` and `biases` `[rows, k / group]`.
    Affine {
        /// The packed values.
        weight: &'a Array,
        /// A scale a group.
        scales: &'a Array,
        /// A bias a group.
        biases: &'a Array,
        /// Bits a value.
        bits: i32,
        /// Values a group.
        group: i32,
    },
}

impl GemvWeight<'_> {
    /// How it is stored.
    pub fn storage(&self) -> Storage {
        match *self {
            GemvWeight::Dense(_) => Storage::Dense,
            GemvWeight::Affine { bits, group, .. } => Storage::Affine { bits, group },
        }
    }
}

/// Threads per block.
const THREADS: i32 = 256;

/// Most bytes of the input vector: a quantised kernel's block holds it in
/// shared memory (the dense kernels, which do not, keep the same bound
/// until they are checked on a GPU at larger sizes).
const MAX_INPUT_BYTES: i32 = 40 * 1024;

/// Rows per block for `n` output rows: the most (up to 8, one a warp)
/// that still leaves 512 blocks, so that every SM of a large GPU holds
/// several.
///
/// Eight, not more: Qwen3-4B's gate/up product (9,728 activation rows, two
/// weight rows each) in blocks of 16 decoded at 225 tok/s on an H100 and in
/// blocks of 8 at 234 (docs/benchmarks.md, item 12).
fn rows_per_block(n: i32) -> i32 {
    let mut rows = 8;
    while rows > 1 && (n + rows - 1) / rows < 512 {
        rows /= 2;
    }
    rows
}

/// A matrix-vector product of one row with [`Fold`] folded in, for one
/// weight shape and [`Storage`].
#[derive(Debug)]
pub struct FusedGemv {
    kernel: CudaKernel,
    fold: Fold,
    storage: Storage,
    /// Input features.
    k: i32,
    /// Output features (for [`Fold::NormSwiglu`], of the activation: the
    /// weight has twice as many rows).
    n: i32,
    rows: i32,
    eps: f32,
    dtype: Dtype,
    /// One element, passed where the fold takes no norm weight or residual.
    none: Array,
}

impl FusedGemv {
    /// The kernel for a weight of `n` (× 2 for [`Fold::NormSwiglu`]) rows of
    /// `k` features stored as `storage`, activations in `dtype`, norms of
    /// epsilon `eps`; `None` where it does not apply (a dtype or a
    /// quantisation without one, `k` not a whole number of 16-byte loads or
    /// groups, or an input over [`MAX_INPUT_BYTES`]).
    pub fn make(
        fold: Fold,
        k: i32,
        n: i32,
        eps: f32,
        dtype: Dtype,
        storage: Storage,
    ) -> Result<Option<Self>> {
        // f32 waits for its check on a GPU (bf16 and f16 passed it).
        let Some(ty) = super::fused::cuda_type(dtype).filter(|_| dtype != Dtype::Float32) else {
            return Ok(None);
        };
        let size = match dtype {
            Dtype::Float32 => 4,
            _ => 2,
        };
        if k <= 0 || n <= 0 || k % (16 / size) != 0 || k * size > MAX_INPUT_BYTES {
            return Ok(None);
        }
        let rows = rows_per_block(n);
        let (source, inputs): (String, &[&str]) = match storage {
            Storage::Dense => (
                gemv_source(ty, fold, k, n, rows, eps),
                &["x", "nw", "w", "res"],
            ),
            Storage::Affine { bits, group } => {
                let quantised =
                    matches!(bits, 4 | 8) && matches!(group, 32 | 64 | 128) && k % group == 0;
                if !quantised {
                    return Ok(None);
                }
                (
                    qgemv_source(ty, fold, k, n, rows, eps, bits, group),
                    &["x", "nw", "w", "sc", "bi", "res"],
                )
            }
        };
        let kernel = CudaKernel::with_header("infer_gemv", inputs, &["y"], &source, GEMV_HEADER)?;
        Ok(Some(Self {
            kernel,
            fold,
            storage,
            k,
            n,
            rows,
            eps,
            dtype,
            none: Array::zeros::<f32>(&[1])?.as_dtype(dtype)?,
        }))
    }

    /// Whether it takes weight `w` and (where its fold has one) a norm of
    /// weight `norm` with epsilon `eps`.
    pub fn takes(&self, w: &GemvWeight<'_>, norm: Option<(&Array, f32)>) -> bool {
        let rows = match self.fold {
            Fold::NormSwiglu => 2 * self.n,
            _ => self.n,
        };
        let norm_fits = match (self.fold, norm) {
            (Fold::Residual, None) => true,
            (Fold::Norm | Fold::NormSwiglu, Some((nw, eps))) => {
                nw.shape() == [self.k] && nw.dtype() == self.dtype && eps == self.eps
            }
            _ => false,
        };
        let weight_fits = match *w {
            GemvWeight::Dense(w) => w.shape() == [rows, self.k] && w.dtype() == self.dtype,
            GemvWeight::Affine {
                weight,
                scales,
                biases,
                bits,
                group,
            } => {
                let per_group =
                    |a: &Array| a.shape() == [rows, self.k / group] && a.dtype() == self.dtype;
                weight.shape() == [rows, self.k * bits / 32]
                    && weight.dtype() == Dtype::Uint32
                    && per_group(scales)
                    && per_group(biases)
            }
        };
        w.storage() == self.storage && weight_fits && norm_fits
    }

    /// The product for `x` `[1, 1, k]` (or any shape of `k` elements, such
    /// as attention heads `[1, H, 1, D]`), weight `w` (which it
    /// [`takes`](Self::takes)), the norm's weight `nw` and the residual
    /// `res` `[1, 1, n]` where the fold takes them: `[1, 1, n]`.
    pub fn apply(
        &self,
        x: &Array,
        nw: Option<&Array>,
        w: &GemvWeight<'_>,
        res: Option<&Array>,
    ) -> Result<Array> {
        let extra = |a: Option<&Array>, len: usize| {
            a.is_some_and(|a| a.size() != len || a.dtype() != self.dtype)
        };
        if x.size() != self.k as usize
            || x.dtype() != self.dtype
            || extra(nw, self.k as usize)
            || extra(res, self.n as usize)
            || w.storage() != self.storage
        {
            return Err(Exception::custom(format!(
                "fused gemv ({:?}, {} → {}, {:?}): input {:?} {:?} or weight {:?} does not fit",
                self.fold,
                self.k,
                self.n,
                self.storage,
                x.shape(),
                x.dtype(),
                w.storage()
            )));
        }
        let blocks = (self.n + self.rows - 1) / self.rows;
        let (nw, res) = (nw.unwrap_or(&self.none), res.unwrap_or(&self.none));
        let (dense, affine);
        let inputs: &[&Array] = match *w {
            GemvWeight::Dense(w) => {
                dense = [x, nw, w, res];
                &dense
            }
            GemvWeight::Affine {
                weight,
                scales,
                biases,
                ..
            } => {
                affine = [x, nw, weight, scales, biases, res];
                &affine
            }
        };
        let out = self.kernel.apply(
            inputs,
            &[(&[1, 1, self.n], self.dtype)],
            [blocks * THREADS, 1, 1],
            [THREADS, 1, 1],
        )?;
        out.into_iter()
            .next()
            .ok_or_else(|| Exception::custom("the gemv kernel lost its output"))
    }
}

/// MLX's own device operations (its `Sigmoid`, `Multiply` and `Add`), so
/// that the folded activation and residual round as MLX's kernels do.
const GEMV_HEADER: &str = "#include \"mlx/backend/cuda/device/unary_ops.cuh\"\n\
                           #include \"mlx/backend/cuda/device/binary_ops.cuh\"\n";

/// Both kernels' first lines: the dtype `T`, the shape, the fold (`MODE`),
/// the norm's `EPS`, and how a block's 256 threads share its `RPB` rows.
fn preamble(ty: &str, fold: Fold, k: i32, n: i32, rows: i32, eps: f32) -> String {
    let mode = fold.code();
    format!(
        r#"    using T = {ty};
    constexpr int K = {k};
    constexpr int N = {n};
    constexpr int MODE = {mode};
    constexpr float EPS = {eps:e}f;
    constexpr int RPB = {rows};
    constexpr int THREADS = {THREADS};
    constexpr int WARPS = THREADS / 32;
    constexpr int RPW = RPB > WARPS ? RPB / WARPS : 1;
    constexpr int WPR = RPB < WARPS ? WARPS / RPB : 1;
    constexpr int DOTS = MODE == 1 ? 2 * RPW : RPW;
"#
    )
}

/// Both kernels' L2 prefetch of the first bytes (up to `PREFETCH`) of each
/// of the block's weight rows, `row` elements of `w` apart, issued while
/// the input is prepared.
fn l2_prefetch(row: &str) -> String {
    format!(
        r#"    // The first bytes of every row of the block, into L2 while the input
    // is prepared.
    {{
        constexpr int LINES = PREFETCH / 128 > 0 ? PREFETCH / 128 : 1;
        constexpr int BLOCK_ROWS = MODE == 1 ? 2 * RPB : RPB;
        for (int j = t; j < BLOCK_ROWS * LINES; j += THREADS) {{
            const int br = j / LINES;
            int r = blockIdx.x * RPB + (MODE == 1 ? br / 2 : br);
            r = r < N ? r : N - 1;
            const char* p = reinterpret_cast<const char*>(
                w + static_cast<size_t>(MODE == 1 && (br & 1) ? r + N : r) * {row});
            asm volatile("prefetch.global.L2 [%0];" :: "l"(p + (j % LINES) * 128));
        }}
    }}
"#
    )
}

/// The quantised kernel's sum of the input's squares over the block (for the norm):
/// each warp's in `red`, then their `total` in every thread.
const SUM_OF_SQUARES: &str = r#"        float ss = 0.0f;
        for (int j = t; j < K; j += THREADS) {
            const float f = static_cast<float>(x[j]);
            ss += f * f;
        }
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) red[warp] = ss;
        __syncthreads();
        float total = 0.0f;
        for (int j = 0; j < WARPS; ++j) total += red[j];
"#;

/// Both kernels' thread roles: lane and warp, the warp's row set (`group`)
/// and its share of each row (`part`), and the set's first row.
const THREAD_ROLES: &str = r#"    const int t = threadIdx.x;
    const int lane = t & 31;
    const int warp = t >> 5;
    const int group = warp / WPR;
    const int part = warp % WPR;
    const int first = blockIdx.x * RPB + group * RPW;
"#;

/// The end of both kernels: each dot product's lanes added, the warps of a
/// row added where several share it, and the row's output written with its
/// fold (MLX's `Sigmoid`, `Multiply` and `Add`).
const GEMV_EPILOGUE: &str = r#"#pragma unroll
    for (int d = 0; d < DOTS; ++d) {
        for (int o = 16; o > 0; o >>= 1) acc[d] += __shfl_xor_sync(0xffffffffu, acc[d], o);
    }
    if (WPR > 1) {
        __syncthreads();
        if (lane == 0) {
#pragma unroll
            for (int d = 0; d < DOTS; ++d) red[warp * DOTS + d] = acc[d];
        }
        __syncthreads();
        if (part != 0) return;
#pragma unroll
        for (int d = 0; d < DOTS; ++d) {
            float s = 0.0f;
            for (int p = 0; p < WPR; ++p) s += red[(group * WPR + p) * DOTS + d];
            acc[d] = s;
        }
    }
    if (lane != 0) return;
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
        const int r = first + i;
        if (r < N) {
            if (MODE == 1) {
                const T g = static_cast<T>(acc[2 * i]);
                const T u = static_cast<T>(acc[2 * i + 1]);
                y[r] = Multiply{}(Multiply{}(g, Sigmoid{}(g)), u);
            } else if (MODE == 2) {
                y[r] = Add{}(res[r], static_cast<T>(acc[i]));
            } else {
                y[r] = static_cast<T>(acc[i]);
            }
        }
    }"#;

/// The body of [`FusedGemv`]'s kernel. Block: 256 threads; `RPB` output
/// rows a block, each row by `WPR` warps (each a share of the row's 16-byte
/// chunks) or each warp `RPW` rows. The block first asks L2 for the start
/// of its rows; then, with no shared copy of the input and no wait for the
/// block, each warp sums the input's squares itself (for a norm) and
/// normalises the chunks it meets as it goes, reading them from global
/// memory (L1), as MLX's own gemv reads its vector.
///
/// Reading the input this way, instead of a block's normalised copy in
/// shared memory behind two waits, made a Qwen3-4B step's products 6 %
/// faster on an H100 (docs/benchmarks.md, item 17).
fn gemv_source(ty: &str, fold: Fold, k: i32, n: i32, rows: i32, eps: f32) -> String {
    let preamble = preamble(ty, fold, k, n, rows, eps);
    let prefetch = l2_prefetch("K");
    format!(
        r#"
{preamble}    constexpr int V = 16 / sizeof(T);
    constexpr int NV = K / V;
    constexpr int ROW_BYTES = K * sizeof(T);
    constexpr int PREFETCH = ROW_BYTES < 4096 ? ROW_BYTES : 4096;
    __shared__ float red[WARPS * DOTS];
{THREAD_ROLES}    const T* rows[DOTS];
#pragma unroll
    for (int d = 0; d < DOTS; ++d) {{
        int r = first + (MODE == 1 ? d / 2 : d);
        r = r < N ? r : N - 1;
        rows[d] = w + static_cast<size_t>(MODE == 1 && (d & 1) ? r + N : r) * K;
    }}
{prefetch}{DIRECT_INPUT}    float acc[DOTS];
#pragma unroll
    for (int d = 0; d < DOTS; ++d) acc[d] = 0.0f;
    const int lo = part * NV / WPR;
    const int hi = (part + 1) * NV / WPR;
    if (((reinterpret_cast<size_t>(w) | reinterpret_cast<size_t>(x) | (MODE == 2 ? 0 : reinterpret_cast<size_t>(nw))) & 15) == 0) {{
#pragma unroll 4
        for (int c = lo + lane; c < hi; c += 32) {{
{DIRECT_CHUNK}            const T* px = reinterpret_cast<const T*>(&xv);
#pragma unroll
            for (int d = 0; d < DOTS; ++d) {{
                const uint4 wv = reinterpret_cast<const uint4*>(rows[d])[c];
                const T* pw = reinterpret_cast<const T*>(&wv);
#pragma unroll
                for (int e = 0; e < V; ++e) {{
                    acc[d] += static_cast<float>(pw[e]) * static_cast<float>(px[e]);
                }}
            }}
        }}
    }} else {{
        // A weight that does not start on 16 bytes: element by element.
        for (int j = lo * V + lane; j < hi * V; j += 32) {{
            const float xf = static_cast<float>(MODE == 2 ? x[j] : nw[j] * static_cast<T>(static_cast<float>(x[j]) * inv));
#pragma unroll
            for (int d = 0; d < DOTS; ++d) acc[d] += static_cast<float>(rows[d][j]) * xf;
        }}
    }}
{GEMV_EPILOGUE}
"#
    )
}

/// [`gemv_source`]'s input, direct: each warp's own sum of squares (16-byte
/// loads where the input starts on 16 bytes) and `inv`, no wait.
const DIRECT_INPUT: &str = r#"    float inv = 1.0f;
    if (MODE != 2) {
        float ss = 0.0f;
        if ((reinterpret_cast<size_t>(x) & 15) == 0) {
            for (int c = lane; c < NV; c += 32) {
                const uint4 xv = reinterpret_cast<const uint4*>(x)[c];
                const T* px = reinterpret_cast<const T*>(&xv);
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    const float f = static_cast<float>(px[e]);
                    ss += f * f;
                }
            }
        } else {
            for (int j = lane; j < K; j += 32) {
                const float f = static_cast<float>(x[j]);
                ss += f * f;
            }
        }
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        inv = ::rsqrtf(ss / static_cast<float>(K) + EPS);
    }
"#;

/// [`gemv_source`]'s 16-byte input chunk `c`, direct: read from `x` and,
/// for a norm, normalised as MLX's norm rounds it.
const DIRECT_CHUNK: &str = r#"            uint4 xv = reinterpret_cast<const uint4*>(x)[c];
            if (MODE != 2) {
                const uint4 nv = reinterpret_cast<const uint4*>(nw)[c];
                T* pn = reinterpret_cast<T*>(&xv);
                const T* pg = reinterpret_cast<const T*>(&nv);
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    pn[e] = pg[e] * static_cast<T>(static_cast<float>(pn[e]) * inv);
                }
            }
"#;

/// The body of a quantised [`FusedGemv`]'s kernel: as [`gemv_source`]
/// with `w` `[rows, K·BITS/32]` uint32 and a scale `sc` and bias `bi`
/// `[rows, K/GROUP]` a group, and the (normalised) input first copied into
/// shared memory (the block's sum of squares, [`SUM_OF_SQUARES`], then a
/// wait). A lane's 16-byte load holds `VALS` values of
/// one group; the block keeps the sum of the inputs each load meets
/// (`xsum`), so that a load adds `scale · Σ q·x + bias · Σ x`. A value `q`
/// becomes a float by its bits (`2²³ + q`, less `2²³`), not by a
/// conversion instruction (a quarter of the rate).
#[allow(clippy::too_many_arguments)]
fn qgemv_source(
    ty: &str,
    fold: Fold,
    k: i32,
    n: i32,
    rows: i32,
    eps: f32,
    bits: i32,
    group: i32,
) -> String {
    let preamble = preamble(ty, fold, k, n, rows, eps);
    let prefetch = l2_prefetch("WORDS");
    format!(
        r#"
{preamble}    constexpr int BITS = {bits};
    constexpr int GROUP = {group};
    constexpr int PER_WORD = 32 / BITS;
    constexpr int VALS = 4 * PER_WORD;
    constexpr int NV = K / VALS;
    constexpr int WORDS = K / PER_WORD;
    constexpr int GROUPS = K / GROUP;
    constexpr unsigned MASK = (1u << BITS) - 1u;
    constexpr int ROW_BYTES = WORDS * 4;
    constexpr int PREFETCH = ROW_BYTES < 4096 ? ROW_BYTES : 4096;
    static_assert(K % GROUP == 0 && GROUP % VALS == 0, "a load holds values of one group");
    static_assert(sizeof(T) == 2, "16-bit activations");
    __shared__ __align__(16) T xs[K];
    __shared__ float xsum[NV];
    __shared__ float red[WARPS * DOTS];
{THREAD_ROLES}    const unsigned* wrow[DOTS];
    const T* srow[DOTS];
    const T* brow[DOTS];
#pragma unroll
    for (int d = 0; d < DOTS; ++d) {{
        int r = first + (MODE == 1 ? d / 2 : d);
        r = r < N ? r : N - 1;
        const size_t rr = static_cast<size_t>(MODE == 1 && (d & 1) ? r + N : r);
        wrow[d] = w + rr * WORDS;
        srow[d] = sc + rr * GROUPS;
        brow[d] = bi + rr * GROUPS;
    }}
{prefetch}    float inv = 1.0f;
    if (MODE != 2) {{
{SUM_OF_SQUARES}        inv = ::rsqrtf(total / static_cast<float>(K) + EPS);
    }}
    // The (normalised) input, and the sum of each load's share of it.
    for (int c = t; c < NV; c += THREADS) {{
        float s = 0.0f;
#pragma unroll
        for (int e = 0; e < VALS; ++e) {{
            const int j = c * VALS + e;
            const T v = MODE == 2 ? x[j] : nw[j] * static_cast<T>(static_cast<float>(x[j]) * inv);
            xs[j] = v;
            s += static_cast<float>(v);
        }}
        xsum[c] = s;
    }}
    __syncthreads();
    float acc[DOTS];
#pragma unroll
    for (int d = 0; d < DOTS; ++d) acc[d] = 0.0f;
    const int lo = part * NV / WPR;
    const int hi = (part + 1) * NV / WPR;
    const bool aligned = (reinterpret_cast<size_t>(w) & 15) == 0;
#pragma unroll 2
    for (int c = lo + lane; c < hi; c += 32) {{
        float xf[VALS];
#pragma unroll
        for (int u = 0; u < VALS / 8; ++u) {{
            const uint4 v = reinterpret_cast<const uint4*>(xs + c * VALS)[u];
            const T* p = reinterpret_cast<const T*>(&v);
#pragma unroll
            for (int e = 0; e < 8; ++e) xf[u * 8 + e] = static_cast<float>(p[e]);
        }}
        const float xc = xsum[c];
        const int g = c * VALS / GROUP;
#pragma unroll
        for (int d = 0; d < DOTS; ++d) {{
            unsigned words[4];
            if (aligned) {{
                const uint4 wv = reinterpret_cast<const uint4*>(wrow[d])[c];
                words[0] = wv.x;
                words[1] = wv.y;
                words[2] = wv.z;
                words[3] = wv.w;
            }} else {{
#pragma unroll
                for (int q = 0; q < 4; ++q) words[q] = wrow[d][4 * c + q];
            }}
            float qx[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {{
                qx[q] = 0.0f;
#pragma unroll
                for (int e = 0; e < PER_WORD; ++e) {{
                    const unsigned v = (words[q] >> (BITS * e)) & MASK;
                    const float f = __uint_as_float(0x4b000000u | v) - 8388608.0f;
                    qx[q] = fmaf(f, xf[q * PER_WORD + e], qx[q]);
                }}
            }}
            const float dot = (qx[0] + qx[1]) + (qx[2] + qx[3]);
            const float s = static_cast<float>(srow[d][g]);
            const float b = static_cast<float>(brow[d][g]);
            acc[d] = fmaf(s, dot, fmaf(b, xc, acc[d]));
        }}
    }}
{GEMV_EPILOGUE}
"#
    )
}

/// One way of computing a product of [`time`], from the weight.
type Product<'a> = Box<dyn Fn(&Array) -> Result<Array> + 'a>;

/// One case of [`time`]: a product at one model's size by one
/// implementation, repeated.
#[derive(Debug, Clone)]
pub struct GemvTiming {
    /// The product: fold, input and output features.
    pub case: String,
    /// `mlx` (MLX's own operations, unfused) or the kernel's name.
    pub implementation: String,
    /// Weight bytes a product reads.
    pub weight_bytes: usize,
    /// Products timed (each on the next of several copies of the weight,
    /// so that they come from memory, not from the L2 cache).
    pub reps: usize,
    /// Wall time of the `reps` products, queued at once and awaited (the
    /// host's cost of queueing them included; a GPU trace of the run gives
    /// each kernel's own time).
    pub seconds: f64,
    /// The largest absolute difference from MLX's result on the same
    /// inputs (0 for MLX's own row).
    pub max_abs_diff: f32,
    /// The largest absolute value of MLX's result (the difference's scale).
    pub max_abs: f32,
}

/// Times each folded product of Qwen3-0.6B's and Qwen3-4B's decode step in
/// bf16, by MLX's own operations and by the dense kernel, in that order,
/// each timed run between pauses of 20 ms (so that a trace of the run shows
/// where each begins and ends). An error off MLX's CUDA backend.
pub fn time(reps: usize) -> Result<Vec<GemvTiming>> {
    use mlx_rs::random;
    use mlx_rs::transforms::eval;

    use crate::models::layers::RmsNorm;

    if !super::fused::cuda_here() {
        return Err(Exception::custom(
            "no fused kernels here (MLX CUDA backend only)",
        ));
    }
    let dtype = Dtype::Bfloat16;
    let eps = 1e-6;
    let reps = reps.max(1);
    random::seed(11)?;
    let normal = |shape: &[i32], scale: f32| -> Result<Array> {
        random::normal::<f32>(shape, None, None, None)?
            .multiply(Array::from_f32(scale))?
            .as_dtype(dtype)
    };
    let mut out = Vec::new();
    // (hidden, q/k/v rows, attention width, intermediate).
    for (hidden, qkv, attn, inter) in [(1_024, 4_096, 2_048, 3_072), (2_560, 6_144, 4_096, 9_728)] {
        for (fold, k, n) in [
            (Fold::Norm, hidden, qkv),
            (Fold::Residual, attn, hidden),
            (Fold::NormSwiglu, hidden, inter),
            (Fold::Residual, inter, hidden),
        ] {
            let rows = if fold == Fold::NormSwiglu { 2 * n } else { n };
            let bytes = rows as usize * k as usize * 2;
            // Copies of the weight enough to pass 256 MB, so that none is
            // still in L2 when it comes round again.
            let copies = (256_000_000 / bytes).clamp(2, 64);
            let weights = (0..copies)
                .map(|_| normal(&[rows, k], 0.05))
                .collect::<Result<Vec<_>>>()?;
            let x = normal(&[1, 1, k], 1.0)?;
            let norm = RmsNorm {
                weight: normal(&[k], 1.0)?,
                eps,
            };
            let res = normal(&[1, 1, n], 1.0)?;
            eval(weights.iter().chain([&x, &norm.weight, &res]))?;
            let case = format!("{fold:?} {k} → {n}");
            let mlx = |w: &Array| -> Result<Array> {
                match fold {
                    Fold::Norm => norm.forward(&x)?.matmul(w.t()),
                    Fold::NormSwiglu => {
                        let gu = norm.forward(&x)?.matmul(w.t())?;
                        let halves = gu.split_equal(2, -1)?;
                        let (g, u) = (&halves[0], &halves[1]);
                        g.multiply(mlx_rs::ops::sigmoid(g)?)?.multiply(u)
                    }
                    Fold::Residual => res.add(x.matmul(w.t())?),
                }
            };
            let kernel = FusedGemv::make(fold, k, n, eps, dtype, Storage::Dense)?
                .ok_or_else(|| Exception::custom(format!("no gemv kernel for {case}")))?;
            let (nw, r) = match fold {
                Fold::Residual => (None, Some(&res)),
                _ => (Some(&norm.weight), None),
            };
            let ours = |w: &Array| kernel.apply(&x, nw, &GemvWeight::Dense(w), r);
            let implementations: [(&str, Product<'_>); 2] =
                [("mlx", Box::new(&mlx)), ("infer_gemv", Box::new(ours))];
            let reference = mlx(&weights[0])?;
            let max_abs = reference.abs()?.max(None)?;
            eval([&reference, &max_abs])?;
            let read = |a: &Array| {
                a.try_item_cast::<f32>()
                    .map_err(|e| Exception::custom(format!("{case}: {e}")))
            };
            let max_abs = read(&max_abs)?;
            for (name, run) in &implementations {
                // Compiled and warm first.
                let warm = weights.iter().map(run).collect::<Result<Vec<_>>>()?;
                let diff = warm[0]
                    .as_dtype(Dtype::Float32)?
                    .subtract(reference.as_dtype(Dtype::Float32)?)?
                    .abs()?
                    .max(None)?;
                eval(warm.iter().chain([&diff]))?;
                let max_abs_diff = read(&diff)?;
                std::thread::sleep(std::time::Duration::from_millis(20));
                let start = std::time::Instant::now();
                let ys = (0..reps)
                    .map(|i| run(&weights[i % copies]))
                    .collect::<Result<Vec<_>>>()?;
                eval(&ys)?;
                let seconds = start.elapsed().as_secs_f64();
                std::thread::sleep(std::time::Duration::from_millis(20));
                out.push(GemvTiming {
                    case: case.clone(),
                    implementation: name.to_string(),
                    weight_bytes: bytes,
                    reps,
                    seconds,
                    max_abs_diff,
                    max_abs,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_keep_large_gpus_busy() {
        // Qwen3-0.6B's and -4B's products: q/k/v, gate/up, output, down.
        assert_eq!(rows_per_block(4_096), 8);
        assert_eq!(rows_per_block(3_072), 4);
        assert_eq!(rows_per_block(1_024), 2);
        assert_eq!(rows_per_block(9_728), 8);
        assert_eq!(rows_per_block(2_560), 4);
        assert_eq!(rows_per_block(300), 1);
        assert_eq!(rows_per_block(1 << 20), 8);
    }

    #[test]
    fn kernels_only_for_shapes_they_serve() {
        // 16-byte loads: bf16 rows of a multiple of 8, f32 of 4.
        let make = |k, dtype| FusedGemv::make(Fold::Norm, k, 64, 1e-6, dtype, Storage::Dense);
        assert!(make(1_001, Dtype::Bfloat16).unwrap().is_none());
        assert!(make(1_002, Dtype::Float32).unwrap().is_none());
        // Inputs over 40 KiB do not fit shared memory beside the rest.
        assert!(make(24_576, Dtype::Float16).unwrap().is_none());
        // f32 waits for its check on a GPU.
        assert!(make(1_024, Dtype::Float32).unwrap().is_none());
        assert!(make(1_024, Dtype::Int32).unwrap().is_none());
        // Quantised: 4 or 8 bits, groups of 32, 64 or 128 that divide a row.
        let affine = |k, bits, group| {
            let storage = Storage::Affine { bits, group };
            FusedGemv::make(Fold::Norm, k, 64, 1e-6, Dtype::Bfloat16, storage)
        };
        assert!(affine(1_024, 3, 64).unwrap().is_none());
        assert!(affine(1_024, 4, 16).unwrap().is_none());
        assert!(affine(1_056, 4, 64).unwrap().is_none());
        assert!(affine(24_576, 8, 64).unwrap().is_none());
    }

    #[test]
    fn quantised_source_bakes_in_the_layout() {
        let s = qgemv_source("__half", Fold::Residual, 9_728, 2_560, 4, 1e-6, 4, 64);
        for want in [
            "using T = __half;",
            "constexpr int K = 9728;",
            "constexpr int BITS = 4;",
            "constexpr int GROUP = 64;",
            "constexpr int MODE = 2;",
            "Add{}(res[r]",
        ] {
            assert!(s.contains(want), "{want} missing");
        }
        assert!(!s.contains("{{"), "format braces left in the text");
    }

    #[test]
    fn source_bakes_in_the_shape_and_fold() {
        let s = gemv_source("__nv_bfloat16", Fold::NormSwiglu, 2_560, 9_728, 16, 1e-6);
        for want in [
            "using T = __nv_bfloat16;",
            "constexpr int K = 2560;",
            "constexpr int N = 9728;",
            "constexpr int MODE = 1;",
            "constexpr int RPB = 16;",
            "Sigmoid{}(g)",
        ] {
            assert!(s.contains(want), "{want} missing");
        }
        assert!(!s.contains("{{"), "format braces left in the text");
    }

    /// The texts are the ones measured on an H100 on 2026-12-07
    /// (docs/benchmarks.md, item 17, the dense ones as `INFER_GEMV_DIRECT=1`
    /// then): a change to them must be checked and timed on a GPU again,
    /// and then these hashes (FNV-1a of the bf16 texts for a 2,560 → 6,144
    /// product in each fold, dense and 4-bit) updated.
    #[test]
    fn measured_texts_unchanged() {
        let hash = |t: String| {
            t.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
        };
        let mut got = Vec::new();
        for fold in [Fold::Norm, Fold::NormSwiglu, Fold::Residual] {
            let ty = "__nv_bfloat16";
            got.push(hash(gemv_source(ty, fold, 2560, 6144, 8, 1e-6)));
            got.push(hash(qgemv_source(ty, fold, 2560, 6144, 8, 1e-6, 4, 64)));
        }
        assert_eq!(
            got,
            [
                4_381_777_901_363_287_007,
                12_361_575_103_592_491_213,
                16_404_091_769_412_173_452,
                3_987_679_108_191_362_112,
                8_853_799_127_680_232_961,
                8_523_673_951_010_454_119,
            ]
        );
    }

    /// The input: no shared copy and no wait before the rows; each warp's
    /// own sum of squares, the chunks normalised as they are met.
    #[test]
    fn input_has_no_shared_copy() {
        for fold in [Fold::Norm, Fold::NormSwiglu, Fold::Residual] {
            let s = gemv_source("__nv_bfloat16", fold, 2_560, 6_144, 8, 1e-6);
            assert_eq!(s.matches('{').count(), s.matches('}').count());
            assert!(!s.contains("{{"), "format braces left in the text");
            assert!(!s.contains("xs"), "a shared copy in the text");
            let first_wait = s.find("__syncthreads()").unwrap();
            assert!(
                first_wait > s.find("acc[d] +=").unwrap(),
                "a wait before the rows"
            );
            for want in [
                "ss += __shfl_xor_sync(0xffffffffu, ss, o);",
                "uint4 xv = reinterpret_cast<const uint4*>(x)[c];",
                "pn[e] = pg[e] * static_cast<T>(static_cast<float>(pn[e]) * inv);",
                "nw[j] * static_cast<T>(static_cast<float>(x[j]) * inv)",
            ] {
                assert!(s.contains(want), "{want} missing");
            }
        }
        // The quantised kernel keeps its shared copy, written before the rows.
        let q = qgemv_source("__half", Fold::Norm, 2_560, 6_144, 8, 1e-6, 8, 64);
        assert!(q.find("__syncthreads()").unwrap() < q.find("acc[d] +=").unwrap());
    }
}

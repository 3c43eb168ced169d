//! Attention of a decode step (one query per row) over a layer's KV cache
//! in two kernels, split over the cache's positions (`INFER_FUSE` names it
//! `attn`; made by [`QkRope`](crate::models::fused::QkRope) beside the
//! kernel that writes the cache).
//!
//! MLX's own kernel for one query (`sdpa_vector`) gives each query head one
//! block that walks every position in turn, a key and a value a warp at a
//! time, and reads a key/value head once for each query head that shares
//! it: its time grows with the context from a few hundred positions on
//! (about 9.5 µs a layer at 128–256 positions on an H100, more with every
//! position up to 1,024, where it splits the positions over 32 blocks).
//! Here:
//!
//! - [`DecodeAttention`]'s first kernel gives each block 64 positions of
//!   one key/value head and every query head that shares it: each of its
//!   eight warps loads eight keys and values at once (every load issued
//!   before the first is used), scores them against each query head, and
//!   keeps a running maximum, sum and weighted value per head (the
//!   online softmax); the block combines its warps and writes the
//!   unnormalised sums with their maximum and weight. Once a layer would
//!   have more blocks than about two an SM ([`DEFAULT_SPLITS`] over all
//!   heads and rows, `INFER_ATTN_SPLITS`), each block instead walks
//!   several chunks of 64 in turn with one running softmax, so that a long
//!   context gives fewer, longer blocks and fewer partial results;
//! - its second kernel combines each query head's blocks (in up to eight
//!   groups of threads at once, so that a long context's many blocks do
//!   not make one long chain) and divides.
//!
//! The sums are f32 and each result is rounded once to the activations'
//! dtype, as MLX's kernel does, but in another order, so a result can
//! differ in its last bit. [`check`](crate::models::fused::check) compares
//! it with MLX's `scaled_dot_product_attention`. bf16 and f16 only (f32
//! waits for its check on a GPU); heads of 64, 128 or 256 features.

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

use crate::ffi::CudaKernel;

type Result<T> = std::result::Result<T, Exception>;

/// Warps a block of the first kernel.
const WARPS: i32 = 8;

/// Positions a warp loads at once.
const PER_WARP: i32 = 8;

/// Positions a block of the first kernel: every warp's loads at once.
pub const CHUNK: i32 = WARPS * PER_WARP;

/// Blocks of the first kernel a layer by default, over all key/value
/// heads and rows, when the context is long enough to need more
/// (`INFER_ATTN_SPLITS` changes it; a head gets `⌊N / (heads · rows)⌋`,
/// at least one): two an SM of a 132-SM H100 or H200, for Qwen3's heads
/// two 256-thread blocks of the kernel an SM (NVRTC 13.5 for sm_90a, bf16,
/// 128 features, four query heads a key/value head: 119 registers a
/// thread for the one-chunk text, 128 for the looped one; Gemma's heads of
/// 256 features take 217 and 246, one block an SM).
const DEFAULT_SPLITS: i32 = 264;

/// `INFER_ATTN_SPLITS=N` (`setting`): the first kernel's blocks for a
/// layer kept to about `N` over all key/value heads and rows (at least one
/// a head) once the context has more chunks of [`CHUNK`] positions than
/// that, each block walking its share of them in turn ([`part_source`]'s
/// `looped` text); `0` gives every chunk its own block at any length (the
/// kernel before 2026-12-07 night). Unset: [`DEFAULT_SPLITS`]. `N` from 0
/// to 65,536; anything else is warned of and read as unset.
fn attn_splits_from(setting: Option<&str>) -> Option<i32> {
    let Some(s) = setting.map(str::trim) else {
        return Some(DEFAULT_SPLITS);
    };
    match s.parse::<i32>() {
        Ok(0) => None,
        Ok(n) if (1..=65_536).contains(&n) => Some(n),
        _ => {
            tracing::warn!(
                "INFER_ATTN_SPLITS={s:?} is not a whole number from 0 to 65536; read as unset"
            );
            Some(DEFAULT_SPLITS)
        }
    }
}

/// `INFER_ATTN_FOLD=1`: both first-kernel texts fold a warp's
/// [`PER_WARP`] positions into the running softmax at once
/// ([`FOLDED_SCORES`]) instead of one at a time; unset or `0`: one at a
/// time (the measured text). Read once.
fn attn_fold() -> bool {
    static FOLD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOLD.get_or_init(|| crate::env_switch("INFER_ATTN_FOLD").unwrap_or(false))
}

/// Whether the folded text serves heads of `head_dim` features with
/// `group` query heads a key/value head: its scores take `group ·`
/// [`PER_WARP`] registers beside the values, so at most 32 of them, and
/// heads of at most 128 features (256 already take 217 registers).
fn fold_fits(group: i32, head_dim: i32) -> bool {
    group * PER_WARP <= 32 && head_dim <= 128
}

/// [`attn_splits_from`] of the environment, read once.
fn attn_splits() -> Option<i32> {
    static SPLITS: std::sync::OnceLock<Option<i32>> = std::sync::OnceLock::new();
    *SPLITS.get_or_init(|| attn_splits_from(std::env::var("INFER_ATTN_SPLITS").ok().as_deref()))
}

/// Blocks of the first kernel a key/value head of a row for `len`
/// positions: one a [`CHUNK`], at most `cap` (a head's share of
/// [`attn_splits`]). The looped kernel gives block `s` of `splits` the
/// chunks `⌊s·chunks/splits⌋ .. ⌊(s+1)·chunks/splits⌋`: every chunk once,
/// one or two counts a block apart, none empty (`splits ≤ chunks`).
fn splits_for(len: i32, cap: Option<i32>) -> i32 {
    let chunks = (len + CHUNK - 1) / CHUNK;
    match cap {
        Some(cap) if cap > 0 => chunks.min(cap),
        _ => chunks,
    }
}

/// The sizes of the attention a [`DecodeAttention`] serves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    /// Query heads.
    pub heads: i32,
    /// Key and value heads.
    pub kv_heads: i32,
    /// Features per head.
    pub head_dim: i32,
    /// The scores' scale (`1/√head_dim` for most models).
    pub scale: f32,
}

/// A decode step's attention over a whole-sequence cache: see the module
/// documentation.
#[derive(Debug)]
pub struct DecodeAttention {
    /// The first kernel, one chunk a block.
    part: CudaKernel,
    /// The first kernel walking several chunks a block, where the cap
    /// leaves fewer blocks than chunks (MLX compiles it, as every kernel
    /// here, the first time a step uses it: the first time a context
    /// passes the cap).
    part_looped: CudaKernel,
    merge: CudaKernel,
    shape: AttnShape,
    dtype: Dtype,
    /// About how many blocks the first kernel may have over all heads and
    /// rows ([`attn_splits`]).
    split_cap: Option<i32>,
}

impl DecodeAttention {
    /// The kernels for `shape` in `dtype`; `None` where they do not apply
    /// (a dtype other than bf16 or f16, heads of other than 64, 128 or 256
    /// features, query heads not a multiple of the key/value heads, or
    /// more than 1,024 features of query heads a key/value head, which the
    /// block's shared memory holds).
    pub fn make(shape: AttnShape, dtype: Dtype) -> Result<Option<Self>> {
        let AttnShape {
            heads,
            kv_heads,
            head_dim,
            scale,
        } = shape;
        let ty = match dtype {
            Dtype::Bfloat16 => "__nv_bfloat16",
            Dtype::Float16 => "__half",
            _ => return Ok(None),
        };
        let fits = matches!(head_dim, 64 | 128 | 256)
            && kv_heads > 0
            && heads > 0
            && heads % kv_heads == 0
            && heads / kv_heads * head_dim <= 1_024
            && scale.is_finite()
            && scale > 0.0;
        if !fits {
            return Ok(None);
        }
        let fold = attn_fold() && fold_fits(heads / kv_heads, head_dim);
        let part_kernel = |looped| {
            CudaKernel::new(
                if looped {
                    "infer_attn_part_looped"
                } else {
                    "infer_attn_part"
                },
                &["q", "kc", "vc", "offsets"],
                &["op", "ml"],
                &part_source(ty, shape, looped, fold),
            )
        };
        let part = part_kernel(false)?;
        let part_looped = part_kernel(true)?;
        let merge = CudaKernel::new(
            "infer_attn_merge",
            &["op", "ml"],
            &["y"],
            &merge_source(ty, heads, head_dim),
        )?;
        Ok(Some(Self {
            part,
            part_looped,
            merge,
            shape,
            dtype,
            split_cap: attn_splits(),
        }))
    }

    /// Whether it serves attention of this shape.
    pub fn serves(&self, shape: &AttnShape) -> bool {
        self.shape == *shape
    }

    /// The attention of `q` `[B, H, 1, D]` over positions `0..len` of the
    /// caches `kc` and `vc` `[B, H_kv, capacity, D]` (row-major, one
    /// shape), where `offsets`' first element must be `len - 1` on the
    /// device (the position the step's key was written at; the grid is
    /// sized from `len`, the kernel reads the device's value): `[B, H, 1,
    /// D]`. Each array must start on its own buffer's alignment (fresh
    /// arrays do; the kernel loads a head's features `D/32` at a time).
    pub fn apply(
        &self,
        q: &Array,
        kc: &Array,
        vc: &Array,
        offsets: &Array,
        len: i32,
    ) -> Result<Array> {
        let AttnShape {
            heads,
            kv_heads,
            head_dim: d,
            ..
        } = self.shape;
        let b = q.dim(0);
        let cache_fits = |c: &Array| {
            let s = c.shape();
            s.len() == 4
                && s[0] == b
                && s[1] == kv_heads
                && s[3] == d
                && (1..=s[2]).contains(&len)
                && c.dtype() == self.dtype
        };
        if q.shape() != [b, heads, 1, d]
            || q.dtype() != self.dtype
            || !cache_fits(kc)
            || vc.shape() != kc.shape()
            || vc.dtype() != kc.dtype()
            || offsets.dtype() != Dtype::Int32
        {
            return Err(Exception::custom(format!(
                "decode attention ({heads} heads, {kv_heads} kv heads of {d}): query {:?} {:?}, \
                 caches {:?} {:?} and {:?} {:?}, {len} positions",
                q.shape(),
                q.dtype(),
                kc.shape(),
                kc.dtype(),
                vc.shape(),
                vc.dtype()
            )));
        }
        let head_cap = self.split_cap.map(|n| (n / (kv_heads * b).max(1)).max(1));
        let splits = splits_for(len, head_cap);
        let part_kernel = if splits < (len + CHUNK - 1) / CHUNK {
            &self.part_looped
        } else {
            &self.part
        };
        let threads = WARPS * 32;
        let groups = merge_groups(d);
        let f32 = Dtype::Float32;
        let mut part = part_kernel
            .apply(
                &[q, kc, vc, offsets],
                &[(&[b, heads, splits, d], f32), (&[b, heads, splits, 2], f32)],
                [splits * threads, kv_heads, b],
                [threads, 1, 1],
            )?
            .into_iter();
        let (Some(op), Some(ml)) = (part.next(), part.next()) else {
            return Err(Exception::custom("the attention kernel lost an output"));
        };
        self.merge
            .apply(
                &[&op, &ml],
                &[(&[b, heads, 1, d], self.dtype)],
                [heads * d * groups, b, 1],
                [d * groups, 1, 1],
            )?
            .into_iter()
            .next()
            .ok_or_else(|| Exception::custom("the attention merge lost its output"))
    }
}

/// Both first-kernel bodies' running softmax state, empty: each head's
/// maximum `m`, sum `l` and weighted values `o`.
const STATE_INIT: &str = r#"    float m[G];
    float l[G];
    float o[G][E];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        m[g] = LOWEST;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) o[g][e] = 0.0f;
    }
"#;

/// Both first-kernel bodies' online softmax: position `u`'s scores `sc`
/// (log2 units) folded into each head's running maximum `m`, sum `l` and
/// weighted values `o`.
const ONLINE_UPDATE: &str = r#"#pragma unroll
            for (int g = 0; g < G; ++g) {
                const float nm = fmaxf(m[g], sc[g]);
                const float f = exp2f(m[g] - nm);
                const float p = exp2f(sc[g] - nm);
                l[g] = l[g] * f + p;
#pragma unroll
                for (int e = 0; e < E; ++e) o[g][e] = o[g][e] * f + p * static_cast<float>(vr[u].v[e]);
                m[g] = nm;
            }
"#;

/// Both first-kernel bodies' scores with `INFER_ATTN_FOLD=1`: the warp's
/// [`PER_WARP`] positions scored (`sc[u][g]`, log2 units) and reduced
/// first; each head's running maximum `m`, sum `l` and weighted values
/// `o` then rescaled once to the largest of them, and each position's
/// weight added (its values converted once for all heads): one rescale
/// and `U + 1` `exp2f` a head instead of one rescale and two `exp2f` a
/// position. Whether a position is in the context depends on the warp
/// and `u` only, so a warp's lanes agree on it (the shuffles need every
/// lane); a position past `len` (its key and value never loaded) scores
/// 0 without reading them and is left out of the softmax.
const FOLDED_SCORES: &str = r#"    float sc[U][G];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float a = 0.0f;
            if (first + WARPS * u < len) {
#pragma unroll
                for (int e = 0; e < E; ++e) a += qv[g][e] * static_cast<float>(kr[u].v[e]);
            }
            sc[u][g] = a;
        }
    }
#pragma unroll
    for (int k = 16; k > 0; k >>= 1) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int g = 0; g < G; ++g) sc[u][g] += __shfl_xor_sync(0xffffffffu, sc[u][g], k);
        }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
        float cm = LOWEST;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (first + WARPS * u < len) cm = fmaxf(cm, sc[u][g]);
        }
        const float nm = fmaxf(m[g], cm);
        const float f = exp2f(m[g] - nm);
        l[g] *= f;
#pragma unroll
        for (int e = 0; e < E; ++e) o[g][e] *= f;
        m[g] = nm;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if (first + WARPS * u < len) {
            float v[E];
#pragma unroll
            for (int e = 0; e < E; ++e) v[e] = static_cast<float>(vr[u].v[e]);
#pragma unroll
            for (int g = 0; g < G; ++g) {
                const float p = exp2f(sc[u][g] - m[g]);
                l[g] += p;
#pragma unroll
                for (int e = 0; e < E; ++e) o[g][e] += p * v[e];
            }
        }
    }
"#;

/// The end of both first-kernel bodies: once every warp has written its
/// maximum, sum and weighted values (`sm_m`, `sm_l`, `sm_o`), the block's
/// threads combine the warps for each head and feature and write the
/// block's partial result (`op`) with its maximum and sum (`ml`).
const BLOCK_MERGE: &str = r#"    __syncthreads();
    for (int j = threadIdx.x; j < G * D; j += WARPS * 32) {
        const int g = j / D;
        const int d = j % D;
        float mx = LOWEST;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sm_m[w][g]);
        float lsum = 0.0f;
        float acc = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float f = exp2f(sm_m[w][g] - mx);
            lsum += sm_l[w][g] * f;
            acc += sm_o[w][g][d] * f;
        }
        const size_t row = (static_cast<size_t>(b) * HQ + kh * G + g) * splits + s;
        op[row * D + d] = acc;
        if (d == 0) {
            ml[row * 2] = mx;
            ml[row * 2 + 1] = lsum;
        }
    }
"#;

/// The first kernel's body: block `(s, kh, b)` takes positions
/// `s·CHUNK ..` of key/value head `kh` of row `b` for its `G` query
/// heads; a lane holds `E = D/32` features of each. With `looped`
/// (`INFER_ATTN_SPLITS`), block `s` of the grid's `splits` walks chunks
/// `⌊s·chunks/splits⌋ .. ⌊(s+1)·chunks/splits⌋` of [`CHUNK`] positions in
/// turn ([`splits_for`] sizes the grid: at most one block a chunk),
/// keeping its running softmax across them. With `fold`
/// (`INFER_ATTN_FOLD`), [`FOLDED_SCORES`] instead of one position at a
/// time.
fn part_source(ty: &str, shape: AttnShape, looped: bool, fold: bool) -> String {
    let AttnShape {
        heads,
        kv_heads,
        head_dim,
        scale,
    } = shape;
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let preamble = format!(
        r#"
    using T = {ty};
    constexpr int D = {head_dim};
    constexpr int HQ = {heads};
    constexpr int HK = {kv_heads};
    constexpr int G = HQ / HK;
    constexpr int E = D / 32;
    constexpr int WARPS = {WARPS};
    constexpr int U = {PER_WARP};
    constexpr int CHUNK = WARPS * U;
    constexpr float SCALE_LOG2 = {scale_log2:e}f;
    constexpr float LOWEST = -3.402823466e38f;
    struct alignas(E * sizeof(T)) Row {{ T v[E]; }};
    __shared__ float sm_m[WARPS][G];
    __shared__ float sm_l[WARPS][G];
    __shared__ float sm_o[WARPS][G][D];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int s = blockIdx.x;
    const int kh = blockIdx.y;
    const int b = blockIdx.z;
    const int splits = gridDim.x;
    const int len = offsets[0] + 1;
    const size_t base =
        (static_cast<size_t>(b) * HK + kh) * static_cast<size_t>(kc_shape[2]) * D + lane * E;
"#
    );
    let loads = r#"    Row kr[U];
    Row vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int i = first + WARPS * u;
        if (i < len) {
            kr[u] = *reinterpret_cast<const Row*>(kc + base + static_cast<size_t>(i) * D);
            vr[u] = *reinterpret_cast<const Row*>(vc + base + static_cast<size_t>(i) * D);
        }
    }
"#;
    let query = r#"    float qv[G][E];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const Row r = *reinterpret_cast<const Row*>(
            q + (static_cast<size_t>(b) * HQ + kh * G + g) * D + lane * E);
#pragma unroll
        for (int e = 0; e < E; ++e) qv[g][e] = SCALE_LOG2 * static_cast<float>(r.v[e]);
    }
"#;
    let scores = if fold {
        FOLDED_SCORES.to_string()
    } else {
        format!(
            r#"#pragma unroll
    for (int u = 0; u < U; ++u) {{
        if (first + WARPS * u < len) {{
            float sc[G];
#pragma unroll
            for (int g = 0; g < G; ++g) {{
                sc[g] = 0.0f;
#pragma unroll
                for (int e = 0; e < E; ++e) sc[g] += qv[g][e] * static_cast<float>(kr[u].v[e]);
            }}
#pragma unroll
            for (int k = 16; k > 0; k >>= 1) {{
#pragma unroll
                for (int g = 0; g < G; ++g) sc[g] += __shfl_xor_sync(0xffffffffu, sc[g], k);
            }}
{ONLINE_UPDATE}        }}
    }}
"#
        )
    };
    let body = if looped {
        format!(
            r#"{query}{STATE_INIT}    // This block's share of the chunks (the grid has at most one block a
    // chunk, so none is empty), each chunk loaded whole before it is used.
    const int chunks = (len + CHUNK - 1) / CHUNK;
    const int c_lo = static_cast<int>(static_cast<long long>(s) * chunks / splits);
    const int c_end = static_cast<int>(static_cast<long long>(s + 1) * chunks / splits);
    for (int c = c_lo; c < c_end; ++c) {{
    const int first = c * CHUNK + warp;
{loads}{scores}    }}
"#
        )
    } else {
        format!(
            r#"    // Every key and value of the warp asked for before any is used.
    const int first = s * CHUNK + warp;
{loads}{query}{STATE_INIT}{scores}"#
        )
    };
    format!(
        r#"{preamble}{body}    // The block's warps combined: each head's sums, weighted by its maxima.
#pragma unroll
    for (int g = 0; g < G; ++g) {{
        if (lane == 0) {{
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }}
#pragma unroll
        for (int e = 0; e < E; ++e) sm_o[warp][g][lane * E + e] = o[g][e];
    }}
{BLOCK_MERGE}"#
    )
}

/// Groups of `D` threads a block of the second kernel: each takes every
/// `merge_groups`-th block of the first kernel's (so that a long context's
/// many blocks are added in parallel), at most 1,024 threads a block.
fn merge_groups(head_dim: i32) -> i32 {
    (1_024 / head_dim).clamp(1, 8)
}

/// The second kernel's body: block `(h, b)` adds query head `h`'s blocks
/// of the first kernel, each weighted by its maximum, and divides; a
/// thread a feature in each of `SW` groups, each group taking every
/// `SW`-th block (with a running maximum, as the first kernel's warps do),
/// and the first group combining the groups.
fn merge_source(ty: &str, heads: i32, head_dim: i32) -> String {
    let groups = merge_groups(head_dim);
    format!(
        r#"
    using T = {ty};
    constexpr int D = {head_dim};
    constexpr int HQ = {heads};
    constexpr int SW = {groups};
    constexpr float LOWEST = -3.402823466e38f;
    __shared__ float sm_m[SW];
    __shared__ float sm_l[SW];
    __shared__ float sm_o[SW][D];
    const int h = blockIdx.x;
    const int b = blockIdx.y;
    const int d = threadIdx.x % D;
    const int w = threadIdx.x / D;
    const int splits = ml_shape[2];
    const size_t row = (static_cast<size_t>(b) * HQ + h) * splits;
    float mx = LOWEST;
    float lsum = 0.0f;
    float acc = 0.0f;
    for (int s = w; s < splits; s += SW) {{
        const float ms = ml[(row + s) * 2];
        const float nm = fmaxf(mx, ms);
        const float f = exp2f(mx - nm);
        const float g = exp2f(ms - nm);
        lsum = lsum * f + ml[(row + s) * 2 + 1] * g;
        acc = acc * f + op[(row + s) * D + d] * g;
        mx = nm;
    }}
    if (d == 0) {{
        sm_m[w] = mx;
        sm_l[w] = lsum;
    }}
    sm_o[w][d] = acc;
    __syncthreads();
    if (w == 0) {{
        float m = LOWEST;
#pragma unroll
        for (int j = 0; j < SW; ++j) m = fmaxf(m, sm_m[j]);
        float l = 0.0f;
        float a = 0.0f;
#pragma unroll
        for (int j = 0; j < SW; ++j) {{
            const float f = exp2f(sm_m[j] - m);
            l += sm_l[j] * f;
            a += sm_o[j][d] * f;
        }}
        y[(static_cast<size_t>(b) * HQ + h) * D + d] = static_cast<T>(a / l);
    }}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(heads: i32, kv_heads: i32, head_dim: i32) -> AttnShape {
        AttnShape {
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    #[test]
    fn kernels_only_for_shapes_they_serve() {
        let make = |s, dtype| DecodeAttention::make(s, dtype).unwrap().is_some();
        // Heads of 96 features, f32, and groups over 1,024 features: none.
        assert!(!make(shape(32, 8, 96), Dtype::Bfloat16));
        assert!(!make(shape(32, 8, 128), Dtype::Float32));
        assert!(!make(shape(16, 2, 256), Dtype::Float16));
        assert!(!make(shape(30, 8, 128), Dtype::Bfloat16));
        let bad_scale = AttnShape {
            scale: f32::NAN,
            ..shape(32, 8, 128)
        };
        assert!(!make(bad_scale, Dtype::Bfloat16));
    }

    #[test]
    fn sources_bake_in_the_shape() {
        let s = part_source("__nv_bfloat16", shape(32, 8, 128), false, false);
        for want in [
            "using T = __nv_bfloat16;",
            "constexpr int D = 128;",
            "constexpr int HQ = 32;",
            "constexpr int HK = 8;",
            "constexpr int WARPS = 8;",
            "constexpr int U = 8;",
            "kc_shape[2]",
        ] {
            assert!(s.contains(want), "{want} missing");
        }
        assert!(!s.contains("{{"), "format braces left in the text");
        let m = merge_source("__half", 16, 64);
        for want in [
            "using T = __half;",
            "constexpr int D = 64;",
            "constexpr int SW = 8;",
            "ml_shape[2]",
        ] {
            assert!(m.contains(want), "{want} missing");
        }
        assert!(!m.contains("{{"), "format braces left in the text");
        for text in [&s, &m] {
            assert_eq!(text.matches('{').count(), text.matches('}').count());
        }
    }

    /// The looped text (`INFER_ATTN_SPLITS`) walks its block's share of
    /// the chunks with the running softmax set up once before them.
    #[test]
    fn looped_source_walks_its_chunks() {
        let s = part_source("__nv_bfloat16", shape(32, 8, 128), true, false);
        let init = s.find("float m[G];").unwrap();
        let walk = s.find("for (int c = c_lo; c < c_end; ++c) {").unwrap();
        let first = s.find("const int first = c * CHUNK + warp;").unwrap();
        assert!(init < walk && walk < first);
        assert!(s.contains("static_cast<long long>(s + 1) * chunks / splits"));
        assert!(!s.contains("{{"), "format braces left in the text");
        assert_eq!(s.matches('{').count(), s.matches('}').count());
        assert_ne!(
            s,
            part_source("__nv_bfloat16", shape(32, 8, 128), false, false)
        );
    }

    /// The host's grid and the looped kernel's share of each block cover
    /// every chunk exactly once, the blocks' shares differ by at most one
    /// chunk, and no block is left without a chunk.
    #[test]
    fn split_cap_covers_every_chunk() {
        assert_eq!(splits_for(1, None), 1);
        assert_eq!(splits_for(64, None), 1);
        assert_eq!(splits_for(65, None), 2);
        assert_eq!(splits_for(8_192, Some(32)), 32);
        assert_eq!(splits_for(128, Some(32)), 2);
        for cap in [1, 2, 3, 7, 16, 32, 100, 4_096] {
            for len in (1..3_000).chain([8_192, 8_193, 40_000, 131_072, 1 << 24]) {
                let chunks = (len + CHUNK - 1) / CHUNK;
                let splits = splits_for(len, Some(cap));
                assert_eq!(splits, cap.min(chunks), "{len} {cap}");
                // The kernel's arithmetic (64-bit products, as there).
                let share = |s: i32| (i64::from(s) * i64::from(chunks) / i64::from(splits)) as i32;
                let mut seen = 0;
                let (mut least, mut most) = (i32::MAX, 0);
                for s in 0..splits {
                    let (lo, hi) = (share(s), share(s + 1));
                    assert!(lo < hi, "empty block {s} at {len} {cap}");
                    assert_eq!(lo, seen);
                    (least, most) = (least.min(hi - lo), most.max(hi - lo));
                    seen = hi;
                }
                assert_eq!(seen, chunks);
                assert!(most - least <= 1, "{len} {cap}");
            }
        }
        assert_eq!(attn_splits_from(None), Some(DEFAULT_SPLITS));
        assert_eq!(attn_splits_from(Some("0")), None);
        assert_eq!(attn_splits_from(Some(" 32")), Some(32));
        assert_eq!(attn_splits_from(Some("65536")), Some(65_536));
        for bad in ["-1", "65537", "x", ""] {
            assert_eq!(attn_splits_from(Some(bad)), Some(DEFAULT_SPLITS), "{bad}");
        }
        // The default for Qwen3-4B's eight key/value heads, one row: the
        // one-chunk kernel up to 33 chunks (2,112 positions), then 33
        // blocks a head (264 a layer) at any length; 8,192 positions in
        // blocks of three or four chunks.
        let head_cap = DEFAULT_SPLITS / 8;
        assert_eq!(splits_for(2_112, Some(head_cap)), 33);
        assert_eq!(splits_for(2_113, Some(head_cap)), 33);
        assert_eq!(splits_for(8_192, Some(head_cap)), 33);
    }

    /// `INFER_ATTN_FOLD` reads 0 and 1 only, the folded text serves only
    /// the shapes its registers allow, and it leaves the measured texts
    /// alone (it replaces their scores and softmax updates, nothing else).
    #[test]
    fn folded_text_is_opt_in() {
        let fold_from = |v| crate::switch_from("INFER_ATTN_FOLD", v).unwrap_or(false);
        assert!(!fold_from(None));
        assert!(!fold_from(Some("0")));
        assert!(fold_from(Some(" 1")));
        for bad in ["2", "yes", ""] {
            assert!(!fold_from(Some(bad)), "{bad}");
        }
        assert!(fold_fits(4, 128) && fold_fits(2, 64) && fold_fits(1, 128));
        assert!(!fold_fits(8, 128) && !fold_fits(4, 256));
        for looped in [false, true] {
            let plain = part_source("__nv_bfloat16", shape(32, 8, 128), looped, false);
            let folded = part_source("__nv_bfloat16", shape(32, 8, 128), looped, true);
            assert!(folded.contains("float sc[U][G];") && !plain.contains("float sc[U][G];"));
            assert!(!folded.contains("{{"), "format braces left in the text");
            assert_eq!(folded.matches('{').count(), folded.matches('}').count());
        }
    }

    /// Both first-kernel texts and the merge, run on the CPU by
    /// `tests/support/cuda_emu.cpp` (one thread a CUDA thread, `T =
    /// float`) against float64 softmax attention: one chunk a block, and
    /// looped blocks walking one to eleven chunks (grids of uneven shares
    /// among them), over one and two rows,
    /// heads of 256 and 128 features, lengths that end mid-chunk. The
    /// one-chunk text given fewer blocks than chunks must fail (it skips
    /// positions), so the harness can tell.
    #[test]
    fn kernel_texts_run_on_the_cpu() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let harness = dir.join("cuda_emu.cpp");
        std::fs::write(&harness, include_str!("../../tests/support/cuda_emu.cpp")).unwrap();
        // `CXX` may carry a launcher (`ccache c++`).
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
        let mut cxx_words = cxx.split_whitespace();
        let cxx_program = cxx_words.next().unwrap_or("c++").to_string();
        let cxx_args: Vec<String> = cxx_words.map(str::to_string).collect();
        let build = |name: &str, sh: AttnShape, looped: bool, fold: bool| {
            let part = dir.join(format!("{name}-{looped}-{fold}-part.inc"));
            let merge = dir.join(format!("{name}-merge.inc"));
            std::fs::write(&part, part_source("float", sh, looped, fold)).unwrap();
            std::fs::write(&merge, merge_source("float", sh.heads, sh.head_dim)).unwrap();
            let exe = dir.join(format!("emu-{name}-{looped}-{fold}"));
            let status = std::process::Command::new(&cxx_program)
                .args(&cxx_args)
                .args(["-std=c++20", "-O1", "-pthread"])
                .arg(format!("-DPART_INC=\"{}\"", part.display()))
                .arg(format!("-DMERGE_INC=\"{}\"", merge.display()))
                .arg(&harness)
                .arg("-o")
                .arg(&exe)
                .status()
                .expect("a C++ compiler (CXX or c++)");
            assert!(
                status.success(),
                "{cxx} could not build the emulator for {name}"
            );
            exe
        };
        let run = |exe: &std::path::Path, sh: AttnShape, rows: i32, len: i32, splits: i32| {
            let out = std::process::Command::new(exe)
                .args(
                    [
                        sh.heads,
                        sh.kv_heads,
                        sh.head_dim,
                        merge_groups(sh.head_dim),
                        rows,
                        len,
                        splits,
                        WARPS * 32,
                    ]
                    .map(|v| v.to_string()),
                )
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            // 0: within 1e-4 of the reference; 1: compared and off.
            assert!(
                matches!(out.status.code(), Some(0 | 1)) && text.contains("max |diff|"),
                "the emulator did not run to its comparison: {:?} {text}",
                out.status
            );
            (out.status.success(), text)
        };
        // Both texts of a shape (`fold`: `INFER_ATTN_FOLD=1`'s), one chunk a
        // block over `(rows, len)` and looped over `(rows, len, cap)` with
        // fewer blocks than chunks; the one-chunk text's binary back.
        let texts_pass = |name: &str,
                          sh: AttnShape,
                          fold: bool,
                          plain_cases: &[(i32, i32)],
                          looped_cases: &[(i32, i32, i32)]| {
            let (plain, looped) = (build(name, sh, false, fold), build(name, sh, true, fold));
            for &(rows, len) in plain_cases {
                let (ok, text) = run(&plain, sh, rows, len, splits_for(len, None));
                assert!(ok, "one chunk a block, fold {fold}, {len}: {text}");
            }
            for &(rows, len, cap) in looped_cases {
                let splits = splits_for(len, Some(cap));
                assert!(splits < (len + CHUNK - 1) / CHUNK || len <= CHUNK);
                let (ok, text) = run(&looped, sh, rows, len, splits);
                assert!(ok, "looped, fold {fold}, cap {cap}: {text}");
            }
            plain
        };
        // Gemma's one key/value head of 256 features, four query heads.
        let gemma = shape(4, 1, 256);
        let plain = texts_pass(
            "g",
            gemma,
            false,
            &[(1, 1), (1, 65), (2, 300)],
            &[
                (1, 65, 1),
                (1, 300, 3),
                (2, 300, 2),
                (1, 700, 1),
                (1, 130, 2),
            ],
        );
        // The one-chunk text over too few blocks leaves positions out: the
        // comparison must see it (exit status 1, not a crash).
        let (ok, text) = run(&plain, gemma, 1, 300, 2);
        assert!(!ok, "the one-chunk text over too few blocks passed: {text}");
        // Qwen3's grouped heads: eight key/value heads of 128 features.
        let qwen = shape(16, 8, 128);
        let looped = build("q", qwen, true, false);
        let (ok, text) = run(&looped, qwen, 1, 200, splits_for(200, Some(2)));
        assert!(ok, "looped, grouped heads: {text}");
        // `INFER_ATTN_FOLD=1`'s texts: Qwen3-4B's four query heads a
        // key/value head, and heads of 64 features two a key/value head;
        // lengths that leave a warp's last positions, or all of them,
        // outside the context.
        texts_pass(
            "f",
            shape(8, 2, 128),
            true,
            &[(1, 1), (1, 5), (2, 130)],
            &[(1, 300, 2), (2, 197, 1)],
        );
        let small = shape(4, 2, 64);
        let looped = build("s", small, true, true);
        let (ok, text) = run(&looped, small, 1, 141, splits_for(141, Some(2)));
        assert!(ok, "folded, looped, 64 features: {text}");
    }

    /// The one-chunk text is the one measured on an H100 on 2026-12-07
    /// (docs/benchmarks.md, item 15). The looped text is the one timed
    /// there that night (item 19, hash 948_220_996_937_756_850) but for
    /// its chunk ranges (even shares instead of equal ones and a remainder,
    /// so that the grid keeps every block the cap allows): its GPU check
    /// and timing are owed. A change to either must be checked and timed
    /// on a GPU again, and then its hash (FNV-1a of the bf16 text for
    /// Qwen3-4B's heads) updated.
    #[test]
    fn measured_text_unchanged() {
        for (looped, want) in [
            (false, 12_536_950_139_908_923_137_u64),
            (true, 10_884_105_396_823_020_666),
        ] {
            let text = part_source("__nv_bfloat16", shape(32, 8, 128), looped, false);
            let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            assert_eq!(hash, want, "{looped} {hash}");
        }
    }
}

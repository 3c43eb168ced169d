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
//!   unnormalised sums with their maximum and weight;
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

/// Warps a block of [`part_source_vec`]'s kernel (also [`CHUNK`] positions).
const VEC_WARPS: i32 = 16;

/// Most query heads a key/value head [`part_source_vec`] takes: its
/// registers grow with them, and a 512-thread block may use 128 a thread
/// (NVRTC 13.5 for sm_90a, bf16, 128 features: 121 at 4, 141 at 5, 190 at
/// 8; its shared memory passes 48 KiB from 6).
const MAX_VEC_GROUP: i32 = 4;

/// `INFER_ATTN_VEC=1` (`setting`): the first kernel loads 16 bytes a lane
/// (for heads of 64 or 128 features), several positions a warp at once
/// ([`part_source_vec`]). Opt-in until measured on a GPU; anything but `0`
/// or `1` is warned of and read as unset.
fn attn_vec_from(setting: Option<&str>) -> bool {
    match setting.map(str::trim) {
        None | Some("0") => false,
        Some("1") => true,
        Some(s) => {
            tracing::warn!("INFER_ATTN_VEC={s:?} is not 0 or 1; read as unset");
            false
        }
    }
}

/// [`attn_vec_from`] of the environment, read once.
fn attn_vec() -> bool {
    static VEC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VEC.get_or_init(|| attn_vec_from(std::env::var("INFER_ATTN_VEC").ok().as_deref()))
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
    part: CudaKernel,
    merge: CudaKernel,
    shape: AttnShape,
    dtype: Dtype,
    /// Threads a block of the first kernel (512 for [`part_source_vec`]).
    threads: i32,
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
        let (source, threads) = match attn_vec().then(|| part_source_vec(ty, shape)).flatten() {
            Some(vec) => (vec, VEC_WARPS * 32),
            None => (part_source(ty, shape), WARPS * 32),
        };
        let part = CudaKernel::new(
            "infer_attn_part",
            &["q", "kc", "vc", "offsets"],
            &["op", "ml"],
            &source,
        )?;
        let merge = CudaKernel::new(
            "infer_attn_merge",
            &["op", "ml"],
            &["y"],
            &merge_source(ty, heads, head_dim),
        )?;
        Ok(Some(Self {
            part,
            merge,
            shape,
            dtype,
            threads,
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
    /// arrays do; the kernel loads a head's features `D/32` at a time, or
    /// `D/8` with `INFER_ATTN_VEC`).
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
        let splits = (len + CHUNK - 1) / CHUNK;
        let threads = self.threads;
        let groups = merge_groups(d);
        let f32 = Dtype::Float32;
        let mut part = self
            .part
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
/// heads; a lane holds `E = D/32` features of each.
fn part_source(ty: &str, shape: AttnShape) -> String {
    let AttnShape {
        heads,
        kv_heads,
        head_dim,
        scale,
    } = shape;
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    format!(
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
    // Every key and value of the warp asked for before any is used.
    const int first = s * CHUNK + warp;
    Row kr[U];
    Row vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {{
        const int i = first + WARPS * u;
        if (i < len) {{
            kr[u] = *reinterpret_cast<const Row*>(kc + base + static_cast<size_t>(i) * D);
            vr[u] = *reinterpret_cast<const Row*>(vc + base + static_cast<size_t>(i) * D);
        }}
    }}
    float qv[G][E];
#pragma unroll
    for (int g = 0; g < G; ++g) {{
        const Row r = *reinterpret_cast<const Row*>(
            q + (static_cast<size_t>(b) * HQ + kh * G + g) * D + lane * E);
#pragma unroll
        for (int e = 0; e < E; ++e) qv[g][e] = SCALE_LOG2 * static_cast<float>(r.v[e]);
    }}
{STATE_INIT}#pragma unroll
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
    // The block's warps combined: each head's sums, weighted by its maxima.
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

/// The first kernel's body with 16-byte loads (`INFER_ATTN_VEC=1`):
/// `L = D/8` lanes share a position, so a warp takes `P = 32/L` positions
/// at each load; sixteen warps a block (512 threads) of `64/(16·P)` loads
/// each, still 64 positions a block. Each group of `L` lanes keeps its own
/// running softmax, and the warp's groups are combined before the block's
/// warps are. Fewer shuffles a position (`log2 L` steps instead of five,
/// each serving `P` positions) and half the load instructions; the query
/// heads stay in their dtype and the scale multiplies each score, so that
/// the block fits an SM's registers (121 a thread for Qwen3-4B's heads in
/// bf16 under NVRTC 13.5 for sm_90a: one block, sixteen warps, an SM, as
/// [`part_source`]'s two blocks of eight). `None` for heads of 256
/// features, which [`part_source`] already loads 16 bytes a lane, and for
/// more than [`MAX_VEC_GROUP`] query heads a key/value head.
fn part_source_vec(ty: &str, shape: AttnShape) -> Option<String> {
    let AttnShape {
        heads,
        kv_heads,
        head_dim,
        scale,
    } = shape;
    let lanes = head_dim / 8;
    if !matches!(lanes, 8 | 16) || heads / kv_heads > MAX_VEC_GROUP {
        return None;
    }
    let warps = VEC_WARPS;
    let loads = CHUNK * lanes / 32 / warps;
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    Some(format!(
        r#"
    using T = {ty};
    constexpr int D = {head_dim};
    constexpr int HQ = {heads};
    constexpr int HK = {kv_heads};
    constexpr int G = HQ / HK;
    constexpr int L = {lanes};
    constexpr int P = 32 / L;
    constexpr int E = D / L;
    constexpr int WARPS = {warps};
    constexpr int U = {loads};
    constexpr int CHUNK = WARPS * U * P;
    constexpr float SCALE_LOG2 = {scale_log2:e}f;
    constexpr float LOWEST = -3.402823466e38f;
    struct alignas(E * sizeof(T)) Row {{ T v[E]; }};
    __shared__ float sm_m[WARPS][G];
    __shared__ float sm_l[WARPS][G];
    __shared__ float sm_o[WARPS][G][D];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int sub = lane / L;
    const int sl = lane % L;
    const int s = blockIdx.x;
    const int kh = blockIdx.y;
    const int b = blockIdx.z;
    const int splits = gridDim.x;
    const int len = offsets[0] + 1;
    const size_t base =
        (static_cast<size_t>(b) * HK + kh) * static_cast<size_t>(kc_shape[2]) * D + sl * E;
    // Every key and value of the warp asked for before any is used; a
    // position past the end reads as zeros (its lanes still shuffle).
    const int first = s * CHUNK + warp * P;
    Row kr[U];
    Row vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {{
        const int i = first + WARPS * P * u + sub;
        if (i < len) {{
            kr[u] = *reinterpret_cast<const Row*>(kc + base + static_cast<size_t>(i) * D);
            vr[u] = *reinterpret_cast<const Row*>(vc + base + static_cast<size_t>(i) * D);
        }} else {{
#pragma unroll
            for (int e = 0; e < E; ++e) {{
                kr[u].v[e] = static_cast<T>(0.0f);
                vr[u].v[e] = static_cast<T>(0.0f);
            }}
        }}
    }}
    // The query heads kept in their dtype (half the registers of f32),
    // the scale applied to each score.
    Row qr[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {{
        qr[g] = *reinterpret_cast<const Row*>(
            q + (static_cast<size_t>(b) * HQ + kh * G + g) * D + sl * E);
    }}
{STATE_INIT}#pragma unroll
    for (int u = 0; u < U; ++u) {{
        if (first + WARPS * P * u < len) {{
            float sc[G];
#pragma unroll
            for (int g = 0; g < G; ++g) {{
                sc[g] = 0.0f;
#pragma unroll
                for (int e = 0; e < E; ++e) {{
                    sc[g] += static_cast<float>(qr[g].v[e]) * static_cast<float>(kr[u].v[e]);
                }}
            }}
#pragma unroll
            for (int k = L / 2; k > 0; k >>= 1) {{
#pragma unroll
                for (int g = 0; g < G; ++g) sc[g] += __shfl_xor_sync(0xffffffffu, sc[g], k);
            }}
#pragma unroll
            for (int g = 0; g < G; ++g) sc[g] *= SCALE_LOG2;
            // A lane past the end has shuffled its zeros; it takes no part.
            if (first + WARPS * P * u + sub >= len) continue;
{ONLINE_UPDATE}        }}
    }}
    // The warp's groups of lanes combined, each weighted by its maximum.
#pragma unroll
    for (int k = L; k < 32; k <<= 1) {{
#pragma unroll
        for (int g = 0; g < G; ++g) {{
            const float om = __shfl_xor_sync(0xffffffffu, m[g], k);
            const float ol = __shfl_xor_sync(0xffffffffu, l[g], k);
            const float nm = fmaxf(m[g], om);
            const float f = exp2f(m[g] - nm);
            const float fo = exp2f(om - nm);
            l[g] = l[g] * f + ol * fo;
#pragma unroll
            for (int e = 0; e < E; ++e) {{
                o[g][e] = o[g][e] * f + __shfl_xor_sync(0xffffffffu, o[g][e], k) * fo;
            }}
            m[g] = nm;
        }}
    }}
    // The block's warps combined: each head's sums, weighted by its maxima.
#pragma unroll
    for (int g = 0; g < G; ++g) {{
        if (lane == 0) {{
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }}
        if (sub == 0) {{
#pragma unroll
            for (int e = 0; e < E; ++e) sm_o[warp][g][sl * E + e] = o[g][e];
        }}
    }}
{BLOCK_MERGE}"#
    ))
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
        let s = part_source("__nv_bfloat16", shape(32, 8, 128));
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

    /// The 16-byte variant: `L = D/8` lanes a position, sixteen warps,
    /// still [`CHUNK`] positions a block (the host sizes the grid by it);
    /// none for heads of 256 features or over four query heads a key/value
    /// head.
    #[test]
    fn vec_source_keeps_the_chunk() {
        for (d, lanes, loads) in [(128, 16, 2), (64, 8, 1)] {
            let s = part_source_vec("__nv_bfloat16", shape(32, 8, d)).unwrap();
            let p = 32 / lanes;
            assert_eq!(VEC_WARPS * loads * p, CHUNK);
            for want in [
                format!("constexpr int D = {d};"),
                format!("constexpr int L = {lanes};"),
                format!("constexpr int U = {loads};"),
                format!("constexpr int WARPS = {VEC_WARPS};"),
                "constexpr int CHUNK = WARPS * U * P;".to_string(),
                "for (int k = L / 2; k > 0; k >>= 1)".to_string(),
                "for (int k = L; k < 32; k <<= 1)".to_string(),
            ] {
                assert!(s.contains(&want), "{want} missing");
            }
            assert!(!s.contains("{{"), "format braces left in the text");
            assert_eq!(s.matches('{').count(), s.matches('}').count());
        }
        assert!(part_source_vec("__half", shape(8, 4, 256)).is_none());
        // Five query heads a key/value head would not fit the registers.
        assert!(part_source_vec("__nv_bfloat16", shape(40, 8, 128)).is_none());
        assert!(part_source_vec("__half", shape(64, 8, 64)).is_none());
        assert!(!attn_vec_from(None));
        assert!(!attn_vec_from(Some("0")));
        assert!(attn_vec_from(Some(" 1")));
        assert!(!attn_vec_from(Some("yes")));
    }

    /// The text is the one measured on an H100 on 2026-12-07
    /// (docs/benchmarks.md, item 15): a change to it must be checked and
    /// timed on a GPU again, and then this hash (FNV-1a of the bf16 text
    /// for Qwen3-4B's heads) updated.
    #[test]
    fn measured_text_unchanged() {
        let text = part_source("__nv_bfloat16", shape(32, 8, 128));
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        assert_eq!(hash, 12_536_950_139_908_923_137, "{text}");
    }
}

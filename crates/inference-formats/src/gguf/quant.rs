//! Dequantisation of GGML tensor data, and lossless conversion of GGML's
//! 4- and 8-bit block quants to MLX's affine quantisation.
//!
//! [`dequantize`] follows GGML's reference dequantisation operation for
//! operation in `f32` (the products and sums are rounded in the same order),
//! so its results are bit-identical to gguf-py's (the tests check this) and to
//! GGML's scalar code; that holds whether or not a compiler fuses GGML's
//! multiply-adds, since every product that precedes an addition is exact in
//! `f32` (an f16 scale times a small integer). Large tensors are split over
//! the available cores.
//!
//! [`to_mlx_affine`] repacks `Q4_0`, `Q4_1` and `Q8_0` into MLX's affine
//! layout (`w = scale * q + bias` per group of 32, `q` unsigned), without
//! going through floats: every weight GGML's dequantisation gives is
//! reproduced exactly by MLX's formula (see [`to_mlx_affine`] for why).

use std::ops::Range;

use half::f16;

use super::reader::{GgmlType, GgufError, QK_K};

/// Elements per block of the 32-element quants (`QK4_0`, `QK8_0`, ...).
pub const QK: usize = 32;

/// Tensors with fewer elements than this are dequantised on the caller's
/// thread; larger ones are split over the available cores.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 20;

/// Dequantises `n_elements` elements of type `ty` stored in `data` to `f32`.
///
/// Implemented for `F32`, `F16`, `BF16`, `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`,
/// `Q8_0`, `Q2_K`, `Q3_K`, `Q4_K`, `Q5_K`, `Q6_K` and `Q8_K`; other types give
/// [`GgufError::Unsupported`]. `n_elements` must be a whole number of blocks
/// and `data` exactly their size, or [`GgufError::WrongLength`].
pub fn dequantize(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<Vec<f32>, GgufError> {
    check_length(ty, data, n_elements)?;
    kernel(ty)?;
    let mut out = vec![0f32; n_elements];
    dequantize_into(ty, data, &mut out)?;
    Ok(out)
}

/// Dequantises `data` of type `ty` into `out`, whose length is the element
/// count (see [`dequantize`]).
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    check_length(ty, data, out.len())?;
    let kernel = kernel(ty)?;
    kernel(data, out);
    Ok(())
}

/// Checks that `data` holds exactly `n_elements` elements of `ty`.
fn check_length(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<(), GgufError> {
    let wrong = |reason: String| GgufError::WrongLength { ty, reason };
    let block = ty.block_size();
    if n_elements % block != 0 {
        return Err(wrong(format!(
            "{n_elements} elements are not a whole number of blocks of {block}"
        )));
    }
    let expected = (n_elements / block).checked_mul(ty.block_bytes());
    if expected != Some(data.len()) {
        return Err(wrong(format!(
            "{} bytes for {n_elements} elements ({} expected)",
            data.len(),
            expected.map_or_else(|| "an overflowing size".to_owned(), |n| n.to_string())
        )));
    }
    Ok(())
}

/// A whole-tensor dequantiser: `data` and `out` are checked to match.
type Kernel = fn(&[u8], &mut [f32]);

/// The dequantiser of `ty`.
fn kernel(ty: GgmlType) -> Result<Kernel, GgufError> {
    let kernel: Kernel = match ty {
        GgmlType::F32 => |d, o| blocks::<4, 1>(d, o, |b, y| y[0] = f32::from_le_bytes(*b)),
        GgmlType::F16 => |d, o| blocks::<2, 1>(d, o, |b, y| y[0] = f16_le(b[0], b[1])),
        GgmlType::BF16 => |d, o| {
            blocks::<2, 1>(d, o, |b, y| {
                y[0] = f32::from_bits(u32::from(u16::from_le_bytes(*b)) << 16);
            })
        },
        GgmlType::Q4_0 => |d, o| blocks::<18, QK>(d, o, q4_0),
        GgmlType::Q4_1 => |d, o| blocks::<20, QK>(d, o, q4_1),
        GgmlType::Q5_0 => |d, o| blocks::<22, QK>(d, o, q5_0),
        GgmlType::Q5_1 => |d, o| blocks::<24, QK>(d, o, q5_1),
        GgmlType::Q8_0 => |d, o| blocks::<34, QK>(d, o, q8_0),
        GgmlType::Q2_K => |d, o| blocks::<84, QK_K>(d, o, q2_k),
        GgmlType::Q3_K => |d, o| blocks::<110, QK_K>(d, o, q3_k),
        GgmlType::Q4_K => |d, o| blocks::<144, QK_K>(d, o, q4_k),
        GgmlType::Q5_K => |d, o| blocks::<176, QK_K>(d, o, q5_k),
        GgmlType::Q6_K => |d, o| blocks::<210, QK_K>(d, o, q6_k),
        GgmlType::Q8_K => |d, o| blocks::<292, QK_K>(d, o, q8_k),
        ty => {
            return Err(GgufError::Unsupported {
                op: "dequantisation",
                ty,
            })
        }
    };
    Ok(kernel)
}

/// Splits `n_blocks` blocks into contiguous ranges, one per worker: a single
/// range when the work is small.
fn split(n_blocks: usize, block_elements: usize) -> Vec<Range<usize>> {
    let workers = if n_blocks.saturating_mul(block_elements) < PARALLEL_MIN_ELEMENTS {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(16))
    };
    let per = n_blocks.div_ceil(workers).max(1);
    (0..n_blocks)
        .step_by(per)
        .map(|start| start..(start + per).min(n_blocks))
        .collect()
}

/// Runs `f` on every block of `BB` bytes in `data` and its `BS` elements in
/// `out`, over several threads for large tensors. The caller has checked that
/// `data` and `out` hold the same number of blocks.
fn blocks<const BB: usize, const BS: usize>(
    data: &[u8],
    out: &mut [f32],
    f: impl Fn(&[u8; BB], &mut [f32; BS]) + Sync,
) {
    let run = |data: &[u8], out: &mut [f32]| {
        for (b, y) in data.chunks_exact(BB).zip(out.chunks_exact_mut(BS)) {
            // Always `Ok`: the chunks have exactly these lengths.
            if let (Ok(b), Ok(y)) = (<&[u8; BB]>::try_from(b), <&mut [f32; BS]>::try_from(y)) {
                f(b, y);
            }
        }
    };
    let ranges = split(data.len() / BB, BS);
    if ranges.len() <= 1 {
        run(data, out);
        return;
    }
    let per = ranges[0].len();
    std::thread::scope(|s| {
        for (d, o) in data.chunks(per * BB).zip(out.chunks_mut(per * BS)) {
            let run = &run;
            s.spawn(move || run(d, o));
        }
    });
}

/// The f16 with little-endian bytes `lo`, `hi`, widened (exactly) to f32.
#[inline(always)]
fn f16_le(lo: u8, hi: u8) -> f32 {
    f16::from_bits(u16::from_le_bytes([lo, hi])).to_f32()
}

/// `Q4_0`: `d: f16`, `qs: [u8; 16]`; element `j` is the low nibble of
/// `qs[j]`, element `j + 16` the high nibble; `w = d * (q - 8)`.
fn q4_0(b: &[u8; 18], y: &mut [f32; QK]) {
    let d = f16_le(b[0], b[1]);
    for j in 0..QK / 2 {
        let x = b[2 + j];
        y[j] = d * ((x & 0x0F) as i32 - 8) as f32;
        y[j + QK / 2] = d * ((x >> 4) as i32 - 8) as f32;
    }
}

/// `Q4_1`: `d: f16`, `m: f16`, `qs: [u8; 16]` (nibbles as in `Q4_0`);
/// `w = d * q + m`.
fn q4_1(b: &[u8; 20], y: &mut [f32; QK]) {
    let d = f16_le(b[0], b[1]);
    let m = f16_le(b[2], b[3]);
    for j in 0..QK / 2 {
        let x = b[4 + j];
        y[j] = d * (x & 0x0F) as f32 + m;
        y[j + QK / 2] = d * (x >> 4) as f32 + m;
    }
}

/// `Q5_0`: `d: f16`, `qh: u32` (bit `i` is the fifth bit of element `i`),
/// `qs: [u8; 16]` (low four bits, nibbles as in `Q4_0`); `w = d * (q - 16)`.
fn q5_0(b: &[u8; 22], y: &mut [f32; QK]) {
    let d = f16_le(b[0], b[1]);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..QK / 2 {
        let x = b[6 + j];
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + QK / 2)) & 1) << 4;
        y[j] = d * ((u32::from(x & 0x0F) | h0) as i32 - 16) as f32;
        y[j + QK / 2] = d * ((u32::from(x >> 4) | h1) as i32 - 16) as f32;
    }
}

/// `Q5_1`: `d: f16`, `m: f16`, `qh: u32`, `qs: [u8; 16]` (bits as in
/// `Q5_0`); `w = d * q + m`.
fn q5_1(b: &[u8; 24], y: &mut [f32; QK]) {
    let d = f16_le(b[0], b[1]);
    let m = f16_le(b[2], b[3]);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..QK / 2 {
        let x = b[8 + j];
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + QK / 2)) & 1) << 4;
        y[j] = d * (u32::from(x & 0x0F) | h0) as f32 + m;
        y[j + QK / 2] = d * (u32::from(x >> 4) | h1) as f32 + m;
    }
}

/// `Q8_0`: `d: f16`, `qs: [i8; 32]`; `w = d * q`.
fn q8_0(b: &[u8; 34], y: &mut [f32; QK]) {
    let d = f16_le(b[0], b[1]);
    for j in 0..QK {
        y[j] = f32::from(b[2 + j] as i8) * d;
    }
}

/// `Q2_K`: `scales: [u8; 16]` (low nibble: scale, high nibble: minimum, per
/// sub-block of 16), `qs: [u8; 64]`, `d: f16`, `dmin: f16`. In each half of
/// 128 elements, the 2-bit field at shift `2s` of `qs[32h + l]` is element
/// `128h + 32s + l`; `w = d * scale * q - dmin * min`.
fn q2_k(b: &[u8; 84], y: &mut [f32; QK_K]) {
    let (scales, rest) = b.split_at(QK_K / 16);
    let (qs, rest) = rest.split_at(QK_K / 4);
    let d = f16_le(rest[0], rest[1]);
    let dmin = f16_le(rest[2], rest[3]);
    // Chunk `c` of 32 elements: half `c / 4`, shift `2 (c % 4)`.
    for (c, ys) in y.chunks_exact_mut(32).enumerate() {
        let q = &qs[32 * (c / 4)..32 * (c / 4) + 32];
        let shift = 2 * (c % 4);
        for (half, (ys, q)) in ys.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let sc = scales[2 * c + half];
            let dl = d * f32::from(sc & 0x0F);
            let ml = dmin * f32::from(sc >> 4);
            for (out, &x) in ys.iter_mut().zip(q) {
                *out = dl * f32::from((x >> shift) & 3) - ml;
            }
        }
    }
}

/// `Q3_K`: `hmask: [u8; 32]`, `qs: [u8; 64]`, `scales: [u8; 12]` (sixteen
/// 6-bit scales offset by 32), `d: f16`. The low two bits of element
/// `128h + 32s + l` are at shift `2s` of `qs[32h + l]`; bit `e / 32` of
/// `hmask[e % 32]` *clear* subtracts 4; `w = d * (scale - 32) * q`.
fn q3_k(b: &[u8; 110], y: &mut [f32; QK_K]) {
    let (hmask, rest) = b.split_at(QK_K / 8);
    let (qs, rest) = rest.split_at(QK_K / 4);
    let (sc, rest) = rest.split_at(12);
    let d = f16_le(rest[0], rest[1]);
    let mut dl = [0f32; 16];
    for (i, dl) in dl.iter_mut().enumerate() {
        let low = if i < 8 { sc[i] & 0x0F } else { sc[i - 8] >> 4 };
        let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        *dl = d * f32::from((low | (high << 4)) as i8 - 32);
    }
    // Chunk `c` of 32 elements: half `c / 4`, shift `2 (c % 4)`, hmask bit `c`.
    for (c, ys) in y.chunks_exact_mut(32).enumerate() {
        let q = &qs[32 * (c / 4)..32 * (c / 4) + 32];
        let shift = 2 * (c % 4);
        let halves = ys
            .chunks_exact_mut(16)
            .zip(q.chunks_exact(16))
            .zip(hmask.chunks_exact(16));
        for (half, ((ys, q), hm)) in halves.enumerate() {
            let dl = dl[2 * c + half];
            for ((out, &x), &h) in ys.iter_mut().zip(q).zip(hm) {
                let low = ((x >> shift) & 3) as i8;
                let q = low - if (h >> c) & 1 == 0 { 4 } else { 0 };
                *out = dl * f32::from(q);
            }
        }
    }
}

/// The eight 6-bit scales and minima of a `Q4_K` / `Q5_K` super-block, packed
/// in 12 bytes.
fn k4_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// `Q4_K`: `d: f16`, `dmin: f16`, `scales: [u8; 12]`, `qs: [u8; 128]`.
/// Sub-block `2c` (32 elements) is the low nibbles of `qs[32c..32c + 32]`,
/// sub-block `2c + 1` their high nibbles; `w = d * sc * q - dmin * min`.
fn q4_k(b: &[u8; 144], y: &mut [f32; QK_K]) {
    let d = f16_le(b[0], b[1]);
    let dmin = f16_le(b[2], b[3]);
    let (sc, mn) = k4_scales(&b[4..16]);
    let qs = &b[16..];
    for (sub, ys) in y.chunks_exact_mut(32).enumerate() {
        let d1 = d * f32::from(sc[sub]);
        let m1 = dmin * f32::from(mn[sub]);
        let shift = 4 * (sub % 2);
        let q = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        for (out, &x) in ys.iter_mut().zip(q) {
            *out = d1 * f32::from((x >> shift) & 0x0F) - m1;
        }
    }
}

/// `Q5_K`: `d: f16`, `dmin: f16`, `scales: [u8; 12]`, `qh: [u8; 32]`,
/// `qs: [u8; 128]`: `Q4_K`'s layout plus a fifth bit, bit `sub` of
/// `qh[l]` for element `l` of sub-block `sub`.
fn q5_k(b: &[u8; 176], y: &mut [f32; QK_K]) {
    let d = f16_le(b[0], b[1]);
    let dmin = f16_le(b[2], b[3]);
    let (sc, mn) = k4_scales(&b[4..16]);
    let qh = &b[16..48];
    let qs = &b[48..];
    for (sub, ys) in y.chunks_exact_mut(32).enumerate() {
        let d1 = d * f32::from(sc[sub]);
        let m1 = dmin * f32::from(mn[sub]);
        let shift = 4 * (sub % 2);
        let q = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        for ((out, &x), &h) in ys.iter_mut().zip(q).zip(qh) {
            let v = ((x >> shift) & 0x0F) | (((h >> sub) & 1) << 4);
            *out = d1 * f32::from(v) - m1;
        }
    }
}

/// `Q6_K`: `ql: [u8; 128]`, `qh: [u8; 64]`, `scales: [i8; 16]`, `d: f16`. In
/// each half of 128 elements, element `64k + p` takes nibble `k` of
/// `ql[64h + p]`, and element `32s + l` the two bits at shift `2s` of
/// `qh[32h + l]` as bits 4 and 5; `w = d * scale * (q - 32)`.
fn q6_k(b: &[u8; 210], y: &mut [f32; QK_K]) {
    let (ql, rest) = b.split_at(QK_K / 2);
    let (qh, rest) = rest.split_at(QK_K / 4);
    let (scales, rest) = rest.split_at(QK_K / 16);
    let d = f16_le(rest[0], rest[1]);
    // Chunk `c` of 32 elements: half `h = c / 4`, `k = c % 4`: the low bits
    // are nibble `k / 2` of `ql[64h + 32 (k % 2)..]`, the high bits at shift
    // `2k` of `qh[32h..]`.
    for (c, ys) in y.chunks_exact_mut(32).enumerate() {
        let (h, k) = (c / 4, c % 4);
        let low = &ql[64 * h + 32 * (k % 2)..64 * h + 32 * (k % 2) + 32];
        let high = &qh[32 * h..32 * h + 32];
        let (lshift, hshift) = (4 * (k / 2), 2 * k);
        let halves = ys
            .chunks_exact_mut(16)
            .zip(low.chunks_exact(16))
            .zip(high.chunks_exact(16));
        for (half, ((ys, low), high)) in halves.enumerate() {
            let ds = d * f32::from(scales[2 * c + half] as i8);
            for ((out, &lo), &hi) in ys.iter_mut().zip(low).zip(high) {
                let q = (((lo >> lshift) & 0x0F) | (((hi >> hshift) & 3) << 4)) as i8 - 32;
                *out = ds * f32::from(q);
            }
        }
    }
}

/// `Q8_K`: `d: f32`, `qs: [i8; 256]`, `bsums: [i16; 16]` (unused here);
/// `w = d * q`.
fn q8_k(b: &[u8; 292], y: &mut [f32; QK_K]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (out, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
        *out = d * f32::from(q as i8);
    }
}

/// A weight matrix in MLX's affine quantisation: per group of
/// [`group_size`](Self::group_size) consecutive elements of a row,
/// `w = scale * q + bias` with `q` an unsigned `bits`-bit integer.
#[derive(Debug, Clone, PartialEq)]
pub struct AffineWeights {
    /// Rows (output features; GGML's `dims[1]`).
    pub rows: usize,
    /// Columns (input features, the row length; GGML's `dims[0]`).
    pub cols: usize,
    /// Bits per quantised element: 4 or 8.
    pub bits: i32,
    /// Elements per group sharing a scale and bias: 32.
    pub group_size: i32,
    /// The quantised elements, row-major `[rows, cols * bits / 32]`: element
    /// `i` of a row is in word `i * bits / 32` at bit `(i * bits) % 32`.
    pub packed: Vec<u32>,
    /// One scale per group, row-major `[rows, cols / group_size]`.
    pub scales: Vec<f32>,
    /// One bias per group, row-major `[rows, cols / group_size]`.
    pub biases: Vec<f32>,
}

impl AffineWeights {
    /// The weights as `f32`, computed as MLX defines them (`scale * q + bias`
    /// in `f32`), row-major `[rows, cols]`; `None` if the fields are not
    /// consistent with each other.
    pub fn dequantize(&self) -> Option<Vec<f32>> {
        let bits = usize::try_from(self.bits)
            .ok()
            .filter(|b| matches!(b, 2 | 4 | 8))?;
        let group = usize::try_from(self.group_size).ok().filter(|&g| g > 0)?;
        let n = self.rows.checked_mul(self.cols)?;
        let n_groups = n / group;
        let group_bits = group.checked_mul(bits)?;
        if self.cols % group != 0
            || group_bits % 32 != 0
            || self.packed.len() != n.checked_mul(bits)? / 32
            || self.scales.len() != n_groups
            || self.biases.len() != n_groups
        {
            return None;
        }
        let mask = (1u32 << bits) - 1;
        let per_word = 32 / bits;
        let mut out = Vec::with_capacity(n);
        for ((words, &scale), &bias) in self
            .packed
            .chunks_exact(group_bits / 32)
            .zip(&self.scales)
            .zip(&self.biases)
        {
            for &word in words {
                for k in 0..per_word {
                    let q = (word >> (k * bits)) & mask;
                    out.push(scale * q as f32 + bias);
                }
            }
        }
        Some(out)
    }
}

/// Repacks a `[rows, cols]` tensor of `Q4_0`, `Q4_1` or `Q8_0` (`cols` is
/// GGML's `dims[0]`, a multiple of 32) into MLX's affine layout with groups
/// of 32, one group per GGML block:
///
/// - `Q4_0` (`w = d * (q - 8)`): 4 bits, scale `d`, bias `-8 d`;
/// - `Q4_1` (`w = d * q + m`): 4 bits, scale `d`, bias `m`;
/// - `Q8_0` (`w = d * q`, `q` signed): 8 bits, `q + 128`, scale `d`, bias
///   `-128 d`.
///
/// Lossless: `d` is an f16 widened to f32 (11 significant bits) and `q` has
/// at most 8, so `d * q` is exact in f32; `-8 d` and `-128 d` are exact too,
/// and `d * q + bias` then equals GGML's `d * (q - 8)` or `d * q` exactly
/// (both are exact values that f32 represents), up to the sign of a zero.
/// This holds as long as the scales stay in f32 (or f16, barring overflow of
/// `-128 d`); rounding them to bf16 would lose bits. Non-finite scales give
/// non-finite weights either way, but not necessarily the same ones.
pub fn to_mlx_affine(
    ty: GgmlType,
    data: &[u8],
    rows: usize,
    cols: usize,
) -> Result<AffineWeights, GgufError> {
    let bits: usize = match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => 4,
        GgmlType::Q8_0 => 8,
        ty => {
            return Err(GgufError::Unsupported {
                op: "conversion to MLX's affine quantisation",
                ty,
            })
        }
    };
    if cols % QK != 0 {
        return Err(GgufError::WrongLength {
            ty,
            reason: format!("row length {cols} is not a multiple of {QK}"),
        });
    }
    let n = rows
        .checked_mul(cols)
        .ok_or_else(|| GgufError::WrongLength {
            ty,
            reason: format!("{rows} x {cols} elements overflow"),
        })?;
    check_length(ty, data, n)?;
    let n_groups = n / QK;
    let words = QK * bits / 32;
    let mut packed = vec![0u32; n_groups * words];
    let mut scales = vec![0f32; n_groups];
    let mut biases = vec![0f32; n_groups];
    match ty {
        GgmlType::Q4_0 => {
            affine_blocks::<18, 4>(data, &mut packed, &mut scales, &mut biases, |b, w| {
                nibbles_to_words(&b[2..18], w);
                let d = f16_le(b[0], b[1]);
                (d, -8.0 * d)
            })
        }
        GgmlType::Q4_1 => {
            affine_blocks::<20, 4>(data, &mut packed, &mut scales, &mut biases, |b, w| {
                nibbles_to_words(&b[4..20], w);
                (f16_le(b[0], b[1]), f16_le(b[2], b[3]))
            })
        }
        _ => affine_blocks::<34, 8>(data, &mut packed, &mut scales, &mut biases, |b, w| {
            for (word, q) in w.iter_mut().zip(b[2..34].chunks_exact(4)) {
                // Signed to unsigned by adding 128: flip each byte's top bit.
                *word = u32::from_le_bytes([q[0], q[1], q[2], q[3]]) ^ 0x8080_8080;
            }
            let d = f16_le(b[0], b[1]);
            (d, -128.0 * d)
        }),
    }
    Ok(AffineWeights {
        rows,
        cols,
        bits: bits as i32,
        group_size: QK as i32,
        packed,
        scales,
        biases,
    })
}

/// Packs GGML's 16 nibble bytes (elements `0..16` in the low nibbles,
/// `16..32` in the high ones) into four words of eight 4-bit elements each,
/// element `i` at bit `4 * (i % 8)` of word `i / 8`.
#[inline(always)]
fn nibbles_to_words(qs: &[u8], w: &mut [u32; 4]) {
    for (k, word) in w.iter_mut().enumerate() {
        let (bytes, shift) = if k < 2 {
            (&qs[8 * k..8 * k + 8], 0)
        } else {
            (&qs[8 * (k - 2)..8 * (k - 2) + 8], 4)
        };
        *word = bytes.iter().enumerate().fold(0u32, |acc, (j, &x)| {
            acc | (u32::from((x >> shift) & 0x0F) << (4 * j))
        });
    }
}

/// Runs `f` on every block of `BB` bytes in `data`, which fills the block's
/// `W` packed words and returns its scale and bias; over several threads for
/// large tensors. The caller has sized the outputs for `data`'s blocks.
fn affine_blocks<const BB: usize, const W: usize>(
    data: &[u8],
    packed: &mut [u32],
    scales: &mut [f32],
    biases: &mut [f32],
    f: impl Fn(&[u8; BB], &mut [u32; W]) -> (f32, f32) + Sync,
) {
    let run = |data: &[u8], packed: &mut [u32], scales: &mut [f32], biases: &mut [f32]| {
        let outs = packed
            .chunks_exact_mut(W)
            .zip(scales.iter_mut().zip(biases.iter_mut()));
        for (b, (w, (s, z))) in data.chunks_exact(BB).zip(outs) {
            // Always `Ok`: the chunks have exactly these lengths.
            if let (Ok(b), Ok(w)) = (<&[u8; BB]>::try_from(b), <&mut [u32; W]>::try_from(w)) {
                (*s, *z) = f(b, w);
            }
        }
    };
    let ranges = split(data.len() / BB, QK);
    if ranges.len() <= 1 {
        run(data, packed, scales, biases);
        return;
    }
    let per = ranges[0].len();
    std::thread::scope(|s| {
        let chunks = data
            .chunks(per * BB)
            .zip(packed.chunks_mut(per * W))
            .zip(scales.chunks_mut(per).zip(biases.chunks_mut(per)));
        for ((d, p), (sc, bi)) in chunks {
            let run = &run;
            s.spawn(move || run(d, p, sc, bi));
        }
    });
}

#[cfg(test)]
mod tests {
    //! Every implemented type against gguf-py's dequantisation of random
    //! blocks (`tests/fixtures/gguf/blocks/`), real tensors of the two model
    //! files against gguf-py (`tests/fixtures/gguf/real-*.json`), and the
    //! affine conversion's losslessness. Fixtures come from
    //! `scripts/fixtures/make_gguf_goldens.py`.
    //!
    //! Tolerance: none. Both sides compute in f32 with the same operations in
    //! the same order (numpy does not fuse multiply-adds), so the values must
    //! be bit-identical; NaNs compare as NaNs (the payload of an f16 NaN may
    //! legitimately differ between conversions).

    use super::*;
    use crate::gguf::reader::tests::{fixture, real_model, repo_root};
    use crate::gguf::reader::GgufFile;

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// Asserts bit-identical values (any NaN matches any NaN).
    fn assert_bits_eq(what: &str, got: &[f32], expected: &[f32]) {
        assert_eq!(got.len(), expected.len(), "{what}: length");
        for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
            let same = g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan());
            assert!(
                same,
                "{what}[{i}]: got {g:e} ({:#010x}), expected {e:e} ({:#010x})",
                g.to_bits(),
                e.to_bits()
            );
        }
    }

    fn type_named(name: &str) -> GgmlType {
        (0..64)
            .filter_map(GgmlType::from_id)
            .find(|t| t.name() == name)
            .unwrap_or_else(|| panic!("type {name}"))
    }

    /// Every case of `blocks.json`: (type, raw bytes, expected values).
    fn block_cases() -> Vec<(GgmlType, Vec<u8>, Vec<f32>)> {
        let dir = repo_root().join("tests/fixtures/gguf");
        let read = |p: &str| std::fs::read(dir.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        fixture("blocks/blocks.json")["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .map(|c| {
                let ty = type_named(c["type"].as_str().expect("type"));
                assert_eq!(u64::from(ty.id()), c["type_id"].as_u64().expect("id"));
                let raw = read(c["raw"].as_str().expect("raw"));
                let expected = f32s(&read(c["expected"].as_str().expect("expected")));
                assert_eq!(expected.len() as u64, c["n_elements"].as_u64().expect("n"));
                (ty, raw, expected)
            })
            .collect()
    }

    #[test]
    fn every_type_matches_gguf_py_on_random_blocks() {
        let cases = block_cases();
        let names: Vec<&str> = cases.iter().map(|(t, _, _)| t.name()).collect();
        for wanted in [
            "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
            "Q5_K", "Q6_K", "Q8_K",
        ] {
            assert!(names.contains(&wanted), "fixture for {wanted} missing");
        }
        for (ty, raw, expected) in &cases {
            let got = dequantize(*ty, raw, expected.len()).expect("dequantize");
            assert_bits_eq(ty.name(), &got, expected);
            // Sanity of the fixture itself: not all zeros.
            assert!(
                expected.iter().filter(|v| **v != 0.0).count() > expected.len() / 4,
                "{ty}"
            );
        }
    }

    #[test]
    fn parallel_path_matches_serial_path() {
        // Repeat the random blocks until the tensor is large enough to be
        // split over threads; every copy must dequantise as the original.
        for (ty, raw, expected) in block_cases() {
            let copies = PARALLEL_MIN_ELEMENTS / expected.len() + 3;
            let big: Vec<u8> = raw
                .iter()
                .copied()
                .cycle()
                .take(raw.len() * copies)
                .collect();
            let got = dequantize(ty, &big, expected.len() * copies).expect("dequantize");
            for (k, chunk) in got.chunks_exact(expected.len()).enumerate() {
                assert_bits_eq(&format!("{ty} copy {k}"), chunk, &expected);
            }
        }
    }

    #[test]
    fn lengths_and_types_are_checked() {
        let q = vec![0u8; 34 * 2];
        assert!(dequantize(GgmlType::Q8_0, &q, 64).is_ok());
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &q, 96),
            Err(GgufError::WrongLength { .. })
        ));
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &q, 48),
            Err(GgufError::WrongLength { .. })
        ));
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &q[..67], 64),
            Err(GgufError::WrongLength { .. })
        ));
        assert!(matches!(
            dequantize(GgmlType::Q4_K, &q, 256),
            Err(GgufError::WrongLength { .. })
        ));
        assert!(matches!(
            dequantize(GgmlType::Q4_K, &[], usize::MAX - 255),
            Err(GgufError::WrongLength { .. })
        ));
        for ty in [
            GgmlType::IQ4_NL,
            GgmlType::Q8_1,
            GgmlType::I32,
            GgmlType::MXFP4,
        ] {
            let n = ty.block_size();
            let data = vec![0u8; ty.block_bytes()];
            assert!(
                matches!(dequantize(ty, &data, n), Err(GgufError::Unsupported { .. })),
                "{ty}"
            );
        }
        let mut out = vec![0f32; 32];
        assert!(matches!(
            dequantize_into(GgmlType::Q8_0, &q, &mut out),
            Err(GgufError::WrongLength { .. })
        ));
    }

    /// Asserts that the affine form of `raw` dequantises exactly as GGML does.
    fn check_affine(ty: GgmlType, raw: &[u8], rows: usize, cols: usize) {
        let reference = dequantize(ty, raw, rows * cols).expect("dequantize");
        let affine = to_mlx_affine(ty, raw, rows, cols).expect("affine");
        let bits = if ty == GgmlType::Q8_0 { 8 } else { 4 };
        assert_eq!((affine.bits, affine.group_size), (bits, 32));
        assert_eq!(affine.packed.len(), rows * cols * bits as usize / 32);
        assert_eq!(affine.scales.len(), rows * cols / 32);
        let got = affine.dequantize().expect("consistent");
        for (i, (g, r)) in got.iter().zip(&reference).enumerate() {
            // Exact equality (`==`, so +0 and -0 match: `d * 0` may be -0 where
            // `d * q + bias` is +0).
            assert!(
                g == r || (g.is_nan() && r.is_nan()),
                "{ty}[{i}]: affine {g:e}, GGML {r:e}"
            );
        }
    }

    #[test]
    fn affine_conversion_is_lossless_on_random_blocks() {
        for (ty, raw, expected) in block_cases() {
            if matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0) {
                // As one row, and as rows of 64.
                check_affine(ty, &raw, 1, expected.len());
                check_affine(ty, &raw, expected.len() / 64, 64);
            }
        }
    }

    #[test]
    fn affine_layout_by_hand() {
        // Q4_0, one block: d = 2, q_i = i % 16. Element i < 16 is the low
        // nibble of qs[i], element i >= 16 the high nibble of qs[i - 16].
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&f16::from_f32(2.0).to_bits().to_le_bytes());
        for j in 0..16 {
            b[2 + j] = (j as u8) | ((j as u8) << 4);
        }
        let a = to_mlx_affine(GgmlType::Q4_0, &b, 1, 32).expect("affine");
        assert_eq!(
            a.packed,
            vec![0x7654_3210, 0xFEDC_BA98, 0x7654_3210, 0xFEDC_BA98]
        );
        assert_eq!((a.scales[0], a.biases[0]), (2.0, -16.0));
        let w = dequantize(GgmlType::Q4_0, &b, 32).expect("dequantize");
        assert_eq!(w[0], -16.0);
        assert_eq!(w[17], 2.0 * (1.0 - 8.0));
        assert_eq!(w[31], 14.0);

        // Q8_0: q = -128, -1, 0, 127, ...: unsigned 0, 127, 128, 255.
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2..6].copy_from_slice(&[0x80, 0xFF, 0x00, 0x7F]);
        let a = to_mlx_affine(GgmlType::Q8_0, &b, 1, 32).expect("affine");
        assert_eq!(a.packed[0], 0xFF80_7F00);
        assert_eq!(a.packed[1], 0x8080_8080);
        assert_eq!((a.scales[0], a.biases[0]), (0.5, -64.0));

        // Errors.
        assert!(matches!(
            to_mlx_affine(GgmlType::Q4_K, &[0; 144], 1, 256),
            Err(GgufError::Unsupported { .. })
        ));
        assert!(matches!(
            to_mlx_affine(GgmlType::Q8_0, &b, 2, 16),
            Err(GgufError::WrongLength { .. })
        ));
        assert!(matches!(
            to_mlx_affine(GgmlType::Q8_0, &b, 2, 32),
            Err(GgufError::WrongLength { .. })
        ));
        assert!(matches!(
            to_mlx_affine(GgmlType::Q8_0, &b, usize::MAX, 64),
            Err(GgufError::WrongLength { .. })
        ));
    }

    /// Neumaier's compensated summation, for float64 sums that do not depend
    /// on the order of the terms.
    #[derive(Default)]
    struct Sum {
        sum: f64,
        c: f64,
    }

    impl Sum {
        fn add(&mut self, v: f64) {
            let t = self.sum + v;
            self.c += if self.sum.abs() >= v.abs() {
                (self.sum - t) + v
            } else {
                (v - t) + self.sum
            };
            self.sum = t;
        }

        fn value(&self) -> f64 {
            self.sum + self.c
        }
    }

    fn check_real_tensors(model: &str) {
        let fx = fixture(&format!("real-{model}.json"));
        let file = fx["file"].as_str().expect("file");
        let path = real_model(file, fx["file_size"].as_u64().expect("size"));
        let f = GgufFile::open(&path).expect("open");
        for t in fx["tensors"].as_array().expect("tensors") {
            let name = t["name"].as_str().expect("name");
            let info = f
                .tensor(name)
                .unwrap_or_else(|| panic!("{model}: {name}"))
                .clone();
            assert_eq!(info.ggml_type.name(), t["type"].as_str().expect("type"));
            let data = f.tensor_data(&info).expect("data");
            let n = info.n_elements() as usize;
            let started = std::time::Instant::now();
            let values = dequantize(info.ggml_type, data, n).expect("dequantize");
            eprintln!(
                "{model}: {name} ({}, {n} elements) in {:?}",
                info.ggml_type,
                started.elapsed()
            );

            let indices = t["indices"].as_array().expect("indices");
            let expected = t["values"].as_array().expect("values");
            assert!(indices.len() >= 256);
            for (i, e) in indices.iter().zip(expected) {
                let i = i.as_u64().expect("index") as usize;
                let e = e.as_f64().expect("value") as f32;
                assert_eq!(
                    values[i].to_bits(),
                    e.to_bits(),
                    "{model}: {name}[{i}]: {} vs {e}",
                    values[i]
                );
            }
            // Whole-tensor checks: compensated sums are within a few ulps of
            // the exact sums, as is numpy's pairwise float64 summation, so a
            // tolerance of 1e-12 relative to the sum of magnitudes leaves room
            // only for summation order.
            let (mut sum, mut sum_abs, mut sum_sq) =
                (Sum::default(), Sum::default(), Sum::default());
            for &v in &values {
                // Exact in f64: |v| and v * v of an f32.
                let v = f64::from(v);
                sum.add(v);
                sum_abs.add(v.abs());
                sum_sq.add(v * v);
            }
            let (sum, sum_abs, sum_sq) = (sum.value(), sum_abs.value(), sum_sq.value());
            let close = |got: f64, key: &str, scale: f64| {
                let e = t[key].as_f64().expect(key);
                assert!(
                    (got - e).abs() <= 1e-12 * scale,
                    "{model}: {name} {key}: {got} vs {e}"
                );
            };
            close(sum_abs, "sum_abs", sum_abs);
            close(sum, "sum", sum_abs);
            close(sum_sq, "sum_sq", sum_sq);

            if matches!(
                info.ggml_type,
                GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0
            ) {
                let cols = info.dims[0] as usize;
                let rows = n / cols;
                let started = std::time::Instant::now();
                let affine = to_mlx_affine(info.ggml_type, data, rows, cols).expect("affine");
                let back = affine.dequantize().expect("consistent");
                eprintln!(
                    "{model}: {name} affine round trip in {:?}",
                    started.elapsed()
                );
                assert!(
                    back.iter().zip(&values).all(|(a, b)| a == b),
                    "{model}: {name} affine round trip"
                );
            }
        }
    }

    #[test]
    fn real_smollm2_tensors() {
        check_real_tensors("smollm2");
    }

    #[test]
    fn real_gemma3_tensors() {
        check_real_tensors("gemma3");
    }

    /// Timing of the load-time hot path (run with `--release --ignored`).
    #[test]
    #[ignore = "timing; run in release"]
    fn time_gemma_embedding() {
        let fx = fixture("real-gemma3.json");
        let path = real_model(
            fx["file"].as_str().expect("file"),
            fx["file_size"].as_u64().expect("size"),
        );
        let f = GgufFile::open(&path).expect("open");
        let t = f.tensor("token_embd.weight").expect("embedding").clone();
        let data = f.tensor_data(&t).expect("data");
        let n = t.n_elements() as usize;
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let v = dequantize(t.ggml_type, data, n).expect("dequantize");
            let dq = started.elapsed();
            let started = std::time::Instant::now();
            let a = to_mlx_affine(
                t.ggml_type,
                data,
                n / t.dims[0] as usize,
                t.dims[0] as usize,
            )
            .expect("affine");
            eprintln!(
                "{n} elements: dequantize {dq:?}, to_mlx_affine {:?} ({} {})",
                started.elapsed(),
                v.len(),
                a.packed.len()
            );
        }
    }
}

//! KV caches.
//!
//! - [`KvCache`] keeps every position. It grows in steps of [`KvCache::STEP`]
//!   positions: a decode step writes its keys and values into spare room with
//!   a slice update instead of concatenating (which would copy the whole cache
//!   every token).
//! - [`RotatingKvCache`] keeps the last `window` positions, for sliding-window
//!   layers (and for every layer when a context length bounds memory). Query
//!   position `i` attends key position `j` when `i − window < j ≤ i`, the
//!   semantics of transformers' sliding-window mask, for single-token decode
//!   steps and for prompt chunks of any length, including chunks longer than
//!   the window and chunks that cross it.
//!
//! [`LayerCache`] is either kind; its `update` returns the keys and values to
//! attend and the mask to apply.

use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::ops::{concatenate, zeros_dtype};
use mlx_rs::Array;

type Result<T> = std::result::Result<T, Exception>;

/// The growing cache of one attention layer; arrays are `[B, H_kv, T, D]`.
#[derive(Debug, Default)]
pub struct KvCache {
    keys: Option<Array>,
    values: Option<Array>,
    offset: i32,
}

impl KvCache {
    /// Positions added per growth.
    pub const STEP: i32 = 256;

    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions cached so far (the offset of the next token).
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Appends `keys`/`values` `[B, H_kv, L, D]` and returns everything cached.
    pub fn update(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        let prev = self.offset;
        let len = keys.dim(2);
        let capacity = self.keys.as_ref().map_or(0, |k| k.dim(2));
        if prev + len > capacity {
            let (b, h, dk) = (keys.dim(0), keys.dim(1), keys.dim(3));
            let dv = values.dim(3);
            let steps = (len + Self::STEP - 1) / Self::STEP;
            let grow_k = zeros_dtype(&[b, h, steps * Self::STEP, dk], keys.dtype())?;
            let grow_v = zeros_dtype(&[b, h, steps * Self::STEP, dv], values.dtype())?;
            let grow = |old: Option<Array>, new: Array| -> Result<Array> {
                match old {
                    // Unfilled room is dropped before growing, so the new room is
                    // whole steps past the offset.
                    Some(old) => concatenate(&[old.index((.., .., ..prev, ..)), new], 2),
                    None => Ok(new),
                }
            };
            self.keys = Some(grow(self.keys.take(), grow_k)?);
            self.values = Some(grow(self.values.take(), grow_v)?);
        }
        self.offset = prev + len;
        let end = self.offset;
        let (Some(k), Some(v)) = (self.keys.as_mut(), self.values.as_mut()) else {
            return Err(Exception::custom("KV cache has no storage after growing"));
        };
        *k = write_positions(k, keys, prev)?;
        *v = write_positions(v, values, prev)?;
        Ok((k.index((.., .., ..end, ..)), v.index((.., .., ..end, ..))))
    }
}

impl KvCache {
    /// Forgets every position from `n` on; `false` (and no change) when the
    /// cache holds fewer than `n` positions.
    pub fn trim_to(&mut self, n: i32) -> bool {
        if n < 0 || n > self.offset {
            return false;
        }
        // Room past the offset is overwritten by the next update and never
        // returned before.
        self.offset = n;
        true
    }

    /// The cache's arrays (for evaluation between prefill chunks).
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.keys.iter().chain(self.values.iter())
    }
}

/// `cache` `[B, H, T, D]` with `new` `[B, H, L, D]` written at positions
/// `at..at + L`.
fn write_positions(cache: &Array, new: &Array, at: i32) -> Result<Array> {
    let s = cache.shape();
    let l = new.dim(2);
    crate::ffi::slice_update(cache, new, &[0, 0, at, 0], &[s[0], s[1], at + l, s[3]])
}

/// The mask attention applies to the keys a cache returns.
#[derive(Debug)]
pub enum AttnMask {
    /// Every key is visible (a single query after all cached keys).
    None,
    /// Causal, aligned to the bottom right (queries are the last positions).
    Causal,
    /// An explicit boolean mask (true = attend), `[L, K]` or, for a batch,
    /// `[B, 1, L, K]`.
    Array(Array),
}

/// A cache that keeps the last `window` positions.
///
/// Storage is a ring of `window` slots. While it is not full, slots hold
/// positions in order; once full, a decode step overwrites the oldest slot
/// (the order of keys does not matter to attention without a mask, and every
/// slot is then inside the window). A chunk of several queries reads the slots
/// back in temporal order, attends them plus its own keys under an explicit
/// sliding-window mask, and leaves the last `window` positions in order.
#[derive(Debug)]
pub struct RotatingKvCache {
    window: i32,
    keys: Option<Array>,
    values: Option<Array>,
    /// Valid slots (≤ window).
    len: i32,
    /// The oldest slot (the next to overwrite) once full.
    next: i32,
    /// Positions seen so far.
    offset: i32,
}

impl RotatingKvCache {
    /// A cache of the last `window` positions (at least 1).
    pub fn new(window: usize) -> Self {
        let window = i32::try_from(window.max(1)).unwrap_or(i32::MAX);
        Self {
            window,
            keys: None,
            values: None,
            len: 0,
            next: 0,
            offset: 0,
        }
    }

    /// Positions seen so far.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// The valid slots in temporal order.
    fn ordered(&self, a: &Array) -> Result<Array> {
        let valid = a.index((.., .., ..self.len, ..));
        if self.len < self.window || self.next == 0 {
            return Ok(valid);
        }
        concatenate(
            &[
                a.index((.., .., self.next.., ..)),
                a.index((.., .., ..self.next, ..)),
            ],
            2,
        )
    }

    /// Appends `keys`/`values` `[B, H_kv, L, D]`; returns what the new queries
    /// attend and the mask.
    pub fn update(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array, AttnMask)> {
        let l = keys.dim(2);
        if l == 1 {
            return self.update_one(keys, values);
        }
        // Context from the cache: the last `window - 1` positions at most (the
        // first new query needs no more).
        let m = self.len.min(self.window - 1);
        let (all_k, all_v) = match (&self.keys, &self.values) {
            (Some(k), Some(v)) if m > 0 => {
                let (k, v) = (self.ordered(k)?, self.ordered(v)?);
                let from = self.len - m;
                (
                    concatenate(&[k.index((.., .., from.., ..)), keys.clone()], 2)?,
                    concatenate(&[v.index((.., .., from.., ..)), values.clone()], 2)?,
                )
            }
            _ => (keys.clone(), values.clone()),
        };
        let mask = sliding_mask(l, m, self.window)?;
        // Keep the last `window` positions, in order.
        let total = m + l;
        let keep = total.min(self.window);
        let (k, v) = (
            all_k.index((.., .., total - keep.., ..)),
            all_v.index((.., .., total - keep.., ..)),
        );
        self.keys = Some(k);
        self.values = Some(v);
        self.len = keep;
        self.next = 0;
        self.offset += l;
        Ok((all_k, all_v, AttnMask::Array(mask)))
    }

    fn update_one(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array, AttnMask)> {
        if self.len < self.window {
            // Not full: append in order, growing in steps up to the window.
            let capacity = self.keys.as_ref().map_or(0, |k| k.dim(2));
            if self.len + 1 > capacity {
                let grow = KvCache::STEP.min(self.window - capacity).max(1);
                let new_room =
                    |a: &Array| zeros_dtype(&[a.dim(0), a.dim(1), grow, a.dim(3)], a.dtype());
                let (gk, gv) = (new_room(keys)?, new_room(values)?);
                let len = self.len;
                let extend = |old: Option<Array>, new: Array| -> Result<Array> {
                    match old {
                        Some(old) => concatenate(&[old.index((.., .., ..len, ..)), new], 2),
                        None => Ok(new),
                    }
                };
                self.keys = Some(extend(self.keys.take(), gk)?);
                self.values = Some(extend(self.values.take(), gv)?);
            }
            let slot = self.len;
            self.write(slot, keys, values)?;
            self.len += 1;
        } else {
            let slot = self.next;
            self.write(slot, keys, values)?;
            self.next = (self.next + 1) % self.window;
        }
        self.offset += 1;
        let len = self.len;
        let (Some(k), Some(v)) = (self.keys.as_ref(), self.values.as_ref()) else {
            return Err(Exception::custom(
                "rotating KV cache has no storage after an update",
            ));
        };
        Ok((
            k.index((.., .., ..len, ..)),
            v.index((.., .., ..len, ..)),
            AttnMask::None,
        ))
    }

    /// Forgets every position from `n` on, keeping what later queries need
    /// (the last `window − 1` positions before `n`, in order). `Ok(false)`
    /// and no change when the cache no longer holds those positions or holds
    /// fewer than `n`.
    pub fn trim_to(&mut self, n: i32) -> Result<bool> {
        if n < 0 || n > self.offset {
            return Ok(false);
        }
        if n == self.offset {
            return Ok(true);
        }
        let held_from = self.offset - self.len;
        let need_from = (n - (self.window - 1)).max(0);
        if held_from > need_from {
            return Ok(false);
        }
        let (Some(k), Some(v)) = (&self.keys, &self.values) else {
            return Ok(false);
        };
        let (from, to) = (need_from - held_from, n - held_from);
        let k = self.ordered(k)?.index((.., .., from..to, ..));
        let v = self.ordered(v)?.index((.., .., from..to, ..));
        self.keys = Some(k);
        self.values = Some(v);
        self.len = to - from;
        self.next = 0;
        self.offset = n;
        Ok(true)
    }

    fn write(&mut self, slot: i32, keys: &Array, values: &Array) -> Result<()> {
        let (Some(k), Some(v)) = (self.keys.as_mut(), self.values.as_mut()) else {
            return Err(Exception::custom("rotating KV cache has no storage"));
        };
        *k = write_positions(k, keys, slot)?;
        *v = write_positions(v, values, slot)?;
        Ok(())
    }

    /// The cache's arrays (for evaluation between prefill chunks).
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.keys.iter().chain(self.values.iter())
    }
}

/// The boolean mask `[l, m + l]` of `l` queries after `m` context keys: query
/// `i` (position `m + i` in the key list) attends key `j` when
/// `m + i − window < j ≤ m + i`.
fn sliding_mask(l: i32, m: i32, window: i32) -> Result<Array> {
    let q = Array::from_iter((0..l).map(|i| m + i), &[l, 1]);
    let k = Array::from_iter(0..m + l, &[1, m + l]);
    let causal = k.le(&q)?;
    let recent = k.gt(&q.subtract(Array::from_int(window))?)?;
    causal.logical_and(&recent)
}

/// The cache of one attention layer.
#[derive(Debug)]
pub enum LayerCache {
    /// Every position.
    Full(KvCache),
    /// The last `window` positions.
    Rotating(RotatingKvCache),
    /// No storage: one forward pass over a whole (batched, padded) prompt
    /// under an explicit mask, starting at position 0 (see
    /// [`LayerCache::one_shot`]).
    OneShot {
        /// The boolean mask `[B, 1, L, L]` (true = attend).
        mask: Array,
        /// Whether the pass has run (a second pass is refused).
        used: bool,
    },
}

impl LayerCache {
    /// A cache keeping every position, or the last `window` when given.
    pub fn new(window: Option<usize>) -> Self {
        match window {
            Some(w) => LayerCache::Rotating(RotatingKvCache::new(w)),
            None => LayerCache::Full(KvCache::new()),
        }
    }

    /// A cache-less layer for one forward pass of `[B, L]` ids at positions
    /// `0..L`: the keys and values of the pass are attended under `mask`
    /// `[B, 1, L, L]` and nothing is kept.
    pub fn one_shot(mask: Array) -> Self {
        LayerCache::OneShot { mask, used: false }
    }

    /// The sliding window this cache applies (`None` for every position).
    pub fn window(&self) -> Option<usize> {
        match self {
            LayerCache::Rotating(c) => usize::try_from(c.window).ok(),
            LayerCache::Full(_) | LayerCache::OneShot { .. } => None,
        }
    }

    /// Forgets every position from `n` on, so that the next update continues
    /// at position `n`; `Ok(false)` (and no change) where the cache cannot
    /// (it holds fewer positions, a sliding window has already dropped what
    /// position `n` needs, or it is a one-shot cache).
    pub fn trim_to(&mut self, n: i32) -> Result<bool> {
        match self {
            LayerCache::Full(c) => Ok(c.trim_to(n)),
            LayerCache::Rotating(c) => c.trim_to(n),
            LayerCache::OneShot { .. } => Ok(false),
        }
    }

    /// Positions seen so far (the RoPE offset of the next token).
    pub fn offset(&self) -> i32 {
        match self {
            LayerCache::Full(c) => c.offset(),
            LayerCache::Rotating(c) => c.offset(),
            LayerCache::OneShot { .. } => 0,
        }
    }

    /// Adds `keys`/`values` `[B, H_kv, L, D]`; returns the keys and values to
    /// attend and the mask for the `L` new queries.
    pub fn update(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array, AttnMask)> {
        match self {
            LayerCache::Full(c) => {
                let causal = keys.dim(2) > 1;
                let (k, v) = c.update(keys, values)?;
                Ok((
                    k,
                    v,
                    if causal {
                        AttnMask::Causal
                    } else {
                        AttnMask::None
                    },
                ))
            }
            LayerCache::Rotating(c) => c.update(keys, values),
            LayerCache::OneShot { mask, used } => {
                if std::mem::replace(used, true) {
                    return Err(Exception::custom(
                        "a one-shot layer cache takes a single forward pass",
                    ));
                }
                Ok((keys.clone(), values.clone(), AttnMask::Array(mask.clone())))
            }
        }
    }

    /// The cache's arrays (for evaluation between prefill chunks).
    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            LayerCache::Full(c) => c.arrays().collect(),
            LayerCache::Rotating(c) => c.arrays().collect(),
            LayerCache::OneShot { .. } => Vec::new(),
        }
    }
}

/// `[B, H, L, D]` attention of queries on keys/values under `mask`, scaled.
impl AttnMask {
    /// The mask of the last query alone (the queries are the mask's
    /// second-to-last axis).
    pub fn last_query(self) -> Result<AttnMask> {
        Ok(match self {
            // The last query sees every key.
            AttnMask::None | AttnMask::Causal => AttnMask::None,
            AttnMask::Array(m) => {
                let axis = m.ndim() as i32 - 2;
                let l = m.dim(axis);
                let last = Array::from_int(l - 1);
                AttnMask::Array(m.take_axis(&last.reshape(&[1])?, axis)?)
            }
        })
    }
}

pub fn attend(q: &Array, k: &Array, v: &Array, scale: f32, mask: &AttnMask) -> Result<Array> {
    use mlx_rs::fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask};
    match mask {
        AttnMask::None => scaled_dot_product_attention(q, k, v, scale, None, None),
        AttnMask::Causal => scaled_dot_product_attention(
            q,
            k,
            v,
            scale,
            ScaledDotProductAttentionMask::Causal,
            None,
        ),
        AttnMask::Array(m) => scaled_dot_product_attention(
            q,
            k,
            v,
            scale,
            ScaledDotProductAttentionMask::Array(m),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Updates of assorted lengths across several growth steps return exactly
    /// the concatenation of everything written.
    #[test]
    fn grows_in_steps_and_returns_everything_written() {
        let mut cache = KvCache::new();
        let (mut all_k, mut all_v): (Vec<f32>, Vec<f32>) = (Vec::new(), Vec::new());
        let mut next = 0.0f32;
        for len in [3, 1, 300, 1, 1, 200, 60] {
            // [B=1, H=2, L=len, D=2], laid out head-major like the cache.
            let k: Vec<f32> = (0..2 * len * 2).map(|i| next + i as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            next += k.len() as f32;
            let ka = Array::from_slice(&k, &[1, 2, len, 2]);
            let va = Array::from_slice(&v, &[1, 2, len, 2]);
            let (ck, cv) = cache.update(&ka, &va).unwrap();
            // Per head: the old rows, then the new ones.
            for (all, new) in [(&mut all_k, &k), (&mut all_v, &v)] {
                let old_len = all.len() / 4;
                let mut merged = Vec::new();
                for h in 0..2usize {
                    merged.extend_from_slice(&all[h * old_len * 2..(h + 1) * old_len * 2]);
                    let l = len as usize;
                    merged.extend_from_slice(&new[h * l * 2..(h + 1) * l * 2]);
                }
                *all = merged;
            }
            assert_eq!(ck.shape(), &[1, 2, cache.offset(), 2]);
            assert_eq!(ck.contiguous().unwrap().as_slice::<f32>(), &all_k[..]);
            assert_eq!(cv.contiguous().unwrap().as_slice::<f32>(), &all_v[..]);
        }
        assert_eq!(cache.offset(), 566);
        // Growth adds whole steps past the filled part: 3 → 256, 304 → 4 + 512,
        // 566 → 506 + 256.
        assert_eq!(cache.keys.as_ref().unwrap().dim(2), 506 + KvCache::STEP);
    }
}

#[cfg(test)]
mod rotating_tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Sliding-window attention computed naively: query at position `p`
    /// attends keys at positions `j` with `p - window < j <= p`.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: usize,
        positions: std::ops::Range<usize>,
        window: usize,
    ) -> Vec<f32> {
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = Vec::new();
        for (qi, p) in positions.enumerate() {
            let qv = &q[qi * d..(qi + 1) * d];
            let lo = (p + 1).saturating_sub(window);
            let scores: Vec<f64> = (lo..=p)
                .map(|j| {
                    (0..d)
                        .map(|t| qv[t] as f64 * k[j * d + t] as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::MIN, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let z: f64 = w.iter().sum();
            for t in 0..d {
                let acc: f64 = (lo..=p)
                    .zip(&w)
                    .map(|(j, wj)| wj * v[j * d + t] as f64)
                    .sum();
                out.push((acc / z) as f32);
            }
        }
        out
    }

    fn check(window: usize, chunks: &[usize]) {
        let d = 4usize;
        let total: usize = chunks.iter().sum();
        let k_all = values(total * d, 1);
        let v_all = values(total * d, 2);
        let mut cache = LayerCache::new(Some(window));
        let mut pos = 0;
        for (c, &l) in chunks.iter().enumerate() {
            let q = values(l * d, 100 + c as u64);
            let qa = Array::from_slice(&q, &[1, 1, l as i32, d as i32]);
            let ka = Array::from_slice(&k_all[pos * d..(pos + l) * d], &[1, 1, l as i32, d as i32]);
            let va = Array::from_slice(&v_all[pos * d..(pos + l) * d], &[1, 1, l as i32, d as i32]);
            let (k, v, mask) = cache.update(&ka, &va).unwrap();
            let out = attend(&qa, &k, &v, 1.0 / (d as f32).sqrt(), &mask).unwrap();
            let got = out.as_slice::<f32>().to_vec();
            let want = naive(&q, &k_all, &v_all, d, pos..pos + l, window);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() < 1e-5,
                    "window {window}, chunk {c} (len {l} at {pos}), element {i}: {a} vs {b}"
                );
            }
            pos += l;
            assert_eq!(cache.offset(), pos as i32);
        }
    }

    #[test]
    fn decode_past_the_window() {
        check(5, &[1; 23]);
    }

    #[test]
    fn one_prefill_longer_than_the_window_then_decode() {
        check(5, &[17, 1, 1, 1, 1, 1, 1, 1]);
    }

    #[test]
    fn chunks_crossing_the_window_mixed_with_decode() {
        check(5, &[3, 1, 4, 1, 1, 7, 2, 1, 1, 1, 1, 1, 12, 1, 2]);
        check(8, &[3, 3, 3, 3, 1, 1, 9, 1]);
    }

    /// Positions `pos..pos + l` through `cache`, checked against naive
    /// attention over `k_all`/`v_all`.
    fn feed(
        cache: &mut LayerCache,
        k_all: &[f32],
        v_all: &[f32],
        pos: usize,
        l: usize,
        window: usize,
        seed: u64,
    ) {
        let d = 4usize;
        let q = values(l * d, seed);
        let qa = Array::from_slice(&q, &[1, 1, l as i32, d as i32]);
        let ka = Array::from_slice(&k_all[pos * d..(pos + l) * d], &[1, 1, l as i32, d as i32]);
        let va = Array::from_slice(&v_all[pos * d..(pos + l) * d], &[1, 1, l as i32, d as i32]);
        let (k, v, mask) = cache.update(&ka, &va).unwrap();
        let out = attend(&qa, &k, &v, 0.5, &mask).unwrap();
        let want = naive(&q, k_all, v_all, d, pos..pos + l, window);
        for (a, b) in out.as_slice::<f32>().iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "at {pos} (len {l}): {a} vs {b}");
        }
    }

    /// Trimming goes back to a position and continues with other keys as
    /// if the dropped positions had never been there; a trim that needs
    /// positions the window has dropped is refused without change.
    #[test]
    fn trim_then_continue_differently() {
        let (window, d) = (5usize, 4usize);
        for full in [false, true] {
            let w = if full { None } else { Some(window) };
            let eff = if full { usize::MAX / 2 } else { window };
            let old_k = values(20 * d, 1);
            let old_v = values(20 * d, 2);
            let mut cache = LayerCache::new(w);
            feed(&mut cache, &old_k, &old_v, 0, 7, eff, 10);
            for p in 7..10 {
                feed(&mut cache, &old_k, &old_v, p, 1, eff, 10 + p as u64);
            }
            if !full {
                // Held: positions 5..10; position 8 needs 4..8.
                assert!(!cache.trim_to(8).unwrap());
                assert_eq!(cache.offset(), 10);
            }
            assert!(!cache.trim_to(11).unwrap());
            // Back to 9, then new keys from there.
            let cut: usize = if full { 6 } else { 9 };
            assert!(cache.trim_to(cut as i32).unwrap());
            assert_eq!(cache.offset(), cut as i32);
            let mut new_k = old_k[..cut * d].to_vec();
            new_k.extend(values((20 - cut) * d, 3));
            let mut new_v = old_v[..cut * d].to_vec();
            new_v.extend(values((20 - cut) * d, 4));
            feed(&mut cache, &new_k, &new_v, cut, 3, eff, 40);
            for p in cut + 3..cut + 8 {
                feed(&mut cache, &new_k, &new_v, p, 1, eff, 50 + p as u64);
            }
        }
        // A cache that never filled its window trims anywhere.
        let k = values(20 * d, 5);
        let v = values(20 * d, 6);
        let mut cache = LayerCache::new(Some(window));
        feed(&mut cache, &k, &v, 0, 4, window, 60);
        assert!(cache.trim_to(1).unwrap());
        let mut k2 = k[..d].to_vec();
        k2.extend(values(19 * d, 7));
        let mut v2 = v[..d].to_vec();
        v2.extend(values(19 * d, 8));
        for p in 1..9 {
            feed(&mut cache, &k2, &v2, p, 1, window, 70 + p as u64);
        }
    }

    #[test]
    fn window_of_one_sees_only_itself() {
        check(1, &[4, 1, 1, 3, 1]);
    }
}

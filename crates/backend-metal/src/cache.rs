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
//!
//! A slice update is a new array: MLX writes it into the old cache's buffer
//! only where nothing else holds that buffer, and otherwise copies the whole
//! cache first. While a decode step is still running on the device, the
//! kernels reading its cache hold the buffer, so a pipelined decode (the
//! next step queued before the last one finishes) can pay that copy every
//! step. [`KvCache::write_in_place`] lets a kernel write a step's keys and
//! values straight into the buffer instead, where no other cache or view can
//! see the positions written.

use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::ops::{concatenate, zeros_dtype};
use mlx_rs::Array;

type Result<T> = std::result::Result<T, Exception>;

/// The growing cache of one attention layer; arrays are `[B, H_kv, T, D]`.
///
/// Cloning is cheap (MLX arrays are shared, immutable values): a clone
/// that is updated leaves the original as it was.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    keys: Option<Array>,
    values: Option<Array>,
    offset: i32,
    /// Positions of the buffers that views handed out, clones or the
    /// arrays' first owner may see: every position below is off limits to
    /// [`KvCache::write_in_place`].
    seen: i32,
    /// Shared by the clones that share the buffers: a write in place needs
    /// it unshared.
    buffers: std::sync::Arc<()>,
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
        self.make_room(len, keys, values)?;
        self.offset = prev + len;
        let end = self.offset;
        let (Some(k), Some(v)) = (self.keys.as_mut(), self.values.as_mut()) else {
            return Err(Exception::custom("KV cache has no storage after growing"));
        };
        *k = write_positions(k, keys, prev)?;
        *v = write_positions(v, values, prev)?;
        let out = (k.index((.., .., ..end, ..)), v.index((.., .., ..end, ..)));
        // A slice update's result is a buffer of its own (MLX copied the
        // old one wherever something else held it).
        self.own_buffers();
        self.seen = end;
        Ok(out)
    }

    /// Grows the buffers (shaped and typed like `keys`/`values`) until
    /// `len` more positions fit.
    fn make_room(&mut self, len: i32, keys: &Array, values: &Array) -> Result<()> {
        let prev = self.offset;
        let capacity = self.keys.as_ref().map_or(0, |k| k.dim(2));
        if prev + len <= capacity {
            return Ok(());
        }
        let (b, h, dk) = (keys.dim(0), keys.dim(1), keys.dim(3));
        let dv = values.dim(3);
        let room = growth_room(prev, len, kv_pad());
        let grow_k = zeros_dtype(&[b, h, room, dk], keys.dtype())?;
        let grow_v = zeros_dtype(&[b, h, room, dv], values.dtype())?;
        // Unfilled room is dropped before growing, so the new room is whole
        // steps past the offset.
        self.keys = Some(extended(self.keys.take(), prev, grow_k)?);
        self.values = Some(extended(self.values.take(), prev, grow_v)?);
        // New buffers, nobody else's; the positions kept were seen.
        self.own_buffers();
        self.seen = prev;
        Ok(())
    }

    /// Marks the buffers as this cache's alone (new ones, which no clone
    /// shares): a new token only where a clone holds the old one, so that
    /// a decode step allocates nothing here.
    fn own_buffers(&mut self) {
        if std::sync::Arc::get_mut(&mut self.buffers).is_none() {
            self.buffers = std::sync::Arc::new(());
        }
    }

    /// Adds `len` positions that `write` puts straight into the buffers:
    /// `write(keys, values, at)` gets the whole `[B, H_kv, capacity, D]`
    /// arrays and must write positions `at..at + len` of them in place,
    /// ahead of whatever reads its result (a device kernel whose output
    /// the attention then reads). Returns the keys and values to attend
    /// (positions `0..at + len`) and `write`'s result; `None`, with nothing
    /// changed or called, where the cache is empty or where positions
    /// `at..` of its buffers might be visible elsewhere (a clone sharing
    /// them, views handed out before a trim, arrays taken from outside),
    /// and the caller then takes [`KvCache::update`]. Growth, where
    /// needed, happens first, as in `update`.
    ///
    /// The buffers are arrays the cache made itself (a growth's
    /// concatenation or a slice update's result), so they are row-major.
    pub fn write_in_place<R>(
        &mut self,
        len: i32,
        write: impl FnOnce(&Array, &Array, i32) -> Result<R>,
    ) -> Result<Option<(Array, Array, R)>> {
        let (Some(capacity), true) = (self.keys.as_ref().map(|k| k.dim(2)), self.values.is_some())
        else {
            return Ok(None);
        };
        let at = self.offset;
        let grows = at + len > capacity;
        // Growth makes new buffers, which nothing else holds.
        let unshared = grows || std::sync::Arc::get_mut(&mut self.buffers).is_some();
        if len < 1 || !unshared || (!grows && at < self.seen) {
            return Ok(None);
        }
        if grows {
            // The buffers are the shape and type templates of their growth
            // (handles cloned only then: a step without growth allocates
            // nothing here).
            if let (Some(k), Some(v)) = (self.keys.clone(), self.values.clone()) {
                self.make_room(len, &k, &v)?;
            }
        }
        let (Some(k), Some(v)) = (self.keys.as_ref(), self.values.as_ref()) else {
            return Err(Exception::custom("KV cache has no storage after growing"));
        };
        let out = write(k, v, at)?;
        let end = at + len;
        let (k, v) = (k.index((.., .., ..end, ..)), v.index((.., .., ..end, ..)));
        self.offset = end;
        Ok(Some((k, v, out)))
    }
}

impl KvCache {
    /// A cache holding exactly `keys`/`values` `[B, H_kv, T, D]` (positions
    /// `0..T`); the next update grows it.
    pub fn from_contents(keys: Array, values: Array) -> Self {
        let offset = keys.dim(2);
        Self {
            keys: Some(keys),
            values: Some(values),
            offset,
            // Arrays from outside: never written in place.
            seen: offset,
            buffers: std::sync::Arc::new(()),
        }
    }

    /// The positions held, `[B, H_kv, offset, D]` each; `None` when empty.
    pub fn contents(&self) -> Option<(Array, Array)> {
        // Views of positions below the offset: in-place writes land at the
        // offset or past it, and a trim marks what it drops as seen.
        let end = self.offset;
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) if end > 0 => {
                Some((k.index((.., .., ..end, ..)), v.index((.., .., ..end, ..))))
            }
            _ => None,
        }
    }

    /// Bytes the next single-position update allocates (a growth step, or
    /// nothing while there is room).
    fn growth(&self) -> u64 {
        let capacity = self.keys.as_ref().map_or(0, |k| k.dim(2));
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) if self.offset + 1 > capacity => {
                let room = Self::STEP + 2 * kv_pad();
                step_bytes(k, room) + step_bytes(v, room)
            }
            _ => 0,
        }
    }

    /// Forgets every position from `n` on; `false` (and no change) when the
    /// cache holds fewer than `n` positions.
    pub fn trim_to(&mut self, n: i32) -> bool {
        if n < 0 || n > self.offset {
            return false;
        }
        // Room past the offset is overwritten by the next update and never
        // returned before. The positions dropped may have been handed out,
        // so they are not written in place.
        self.seen = self.seen.max(self.offset);
        self.offset = n;
        true
    }

    /// The cache's arrays (for evaluation between prefill chunks).
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.keys.iter().chain(self.values.iter())
    }
}

/// Extra positions added to each growth of a [`KvCache`] so that its
/// capacity is never a multiple of [`KvCache::STEP`] (`INFER_KV_PAD`, 0 by
/// default). MLX's CUDA backend sends a one-query attention over a slice of a
/// cache whose capacity is a multiple of 256 to cuDNN rather than to its
/// vector kernel; the padding keeps decode steps on the vector kernel. An
/// experiment, kept off: on an H100 it did not speed up Qwen3-4B's decode
/// and was slower over 8,192 positions (docs/benchmarks.md).
fn kv_pad() -> i32 {
    static PAD: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *PAD.get_or_init(|| {
        std::env::var("INFER_KV_PAD")
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|p| (0..=256).contains(p))
            .unwrap_or(0)
    })
}

/// Positions a [`KvCache`] holding `prev` (its capacity, full) adds for
/// `len` more: whole steps, plus `pad` (and `pad` again where the new
/// capacity would still be a multiple of [`KvCache::STEP`]).
fn growth_room(prev: i32, len: i32, pad: i32) -> i32 {
    let steps = (len + KvCache::STEP - 1) / KvCache::STEP;
    let room = steps * KvCache::STEP + pad;
    if pad > 0 && (prev + room) % KvCache::STEP == 0 {
        room + pad
    } else {
        room
    }
}

/// The first `keep` positions of `old` `[B, H, T, D]` (if any) followed by
/// `room`: a grown cache buffer.
fn extended(old: Option<Array>, keep: i32, room: Array) -> Result<Array> {
    match old {
        Some(old) => concatenate(&[old.index((.., .., ..keep, ..)), room], 2),
        None => Ok(room),
    }
}

/// Bytes of `steps` more positions of `a` `[B, H, T, D]`.
pub(crate) fn step_bytes(a: &Array, steps: i32) -> u64 {
    let per_position = a.nbytes() as u64 / u64::try_from(a.dim(2).max(1)).unwrap_or(1);
    per_position * u64::try_from(steps.max(0)).unwrap_or(0)
}

/// `cache` `[B, H, T, D]` with `new` `[B, H, L, D]` written at positions
/// `at..at + L`.
pub(crate) fn write_positions(cache: &Array, new: &Array, at: i32) -> Result<Array> {
    let s = cache.shape();
    let l = new.dim(2);
    crate::ffi::slice_update(cache, new, &[0, 0, at, 0], &[s[0], s[1], at + l, s[3]])
}

/// The mask attention applies to the keys a cache returns.
#[derive(Debug, Clone)]
pub enum AttnMask {
    /// Every key is visible (a single query after all cached keys).
    None,
    /// Causal, aligned to the bottom right (queries are the last positions).
    Causal,
    /// An explicit boolean mask (true = attend), `[L, K]` or, for a batch,
    /// `[B, 1, L, K]`.
    Array(Array),
}

/// How a rotating cache bounds a layer's context: it holds `window`
/// positions, of which the first `sinks` positions of the sequence are never
/// dropped (attention sinks, after StreamingLLM, as mlx-lm's `keep`) and the
/// rest are the most recent ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Positions held (at least 1, and more than `sinks`).
    pub window: usize,
    /// Leading positions never dropped.
    pub sinks: usize,
}

impl Rotation {
    /// A sliding window of `window` positions without sinks (transformers'
    /// sliding-window attention).
    pub fn sliding(window: usize) -> Self {
        Self { window, sinks: 0 }
    }
}

/// A cache that keeps the first `sinks` positions and the last
/// `window − sinks`.
///
/// Query position `p` attends key position `j ≤ p` when `j < sinks` or
/// `p − (window − sinks) < j`. Storage is `window` slots: the sinks in the
/// first slots, then a ring of the recent positions. While it is not full,
/// slots hold positions in order; once full, a decode step overwrites the
/// oldest recent slot (the order of keys does not matter to attention without
/// a mask, and every slot is then inside the window). A chunk of several
/// queries reads the slots back in temporal order, attends them plus its own
/// keys under an explicit mask, and leaves the sinks and the last positions
/// in order.
#[derive(Debug, Clone)]
pub struct RotatingKvCache {
    window: i32,
    sinks: i32,
    keys: Option<Array>,
    values: Option<Array>,
    /// Valid slots (≤ window).
    len: i32,
    /// The oldest recent slot (the next to overwrite) once full; `sinks`
    /// when the slots are in temporal order.
    next: i32,
    /// Positions seen so far.
    offset: i32,
}

impl RotatingKvCache {
    /// A cache bounded by `rotation`; `sinks` is cut to `window − 1` so that
    /// at least one recent position fits.
    pub fn with_sinks(rotation: Rotation) -> Self {
        let window = i32::try_from(rotation.window.max(1)).unwrap_or(i32::MAX);
        let sinks = i32::try_from(rotation.sinks)
            .unwrap_or(i32::MAX)
            .min(window - 1);
        Self {
            window,
            sinks,
            keys: None,
            values: None,
            len: 0,
            next: sinks,
            offset: 0,
        }
    }

    /// A cache bounded by `rotation` holding `keys`/`values` `[B, H_kv, T,
    /// D]` in temporal order: the sinks `0..min(sinks, offset)`, then the
    /// last `T − that` positions before `offset` (at least the last
    /// `window − sinks − 1`, which the next query attends, and at most
    /// `window` slots in all).
    pub fn from_contents(rotation: Rotation, keys: Array, values: Array, offset: i32) -> Self {
        let mut cache = Self::with_sinks(rotation);
        cache.len = keys.dim(2);
        cache.keys = Some(keys);
        cache.values = Some(values);
        cache.offset = offset;
        cache
    }

    /// The sinks held and every valid slot in temporal order (the sinks,
    /// then the recent positions up to the offset); `None` when empty.
    pub fn contents(&self) -> Result<Option<(i32, Array, Array)>> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) if self.len > 0 => Ok(Some((
                self.sinks_held(),
                self.ordered(k)?,
                self.ordered(v)?,
            ))),
            _ => Ok(None),
        }
    }

    /// Bytes the next single-position update allocates.
    fn growth(&self) -> u64 {
        let capacity = self.keys.as_ref().map_or(0, |k| k.dim(2));
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) if self.len < self.window && self.len + 1 > capacity => {
                let grow = KvCache::STEP.min(self.window - capacity).max(1);
                step_bytes(k, grow) + step_bytes(v, grow)
            }
            _ => 0,
        }
    }

    /// Positions seen so far.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Sink positions held (all of `0..min(sinks, offset)`, always).
    fn sinks_held(&self) -> i32 {
        self.sinks.min(self.offset)
    }

    /// Recent positions a query may attend besides the sinks.
    fn recent_window(&self) -> i32 {
        self.window - self.sinks
    }

    /// The valid slots in temporal order.
    fn ordered(&self, a: &Array) -> Result<Array> {
        let valid = a.index((.., .., ..self.len, ..));
        if self.len < self.window || self.next == self.sinks {
            return Ok(valid);
        }
        let mut parts = Vec::with_capacity(3);
        if self.sinks > 0 {
            parts.push(a.index((.., .., ..self.sinks, ..)));
        }
        parts.push(a.index((.., .., self.next.., ..)));
        parts.push(a.index((.., .., self.sinks..self.next, ..)));
        concatenate(&parts, 2)
    }

    /// Appends `keys`/`values` `[B, H_kv, L, D]`; returns what the new queries
    /// attend and the mask.
    pub fn update(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array, AttnMask)> {
        let l = keys.dim(2);
        if l == 1 {
            return self.update_one(keys, values);
        }
        // Context from the cache: the sinks, and the last `recent − 1`
        // positions at most (the first new query needs no more).
        let sinks_held = self.sinks_held();
        let recent_held = self.len - sinks_held;
        let m = recent_held.min(self.recent_window() - 1);
        let (all_k, all_v) = match (&self.keys, &self.values) {
            (Some(k), Some(v)) if sinks_held + m > 0 => {
                let join = |a: &Array, new: &Array| -> Result<Array> {
                    let a = self.ordered(a)?;
                    let mut parts = Vec::with_capacity(3);
                    if sinks_held > 0 {
                        parts.push(a.index((.., .., ..sinks_held, ..)));
                    }
                    if m > 0 {
                        parts.push(a.index((.., .., self.len - m.., ..)));
                    }
                    parts.push(new.clone());
                    concatenate(&parts, 2)
                };
                (join(k, keys)?, join(v, values)?)
            }
            _ => (keys.clone(), values.clone()),
        };
        let key_positions: Vec<i32> = (0..sinks_held)
            .chain(self.offset - m..self.offset + l)
            .collect();
        let mask = rotation_mask(
            self.offset,
            l,
            &key_positions,
            self.sinks,
            self.recent_window(),
        )?;
        // Keep the sinks and the last positions, in order.
        let total = sinks_held + m + l;
        let new_offset = self.offset + l;
        let sinks_after = self.sinks.min(new_offset);
        let keep = (total - sinks_after).min(self.window - sinks_after);
        let (k, v) = if sinks_after + keep == total {
            (all_k.clone(), all_v.clone())
        } else {
            let cut = |a: &Array| -> Result<Array> {
                let tail = a.index((.., .., total - keep.., ..));
                if sinks_after == 0 {
                    Ok(tail)
                } else {
                    concatenate(&[a.index((.., .., ..sinks_after, ..)), tail], 2)
                }
            };
            (cut(&all_k)?, cut(&all_v)?)
        };
        self.keys = Some(k);
        self.values = Some(v);
        self.len = sinks_after + keep;
        self.next = self.sinks;
        self.offset = new_offset;
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
                self.keys = Some(extended(self.keys.take(), self.len, gk)?);
                self.values = Some(extended(self.values.take(), self.len, gv)?);
            }
            let slot = self.len;
            self.write(slot, keys, values)?;
            self.len += 1;
        } else {
            let slot = self.next;
            self.write(slot, keys, values)?;
            self.next = self.sinks + (self.next - self.sinks + 1) % self.recent_window();
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
    /// (the sinks before `n`, and the last `window − sinks − 1` positions
    /// before `n`, in order). `Ok(false)` and no change when the cache no
    /// longer holds those positions or holds fewer than `n`.
    pub fn trim_to(&mut self, n: i32) -> Result<bool> {
        if n < 0 || n > self.offset {
            return Ok(false);
        }
        if n == self.offset {
            return Ok(true);
        }
        let sinks_held = self.sinks_held();
        let recent_from = self.offset - (self.len - sinks_held);
        let sinks_after = self.sinks.min(n);
        let need_from = self.sinks.max(n - (self.recent_window() - 1));
        let need_recent = need_from < n;
        if need_recent && recent_from > need_from {
            return Ok(false);
        }
        let (Some(k), Some(v)) = (&self.keys, &self.values) else {
            return Ok(false);
        };
        let cut = |a: &Array| -> Result<Array> {
            let a = self.ordered(a)?;
            let head = a.index((.., .., ..sinks_after, ..));
            if !need_recent {
                return Ok(head);
            }
            let at = |p: i32| sinks_held + (p - recent_from);
            let tail = a.index((.., .., at(need_from)..at(n), ..));
            if sinks_after == 0 {
                Ok(tail)
            } else {
                concatenate(&[head, tail], 2)
            }
        };
        let (k, v) = (cut(k)?, cut(v)?);
        self.keys = Some(k);
        self.values = Some(v);
        self.len = sinks_after + if need_recent { n - need_from } else { 0 };
        self.next = self.sinks;
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

/// What [`rotation_mask`] builds a mask from.
#[derive(PartialEq)]
struct MaskKey {
    first: i32,
    l: i32,
    sinks: i32,
    recent: i32,
    key_positions: Vec<i32>,
}

thread_local! {
    /// The last mask [`rotation_mask`] built on this thread, and what from.
    /// Every sliding-window layer of a pass asks for the same mask (their
    /// caches hold the same positions), so the pass builds it once rather
    /// than once per layer: for Gemma 3, 22 of 26 layers, about ten graph
    /// nodes and two uploads each, and host time per node is what bounds
    /// small models on a GPU. MLX arrays are immutable, so sharing one is
    /// safe.
    static LAST_MASK: std::cell::RefCell<Option<(MaskKey, Array)>> =
        const { std::cell::RefCell::new(None) };
}

/// The boolean mask `[l, K]` of `l` queries at positions `first..first + l`
/// over keys at `key_positions`: query `p` attends key `j` when `j ≤ p` and
/// either `j < sinks` or `p − recent < j` (the last one built, where it was
/// built from the same values).
fn rotation_mask(
    first: i32,
    l: i32,
    key_positions: &[i32],
    sinks: i32,
    recent: i32,
) -> Result<Array> {
    let same = |k: &MaskKey| {
        (k.first, k.l, k.sinks, k.recent) == (first, l, sinks, recent)
            && k.key_positions == key_positions
    };
    if let Some(mask) = LAST_MASK.with_borrow(|last| {
        last.as_ref()
            .filter(|(k, _)| same(k))
            .map(|(_, m)| m.clone())
    }) {
        return Ok(mask);
    }
    let mask = build_rotation_mask(first, l, key_positions, sinks, recent)?;
    let key = MaskKey {
        first,
        l,
        sinks,
        recent,
        key_positions: key_positions.to_vec(),
    };
    LAST_MASK.set(Some((key, mask.clone())));
    Ok(mask)
}

/// [`rotation_mask`], built afresh.
fn build_rotation_mask(
    first: i32,
    l: i32,
    key_positions: &[i32],
    sinks: i32,
    recent: i32,
) -> Result<Array> {
    let n = key_positions.len() as i32;
    let q = Array::from_iter(first..first + l, &[l, 1]);
    let k = Array::from_slice(key_positions, &[1, n]);
    let causal = k.le(&q)?;
    let recent_ok = k.gt(&q.subtract(Array::from_int(recent))?)?;
    let visible = if sinks > 0 {
        recent_ok.logical_or(&k.lt(Array::from_int(sinks))?)?
    } else {
        recent_ok
    };
    causal.logical_and(&visible)
}

/// The positions of the first new token of each row, as RoPE takes them.
#[derive(Debug, Clone)]
pub enum Positions {
    /// Every row starts at the same position.
    Start(i32),
    /// Row `b` starts at element `b` (`[B]`, int32).
    Rows(Array),
}

impl Positions {
    /// The positions `by` further on.
    pub fn shifted(&self, by: i32) -> Result<Positions> {
        Ok(match self {
            _ if by == 0 => self.clone(),
            Positions::Start(p) => Positions::Start(p + by),
            Positions::Rows(a) => Positions::Rows(a.add(Array::from_int(by))?),
        })
    }
}

/// The cache of one attention layer.
#[derive(Debug, Clone)]
pub enum LayerCache {
    /// Every position.
    Full(KvCache),
    /// The last `window` positions.
    Rotating(RotatingKvCache),
    /// No storage: one forward pass over whole sequences starting at
    /// position 0, under a mask of their own (see [`LayerCache::one_shot`]
    /// and [`LayerCache::pass`]).
    OneShot {
        /// The mask of the pass.
        mask: AttnMask,
        /// Whether the pass has run (a second pass is refused).
        used: bool,
    },
    /// One layer of a running batch (rows at positions of their own; see
    /// [`crate::batch_kv`]).
    Batch(crate::batch_kv::BatchLayer),
}

impl LayerCache {
    /// A cache keeping every position, or the positions `rotation` keeps.
    pub fn new(rotation: Option<Rotation>) -> Self {
        match rotation {
            Some(r) => LayerCache::Rotating(RotatingKvCache::with_sinks(r)),
            None => LayerCache::Full(KvCache::new()),
        }
    }

    /// A cache-less layer for one forward pass of `[B, L]` ids at positions
    /// `0..L`: the keys and values of the pass are attended under `mask`
    /// `[B, 1, L, L]` and nothing is kept.
    pub fn one_shot(mask: Array) -> Self {
        LayerCache::OneShot {
            mask: AttnMask::Array(mask),
            used: false,
        }
    }

    /// A cache-less layer for one forward pass of `l` positions from 0
    /// (training: nothing is kept, and the pass's keys and values are
    /// attended directly, with no copy into a cache): causal, within the
    /// positions `rotation` would keep where the layer has a window.
    pub fn pass(l: i32, rotation: Option<Rotation>) -> Result<Self> {
        let mask = match rotation {
            Some(r) if l > r.window as i32 => {
                let positions: Vec<i32> = (0..l).collect();
                let sinks = r.sinks as i32;
                // Built afresh, never shared: training may build it inside
                // a compiled step's trace.
                AttnMask::Array(build_rotation_mask(
                    0,
                    l,
                    &positions,
                    sinks,
                    r.window as i32 - sinks,
                )?)
            }
            _ => AttnMask::Causal,
        };
        Ok(LayerCache::OneShot { mask, used: false })
    }

    /// A fresh copy of a cache-less layer (the same mask, not yet used), to
    /// run the same pass again; `None` for caches that store positions.
    pub fn pass_copy(&self) -> Option<LayerCache> {
        match self {
            LayerCache::OneShot { mask, .. } => Some(LayerCache::OneShot {
                mask: mask.clone(),
                used: false,
            }),
            LayerCache::Full(_) | LayerCache::Rotating(_) | LayerCache::Batch(_) => None,
        }
    }

    /// The rotation this cache applies (`None` for every position).
    pub fn rotation(&self) -> Option<Rotation> {
        match self {
            LayerCache::Rotating(c) => Some(Rotation {
                window: usize::try_from(c.window).ok()?,
                sinks: usize::try_from(c.sinks).ok()?,
            }),
            LayerCache::Full(_) | LayerCache::OneShot { .. } | LayerCache::Batch(_) => None,
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
            LayerCache::OneShot { .. } | LayerCache::Batch(_) => Ok(false),
        }
    }

    /// Positions seen so far (the RoPE offset of the next token) of a
    /// one-sequence cache; 0 for a cache-less pass and for a batch layer,
    /// whose rows each have their own (see [`positions`](Self::positions)).
    pub fn offset(&self) -> i32 {
        match self {
            LayerCache::Full(c) => c.offset(),
            LayerCache::Rotating(c) => c.offset(),
            LayerCache::OneShot { .. } | LayerCache::Batch(_) => 0,
        }
    }

    /// Splits a cache of `rows` sequences (a prefill of several prompts of
    /// one length at once) into one cache per sequence.
    pub fn split_rows(&self, rows: usize) -> Result<Vec<LayerCache>> {
        let row = |a: &Array, r: usize| a.index(r as i32..r as i32 + 1);
        match self {
            LayerCache::Full(c) => {
                let (k, v) = c
                    .contents()
                    .ok_or_else(|| Exception::custom("splitting an empty cache"))?;
                Ok((0..rows)
                    .map(|r| LayerCache::Full(KvCache::from_contents(row(&k, r), row(&v, r))))
                    .collect())
            }
            LayerCache::Rotating(c) => {
                let (_, k, v) = c
                    .contents()?
                    .ok_or_else(|| Exception::custom("splitting an empty cache"))?;
                let rotation = Rotation {
                    window: usize::try_from(c.window).unwrap_or(1),
                    sinks: usize::try_from(c.sinks).unwrap_or(0),
                };
                Ok((0..rows)
                    .map(|r| {
                        LayerCache::Rotating(RotatingKvCache::from_contents(
                            rotation,
                            row(&k, r),
                            row(&v, r),
                            c.offset,
                        ))
                    })
                    .collect())
            }
            LayerCache::OneShot { .. } | LayerCache::Batch(_) => Err(Exception::custom(
                "only one-sequence caches split into rows",
            )),
        }
    }

    /// The position of the next token of each row, for RoPE.
    pub fn positions(&self) -> Result<Positions> {
        match self {
            LayerCache::Batch(c) => c.positions(),
            _ => Ok(Positions::Start(self.offset())),
        }
    }

    /// Bytes the cache's arrays hold.
    pub fn bytes(&self) -> u64 {
        self.arrays().iter().map(|a| a.nbytes() as u64).sum()
    }

    /// Bytes the next single-position update allocates.
    pub fn growth(&self) -> u64 {
        match self {
            LayerCache::Full(c) => c.growth(),
            LayerCache::Rotating(c) => c.growth(),
            LayerCache::OneShot { .. } | LayerCache::Batch(_) => 0,
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
            LayerCache::Batch(c) => c.update(keys, values),
            LayerCache::OneShot { mask, used } => {
                if std::mem::replace(used, true) {
                    return Err(Exception::custom(
                        "a one-shot layer cache takes a single forward pass",
                    ));
                }
                Ok((keys.clone(), values.clone(), mask.clone()))
            }
        }
    }

    /// The cache's arrays (for evaluation between prefill chunks).
    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            LayerCache::Full(c) => c.arrays().collect(),
            LayerCache::Rotating(c) => c.arrays().collect(),
            LayerCache::Batch(c) => c.arrays().collect(),
            LayerCache::OneShot { .. } => Vec::new(),
        }
    }
}

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

/// `[B, H, L, D]` attention of queries on keys/values under `mask`, scaled.
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

    /// The shared mask is handed out only for the values it was built from:
    /// interleaved requests each get their own rule's mask.
    #[test]
    fn a_shared_rotation_mask_matches_its_request() {
        let cases: [(i32, i32, Vec<i32>, i32, i32); 3] = [
            (4, 3, (0..7).collect(), 0, 4),
            (4, 3, (0..7).collect(), 1, 3),
            (9, 2, vec![0, 5, 6, 7, 8, 9, 10], 1, 4),
        ];
        for round in 0..2 {
            for (first, l, keys, sinks, recent) in cases.iter().chain(cases.iter().rev()) {
                let got = rotation_mask(*first, *l, keys, *sinks, *recent).unwrap();
                let want = build_rotation_mask(*first, *l, keys, *sinks, *recent).unwrap();
                let (got, want) = (
                    got.as_dtype(mlx_rs::Dtype::Int32).unwrap(),
                    want.as_dtype(mlx_rs::Dtype::Int32).unwrap(),
                );
                assert_eq!(
                    got.as_slice::<i32>(),
                    want.as_slice::<i32>(),
                    "round {round}: {first} {l} {keys:?} {sinks} {recent}"
                );
            }
        }
    }

    /// With padding, growth leaves room for the update and never a
    /// capacity that is a multiple of the step; without, whole steps.
    #[test]
    fn padded_growth_never_lands_on_a_step() {
        assert_eq!(growth_room(0, 3, 0), KvCache::STEP);
        assert_eq!(growth_room(304, 300, 0), 2 * KvCache::STEP);
        for pad in [1, 8, 64] {
            let mut capacity = 0;
            for len in [1, 128, 1, 300, 1, 2048, 1] {
                for _ in 0..40 {
                    let room = growth_room(capacity, len, pad);
                    assert!(room >= len);
                    capacity += room;
                    assert_ne!(capacity % KvCache::STEP, 0, "pad {pad}");
                }
            }
        }
    }

    /// A write in place is offered only where nothing else can see the
    /// positions written: not to an empty cache, a cache sharing its
    /// buffers with a clone, positions a trim dropped, or arrays taken from
    /// outside before they grow.
    #[test]
    fn writes_in_place_only_where_nothing_else_sees() {
        let kv = |len: i32| {
            let a = Array::from_slice(&vec![1f32; (2 * len * 2) as usize], &[1, 2, len, 2]);
            (a.clone(), a)
        };
        let mut calls = Vec::new();
        let mut write = |cache: &mut KvCache| {
            cache
                .write_in_place(1, |k, v, at| {
                    // The whole buffers, with room for the position.
                    assert!(k.dim(2) > at && v.dim(2) > at);
                    calls.push(at);
                    Ok(at)
                })
                .unwrap()
                .map(|(k, v, at)| (k.shape().to_vec(), v.dim(2), at))
        };
        let mut cache = KvCache::new();
        assert_eq!(write(&mut cache), None, "empty");
        let (k, v) = kv(3);
        cache.update(&k, &v).unwrap();
        assert_eq!(write(&mut cache), Some((vec![1, 2, 4, 2], 4, 3)));
        assert_eq!(write(&mut cache), Some((vec![1, 2, 5, 2], 5, 4)));
        assert_eq!(cache.offset(), 5);
        let clone = cache.clone();
        assert_eq!(write(&mut cache), None, "a clone shares the buffers");
        assert_eq!(cache.offset(), 5);
        drop(clone);
        assert_eq!(write(&mut cache).map(|w| w.2), Some(5));
        assert!(cache.trim_to(2));
        assert_eq!(write(&mut cache), None, "positions 2..6 were handed out");
        let (k, v) = kv(1);
        cache.update(&k, &v).unwrap();
        assert_eq!(
            write(&mut cache).map(|w| w.2),
            Some(3),
            "a slice update's own buffer"
        );
        // Up to the capacity, then a growth: new buffers, offered again.
        let capacity = cache.keys.as_ref().unwrap().dim(2);
        while cache.offset() < capacity {
            assert!(write(&mut cache).is_some());
        }
        assert_eq!(write(&mut cache).map(|w| w.2), Some(capacity));
        assert_eq!(
            cache.keys.as_ref().unwrap().dim(2),
            capacity + KvCache::STEP
        );
        // Arrays from outside: only once grown into buffers of its own.
        let (k, v) = kv(4);
        let mut outside = KvCache::from_contents(k.clone(), v);
        assert_eq!(write(&mut outside).map(|w| w.2), Some(4), "grows first");
        let mut outside = KvCache::from_contents(
            concatenate(&[k.clone(), k.clone()], 2).unwrap(),
            concatenate(&[k.clone(), k], 2).unwrap(),
        );
        assert!(outside.trim_to(4));
        assert_eq!(write(&mut outside), None, "room taken from outside");

        assert_eq!(calls.len(), (capacity - 3) as usize + 4 + 1);
    }

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
pub(crate) mod rotating_tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
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

    /// Attention computed naively: query at position `p` attends keys at
    /// positions `j <= p` with `j < sinks` or `p - (window - sinks) < j`.
    pub(crate) fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: usize,
        positions: std::ops::Range<usize>,
        rotation: Rotation,
    ) -> Vec<f32> {
        let (window, sinks) = (rotation.window, rotation.sinks.min(rotation.window - 1));
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = Vec::new();
        for (qi, p) in positions.enumerate() {
            let qv = &q[qi * d..(qi + 1) * d];
            let lo = (p + 1).saturating_sub(window - sinks);
            let seen: Vec<usize> = (0..=p).filter(|&j| j < sinks || j >= lo).collect();
            let scores: Vec<f64> = seen
                .iter()
                .map(|&j| {
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
                let acc: f64 = seen
                    .iter()
                    .copied()
                    .zip(&w)
                    .map(|(j, wj)| wj * v[j * d + t] as f64)
                    .sum();
                out.push((acc / z) as f32);
            }
        }
        out
    }

    fn check(window: usize, chunks: &[usize]) {
        check_rotation(Rotation::sliding(window), chunks);
    }

    fn check_rotation(rotation: Rotation, chunks: &[usize]) {
        let d = 4usize;
        let total: usize = chunks.iter().sum();
        let k_all = values(total * d, 1);
        let v_all = values(total * d, 2);
        let mut cache = LayerCache::new(Some(rotation));
        let mut pos = 0;
        for (c, &l) in chunks.iter().enumerate() {
            let q = values(l * d, 100 + c as u64);
            let qa = Array::from_slice(&q, &[1, 1, l as i32, d as i32]);
            let ka = Array::from_slice(&k_all[pos * d..(pos + l) * d], &[1, 1, l as i32, d as i32]);
            let va = Array::from_slice(&v_all[pos * d..(pos + l) * d], &[1, 1, l as i32, d as i32]);
            let (k, v, mask) = cache.update(&ka, &va).unwrap();
            let out = attend(&qa, &k, &v, 1.0 / (d as f32).sqrt(), &mask).unwrap();
            let got = out.as_slice::<f32>().to_vec();
            let want = naive(&q, &k_all, &v_all, d, pos..pos + l, rotation);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() < 1e-5,
                    "{rotation:?}, chunk {c} (len {l} at {pos}), element {i}: {a} vs {b}"
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

    #[test]
    fn sinks_stay_while_the_rest_rotates() {
        for sinks in [1, 2, 4] {
            let r = Rotation { window: 7, sinks };
            check_rotation(r, &[1; 30]);
            check_rotation(r, &[20, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
            check_rotation(r, &[3, 1, 4, 1, 1, 9, 2, 1, 1, 1, 1, 1, 12, 1, 2, 1, 1]);
            check_rotation(r, &[2, 2, 2, 2, 2, 2, 2, 2, 2, 2]);
        }
        // Sinks are cut to leave one recent position.
        check_rotation(
            Rotation {
                window: 3,
                sinks: 5,
            },
            &[2, 1, 1, 4, 1, 1],
        );
    }

    /// Positions `pos..pos + l` through `cache`, checked against naive
    /// attention over `k_all`/`v_all`.
    fn feed(
        cache: &mut LayerCache,
        k_all: &[f32],
        v_all: &[f32],
        pos: usize,
        l: usize,
        rotation: Rotation,
        seed: u64,
    ) {
        let d = 4usize;
        let q = values(l * d, seed);
        let qa = Array::from_slice(&q, &[1, 1, l as i32, d as i32]);
        let ka = Array::from_slice(&k_all[pos * d..(pos + l) * d], &[1, 1, l as i32, d as i32]);
        let va = Array::from_slice(&v_all[pos * d..(pos + l) * d], &[1, 1, l as i32, d as i32]);
        let (k, v, mask) = cache.update(&ka, &va).unwrap();
        let out = attend(&qa, &k, &v, 0.5, &mask).unwrap();
        let want = naive(&q, k_all, v_all, d, pos..pos + l, rotation);
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
            let w = if full {
                None
            } else {
                Some(Rotation::sliding(window))
            };
            let eff = Rotation::sliding(if full { usize::MAX / 2 } else { window });
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
        let mut cache = LayerCache::new(Some(Rotation::sliding(window)));
        let sliding = Rotation::sliding(window);
        feed(&mut cache, &k, &v, 0, 4, sliding, 60);
        assert!(cache.trim_to(1).unwrap());
        let mut k2 = k[..d].to_vec();
        k2.extend(values(19 * d, 7));
        let mut v2 = v[..d].to_vec();
        v2.extend(values(19 * d, 8));
        for p in 1..9 {
            feed(&mut cache, &k2, &v2, p, 1, sliding, 70 + p as u64);
        }
    }

    /// With sinks, a trim keeps them and the recent positions the next
    /// query needs; it is refused once those have rotated out.
    #[test]
    fn trim_with_sinks() {
        let d = 4usize;
        let r = Rotation {
            window: 8,
            sinks: 2,
        };
        let old_k = values(40 * d, 11);
        let old_v = values(40 * d, 12);
        let mut cache = LayerCache::new(Some(r));
        feed(&mut cache, &old_k, &old_v, 0, 5, r, 1);
        for p in 5..20 {
            feed(&mut cache, &old_k, &old_v, p, 1, r, 100 + p as u64);
        }
        // Held: 0, 1 and 14..20; position 18 needs 13..18.
        assert!(!cache.trim_to(18).unwrap());
        assert_eq!(cache.offset(), 20);
        for cut in [19usize, 1] {
            let mut c = LayerCache::new(Some(r));
            feed(&mut c, &old_k, &old_v, 0, 5, r, 1);
            for p in 5..20 {
                feed(&mut c, &old_k, &old_v, p, 1, r, 100 + p as u64);
            }
            if cut == 1 {
                // Only the sinks before 1 are needed.
                assert!(c.trim_to(1).unwrap());
            } else {
                assert!(c.trim_to(cut as i32).unwrap());
            }
            let mut new_k = old_k[..cut * d].to_vec();
            new_k.extend(values((40 - cut) * d, 13));
            let mut new_v = old_v[..cut * d].to_vec();
            new_v.extend(values((40 - cut) * d, 14));
            feed(&mut c, &new_k, &new_v, cut, 3, r, 200);
            for p in cut + 3..cut + 15 {
                feed(&mut c, &new_k, &new_v, p, 1, r, 300 + p as u64);
            }
        }
    }

    #[test]
    fn window_of_one_sees_only_itself() {
        check(1, &[4, 1, 1, 3, 1]);
    }
}

//! The KV storage of a running batch (continuous batching): rows at
//! positions of their own, joining and leaving between decode steps.
//!
//! Every layer of the batch stores `[B, H_kv, S + C, D]`: `S` sink slots
//! (attention sinks of a context length, else none), then `C` *columns* of
//! recent positions. All rows end at the same column: a decode step writes
//! every row's new key at column `cols`, with one slice update, as a
//! one-sequence cache does; row `b`, holding `n_b` positions, has position
//! `q` at column `q + cols − n_b` (columns before its first are padding).
//! Each step's mask then says, per row, which columns hold its own visible
//! positions (causal, inside its window, not padding), and RoPE takes each
//! row's position from an array.
//!
//! - Joining: a sequence prefilled alone (one-sequence caches, full or
//!   rotating) is copied into a free row, right-aligned; a sequence longer
//!   than the columns pads every row on the left first.
//! - Leaving: the row becomes a hole (masked, its result ignored) that the
//!   next joiner reuses; holes are dropped by [`BatchKv::compact`].
//! - Sliding windows (Gemma 3's local layers, a context length): all rows
//!   end at the same column, so a column older than the window is dead for
//!   every row at once; dead columns are dropped a [`KvCache::STEP`] at a
//!   time (bounded memory, amortised copies). Sink positions still held in
//!   columns move to the sink slots first.
//! - Layers with the same rotation share one layout (`Class`): the same
//!   columns, the same mask.

use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::ops::{concatenate, zeros_dtype};
use mlx_rs::Array;

use crate::cache::{
    step_bytes, write_positions, AttnMask, KvCache, LayerCache, Positions, RotatingKvCache,
    Rotation,
};

type Result<T> = std::result::Result<T, Exception>;

/// What a layer attends with in the current step: set by the batch before
/// each forward pass.
#[derive(Debug, Clone)]
struct StepView {
    mask: AttnMask,
    positions: Positions,
}

/// One layer of a running batch (a [`LayerCache::Batch`]).
#[derive(Debug, Clone)]
pub struct BatchLayer {
    /// Sink slots at the front of the storage.
    sinks: i32,
    keys: Option<Array>,
    values: Option<Array>,
    /// Recent columns in use.
    cols: i32,
    view: Option<StepView>,
}

impl BatchLayer {
    fn storage(&self) -> Result<(&Array, &Array)> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) => Ok((k, v)),
            _ => Err(Exception::custom("a batch layer has no storage")),
        }
    }

    fn view(&self) -> Result<&StepView> {
        self.view
            .as_ref()
            .ok_or_else(|| Exception::custom("a batch layer was used before its step was set"))
    }

    /// Each row's position for this step.
    pub fn positions(&self) -> Result<Positions> {
        Ok(self.view()?.positions.clone())
    }

    /// Writes one new position per row, `[B, H_kv, 1, D]`, at the next
    /// column; returns the keys and values to attend and the step's mask.
    pub fn update(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array, AttnMask)> {
        if keys.dim(2) != 1 {
            return Err(Exception::custom(
                "a running batch takes one position per row and step",
            ));
        }
        let mask = self.view()?.mask.clone();
        let at = self.sinks + self.cols;
        let (k, v) = self.storage()?;
        let (k, v) = if at + 1 > k.dim(2) {
            let grow = |a: &Array| -> Result<Array> {
                let room = zeros_dtype(&[a.dim(0), a.dim(1), KvCache::STEP, a.dim(3)], a.dtype())?;
                concatenate(&[a.index((.., .., ..at, ..)), room], 2)
            };
            (grow(k)?, grow(v)?)
        } else {
            (k.clone(), v.clone())
        };
        let k = write_positions(&k, keys, at)?;
        let v = write_positions(&v, values, at)?;
        let end = at + 1;
        let out = (k.index((.., .., ..end, ..)), v.index((.., .., ..end, ..)));
        self.keys = Some(k);
        self.values = Some(v);
        self.cols += 1;
        Ok((out.0, out.1, mask))
    }

    /// The storage arrays.
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.keys.iter().chain(self.values.iter())
    }

    /// Bytes the next step allocates.
    fn growth(&self) -> u64 {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) if self.sinks + self.cols + 1 > k.dim(2) => {
                step_bytes(k, KvCache::STEP) + step_bytes(v, KvCache::STEP)
            }
            _ => 0,
        }
    }
}

/// Layers that share a rotation, and so columns and masks.
#[derive(Debug)]
struct Class {
    /// `None` keeps every position.
    rotation: Option<Rotation>,
    /// Sink slots (`rotation`'s sinks, cut to leave a recent position).
    sinks: i32,
    layers: Vec<usize>,
    cols: i32,
    /// Per batch row: the sink positions in the sink slots.
    sinks_held: Vec<i32>,
}

impl Class {
    /// Recent positions a query attends besides the sinks (itself included).
    fn recent_window(&self) -> Option<i32> {
        self.rotation
            .map(|r| i32::try_from(r.window).unwrap_or(i32::MAX) - self.sinks)
    }
}

/// What one-sequence caches hold for one layer: the sinks held, and the
/// positions in temporal order (sinks first).
struct Exported {
    sinks: i32,
    keys: Array,
    values: Array,
}

fn export(cache: &LayerCache) -> Result<Exported> {
    let (sinks, keys, values) = match cache {
        LayerCache::Full(c) => {
            let (k, v) = c
                .contents()
                .ok_or_else(|| Exception::custom("an empty cache cannot join a batch"))?;
            (0, k, v)
        }
        LayerCache::Rotating(c) => c
            .contents()?
            .ok_or_else(|| Exception::custom("an empty cache cannot join a batch"))?,
        LayerCache::OneShot { .. } | LayerCache::Batch(_) => {
            return Err(Exception::custom(
                "only one-sequence caches can join a batch",
            ))
        }
    };
    Ok(Exported {
        sinks,
        keys,
        values,
    })
}

/// The rows of a running batch and every layer's storage.
#[derive(Debug)]
pub struct BatchKv {
    layers: Vec<LayerCache>,
    classes: Vec<Class>,
    /// Per batch row: the positions it holds, or `None` for a hole.
    rows: Vec<Option<i32>>,
    /// Whether a new row grows the batch to the next power of two.
    buckets: bool,
}

impl BatchKv {
    /// Makes a new row grow the batch to the next power of two (the rest
    /// of it holes for later joiners), so that the step's shapes change at
    /// a few batch sizes only: on a GPU, MLX compiles kernels for each new
    /// shape, tens of milliseconds that the step waits for.
    pub fn with_buckets(mut self, yes: bool) -> Self {
        self.buckets = yes;
        self
    }

    /// An empty batch for caches shaped like `template` (one model's fresh
    /// one-sequence caches: their rotations decide the layouts).
    pub fn new(template: &[LayerCache]) -> Self {
        let mut classes: Vec<Class> = Vec::new();
        let mut layers = Vec::with_capacity(template.len());
        for (i, cache) in template.iter().enumerate() {
            let rotation = cache.rotation().map(|r| Rotation {
                window: r.window.max(1),
                sinks: r.sinks.min(r.window.max(1) - 1),
            });
            let sinks = rotation.map_or(0, |r| i32::try_from(r.sinks).unwrap_or(0));
            match classes.iter_mut().find(|c| c.rotation == rotation) {
                Some(c) => c.layers.push(i),
                None => classes.push(Class {
                    rotation,
                    sinks,
                    layers: vec![i],
                    cols: 0,
                    sinks_held: Vec::new(),
                }),
            }
            layers.push(LayerCache::Batch(BatchLayer {
                sinks,
                keys: None,
                values: None,
                cols: 0,
                view: None,
            }));
        }
        Self {
            layers,
            classes,
            rows: Vec::new(),
            buckets: false,
        }
    }

    /// The layers, for the model's forward pass (after
    /// [`prepare_step`](Self::prepare_step)).
    pub fn layers_mut(&mut self) -> &mut [LayerCache] {
        &mut self.layers
    }

    /// Batch rows, holes included.
    pub fn slots(&self) -> usize {
        self.rows.len()
    }

    /// Rows that are not holes.
    pub fn live(&self) -> usize {
        self.rows.iter().filter(|r| r.is_some()).count()
    }

    /// Positions row `row` holds, if it is live.
    pub fn positions_of(&self, row: usize) -> Option<i32> {
        self.rows.get(row).copied().flatten()
    }

    fn layer(&self, i: usize) -> Result<&BatchLayer> {
        match &self.layers[i] {
            LayerCache::Batch(l) => Ok(l),
            _ => Err(Exception::custom("a batch holds a non-batch layer")),
        }
    }

    fn layer_mut(&mut self, i: usize) -> Result<&mut BatchLayer> {
        match &mut self.layers[i] {
            LayerCache::Batch(l) => Ok(l),
            _ => Err(Exception::custom("a batch holds a non-batch layer")),
        }
    }

    /// Adds the sequence in `caches` (one per layer, as the model's
    /// `new_caches` made them, prefilled) and returns its batch row: a hole
    /// where there is one, else a new row.
    pub fn join(&mut self, caches: &[LayerCache]) -> Result<usize> {
        if caches.len() != self.layers.len() {
            return Err(Exception::custom("caches of another model cannot join"));
        }
        let n = caches.first().map_or(0, LayerCache::offset);
        let exported: Vec<Exported> = caches.iter().map(export).collect::<Result<_>>()?;
        let row = self
            .rows
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.rows.len());
        let appending = row == self.rows.len();
        // With buckets a new row grows the batch to the next power of two
        // (see `with_buckets`).
        let extra = if appending && self.buckets {
            (self.rows.len() + 1).next_power_of_two() - (self.rows.len() + 1)
        } else {
            0
        } as i32;
        for c in 0..self.classes.len() {
            let first = self.classes[c].layers[0];
            let recent = exported[first].keys.dim(2) - exported[first].sinks;
            if self.classes[c].cols < recent {
                self.grow_left(c, recent - self.classes[c].cols)?;
            }
            let class = &self.classes[c];
            let (cols, sinks) = (class.cols, class.sinks);
            for &l in &class.layers.clone() {
                let e = &exported[l];
                if e.keys.dim(2) - e.sinks != recent || e.sinks > sinks {
                    return Err(Exception::custom("layers of one class hold unlike caches"));
                }
                let rows = self.rows.len() as i32;
                let layer = self.layer_mut(l)?;
                let place = |store: Option<&Array>, new: &Array| -> Result<Array> {
                    let (h, d) = (new.dim(1), new.dim(3));
                    let (mut target, at) = match store {
                        Some(s) if !appending => (s.clone(), row as i32),
                        Some(s) => (zeros_dtype(&[1 + extra, h, s.dim(2), d], new.dtype())?, 0),
                        None => {
                            let alloc = round_up(sinks + cols + 1, KvCache::STEP);
                            (zeros_dtype(&[1 + extra, h, alloc, d], new.dtype())?, 0)
                        }
                    };
                    if e.sinks > 0 {
                        let part = new.index((.., .., ..e.sinks, ..));
                        target = crate::ffi::slice_update(
                            &target,
                            &part,
                            &[at, 0, 0, 0],
                            &[at + 1, h, e.sinks, d],
                        )?;
                    }
                    let part = new.index((.., .., e.sinks.., ..));
                    let start = sinks + cols - recent;
                    target = crate::ffi::slice_update(
                        &target,
                        &part,
                        &[at, 0, start, 0],
                        &[at + 1, h, sinks + cols, d],
                    )?;
                    match store {
                        Some(s) if appending => concatenate(&[s.clone(), target], 0),
                        _ => Ok(target),
                    }
                };
                if layer.keys.is_none() && rows > 0 {
                    return Err(Exception::custom("a batch layer lost its storage"));
                }
                let keys = place(layer.keys.as_ref(), &e.keys)?;
                let values = place(layer.values.as_ref(), &e.values)?;
                layer.keys = Some(keys);
                layer.values = Some(values);
                layer.cols = cols;
            }
            let class = &mut self.classes[c];
            let sh = exported[first].sinks;
            if appending {
                class.sinks_held.push(sh);
                class
                    .sinks_held
                    .extend(std::iter::repeat_n(0, extra as usize));
            } else {
                class.sinks_held[row] = sh;
            }
        }
        if appending {
            self.rows.push(Some(n));
            self.rows.extend(std::iter::repeat_n(None, extra as usize));
        } else {
            self.rows[row] = Some(n);
        }
        Ok(row)
    }

    /// Pads every row of class `c` with `by` columns on the left.
    fn grow_left(&mut self, c: usize, by: i32) -> Result<()> {
        let sinks = self.classes[c].sinks;
        for l in self.classes[c].layers.clone() {
            let layer = self.layer_mut(l)?;
            let pad = |a: &Array| -> Result<Array> {
                let room = zeros_dtype(&[a.dim(0), a.dim(1), by, a.dim(3)], a.dtype())?;
                let mut parts = Vec::with_capacity(3);
                if sinks > 0 {
                    parts.push(a.index((.., .., ..sinks, ..)));
                }
                parts.push(room);
                parts.push(a.index((.., .., sinks.., ..)));
                concatenate(&parts, 2)
            };
            if let (Some(k), Some(v)) = (&layer.keys, &layer.values) {
                let (k, v) = (pad(k)?, pad(v)?);
                layer.keys = Some(k);
                layer.values = Some(v);
            }
            layer.cols += by;
        }
        self.classes[c].cols += by;
        Ok(())
    }

    /// Makes row `row` a hole: its positions are no longer attended or
    /// kept, and the next joiner takes the row.
    pub fn leave(&mut self, row: usize) {
        if let Some(r) = self.rows.get_mut(row) {
            *r = None;
        }
    }

    /// Drops the holes (copying the live rows once); returns each old row's
    /// new index (`None` for the holes). Leading columns that are padding
    /// for every remaining row go too where there are no sink slots.
    pub fn compact(&mut self) -> Result<Vec<Option<usize>>> {
        let keep: Vec<usize> = (0..self.rows.len())
            .filter(|&r| self.rows[r].is_some())
            .collect();
        let mut map = vec![None; self.rows.len()];
        for (new, &old) in keep.iter().enumerate() {
            map[old] = Some(new);
        }
        if keep.len() == self.rows.len() {
            return Ok(map);
        }
        if keep.is_empty() {
            self.clear();
            return Ok(map);
        }
        let index = Array::from_iter(keep.iter().map(|&r| r as i32), &[keep.len() as i32]);
        let rows: Vec<i32> = keep.iter().filter_map(|&r| self.rows[r]).collect();
        for c in 0..self.classes.len() {
            let class = &self.classes[c];
            let drop = if class.sinks == 0 {
                rows.iter()
                    .map(|&n| class.cols - n)
                    .min()
                    .unwrap_or(0)
                    .max(0)
            } else {
                0
            };
            for l in class.layers.clone() {
                let layer = self.layer_mut(l)?;
                let take = |a: &Array| -> Result<Array> {
                    a.index((.., .., drop.., ..)).take_axis(&index, 0)
                };
                if let (Some(k), Some(v)) = (&layer.keys, &layer.values) {
                    let (k, v) = (take(k)?, take(v)?);
                    layer.keys = Some(k);
                    layer.values = Some(v);
                }
                layer.cols -= drop;
            }
            let class = &mut self.classes[c];
            class.cols -= drop;
            class.sinks_held = keep.iter().map(|&r| class.sinks_held[r]).collect();
        }
        self.rows = keep.iter().map(|&r| self.rows[r]).collect();
        Ok(map)
    }

    /// Drops every row and all storage.
    fn clear(&mut self) {
        for layer in &mut self.layers {
            if let LayerCache::Batch(l) = layer {
                l.keys = None;
                l.values = None;
                l.cols = 0;
                l.view = None;
            }
        }
        for class in &mut self.classes {
            class.cols = 0;
            class.sinks_held.clear();
        }
        self.rows.clear();
    }

    /// Readies every layer for one decode step of every row: drops columns
    /// no row will attend again (a [`KvCache::STEP`] at a time), then sets
    /// each class's mask and each row's position.
    pub fn prepare_step(&mut self) -> Result<()> {
        for c in 0..self.classes.len() {
            self.drop_dead(c)?;
            let view = self.view(c)?;
            for l in self.classes[c].layers.clone() {
                self.layer_mut(l)?.view = Some(view.clone());
            }
        }
        Ok(())
    }

    /// Notes that a step wrote one position for every row.
    pub fn finish_step(&mut self) {
        for n in self.rows.iter_mut().flatten() {
            *n += 1;
        }
        for c in &mut self.classes {
            c.cols += 1;
        }
    }

    /// Columns of class `c` no live row will attend again: below every
    /// row's first held position, and (with a window) older than the window
    /// of the next query.
    fn dead_columns(&self, c: usize) -> i32 {
        let class = &self.classes[c];
        let padding = (0..self.rows.len())
            .filter_map(|r| self.rows[r].map(|n| class.cols - n + class.sinks_held[r]))
            .min()
            .unwrap_or(0);
        let window = class.recent_window().map_or(0, |w| class.cols - w + 1);
        padding.max(window).clamp(0, class.cols)
    }

    fn drop_dead(&mut self, c: usize) -> Result<()> {
        let dead = self.dead_columns(c);
        if dead < KvCache::STEP {
            return Ok(());
        }
        self.move_sinks(c)?;
        let dead = self.dead_columns(c);
        let sinks = self.classes[c].sinks;
        for l in self.classes[c].layers.clone() {
            let layer = self.layer_mut(l)?;
            let cut = |a: &Array| -> Result<Array> {
                let tail = a.index((.., .., sinks + dead.., ..));
                if sinks == 0 {
                    Ok(tail)
                } else {
                    concatenate(&[a.index((.., .., ..sinks, ..)), tail], 2)
                }
            };
            if let (Some(k), Some(v)) = (&layer.keys, &layer.values) {
                let (k, v) = (cut(k)?, cut(v)?);
                layer.keys = Some(k);
                layer.values = Some(v);
            }
            layer.cols -= dead;
        }
        self.classes[c].cols -= dead;
        Ok(())
    }

    /// Copies the sink positions each row still holds only in columns into
    /// its sink slots.
    fn move_sinks(&mut self, c: usize) -> Result<()> {
        let (sinks, cols) = (self.classes[c].sinks, self.classes[c].cols);
        if sinks == 0 {
            return Ok(());
        }
        for r in 0..self.rows.len() {
            let Some(n) = self.rows[r] else { continue };
            let held = self.classes[c].sinks_held[r];
            let want = sinks.min(n);
            if held >= want {
                continue;
            }
            let (from, to) = (held + cols - n, want + cols - n);
            if from < 0 {
                return Err(Exception::custom("a sink position was dropped"));
            }
            let row = r as i32;
            for l in self.classes[c].layers.clone() {
                let layer = self.layer_mut(l)?;
                let copy = |a: &Array| -> Result<Array> {
                    let part = a.index((row..row + 1, .., sinks + from..sinks + to, ..));
                    crate::ffi::slice_update(
                        a,
                        &part,
                        &[row, 0, held, 0],
                        &[row + 1, a.dim(1), want, a.dim(3)],
                    )
                };
                if let (Some(k), Some(v)) = (&layer.keys, &layer.values) {
                    let (k, v) = (copy(k)?, copy(v)?);
                    layer.keys = Some(k);
                    layer.values = Some(v);
                }
            }
            self.classes[c].sinks_held[r] = want;
        }
        Ok(())
    }

    /// The mask and positions of the next step for class `c`: row `b`'s
    /// query (position `n_b`, column `cols`) attends its sink slots below
    /// `sinks_held`, and the columns holding its positions `q` with
    /// `sinks_held ≤ q ≤ n_b` inside its window (`q < sinks` or
    /// `q > n_b − (window − sinks)`); a hole attends its own column alone.
    /// One live row seeing every column needs no mask.
    fn view(&self, c: usize) -> Result<StepView> {
        let class = &self.classes[c];
        let (sinks, cols) = (class.sinks, class.cols);
        let width = sinks + cols + 1;
        let recent = class.recent_window();
        let mut visible = Vec::with_capacity(self.rows.len() * width as usize);
        for (r, row) in self.rows.iter().enumerate() {
            match *row {
                None => {
                    visible.extend((0..width).map(|j| j == width - 1));
                }
                Some(n) => {
                    let held = class.sinks_held[r];
                    visible.extend((0..sinks).map(|s| s < held));
                    visible.extend((0..=cols).map(|j| {
                        let q = j - (cols - n);
                        q >= held && q <= n && recent.is_none_or(|w| q < sinks || q > n - w)
                    }));
                }
            }
        }
        let b = self.rows.len() as i32;
        let positions = match self.rows.as_slice() {
            [Some(n)] => Positions::Start(*n),
            rows => Positions::Rows(Array::from_iter(rows.iter().map(|r| r.unwrap_or(0)), &[b])),
        };
        let mask = if b == 1 && visible.iter().all(|&v| v) {
            AttnMask::None
        } else {
            AttnMask::Array(Array::from_slice(&visible, &[b, 1, 1, width]))
        };
        Ok(StepView { mask, positions })
    }

    /// One-sequence caches holding row `row`'s positions (what
    /// [`join`](Self::join) took, extended by the steps since).
    pub fn extract(&self, row: usize) -> Result<Vec<LayerCache>> {
        let n = self
            .positions_of(row)
            .ok_or_else(|| Exception::custom("extracting a hole of a batch"))?;
        let r = row as i32;
        let mut out: Vec<Option<LayerCache>> = vec![None; self.layers.len()];
        for class in &self.classes {
            let (sinks, cols) = (class.sinks, class.cols);
            let held = class.sinks_held[row];
            for &l in &class.layers {
                let layer = self.layer(l)?;
                let (k, v) = layer.storage()?;
                let column = |q: i32| sinks + q + cols - n;
                let pick = |a: &Array| -> Result<Array> {
                    if class.rotation.is_none() {
                        return Ok(a.index((r..r + 1, .., column(0)..column(n), ..)));
                    }
                    let w = class.recent_window().unwrap_or(i32::MAX);
                    let want = sinks.min(n);
                    let mut parts = Vec::with_capacity(3);
                    if held > 0 {
                        parts.push(a.index((r..r + 1, .., ..held, ..)));
                    }
                    if want > held {
                        parts.push(a.index((r..r + 1, .., column(held)..column(want), ..)));
                    }
                    let from = want.max(n - w + 1);
                    if from < n {
                        parts.push(a.index((r..r + 1, .., column(from)..column(n), ..)));
                    }
                    concatenate(&parts, 2)
                };
                // Copies of their own, computed now: a view would keep the
                // whole batch's storage alive and make its next update copy it.
                let (keys, values) = (pick(k)?.contiguous()?, pick(v)?.contiguous()?);
                mlx_rs::transforms::async_eval([&keys, &values])?;
                out[l] = Some(match class.rotation {
                    None => LayerCache::Full(KvCache::from_contents(keys, values)),
                    Some(rotation) => LayerCache::Rotating(RotatingKvCache::from_contents(
                        rotation, keys, values, n,
                    )),
                });
            }
        }
        out.into_iter()
            .map(|c| c.ok_or_else(|| Exception::custom("a layer of no class")))
            .collect()
    }

    /// Bytes of the storage.
    pub fn bytes(&self) -> u64 {
        self.layers.iter().map(LayerCache::bytes).sum()
    }

    /// Bytes the next step allocates (storage growing by a step).
    pub fn growth(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| match l {
                LayerCache::Batch(b) => b.growth(),
                _ => 0,
            })
            .sum()
    }
}

fn round_up(n: i32, to: i32) -> i32 {
    (n + to - 1) / to * to
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::attend;
    use crate::cache::rotating_tests::{naive, values};

    const D: usize = 4;

    /// One sequence: its keys, values and queries at every position.
    struct Seq {
        k: Vec<f32>,
        v: Vec<f32>,
        q: Vec<f32>,
        /// Positions fed so far.
        n: usize,
    }

    impl Seq {
        fn new(seed: u64) -> Self {
            let len = 400;
            Self {
                k: values(len * D, seed),
                v: values(len * D, seed + 1000),
                q: values(len * D, seed + 2000),
                n: 0,
            }
        }

        fn at(x: &[f32], from: usize, to: usize) -> Array {
            Array::from_slice(&x[from * D..to * D], &[1, 1, (to - from) as i32, D as i32])
        }
    }

    /// The rotations of the test's layers: every position, a sliding
    /// window, and a window with sinks.
    fn rotations() -> Vec<Option<Rotation>> {
        vec![
            None,
            Some(Rotation::sliding(5)),
            Some(Rotation {
                window: 7,
                sinks: 2,
            }),
        ]
    }

    fn effective(r: Option<Rotation>) -> Rotation {
        r.unwrap_or(Rotation::sliding(usize::MAX / 2))
    }

    /// Prefills `len` positions of `seq` alone into fresh caches, checking
    /// the attention of each against the naive one.
    fn prefill(seq: &mut Seq, len: usize) -> Vec<LayerCache> {
        let mut caches: Vec<LayerCache> = rotations().into_iter().map(LayerCache::new).collect();
        for (cache, r) in caches.iter_mut().zip(rotations()) {
            let (k, v, mask) = cache
                .update(&Seq::at(&seq.k, 0, len), &Seq::at(&seq.v, 0, len))
                .unwrap();
            let out = attend(&Seq::at(&seq.q, 0, len), &k, &v, 0.5, &mask).unwrap();
            let want = naive(&seq.q, &seq.k, &seq.v, D, 0..len, effective(r));
            close(out.as_slice::<f32>(), &want, "prefill");
        }
        seq.n = len;
        caches
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() < 1e-5, "{what}, element {i}: {a} vs {b}");
        }
    }

    /// One decode step of every live row through the batch, checked row by
    /// row against naive attention over that row's own positions.
    fn step(batch: &mut BatchKv, seqs: &mut [Seq], rows: &[Option<usize>]) {
        batch.prepare_step().unwrap();
        let b = batch.slots();
        assert_eq!(rows.len(), b);
        let pick = |x: fn(&Seq) -> &Vec<f32>| -> Array {
            let mut flat = Vec::with_capacity(b * D);
            for r in rows {
                match r {
                    Some(s) => {
                        let seq = &seqs[*s];
                        flat.extend_from_slice(&x(seq)[seq.n * D..(seq.n + 1) * D]);
                    }
                    None => flat.extend(std::iter::repeat_n(0.0, D)),
                }
            }
            Array::from_slice(&flat, &[b as i32, 1, 1, D as i32])
        };
        let (k, v, q) = (pick(|s| &s.k), pick(|s| &s.v), pick(|s| &s.q));
        for (layer, r) in batch.layers_mut().iter_mut().zip(rotations()) {
            let (keys, vals, mask) = layer.update(&k, &v).unwrap();
            let out = attend(&q, &keys, &vals, 0.5, &mask).unwrap();
            let out = out.as_slice::<f32>().to_vec();
            for (row, s) in rows.iter().enumerate() {
                let Some(s) = s else { continue };
                let seq = &seqs[*s];
                let want = naive(
                    &seq.q[seq.n * D..],
                    &seq.k,
                    &seq.v,
                    D,
                    seq.n..seq.n + 1,
                    effective(r),
                );
                close(
                    &out[row * D..(row + 1) * D],
                    &want,
                    &format!("row {row} (seq {s}) at {}, {r:?}", seq.n),
                );
            }
        }
        batch.finish_step();
        for s in rows.iter().flatten() {
            seqs[*s].n += 1;
        }
    }

    /// Rows of different lengths join (longer ones padding the others on
    /// the left), leave (their row reused by the next joiner), run past
    /// every window (dead columns dropped, sinks moved), are compacted and
    /// extracted to continue alone: every step's attention equals each
    /// sequence's own.
    #[test]
    fn rows_join_leave_and_rotate_as_if_alone() {
        let mut seqs: Vec<Seq> = (0..5).map(|i| Seq::new(10 + i)).collect();
        let template: Vec<LayerCache> = rotations().into_iter().map(LayerCache::new).collect();
        let mut batch = BatchKv::new(&template).with_buckets(true);
        let c0 = prefill(&mut seqs[0], 3);
        assert_eq!(batch.join(&c0).unwrap(), 0);
        let mut rows = vec![Some(0)];
        step(&mut batch, &mut seqs, &rows);
        step(&mut batch, &mut seqs, &rows);
        // Longer than the columns: the batch grows on the left.
        let c1 = prefill(&mut seqs[1], 9);
        assert_eq!(batch.join(&c1).unwrap(), 1);
        rows.push(Some(1));
        for _ in 0..3 {
            step(&mut batch, &mut seqs, &rows);
        }
        // Shorter than the sinks: its sink positions move later.
        let c2 = prefill(&mut seqs[2], 1);
        assert_eq!(batch.join(&c2).unwrap(), 2);
        // The batch grows to a power of two: a hole for the next joiner.
        assert_eq!((batch.slots(), batch.live()), (4, 3));
        rows.extend([Some(2), None]);
        step(&mut batch, &mut seqs, &rows);
        batch.leave(0);
        rows[0] = None;
        step(&mut batch, &mut seqs, &rows);
        // The hole is reused.
        let c3 = prefill(&mut seqs[3], 2);
        assert_eq!(batch.join(&c3).unwrap(), 0);
        rows[0] = Some(3);
        // Past every window and a drop of dead columns.
        for _ in 0..(KvCache::STEP as usize + 20) {
            step(&mut batch, &mut seqs, &rows);
        }
        // The windowed classes dropped their dead columns and moved the
        // short row's sink position into its slots.
        assert!(batch.classes[1].cols < KvCache::STEP + 5);
        assert!(batch.classes[2].cols < KvCache::STEP + 7);
        assert_eq!(batch.classes[2].sinks_held, vec![2, 2, 2, 0]);
        assert!(batch.classes[0].cols > KvCache::STEP);
        let before = batch.bytes();
        // Sequence 1 continues alone in one-sequence caches.
        let mut alone = batch.extract(1).unwrap();
        batch.leave(1);
        rows[1] = None;
        for _ in 0..10 {
            let seq = &mut seqs[1];
            let (k, v, q) = (
                Seq::at(&seq.k, seq.n, seq.n + 1),
                Seq::at(&seq.v, seq.n, seq.n + 1),
                Seq::at(&seq.q, seq.n, seq.n + 1),
            );
            for (cache, r) in alone.iter_mut().zip(rotations()) {
                let (keys, vals, mask) = cache.update(&k, &v).unwrap();
                let out = attend(&q, &keys, &vals, 0.5, &mask).unwrap();
                let want = naive(
                    &seq.q[seq.n * D..],
                    &seq.k,
                    &seq.v,
                    D,
                    seq.n..seq.n + 1,
                    effective(r),
                );
                close(out.as_slice::<f32>(), &want, "extracted");
            }
            seq.n += 1;
        }
        // Compaction drops the hole; the rest go on.
        let map = batch.compact().unwrap();
        assert_eq!(map, vec![Some(0), None, Some(1), None]);
        rows = vec![Some(3), Some(2)];
        assert!(batch.bytes() < before);
        // A newcomer joins after the rotation (the batch grows to 4 again).
        let c4 = prefill(&mut seqs[4], 30);
        assert_eq!(batch.join(&c4).unwrap(), 2);
        rows.extend([Some(4), None]);
        for _ in 0..12 {
            step(&mut batch, &mut seqs, &rows);
        }
        // Every row leaves: the storage goes.
        for r in 0..3 {
            batch.leave(r);
        }
        batch.compact().unwrap();
        assert_eq!((batch.slots(), batch.bytes()), (0, 0));
        let c0 = prefill(&mut seqs[0], 4);
        assert_eq!(batch.join(&c0).unwrap(), 0);
        step(&mut batch, &mut seqs, &[Some(0)]);
    }

    /// One live row that sees every column attends without a mask, at one
    /// position for all, as a one-sequence cache does.
    #[test]
    fn a_lone_row_needs_no_mask() {
        let mut seq = Seq::new(3);
        let template = vec![LayerCache::new(None)];
        let mut batch = BatchKv::new(&template);
        let mut caches = vec![LayerCache::new(None)];
        caches[0]
            .update(&Seq::at(&seq.k, 0, 4), &Seq::at(&seq.v, 0, 4))
            .unwrap();
        seq.n = 4;
        batch.join(&caches).unwrap();
        batch.prepare_step().unwrap();
        let LayerCache::Batch(layer) = &batch.layers_mut()[0] else {
            panic!("not a batch layer")
        };
        assert!(matches!(layer.view().unwrap().mask, AttnMask::None));
        assert!(matches!(layer.positions().unwrap(), Positions::Start(4)));
    }
}

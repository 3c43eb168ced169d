//! KV caches.
//!
//! [`KvCache`] grows in steps of [`KvCache::STEP`] positions: a decode step
//! writes its keys and values into spare room with a slice update instead of
//! concatenating (which would copy the whole cache every token).

use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{IndexOp, TryIndexMutOp};
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
        k.try_index_mut((.., .., prev..end, ..), keys)?;
        v.try_index_mut((.., .., prev..end, ..), values)?;
        Ok((k.index((.., .., ..end, ..)), v.index((.., .., ..end, ..))))
    }
}

impl KvCache {
    /// The cache's arrays (for evaluation between prefill chunks).
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.keys.iter().chain(self.values.iter())
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

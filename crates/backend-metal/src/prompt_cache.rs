//! [`PromptCache`]: KV caches of finished calls, kept for later calls whose
//! prompts share a prefix with them (as mlx-lm's server keeps an LRU prompt
//! cache).
//!
//! An entry holds one-sequence caches and the ids they hold (a call's
//! prompt and the tokens fed back after it). A new prompt takes a copy of
//! the entry with the longest common prefix, cut back to that prefix (MLX
//! arrays are values: the copy's updates never reach the entry), and
//! prefills only the rest. Entries are bounded in bytes and evicted least
//! recently used first; an entry whose ids begin another's is superseded by
//! it. Chat sessions keep their own caches, apart from this one.

use std::collections::VecDeque;

use inference_runtime::session::reusable_prefix;

use crate::cache::LayerCache;

struct Entry {
    ids: Vec<u32>,
    caches: Vec<LayerCache>,
    bytes: u64,
}

/// Caches of finished calls, most recently used last.
pub(crate) struct PromptCache {
    entries: VecDeque<Entry>,
    bytes: u64,
    limit: u64,
}

impl PromptCache {
    /// An empty cache holding at most `limit` bytes (0: nothing is kept).
    pub(crate) fn new(limit: u64) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            limit,
        }
    }

    /// Whether anything is ever kept.
    pub(crate) fn enabled(&self) -> bool {
        self.limit > 0
    }

    /// Caches holding the longest prefix of `prompt` any entry shares (at
    /// most all but its last id), and that prefix's length; `None` when no
    /// entry shares one (or its caches cannot be cut back to it).
    pub(crate) fn take(&mut self, prompt: &[u32]) -> Option<(Vec<LayerCache>, usize)> {
        let (best, common) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, reusable_prefix(&e.ids, prompt)))
            .max_by_key(|&(i, n)| (n, i))?;
        if common == 0 {
            return None;
        }
        let entry = self.entries.remove(best)?;
        let mut caches = entry.caches.clone();
        self.entries.push_back(entry);
        let n = i32::try_from(common).ok()?;
        for c in &mut caches {
            if !matches!(c.trim_to(n), Ok(true)) {
                return None;
            }
        }
        tracing::debug!(common, prompt_tokens = prompt.len(), "prompt cache hit");
        Some((caches, common))
    }

    /// Keeps `caches`, which hold `ids`, evicting the least recently used
    /// entries beyond the limit.
    pub(crate) fn insert(&mut self, ids: Vec<u32>, caches: Vec<LayerCache>) {
        let bytes: u64 = caches.iter().map(LayerCache::bytes).sum();
        if bytes > self.limit || ids.is_empty() {
            return;
        }
        // An entry whose ids begin these is superseded (the new one serves
        // every prompt it served).
        let mut superseded = 0;
        self.entries.retain(|e| {
            let keep = !ids.starts_with(&e.ids);
            if !keep {
                superseded += e.bytes;
            }
            keep
        });
        self.bytes -= superseded;
        self.entries.push_back(Entry { ids, caches, bytes });
        self.bytes += bytes;
        while self.bytes > self.limit {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= old.bytes;
        }
    }

    /// Forgets every entry (the model changed: adapters were applied).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use mlx_rs::Array;

    use super::*;
    use crate::cache::KvCache;

    /// A one-layer cache of `n` positions whose keys are their ids.
    fn cache(ids: &[u32]) -> Vec<LayerCache> {
        let n = ids.len() as i32;
        let k: Vec<f32> = ids.iter().map(|&i| i as f32).collect();
        let a = Array::from_slice(&k, &[1, 1, n, 1]);
        vec![LayerCache::Full(KvCache::from_contents(a.clone(), a))]
    }

    fn keys(caches: &[LayerCache]) -> Vec<f32> {
        let LayerCache::Full(c) = &caches[0] else {
            panic!("not a full cache")
        };
        let (k, _) = c.contents().unwrap();
        k.as_slice::<f32>().to_vec()
    }

    #[test]
    fn longest_prefix_is_reused_and_entries_stay_intact() {
        let mut pc = PromptCache::new(1 << 20);
        pc.insert(vec![1, 2, 3, 4], cache(&[1, 2, 3, 4]));
        pc.insert(vec![1, 2, 9], cache(&[1, 2, 9]));
        let (c, n) = pc.take(&[1, 2, 3, 7, 8]).unwrap();
        assert_eq!(n, 3);
        assert_eq!(keys(&c), [1.0, 2.0, 3.0]);
        // All but the last id at most.
        let (c, n) = pc.take(&[1, 2, 3, 4]).unwrap();
        assert_eq!((n, keys(&c)), (3, vec![1.0, 2.0, 3.0]));
        // The entries still hold everything.
        let (_, n) = pc.take(&[1, 2, 3, 4, 5]).unwrap();
        assert_eq!(n, 4);
        assert!(pc.take(&[5, 6]).is_none());
    }

    #[test]
    fn bounded_in_bytes_least_recently_used_first() {
        let one = cache(&[1, 2]).iter().map(LayerCache::bytes).sum::<u64>();
        let mut pc = PromptCache::new(2 * one);
        pc.insert(vec![1, 2], cache(&[1, 2]));
        pc.insert(vec![3, 4], cache(&[3, 4]));
        // Using [1, 2] makes [3, 4] the least recent.
        assert!(pc.take(&[1, 5]).is_some());
        pc.insert(vec![5, 6], cache(&[5, 6]));
        assert!(pc.take(&[3, 7]).is_none());
        assert!(pc.take(&[1, 7]).is_some());
        assert!(pc.take(&[5, 7]).is_some());
        // An extension supersedes its prefix.
        let mut pc = PromptCache::new(1 << 20);
        pc.insert(vec![5, 6], cache(&[5, 6]));
        pc.insert(vec![1], cache(&[1]));
        pc.insert(vec![5, 6, 7], cache(&[5, 6, 7]));
        assert_eq!(pc.entries.len(), 2);
        assert_eq!(pc.bytes, one / 2 + one * 3 / 2);
        // Off keeps nothing.
        let mut off = PromptCache::new(0);
        off.insert(vec![1, 2], cache(&[1, 2]));
        assert!(off.take(&[1, 2, 3]).is_none());
    }
}

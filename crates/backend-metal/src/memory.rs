//! MLX's memory figures and limits, as safe functions of plain numbers.
//!
//! MLX's allocator is process-wide: these figures cover every model of the
//! process, and the limits apply to all of them. The figures read 0 where
//! MLX reports an error. For what the device is, see
//! [`device::describe`](crate::device::describe).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use inference_core::Error;
use mlx_rs::memory as mx;

/// How often (in generated tokens) generation clears MLX's buffer cache, as
/// mlx-lm does, so that buffers freed by the decode loop go back to the
/// system instead of piling up in the cache.
pub const CLEAR_CACHE_EVERY: usize = 256;

/// Bytes MLX holds in live arrays.
pub fn active() -> u64 {
    mx::active_memory().map_or(0, |b| b as u64)
}

/// The most bytes MLX held since the last [`reset_peak`].
pub fn peak() -> u64 {
    raw_peak().max(FOLDED_PEAK.load(Ordering::Relaxed))
}

/// MLX's own peak counter, which [`QueueThrottle`] restarts for each step
/// it measures; [`peak`] keeps what it reached before.
fn raw_peak() -> u64 {
    mx::peak_memory().map_or(0, |b| b as u64)
}

/// What MLX's peak counter had reached when [`QueueThrottle`] last
/// restarted it (0 after [`reset_peak`]).
static FOLDED_PEAK: AtomicU64 = AtomicU64::new(0);

/// Restarts MLX's peak counter to measure one step, keeping the peak so far
/// in [`peak`].
fn restart_raw_peak() {
    FOLDED_PEAK.fetch_max(raw_peak(), Ordering::Relaxed);
    reset_raw_peak();
}

/// Restarts MLX's own peak counter at the memory in use.
fn reset_raw_peak() {
    if let Err(e) = mx::reset_peak_memory() {
        tracing::debug!(error = %e, "reset_peak_memory failed");
    }
}

/// Bytes MLX keeps in its buffer cache (freed buffers kept for reuse).
pub fn cache() -> u64 {
    mx::cache_memory().map_or(0, |b| b as u64)
}

/// Starts a new peak measurement.
pub fn reset_peak() {
    FOLDED_PEAK.store(0, Ordering::Relaxed);
    reset_raw_peak();
}

/// Returns the buffers of MLX's cache to the system.
pub fn clear_cache() {
    if let Err(e) = mx::clear_cache() {
        tracing::debug!(error = %e, "clear_cache failed");
    }
}

/// MLX's memory limit, in bytes (0 where MLX reports an error).
pub fn memory_limit() -> u64 {
    mx::memory_limit().map_or(0, |b| b as u64)
}

fn to_usize(field: &'static str, v: u64) -> Result<usize, Error> {
    usize::try_from(v)
        .map_err(|_| Error::invalid_option(field, format!("{v} bytes does not fit this platform")))
}

fn backend(what: &str, e: impl std::fmt::Display) -> Error {
    Error::backend(crate::error::NAME, format!("{what}: {e}"))
}

/// Sets MLX's memory limit (a guideline for the most bytes it allocates);
/// returns the previous limit.
pub fn set_memory_limit(bytes: u64) -> Result<u64, Error> {
    mx::set_memory_limit(to_usize("memory_limit_bytes", bytes)?)
        .map(|b| b as u64)
        .map_err(|e| backend("set_memory_limit", e))
}

/// Sets the most bytes MLX keeps in its buffer cache (0 disables the
/// cache); returns the previous limit.
pub fn set_cache_limit(bytes: u64) -> Result<u64, Error> {
    mx::set_cache_limit(to_usize("cache_limit_bytes", bytes)?)
        .map(|b| b as u64)
        .map_err(|e| backend("set_cache_limit", e))
}

/// Sets the wired (resident) memory limit, where the platform has one;
/// returns the previous limit.
pub fn set_wired_limit(bytes: u64) -> Result<u64, Error> {
    mx::set_wired_limit(to_usize("wired_limit_bytes", bytes)?)
        .map(|b| b as u64)
        .map_err(|e| backend("set_wired_limit", e))
}

/// Applies the memory limits of a load (MLX's limits are process-wide); an
/// out-of-range limit is an [`Error::InvalidOption`] naming its field.
pub fn apply_limits(
    memory: Option<u64>,
    cache: Option<u64>,
    wired: Option<u64>,
) -> Result<(), Error> {
    if let Some(b) = memory {
        set_memory_limit(b)?;
    }
    if let Some(b) = cache {
        set_cache_limit(b)?;
    }
    if let Some(b) = wired {
        set_wired_limit(b)?;
    }
    Ok(())
}

/// Bounds how far ahead of the GPU MLX queues a training step's work.
///
/// MLX keeps every input of a queued kernel alive until the GPU has run it,
/// and lets the host run up to ten command graphs ahead. A fast host thus
/// holds arrays that are already dead: on an H100, a Qwen3-0.6B LoRA step
/// (4 × 512 tokens, 16 layers) peaked at 7.7–8.7 GB against the 5.7 GB it
/// needs when nothing runs ahead. MLX's evaluation waits for queued work
/// while active memory is over the memory limit, so the throttle sets that
/// limit around each step: the first step of each batch width runs with the
/// limit at the memory already in use (nothing queued ahead) and its peak
/// is that width's need; later steps of the width run with the limit at that
/// need, so that the host queues freely until the step nears its peak. On
/// that H100 the step then peaked at 6.1 GB against mlx-lm's 6.2 GB, as fast
/// as mlx-lm (a 5 % or 2 % margin peaked no lower and trained no faster).
/// The limit never exceeds the one set before (a load's
/// `memory_limit_bytes`), which is restored after each step and on drop.
/// The limit is process-wide: other work of the process during a step
/// (another model's generation) waits on the same queue.
pub(crate) struct QueueThrottle {
    /// The memory limit before training.
    original: u64,
    /// Each batch width's need: its first step's peak.
    needs: HashMap<i32, u64>,
    /// The width whose first step is running.
    measuring: Option<i32>,
}

impl QueueThrottle {
    /// A throttle where the default device is an NVIDIA GPU, where it was
    /// measured (Metal's queue is untested), unless `INFER_TRAIN_THROTTLE=0`;
    /// `1` turns it on for any device. `None` where it is off.
    pub(crate) fn new() -> Option<Self> {
        let on = crate::env_switch("INFER_TRAIN_THROTTLE").unwrap_or_else(|| {
            let info = crate::device::mlx();
            info.default_is_gpu && info.gpu == Some(crate::device::GpuApi::Cuda)
        });
        // No limit to come back to (MLX reported none): no throttle.
        let original = memory_limit();
        (on && original > 0).then(|| Self {
            original,
            needs: HashMap::new(),
            measuring: None,
        })
    }

    /// Sets the limit for a step of batches `width` tokens wide.
    pub(crate) fn before_step(&mut self, width: i32) -> Result<(), Error> {
        let limit = match self.needs.get(&width) {
            Some(&need) => need,
            None => {
                self.measuring = Some(width);
                restart_raw_peak();
                active()
            }
        };
        set_memory_limit(limit.max(1).min(self.original))?;
        Ok(())
    }

    /// After the step's evaluation: records a measured need and restores
    /// the limit.
    pub(crate) fn after_step(&mut self) -> Result<(), Error> {
        if let Some(width) = self.measuring.take() {
            let need = raw_peak();
            tracing::debug!(
                width,
                need_mb = need / 1_000_000,
                "training step need measured"
            );
            self.needs.insert(width, need);
        }
        set_memory_limit(self.original)?;
        Ok(())
    }
}

impl Drop for QueueThrottle {
    fn drop(&mut self) {
        if let Err(e) = set_memory_limit(self.original) {
            tracing::warn!(error = %e, "could not restore MLX's memory limit after training");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::Array;

    /// A width's first step runs with nothing queued ahead and measures its
    /// need (at least what the step held); the next step of that width is
    /// limited to the need; the limit before training comes back after
    /// each step and when the throttle goes.
    #[test]
    fn throttle_limits_a_width_to_its_first_steps_need_and_restores_the_limit() {
        let original = memory_limit();
        let mut t = QueueThrottle {
            original,
            needs: HashMap::new(),
            measuring: None,
        };
        t.before_step(65).unwrap();
        assert_eq!(t.measuring, Some(65));
        assert!(
            memory_limit() < original,
            "the measured step queues nothing ahead"
        );
        // What the step holds: 16 MB, alive until after the step.
        let held = Array::ones::<f32>(&[2048, 2048]).unwrap();
        held.eval().unwrap();
        t.after_step().unwrap();
        let need = t.needs[&65];
        assert!(
            need >= 16 << 20,
            "need {need} below the 16 MB the step held"
        );
        assert!(peak() >= 16 << 20);
        assert_eq!(memory_limit(), original);

        t.before_step(65).unwrap();
        assert_eq!(t.measuring, None, "a known width is not measured again");
        assert_eq!(memory_limit(), need.min(original));
        t.after_step().unwrap();
        assert_eq!(t.needs[&65], need);
        assert_eq!(memory_limit(), original);

        t.before_step(129).unwrap();
        assert_eq!(t.measuring, Some(129), "a new width is measured");
        drop(t);
        assert_eq!(memory_limit(), original);
        drop(held);
    }
}

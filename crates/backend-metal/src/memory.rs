//! MLX's memory figures and limits, as safe functions of plain numbers.
//!
//! MLX's allocator is process-wide: these figures cover every model of the
//! process, and the limits apply to all of them. The figures read 0 where
//! MLX reports an error. For what the device is, see
//! [`device::describe`](crate::device::describe).

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
    mx::peak_memory().map_or(0, |b| b as u64)
}

/// Bytes MLX keeps in its buffer cache (freed buffers kept for reuse).
pub fn cache() -> u64 {
    mx::cache_memory().map_or(0, |b| b as u64)
}

/// Starts a new peak measurement.
pub fn reset_peak() {
    if let Err(e) = mx::reset_peak_memory() {
        tracing::debug!(error = %e, "reset_peak_memory failed");
    }
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

//! MLX memory figures, as plain numbers (0 where MLX reports an error).

use mlx_rs::memory as mx;

/// Bytes MLX holds in live arrays.
pub fn active() -> u64 {
    mx::active_memory().map_or(0, |b| b as u64)
}

/// The most bytes MLX held since the last [`reset_peak`].
pub fn peak() -> u64 {
    mx::peak_memory().map_or(0, |b| b as u64)
}

/// Starts a new peak measurement.
pub fn reset_peak() {
    if let Err(e) = mx::reset_peak_memory() {
        tracing::debug!(error = %e, "reset_peak_memory failed");
    }
}

/// Applies the memory limits of a load (MLX's limits are process-wide).
pub fn apply_limits(
    memory: Option<u64>,
    cache: Option<u64>,
    wired: Option<u64>,
) -> Result<(), String> {
    let to_usize =
        |v: u64| usize::try_from(v).map_err(|_| format!("{v} bytes does not fit this platform"));
    if let Some(b) = memory {
        mx::set_memory_limit(to_usize(b)?).map_err(|e| e.to_string())?;
    }
    if let Some(b) = cache {
        mx::set_cache_limit(to_usize(b)?).map_err(|e| e.to_string())?;
    }
    if let Some(b) = wired {
        mx::set_wired_limit(to_usize(b)?).map_err(|e| e.to_string())?;
    }
    Ok(())
}

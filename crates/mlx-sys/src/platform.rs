//! Platform shims: the one place in this crate that depends on the target platform.

/// mlx-rs 0.33 seeds its default random state with `mach_approximate_time()`, which its
/// `mach-sys` dependency declares on every platform but which only Apple's libSystem defines.
/// Any value that changes between runs is a good seed: elsewhere, define the symbol as the
/// wall-clock time in nanoseconds.
#[cfg(not(target_vendor = "apple"))]
// SAFETY: no other definition of this symbol exists off Apple platforms (libSystem is the
// only provider), and its signature matches the declaration in `mach-sys`:
// `fn mach_approximate_time() -> u64`.
#[unsafe(no_mangle)]
pub extern "C" fn mach_approximate_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

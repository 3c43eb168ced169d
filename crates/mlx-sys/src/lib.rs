//! Raw bindings to [mlx-c], the C API of Apple's MLX, built against a prebuilt MLX.
//!
//! This crate stands in for crates.io `mlx-sys` 0.7.0 (through `[patch.crates-io]` in the
//! workspace manifest), so that `mlx-rs` 0.33.0 builds and runs on Linux (CPU and NVIDIA
//! CUDA) as well as on macOS, from registry packages only:
//!
//! - MLX itself comes from a PyPI wheel (`mlx-cpu`, `mlx-cuda-13` or `mlx-metal`) of exactly
//!   the release that mlx-c pins (0.32.2), named by `MLX_PREFIX`;
//! - mlx-c is the source published in crates.io `mlx-sys` 0.7.0, named by `MLX_C_SRC`;
//! - `cargo xtask setup` installs both (see `docs/building.md`).
//!
//! The build script compiles mlx-c with the `cc` crate, links it with the wheel's shared
//! `libmlx` and the C++ runtime, and generates these bindings with the same bindgen settings
//! as upstream, so the Rust API is the one mlx-rs expects. It publishes `DEP_MLX_INCLUDE`,
//! `DEP_MLX_DEFINES`, `DEP_MLX_VERSION`, `DEP_MLX_LIB_DIR` and `DEP_MLX_PREFIX` to crates
//! that depend on it directly; a binary should embed `DEP_MLX_LIB_DIR` as its rpath.
//!
//! Platform differences live in one private module (the `mach_approximate_time` shim that
//! mlx-rs needs off Apple platforms) and in `compat/*.h`.
//!
//! [mlx-c]: https://github.com/ml-explore/mlx-c

mod platform;

/// The generated bindings: every mlx-c type, constant and function.
#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    missing_docs,
    unsafe_op_in_unsafe_fn,
    rustdoc::all,
    clippy::all,
    clippy::pedantic
)]
mod bindings {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

pub use bindings::*;

//! The MLX backend of inference-rs.
//!
//! It runs models with [MLX] through [`mlx_rs`]: on Apple silicon MLX uses Metal; on Linux it
//! uses an NVIDIA GPU through CUDA when linked against the CUDA build of MLX, and the CPU
//! otherwise. MLX is the prebuilt library of a PyPI wheel, linked through the workspace's own
//! `mlx-sys` crate (see `docs/building.md`; `cargo xtask setup` installs what it needs).
//!
//! For now the crate holds the native layer's plumbing: [`device`] tells which MLX and which
//! device a process runs on. The engine (model loading, generation, the
//! [`inference_core`] backend) follows in later issues.
//!
//! [MLX]: https://github.com/ml-explore/mlx

pub mod device;

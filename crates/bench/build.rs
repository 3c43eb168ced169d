//! Build script of infer-bench: an rpath to MLX for the binary (see
//! `crates/mlx-sys/rpath.rs`).

#[path = "../mlx-sys/rpath.rs"]
mod rpath;

fn main() {
    rpath::emit();
}

//! Build script of infer-cli: an rpath to MLX for the `infer` binary and the
//! test executables (see `crates/mlx-sys/rpath.rs`).

#[path = "../mlx-sys/rpath.rs"]
mod rpath;

fn main() {
    rpath::emit();
}

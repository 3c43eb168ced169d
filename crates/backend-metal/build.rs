//! Build script of backend-metal: an rpath to MLX for the test executables
//! (see `crates/mlx-sys/rpath.rs`), and the MLX version for
//! `device::MLX_BUILD_VERSION`.

#[path = "../mlx-sys/rpath.rs"]
mod rpath;

fn main() {
    rpath::emit();
    let version = std::env::var("DEP_MLX_VERSION").unwrap_or_default();
    println!("cargo:rustc-env=BACKEND_METAL_MLX_VERSION={version}");
}

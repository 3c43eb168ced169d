//! Build script of infer-cli: an rpath for the `infer` binary and the test
//! executables, which link MLX through backend-metal.
//!
//! A `-sys` crate's link arguments do not reach the final link of its
//! dependents, so the crate that links a binary embeds the rpath itself, as
//! `crates/backend-metal/build.rs` does. By default it is the MLX library
//! directory that mlx-sys linked against (`DEP_MLX_LIB_DIR`, an absolute path
//! in `.cache/`); `MLX_RPATH` replaces it, e.g. `$ORIGIN/site/mlx/lib` for a
//! relocatable bundle (several directories separated by `:` on Linux).

use std::env;

fn main() {
    println!("cargo:rerun-if-env-changed=MLX_RPATH");
    let rpath = env::var("MLX_RPATH")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| env::var("DEP_MLX_LIB_DIR").ok());
    let unix = env::var("CARGO_CFG_TARGET_FAMILY").is_ok_and(|f| f.split(',').any(|f| f == "unix"));
    if let (Some(dir), true) = (rpath, unix) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}

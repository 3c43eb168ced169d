// Shared by the build scripts of the crates that link binaries against MLX
// (backend-metal, infer-cli), through `#[path = "../mlx-sys/rpath.rs"] mod rpath;`.
//
// A `-sys` crate's link arguments do not reach the final link of its
// dependents, so each crate that links a binary or a test executable embeds
// the rpath itself: by default the MLX library directory mlx-sys linked
// against (`DEP_MLX_LIB_DIR`, which a crate sees when it depends on mlx-sys
// directly); `MLX_RPATH` replaces it, e.g. `$ORIGIN/site/mlx/lib` for a
// relocatable bundle (several directories separated by `:` on Linux).

/// Emits the rpath link argument for this crate's binaries and tests.
pub fn emit() {
    println!("cargo:rerun-if-env-changed=MLX_RPATH");
    let rpath = std::env::var("MLX_RPATH")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("DEP_MLX_LIB_DIR").ok());
    let unix =
        std::env::var("CARGO_CFG_TARGET_FAMILY").is_ok_and(|f| f.split(',').any(|f| f == "unix"));
    if let (Some(dir), true) = (rpath, unix) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    // libmlx.so carries gguflib, whose `gguf_get_key` has the name (and not
    // the signature) of one in llama.cpp's ggml. A binary that links both
    // would export ggml's static copy, and the dynamic linker would bind
    // libmlx.so's own calls to it. Symbols of static archives stay local.
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if linux {
        println!("cargo:rustc-link-arg=-Wl,--exclude-libs,ALL");
    }
}

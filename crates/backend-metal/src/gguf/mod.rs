//! GGUF files: our own reader ([`reader`]), (de)quantisation ([`quant`]),
//! the mapping onto our models (`model`) and tokenizers from metadata
//! (`tokenizer`).

mod model;
pub mod quant;
pub mod reader;
mod tokenizer;

pub(crate) use model::{config_json, head_counts, model_type, weights};
pub(crate) use tokenizer::GgufTokenizer;

//! GGUF files: our own reader ([`reader`]), (de)quantisation ([`quant`]),
//! the mapping onto our models (`model`) and tokenizers from metadata
//! (`tokenizer`), and [`export_mlx_dir`], which writes a GGUF model out as an
//! mlx-community style directory.

mod export;
mod model;
pub mod quant;
pub mod reader;
mod tokenizer;

pub use export::{export_mlx_dir, Exported};
pub(crate) use model::{head_counts, open, stored_type, weights, Opened};
pub(crate) use tokenizer::GgufTokenizer;

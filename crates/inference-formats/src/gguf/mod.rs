//! GGUF files: the reader ([`reader`]), dequantisation and lossless repacking
//! of GGML quants ([`quant`]), file types ([`GgufFileType`]), the mapping
//! of a GGUF model onto a Hugging Face checkpoint ([`hf`]) and back
//! ([`from_hf`]), and the writer ([`writer`]).

mod file_type;
pub mod from_hf;
pub mod hf;
pub mod quant;
pub mod reader;
pub mod writer;

pub use file_type::GgufFileType;
pub use reader::{GgmlType, GgufError, GgufFile, MetaValue, TensorInfo};

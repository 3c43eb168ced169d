//! # inference-text
//!
//! Everything between ids and text that a backend needs, whatever runs its
//! tensors:
//!
//! - [`ModelTokenizer`]: a `tokenizers` tokenizer read from `tokenizer.json`
//!   (or built from GGUF metadata, [`gguf`]) with its BOS/EOS ids from the
//!   config files, and chat encoding that never doubles a BOS.
//! - [`StreamDecoder`] (a [`Detokenize`]): streaming detokenisation that
//!   never splits a character.
//! - [`template`]: chat templates rendered with minijinja as transformers
//!   renders them, with fuel and output bounds, and built-in templates for
//!   models that ship none.
//! - [`stop`]: stop strings matched across token boundaries.
//! - [`ChatTokenizer`]: a tokenizer with its chat template as the public
//!   [`inference_core::Tokenizer`] that `TextModel::tokenizer` hands out.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod chat;
mod detok;
pub mod gguf;
pub mod stop;
pub mod template;
mod tokenizer;

pub use chat::ChatTokenizer;
pub use detok::{Detokenize, StreamDecoder};
pub use stop::StopStrings;
pub use template::{BuiltinTemplate, ChatTemplate, SpecialTokens};
pub use tokenizer::{chat_template_of, read_json, ModelTokenizer};
pub use tokenizers;

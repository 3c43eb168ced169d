//! [`Backend`]: something that can load models.

use std::path::Path;

use crate::error::Result;
use crate::model::TextModel;
use crate::options::LoadOptions;

/// Whether a backend can run on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// It can.
    Available,
    /// It cannot, and why.
    Unavailable(String),
}

impl Availability {
    /// Whether this is [`Availability::Available`].
    pub fn is_available(&self) -> bool {
        matches!(self, Availability::Available)
    }

    /// The reason, when unavailable.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Availability::Available => None,
            Availability::Unavailable(r) => Some(r),
        }
    }
}

/// Whether a backend can load a given model path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CanLoad {
    /// It can (as far as a cheap look at the files tells: format and
    /// architecture; the load itself may still find the files corrupt).
    Yes,
    /// It cannot, and why (e.g. `GGUF files are not read here`, or an
    /// architecture it does not implement).
    No(String),
}

impl CanLoad {
    /// Whether this is [`CanLoad::Yes`].
    pub fn is_yes(&self) -> bool {
        matches!(self, CanLoad::Yes)
    }

    /// The reason, when it cannot.
    pub fn reason(&self) -> Option<&str> {
        match self {
            CanLoad::Yes => None,
            CanLoad::No(r) => Some(r),
        }
    }
}

/// A family of model implementations on some device.
///
/// Register one with [`register_backend!`](crate::register_backend) so that
/// [`backends`](crate::backends), [`get`](crate::get) and
/// [`load_model`](crate::load_model) find it.
pub trait Backend: Send + Sync {
    /// The unique name, e.g. `mlx`.
    fn name(&self) -> &str;

    /// Whether this backend can run here, with the reason when not.
    fn available(&self) -> Availability;

    /// The device it runs on, e.g. `cpu`, `cuda:0` or `metal:0`.
    fn device(&self) -> String;

    /// How strongly to prefer this backend, decided at run time from the device
    /// found; [`default_backend`](crate::default_backend) picks the highest.
    fn priority(&self) -> i32;

    /// Loads the model at `path` (a model directory or a model file).
    fn load_model(&self, path: &Path, opts: &LoadOptions) -> Result<Box<dyn TextModel>>;

    /// Whether this backend can load the model at `path`: its format and
    /// architecture, read cheaply (metadata, never weights).
    /// [`load_model`](crate::load_model) picks, among the available backends
    /// that answer [`CanLoad::Yes`], the one of highest priority. The default
    /// answers `Yes` (the backend does not say, and its `load_model` decides).
    fn can_load(&self, path: &Path) -> CanLoad {
        let _ = path;
        CanLoad::Yes
    }

    /// What this backend loads, in a line (formats and architectures), for
    /// listings such as `infer backends`; empty when it does not say.
    fn loads(&self) -> String {
        String::new()
    }

    /// The kinds of model file this backend loads (its [`can_load`](Self::can_load)
    /// still decides for a given path); empty when it does not say.
    fn formats(&self) -> Vec<ModelFormat> {
        Vec::new()
    }
}

/// A kind of model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ModelFormat {
    /// A `.gguf` file.
    Gguf,
    /// A Hugging Face directory (`config.json`, tokenizer, `*.safetensors`).
    HuggingFace,
}

impl ModelFormat {
    /// Every format, in listing order.
    pub const ALL: [ModelFormat; 2] = [ModelFormat::Gguf, ModelFormat::HuggingFace];

    /// A short name (`gguf`, `huggingface`).
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFormat::Gguf => "gguf",
            ModelFormat::HuggingFace => "huggingface",
        }
    }

    /// What a listing calls it.
    pub fn describe(self) -> &'static str {
        match self {
            ModelFormat::Gguf => "GGUF files",
            ModelFormat::HuggingFace => "Hugging Face directories",
        }
    }
}

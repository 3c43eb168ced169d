//! # backend-stub
//!
//! Two things for builds and tests that have no real engine:
//!
//! - [`StubBackend`], registered as `"stub"`: it compiles on every target,
//!   reports itself unavailable (with the reason) and refuses to load models.
//!   It is what a build gets where no real backend can run, and it is never
//!   chosen as the default backend.
//! - [`ScriptedModel`]: a deterministic [`TextModel`] that replays a script of
//!   tokens, honours every option it accepts (and refuses the others with
//!   [`Error::Unsupported`]), runs on a worker thread it owns and supports
//!   cancellation. It passes the conformance kit, so downstream code can test
//!   against the contracts without a model.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod scripted;

use std::path::Path;

use inference_core::{Availability, Backend, Error, LoadOptions, Result, TextModel};

pub use scripted::{ScriptedModel, ScriptedModelBuilder};

/// The name the stub backend registers under.
pub const NAME: &str = "stub";

/// The backend that runs nothing; see the [crate docs](crate).
#[derive(Debug, Clone, Copy, Default)]
pub struct StubBackend;

const REASON: &str =
    "the stub backend runs no models; link a real backend (e.g. `use backend_metal as _;`)";

impl Backend for StubBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn available(&self) -> Availability {
        Availability::Unavailable(REASON.to_owned())
    }

    fn device(&self) -> String {
        "none".to_owned()
    }

    fn priority(&self) -> i32 {
        i32::MIN
    }

    fn load_model(&self, path: &Path, _opts: &LoadOptions) -> Result<Box<dyn TextModel>> {
        tracing::debug!(path = %path.display(), "stub backend asked to load a model");
        Err(Error::BackendUnavailable {
            name: NAME.to_owned(),
            reason: REASON.to_owned(),
        })
    }
}

inference_core::register_backend!(|| Box::new(StubBackend));

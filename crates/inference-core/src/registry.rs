//! The backend registry, collected at link time with `inventory`.
//!
//! # The linker caveat
//!
//! A backend registers itself with [`register_backend!`](crate::register_backend)
//! in its own crate. The registration is a static that nothing refers to, so
//! the linker keeps it only when the final binary references the backend
//! crate. A binary (or test) that wants a backend must name it, for example:
//!
//! ```ignore
//! use backend_metal as _; // keeps the "mlx" and "metal" registrations
//! ```
//!
//! Without such a line, [`backends`] does not list it and [`load_model`]
//! answers [`Error::NoBackends`] or [`Error::BackendNotRegistered`].

use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::TextModel;
use crate::options::LoadOptions;

/// A backend's entry in the registry: a constructor called once, on first use.
pub struct BackendRegistration {
    constructor: fn() -> Box<dyn Backend>,
}

impl BackendRegistration {
    /// An entry that builds its backend with `constructor`.
    pub const fn new(constructor: fn() -> Box<dyn Backend>) -> Self {
        Self { constructor }
    }
}

inventory::collect!(BackendRegistration);

/// Registers a backend with the link-time registry.
///
/// ```ignore
/// inference_core::register_backend!(|| Box::new(MyBackend::new()));
/// ```
///
/// See [the linker caveat](crate::registry).
#[macro_export]
macro_rules! register_backend {
    ($constructor:expr) => {
        $crate::__private::inventory::submit! {
            $crate::BackendRegistration::new($constructor)
        }
    };
}

/// Every registered backend, built once, sorted by name; a duplicate name keeps
/// its first registration and logs a warning.
fn registry() -> &'static [Arc<dyn Backend>] {
    static REGISTRY: OnceLock<Vec<Arc<dyn Backend>>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut all: Vec<Arc<dyn Backend>> = inventory::iter::<BackendRegistration>
            .into_iter()
            .map(|r| Arc::from((r.constructor)()))
            .collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all.dedup_by(|later, first| {
            let dup = later.name() == first.name();
            if dup {
                tracing::warn!(
                    backend = first.name(),
                    "backend registered twice; keeping the first"
                );
            }
            dup
        });
        all
    })
}

/// Every registered backend, sorted by name, available or not.
pub fn backends() -> Vec<Arc<dyn Backend>> {
    registry().to_vec()
}

/// The backend registered as `name`.
pub fn get(name: &str) -> Result<Arc<dyn Backend>> {
    registry()
        .iter()
        .find(|b| b.name() == name)
        .cloned()
        .ok_or_else(|| Error::BackendNotRegistered {
            name: name.to_owned(),
            registered: names(),
        })
}

fn names() -> String {
    let all: Vec<&str> = registry().iter().map(|b| b.name()).collect();
    if all.is_empty() {
        "none".to_owned()
    } else {
        all.join(", ")
    }
}

/// The available backend of highest run-time priority (ties: the first by
/// name). Unavailable backends, the stub among them, are never chosen.
pub fn default_backend() -> Result<Arc<dyn Backend>> {
    let all = registry();
    if all.is_empty() {
        return Err(Error::NoBackends);
    }
    let mut best: Option<(i32, &Arc<dyn Backend>)> = None;
    let mut reasons = Vec::new();
    for b in all {
        match b.available().reason() {
            Some(reason) => reasons.push(format!("{}: {reason}", b.name())),
            None => {
                let p = b.priority();
                if best.is_none_or(|(bp, _)| p > bp) {
                    best = Some((p, b));
                }
            }
        }
    }
    best.map(|(_, b)| b.clone())
        .ok_or_else(|| Error::NoBackendAvailable {
            details: reasons.join("; "),
        })
}

/// The available backend of highest priority among those that list
/// `format` in [`Backend::formats`]: the one a model of that kind goes to
/// when no backend is named (unless its own [`Backend::can_load`] refuses
/// the path). `None` when no available backend lists it.
pub fn default_backend_for(format: crate::backend::ModelFormat) -> Option<Arc<dyn Backend>> {
    registry()
        .iter()
        .filter(|b| b.available().is_available() && b.formats().contains(&format))
        .fold(None::<&Arc<dyn Backend>>, |best, b| match best {
            Some(x) if x.priority() >= b.priority() => Some(x),
            _ => Some(b),
        })
        .cloned()
}

/// The backend [`load_model`] uses for `path` when no backend is named: the
/// available backend of highest priority among those that say they can load
/// it ([`Backend::can_load`]); when none says so, the [`default_backend`],
/// whose own load then reports what is wrong with the path (an unsupported
/// architecture, a missing file) as its typed error.
pub fn backend_for(path: impl AsRef<Path>) -> Result<Arc<dyn Backend>> {
    let path = path.as_ref();
    let fallback = default_backend()?;
    let mut best: Option<(i32, &Arc<dyn Backend>)> = None;
    for b in registry() {
        if !b.available().is_available() {
            continue;
        }
        match b.can_load(path) {
            crate::backend::CanLoad::Yes => {
                let p = b.priority();
                if best.is_none_or(|(bp, _)| p > bp) {
                    best = Some((p, b));
                }
            }
            crate::backend::CanLoad::No(why) => {
                tracing::debug!(backend = b.name(), path = %path.display(), %why, "cannot load");
            }
        }
    }
    Ok(best.map_or(fallback, |(_, b)| Arc::clone(b)))
}

/// Loads the model at `path` with the backend `opts.backend` names, or else
/// the one [`backend_for`] chooses for the path. Options are validated first.
pub fn load_model(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Box<dyn TextModel>> {
    let path = path.as_ref();
    opts.validate()?;
    let backend = match &opts.backend {
        Some(name) => get(name)?,
        None => backend_for(path)?,
    };
    if let Some(reason) = backend.available().reason() {
        return Err(Error::BackendUnavailable {
            name: backend.name().to_owned(),
            reason: reason.to_owned(),
        });
    }
    let span = tracing::info_span!("load_model", backend = backend.name(), path = %path.display());
    let _guard = span.enter();
    let started = std::time::Instant::now();
    let model = backend.load_model(path, opts)?;
    tracing::info!(
        model_type = model.model_type(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    Ok(model)
}

//! The link-time registry, seen from a binary that links backend-stub and
//! registers two fake backends of its own.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use backend_stub::ScriptedModel;
use inference_core::{
    register_backend, Availability, Backend, Error, GenerateOptions, LoadOptions, Result, TextModel,
};

/// A backend whose availability, device and priority are set per instance.
struct Fake {
    name: &'static str,
    available: bool,
    priority: fn() -> i32,
}

static LOADS: AtomicUsize = AtomicUsize::new(0);

/// Held by the tests that load through the fake backends, so that one test's
/// loads never land between another's readings of [`LOADS`].
static LOADING: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Backend for Fake {
    fn name(&self) -> &str {
        self.name
    }
    fn available(&self) -> Availability {
        if self.available {
            Availability::Available
        } else {
            Availability::Unavailable(format!("{} has no device here", self.name))
        }
    }
    fn device(&self) -> String {
        "fake:0".into()
    }
    fn priority(&self) -> i32 {
        (self.priority)()
    }
    fn load_model(&self, _path: &Path, _opts: &LoadOptions) -> Result<Box<dyn TextModel>> {
        LOADS.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(ScriptedModel::from_words(&[
            "from", " ", self.name,
        ])?))
    }
}

// Priorities are computed when asked, as a real backend derives them from the
// device it finds at run time.
fn low() -> i32 {
    10
}
fn high() -> i32 {
    std::hint::black_box(100)
}
fn highest() -> i32 {
    1_000
}

register_backend!(|| Box::new(Fake {
    name: "fake-cpu",
    available: true,
    priority: low
}));
register_backend!(|| Box::new(Fake {
    name: "fake-gpu",
    available: true,
    priority: high
}));
register_backend!(|| Box::new(Fake {
    name: "fake-offline",
    available: false,
    priority: highest
}));

// Keep the stub's registration: without a reference the linker drops it.
use backend_stub as _;

#[test]
fn lists_every_registration_sorted_by_name() {
    let names: Vec<String> = inference_core::backends()
        .iter()
        .map(|b| b.name().to_owned())
        .collect();
    assert_eq!(names, ["fake-cpu", "fake-gpu", "fake-offline", "stub"]);
    let stub = inference_core::get("stub").unwrap();
    let reason = stub.available().reason().unwrap().to_owned();
    assert!(reason.contains("runs no models"), "{reason}");
}

#[test]
fn default_is_the_available_backend_of_highest_priority() {
    // fake-offline has a higher priority but is unavailable; the stub never counts.
    assert_eq!(
        inference_core::default_backend().unwrap().name(),
        "fake-gpu"
    );
}

#[test]
fn lookup_errors_name_what_was_asked_and_what_exists() {
    let err = inference_core::get("cuda").err().unwrap();
    assert!(matches!(err, Error::BackendNotRegistered { .. }));
    assert_eq!(
        err.to_string(),
        "inference: backend \"cuda\" not registered (registered: fake-cpu, fake-gpu, fake-offline, stub)"
    );

    let err = inference_core::load_model("/m", &LoadOptions::new().backend("fake-offline"))
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "inference: backend \"fake-offline\" not available on this hardware: fake-offline has no device here"
    );

    let err = inference_core::load_model("/m", &LoadOptions::new().backend("stub"))
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::BackendUnavailable { name, .. } if name == "stub"),
        "{err}"
    );
}

#[test]
fn load_model_validates_options_before_touching_a_backend() {
    let _serial = LOADING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = LOADS.load(Ordering::SeqCst);
    let err = inference_core::load_model("/m", &LoadOptions::new().parallel_slots(0))
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            Error::InvalidOption {
                field: "parallel_slots",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(LOADS.load(Ordering::SeqCst), before);
}

#[test]
fn load_model_uses_the_named_or_the_default_backend() {
    let _serial = LOADING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let opts = GenerateOptions::new();
    let model = inference_core::load_model("/m", &LoadOptions::default()).unwrap();
    let text = model.generate("hi", &opts).unwrap().collect_text().unwrap();
    assert_eq!(text, "from fake-gpu");

    let model = inference_core::load_model("/m", &LoadOptions::new().backend("fake-cpu")).unwrap();
    let text = model.generate("hi", &opts).unwrap().collect_text().unwrap();
    assert_eq!(text, "from fake-cpu");
}

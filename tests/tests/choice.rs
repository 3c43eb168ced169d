//! Backend choice by path: two fake backends that load different formats.
//!
//! `fake-gguf` (priority 10) loads `.gguf` files; `fake-hf` (priority 5)
//! loads directories with a `config.json`; `fake-bin` (priority 1) loads
//! `.bin` files; `fake-offline` (priority 100) would load everything but is
//! unavailable. Each loaded model answers with its backend's name.

use std::path::Path;

use backend_stub::ScriptedModel;
use inference_core::{
    register_backend, Availability, Backend, CanLoad, GenerateOptions, LoadOptions, Result,
    TextModel,
};

struct Fake {
    name: &'static str,
    priority: i32,
    available: bool,
    /// The paths this backend says it can load.
    claims: fn(&Path) -> bool,
}

impl Backend for Fake {
    fn name(&self) -> &str {
        self.name
    }
    fn available(&self) -> Availability {
        if self.available {
            Availability::Available
        } else {
            Availability::Unavailable("no device".into())
        }
    }
    fn device(&self) -> String {
        "fake:0".into()
    }
    fn priority(&self) -> i32 {
        self.priority
    }
    fn load_model(&self, _path: &Path, _opts: &LoadOptions) -> Result<Box<dyn TextModel>> {
        Ok(Box::new(ScriptedModel::from_words(&[self.name])?))
    }
    fn can_load(&self, path: &Path) -> CanLoad {
        if (self.claims)(path) {
            CanLoad::Yes
        } else {
            CanLoad::No(format!("{} does not read {}", self.name, path.display()))
        }
    }
    fn loads(&self) -> String {
        format!("whatever {} claims", self.name)
    }
}

fn is_gguf(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "gguf")
}

fn is_hf_dir(p: &Path) -> bool {
    p.join("config.json").is_file()
}

fn is_bin(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "bin")
}

fn everything(_: &Path) -> bool {
    true
}

register_backend!(|| Box::new(Fake {
    name: "fake-gguf",
    priority: 10,
    available: true,
    claims: is_gguf,
}));
register_backend!(|| Box::new(Fake {
    name: "fake-hf",
    priority: 5,
    available: true,
    claims: is_hf_dir,
}));
register_backend!(|| Box::new(Fake {
    name: "fake-bin",
    priority: 1,
    available: true,
    claims: is_bin,
}));
register_backend!(|| Box::new(Fake {
    name: "fake-offline",
    priority: 100,
    available: false,
    claims: everything,
}));

/// The text the model loaded for `path` (with `opts`) answers: its backend.
fn loaded_by(path: &Path, opts: &LoadOptions) -> String {
    let model = inference_core::load_model(path, opts).unwrap();
    model
        .generate("hi", &GenerateOptions::new())
        .unwrap()
        .collect_text()
        .unwrap()
}

#[test]
fn each_path_goes_to_the_backend_that_can_load_it() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    let hf = tmp.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(hf.join("config.json"), "{}").unwrap();
    let bin = tmp.path().join("weights.bin");
    std::fs::write(&bin, b"").unwrap();
    let other = tmp.path().join("weights.txt");
    std::fs::write(&other, b"").unwrap();

    let opts = LoadOptions::new();
    // The GGUF backend outranks the HF one, but only loads GGUF files.
    assert_eq!(loaded_by(&gguf, &opts), "fake-gguf");
    assert_eq!(loaded_by(&hf, &opts), "fake-hf");
    // The lowest priority wins where it alone can load the path.
    assert_eq!(loaded_by(&bin, &opts), "fake-bin");
    // What no backend claims goes to the default backend, whose load then
    // says what is wrong (here: nothing, a fake loads anything).
    assert_eq!(loaded_by(&other, &opts), "fake-gguf");
    assert_eq!(inference_core::backend_for(&hf).unwrap().name(), "fake-hf");
    // A named backend is used as named.
    assert_eq!(
        loaded_by(&gguf, &opts.clone().backend("fake-bin")),
        "fake-bin"
    );
}

#[test]
fn unavailable_backends_are_never_chosen_and_the_default_is_unchanged() {
    // fake-offline claims everything at the highest priority, but has no device.
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    assert_eq!(
        inference_core::backend_for(&gguf).unwrap().name(),
        "fake-gguf"
    );
    // Without a path, the default is the available backend of highest priority.
    assert_eq!(
        inference_core::default_backend().unwrap().name(),
        "fake-gguf"
    );
}

#[test]
fn backends_say_what_they_load() {
    for b in inference_core::backends() {
        if b.name().starts_with("fake-") {
            assert_eq!(b.loads(), format!("whatever {} claims", b.name()));
        } else {
            assert!(b.loads().is_empty(), "{}: {}", b.name(), b.loads());
        }
    }
    let stub = inference_core::get("stub").unwrap();
    assert!(stub.can_load(Path::new("/anything")).is_yes());
    let gguf = inference_core::get("fake-gguf").unwrap();
    let no = gguf.can_load(Path::new("/x/config.json"));
    assert!(!no.is_yes());
    assert!(
        no.reason().is_some_and(|r| r.contains("does not read")),
        "{no:?}"
    );
}

// Keep the stub's registration: without a reference the linker drops it.
use backend_stub as _;

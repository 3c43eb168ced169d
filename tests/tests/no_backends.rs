//! A test binary that references no backend crate: the linker drops every
//! registration, which is the caveat the registry documents. (This crate does
//! depend on backend-stub; depending is not enough, a binary must name it.)

use inference_core::{Error, LoadOptions};

#[test]
fn unreferenced_backends_are_not_registered() {
    assert!(inference_core::backends().is_empty());
    let err = inference_core::default_backend().err().unwrap();
    assert!(matches!(err, Error::NoBackends));
    assert!(err.to_string().contains("use backend_metal as _;"), "{err}");
    let err = inference_core::load_model("/m", &LoadOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, Error::NoBackends), "{err}");
}

//! The crate's one `unsafe` operation: mapping a model file.

use std::fs::File;

use memmap2::Mmap;

/// Maps `file` read-only.
pub fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is read-only; its readers (the GGUF reader here, the
    // backends' safetensors loaders) bounds-check every range against the
    // mapped length before reading and copy tensors into their own buffers,
    // so no reference into the map outlives it. Another process truncating
    // the file while it is mapped is the one hazard no mapping can rule out
    // (the same holds for every loader that maps weights).
    unsafe { Mmap::map(file) }
}

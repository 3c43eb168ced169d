//! Gradient checkpointing per decoder layer: on a thread that asks for it
//! ([`checkpoint_layers`]), each layer of a training pass runs under MLX's
//! `checkpoint`, so that its intermediate arrays are recomputed during the
//! backward pass instead of kept from the forward one (mlx-lm's
//! `grad_checkpoint`). The layer's adapters are passed to it as inputs, for
//! the gradients to reach them.

use std::cell::Cell;

use mlx_rs::error::Exception;
use mlx_rs::Array;

use crate::cache::LayerCache;
use crate::ffi;
use crate::models::lora::{Lora, LoraSlot};

type Result<T> = std::result::Result<T, Exception>;

thread_local! {
    /// Whether layers run checkpointed on this thread.
    static CHECKPOINT_LAYERS: Cell<bool> = const { Cell::new(false) };
}

/// Runs the decoder layers of later passes on this thread checkpointed
/// (`true`) or directly (`false`); returns the previous setting.
pub fn checkpoint_layers(on: bool) -> bool {
    CHECKPOINT_LAYERS.with(|c| c.replace(on))
}

/// Runs a decoder layer, `body` (`h` and the layer's cache in, the new `h`
/// out), whose adapters sit in `slots`: directly, or checkpointed (see the
/// module's documentation). Checkpointed, the cache must be a training
/// pass's ([`LayerCache::pass`]) and the adapters without dropout (a
/// recomputed pass would draw other dropout masks).
pub fn run_layer<'m>(
    h: &Array,
    cache: &mut LayerCache,
    slots: impl FnOnce() -> Vec<&'m LoraSlot>,
    body: impl Fn(&Array, &mut LayerCache) -> Result<Array> + 'm,
) -> Result<Array> {
    if !CHECKPOINT_LAYERS.with(Cell::get) {
        return body(h, cache);
    }
    let Some(pass) = cache.pass_copy() else {
        return Err(Exception::custom(
            "gradient checkpointing runs training passes only",
        ));
    };
    let held: Vec<(&LoraSlot, Lora)> = slots()
        .into_iter()
        .filter_map(|s| s.get().map(|l| (s, l)))
        .collect();
    if held.iter().any(|(_, l)| l.dropout > 0.0) {
        return Err(Exception::custom(
            "gradient checkpointing with adapter dropout (a recomputed pass would draw other masks)",
        ));
    }
    let mut inputs = Vec::with_capacity(1 + 2 * held.len());
    inputs.push(h.clone());
    for (_, l) in &held {
        inputs.push(l.a.clone());
        inputs.push(l.b.clone());
    }
    let places: Vec<(&LoraSlot, f32)> = held.iter().map(|(s, l)| (*s, l.scale)).collect();
    let out = ffi::checkpoint(
        move |ins: &[Array]| {
            for (k, (slot, scale)) in places.iter().enumerate() {
                let (Some(a), Some(b)) = (ins.get(1 + 2 * k), ins.get(2 + 2 * k)) else {
                    return Err(Exception::custom("a checkpointed layer lost its adapters"));
                };
                slot.set(Some(Lora {
                    a: a.clone(),
                    b: b.clone(),
                    scale: *scale,
                    dropout: 0.0,
                }));
            }
            let Some(mut cache) = pass.pass_copy() else {
                return Err(Exception::custom("a checkpointed layer lost its cache"));
            };
            Ok(vec![body(&ins[0], &mut cache)?])
        },
        &inputs,
    )?;
    out.into_iter()
        .next()
        .ok_or_else(|| Exception::custom("a checkpointed layer returned nothing"))
}

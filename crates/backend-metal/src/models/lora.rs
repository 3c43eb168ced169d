//! LoRA in mlx-lm's orientation: a linear layer `y = x Wᵀ + b` with an
//! adapter computes `y + scale · (dropout(x) · A) · B`, with `A` `[in, r]`
//! and `B` `[r, out]`, the delta cast to `y`'s dtype (mlx-lm's
//! `LoRALinear`). The base weights are never touched: an adapter sits in a
//! [`LoraSlot`] beside them.

use std::cell::RefCell;

use mlx_rs::error::Exception;
use mlx_rs::ops::matmul;
use mlx_rs::{random, Array};

type Result<T> = std::result::Result<T, Exception>;

/// One layer's adapter.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `A`, `[in, r]`.
    pub a: Array,
    /// `B`, `[r, out]`.
    pub b: Array,
    /// The factor on the delta.
    pub scale: f32,
    /// Dropout on the adapter's input (0: none; only while training).
    pub dropout: f32,
}

impl Lora {
    /// `scale · (dropout(x) · A) · B`, in `dtype`.
    fn delta(&self, x: &Array, dtype: mlx_rs::Dtype) -> Result<Array> {
        let x = if self.dropout > 0.0 {
            let keep = 1.0 - self.dropout;
            let mask = random::bernoulli(&Array::from_f32(keep), x.shape(), None)?;
            x.multiply(&mask.as_dtype(x.dtype())?)?
                .multiply(&Array::from_f32(1.0 / keep).as_dtype(x.dtype())?)?
        } else {
            x.clone()
        };
        let z = matmul(&matmul(&x, &self.a)?, &self.b)?;
        z.multiply(Array::from_f32(self.scale))?.as_dtype(dtype)
    }
}

/// Where a linear layer's adapter goes: empty unless one is applied.
#[derive(Debug, Default)]
pub struct LoraSlot(RefCell<Option<Lora>>);

impl LoraSlot {
    /// Puts `lora` in (or empties the slot with `None`).
    pub fn set(&self, lora: Option<Lora>) {
        *self.0.borrow_mut() = lora;
    }

    /// Whether an adapter is in the slot.
    pub fn is_set(&self) -> bool {
        self.0.borrow().is_some()
    }

    /// The adapter in the slot.
    pub fn get(&self) -> Option<Lora> {
        self.0.borrow().clone()
    }

    /// `y`, the output of the layer for `x`, with the adapter's delta added.
    pub fn apply(&self, x: &Array, y: Array) -> Result<Array> {
        match &*self.0.borrow() {
            Some(lora) => y.add(lora.delta(x, y.dtype())?),
            None => Ok(y),
        }
    }
}

/// A linear layer an adapter can go on, as a model lists them.
#[derive(Debug, Clone, Copy)]
pub struct LoraTarget<'a> {
    /// The decoder layer it belongs to.
    pub layer: usize,
    /// Its key within the layer, as mlx-lm names it (`self_attn.q_proj`).
    pub key: &'static str,
    /// Input features.
    pub input: i32,
    /// Output features.
    pub output: i32,
    /// Where its adapter goes.
    pub slot: &'a LoraSlot,
}

impl LoraTarget<'_> {
    /// The module's path, as mlx-lm flattens it:
    /// `model.layers.{layer}.{key}` (its adapter's tensors add `.lora_a` and
    /// `.lora_b`).
    pub fn path(&self) -> String {
        format!("model.layers.{}.{}", self.layer, self.key)
    }
}

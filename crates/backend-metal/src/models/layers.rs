//! Building blocks shared by the model files: linear layers (dense or MLX
//! affine-quantised), embeddings, RMSNorm and rotary embeddings.

use std::cell::RefCell;
use std::rc::Rc;

use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::ops::{concatenate, dequantize, matmul, quantized_matmul, sigmoid, tanh};
use mlx_rs::transforms::compile::compile;
use mlx_rs::transforms::eval;
use mlx_rs::{fast, with_stream, Array, Device, Stream};

use inference_formats::config::{Quantization, Rope, RopeScaling, TextConfig};

use crate::cache::{attend, AttnMask, LayerCache, Positions};
use crate::distributed::Group;
use crate::error::{FormatError, LoadError};
use crate::load::weights::Weights;
use crate::models::fused::{QkRope, StepOut};
use crate::models::fused_gemv::GemvWeight;
use crate::models::lora::LoraSlot;

type Result<T> = std::result::Result<T, Exception>;

/// A quantised weight in MLX's affine layout.
#[derive(Debug)]
pub struct QuantWeight {
    /// Packed weights, `[out, in × bits / 32]` as uint32.
    pub weight: Array,
    /// Per-group scales, `[out, in / group]`.
    pub scales: Array,
    /// Per-group biases, `[out, in / group]`.
    pub biases: Array,
    /// Elements per group.
    pub group_size: i32,
    /// Bits per element.
    pub bits: i32,
}

impl QuantWeight {
    /// Loads `prefix.{weight,scales,biases}` for a logical `[out, in]` matrix.
    fn load(
        w: &mut Weights,
        prefix: &str,
        out: i32,
        inp: i32,
        q: Quantization,
    ) -> std::result::Result<Self, LoadError> {
        if q.bits <= 0 || 32 % q.bits != 0 || q.group_size <= 0 || inp % q.group_size != 0 {
            return Err(FormatError::Config(format!(
                "quantization bits {} / group {} does not fit `{prefix}` with {inp} inputs",
                q.bits, q.group_size
            ))
            .into());
        }
        let packed = inp * q.bits / 32;
        let groups = inp / q.group_size;
        Ok(Self {
            weight: w.take(&format!("{prefix}.weight"), &[out, packed])?,
            scales: w.take(&format!("{prefix}.scales"), &[out, groups])?,
            biases: w.take(&format!("{prefix}.biases"), &[out, groups])?,
            group_size: q.group_size,
            bits: q.bits,
        })
    }

    /// `x @ Wᵀ` with the quantised matrix.
    fn matmul_t(&self, x: &Array) -> Result<Array> {
        quantized_matmul(
            x,
            &self.weight,
            &self.scales,
            &self.biases,
            true,
            self.group_size,
            self.bits,
        )
    }
}

thread_local! {
    /// The CPU streams matmuls are split over on this thread (none: no split).
    static CPU_STREAMS: RefCell<Vec<Stream>> = const { RefCell::new(Vec::new()) };
}

/// Splits every matmul later computed on this thread over `n` new CPU
/// streams, so that `n` cores work on each one (`n` below 2: no split). The
/// worker of a model that runs on the CPU calls it once, with the number of
/// cores.
pub fn split_cpu_matmuls(n: usize) {
    CPU_STREAMS.with_borrow_mut(|streams| {
        *streams = if n < 2 {
            Vec::new()
        } else {
            (0..n)
                .map(|_| Stream::new_with_device(&Device::cpu()))
                .collect()
        };
    });
}

/// A weight matrix `[out, in]`, dense or quantised.
#[derive(Debug)]
pub enum Matrix {
    /// Dense.
    Dense(Array),
    /// MLX affine-quantised.
    Quantized(QuantWeight),
}

impl Matrix {
    /// Loads `prefix.weight` (quantised when `prefix.scales` exists and the
    /// checkpoint is quantised).
    pub fn load(
        w: &mut Weights,
        prefix: &str,
        out: i32,
        inp: i32,
        quant: Option<Quantization>,
    ) -> std::result::Result<Self, LoadError> {
        match w.quantization_of(prefix).or(quant) {
            Some(q) if w.contains(&format!("{prefix}.scales")) => Ok(Matrix::Quantized(
                QuantWeight::load(w, prefix, out, inp, q)?,
            )),
            _ => Ok(Matrix::Dense(
                w.take(&format!("{prefix}.weight"), &[out, inp])?,
            )),
        }
    }

    /// `x @ Wᵀ`. On a thread that [`split_cpu_matmuls`] set up, the output
    /// features are split into one part per CPU stream, each part computed
    /// on its own stream (MLX runs each CPU stream on a thread of its own, and
    /// its CPU matmuls are single-threaded), and the parts concatenated. Each
    /// output element is the same dot product either way.
    pub fn matmul_t(&self, x: &Array) -> Result<Array> {
        CPU_STREAMS.with_borrow(|streams| {
            let n = i32::try_from(streams.len()).unwrap_or(0);
            let rows = self.out_features();
            if n < 2 || rows < n {
                return self.matmul_t_here(x);
            }
            let parts = streams
                .iter()
                .zip(0..n)
                .map(|(stream, i)| {
                    let (lo, hi) = (rows * i / n, rows * (i + 1) / n);
                    with_stream(stream, || self.row_range(lo, hi)?.matmul_t_here(x))
                })
                .collect::<Result<Vec<_>>>()?;
            concatenate(&parts, -1)
        })
    }

    /// `x @ Wᵀ` as [`matmul_t`](Self::matmul_t) computes it, left in its
    /// parts along the output features (one part where nothing is split),
    /// with each part's first feature: for a consumer that reduces over the
    /// features (a loss over logits) and need not pay for the concatenation.
    pub fn matmul_t_parts(&self, x: &Array) -> Result<Vec<(i32, Array)>> {
        CPU_STREAMS.with_borrow(|streams| {
            let n = i32::try_from(streams.len()).unwrap_or(0);
            let rows = self.out_features();
            if n < 2 || rows < n {
                return Ok(vec![(0, self.matmul_t_here(x)?)]);
            }
            streams
                .iter()
                .zip(0..n)
                .map(|(stream, i)| {
                    let (lo, hi) = (rows * i / n, rows * (i + 1) / n);
                    with_stream(stream, || {
                        Ok((lo, self.row_range(lo, hi)?.matmul_t_here(x)?))
                    })
                })
                .collect()
        })
    }

    /// `x @ Wᵀ` on the current stream.
    fn matmul_t_here(&self, x: &Array) -> Result<Array> {
        match self {
            Matrix::Dense(weight) => matmul(x, weight.t()),
            Matrix::Quantized(q) => q.matmul_t(x),
        }
    }

    /// Output features (rows of the logical matrix).
    fn out_features(&self) -> i32 {
        match self {
            Matrix::Dense(w) => w.dim(0),
            Matrix::Quantized(q) => q.weight.dim(0),
        }
    }

    /// Rows `lo..hi` (views, no copy).
    fn row_range(&self, lo: i32, hi: i32) -> Result<Matrix> {
        Ok(match self {
            Matrix::Dense(w) => Matrix::Dense(w.index(lo..hi)),
            Matrix::Quantized(q) => Matrix::Quantized(QuantWeight {
                weight: q.weight.index(lo..hi),
                scales: q.scales.index(lo..hi),
                biases: q.biases.index(lo..hi),
                group_size: q.group_size,
                bits: q.bits,
            }),
        })
    }

    /// Rows `ids` of the matrix (an embedding look-up), dense.
    pub fn rows(&self, ids: &Array) -> Result<Array> {
        match self {
            Matrix::Dense(weight) => weight.take_axis(ids, 0),
            Matrix::Quantized(q) => {
                let w = q.weight.take_axis(ids, 0)?;
                let s = q.scales.take_axis(ids, 0)?;
                let b = q.biases.take_axis(ids, 0)?;
                dequantize(&w, &s, &b, q.group_size, q.bits)
            }
        }
    }
}

/// A linear layer `y = x Wᵀ + b`.
#[derive(Debug)]
pub struct Linear {
    /// The weight.
    pub weight: Matrix,
    /// The bias, when the layer has one.
    pub bias: Option<Array>,
    /// Its LoRA adapter, when one is applied.
    pub lora: LoraSlot,
    /// Under tensor parallelism, the group over which this rank's partial
    /// product (its share of the input features) is summed, before the
    /// bias.
    pub reduce: Option<Rc<Group>>,
}

impl Linear {
    /// Loads `prefix.weight` (and `prefix.bias` when `bias`).
    pub fn load(
        w: &mut Weights,
        prefix: &str,
        out: i32,
        inp: i32,
        bias: bool,
        quant: Option<Quantization>,
    ) -> std::result::Result<Self, LoadError> {
        let weight = Matrix::load(w, prefix, out, inp, quant)?;
        let bias = if bias {
            Some(w.take(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            lora: LoraSlot::default(),
            reduce: w.reduce_group(prefix),
        })
    }

    /// One layer computing every part together (the first part's outputs
    /// first), when all store their weights alike (all dense of one dtype,
    /// or all quantised with the same bits and group) and all or none have
    /// a bias; `None` otherwise. The stacked arrays are evaluated at once, so
    /// the parts' memory is freed when the caller drops them.
    pub fn stack(parts: &[&Linear]) -> Result<Option<Linear>> {
        let Some((first, rest)) = parts.split_first() else {
            return Ok(None);
        };
        let cat = |pick: &dyn Fn(&Linear) -> Option<&Array>| -> Result<Option<Array>> {
            let arrays: Option<Vec<&Array>> = parts.iter().map(|p| pick(p)).collect();
            arrays.map(|a| concatenate(&a, 0)).transpose()
        };
        let weight = match &first.weight {
            Matrix::Dense(w0) => {
                let alike = rest
                    .iter()
                    .all(|p| matches!(&p.weight, Matrix::Dense(w) if w.dtype() == w0.dtype()));
                if !alike {
                    return Ok(None);
                }
                cat(&|p| match &p.weight {
                    Matrix::Dense(w) => Some(w),
                    Matrix::Quantized(_) => None,
                })?
                .map(Matrix::Dense)
            }
            Matrix::Quantized(q0) => {
                let alike = rest.iter().all(|p| {
                    matches!(&p.weight, Matrix::Quantized(q)
                        if (q.bits, q.group_size) == (q0.bits, q0.group_size))
                });
                if !alike {
                    return Ok(None);
                }
                let quant = |f: fn(&QuantWeight) -> &Array| {
                    cat(&|p| match &p.weight {
                        Matrix::Quantized(q) => Some(f(q)),
                        Matrix::Dense(_) => None,
                    })
                };
                match (
                    quant(|q| &q.weight)?,
                    quant(|q| &q.scales)?,
                    quant(|q| &q.biases)?,
                ) {
                    (Some(weight), Some(scales), Some(biases)) => {
                        Some(Matrix::Quantized(QuantWeight {
                            weight,
                            scales,
                            biases,
                            group_size: q0.group_size,
                            bits: q0.bits,
                        }))
                    }
                    _ => None,
                }
            }
        };
        let Some(weight) = weight else {
            return Ok(None);
        };
        let bias = match parts.iter().filter(|p| p.bias.is_some()).count() {
            0 => None,
            n if n == parts.len() => cat(&|p| p.bias.as_ref())?,
            _ => return Ok(None),
        };
        if parts.iter().any(|p| p.reduce.is_some()) {
            return Ok(None);
        }
        let stacked = Linear {
            weight,
            bias,
            lora: LoraSlot::default(),
            reduce: None,
        };
        eval(stacked.arrays())?;
        Ok(Some(stacked))
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = match &self.weight {
            Matrix::Dense(w) => vec![w],
            Matrix::Quantized(q) => vec![&q.weight, &q.scales, &q.biases],
        };
        v.extend(self.bias.iter());
        v
    }

    /// Applies the layer (and its adapter).
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let y = self.weight.matmul_t(x)?;
        let y = match &self.reduce {
            Some(group) => group.all_sum(&y)?,
            None => y,
        };
        let y = match &self.bias {
            Some(b) => y.add(b)?,
            None => y,
        };
        self.lora.apply(x, y)
    }

    /// The weight of a layer that applies nothing else (no bias, adapter
    /// or tensor-parallel sum), as a fused product reads it: what it may
    /// take in the layer's place.
    pub fn plain_weight(&self) -> Option<GemvWeight<'_>> {
        if self.bias.is_some() || self.reduce.is_some() || self.lora.is_set() {
            return None;
        }
        Some(match &self.weight {
            Matrix::Dense(w) => GemvWeight::Dense(w),
            Matrix::Quantized(q) => GemvWeight::Affine {
                weight: &q.weight,
                scales: &q.scales,
                biases: &q.biases,
                bits: q.bits,
                group: q.group_size,
            },
        })
    }

    /// Input features.
    pub fn in_features(&self) -> i32 {
        match &self.weight {
            Matrix::Dense(w) => w.dim(1),
            Matrix::Quantized(q) => q.weight.dim(1) * 32 / q.bits,
        }
    }
}

/// Linear layers applied to one input, stacked into a single matmul whose
/// output is split where their weights allow it ([`Linear::stack`]): one
/// kernel instead of `N` per layer and step.
#[derive(Debug)]
enum LinearGroup<const N: usize> {
    /// One matmul, each part's output columns `start..end`, and each part's
    /// adapter (added to its columns).
    Stacked(Linear, [(i32, i32); N], [LoraSlot; N]),
    /// Kept apart (their weights are stored differently).
    Apart([Linear; N]),
}

impl<const N: usize> LinearGroup<N> {
    /// Stacks `parts` where they allow it; `what` names them in an error.
    fn new(parts: [Linear; N], what: &str) -> std::result::Result<Self, LoadError> {
        if !stacking() {
            return Ok(LinearGroup::Apart(parts));
        }
        let stacked = Linear::stack(&parts.each_ref())
            .map_err(|e| FormatError::Config(format!("stacking {what}: {e}")))?;
        Ok(match stacked {
            Some(s) => {
                let mut at = 0;
                let columns = parts.each_ref().map(|p| {
                    let start = at;
                    at += p.weight.out_features();
                    (start, at)
                });
                LinearGroup::Stacked(s, columns, std::array::from_fn(|_| LoraSlot::default()))
            }
            None => LinearGroup::Apart(parts),
        })
    }

    /// Each part's adapter slot, input and output features, in order.
    fn targets(&self) -> [(&LoraSlot, i32, i32); N] {
        match self {
            LinearGroup::Stacked(s, columns, loras) => {
                let input = s.in_features();
                std::array::from_fn(|i| (&loras[i], input, columns[i].1 - columns[i].0))
            }
            LinearGroup::Apart(parts) => std::array::from_fn(|i| {
                let p = &parts[i];
                (&p.lora, p.in_features(), p.weight.out_features())
            }),
        }
    }

    /// For one position (`x` `[B, 1, in]`) of a stacked group without
    /// adapters, each part's output as heads of `head_dim` features,
    /// `[B, heads, 1, head_dim]`: the stacked output is reshaped once and
    /// split once (two graph nodes, where slicing and reshaping each part
    /// takes 2N). `None` where this does not apply.
    fn forward_heads(&self, x: &Array, head_dim: i32) -> Result<Option<[Array; N]>> {
        let LinearGroup::Stacked(_, columns, _) = self else {
            return Ok(None);
        };
        if !heads_in_one_split() || columns.iter().any(|&(a, b)| (b - a) % head_dim != 0) {
            return Ok(None);
        }
        let Some(y) = self.stacked_step(x)? else {
            return Ok(None);
        };
        let heads = y.dim(-1) / head_dim;
        let y = y.reshape(&[x.dim(0), heads, 1, head_dim])?;
        Ok(Some(split_parts(
            &y,
            &columns.map(|(_, end)| end / head_dim),
            1,
        )?))
    }

    /// For one position (`x` `[B, 1, in]`) of a stacked group without
    /// adapters, the stacked output `[B, 1, out]` itself; `None` where this
    /// does not apply.
    fn stacked_step(&self, x: &Array) -> Result<Option<Array>> {
        match self {
            LinearGroup::Stacked(s, _, loras)
                if x.dim(1) == 1 && !loras.iter().any(LoraSlot::is_set) =>
            {
                s.forward(x).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The stacked weight (the parts' rows in order) of a group that
    /// applies nothing else ([`Linear::plain_weight`], no adapters).
    fn plain_weight(&self) -> Option<GemvWeight<'_>> {
        match self {
            LinearGroup::Stacked(s, _, loras) if !loras.iter().any(LoraSlot::is_set) => {
                s.plain_weight()
            }
            _ => None,
        }
    }

    /// Each part's output for `x` `[B, L, in]`, in order.
    fn forward(&self, x: &Array) -> Result<[Array; N]> {
        match self {
            LinearGroup::Stacked(s, columns, loras) => {
                let y = s.forward(x)?;
                // One `Split` node for every part (N slices would be N).
                let mut ys = split_parts(&y, &columns.map(|(_, end)| end), -1)?;
                for (y, lora) in ys.iter_mut().zip(loras) {
                    if lora.is_set() {
                        *y = lora.apply(x, y.clone())?;
                    }
                }
                Ok(ys)
            }
            LinearGroup::Apart(parts) => {
                let ys = parts
                    .iter()
                    .map(|p| p.forward(x))
                    .collect::<Result<Vec<_>>>()?;
                <[Array; N]>::try_from(ys)
                    .map_err(|_| Exception::custom("a linear group lost a part"))
            }
        }
    }
}

/// Whether linear layers applied to one input are stacked into one matmul
/// ([`LinearGroup`]; `INFER_STACK=0` keeps them apart, for an A/B).
fn stacking() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::env_switch("INFER_STACK").unwrap_or(true))
}

/// Whether one-position steps take [`LinearGroup::forward_heads`]
/// (`INFER_STEP_SPLIT=0` turns it off, for an A/B).
fn heads_in_one_split() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::env_switch("INFER_STEP_SPLIT").unwrap_or(true))
}

/// `y` split along `axis` into `N` parts ending at `ends` (the last end is
/// the axis's length), as one multi-output MLX node.
fn split_parts<const N: usize>(y: &Array, ends: &[i32; N], axis: i32) -> Result<[Array; N]> {
    let parts = y.split_at_indices(&ends[..N.saturating_sub(1)], axis)?;
    <[Array; N]>::try_from(parts).map_err(|_| Exception::custom("a split lost a part"))
}

/// The activation of a gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU: Qwen, Llama).
    Silu,
    /// GELU, tanh approximation (Gemma).
    GeluTanh,
}

/// `act(gate) × up` as one compiled MLX function.
type FusedActivation = Box<dyn for<'a> FnMut((&'a Array, &'a Array)) -> Result<Array>>;

/// A gated MLP: `down(act(gate(x)) × up(x))`.
pub struct GatedMlp {
    gate_up: LinearGroup<2>,
    down_proj: Linear,
    activation: Activation,
    /// Compiled once per layer: a compiled function traces its graph on the
    /// first call and replays it after, where compiling at each call would
    /// trace (and fuse) it again on every step.
    fused: RefCell<FusedActivation>,
}

impl std::fmt::Debug for GatedMlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatedMlp")
            .field("gate_up", &self.gate_up)
            .field("down_proj", &self.down_proj)
            .field("activation", &self.activation)
            .finish_non_exhaustive()
    }
}

impl GatedMlp {
    /// Loads `prefix.{gate,up,down}_proj` for `c`'s sizes, with biases when
    /// `bias`.
    pub fn load(
        w: &mut Weights,
        prefix: &str,
        c: &TextConfig,
        bias: bool,
        activation: Activation,
    ) -> std::result::Result<Self, LoadError> {
        let (hidden, inter, q) = (c.hidden_size, c.intermediate_size, c.quantization);
        let gate = Linear::load(w, &format!("{prefix}.gate_proj"), inter, hidden, bias, q)?;
        let up = Linear::load(w, &format!("{prefix}.up_proj"), inter, hidden, bias, q)?;
        Ok(Self {
            gate_up: LinearGroup::new([gate, up], &format!("`{prefix}` gate and up"))?,
            down_proj: Linear::load(w, &format!("{prefix}.down_proj"), hidden, inter, bias, q)?,
            activation,
            fused: RefCell::new(match activation {
                Activation::Silu => Box::new(compile(silu_mul, true)),
                Activation::GeluTanh => Box::new(compile(gelu_tanh_mul, true)),
            }),
        })
    }

    /// Its linear layers as LoRA targets, keyed as mlx-lm keys them within
    /// a decoder layer: `(key, slot, in, out)`.
    pub fn lora_targets(&self) -> [(&'static str, &LoraSlot, i32, i32); 3] {
        let [(gs, gi, go), (us, ui, uo)] = self.gate_up.targets();
        let d = &self.down_proj;
        [
            ("mlp.gate_proj", gs, gi, go),
            ("mlp.up_proj", us, ui, uo),
            (
                "mlp.down_proj",
                &d.lora,
                d.in_features(),
                d.weight.out_features(),
            ),
        ]
    }

    /// For a SiLU MLP whose gate and up projections are one stacked weight
    /// (gate rows first), both it and the down projection applying nothing
    /// else: `(gate/up, down)`.
    pub fn plain_swiglu(&self) -> Option<(GemvWeight<'_>, GemvWeight<'_>)> {
        if self.activation != Activation::Silu {
            return None;
        }
        Some((self.gate_up.plain_weight()?, self.down_proj.plain_weight()?))
    }

    /// Applies the MLP.
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let [gate, up] = self.gate_up.forward(x)?;
        let hidden = (self.fused.borrow_mut())((&gate, &up))?;
        self.down_proj.forward(&hidden)
    }
}

/// `silu(gate) × up`, compiled into one kernel.
fn silu_mul((gate, up): (&Array, &Array)) -> Result<Array> {
    gate.multiply(sigmoid(gate)?)?.multiply(up)
}

/// `gelu_tanh(gate) × up`, compiled into one kernel. The constants take the
/// inputs' dtype, so a bf16 MLP stays bf16 (an f32 constant would promote
/// the result, and every later matmul with it).
fn gelu_tanh_mul((gate, up): (&Array, &Array)) -> Result<Array> {
    let c = |v: f32| Array::from_f32(v).as_dtype(gate.dtype());
    let cube = gate.multiply(gate)?.multiply(gate)?;
    let inner = gate
        .add(cube.multiply(c(0.044_715)?)?)?
        .multiply(c((2.0 / std::f32::consts::PI).sqrt())?)?;
    let one_plus = tanh(&inner)?.add(c(1.0)?)?;
    gate.multiply(c(0.5)?)?.multiply(one_plus)?.multiply(up)
}

/// A normalisation over the last axis (queries' and keys' per-head norms).
pub trait Norm {
    /// Normalises the last axis of `x`.
    fn forward(&self, x: &Array) -> Result<Array>;

    /// The weight and epsilon where the norm is MLX's plain `rms_norm`
    /// with that weight (what a fused kernel can compute instead).
    fn rms_weight(&self) -> Option<(&Array, f32)> {
        None
    }
}

/// Grouped-query self-attention with RoPE and optional per-head q/k norms,
/// attending through a [`LayerCache`].
#[derive(Debug)]
pub struct Attention<N> {
    /// The query, key and value projections.
    qkv: LinearGroup<3>,
    o_proj: Linear,
    q_norm: Option<N>,
    k_norm: Option<N>,
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    scale: f32,
}

/// Which projections of an attention block have biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionBiases {
    /// On the q, k and v projections.
    pub qkv: bool,
    /// On the output projection.
    pub o: bool,
}

impl<N: Norm> Attention<N> {
    /// Loads `prefix.{q,k,v,o}_proj` for `c`'s sizes, with `biases`; `norm`
    /// loads `prefix.q_norm` / `prefix.k_norm` (or answers `None` where the
    /// architecture has none). Scores are scaled by `scale`.
    pub fn load(
        w: &mut Weights,
        prefix: &str,
        c: &TextConfig,
        biases: AttentionBiases,
        scale: f32,
        norm: impl Fn(&mut Weights, &str) -> std::result::Result<Option<N>, LoadError>,
    ) -> std::result::Result<Self, LoadError> {
        let (h, kv, d, hidden, q) = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.hidden_size,
            c.quantization,
        );
        let proj = |w: &mut Weights, name: &str, out: i32| {
            Linear::load(w, &format!("{prefix}.{name}"), out, hidden, biases.qkv, q)
        };
        let qkv = [
            proj(w, "q_proj", h * d)?,
            proj(w, "k_proj", kv * d)?,
            proj(w, "v_proj", kv * d)?,
        ];
        Ok(Self {
            qkv: LinearGroup::new(qkv, &format!("`{prefix}` q, k and v"))?,
            o_proj: Linear::load(w, &format!("{prefix}.o_proj"), hidden, h * d, biases.o, q)?,
            q_norm: norm(w, &format!("{prefix}.q_norm"))?,
            k_norm: norm(w, &format!("{prefix}.k_norm"))?,
            heads: h,
            kv_heads: kv,
            head_dim: d,
            scale,
        })
    }

    /// Its projections as LoRA targets, keyed as mlx-lm keys them within a
    /// decoder layer: `(key, slot, in, out)`.
    pub fn lora_targets(&self) -> [(&'static str, &LoraSlot, i32, i32); 4] {
        let [(qs, qi, qo), (ks, ki, ko), (vs, vi, vo)] = self.qkv.targets();
        let o = &self.o_proj;
        [
            ("self_attn.q_proj", qs, qi, qo),
            ("self_attn.k_proj", ks, ki, ko),
            ("self_attn.v_proj", vs, vi, vo),
            (
                "self_attn.o_proj",
                &o.lora,
                o.in_features(),
                o.weight.out_features(),
            ),
        ]
    }

    /// Attends `x` `[B, L, hidden]` after the positions in `cache`, which it
    /// extends with every position's keys and values. With `last_only`, only
    /// the last position queries (the output is `[B, 1, hidden]`): what the
    /// final layer of a prefill needs, since only the last position's hidden
    /// state is read.
    ///
    /// With `fused` (a CUDA model's kernel), a decode step takes q and k,
    /// normed and rotated, from one kernel over the stacked projection.
    pub fn forward(
        &self,
        x: &Array,
        cache: &mut LayerCache,
        rope: &RotaryEmbedding,
        last_only: bool,
        fused: Option<&QkRope>,
    ) -> Result<Array> {
        if let Some(kernel) = fused.filter(|k| k.applies(x, rope)) {
            if let Some(out) = self.fused_step(x, cache, rope, kernel)? {
                return Ok(out);
            }
        }
        let (b, l) = (x.dim(0), x.dim(1));
        let trim = last_only && l > 1;
        let norm = |y: Array, norm: Option<&N>| match norm {
            Some(norm) => norm.forward(&y),
            None => Ok(y),
        };
        // Queries, keys and values as heads `[B, n, L, D]`, q and k normed.
        let [q, k, v] = match self.qkv.forward_heads(x, self.head_dim)? {
            // One position: the projections are heads already.
            Some([q, k, v]) => [
                norm(q, self.q_norm.as_ref())?,
                norm(k, self.k_norm.as_ref())?,
                v,
            ],
            None => {
                let [q, k, v] = self.qkv.forward(x)?;
                // With `last_only`, the last position alone queries.
                let q = if trim { last_keepdim(&q) } else { q };
                // `[B, L, n × D]` → `[B, n, L, D]`, normed per head. With one
                // position (a decode step) both layouts hold the same bytes in
                // the same order, so a reshape alone does it: one graph node
                // fewer per projection and step, and host time per node is
                // what bounds small models.
                let heads = |y: Array, n: i32, n_norm: Option<&N>| -> Result<Array> {
                    let ly = y.dim(1);
                    if ly == 1 {
                        return norm(y.reshape(&[b, n, 1, self.head_dim])?, n_norm);
                    }
                    norm(y.reshape(&[b, ly, n, self.head_dim])?, n_norm)?
                        .transpose_axes(&[0, 2, 1, 3])
                };
                [
                    heads(q, self.heads, self.q_norm.as_ref())?,
                    heads(k, self.kv_heads, self.k_norm.as_ref())?,
                    heads(v, self.kv_heads, None)?,
                ]
            }
        };
        let lq = q.dim(2);
        let start = cache.positions()?;
        let q = rope.forward(&q, &start.shifted(l - lq)?)?;
        let k = rope.forward(&k, &start)?;
        let (k, v, mask) = cache.update(&k, &v)?;
        let mask = if trim { mask.last_query()? } else { mask };
        let out = attend(&q, &k, &v, self.scale, &mask)?;
        // Back to `[B, Lq, H × D]` (again a reshape alone for one query).
        let out = match lq {
            1 => out,
            _ => out.transpose_axes(&[0, 2, 1, 3])?,
        }
        .reshape(&[b, lq, self.heads * self.head_dim])?;
        self.o_proj.forward(&out)
    }
}

impl<N: Norm> Attention<N> {
    /// A decode step through `kernel`; `None` (nothing computed) where the
    /// projections are not stacked, carry adapters, or the norms are not
    /// the kernel's.
    fn fused_step(
        &self,
        x: &Array,
        cache: &mut LayerCache,
        rope: &RotaryEmbedding,
        kernel: &QkRope,
    ) -> Result<Option<Array>> {
        let Some(norms) = self.kernel_norms(kernel) else {
            return Ok(None);
        };
        let Some(qkv) = self.qkv.stacked_step(x)? else {
            return Ok(None);
        };
        let out = self.attend_with(&qkv, norms, cache, rope, kernel)?;
        let out = out.reshape(&[x.dim(0), 1, self.heads * self.head_dim])?;
        self.o_proj.forward(&out).map(Some)
    }

    /// The q and k norms' weights as `kernel` takes them (`Some(None)` for
    /// a model without q/k norms); `None` where the kernel was not made for
    /// this layer's norms.
    fn kernel_norms(&self, kernel: &QkRope) -> Option<Option<(&Array, &Array)>> {
        let norms = match (&self.q_norm, &self.k_norm) {
            (None, None) => None,
            (Some(q), Some(k)) => match (q.rms_weight(), k.rms_weight()) {
                (Some((qw, qe)), Some((kw, ke))) if qe == ke => Some((qw, kw, qe)),
                _ => return None,
            },
            _ => return None,
        };
        kernel
            .takes_norm(norms.map(|(_, _, e)| e))
            .then_some(norms.map(|(q, k, _)| (q, k)))
    }

    /// The stacked q/k/v and output projections' weights, where both apply
    /// nothing else ([`Linear::plain_weight`]).
    pub fn plain_qkv_o(&self) -> Option<(GemvWeight<'_>, GemvWeight<'_>)> {
        Some((self.qkv.plain_weight()?, self.o_proj.plain_weight()?))
    }

    /// A decode step's attention from the stacked projection `qkv`
    /// `[B, 1, (H + 2·Hkv)·D]` through `kernel`, extending `cache`: the
    /// heads `[B, H, 1, D]` before the output projection; `None` (nothing
    /// computed) where the kernel was not made for this layer's norms.
    pub fn attend_projected(
        &self,
        qkv: &Array,
        cache: &mut LayerCache,
        rope: &RotaryEmbedding,
        kernel: &QkRope,
    ) -> Result<Option<Array>> {
        match self.kernel_norms(kernel) {
            Some(norms) => self.attend_with(qkv, norms, cache, rope, kernel).map(Some),
            None => Ok(None),
        }
    }

    /// [`Attention::attend_projected`] with the norms' weights already
    /// matched to `kernel` ([`Attention::kernel_norms`]).
    fn attend_with(
        &self,
        qkv: &Array,
        norms: Option<(&Array, &Array)>,
        cache: &mut LayerCache,
        rope: &RotaryEmbedding,
        kernel: &QkRope,
    ) -> Result<Array> {
        if let (true, LayerCache::Full(c)) = (kernel.writes_cache(), &mut *cache) {
            let written = c.write_in_place(1, |kc, vc, at| {
                kernel.attend_into(qkv, norms, rope, at, (kc, vc), self.scale)
            })?;
            match written {
                Some((_, _, StepOut::Attended(out))) => return Ok(out),
                // One query sees every key.
                Some((k, v, StepOut::Query(q))) => {
                    return attend(&q, &k, &v, self.scale, &AttnMask::None)
                }
                None => {}
            }
        }
        let start = cache.positions()?;
        let (q, k, v) = kernel.apply(qkv, norms, rope, &start)?;
        let (k, v, mask) = cache.update(&k, &v)?;
        attend(&q, &k, &v, self.scale, &mask)
    }
}

/// The last position of `x` `[B, L, …]`, keeping the axis: `[B, 1, …]`.
pub fn last_keepdim(x: &Array) -> Array {
    let l = x.dim(1);
    x.index((.., l - 1..))
}

/// RMSNorm with a learned scale.
#[derive(Debug)]
pub struct RmsNorm {
    /// The scale (for Gemma, already `1 + w`).
    pub weight: Array,
    /// Epsilon.
    pub eps: f32,
}

impl Norm for RmsNorm {
    fn forward(&self, x: &Array) -> Result<Array> {
        RmsNorm::forward(self, x)
    }

    fn rms_weight(&self) -> Option<(&Array, f32)> {
        Some((&self.weight, self.eps))
    }
}

impl RmsNorm {
    /// Loads `prefix.weight` of size `dim`.
    pub fn load(
        w: &mut Weights,
        prefix: &str,
        dim: i32,
        eps: f32,
    ) -> std::result::Result<Self, LoadError> {
        Ok(Self {
            weight: w.take(&format!("{prefix}.weight"), &[dim])?,
            eps,
        })
    }

    /// Normalises the last axis of `x`.
    pub fn forward(&self, x: &Array) -> Result<Array> {
        fast::rms_norm(x, Some(&self.weight), self.eps)
    }
}

/// Rotary position embedding with the HF (non-interleaved) layout.
#[derive(Debug)]
pub struct RotaryEmbedding {
    dims: i32,
    base: Option<f32>,
    /// MLX's `freqs` (periods, `1 / inv_freq`) when scaling changes them.
    freqs: Option<Array>,
    scale: f32,
    /// `[log2 base, scale]` in f32, as the fused q/k kernel takes them
    /// (MLX's RoPE kernel takes `log2 base`; 0 where `freqs` is set).
    kernel_params: Array,
}

impl RotaryEmbedding {
    /// RoPE over `dims` features with `rope`'s base and scaling.
    pub fn new(dims: i32, rope: &Rope) -> Result<Self> {
        let half = usize::try_from(dims / 2).unwrap_or(0);
        // Transformers' inverse frequencies, in f32 like `_compute_default_rope_parameters`.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / rope.theta.powf((2 * i) as f32 / dims as f32))
            .collect();
        match &rope.scaling {
            RopeScaling::None => Ok(Self::with_params(dims, Some(rope.theta), None, 1.0)),
            RopeScaling::Linear { factor } => Ok(Self::with_params(
                dims,
                Some(rope.theta),
                None,
                1.0 / factor,
            )),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                let periods: Vec<f32> = inv_freq
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen
                                - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        };
                        1.0 / scaled
                    })
                    .collect();
                let freqs = Array::from_slice(&periods, &[dims / 2]);
                Ok(Self::with_params(dims, None, Some(freqs), 1.0))
            }
        }
    }

    fn with_params(dims: i32, base: Option<f32>, freqs: Option<Array>, scale: f32) -> Self {
        let log2_base = base.map_or(0.0, f32::log2);
        Self {
            dims,
            base,
            freqs,
            scale,
            // Over 8 bytes where the kernel's scalars live on the device
            // (MLX keeps smaller arrays in memory the GPU reads across
            // the bus; see `fused::device_scalars`).
            kernel_params: match crate::models::fused::device_scalars() {
                true => Array::from_slice(&[log2_base, scale, 0.0, 0.0], &[4]),
                false => Array::from_slice(&[log2_base, scale], &[2]),
            },
        }
    }

    /// The features it rotates (from the first of each head).
    pub fn dims(&self) -> i32 {
        self.dims
    }

    /// What the fused q/k kernel takes: `[log2 base, scale]` (f32, two
    /// zeros after them where the kernels' scalars live on the device), and
    /// the periods where scaling sets them.
    pub fn kernel_inputs(&self) -> (&Array, Option<&Array>) {
        (&self.kernel_params, self.freqs.as_ref())
    }

    /// Rotates `x` `[B, H, L, D]` whose first position (per row, or for
    /// every row) is `start`.
    pub fn forward(&self, x: &Array, start: &Positions) -> Result<Array> {
        match start {
            Positions::Start(offset) => fast::rope(
                x,
                self.dims,
                false,
                self.base,
                self.scale,
                *offset,
                self.freqs.as_ref(),
            ),
            Positions::Rows(offsets) => fast::rope_dynamic(
                x,
                self.dims,
                false,
                self.base,
                self.scale,
                offsets,
                self.freqs.as_ref(),
            ),
        }
    }
}

/// The last position of `[B, L, V]` logits as `[B, V]`.
pub fn last_position(x: &Array) -> Array {
    let l = x.dim(1);
    x.index((.., l - 1, ..))
}

#[cfg(test)]
mod split_tests {
    use mlx_rs::ops::quantize;
    use mlx_rs::random;

    use super::*;

    /// A matmul split over CPU streams gives exactly the unsplit result,
    /// dense and quantised, for row counts that do and do not divide evenly.
    #[test]
    fn split_matmuls_equal_whole_ones() {
        let key = random::key(7).unwrap();
        let x = random::normal::<f32>(&[3, 64], None, None, &key).unwrap();
        for rows in [8, 37, 130] {
            let w = random::normal::<f32>(&[rows, 64], None, None, &key).unwrap();
            let (qw, scales, biases) = quantize(&w, 32, 4).unwrap();
            let matrices = [
                Matrix::Dense(w),
                Matrix::Quantized(QuantWeight {
                    weight: qw,
                    scales,
                    biases,
                    group_size: 32,
                    bits: 4,
                }),
            ];
            for m in &matrices {
                let whole = m.matmul_t_here(&x).unwrap();
                split_cpu_matmuls(3);
                let split = m.matmul_t(&x).unwrap();
                split_cpu_matmuls(0);
                assert_eq!(split.shape(), whole.shape());
                whole.eval().unwrap();
                split.eval().unwrap();
                let (a, b) = (whole.as_slice::<f32>(), split.as_slice::<f32>());
                assert_eq!(a, b, "{rows} rows");
            }
        }
    }
}

#[cfg(test)]
mod stack_tests {
    use mlx_rs::ops::quantize;
    use mlx_rs::random;

    use super::*;
    use crate::models::lora::Lora;

    fn dense(rows: i32, seed: u64, bias: bool) -> Linear {
        let key = random::key(seed).unwrap();
        Linear {
            weight: Matrix::Dense(random::normal::<f32>(&[rows, 64], None, None, &key).unwrap()),
            bias: bias.then(|| random::normal::<f32>(&[rows], None, None, &key).unwrap()),
            lora: LoraSlot::default(),
            reduce: None,
        }
    }

    fn quantised(rows: i32, seed: u64, bits: i32) -> Linear {
        let Matrix::Dense(w) = dense(rows, seed, false).weight else {
            unreachable!()
        };
        let (weight, scales, biases) = quantize(&w, 32, bits).unwrap();
        Linear {
            weight: Matrix::Quantized(QuantWeight {
                weight,
                scales,
                biases,
                group_size: 32,
                bits,
            }),
            bias: None,
            lora: LoraSlot::default(),
            reduce: None,
        }
    }

    fn values(a: &Array) -> Vec<f32> {
        a.eval().unwrap();
        a.as_slice::<f32>().to_vec()
    }

    /// A stack of alike parts computes exactly the parts' outputs side by
    /// side, dense (with biases) and quantised; parts stored differently, or
    /// with a bias on some only, are not stacked.
    #[test]
    fn stacked_layers_equal_their_parts_and_unlike_parts_stay_apart() {
        let key = random::key(3).unwrap();
        let x = random::normal::<f32>(&[1, 2, 64], None, None, &key).unwrap();
        let groups = [
            vec![dense(16, 1, true), dense(8, 2, true), dense(8, 3, true)],
            vec![quantised(16, 4, 4), quantised(8, 5, 4), quantised(8, 6, 4)],
        ];
        for parts in &groups {
            let refs: Vec<&Linear> = parts.iter().collect();
            let stacked = Linear::stack(&refs).unwrap().expect("alike parts stack");
            let apart: Vec<Array> = parts.iter().map(|p| p.forward(&x).unwrap()).collect();
            let expected = concatenate(&apart, -1).unwrap();
            assert_eq!(values(&stacked.forward(&x).unwrap()), values(&expected));
        }
        // Adapters on the parts: stacked or apart, each part gains its own
        // delta, `scale · (x A) B`.
        let lora = |out: i32, seed: u64| {
            let key = random::key(seed).unwrap();
            Lora {
                a: random::normal::<f32>(&[64, 4], None, None, &key).unwrap(),
                b: random::normal::<f32>(&[4, out], None, None, &key).unwrap(),
                scale: 0.5,
                dropout: 0.0,
            }
        };
        let parts = [dense(16, 1, true), dense(8, 2, true), dense(8, 3, true)];
        let group = LinearGroup::new(
            [dense(16, 1, true), dense(8, 2, true), dense(8, 3, true)],
            "test",
        )
        .unwrap();
        assert!(matches!(group, LinearGroup::Stacked(..)));
        let mut expected = Vec::new();
        for (i, ((slot, input, output), part)) in
            group.targets().into_iter().zip(&parts).enumerate()
        {
            assert_eq!((input, output), (64, part.weight.out_features()));
            let l = lora(output, 10 + i as u64);
            let delta = matmul(matmul(&x, &l.a).unwrap(), &l.b).unwrap();
            let base = part.forward(&x).unwrap();
            expected.push(values(
                &base
                    .add(delta.multiply(Array::from_f32(0.5)).unwrap())
                    .unwrap(),
            ));
            slot.set(Some(l.clone()));
            part.lora.set(Some(l));
            let apart = values(&part.forward(&x).unwrap());
            for (a, e) in apart.iter().zip(&expected[i]) {
                assert!(
                    (a - e).abs() <= 1e-4 * e.abs().max(1.0),
                    "apart {i}: {a} vs {e}"
                );
            }
        }
        for (i, y) in group.forward(&x).unwrap().iter().enumerate() {
            for (a, e) in values(y).iter().zip(&expected[i]) {
                assert!(
                    (a - e).abs() <= 1e-4 * e.abs().max(1.0),
                    "stacked {i}: {a} vs {e}"
                );
            }
        }
        let unlike = [
            [dense(8, 1, false), quantised(8, 2, 4)],
            [quantised(8, 1, 4), quantised(8, 2, 8)],
            [dense(8, 1, true), dense(8, 2, false)],
        ];
        for pair in &unlike {
            assert!(Linear::stack(&[&pair[0], &pair[1]]).unwrap().is_none());
        }
    }
}

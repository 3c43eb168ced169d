//! Tensor parallelism over MLX distributed: the group of processes a model
//! is split over, the collectives the model and the sampler use, and a
//! watchdog for a peer that stops answering.
//!
//! The split follows mlx-lm's `shard`: each rank holds its share of the
//! attention heads (rows of q, k and v) and of the MLP units (rows of gate
//! and up), the matching columns of o and down, and sums those two
//! products over the group (`all_sum`); embeddings, norms and the output
//! head are whole on every rank, so every rank computes the same logits.
//! What each tensor's share is lives in [`Split::of`]; the loader reads
//! only that share ([`crate::load::weights`]).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{Array, Device, DeviceType, Dtype, Stream};

use crate::ffi::{self, GroupHandle};

/// MLX's order when asked for `any` (NCCL only exists in CUDA builds and
/// JACCL only on recent macOS; each reports whether it is there).
const ANY_ORDER: &[&str] = &["nccl", "ring", "mpi", "jaccl"];

/// The processes a model is split over.
#[derive(Debug)]
pub struct Group {
    handle: GroupHandle,
    rank: i32,
    size: i32,
    /// A collective failed (a lost peer): MLX's group cannot be trusted
    /// any more (a later collective may wait forever), so none is started.
    broken: std::cell::Cell<bool>,
    /// Where the collectives run: `None` on the caller's stream (NCCL's on
    /// the model's GPU stream; everything on a CPU run), else a CPU stream
    /// (a CPU backend beside a GPU model).
    stream: Option<Stream>,
}

impl Group {
    /// Joins the group of `backend` (`any` picks as MLX does: NCCL, ring,
    /// MPI, JACCL, the first that is built in and starts) from the
    /// environment MLX reads.
    pub fn join(backend: &str) -> Result<Rc<Group>, String> {
        let candidates: Vec<&'static str> = match backend {
            "any" => ANY_ORDER.to_vec(),
            other => match ANY_ORDER.iter().find(|b| **b == other) {
                Some(b) => vec![*b],
                None => return Err(format!("unknown distributed backend {other:?}")),
            },
        };
        let mut errors = Vec::new();
        for name in candidates {
            if !ffi::distributed_is_available(name) {
                errors.push(format!("{name}: not in this build of MLX"));
                continue;
            }
            match ffi::distributed_init(name) {
                Ok(handle) => {
                    let (rank, size) = (handle.rank(), handle.size());
                    if size < 1 || !(0..size).contains(&rank) {
                        return Err(format!("{name}: MLX reports rank {rank} of {size}"));
                    }
                    let on_gpu = matches!(Device::default().get_type(), Ok(DeviceType::Gpu));
                    let stream =
                        (name != "nccl" && on_gpu).then(|| Stream::new_with_device(&Device::cpu()));
                    tracing::info!(backend = name, rank, size, "joined the distributed group");
                    return Ok(Rc::new(Group {
                        handle,
                        broken: std::cell::Cell::new(false),
                        rank,
                        size,
                        stream,
                    }));
                }
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        Err(format!(
            "no distributed backend started ({}); run the ranks with `infer launch`, \
             or set MLX_RANK and MLX_HOSTFILE (ring) as docs/distributed.md says",
            errors.join("; ")
        ))
    }

    /// Marks the group broken after a failed collective: every later
    /// [`all_sum`](Self::all_sum) fails at once instead of waiting on a
    /// peer that is gone.
    pub fn mark_broken(&self) {
        self.broken.set(true);
    }

    /// This process's rank.
    pub fn rank(&self) -> i32 {
        self.rank
    }

    /// The number of ranks.
    pub fn size(&self) -> i32 {
        self.size
    }

    /// `x` summed over the ranks (lazily: the sum happens when the graph
    /// is evaluated), in `x`'s dtype.
    pub fn all_sum(&self, x: &Array) -> Result<Array, Exception> {
        if self.broken.get() {
            return Err(Exception::custom(
                "the tensor-parallel group is broken (a rank was lost)",
            ));
        }
        match &self.stream {
            Some(s) => self.handle.all_sum(x, s),
            None => self.handle.all_sum(x, &Stream::thread_local_or_default()),
        }
    }

    /// Rank 0's `ids` on every rank, and rank 0's `stop` (whether rank 0
    /// ends the call at this draw): each rank's sampler may draw its own
    /// ids (an unseeded sampler's key comes from the process's entropy),
    /// and only rank 0 knows when its caller went away, yet the ranks must
    /// feed the same tokens and end a call at the same step. Integer ids sum
    /// exactly. `stop` reads 1 where rank 0 stops.
    pub fn rank0s(&self, ids: &Array, stop: bool) -> Result<(Array, Array), Exception> {
        let (dtype, shape) = (ids.dtype(), ids.shape().to_vec());
        // Every rank's share depends on its own draw (a product with 0 or
        // 1): a share made without it (zeros) could run its sum before the
        // model's own sums are done, and the ranks' collectives would then
        // pair up out of order.
        let keep = Array::from_int(i32::from(self.rank == 0));
        let flat = ids.as_dtype(Dtype::Int32)?.reshape(&[-1])?;
        let n = flat.dim(0);
        let mine =
            mlx_rs::ops::concatenate(&[flat, Array::from_slice(&[i32::from(stop)], &[1])], 0)?
                .multiply(&keep)?;
        let sum = self.all_sum(&mine)?;
        let ids = sum.index(..n).as_dtype(dtype)?.reshape(&shape)?;
        Ok((ids, sum.index(n..)))
    }

    /// Rank 0's `message` on every rank (the others' is ignored): rank 0
    /// hands the others each call it starts, `None` when it shuts down.
    /// Blocks until rank 0 sends. Two sums: a header (kind and length),
    /// then the bytes, one per `int32`.
    pub fn broadcast(&self, message: Option<&[u8]>) -> Result<Option<Vec<u8>>, Exception> {
        let leader = self.rank == 0;
        let header: [i32; 2] = match (leader, message) {
            (true, Some(m)) => [
                1,
                i32::try_from(m.len())
                    .map_err(|_| Exception::custom("a call too large to hand over"))?,
            ],
            (true, None) => [2, 0],
            (false, _) => [0, 0],
        };
        let header = self.all_sum(&Array::from_slice(&header, &[2]))?;
        header.eval()?;
        let header: Vec<i32> = header.as_slice::<i32>().to_vec();
        match header[..] {
            [2, 0] => Ok(None),
            [1, len] if len >= 0 => {
                let mine: Vec<i32> = match (leader, message) {
                    (true, Some(m)) => m.iter().map(|&b| i32::from(b)).collect(),
                    _ => vec![0; len as usize],
                };
                let sum = self.all_sum(&Array::from_slice(&mine, &[len]))?;
                sum.eval()?;
                sum.as_slice::<i32>()
                    .iter()
                    .map(|&v| {
                        u8::try_from(v).map_err(|_| Exception::custom("a garbled call from rank 0"))
                    })
                    .collect::<Result<Vec<u8>, _>>()
                    .map(Some)
            }
            _ => Err(Exception::custom(format!(
                "a garbled message header from rank 0: {header:?}"
            ))),
        }
    }
}

/// What a rank loads of a tensor split for tensor parallelism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Its share of the rows (axis 0): q, k, v, gate and up (weights,
    /// quantisation scales and biases, and biases).
    Rows,
    /// Its share of the columns (axis 1): o and down (weights and
    /// quantisation scales and biases; their bias is whole, added after the
    /// sum).
    Columns,
}

impl Split {
    /// How the tensor `name` (a Hugging Face name, normalised) is split:
    /// `None` for a tensor every rank holds whole.
    pub fn of(name: &str) -> Option<Split> {
        let (module, field) = name.rsplit_once('.')?;
        let proj = module.rsplit_once('.').map_or(module, |(_, p)| p);
        let in_layer = module.starts_with("model.layers.");
        match (proj, field) {
            _ if !in_layer => None,
            ("q_proj" | "k_proj" | "v_proj" | "gate_proj" | "up_proj", _) => Some(Split::Rows),
            ("o_proj" | "down_proj", "weight" | "scales" | "biases") => Some(Split::Columns),
            _ => None,
        }
    }
}

/// Rank `rank` of `size`'s share of the tensor shaped `shape`, split
/// `split`: the range of the split axis, or why it does not divide.
pub fn share(
    name: &str,
    shape: &[usize],
    split: Split,
    rank: usize,
    size: usize,
) -> Result<(usize, usize), String> {
    let axis = match split {
        Split::Rows => 0,
        Split::Columns => 1,
    };
    let Some(&n) = shape.get(axis) else {
        return Err(format!(
            "tensor `{name}` of shape {shape:?} has no axis {axis} to split over {size} ranks"
        ));
    };
    if size == 0 || n % size != 0 {
        return Err(format!(
            "tensor `{name}` of shape {shape:?}: axis {axis} ({n}) does not divide over {size} ranks"
        ));
    }
    let part = n / size;
    Ok((rank * part, (rank + 1) * part))
}

thread_local! {
    /// The group of the model this thread (a worker) runs.
    static GROUP: RefCell<Option<Rc<Group>>> = const { RefCell::new(None) };
}

/// Makes `group` the group of the model this thread runs (the sampler's
/// [`agree`] uses it).
pub fn set_thread_group(group: Option<Rc<Group>>) {
    GROUP.with_borrow_mut(|g| *g = group);
}

/// `ids` as every rank of this thread's group will feed them (rank 0's),
/// and whether rank 0 ends the call here (`stop` is this rank's wish, which
/// counts on rank 0 only); `ids` itself and no flag in one process.
pub fn agree(ids: Array, stop: bool) -> Result<(Array, Option<Array>), Exception> {
    GROUP.with_borrow(|g| match g {
        Some(g) if g.size() > 1 => g.rank0s(&ids, stop).map(|(ids, s)| (ids, Some(s))),
        _ => Ok((ids, None)),
    })
}

/// Ends the process when a step takes longer than a limit: a collective
/// whose peer died or hangs blocks inside MLX, where nothing else can
/// interrupt it.
#[derive(Debug, Clone)]
pub struct Watchdog {
    /// Milliseconds since `epoch` when the running step began; 0 when idle.
    busy_since: Arc<AtomicU64>,
    epoch: Instant,
}

impl Watchdog {
    /// The default limit on one step (a prefill chunk or a decode step).
    pub const DEFAULT_LIMIT: Duration = Duration::from_secs(120);

    /// The limit from `INFER_DIST_TIMEOUT` (seconds), else the default.
    pub fn limit_from_env() -> Duration {
        std::env::var("INFER_DIST_TIMEOUT")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(Self::DEFAULT_LIMIT)
    }

    /// Starts the watchdog thread of a rank: when a step has run for
    /// `limit`, it logs which rank gave up and exits the process with
    /// status 1.
    pub fn start(rank: i32, limit: Duration) -> Watchdog {
        let dog = Watchdog {
            busy_since: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
        };
        let watched = dog.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("mlx-watchdog-{rank}"))
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(250).min(limit));
                if Arc::strong_count(&watched.busy_since) == 1 {
                    // The model is gone: nothing to watch.
                    return;
                }
                let since = watched.busy_since.load(Ordering::Acquire);
                if since == 0 {
                    continue;
                }
                let now = watched.millis();
                if now.saturating_sub(since) >= limit.as_millis() as u64 {
                    tracing::error!(rank, ?limit, "a tensor-parallel step did not finish");
                    eprintln!(
                        "error: rank {rank}: a tensor-parallel step ran longer than {:.0} s \
                         (a peer died or hangs; INFER_DIST_TIMEOUT sets the limit); exiting",
                        limit.as_secs_f64()
                    );
                    std::process::exit(1);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("no watchdog for rank {rank}: {e}");
        }
        dog
    }

    fn millis(&self) -> u64 {
        // At least 1: 0 means idle.
        (self.epoch.elapsed().as_millis() as u64).max(1)
    }

    /// A step begins (or goes on: the clock restarts).
    pub fn busy(&self) {
        self.busy_since.store(self.millis(), Ordering::Release);
    }

    /// No step is running.
    pub fn idle(&self) {
        self.busy_since.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_follow_mlx_lm_shard() {
        let l = "model.layers.3";
        for p in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] {
            for f in ["weight", "scales", "biases", "bias"] {
                assert_eq!(Split::of(&format!("{l}.{p}.{f}")), Some(Split::Rows));
            }
        }
        for p in ["mlp.gate_proj", "mlp.up_proj"] {
            assert_eq!(Split::of(&format!("{l}.{p}.weight")), Some(Split::Rows));
        }
        for p in ["self_attn.o_proj", "mlp.down_proj"] {
            for f in ["weight", "scales", "biases"] {
                assert_eq!(Split::of(&format!("{l}.{p}.{f}")), Some(Split::Columns));
            }
            // The bias is added once, after the sum.
            assert_eq!(Split::of(&format!("{l}.{p}.bias")), None);
        }
        for whole in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_norm.weight",
        ] {
            assert_eq!(Split::of(whole), None, "{whole}");
        }
    }

    #[test]
    fn shares_cover_the_axis_or_say_why_not() {
        assert_eq!(share("w", &[8, 4], Split::Rows, 1, 2), Ok((4, 8)));
        assert_eq!(share("w", &[8, 6], Split::Columns, 0, 3), Ok((0, 2)));
        let e = share("w", &[6, 4], Split::Rows, 0, 4).unwrap_err();
        assert!(e.contains("does not divide over 4 ranks"), "{e}");
        assert!(share("b", &[8], Split::Columns, 0, 2).is_err());
    }
}

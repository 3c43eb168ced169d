//! `unsafe` at the edge of MLX: handing raw bytes to MLX, and the MLX
//! operations called through its C API directly ([`slice_update`],
//! [`checkpoint`] and [`Compiled`] for functions that borrow, and
//! [`CudaKernel`] for kernels of ours, which mlx-rs does not wrap). (The only other `unsafe`
//! code of the crate is `device`'s queries of MLX's C API; weight files are
//! mapped by `inference_formats::map_file`.)

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype, Stream};

/// An MLX array holding a copy of `bytes`, interpreted as `dtype` in `shape`.
///
/// Fails unless `bytes` holds exactly `shape`'s element count of `dtype`.
pub fn array_from_bytes(bytes: &[u8], shape: &[i32], dtype: Dtype) -> Result<Array, String> {
    let elements = shape.iter().try_fold(1usize, |n, &d| {
        usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
    });
    let expected = elements.and_then(|n| n.checked_mul(item_size(dtype)));
    if expected != Some(bytes.len()) {
        return Err(format!(
            "{} bytes for shape {shape:?} of {dtype:?} ({expected:?} expected)",
            bytes.len()
        ));
    }
    // SAFETY: `bytes` is a live slice of exactly the size that `shape` and
    // `dtype` describe (checked above); MLX copies it into its own buffer
    // before returning, so the array does not borrow the slice.
    Ok(unsafe { Array::from_raw_data(bytes.as_ptr().cast(), shape, dtype) })
}

/// Bytes per element of the dtypes weights come in.
pub fn item_size(dtype: Dtype) -> usize {
    match dtype {
        Dtype::Bool | Dtype::Uint8 | Dtype::Int8 => 1,
        Dtype::Uint16 | Dtype::Int16 | Dtype::Float16 | Dtype::Bfloat16 => 2,
        Dtype::Uint32 | Dtype::Int32 | Dtype::Float32 => 4,
        Dtype::Uint64 | Dtype::Int64 | Dtype::Float64 | Dtype::Complex64 => 8,
    }
}

/// `src` with `update` written over the region `starts[i]..stops[i]` of each
/// axis (unit strides), on the thread's default stream: MLX's
/// `slice_update`.
///
/// mlx-rs reaches the same operation through `index_mut`, which first
/// reshapes the update twice (dropping its leading singleton axes, then
/// restoring them): two more graph nodes per call, and a decode step makes
/// two calls per layer. Here the update must already have the region's
/// shape and `src`'s dtype; anything else is an error, not a broadcast.
pub fn slice_update(
    src: &Array,
    update: &Array,
    starts: &[i32],
    stops: &[i32],
) -> Result<Array, Exception> {
    // Unit strides, without an allocation per call (a decode step makes two
    // calls per layer). The caches have 4 axes; more than 8 is refused.
    const UNIT: [i32; 8] = [1; 8];
    let n = src.ndim();
    let fits = n <= UNIT.len()
        && starts.len() == n
        && stops.len() == n
        && update.ndim() == n
        && update.dtype() == src.dtype()
        && (0..n).all(|i| {
            let (lo, hi) = (starts[i], stops[i]);
            0 <= lo && lo <= hi && hi <= src.shape()[i] && update.shape()[i] == hi - lo
        });
    if !fits {
        return Err(Exception::custom(format!(
            "slice update of {:?} {:?} into {:?} {:?} at {starts:?}..{stops:?}",
            update.shape(),
            update.dtype(),
            src.shape(),
            src.dtype()
        )));
    }
    let strides = &UNIT[..n];
    let stream = Stream::thread_local_or_default();
    // SAFETY: `src`, `update` and `stream` are live MLX handles for the whole
    // call; the three index slices each hold `n` elements, matching the
    // counts passed, and MLX copies them. `res` is a fresh handle that MLX
    // fills on success (it then belongs to the returned `Array`, which frees
    // it) and that is freed here on failure. The region was checked above,
    // so MLX has no shape error to raise.
    unsafe {
        let mut res = mlx_sys::mlx_array_new();
        let status = mlx_sys::mlx_slice_update(
            &mut res,
            src.as_ptr(),
            update.as_ptr(),
            starts.as_ptr(),
            n,
            stops.as_ptr(),
            n,
            strides.as_ptr(),
            n,
            stream.as_ptr(),
        );
        if status != 0 {
            mlx_sys::mlx_array_free(res);
            return Err(Exception::custom("MLX slice_update failed"));
        }
        Ok(Array::from_ptr(res))
    }
}

/// A handle on an MLX distributed group (`mlx_distributed_group`), freed
/// on drop. MLX's groups are process-wide: every handle on the same
/// backend's group talks over the same connections.
#[derive(Debug)]
pub struct GroupHandle(mlx_sys::mlx_distributed_group);

impl Drop for GroupHandle {
    fn drop(&mut self) {
        // SAFETY: the handle was filled by `mlx_distributed_init` and is
        // freed once, here (freeing only deletes MLX's `Group` value; the
        // process-wide group it refers to stays).
        unsafe {
            mlx_sys::mlx_distributed_group_free(self.0);
        }
    }
}

/// Whether MLX was built with the distributed backend `name` (`any`: with
/// any of them).
pub fn distributed_is_available(name: &str) -> bool {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c_name` is a NUL-terminated string alive for the call; MLX
    // only reads it.
    unsafe { mlx_sys::mlx_distributed_is_available(c_name.as_ptr()) }
}

/// The MLX error message that the next failing call on this thread
/// reports, captured by a handler installed for the call (mlx-rs's own
/// handler keeps its messages to itself).
mod captured {
    use std::cell::RefCell;
    use std::ffi::{c_char, c_void, CStr};

    std::thread_local! {
        pub static MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
    }

    /// Records MLX's message for the calling thread.
    pub unsafe extern "C" fn handler(msg: *const c_char, _data: *mut c_void) {
        if msg.is_null() {
            return;
        }
        // SAFETY: MLX passes a NUL-terminated message valid for the call.
        let text = unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned();
        MESSAGE.with_borrow_mut(|m| *m = Some(text));
    }

    unsafe extern "C" {
        /// mlx-rs's process-wide handler (exported unmangled by mlx-rs),
        /// put back after the call.
        pub fn default_mlx_error_handler(msg: *const c_char, data: *mut c_void);
    }
}

/// Joins MLX's distributed group of `backend` (`any`, `ring`, `mpi`,
/// `nccl`, `jaccl`) from the environment MLX reads (`MLX_RANK`,
/// `MLX_HOSTFILE`, …), strictly: a backend that cannot start is an error
/// with MLX's message, not a group of one.
pub fn distributed_init(backend: &str) -> Result<GroupHandle, String> {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let c_name = std::ffi::CString::new(backend).map_err(|e| e.to_string())?;
    // Error handlers are process-wide: one init at a time swaps its own in.
    let _one = INIT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: `group` starts empty and MLX fills it on success (it is then
    // owned by the returned handle); on failure it is freed here. The
    // handler swapped in for the call matches MLX's handler signature and
    // only touches this thread's storage; mlx-rs's exported handler is put
    // back before returning (mlx-rs registers it without data or a
    // destructor, as here).
    unsafe {
        captured::MESSAGE.with_borrow_mut(|m| *m = None);
        mlx_sys::mlx_set_error_handler(Some(captured::handler), std::ptr::null_mut(), None);
        let mut group = mlx_sys::mlx_distributed_group_new();
        let status = mlx_sys::mlx_distributed_init(&mut group, true, c_name.as_ptr());
        mlx_sys::mlx_set_error_handler(
            Some(captured::default_mlx_error_handler),
            std::ptr::null_mut(),
            None,
        );
        if status != 0 {
            mlx_sys::mlx_distributed_group_free(group);
            let message = captured::MESSAGE.with_borrow_mut(Option::take);
            return Err(message.unwrap_or_else(|| format!("MLX could not start `{backend}`")));
        }
        Ok(GroupHandle(group))
    }
}

impl GroupHandle {
    /// This process's rank in the group.
    pub fn rank(&self) -> i32 {
        // SAFETY: a live, initialised group handle.
        unsafe { mlx_sys::mlx_distributed_group_rank(self.0) }
    }

    /// The number of processes in the group.
    pub fn size(&self) -> i32 {
        // SAFETY: a live, initialised group handle.
        unsafe { mlx_sys::mlx_distributed_group_size(self.0) }
    }

    /// `x` summed over the group (every rank gets the sum), computed on
    /// `stream` when the graph is evaluated.
    pub fn all_sum(&self, x: &Array, stream: &Stream) -> Result<Array, Exception> {
        // SAFETY: `x`, the group and `stream` are live handles for the
        // call; `res` is a fresh handle that the returned `Array` owns on
        // success and that is freed here on failure.
        unsafe {
            let mut res = mlx_sys::mlx_array_new();
            let status =
                mlx_sys::mlx_distributed_all_sum(&mut res, x.as_ptr(), self.0, stream.as_ptr());
            if status != 0 {
                mlx_sys::mlx_array_free(res);
                return Err(Exception::custom("MLX all_sum failed"));
            }
            Ok(Array::from_ptr(res))
        }
    }
}

/// A function of arrays, as [`checkpoint`] and [`Compiled`] take it.
type ArrayFn<'a> = Box<dyn FnMut(&[Array]) -> Result<Vec<Array>, Exception> + 'a>;

std::thread_local! {
    /// The error of the last [`checkpoint`] or [`Compiled`] function that failed on this
    /// thread (MLX only learns that it failed).
    static CLOSURE_ERROR: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Calls the boxed [`ArrayFn`] at `payload` on `input`, for MLX.
unsafe extern "C" fn call_array_fn(
    res: *mut mlx_sys::mlx_vector_array,
    input: mlx_sys::mlx_vector_array,
    payload: *mut std::ffi::c_void,
) -> std::os::raw::c_int {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `payload` is the `Box<ArrayFn>` that `closure` leaked
        // for this closure, freed only by `drop_array_fn`; MLX calls the
        // closure from the thread that traces the graph, one call at a time.
        let f = unsafe { &mut *payload.cast::<ArrayFn<'_>>() };
        // SAFETY: `input` is a live vector MLX owns for the call; each
        // element read is a new reference that the `Array` takes over.
        let arrays: Vec<Array> = unsafe {
            (0..mlx_sys::mlx_vector_array_size(input))
                .map(|i| {
                    let mut a = mlx_sys::mlx_array_new();
                    mlx_sys::mlx_vector_array_get(&mut a, input, i);
                    Array::from_ptr(a)
                })
                .collect()
        };
        f(&arrays)
    }));
    let message = match outcome {
        Ok(Ok(out)) => {
            let ptrs: Vec<mlx_sys::mlx_array> = out.iter().map(Array::as_ptr).collect();
            // SAFETY: `res` points to the vector MLX passed for the result;
            // `mlx_vector_array_set_data` copies the handles (taking its own
            // references), so `out` may drop afterwards.
            unsafe { mlx_sys::mlx_vector_array_set_data(res, ptrs.as_ptr(), ptrs.len()) };
            return 0;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "a function called by MLX panicked".to_owned(),
    };
    CLOSURE_ERROR.with_borrow_mut(|slot| *slot = Some(message));
    1
}

/// Frees the boxed [`ArrayFn`] at `payload` when MLX drops its closure.
unsafe extern "C" fn drop_array_fn(payload: *mut std::ffi::c_void) {
    // SAFETY: `payload` came from `Box::into_raw` in `closure` and MLX
    // calls this once, when the last reference to the closure goes.
    drop(unsafe { Box::from_raw(payload.cast::<ArrayFn<'_>>()) });
}

/// An MLX closure calling `f`; the closure owns `f` (freed by
/// [`drop_array_fn`] when MLX drops the closure's last reference).
///
/// # Safety
/// The lifetime `'a` of what `f` borrows is erased: the caller must see
/// that MLX calls the closure only while that borrow lasts.
unsafe fn closure<'a>(
    f: impl FnMut(&[Array]) -> Result<Vec<Array>, Exception> + 'a,
) -> mlx_sys::mlx_closure {
    let boxed: Box<ArrayFn<'a>> = Box::new(Box::new(f));
    let payload = Box::into_raw(boxed).cast::<std::ffi::c_void>();
    // SAFETY: the closure takes over `payload`, which `drop_array_fn`
    // frees once; `call_array_fn` matches the signature MLX calls.
    unsafe {
        mlx_sys::mlx_closure_new_func_payload(Some(call_array_fn), payload, Some(drop_array_fn))
    }
}

/// The arrays of an MLX vector, which is freed.
///
/// # Safety
/// `vector` must be a live MLX vector of arrays, not used after the call.
unsafe fn take_arrays(vector: mlx_sys::mlx_vector_array) -> Vec<Array> {
    // SAFETY: each array read is a new reference the `Array` takes over;
    // the vector is freed once, here.
    unsafe {
        let out = (0..mlx_sys::mlx_vector_array_size(vector))
            .map(|i| {
                let mut a = mlx_sys::mlx_array_new();
                mlx_sys::mlx_vector_array_get(&mut a, vector, i);
                Array::from_ptr(a)
            })
            .collect();
        mlx_sys::mlx_vector_array_free(vector);
        out
    }
}

/// `closure(inputs)`, the outputs' references passing to the arrays
/// returned; `what` names the function in an error without a message of
/// its own.
///
/// # Safety
/// `closure` must be a live MLX closure.
unsafe fn apply(
    closure: mlx_sys::mlx_closure,
    inputs: &[Array],
    what: &str,
) -> Result<Vec<Array>, Exception> {
    let ptrs: Vec<mlx_sys::mlx_array> = inputs.iter().map(Array::as_ptr).collect();
    // SAFETY: the vectors created here are freed before returning; each
    // element read from `output` is a new reference the `Array` takes over.
    unsafe {
        let input = mlx_sys::mlx_vector_array_new_data(ptrs.as_ptr(), ptrs.len());
        let mut output = mlx_sys::mlx_vector_array_new();
        let status = mlx_sys::mlx_closure_apply(&mut output, closure, input);
        mlx_sys::mlx_vector_array_free(input);
        if status != 0 {
            mlx_sys::mlx_vector_array_free(output);
            let message = CLOSURE_ERROR
                .with_borrow_mut(Option::take)
                .unwrap_or_else(|| format!("MLX could not apply {what}"));
            return Err(Exception::custom(message));
        }
        Ok(take_arrays(output))
    }
}

/// `f(inputs)` under MLX's `checkpoint`: the arrays `f` computes are not
/// kept for the backward pass; when gradients are traced through the
/// result, MLX calls `f` again on the same inputs to recompute them. The
/// gradients flow to `inputs` only: everything `f` should be
/// differentiated with respect to must be among them.
///
/// MLX calls `f` now and, at most, again while the enclosing gradient
/// transformation traces its backward pass (before that transformation
/// returns); `f` may borrow what outlives that transformation.
pub fn checkpoint<'a>(
    f: impl FnMut(&[Array]) -> Result<Vec<Array>, Exception> + 'a,
    inputs: &[Array],
) -> Result<Vec<Array>, Exception> {
    // SAFETY: MLX calls `f` only while tracing (see above), within the
    // borrow `'a`; both closures are freed before returning.
    unsafe {
        let closure = closure(f);
        let mut wrapped = mlx_sys::mlx_closure_new();
        let status = mlx_sys::mlx_checkpoint(&mut wrapped, closure);
        mlx_sys::mlx_closure_free(closure);
        if status != 0 {
            mlx_sys::mlx_closure_free(wrapped);
            return Err(Exception::custom("MLX checkpoint failed"));
        }
        let out = apply(wrapped, inputs, "a checkpointed function");
        mlx_sys::mlx_closure_free(wrapped);
        out
    }
}

/// A function of arrays compiled by MLX (`mlx_compile`): the first call
/// with inputs of new shapes or dtypes traces `f` and fuses its graph;
/// later calls with the same shapes replay the compiled graph without
/// calling `f`. Arrays `f` captures rather than takes as inputs are
/// constants of the graph (fine for frozen weights, wrong for anything
/// that changes between calls, random keys included). MLX forgets the
/// compiled graphs when this is dropped.
pub struct Compiled<'a> {
    closure: mlx_sys::mlx_closure,
    /// `f` may borrow for `'a`, and is called only through `&mut self`.
    _borrow: std::marker::PhantomData<&'a mut ()>,
}

impl<'a> Compiled<'a> {
    /// `f` compiled; with `shapeless`, one trace serves inputs of any
    /// shape (of the same ranks and dtypes).
    pub fn new(
        f: impl FnMut(&[Array]) -> Result<Vec<Array>, Exception> + 'a,
        shapeless: bool,
    ) -> Result<Self, Exception> {
        // SAFETY: MLX calls `f` only from `call` (tracing), and `Compiled`
        // cannot outlive `'a`; the plain closure is freed here (the
        // compiled one holds its own reference), the compiled one on drop.
        unsafe {
            let plain = closure(f);
            let mut compiled = mlx_sys::mlx_closure_new();
            let status = mlx_sys::mlx_compile(&mut compiled, plain, shapeless);
            mlx_sys::mlx_closure_free(plain);
            if status != 0 {
                mlx_sys::mlx_closure_free(compiled);
                return Err(Exception::custom("MLX could not compile a function"));
            }
            Ok(Self {
                closure: compiled,
                _borrow: std::marker::PhantomData,
            })
        }
    }

    /// The function's outputs for `inputs` (lazy arrays, as any MLX op's).
    pub fn call(&mut self, inputs: &[Array]) -> Result<Vec<Array>, Exception> {
        // SAFETY: `self.closure` lives until `self` drops.
        unsafe { apply(self.closure, inputs, "a compiled function") }
    }
}

impl Drop for Compiled<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle came from `mlx_compile` and is freed once.
        unsafe {
            mlx_sys::mlx_closure_free(self.closure);
        }
    }
}

/// A CUDA kernel of ours run by MLX (`mlx_fast_cuda_kernel`): MLX compiles
/// the source with NVRTC at its first evaluation (and caches the result),
/// then launches it as one node of its command graphs. MLX has no gradient
/// for it, and only its CUDA backend runs it.
pub struct CudaKernel {
    raw: mlx_sys::mlx_fast_cuda_kernel,
    inputs: usize,
    outputs: usize,
}

impl std::fmt::Debug for CudaKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKernel")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

/// An MLX vector of the strings `items` (freed by the caller).
fn vector_string(items: &[&str]) -> Result<mlx_sys::mlx_vector_string, Exception> {
    let owned = items
        .iter()
        .map(|s| std::ffi::CString::new(*s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Exception::custom(format!("kernel argument name: {e}")))?;
    // SAFETY: MLX copies each NUL-terminated string while `owned` lives.
    unsafe {
        let v = mlx_sys::mlx_vector_string_new();
        for s in &owned {
            mlx_sys::mlx_vector_string_append_value(v, s.as_ptr());
        }
        Ok(v)
    }
}

impl CudaKernel {
    /// A kernel named `name` whose body is `source`, taking the arrays
    /// `inputs` (row-contiguous: MLX copies any that are not) and writing
    /// `outputs`, by those names. Nothing is compiled yet.
    pub fn new(
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        source: &str,
    ) -> Result<Self, Exception> {
        Self::with_header(name, inputs, outputs, source, "")
    }

    /// As [`CudaKernel::new`], with `header` placed before the kernel
    /// (`#include`s of MLX's device headers, helper functions).
    pub fn with_header(
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        source: &str,
        header: &str,
    ) -> Result<Self, Exception> {
        let c = |s: &str| {
            std::ffi::CString::new(s).map_err(|e| Exception::custom(format!("kernel text: {e}")))
        };
        let (c_name, c_source, c_header) = (c(name)?, c(source)?, c(header)?);
        let input_names = vector_string(inputs)?;
        let output_names = match vector_string(outputs) {
            Ok(v) => v,
            Err(e) => {
                // SAFETY: made above, freed once.
                unsafe { mlx_sys::mlx_vector_string_free(input_names) };
                return Err(e);
            }
        };
        // SAFETY: every pointer is a live NUL-terminated string or MLX
        // vector for the call; MLX copies them into the kernel function.
        // The vectors are freed here; the kernel handle is owned by the
        // returned value (freed on drop), or freed here when MLX failed.
        unsafe {
            let raw = mlx_sys::mlx_fast_cuda_kernel_new(
                c_name.as_ptr(),
                input_names,
                output_names,
                c_source.as_ptr(),
                c_header.as_ptr(),
                true,
                0,
            );
            mlx_sys::mlx_vector_string_free(input_names);
            mlx_sys::mlx_vector_string_free(output_names);
            if raw.ctx.is_null() {
                return Err(Exception::custom(format!(
                    "MLX could not make kernel {name}"
                )));
            }
            Ok(Self {
                raw,
                inputs: inputs.len(),
                outputs: outputs.len(),
            })
        }
    }

    /// The kernel over `inputs` (in the order of their names), writing
    /// outputs of the given shapes and dtypes, with `grid` threads in all
    /// in blocks of `block` threads (MLX's convention: a grid of threads,
    /// not of blocks), on the thread's default stream.
    pub fn apply(
        &self,
        inputs: &[&Array],
        outputs: &[(&[i32], Dtype)],
        grid: [i32; 3],
        block: [i32; 3],
    ) -> Result<Vec<Array>, Exception> {
        if inputs.len() != self.inputs || outputs.len() != self.outputs {
            return Err(Exception::custom(format!(
                "kernel called with {} inputs and {} outputs, not {} and {}",
                inputs.len(),
                outputs.len(),
                self.inputs,
                self.outputs
            )));
        }
        let ptrs: Vec<mlx_sys::mlx_array> = inputs.iter().map(|a| a.as_ptr()).collect();
        let stream = Stream::thread_local_or_default();
        // SAFETY: the config, the input vector and the output vector are
        // made here and freed before returning; each shape slice is live
        // for its call (MLX copies it); `self.raw` lives while `self` does.
        // Each array read from the output vector is a new reference that
        // the returned `Array` takes over.
        unsafe {
            let config = mlx_sys::mlx_fast_cuda_kernel_config_new();
            let mut status = 0;
            for (shape, dtype) in outputs {
                status |= mlx_sys::mlx_fast_cuda_kernel_config_add_output_arg(
                    config,
                    shape.as_ptr(),
                    shape.len(),
                    *dtype as mlx_sys::mlx_dtype,
                );
            }
            status |=
                mlx_sys::mlx_fast_cuda_kernel_config_set_grid(config, grid[0], grid[1], grid[2]);
            status |= mlx_sys::mlx_fast_cuda_kernel_config_set_thread_group(
                config, block[0], block[1], block[2],
            );
            let input = mlx_sys::mlx_vector_array_new_data(ptrs.as_ptr(), ptrs.len());
            let mut output = mlx_sys::mlx_vector_array_new();
            if status == 0 {
                status = mlx_sys::mlx_fast_cuda_kernel_apply(
                    &mut output,
                    self.raw,
                    input,
                    config,
                    stream.as_ptr(),
                );
            }
            mlx_sys::mlx_vector_array_free(input);
            mlx_sys::mlx_fast_cuda_kernel_config_free(config);
            if status != 0 {
                mlx_sys::mlx_vector_array_free(output);
                return Err(Exception::custom("MLX could not apply a CUDA kernel"));
            }
            Ok(take_arrays(output))
        }
    }
}

impl Drop for CudaKernel {
    fn drop(&mut self) {
        // SAFETY: the handle came from `mlx_fast_cuda_kernel_new` and is
        // freed once.
        unsafe {
            mlx_sys::mlx_fast_cuda_kernel_free(self.raw);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpointed function gives the same values and gradients as the
    /// function itself, and is called again when the gradient is traced; its
    /// error comes back as the error of the call.
    #[test]
    fn checkpoint_recomputes_and_keeps_gradients() {
        use mlx_rs::transforms::value_and_grad_with_argnums;
        let calls = std::cell::Cell::new(0);
        let x = Array::from_slice(&[0.5f32, -1.0, 2.0], &[3]);
        let w = Array::from_slice(&[1.5f32, 0.25, -2.0], &[3]);
        let plain = |p: &[Array]| -> Result<Vec<Array>, Exception> {
            Ok(vec![p[0].multiply(&p[1])?.sin()?.sum(None)?])
        };
        let checkpointed = |p: &[Array]| -> Result<Vec<Array>, Exception> {
            checkpoint(
                |q| {
                    calls.set(calls.get() + 1);
                    Ok(vec![q[0].multiply(&q[1])?.sin()?.sum(None)?])
                },
                p,
            )
        };
        let (v1, g1) =
            value_and_grad_with_argnums(plain, &[0, 1][..])(&[x.clone(), w.clone()][..]).unwrap();
        let (v2, g2) = value_and_grad_with_argnums(checkpointed, &[0, 1][..])(&[x, w][..]).unwrap();
        assert!(v1[0].eq_values(&v2[0]).unwrap());
        for (a, b) in g1.iter().zip(&g2) {
            assert!(a.all_close(b, 1e-6, 1e-6, None).unwrap());
        }
        assert!(calls.get() >= 2, "called {} times", calls.get());
        let failing = checkpoint(
            |_| Err(Exception::custom("no such layer")),
            &[Array::from_f32(1.0)],
        );
        assert!(failing.unwrap_err().to_string().contains("no such layer"));
    }

    /// The update lands exactly on its region; a region that does not fit
    /// the update or the source is an error, not an MLX abort.
    #[test]
    fn slice_update_writes_its_region_and_refuses_misfits() {
        let src = Array::from_slice(&[0f32; 12], &[1, 2, 3, 2]);
        let up = Array::from_slice(&[1f32, 2., 3., 4.], &[1, 2, 1, 2]);
        let out = slice_update(&src, &up, &[0, 0, 1, 0], &[1, 2, 2, 2]).unwrap();
        out.eval().unwrap();
        assert_eq!(
            out.as_slice::<f32>(),
            &[0., 0., 1., 2., 0., 0., 0., 0., 3., 4., 0., 0.]
        );
        // Region longer than the update, past the source's end, wrong rank,
        // wrong dtype.
        assert!(slice_update(&src, &up, &[0, 0, 1, 0], &[1, 2, 3, 2]).is_err());
        assert!(slice_update(&src, &up, &[0, 0, 3, 0], &[1, 2, 4, 2]).is_err());
        assert!(slice_update(&src, &up, &[0, 0, 1], &[1, 2, 2]).is_err());
        let half = up.as_dtype(Dtype::Float16).unwrap();
        assert!(slice_update(&src, &half, &[0, 0, 1, 0], &[1, 2, 2, 2]).is_err());
    }
}

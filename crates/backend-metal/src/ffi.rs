//! `unsafe` at the edge of MLX: handing raw bytes to MLX, and the one MLX
//! operation called through its C API directly ([`slice_update`]). (The only
//! other `unsafe` code of the crate is `device`'s queries of MLX's C API;
//! weight files are mapped by `inference_formats::map_file`.)

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

#[cfg(test)]
mod tests {
    use super::*;

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

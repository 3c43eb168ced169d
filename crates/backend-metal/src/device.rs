//! Which MLX a process runs and on which device: the one module of this crate that depends
//! on the target platform.

use std::ffi::CStr;
use std::fmt;

use mlx_rs::{Device, DeviceType};

/// The MLX release this crate was built against (mlx-sys's `DEP_MLX_VERSION`), e.g. `0.32.2`.
pub const MLX_BUILD_VERSION: &str = env!("BACKEND_METAL_MLX_VERSION");

/// The GPU programming interface through which MLX reaches a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GpuApi {
    /// Apple's Metal (macOS on Apple silicon, with the `mlx-metal` build of MLX).
    Metal,
    /// NVIDIA CUDA (Linux, with the `mlx-cuda-13` build of MLX).
    Cuda,
}

impl fmt::Display for GpuApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Metal => "Metal",
            Self::Cuda => "CUDA",
        })
    }
}

/// The GPU interface MLX can have on the platform this crate was built for.
#[cfg(target_os = "macos")]
pub const PLATFORM_GPU_API: GpuApi = GpuApi::Metal;

/// The GPU interface MLX can have on the platform this crate was built for.
#[cfg(not(target_os = "macos"))]
pub const PLATFORM_GPU_API: GpuApi = GpuApi::Cuda;

/// What MLX reports about itself and its devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlxInfo {
    /// The version of the MLX library loaded at run time, e.g. `0.32.2`.
    pub version: String,
    /// The GPU interface MLX can use now, if any: a Metal device, or a CUDA device with a
    /// working driver and the CUDA libraries of the CUDA build of MLX.
    pub gpu: Option<GpuApi>,
    /// MLX's default device, as MLX writes it (e.g. `Device(gpu, 0)`).
    pub default_device: String,
    /// Whether the default device is a GPU (MLX picks the GPU when one is available).
    pub default_is_gpu: bool,
}

impl fmt::Display for MlxInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MLX {}; GPU: ", self.version)?;
        match self.gpu {
            Some(api) => write!(f, "{api}")?,
            None => f.write_str("none")?,
        }
        write!(f, "; default device: {}", self.default_device)
    }
}

/// Asks MLX for its version, GPU availability and default device.
pub fn describe() -> MlxInfo {
    let device = Device::default();
    MlxInfo {
        version: mlx_version().unwrap_or_else(|| "unknown".to_owned()),
        gpu: gpu_available().then_some(PLATFORM_GPU_API),
        default_device: device.to_string(),
        default_is_gpu: matches!(device.get_type(), Ok(DeviceType::Gpu)),
    }
}

/// The version of the MLX library loaded at run time, or `None` if MLX reports an error.
pub fn mlx_version() -> Option<String> {
    // SAFETY: `mlx_string_new` returns an empty string handle that `mlx_version` fills in;
    // the data pointer is read (and copied) while the handle is alive, and the handle is
    // freed exactly once.
    unsafe {
        let mut handle = mlx_sys::mlx_string_new();
        let status = mlx_sys::mlx_version(&mut handle);
        let data = mlx_sys::mlx_string_data(handle);
        let version = (status == 0 && !data.is_null())
            .then(|| CStr::from_ptr(data).to_string_lossy().into_owned());
        mlx_sys::mlx_string_free(handle);
        version
    }
}

/// Whether MLX can use a GPU through [`PLATFORM_GPU_API`].
pub fn gpu_available() -> bool {
    let mut available = false;
    // SAFETY: the function writes one `bool` through a pointer to a live local.
    let status = unsafe { platform_gpu_is_available(&mut available) };
    status == 0 && available
}

#[cfg(target_os = "macos")]
use mlx_sys::mlx_metal_is_available as platform_gpu_is_available;

#[cfg(not(target_os = "macos"))]
use mlx_sys::mlx_cuda_is_available as platform_gpu_is_available;

/// Blocks until MLX has finished the work queued on its default stream; `false` if MLX
/// reports an error. On a GPU, buffers are released when the work using them completes, so
/// call this before reading the memory counters.
pub fn synchronize() -> bool {
    // SAFETY: the function takes no arguments and reports failure through its status.
    unsafe { mlx_sys::mlx_synchronize_default() == 0 }
}

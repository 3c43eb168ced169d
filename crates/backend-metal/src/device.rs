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

/// Whether this thread's default stream (the one MLX operations without a
/// stream run on, as [`mlx_rs::with_device`] sets it) is on the GPU.
pub fn thread_stream_is_gpu() -> bool {
    let stream = mlx_rs::Stream::thread_local_or_default();
    let mut kind = mlx_sys::mlx_device_type__MLX_CPU;
    // SAFETY: `stream` is a live handle for the call; `dev` starts empty,
    // MLX fills it, it is read while alive and freed once; the type is
    // written through a pointer to a live local.
    let status = unsafe {
        let mut dev = mlx_sys::mlx_device_new();
        let mut status = mlx_sys::mlx_stream_get_device(&mut dev, stream.as_ptr());
        if status == 0 {
            status = mlx_sys::mlx_device_get_type(&mut kind, dev);
        }
        mlx_sys::mlx_device_free(dev);
        status
    };
    status == 0 && kind == mlx_sys::mlx_device_type__MLX_GPU
}

/// One value of MLX's device information.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoValue {
    /// A text value (e.g. `device_name`, `architecture`).
    Text(String),
    /// A size or count (e.g. `memory_size`, `max_recommended_working_set_size`).
    Size(u64),
}

/// The device a question is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The CPU.
    Cpu,
    /// The first GPU.
    Gpu,
}

/// What MLX reports about a device: keys such as `device_name`,
/// `architecture`, `memory_size` and `max_recommended_working_set_size`,
/// where MLX has them for that device (they differ between Metal, CUDA and
/// the CPU). Fails with MLX's message for a device MLX does not have.
pub fn device_info(which: Which) -> Result<std::collections::BTreeMap<String, InfoValue>, String> {
    use std::collections::BTreeMap;
    use std::ffi::CString;

    let kind = match which {
        Which::Cpu => mlx_sys::mlx_device_type__MLX_CPU,
        Which::Gpu => mlx_sys::mlx_device_type__MLX_GPU,
    };
    let mut out = BTreeMap::new();
    // SAFETY: every handle created here (device, info, key vector) is freed
    // exactly once below, on every path; string pointers MLX hands out are read
    // (and copied) while the object owning them is alive; status codes are
    // checked before outputs are used.
    unsafe {
        let dev = mlx_sys::mlx_device_new_type(kind, 0);
        let mut info = mlx_sys::mlx_device_info_new();
        let status = mlx_sys::mlx_device_info_get(&mut info, dev);
        if status != 0 {
            mlx_sys::mlx_device_info_free(info);
            mlx_sys::mlx_device_free(dev);
            return Err(format!(
                "MLX has no {which:?} device information (status {status})"
            ));
        }
        let mut keys = mlx_sys::mlx_vector_string_new();
        if mlx_sys::mlx_device_info_get_keys(&mut keys, info) == 0 {
            for i in 0..mlx_sys::mlx_vector_string_size(keys) {
                let mut key_ptr: *mut std::os::raw::c_char = std::ptr::null_mut();
                if mlx_sys::mlx_vector_string_get(&mut key_ptr, keys, i) != 0 || key_ptr.is_null() {
                    continue;
                }
                let key = CStr::from_ptr(key_ptr).to_string_lossy().into_owned();
                let Ok(c_key) = CString::new(key.clone()) else {
                    continue;
                };
                let mut is_string = false;
                if mlx_sys::mlx_device_info_is_string(&mut is_string, info, c_key.as_ptr()) != 0 {
                    continue;
                }
                if is_string {
                    let mut value: *const std::os::raw::c_char = std::ptr::null();
                    if mlx_sys::mlx_device_info_get_string(&mut value, info, c_key.as_ptr()) == 0
                        && !value.is_null()
                    {
                        out.insert(
                            key,
                            InfoValue::Text(CStr::from_ptr(value).to_string_lossy().into_owned()),
                        );
                    }
                } else {
                    let mut value: usize = 0;
                    if mlx_sys::mlx_device_info_get_size(&mut value, info, c_key.as_ptr()) == 0 {
                        out.insert(key, InfoValue::Size(value as u64));
                    }
                }
            }
        }
        mlx_sys::mlx_vector_string_free(keys);
        mlx_sys::mlx_device_info_free(info);
        mlx_sys::mlx_device_free(dev);
    }
    Ok(out)
}

/// What MLX reported about this machine, asked once.
pub fn mlx() -> &'static MlxInfo {
    static INFO: std::sync::OnceLock<MlxInfo> = std::sync::OnceLock::new();
    INFO.get_or_init(describe)
}

/// Whether MLX's default device is a GPU.
pub fn default_is_gpu() -> bool {
    mlx().default_is_gpu
}

/// The device string of MLX's default device, e.g. `cuda:0`, `metal:0` or `cpu`.
pub fn default_device() -> String {
    let info = mlx();
    match (info.default_is_gpu, info.gpu) {
        (true, Some(GpuApi::Metal)) => "metal:0".to_owned(),
        (true, Some(GpuApi::Cuda)) => "cuda:0".to_owned(),
        _ => "cpu".to_owned(),
    }
}

/// Hands the host memory the allocator keeps free back to the system
/// (glibc's `malloc_trim`): after a burst of calls on the CPU, MLX's freed
/// buffers would otherwise stay in the process's resident set. Elsewhere a
/// no-op.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_host_memory() {
    // SAFETY: `malloc_trim` only walks and shrinks glibc's own heaps; it
    // takes no pointers from us and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Hands the host memory the allocator keeps free back to the system
/// (a no-op off glibc).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_host_memory() {}

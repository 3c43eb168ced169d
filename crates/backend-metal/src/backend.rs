//! The two backends this crate registers, `mlx` and `metal`.

use std::path::Path;

use inference_core::{Availability, Backend, CanLoad, LoadOptions, ModelFormat, Result, TextModel};

use crate::device::{self, GpuApi};
use crate::engine::{self, MlxModel, Placement};
use crate::error::{METAL_NAME, NAME};

/// Where the `mlx` backend places a model loaded with `opts`: the CPU for
/// `gpu_layers == 0`, MLX's default device otherwise.
pub fn placement_for(opts: &LoadOptions) -> Placement {
    if opts.gpu_layers == 0 {
        Placement::Cpu
    } else {
        Placement::Default
    }
}

/// The `mlx` backend: MLX on its default device (GPU where there is one).
#[derive(Debug, Clone, Copy, Default)]
pub struct MlxBackend;

impl Backend for MlxBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn available(&self) -> Availability {
        // Linking succeeded, so the runtime is here; a broken one fails to report its version.
        if device::mlx_version().is_some() {
            Availability::Available
        } else {
            Availability::Unavailable("the MLX runtime does not answer (mlx_version failed)".into())
        }
    }

    fn device(&self) -> String {
        device::default_device()
    }

    fn priority(&self) -> i32 {
        if device::default_is_gpu() {
            100
        } else {
            10
        }
    }

    fn load_model(&self, path: &Path, opts: &LoadOptions) -> Result<Box<dyn TextModel>> {
        Ok(Box::new(MlxModel::load(path, opts, placement_for(opts))?))
    }

    fn can_load(&self, path: &Path) -> CanLoad {
        engine::can_load(path)
    }

    fn loads(&self) -> String {
        engine::loads()
    }

    fn formats(&self) -> Vec<ModelFormat> {
        ModelFormat::ALL.to_vec()
    }
}

/// The `metal` backend: MLX on an Apple Metal GPU, and nowhere else.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetalBackend;

impl Backend for MetalBackend {
    fn name(&self) -> &str {
        METAL_NAME
    }

    fn available(&self) -> Availability {
        match device::mlx().gpu {
            Some(GpuApi::Metal) => Availability::Available,
            Some(GpuApi::Cuda) => Availability::Unavailable(
                "MLX's GPU here is NVIDIA CUDA, not Apple Metal (use the \"mlx\" backend)".into(),
            ),
            None => Availability::Unavailable(
                "no Apple Metal GPU: MLX runs on the CPU here (use the \"mlx\" backend)".into(),
            ),
        }
    }

    fn device(&self) -> String {
        "metal:0".to_owned()
    }

    fn priority(&self) -> i32 {
        // Above `mlx` on the same GPU: the name says what the user gets.
        110
    }

    fn load_model(&self, path: &Path, opts: &LoadOptions) -> Result<Box<dyn TextModel>> {
        if let Some(reason) = self.available().reason() {
            return Err(inference_core::Error::BackendUnavailable {
                name: METAL_NAME.to_owned(),
                reason: reason.to_owned(),
            });
        }
        let placement = if opts.gpu_layers == 0 {
            Placement::Cpu
        } else {
            Placement::Gpu
        };
        Ok(Box::new(MlxModel::load(path, opts, placement)?))
    }

    fn can_load(&self, path: &Path) -> CanLoad {
        engine::can_load(path)
    }

    fn loads(&self) -> String {
        engine::loads()
    }

    fn formats(&self) -> Vec<ModelFormat> {
        ModelFormat::ALL.to_vec()
    }
}

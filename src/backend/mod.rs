//! The backend, chosen once when the model loads: candle's CPU ops, or
//! CUDA (candle's device and cuBLAS plus our kernels in `kernels/`). This is
//! the one place that says `cfg(feature = "cuda")`: without the feature,
//! `cuda` is a stub with the same items whose types cannot exist and whose
//! functions fail naming the feature, so the rest of the crate is written
//! once (candle's own pattern for its CUDA backend).
//!
//! - `cuda/`: the CUDA glue (the crate's only `unsafe`): PTX loading and
//!   launches on the device's stream, the GPTQ layer, the paged cache and
//!   attention, fused ops, the device sampler, the memory pool's counters.
//! - `device.rs`: which device a job runs on (`engine.device = "auto"`) and
//!   how large its KV cache is.

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_off.rs"]
pub mod cuda;

pub mod device;

/// Head dims the attention kernels are built for (Mistral-7B's is 128);
/// the CUDA cache refuses others when it is created.
pub const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

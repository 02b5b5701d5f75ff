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
//! - `decode_plan.rs`: the decode partitions several sequences share (read
//!   once for all of them on CUDA).
//! - `device.rs`: which device a job runs on (`engine.device = "auto"`) and
//!   how large its KV cache is.

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_off.rs"]
pub mod cuda;

mod cache;
mod cpu;
mod cuda_ops;
pub mod decode_plan;
pub mod device;
pub mod timeline;

pub use cache::{fresh_tables, AttnIn, Batch, KvShape, PagedKvCache, SeqChunk};
pub use cpu::{rope_tables, CpuKv, CpuOps};
pub use cuda_ops::CudaOps;

use crate::quant::{GptqMode, GptqWeight, RandomGptq};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// Head dims the attention kernels are built for (Mistral-7B's is 128);
/// the CUDA cache refuses others when it is created.
pub const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// Where a layer's weights go.
#[derive(Debug, Clone, Copy)]
pub struct LayerTarget<'a> {
    /// The layer's name (for messages).
    pub name: &'a str,
    /// Compute dtype.
    pub dtype: DType,
    /// The device.
    pub device: &'a Device,
    /// How its GPTQ products run (CUDA).
    pub mode: GptqMode,
}

/// A linear layer's weight in the form its backend multiplies.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// A float weight `[out, in]`: dense checkpoints, and GPTQ dequantized
    /// exactly once (the CPU's dense product).
    Dense(Tensor),
    /// The kernels' tile layout on the GPU, and how its products run.
    Gpu(Box<cuda::GptqGpu>, GptqMode),
    /// A float weight `[out, in]` on CUDA in a batch-invariant job
    /// (`gptq_kernel = "fused"`): its products take a cuBLASLt algorithm
    /// without a K split ([`cuda::invariant_product`]).
    Invariant(Tensor),
}

impl LinearWeight {
    /// y [T, out] = x [T, in] W^T.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => Ok(x.matmul(&w.t()?)?),
            Self::Gpu(g, mode) => g.forward(x, *mode),
            Self::Invariant(w) => cuda::invariant_product(x, w, cuda::WeightLayout::Nk),
        }
    }
}

/// The ops the model is written against, one implementation per backend,
/// chosen once when the model loads ([`ops_for`]).
pub trait Ops: std::fmt::Debug + Send + Sync {
    /// The backend's name for logs.
    fn name(&self) -> &'static str;

    /// `(rmsnorm(x + add) * weight, x + add)`, normalised in f32 as HF does.
    fn rmsnorm_add(
        &self,
        x: &Tensor,
        add: Option<&Tensor>,
        weight: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor)>;

    /// `silu(gate) * up`.
    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;

    /// The RoPE tables this backend's `rope` takes for a forward's
    /// positions (once per forward: the rows at the positions, or the full
    /// tables for a kernel that indexes them).
    fn rope_rows(&self, cos: &Tensor, sin: &Tensor, positions: &Tensor)
        -> Result<(Tensor, Tensor)>;

    /// Rotate-half RoPE of q `[T, heads*d]` and k `[T, kv_heads*d]` at the
    /// forward's positions, with the tables from `rope_rows`;
    /// `dims` = (heads, kv_heads, head_dim).
    fn rope(
        &self,
        q: &Tensor,
        k: &Tensor,
        tables: (&Tensor, &Tensor),
        positions: &Tensor,
        dims: (usize, usize, usize),
    ) -> Result<(Tensor, Tensor)>;

    /// Bytes of one cached K or V value.
    fn kv_elem_bytes(&self) -> usize;

    /// An empty paged KV cache on `dev`.
    fn new_cache(&self, shape: &KvShape, dev: &Device) -> Result<PagedKvCache>;

    /// A float weight `[out, in]` in the form this backend multiplies: as
    /// it is, except on CUDA in a batch-invariant job.
    fn dense(&self, w: Tensor, _at: &LayerTarget<'_>) -> Result<LinearWeight> {
        Ok(LinearWeight::Dense(w))
    }

    /// A checkpoint's GPTQ layer in the form this backend multiplies.
    fn gptq(&self, g: &GptqWeight, at: &LayerTarget<'_>) -> Result<LinearWeight>;

    /// A random GPTQ layer of the spec's shape and quantization.
    fn dummy_gptq(&self, spec: &RandomGptq, at: &LayerTarget<'_>) -> Result<LinearWeight>;

    /// The largest top-k whose candidates this backend picks on the device
    /// (0: sampling happens on the host from the full logits row).
    fn device_top_k_max(&self) -> usize;

    /// Each row's `k` most likely `(token, logit / temperature)`, in the
    /// host sampler's order, picked on the device.
    fn top_k_candidates(
        &self,
        rows: &Tensor,
        temps: &[f32],
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>>;

    /// f32 `rows` [R, V] with HF's repetition penalty applied, on the
    /// device: row r's distinct tokens of `seen[r]`, by `penalties[r]`.
    fn penalize(&self, rows: &Tensor, seen: &[Vec<u32>], penalties: &[f32]) -> Result<Tensor>;

    /// Per row at temperature `temps[r]`, as the host sampler computes
    /// them: (the largest finite logit / t, the f64 sum of
    /// exp(f64(logit / t - max)) over the finite logits).
    fn row_norms(&self, rows: &Tensor, temps: &[f32]) -> Result<Vec<(f32, f64)>>;

    /// Per row: the token drawn with the uniform `us[r]` from
    /// softmax(logits / t) over every finite logit in id order (the host
    /// sampler's draw with neither top-k nor top-p); `None`: no finite logit.
    fn draw(&self, rows: &Tensor, temps: &[f32], us: &[f64]) -> Result<Vec<Option<u32>>>;

    /// The most device memory this process's tensors took since the last
    /// measurement started (`None` where not measured).
    fn peak_memory(&self, dev: &Device) -> Option<usize>;

    /// Random float weights, uniform in `range`, the same for the same seed.
    fn random(
        &self,
        shape: &[usize],
        range: (f32, f32),
        seed: u64,
        at: &LayerTarget<'_>,
    ) -> Result<Tensor>;
}

static CPU: CpuOps = CpuOps;
static CUDA: CudaOps = CudaOps;

/// The ops of a device: our kernels on CUDA (which run f16 only), candle's
/// ops on the CPU.
pub fn ops_for(device: &Device, dtype: DType) -> Result<&'static dyn Ops> {
    if !device.is_cuda() {
        return Ok(&CPU);
    }
    if dtype != DType::F16 {
        return Err(Error::Config(format!(
            "model.dtype is {dtype:?} but the CUDA kernels run f16; set model.dtype = \"f16\" with engine.device = cuda"
        )));
    }
    Ok(&CUDA)
}

/// Token ids on their way from the device to the host: a copy queued on
/// the CUDA stream behind the work that computes them (the host reads them
/// when it has queued the next step), or already read (the CPU).
#[derive(Debug)]
pub enum PendingIds {
    /// Read.
    Ready(Vec<u32>),
    /// Queued on the CUDA stream.
    Cuda(cuda::Download),
}

impl PendingIds {
    /// Starts reading `ids` (u32 `[n]`).
    pub fn start(ids: &Tensor) -> Result<Self> {
        Ok(match ids.device() {
            Device::Cuda(_) => Self::Cuda(cuda::start_download(ids)?),
            _ => Self::Ready(ids.to_vec1()?),
        })
    }

    /// The ids (waits for the device's copy).
    pub fn wait(self) -> Result<Vec<u32>> {
        match self {
            Self::Ready(v) => Ok(v),
            Self::Cuda(d) => d.wait(),
        }
    }
}

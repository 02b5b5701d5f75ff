//! The CUDA backend's face in a build without the `cuda` feature: the same
//! items, so that callers never say `cfg`. Its types cannot be built (they
//! are uninhabited) and its functions fail naming the missing feature; no
//! CUDA device exists in such a build, so the model never reaches them.

use super::KvShape;
use crate::kv::BlockId;
use crate::quant::{GptqMode, RandomGptq, TiledGptq};
use crate::{Error, Result};
use candle_core::{CudaDevice, Device, Shape, Tensor};

fn off<T>() -> Result<T> {
    Err(Error::Device(
        "this binary was built without the `cuda` feature".into(),
    ))
}

/// Turns the timed choice of cuBLAS products on or off: nothing to turn in
/// this build.
pub fn set_cublas_tuning(_on: bool) {}

/// How a product's f16 weight lies in memory (as in the CUDA build).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightLayout {
    /// W^T [K, N] row-major.
    Kn,
    /// W [N, K] row-major.
    Nk,
}

/// The batch-invariant product: none in this build.
pub fn invariant_product(_x: &Tensor, _w: &Tensor, _layout: WeightLayout) -> Result<Tensor> {
    off()
}

/// A timing event on a CUDA stream: none in this build.
#[derive(Debug)]
pub enum Event {}

/// Records a timing event: none in this build.
pub fn record_event(_dev: &Device) -> Result<Event> {
    off()
}

/// Seconds per call of `f` replayed from a CUDA graph: none in this build.
pub fn graph_time(
    _dev: &Device,
    _iters: usize,
    _f: impl FnMut() -> Result<()>,
) -> Result<Option<f64>> {
    off()
}

/// A captured CUDA graph: none in this build (never built: [`capture`]
/// fails; not uninhabited, so that a cache of them reads as plain code).
pub struct Graph {
    _never: (),
}

/// Captures a CUDA graph: none in this build.
pub fn capture(_dev: &Device, _f: impl FnOnce() -> Result<()>) -> Result<Option<Graph>> {
    off()
}

impl Graph {
    /// Replays the graph: none in this build.
    pub fn launch(&self) -> Result<()> {
        off()
    }
}

/// Starts or stops the profiler: none in this build.
pub fn profiler(_dev: &Device, _on: bool) -> Result<()> {
    off()
}

impl Event {
    /// Device milliseconds between two events: none in this build.
    pub fn elapsed_ms(&self, _end: &Event) -> Result<f64> {
        match *self {}
    }
}

/// Ids on their way to the host: none in this build.
#[derive(Debug)]
pub enum Download {}

/// Queues a copy of ids to the host: none in this build.
pub fn start_download(_ids: &Tensor) -> Result<Download> {
    off()
}

impl Download {
    /// The ids: none in this build.
    pub fn wait(self) -> Result<Vec<u32>> {
        match self {}
    }
}

/// Largest top-k the device sampler takes.
pub const TOPK_MAX: usize = 1024;

/// A CUDA device: none in this build.
pub fn single_stream_device(_ordinal: usize) -> Result<Device> {
    off()
}

/// Visible CUDA devices: none in this build.
pub fn device_count() -> Result<usize> {
    off()
}

/// (free, total) device memory: none in this build.
pub fn mem_info() -> Result<(usize, usize)> {
    off()
}

/// This process's device memory: none in this build.
pub fn memory_usage(_dev: &Device) -> Result<(u64, u64)> {
    off()
}

/// Starts a device-memory peak measurement: none in this build.
pub fn reset_memory_peak(_dev: &Device) -> Result<()> {
    off()
}

/// The fused RMSNorm + residual kernel: not in this build.
pub fn rmsnorm_add(
    _x: &Tensor,
    _add: Option<&Tensor>,
    _weight: &Tensor,
    _eps: f64,
) -> Result<(Tensor, Tensor)> {
    off()
}

/// The fused SiLU-mul kernel: not in this build.
pub fn silu_mul(_gate: &Tensor, _up: &Tensor) -> Result<Tensor> {
    off()
}

/// The fused RoPE kernel: not in this build.
pub fn rope_qk(
    _q: &Tensor,
    _k: &Tensor,
    _cos: &Tensor,
    _sin: &Tensor,
    _positions: &Tensor,
    _head_dim: usize,
) -> Result<(Tensor, Tensor)> {
    off()
}

/// Random f16 values on a CUDA device: not in this build.
pub fn fill_f16(
    _dev: &CudaDevice,
    _shape: impl Into<Shape>,
    _seed: u64,
    _lo: f32,
    _hi: f32,
) -> Result<Tensor> {
    off()
}

/// The device top-k sampler: not in this build.
pub fn topk_rows(_logits: &Tensor, _temps: &[f32], _k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    off()
}

/// The device repetition penalty: not in this build.
pub fn penalize_rows(_rows: &Tensor, _seen: &[Vec<u32>], _penalties: &[f32]) -> Result<()> {
    off()
}

/// The device row normalisers: not in this build.
pub fn row_norms(_rows: &Tensor, _temps: &[f32]) -> Result<Vec<(f32, f64)>> {
    off()
}

/// The device draw: not in this build.
pub fn draw_rows(_rows: &Tensor, _temps: &[f32], _us: &[f64]) -> Result<Vec<Option<u32>>> {
    off()
}

/// A GPTQ layer on the GPU: cannot exist in this build.
#[derive(Debug, Clone)]
pub enum GptqGpu {}

impl GptqGpu {
    /// Uploads a tiled layer: not in this build.
    pub fn upload(_t: &TiledGptq, _dev: &Device) -> Result<Self> {
        off()
    }

    /// A random layer: not in this build.
    pub fn dummy(_spec: &RandomGptq, _dev: &Device) -> Result<Self> {
        off()
    }

    /// Keeps f16 weights beside the packed ones.
    pub fn make_resident(&mut self) -> Result<()> {
        match *self {}
    }

    /// The product.
    pub fn forward(&self, _x: &Tensor, _mode: GptqMode) -> Result<Tensor> {
        match *self {}
    }
}

/// The paged cache on the GPU: cannot exist in this build.
#[derive(Debug)]
pub enum CudaKv {}

/// A forward's GPU index tensors: cannot exist in this build.
pub enum GpuBatch {}

impl GpuBatch {
    /// A CUDA graph's key: not in this build.
    pub fn graph_key(&self) -> Option<(usize, usize)> {
        match *self {}
    }

    /// Copies index tensors: not in this build.
    pub fn copy_into(&self, _dst: &GpuBatch) -> Result<()> {
        match *self {}
    }
}

impl CudaKv {
    /// Zeroed storage: not in this build.
    pub fn new(_s: &KvShape, _dev: &Device) -> Result<Self> {
        off()
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        match *self {}
    }

    /// Copies a block's rows in every layer.
    pub fn copy_blocks(&mut self, _copies: &[crate::kv::BlockCopy]) -> Result<()> {
        match *self {}
    }

    /// A forward's index tensors.
    pub(crate) fn prepare(
        &self,
        _chunks: &[(usize, usize, Vec<BlockId>)],
        _dev: &Device,
    ) -> Result<GpuBatch> {
        match *self {}
    }

    /// RoPE and the cache write.
    pub(crate) fn rope_write(
        &mut self,
        _layer: usize,
        _b: &GpuBatch,
        _a: &crate::backend::AttnIn<'_>,
        _positions: &Tensor,
    ) -> Result<Tensor> {
        match *self {}
    }

    /// Attends q over the written cache.
    pub(crate) fn attend(
        &self,
        _layer: usize,
        _b: &GpuBatch,
        _q: &Tensor,
        _window: Option<usize>,
    ) -> Result<Tensor> {
        match *self {}
    }
}

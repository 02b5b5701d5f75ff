//! The CUDA backend's ops: our kernels (fused RMSNorm + residual, SiLU-mul,
//! RoPE, the paged cache and attention, GPTQ in the tile layout) on the
//! device's stream; f16 throughout.

use super::cache::{KvShape, PagedKvCache};
use super::{LayerTarget, LinearWeight, Ops};
use crate::cuda;
use crate::quant::{GptqMode, GptqWeight, RandomGptq, TiledGptq};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// Our CUDA kernels.
#[derive(Debug)]
pub struct CudaOps;

impl CudaOps {
    /// `resident`, `auto` and `fused` keep an f16 copy beside the packed
    /// weight.
    fn place(mut g: cuda::GptqGpu, mode: GptqMode) -> Result<LinearWeight> {
        if matches!(
            mode,
            GptqMode::Resident | GptqMode::Auto { .. } | GptqMode::Fused
        ) {
            g.make_resident()?;
        }
        Ok(LinearWeight::Gpu(Box::new(g), mode))
    }
}

impl Ops for CudaOps {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn rmsnorm_add(
        &self,
        x: &Tensor,
        add: Option<&Tensor>,
        weight: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        cuda::rmsnorm_add(x, add, weight, eps)
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        cuda::silu_mul(gate, up)
    }

    fn rope_rows(&self, cos: &Tensor, sin: &Tensor, _: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((cos.clone(), sin.clone())) // the kernel indexes the full tables
    }

    fn rope(
        &self,
        q: &Tensor,
        k: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        positions: &Tensor,
        (_, _, head_dim): (usize, usize, usize),
    ) -> Result<(Tensor, Tensor)> {
        cuda::rope_qk(q, k, cos, sin, positions, head_dim)
    }

    fn kv_elem_bytes(&self) -> usize {
        2
    }

    fn device_top_k_max(&self) -> usize {
        cuda::TOPK_MAX
    }

    fn top_k_candidates(
        &self,
        rows: &Tensor,
        temps: &[f32],
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        cuda::topk_rows(rows, temps, k)
    }

    fn penalize(&self, rows: &Tensor, seen: &[Vec<u32>], penalties: &[f32]) -> Result<Tensor> {
        let out = rows.to_dtype(DType::F32)?.copy()?;
        cuda::penalize_rows(&out, seen, penalties)?;
        Ok(out)
    }

    fn row_norms(&self, rows: &Tensor, temps: &[f32]) -> Result<Vec<(f32, f64)>> {
        cuda::row_norms(&rows.contiguous()?, temps)
    }

    fn draw(&self, rows: &Tensor, temps: &[f32], us: &[f64]) -> Result<Vec<Option<u32>>> {
        cuda::draw_rows(&rows.contiguous()?, temps, us)
    }

    fn peak_memory(&self, dev: &Device) -> Option<usize> {
        // The device's memory pool: this process's own tensors.
        cuda::memory_usage(dev).ok().map(|(_, high)| high as usize)
    }

    fn new_cache(&self, s: &KvShape, dev: &Device) -> Result<PagedKvCache> {
        Ok(PagedKvCache::Cuda(cuda::CudaKv::new(s, dev)?))
    }

    fn dense(&self, w: Tensor, at: &LayerTarget<'_>) -> Result<LinearWeight> {
        if !at.mode.batch_invariant() || w.dtype() != candle_core::DType::F16 {
            return Ok(LinearWeight::Dense(w));
        }
        Ok(LinearWeight::Invariant(w.contiguous()?))
    }

    fn gptq(&self, g: &GptqWeight, at: &LayerTarget<'_>) -> Result<LinearWeight> {
        let tiled =
            TiledGptq::from_weight(g).map_err(|e| Error::Model(format!("{}: {e}", at.name)))?;
        Self::place(cuda::GptqGpu::upload(&tiled, at.device)?, at.mode)
    }

    fn dummy_gptq(&self, spec: &RandomGptq, at: &LayerTarget<'_>) -> Result<LinearWeight> {
        Self::place(cuda::GptqGpu::dummy(spec, at.device)?, at.mode)
    }

    fn random(
        &self,
        shape: &[usize],
        (lo, hi): (f32, f32),
        seed: u64,
        at: &LayerTarget<'_>,
    ) -> Result<Tensor> {
        let Device::Cuda(d) = at.device else {
            return Err(Error::Engine(format!(
                "{}: the CUDA backend got a CPU device",
                at.name
            )));
        };
        Ok(cuda::fill_f16(d, shape, seed, lo, hi)?.to_dtype(at.dtype)?)
    }
}

//! Random fills on the device: dummy weights (quantized words, group
//! parameters) and benchmark inputs.

use super::{empty, grid, launch, ptr, Arg, OPS};
use crate::Result;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{Shape, Tensor};
use half::f16;

/// Random u32 words (as a U32 tensor) for dummy quantized weights.
pub(crate) fn fill_u32(dev: &CudaDevice, n: usize, seed: u64) -> Result<Tensor> {
    let t = empty::<u32>(dev, n)?;
    let p = ptr::<u32>(&t)?;
    use Arg::*;
    launch(
        dev,
        &OPS,
        "fill_u32",
        grid(n, 256),
        &[P(p), U(n as u64), U(seed)],
    )?;
    Ok(t)
}

/// Uniform f16 values in [lo, hi).
pub fn fill_f16(
    dev: &CudaDevice,
    shape: impl Into<Shape>,
    seed: u64,
    lo: f32,
    hi: f32,
) -> Result<Tensor> {
    let shape = shape.into();
    let n = shape.elem_count();
    let t = empty::<f16>(dev, shape)?;
    let p = ptr::<f16>(&t)?;
    use Arg::*;
    launch(
        dev,
        &OPS,
        "fill_f16",
        grid(n, 256),
        &[P(p), U(n as u64), U(seed), F(lo), F(hi)],
    )?;
    Ok(t)
}

/// Dummy group parameters half2(scale, 1024 + zero) for `pairs` entries.
pub(crate) fn fill_sz(
    dev: &CudaDevice,
    pairs: usize,
    seed: u64,
    bits: u32,
    (lo, span): (f32, f32),
) -> Result<Tensor> {
    let t = empty::<f16>(dev, 2 * pairs)?;
    let p = ptr::<f16>(&t)?;
    let bi = bits as i32;
    use Arg::*;
    launch(
        dev,
        &OPS,
        "fill_sz",
        grid(pairs, 256),
        &[P(p), U(pairs as u64), U(seed), I(bi), F(lo), F(span)],
    )?;
    Ok(t)
}

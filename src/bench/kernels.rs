//! Kernel benches on CUDA: GPTQ products (fused, dequantize + cuBLAS)
//! against cuBLAS f16 on Mistral-7B's shapes, the ceilings (cuBLAS's
//! rate, copy and read bandwidth) and the timer; the attention kernels'
//! benches are `attention.rs`.

use crate::cuda::{self, GptqGpu};
use crate::model::linear::RandomGptq;
use crate::quant::GptqMode;
use crate::{Error, Result};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::time::Instant;

/// Median seconds per call of `f` (3 warm-up calls, 5 repeats of `iters`).
pub fn time(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let mut v = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64() / iters as f64);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[2])
}

/// cuBLAS f16 matmul rate at 8192^3 (TFLOP/s).
pub fn matmul_tflops(dev: &Device) -> Result<f64> {
    let n = 8192;
    let cd = cuda::cuda(dev)?;
    let a = cuda::fill_f16(&cd, (n, n), 1, -1.0, 1.0)?;
    let b = cuda::fill_f16(&cd, (n, n), 2, -1.0, 1.0)?;
    let t = time(dev, 10, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    Ok(2.0 * (n as f64).powi(3) / t / 1e12)
}

/// Device-to-device copy bandwidth (bytes read + written per second, GB/s).
pub fn copy_gbs(dev: &Device) -> Result<f64> {
    let n = 1usize << 29; // 1 GiB of f16
    let a = cuda::fill_f16(&cuda::cuda(dev)?, n, 3, -1.0, 1.0)?;
    let t = time(dev, 10, || {
        a.copy()?;
        Ok(())
    })?;
    Ok(2.0 * (n * 2) as f64 / t / 1e9)
}

/// Read bandwidth, GB/s: a kernel that only reads 4 GiB (four 16-byte
/// loads in flight per thread); the ceiling for the read-bound kernels.
pub fn read_gbs(dev: &Device) -> Result<f64> {
    let n = 1usize << 31; // 4 GiB of f16
    let a = cuda::fill_f16(&cuda::cuda(dev)?, n, 4, -1.0, 1.0)?;
    let t = time(dev, 10, || cuda::read_all(&a))?;
    Ok((n * 2) as f64 / t / 1e9)
}

/// One GEMM measurement. Wall figures include the host's launch cost
/// (candle's allocations, our launches); device figures come from CUDA
/// graphs of the same calls ([`cuda::graph_time`]), the kernels alone.
#[derive(Debug, Clone, Serialize)]
pub struct GemmRow {
    /// Layer shape name.
    pub shape: &'static str,
    /// Tokens.
    pub m: usize,
    /// Inputs.
    pub k: usize,
    /// Outputs.
    pub n: usize,
    /// Fused kernel TFLOP/s (wall).
    pub fused: f64,
    /// Dequantize + cuBLAS TFLOP/s (wall).
    pub dequant: f64,
    /// cuBLAS f16 TFLOP/s on the same shape (wall).
    pub cublas: f64,
    /// Fused kernel's bytes moved (weights + activations) per second, GB/s (wall).
    pub fused_gbs: f64,
    /// Fused product as the engine runs it, device µs per call.
    pub fused_dev_us: Option<f64>,
    /// M <= 16: device µs of every (column tiles per warp, activation
    /// stage) launch choice of the fused kernel.
    pub variants: Vec<(usize, u8, Option<f64>)>,
    /// cuBLAS f16, device µs per call.
    pub cublas_dev_us: Option<f64>,
    /// cuBLAS device time over the fused product's.
    pub dev_speedup: Option<f64>,
    /// Fused product's weight + activation bytes per device second, GB/s.
    pub fused_dev_gbs: Option<f64>,
    /// M >= 16: the large-M product (permute + `gptq_tiled`, not yet used
    /// by the engine), device µs per call.
    pub tiled_dev_us: Option<f64>,
    /// M >= 32 on Hopper: the warpgroup product on packed weights (permute
    /// + `gptq_wg`, its default launch), device µs per call.
    pub wg_dev_us: Option<f64>,
    /// Its launch choices and their device µs.
    pub wg_variants: Vec<WgTime>,
}

/// Mistral-7B's linear shapes (K, N), and the two products the engine
/// fuses.
pub const SHAPES: [(&str, usize, usize); 6] = [
    ("q/o", 4096, 4096),
    ("k/v", 4096, 1024),
    ("gate/up", 4096, 14336),
    ("down", 14336, 4096),
    ("qkv fused", 4096, 6144),
    ("gate+up", 4096, 28672),
];

/// GPTQ products against cuBLAS f16 for `bits`/`group` at each M, over the
/// shapes named in `only` (all when empty).
pub fn gemm_table(
    dev: &Device,
    bits: u32,
    group: Option<usize>,
    ms: &[usize],
    only: &[String],
) -> Result<Vec<GemmRow>> {
    if let Some(bad) = only
        .iter()
        .find(|o| !SHAPES.iter().any(|s| s.0 == o.as_str()))
    {
        return Err(Error::Config(format!(
            "gemm shape `{bad}` is not one of {:?}",
            SHAPES.map(|s| s.0)
        )));
    }
    let cd = cuda::cuda(dev)?;
    let mut rows = Vec::new();
    let wanted = SHAPES
        .into_iter()
        .filter(|s| only.is_empty() || only.iter().any(|o| o == s.0));
    for (name, k, n) in wanted {
        let g = GptqGpu::dummy(
            &RandomGptq {
                bits,
                group_size: group,
                k,
                n,
                act_order: true,
                seed: 9,
            },
            dev,
        )?;
        let w16 = cuda::fill_f16(&cd, (k, n), 4, -0.05, 0.05)?;
        for &m in ms {
            let x = cuda::fill_f16(&cd, (m, k), 5 + m as u64, -1.0, 1.0)?;
            let iters = if m <= 64 { 50 } else { 10 };
            // The fused (small-M) kernel at every M: `auto` with no limit
            // (`fused_packed` is the warpgroup product on Hopper).
            let fused = GptqMode::Auto { max_m: usize::MAX };
            let tf = time(dev, iters, || {
                g.forward(&x, fused)?;
                Ok(())
            })?;
            let td = time(dev, iters, || {
                g.forward(&x, GptqMode::Dequant)?;
                Ok(())
            })?;
            let tc = time(dev, iters, || {
                x.matmul(&w16)?;
                Ok(())
            })?;
            let us = |t: Option<f64>| t.map(|t| t * 1e6);
            let fdev = us(cuda::graph_time(dev, iters, || {
                g.forward(&x, fused)?;
                Ok(())
            })?);
            let cdev = us(cuda::graph_time(dev, iters, || {
                x.matmul(&w16)?;
                Ok(())
            })?);
            let tdev = if m >= 16 {
                us(cuda::graph_time(dev, iters, || {
                    g.tiled(&x)?;
                    Ok(())
                })?)
            } else {
                None
            };
            let (wg_dev_us, wg_variants) = if m >= 32 && cuda::GptqGpu::wg_available(&cd) {
                wg_times(&cd, &g, &x, iters)?
            } else {
                (None, Vec::new())
            };
            let mut variants = Vec::new();
            if m <= 16 {
                for stage in [0u8, 1] {
                    if stage == 1 && m > cuda::STAGE_MAX_M {
                        continue;
                    }
                    for c in [1, 2, 4] {
                        let t = cuda::graph_time(dev, iters, || {
                            g.fused_tuned(&x, c, stage)?;
                            Ok(())
                        })?;
                        variants.push((c, stage, us(t)));
                    }
                }
            }
            let flop = 2.0 * (m * k * n) as f64;
            let bytes = (g.weight_bytes() + 2 * m * k + 2 * m * n) as f64;
            rows.push(GemmRow {
                shape: name,
                m,
                k,
                n,
                fused: flop / tf / 1e12,
                dequant: flop / td / 1e12,
                cublas: flop / tc / 1e12,
                fused_gbs: bytes / tf / 1e9,
                fused_dev_us: fdev,
                variants,
                cublas_dev_us: cdev,
                dev_speedup: fdev.zip(cdev).map(|(f, c)| c / f),
                fused_dev_gbs: fdev.map(|f| bytes / f / 1e3),
                tiled_dev_us: tdev,
                wg_dev_us,
                wg_variants,
            });
        }
    }
    Ok(rows)
}

/// A launch of the warpgroup product and its device µs per call.
pub type WgTime = (cuda::WgLaunch, Option<f64>);

/// Device µs of the warpgroup product's default launch, and of each built
/// shape with its default K split and with none.
fn wg_times(
    cd: &CudaDevice,
    g: &GptqGpu,
    x: &Tensor,
    iters: usize,
) -> Result<(Option<f64>, Vec<WgTime>)> {
    let dev = x.device();
    let m = x.dim(0)?;
    let us = |t: Option<f64>| t.map(|t| t * 1e6);
    let default = us(cuda::graph_time(dev, iters, || {
        g.wg(x)?;
        Ok(())
    })?);
    let mut variants = Vec::new();
    for (bm, nw) in g.wg_shapes() {
        let auto = g.wg_splits(cd, m, bm, nw);
        for splits in if auto > 1 { vec![auto, 1] } else { vec![1] } {
            let launch = cuda::WgLaunch { bm, nw, splits };
            let t = cuda::graph_time(dev, iters, || {
                g.wg_tuned(x, launch)?;
                Ok(())
            })?;
            variants.push((launch, us(t)));
        }
    }
    Ok((default, variants))
}

/// One LM head measurement: Mistral-7B's [32000, 4096] f16 head over M rows.
#[derive(Debug, Clone, Serialize)]
pub struct HeadRow {
    /// Rows (sequences sampled in a step).
    pub m: usize,
    /// Device µs of the product as `Linear` runs it (x · wᵀ through a
    /// transposed view).
    pub view_us: Option<f64>,
    /// Its TFLOP/s.
    pub view_tflops: Option<f64>,
    /// The same over a contiguous [4096, 32000] copy of the weight.
    pub contiguous_us: Option<f64>,
    /// The view's product then the f32 logits, as the model returns them.
    pub with_f32_us: Option<f64>,
}

/// The LM head at each of `ms` rows (run 91's W1 decode step spent 0.60 ms
/// in `logits` at 508 rows, ~3x the product's FLOP floor): cuBLAS through
/// the transposed view, over a contiguous copy, and with the f32
/// conversion.
pub fn head_table(dev: &Device, ms: &[usize]) -> Result<Vec<HeadRow>> {
    let cd = cuda::cuda(dev)?;
    let (vocab, h) = (32000usize, 4096usize);
    let w = cuda::fill_f16(&cd, (vocab, h), 11, -0.05, 0.05)?;
    let wt = w.t()?.contiguous()?;
    let mut rows = Vec::new();
    for &m in ms {
        let x = cuda::fill_f16(&cd, (m, h), 12 + m as u64, -1.0, 1.0)?;
        let us = |f: &dyn Fn() -> Result<()>| -> Result<Option<f64>> {
            Ok(cuda::graph_time(dev, 20, f)?.map(|t| t * 1e6))
        };
        let view_us = us(&|| {
            x.matmul(&w.t()?)?;
            Ok(())
        })?;
        let contiguous_us = us(&|| {
            x.matmul(&wt)?;
            Ok(())
        })?;
        let with_f32_us = us(&|| {
            x.matmul(&w.t()?)?.to_dtype(candle_core::DType::F32)?;
            Ok(())
        })?;
        let flop = 2.0 * (m * h * vocab) as f64;
        rows.push(HeadRow {
            m,
            view_us,
            view_tflops: view_us.map(|u| flop / u / 1e6),
            contiguous_us,
            with_f32_us,
        });
    }
    Ok(rows)
}

/// The element-wise kernels of a layer at one token count: device µs per
/// call (CUDA graphs) and GB/s of the bytes each must move.
#[derive(Debug, Clone, Serialize)]
pub struct OpsRow {
    pub m: usize,
    /// RMSNorm with the residual add, 128 threads of up to 8 vectors a row
    /// (the engine's until e111a44), then a thread per vector (now).
    pub norm_us: [Option<f64>; 2],
    pub norm_gbs: [Option<f64>; 2],
    /// SiLU-mul over one fused gate/up output (14,336 wide).
    pub silu_us: Option<f64>,
    pub silu_gbs: Option<f64>,
}

/// [`OpsRow`] for Mistral-7B's widths at each of `ms`.
pub fn ops_table(dev: &Device, ms: &[usize]) -> Result<Vec<OpsRow>> {
    let cd = cuda::cuda(dev)?;
    let (h, f) = (4096usize, 14336usize);
    let w = cuda::fill_f16(&cd, h, 20, 0.5, 1.5)?;
    let mut rows = Vec::new();
    for &m in ms {
        let x = cuda::fill_f16(&cd, (m, h), 21, -1.0, 1.0)?;
        let a = cuda::fill_f16(&cd, (m, h), 22, -1.0, 1.0)?;
        let gu = cuda::fill_f16(&cd, (m, 2 * f), 23, -4.0, 4.0)?;
        let us = |g: &dyn Fn() -> Result<()>| -> Result<Option<f64>> {
            Ok(cuda::graph_time(dev, 20, g)?.map(|t| t * 1e6))
        };
        let norm = |one: bool| {
            us(&|| {
                cuda::rmsnorm_add_with(&x, Some(&a), &w, 1e-5, one)?;
                Ok(())
            })
        };
        let norm_us = [norm(false)?, norm(true)?];
        let silu_us = us(&|| {
            cuda::silu_mul(&gu.narrow(1, 0, f)?, &gu.narrow(1, f, f)?)?;
            Ok(())
        })?;
        // x, add in; the sum and the normed row out (the weight is cached).
        let norm_bytes = (4 * m * h * 2) as f64;
        let silu_bytes = (3 * m * f * 2) as f64;
        let gbs = |b: f64, t: Option<f64>| t.map(|t| b / t / 1e3);
        rows.push(OpsRow {
            m,
            norm_us,
            norm_gbs: norm_us.map(|t| gbs(norm_bytes, t)),
            silu_us,
            silu_gbs: gbs(silu_bytes, silu_us),
        });
    }
    Ok(rows)
}

//! GPTQ products on the GPU: the fused tensor-core kernel (weights read
//! once per product, dequantized in registers) and the dequantize-then-cuBLAS
//! path, over weights in the tile layout of [`TiledGptq`].

mod wg;

pub use wg::WgLaunch;

use super::{device_of, empty, is_sm90a, launch, ptr, Arg, GPTQ};
use crate::quant::GptqMode;
use crate::quant::{RandomGptq, TiledGptq};
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Tensor};
use half::f16;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// Warps per block of the product kernel (GEMM_WARPS in kernels/gptq.cu).
const WARPS: usize = 8;
/// Tokens per launch of the product kernel (bounds the split-K workspace).
const CHUNK: usize = 128;
/// Token slabs per chunk (16 tokens each at MT = 2).
const CHUNK_SLABS: usize = CHUNK / 16;

/// Largest sorted range per block (bounds the staged activation).
const STAGE_K: usize = 4096;
/// Up to this many tokens the product kernel gathers the activation itself
/// (one launch); above, the permute kernel runs first.
pub const STAGE_MAX_M: usize = 8;

/// Launch choices that do not change results, overridable for kernel
/// tuning: GPTQ_KERNEL_C (column tiles per warp: 1, 2, 4), GPTQ_KERNEL_STAGE
/// (0, 1: see kernels/gptq.cu), GPTQ_KERNEL_BLOCKS (the block count the K
/// split aims for; this one does change the reduction order).
struct Tune {
    c: Option<usize>,
    stage: Option<u8>,
    blocks: usize,
}

fn tune() -> &'static Tune {
    static T: OnceLock<Tune> = OnceLock::new();
    T.get_or_init(|| {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
        };
        Tune {
            c: var("GPTQ_KERNEL_C").filter(|c| [1, 2, 4].contains(c)),
            stage: var("GPTQ_KERNEL_STAGE")
                .filter(|s| *s <= 1)
                .map(|s| s as u8),
            blocks: var("GPTQ_KERNEL_BLOCKS").unwrap_or(256).max(1),
        }
    })
}

/// One f32 workspace per CUDA stream (split-K partials and the permuted
/// activation), grown to the largest layer at load: kernels on one stream
/// run in order, so every layer can share it.
fn scratch(dev: &CudaDevice, elems: usize) -> Result<Tensor> {
    static SCRATCH: OnceLock<Mutex<HashMap<(usize, usize), Tensor>>> = OnceLock::new();
    let stream = dev.cuda_stream();
    let key = (stream.context().ordinal(), stream.cu_stream() as usize);
    let mut map = SCRATCH
        .get_or_init(Default::default)
        .lock()
        .expect("gptq scratch");
    if let Some(t) = map.get(&key) {
        if t.elem_count() >= elems {
            return Ok(t.clone());
        }
    }
    let t = super::zeros(dev, DType::F32, elems.max(1))?;
    map.insert(key, t.clone());
    Ok(t)
}

/// A product shape whose cuBLAS kernel choice is slow on Hopper, and the
/// token count that runs it fast: x [m, k] padded with zero rows to `rows`.
struct CublasPad {
    k: usize,
    n: usize,
    m: usize,
    rows: usize,
}

/// Measured on an H200 (CUDA 13.0's cuBLAS, run 74, device µs per product
/// from CUDA graphs): Mistral-7B's gate+up (K 4096, N 28672) takes 103 µs at
/// M = 128 against 61 µs at 112 and 144, so a decode step of 128 sequences
/// pays ~1.4 ms for it over 32 layers.
const CUBLAS_PADS: [CublasPad; 1] = [CublasPad {
    k: 4096,
    n: 28672,
    m: 128,
    rows: 144,
}];

/// A GPTQ layer resident on the GPU.
#[derive(Debug, Clone)]
pub struct GptqGpu {
    bits: u32,
    k: usize,
    n: usize,
    kp: usize,
    np: usize,
    gs: usize,
    groups: usize,
    perm: Tensor,
    qt: Tensor,
    sz: Tensor,
    /// W^T [K, N] f16 when dequantized once at load.
    resident: Option<Tensor>,
    /// Arrival counters of the split-K reduction, one per (column block,
    /// slab); zero between launches.
    counters: Tensor,
}

impl GptqGpu {
    /// Uploads a repacked weight.
    pub fn upload(t: &TiledGptq, dev: &Device) -> Result<Self> {
        let perm: Vec<u32> = t.perm.iter().map(|&p| p as u32).collect();
        Self {
            bits: t.bits,
            k: t.k,
            n: t.n,
            kp: t.kp,
            np: t.np,
            gs: t.gs,
            groups: t.groups,
            perm: Tensor::from_vec(perm, t.kp, dev)?,
            qt: Tensor::from_vec(t.words.clone(), t.words.len(), dev)?,
            sz: Tensor::from_vec(t.sz.clone(), t.sz.len(), dev)?,
            resident: None,
            counters: Tensor::zeros(1, DType::U32, dev)?,
        }
        .with_workspace()
    }

    /// Random weights with the exact shapes and layout of a (K, N) layer,
    /// generated on the GPU; `act_order` shuffles K over the groups.
    /// (Generated on the device: the same shapes as [`RandomGptq::build`],
    /// not the same values.)
    pub fn dummy(spec: &RandomGptq, dev: &Device) -> Result<Self> {
        let cd = super::cuda(dev)?;
        let (k, n) = (spec.k, spec.n);
        let kp = k.div_ceil(crate::quant::tiled::PAD) * crate::quant::tiled::PAD;
        let np = n.div_ceil(crate::quant::tiled::PAD) * crate::quant::tiled::PAD;
        let gs = spec.group_size.unwrap_or(kp);
        let groups = spec.group_size.map_or(1, |g| k.div_ceil(g));
        let words = np * kp * spec.bits as usize / 32;
        let mut order: Vec<u32> = (0..k as u32).collect();
        if spec.act_order {
            let mut s = spec.seed | 1;
            for i in (1..k).rev() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                order.swap(i, (s % (i as u64 + 1)) as usize);
            }
        }
        order.resize(kp, u32::MAX);
        Self {
            bits: spec.bits,
            k,
            n,
            kp,
            np,
            gs,
            groups,
            perm: Tensor::from_vec(order, kp, dev)?,
            qt: super::fill_u32(&cd, words, spec.seed)?,
            sz: super::fill_sz(
                &cd,
                groups * np,
                spec.seed ^ 0x5a5a,
                spec.bits,
                spec.scale_range(),
            )?,
            resident: None,
            counters: Tensor::zeros(1, DType::U32, dev)?,
        }
        .with_workspace()
    }

    /// Sizes the counters and the stream's shared workspace for this layer
    /// (at load, before the KV cache takes the free memory).
    fn with_workspace(mut self) -> Result<Self> {
        let dev = device_of(&self.qt)?;
        self.counters = super::zeros(&dev, DType::U32, self.np / 16 * CHUNK_SLABS)?;
        scratch(&dev, self.scratch_elems())?;
        Ok(self)
    }

    /// k per int4 load (one chunk of a warp's range).
    fn kpl(&self) -> usize {
        if self.bits == 4 {
            64
        } else {
            32
        }
    }

    /// Sorted positions per warp: the K split that gives the product about
    /// `Tune::blocks` blocks of one column tile. A function of the shape
    /// only: it fixes the reduction order.
    fn warp_k(&self) -> usize {
        let kpl = self.kpl();
        let tiles = self.np / 16;
        let max_splits = (self.kp / (WARPS * kpl)).max(1);
        // Blocks of at most 4096 positions: up to 8 tokens of that range
        // fit in shared memory (the staged launch).
        let want = tune()
            .blocks
            .div_ceil(tiles)
            .max(self.kp.div_ceil(STAGE_K))
            .clamp(1, max_splits);
        self.kp.div_ceil(WARPS * want).div_ceil(kpl) * kpl
    }

    /// Blocks along K of the product kernel.
    fn splits(&self) -> usize {
        self.kp.div_ceil(WARPS * self.warp_k())
    }

    /// 16-column tiles per warp: more tiles share each activation fragment
    /// (fewer re-reads) but give fewer blocks; the widest that keeps 96.
    fn cols_per_warp(&self) -> usize {
        tune().c.unwrap_or_else(|| {
            [4, 2]
                .into_iter()
                .find(|&c| self.np / (16 * c) * self.splits() >= 96)
                .unwrap_or(1)
        })
    }

    /// How the product kernel reads the activation at `m` tokens: gathered
    /// by the product kernel for a single token of a 4-bit layer (one
    /// launch); above, and at 8-bit, the permute kernel first is faster
    /// (measured: BENCHMARKS.md).
    fn stage(&self, m: usize) -> u8 {
        tune().stage.unwrap_or(u8::from(m <= 1 && self.bits == 4))
    }

    /// Shared memory of a staged launch of `rows` tokens.
    fn stage_smem(&self, rows: usize) -> usize {
        rows * (WARPS * self.warp_k() + 8) * 2
    }

    /// f32 elements of workspace: partials [splits, CHUNK, N], then the
    /// permuted activation [CHUNK, Kp] in f16.
    fn scratch_elems(&self) -> usize {
        self.splits() * CHUNK * self.n + CHUNK * self.kp / 2
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.k
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Bytes one product reads from the packed weight (tiles + group params).
    pub fn weight_bytes(&self) -> usize {
        self.qt.elem_count() * 4 + self.sz.elem_count() * 2
    }

    fn dims(&self) -> [i32; 6] {
        [
            self.k as i32,
            self.n as i32,
            self.np as i32,
            self.kp as i32,
            self.gs as i32,
            self.groups as i32,
        ]
    }

    /// Whether this layer's device runs the warpgroup product on the packed
    /// weights (Hopper), so that `auto` needs no f16 copy above the fused
    /// kernel's M.
    pub fn wg_runs_here(&self) -> bool {
        device_of(&self.qt).is_ok_and(|d| is_sm90a(&d))
    }

    /// Dequantizes once and keeps W^T in f16 beside the packed weight (3.7x
    /// the memory of 4-bit), for the cuBLAS products at large M.
    pub fn make_resident(&mut self) -> Result<()> {
        self.resident = Some(self.dequantize()?);
        Ok(())
    }

    /// W^T [K, N] in f16, exactly GPTQ's f16 dequantization.
    pub fn dequantize(&self) -> Result<Tensor> {
        let dev = device_of(&self.qt)?;
        let wt = empty::<f16>(&dev, (self.k, self.n))?;
        let p = [
            ptr::<u32>(&self.perm)?,
            ptr::<u32>(&self.qt)?,
            ptr::<f16>(&self.sz)?,
            ptr::<f16>(&wt)?,
        ];
        let d = self.dims();
        let threads = self.qt.elem_count() / 4; // one per int4
        let cfg = LaunchConfig {
            grid_dim: ((threads as u32).div_ceil(256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let name = format!("gptq_dequant_b{}", self.bits);
        let mut args: Vec<Arg> = p.iter().map(|&x| Arg::P(x)).collect();
        args.extend(d.iter().map(|&x| Arg::I(x)));
        launch(&dev, &GPTQ, &name, cfg, &args)?;
        Ok(wt)
    }

    /// y [M, N] = x [M, K] W^T, x in f16.
    pub fn forward(&self, x: &Tensor, path: GptqMode) -> Result<Tensor> {
        if x.dtype() != DType::F16 {
            return Err(Error::Model(format!(
                "GPTQ on CUDA takes f16 activations, got {:?} (set model.dtype = \"float16\")",
                x.dtype()
            )));
        }
        let m = x.dim(0)?;
        if path == GptqMode::Fused {
            let Some(wt) = &self.resident else {
                return Err(Error::Model(
                    "the batch-invariant `fused` product needs the f16 weights kept at load \
                     (make_resident)"
                        .into(),
                ));
            };
            return super::invariant_product(x, wt, super::WeightLayout::Kn);
        }
        if path == GptqMode::FusedPacked && self.wg_runs_here() {
            return self.wg_invariant(x);
        }
        let fused = match path {
            GptqMode::Fused | GptqMode::FusedPacked => true,
            GptqMode::Dequant | GptqMode::Resident => false,
            GptqMode::Auto { max_m } | GptqMode::Packed { max_m } => m <= max_m,
        };
        if fused {
            return self.fused(x);
        }
        match (&self.resident, path) {
            (Some(wt), GptqMode::Auto { .. } | GptqMode::Resident) => self.cublas(x, wt),
            (_, GptqMode::Packed { .. }) if self.wg_runs_here() => self.wg(x),
            _ => Ok(x.matmul(&self.dequantize()?)?),
        }
    }

    /// The rows a cuBLAS product of `m` tokens is padded to ([`CUBLAS_PADS`],
    /// Hopper only); `None`: run as it is.
    pub fn cublas_pad(&self, m: usize) -> Option<usize> {
        CUBLAS_PADS
            .iter()
            .find(|p| (p.k, p.n, p.m) == (self.k, self.n, m) && self.wg_runs_here())
            .map(|p| p.rows)
    }

    /// x W^T through cuBLAS on the resident f16 weights, with the token
    /// count padded where [`CUBLAS_PADS`] says cuBLAS's own choice is slow,
    /// else through the fastest algorithm with cuBLAS's values
    /// (`lt_tune`, `engine.cublas_tuning`).
    fn cublas(&self, x: &Tensor, wt: &Tensor) -> Result<Tensor> {
        let m = x.dim(0)?;
        let Some(rows) = self.cublas_pad(m) else {
            if let Some(y) = super::lt_tune::tuned_product(x, wt)? {
                return Ok(y);
            }
            return Ok(x.matmul(wt)?);
        };
        let zeros = Tensor::zeros((rows - m, self.k), DType::F16, x.device())?;
        let xp = Tensor::cat(&[x, &zeros], 0)?;
        Ok(xp.matmul(wt)?.narrow(0, 0, m)?)
    }

    /// xp [mp, Kp] = the `m` rows of x (at device address `x.0`) in sorted
    /// K order, zero past them and in the padding (gptq_permute_x).
    fn permute(&self, dev: &CudaDevice, x: (u64, usize), xp: (u64, usize)) -> Result<()> {
        let blocks = u32::try_from((xp.1 * self.kp).div_ceil(256)).map_err(|_| {
            Error::Model(format!(
                "gptq permute: {} tokens x {} positions is more than one launch takes",
                xp.1, self.kp
            ))
        })?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let dims = [x.1 as i32, self.k as i32, xp.1 as i32, self.kp as i32];
        let mut args = vec![Arg::P(x.0), Arg::P(ptr::<u32>(&self.perm)?), Arg::P(xp.0)];
        args.extend(dims.iter().map(|&v| Arg::I(v)));
        launch(dev, &GPTQ, "gptq_permute_x", cfg, &args)
    }

    /// The large-M products' common start: the f16 check, out [M, N]
    /// allocated, and xp [M, Kp] = x in sorted K order (`None` at M = 0).
    fn large_m_input(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        check_f16(x)?;
        let m = x.dim(0)?;
        let dev = device_of(x)?;
        let x = x.contiguous()?;
        let out = empty::<f16>(&dev, (m, self.n))?;
        if m == 0 {
            return Ok((out, None));
        }
        let xp = empty::<f16>(&dev, (m, self.kp))?;
        self.permute(&dev, (ptr::<f16>(&x)?, m), (ptr::<f16>(&xp)?, m))?;
        Ok((out, Some(xp)))
    }

    /// The large-M product (`gptq_tiled_b*` in kernels/gptq.cu: blocks of
    /// 128 columns x 128 tokens over the whole K in order, tensor cores with
    /// the dequantization in the main loop): y [M, N] = x [M, K] W^T. Not
    /// used by the engine yet: the kernel bench and its GPU test only.
    pub fn tiled(&self, x: &Tensor) -> Result<Tensor> {
        let (out, xp) = self.large_m_input(x)?;
        let Some(xp) = xp else { return Ok(out) };
        let (m, dev) = (x.dim(0)?, device_of(x)?);
        let cfg = LaunchConfig {
            grid_dim: (self.np.div_ceil(128) as u32, m.div_ceil(128) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = vec![
            Arg::P(ptr::<f16>(&xp)?),
            Arg::P(ptr::<u32>(&self.qt)?),
            Arg::P(ptr::<f16>(&self.sz)?),
            Arg::P(ptr::<f16>(&out)?),
        ];
        let ints = [m, self.n, self.np, self.kp, self.gs, self.groups];
        args.extend(ints.iter().map(|&v| Arg::I(v as i32)));
        launch(
            &dev,
            &GPTQ,
            &format!("gptq_tiled_b{}", self.bits),
            cfg,
            &args,
        )?;
        Ok(out)
    }

    fn fused(&self, x: &Tensor) -> Result<Tensor> {
        let m = x.dim(0)?;
        self.fused_tuned(x, self.cols_per_warp(), self.stage(m))
    }

    /// The fused product with `c` column tiles per warp (1, 2, 4) and the
    /// activation read as `stage` says (0: from the permute kernel's copy,
    /// 1: gathered into shared memory by the product kernel itself, up to
    /// [`STAGE_MAX_M`] tokens): every choice gives the same bits (public for
    /// the kernel bench and its tests).
    pub fn fused_tuned(&self, x: &Tensor, c: usize, stage: u8) -> Result<Tensor> {
        let m = x.dim(0)?;
        let staged_k = WARPS * self.warp_k();
        if ![1, 2, 4].contains(&c)
            || stage > 1
            || (stage == 1 && (m > STAGE_MAX_M || staged_k > STAGE_K))
        {
            return Err(Error::Model(format!(
                "gptq kernel: {c} column tiles per warp (1, 2, 4) with stage {stage} (0; 1 up to {STAGE_MAX_M} tokens and {STAGE_K} positions per block) at {m} tokens and {staged_k} positions is not built"
            )));
        }
        let dev = device_of(x)?;
        let x = x.contiguous()?;
        let out = empty::<f16>(&dev, (m, self.n))?;
        if m == 0 {
            return Ok(out);
        }
        let ws = scratch(&dev, self.scratch_elems())?;
        let pws = ptr::<f32>(&ws)?;
        let pxp = pws + (self.splits() * CHUNK * self.n * 4) as u64;
        let (px, pout) = (ptr::<f16>(&x)?, ptr::<f16>(&out)?);
        let (pperm, pqt, psz, pcnt) = (
            ptr::<u32>(&self.perm)?,
            ptr::<u32>(&self.qt)?,
            ptr::<f16>(&self.sz)?,
            ptr::<u32>(&self.counters)?,
        );
        for m0 in (0..m).step_by(CHUNK) {
            let mc = CHUNK.min(m - m0);
            let mt = if mc <= 8 { 1 } else { 2 };
            let slabs = mc.div_ceil(8 * mt);
            let mp = slabs * 8 * mt;
            let xc = px + (m0 * self.k * 2) as u64;
            let (xin, smem) = if stage == 1 {
                (xc, self.stage_smem(mc))
            } else {
                self.permute(&dev, (xc, mc), (pxp, mp))?;
                (pxp, 0)
            };
            let cfg = LaunchConfig {
                grid_dim: (
                    (self.np / (16 * c)) as u32,
                    self.splits() as u32,
                    slabs as u32,
                ),
                block_dim: ((WARPS * 32) as u32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let mut args = vec![
                Arg::P(xin),
                Arg::P(pperm),
                Arg::P(pqt),
                Arg::P(psz),
                Arg::P(pws),
                Arg::P(pcnt),
                Arg::P(pout + (m0 * self.n * 2) as u64),
            ];
            let ints = [
                mc,
                self.k,
                self.n,
                self.np,
                self.kp,
                self.gs,
                self.groups,
                self.warp_k(),
                self.splits(),
            ];
            args.extend(ints.iter().map(|&v| Arg::I(v as i32)));
            let name = format!("gptq_gemm_b{}_m{mt}_c{c}_s{stage}", self.bits);
            launch(&dev, &GPTQ, &name, cfg, &args)?;
        }
        Ok(out)
    }
}

/// The large-M products' activation check (shared with the warpgroup
/// product's input).
fn check_f16(x: &Tensor) -> Result<()> {
    if x.dtype() != DType::F16 {
        return Err(Error::Model(format!(
            "GPTQ on CUDA takes f16 activations, got {:?}",
            x.dtype()
        )));
    }
    Ok(())
}

//! GPTQ products on the GPU: the fused tensor-core kernel (weights read
//! once per product, dequantized in registers) and the dequantize-then-cuBLAS
//! path, over weights in the tile layout of [`TiledGptq`].

use super::{device_of, empty, launch, ptr, Arg, GPTQ};
use crate::model::linear::{RandomGptq, TiledGptq};
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{DType, Device, Tensor};
use half::f16;

/// Sorted positions of K per block (KSPLIT_K in kernels/gptq.cu).
const KSPLIT: usize = 512;

/// Which kernel path computes a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GptqPath {
    /// The fused kernel at every M (reduction order independent of M).
    Fused,
    /// Dequantize to f16 into a scratch buffer, then cuBLAS.
    Dequant,
    /// cuBLAS on the f16 weights dequantized at load.
    Resident,
    /// Fused up to `max_m` tokens; above, cuBLAS on the f16 weights
    /// dequantized at load (or per product when none are resident).
    Auto {
        /// Largest M for the fused kernel.
        max_m: usize,
    },
}

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
}

impl GptqGpu {
    /// Uploads a repacked weight.
    pub fn upload(t: &TiledGptq, dev: &Device) -> Result<Self> {
        let perm: Vec<u32> = t.perm.iter().map(|&p| p as u32).collect();
        Ok(Self {
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
        })
    }

    /// Random weights with the exact shapes and layout of a (K, N) layer,
    /// generated on the GPU; `act_order` shuffles K over the groups.
    /// (Generated on the device: the same shapes as [`RandomGptq::build`],
    /// not the same values.)
    pub fn dummy(spec: &RandomGptq, dev: &Device) -> Result<Self> {
        let cd = super::cuda(dev)?;
        let (k, n) = (spec.k, spec.n);
        let kp = k.div_ceil(crate::model::linear::tiled::PAD) * crate::model::linear::tiled::PAD;
        let np = n.div_ceil(crate::model::linear::tiled::PAD) * crate::model::linear::tiled::PAD;
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
        Ok(Self {
            bits: spec.bits,
            k,
            n,
            kp,
            np,
            gs,
            groups,
            perm: Tensor::from_vec(order, kp, dev)?,
            qt: super::fill_u32(&cd, words, spec.seed)?,
            sz: super::fill_sz(&cd, groups * np, spec.seed ^ 0x5a5a, spec.bits)?,
            resident: None,
        })
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
    pub fn forward(&self, x: &Tensor, path: GptqPath) -> Result<Tensor> {
        if x.dtype() != DType::F16 {
            return Err(Error::Model(format!(
                "GPTQ on CUDA takes f16 activations, got {:?} (set model.dtype = \"float16\")",
                x.dtype()
            )));
        }
        let m = x.dim(0)?;
        let fused = match path {
            GptqPath::Fused => true,
            GptqPath::Dequant | GptqPath::Resident => false,
            GptqPath::Auto { max_m } => m <= max_m,
        };
        if fused {
            return self.fused(x);
        }
        match (&self.resident, path) {
            (Some(wt), GptqPath::Auto { .. } | GptqPath::Resident) => Ok(x.matmul(wt)?),
            _ => Ok(x.matmul(&self.dequantize()?)?),
        }
    }

    fn fused(&self, x: &Tensor) -> Result<Tensor> {
        let dev = device_of(x)?;
        let x = x.contiguous()?;
        let m = x.dim(0)?;
        let mt = match m {
            0..=8 => 1,
            9..=16 => 2,
            _ => 4,
        };
        let splits = self.kp.div_ceil(KSPLIT);
        let slabs = m.div_ceil(mt * 8);
        let mp = slabs * mt * 8;
        let xp = empty::<f16>(&dev, (mp, self.kp))?;
        let (px, pperm, pxp) = (ptr::<f16>(&x)?, ptr::<u32>(&self.perm)?, ptr::<f16>(&xp)?);
        let total = mp * self.kp;
        let cfg = LaunchConfig {
            grid_dim: ((total as u32).div_ceil(256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let dims = [m as i32, self.k as i32, mp as i32, self.kp as i32];
        let mut args = vec![Arg::P(px), Arg::P(pperm), Arg::P(pxp)];
        args.extend(dims.iter().map(|&v| Arg::I(v)));
        launch(&dev, &GPTQ, "gptq_permute_x", cfg, &args)?;
        let part = empty::<f32>(&dev, (splits, m, self.n))?;
        let out = empty::<f16>(&dev, (m, self.n))?;
        let p = [
            pxp,
            ptr::<u32>(&self.qt)?,
            ptr::<f16>(&self.sz)?,
            ptr::<f32>(&part)?,
        ];
        let ints = [
            m as i32,
            self.n as i32,
            self.np as i32,
            self.kp as i32,
            self.gs as i32,
            self.groups as i32,
        ];
        let cfg = LaunchConfig {
            grid_dim: ((self.np / 64) as u32, splits as u32, slabs as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let name = format!("gptq_mma_b{}_m{mt}", self.bits);
        let mut args: Vec<Arg> = p.iter().map(|&x| Arg::P(x)).collect();
        args.extend(ints.iter().map(|&x| Arg::I(x)));
        launch(&dev, &GPTQ, &name, cfg, &args)?;
        let mn = m * self.n;
        let (pp, po, mni, si) = (
            ptr::<f32>(&part)?,
            ptr::<f16>(&out)?,
            mn as i32,
            splits as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: ((mn as u32).div_ceil(256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch(
            &dev,
            &GPTQ,
            "gptq_reduce",
            cfg,
            &[Arg::P(pp), Arg::P(po), Arg::I(mni), Arg::I(si)],
        )?;
        Ok(out)
    }
}

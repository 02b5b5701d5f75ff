//! The large-M GPTQ product on Hopper (`gptq_wg_*` in kernels/gptq_wg.cu):
//! warpgroup tensor-core products over the packed weights, dequantized in
//! the main loop. Blocks of 128 x `nw` output columns and `bm` tokens,
//! optionally split along K with the partials summed in split order.

use super::super::{arch, device_of, empty, is_sm90a, launch, ptr, Arg, GPTQ_WG};
use super::{check_f16, GptqGpu};
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::CudaDevice;
use candle_core::Tensor;
use half::f16;
use std::sync::OnceLock;

/// A launch of the warpgroup product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WgLaunch {
    /// Tokens per block (the wgmma N: 64, 128, 256).
    pub bm: usize,
    /// m64 products per warpgroup (128 `nw` output columns per block).
    pub nw: usize,
    /// Blocks along K.
    pub splits: usize,
}

/// The builds of kernels/gptq_wg.cu: (bits, bm, nw) and their stages (the
/// GPTQ_WG lines there).
const BUILDS: [(u32, usize, usize, usize); 10] = [
    (4, 64, 1, 8),
    (4, 128, 1, 8),
    (4, 256, 1, 5),
    (4, 64, 2, 8),
    (4, 128, 2, 7),
    (8, 64, 1, 8),
    (8, 128, 1, 8),
    (8, 256, 1, 5),
    (8, 64, 2, 8),
    (8, 128, 2, 6),
];
/// Sorted positions per chunk (WG_BK).
const BK: usize = 64;
/// Threads of a block (WG_THREADS): two consumer warpgroups and the
/// producer warpgroup.
const THREADS: u32 = 384;

/// Shared memory of a launch: the stages (token tile, weight words, group
/// parameters) as WgShape in kernels/gptq_wg.cu sizes them, plus the
/// alignment slack; `None` for a shape not built.
fn smem_bytes(l: WgLaunch, bits: u32) -> Option<usize> {
    let (bm, nw) = (l.bm, l.nw);
    let &(.., stages) = BUILDS.iter().find(|b| (b.0, b.1, b.2) == (bits, bm, nw))?;
    let bn = 128 * nw;
    let words = if bits == 4 { 1 } else { 2 };
    let stage = bm * BK * 2 + (bn / 16) * words * 32 * 16 + 4 * bn * 4;
    // Plus the alignment slack and a full and an empty barrier per stage.
    Some(stages * stage + 1024 + 16 * stages)
}

/// Microseconds of one 64-position chunk in a block of (`bm` tokens, 128
/// `nw` columns), from its main loop at 4,096 tokens on an H200 (run 65,
/// gate/up: wall time over waves and chunks): the wider the token block,
/// the better the tensor cores are fed from the A fragments in registers.
fn chunk_us(bm: usize, nw: usize) -> f64 {
    match (bm, nw) {
        (256, 1) => 1.0,
        (128, 2) => 1.3,
        (128, 1) => 0.87,
        (64, 2) => 1.2,
        _ => 0.82,
    }
}

/// Launch choices overridable for tuning, read once.
#[derive(Clone, Copy)]
struct Tune {
    /// GPTQ_WG_BM: tokens per block (64, 128, 256).
    bm: Option<usize>,
    /// GPTQ_WG_SPLITS: blocks along K.
    splits: Option<usize>,
}

fn tune() -> Tune {
    static T: OnceLock<Tune> = OnceLock::new();
    *T.get_or_init(|| {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
        Tune {
            bm: var("GPTQ_WG_BM").filter(|b| [64, 128, 256].contains(b)),
            splits: var("GPTQ_WG_SPLITS").filter(|&s| s > 0),
        }
    })
}

impl GptqGpu {
    /// Whether `dev` runs the warpgroup product (compute capability 9.0).
    pub fn wg_available(dev: &CudaDevice) -> bool {
        is_sm90a(dev)
    }

    /// The block shapes (bm, nw) built for this layer's bit width.
    pub fn wg_shapes(&self) -> Vec<(usize, usize)> {
        BUILDS
            .iter()
            .filter(|b| b.0 == self.bits)
            .map(|b| (b.1, b.2))
            .collect()
    }

    /// The launch at `m` tokens with the least estimated time (see
    /// [`chunk_us`]): per block shape, K splits only while the blocks fill
    /// less than a third of the multiprocessors (enough splits for all of
    /// them, at least 8 chunks each) and only where `split` allows; then
    /// waves x chunks per block x the shape's time per chunk, plus the
    /// partials' traffic of a split. Two products per warpgroup only up to
    /// 128 tokens; no token block wider than `m` rounded up to a power of
    /// two (at least 128). Matches the best measured launch within 3% at 64,
    /// 256, 1,024 and 4,096 tokens on every Mistral shape (run 65).
    fn wg_choose(&self, dev: &CudaDevice, m: usize, split: bool) -> WgLaunch {
        let sms = arch(dev).sms;
        let chunks = self.kp / BK;
        let t = tune();
        let widest = m.next_power_of_two().max(128);
        let launch = |(bm, nw): (usize, usize)| {
            let tiles = self.np.div_ceil(128 * nw) * m.div_ceil(bm);
            let splits = self.splits_of(sms, m, (bm, nw), split);
            let kc = chunks.div_ceil(splits);
            let waves = (tiles * splits).div_ceil(sms) as f64;
            let part = if splits > 1 {
                (m * self.n * splits * 8) as f64 / 3e6
            } else {
                0.0
            };
            let us = waves * kc as f64 * chunk_us(bm, nw) + part;
            (us, WgLaunch { bm, nw, splits })
        };
        self.wg_shapes()
            .into_iter()
            .filter(|&(bm, nw)| match t.bm {
                Some(b) => (bm, nw) == (b, 1),
                None => bm <= widest && (nw == 1 || m <= 128),
            })
            .map(launch)
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map_or(
                WgLaunch {
                    bm: 64,
                    nw: 1,
                    splits: 1,
                },
                |(_, l)| l,
            )
    }

    /// Blocks along K for `m` tokens in blocks of `shape` (bm, nw): while
    /// the blocks fill less than a third of the `sms` multiprocessors and
    /// `split` allows, enough for all of them, at least 8 chunks (512
    /// positions) each; else none. GPTQ_WG_SPLITS overrides.
    fn splits_of(&self, sms: usize, m: usize, (bm, nw): (usize, usize), split: bool) -> usize {
        let chunks = self.kp / BK;
        let tiles = self.np.div_ceil(128 * nw) * m.div_ceil(bm);
        let want = match tune().splits {
            _ if !split => 1,
            Some(s) => s,
            None if 3 * tiles < sms => sms.div_ceil(tiles.max(1)).min(chunks / 8),
            None => 1,
        };
        let kc = chunks.div_ceil(want.clamp(1, chunks.max(1))).max(1);
        chunks.div_ceil(kc).max(1)
    }

    /// [`Self::splits_of`] the default launch would use with blocks of
    /// (`bm`, `nw`) (for the kernel bench).
    pub fn wg_splits(&self, dev: &CudaDevice, m: usize, bm: usize, nw: usize) -> usize {
        self.splits_of(arch(dev).sms, m, (bm, nw), true)
    }

    /// The default launch at `m` tokens.
    pub fn wg_launch(&self, dev: &CudaDevice, m: usize) -> WgLaunch {
        self.wg_choose(dev, m, true)
    }

    /// y [M, N] = x [M, K] W^T by the warpgroup product with its default
    /// launch.
    pub fn wg(&self, x: &Tensor) -> Result<Tensor> {
        let dev = device_of(x)?;
        self.wg_tuned(x, self.wg_launch(&dev, x.dim(0)?))
    }

    /// The batch-invariant product on the packed weights (`fused_packed`
    /// on Hopper): one block along K, so each output sums its 64-position
    /// chunks of sorted K in order, 16 positions per wgmma, in f32,
    /// whatever M, the token width or the output columns per block (bit-identical across them: GPU test
    /// `gptq::fused_gptq_rows_do_not_depend_on_the_batch`).
    pub fn wg_invariant(&self, x: &Tensor) -> Result<Tensor> {
        let one_block = self.wg_choose(&device_of(x)?, x.dim(0)?, false);
        self.wg_tuned(
            x,
            WgLaunch {
                splits: 1,
                ..one_block
            },
        )
    }

    /// xs = x [M, K] in sorted K order, in the layout the product's stages
    /// read (gptq_wg_permute_x: per chunk of 64 positions, `mp` swizzled
    /// rows of 128 bytes, `mp` = M rounded up to the token block `bm`).
    fn wg_input(&self, dev: &CudaDevice, x: &Tensor, bm: usize) -> Result<(Tensor, usize)> {
        check_f16(x)?;
        let (m, x) = (x.dim(0)?, x.contiguous()?);
        let mp = m.next_multiple_of(bm);
        let xs = empty::<f16>(dev, (mp * self.kp,))?;
        // One block per row, the row in shared memory.
        let cfg = LaunchConfig {
            grid_dim: (mp as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (2 * self.k).next_multiple_of(16) as u32,
        };
        let mut args = vec![
            Arg::P(ptr::<f16>(&x)?),
            Arg::P(ptr::<u32>(&self.perm)?),
            Arg::P(ptr::<f16>(&xs)?),
        ];
        args.extend([m, self.k, mp, self.kp].iter().map(|&v| Arg::I(v as i32)));
        launch(dev, &GPTQ_WG, "gptq_wg_permute_x", cfg, &args)?;
        Ok((xs, mp))
    }

    /// The warpgroup product with a given launch (public for the kernel
    /// bench and its tests).
    pub fn wg_tuned(&self, x: &Tensor, launch_: WgLaunch) -> Result<Tensor> {
        let WgLaunch { bm, nw, splits } = launch_;
        let dev = device_of(x)?;
        let chunks = self.kp / BK;
        if !Self::wg_available(&dev) {
            return Err(Error::Model(format!(
                "gptq warpgroup product: the device's compute capability is {:?}, the product runs on 9.0 only",
                arch(&dev).cc
            )));
        }
        if !(1..=chunks).contains(&splits) {
            return Err(Error::Model(format!(
                "gptq warpgroup product: {splits} blocks along K, expected 1..={chunks} (the layer's chunks of {BK} positions)"
            )));
        }
        let Some(smem) = smem_bytes(launch_, self.bits) else {
            return Err(Error::Model(format!(
                "gptq warpgroup product: {}-bit blocks of {bm} tokens x {nw} products per warpgroup are not built (built: (tokens, products) {:?})",
                self.bits,
                self.wg_shapes()
            )));
        };
        let m = x.dim(0)?;
        let out = empty::<f16>(&dev, (m, self.n))?;
        if m == 0 {
            return Ok(out);
        }
        let (xs, mp) = self.wg_input(&dev, x, bm)?;
        let kc = chunks.div_ceil(splits);
        let splits = chunks.div_ceil(kc);
        let part = if splits > 1 {
            Some(empty::<f32>(&dev, (splits, m, self.n))?)
        } else {
            None
        };
        let cfg = LaunchConfig {
            grid_dim: (
                self.np.div_ceil(128 * nw) as u32,
                m.div_ceil(bm) as u32,
                splits as u32,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut args = vec![
            Arg::P(ptr::<f16>(&xs)?),
            Arg::P(ptr::<u32>(&self.qt)?),
            Arg::P(ptr::<f16>(&self.sz)?),
            Arg::P(ptr::<f16>(&out)?),
            Arg::P(part.as_ref().map(ptr::<f32>).transpose()?.unwrap_or(0)),
        ];
        let ints = [m, mp, self.n, self.np, self.kp, self.gs, self.groups, kc];
        args.extend(ints.iter().map(|&v| Arg::I(v as i32)));
        let name = format!("gptq_wg_b{}_n{bm}_w{nw}", self.bits);
        launch(&dev, &GPTQ_WG, &name, cfg, &args)?;
        if let Some(part) = part {
            let mn = m * self.n;
            let cfg = LaunchConfig {
                grid_dim: (mn.div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let args = [
                Arg::P(ptr::<f32>(&part)?),
                Arg::P(ptr::<f16>(&out)?),
                Arg::U(mn as u64),
                Arg::I(splits as i32),
            ];
            launch(&dev, &GPTQ_WG, "gptq_wg_reduce", cfg, &args)?;
        }
        Ok(out)
    }
}

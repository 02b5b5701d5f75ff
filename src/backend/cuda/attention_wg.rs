//! Launch wrappers of `kernels/attention_wg.cu`: the pieces of the wgmma
//! flash prefill (kernels/WGMMA-PREFILL-PLAN.md), Hopper only.

use super::{arch, check_f16, device_of, empty, is_sm90a, launch, ptr, Arg, ATTENTION_WG};
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::Tensor;
use half::f16;

/// The plan's two warpgroup products over its shared-memory layout, for
/// the GPU test: S [64, 128] = q k^T and O [64, 128] = p v, f32, for q
/// [64, 128], k [128, 128], p [64, 128] and v [128, 128] in f16 (S's
/// columns are k's rows, O's are v's columns). An error before Hopper
/// (compute capability 9.0), where the kernel does not exist.
pub fn wg_prefill_selftest(
    q: &Tensor,
    k: &Tensor,
    p: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let dev = device_of(q)?;
    if !is_sm90a(&dev) {
        return Err(Error::Model(
            "wg_prefill_selftest: the wgmma kernels run on compute capability 9.0 only".into(),
        ));
    }
    for (t, want, what) in [
        (q, [64, 128], "q"),
        (k, [128, 128], "k"),
        (p, [64, 128], "p"),
        (v, [128, 128], "v"),
    ] {
        check_f16(t, "wg_prefill_selftest")?;
        if t.dims() != want {
            return Err(Error::Model(format!(
                "wg_prefill_selftest: {what} is {:?}, expected {want:?}",
                t.dims()
            )));
        }
    }
    let (q, k, p, v) = (
        q.contiguous()?,
        k.contiguous()?,
        p.contiguous()?,
        v.contiguous()?,
    );
    let s = empty::<f32>(&dev, (64, 128))?;
    let o = empty::<f32>(&dev, (64, 128))?;
    let args = [
        Arg::P(ptr::<f16>(&q)?),
        Arg::P(ptr::<f16>(&k)?),
        Arg::P(ptr::<f16>(&p)?),
        Arg::P(ptr::<f16>(&v)?),
        Arg::P(ptr::<f32>(&s)?),
        Arg::P(ptr::<f32>(&o)?),
    ];
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (128, 1, 1),
        // Q (16 KiB), K and V (32 KiB each), and room to align them to
        // 1,024 bytes.
        shared_mem_bytes: 80 * 1024 + 1024,
    };
    launch(&dev, &ATTENTION_WG, "wg_prefill_selftest", cfg, &args)?;
    Ok((s, o))
}

/// Which wgmma flash prefill: the same arithmetic, so the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgPrefill {
    /// `flash_prefill_wg_d128`: both warpgroups load, two block barriers a
    /// tile (the plan's step 3).
    Plain,
    /// `flash_prefill_ws_d128`: one block per multiprocessor over the work
    /// items, a producer warpgroup, mbarriers, S_n beside PV_{n-1},
    /// pingpong between the two computing warpgroups (steps 4-6); two Q
    /// buffers and two stages of K and V (the engine's).
    Pipelined,
    /// `flash_prefill_ws_x_d128`: [`Self::Pipelined`] with an item's last
    /// PV beside the next item's first S, the same bits. Not the engine's:
    /// run 88 (H200) had it 1-3% slower at 512-4,096 tokens and 10% slower
    /// at 128 x 64 after 1,024 cached; run 89's W3 no faster.
    Crossed,
}

/// The wgmma flash prefill: what [`super::flash_prefill`] computes for
/// head dim 128 over an f16 cache, with 128-key tiles (the twin's results
/// up to f16 rounding); the engine's on Hopper through
/// `engine.prefill_attention`. An error before Hopper, for other head dims
/// and for an FP8 cache.
pub fn flash_prefill_wg(
    q: &Tensor,
    cache: super::CacheLayer<'_>,
    keys: &Tensor,
    tiles: (&Tensor, usize),
    out: &Tensor,
    s: &super::PrefillShape,
    which: WgPrefill,
) -> Result<()> {
    let dev = device_of(q)?;
    if !is_sm90a(&dev) || s.head_dim != 128 || cache.scales.is_some() {
        return Err(Error::Model(format!(
            "flash_prefill_wg: compute capability 9.0, head_dim 128 and an f16 cache (got head_dim {})",
            s.head_dim
        )));
    }
    let Some((_q, mut args)) =
        super::kernels_attention::prefill_args(q, &cache, keys, tiles, out, s, "flash_prefill_wg")?
    else {
        return Ok(());
    };
    // Q (128 rows) and two stages of K and V (128 rows each), 256 bytes a
    // row, and room to align them to 1,024 bytes.
    let tile_bytes = |n: usize| n * 128 * 256 + 1024;
    let (name, cfg) = match which {
        WgPrefill::Plain => (
            "flash_prefill_wg_d128",
            LaunchConfig {
                grid_dim: (tiles.1 as u32, s.kv_heads as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: tile_bytes(1 + 2 * 2) as u32,
            },
        ),
        // Persistent: a block per multiprocessor at most, over the (tile,
        // KV head) items; two Q buffers, two K/V stages, and their 12
        // mbarriers (full and empty each).
        WgPrefill::Pipelined | WgPrefill::Crossed => {
            args.push(Arg::I(tiles.1 as i32));
            let items = tiles.1 * s.kv_heads;
            let cfg = LaunchConfig {
                grid_dim: (items.min(arch(&dev).sms) as u32, 1, 1),
                block_dim: (384, 1, 1),
                shared_mem_bytes: (tile_bytes(2 + 2 * 2) + 12 * 8) as u32,
            };
            let name = match which {
                WgPrefill::Crossed => "flash_prefill_ws_x_d128",
                _ => "flash_prefill_ws_d128",
            };
            (name, cfg)
        }
    };
    launch(&dev, &ATTENTION_WG, name, cfg, &args)
}

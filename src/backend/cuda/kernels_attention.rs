//! Launch wrappers of `kernels/attention.cu`: paged decode attention and
//! flash prefill over the paged cache (the cache writes: `kernels_cache`).

use super::{check_f16, device_of, empty, launch, ptr, Arg, CacheLayer, ATTENTION};
use crate::backend::decode_plan::{self, SharedParts};
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{Device, Tensor};
use half::f16;

/// What the decode kernel needs beside the tensors.
pub struct DecodeShape {
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Sliding window (0: none).
    pub window: usize,
    /// Longest visible key range in the batch.
    pub max_keys: usize,
}

/// Keys per partition of the decode kernel (PART in kernels/attention_decode.cuh).
pub const DECODE_PART: usize = 512;

/// The blocks (sequences x KV heads, one partition each) from which the
/// engine's decode takes the one-stage build ([`DecodeVariant::engine`]).
/// Run 94 (H200): ahead at 128 x 192 (1,024 blocks: 65% of the read
/// ceiling against 57%), behind at 64 x 512 (512 blocks: 53% against 79%).
pub const SHORT_DECODE_MIN_BLOCKS: usize = 1024;

/// A build of the decode kernel: `warps` per block (each 16 keys of a
/// tile) and `stages` of K/V tiles in flight through shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DecodeVariant {
    /// Warps per block.
    pub warps: usize,
    /// Pipeline stages.
    pub stages: usize,
}

impl DecodeVariant {
    /// The builds in kernels/attention_decode.cuh (DECODE_VARIANTS). The first is
    /// the engine's, for every batch (a build's warps set the order of its
    /// sums, so one build keeps a sequence's result independent of the
    /// batch; its stages do not touch the arithmetic): 2 warps, 2 stages,
    /// bit-identical to 2 x 3 (the engine's from c795b0c to 0a4b881). Run
    /// 88 (H200, BENCHMARKS.md) had 2 x 2 ahead of 2 x 3 at every case, in
    /// both layouts; at head dim 128 the engine reads through the swizzled
    /// build of the same warps and stages ([`Self::SWIZZLED`]).
    pub const ALL: [DecodeVariant; 5] = [
        DecodeVariant {
            warps: 2,
            stages: 2,
        },
        DecodeVariant {
            warps: 2,
            stages: 3,
        },
        DecodeVariant {
            warps: 4,
            stages: 2,
        },
        DecodeVariant {
            warps: 4,
            stages: 3,
        },
        DecodeVariant {
            warps: 2,
            stages: 4,
        },
    ];
}

impl DecodeVariant {
    /// The direct FP8 builds (DECODE_F8's `f8d`; 2 warps, so one order of
    /// sums whatever the stages); the first is the engine's.
    pub const FP8_DIRECT: [DecodeVariant; 2] = [
        DecodeVariant {
            warps: 2,
            stages: 2,
        },
        DecodeVariant {
            warps: 2,
            stages: 3,
        },
    ];

    /// The widening FP8 build (DECODE_F8's `f8`: bit-identical to the f16
    /// build over the widened values; the tests' and benches' twin).
    pub const FP8_WIDEN: [DecodeVariant; 1] = [DecodeVariant {
        warps: 2,
        stages: 2,
    }];

    /// The swizzled f16 builds (`paged_decode_sw_d128_*`, head dim 128;
    /// a shared launch beside them reads through the padded shared
    /// builds): the engine's 2 x 2, 2 x 3 (run 88: 3-9% faster than the
    /// padded build of the same warps and stages), and 2 x 1 compiled for 8
    /// blocks per multiprocessor (more warps in flight: the engine's at
    /// short contexts, [`Self::engine`]).
    pub const SWIZZLED: [DecodeVariant; 3] = [
        Self::ALL[0],
        Self::ALL[1],
        DecodeVariant {
            warps: 2,
            stages: 1,
        },
    ];

    /// The build the engine decodes `cache` with, for `seqs` sequences of
    /// at most `max_keys` keys: the first of [`Self::builds`], except the
    /// one-stage swizzled build (8 blocks per multiprocessor where the two
    /// stages fit 6) for short contexts over many sequences. Its 2 warps
    /// sum as the first's (the same bits, GPU test), so the choice does not
    /// touch the results. Run 93 (H200): 80% of the read ceiling at 512 x
    /// 192 against 77%, the same at 256 x 1,024 and 64 x 8,192, but 53%
    /// against 78% at 64 x 512 (512 blocks: one stage hides too little);
    /// run 94's smaller cases set [`SHORT_DECODE_MIN_BLOCKS`].
    pub fn engine(cache: &CacheLayer<'_>, seqs: usize, kv_heads: usize, max_keys: usize) -> Self {
        let short = max_keys <= DECODE_PART && seqs * kv_heads >= SHORT_DECODE_MIN_BLOCKS;
        if short && cache.scales.is_none() && cache.swizzled {
            Self::SWIZZLED[2]
        } else {
            Self::builds(cache)[0]
        }
    }

    /// The builds there are for reading `cache`: every f16 build, the
    /// engine's alone over FP8 codes widened, the direct FP8 builds, the
    /// swizzled f16 builds.
    pub fn builds(cache: &CacheLayer<'_>) -> &'static [DecodeVariant] {
        match (cache.scales.is_some(), cache.direct, cache.swizzled) {
            (false, _, false) => &Self::ALL,
            (false, _, true) => &Self::SWIZZLED,
            (true, false, _) => &Self::FP8_WIDEN,
            (true, true, _) => &Self::FP8_DIRECT,
        }
    }
}

impl Default for DecodeVariant {
    fn default() -> Self {
        Self::ALL[0]
    }
}

/// Decode attention: q [B, heads*D] (one token per sequence), block tables
/// [B, max_blocks] u32, ctx_lens [B] u32 (keys including the query's own);
/// returns [B, heads*D]. Up to 16 query heads per KV head share each K/V
/// read (the rows of one tensor-core product); a sequence longer than
/// [`DECODE_PART`] keys is split into partitions of that fixed size, then
/// combined, so its result does not depend on the rest of the batch.
pub fn paged_decode(
    q: &Tensor,
    cache: CacheLayer<'_>,
    tables: &Tensor,
    ctx_lens: &Tensor,
    s: &DecodeShape,
) -> Result<Tensor> {
    let engine = DecodeVariant::builds(&cache)[0];
    paged_decode_with(q, cache, tables, ctx_lens, s, engine)
}

/// [`paged_decode`] through a chosen build of the kernel (for benchmarks).
pub fn paged_decode_with(
    q: &Tensor,
    cache: CacheLayer<'_>,
    tables: &Tensor,
    ctx_lens: &Tensor,
    s: &DecodeShape,
    v: DecodeVariant,
) -> Result<Tensor> {
    let out = empty::<f16>(&device_of(q)?, (q.dim(0)?, s.heads * s.head_dim))?;
    let io = DecodeIo {
        q,
        rows: None,
        out: &out,
        shared: None,
    };
    paged_decode_into(io, cache, tables, ctx_lens, s, v)?;
    Ok(out)
}

/// Where the decode kernel reads its queries and writes its output.
pub struct DecodeIo<'a> {
    /// Queries [T, heads*D].
    pub q: &'a Tensor,
    /// Row of q and of out for each sequence (u32 [B]); `None`: row b.
    pub rows: Option<&'a Tensor>,
    /// Output [T, heads*D]; only the sequences' rows are written.
    pub out: &'a Tensor,
    /// Partitions several sequences share, each read once for all of them.
    pub shared: Option<&'a SharedDecode>,
}

/// A [`SharedParts`] plan on the device.
#[derive(Debug)]
pub struct SharedDecode {
    items: Tensor,
    skip: Tensor,
    count: usize,
    group: usize,
    seqs: usize,
    stages: usize,
    rows: usize,
}

impl SharedDecode {
    /// Uploads a plan.
    pub fn new(plan: &SharedParts, dev: &Device) -> Result<Self> {
        let n = plan.items.len();
        Ok(Self {
            items: Tensor::from_vec(plan.items.clone(), n, dev)?,
            skip: Tensor::from_vec(plan.skip.clone(), plan.skip.len(), dev)?,
            count: plan.count(),
            group: plan.group,
            seqs: plan.skip.len(),
            stages: SHARED_STAGES,
            rows: plan.rows,
        })
    }

    /// The cp.async stages of the shared launch (its warps are the
    /// per-sequence build's, which sets the order of the sums; the stages
    /// do not touch the arithmetic): 2, 3 or 4 (for benchmarks).
    pub fn with_stages(mut self, stages: usize) -> Self {
        self.stages = stages;
        self
    }
}

/// The shared launch's stages: a shared partition is a whole 512 keys
/// and few blocks run, so deeper pipelining hides more of each tile's
/// latency.
pub const SHARED_STAGES: usize = 2;

/// Decode attention for the B sequences of `ctx_lens` [B], reading each
/// one's query from, and writing its output to, its row of `io`.
pub fn paged_decode_into(
    io: DecodeIo<'_>,
    cache: CacheLayer<'_>,
    tables: &Tensor,
    ctx_lens: &Tensor,
    s: &DecodeShape,
    v: DecodeVariant,
) -> Result<()> {
    check_f16(io.q, "paged_decode")?;
    let builds = DecodeVariant::builds(&cache);
    let tag = cache.decode_tag();
    if !builds.contains(&v) {
        return Err(Error::Model(format!(
            "paged_decode: no build {v:?} of paged_decode_{tag}* (there are {builds:?})"
        )));
    }
    if cache.swizzled && s.head_dim != 128 {
        return Err(Error::Model(format!(
            "paged_decode: the swizzled builds take head_dim 128, given {}",
            s.head_dim
        )));
    }
    // The shared launch has no swizzled build: it reads a swizzled
    // decode's shared partitions through the padded one (the same sums).
    let scache = CacheLayer {
        swizzled: false,
        ..cache
    };
    let stag = scache.decode_tag();
    let dev = device_of(io.q)?;
    let b = ctx_lens.dim(0)?;
    let g = s.heads / s.kv_heads;
    if !(1..=16).contains(&g) || !crate::backend::HEAD_DIMS.contains(&s.head_dim) {
        return Err(Error::Model(format!(
            "paged_decode: {} query heads per kv head (max 16) and head_dim {} (16/32/64/128) are not supported",
            g, s.head_dim
        )));
    }
    let width = s.heads * s.head_dim;
    if io.q.dims2()?.1 != width || io.out.dims2()? != io.q.dims2()? {
        return Err(Error::Model(format!(
            "paged_decode: q {:?} and out {:?} must both be [T, {width}]",
            io.q.dims(),
            io.out.dims()
        )));
    }
    let parts = s.max_keys.div_ceil(DECODE_PART).max(1);
    // One partition: the kernel writes `out` itself and the f32 partials
    // are not needed (a one-element stand-in keeps the pointers valid).
    let n = if parts > 1 { b * s.heads * parts } else { 1 };
    let po = empty::<f32>(&dev, n * s.head_dim)?;
    let pml = empty::<f32>(&dev, n * 2)?;
    let prows = io.rows.map(ptr::<u32>).transpose()?.unwrap_or(0);
    if let Some(sh) = io.shared.filter(|sh| sh.group != g || sh.seqs != b) {
        return Err(Error::Model(format!(
            "paged_decode: a shared-partition plan for {} sequences of {} heads per kv head, given {b} of {g}",
            sh.seqs, sh.group
        )));
    }
    // Shared builds: 64 rows per item for every cache, 16 for f16 only.
    if let Some(sh) = io.shared.filter(|sh| {
        !(sh.rows == decode_plan::ITEM_ROWS || sh.rows == decode_plan::TILE_ROWS && stag.is_empty())
    }) {
        return Err(Error::Model(format!(
            "paged_decode: no shared build of {} rows per item for this cache (64; 16 over f16)",
            sh.rows
        )));
    }
    let (items, skip) = match io.shared {
        Some(sh) => (ptr::<u32>(&sh.items)?, ptr::<u32>(&sh.skip)?),
        None => (0, 0),
    };
    let [kc, vc, ksc, vsc] = cache.ptrs()?;
    let p = [
        ptr::<f16>(io.q)?,
        kc,
        vc,
        ksc,
        vsc,
        ptr::<u32>(tables)?,
        ptr::<u32>(ctx_lens)?,
        prows,
        ptr::<f32>(&po)?,
        ptr::<f32>(&pml)?,
        ptr::<f16>(io.out)?,
        0,
        skip,
    ];
    let ints = [
        s.heads as i32,
        s.kv_heads as i32,
        tables.dim(1)? as i32,
        s.block_size as i32,
        s.window as i32,
    ];
    let scale = 1.0f32 / (s.head_dim as f32).sqrt();
    let pi = parts as i32;
    let cfg = LaunchConfig {
        grid_dim: (s.kv_heads as u32, b as u32, parts as u32),
        block_dim: (32 * v.warps as u32, 1, 1),
        shared_mem_bytes: decode_smem(v, 1, s, &cache),
    };
    let name = format!(
        "paged_decode_{tag}d{}_w{}s{}",
        s.head_dim, v.warps, v.stages
    );
    let mut args: Vec<Arg> = p.iter().map(|&x| Arg::P(x)).collect();
    args.extend(ints.iter().map(|&x| Arg::I(x)));
    args.extend([Arg::F(scale), Arg::I(pi)]);
    launch(&dev, &ATTENTION, &name, cfg, &args)?;
    if let Some(sh) = io.shared {
        // The shared partitions: one block per (kv head, item), the same
        // warps (so the same sums), writing the same partials (or rows of
        // `out`).
        let sv = DecodeVariant {
            warps: v.warps,
            stages: sh.stages,
        };
        if !DecodeVariant::builds(&scache).contains(&sv) {
            return Err(Error::Model(format!(
                "paged_decode: no shared build {sv:?} of paged_decode_shared_{stag}*"
            )));
        }
        args[11] = Arg::P(items);
        args[12] = Arg::P(0);
        let groups = sh.rows / decode_plan::TILE_ROWS;
        let cfg = LaunchConfig {
            grid_dim: (s.kv_heads as u32, sh.count as u32, 1),
            block_dim: (32 * (v.warps * groups) as u32, 1, 1),
            shared_mem_bytes: decode_smem(sv, groups, s, &scache),
        };
        let name = format!(
            "paged_decode_shared_r{}_{stag}d{}_w{}s{}",
            sh.rows, s.head_dim, sv.warps, sv.stages
        );
        launch(&dev, &ATTENTION, &name, cfg, &args)?;
    }
    if parts == 1 {
        return Ok(());
    }
    let (ppo, ppml, pout) = (ptr::<f32>(&po)?, ptr::<f32>(&pml)?, ptr::<f16>(io.out)?);
    let (nh, d) = (s.heads as i32, s.head_dim as i32);
    let cfg = LaunchConfig {
        grid_dim: ((b * s.heads) as u32, 1, 1),
        block_dim: (s.head_dim as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    use Arg::*;
    launch(
        &dev,
        &ATTENTION,
        "paged_decode_combine",
        cfg,
        &[P(ppo), P(ppml), P(prows), P(pout), I(nh), I(d), I(pi)],
    )
}

/// Shared memory of a decode build (DecodeSmem in kernels/attention_decode.cuh):
/// f16, the stages of a K and a V tile of 16 keys per warp (rows padded by
/// 8 halves; swizzled: unpadded); FP8, the stages' codes and scales and
/// each warp's widened K and V tile; FP8 direct, the stages' codes (rows
/// padded by 16 bytes) and scales; then the partition's block-table
/// entries. The warps' final
/// combine of their 16 rows per row group (`groups`: 1, or the shared
/// launch's rows / 16) reuses it.
fn decode_smem(v: DecodeVariant, groups: usize, s: &DecodeShape, cache: &CacheLayer<'_>) -> u32 {
    let (tile, d, rs) = (16 * v.warps, s.head_dim, s.head_dim + 8);
    let table = 4 * (DECODE_PART.div_ceil(s.block_size) + 2);
    let warps = v.warps * groups;
    let body = match (cache.scales.is_some(), cache.direct) {
        (false, _) if cache.swizzled => v.stages * 2 * tile * d * 2,
        (false, _) => v.stages * 2 * tile * rs * 2,
        (true, false) => v.stages * 2 * tile * (d + 4) + warps * 2 * 16 * rs * 2,
        (true, true) => v.stages * 2 * tile * (d + 16 + 4),
    };
    let combine = v.warps * 16 * groups * (d + 2) * 4;
    (body + table).max(combine) as u32
}

/// One prefill chunk for [`flash_prefill`]: rows `row0..row0 + n` of q and
/// of the output are the queries at positions `start..start + n` of a
/// sequence whose cache rows for positions `0..start + n` are
/// `keys[key_off..]`.
#[derive(Debug, Clone, Copy)]
pub struct PrefillChunk {
    /// First row in q / out.
    pub row0: usize,
    /// Query rows.
    pub n: usize,
    /// Position of the first query.
    pub start: usize,
    /// Offset of the chunk's cache rows in the key list.
    pub key_off: usize,
}

/// Query rows per block of the flash prefill kernel: the tokens of a tile
/// times the query heads of one KV head.
pub const PREFILL_ROWS: usize = 128;

/// Keys per tile and cp.async stages of the flash prefill kernel (FP_KT and
/// FP_STAGES in kernels/attention_prefill.cuh: keep them equal).
const PREFILL_KEY_TILE: usize = 32;
const PREFILL_STAGES: usize = 3;

/// Query heads per KV head the flash prefill kernel takes (a block's 128
/// rows are 128 / G tokens of G heads).
pub const PREFILL_GROUPS: [usize; 4] = [1, 2, 4, 8];

/// Tokens per tile of the flash prefill kernel for `group` query heads per
/// KV head.
pub fn prefill_tile_tokens(group: usize) -> usize {
    PREFILL_ROWS / group.max(1)
}

/// The flash prefill's tiles of `chunks` in chunk order: [first row,
/// rows, position of the first row, the chunk's key offset]; a tile sees
/// its rows' positions' keys, position + rows in all.
fn tile_list(chunks: &[PrefillChunk], group: usize) -> impl Iterator<Item = [u32; 4]> + '_ {
    let per = prefill_tile_tokens(group);
    chunks.iter().flat_map(move |c| {
        (0..c.n).step_by(per).map(move |r| {
            [
                (c.row0 + r) as u32,
                per.min(c.n - r) as u32,
                (c.start + r) as u32,
                c.key_off as u32,
            ]
        })
    })
}

/// Keys over all of the flash prefill's tiles for `chunks`.
pub fn prefill_tile_keys(chunks: &[PrefillChunk], group: usize) -> usize {
    tile_list(chunks, group)
        .map(|t| (t[1] + t[2]) as usize)
        .sum()
}

/// `engine.prefill_attention = "auto"` takes the wgmma flash prefill
/// (Hopper) for a forward whose tiles see this many keys on average: from
/// `runner bench --kernels` on an H200 (run 82, the persistent pipelined
/// kernel), it is 1.3x the mma.sync kernel at 4 x 2,048, 1.2x at 64 tokens
/// after 1,024 cached and 1.1x at 16 x 512 (tiles of 272 keys on average),
/// but 0.87x at 64 x 128 (80 keys on average, one key tile each).
pub const WGMMA_PREFILL_MIN_KEYS: usize = 256;

/// The flash prefill kernel's work list for `chunks`: tiles of up to
/// [`prefill_tile_tokens`]`(group)` query tokens, most keys first (the long
/// ones start first, the short ones fill the tail); returns (tiles as a
/// [n, 4] u32 tensor, n).
pub fn prefill_tiles(
    chunks: &[PrefillChunk],
    group: usize,
    dev: &Device,
) -> Result<(Tensor, usize)> {
    let mut tiles: Vec<[u32; 4]> = tile_list(chunks, group).collect();
    tiles.sort_by_key(|t| std::cmp::Reverse(t[1] + t[2]));
    let n = tiles.len();
    let flat: Vec<u32> = tiles.into_iter().flatten().collect();
    Ok((Tensor::from_vec(flat, (n, 4), dev)?, n))
}

/// What the flash prefill kernel needs beside the tensors.
pub struct PrefillShape {
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head dimension (16, 32, 64, 128).
    pub head_dim: usize,
    /// Sliding window (0: none).
    pub window: usize,
}

/// Flash attention for prefill chunks over the paged cache: q [T,
/// heads*D]; kc/vc the cache [rows, kv_heads*D]; `keys` the chunks' cache
/// rows (u32); `tiles` from [`prefill_tiles`]. Writes the chunks' rows of
/// `out` [T, heads*D] (other rows are left as they are).
pub fn flash_prefill(
    q: &Tensor,
    cache: CacheLayer<'_>,
    keys: &Tensor,
    tiles: (&Tensor, usize),
    out: &Tensor,
    s: &PrefillShape,
) -> Result<()> {
    let Some((_q, args)) = prefill_args(q, &cache, keys, tiles, out, s, "flash_prefill")? else {
        return Ok(());
    };
    let rs = s.head_dim + 8;
    // The block's 128 Q rows (padded by 8 halves), then f16: the stages of
    // a K and a V tile; FP8: the stages' codes and scales and one widened
    // K and V tile.
    let kv = if cache.scales.is_some() {
        PREFILL_STAGES * 2 * PREFILL_KEY_TILE * (s.head_dim + 4) + 2 * PREFILL_KEY_TILE * rs * 2
    } else {
        PREFILL_STAGES * 2 * PREFILL_KEY_TILE * rs * 2
    };
    let cfg = LaunchConfig {
        grid_dim: (tiles.1 as u32, s.kv_heads as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: (PREFILL_ROWS * rs * 2 + kv) as u32,
    };
    let name = format!("flash_prefill_{}d{}", cache.tag(), s.head_dim);
    launch(&device_of(q)?, &ATTENTION, &name, cfg, &args)
}

/// The checks and the arguments both flash prefill kernels take (this
/// one and `flash_prefill_wg`): q, the cache's K, V and FP8 scales, keys,
/// tiles, out, then heads, kv heads, window and the score scale. With
/// them, q made contiguous (the arguments point into it, so it must live
/// until the launch); `None` when there are no tiles.
pub(crate) fn prefill_args(
    q: &Tensor,
    cache: &CacheLayer<'_>,
    keys: &Tensor,
    tiles: (&Tensor, usize),
    out: &Tensor,
    s: &PrefillShape,
    what: &str,
) -> Result<Option<(Tensor, Vec<Arg>)>> {
    check_f16(q, what)?;
    if !crate::backend::HEAD_DIMS.contains(&s.head_dim)
        || s.kv_heads == 0
        || !s.heads.is_multiple_of(s.kv_heads)
        || !PREFILL_GROUPS.contains(&(s.heads / s.kv_heads))
    {
        return Err(Error::Model(format!(
            "{what}: head_dim {} (16/32/64/128) with {} heads over {} kv heads (1, 2, 4 or 8 heads per kv head) is not supported",
            s.head_dim, s.heads, s.kv_heads
        )));
    }
    if tiles.1 == 0 {
        return Ok(None);
    }
    let q = q.contiguous()?;
    let [kc, vc, ksc, vsc] = cache.ptrs()?;
    let p = [
        ptr::<f16>(&q)?,
        kc,
        vc,
        ksc,
        vsc,
        ptr::<u32>(keys)?,
        ptr::<u32>(tiles.0)?,
        ptr::<f16>(out)?,
    ];
    let mut args: Vec<Arg> = p.iter().map(|&x| Arg::P(x)).collect();
    args.extend([
        Arg::I(s.heads as i32),
        Arg::I(s.kv_heads as i32),
        Arg::I(s.window as i32),
        Arg::F(1.0 / (s.head_dim as f32).sqrt()),
    ]);
    Ok(Some((q, args)))
}

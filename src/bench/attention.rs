//! Attention kernel benches on CUDA: decode against the read ceiling
//! (every build, over f16 and FP8 caches), decode over a shared prefix
//! with and without the plan, and flash prefill (mma.sync and wgmma).

use super::kernels::time;
use crate::cuda::{self, DecodeShape, DecodeVariant};
use crate::Result;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

/// One decode-attention measurement.
#[derive(Debug, Clone, Serialize)]
pub struct AttnRow {
    /// Sequences.
    pub batch: usize,
    /// Keys per sequence.
    pub ctx: usize,
    /// The kernel build measured.
    pub variant: DecodeVariant,
    /// Whether it is the build the engine uses.
    pub default: bool,
    /// Over an FP8 cache (codes and scales).
    pub fp8: bool,
    /// Over an FP8 cache through a direct build (`paged_decode_f8d_*`).
    pub direct: bool,
    /// Through a swizzled f16 build (`paged_decode_sw_*`).
    pub swizzled: bool,
    /// K/V bytes read per second, GB/s.
    pub gbs: f64,
    /// Microseconds per call (one layer).
    pub us: f64,
}

/// Mistral-7B's decode shape (32 q, 8 kv, d 128, blocks of 16, no window).
fn mistral_decode(max_keys: usize) -> DecodeShape {
    DecodeShape {
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        block_size: 16,
        window: 0,
        max_keys,
    }
}

/// Decode attention on Mistral-7B's heads (32 q, 8 kv, d 128, blocks of
/// 16), every build of the kernel per case (the swizzled ones last), then
/// the engine's build over the same keys and values in an FP8 cache.
pub fn attention_table(dev: &Device, cases: &[(usize, usize)]) -> Result<Vec<AttnRow>> {
    let cd = cuda::cuda(dev)?;
    let (nh, nkv, d, bs) = (32, 8, 128, 16);
    let mut rows = Vec::new();
    for &(b, ctx) in cases {
        let per = ctx.div_ceil(bs);
        let blocks = b * per;
        let kc = cuda::fill_f16(&cd, (blocks * bs, nkv * d), 6, -1.0, 1.0)?;
        let vc = cuda::fill_f16(&cd, (blocks * bs, nkv * d), 7, -1.0, 1.0)?;
        let q = cuda::fill_f16(&cd, (b, nh * d), 8, -1.0, 1.0)?;
        // Interleave the sequences' blocks, as a long-running cache does.
        let tables: Vec<u32> = (0..b)
            .flat_map(|i| (0..per).map(move |j| (j * b + i) as u32))
            .collect();
        let tables = Tensor::from_vec(tables, (b, per), dev)?;
        let ctxs = Tensor::from_vec(vec![ctx as u32; b], b, dev)?;
        let shape = mistral_decode(ctx);
        let f16 = cuda::CacheLayer::f16(&kc, &vc);
        let f16_builds = DecodeVariant::ALL.map(|v| (f16, v)).into_iter();
        let builds = f16_builds.chain(DecodeVariant::SWIZZLED.map(|v| (f16.swizzled(), v)));
        for (cache, variant) in builds {
            let t = time(dev, 20, || {
                cuda::paged_decode_with(&q, cache, &tables, &ctxs, &shape, variant)?;
                Ok(())
            })?;
            let bytes = (b * ctx * nkv * d * 2 * 2) as f64;
            rows.push(AttnRow {
                batch: b,
                ctx,
                variant,
                default: cache.swizzled
                    && variant == DecodeVariant::engine(&cache, b, nkv, shape.max_keys),
                fp8: false,
                direct: false,
                swizzled: cache.swizzled,
                gbs: bytes / t / 1e9,
                us: t * 1e6,
            });
        }
        let (k8, v8, ks, vs) = fp8_cache(&kc, &vc, d, dev)?;
        let fp8 = cuda::CacheLayer::fp8(&k8, &v8, &ks, &vs);
        // The engine's build over FP8, then the direct ones.
        let builds = [(fp8, DecodeVariant::builds(&fp8)[0])]
            .into_iter()
            .chain(DecodeVariant::FP8_DIRECT.map(|v| (fp8.direct(), v)));
        for (cache, variant) in builds {
            let t = time(dev, 20, || {
                cuda::paged_decode_with(&q, cache, &tables, &ctxs, &shape, variant)?;
                Ok(())
            })?;
            // A byte per value and an f32 scale per row of d.
            let bytes = (b * ctx * nkv * (d + 4) * 2) as f64;
            rows.push(AttnRow {
                batch: b,
                ctx,
                variant,
                default: cache.direct && variant == DecodeVariant::FP8_DIRECT[0],
                fp8: true,
                direct: cache.direct,
                swizzled: false,
                gbs: bytes / t / 1e9,
                us: t * 1e6,
            });
        }
    }
    Ok(rows)
}

/// The FP8 cache holding the f16 cache rows `kc`/`vc` [slots, kv_heads *
/// d] in the same slots: (k codes, v codes, k scales, v scales).
fn fp8_cache(
    kc: &Tensor,
    vc: &Tensor,
    d: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let (n, row) = kc.dims2()?;
    let codes = || Tensor::zeros((n, row), candle_core::DType::U8, dev);
    let scales = || Tensor::zeros((n, row / d), candle_core::DType::F32, dev);
    let (k8, v8, ks, vs) = (codes()?, codes()?, scales()?, scales()?);
    let slots = Tensor::arange(0u32, n as u32, dev)?;
    let cache = cuda::CacheLayer::fp8(&k8, &v8, &ks, &vs);
    cuda::kv_write_fp8(kc, vc, cache, d, &slots)?;
    Ok((k8, v8, ks, vs))
}

/// One prefill-attention measurement.
#[derive(Debug, Clone, Serialize)]
pub struct PrefillRow {
    /// Sequences (one chunk each, from position 0).
    pub seqs: usize,
    /// New tokens per sequence.
    pub tokens: usize,
    /// Positions of each sequence already cached before them.
    pub cached: usize,
    /// Device µs per call (one layer), from a CUDA graph.
    pub us: Option<f64>,
    /// Causal attention TFLOP/s (QK^T and PV over the visible keys only).
    pub tflops: Option<f64>,
    /// The same over an FP8 cache: µs and TFLOP/s.
    pub fp8_us: Option<f64>,
    /// TFLOP/s over an FP8 cache.
    pub fp8_tflops: Option<f64>,
    /// The plain wgmma kernel (`flash_prefill_wg_d128`, Hopper only; not yet the
    /// engine's): µs and TFLOP/s over the f16 cache.
    pub wg_us: Option<f64>,
    /// TFLOP/s of the wgmma kernel.
    pub wg_tflops: Option<f64>,
    /// The pipelined wgmma kernel (`flash_prefill_ws_d128`): µs.
    pub ws_us: Option<f64>,
    /// TFLOP/s of the pipelined wgmma kernel.
    pub ws_tflops: Option<f64>,
    /// The pipelined kernel with an item's last PV beside the next item's
    /// first S (`flash_prefill_ws_x_d128`): µs.
    pub wsx_us: Option<f64>,
    /// TFLOP/s of the crossed pipelined kernel.
    pub wsx_tflops: Option<f64>,
}

/// Flash prefill attention on Mistral's heads (32 q, 8 kv, d 128, blocks of
/// 16, cache rows interleaved across sequences): cases of (sequences, new
/// tokens each, positions each already cached before them).
pub fn prefill_table(dev: &Device, cases: &[(usize, usize, usize)]) -> Result<Vec<PrefillRow>> {
    let cd = cuda::cuda(dev)?;
    let (nh, nkv, d) = (32, 8, 128);
    let mut rows = Vec::new();
    for &(b, n, start) in cases {
        let len = start + n;
        let kc = cuda::fill_f16(&cd, (b * len, nkv * d), 6, -1.0, 1.0)?;
        let vc = cuda::fill_f16(&cd, (b * len, nkv * d), 7, -1.0, 1.0)?;
        let q = cuda::fill_f16(&cd, (b * n, nh * d), 8, -1.0, 1.0)?;
        let keys: Vec<u32> = (0..b)
            .flat_map(|i| (0..len).map(move |p| (p * b + i) as u32))
            .collect();
        let keys = Tensor::from_vec(keys, b * len, dev)?;
        let chunks: Vec<cuda::PrefillChunk> = (0..b)
            .map(|i| cuda::PrefillChunk {
                row0: i * n,
                n,
                start,
                key_off: i * len,
            })
            .collect();
        let (tiles, ntiles) = cuda::prefill_tiles(&chunks, nh / nkv, dev)?;
        let out = Tensor::zeros((b * n, nh * d), DType::F16, dev)?;
        let shape = cuda::PrefillShape {
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
            window: 0,
        };
        let t = cuda::graph_time(dev, 10, || {
            let cache = cuda::CacheLayer::f16(&kc, &vc);
            cuda::flash_prefill(&q, cache, &keys, (&tiles, ntiles), &out, &shape)
        })?;
        let (k8, v8, ks, vs) = fp8_cache(&kc, &vc, d, dev)?;
        let t8 = cuda::graph_time(dev, 10, || {
            let cache = cuda::CacheLayer::fp8(&k8, &v8, &ks, &vs);
            cuda::flash_prefill(&q, cache, &keys, (&tiles, ntiles), &out, &shape)
        })?;
        let wg = |which| -> Result<Option<f64>> {
            if !cuda::is_sm90a(&cd) {
                return Ok(None);
            }
            cuda::graph_time(dev, 10, || {
                let cache = cuda::CacheLayer::f16(&kc, &vc);
                cuda::flash_prefill_wg(&q, cache, &keys, (&tiles, ntiles), &out, &shape, which)
            })
        };
        let twg = wg(cuda::WgPrefill::Plain)?;
        let tws = wg(cuda::WgPrefill::Pipelined)?;
        let twx = wg(cuda::WgPrefill::Crossed)?;
        // Visible (query, key) pairs: n start + n (n + 1) / 2 per head and
        // sequence; 2 FLOP per multiply-add, QK^T and PV.
        let flop = (b * nh) as f64 * (n * start + n * (n + 1) / 2) as f64 * d as f64 * 4.0;
        rows.push(PrefillRow {
            seqs: b,
            tokens: n,
            cached: start,
            us: t.map(|t| t * 1e6),
            tflops: t.map(|t| flop / t / 1e12),
            fp8_us: t8.map(|t| t * 1e6),
            fp8_tflops: t8.map(|t| flop / t / 1e12),
            wg_us: twg.map(|t| t * 1e6),
            wg_tflops: twg.map(|t| flop / t / 1e12),
            ws_us: tws.map(|t| t * 1e6),
            ws_tflops: tws.map(|t| flop / t / 1e12),
            wsx_us: twx.map(|t| t * 1e6),
            wsx_tflops: twx.map(|t| flop / t / 1e12),
        });
    }
    Ok(rows)
}

/// One shared-prefix decode measurement.
#[derive(Debug, Clone, Serialize)]
pub struct SharedRow {
    /// Sequences.
    pub batch: usize,
    /// Keys every sequence holds in the same cache blocks.
    pub shared: usize,
    /// Keys of each sequence's own after them.
    pub own: usize,
    /// µs per call (one layer) without a plan: every sequence reads the
    /// prefix.
    pub plain_us: f64,
    /// µs per call with the plan, per build of the shared launch: `r`
    /// rows per item, `s` stages (`r64s2` is the engine's, `r16s2` the
    /// previous engine's).
    pub shared_us: Vec<(String, f64)>,
    /// µs per call of the same decode over the sequences' own keys alone
    /// (no prefix): what is left when the prefix costs nothing.
    pub own_us: f64,
}

/// Decode attention (the engine's build) over `shared` keys that every
/// sequence holds in the same blocks (as the prefix cache hands them out)
/// plus `own` keys each, without and with the shared-partition plan.
pub fn shared_decode_table(
    dev: &Device,
    cases: &[(usize, usize, usize)],
) -> Result<Vec<SharedRow>> {
    use crate::backend::decode_plan;
    use crate::kv::BlockId;
    let cd = cuda::cuda(dev)?;
    let (nh, nkv, d, bs) = (32, 8, 128, 16);
    let mut rows = Vec::new();
    for &(b, shared, own) in cases {
        let (sb, ob) = (shared / bs, own.div_ceil(bs));
        let blocks = sb + b * ob;
        let kc = cuda::fill_f16(&cd, (blocks * bs, nkv * d), 6, -1.0, 1.0)?;
        let vc = cuda::fill_f16(&cd, (blocks * bs, nkv * d), 7, -1.0, 1.0)?;
        let q = cuda::fill_f16(&cd, (b, nh * d), 8, -1.0, 1.0)?;
        let ids: Vec<Vec<BlockId>> = (0..b)
            .map(|i| {
                let own = (0..ob).map(|j| (sb + j * b + i) as u32);
                (0..sb as u32).chain(own).map(BlockId).collect()
            })
            .collect();
        let refs: Vec<&[BlockId]> = ids.iter().map(|t| t.as_slice()).collect();
        let ctx = vec![(shared + own) as u32; b];
        let shape = decode_plan::PlanShape::new(bs, cuda::DECODE_PART, nh / nkv);
        let plan = |rows| decode_plan::plan(&refs, &ctx, decode_plan::PlanShape { rows, ..shape });
        let flat: Vec<u32> = ids.iter().flatten().map(|x| x.0).collect();
        let tables = Tensor::from_vec(flat, (b, sb + ob), dev)?;
        let ctxs = Tensor::from_vec(ctx.clone(), b, dev)?;
        let out = Tensor::zeros((b, nh * d), DType::F16, dev)?;
        let run = |sh: Option<&cuda::SharedDecode>, tables: &Tensor, ctxs: &Tensor, keys: usize| {
            let shape = mistral_decode(keys);
            time(dev, 20, || {
                let io = cuda::DecodeIo {
                    q: &q,
                    rows: None,
                    out: &out,
                    shared: sh,
                };
                cuda::paged_decode_into(
                    io,
                    cuda::CacheLayer::f16(&kc, &vc).engine_decode(d),
                    tables,
                    ctxs,
                    &shape,
                    Default::default(),
                )
            })
        };
        let plain_us = run(None, &tables, &ctxs, shared + own)? * 1e6;
        let mut shared_us = Vec::new();
        let builds = [
            (decode_plan::TILE_ROWS, 2),
            (decode_plan::ITEM_ROWS, 2),
            (decode_plan::ITEM_ROWS, 3),
            (decode_plan::ITEM_ROWS, 4),
        ];
        for (r, stages) in builds {
            if let Some(p) = plan(r) {
                let sh = cuda::SharedDecode::new(&p, dev)?.with_stages(stages);
                let us = run(Some(&sh), &tables, &ctxs, shared + own)? * 1e6;
                shared_us.push((format!("r{r}s{stages}"), us));
            }
        }
        // The own keys alone: the same tables from their first own block.
        let own_tables: Vec<u32> = ids
            .iter()
            .flat_map(|t| t[sb..].iter().map(|x| x.0))
            .collect();
        let own_tables = Tensor::from_vec(own_tables, (b, ob), dev)?;
        let own_ctx = Tensor::from_vec(vec![own as u32; b], b, dev)?;
        let own_us = run(None, &own_tables, &own_ctx, own)? * 1e6;
        rows.push(SharedRow {
            batch: b,
            shared,
            own,
            plain_us,
            shared_us,
            own_us,
        });
    }
    Ok(rows)
}

//! The paged KV cache on the GPU (per layer, f16 rows, or FP8 E4M3 codes
//! with an f32 scale per token and KV head) and attention over it: one
//! batched decode kernel for every single-token chunk, and one flash
//! prefill kernel for every longer chunk (head dims 16, 32, 64, 128).

use super::{
    self as cuda, CacheLayer, DecodeIo, DecodeShape, DecodeVariant, PrefillChunk, PrefillShape,
    SharedDecode,
};
use crate::backend::decode_plan;
use crate::backend::{AttnIn, KvShape};
use crate::config::PrefillAttention;
use crate::kv::{BlockCopy, BlockId};
use crate::Result;
use candle_core::{DType, Device, Tensor};

/// GPU storage of the paged cache.
#[derive(Debug)]
pub struct CudaKv {
    block_size: usize,
    kv_heads: usize,
    heads: usize,
    layers: Vec<Layer>,
    /// Which flash prefill kernel, `engine.prefill_attention` where the
    /// wgmma one runs (Hopper, head dim 128, f16 cache), else `Mma`.
    prefill_kernel: PrefillAttention,
}

/// One layer's storage: K and V rows, and the FP8 cache's scales.
#[derive(Debug)]
struct Layer {
    k: Tensor,
    v: Tensor,
    scales: Option<(Tensor, Tensor)>,
}

impl Layer {
    fn view(&self) -> CacheLayer<'_> {
        match &self.scales {
            None => CacheLayer::f16(&self.k, &self.v),
            Some((ks, vs)) => CacheLayer::fp8(&self.k, &self.v, ks, vs),
        }
    }
}

/// Index tensors of one forward, shared by every layer.
pub struct GpuBatch {
    /// Cache row of every token [T].
    slots: Tensor,
    /// Single-token chunks, batched for the decode kernel.
    decode: Option<Decode>,
    /// Prefill chunks (more than one token): every chunk's cache rows of
    /// positions 0..start+n, concatenated, and the flash kernel's tiles.
    prefill: Option<Prefill>,
}

struct Prefill {
    keys: Tensor,
    tiles: Tensor,
    ntiles: usize,
    /// Run by the wgmma kernel (else the mma.sync one).
    wgmma: bool,
}

struct Decode {
    rows: Tensor,
    /// Partitions several sequences share (prefix-cache blocks), and the
    /// longest context among those sequences.
    shared: Option<(SharedDecode, usize)>,
    /// Every row of the step is a decode row, in order (q needs no gather).
    whole: bool,
    tables: Tensor,
    ctx: Tensor,
    max_keys: usize,
}

impl GpuBatch {
    /// What a CUDA graph of a forward over this batch depends on besides
    /// its token count: (block-table width, decode partitions per
    /// sequence); `None` unless every row is a decode row, in order, with
    /// no shared-partition plan (whose size changes from step to step).
    pub fn graph_key(&self) -> Option<(usize, usize)> {
        let d = self.decode.as_ref()?;
        if self.prefill.is_some() || !d.whole || d.shared.is_some() {
            return None;
        }
        let parts = d.max_keys.div_ceil(cuda::DECODE_PART).max(1);
        Some((d.tables.dim(1).ok()?, parts))
    }

    /// Copies this batch's index tensors into `dst`, a batch of the same
    /// token count and graph key (a graph's inputs).
    pub fn copy_into(&self, dst: &GpuBatch) -> Result<()> {
        dst.slots.slice_set(&self.slots, 0, 0)?;
        if let (Some(a), Some(b)) = (&self.decode, &dst.decode) {
            b.rows.slice_set(&a.rows, 0, 0)?;
            b.tables.slice_set(&a.tables, 0, 0)?;
            b.ctx.slice_set(&a.ctx, 0, 0)?;
        }
        Ok(())
    }
}

impl CudaKv {
    /// Zeroed storage: f16, or FP8 codes and scales (`s.fp8`).
    pub fn new(s: &KvShape, dev: &Device) -> Result<Self> {
        // The attention kernels are built for these head dims (Mistral-7B: 128).
        if !crate::backend::HEAD_DIMS.contains(&s.head_dim) {
            return Err(crate::Error::Model(format!(
                "head_dim {} is not supported on CUDA (16, 32, 64 or 128)",
                s.head_dim
            )));
        }
        let group = s.heads / s.kv_heads.max(1);
        if s.kv_heads == 0
            || group * s.kv_heads != s.heads
            || !cuda::PREFILL_GROUPS.contains(&group)
        {
            return Err(crate::Error::Model(format!(
                "{} attention heads over {} kv heads is not supported on CUDA (1, 2, 4 or 8 heads per kv head)",
                s.heads, s.kv_heads
            )));
        }
        let rows = s.num_blocks * s.block_size;
        let row = s.kv_heads * s.head_dim;
        let dtype = if s.fp8 { DType::U8 } else { DType::F16 };
        let mut layers = Vec::with_capacity(s.layers);
        for _ in 0..s.layers {
            let scales = || Tensor::zeros((rows, s.kv_heads), DType::F32, dev);
            layers.push(Layer {
                k: Tensor::zeros((rows, row), dtype, dev)?,
                v: Tensor::zeros((rows, row), dtype, dev)?,
                scales: if s.fp8 {
                    Some((scales()?, scales()?))
                } else {
                    None
                },
            });
        }
        let wgmma = s.head_dim == 128 && !s.fp8 && cuda::wgmma_runs_on(dev);
        Ok(Self {
            block_size: s.block_size,
            kv_heads: s.kv_heads,
            heads: s.heads,
            layers,
            prefill_kernel: if wgmma {
                s.prefill_attention
            } else {
                PrefillAttention::Mma
            },
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The cache row of position `pos`; an error (as on the CPU) when the
    /// block table does not cover it.
    fn slot(&self, blocks: &[BlockId], pos: usize) -> Result<u32> {
        let b = blocks.get(pos / self.block_size).ok_or_else(|| {
            crate::Error::Engine(format!(
                "kv cache: position {pos} is past the sequence's {} blocks of {}",
                blocks.len(),
                self.block_size
            ))
        })?;
        Ok(b.0 * self.block_size as u32 + (pos % self.block_size) as u32)
    }

    /// Copies blocks' rows in every layer: all of a step's copies in one
    /// gather and one scatter per layer.
    pub fn copy_blocks(&mut self, copies: &[BlockCopy]) -> Result<()> {
        if copies.is_empty() {
            return Ok(());
        }
        let bs = self.block_size as u32;
        let dev = self.layers[0].k.device().clone();
        let rows = |b: BlockId| (0..bs).map(move |i| b.0 * bs + i);
        let n = copies.len() * bs as usize;
        let src: Vec<u32> = copies.iter().flat_map(|c| rows(c.from)).collect();
        let dst: Vec<u32> = copies.iter().flat_map(|c| rows(c.to)).collect();
        let src = Tensor::from_vec(src, n, &dev)?;
        let dst = Tensor::from_vec(dst, n, &dev)?;
        for l in &self.layers {
            let k = l.k.index_select(&src, 0)?;
            let v = l.v.index_select(&src, 0)?;
            match &l.scales {
                None => cuda::kv_write(&k, &v, &l.k, &l.v, &dst)?,
                Some((ks, vs)) => {
                    cuda::scatter_rows(&k, &l.k, &dst)?;
                    cuda::scatter_rows(&v, &l.v, &dst)?;
                    cuda::scatter_rows(&ks.index_select(&src, 0)?, ks, &dst)?;
                    cuda::scatter_rows(&vs.index_select(&src, 0)?, vs, &dst)?;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn prepare(
        &self,
        chunks: &[(usize, usize, Vec<BlockId>)],
        dev: &Device,
    ) -> Result<GpuBatch> {
        let mut slots = Vec::new();
        let mut rows = Vec::new();
        let mut ctx = Vec::new();
        let mut tables: Vec<&[BlockId]> = Vec::new();
        let mut keys: Vec<u32> = Vec::new();
        let mut prefill = Vec::new();
        let mut off = 0u32;
        for (start, n, blocks) in chunks {
            for p in *start..start + n {
                slots.push(self.slot(blocks, p)?);
            }
            if *n == 1 {
                rows.push(off);
                ctx.push((start + 1) as u32);
                tables.push(blocks);
            } else {
                prefill.push(PrefillChunk {
                    row0: off as usize,
                    n: *n,
                    start: *start,
                    key_off: keys.len(),
                });
                for p in 0..start + n {
                    keys.push(self.slot(blocks, p)?);
                }
            }
            off += *n as u32;
        }
        let decode = if rows.is_empty() {
            None
        } else {
            // The table's width in steps of 16 blocks, so that a CUDA graph
            // of the forward holds over many steps (see `graph_key`).
            let maxb = tables.iter().map(|t| t.len()).max().unwrap_or(1);
            let maxb = maxb.max(1).next_multiple_of(16);
            let mut flat = vec![0u32; tables.len() * maxb];
            for (i, t) in tables.iter().enumerate() {
                for (j, b) in t.iter().enumerate() {
                    flat[i * maxb + j] = b.0;
                }
            }
            let bd = rows.len();
            let whole = prefill.is_empty();
            let max_keys = *ctx.iter().max().unwrap_or(&1) as usize;
            let group = self.heads / self.kv_heads;
            let plan = decode_plan::plan(
                &tables,
                &ctx,
                decode_plan::PlanShape::new(self.block_size, cuda::DECODE_PART, group),
            );
            let shared = match plan {
                Some(p) => Some((SharedDecode::new(&p, dev)?, p.max_ctx)),
                None => None,
            };
            Some(Decode {
                rows: Tensor::from_vec(rows, bd, dev)?,
                shared,
                whole,
                tables: Tensor::from_vec(flat, (bd, maxb), dev)?,
                ctx: Tensor::from_vec(ctx, bd, dev)?,
                max_keys,
            })
        };
        let prefill = if prefill.is_empty() {
            None
        } else {
            let group = self.heads / self.kv_heads;
            let (tiles, ntiles) = cuda::prefill_tiles(&prefill, group, dev)?;
            let nk = keys.len();
            let wgmma = match self.prefill_kernel {
                PrefillAttention::Mma => false,
                PrefillAttention::Wgmma => true,
                PrefillAttention::Auto => {
                    cuda::prefill_tile_keys(&prefill, group) / ntiles.max(1)
                        >= cuda::WGMMA_PREFILL_MIN_KEYS
                }
            };
            Some(Prefill {
                keys: Tensor::from_vec(keys, nk, dev)?,
                tiles,
                ntiles,
                wgmma,
            })
        };
        let t = slots.len();
        Ok(GpuBatch {
            slots: Tensor::from_vec(slots, t, dev)?,
            decode,
            prefill,
        })
    }

    /// RoPE over the input's q and k and the cache write of k and v, in
    /// one kernel where the rows allow (else RoPE, then the write); returns
    /// the rotated q [T, heads*d].
    pub(crate) fn rope_write(
        &mut self,
        layer: usize,
        b: &GpuBatch,
        a: &AttnIn<'_>,
        positions: &Tensor,
    ) -> Result<Tensor> {
        let [q, k, v] = a.qkv;
        let (cos, sin) = a.rope;
        let l = &self.layers[layer];
        let hd = a.dims.2;
        if l.scales.is_some() {
            // FP8: RoPE, then the quantizing write.
            let (q, k) = cuda::rope_qk(q, k, cos, sin, positions, hd)?;
            cuda::kv_write_fp8(&k, v, l.view(), hd, &b.slots)?;
            return Ok(q);
        }
        let (kc, vc) = (&l.k, &l.v);
        let fused = cuda::rope_qkv_cache((q, k, v), cos, sin, positions, hd, (kc, vc), &b.slots)?;
        match fused {
            Some(q) => Ok(q),
            None => {
                let (q, k) = cuda::rope_qk(q, k, cos, sin, positions, hd)?;
                cuda::kv_write(&k, v, kc, vc, &b.slots)?;
                Ok(q)
            }
        }
    }

    /// Attends q [T, heads*d] over the cache, whose rows for this batch are
    /// already written; returns [T, heads*d].
    pub(crate) fn attend(
        &self,
        layer: usize,
        b: &GpuBatch,
        q: &Tensor,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let (t, nh) = (q.dim(0)?, self.heads);
        let d = q.dim(1)? / nh;
        let nkv = self.kv_heads;
        let cache = self.layers[layer].view();
        let q = q.contiguous()?;
        let out = cuda::empty::<half::f16>(&cuda::cuda(q.device())?, (t, nh * d))?;
        if let Some(p) = &b.prefill {
            let shape = PrefillShape {
                heads: nh,
                kv_heads: nkv,
                head_dim: d,
                window: window.unwrap_or(0),
            };
            let tiles = (&p.tiles, p.ntiles);
            if p.wgmma {
                let which = cuda::WgPrefill::Pipelined;
                cuda::flash_prefill_wg(&q, cache, &p.keys, tiles, &out, &shape, which)?;
            } else {
                cuda::flash_prefill(&q, cache, &p.keys, tiles, &out, &shape)?;
            }
        }
        if let Some(dd) = &b.decode {
            // A window that cuts a sequence with shared partitions moves
            // its partitions: the plan does not hold then.
            let shared = dd
                .shared
                .as_ref()
                .filter(|(_, c)| window.is_none_or(|w| *c <= w));
            let io = DecodeIo {
                q: &q,
                rows: (!dd.whole).then_some(&dd.rows),
                out: &out,
                shared: shared.map(|(s, _)| s),
            };
            let shape = DecodeShape {
                heads: nh,
                kv_heads: nkv,
                head_dim: d,
                block_size: self.block_size,
                window: window.unwrap_or(0),
                max_keys: window.map_or(dd.max_keys, |w| dd.max_keys.min(w)),
            };
            let dcache = cache.engine_decode(d);
            let build = DecodeVariant::engine(&dcache, dd.ctx.dim(0)?, nkv, shape.max_keys);
            cuda::paged_decode_into(io, dcache, &dd.tables, &dd.ctx, &shape, build)?;
        }
        Ok(out)
    }
}

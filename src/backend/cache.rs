//! The paged KV cache of one job, on the CPU or the GPU: per layer, keys
//! and values as rows `[num_blocks * block_size, kv_heads * head_dim]`
//! addressed through block tables, and attention over it with the sliding
//! window `i - W < j <= i` (W keys including the query itself).

use super::cpu::CpuKv;
use crate::kv::BlockId;
use crate::Result;
use candle_core::{Device, Tensor};

/// One sequence's part of a forward: tokens at positions
/// `start_pos..start_pos + tokens.len()`; the cache already holds positions
/// `0..start_pos` in the sequence's blocks, and the chunk's K/V are written
/// there too.
pub struct SeqChunk<'a> {
    /// Token ids of this chunk.
    pub tokens: &'a [u32],
    /// Position of the first token.
    pub start_pos: usize,
    /// The sequence's block table (covering at least `start_pos + tokens.len()`).
    pub blocks: &'a [BlockId],
}

/// Block tables for sequences of `lens` tokens run from an empty cache of
/// exactly their blocks: consecutive blocks, the first sequence's from 0
/// (at least one block each). Reference forwards and the profiling forward.
pub fn fresh_tables(lens: &[usize], block_size: usize) -> Vec<Vec<BlockId>> {
    let mut next = 0u32;
    lens.iter()
        .map(|l| {
            let n = l.div_ceil(block_size).max(1) as u32;
            let t = (next..next + n).map(BlockId).collect();
            next += n;
            t
        })
        .collect()
}

/// Sizes of a paged cache.
#[derive(Debug, Clone, Copy)]
pub struct KvShape {
    /// Layers.
    pub layers: usize,
    /// Blocks.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Keys and values as FP8 E4M3 with a scale per token and KV head.
    pub fp8: bool,
    /// The flash prefill kernel on CUDA.
    pub prefill_attention: crate::config::PrefillAttention,
}

/// The paged KV cache storage: per layer, keys and values as rows
/// `[num_blocks * block_size, kv_heads * head_dim]` addressed through block
/// tables; f32 on the CPU, f16 on CUDA.
#[derive(Debug)]
pub enum PagedKvCache {
    /// CPU storage.
    Cpu(CpuKv),
    /// GPU storage.
    Cuda(super::cuda::CudaKv),
}

/// One layer's attention input: the q/k/v projections ([T, heads*d],
/// [T, kv_heads*d] twice; rows contiguous, column slices of one fused
/// product allowed), the RoPE rows from `Ops::rope_rows` and the batch's
/// positions, the head counts and the sliding window.
pub struct AttnIn<'a> {
    /// q, k, v before RoPE.
    pub qkv: [&'a Tensor; 3],
    /// The RoPE rows (cos, sin) as `Ops::rope_rows` gave them.
    pub rope: (&'a Tensor, &'a Tensor),
    /// (heads, kv heads, head dim).
    pub dims: (usize, usize, usize),
    /// Sliding window (keys including the query's own).
    pub window: Option<usize>,
}

/// One forward's batch layout, built once and shared by every layer.
pub struct Batch {
    /// Position of every token of the batch [T] (u32).
    pub positions: Tensor,
    /// (start position, tokens, block table) per chunk.
    pub chunks: Vec<(usize, usize, Vec<BlockId>)>,
    /// GPU-only index tensors.
    pub gpu: Option<super::cuda::GpuBatch>,
}

impl PagedKvCache {
    /// Bytes per block across all layers (K and V) for `elem` bytes per value.
    pub fn bytes_per_block(
        layers: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        elem: usize,
    ) -> usize {
        2 * elem * layers * block_size * kv_heads * head_dim
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        match self {
            Self::Cpu(c) => c.block_size,
            Self::Cuda(c) => c.block_size(),
        }
    }

    /// Copies whole blocks in every layer (copy-on-write).
    pub fn copy_blocks(&mut self, copies: &[crate::kv::BlockCopy]) -> Result<()> {
        match self {
            Self::Cpu(c) => {
                for b in copies {
                    c.copy_block(b.from, b.to);
                }
                Ok(())
            }
            Self::Cuda(c) => c.copy_blocks(copies),
        }
    }

    /// The batch layout of a forward's chunks, built once for every layer.
    pub fn prepare(&self, chunks: &[SeqChunk<'_>], dev: &Device) -> Result<Batch> {
        let mut pos = Vec::new();
        for c in chunks {
            pos.extend((c.start_pos..c.start_pos + c.tokens.len()).map(|p| p as u32));
        }
        let t = pos.len();
        let chunks_info: Vec<(usize, usize, Vec<BlockId>)> = chunks
            .iter()
            .map(|c| (c.start_pos, c.tokens.len(), c.blocks.to_vec()))
            .collect();
        let gpu = match self {
            Self::Cuda(c) => Some(c.prepare(&chunks_info, dev)?),
            Self::Cpu(_) => None,
        };
        Ok(Batch {
            positions: Tensor::from_vec(pos, t, dev)?,
            chunks: chunks_info,
            gpu,
        })
    }

    /// RoPE over q and k, the cache write of k and v, then attention over
    /// the cache; returns [T, heads*d]. `t` is marked `rope` after the
    /// rotation and the cache write (one kernel on CUDA, which writes the
    /// rotated keys straight to their cache rows).
    pub fn rope_attention(
        &mut self,
        ops: &dyn super::Ops,
        layer: usize,
        batch: &Batch,
        a: &AttnIn<'_>,
        t: &mut super::timeline::Timeline,
    ) -> Result<Tensor> {
        let [q, k, v] = a.qkv;
        match self {
            Self::Cpu(c) => {
                let (q, k) = ops.rope(q, k, a.rope, &batch.positions, a.dims)?;
                t.mark("rope")?;
                c.attention(layer, &batch.chunks, &q, &k, v, a.window)
            }
            Self::Cuda(c) => {
                let b = batch
                    .gpu
                    .as_ref()
                    .expect("a CUDA cache prepares GPU batches");
                let q = c.rope_write(layer, b, a, &batch.positions)?;
                t.mark("rope")?;
                c.attend(layer, b, &q, a.window)
            }
        }
    }
}

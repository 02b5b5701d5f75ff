//! Rotary embeddings, the paged KV cache (CPU storage) and attention over
//! it, with the
//! sliding window `i - W < j <= i` (W keys including the query itself).

use crate::kv::BlockId;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// The paged KV cache storage: per layer, keys and values as rows
/// `[num_blocks * block_size, kv_heads * head_dim]` addressed through block
/// tables; f32 on the CPU, f16 on CUDA.
#[derive(Debug)]
pub enum PagedKvCache {
    /// CPU storage.
    Cpu(CpuKv),
    /// GPU storage.
    Cuda(crate::cuda::CudaKv),
}

/// One forward's batch layout, built once and shared by every layer.
pub(super) struct Batch {
    /// Position of every token of the batch [T] (u32).
    pub positions: Tensor,
    /// (start position, tokens, block table) per chunk.
    pub chunks: Vec<(usize, usize, Vec<BlockId>)>,
    /// GPU-only index tensors.
    pub gpu: Option<crate::cuda::GpuBatch>,
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

    /// Copies a whole block in every layer (copy-on-write).
    pub fn copy_block(&mut self, from: BlockId, to: BlockId) -> Result<()> {
        match self {
            Self::Cpu(c) => {
                c.copy_block(from, to);
                Ok(())
            }
            Self::Cuda(c) => c.copy_block(from, to),
        }
    }

    pub(super) fn prepare(&self, chunks: &[super::SeqChunk<'_>], dev: &Device) -> Result<Batch> {
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

    /// Writes the batch's k/v [T, kv_heads, d] and attends q [T, heads, d];
    /// returns [T, heads*d].
    pub(super) fn attention(
        &mut self,
        layer: usize,
        batch: &Batch,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window: Option<usize>,
    ) -> Result<Tensor> {
        match self {
            Self::Cpu(c) => {
                let mut outs = Vec::with_capacity(batch.chunks.len());
                let mut off = 0;
                for (start, n, blocks) in &batch.chunks {
                    let (qc, kc, vc) = (
                        q.narrow(0, off, *n)?,
                        k.narrow(0, off, *n)?,
                        v.narrow(0, off, *n)?,
                    );
                    c.write(layer, blocks, *start, &kc, &vc)?;
                    let (kall, vall) = c.gather(layer, blocks, start + n, q.device())?;
                    outs.push(attend(&qc, &kall, &vall, *start, window)?);
                    off += n;
                }
                Ok(Tensor::cat(&outs, 0)?)
            }
            Self::Cuda(c) => c.attention(
                layer,
                batch
                    .gpu
                    .as_ref()
                    .expect("a CUDA cache prepares GPU batches"),
                &batch.chunks,
                q,
                k,
                v,
                window,
            ),
        }
    }
}

/// The CPU storage: f32 rows per layer. (f16/bf16 K/V convert to f32 exactly.)
#[derive(Debug, Clone)]
pub struct CpuKv {
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl CpuKv {
    /// Zeroed storage for `num_blocks` blocks in each of `layers` layers.
    pub fn new(
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        let n = num_blocks * block_size * kv_heads * head_dim;
        Self {
            block_size,
            kv_heads,
            head_dim,
            layers: vec![(vec![0.0; n], vec![0.0; n]); layers],
        }
    }

    fn slot(&self, blocks: &[BlockId], pos: usize) -> Result<usize> {
        let b = blocks.get(pos / self.block_size).ok_or_else(|| {
            Error::Model(format!(
                "position {pos} has no block (the table holds {} blocks of {})",
                blocks.len(),
                self.block_size
            ))
        })?;
        Ok(b.0 as usize * self.block_size + pos % self.block_size)
    }

    /// Copies a whole block in every layer (copy-on-write).
    fn copy_block(&mut self, from: BlockId, to: BlockId) {
        let n = self.block_size * self.kv_heads * self.head_dim;
        let (f, t) = (from.0 as usize * n, to.0 as usize * n);
        for (k, v) in &mut self.layers {
            k.copy_within(f..f + n, t);
            v.copy_within(f..f + n, t);
        }
    }

    /// Writes k/v [n, kv_heads, head_dim] at positions `start..start+n`.
    pub(super) fn write(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let row = self.kv_heads * self.head_dim;
        let kf = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let vf = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..kf.len() / row {
            let s = self.slot(blocks, start + i)? * row;
            let (ks, vs) = &mut self.layers[layer];
            ks[s..s + row].copy_from_slice(&kf[i * row..(i + 1) * row]);
            vs[s..s + row].copy_from_slice(&vf[i * row..(i + 1) * row]);
        }
        Ok(())
    }

    /// Gathers positions `0..len` into contiguous k/v [len, kv_heads, head_dim].
    pub(super) fn gather(
        &self,
        layer: usize,
        blocks: &[BlockId],
        len: usize,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let row = self.kv_heads * self.head_dim;
        let mut k = Vec::with_capacity(len * row);
        let mut v = Vec::with_capacity(len * row);
        let (ks, vs) = &self.layers[layer];
        for p in 0..len {
            let s = self.slot(blocks, p)? * row;
            k.extend_from_slice(&ks[s..s + row]);
            v.extend_from_slice(&vs[s..s + row]);
        }
        let shape = (len, self.kv_heads, self.head_dim);
        Ok((
            Tensor::from_vec(k, shape, dev)?,
            Tensor::from_vec(v, shape, dev)?,
        ))
    }
}

/// cos/sin tables [positions, head_dim/2] (computed in f32, cast to the
/// compute dtype as HF does); rows are picked per token with the batch's
/// positions.
pub(super) fn rope_tables(
    positions: usize,
    head_dim: usize,
    theta: f64,
    dtype: DType,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut freqs = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for &f in &inv {
            freqs.push(p as f32 * f);
        }
    }
    let f = Tensor::from_vec(freqs, (positions, half), &Device::Cpu)?;
    Ok((
        f.cos()?.to_dtype(dtype)?.to_device(dev)?,
        f.sin()?.to_dtype(dtype)?.to_device(dev)?,
    ))
}

/// Rotate-half RoPE on x [n, heads, head_dim].
pub(super) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.transpose(0, 1)?.unsqueeze(0)?.contiguous()?; // [1, heads, n, d]
    let y = candle_nn::rotary_emb::rope(&x, cos, sin)?;
    Ok(y.squeeze(0)?.transpose(0, 1)?)
}

/// Attention of q [n, heads, d] (positions `start..start+n`) over all cached
/// k/v [L, kv_heads, d]; returns [n, heads*d] in q's dtype. Scores, softmax
/// and the weighted sum run in f32.
pub(super) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let (n, nh, d) = q.dims3()?;
    let (l, nkv, _) = k.dims3()?;
    let g = nh / nkv;
    let dtype = q.dtype();
    // [kv, g*n, d]: the g query heads of one kv head read its keys together.
    let qf = q
        .to_dtype(DType::F32)?
        .transpose(0, 1)?
        .reshape((nkv, g * n, d))?
        .contiguous()?;
    let kf = k.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?; // [kv, L, d]
    let vf = v.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (qf.matmul(&kf.t()?)? * scale)?; // [kv, g*n, L]
    let mut mask = vec![0f32; n * l];
    for t in 0..n {
        let i = start + t;
        for j in 0..l {
            let visible = j <= i && window.is_none_or(|w| j + w > i);
            if !visible {
                mask[t * l + j] = f32::NEG_INFINITY;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (1, 1, n, l), q.device())?;
    let scores = scores.reshape((nkv, g, n, l))?.broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((nkv, g * n, l))?;
    let out = probs.matmul(&vf)?; // [kv, g*n, d]
    Ok(out
        .reshape((nh, n, d))?
        .transpose(0, 1)?
        .reshape((n, nh * d))?
        .to_dtype(dtype)?)
}

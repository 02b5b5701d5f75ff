//! The CPU backend: candle's ops in HF's order (the reference the CUDA
//! kernels are tested against), the paged cache as f32 rows, attention over
//! it, and GPTQ layers dequantized exactly once for a dense product.

use super::cache::{KvShape, PagedKvCache};
use super::{LayerTarget, LinearWeight, Ops};
use crate::kv::BlockId;
use crate::quant::{fp8, GptqWeight, RandomGptq};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};

/// candle's CPU ops.
#[derive(Debug)]
pub struct CpuOps;

impl Ops for CpuOps {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn rmsnorm_add(
        &self,
        x: &Tensor,
        add: Option<&Tensor>,
        weight: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        let x = match add {
            Some(a) => (x + a)?,
            None => x.clone(),
        };
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
        Ok((normed.to_dtype(dtype)?.broadcast_mul(weight)?, x))
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        Ok((gate.silu()? * up)?)
    }

    fn rope_rows(
        &self,
        cos: &Tensor,
        sin: &Tensor,
        positions: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        Ok((
            cos.index_select(positions, 0)?,
            sin.index_select(positions, 0)?,
        ))
    }

    fn rope(
        &self,
        q: &Tensor,
        k: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        _positions: &Tensor,
        (heads, kv_heads, head_dim): (usize, usize, usize),
    ) -> Result<(Tensor, Tensor)> {
        let t = q.dim(0)?;
        let q = apply_rope(&q.reshape((t, heads, head_dim))?, cos, sin)?;
        let k = apply_rope(&k.reshape((t, kv_heads, head_dim))?, cos, sin)?;
        Ok((q.reshape((t, ()))?, k.reshape((t, ()))?))
    }

    fn kv_elem_bytes(&self) -> usize {
        4
    }

    fn device_top_k_max(&self) -> usize {
        0
    }

    fn top_k_candidates(&self, _: &Tensor, _: &[f32], _: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        Err(Error::Engine("the CPU backend samples on the host".into()))
    }

    fn penalize(&self, rows: &Tensor, seen: &[Vec<u32>], penalties: &[f32]) -> Result<Tensor> {
        let mut host = rows.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for ((row, s), &p) in host.iter_mut().zip(seen).zip(penalties) {
            crate::sampler::apply_repetition_penalty(row, s, p as f64);
        }
        let (r, v) = rows.dims2()?;
        Ok(Tensor::from_vec(host.concat(), (r, v), rows.device())?)
    }

    fn row_norms(&self, rows: &Tensor, temps: &[f32]) -> Result<Vec<(f32, f64)>> {
        let host = rows.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(host
            .iter()
            .zip(temps)
            .map(|(row, &t)| crate::sampler::row_norm(row, t))
            .collect())
    }

    fn draw(&self, rows: &Tensor, temps: &[f32], us: &[f64]) -> Result<Vec<Option<u32>>> {
        let host = rows.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(host
            .iter()
            .zip(temps)
            .zip(us)
            .map(|((row, &t), &u)| crate::sampler::draw_row(row, t, u))
            .collect())
    }

    fn peak_memory(&self, _: &Device) -> Option<usize> {
        None
    }

    fn new_cache(&self, s: &KvShape, _dev: &Device) -> Result<PagedKvCache> {
        Ok(PagedKvCache::Cpu(CpuKv::new(s)))
    }

    fn gptq(&self, g: &GptqWeight, at: &LayerTarget<'_>) -> Result<LinearWeight> {
        let (k, n) = (g.in_features, g.out_features);
        let w = Tensor::from_vec(g.dequantize_nk(), (n, k), &Device::Cpu)?;
        Ok(LinearWeight::Dense(
            w.to_dtype(at.dtype)?.to_device(at.device)?,
        ))
    }

    fn dummy_gptq(&self, spec: &RandomGptq, at: &LayerTarget<'_>) -> Result<LinearWeight> {
        self.gptq(&spec.build(), at)
    }

    fn random(
        &self,
        shape: &[usize],
        (lo, hi): (f32, f32),
        seed: u64,
        at: &LayerTarget<'_>,
    ) -> Result<Tensor> {
        // SplitMix64 from the seed: the same seed gives the same weights.
        let mut state = seed;
        let data: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                let u = ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32;
                lo + (hi - lo) * u
            })
            .collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?
            .to_dtype(at.dtype)?
            .to_device(at.device)?)
    }
}

/// The CPU storage: per layer, K and V rows of f32 (f16/bf16 K/V convert
/// to f32 exactly), or FP8 E4M3 codes with an f32 scale per token and KV
/// head (`crate::quant::fp8`).
#[derive(Debug, Clone)]
pub struct CpuKv {
    pub(super) block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    layers: Vec<[Rows; 2]>,
}

/// One layer's K or V storage, a row per cache slot.
#[derive(Debug, Clone)]
enum Rows {
    F32(Vec<f32>),
    /// Codes [slots * kv_heads * head_dim] and scales [slots * kv_heads].
    Fp8(Vec<u8>, Vec<f32>),
}

impl Rows {
    /// Stores slot `s`'s row (`kv_heads` rows of `d` values).
    fn put(&mut self, s: usize, row: &[f32], d: usize) {
        let n = row.len();
        match self {
            Rows::F32(v) => v[s * n..(s + 1) * n].copy_from_slice(row),
            Rows::Fp8(codes, scales) => {
                let h = n / d;
                for (j, head) in row.chunks_exact(d).enumerate() {
                    let c = &mut codes[(s * h + j) * d..(s * h + j + 1) * d];
                    scales[s * h + j] = fp8::quantize_row(head, c);
                }
            }
        }
    }

    /// Appends slot `s`'s row (`n` values, heads of `d`) to `out`.
    fn get(&self, s: usize, n: usize, d: usize, out: &mut Vec<f32>) {
        match self {
            Rows::F32(v) => out.extend_from_slice(&v[s * n..(s + 1) * n]),
            Rows::Fp8(codes, scales) => {
                let (h, at) = (n / d, out.len());
                out.resize(at + n, 0.0);
                for j in 0..h {
                    let c = &codes[(s * h + j) * d..(s * h + j + 1) * d];
                    fp8::dequantize_row(
                        c,
                        scales[s * h + j],
                        &mut out[at + j * d..at + (j + 1) * d],
                    );
                }
            }
        }
    }

    /// Copies `n` slots' rows (`row` values each, heads of `d`) from slot
    /// `f` to slot `t`.
    fn copy_slots(&mut self, f: usize, t: usize, n: usize, row: usize, d: usize) {
        match self {
            Rows::F32(v) => v.copy_within(f * row..(f + n) * row, t * row),
            Rows::Fp8(codes, scales) => {
                let h = row / d;
                codes.copy_within(f * row..(f + n) * row, t * row);
                scales.copy_within(f * h..(f + n) * h, t * h);
            }
        }
    }
}

impl CpuKv {
    /// Zeroed storage for the shape's blocks in each of its layers.
    pub fn new(s: &KvShape) -> Self {
        let slots = s.num_blocks * s.block_size;
        let n = slots * s.kv_heads * s.head_dim;
        let rows = || {
            if s.fp8 {
                Rows::Fp8(vec![0; n], vec![1.0; slots * s.kv_heads])
            } else {
                Rows::F32(vec![0.0; n])
            }
        };
        Self {
            block_size: s.block_size,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            layers: (0..s.layers).map(|_| [rows(), rows()]).collect(),
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
    pub(super) fn copy_block(&mut self, from: BlockId, to: BlockId) {
        let (row, d, bs) = (
            self.kv_heads * self.head_dim,
            self.head_dim,
            self.block_size,
        );
        let (f, t) = (from.0 as usize * bs, to.0 as usize * bs);
        for kv in &mut self.layers {
            for rows in kv.iter_mut() {
                rows.copy_slots(f, t, bs, row, d);
            }
        }
    }

    /// Writes k/v [n, kv_heads, head_dim] at positions `start..start+n`.
    fn write(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let (row, d) = (self.kv_heads * self.head_dim, self.head_dim);
        let kf = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let vf = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..kf.len() / row {
            let s = self.slot(blocks, start + i)?;
            let [ks, vs] = &mut self.layers[layer];
            ks.put(s, &kf[i * row..(i + 1) * row], d);
            vs.put(s, &vf[i * row..(i + 1) * row], d);
        }
        Ok(())
    }

    /// Gathers positions `0..len` into contiguous k/v [len, kv_heads, head_dim].
    fn gather(
        &self,
        layer: usize,
        blocks: &[BlockId],
        len: usize,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (row, d) = (self.kv_heads * self.head_dim, self.head_dim);
        let mut k = Vec::with_capacity(len * row);
        let mut v = Vec::with_capacity(len * row);
        let [ks, vs] = &self.layers[layer];
        for p in 0..len {
            let s = self.slot(blocks, p)?;
            ks.get(s, row, d, &mut k);
            vs.get(s, row, d, &mut v);
        }
        let shape = (len, self.kv_heads, self.head_dim);
        Ok((
            Tensor::from_vec(k, shape, dev)?,
            Tensor::from_vec(v, shape, dev)?,
        ))
    }
}

impl CpuKv {
    /// Writes each chunk's k/v [n, kv_heads*d] into its blocks and attends
    /// its q [n, heads*d] over positions `0..start + n`; [T, heads*d].
    pub(super) fn attention(
        &mut self,
        layer: usize,
        chunks: &[(usize, usize, Vec<BlockId>)],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let (t, d) = (q.dim(0)?, self.head_dim);
        let q = q.reshape((t, (), d))?;
        let k = k.reshape((t, self.kv_heads, d))?;
        let v = v.reshape((t, self.kv_heads, d))?;
        let mut outs = Vec::with_capacity(chunks.len());
        let mut off = 0;
        for (start, n, blocks) in chunks {
            let (qc, kc, vc) = (
                q.narrow(0, off, *n)?,
                k.narrow(0, off, *n)?,
                v.narrow(0, off, *n)?,
            );
            self.write(layer, blocks, *start, &kc, &vc)?;
            let (kall, vall) = self.gather(layer, blocks, start + n, q.device())?;
            outs.push(attend(&qc, &kall, &vall, *start, window)?);
            off += n;
        }
        Ok(Tensor::cat(&outs, 0)?)
    }
}

/// cos/sin tables [positions, head_dim/2] (computed in f32, cast to the
/// compute dtype as HF does); rows are picked per token with the batch's
/// positions.
pub fn rope_tables(
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
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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

//! Rotary embeddings and attention against a per-sequence cache, with the
//! sliding window `i - W < j <= i` (W keys including the query itself).

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// One sequence's keys and values per layer, [positions, kv_heads, head_dim].
#[derive(Debug, Clone)]
pub struct SeqKvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl SeqKvCache {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
        }
    }

    /// Positions cached (complete across all layers).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let slot = &mut self.layers[layer];
        *slot = Some(match slot.take() {
            None => (k.clone(), v.clone()),
            Some((ko, vo)) => (Tensor::cat(&[&ko, k], 0)?, Tensor::cat(&[&vo, v], 0)?),
        });
        Ok(())
    }

    pub(super) fn layer(&self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        self.layers[layer]
            .as_ref()
            .map(|(k, v)| (k, v))
            .ok_or_else(|| Error::Model(format!("kv cache of layer {layer} is empty")))
    }

    pub(super) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// cos/sin tables [n, head_dim/2] for positions `start..start+n` (computed in
/// f32, cast to the compute dtype as HF does).
pub(super) fn rope_tables(
    start: usize,
    n: usize,
    head_dim: usize,
    theta: f64,
    dtype: DType,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut freqs = Vec::with_capacity(n * half);
    for p in start..start + n {
        for &f in &inv {
            freqs.push(p as f32 * f);
        }
    }
    let f = Tensor::from_vec(freqs, (n, half), dev)?;
    Ok((f.cos()?.to_dtype(dtype)?, f.sin()?.to_dtype(dtype)?))
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

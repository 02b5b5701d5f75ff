//! The one Mistral implementation: RMSNorm, rotate-half RoPE, grouped-query
//! attention with the sliding window, SiLU-gated MLP, over pluggable linear
//! layers. A forward takes a batch of sequence chunks (prefill chunks and
//! single-token decodes mixed); linear layers see all tokens at once,
//! attention runs per sequence against its own cache.

mod attention;
mod config;

pub use attention::PagedKvCache;
pub use config::MistralConfig;

use super::checkpoint::Checkpoint;
use super::linear::{Linear, LinearSpec};
use super::quant::QuantConfig;
use crate::kv::BlockId;
use crate::Result;
use candle_core::{DType, Device, Tensor, D};

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

/// RMSNorm in HF order: normalise in f32, cast back, multiply by the weight.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A loaded Mistral model.
#[derive(Debug, Clone)]
pub struct Mistral {
    cfg: MistralConfig,
    quant: Option<QuantConfig>,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    dtype: DType,
    device: Device,
}

impl Mistral {
    /// Loads every tensor of a checkpoint, checking shapes against `cfg`.
    pub fn load(
        ck: &Checkpoint,
        cfg: &MistralConfig,
        quant: Option<&QuantConfig>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let qd = cfg.num_attention_heads * cfg.head_dim;
        let kvd = cfg.num_key_value_heads * cfg.head_dim;
        let norm = |name: String| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: ck.float(&name, &[h], dtype, device)?,
                eps: cfg.rms_norm_eps,
            })
        };
        let lin = |prefix: String, k: usize, n: usize| -> Result<Linear> {
            Linear::load(
                ck,
                &LinearSpec {
                    prefix: &prefix,
                    in_features: k,
                    out_features: n,
                    quant,
                    dtype,
                    device,
                },
            )
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_norm: norm(format!("{p}.input_layernorm.weight"))?,
                q: lin(format!("{p}.self_attn.q_proj"), h, qd)?,
                k: lin(format!("{p}.self_attn.k_proj"), h, kvd)?,
                v: lin(format!("{p}.self_attn.v_proj"), h, kvd)?,
                o: lin(format!("{p}.self_attn.o_proj"), qd, h)?,
                post_norm: norm(format!("{p}.post_attention_layernorm.weight"))?,
                gate: lin(format!("{p}.mlp.gate_proj"), h, cfg.intermediate_size)?,
                up: lin(format!("{p}.mlp.up_proj"), h, cfg.intermediate_size)?,
                down: lin(format!("{p}.mlp.down_proj"), cfg.intermediate_size, h)?,
            });
        }
        let embed = ck.float(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, h],
            dtype,
            device,
        )?;
        let lm_head = if cfg.tie_word_embeddings && !ck.contains("lm_head.weight") {
            Linear::dense(embed.clone())
        } else {
            Linear::dense(ck.float("lm_head.weight", &[cfg.vocab_size, h], dtype, device)?)
        };
        Ok(Self {
            cfg: cfg.clone(),
            quant: quant.cloned(),
            embed,
            layers,
            norm: norm("model.norm.weight".into())?,
            lm_head,
            dtype,
            device: device.clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &MistralConfig {
        &self.cfg
    }

    /// The quantization, `None` for dense checkpoints.
    pub fn quant(&self) -> Option<&QuantConfig> {
        self.quant.as_ref()
    }

    /// Empty paged storage for `num_blocks` blocks of `block_size` tokens.
    pub fn new_cache(&self, num_blocks: usize, block_size: usize) -> PagedKvCache {
        let c = &self.cfg;
        PagedKvCache::new(
            c.num_hidden_layers,
            num_blocks,
            block_size,
            c.num_key_value_heads,
            c.head_dim,
        )
    }

    /// Runs a mixed batch. Returns f32 logits: for each chunk's last token
    /// ([chunks, vocab]), or for every token when `all_logits` ([tokens, vocab]).
    pub fn forward(
        &self,
        chunks: &[SeqChunk<'_>],
        cache: &mut PagedKvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        let ids: Vec<u32> = chunks
            .iter()
            .flat_map(|c| c.tokens.iter().copied())
            .collect();
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x)?;
            let q = layer.q.forward(&h)?;
            let k = layer.k.forward(&h)?;
            let v = layer.v.forward(&h)?;
            let mut outs = Vec::with_capacity(chunks.len());
            let mut off = 0;
            for c in chunks.iter() {
                let n = c.tokens.len();
                let qc = q.narrow(0, off, n)?.reshape((n, nh, hd))?;
                let kc = k.narrow(0, off, n)?.reshape((n, nkv, hd))?;
                let vc = v.narrow(0, off, n)?.reshape((n, nkv, hd))?;
                let (cos, sin) = attention::rope_tables(
                    c.start_pos,
                    n,
                    hd,
                    self.cfg.rope_theta,
                    self.dtype,
                    &self.device,
                )?;
                let qc = attention::apply_rope(&qc, &cos, &sin)?;
                let kc = attention::apply_rope(&kc, &cos, &sin)?;
                cache.write(li, c.blocks, c.start_pos, &kc, &vc)?;
                let (kall, vall) = cache.gather(li, c.blocks, c.start_pos + n, &self.device)?;
                outs.push(attention::attend(
                    &qc,
                    &kall,
                    &vall,
                    c.start_pos,
                    self.cfg.sliding_window,
                )?);
                off += n;
            }
            let attn = Tensor::cat(&outs, 0)?;
            x = (x + layer.o.forward(&attn)?)?;
            let h = layer.post_norm.forward(&x)?;
            let act = (layer.gate.forward(&h)?.silu()? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&act)?)?;
        }
        let x = if all_logits {
            x
        } else {
            let mut last = Vec::with_capacity(chunks.len());
            let mut off = 0u32;
            for c in chunks.iter() {
                off += c.tokens.len() as u32;
                last.push(off - 1);
            }
            let n = last.len();
            x.index_select(&Tensor::from_vec(last, n, &self.device)?, 0)?
        };
        let h = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }

    /// f32 logits [tokens, vocab] for every position of one sequence run
    /// from an empty cache (reference comparisons, loglikelihood scoring).
    pub fn logits_full(&self, tokens: &[u32]) -> Result<Tensor> {
        let bs = 16;
        let n = tokens.len().div_ceil(bs).max(1);
        let mut cache = self.new_cache(n, bs);
        let blocks: Vec<BlockId> = (0..n as u32).map(BlockId).collect();
        let chunk = [SeqChunk {
            tokens,
            start_pos: 0,
            blocks: &blocks,
        }];
        self.forward(&chunk, &mut cache, true)
    }
}

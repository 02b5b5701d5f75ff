//! The one Mistral implementation: RMSNorm, rotate-half RoPE, grouped-query
//! attention with the sliding window, SiLU-gated MLP, over pluggable linear
//! layers. A forward takes a batch of sequence chunks (prefill chunks and
//! single-token decodes mixed); linear layers see all tokens at once,
//! attention runs per sequence against its own cache.

mod config;
mod graphs;
mod load;
mod probe;

pub use crate::backend::{PagedKvCache, SeqChunk};
pub use config::MistralConfig;
pub use graphs::DecodeGraphs;
pub use load::check_checkpoint;

use super::linear::{GptqMode, Linear, Proj};
use super::patch::IdPatch;
use crate::backend::timeline::Timeline;
use crate::backend::{AttnIn, KvShape, Ops};
use crate::config::PrefillAttention;
use crate::quant::QuantConfig;
use crate::Result;
use candle_core::{DType, Device, Tensor};

/// Which rows of a forward's batch get logits.
#[derive(Debug, Clone, Copy)]
pub enum LogitRows<'a> {
    /// Every token of every chunk (reference comparisons).
    All,
    /// The last token of each chunk.
    LastOfEachChunk,
    /// These rows of the flattened batch, in this order (the engine's
    /// sampling and scoring rows); only they go through the LM head.
    These(&'a [u32]),
}

/// How weights are placed and computed.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype.
    pub dtype: DType,
    /// Target device.
    pub device: Device,
    /// GPTQ kernel choice on CUDA.
    pub gptq_mode: GptqMode,
    /// Keys and values stored as FP8 E4M3 (`engine.kv_cache_dtype = "fp8"`).
    pub kv_fp8: bool,
    /// The flash prefill kernel on CUDA (`engine.prefill_attention`).
    pub prefill_attention: PrefillAttention,
}

impl LoadOptions {
    /// Defaults for a dtype and device.
    pub fn new(dtype: DType, device: &Device) -> Self {
        Self {
            dtype,
            device: device.clone(),
            gptq_mode: GptqMode::default(),
            kv_fp8: false,
            prefill_attention: PrefillAttention::default(),
        }
    }
}

/// RMSNorm in HF order: normalise in f32, cast back, multiply by the weight.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Returns (norm(x + add), x + add).
    fn add_forward(
        &self,
        ops: &dyn Ops,
        x: &Tensor,
        add: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        ops.rmsnorm_add(x, add, &self.weight, self.eps)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: RmsNorm,
    /// q, k, v (one product when the checkpoint allows).
    qkv: Proj,
    o: Linear,
    post_norm: RmsNorm,
    /// gate, up (likewise).
    gate_up: Proj,
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
    /// The backend's ops, chosen once at load.
    ops: &'static dyn Ops,
    /// RoPE tables [max_position_embeddings, head_dim/2].
    cos: Tensor,
    sin: Tensor,
    /// The cache stores FP8 E4M3 keys and values.
    kv_fp8: bool,
    /// The flash prefill kernel on CUDA.
    prefill_attention: PrefillAttention,
}

impl Mistral {
    /// The architecture.
    pub fn config(&self) -> &MistralConfig {
        &self.cfg
    }

    /// The quantization, `None` for dense checkpoints.
    pub fn quant(&self) -> Option<&QuantConfig> {
        self.quant.as_ref()
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The backend's ops.
    pub fn ops(&self) -> &'static dyn Ops {
        self.ops
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of K and V per cache block across all layers.
    pub fn kv_bytes_per_block(&self, block_size: usize) -> usize {
        let c = &self.cfg;
        // Bytes of one token's row of one KV head; FP8: a byte per value
        // and the row's f32 scale.
        let head_row = if self.kv_fp8 {
            c.head_dim + 4
        } else {
            c.head_dim * self.ops.kv_elem_bytes()
        };
        PagedKvCache::bytes_per_block(
            c.num_hidden_layers,
            block_size,
            c.num_key_value_heads,
            head_row,
            1,
        )
    }

    /// Empty paged storage for `num_blocks` blocks of `block_size` tokens.
    pub fn new_cache(&self, num_blocks: usize, block_size: usize) -> Result<PagedKvCache> {
        let c = &self.cfg;
        let shape = KvShape {
            layers: c.num_hidden_layers,
            num_blocks,
            block_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            fp8: self.kv_fp8,
            prefill_attention: self.prefill_attention,
        };
        self.ops.new_cache(&shape, &self.device)
    }

    /// Runs a mixed batch. Returns f32 logits of the rows `rows` names
    /// (`[rows, vocab]`).
    pub fn forward(
        &self,
        chunks: &[SeqChunk<'_>],
        cache: &mut PagedKvCache,
        rows: LogitRows<'_>,
    ) -> Result<Tensor> {
        self.forward_timed(chunks, cache, rows, None, &mut Timeline::off())
    }

    /// [`Self::forward`], marking the end of each kernel class on `t`:
    /// `batch` (block tables, embedding, RoPE rows), per layer `norm`
    /// (RMSNorm with the residual add), `gemm_qkv`, `rope`, `attention`
    /// (the cache write and attention), `gemm_o`, `gemm_gate_up`,
    /// `silu_mul`, `gemm_down`, then `logits` (row pick, final norm, LM
    /// head). `patch` names the rows whose token is still on the device.
    pub fn forward_timed(
        &self,
        chunks: &[SeqChunk<'_>],
        cache: &mut PagedKvCache,
        rows: LogitRows<'_>,
        patch: Option<&IdPatch>,
        t: &mut Timeline,
    ) -> Result<Tensor> {
        let (batch, ids) = self.inputs(chunks, cache, patch)?;
        self.compute(chunks, (&batch, &ids), cache, rows, t)
    }

    /// A step's inputs on the device: the batch (positions, block tables)
    /// and the embedding rows of its token ids (`patch` applied). The
    /// lookup is here, not in [`Self::compute`]: candle's `index_select`
    /// copies its shape from host memory, which a CUDA graph cannot hold.
    fn inputs(
        &self,
        chunks: &[SeqChunk<'_>],
        cache: &PagedKvCache,
        patch: Option<&IdPatch>,
    ) -> Result<(crate::backend::Batch, Tensor)> {
        let batch = cache.prepare(chunks, &self.device)?;
        let ids: Vec<u32> = chunks
            .iter()
            .flat_map(|c| c.tokens.iter().copied())
            .collect();
        let total = ids.len();
        let mut ids = Tensor::from_vec(ids, total, &self.device)?;
        if let Some(p) = patch {
            ids = p.apply(&ids)?;
        }
        Ok((batch, self.embed.index_select(&ids, 0)?))
    }

    /// The forward over a step's prepared inputs (batch, embedding rows
    /// `x0`). Where `rows`
    /// are every row in order (a decode step) it copies nothing from the
    /// host, so a CUDA graph can capture it (`probe.rs`).
    fn compute(
        &self,
        chunks: &[SeqChunk<'_>],
        (batch, x0): (&crate::backend::Batch, &Tensor),
        cache: &mut PagedKvCache,
        rows: LogitRows<'_>,
        t: &mut Timeline,
    ) -> Result<Tensor> {
        let mut x = x0.clone();
        let rope = self.ops.rope_rows(&self.cos, &self.sin, &batch.positions)?;
        t.mark("batch")?;
        let mut pending: Option<Tensor> = None; // the MLP output not yet added to x
        for (li, layer) in self.layers.iter().enumerate() {
            let (h, xr) = layer
                .input_norm
                .add_forward(self.ops, &x, pending.as_ref())?;
            x = xr;
            t.mark("norm")?;
            let attn = self.attention(layer, li, &h, batch, (&rope.0, &rope.1), cache, t)?;
            let o = layer.o.forward(&attn)?;
            t.mark("gemm_o")?;
            let (h, xr) = layer.post_norm.add_forward(self.ops, &x, Some(&o))?;
            x = xr;
            t.mark("norm")?;
            let gu = layer.gate_up.forward(&h)?;
            t.mark("gemm_gate_up")?;
            let act = self.ops.silu_mul(&gu[0], &gu[1])?;
            t.mark("silu_mul")?;
            pending = Some(layer.down.forward(&act)?);
            t.mark("gemm_down")?;
        }
        let logits = self.logits(chunks, x, pending, rows)?;
        t.mark("logits")?;
        Ok(logits)
    }

    /// One layer's attention block: q/k/v, RoPE, the cache write and
    /// attention over the cache; [T, heads*d].
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        li: usize,
        h: &Tensor,
        batch: &crate::backend::Batch,
        rope: (&Tensor, &Tensor),
        cache: &mut PagedKvCache,
        t: &mut Timeline,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let qkv = layer.qkv.forward(h)?;
        t.mark("gemm_qkv")?;
        let input = AttnIn {
            qkv: [&qkv[0], &qkv[1], &qkv[2]],
            rope,
            dims: (nh, nkv, hd),
            window: c.sliding_window,
        };
        let out = cache.rope_attention(self.ops, li, batch, &input, t)?;
        t.mark("attention")?;
        Ok(out)
    }

    /// The final norm and the LM head over the rows `rows` names; f32.
    fn logits(
        &self,
        chunks: &[SeqChunk<'_>],
        x: Tensor,
        pending: Option<Tensor>,
        rows: LogitRows<'_>,
    ) -> Result<Tensor> {
        let pick = match rows {
            LogitRows::All => None,
            LogitRows::LastOfEachChunk => Some(
                chunks
                    .iter()
                    .scan(0u32, |off, c| {
                        *off += c.tokens.len() as u32;
                        Some(*off - 1)
                    })
                    .collect::<Vec<u32>>(),
            ),
            LogitRows::These(r) => Some(r.to_vec()),
        };
        // Every row in order (a decode-only step): nothing to pick.
        let all =
            |p: &[u32]| p.len() == x.dim(0).unwrap_or(0) && p.iter().zip(0..).all(|(&r, i)| r == i);
        let (x, pending) = match pick {
            Some(p) if all(&p) => (x, pending),
            None => (x, pending),
            Some(pick) => {
                let n = pick.len();
                let idx = Tensor::from_vec(pick, n, &self.device)?;
                let p = pending.map(|p| p.index_select(&idx, 0)).transpose()?;
                (x.index_select(&idx, 0)?, p)
            }
        };
        let (h, _) = self.norm.add_forward(self.ops, &x, pending.as_ref())?;
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }

    /// f32 logits [tokens, vocab] for every position of one sequence run
    /// from an empty cache (reference comparisons, loglikelihood scoring).
    pub fn logits_full(&self, tokens: &[u32]) -> Result<Tensor> {
        self.logits_full_batch(&[tokens])
    }

    /// f32 logits for every position of several sequences run together in
    /// one forward from an empty cache: [sum of lengths, vocab], the
    /// sequences' rows in order.
    pub fn logits_full_batch(&self, seqs: &[&[u32]]) -> Result<Tensor> {
        let bs = 16;
        let lens: Vec<usize> = seqs.iter().map(|t| t.len()).collect();
        let blocks = crate::backend::fresh_tables(&lens, bs);
        let mut cache = self.new_cache(blocks.iter().map(Vec::len).sum(), bs)?;
        let chunks: Vec<SeqChunk<'_>> = seqs
            .iter()
            .zip(&blocks)
            .map(|(tokens, blocks)| SeqChunk {
                tokens,
                start_pos: 0,
                blocks,
            })
            .collect();
        self.forward(&chunks, &mut cache, LogitRows::All)
    }
}

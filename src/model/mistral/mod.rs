//! The one Mistral implementation: RMSNorm, rotate-half RoPE, grouped-query
//! attention with the sliding window, SiLU-gated MLP, over pluggable linear
//! layers. A forward takes a batch of sequence chunks (prefill chunks and
//! single-token decodes mixed); linear layers see all tokens at once,
//! attention runs per sequence against its own cache.

mod config;
mod graphs;
mod probe;

pub use crate::backend::{PagedKvCache, SeqChunk};
pub use config::MistralConfig;
pub use graphs::DecodeGraphs;

use super::checkpoint::Checkpoint;
use super::linear::{GptqMode, Linear, LinearSpec, Proj, RandomGptq};
use super::patch::IdPatch;
use crate::backend::timeline::Timeline;
use crate::backend::{AttnIn, KvShape, LayerTarget, Ops};
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

/// Where weights come from: a checkpoint, or random values of the exact
/// shapes and quantization (`load_format = "dummy"`, for benchmarks).
enum Source<'a> {
    Checkpoint(&'a Checkpoint),
    Dummy { seed: u64 },
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
    /// Loads every tensor of a checkpoint, checking shapes against `cfg`.
    pub fn load(
        ck: &Checkpoint,
        cfg: &MistralConfig,
        quant: Option<&QuantConfig>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        Self::build(&Source::Checkpoint(ck), cfg, quant, opts)
    }

    /// Random weights with the exact shapes and quantization of `cfg` and
    /// `quant`, generated on the device (no files read).
    pub fn dummy(
        cfg: &MistralConfig,
        quant: Option<&QuantConfig>,
        opts: &LoadOptions,
        seed: u64,
    ) -> Result<Self> {
        Self::build(&Source::Dummy { seed }, cfg, quant, opts)
    }

    fn build(
        src: &Source<'_>,
        cfg: &MistralConfig,
        quant: Option<&QuantConfig>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let (dtype, device) = (opts.dtype, &opts.device);
        let ops = crate::backend::ops_for(device, dtype)?;
        let at = |name: &'static str| LayerTarget {
            name,
            dtype,
            device,
            mode: opts.gptq_mode,
        };
        let h = cfg.hidden_size;
        let counter = std::cell::Cell::new(0u64);
        let next_seed = |base: u64| {
            counter.set(counter.get() + 1);
            base.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ counter.get()
        };
        let float = |name: &str, shape: &[usize], lo: f32, hi: f32| -> Result<Tensor> {
            match src {
                Source::Checkpoint(ck) => ck.float(name, shape, dtype, device),
                Source::Dummy { seed } => {
                    ops.random(shape, (lo, hi), next_seed(*seed), &at("dummy"))
                }
            }
        };
        let norm = |name: String| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: float(&name, &[h], 0.9, 1.1)?,
                eps: cfg.rms_norm_eps,
            })
        };
        let base = LinearSpec {
            prefix: "",
            in_features: 0,
            out_features: 0,
            quant,
            dtype,
            device,
            mode: opts.gptq_mode,
            ops,
        };
        let lin = |prefix: String, k: usize, n: usize| -> Result<Linear> {
            let spec = LinearSpec {
                prefix: &prefix,
                in_features: k,
                out_features: n,
                ..base
            };
            match (src, quant) {
                (Source::Checkpoint(ck), _) => Linear::load(ck, &spec),
                // Uniform in +-sqrt(3/k): standard deviation 1/sqrt(k), so the
                // activations keep their scale (finite logits in f16).
                (Source::Dummy { seed }, None) => {
                    let a = (3.0 / k.max(1) as f32).sqrt();
                    Ok(Linear::dense(ops.random(
                        &[n, k],
                        (-a, a),
                        next_seed(*seed),
                        &at("dummy"),
                    )?))
                }
                (Source::Dummy { seed }, Some(q)) => dummy_gptq(&spec, q, next_seed(*seed)),
            }
        };
        // Layers sharing an input: one product when the checkpoint allows
        // (dummy weights: always, as GPTQ's shared act-order would give),
        // on the devices where that is faster (`Proj::fuses_on`).
        let proj = |p: &str, parts: &[(&str, usize, usize)]| -> Result<Proj> {
            let names: Vec<String> = parts.iter().map(|(nm, _, _)| format!("{p}.{nm}")).collect();
            let specs: Vec<LinearSpec<'_>> = names
                .iter()
                .zip(parts)
                .map(|(name, &(_, k, n))| LinearSpec {
                    prefix: name,
                    in_features: k,
                    out_features: n,
                    ..base
                })
                .collect();
            match src {
                Source::Checkpoint(ck) => Proj::load(ck, &specs),
                Source::Dummy { .. } if Proj::fuses_on(device) => {
                    let widths: Vec<usize> = parts.iter().map(|&(_, _, n)| n).collect();
                    let fused = lin(names.join("+"), parts[0].1, widths.iter().sum())?;
                    Ok(Proj::Fused(fused, widths))
                }
                Source::Dummy { .. } => Ok(Proj::Split(
                    parts
                        .iter()
                        .map(|&(nm, k, n)| lin(format!("{p}.{nm}"), k, n))
                        .collect::<Result<Vec<_>>>()?,
                )),
            }
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let shapes = linear_shapes(cfg);
            let (o, down) = (shapes[3], shapes[6]);
            layers.push(Layer {
                input_norm: norm(format!("{p}.input_layernorm.weight"))?,
                qkv: proj(&p, &shapes[0..3])?,
                o: lin(format!("{p}.{}", o.0), o.1, o.2)?,
                post_norm: norm(format!("{p}.post_attention_layernorm.weight"))?,
                gate_up: proj(&p, &shapes[4..6])?,
                down: lin(format!("{p}.{}", down.0), down.1, down.2)?,
            });
        }
        let embed = float(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, h],
            -0.05,
            0.05,
        )?;
        let has_head = match src {
            Source::Checkpoint(ck) => ck.contains("lm_head.weight"),
            Source::Dummy { .. } => true,
        };
        let lm_head = if cfg.tie_word_embeddings && !has_head {
            Linear::dense(embed.clone())
        } else {
            Linear::dense(float("lm_head.weight", &[cfg.vocab_size, h], -0.05, 0.05)?)
        };
        let (cos, sin) = crate::backend::rope_tables(
            cfg.max_position_embeddings,
            cfg.head_dim,
            cfg.rope_theta,
            dtype,
            device,
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            quant: quant.cloned(),
            embed,
            layers,
            norm: norm("model.norm.weight".into())?,
            lm_head,
            dtype,
            device: device.clone(),
            ops,
            cos,
            sin,
            kv_fp8: opts.kv_fp8,
            prefill_attention: opts.prefill_attention,
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

/// A decoder layer's linear layers: (name under `model.layers.N.`, in, out),
/// in the order q, k, v, o, gate, up, down.
fn linear_shapes(cfg: &MistralConfig) -> [(&'static str, usize, usize); 7] {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let qd = cfg.num_attention_heads * cfg.head_dim;
    let kvd = cfg.num_key_value_heads * cfg.head_dim;
    [
        ("self_attn.q_proj", h, qd),
        ("self_attn.k_proj", h, kvd),
        ("self_attn.v_proj", h, kvd),
        ("self_attn.o_proj", qd, h),
        ("mlp.gate_proj", h, i),
        ("mlp.up_proj", h, i),
        ("mlp.down_proj", i, h),
    ]
}

/// Checks every tensor's name, shape and dtype against the architecture
/// and quantization without reading weights (`runner validate`).
pub fn check_checkpoint(
    ck: &Checkpoint,
    cfg: &MistralConfig,
    quant: Option<&QuantConfig>,
) -> Result<()> {
    use safetensors::Dtype;
    let h = cfg.hidden_size;
    let floats = [Dtype::F16, Dtype::BF16, Dtype::F32];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        ck.check(&format!("{p}.input_layernorm.weight"), &[h], &floats)?;
        ck.check(
            &format!("{p}.post_attention_layernorm.weight"),
            &[h],
            &floats,
        )?;
        for (name, k, n) in linear_shapes(cfg) {
            let prefix = format!("{p}.{name}");
            match quant {
                None => ck.check(&format!("{prefix}.weight"), &[n, k], &floats)?,
                Some(q) => super::linear::GptqWeight::check(ck, &prefix, k, n, q)?,
            }
        }
    }
    ck.check("model.embed_tokens.weight", &[cfg.vocab_size, h], &floats)?;
    ck.check("model.norm.weight", &[h], &floats)?;
    if !cfg.tie_word_embeddings || ck.contains("lm_head.weight") {
        ck.check("lm_head.weight", &[cfg.vocab_size, h], &floats)?;
    }
    Ok(())
}

/// A random GPTQ layer of the spec's shape and quantization.
fn dummy_gptq(spec: &LinearSpec<'_>, q: &QuantConfig, seed: u64) -> Result<Linear> {
    let shape = RandomGptq {
        bits: q.bits,
        group_size: q.group_size,
        k: spec.in_features,
        n: spec.out_features,
        act_order: q.desc_act,
        seed,
    };
    Ok(Linear::from_weight(
        spec.ops.dummy_gptq(&shape, &spec.target())?,
    ))
}

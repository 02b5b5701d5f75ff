//! Building a [`Mistral`]: every tensor from a checkpoint (shapes checked
//! against the architecture) or random weights of the exact shapes and
//! quantization (`load_format = "dummy"`), and the checkpoint check of
//! `runner validate`.

use super::{Layer, LoadOptions, Mistral, MistralConfig, RmsNorm};
use crate::backend::LayerTarget;
use crate::model::checkpoint::Checkpoint;
use crate::model::linear::{GptqWeight, Linear, LinearSpec, Proj, RandomGptq};
use crate::quant::QuantConfig;
use crate::Result;
use candle_core::Tensor;

/// Where weights come from: a checkpoint, or random values of the exact
/// shapes and quantization (`load_format = "dummy"`, for benchmarks).
enum Source<'a> {
    Checkpoint(&'a Checkpoint),
    Dummy { seed: u64 },
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
        let ops = crate::backend::ops_for(&opts.device, opts.dtype)?;
        let b = Builder {
            src,
            cfg,
            quant,
            opts,
            ops,
            drawn: std::cell::Cell::new(0),
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| b.layer(i))
            .collect::<Result<Vec<_>>>()?;
        let h = cfg.hidden_size;
        let embed = b.float("model.embed_tokens.weight", &[cfg.vocab_size, h], 0.05)?;
        let has_head = match src {
            Source::Checkpoint(ck) => ck.contains("lm_head.weight"),
            Source::Dummy { .. } => true,
        };
        let head = if cfg.tie_word_embeddings && !has_head {
            embed.clone()
        } else {
            b.float("lm_head.weight", &[cfg.vocab_size, h], 0.05)?
        };
        let lm_head = Linear::dense_on(head, ops, &b.target())?;
        let norm = b.norm("model.norm.weight")?;
        let (cos, sin) = crate::backend::rope_tables(
            cfg.max_position_embeddings,
            cfg.head_dim,
            cfg.rope_theta,
            opts.dtype,
            &opts.device,
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            quant: quant.cloned(),
            embed,
            layers,
            norm,
            lm_head,
            dtype: opts.dtype,
            device: opts.device.clone(),
            ops,
            cos,
            sin,
            kv_fp8: opts.kv_fp8,
            prefill_attention: opts.prefill_attention,
        })
    }
}

/// One model's tensors as [`Mistral::build`] takes them, in a fixed order
/// (dummy weights draw one seed per tensor, so the order is the values').
struct Builder<'a> {
    src: &'a Source<'a>,
    cfg: &'a MistralConfig,
    quant: Option<&'a QuantConfig>,
    opts: &'a LoadOptions,
    ops: &'static dyn crate::backend::Ops,
    /// Dummy tensors drawn so far.
    drawn: std::cell::Cell<u64>,
}

impl Builder<'_> {
    fn target(&self) -> LayerTarget<'_> {
        LayerTarget {
            name: "dummy",
            dtype: self.opts.dtype,
            device: &self.opts.device,
            mode: self.opts.gptq_mode,
        }
    }

    /// The next dummy tensor's seed.
    fn seed(&self, base: u64) -> u64 {
        self.drawn.set(self.drawn.get() + 1);
        base.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.drawn.get()
    }

    /// A float tensor; dummy values uniform in `center -+ spread`
    /// (center 0, or 1 for norm weights).
    fn float_around(
        &self,
        name: &str,
        shape: &[usize],
        center: f32,
        spread: f32,
    ) -> Result<Tensor> {
        match self.src {
            Source::Checkpoint(ck) => ck.float(name, shape, self.opts.dtype, &self.opts.device),
            Source::Dummy { seed } => {
                let range = (center - spread, center + spread);
                self.ops
                    .random(shape, range, self.seed(*seed), &self.target())
            }
        }
    }

    fn float(&self, name: &str, shape: &[usize], spread: f32) -> Result<Tensor> {
        self.float_around(name, shape, 0.0, spread)
    }

    fn norm(&self, name: &str) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: self.float_around(name, &[self.cfg.hidden_size], 1.0, 0.1)?,
            eps: self.cfg.rms_norm_eps,
        })
    }

    fn spec<'s>(&'s self, prefix: &'s str, k: usize, n: usize) -> LinearSpec<'s> {
        LinearSpec {
            prefix,
            in_features: k,
            out_features: n,
            quant: self.quant,
            dtype: self.opts.dtype,
            device: &self.opts.device,
            mode: self.opts.gptq_mode,
            ops: self.ops,
        }
    }

    fn lin(&self, prefix: &str, k: usize, n: usize) -> Result<Linear> {
        let spec = self.spec(prefix, k, n);
        match (self.src, self.quant) {
            (Source::Checkpoint(ck), _) => Linear::load(ck, &spec),
            // Uniform in +-sqrt(3/k): standard deviation 1/sqrt(k), so the
            // activations keep their scale (finite logits in f16).
            (Source::Dummy { seed }, None) => {
                let a = (3.0 / k.max(1) as f32).sqrt();
                let w = self
                    .ops
                    .random(&[n, k], (-a, a), self.seed(*seed), &self.target())?;
                Linear::dense_on(w, self.ops, &self.target())
            }
            (Source::Dummy { seed }, Some(q)) => dummy_gptq(&spec, q, self.seed(*seed)),
        }
    }

    /// Layers sharing an input: one product when the checkpoint allows
    /// (dummy weights: always, as GPTQ's shared act-order would give), on
    /// the devices where that is faster (`Proj::fuses_on`).
    fn proj(&self, p: &str, parts: &[(&str, usize, usize)]) -> Result<Proj> {
        let names: Vec<String> = parts.iter().map(|(nm, _, _)| format!("{p}.{nm}")).collect();
        match self.src {
            Source::Checkpoint(ck) => {
                let specs: Vec<LinearSpec<'_>> = names
                    .iter()
                    .zip(parts)
                    .map(|(name, &(_, k, n))| self.spec(name, k, n))
                    .collect();
                Proj::load(ck, &specs)
            }
            Source::Dummy { .. } if Proj::fuses_on(&self.opts.device) => {
                let widths: Vec<usize> = parts.iter().map(|&(_, _, n)| n).collect();
                let fused = self.lin(&names.join("+"), parts[0].1, widths.iter().sum())?;
                Ok(Proj::Fused(fused, widths))
            }
            Source::Dummy { .. } => Ok(Proj::Split(
                names
                    .iter()
                    .zip(parts)
                    .map(|(name, &(_, k, n))| self.lin(name, k, n))
                    .collect::<Result<Vec<_>>>()?,
            )),
        }
    }

    fn layer(&self, i: usize) -> Result<Layer> {
        let p = format!("model.layers.{i}");
        let shapes = linear_shapes(self.cfg);
        let (o, down) = (shapes[3], shapes[6]);
        Ok(Layer {
            input_norm: self.norm(&format!("{p}.input_layernorm.weight"))?,
            qkv: self.proj(&p, &shapes[0..3])?,
            o: self.lin(&format!("{p}.{}", o.0), o.1, o.2)?,
            post_norm: self.norm(&format!("{p}.post_attention_layernorm.weight"))?,
            gate_up: self.proj(&p, &shapes[4..6])?,
            down: self.lin(&format!("{p}.{}", down.0), down.1, down.2)?,
        })
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
                Some(q) => GptqWeight::check(ck, &prefix, k, n, q)?,
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

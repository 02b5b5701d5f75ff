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

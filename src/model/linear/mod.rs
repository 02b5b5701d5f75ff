//! The pluggable linear layer: dense (f16/bf16/f32 checkpoints) or GPTQ.
//!
//! On the CPU backend a GPTQ layer is dequantized exactly once at load
//! ([`GptqWeight::dequantize_nk`]) and multiplied densely: clear before
//! clever, and the oracle for the CUDA kernels.

mod load;

pub use crate::quant::{GptqMode, GptqWeight, RandomGptq, TiledGptq};

use super::checkpoint::Checkpoint;
use crate::backend::{LayerTarget, LinearWeight, Ops};
use crate::quant::QuantConfig;
use crate::Result;
use candle_core::{DType, Device, Tensor};

/// `y = x W^T` with W [out, in], in the form the backend multiplies.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
}

/// What a loader needs to build one layer.
#[derive(Clone, Copy)]
pub struct LinearSpec<'a> {
    /// Tensor name prefix, e.g. `model.layers.0.self_attn.q_proj`.
    pub prefix: &'a str,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// GPTQ quantization, `None` for dense.
    pub quant: Option<&'a QuantConfig>,
    /// Compute dtype.
    pub dtype: DType,
    /// Target device.
    pub device: &'a Device,
    /// GPTQ kernel choice on CUDA.
    pub mode: GptqMode,
    /// The backend's ops (how GPTQ weights are placed).
    pub ops: &'static dyn Ops,
}

impl LinearSpec<'_> {
    /// Where the layer's weights go.
    pub fn target(&self) -> LayerTarget<'_> {
        LayerTarget {
            name: self.prefix,
            dtype: self.dtype,
            device: self.device,
            mode: self.mode,
        }
    }
}

/// Layers that share an input (q/k/v, gate/up): one product when they can
/// be fused, whose output columns are the parts' outputs side by side.
#[derive(Debug, Clone)]
pub enum Proj {
    /// One layer; the parts' output widths.
    Fused(Linear, Vec<usize>),
    /// The parts as separate layers.
    Split(Vec<Linear>),
}

impl Proj {
    /// Whether layers sharing an input are fused on `device`: everywhere.
    /// The parts of the fused output are column slices that the consumers
    /// (RoPE, the cache write, SiLU-mul) read in place; the first CUDA
    /// attempt split it by strided copies and measured slower (W1 on an
    /// H100: 12,177 against 15,323 output tok/s, BENCHMARKS.md).
    pub fn fuses_on(_device: &Device) -> bool {
        true
    }

    /// Loads the layers of `specs` (same input size) from a checkpoint,
    /// checking every tensor's shape. Where [`Proj::fuses_on`] the device,
    /// dense weights are always fused and GPTQ ones when
    /// [`GptqWeight::concat_n`] can join them.
    pub fn load(ck: &Checkpoint, specs: &[LinearSpec<'_>]) -> Result<Self> {
        let widths: Vec<usize> = specs.iter().map(|s| s.out_features).collect();
        let Some(first) = specs.first() else {
            return Ok(Self::Split(Vec::new()));
        };
        if !Self::fuses_on(first.device) {
            return Ok(Self::Split(
                specs
                    .iter()
                    .map(|s| Linear::load(ck, s))
                    .collect::<Result<Vec<_>>>()?,
            ));
        }
        let name = specs.iter().map(|s| s.prefix).collect::<Vec<_>>().join("+");
        let fused_spec = LinearSpec {
            prefix: &name,
            out_features: widths.iter().sum(),
            ..*first
        };
        match first.quant {
            None => {
                let parts = specs
                    .iter()
                    .map(|s| {
                        ck.float(
                            &format!("{}.weight", s.prefix),
                            &[s.out_features, s.in_features],
                            s.dtype,
                            s.device,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                let w = Tensor::cat(&parts, 0)?;
                let at = fused_spec.target();
                Ok(Self::Fused(Linear::dense_on(w, first.ops, &at)?, widths))
            }
            Some(q) => {
                let parts = specs
                    .iter()
                    .map(|s| GptqWeight::load(ck, s.prefix, s.in_features, s.out_features, q))
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<&GptqWeight> = parts.iter().collect();
                match GptqWeight::concat_n(&refs) {
                    Some(w) => Ok(Self::Fused(Linear::from_gptq(w, &fused_spec)?, widths)),
                    None => Ok(Self::Split(
                        parts
                            .into_iter()
                            .zip(specs)
                            .map(|(w, s)| Linear::from_gptq(w, s))
                            .collect::<Result<Vec<_>>>()?,
                    )),
                }
            }
        }
    }

    /// The parts' outputs for x [T, in], each [T, width] with contiguous
    /// rows: fused, they are column slices of the one output (no copy).
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Split(layers) => layers.iter().map(|l| l.forward(x)).collect(),
            Self::Fused(layer, widths) => {
                let y = layer.forward(x)?;
                let mut off = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(1, off, w)?;
                        off += w;
                        Ok(part)
                    })
                    .collect()
            }
        }
    }
}

impl Linear {
    /// Loads a layer from a checkpoint, checking every tensor's shape.
    pub fn load(ck: &Checkpoint, spec: &LinearSpec<'_>) -> Result<Self> {
        let (k, n) = (spec.in_features, spec.out_features);
        match spec.quant {
            None => {
                let weight = ck.float(
                    &format!("{}.weight", spec.prefix),
                    &[n, k],
                    spec.dtype,
                    spec.device,
                )?;
                Self::dense_on(weight, spec.ops, &spec.target())
            }
            Some(q) => {
                let g = GptqWeight::load(ck, spec.prefix, k, n, q)?;
                Self::from_gptq(g, spec)
            }
        }
    }

    /// Wraps a GPTQ weight in the backend's form: repacked for the kernels
    /// on CUDA, dequantized exactly for the dense CPU product (the packed
    /// weight is not kept).
    pub fn from_gptq(g: GptqWeight, spec: &LinearSpec<'_>) -> Result<Self> {
        Ok(Self {
            weight: spec.ops.gptq(&g, &spec.target())?,
        })
    }

    /// Wraps a weight the backend made.
    pub fn from_weight(weight: LinearWeight) -> Self {
        Self { weight }
    }

    /// Wraps a dense [out, in] weight in the backend's form for `at`
    /// (batch-invariant products on CUDA in a `fused` job).
    pub fn dense_on(weight: Tensor, ops: &dyn Ops, at: &LayerTarget<'_>) -> Result<Self> {
        Ok(Self {
            weight: ops.dense(weight, at)?,
        })
    }

    /// Applies the layer to x [T, in] -> [T, out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.forward(x)
    }
}

//! The pluggable linear layer: dense (f16/bf16/f32 checkpoints) or GPTQ.
//!
//! On the CPU backend a GPTQ layer is dequantized exactly once at load
//! ([`GptqWeight::dequantize_nk`]) and multiplied densely: clear before
//! clever, and the oracle for the CUDA kernels.

pub mod gptq;

pub use gptq::GptqWeight;

use super::checkpoint::Checkpoint;
use super::quant::QuantConfig;
use crate::Result;
use candle_core::{DType, Device, Tensor};

/// How a linear layer's weight is stored.
#[derive(Debug, Clone)]
pub enum LinearKind {
    /// A dense float weight.
    Dense,
    /// A GPTQ weight (kept packed for the GPU path and for inspection).
    Gptq(Box<GptqWeight>),
}

/// `y = x W^T` with W [out, in].
#[derive(Debug, Clone)]
pub struct Linear {
    kind: LinearKind,
    /// [out, in] in the compute dtype.
    weight: Tensor,
}

/// What a loader needs to build one layer.
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
                Ok(Self {
                    kind: LinearKind::Dense,
                    weight,
                })
            }
            Some(q) => {
                let g = GptqWeight::load(ck, spec.prefix, k, n, q)?;
                Self::from_gptq(g, spec.dtype, spec.device)
            }
        }
    }

    /// Wraps a GPTQ weight, dequantizing it for the dense CPU matmul.
    pub fn from_gptq(g: GptqWeight, dtype: DType, device: &Device) -> Result<Self> {
        let (k, n) = (g.in_features, g.out_features);
        let weight = Tensor::from_vec(g.dequantize_nk(), (n, k), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        Ok(Self {
            kind: LinearKind::Gptq(Box::new(g)),
            weight,
        })
    }

    /// Wraps a dense [out, in] weight.
    pub fn dense(weight: Tensor) -> Self {
        Self {
            kind: LinearKind::Dense,
            weight,
        }
    }

    /// The storage kind.
    pub fn kind(&self) -> &LinearKind {
        &self.kind
    }

    /// Applies the layer to x [T, in] -> [T, out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.t()?)?)
    }
}

//! The pluggable linear layer: dense (f16/bf16/f32 checkpoints) or GPTQ.
//!
//! On the CPU backend a GPTQ layer is dequantized exactly once at load
//! ([`GptqWeight::dequantize_nk`]) and multiplied densely: clear before
//! clever, and the oracle for the CUDA kernels.

pub mod gptq;
pub mod tiled;

pub use gptq::{GptqWeight, RandomGptq};
pub use tiled::TiledGptq;

use super::checkpoint::Checkpoint;
use super::quant::QuantConfig;
use crate::Result;
use candle_core::{DType, Device, Tensor};

/// How a linear layer's weight is stored.
#[derive(Debug, Clone)]
pub enum LinearKind {
    /// A dense float weight.
    Dense,
    /// A GPTQ weight dequantized once for the CPU's dense product.
    Gptq,
    /// A GPTQ weight in the CUDA kernels' tile layout.
    GptqCuda(Box<crate::cuda::GptqGpu>),
}

/// How GPTQ products run on CUDA (`engine.gptq_kernel`): the one GPTQ
/// mode, from the config to the kernel launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GptqMode {
    /// The fused kernel up to `max_m` tokens (`engine.gptq_fused_max_m`);
    /// above, cuBLAS on f16 weights dequantized once at load and kept
    /// beside the packed ones (packed + 3.7x: about 18.5 GB for Mistral-7B
    /// 4-bit), or per product when none are resident.
    Auto {
        /// Largest M of the fused kernel.
        max_m: usize,
    },
    /// The fused kernel at every M: reduction order independent of the batch.
    Fused,
    /// Dequantize per product into f16 scratch, then cuBLAS.
    Dequant,
    /// Dequantize once at load and keep f16 weights (3.7x the memory).
    Resident,
}

impl Default for GptqMode {
    fn default() -> Self {
        GptqMode::Auto { max_m: 32 }
    }
}

/// `y = x W^T` with W [out, in].
#[derive(Debug, Clone)]
pub struct Linear {
    kind: LinearKind,
    /// [out, in] in the compute dtype (dense and CPU GPTQ layers).
    weight: Option<Tensor>,
    /// The GPTQ product's path on CUDA.
    mode: GptqMode,
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
    /// Whether layers sharing an input are fused on `device`: on the CPU
    /// only. On CUDA the fused product measured slower end to end (W1 on an
    /// H100: 12,177 against 15,323 output tok/s, BENCHMARKS.md): its output
    /// is split by strided copies, which cost more at prefill sizes than the
    /// launches they save; kernels that read the fused output in place are
    /// the way to fuse there.
    pub fn fuses_on(device: &Device) -> bool {
        device.is_cpu()
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
                Ok(Self::Fused(Linear::dense(Tensor::cat(&parts, 0)?), widths))
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

    /// The parts' outputs for x [T, in], each [T, width], contiguous.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Split(layers) => layers.iter().map(|l| l.forward(x)).collect(),
            Self::Fused(layer, widths) => {
                let y = layer.forward(x)?;
                let mut off = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(1, off, w)?.contiguous()?;
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
                Ok(Self::dense(weight))
            }
            Some(q) => {
                let g = GptqWeight::load(ck, spec.prefix, k, n, q)?;
                Self::from_gptq(g, spec)
            }
        }
    }

    /// Wraps a GPTQ weight: repacked for the kernels on CUDA, dequantized
    /// exactly for the dense CPU matmul otherwise.
    pub fn from_gptq(g: GptqWeight, spec: &LinearSpec<'_>) -> Result<Self> {
        if spec.device.is_cuda() {
            let tiled = TiledGptq::from_weight(&g)
                .map_err(|e| crate::Error::Model(format!("{}: {e}", spec.prefix)))?;
            let gpu = crate::cuda::GptqGpu::upload(&tiled, spec.device)?;
            return Self::from_gpu(gpu, spec.mode);
        }
        let (k, n) = (g.in_features, g.out_features);
        let weight = Tensor::from_vec(g.dequantize_nk(), (n, k), &Device::Cpu)?
            .to_dtype(spec.dtype)?
            .to_device(spec.device)?;
        // The packed weight is dropped: the CPU multiplies the exact
        // dequantization.
        Ok(Self {
            kind: LinearKind::Gptq,
            weight: Some(weight),
            mode: spec.mode,
        })
    }

    /// Wraps a GPU GPTQ layer (checkpoint or dummy).
    pub fn from_gpu(mut gpu: crate::cuda::GptqGpu, mode: GptqMode) -> Result<Self> {
        if matches!(mode, GptqMode::Resident | GptqMode::Auto { .. }) {
            gpu.make_resident()?;
        }
        Ok(Self {
            kind: LinearKind::GptqCuda(Box::new(gpu)),
            weight: None,
            mode,
        })
    }

    /// Wraps a dense [out, in] weight.
    pub fn dense(weight: Tensor) -> Self {
        Self {
            kind: LinearKind::Dense,
            weight: Some(weight),
            mode: GptqMode::default(),
        }
    }

    /// The storage kind.
    pub fn kind(&self) -> &LinearKind {
        &self.kind
    }

    /// Applies the layer to x [T, in] -> [T, out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let LinearKind::GptqCuda(g) = &self.kind {
            return g.forward(x, self.mode);
        }
        let w = self
            .weight
            .as_ref()
            .expect("dense and CPU GPTQ layers hold a weight");
        Ok(x.matmul(&w.t()?)?)
    }
}

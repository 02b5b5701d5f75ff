//! GPTQ as a format, below the model and the backend (pure CPU, no files
//! but the metadata): the metadata (`quantize_config.json` and/or
//! `config.json`'s `quantization_config`, validated into a
//! [`QuantConfig`]), the packed weight with its exact dequantization
//! (`gptq.rs`), the CUDA kernels' tile layout (`tiled.rs`), and how GPTQ
//! products run ([`GptqMode`]).

pub mod fp8;
mod gptq;
pub mod tiled;

pub use gptq::{GptqWeight, RandomGptq};
pub use tiled::TiledGptq;

use crate::{Error, Result};
use serde::Serialize;
use std::path::Path;

/// How zero points are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointFormat {
    /// AutoGPTQ v1: stored zero = true zero - 1.
    Gptq,
    /// GPTQModel v2: the true zero.
    GptqV2,
}

/// A GPTQ checkpoint's quantization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuantConfig {
    /// 4 or 8.
    pub bits: u32,
    /// Rows per group; `None` for group_size -1 (one group).
    pub group_size: Option<usize>,
    /// Act-order (`desc_act`).
    pub desc_act: bool,
    /// Symmetric quantization.
    pub sym: bool,
    /// Zero-point convention.
    pub format: CheckpointFormat,
}

/// `quantize_config.json` (or `config.json`'s `quantization_config`) as
/// AutoGPTQ / GPTQModel / transformers write it.
#[derive(Debug, serde::Deserialize)]
struct RawQuant {
    quant_method: Option<String>,
    bits: Option<u32>,
    #[serde(default = "one_group")]
    group_size: i64,
    #[serde(default)]
    desc_act: bool,
    #[serde(default = "yes")]
    sym: bool,
    checkpoint_format: Option<String>,
    format: Option<String>,
    #[serde(default)]
    is_marlin_format: bool,
}

fn one_group() -> i64 {
    -1
}

fn yes() -> bool {
    true
}

impl QuantConfig {
    /// Values per 32-bit word.
    pub fn pack(&self) -> usize {
        32 / self.bits as usize
    }

    /// Number of groups for `k` input rows.
    pub fn groups(&self, k: usize) -> usize {
        match self.group_size {
            Some(g) => k.div_ceil(g),
            None => 1,
        }
    }

    /// Short name in the style of TheBloke's branches, e.g. `4bit-128g`.
    pub fn short_name(&self) -> String {
        match self.group_size {
            Some(g) => format!("{}bit-{g}g", self.bits),
            None => format!("{}bit--1g", self.bits),
        }
    }

    /// Parses a branch-style short name (`4bit-128g`, `8bit--1g`, also
    /// TheBloke's `gptq-4bit-32g-actorder_True`), act-order on; `none` or
    /// `main`-less names that say no bits give `None` (dense).
    pub fn from_short_name(name: &str) -> Result<Option<Self>> {
        let s = name.trim().trim_start_matches("gptq-");
        if s == "none" || s == "f16" || s == "fp16" {
            return Ok(None);
        }
        let bad = || {
            Error::Config(format!(
                "model.dummy_quant is `{name}`, expected none or <bits>bit-<group>g such as 4bit-128g or 8bit--1g"
            ))
        };
        let (bits, rest) = s.split_once("bit-").ok_or_else(bad)?;
        let bits: u32 = bits.parse().map_err(|_| bad())?;
        let group = rest.split('g').next().ok_or_else(bad)?;
        let group: i64 = group.parse().map_err(|_| bad())?;
        if !(bits == 4 || bits == 8) || group == 0 || group < -1 {
            return Err(bad());
        }
        Ok(Some(Self {
            bits,
            group_size: (group > 0).then_some(group as usize),
            desc_act: !rest.contains("actorder_False"),
            sym: true,
            format: CheckpointFormat::Gptq,
        }))
    }

    /// Parses a JSON quantization object; `source` names the file for messages.
    pub fn from_json(v: &serde_json::Value, source: &str) -> Result<Self> {
        let raw: RawQuant = serde_json::from_value(v.clone())
            .map_err(|e| Error::Model(format!("{source}: {e}")))?;
        let method = raw.quant_method.as_deref().unwrap_or("gptq");
        if method != "gptq" {
            return Err(Error::Model(format!(
                "{source}: quant_method is `{method}`, only gptq is supported"
            )));
        }
        let bits = raw.bits.ok_or_else(|| {
            Error::Model(format!("{source}: `bits` is missing or not an integer"))
        })?;
        if bits != 4 && bits != 8 {
            return Err(Error::Model(format!(
                "{source}: bits is {bits}, expected 4 or 8"
            )));
        }
        let group_size = match raw.group_size {
            -1 => None,
            g if g > 0 && (g as u64).is_multiple_of(32 / bits as u64) => Some(g as usize),
            g => {
                return Err(Error::Model(format!(
                    "{source}: group_size is {g}, expected -1 or a positive multiple of {}",
                    32 / bits
                )))
            }
        };
        let format = match raw
            .checkpoint_format
            .or(raw.format)
            .as_deref()
            .unwrap_or("gptq")
        {
            "gptq" => CheckpointFormat::Gptq,
            "gptq_v2" => CheckpointFormat::GptqV2,
            other => {
                return Err(Error::Model(format!(
                    "{source}: checkpoint_format is `{other}`, expected gptq or gptq_v2"
                )))
            }
        };
        if raw.is_marlin_format {
            return Err(Error::Model(format!(
                "{source}: is_marlin_format is true; Marlin-repacked checkpoints are not supported"
            )));
        }
        Ok(Self {
            bits,
            group_size,
            desc_act: raw.desc_act,
            sym: raw.sym,
            format,
        })
    }

    /// Reads the quantization of a model directory: `config.json`'s
    /// `quantization_config` first, then `quantize_config.json`. `None` for a
    /// non-quantized model.
    pub fn from_dir(dir: &Path, config: &serde_json::Value) -> Result<Option<Self>> {
        if let Some(q) = config.get("quantization_config") {
            return Self::from_json(q, &format!("{}", dir.join("config.json").display())).map(Some);
        }
        let path = dir.join("quantize_config.json");
        if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Model(format!("{}: invalid JSON: {e}", path.display())))?;
            return Self::from_json(&v, &path.display().to_string()).map(Some);
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_thebloke_schema() {
        let q = QuantConfig::from_json(
            &json!({"bits": 4, "group_size": 128, "desc_act": true, "sym": true}),
            "q",
        )
        .unwrap();
        assert_eq!(q.bits, 4);
        assert_eq!(q.group_size, Some(128));
        assert!(q.desc_act);
        assert_eq!(q.format, CheckpointFormat::Gptq);
        assert_eq!(q.groups(4096), 32);
        let q = QuantConfig::from_json(
            &json!({"bits": 8, "group_size": -1, "checkpoint_format": "gptq_v2"}),
            "q",
        )
        .unwrap();
        assert_eq!(q.group_size, None);
        assert_eq!(q.groups(4096), 1);
        assert_eq!(q.format, CheckpointFormat::GptqV2);
    }

    #[test]
    fn refuses_unknown_method_and_bits() {
        let e = QuantConfig::from_json(&json!({"quant_method": "awq", "bits": 4}), "cfg.json")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "cfg.json: quant_method is `awq`, only gptq is supported"
        );
        let e = QuantConfig::from_json(&json!({"bits": 3}), "cfg.json").unwrap_err();
        assert_eq!(e.to_string(), "cfg.json: bits is 3, expected 4 or 8");
    }
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
    /// Batch-invariant: one reduction order per output at every M, over
    /// f16 weights dequantized once at load and kept beside the packed ones
    /// (as `Auto`): cuBLASLt algorithms without a K split
    /// (`cuda::invariant_product`), whose rows do not depend on M.
    Fused,
    /// Batch-invariant on the packed weights only (no f16 copy, slower at
    /// large M): on Hopper the warpgroup product with one block along K;
    /// elsewhere the fused kernel at every M.
    #[serde(rename = "fused_packed")]
    FusedPacked,
    /// Dequantize per product into f16 scratch, then cuBLAS.
    Dequant,
    /// Dequantize once at load and keep f16 weights (3.7x the memory).
    Resident,
    /// The fused kernel up to `max_m` tokens, the warpgroup product on the
    /// packed weights above (Hopper; elsewhere dequantize + cuBLAS per
    /// product): the packed weights only.
    Packed {
        /// Largest M of the fused kernel.
        max_m: usize,
    },
}

impl Default for GptqMode {
    fn default() -> Self {
        GptqMode::Auto { max_m: 32 }
    }
}

impl GptqMode {
    /// Whether a row's values must not depend on its batch (`fused`,
    /// `fused_packed`): the dense weights of such a job (the LM head, a
    /// float checkpoint's layers) take the batch-invariant product too.
    pub fn batch_invariant(self) -> bool {
        matches!(self, GptqMode::Fused | GptqMode::FusedPacked)
    }
}

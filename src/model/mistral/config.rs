//! Mistral architecture hyper-parameters from `config.json`.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// The architecture of a Mistral checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MistralConfig {
    /// Vocabulary size (rows of embed_tokens and lm_head).
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Keys attended per query including itself; `None` = full causal.
    pub sliding_window: Option<usize>,
    /// Context length.
    pub max_position_embeddings: usize,
    /// lm_head shares embed_tokens.
    pub tie_word_embeddings: bool,
    /// EOS ids named by the config.
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` as Hugging Face writes it (the keys this model reads;
/// others are ignored).
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: String,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    sliding_window: Option<usize>,
    #[serde(default = "default_ctx")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    eos_token_id: Option<EosIds>,
}

#[derive(Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
}

/// `eos_token_id`: one id or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EosIds {
    One(u32),
    Many(Vec<u32>),
}

fn default_eps() -> f64 {
    1e-5
}

fn default_ctx() -> usize {
    32768
}

impl MistralConfig {
    /// Parses a `config.json` value; `src` names the file in messages.
    pub fn from_json(v: &Value, src: &str) -> Result<Self> {
        let hf: HfConfig =
            serde_json::from_value(v.clone()).map_err(|e| Error::Model(format!("{src}: {e}")))?;
        if hf.model_type != "mistral" {
            return Err(Error::Model(format!(
                "{src}: model_type is `{}`, expected mistral",
                hf.model_type
            )));
        }
        let req = |x: Option<usize>, key: &str| {
            x.filter(|&x| x > 0).ok_or_else(|| {
                Error::Model(format!(
                    "{src}: `{key}` is missing or not a positive integer"
                ))
            })
        };
        let hidden_size = req(hf.hidden_size, "hidden_size")?;
        let num_attention_heads = req(hf.num_attention_heads, "num_attention_heads")?;
        let head_dim = hf.head_dim.unwrap_or(hidden_size / num_attention_heads);
        let num_key_value_heads = hf.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::Model(format!(
                "{src}: num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(Error::Model(format!(
                "{src}: head_dim {head_dim} is odd, RoPE needs it even"
            )));
        }
        let rope_theta = hf
            .rope_theta
            .or(hf.rope_parameters.and_then(|r| r.rope_theta))
            .unwrap_or(10000.0);
        Ok(Self {
            vocab_size: req(hf.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: req(hf.intermediate_size, "intermediate_size")?,
            num_hidden_layers: req(hf.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            sliding_window: hf.sliding_window,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            eos_token_ids: match hf.eos_token_id {
                Some(EosIds::One(id)) => vec![id],
                Some(EosIds::Many(ids)) => ids,
                None => vec![],
            },
        })
    }

    /// FLOPs of one token through the linear layers and the LM head
    /// (2 per weight; attention's own FLOPs, which grow with the context,
    /// are not counted).
    pub fn flops_per_token(&self) -> f64 {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * i;
        let weights = self.num_hidden_layers * per_layer + self.vocab_size * h;
        2.0 * weights as f64
    }

    /// Reads `dir/config.json` as raw JSON (for quantization) and parsed.
    pub fn read(dir: &Path) -> Result<(Self, Value)> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("{}: invalid JSON: {e}", path.display())))?;
        Ok((Self::from_json(&v, &path.display().to_string())?, v))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mistral_7b_costs_14_2_gflop_per_token() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/mistral-7b-openorca");
        let (cfg, _) = super::MistralConfig::read(&dir).unwrap();
        let g = cfg.flops_per_token() / 1e9;
        assert!((g - 14.2).abs() < 0.05, "{g} GFLOP per token");
    }
}

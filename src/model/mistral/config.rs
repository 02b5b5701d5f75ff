//! Mistral architecture hyper-parameters from `config.json`.

use crate::{Error, Result};
use serde::Serialize;
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

fn req(v: &Value, key: &str, src: &str) -> Result<usize> {
    v.get(key)
        .and_then(|x| x.as_u64())
        .map(|x| x as usize)
        .ok_or_else(|| {
            Error::Model(format!(
                "{src}: `{key}` is missing or not a positive integer"
            ))
        })
}

impl MistralConfig {
    /// Parses a `config.json` value; `src` names the file in messages.
    pub fn from_json(v: &Value, src: &str) -> Result<Self> {
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        if model_type != "mistral" {
            return Err(Error::Model(format!(
                "{src}: model_type is `{model_type}`, expected mistral"
            )));
        }
        let hidden_size = req(v, "hidden_size", src)?;
        let num_attention_heads = req(v, "num_attention_heads", src)?;
        let head_dim = match v.get("head_dim").and_then(|x| x.as_u64()) {
            Some(d) => d as usize,
            None => hidden_size / num_attention_heads.max(1),
        };
        let num_key_value_heads = v
            .get("num_key_value_heads")
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::Model(format!(
                "{src}: num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        if head_dim % 2 != 0 {
            return Err(Error::Model(format!(
                "{src}: head_dim {head_dim} is odd, RoPE needs it even"
            )));
        }
        let rope_theta = v
            .get("rope_theta")
            .and_then(|x| x.as_f64())
            .or_else(|| {
                v.pointer("/rope_parameters/rope_theta")
                    .and_then(|x| x.as_f64())
            })
            .unwrap_or(10000.0);
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect(),
            _ => vec![],
        };
        Ok(Self {
            vocab_size: req(v, "vocab_size", src)?,
            hidden_size,
            intermediate_size: req(v, "intermediate_size", src)?,
            num_hidden_layers: req(v, "num_hidden_layers", src)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-5),
            rope_theta,
            sliding_window: v
                .get("sliding_window")
                .and_then(|x| x.as_u64())
                .map(|x| x as usize),
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(|x| x.as_u64())
                .unwrap_or(32768) as usize,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            eos_token_ids,
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

//! The model: where its files come from, how checkpoints are read, the GPTQ
//! format, and the one Mistral implementation with a pluggable linear layer.

pub mod checkpoint;
pub mod linear;
pub mod mistral;
pub mod patch;
pub mod source;

pub use crate::quant::{CheckpointFormat, QuantConfig};
pub use checkpoint::Checkpoint;
pub use mistral::{
    check_checkpoint, DecodeGraphs, LoadOptions, LogitRows, Mistral, MistralConfig, PagedKvCache,
    SeqChunk,
};
pub use patch::IdPatch;
pub use source::{resolve_model_dir, HubSettings};

use crate::Result;
use std::path::Path;

/// Reads a model directory's architecture and quantization without loading
/// weights.
pub fn read_meta(dir: &Path) -> Result<(MistralConfig, Option<QuantConfig>)> {
    let (cfg, raw) = MistralConfig::read(dir)?;
    let quant = QuantConfig::from_dir(dir, &raw)?;
    Ok((cfg, quant))
}

/// Loads a model directory's weights as the options say.
pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Mistral> {
    let (cfg, quant) = read_meta(dir)?;
    let ck = Checkpoint::open(dir)?;
    Mistral::load(&ck, &cfg, quant.as_ref(), opts)
}

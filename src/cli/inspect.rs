//! `runner inspect MODEL`.

use crate::config::{LoadFormat, ModelSpec};
use crate::model::{Checkpoint, HubSettings};

/// Prints architecture, quantization and tensor inventory of a model.
pub fn inspect(model: &str, revision: &str, hub: &HubSettings) -> anyhow::Result<()> {
    let path = std::path::Path::new(model);
    let spec = ModelSpec {
        id: model.to_string(),
        local_dir: path.is_dir().then(|| path.to_path_buf()),
        revision: revision.to_string(),
        dtype: crate::config::DType::F16,
        load_format: LoadFormat::Auto,
        dummy_quant: None,
    };
    let dir = crate::model::resolve_model_dir(&spec, hub)?;
    let (cfg, quant) = crate::model::read_meta(&dir)?;
    let ck = Checkpoint::open(&dir)?;
    println!("model: {model} ({})", dir.display());
    println!(
        "architecture: mistral, {} layers, hidden {}, intermediate {}, heads {} (kv {}), head_dim {}, vocab {}, rope_theta {}, sliding_window {}, context {}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.vocab_size,
        cfg.rope_theta,
        cfg.sliding_window.map_or("none".into(), |w| w.to_string()),
        cfg.max_position_embeddings
    );
    match &quant {
        None => println!("quantization: none (dense)"),
        Some(q) => println!(
            "quantization: gptq, bits {}, group_size {}, act_order {}, sym {}, format {}",
            q.bits,
            q.group_size.map_or("-1".into(), |g| g.to_string()),
            q.desc_act,
            q.sym,
            match q.format {
                crate::model::CheckpointFormat::Gptq => "gptq",
                crate::model::CheckpointFormat::GptqV2 => "gptq_v2",
            }
        ),
    }
    let bytes = ck.total_bytes()?;
    println!(
        "tensors: {} ({:.2} MiB)",
        ck.names().len(),
        bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

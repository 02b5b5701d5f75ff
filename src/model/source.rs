//! Model directory resolution: a local directory, or a hub repo id + revision
//! resolved through hf-hub's cache (downloading when online).

use crate::config::ModelSpec;
use crate::{Error, Result};
use std::path::PathBuf;

/// Hub settings, read from the environment by the CLI (`HF_HOME`,
/// `HF_HUB_OFFLINE`, `HF_TOKEN`) and passed down.
#[derive(Clone, Default)]
pub struct HubSettings {
    /// The HF cache root (`$HF_HOME/hub`); hf-hub's default when `None`.
    pub cache_dir: Option<PathBuf>,
    /// Use only the cache.
    pub offline: bool,
    /// Access token; never logged.
    pub token: Option<String>,
}

impl std::fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSettings")
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Files a model directory needs besides weights.
const META_FILES: &[&str] = &["config.json", "tokenizer.json"];
/// Optional files fetched when present.
const OPTIONAL_FILES: &[&str] = &[
    "tokenizer_config.json",
    "generation_config.json",
    "quantize_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
];

/// Returns a local directory holding the model's files.
pub fn resolve_model_dir(spec: &ModelSpec, hub: &HubSettings) -> Result<PathBuf> {
    if let Some(dir) = &spec.local_dir {
        return Ok(dir.clone());
    }
    let repo = hf_hub::Repo::with_revision(
        spec.id.clone(),
        hf_hub::RepoType::Model,
        spec.revision.clone(),
    );
    let cache = match &hub.cache_dir {
        Some(d) => hf_hub::Cache::new(d.clone()),
        None => hf_hub::Cache::from_env(),
    };
    if hub.offline {
        let cached = cache.repo(repo.clone());
        let config = cached.get("config.json").ok_or_else(|| {
            Error::Model(format!(
                "model {} revision {} is not in the HF cache at {} and HF_HUB_OFFLINE is set",
                spec.id,
                spec.revision,
                cache.path().display()
            ))
        })?;
        for f in META_FILES {
            if cached.get(f).is_none() {
                return Err(Error::Model(format!(
                    "model {} revision {}: {f} is missing from the HF cache (offline)",
                    spec.id, spec.revision
                )));
            }
        }
        return Ok(config.parent().map(|p| p.to_path_buf()).unwrap_or_default());
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_token(hub.token.clone())
        .with_progress(true)
        .build()
        .map_err(|e| Error::Model(format!("cannot reach the hub for {}: {e}", spec.id)))?;
    let r = api.repo(repo);
    let info = r.info().map_err(|e| {
        Error::Model(format!(
            "cannot list {} revision {} on the hub: {e}",
            spec.id, spec.revision
        ))
    })?;
    let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let mut dir = None;
    for f in META_FILES.iter().chain(OPTIONAL_FILES) {
        if names.iter().any(|n| n == f) {
            let p = r
                .get(f)
                .map_err(|e| Error::Model(format!("downloading {f} of {}: {e}", spec.id)))?;
            dir = p.parent().map(|p| p.to_path_buf());
        }
    }
    let weights: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    if weights.is_empty() {
        return Err(pickle_refusal(&spec.id, &names));
    }
    for f in weights {
        r.get(f)
            .map_err(|e| Error::Model(format!("downloading {f} of {}: {e}", spec.id)))?;
    }
    dir.ok_or_else(|| Error::Model(format!("model {} has no config.json", spec.id)))
}

/// The error for a checkpoint without safetensors files.
pub fn pickle_refusal(what: &str, names: &[String]) -> Error {
    if names
        .iter()
        .any(|n| n.ends_with(".bin") || n.ends_with(".pt") || n.ends_with(".pth"))
    {
        Error::Model(format!(
            "{what} holds only a pickle checkpoint (.bin/.pt); runner loads safetensors only \
             (convert it with `safetensors` or pick a branch that has model.safetensors)"
        ))
    } else {
        Error::Model(format!("{what} holds no .safetensors weights"))
    }
}

//! Model directory resolution: a local directory, or a hub repo id + revision
//! resolved through hf-hub's cache (downloading when online, with a progress
//! bar on a terminal).

use crate::config::ModelSpec;
use crate::{Error, Result};
use hf_hub::progress::{DownloadEvent, ProgressEvent, ProgressHandler};
use std::path::{Path, PathBuf};

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
/// What a snapshot download fetches: the JSON metadata (config, tokenizer,
/// quantize and generation configs, the weight index) and the weights.
const WANTED: &[&str] = &["*.json", "*.safetensors"];

/// Returns a local directory holding the model's files.
pub fn resolve_model_dir(spec: &ModelSpec, hub: &HubSettings) -> Result<PathBuf> {
    if let Some(dir) = &spec.local_dir {
        return Ok(dir.clone());
    }
    let mut builder = hf_hub::HFClient::builder();
    if let Some(d) = &hub.cache_dir {
        builder = builder.cache_dir(d.clone());
    }
    if let Some(t) = &hub.token {
        builder = builder.token(t.clone());
    }
    let client = builder
        .build_sync()
        .map_err(|e| Error::Model(format!("cannot set up the hub client for {}: {e}", spec.id)))?;
    let (owner, name) = hf_hub::split_id(&spec.id);
    let repo = client.model(owner, name);
    let bar = DownloadBar::default();
    let dir = repo
        .snapshot_download()
        .revision(spec.revision.clone())
        .allow_patterns(WANTED.iter().map(|p| p.to_string()).collect())
        .local_files_only(hub.offline)
        .progress(bar.clone())
        .send();
    bar.finish();
    let dir = dir.map_err(|e| match hub.offline {
        true => Error::Model(format!(
            "model {} revision {} is not in the HF cache at {} and HF_HUB_OFFLINE is set ({e})",
            spec.id,
            spec.revision,
            hub.cache_dir
                .clone()
                .unwrap_or_else(hf_hub::resolve_cache_dir)
                .display()
        )),
        false => Error::Model(format!(
            "cannot fetch {} revision {} from the hub: {e}",
            spec.id, spec.revision
        )),
    })?;
    let listing = || -> Vec<String> {
        let remote = (!hub.offline).then(|| {
            repo.list_tree()
                .revision(spec.revision.clone())
                .recursive(true)
                .send()
                .ok()
        });
        match remote.flatten() {
            Some(entries) => entries
                .into_iter()
                .filter_map(|e| match e {
                    hf_hub::repository::RepoTreeEntry::File { path, .. } => Some(path),
                    _ => None,
                })
                .collect(),
            None => file_names(&dir),
        }
    };
    check_snapshot(
        &dir,
        &format!("model {} revision {}", spec.id, spec.revision),
        listing,
    )?;
    Ok(dir)
}

/// Checks that a resolved snapshot holds the metadata and safetensors
/// weights; `listing` names the repository's files for the pickle refusal.
fn check_snapshot(dir: &Path, what: &str, listing: impl FnOnce() -> Vec<String>) -> Result<()> {
    for f in META_FILES {
        if !dir.join(f).is_file() {
            return Err(Error::Model(format!(
                "{what}: {f} is missing from {}",
                dir.display()
            )));
        }
    }
    if !file_names(dir).iter().any(|n| n.ends_with(".safetensors")) {
        return Err(pickle_refusal(what, &listing()));
    }
    Ok(())
}

/// The file names in a directory (empty when unreadable).
fn file_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
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

/// A byte progress bar for a snapshot download (drawn only on a terminal;
/// the start and the end are logged either way).
#[derive(Clone, Default)]
struct DownloadBar(std::sync::Arc<std::sync::OnceLock<indicatif::ProgressBar>>);

impl DownloadBar {
    fn finish(&self) {
        if let Some(bar) = self.0.get() {
            bar.finish_and_clear();
            tracing::info!(
                "download finished: {}",
                indicatif::HumanBytes(bar.position())
            );
        }
    }
}

impl ProgressHandler for DownloadBar {
    fn on_progress(&self, event: &ProgressEvent) {
        let ProgressEvent::Download(event) = event else {
            return;
        };
        match event {
            DownloadEvent::Start {
                total_files,
                total_bytes,
            } => {
                tracing::info!(
                    "downloading {total_files} file(s), {}",
                    indicatif::HumanBytes(*total_bytes)
                );
                let bar = indicatif::ProgressBar::new(*total_bytes).with_style(
                    indicatif::ProgressStyle::with_template(
                        "download {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                let _ = self.0.set(bar);
            }
            DownloadEvent::Progress { files } => {
                if let Some(bar) = self.0.get() {
                    // Per-file figures are running totals: the sum of the
                    // files reported so far is a lower bound of the bytes done.
                    let done: u64 = files.iter().map(|f| f.bytes_completed).sum();
                    bar.set_position(bar.position().max(done));
                }
            }
            DownloadEvent::AggregateProgress {
                bytes_completed, ..
            } => {
                if let Some(bar) = self.0.get() {
                    bar.set_position(bar.position().max(*bytes_completed));
                }
            }
            DownloadEvent::Complete => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_cache(files: &[&str]) -> (tempfile::TempDir, HubSettings) {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--acme--tiny");
        let hash = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), hash).unwrap();
        let snap = repo.join("snapshots").join(hash);
        std::fs::create_dir_all(&snap).unwrap();
        for f in files {
            std::fs::write(snap.join(f), "{}").unwrap();
        }
        let hub = HubSettings {
            cache_dir: Some(tmp.path().to_path_buf()),
            offline: true,
            token: None,
        };
        (tmp, hub)
    }

    fn spec(revision: &str) -> ModelSpec {
        ModelSpec {
            id: "acme/tiny".into(),
            revision: revision.into(),
            local_dir: None,
            dtype: crate::config::DType::F16,
            load_format: crate::config::LoadFormat::Auto,
            dummy_quant: None,
        }
    }

    #[test]
    fn offline_resolution_reads_the_cache_snapshot() {
        let (_tmp, hub) = fake_cache(&["config.json", "tokenizer.json", "model.safetensors"]);
        let dir = resolve_model_dir(&spec("main"), &hub).unwrap();
        assert!(dir.join("model.safetensors").is_file(), "{}", dir.display());
    }

    #[test]
    fn offline_resolution_names_what_is_missing() {
        let (_tmp, hub) = fake_cache(&["config.json", "model.safetensors"]);
        let e = resolve_model_dir(&spec("main"), &hub)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer.json is missing"), "{e}");
        let e = resolve_model_dir(&spec("gptq-4bit-32g"), &hub)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("revision gptq-4bit-32g is not in the HF cache")
                && e.contains("HF_HUB_OFFLINE"),
            "{e}"
        );
        let (_tmp, hub) = fake_cache(&["config.json", "tokenizer.json", "pytorch_model.bin"]);
        let e = resolve_model_dir(&spec("main"), &hub)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only a pickle checkpoint"), "{e}");
    }
}

//! Job configuration: figment layering into raw structs, then one resolved,
//! validated [`JobSpec`] that the rest of the crate uses.
//!
//! Layers, lowest first: `configs/default.toml` (embedded), the job file,
//! `RUNNER_*` environment variables (`__` separates sections), `--set` flags.

mod raw;
mod resolve;
mod spec;

pub use raw::RawJob;
pub use spec::{
    Constraint, DType, Device, EngineSpec, GenerationParams, InputFormat, InputSpec, JobSpec,
    KvCacheDtype, LoadFormat, Metric, ModelSpec, Normalize, OutputSpec, PrefillAttention,
    ScoringSpec, SweepSpec, Variant, MAX_LOGPROBS, MAX_SAMPLES,
};

use crate::{Error, Result};
use figment::providers::{Format, Toml};
use figment::Figment;
use std::path::Path;

/// The defaults every job starts from.
pub const DEFAULT_TOML: &str = include_str!("../../configs/default.toml");

/// Where configuration comes from besides the job file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `RUNNER_*` variables, as (name, value) pairs; the CLI reads the environment.
    pub env: Vec<(String, String)>,
    /// `--set key=value` flags, in order.
    pub set: Vec<String>,
}

/// Loads a job file with its layers and resolves it into a [`JobSpec`].
pub fn load(job_file: &Path, overrides: &Overrides) -> Result<JobSpec> {
    if !job_file.is_file() {
        return Err(Error::Config(format!(
            "job file {} does not exist or is not a file",
            job_file.display()
        )));
    }
    let mut fig = Figment::new()
        .merge(named(DEFAULT_TOML, "configs/default.toml"))
        .merge(Toml::file_exact(job_file));
    // Environment is given explicitly (not read here): replay it through a
    // TOML document so figment's metadata names the variable.
    for (name, value) in &overrides.env {
        let Some(key) = config_key(name) else {
            continue; // RUNNER_OS, RUNNER_TEMP, ... (CI systems set those)
        };
        fig = fig.merge(named(
            &set_as_toml(&key, value),
            &format!("environment variable {name}"),
        ));
    }
    for flag in &overrides.set {
        let (key, value) = flag.split_once('=').ok_or_else(|| {
            Error::Config(format!(
                "--set `{flag}`: expected key=value, e.g. engine.device=cuda"
            ))
        })?;
        fig = fig.merge(named(
            &set_as_toml(key.trim(), value.trim()),
            &format!("--set {flag}"),
        ));
    }
    let raw: RawJob = fig.extract().map_err(figment_error)?;
    raw.resolve(job_file)
}

/// The config key of an environment variable: only the config's shape,
/// `RUNNER_<SECTION>__<KEY>`, is config (`RUNNER_ENGINE__DEVICE` ->
/// `engine.device`); other `RUNNER_*` names (GitHub Actions sets
/// `RUNNER_OS`, `RUNNER_TEMP`, ...) are not ours and are ignored. A
/// variable of that shape naming an unknown key is still an error.
fn config_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix("RUNNER_")?;
    let (section, key) = rest.split_once("__")?;
    if section.is_empty() || key.is_empty() {
        return None;
    }
    Some(format!("{section}.{key}").to_ascii_lowercase())
}

/// A TOML string provider whose metadata names where it came from, so that
/// errors say "in --set engine.x=1" rather than "in TOML source string".
struct Named {
    toml: String,
    name: String,
}

fn named(toml: &str, name: &str) -> Named {
    Named {
        toml: toml.to_string(),
        name: name.to_string(),
    }
}

impl figment::Provider for Named {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(self.name.clone())
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Toml::string(&self.toml).data()
    }
}

/// Renders `key = value` as a TOML document; the value is taken as TOML when
/// it parses as one (numbers, booleans, arrays), else as a string.
fn set_as_toml(key: &str, value: &str) -> String {
    let parsed = format!("v = {value}");
    let literal = if toml::from_str::<toml::Table>(&parsed).is_ok() {
        value.to_string()
    } else {
        toml::Value::String(value.to_string()).to_string()
    };
    let (section, leaf) = key.rsplit_once('.').unwrap_or(("", key));
    if section.is_empty() {
        format!("{leaf} = {literal}\n")
    } else {
        format!("[{section}]\n{leaf} = {literal}\n")
    }
}

/// One line per figment error, naming the key and where it came from.
fn figment_error(err: figment::Error) -> Error {
    let lines: Vec<String> = err
        .into_iter()
        .map(|e| {
            let key = if e.path.is_empty() {
                String::new()
            } else {
                format!(" for key `{}`", e.path.join("."))
            };
            let source = match (
                &e.metadata,
                e.metadata.as_ref().and_then(|m| m.source.as_ref()),
            ) {
                (_, Some(figment::Source::File(p))) => format!(" in {}", p.display()),
                (Some(m), _) => format!(" in {}", m.name),
                _ => String::new(),
            };
            format!("{}{key}{source}", e.kind)
        })
        .collect();
    Error::Config(lines.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_section_key_variables_are_config() {
        assert_eq!(
            config_key("RUNNER_ENGINE__DEVICE").as_deref(),
            Some("engine.device")
        );
        for other in [
            "RUNNER_OS",
            "RUNNER_TEMP",
            "RUNNER_LOG",
            "RUNNER__X",
            "RUNNER_A__",
        ] {
            assert_eq!(config_key(other), None, "{other}");
        }
    }

    #[test]
    fn set_values_keep_their_toml_type() {
        assert_eq!(
            set_as_toml("engine.max_num_seqs", "8"),
            "[engine]\nmax_num_seqs = 8\n"
        );
        assert_eq!(
            set_as_toml("engine.device", "cuda:1"),
            "[engine]\ndevice = \"cuda:1\"\n"
        );
        assert_eq!(
            set_as_toml("generation.stop", "[\"x\"]"),
            "[generation]\nstop = [\"x\"]\n"
        );
    }
}

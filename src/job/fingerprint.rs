//! What makes two runs the same job (resume refuses anything else), and
//! the input prescan that finds duplicate ids before any model work.

use crate::config::JobSpec;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// What identifies a job for resume: model, generation, input content,
/// scoring and output schema: every setting that changes a row's columns or
/// values (not engine settings, which do not change results' meaning).
pub fn fingerprint(spec: &JobSpec) -> Result<BTreeMap<String, String>> {
    let mut fp = BTreeMap::new();
    let m = &spec.model;
    fp.insert("model.id".into(), m.id.clone());
    fp.insert("model.revision".into(), m.revision.clone());
    fp.insert("model.dtype".into(), format!("{:?}", m.dtype));
    fp.insert("model.load_format".into(), format!("{:?}", m.load_format));
    fp.insert("model.dummy_quant".into(), format!("{:?}", m.dummy_quant));
    let g = serde_json::to_value(&spec.generation).expect("generation serializes");
    if let serde_json::Value::Object(o) = g {
        // Not `n`: sample i does not depend on n, so raising n and resuming
        // adds samples to the rows already written.
        for (k, v) in o.into_iter().filter(|(k, _)| k != "n") {
            fp.insert(format!("generation.{k}"), v.to_string());
        }
    }
    let i = &spec.input;
    // The resolved path: the same file whatever the working directory or
    // the way the job file was named (with its content hash below).
    let resolved = std::fs::canonicalize(&i.path).map_err(|e| Error::io(&i.path, e))?;
    fp.insert("input.path".into(), resolved.display().to_string());
    fp.insert("input.format".into(), format!("{:?}", i.format));
    fp.insert(
        "input.columns".into(),
        format!(
            "id={} prompt={} messages={} system={}",
            i.id_column, i.prompt_column, i.messages_column, i.system_column
        ),
    );
    fp.insert("input.sha256".into(), file_hash(&i.path)?);
    if !i.passthrough.is_empty() {
        fp.insert(
            "output.passthrough_columns".into(),
            i.passthrough.join(", "),
        );
    }
    if let Some(t) = &i.template {
        fp.insert("input.template".into(), t.clone());
    }
    fp.insert(
        "output.include_token_ids".into(),
        spec.output.include_token_ids.to_string(),
    );
    fp.insert(
        "output.include_stop_str".into(),
        spec.output.include_stop_str.to_string(),
    );
    fp.insert(
        "output.logprobs".into(),
        format!(
            "{} prompt={}",
            spec.output.logprobs, spec.output.prompt_logprobs
        ),
    );
    if let Some(sh) = spec.shard {
        fp.insert("shards".into(), sh.count.to_string());
    }
    let s = serde_json::to_value(&spec.scoring).expect("scoring serializes");
    if let serde_json::Value::Object(o) = s {
        for (k, v) in o {
            fp.insert(format!("scoring.{k}"), v.to_string());
        }
    }
    Ok(fp)
}

/// Reads every record id once: duplicate ids are a job-level error, found
/// before any model work (across the whole input, sharded or not). Returns
/// the number of records and rows of the job's shard (all of them when
/// unsharded).
pub fn prescan(spec: &JobSpec) -> Result<Totals> {
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut n = Totals::default();
    for rec in crate::input::open(&spec.input, &spec.generation)? {
        let rec = rec?;
        if let Some(first) = seen.insert(rec.id.clone(), rec.row) {
            return Err(Error::Input(format!(
                "input {} has duplicate record id `{}` (rows {first} and {}); ids must be unique for resume to skip written records",
                spec.input.path.display(),
                rec.id,
                rec.row
            )));
        }
        if spec.shard.is_none_or(|s| s.holds(&rec.id)) {
            n.records += 1;
            n.rows += rec.samples(&spec.generation);
        }
    }
    Ok(n)
}

/// What a job's input asks for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    /// Records.
    pub records: usize,
    /// Output rows: each record's samples (`n`).
    pub rows: usize,
}

/// sha256 hex of a fingerprint's canonical JSON.
pub fn job_hash(fp: &BTreeMap<String, String>) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(
        serde_json::to_vec(fp).expect("map serializes"),
    ))
}

/// sha256 hex of a file's bytes.
pub fn file_hash(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

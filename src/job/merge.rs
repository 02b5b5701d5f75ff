//! `runner merge OUTPUT_DIR`: compacts a job's part files into one Parquet
//! file in input order (sorted by `input_row`), written atomically beside
//! the directory; the parts stay, so the output remains resumable.

use super::{JobState, Manifest, MANIFEST};
use crate::output::{write_atomic_path, Layout};
use crate::{Error, Result};
use arrow::array::RecordBatch;
use std::path::{Path, PathBuf};

/// Merges a job's output into one file (default: `<dir>.parquet`), or each
/// variant of a sweep output into `variant=<name>.parquet` of a directory
/// beside it (default: `<dir>-merged/`; `into` names that directory).
/// Returns the files written.
pub fn merge(dir: &Path, into: Option<&Path>) -> Result<Vec<PathBuf>> {
    let Some(info) = crate::report::SweepInfo::read(dir)? else {
        return Ok(vec![merge_job(dir, into)?]);
    };
    let (root, target) = outside(dir, into, "-merged")?;
    std::fs::create_dir_all(&target).map_err(|e| Error::io(&target, e))?;
    let mut written = Vec::new();
    for v in &info.variants {
        let vdir = crate::report::variant_dir(&root, v);
        if !vdir.join(MANIFEST).is_file() {
            tracing::warn!(variant = %v, "not started: nothing to merge");
            continue;
        }
        written.push(merge_job(
            &vdir,
            Some(&target.join(format!("variant={v}.parquet"))),
        )?);
    }
    Ok(written)
}

/// Merges one job's parts into `into` (default: `<dir>.parquet`).
fn merge_job(dir: &Path, into: Option<&Path>) -> Result<PathBuf> {
    let (_, sorted) = sorted_rows(dir, "merging")?;
    let schema = sorted.schema();
    let (_, dst) = outside(dir, into, ".parquet")?;
    let mut buf = Vec::new();
    let pq_err =
        |e: parquet::errors::ParquetError| Error::Output(format!("writing {}: {e}", dst.display()));
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, None).map_err(pq_err)?;
    w.write(&sorted).map_err(pq_err)?;
    w.close().map_err(pq_err)?;
    write_atomic_path(&dst, &buf)?;
    tracing::info!(rows = sorted.num_rows(), file = %dst.display(), "merged");
    Ok(dst)
}

/// A job's manifest (a sharded job's: its first shard's) and every row of
/// its parts (every shard's) in one batch, in input order then sample
/// order. Warns when the job is unfinished (`doing` names the command in
/// the warning); refuses a sharded output while a shard never started.
pub fn sorted_rows(dir: &Path, doing: &str) -> Result<(Manifest, RecordBatch)> {
    let m = match super::shards::overview(dir)? {
        None => Manifest::read(&Layout::plain(dir))?.ok_or_else(|| {
            Error::Output(format!(
                "{} has no {MANIFEST}: not the output of a runner job",
                dir.display(),
            ))
        })?,
        Some(shards) => {
            super::shards::require_mergeable(dir, &shards)?;
            for s in shards.iter().filter(|s| s.word() != "done") {
                tracing::warn!(shard = %s.shard, state = s.word(), "{doing} a shard that has not finished: only the rows written so far");
            }
            let first = shards.into_iter().find_map(|s| s.status);
            first.expect("every shard started").manifest
        }
    };
    if m.shard.is_none() && m.state != JobState::Finished {
        tracing::warn!(
            state = m.state.as_str(),
            rows = m.rows(),
            of = m.expected_rows(),
            "{doing} an unfinished job: only the rows written so far"
        );
    }
    let batches = read_parts(dir)?;
    let first = batches
        .first()
        .ok_or_else(|| Error::Output(format!("{} holds no rows yet", dir.display())))?;
    let schema = first.schema();
    let arrow_err =
        |e: arrow::error::ArrowError| Error::Output(format!("{doing} {}: {e}", dir.display()));
    let all = arrow::compute::concat_batches(&schema, &batches).map_err(arrow_err)?;
    if all.column_by_name("input_row").is_none() {
        return Err(Error::Output("parts have no input_row column".into()));
    }
    // Input order, then sample order (parts before samples have no
    // `sample_index`).
    let keys: Vec<arrow::compute::SortColumn> = ["input_row", "sample_index"]
        .iter()
        .filter_map(|n| all.column_by_name(n))
        .map(|c| arrow::compute::SortColumn {
            values: c.clone(),
            options: None,
        })
        .collect();
    let order = arrow::compute::lexsort_to_indices(&keys, None).map_err(arrow_err)?;
    let cols = all
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c, &order, None))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(arrow_err)?;
    let sorted = RecordBatch::try_new(schema.clone(), cols).map_err(arrow_err)?;
    Ok((m, sorted))
}

/// Every part's batches; parts whose schemas differ (a job resumed with
/// other output settings) are refused, naming both, rather than merged
/// into a file that drops columns.
fn read_parts(dir: &Path) -> Result<Vec<RecordBatch>> {
    let mut batches: Vec<RecordBatch> = Vec::new();
    let mut first: Option<(PathBuf, arrow::datatypes::SchemaRef)> = None;
    for p in crate::output::existing_parts(dir)? {
        let part = crate::output::read_part(&p).map_err(|e| match e {
            Error::CorruptPart(m) => Error::CorruptPart(format!(
                "{m}; resubmit the job (`runner submit JOB`) to move it to {}/ and regenerate its records, then merge again",
                super::QUARANTINE
            )),
            other => other,
        })?;
        for b in &part {
            match &first {
                None => first = Some((p.clone(), b.schema())),
                Some((f, schema)) if schema.fields() != b.schema().fields() => {
                    return Err(Error::Output(format!(
                        "{} and {} have different columns ({} vs {}): the job was resumed with other output or scoring settings; merge the parts separately or rerun with --restart",
                        f.display(),
                        p.display(),
                        names(schema),
                        names(&b.schema())
                    )))
                }
                Some(_) => {}
            }
        }
        batches.extend(part);
    }
    Ok(batches)
}

fn names(schema: &arrow::datatypes::SchemaRef) -> String {
    let n: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    n.join(", ")
}

/// Where a merge writes: `into`, or `<dir's name><suffix>` beside `dir`;
/// never inside `dir`, whose readers would then see every row twice.
/// Returns `dir` resolved, and the destination.
fn outside(dir: &Path, into: Option<&Path>, suffix: &str) -> Result<(PathBuf, PathBuf)> {
    let dir = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    let dst = match into {
        Some(p) => std::path::absolute(p).map_err(|e| Error::io(p, e))?,
        None => {
            let name = dir
                .file_name()
                .map_or("output".into(), |n| n.to_string_lossy().into_owned());
            dir.with_file_name(format!("{name}{suffix}"))
        }
    };
    let parent = dst.parent().and_then(|p| std::fs::canonicalize(p).ok());
    if dst.starts_with(&dir) || parent.is_some_and(|p| p.starts_with(&dir)) {
        return Err(Error::Output(format!(
            "--into {} is inside the output directory {}: readers of the directory would see its rows twice; write it elsewhere",
            dst.display(),
            dir.display()
        )));
    }
    Ok((dir, dst))
}

//! `runner merge OUTPUT_DIR`: compacts a job's part files into one Parquet
//! file in input order (sorted by `input_row`), written atomically beside
//! the directory; the parts stay, so the output remains resumable.

use crate::output::{manifest, Manifest};
use crate::Error;
use arrow::array::RecordBatch;
use std::path::{Path, PathBuf};

/// Merges `dir`'s parts into `into` (default: `<dir>.parquet`).
pub fn merge(dir: &Path, into: Option<&Path>) -> anyhow::Result<PathBuf> {
    let m = Manifest::read(dir)?.ok_or_else(|| {
        Error::Output(format!(
            "{} has no {}: not the output of a runner job",
            dir.display(),
            manifest::MANIFEST
        ))
    })?;
    if m.state != "finished" {
        tracing::warn!(
            state = %m.state,
            rows = m.rows(),
            of = m.total_records,
            "merging an unfinished job: the file holds only the rows written so far"
        );
    }
    let mut batches: Vec<RecordBatch> = Vec::new();
    for p in crate::output::existing_parts(dir)? {
        batches.extend(crate::output::read_part(&p)?);
    }
    let first = batches
        .first()
        .ok_or_else(|| Error::Output(format!("{} holds no rows yet", dir.display())))?;
    let schema = first.schema();
    let all = arrow::compute::concat_batches(&schema, &batches)?;
    let order = arrow::compute::sort_to_indices(
        all.column_by_name("input_row")
            .ok_or_else(|| Error::Output("parts have no input_row column".into()))?,
        None,
        None,
    )?;
    let cols = all
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c, &order, None))
        .collect::<Result<Vec<_>, _>>()?;
    let sorted = RecordBatch::try_new(schema.clone(), cols)?;
    let dst = match into {
        Some(p) => p.to_path_buf(),
        None => {
            let name = dir
                .file_name()
                .map_or("output".into(), |n| n.to_string_lossy().into_owned());
            dir.with_file_name(format!("{name}.parquet"))
        }
    };
    let parent = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let fname = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged.parquet".into());
    let mut buf = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, None)?;
    w.write(&sorted)?;
    w.close()?;
    manifest::write_atomic(parent, &fname, &buf)?;
    tracing::info!(rows = sorted.num_rows(), file = %dst.display(), "merged");
    Ok(dst)
}

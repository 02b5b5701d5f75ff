//! The Parquet sink: rows buffered and written as part files
//! (`part-NNNNN-<job>.parquet`), each written to a temporary name, fsynced
//! and renamed, so a part is either whole or absent.

use super::{JobMeta, OutputRow, PartStats, RowStatus};
use crate::config::Metric;
use crate::{Error, Result};
use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, ListArray, RecordBatch, StringArray,
    UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The output schema; `completion_token_ids` only when asked for, the
/// scoring columns only when the job scores.
pub fn schema(meta: &JobMeta, include_token_ids: bool) -> SchemaRef {
    let (metrics, loglikelihood) = (&meta.metrics[..], meta.loglikelihood);
    let s = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
    let mut fields = vec![
        s("id", false),
        Field::new("input_row", DataType::UInt64, false),
        Field::new("sample_index", DataType::UInt32, false),
        s("completion", true),
        s("finish_reason", false),
        s("status", false),
        s("error", true),
        Field::new("prompt_tokens", DataType::UInt32, false),
        Field::new("completion_tokens", DataType::UInt32, false),
        Field::new("cached_prompt_tokens", DataType::UInt32, false),
        Field::new("max_new_tokens", DataType::UInt32, false),
        Field::new("temperature", DataType::Float64, false),
        Field::new("top_p", DataType::Float64, false),
        Field::new("top_k", DataType::UInt32, false),
        Field::new("repetition_penalty", DataType::Float64, false),
        Field::new("seed", DataType::UInt64, false),
        s("model_id", false),
        s("revision", false),
        Field::new("quant_bits", DataType::Int32, true),
        Field::new("quant_group_size", DataType::Int32, true),
        Field::new("quant_act_order", DataType::Boolean, true),
        Field::new("queue_ms", DataType::Float64, false),
        Field::new("ttft_ms", DataType::Float64, true),
        Field::new("total_ms", DataType::Float64, false),
        s("runner_version", false),
        s("job_id", false),
    ];
    if !metrics.is_empty() {
        fields.push(s("reference", true));
        for m in metrics {
            fields.push(Field::new(
                format!("score_{}", m.name()),
                DataType::Float64,
                true,
            ));
        }
        if metrics.contains(&Metric::RegexMatch) {
            fields.push(s("extracted_answer", true));
        }
    }
    if loglikelihood {
        fields.push(Field::new("ll_sum", DataType::Float64, true));
        fields.push(Field::new("ll_mean", DataType::Float64, true));
        fields.push(Field::new("ll_tokens", DataType::UInt32, true));
    }
    if include_token_ids {
        fields.push(Field::new(
            "completion_token_ids",
            DataType::List(Arc::new(Field::new("item", DataType::UInt32, true))),
            false,
        ));
    }
    if meta.constrained {
        fields.push(Field::new("schema_valid", DataType::Boolean, true));
    }
    fields.extend(super::logprobs::fields(meta));
    if let Some(pt) = &meta.passthrough {
        fields.extend(pt.fields().iter().map(|f| f.as_ref().clone()));
    }
    Arc::new(Schema::new(fields))
}

/// Called with every row pushed.
pub type RowHook = Box<dyn FnMut(&OutputRow) + Send>;
/// Called after each part file is in place.
pub type PartHook = Box<dyn FnMut(PartStats) -> Result<()> + Send>;

/// When a sink writes a part, and what it holds.
#[derive(Debug, Clone, Copy)]
pub struct SinkSettings {
    /// Write `completion_token_ids`.
    pub include_token_ids: bool,
    /// Rows per part file.
    pub flush_every: usize,
    /// The longest a finished row waits in the buffer (checked on every push
    /// and every engine step).
    pub flush_after: std::time::Duration,
}

impl SinkSettings {
    /// A job's output settings.
    pub fn of(o: &crate::config::OutputSpec) -> Self {
        Self {
            include_token_ids: o.include_token_ids,
            flush_every: o.flush_every,
            flush_after: std::time::Duration::from_secs_f64(o.flush_every_s),
        }
    }
}

/// Buffers rows and writes them as part files.
pub struct ParquetSink {
    files: super::Layout,
    meta: JobMeta,
    settings: SinkSettings,
    /// When the oldest buffered row arrived.
    oldest: Option<std::time::Instant>,
    rows: Vec<OutputRow>,
    next_part: usize,
    on_row: Option<RowHook>,
    on_part: Option<PartHook>,
}

impl ParquetSink {
    /// Creates the output directory. Existing part files are never
    /// overwritten: a directory that already holds output is refused.
    pub fn create(dir: &Path, meta: JobMeta, settings: SinkSettings) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let existing = existing_parts(dir)?;
        if !existing.is_empty() {
            return Err(Error::Output(format!(
                "output directory {} already holds {} part file(s); choose another output.path or move them away",
                dir.display(),
                existing.len()
            )));
        }
        Self::resume(&super::Layout::plain(dir), meta, settings, 0)
    }

    /// A sink into a directory that may already hold parts (a resumed job,
    /// or other shards): new parts take the layout's names, numbered from
    /// `first_part`.
    pub fn resume(
        files: &super::Layout,
        meta: JobMeta,
        settings: SinkSettings,
        first_part: usize,
    ) -> Result<Self> {
        let dir = &files.dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(Self {
            files: files.clone(),
            meta,
            settings,
            oldest: None,
            rows: Vec::new(),
            next_part: first_part,
            on_row: None,
            on_part: None,
        })
    }

    /// Called with every row pushed (progress).
    pub fn on_row(&mut self, f: RowHook) {
        self.on_row = Some(f);
    }

    /// Called after every part file is durably in place (manifest updates).
    pub fn on_part(&mut self, f: PartHook) {
        self.on_part = Some(f);
    }

    /// Adds a row; writes a part when `flush_every` rows are buffered or
    /// the oldest has waited `flush_after`.
    pub fn push(&mut self, row: OutputRow) -> Result<()> {
        if let Some(f) = &mut self.on_row {
            f(&row);
        }
        self.rows.push(row);
        self.oldest.get_or_insert_with(std::time::Instant::now);
        if self.rows.len() >= self.settings.flush_every {
            return self.flush();
        }
        self.tick()
    }

    /// Writes a part when the oldest buffered row has waited `flush_after`.
    pub fn tick(&mut self) -> Result<()> {
        match self.oldest {
            Some(t) if t.elapsed() >= self.settings.flush_after => self.flush(),
            _ => Ok(()),
        }
    }

    /// Writes buffered rows as one part file (nothing when empty).
    pub fn flush(&mut self) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let batch = self.batch()?;
        let short = &self.meta.job_id[..8.min(self.meta.job_id.len())];
        let name = format!(
            "{}{:05}-{short}.parquet",
            self.files.part_prefix(),
            self.next_part
        );
        let tmp = self.files.dir.join(format!(".{name}.tmp"));
        let dst = self.files.dir.join(&name);
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props))
            .map_err(|e| Error::Output(format!("{}: {e}", tmp.display())))?;
        w.write(&batch)
            .map_err(|e| Error::Output(format!("{}: {e}", tmp.display())))?;
        let file = w
            .into_inner()
            .map_err(|e| Error::Output(format!("{}: {e}", tmp.display())))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        if let Ok(d) = std::fs::File::open(&self.files.dir) {
            let _ = d.sync_all();
        }
        let stats = PartStats {
            file: name,
            rows: self.rows.len(),
            ok: self
                .rows
                .iter()
                .filter(|r| r.status == RowStatus::Ok)
                .count(),
            errors: self
                .rows
                .iter()
                .filter(|r| r.status == RowStatus::Error)
                .count(),
            prompt_tokens: self.rows.iter().map(|r| r.prompt_tokens as usize).sum(),
            completion_tokens: self.rows.iter().map(|r| r.completion_tokens as usize).sum(),
        };
        self.rows.clear();
        self.oldest = None;
        self.next_part += 1;
        if let Some(f) = &mut self.on_part {
            f(stats)?;
        }
        Ok(())
    }

    fn batch(&self) -> Result<RecordBatch> {
        let r = &self.rows;
        let m = &self.meta;
        let n = r.len();
        let strs = |f: &dyn Fn(&OutputRow) -> Option<String>| -> ArrayRef {
            Arc::new(StringArray::from(r.iter().map(f).collect::<Vec<_>>()))
        };
        let u32s = |f: &dyn Fn(&OutputRow) -> u32| -> ArrayRef {
            Arc::new(UInt32Array::from(r.iter().map(f).collect::<Vec<_>>()))
        };
        let f64s = |f: &dyn Fn(&OutputRow) -> f64| -> ArrayRef {
            Arc::new(Float64Array::from(r.iter().map(f).collect::<Vec<_>>()))
        };
        let same = |v: &str| -> ArrayRef { Arc::new(StringArray::from(vec![v; n])) };
        let mut cols: Vec<ArrayRef> = vec![
            strs(&|x| Some(x.id.clone())),
            Arc::new(UInt64Array::from(
                r.iter().map(|x| x.input_row).collect::<Vec<_>>(),
            )),
            u32s(&|x| x.sample_index),
            strs(&|x| x.completion.clone()),
            strs(&|x| Some(x.finish_reason.as_str().to_string())),
            strs(&|x| Some(x.status.as_str().to_string())),
            strs(&|x| x.error.clone()),
            u32s(&|x| x.prompt_tokens),
            u32s(&|x| x.completion_tokens),
            u32s(&|x| x.cached_prompt_tokens),
            u32s(&|x| x.max_new_tokens),
            f64s(&|x| x.temperature),
            f64s(&|x| x.top_p),
            u32s(&|x| x.top_k),
            f64s(&|x| x.repetition_penalty),
            Arc::new(UInt64Array::from(
                r.iter().map(|x| x.seed).collect::<Vec<_>>(),
            )),
            same(&m.model_id),
            same(&m.revision),
            Arc::new(Int32Array::from(vec![m.quant_bits; n])),
            Arc::new(Int32Array::from(vec![m.quant_group_size; n])),
            Arc::new(BooleanArray::from(vec![m.quant_act_order; n])),
            f64s(&|x| x.queue_ms),
            Arc::new(Float64Array::from(
                r.iter().map(|x| x.ttft_ms).collect::<Vec<_>>(),
            )),
            f64s(&|x| x.total_ms),
            same(crate::VERSION),
            same(&m.job_id),
        ];
        if !m.metrics.is_empty() {
            cols.push(strs(&|x| x.reference.clone()));
            for i in 0..m.metrics.len() {
                cols.push(Arc::new(Float64Array::from(
                    r.iter()
                        .map(|x| x.scores.get(i).copied().flatten())
                        .collect::<Vec<_>>(),
                )));
            }
            if m.metrics.contains(&Metric::RegexMatch) {
                cols.push(strs(&|x| x.extracted.clone()));
            }
        }
        if m.loglikelihood {
            let ll = |f: &dyn Fn((f64, u32)) -> f64| -> ArrayRef {
                Arc::new(Float64Array::from(
                    r.iter().map(|x| x.loglikelihood.map(f)).collect::<Vec<_>>(),
                ))
            };
            cols.push(ll(&|(s, _)| s));
            cols.push(ll(&|(s, n)| s / n.max(1) as f64));
            cols.push(Arc::new(UInt32Array::from(
                r.iter()
                    .map(|x| x.loglikelihood.map(|l| l.1))
                    .collect::<Vec<_>>(),
            )));
        }
        if self.settings.include_token_ids {
            let lists = ListArray::from_iter_primitive::<arrow::datatypes::UInt32Type, _, _>(
                r.iter().map(|x| {
                    Some(
                        x.completion_token_ids
                            .iter()
                            .map(|&t| Some(t))
                            .collect::<Vec<_>>(),
                    )
                }),
            );
            cols.push(Arc::new(lists));
        }
        if m.constrained {
            cols.push(Arc::new(BooleanArray::from(
                r.iter().map(|x| x.schema_valid).collect::<Vec<_>>(),
            )));
        }
        cols.extend(super::logprobs::columns(m, r));
        if let Some(pt) = &m.passthrough {
            cols.extend(passthrough_columns(pt, r)?);
        }
        RecordBatch::try_new(schema(m, self.settings.include_token_ids), cols)
            .map_err(|e| Error::Output(format!("building output batch: {e}")))
    }
}

/// The passthrough columns of `rows`: each row's one-row cells, nulls for
/// a row without them.
fn passthrough_columns(pt: &Schema, rows: &[OutputRow]) -> Result<Vec<ArrayRef>> {
    let mut cols = Vec::with_capacity(pt.fields().len());
    for (i, f) in pt.fields().iter().enumerate() {
        let cells: Vec<ArrayRef> = rows
            .iter()
            .map(|r| match &r.passthrough {
                Some(b) => b.column(i).clone(),
                None => arrow::array::new_null_array(f.data_type(), 1),
            })
            .collect();
        let refs: Vec<&dyn arrow::array::Array> = cells.iter().map(|c| c.as_ref()).collect();
        cols.push(
            arrow::compute::concat(&refs)
                .map_err(|e| Error::Output(format!("passthrough column `{}`: {e}", f.name())))?,
        );
    }
    Ok(cols)
}

/// Part files already in an output directory.
pub fn existing_parts(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("part-") && n.ends_with(".parquet"))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// The record batches of one part file.
pub fn read_part(path: &Path) -> Result<Vec<RecordBatch>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .and_then(|b| b.build())
        .map_err(|e| Error::CorruptPart(format!("{}: unreadable part ({e})", path.display())))?
        .map(|b| {
            b.map_err(|e| Error::CorruptPart(format!("{}: unreadable part ({e})", path.display())))
        })
        .collect()
}

//! The sweep report: one row per variant (records, errors, metric means with
//! a 95% confidence interval, output tok/s, peak GPU memory, load time,
//! agreement with the baseline's greedy tokens), rebuilt from the variants'
//! output rows and metrics alone, as `report.md` and `report.parquet`.

pub mod plot;

use crate::job::Metrics;
use crate::output::write_atomic;
use crate::{Error, Result};
use arrow::array::{Array, AsArray, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Float64Type, Schema, UInt32Type};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `_sweep.json`: what `runner report` needs besides the data.
pub const SWEEP: &str = "_sweep.json";

/// The sweep's variants and baseline, written at its start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepInfo {
    /// Variant names in run order.
    pub variants: Vec<String>,
    /// The baseline variant.
    pub baseline: Option<String>,
}

impl SweepInfo {
    /// The sweep info of `dir`, `None` when `dir` is not a sweep output.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join(SWEEP);
        if !p.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Output(format!("{}: unreadable ({e})", p.display())))
    }
}

/// A metric's mean over the records that have a score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricSummary {
    /// `score_<name>` column name without the prefix.
    pub name: String,
    /// Records scored.
    pub n: usize,
    /// Mean score.
    pub mean: f64,
    /// Half width of the 95% normal confidence interval.
    pub ci95: f64,
}

/// One variant's row of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantReport {
    /// Variant name.
    pub variant: String,
    /// Rows written.
    pub records: usize,
    /// Error rows.
    pub errors: usize,
    /// Metric means.
    pub metrics: Vec<MetricSummary>,
    /// Generated tokens per second of generation wall time (`None`: no
    /// metrics file yet).
    pub output_tok_s: Option<f64>,
    /// Peak GPU memory of its last run (GiB; 0 on the CPU; `None`: no run
    /// has ended).
    pub peak_gpu_gib: Option<f64>,
    /// Model load seconds of its last run.
    pub load_s: Option<f64>,
    /// Records ok in both this variant and the baseline.
    pub compared: usize,
    /// Share of those whose greedy tokens are identical to the baseline's.
    pub agreement: Option<f64>,
    /// Mean position of the first differing token over the records that differ.
    pub mean_first_divergence: Option<f64>,
}

struct Rows {
    status: HashMap<String, bool>,
    tokens: HashMap<String, Vec<u32>>,
    scores: Vec<(String, Vec<f64>)>,
}

fn read_rows(dir: &Path) -> Result<Rows> {
    let mut rows = Rows {
        status: HashMap::new(),
        tokens: HashMap::new(),
        scores: Vec::new(),
    };
    for p in crate::output::existing_parts(dir)? {
        for b in crate::output::read_part(&p)? {
            let id = b.column_by_name("id").map(|c| c.as_string::<i32>().clone());
            let st = b
                .column_by_name("status")
                .map(|c| c.as_string::<i32>().clone());
            let (Some(id), Some(st)) = (id, st) else {
                return Err(Error::Output(format!(
                    "{}: no id/status columns",
                    p.display()
                )));
            };
            let toks = b
                .column_by_name("completion_token_ids")
                .map(|c| c.as_list::<i32>().clone());
            for i in 0..b.num_rows() {
                let key = id.value(i).to_string();
                rows.status.insert(key.clone(), st.value(i) == "ok");
                if let Some(t) = &toks {
                    let v = t.value(i);
                    let v = v.as_primitive::<UInt32Type>();
                    rows.tokens.insert(key, v.values().to_vec());
                }
            }
            for (fi, field) in b.schema().fields().iter().enumerate() {
                let Some(name) = field.name().strip_prefix("score_") else {
                    continue;
                };
                let col = b.column(fi).as_primitive::<Float64Type>();
                let slot = match rows.scores.iter().position(|(n, _)| n == name) {
                    Some(k) => k,
                    None => {
                        rows.scores.push((name.to_string(), Vec::new()));
                        rows.scores.len() - 1
                    }
                };
                rows.scores[slot].1.extend(
                    (0..col.len())
                        .filter(|&i| col.is_valid(i))
                        .map(|i| col.value(i)),
                );
            }
        }
    }
    Ok(rows)
}

/// Mean and 95% CI half width (normal approximation, sample sd).
pub fn mean_ci(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, 1.96 * (var / n).sqrt())
}

/// The variant directory of a sweep output.
pub fn variant_dir(out: &Path, name: &str) -> PathBuf {
    out.join(format!("variant={name}"))
}

/// Builds the report from a sweep output directory.
pub fn build(out: &Path) -> Result<(SweepInfo, Vec<VariantReport>)> {
    let Some(info) = SweepInfo::read(out)? else {
        let what = if out.join(crate::job::MANIFEST).is_file() {
            "is the output of a single job, not of a sweep (`runner status` gives its figures)"
        } else if out.is_dir() {
            "is not a sweep output"
        } else {
            "does not exist"
        };
        return Err(Error::Output(format!(
            "{} {what}: `runner report` summarises a sweep's variants and needs its {SWEEP}",
            out.display()
        )));
    };
    let mut data = Vec::new();
    for v in &info.variants {
        let dir = variant_dir(out, v);
        let rows = if dir.is_dir() {
            Some(read_rows(&dir)?)
        } else {
            None
        };
        let metrics = if dir.is_dir() {
            Metrics::read(&crate::output::Layout::plain(&dir))?
        } else {
            None
        };
        data.push((v.clone(), rows, metrics));
    }
    let base = info
        .baseline
        .as_ref()
        .and_then(|b| data.iter().find(|d| &d.0 == b))
        .and_then(|d| d.1.as_ref());
    let mut out_rows = Vec::new();
    for (name, rows, metrics) in &data {
        let Some(rows) = rows else {
            continue; // not run yet
        };
        let (mut compared, mut same, mut div) = (0usize, 0usize, Vec::new());
        if let Some(b) = base {
            for (id, ok) in &rows.status {
                if !*ok || b.status.get(id) != Some(&true) {
                    continue;
                }
                let (Some(x), Some(y)) = (rows.tokens.get(id), b.tokens.get(id)) else {
                    continue;
                };
                compared += 1;
                if x == y {
                    same += 1;
                } else {
                    let first = x
                        .iter()
                        .zip(y)
                        .position(|(a, b)| a != b)
                        .unwrap_or(x.len().min(y.len()));
                    div.push(first as f64);
                }
            }
        }
        let last = metrics.as_ref().and_then(|m| m.last_run.as_ref());
        out_rows.push(VariantReport {
            variant: name.clone(),
            records: rows.status.len(),
            errors: rows.status.values().filter(|ok| !**ok).count(),
            metrics: rows
                .scores
                .iter()
                .map(|(n, v)| {
                    let (mean, ci95) = mean_ci(v);
                    MetricSummary {
                        name: n.clone(),
                        n: v.len(),
                        mean,
                        ci95,
                    }
                })
                .collect(),
            output_tok_s: metrics.as_ref().map(|m| m.output_tok_s),
            peak_gpu_gib: last
                .and_then(|r| r.summary.peak_device_bytes)
                .map(|b| b as f64 / (1u64 << 30) as f64),
            load_s: last.map(|r| r.load_s),
            compared,
            agreement: (base.is_some() && compared > 0).then(|| same as f64 / compared as f64),
            mean_first_divergence: (!div.is_empty())
                .then(|| div.iter().sum::<f64>() / div.len() as f64),
        });
    }
    Ok((info, out_rows))
}

/// `v` to `digits` decimals, or "-" when there is none (a table's empty cell).
pub(crate) fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// Where the report files live inside a sweep output: a folder of its
/// own, so that a `*/*.parquet` or `**/*.parquet` glob over the variants'
/// data does not read the report as data.
pub const REPORT_DIR: &str = "_report";

/// Writes `report.md`, `report.parquet` and the plot into the sweep
/// output's `_report/`.
pub fn write(sweep_out: &Path, info: &SweepInfo, rows: &[VariantReport]) -> Result<()> {
    let out = &sweep_out.join(REPORT_DIR);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let metric_names: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for r in rows {
            for m in &r.metrics {
                if !v.contains(&m.name) {
                    v.push(m.name.clone());
                }
            }
        }
        v
    };
    let mut md = String::from("# Sweep report\n\n");
    md.push_str(&format!(
        "Baseline: `{}`. Metric cells: mean ± 95% CI half width (n). Agreement: share of records ok in both whose greedy tokens equal the baseline's; divergence: mean first differing token position over the records that differ.\n\n",
        info.baseline.as_deref().unwrap_or("none")
    ));
    md.push_str("| variant | records | errors |");
    for m in &metric_names {
        md.push_str(&format!(" {m} |"));
    }
    md.push_str(
        " output tok/s | peak GPU GiB | load s | agreement | first divergence |\n|---|---|---|",
    );
    md.push_str(&"---|".repeat(metric_names.len() + 5));
    md.push('\n');
    for r in rows {
        md.push_str(&format!("| {} | {} | {} |", r.variant, r.records, r.errors));
        for m in &metric_names {
            match r.metrics.iter().find(|x| &x.name == m) {
                Some(x) => md.push_str(&format!(" {:.3} ± {:.3} ({}) |", x.mean, x.ci95, x.n)),
                None => md.push_str(" - |"),
            }
        }
        md.push_str(&format!(
            " {} | {} | {} | {} | {} |\n",
            fmt_opt(r.output_tok_s, 1),
            fmt_opt(r.peak_gpu_gib, 2),
            fmt_opt(r.load_s, 2),
            fmt_opt(r.agreement, 3),
            fmt_opt(r.mean_first_divergence, 2)
        ));
    }
    // The plot: the first metric (else agreement) against output tok/s.
    let (ylabel, ys): (String, Vec<f64>) = match metric_names.first() {
        Some(m) => (
            format!("{m} mean"),
            rows.iter()
                .map(|r| {
                    r.metrics
                        .iter()
                        .find(|x| &x.name == m)
                        .map_or(f64::NAN, |x| x.mean)
                })
                .collect(),
        ),
        None => (
            "agreement with the baseline".into(),
            rows.iter()
                .map(|r| r.agreement.unwrap_or(f64::NAN))
                .collect(),
        ),
    };
    let points: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| r.output_tok_s.unwrap_or(f64::NAN))
        .zip(ys)
        .collect();
    let title = format!("{ylabel} against output tok/s, one point per variant");
    plot::write(
        &out.join("report.svg"),
        &plot::Plot {
            title: &title,
            x_label: "output tok/s",
            y_label: &ylabel,
            points: &points,
        },
    )?;
    md.push_str(&format!(
        "\n![{title}](report.svg)\n\nreport.svg: {ylabel} (y) against output tok/s (x); points numbered:\n\n"
    ));
    for (i, r) in rows.iter().enumerate() {
        let c = plot::PALETTE[i % plot::PALETTE.len()];
        md.push_str(&format!(
            "{}. {} (#{:02x}{:02x}{:02x})\n",
            i + 1,
            r.variant,
            c[0],
            c[1],
            c[2]
        ));
    }
    write_atomic(out, "report.md", md.as_bytes())?;

    let mut fields = vec![
        Field::new("variant", DataType::Utf8, false),
        Field::new("records", DataType::UInt64, false),
        Field::new("errors", DataType::UInt64, false),
    ];
    let mut cols: Vec<arrow::array::ArrayRef> = vec![
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.variant.clone()).collect::<Vec<_>>(),
        )),
        Arc::new(UInt64Array::from(
            rows.iter().map(|r| r.records as u64).collect::<Vec<_>>(),
        )),
        Arc::new(UInt64Array::from(
            rows.iter().map(|r| r.errors as u64).collect::<Vec<_>>(),
        )),
    ];
    for m in &metric_names {
        let get = |r: &VariantReport| r.metrics.iter().find(|x| &x.name == m).cloned();
        fields.push(Field::new(format!("{m}_mean"), DataType::Float64, true));
        cols.push(Arc::new(Float64Array::from(
            rows.iter()
                .map(|r| get(r).map(|x| x.mean))
                .collect::<Vec<_>>(),
        )));
        fields.push(Field::new(format!("{m}_ci95"), DataType::Float64, true));
        cols.push(Arc::new(Float64Array::from(
            rows.iter()
                .map(|r| get(r).map(|x| x.ci95))
                .collect::<Vec<_>>(),
        )));
    }
    let f64col = |name: &str, f: &dyn Fn(&VariantReport) -> Option<f64>| {
        (
            Field::new(name, DataType::Float64, true),
            Arc::new(Float64Array::from(rows.iter().map(f).collect::<Vec<_>>()))
                as arrow::array::ArrayRef,
        )
    };
    for (f, c) in [
        f64col("output_tok_s", &|r| r.output_tok_s),
        f64col("peak_gpu_gib", &|r| r.peak_gpu_gib),
        f64col("load_s", &|r| r.load_s),
        f64col("agreement", &|r| r.agreement),
        f64col("mean_first_divergence", &|r| r.mean_first_divergence),
    ] {
        fields.push(f);
        cols.push(c);
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
        .map_err(|e| Error::Output(format!("report batch: {e}")))?;
    let mut buf = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, batch.schema(), None)
        .map_err(|e| Error::Output(format!("report.parquet: {e}")))?;
    w.write(&batch)
        .map_err(|e| Error::Output(format!("report.parquet: {e}")))?;
    w.close()
        .map_err(|e| Error::Output(format!("report.parquet: {e}")))?;
    write_atomic(out, "report.parquet", &buf)
}
